# SPDX-License-Identifier: Apache-2.0
"""Pairing two models' outputs leaf by leaf: what can be compared, and why the rest cannot.

Outputs are walked together in the model's order: tuples and lists by position, dicts
by key (in the original's order, then keys only the rewritten model has), dataclasses
(HuggingFace-style records) by field. Two tensors of equal shape make a **pair**;
everything else is **not compared**, with the reason:

* ``None``, strings, numbers and other non-tensors (``"a str"``; equal on both sides or not),
  and empty tensors (a detector that found nothing: no number to compare);
* tensors of different shapes (variable-length detections: ``"shape (3, 4) vs (5, 4)"``);
* a key, position or field only one side has, or a tensor on one side and something
  else on the other.

A *mismatch* is a reason that says the two outputs differ in structure or shape (the
first two bullets are benign, the last two are mismatches).

Example:
    >>> import torch
    >>> a = {"boxes": torch.zeros(3, 4), "scores": torch.zeros(3), "name": "x", "feat": torch.ones(2)}
    >>> b = {"boxes": torch.zeros(5, 4), "scores": torch.zeros(5), "name": "x", "feat": torch.ones(2)}
    >>> p = pair_outputs(a, b)
    >>> [path for path, _, _ in p.pairs], [(n.path, n.why) for n in p.not_compared][:2], p.mismatch
    (['feat'], [('boxes', 'shape (3, 4) vs (5, 4)'), ('scores', 'shape (3,) vs (5,)')], True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor

__all__ = ["NotCompared", "Pairing", "pair_outputs"]


@dataclass(frozen=True)
class NotCompared:
    """One output leaf that was not compared: ``path`` as in :class:`~dsrewrite.measure.fidelity.OutputFidelity`."""

    path: str
    why: str
    mismatch: bool = False


@dataclass
class Pairing:
    """The comparable leaves (``(path, original, rewritten)``) and the others."""

    pairs: list[tuple[str, Tensor, Tensor]] = field(default_factory=list)
    not_compared: list[NotCompared] = field(default_factory=list)

    @property
    def mismatch(self) -> bool:
        """True when some leaf differs in structure or shape between the two outputs."""
        return any(n.mismatch for n in self.not_compared)


def _what(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _fields(value: Any) -> Mapping[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _is_record(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _walk(a: Any, b: Any, path: str, out: Pairing) -> None:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape == b.shape and a.numel() == 0:
            out.not_compared.append(NotCompared(path, f"empty tensor of shape {tuple(a.shape)} on both sides"))
        elif a.shape == b.shape:
            out.pairs.append((path, a, b))
        else:
            out.not_compared.append(NotCompared(path, f"shape {tuple(a.shape)} vs {tuple(b.shape)}", True))
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping) or _is_record(a) and _is_record(b):
        ma, mb = (a, b) if isinstance(a, Mapping) else (_fields(a), _fields(b))
        for k in ma:
            if k in mb:
                _walk(ma[k], mb[k], _join(path, k), out)
            else:
                out.not_compared.append(NotCompared(_join(path, k), "only in the original's output", True))
        for k in mb:
            if k not in ma:
                out.not_compared.append(NotCompared(_join(path, k), "only in the rewritten model's output", True))
        return
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{path}[{i}]", out)
        if len(a) != len(b):
            out.not_compared.append(NotCompared(path, f"length {len(a)} vs {len(b)} (the first "
                                                      f"{min(len(a), len(b))} compared)", True))
        return
    same_kind = type(a) is type(b) and not isinstance(a, (Tensor, Mapping, tuple, list))
    if same_kind:
        out.not_compared.append(NotCompared(path, f"{_what(a)}, not a tensor"))
    else:
        out.not_compared.append(NotCompared(path, f"{_what(a)} vs {_what(b)}", True))


def pair_outputs(original: Any, rewritten: Any) -> Pairing:
    """Walk both outputs together (see the module docstring) and return the :class:`Pairing`."""
    out = Pairing()
    _walk(original, rewritten, "", out)
    return out
