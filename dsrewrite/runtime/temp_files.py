# SPDX-License-Identifier: Apache-2.0
"""Our temporary files: recognisable names, removal on SIGTERM/SIGHUP, and removal of stale ones left by a kill.

A temp file for ``dir/NAME`` is ``dir/.NAME.dsrewrite-<pid>-<hex>.tmp`` (``.bak`` for a
hard-link backup): the writer's process id is in the name, so a later run to the same
path can tell a leftover of a dead process (SIGKILL, power loss: nothing can run then)
from one that another live writer is still filling, and removes only the former.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> fd, tmp = create_temp(d / "model.pt"); os.close(fd)
    >>> is_our_temp(tmp, d / "model.pt"), tmp.name.startswith(".model.pt.dsrewrite-")
    (True, True)
    >>> dead = d / ".model.pt.dsrewrite-999999999-0123abcd.tmp"; _ = dead.write_bytes(b"partial")
    >>> [p.name for p in remove_stale_temps(d / "model.pt")] == [dead.name], tmp.exists()  # ours is alive
    (True, True)
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, Optional

__all__ = ["create_temp", "temp_name", "is_our_temp", "remove_stale_temps", "removed_on_signals", "CLEANUP_SIGNALS"]

#: Signals after which the temp files of a write in progress are removed (then the signal does what it did before).
CLEANUP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

_TAG = "dsrewrite"


def temp_name(path: Path, suffix: str = "tmp") -> Path:
    """A fresh temp name beside ``path``: ``.NAME.dsrewrite-<pid>-<8 hex>.<suffix>``."""
    return path.parent / f".{path.name}.{_TAG}-{os.getpid()}-{secrets.token_hex(4)}.{suffix}"


def _pattern(path: Path) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(path.name)}\.{_TAG}-(\d+)-[0-9a-f]{{8}}\.(?:tmp|bak)")


def is_our_temp(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` is named like one of our temp or backup files for ``path``."""
    return candidate.parent == path.parent and _pattern(path).fullmatch(candidate.name) is not None


def create_temp(path: Path, suffix: str = "tmp") -> tuple[int, Path]:
    """Create (``O_EXCL``) and open a new temp file beside ``path``; return its fd and path."""
    for _ in range(100):
        tmp = temp_name(path, suffix)
        try:
            # mode 0o666 minus the umask, like open(path, "wb") would give
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove our temp/backup files for ``path`` whose writer process is gone; return what was removed.

    Only files named by :func:`temp_name` for this very ``path`` are considered, and only
    those whose process id no longer exists on this machine (a live writer's file is
    never touched; a reused pid keeps a stale file until that process ends).
    """
    pattern = _pattern(path)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent if str(path.parent) else ".")
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        stale = path.parent / name
        try:
            stale.unlink()
            removed.append(stale)
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def removed_on_signals(temps: list[Path]) -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP first remove the files listed in ``temps`` (the list as it is then).

    Then the signal does what it did before the block: the default action (the process
    ends by that signal, exit status -SIGNAL) or the previous Python handler is called.
    An ignored signal stays ignored and removes nothing. The handlers are installed only
    in the main thread (Python allows no other) and restored when the block ends.
    """
    if threading.current_thread() is not threading.main_thread() or not CLEANUP_SIGNALS:
        yield
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        before = previous.get(signum, signal.SIG_DFL)
        if before == signal.SIG_IGN:
            return
        if callable(before):  # the program's own handler decides; if it raises, the writer removes its temps
            before(signum, frame)
            return
        for tmp in list(temps):
            with contextlib.suppress(OSError):
                tmp.unlink()
        restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # the default action, as if we had not been here

    try:
        for sig in CLEANUP_SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)
        yield
    finally:
        restore()
