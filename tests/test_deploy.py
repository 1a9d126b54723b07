"""Deployment forms: BN folding, channels_last, ONNX parity, torch.compile; and what must not change."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.deploy import bn as deploy_bn, onnx as deploy_onnx
from dsrewrite.deploy import (
    DeployInputError,
    OnnxResult,
    ParityError,
    export_onnx,
    find_conv_bn_pairs,
    fold_batchnorm,
    prepare_for_deployment,
    to_channels_last,
)
from dsrewrite.errors import OutputError
from dsrewrite.layers import DepthwiseSeparableConv2d

REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (fresh BNs are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor], list[bool]]:
    return (
        [f"{n}:{type(m).__name__}" for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    names, state, flags = snapshot(model)
    assert names == before[0], "the caller's module tree changed"
    assert state.keys() == before[1].keys(), "the caller's state_dict keys changed"
    for k in state:
        assert torch.equal(state[k], before[1][k]), f"the caller's {k} changed"
    assert flags == before[2], "the caller's train/eval flags changed"


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = REL_TOL[ref.dtype] * max(scale, 1e-30)
    assert err <= tol, f"{what}: max |Δ| = {err:.3g} > {tol:.3g} (max |ref| = {scale:.3g})"


def conv_bn_relu(cin: int, cout: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU())


def swap_3x3(seq: nn.Sequential, **kw) -> None:
    seq[0] = DepthwiseSeparableConv2d.from_conv(seq[0], **kw)


# --------------------------------------------------------------------------------------
# Plain conv + BN
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_plain_conv_bn_keeps_outputs(bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = randomise_bn(nn.Sequential(conv_bn_relu(3, 8, bias), conv_bn_relu(8, 16, bias))).to(dtype).eval()
    before = snapshot(net)
    folded = fold_batchnorm(net)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        assert_close(folded(x), net(x), f"fold plain conv+BN ({dtype}, bias={bias})")
    assert (n_bn(net), n_bn(folded)) == (2, 0)
    assert isinstance(folded[0][1], nn.Identity) and folded[0][0].bias is not None
    assert folded[0][0].weight.dtype == dtype
    assert_unchanged(net, before)


def test_fold_inplace_mutates_and_returns_same_object() -> None:
    net = randomise_bn(conv_bn_relu(3, 4)).eval()
    out = fold_batchnorm(net, inplace=True)
    assert out is net and n_bn(net) == 0


def test_fold_via_fx_in_custom_forward() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.skip_conv, self.skip_bn = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x))) + self.skip_bn(self.skip_conv(x))

    torch.manual_seed(1)
    net = randomise_bn(Block()).eval()
    pairs = find_conv_bn_pairs(net)
    assert {(p.conv, p.bn, p.via) for p in pairs} == {("conv", "bn", "fx"), ("skip_conv", "skip_bn", "fx")}
    folded = fold_batchnorm(net)
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        assert_close(folded(x), net(x), "fold through fx")
    assert n_bn(folded) == 0


def test_untraceable_parent_falls_back_to_sequential_children() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = randomise_bn(conv_bn_relu(3, 5))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.body(x)
            return self.body(-x)

    net = DataDependent().eval()
    assert deploy_bn._trace(net) is None
    assert [(p.conv, p.bn, p.via) for p in find_conv_bn_pairs(net)] == [("body.0", "body.1", "sequential")]


# --------------------------------------------------------------------------------------
# Depthwise-separable blocks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
@pytest.mark.parametrize("mid_act", [None, "relu"])
def test_fold_dsconv_last_stage_and_mid_norm(order: str, mid_act) -> None:
    torch.manual_seed(2)
    block = DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=False, order=order, depth_multiplier=2,
                                     mid_norm="batchnorm", mid_act=mid_act)
    net = randomise_bn(nn.Sequential(block, nn.BatchNorm2d(10), nn.ReLU())).double().eval()
    pairs = find_conv_bn_pairs(net)
    first, last = ("depthwise", "pointwise") if order == "dw_pw" else ("pointwise", "depthwise")
    assert {(p.conv, p.bn) for p in pairs} == {(f"0.{first}", "0.mid_norm"), (f"0.{last}", "1")}
    folded = fold_batchnorm(net)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert_close(folded(x), net(x), f"fold dsconv {order} mid_act={mid_act}")
    assert n_bn(folded) == 0
    assert folded[0].mid_norm_kind is None and net[0].mid_norm_kind == "batchnorm"
    assert folded[0].is_linear == (mid_act is None)


@pytest.fixture(scope="module")
def rewritten_unet() -> nn.Module:
    """smp Unet-resnet18 (random weights, random BN statistics), decoder 3×3 convs swapped by hand.

    One decoder conv uses ``pw_dw`` (the order ``auto`` picks after a concat) to cover both orders.
    """
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = randomise_bn(smp.Unet("resnet18", encoder_weights=None, classes=2)).eval()
    for i, blk in enumerate(model.decoder.blocks):
        swap_3x3(blk.conv1, order="pw_dw" if i == 0 else "dw_pw")
        swap_3x3(blk.conv2)
    return model


def test_fold_rewritten_unet_keeps_outputs(rewritten_unet: nn.Module) -> None:
    model = rewritten_unet
    before = snapshot(model)
    folded = fold_batchnorm(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(folded(x), model(x), "fold rewritten Unet")
    assert n_bn(model) == 30 and n_bn(folded) == 0
    assert type(folded) is type(model)
    assert folded.decoder.blocks[0].conv1[0].depthwise.bias is not None  # pw_dw: last stage is depthwise
    assert folded.decoder.blocks[1].conv1[0].pointwise.bias is not None
    assert_unchanged(model, before)


def test_channels_last_keeps_outputs(rewritten_unet: nn.Module) -> None:
    model = rewritten_unet
    before = snapshot(model)
    cl = to_channels_last(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
        got = cl(x.to(memory_format=torch.channels_last))
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"channels_last: max |Δ| = {err:.3g} (max |ref| = {scale:.3g})"
    # (a depthwise k×k or a 1×1 weight is contiguous in both formats; a dense 7×7 one is not)
    assert cl.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_unchanged(model, before)


def test_prepare_for_deployment(rewritten_unet: nn.Module) -> None:
    model = copy.deepcopy(rewritten_unet).train()
    before = snapshot(model)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    dep = prepare_for_deployment(model, x)
    assert not dep.training and n_bn(dep) == 0
    # block 0's first conv is pw_dw after upsample + concat: its pointwise stage is hoisted
    hoisted = [n for n, m in dep.named_modules() if isinstance(m, torch.fx.GraphModule)]
    assert hoisted == ["decoder.blocks.0"], hoisted
    assert type(model.decoder.blocks[0]).__name__ == "UnetDecoderBlock"  # the caller's model is untouched
    assert not any(isinstance(m, torch.fx.GraphModule) for m in prepare_for_deployment(model, x, hoist=False).modules())
    assert dep.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model.eval()(x)
        got = dep(x.to(memory_format=torch.channels_last))
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"deployment form: max |Δ| = {err:.3g} (max |ref| = {scale:.3g})"
    model.train()
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------
# Declines (output unchanged)
# --------------------------------------------------------------------------------------
def test_training_mode_bn_is_refused_and_model_untouched() -> None:
    net = randomise_bn(conv_bn_relu(3, 4)).train()
    before = snapshot(net)
    with pytest.raises(DeployInputError, match=r"'1'.*training mode.*model.eval\(\)"):
        fold_batchnorm(net)
    with pytest.raises(DeployInputError):
        fold_batchnorm(net, inplace=True)
    assert_unchanged(net, before)


class StdConv(nn.Conv2d):
    """Weight-standardised conv: scaling its weight rows would be undone by its own forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is needed unnormalised too


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),  # activation in between
        lambda: nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)),  # conv with its own forward
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),  # no stats
        ConvUsedTwice,
        SharedBN,
    ],
    ids=["act-between", "own-forward", "no-running-stats", "conv-output-reused", "bn-called-twice"],
)
def test_unsafe_pairs_are_not_folded(make) -> None:
    torch.manual_seed(6)
    net = randomise_bn(make()).eval()
    before = snapshot(net)
    assert find_conv_bn_pairs(net) == []
    folded = fold_batchnorm(net)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(folded(x), net(x))
    assert n_bn(folded) == n_bn(net)
    assert_unchanged(net, before)


