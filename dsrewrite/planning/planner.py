# SPDX-License-Identifier: Apache-2.0
"""Planning: capture the model, match the recipe, resolve every selected conv's configuration.

``plan()`` never changes the model. Each conv module of the model becomes one
:class:`~dsrewrite.plan_types.PlanEntry`: ``replace`` with a fully resolved
:class:`~dsrewrite.plan_types.LayerConfig`, or ``skip`` with a reason.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.planner import plan
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    >>> p = plan(net, "all_3x3", torch.randn(1, 3, 32, 32))
    >>> [(e.name, e.action) for e in p.entries]
    [('0', 'skip'), ('1', 'replace')]
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .capture import capture
from .safety import Safety, check_safety, static_safety
from ..runtime.conv_weight import plain_view
from ..facts import Capture, ConvFact
from ..errors import UnsupportedConvError
from ..kinds import auto_kinds, get_kind
from ..kinds.separable_nd import dense_kernel
from ..measure.macs import module_macs
from ..measure.timing import ratio_key, time_dense_vs_separable, time_orders
from .plan_checks import check_finite_weights, check_rank
from .types import LayerConfig, Plan, PlanEntry
from ..errors import RecipeError
from ..recipe import Recipe, load_recipe, select
from ..recipe.schema import AUTO, LatencySpec
from ..runtime.preflight import preflight  # DataParallel/DDP: plan the inner model (names without 'module.')

__all__ = ["plan", "plan_from_capture", "resolve_config", "separable_macs", "NothingSelectedWarning"]

RecipeLike = Union[str, "os.PathLike[str]", Mapping[str, Any], Recipe]  # noqa: F821


class NothingSelectedWarning(UserWarning):
    """A recipe selected no conv of the model (an error in the CLI, a warning in the API)."""


def separable_macs(fact: ConvFact, order: str, m: int) -> int:
    """MACs of the block of kind ``order`` that would replace ``fact`` (bias excluded); asks the kind.

    For the built-ins: the spatial stage runs at the output resolution; the pointwise
    stage at the output resolution for ``dw_pw`` and at the *input* resolution for ``pw_dw``.

    Example:
        >>> f = ConvFact(name="c", cls="Conv2d", conv_type="Conv2d", plain=True, in_channels=64,
        ...     out_channels=128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
        ...     groups=1, bias=False, padding_mode="zeros", dtype="float32", device="cpu",
        ...     region="c", calls=1, input_shape=(1, 64, 56, 56), output_shape=(1, 128, 56, 56))
        >>> separable_macs(f, "dw_pw", 1)
        27496448
    """
    return get_kind(order).macs(fact, m)


def resolve_config(
    fact: ConvFact,
    conv: nn.Conv2d,
    *,
    order: str,
    depth_multiplier: Optional[int],
    energy: Optional[float],
    init: str,
    mid_norm: Optional[str] = None,
    mid_act: Optional[str] = None,
    auto_order: str = "macs",
    timing: Optional[LatencySpec] = None,
) -> LayerConfig:
    """Turn a recipe's replace spec into a concrete :class:`LayerConfig` for one conv.

    ``order`` is a registered kind's name or ``"auto"``, which picks per conv among the
    kinds that take part in ``auto`` (:func:`dsrewrite.kinds.auto_kinds`), as ``auto_order``
    says: ``"macs"`` (fewer MACs at this conv's shapes; ties go to the earlier registered
    kind, ``dw_pw`` among the built-ins), ``"error"`` (lower weight reconstruction error;
    the note gives the MAC counts) or ``"measured"`` (faster when the blocks are timed at
    the real input shape). ``note`` says why. ``energy`` picks the smallest rank that keeps
    that share of the kernel's spectrum (needs real weights).

    Example:
        >>> conv = nn.Conv2d(256, 64, 3, padding=1)
        >>> f = ConvFact(name="c", cls="Conv2d", conv_type="Conv2d", plain=True, in_channels=256,
        ...     out_channels=64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
        ...     groups=1, bias=True, padding_mode="zeros", dtype="float32", device="cpu",
        ...     region="c", calls=1, input_shape=(1, 256, 8, 8), output_shape=(1, 64, 8, 8))
        >>> resolve_config(f, conv, order="auto", depth_multiplier=1, energy=None, init="svd").order
        'pw_dw'
    """
    return _resolve(fact, conv, order=order, depth_multiplier=depth_multiplier, energy=energy, init=init,
                    mid_norm=mid_norm, mid_act=mid_act, auto_order=auto_order, timing=timing)[0]


def _choose(fact: ConvFact, conv: nn.Conv2d, ranks: dict[str, int], auto_order: str,
            timing: Optional[LatencySpec], measured: dict[str, float]) -> tuple[str, str]:
    """``order: auto``: the chosen kind's name and the note saying why (``ranks`` in registry order)."""
    names = list(ranks)
    first = names[0]
    if len(names) == 1:
        return first, f"order auto: {first} is the only kind that takes part"
    if fact.input_shape is None or fact.output_shape is None:
        return first, f"order auto: no shapes recorded, kept {first}"
    macs = {n: get_kind(n).macs(fact, ranks[n]) for n in names}
    mac_text = "MACs " + " vs ".join(f"{macs[n]:,} {n}" for n in names)
    if auto_order == "measured":
        spec = timing or LatencySpec()
        t = time_orders(conv, ranks, fact.input_shape, rounds=spec.rounds, warmup=spec.warmup,
                        channels_last=spec.channels_last)
        measured.update(t)
        ratios = {first: 1.0, **{n: t[ratio_key(n, names)] for n in names[1:]}}
        chosen = min(names, key=lambda n: ratios[n])  # the first of equals: ties keep the earlier kind
        took = ", ".join(f"{n} took {ratios[n]:.2f}× the time of {first}" for n in names[1:])
        return chosen, (f"order auto (measured): {took} (median of {spec.rounds} interleaved rounds), "
                        f"{chosen} chosen; {mac_text}")
    if auto_order == "error" and conv.weight.device.type != "meta":
        errs = {n: get_kind(n).weight_error(dense_kernel(conv), ranks[n]) for n in names}
        chosen = min(names, key=lambda n: errs[n])
        by_err = " vs ".join(f"{errs[n]:.3f} {n}" for n in names)
        return chosen, f"order auto (by weight error): {by_err}, {chosen} chosen; {mac_text}"
    chosen = min(names, key=lambda n: macs[n])
    others = [n for n in names if n != chosen]
    if all(macs[n] == macs[chosen] for n in others):
        return chosen, f"order auto: equal MACs, kept {chosen}"
    more = ", ".join(f"{macs[n]:,} for {n}" for n in others)
    return chosen, f"order auto: {chosen} has fewer MACs ({macs[chosen]:,} vs {more})"


