"""Budgets (issue 18): the allocator against brute force, budget parsing, the plan under a budget
(MACs counted on the result), refusals before any work, the API, the recipe section and the CLI."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from dsrewrite.budget.allocate import Infeasible, Option, Unreachable, allocate, frontier
from dsrewrite.budget.types import BudgetError, parse_budget
from dsrewrite.errors import RecipeError, UsageError
from dsrewrite.measure.macs import count_costs


# --------------------------------------------------------------------------------------
# allocation: pure
# --------------------------------------------------------------------------------------
def _instance(rng: random.Random, groups: int, options: int) -> list[list[Option]]:
    out = []
    for _ in range(groups):
        n = rng.randint(1, options)
        out.append([Option(rng.randint(1, 40), round(rng.uniform(0, 5), 3)) for _ in range(n)])
    return out


def _brute(groups, max_cost=None, max_error=None):
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        cost = sum(groups[g][i].cost for g, i in enumerate(choice))
        err = 0.0
        for g, i in enumerate(choice):
            err += groups[g][i].error
        if max_cost is not None and cost > max_cost:
            continue
        if max_cost is None and err > max_error:
            continue
        key = (err, cost) if max_cost is not None else (cost, err)
        if best is None or key < best[0]:
            best = (key, choice, cost, err)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocator_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    groups = _instance(rng, rng.randint(1, 5), 5)
    lo = sum(min(o.cost for o in g) for g in groups)
    hi = sum(max(o.cost for o in g) for g in groups)
    budget = rng.randint(lo, hi)
    a = allocate(groups, max_cost=budget)
    ref = _brute(groups, max_cost=budget)
    assert a.cost <= budget
    assert math.isclose(a.error, ref[3], abs_tol=1e-9), (a, ref)
    # the reverse problem: fewest cost under an error ceiling
    ceiling = rng.uniform(sum(min(o.error for o in g) for g in groups), sum(max(o.error for o in g) for g in groups))
    b = allocate(groups, max_error=ceiling)
    ref2 = _brute(groups, max_error=ceiling)
    assert b.error <= ceiling and b.cost == ref2[2], (b, ref2)


def test_frontier_is_the_pareto_set_of_brute_force() -> None:
    rng = random.Random(7)
    groups = _instance(rng, 4, 4)
    pts = {(a.cost, round(a.error, 9)) for a in frontier(groups)}
    every = []
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        every.append((sum(groups[g][i].cost for g, i in enumerate(choice)),
                      round(sum(groups[g][i].error for g, i in enumerate(choice)), 9)))
    pareto = {p for p in every if not any(q[0] <= p[0] and q[1] < p[1] or q[0] < p[0] and q[1] <= p[1] for q in every)}
    assert pts == pareto


def test_greedy_fallback_is_feasible_and_not_better_than_exact() -> None:
    rng = random.Random(3)
    groups = _instance(rng, 8, 6)
    budget = sum(min(o.cost for o in g) for g in groups) + 60
    exact = allocate(groups, max_cost=budget)
    greedy = allocate(groups, max_cost=budget, max_states=1)
    assert greedy.method == "greedy" and exact.method == "exact"
    assert greedy.cost <= budget and greedy.error >= exact.error - 1e-12


def test_allocator_is_deterministic_and_refuses_clearly() -> None:
    groups = [[Option(10, 0.0), Option(4, 1.0), Option(4, 1.0)], [Option(8, 0.0), Option(3, 2.0)]]
    runs = {allocate(groups, max_cost=13) for _ in range(5)}
    assert len(runs) == 1 and next(iter(runs)).choice == (1, 0)  # ties: the earlier option
    with pytest.raises(Infeasible) as exc:
        allocate(groups, max_cost=6)
    assert exc.value.cheapest == 7
    with pytest.raises(Unreachable) as exc2:
        allocate(groups, max_cost=13, max_error=0.5)
    assert exc2.value.best.error == 1.0
    with pytest.raises(ValueError, match="finite"):
        allocate([[Option(1, float("nan"))]], max_cost=3)


# --------------------------------------------------------------------------------------
# budget records
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"mac": 1e9}, "did you mean 'macs'"),
    ({"macs": -1}, "finite number > 0"),
    ({"macs": float("nan")}, "finite number > 0"),
    ({"macs": float("inf")}, "finite number > 0"),
    ({"macs": True}, "must be a number"),
    ({"macs": "1e9"}, "must be a number"),
    ({"macs": 0.5, "params": 0.5}, "not both"),
    ({"latency_ms": 5.0, "params": 0.5}, "not both"),
    ({"max_error": 1.5}, "relative output error"),
    ([("macs", 1)], "expected a mapping"),
])
def test_bad_budgets_are_refused_with_the_key(bad, match) -> None:
    with pytest.raises(BudgetError, match=match):
        parse_budget(bad)
    assert issubclass(BudgetError, UsageError)


def test_fraction_versus_absolute() -> None:
    assert parse_budget({"macs": 0.25}).absolute("macs", 1000) == 250
    assert parse_budget({"macs": 600}).absolute("macs", 1000) == 600
    assert parse_budget({}) is None and parse_budget(None) is None


# --------------------------------------------------------------------------------------
# planning on models
# --------------------------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1),
    ).eval()


def _data(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("fraction", [0.35, 0.5, 0.8])
def test_budget_is_respected_on_the_counted_model(fraction: float) -> None:
    from dsrewrite.api import rewrite_and_report

    net, data = _net(), _data()
    x = data[0][:1]
    before = [p.detach().clone() for p in net.parameters()]
    total = count_costs(net, x).total_macs
    res = rewrite_and_report(net, "all_3x3", example_inputs=x, calibration=data, budget={"macs": fraction},
                             order="auto")
    counted = count_costs(res.model, x).total_macs
    assert counted <= math.floor(fraction * total), (counted, fraction * total)
    check = [n for n in res.plan.notes if n.startswith("budget check")]
    assert check and f"{counted:,} MACs" in check[0] and "× the prediction" in check[0]
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the caller's model is untouched
    assert all(e.reason for e in res.plan.entries)
    assert any("budget:" in e.reason for e in res.plan.replaced)


def test_budget_plans_are_deterministic() -> None:
    from dsrewrite.api import plan_rewrite

    net, data = _net(), _data()
    x = data[0][:1]
    a = plan_rewrite(net, "all_3x3", x, budget={"macs": 0.5}, calibration=data, order="auto")
    b = plan_rewrite(_net(), "all_3x3", x, budget={"macs": 0.5}, calibration=_data(), order="auto")
    assert a.to_json() == b.to_json()


def test_more_budget_never_predicts_more_error() -> None:
    from dsrewrite.budget.planner import plan_with_budget

    net, data = _net(), _data()
    x = data[0][:1]
    errs = [plan_with_budget(net, "all_3x3", x, parse_budget({"macs": f}), calibration=data).predicted_error
            for f in (0.35, 0.5, 0.7, 0.95)]
    assert errs == sorted(errs, reverse=True), errs


def test_impossible_budget_is_refused_before_any_work(monkeypatch) -> None:
    import dsrewrite.budget.planner as planner
    from dsrewrite.api import rewrite

    def boom(*a, **k):  # the sensitivity must not run
        raise AssertionError("sensitivity ran")

    monkeypatch.setattr(planner, "data_sensitivity", boom)
    monkeypatch.setattr(planner, "weight_sensitivity", boom)
    net, data = _net(), _data()
    with pytest.raises(BudgetError, match=r"cannot be met: .* has ([\d,]+) MACs .* ask for at least \1 MACs"):
        rewrite(net, "all_3x3", example_inputs=data[0][:1], calibration=data, budget={"macs": 0.05})


def test_unreachable_error_ceiling_names_the_best_reachable_error() -> None:
    from dsrewrite.budget.planner import plan_with_budget

    net, data = _net(), _data()
    x = data[0][:1]
    best = plan_with_budget(net, "all_3x3", x, parse_budget({"macs": 0.35}), calibration=data).predicted_error
    with pytest.raises(BudgetError, match=f"best reachable predicted output error is {best:.4g}"):
        plan_with_budget(net, "all_3x3", x, parse_budget({"macs": 0.35, "max_error": best / 2}), calibration=data)
    ok = plan_with_budget(net, "all_3x3", x, parse_budget({"max_error": best}), calibration=data)
    assert ok.predicted_error <= best and ok.planned_macs <= count_costs(net, x).total_macs


def test_without_data_the_plan_says_it_used_the_weight_proxy() -> None:
    from dsrewrite.api import plan_rewrite

    net = _net()
    p = plan_rewrite(net, "all_3x3", _data()[0][:1], budget={"params": 0.5})
    assert any("weight-space proxy" in n for n in p.notes)
    assert sum(1 for e in p.entries if e.replaced) >= 1


def test_depth_multiplier_with_a_budget_is_refused() -> None:
    from dsrewrite.api import rewrite

    with pytest.raises(UsageError, match="chooses each conv's depth multiplier"):
        rewrite(_net(), "all_3x3", example_inputs=_data()[0][:1], budget={"macs": 0.5}, depth_multiplier=2)


def test_data_sensitivity_predicts_the_single_layer_error() -> None:
    """The gain is measured with the m=1 block alone: replacing only that conv, the prediction is the measurement."""
    from dsrewrite.budget.candidates import layer_candidates
    from dsrewrite.budget.sensitivity import data_sensitivity
    from dsrewrite.planning.capture import capture

    net, data = _net(), _data()
    x = data[0][:1]
    cap = capture(net, x).by_name()
    costs = count_costs(net, x)
    lc = layer_candidates(cap["4"], net[4], ("dw_pw",), dense_macs=costs.modules["4"].macs)
    s = data_sensitivity(net, [lc], data, gain_images=8)
    e = s.layers[0].errors
    assert e[0] == 0.0 and all(a >= b for a, b in zip(e[1:], e[2:])), e
    assert e[-1] < e[1]


# --------------------------------------------------------------------------------------
# recipe and CLI
# --------------------------------------------------------------------------------------
def test_recipe_budget_section(tmp_path) -> None:
    from dsrewrite.recipe import load_recipe

    r = load_recipe({"name": "b", "extends": "all_3x3", "budget": {"macs": 0.5}})
    assert r.budget.macs == 0.5
    bad = tmp_path / "r.yaml"
    bad.write_text("name: b\nextends: all_3x3\nbudget:\n  mcas: 0.5\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r.yaml, line 4: budget.mcas: unknown key 'mcas' \(did you mean 'macs'\?\)"):
        load_recipe(str(bad))
    bad.write_text("name: b\nbudget:\n  macs: -2\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"budget.macs: -2 is out of range"):
        load_recipe(str(bad))
    bad.write_text("name: b\nbudget:\n  latency_ms: 3\n  macs: 0.5\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"budget: give one cost target .*not both"):
        load_recipe(str(bad))


def test_recipe_budget_is_used_by_rewrite() -> None:
    from dsrewrite.api import rewrite

    net, data = _net(), _data()
    x = data[0][:1]
    total = count_costs(net, x).total_macs
    light = rewrite(net, {"name": "b", "extends": "all_3x3", "budget": {"macs": 0.6}}, example_inputs=x,
                    calibration=data)
    assert count_costs(light, x).total_macs <= 0.6 * total


def test_cli_budget_refusal_exits_2_and_plan_prints_the_choice(tmp_path) -> None:
    from click.testing import CliRunner

    from dsrewrite.cli import main

    net = _net()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    runner = CliRunner()
    r = runner.invoke(main, ["plan", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16",
                             "--trust-pickle", "--target-macs", "0.01"])
    assert r.exit_code == 2, r.output
    assert "cannot be met" in r.output and "ask for at least" in r.output
    r = runner.invoke(main, ["plan", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16",
                             "--trust-pickle", "--target-macs", "0.5"])
    assert r.exit_code == 0, r.output
    assert "budget (budget: macs 0.5 of the model)" in r.output
    r = runner.invoke(main, ["plan", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16",
                             "--trust-pickle", "--target-latency", "3", "--target-macs", "0.5"])
    assert r.exit_code == 2 and "not both" in r.output


def _saved_net_and_calib(tmp_path: Path) -> tuple[Path, Path]:
    """``_net()`` pickled to ``net.pt`` and ``_data()`` to ``calib.pt`` in ``tmp_path``, for the CLI tests."""
    path, data = tmp_path / "net.pt", tmp_path / "calib.pt"
    torch.save(_net(), path)
    torch.save(torch.cat(_data()), data)
    return path, data


def test_cli_budget_sweep_prints_and_plots(tmp_path) -> None:
    from click.testing import CliRunner

    from dsrewrite.cli import main

    path, data = _saved_net_and_calib(tmp_path)
    png = tmp_path / "sweep.png"
    r = CliRunner().invoke(main, ["plan", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16",
                                  "--trust-pickle", "--calib", str(data), "--budget-sweep", "0.4,0.7",
                                  "--sweep-plot", str(png)])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("| budget") or l.startswith("| uniform")]
    assert len(lines) >= 3, r.output
    assert all(not l.rstrip().endswith("| – |") for l in lines)  # every point measured
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_budget_sweep_times_each_point_when_asked(tmp_path) -> None:
    """--sweep-latency: a latency column (ratio to dense, measured) for every measured point, and a second panel."""
    from click.testing import CliRunner

    from dsrewrite.cli import main

    path, data = _saved_net_and_calib(tmp_path)
    png = tmp_path / "sweep.png"
    args = ["plan", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16", "--trust-pickle", "--calib",
            str(data), "--budget-sweep", "0.5"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0 and "latency" not in plain.output, plain.output
    r = CliRunner().invoke(main, [*args, "--sweep-latency", "3", "--sweep-plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "| latency (of dense) |" in r.output
    rows = [l for l in r.output.splitlines() if l.startswith("| budget") or l.startswith("| uniform")]
    assert rows
    for row in rows:
        ratio = float(row.rstrip(" |").rsplit("|", 1)[1])
        assert 0.0 < ratio < 100.0, row
    from matplotlib.image import imread

    h, w = imread(str(png)).shape[:2]
    assert w > 1.5 * h, (w, h)  # two panels side by side
    bad = CliRunner().invoke(main, [*args, "--sweep-latency", "-1"])
    assert bad.exit_code == 2 and "--sweep-latency" in bad.output


def test_cli_apply_with_a_budget_writes_a_model_within_it(tmp_path) -> None:
    from click.testing import CliRunner

    from dsrewrite.cli import main

    path, data = _saved_net_and_calib(tmp_path)
    out = tmp_path / "light.pt"
    r = CliRunner().invoke(main, ["apply", str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16",
                                  "--trust-pickle", "--calib", str(data), "--target-macs", "0.5", "--order", "auto",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "budget (budget: macs 0.5 of the model)" in r.output and "measured after calibration" in r.output
    light = torch.load(out, weights_only=False)
    x = torch.zeros(1, 3, 16, 16)
    assert count_costs(light, x).total_macs <= 0.5 * count_costs(_net(), x).total_macs
