"""A corpus of "real decoder" models, written the way people write them (no downloads).

Each :class:`Case` holds a model builder, its example inputs, and the exact sets of conv
names the built-in recipes ``decoder_only``, ``post_concat`` and ``post_upsample`` must
select, plus the convs calibration must fit through a following (BatchNorm +) ReLU.
``tests/test_decoder_corpus.py`` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Case", "CASES"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- padded U-Net (milesial style)


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool, self.conv = nn.MaxPool2d(2), DoubleConv(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Upsample, pad to the skip's size (odd sizes), concatenate, DoubleConv."""

    def __init__(self, cin: int, cout: int, bilinear: bool) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cin + cin // 2, cout)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(cin, cout)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class PaddedUNet(nn.Module):
    def __init__(self, bilinear: bool) -> None:
        super().__init__()
        self.inc = DoubleConv(3, 16)
        self.down1, self.down2 = Down(16, 32), Down(32, 64)
        self.up1, self.up2 = Up(64, 32, bilinear), Up(32, 16, bilinear)
        self.outc = nn.Conv2d(16, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        return self.outc(self.up2(self.up1(x3, x2), x1))


_UP_CONVS = {f"up{i}.conv.double_conv.{j}" for i in (1, 2) for j in (0, 3)}
_UP_FIRST = {f"up{i}.conv.double_conv.0" for i in (1, 2)}


# --------------------------------------------------------------------------- pre-activation decoder


class PreActDecoder(nn.Module):
    """FC-DenseNet style: ``cat -> BatchNorm -> ReLU -> conv`` in the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.enc = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.bn_dec, self.fuse = nn.BatchNorm2d(48), nn.Conv2d(48, 16, 3, padding=1)
        self.bn_out, self.refine = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1)
        self.classify = nn.Conv2d(16, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        y = self.mid(F.relu(self.enc(F.relu(s))))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = self.fuse(F.relu(self.bn_dec(torch.cat([y, s], 1))))
        y = self.refine(F.relu(self.bn_out(y)))
        return self.classify(y)


# --------------------------------------------------------------------------- GroupNorm + SiLU up block with a timestep


class ResBlock(nn.Module):
    """Diffusion U-Net block: GN -> SiLU -> conv, plus a projected timestep embedding, GN -> SiLU -> Dropout -> conv."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.drop, self.conv2 = nn.GroupNorm(8, cout), nn.Dropout(0.1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(t))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class TimestepUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tdim = 32
        self.register_buffer("freqs", torch.exp(-torch.arange(self.tdim // 2, dtype=torch.float32) * (8.0 / self.tdim)))
        self.time_mlp = nn.Sequential(nn.Linear(self.tdim, self.tdim), nn.SiLU(), nn.Linear(self.tdim, self.tdim))
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.down_block = ResBlock(16, 16, self.tdim)
        self.downsample = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.mid_block = ResBlock(16, 32, self.tdim)
        self.upsample_conv = nn.Conv2d(32, 32, 3, padding=1)
        self.up_block = ResBlock(32 + 16, 16, self.tdim)
        self.norm_out, self.conv_out = nn.GroupNorm(8, 16), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        angles = timesteps[:, None].to(x.dtype) * self.freqs[None]
        t = self.time_mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))  # not a channel concat
        h0 = self.down_block(self.conv_in(x), t)
        h = self.mid_block(self.downsample(h0), t)
        h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up_block(torch.cat([h, h0], dim=1), t)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- attention-gated skip


class AttentionGate(nn.Module):
    """Oktay et al.: the skip is scaled by a sigmoid map computed from the skip and the gating signal."""

    def __init__(self, cx: int, cg: int, inter: int) -> None:
        super().__init__()
        self.wx, self.wg, self.psi = nn.Conv2d(cx, inter, 1), nn.Conv2d(cg, inter, 1), nn.Conv2d(inter, 1, 1)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return x * torch.sigmoid(self.psi(F.relu(self.wx(x) + self.wg(g))))


class AttentionUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                nn.Hardsigmoid())
        self.gate = AttentionGate(16, 32, 8)
        self.dec = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.enc1(x)
        g = self.up(self.enc2(s))
        g = g * self.se(g)  # channel attention on the upsampled map: a gate, transparent to g
        return self.out(self.dec(torch.cat([self.gate(s, g), g], dim=1)))


# --------------------------------------------------------------------------- FPN detector with final predictors


class TinyFPN(nn.Module):
    def __init__(self, chans: tuple[int, ...], out: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out, 1) for c in chans)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in chans)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        last = self.inner_blocks[-1](feats[-1])
        outs = [self.layer_blocks[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](last))
        return outs


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
            nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()),
        ])
        self.fpn = TinyFPN((16, 32, 64), 32)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.body:
            x = stage(x)
            feats.append(x)
        return self.fpn(feats)


class Tower(nn.Module):
    """A RetinaNet-v1 style head branch: two conv+ReLU, then the predictor (``anchors * k`` outputs)."""

    def __init__(self, c: int, k: int, name: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.pred_name = name
        setattr(self, name, nn.Conv2d(c, 9 * k, 3, padding=1))
        self.k = k

    def forward(self, feats: list[Tensor]) -> Tensor:
        outs = []
        for f in feats:
            o = getattr(self, self.pred_name)(self.conv(f))
            n, _, h, w = o.shape
            outs.append(o.view(n, 9, self.k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, self.k))
        return torch.cat(outs, dim=1)


class DetectionHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classification_head = Tower(32, 3, "cls_logits")
        self.regression_head = Tower(32, 4, "bbox_reg")

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(feats), "bbox_regression": self.regression_head(feats)}


class FPNDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = Backbone(), DetectionHead()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.head(self.backbone(x))


