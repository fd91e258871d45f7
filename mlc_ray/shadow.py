"""Shadow comparison for promotion: what the challenger would do to unlabelled production images.

``jobs/promote.py --shadow s3://bucket/incoming/ --shadow-sample N`` runs this after the labelled
evaluation: a deterministic random sample of N images under the prefix (or manifest) is tagged
by the champion and by the candidate **through ``run_tagging``**, the bulk tagging pipeline of
``jobs/tag.py`` (same Ray Data stages, same scoring path, same thresholds and tag-table rows), into
one tag table with one run per model. Then, per label:

* both models' positive rates (the share of sampled images that list the label), their counts,
  the **relative rate change** ``(candidate - champion) / champion`` (``inf`` when the champion
  never lists it),
* agreement: **Cohen's kappa** of the two yes/no columns and the **Jaccard** index of the two
  positive sets,

and a contact sheet of the images where the two disagree most (most labels listed differently,
then the largest score difference), captioned with both predictions.

With ``max_rate_change`` R, a label whose relative change exceeds R, and which either model lists
at least ``min_count`` times in the sample (so 1 -> 2 of 500 is noise, not a change), **holds the
promotion**: the decision becomes a refusal (exit 3, the champion stays) unless ``force``. The
figures go into the promotion report (``report_lines``) and the versions' audit tags
(``audit_tags``: ``promotion.shadow*``); the report files (``shadow.json``, ``report.txt``, the
contact sheet) are logged to an MLflow run in experiment ``promotion`` (``promotion.shadow.report``
names it), and stay under ``output`` when one is given (the two runs' tag table too, which
``jobs/select_queue.py --run A --compare-run B`` can mine).

The sample: every key under the input is hashed with the seed (blake2b of ``seed:uri``) and the N
smallest hashes are kept while the listing streams by (a bounded heap, N keys in memory): a uniform
sample that depends only on the seed and the set of keys, never on the listing order.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlc_ray.config import ConfigError

__all__ = [
    "ShadowConfig",
    "ShadowLabel",
    "ShadowReport",
    "sample_input",
    "run_shadow",
    "shadow_gate",
    "cohen_kappa",
    "PROMOTION_EXPERIMENT",
]

log = logging.getLogger(__name__)

PROMOTION_EXPERIMENT = "promotion"
SHEET_IMAGES = 16  # images on the disagreement contact sheet
SHEET_COLUMNS = 4
TAG_PREFIX = "promotion.shadow"


@dataclass
class ShadowConfig:
    """The shadow comparison of one promotion (``jobs/promote.py --shadow ...``)."""

    input: str  # prefix (s3:// or local) or manifest of unlabelled images
    sample: int = 500  # images tagged by both models
    seed: int = 0  # the sample's seed: same seed and keys -> same sample
    max_rate_change: float | None = None  # hold when a label's |relative rate change| exceeds this
    min_count: int = 10  # ... and either model lists the label at least this often in the sample
    force: bool = False  # promote despite a hold (the report and tags say so)
    output: str | None = None  # keep the tag table + report here (default: a temporary dir)
    batch_size: int = 32
    actors: str | None = None  # passed to run_tagging (None: from the cluster's CPUs)

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError(
                "--shadow: give a prefix (s3://bucket/incoming/) or a manifest of unlabelled images"
            )
        if isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 1:
            raise ConfigError(f"--shadow-sample: expected an integer >= 1, got {self.sample!r}")
        if self.max_rate_change is not None and not (
            math.isfinite(self.max_rate_change) and self.max_rate_change > 0
        ):
            raise ConfigError(
                f"--max-rate-change: expected a relative change > 0 (e.g. 0.5 = a label's rate may move "
                f"by half), got {self.max_rate_change!r}"
            )
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ConfigError(f"--shadow-min-count: expected an integer >= 1, got {self.min_count!r}")


# --------------------------------------------------------------------------------------------- sample


def _sample_key(seed: int, uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uri}".encode(), digest_size=8).digest(), "big")


def sample_input(uri: str, n: int, seed: int = 0) -> tuple[list[str], int]:
    """(the N sampled URIs in sample order, how many keys were listed): a bottom-k hash sample."""
    from mlc_ray.tagging.inputs import iter_input_keys

    heap: list[tuple[int, str]] = []  # max-heap of the N smallest keys (negated)
    listed = 0
    for page in iter_input_keys(uri):
        for key in page:
            listed += 1
            k = _sample_key(seed, key.uri)
            if len(heap) < n:
                heapq.heappush(heap, (-k, key.uri))
            elif k < -heap[0][0]:
                heapq.heapreplace(heap, (-k, key.uri))
    return [u for _, u in sorted((-k, u) for k, u in heap)], listed


# --------------------------------------------------------------------------------------------- figures


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean columns; None when both are constant and equal (undefined)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(a)
    if n == 0:
        return None
    po = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe >= 1.0:
        return None if po == 1.0 else 0.0
    return (po - pe) / (1 - pe)


@dataclass
class ShadowLabel:
    label: str
    champion_count: int
    candidate_count: int
    images: int
    kappa: float | None
    jaccard: float | None  # None when neither model lists the label
    judged: bool  # either count >= min_count
    held: bool

    @property
    def champion_rate(self) -> float:
        return self.champion_count / self.images if self.images else 0.0

    @property
    def candidate_rate(self) -> float:
        return self.candidate_count / self.images if self.images else 0.0

    @property
    def change(self) -> float:
        """Relative rate change (candidate - champion) / champion; inf when the champion has none."""
        if self.champion_count == 0:
            return 0.0 if self.candidate_count == 0 else math.inf
        return (self.candidate_count - self.champion_count) / self.champion_count

    def to_dict(self) -> dict:
        change = self.change
        return {
            "label": self.label,
            "champion_rate": round(self.champion_rate, 6),
            "candidate_rate": round(self.candidate_rate, 6),
            "champion_count": self.champion_count,
            "candidate_count": self.candidate_count,
            "change": None if math.isinf(change) else round(change, 6),
            "kappa": None if self.kappa is None else round(self.kappa, 6),
            "jaccard": None if self.jaccard is None else round(self.jaccard, 6),
            "judged": self.judged,
            "held": self.held,
        }


@dataclass
class ShadowReport:
    """The shadow figures of one promotion: what ``report_lines`` prints and ``audit_tags`` records."""

    input: str
    sample: int  # asked for
    seed: int
    listed: int  # keys under the input
    images: int  # sampled images both models tagged without error
    errors: int  # sampled images that were error rows (for either model)
    champion: str
    candidate: str
    max_rate_change: float | None
    min_count: int
    labels: list[ShadowLabel] = field(default_factory=list)
    force: bool = False
    skipped: str = ""  # why no comparison ran (no champion)
    report_uri: str = ""  # runs:/ID/shadow (MLflow) or the output folder
    contact_sheet: str = ""
    runs: dict[str, str] = field(default_factory=dict)  # role -> tag-table run id

    @property
    def held_labels(self) -> list[ShadowLabel]:
        return [lab for lab in self.labels if lab.held]

    @property
    def held(self) -> bool:
        return bool(self.held_labels)

    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if self.max_rate_change is None:
            return "report only"
        if not self.held:
            return "pass"
        return "held, overridden by --force" if self.force else "held"

    def hold_reason(self) -> str:
        worst = sorted(self.held_labels, key=lambda lab: -abs(lab.change))
        parts = [
            f"'{lab.label}' {lab.champion_rate:.3f} -> {lab.candidate_rate:.3f} ({_pct(lab.change)})"
            for lab in worst[:3]
        ]
        return (
            f"shadow: {len(worst)} label rate(s) on {self.images} unlabelled images change by more than "
            f"{self.max_rate_change:g} (relative, >= {self.min_count} images): {', '.join(parts)}"
        )

    def report_lines(self) -> list[str]:
        if self.skipped:
            return [f"shadow     skipped: {self.skipped}"]
        head = (
            f"shadow     {self.input}: {self.images} of {self.listed} images (sample {self.sample}, seed "
            f"{self.seed}; {self.errors} error rows), champion {self.champion} vs candidate {self.candidate}"
        )
        rule = (
            f"limit: relative rate change {self.max_rate_change:g} on labels with >= {self.min_count} images"
            if self.max_rate_change is not None
            else "no --max-rate-change: report only"
        )
        lines = [head, f"           {rule}; verdict: {self.verdict()}"]
        width = max([5, *(len(lab.label) for lab in self.labels)])
        lines.append(f"           {'label':<{width}}  champion  candidate    change   kappa  jaccard")
        for lab in self.labels:
            kappa = "-" if lab.kappa is None else f"{lab.kappa:.3f}"
            jac = "-" if lab.jaccard is None else f"{lab.jaccard:.3f}"
            flag = "  HELD" if lab.held else ("" if lab.judged else "  (too few)")
            lines.append(
                f"           {lab.label:<{width}}  {lab.champion_rate:8.3f}  {lab.candidate_rate:9.3f}  "
                f"{_pct(lab.change):>8}  {kappa:>6}  {jac:>7}{flag}"
            )
        if self.contact_sheet:
            lines.append(f"           most-disagreeing images: {self.contact_sheet}")
        if self.report_uri:
            lines.append(f"           report: {self.report_uri}")
        return lines

    def audit_tags(self) -> dict[str, str]:
        """Compact tags: a one-line summary, the verdict, and the per-label figures as JSON (the
        labels that moved most first, at most 40, so the value stays under MLflow's tag limit)."""
        if self.skipped:
            return {TAG_PREFIX: f"skipped: {self.skipped}"}
        moved = sorted(self.labels, key=lambda lab: -(abs(lab.change) if lab.judged else -1))[:40]
        tags = {
            TAG_PREFIX: (
                f"{self.verdict()}: {self.images} images of {self.input} (seed {self.seed}); "
                f"max rate change {self.max_rate_change if self.max_rate_change is not None else '-'}"
                + (f"; {self.hold_reason()}" if self.held else "")
            ),
            f"{TAG_PREFIX}.verdict": self.verdict(),
            f"{TAG_PREFIX}.images": str(self.images),
            f"{TAG_PREFIX}.labels": json.dumps([lab.to_dict() for lab in moved], separators=(",", ":")),
        }
        if self.report_uri:
            tags[f"{TAG_PREFIX}.report"] = self.report_uri
        return tags

    def history(self) -> dict[str, str]:
        """What the ``promotion.log`` entry keeps: the summary line (the per-label JSON stays in the
        latest tags and the report, so the entry stays under MLflow's tag limit)."""
        return {TAG_PREFIX: self.audit_tags()[TAG_PREFIX][:1000]}

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "sample": self.sample,
            "seed": self.seed,
            "listed": self.listed,
            "images": self.images,
            "errors": self.errors,
            "champion": self.champion,
            "candidate": self.candidate,
            "max_rate_change": self.max_rate_change,
            "min_count": self.min_count,
            "verdict": self.verdict(),
            "runs": self.runs,
            "labels": [lab.to_dict() for lab in self.labels],
        }


