# SPDX-License-Identifier: Apache-2.0
"""Deployment: inference forms of a (rewritten) model, each checked against the original.

* :mod:`~dsrewrite.deploy.bn`: BatchNorm folding (``fold_batchnorm``, ``find_conv_bn_pairs``);
* :mod:`~dsrewrite.deploy.hoist`: the pointwise stage moved above the upsample that feeds it;
* :mod:`~dsrewrite.deploy.prepare`: ``prepare_for_deployment`` (eval, BN folded, hoisted,
  channels_last), ``to_channels_last``, ``tune_glibc_malloc``;
* :mod:`~dsrewrite.deploy.onnx`: ``export_onnx`` with an ONNX Runtime parity check;
* :mod:`~dsrewrite.deploy.executorch`: ``export_executorch`` (XNNPACK ``.pte``) with an ExecuTorch runtime check;
* :mod:`~dsrewrite.deploy.export`: ``export_model``, the deployment form exported in a registered format
  (``EXPORT_FORMATS``) and checked at two shapes;
* :mod:`~dsrewrite.deploy.parity`: the errors and the parity comparison they share.

``dsrewrite.deploy`` was one module until 0.1; its names stay importable from here.
"""

from ..runtime.tolerance import parity_tolerance
from .bn import FoldPair, find_conv_bn_pairs, fold_batchnorm
from .hoist import HoistResult, hoist_pointwise
from .executorch import ExecutorchExportError, ExecutorchMissingError, ExecutorchResult, export_executorch
from .export import EXPORT_FORMATS, ExportFormat, ExportFormatError, ExportResult, export_model
from .onnx import DEFAULT_OPSET, OnnxExportError, OnnxResult, export_onnx
from .parity import DeployInputError, ParityError
from .prepare import GLIBC_TUNABLES, prepare_for_deployment, to_channels_last, tune_glibc_malloc

__all__ = [
    "prepare_for_deployment",
    "export_onnx",
    "export_executorch",
    "export_model",
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportFormatError",
    "ExportResult",
    "ExecutorchExportError",
    "ExecutorchMissingError",
    "ExecutorchResult",
    "fold_batchnorm",
    "find_conv_bn_pairs",
    "to_channels_last",
    "hoist_pointwise",
    "tune_glibc_malloc",
    "parity_tolerance",
    "FoldPair",
    "HoistResult",
    "OnnxResult",
    "DeployInputError",
    "ParityError",
    "OnnxExportError",
    "DEFAULT_OPSET",
    "GLIBC_TUNABLES",
]
