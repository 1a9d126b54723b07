"""Inference forms of a (rewritten) model: BN folding, channels_last, ONNX export with a parity check.

* :func:`fold_batchnorm` folds every eval-mode ``BatchNorm2d`` that directly follows a
  conv into that conv (a plain ``nn.Conv2d``, the last stage of a
  :class:`~dsrewrite.layers.DepthwiseSeparableConv2d`, or, for a block's ``mid_norm``,
  its first stage) and puts ``nn.Identity`` where the BN was.
* :func:`to_channels_last` returns a channels_last copy (NHWC weights; feed NHWC inputs too).
* :func:`export_onnx` exports with ``torch.onnx.export``, runs ONNX Runtime (CPU) on the
  same input and checks the largest absolute difference against eager.
* :func:`prepare_for_deployment` is the recommended inference form: eval, BN folded,
  channels_last, checked against the original on the example input.

Folding needs no data: ``y = γ·(conv(x) − μ)/√(σ²+ε) + β`` is a conv with every output
channel's weights scaled by ``γ/√(σ²+ε)`` and bias ``(b − μ)·γ/√(σ²+ε) + β``; the
arithmetic is done in float64 and cast back to the conv's dtype.

Where a conv→BN pair is found (:func:`find_conv_bn_pairs`):

* consecutive children of a plain ``nn.Sequential`` (smp's ``Conv2dReLU`` is
  ``Sequential(conv, bn, relu)``): the sure case;
* otherwise a ``torch.fx`` symbolic trace of the module (tried from the root down; a
  module that does not trace is searched child by child): a BN whose only input is a
  conv call whose only user is that BN;
* the ``mid_norm`` of a :class:`DepthwiseSeparableConv2d` (any replacement block whose kind
  names one in its :class:`~dsrewrite.kinds.Stages`), which follows its first stage.

Which stage a BN after a replacement block folds into is its kind's answer
(:meth:`~dsrewrite.kinds.ReplacementKind.fold_bn_into`: the last stage for the built-ins).

A pair is folded only if both modules are called once and held under one name, the conv
has the plain ``nn.Conv2d`` forward (no weight standardisation, no own padding) and
no hooks, and the BN has running statistics. A BN in training mode normalises with batch
statistics and cannot be folded: :class:`DeployInputError` says so (call ``.eval()``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__, type(net[1]).__name__
    ('Identity', 'BatchNorm2d')
    >>> x = torch.randn(1, 3, 16, 16)
    >>> torch.allclose(folded(x), net(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .errors import OutputError, RewriteError, UsageError
from .kinds import Stages, kind_of
from .macs import evaluating

__all__ = [
    "FoldPair",
    "OnnxResult",
    "DeployInputError",
    "ParityError",
    "OnnxExportError",
    "DEFAULT_OPSET",
    "parity_tolerance",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "to_channels_last",
    "prepare_for_deployment",
    "export_onnx",
    "tune_glibc_malloc",
    "GLIBC_TUNABLES",
]

#: The environment setting equivalent to :func:`tune_glibc_malloc` (read by glibc at process start):
#: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824``.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"

#: Opset used by :func:`export_onnx` unless told otherwise.
DEFAULT_OPSET = 17

#: ``(rtol, atol)`` per dtype: a parity check passes when
#: ``max|a − b| ≤ atol + rtol · max|reference|``.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}

Inputs = Union[Tensor, Sequence[Tensor]]


class DeployInputError(UsageError):
    """The model or input cannot be put into an inference form as asked (e.g. a BN in training mode)."""


class ParityError(RewriteError):
    """A deployment form's outputs differ from the original's by more than the stated tolerance."""


class OnnxExportError(RewriteError):
    """``torch.onnx.export`` failed with every exporter tried, or ONNX Runtime cannot run the file."""


@dataclass(frozen=True)
class FoldPair:
    """One conv→BN pair: qualified names of the conv that absorbs the BN and of the BN; ``via``
    says how it was found (``"sequential"``, ``"fx"`` or ``"mid_norm"``)."""

    conv: str
    bn: str
    via: str


@dataclass(frozen=True)
class OnnxResult:
    """What :func:`export_onnx` wrote and how close ONNX Runtime came to eager.

    ``opset`` is the one the file declares. ``max_abs_diff``/``tolerance`` are ``None``
    when the check was not run; the check
    passes when ``max_abs_diff ≤ tolerance = atol + rtol · max|eager output|``.
    """

    path: str
    opset: int
    exporter: str
    checked: bool
    max_abs_diff: Optional[float]
    tolerance: Optional[float]
    max_abs_output: Optional[float]
    provider: Optional[str]

    def __str__(self) -> str:
        if not self.checked:
            return f"ONNX {self.path} (opset {self.opset}, {self.exporter} exporter): not checked"
        return (
            f"ONNX {self.path} (opset {self.opset}, {self.exporter} exporter): max |ORT − eager| = "
            f"{self.max_abs_diff:.3g} ≤ tolerance {self.tolerance:.3g} ({self.provider})"
        )


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------
def parity_tolerance(reference: Tensor, *, rtol: Optional[float] = None, atol: Optional[float] = None) -> float:
    """The absolute tolerance ``atol + rtol · max|reference|`` for ``reference``'s dtype.

    Defaults (rtol, atol): float32 (1e-4, 1e-5), float64 (1e-9, 1e-12), float16 (1e-2, 1e-3),
    bfloat16 (5e-2, 1e-2).

    Example:
        >>> parity_tolerance(torch.tensor([2.0, -10.0]))
        0.00101
    """
    d_rtol, d_atol = _TOLERANCES.get(reference.dtype, _TOLERANCES[torch.float32])
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    return float(atol + rtol * scale)


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise DeployInputError(
        f"example_input must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}. "
        "Hint: pass e.g. torch.randn(1, 3, 512, 512)."
    )


def _flat_outputs(out: Any, where: str) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o, where)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat_outputs(out[k], where)]
    raise DeployInputError(
        f"{where} returned a {type(out).__name__}; only tensors, tuples/lists and dicts of tensors "
        "can be compared. Hint: wrap the model so that it returns tensors."
    )


def _max_abs_diff(got: list[Tensor], ref: list[Tensor], where: str) -> tuple[float, float]:
    if len(got) != len(ref):
        raise ParityError(f"{where}: {len(got)} outputs against {len(ref)} in the reference.")
    diff, scale = 0.0, 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        if tuple(g.shape) != tuple(r.shape):
            raise ParityError(f"{where}: output {i} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}.")
        g64, r64 = g.detach().cpu().double(), r.detach().cpu().double()
        if g64.numel():
            diff = max(diff, (g64 - r64).abs().max().item())
            scale = max(scale, r64.abs().max().item())
    return diff, scale


# --------------------------------------------------------------------------------------
# Finding conv→BN pairs
# --------------------------------------------------------------------------------------
def _plain_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and type(m)._conv_forward is nn.Conv2d._conv_forward
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _block_stages(m: nn.Module) -> Optional[Stages]:
    """The stages of a replacement block without hooks whose kind knows its forward, else ``None``."""
    kind = kind_of(m)
    if kind is None or m._forward_hooks or m._forward_pre_hooks:
        return None
    return kind.stages(m)


def _bn_stage(block: nn.Module) -> Optional[str]:
    """The stage (relative name) of a replacement block that a BN following it folds into, if it is a plain conv."""
    kind = kind_of(block)
    stage = None if kind is None or _block_stages(block) is None else kind.fold_bn_into(block)
    return stage if stage is not None and _plain_conv(block.get_submodule(stage)) else None


def _is_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is _BatchNorm.forward
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _join(prefix: str, name: str) -> str:
    """Qualified name of ``name`` under ``prefix`` (either may be empty); also used by ``hoist``."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _trace(module: nn.Module) -> Optional[torch.fx.Graph]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.fx.Tracer().trace(module)
    except Exception:  # any failure to trace only means "search the children instead"
        return None


