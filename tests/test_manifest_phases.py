"""Phases in the tools around the plan, without TensorFlow: the manifest's schedule, `verify`
at an epoch, the plan's phase report, and lint judging rules within their phase."""

from dataclasses import replace

import pytest

import surgery
from surgery.lint import lint, lint_with_model
from surgery.manifest import build_manifest, phase_layers
from surgery.verify import diff, verify
from surgery.plan import plan_spec
from surgery.report import phase_report, plan_summary
from surgery.tree import Layer, LayerTree

MODEL = {
    "name": "net",
    "layers": [
        "input:InputLayer",
        "stem:Conv2D", "stem_bn:BatchNormalization",
        {"name": "base", "class": "Functional", "layers": [
            "b1:Conv2D", "b1_bn:BatchNormalization", "b2:Conv2D", "b2_bn:BatchNormalization",
        ]},
        "head:Dense",
    ],
}

SPEC = """\
freeze all
unfreeze head
batchnorm frozen
at epoch 2:
  unfreeze base/b2*
  batchnorm affine base/b2_bn
at epoch 4:
  unfreeze base/b1.filters[0:4]
"""


def _manifest(spec_text=SPEC, tree=None):
    tree = tree or LayerTree.from_dict(MODEL)
    spec = surgery.parse(spec_text, "spec.frz")
    plan = plan_spec(spec, tree)
    return plan, build_manifest(plan, spec, model_source="net.keras", model_sha256=None,
                                model_name="net", versions={}, surgery_version="test")


def _tree_in_state(trainable, affine=(), parts=None):
    """MODEL with exactly ``trainable`` leaves trainable (containers follow), as a checkpoint
    taken in some phase would be described."""
    base = LayerTree.from_dict(MODEL)
    parts = parts or {}

    def rebuild(node: Layer) -> Layer:
        if node.children:
            kids = tuple(rebuild(c) for c in node.children)
            return replace(node, children=kids, trainable=node.path == "" or any(
                k.trainable for k in kids if k.params))
        weights = tuple(replace(w, frozen=tuple(parts.get((node.path, w.name), ())))
                        for w in node.weights)
        return replace(node, trainable=node.path in trainable or not node.weights,
                       affine=node.path in affine, weights=weights)

    return LayerTree(rebuild(base.root))


def test_manifest_records_each_phase_state():
    plan, manifest = _manifest()
    schedule = manifest.data["schedule"]
    assert [p["epoch"] for p in schedule] == [0, 2, 4]
    assert [p["line"] for p in schedule] == [None, 4, 7]
    assert schedule[0]["trainable"] == ["head"]
    # b2_bn: unfrozen at epoch 2, but the phase-0 policy keeps BatchNormalization frozen until
    # the affine policy for it, in the same phase, takes over.
    assert schedule[1]["trainable"] == ["base/b2", "base/b2_bn", "head"]
    assert schedule[1]["batchnorm"]["base/b2_bn"] == "affine"
    assert schedule[1]["batchnorm"]["base/b1_bn"] == "frozen"
    assert schedule[2]["frozen_parts"]["base/b1"][0]["frozen"] == "4-7"
    assert [p["trainable_params"] for p in schedule] == [
        ph.plan.totals.trainable_after for ph in plan.phases]
    # the layer entries are phase 0, and say which policy decides each BatchNormalization
    entries = {e["path"]: e for e in manifest.layers}
    assert entries["stem_bn"]["batchnorm"] == "frozen" and not entries["stem_bn"]["trainable"]
    assert "batchnorm" not in entries["stem"]


def test_manifest_without_phases_has_no_schedule():
    _, manifest = _manifest("freeze all\nunfreeze head\n")
    assert "schedule" not in manifest.data
    # one state at every epoch
    assert phase_layers(manifest, 3) == manifest.layers


@pytest.mark.parametrize("epoch,phase", [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (40, 2)])
def test_verify_at_an_epoch_checks_the_phase_in_force(epoch, phase):
    _, manifest = _manifest()
    states = [
        _tree_in_state({"head"}),
        _tree_in_state({"head", "base/b2", "base/b2_bn"}, affine={"base/b2_bn"}),
        _tree_in_state({"head", "base/b2", "base/b2_bn", "base/b1"}, affine={"base/b2_bn"},
                       parts={("base/b1", "kernel"): range(4, 8), ("base/b1", "bias"): range(4, 8)}),
    ]
    for i, tree in enumerate(states):
        differences = verify(manifest, tree, epoch=epoch)
        if i == phase:
            assert differences == []
        else:
            assert differences, f"a checkpoint in phase {i} passed as phase {phase}"


