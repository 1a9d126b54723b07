"""Writing report files: atomically (a temporary file in the same folder, then a rename; nothing left behind).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_atomic(Path(d) / "r.txt", "hi")
    ...     (Path(d) / "r.txt").read_text(), sorted(p.name for p in Path(d).iterdir())
    ('hi', ['r.txt'])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from ..errors import OutputError

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist. "
                          "Hint: create it first or choose another path.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
