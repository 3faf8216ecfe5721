"""Composite layers and variable flags on real Keras models, without keras_hub (engines/live.py).

Keras's MultiHeadAttention holds its projections as layers; a layer of one's own may hold layers
and weights of its own; LoRA and users set flags on variables. Every count is checked against
Keras's own (`model.count_params()`, `model.trainable_weights`), every recipe against its own
Python loop on the same model, and the saved files against a plain `keras.models.load_model`
in a fresh process.
"""

from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery import saved_state
from surgery.api import apply_plan
from surgery.engines import live

from conftest import probe_in_fresh_process, reset_state, trainable_count, trainable_paths

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _weight_paths(tree):
    return [(f"{n.path}/{w.name}", w.path) for n in tree.layers() for w in n.weights]


def test_the_tree_goes_into_multi_head_attention_with_keras_own_variable_paths(mha_model):
    tree, _ = live.describe(reset_state(mha_model))
    mha = tree.get("mha")
    assert mha.kind == "composite" and not mha.weights
    assert [c.path for c in mha.children if c.weights] == [
        "mha/query", "mha/key", "mha/value", "mha/attention_output"]
    # Inside a composite layer surgery's path of a weight is Keras's variable.path.
    assert all(ours == theirs for ours, theirs in _weight_paths(tree))
    assert sorted(theirs for _, theirs in _weight_paths(tree)) == sorted(
        v.path for v in mha_model.weights)


@pytest.mark.backends
def test_freeze_query_and_key_matches_the_recipe_loop(mha_model):
    model = reset_state(mha_model)
    mha = model.get_layer("mha")
    mha._query_dense.trainable = False  # the recipe's own loop
    mha._key_dense.trainable = False
    expected, count = trainable_paths(model), trainable_count(model)

    reset_state(model)
    manifest = surgery.apply(model, SPECS / "mha_freeze_query_key.frz")
    assert trainable_paths(model) == expected
    assert manifest.data["totals"]["trainable_params"]["after"] == count == trainable_count(model)
    assert manifest.data["totals"]["params"] == model.count_params()


