# SPDX-License-Identifier: Apache-2.0
"""Validation of the ``replace`` keys: in a recipe's ``replace:``/``overrides[i].replace``, and from CLI flags.

Example:
    >>> parse_replace_changes({"order": "auto", "init": None}, source="--order")
    {'order': 'auto'}
    >>> parse_replace_changes({"order": "dwpw"}, source="--order")
    Traceback (most recent call last):
    ...
    dsrewrite.errors.RecipeError: --order: replace.order: 'dwpw' is not a valid order; valid options: 'dw_pw', 'pw_dw', 'auto' (did you mean 'dw_pw'?).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .choices import AUTO_ORDERS, INITS, MID_ACT_NAMES, MID_NORMS, order_choices
from .fields import Ctx, KeyPath, check_keys, choice, int_value, wrong_type

__all__ = ["MAX_DEPTH_MULTIPLIER", "REPLACE_KEYS", "replace_values", "parse_replace_changes"]

#: The largest depth multiplier read (a 64×64 kernel's kh·kw); the plan refuses m > kh·kw of each conv.
MAX_DEPTH_MULTIPLIER = 4096

REPLACE_KEYS: tuple[str, ...] = ("order", "auto_order", "depth_multiplier", "energy", "init", "mid_norm", "mid_act")


def replace_values(ctx: Ctx, path: KeyPath, data: Mapping[Any, Any]) -> dict[str, Any]:
    """Validate the given ``replace`` keys; ``null`` depth_multiplier/energy count as absent."""
    check_keys(ctx, path, data, REPLACE_KEYS)
    out: dict[str, Any] = {}
    if "order" in data:
        out["order"] = choice(ctx, (*path, "order"), data["order"], order_choices(), "order")
    if "auto_order" in data:
        out["auto_order"] = choice(ctx, (*path, "auto_order"), data["auto_order"], AUTO_ORDERS, "auto_order")
    if data.get("depth_multiplier") is not None:
        out["depth_multiplier"] = int_value(ctx, (*path, "depth_multiplier"), data["depth_multiplier"], minimum=1,
                                            maximum=MAX_DEPTH_MULTIPLIER)
    if data.get("energy") is not None:
        e = data["energy"]
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise wrong_type(ctx, (*path, "energy"), e, "a number in (0, 1], e.g. 0.9")
        if not 0 < e <= 1:
            raise ctx.error((*path, "energy"), f"{e!r} is out of range: must be in (0, 1] "
                            "(the fraction of the kernel's squared singular values to keep, e.g. 0.9).")
        out["energy"] = float(e)
    if "depth_multiplier" in out and "energy" in out:
        raise ctx.error(path, f"both depth_multiplier ({out['depth_multiplier']!r}) and energy "
                        f"({out['energy']!r}) are set: give one (a fixed m, or the energy that picks m).")
    if "init" in data:
        out["init"] = choice(ctx, (*path, "init"), data["init"], INITS, "init")
    if "mid_norm" in data:
        out["mid_norm"] = choice(ctx, (*path, "mid_norm"), data["mid_norm"], MID_NORMS, "mid_norm", nullable=True)
    if "mid_act" in data:
        out["mid_act"] = choice(ctx, (*path, "mid_act"), data["mid_act"], MID_ACT_NAMES, "mid_act", nullable=True)
    return out


def parse_replace_changes(changes: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Validate replace keys given outside a recipe (CLI flags); ``None`` values are dropped."""
    given = {k: v for k, v in changes.items() if v is not None}
    return replace_values(Ctx(source), ("replace",), given)
