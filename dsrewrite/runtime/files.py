# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a temp file beside the destination, flushed, fsync'ed, then ``os.replace``'d.

A reader sees the old file or the new one, never a partial one; a failed write removes
its temporary file and leaves any previous file untouched; a failure names the real
cause (a full disk, another OS error, an object pickle cannot save) in one line.
The one copy of the atomic writer: saving a rewrite, reports, heal checkpoints and
ONNX files all go through it.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(b"hello", d / "a.txt").read_bytes()
    b'hello'
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

import torch

from ..errors import OutputError

__all__ = ["atomic_output", "atomic_write", "atomic_write_all", "atomic_write_bytes", "atomic_save", "create_temp"]

PathLike = Union[str, "os.PathLike[str]"]


def create_temp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # mode 0o666 minus the umask, like open(path, "wb") would give
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - best effort
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def _write_failed(path: Path, exc: BaseException) -> OutputError:
    """One line that names the real cause: a full disk, another OS error, or an object pickle cannot save."""
    kept = f"Nothing was written there{' (the previous file is unchanged)' if path.exists() else ''}"
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "failed writing" in str(exc))
        and _low_space(path))
    if full:
        why = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
        return OutputError(f"could not write {path}: the disk is full{why}. {kept}; free space or choose another -o.")
    if isinstance(exc, OSError):
        return OutputError(f"could not write {path}: {exc.strerror or exc}. {kept}; choose another -o.")
    if isinstance(exc, (pickle.PicklingError, AttributeError, TypeError)):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return OutputError(
            f"could not write {path}: the model holds an object that pickle cannot save ({type(exc).__name__}: "
            f"{first}), e.g. a lambda or a local function. {kept}; remove it, or write the weights with "
            "--save-format safetensors (a .safetensors output) and reload them with the plan."
        )
    first = str(exc).splitlines()[0] if str(exc) else ""
    return OutputError(f"could not write {path}: {type(exc).__name__}: {first}. {kept}.")


def _low_space(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        return False


def _write_temp(path: Path, write: Callable[[IO[bytes]], Any], temps: list[Path]) -> Path:
    """Write one temp file beside ``path`` (flushed, fsync'ed, with ``path``'s mode if it exists)."""
    fd, tmp = create_temp(path)
    temps.append(tmp)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    return tmp


def _backup(path: Path) -> Optional[Path]:
    """A hard link to the current ``path`` (to restore it if a later file of the set fails), or None."""
    if not path.exists():
        return None
    for _ in range(100):
        bak = path.parent / f".{path.name}.{secrets.token_hex(4)}.bak"
        try:
            os.link(path, bak)
            return bak
        except FileExistsError:
            continue
        except OSError:  # pragma: no cover - file systems without hard links: no rollback possible
            return None
    return None  # pragma: no cover


def atomic_write_all(items: list[tuple[Path, Callable[[IO[bytes]], Any]]]) -> list[Path]:
    """Write several files all-or-nothing: every temp file first, then ``os.replace`` them in order.

    A failure while writing removes every temp file and changes nothing. A failure
    while replacing (rare: the temp files are complete by then) puts back the
    files already replaced, from hard-link backups, or removes them if they are new.
    """
    paths = [Path(p) for p, _ in items]
    temps: list[Path] = []
    current = paths[0]
    try:
        for path, (_, write) in zip(paths, items):
            current = path
            _write_temp(path, write, temps)
    except BaseException as exc:
        for tmp in temps:
            _unlink_quietly(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, OutputError):
            raise _write_failed(current, exc) from exc
        raise
    done: list[tuple[Path, Optional[Path]]] = []  # (replaced path, backup of its previous content)
    backups: list[Path] = []
    try:
        for i, (path, tmp) in enumerate(zip(paths, temps)):
            current = path
            bak = _backup(path) if i < len(paths) - 1 else None
            if bak is not None:
                backups.append(bak)
            os.replace(tmp, path)
            done.append((path, bak))
    except BaseException as exc:
        for path, bak in reversed(done):
            try:
                if bak is not None:
                    os.replace(bak, path)
                else:
                    path.unlink()
            except OSError:  # pragma: no cover - best effort
                pass
        for leftover in temps + backups:
            if leftover.exists():
                _unlink_quietly(leftover)
        if isinstance(exc, Exception) and not isinstance(exc, OutputError):
            others = [str(p) for p in paths if p != current]
            err = _write_failed(current, exc)
            if others:
                err = OutputError(f"{err} {', '.join(others)} left as before.")
            raise err from exc
        raise
    for bak in backups:
        _unlink_quietly(bak)
    for directory in {p.parent for p in paths}:
        _fsync_dir(directory)
    return paths


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write one file atomically: ``write(f)`` fills a temp file that then replaces ``path``; return the path."""
    return atomic_write_all([(Path(path), write)])[0]


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``); return the path.

    Raises:
        OutputError: the write failed; no partial file is left and a previous file is unchanged.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x.json"
        >>> atomic_write_bytes(b"{}", p).read_text()
        '{}'
    """
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; return the path.

    Raises:
        OutputError: the save failed; no partial file is left and a previous file is unchanged.

    Example:
        >>> import tempfile
        >>> p = atomic_save({"w": torch.ones(2)}, Path(tempfile.mkdtemp()) / "sd.pt")
        >>> torch.load(p, weights_only=True)["w"]
        tensor([1., 1.])
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (an exporter).

    When the block ends normally the temp file is fsync'ed and ``os.replace``'d over
    ``path``; when it raises, the temp file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.bin"
        >>> with atomic_output(target) as tmp:
        ...     _ = tmp.write_bytes(b"ok")
        >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
        (b'ok', ['out.bin'])
    """
    path = Path(path)
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _unlink_quietly(tmp)
    _fsync_dir(path.parent)
