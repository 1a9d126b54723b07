# SPDX-License-Identifier: Apache-2.0
"""Allocation: one option per group, least total error within a cost (multiple-choice knapsack).

Pure Python, no torch: a group is one conv, an option one candidate for it (keep dense, or a
kind at a depth multiplier) with an integer ``cost`` (MACs or parameters) and an additive
``error`` (the predicted squared output error it contributes). Two methods:

* ``exact``: dynamic programming over the Pareto set of partial configurations (cost, error),
  adding one group at a time and dropping every dominated pair; exact costs, no discretisation.
  States that cannot fit the remaining budget are dropped as they appear. Used while the set
  stays under ``max_states``.
* ``greedy``: from the cheapest configuration, repeatedly take the upgrade with the best error
  saved per unit of cost on each group's lower convex hull (the classic MCKP greedy); optimal at
  hull vertices, near-optimal otherwise.

Both are deterministic: ties go to the earlier group and option.

Example:
    >>> groups = [[Option(10, 0.0), Option(4, 1.0), Option(2, 3.0)], [Option(8, 0.0), Option(3, 2.0)]]
    >>> a = allocate(groups, max_cost=13)
    >>> a.choice, a.cost, a.error, a.method
    ((1, 0), 12, 1.0, 'exact')
    >>> allocate(groups, max_cost=4)
    Traceback (most recent call last):
    ...
    dsrewrite.budget.allocate.Infeasible: the cheapest configuration costs 5 > 4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["Option", "Allocation", "Infeasible", "Unreachable", "allocate", "frontier", "cheapest", "MAX_STATES"]

#: Largest Pareto set the exact method keeps before it hands over to the greedy one.
MAX_STATES = 100_000


@dataclass(frozen=True)
class Option:
    """One candidate of a group: its cost (an integer count) and its additive error (≥ 0)."""

    cost: int
    error: float


@dataclass(frozen=True)
class Allocation:
    """One configuration: ``choice[g]`` is the option index of group ``g``; totals; ``"exact"``/``"greedy"``."""

    choice: tuple[int, ...]
    cost: int
    error: float
    method: str


class Infeasible(ValueError):
    """Even the cheapest configuration costs more than the budget; ``cheapest`` is its cost."""

    def __init__(self, cheapest: int, budget: int) -> None:
        super().__init__(f"the cheapest configuration costs {cheapest} > {budget}")
        self.cheapest, self.budget = cheapest, budget


class Unreachable(ValueError):
    """No configuration within the cost has an error under the ceiling; ``best`` is the best one."""

    def __init__(self, best: Allocation, ceiling: float) -> None:
        super().__init__(f"the least error within the budget is {best.error:g} > {ceiling:g}")
        self.best, self.ceiling = best, ceiling


def _check(groups: Sequence[Sequence[Option]]) -> None:
    for g, opts in enumerate(groups):
        if not opts:
            raise ValueError(f"group {g} has no option")
        for o in opts:
            if not (o.error >= 0) or o.error != o.error or o.error == float("inf"):
                raise ValueError(f"group {g}: option error must be finite and ≥ 0, got {o.error!r}")


def cheapest(groups: Sequence[Sequence[Option]]) -> Allocation:
    """The cheapest configuration (ties: the lower error, then the earlier option)."""
    _check(groups)
    choice = tuple(min(range(len(o)), key=lambda i, o=o: (o[i].cost, o[i].error, i)) for o in groups)
    return _total(groups, choice, "exact")


def _total(groups: Sequence[Sequence[Option]], choice: tuple[int, ...], method: str) -> Allocation:
    err = 0.0
    for g, i in enumerate(choice):
        err += groups[g][i].error
    return Allocation(choice, sum(groups[g][i].cost for g, i in enumerate(choice)), err, method)


def _unwind(back: Any, n: int) -> tuple[int, ...]:
    out = []
    while back is not None:
        idx, back = back
        out.append(idx)
    out.reverse()
    assert len(out) == n  # internal invariant
    return tuple(out)


def _pareto(groups: Sequence[Sequence[Option]], max_cost: Optional[int], max_error: Optional[float],
            max_states: int) -> Optional[list[Allocation]]:
    """The exact Pareto set (cost ascending, error strictly descending), or ``None`` when it grows too big."""
    n = len(groups)
    min_cost_rest = [0] * (n + 1)
    min_err_rest = [0.0] * (n + 1)
    for g in range(n - 1, -1, -1):
        min_cost_rest[g] = min_cost_rest[g + 1] + min(o.cost for o in groups[g])
        min_err_rest[g] = min_err_rest[g + 1] + min(o.error for o in groups[g])
    states: list[tuple[int, float, Any]] = [(0, 0.0, None)]
    for g, opts in enumerate(groups):
        cand = []
        for s, (c0, e0, back) in enumerate(states):
            for i, o in enumerate(opts):
                c, e = c0 + o.cost, e0 + o.error
                if max_cost is not None and c + min_cost_rest[g + 1] > max_cost:
                    continue
                if max_cost is None and max_error is not None and e + min_err_rest[g + 1] > max_error:
                    continue
                cand.append((c, e, s, i, back))
        cand.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
        states = []
        best = float("inf")
        for c, e, _, i, back in cand:
            if e < best:
                states.append((c, e, (i, back)))
                best = e
        if len(states) > max_states:
            return None
    return [Allocation(_unwind(b, n), c, e, "exact") for c, e, b in states]


def _hulls(groups: Sequence[Sequence[Option]]) -> list[list[int]]:
    """Per group: option indices on the lower convex hull of (cost, error), cost ascending."""
    hulls = []
    for opts in groups:
        order = sorted(range(len(opts)), key=lambda i: (opts[i].cost, opts[i].error, i))
        pts: list[int] = []
        for i in order:
            if pts and opts[i].error >= opts[pts[-1]].error:
                continue  # dominated: costs no less, saves nothing
            while len(pts) >= 2:
                a, b = opts[pts[-2]], opts[pts[-1]]
                c = opts[i]
                # drop b when it lies on or above the segment a-c
                if (b.error - a.error) * (c.cost - a.cost) >= (c.error - a.error) * (b.cost - a.cost):
                    pts.pop()
                else:
                    break
            pts.append(i)
        hulls.append(pts)
    return hulls


def _greedy_path(groups: Sequence[Sequence[Option]], max_cost: Optional[int]) -> list[Allocation]:
    """Configurations along the greedy upgrade path from the cheapest (cost ascending)."""
    hulls = _hulls(groups)
    pos = [0] * len(groups)
    cur = _total(groups, tuple(h[0] for h in hulls), "greedy")
    path = [cur]
    blocked: set[int] = set()
    while True:
        best = None
        for g, h in enumerate(hulls):
            if g in blocked or pos[g] + 1 >= len(h):
                continue
            a, b = groups[g][h[pos[g]]], groups[g][h[pos[g] + 1]]
            dc, de = b.cost - a.cost, a.error - b.error
            ratio = de / dc if dc > 0 else float("inf")
            if best is None or ratio > best[0]:
                best = (ratio, g, dc)
        if best is None:
            return path
        _, g, dc = best
        if max_cost is not None and cur.cost + dc > max_cost:
            blocked.add(g)  # this group's next step does not fit; others' may
            continue
        pos[g] += 1
        choice = list(cur.choice)
        choice[g] = hulls[g][pos[g]]
        cur = _total(groups, tuple(choice), "greedy")
        path.append(cur)


def frontier(groups: Sequence[Sequence[Option]], *, max_states: int = MAX_STATES) -> list[Allocation]:
    """Every Pareto-optimal configuration (cost ascending, error descending): exact, else the greedy path.

    Example:
        >>> [(a.cost, a.error) for a in frontier([[Option(2, 1.0), Option(5, 0.0)], [Option(1, 2.0), Option(3, 0.5)]])]
        [(3, 3.0), (5, 1.5), (8, 0.5)]
    """
    _check(groups)
    exact = _pareto(groups, None, None, max_states)
    return exact if exact is not None else _greedy_path(groups, None)


def allocate(groups: Sequence[Sequence[Option]], *, max_cost: Optional[int] = None,
             max_error: Optional[float] = None, max_states: int = MAX_STATES) -> Allocation:
    """One option per group.

    * ``max_cost`` (with or without ``max_error``): the least total error with cost ≤ ``max_cost``;
      with ``max_error`` it must also be ≤ ``max_error``.
    * ``max_error`` alone: the least cost with total error ≤ ``max_error`` (ties: the lower error).

    Raises:
        Infeasible: the cheapest configuration costs more than ``max_cost``.
        Unreachable: no configuration within ``max_cost`` has error ≤ ``max_error`` (``best`` is the
            least error within the cost; without ``max_cost``: the least error of all).
        ValueError: an empty group, or an error that is negative or not finite.
    """
    if max_cost is None and max_error is None:
        raise ValueError("allocate needs max_cost, max_error or both")
    low = cheapest(groups)
    if max_cost is not None and low.cost > max_cost:
        raise Infeasible(low.cost, max_cost)
    states = _pareto(groups, max_cost, max_error, max_states)
    if states is None:
        path = _greedy_path(groups, max_cost)
        states = [a for a in path if max_cost is None or a.cost <= max_cost]
    if max_cost is not None:
        best = min(states, key=lambda a: (a.error, a.cost, a.choice))
        if max_error is not None and best.error > max_error:
            raise Unreachable(best, max_error)
        return best
    fits = [a for a in states if a.error <= max_error]  # type: ignore[operator]
    if not fits:
        every = _pareto(groups, None, None, max_states) or _greedy_path(groups, None)
        raise Unreachable(min(every, key=lambda a: (a.error, a.cost, a.choice)), max_error)  # type: ignore[arg-type]
    return min(fits, key=lambda a: (a.cost, a.error, a.choice))
