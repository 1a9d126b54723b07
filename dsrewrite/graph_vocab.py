# SPDX-License-Identifier: Apache-2.0
"""The "transparent" vocabulary: which graph nodes keep a conv's input what it was.

Every reader of a captured graph (the graph predicates of :mod:`dsrewrite.graph`,
calibration's activation-fit detection in :mod:`dsrewrite.refit.activation`) asks
this module the same questions of an fx node (convs as leaves) or a ``torch.export``
ATen node:

- :func:`transparent_input`: is the node *transparent*, i.e. does it keep its data
  input's channels, so that "the conv reads a concat" still holds through it? If so,
  the node it reads its data from. Transparent are: every norm (Batch/Instance/Group/
  Layer/RMS/LocalResponse, module and functional), every element-wise activation
  (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Hardswish,
  Hardsigmoid, Hardtanh, Sigmoid, Tanh, Softplus, clamp, ...), dropout, ``nn.Identity``,
  dtype/device/contiguity/memory-format casts (``to``, ``float``, ``contiguous``,
  ``clone``, ``detach``, ``type_as``), ``view``/``reshape``, padding and cropping that
  keep the channel dimension (``F.pad`` whose channel pad is 0, ``nn.*Pad*d``,
  ``x[:, :, a:b, c:d]``, ``narrow``/``aten.slice`` on a spatial dim), a multiplication by
  a Python number, and a *gate*: ``x * g`` where ``g`` comes from a sigmoid/hardsigmoid/
  softmax (attention gates, squeeze-excitation) is transparent to ``x``.
- :func:`cat_tensors`: is the node a concatenation along the channel dimension
  (``dim=1``, or ``dim=-(ndim-1)`` when the rank is known)? Concatenations along the
  batch or a spatial dimension (Siamese encoders, space-to-depth) are not skip fusions.
- :func:`is_relu`, :func:`batchnorm_of` and :func:`identity_input` (dropout, identity and
  casts only: no norm, no activation) for the activation fit.

Example:
    >>> import torch, torch.fx
    >>> import torch.nn.functional as F
    >>> g = torch.fx.symbolic_trace(lambda x: torch.cat([F.pad(F.silu(x), [0, 1, 0, 1]), x[:, :, :5, :5]], 1))
    >>> nodes = {n.name: n for n in g.graph.nodes}
    >>> transparent_input(nodes["pad"], {}).name, transparent_input(nodes["silu"], {}).name
    ('silu', 'x')
    >>> [n.name for n in cat_tensors(nodes["cat"], ndim=None)]
    ['pad', 'getitem']
"""

from __future__ import annotations

import operator
import re
from typing import Any, Mapping, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import padding as _pad

from .runtime.tracer import CAT_FUNCS

__all__ = [
    "NORM_MODULES", "ACTIVATION_MODULES", "GATE_MODULES", "IDENTITY_MODULES", "PAD_MODULES", "LINEAR_MODULES",
    "aten_name", "ndim", "normalise_module_path", "stack_paths", "module_of", "transparent_input", "identity_input", "cat_tensors", "is_relu", "batchnorm_of",
]

Node = torch.fx.Node

#: Norm modules: per-channel (BatchNorm, InstanceNorm) or per-group/per-sample ones; all keep the channels.
NORM_MODULES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                  nn.RMSNorm, nn.CrossMapLRN2d)
#: Element-wise activation modules.
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink,
)
#: Modules whose output is a gate (a weight in [0, 1]) when it scales another tensor.
GATE_MODULES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d)
#: Modules that return their input (at inference).
IDENTITY_MODULES: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
#: Padding modules (they pad spatial dimensions only).
PAD_MODULES: tuple[type, ...] = (_pad._ConstantPadNd, _pad._ReflectionPadNd, _pad._ReplicationPadNd,
                                 _pad._CircularPadNd)
#: Modules that mix channels like a conv does (a final predictor reaches the output through none of them).
LINEAR_MODULES: tuple[type, ...] = (nn.Linear, nn.Bilinear)

