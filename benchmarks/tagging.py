"""Bulk tagging throughput: in-process ceiling vs seed-style baseline vs jobs/tag.py end to end.

    python benchmarks/tagging.py --images 2000 [--scale 4] [--work-dir /tmp/mlc-bench] [--json out.json]

Everything runs on this machine: photo-like 500x375 JPEGs (gradients + noise + shapes, quality 90)
are generated once, served by a moto S3 server started as its own process, and tagged by a
MobileNetV2 at 224 px with *random weights* (speed does not depend on the weights). Measured:

(a) ceiling   decode (draft) + preprocess + onnxruntime fp32, one process, all cores, bytes in memory
(b) baseline  seed 002's loop: boto3 reads one by one, PIL + torchvision transforms, eager PyTorch, batch 32
(c) tag.py    jobs/tag.py S3 -> Parquet on S3, onnxruntime fp32 (the rule's parallelism, and 1 actor x 2
              threads) / int8 (+ ncnn when exported), and
              fp32 again at ``--scale`` x the images (cost per image, driver peak RSS)
(d) listing   100,000 keys listed + sharded: the driver's peak Python memory vs 25,000 keys
profile       each stage alone in-process (decode / onnxruntime, 1 thread and all cores), and the
              Ray Data stats every (c) run leaves under <output>/_runs/<run>/stats/ (copied to
              --work-dir as ray-data-stats-<run>.txt)

Results go to stdout as a table and, with --json, to a file (BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_LABELS = 20
IMAGE_SIZE = 224
BUCKET = "bench"


# --------------------------------------------------------------------------------------------- data


def photo_like_jpeg(i: int, size: tuple[int, int] = (500, 375)) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = size
    gx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    gy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = a * (1 - gx) * (1 - gy) + b * gx * gy + rng.uniform(0, 80, 3) * gy
    arr = np.clip(arr + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(work: Path, n: int) -> list[bytes]:
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(photo_like_jpeg(i))
        out.append(path.read_bytes())
    return out


# --------------------------------------------------------------------------------------------- S3 server


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return proc, endpoint


def upload(prefix: str, images: list[bytes], copies: int = 1) -> None:
    from mlc_ray import storage

    client = storage.s3_client()
    jobs = [(f"{prefix}/{c:02d}-{i:06d}.jpg", data) for c in range(copies) for i, data in enumerate(images)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), jobs))


# --------------------------------------------------------------------------------------------- model


def make_bundle(work: Path, images: list[bytes]) -> tuple[str, list[str]]:
    """MobileNetV2 (random weights) bundle: model.onnx, model.int8.onnx (QDQ), ncnn if exportable."""
    import torch

    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval
    from mlc_ray.models import ImageTagger, create_model

    root = work / "bundle-mobilenet_v2"
    notes: list[str] = []
    if (root / "model.onnx").exists():
        return str(root), json.loads((root / "notes.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pre = PreprocessConfig(image_size=IMAGE_SIZE)
    tagger = ImageTagger(create_model("mobilenet_v2", NUM_LABELS), pre).eval()
    torch.save(tagger.state_dict(), root / "model.pt")
    from mlc_ray.export.onnx import export_onnx

    export_onnx(tagger, str(root / "model.onnx"), image_size=IMAGE_SIZE)
    labels = [f"label{i:02d}" for i in range(NUM_LABELS)]
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "preprocess.json").write_text(pre.to_json())
    Thresholds(labels=labels, values=[0.5] * NUM_LABELS, method="fixed").save(str(root / "thresholds.json"))

    # int8: the project's quantizer (onnxruntime static QDQ), calibrated on 64 of the benchmark images
    from mlc_ray.export.quantize import quantize_int8

    calib = np.stack(
        [preprocess_eval(decode_image(b, target_size=IMAGE_SIZE).array, pre) for b in images[:64]]
    )
    quantize_int8(str(root / "model.onnx"), str(root / "model.int8.onnx"), calib)
    try:
        from mlc_ray.export import ncnn as ncnn_export

        ncnn_export.convert_to_ncnn(str(root / "model.onnx"), str(root))
    except Exception as exc:  # the ncnn exporter is optional here: say so in the results
        notes.append(f"ncnn not measured: {type(exc).__name__}: {exc}")
    (root / "notes.json").write_text(json.dumps(notes))
    return str(root), notes


# --------------------------------------------------------------------------------------------- (a) (b)


def ceiling(bundle: str, images: list[bytes], batch: int = 32) -> float:
    """(a) decode+preprocess on a thread pool + one onnxruntime session with all cores, no Ray."""
    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval
    from mlc_ray.tagging.backends import OnnxBackend

    cpus = os.cpu_count() or 1
    pre = PreprocessConfig.from_json(Path(bundle, "preprocess.json").read_text())
    backend = OnnxBackend(str(Path(bundle, "model.onnx")), threads=cpus)

    def prep(data: bytes) -> np.ndarray:
        return preprocess_eval(decode_image(data, target_size=pre.image_size).array, pre)

    backend.run(np.stack([prep(images[0])] * batch))  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(cpus) as pool:
        for start in range(0, len(images), batch):
            backend.run(np.stack(list(pool.map(prep, images[start : start + batch]))))
    return len(images) / (time.perf_counter() - t0)


def components(bundle: str, images: list[bytes], batch: int = 32, n: int = 512) -> dict:
    """The profile's in-process half: images/s of each stage alone, on 1 thread and on all cores.

    decode = robust decoder (draft JPEG decode) + resize + normalise, per image; infer =
    onnxruntime fp32 on a preprocessed batch. One actor with one thread does both in turn, so its
    best possible rate is ``1 / (1/decode_1t + 1/infer_1t)`` (``one_thread_both``).
    """
    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval
    from mlc_ray.tagging.backends import OnnxBackend

    cpus = os.cpu_count() or 1
    pre = PreprocessConfig.from_json(Path(bundle, "preprocess.json").read_text())
    sample = images[:n]

    def prep(data: bytes) -> np.ndarray:
        return preprocess_eval(decode_image(data, target_size=pre.image_size).array, pre)

    out: dict = {}
    for threads in sorted({1, cpus}):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(prep, sample))
        out[f"decode_{threads}t"] = round(len(sample) / (time.perf_counter() - t0), 2)
        backend = OnnxBackend(str(Path(bundle, "model.onnx")), threads=threads)
        x = np.stack(arrays[:batch])
        backend.run(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(len(sample) // batch):
            backend.run(x)
        out[f"infer_{threads}t"] = round((len(sample) // batch) * batch / (time.perf_counter() - t0), 2)
    out["one_thread_both"] = round(1 / (1 / out["decode_1t"] + 1 / out["infer_1t"]), 2)
    return out


def ray_data_stats(output: str) -> str:
    """The job's own profile: the Ray Data stats files it left under ``<output>/_runs/*/stats/``."""
    from mlc_ray import storage

    texts = [
        f"## {o.uri}\n{storage.read_text(o.uri)}"
        for o in storage.iter_objects(storage.join(output, "_runs"))
        if "/stats/" in o.uri
    ]
    return "\n".join(texts)


