"""init_ray: a local embedded Ray starts without its dashboard unless MLC_RAY_DASHBOARD=1; a cluster
(RAY_ADDRESS or an address given) is joined as it is, and a Ray already up is left alone.

``ray.init`` is replaced by a recorder: what is checked is the call the jobs make, not Ray itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from mlc_ray import cli
from mlc_ray.cli import init_ray

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import ray

    seen: list[dict[str, Any]] = []
    # init_ray records that it started a local Ray (run_job stops it): restored after the test
    monkeypatch.setattr(cli, "_STARTED_LOCAL_RAY", False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLC_RAY_DASHBOARD", raising=False)
    return seen


def test_local_ray_starts_without_dashboard(calls) -> None:
    init_ray()
    assert calls == [{"address": None, "log_to_driver": True, "include_dashboard": False}]


def test_an_explicit_local_ray_too(calls) -> None:
    init_ray("local")
    assert calls == [{"address": "local", "log_to_driver": True, "include_dashboard": False}]


@pytest.mark.parametrize("value", ["1", "true"])
def test_mlc_ray_dashboard_keeps_it(calls, monkeypatch, value) -> None:
    monkeypatch.setenv("MLC_RAY_DASHBOARD", value)
    init_ray()
    assert "include_dashboard" not in calls[0]


def test_training_keeps_the_dashboard_of_its_local_ray(calls) -> None:
    # Ray Train's placement-group cleaner polls the state API (served by the dashboard) every second
    # and logs a warning each time it is missing: 111 lines in one `make demo` before this
    init_ray(keep_dashboard=True)
    init_ray("local", keep_dashboard=True)
    assert all("include_dashboard" not in call for call in calls), calls


def test_a_cluster_is_joined_without_dashboard_settings(calls, monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    init_ray()
    init_ray("ray://other:10001")
    assert calls == [
        {"address": "http://head:8265", "log_to_driver": True},
        {"address": "ray://other:10001", "log_to_driver": True},
    ]


def test_caller_settings_win(calls) -> None:
    init_ray(include_dashboard=True, num_cpus=2)
    assert calls[0]["include_dashboard"] is True and calls[0]["num_cpus"] == 2


def test_a_running_ray_is_left_alone(calls, monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    init_ray()
    assert calls == []