_ACT_FUNCS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.elu,
    F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.softsign, F.tanhshrink, F.threshold,
    F.logsigmoid, F.softshrink, F.hardshrink, torch.clamp, torch.clip, torch.selu, torch.celu, torch.rrelu,
})
_NORM_FUNCS = frozenset({
    F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm, F.rms_norm,
    torch.batch_norm, torch.instance_norm, torch.group_norm, torch.layer_norm,
})
_GATE_FUNCS = frozenset({torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax})
_IDENTITY_FUNCS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.clone, torch.reshape, torch.detach,
})
_IDENTITY_METHODS = frozenset({
    "contiguous", "clone", "view", "reshape", "to", "float", "half", "double", "bfloat16", "type", "type_as",
    "detach", "cpu", "cuda",
})
_ACT_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
                          "clip_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_"})
_GATE_METHODS = frozenset({"sigmoid", "softmax"})
_MUL_FUNCS = frozenset({operator.mul, operator.truediv, torch.mul, torch.div, operator.imul, operator.itruediv})
_MUL_METHODS = frozenset({"mul", "mul_", "div", "div_"})
_RELU_FUNCS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_})

_ATEN_IDENTITY = frozenset({
    "clone", "alias", "_to_copy", "to", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "contiguous", "view", "reshape", "_unsafe_view", "detach", "lift_fresh_copy",
    "type_as",
})
_ATEN_ACT = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel",
    "rrelu", "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu", "gelu_", "silu", "silu_", "mish", "mish_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "softplus", "softshrink", "hardshrink", "log_sigmoid", "log_sigmoid_forward", "threshold", "threshold_",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "clip_",
})
_ATEN_NORM = frozenset({
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "cudnn_batch_norm", "instance_norm", "group_norm",
    "native_group_norm", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
})
#: ATen ops returning a tuple whose item 0 is the transparent result.
_ATEN_MULTI = frozenset({"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                         "_native_batch_norm_legit_functional", "cudnn_batch_norm", "native_group_norm",
                         "native_layer_norm", "native_dropout", "_fused_rms_norm"})
_ATEN_PAD_SPATIAL = frozenset({"reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
                               "replication_pad2d", "replication_pad3d", "_pad_circular"})
_ATEN_GATE = frozenset({"sigmoid", "hardsigmoid", "softmax", "_softmax"})
_ATEN_MUL = frozenset({"mul", "mul_", "div", "div_"})


def aten_name(target: Any) -> str:
    """``aten.conv2d.default`` -> ``'conv2d'``; anything else -> ``''``.

    Example:
        >>> aten_name(torch.ops.aten.relu.default), aten_name(torch.relu)
        ('relu', '')
    """
    text = str(target)
    return text.split(".")[1] if text.startswith("aten.") else ""


