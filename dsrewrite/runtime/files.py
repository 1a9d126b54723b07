# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a temp file beside the destination, flushed, fsync'ed, then moved into place.

A reader sees the old file or the new one, never a partial one; a failed write removes
its temporary file and leaves any previous file untouched; a failure names the real
cause (a full disk, another OS error, an object pickle cannot save) in one line.
The one copy of the atomic writer: saving a rewrite, reports, heal checkpoints and
ONNX files all go through it.

Temp files are named ``.NAME.dsrewrite-<pid>-<hex>.tmp`` (:mod:`.temp_files`); SIGTERM
and SIGHUP during a write remove them before the process ends, and a write to a path
first removes the stale ones a killed (SIGKILL) writer of that path left behind.
With ``overwrite=False`` the final step is an exclusive create (``os.link`` of the temp
file, or ``O_EXCL`` + copy where hard links are unsupported), so of two writers racing
for a new path exactly one succeeds and the other gets an :class:`OutputError`.

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
import shutil
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

import torch

from ..errors import OutputError
from .temp_files import create_temp, remove_stale_temps, removed_on_signals, temp_name

__all__ = ["atomic_output", "atomic_write", "atomic_write_all", "atomic_write_bytes", "atomic_save", "create_temp"]

PathLike = Union[str, "os.PathLike[str]"]


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
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return OutputError(f"could not write {path}: {exc.strerror} (over the file size limit, `ulimit -f`, or the "
                           f"file system's largest file). {kept}; raise the limit or choose another -o.")
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


class _RecordingFile:
    """A file object that remembers the first ``OSError`` its ``write`` raised, else behaves as the file.

    ``torch.save`` catches a failed write of its stream and raises ``RuntimeError("... unexpected
    pos ...")`` instead, losing the cause (ENOSPC, EFBIG); the writer re-raises the recorded one.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _write_temp(path: Path, write: Callable[[IO[bytes]], Any], *registers: list[Path]) -> Path:
    """Write one temp file beside ``path`` (flushed, fsync'ed, with ``path``'s mode if it exists).

    The temp path is appended to each list of ``registers`` as soon as it exists.
    """
    fd, tmp = create_temp(path)
    for register in registers:
        register.append(tmp)
    with os.fdopen(fd, "wb") as f:
        rec = _RecordingFile(f)
        try:
            write(rec)  # type: ignore[arg-type]
            f.flush()
        except Exception as exc:
            if rec.error is not None and not isinstance(exc, OSError):
                raise rec.error from exc  # torch.save's "unexpected pos" hides the write's ENOSPC/EFBIG
            raise
        os.fsync(f.fileno())
    if path.exists():
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    return tmp


def _backup(path: Path) -> Optional[Path]:
    """A hard link to the current ``path`` (to restore it if a later file of the set fails), or None."""
    if not path.exists():
        return None
    for _ in range(100):
        bak = temp_name(path, "bak")
        try:
            os.link(path, bak)
            return bak
        except FileExistsError:
            continue
        except OSError:  # pragma: no cover - file systems without hard links: no rollback possible
            return None
    return None  # pragma: no cover


#: ``os.link`` failures that mean "this file system has no hard links here": fall back to O_EXCL + copy.
_NO_LINK = {errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOSYS, errno.EXDEV,
            getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}


def _create_exclusive(tmp: Path, path: Path) -> None:
    """Move the complete ``tmp`` to ``path`` only if ``path`` does not exist (``FileExistsError`` otherwise).

    ``os.link`` is atomic and exclusive; where hard links are unsupported, ``path`` is
    created with ``O_EXCL`` and the bytes copied (exclusive, though a reader may then
    see it grow). ``tmp`` is removed either way once ``path`` is complete.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(tmp.stat().st_mode))
        try:
            with os.fdopen(fd, "wb") as dst, open(tmp, "rb") as src:
                shutil.copyfileobj(src, dst, 2**20)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            _unlink_quietly(path)
            raise
    tmp.unlink()


def _exists_error(path: Path) -> OutputError:
    return OutputError(f"output {path} already exists (another process wrote it while this one worked): "
                       "nothing was written; pass --force to overwrite it, or choose another -o.")


