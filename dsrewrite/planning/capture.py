# SPDX-License-Identifier: Apache-2.0
"""Capture one :class:`~dsrewrite.facts.ConvFact` per conv module of a model.

:func:`capture` runs the model once on an example input (hooks record each
conv's shapes and call count, and convolutions called outside any conv module),
then captures the graph to compute the graph predicates:

1. ``torch.fx`` symbolic tracing with every conv module as a leaf (plus timm's
   own leaf modules and wrapped functions when the model uses timm);
2. if fx fails (data-dependent control flow), hides conv modules inside an
   opaque leaf, or traces a graph that does not reproduce the eager outputs,
   ``torch.export.export(strict=False)``, each convolution mapped back to its
   module through ``nn_module_stack``;
3. if both fail, module names and hyperparameters only: predicates are
   ``None`` and :attr:`Capture.notes` says why.

Every graph is verified before it is used: it runs once on the example inputs and
its outputs must match the eager outputs (:mod:`dsrewrite.planning.verify`);
:attr:`Capture.verification` says which capture was used and why the others were
rejected. The eager run also marks the final predictors
(:mod:`dsrewrite.planning.final`), known whatever the capture.

The model is never changed: it runs in ``eval()`` under ``torch.no_grad()``,
hooks are removed and every module's training flag is restored afterwards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    >>> cap = capture(m, input_shape=(1, 3, 32, 32))
    >>> cap.method, [f.name for f in cap.facts], cap.facts[1].output_shape, cap.facts[1].output_stride
    ('fx', ['0', '2'], (1, 8, 16, 16), 2.0)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from ..errors import InputShapeError, UsageError
from ..facts import PREDICATES, Capture, ConvFact
from ..graph import ConvLeafTracer, GraphView, Predicates, export_view, fx_view, site_predicates
from .final import ConvOutputs
from .verify import compare_outputs, detached, seeded
from ..runtime.conv_weight import detach_cached, raw_weight
from ..runtime.run import evaluating
from ..runtime.tracer import timm_fx_extras

__all__ = ["capture", "conv_base_class", "is_plain_conv"]

_TORCH_CONVS: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_CONV_FUNCS: frozenset[Callable[..., Any]] = frozenset(
    {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
     torch.conv_transpose3d, torch.convolution}
)
_NOISY_LOGGERS = ("torch.fx", "torch._export", "torch.export", "torch._dynamo", "torch._functorch",
                  "torch._subclasses", "torch.utils._sympy")


def conv_base_class(module: _ConvNd) -> type:
    """The torch conv class a conv module is (or derives from).

    Example:
        >>> conv_base_class(nn.LazyConv2d(4, 3)).__name__
        'Conv2d'
    """
    for klass in type(module).__mro__:
        if klass in _TORCH_CONVS:
            return klass
    return type(module)


def is_plain_conv(module: _ConvNd) -> bool:
    """True when the module computes exactly what its torch base class computes.

    False for subclasses that override ``forward`` or ``_conv_forward`` (timm's
    ``Conv2dSame``, ``StdConv2d``) or instances with a patched ``forward``.

    Example:
        >>> class Weird(nn.Conv2d):
        ...     def forward(self, x):
        ...         return super().forward(x) * 2
        >>> is_plain_conv(nn.Conv2d(3, 3, 3)), is_plain_conv(Weird(3, 3, 3))
        (True, False)
    """
    base = conv_base_class(module)
    if base not in _TORCH_CONVS or "forward" in vars(module):
        return False
    cls = type(module)
    same = getattr(cls, "forward") is getattr(base, "forward")
    if hasattr(base, "_conv_forward"):
        same = same and getattr(cls, "_conv_forward") is getattr(base, "_conv_forward")
    return same


# --------------------------------------------------------------------------- inputs


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, torch.float32
    return torch.device("cpu"), torch.float32


def _example_args(model: nn.Module, example_inputs: Any, input_shape: Sequence[int]) -> tuple[Any, ...]:
    if example_inputs is None:
        try:
            shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError) as e:
            raise InputShapeError(
                f"capture: input_shape={input_shape!r} is not a sequence of ints; "
                "pass e.g. input_shape=(1, 3, 224, 224)"
            ) from e
        if not shape or any(s <= 0 for s in shape):
            raise InputShapeError(
                f"capture: input_shape={shape!r} must be non-empty with positive sizes, e.g. (1, 3, 224, 224)"
            )
        device, dtype = _device_dtype(model)
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(shape, generator=gen).to(device=device, dtype=dtype),)
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputShapeError(
        f"capture: example_inputs must be a Tensor or a tuple of forward arguments, got "
        f"{type(example_inputs).__name__}; wrap a single input as (x,)"
    )


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else '(no message)'}"
    return text if len(text) <= 240 else text[:237] + "..."


# --------------------------------------------------------------------------- one real forward


@dataclass
class _Run:
    """What one real forward pass showed."""

    calls: Counter = field(default_factory=Counter)
    in_shape: dict[int, tuple[int, ...]] = field(default_factory=dict)
    out_shape: dict[int, tuple[int, ...]] = field(default_factory=dict)
    functional: Counter = field(default_factory=Counter)
    output: Any = None
    final: Optional[set[int]] = None


class _FunctionalConvSpy(TorchFunctionMode):
    """Counts convolution functions called while no conv module is the innermost running module."""

    def __init__(self, stack: list[nn.Module], names: dict[int, str], run: _Run):
        super().__init__()
        self.stack, self.names, self.run = stack, names, run

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _CONV_FUNCS and not (self.stack and isinstance(self.stack[-1], _ConvNd)):
            owner = self.stack[-1] if self.stack else None
            name = self.names.get(id(owner), "?") if owner is not None else ""
            cls = type(owner).__name__ if owner is not None else "-"
            self.run.functional[(name or "(root)", cls, func.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    if isinstance(value, Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def _run_forward(model: nn.Module, args: tuple[Any, ...], names: dict[int, str]) -> _Run:
    """One forward pass with hooks; every hook is removed before returning (or raising)."""
    run = _Run()
    stack: list[nn.Module] = []
    handles = []

    def push(mod: nn.Module, _args: Any) -> None:
        stack.append(mod)

    def pop(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is mod:
            stack.pop()

    def record(mod: nn.Module, hook_args: tuple, hook_kwargs: dict, out: Any) -> None:
        key = id(mod)
        run.calls[key] += 1
        if key not in run.in_shape:
            x = hook_args[0] if hook_args else hook_kwargs.get("input")
            run.in_shape[key] = _shape(x)  # type: ignore[assignment]
            run.out_shape[key] = _shape(out)  # type: ignore[assignment]

    try:
        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(push))
            if isinstance(mod, _ConvNd):
                handles.append(mod.register_forward_hook(record, with_kwargs=True))
            handles.append(mod.register_forward_hook(pop, always_call=True))
        run.output, run.final = _eager(model, args, _FunctionalConvSpy(stack, names, run))
    finally:
        for h in handles:
            h.remove()
    return run


def _eager(model: nn.Module, args: tuple[Any, ...], spy: TorchFunctionMode) -> tuple[Any, Optional[set[int]]]:
    """The eager outputs (detached) and the final predictors; with grad, else (if that fails) without."""
    rec = ConvOutputs()
    try:
        try:
            with torch.enable_grad(), seeded(), spy:
                out = rec.run(model, args)
                final = rec.final(out)
        finally:
            detach_cached(model)  # a cache the forward filled with grad must not keep the graph (deepcopy refuses)
    except Exception:  # e.g. ``.numpy()`` on a tensor that requires grad: run as before, finals unknown
        run = spy.run  # type: ignore[attr-defined]
        for record in (run.calls, run.in_shape, run.out_shape, run.functional):
            record.clear()
        with torch.no_grad(), seeded(), spy:
            out, final = model(*args), None
    return detached(out), final


# --------------------------------------------------------------------------- graph capture


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings, log lines and stderr prints of tracing and export failures."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        # torch.export prints the partial graph of a failed export straight to sys.stderr
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _restore_attrs(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Put back every module attribute object as it was.

    ``torch.export`` (non-strict) swaps tuple/list/dict attributes such as
    ``kernel_size`` for equal copies; the user's modules keep their own objects.
    """
    for mod, attrs in saved:
        current = vars(mod)
        for key in [k for k in current if k not in attrs]:
            del current[key]
        for key, value in attrs.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value


