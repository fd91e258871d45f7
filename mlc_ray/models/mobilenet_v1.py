"""MobileNet V1 (Howard et al., 2017), written from the paper's Table 1 (seed 001).

A 3x3 stride-2 convolution with 32 filters, then 13 depthwise-separable blocks (3x3 depthwise conv,
then 1x1 pointwise conv, each followed by BatchNorm and ReLU), global average pooling, and a head of
dropout + linear. The width multiplier alpha scales every layer's channel count. At 224x224 with
1000 outputs and alpha = 1 this is the paper's 4.2M parameters and 569M multiply-adds (Table 8).

Table 1 prints the last depthwise layer as "s2" on a 7x7 input; the feature map stays 7x7 and the
average pool is 7x7, so its stride is 1 (as every reference implementation has it).
"""

from __future__ import annotations

from torch import Tensor, nn

from mlc_ray.models.registry import ArchDefaults, register_model

# (pointwise output channels, depthwise stride) of the 13 depthwise-separable blocks, Table 1.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
STEM_CHANNELS = 32


def scaled_channels(channels: int, width: float) -> int:
    """alpha * M, rounded, at least 1 (alpha = 0.25/0.5/0.75 give the paper's exact counts)."""
    return max(1, int(round(channels * width)))


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BatchNorm follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (stride s) + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (Figure 3)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(
            ConvBNReLU(in_ch, in_ch, 3, stride, groups=in_ch),
            ConvBNReLU(in_ch, out_ch, 1),
        )


class MobileNetV1(nn.Module):
    """MobileNet V1 body (Table 1) with a dropout + linear multi-label head; returns logits."""

    head_key = "classifier.1"  # the final nn.Linear, for pretrained loading / re-init
    legacy_key_map: dict[str, str] = {}

    def __init__(self, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        channels = scaled_channels(STEM_CHANNELS, width)
        layers: list[nn.Module] = [ConvBNReLU(3, channels, 3, stride=2)]
        for out, stride in BLOCKS:
            out_ch = scaled_channels(out, width)
            layers.append(DepthwiseSeparable(channels, out_ch, stride))
            channels = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_labels))
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


@register_model(defaults=ArchDefaults(input_size=224, width=1.0, width_multiplier=True))
def mobilenet_v1(*, num_labels: int, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """MobileNet V1 from the paper; ``width`` is the width multiplier alpha."""
    return MobileNetV1(num_labels, width=width, dropout=dropout)
