"""Phases ('at epoch N:') and BatchNormalization policies ('batchnorm frozen|train|affine'), on
plain layer trees: what each phase's plan holds, which findings each phase reports, and the
parse errors of phase headers. No TensorFlow here (tests/test_schedule.py trains real models).
"""

import pytest

import surgery
from surgery.ir import BN_AFFINE, BN_FROZEN, BN_TRAIN
from surgery.plan import changed_layers, plan_phases, plan_spec
from surgery.tree import Layer, LayerTree, Weight

MODEL = {"name": "model", "layers": [
    "input:InputLayer", "conv1:Conv2D", "bn1:BatchNormalization", "relu1:ReLU",
    "conv2:Conv2D", "bn2:BatchNormalization", "pool:GlobalAveragePooling2D",
    "fc:Dense", "head:Dense",
]}
LEAVES = ["input", "conv1", "bn1", "relu1", "conv2", "bn2", "pool", "fc", "head"]

# A classifier around a nested base, as keras.applications models are used for fine-tuning.
NESTED = {"name": "classifier", "layers": [
    "input_1:InputLayer",
    {"name": "base", "class": "Functional", "layers": [
        "input:InputLayer", "stem:Conv2D", "stem_bn:BatchNormalization",
        "block1_conv:Conv2D", "block1_bn:BatchNormalization",
        "block2_conv:Conv2D", "block2_bn:BatchNormalization",
    ]},
    "pool:GlobalAveragePooling2D", "head:Dense",
]}

NO_BN = {"name": "mlp", "layers": ["input:InputLayer", "fc1:Dense", "fc2:Dense"]}


def tree(description=MODEL):
    return LayerTree.from_dict(description)


def phases(text, description=MODEL, **kwargs):
    return plan_phases(surgery.parse(text, "spec.frz"), tree(description), **kwargs)


def frozen(plan):
    return [lp.path for lp in plan.layers if not lp.layer.children and not lp.after]


def trainable(plan):
    return [lp.path for lp in plan.layers if not lp.layer.children and lp.after]


def findings(plan):
    return [(d.severity, d.span.line, d.span.column, d.message) for d in plan.diagnostics]


def policy_of(plan):
    return {lp.path: lp.batchnorm for lp in plan.layers if lp.batchnorm is not None}


# --- each phase's state ---------------------------------------------------------------------------


def test_each_phase_is_every_statement_up_to_it():
    ph = phases("""
freeze all
unfreeze head
at epoch 2:
  unfreeze conv2, bn2
at epoch 5:
  unfreeze conv1
""")
    assert [p.epoch for p in ph] == [0, 2, 5]
    assert ph[0].header is None
    assert [(p.header.epoch, p.header.span.line) for p in ph[1:]] == [(2, 4), (5, 6)]
    assert trainable(ph[0].plan) == ["head"]
    assert trainable(ph[1].plan) == ["conv2", "bn2", "head"]
    assert trainable(ph[2].plan) == ["conv1", "conv2", "bn2", "head"]
    # Every phase is planned against the model as given, so 'before' is always its state.
    assert all(lp.before for p in ph for lp in p.plan.layers)
    # The totals follow the trainable sets (Conv2D 3*3*3*8+8, BatchNormalization 8+8 trainable
    # of 32, Dense 8*4+4 with the test trees' default shapes).
    conv, bn, dense = 224, 16, 36
    assert [p.plan.totals.trainable_after for p in ph] == [
        dense, dense + conv + bn, dense + 2 * conv + bn]


def test_later_phases_override_earlier_ones_in_both_directions():
    ph = phases("""
freeze all
unfreeze head, fc
at epoch 1:
  unfreeze conv2
  freeze fc
at epoch 3:
  freeze conv2, head
  unfreeze conv1
""")
    assert trainable(ph[0].plan) == ["fc", "head"]
    assert trainable(ph[1].plan) == ["conv2", "head"]
    assert trainable(ph[2].plan) == ["conv1"]
    # The leaves whose state differs from one phase to the next, as the schedule logs them.
    assert [lp.path for lp in changed_layers(ph[0].plan, ph[1].plan)] == ["conv2", "fc"]
    assert [lp.path for lp in changed_layers(ph[1].plan, ph[2].plan)] == ["conv1", "conv2", "head"]
    assert changed_layers(ph[2].plan, ph[2].plan) == ()


