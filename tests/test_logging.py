# SPDX-License-Identifier: Apache-2.0
"""Progress through `logging`: per-layer calibration lines and heal step lines on the `dsrewrite` loggers,
the callback hooks, silence by default as a library, and the CLI's -v/-q."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dsrewrite.cli import main
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.refit.calibrate import calibrate
from dsrewrite.refit.heal import heal
from dsrewrite.runtime.log import configure_cli, get_logger, reset_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1)).eval()
    light = copy.deepcopy(net)
    light[2] = DepthwiseSeparableConv2d.from_conv(net[2])
    light[4] = DepthwiseSeparableConv2d.from_conv(net[4])
    return net, light


DATA = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


def test_calibrate_logs_each_layer_and_calls_back(caplog) -> None:
    net, light = pair()
    seen = []
    with caplog.at_level(logging.INFO, logger="dsrewrite"):
        res = calibrate(net, light, DATA, callback=seen.append)
    assert [r.name for r in seen] == [r.name for r in res.layers] == ["2", "4"]
    lines = [r.getMessage() for r in caplog.records if r.name == "dsrewrite.calibrate"]
    assert any(l.startswith("[calibrate] 1/2 2: rel err") for l in lines), lines
    assert any(l.startswith("[calibrate] 2/2 4: rel err") for l in lines), lines


def test_heal_logs_every_n_steps(caplog) -> None:
    net, light = pair()
    with caplog.at_level(logging.INFO, logger="dsrewrite"):
        heal(light, net, DATA, steps=6, log_every=3, progress=False)
    steps = [r.getMessage().split()[2] for r in caplog.records
             if r.name == "dsrewrite.heal" and r.getMessage().startswith("[heal] step ")]
    assert steps == ["1/6", "3/6", "6/6"], steps


def test_a_library_call_prints_nothing_by_default(capsys) -> None:
    net, light = pair()
    calibrate(net, light, DATA)
    heal(light, net, DATA, steps=2, progress=False)
    err = capsys.readouterr().err
    assert "[calibrate]" not in err and "[heal]" not in err, err


def test_calibrate_progress_prints_when_no_handler_shows_it(capsys) -> None:
    net, light = pair()
    calibrate(net, light, DATA, progress=True)
    assert "[calibrate] 1/2 2: rel err" in capsys.readouterr().err


def test_configure_cli_levels_and_other_ranks(monkeypatch) -> None:
    try:
        configure_cli(0, tty=True)
        assert get_logger().level == logging.INFO
        configure_cli(0, tty=False)
        assert get_logger().level == logging.WARNING
        configure_cli(2)
        assert get_logger().level == logging.DEBUG
        monkeypatch.setenv("RANK", "1")
        configure_cli(1, tty=True)
        assert get_logger().level == logging.ERROR  # a torchrun process other than rank 0 stays quiet
    finally:
        reset_cli()
    assert get_logger().level == logging.NOTSET and get_logger().propagate


def test_cli_verbose_shows_capture_and_calibration_progress(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 3, 3, padding=1)), tmp_path / "net.pt")
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "calib.pt")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        args = ["apply", "net.pt", "--recipe", "all_3x3", "--input-shape", "1,3,8,8", "--calib", "calib.pt",
                "-o", "out.pt", "--force"]
        loud = CliRunner().invoke(main, ["-v", *args], catch_exceptions=False)
        quiet = CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert loud.exit_code == 0, loud.output
    assert "capturing the graph" in loud.stderr and "[calibrate] 1/1 2: rel err" in loud.stderr, loud.stderr
    assert quiet.exit_code == 0 and "[calibrate]" not in quiet.stderr and "capturing" not in quiet.stderr
