# SPDX-License-Identifier: Apache-2.0
"""Recipe loading: a built-in name, a YAML file or a mapping → a validated, frozen :class:`Recipe`.

This module resolves what the user gave (a name, a path, a mapping) and reads it;
YAML reading is :mod:`.yaml_read`, built-in names and ``extends:`` are :mod:`.names`,
validation into records is :mod:`.validate`. Every problem is a
:class:`~dsrewrite.errors.RecipeError` naming the file (or ``builtin:NAME`` /
``<mapping>``), the line where known, the key path, the bad value, the valid
options and the closest one.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from ..errors import RecipeError, did_you_mean
from ..runtime.input_files import MAX_TEXT_BYTES, input_file, is_missing, path_exists
from .names import BUILTIN_DIR, builtin_names, builtin_recipe_path, builtin_recipes
from .replace_keys import REPLACE_KEYS, parse_replace_changes
from .schema import Recipe
from .validate import OVERRIDE_KEYS, TOP_KEYS, parse_recipe, select_keys
from .yaml_read import read_yaml

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


def __getattr__(name: str) -> Any:
    if name == "SELECT_KEYS":  # read on access: predicates may be registered after import
        return select_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        dsrewrite.errors.RecipeError: builtin:decodr_only: no built-in recipe 'decodr_only' (did you mean 'decoder_only'?); built-ins: all_3x3, all_3x3x3, decoder_high_res, decoder_only, post_concat, post_upsample. Or pass the path of a .yaml file.
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
    if looks_like_name and not (path_exists(path) and path.is_file()):
        return _load_file(builtin_recipe_path(text), f"builtin:{text}")
    if is_missing(path):
        names = builtin_names()
        raise RecipeError(
            f"{text}: recipe file not found{did_you_mean(path.stem, names)}. "
            f"Give an existing .yaml path or a built-in name ({', '.join(names)})."
        )
    input_file(path, "recipe", RecipeError, folder_ok=True, max_bytes=MAX_TEXT_BYTES)  # name, FIFO, size, access
    if path.is_dir():
        raise RecipeError(f"{text}: is a directory, not a recipe file. Give the path of a .yaml file.")
    return _load_file(path, text)


def _load_file(path: Path, label: str) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise RecipeError(f"{label}: cannot read the recipe ({exc.strerror}).") from None
    data, lines = read_yaml(text, label)
    if data is None:
        raise RecipeError(f"{label}: the recipe is empty; expected a mapping with keys like "
                          f"{', '.join(TOP_KEYS)}.")
    return parse_recipe(data, source=label, default_name=path.stem, lines=lines)
