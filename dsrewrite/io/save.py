"""Atomic saving, output-path checks, and the rewritten model + plan sidecar round trip.

Every write goes to a temporary file in the destination's directory, is flushed
and fsync'ed, then ``os.replace``'d over the destination: a reader sees the old
file or the new one, never a partial one, and a failed write removes its
temporary file and leaves any previous file untouched.

``save_rewrite`` writes two files: the rewritten full module (``torch.save``) at
``out.pt`` and the plan as JSON at ``out.plan.json`` (which records the arch spec
and its arguments when the model was built from one). ``load_rewrite`` rebuilds
the rewrite on a fresh instance of the architecture (given, or built from the
plan's arch spec) from the plan and loads the weights from either file kind: a
state-dict file (read with ``weights_only=True``) or the full-module ``out.pt`` itself (read by the safe loader, of which
only the ``state_dict()`` is used).

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(b"hello", d / "a.txt").read_bytes()
    b'hello'
    >>> default_output_path("timm:resnet18")
    PosixPath('timm_resnet18.ds.pt')
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
import shutil
import secrets
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn

from ..errors import ModelLoadError, OutputError, did_you_mean
from ..plan_types import Plan

if TYPE_CHECKING:
    from .arch import ArchSpec

__all__ = [
    "atomic_write_bytes",
    "atomic_save",
    "check_output_path",
    "default_output_path",
    "plan_path_for",
    "save_rewrite",
    "load_rewrite",
]

PathLike = Union[str, "os.PathLike[str]"]
#: What :func:`save_rewrite` can write: the full module (torch.save) or the weights as safetensors.
SAVE_FORMATS: tuple[str, ...] = ("torch", "safetensors")


def _create_temp(path: Path) -> tuple[int, Path]:
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
    fd, tmp = _create_temp(path)
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


def _atomic_write_all(items: list[tuple[Path, Callable[[IO[bytes]], Any]]]) -> list[Path]:
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


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    return _atomic_write_all([(Path(path), write)])[0]


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
    return _atomic_write(path, lambda f: f.write(data))


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
    return _atomic_write(path, lambda f: torch.save(obj, f))


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
        fd, tmp = _create_temp(parent / out.name)
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


def save_rewrite(
    model: nn.Module,
    plan: Plan,
    path: PathLike,
    *,
    force: bool = False,
    input_path: Optional[PathLike] = None,
    save_format: str = "torch",
    arch: Optional["ArchSpec"] = None,
) -> tuple[Path, Path]:
    """Write the rewritten model to ``path`` and the plan JSON beside it; return both paths.

    ``save_format="torch"`` writes the full module (``torch.save(model)``);
    ``"safetensors"`` writes its state dict as a ``.safetensors`` file (tensors only, no
    pickle; shared tensors are stored once each), which :func:`load_rewrite` and
    ``load_model(path, arch=...)`` read back with the plan.

    ``arch`` (the :class:`~dsrewrite.io.arch.ArchSpec` the model was built from,
    ``LoadedModel.arch``) is recorded in the plan as ``arch`` and ``arch_args``,
    so that :func:`load_rewrite` can rebuild the same architecture.

    Both paths are checked (:func:`check_output_path`) before anything is
    written, and the pair is written all-or-nothing: both temp files are written
    and fsync'ed before either replaces its destination, so a failure (disk full)
    leaves no new file, no temp file, and any previous files unchanged. Reload with :func:`dsrewrite.io.load_model`
    (full module) or :func:`load_rewrite` (fresh architecture + plan + weights).

    Example:
        >>> import tempfile
        >>> from dsrewrite.plan_types import Plan
        >>> w, p = save_rewrite(nn.Linear(2, 2), Plan((), "decoder_only", "fx"), Path(tempfile.mkdtemp()) / "o.pt")
        >>> w.name, p.name
        ('o.pt', 'o.plan.json')
    """
    weights = Path(path)
    plan_file = plan_path_for(weights)
    if save_format not in SAVE_FORMATS:
        raise OutputError(f"unknown save format {save_format!r}{did_you_mean(save_format, SAVE_FORMATS)}; "
                          f"choose one of {', '.join(SAVE_FORMATS)}.")
    if save_format == "safetensors" and weights.suffix != ".safetensors":
        raise OutputError(f"{weights}: a safetensors file needs the .safetensors suffix (the loader reads the "
                          "format from it).")
    check_output_path(weights, input_path=input_path, force=force)
    check_output_path(plan_file, input_path=input_path, force=force)
    if arch is not None:
        plan = dataclasses.replace(plan, arch=arch.spec, arch_args=arch.kwargs)
    data = plan.to_json().encode("utf-8")
    if save_format == "safetensors":
        blob = _safetensors_bytes(model)
        write_weights: Callable[[IO[bytes]], Any] = lambda f: f.write(blob)  # noqa: E731
    else:
        write_weights = lambda f: torch.save(model, f)  # noqa: E731
    _atomic_write_all([(weights, write_weights), (plan_file, lambda f: f.write(data))])
    return weights, plan_file


def _safetensors_bytes(model: nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (contiguous CPU copies; tied tensors each stored)."""
    import safetensors.torch

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return safetensors.torch.save(tensors, metadata={"format": "pt", "producer": "dsrewrite"})


