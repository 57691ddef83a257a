"""SqueezeNext (Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", CVPR-W 2018).

A block squeezes the channels twice with 1x1 convolutions, applies a separable 1x3 then 3x1
convolution and expands back with a 1x1 convolution, plus a residual connection (projected by a
1x1 convolution when the shape changes). The network is a 7x7 stem, four stages of blocks with
widths 32/64/128/256 (times the width multiplier), a 1x1 conv to 128 channels, global average
pooling and a linear classifier. "23" has 6/6/8/1 blocks per stage; "23v5" moves blocks to the
lower-resolution stages (2/4/14/1), which the paper found faster on its accelerator at equal depth.

Layout and parameter counts follow the published ImageNet models (biased convolutions + BN, as in
the imgclsmob port of the authors' Caffe models); the variant names are the paper's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawq import HawqError
from hawq.models.checkpoint import load_checkpoint
from hawq.models.registry import ModelSpec, register_model

STAGE_WIDTHS = (32, 64, 128, 256)
STEM_WIDTH, HEAD_WIDTH = 64, 128
BLOCKS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}
# paper name -> (width multiplier, depth version)
VARIANTS: dict[str, tuple[float, str]] = {
    f"{w}-SqNxt-{d}": (float(w), d) for w in ("1.0", "1.5", "2.0") for d in ("23", "23v5")
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)


class SqueezeNextBlock(nn.Module):
    """Two-stage squeeze (1x1, 1x1), separable 1x3 + 3x1, 1x1 expansion, residual add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        # the first block of a downsampling stage keeps all input channels in its squeeze (the paper's
        # Fig. 1 with reduction 1); a block narrowing the width squeezes harder (1/4)
        if stride == 2:
            squeeze = cin
        elif cin > cout:
            squeeze = cin // 4
        else:
            squeeze = cin // 2
        self.squeeze1 = ConvBNReLU(cin, squeeze, 1, stride)
        self.squeeze2 = ConvBNReLU(squeeze, squeeze // 2, 1)
        self.conv1x3 = ConvBNReLU(squeeze // 2, squeeze, (1, 3), padding=(0, 1))
        self.conv3x1 = ConvBNReLU(squeeze, squeeze, (3, 1), padding=(1, 0))
        self.expand = ConvBNReLU(squeeze, cout, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = ConvBNReLU(cin, cout, 1, stride)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.expand(self.conv3x1(self.conv1x3(self.squeeze2(self.squeeze1(x)))))
        return self.relu(out + identity)


class SqueezeNext(nn.Module):
    def __init__(self, width: float = 1.0, depth: str = "23", num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise HawqError(f"SqueezeNext depth '{depth}' unknown; known: {', '.join(BLOCKS)}")
        stem = int(STEM_WIDTH * width)
        self.stem = ConvBNReLU(in_channels, stem, 7, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        stages, cin = [], stem
        for i, (base, n) in enumerate(zip(STAGE_WIDTHS, BLOCKS[depth])):
            cout = int(base * width)
            blocks = []
            for j in range(n):
                blocks.append(SqueezeNextBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = ConvBNReLU(cin, int(HEAD_WIDTH * width), 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(int(HEAD_WIDTH * width), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(torch.flatten(self.avgpool(self.head(x)), 1))


def squeezenext(num_classes: int = 1000, variant: str = "1.0-SqNxt-23", checkpoint: str | None = None,
                weights: str | None = None, in_channels: int = 3, **kwargs: Any) -> SqueezeNext:
    """Build a paper variant by name, e.g. ``1.0-SqNxt-23``, ``1.0-SqNxt-23v5``, ``2.0-SqNxt-23``."""
    if weights:
        raise HawqError("squeezenext has no downloadable weights; set model.checkpoint to a local file")
    if kwargs:
        raise HawqError(f"squeezenext: unknown model.kwargs '{sorted(kwargs)[0]}'; known: variant, in_channels")
    if variant not in VARIANTS:
        raise HawqError(f"SqueezeNext variant '{variant}' unknown; known: {', '.join(VARIANTS)}")
    width, depth = VARIANTS[variant]
    model = SqueezeNext(width, depth, num_classes, in_channels)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


register_model(ModelSpec(
    name="squeezenext", builder=squeezenext, task="classification", input_shape=(3, 227, 227),
    default_pins={"stem.conv": {"weight": 8, "activation": 8}, "fc": {"weight": 8, "activation": 8}},
    description="SqueezeNext (model.kwargs.variant: 1.0-SqNxt-23 [default], 1.0-SqNxt-23v5, 1.5-/2.0-...)",
))