def test_shared_conv_module_is_not_folded() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(3)), nn.Sequential(conv, nn.BatchNorm2d(3))).eval()
    assert find_conv_bn_pairs(net) == []


# --------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_rewritten() -> nn.Module:
    torch.manual_seed(7)
    net = nn.Sequential(conv_bn_relu(3, 16), conv_bn_relu(16, 32), nn.Upsample(scale_factor=2.0), conv_bn_relu(32, 8))
    for i, seq in enumerate((net[1], net[3])):
        swap_3x3(seq, order="pw_dw" if i else "dw_pw")
    return randomise_bn(net).eval()


def test_onnx_parity_on_rewritten_model(small_rewritten: nn.Module, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    before = snapshot(small_rewritten)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    path = tmp_path / "small.onnx"
    res = export_onnx(fold_batchnorm(small_rewritten), x, path)
    assert isinstance(res, OnnxResult) and res.checked and res.provider == "CPUExecutionProvider"
    assert res.max_abs_diff is not None and res.tolerance is not None
    assert res.max_abs_diff <= res.tolerance, f"ORT vs eager: max |Δ| = {res.max_abs_diff:.3g} > {res.tolerance:.3g}"
    assert res.tolerance <= 1e-4 * res.max_abs_output + 1e-5 + 1e-12
    assert os.path.exists(path) and os.listdir(tmp_path) == ["small.onnx"], "temporary files left behind"
    assert res.opset >= 17
    assert_unchanged(small_rewritten, before)


def test_onnx_parity_failure_raises_and_writes_nothing(small_rewritten: nn.Module, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    real = deploy_onnx._run_ort

    def off_by_a_bit(path, args):
        outs, provider = real(path, args)
        return [o + 1e-2 * o.abs().max() for o in outs], provider

    monkeypatch.setattr(deploy_onnx, "_run_ort", off_by_a_bit)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ParityError, match=r"max \|Δ\| = .* > tolerance .*was not written"):
        export_onnx(small_rewritten, x, tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == [], "a failed check must leave no file"


def test_onnx_to_missing_folder_is_refused(small_rewritten: nn.Module, tmp_path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        export_onnx(small_rewritten, torch.randn(1, 3, 32, 32), tmp_path / "nope" / "m.onnx")


def test_onnx_bad_exporter_name_is_refused(small_rewritten: nn.Module, tmp_path) -> None:
    with pytest.raises(DeployInputError, match="exporter must be"):
        export_onnx(small_rewritten, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", exporter="jit")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------
def test_compile_fullgraph_traces_rewritten_model(small_rewritten: nn.Module) -> None:
    """Dynamo captures the rewritten model in one graph (no graph breaks in the new block)."""
    torch._dynamo.reset()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    compiled = torch.compile(small_rewritten, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), small_rewritten(x), "torch.compile(backend='eager')")


@pytest.mark.slow
def test_compile_inductor_on_deployment_form(small_rewritten: nn.Module) -> None:
    """Inductor (C++ codegen on the CPU) compiles the folded, channels_last rewritten model."""
    torch._dynamo.reset()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    dep = prepare_for_deployment(small_rewritten, x)
    compiled = torch.compile(dep, fullgraph=True)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got, ref = compiled(xc), small_rewritten(x)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"inductor: max |Δ| = {err:.3g} (max |ref| = {scale:.3g})"


# --------------------------------------------------------------------------------------
# Allocator
# --------------------------------------------------------------------------------------
_MALLOC_PROBE = r"""
import ctypes, sys
from dsrewrite.deploy import tune_glibc_malloc

libc = ctypes.CDLL("libc.so.6")

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_delta(nbytes):
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(nbytes)
    delta = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return delta

n = 64 << 20
print(mmapped_delta(n) >= n, tune_glibc_malloc(), mmapped_delta(n) == 0)
"""


def test_tune_glibc_malloc_stops_mmap_for_large_blocks() -> None:
    """A 64 MiB block is mmapped by default and comes from the heap after tuning (in a child process)."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True"], (
        f"(mmapped by default, tuned, heap after tuning) = {out.stdout.split()}; stderr: {out.stderr[-500:]}"
    )
