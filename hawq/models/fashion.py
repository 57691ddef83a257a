"""The demo network: a small CIFAR-style ResNet for 28x28 grayscale Fashion-MNIST."""

from __future__ import annotations

import torch
from torch import nn

from hawq.models.registry import ModelSpec, register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class FashionResNet(nn.Module):
    """conv3x3 -> 3 stages of BasicBlocks (widths w, 2w, 4w; strides 1, 2, 2) -> avgpool -> fc."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 1, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            layers = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fashion_resnet(num_classes: int = 10, width: int = 16, blocks: int = 1, in_channels: int = 1) -> FashionResNet:
    return FashionResNet(num_classes=num_classes, width=width, blocks=blocks, in_channels=in_channels)


register_model(ModelSpec(
    name="fashion_resnet", builder=fashion_resnet, task="classification", input_shape=(1, 28, 28),
    description="small CIFAR-style ResNet (3 stages, widths 16/32/64) for 28x28 grayscale images",
))
