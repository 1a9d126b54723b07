# SPDX-License-Identifier: Apache-2.0
"""Deprecated location: the safe loader now lives in :mod:`dsrewrite.io.safe_load` (torch's weights-only
unpickler with a per-file allowlist). This module keeps ``restricted_torch_load`` and ``TRUST_HINT``
importable for one minor version.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "w.pt"; torch.save({"w": torch.ones(2)}, p)
    >>> restricted_torch_load(p)["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from .allowlist import TRUST_HINT
from .safe_load import safe_torch_load

__all__ = ["restricted_torch_load", "TRUST_HINT"]


def restricted_torch_load(f: Union[str, os.PathLike], *, map_location: Any = "cpu",
                          source: Optional[str] = None) -> Any:
    """Deprecated alias of :func:`dsrewrite.io.safe_load.safe_torch_load`."""
    return safe_torch_load(f, map_location=map_location, source=source)
