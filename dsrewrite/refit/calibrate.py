"""Closed-form, label-free calibration of a rewritten model against its original.

SVD gives the best separable kernel in WEIGHT space; on a trained network what
matters is the OUTPUT. :func:`calibrate` refits each replaced
:class:`~dsrewrite.layers.DepthwiseSeparableConv2d` by regularised least squares
so that its output matches the original conv's output on real activations:

* layers are visited in execution order; a layer's INPUTS come from the rewritten
  model with every earlier layer already calibrated and its TARGETS from the
  original model's conv on the same batch ("asymmetric" reconstruction: each layer
  also corrects the error that reaches it, so errors do not pile up);
* only statistics are kept (Gram matrices ``Σ f̃f̃ᵀ``, ``Σ f̃yᵀ`` over at most
  ``max_positions`` sampled output positions per layer, float64; see
  :mod:`dsrewrite.lstsq`): memory is bounded by the layer's channels, not the data;
* the stage that runs LAST is always refit with the bias (dw_pw: the pointwise 1×1,
  which mixes channels; pw_dw: the grouped k×k, which sums ``m`` projections per
  output); its input is whatever reaches it, so blocks with ``mid_norm``/``mid_act``
  work too. For LINEAR blocks whose joint size ``C_in·K`` (dw_pw: ``C_in·m·K``)
  is at most ``max_joint_dim``, ``alternate`` further rounds refit the first stage
  (dw_pw: the depthwise filters; pw_dw: the 1×1 projection, the channel-mixing
  stage) and then the last again, each a linear least-squares problem on the
  input-patch statistics;
* every step is kept only if it lowers the layer's output error on the calibration
  positions; otherwise the previous weights stay and the layer's note says so;
* where the original conv feeds only a ReLU, or an eval BatchNorm2d and a ReLU
  (``activation="auto"``, read from the fx graph by :mod:`dsrewrite.activation`), the
  block is then fitted THROUGH that activation (:mod:`dsrewrite.relu_fit`): for such a
  layer it is the activation's output error that never increases.

The schedule is exact (layer ``l`` sees the final weights of layers ``< l``) yet
costs about two passes of the data, not one per layer: the outputs of module calls
that finish before the last refit layer starts are cached and replayed, and each
pass stops right after the layer it calibrates. Module calls are identified by
``(qualified name, call index)`` from a probe run; if the call structure changes
between batches, the cache is switched off (slower, same result).

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    >>> light = copy.deepcopy(net)
    >>> light[2] = DepthwiseSeparableConv2d.from_conv(net[2])
    >>> data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    >>> res = calibrate(net, light, data)
    >>> res.layers[0].rel_error_after < res.layers[0].rel_error_before
    True
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .activation import FollowingReLU, following_relus
from .batches import batch_size_of, input_spec, iter_inputs, to_device
from .errors import CalibrationError, UsageError, did_you_mean
from .fidelity import flatten_outputs
from .kinds import LAYOUT_MEMBERS, kind_of, missing_members
from .layers.dsconv import DepthwiseSeparableConv2d
from .lstsq import (
    GramStats,
    block_error,
    gather_patches,
    gram_matrix,
    quadratic_error,
    ridge_solve,
    sample_positions,
)
from .macs import call_model, evaluating
from .relu_fit import cross_product, fit_through_relu, predict, relu_error

_ACTIVATION_MODES = ("auto", "none")
#: Memory for the features kept per layer for the fit through the activation (float32; when
#: a layer's positions need more, an evenly strided subset is kept).
_ACT_SAMPLE_BYTES = 256 << 20

__all__ = [
    "calibrate",
    "CalibrationResult",
    "LayerCalibration",
    "CalibrationUsageError",
    "replaced_names",
    "check_options",
]


class CalibrationUsageError(UsageError):
    """Bad calibration input: no batches, unknown or mismatched layer names, bad options."""


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration did to one layer.

    Errors are relative L2 (``‖block(x) − conv_orig(x_orig)‖ / ‖conv_orig(x_orig)‖``) over
    the sampled calibration positions, ``x`` coming from the rewritten model with the
    earlier layers already calibrated. ``steps`` lists the accepted refits in order
    (``"last"``: the last stage and bias; ``"first"``: the first stage; ``"relu"``: the refit
    through the following activation, see :meth:`_Layer.refit_through_relu`); ``method`` is
    ``"last_stage"``, ``"alternating"`` or ``"skipped"``.

    ``activation`` names the (BatchNorm +) ReLU that follows the conv when calibration
    fitted through it (``""`` otherwise); ``act_error_before``/``act_error_after`` are then
    the relative L2 error of that activation's output (what the next layer sees) on the
    stored positions. For such layers it is the ACTIVATION error that calibration never
    increases; the conv-output error ``rel_error_after`` may rise, since errors on
    pre-activations the ReLU zeroes do not count.
    """

    name: str
    order: str
    depth_multiplier: int
    method: str
    rel_error_before: float
    rel_error_after: float
    positions: int
    steps: tuple[str, ...] = ()
    note: str = ""
    activation: str = ""
    act_error_before: Optional[float] = None
    act_error_after: Optional[float] = None


