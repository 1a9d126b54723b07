# SPDX-License-Identifier: Apache-2.0
"""Graph predicates of conv call sites, read from a ``torch.fx`` or ``torch.export`` graph.

A :class:`GraphView` says, for each node of a captured graph, what it is
(a conv call site, an upsample, a concatenation, a pass-through that keeps its
input tensor, or anything else) and where its main tensor input comes from.
:func:`site_predicates` then evaluates, per conv module, every registered
graph predicate (:mod:`dsrewrite.predicates`), OR-ed over the module's call sites.
The built-ins:

- ``after_concat``: the conv's input comes from a concatenation;
- ``after_upsample``: the conv's input comes from an upsample, directly or
  through a concatenation that has at least one upsampled input;
- ``downstream_of_upsample``: some upsample lies on some path from the model
  input to the conv.

"Comes from" looks through pass-through nodes (``nn.Identity``, dropout,
``contiguous``/``clone``/``view``/``reshape``/dtype casts and their ATen forms,
smp's ``Attention`` with no attention). Upsamples are ``F.interpolate`` and
``nn.Upsample*``, pixel shuffle, and transposed convolutions with a stride
above 1 (a stride-1 transposed conv does not raise the resolution).

Example:
    >>> import torch, torch.fx
    >>> from torch import nn
    >>> import torch.nn.functional as F
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(7, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         y = F.interpolate(self.a(x), scale_factor=2.0)
    ...         return self.b(torch.cat([y, F.interpolate(x, scale_factor=2.0)], 1))
    >>> m = Tiny()
    >>> tracer = ConvLeafTracer()
    >>> preds = site_predicates(fx_view(tracer.trace(m), m))
    >>> tuple(preds[id(m.b)].values()), tuple(preds[id(m.a)].values())
    ((True, True, True), (False, False, False))
    >>> preds[id(m.b)]
    {'after_concat': True, 'after_upsample': True, 'downstream_of_upsample': True}
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .predicates import predicates
from .runtime.tracer import CAT_FUNCS, UPSAMPLE_FUNCS, LeafTracer

__all__ = [
    "ConvLeafTracer",
    "GraphView",
    "Predicates",
    "fx_view",
    "export_view",
    "site_predicates",
    "normalise_module_path",
]

#: Predicate name → value at one conv module, in registration order.
Predicates = dict[str, bool]

_FX_UPSAMPLE_FUNCS: frozenset[Callable[..., Any]] = frozenset(UPSAMPLE_FUNCS)
_FX_TRANSPOSED_FUNCS = frozenset({F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d})
_FX_CAT_FUNCS = CAT_FUNCS
_FX_PASS_FUNCS = frozenset(
    {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
     torch.clone, torch.reshape, torch.detach}
)
_FX_PASS_METHODS = frozenset(
    {"contiguous", "clone", "view", "reshape", "to", "float", "half", "double", "bfloat16",
     "type", "type_as", "detach"}
)

_ATEN_PASS = frozenset(
    {"clone", "alias", "_to_copy", "to", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
     "feature_alpha_dropout", "contiguous", "view", "reshape", "_unsafe_view", "detach",
     "lift_fresh_copy", "type_as"}
)
_ATEN_CAT = frozenset({"cat", "concat", "concatenate"})
_ATEN_CONV = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
     "convolution", "_convolution"}
)


class ConvLeafTracer(LeafTracer):
    """The runtime's leaf-keeping tracer with every conv module (any ``_ConvNd`` subclass) a leaf.

    ``leaf_types`` and ``autowrap_functions`` add more leaves (timm registers
    its own; see :func:`dsrewrite.runtime.tracer.timm_fx_extras`).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> [n.op for n in ConvLeafTracer().trace(m).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(self, leaf_types: Iterable[type] = (), autowrap_functions: Iterable[Callable[..., Any]] = ()):
        super().__init__(leaf_types=(_ConvNd, *leaf_types), autowrap_functions=autowrap_functions)


@dataclass
class GraphView:
    """What a captured graph says, node by node (see the module docstring).

    ``conv_module`` maps a conv call-site node to its module; ``data_input``
    gives the node a conv site, a pass-through or an upsample reads its tensor
    from; ``cat_inputs`` the tensors a concatenation joins.
    """

    nodes: list[torch.fx.Node]
    conv_module: dict[torch.fx.Node, nn.Module] = field(default_factory=dict)
    upsample: set[torch.fx.Node] = field(default_factory=set)
    cat_inputs: dict[torch.fx.Node, list[torch.fx.Node]] = field(default_factory=dict)
    passthrough: set[torch.fx.Node] = field(default_factory=set)
    data_input: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)
    _downstream: Optional[dict[torch.fx.Node, bool]] = field(default=None, repr=False, compare=False)

    def source(self, node: Optional[torch.fx.Node]) -> Optional[torch.fx.Node]:
        """Walk back from ``node`` over pass-through nodes."""
        seen = set()
        while node is not None and node in self.passthrough and node not in seen:
            seen.add(node)
            node = self.data_input.get(node)
        return node

    def source_of(self, node: torch.fx.Node) -> Optional[torch.fx.Node]:
        """Where the tensor a conv site ``node`` reads comes from, past pass-through nodes."""
        return self.source(self.data_input.get(node))

    def downstream_of_upsample(self, node: torch.fx.Node) -> bool:
        """Whether some upsample lies on some path from the graph's inputs to ``node``."""
        if self._downstream is None:
            down: dict[torch.fx.Node, bool] = {}
            for n in self.nodes:  # graph nodes are in topological order
                down[n] = any(down.get(a, False) or a in self.upsample for a in _node_args((n.args, n.kwargs)))
            self._downstream = down
        return self._downstream.get(node, False)


