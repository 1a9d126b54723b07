# SPDX-License-Identifier: Apache-2.0
"""Input files and sizes checked at the boundary, before anything is read or allocated.

* :func:`input_file` stats a path the user gave (model, recipe, plan, calibration data,
  example inputs) and refuses, with the given error class and one line naming the input:
  a name the OS cannot take (too long, NUL byte), a missing path, a folder where a file is
  expected, anything that is not a regular file (a FIFO would block, ``/dev/zero`` never
  ends), a file over a size bound, and a file that cannot be opened for reading.
* :func:`check_alloc` refuses a tensor shape whose size is over :data:`MAX_TENSOR_BYTES`
  before ``torch.randn``/``torch.empty`` would try to allocate it.

Example:
    >>> from dsrewrite.errors import UsageError
    >>> input_file("/no/such/file.pt", "model file", UsageError)
    Traceback (most recent call last):
    ...
    dsrewrite.errors.UsageError: model file '/no/such/file.pt' does not exist.
    >>> check_alloc((1, 3, 100000, 100000), 4, "--input-shape")
    Traceback (most recent call last):
    ...
    dsrewrite.errors.UsageError: --input-shape (1, 3, 100000, 100000) is too large: 120.0 GB as float32 (the bound is 4.3 GB); use a smaller shape.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import UsageError

__all__ = ["input_file", "path_exists", "is_missing", "check_alloc", "MAX_TENSOR_BYTES", "MAX_TEXT_BYTES"]

#: The largest example input / calibration batch / image batch built from a shape the user gave
#: (4 GiB: a 1×1×1024³ float32 volume fits; 1×3×100000×100000 does not).
MAX_TENSOR_BYTES = 4 << 30

#: The largest recipe or plan file read (both are small text files; a few KB in practice).
MAX_TEXT_BYTES = 16 << 20


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def path_exists(path: Union[str, "os.PathLike[str]"]) -> bool:
    """``Path(path).exists()``, but False (not an exception) for a name the OS refuses (too long, NUL byte).

    Example:
        >>> path_exists("x" * 5000), path_exists("a\\0b"), path_exists("/")
        (False, False, True)
    """
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def is_missing(path: Union[str, "os.PathLike[str]"]) -> bool:
    """True only when there is no such file (a name the OS refuses is not "missing": :func:`input_file` says why).

    Example:
        >>> is_missing("/no/such/file"), is_missing("x" * 5000), is_missing("/")
        (True, False, False)
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return False


def input_file(path: Union[str, "os.PathLike[str]"], what: str, error: type[UsageError] = UsageError, *,
               folder_ok: bool = False, max_bytes: Optional[int] = None, hint: str = "") -> Path:
    """``path`` as a :class:`~pathlib.Path` once it is a readable regular file (or folder, with ``folder_ok``).

    Raises:
        UsageError: (``error``, a subclass) naming ``what`` and the path: the name is too long or
            holds a NUL byte, the path does not exist, is a folder (unless ``folder_ok``), is not a
            regular file (FIFO, device, socket), is larger than ``max_bytes``, or cannot be read.
    """
    text = os.fspath(path)
    shown = text if len(text) <= 120 else text[:60] + "…" + text[-40:]
    hint = f" {hint}" if hint else ""
    if "\0" in text:
        raise error(f"{what} {shown!r}: the name holds a null byte; no file can have it.{hint}")
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise error(f"{what} {shown!r} does not exist.{hint}") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise error(f"{what} {shown!r}: the file name is too long for the file system "
                        f"({len(os.path.basename(text))} characters in the last part, {len(text)} in all).") from None
        raise error(f"{what} {shown!r} cannot be read: {exc.strerror or exc}.{hint}") from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return Path(text)
        raise error(f"{what} {shown!r} is a directory, not a file.{hint}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "special"
        raise error(f"{what} {shown!r} is not a regular file ({kind}); reading it could block or never end. "
                    f"Pass a file.{hint}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {shown!r} is too large ({_gb(st.st_size)}; the bound is {_gb(max_bytes)}).{hint}")
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise error(f"{what} {shown!r} cannot be read: {exc.strerror or exc}.{hint}") from None
    return Path(text)


def check_alloc(shape: Sequence[int], element_bytes: int, what: str, *, dtype_name: str = "float32",
                error: type[UsageError] = UsageError, limit: int = MAX_TENSOR_BYTES) -> None:
    """Refuse a shape whose tensor would take more than ``limit`` bytes (before allocating it).

    Raises:
        UsageError: (``error``) naming ``what``, the shape, its size and the bound.
    """
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise error(f"{what} {tuple(dims)} has a negative size.")
    nbytes = math.prod(dims) * int(element_bytes)
    if nbytes > limit:
        raise error(f"{what} {tuple(dims)} is too large: {_gb(nbytes)} as {dtype_name} (the bound is "
                    f"{_gb(limit)}); use a smaller shape.")
