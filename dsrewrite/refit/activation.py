# SPDX-License-Identifier: Apache-2.0
"""Which convs feed straight into a ReLU (through at most an eval-mode BatchNorm2d).

Calibration can fit a block through the activation that follows it
(:mod:`dsrewrite.relu_fit`) only when that activation is exactly ``ReLU(a·y + c)`` per
channel and nothing else reads the conv's raw output. :func:`following_relus` reads
this off the model's graph, with the same vocabulary as the graph predicates
(:mod:`dsrewrite.graph_vocab`): a conv call site whose only user, past nodes that return
their input unchanged at inference (``nn.Identity``, dropout, dtype/contiguity casts), is

* a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``aten.relu``, in place or not): ``a = 1``, ``c = 0``;
* or an ``nn.BatchNorm2d`` using running statistics (eval mode), whose only user (past such
  nodes) is such a ReLU: ``a = γ / √(σ² + ε)``, ``c = β − μ·a``.

The graph is ``torch.fx``'s (convs kept as leaves, as in :mod:`dsrewrite.capture`); with
``example_inputs`` it is verified against eager, and when fx cannot trace the model or its
graph is not the model, ``torch.export``'s (non-strict, verified too) is read instead.
Anything else (a residual add, a BN subclass, no graph) is left out and calibrated on the
conv's output as before.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    >>> found, note = following_relus(net, ["0", "3"])
    >>> sorted(found), found["0"].via, note
    (['0'], 'BatchNorm2d 1 + ReLU 2', '')
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..graph import ConvLeafTracer
from ..graph_vocab import aten_name, batchnorm_of, identity_input, is_relu, module_of
from ..planning.verify import compare_outputs, seeded
from ..runtime.run import call_model
from ..runtime.tracer import timm_fx_extras

__all__ = ["FollowingReLU", "following_relus"]


@dataclass(frozen=True)
class FollowingReLU:
    """The activation after conv ``name``: ``ReLU(scale·y + shift)`` per output channel (float64)."""

    name: str
    via: str
    scale: Tensor
    shift: Tensor


def _bn_affine(bn: nn.BatchNorm2d) -> Optional[tuple[Tensor, Tensor]]:
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    mean = bn.running_mean.detach().to(torch.float64)
    inv = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * inv
    return scale.cpu(), (beta - mean * scale).cpu()


def _only_user(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Optional[torch.fx.Node]:
    """The single user of ``node``, past identity-like nodes (dropout, identity, casts); None if shared."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_function" and user.target is operator.getitem:
            return None  # a tuple-returning op, or relu(x) + x via getitem
        if identity_input(user, modules) is node:
            node = user
            continue
        return user


class _Graph:
    """One graph to read: fx (``call_module`` conv sites) or ATen (conv ops mapped back to modules)."""

    def __init__(self, graph: torch.fx.Graph, model: nn.Module, aten: bool):
        self.graph, self.model, self.aten = graph, model, aten
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}

    def conv_sites(self, wanted: set[str]) -> list[tuple[str, torch.fx.Node]]:
        out = []
        for node in self.graph.nodes:
            if not self.aten and node.op == "call_module" and str(node.target) in wanted:
                out.append((str(node.target), node))
            elif self.aten and node.op == "call_function" and aten_name(node.target).startswith(("conv", "_conv")):
                mod = module_of(node, self.model)
                name = self.names.get(id(mod)) if isinstance(mod, _ConvNd) else None
                if name in wanted:
                    out.append((name, node))
        return out

    def bn(self, node: torch.fx.Node) -> tuple[Optional[nn.BatchNorm2d], torch.fx.Node]:
        """(the BatchNorm2d ``node`` runs, the node carrying its result) or (None, node)."""
        bn = batchnorm_of(node, self.modules, self.model)
        if bn is not None and self.aten and aten_name(node.target) != "batch_norm":
            users = list(node.users)  # native forms return a tuple: item 0 is the result
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return None, node
            node = users[0]
        return bn, node

    def label(self, node: torch.fx.Node, kind: str) -> str:
        if node.op == "call_module":
            return f"{kind} {node.target}"
        mod = module_of(node, self.model) if self.aten else None
        name = self.names.get(id(mod)) if mod is not None and type(mod).__name__ == kind else None
        return f"{kind} {name}" if name else kind