def _pairs_from_graph(graph: torch.fx.Graph, module: nn.Module, prefix: str) -> list[FoldPair]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(module.get_submodule(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        if calls[src.target] == 1 and _plain_conv(module.get_submodule(src.target)):
            pairs.append(FoldPair(_join(prefix, src.target), _join(prefix, node.target), "fx"))
    return pairs


def _collect(module: nn.Module, prefix: str, out: list[FoldPair]) -> None:
    if _plain_sequential(module):
        children = list(module.named_children())
        for (na, a), (nb, b) in zip(children, children[1:]):
            if _is_bn(b) and _plain_conv(a):
                out.append(FoldPair(_join(prefix, na), _join(prefix, nb), "sequential"))
            elif _is_bn(b) and (stage := _bn_stage(a)) is not None:
                out.append(FoldPair(_join(_join(prefix, na), stage), _join(prefix, nb), "sequential"))
        for name, child in children:
            _collect(child, _join(prefix, name), out)
        return
    graph = _trace(module)
    if graph is not None:
        out.extend(_pairs_from_graph(graph, module, prefix))
        return
    for name, child in module.named_children():
        _collect(child, _join(prefix, name), out)


def find_conv_bn_pairs(model: nn.Module) -> list[FoldPair]:
    """The conv→BN pairs :func:`fold_batchnorm` would fold, in module order (see the module doc).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
        >>> find_conv_bn_pairs(net)
        [FoldPair(conv='0', bn='1', via='sequential')]
    """
    found: list[FoldPair] = []
    for name, m in model.named_modules():
        st = _block_stages(m)
        if st is not None and st.mid_norm is not None and _is_bn(m.get_submodule(st.mid_norm)) \
                and _plain_conv(m.get_submodule(st.first)):
            found.append(FoldPair(_join(name, st.first), _join(name, st.mid_norm), "mid_norm"))
    _collect(model, "", found)
    # Only modules held under exactly one name: a shared module may run elsewhere too.
    held = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    seen_bn, seen_conv, pairs = set(), set(), []
    for p in found:
        conv, bn = model.get_submodule(p.conv), model.get_submodule(p.bn)
        if p.bn in seen_bn or p.conv in seen_conv or held[id(conv)] != 1 or held[id(bn)] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
            continue
        seen_bn.add(p.bn)
        seen_conv.add(p.conv)
        pairs.append(p)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(pairs, key=lambda p: order.get(p.bn, 0))


# --------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place, computing in float64."""

    def f64(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().double()

    w, b = fuse_conv_bn_weights(
        f64(conv.weight), f64(conv.bias), f64(bn.running_mean), f64(bn.running_var),  # type: ignore[arg-type]
        bn.eps, f64(bn.weight), f64(bn.bias),
    )
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(b)
        else:
            conv.bias = nn.Parameter(
                b.to(device=conv.weight.device, dtype=conv.weight.dtype),
                requires_grad=conv.weight.requires_grad,
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at qualified ``name`` (one attribute; callers skip shared modules); also used by ``hoist``."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a conv into it; BN → ``nn.Identity``.

    Covers plain ``Conv2d → BN``, ``DepthwiseSeparableConv2d → BN`` (into the block's last
    stage) and a block's ``mid_norm`` (into its first stage; the block's ``mid_norm_kind``
    becomes ``None``). The model's class, device, dtype and train/eval flags are kept;
    the caller's model is untouched unless ``inplace=True``.

    Raises:
        DeployInputError: a BN to be folded is in training mode (call ``model.eval()`` first).

    Example:
        >>> from dsrewrite.layers import DepthwiseSeparableConv2d
        >>> net = nn.Sequential(DepthwiseSeparableConv2d(4, 8, 3, mid_norm="batchnorm"), nn.BatchNorm2d(8)).eval()
        >>> folded = fold_batchnorm(net)
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), folded[0].mid_norm_kind
        (0, None)
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(folded(x), net(x), atol=1e-5)
        True
    """
    target = model if inplace else copy.deepcopy(model)
    pairs = find_conv_bn_pairs(target)
    training = [p.bn for p in pairs if target.get_submodule(p.bn).training]
    if training:
        raise DeployInputError(
            f"BatchNorm {training[0]!r} (and {len(training) - 1} more) is in training mode: it normalises "
            "with batch statistics, which cannot be folded into a conv. Hint: call model.eval() first."
        )
    for p in pairs:
        _fold_into(target.get_submodule(p.conv), target.get_submodule(p.bn))  # type: ignore[arg-type]
        _set_submodule(target, p.bn, nn.Identity())
        if p.via == "mid_norm":
            target.get_submodule(p.bn.rpartition(".")[0]).mid_norm_kind = None
    return target


def to_channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-d parameters and buffers in ``torch.channels_last``.

    Feed it ``x.to(memory_format=torch.channels_last)``: convs then keep NHWC end to end.

    Example:
        >>> m = to_channels_last(nn.Conv2d(3, 8, 3))
        >>> m.weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def prepare_for_deployment(
    model: nn.Module,
    example_input: Inputs,
    *,
    channels_last: bool = True,
    fold_bn: bool = True,
    hoist: bool = True,
    check: bool = True,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> nn.Module:
    """The recommended inference form: an eval-mode copy, BN folded, pointwise stages hoisted, channels_last.

    ``hoist`` applies :func:`dsrewrite.hoist.hoist_pointwise`: the pointwise stage of each
    ``pw_dw`` block fed by a nearest/bilinear upsample (optionally through a skip
    concatenation) runs before the upsample, at the low resolution, and the concatenation
    disappears (exact up to rounding; see docs/latency.md). The modules it rewrites become
    ``torch.fx.GraphModule`` children: keep the undeployed model for fine-tuning and saving.

    With ``check=True`` the result is run on ``example_input`` against the original (in
    eval mode, without changing its flags) and :class:`ParityError` is raised when
    ``max|new − original| > atol + rtol · max|original|`` (dtype defaults in
    :func:`parity_tolerance`). Inputs to a channels_last model should be channels_last too.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> x = torch.randn(1, 3, 16, 16)
        >>> dep = prepare_for_deployment(net, x)
        >>> dep.training, net.training, dep[0].weight.is_contiguous(memory_format=torch.channels_last)
        (False, True, True)
    """
    args = _as_tuple(example_input)
    deployed = copy.deepcopy(model).eval()
    if fold_bn:
        deployed = fold_batchnorm(deployed, inplace=True)
    if hoist:
        from .hoist import hoist_pointwise  # hoist imports this module

        deployed = hoist_pointwise(deployed, args, inplace=True).model
    if channels_last:
        deployed = deployed.to(memory_format=torch.channels_last)
    if check:
        with torch.no_grad(), evaluating(model):
            ref = _flat_outputs(model(*args), "the original model")
            fed = tuple(a.to(memory_format=torch.channels_last) if channels_last and a.dim() == 4 else a for a in args)
            got = _flat_outputs(deployed(*fed), "the deployed model")
        diff, _ = _max_abs_diff(got, ref, "prepare_for_deployment")
        tol = max(parity_tolerance(r, rtol=rtol, atol=atol) for r in ref)
        if not diff <= tol:
            raise ParityError(
                f"the deployment form (fold_bn={fold_bn}, hoist={hoist}, channels_last={channels_last}) differs from the "
                f"original by max |Δ| = {diff:.3g} > tolerance {tol:.3g} on the example input. "
                "Hint: check for BN modules shared or called twice; pass check=False to skip."
            )
    return deployed


def tune_glibc_malloc(*, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep large freed blocks for reuse (process-wide; opt-in; see docs/latency.md).

    By default glibc serves every block of ≥ 32 MiB (one fp32 activation of 32 channels at
    512×512) with a fresh ``mmap`` and unmaps it on free, so each forward pass page-faults
    in new zeroed pages; the memory-bound depthwise convs (and in NCHW their large scratch
    buffers) pay this on every call. This calls ``mallopt(M_MMAP_MAX, 0)`` (no mmap for large
    blocks) and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (keep up to that much free heap
    top), the run-time form of :data:`GLIBC_TUNABLES`. The cost: freed memory is returned to
    the kernel less eagerly. Returns ``False`` (and changes nothing) where the C library is
    not glibc; it does not affect an allocator preloaded in glibc's place (jemalloc, tcmalloc).

    Example:
        >>> tune_glibc_malloc() in (True, False)
        True
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not isinstance(trim_threshold, int) or trim_threshold < 0:
        raise DeployInputError(f"trim_threshold must be an int >= 0 (bytes), got {trim_threshold!r}.")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    ok_mmap = libc.mallopt(m_mmap_max, 0)
    ok_trim = libc.mallopt(m_trim_threshold, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    return bool(ok_mmap and ok_trim)


# --------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------
def _export_file(model: nn.Module, args: tuple[Tensor, ...], path: str, opset: int, exporter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, args, path, opset_version=opset, dynamo=False, do_constant_folding=True)
        else:
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, verbose=False)
            program.save(path, external_data=False)  # type: ignore[union-attr]


def _file_opset(path: str, asked: int) -> int:
    """The default-domain opset the file declares (the dynamo exporter may raise the one asked for)."""
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # onnx missing or unreadable: ONNX Runtime's check reports real problems
        return asked
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), asked)


def _run_ort(path: str, args: tuple[Tensor, ...]) -> tuple[list[Tensor], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().contiguous().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)], session.get_providers()[0]


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: Union[str, os.PathLike],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    exporter: str = "auto",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> OnnxResult:
    """Export ``model`` (in eval mode) to ONNX at ``path``, atomically, and check it with ONNX Runtime.

    ``exporter``: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, deprecated but
    present in torch 2.15), ``"dynamo"`` (``dynamo=True``, the default of ``torch.onnx.export``
    since torch 2.9) or ``"auto"``: TorchScript first (on smp's Unet it exported in 0.5 s against
    4 s, and the dynamo exporter writes opset ≥ 18 then converts down), dynamo if it fails. With ``check=True`` ONNX Runtime's CPU
    provider runs the exported file on ``example_input`` and the file is kept only if
    ``max|ORT − eager| ≤ atol + rtol · max|eager|`` (float32 defaults: rtol 1e-4,
    atol 1e-5, see :func:`parity_tolerance`). The file is written to a temporary file
    beside ``path`` and moved into place with ``os.replace`` (an existing file is replaced).
    The caller's model and its train/eval flags are not changed.

    Raises:
        OutputError: ``path``'s folder does not exist.
        OnnxExportError: no exporter managed, or ONNX Runtime cannot load the file.
        ParityError: ONNX Runtime's output is further from eager than the tolerance.

    Example:
        >>> import tempfile, os
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     res = export_onnx(net, torch.randn(1, 3, 16, 16), os.path.join(d, "net.onnx"))
        ...     res.checked, res.max_abs_diff <= res.tolerance, os.path.exists(res.path)
        (True, True, True)
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise DeployInputError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}.")
    args = _as_tuple(example_input)
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write ONNX file {path!r}: folder {folder!r} does not exist. Hint: create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        errors: list[str] = []
        used = None
        with torch.no_grad(), evaluating(model):
            for name in (("torchscript", "dynamo") if exporter == "auto" else (exporter,)):
                try:
                    _export_file(model, args, tmp, opset, name)
                    used = name
                    break
                except Exception as exc:  # report every exporter's failure together
                    errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if used is None:
                raise OnnxExportError(
                    f"torch.onnx.export failed for {type(model).__name__} at opset {opset}: " + "; ".join(errors)
                    + ". Hint: try another opset= or exporter=."
                )
            ref = _flat_outputs(model(*args), "the model") if check else []
        opset_used = _file_opset(tmp, opset)
        result = OnnxResult(path, opset_used, used, False, None, None, None, None)
        if check:
            try:
                got, provider = _run_ort(tmp, args)
            except ImportError as exc:
                raise OnnxExportError(f"onnxruntime is not installed ({exc}). Hint: pip install onnxruntime.") from exc
            except Exception as exc:
                raise OnnxExportError(
                    f"ONNX Runtime cannot run the exported {type(model).__name__}: {type(exc).__name__}: {exc}"
                ) from exc
            diff, scale = _max_abs_diff(got, ref, f"ONNX export of {type(model).__name__}")
            tol = max(parity_tolerance(r, rtol=rtol, atol=atol) for r in ref)
            if not diff <= tol:
                raise ParityError(
                    f"ONNX Runtime's output for {type(model).__name__} ({used} exporter, opset {opset}) differs "
                    f"from eager by max |Δ| = {diff:.3g} > tolerance {tol:.3g} (max |eager| = {scale:.3g}); "
                    f"{path!r} was not written. Hint: try exporter='dynamo' or another opset, or check=False."
                )
            result = OnnxResult(path, opset_used, used, True, diff, tol, scale, provider)
        os.replace(tmp, path)
        return result
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
