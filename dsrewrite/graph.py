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

"Comes from" looks through the transparent nodes of :mod:`dsrewrite.graph_vocab`
(norms, element-wise activations, dropout, identity, casts, channel-keeping pads and
crops, gates). A concatenation counts only along the channel dimension. Upsamples are
``F.interpolate`` and ``nn.Upsample*``, pixel shuffle, and transposed convolutions with
a stride above 1 (a stride-1 transposed conv does not raise the resolution).

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
    ((True, True, True, False, False), (False, False, False, False, False))
    >>> preds[id(m.b)]
    {'after_concat': True, 'after_upsample': True, 'downstream_of_upsample': True, 'final_predictor': False, 'after_bottleneck': False}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .predicates import predicates
from .graph_vocab import aten_name as _aten_name
from .graph_vocab import cat_tensors, ndim, normalise_module_path, stack_paths, transparent_input
from .runtime.tracer import UPSAMPLE_FUNCS, LeafTracer

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
    from; ``cat_inputs`` the tensors a channel concatenation joins; ``final`` the ids of
    the conv modules that are final predictors (filled by the capture, see
    :mod:`dsrewrite.planning.final`).
    """

    nodes: list[torch.fx.Node]
    conv_module: dict[torch.fx.Node, nn.Module] = field(default_factory=dict)
    upsample: set[torch.fx.Node] = field(default_factory=set)
    cat_inputs: dict[torch.fx.Node, list[torch.fx.Node]] = field(default_factory=dict)
    passthrough: set[torch.fx.Node] = field(default_factory=set)
    data_input: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)
    final: set[int] = field(default_factory=set)
    _downstream: Optional[dict[torch.fx.Node, bool]] = field(default=None, repr=False, compare=False)
    _past_bottleneck: Optional[set[torch.fx.Node]] = field(default=None, repr=False, compare=False)

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


    def after_bottleneck(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` runs downstream of the bottleneck: the last conv site (in graph order) at the
        smallest output spatial size, convs with a 1×1 output (global-context branches) aside.

        Needs the node shapes the graph recorded (fx after a verified run, export always); False without.
        """
        if self._past_bottleneck is None:
            sizes = {n: s for n in self.conv_module if (s := _spatial(n)) is not None and s > 1}
            past: set[torch.fx.Node] = set()
            if sizes:
                smallest = min(sizes.values())
                deepest = [n for n in self.nodes if sizes.get(n) == smallest][-1]
                stack = list(deepest.users)
                while stack:
                    n = stack.pop()
                    if n not in past:
                        past.add(n)
                        stack.extend(n.users)
            self._past_bottleneck = past
        return node in self._past_bottleneck


def _spatial(node: torch.fx.Node) -> Optional[int]:
    """Spatial size (product of the dims after N, C) of a node's tensor when the graph recorded its shape."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None or len(shape) < 3:
        return None
    out = 1
    for d in shape[2:]:
        try:
            out *= int(d)
        except (TypeError, ValueError):
            return None
    return out


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


def _classify_common(view: GraphView, node: torch.fx.Node, modules: dict[str, nn.Module]) -> None:
    """Channel concats and transparent nodes (the shared vocabulary); data inputs of every node."""
    tensors = cat_tensors(node, ndim(node))
    if tensors is not None:
        view.cat_inputs[node] = tensors
        return
    through = transparent_input(node, modules)
    if through is not None:
        view.passthrough.add(node)
        view.data_input[node] = through
        return
    src = _first_node(node)
    if src is not None:
        view.data_input[node] = src


def fx_view(graph: torch.fx.Graph, root: nn.Module) -> GraphView:
    """Classify the nodes of an fx graph traced from ``root`` (convs as leaves)."""
    view = GraphView(nodes=list(graph.nodes))
    modules = dict(root.named_modules())
    for node in view.nodes:
        if node.op == "call_module":
            mod = modules[str(node.target)]
            if isinstance(mod, _ConvNd):
                view.conv_module[node] = mod
                if isinstance(mod, _ConvTransposeNd) and _stride_above_one(mod.stride):
                    view.upsample.add(node)
            elif isinstance(mod, (nn.Upsample, nn.PixelShuffle)):
                view.upsample.add(node)
        elif node.op == "call_function":
            tgt = node.target
            if tgt in _FX_UPSAMPLE_FUNCS:
                view.upsample.add(node)
            elif tgt in _FX_TRANSPOSED_FUNCS:
                stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
                if _stride_above_one(stride):
                    view.upsample.add(node)
        if node in view.conv_module or node in view.upsample:
            src = _first_node(node)
            if src is not None:
                view.data_input[node] = src
        else:
            _classify_common(view, node, modules)
    return view


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
    modules = dict(root.named_modules())
    for node in view.nodes:
        if node.op != "call_function":
            continue
        name = _aten_name(node.target)
        src = _first_node(node)
        if name in _ATEN_CONV:
            transposed, stride = _transposed(node, name)
            if transposed and _stride_above_one(stride):
                view.upsample.add(node)
            paths = stack_paths(node)
            mod = _resolve(root, paths[-1]) if paths else None
            if isinstance(mod, _ConvNd):
                view.conv_module[node] = mod
                own = _innermost_key(node)
                while (src is not None and src.op == "call_function"
                       and _aten_name(src.target) not in _ATEN_CONV and _innermost_key(src) == own):
                    src = _first_node(src)
        elif name.startswith(("upsample_", "_upsample_")) or name == "pixel_shuffle":
            view.upsample.add(node)
        else:
            _classify_common(view, node, modules)
            continue
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
