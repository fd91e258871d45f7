"""``run_shadow``: the sample tagged by champion and candidate through ``run_tagging`` into one tag
table (a run per model), the per-label figures read back from it, the disagreement contact sheet,
and the report logged to MLflow."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from mlc_ray.shadow.config import PROMOTION_EXPERIMENT, SHEET_COLUMNS, SHEET_IMAGES, ShadowConfig
from mlc_ray.shadow.report import ShadowLabel, ShadowReport, cohen_kappa
from mlc_ray.shadow.sample import sample_input

__all__ = ["run_shadow", "run_rows"]

log = logging.getLogger(__name__)


def run_rows(table_uri: str, run_id: str) -> Any:
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
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "labels"])
        writer.writerows([u, ""] for u in uris)
        storage.write_text(sample_uri, buf.getvalue())
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
            run_rows(table_uri, runs["champion"]),
            run_rows(table_uri, runs["candidate"]),
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
