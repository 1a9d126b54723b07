"""Calibration's working set (issue 13, kind 14): bounded replay cache, solves that free their matrix.

Structural checks, not resident-size thresholds: the bytes of module outputs the replay cache
holds are counted independently of its own bookkeeping (every output it clones is tracked
until Python frees it), and the least-squares solves are checked to drop their system matrix
before solving with its factor. A bound on either may change the time, never the weights:
every run here is compared bit for bit with the unbounded one and with no cache at all.
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.refit import lstsq, replay, spd_solve
from dsrewrite.refit.calibrate import calibrate, default_cache_bytes
from dsrewrite.refit.results import CalibrationUsageError


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


def _nets(depth: int = 6, c: int = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[_Block(c) for _ in range(depth)]).eval()
    light = copy.deepcopy(net)
    for blk in light[1:]:
        blk.conv = DepthwiseSeparableConv2d.from_conv(blk.conv)
    return net, light


def _data(batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 12, 12, generator=g) for _ in range(batches)]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@pytest.fixture
def cached_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the bytes of every output the tracer clones INTO the cache (its post-hook) while Python holds it."""
    live = {"now": 0, "max": 0, "kept": 0}
    in_post = [False]
    orig_clone, orig_post = replay._clone, replay.CallTracer._post

    def release(n: int) -> None:
        live["now"] -= n

    def counting_clone(value: Any) -> Any:
        out = orig_clone(value)
        if in_post[0]:
            for t in _tensors(out):
                n = t.numel() * t.element_size()
                live["now"] += n
                live["kept"] += 1
                live["max"] = max(live["max"], live["now"])
                weakref.finalize(t, release, n)
        return out

    def post(self: replay.CallTracer, name: str) -> Any:
        hook = orig_post(self, name)

        def wrapped(*args: Any) -> None:
            in_post[0] = True
            try:
                hook(*args)
            finally:
                in_post[0] = False

        return wrapped

    monkeypatch.setattr(replay, "_clone", counting_clone)
    monkeypatch.setattr(replay.CallTracer, "_post", post)
    return live


def _run(cached_bytes: dict[str, int], **options: Any) -> tuple[dict[str, torch.Tensor], Any, int]:
    net, light = _nets()
    cached_bytes.update(now=0, max=0, kept=0)
    res = calibrate(net, light, _data(), **options)
    gc.collect()
    return {k: v.clone() for k, v in light.state_dict().items()}, res, cached_bytes["max"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max {(a[k] - b[k]).abs().max().item():.3e}"


def test_replay_cache_stays_within_its_budget_and_changes_no_weight(cached_bytes: dict[str, int]) -> None:
    full, res_full, peak_full = _run(cached_bytes, cache_bytes=1 << 40)
    assert res_full.replay_cache and cached_bytes["now"] == 0  # everything the cache held was freed
    assert peak_full > 0, "the unbounded run cached nothing: the bound below would not be tested"
    budget = peak_full // 3
    bounded, res, peak = _run(cached_bytes, cache_bytes=budget)
    assert 0 < peak <= budget, f"the cache held {peak} bytes at its peak, over its budget of {budget}"
    assert any("replay cache bounded" in n for n in res.notes), res.notes
    none, res_none, peak_none = _run(cached_bytes, replay_cache=False)
    assert peak_none == 0 and not res_none.replay_cache
    _same(full, bounded)
    _same(full, none)
    key = [(r.name, r.rel_error_before, r.rel_error_after, r.steps) for r in res_full.layers]
    assert key == [(r.name, r.rel_error_before, r.rel_error_after, r.steps) for r in res.layers]
    assert res.output_rel_error_after == res_full.output_rel_error_after


def test_zero_budget_caches_nothing(cached_bytes: dict[str, int]) -> None:
    full, _, _ = _run(cached_bytes)
    nothing, res, peak = _run(cached_bytes, cache_bytes=0)
    assert peak == 0
    _same(full, nothing)


def test_default_budget_is_a_quarter_of_the_model_with_a_floor() -> None:
    big = nn.Linear(32768, 32768, bias=False, device="meta")  # 4 GiB of float32, never allocated
    assert default_cache_bytes(big) == (4 << 30) // 4
    mid = nn.Linear(16384, 16384, bias=False, device="meta")  # 1 GiB: a quarter is under the floor
    assert default_cache_bytes(mid) == 512 << 20
    assert default_cache_bytes(nn.Linear(4, 4)) == 512 << 20


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_cache_bytes_is_checked(bad: Any) -> None:
    net, light = _nets(depth=1)
    with pytest.raises(CalibrationUsageError, match="cache_bytes"):
        calibrate(net, light, _data(1), cache_bytes=bad)


# ----------------------------------------------------------------------------------------
# The solves: the system matrix is released once factored, and the ridge is added in place
# ----------------------------------------------------------------------------------------
def _storage(obj: Any) -> tuple[int, int]:
    """(address, bytes) of a CPU tensor's storage; (0, 0) for anything else (lazy or meta parameters included)."""
    if not isinstance(obj, torch.Tensor) or isinstance(obj, nn.parameter.UninitializedTensorMixin):
        return 0, 0
    try:
        if obj.device.type != "cpu":
            return 0, 0
        st = obj.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError, ValueError):
        return 0, 0


