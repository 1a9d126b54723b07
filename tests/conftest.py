"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: its tensors are small, and on a shared 2-core
    machine two spinning threads made them many times slower. Restores the count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Callable[[], Path]:
    """A factory: calling it returns a directory no file can be created in (skips the test when
    there is none), so that only the cases that need one depend on it."""

    def make() -> Path:
        if os.geteuid() != 0:
            d = tmp_path / "ro"
            d.mkdir(exist_ok=True)
            d.chmod(0o555)
            return d
        if Path("/sys").is_dir():  # root ignores permission bits; sysfs refuses new files even to root
            return Path("/sys")
        pytest.skip("running as root without /sys: no directory is unwritable")

    return make
