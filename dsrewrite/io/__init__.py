# SPDX-License-Identifier: Apache-2.0
"""Model I/O: safe loading (torch's weights-only unpickler, per-file allowlist; arch specs) and atomic saving with a plan sidecar.

Example:
    >>> from dsrewrite.io import load_model
    >>> load_model("demo").kind
    'demo'
"""

from .arch import ArchSpec, arch_spec, build_arch, parse_arch_args
from .load import LoadedModel, load_model
from .safe_pickle import restricted_torch_load
from .paths import check_output_path, check_outputs, default_output_path, plan_path_for
from .save import atomic_save, atomic_write_bytes, load_rewrite, save_rewrite

__all__ = [
    "LoadedModel",
    "load_model",
    "build_arch",
    "ArchSpec",
    "arch_spec",
    "parse_arch_args",
    "restricted_torch_load",
    "atomic_save",
    "atomic_write_bytes",
    "check_output_path",
    "check_outputs",
    "default_output_path",
    "plan_path_for",
    "save_rewrite",
    "load_rewrite",
]
