"""Tests of the graph-predicate registry: a toy predicate from a test-local file selects from a YAML recipe.

``tests/toy_predicate.py`` registers ``reads_input`` (the conv reads the model input);
nothing in the package changes, yet recipe validation, did-you-mean, the JSON Schema,
selection reasons, facts and the ``inspect`` inventory all know it, and forget it when
it is unregistered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from dsrewrite.capture import capture
from dsrewrite.errors import RecipeError
from dsrewrite.facts import PREDICATES
from dsrewrite.planner import plan
from dsrewrite.predicates import (
    get_predicate,
    predicate_names,
    register_predicate,
    unregister_predicate,
)
from dsrewrite.recipe import load_recipe
from dsrewrite.recipe.choices import predicates_json_schema, select_predicates_json_schema
from dsrewrite.report import build_inventory, render_inventory

from toy_predicate import ReadsInput, Stem

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "dsrewrite" / "recipe" / "recipe.schema.json"
BUILTIN = ("after_concat", "after_upsample", "downstream_of_upsample", "final_predictor", "after_bottleneck")


@pytest.fixture
def toy() -> Iterator[ReadsInput]:
    pred = register_predicate(ReadsInput())
    try:
        yield pred
    finally:
        unregister_predicate(pred.name)


def _recipe(tmp_path: Path, value: str, key: str = "reads_input") -> Path:
    path = tmp_path / "stem.yaml"
    path.write_text(f"name: stem\nselect:\n  kernel_size: [3x3]\n  {key}: {value}\n", encoding="utf-8")
    return path


def test_schema_file_predicates_are_generated_from_the_registry() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))["$defs"]
    want = predicates_json_schema()
    assert schema["predicates"] == want, (
        f"{SCHEMA_PATH} is out of date with the predicate registry: set $defs.predicates to\n"
        + json.dumps(want, ensure_ascii=False))
    got = {k: v for k, v in schema["select"]["properties"].items() if k in want["properties"]}
    want_sel = select_predicates_json_schema()
    assert got == want_sel and list(got) == list(want_sel), (
        f"{SCHEMA_PATH} is out of date with the predicate registry: the predicate properties of "
        "$defs.select.properties must be\n" + json.dumps(want_sel, ensure_ascii=False))
    assert predicate_names() == BUILTIN == PREDICATES


def test_toy_predicate_selects_from_a_yaml_recipe(toy: ReadsInput, tmp_path: Path) -> None:
    model, x = Stem(), torch.randn(1, 3, 16, 16)
    cap = capture(model, x)
    by = cap.by_name()
    assert (by["stem"].reads_input, by["body"].reads_input) == (True, False)
    assert by["stem"].predicates["reads_input"] is True and by["stem"].after_concat is False

    p = plan(model, load_recipe(_recipe(tmp_path, "true")), x)
    assert [e.name for e in p.replaced] == ["stem"], p.table()
    reasons = {e.name: e.reason for e in p.entries}
    assert "reads input" in reasons["stem"]
    assert reasons["body"] == "not reading the model input (select.reads_input: true)"
    assert p.entries[0].fact["reads_input"] is True  # the plan's facts carry it

    p = plan(model, load_recipe(_recipe(tmp_path, "false")), x)
    assert [e.name for e in p.replaced] == ["body"], p.table()
    assert {e.name: e.reason for e in p.entries}["stem"] == "reading the model input (select.reads_input: false)"

    text = render_inventory(build_inventory(model, cap, x))
    header = text.splitlines()[1].split()
    assert header[8:14] == ["cat", "up", "↓up", "final", "↓btl", "in"], header
    assert ("cat/up/↓up/final/↓btl/in: after concat / after upsample / downstream of upsample / final predictor "
            "(no conv/linear between it and an output) / downstream of the bottleneck (the deepest point) / "
            "reads the model input") in text

    assert select_predicates_json_schema()["reads_input"]["description"] == ReadsInput.description
    with pytest.raises(RecipeError, match=r"select\.reads_inptu: unknown key 'reads_inptu' \(did you mean "
                                          r"'reads_input'\?\).*reads_input"):
        load_recipe(_recipe(tmp_path, "true", key="reads_inptu"))
    with pytest.raises(RecipeError, match=r"select\.reads_input: expected true, false or null"):
        load_recipe(_recipe(tmp_path, "sometimes"))


def test_unregistered_predicate_is_gone(tmp_path: Path) -> None:
    pred = register_predicate(ReadsInput())
    assert "reads_input" in predicate_names()
    assert unregister_predicate("reads_input") is pred
    assert "reads_input" not in predicate_names() and "reads_input" not in predicates_json_schema()["properties"]
    with pytest.raises(RecipeError, match=r"unknown key 'reads_input'"):
        load_recipe(_recipe(tmp_path, "true"))
    fact = capture(Stem(), torch.randn(1, 3, 8, 8)).facts[0]
    assert "reads_input" not in fact.to_dict()
    with pytest.raises(AttributeError):
        fact.reads_input
    with pytest.raises(KeyError, match="no graph predicate 'reads_input'"):
        unregister_predicate("reads_input")


def test_duplicate_and_malformed_registrations_are_refused(toy: ReadsInput) -> None:
    with pytest.raises(ValueError, match="'reads_input' is already registered"):
        register_predicate(ReadsInput())
    with pytest.raises(ValueError, match="'after_concat' is already registered"):
        register_predicate(get_predicate("after_concat"))

    class NoHolds:
        name, description, phrase, short, column, legend = "x_pred", "d", "p", "s", "c", "l"

    with pytest.raises(TypeError, match=r"NoHolds is not a graph predicate: it lacks holds"):
        register_predicate(NoHolds())  # type: ignore[arg-type]

    class Bare:
        pass

    with pytest.raises(TypeError, match=r"lacks name, description, phrase, short, column, legend, holds"):
        register_predicate(Bare())  # type: ignore[arg-type]

    def named(name: Any, column: Any = "c") -> Any:
        obj = ReadsInput()
        obj.name, obj.column = name, column  # type: ignore[misc]
        return obj

    for bad in ("regions", "output_stride", "not-an-identifier", "_private", "class"):
        with pytest.raises(ValueError, match="cannot name a graph predicate"):
            register_predicate(named(bad))
    with pytest.raises(TypeError, match=r"ReadsInput\.column must be a non-empty str"):
        register_predicate(named("other", column=3))
    assert predicate_names() == (*BUILTIN, "reads_input")