def following_relus(model: nn.Module, names: Sequence[str],
                    example_inputs: Any = None) -> tuple[dict[str, FollowingReLU], str]:
    """``{conv name: FollowingReLU}`` for the named convs followed only by (BN +) ReLU, and a note.

    The model should be in eval mode (a BatchNorm in training mode does not count).
    ``example_inputs`` (a tensor, a tuple of positional args or a dict of kwargs) lets the
    graph be verified against eager and ``torch.export`` stand in for fx. The note is ``""``
    or says why nothing could be found. A conv called more than once (shared) is included
    only if every call site qualifies with the same BatchNorm.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        >>> found, _ = following_relus(net, ["0"], torch.randn(1, 3, 8, 8))
        >>> found["0"].scale.tolist(), found["0"].via
        ([1.0, 1.0, 1.0, 1.0], 'ReLU 1')
    """
    wanted = set(names)
    if not wanted:
        return {}, ""
    graph, why = _read_graph(model, example_inputs)
    if graph is None:
        return {}, f"activation-aware refit off: {why}; every layer is fitted on its conv output"
    found: dict[str, FollowingReLU] = {}
    refused: set[str] = set()
    for name, node in graph.conv_sites(wanted):
        rec = _site(node, name, graph)
        if rec is None or name in refused or (name in found and found[name].via != rec.via):
            refused.add(name)
            found.pop(name, None)
        else:
            found[name] = rec
    return found, ""


def _read_graph(model: nn.Module, example_inputs: Any) -> tuple[Optional[_Graph], str]:
    """The verified fx graph, else the verified export graph; or None and why."""
    eager: Any = None
    if example_inputs is not None:
        with torch.no_grad(), seeded():
            eager = call_model(model, example_inputs)
    leaves, funcs = timm_fx_extras(model)
    try:
        tracer = ConvLeafTracer(leaf_types=leaves, autowrap_functions=funcs)
        gm = torch.fx.GraphModule(model, tracer.trace(model))
        fx_why = "" if example_inputs is None else _wrong(lambda: call_model(gm, example_inputs), eager)
    except Exception as e:  # fx raises many kinds; all mean "cannot trace"
        fx_why = f"torch.fx could not trace the original model ({_line(e)})"
    else:
        if not fx_why:
            return _Graph(gm.graph, model, aten=False), ""
        fx_why = f"torch.fx's graph of the original model is not the model ({fx_why})"
    if example_inputs is None:
        return None, fx_why
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        () if isinstance(example_inputs, Mapping) else (example_inputs,))
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else None
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # export raises many kinds; all mean "cannot capture"
        return None, f"{fx_why}, and torch.export failed too ({_line(e)})"
    ex_why = _wrong(lambda: program.module()(*args, **(kwargs or {})), eager)
    if ex_why:
        return None, f"{fx_why}, and torch.export's graph is not the model either ({ex_why})"
    return _Graph(program.graph, model, aten=True), ""


def _wrong(fn: Callable[[], Any], eager: Any) -> str:
    try:
        with torch.no_grad(), seeded():
            got = fn()
    except Exception as e:  # a wrong graph fails in many ways
        return f"it fails on the inputs: {_line(e)}"
    ok, why = compare_outputs(eager, got)
    return "" if ok else why


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _site(node: torch.fx.Node, name: str, graph: _Graph) -> Optional[FollowingReLU]:
    nxt = _only_user(node, graph.modules)
    if nxt is None:
        return None
    c_out = int(getattr(graph.modules[name], "out_channels", 0))
    if is_relu(nxt, graph.modules):
        ones = torch.ones(c_out, dtype=torch.float64)
        return FollowingReLU(name, graph.label(nxt, "ReLU"), ones, torch.zeros_like(ones))
    bn, out = graph.bn(nxt)
    if bn is None:
        return None
    affine = _bn_affine(bn)
    after = _only_user(out, graph.modules)
    if affine is None or after is None or not is_relu(after, graph.modules) or affine[0].numel() != c_out:
        return None
    return FollowingReLU(name, f"{graph.label(nxt, 'BatchNorm2d')} + {graph.label(after, 'ReLU')}",
                         affine[0], affine[1])
