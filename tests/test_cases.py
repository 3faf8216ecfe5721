"""Selector semantics, data-driven: tests/cases/*.json, resolved against plain layer trees.

Each file holds a model description and cases: a spec and either the leaf layers frozen after it
(plus optional container states and warnings), or the error it must raise. No TensorFlow here.
"""

import json
from pathlib import Path

import pytest

import surgery
from surgery.plan import plan_spec
from surgery.tree import LayerTree

CASES = Path(__file__).parent / "cases"


def _load():
    for path in sorted(CASES.glob("*.json")):
        doc = json.loads(path.read_text())
        tree = LayerTree.from_dict(doc["model"])
        for i, case in enumerate(doc["cases"]):
            yield pytest.param(tree, case, id=f"{path.stem}-{i}-{case['comment'][:40]}")


@pytest.mark.parametrize("tree,case", list(_load()))
def test_case(tree, case):
    spec = surgery.parse(case["spec"], "spec.frz")
    if "error" in case:
        with pytest.raises(surgery.SpecError) as info:
            plan_spec(spec, tree)
        err = info.value
        assert (err.line, err.column, err.message) == (
            case["error"]["line"], case["error"]["column"], case["error"]["message"])
        return
    plan = plan_spec(spec, tree)
    leaves = [lp for lp in plan.layers if not lp.layer.children]
    frozen = [lp.path for lp in leaves if not lp.after]
    assert frozen == case["frozen"]
    containers = {lp.path: lp.after for lp in plan.layers if lp.layer.children}
    for path in case.get("trainable_containers", []):
        assert containers[path] is True, path
    for path in case.get("frozen_containers", []):
        assert containers[path] is False, path
    if "parts" in case:
        parts = {lp.path: {p.weight: list(p.indices) for p in lp.frozen_parts}
                 for lp in leaves if lp.frozen_parts}
        assert parts == case["parts"]
    if "training" in case:  # every variable that trains once the plan is written, by path
        assert [f"{lp.path}/{name}" for lp in plan.layers
                for name, on in plan.trains(lp).items() if on] == case["training"]
    if "trainable_params" in case:
        assert [plan.totals.trainable_before, plan.totals.trainable_after] == \
            case["trainable_params"]
    warnings = [f"{d.span.line}:{d.span.column}: {d.message}" for d in plan.diagnostics]
    assert warnings == case.get("warnings", [])
