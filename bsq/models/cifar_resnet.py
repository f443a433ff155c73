"""CIFAR ResNet-20/32/56 (and the tiny ResNet-8 of the embedded default) in the bearpaw layout (spec §7.1).

Module names and state-dict keys match the official BSQ checkpoints (after stripping `module.`), so the
authors' FP ResNet-20 loads strictly. Built in float form; `bsq.quant.convert.quantize_model` makes it BSQ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bsq.quant.act import ActQuant


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-act-Q, conv-bn, (+ shortcut), act-Q; option-B 1x1 shortcut when the shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, act_bits: int | None = 4) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = ActQuant(act_bits)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = ActQuant(act_bits)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class GlobalAvgPool(nn.Module):
    """Average over the whole feature map with `avg_pool2d` (the authors' `AvgPool2d(8)` on CIFAR), not
    `AdaptiveAvgPool2d(1)`: the two round differently in the last bit, enough to leave the authors' trajectory
    after a few steps (the 4-bit activations amplify such differences; official_trajectories.json)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, x.shape[-2:])


class CifarResNet(nn.Module):
    """Post-activation CIFAR ResNet v1; depth = 6n + 2."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        act_bits: int | None = 4,
        stem_act_bits: int | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # HEAD: plain unbounded ReLU, unquantized; the paper-era code used ReLU6 + 8 bits (spec §4.4, P5).
        self.relu = ActQuant(stem_act_bits)
        self.inplanes = width
        self.layer1 = self._make_layer(width, n, 1, act_bits)
        self.layer2 = self._make_layer(2 * width, n, 2, act_bits)
        self.layer3 = self._make_layer(4 * width, n, 2, act_bits)
        self.avgpool = GlobalAvgPool()  # the authors' AvgPool2d(8) on 32x32 inputs; also fits 8x8 digits
        self.fc = nn.Linear(4 * width, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, act_bits: int | None) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride, act_bits)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, 1, act_bits) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """bearpaw init: N(0, sqrt(2 / (k k out))) for 3x3 convs, BN gamma 1 / beta 0 (spec §7.1)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and "downsample" not in name:
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
