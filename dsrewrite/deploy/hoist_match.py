# SPDX-License-Identifier: Apache-2.0
"""Finding what the hoist rewrites: the fx trace of a module and the upsample (→ concat) → pointwise patterns in it.

:mod:`dsrewrite.deploy.hoist` rewrites each pattern found here and checks the result.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..kinds import kind_of
from ..layers import DepthwiseSeparableConv2d
from ..runtime.tracer import CAT_FUNCS, UPSAMPLE_FUNCS, LeafTracer

__all__ = ["HOIST_MODES", "Match", "find_matches", "first_line", "has_hooks", "match_owner", "match_problem",
           "node_shape", "trace_module"]

#: Interpolation modes the pointwise stage is hoisted across.
HOIST_MODES: tuple[str, ...] = ("nearest", "bilinear")

#: Interpolation functions recognised, with the mode they fix (``None``: read ``mode=``).
_UPSAMPLE_FUNCS: dict[Callable[..., Any], Optional[str]] = {
    f: mode for f, mode in UPSAMPLE_FUNCS.items() if f is not F.pixel_shuffle  # interpolations only
}


# --------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------
class _Tracer(LeafTracer):
    """Convs, separable blocks and already-rewritten modules stay leaves; nodes remember
    the module whose forward created them (``meta['hoist_scope']``)."""

    def __init__(self, leaf_ids: set[int]) -> None:
        super().__init__(leaf_types=(nn.Conv2d, DepthwiseSeparableConv2d), leaf_ids=leaf_ids)
        self._scopes = [""]

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self._scopes.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scopes.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> Node:
        node = super().create_node(*args, **kwargs)
        node.meta["hoist_scope"] = self._scopes[-1]
        return node


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace_module(module: nn.Module, leaf_ids: set[int], concrete: dict[str, Any]) -> torch.fx.Graph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = _Tracer(leaf_ids).trace(module, concrete_args=concrete or None)
    # fx renames a placeholder fixed by concrete_args (``skip`` → ``skip_1``): restore the
    # parameter names so that keyword calls keep working.
    params = list(inspect.signature(module.forward).parameters)
    for node, name in zip([n for n in graph.nodes if n.op == "placeholder"], params):
        node.target = name
    return graph


# --------------------------------------------------------------------------------------
# Finding the pattern
# --------------------------------------------------------------------------------------
@dataclass
class _Up:
    node: Node
    source: Any
    desc: str
    problem: str


@dataclass
class _Part:
    node: Any  # the tensor the pointwise sees (a concat input, or the conv input)
    chain: list[Node]  # identities between the upsample and ``node``, nearest to ``node`` first
    up: Optional[_Up]


@dataclass
class Match:
    conv_node: Node
    conv: nn.Module
    cat: Optional[Node]
    post: list[Node]  # identities between the concat/upsample and the conv, nearest to the conv first
    parts: list[_Part] = field(default_factory=list)


def _as_upsample(node: Any, root: nn.Module) -> Optional[_Up]:
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target in _UPSAMPLE_FUNCS:
        name = node.target.__name__  # type: ignore[union-attr]
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            return _Up(node, None, name, f"{name} arguments not understood ({exc})")
        mode = _UPSAMPLE_FUNCS[node.target] or bound.arguments.get("mode", "nearest")  # type: ignore[index]
        source = bound.arguments.get("input")
    elif node.op == "call_module" and isinstance(root.get_submodule(str(node.target)), nn.Upsample):
        mod = root.get_submodule(str(node.target))
        name, mode = f"{type(mod).__name__} {node.target!r}", mod.mode
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if type(mod).forward is not nn.Upsample.forward or has_hooks(mod):
            return _Up(node, source, name, f"{name} has its own forward or hooks")
    else:
        return None
    desc = f"{name}(mode={mode!r})"
    problem = ""
    if mode not in HOIST_MODES:
        problem = (
            f"{desc}: only modes {list(HOIST_MODES)} are hoisted across (per-channel, constant-preserving "
            "interpolations); the block stays as it is"
        )
    elif not isinstance(source, Node):
        problem = f"{desc}: its input is not a traced tensor"
    return _Up(node, source, desc, problem)


def _is_identity(node: Any, root: nn.Module) -> bool:
    if not (isinstance(node, Node) and node.op == "call_module"):
        return False
    mod = root.get_submodule(str(node.target))
    return (
        isinstance(mod, nn.Identity) and type(mod).forward is nn.Identity.forward and not has_hooks(mod)
        and len(node.args) == 1 and not node.kwargs
    )


def _walk_back(node: Any, root: nn.Module) -> tuple[Any, list[Node]]:
    chain: list[Node] = []
    while _is_identity(node, root):
        chain.append(node)
        node = node.args[0]
    return node, chain


def _cat_args(node: Node) -> tuple[Any, Any]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return tensors, dim


def find_matches(graph: torch.fx.Graph, root: nn.Module) -> list[Match]:
    matches = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(root.get_submodule(str(node.target)), DepthwiseSeparableConv2d):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src, post = _walk_back(node.args[0], root)
        match = Match(node, root.get_submodule(str(node.target)), None, post)
        up = _as_upsample(src, root)
        if up is not None:
            match.parts = [_Part(src, [], up)]
        elif isinstance(src, Node) and src.op == "call_function" and src.target in CAT_FUNCS:
            tensors, _ = _cat_args(src)
            if not isinstance(tensors, (list, tuple)):
                continue
            match.cat = src
            for t in tensors:
                s, chain = _walk_back(t, root)
                match.parts.append(_Part(t, chain, _as_upsample(s, root)))
            if not any(p.up for p in match.parts):
                continue
        else:
            continue
        matches.append(match)
    return matches


def _scope(node: Node) -> str:
    if node.op == "call_module":
        return str(node.target).rpartition(".")[0]
    return str(node.meta.get("hoist_scope", ""))


def match_owner(match: Match) -> str:
    """The innermost module path (relative to the traced module) whose forward holds the whole match."""
    nodes = [match.conv_node, *match.post, *([match.cat] if match.cat else [])]
    for p in match.parts:
        nodes += p.chain + ([p.up.node] if p.up else [])
    paths = [_scope(n).split(".") if _scope(n) else [] for n in nodes]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def node_shape(node: Any) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def match_problem(match: Match, root: nn.Module, calls: Counter, held: Counter) -> str:
    """Why ``match`` cannot be hoisted, or ``""``."""
    ds, target = match.conv, str(match.conv_node.target)
    kind = kind_of(ds)
    stages = kind.stages(ds) if kind is not None else None
    if kind is None or stages is None:
        return f"block {target!r} is a {type(ds).__qualname__} with its own forward"
    if kind.hoist_refusal is not None:
        return f"block {target!r} has order {kind.name!r}: {kind.hoist_refusal}"
    pw = ds.get_submodule(stages.first)
    if has_hooks(ds) or has_hooks(pw):
        return f"block {target!r} or its pointwise stage has hooks, which the rewrite would bypass"
    if type(pw) is not nn.Conv2d or pw.groups != 1:
        return (
            f"the pointwise stage of {target!r} is a {type(pw).__name__} with groups={getattr(pw, 'groups', '?')}; "
            "only plain groups=1 convs are split"
        )
    if tuple(pw.kernel_size) != (1, 1) or tuple(pw.stride) != (1, 1) or pw.padding not in ((0, 0), "valid"):
        return f"the pointwise stage of {target!r} is not a 1×1, stride-1, unpadded conv"
    if calls[target] != 1 or held[id(ds)] != 1 or held[id(pw)] != 1:
        return f"block {target!r} is shared (called {calls[target]}×, held under {held[id(ds)]} names)"
    chain = list(match.post)
    if match.cat is not None:
        tensors, dim = _cat_args(match.cat)
        shape = node_shape(match.cat)
        ndim = len(shape) if shape else 4
        if not isinstance(dim, int) or dim % ndim != 1:
            return f"the concatenation before {target!r} is on dim={dim!r}, not the channel dim 1"
        if len(tensors) != len(set(tensors)):
            return f"the concatenation before {target!r} repeats an input"
        chain.append(match.cat)
    for p in match.parts:
        chain += p.chain
        if p.up is not None:
            if p.up.problem:
                return p.up.problem
            chain.append(p.up.node)
    for n in chain:
        if len(n.users) != 1:
            others = sorted(u.name for u in n.users)
            return (
                f"intermediate {n.name!r} before {target!r} has {len(n.users)} users ({others}); "
                "it must feed only the block"
            )
    channels = 0
    for p in match.parts:
        shape = node_shape(p.node)
        if shape is None or len(shape) != 4:
            return f"no 4-d shape recorded for {getattr(p.node, 'name', p.node)!r} on the example input"
        channels += shape[1]
        if p.up is not None:
            low = node_shape(p.up.source)
            if low is None or len(low) != 4 or low[1] != shape[1]:
                return f"no 4-d shape recorded for the input of {p.up.desc}"
            if shape[2] * shape[3] <= low[2] * low[3]:
                return (
                    f"{p.up.desc} does not enlarge ({low[2]}×{low[3]} → {shape[2]}×{shape[3]}): "
                    "hoisting saves nothing"
                )
    if channels != pw.in_channels:
        return f"the inputs of {target!r} have {channels} channels, its pointwise stage expects {pw.in_channels}"
    return ""


