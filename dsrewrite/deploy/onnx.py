# SPDX-License-Identifier: Apache-2.0
"""ONNX export with a parity check: ``torch.onnx.export``, then ONNX Runtime (CPU) against eager.

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> with tempfile.TemporaryDirectory() as d:
    ...     res = export_onnx(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), os.path.join(d, "c.onnx"))
    ...     res.checked
    True
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import OutputError, RewriteError
from ..runtime.files import atomic_output
from ..runtime.run import evaluating
from ..runtime.tolerance import parity_tolerance
from .parity import DeployInputError, Inputs, ParityError
from .parity import as_tuple as _as_tuple
from .parity import flat_outputs as _flat_outputs
from .parity import max_abs_diff as _max_abs_diff

__all__ = ["DEFAULT_OPSET", "OnnxExportError", "OnnxResult", "dynamic_dims", "export_onnx"]

#: Opset used by :func:`export_onnx` unless told otherwise (18: the lowest the dynamo exporter writes
#: without converting down; ONNX Runtime ≥ 1.14 runs it).
DEFAULT_OPSET = 18


class OnnxExportError(RewriteError):
    """``torch.onnx.export`` failed with every exporter tried, or ONNX Runtime cannot run the file."""


@dataclass(frozen=True)
class OnnxResult:
    """What :func:`export_onnx` wrote and how close ONNX Runtime came to eager.

    ``opset`` is the one the file declares; ``exporter`` the one that wrote it (``dynamo`` or
    ``torchscript``); ``dynamic`` whether batch and spatial axes were left free. ``max_abs_diff``/``tolerance``
    are ``None`` when the check was not run; the check passes when ``max_abs_diff ≤ tolerance =
    atol + rtol · max|eager output|`` on every input checked (``checked_shapes``, e.g. ``('1×3×64×64',
    '2×3×96×96')``); the numbers are the largest over them.
    """

    path: str
    opset: int
    exporter: str
    checked: bool
    max_abs_diff: Optional[float]
    tolerance: Optional[float]
    max_abs_output: Optional[float]
    provider: Optional[str]
    dynamic: bool = False
    checked_shapes: tuple[str, ...] = ()

    def __str__(self) -> str:
        axes = "dynamic batch/spatial axes" if self.dynamic else "static shape"
        head = f"ONNX {self.path} (opset {self.opset}, {self.exporter} exporter, {axes})"
        if not self.checked:
            return f"{head}: not checked"
        return (f"{head}: max |ORT − eager| = {self.max_abs_diff:.3g} ≤ tolerance {self.tolerance:.3g} "
                f"at {', '.join(self.checked_shapes)} ({self.provider})")


def dynamic_dims(args: tuple[Tensor, ...]) -> tuple[Optional[dict[int, str]], ...]:
    """Which axes of each input are left free in a dynamic export: ``{axis: name}`` or ``None`` (all fixed).

    Image-like inputs (3-d or more) get a free batch axis (0) and free spatial axes (2, 3, ...);
    inputs of fewer dimensions (a timestep, a class label) keep their example shape.

    Example:
        >>> dynamic_dims((torch.zeros(1, 3, 8, 8), torch.zeros(1)))
        ({0: 'batch', 2: 'height', 3: 'width'}, None)
    """
    names = {2: "height", 3: "width"}
    out: list[Optional[dict[int, str]]] = []
    for a in args:
        if a.dim() < 3:
            out.append(None)
            continue
        spatial = {i: (names.get(i, f"dim{i}") if a.dim() == 4 else f"dim{i}") for i in range(2, a.dim())}
        out.append({0: "batch", **spatial})
    return tuple(out)


def _export_file(model: nn.Module, args: tuple[Tensor, ...], path: str, opset: int, exporter: str,
                 dynamic: bool) -> None:
    dims = dynamic_dims(args) if dynamic else tuple(None for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            input_names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
            axes = {n: d for n, d in zip(input_names, dims) if d}
            torch.onnx.export(model, args, path, opset_version=opset, dynamo=False, do_constant_folding=True,
                              input_names=input_names, dynamic_axes=axes or None)
        else:
            from torch.export import Dim

            shared: dict[str, Any] = {}  # one symbol per name: every input's batch axis is the same size

            def dim(name: str) -> Any:
                return shared.setdefault(name, Dim(name, min=1))

            shapes = tuple({i: dim(n) for i, n in d.items()} if d else None for d in dims) if dynamic else None
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, verbose=False,
                                        dynamic_shapes=shapes)
            program.save(path, external_data=False)  # type: ignore[union-attr]


def _file_opset(path: str, asked: int) -> int:
    """The default-domain opset the file declares (the dynamo exporter may raise the one asked for)."""
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # onnx missing or unreadable: ONNX Runtime's check reports real problems
        return asked
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), asked)


def _run_ort(path: str, args: tuple[Tensor, ...]) -> tuple[list[Tensor], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().contiguous().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)], session.get_providers()[0]


def shape_text(args: Sequence[Tensor]) -> str:
    """``'1×3×64×64'`` (inputs joined by ``', '``)."""
    return ", ".join("×".join(str(n) for n in a.shape) for a in args)


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: Union[str, os.PathLike],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    exporter: str = "auto",
    dynamic: bool = True,
    check_inputs: Sequence[Inputs] = (),
    reference: Optional[nn.Module] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> OnnxResult:
    """Export ``model`` (in eval mode) to ONNX at ``path``, atomically, and check it with ONNX Runtime.

    ``exporter``: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, torch's default since 2.9),
    ``"torchscript"`` (``dynamo=False``, deprecated) or ``"auto"``: dynamo first, TorchScript if
    it fails (:attr:`OnnxResult.exporter` says which wrote the file). ``dynamic=True`` leaves the
    batch and spatial axes of image-like inputs free (:func:`dynamic_dims`; ``dynamic_shapes`` for
    dynamo, ``dynamic_axes`` for TorchScript); ``False`` fixes the example's shape. With
    ``check=True`` ONNX Runtime's CPU provider runs the file on ``example_input`` and on each of
    ``check_inputs`` (other shapes, for a dynamic file), and the file is kept only if every output
    matches ``reference`` (default: ``model``) run eagerly, within ``atol + rtol · max|eager|``
    (float32 defaults: rtol 1e-4, atol 1e-5, see :func:`parity_tolerance`); outputs are paired in
    the model's own order (a dict's insertion order, as the exporters flatten it). The file is
    written to a temporary file beside ``path`` (mode 0666 minus the umask, like ``open``) and
    moved into place with ``os.replace`` (:func:`~dsrewrite.runtime.files.atomic_output`). The
    caller's model and its train/eval flags are not changed.

    Raises:
        OutputError: ``path``'s folder does not exist.
        OnnxExportError: no exporter managed, or ONNX Runtime cannot load or run the file.
        ParityError: ONNX Runtime's output is further from eager than the tolerance.

    Example:
        >>> import tempfile, os
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     res = export_onnx(net, torch.randn(1, 3, 16, 16), os.path.join(d, "net.onnx"),
        ...                       check_inputs=[torch.randn(2, 3, 24, 20)])
        ...     res.checked, res.max_abs_diff <= res.tolerance, res.exporter, res.checked_shapes
        (True, True, 'dynamo', ('1×3×16×16', '2×3×24×20'))
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise DeployInputError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}.")
    args = _as_tuple(example_input)
    more = [_as_tuple(c) for c in check_inputs]
    reference = model if reference is None else reference
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write ONNX file {path!r}: folder {folder!r} does not exist. Hint: create it first.")
    with atomic_output(path) as tmp_path:
        tmp = str(tmp_path)
        errors: list[str] = []
        used = None
        with torch.no_grad(), evaluating(model):
            for name in (("dynamo", "torchscript") if exporter == "auto" else (exporter,)):
                try:
                    _export_file(model, args, tmp, opset, name, dynamic)
                    used = name
                    break
                except Exception as exc:  # report every exporter's failure together
                    errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if used is None:
                hint = "pass static (--static) if the model needs a fixed input shape, or try another opset" \
                    if dynamic else "try another opset= or exporter="
                raise OnnxExportError(
                    f"torch.onnx.export failed for {type(model).__name__} at opset {opset}: " + "; ".join(errors)
                    + f". Hint: {hint}."
                )
        opset_used = _file_opset(tmp, opset)
        result = OnnxResult(path, opset_used, used, False, None, None, None, None, dynamic)
        if check:
            diff, tol, scale, provider, shapes = 0.0, 0.0, 0.0, "", []
            for inputs in [args, *more]:
                with torch.no_grad(), evaluating(reference):
                    ref = _flat_outputs(reference(*inputs), "the model")
                try:
                    got, provider = _run_ort(tmp, inputs)
                except ImportError as exc:
                    raise OnnxExportError(f"onnxruntime is not installed ({exc}). Hint: pip install onnxruntime.") from exc
                except Exception as exc:
                    raise OnnxExportError(
                        f"ONNX Runtime cannot run the exported {type(model).__name__} ({used} exporter) on input "
                        f"{shape_text(inputs)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        f"; {path!r} was not written." + (" Hint: export with a static shape (--static)."
                                                          if dynamic and inputs is not args else "")
                    ) from exc
                d, sc = _max_abs_diff(got, ref, f"ONNX export of {type(model).__name__} at {shape_text(inputs)}")
                t = max(parity_tolerance(r, rtol=rtol, atol=atol) for r in ref)
                if not d <= t:
                    raise ParityError(
                        f"ONNX Runtime's output for {type(model).__name__} ({used} exporter, opset {opset_used}) at "
                        f"{shape_text(inputs)} differs from eager by max |Δ| = {d:.3g} > tolerance {t:.3g} "
                        f"(max |eager| = {sc:.3g}); {path!r} was not written. Hint: try exporter='torchscript' "
                        "or another opset, or a static shape."
                    )
                diff, tol, scale = max(diff, d), max(tol, t), max(scale, sc)
                shapes.append(shape_text(inputs))
            result = OnnxResult(path, opset_used, used, True, diff, tol, scale, provider, dynamic, tuple(shapes))
    return result
