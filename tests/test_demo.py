"""The embedded demo U-Net: shape, traceability, determinism, decoder structure, pickling."""

from __future__ import annotations

import io

import pytest
import torch
import torch.fx
from torch import nn

from dsrewrite.demo import DECODER_CHANNELS, demo_unet


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return demo_unet(num_classes=3, seed=0).eval()


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_output_shape(model: nn.Module, hw: tuple[int, int]) -> None:
    with torch.no_grad():
        y = model(torch.randn(1, 3, *hw))
    assert y.shape == (1, 3, *hw)
    assert torch.isfinite(y).all()


def test_fx_traceable_and_equal(model: nn.Module) -> None:
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(x), gm(x)
    err = (ref - got).abs().max().item()
    assert err == 0.0, f"traced graph differs from eager: max error {err}"
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "decoder.blocks.0.conv1.0" in targets and "segmentation_head" in targets


def test_deterministic_for_seed_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = demo_unet(seed=7), demo_unet(seed=7), demo_unet(seed=8)
    assert torch.equal(torch.random.get_rng_state(), before), "demo_unet changed the caller's RNG state"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.blocks.0.conv1.0.weight"], sc["decoder.blocks.0.conv1.0.weight"])
    assert not torch.equal(sa["encoder.conv1.weight"], sc["encoder.conv1.weight"])


def test_decoder_has_exactly_ten_dense_3x3_convs(model: nn.Module) -> None:
    dense = [
        (name, m.in_channels, m.out_channels)
        for name, m in model.decoder.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
        and m.in_channels >= 16 and m.out_channels >= 16
    ]
    assert len(dense) == 10, dense
    assert [o for _, _, o in dense] == [c for c in DECODER_CHANNELS for _ in range(2)]
    # skips (256, 128, 64, 64, none) concatenated before each block's first conv
    assert [i for _, i, _ in dense[::2]] == [512 + 256, 256 + 128, 128 + 64, 64 + 64, 32]
    assert [n for n, _ in model.named_children()] == ["encoder", "decoder", "segmentation_head"]
    head = model.segmentation_head
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (3, 3) and head.out_channels == 3


def test_encoder_matches_torchvision_resnet18_layout(model: nn.Module) -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    enc_shapes = {k: v.shape for k, v in model.encoder.state_dict().items()}
    assert enc_shapes == ref_shapes


def test_pickle_round_trip(model: nn.Module) -> None:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_rejects_bad_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        demo_unet(num_classes=bad)  # type: ignore[arg-type]