@pytest.fixture
def solve_watch(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """At each Cholesky factorisation: how many tensors of the system's size are alive; at each solve: is it freed."""
    seen: list[dict[str, Any]] = []
    chol_ex, chol_solve = torch.linalg.cholesky_ex, torch.cholesky_solve

    def factor(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        gc.collect()
        n = a.shape[-1]  # storages from the system matrix's size up to the (n+1)-square Gram it came from
        lo, hi = a.numel() * a.element_size(), (n + 1) ** 2 * a.element_size() * (a.numel() // (n * n))
        storages = {ptr for ptr, size in map(_storage, gc.get_objects()) if lo <= size <= hi}
        out = kwargs.get("out")
        seen.append({"matrix": weakref.ref(a), "alive_at_factor": len(storages), "numel": a.numel(),
                     "in_place": out is not None and out[0].data_ptr() == a.data_ptr()})
        return chol_ex(a, *args, **kwargs)

    def solve(h: torch.Tensor, chol: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen[-1]["freed_at_solve"] = seen[-1]["matrix"]() is None
        return chol_solve(h, chol, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", factor)
    monkeypatch.setattr(torch, "cholesky_solve", solve)
    return seen


def _stats(c_in: int = 6, c_out: int = 5, k: int = 9) -> lstsq.GramStats:
    g = torch.Generator().manual_seed(0)
    st = lstsq.GramStats()
    st.add(torch.randn(400, c_in * k, generator=g, dtype=torch.float64),
           torch.randn(400, c_out, generator=g, dtype=torch.float64))
    return st


def test_spatial_refit_factors_its_system_in_place(solve_watch: list[dict[str, Any]]) -> None:
    """dw_pw's first-stage system (``C_in·m·K`` square, the largest of calibration) is built once, the ridge added in
    place, and factored in its own storage: with the Gram statistics, two matrices of its size alive, no copy."""
    st = _stats()
    g = torch.Generator().manual_seed(2)
    p, b = torch.randn(5, 6, 1, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    d = lstsq.refit_dwpw_spatial(st, p, b, k=9, ridge=1e-3)
    assert d.shape == (6, 1, 9) and len(solve_watch) == 1
    # alive at the factorisation: the statistics' Gram (C_in·K + 1 square) and the system matrix, no copy of either
    assert solve_watch[0]["numel"] == (6 * 9) ** 2 and solve_watch[0]["alive_at_factor"] == 2, solve_watch
    assert solve_watch[0]["in_place"], "the factor was not written over the system matrix"
    assert "freed_at_solve" not in solve_watch[0], "cholesky_solve copies the factor: two matrices again"


@pytest.mark.parametrize("n,rhs,seed", [(1, 1, 0), (7, 1, 1), (300, 1, 2), (300, 3, 3), (600, 2, 4)])
def test_in_place_solve_is_bit_identical_to_cholesky_solve(n: int, rhs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 5, n, generator=g, dtype=torch.float64)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)

    def build() -> torch.Tensor:  # not exactly symmetric, as calibration's systems are not
        return x.T @ x + 1e-9 * (w - w.T) + torch.eye(n, dtype=torch.float64)

    h = torch.randn(n, rhs, generator=g, dtype=torch.float64)
    ref = torch.cholesky_solve(h, torch.linalg.cholesky_ex(build())[0])
    got = spd_solve.solve_spd_in_place(build, h)
    assert torch.equal(got, ref), f"max diff {(got - ref).abs().max().item():.3e}"


def test_in_place_solve_falls_back_to_the_pseudo_inverse() -> None:
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # singular: no Cholesky factor
    h = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    got = spd_solve.solve_spd_in_place(a.clone, h)
    assert torch.equal(got, torch.linalg.pinv(a, hermitian=True) @ h)


def test_ridge_solve_frees_its_copy_before_solving(solve_watch: list[dict[str, Any]]) -> None:
    st = _stats()
    lstsq.ridge_solve(st.gram, st.cross, 1e-3)
    lstsq.ridge_solve(st.gram, st.cross, 1e-3, bias=False)
    assert len(solve_watch) == 2 and all(s["freed_at_solve"] for s in solve_watch), solve_watch


def test_pwdw_pointwise_refit_frees_each_chunk_before_solving(solve_watch: list[dict[str, Any]]) -> None:
    st = _stats()
    s = torch.randn(5, 2, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lstsq.refit_pwdw_pointwise(st, s, None, in_channels=6, ridge=1e-3)
    assert solve_watch and all(w["freed_at_solve"] for w in solve_watch), solve_watch
