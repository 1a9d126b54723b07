# SPDX-License-Identifier: Apache-2.0
"""Sensitivity: the output error each candidate of each conv is predicted to cause.

The prediction is additive over convs: the predicted squared relative output error of a
configuration is ``Σ_l gain_l(m_l) · e_l(candidate_l)``, where ``e_l`` is conv ``l``'s own squared
relative output error (``‖ŷ_l − y_l‖² / ‖y_l‖²``) and ``gain_l(m)`` how much of it reaches the
model's output, measured.

**With calibration data** (:func:`data_sensitivity`; ``method = "data"``), in one pass of the
original model over the batches plus a few short passes for the gains:

* a conv whose input patches have at most ``max_patch_dim`` features keeps their Gram matrix: every
  candidate at ``m`` = 1, 2, 4, ... (powers of two up to ``exact_m``, and ``exact_m``) is refit on it in closed
  form as calibration refits it (last stage, then alternating rounds where the joint size allows;
  :class:`~dsrewrite.refit.layer_fit.LayerFit`) and its error read off the quadratic form, without running
  the model; multipliers in between are interpolated in the spectrum's coordinate, larger ones follow the
  spectrum from ``exact_m``;
* a wider conv: for each kind the ``m = 1`` block's last stage is refit on last-stage statistics
  (:func:`~dsrewrite.refit.lstsq.ridge_solve`, kept only if it lowers the error), and the other
  multipliers follow the kernel's spectrum: ``e_l(kind, m) = e_l(kind, 1) · w(m)² / w(1)²`` with
  ``w(m)`` the kind's relative weight error at rank ``m`` (0 at ``m = kh·kw``);
* ``gain_l(m)``: a refit block is put in place of conv ``l`` alone (every other conv dense) and the
  model run on the first ``gain_images`` calibration images: the model's squared relative output
  error divided by the conv's own, both measured in that run. Measured at ``m = 1`` and ``m = gain_m``
  with the blocks of the kind best at ``m = 1`` (shared by the kinds), geometric in ``log m`` between, held
  beyond;
  convs too wide for the exact scores at ``m = 1`` only. On a trained network the gain falls as ``m``
  grows: a single ``m = 1`` gain over-predicted ``m = 4`` errors up to 4.6× on the bench's U-Net.

**Without data** (:func:`weight_sensitivity`; ``method = "weights"``): ``e_l(kind, m) = w(m)²``,
the discarded spectral energy of the kernel's SVD, and ``gain_l`` measured as above with the
unrefit SVD block on the example input (so it is the output's response per unit of weight error).

Calibration also runs more alternating rounds, fits through following ReLUs and corrects errors that
reach a layer from earlier ones, none of which the prediction models, and the errors of several convs
are assumed to add: the measured error after calibration is usually below the prediction (see
docs/budget.md).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.planning.capture import capture
    >>> from dsrewrite.budget.candidates import layer_candidates
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    >>> x = torch.randn(2, 3, 12, 12)
    >>> fact = capture(net, x).by_name()["2"]
    >>> lc = layer_candidates(fact, net[2], ("dw_pw",), dense_macs=8 * 8 * 9 * 288)
    >>> s = data_sensitivity(net, [lc], [x])
    >>> s.method, s.layers[0].errors[0], s.layers[0].errors[1] > s.layers[0].errors[2] >= 0
    ('data', 0.0, True)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..factorize import SliceLayout, spectrum
from ..kinds import get_kind
from ..planning.types import LayerConfig
from ..refit.batches import batch_size_of, first_samples
from ..refit.layer_fit import LayerFit
from ..refit.lstsq import GramStats, gather_patches, quadratic_error, ridge_solve, sample_positions
from ..runtime.run import call_model, evaluating, first_tensor, flatten_outputs
from .candidates import LayerCandidates

__all__ = ["LayerSensitivity", "Sensitivity", "data_sensitivity", "weight_sensitivity"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One conv: ``layer_errors[i]`` its own predicted squared relative error with candidate ``i``,
    ``gains[i]`` how much of it reaches the model's output (measured), ``errors[i] = gains[i] ·
    layer_errors[i]`` the predicted contribution to the model's squared relative output error (``0``
    for dense), and how the gains were measured."""

    name: str
    layer_errors: tuple[float, ...]
    gains: tuple[float, ...]
    gain_note: str

    @property
    def gain(self) -> float:
        """The largest candidate gain (the ``m = 1`` one, where the output sees most of the conv's error)."""
        return max(self.gains, default=0.0)

    @property
    def errors(self) -> tuple[float, ...]:
        return tuple(g * e for g, e in zip(self.gains, self.layer_errors))