def test_a_layer_no_phase_covers_keeps_the_state_the_model_gave_it():
    description = {"name": "model", "layers": [
        "a:Dense", {"name": "b", "class": "Dense", "trainable": False}, "c:Dense"]}
    ph = phases("freeze a\nat epoch 4:\n  unfreeze a\n", description)
    assert frozen(ph[0].plan) == ["a", "b"]
    assert frozen(ph[1].plan) == ["b"]


def test_until_keeps_the_statements_of_every_phase_that_has_begun():
    spec = surgery.parse("""
freeze all
batchnorm frozen
at epoch 2:
  unfreeze conv2
at epoch 4:
  unfreeze conv1
  batchnorm affine bn1
""")
    assert spec.epochs == (0, 2, 4)

    def summary(s):
        return ([r.text for r in s.rules], [p.text for p in s.policies],
                [p.epoch for p in s.phases])

    assert summary(spec.until(0)) == summary(spec.until(1)) == (
        ["freeze all"], ["batchnorm frozen"], [])
    assert summary(spec.until(2)) == summary(spec.until(3)) == (
        ["freeze all", "unfreeze conv2"], ["batchnorm frozen"], [2])
    assert summary(spec.until(4)) == summary(spec.until(100)) == summary(spec)
    assert [r.epoch for r in spec.rules] == [0, 2, 4]
    assert [p.epoch for p in spec.policies] == [0, 4]


def test_an_explicit_phase_zero_header_is_phase_zero():
    ph = phases("at epoch 0:\n  freeze all\nat epoch 3:\n  unfreeze head\n")
    assert [p.epoch for p in ph] == [0, 3]
    assert ph[0].header is not None and ph[0].header.span.line == 1
    assert frozen(ph[0].plan) == LEAVES
    assert trainable(ph[1].plan) == ["head"]


def test_a_phase_unfreezing_units_leaves_the_other_units_frozen():
    ph = phases("freeze all\nunfreeze head\nat epoch 2:\n  unfreeze fc.units[0:2]\n")
    assert frozen(ph[0].plan)[-1] == "fc" and ph[0].plan.by_path["fc"].frozen_parts == ()
    fc = ph[1].plan.by_path["fc"]
    assert fc.after
    # Dense kernel (8, 4) and bias (4,): units 2 and 3 stay frozen in both.
    assert {p.weight: (p.axes, p.indices, p.entries) for p in fc.frozen_parts} == {
        "kernel": ((1,), (2, 3), 16), "bias": ((0,), (2, 3), 2)}
    assert fc.trainable_params_after == 36 - 16 - 2
    assert [lp.path for lp in changed_layers(ph[0].plan, ph[1].plan)] == ["fc"]


def test_nested_base_unfrozen_from_the_top_in_phases():
    ph = phases("""
freeze base
batchnorm frozen
at epoch 1:
  unfreeze base/block2_*
at epoch 2:
  unfreeze base/block1_*
""", NESTED)
    by_phase = [{lp.path: lp.after for lp in p.plan.layers} for p in ph]
    assert by_phase[0]["base"] is False
    # The container trains as soon as something inside it does.
    assert by_phase[1]["base"] is True and by_phase[2]["base"] is True
    assert [k for k, v in by_phase[1].items() if v and k.startswith("base/")] == [
        "base/block2_conv"]
    assert [k for k, v in by_phase[2].items() if v and k.startswith("base/")] == [
        "base/block1_conv", "base/block2_conv"]
    # 'batchnorm frozen' keeps every BatchNormalization of the base frozen in every phase.
    assert all(not by_phase[i][f"base/{n}"] for i in range(3)
               for n in ("stem_bn", "block1_bn", "block2_bn"))


# --- BatchNormalization policies ------------------------------------------------------------------


def test_frozen_policy_overrides_an_unfreeze_in_the_same_and_in_later_phases():
    ph = phases("""
freeze all
unfreeze conv2, bn2
batchnorm frozen bn2
at epoch 3:
  unfreeze all
""")
    bn2 = ph[0].plan.by_path["bn2"]
    assert (bn2.after, bn2.batchnorm, bn2.affine) == (False, BN_FROZEN, False)
    assert bn2.trainable_params_after == 0
    assert trainable(ph[0].plan) == ["conv2"]
    assert frozen(ph[1].plan) == ["bn2"]
    assert policy_of(ph[1].plan) == {"bn1": BN_TRAIN, "bn2": BN_FROZEN}


