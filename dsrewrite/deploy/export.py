# SPDX-License-Identifier: Apache-2.0
"""Export a (rewritten) model to a runtime file, from its deployment form, checked against eager PyTorch.

:func:`export_model` builds the deployment form (:func:`~dsrewrite.deploy.prepare.prepare_for_deployment`:
eval copy, BN folded, pointwise stages hoisted above upsamples; NCHW at the file's interface, the
runtimes choose their own internal layout), exports it in a registered format (:data:`EXPORT_FORMATS`:
``onnx``, ``executorch``), runs the file in its runtime and keeps it only if it matches the original
model run eagerly: on the example input and, for a file with free axes (ONNX by default), on a second
shape (:func:`second_shape`: one more in the batch, 32 more in each spatial axis).

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     res = export_model(net, torch.randn(1, 3, 32, 32), os.path.join(d, "net.onnx"))
    >>> res.format, res.dynamic, res.checked_shapes, res.max_abs_diff <= res.tolerance
    ('onnx', True, ('1×3×32×32', '2×3×64×64'), True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import UsageError, did_you_mean
from ..runtime.registry import Registry
from ..runtime.run import describe_inputs, evaluating
from .executorch import export_executorch
from .executorch import _modules as _executorch_modules
from .onnx import DEFAULT_OPSET, export_onnx
from .parity import Inputs
from .parity import as_tuple as _as_tuple
from .prepare import prepare_for_deployment

__all__ = ["EXPORT_FORMATS", "ExportFormat", "ExportResult", "ExportFormatError", "export_format_for",
           "export_model", "second_shape", "register_export_format"]


class ExportFormatError(UsageError):
    """An unknown export format, or an output name whose suffix names none."""


@dataclass(frozen=True)
class ExportFormat:
    """A runtime file format: its name, file suffix, whether its files can have free axes, and its exporter.

    ``export(deployed, args, path, *, reference, dynamic, check_inputs, opset, rtol, atol)`` writes the
    file atomically and returns ``(exporter name, max_abs_diff, tolerance, checked shapes)``;
    ``require()`` raises a :class:`~dsrewrite.errors.UsageError` saying what to install when the
    runtime is missing (called before any work).
    """

    name: str
    suffix: str
    description: str
    dynamic: bool
    export: Callable[..., tuple[str, float, float, tuple[str, ...]]]
    require: Callable[[], Any] = lambda: None


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", unregister="EXPORT_FORMATS.remove")


def register_export_format(fmt: ExportFormat) -> ExportFormat:
    """Add a format to :data:`EXPORT_FORMATS` (``dsrewrite export --format NAME``)."""
    return EXPORT_FORMATS.add(fmt.name, fmt)


def _onnx(deployed: nn.Module, args: tuple[Tensor, ...], path: str, **kw: Any) -> tuple[str, float, float, tuple[str, ...]]:
    res = export_onnx(deployed, args, path, opset=kw["opset"] or DEFAULT_OPSET, dynamic=kw["dynamic"],
                      check_inputs=kw["check_inputs"], reference=kw["reference"], rtol=kw["rtol"], atol=kw["atol"])
    return (f"torch.onnx {res.exporter} exporter, opset {res.opset}", float(res.max_abs_diff or 0.0),
            float(res.tolerance or 0.0), res.checked_shapes)


def _executorch(deployed: nn.Module, args: tuple[Tensor, ...], path: str, **kw: Any) -> tuple[str, float, float, tuple[str, ...]]:
    res = export_executorch(deployed, args, path, reference=kw["reference"], rtol=kw["rtol"], atol=kw["atol"])
    return "torch.export → XNNPACK partitioner", res.max_abs_diff, res.tolerance, res.checked_shapes


register_export_format(ExportFormat("onnx", ".onnx", "ONNX, checked in ONNX Runtime (CPU)", True, _onnx))
register_export_format(ExportFormat("executorch", ".pte", "ExecuTorch program lowered to XNNPACK", False,
                                    _executorch, require=_executorch_modules))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote: the file, its format and exporter, and how close its runtime came.

    ``max_abs_diff ≤ tolerance`` held on every shape in ``checked_shapes`` (the largest values are
    given); ``note`` says what was not checked and why (e.g. a static file's second shape).
    """

    path: str
    format: str
    exporter: str
    dynamic: bool
    max_abs_diff: float
    tolerance: float
    checked_shapes: tuple[str, ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        axes = "dynamic batch and spatial axes" if self.dynamic else "static shape"
        text = (f"exported {self.path} ({self.format}, {self.exporter}, {axes}): max |runtime − PyTorch| = "
                f"{self.max_abs_diff:.3g} ≤ tolerance {self.tolerance:.3g} at {', '.join(self.checked_shapes)}")
        return f"{text}; {self.note}" if self.note else text


def export_format_for(path: Union[str, os.PathLike], fmt: Optional[str] = None) -> ExportFormat:
    """The format to write ``path`` in: ``fmt`` if given, else the one whose suffix ``path`` has.

    Raises:
        ExportFormatError: ``fmt`` is not registered, or ``path``'s suffix names no format.

    Example:
        >>> export_format_for("unet.pte").name, export_format_for("x.bin", "onnx").name
        ('executorch', 'onnx')
        >>> export_format_for("unet.onx")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.deploy.export.ExportFormatError: cannot tell the export format of 'unet.onx' from its suffix ...
    """
    names = list(EXPORT_FORMATS.keys())
    if fmt is not None:
        if fmt not in names:
            raise ExportFormatError(f"unknown export format {fmt!r}; choose from {', '.join(names)}"
                                    f"{did_you_mean(fmt, names)}.")
        return EXPORT_FORMATS.get(fmt)
    suffix = Path(path).suffix
    for entry in EXPORT_FORMATS.values():
        if entry.suffix == suffix:
            return entry
    known = ", ".join(f"{e.suffix} ({e.name})" for e in EXPORT_FORMATS.values())
    raise ExportFormatError(f"cannot tell the export format of {os.fspath(path)!r} from its suffix {suffix!r}: "
                            f"pass --format, or name the file {known}.")


def second_shape(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Inputs of another shape for checking a file with free axes: batch + 1 and each spatial axis + 32.

    Only image-like inputs (3-d or more) change (see :func:`~dsrewrite.deploy.onnx.dynamic_dims`);
    +32 keeps sizes divisible by the strides of common encoders. Seeded: the same inputs each call.

    Example:
        >>> [tuple(t.shape) for t in second_shape((torch.zeros(1, 3, 64, 64), torch.zeros(1)))]
        [(2, 3, 96, 96), (1,)]
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for a in args:
        if a.dim() < 3:
            out.append(a)
            continue
        shape = (a.shape[0] + 1, a.shape[1], *(n + 32 for n in a.shape[2:]))
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(a.dtype) if a.is_floating_point() \
            else a.new_zeros(shape)
        out.append(t.to(a.device))
    return tuple(out)


def export_model(
    model: nn.Module,
    example_inputs: Inputs,
    path: Union[str, os.PathLike],
    *,
    format: Optional[str] = None,
    dynamic: bool = True,
    opset: Optional[int] = None,
    deploy: bool = True,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> ExportResult:
    """Export ``model``'s deployment form to ``path`` in ``format`` and check it against ``model`` run eagerly.

    ``format``: a name in :data:`EXPORT_FORMATS` (``onnx``, ``executorch``), default from ``path``'s
    suffix (``.onnx``, ``.pte``). ``dynamic``: leave batch and spatial axes free where the format
    can (ONNX); the file is then also checked on :func:`second_shape` of the inputs. ``deploy=False``
    exports ``model`` as it is (eval mode) instead of its deployment form. The tolerance is dtype-aware
    (:func:`~dsrewrite.runtime.tolerance.parity_tolerance`). ``model`` is not changed.

    Raises:
        ExportFormatError: unknown format or suffix.
        ExecutorchMissingError: ``format='executorch'`` without ExecuTorch installed.
        OutputError: ``path``'s folder does not exist.
        ParityError: the deployment form or the file's runtime differs from eager beyond the tolerance
            (nothing is written).
        OnnxExportError, ExecutorchExportError: the exporter or the runtime failed.
    """
    fmt = export_format_for(path, format)
    fmt.require()
    args = _as_tuple(example_inputs)
    note = ""
    check_inputs: list[tuple[Tensor, ...]] = []
    dynamic = dynamic and fmt.dynamic
    if dynamic:
        more = second_shape(args)
        try:
            with torch.no_grad(), evaluating(model):
                model(*more)
            check_inputs.append(more)
        except Exception as exc:  # the model itself refuses the shape: nothing to compare with
            note = (f"second shape not checked: the model itself does not run at {describe_inputs(more)} "
                    f"({type(exc).__name__})")
    elif fmt.dynamic:
        note = "static shape as asked: no second shape checked"
    else:
        note = f"{fmt.name} files have the example's static shape: the second-shape check applies to ONNX only"
    deployed = prepare_for_deployment(model, args, channels_last=False, rtol=rtol, atol=atol) if deploy \
        else model
    exporter, diff, tol, shapes = fmt.export(deployed, args, os.fspath(path), reference=model, dynamic=dynamic,
                                             check_inputs=check_inputs, opset=opset, rtol=rtol, atol=atol)
    return ExportResult(os.path.abspath(os.fspath(path)), fmt.name, exporter, dynamic, diff, tol, shapes, note)

