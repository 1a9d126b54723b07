# SPDX-License-Identifier: Apache-2.0
"""What the old module paths ``dsrewrite.calibrate``, ``heal`` and ``capture`` share: a callable module.

``dsrewrite.calibrate`` is both a documented function (``dsrewrite.calibrate(...)``) and,
for one minor version, the old path of the module that held it. Importing the module
makes Python set ``dsrewrite.calibrate`` to the module; the module then forwards calls
to the function, so both spellings keep working.

Example:
    >>> import dsrewrite.heal, inspect
    >>> callable(dsrewrite.heal), list(inspect.signature(dsrewrite.heal).parameters)[:2]
    (True, ['rewritten', 'original'])
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__wrapped__"](*args, **kwargs)


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Let the module ``module_name`` be called as ``fn`` (and show ``fn``'s signature)."""
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module.__wrapped__ = fn  # type: ignore[attr-defined]
    module.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
