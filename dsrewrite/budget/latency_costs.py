# SPDX-License-Identifier: Apache-2.0
"""Latency costs for a ``latency_ms`` budget: measured per-conv times and an additive model of the whole.

What is measured (once per plan, before the sensitivity and before any rewrite):

* the **dense model** at the example input: :func:`~dsrewrite.measure.latency.compare_latency` of the
  model against itself, ``rounds`` interleaved rounds after ``warmup`` (the recipe's ``latency:``
  section, default 15 and 3), the median of all ``2·rounds`` calls;
* every **candidate of every selected conv**, at the conv's recorded input shape, on its device and
  dtype, in the memory format of ``latency.channels_last``: each separable block against the dense
  conv with the same interleaved method (:func:`~dsrewrite.measure.timing.time_candidates`), with fewer
  rounds to keep the number of timings reasonable (``max(3, rounds // 3)`` rounds, ``min(warmup, 1)``
  warmup). A block's time is the conv's dense median × the median of its per-round ratios.
* **confirmation** (:func:`confirm_choice`): so few rounds are noisy, and an allocation favours the
  candidates whose time came out too low. After each allocation, every chosen block not yet confirmed is
  timed again against its dense conv with the model's ``rounds``/``warmup``, its cost replaced by that
  time, and the allocation repeated, until every chosen block's time is a confirmed one (at most
  ``max_passes``; the plan's notes say how many were re-timed and whether any is left unconfirmed).

The **predicted model latency** of a configuration is additive:
``dense model − α · (Σ dense conv times − Σ chosen candidate times)``. With ``α = 1`` it assumes that
a conv timed alone costs what it costs inside the model (no cache, fusion or scheduling effects
between layers). ``α`` is **calibrated** on one more measurement (:func:`calibrate_scale`): the model
with every selected conv at its fastest block (random weights: only the speed matters) is timed against
the dense model, interleaved, and ``α`` = measured saving / additive saving, so that the prediction is
exact at both ends (all dense, all fastest) and linear in between. The check after the rewrite
(:func:`latency_check`) says how far off that was. The allocation works on exact integers, so times
(× ``α``) are converted to integer **nanoseconds** (rounded; at least 1 ns).

The timing functions are looked up in this module at call time (:func:`time_model`,
:func:`time_layer`, :func:`time_confirm`, :func:`time_fastest`, :func:`time_result`): pass a
:class:`LatencyTimer` or monkeypatch them to plan from given timings (tests do; real timings are noisy).

Example:
    >>> from dsrewrite.recipe.schema import LatencySpec
    >>> c = LatencyCosts(10.0, (("a", (4.0, 1.0, 2.0)), ("b", (3.0, 0.5))), LatencySpec(), "cpu", "float32")
    >>> c.fixed_ns, c.costs_ns(0), c.predicted_ms((1, 0))
    (3000000, [4000000, 1000000, 2000000], 7.0)
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..measure.latency import compare_latency
from ..measure.timing import time_candidates
from ..planning.types import LayerConfig, Plan
from ..recipe.schema import LatencySpec
from .candidates import LayerCandidates
from .types import Budget, BudgetError

__all__ = ["LatencyCosts", "LatencyTimer", "measure_latency_costs", "confirm_choice", "latency_check",
           "latency_check_for_plan", "calibrate_scale", "time_model", "time_layer", "time_confirm", "time_fastest",
           "time_result", "candidate_rounds", "NS_PER_MS"]

NS_PER_MS = 1_000_000


def candidate_rounds(spec: LatencySpec) -> tuple[int, int]:
    """``(rounds, warmup)`` for each candidate block: fewer than the model's (many candidates per conv)."""
    return max(3, spec.rounds // 3), min(spec.warmup, 1)


def _ns(ms: float) -> int:
    return max(1, int(round(ms * NS_PER_MS)))


def _fmt(ms: float) -> str:
    return f"{ms:.3g}"


# ----------------------------------------------------------------------------- the timings (replaceable)
def time_model(model: nn.Module, example_inputs: Any, spec: LatencySpec) -> float:
    """The model's median latency (ms) at ``example_inputs``: interleaved against itself, ``2·rounds`` calls."""
    cmp = compare_latency(model, model, example_inputs, rounds=spec.rounds, warmup=spec.warmup,
                          channels_last=spec.channels_last)
    return statistics.median([*cmp.times_a_ms, *cmp.times_b_ms])


def time_layer(conv: nn.Module, lc: LayerCandidates, cfg: Optional[LayerConfig], spec: LatencySpec) -> list[float]:
    """Each candidate's time (ms) for one conv, ``[dense, *blocks]`` in ``lc.candidates`` order."""
    shape = lc.fact.input_shape
    rounds, warmup = candidate_rounds(spec)
    cl = spec.channels_last and shape is not None and len(shape) in (4, 5)
    dense, blocks = time_candidates(conv, [(c.kind, c.m) for c in lc.candidates[1:]], shape,  # type: ignore[misc]
                                    cfg=cfg, rounds=rounds, warmup=warmup, channels_last=cl)
    return [dense, *blocks]


def time_confirm(conv: nn.Module, lc: LayerCandidates, index: int, cfg: Optional[LayerConfig],
                 spec: LatencySpec) -> tuple[float, float]:
    """``(dense ms, block ms)`` of candidate ``index`` of one conv, interleaved with the model's rounds."""
    shape = lc.fact.input_shape
    c = lc.candidates[index]
    cl = spec.channels_last and shape is not None and len(shape) in (4, 5)
    dense, blocks = time_candidates(conv, [(c.kind, c.m)], shape, cfg=cfg, rounds=spec.rounds,  # type: ignore[arg-type]
                                    warmup=spec.warmup, channels_last=cl)
    return dense, blocks[0]


def time_result(dense: nn.Module, rewritten: nn.Module, example_inputs: Any,
                spec: LatencySpec) -> tuple[float, float, float]:
    """``(dense ms, rewritten ms, median per-round ratio rewritten / dense)``, interleaved."""
    cmp = compare_latency(dense, rewritten, example_inputs, rounds=spec.rounds, warmup=spec.warmup,
                          channels_last=spec.channels_last)
    return cmp.median_a_ms, cmp.median_b_ms, cmp.ratio


def time_fastest(dense: nn.Module, fastest: nn.Module, example_inputs: Any,
                 spec: LatencySpec) -> tuple[float, float, float]:
    """The calibration's timing (:func:`calibrate_scale`): :func:`time_result` of dense vs all-fastest."""
    return time_result(dense, fastest, example_inputs, spec)


@dataclass(frozen=True)
class LatencyTimer:
    """The four timings a latency budget needs (defaults: this module's functions, read when the timer is made)."""

    model: Callable[[nn.Module, Any, LatencySpec], float] = field(default_factory=lambda: time_model)
    layer: Callable[[nn.Module, LayerCandidates, Optional[LayerConfig], LatencySpec], list[float]] = field(
        default_factory=lambda: time_layer)
    result: Callable[[nn.Module, nn.Module, Any, LatencySpec], tuple[float, float, float]] = field(
        default_factory=lambda: time_result)
    confirm: Callable[[nn.Module, LayerCandidates, int, Optional[LayerConfig], LatencySpec], tuple[float, float]] = (
        field(default_factory=lambda: time_confirm))
    fastest: Callable[[nn.Module, nn.Module, Any, LatencySpec], tuple[float, float, float]] = field(
        default_factory=lambda: time_fastest)


# ----------------------------------------------------------------------------- the costs
@dataclass(frozen=True)
class LatencyCosts:
    """Measured times (ms): the dense model, and per selected conv each candidate's (index 0: dense)."""

    model_ms: float
    layers: tuple[tuple[str, tuple[float, ...]], ...]
    spec: LatencySpec
    device: str
    dtype: str
    #: wall-clock seconds the timings took
    seconds: float = 0.0
    #: ``(layer, candidate)`` pairs re-timed by :func:`confirm_choice`, its allocation passes, and how
    #: many chosen blocks it left unconfirmed
    confirmed: tuple[tuple[int, int], ...] = ()
    passes: int = 0
    unconfirmed: int = 0
    #: ``α``: the measured times are multiplied by it in the costs (1: uncalibrated); the all-fastest
    #: model's measured and additive ratios to dense that gave it (``None``: not calibrated)
    scale: float = 1.0
    fastest_measured: Optional[float] = None
    fastest_additive: Optional[float] = None

    @property
    def model_ns(self) -> int:
        return _ns(self.model_ms)

    def costs_ns(self, layer: int) -> list[int]:
        """Layer ``layer``'s candidate times as integer nanoseconds (the allocation's costs)."""
        return [_ns(t * self.scale) for t in self.layers[layer][1]]

    @property
    def fixed_ns(self) -> int:
        """What the rest of the model costs in the additive model: dense model − α · Σ dense conv times."""
        return self.model_ns - sum(self.costs_ns(i)[0] for i in range(len(self.layers)))

    def predicted_ms(self, choice: Sequence[int]) -> float:
        """The additive model's latency (ms) with candidate ``choice[i]`` for conv ``i``."""
        return (self.fixed_ns + sum(self.costs_ns(l)[i] for l, i in enumerate(choice))) / NS_PER_MS

    def limit_ns(self, budget: Budget) -> int:
        """The budget's latency as nanoseconds (a value ≤ 1: that fraction of the dense model's)."""
        v = budget.latency_ms
        if v is None:
            raise KeyError("latency_ms")
        whole = self.model_ns if budget.is_fraction("latency_ms") else NS_PER_MS
        return int(math.floor(v * whole))

    def describe_limit(self, limit_ns: int) -> str:
        return (f"latency {_fmt(limit_ns / NS_PER_MS)} ms ({limit_ns / self.model_ns:.3g} of the dense model's "
                f"measured {_fmt(self.model_ms)} ms)")

    def unmet(self, limit_ns: int, reach_ns: int, n_layers: int, recipe: str) -> BudgetError:
        """The refusal of a latency budget that even every conv's fastest candidate cannot meet."""
        reach = reach_ns / NS_PER_MS
        timed = ("" if self.fastest_measured is None else
                 f"; that model, built and timed against the dense one, ran at {self.fastest_measured:.3f} of it")
        return BudgetError(
            f"budget {self.describe_limit(limit_ns)} cannot be met: with every selected conv ({n_layers} "
            f"of recipe {recipe!r}) at its fastest measured candidate the predicted latency is {_fmt(reach)} ms "
            f"({100.0 * reach_ns / self.model_ns:.1f}% of the dense model{timed}). Hint: ask for at least "
            f"{_fmt(reach)} ms ({reach_ns / self.model_ns:.3g} of the model), or select more convs (another recipe); "
            f"timings are measured on this machine now and vary with its load.")

    def reason(self, layer: int, lc: LayerCandidates, errors: Sequence[float], i: int) -> str:
        """A plan entry's reason in ms: what candidate ``i`` of conv ``layer`` costs, and why it was taken."""
        ms = self.layers[layer][1]
        c = lc.candidates[i]
        if c.dense:
            if len(ms) < 2:
                return f"kept dense (budget): no separable candidate costs fewer MACs ({_fmt(ms[0])} ms measured)"
            j = min(range(1, len(ms)), key=lambda j: (ms[j], j))
            if ms[j] >= ms[0]:
                return (f"kept dense (budget): {_fmt(ms[0])} ms measured, no candidate is faster (the fastest, "
                        f"{lc.candidates[j].label}, {_fmt(ms[j])} ms)")
            return (f"kept dense (budget): {_fmt(ms[0])} ms measured; the fastest candidate, {lc.candidates[j].label} "
                    f"({_fmt(ms[j])} ms), would save {_fmt(ms[0] - ms[j])} ms but add {errors[j]:.3g} to the "
                    f"predicted squared output error")
        text = (f"budget: {c.label}: {_fmt(ms[i])} ms (dense {_fmt(ms[0])} ms, measured), predicted squared "
                f"output error {errors[i]:.3g}")
        prev = [j for j, d in enumerate(lc.candidates) if d.kind == c.kind and d.m == c.m - 1]
        if prev and errors[prev[0]] > 0:
            text += (f"; m={c.m - 1} → m={c.m} cuts it by {100.0 * (1 - errors[i] / errors[prev[0]]):.0f}% "
                     f"for {ms[i] - ms[prev[0]]:+.3g} ms")
        return text

    def measured(self, layer: int, i: int) -> dict[str, float]:
        """What a plan entry records: the dense conv's and the chosen candidate's time (ms)."""
        ms = self.layers[layer][1]
        return {"dense_ms": ms[0], "budget_ms": ms[i]}

    def notes(self, choice: Sequence[int], limit_ns: int) -> list[str]:
        """The plan's notes: target, prediction, and how the times were measured."""
        n = sum(len(t) for _, t in self.layers)
        rounds, warmup = candidate_rounds(self.spec)
        fmt = "channels_last" if self.spec.channels_last else "contiguous"
        pred = self.predicted_ms(choice)
        dense_sum = sum(t[0] for _, t in self.layers)
        return [
            f"latency budget: target {limit_ns / NS_PER_MS:.6g} ms, predicted {pred:.6g} ms, "
            f"dense model {self.model_ms:.6g} ms "
            f"({pred / self.model_ms:.3f} of it predicted; {fmt}, {self.spec.rounds} rounds)",
            f"latency costs: dense model measured at the example input (median of {2 * self.spec.rounds} calls, "
            f"{self.spec.rounds} interleaved rounds after {self.spec.warmup} warmup; {self.device}, {self.dtype}, "
            f"{fmt}); {n} candidate times over {len(self.layers)} convs (dense included, the selected convs' dense "
            f"times sum to {_fmt(dense_sum)} ms), each block timed against its dense conv at the conv's input shape "
            f"({rounds} interleaved rounds after {warmup} warmup: dense median × median per-round ratio); predicted "
            f"latency = dense model − α·(Σ dense conv times − Σ chosen times), {self._scale_note()}; costs as "
            f"integer nanoseconds; {self._confirm_note()}",
        ]

    def _scale_note(self) -> str:
        if self.fastest_measured is None or self.fastest_additive is None:
            return "α = 1 (additive: convs timed alone are assumed to cost the same inside the model; not calibrated)"
        return (f"α = {self.scale:.3f}: every selected conv at its fastest block ran at {self.fastest_measured:.3f} "
                f"of the dense model (interleaved, {self.spec.rounds} rounds) where the plain sum of the conv times "
                f"predicted {self.fastest_additive:.3f}")

    def _confirm_note(self) -> str:
        if not self.confirmed:
            return "no separable block chosen, nothing re-timed"
        left = (f"; {self.unconfirmed} chosen block(s) still unconfirmed after {self.passes} passes"
                if self.unconfirmed else "")
        return (f"{len(self.confirmed)} chosen block(s) re-timed against their dense conv with {self.spec.rounds} "
                f"rounds after {self.spec.warmup} warmup ({self.passes} allocation pass(es)){left}")


def measure_latency_costs(model: nn.Module, layers: Sequence[LayerCandidates], example_inputs: Any, *,
                          configs: Mapping[str, Optional[LayerConfig]], spec: Optional[LatencySpec] = None,
                          timer: Optional[LatencyTimer] = None, base: Optional[Plan] = None) -> LatencyCosts:
    """Time the dense model and every candidate of ``layers`` (see the module doc).

    ``configs``: each conv's planned :class:`~dsrewrite.planning.types.LayerConfig` (its ``mid_norm``/
    ``mid_act`` shape the blocks that are timed). ``spec``: the recipe's ``latency:`` section (rounds,
    warmup, channels_last); default :class:`~dsrewrite.recipe.schema.LatencySpec`. ``base``: the recipe's
    plan; given, ``α`` is calibrated (:func:`calibrate_scale`).

    Raises:
        RewriteError: a timing that is not a finite number > 0 (a broken timer).
    """
    from ..errors import RewriteError

    spec = spec or LatencySpec()
    timer = timer or LatencyTimer()
    start = time.perf_counter()
    modules = dict(model.named_modules())
    out = []
    for lc in layers:
        ms = tuple(float(t) for t in timer.layer(modules[lc.name], lc, configs.get(lc.name), spec))
        if len(ms) != len(lc.candidates) or not all(math.isfinite(t) and t > 0 for t in ms):
            raise RewriteError(f"latency timing of {lc.name!r} gave {ms!r} for {len(lc.candidates)} candidates "
                               "(expected one finite time > 0 each)")
        out.append((lc.name, ms))
    model_ms = float(timer.model(model, example_inputs, spec))
    if not (math.isfinite(model_ms) and model_ms > 0):
        raise RewriteError(f"latency timing of the model gave {model_ms!r} ms")
    param = next(iter(model.parameters()), None)
    device = str(param.device) if param is not None else "cpu"
    dtype = str(param.dtype).replace("torch.", "") if param is not None else str(torch.get_default_dtype())
    costs = LatencyCosts(model_ms, tuple(out), spec, device, dtype)
    if base is not None:
        costs = calibrate_scale(model, base, layers, costs, example_inputs, timer=timer)
    return replace(costs, seconds=time.perf_counter() - start)


def calibrate_scale(model: nn.Module, base: Plan, layers: Sequence[LayerCandidates], costs: LatencyCosts,
                    example_inputs: Any, *, timer: Optional[LatencyTimer] = None) -> LatencyCosts:
    """``costs`` with ``α`` calibrated on the model with every conv of ``layers`` at its fastest block.

    The blocks are built with random weights (only their speed matters) from ``base``'s entries (their
    ``mid_norm``/``mid_act``), sharing the model's other tensors; the caller's model is not changed.
    ``α = (1 − measured ratio) / (1 − additive ratio)``, kept ≥ 0 (a fastest model measured no faster
    than dense: no conv change is predicted to save time). Without any block faster than its dense conv
    there is nothing to calibrate: ``costs`` is returned as is.
    """
    from ..planning.apply import apply_checked
    from ..planning.types import PlanEntry

    timer = timer or LatencyTimer()
    fastest = {lc.name: (lc, min(range(len(t)), key=lambda i, t=t: (t[i], i)))
               for lc, (_, t) in zip(layers, costs.layers)}
    picked = {n: v for n, v in fastest.items() if v[1] != 0}
    if not picked:
        return costs
    entries = []
    for e in base.entries:
        if e.name in picked:
            lc, i = picked[e.name]
            c = lc.candidates[i]
            cfg = replace(e.config or LayerConfig(), order=c.kind, depth_multiplier=c.m, init="random")
            entries.append(PlanEntry(e.name, "replace", "latency calibration: fastest block", config=cfg, fact=e.fact))
        else:
            entries.append(PlanEntry(e.name, "skip", "latency calibration: kept", fact=e.fact))
    fast = apply_checked(model, replace(base, entries=tuple(entries)), init="random", share_weights=True)
    ratio = float(timer.fastest(model, fast, example_inputs, costs.spec)[2])
    saved = sum(t[0] - t[fastest[n][1]] for n, t in costs.layers) / costs.model_ms
    if not (math.isfinite(ratio) and ratio > 0 and saved > 0):
        return costs
    alpha = max(0.0, (1.0 - ratio) / saved)
    return replace(costs, scale=alpha, fastest_measured=ratio, fastest_additive=1.0 - saved)


def confirm_choice(model: nn.Module, layers: Sequence[LayerCandidates], costs: LatencyCosts, choice: Sequence[int],
                   choose: Callable[[list[list[int]]], Any], *, configs: Mapping[str, Optional[LayerConfig]],
                   timer: Optional[LatencyTimer] = None, max_passes: int = 3) -> tuple[LatencyCosts, Any]:
    """Re-time the chosen blocks with the model's rounds and re-allocate until the choice is confirmed.

    ``choice``: the first allocation's candidate index per conv; ``choose``: the allocation itself, from
    per-conv integer-ns costs to an object with a ``choice`` (an :class:`~dsrewrite.budget.allocate.Allocation`;
    its exceptions pass through). Returns the costs with the re-timed blocks and the last allocation
    (``None`` when nothing needed re-timing: keep the first).
    """
    timer = timer or LatencyTimer()
    modules = dict(model.named_modules())
    times = [list(t) for _, t in costs.layers]
    done: list[tuple[int, int]] = list(costs.confirmed)
    alloc, passes = None, 0
    while passes < max_passes:
        todo = [(l, i) for l, i in enumerate(choice) if i != 0 and (l, i) not in done]
        if not todo:
            break
        for l, i in todo:
            lc = layers[l]
            d, c = (float(v) for v in timer.confirm(modules[lc.name], lc, i, configs.get(lc.name), costs.spec))
            if not (math.isfinite(d) and math.isfinite(c) and d > 0 and c > 0):
                from ..errors import RewriteError

                raise RewriteError(f"latency timing of {lc.name!r} {lc.candidates[i].label} gave {(d, c)!r}")
            times[l][i] = times[l][0] * c / d  # on the conv's pooled dense time, as the first timings
            done.append((l, i))
        passes += 1
        costs = replace(costs, layers=tuple((n, tuple(t)) for (n, _), t in zip(costs.layers, times)))
        alloc = choose([costs.costs_ns(l) for l in range(len(times))])
        choice = alloc.choice
    left = sum(1 for l, i in enumerate(choice) if i != 0 and (l, i) not in done)
    return replace(costs, confirmed=tuple(done), passes=passes, unconfirmed=left), alloc


# ----------------------------------------------------------------------------- the check after the rewrite
def latency_check(dense: Optional[nn.Module], rewritten: nn.Module, example_inputs: Any, *, target_ms: float,
                  predicted_ms: float, planned_dense_ms: float, spec: Optional[LatencySpec] = None,
                  timer: Optional[LatencyTimer] = None) -> str:
    """One note: the rewritten model's latency measured against the dense model, next to target and prediction.

    ``dense=None`` (the caller's model was rewritten in place): the rewritten model is timed alone and
    compared with the dense latency measured at planning time (not interleaved; said in the note).
    The target and the prediction are judged on ratios to the dense model (robust to a change of the
    machine's load between planning and check): ``measured ratio / predicted ratio − 1``.
    """
    spec = spec or LatencySpec()
    timer = timer or LatencyTimer()
    if dense is None:
        new_ms = float(timer.model(rewritten, example_inputs, spec))
        dense_ms, ratio = planned_dense_ms, new_ms / planned_dense_ms
        how = f"timed alone, against the dense {_fmt(dense_ms)} ms measured at planning time (rewritten in place)"
    else:
        dense_ms, new_ms, ratio = (float(v) for v in timer.result(dense, rewritten, example_inputs, spec))
        how = f"vs dense {_fmt(dense_ms)} ms now, interleaved ({spec.rounds} rounds, median per-round ratio)"
    pred_ratio, target_ratio = predicted_ms / planned_dense_ms, target_ms / planned_dense_ms
    off = ratio / pred_ratio - 1.0
    within = ("within the target" if ratio <= target_ratio
              else f"over the target by {100.0 * (ratio / target_ratio - 1):.1f}%")
    return (f"latency check: target {_fmt(target_ms)} ms ({target_ratio:.3f} of dense), predicted "
            f"{_fmt(predicted_ms)} ms ({pred_ratio:.3f} of dense), measured {_fmt(new_ms)} ms {how}: "
            f"{ratio:.3f} of dense, {_fmt(ratio * planned_dense_ms)} ms at the planning-time dense "
            f"{_fmt(planned_dense_ms)} ms: {within}; the prediction was off by {100.0 * off:+.1f}% (ratios to the "
            f"dense model, which the machine's load changes less than absolute times)")


_NOTE_RE = re.compile(r"^latency budget: target (\S+) ms, predicted (\S+) ms, dense model (\S+) ms "
                      r"\(\S+ of it predicted; (channels_last|contiguous), (\d+) rounds\)")


def latency_check_for_plan(plan: Plan, dense: Optional[nn.Module], rewritten: nn.Module, example_inputs: Any, *,
                           timer: Optional[LatencyTimer] = None) -> Optional[str]:
    """:func:`latency_check` from a plan's notes (a plan made for a ``latency_ms`` budget), else ``None``."""
    for note in plan.notes:
        m = _NOTE_RE.match(note)
        if m:
            spec = LatencySpec(rounds=int(m.group(5)), channels_last=m.group(4) == "channels_last")
            return latency_check(dense, rewritten, example_inputs, target_ms=float(m.group(1)),
                                 predicted_ms=float(m.group(2)), planned_dense_ms=float(m.group(3)), spec=spec,
                                 timer=timer)
    return None