@pytest.mark.parametrize("mode,affine", [(BN_TRAIN, False), (BN_AFFINE, True)])
def test_train_and_affine_policies_leave_the_layer_to_the_rules(mode, affine):
    (ph,) = phases(f"freeze all\nunfreeze bn2\nbatchnorm {mode}\n")
    bn2, bn1 = ph.plan.by_path["bn2"], ph.plan.by_path["bn1"]
    assert (bn2.after, bn2.batchnorm, bn2.affine) == (True, mode, affine)
    # Only a layer that trains takes the affine class: frozen, every BatchNormalization behaves
    # alike, and the plain class keeps the saved file loadable without surgery.
    assert (bn1.after, bn1.batchnorm, bn1.affine) == (False, mode, False)
    assert bn2.policy is not None and bn2.policy.span.line == 3
    # gamma and beta train, the moving statistics never do.
    assert bn2.trainable_params_after == 16
    assert bn2.changed is affine


def test_the_last_policy_covering_a_layer_wins_across_phases():
    ph = phases("""
unfreeze all
batchnorm affine
batchnorm train bn1
at epoch 2:
  batchnorm frozen
at epoch 4:
  batchnorm affine bn2
""")
    assert [policy_of(p.plan) for p in ph] == [
        {"bn1": BN_TRAIN, "bn2": BN_AFFINE},
        {"bn1": BN_FROZEN, "bn2": BN_FROZEN},
        {"bn1": BN_FROZEN, "bn2": BN_AFFINE},
    ]
    assert [frozen(p.plan) for p in ph] == [[], ["bn1", "bn2"], ["bn1"]]
    assert [lp.path for lp in changed_layers(ph[1].plan, ph[2].plan)] == ["bn2"]


def test_policy_except():
    (ph,) = phases("unfreeze all\nbatchnorm affine all except bn2\n")
    assert policy_of(ph.plan) == {"bn1": BN_AFFINE, "bn2": BN_TRAIN}
    assert ph.plan.by_path["bn2"].policy is None
    # bn2 has no policy: the unfreeze rule is told so.
    assert [(sev, line, "(bn2)" in msg) for sev, line, _c, msg in findings(ph.plan)] == [
        ("warning", 1, True)]


def test_a_policy_over_selected_layers_picks_their_batchnorms_only():
    (ph,) = phases("unfreeze all\nbatchnorm frozen base\n", NESTED)
    assert policy_of(ph.plan) == {"base/stem_bn": BN_FROZEN, "base/block1_bn": BN_FROZEN,
                                  "base/block2_bn": BN_FROZEN}
    assert frozen(ph.plan) == ["base/stem_bn", "base/block1_bn", "base/block2_bn"]


def test_a_model_carrying_the_affine_class_keeps_it_without_a_policy_and_loses_it_with_one():
    description = {"name": "model", "layers": [
        "conv:Conv2D", {"name": "bn", "class": "BatchNormalization", "affine": True}]}
    (kept,) = phases("freeze conv\n", description)
    assert (kept.plan.by_path["bn"].affine, kept.plan.by_path["bn"].batchnorm) == (True, BN_AFFINE)
    assert kept.plan.by_path["bn"].changed is False
    (switched,) = phases("freeze conv\nbatchnorm train\n", description)
    assert (switched.plan.by_path["bn"].affine,
            switched.plan.by_path["bn"].batchnorm) == (False, BN_TRAIN)
    assert switched.plan.by_path["bn"].changed is True


