"""Score a labelled manifest with a trained torch bundle, as a Ray Data batch-inference pass.

Used by hard-sample mining (stage b: score the whole training split with the base model) and for
test-time-augmented evaluation (``--tta 10crop``, seed 003: four corners, centre and their mirrors
of the image resized to ``image_size * resize_scale``; the 10 sigmoid outputs are reduced by mean
or max). The stages:

  [1] ``ray.data.from_items`` of (index, uri) rows
  [2] ``map_batches`` tasks: ``mlc_ray.data.images.read_and_prepare`` (read, decode with the bundle's
      policy, resize or 10-crop) -> uint8 NHWC pixels; a failed image keeps its row with ``error`` set
  [3] ``map_batches`` with an actor pool (``ActorPoolStrategy(min_size=1, max_size=...)``) of
      ``TaggerActor``: the ImageTagger in eval mode, loaded once per actor, sigmoid on the logits
  [4] collect, order by index: ``ScoreResult(indices, scores, targets, errors)``

``use_ray=False`` runs the same per-batch functions in this process (small sets, debugging).

The model comes from a bundle directory (local or s3://, read by ``mlc_ray.bundle.ModelBundle``:
``model.json``, ``model.pt`` with ``weights_only=True``, ``preprocess.json``, ``labels.json``); or from
an ``nn.Module`` with ``preprocess=`` and ``labels=``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ScoreResult", "TaggerActor", "load_bundle_model", "score_manifest", "TTA_MODES", "REDUCE_MODES"]

log = logging.getLogger(__name__)

TTA_MODES = ("none", "10crop")
REDUCE_MODES = ("mean", "max")


@dataclass
class ScoreResult:
    """Scores of every image that decoded, in manifest order; the rest are in ``errors``."""

    indices: np.ndarray  # (M,) int64 manifest row of each scored image, ascending
    scores: np.ndarray  # (M, L) float32 sigmoid probabilities, ``labels`` order
    targets: np.ndarray  # (M, L) uint8 multi-hot, ``labels`` order
    labels: list[str] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (row, uri, reason)


def load_bundle_model(bundle_dir: str) -> tuple[Any, Any, list[str]]:
    """(ImageTagger in eval mode, PreprocessConfig, labels) from a bundle directory (local or s3://),
    read through ``ModelBundle``."""
    from mlc_ray.bundle import BundleError, local_bundle

    with local_bundle(bundle_dir) as bundle:
        spec, labels = bundle.model_spec(), bundle.labels()
        if int(spec.get("num_labels", -1)) != len(labels):
            raise BundleError(
                f"{bundle_dir}: model.json says {spec.get('num_labels')} labels but labels.json lists "
                f"{len(labels)}"
            )
        return bundle.load_model(), bundle.preprocess(), labels


def _preprocess_rows(batch: dict[str, np.ndarray], *, preprocess: dict, tta: str) -> dict[str, np.ndarray]:
    """[2] read + decode + resize one batch of (index, uri) rows into uint8 pixels (the one image path)."""
    from mlc_ray.data.images import PreprocessConfig, read_and_prepare

    cfg = PreprocessConfig.from_dict(preprocess)
    size = cfg.image_size
    view = "10crop" if tta == "10crop" else "single"
    shape = (10, size, size, 3) if view == "10crop" else (size, size, 3)
    indices = np.asarray(batch["index"], dtype=np.int64)
    pixels = np.zeros((len(indices), *shape), dtype=np.uint8)
    errors: list[str] = []
    for k, uri in enumerate(batch["uri"]):
        prepared = read_and_prepare(str(uri), cfg, view=view)
        if prepared.error is not None:  # a failed image is a per-image error, not a failed pass
            errors.append(prepared.error)
            continue
        pixels[k] = prepared.pixels
        errors.append("")
    return {"index": indices, "pixels": pixels, "error": np.asarray(errors, dtype=object)}


class TaggerActor:
    """[3] Holds the ImageTagger (eval mode) and turns pixel batches into sigmoid scores."""

    def __init__(
        self,
        bundle_dir: str | None = None,
        model: Any = None,
        *,
        reduce: str = "mean",
        num_threads: int = 1,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        if model is None:
            model, _, _ = load_bundle_model(str(bundle_dir))
        self.model = model.eval()
        self.reduce = reduce

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = np.asarray(batch["pixels"])
        n = pixels.shape[0]
        crops = pixels.shape[1] if pixels.ndim == 5 else 1
        flat = pixels.reshape(n * crops, *pixels.shape[-3:])
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(torch.from_numpy(np.ascontiguousarray(flat))).float()).numpy()
        probs = probs.reshape(n, crops, -1)
        scores = probs.max(axis=1) if self.reduce == "max" else probs.mean(axis=1)
        return {"index": batch["index"], "scores": scores.astype(np.float32), "error": batch["error"]}


def _targets_for(manifest: Any, labels: list[str]) -> np.ndarray:
    vocab = list(manifest.vocabulary)
    missing = [x for x in labels if x not in vocab]
    if missing:
        raise ValueError(
            f"the model's labels {missing[:10]} are not in the manifest's vocabulary ({manifest.source}); "
            "score with a manifest that uses the model's labels"
        )
    multi_hot = np.asarray(manifest.multi_hot(), dtype=np.uint8)
    return multi_hot[:, [vocab.index(x) for x in labels]]


def score_manifest(
    bundle_dir_or_model: Any,
    manifest: Any,
    *,
    tta: str = "none",
    reduce: str = "mean",
    batch_size: int = 64,
    use_ray: bool = True,
    max_actors: int = 1,
    actor_num_cpus: float = 1.0,
    preprocess: Any = None,
    labels: list[str] | None = None,
) -> ScoreResult:
    """Score every image of ``manifest`` (a ``Manifest``) with a bundle dir or an ImageTagger module.

    With a module, pass its ``preprocess`` (PreprocessConfig) and ``labels`` (output order).
    Images that fail to read or decode are listed in ``errors`` (row, uri, reason), never fatal.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got '{tta}'")
    if reduce not in REDUCE_MODES:
        raise ValueError(f"reduce must be one of {REDUCE_MODES}, got '{reduce}'")
    if batch_size < 1 or max_actors < 1:
        raise ValueError(f"batch_size and max_actors must be >= 1, got {batch_size}, {max_actors}")

    if isinstance(bundle_dir_or_model, str | bytes) or hasattr(bundle_dir_or_model, "__fspath__"):
        bundle_dir = str(bundle_dir_or_model)
        model = None
        from mlc_ray.bundle import local_bundle

        with local_bundle(bundle_dir) as bundle:
            preprocess, labels = bundle.preprocess(), bundle.labels()
    else:
        bundle_dir, model = None, bundle_dir_or_model
        if preprocess is None or labels is None:
            raise ValueError(
                "score_manifest(model, ...): pass preprocess= and labels= with an in-memory model"
            )
    targets_all = _targets_for(manifest, list(labels))
    rows = [{"index": i, "uri": uri} for i, uri in enumerate(manifest.images)]
    pre_kwargs = {"preprocess": preprocess.to_dict(), "tta": tta}
    actor_kwargs = {
        "bundle_dir": bundle_dir,
        "model": model,
        "reduce": reduce,
        "num_threads": max(1, int(actor_num_cpus)),
    }

    outputs: list[dict[str, np.ndarray]] = []
    if not rows:
        pass
    elif use_ray:
        import ray

        from mlc_ray.cli import init_ray

        init_ray()
        # [1] rows  [2] read + decode + preprocess in tasks  [3] score in an actor pool
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size + 1, 64)))
        ds = ds.map_batches(
            _preprocess_rows, fn_kwargs=pre_kwargs, batch_size=batch_size, batch_format="numpy"
        )
        ds = ds.map_batches(
            TaggerActor,
            fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=actor_num_cpus,
        )
        # [4] collect
        outputs = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    else:
        actor = TaggerActor(**actor_kwargs)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {
                "index": np.array([r["index"] for r in chunk], dtype=np.int64),
                "uri": np.array([r["uri"] for r in chunk], dtype=object),
            }
            outputs.append(actor(_preprocess_rows(batch, **pre_kwargs)))

    n_labels = len(labels)
    if outputs:
        index = np.concatenate([np.asarray(o["index"], dtype=np.int64) for o in outputs])
        scores = np.concatenate(
            [np.asarray(o["scores"], dtype=np.float32).reshape(-1, n_labels) for o in outputs]
        )
        error = np.concatenate([np.asarray(o["error"], dtype=object) for o in outputs])
    else:
        index = np.zeros(0, dtype=np.int64)
        scores = np.zeros((0, n_labels), dtype=np.float32)
        error = np.zeros(0, dtype=object)
    order = np.argsort(index, kind="stable")
    index, scores, error = index[order], scores[order], error[order]
    ok = np.array([not e for e in error], dtype=bool)
    errors = [(int(i), manifest.images[int(i)], str(e)) for i, e in zip(index[~ok], error[~ok], strict=True)]
    if errors:
        log.warning(
            "scoring: %d of %d images failed, e.g. %s (%s)",
            len(errors),
            len(rows),
            errors[0][1],
            errors[0][2],
        )
    return ScoreResult(
        indices=index[ok],
        scores=scores[ok],
        targets=targets_all[index[ok]],
        labels=list(labels),
        errors=errors,
    )
