# SPDX-License-Identifier: Apache-2.0
"""Output paths: which may be written (checked before any work), the default name, the plan sidecar.

Example:
    >>> default_output_path("runs/unet.pth"), plan_path_for("runs/unet.ds.pth")
    (PosixPath('runs/unet.ds.pth'), PosixPath('runs/unet.ds.plan.json'))
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Collection, Mapping, Optional

from ..errors import OutputError
from ..runtime.files import PathLike
from ..runtime.input_files import path_exists
from ..runtime.temp_files import create_temp

__all__ = ["check_output_path", "check_outputs", "default_output_path", "plan_path_for"]


def _same_file(a: Path, b: Path) -> bool:
    """Same file: equal resolved paths (symlinks followed), or equal (st_dev, st_ino) (hard links)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: compared by inode below, if both exist
        pass
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path) -> Optional[str]:
    """What ``path`` is if it exists (symlinks followed) and is not a regular file, else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def check_output_path(output: PathLike, *, input_path: Optional[PathLike] = None, force: bool = False,
                      option: str = "-o") -> Path:
    """Refuse an output path that cannot or must not be written; return it as a ``Path``.

    Refused, each with an :class:`~dsrewrite.errors.OutputError`: the input file
    itself (symlinks and hard links resolved; even with ``force``), a directory, a
    device node, FIFO or socket (even with ``force``), an existing file without
    ``force``, a missing parent directory, and a directory where no file can be created (probed by creating and removing a
    temporary file, so it is right for root and read-only mounts too).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "m.pt").write_bytes(b"x") and None
        >>> check_output_path(d / "m.pt", input_path=d / "m.pt", force=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.OutputError: output ... is the input model file; it is never overwritten: choose another -o.
        >>> check_output_path(d / "new.pt").name
        'new.pt'
    """
    out = Path(output)
    if input_path is not None and _same_file(out, Path(input_path)):
        raise OutputError(f"output {out} is the input model file; it is never overwritten: choose another {option}.")
    what = _not_regular(out)
    if what == "a directory":
        raise OutputError(f"output {out} is a directory; pass a file path to {option} (e.g. {out / 'model.ds.pt'}).")
    if what is not None:
        raise OutputError(f"output {out} is {what}, not a regular file; it is never replaced, even with --force: "
                          f"choose another {option}.")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"output {out} already exists: pass --force to overwrite it, or choose another {option}.")
    parent = out.absolute().parent
    if not parent.exists():
        raise OutputError(f"output directory {parent} does not exist: create it, or choose another {option}.")
    if not parent.is_dir():
        raise OutputError(f"output {out}: {parent} is not a directory; choose another {option}.")
    try:
        fd, tmp = create_temp(parent / out.name)
        os.close(fd)
        tmp.unlink()
    except OSError as exc:
        raise OutputError(
            f"output directory {parent} is not writable ({type(exc).__name__}: {exc.strerror or exc}): "
            f"choose another {option}."
        ) from exc
    return out


def check_outputs(outputs: Mapping[str, Optional[PathLike]], *, inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
                  force: bool = False, replaceable: Collection[str] = ()) -> dict[str, Path]:
    """Check every output path of one command together, before any work; return them as ``Path`` s.

    ``outputs`` maps a label (how the user named it: ``"-o"``, ``"--report"``, ``"the plan
    sidecar"``) to a path (``None``: not requested); ``inputs`` likewise for files the command
    reads. Each output must pass :func:`check_output_path` (a regular file or new, parent
    writable, existing only with ``force``; those labelled in ``replaceable`` may always be
    replaced); no output may be the same file as an input or as another output (resolved
    paths, symlinks, hard links by ``st_dev``/``st_ino``).

    Raises:
        OutputError: the first problem found, naming both labels and paths where two collide.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "m.pt").write_bytes(b"x") and None
        >>> check_outputs({"-o": d / "o.pt", "--report": d / "o.pt"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.OutputError: --report .../o.pt is the same file as -o .../o.pt: each output needs its own file; ...
        >>> sorted(check_outputs({"-o": d / "o.pt", "--report": None}, inputs={"MODEL": d / "m.pt"}))
        ['-o']
    """
    outs = {label: Path(p) for label, p in outputs.items() if p is not None}
    ins = {label: Path(p) for label, p in (inputs or {}).items() if p is not None}
    for label, out in outs.items():
        for in_label, inp in ins.items():
            if _same_file(out, inp):
                raise OutputError(f"{label} {out} is the same file as the input {in_label} {inp}; an input is never "
                                  f"overwritten: choose another {label}.")
    seen: list[tuple[str, Path]] = []
    for label, out in outs.items():
        for other_label, other in seen:
            if _same_file(out, other):
                raise OutputError(f"{label} {out} is the same file as {other_label} {other}: each output needs its "
                                  f"own file; choose another {label}.")
        seen.append((label, out))
    for label, out in outs.items():
        try:
            check_output_path(out, force=force or label in replaceable,
                              option=label if label.startswith("-") else "-o")
        except OutputError as exc:
            raise OutputError(str(exc) if label == "-o" else f"{label}: {exc}") from None
    return outs


_KEEP_SUFFIXES = (".pt", ".pth")


def default_output_path(input_spec: PathLike) -> Path:
    """Where ``apply`` writes by default: ``model.pt`` → ``model.ds.pt`` beside it; specs → ``./<name>.ds.pt``.

    A spec that is not an existing file and looks like ``demo`` or an arch spec
    (``timm:resnet18``) is sanitised into a file name in the current directory.

    Example:
        >>> default_output_path("runs/unet.pth")
        PosixPath('runs/unet.ds.pth')
        >>> default_output_path("demo")
        PosixPath('demo.ds.pt')
    """
    text = os.fspath(input_spec)
    p = Path(text)
    is_file_like = isinstance(input_spec, os.PathLike) or path_exists(p) or "/" in text or os.sep in text \
        or (p.suffix in _KEEP_SUFFIXES + (".bin", ".ckpt", ".safetensors", ".tar", ".pkl") and ":" not in text)
    if is_file_like:
        suffix = p.suffix if p.suffix in _KEEP_SUFFIXES else ".pt"
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        return p.with_name(f"{stem}.ds{suffix}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "model"
    return Path(f"{name}.ds.pt")


def plan_path_for(weights_path: PathLike) -> Path:
    """The plan sidecar of a rewritten model file: ``out.pt`` → ``out.plan.json``.

    Example:
        >>> plan_path_for("runs/unet.ds.pt")
        PosixPath('runs/unet.ds.plan.json')
    """
    return Path(weights_path).with_suffix(".plan.json")
