# SPDX-License-Identifier: Apache-2.0
"""``dsrewrite export``: a model's deployment form as a runtime file (ONNX, ExecuTorch), checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from ..runtime.input_files import path_exists
from .common import RegistryChoice, example_inputs_of, handle_errors, load_model_arg, model_options, progress


def export_formats() -> tuple[str, ...]:
    from ..deploy.export import EXPORT_FORMATS

    return EXPORT_FORMATS.keys()


def export_options(fn: Any) -> Any:
    """``--static`` and ``--opset``, shared by ``export`` and ``apply --export``."""
    fn = click.option("--opset", type=click.IntRange(min=7), default=None,
                      help="ONNX opset (default 17; the dynamo exporter may write a higher one).")(fn)
    fn = click.option("--static", is_flag=True,
                      help="Fix the file's input shape to the example's (default for ONNX: batch and spatial "
                           "axes free, checked at a second shape).")(fn)
    return fn


def export_entry(path: str, fmt: Optional[str]) -> Any:
    """The export format for ``path`` (``--format`` or its suffix), its runtime checked as installed, before any
    work. The output path itself is checked by the command, with its other outputs."""
    from ..deploy.export import export_format_for

    entry = export_format_for(path, fmt)
    entry.require()
    return entry


def run_export(model: Any, x: Any, path: str, fmt: str, *, static: bool, opset: Optional[int]) -> Any:
    from ..deploy.export import export_model

    progress(f"exporting the deployment form to {path} ({fmt}) and checking it in its runtime ...")
    return export_model(model, x, path, format=fmt, dynamic=not static, opset=opset)


@click.command("export")
@model_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The file to write: .onnx (ONNX) or .pte (ExecuTorch), or any name with --format.")
@click.option("--format", "fmt", type=RegistryChoice(export_formats), default=None,
              help="onnx: checked in ONNX Runtime; executorch: XNNPACK .pte checked in ExecuTorch's runtime "
                   "(needs the 'edge' extra). Default: from -o's suffix.")
@export_options
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@handle_errors
def export_cmd(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str],
               arch: Optional[str], arch_args: tuple[str, ...], trust_pickle: bool, output: str,
               fmt: Optional[str], static: bool, opset: Optional[int], force: bool, as_json: bool,
               **load_options: Any) -> None:
    """Export MODEL's deployment form (eval, BN folded, pointwise hoisted) to a runtime file.

    The file is run in its runtime on the example input (and, with free axes, on a second shape:
    one more in the batch, 32 more in each spatial axis) and kept only if it matches MODEL run in
    PyTorch within a dtype-aware tolerance. MODEL may be a file written by `dsrewrite apply`.
    """
    from ..io import check_output_path

    entry = export_entry(output, fmt)
    check_output_path(Path(output), input_path=Path(model) if path_exists(model) else None, force=force)
    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, _shape = example_inputs_of(loaded, input_shape, example_inputs)
    result = run_export(loaded.model, x, output, entry.name, static=static, opset=opset)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
