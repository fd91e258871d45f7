"""GPU harness: what one GPU worker reaches in training, decoding and inference (JSON lines).

Runs on a machine with torch, torchvision, numpy and pillow only (no Ray, no MLflow): it imports just
the Ray-free modules of mlc_ray, so what it measures is the code the Ray Train worker and the tagging
UDF run — ``mlc_ray.train.step.train_step`` on ``build_tagger`` models (uint8 NHWC in, normalisation
inside), and ``mlc_ray.data.images.decode_image`` + ``preprocess_eval`` for the PIL decode.

Sections, in this order (the slow ``torch.compile`` runs last, so a budget cut loses the least):

  [1] env        device, torch/torchvision/PIL versions, CPU count, bf16 support, memory
  [2] train      images/s of one training step (forward, fp32 loss, backward, optimiser) for
                 ``mobilenet_v2`` and ``resnext50_32x4d`` at 224 px, bf16 autocast, channels-last, random
                 uint8 batches already on the device; the batch is sized to fill the GPU (measured
                 bytes per image at a probe batch, 80% of memory, a power of two, capped by
                 --max-batch), halved on OOM; peak memory; plus the host->device copy rate of the batch
  [3] decode_cpu 500x375 photo-like JPEGs (the tagging benchmark's generator), PIL decode + resize to
                 224 on --workers processes: the tagging path (JPEG draft mode) and the training path
                 (full-size decode, then resize; training's augmentation is not included); images/s,
                 and on one process for the scaling
  [4] decode_gpu torchvision.io.decode_jpeg(device="cuda") on batches of the same JPEGs (bytes copied
                 from the host) + antialiased bilinear resize to 224 on the GPU; images/s
  [5] infer      images/s of the torch tagger with sigmoid (what tagging computes), bf16 autocast,
                 channels-last, inference mode: the bound for GPU tagging (onnxruntime-gpu is not
                 installed on the device machine, so the ONNX CUDA provider is not measured here)
  [6] train      [2] again with ``torch.compile`` (default mode); compile time reported separately
  [7] summary    per arch: the best training rate against the decode rates (which one bounds a GPU
                 worker), and against the target (>= 3,000 images/s for MobileNetV2 at 224 px)

On a GPU: ``python benchmarks/gpu.py --quick --json gpu.jsonl`` (sized for about 5 minutes on one H200;
not yet run on one).
On CPU, to check the harness itself: ``python benchmarks/gpu.py --device cpu --quick`` (tiny sizes).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from tagging import photo_like_jpeg  # noqa: E402  (benchmarks/tagging.py: the same synthetic photos)

from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval  # noqa: E402
from mlc_ray.models import build_tagger, model_spec  # noqa: E402
from mlc_ray.train.config import TrainConfig  # noqa: E402
from mlc_ray.train.losses import build_loss  # noqa: E402
from mlc_ray.train.step import (  # noqa: E402
    amp_dtype_for,
    autocast,
    build_optimizer,
    make_grad_scaler,
    to_device,
    train_step,
)

ARCHS = ("mobilenet_v2", "resnext50_32x4d")
NUM_LABELS = 81  # NUS-WIDE's label count: a real multi-label head
AMP_CHOICES = ("bf16", "fp16", "auto", "off")
_T0 = time.perf_counter()
_JSON_PATH: Path | None = None
_RECORDS: list[dict[str, Any]] = []
TRAIN_TARGET = {"mobilenet_v2": 3000.0}  # images/s per GPU, 224 px, AMP (the target)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout (and appended to --json): partial results survive a cut-off run."""
    _RECORDS.append(record)
    line = json.dumps({"t_s": round(time.perf_counter() - _T0, 1), **record}, sort_keys=True)
    print(line, flush=True)
    if _JSON_PATH is not None:
        with _JSON_PATH.open("a") as fh:
            fh.write(line + "\n")


def elapsed() -> float:
    return time.perf_counter() - _T0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