def _resolve(
    fact: ConvFact,
    conv: nn.Conv2d,
    *,
    order: str,
    depth_multiplier: Optional[int],
    energy: Optional[float],
    init: str,
    mid_norm: Optional[str],
    mid_act: Optional[str],
    auto_order: str,
    timing: Optional[LatencySpec],
) -> tuple[LayerConfig, dict[str, float]]:
    notes: list[str] = []
    measured: dict[str, float] = {}
    candidates = auto_kinds() if order == AUTO else (get_kind(order),)
    if not candidates:
        raise ValueError("order auto: no registered replacement kind takes part in auto")
    accepted = tuple(k for k in candidates if _accepts(k, conv, fact.name))  # what a kind takes is its own to say
    if not accepted:
        candidates[0].check(conv, name=fact.name)  # raises UnsupportedConvError: why, and a hint
    candidates = accepted
    ranks: dict[str, int] = {}
    for kind in candidates:
        if energy is not None:
            if conv.weight.device.type == "meta":
                raise ValueError(f"conv {fact.name!r} is on the meta device: an energy threshold needs weights")
            ranks[kind.name] = kind.rank_for_energy(dense_kernel(conv), energy)
        else:
            ranks[kind.name] = int(depth_multiplier or 1)
    chosen = candidates[0].name
    if order == AUTO:
        chosen, why = _choose(fact, conv, ranks, auto_order, timing, measured)
        notes.append(why)
    m = ranks[chosen]
    if energy is not None:
        notes.append(f"energy {energy:g} -> m={m}")
    cfg = LayerConfig(
        order=chosen,
        depth_multiplier=m,
        init=init,  # type: ignore[arg-type]
        mid_norm=mid_norm,
        mid_act=mid_act,
        note="; ".join(notes),
    )
    return cfg, measured


