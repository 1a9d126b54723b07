"""Recipe loading: a built-in name, a YAML file or a mapping → a validated, frozen :class:`Recipe`.

YAML is read with PyYAML's safe loader only (a ``!!python/...`` tag is refused,
never executed). Everything is validated here, once; every problem is a
:class:`~dsrewrite.errors.RecipeError` whose message names the file (or
``builtin:NAME`` / ``<mapping>``), the line where known, the key path (e.g.
``overrides[0].replace.order``), the bad value, the valid options and the
closest one.

Example:
    >>> r = load_recipe({"name": "mine", "select": {"kernel_size": ["3x3"], "in_channels": {"min": 16}},
    ...                  "replace": {"energy": 0.9}})
    >>> r.select.kernel_sizes, r.select.in_channels.min, r.replace.energy, r.replace.depth_multiplier
    (((3, 3),), 16, 0.9, None)
    >>> load_recipe({"replace": {"order": "dwpw"}})
    Traceback (most recent call last):
    ...
    dsrewrite.errors.RecipeError: <mapping>: replace.order: 'dwpw' is not a valid order; valid options: 'dw_pw', 'pw_dw', 'auto' (did you mean 'dw_pw'?).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ..errors import RecipeError, did_you_mean
from .schema import (
    AUTO_ORDERS,
    INITS,
    MID_ACT_NAMES,
    MID_NORMS,
    PREDICATE_KEYS,
    GraphPredicates,
    Kernel,
    LatencySpec,
    NamePattern,
    Override,
    Range,
    Recipe,
    ReplacePatch,
    ReplaceSpec,
    Selector,
    order_choices,
)

__all__ = [
    "load_recipe",
    "builtin_recipes",
    "builtin_recipe_path",
    "parse_recipe",
    "parse_replace_changes",
    "BUILTIN_DIR",
    "TOP_KEYS",
    "SELECT_KEYS",
    "REPLACE_KEYS",
    "OVERRIDE_KEYS",
]

#: Where the built-in recipes live (shipped as package data).
BUILTIN_DIR: Path = Path(__file__).resolve().parent / "builtin"

TOP_KEYS: tuple[str, ...] = ("name", "description", "extends", "select", "replace", "overrides", "latency")
LATENCY_KEYS: tuple[str, ...] = ("min_speedup", "rounds", "warmup", "channels_last")
SELECT_KEYS: tuple[str, ...] = (
    "kernel_size", "groups", "in_channels", "out_channels", "stride", "dilation", "regions",
    "when_no_region_matches", "include", "exclude", "output_stride", *PREDICATE_KEYS,
)
REPLACE_KEYS: tuple[str, ...] = ("order", "auto_order", "depth_multiplier", "energy", "init", "mid_norm", "mid_act")
OVERRIDE_KEYS: tuple[str, ...] = ("match", "replace", "skip")

KeyPath = tuple[Union[str, int], ...]
_KERNEL_RE = re.compile(r"^\s*(\d+)\s*(?:[x×X*]\s*(\d+)\s*)?$")


# --- errors with where ----------------------------------------------------------------------
def _path_str(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Ctx:
    """Where we are: the source's label and, for YAML, the line of each key path."""

    def __init__(self, source: str, lines: Optional[dict[KeyPath, int]] = None) -> None:
        self.source = source
        self.lines = lines or {}

    def error(self, path: KeyPath, message: str) -> RecipeError:
        where = self.source
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                where += f", line {self.lines[path[:n]]}"
                break
        key = f" {_path_str(path)}:" if path else ""
        return RecipeError(f"{where}:{key} {message}")


def _options(options: Sequence[object]) -> str:
    return ", ".join("null" if o is None else repr(o) for o in options)


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong_type(ctx: _Ctx, path: KeyPath, value: object, expected: str) -> RecipeError:
    return ctx.error(path, f"expected {expected}, got {_type_name(value)} {value!r}.")


