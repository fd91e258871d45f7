"""Security: hostile keys, hostile pickles, altered artifacts, and secrets that must not leak.

Faults:

* an S3 model bundle holding hostile keys (``../x``, ``/x`` after a double slash, ``..``) — nothing
  may be written outside the local cache, whatever ``resolve_model`` decides;
* state dicts / checkpoints whose pickle runs code when loaded (``__reduce__`` -> ``open(marker,
  "w")``) — every loader refuses them (``weights_only=True``) and the marker is never created; and
  every ``torch.load`` in ``mlc_ray`` passes ``weights_only=True`` (read from the source, AST);
* a model version whose *cached* copy is altered after download — it is verified against its
  sha256 tags and downloaded again before use (the stored-artifact case is in test_bad_inputs.py);
* canary secrets in the environment of the job drivers (``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``): a 1-epoch ``jobs/train.py`` and a
  ``jobs/tag.py`` run; the test greps their stdout/stderr, the Ray session logs, MLflow (params,
  tags, metrics names, the database file, artifacts), training storage (checkpoints, bundle) and
  the tag table (decoded rows and every object under the output) for the canary values;
* the same on an authenticating server (``mlflow server --app-name basic-auth``): canary passwords
  for the admin and the training / promotion / tagging identities, each job run as its own
  identity (one refused by the server), then the logs, the server's stores and the table grepped.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from mlc_ray import storage
from tests.chaos import support
from tests.chaos.support import MODEL_NAME
from tests.helpers import REPO_ROOT, read_table, upload_images

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

BUCKET = "chaos-security"


# ---------------------------------------------------------------------------------------------- keys


def test_hostile_bundle_keys_never_escape_the_cache(s3_server, tiny_bundle, tmp_path: Path) -> None:
    import boto3

    from mlc_ray.registry import resolve_model

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=BUCKET)
    storage.reset_clients()
    client = storage.s3_client()
    name = f"escape-{uuid.uuid4().hex[:8]}"
    for f in Path(tiny_bundle).iterdir():
        client.put_object(Bucket=BUCKET, Key=f"bundles/evil/{f.name}", Body=f.read_bytes())
    hostile = [f"bundles/evil/../{name}-dotdot", f"bundles/evil//tmp/{name}-abs", "bundles/evil/.."]
    for key in hostile:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"pwned")
    stored = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="bundles/")["Contents"]}
    assert set(hostile) <= stored  # the server keeps them literally: the client must defend itself

    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        resolve_model(f"s3://{BUCKET}/bundles/evil", cache)
    client.delete_object(Bucket=BUCKET, Key="bundles/evil/..")  # without the '..' key it resolves...
    resolved = resolve_model(f"s3://{BUCKET}/bundles/evil", cache)
    files = sorted(p.name for p in Path(resolved.local_dir).iterdir())
    assert files == sorted(p.name for p in Path(tiny_bundle).iterdir())  # ...to the bundle's own files
    assert Path(resolved.local_dir).resolve().is_relative_to(cache.resolve())
    # where an escape would land: beside the download's temp dir (/tmp), at an absolute path, in the test dir
    escaped = [*Path("/tmp").glob(f"{name}*"), *tmp_path.rglob(f"{name}*"), *Path.cwd().glob(f"{name}*")]
    assert escaped == [], escaped


# ---------------------------------------------------------------------------------------------- pickles


class _RunsCodeWhenLoaded:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def _hostile(path: Path, marker: Path, nest: str | None = None) -> Path:
    payload: dict = {"backbone.features.0.weight": torch.zeros(1), "evil": _RunsCodeWhenLoaded(marker)}
    torch.save({nest: payload} if nest else payload, path)
    return path


def test_hostile_pickles_are_refused_by_every_loader(tiny_bundle, tmp_path: Path) -> None:
    import json
    import shutil

    from ray.train import Checkpoint

    from mlc_ray.bundle import ModelBundle
    from mlc_ray.models import create_model
    from mlc_ray.models import load_pretrained as load_pretrained_fn
    from mlc_ray.train.loop import STATE_FILE, _init_weights
    from mlc_ray.train.runner import _load_checkpoint
    from mlc_ray.train.scoring import load_bundle_model

    marker = tmp_path / "code-ran"
    # a bundle whose model.pt is hostile (model.json for the loaders that build the model first)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "model.json").write_text(json.dumps({"arch": "mobilenet_v1", "num_labels": 7, "width": 0.25}))
    _hostile(bundle / "model.pt", marker)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _hostile(ckpt / STATE_FILE, marker, nest="model")
    state_dict = _hostile(tmp_path / "weights.pt", marker)

    loaders = {
        "create_model(pretrained=)": lambda: create_model(
            "mobilenet_v1", 7, width=0.25, pretrained=str(state_dict)
        ),
        "load_pretrained": lambda: load_pretrained_fn(
            create_model("mobilenet_v1", 7, width=0.25), str(state_dict)
        ),
        "ModelBundle.load_model": lambda: ModelBundle(str(bundle)).load_model(),
        "scoring.load_bundle_model": lambda: load_bundle_model(str(bundle)),
        "train init_from (checkpoint dir)": lambda: _init_weights(_tagger(), str(ckpt)),
        "train init_from (bundle dir)": lambda: _init_weights(_tagger(), str(bundle)),
        "runner._load_checkpoint": lambda: _load_checkpoint(Checkpoint.from_directory(str(ckpt))),
    }
    refused = {}
    for name, load in loaders.items():
        with pytest.raises(Exception) as info:  # noqa: PT011 - each loader words it its own way
            load()
        refused[name] = type(info.value).__name__
        assert "Weights only load failed" in str(info.value), (name, info.value)  # refused for the pickle
        assert not marker.exists(), f"{name} ran the pickle's code"
    assert torch.load(state_dict, weights_only=False) is not None and marker.exists()  # the payload is live
    print("[chaos] hostile pickles refused:", refused)


def _tagger():
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.models import ImageTagger, create_model

    return ImageTagger(create_model("mobilenet_v1", 7, width=0.25), PreprocessConfig(image_size=32))


def test_every_torch_load_in_the_library_is_weights_only() -> None:
    calls = []
    for path in sorted((REPO_ROOT / "mlc_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
            ):
                base = node.func.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = (
                        isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    )
                    calls.append((f"{path.relative_to(REPO_ROOT)}:{node.lineno}", safe))
    # the loaders are where we think they are: the bundle, the model registry, the worker, the runner
    assert len(calls) >= 4, calls
    assert [c for c, safe in calls if not safe] == []


# ---------------------------------------------------------------------------------------------- sha256


def test_cached_model_altered_after_download_is_verified_and_replaced(tracking, tmp_path: Path) -> None:
    from mlc_ray.registry import resolve_model

    cache = tmp_path / "cache"
    first = resolve_model(f"models:/{MODEL_NAME}/{tracking['good']}", cache)
    onnx = Path(first.local_dir) / "model.onnx"
    good_bytes = onnx.read_bytes()
    onnx.write_bytes(b"\x00" * 64)  # someone (or a disk) changes the cached copy
    again = resolve_model(f"models:/{MODEL_NAME}/{tracking['good']}", cache)
    assert Path(again.local_dir, "model.onnx").read_bytes() == good_bytes  # re-downloaded, verified


# ---------------------------------------------------------------------------------------------- canaries


def _grep(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n[:12]}..." for n in needles if n.encode() in data]
    return hits


def test_canary_secrets_never_reach_logs_mlflow_or_the_table(
    s3_server, chaos_ray, fault_proxy, tracking, tmp_path: Path
) -> None:
    import boto3
    import mlflow
    import ray
    from mlflow import MlflowClient

    from mlc_ray.data.demo import generate_demo

    canaries = {
        "AWS_SECRET_ACCESS_KEY": f"CANARYaws{uuid.uuid4().hex}",
        "AWS_SESSION_TOKEN": f"CANARYtoken{uuid.uuid4().hex}",
        "MLFLOW_TRACKING_PASSWORD": f"CANARYmlflow{uuid.uuid4().hex}",
    }
    needles = list(canaries.values())
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=f"{BUCKET}-canary")
    storage.reset_clients()
    uris = sorted(upload_images(f"{BUCKET}-canary", "in", 12, with_bad=False))
    data = generate_demo(str(tmp_path / "demo"), seed=2, num_train=16, num_val=8, image_size=32)
    train_db = f"sqlite:///{tmp_path / 'train-mlflow.db'}"
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    base_env = {**os.environ, **canaries, "MLFLOW_TRACKING_USERNAME": "chaos", "PYTHONPATH": path}
    driver = [sys.executable, "-m", "tests.chaos.driver", "--ray-address", chaos_ray,
              "--worker-env", f"AWS_ENDPOINT_URL={fault_proxy.endpoint}"]  # fmt: skip

    train = subprocess.run(
        [*driver, "--job", "train", "--", "--data", data, "--epochs", "1", "--batch-size", "8",
         "--image-size", "32", "--model", "mobilenet_v1", "--width", "0.25", "--num-workers", "1", "--storage-path", str(tmp_path / "runs"),
         "--run-name", "canary", "--experiment", "chaos-canary", "--max-error-rate", "0.5"],
        cwd=work, env={**base_env, "MLFLOW_TRACKING_URI": train_db},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    output = f"s3://{BUCKET}-canary/tags"
    tag = subprocess.run(
        [*driver, "--", "--model", f"models:/{MODEL_NAME}/{tracking['good']}", "--input", f"s3://{BUCKET}-canary/in/",
         "--output", output, "--shard-size", "6", "--actors", "1", "--threads-per-actor", "1"],
        cwd=work, env={**base_env, "MLFLOW_TRACKING_URI": tracking["uri"], "MLC_RAY_MODEL_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert tag.returncode == 0, tag.stdout[-2000:] + tag.stderr[-3000:]

    assert output in tag.stdout + tag.stderr and "canary" in train.stdout + train.stderr  # logs are captured
    leaks: list[str] = []
    for name, proc in (("train", train), ("tag", tag)):
        leaks += [f"{name} stdout/stderr" for n in needles if n in proc.stdout + proc.stderr]
    # MLflow: every param, tag and metric name of every run of the training experiment, and the raw stores
    mlflow.set_tracking_uri(train_db)
    client = MlflowClient(train_db)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and any(r.data.params for r in runs)  # we are looking at the run the job logged
    for r in runs:
        text = repr(r.data.params) + repr(r.data.tags) + repr(list(r.data.metrics))
        leaks += [f"mlflow run {r.info.run_id} params/tags" for n in needles if n in text]
    mlflow.set_tracking_uri(tracking["uri"])
    for mv in MlflowClient(tracking["uri"]).search_model_versions(f"name='{MODEL_NAME}'"):
        leaks += [f"model version {mv.version} tags" for n in needles if n in repr(mv.tags)]
    leaks += _grep(tmp_path, needles)  # sqlite db files, ./mlruns artifacts, checkpoints, bundle, cache
    leaks += _grep(Path(tracking["root"]), needles)
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    leaks += _grep(session / "logs", needles)
    # the tag table: decoded rows, and every object under the output (state, shard lists, summary)
    table = read_table(output)
    counts = support.table_counts(table.column("image_uri").to_pylist(), uris)
    rows_text = repr(table.to_pylist())
    leaks += ["tag table rows" for n in needles if n in rows_text]
    for info in storage.iter_objects(output):
        body = storage.read_bytes(info.uri)
        leaks += [f"{info.uri}" for n in needles if n.encode() in body]
    support.record(
        "test_canary_secrets_never_leak",
        "canary AWS secret/session token + MLflow password in the drivers' env (train + tag)",
        len(canaries),
        len(uris),
        counts.rows,
        counts.duplicates,
        counts.missing,
    )
    assert (counts.rows, counts.duplicates, counts.missing) == (len(uris), 0, 0)
    assert leaks == [], leaks


@pytest.mark.timeout(600)  # a server, a registration, four job processes and a Ray tagging run
def test_registry_passwords_never_leak_on_an_authenticating_server(
    s3_server, chaos_ray, fault_proxy, color_data, tmp_path: Path
) -> None:
    """The same hunt on ``mlflow server --app-name basic-auth``: canary passwords for the admin and
    all three job identities, each job run as its own identity (provisioning, register, promote,
    a refused promotion, --history, tag), then every log, MLflow store and the tag table grepped."""
    import boto3
    import mlflow
    import ray
    from mlflow import MlflowClient

    from mlc_ray.registry import register_bundle
    from tests.helpers import GOOD, AuthServer, build_color_bundle, identity

    canary = {
        role: f"CANARY{role}{uuid.uuid4().hex}" for role in ("admin", "training", "promotion", "tagging")
    }
    needles = list(canary.values())
    name = f"canary-{uuid.uuid4().hex[:6]}"
    (tmp_path / "server").mkdir()
    server = AuthServer(tmp_path / "server", admin_password=canary["admin"])
    users = {"training": "mlc-training", "promotion": "mlc-promotion", "tagging": "mlc-tagging"}
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    base_env.update(
        {
            "PYTHONPATH": path,
            "MLFLOW_TRACKING_URI": server.uri,
            "MLC_RAY_MODEL_CACHE": str(tmp_path / "cache"),
        }
    )
    jobs = REPO_ROOT / "jobs"
    work = tmp_path / "work"
    work.mkdir()
    procs: dict[str, subprocess.CompletedProcess] = {}

    def run(label: str, role: str, args: list[str], expect: int, timeout: int = 150) -> None:
        user = "admin" if role == "admin" else users[role]
        env = {**base_env, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": canary[role]}
        if role == "admin":
            env.update({f"MLC_RAY_{r.upper()}_PASSWORD": canary[r] for r in users})
        proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == expect, (label, proc.stdout[-2000:], proc.stderr[-3000:])
        procs[label] = proc

    try:
        run("provision", "admin", [sys.executable, str(jobs / "registry_users.py"), "--model", name], 0)
        with identity(users["training"], canary["training"]):
            mlflow.set_tracking_uri(server.uri)
            bundle = build_color_bundle(tmp_path / "bundle", GOOD)
            register_bundle(bundle, f"{name}-staging", tags={"manifest_uri": color_data})
        promote = [sys.executable, str(jobs / "promote.py"), "-v", "--name", name, "--eval-data", color_data,
                   "--candidate", f"models:/{name}-staging@challenger"]  # fmt: skip
        run("promote as tagging (refused by the server)", "tagging", promote, 2)
        run("promote", "promotion", promote, 0)
        run("history", "tagging", [sys.executable, str(jobs / "promote.py"), "--history", name], 0)
        boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=f"{BUCKET}-auth")
        storage.reset_clients()
        uris = sorted(upload_images(f"{BUCKET}-auth", "in", 8, with_bad=False))
        output = f"s3://{BUCKET}-auth/tags"
        driver = [sys.executable, "-m", "tests.chaos.driver", "--ray-address", chaos_ray,
                  "--worker-env", f"AWS_ENDPOINT_URL={fault_proxy.endpoint}"]  # fmt: skip
        run("tag", "tagging", [*driver, "--", "-v", "--model", f"models:/{name}@champion", "--input",
            f"s3://{BUCKET}-auth/in/", "--output", output, "--shard-size", "4", "--actors", "1",
            "--threads-per-actor", "1"], 0)  # fmt: skip

        assert (
            "refused this operation for user 'mlc-tagging'"
            in procs["promote as tagging (refused by the server)"].stderr
        )
        leaks: list[str] = []
        for label, proc in procs.items():
            leaks += [f"{label} stdout/stderr" for n in needles if n in proc.stdout + proc.stderr]
        with identity("admin", canary["admin"]):
            client = MlflowClient(server.uri)
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
            assert runs and any(r.data.tags for r in runs)
            for r in runs:
                text = repr(r.data.params) + repr(r.data.tags) + repr(list(r.data.metrics))
                leaks += [f"mlflow run {r.info.run_id} params/tags" for n in needles if n in text]
            for model in (name, f"{name}-staging"):
                for mv in client.search_model_versions(f"name='{model}'"):
                    leaks += [f"{model} v{mv.version} tags" for n in needles if n in repr(mv.tags)]
                    assert mv.tags.get("promotion.by") in (None, "mlc-promotion")  # who, never how
        # the server's log, its metadata DB, the auth DB (hashes only), artifacts, bundles, caches
        leaks += _grep(tmp_path, needles)
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        leaks += _grep(session / "logs", needles)
        table = read_table(output)
        assert sorted(table.column("image_uri").to_pylist()) == uris
        leaks += ["tag table rows" for n in needles if n in repr(table.to_pylist())]
        for info in storage.iter_objects(output):
            leaks += [info.uri for n in needles if n.encode() in storage.read_bytes(info.uri)]
        assert leaks == [], leaks
    finally:
        server.server.stop()
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
