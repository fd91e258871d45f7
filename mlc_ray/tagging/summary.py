"""What a run did: ``TagSummary`` (``summary.json``, the table the job prints, the exit code).

Stage [5] of ``pipeline.run_tagging`` fills it from every committed shard's counts (earlier attempts
included); ``raise_for_outcome`` turns an error rate above ``--max-error-rate`` into exit 1 and a
label that left the ``--drift-alert`` band into exit 3, after every row and the report are written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mlc_ray.cli import JobError

__all__ = ["TagSummary", "error_code", "EXIT_ERROR_RATE", "EXIT_DRIFT"]

EXIT_ERROR_RATE = 1  # the job's exit code when the error rate is above --max-error-rate
EXIT_DRIFT = 3  # ... when a label's rate left the --drift-alert band (rows and report are written)


def error_code(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


@dataclass
class TagSummary:
    """What a run did; written as ``summary.json`` and printed as a table."""

    run_id: str
    output: str
    dt: str
    model: str  # pinned URI
    model_version: str
    backend: str
    precision: str
    images: int = 0  # rows in the run's committed files (all attempts)
    ok: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_skipped: int = 0  # already committed by an earlier attempt of this run
    images_this_attempt: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0  # images tagged by this attempt / its wall time
    # where this attempt's wall time went, by phase (seconds, in order; see pipeline.Timings)
    timings_s: dict[str, float] = field(default_factory=dict)
    max_error_rate: float = 1.0
    incremental: bool = False
    finished_at: str = ""
    notice: str = ""  # e.g. "run ... is already complete; N keys under the input are not in it: ..."
    tag_options: str = "{}"  # TagOptions.to_json()
    drift_alert: float | None = None  # --drift-alert X
    drift_available: bool = False  # the model bundle records its validation rates (label_rates.json)
    drift: list[dict] = field(default_factory=list)  # labels whose status is not "ok" (report.DriftRow)
    report: str = ""  # the report's index.html
    mlflow_run_id: str | None = None  # the run in MLflow experiment "tagging"

    @property
    def drift_alerts(self) -> list[dict]:
        return [d for d in self.drift if d.get("alert")]

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def error_rate(self) -> float:
        return self.errors / self.images if self.images else 0.0

    @property
    def error_rate_ok(self) -> bool:
        return self.error_rate <= self.max_error_rate

    def to_json(self) -> str:
        data = asdict(self)
        data.update(errors=self.errors, error_rate=round(self.error_rate, 6))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def format(self) -> str:
        rows = [
            ("run", f"{self.run_id} (dt={self.dt})"),
            ("model", f"{self.model} ({self.backend} {self.precision})"),
            ("output", self.output),
            ("images", f"{self.images}  ({self.shards} shards, {self.shards_skipped} already committed)"),
            ("ok", str(self.ok)),
            ("errors", f"{self.errors} ({self.error_rate:.2%}; max {self.max_error_rate:.2%})"),
        ]
        rows += [(f"  {code}", str(n)) for code, n in sorted(self.errors_by_code.items())]
        rows += [
            ("this attempt", f"{self.images_this_attempt} images in {self.wall_s:.1f} s"),
            ("images/s", f"{self.images_per_s:.1f}"),
        ]
        if self.timings_s:
            rows.append(("time", ", ".join(f"{k} {v:.1f} s" for k, v in self.timings_s.items())))
        if self.tag_options != "{}":
            rows.append(("tag options", self.tag_options))
        moved = [d for d in self.drift if d.get("status") == "moved"]
        if not self.drift_available:
            rows.append(("drift", "not available (the model bundle records no validation rates)"))
        elif not moved:
            rows.append(("drift", "no label moved"))
        else:  # the label rows below are indented under this one
            rows.append(("drift", f"{len(moved)} label(s) moved from their validation rate"))
        for d in moved:
            ratio = d.get("ratio")
            text = "inf" if ratio is None else f"{ratio:.2f}"
            rows.append(
                (
                    f"  {d['label']}",
                    f"rate {d['rate']:.4f} vs {d['expected_rate']:.4f} on validation (x{text}, p={d['p_value']:.1g})"
                    + ("  ALERT" if d.get("alert") else ""),
                )
            )
        if self.report:
            rows.append(("report", self.report))
        if self.mlflow_run_id:
            rows.append(("mlflow run", f"{self.mlflow_run_id} (experiment tagging)"))
        width = max(len(k) for k, _ in rows)
        table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
        return f"{self.notice}\n{table}" if self.notice else table

    def raise_for_outcome(self) -> None:
        """``JobError`` exit 1 when the error rate is above --max-error-rate, else exit 3
        (``EXIT_DRIFT``) when a label's rate left the --drift-alert band; every row and the
        report are written by then."""
        if not self.error_rate_ok:
            first = ", ".join(f"{k}={v}" for k, v in self.errors_by_code.items())
            raise JobError(
                f"{self.errors} of {self.images} images failed ({self.error_rate:.2%} > "
                f"--max-error-rate {self.max_error_rate:.2%}; {first}); rows are in {self.output}, "
                "look at the `error` column",
                exit_code=EXIT_ERROR_RATE,
            )
        alerts = self.drift_alerts
        if alerts:
            moved = ", ".join(
                f"{d['label']} {d['rate']:.4f} vs {d['expected_rate']:.4f}"
                f" (x{'inf' if d['ratio'] is None else format(d['ratio'], '.2f')})"
                for d in alerts
            )
            raise JobError(
                f"drift: {len(alerts)} label rate(s) outside [1/{self.drift_alert:g}, {self.drift_alert:g}] x "
                f"the model's validation rate: {moved}; every row is written ({self.output}), see the "
                f"report {self.report or '(disabled)'}",
                exit_code=EXIT_DRIFT,
            )
