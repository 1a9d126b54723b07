# SPDX-License-Identifier: Apache-2.0
"""Hoist the pointwise stage of a ``pw_dw`` block above the upsample that feeds it.

A 1×1 conv (stride 1, no padding, ``groups=1``) mixes channels pixel by pixel, and
nearest/bilinear interpolation acts on every channel alike and keeps constants, so

* ``pw(up(x)) == up(pw(x))`` and
* ``pw(cat([up(x), skip], 1)) == up(pw_x(x)) + pw_skip(skip)``,

where ``pw_x``/``pw_skip`` are the pointwise weight split along its input channels (a
bias, present only after BN folding into the first stage, goes on a part that is not
upsampled when there is one). The pointwise on the upsampled part then runs at the low
resolution (``1/s²`` of its MACs for an upsample by ``s``) and the concatenation copy at
the high resolution disappears. Only the linear pointwise moves: the block's
``mid_norm``/``mid_act`` and its depthwise stage run after the sum, as before.

The pattern, inside one module's ``torch.fx`` trace (convs and
:class:`~dsrewrite.layers.DepthwiseSeparableConv2d` kept as leaves):
``F.interpolate``/``F.upsample*``/``nn.Upsample`` (mode ``nearest`` or ``bilinear``)
→ optionally ``torch.cat(dim=1)`` (the upsampled tensor at any position, several
upsampled inputs allowed) → optionally ``nn.Identity`` modules → a ``pw_dw`` block,
every node in between used only by the next one. Modules are visited children first;
the smallest module whose forward holds the whole pattern is replaced in its parent by
a ``GraphModule`` (class name ``Hoisted<Class>``); the model's own class is kept unless
the pattern sits in the root's forward. Like any fx trace, the ``GraphModule`` fixes the
Python attributes its forward read (an interpolation mode, a flag) at their values then:
this is a deployment-time transform, applied last.

An example input is required: it tells the channels of each concatenated tensor and
the resolutions (for ``macs_saved``), fixes arguments observed as ``None`` (smp's last
decoder block has no skip; the traced graph asserts they stay ``None``), and every
rewritten module is checked against the original on the observed call
(dtype-aware tolerance of :func:`dsrewrite.deploy.parity_tolerance`), else declined.

Declined, with a reason in a record and the module left as it was: ``dw_pw`` blocks,
other interpolation modes (bicubic, area, ...), grouped or strided pointwise stages,
concatenation on another dim, intermediate tensors with other users, blocks held under
several names or called several times, modules with hooks, modules called more than
once or not at all on the example input, interpolations that do not enlarge. Modules
that do not trace get a record saying so.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> net = nn.Sequential(nn.Upsample(scale_factor=2.0),
    ...                     DepthwiseSeparableConv2d(8, 16, 3, padding=1, order="pw_dw")).eval()
    >>> x = torch.randn(1, 8, 16, 16)
    >>> hoisted, records = hoist_pointwise(net, x)
    >>> [(r.conv, r.hoisted, r.macs_saved) for r in records]
    [('1', True, 98304)]
    >>> torch.allclose(hoisted(x), net(x), atol=1e-5), type(hoisted).__name__
    (True, 'HoistedSequential')
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UsageError
from ..kinds import Stages, kind_of
from ..layers import DepthwiseSeparableConv2d
from ..runtime.modules import join as _join
from ..runtime.modules import set_submodule as _set_submodule
from ..runtime.run import evaluating, flatten_outputs, run_model
from ..runtime.tolerance import parity_tolerance
from .hoist_match import (
    HOIST_MODES,
    Match,
    find_matches,
    first_line,
    has_hooks,
    match_owner,
    match_problem,
    node_shape,
    trace_module,
)

__all__ = ["HOIST_MODES", "HoistRecord", "HoistResult", "HoistInputError", "hoist_pointwise"]

class HoistInputError(UsageError):
    """``hoist_pointwise`` was called with something that is not a model."""


@dataclass(frozen=True)
class HoistRecord:
    """One ``pw_dw`` block found after an upsample (or one module that could not be examined).

    ``module``: qualified name of the module whose forward holds the pattern (``""`` = the
    root), now a ``GraphModule`` when ``hoisted``; ``conv``: qualified name of the block in
    the original model (``""`` for a module that did not trace); ``reason``: why it was
    declined (``""`` when hoisted). ``hoisted_channels`` are the input channels of the
    pointwise that now run before the upsample, ``other_channels`` those that stay at
    full resolution, ``mid_channels`` the pointwise's outputs (``depth_multiplier·C_out``);
    ``macs_saved = N·hoisted_channels·mid_channels·(H·W − h·w)`` summed over the
    upsampled inputs, on the example input (FLOPs = 2×MACs).
    """

    module: str
    conv: str
    hoisted: bool
    reason: str = ""
    upsample: str = ""
    concat: bool = False
    hoisted_channels: int = 0
    other_channels: int = 0
    mid_channels: int = 0
    macs_saved: int = 0


class HoistResult(NamedTuple):
    """``(model, records)``; unpack it or use :attr:`hoisted` and :attr:`macs_saved`."""

    model: nn.Module
    records: list[HoistRecord]

    @property
    def hoisted(self) -> list[HoistRecord]:
        """The records of the blocks that were rewritten."""
        return [r for r in self.records if r.hoisted]

    @property
    def macs_saved(self) -> int:
        """MACs saved on the example input, over all rewritten blocks."""
        return sum(r.macs_saved for r in self.records)


# --------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------
def _split_pointwise(pw: nn.Conv2d, start: int, stop: int, bias: bool) -> nn.Conv2d:
    w = pw.weight
    new = nn.Conv2d(stop - start, pw.out_channels, 1, bias=bias and pw.bias is not None, device=w.device, dtype=w.dtype)
    fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    with torch.no_grad():
        new.weight = nn.Parameter(w.detach()[:, start:stop].contiguous(memory_format=fmt).clone(),
                                  requires_grad=w.requires_grad)
        if new.bias is not None:
            new.bias.copy_(pw.bias.detach())  # type: ignore[union-attr]
            new.bias.requires_grad_(pw.bias.requires_grad)  # type: ignore[union-attr]
    new.train(pw.training)
    return new


def _stages(block: nn.Module) -> Stages:
    """The stages of a block :func:`_problem` accepted (its kind knows its forward)."""
    kind = kind_of(block)
    stages = kind.stages(block) if kind is not None else None
    assert stages is not None  # _problem declined every other block
    return stages


def _rewrite(graph: torch.fx.Graph, match: Match, new_modules: dict[str, nn.Module], name: str,
             conv: str) -> HoistRecord:
    """Replace ``match`` in ``graph``; new pointwise modules go into ``new_modules``."""
    ds, target = match.conv, str(match.conv_node.target)
    stages = _stages(ds)
    pw = ds.get_submodule(stages.first)
    bias_at = next((i for i, p in enumerate(match.parts) if p.up is None), 0)
    single = len(match.parts) == 1
    outs, start, hoisted, other, saved, descs = [], 0, 0, 0, 0, []
    with graph.inserting_before(match.conv_node):
        for i, p in enumerate(match.parts):
            shape = node_shape(p.node)
            c = shape[1]  # type: ignore[index]
            part = f"{target}.{stages.first}" if single else f"{target}.{stages.first}_part{i}"
            new_modules[part] = _split_pointwise(pw, start, start + c, bias=i == bias_at)
            start += c
            if p.up is None:
                outs.append(graph.create_node("call_module", part, (p.node,)))
                other += c
                continue
            low = node_shape(p.up.source)
            mixed = graph.create_node("call_module", part, (p.up.source,))
            up = p.up.node
            args = tuple(mixed if a is p.up.source else a for a in up.args)
            kwargs = {k: (mixed if v is p.up.source else v) for k, v in up.kwargs.items()}
            outs.append(graph.create_node(up.op, up.target, args, kwargs))
            hoisted += c
            saved += shape[0] * c * pw.out_channels * (shape[2] * shape[3] - low[2] * low[3])  # type: ignore[index]
            descs.append(p.up.desc)
        acc = outs[0]
        for o in outs[1:]:  # in place: ``acc`` is a fresh tensor used only here
            acc = graph.call_method("add_", (acc, o))
        for stage in ("mid_norm", "mid_act"):
            if not isinstance(getattr(ds, stage), nn.Identity):
                acc = graph.create_node("call_module", f"{target}.{stage}", (acc,))
        out = graph.create_node("call_module", f"{target}.{stages.last}", (acc,))
    match.conv_node.replace_all_uses_with(out)
    dead = [match.conv_node, *match.post, *([match.cat] if match.cat else [])]
    for p in match.parts:
        dead += p.chain + ([p.up.node] if p.up else [])
    for n in dead:
        graph.erase_node(n)
    return HoistRecord(name, conv, True, "", ", ".join(dict.fromkeys(descs)), match.cat is not None,
                       hoisted, other, pw.out_channels, saved)


def _fetch(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _build(module: nn.Module, graph: torch.fx.Graph, new_modules: dict[str, nn.Module]) -> torch.fx.GraphModule:
    owned = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            owned[n.target] = new_modules[n.target] if n.target in new_modules else _fetch(module, n.target)
    gm = torch.fx.GraphModule(owned, graph, class_name=f"Hoisted{type(module).__name__}")
    keep = {id(m) for m in module.modules()} | {id(m) for m in new_modules.values()}
    for m in gm.modules():  # containers made by GraphModule follow the module's train flag
        if id(m) not in keep:
            m.training = module.training
    return gm


# --------------------------------------------------------------------------------------
# Observing calls, checking
# --------------------------------------------------------------------------------------
def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _observe(model: nn.Module, modules: dict[str, nn.Module], example_inputs: Any) -> dict[str, list[tuple]]:
    seen: dict[str, list[tuple]] = {name: [] for name in modules}
    handles = []
    for name, mod in modules.items():
        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            seen[name].append((_clone(args), _clone(kwargs)))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), evaluating(model):
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _flat(out: Any) -> list[Tensor]:
    return [t for _, t in flatten_outputs(out)]


def _mismatch(original: nn.Module, new: nn.Module, call: tuple) -> str:
    args, kwargs = call
    with torch.no_grad(), evaluating(original, new):
        ref = _flat(original(*_clone(args), **_clone(kwargs)))
        got = _flat(new(*_clone(args), **_clone(kwargs)))
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        return "the rewritten module's outputs differ in number or shape from the original's"
    for r, g in zip(ref, got):
        if r.is_floating_point() and r.numel():
            diff = (g.double() - r.double()).abs().max().item()
            tol = parity_tolerance(r)
            if not diff <= tol:
                return f"the rewritten module differs from the original by max |Δ| = {diff:.3g} > {tol:.3g}"
    return ""


# --------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a separable block strictly below them, children before parents."""
    inside = {id(c) for m in model.modules() if isinstance(m, DepthwiseSeparableConv2d) for c in m.modules()}
    found = []
    for name, m in model.named_modules():
        if id(m) in inside or type(m).forward is nn.Module.forward:  # ModuleList/ModuleDict have no forward
            continue
        if any(isinstance(c, DepthwiseSeparableConv2d) for c in m.modules() if c is not m):
            found.append((name, m))
    return sorted(found, key=lambda item: -(item[0].count(".") + 1 if item[0] else 0))


