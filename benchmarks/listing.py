"""Does listing a big S3 prefix keep driver memory flat? Measures ``storage.iter_pages`` on 100,000 keys.

Starts a moto S3 server in its own process (or uses ``--endpoint``), creates N empty keys and a
1,000-key baseline prefix with parallel ``put_object``, then lists each prefix in a *fresh* Python
process that samples its RSS after every page. Flat memory means the 100,000-key listing peaks at
about the same RSS growth as the 1,000-key one (ratio near 1), while holding the whole listing in a
list (``--materialize``, the anti-pattern) grows with N.

    .venv/bin/python benchmarks/listing.py                 # 100,000 keys (creating them takes minutes)
    .venv/bin/python benchmarks/listing.py --keys 20000    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The child lists one prefix and reports its own memory: a fresh interpreter per run, so the
# numbers are not blurred by what an earlier run left in the allocator.
CHILD = r"""
import gc, json, sys, time
import psutil
from mlc_ray import storage
prefix, page_size, materialize = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
proc = psutil.Process()
storage.s3_client()  # client construction is not part of the listing's memory
list(storage.iter_pages(prefix + "-warmup", page_size=page_size))
gc.collect()
base = proc.memory_info().rss
peak, keys, pages, held, rss_10 = base, 0, 0, [], None
t0 = time.perf_counter()
for page in storage.iter_pages(prefix, page_size=page_size):
    pages += 1
    keys += len(page)
    if materialize:
        held.extend(page)
    rss = proc.memory_info().rss
    peak = max(peak, rss)
    if pages == 10:
        rss_10 = peak  # after warm-up: later growth would be growth with the number of keys
seconds = time.perf_counter() - t0
print(json.dumps({"keys": keys, "pages": pages, "rss_base": base, "rss_peak": peak, "rss_10": rss_10,
                  "seconds": seconds}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto(log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start; see moto.log")


def _create_keys(bucket: str, prefix: str, n: int, workers: int) -> float:
    from mlc_ray import storage

    client = storage.s3_client()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}/{i:07d}.jpg", Body=b""),
                range(n),
                chunksize=256,
            )
        )
    return time.perf_counter() - t0


def _list_in_child(uri: str, page_size: int, materialize: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, uri, str(page_size), "1" if materialize else "0"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the big prefix (default 100000)")
    parser.add_argument("--baseline-keys", type=int, default=1_000, help="keys in the baseline prefix")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="threads creating keys")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of starting a moto server")
    parser.add_argument("--bucket", help="existing bucket to use (default: a new one)")
    parser.add_argument(
        "--materialize", action="store_true", help="also measure holding every page in a list"
    )
    args = parser.parse_args(argv)

    server = None
    if args.endpoint is None:
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        server, endpoint = _start_moto(Path(tempfile.mkdtemp(prefix="mlc_ray-bench-")))
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    else:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    from mlc_ray import storage

    storage.reset_clients()
    try:
        bucket = args.bucket or f"bench-{uuid.uuid4().hex[:10]}"
        if not args.bucket:
            storage.s3_client().create_bucket(Bucket=bucket)
        big, small = f"big-{args.keys}", f"small-{args.baseline_keys}"
        t_big = _create_keys(bucket, big, args.keys, args.workers)
        _create_keys(bucket, small, args.baseline_keys, args.workers)
        print(
            f"created {args.keys} keys in {t_big:.0f}s ({args.keys / t_big:.0f} PUT/s) at {endpoint_name()}"
        )

        runs = {
            "baseline": _list_in_child(f"s3://{bucket}/{small}", args.page_size, False),
            "streamed": _list_in_child(f"s3://{bucket}/{big}", args.page_size, False),
        }
        if args.materialize:
            runs["materialized"] = _list_in_child(f"s3://{bucket}/{big}", args.page_size, True)
        base_delta = runs["baseline"]["rss_peak"] - runs["baseline"]["rss_base"]
        for name, r in runs.items():
            delta = r["rss_peak"] - r["rss_base"]
            ratio = delta / base_delta if base_delta > 0 else float("nan")
            print(
                f"{name:12s} keys={r['keys']:>7d} pages={r['pages']:>4d} "
                f"peak RSS delta={_mib(delta):>9s} (vs {args.baseline_keys}-key run: x{ratio:.2f}) "
                f"list time={r['seconds']:.1f}s ({r['keys'] / max(r['seconds'], 1e-9):.0f} keys/s)"
                + (
                    f"; growth from page 10 to page {r['pages']}: {_mib(r['rss_peak'] - r['rss_10'])}"
                    if r["rss_10"] is not None
                    else ""
                )
            )
        ok = runs["streamed"]["keys"] == args.keys and runs["baseline"]["keys"] == args.baseline_keys
        return 0 if ok else 1
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def endpoint_name() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "AWS")


if __name__ == "__main__":
    raise SystemExit(main())
