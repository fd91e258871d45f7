"""Find the damaged images in a data set before training or tagging trips over them.

``run_scan`` reads and decodes every image of a manifest (or of every image file under a local
folder / ``s3://`` prefix) in parallel with Ray Data, using the same ``decode_image`` that training
and tagging use, so "ok" here means "those jobs can read it". It reports; it never deletes: seed
000 deleted broken files in place, but a data set is often shared and a false positive would be
lost for good. The result is

* a report (Parquet, one row per image: ``image``, ``error_code`` (null when ok), ``message``,
  ``width``, ``height``) in input order,
* a printed summary (counts per error code, the first broken files),
* optionally a *clean manifest*: the input rows whose image decoded, labels and splits kept.

Error codes are ``decode_image``'s (``empty``, ``not_image``, ``truncated``, ``too_large``,
``corrupt``, ``unsupported``) plus ``missing`` (listed in the manifest, not in storage) and
``unreadable`` (storage refused the read: permissions, network after retries).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mlc_ray.data.images import DEFAULT_MAX_PIXELS
from mlc_ray.data.manifest import IMAGE_EXTENSIONS, Manifest, load_manifest
from mlc_ray.errors import JobError, UserError

__all__ = [
    "ScanConfig",
    "ScanResult",
    "REPORT_SCHEMA",
    "run_scan",
    "enforce_error_rate",
    "scan_images_batch",
    "list_images",
]

log = logging.getLogger(__name__)

EXIT_TOO_MANY_ERRORS = 3

REPORT_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),  # null when the image decoded
        pa.field("message", pa.string()),  # null when the image decoded
        pa.field("width", pa.int32()),  # upright size; 0 when unknown
        pa.field("height", pa.int32()),
    ]
)


@dataclass
class ScanConfig:
    """Settings of ``jobs/scan.py`` (YAML keys = field names; CLI flags override them)."""

    data: str | None = None  # manifest, or a folder / s3:// prefix of images; None = the demo data set
    report: str | None = None  # Parquet report to write (local or s3://); None = summary only
    write_clean: str | None = None  # manifest of the images that decoded (.csv/.jsonl/.parquet)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are "too_large" (decompression-bomb guard)
    batch_size: int = 32  # images per decode task: big enough to amortise task overhead
    num_cpus: float = 1.0  # CPUs reserved per decode task (fractional lets more run at once)
    page_size: int = 1000  # keys per listing request for a prefix input
    max_error_rate: float | None = None  # fail (exit 3) above this fraction of broken images
    summary_lines: int = 20  # broken files listed in the printed summary
    suffixes: tuple[str, ...] = IMAGE_EXTENSIONS  # what counts as an image in a prefix input

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.num_cpus <= 64:
            raise ValueError(f"num_cpus must be in (0, 64], got {self.num_cpus}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.summary_lines < 0:
            raise ValueError(f"summary_lines must be >= 0, got {self.summary_lines}")
        if self.report is not None and not self.report.lower().endswith((".parquet", ".pq")):
            raise ValueError(f"report must be a .parquet file, got {self.report!r}")
        if self.write_clean is not None and not self.write_clean.lower().endswith(
            (".csv", ".jsonl", ".ndjson", ".parquet", ".pq")
        ):
            raise ValueError(f"write_clean must end in .csv, .jsonl or .parquet, got {self.write_clean!r}")
        self.suffixes = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in self.suffixes)
        if not self.suffixes:
            raise ValueError("suffixes must name at least one image extension, e.g. ['.jpg']")


@dataclass
class ScanResult:
    """What a scan found. ``table`` has REPORT_SCHEMA, one row per input image, in input order."""

    source: str
    table: pa.Table
    report_uri: str | None = None
    clean_uri: str | None = None
    seconds: float = 0.0
    errors_by_code: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.table.num_rows

    @property
    def n_errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def n_ok(self) -> int:
        return self.total - self.n_errors

    def broken(self) -> list[tuple[str, str, str]]:
        """(image, error_code, message) of every broken image, in input order."""
        rows = self.table.filter(pc.is_valid(self.table["error_code"])).to_pylist()
        return [(r["image"], r["error_code"], r["message"]) for r in rows]

    def summary(self, max_lines: int = 20) -> str:
        by_code = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors_by_code.items()))
        lines = [
            f"scanned {self.total} images from {self.source} in {self.seconds:.1f}s: "
            f"{self.n_ok} ok, {self.n_errors} broken" + (f" ({by_code})" if by_code else "")
        ]
        broken = self.broken()
        for image, code, message in broken[:max_lines]:
            lines.append(f"  {code:<10s} {image}: {message}")
        if len(broken) > max_lines:
            more = len(broken) - max_lines
            lines.append(
                f"  ... and {more} more" + (f" (all in {self.report_uri})" if self.report_uri else "")
            )
        if self.report_uri:
            lines.append(f"report: {self.report_uri}")
        if self.clean_uri:
            lines.append(f"clean manifest ({self.n_ok} images): {self.clean_uri}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# [1] inputs


def _is_prefix(uri: str) -> bool:
    """A folder / s3:// prefix of images (listed), as opposed to a manifest file (loaded)."""
    from mlc_ray import storage

    if uri.endswith("/"):
        return True
    if storage.is_s3(uri):
        return not storage.exists(uri)
    return os.path.isdir(uri.removeprefix("file://"))


