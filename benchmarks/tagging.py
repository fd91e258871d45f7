"""Bulk tagging cost: ceilings, sessions alone, and jobs/tag.py's steady state and fixed cost.

    python benchmarks/tagging.py [--images 1000] [--repeats 3] [--scale 4] [--work-dir DIR] [--json out.json]
    python benchmarks/tagging.py --quick          # smoke run: 200 images, 1 repeat, no scale run

Everything runs on this machine: photo-like 500x375 JPEGs (gradients + noise + shapes, quality 90)
generated once, served by a moto S3 server started as its own process, tagged by a MobileNetV2 at
224 px with random weights (speed does not depend on the weights; int8 is the project's quantizer
calibrated on 64 of the images). Configurations, run interleaved (the order rotates every repeat):

mem       in-memory ceiling: one process per core, each decodes its share of the image bytes with the
          project's one image path (``prepare_image``, decode policy from preprocess.json) and runs
          onnxruntime fp32 with 1 thread, batch 32; no Ray
s3        S3 ceiling: the same, but each process first GETs each batch's keys from the same S3 server
          (boto3, 8 threads)
sessions  onnxruntime fp32 and int8 sessions alone (1 thread, a preprocessed batch of 32), one process:
          ``OnnxBackend.run`` as the job runs it (one image per call, ``mlc_ray/onnx_run.py``) and,
          alternating with it, the same batch in one session call
job_fp32  ``jobs/tag.py --precision fp32`` S3 -> Parquet on S3, local embedded Ray (as a user runs it)
job_int8  the same with ``--precision int8``
job_noop  the fp32 job's command again with ``--incremental`` (nothing new to tag)
ray_floor ``benchmarks/ray_floor.py``: the same local Ray and dataset shape as the job (chunk blocks ->
          a 0.5-CPU task -> the job's actor pool), one row per key, no reads or inference, then
          shutdown: what Ray itself costs, the floor under the job's fixed cost
scale     (once, after the repeats) job_fp32 at ``--scale`` x the images: cost per image and driver RSS

CPU is counted over the benchmark's own process trees, not the machine (other jobs share it): each
ceiling process reports its own ``getrusage`` CPU; the job's CPU is the sum over its driver and every
descendant (Ray's gcs/raylet/workers of that Ray session), sampled every 0.2 s with psutil. The S3
server is not in those trees; its own CPU and the whole-machine ``/proc/stat`` busy time are
recorded beside every figure for reference only.

For the job: the steady-state rate and CPU per image between the first and the last of its own
progress lines (``--progress-every 1``; log timestamps in ms), and its fixed cost = wall - images /
steady rate, split into parts from the run summary's ``timings_s`` when the job writes them, else
from the timestamps of the log lines it already writes. Every figure: median and spread
((max - min) / median) over the repeats; a ratio is claimed only when its spread is under 10 %.
The markdown tables at the end go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_LABELS = 20
IMAGE_SIZE = 224
BUCKET = "bench"
BATCH = 32
SAMPLE_S = 0.2
RATIO_SPREAD_MAX = 0.10


# --------------------------------------------------------------------------------------------- machine


def cpu_info() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {
        "model": fields.get("Model name", "?").strip(),
        "cpus": os.cpu_count(),
        "key_flags": [f for f in wanted if f in flags],
        "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni")),
        "flags": " ".join(flags),
    }


def machine_busy() -> float:
    """Whole-machine busy CPU-seconds from /proc/stat (everything running, not only this benchmark)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


class Reference:
    """What the benchmark's own trees do not hold, for reference: the S3 server and the whole machine."""

    def __init__(self, s3_pid: int) -> None:
        self.s3_pid = s3_pid
        self.t0, self.s3_0, self.busy_0 = time.time(), proc_cpu(s3_pid), machine_busy()

    def stop(self) -> dict:
        return {
            "s3_server_cpu_s": round(proc_cpu(self.s3_pid) - self.s3_0, 3),
            "machine_busy_cpu_s": round(machine_busy() - self.busy_0, 3),
            "interval_s": round(time.time() - self.t0, 3),
        }


