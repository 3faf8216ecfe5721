"""keras_hub transformers: the recipes in specs/ against their own Python loops, LoRA, and the
state a saved keras_hub model cannot hold.

Real backbones built from constructor arguments with tiny dimensions (tests/conftest.py: never a
preset, nothing downloaded), each built once per session. Every expectation is what Keras itself
reports for the recipe's loop run on the same model: the exact set of `trainable_weights` paths
and their parameter count.
"""

import contextlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery import saved_state
from surgery.engines import live

from conftest import (build_backbone, build_bert_classifier, probe_in_fresh_process, reset_state,
                      trainable_count, trainable_paths)

SPECS = Path(__file__).resolve().parent.parent / "specs"

# keras_hub tasks compile themselves when built; these tests compile again where they train.
pytestmark = pytest.mark.filterwarnings("ignore:the model was compiled before surgery")


# --- each recipe's own loop, as a Keras user writes it ----------------------------------------


def _bitfit_loop(model):
    import keras

    norms = {id(v) for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.LayerNormalization) for v in layer.weights}
    for v in model.trainable_weights:
        v.trainable = v.name == "bias" or id(v) in norms


def _query_value_loop(model):
    inner = model._flatten_layers(include_self=False)
    for layer in inner:
        layer.trainable = False
    for layer in inner:
        if layer.name in ("query", "value"):
            layer.trainable = True


def _first_block_loop(model):
    names = {"token_embedding", "position_embedding", "segment_embedding", "embeddings_add",
             "embeddings_layer_norm", "embeddings_dropout", "transformer_layer_0"}
    for layer in model.layers:
        if layer.name in names:
            layer.trainable = False


RECIPES = {
    "transformer_bitfit.frz": (_bitfit_loop, ("bert", "gpt2", "vit", "bert_classifier")),
    "transformer_query_value.frz": (_query_value_loop, ("bert", "gpt2", "gemma", "vit")),
    "bert_freeze_embeddings_first_block.frz": (_first_block_loop, ("bert", "gpt2")),
}


@pytest.mark.parametrize("recipe,kind", [(r, k) for r, (_, kinds) in RECIPES.items()
                                         for k in kinds])
def test_a_recipe_trains_what_its_loop_trains(recipe, kind, hub_models):
    model = reset_state(hub_models(kind))
    RECIPES[recipe][0](model)
    expected, count = trainable_paths(model), trainable_count(model)
    assert 0 < count < model.count_params()

    reset_state(model)
    plan = surgery.plan(model, SPECS / recipe)
    manifest = surgery.apply(model, SPECS / recipe)
    assert trainable_paths(model) == expected
    assert plan.totals.trainable_after == count == trainable_count(model)
    assert manifest.data["totals"]["trainable_params"]["after"] == count
    assert plan.totals.params == model.count_params()


def test_the_phases_of_top_down_unfreezing_train_what_the_loop_trains(hub_models):
    model = hub_models("bert")
    spec = SPECS / "bert_top_down_unfreeze.frz"
    opened = ["pooled_dense", "transformer_layer_1", "transformer_layer_0"]
    for epoch in range(3):
        reset_state(model)
        for layer in model.layers:  # the loop: everything frozen, then the top groups
            layer.trainable = layer.name in opened[:epoch + 1]
        expected, count = trainable_paths(model), trainable_count(model)
        reset_state(model)
        with pytest.warns(surgery.SurgeryWarning, match="later phases") if epoch < 2 else \
                contextlib.nullcontext():
            manifest = surgery.apply(model, spec, epoch=epoch)
        assert trainable_paths(model) == expected, epoch
        assert manifest.data["schedule"][epoch]["trainable_params"] == count == \
            trainable_count(model)


def test_paths_continue_through_composite_layers_and_nested_models(hub_models):
    backbone = reset_state(hub_models("bert"))
    tree, _ = live.describe(backbone)
    weights = [(f"{n.path}/{w.name}", w.path) for n in tree.layers() for w in n.weights]
    assert all(ours == theirs for ours, theirs in weights)  # Keras's own variable.path
    assert "transformer_layer_0/self_attention_layer/query/kernel" in dict(weights)
    assert tree.get("transformer_layer_0").kind == "composite"
    assert tree.get("transformer_layer_0/self_attention_layer").kind == "composite"

    classifier = reset_state(hub_models("bert_classifier"))
    tree, _ = live.describe(classifier)
    assert tree.get("bert_backbone").kind == "model"
    for n in tree.layers():
        for w in n.weights:  # Keras leaves out the nested model's name; surgery keeps it
            ours = f"{n.path}/{w.name}"
            assert ours == w.path or ours == f"bert_backbone/{w.path}", ours
    plan = surgery.plan(classifier, "freeze bert_backbone/transformer_layer_0")
    assert plan.totals.params == classifier.count_params()