def list_images(
    prefix: str, suffixes: tuple[str, ...] = IMAGE_EXTENSIONS, page_size: int = 1000
) -> list[str]:
    """URIs of every image file under ``prefix``, listed page by page (only the URIs are kept)."""
    from mlc_ray import storage

    images: list[str] = []
    for page in storage.iter_pages(prefix, page_size=page_size, suffixes=suffixes):
        images.extend(info.uri for info in page)
    return images


def _load_inputs(cfg: ScanConfig) -> tuple[str, Manifest | None, list[str]]:
    """(source, manifest or None for a prefix, image URIs)."""
    if cfg.data is None:
        from mlc_ray.data.demo import ensure_demo_data

        source = ensure_demo_data()
        log.info("no --data given: scanning the demo data set %s", source)
    else:
        source = cfg.data
    if _is_prefix(source):
        images = list_images(source, cfg.suffixes, cfg.page_size)
        if not images:
            raise UserError(
                f"no images under {source} (looked for {', '.join(cfg.suffixes)}); "
                "check the path, or pass a manifest file"
            )
        return source, None, images
    manifest = load_manifest(source)
    if len(manifest) == 0:
        raise UserError(f"{source}: the manifest has no rows")
    return source, manifest, list(manifest.images)


# ----------------------------------------------------------------------------------------------
# [2] read + decode (runs in Ray tasks)


