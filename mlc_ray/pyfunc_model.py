"""The MLflow pyfunc face of a registered tagger ("models from code": MLflow logs this file).

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)`` takes a DataFrame with a column
``image`` holding image URIs (local paths or ``s3://``) or the encoded bytes, and returns one row
per input: ``image`` (the URI, or null for bytes), ``labels`` (labels whose score passes the version's
calibrated threshold, ``Thresholds.apply``), ``scores`` (``[{"label", "score"}]`` for every label, model order,
the same shape as the tag table's column) and ``error`` (null when the image was tagged; a bad
image is a row with ``error`` set, never an exception).

Scoring uses the version's fp32 ``model.onnx``, ``preprocess.json``, ``labels.json`` and
``thresholds.json`` (logged as pyfunc ``artifacts``, read by ``mlc_ray.bundle.ModelBundle``) through
``mlc_ray.evaluation.BundleScorer``, the same image path promotion evaluates and tagging runs. The ``mlc_ray`` package must therefore be importable where the
model is loaded: ``pip install mlc_ray`` (the registry also records it in the model's pip
requirements). Heavy imports live in ``load_context`` so that logging the model stays cheap.
"""

from __future__ import annotations

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# Artifact keys under which the registry logs the bundle files this model needs.
REQUIRED_ARTIFACTS = ("onnx", "labels", "preprocess", "thresholds")


class ImageTaggerModel(PythonModel):
    """Image URIs or bytes -> labels above each label's calibrated threshold, and every score."""

    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's PythonModelContext
        from pathlib import Path

        from mlc_ray.evaluation import BundleScorer

        missing = [k for k in REQUIRED_ARTIFACTS if k not in context.artifacts]
        if missing:
            raise RuntimeError(
                f"model artifacts {missing} missing: was this version logged by mlc_ray.registry?"
            )
        bundle_dir = Path(context.artifacts["onnx"]).parent
        self._scorer = BundleScorer(bundle_dir, onnx_file=Path(context.artifacts["onnx"]).name)
        self._labels = list(self._scorer.labels)
        self._thresholds = self._scorer.bundle.thresholds()  # refused when its labels are not labels.json's

    # `pd.DataFrame` is the one input hint MLflow 3 takes as "schema from the signature/example":
    # the explicit signature the registry records stays in charge (no type-hint validation).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        import numpy as np

        from mlc_ray import storage

        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame(name="image")
        elif not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"image": list(model_input)})
        if "image" not in model_input.columns:
            raise ValueError(
                f"input needs a column 'image' (URIs or bytes); got columns {list(model_input.columns)}"
            )
        values = list(model_input["image"])
        uris: list[str | None] = []
        data: list[bytes | None] = []
        read_errors: list[str | None] = []
        for value in values:
            if isinstance(value, bytes | bytearray | memoryview):
                uris.append(None)
                data.append(bytes(value))
                read_errors.append(None)
                continue
            uri = None if value is None else str(value)
            uris.append(uri)
            try:
                data.append(storage.read_bytes(uri) if uri else None)
                read_errors.append(None if uri else "empty: no image URI or bytes")
            except (OSError, ValueError) as exc:
                data.append(None)
                read_errors.append(f"unreadable: {exc}")
        scores, errors = self._scorer.score_bytes(data)
        above = self._thresholds.apply(np.nan_to_num(scores, nan=-1.0))
        rows = []
        for i, uri in enumerate(uris):
            error = read_errors[i] or errors[i]
            if error is not None:
                rows.append({"image": uri, "labels": [], "scores": [], "error": error})
                continue
            rows.append(
                {
                    "image": uri,
                    "labels": [label for label, on in zip(self._labels, above[i], strict=True) if on],
                    "scores": [
                        {"label": label, "score": float(s)}
                        for label, s in zip(self._labels, scores[i], strict=True)
                    ],
                    "error": None,
                }
            )
        return pd.DataFrame(rows, columns=["image", "labels", "scores", "error"])


set_model(ImageTaggerModel())
