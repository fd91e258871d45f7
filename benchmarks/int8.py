"""fp32 vs int8 ONNX: onnxruntime throughput and macro-F1, on this machine.

    .venv/bin/python benchmarks/int8.py [--epochs 4] [--f1-size 96] [--bench-size 224] [--batch 32] [--threads 1]

[1] generates the demo set (``mlc_ray.data.demo``, 1200 train / 300 val at 96 px) in a temp folder;
[2] trains MobileNetV2 (no pretrained weights) briefly with a plain torch loop (BCE, Adam) on it;
[3] writes a bundle, calibrates per-label thresholds (f1_max) on the val set with the torch model;
[4] ``export_bundle``: ONNX fp32, int8 (calibrated on 300 train images) and its accuracy gate —
    fp32 vs int8 macro-F1 at the calibrated thresholds on val;
[5] speed: the same weights as a 224 px MobileNetV2 graph, fp32 vs int8 (calibrated on the train
    images resized to 224), one onnxruntime session each with the options every scorer uses
    (``onnx_run.open_session``; 1 intra-op thread, as a tagging actor), run as tagging runs a batch
    (``onnx_run.run_graph``: one image per thread per call), alternating, median of 5 slices.

Prints one JSON object (and a short table on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _load_split(manifest, size: int) -> tuple[np.ndarray, np.ndarray]:
    from mlc_ray import storage
    from mlc_ray.data.images import PreprocessConfig, decode_image, preprocess_eval

    cfg = PreprocessConfig(image_size=size)
    images = []
    for uri in manifest.images:
        decoded = decode_image(storage.read_bytes(uri))
        images.append(preprocess_eval(decoded.array, cfg))
    return np.stack(images), manifest.multi_hot().astype(np.float32)


def _train(model, images: np.ndarray, targets: np.ndarray, epochs: int, seed: int = 0) -> float:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    loss = float("nan")
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            batch = images[idx]
            flip = rng.random(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            out = model(torch.from_numpy(np.ascontiguousarray(batch)))
            step_loss = loss_fn(out, torch.from_numpy(targets[idx]))
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            loss = float(step_loss.detach())
    return loss


def _throughput(paths: dict[str, Path], images: np.ndarray, batch: int, threads: int, seconds: float) -> dict:
    """images/s of each graph, run as tagging's actors run it (``onnx_run``: one session per graph,
    one image per intra-op thread per call): the graphs alternate in 5 slices of ``seconds / 5``
    each, and each figure is the median of its slices."""
    from mlc_ray.export.onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
    from mlc_ray.onnx_run import cpu_images_per_call, run_graph

    sessions = {name: onnx_session(path, threads=threads) for name, path in paths.items()}
    x = np.ascontiguousarray(images[:batch])

    def run(session) -> None:  # noqa: ANN001
        run_graph(
            session,
            x,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            images_per_call=cpu_images_per_call(threads),
        )

    for session in sessions.values():
        for _ in range(3):
            run(session)
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(5):
        for name, session in sessions.items():
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                run(session)
                done += len(x)
            rates[name].append(done / (time.perf_counter() - start))
    return {name: float(np.median(r)) for name, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="training epochs on the demo train split")
    parser.add_argument(
        "--f1-size", type=int, default=96, help="image size for training and the F1 comparison"
    )
    parser.add_argument("--bench-size", type=int, default=224, help="image size for the speed comparison")
    parser.add_argument(
        "--batch", type=int, default=32, help="images per batch in the speed comparison (tagging's default)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per model")
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (a tagging actor's default: 1)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="where demo data and bundles go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from mlc_ray.calibrate import calibrate_thresholds
    from mlc_ray.data.demo import generate_demo
    from mlc_ray.data.images import PreprocessConfig
    from mlc_ray.data.manifest import load_manifest, split_train_val
    from mlc_ray.export import export_bundle
    from mlc_ray.export.onnx import export_onnx
    from mlc_ray.export.parity import torch_probabilities
    from mlc_ray.export.quantize import quantize_int8
    from mlc_ray.models import build_tagger, model_spec

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mlc_ray-int8-bench-"))
    # [1] demo data
    manifest = load_manifest(generate_demo(str(work / "demo")))
    train, val = split_train_val(manifest)
    labels = list(manifest.vocabulary)
    train_x, train_y = _load_split(train, args.f1_size)
    val_x, val_y = _load_split(val, args.f1_size)
    # [2] brief training
    spec = model_spec("mobilenet_v2", len(labels))
    pre = PreprocessConfig(image_size=args.f1_size)
    model = build_tagger(spec, pre)
    t0 = time.perf_counter()
    final_loss = _train(model, train_x, train_y, args.epochs)
    train_s = time.perf_counter() - t0
    model.eval()
    # [3] bundle + thresholds
    bundle = work / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), bundle / "model.pt")
    (bundle / "model.json").write_text(json.dumps(spec))
    (bundle / "labels.json").write_text(json.dumps(labels))
    (bundle / "preprocess.json").write_text(pre.to_json())
    scores = torch_probabilities(model, val_x)
    calibrate_thresholds(scores, val_y.astype(np.uint8), labels).save(str(bundle / "thresholds.json"))
    # [4] export + int8 gate on val
    report = export_bundle(
        bundle,
        calibration_images=train_x[:300],
        val_images=val_x,
        val_targets=val_y.astype(np.uint8),
        formats=("onnx", "int8"),
        threads=args.threads,
    )
    gate = report.gate
    # [5] speed at bench size: same weights (global pooling makes them size-independent)
    big_pre = PreprocessConfig(image_size=args.bench_size)
    big = build_tagger(spec, big_pre)
    big.load_state_dict(model.state_dict())
    big.eval()
    speed_dir = work / "speed"
    fp32_path = export_onnx(big, speed_dir / "model.onnx", image_size=args.bench_size)
    big_x, _ = _load_split(train.subset(list(range(min(300, len(train))))), args.bench_size)
    int8_path = quantize_int8(fp32_path, speed_dir / "model.int8.onnx", big_x)
    speed = _throughput({"fp32": fp32_path, "int8": int8_path}, big_x, args.batch, args.threads, args.seconds)
    fp32_ips, int8_ips = speed["fp32"], speed["int8"]
    result = {
        "model": f"mobilenet_v2 trained {args.epochs} epochs on the demo set at {args.f1_size}px "
        f"(final batch loss {final_loss:.3f}, {train_s:.0f} s)",
        "val_images": len(val_x),
        "macro_f1_fp32": gate.macro_f1_fp32 if gate else None,
        "macro_f1_int8": gate.macro_f1_int8 if gate else None,
        "int8_gate": gate.reason if gate else report.results["int8"].reason,
        "speed_image_size": args.bench_size,
        "batch": args.batch,
        "threads": args.threads,
        "fp32_images_per_s": round(fp32_ips, 1),
        "int8_images_per_s": round(int8_ips, 1),
        "int8_speedup": round(int8_ips / fp32_ips, 2),
        "fp32_mb": round(fp32_path.stat().st_size / 1e6, 2),
        "int8_mb": round(int8_path.stat().st_size / 1e6, 2),
    }
    print(report.format(), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