# --------------------------------------------------------------------------------------------- [1] env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_record(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    import PIL
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    out: dict[str, Any] = {
        "section": "env",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit or None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "device": str(device),
        "amp": args.amp,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            gpu=props.name,
            gpu_memory_gib=gib(props.total_memory),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return out


# --------------------------------------------------------------------------------------------- [2] train


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":  # what the worker picks (TrainConfig.amp=True)
        return amp_dtype_for(device.type, True)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[name]


class TrainBench:
    """One arch's model, optimiser, loss and scaler, built the way the worker builds them."""

    def __init__(self, arch: str, args: argparse.Namespace, device: torch.device) -> None:
        cfg = TrainConfig()  # the default recipe: optimiser, loss, learning rate
        torch.manual_seed(0)
        tagger = build_tagger(model_spec(arch, NUM_LABELS), PreprocessConfig(image_size=args.image_size))
        self.model = to_device(tagger, device, channels_last=True).train()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.criterion = build_loss(cfg.loss, num_labels=NUM_LABELS, label_smoothing=cfg.label_smoothing).to(
            device
        )
        self.amp_dtype = resolve_amp(args.amp, device)
        self.scaler = make_grad_scaler(device.type, self.amp_dtype)
        self.forward: torch.nn.Module = self.model
        self.device, self.image_size, self.arch = device, args.image_size, arch

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(n)
        shape = (n, self.image_size, self.image_size, 3)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=gen)
        targets = (torch.rand(n, NUM_LABELS, device=self.device, generator=gen) < 0.05).float()
        return images, targets

    def steps(self, images: torch.Tensor, targets: torch.Tensor, n: int) -> float:
        loss = torch.zeros((), device=self.device)
        for _ in range(n):
            loss = train_step(
                self.forward,
                images,
                targets,
                criterion=self.criterion,
                optimizer=self.optimizer,
                scaler=self.scaler,
                amp_dtype=self.amp_dtype,
            )
        sync(self.device)
        return float(loss)


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def fit_batch(bench: TrainBench, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The batch that fills the GPU: bytes per image measured at a probe batch, 80% of memory."""
    if args.batch_size:
        return args.batch_size, {"batch_rule": "--batch-size"}
    if bench.device.type != "cuda":
        return args.cpu_batch, {"batch_rule": "--cpu-batch"}
    probe = args.probe_batch
    free_memory(bench.device)
    base = torch.cuda.memory_allocated(bench.device)
    images, targets = bench.batch(probe)
    bench.steps(images, targets, 2)  # optimiser state now exists: counted in the fixed part
    fixed = torch.cuda.memory_allocated(bench.device)
    torch.cuda.reset_peak_memory_stats(bench.device)
    bench.steps(images, targets, 1)
    peak = torch.cuda.max_memory_allocated(bench.device)
    del images, targets
    per_image = max(1.0, (peak - fixed) / probe)
    total = torch.cuda.get_device_properties(bench.device).total_memory
    room = 0.80 * total - fixed
    fit = int(room // per_image)
    batch = min(args.max_batch, 1 << max(0, fit.bit_length() - 1))
    return batch, {
        "batch_rule": f"80% of memory, power of two, cap {args.max_batch}",
        "probe_batch": probe,
        "mib_per_image": round(per_image / 2**20, 2),
        "fixed_gib": gib(fixed - base),
        "batch_that_fits": fit,
    }


def run_train(arch: str, args: argparse.Namespace, device: torch.device, *, compiled: bool) -> None:
    name = "train_compiled" if compiled else "train"
    free_memory(device)
    bench = TrainBench(arch, args, device)
    batch, sizing = fit_batch(bench, args)
    compile_s = None
    if compiled:
        bench.forward = torch.compile(bench.model, backend=args.compile_backend)
    while True:
        try:
            images, targets = bench.batch(batch)
            t = time.perf_counter()
            bench.steps(images, targets, args.warmup)  # includes compilation for the compiled run
            warm_s = time.perf_counter() - t
            if compiled:
                compile_s = round(warm_s, 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            loss = bench.steps(images, targets, args.steps)
            seconds = time.perf_counter() - t
            break
        except torch.OutOfMemoryError:
            images = targets = None
            free_memory(device)
            if batch <= 8:
                raise
            batch //= 2
            sizing["halved_on_oom"] = sizing.get("halved_on_oom", 0) + 1
    record: dict[str, Any] = {
        "section": name,
        "arch": arch,
        "image_size": args.image_size,
        "amp": str(bench.amp_dtype).removeprefix("torch.") if bench.amp_dtype else "fp32",
        "channels_last": first_conv(bench.model).weight.is_contiguous(memory_format=torch.channels_last),
        "scaler_enabled": bench.scaler.is_enabled(),
        "batch": batch,
        "steps": args.steps,
        "images_per_s": round(batch * args.steps / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "final_loss": round(loss, 4),
        "loss_finite": bool(np.isfinite(loss)),
        **sizing,
    }
    if compile_s is not None:
        record.update(compile_backend=args.compile_backend, compile_and_warmup_s=compile_s)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        record.update(
            peak_allocated_gib=gib(peak),
            peak_reserved_gib=gib(torch.cuda.max_memory_reserved(device)),
            memory_fraction=round(peak / total, 3),
        )
        # The worker receives host batches (iter_torch_batches(device=...)): the copy it pays per batch.
        host = images.cpu()
        t = time.perf_counter()
        for _ in range(3):
            host.to(device)
        sync(device)
        record["h2d_pageable_images_per_s"] = round(3 * batch / (time.perf_counter() - t), 1)
    emit(record)
    del bench, images, targets
    if compiled:
        torch._dynamo.reset()
    free_memory(device)


# --------------------------------------------------------------------------------------------- [3] decode_cpu


def _decode_chunk(task: tuple[list[bytes], int, bool]) -> int:
    """Decode + resize in a worker process; returns the count of good images (pixels stay there)."""
    chunk, size, draft = task
    cfg = PreprocessConfig(image_size=size)
    good = 0
    for data in chunk:
        decoded = decode_image(data, target_size=size if draft else None)
        if decoded.ok:
            good += preprocess_eval(decoded.array, cfg).shape[0] == size
    return good


def _chunks(items: list[bytes], n: int) -> list[list[bytes]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def run_decode_cpu(pool: Any, jpegs: list[bytes], args: argparse.Namespace) -> None:
    size = args.image_size
    for path, draft in (("tagging (draft)", True), ("training (full decode)", False)):
        t = time.perf_counter()
        one = _decode_chunk((jpegs[: args.single_images], size, draft))
        single = one / (time.perf_counter() - t)
        tasks = [(c, size, draft) for c in _chunks(jpegs, 16)]
        t = time.perf_counter()
        good = sum(pool.imap_unordered(_decode_chunk, tasks))
        seconds = time.perf_counter() - t
        emit(
            {
                "section": "decode_cpu",
                "path": path,
                "decoder": "PIL via mlc_ray.data.images.decode_image + preprocess_eval",
                "source": "500x375 JPEG q90",
                "resize_to": size,
                "images": len(jpegs),
                "decoded": good,
                "workers": args.workers,
                "images_per_s": round(good / seconds, 1),
                "one_process_images_per_s": round(single, 1),
            }
        )


# --------------------------------------------------------------------------------------------- [4] decode_gpu


def run_decode_gpu(jpegs: list[bytes], args: argparse.Namespace, device: torch.device) -> None:
    from torchvision.io import decode_jpeg

    size = args.image_size
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    batches = _chunks(datas, args.decode_batch)

    def one_batch(batch: list[torch.Tensor]) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for TorchCodec
            decoded = decode_jpeg(batch, device=device)
        x = torch.stack(decoded).float()  # (B, 3, 375, 500): same-size photos
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # uint8 NHWC, as the model takes

    one_batch(batches[0])  # warm-up: decoder handles, kernels
    sync(device)
    t = time.perf_counter()
    n = 0
    for batch in batches:
        n += one_batch(batch).shape[0]
    sync(device)
    seconds = time.perf_counter() - t
    emit(
        {
            "section": "decode_gpu" if device.type == "cuda" else "decode_torchvision_cpu",
            "decoder": f"torchvision.io.decode_jpeg(device={device.type!r}) + antialiased bilinear resize",
            "source": "500x375 JPEG q90 (bytes on the host)",
            "resize_to": size,
            "batch": args.decode_batch,
            "images": n,
            "images_per_s": round(n / seconds, 1),
        }
    )


# --------------------------------------------------------------------------------------------- [5] infer


def run_infer(arch: str, args: argparse.Namespace, device: torch.device) -> None:
    free_memory(device)
    torch.manual_seed(0)
    tagger = build_tagger(model_spec(arch, NUM_LABELS), PreprocessConfig(image_size=args.image_size))
    model = to_device(tagger, device, channels_last=True).eval().with_sigmoid()
    amp_dtype = resolve_amp(args.amp, device)
    batch = args.infer_batch
    images = torch.randint(
        0, 256, (batch, args.image_size, args.image_size, 3), dtype=torch.uint8, device=device
    )
    with torch.inference_mode(), autocast(device.type, amp_dtype):
        for _ in range(args.warmup):
            probs = model(images)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            probs = model(images)
        sync(device)
        seconds = time.perf_counter() - t
    record = {
        "section": "infer",
        "arch": arch,
        "runtime": "torch eager (onnxruntime-gpu not installed: the ONNX CUDA provider is not measured)",
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "batch": batch,
        "images_per_s": round(batch * args.steps / seconds, 1),
        "probabilities_finite": bool(torch.isfinite(probs.float()).all()),
    }
    if device.type == "cuda":
        record["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
    emit(record)
    del model, tagger, images, probs
    free_memory(device)


# --------------------------------------------------------------------------------------------- main


QUICK_GPU = {"steps": 15, "warmup": 5, "max_batch": 1024, "decode_images": 2000, "infer_batch": 512}
QUICK_CPU = {
    "steps": 2,
    "warmup": 1,
    "image_size": 64,
    "cpu_batch": 4,
    "decode_images": 64,
    "single_images": 16,
    "decode_batch": 16,
    "infer_batch": 8,
    # Inductor's C++ codegen for a training graph takes minutes on 2 CPUs; aot_eager still traces the
    # forward and backward through dynamo + AOTAutograd, which is what can break in the harness.
    "compile_backend": "aot_eager",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to check the harness)")
    p.add_argument("--quick", action="store_true", help="sizes for ~5 min on one H200 (tiny on CPU)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated registry names")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--amp", choices=AMP_CHOICES, default="bf16", help="auto = what the worker picks")
    p.add_argument("--compile", choices=("both", "off", "only"), default="both", help="torch.compile runs")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (the CPU --quick check uses aot_eager: tracing without C++ codegen)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="training batch (default: fill the GPU)")
    p.add_argument("--max-batch", type=int, default=2048, help="cap of the fitted training batch")
    p.add_argument("--probe-batch", type=int, default=32, help="batch that measures bytes per image")
    p.add_argument("--cpu-batch", type=int, default=16, help="training batch on --device cpu")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    p.add_argument("--infer-batch", type=int, default=1024)
    p.add_argument("--decode-images", type=int, default=5000, help="synthetic 500x375 JPEGs")
    p.add_argument("--single-images", type=int, default=200, help="images decoded on one process")
    p.add_argument("--decode-batch", type=int, default=256, help="decode_jpeg batch on the GPU")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="PIL decode processes")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip sections started after this (0: none)")
    p.add_argument("--json", type=Path, default=None, help="also append the JSON lines to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    global _JSON_PATH
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {tok.split("=", 1)[0] for tok in (sys.argv[1:] if argv is None else argv)}
    explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        print(f"error: --device {args.device!r}: use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no GPU (use --device cpu to check the harness)",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        preset = QUICK_GPU if device.type == "cuda" else QUICK_CPU
        for key, value in preset.items():
            if key not in explicit:
                setattr(args, key, value)
        if not args.budget_s:
            args.budget_s = 270.0 if device.type == "cuda" else 110.0
    archs = [a for a in args.archs.split(",") if a]
    _JSON_PATH = args.json
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    emit(env_record(device, args))

    def section(name: str, what: str, fn: Any, *fn_args: Any, **fn_kwargs: Any) -> None:
        if args.budget_s and elapsed() > args.budget_s:
            emit({"section": name, "what": what, "skipped": f"budget of {args.budget_s:.0f} s spent"})
            return
        try:
            fn(*fn_args, **fn_kwargs)
        except Exception as exc:  # one failing path must not hide the others' figures
            emit({"section": name, "what": what, "error": f"{type(exc).__name__}: {str(exc)[:800]}"})

    # One spawn pool for the CPU side (spawn, not fork: clear of the parent's CUDA context and thread
    # pools). The JPEGs are made before any timing, so no measurement shares the CPUs with it.
    with mp.get_context("spawn").Pool(args.workers) as pool:
        chunk = max(1, args.decode_images // (4 * args.workers))
        jpegs = pool.map(photo_like_jpeg, range(args.decode_images), chunksize=chunk)
        if args.compile != "only":
            for arch in archs:
                section("train", arch, run_train, arch, args, device, compiled=False)
        section("decode_cpu", "PIL", run_decode_cpu, pool, jpegs, args)
    section("decode_gpu", "torchvision", run_decode_gpu, jpegs, args, device)
    for arch in archs:
        section("infer", arch, run_infer, arch, args, device)
    if args.compile != "off":
        for arch in archs:
            section("train_compiled", arch, run_train, arch, args, device, compiled=True)
    for line in summary(_RECORDS):
        emit(line)
    emit({"section": "done", "wall_s": round(elapsed(), 1)})
    return 0


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arch: the best measured training rate against the decode rates -- what bounds a GPU worker."""
    rate = {(r["section"], r.get("path", "")): r["images_per_s"] for r in records if "images_per_s" in r}
    cpu_decode = rate.get(("decode_cpu", "training (full decode)"))
    tv_decode = rate.get(("decode_gpu", "")) or rate.get(("decode_torchvision_cpu", ""))  # GPU, or CPU
    out = []
    trains = [r for r in records if r.get("section", "").startswith("train") and "images_per_s" in r]
    for arch in dict.fromkeys(r["arch"] for r in trains):
        best = max((r for r in trains if r["arch"] == arch), key=lambda r: r["images_per_s"])
        line: dict[str, Any] = {
            "section": "summary",
            "arch": arch,
            "train_images_per_s": best["images_per_s"],
            "train_run": best["section"],
            "cpu_decode_training_path_images_per_s": cpu_decode,
            "torchvision_decode_images_per_s": tv_decode,
        }
        if cpu_decode:
            line["cpu_decode_over_train"] = round(cpu_decode / best["images_per_s"], 2)
            line["bound_with_cpu_decode"] = "input pipeline" if cpu_decode < best["images_per_s"] else "model"
        if arch in TRAIN_TARGET and best["image_size"] == 224:  # the target is for 224 px
            line["train_target_images_per_s"] = TRAIN_TARGET[arch]
            line["train_target_met"] = best["images_per_s"] >= TRAIN_TARGET[arch]
        out.append(line)
    return out


if __name__ == "__main__":
    sys.exit(main())
