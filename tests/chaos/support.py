"""Helpers shared by the chaos tier: the fault proxy process, table accounting, the results table.

Every chaos test that tags images calls ``record(...)`` with what it *measured* (images in, rows
out, duplicates, missing); ``conftest.py`` prints the collected rows as a markdown table at the
end of the session (and writes them to ``$MLC_RAY_CHAOS_RESULTS`` as JSON when that is set).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.helpers import REPO_ROOT, free_port, wait_for_port

CONTROL_PATH = "/__faults__"
MODEL_NAME = "chaos-tagger"  # the registered model of the tier (conftest.registered_model)


@dataclass
class ChaosResult:
    test: str
    fault: str
    times: int  # how many times the fault was injected
    images_in: int
    rows_out: int
    duplicates: int
    missing: int


RESULTS: list[ChaosResult] = []


def record(
    test: str, fault: str, times: int, images_in: int, rows_out: int, duplicates: int, missing: int
) -> None:
    RESULTS.append(ChaosResult(test, fault, int(times), images_in, rows_out, duplicates, missing))
    print(
        f"[chaos] {test}: fault={fault!r} times={times} images_in={images_in} rows_out={rows_out} "
        f"duplicates={duplicates} missing={missing}"
    )


def results_markdown() -> str:
    lines = [
        "| test | fault injected | times | images in | rows out | duplicates | missing |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in RESULTS:
        lines.append(
            f"| `{r.test}` | {r.fault} | {r.times} | {r.images_in} | {r.rows_out} | {r.duplicates} | {r.missing} |"
        )
    return "\n".join(lines)


def results_json() -> str:
    return json.dumps([asdict(r) for r in RESULTS], indent=2)


@dataclass
class TableCounts:
    rows: int
    duplicates: int  # rows beyond the first for a URI
    missing: int  # expected URIs with no row
    extra: int  # rows for URIs that were not in the input


def table_counts(uris: Iterable[str], expected: Iterable[str]) -> TableCounts:
    uris = list(uris)
    counts = Counter(uris)
    want = set(expected)
    return TableCounts(
        rows=len(uris),
        duplicates=sum(n - 1 for n in counts.values()),
        missing=len(want - set(counts)),
        extra=sum(1 for u in counts if u not in want),
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate`` until it holds (a condition, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class FaultProxy:
    """``tests/chaos/s3_fault_proxy.py`` in its own process in front of the S3 server."""

    def __init__(self, upstream: str, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_dir / "fault-proxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.s3_fault_proxy",
                "--upstream",
                upstream,
                "--port",
                str(self.port),
            ],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)

    def _call(self, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.endpoint + CONTROL_PATH, data=data, method="POST" if data else "GET"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **settings: object) -> dict:
        """Set ``fraction``/``fail_first``/``seed``/``kinds`` and reset the counters."""
        return self._call(settings)

    def stats(self) -> dict:
        return self._call()

    def off(self) -> None:
        self.configure(fraction=0.0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