_TOWERS = {f"head.{b}.conv.{j}" for b in ("classification_head", "regression_head") for j in (0, 2)}


# --------------------------------------------------------------------------- Siamese net with a batch-dim concat


class SiameseChange(nn.Module):
    """Change detection: both images through one encoder (batch concat), then a channel fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 16, 3, padding=1)
        self.enc2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(32, 32, 3, padding=1)  # reads a width concat: not a skip fusion
        self.fuse = nn.Conv2d(64, 32, 3, padding=1)
        self.refine = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ea, eb = F.relu(self.enc1(a)), F.relu(self.enc1(b))
        z = F.relu(self.enc2(torch.cat([ea, eb], dim=0)))  # a batch concat: not a skip fusion
        fa, fb = z.chunk(2, dim=0)
        side = self.wide(torch.cat([fa, fb], dim=-1))  # width concat
        fused = F.relu(self.fuse(torch.cat([fa, fb + side[..., : fb.shape[-1]]], dim=1)))
        y = F.relu(self.refine(F.interpolate(fused, scale_factor=2.0, mode="bilinear")))
        return self.out(y)


# --------------------------------------------------------------------------- fx trace diverges from eager


class IsinstanceUp(nn.Module):
    """MONAI BasicUNet's UpCat: concatenates only ``if torch.jit.isinstance(x_e, torch.Tensor)`` (False for a Proxy)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.convs = nn.Sequential(nn.Conv2d(cin + cskip, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                   nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

    def forward(self, x: Tensor, x_e: Tensor) -> Tensor:
        x0 = self.up(x)
        if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor):
            return self.convs(torch.cat([x_e, x0], dim=1))
        return self.convs(x0)


class DivergingTrace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.upcat = IsinstanceUp(32, 16, 16)
        self.final = nn.Conv2d(16, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x0 = self.conv0(x)
        return self.final(self.upcat(self.down(x0), x0))


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One corpus model and what the recipes must select on it (exact sets of conv names)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Tensor, ...]]
    decoder_only: frozenset[str]
    post_concat: frozenset[str]
    post_upsample: frozenset[str]
    relu_fits: frozenset[str] = frozenset()  # decoder_only convs calibration must fit through (BN +) ReLU
    capture: str = "fx"
    final_predictors: frozenset[str] = field(default_factory=frozenset)


def _img(*shape: int, seed: int = 0) -> Callable[[], tuple[Tensor, ...]]:
    return lambda: (torch.randn(*shape, generator=_gen(seed)),)


def _fs(*names: str) -> frozenset[str]:
    return frozenset(names)


CASES: tuple[Case, ...] = (
    Case("padded_unet_bilinear", lambda: PaddedUNet(bilinear=True), _img(1, 3, 38, 38),
         decoder_only=frozenset(_UP_CONVS), post_concat=frozenset(_UP_FIRST), post_upsample=frozenset(_UP_FIRST),
         relu_fits=frozenset(_UP_CONVS), final_predictors=_fs("outc")),
    Case("padded_unet_transposed", lambda: PaddedUNet(bilinear=False), _img(1, 3, 38, 38),
         decoder_only=frozenset(_UP_CONVS), post_concat=frozenset(_UP_FIRST), post_upsample=frozenset(_UP_FIRST),
         relu_fits=frozenset(_UP_CONVS), final_predictors=_fs("outc")),
    Case("preact_decoder", PreActDecoder, _img(1, 3, 16, 16),
         decoder_only=_fs("fuse", "refine"), post_concat=_fs("fuse"), post_upsample=_fs("fuse"),
         relu_fits=_fs("fuse"), final_predictors=_fs("classify")),
    Case("groupnorm_silu_timestep", TimestepUNet,
         lambda: (torch.randn(2, 3, 16, 16, generator=_gen(0)), torch.tensor([3.0, 500.0])),
         decoder_only=_fs("upsample_conv", "up_block.conv1", "up_block.conv2"),
         post_concat=_fs("up_block.conv1"), post_upsample=_fs("upsample_conv"),
         final_predictors=_fs("conv_out")),
    Case("attention_gated_skip", AttentionUNet, _img(1, 3, 16, 16),
         decoder_only=_fs("dec.0", "dec.3"), post_concat=_fs("dec.0"), post_upsample=_fs("dec.0"),
         relu_fits=_fs("dec.0", "dec.3"), final_predictors=_fs("out")),
    Case("fpn_detector", FPNDetector, _img(1, 3, 32, 32),
         decoder_only=frozenset({"backbone.fpn.layer_blocks.0", "backbone.fpn.layer_blocks.1",
                                 "backbone.fpn.layer_blocks.2", *_TOWERS}),
         post_concat=frozenset(), post_upsample=frozenset(), relu_fits=frozenset(_TOWERS),
         final_predictors=_fs("head.classification_head.cls_logits", "head.regression_head.bbox_reg")),
    Case("siamese_batch_concat", SiameseChange,
         lambda: (torch.randn(1, 3, 16, 16, generator=_gen(0)), torch.randn(1, 3, 16, 16, generator=_gen(1))),
         decoder_only=_fs("refine"), post_concat=_fs("fuse"), post_upsample=_fs("refine"),
         relu_fits=_fs("refine"), final_predictors=_fs("out")),
    Case("diverging_trace", DivergingTrace, _img(1, 3, 16, 16),
         decoder_only=_fs("upcat.convs.0", "upcat.convs.3"), post_concat=_fs("upcat.convs.0"),
         post_upsample=_fs("upcat.convs.0"), relu_fits=_fs("upcat.convs.0", "upcat.convs.3"),
         capture="export", final_predictors=_fs("final")),
)