@dataclass(frozen=True)
class Sensitivity:
    """Every selected conv's :class:`LayerSensitivity`; ``method`` is ``"data"`` or ``"weights"``."""

    layers: tuple[LayerSensitivity, ...]
    method: str
    note: str
    seconds: float


def _kinds_of(lc: LayerCandidates) -> list[str]:
    seen: list[str] = []
    for c in lc.candidates:
        if c.kind is not None and c.kind not in seen:
            seen.append(c.kind)
    return seen


def _spectral_ratios(conv: nn.Conv2d, lc: LayerCandidates) -> dict[tuple[str, int], float]:
    """``w(m)²`` (relative squared weight error) of every candidate.

    A kind that names its SVD slicing (``slices``, as the built-ins do) gets one SVD for all
    multipliers (Eckart–Young: the discarded ``Σσ²`` per slice); any other kind is asked
    :meth:`~dsrewrite.kinds.ReplacementKind.weight_error` per multiplier.
    """
    w = conv.weight.detach()
    out: dict[tuple[str, int], float] = {}
    for kname in _kinds_of(lc):
        kind = get_kind(kname)
        ms = [c.m for c in lc.candidates if c.kind == kname]
        slices = getattr(kind, "slices", None)
        if isinstance(slices, SliceLayout):
            s2 = spectrum(w, slices) ** 2
            total = float(s2.sum())
            for m in ms:
                out[(kname, m)] = float(s2[:, m:].sum()) / total if total > 0 else 0.0
        else:
            for m in ms:
                out[(kname, m)] = float(kind.weight_error(w, m)) ** 2
    return out


class _Accum:
    """Squared error and reference energy, float64."""

    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0

    def add(self, a: Tensor, r: Tensor) -> None:
        a64, r64 = a.detach().to(torch.float64), r.detach().to(a.device, torch.float64)
        self.err += float(((a64 - r64) ** 2).sum())
        self.ref += float((r64 * r64).sum())

    def value(self) -> float:
        return self.err / self.ref if self.ref > 0 else 0.0


def _measure_gains(work: nn.Module, blocks: dict[Any, tuple[str, nn.Module]], batches: Sequence[Any],
                   refs: Sequence[list[Tensor]]) -> dict[Any, tuple[float, float, float]]:
    """Per key: ``(gain, output rel err², layer rel err²)`` with ``blocks[key] = (conv name, block)`` alone in
    place of that conv."""
    out: dict[Any, tuple[float, float, float]] = {}
    for key, (name, block) in blocks.items():
        parent_name, _, attr = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        conv = getattr(parent, attr)
        layer_acc, out_acc = _Accum(), _Accum()

        def hook(module: nn.Module, args: Any, output: Tensor, conv: nn.Module = conv,
                 acc: _Accum = layer_acc) -> None:
            acc.add(output, conv(args[0]))

        setattr(parent, attr, block)
        handle = block.register_forward_hook(hook)
        try:
            for batch, ref in zip(batches, refs):
                leaves = [t for _, t in flatten_outputs(call_model(work, batch))]
                for a, r in zip(leaves, ref):
                    out_acc.add(a, r)
        finally:
            handle.remove()
            setattr(parent, attr, conv)
        le, oe = layer_acc.value(), out_acc.value()
        out[key] = (oe / le if le > 0 else 0.0, oe, le)
    return out