def atomic_write_all(items: list[tuple[Path, Callable[[IO[bytes]], Any]]], *, overwrite: bool = True) -> list[Path]:
    """Write several files all-or-nothing: every temp file first, then move them into place in order.

    A failure while writing removes every temp file and changes nothing. A failure
    while moving (rare: the temp files are complete by then) puts back the files
    already replaced, from hard-link backups, or removes them if they are new.
    ``overwrite=False``: each file is placed by an exclusive create (:func:`_create_exclusive`);
    if one exists by then (another writer), the files placed so far are removed and an
    :class:`OutputError` says so. SIGTERM/SIGHUP during the call remove the temp files
    (and, before the last file is in place, the new files already placed).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "b").write_bytes(b"old")
        >>> atomic_write_all([(d / "a", lambda f: f.write(b"A")), (d / "b", lambda f: f.write(b"B"))],
        ...                  overwrite=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.OutputError: output .../b already exists (another process wrote it while this one worked): ...
        >>> sorted(p.name for p in d.iterdir()), (d / "b").read_bytes()  # a was placed, then removed again
        (['b'], b'old')
    """
    paths = [Path(p) for p, _ in items]
    for path in paths:
        remove_stale_temps(path)
    cleanup: list[Path] = []  # what a SIGTERM/SIGHUP removes: temps, backups, new files placed so far
    with removed_on_signals(cleanup):
        temps = _write_all_temps(paths, items, cleanup)
        _place_all(paths, temps, cleanup, overwrite)
    for directory in {p.parent for p in paths}:
        _fsync_dir(directory)
    return paths


def _write_all_temps(paths: list[Path], items: list[tuple[Path, Callable[[IO[bytes]], Any]]],
                     cleanup: list[Path]) -> list[Path]:
    temps: list[Path] = []
    current = paths[0]
    try:
        for path, (_, write) in zip(paths, items):
            current = path
            _write_temp(path, write, temps, cleanup)
    except BaseException as exc:
        for tmp in temps:
            _unlink_quietly(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, OutputError):
            raise _write_failed(current, exc) from exc
        raise
    return temps


def _place_all(paths: list[Path], temps: list[Path], cleanup: list[Path], overwrite: bool) -> None:
    done: list[tuple[Path, Optional[Path]]] = []  # (placed path, backup of its previous content or None if new)
    backups: list[Path] = []
    current = paths[0]
    try:
        for i, (path, tmp) in enumerate(zip(paths, temps)):
            current = path
            if overwrite:
                existed = path.exists() or path.is_symlink()
                bak = _backup(path) if i < len(paths) - 1 else None
                if bak is not None:
                    backups.append(bak)
                    cleanup.append(bak)
                os.replace(tmp, path)
                if not existed:
                    cleanup.append(path)
                done.append((path, bak))
            else:
                _create_exclusive(tmp, path)
                cleanup.append(path)
                done.append((path, None))
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
        if isinstance(exc, FileExistsError) and not overwrite:
            raise _exists_error(current) from exc
        if isinstance(exc, Exception) and not isinstance(exc, OutputError):
            others = [str(p) for p in paths if p != current]
            err = _write_failed(current, exc)
            if others:
                err = OutputError(f"{err} {', '.join(others)} left as before.")
            raise err from exc
        raise
    finally:
        cleanup.clear()  # past this point nothing of ours is left to remove
    for bak in backups:
        _unlink_quietly(bak)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any], *, overwrite: bool = True) -> Path:
    """Write one file atomically: ``write(f)`` fills a temp file that then becomes ``path``; return the path.

    ``overwrite=False``: an existing ``path`` (even one created meanwhile by another
    process) is never replaced; :class:`OutputError` instead.
    """
    return atomic_write_all([(Path(path), write)], overwrite=overwrite)[0]


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


def atomic_save(obj: Any, path: PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save(obj, path)`` atomically; return the path (``overwrite``: as in :func:`atomic_write`).

    Raises:
        OutputError: the save failed; no partial file is left and a previous file is unchanged.

    Example:
        >>> import tempfile
        >>> p = atomic_save({"w": torch.ones(2)}, Path(tempfile.mkdtemp()) / "sd.pt")
        >>> torch.load(p, weights_only=True)["w"]
        tensor([1., 1.])
    """
    return atomic_write(path, lambda f: torch.save(obj, f), overwrite=overwrite)


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
    remove_stale_temps(path)
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        with removed_on_signals([tmp]):
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