@dataclass(frozen=True)
class CalibrationResult:
    """Per-layer results plus the whole model's output error before and after (relative L2).

    ``output_rel_error_*`` compare all output tensors of the rewritten model with the
    original's over every calibration batch (``None`` with ``measure_output=False``).
    """

    layers: tuple[LayerCalibration, ...]
    output_rel_error_before: Optional[float]
    output_rel_error_after: Optional[float]
    images: int
    batches: int
    seconds: float
    replay_cache: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one row per layer.

        Example:
            >>> r = CalibrationResult((LayerCalibration("a", "dw_pw", 1, "last_stage", 0.5, 0.25, 10, ("last",)),),
            ...                       0.4, 0.2, 2, 1, 0.1, True)
            >>> print(r.table())  # doctest: +NORMALIZE_WHITESPACE
            layer  order  m  method      rel err before  rel err after  steps  note
            a      dw_pw  1  last_stage  0.5000          0.2500         last
            model output rel err: 0.4000 -> 0.2000 (2 images, 1 batches, 0.1 s)
        """
        acts = any(l.activation for l in self.layers)
        head = ("layer", "order", "m", "method", "rel err before", "rel err after") + (
            ("act err before", "act err after") if acts else ()) + ("steps", "note")

        def act_cols(l: LayerCalibration) -> tuple[str, ...]:
            if not acts:
                return ()
            if l.act_error_before is None or l.act_error_after is None:
                return ("", "")
            return (f"{l.act_error_before:.4f}", f"{l.act_error_after:.4f}")

        rows = [head] + [
            (l.name, l.order, str(l.depth_multiplier), l.method, f"{l.rel_error_before:.4f}",
             f"{l.rel_error_after:.4f}") + act_cols(l) + (",".join(l.steps), l.note)
            for l in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

        def fmt(v: Optional[float]) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        lines.append(
            f"model output rel err: {fmt(self.output_rel_error_before)} -> {fmt(self.output_rel_error_after)} "
            f"({self.images} images, {self.batches} batches, {self.seconds:.1f} s)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_options(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Check the keys of extra :func:`calibrate` keyword arguments (values are checked by ``calibrate``).

    Example:
        >>> check_options({"activation": "none"})
        {'activation': 'none'}
        >>> check_options({"activaton": "none"})
        Traceback (most recent call last):
        ...
        dsrewrite.calibrate.CalibrationUsageError: calibration option 'activaton' is not one of calibrate()'s (did you mean 'activation'?). Valid options: activation, alternate, input_fn, input_key, max_joint_dim, max_positions, measure_output, progress, replay_cache, ridge, seed.
    """
    opts = dict(options or {})
    valid = sorted(n for n, p in inspect.signature(calibrate).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("names", "example_inputs"))
    for key in opts:
        if key not in valid:
            raise CalibrationUsageError(
                f"calibration option {key!r} is not one of calibrate()'s{did_you_mean(key, valid)}. "
                f"Valid options: {', '.join(valid)}."
            )
    return opts