def _gain_at(measured: Sequence[tuple[int, float]], m: int) -> float:
    """The gain at multiplier ``m`` from gains measured at some multipliers (sorted by ``m``): the measured one,
    else between the nearest two ``log g`` linear in ``log m`` (geometric; linear where a gain is 0), else the
    nearest (the largest measured for larger ``m``).

    Geometric in ``log m`` because the gain falls fastest at small ``m``: on the bench's trained U-Net it
    predicted the m=2 and m=3 errors best of four interpolations (mean log ratio to the measured +0.07,
    against +0.18 for linear in ``m``).
    """
    if not measured:
        return 0.0
    lower = [(mm, g) for mm, g in measured if mm <= m]
    upper = [(mm, g) for mm, g in measured if mm >= m]
    if not lower:
        return upper[0][1]
    if not upper:
        return lower[-1][1]
    (m0, g0), (m1, g1) = lower[-1], upper[0]
    if m1 == m0:
        return g0
    t = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
    if g0 <= 0 or g1 <= 0:
        return g0 + (g1 - g0) * t
    return math.exp(math.log(g0) + t * (math.log(g1) - math.log(g0)))


#: input elements the gain runs cover when ``gain_images`` is not given (3 images of 3×256², 43 of 3×64²)
GAIN_ELEMENTS = 1 << 19


def _auto_gain_images(batches: Sequence[Any]) -> int:
    """Images for the gain runs: enough to cover :data:`GAIN_ELEMENTS` input elements (at least one)."""
    if not batches:
        return 1
    t = first_tensor(batches[0])
    per = t.numel() // max(1, batch_size_of(batches[0])) if t is not None else 0
    return max(1, math.ceil(GAIN_ELEMENTS / per)) if per > 0 else 8


def _gain_batches(batches: Sequence[Any], images: int) -> list[Any]:
    """The first ``images`` samples of ``batches``: whole batches, the last one cut (:func:`first_samples`)."""
    out, n = [], 0
    for b in batches:
        if n >= images:
            break
        out.append(first_samples(b, images - n))
        n += batch_size_of(out[-1])
    return out