def test_freezing_an_affine_layer_without_a_policy_keeps_its_class_for_a_later_phase():
    """No policy: the class stays, frozen or not, so the phase that unfreezes the layer (planned
    against the model as applied) finds it affine. Under an affine policy a frozen layer takes
    the plain class. The manifest records the class, and verify checks it in both cases."""
    from surgery.manifest import build_manifest
    from surgery.verify import verify

    description = {"name": "model", "layers": [
        "conv:Conv2D", {"name": "bn", "class": "BatchNormalization", "affine": True,
                        "weights": [["gamma", [4], True], ["beta", [4], True]]}]}
    spec = "freeze bn\nat epoch 1:\n  unfreeze bn\n"
    first, later = phases(spec, description)
    assert (first.plan.by_path["bn"].after, first.plan.by_path["bn"].affine) == (False, True)
    assert (later.plan.by_path["bn"].after, later.plan.by_path["bn"].affine) == (True, True)
    (policy,) = phases("freeze bn\nbatchnorm affine\n", description)
    assert (policy.plan.by_path["bn"].after, policy.plan.by_path["bn"].affine) == (False, False)

    for text, affine in ((spec, True), ("freeze bn\nbatchnorm affine\n", False)):
        parsed = surgery.parse(text)
        plan = plan_spec(parsed, tree(description))
        manifest = build_manifest(plan, parsed, model_source="m.keras", model_sha256=None,
                                  model_name="model", surgery_version="test")
        (entry,) = [e for e in manifest.layers if e["path"] == "bn"]
        assert (entry["batchnorm"], entry["affine"], entry["trainable"]) == (
            BN_AFFINE, affine, False)
        as_written = dict(description, layers=[
            "conv:Conv2D", {"name": "bn", "class": "BatchNormalization", "affine": affine,
                            "trainable": False,
                            "weights": [["gamma", [4], True], ["beta", [4], True]]}])
        assert verify(manifest, tree(as_written)) == []
        flipped = dict(as_written, layers=[as_written["layers"][0],
                                           dict(as_written["layers"][1], affine=not affine)])
        assert len(verify(manifest, tree(flipped))) == 1


def test_policy_selectors_that_match_no_batchnorm_are_an_error_with_line_and_column():
    with pytest.raises(surgery.SelectorError) as info:
        phases("freeze all\nbatchnorm affine conv1, head\n")
    err = info.value
    assert (err.line, err.column) == (2, 1)
    assert "match no BatchNormalization layer" in err.message


def test_a_policy_selector_that_matches_nothing_points_at_the_selector():
    with pytest.raises(surgery.SelectorError) as info:
        phases("freeze all\nbatchnorm affine bn1, bn_3\n")
    assert (info.value.line, info.value.column) == (2, 23)
    assert "'bn_3' matches no layer" in info.value.message


def test_a_policy_names_whole_layers_not_parts():
    with pytest.raises(surgery.SelectorError) as info:
        phases("batchnorm affine bn1.gamma\n")
    assert (info.value.line, info.value.column) == (1, 21)
    assert "whole BatchNormalization layers" in info.value.message


def test_default_policy_on_a_model_without_batchnorm_is_a_warning():
    (ph,) = phases("freeze fc1\nbatchnorm affine\n", NO_BN)
    assert findings(ph.plan) == [
        ("warning", 2, 1, "the model has no BatchNormalization layer: this policy does nothing")]
    assert policy_of(ph.plan) == {}
    assert frozen(ph.plan) == ["fc1"]


def test_a_policy_left_empty_by_except_is_a_warning():
    (ph,) = phases("unfreeze all\nbatchnorm frozen bn1 except bn1\nbatchnorm train\n")
    assert [(line, msg) for _s, line, _c, msg in findings(ph.plan)] == [
        (2, "this policy covers no layer once 'except' is applied")]


# --- the warning for BatchNormalization unfrozen without a policy ---------------------------------


def test_missing_policy_warning_once_per_offending_rule_over_all_phases():
    spec = surgery.parse("""
freeze all
unfreeze conv2, bn2
at epoch 2:
  unfreeze conv1
at epoch 4:
  unfreeze bn1, head
  freeze bn2
""", "spec.frz")
    plan = plan_spec(spec, tree())
    found = [(d.span.line, d.message) for d in plan.diagnostics]
    assert [line for line, _ in found] == [3, 7]
    assert "(bn2)" in found[0][1] and "(bn1)" in found[1][1]
    for _line, message in found:
        assert "without a policy" in message
        for choice in ("'batchnorm frozen'", "'batchnorm affine'", "'batchnorm train'"):
            assert choice in message
    # Each phase reports the rules of its own phase only.
    ph = plan_phases(spec, tree())
    assert [[d.span.line for d in p.plan.diagnostics] for p in ph] == [[3], [], [7]]