def load_rewrite(fresh_model: Optional[nn.Module], plan_path: PathLike, weights_path: PathLike, *,
                 trust_arch: bool = False) -> nn.Module:
    """Rebuild a saved rewrite: apply the plan to a copy of ``fresh_model``, then load the weights.

    With ``fresh_model=None`` the architecture is built from the arch spec and
    arguments the plan records (random weights, never a download). A
    ``package.module:factory`` spec imports and runs code named by the plan file,
    so it is refused unless ``trust_arch=True``; library specs (``timm:``,
    ``torchvision:``, ``smp:``, ``demo``) are always admitted, their arguments
    checked as on the command line. ``weights_path`` may be a state-dict file (``torch.save(model.state_dict())``,
    read with ``weights_only=True``) or the full-module file written by
    :func:`save_rewrite` (read by the safe loader; only its
    ``state_dict()`` is used). ``fresh_model`` is not modified.

    Raises:
        ModelLoadError: a file is missing or unreadable, the weights do not fit, or
            ``fresh_model`` is None and the plan records no (admissible) arch spec.
        PlanError: the plan is not valid or does not fit ``fresh_model``.

    Example:
        >>> import tempfile
        >>> from dsrewrite.plan_types import Plan
        >>> d = Path(tempfile.mkdtemp()); m = nn.Linear(2, 2)
        >>> w, p = save_rewrite(m, Plan((), "decoder_only", "fx"), d / "o.pt")
        >>> torch.equal(load_rewrite(nn.Linear(2, 2), p, w).weight, m.weight)
        True
        >>> from dsrewrite.io import build_arch
        >>> from dsrewrite.io.arch import arch_spec
        >>> a = arch_spec("timm:resnet18", {"num_classes": 7})
        >>> w, p = save_rewrite(build_arch(a), Plan((), "all_3x3", "fx"), d / "r18.pt", arch=a)
        >>> load_rewrite(None, p, w).fc.out_features  # rebuilt from the plan's arch and arch_args
        7
    """
    from ..apply import apply_plan
    from .load import extract_state_dict, fit_state_dict, read_torch_file, unwrap_parallel

    plan_path = Path(plan_path)
    try:
        text = plan_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"cannot read plan file {plan_path}: {exc.strerror or exc}. Pass the .plan.json "
                             "written next to the rewritten model.") from exc
    plan = Plan.from_json(text, source=str(plan_path))
    if fresh_model is None:
        fresh_model = _build_recorded_arch(plan, plan_path, trust_arch=trust_arch)
    model = apply_plan(fresh_model, plan, inplace=False, init="random")
    obj, _how = read_torch_file(weights_path)
    if isinstance(obj, nn.Module):
        sd = unwrap_parallel(obj)[0].state_dict()
    else:
        sd, _where = extract_state_dict(obj, source=str(weights_path))
    fit_state_dict(model, sd, source=str(weights_path), arch=f"{type(fresh_model).__name__} + plan {plan_path.name}")
    return model


def _build_recorded_arch(plan: Plan, plan_path: Path, *, trust_arch: bool) -> nn.Module:
    """The fresh architecture a plan records (``arch``, ``arch_args``), built with random weights."""
    from .arch import arch_spec, build_arch

    if plan.arch is None:
        raise ModelLoadError(
            f"{plan_path} records no arch spec (the model came from a full-module file, or the plan is from an "
            "older dsrewrite): pass a fresh instance of the architecture as fresh_model."
        )
    try:
        spec = arch_spec(plan.arch, plan.arch_args)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{plan_path}: {exc}") from None
    if spec.library == "factory" and not trust_arch:
        raise ModelLoadError(
            f"{plan_path} names the factory {spec}; a plan file never makes dsrewrite import and run code: "
            "pass trust_arch=True if you trust it, or build the model and pass it as fresh_model."
        )
    return build_arch(spec)
