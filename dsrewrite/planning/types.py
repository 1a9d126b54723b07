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
from typing import Any, Literal, Optional, Union

from ..errors import PlanError, PlanFileError

__all__ = ["LayerConfig", "PlanEntry", "Plan", "PLAN_FORMAT_VERSION"]

PLAN_FORMAT_VERSION = 1

#: The largest plan read (a plan lists each candidate conv once: a few hundred KB for a large model).
MAX_PLAN_CHARS = 16 << 20
#: The deepest nesting of a plan's JSON (a plan is about five levels deep; a ConvFact's lists add one or two).
MAX_PLAN_DEPTH = 32
_ENTRY_KEYS = ("name", "action", "reason", "config", "fact", "measured")
_CONFIG_KEYS = ("order", "depth_multiplier", "init", "mid_norm", "mid_act", "note")


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets in JSON text (strings skipped), in one linear pass."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _entry(e: Any, i: int, source: str) -> "PlanEntry":
    where = f"{source}: entries[{i}]"
    if not isinstance(e, dict):
        raise PlanFileError(f"{where} is {_json_type(e)}; expected an object with 'name', 'action', 'reason'.")
    for key in e:
        if key not in _ENTRY_KEYS:
            raise PlanFileError(f"{where}: unknown key {key!r}; valid keys: {', '.join(_ENTRY_KEYS)}.")
    for key in ("name", "action", "reason"):
        if not isinstance(e.get(key), str):
            raise PlanFileError(f"{where}: {key!r} is {_short(e.get(key))}; expected a string.")
    if e["action"] not in ("replace", "skip"):
        raise PlanFileError(f"{where} ({e['name']!r}): action {_short(e['action'])} is not 'replace' or 'skip'.")
    cfg = e.get("config")
    config = None
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise PlanFileError(f"{where} ({e['name']!r}): 'config' is {_json_type(cfg)}; expected an object.")
        for key in cfg:
            if key not in _CONFIG_KEYS:
                raise PlanFileError(f"{where} ({e['name']!r}): unknown config key {key!r}; valid keys: "
                                    f"{', '.join(_CONFIG_KEYS)}.")
        m = cfg.get("depth_multiplier", 1)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise PlanFileError(f"{where} ({e['name']!r}): depth_multiplier {_short(m)} is not an integer ≥ 1.")
        for key in ("order", "init", "note"):
            if key in cfg and not isinstance(cfg[key], str):
                raise PlanFileError(f"{where} ({e['name']!r}): {key} {_short(cfg[key])} is not a string.")
        if cfg.get("init", "svd") not in ("svd", "random"):
            raise PlanFileError(f"{where} ({e['name']!r}): init {_short(cfg['init'])} is not 'svd' or 'random'.")
        for key in ("mid_norm", "mid_act"):
            if cfg.get(key) is not None and not isinstance(cfg[key], str):
                raise PlanFileError(f"{where} ({e['name']!r}): {key} {_short(cfg[key])} is not a string or null.")
        config = LayerConfig(**cfg)
    for key in ("fact", "measured"):
        if e.get(key) is not None and not isinstance(e[key], dict):
            raise PlanFileError(f"{where} ({e['name']!r}): {key!r} is {_json_type(e[key])}; expected an object.")
    return PlanEntry(name=e["name"], action=e["action"], reason=e["reason"], config=config, fact=e.get("fact"),
                     measured=e.get("measured"))


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
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> "Plan":
        """A plan from its JSON form, every field's type and range checked (nothing is built).

        Raises:
            PlanFileError: not a plan (not a mapping, a missing or mistyped field, an unknown
                action or config key, a depth multiplier that is not an integer ≥ 1).
        """
        if not isinstance(d, dict):
            raise PlanFileError(f"{source}: not a dsrewrite plan: the JSON holds {_json_type(d)}, not an object "
                                "with 'entries', 'recipe' and 'capture'.")
        version = d.get("format_version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise PlanFileError(
                f"{source}: plan format_version {version!r} is not supported "
                f"(this dsrewrite reads {PLAN_FORMAT_VERSION})."
            )
        for key, kinds in (("entries", list), ("recipe", str), ("capture", str)):
            if not isinstance(d.get(key), kinds):
                raise PlanFileError(f"{source}: not a dsrewrite plan: '{key}' is {_json_type(d.get(key))}; expected "
                                    f"{'a list' if kinds is list else 'a string'}.")
        entries = tuple(_entry(e, i, source) for i, e in enumerate(d["entries"]))
        shape = d.get("input_shape")
        if shape is not None and not (isinstance(shape, list) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise PlanFileError(f"{source}: 'input_shape' is {_short(shape)}; expected a list of sizes or null.")
        arch, arch_args = d.get("arch"), d.get("arch_args") or {}
        if arch is not None and not isinstance(arch, str):
            raise PlanFileError(f"{source}: 'arch' is {_short(arch)}; expected an arch spec string or null.")
        if not isinstance(arch_args, dict) or not all(isinstance(k, str) for k in arch_args):
            raise PlanFileError(f"{source}: 'arch_args' is {_short(arch_args)}; expected a mapping of argument names.")
        notes = d.get("notes", ())
        if not isinstance(notes, (list, tuple)) or not all(isinstance(n, str) for n in notes):
            raise PlanFileError(f"{source}: 'notes' is {_short(notes)}; expected a list of strings.")
        return cls(
            entries=entries,
            recipe=d["recipe"],
            capture=d["capture"],
            input_shape=tuple(shape) if shape is not None else None,
            notes=tuple(notes),
            arch=arch,
            arch_args=dict(arch_args),
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes], *, source: str = "<string>") -> "Plan":
        """A plan from JSON text (or UTF-8 bytes), at most :data:`MAX_PLAN_CHARS` long and nested at most
        :data:`MAX_PLAN_DEPTH` deep.

        Raises:
            PlanFileError: not UTF-8, too large, too deep, not valid JSON, or not a plan.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PlanFileError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); a plan is the "
                                    "JSON file dsrewrite wrote.") from None
        if len(text) > MAX_PLAN_CHARS:
            raise PlanFileError(f"{source}: the plan is too large ({len(text):,} characters; the bound is "
                                f"{MAX_PLAN_CHARS:,}).")
        depth = _json_depth(text)
        if depth > MAX_PLAN_DEPTH:
            raise PlanFileError(f"{source}: the JSON is nested {depth} deep (the bound is {MAX_PLAN_DEPTH}); a plan "
                                "is a few levels deep.")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise PlanFileError(f"{source}: not valid JSON ({str(exc).splitlines()[0][:200]}).") from None
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