@pytest.mark.parametrize("policy", ["batchnorm train", "batchnorm affine bn2",
                                    "batchnorm frozen", "batchnorm affine all"])
def test_no_missing_policy_warning_when_a_policy_covers_the_layers(policy):
    ph = phases(f"freeze all\nunfreeze conv2, bn2\n{policy}\nat epoch 3:\n  unfreeze head\n")
    assert [findings(p.plan) for p in ph] == [[], []]


def test_a_policy_in_a_later_phase_does_not_excuse_the_epochs_before_it():
    ph = phases("freeze all\nunfreeze bn1\nat epoch 2:\n  batchnorm affine\n")
    assert [[d.span.line for d in p.plan.diagnostics] for p in ph] == [[2], []]


def test_freeze_rules_and_rules_without_batchnorm_get_no_policy_warning():
    (ph,) = phases("freeze bn1, bn2\nunfreeze conv1, head\n")
    assert findings(ph.plan) == []


def test_no_missing_policy_warning_for_a_layer_that_already_carries_the_affine_class():
    description = {"name": "model", "layers": [
        "conv:Conv2D", {"name": "bn", "class": "BatchNormalization", "affine": True},
        "bn_plain:BatchNormalization"]}
    (ph,) = phases("freeze all\nunfreeze all\n", description)
    assert ph.plan.by_path["bn"].batchnorm == BN_AFFINE  # the plan itself gets this right
    warned = [msg for _s, _l, _c, msg in findings(ph.plan) if "without a policy" in msg]
    assert len(warned) == 1 and "(bn_plain)" in warned[0]


def test_a_resumed_model_already_in_the_phase_state_changes_nothing():
    """A checkpoint saved in phase 2 of 'freeze all; unfreeze head; at epoch 2: unfreeze
    fc.units[0:2]' carries fc trainable with units 2 and 3 frozen (FrozenEntries): planning the
    spec against it must find those very parts and report no change."""
    fc = Layer("fc", "fc", "Dense", 0, True, weights=(
        Weight("kernel", (8, 4), True, (2, 3), 16), Weight("bias", (4,), True, (2, 3), 2)))
    head = Layer("head", "head", "Dense", 1, True,
                 weights=(Weight("kernel", (4, 2)), Weight("bias", (2,))))
    resumed = LayerTree(Layer("model", "", "Functional", 0, True, children=(fc, head),
                              container=True))
    spec = surgery.parse("freeze all\nunfreeze head\nat epoch 2:\n  unfreeze fc.units[0:2]\n")
    last = plan_phases(spec, resumed)[-1].plan
    fc_plan = last.by_path["fc"]
    assert {p.weight: p.indices for p in fc_plan.frozen_parts} == {"kernel": (2, 3),
                                                                    "bias": (2, 3)}
    assert fc_plan.trainable_params_before == fc_plan.trainable_params_after == 18
    assert last.totals.trainable_before == last.totals.trainable_after


def test_a_layer_carrying_the_planned_frozen_parts_is_not_marked_changed():
    fc = Layer("fc", "fc", "Dense", 0, True, weights=(
        Weight("kernel", (8, 4), True, (2, 3), 16), Weight("bias", (4,), True, (2, 3), 2)))
    resumed = LayerTree(Layer("model", "", "Functional", 0, True, children=(fc,),
                              container=True))
    plan = plan_spec(surgery.parse("freeze all\nunfreeze fc.units[0:2]\n"), resumed)
    assert plan.by_path["fc"].frozen_parts  # the parts are there ...
    assert plan.by_path["fc"].changed is False  # ... and they are what the model carries


# --- findings per phase ---------------------------------------------------------------------------


def test_a_rule_overridden_by_a_later_phase_is_not_without_effect():
    spec = surgery.parse("""
freeze all
batchnorm frozen
unfreeze head
at epoch 2:
  freeze head
  unfreeze all
""", "spec.frz")
    ph = plan_phases(spec, tree())
    # 'freeze head' at line 6 is overridden inside its own phase: reported there, and only once.
    assert [[(line, msg.split(":")[0]) for _s, line, _c, msg in findings(p.plan)] for p in ph] == [
        [], [(6, "this rule has no effect")]]
    assert [d.span.line for d in plan_spec(spec, tree()).diagnostics] == [6]