def _node_args(values: Any) -> Iterator[torch.fx.Node]:
    """Every fx Node in nested args/kwargs."""
    if isinstance(values, torch.fx.Node):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _node_args(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from _node_args(v)


def _first_node(node: torch.fx.Node, key: str = "input") -> Optional[torch.fx.Node]:
    arg = node.args[0] if node.args else node.kwargs.get(key)
    return arg if isinstance(arg, torch.fx.Node) else None


def _stride_above_one(stride: Any) -> bool:
    if stride is None:
        return False
    if isinstance(stride, int):
        return stride > 1
    try:
        return any(int(s) > 1 for s in stride)
    except (TypeError, ValueError):
        return True  # symbolic or unknown: assume it upsamples


def _is_identity_attention(m: nn.Module) -> bool:
    """smp's ``Attention`` (``attention_type=None``) wraps an ``nn.Identity``."""
    return type(m).__name__ == "Attention" and isinstance(getattr(m, "attention", None), nn.Identity)


def fx_view(graph: torch.fx.Graph, root: nn.Module) -> GraphView:
    """Classify the nodes of an fx graph traced from ``root`` (convs as leaves)."""
    view = GraphView(nodes=list(graph.nodes))
    for node in view.nodes:
        src = _first_node(node)
        if node.op == "call_module":
            mod = root.get_submodule(str(node.target))
            if isinstance(mod, _ConvNd):
                view.conv_module[node] = mod
                if isinstance(mod, _ConvTransposeNd) and _stride_above_one(mod.stride):
                    view.upsample.add(node)
            elif isinstance(mod, (nn.Upsample, nn.PixelShuffle)):
                view.upsample.add(node)
            elif isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)) or _is_identity_attention(mod):
                view.passthrough.add(node)
        elif node.op == "call_function":
            tgt = node.target
            if tgt in _FX_UPSAMPLE_FUNCS:
                view.upsample.add(node)
            elif tgt in _FX_TRANSPOSED_FUNCS:
                stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
                if _stride_above_one(stride):
                    view.upsample.add(node)
            elif tgt in _FX_CAT_FUNCS:
                tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
                view.cat_inputs[node] = list(_node_args(tensors))
            elif tgt in _FX_PASS_FUNCS:
                view.passthrough.add(node)
        elif node.op == "call_method" and node.target in _FX_PASS_METHODS:
            view.passthrough.add(node)
        if src is not None:
            view.data_input[node] = src
    return view


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


def _aten_name(target: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; anything else -> ``''``."""
    text = str(target)
    if not text.startswith("aten."):
        return ""
    return text.split(".")[1]


def _stack_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        raw = value[0] if isinstance(value, (tuple, list)) else value
        out.append(normalise_module_path(str(raw) if raw is not None else str(key)))
    return out


def _innermost_key(node: torch.fx.Node) -> Optional[str]:
    """The innermost ``nn_module_stack`` key: distinct per call of a shared module."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack)[-1]) if stack else None


def _resolve(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _transposed(node: torch.fx.Node, name: str) -> tuple[bool, Any]:
    """(is transposed, stride) of an ATen convolution node."""
    stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
    if name.startswith("conv_transpose"):
        return True, stride
    if name in ("convolution", "_convolution"):
        flag = node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed", False)
        return bool(flag), stride
    return False, stride


def export_view(graph: torch.fx.Graph, root: nn.Module) -> GraphView:
    """Classify the nodes of a ``torch.export`` graph of ``root``.

    Each convolution node is mapped back to its module through the innermost
    entry of ``node.meta["nn_module_stack"]``; a conv node whose innermost
    module is no conv module is a functional call and is not a site. The site's
    input is found by walking back over ops inside the conv module itself
    (e.g. the ``pad`` of timm's ``Conv2dSame``).
    """
    view = GraphView(nodes=list(graph.nodes))
    for node in view.nodes:
        if node.op != "call_function":
            continue
        name = _aten_name(node.target)
        src = _first_node(node)
        if name in _ATEN_CONV:
            transposed, stride = _transposed(node, name)
            if transposed and _stride_above_one(stride):
                view.upsample.add(node)
            paths = _stack_paths(node)
            mod = _resolve(root, paths[-1]) if paths else None
            if isinstance(mod, _ConvNd):
                view.conv_module[node] = mod
                own = _innermost_key(node)
                while (src is not None and src.op == "call_function"
                       and _aten_name(src.target) not in _ATEN_CONV and _innermost_key(src) == own):
                    src = _first_node(src)
        elif name.startswith(("upsample_", "_upsample_")) or name == "pixel_shuffle":
            view.upsample.add(node)
        elif name in _ATEN_CAT:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            view.cat_inputs[node] = list(_node_args(tensors))
        elif name in _ATEN_PASS:
            view.passthrough.add(node)
        elif node.target is operator.getitem and src is not None and _aten_name(src.target) == "native_dropout":
            view.passthrough.add(node)
        if src is not None:
            view.data_input[node] = src
    return view


def site_predicates(view: GraphView) -> dict[int, Predicates]:
    """Per conv module (keyed by ``id(module)``), every registered predicate OR-ed over its call sites."""
    registered = predicates()
    out: dict[int, Predicates] = {}
    for node, mod in view.conv_module.items():
        prev = out.get(id(mod), {p.name: False for p in registered})
        out[id(mod)] = {p.name: prev[p.name] or bool(p.holds(view, node)) for p in registered}
    return out