def data_sensitivity(model: nn.Module, layers: Sequence[LayerCandidates], batches: Sequence[Any], *,
                     max_positions: int = 4096, ridge: float = 1e-3, gain_images: Optional[int] = None,
                     max_patch_dim: int = 2304, exact_m: int = 4, alternate: int = 1,
                     max_joint_dim: int = 2304, gain_m: int = 4, seed: int = 0) -> Sensitivity:
    """Predicted errors from calibration batches (model inputs, as :func:`~dsrewrite.refit.batches.iter_inputs`
    gives them); see the module doc. The model is not changed (the gains run on a copy).

    ``max_positions``: output positions sampled per conv over all batches; ``gain_images``: images
    the gain runs use (the first ones; default: enough for :data:`GAIN_ELEMENTS` input elements). A conv whose input patches have at most ``max_patch_dim``
    features (``C_in·kh·kw``) keeps their full Gram matrix, and every candidate up to ``m = exact_m`` is
    refit on it as calibration refits (last stage, then ``alternate`` rounds of first and last stage
    where the joint size is at most ``max_joint_dim``) and scored exactly; larger multipliers follow the
    spectrum from ``exact_m``. Wider convs: the ``m = 1`` last-stage refit and the spectrum.
    ``gain_m``: the second multiplier at which the output gain is measured (at most ``exact_m``; 1: one
    gain per conv, as before 2026-11-30).
    """
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    images = sum(batch_size_of(b) for b in batches)
    per_image = max(1, math.ceil(max_positions / max(1, images)))
    full = {lc.name for lc in layers if modules[lc.name].in_channels * lc.kernel_area <= max_patch_dim}
    patch_stats = {name: GramStats() for name in full}
    probe: dict[str, list[tuple[str, nn.Module, Any, GramStats]]] = {}
    for lc in layers:
        conv = modules[lc.name]
        entry = []
        for kname in _kinds_of(lc):
            kind = get_kind(kname)
            block = kind.build(conv, LayerConfig(order=kname, depth_multiplier=1), name=lc.name)
            entry.append((kname, block, kind.layout(block), GramStats()))
        probe[lc.name] = entry
    by_conv = {id(modules[lc.name]): (i, lc.name) for i, lc in enumerate(layers)}
    state = {"b": 0}

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        index, name = by_conv[id(module)]
        n, _, h, w = output.shape
        g = torch.Generator().manual_seed(seed * 1_000_003 + index * 7919 + state["b"])
        pos = sample_positions((n, h, w), per_image * n, generator=g)
        p = pos.to(output.device)
        y = output[p[:, 0], :, p[:, 1], p[:, 2]]
        c = module
        patches = gather_patches(args[0], pos, c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode)
        patches = patches.reshape(patches.shape[0], -1).to(torch.float64)
        if name in full:
            patch_stats[name].add(patches, y)
            return
        for _, _, lay, stats in probe[name]:
            stats.add(lay.last_features_from_patches(patches, lay.current()[0]), y)

    gain_data = _gain_batches(batches, gain_images if gain_images is not None else _auto_gain_images(batches))
    handles = [modules[lc.name].register_forward_hook(hook) for lc in layers]
    try:
        with evaluating(model), torch.no_grad():
            for b, batch in enumerate(batches):
                state["b"] = b
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    with evaluating(model), torch.no_grad():  # the gain runs' reference outputs (their batches may be cut)
        refs = [[t.detach() for _, t in flatten_outputs(call_model(model, b))] for b in gain_data]

    errors: dict[str, dict[tuple[str, int], float]] = {}
    measured_blocks: dict[tuple[str, str, int], tuple[str, nn.Module]] = {}
    for lc in layers:
        conv = modules[lc.name]
        spec = _spectral_ratios(conv, lc)  # type: ignore[arg-type]
        if lc.name in full:
            errors[lc.name], blocks = _exact_errors(lc, conv, patch_stats[lc.name], spec, ridge, exact_m, alternate,
                                                    max_joint_dim)
        else:
            errors[lc.name], blocks = _scaled_errors(lc, conv, probe[lc.name], spec, ridge)
        # gains are measured with one kind's blocks (the best at m=1) and shared by the kinds: on the bench's
        # trained U-Net the gain depends on the conv and the multiplier, hardly on the kind (docs/budget.md)
        kind = min(_kinds_of(lc), key=lambda k: (errors[lc.name].get((k, 1), math.inf), k))
        ms = sorted(m for (k, m) in blocks if k == kind)
        for m in {ms[0], max(m for m in ms if m <= max(gain_m, ms[0]))} if ms else ():
            measured_blocks[(lc.name, kind, m)] = (lc.name, blocks[(kind, m)])
    work = copy.deepcopy(model)
    with evaluating(work), torch.no_grad():
        gains = _measure_gains(work, measured_blocks, gain_data, refs)
    out_layers = []
    n_gain = sum(batch_size_of(b) for b in gain_data)
    for lc in layers:
        measured = sorted((m, g) for (name, _, m), (g, _, _) in gains.items() if name == lc.name)
        kind = next((k for (name, k, _) in gains if name == lc.name), "?")
        layer_errs, cand_gains = [], []
        for c in lc.candidates:
            if c.kind is None:
                layer_errs.append(0.0)
                cand_gains.append(0.0)
                continue
            layer_errs.append(errors[lc.name][(c.kind, c.m)])
            cand_gains.append(_gain_at(measured, c.m))
        how = "refit as calibration does" if lc.name in full else "last stage refit"
        shown = ", ".join(f"m={m} {g:.3g}" for m, g in measured)
        out_layers.append(LayerSensitivity(
            lc.name, tuple(layer_errs), tuple(cand_gains),
            f"gain (output rel err² per layer rel err²; {kind} block alone, {how}, {n_gain} calibration images): "
            f"{shown}"))
    note = (f"sensitivity from data: {images} calibration images, {max_positions} positions per conv; "
            f"{len(full)} of {len(layers)} convs scored exactly up to m={exact_m} from their input-patch Gram "
            f"matrices (refit as calibration does, {alternate} alternating round(s)), the others from the m=1 "
            f"last-stage refit; larger multipliers follow the kernel's spectrum; per-conv output gains measured "
            f"at m=1 and m={gain_m} (m=1 only for the others; the block alone in the model, {n_gain} images), "
            f"geometric in log m between, the last measured one's beyond")
    return Sensitivity(tuple(out_layers), "data", note, time.perf_counter() - t0)


