"""Keep the deployment files honest: they parse, Ray accepts the launcher configs, every job command
written in a manifest or README exists in that job's argument parser, and every image pins the
project's Ray version."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = sorted((ROOT / "cluster").rglob("*.yaml"))
LAUNCHER_CONFIGS = sorted((ROOT / "cluster" / "aws").glob("*.yaml"))
DOCS_WITH_COMMANDS = [
    ROOT / "README.md",
    ROOT / "cluster" / "README.md",
    ROOT / "mlflow" / "README.md",
    ROOT / "BENCHMARKS.md",
    *CLUSTER_YAMLS,
]
JOB_COMMAND = re.compile(r"python3? (jobs/(\w+)\.py)((?:[ \t]+(?:\\\n)?[^\s|;&#`)]+)*)")

pytestmark = pytest.mark.unit


def load_job_module(name: str):
    path = ROOT / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_entrypoints(node) -> list[str]:
    """Every `entrypoint:` / container command string in a YAML tree, including YAML documents held
    as strings (a RayJob inside a ConfigMap)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "entrypoint" and isinstance(value, str):
                found.append(" ".join(value.split()))
            else:
                found += yaml_entrypoints(value)
    elif isinstance(node, list):
        for item in node:
            found += yaml_entrypoints(item)
    elif isinstance(node, str) and "\n" in node and "jobs/" in node:
        try:
            found += yaml_entrypoints(yaml.safe_load(node))
        except yaml.YAMLError:
            found.append(node)
    elif isinstance(node, str) and "jobs/" in node:
        found.append(node)
    return found


def job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, job name, argv) for every `python jobs/X.py ...` written in the docs and manifests."""
    found = []
    for doc in DOCS_WITH_COMMANDS:
        if not doc.exists():
            continue
        text = doc.read_text()
        if doc.suffix == ".yaml":
            # the parsed entrypoints (folded scalars, RayJobs embedded in ConfigMaps), not the raw text
            text = "\n".join(yaml_entrypoints([d for d in yaml.safe_load_all(text) if d is not None]))
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        for match in JOB_COMMAND.finditer(text):
            argv = shlex.split(match.group(3).replace("\n", " "), comments=False)
            argv = [a for a in argv if not a.startswith(("$(", ">", "2>"))]
            found.append((f"{doc.relative_to(ROOT)}", match.group(2), argv))
    return found


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_configs_pass_ray_validation(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node must not take GPUs"
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"], "S3 access must come from an instance profile"


def test_images_pin_the_project_ray_version() -> None:
    pinned = ray.__version__
    texts = {p: p.read_text() for p in [*CLUSTER_YAMLS, ROOT / "cluster" / "Dockerfile"]}
    seen = 0
    for path, text in texts.items():
        for image in re.findall(r"rayproject/ray:([\w.\-]+)", text):
            seen += 1
            assert image.startswith(pinned + "-"), (
                f"{path.name}: image rayproject/ray:{image} is not Ray {pinned}"
            )
        for version in re.findall(r"rayVersion: ['\"]?([\d.]+)", text):
            seen += 1
            assert version == pinned, f"{path.name}: rayVersion {version} != installed Ray {pinned}"
        for tag in re.findall(r"mlc-ray:[\w.]+-ray([\d.]+\d)", text):
            assert tag == pinned, f"{path.name}: project image built for Ray {tag}, project pins {pinned}"
    assert seen >= 5


def test_the_image_copies_every_file_the_package_build_reads() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {project["readme"], *project.get("license-files", [])}
    copied = set()
    for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in shlex.split(line)[1:] if not p.startswith("--")]
            copied.update(parts[:-1])  # the sources; the last word is the destination
    # `pip install .` in the image builds from what was copied: a file pyproject names and the image
    # lacks (seen: LICENSE) builds a package without it, with a warning setuptools means to make an error
    assert needed <= copied, f"cluster/Dockerfile does not COPY {sorted(needed - copied)}"
    assert all((ROOT / name).is_file() for name in needed)


def test_no_literal_secrets_in_deployment_files() -> None:
    for path in [*CLUSTER_YAMLS, ROOT / "cluster" / "runtime_env.yaml"]:
        text = path.read_text()
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S+", text), path
        assert not re.search(r"(?i)password\s*:\s*['\"]?\w{6,}", text), path


def test_token_auth_is_on_everywhere() -> None:
    for path in CLUSTER_YAMLS:
        text = path.read_text()
        if "kind: RayCluster" in text or "rayClusterSpec" in text:
            assert "mode: token" in text, f"{path.name} starts a Ray cluster without token auth"
    for path in LAUNCHER_CONFIGS:
        assert "RAY_AUTH_MODE=token" in path.read_text()


def test_every_documented_job_command_parses() -> None:
    commands = job_commands()
    jobs_seen = {name for _, name, _ in commands}
    assert {"train", "tag", "promote"} <= jobs_seen, f"docs mention only {sorted(jobs_seen)}"
    parsers = {}
    for where, name, argv in commands:
        assert (ROOT / "jobs" / f"{name}.py").exists(), f"{where}: jobs/{name}.py does not exist"
        if name not in parsers:
            parsers[name] = load_job_module(name).build_parser()
        parser = parsers[name]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse exits on an unknown flag
            raise AssertionError(f"{where}: `python jobs/{name}.py {' '.join(argv)}` does not parse") from exc


def test_cron_schedules_call_incremental_tagging_with_champion() -> None:
    for name in ("raycronjob-tag.yaml", "cronjob-tag.yaml"):
        text = (ROOT / "cluster" / "kuberay" / name).read_text()
        assert "jobs/tag.py" in text and "--incremental" in text and "@champion" in text, name


def test_scheduled_select_reads_the_table_the_scheduled_tagging_writes() -> None:
    tag = " ".join((ROOT / "cluster" / "kuberay" / "raycronjob-tag.yaml").read_text().split())
    select = " ".join((ROOT / "cluster" / "kuberay" / "cronjob-select.yaml").read_text().split())
    table = re.search(r"jobs/tag\.py .*?--output (\S+)", tag).group(1)
    assert f"python jobs/select_queue.py --table {table}" in select
    assert "schedule: 0 2 * * *" in tag and "schedule: 0 6 * * 1" in select  # after that night's tagging