def _heavier(fact: ConvFact, conv: nn.Module, cfg: LayerConfig) -> list[str]:
    """A remark when the block costs at least as many MACs as the dense conv it replaces (grouped convs at
    small m, m near full rank): the plan does what was asked, and says that it is not lighter."""
    if fact.input_shape is None or fact.output_shape is None:
        return []
    dense = module_macs(conv, tuple(fact.input_shape), tuple(fact.output_shape))
    sep = separable_macs(fact, cfg.order, cfg.depth_multiplier)
    if not dense or sep < dense:
        return []
    advice = "keep it dense" if cfg.depth_multiplier == 1 else "lower depth_multiplier or keep it dense"
    return [f"note: not lighter than the dense conv ({sep:,} MACs vs {dense:,} dense at m={cfg.depth_multiplier}; "
            f"{advice})"]


def _accepts(kind: Any, conv: nn.Module, name: str) -> bool:
    try:
        kind.check(conv, name=name)
    except UnsupportedConvError:
        return False
    return True


def plan_from_capture(
    model: nn.Module,
    recipe: Recipe,
    cap: Capture,
    *,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    safety: Optional[Safety] = None,
) -> Plan:
    """Build the plan from an existing capture (see :func:`plan`).

    ``safety`` (:func:`~dsrewrite.planning.safety.check_safety`, run before the capture)
    keeps dense what cannot be swapped safely; without it only the checks that need no
    forward are made (lazy convs, hooks) and a note says so.

    Keyword overrides replace the recipe's default values (the CLI's
    ``--depth-multiplier``, ``--order`` and ``--init``) through
    :meth:`Recipe.with_overrides`; per-name overrides in the recipe that set the same
    key keep theirs. ``depth_multiplier`` also replaces an energy threshold.
    """
    recipe = recipe.with_overrides(depth_multiplier=depth_multiplier, order=order, init=init)
    modules = dict(model.named_modules())
    safety = safety if safety is not None else static_safety(model)
    entries: list[PlanEntry] = []
    for sel in select(recipe, cap.facts):
        fact = sel.fact
        if not sel.selected or sel.replace is None:
            entries.append(PlanEntry(fact.name, "skip", sel.reason, fact=fact.to_dict()))
            continue
        spec = sel.replace
        why = safety.refusal(fact.name)
        if why is not None:
            entries.append(PlanEntry(fact.name, "skip", f"kept dense: {why}", fact=fact.to_dict()))
            continue
        conv = plain_view(modules[fact.name])  # type: ignore[arg-type]  # parametrized: read without side effects
        check_finite_weights(model, [fact.name])  # NaN/inf: refused, naming the conv
        try:
            cfg, measured = _resolve(
                fact,
                conv,  # type: ignore[arg-type]
                order=spec.order,
                depth_multiplier=spec.depth_multiplier,
                energy=spec.energy,
                init=spec.init,
                mid_norm=spec.mid_norm,
                mid_act=spec.mid_act,
                auto_order=spec.auto_order,
                timing=recipe.latency,
            )
        except UnsupportedConvError as exc:
            entries.append(PlanEntry(fact.name, "skip", f"refused by order {spec.order}: {exc}", fact=fact.to_dict()))
            continue
        except ValueError as exc:
            entries.append(PlanEntry(fact.name, "skip", f"cannot resolve its configuration: {exc}", fact=fact.to_dict()))
            continue
        check_rank(fact.name, conv, cfg.depth_multiplier, RecipeError, source=f"recipe {recipe.name!r}")
        lat = recipe.latency
        if lat is not None and fact.input_shape is not None and conv.weight.device.type != "meta":  # type: ignore[union-attr]
            t = time_dense_vs_separable(conv, cfg, fact.input_shape, rounds=lat.rounds,  # type: ignore[arg-type]
                                        warmup=lat.warmup, channels_last=lat.channels_last)
            measured.update(t)
            speedup = 1.0 / t["ratio"] if t["ratio"] > 0 else float("inf")
            timed = (f"measured {cfg.order} m={cfg.depth_multiplier} at {tuple(fact.input_shape)}: "
                     f"{t['separable_ms']:.3f} ms vs {t['dense_ms']:.3f} ms dense ({speedup:.2f}× speedup")
            if speedup < lat.min_speedup:
                entries.append(PlanEntry(
                    fact.name, "skip", f"kept dense: {timed}, below the required {lat.min_speedup:g}×)",
                    fact=fact.to_dict(), measured=measured,
                ))
                continue
            reason = f"{sel.reason}; {timed} ≥ {lat.min_speedup:g}×)"
        else:
            reason = sel.reason
        reason = "; ".join([reason, *safety.remarks(fact.name), *_heavier(fact, conv, cfg)])
        entries.append(PlanEntry(fact.name, "replace", reason, config=cfg, fact=fact.to_dict(),
                                 measured=measured or None))
    notes = list(cap.notes)
    if cap.verification:
        notes.append(f"capture {cap.verification}")
    for fc in cap.functional_convs:
        notes.append(f"functional convolution {fc} belongs to no conv module: not replaceable, counted only by FlopCounterMode")
    if not safety.probed and any(e.replaced for e in entries):
        notes.append(f"{safety.note}: a replaced conv whose weight other code reads would fail on the first call.")
    result = Plan(
        entries=tuple(entries),
        recipe=recipe.name,
        capture=cap.method,
        input_shape=cap.input_shape,
        notes=tuple(notes),
    )
    if not result.replaced:
        warnings.warn(
            f"recipe {recipe.name!r} selects no conv of {type(model).__name__} "
            f"({len(result.entries)} candidates, all skipped). Hint: run `dsrewrite plan` to see each reason.",
            NothingSelectedWarning,
            stacklevel=3,
        )
    return result


