"""Helpers shared by test modules: import them from here, never from another test module.

Fixtures live in the conftest files; this module holds plain functions, classes and constants:

* processes and ports: ``REPO_ROOT``, ``free_port``, ``wait_for_port``, ``load_job``, ``predictor_pids``;
* tagging inputs: ``make_bundle`` (a tiny random ONNX bundle), ``photo_jpeg``, ``upload_images``, ``read_table``;
* the colour registry models: ``COLOR_LABELS``, ``GOOD``/``MEDIOCRE``/``BAD`` weights, ``build_color_bundle``,
  ``make_color_data``, ``onnx_reference``, ``MlflowServer``, ``AuthServer``, ``identity``;
* export: ``randomise``, ``write_bundle``, ``color_images``, ``train_color_bundle``;
* manifests: ``write_formats`` (every format of one small data set) and ``check_same_data``;
* training: ``ray_train_in_process`` (Ray Train's local mode: the training loop in the test process).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the heavy imports are local to the helpers that need them
    import pyarrow as pa
    import torch

    from mlc_ray.data.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ processes and ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def load_job(name: str) -> ModuleType:
    """``jobs/<name>.py`` as a fresh module, so a test can call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACTOR_TITLE = "MapBatches(Predictor)"


def predictor_pids() -> set[int]:
    """Predictor actor processes of *this* process's Ray clusters (its descendants): another test
    process on the machine (``make test`` runs shards side by side) has Predictors of its own."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(ACTOR_TITLE in part for part in proc.cmdline()):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


# ------------------------------------------------------------------------------ tagging inputs

TAG_LABELS = ["a", "b", "c", "d", "e", "f", "g"]
TAG_IMAGE_SIZE = 32


def make_bundle(root: Path) -> str:
    """A complete, tiny model bundle: model.onnx (uint8 NHWC -> probabilities) + json side files."""
    import torch

    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.models import ImageTagger, create_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pre = PreprocessConfig(image_size=TAG_IMAGE_SIZE)
    tagger = ImageTagger(create_model("mobilenet_v1", len(TAG_LABELS), width=0.25), pre).eval()
    from mlc_ray.export.onnx import export_onnx

    export_onnx(tagger, str(root / "model.onnx"), image_size=TAG_IMAGE_SIZE)
    (root / "labels.json").write_text(json.dumps(TAG_LABELS))
    (root / "preprocess.json").write_text(pre.to_json())
    Thresholds(labels=TAG_LABELS, values=[0.5] * len(TAG_LABELS), method="fixed").save(
        str(root / "thresholds.json")
    )
    return str(root)


def photo_jpeg(i: int, size: tuple[int, int] = (56, 44)) -> bytes:
    """A noisy gradient JPEG, different for each i."""
    rng = np.random.default_rng(i)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def upload_images(
    bucket: str, prefix: str, n: int, *, start: int = 0, with_bad: bool = True
) -> dict[str, str | None]:
    """Put n objects under s3://bucket/prefix; returns uri -> expected error code (None for good)."""
    from mlc_ray import storage
    from mlc_ray.data.demo import bad_image_samples, good_image_samples

    expected: dict[str, str | None] = {}
    items: list[tuple[str, bytes, str | None]] = []
    if with_bad:
        items += [(f"bad/{s.name}", s.data, s.expected_error) for s in bad_image_samples()]
        items += [(f"odd/{s.name}", s.data, None) for s in good_image_samples()]
    i = start
    while len(items) < n:
        items.append((f"photos/{i:05d}.jpg", photo_jpeg(i), None))
        i += 1
    client = storage.s3_client()
    for key, data, err in items[:n]:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
        expected[f"s3://{bucket}/{prefix}/{key}"] = err
    return expected


def read_table(output: str) -> pa.Table:
    """Every committed file of the table (pyarrow dataset over the dt= partitions)."""
    import pyarrow.dataset as pads

    from mlc_ray import storage

    fs, path = storage.arrow_filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


# ------------------------------------------------------------------------------ the colour registry models

COLOR_LABELS = ["red", "green", "blue"]
COLOR_SIZE = 32
GOOD = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # label c reads channel c: right on every label

