"""A toy graph predicate that only the tests register: the conv reads the model's input.

``reads_input`` holds at a conv call site whose tensor comes (through pass-through
nodes) straight from a graph input: the stem of a network. Everything here uses the
public ``GraphView`` members only: the point of the test is that a new selector needs
this one file and no change to the package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ReadsInput:
    """The conv reads a graph input (a placeholder), possibly through dropout/identity/casts."""

    name = "reads_input"
    description = "The conv reads the model's input directly (the stem)."
    phrase, short = "reading the model input", "reads input"
    column, legend = "in", "reads the model input"

    def holds(self, view: Any, node: Any) -> bool:
        src = view.source_of(node)
        return src is not None and src.op == "placeholder"


class Stem(nn.Module):
    """A stem conv on the input (through an Identity), then a conv on its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Identity()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.relu(self.stem(self.pre(x))))
