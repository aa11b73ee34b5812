"""torchvision's ``resnet18(num_classes=10)`` where torchvision does not import: the same
modules, built in the same order and initialised the same way, so that under the same seed it
holds the same weights (checked against torchvision 0.28: every tensor equal) and runs the same
operators. The GPU benchmark's model (peers.py, overhead.py) without torchvision installed.

    python benchmarks/peers.py --model benchmarks/resnet18.py:resnet18
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # built before the block's own layers, as torchvision's _make_layer does (the order of
        # the random draws), registered after them (the order of modules())
        downsample = None
        if stride != 1 or inputs != planes:
            conv = nn.Conv2d(inputs, planes, 1, stride=stride, bias=False)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes))
        self.conv1 = conv3x3(inputs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)


if __name__ == "__main__":  # `python benchmarks/resnet18.py --help` printed nothing, exit 0
    sys.exit(
        "resnet18.py defines a model and measures nothing: give it to a benchmark, e.g. "
        "python benchmarks/peers.py --model benchmarks/resnet18.py:resnet18"
    )