def test_plan_spec_gathers_every_phase_findings_in_line_order():
    spec = surgery.parse("""
batchnorm affine
freeze conv1
freeze all
at epoch 2:
  freeze head
  unfreeze all
""", "spec.frz")
    lines = [d.span.line for d in plan_spec(spec, tree()).diagnostics]
    assert lines == [3, 6]


@pytest.mark.parametrize("text,line,column,message", [
    ("freeze all\nat epoch 2:\n  unfreeze conv3\n", 3, 12, "'conv3' matches no layer"),
    ("freeze all\nat epoch 2:\n  unfreeze head\nat epoch 5:\n  unfreeze all except fc9\n",
     5, 23, "'fc9' matches no layer"),
    ("freeze all\nat epoch 7:\n  batchnorm train head\n", 3, 3,
     "this policy's selectors match no BatchNormalization layer"),
])
def test_a_bad_selector_in_a_later_phase_fails_before_training(text, line, column, message):
    spec = surgery.parse(text, "spec.frz")
    for call in (plan_spec, plan_phases):
        with pytest.raises(surgery.SelectorError) as info:
            call(spec, tree())
        assert (info.value.line, info.value.column) == (line, column)
        assert info.value.message.startswith(message)


def test_allow_empty_makes_a_later_phase_bad_selector_a_finding_of_that_phase():
    ph = phases("freeze all\nat epoch 2:\n  unfreeze conv3, head\n", allow_empty=True)
    assert findings(ph[0].plan) == []
    assert [(line, col) for _s, line, col, _m in findings(ph[1].plan)] == [(3, 12)]
    assert trainable(ph[1].plan) == ["head"]


# --- parse errors of phases ---------------------------------------------------------------------


@pytest.mark.parametrize("text,line,column,message", [
    ("freeze all\nat epoch 3:\n  unfreeze a\nat epoch 2:\n  unfreeze b\n", 4, 1,
     "phases run in epoch order: 'at epoch 2:' comes after 'at epoch 3:' (line 2)"),
    ("freeze all\nat epoch 3:\n  unfreeze a\nat epoch 3:\n  unfreeze b\n", 4, 1,
     "the phase 'at epoch 3:' overlaps the one on line 2"),
    ("freeze all\nat epoch 0:\n  unfreeze a\n", 2, 1,
     "'at epoch 0:' overlaps the statements before it"),
    ("freeze all\nat epoch 3:\nat epoch 4:\n  unfreeze b\n", 2, 1,
     "the phase 'at epoch 3:' has no statements"),
    ("freeze all\nat epoch 3:\n", 2, 1, "the phase 'at epoch 3:' has no statements"),
    ("freeze all\nat epoch 3:\n  unfreeze a\nunfreeze b\n", 4, 1,
     "this statement is outdented out of the 'at epoch 3:' block above it (line 2)"),
    ("freeze all\n  at epoch 3:\n    unfreeze a\n  unfreeze b\n", 4, 3,
     "this statement is outdented out of the 'at epoch 3:' block above it (line 2)"),
    ("freeze all\nat epoch -1:\n  unfreeze a\n", 2, 10, "an epoch is 0 or more"),
    ("freeze all\nat epoc 2:\n  unfreeze a\n", 2, 4, "expected 'epoch' after 'at'"),
    ("freeze all\nat epoch two:\n  unfreeze a\n", 2, 10, "expected an epoch number"),
    ("freeze all\nat epoch 2\n  unfreeze a\n", 2, 11, "expected ':' to end the phase header"),
    ("batchnorm fixed\n", 1, 11, "expected a BatchNormalization policy, 'frozen', 'train' or "
                                 "'affine', found 'fixed'"),
])
def test_phase_parse_errors_have_line_and_column(text, line, column, message):
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse(text, "spec.frz")
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.message.startswith(message), err.message
    assert err.render().splitlines()[0].startswith(f"spec.frz:{line}:{column}: error: ")


def test_statements_carry_their_phase_however_the_block_is_written():
    spec = surgery.parse(
        "freeze all; batchnorm frozen\nat epoch 2: unfreeze a; batchnorm train\n"
        "at epoch 4:\n    unfreeze b\n  unfreeze c\n", "spec.frz")
    assert [(r.text, r.epoch) for r in spec.rules] == [
        ("freeze all", 0), ("unfreeze a", 2), ("unfreeze b", 4), ("unfreeze c", 4)]
    assert [(p.text, p.epoch) for p in spec.policies] == [
        ("batchnorm frozen", 0), ("batchnorm train", 2)]