def scan_images_batch(batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Read and decode each ``image`` URI of a batch; one report row per image, never an exception.

    The ``index`` column (input position) passes through so the driver can restore input order.
    """
    from mlc_ray import storage
    from mlc_ray.data.images import decode_image

    codes: list[str | None] = []
    messages: list[str | None] = []
    widths: list[int] = []
    heights: list[int] = []
    images = batch.column("image").to_pylist()
    for uri in images:
        code: str | None = None
        message: str | None = None
        width = height = 0
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            code, message = "missing", "not found in storage"
        except Exception as exc:  # permissions, network after retries: report it, keep scanning
            code, message = "unreadable", f"{type(exc).__name__}: {exc}"
        else:
            decoded = decode_image(data, max_pixels=max_pixels)
            width, height = decoded.width, decoded.height
            if decoded.error is not None:
                code, message = decoded.error.code, decoded.error.message
        codes.append(code)
        messages.append(message)
        widths.append(width)
        heights.append(height)
    return pa.table(
        {
            "index": batch.column("index"),
            "image": pa.array(images, pa.string()),
            "error_code": pa.array(codes, pa.string()),
            "message": pa.array(messages, pa.string()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
        }
    )


def _decode_all(images: list[str], cfg: ScanConfig) -> pa.Table:
    import ray

    from mlc_ray.progress import quiet_ray_progress

    quiet_ray_progress()  # as tagging and training: no execution plan / per-operator lines in the log
    items = pa.table(
        {"index": pa.array(range(len(images)), pa.int64()), "image": pa.array(images, pa.string())}
    )
    num_blocks = max(1, min(math.ceil(len(images) / cfg.batch_size), 2000))
    ds = ray.data.from_arrow(items).repartition(num_blocks)
    ds = ds.map_batches(
        scan_images_batch,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"max_pixels": cfg.max_pixels},
        num_cpus=cfg.num_cpus,
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(parts) if parts else items.slice(0, 0)
    table = table.sort_by("index")
    if table.num_rows != len(images):  # a lost or doubled row would make the report lie
        raise RuntimeError(f"scan produced {table.num_rows} rows for {len(images)} images")
    return table.select(REPORT_SCHEMA.names).cast(REPORT_SCHEMA)


# ----------------------------------------------------------------------------------------------
# [3] outputs


def _write_parquet(table: pa.Table, uri: str) -> None:
    """Write a Parquet file atomically (local temp file, then storage.upload_file's commit)."""
    import pyarrow.parquet as pq

    from mlc_ray import storage

    with tempfile.TemporaryDirectory(prefix="mlc_ray-scan-") as tmp:
        local = os.path.join(tmp, "report.parquet")
        pq.write_table(table, local)
        storage.upload_file(local, uri)


def _same_uri(a: str, b: str) -> bool:
    from mlc_ray import storage

    if storage.is_s3(a) or storage.is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a.removeprefix("file://")) == os.path.abspath(b.removeprefix("file://"))


def _write_clean(manifest: Manifest | None, images: list[str], ok: list[int], uri: str) -> None:
    if manifest is not None:
        manifest.subset(ok).write(uri)
        return
    # a prefix has no labels: the clean manifest is an unlabelled image list (what tagging takes)
    Manifest(
        images=[images[i] for i in ok],
        labels=[[] for _ in ok],
        splits=[None for _ in ok],
        vocabulary=[],
        source=uri,
    ).write(uri, write_labels_file=False)


def run_scan(cfg: ScanConfig) -> ScanResult:
    """Scan every image of ``cfg.data``; write the report and clean manifest when asked.

    Uses the running Ray (or starts a local one). Broken images are results, not failures: call
    ``enforce_error_rate`` to turn too many of them into a failed job.
    """
    started = time.perf_counter()
    # [1] list inputs
    source, manifest, images = _load_inputs(cfg)
    if cfg.write_clean is not None and _same_uri(cfg.write_clean, source):
        raise UserError(
            f"--write-clean {cfg.write_clean} is the input manifest; write the clean manifest to a new file"
        )
    from mlc_ray import storage

    # a folder that cannot take the outputs fails now, not after every image was decoded
    for flag, uri in (("--report", cfg.report), ("--write-clean", cfg.write_clean)):
        if uri is not None:
            storage.check_local_dir(uri, flag, for_file=True)
    log.info("scanning %d images from %s", len(images), source)
    # [2] decode in parallel (Ray starts only now: a wrong input was one error line, nothing started)
    from mlc_ray.cli import init_ray

    init_ray()
    table = _decode_all(images, cfg)
    codes = [c for c in table.column("error_code").to_pylist() if c is not None]
    result = ScanResult(source=source, table=table, errors_by_code=dict(Counter(codes)))
    # [3] report, clean manifest
    if cfg.report is not None:
        _write_parquet(table, cfg.report)
        result.report_uri = cfg.report
    if cfg.write_clean is not None:
        ok = [i for i, c in enumerate(table.column("error_code").to_pylist()) if c is None]
        _write_clean(manifest, images, ok, cfg.write_clean)
        result.clean_uri = cfg.write_clean
    result.seconds = time.perf_counter() - started
    log.info(
        "scan: %d images, %d broken, %.1fs (%.0f images/s)",
        result.total,
        result.n_errors,
        result.seconds,
        result.total / max(result.seconds, 1e-9),
    )
    return result


def enforce_error_rate(result: ScanResult, max_error_rate: float | None) -> None:
    """Raise JobError (exit 3) when more than ``max_error_rate`` of the images are broken."""
    if max_error_rate is not None and result.n_errors > max_error_rate * result.total:
        raise JobError(
            f"{result.n_errors} of {result.total} images are broken "
            f"({result.n_errors / result.total:.1%} > max_error_rate {max_error_rate:.1%}); "
            "see the report" + (f" {result.report_uri}" if result.report_uri else ""),
            exit_code=EXIT_TOO_MANY_ERRORS,
        )
