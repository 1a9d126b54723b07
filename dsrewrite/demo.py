# SPDX-License-Identifier: Apache-2.0
"""The demo models: ``demo`` (a small U-Net trained on generated shapes, :mod:`dsrewrite.shapes`) and
``demo:resnet18``, defined here: a U-Net with a ResNet18 encoder, random seeded weights, no download.

The layout mirrors ``segmentation_models_pytorch.Unet("resnet18")``: an encoder
returning six feature maps (strides 1, 2, 4, 8, 16, 32), a decoder of five blocks
(nearest 2× upsample → concatenate the skip → conv3×3+BN+ReLU → conv3×3+BN+ReLU;
the last block has no skip) with ``decoder_channels = (256, 128, 64, 32, 16)``, and
a 3×3 segmentation head. The top-level children are ``encoder``, ``decoder`` and
``segmentation_head``, so a ``decoder_only`` recipe selects exactly the ten 3×3
convs of the decoder. Every class is defined at module level (``torch.save(model)``
pickles reload) and the model is ``torch.fx`` symbolic-traceable. Inputs need
H and W divisible by 32.

Example:
    >>> import torch
    >>> model = demo_unet(num_classes=3).eval()
    >>> model(torch.randn(1, 3, 64, 96)).shape
    torch.Size([1, 3, 64, 96])
    >>> sorted(name for name, _ in model.named_children())
    ['decoder', 'encoder', 'segmentation_head']
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = [
    "build_demo",
    "demo_defaults",
    "demo_unet",
    "DemoUnet",
    "ResNet18Encoder",
    "UnetDecoder",
    "UnetDecoderBlock",
    "Conv2dBNReLU",
    "DECODER_CHANNELS",
    "ENCODER_CHANNELS",
]

#: Channels of the six encoder feature maps, strides 1, 2, 4, 8, 16, 32 (input first).
ENCODER_CHANNELS: tuple[int, ...] = (3, 64, 64, 128, 256, 512)
#: Output channels of the five decoder blocks (as in segmentation_models_pytorch).
DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)


class Conv2dBNReLU(nn.Sequential):
    """conv k×k (no bias) → BatchNorm2d → ReLU, as smp's ``Conv2dReLU``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ResNet18Encoder(nn.Module):
    """The layers of ``torchvision.models.resnet18(weights=None)`` without pool and fc.

    ``forward`` returns ``[x, f2, f4, f8, f16, f32]`` with :data:`ENCODER_CHANNELS` channels.
    """

    def __init__(self) -> None:
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.conv1 = r.conv1
        self.bn1 = r.bn1
        self.relu = r.relu
        self.maxpool = r.maxpool
        self.layer1 = r.layer1
        self.layer2 = r.layer2
        self.layer3 = r.layer3
        self.layer4 = r.layer4

    def forward(self, x: Tensor) -> list[Tensor]:
        f2 = self.relu(self.bn1(self.conv1(x)))
        f4 = self.layer1(self.maxpool(f2))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return [x, f2, f4, f8, f16, f32]


class UnetDecoderBlock(nn.Module):
    """Nearest 2× upsample → concatenate the skip (if any) → two conv3×3+BN+ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = Conv2dBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """Five :class:`UnetDecoderBlock` s from the stride-32 map up to full resolution."""

    def __init__(
        self,
        encoder_channels: tuple[int, ...] = ENCODER_CHANNELS,
        decoder_channels: tuple[int, ...] = DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        skips = tuple(reversed(encoder_channels[1:-1])) + (0,)  # (256, 128, 64, 64, 0)
        ins = (encoder_channels[-1],) + tuple(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            UnetDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels)
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        skips = [features[4], features[3], features[2], features[1]]
        x = features[5]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class DemoUnet(nn.Module):
    """encoder → decoder → 3×3 segmentation head; output ``(N, num_classes, H, W)``."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = ResNet18Encoder()
        self.decoder = UnetDecoder()
        self.segmentation_head = nn.Conv2d(DECODER_CHANNELS[-1], num_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def _randomise(model: nn.Module) -> None:
    """Variance-preserving conv init and mildly non-trivial BatchNorm (so BN folding matters)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not name.startswith("encoder."):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.01)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0.0, 0.05)
                m.running_mean.normal_(0.0, 0.05)
                m.running_var.uniform_(0.8, 1.2)


def demo_unet(num_classes: int = 2, *, seed: int = 0) -> nn.Module:
    """Build the demo U-Net (ResNet18 encoder) with random weights drawn from ``seed``.

    The global RNG state of the caller is left untouched. Input H and W must be
    divisible by 32.

    Example:
        >>> import torch
        >>> a, b = demo_unet(seed=1), demo_unet(seed=1)
        >>> torch.equal(a.decoder.blocks[0].conv1[0].weight, b.decoder.blocks[0].conv1[0].weight)
        True
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"demo_unet: num_classes must be an int >= 1, got {num_classes!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoUnet(num_classes)
        _randomise(model)
    return model


def build_demo(spec: str) -> nn.Module:
    """The demo model ``spec`` names (:data:`dsrewrite.io.arch_spec.DEMO_MODELS`): ``"demo"`` is the trained shapes U-Net (eval
    mode), ``"demo:resnet18"`` the random-weight ResNet18 U-Net (train mode, as constructed).

    Raises:
        KeyError: ``spec`` is not a demo name.

    Example:
        >>> type(build_demo("demo")).__name__, type(build_demo("demo:resnet18")).__name__
        ('ShapesUnet', 'DemoUnet')
    """
    if spec == "demo":
        from .shapes import trained_unet

        return trained_unet()
    if spec == "demo:resnet18":
        return demo_unet()
    raise KeyError(spec)


def demo_defaults(spec: str) -> tuple[Optional[Any], Optional[tuple[int, ...]]]:
    """What a demo brings besides its model: ``(task metric, example input shape)``. The trained ``"demo"``
    has labelled held-out data (its mIoU) and a natural size (1×3×128×128); ``"demo:resnet18"`` neither.

    Example:
        >>> demo_defaults("demo:resnet18")
        (None, None)
        >>> demo_defaults("demo")[1]
        (1, 3, 128, 128)
    """
    if spec != "demo":
        return None, None
    from .shapes import demo_task_metric

    return demo_task_metric(), (1, 3, 128, 128)
