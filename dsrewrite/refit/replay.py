# SPDX-License-Identifier: Apache-2.0
"""The replay cache of calibration: module calls recorded once, replayed instead of recomputed.

Module calls are keyed by ``(qualified name, call index within one forward)`` from a
probe run (:class:`CallTracer`); the outputs of calls that finish before the layer
being calibrated starts are cached and replayed, and a pass stops (:class:`Stop`)
right after that layer. A call not seen in the probe run raises
:class:`StructureChanged` and the cache is switched off.

The cache is bounded in bytes (:class:`ReplayCache`): an output that would take it past its
budget is not kept, and that call (with everything it contains) runs again in the next
pass. Every kept output is replayed exactly as recomputing would give it, so the budget
changes the time only, never the result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from torch import Tensor, nn

__all__ = ["Key", "Stop", "StructureChanged", "CallTracer", "ReplayCache", "value_bytes"]


# ----------------------------------------------------------------------------------------
# Replay cache: module calls are keyed by (qualified name, call index within one forward)
# ----------------------------------------------------------------------------------------
Key = tuple[str, int]


class Stop(BaseException):
    """Raised from a hook to end a forward pass early (BaseException: user code rarely catches it)."""


class StructureChanged(BaseException):
    """A module call not seen in the probe run: the replay cache cannot be trusted."""


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    return value


def value_bytes(value: Any) -> int:
    """Bytes of the tensors in a module output (tensors, nested tuples, lists, dicts), as :func:`_clone` keeps them.

    Example:
        >>> import torch
        >>> value_bytes((torch.zeros(2, 3), {"a": torch.zeros(4, dtype=torch.float64)}, None))
        56
    """
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(value_bytes(v) for v in value.values())
    return 0


class ReplayCache:
    """Per batch, the module outputs kept for replay; at most ``budget`` bytes in all (``None``: no bound).

    The driver stores each batch's new captures with :meth:`store` (which drops what that batch
    held before) and asks :meth:`room` how many bytes a pass over batch ``b`` may add: the budget
    less everything held, that batch's old entries included (they are alive until the pass ends),
    so the cache never holds more than ``budget`` bytes at any moment.

    Example:
        >>> import torch
        >>> c = ReplayCache(2, budget=100)
        >>> c.store(0, {("a", 0): torch.zeros(10)}); c.held, c.room(1)
        (40, 60)
    """

    def __init__(self, batches: int, budget: Optional[int]) -> None:
        self.budget = budget
        self.maps: list[dict[Key, Any]] = [{} for _ in range(batches)]
        self.sizes = [0] * batches
        self.declined = 0  #: outputs not kept because the budget was spent

    @property
    def held(self) -> int:
        return sum(self.sizes)

    def room(self, b: int) -> Optional[int]:
        """Bytes a pass over batch ``b`` may capture anew (``None``: no bound)."""
        return None if self.budget is None else max(0, self.budget - self.held)

    def store(self, b: int, captured: dict[Key, Any]) -> None:
        self.maps[b] = captured
        self.sizes[b] = sum(value_bytes(v) for v in captured.values())

    def clear(self) -> None:
        for b in range(len(self.maps)):
            self.store(b, {})


@dataclass
class _Call:
    start: int
    end: int = -1
    parent: Optional[Key] = None


class CallTracer:
    """Hooks on every submodule of a model: records the call tree, replays and captures outputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named = [(n, m) for n, m in model.named_modules() if n]
        self.calls: dict[Key, _Call] = {}
        self.sequence: list[Key] = []
        self.probing = False
        self.replay: dict[Key, Any] = {}
        self.capture: set[Key] = set()
        self.captured: dict[Key, Any] = {}
        self.room: Optional[int] = None  # bytes of new captures this forward may still keep (None: no bound)
        self.declined = 0  # captures not kept for want of room, this forward
        self.skip_counts: dict[Key, Counter] = {}
        self.patched: dict[str, tuple[nn.Module, bool, Any]] = {}
        self.handles: list[Any] = []
        self._reset()
        for name, mod in self.named:
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _reset(self) -> None:
        self.counters: Counter = Counter()
        self.stack: list[Key] = []
        self.event = 0
        self.seen: list[Key] = []

    def begin(self, *, probe: bool = False, replay: Optional[dict[Key, Any]] = None,
              capture: Optional[set[Key]] = None, room: Optional[int] = None) -> None:
        """Start a forward: probe the call tree, or replay ``replay`` and capture the calls in ``capture``.

        Outputs replayed and captured again are kept as they are; new outputs are cloned and
        kept while their bytes fit in ``room`` (``None``: no bound).
        """
        self._reset()
        self.room, self.declined = room, 0
        self.probing = probe
        if probe:
            self.calls, self.sequence = {}, []
        self.replay = replay or {}
        self.capture = capture or set()
        self.captured = {}

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            key = (name, self.counters[name])
            self.counters[name] += 1
            parent = self.stack[-1] if self.stack else None
            if self.probing:
                self.calls[key] = _Call(start=self.event, parent=parent)
                self.sequence.append(key)
            elif self.calls and key not in self.calls:
                raise StructureChanged(key)
            self.seen.append(key)
            self.event += 1
            self.stack.append(key)

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            key = self.stack.pop() if self.stack else (name, -1)
            if self.probing and key in self.calls:
                self.calls[key].end = self.event
            self.event += 1
            if key in self.replay:
                self.counters.update(self.skip_counts.get(key, {}))
                if key in self.capture:
                    self.captured[key] = self.replay[key]
            elif key in self.capture:
                size = value_bytes(output) if self.room is not None else 0
                if self.room is None or size <= self.room:
                    self.captured[key] = _clone(output)
                    if self.room is not None:
                        self.room -= size
                else:
                    self.declined += 1

        return hook

    # --- cache sets from the probe ---------------------------------------------------
    def before(self, key: Key) -> set[Key]:
        """Maximal calls that end before ``key`` starts (their outputs cannot depend on it).

        Calls of in-place modules (``inplace=True``, e.g. ``ReLU(inplace=True)``) are never
        replayed: code may rely on their side effect rather than their return value.
        """
        t = self.calls[key].start
        mods = dict(self.named)
        out = set()
        for k, c in self.calls.items():
            if 0 <= c.end < t and (c.parent is None or self.calls[c.parent].end >= t or self.calls[c.parent].end < 0):
                if not getattr(mods[k[0]], "inplace", False):
                    out.add(k)
        return out

    def prepare_replay(self, keys: Iterable[Key]) -> None:
        """Count the calls nested in each replayable call and wrap those modules' forwards."""
        mods = dict(self.named)
        for key in keys:
            c = self.calls[key]
            if key not in self.skip_counts:
                self.skip_counts[key] = Counter(
                    k[0] for k, d in self.calls.items() if c.start < d.start and 0 <= d.end < c.end
                )
            name = key[0]
            if name in self.patched:
                continue
            mod = mods[name]
            had = "forward" in mod.__dict__
            orig = mod.__dict__.get("forward", None)
            bound = mod.forward

            def wrapper(*args: Any, _name: str = name, _bound: Any = bound, **kwargs: Any) -> Any:
                top = self.stack[-1] if self.stack else None
                if top is not None and top[0] == _name and top in self.replay:
                    return _clone(self.replay[top])
                return _bound(*args, **kwargs)

            mod.forward = wrapper  # type: ignore[method-assign]
            self.patched[name] = (mod, had, orig)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for mod, had, orig in self.patched.values():
            if had:
                mod.forward = orig  # type: ignore[method-assign]
            else:
                del mod.__dict__["forward"]
        self.patched = {}
