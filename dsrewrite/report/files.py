# SPDX-License-Identifier: Apache-2.0
"""Writing report files through the one atomic writer (:mod:`dsrewrite.runtime.files`): a temp file in the same
folder, fsync, rename; nothing left behind on failure.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_atomic(Path(d) / "r.txt", "hi")
    ...     (Path(d) / "r.txt").read_text(), sorted(p.name for p in Path(d).iterdir())
    ('hi', ['r.txt'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import OutputError
from ..runtime.files import atomic_write_bytes

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically.

    Raises:
        OutputError: the folder does not exist, or the write failed (the message names the cause).
    """
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist. "
                          "Hint: create it first or choose another path.")
    atomic_write_bytes(data.encode("utf-8") if isinstance(data, str) else data, path)
