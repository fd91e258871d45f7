"""torchvision architectures in the registry: MobileNet V2/V3, ResNet-50, ResNeXt-50 (32x4d).

Built with ``weights=None`` (nothing is downloaded; pass ``pretrained=`` a local or s3:// state-dict
file instead). The head ends in dropout + linear to ``num_labels``:

* MobileNet V2 / V3 keep torchvision's classifier (V2: dropout + linear; V3: linear + hardswish +
  dropout + linear) with its last linear sized to ``num_labels``, so torchvision state dicts load as is;
* ResNet / ResNeXt get ``fc = Sequential(Dropout, Linear)``; torchvision's ``fc.weight``/``fc.bias``
  map to ``fc.1.*`` when loading.

``width`` is MobileNet V2's ``width_mult``; the other archs have none (their ``ArchDefaults`` say so and
``create_model`` refuses another width before the constructor runs). All are ImageNet archs: 224 px.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from mlc_ray.models.registry import ArchDefaults, register_model

IMAGENET = ArchDefaults(input_size=224, width=1.0, width_multiplier=False)


def _require_unit_width(arch: str, width: float) -> None:
    IMAGENET.check_width(arch, width)  # constructors called directly (not through create_model)


def _tag(model: nn.Module, head_key: str, legacy_key_map: dict[str, str] | None = None) -> nn.Module:
    model.head_key = head_key
    model.legacy_key_map = legacy_key_map or {}
    return model


@register_model(defaults=ArchDefaults(input_size=224, width=1.0, width_multiplier=True))
def mobilenet_v2(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNet V2; ``width`` is its ``width_mult``."""
    model = tvm.mobilenet_v2(weights=None, num_classes=num_labels, width_mult=width, dropout=dropout)
    return _tag(model, "classifier.1")


@register_model(defaults=IMAGENET)
def mobilenet_v3_large(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNet V3-Large."""
    _require_unit_width("mobilenet_v3_large", width)
    return _tag(tvm.mobilenet_v3_large(weights=None, num_classes=num_labels, dropout=dropout), "classifier.3")


@register_model(defaults=IMAGENET)
def mobilenet_v3_small(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNet V3-Small."""
    _require_unit_width("mobilenet_v3_small", width)
    return _tag(tvm.mobilenet_v3_small(weights=None, num_classes=num_labels, dropout=dropout), "classifier.3")


def _resnet_head(model: tvm.ResNet, num_labels: int, dropout: float) -> nn.Module:
    head = nn.Linear(model.fc.in_features, num_labels)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    model.fc = nn.Sequential(nn.Dropout(dropout), head)
    return _tag(model, "fc.1", {"fc.weight": "fc.1.weight", "fc.bias": "fc.1.bias"})


@register_model(defaults=IMAGENET)
def resnet50(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision ResNet-50 with a dropout + linear head."""
    _require_unit_width("resnet50", width)
    return _resnet_head(tvm.resnet50(weights=None), num_labels, dropout)


@register_model(defaults=IMAGENET)
def resnext50_32x4d(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision ResNeXt-50 32x4d (seed 002's backbone) with a dropout + linear head."""
    _require_unit_width("resnext50_32x4d", width)
    return _resnet_head(tvm.resnext50_32x4d(weights=None), num_labels, dropout)
