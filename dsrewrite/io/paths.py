# SPDX-License-Identifier: Apache-2.0
"""Output paths: which may be written (checked before any work), the default name, the plan sidecar.

Example:
    >>> default_output_path("runs/unet.pth"), plan_path_for("runs/unet.ds.pth")
    (PosixPath('runs/unet.ds.pth'), PosixPath('runs/unet.ds.plan.json'))
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import OutputError
from ..runtime.files import PathLike, create_temp

__all__ = ["check_output_path", "default_output_path", "plan_path_for"]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: PathLike, *, input_path: Optional[PathLike] = None, force: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written; return it as a ``Path``.

    Refused, each with an :class:`~dsrewrite.errors.OutputError`: the input file
    itself (symlinks and hard links resolved; even with ``force``), a directory,
    an existing file without ``force``, a missing parent directory, and a
    directory where no file can be created (probed by creating and removing a
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
        raise OutputError(f"output {out} is the input model file; it is never overwritten: choose another -o.")
    if out.is_dir():
        raise OutputError(f"output {out} is a directory; pass a file path to -o (e.g. {out / 'model.ds.pt'}).")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"output {out} already exists: pass --force to overwrite it, or choose another -o.")
    parent = out.absolute().parent
    if not parent.exists():
        raise OutputError(f"output directory {parent} does not exist: create it, or choose another -o.")
    if not parent.is_dir():
        raise OutputError(f"output {out}: {parent} is not a directory; choose another -o.")
    try:
        fd, tmp = create_temp(parent / out.name)
        os.close(fd)
        tmp.unlink()
    except OSError as exc:
        raise OutputError(
            f"output directory {parent} is not writable ({type(exc).__name__}: {exc.strerror or exc}): "
            "choose another -o."
        ) from exc
    return out


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
    is_file_like = isinstance(input_spec, os.PathLike) or p.exists() or "/" in text or os.sep in text \
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