# --- YAML ----------------------------------------------------------------------------------
class _StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python tags), refusing duplicate keys."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: Optional[yaml.Node], path: KeyPath = (),
               out: Optional[dict[KeyPath, int]] = None) -> dict[KeyPath, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                sub = (*path, k.value)
                out[sub] = k.start_mark.line + 1
                _key_lines(v, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*path, i)] = v.start_mark.line + 1
            _key_lines(v, (*path, i), out)
    return out


def _read_yaml(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader: no object construction
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or str(exc)
        if "constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
            raise RecipeError(
                f"{source}{line}: YAML tag {tag!r} is not allowed: recipes are plain data "
                "(read with yaml.safe_load; no Python objects). Remove the tag."
            ) from None
        raise RecipeError(f"{source}{line}: not a valid recipe: {problem}.") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(
            f"{source}{where}: not valid YAML: {exc.problem or exc}. "
            "Check the indentation, the ':' after each key and the quotes."
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}.") from None
    return data, lines


# --- built-ins -------------------------------------------------------------------------------
def _builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_recipe_path(name: str) -> Path:
    """The YAML file of built-in recipe ``name``.

    Raises:
        RecipeError: no such built-in (the message lists them).

    Example:
        >>> builtin_recipe_path("decoder_only").name
        'decoder_only.yaml'
    """
    names = _builtin_names()
    if name not in names:
        raise RecipeError(
            f"builtin:{name}: no built-in recipe {name!r}{did_you_mean(name, names)}; "
            f"built-ins: {', '.join(names)}. Or pass the path of a .yaml file."
        )
    return BUILTIN_DIR / f"{name}.yaml"


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names → one-line descriptions, sorted by name.

    Example:
        >>> sorted(builtin_recipes())
        ['all_3x3', 'decoder_high_res', 'decoder_only', 'post_concat', 'post_upsample']
    """
    out: dict[str, str] = {}
    for name in _builtin_names():
        data, _ = _read_yaml((BUILTIN_DIR / f"{name}.yaml").read_text(encoding="utf-8"), f"builtin:{name}")
        desc = str(data.get("description", "")).strip() if isinstance(data, dict) else ""
        out[name] = desc.splitlines()[0] if desc else ""
    return out


# --- entry point -----------------------------------------------------------------------------
def load_recipe(source: Union[str, "os.PathLike[str]", Mapping[str, Any], Recipe]) -> Recipe:
    """Load and validate a recipe: a built-in name, a ``.yaml`` path, a mapping, or a :class:`Recipe`.

    A string without a path separator or suffix is a built-in name
    (``"decoder_only"``); anything else is a file path.

    Raises:
        RecipeError: the recipe cannot be read or is not valid (the message says
            where, the value, and the valid options).

    Example:
        >>> load_recipe("decoder_only").select.regions[:2]
        ('decoder', 'decoders')
        >>> load_recipe("decodr_only")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.RecipeError: builtin:decodr_only: no built-in recipe 'decodr_only' (did you mean 'decoder_only'?); built-ins: all_3x3, decoder_high_res, decoder_only, post_concat, post_upsample. Or pass the path of a .yaml file.
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return parse_recipe(source, source="<mapping>", default_name="custom")
    if not isinstance(source, (str, os.PathLike)):
        raise RecipeError(
            f"a recipe is a built-in name, a .yaml path or a mapping, got {type(source).__name__} {source!r}."
        )
    text = os.fspath(source)
    path = Path(text)
    looks_like_name = isinstance(source, str) and os.sep not in text and "/" not in text and not path.suffix
    if looks_like_name and not path.is_file():
        return _load_file(builtin_recipe_path(text), f"builtin:{text}")
    if not path.exists():
        names = _builtin_names()
        raise RecipeError(
            f"{text}: recipe file not found{did_you_mean(path.stem, names)}. "
            f"Give an existing .yaml path or a built-in name ({', '.join(names)})."
        )
    if not path.is_file():
        raise RecipeError(f"{text}: is a directory, not a recipe file. Give the path of a .yaml file.")
    return _load_file(path, text)


def _load_file(path: Path, label: str) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise RecipeError(f"{label}: cannot read the recipe ({exc.strerror}).") from None
    data, lines = _read_yaml(text, label)
    if data is None:
        raise RecipeError(f"{label}: the recipe is empty; expected a mapping with keys like "
                          f"{', '.join(TOP_KEYS)}.")
    return parse_recipe(data, source=label, default_name=path.stem, lines=lines)


# --- mapping → records -----------------------------------------------------------------------
def parse_recipe(data: Any, *, source: str = "<mapping>", default_name: str = "custom",
                 lines: Optional[dict[KeyPath, int]] = None) -> Recipe:
    """Validate parsed recipe data (as from ``yaml.safe_load``) into a :class:`Recipe`.

    Example:
        >>> parse_recipe({"name": "x", "select": {"regions": ["decoder"]}}).select.regions
        ('decoder',)
    """
    ctx = _Ctx(source, lines)
    data = _mapping(ctx, (), data, "a mapping (the recipe)")
    _check_keys(ctx, (), data, TOP_KEYS)
    if "extends" in data:
        data = _extend(ctx, data)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise _wrong_type(ctx, ("name",), name, "a non-empty string")
    desc = data.get("description", "")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise _wrong_type(ctx, ("description",), desc, "a string")
    return Recipe(
        name=name.strip(),
        description=desc.strip(),
        source=source,
        select=_selector(ctx, data.get("select")),
        replace=_replace_spec(ctx, ("replace",), data.get("replace")),
        overrides=_overrides(ctx, data.get("overrides")),
        latency=_latency(ctx, data.get("latency")),
    )


def _latency(ctx: _Ctx, value: Any) -> Optional[LatencySpec]:
    """The optional ``latency:`` section (latency-aware selection)."""
    if value is None:
        return None
    path: KeyPath = ("latency",)
    data = _mapping(ctx, path, value)
    _check_keys(ctx, path, data, LATENCY_KEYS)
    out: dict[str, Any] = {}
    if data.get("min_speedup") is not None:
        v = data["min_speedup"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _wrong_type(ctx, (*path, "min_speedup"), v, "a number > 0, e.g. 1.1")
        if not v > 0:
            raise ctx.error((*path, "min_speedup"), f"{v!r} is out of range: must be > 0 (1.1 = at least 10% faster).")
        out["min_speedup"] = float(v)
    if data.get("rounds") is not None:
        out["rounds"] = _int(ctx, (*path, "rounds"), data["rounds"], minimum=1)
    if data.get("warmup") is not None:
        out["warmup"] = _int(ctx, (*path, "warmup"), data["warmup"], minimum=0)
    if data.get("channels_last") is not None:
        v = data["channels_last"]
        if not isinstance(v, bool):
            raise _wrong_type(ctx, (*path, "channels_last"), v, "true or false")
        out["channels_last"] = v
    return LatencySpec(**out)


def _extend(ctx: _Ctx, data: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a recipe onto the built-in it ``extends``: per-key within select/replace; lists replace."""
    parent_name = data["extends"]
    if not isinstance(parent_name, str):
        raise _wrong_type(ctx, ("extends",), parent_name, "the name of a built-in recipe")
    try:
        path = builtin_recipe_path(parent_name)
    except RecipeError:
        names = _builtin_names()
        raise ctx.error(("extends",), f"{parent_name!r} is not a built-in recipe; valid options: "
                        f"{_options(names)}{did_you_mean(parent_name, names)}.") from None
    parent, _ = _read_yaml(path.read_text(encoding="utf-8"), f"builtin:{parent_name}")
    merged: dict[str, Any] = {k: v for k, v in parent.items() if k != "name"}
    merged["description"] = f"Based on {parent_name}: {parent.get('description', '')}".strip()
    for key, value in data.items():
        if key == "extends":
            continue
        if key in ("select", "replace") and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            base = dict(merged[key])
            if key == "replace" and ({"depth_multiplier", "energy"} & set(value)):
                base.pop("depth_multiplier", None)
                base.pop("energy", None)
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def _mapping(ctx: _Ctx, path: KeyPath, value: Any, expected: str = "a mapping") -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _wrong_type(ctx, path, value, expected)
    return value


def _check_keys(ctx: _Ctx, path: KeyPath, data: Mapping[Any, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ctx.error((*path, str(key)), f"unknown key {key!r}{did_you_mean(key, allowed)}; "
                            f"valid keys here: {', '.join(allowed)}.")


def _int(ctx: _Ctx, path: KeyPath, value: Any, *, minimum: int, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(ctx, path, value, what)
    if value < minimum:
        raise ctx.error(path, f"{value!r} is out of range: must be ≥ {minimum}.")
    return value


def _number(ctx: _Ctx, path: KeyPath, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(ctx, path, value, "a number")
    if value < minimum:
        raise ctx.error(path, f"{value!r} is out of range: must be ≥ {minimum:g}.")
    return float(value) if isinstance(value, float) else value


def _choice(ctx: _Ctx, path: KeyPath, value: Any, options: Sequence[str], what: str,
            *, nullable: bool = False) -> Optional[str]:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or value not in options:
        shown = [*options, None] if nullable else list(options)
        hint = " (write null, not 'none', for no " + what + ")" if nullable and str(value).lower() == "none" else ""
        raise ctx.error(path, f"{value!r} is not a valid {what}; valid options: {_options(shown)}"
                        f"{did_you_mean(value, options)}{hint}.")
    return value


def _pair(ctx: _Ctx, path: KeyPath, value: Any, what: str) -> Kernel:
    """``3``, ``"3x3"``, ``"3×3"``, ``[3, 3]`` → ``(3, 3)``."""
    expected = f"a {what} like 3, '3x3' or [3, 3]"
    if isinstance(value, bool):
        raise _wrong_type(ctx, path, value, expected)
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, str):
        m = _KERNEL_RE.match(value)
        if not m:
            raise _wrong_type(ctx, path, value, expected)
        pair = (int(m.group(1)), int(m.group(2) or m.group(1)))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise _wrong_type(ctx, path, value, expected)
    if min(pair) < 1:
        raise ctx.error(path, f"{value!r} is out of range: each {what} must be ≥ 1.")
    return pair


def _pairs(ctx: _Ctx, path: KeyPath, value: Any, what: str) -> Optional[tuple[Kernel, ...]]:
    """A list of accepted sizes (``[3, 5]`` is 3×3 or 5×5; write ``[[3, 5]]`` or ``['3x5']`` for 3×5)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, f"an empty list accepts no {what}; remove the key to accept any.")
    pairs = [_pair(ctx, (*path, i) if items is value else path, v, what) for i, v in enumerate(items)]
    return tuple(dict.fromkeys(pairs))


def _range(ctx: _Ctx, path: KeyPath, value: Any, *, integer: bool) -> Range:
    if value is None:
        return Range()
    num = "an integer" if integer else "a number"
    if isinstance(value, Mapping):
        _check_keys(ctx, path, value, ("min", "max"))
        bounds: dict[str, Optional[float]] = {}
        for key in ("min", "max"):
            v = value.get(key)
            if v is None:
                bounds[key] = None
            elif integer:
                bounds[key] = _int(ctx, (*path, key), v, minimum=0)
            else:
                bounds[key] = _number(ctx, (*path, key), v)
        lo, hi = bounds["min"], bounds["max"]
        if lo is not None and hi is not None and lo > hi:
            raise ctx.error(path, f"min {lo!r} > max {hi!r}: the range is empty; swap them.")
        return Range(lo, hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)):
        raise _wrong_type(ctx, path, value, f"{num} or a mapping like {{min: 16}} / {{min: 16, max: 512}}")
    v = _int(ctx, path, value, minimum=0) if integer else _number(ctx, path, value)
    return Range(v, v)


def _patterns(ctx: _Ctx, path: KeyPath, value: Any, *, allow_empty: bool = True) -> tuple[NamePattern, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for i, v in enumerate(items):
        where = (*path, i) if items is value else path
        if not isinstance(v, str) or not v.strip():
            raise _wrong_type(ctx, where, v, "a qualified-name glob like 'decoder.*' or a regex 're:...'")
        try:
            out.append(NamePattern(v.strip()))
        except re.error as exc:
            raise ctx.error(where, f"{v!r} is not a valid regex: {exc}. Escape literal dots as '\\.'; "
                            "or drop the 're:' prefix to use a glob.") from None
    if not out and not allow_empty:
        raise ctx.error(path, "an empty list matches no conv; give at least one pattern.")
    return tuple(out)


def _regions(ctx: _Ctx, path: KeyPath, value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, "an empty list selects no conv; remove the key to accept every region.")
    out = []
    for i, v in enumerate(items):
        where = (*path, i) if items is value else path
        if not isinstance(v, str) or not v.strip():
            raise _wrong_type(ctx, where, v, "a region name (the first part of a qualified name, e.g. 'decoder')")
        out.append(v.strip())
    return tuple(out)


def _tristate(ctx: _Ctx, path: KeyPath, value: Any) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise _wrong_type(ctx, path, value, "true, false or null (null: don't care)")


def _predicates(ctx: _Ctx, path: KeyPath, data: Mapping[Any, Any]) -> GraphPredicates:
    return GraphPredicates(**{k: _tristate(ctx, (*path, k), data.get(k)) for k in PREDICATE_KEYS})


def _selector(ctx: _Ctx, value: Any) -> Selector:
    path: KeyPath = ("select",)
    data = _mapping(ctx, path, value)
    _check_keys(ctx, path, data, SELECT_KEYS)
    kernels = _pairs(ctx, (*path, "kernel_size"), data.get("kernel_size"), "kernel size")
    for i, k in enumerate(kernels or ()):
        if k == (1, 1):
            raise ctx.error((*path, "kernel_size", i) if isinstance(data.get("kernel_size"), list) else
                            (*path, "kernel_size"), "1x1 convs are already pointwise: there is nothing to "
                            "separate. Remove '1x1'.")
    groups_raw = data.get("groups", [1])
    groups_items = groups_raw if isinstance(groups_raw, list) else [groups_raw]
    for i, g in enumerate(groups_items):
        where = (*path, "groups", i) if groups_items is groups_raw else (*path, "groups")
        _int(ctx, where, g, minimum=1)
        if g != 1:
            raise ctx.error(where, f"{g!r} is not supported: only dense convs can be separated; "
                            "valid options: 1.")
    regions = _regions(ctx, (*path, "regions"), data.get("regions"))
    fallback_raw = data.get("when_no_region_matches")
    fallback = None
    if fallback_raw is not None:
        fpath = (*path, "when_no_region_matches")
        fdata = _mapping(ctx, fpath, fallback_raw, "a mapping like {downstream_of_upsample: true}")
        _check_keys(ctx, fpath, fdata, PREDICATE_KEYS)
        if regions is None:
            raise ctx.error(fpath, "has no effect without select.regions; add regions or remove it.")
        fallback = _predicates(ctx, fpath, fdata)
    return Selector(
        kernel_sizes=kernels,
        groups=(1,),
        in_channels=_range(ctx, (*path, "in_channels"), data.get("in_channels"), integer=True),
        out_channels=_range(ctx, (*path, "out_channels"), data.get("out_channels"), integer=True),
        strides=_pairs(ctx, (*path, "stride"), data.get("stride"), "stride"),
        dilations=_pairs(ctx, (*path, "dilation"), data.get("dilation"), "dilation"),
        regions=regions,
        when_no_region_matches=fallback,
        include=_patterns(ctx, (*path, "include"), data.get("include")),
        exclude=_patterns(ctx, (*path, "exclude"), data.get("exclude")),
        output_stride=_range(ctx, (*path, "output_stride"), data.get("output_stride"), integer=False),
        graph=_predicates(ctx, path, data),
    )


def _replace_values(ctx: _Ctx, path: KeyPath, data: Mapping[Any, Any]) -> dict[str, Any]:
    """Validate the given ``replace`` keys; ``null`` depth_multiplier/energy count as absent."""
    _check_keys(ctx, path, data, REPLACE_KEYS)
    out: dict[str, Any] = {}
    if "order" in data:
        out["order"] = _choice(ctx, (*path, "order"), data["order"], order_choices(), "order")
    if "auto_order" in data:
        out["auto_order"] = _choice(ctx, (*path, "auto_order"), data["auto_order"], AUTO_ORDERS, "auto_order")
    if data.get("depth_multiplier") is not None:
        out["depth_multiplier"] = _int(ctx, (*path, "depth_multiplier"), data["depth_multiplier"], minimum=1)
    if data.get("energy") is not None:
        e = data["energy"]
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise _wrong_type(ctx, (*path, "energy"), e, "a number in (0, 1], e.g. 0.9")
        if not 0 < e <= 1:
            raise ctx.error((*path, "energy"), f"{e!r} is out of range: must be in (0, 1] "
                            "(the fraction of the kernel's squared singular values to keep, e.g. 0.9).")
        out["energy"] = float(e)
    if "depth_multiplier" in out and "energy" in out:
        raise ctx.error(path, f"both depth_multiplier ({out['depth_multiplier']!r}) and energy "
                        f"({out['energy']!r}) are set: give one (a fixed m, or the energy that picks m).")
    if "init" in data:
        out["init"] = _choice(ctx, (*path, "init"), data["init"], INITS, "init")
    if "mid_norm" in data:
        out["mid_norm"] = _choice(ctx, (*path, "mid_norm"), data["mid_norm"], MID_NORMS, "mid_norm", nullable=True)
    if "mid_act" in data:
        out["mid_act"] = _choice(ctx, (*path, "mid_act"), data["mid_act"], MID_ACT_NAMES, "mid_act", nullable=True)
    return out


def _replace_spec(ctx: _Ctx, path: KeyPath, value: Any) -> ReplaceSpec:
    values = _replace_values(ctx, path, _mapping(ctx, path, value))
    if "energy" in values:
        values.setdefault("depth_multiplier", None)
    return ReplaceSpec(**values)


def parse_replace_changes(changes: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Validate replace keys given outside a recipe (CLI flags); ``None`` values are dropped.

    Example:
        >>> parse_replace_changes({"order": "auto", "init": None}, source="--order")
        {'order': 'auto'}
    """
    given = {k: v for k, v in changes.items() if v is not None}
    return _replace_values(_Ctx(source), ("replace",), given)


def _overrides(ctx: _Ctx, value: Any) -> tuple[Override, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _wrong_type(ctx, ("overrides",), value,
                          "a list of {match: ..., replace: {...}} or {match: ..., skip: true}")
    out = []
    for i, item in enumerate(value):
        path: KeyPath = ("overrides", i)
        data = _mapping(ctx, path, item, "a mapping like {match: 'decoder.blocks.0.*', replace: {depth_multiplier: 2}}")
        _check_keys(ctx, path, data, OVERRIDE_KEYS)
        if "match" not in data:
            raise ctx.error(path, "missing key 'match' (a qualified-name glob, 're:' regex, or a list of them).")
        match = _patterns(ctx, (*path, "match"), data["match"], allow_empty=False)
        skip = data.get("skip", False)
        if not isinstance(skip, bool):
            raise _wrong_type(ctx, (*path, "skip"), skip, "true or false")
        rdata = _mapping(ctx, (*path, "replace"), data.get("replace"))
        patch = _replace_values(ctx, (*path, "replace"), rdata)
        if skip and patch:
            raise ctx.error(path, "sets both skip: true and replace: an override either skips or replaces.")
        if not skip and not patch:
            raise ctx.error(path, "does nothing: give replace: {...} or skip: true.")
        out.append(Override(index=i, match=match, replace=ReplacePatch(tuple(patch.items())), skip=skip))
    return tuple(out)
