# SPDX-License-Identifier: Apache-2.0
"""ExecuTorch export with a parity check: ``torch.export`` → XNNPACK partitioner → ``.pte``, run by its runtime.

ExecuTorch is the PyTorch runtime for phones and edge boards; its XNNPACK backend runs
convolutions (depthwise ones included) in NHWC on ARM and x86 CPUs. It is an optional
dependency (the ``edge`` extra, see :data:`INSTALL_HINT`): ``executorch`` and ``torchao``
must be installed with ``pip install --no-deps``, or pip replaces the project's torch with
the one they pin.

The file has the example input's shape (a static program): the check runs it once, on the
example input; other shapes are the ONNX path's (:func:`~dsrewrite.deploy.onnx.export_onnx`).

Example (runs where the extra is installed)::

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> if executorch_available():
    ...     with tempfile.TemporaryDirectory() as d:
    ...         res = export_executorch(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16), os.path.join(d, "c.pte"))
    ...         ok = res.max_abs_diff <= res.tolerance
    ... else:
    ...     ok = True
    >>> ok
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import IO, Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import OutputError, RewriteError, UsageError
from ..runtime.files import atomic_output
from ..runtime.run import evaluating
from ..runtime.tolerance import parity_tolerance
from .parity import Inputs, ParityError
from .parity import as_tuple as _as_tuple
from .parity import flat_outputs as _flat_outputs
from .parity import max_abs_diff as _max_abs_diff

__all__ = ["INSTALL_HINT", "ExecutorchExportError", "ExecutorchMissingError", "ExecutorchResult",
           "executorch_available", "export_executorch"]

#: What to install for :func:`export_executorch` (the ``edge`` extra's packages; executorch and torchao
#: with ``--no-deps`` so that pip keeps the installed torch).
INSTALL_HINT = ("pip install ruamel.yaml tabulate flatbuffers && "
                "pip install --no-deps 'executorch>=1.5' 'torchao>=0.18'")


class ExecutorchMissingError(UsageError):
    """ExecuTorch (the ``edge`` extra) is not installed."""


class ExecutorchExportError(RewriteError):
    """``torch.export``, the XNNPACK lowering or the ExecuTorch runtime failed on the model."""


@dataclass(frozen=True)
class ExecutorchResult:
    """What :func:`export_executorch` wrote and how close the ExecuTorch runtime came to eager.

    The file has a static shape (the example input's). The check passes when ``max_abs_diff ≤
    tolerance = atol + rtol · max|eager output|`` on the example input (``checked_shapes``).
    """

    path: str
    backend: str
    max_abs_diff: float
    tolerance: float
    max_abs_output: float
    checked_shapes: tuple[str, ...]

    def __str__(self) -> str:
        return (f"ExecuTorch {self.path} ({self.backend} backend, static shape {', '.join(self.checked_shapes)}): "
                f"max |ExecuTorch − eager| = {self.max_abs_diff:.3g} ≤ tolerance {self.tolerance:.3g}")


def executorch_available() -> bool:
    """Whether ExecuTorch, its XNNPACK backend and its runtime bindings import.

    Example:
        >>> executorch_available() in (True, False)
        True
    """
    try:
        _modules()
    except ExecutorchMissingError:
        return False
    return True


@contextlib.contextmanager
def _native_stderr_to(sink: "IO[bytes]") -> Iterator[None]:
    """Send what native code writes to file descriptor 2 (ExecuTorch's runtime logs its CPU probing there)
    into ``sink`` for the duration; Python's own ``sys.stderr`` is untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _modules() -> tuple[Any, Any, Any]:
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    try:
        pytree_log.setLevel(logging.ERROR)  # torchao registers an Enum the way torch now deprecates
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except Exception as exc:  # ImportError, or a broken install (a missing dependency of executorch)
        raise ExecutorchMissingError(
            f"ExecuTorch export needs the 'edge' extra ({type(exc).__name__}: {exc}); install it with: {INSTALL_HINT}"
        ) from None
    finally:
        pytree_log.setLevel(level)
    return to_edge_transform_and_lower, XnnpackPartitioner, Runtime


class _SizeOneChannelsSafe(nn.Module):
    """Returns each 4-d output with one channel through a reshape.

    XNNPACK computes in NHWC; for an output of shape N×1×H×W the NHWC and NCHW orders hold the
    same bytes and ExecuTorch 1.5's XNNPACK executor then resizes the output to N×H×1×W
    (found on smp's one-class Unet: a refused resize, or a wrong shape). A reshape after it
    gives the output back to ExecuTorch's own kernels, which keep the NCHW shape.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor) -> Any:
        return _fix(self.model(*args))


def _fix(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.reshape(-1).reshape(out.shape) if out.dim() == 4 and out.shape[1] == 1 else out
    if isinstance(out, dict):
        return {k: _fix(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_fix(v) for v in out)
    return out


def _lower(model: nn.Module, args: tuple[Tensor, ...]) -> bytes:
    to_edge_transform_and_lower, partitioner, _ = _modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_SizeOneChannelsSafe(model), args)
        lowered = to_edge_transform_and_lower(program, partitioner=[partitioner()])
        return bytes(lowered.to_executorch().buffer)


def _run(path: str, args: tuple[Tensor, ...]) -> list[Tensor]:
    """Run the program's ``forward`` on ``args``; the runtime's own log lines end up in the error, if any."""
    _, _, runtime = _modules()
    with tempfile.TemporaryFile() as log:
        try:
            with _native_stderr_to(log):
                method = runtime.get().load_program(path).load_method("forward")
                outs = method.execute([a.detach().cpu().contiguous() for a in args])
        except Exception as exc:
            log.seek(0)
            lines = [ln for ln in log.read().decode("utf-8", "replace").splitlines() if "cpuinfo" not in ln]
            raise RuntimeError(f"{exc}" + (f" (runtime log: {lines[-1].strip()})" if lines else "")) from exc
    return [t for t in outs if isinstance(t, Tensor)]


def export_executorch(
    model: nn.Module,
    example_input: Inputs,
    path: Union[str, os.PathLike],
    *,
    reference: Optional[nn.Module] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> ExecutorchResult:
    """Export ``model`` (in eval mode) to an ExecuTorch ``.pte`` file lowered to XNNPACK, and check it.

    ``torch.export.export`` at the example input's shape (static), then
    ``executorch.exir.to_edge_transform_and_lower`` with the ``XnnpackPartitioner``, then
    ``to_executorch()``. The file is written to a temporary file beside ``path`` (mode 0666
    minus the umask) and kept only if ExecuTorch's runtime (``executorch.runtime.Runtime``) runs
    it on ``example_input`` and every output matches ``reference`` (default: ``model``) run
    eagerly within ``atol + rtol · max|eager|`` (dtype defaults of :func:`parity_tolerance`),
    outputs paired in the model's order. The caller's model is not changed.

    Raises:
        ExecutorchMissingError: ExecuTorch is not installed (the message says what to install).
        OutputError: ``path``'s folder does not exist.
        ExecutorchExportError: export, lowering or the runtime failed.
        ParityError: the runtime's output is further from eager than the tolerance.
    """
    _modules()  # a missing extra is reported before any work
    args = _as_tuple(example_input)
    reference = model if reference is None else reference
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path!r}: folder {folder!r} does not exist. Hint: create it first.")
    name = type(model).__name__
    with atomic_output(path) as tmp_path:
        with torch.no_grad(), evaluating(model):
            try:
                data = _lower(model, args)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ExecutorchExportError(
                    f"ExecuTorch export of {name} failed: {type(exc).__name__}: {first}. Hint: export to ONNX "
                    "instead (--format onnx), or rerun with --debug for the traceback."
                ) from exc
        tmp_path.write_bytes(data)
        with torch.no_grad(), evaluating(reference):
            ref = _flat_outputs(reference(*args), "the model")
        try:
            got = _run(str(tmp_path), args)
        except Exception as exc:
            raise ExecutorchExportError(
                f"the ExecuTorch runtime cannot run the exported {name}: {type(exc).__name__}: {exc}; "
                f"{path!r} was not written."
            ) from exc
        shape = ", ".join("×".join(str(n) for n in a.shape) for a in args)
        diff, scale = _max_abs_diff(got, ref, f"ExecuTorch export of {name}")
        tol = max(parity_tolerance(r, rtol=rtol, atol=atol) for r in ref)
        if not diff <= tol:
            raise ParityError(
                f"the ExecuTorch runtime's output for {name} at {shape} differs from eager by max |Δ| = {diff:.3g} "
                f"> tolerance {tol:.3g} (max |eager| = {scale:.3g}); {path!r} was not written."
            )
    return ExecutorchResult(path, "XNNPACK", diff, tol, scale, (shape,))