def replaced_names(original: nn.Module, rewritten: nn.Module) -> list[str]:
    """Qualified names of the separable blocks of ``rewritten`` that are ``nn.Conv2d`` in ``original``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
        >>> light = nn.Sequential(net[0], DepthwiseSeparableConv2d.from_conv(net[1]))
        >>> replaced_names(net, light)
        ['1']
    """
    convs = {n for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    return [n for n, m in rewritten.named_modules() if kind_of(m) is not None and n in convs]


# ----------------------------------------------------------------------------------------
# Replay cache: module calls are keyed by (qualified name, call index within one forward)
# ----------------------------------------------------------------------------------------
Key = tuple[str, int]


class _Stop(BaseException):
    """Raised from a hook to end a forward pass early (BaseException: user code rarely catches it)."""


class _StructureChanged(BaseException):
    """A module call not seen in the probe run: the replay cache cannot be trusted."""


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    return value


@dataclass
class _Call:
    start: int
    end: int = -1
    parent: Optional[Key] = None


class _Tracer:
    """Hooks on every submodule of a model: records the call tree, replays and captures outputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named = [(n, m) for n, m in model.named_modules() if n]
        self.calls: dict[Key, _Call] = {}
        self.sequence: list[Key] = []
        self.probing = False
        self.replay: dict[Key, Any] = {}
        self.capture: set[Key] = set()
        self.captured: dict[Key, Any] = {}
        self.skip_counts: dict[Key, Counter] = {}
        self.patched: dict[str, tuple[nn.Module, bool, Any]] = {}
        self.handles: list[Any] = []
        self._reset()
        for name, mod in self.named:
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _reset(self) -> None:
        self.counters: Counter = Counter()
        self.stack: list[Key] = []
        self.event = 0
        self.seen: list[Key] = []

    def begin(self, *, probe: bool = False, replay: Optional[dict[Key, Any]] = None,
              capture: Optional[set[Key]] = None) -> None:
        self._reset()
        self.probing = probe
        if probe:
            self.calls, self.sequence = {}, []
        self.replay = replay or {}
        self.capture = capture or set()
        self.captured = {}

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            key = (name, self.counters[name])
            self.counters[name] += 1
            parent = self.stack[-1] if self.stack else None
            if self.probing:
                self.calls[key] = _Call(start=self.event, parent=parent)
                self.sequence.append(key)
            elif self.calls and key not in self.calls:
                raise _StructureChanged(key)
            self.seen.append(key)
            self.event += 1
            self.stack.append(key)

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            key = self.stack.pop() if self.stack else (name, -1)
            if self.probing and key in self.calls:
                self.calls[key].end = self.event
            self.event += 1
            if key in self.replay:
                self.counters.update(self.skip_counts.get(key, {}))
                if key in self.capture:
                    self.captured[key] = self.replay[key]
            elif key in self.capture:
                self.captured[key] = _clone(output)

        return hook

    # --- cache sets from the probe ---------------------------------------------------
    def before(self, key: Key) -> set[Key]:
        """Maximal calls that end before ``key`` starts (their outputs cannot depend on it).

        Calls of in-place modules (``inplace=True``, e.g. ``ReLU(inplace=True)``) are never
        replayed: code may rely on their side effect rather than their return value.
        """
        t = self.calls[key].start
        mods = dict(self.named)
        out = set()
        for k, c in self.calls.items():
            if 0 <= c.end < t and (c.parent is None or self.calls[c.parent].end >= t or self.calls[c.parent].end < 0):
                if not getattr(mods[k[0]], "inplace", False):
                    out.add(k)
        return out

    def prepare_replay(self, keys: Iterable[Key]) -> None:
        """Count the calls nested in each replayable call and wrap those modules' forwards."""
        mods = dict(self.named)
        for key in keys:
            c = self.calls[key]
            if key not in self.skip_counts:
                self.skip_counts[key] = Counter(
                    k[0] for k, d in self.calls.items() if c.start < d.start and 0 <= d.end < c.end
                )
            name = key[0]
            if name in self.patched:
                continue
            mod = mods[name]
            had = "forward" in mod.__dict__
            orig = mod.__dict__.get("forward", None)
            bound = mod.forward

            def wrapper(*args: Any, _name: str = name, _bound: Any = bound, **kwargs: Any) -> Any:
                top = self.stack[-1] if self.stack else None
                if top is not None and top[0] == _name and top in self.replay:
                    return _clone(self.replay[top])
                return _bound(*args, **kwargs)

            mod.forward = wrapper  # type: ignore[method-assign]
            self.patched[name] = (mod, had, orig)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for mod, had, orig in self.patched.values():
            if had:
                mod.forward = orig  # type: ignore[method-assign]
            else:
                del mod.__dict__["forward"]
        self.patched = {}


# ----------------------------------------------------------------------------------------
# One layer: what to capture and how to refit
# ----------------------------------------------------------------------------------------
class _Layer:
    """One replaced layer; its kind's :class:`~dsrewrite.kinds.LstsqLayout` holds the stage-specific maths."""

    def __init__(self, name: str, index: int, block: nn.Module, conv: nn.Conv2d) -> None:
        self.name, self.index, self.block, self.conv = name, index, block, conv
        kind = kind_of(block)
        assert kind is not None  # _resolve keeps only registered kinds' blocks
        self.kind = kind.name
        self.lay = kind.layout(block)
        missing = missing_members(self.lay, LAYOUT_MEMBERS)
        if missing:  # a kind's programming error, reported as such
            raise TypeError(f"kind {kind.name!r}: layout() returned a {type(self.lay).__name__} that lacks "
                            f"{', '.join(missing)} (see dsrewrite.kinds.LstsqLayout)")
        kh, kw = conv.kernel_size
        self.k = kh * kw
        self.m = int(block.depth_multiplier)
        self.c_in, self.c_out = conv.in_channels, conv.out_channels
        self.positions: list[Optional[Tensor]] = []  # per batch, (P, 3)
        self.targets: list[Optional[Tensor]] = []  # per batch, (P, C_out)
        self.calls_orig = 0
        self.skip: str = ""
        self.joint = False
        self.stats = GramStats()
        self.act: Optional[FollowingReLU] = None  # the (BN +) ReLU that follows the original conv
        self.samples: list[Tensor] = []  # stored features (float32) for the fit through the activation
        self.sample_targets: list[Tensor] = []
        self.start: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None

    def keep_samples(self, feats: Tensor, y: Tensor, batches: int, budget_bytes: int) -> None:
        """Keep one batch's features, or an evenly strided subset of them within ``budget_bytes`` per layer."""
        per_pos = max(1, feats[0].numel()) * 4
        quota = max(1, budget_bytes // per_pos // max(1, batches))
        step = max(1, math.ceil(feats.shape[0] / quota))
        self.samples.append(feats[::step].to(torch.float32))
        self.sample_targets.append(y[::step].to(torch.float32))

    def can_joint(self, alternate: int, max_joint_dim: int) -> bool:
        d = self.lay.joint_dim
        return self.lay.linear and alternate > 0 and d is not None and d <= max_joint_dim

    @property
    def last(self) -> nn.Module:
        return self.lay.last_stage

    def features(self, x: Optional[Tensor], z: Optional[Tensor], pos: Tensor) -> Tensor:
        """Features at ``pos``: input patches (joint) or the last stage's input (last-stage only)."""
        if self.joint:
            c = self.conv
            assert x is not None  # internal invariant
            p = gather_patches(x, pos, c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode)
            return p.reshape(p.shape[0], -1)
        assert z is not None  # internal invariant
        return self.lay.last_features(z, pos)

    # --- weights in the lstsq layouts ------------------------------------------------
    def current(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(first-stage, last-stage, bias) in the kind's lstsq layouts, float64."""
        return self.lay.current()

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        self.lay.write(first, last, bias)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        return self.lay.dense(first, last)

    # --- refits ------------------------------------------------------------------------
    def _alternate(self, err: Callable[..., float], start: tuple[Tensor, Tensor, Optional[Tensor]], e: float,
                   alternate: int, has_bias: bool, ridge: float,
                   rel: Callable[[float], float]) -> tuple[Tensor, Tensor, Optional[Tensor], float, list[str], str]:
        """Last stage, then ``alternate`` rounds of (first, last); each step kept only if it lowers ``err``."""
        first, last, bias = start
        st, steps, note = self.stats, [], ""
        for step in ["last"] + ["first", "last"] * alternate:
            if step == "last":
                l_new, b_new = self.lay.refit_last(st, first, bias=has_bias, ridge=ridge)
                cand = (first, l_new, b_new)
            else:
                cand = (self.lay.refit_first(st, last, bias, ridge=ridge), last, bias)
            e_new = err(*cand)
            if not e_new < e:
                if not steps:
                    note = f"refit rejected: rel error would go {rel(e):.4g} -> {rel(e_new):.4g}; kept the old weights"
                break
            first, last, bias = cand
            e = e_new
            steps.append(step)
        return first, last, bias, e, steps, note

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Last stage and bias in the ``ridge_solve`` layout of the kind's last-stage features."""
        return self.lay.pack_last(last, bias)

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Inverse of :meth:`pack_last` (the bias is ``None`` when the block has none)."""
        return self.lay.unpack_last(w, has_bias)

    def last_features(self, feats: Tensor, first: Tensor) -> Tensor:
        """The last stage's input features at stored positions (joint layers store input patches)."""
        return self.lay.last_features_from_patches(feats, first) if self.joint else feats

    def linear_error(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> float:
        """Squared conv-output error of (first, last, bias) from the Gram statistics."""
        st = self.stats
        if self.joint:
            return block_error(st, self.dense(first, last), bias)
        assert st.gram is not None and st.cross is not None  # internal invariant
        return quadratic_error(st.gram, st.cross, st.yy, self.pack_last(last, bias))

    def _relu_problem(self, feats: Tensor, first0: Tensor, ridge: float) -> tuple[
            Callable[[tuple[Tensor, Tensor, Optional[Tensor]]], Tensor],
            Callable[[Tensor, tuple[Tensor, Tensor, Optional[Tensor]]], tuple[Tensor, Tensor, Optional[Tensor]]]]:
        """``(predict, solve)`` for :func:`~dsrewrite.relu_fit.fit_through_relu` on the stored positions.

        ``solve`` is one round of the linear refits on a target ``zy`` instead of ``y``.
        Joint layers whose kind says ``relu_refits_first`` (pw_dw: its first stage, the 1×1
        projection, is where the channels mix) refit both stages (first, then last and bias)
        on the stored input patches; every other layer refits its last stage and bias on
        fixed last-stage features (for dw_pw that stage is where the channels mix). The
        Gram matrix is the layer's own when every sampled position was kept, else the
        stored subset's.
        """
        has_bias = self.current()[2] is not None
        if self.joint and self.lay.relu_refits_first:
            st = self.stats
            assert st.gram is not None  # internal invariant
            n = int(feats.shape[0])
            gram = st.gram if n == st.count else gram_matrix(feats)

            def predict_joint(cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> Tensor:
                first, last, bias = cand
                out = (feats @ self.dense(first, last).reshape(self.c_out, -1).to(feats).T).to(torch.float64)
                return out if bias is None else out + bias.to(out)

            def solve_joint(zy: Tensor, cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> tuple[
                    Tensor, Tensor, Optional[Tensor]]:
                _, last, bias = cand
                tz = GramStats()
                tz.gram, tz.cross, tz.count = gram, cross_product(feats, zy).to(torch.float64), n
                first = self.lay.refit_first(tz, last, bias, ridge=ridge)
                last, new_bias = self.lay.refit_last(tz, first, bias=has_bias, ridge=ridge)
                return first, last, new_bias

            return predict_joint, solve_joint
        lf = self.last_features(feats, first0).to(torch.float32)
        grams: list[Tensor] = []  # built on the first solve: scoring a start needs no Gram matrix

        def predict_last(cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> Tensor:
            _, last, bias = cand
            return predict(lf, self.pack_last(last, bias).to(lf)).to(torch.float64)

        def solve_last(zy: Tensor, cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> tuple[
                Tensor, Tensor, Optional[Tensor]]:
            if not grams:
                grams.append(self.stats.gram if not self.joint and lf.shape[0] == self.stats.count  # type: ignore[arg-type]
                             else gram_matrix(lf))
            w = ridge_solve(grams[0], cross_product(lf, zy).to(torch.float64), ridge, bias=has_bias)
            return (cand[0], *self.unpack_last(w, has_bias))

        return predict_last, solve_last

    def refit_through_relu(self, rec: LayerCalibration, ridge: float) -> LayerCalibration:
        """Refit through the following (BN +) ReLU; never raises the activation's error.

        The auxiliary-variable loop of :func:`dsrewrite.relu_fit.fit_through_relu`, whose
        ``W`` step is one round of the same linear refits as the linear calibration (joint
        layers whose kind says ``relu_refits_first``, e.g. pw_dw: first stage, then last stage
        and bias; others: last stage and bias), on
        the stored positions. It starts from whichever of the initial and the linearly
        calibrated weights has the lower activation error, so the activation error after
        is at most the one before.
        """
        act = self.act
        if act is None or not self.samples or self.start is None:
            return rec
        feats = torch.cat(self.samples)
        y = torch.cat(self.sample_targets).to(torch.float64)
        a, c = act.scale.to(y.device), act.shift.to(y.device)
        yy = float((torch.relu(a * y + c) ** 2).sum())
        yy = yy if yy > 0 else 1.0
        cands = [self.start, self.current()]
        problems = [self._relu_problem(feats, cand[0], ridge) for cand in cands]
        errs = [relu_error(problem[0](cand), y, a, c) for problem, cand in zip(problems, cands)]
        pick = int(errs[1] < errs[0])
        begin = cands[pick]
        pred, solve = problems[pick]
        best, e_start, e_best = fit_through_relu(y, a, c, begin, predict=pred, solve=solve)
        steps = list(rec.steps)
        if e_best < e_start:
            steps.append("relu")
        e_lin = self.linear_error(*best)
        self.write(*best)
        yy_lin = self.stats.yy if self.stats.yy > 0 else 1.0
        return replace(rec, rel_error_after=math.sqrt(max(e_lin, 0.0) / yy_lin), steps=tuple(steps),
                       activation=act.via, act_error_before=math.sqrt(errs[0] / yy),
                       act_error_after=math.sqrt(e_best / yy))

    def refit(self, ridge: float, alternate: int) -> LayerCalibration:
        first, last, bias = self.current()
        self.start = (first, last, bias)
        has_bias = bias is not None
        st = self.stats
        assert st.gram is not None and st.cross is not None  # internal invariant
        yy = st.yy if st.yy > 0 else 1.0

        def rel(e: float) -> float:
            return math.sqrt(max(e, 0.0) / yy)

        steps: list[str] = []
        note = ""
        if self.joint:
            err = lambda f, l, b: block_error(st, self.dense(f, l), b)  # noqa: E731
            e0 = err(first, last, bias)
            first, last, bias, e, steps, note = self._alternate(err, (first, last, bias), e0, alternate,
                                                                 has_bias, ridge, rel)
            method = "alternating"
        else:
            e0 = e = quadratic_error(st.gram, st.cross, st.yy, self.pack_last(last, bias))
            w = ridge_solve(st.gram, st.cross, ridge, bias=has_bias)
            e_new = quadratic_error(st.gram, st.cross, st.yy, w)
            if e_new < e:
                e = e_new
                steps.append("last")
                last, bias = self.unpack_last(w, has_bias)
            else:
                note = f"refit rejected: rel error would go {rel(e):.4g} -> {rel(e_new):.4g}; kept the old weights"
            method = "last_stage"
            if alternate > 0:
                why = ("the block is not linear (mid_norm/mid_act)" if not self.lay.linear
                       else f"kind {self.kind} has no joint refit" if self.lay.joint_dim is None
                       else f"joint size {self.lay.joint_dim} > max_joint_dim")
                note = (note + "; " if note else "") + f"first stage kept: {why}"
        if steps:
            self.write(first, last, bias)
        return LayerCalibration(self.name, self.kind, self.m, method, rel(e0), rel(e), st.count,
                                tuple(steps), note)


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _resolve(original: nn.Module, rewritten: nn.Module, names: Optional[Sequence[str]]) -> list[tuple[str, Any, Any]]:
    blocks = {n: m for n, m in rewritten.named_modules() if kind_of(m) is not None}
    convs = {n: m for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    if names is None:
        names = [n for n in blocks if n in convs]
    out = []
    for name in names:
        if name not in blocks:
            raise CalibrationUsageError(
                f"calibrate(names=...): {name!r} is not a replacement block (a DepthwiseSeparableConv2d or "
                f"another registered kind's) in the rewritten model"
                f"{did_you_mean(name, blocks)}. Hint: pass the qualified names of the replaced layers "
                f"(available: {sorted(blocks)[:8]}{' ...' if len(blocks) > 8 else ''})."
            )
        if name not in convs:
            raise CalibrationUsageError(
                f"calibrate(names=...): {name!r} is not an nn.Conv2d in the original model"
                f"{did_you_mean(name, convs)}. Hint: the original must be the model before the rewrite."
            )
        b, c = blocks[name], convs[name]
        mine = (b.in_channels, b.out_channels, tuple(b.kernel_size), tuple(b.stride), b.padding,
                tuple(b.dilation), b.padding_mode)
        theirs = (c.in_channels, c.out_channels, tuple(c.kernel_size), tuple(c.stride), c.padding,
                  tuple(c.dilation), c.padding_mode)
        if mine != theirs:
            raise CalibrationUsageError(
                f"layer {name!r}: the separable block (in, out, kernel, stride, padding, dilation, padding_mode) "
                f"= {mine} does not "
                f"match the original conv's {theirs}. Hint: calibrate a model against the one it was rewritten from."
            )
        out.append((name, b, c))
    return out


def calibrate(
    original: nn.Module,
    rewritten: nn.Module,
    batches: Iterable[Any],
    *,
    names: Optional[Sequence[str]] = None,
    max_positions: int = 16384,
    ridge: float = 1e-3,
    alternate: int = 3,
    max_joint_dim: int = 2304,
    measure_output: bool = True,
    replay_cache: bool = True,
    activation: str = "auto",
    progress: bool = False,
    seed: int = 0,
    input_key: Optional[Any] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    example_inputs: Any = None,
) -> CalibrationResult:
    """Refit the separable blocks of ``rewritten`` IN PLACE to reproduce ``original``'s conv outputs.

    Args:
        original: the model before the rewrite (the teacher; never modified).
        rewritten: the rewritten model; its blocks named in ``names`` are refit in place.
        batches: unlabeled batches as the user's DataLoader gives them (any iterable): tensors,
            ``(input, mask/label, ...)`` tuples, dicts (with ``input_key``), or anything ``input_fn``
            maps; turned into model inputs by :func:`dsrewrite.batches.model_inputs`. Read once;
            the model inputs (not the labels) are kept in memory on the model's device.
        names: qualified names of the blocks to refit; default: every
            ``DepthwiseSeparableConv2d`` of ``rewritten`` that is an ``nn.Conv2d`` in ``original``.
        max_positions: output positions sampled per layer over all batches (spread evenly).
        ridge: relative ridge ``λ = ridge · mean(diag(G))`` (bias unpenalised).
        alternate: rounds of (first stage, last stage) refits after the last-stage refit,
            for linear blocks whose joint size is at most ``max_joint_dim``; 0: last stage only.
        max_joint_dim: largest ``C_in·K`` (dw_pw: ``C_in·m·K``) refit jointly.
        measure_output: also measure the model's output error before and after (one more pass).
        replay_cache: replay cached module outputs instead of re-running every layer's prefix
            (same result; turn off for models whose submodules have side effects in ``forward``).
        activation: ``"auto"``: where the original conv feeds only a ReLU, or an eval-mode
            ``BatchNorm2d`` then a ReLU (read from the ``torch.fx`` graph), refit the block once
            more so that the ACTIVATION's output matches (auxiliary-variable method,
            :mod:`dsrewrite.relu_fit`; joint pw_dw blocks: both stages, others: the last stage
            and bias; the positions' features are kept for it, at most 256 MB per layer);
            ``"none"``: fit every conv output linearly only.
        progress: print one line per layer to stderr.
        seed: seeds the sampling of positions.
        input_key: key of the model input in dict batches.
        input_fn: ``batch -> model inputs`` for any other batch structure.
        example_inputs: the example inputs; their number of positional inputs says how a tuple
            batch maps to a multi-input model (default: ``forward``'s parameters without default).

    Both models run in eval mode under ``no_grad``; all train flags are restored.

    Raises:
        CalibrationUsageError: no batches, unknown names, or blocks that do not match the original.
        BatchError: a batch cannot be mapped to model inputs (a ``UsageError``).

    Example:
        >>> import copy
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> light = copy.deepcopy(net); light[2] = DepthwiseSeparableConv2d.from_conv(net[2], depth_multiplier=9)
        >>> res = calibrate(net, light, [torch.randn(2, 3, 8, 8)])
        >>> res.output_rel_error_after < 1e-5
        True
    """
    t0 = time.perf_counter()
    if activation not in _ACTIVATION_MODES:
        raise CalibrationUsageError(
            f"calibrate(activation={activation!r}): expected one of {list(_ACTIVATION_MODES)}"
            f"{did_you_mean(str(activation), _ACTIVATION_MODES)}."
        )
    if max_positions < 1 or ridge < 0 or alternate < 0 or max_joint_dim < 0:
        raise CalibrationUsageError(
            f"calibrate: need max_positions >= 1, ridge >= 0, alternate >= 0, max_joint_dim >= 0; got "
            f"max_positions={max_positions}, ridge={ridge}, alternate={alternate}, max_joint_dim={max_joint_dim}."
        )
    device = _device_of(rewritten)
    spec = input_spec(original, example_inputs, input_key=input_key, input_fn=input_fn, where="calibration")
    data = [to_device(x, device) for x in iter_inputs(batches, spec)]
    if not data:
        raise CalibrationUsageError("calibrate: `batches` is empty. Hint: pass at least one batch of example inputs.")
    resolved = _resolve(original, rewritten, names)
    layers = [_Layer(n, i, b, c) for i, (n, b, c) in enumerate(resolved)]
    images = sum(batch_size_of(b) for b in data)
    per_image = max(1, math.ceil(max_positions / images))
    notes: list[str] = []

    def say(msg: str) -> None:
        if progress:
            print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    with evaluating(original, rewritten), torch.no_grad():
        if activation == "auto" and layers:
            found, why = following_relus(original, [l.name for l in layers])
            notes += [why] if why else []
            for l in layers:
                l.act = found.get(l.name)
        ref_outputs = _original_pass(original, data, layers, per_image, seed, measure_output)
        tracer = _Tracer(rewritten)
        try:
            result = _calibrate_layers(rewritten, data, layers, tracer, ref_outputs, ridge, alternate,
                                       max_joint_dim, measure_output, replay_cache, notes, say)
        finally:
            tracer.close()
    out_before, out_after, done, cache_on = result
    seconds = time.perf_counter() - t0
    say(f"done in {seconds:.1f} s")
    return CalibrationResult(tuple(done), out_before, out_after, images, len(data), seconds, cache_on, tuple(notes))


def _original_pass(original: nn.Module, data: list[Any], layers: list[_Layer], per_image: int, seed: int,
                   keep_outputs: bool) -> list[Any]:
    """Targets (original conv outputs at sampled positions) for every layer and batch; model outputs."""
    by_conv = {id(l.conv): l for l in layers}
    state = {"b": 0}
    handles = []

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        layer = by_conv[id(module)]
        layer.calls_orig += 1
        if layer.calls_orig > 1:
            return
        n, _, h, w = output.shape
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer.index * 7919 + state["b"])
        pos = sample_positions((n, h, w), per_image * n, generator=g)
        p = pos.to(output.device)
        layer.positions.append(pos)
        layer.targets.append(output[p[:, 0], :, p[:, 1], p[:, 2]].detach().clone())

    for l in layers:
        handles.append(l.conv.register_forward_hook(hook))
    outputs = []
    try:
        for b, batch in enumerate(data):
            state["b"] = b
            for l in layers:
                l.calls_orig = 0
            out = call_model(original, batch)
            if keep_outputs:
                outputs.append([t.detach() for _, t in flatten_outputs(out)])
            for l in layers:
                if l.calls_orig == 0:
                    l.skip = l.skip or "the original conv was not called on the calibration batches"
                    l.positions.append(None)
                    l.targets.append(None)
                elif l.calls_orig > 1:
                    l.skip = l.skip or f"the original conv is called {l.calls_orig} times per forward (shared)"
    finally:
        for h in handles:
            h.remove()
    return outputs


class _RelErr:
    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0

    def add(self, out: Any, ref: list[Tensor]) -> None:
        leaves = [t for _, t in flatten_outputs(out)]
        if len(leaves) != len(ref):
            raise CalibrationError(
                f"the rewritten model returns {len(leaves)} output tensors, the original {len(ref)}. "
                "Hint: calibrate a model against the one it was rewritten from."
            )
        for a, r in zip(leaves, ref):
            r64, a64 = r.to(torch.float64), a.detach().to(r.device, torch.float64)
            self.err += float(((a64 - r64) ** 2).sum())
            self.ref += float((r64 * r64).sum())

    def value(self) -> float:
        return math.sqrt(self.err / self.ref) if self.ref > 0 else (0.0 if self.err == 0 else math.inf)


def _calibrate_layers(
    rewritten: nn.Module, data: list[Any], layers: list[_Layer], tracer: _Tracer, ref_outputs: list[Any],
    ridge: float, alternate: int, max_joint_dim: int, measure_output: bool, replay_cache: bool,
    notes: list[str], say: Callable[[str], None],
) -> tuple[Optional[float], Optional[float], list[LayerCalibration], bool]:
    by_block = {id(l.block): l for l in layers}
    calls: Counter = Counter()

    def count_hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[by_block[id(module)].name] += 1

    # 1. probe the call tree on the first batch (its output also counts for the "before" error)
    handles = [l.block.register_forward_hook(count_hook) for l in layers]
    before = _RelErr()
    try:
        tracer.begin(probe=True)
        out = call_model(rewritten, data[0])
        if measure_output:
            before.add(out, ref_outputs[0])
    finally:
        for h in handles:
            h.remove()
    probe_seq = list(tracer.sequence)
    for l in layers:
        l.joint = l.can_joint(alternate, max_joint_dim)
        if l.skip:
            continue
        if calls[l.name] == 0:
            l.skip = "the separable block was not called on the calibration batches"
        elif calls[l.name] > 1:
            l.skip = f"the separable block is called {calls[l.name]} times per forward (shared)"
    order_idx = {k: i for i, k in enumerate(probe_seq)}
    ordered = sorted((l for l in layers if not l.skip), key=lambda l: order_idx[(l.name, 0)])

    # 2. the "before" pass over the other batches; captures the first layer's prefix on the way
    cache_on = replay_cache
    cache: list[dict[Key, Any]] = [{} for _ in data]
    out_before = None
    if measure_output:
        capture = tracer.before((ordered[0].name, 0)) if ordered and cache_on else set()
        tracer.prepare_replay(capture)
        for b in range(1, len(data)):
            tracer.begin(capture=capture if cache_on else None)
            try:
                out = call_model(rewritten, data[b])
            except _StructureChanged:
                cache_on = False
                tracer.calls = {}
                tracer.begin()
                out = call_model(rewritten, data[b])
            before.add(out, ref_outputs[b])
            cache[b] = tracer.captured if cache_on else {}
            if cache_on and tracer.seen != probe_seq:
                cache_on = False
        out_before = before.value()
    if replay_cache and not cache_on:
        notes.append("module call structure differs between batches: ran without the replay cache "
                     "(slower, same result)")
    if not cache_on:
        tracer.calls = {}
        cache = [{} for _ in data]

    # 3. layer by layer, in execution order
    done: list[LayerCalibration] = []
    for i, layer in enumerate(ordered):
        capture = tracer.before((layer.name, 0)) if cache_on else set()
        if cache_on:
            tracer.prepare_replay(capture)
        t_layer = time.perf_counter()
        try:
            cache = _layer_pass(rewritten, data, layer, tracer, cache, capture, cache_on, probe_seq)
        except _StructureChanged:
            cache_on = False
            tracer.calls = {}
            notes.append("module call structure changed during calibration: switched the replay cache off")
            layer.stats = GramStats()
            layer.samples, layer.sample_targets = [], []
            cache = _layer_pass(rewritten, data, layer, tracer, [{} for _ in data], set(), False, [])
        if not layer.stats.ready:
            rec = LayerCalibration(layer.name, layer.kind, layer.m, "skipped", math.nan, math.nan, 0,
                                   (), "no calibration positions reached this layer")
        else:
            rec = layer.refit_through_relu(layer.refit(ridge, alternate), ridge)
        layer.stats = GramStats()  # free the statistics
        layer.samples, layer.sample_targets = [], []
        done.append(rec)
        say(f"{i + 1}/{len(ordered)} {layer.name}: rel err {rec.rel_error_before:.4f} -> {rec.rel_error_after:.4f} "
            f"[{rec.method}{': ' + ','.join(rec.steps) if rec.steps else ''}] "
            f"{'' if rec.act_error_after is None else f' act err {rec.act_error_before:.4f} -> {rec.act_error_after:.4f}'}"
            f" ({time.perf_counter() - t_layer:.1f} s){' ' + rec.note if rec.note else ''}")
    for l in layers:
        if l.skip:
            done.append(LayerCalibration(l.name, l.kind, l.m, "skipped", math.nan, math.nan, 0, (),
                                         f"skipped: {l.skip}"))

    # 4. the "after" pass (replays everything before the last refit layer)
    out_after = None
    if measure_output:
        after = _RelErr()
        for b, batch in enumerate(data):
            tracer.begin(replay=cache[b] if cache_on else None)
            after.add(call_model(rewritten, batch), ref_outputs[b])
            cache[b] = {}
        out_after = after.value()
    return out_before, out_after, done, cache_on


def _layer_pass(rewritten: nn.Module, data: list[Any], layer: _Layer, tracer: _Tracer,
                cache: list[dict[Key, Any]], capture: set[Key], cache_on: bool,
                probe_seq: list[Key]) -> list[dict[Key, Any]]:
    """Run every batch up to ``layer`` (replaying ``cache``), accumulate its statistics; return the new cache.

    Without anything to replay, the calls seen must follow the probe run (else ``_StructureChanged``).
    """
    state: dict[str, Any] = {}
    target = layer.block if layer.joint else layer.last

    def grab(module: nn.Module, args: Any) -> None:
        if layer.joint:
            state["x"], state["z"] = args[0], None
        else:
            state["x"], state["z"] = None, args[0]
        raise _Stop

    new_cache: list[dict[Key, Any]] = []
    handle = target.register_forward_pre_hook(grab)
    try:
        for b, batch in enumerate(data):
            pos, y = layer.positions[b], layer.targets[b]
            tracer.begin(replay=cache[b] if cache_on else None, capture=capture if cache_on else None)
            state.clear()
            try:
                call_model(rewritten, batch)
            except _Stop:
                pass
            if cache_on and not cache[b] and tracer.seen != probe_seq[: len(tracer.seen)]:
                raise _StructureChanged(layer.name)
            new_cache.append(tracer.captured)
            cache[b] = {}
            if "x" not in state or pos is None or y is None:
                continue
            feats = layer.features(state["x"], state["z"], pos)
            layer.stats.add(feats, y)
            if layer.act is not None:
                layer.keep_samples(feats, y, len(data), _ACT_SAMPLE_BYTES)
    finally:
        handle.remove()
    return new_cache
