# SPDX-License-Identifier: Apache-2.0
"""Recipe names: the built-in recipes shipped as YAML, and ``extends:`` onto one of them.

Example:
    >>> builtin_recipe_path("decoder_only").name
    'decoder_only.yaml'
    >>> builtin_names()[:2]
    ['all_3x3', 'all_3x3x3']
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError, did_you_mean
from .fields import Ctx, options_text, wrong_type
from .yaml_read import read_yaml

__all__ = ["BUILTIN_DIR", "builtin_names", "builtin_recipe_path", "builtin_recipes", "extend"]

#: Where the built-in recipes live (shipped as package data).
BUILTIN_DIR: Path = Path(__file__).resolve().parent / "builtin"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_recipe_path(name: str) -> Path:
    """The YAML file of built-in recipe ``name``.

    Raises:
        RecipeError: no such built-in (the message lists them).

    Example:
        >>> builtin_recipe_path("decoder_only").name
        'decoder_only.yaml'
    """
    names = builtin_names()
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
        ['all_3x3', 'all_3x3x3', 'decoder_high_res', 'decoder_only', 'post_concat', 'post_upsample']
    """
    out: dict[str, str] = {}
    for name in builtin_names():
        data, _ = read_yaml((BUILTIN_DIR / f"{name}.yaml").read_text(encoding="utf-8"), f"builtin:{name}")
        desc = str(data.get("description", "")).strip() if isinstance(data, dict) else ""
        out[name] = desc.splitlines()[0] if desc else ""
    return out


def extend(ctx: Ctx, data: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a recipe onto the built-in it ``extends``: per-key within select/replace; lists replace."""
    parent_name = data["extends"]
    if not isinstance(parent_name, str):
        raise wrong_type(ctx, ("extends",), parent_name, "the name of a built-in recipe")
    try:
        path = builtin_recipe_path(parent_name)
    except RecipeError:
        names = builtin_names()
        raise ctx.error(("extends",), f"{parent_name!r} is not a built-in recipe; valid options: "
                        f"{options_text(names)}{did_you_mean(parent_name, names)}.") from None
    parent, _ = read_yaml(path.read_text(encoding="utf-8"), f"builtin:{parent_name}")
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