def _exact_errors(lc: LayerCandidates, conv: nn.Module, stats: GramStats, spec: dict[tuple[str, int], float],
                  ridge: float, exact_m: int, alternate: int, max_joint_dim: int
                  ) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], nn.Module]]:
    """Every candidate's layer error from the patch statistics (refit in closed form); the refit blocks
    (``m ≤ exact_m``) by ``(kind, m)``."""
    out: dict[tuple[str, int], float] = {}
    blocks: dict[tuple[str, int], nn.Module] = {}
    for kname in _kinds_of(lc):
        kind = get_kind(kname)
        ms = sorted(c.m for c in lc.candidates if c.kind == kname)
        exact: dict[int, float] = {}
        for m in ms:
            if m not in _exact_set(exact_m) and m != ms[0]:
                continue
            block = kind.build(conv, LayerConfig(order=kname, depth_multiplier=m), name=lc.name)
            fit = LayerFit(lc.name, 0, block, conv)  # type: ignore[arg-type]
            fit.joint, fit.stats = True, stats
            rounds = alternate if fit.lay.linear and (fit.lay.joint_dim or 0) <= max_joint_dim else 0
            rec = fit.refit(ridge, rounds)
            exact[m] = min(rec.rel_error_after, rec.rel_error_before) ** 2 if stats.count else 0.0
            blocks[(kname, m)] = block
        for m in ms:
            out[(kname, m)] = exact[m] if m in exact else _between(exact, m, {mm: spec.get((kname, mm), 0.0)
                                                                              for mm in ms})
    return out, blocks


def _exact_set(exact_m: int) -> set[int]:
    """Multipliers scored exactly: the powers of two up to ``exact_m``, and ``exact_m`` (1, 2, 4 for 4)."""
    out, m = {exact_m}, 1
    while m < exact_m:
        out.add(m)
        m *= 2
    return out


def _between(exact: dict[int, float], m: int, spec: dict[int, float]) -> float:
    """Layer error at an unscored ``m``: between two scored multipliers ``a < m < b``, geometric interpolation in
    the spectrum's coordinate (``log e`` linear in ``log w(m)²``, exact at both ends); above the largest, that
    one's error scaled by the spectrum, ``e(a) · w(m)² / w(a)²``."""
    lower = [a for a in exact if a < m]
    upper = [b for b in exact if b > m]
    if not lower:
        return exact[min(upper)]
    a = max(lower)
    ea, wa, wm = exact[a], spec.get(a, 0.0), spec.get(m, 0.0)
    if not upper:
        return ea * (wm / wa if wa > 0 else 0.0)
    b = min(upper)
    eb, wb = exact[b], spec.get(b, 0.0)
    if min(ea, eb, wa, wb, wm) <= 0 or wa == wb:
        return ea + (eb - ea) * (m - a) / (b - a)
    t = (math.log(wm) - math.log(wa)) / (math.log(wb) - math.log(wa))
    return math.exp(math.log(ea) + t * (math.log(eb) - math.log(ea)))