class _Examined(NamedTuple):
    module: Optional[torch.fx.GraphModule]
    records: list[HoistRecord]


def _module_problem(name: str, module: nn.Module, calls_seen: list[tuple], held: Counter) -> str:
    where = f"module {name!r}" if name else "the root module"
    if held[id(module)] != 1:
        return f"{where} is held under {held[id(module)]} names (shared): rewriting it for one would change the others"
    if has_hooks(module):
        return f"{where} has hooks, which a GraphModule in its place would not run"
    if len(calls_seen) != 1:
        return f"{where} ran {len(calls_seen)} times on the example input; only modules called once are rewritten"
    return ""


def _examine(name: str, module: nn.Module, calls_seen: list[tuple], held: Counter,
             leaf_ids: set[int], traced_ids: set[int]) -> _Examined:
    """Trace ``module``, find its own patterns, rewrite those that qualify and check the result."""
    problem = _module_problem(name, module, calls_seen, held)
    args, kwargs = calls_seen[0] if calls_seen else ((), {})
    try:
        sig = inspect.signature(module.forward)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            raise TypeError("forward takes *args or **kwargs")
        concrete: dict[str, Any] = {}
        if calls_seen:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            concrete = {k: None for k, v in bound.arguments.items() if v is None}
        graph = trace_module(module, leaf_ids, concrete)
    except Exception as exc:  # a module that does not trace is only reported
        return _Examined(None, [HoistRecord(name, "", False, f"does not trace: {first_line(exc)}")])
    traced_ids.add(id(module))
    below = traced_ids - {id(module)}
    matches = [m for m in find_matches(graph, module) if id(module.get_submodule(match_owner(m))) not in below]
    if not matches:
        return _Examined(None, [])
    convs = [_join(name, str(m.conv_node.target)) for m in matches]
    if not problem:
        problem = _hooks_lost(name, module, graph)
    if problem:
        return _Examined(None, [HoistRecord(name, c, False, problem) for c in convs])
    _propagate_shapes(module, graph, [bound.arguments[n.target] for n in graph.nodes if n.op == "placeholder"])
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    records, new_modules = [], {}
    for m, conv in zip(matches, convs):
        reason = match_problem(m, module, calls, held)
        done = HoistRecord(name, conv, False, reason) if reason else _rewrite(graph, m, new_modules, name, conv)
        records.append(done)
    if not any(r.hoisted for r in records):
        return _Examined(None, records)
    graph.lint()
    gm = _build(module, graph, new_modules)
    mismatch = _mismatch(module, gm, (args, kwargs))
    if mismatch:
        return _Examined(None, [r if not r.hoisted else HoistRecord(name, r.conv, False, mismatch) for r in records])
    return _Examined(gm, records)


