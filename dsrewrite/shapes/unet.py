# SPDX-License-Identifier: Apache-2.0
"""The demo's trained model: a small U-Net with a ResNet-style encoder (the seed notes' shape).

A 3×3 stem (16 channels), three residual stages (BasicBlocks, stride 2, 32/64/128
channels), a decoder of three blocks (nearest 2× upsample → concatenate the skip → two
conv3×3 + BN + ReLU; 64/32/16 channels) and a 3×3 segmentation head. Top-level children
are ``encoder``, ``decoder`` and ``segmentation_head``, as in smp, so ``decoder_only``
selects the six decoder convs and ``all_3x3`` twelve (stem and head stay dense).
Input ``(N, 3, H, W)`` with H, W divisible by 8; output logits ``(N, 4, H, W)``.

Example:
    >>> m = ShapesUnet().eval()
    >>> m(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 4, 64, 64])
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import NUM_CLASSES

__all__ = ["ShapesUnet", "WIDTHS", "DECODER"]

WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
DECODER: tuple[int, ...] = (64, 32, 16)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet BasicBlock with a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += idt
        return self.relu(out)


class Encoder(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0])
        self.layer1 = BasicBlock(widths[0], widths[1], 2)
        self.layer2 = BasicBlock(widths[1], widths[2], 2)
        self.layer3 = BasicBlock(widths[2], widths[3], 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = self.stem(x)
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        return [f1, f2, f3, self.layer3(f3)]


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin + skip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class Decoder(nn.Module):
    def __init__(self, widths: list[int], channels: list[int]) -> None:
        super().__init__()
        ins = [widths[3]] + channels[:-1]
        skips = [widths[2], widths[1], widths[0]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, channels))

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(x, skip)
        return x


class ShapesUnet(nn.Module):
    """The benchmark U-Net; input ``(N, 3, H, W)`` with H, W divisible by 8; output logits ``(N, 4, H, W)``."""

    def __init__(self, widths: Optional[list[int]] = None, decoder: Optional[list[int]] = None,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        widths = widths or list(WIDTHS)
        decoder = decoder or list(DECODER)
        self.encoder = Encoder(widths)
        self.decoder = Decoder(widths, decoder)
        self.segmentation_head = nn.Conv2d(decoder[-1], num_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))