def ndim(node: Any) -> Optional[int]:
    """The rank of a node's tensor when the graph recorded it (``tensor_meta`` of ShapeProp, ``val`` of export)."""
    if not isinstance(node, Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        shape = getattr(node.meta.get("val"), "shape", None)
    return len(shape) if shape is not None else None


def _arg(node: Node, i: int, key: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _is_channel_dim(dim: Any, rank: Optional[int]) -> bool:
    if not isinstance(dim, int):
        return False
    return dim == 1 or (rank is not None and dim < 0 and dim + rank == 1)


def _pad_keeps_channels(pad: Any, rank: Optional[int]) -> bool:
    """``F.pad`` pads the last ``len(pad) // 2`` dims; the channel dim (1) must get 0 on both sides.

    ``rank`` is the input's rank (4 assumed when unknown).
    """
    if not isinstance(pad, (list, tuple)) or len(pad) % 2:
        return False
    rank = rank or 4
    lo = 2 * (rank - 2)  # pad[lo], pad[lo + 1] pad the channel dim
    if len(pad) <= lo:
        return True
    return all(isinstance(p, int) and p == 0 for p in pad[lo:lo + 2]) and len(pad) <= lo + 2


def _index_keeps_channels(index: Any) -> bool:
    """``x[index]`` keeps dims 0 and 1 whole (a spatial crop): ``[:, :, a:b]``, ``[..., a:b, c:d]``."""
    if not isinstance(index, tuple) or not index:
        return False
    full = slice(None, None, None)
    if index[0] is Ellipsis:
        return 1 <= len(index) - 1 <= 2 and all(isinstance(i, slice) for i in index[1:])
    return (len(index) >= 2 and index[0] == full and index[1] == full
            and all(isinstance(i, slice) or i is Ellipsis for i in index[2:]))


def _module(node: Node, modules: Mapping[str, nn.Module]) -> Optional[nn.Module]:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _first(node: Node, key: str = "input") -> Optional[Node]:
    arg = _arg(node, 0, key)
    return arg if isinstance(arg, Node) else None


def _is_gate(node: Any, modules: Mapping[str, nn.Module], depth: int = 8) -> bool:
    """Whether ``node`` is (a cast, expand or resize of) a sigmoid/hardsigmoid/softmax output."""
    while isinstance(node, Node) and depth > 0:
        depth -= 1
        mod = _module(node, modules)
        if (isinstance(mod, GATE_MODULES) or (node.op == "call_function" and node.target in _GATE_FUNCS)
                or (node.op == "call_method" and node.target in _GATE_METHODS)
                or aten_name(node.target) in _ATEN_GATE):
            return True
        if node.op in ("placeholder", "get_attr", "output") or isinstance(mod, nn.modules.conv._ConvNd):
            return False
        node = _first(node)
    return False


def _gated_input(node: Node, modules: Mapping[str, nn.Module]) -> Optional[Node]:
    """For ``x * g``/``x / c``: the data operand ``x`` when the other is a number or a gate."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if isinstance(a, Node) and isinstance(b, (int, float)):
        return a
    if isinstance(b, Node) and isinstance(a, (int, float)) and node.target not in (operator.truediv, torch.div):
        return b
    if isinstance(a, Node) and isinstance(b, Node):
        ga, gb = _is_gate(a, modules), _is_gate(b, modules)
        if gb and not ga:
            return a
        if ga and not gb:
            return b
    return None


def identity_input(node: Node, modules: Mapping[str, nn.Module]) -> Optional[Node]:
    """The input of a node that returns its input unchanged at inference (identity, dropout, a cast), else None."""
    if node.op == "call_module":
        return _first(node) if isinstance(_module(node, modules), IDENTITY_MODULES) or _smp_identity(
            _module(node, modules)) else None
    if node.op == "call_function":
        if node.target in _IDENTITY_FUNCS or aten_name(node.target) in _ATEN_IDENTITY:
            return _first(node)
        if node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[1] == 0 \
                and aten_name(node.args[0].target) == "native_dropout":
            return _first(node.args[0])
        return None
    if node.op == "call_method" and node.target in _IDENTITY_METHODS:
        return _first(node, "self")
    return None


def _smp_identity(mod: Optional[nn.Module]) -> bool:
    """smp's ``Attention`` with ``attention_type=None`` wraps an ``nn.Identity``."""
    return type(mod).__name__ == "Attention" and isinstance(getattr(mod, "attention", None), nn.Identity)


def transparent_input(node: Node, modules: Mapping[str, nn.Module]) -> Optional[Node]:
    """The node a transparent ``node`` reads its data from, or None when ``node`` is not transparent.

    ``modules`` maps qualified names to modules (for fx ``call_module`` nodes); see the
    module docstring for the vocabulary.
    """
    same = identity_input(node, modules)
    if same is not None:
        return same
    if node.op == "call_module":
        mod = _module(node, modules)
        return _first(node) if isinstance(mod, (NORM_MODULES, ACTIVATION_MODULES, PAD_MODULES)) else None
    if node.op == "call_method":
        name = str(node.target)
        if name in _ACT_METHODS:
            return _first(node, "self")
        if name in _MUL_METHODS:
            return _gated_input(node, modules)
        if name == "narrow":
            return _first(node, "self") if not _is_channel_dim(_arg(node, 1, "dim"), ndim(node)) else None
        return None
    if node.op != "call_function":
        return None
    tgt = node.target
    if tgt in _ACT_FUNCS or tgt in _NORM_FUNCS:
        return _first(node)
    if tgt is F.pad:
        return _first(node) if _pad_keeps_channels(_arg(node, 1, "pad"), ndim(_first(node))) else None
    if tgt in _MUL_FUNCS:
        return _gated_input(node, modules)
    if tgt is torch.narrow:
        return _first(node) if not _is_channel_dim(_arg(node, 1, "dim"), ndim(node)) else None
    if tgt is operator.getitem:
        src = node.args[0] if isinstance(node.args[0], Node) else None
        if src is not None and node.args[1] == 0 and aten_name(src.target) in _ATEN_MULTI:
            return _first(src)
        return src if src is not None and _index_keeps_channels(node.args[1]) else None
    name = aten_name(tgt)
    if name in _ATEN_ACT or name in _ATEN_NORM - _ATEN_MULTI or name in _ATEN_PAD_SPATIAL:
        return _first(node)
    if name in ("pad", "constant_pad_nd"):
        return _first(node) if _pad_keeps_channels(_arg(node, 1, "pad"), ndim(_first(node))) else None
    if name in ("slice", "narrow"):
        return _first(node) if not _is_channel_dim(_arg(node, 1, "dim", 0), ndim(node)) else None
    if name in _ATEN_MUL:
        return _gated_input(node, modules)
    return None


def cat_tensors(node: Node, ndim: Optional[int] = None) -> Optional[list[Node]]:
    """The tensors a channel-dimension concatenation joins, or None (not a concat, or along another dim).

    ``ndim`` is the rank of the concatenated tensors when known (needed for negative dims).
    """
    if node.op != "call_function" or not (node.target in CAT_FUNCS or aten_name(node.target) in
                                          ("cat", "concat", "concatenate")):
        return None
    tensors = _arg(node, 0, "tensors", ())
    dim = _arg(node, 1, "dim", 0)
    if not _is_channel_dim(dim, ndim):
        return None
    return [t for t in (tensors if isinstance(tensors, (list, tuple)) else ()) if isinstance(t, Node)]


def is_relu(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` (in place or not) or ``aten.relu``."""
    if node.op == "call_module":
        return type(_module(node, modules)) is nn.ReLU
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_function" and (node.target in _RELU_FUNCS or aten_name(node.target) in ("relu", "relu_"))


def batchnorm_of(node: Node, modules: Mapping[str, nn.Module], root: Optional[nn.Module] = None) -> Optional[nn.BatchNorm2d]:
    """The exact ``nn.BatchNorm2d`` module an fx ``call_module`` node or an ATen batch-norm node runs, else None.

    ATen nodes are mapped back through ``nn_module_stack`` (``root`` resolves the path).
    """
    mod: Any = _module(node, modules)
    if mod is None and root is not None and node.op == "call_function" and "batch_norm" in aten_name(node.target):
        mod = module_of(node, root)
    return mod if type(mod) is nn.BatchNorm2d else None


_PATH_PREFIX = re.compile(r"^(?:L\['self'\]|L__self__|self)(?:\.|$)")
_GETATTR = re.compile(r"getattr\(([^()]*?),\s*['\"]([^'\"]+)['\"]\)")


def normalise_module_path(path: str) -> str:
    """Turn a qualified name as found in ``nn_module_stack`` into ``named_modules`` form.

    Example:
        >>> normalise_module_path("L['self'].decoder.blocks[0].conv1")
        'decoder.blocks.0.conv1'
        >>> normalise_module_path("getattr(L['self'].blocks, '2')._modules['conv']")
        'blocks.2.conv'
    """
    p = path
    while _GETATTR.search(p):
        p = _GETATTR.sub(r"\1.\2", p)
    p = _PATH_PREFIX.sub("", p)
    p = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", p)
    p = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    return p.strip(".")


def stack_paths(node: Node) -> list[str]:
    """The module paths of an ATen node's ``nn_module_stack``, outermost first, in ``named_modules`` form."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        raw = value[0] if isinstance(value, (tuple, list)) else value
        out.append(normalise_module_path(str(raw) if raw is not None else str(key)))
    return out


def module_of(node: Node, root: nn.Module) -> Optional[nn.Module]:
    """The innermost module an ATen node ran in (through ``nn_module_stack``), or None."""
    paths = stack_paths(node)
    if not paths:
        return None
    try:
        return root.get_submodule(paths[-1])
    except AttributeError:
        return None
