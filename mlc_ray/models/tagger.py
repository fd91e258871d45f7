"""ImageTagger: the deployable module — uint8 NHWC pixels in, logits out, normalisation inside.

Pixels travel as uint8 NHWC everywhere (Ray Data blocks, train batches, the ONNX input), so the
model does the float conversion and normalisation on its own device. ``x.float().permute(0, 3, 1, 2)``
is an NCHW view whose memory is channels-last, the fast layout for convolutions on GPUs.

Normalisation follows ``PreprocessConfig.normalization`` (mlc_ray.data.images):

* ``imagenet``: ``(x / 255 - mean) / std`` per channel;
* ``per_image``: per-image standardisation as in seed 000 / ``tf.image.per_image_standardization``:
  ``(x - mean) / max(std, 1 / sqrt(N))`` with mean and (population) std over C, H, W of the raw
  0..255 pixel values and N = C * H * W.

Only plain elementwise ops and reductions are used, so the module exports to ONNX (opset 17, dynamic
batch); ``with_sigmoid()`` gives the export wrapper whose output is probabilities.

``model.json`` (``model_spec``) plus ``preprocess.json`` rebuild the same module anywhere
(``build_tagger``); ``model.pt`` is this module's state dict (backbone weights under ``backbone.``;
the normalisation constants are not persisted, they come from preprocess.json).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mlc_ray.models.registry import create_model

NORMALIZATIONS = ("imagenet", "per_image")
MODEL_SPEC_KEYS = ("arch", "num_labels", "width", "dropout")


def _as_preprocess(preprocess: Any) -> Any:
    """Accept a PreprocessConfig or its dict form (preprocess.json)."""
    if isinstance(preprocess, Mapping):
        from mlc_ray.data.images import PreprocessConfig

        return PreprocessConfig.from_dict(dict(preprocess))
    return preprocess


class ImageTagger(nn.Module):
    """``forward(x: uint8 [B, H, W, 3] RGB) -> logits [B, L]``; wraps a registry backbone."""

    def __init__(self, backbone: nn.Module, preprocess: Any) -> None:
        super().__init__()
        preprocess = _as_preprocess(preprocess)
        normalization = str(preprocess.normalization)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"preprocess normalization {normalization!r} is not supported; use one of {NORMALIZATIONS}"
            )
        self.backbone = backbone
        self.preprocess = preprocess
        self.normalization = normalization
        mean = torch.tensor([float(v) for v in preprocess.mean], dtype=torch.float32)
        std = torch.tensor([float(v) for v in preprocess.std], dtype=torch.float32)
        if mean.numel() != 3 or std.numel() != 3 or not bool((std > 0).all()):
            raise ValueError(f"preprocess mean/std must be 3 values each with std > 0, got {mean}, {std}")
        # On the 0..255 scale: (x - 255 mean) / (255 std) is (x/255 - mean)/std with one op less,
        # computed exactly as normalize_batch_numpy does. Not persistent: model.pt holds only
        # weights; the constants come from preprocess.json.
        self.register_buffer("mean", mean.view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 NHWC -> float32 NCHW (channels-last memory), normalised."""
        x = x.float().permute(0, 3, 1, 2)
        if self.normalization == "imagenet":
            return (x - self.mean) / self.std
        n = x.shape[1] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centred = x - mean
        std = centred.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        return centred / std.clamp(min=1.0 / math.sqrt(n))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.normalize(x))

    def with_sigmoid(self) -> TaggerProbabilities:
        """This tagger wrapped to output sigmoid probabilities (what ONNX export and tagging use)."""
        return TaggerProbabilities(self)


class TaggerProbabilities(nn.Module):
    """``forward(uint8 NHWC) -> sigmoid(logits)``, the exported ``probabilities`` output."""

    def __init__(self, tagger: ImageTagger) -> None:
        super().__init__()
        self.tagger = tagger
        # Same mode as the tagger: exporters restore the *wrapper's* mode recursively afterwards, so
        # a wrapper left in training mode would flip an eval-mode tagger (BatchNorm, dropout) to train.
        self.train(tagger.training)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.tagger(x))


def model_spec(arch: str, num_labels: int, *, width: float = 1.0, dropout: float = 0.2) -> dict[str, Any]:
    """The ``model.json`` content that rebuilds this model with ``build_tagger``."""
    return {
        "arch": str(arch),
        "num_labels": int(num_labels),
        "width": float(width),
        "dropout": float(dropout),
    }


def build_tagger(
    model_json: Mapping[str, Any], preprocess: Any, *, pretrained: str | None = None
) -> ImageTagger:
    """Rebuild the ImageTagger described by ``model.json`` (see ``model_spec``) and ``preprocess``.

    Weights are freshly initialised (load ``model.pt`` into the result) unless ``pretrained`` names a
    backbone/tagger state-dict file.
    """
    missing = [k for k in ("arch", "num_labels") if k not in model_json]
    unknown = sorted(set(model_json) - set(MODEL_SPEC_KEYS))
    if missing or unknown:
        raise ValueError(
            f"model.json: missing keys {missing}, unknown keys {unknown}; expected {list(MODEL_SPEC_KEYS)}"
        )
    backbone = create_model(
        str(model_json["arch"]),
        int(model_json["num_labels"]),
        width=float(model_json.get("width", 1.0)),
        dropout=float(model_json.get("dropout", 0.2)),
        pretrained=pretrained,
    )
    return ImageTagger(backbone, preprocess)