class TreeMeter(threading.Thread):
    """CPU-seconds of a process and all its descendants, sampled every SAMPLE_S (a process's last
    value stays counted after it exits; at most SAMPLE_S of each exiting process is missed)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.last: dict[tuple[int, float], float] = {}
        self.names: dict[tuple[int, float], str] = {}
        self.series: list[tuple[float, float]] = []  # (epoch, tree CPU-s so far)
        self.peak_rss = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            self.peak_rss = max(self.peak_rss, root.memory_info().rss)
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    self.last[key] = t.user + t.system
                    if key not in self.names:
                        self.names[key] = p.name()
            except psutil.Error:
                continue
        self.series.append((time.time(), sum(self.last.values())))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_at(self, when: float) -> float:
        if not self.series:
            return 0.0
        ts = np.array([t for t, _ in self.series])
        cs = np.array([c for _, c in self.series])
        return float(np.interp(when, ts, cs))

    @property
    def total(self) -> float:
        return sum(self.last.values())


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


def make_images(work: Path, n: int) -> list[Path]:
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            path.write_bytes(photo_like_jpeg(i))
    return paths


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return proc, endpoint


def upload(prefix: str, paths: list[Path], copies: int = 1) -> list[str]:
    from mlc_ray import storage

    client = storage.s3_client()
    jobs = [(f"{prefix}/{c:02d}-{p.name}", p) for c in range(copies) for p in paths]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1].read_bytes()), jobs))
    return [k for k, _ in jobs]


def make_bundle(work: Path, paths: list[Path]) -> str:
    """MobileNetV2 (random weights) bundle: model.onnx and model.int8.onnx (the project's quantizer)."""
    root = work / "bundle-mobilenet_v2"
    if (root / "model.int8.onnx").exists():
        return str(root)
    import torch

    from mlc_ray.calibrate import Thresholds
    from mlc_ray.data.images import PreprocessConfig, prepare_image
    from mlc_ray.export.onnx import export_onnx
    from mlc_ray.export.quantize import quantize_int8
    from mlc_ray.models import ImageTagger, create_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pre = PreprocessConfig(image_size=IMAGE_SIZE)
    tagger = ImageTagger(create_model("mobilenet_v2", NUM_LABELS), pre).eval()
    export_onnx(tagger, str(root / "model.onnx"), image_size=IMAGE_SIZE)
    labels = [f"label{i:02d}" for i in range(NUM_LABELS)]
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "preprocess.json").write_text(pre.to_json())
    Thresholds(labels=labels, values=[0.5] * NUM_LABELS, method="fixed").save(str(root / "thresholds.json"))
    calib = np.stack([prepare_image(p.read_bytes(), pre).pixels for p in paths[:64]])
    quantize_int8(str(root / "model.onnx"), str(root / "model.int8.onnx"), calib)
    return str(root)


# --------------------------------------------------------------------------------------------- ceilings


