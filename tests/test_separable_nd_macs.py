"""MACs of the N-d, grouped and transposed blocks, as each kind counts them, against FlopCounterMode (FLOPs = 2×MACs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsrewrite.kinds import get_kind
from dsrewrite.planning.capture import capture
from dsrewrite.planning.planner import resolve_config
from dsrewrite.planning.types import LayerConfig

CASES = [
    (nn.Conv1d(16, 24, 5, stride=2, padding=2), (2, 16, 40)),
    (nn.Conv3d(8, 16, 3, padding=1), (1, 8, 8, 8, 8)),
    (nn.Conv3d(8, 4, (3, 1, 3), stride=(2, 1, 1), dilation=(1, 1, 2), bias=False), (1, 8, 9, 6, 10)),
    (nn.Conv2d(32, 48, 3, groups=4, padding=1), (1, 32, 12, 12)),
    (nn.ConvTranspose1d(12, 8, 4, stride=2, padding=1), (1, 12, 15)),
    (nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), (1, 16, 7, 7)),
    (nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=2), (1, 16, 6, 6)),
    (nn.ConvTranspose3d(8, 8, 2, stride=2, bias=False), (1, 8, 4, 4, 4)),
]


def flop_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
@pytest.mark.parametrize("conv,shape", CASES, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_kind_macs_match_flop_counter(conv, shape, order):
    torch.manual_seed(0)
    x = torch.randn(shape)
    fact = capture(nn.Sequential(conv), x).facts[0]
    kind = get_kind(order)
    for m in (1, 2, 5):
        block = kind.build(conv, LayerConfig(order=order, depth_multiplier=m))
        counted, measured = kind.macs(fact, m), flop_macs(block, x)
        assert counted == measured, f"{order} m={m} {conv}: kind counts {counted:,}, FlopCounterMode {measured:,}"
        n = sum(p.numel() for p in block.parameters())
        assert kind.params(fact, m) == n, f"{order} m={m}: kind says {kind.params(fact, m)} params, block has {n}"


def test_auto_counts_the_low_resolution_of_pointwise_first_transposed():
    """ConvTranspose2d(k=4, s=2): pw_dw runs both stages before the upsampling, so auto picks it."""
    up = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
    x = torch.randn(1, 64, 16, 16)
    fact = capture(nn.Sequential(up), x).facts[0]
    dw, pw = get_kind("dw_pw").macs(fact, 1), get_kind("pw_dw").macs(fact, 1)
    # pw_dw: (64·32 + 16·32) per input pixel; dw_pw: 16·64 per input pixel + 64·32 per output pixel (4× as many)
    assert pw == 256 * (64 * 32 + 16 * 32) and dw == 256 * 16 * 64 + 1024 * 64 * 32
    cfg = resolve_config(fact, up, order="auto", depth_multiplier=1, energy=None, init="svd")
    assert cfg.order == "pw_dw" and "fewer MACs" in cfg.note, cfg.note
    dense = flop_macs(up, x)
    assert dense / pw > 10, f"dense {dense:,} vs pw_dw {pw:,}"