def test_verify_names_a_missing_affine_class():
    _, manifest = _manifest()
    tree = _tree_in_state({"head", "base/b2", "base/b2_bn"})  # b2_bn not affine
    assert verify(manifest, tree, epoch=2) == [
        "base/b2_bn: the manifest has this BatchNormalization affine, the model not affine"]


def test_phase_report_lists_each_change_and_totals():
    plan, _ = _manifest()
    text = phase_report(plan)
    lines = text.splitlines()
    assert lines[0].startswith("schedule: phase 0 (the table above), then 2 phases")
    at2 = next(ln for ln in lines if ln.strip().startswith("at epoch 2"))
    before, after = plan.phases[0].plan.totals, plan.phases[1].plan.totals
    assert "(line 4): 2 unfrozen" in at2
    assert f"{before.trainable_after:,} -> {after.trainable_after:,}" in at2
    assert any("base/b2_bn" in ln and "trainable, affine" in ln for ln in lines)
    at4 = next(ln for ln in lines if ln.strip().startswith("at epoch 4"))
    assert "1 unfrozen" in at4  # b1 becomes trainable, in part
    assert any("base/b1" in ln and "partial" in ln for ln in lines)
    # apply's summary: the policy statement with its count, the schedule without layer rows
    summary = plan_summary(plan)
    assert "line 3: batchnorm frozen  (3 BatchNormalization layers)" in summary
    assert "phase 0 (written now)" in summary and "base/b2_bn" not in summary


def test_a_phase_that_changes_nothing_is_a_warning_at_its_header():
    spec = surgery.parse("freeze all\nunfreeze head\nat epoch 3:\n  freeze stem\n", "s.frz")
    tree = LayerTree.from_dict(MODEL)
    plan = plan_spec(spec, tree)
    found = [(d.span.line, d.message) for d in plan.diagnostics]
    assert (3, "the phase 'at epoch 3:' changes no layer: the state it asks for is the one "
               "before it") in found
    assert any(d.span.line == 3 for d in lint_with_model(spec, tree))


def test_lint_judges_repeats_and_dead_rules_within_a_phase():
    spec = surgery.parse("freeze all\nunfreeze head\nat epoch 2:\n  unfreeze all\n"
                         "  freeze all\n  freeze all\n", "s.frz")
    found = {(d.span.line, d.message.split(":")[0]) for d in lint(spec)}
    # phase 0's rules are overridden at epoch 2, but they decide epochs 0 and 1
    assert not any(line in (1, 2) for line, _ in found)
    assert (4, "this rule has no effect") in found
    assert (6, "duplicate statement") in found


def test_diff_compares_policies_and_later_phases():
    _, a = _manifest()
    _, b = _manifest(SPEC.replace("batchnorm affine base/b2_bn", "batchnorm train base/b2_bn"))
    lines = diff(a, b)
    assert lines[0].startswith("spec: spec.frz")
    assert "at epoch 2:" in lines and "at epoch 4:" in lines
    assert ("  ~ base/b2_bn: trainable (batchnorm affine, the affine class) -> trainable "
            "(batchnorm train)") in lines
    assert diff(a, a) == []


def test_diff_names_a_class_change_alone_and_verify_a_renamed_model():
    # Only the affine class differs (the policies and flags are the same): diff still says so,
    # in the layer table and in the phase; verify names a model whose name is not the recorded.
    import copy

    _, a = _manifest()
    b_data = copy.deepcopy(a.data)
    b_data["schedule"][1]["affine"] = []
    lines = diff(a, surgery.Manifest(b_data))
    assert lines[:2] == ["at epoch 2:", "  ~ base/b2_bn: trainable (batchnorm affine, the affine "
                                        "class) -> trainable (batchnorm affine)"], lines
    renamed = copy.deepcopy(a.data)
    renamed["model"]["name"] = "another"
    assert "name: the manifest's model is 'another', this one is 'net'" in verify(
        surgery.Manifest(renamed), _tree_in_state({"head"}))


def test_a_spec_path_given_as_a_string_is_read_as_a_path(tmp_path, monkeypatch):
    from surgery.api import as_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text(SPEC)
    assert as_spec("p.txt").phases == surgery.parse(SPEC, "p.txt").phases
    assert as_spec(str(tmp_path / "p.txt")).file.endswith("p.txt")
    with pytest.raises(FileNotFoundError, match="no such spec file: 'missing.frz'"):
        as_spec("missing.frz")
    assert [r.text for r in as_spec("freeze all").rules] == ["freeze all"]  # spec text