def seed_baseline(bundle: str, keys: list[str], batch: int = 32) -> float:
    """(b) seed 002: sequential boto3 reads, PIL + torchvision transforms, eager PyTorch in batches."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from mlc_ray import storage
    from mlc_ray.models import create_model

    model = create_model("mobilenet_v2", NUM_LABELS).eval()
    tf = transforms.Compose(
        [
            transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    client = storage.s3_client()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(keys), batch):
            tensors = []
            for key in keys[start : start + batch]:
                data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                tensors.append(tf(Image.open(io.BytesIO(data)).convert("RGB")))
            torch.sigmoid(model(torch.stack(tensors)))
    return len(keys) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- (c)


def run_tag_job(bundle: str, prefix: str, output: str, extra: list[str]) -> dict:
    """jobs/tag.py as a user runs it; wall time, the job's own images/s, the driver's peak RSS."""
    import psutil

    cmd = [sys.executable, str(REPO / "jobs" / "tag.py"), "--model", bundle, "--input", prefix]
    cmd += ["--output", output, "--max-error-rate", "0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def watch() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    rate = next((float(line.split()[-1]) for line in out.splitlines() if line.startswith("images/s")), 0.0)
    images = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("images ")), 0)
    return {
        "command": " ".join(cmd),
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": rate,
        "ms_per_image": round(1000 / rate, 3) if rate else None,
        "driver_peak_rss_mb": round(peak[0] / 2**20, 1),
    }


# --------------------------------------------------------------------------------------------- (d)


def listing_memory(work: Path, n: int) -> dict:
    """Peak Python memory of listing + sharding ``n`` local keys (shard descriptors to disk)."""
    from mlc_ray.tagging.inputs import ShardStore, iter_input_keys, iter_shards

    folder = work / f"keys-{n}"
    if not (folder / "done").exists():
        for i in range(n):
            sub = folder / f"{i // 1000:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:07d}.jpg").touch()
        (folder / "done").touch()
    store = ShardStore(str(work / f"state-{n}"))
    tracemalloc.start()
    t0 = time.perf_counter()
    shards = 0
    for shard in iter_shards(iter_input_keys(str(folder)), 10_000):
        store.put(shard)
        shards += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "keys": n,
        "shards": shards,
        "peak_mb": round(peak / 2**20, 2),
        "s": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--scale", type=int, default=4, help="the cost-per-image run uses this many x the images")
    p.add_argument("--work-dir", default="/tmp/mlc-ray-bench")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of: ceiling,baseline,tag,fp32_1x2,int8,ncnn,scale,listing,profile",
    )
    p.add_argument(
        "--tag-args", default="", help="extra jobs/tag.py flags for every (c) run, e.g. '--actors 2'"
    )
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    tag_args = shlex.split(args.tag_args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"images": args.images, "cpus": os.cpu_count(), "tag_args": tag_args, "notes": []}

    images = make_images(work, args.images)
    moto, endpoint = start_moto(work)
    try:
        from mlc_ray import storage

        storage.reset_clients()
        storage.s3_client().create_bucket(Bucket=BUCKET)
        upload("in", images)
        bundle, notes = make_bundle(work, images)
        results["notes"] += notes + ["MobileNetV2 at 224 with random weights (speed only)"]
        keys = [f"in/00-{i:06d}.jpg" for i in range(len(images))]
        if "ceiling" not in skip:
            results["a_ceiling_images_per_s"] = round(ceiling(bundle, images), 2)
        if "profile" not in skip:
            results["profile_components_images_per_s"] = components(bundle, images)
        if "baseline" not in skip:
            results["b_seed_baseline_images_per_s"] = round(seed_baseline(bundle, keys), 2)
        prefix = f"s3://{BUCKET}/in/"
        runs = [
            ("fp32", ["--precision", "fp32"]),
            # the parallelism rule's alternative on a small machine: one actor, two intra-op threads
            ("fp32_1x2", ["--precision", "fp32", "--actors", "1", "--threads-per-actor", "2"]),
            ("int8", ["--precision", "int8"]),
            ("ncnn", ["--backend", "ncnn"]),
        ]
        for name, extra in runs:
            if name in skip or (name.startswith("fp32") and "tag" in skip):
                continue
            if name == "ncnn" and not Path(bundle, "model.ncnn.param").exists():
                continue
            output = f"s3://{BUCKET}/out-{name}-{time.time_ns()}"
            results[f"c_tag_{name}"] = run_tag_job(bundle, prefix, output, extra + tag_args)
            if "profile" not in skip:
                stats_file = work / f"ray-data-stats-{name}.txt"
                stats_file.write_text(ray_data_stats(output))
                results[f"c_tag_{name}"]["ray_data_stats"] = str(stats_file)
        if "scale" not in skip:
            upload("in4x", images, copies=args.scale)
            results["c_tag_fp32_scaled"] = run_tag_job(
                bundle,
                f"s3://{BUCKET}/in4x/",
                f"s3://{BUCKET}/out-4x-{time.time_ns()}",
                ["--precision", "fp32", *tag_args],
            )
        if "listing" not in skip:
            results["d_listing"] = [listing_memory(work, 25_000), listing_memory(work, 100_000)]
    finally:
        moto.terminate()
        moto.wait(timeout=10)

    a, b = results.get("a_ceiling_images_per_s"), results.get("b_seed_baseline_images_per_s")
    fp32 = results.get("c_tag_fp32", {}).get("images_per_s")
    ratios = {}
    if fp32 and a:
        ratios["fp32_vs_ceiling"] = round(fp32 / a, 3)
    if fp32 and b:
        ratios["fp32_vs_baseline"] = round(fp32 / b, 3)
    if fp32 and results.get("c_tag_fp32_1x2"):
        ratios["fp32_1x2_vs_fp32"] = round(results["c_tag_fp32_1x2"]["images_per_s"] / fp32, 3)
        if a:
            ratios["fp32_1x2_vs_ceiling"] = round(results["c_tag_fp32_1x2"]["images_per_s"] / a, 3)
    if fp32 and results.get("c_tag_int8"):
        ratios["int8_vs_fp32"] = round(results["c_tag_int8"]["images_per_s"] / fp32, 3)
    if fp32 and results.get("c_tag_fp32_scaled"):
        big = results["c_tag_fp32_scaled"]
        ratios["scaled_cost_per_image_vs_1x"] = round(fp32 / big["images_per_s"], 3)
        ratios["scaled_driver_rss_vs_1x"] = round(
            big["driver_peak_rss_mb"] / results["c_tag_fp32"]["driver_peak_rss_mb"], 3
        )
    results["ratios"] = ratios
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
