# SPDX-License-Identifier: Apache-2.0
"""The plan as a value: every candidate conv as Replace(config) or Skip(reason).

A :class:`Plan` is printable, serialisable to JSON and back, and can be applied
to a fresh instance of the same architecture by :func:`dsrewrite.apply.apply_plan`.

Example:
    >>> cfg = LayerConfig(order="dw_pw", depth_multiplier=1)
    >>> e = PlanEntry(name="decoder.0", action="replace", reason="3×3 in region 'decoder'", config=cfg)
    >>> p = Plan(entries=(e,), recipe="decoder_only", capture="fx", input_shape=(1, 3, 64, 64))
    >>> Plan.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

from ..errors import PlanError

__all__ = ["LayerConfig", "PlanEntry", "Plan", "PLAN_FORMAT_VERSION"]

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerConfig:
    """What to put in place of one conv: fully resolved (no 'auto', no energy left open).

    ``note`` says how a value was chosen (e.g. ``"energy 0.90 -> m=2"``,
    ``"order auto: pw_dw has fewer MACs (C_in 256 > C_out 128)"``). ``order`` is the
    name of a registered replacement kind (:mod:`dsrewrite.kinds`).
    """

    order: str = "dw_pw"
    depth_multiplier: int = 1
    init: Literal["svd", "random"] = "svd"
    mid_norm: Optional[str] = None
    mid_act: Optional[str] = None
    note: str = ""


@dataclass(frozen=True)
class PlanEntry:
    """One candidate conv: ``action`` is ``"replace"`` (with ``config``) or ``"skip"`` (with ``reason``).

    ``reason`` is always filled: why it was selected, or why it was skipped.
    ``fact`` is the :class:`~dsrewrite.facts.ConvFact` as a dict (kept as plain
    data so that a plan round-trips through JSON). ``measured`` holds latency
    numbers when a recipe asked to time candidates.
    """

    name: str
    action: Literal["replace", "skip"]
    reason: str
    config: Optional[LayerConfig] = None
    fact: Optional[dict[str, Any]] = None
    measured: Optional[dict[str, float]] = None

    @property
    def replaced(self) -> bool:
        return self.action == "replace"


@dataclass(frozen=True)
class Plan:
    """The decisions for one model; apply with :func:`dsrewrite.apply.apply_plan`.

    ``arch`` and ``arch_args`` record the arch spec the model was built from
    (e.g. ``"smp:Unet"``, ``{"classes": 3}``) so that
    :func:`dsrewrite.io.load_rewrite` can rebuild it; None and ``{}`` when the
    model came from a full-module file (and in plans written before they existed).
    """

    entries: tuple[PlanEntry, ...]
    recipe: str
    capture: str
    input_shape: Optional[tuple[int, ...]] = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    arch: Optional[str] = None
    arch_args: dict[str, Any] = field(default_factory=dict)

    @property
    def replaced(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.replaced)

    @property
    def skipped(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if not e.replaced)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = PLAN_FORMAT_VERSION
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> "Plan":
        try:
            version = d.get("format_version", PLAN_FORMAT_VERSION)
            if version != PLAN_FORMAT_VERSION:
                raise PlanError(
                    f"{source}: plan format_version {version!r} is not supported "
                    f"(this dsrewrite reads {PLAN_FORMAT_VERSION})."
                )
            entries = tuple(
                PlanEntry(
                    name=e["name"],
                    action=e["action"],
                    reason=e["reason"],
                    config=LayerConfig(**e["config"]) if e.get("config") else None,
                    fact=e.get("fact"),
                    measured=e.get("measured"),
                )
                for e in d["entries"]
            )
            shape = d.get("input_shape")
            arch, arch_args = d.get("arch"), d.get("arch_args") or {}
            if arch is not None and not isinstance(arch, str):
                raise PlanError(f"{source}: 'arch' is {arch!r}; expected an arch spec string or null.")
            if not isinstance(arch_args, dict) or not all(isinstance(k, str) for k in arch_args):
                raise PlanError(f"{source}: 'arch_args' is {arch_args!r}; expected a mapping of argument names.")
            return cls(
                entries=entries,
                recipe=d["recipe"],
                capture=d["capture"],
                input_shape=tuple(shape) if shape is not None else None,
                notes=tuple(d.get("notes", ())),
                arch=arch,
                arch_args=dict(arch_args),
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"{source}: not a dsrewrite plan ({type(exc).__name__}: {exc}).") from exc

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source}: not valid JSON ({exc}).") from exc
        return cls.from_dict(data, source=source)

    def table(self) -> str:
        """A plain-text table: one line per candidate conv."""
        rows = [("conv", "action", "config / reason")]
        for e in self.entries:
            if e.replaced and e.config is not None:
                c = e.config
                detail = f"{c.order} m={c.depth_multiplier} init={c.init}"
                if c.mid_norm or c.mid_act:
                    detail += f" mid={c.mid_norm or '-'}/{c.mid_act or '-'}"
                detail += f"  ({e.reason})"
            else:
                detail = e.reason
            rows.append((e.name, e.action, detail))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * min(120, max(len(x) for x in lines)))
        head = f"plan: recipe {self.recipe!r}, capture {self.capture}, " \
               f"{len(self.replaced)} replaced, {len(self.skipped)} skipped"
        return "\n".join([head, *lines, *(f"note: {n}" for n in self.notes)])