def _pct(change: float) -> str:
    return "+inf" if math.isinf(change) else f"{change:+.1%}"


# --------------------------------------------------------------------------------------------- run


def _run_rows(table_uri: str, run_id: str) -> Any:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from mlc_ray import storage

    fs, path = storage.arrow_filesystem(table_uri)
    ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    return ds.to_table(
        columns=["image_uri", "labels", "scores", "error"], filter=pc.field("run_id") == run_id
    ).sort_by("image_uri")


def _listed_matrix(table: Any, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, L) listed flags and (n, L) scores (NaN for error rows) of a run's rows."""
    index = {name: j for j, name in enumerate(labels)}
    listed = np.zeros((table.num_rows, len(labels)), dtype=bool)
    scores = np.full((table.num_rows, len(labels)), np.nan)
    for i, (names, sc) in enumerate(
        zip(table.column("labels").to_pylist(), table.column("scores").to_pylist(), strict=True)
    ):
        for name in names or []:
            if name in index:
                listed[i, index[name]] = True
        for item in sc or []:
            if item["label"] in index:
                scores[i, index[item["label"]]] = item["score"]
    return listed, scores


def _contact_sheet(
    uris: list[str], champ: np.ndarray, cand: np.ndarray, labels: list[str], title: str
) -> bytes:
    """A grid of the given images, each captioned with what the champion and the candidate list."""
    from PIL import Image, ImageDraw

    from mlc_ray import storage
    from mlc_ray.data.images import decode_image
    from mlc_ray.tagging.report import THUMB_SIDE, make_thumbnail

    side = THUMB_SIDE * 2
    pad, caption, title_h = 6, 28, 18
    cols = min(SHEET_COLUMNS, max(1, len(uris)))
    rows = max(1, math.ceil(len(uris) / cols))
    cell_w = max(side, 150) + pad
    sheet = Image.new("RGB", (pad + cols * cell_w, title_h + rows * (side + caption + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), title, fill=(0, 0, 0))
    for k, uri in enumerate(uris):
        x, y = pad + (k % cols) * cell_w, title_h + (k // cols) * (side + caption + pad)
        try:
            decoded = decode_image(storage.read_bytes(uri), target_size=side)
            thumb = Image.open(io.BytesIO(make_thumbnail(decoded.array, side))).convert("RGB")
            sheet.paste(thumb, (x, y))
        except Exception:  # an unreadable image leaves a grey cell, never a failed promotion
            draw.rectangle((x, y, x + side, y + side), fill=(200, 200, 200))
        a = "|".join(lab for j, lab in enumerate(labels) if champ[k, j]) or "-"
        b = "|".join(lab for j, lab in enumerate(labels) if cand[k, j]) or "-"
        draw.text((x, y + side + 1), f"champion: {a}"[:28], fill=(0, 0, 160))
        draw.text((x, y + side + 13), f"candidate: {b}"[:28], fill=(160, 0, 0))
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def run_shadow(
    cfg: ShadowConfig,
    champion_uri: str,
    candidate_uri: str,
    *,
    cache_dir: str | None = None,
    sample: tuple[list[str], int] | None = None,
) -> ShadowReport:
    """Tag the sample with both models through ``run_tagging`` and compare them label by label.
    ``sample``: ``sample_input``'s result when the caller drew it already."""
    from mlc_ray import storage
    from mlc_ray.tagging.config import TagConfig
    from mlc_ray.tagging.pipeline import run_tagging

    uris, listed = sample or sample_input(cfg.input, cfg.sample, cfg.seed)
    work = cfg.output or tempfile.mkdtemp(prefix="mlc_ray-shadow-")
    try:
        sample_uri = storage.join(work, "sample.csv")
        storage.write_text(sample_uri, "image,labels\n" + "".join(f"{_csv_cell(u)},\n" for u in uris))
        table_uri = storage.join(work, "tags")
        runs: dict[str, str] = {}
        for role, model in (("champion", champion_uri), ("candidate", candidate_uri)):
            # the bulk tagging job's own pipeline; every row is kept, an error row is counted below
            summary = run_tagging(
                TagConfig(
                    model=model,
                    input=sample_uri,
                    output=table_uri,
                    batch_size=cfg.batch_size,
                    actors=cfg.actors,
                    max_error_rate=1.0,
                    model_cache=cache_dir,
                    mlflow=False,
                    report=False,
                    progress_every=60.0,
                ),
                raise_on_error_rate=False,
            )
            runs[role] = summary.run_id
        champ_rows, cand_rows = (
            _run_rows(table_uri, runs["champion"]),
            _run_rows(table_uri, runs["candidate"]),
        )
        if champ_rows.column("image_uri").to_pylist() != cand_rows.column("image_uri").to_pylist():
            raise RuntimeError("shadow: the two runs tagged different images")  # one sample, one row each
        from mlc_ray.bundle import ModelBundle
        from mlc_ray.registry import resolve_model

        labels = ModelBundle(resolve_model(candidate_uri, cache_dir).local_dir).labels()
        champ_labels = ModelBundle(resolve_model(champion_uri, cache_dir).local_dir).labels()
        labels = labels + [lab for lab in champ_labels if lab not in labels]  # a label one model lacks
        a, sa = _listed_matrix(champ_rows, labels)
        b, sb = _listed_matrix(cand_rows, labels)
        errors = np.array(
            [
                x is not None or y is not None
                for x, y in zip(
                    champ_rows.column("error").to_pylist(), cand_rows.column("error").to_pylist(), strict=True
                )
            ]
        )
        ok = ~errors
        a, b, sa, sb = a[ok], b[ok], sa[ok], sb[ok]
        uris_ok = [u for u, good in zip(champ_rows.column("image_uri").to_pylist(), ok, strict=True) if good]
        report = ShadowReport(
            input=cfg.input,
            sample=cfg.sample,
            seed=cfg.seed,
            listed=listed,
            images=int(ok.sum()),
            errors=int(errors.sum()),
            champion=champion_uri,
            candidate=candidate_uri,
            max_rate_change=cfg.max_rate_change,
            min_count=cfg.min_count,
            force=cfg.force,
            runs=runs,
        )
        for j, label in enumerate(labels):
            ca, cb = int(a[:, j].sum()), int(b[:, j].sum())
            union = int((a[:, j] | b[:, j]).sum())
            row = ShadowLabel(
                label=label,
                champion_count=ca,
                candidate_count=cb,
                images=report.images,
                kappa=cohen_kappa(a[:, j], b[:, j]),
                jaccard=(int((a[:, j] & b[:, j]).sum()) / union) if union else None,
                judged=max(ca, cb) >= cfg.min_count,
                held=False,
            )
            row.held = bool(
                cfg.max_rate_change is not None and row.judged and abs(row.change) > cfg.max_rate_change
            )
            report.labels.append(row)
        # [contact sheet] most labels listed differently first, then the largest score difference
        flips = (a != b).sum(axis=1)
        diff = np.nan_to_num(np.abs(sa - sb), nan=0.0).max(axis=1) if len(labels) else np.zeros(len(a))
        order = sorted(range(len(uris_ok)), key=lambda i: (-flips[i], -diff[i], uris_ok[i]))[:SHEET_IMAGES]
        order = [i for i in order if flips[i] > 0 or diff[i] > 0]
        report_dir = storage.join(work, "report")
        if order:
            png = _contact_sheet(
                [uris_ok[i] for i in order],
                a[order],
                b[order],
                labels,
                f"champion {champion_uri} vs candidate {candidate_uri}: the {len(order)} most-disagreeing images",
            )
            storage.write_bytes(storage.join(report_dir, "contact-disagreements.png"), png)
            report.contact_sheet = storage.join(report_dir, "contact-disagreements.png")
        doc = report.to_dict()
        doc["most_disagreeing"] = [
            {"image": uris_ok[i], "labels_differ": int(flips[i]), "max_score_diff": round(float(diff[i]), 6)}
            for i in order
        ]
        storage.write_text(storage.join(report_dir, "shadow.json"), json.dumps(doc, indent=2) + "\n")
        storage.write_text(storage.join(report_dir, "report.txt"), "\n".join(report.report_lines()) + "\n")
        report.report_uri = _log_to_mlflow(report_dir, report) or (report_dir if cfg.output else "")
        if report.report_uri.startswith("runs:/") and report.contact_sheet and not cfg.output:
            report.contact_sheet = f"{report.report_uri}/contact-disagreements.png"
        return report
    finally:
        if cfg.output is None:
            shutil.rmtree(work, ignore_errors=True)


def _csv_cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def _log_to_mlflow(report_dir: str, report: ShadowReport) -> str | None:
    """The report files as artifacts of one run in experiment ``promotion``; ``runs:/ID/shadow``."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name(PROMOTION_EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(PROMOTION_EXPERIMENT)
        run = client.create_run(
            exp_id,
            run_name=f"shadow {report.candidate} vs {report.champion}",
            tags={"mlc_ray.shadow.champion": report.champion, "mlc_ray.shadow.candidate": report.candidate},
        )
        run_id = run.info.run_id
        local = report_dir if "://" not in report_dir else None
        if local is None:  # an s3:// output: copy the few report files down first
            from mlc_ray import storage

            local = tempfile.mkdtemp(prefix="mlc_ray-shadow-report-")
            for name in ("shadow.json", "report.txt", "contact-disagreements.png"):
                with contextlib.suppress(FileNotFoundError):
                    storage.download_file(storage.join(report_dir, name), os.path.join(local, name))
        client.log_artifacts(run_id, local, "shadow")
        for lab in report.labels:
            client.log_metric(run_id, f"rate_change.{_metric_name(lab.label)}", min(abs(lab.change), 1e6))
        client.set_terminated(run_id)
        return f"runs:/{run_id}/shadow"
    except Exception as exc:  # the report is also in the promotion output and the version's tags
        log.warning("shadow: could not log the report to MLflow (%s)", exc)
        return None


def _metric_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_./ " else "_" for c in label)


# --------------------------------------------------------------------------------------------- gate


def shadow_gate(cfg: ShadowConfig, *, cache_dir: str | None = None) -> Any:
    """The ``gate`` for ``registry.promote``: run the shadow comparison on the decision's two
    versions, attach the report to the decision, and hold it when a label's rate moves too much.
    The sample is drawn now, so a wrong ``--shadow`` URI fails before any model is evaluated."""
    sample = sample_input(cfg.input, cfg.sample, cfg.seed)
    log.info(
        "shadow: %d of %d images under %s sampled (seed %d)", len(sample[0]), sample[1], cfg.input, cfg.seed
    )

    def gate(decision: Any) -> None:
        if not decision.champion_version:
            report = ShadowReport(
                input=cfg.input,
                sample=cfg.sample,
                seed=cfg.seed,
                listed=0,
                images=0,
                errors=0,
                champion="",
                candidate="",
                max_rate_change=cfg.max_rate_change,
                min_count=cfg.min_count,
                skipped="no champion to compare with (first promotion)",
            )
            decision.evidence.append(report)
            return
        champion = f"models:/{decision.name}/{decision.champion_version}"
        candidate = decision.candidate_source or f"models:/{decision.name}/{decision.candidate_version}"
        report = run_shadow(cfg, champion, candidate, cache_dir=cache_dir, sample=sample)
        decision.evidence.append(report)
        if not report.held:
            return
        if cfg.force:
            decision.reason += f"; {report.hold_reason()}: overridden by --force"
        elif decision.promoted:
            decision.promoted = False
            decision.reason = report.hold_reason() + " (--force to promote anyway)"
        else:
            decision.reason += f"; {report.hold_reason()}"

    return gate
