# SPDX-License-Identifier: Apache-2.0
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
between batches, the cache is switched off (slower, same result). The cache holds at
most ``cache_bytes`` (default: a quarter of the model's size, at least 512 MiB); what does
not fit is computed again in each pass (slower, same result). Each layer's statistics,
samples and teacher targets are freed once it is refit.

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
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import did_you_mean
from ..kinds import kind_of
from .coverage import least_squares_ready, not_refit
from ..layers.dsconv import DepthwiseSeparableConv2d  # noqa: F401  (the doctests use it)
from ..runtime.memory import release_free_memory
from ..runtime.log import get_logger, say as log_say
from ..runtime.run import call_model, evaluating
from .activation import following_relus
from .batches import batch_size_of, input_spec, iter_inputs, to_device
from .layer_fit import LayerFit
from .lstsq import GramStats
from .replay import CallTracer, Key, ReplayCache, Stop, StructureChanged
from .teacher import OutputError, teacher_pass
from .results import CalibrationResult, CalibrationUsageError, LayerCalibration

_ACTIVATION_MODES = ("auto", "none")
#: Memory for the features kept per layer for the fit through the activation (float32; when
#: a layer's positions need more, an evenly strided subset is kept).
_ACT_SAMPLE_BYTES = 256 << 20

__all__ = ["calibrate", "check_options", "default_cache_bytes", "replaced_names"]

#: Least default bound of the replay cache (small models: their activations, not their weights, dominate).
#: 64 MiB made the demo U-Net's calibration on 16 images of 256² recompute its prefixes: 50.8 s CPU against
#: 44.8 s at 512 MiB (docs/robustness.md).
_MIN_CACHE_BYTES = 512 << 20


def default_cache_bytes(model: nn.Module) -> int:
    """The replay cache's default bound: a quarter of ``model``'s parameter and buffer bytes, at least 512 MiB.

    Example:
        >>> default_cache_bytes(nn.Linear(2, 2)) == 512 << 20
        True
    """
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return max(size // 4, _MIN_CACHE_BYTES)


def check_options(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Check the keys of extra :func:`calibrate` keyword arguments (values are checked by ``calibrate``).

    Example:
        >>> check_options({"activation": "none"})
        {'activation': 'none'}
        >>> check_options({"activaton": "none"})
        Traceback (most recent call last):
        ...
        dsrewrite.refit.results.CalibrationUsageError: calibration option 'activaton' is not one of calibrate()'s (did you mean 'activation'?). Valid options: activation, alternate, cache_bytes, callback, input_fn, input_key, max_joint_dim, max_positions, measure_output, progress, replay_cache, ridge, seed.
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
    """Qualified names of the replacement blocks of ``rewritten`` that are convs (any ``ConvNd``/``ConvTransposeNd``) in ``original``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
        >>> light = nn.Sequential(net[0], DepthwiseSeparableConv2d.from_conv(net[1]))
        >>> replaced_names(net, light)
        ['1']
    """
    convs = {n for n, m in original.named_modules() if isinstance(m, _ConvNd)}
    return [n for n, m in rewritten.named_modules() if kind_of(m) is not None and n in convs]


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _resolve(original: nn.Module, rewritten: nn.Module, names: Optional[Sequence[str]]) -> list[tuple[str, Any, Any]]:
    blocks = {n: m for n, m in rewritten.named_modules() if kind_of(m) is not None}
    convs = {n: m for n, m in original.named_modules() if isinstance(m, _ConvNd)}
    if names is None:
        names = [n for n in blocks if n in convs and least_squares_ready(blocks[n])]
    out = []
    for name in names:
        if name in blocks and not least_squares_ready(blocks[name]):
            raise CalibrationUsageError(
                f"calibrate(names=...): {name!r} has no least-squares layout (its kind refuses the "
                "block), so its initialisation stays. Hint: leave it out of names, or heal the model "
                "(distillation) instead."
            )
        if name not in blocks:
            raise CalibrationUsageError(
                f"calibrate(names=...): {name!r} is not a replacement block (a DepthwiseSeparableConv2d or "
                f"another registered kind's) in the rewritten model"
                f"{did_you_mean(name, blocks)}. Hint: pass the qualified names of the replaced layers "
                f"(available: {sorted(blocks)[:8]}{' ...' if len(blocks) > 8 else ''})."
            )
        if name not in convs:
            raise CalibrationUsageError(
                f"calibrate(names=...): {name!r} is not an nn.ConvNd/ConvTransposeNd in the original model"
                f"{did_you_mean(name, convs)}. Hint: the original must be the model before the rewrite."
            )
        b, c = blocks[name], convs[name]
        mine = (b.in_channels, b.out_channels, tuple(b.kernel_size), tuple(b.stride), b.padding,
                tuple(b.dilation), b.padding_mode, bool(getattr(b, "transposed", False)),
                tuple(getattr(b, "output_padding", ())) if getattr(b, "transposed", False) else ())
        theirs = (c.in_channels, c.out_channels, tuple(c.kernel_size), tuple(c.stride), c.padding,
                  tuple(c.dilation), c.padding_mode, bool(c.transposed),
                  tuple(c.output_padding) if c.transposed else ())
        if mine != theirs:
            raise CalibrationUsageError(
                f"layer {name!r}: the separable block (in, out, kernel, stride, padding, dilation, padding_mode, "
                f"transposed, output_padding) "
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
    cache_bytes: Optional[int] = None,
    activation: str = "auto",
    progress: bool = False,
    callback: Optional[Callable[[LayerCalibration], None]] = None,
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
        names: qualified names of the blocks to refit; default: every replacement block of
            ``rewritten`` (any registered kind's) that is a conv (``nn.ConvNd`` or
            ``nn.ConvTransposeNd``) in ``original``.
        max_positions: output positions sampled per layer over all batches (spread evenly).
        ridge: relative ridge ``λ = ridge · mean(diag(G))`` (bias unpenalised).
        alternate: rounds of (first stage, last stage) refits after the last-stage refit,
            for linear blocks whose joint size is at most ``max_joint_dim``; 0: last stage only.
        max_joint_dim: largest ``C_in·K`` (dw_pw: ``C_in·m·K``) refit jointly.
        measure_output: also measure the model's output error before and after (one more pass).
        replay_cache: replay cached module outputs instead of re-running every layer's prefix
            (same result; turn off for models whose submodules have side effects in ``forward``).
        cache_bytes: most bytes of module outputs the replay cache holds at any moment; outputs
            that do not fit are computed again in each pass (slower, same result). Default:
            :func:`default_cache_bytes` (a quarter of ``original``'s parameters and buffers, at
            least 512 MiB), so that calibration's working set stays within one copy of a large model.
        activation: ``"auto"``: where the original conv feeds only a ReLU, or an eval-mode
            ``BatchNorm2d`` then a ReLU (read from the ``torch.fx`` graph), refit the block once
            more so that the ACTIVATION's output matches (auxiliary-variable method,
            :mod:`dsrewrite.relu_fit`; joint pw_dw blocks: both stages, others: the last stage
            and bias; the positions' features are kept for it, at most 256 MB per layer);
            ``"none"``: fit every conv output linearly only.
        progress: print the per-layer lines to stderr when no ``logging`` handler shows them (they
            always go to the ``dsrewrite.calibrate`` logger at INFO).
        callback: called with each layer's :class:`LayerCalibration` as soon as it is refit.
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
    if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                    or cache_bytes < 0):
        raise CalibrationUsageError(f"calibrate(cache_bytes={cache_bytes!r}): expected a number of bytes >= 0, "
                                    "or None for the default (a quarter of the model's size, at least 512 MiB).")
    if max_positions < 1 or not 0 <= ridge < math.inf or alternate < 0 or max_joint_dim < 0:
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
    layers = [LayerFit(n, i, b, c) for i, (n, b, c) in enumerate(resolved)]
    images = sum(batch_size_of(b) for b in data)
    per_image = max(1, math.ceil(max_positions / images))
    notes: list[str] = []
    if names is None and (kept := not_refit(rewritten)):
        notes.append(f"{len(kept)} block(s) have no least-squares layout: calibration does not refit them, "
                     f"they keep their initialisation ({', '.join(kept[:4])}{', …' if len(kept) > 4 else ''})")

    def say(msg: str) -> None:
        log_say(get_logger("calibrate"), f"[calibrate] {msg}", echo=progress)

    with evaluating(original, rewritten), torch.no_grad():
        if activation == "auto" and layers:
            found, why = following_relus(original, [l.name for l in layers], data[0])
            notes += [why] if why else []
            for l in layers:
                l.act = found.get(l.name)
        tracer = CallTracer(rewritten)
        try:  # the probe first: its forward then runs before the teacher's targets are held (peak memory)
            probe = _probe(rewritten, data[0], layers, tracer)
            ref_outputs = teacher_pass(original, data, layers, per_image, seed, measure_output)
            tracer.calls = probe.pop("traced")  # the hooks were inert during the teacher pass (shared submodules)
            result = _calibrate_layers(rewritten, data, layers, tracer, ref_outputs, ridge, alternate,
                                       max_joint_dim, measure_output, replay_cache, notes, say, callback,
                                       default_cache_bytes(original) if cache_bytes is None else cache_bytes, probe)
        finally:
            tracer.close()
    out_before, out_after, done, cache_on = result
    seconds = time.perf_counter() - t0
    say(f"done in {seconds:.1f} s")
    return CalibrationResult(tuple(done), out_before, out_after, images, len(data), seconds, cache_on, tuple(notes))


def _probe(rewritten: nn.Module, batch: Any, layers: list[LayerFit], tracer: CallTracer) -> dict[str, Any]:
    """Run the first batch recording the call tree: block ``calls``, the tracer's calls (``traced``), their order
    (``sequence``) and the model's output (``out``).

    The tracer is left inert (no calls to check) until its calls are given back.
    """
    by_block = {id(l.block): l for l in layers}
    calls: Counter = Counter()

    def count_hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[by_block[id(module)].name] += 1

    handles = [l.block.register_forward_hook(count_hook) for l in layers]
    try:
        tracer.begin(probe=True)
        out = call_model(rewritten, batch)
    finally:
        for h in handles:
            h.remove()
    traced, tracer.calls = tracer.calls, {}
    tracer.begin()
    return {"calls": calls, "traced": traced, "sequence": list(tracer.sequence), "out": out}


def _calibrate_layers(
    rewritten: nn.Module, data: list[Any], layers: list[LayerFit], tracer: CallTracer, ref_outputs: list[Any],
    ridge: float, alternate: int, max_joint_dim: int, measure_output: bool, replay_cache: bool,
    notes: list[str], say: Callable[[str], None], on_layer: Optional[Callable[[LayerCalibration], None]],
    cache_bytes: Optional[int], probe: dict[str, Any],
) -> tuple[Optional[float], Optional[float], list[LayerCalibration], bool]:
    # 1. the probe's call tree (its output also counts for the "before" error)
    calls, probe_seq = probe["calls"], probe["sequence"]
    before = OutputError()
    if measure_output:
        before.add(probe["out"], ref_outputs[0])
    del probe["out"]
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
    cache = ReplayCache(len(data), cache_bytes)
    out_before = None
    if measure_output:
        capture = tracer.before((ordered[0].name, 0)) if ordered and cache_on else set()
        tracer.prepare_replay(capture)
        for b in range(1, len(data)):
            tracer.begin(capture=capture if cache_on else None, room=cache.room(b))
            try:
                out = call_model(rewritten, data[b])
            except StructureChanged:
                cache_on = False
                tracer.calls = {}
                tracer.begin()
                out = call_model(rewritten, data[b])
            before.add(out, ref_outputs[b])
            cache.declined += tracer.declined
            cache.store(b, tracer.captured if cache_on else {})
            if cache_on and tracer.seen != probe_seq:
                cache_on = False
        out_before = before.value()
    if replay_cache and not cache_on:
        notes.append("module call structure differs between batches: ran without the replay cache "
                     "(slower, same result)")
    if not cache_on:
        tracer.calls = {}
        cache.clear()

    # 3. layer by layer, in execution order
    done: list[LayerCalibration] = []
    for i, layer in enumerate(ordered):
        capture = tracer.before((layer.name, 0)) if cache_on else set()
        if cache_on:
            tracer.prepare_replay(capture)
        t_layer = time.perf_counter()
        try:
            _layer_pass(rewritten, data, layer, tracer, cache, capture, cache_on, probe_seq)
        except StructureChanged:
            cache_on = False
            tracer.calls = {}
            notes.append("module call structure changed during calibration: switched the replay cache off")
            layer.stats = GramStats()
            layer.samples, layer.sample_targets = [], []
            cache.clear()
            _layer_pass(rewritten, data, layer, tracer, cache, set(), False, [])
        release_free_memory()  # the pass's freed activations and patches, before the refit's solves (peak memory)
        if not layer.stats.ready:
            rec = LayerCalibration(layer.name, layer.kind, layer.m, "skipped", math.nan, math.nan, 0,
                                   (), "no calibration positions reached this layer")
        else:
            rec = layer.refit_through_relu(layer.refit(ridge, alternate), ridge)
        layer.stats = GramStats()  # free the statistics, the samples and the teacher's targets: the layer is done
        layer.samples, layer.sample_targets = [], []
        layer.positions, layer.targets, layer.start = [], [], None
        done.append(rec)
        if on_layer is not None:
            on_layer(rec)
        say(f"{i + 1}/{len(ordered)} {layer.name}: rel err {rec.rel_error_before:.4f} -> {rec.rel_error_after:.4f} "
            f"[{rec.method}{': ' + ','.join(rec.steps) if rec.steps else ''}] "
            f"{'' if rec.act_error_after is None else f' act err {rec.act_error_before:.4f} -> {rec.act_error_after:.4f}'}"
            f" ({time.perf_counter() - t_layer:.1f} s){' ' + rec.note if rec.note else ''}")
    for l in layers:
        if l.skip:
            done.append(LayerCalibration(l.name, l.kind, l.m, "skipped", math.nan, math.nan, 0, (),
                                         f"skipped: {l.skip}"))

    # 4. the "after" pass: whole forwards, without the cache (its bytes would sit on top of a forward's peak)
    declined = cache.declined
    cache.clear()
    tracer.calls = {}
    out_after = None
    if measure_output:
        release_free_memory()  # the refits' freed temporaries, before a whole forward (vgg16: +0.74 of the model)
        after = OutputError()
        for b, batch in enumerate(data):
            tracer.begin()
            after.add(call_model(rewritten, batch), ref_outputs[b])
        out_after = after.value()
    if declined:
        notes.append(f"replay cache bounded to {cache.budget / 2**20:.0f} MiB (cache_bytes): {declined} module "
                     "output(s) not kept were computed again (slower, same result)")
    return out_before, out_after, done, cache_on


def _layer_pass(rewritten: nn.Module, data: list[Any], layer: LayerFit, tracer: CallTracer, cache: ReplayCache,
                capture: set[Key], cache_on: bool, probe_seq: list[Key]) -> None:
    """Run every batch up to ``layer`` (replaying ``cache``), accumulate its statistics; ``cache`` then holds the
    outputs of ``capture`` (those that fit in its budget).

    Without anything to replay, the calls seen must follow the probe run (else ``StructureChanged``).
    """
    state: dict[str, Any] = {}
    target = layer.block if layer.joint else layer.last

    def grab(module: nn.Module, args: Any) -> None:  # the block's input (joint refit) or its last stage's
        state["x"], state["z"] = (args[0], None) if layer.joint else (None, args[0])
        raise Stop

    handle = target.register_forward_pre_hook(grab)
    try:
        for b, batch in enumerate(data):
            pos, y = layer.positions[b], layer.targets[b]
            replayed = bool(cache.maps[b]) and cache_on
            tracer.begin(replay=cache.maps[b] if cache_on else None, capture=capture if cache_on else None,
                         room=cache.room(b))
            state.clear()
            try:
                call_model(rewritten, batch)
            except Stop:
                pass
            if cache_on and not replayed and tracer.seen != probe_seq[: len(tracer.seen)]:
                raise StructureChanged(layer.name)
            cache.declined += tracer.declined
            cache.store(b, tracer.captured)
            if "x" not in state or pos is None or y is None:
                continue
            feats = layer.features(state["x"], state["z"], pos)
            layer.stats.add(feats, y)
            if layer.act is not None:
                layer.keep_samples(feats, y, len(data), _ACT_SAMPLE_BYTES)
    finally:
        handle.remove()