MEDIOCRE = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]  # "blue" reads the red channel: chance on "blue"

BAD = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]  # inverted: wrong on every label


class MlflowServer:
    """``mlflow server`` in its own process: sqlite metadata, proxied local artifact root.

    ``app_name="basic-auth"`` runs MLflow's authentication app (its config file and admin come
    from ``env``: MLFLOW_AUTH_CONFIG_PATH, MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD).

    MLflow's server job runner is off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, as in
    mlflow/docker-compose.yml): mlc_ray submits no server jobs, and the runner's seven huey
    consumer processes kept ~0.9 CPU busy while the server sat idle (measured on the 2-CPU machine,
    2026-12-04: 18 CPU-s per 20 s idle with it, 0.05 without; 12.6 against 7.8 CPU-s to start).
    """

    def __init__(self, root: Path, *, app_name: str | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifact_root = root / "artifacts"
        self._log = open(root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.artifact_root),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                *(["--app-name", app_name] if app_name else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
        )
        wait_for_port(self.port, timeout=120, proc=self.proc)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def make_color_data(root: Path, n: int = 48, seed: int = 0) -> str:
    """JPEGs whose labels are their bright channels, a manifest with a val split, labels.txt."""

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        on = rng.random(3) < 0.5
        pixels = np.where(on, 200, 50)[None, None, :] + rng.integers(-20, 21, size=(40, 40, 3))
        name = f"images/{i:03d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name, quality=95)
        labels = "|".join(label for label, flag in zip(COLOR_LABELS, on, strict=True) if flag)
        rows.append({"image": name, "labels": labels, "split": "val" if i % 2 else "train"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "labels.txt").write_text("\n".join(COLOR_LABELS) + "\n")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return str(root / "manifest.csv")


def color_onnx(path: Path, weights: list[list[float]]) -> None:
    """uint8 NHWC images -> sigmoid(8 * W @ (channel means - 127.5) / 127.5) as 'probabilities'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (8.0 * np.asarray(weights, dtype=np.float32).T) / 127.5  # (3 channels, 3 labels)
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "centre"], ["centred"]),
        helper.make_node("MatMul", ["centred", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "color_tagger",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", COLOR_SIZE, COLOR_SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(COLOR_LABELS)])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([127.5], dtype=np.float32), "centre"),
            numpy_helper.from_array(w, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_color_bundle(bundle: Path, weights: list[list[float]], tag: str = "") -> Path:
    """A model bundle (the files export/calibrate write) around a colour ONNX graph."""
    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig

    bundle.mkdir(parents=True, exist_ok=True)
    color_onnx(bundle / "model.onnx", weights)
    (bundle / "labels.json").write_text(json.dumps(COLOR_LABELS))
    preprocess = PreprocessConfig(image_size=COLOR_SIZE)
    (bundle / "preprocess.json").write_text(json.dumps(preprocess.to_dict()))
    Thresholds(
        labels=list(COLOR_LABELS),
        values=[0.5] * len(COLOR_LABELS),
        method="fixed",
        support=[0] * 3,
        fallback_labels=[],
    ).save(str(bundle / "thresholds.json"))
    (bundle / "metrics.json").write_text(json.dumps({"macro_f1": 0.5, "note": tag}))
    (bundle / "model.json").write_text(json.dumps({"arch": "color-test", "num_labels": 3}))
    return bundle


def onnx_reference(bundle: Path, data: list[bytes]) -> np.ndarray:
    """The plain ONNX path: decode, preprocess, onnxruntime; independent of the pyfunc wrapper."""
    import onnxruntime as ort

    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval

    cfg = PreprocessConfig.from_dict(json.loads((bundle / "preprocess.json").read_text()))
    batch = np.stack([preprocess_eval(decode_image(d).array, cfg) for d in data])
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": batch})[0]


class AuthServer:
    """``mlflow server --app-name basic-auth`` with its own auth DB (a temp ini) and a random admin."""

    def __init__(self, root: Path, admin_password: str | None = None) -> None:
        self.admin = ("admin", admin_password or f"admin-{secrets.token_hex(12)}")
        ini = root / "basic_auth.ini"
        # The same settings as mlflow/basic_auth.ini, with the auth DB in the test's directory, and
        # MLflow's credential cache on: without it every request checks a scrypt hash (~0.13 s of
        # CPU on these machines), which made this server the slowest part of the suite. Permissions
        # are still checked on every request; with one server worker a password change over the
        # API clears the cached entry at once (MLflow's basic_auth.ini describes the cache).
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"
        )
        self.server = MlflowServer(
            root,
            app_name="basic-auth",
            env={
                "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                "MLFLOW_AUTH_ADMIN_USERNAME": self.admin[0],
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin[1],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            },
        )
        self.uri = self.server.uri
        self.log_path = root / "server.log"


@contextmanager
def identity(user: str | None, password: str | None) -> Iterator[None]:
    """Act as ``user`` (None: no credentials) in this process, as a job would from its environment."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------ export

EXPORT_SIZE = 64
EXPORT_LABELS = ["cat", "dog", "red", "text"]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make an untrained tagger behave like a trained one: image-dependent features, spread logits.

    A fresh network in eval mode gives (nearly) the same output for every image (BatchNorm's running
    statistics are 0/1 and the head is zero-initialised), which would make parity prove nothing. So:
    re-estimate BatchNorm statistics on synthetic images, then scale a random head so each label's
    logits have std ~2 across images and are centred near 0.
    """
    import torch

    from mlc_ray.export.parity import synthetic_images

    gen = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(synthetic_images(32, EXPORT_SIZE, seed=seed + 100))
    head = next(
        m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(EXPORT_LABELS)
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the batches below
        model.train()
        for chunk in images.split(16):
            model(chunk)
        model.eval()
        head.weight.normal_(0.0, 1.0 / head.in_features**0.5, generator=gen)
        head.bias.zero_()
        logits = model(images)
        scale = 2.0 / logits.std(dim=0).clamp(min=1e-6)
        head.weight.mul_(scale[:, None])
        head.bias.copy_(
            -logits.mean(dim=0) * scale + torch.empty(len(EXPORT_LABELS)).uniform_(-0.5, 0.5, generator=gen)
        )
    return model


def write_bundle(folder: Path, arch: str, normalization: str = "imagenet") -> tuple[Path, object]:
    """A training-like bundle: model.pt, model.json, labels.json, preprocess.json."""
    import torch

    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.models import build_tagger, model_spec

    folder.mkdir(parents=True, exist_ok=True)
    pre = PreprocessConfig(image_size=EXPORT_SIZE, normalization=normalization)
    spec = model_spec(arch, len(EXPORT_LABELS))
    torch.manual_seed(0)
    model = randomise(build_tagger(spec, pre))
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(spec))
    (folder / "labels.json").write_text(json.dumps(EXPORT_LABELS))
    (folder / "preprocess.json").write_text(pre.to_json())
    return folder, model


def color_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32, 3) noisy images whose labels are their bright channels, and (n, 3) targets."""
    rng = np.random.default_rng(seed)
    on = rng.random((n, 3)) < 0.5
    pixels = np.where(on, 190, 60)[:, None, None, :] + rng.normal(0, 25, (n, COLOR_SIZE, COLOR_SIZE, 3))
    return pixels.clip(0, 255).astype(np.uint8), on.astype(np.uint8)


def train_color_bundle(folder, *, steps: int = 80, seed: int = 0):
    """A bundle (model.pt, model.json, labels.json, preprocess.json, thresholds.json) of MobileNet V1
    x0.25 at 32 px trained with AdamW on ``color_images``: val macro-F1 ~1 in a few seconds on a CPU."""

    import torch

    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.models import build_tagger, model_spec

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pre = PreprocessConfig(image_size=COLOR_SIZE)
    spec = model_spec("mobilenet_v1", len(COLOR_LABELS), width=0.25)
    tagger = build_tagger(spec, pre)
    images, targets = color_images(512, seed=seed + 1)
    opt = torch.optim.AdamW(tagger.parameters(), lr=5e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    tagger.train()
    for _ in range(steps):
        idx = rng.choice(len(images), 32, replace=False)
        loss = loss_fn(tagger(torch.from_numpy(images[idx])), torch.from_numpy(targets[idx]).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tagger.eval()
    torch.save(tagger.state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(spec))
    (folder / "labels.json").write_text(json.dumps(COLOR_LABELS))
    (folder / "preprocess.json").write_text(pre.to_json())
    Thresholds(COLOR_LABELS, [0.5] * 3, "fixed").save(str(folder / "thresholds.json"))
    return folder, tagger


# ------------------------------------------------------------------------------ manifests

# vocabulary order deliberately not sorted: labels.txt must win over the sorted set
VOCAB = ["dog", "cat", "bird"]

ROWS = [  # (relative image path, labels, split)
    ("images/a.jpg", ["cat", "dog"], "train"),
    ("images/b.jpg", ["dog"], "train"),
    ("images/c.jpg", [], "train"),
    ("images/sub/d.jpg", ["bird", "cat"], "val"),
    ("images/e.jpg", ["bird"], "val"),
    ("images/f.jpg", ["cat"], "test"),
]

EXPECTED_MULTI_HOT = np.array(
    [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1], [0, 1, 0]],
    dtype=np.uint8,
)

# single-label twin for the folder-per-class layout (seed 004): sorted folder order
FOLDER_ROWS = [("classes/cat/1.jpg", "cat"), ("classes/cat/2.png", "cat"), ("classes/dog/3.jpg", "dog")]

FORMATS = ["csv", "jsonl", "parquet", "seed003", "seed002"]


def tiny_jpeg() -> bytes:

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def write_formats(root: str) -> dict[str, str]:
    """Write ROWS as csv/jsonl/parquet/seed003/seed002 (+ labels.txt) and FOLDER_ROWS as a folder
    tree with its csv twin. Returns {format name: manifest URI}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlc_ray import storage

    j = storage.join
    jpeg = tiny_jpeg()
    for path, _, _ in ROWS:
        storage.write_bytes(j(root, path), jpeg)
    storage.write_text(j(root, "labels.txt"), "\n".join(VOCAB) + "\n")
    csv_lines = ["image,labels,split"] + [f"{p},{'|'.join(ls)},{s}" for p, ls, s in ROWS]
    storage.write_text(j(root, "manifest.csv"), "\n".join(csv_lines) + "\n")
    jsonl = [json.dumps({"image": p, "labels": ls, "split": s}) for p, ls, s in ROWS]
    storage.write_text(j(root, "manifest.jsonl"), "\n".join(jsonl) + "\n")
    table = pa.table(
        {
            "image": [p for p, _, _ in ROWS],
            "labels": pa.array([ls for _, ls, _ in ROWS], pa.list_(pa.string())),
            "split": [s for _, _, s in ROWS],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(j(root, "manifest.parquet"), buf.getvalue())
    # seed 003: "NAME COUNT" lines + a 0/1 matrix in labels.txt order (no split column in this format)
    storage.write_text(j(root, "train_image_list.txt"), "".join(f"{p} {len(ls)}\n" for p, ls, _ in ROWS))
    matrix = "".join(" ".join("1" if v in ls else "0" for v in VOCAB) + "\n" for _, ls, _ in ROWS)
    storage.write_text(j(root, "train_image_label.txt"), matrix)
    # seed 002: NUS-WIDE JSON; its own "labels" list fixes the order
    nus = {"samples": [{"image_name": p, "image_labels": ls} for p, ls, _ in ROWS], "labels": VOCAB}
    storage.write_text(j(root, "nus_wide.json"), json.dumps(nus))
    # seed 004: folder per class, in a root of its own (no labels.txt there: sorted folder names)
    folder_root = j(root, "folders")
    for path, _ in FOLDER_ROWS:
        storage.write_bytes(j(folder_root, path), jpeg)
    storage.write_text(j(folder_root, "classes", "README.txt"), "not an image, not a label\n")
    twin = ["image,labels"] + [f"{p},{label}" for p, label in FOLDER_ROWS]
    storage.write_text(j(folder_root, "twin.csv"), "\n".join(twin) + "\n")
    return {
        "csv": j(root, "manifest.csv"),
        "jsonl": j(root, "manifest.jsonl"),
        "parquet": j(root, "manifest.parquet"),
        "seed003": j(root, "train_image_list.txt"),
        "seed002": j(root, "nus_wide.json"),
        "folder": j(folder_root, "classes"),
        "folder_twin": j(folder_root, "twin.csv"),
    }


def check_same_data(manifest: Manifest, root: str, *, with_splits: bool) -> None:
    from mlc_ray import storage

    assert manifest.images == [storage.join(root, p) for p, _, _ in ROWS]
    assert manifest.vocabulary == VOCAB
    assert manifest.labels == [[v for v in VOCAB if v in ls] for _, ls, _ in ROWS]  # vocabulary order
    np.testing.assert_array_equal(manifest.multi_hot(), EXPECTED_MULTI_HOT)
    assert manifest.multi_hot().dtype == np.uint8
    assert manifest.splits == ([s for _, _, s in ROWS] if with_splits else [None] * len(ROWS))


# ------------------------------------------------------------------------------ training


@dataclass
class LocalTrainRuns:
    """What ``ray_train_in_process`` saw: one entry per ``TorchTrainer`` built (a check that the job
    went through it), and a copy of each checkpoint the loop reported, in report order (kept until
    the ``with`` block ends: local mode writes nothing under ``storage_path/run_name``)."""

    starts: list[int] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


@contextmanager
def ray_train_in_process() -> Iterator[LocalTrainRuns]:
    """``TorchTrainer`` in Ray Train's local mode while inside (``ScalingConfig(num_workers=0)``): the
    worker loop runs in this process, with rank 0 of a world of 1, and none of the ~6 Ray Train actor
    processes a run starts (~25-30 s on 2 CPUs). Config resolution, model build, the loop's training
    and validation, calibration and the bundle run as in a real job; what local mode does not do is
    Ray Train's own part: no worker processes, no storage under ``storage_path/run_name`` (so no
    resume from an earlier run's checkpoint: ``get_checkpoint()`` starts as None), no failure
    recovery. Real-worker training is tested in test_train.py, test_train_defaults.py (mobilenet_v1
    and the resume test) and the chaos checkpoint test.

    Local mode keeps a reported checkpoint as the object the loop handed over, and the loop deletes
    its directory once ``ray.train.report`` returns, so each reported checkpoint is copied first
    (what Ray Train's storage does); ``LocalTrainRuns.checkpoints`` lists the copies."""
    import ray.train
    import ray.train.torch

    runs = LocalTrainRuns()
    real_trainer, real_report = ray.train.torch.TorchTrainer, ray.train.report
    kept = Path(tempfile.mkdtemp(prefix="mlc_ray-local-ckpt-"))

    class LocalTorchTrainer(real_trainer):
        def __init__(self, *args, scaling_config=None, **kwargs):
            runs.starts.append(1)
            super().__init__(*args, scaling_config=ray.train.ScalingConfig(num_workers=0), **kwargs)

    def report(metrics, checkpoint=None, **kwargs):
        if checkpoint is not None:
            with checkpoint.as_directory() as src:
                dst = kept / str(len(runs.checkpoints))
                shutil.copytree(src, dst)
            runs.checkpoints.append(dst)
            checkpoint = ray.train.Checkpoint.from_directory(str(dst))
        return real_report(metrics, checkpoint=checkpoint, **kwargs)

    # Ray Data now runs its executor in this process, and Ray's console handlers write to the
    # sys.stderr of when they were made (another test's closed capture): point them at this one's
    handlers = [
        h
        for name, logger in logging.root.manager.loggerDict.items()
        if name.split(".")[0] == "ray" and isinstance(logger, logging.Logger)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    streams = [h.stream for h in handlers]
    for handler in handlers:
        handler.stream = sys.stderr  # not setStream: that flushes the closed one first
    ray.train.torch.TorchTrainer, ray.train.report = LocalTorchTrainer, report
    try:
        yield runs
    finally:
        ray.train.torch.TorchTrainer, ray.train.report = real_trainer, real_report
        for handler, stream in zip(handlers, streams, strict=True):
            handler.stream = stream
        shutil.rmtree(kept, ignore_errors=True)
