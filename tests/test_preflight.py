"""One ``rewrite()`` call runs the preflight (unwrap + check_rewritable + device/dtype) once."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.errors import UnsupportedModelError
from dsrewrite.runtime import preflight as pf


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count every call of the preflight and of its parts, wherever a module bound them."""
    import dsrewrite.api  # noqa: F401  (load the modules that bind them)
    import dsrewrite.cli  # noqa: F401
    import dsrewrite.report  # noqa: F401

    calls: Counter = Counter()
    for fn_name in ("preflight", "unwrap_for_rewrite", "check_rewritable"):
        real = getattr(pf, fn_name)

        def counting(*args, _real=real, _name=fn_name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("dsrewrite") and getattr(mod, fn_name, None) is real:
                monkeypatch.setattr(mod, fn_name, counting)
    return calls


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_rewrite_runs_the_preflight_once(counted: Counter) -> None:
    out = dsrewrite.rewrite(_net(), "all_3x3", example_inputs=torch.randn(1, 3, 16, 16))
    assert type(out[2]).__name__ == "DepthwiseSeparableConv2d"
    assert counted == Counter(preflight=1, unwrap_for_rewrite=1, check_rewritable=1), counted


def test_rewrite_and_report_with_calibration_runs_the_preflight_once(counted: Counter) -> None:
    x = torch.randn(1, 3, 16, 16)
    res = dsrewrite.rewrite_and_report(nn.DataParallel(_net()), "all_3x3", example_inputs=x,
                                       calibration=[torch.randn(2, 3, 16, 16)])
    assert isinstance(res.model, nn.DataParallel) and res.calibration is not None
    assert counted == Counter(preflight=1, unwrap_for_rewrite=1, check_rewritable=1), counted


def test_public_plan_and_apply_plan_still_check(counted: Counter) -> None:
    net, x = _net(), torch.randn(1, 3, 16, 16)
    p = dsrewrite.plan(net, "all_3x3", x)
    dsrewrite.apply_plan(net, p)
    assert counted["check_rewritable"] == 2, counted  # each public entry point checks its own input
    with pytest.raises(UnsupportedModelError, match="meta device"):
        dsrewrite.rewrite(nn.Conv2d(3, 8, 3, device="meta"), "all_3x3")


def test_preflight_reads_device_and_dtype_once_for_the_example_input() -> None:
    net = _net().double()
    record = pf.preflight(nn.DataParallel(net))
    assert record.model is net and isinstance(record.wrapper, nn.DataParallel)
    assert (record.device, record.dtype) == (torch.device("cpu"), torch.float64)
    assert pf.example_input(record.model, (1, 3, 4, 4)).dtype == torch.float64