def test_counts_agree_with_keras_on_every_backbone(hub_models):
    for kind in ("bert", "gpt2", "gemma", "vit", "bert_classifier"):
        model = reset_state(hub_models(kind))
        totals = surgery.plan(model, "freeze **/type:*Normalization").totals
        assert (totals.params, totals.trainable_before) == (
            model.count_params(), trainable_count(model)), kind


# --- LoRA: flags on variables ----------------------------------------------------------------


@pytest.fixture
def lora_bert():
    backbone = build_backbone("bert")
    backbone.enable_lora(4)
    return backbone


def test_plan_counts_what_keras_trains_after_enable_lora(lora_bert):
    plan = surgery.plan(lora_bert, "freeze pooled_dense")
    assert plan.totals.trainable_before == plan.totals.trainable_after == \
        trainable_count(lora_bert)
    assert plan.totals.params == lora_bert.count_params()


def test_apply_keeps_the_lora_set_up_it_does_not_decide(lora_bert):
    before, count = trainable_paths(lora_bert), trainable_count(lora_bert)
    assert any(p.endswith("query/lora_kernel_a") for p in before)
    assert not any(p.endswith("query/kernel") for p in before)
    manifest = surgery.apply(lora_bert, "freeze pooled_dense")  # already frozen by enable_lora
    assert trainable_paths(lora_bert) == before
    assert manifest.data["totals"]["trainable_params"] == {"before": count, "after": count}

    # Unfreezing a block turns on what it holds, except the kernels LoRA holds off: what the
    # loop below (Keras's own setter, then the flags LoRA set) gives.
    surgery.apply(lora_bert, "unfreeze transformer_layer_0")
    ours = trainable_paths(lora_bert)
    block = lora_bert.get_layer("transformer_layer_0")
    block.trainable = True
    for layer in block._flatten_layers():
        if getattr(layer, "lora_enabled", False):
            layer._kernel.trainable = False
    assert ours == trainable_paths(lora_bert)
    assert not any(p.endswith(("query/kernel", "value/kernel")) for p in ours)


# --- the state a saved keras_hub model cannot hold -----------------------------------------


def test_the_note_names_what_a_plain_load_will_not_restore(hub_models):
    model = reset_state(hub_models("bert"))
    from surgery.api import apply_plan

    plan, _ = apply_plan(model, surgery.load_spec(SPECS / "transformer_query_value.frz"))
    layers = saved_state.unrestored(plan)
    # Every layer frozen inside the backbone comes back trainable: keras_hub rebuilds them.
    assert "token_embedding" in layers and "transformer_layer_0/self_attention_layer/key" in layers
    assert "transformer_layer_0/self_attention_layer/query" not in layers
    line = saved_state.note(layers, "out.keras")
    assert "\n" not in line and "surgery.load_model('out.keras')" in line


