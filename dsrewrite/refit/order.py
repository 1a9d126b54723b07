# SPDX-License-Identifier: Apache-2.0
"""A deterministic, resumable order of batches for healing: seeded shuffling per epoch, positions by number.

Healing runs for a number of steps, cycling over the data. Its position is the count of
batches consumed (over all processes); the batch with global number ``g`` is batch
``g mod L`` of epoch ``g div L`` (``L`` batches per epoch). :class:`SeededBatches` gives each
epoch's order as a function of ``(seed, epoch)`` only, so a resumed run decodes exactly the
batches an uninterrupted run would have decoded next, without reading the ones before.

:func:`stream` walks this order for one process of ``world``: process ``rank`` takes global
batches ``first + rank``, ``first + rank + world``, ... Any other re-iterable (a list, a
``DataLoader``) is walked by iterating it from its start and skipping (exact when each pass
yields the same batches in the same order).

Example:
    >>> import torch
    >>> data = SeededBatches(torch.arange(10).float().unsqueeze(1), batch_size=4, seed=0)
    >>> len(data), [b.squeeze(1).tolist() for b in data.epoch(0)]
    (3, [[4.0, 1.0, 7.0, 5.0], [3.0, 9.0, 0.0, 8.0], [6.0, 2.0]])
    >>> [(e, i) for e, i, _ in itertools.islice(stream(data, first=2, rank=0, world=1), 3)]
    [(0, 2), (1, 0), (1, 1)]
"""

from __future__ import annotations

import itertools  # noqa: F401  (the doctest uses it)
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..errors import UsageError
from .results import CalibrationUsageError

__all__ = ["SeededBatches", "stream", "EmptyDataError"]


class EmptyDataError(CalibrationUsageError):
    """The data yields no batch (at all, or on re-iteration)."""


class SeededBatches:
    """Batches of a map-style ``dataset`` in an order fixed by ``(seed, epoch)``.

    ``batch_size`` samples per batch (the last one may be smaller), collated by a
    ``DataLoader`` with ``num_workers``; ``batch_size=None``: the dataset's items are already
    batches (a list of batches). ``shuffle=False`` keeps the dataset's order in every epoch.
    Iterating it gives epoch 0.
    """

    def __init__(self, dataset: Any, batch_size: Optional[int] = None, *, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0) -> None:
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"SeededBatches: batch_size must be >= 1 or None, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.samples = len(dataset)

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.samples
        return -(-self.samples // self.batch_size)

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.samples, generator=g).tolist()

    def epoch(self, epoch: int, positions: Optional[Sequence[int]] = None) -> Iterator[Any]:
        """The batches of ``epoch`` at ``positions`` (default: all), decoding only those."""
        perm = self._perm(epoch)
        wanted = range(len(self)) if positions is None else positions
        if self.batch_size is None:
            return (self.dataset[perm[p]] for p in wanted)
        b = self.batch_size
        chunks = [perm[p * b:(p + 1) * b] for p in wanted]
        if not chunks:
            return iter(())
        # its own generator: creating a DataLoader iterator must not draw from the global RNG (a resumed run
        # creates one where an uninterrupted run did not, and dropout would then draw differently)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return iter(DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.num_workers, generator=gen))

    def __iter__(self) -> Iterator[Any]:
        return self.epoch(0)


def stream(data: Iterable[Any], *, first: int, rank: int, world: int) -> Iterator[tuple[int, int, Any]]:
    """Endless ``(epoch, index in the epoch, batch)`` for process ``rank`` of ``world``,
    starting after ``first`` batches consumed (see the module docstring).

    Raises:
        EmptyDataError: ``data`` yields no batch, or nothing on re-iteration (a one-shot iterator).
    """
    want = first + rank
    if isinstance(data, SeededBatches):
        length = len(data)
        if length == 0:
            raise EmptyDataError("heal: the data holds no sample.")
        while True:
            epoch, index = divmod(want, length)
            positions = list(range(index, length, world))
            for p, batch in zip(positions, data.epoch(epoch, positions)):
                yield epoch, p, batch
            want = epoch * length + positions[-1] + world
    g = epoch = 0
    while True:
        n = 0
        for i, batch in enumerate(data):
            n += 1
            if g == want:
                yield epoch, i, batch
                want += world
            g += 1
        if n == 0:
            raise EmptyDataError(
                "heal: `data` yielded no batches" + (" on re-iteration (a one-shot iterator?)" if g else "")
                + ". Hint: pass a list of batches or a DataLoader, which can be iterated more than once."
            )
        epoch += 1