def plan(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    example_inputs: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
) -> Plan:
    """Decide, for every conv module of ``model``, whether to replace it and how.

    ``recipe`` is a built-in name (``"decoder_only"``), a path to a YAML file, a
    mapping, or a loaded :class:`~dsrewrite.recipe.Recipe`. ``example_inputs``
    defaults to a seeded random tensor of ``input_shape``. The model is not changed.
    A ``DataParallel``/``DistributedDataParallel`` wrapper is looked through (names
    carry no ``module.`` prefix); quantized convs are refused
    (:class:`~dsrewrite.errors.UnsupportedModelError`).
    Warns :class:`NothingSelectedWarning` when nothing is selected.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
        >>> plan(net, "all_3x3", torch.randn(1, 3, 16, 16)).replaced[0].name
        '2'
    """
    rec = load_recipe(recipe)
    inner = preflight(model, needs_weights=False).model
    return plan_checked(inner, rec, example_inputs, input_shape=input_shape, depth_multiplier=depth_multiplier,
                        order=order, init=init)


def plan_checked(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    example_inputs: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
) -> Plan:
    """:func:`plan` for a model :func:`~dsrewrite.runtime.preflight.preflight` has already unwrapped and checked."""
    rec = load_recipe(recipe)
    safety = check_safety(model, example_inputs, input_shape=tuple(input_shape))  # before any forward: lazy convs
    cap = capture(model, example_inputs, input_shape=tuple(input_shape))
    return plan_from_capture(model, rec, cap, depth_multiplier=depth_multiplier, order=order, init=init,
                             safety=safety)
