# SPDX-License-Identifier: Apache-2.0
"""The bottom layer: the one copy of each helper every wing uses.

It imports only torch, the standard library and :mod:`dsrewrite.errors` (a test
walks the imports and fails otherwise):

* :mod:`~dsrewrite.runtime.run`: run a model in eval mode without changing it, flatten its outputs;
* :mod:`~dsrewrite.runtime.files`: atomic writes;
* :mod:`~dsrewrite.runtime.modules`: qualified names and submodule replacement;
* :mod:`~dsrewrite.runtime.tolerance`: dtype-aware parity tolerances (the tests use them too);
* :mod:`~dsrewrite.runtime.tracer`: the fx tracer base and its one timm-aware vocabulary;
* :mod:`~dsrewrite.runtime.preflight`: unwrap + check + device/dtype, done once per call and passed down.
"""
