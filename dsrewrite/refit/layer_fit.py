# SPDX-License-Identifier: Apache-2.0
"""One replaced layer during calibration: what to capture and how to refit it.

The kind's :class:`~dsrewrite.kinds.LstsqLayout` holds the stage-specific maths
(:mod:`dsrewrite.refit.lstsq`); the fit through a following ReLU is :mod:`dsrewrite.refit.relu_fit`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..kinds import LAYOUT_MEMBERS, kind_of, missing_members
from ..runtime.memory import release_free_memory
from .activation import FollowingReLU
from .lstsq import GramStats, block_error, gram_matrix, quadratic_error, ridge_solve
from .patches_nd import gather_patches_nd
from .patches_transposed import gather_transposed_patches
from .relu_fit import cross_product, fit_through_relu, predict, relu_error
from .results import LayerCalibration

__all__ = ["LayerFit"]


# ----------------------------------------------------------------------------------------
# One layer: what to capture and how to refit
# ----------------------------------------------------------------------------------------
class LayerFit:
    """One replaced layer; its kind's :class:`~dsrewrite.kinds.LstsqLayout` holds the stage-specific maths."""

    def __init__(self, name: str, index: int, block: nn.Module, conv: nn.Conv2d) -> None:
        self.name, self.index, self.block, self.conv = name, index, block, conv
        kind = kind_of(block)
        assert kind is not None  # _resolve keeps only registered kinds' blocks
        self.kind = kind.name
        self.lay = kind.layout(block)
        missing = missing_members(self.lay, LAYOUT_MEMBERS)
        if missing:  # a kind's programming error, reported as such
            raise TypeError(f"kind {kind.name!r}: layout() returned a {type(self.lay).__name__} that lacks "
                            f"{', '.join(missing)} (see dsrewrite.kinds.LstsqLayout)")
        self.k = math.prod(conv.kernel_size)
        self.m = int(block.depth_multiplier)
        self.c_in, self.c_out = conv.in_channels, conv.out_channels
        self.positions: list[Optional[Tensor]] = []  # per batch, (P, 1 + spatial dims)
        self.targets: list[Optional[Tensor]] = []  # per batch, (P, C_out)
        self.calls_orig = 0
        self.skip: str = ""
        self.joint = False
        self.stats = GramStats()
        self.act: Optional[FollowingReLU] = None  # the (BN +) ReLU that follows the original conv
        self.samples: list[Tensor] = []  # stored features (float32) for the fit through the activation
        self.sample_targets: list[Tensor] = []
        self.start: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None

    def keep_samples(self, feats: Tensor, y: Tensor, batches: int, budget_bytes: int) -> None:
        """Keep one batch's features, or an evenly strided subset of them within ``budget_bytes`` per layer."""
        per_pos = max(1, feats[0].numel()) * 4
        quota = max(1, budget_bytes // per_pos // max(1, batches))
        step = max(1, math.ceil(feats.shape[0] / quota))
        self.samples.append(feats[::step].to(torch.float32))
        self.sample_targets.append(y[::step].to(torch.float32))

    def can_joint(self, alternate: int, max_joint_dim: int) -> bool:
        d = self.lay.joint_dim
        return self.lay.linear and alternate > 0 and d is not None and d <= max_joint_dim

    @property
    def last(self) -> nn.Module:
        return self.lay.last_stage

    def features(self, x: Optional[Tensor], z: Optional[Tensor], pos: Tensor) -> Tensor:
        """Features at ``pos``: input patches (joint) or the last stage's input (last-stage only)."""
        if self.joint:
            c = self.conv
            assert x is not None  # internal invariant
            if getattr(c, "transposed", False):
                p = gather_transposed_patches(x, pos, c.kernel_size, c.stride, c.padding, c.dilation)
            else:
                p = gather_patches_nd(x, pos, c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode)
            return p.reshape(p.shape[0], -1)
        assert z is not None  # internal invariant
        return self.lay.last_features(z, pos)

    # --- weights in the lstsq layouts ------------------------------------------------
    def current(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(first-stage, last-stage, bias) in the kind's lstsq layouts, float64."""
        return self.lay.current()

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        self.lay.write(first, last, bias)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        return self.lay.dense(first, last)

    # --- refits ------------------------------------------------------------------------
    def _alternate(self, err: Callable[..., float], start: tuple[Tensor, Tensor, Optional[Tensor]], e: float,
                   alternate: int, has_bias: bool, ridge: float,
                   rel: Callable[[float], float]) -> tuple[Tensor, Tensor, Optional[Tensor], float, list[str], str]:
        """Last stage, then ``alternate`` rounds of (first, last); each step kept only if it lowers ``err``."""
        first, last, bias = start
        st, steps, note = self.stats, [], ""
        for step in ["last"] + ["first", "last"] * alternate:
            if step == "last":
                l_new, b_new = self.lay.refit_last(st, first, bias=has_bias, ridge=ridge)
                cand = (first, l_new, b_new)
            else:  # its system matrix is the largest allocation: first return what earlier steps freed
                release_free_memory()
                cand = (self.lay.refit_first(st, last, bias, ridge=ridge), last, bias)
            e_new = err(*cand)
            if not e_new < e:
                if not steps:
                    note = f"refit rejected: rel error would go {rel(e):.4g} -> {rel(e_new):.4g}; kept the old weights"
                break
            first, last, bias = cand
            e = e_new
            steps.append(step)
        return first, last, bias, e, steps, note

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Last stage and bias in the ``ridge_solve`` layout of the kind's last-stage features."""
        return self.lay.pack_last(last, bias)

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Inverse of :meth:`pack_last` (the bias is ``None`` when the block has none)."""
        return self.lay.unpack_last(w, has_bias)

    def last_features(self, feats: Tensor, first: Tensor) -> Tensor:
        """The last stage's input features at stored positions (joint layers store input patches)."""
        return self.lay.last_features_from_patches(feats, first) if self.joint else feats

    def linear_error(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> float:
        """Squared conv-output error of (first, last, bias) from the Gram statistics."""
        st = self.stats
        if self.joint:
            return block_error(st, self.dense(first, last), bias)
        assert st.gram is not None and st.cross is not None  # internal invariant
        return quadratic_error(st.gram, st.cross, st.yy, self.pack_last(last, bias))

    def _relu_problem(self, feats: Tensor, first0: Tensor, ridge: float) -> tuple[
            Callable[[tuple[Tensor, Tensor, Optional[Tensor]]], Tensor],
            Callable[[Tensor, tuple[Tensor, Tensor, Optional[Tensor]]], tuple[Tensor, Tensor, Optional[Tensor]]]]:
        """``(predict, solve)`` for :func:`~dsrewrite.relu_fit.fit_through_relu` on the stored positions.

        ``solve`` is one round of the linear refits on a target ``zy`` instead of ``y``.
        Joint layers whose kind says ``relu_refits_first`` (pw_dw: its first stage, the 1×1
        projection, is where the channels mix) refit both stages (first, then last and bias)
        on the stored input patches; every other layer refits its last stage and bias on
        fixed last-stage features (for dw_pw that stage is where the channels mix). The
        Gram matrix is the layer's own when every sampled position was kept, else the
        stored subset's.
        """
        has_bias = self.current()[2] is not None
        if self.joint and self.lay.relu_refits_first:
            st = self.stats
            assert st.gram is not None  # internal invariant
            n = int(feats.shape[0])
            gram = st.gram if n == st.count else gram_matrix(feats)

            def predict_joint(cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> Tensor:
                first, last, bias = cand
                out = (feats @ self.dense(first, last).reshape(self.c_out, -1).to(feats).T).to(torch.float64)
                return out if bias is None else out + bias.to(out)

            def solve_joint(zy: Tensor, cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> tuple[
                    Tensor, Tensor, Optional[Tensor]]:
                _, last, bias = cand
                tz = GramStats()
                tz.gram, tz.cross, tz.count = gram, cross_product(feats, zy).to(torch.float64), n
                first = self.lay.refit_first(tz, last, bias, ridge=ridge)
                last, new_bias = self.lay.refit_last(tz, first, bias=has_bias, ridge=ridge)
                return first, last, new_bias

            return predict_joint, solve_joint
        lf = self.last_features(feats, first0).to(torch.float32)
        grams: list[Tensor] = []  # built on the first solve: scoring a start needs no Gram matrix

        def predict_last(cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> Tensor:
            _, last, bias = cand
            return predict(lf, self.pack_last(last, bias).to(lf)).to(torch.float64)

        def solve_last(zy: Tensor, cand: tuple[Tensor, Tensor, Optional[Tensor]]) -> tuple[
                Tensor, Tensor, Optional[Tensor]]:
            if not grams:
                grams.append(self.stats.gram if not self.joint and lf.shape[0] == self.stats.count  # type: ignore[arg-type]
                             else gram_matrix(lf))
            w = ridge_solve(grams[0], cross_product(lf, zy).to(torch.float64), ridge, bias=has_bias)
            return (cand[0], *self.unpack_last(w, has_bias))

        return predict_last, solve_last

    def refit_through_relu(self, rec: LayerCalibration, ridge: float) -> LayerCalibration:
        """Refit through the following (BN +) ReLU; never raises the activation's error.

        The auxiliary-variable loop of :func:`dsrewrite.relu_fit.fit_through_relu`, whose
        ``W`` step is one round of the same linear refits as the linear calibration (joint
        layers whose kind says ``relu_refits_first``, e.g. pw_dw: first stage, then last stage
        and bias; others: last stage and bias), on
        the stored positions. It starts from whichever of the initial and the linearly
        calibrated weights has the lower activation error, so the activation error after
        is at most the one before.
        """
        act = self.act
        if act is None or not self.samples or self.start is None:
            return rec
        feats = torch.cat(self.samples)
        y = torch.cat(self.sample_targets).to(torch.float64)
        a, c = act.scale.to(y.device), act.shift.to(y.device)
        yy = float((torch.relu(a * y + c) ** 2).sum())
        yy = yy if yy > 0 else 1.0
        cands = [self.start, self.current()]
        problems = [self._relu_problem(feats, cand[0], ridge) for cand in cands]
        errs = [relu_error(problem[0](cand), y, a, c) for problem, cand in zip(problems, cands)]
        pick = int(errs[1] < errs[0])
        begin = cands[pick]
        pred, solve = problems[pick]
        best, e_start, e_best = fit_through_relu(y, a, c, begin, predict=pred, solve=solve)
        steps = list(rec.steps)
        if e_best < e_start:
            steps.append("relu")
        e_lin = self.linear_error(*best)
        self.write(*best)
        yy_lin = self.stats.yy if self.stats.yy > 0 else 1.0
        return replace(rec, rel_error_after=math.sqrt(max(e_lin, 0.0) / yy_lin), steps=tuple(steps),
                       activation=act.via, act_error_before=math.sqrt(errs[0] / yy),
                       act_error_after=math.sqrt(e_best / yy))

    def refit(self, ridge: float, alternate: int) -> LayerCalibration:
        first, last, bias = self.current()
        self.start = (first, last, bias)
        has_bias = bias is not None
        st = self.stats
        assert st.gram is not None and st.cross is not None  # internal invariant
        yy = st.yy if st.yy > 0 else 1.0

        def rel(e: float) -> float:
            return math.sqrt(max(e, 0.0) / yy)

        steps: list[str] = []
        note = ""
        if self.joint:
            err = lambda f, l, b: block_error(st, self.dense(f, l), b)  # noqa: E731
            e0 = err(first, last, bias)
            first, last, bias, e, steps, note = self._alternate(err, (first, last, bias), e0, alternate,
                                                                 has_bias, ridge, rel)
            method = "alternating"
        else:
            e0 = e = quadratic_error(st.gram, st.cross, st.yy, self.pack_last(last, bias))
            w = ridge_solve(st.gram, st.cross, ridge, bias=has_bias)
            e_new = quadratic_error(st.gram, st.cross, st.yy, w)
            if e_new < e:
                e = e_new
                steps.append("last")
                last, bias = self.unpack_last(w, has_bias)
            else:
                note = f"refit rejected: rel error would go {rel(e):.4g} -> {rel(e_new):.4g}; kept the old weights"
            method = "last_stage"
            if alternate > 0:
                why = ("the block is not linear (mid_norm/mid_act)" if not self.lay.linear
                       else ("a grouped block has no joint refit" if getattr(self.block, "groups", 1) > 1
                             else f"kind {self.kind} has no joint refit") if self.lay.joint_dim is None
                       else f"joint size {self.lay.joint_dim} > max_joint_dim")
                note = (note + "; " if note else "") + f"first stage kept: {why}"
        if steps:
            self.write(first, last, bias)
        return LayerCalibration(self.name, self.kind, self.m, method, rel(e0), rel(e), st.count,
                                tuple(steps), note)