def _scaled_errors(lc: LayerCandidates, conv: nn.Module, probe: list[tuple[str, nn.Module, Any, GramStats]],
                   spec: dict[tuple[str, int], float], ridge: float
                   ) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], nn.Module]]:
    """The m=1 last-stage refit's error, other multipliers scaled by the spectrum; the m=1 blocks by ``(kind, 1)``."""
    has_bias = conv.bias is not None
    level: dict[str, float] = {}
    for kname, block, lay, st in probe:
        if not st.ready or st.yy <= 0:
            level[kname] = 0.0
            continue
        first, last, bias = lay.current()
        e0 = quadratic_error(st.gram, st.cross, st.yy, lay.pack_last(last, bias).to(st.gram))
        w = ridge_solve(st.gram, st.cross, ridge, bias=has_bias)
        e1 = quadratic_error(st.gram, st.cross, st.yy, w)
        if e1 < e0:
            new_last, new_bias = lay.unpack_last(w, has_bias)
            lay.write(first, new_last, new_bias)
            e0 = e1
        level[kname] = e0 / st.yy
    out = {}
    for c in lc.candidates:
        if c.kind is None:
            continue
        w1 = spec.get((c.kind, 1)) or 0.0
        out[(c.kind, c.m)] = level[c.kind] * (spec[(c.kind, c.m)] / w1 if w1 > 0 else 0.0)
    return out, {(k, 1): b for k, b, _, _ in probe}


def weight_sensitivity(model: nn.Module, layers: Sequence[LayerCandidates], example_inputs: Any) -> Sensitivity:
    """Predicted errors without data: the discarded spectral energy, weighted by a gain measured on the example input.

    Example:
        >>> from dsrewrite.planning.capture import capture
        >>> from dsrewrite.budget.candidates import layer_candidates
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
        >>> x = torch.randn(1, 3, 12, 12)
        >>> lc = layer_candidates(capture(net, x).by_name()["2"], net[2], ("dw_pw",), dense_macs=8 * 8 * 9 * 144)
        >>> s = weight_sensitivity(net, [lc], x)
        >>> s.method, s.layers[0].gain > 0
        ('weights', True)
    """
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    blocks, spec = {}, {}
    for lc in layers:
        conv = modules[lc.name]
        spec[lc.name] = _spectral_ratios(conv, lc)  # type: ignore[arg-type]
        kname = _kinds_of(lc)[0] if _kinds_of(lc) else None
        if kname is not None:
            blocks[lc.name] = (lc.name, get_kind(kname).build(conv, LayerConfig(order=kname, depth_multiplier=1),
                                                               name=lc.name))
    with evaluating(model), torch.no_grad():
        refs = [[t.detach() for _, t in flatten_outputs(call_model(model, example_inputs))]]
    work = copy.deepcopy(model)
    with evaluating(work), torch.no_grad():
        measured = _measure_gains(work, blocks, [example_inputs], refs)
    out_layers = []
    for lc in layers:
        s = spec[lc.name]
        first = _kinds_of(lc)[0] if _kinds_of(lc) else None
        w1 = s.get((first, 1), 0.0) if first else 0.0
        _, oe, _ = measured.get(lc.name, (0.0, 0.0, 0.0))
        g = oe / w1 if w1 > 0 else 0.0
        errs = tuple(0.0 if c.kind is None else s[(c.kind, c.m)] for c in lc.candidates)
        out_layers.append(LayerSensitivity(
            lc.name, errs, tuple(0.0 if c.kind is None else g for c in lc.candidates), f"gain {g:.3g}: {first} m=1 (SVD) alone gave output rel err² {oe:.3g} for weight "
                              f"rel err² {w1:.3g} on the example input"))
    note = ("sensitivity without data (weight-space proxy): the discarded spectral energy of each kernel's SVD, "
            "weighted by a per-conv gain measured on the example input")
    return Sensitivity(tuple(out_layers), "weights", note, time.perf_counter() - t0)