_MISSING = object()


def _trace_fx(model: nn.Module) -> torch.fx.GraphModule:
    """fx-trace ``model`` with conv (and timm) leaves."""
    if isinstance(model, _ConvNd):
        raise TypeError("the model itself is a conv module (nothing to trace around it)")
    leaves, funcs = timm_fx_extras(model)
    tracer = ConvLeafTracer(leaf_types=leaves, autowrap_functions=funcs)
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def _trace_export(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """``torch.export`` (non-strict) ``model`` on ``args``: the ExportedProgram."""
    return torch.export.export(model, args, strict=False)


def _verify(fn: Callable[[], Any], expected: Any) -> Optional[str]:
    """None when ``fn()`` reproduces the eager outputs, else why not (one line)."""
    try:
        with torch.no_grad(), seeded():
            got = fn()
    except Exception as e:  # a wrong graph fails in many ways
        return f"the captured graph fails on the example input ({_first_line(e.__cause__ or e)})"
    ok, why = compare_outputs(expected, got)
    return None if ok else f"the captured graph does not reproduce the eager outputs ({why})"


def _fx_checked(model: nn.Module, args: tuple[Any, ...], expected: Any) -> tuple[GraphView, Optional[str]]:
    """The fx view and why its graph is not the model (None when verified)."""
    gm = _trace_fx(model)
    shapes = ShapeProp(gm)  # records each node's rank (the concat dim) while it verifies
    why = _verify(lambda: shapes.propagate(*args), expected)
    return fx_view(gm.graph, model), why


def _hidden_by_leaves(view: GraphView, model: nn.Module, reached: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """Conv modules that ran but have no fx node, and the leaf classes hiding them."""
    seen = {id(m) for m in view.conv_module.values()}
    hidden = [name for name, m in reached.items() if id(m) not in seen]
    targets = {str(n.target) for n in view.nodes if n.op == "call_module"}
    hiders = set()
    for name in hidden:
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in targets:
                hiders.add(type(model.get_submodule(prefix)).__name__)
                break
    return hidden, sorted(hiders)


def _graph(model: nn.Module, args: tuple[Any, ...], reached: dict[str, nn.Module], run: _Run) -> tuple[
        str, Optional[dict[int, Predicates]], set[int], list[str], str]:
    """(method, predicates by module id or None, ids whose predicates are unknown, notes, verification)."""
    notes: list[str] = []
    fx_err = ""
    fx_result: Optional[GraphView] = None
    wrong: Optional[str] = None
    with _quiet():
        try:
            fx_result, wrong = _fx_checked(model, args, run.output)
        except Exception as e:  # fx raises many kinds; all mean "cannot trace"
            fx_err = _first_line(e)
    if fx_result is not None:
        fx_result.final = run.final or set()
        hidden, hiders = _hidden_by_leaves(fx_result, model, reached)
        if not hidden and wrong is None:
            return "fx", site_predicates(fx_result), set(), notes, "fx: the traced graph reproduces the eager outputs"
        if wrong is not None:
            fx_err = f"torch.fx traced a graph that is not the model: {wrong}"
            fx_result = None
        else:
            fx_err = (f"torch.fx keeps {', '.join(hiders) or 'some modules'} as opaque leaves, hiding "
                      f"{len(hidden)} conv module(s) (e.g. {', '.join(hidden[:3])})")
    else:
        fx_err = (f"torch.fx could not trace the model ({fx_err}); this usually means Python control "
                  "flow that depends on tensor values or shapes")
    with _quiet():
        try:
            program = _trace_export(model, args)
            view = export_view(program.graph, model)
        except Exception as e:  # export raises many kinds; all mean "cannot capture"
            ex_err = _first_line(e)
        else:
            ex_wrong = _verify(lambda: program.module()(*args), run.output)
            if ex_wrong is None:
                view.final = run.final or set()
                notes.append(f"{fx_err}; graph facts come from torch.export (non-strict) instead.")
                return ("export", site_predicates(view), set(), notes,
                        f"export: the exported graph reproduces the eager outputs; fx rejected: {fx_err}")
            ex_err = f"torch.export's graph is not the model either: {ex_wrong}"
    # final_predictor comes from the eager run's autograd graph (see capture()), not from a captured graph
    lost = ", ".join(p for p in PREDICATES if not (p == "final_predictor" and run.final is not None))
    if fx_result is not None:
        notes.append(f"{fx_err}, and torch.export failed too ({ex_err}); the hidden convs' graph "
                     f"predicates ({lost}) are unknown (None).")
        return ("fx", site_predicates(fx_result), {id(reached[n]) for n in hidden}, notes,
                f"fx (partial): {fx_err}; export rejected: {ex_err}")
    notes.append(
        f"Graph capture failed, so only module names, hyperparameters and shapes are known. {fx_err}; "
        f"torch.export (non-strict) failed too ({ex_err}). The selectors {lost} cannot be "
        "honoured (their predicates are None): select by name, region or shape instead, or make the "
        "forward traceable (no branching on tensor values)."
    )
    return "names", None, set(), notes, f"names: fx rejected: {fx_err}; export rejected: {ex_err}"


# --------------------------------------------------------------------------- facts


def _fact(name: str, mod: _ConvNd, run: _Run, model_shape: Optional[tuple[int, ...]],
          preds: Optional[Predicates]) -> ConvFact:
    base = conv_base_class(mod)
    weight = raw_weight(mod)  # dtype/device only: a parametrized weight is not computed
    in_shape = run.in_shape.get(id(mod))
    out_shape = run.out_shape.get(id(mod))
    stride_out = None
    dims = len(mod.kernel_size)
    # the model input's and the conv output's height (length for 1-d): same rank, batched, as the conv's
    if model_shape is not None and out_shape is not None and len(out_shape) == len(model_shape) == dims + 2:
        axis = -1 if dims == 1 else -2
        stride_out = model_shape[axis] / out_shape[axis] if out_shape[axis] else None
    padding = mod.padding if isinstance(mod.padding, str) else tuple(int(p) for p in mod.padding)
    return ConvFact(
        name=name,
        cls=f"{type(mod).__module__}.{type(mod).__qualname__}",
        conv_type=base.__name__,
        plain=is_plain_conv(mod),
        in_channels=int(mod.in_channels),
        out_channels=int(mod.out_channels),
        kernel_size=tuple(int(k) for k in mod.kernel_size),
        stride=tuple(int(s) for s in mod.stride),
        padding=padding,
        dilation=tuple(int(d) for d in mod.dilation),
        groups=int(mod.groups),
        bias=mod.bias is not None,
        padding_mode=str(mod.padding_mode),
        dtype=str(weight.dtype).removeprefix("torch."),
        device=str(weight.device),
        region=name.split(".")[0] if name else "(root)",
        calls=int(run.calls.get(id(mod), 0)),
        input_shape=in_shape,
        output_shape=out_shape,
        output_stride=stride_out,
        predicates=preds,
    )


def capture(
    model: nn.Module,
    example_inputs: Union[Tensor, tuple, None] = None,
    *,
    input_shape: Sequence[int] = (1, 3, 224, 224),
) -> Capture:
    """Capture the conv facts of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module``; it is left exactly as it was.
        example_inputs: a tensor or a tuple of forward arguments; ``None`` means
            ``torch.randn(input_shape)`` (seeded) on the model's device and dtype.
        input_shape: the shape of the random input when ``example_inputs`` is None.

    Returns:
        A :class:`~dsrewrite.facts.Capture` with one fact per conv module, in
        ``named_modules`` order; modules the input never reaches have ``calls=0``
        and predicates ``None``. ``functional_convs`` entries read
        ``"head.proj (MyHead): F.conv2d"`` (``" xN"`` appended for N calls).

    Raises:
        InputShapeError: the model cannot run on the example input.

    Example:
        >>> cap = capture(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.zeros(1, 3, 8, 8))
        >>> cap.facts[0].region, cap.facts[0].calls, cap.facts[0].downstream_of_upsample
        ('0', 1, False)
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"capture: model must be a torch.nn.Module, got {type(model).__name__}")
    args = _example_args(model, example_inputs, input_shape)
    first = next((a for a in args if isinstance(a, Tensor)), None)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _ConvNd)]
    names = {id(m): n for n, m in model.named_modules()}
    with evaluating(model):
        try:
            run = _run_forward(model, args, names)
        except Exception as e:
            shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
            raise InputShapeError(
                f"capture: {type(model).__name__} cannot run on the example input(s) {shapes}: "
                f"{_first_line(e)}. Pass example_inputs (or input_shape) that the model accepts."
            ) from e
        reached = {n: m for n, m in convs if run.calls[id(m)] > 0}
        attrs = [(m, dict(vars(m))) for m in model.modules()]
        try:
            method, preds, unknown, notes, verification = _graph(model, args, reached, run)
        finally:
            _restore_attrs(attrs)
    model_shape = tuple(int(d) for d in first.shape) if first is not None else None
    facts = []
    for name, mod in convs:
        known = preds is not None and id(mod) in preds and id(mod) not in unknown
        values = dict(preds[id(mod)]) if known else {}  # type: ignore[index]
        if run.final is not None and run.calls[id(mod)] > 0:
            values["final_predictor"] = id(mod) in run.final  # from the eager run: known whatever the capture
        facts.append(_fact(name, mod, run, model_shape, values or None))
    if run.final is None and reached:
        notes.append("final predictors unknown: the example forward with gradients enabled gave no conv output a "
                     "gradient (or failed), so no conv is taken as a final predictor")
    functional = tuple(
        f"{owner} ({cls}): F.{op}" + (f" x{n}" if n > 1 else "")
        for (owner, cls, op), n in run.functional.items()
    )
    return Capture(
        method=method,  # type: ignore[arg-type]
        facts=tuple(facts),
        input_shape=tuple(first.shape) if first is not None else None,
        functional_convs=functional,
        notes=tuple(notes),
        verification=verification,
    )
