"""Latency budgets (issue 18, ``latency_ms``): planning from given timings (the allocation against brute
force, the additive prediction, determinism, the refusal before any work), the plan's reasons in ms, the
check after the rewrite, the recipe key, the CLI flag, and one real run that only checks structure.

Timings are noisy: nothing here asserts an absolute time. Every test but the last plans from a fake
timer (times that follow the candidates' MACs), passed in or monkeypatched into
``dsrewrite.budget.latency_costs``.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn

import dsrewrite.budget.latency_costs as lc_mod
from dsrewrite.budget.latency_costs import NS_PER_MS, LatencyTimer
from dsrewrite.budget.planner import plan_with_budget
from dsrewrite.budget.types import BudgetError, parse_budget
from dsrewrite.errors import RecipeError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1),
    ).eval()


def _data(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


class FakeTimes:
    """Deterministic 'measurements': a candidate's time is an affine function of its MACs (a per-layer
    overhead makes the small multipliers relatively slow, as on a CPU); the model is 0.2 ms more than its convs."""

    def __init__(self, per_mac: float = 1e-6, overhead: float = 0.03, result: tuple = (1.0, 0.6, 0.6),
                 slower: float = 1.0, alpha: float = 1.0) -> None:
        self.per_mac, self.overhead, self.result_value, self.slower = per_mac, overhead, result, slower
        self.alpha = alpha
        self.layers: dict[str, list[float]] = {}
        self.specs: list = []
        self.confirmed: list[tuple[str, int]] = []
        self.calls = {"model": 0, "layer": 0, "result": 0, "confirm": 0, "fastest": 0}

    def layer(self, conv, lc, cfg, spec):
        self.calls["layer"] += 1
        self.specs.append(spec)
        ms = [c.macs * self.per_mac + (0.0 if c.dense else self.overhead) for c in lc.candidates]
        self.layers[lc.name] = ms
        return ms

    def confirm(self, conv, lc, index, cfg, spec):
        """The re-timing with more rounds: ``slower`` times the quick ratio (2.0: every block was timed too fast)."""
        self.calls["confirm"] += 1
        self.confirmed.append((lc.name, index))
        ms = self.layers[lc.name]
        return 2 * ms[0], 2 * ms[index] * self.slower

    def fastest(self, dense, fast, x, spec):
        """The model with every conv at its fastest block: ``alpha`` × the saving the plain sum predicts."""
        self.calls["fastest"] += 1
        model = self.model(dense, x, spec)
        self.calls["model"] -= 1
        saved = sum(t[0] - min(t) for t in self.layers.values()) / model
        return model, model * (1 - self.alpha * saved), 1 - self.alpha * saved

    def model(self, model, x, spec):
        self.calls["model"] += 1
        return sum(t[0] for t in self.layers.values()) + 0.2

    def result(self, dense, rewritten, x, spec):
        self.calls["result"] += 1
        return self.result_value

    def timer(self) -> LatencyTimer:
        return LatencyTimer(model=self.model, layer=self.layer, result=self.result, confirm=self.confirm,
                            fastest=self.fastest)

    def patch(self, monkeypatch) -> "FakeTimes":
        monkeypatch.setattr(lc_mod, "time_model", self.model)
        monkeypatch.setattr(lc_mod, "time_layer", self.layer)
        monkeypatch.setattr(lc_mod, "time_result", self.result)
        monkeypatch.setattr(lc_mod, "time_confirm", self.confirm)
        monkeypatch.setattr(lc_mod, "time_fastest", self.fastest)
        return self


# --------------------------------------------------------------------------------------
# the budget record
# --------------------------------------------------------------------------------------
def test_latency_budget_parses_and_combines_like_the_others() -> None:
    b = parse_budget({"latency_ms": 0.6})
    assert b.cost_key == "latency_ms" and b.is_fraction("latency_ms")
    assert not parse_budget({"latency_ms": 12.0}).is_fraction("latency_ms")
    assert parse_budget({"latency_ms": 12.0, "max_error": 0.1}).cost_key == "latency_ms"
    for other in ("macs", "params"):
        with pytest.raises(BudgetError, match=rf"one cost target .* not both \(got {other} 0.5 and latency_ms 3\)"):
            parse_budget({other: 0.5, "latency_ms": 3})
    with pytest.raises(BudgetError, match="not several"):
        parse_budget({"macs": 0.5, "params": 0.5, "latency_ms": 3})
    with pytest.raises(BudgetError, match="finite number > 0"):
        parse_budget({"latency_ms": 0})


# --------------------------------------------------------------------------------------
# planning from given timings
# --------------------------------------------------------------------------------------
def _brute(costs: list[list[int]], errors: list[tuple[float, ...]], limit: int) -> float:
    best = math.inf
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[g][i] for g, i in enumerate(choice)) <= limit:
            best = min(best, sum(errors[g][i] for g, i in enumerate(choice)))
    return best


@pytest.mark.parametrize("fraction", [0.5, 0.65, 0.8])
def test_allocation_is_optimal_and_within_the_predicted_latency(fraction: float) -> None:
    fake = FakeTimes()
    net, x = _net(), _data()[0][:1]
    bp = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": fraction}), max_m=4,
                          latency_timer=fake.timer())
    lat = bp.latency
    assert lat is not None and bp.budget_key == "latency_ms"
    # the costs are the given times in integer ns; the model's time is the fake's
    names = [lc.name for lc in bp.problem.layers]
    assert [list(t) for _, t in lat.layers] == [pytest.approx(fake.layers[n], rel=1e-12) for n in names]
    assert lat.model_ms == pytest.approx(sum(t[0] for t in fake.layers.values()) + 0.2)
    costs = [lat.costs_ns(i) for i in range(len(names))]
    assert all(abs(c - t * NS_PER_MS) <= 1 for n, cs in zip(names, costs) for c, t in zip(cs, fake.layers[n]))
    limit = math.floor(fraction * round(lat.model_ms * NS_PER_MS))
    assert bp.budget_value == limit
    # the additive prediction: dense model − Σ dense conv times + Σ chosen times
    chosen = sum(fake.layers[n][i] for n, i in zip(names, bp.allocation.choice))
    dense = sum(fake.layers[n][0] for n in names)
    pred = lat.predicted_ms(bp.allocation.choice)
    assert pred == pytest.approx(lat.model_ms - dense + chosen, abs=1e-5)
    assert pred * NS_PER_MS <= limit
    # optimal: no configuration within the limit has a lower predicted error
    errors = [ls.errors for ls in bp.sensitivity.layers]
    best = _brute(costs, errors, limit - lat.fixed_ns)
    assert bp.allocation.error == pytest.approx(best, rel=1e-12, abs=1e-15), (bp.allocation.error, best)
    note = [n for n in bp.plan.notes if n.startswith("latency budget:")]
    assert note and f"predicted {pred:.6g} ms" in note[0]
    assert any(n.startswith("latency costs:") and "α = 1.000" in n and "integer nanoseconds" in n
               for n in bp.plan.notes)
    assert lat.scale == pytest.approx(1.0) and fake.calls["fastest"] == 1


def test_more_latency_never_predicts_more_error_and_plans_are_deterministic() -> None:
    net, x = _net(), _data()[0][:1]
    errs = [plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": f}), max_m=4,
                             latency_timer=FakeTimes().timer()).predicted_error for f in (0.5, 0.65, 0.8, 0.95)]
    assert errs == sorted(errs, reverse=True), errs
    a = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6}), latency_timer=FakeTimes().timer())
    b = plan_with_budget(_net(), "all_3x3", x, parse_budget({"latency_ms": 0.6}), latency_timer=FakeTimes().timer())
    assert a.plan.to_json() == b.plan.to_json()


def test_plan_entries_give_each_choice_in_ms() -> None:
    fake = FakeTimes()
    net, x = _net(), _data()[0][:1]
    bp = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6}), latency_timer=fake.timer())
    by_name = {e.name: e for e in bp.plan.entries}
    kinds = {"replace": 0, "dense": 0}
    for lc, i in zip(bp.problem.layers, bp.allocation.choice):
        e = by_name[lc.name]
        ms = fake.layers[lc.name]
        assert e.measured["dense_ms"] == ms[0] and e.measured["budget_ms"] == pytest.approx(ms[i], rel=1e-12)
        if i == 0:
            kinds["dense"] += 1
            assert not e.replaced and e.reason.startswith("kept dense (budget): ")
        else:
            kinds["replace"] += 1
            c = lc.candidates[i]
            assert e.replaced and (e.config.order, e.config.depth_multiplier) == (c.kind, c.m)
            assert e.reason.startswith(f"budget: {c.label}: {ms[i]:.3g} ms (dense {ms[0]:.3g} ms, measured)"), e.reason
    assert kinds["replace"] >= 1, kinds


def test_max_error_with_a_latency_budget_is_refused_with_the_best_error() -> None:
    net, data = _net(), _data()
    x = data[0][:1]
    best = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6}), calibration=data,
                            latency_timer=FakeTimes().timer()).predicted_error
    with pytest.raises(BudgetError, match=r"max_error .* cannot be met within latency .* ms .*best reachable"):
        plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6, "max_error": best / 2}),
                         calibration=data, latency_timer=FakeTimes().timer())


def test_the_scale_is_calibrated_on_the_all_fastest_model() -> None:
    net, x = _net(), _data()[0][:1]
    fake = FakeTimes(alpha=0.5)  # the model with every conv at its fastest saves half what the plain sum says
    bp = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.8}), max_m=4, latency_timer=fake.timer())
    lat = bp.latency
    assert lat.scale == pytest.approx(0.5)
    names = [lc.name for lc in bp.problem.layers]
    dense = sum(fake.layers[n][0] for n in names)
    chosen = sum(lat.layers[l][1][i] for l, i in enumerate(bp.allocation.choice))
    assert lat.predicted_ms(bp.allocation.choice) == pytest.approx(lat.model_ms - 0.5 * (dense - chosen), abs=1e-5)
    # the floor is what the all-fastest model measured: a target under it is refused with that figure
    saved = sum(t[0] - min(t) for t in fake.layers.values()) / lat.model_ms
    floor = 1 - 0.5 * saved
    assert any(f"ran at {floor:.3f} of the dense model" in n and "α = 0.500" in n for n in bp.plan.notes)
    with pytest.raises(BudgetError, match=rf"predicted latency is \S+ ms \({100 * floor:.1f}% of the dense model; "
                                          rf"that model, built and timed against the dense one, ran at {floor:.3f}"):
        plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": floor - 0.02}), max_m=4,
                         latency_timer=FakeTimes(alpha=0.5).timer())
    plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": floor + 0.02}), max_m=4,
                     latency_timer=FakeTimes(alpha=0.5).timer())


def test_chosen_blocks_are_re_timed_and_the_plan_follows_the_confirmed_times() -> None:
    net, x = _net(), _data()[0][:1]
    quick = FakeTimes()  # re-timing agrees: the first choice stands, each chosen block re-timed once
    a = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6}), max_m=4, latency_timer=quick.timer())
    chosen = [(lc.name, i) for lc, i in zip(a.problem.layers, a.allocation.choice) if i]
    assert chosen and sorted(quick.confirmed) == sorted(chosen)
    assert a.latency.passes == 1 and a.latency.unconfirmed == 0
    assert any("re-timed against their dense conv with 15 rounds" in n for n in a.plan.notes)
    slow = FakeTimes(slower=1.6)  # every block 1.6× slower than first timed
    b = plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.6}), max_m=4, latency_timer=slow.timer())
    lat = b.latency
    assert lat.passes >= 2 and b.allocation.choice != a.allocation.choice
    names = [lc.name for lc in b.problem.layers]
    for l, i in enumerate(b.allocation.choice):  # the plan's times are the confirmed ones where it chose a block
        if i and (l, i) in lat.confirmed:
            assert lat.layers[l][1][i] == pytest.approx(slow.layers[names[l]][i] * 1.6)
    if lat.unconfirmed == 0:
        assert lat.predicted_ms(b.allocation.choice) * NS_PER_MS <= b.budget_value
    assert b.allocation.error > a.allocation.error  # slower blocks buy less accuracy within the same target


def test_a_target_missed_after_re_timing_is_refused_with_the_confirmed_figure() -> None:
    net, x = _net(), _data()[0][:1]
    slow = FakeTimes(slower=50.0)  # the one block per conv (m=1) is really 50× slower than first timed
    with pytest.raises(BudgetError, match=r"cannot be met: .*fastest measured candidate the predicted latency is "
                                          r"(\S+) ms .*ask for at least \1 ms"):
        plan_with_budget(net, "all_3x3", x, parse_budget({"latency_ms": 0.5}), max_m=1, latency_timer=slow.timer())
    assert slow.calls["confirm"] >= 1


def test_unreachable_latency_is_refused_before_any_work_with_the_fastest_figure(monkeypatch) -> None:
    import dsrewrite.budget.planner as planner
    from dsrewrite.api import rewrite

    def boom(*a, **k):
        raise AssertionError("sensitivity ran")

    monkeypatch.setattr(planner, "data_sensitivity", boom)
    monkeypatch.setattr(planner, "weight_sensitivity", boom)
    fake = FakeTimes().patch(monkeypatch)
    net, data = _net(), _data()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(BudgetError) as info:
        rewrite(net, "all_3x3", example_inputs=data[0][:1], calibration=data, budget={"latency_ms": 0.05})
    msg = str(info.value)
    m = re.search(r"cannot be met: .* fastest measured candidate the predicted latency is (\S+) ms .* "
                  r"ask for at least \1 ms", msg)
    assert m, msg
    # the figure is the fake's: dense model − Σ dense + Σ fastest
    fastest = sum(min(t) for t in fake.layers.values())
    model = sum(t[0] for t in fake.layers.values()) + 0.2
    reach = model - sum(t[0] for t in fake.layers.values()) + fastest
    assert float(m.group(1)) == pytest.approx(reach, rel=2e-3)
    assert fake.calls["result"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_recipe_latency_section_sets_the_timing_and_no_min_speedup_selection(monkeypatch) -> None:
    import dsrewrite.planning.planner as pplanner

    def boom(*a, **k):
        raise AssertionError("latency-aware selection ran under a latency budget")

    monkeypatch.setattr(pplanner, "time_dense_vs_separable", boom)
    fake = FakeTimes()
    rec = {"name": "r", "extends": "all_3x3", "latency": {"rounds": 7, "warmup": 2, "channels_last": True,
                                                          "min_speedup": 1000}}
    bp = plan_with_budget(_net(), rec, _data()[0][:1], parse_budget({"latency_ms": 0.7}), latency_timer=fake.timer())
    assert fake.specs and all(s.rounds == 7 and s.warmup == 2 and s.channels_last for s in fake.specs)
    assert bp.plan.replaced  # min_speedup 1000 would have kept every conv dense
    assert any("channels_last, 7 rounds" in n for n in bp.plan.notes)


def test_candidate_rounds_are_fewer_than_the_models() -> None:
    from dsrewrite.recipe.schema import LatencySpec

    assert lc_mod.candidate_rounds(LatencySpec()) == (5, 1)
    assert lc_mod.candidate_rounds(LatencySpec(rounds=2, warmup=0)) == (3, 0)


# --------------------------------------------------------------------------------------
# recipe, API check after the rewrite, CLI
# --------------------------------------------------------------------------------------
def test_recipe_budget_latency_key(tmp_path, monkeypatch) -> None:
    from dsrewrite.api import rewrite_and_report
    from dsrewrite.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: fast\nextends: all_3x3\nbudget:\n  latency_ms: 0.6\n", encoding="utf-8")
    r = load_recipe(str(path))
    assert r.budget.latency_ms == 0.6 and r.budget.cost_key == "latency_ms"
    path.write_text("name: fast\nbudget:\n  latency_ms: .nan\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"budget.latency_ms"):
        load_recipe(str(path))
    fake = FakeTimes(result=(1.0, 0.5, 0.55)).patch(monkeypatch)
    path.write_text("name: fast\nextends: all_3x3\nbudget:\n  latency_ms: 0.6\n", encoding="utf-8")
    net, data = _net(), _data()
    res = rewrite_and_report(net, str(path), example_inputs=data[0][:1], calibration=data)
    assert any(n.startswith("latency budget:") for n in res.plan.notes)
    assert fake.calls["result"] == 1


def test_latency_check_after_the_rewrite(monkeypatch) -> None:
    from dsrewrite.api import rewrite_and_report

    fake = FakeTimes(result=(2.0, 1.5, 0.75)).patch(monkeypatch)
    net, data = _net(), _data()
    res = rewrite_and_report(net, "all_3x3", example_inputs=data[0][:1], calibration=data, budget={"latency_ms": 0.6})
    plan_note = next(n for n in res.plan.notes if n.startswith("latency budget:"))
    target, pred, dense = (float(v) for v in re.match(r"latency budget: target (\S+) ms, predicted (\S+) ms, "
                                                      r"dense model (\S+) ms", plan_note).groups())
    check = next(n for n in res.plan.notes if n.startswith("latency check:"))
    off = 0.75 / (pred / dense) - 1
    assert "measured 1.5 ms vs dense 2 ms now, interleaved" in check and "0.750 of dense" in check, check
    assert fake.calls["result"] == 1 and fake.calls["confirm"] >= 1
    assert f"off by {100 * off:+.1f}%" in check, check
    assert ("within the target" in check) == (0.75 <= target / dense), check
    # rewritten in place: the result is timed alone against the planning-time dense latency
    fake2 = FakeTimes().patch(monkeypatch)
    res = rewrite_and_report(_net(), "all_3x3", example_inputs=data[0][:1], budget={"latency_ms": 0.6}, inplace=True)
    check = next(n for n in res.plan.notes if n.startswith("latency check:"))
    assert "timed alone, against the dense" in check and fake2.calls["result"] == 0
    # rewrite() returns only the model: nothing would show the check, so the result is not timed
    from dsrewrite.api import rewrite

    fake3 = FakeTimes().patch(monkeypatch)
    rewrite(_net(), "all_3x3", example_inputs=data[0][:1], budget={"latency_ms": 0.6})
    assert fake3.calls["model"] == 1 and fake3.calls["result"] == 0


def test_cli_target_latency(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from dsrewrite.cli import main

    fake = FakeTimes(result=(1.0, 0.6, 0.6)).patch(monkeypatch)
    path, data, out = tmp_path / "net.pt", tmp_path / "calib.pt", tmp_path / "light.pt"
    torch.save(_net(), path)
    torch.save(torch.cat(_data()), data)
    runner = CliRunner()
    base = [str(path), "--recipe", "all_3x3", "--input-shape", "1,3,16,16", "--trust-pickle"]
    r = runner.invoke(main, ["plan", *base, "--target-latency", "0.05"])
    assert r.exit_code == 2, r.output
    assert "cannot be met" in r.output and "ask for at least" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["plan", *base, "--target-latency", "0.6"])
    assert r.exit_code == 0, r.output
    assert "latency_ms 0.6 of the dense model's latency" in r.output and " ms (dense " in r.output
    r = runner.invoke(main, ["apply", *base, "--calib", str(data), "--target-latency", "0.6", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "latency check: target" in r.output and "off by" in r.output and fake.calls["result"] == 1
    assert out.exists()
    assert "--target-latency" in runner.invoke(main, ["apply", "--help"]).output


# --------------------------------------------------------------------------------------
# a real run (structure only: timings are noisy)
# --------------------------------------------------------------------------------------
def test_real_timings_on_a_small_model() -> None:
    from dsrewrite.api import rewrite_and_report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(48, 48, 3, padding=1)).eval()
    x = torch.randn(1, 3, 24, 24)
    res = rewrite_and_report(net, "all_3x3", example_inputs=x, budget={"latency_ms": 0.95}, order="auto")
    budgeted = [e for e in res.plan.entries if e.measured and "budget_ms" in e.measured]
    assert budgeted
    for e in budgeted:
        assert e.measured["dense_ms"] > 0 and e.measured["budget_ms"] > 0
        assert re.search(r"\d ms", e.reason), e.reason
    note = next(n for n in res.plan.notes if n.startswith("latency budget:"))
    target, pred, dense = (float(v) for v in re.match(r"latency budget: target (\S+) ms, predicted (\S+) ms, "
                                                      r"dense model (\S+) ms", note).groups())
    assert dense > 0 and 0 < pred <= target
    check = next(n for n in res.plan.notes if n.startswith("latency check:"))
    assert re.search(r"measured \S+ ms vs dense \S+ ms now, interleaved", check), check
    costs = next(n for n in res.plan.notes if n.startswith("latency costs:"))
    assert re.search(r"α = \d+\.\d+: every selected conv at its fastest block ran at \d", costs), costs