# --- the checks both forms share (surgery/checks.py): the same words, at each form's own text ---

_BIG = "9" * 5000


@pytest.mark.parametrize("frz,frz_at,yaml_text,yaml_at,message", [
    ("at epoch -1: freeze a\n", (1, 10),
     "rules:\n  - at epoch -1: [{freeze: a}]\n", (2, 5),
     "an epoch is 0 or more (Keras counts epochs from 0, as for initial_epoch)"),
    (f"at epoch {_BIG}: freeze a\n", (1, 10),
     f"rules:\n  - ? at epoch {_BIG}\n    : [{{freeze: a}}]\n", (2, 7),  # a key over 1024
     "number is too large"),                                             # characters: '?'-form
    ("freeze x\nat epoch 3: freeze a\nat epoch 3: freeze b\n", (3, 1),
     "rules:\n  - freeze: x\n  - at epoch 3: [{freeze: a}]\n  - at epoch 3: [{freeze: b}]\n",
     (4, 5),
     "the phase 'at epoch 3:' overlaps the one on line {first}: write its statements under one "
     "header"),
    ("freeze x\nat epoch 5: freeze a\nat epoch 3: freeze b\n", (3, 1),
     "rules:\n  - freeze: x\n  - at epoch 5: [{freeze: a}]\n  - at epoch 3: [{freeze: b}]\n",
     (4, 5),
     "phases run in epoch order: 'at epoch 3:' comes after 'at epoch 5:' (line {first}); move it "
     "before that one"),
    ("freeze x\nat epoch 0: freeze a\n", (2, 1),
     "rules:\n  - freeze: x\n  - at epoch 0: [{freeze: a}]\n", (3, 5),
     "'at epoch 0:' overlaps the statements before it, which already form phase 0: remove the "
     "header, or move those statements under it"),
    ("freeze x\nat epoch 3:\nat epoch 4: freeze a\n", (2, 1),
     "rules:\n  - freeze: x\n  - at epoch 3: []\n  - at epoch 4: [{freeze: a}]\n", (3, 5),
     "the phase 'at epoch 3:' has no statements"),
    ("freeze x\nat epoch 3:\n", (2, 1),
     "rules:\n  - freeze: x\n  - at epoch 3:\n", (3, 5),
     "the phase 'at epoch 3:' has no statements"),
])
def test_both_forms_refuse_the_same_phases_in_the_same_words(frz, frz_at, yaml_text, yaml_at,
                                                               message):
    from surgery.yaml_read import parse_yaml

    for read, text, at, first in ((surgery.parse, frz, frz_at, 2),
                                  (parse_yaml, yaml_text, yaml_at, 3)):
        with pytest.raises(surgery.SpecSyntaxError) as info:
            read(text, "spec")
        err = info.value
        assert ((err.line, err.column), err.message) == (at, message.format(first=first)), text[:60]


def test_both_forms_number_statements_and_give_them_their_phase_alike():
    from surgery.yaml_read import parse_yaml

    frz = surgery.parse("freeze a\nbatchnorm frozen\nat epoch 2:\n  unfreeze b\n  batchnorm train\n"
                        "  unfreeze c\nat epoch 5:\n  freeze d\n")
    yml = parse_yaml("rules:\n  - freeze: a\n  - batchnorm: frozen\n  - at epoch 2:\n"
                     "      - unfreeze: b\n      - batchnorm: train\n      - unfreeze: c\n"
                     "  - at epoch 5:\n      - freeze: d\n")
    for spec in (frz, yml):
        assert [(r.text, r.number, r.epoch) for r in spec.rules] == [
            ("freeze a", 0, 0), ("unfreeze b", 1, 2), ("unfreeze c", 2, 2), ("freeze d", 3, 5)]
        assert [(p.text, p.number, p.epoch) for p in spec.policies] == [
            ("batchnorm frozen", 0, 0), ("batchnorm train", 1, 2)]
        assert [p.epoch for p in spec.phases] == [2, 5]