def test_an_unfreeze_that_a_frozen_policy_cancels_is_a_warning():
    tree = LayerTree.from_dict(MODEL)
    spec = surgery.parse("freeze all\nbatchnorm frozen\nat epoch 2:\n  unfreeze stem_bn\n"
                         "  unfreeze base/b1, base/b1_bn\n", "s.frz")
    found = {d.span.line: d.message for d in plan_spec(spec, tree).diagnostics}
    assert found[4] == ("this rule has no effect: 'batchnorm frozen' (line 2) keeps 'stem_bn' "
                        "frozen whatever rules unfreeze; a later 'batchnorm affine' or "
                        "'batchnorm train' for them lets them train")
    assert 5 not in found  # base/b1 trains: the rule does something


# --- an altered manifest: verify checks the manifest against its own spec first -----------------


def _set(path, value=None, *, add=None):
    """An alteration of the manifest data at ``path`` (keys and indices): set ``value``, or
    add ``add`` to the number there."""
    def alter(data):
        *parents, last = path
        target = data
        for key in parents:
            target = target[key]
        target[last] = target[last] + add if add is not None else value
    return alter


def _retext(data):
    # Another valid spec, its sha256 recomputed: only re-planning the text shows it.
    import hashlib

    text = data["spec"]["text"].replace("unfreeze head", "unfreeze stem")
    data["spec"]["text"] = text
    data["spec"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()


ALTERATIONS = {
    "totals.params": _set(("totals", "params"), add=1),
    "totals.trainable_params.after": _set(("totals", "trainable_params", "after"), add=-1),
    "totals.non_trainable_params.before": _set(("totals", "non_trainable_params", "before"),
                                               add=5),
    "spec.text, sha256 kept": _set(("spec", "text"), SPEC.replace("head", "stem")),
    "spec.text and its sha256": _retext,
    "compiled": _set(("compiled", "operations"), []),
    "model.architecture": _set(("model", "architecture"), "0" * 64),
    "model.layers": _set(("model", "layers"), add=1),
    "model_trainable": _set(("model_trainable",), False),
    "rules[1].matched": _set(("rules", 1, "matched"), ["stem"]),
    "layers[1].rule": _set(("layers", 1, "rule"), 1),
    "layers[1].trainable_params": _set(("layers", 1, "trainable_params"), add=3),
    "schedule[1].trainable": _set(("schedule", 1, "trainable"), ["head"]),
    "schedule[2].frozen_parts": _set(("schedule", 2, "frozen_parts"), {}),
    "schedule[1].trainable_params": _set(("schedule", 1, "trainable_params"), add=7),
    "schedule[1].batchnorm": _set(("schedule", 1, "batchnorm", "base/b2_bn"), "train"),
    "notes": _set(("notes",), []),
}


@pytest.mark.parametrize("name", sorted(ALTERATIONS))
def test_verify_reports_an_altered_manifest(name):
    import copy

    _, manifest = _manifest()
    applied = _tree_in_state({"head"})  # the model as apply wrote it (phase 0)
    assert verify(manifest, applied) == []  # unaltered, it matches
    data = copy.deepcopy(manifest.data)
    ALTERATIONS[name](data)
    lines = verify(surgery.Manifest(data), applied)
    assert lines, f"verify found nothing wrong after altering {name}"
    first = lines[0]
    assert first.startswith("manifest: ") or first.startswith("architecture: "), lines


PARTS_SPEC = "freeze all\nunfreeze head, base/b1\nfreeze base/b1.filters[0:2]\n"


def _altered_before(data, how):
    totals = data["totals"]
    if how == "totals.before, no longer adding up":
        totals["trainable_params"]["before"] += 100
    elif how == "totals.before, adding up, past the layers trainable before":
        totals["trainable_params"]["before"] += 100
        totals["non_trainable_params"]["before"] -= 100
    else:  # every layer recorded frozen before, the totals left as they were
        for entry in data["layers"]:
            entry["before"] = False


@pytest.mark.parametrize("how", ["totals.before, no longer adding up",
                                 "totals.before, adding up, past the layers trainable before",
                                 "layers[].before"])
def test_verify_holds_the_totals_before_to_the_layers_when_entries_are_frozen(how):
    # With entries frozen inside a layer, the totals before the surgery cannot be planned
    # again (the entries frozen then are not recorded); they are still held to the layer table.
    import copy

    plan, manifest = _manifest(PARTS_SPEC)
    frozen = {(e["path"], p["weight"]): _positions_of(p["frozen"])
              for e in manifest.layers for p in e.get("frozen_parts", ())}
    assert frozen, "the spec freezes entries inside base/b1"
    applied = _tree_in_state({"head", "base/b1"}, parts=frozen)
    assert verify(manifest, applied) == []
    data = copy.deepcopy(manifest.data)
    _altered_before(data, how)
    lines = verify(surgery.Manifest(data), applied)
    assert any(line.startswith("manifest: totals.") for line in lines), lines


def _positions_of(ranges: str) -> list[int]:
    out = []
    for run in ranges.split(","):
        a, _, b = run.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def test_an_altered_manifest_is_named_even_on_another_architecture():
    # The spec cannot be planned again on a model of another shape: what the manifest says of
    # itself is still checked (totals against its layers, model_trainable).
    import copy

    _, manifest = _manifest()
    other = LayerTree.from_dict({**MODEL, "layers": MODEL["layers"] + ["extra:Dense"]})
    data = copy.deepcopy(manifest.data)
    data["totals"]["trainable_params"]["after"] += 1
    data["model_trainable"] = False
    lines = verify(surgery.Manifest(data), other)
    after = manifest.data["totals"]["trainable_params"]["after"]
    assert (f"manifest: totals.trainable_params.after is {after + 1}, but its layers give "
            f"{after} (altered?)") in lines
    assert "manifest: model_trainable is false, but its layers give true (altered?)" in lines
    assert any(line.startswith("architecture: ") for line in lines)
    assert "extra: in the model, missing from the manifest" in lines


def test_a_manifest_applied_at_a_later_epoch_is_consistent():
    # surgery.apply(model, spec, epoch=k) records phase k's state as the layer table (as
    # api.apply_plan replaces the plan; built here without Keras).
    tree = LayerTree.from_dict(MODEL)
    spec = surgery.parse(SPEC, "spec.frz")
    plan = plan_spec(spec, tree)
    at2 = replace(plan.phases[1].plan, phases=plan.phases, diagnostics=plan.diagnostics)
    manifest = build_manifest(at2, spec, model_source="net.keras", model_sha256=None,
                              model_name="net", versions={}, surgery_version="test")
    applied = _tree_in_state({"head", "base/b2", "base/b2_bn"}, affine={"base/b2_bn"})
    assert verify(manifest, applied) == []


@pytest.mark.parametrize("what,alter,line", [
    ("output.sha256", lambda d: d.__setitem__("output", {"sha256": "b" * 64}),
     f"output: {'a' * 12} -> {'b' * 12}"),
    ("model_trainable", lambda d: d.__setitem__("model_trainable", False),
     "model_trainable: true -> false"),
    ("a layer's class", lambda d: d["layers"][1].__setitem__("class", "Conv3D"),
     "~ stem: class Conv2D -> Conv3D"),
])
def test_diff_reports_every_field_it_compares(what, alter, line):
    import copy

    from surgery.verify import diff

    _, a = _manifest()
    a.data["output"] = {"sha256": "a" * 64}
    data = copy.deepcopy(a.data)
    alter(data)
    assert diff(a, a) == []
    assert diff(a, surgery.Manifest(data)) == [line]


@pytest.mark.parametrize("frozen,problem", [
    ("0-9999999999", "is not a range of the weight's 8 positions"),
    ("9" * 5000, "is not a range of the weight's 8 positions"),
    ("3-1", "is not a range of the weight's 8 positions"),
    ("x", "is not a range of the weight's 8 positions"),
])
def test_a_crafted_frozen_range_is_a_line_not_an_expansion(frozen, problem):
    import copy

    _, manifest = _manifest("freeze all\nunfreeze head, stem.filters[0:4]\n")
    applied = _tree_in_state({"head", "stem"}, parts={("stem", "kernel"): range(4, 8),
                                                      ("stem", "bias"): range(4, 8)})
    assert verify(manifest, applied) == []
    data = copy.deepcopy(manifest.data)
    (stem,) = [e for e in data["layers"] if e["path"] == "stem"]
    stem["frozen_parts"][0]["frozen"] = frozen
    lines = verify(surgery.Manifest(data), applied)
    assert lines[0].startswith("manifest: layers['stem'].frozen_parts: kernel[") and \
        problem in lines[0], lines