def _propagate_shapes(module: nn.Module, graph: torch.fx.Graph, inputs: list[Any]) -> None:
    """Set ``meta['tensor_meta']`` on ``graph``'s nodes by running a copy of it (the graph itself
    stays unowned, so that it can refer to modules that exist only in the rewritten form)."""
    shadow, copies = torch.fx.Graph(), {}
    shadow.output(shadow.graph_copy(graph, copies))
    with torch.no_grad(), evaluating(module):
        ShapeProp(torch.fx.GraphModule(module, shadow)).propagate(*_clone(inputs))
    for node, twin in copies.items():
        if "tensor_meta" in twin.meta:
            node.meta["tensor_meta"] = twin.meta["tensor_meta"]


def _hooks_lost(name: str, module: nn.Module, graph: torch.fx.Graph) -> str:
    """A reason when a module the trace went through (whose hooks a GraphModule would drop) has hooks."""
    leaves = [module.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"]
    kept = {id(m) for leaf in leaves for m in leaf.modules()}
    for sub, m in module.named_modules():
        if id(m) not in kept and has_hooks(m):
            return (
                f"module {_join(name, sub)!r} has hooks, which a GraphModule in place of "
                f"{name or 'the root'!r} would not run"
            )
    return ""


def hoist_pointwise(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> HoistResult:
    """Move the pointwise stage of ``pw_dw`` blocks fed by an upsample (and concat) above it.

    ``example_inputs`` (a tensor, a tuple/list of positional arguments or a dict of keyword
    arguments, as the model is called) is run once in eval mode under ``no_grad``; see the
    module docstring for the pattern, what is declined and why the input is needed. The
    caller's model is not changed unless ``inplace=True``; the result's outputs equal the
    original's up to rounding (each rewritten module is checked on the example input).

    Returns:
        ``HoistResult(model, records)``: one :class:`HoistRecord` per block found after an
        upsample (hoisted or declined, with the reason) and per candidate module that did
        not trace.

    Raises:
        HoistInputError: ``model`` is not an ``nn.Module``.
        InputShapeError: the model does not run on ``example_inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> from dsrewrite.layers import DepthwiseSeparableConv2d
        >>> class Up(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = DepthwiseSeparableConv2d(12, 8, 3, padding=1, order="pw_dw")
        ...     def forward(self, x, skip):
        ...         return self.conv(torch.cat([F.interpolate(x, scale_factor=2.0), skip], 1))
        >>> net = nn.ModuleDict({"up": Up()}).eval()
        >>> x, skip = torch.randn(1, 8, 8, 8), torch.randn(1, 4, 16, 16)
        >>> up, records = hoist_pointwise(net["up"], (x, skip))
        >>> r = records[0]
        >>> r.hoisted, r.concat, r.hoisted_channels, r.other_channels, r.macs_saved
        (True, True, 8, 4, 12288)
        >>> any(n.target is torch.cat for n in up.graph.nodes), type(up).__name__
        (False, 'HoistedUp')
        >>> torch.allclose(up(x, skip), net["up"](x, skip), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise HoistInputError(
            f"hoist_pointwise expects an nn.Module, got {type(model).__name__}. Hint: pass the model itself."
        )
    target = model if inplace else copy.deepcopy(model)
    candidates = _candidates(target)
    held = Counter(id(m) for _, m in target.named_modules(remove_duplicate=False))
    seen = _observe(target, dict(candidates), example_inputs)
    records: list[HoistRecord] = []
    leaf_ids: set[int] = set()  # modules already rewritten: leaves for their parents' traces
    traced_ids: set[int] = set()  # modules whose own trace examined the patterns they hold
    for name, module in candidates:
        examined = _examine(name, module, seen[name], held, leaf_ids, traced_ids)
        records += examined.records
        if examined.module is None:
            continue
        leaf_ids.add(id(examined.module))
        if name:
            _set_submodule(target, name, examined.module)
        else:
            target = examined.module
    return HoistResult(target, records)