@pytest.mark.slow
def test_apply_on_a_saved_classifier_warns_and_surgery_load_model_restores_it(tmp_path):
    """`surgery apply` on a saved keras_hub classifier: the note in one line, exit 0, and in a
    fresh process a plain load trains everything while surgery.load_model trains exactly the
    plan, and training moves exactly those variables."""
    src = str(tmp_path / "classifier.keras")
    build_bert_classifier().save(src)
    spec = tmp_path / "bitfit.frz"
    spec.write_text((SPECS / "transformer_bitfit.frz").read_text() + "unfreeze logits\n")
    out = str(tmp_path / "tuned.keras")
    done = subprocess.run([sys.executable, "-m", "surgery", "apply", str(spec), src, "-o", out],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "keras.models.load_model" in line]
    assert len(notes) == 1 and f"surgery.load_model('{out}')" in notes[0]
    manifest = surgery.Manifest(json.loads(Path(out + ".manifest.json").read_text()))

    found = probe_in_fresh_process([{"path": out, "train": True}], tmp_path)[out]
    planned = found["surgery"]
    assert found["plain"] != planned  # everything trains again after a plain load
    assert found["moved"] == planned
    assert all(p.endswith(("/bias", "/gamma", "/beta")) or p.startswith("logits/")
               for p in planned)
    sizes = {f"{n.path}/{w.name}": w.size
             for n in live.describe(build_bert_classifier())[0].layers() for w in n.weights}
    assert sum(sizes[p] for p in planned) == manifest.data["totals"]["trainable_params"]["after"]

    verified = subprocess.run([sys.executable, "-m", "surgery", "verify", out + ".manifest.json",
                               out], capture_output=True, text=True, timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_a_plan_a_plain_load_restores_writes_no_record(tmp_path):
    """The other branch: a saved keras_hub backbone entirely frozen keeps that in its root's
    flag, so `apply` writes a plain file that keras.models.load_model restores as planned."""
    backbone = build_backbone("bert")
    plan, _ = surgery.api.apply_plan(backbone, surgery.parse("freeze all"))
    path = str(tmp_path / "frozen.keras")
    live.save(backbone, path)
    assert saved_state.record(path, plan) is None
    assert saved_state.read(path) is None
    found = probe_in_fresh_process([{"path": path}], tmp_path)[path]
    assert found["plain"] == found["surgery"] == []


def test_surgery_load_model_refuses_a_record_for_another_model(tmp_path, hub_models):
    model = reset_state(hub_models("bert"))
    plan, _ = surgery.api.apply_plan(model, surgery.parse("freeze **/query"))
    path = str(tmp_path / "a.keras")
    live.save(build_backbone("gpt2"), path)  # another architecture, this plan's record
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(saved_state.ENTRY, saved_state.encode(saved_state.from_plan(plan)))
    with pytest.raises(surgery.ModelError, match="is for another model"):
        surgery.load_model(path)
    reset_state(model)


def test_training_after_surgery_apply_moves_exactly_the_planned_variables(hub_models):
    import keras

    model = reset_state(hub_models("bert_classifier"))
    surgery.apply(model, SPECS / "transformer_query_value.frz")
    planned = set(trainable_paths(model))
    x = {"token_ids": np.ones((2, 8), "int32"), "segment_ids": np.zeros((2, 8), "int32"),
         "padding_mask": np.ones((2, 8), "int32")}
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, np.array([0, 1]))
    moved = {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}
    assert moved == planned
    reset_state(model)


@pytest.mark.slow
def test_schedule_unfreezes_the_top_blocks_phase_by_phase_during_fit():
    """`surgery.Schedule` on a BERT classifier: in each epoch exactly the variables of the phase
    in force move (the recipe's loop state at that epoch), with one ordinary fit."""
    import keras

    model = build_bert_classifier()
    text = (SPECS / "bert_top_down_unfreeze.frz").read_text().replace(
        "unfreeze **/pooled_dense", "unfreeze **/pooled_dense, logits")
    groups = [("bert_backbone/pooled_dense", "logits"), ("bert_backbone/transformer_layer_1",),
              ("bert_backbone/transformer_layer_0",)]
    tree, objects = live.describe(model)
    named = {f"{p}/{w.name}": v for p, vs in objects.variables.items()
             for w, v in zip(tree.get(p).weights, vs)}
    snapshots = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            snapshots.append({n: np.array(v.numpy()) for n, v in named.items()})

        def on_train_end(self, logs=None):
            snapshots.append({n: np.array(v.numpy()) for n, v in named.items()})

    x = {"token_ids": np.ones((4, 8), "int32"), "segment_ids": np.zeros((4, 8), "int32"),
         "padding_mask": np.ones((4, 8), "int32")}
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, np.array([0, 1, 0, 1]), batch_size=2, epochs=3, verbose=0,
              callbacks=[surgery.Schedule(surgery.parse(text), verbose=0), Record()])
    for epoch in range(3):
        moved = {n for n in named if not np.array_equal(snapshots[epoch][n],
                                                         snapshots[epoch + 1][n])}
        opened = tuple(g for group in groups[:epoch + 1] for g in group)
        expected = {n for n in named if n.startswith(opened) and
                    not n.endswith(("moving_mean", "moving_variance"))}
        assert moved == expected, epoch
