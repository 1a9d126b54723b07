# SPDX-License-Identifier: Apache-2.0
"""Refitting: making the new blocks reproduce the original from a few unlabeled batches.

* :mod:`~dsrewrite.refit.calibrate`: the closed-form data-aware refit (the driver), with
  :mod:`~dsrewrite.refit.replay` (recording and replaying each block's inputs) and
  :mod:`~dsrewrite.refit.results` (its records and options);
* :mod:`~dsrewrite.refit.lstsq`: its least-squares maths; :mod:`~dsrewrite.refit.relu_fit`:
  fitting through a following ReLU; :mod:`~dsrewrite.refit.activation`: which ReLU follows;
* :mod:`~dsrewrite.refit.heal`: distillation from the original (``python -m dsrewrite heal``);
* :mod:`~dsrewrite.refit.batches`: user batches to model inputs; :mod:`~dsrewrite.refit.calib_data`:
  data files and folders for the CLI.
"""