def _ceiling_worker(
    kind: str, bundle: str, items: list[str], endpoint: str, ready: mp.Barrier, out: mp.Queue
) -> None:
    """One process of a ceiling: everything loaded before the barrier, then timed work only."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from mlc_ray.data.images import PreprocessConfig, prepare_image
    from mlc_ray.tagging.backends import OnnxBackend

    pre = PreprocessConfig.from_json(Path(bundle, "preprocess.json").read_text())
    backend = OnnxBackend(str(Path(bundle, "model.onnx")), threads=1)
    if kind == "mem":
        blobs = [Path(p).read_bytes() for p in items]
        client = pool = None
    else:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        pool = ThreadPoolExecutor(8)
    first = prepare_image(Path(bundle).parent.joinpath("images", "000000.jpg").read_bytes(), pre)
    backend.run(np.stack([first.pixels] * BATCH))  # warm-up
    ready.wait()
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    done = 0
    for start in range(0, len(items), BATCH):
        if kind == "mem":
            data = blobs[start : start + BATCH]
        else:
            data = list(
                pool.map(
                    lambda k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read(),
                    items[start : start + BATCH],
                )
            )
        prepared = [prepare_image(d, pre) for d in data]
        backend.run(np.stack([p.pixels for p in prepared if p.ok]))
        done += len(data)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out.put({"images": done, "t0": t0, "t1": time.time(), "cpu_s": cpu})


def ceiling(kind: str, bundle: str, items: list[str], endpoint: str, s3_pid: int) -> dict:
    ctx = mp.get_context("spawn")
    cores = os.cpu_count() or 1
    ready, out = ctx.Barrier(cores + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_ceiling_worker, args=(kind, bundle, items[i::cores], endpoint, ready, out))
        for i in range(cores)
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    ref = Reference(s3_pid)
    results = [out.get(timeout=600) for _ in procs]
    reference = ref.stop()
    for p in procs:
        p.join()
    images = sum(r["images"] for r in results)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "images": images,
        "images_per_s": images / wall,
        "cpu_ms_per_image": 1000 * cpu / images,
        "wall_s": wall,
        **reference,
        "machine_minus_s3_cpu_ms_per_image": 1000
        * (reference["machine_busy_cpu_s"] - reference["s3_server_cpu_s"])
        / images,
    }


def _sessions_worker(bundle: str, out: mp.Queue, seconds: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from mlc_ray.data.images import PreprocessConfig, prepare_image
    from mlc_ray.tagging.backends import OnnxBackend

    pre = PreprocessConfig.from_json(Path(bundle, "preprocess.json").read_text())
    images = sorted(Path(bundle).parent.joinpath("images").glob("*.jpg"))[:BATCH]
    x = np.stack([prepare_image(p.read_bytes(), pre).pixels for p in images])
    result = {}
    for name in ("fp32", "int8"):
        backend = OnnxBackend(
            str(Path(bundle, "model.onnx" if name == "fp32" else "model.int8.onnx")), threads=1
        )

        def whole_batch(x: np.ndarray, backend: OnnxBackend = backend) -> None:
            """One session call for the whole batch (how the job ran it before ``onnx_run.py``)."""
            backend.session.run([backend.output_name], {backend.input_name: x})

        # as the job runs it (``backend.run``: one image per call) and the whole batch in one call,
        # alternating in slices of a quarter of the time each so that a busy spell hits both
        timed = {name: backend.run, f"{name}_batch_call": whole_batch}
        counts = {k: [0, 0.0, 0.0] for k in timed}
        for run in timed.values():
            run(x)  # warm-up: the session's arena
        for _ in range(4):
            for key, run in timed.items():
                n, t0, c0 = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - t0 < seconds / 4:
                    run(x)
                    n += len(x)
                counts[key][0] += n
                counts[key][1] += time.perf_counter() - t0
                counts[key][2] += time.process_time() - c0
        for key, (n, wall, cpu) in counts.items():
            result[key] = {"images_per_s": n / wall, "cpu_ms_per_image": 1000 * cpu / n}
    out.put(result)


def sessions(bundle: str, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_sessions_worker, args=(bundle, out, seconds))
    p.start()
    result = out.get(timeout=600)
    p.join()
    result["int8_vs_fp32"] = result["int8"]["images_per_s"] / result["fp32"]["images_per_s"]
    for prec in ("fp32", "int8"):
        result[f"{prec}_per_image_vs_batch_call"] = (
            result[prec]["images_per_s"] / result[f"{prec}_batch_call"]["images_per_s"]
        )
    return result


# --------------------------------------------------------------------------------------------- the job

# Runs jobs/tag.py as a user does, with log timestamps in ms (epoch) so the phases can be timed.
LAUNCHER = (
    "import logging, runpy, sys; "
    "logging.basicConfig(level=logging.INFO, format='%(created).3f %(levelname)s %(name)s: %(message)s'); "
    "logging.getLogger('bench').info('python started'); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
LOG_LINE = re.compile(r"^(\d{10}\.\d{3}) (\w+) ([\w.]+): (.*)$")
PROGRESS = re.compile(r"tagging: (\d+)/(\d+) images")
# (phase name, regex of the log line that ends it), in order; used when the summary has no timings_s
LOG_PHASES = [
    ("python start", r"^python started"),
    ("imports, model resolve, listing", r"^run \S+: \d+ images in \d+ shards"),
    ("Ray start", r"^inference: "),
    ("actor pool start + model load (to the first rows)", r"^tagging: [1-9]\d*/"),
]


def metered(
    cmd: list[str], s3_pid: int, env: dict | None = None
) -> tuple[subprocess.Popen, str, float, float, TreeMeter, dict]:
    """Run ``cmd`` to its end with its process tree's CPU metered: (process, output, start, end,
    meter, the S3 server's and the machine's CPU over the same interval)."""
    ref = Reference(s3_pid)
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    meter = TreeMeter(proc.pid)
    meter.start()
    out, _ = proc.communicate()
    t_end = time.time()
    meter.stop()
    return proc, out, t_start, t_end, meter, ref.stop()


def run_job(bundle: str, prefix: str, output: str, extra: list[str], s3_pid: int, work: Path) -> dict:
    cmd = [sys.executable, "-c", LAUNCHER, str(REPO / "jobs" / "tag.py"), "--model", bundle]
    cmd += ["--input", prefix, "--output", output, "--max-error-rate", "0", "--progress-every", "1", *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    proc, out, t_start, t_end, meter, reference = metered(cmd, s3_pid, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    events = []
    for line in out.splitlines():
        m = LOG_LINE.match(line)
        if m:
            events.append((float(m.group(1)), m.group(4)))
    images = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("images ")), 0)
    this_attempt = next(
        (int(line.split()[2]) for line in out.splitlines() if line.startswith("this attempt")), 0
    )
    wall = t_end - t_start
    result: dict = {
        "command": shlex.join([sys.executable, "jobs/tag.py", *cmd[4:]]),
        "images": images,
        "tagged": this_attempt,
        "wall_s": wall,
        "images_per_s_whole_run": this_attempt / wall if this_attempt else 0.0,
        "cpu_s_tree": meter.total,
        "driver_peak_rss_mb": meter.peak_rss / 2**20,
        "processes": sorted({n for n in meter.names.values()}),
        "actor_pool_started": any(n.startswith("ray::") and "Predictor" in n for n in meter.names.values())
        or any("MapWorker" in n for n in meter.names.values()),
        **reference,
    }
    progress = [(t, int(m.group(1))) for t, msg in events if (m := PROGRESS.match(msg)) and int(m.group(1))]
    if len(progress) >= 2 and progress[-1][1] - progress[0][1] >= 0.3 * max(1, this_attempt):
        (ta, da), (tb, db) = progress[0], progress[-1]
        rate = (db - da) / (tb - ta)
        result["steady_images_per_s"] = rate
        result["steady_cpu_ms_per_image"] = 1000 * (meter.cpu_at(tb) - meter.cpu_at(ta)) / (db - da)
        result["fixed_cost_s"] = wall - this_attempt / rate
    result["phases_s"] = phases(out, events, t_start, t_end, output)
    return result


def ray_floor(chunks: int, s3_pid: int) -> dict:
    """``benchmarks/ray_floor.py``: the same local Ray and dataset shape as the job, no reads or inference."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "ray_floor.py"), "--chunks", str(chunks)]
    proc, out, t_start, t_end, meter, reference = metered(cmd, s3_pid)
    line = next((x for x in out.splitlines() if x.startswith('{"rows"')), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    marks = json.loads(line)["marks_s"]
    phases_s, t = {}, 0.0
    for name, at in marks.items():
        phases_s[name] = at - t
        t = at
    phases_s["exit"] = max(0.0, t_end - t_start - t)
    return {
        "wall_s": t_end - t_start,
        "cpu_s_tree": meter.total,
        "phases_s": {"from_log": phases_s},
        **reference,
    }


def marginal(small: dict, big: dict) -> dict:
    """The job's marginal (steady-state) figures from a run on N keys and one on 2N keys."""
    n = big["tagged"] - small["tagged"]
    dt = big["wall_s"] - small["wall_s"]
    out: dict = {"run_2n": big}
    if n > 0 and dt > 0:
        rate = n / dt
        out["marginal_images_per_s"] = rate
        out["marginal_cpu_ms_per_image"] = 1000 * (big["cpu_s_tree"] - small["cpu_s_tree"]) / n
        out["fixed_cost_marginal_s"] = small["wall_s"] - small["tagged"] / rate
        out["fixed_cpu_s_marginal"] = (
            small["cpu_s_tree"] - small["tagged"] * out["marginal_cpu_ms_per_image"] / 1000
        )
    return out


def _summary_timings(out: str, output: str) -> dict | None:
    """``timings_s`` of the run's summary.json (``<output>/_runs/<run_id>/``), when the job writes it."""
    from mlc_ray import storage

    run_id = next((line.split()[1] for line in out.splitlines() if line.startswith("run ")), None)
    if run_id is None:
        return None
    try:
        data = json.loads(storage.read_text(storage.join(output, "_runs", run_id, "summary.json")))
    except (OSError, ValueError):
        return None
    return data.get("timings_s") or None


def phases(out: str, events: list[tuple[float, str]], t_start: float, t_end: float, output: str) -> dict:
    """The run's time by phase: the summary's ``timings_s`` when the job writes it, and log lines."""
    timings = _summary_timings(out, output)
    marks: list[tuple[str, float]] = []
    t = t_start
    rest = list(events)
    for name, pattern in LOG_PHASES:
        hit = next((e for e in rest if re.search(pattern, e[1])), None)
        if hit is None:
            continue
        marks.append((name, hit[0] - t))
        t = hit[0]
        rest = rest[rest.index(hit) :]
    done = [e for e in events if PROGRESS.match(e[1])]
    finished = next((e for e in events if e[1].startswith("tagging finished")), None)
    if done and finished and done[-1][0] >= t:
        marks.append(("tagging (first rows to last progress line)", done[-1][0] - t))
        marks.append(("last rows, commits, totals, report, MLflow", finished[0] - done[-1][0]))
        t = finished[0]
    elif finished:
        marks.append(("to 'tagging finished'", finished[0] - t))
        t = finished[0]
    marks.append(("summary, Ray shutdown, exit", t_end - t))
    result = {"from_log": dict(marks)}
    if timings:
        exit_s = t_end - finished[0] if finished else 0.0
        inside = sum(float(v) for v in timings.values())
        result["from_summary"] = {
            "python start + imports (before run_tagging)": max(0.0, t_end - t_start - inside - exit_s),
            **{k: float(v) for k, v in timings.items()},
            "summary print, Ray shutdown, exit": exit_s,
        }
    return result


# --------------------------------------------------------------------------------------------- stats


def stat(values: list[float]) -> dict:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {}
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med else float("inf")
    return {"median": med, "min": min(values), "max": max(values), "spread": spread, "n": len(values)}


def fmt(s: dict, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, ±{s['spread']:.0%})"


def claim(s: dict) -> str:
    if not s:
        return "n/a"
    ok = s["spread"] < RATIO_SPREAD_MAX
    return f"**{s['median']:.2f}**" + ("" if ok else f" (not claimed: spread {s['spread']:.0%} ≥ 10 %)")


def summarise(runs: dict[str, list[dict]], scale: dict | None, cpu: dict, args: argparse.Namespace) -> str:
    def col(name: str, key: str) -> list[float]:
        return [r.get(key) for r in runs.get(name, []) if r.get(key) is not None]

    def paired(a: str, ka: str, b: str, kb: str) -> list[float]:
        return [
            x[ka] / y[kb]
            for x, y in zip(runs.get(a, []), runs.get(b, []), strict=False)
            if x.get(ka) and y.get(kb)
        ]

    lines = [
        f"`{args.command}` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu['model']}, {cpu['cpus']} CPUs, "
        f"flags {' '.join(cpu['key_flags'])} (VNNI: {'yes' if cpu['vnni'] else 'no'}); machine shared "
        f"with other jobs; {args.images} images, {args.repeats} repeats, median (min–max, spread).",
        "",
        "| configuration | images/s | CPU ms/image (own processes) | notes |",
        "|---|---:|---:|---|",
    ]
    rows = [
        ("in-memory ceiling (1 process/core, fp32 1 thread)", "mem", "images_per_s", "cpu_ms_per_image"),
        (
            "S3 ceiling (the same, GETs from the S3 server, 8 threads)",
            "s3",
            "images_per_s",
            "cpu_ms_per_image",
        ),
        ("`jobs/tag.py` fp32, whole run", "job_fp32", "images_per_s_whole_run", None),
        (
            "`jobs/tag.py` fp32, marginal (2N − N)",
            "job_fp32",
            "marginal_images_per_s",
            "marginal_cpu_ms_per_image",
        ),
        (
            "`jobs/tag.py` fp32, steady state (own progress lines)",
            "job_fp32",
            "steady_images_per_s",
            "steady_cpu_ms_per_image",
        ),
        ("`jobs/tag.py` int8, whole run", "job_int8", "images_per_s_whole_run", None),
        (
            "`jobs/tag.py` int8, marginal (2N − N)",
            "job_int8",
            "marginal_images_per_s",
            "marginal_cpu_ms_per_image",
        ),
        (
            "`jobs/tag.py` int8, steady state (own progress lines)",
            "job_int8",
            "steady_images_per_s",
            "steady_cpu_ms_per_image",
        ),
    ]
    for label, name, rate, cpu_key in rows:
        if name in runs:
            lines.append(
                f"| {label} | {fmt(stat(col(name, rate)))} | {fmt(stat(col(name, cpu_key))) if cpu_key else ''} | |"
            )
    if "sessions" in runs:
        for key, how in (
            ("fp32", "one image per call (as the job)"),
            ("int8", "one image per call (as the job)"),
            ("fp32_batch_call", f"the batch of {BATCH} in one call"),
            ("int8_batch_call", f"the batch of {BATCH} in one call"),
        ):
            got = [x[key] for x in runs["sessions"] if key in x]
            if not got:
                continue
            r = [x["images_per_s"] for x in got]
            c = [x["cpu_ms_per_image"] for x in got]
            lines.append(
                f"| onnxruntime {key.split('_')[0]} session alone, 1 thread, {how} | {fmt(stat(r))} | {fmt(stat(c))} | |"
            )
    lines += ["", "| ratio (paired per repeat) | median | spread |", "|---|---:|---:|"]
    ratios = {
        "int8 / fp32, sessions alone": [x["int8_vs_fp32"] for x in runs.get("sessions", [])],
        "fp32 session, one image per call / batch in one call": [
            x["fp32_per_image_vs_batch_call"]
            for x in runs.get("sessions", [])
            if "fp32_per_image_vs_batch_call" in x
        ],
        "int8 session, one image per call / batch in one call": [
            x["int8_per_image_vs_batch_call"]
            for x in runs.get("sessions", [])
            if "int8_per_image_vs_batch_call" in x
        ],
        "int8 / fp32, job marginal (2N − N)": paired(
            "job_int8", "marginal_images_per_s", "job_fp32", "marginal_images_per_s"
        ),
        "int8 / fp32, job steady state (progress lines)": paired(
            "job_int8", "steady_images_per_s", "job_fp32", "steady_images_per_s"
        ),
        "int8 / fp32, job whole run": paired(
            "job_int8", "images_per_s_whole_run", "job_fp32", "images_per_s_whole_run"
        ),
        "job fp32 marginal / S3 ceiling (rate)": paired(
            "job_fp32", "marginal_images_per_s", "s3", "images_per_s"
        ),
        "job fp32 marginal / S3 ceiling (CPU per image)": paired(
            "job_fp32", "marginal_cpu_ms_per_image", "s3", "cpu_ms_per_image"
        ),
        "job fp32 steady (progress lines) / S3 ceiling (rate)": paired(
            "job_fp32", "steady_images_per_s", "s3", "images_per_s"
        ),
        "S3 ceiling / in-memory ceiling": paired("s3", "images_per_s", "mem", "images_per_s"),
    }
    for name, values in ratios.items():
        s = stat(values)
        if s:
            lines.append(f"| {name} | {claim(s)} | {s['spread']:.0%} |")
    for name in ("job_fp32", "job_int8", "job_noop", "ray_floor"):
        if name not in runs:
            continue
        lines += ["", f"{name}: wall {fmt(stat(col(name, 'wall_s')))} s"]
        if name == "ray_floor":
            lines[-1] += (
                f", {fmt(stat(col(name, 'cpu_s_tree')))} CPU-s (local Ray + the job's dataset shape with "
                "one row per key, no reads or inference + shutdown, benchmarks/ray_floor.py)"
            )
            for job in ("job_fp32", "job_int8"):
                diff = [
                    x["fixed_cost_marginal_s"] - y["wall_s"]
                    for x, y in zip(runs.get(job, []), runs[name], strict=False)
                    if x.get("fixed_cost_marginal_s") is not None
                ]
                if diff:
                    lines[-1] += f"; {job} fixed cost over it {fmt(stat(diff))} s (paired per repeat)"
        elif name != "job_noop":
            lines[-1] += (
                f", fixed cost {fmt(stat(col(name, 'fixed_cost_marginal_s')))} s (N vs 2N; "
                f"{fmt(stat(col(name, 'fixed_cost_s')))} s from its progress lines), fixed CPU "
                f"{fmt(stat(col(name, 'fixed_cpu_s_marginal')))} CPU-s"
            )
        else:
            started = [r["actor_pool_started"] for r in runs[name]]
            lines[-1] += f"; an actor pool was started in {sum(started)} of {len(started)} runs"
        source = "from_summary" if all("from_summary" in r["phases_s"] for r in runs[name]) else "from_log"
        keys = list(runs[name][0]["phases_s"][source])
        lines += ["", f"| {name} phase ({source}) | s |", "|---|---:|"]
        for key in keys:
            lines.append(f"| {key} | {fmt(stat([r['phases_s'][source].get(key) for r in runs[name]]), 2)} |")
    if scale:
        base = runs.get("job_fp32", [])
        lines += [
            "",
            f"scale run ({scale['tagged']} images, once): wall {scale['wall_s']:.1f} s, driver peak "
            f"RSS {scale['driver_peak_rss_mb']:.0f} MB",
        ]
        if base:
            n1 = statistics.median(col("job_fp32", "tagged"))
            c1 = statistics.median(col("job_fp32", "cpu_s_tree"))
            w1 = statistics.median(col("job_fp32", "wall_s"))
            m1 = statistics.median(col("job_fp32", "driver_peak_rss_mb"))
            marg = statistics.median(col("job_fp32", "marginal_cpu_ms_per_image"))
            extra = scale["tagged"] - n1
            cpu_big = 1000 * (scale["cpu_s_tree"] - c1) / extra
            rate_big = extra / (scale["wall_s"] - w1)
            lines.append(
                f"from N to {scale['tagged'] / n1:.0f}N: marginal CPU {cpu_big:.1f} ms/image (x{cpu_big / marg:.2f} of "
                f"N vs 2N), marginal rate {rate_big:.1f} images/s; driver peak RSS x{scale['driver_peak_rss_mb'] / m1:.2f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--scale", type=int, default=4, help="one fp32 job run at this many x the images (0: none)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 200 images, 1 repeat, no scale run")
    p.add_argument(
        "--only", default="mem,s3,sessions,job_fp32,job_int8,job_noop,ray_floor", help="comma list"
    )
    p.add_argument("--session-seconds", type=float, default=3.0)
    p.add_argument("--tag-args", default="", help="extra jobs/tag.py flags for every job run")
    p.add_argument("--work-dir", default="/tmp/mlc-ray-bench-cost")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    args.command = shlex.join(
        ["python", "benchmarks/tagging.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.quick:
        args.images, args.repeats, args.scale, args.session_seconds = 200, 1, 0, 1.0
    only = [c for c in args.only.split(",") if c]
    tag_args = shlex.split(args.tag_args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs), {' '.join(cpu['key_flags'])}", flush=True)

    paths = make_images(work, args.images)
    moto, endpoint = start_moto(work)
    runs: dict[str, list[dict]] = {}
    scale = None
    t_all = time.time()
    try:
        from mlc_ray import storage

        storage.reset_clients()
        storage.s3_client().create_bucket(Bucket=BUCKET)
        keys = upload("in", paths)
        if any(n.startswith("job_") for n in only):
            upload("in2", paths, copies=2)  # 2N keys: the job's marginal rate is from N vs 2N
        prefix2 = f"s3://{BUCKET}/in2/"
        bundle = make_bundle(work, paths)
        prefix = f"s3://{BUCKET}/in/"
        order = list(only)
        for r in range(args.repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:  # rotate: no fixed position
                t = time.time()
                if name in ("mem", "s3"):
                    items = [str(x) for x in paths] if name == "mem" else keys
                    res = ceiling(name, bundle, items, endpoint, moto.pid)
                elif name == "sessions":
                    res = sessions(bundle, args.session_seconds)
                elif name in ("job_fp32", "job_int8"):
                    extra = ["--precision", name[4:], *tag_args]
                    output = f"s3://{BUCKET}/out-{name}-{r}-{time.time_ns()}"
                    output2 = f"s3://{BUCKET}/out-{name}-2n-{r}-{time.time_ns()}"
                    if r % 2:  # N and 2N alternate which goes first
                        big = run_job(bundle, prefix2, output2, extra, moto.pid, work)
                        res = run_job(bundle, prefix, output, extra, moto.pid, work)
                    else:
                        res = run_job(bundle, prefix, output, extra, moto.pid, work)
                        big = run_job(bundle, prefix2, output2, extra, moto.pid, work)
                    res.update(marginal(res, big))
                    if name == "job_fp32":
                        last_fp32_output = output
                elif name == "ray_floor":
                    from mlc_ray.tagging.dataset import READ_BLOCK_KEYS

                    res = ray_floor(-(-args.images // READ_BLOCK_KEYS), moto.pid)
                elif name == "job_noop":
                    if "job_fp32" not in only:
                        continue
                    if "last_fp32_output" not in locals():  # rotated before job_fp32: make one
                        last_fp32_output = f"s3://{BUCKET}/out-noop-{r}-{time.time_ns()}"
                        run_job(
                            bundle,
                            prefix,
                            last_fp32_output,
                            ["--precision", "fp32", *tag_args],
                            moto.pid,
                            work,
                        )
                    res = run_job(
                        bundle,
                        prefix,
                        last_fp32_output,
                        ["--precision", "fp32", "--incremental", *tag_args],
                        moto.pid,
                        work,
                    )
                else:
                    raise SystemExit(f"error: unknown configuration {name!r} in --only")
                runs.setdefault(name, []).append(res)
                brief = {k: round(v, 2) for k, v in res.items() if isinstance(v, float)}
                print(
                    f"[repeat {r + 1}/{args.repeats}] {name} ({time.time() - t:.0f} s): {json.dumps(brief)}",
                    flush=True,
                )
                if "phases_s" in res:
                    print(f"    phases: {json.dumps(res['phases_s'])}", flush=True)
        if args.scale and "job_fp32" in only:
            upload(f"in{args.scale}x", paths, copies=args.scale)
            scale = run_job(
                bundle,
                f"s3://{BUCKET}/in{args.scale}x/",
                f"s3://{BUCKET}/out-scale-{time.time_ns()}",
                ["--precision", "fp32", *tag_args],
                moto.pid,
                work,
            )
            print(
                f"scale: {json.dumps({k: round(v, 2) for k, v in scale.items() if isinstance(v, float)})}",
                flush=True,
            )
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    text = summarise(runs, scale, cpu, args)
    print(f"\ntotal {time.time() - t_all:.0f} s\n\n{text}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"cpu": cpu, "args": vars(args), "runs": runs, "scale": scale, "markdown": text},
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
