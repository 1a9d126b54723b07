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
from .facts import Capture, ConvFact
from .factorize import rank_for_energy, relative_weight_error
from .measure import time_dense_vs_separable, time_orders
from .plan_types import LayerConfig, Plan, PlanEntry
from .recipe import Recipe, load_recipe, select
from .recipe.schema import LatencySpec

__all__ = ["plan", "plan_from_capture", "resolve_config", "separable_macs", "NothingSelectedWarning"]

RecipeLike = Union[str, "os.PathLike[str]", Mapping[str, Any], Recipe]  # noqa: F821


class NothingSelectedWarning(UserWarning):
    """A recipe selected no conv of the model (an error in the CLI, a warning in the API)."""


def separable_macs(fact: ConvFact, order: str, m: int) -> int:
    """MACs of the separable block that would replace ``fact`` (bias excluded).

    The spatial stage runs at the output resolution; the pointwise stage at the
    output resolution for ``dw_pw`` and at the *input* resolution for ``pw_dw``.

    Example:
        >>> f = ConvFact(name="c", cls="Conv2d", conv_type="Conv2d", plain=True, in_channels=64,
        ...     out_channels=128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
        ...     groups=1, bias=False, padding_mode="zeros", dtype="float32", device="cpu",
        ...     region="c", calls=1, input_shape=(1, 64, 56, 56), output_shape=(1, 128, 56, 56))
        >>> separable_macs(f, "dw_pw", 1)
        27496448
    """
    if fact.input_shape is None or fact.output_shape is None:
        raise ValueError(f"conv {fact.name!r} has no recorded shapes")
    n, _, hi, wi = fact.input_shape
    _, _, ho, wo = fact.output_shape
    k = 1
    for s in fact.kernel_size:
        k *= int(s)
    cin, cout = fact.in_channels, fact.out_channels
    out_px, in_px = n * ho * wo, n * hi * wi
    if order == "dw_pw":
        return k * m * cin * out_px + m * cin * cout * out_px
    return m * cout * cin * in_px + k * m * cout * out_px


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

    ``order="auto"`` picks per conv, as ``auto_order`` says: ``"macs"`` (fewer MACs at
    this conv's shapes; ties go to ``dw_pw``), ``"error"`` (lower weight reconstruction
    error; the note gives both MAC counts) or ``"measured"`` (faster when both blocks
    are timed at the real input shape). ``note`` says why. ``energy`` picks the
    smallest rank that keeps that share of the kernel's spectrum (needs real weights).

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
    orders = ("dw_pw", "pw_dw") if order == "auto" else (order,)
    ranks: dict[str, int] = {}
    for o in orders:
        if energy is not None:
            if conv.weight.device.type == "meta":
                raise ValueError(f"conv {fact.name!r} is on the meta device: an energy threshold needs weights")
            ranks[o] = rank_for_energy(conv.weight, energy, o)
        else:
            ranks[o] = int(depth_multiplier or 1)
    chosen = orders[0]
    if order == "auto":
        if fact.input_shape is None or fact.output_shape is None:
            notes.append("order auto: no shapes recorded, kept dw_pw")
        else:
            macs = {o: separable_macs(fact, o, ranks[o]) for o in orders}
            by_macs = "pw_dw" if macs["pw_dw"] < macs["dw_pw"] else "dw_pw"
            mac_text = f"MACs {macs['dw_pw']:,} dw_pw vs {macs['pw_dw']:,} pw_dw"
            if auto_order == "measured":
                spec = timing or LatencySpec()
                t = time_orders(conv, ranks, fact.input_shape, rounds=spec.rounds, warmup=spec.warmup,
                                channels_last=spec.channels_last)
                measured.update(t)
                chosen = "pw_dw" if t["order_ratio"] < 1.0 else "dw_pw"
                notes.append(
                    f"order auto (measured): pw_dw took {t['order_ratio']:.2f}× the time of dw_pw "
                    f"(median of {spec.rounds} interleaved rounds), {chosen} chosen; {mac_text}"
                )
            elif auto_order == "error" and conv.weight.device.type != "meta":
                errs = {o: relative_weight_error(conv.weight, ranks[o], o) for o in orders}
                chosen = "pw_dw" if errs["pw_dw"] < errs["dw_pw"] else "dw_pw"
                notes.append(
                    f"order auto (by weight error): {errs['dw_pw']:.3f} dw_pw vs {errs['pw_dw']:.3f} pw_dw, "
                    f"{chosen} chosen; {mac_text}"
                )
            else:
                chosen = by_macs
                other = "dw_pw" if chosen == "pw_dw" else "pw_dw"
                notes.append(
                    f"order auto: {chosen} has fewer MACs ({macs[chosen]:,} vs {macs[other]:,} for {other})"
                    if macs[chosen] != macs[other]
                    else "order auto: equal MACs, kept dw_pw"
                )
    m = ranks[chosen]
    if energy is not None:
        notes.append(f"energy {energy:g} -> m={m}")
    cfg = LayerConfig(
        order=chosen,  # type: ignore[arg-type]
        depth_multiplier=m,
        init=init,  # type: ignore[arg-type]
        mid_norm=mid_norm,
        mid_act=mid_act,
        note="; ".join(notes),
    )
    return cfg, measured


def plan_from_capture(
    model: nn.Module,
    recipe: Recipe,
    cap: Capture,
    *,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
) -> Plan:
    """Build the plan from an existing capture (see :func:`plan`).

    Keyword overrides replace the recipe's default values (the CLI's
    ``--depth-multiplier``, ``--order`` and ``--init``) through
    :meth:`Recipe.with_overrides`; per-name overrides in the recipe that set the same
    key keep theirs. ``depth_multiplier`` also replaces an energy threshold.
    """
    recipe = recipe.with_overrides(depth_multiplier=depth_multiplier, order=order, init=init)
    modules = dict(model.named_modules())
    entries: list[PlanEntry] = []
    for sel in select(recipe, cap.facts):
        fact = sel.fact
        if not sel.selected or sel.replace is None:
            entries.append(PlanEntry(fact.name, "skip", sel.reason, fact=fact.to_dict()))
            continue
        spec = sel.replace
        conv = modules[fact.name]
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
        except ValueError as exc:
            entries.append(PlanEntry(fact.name, "skip", f"cannot resolve its configuration: {exc}", fact=fact.to_dict()))
            continue
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
        entries.append(PlanEntry(fact.name, "replace", reason, config=cfg, fact=fact.to_dict(),
                                 measured=measured or None))
    notes = list(cap.notes)
    for fc in cap.functional_convs:
        notes.append(f"functional convolution {fc} belongs to no conv module: not replaceable, counted only by FlopCounterMode")
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
    from .api import unwrap_for_rewrite  # DataParallel/DDP: plan the inner model (names without 'module.')
    from .apply import check_rewritable

    model, _ = unwrap_for_rewrite(model)
    check_rewritable(model, needs_weights=False)
    cap = capture(model, example_inputs, input_shape=tuple(input_shape))
    return plan_from_capture(model, rec, cap, depth_multiplier=depth_multiplier, order=order, init=init)