def _gated(keras):
    class Gate(keras.layers.Layer):
        """A composite layer with a weight of its own beside a Dense sublayer (as ViT's
        patching layer holds its class token beside its Conv2D)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(4, name="inner")

        def build(self, shape):
            self.scale = self.add_weight(name="scale", shape=(4,), initializer="ones")
            self.inner.build(shape)

        def call(self, x):
            return self.inner(x) * self.scale

    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(Gate(name="gate")(inputs)))


def test_a_composite_layers_own_weights_count_once(keras_module):
    model = _gated(keras_module)
    tree, _ = live.describe(model)
    gate = tree.get("gate")
    assert [w.name for w in gate.weights] == ["scale"] and gate.children[0].path == "gate/inner"
    plan = surgery.plan(model, "freeze gate\nunfreeze gate/inner")
    assert plan.totals.params == model.count_params()
    surgery.apply(model, "freeze gate\nunfreeze gate/inner")
    # The gate's flag is on for its sublayer; its own scale stays frozen by its variable's flag.
    assert trainable_paths(model) == sorted(["gate/inner/kernel", "gate/inner/bias",
                                             "head/kernel", "head/bias"])
    assert plan.totals.trainable_after == trainable_count(model)
    surgery.apply(model, "freeze gate.scale")
    assert "gate/scale" not in trainable_paths(model)
    assert surgery.plan(model, "freeze head").totals.trainable_before == trainable_count(model)


def test_a_flag_set_by_hand_is_counted_and_kept(keras_module):
    inputs = keras_module.Input((3,))
    hidden = keras_module.layers.Dense(4, name="fc")(inputs)
    model = keras_module.Model(inputs, keras_module.layers.Dense(2, name="head")(hidden))
    model.get_layer("fc").kernel.trainable = False  # by hand, not through the layer
    plan = surgery.plan(model, "freeze head")
    assert plan.totals.trainable_before == trainable_count(model) == 4 + 10
    surgery.apply(model, "unfreeze all")
    assert "fc/kernel" not in trainable_paths(model)  # a rule never turns such a flag on
    assert surgery.plan(model, "freeze head").totals.trainable_before == trainable_count(model)


@pytest.mark.backends
def test_keras_lora_counts_and_survives_other_rules(keras_module):
    inputs = keras_module.Input((6,))
    hidden = keras_module.layers.Dense(8, name="fc")(inputs)
    model = keras_module.Model(inputs, keras_module.layers.Dense(2, name="head")(hidden))
    model.get_layer("fc").enable_lora(2)
    before = trainable_paths(model)
    assert "fc/kernel" not in before and "fc/lora_kernel_a" in before
    plan = surgery.plan(model, "freeze head")
    assert plan.totals.trainable_before == trainable_count(model)
    surgery.apply(model, "unfreeze fc, head")  # fc's kernel stays as LoRA holds it: off
    assert trainable_paths(model) == before
    surgery.apply(model, "freeze head")
    assert trainable_paths(model) == [p for p in before if not p.startswith("head/")]
    assert plan.totals.trainable_after == trainable_count(model)


def test_a_part_error_on_multi_head_attention_lists_its_weights_by_path(mha_model):
    with pytest.raises(surgery.SelectorError) as info:
        surgery.plan(reset_state(mha_model), "freeze mha.kernel")
    message = info.value.message
    assert message.startswith("'mha' (MultiHeadAttention) holds layers and has no weight "
                              "'kernel' of its own: the weights inside it are mha/query/kernel "
                              "(8, 2, 4), mha/query/bias (2, 4), mha/key/kernel (8, 2, 4)")
    assert message.endswith("as in 'mha/query.kernel', or 'mha/**/*.kernel' for every layer "
                            "inside that has it")
    with pytest.raises(surgery.SelectorError) as info:
        surgery.plan(mha_model, "freeze query")
    assert info.value.message == ("'query' matches no layer; it is inside the layer 'mha' "
                                  "(MultiHeadAttention): write '**/query' or 'mha/query'")


@pytest.mark.backends
def test_frozen_projections_do_not_move_in_training(mha_model):
    from conftest import train_one_step

    model = reset_state(mha_model)
    surgery.apply(model, "freeze mha/query, mha/key")
    moved = {p for p, (a, b) in train_one_step(model).items() if not np.array_equal(a, b)}
    assert moved == set(trainable_paths(model))
    assert not moved & {"mha/query/kernel", "mha/query/bias", "mha/key/kernel", "mha/key/bias"}


# --- what a plain keras.models.load_model gives back, predicted and checked -----------------


def _dense_model(keras):
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 3, name="emb")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(5, name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="plain")


def _lora_model(keras):
    model = _dense_model(keras)
    model.get_layer("fc1").enable_lora(2)
    return model


CASES = [  # (model builder, spec, whether a plain load gives the plan back)
    ("mha", "freeze mha/query, mha/key", False),  # MultiHeadAttention builds them again
    ("mha", "freeze mha", False),  # even a frozen MultiHeadAttention reloads trainable
    ("mha", "freeze norm, head", True),
    ("plain", "freeze fc1", True),
    ("plain", "freeze fc1.kernel", True),  # a FrozenEntries constraint in the config holds it
    ("plain", "freeze emb.embeddings", False),  # only the variable's flag holds it
    # The config enables LoRA again, its kernel's flag off: the flags come back, but both
    # factors zero (they never train) and Dense's alpha reset to the rank, so the file holds
    # surgery's record (tests/test_lora.py trains after the reload).
    ("lora", "freeze head", False),
]


@pytest.mark.slow
def test_the_prediction_holds_in_a_fresh_process(keras_module, tmp_path):
    from conftest import build_mha_model

    builders = {"mha": build_mha_model, "plain": _dense_model, "lora": _lora_model}
    jobs, expected = [], {}
    for i, (kind, text, restored) in enumerate(CASES):
        model = builders[kind](keras_module)
        plan, _ = apply_plan(model, surgery.parse(text))
        path = str(tmp_path / f"{i}.keras")
        live.save(model, path)
        note = saved_state.record(path, plan)
        assert (saved_state.unrestored(plan) == ()) is restored, text
        assert (note is None) is restored, text
        planned = sorted(f"{lp.path}/{n}" for lp in plan.layers
                         for n, on in plan.trains(lp).items() if on)
        jobs.append({"path": path, "train": kind == "mha"})
        expected[path] = (text, restored, planned, saved_state.unrestored(plan), kind)
    found = probe_in_fresh_process(jobs, tmp_path)
    for path, (text, restored, planned, layers, kind) in expected.items():
        got = found[path]
        assert got["surgery"] == planned, text
        if kind == "lora":  # the flags come back; what does not is not a flag
            assert got["plain"] == planned and layers == ("fc1",), text
            continue
        assert (got["plain"] == planned) is restored, text
        # The layers the note names are exactly those a plain load gives another state.
        differ = {p.rsplit("/", 1)[0] for p in set(got["plain"]) ^ set(planned)}
        assert differ == set(layers), text
        if "moved" in got:
            assert got["moved"] == planned, text
