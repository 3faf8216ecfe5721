"""The 'lora' statement on real Keras models: keras_hub backbones built from constructor
arguments (tiny dimensions, nothing downloaded) and a Conv2D model.

- the variables that train are those keras_hub's own ``backbone.enable_lora`` gives LoRA;
- what surgery plans is what Keras trains, counted both ways;
- across save and reload in a fresh process: the same outputs and alpha, and factors that train
  again (a plain load zeroes both, so neither would move), the kernel unmoved;
- adapters on their own into a fresh model, all or nothing; a merge plain Keras loads.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import surgery
from surgery.adapters import AdaptersError

from conftest import build_backbone, build_bert_classifier, trainable_count, trainable_paths

pytestmark = pytest.mark.filterwarnings("ignore:the model was compiled before surgery")

QV = "freeze all\nlora rank=4 **/self_attention_layer/query, **/self_attention_layer/value\n"


def lora_variables(model):
    return sorted(v.path for v in model.weights if "lora_" in v.path)


@pytest.mark.parametrize("kind,spec", [
    ("bert", QV),
    ("gemma", "freeze all\nlora rank=4 **/query, **/value\n"),
])
def test_the_lora_variables_are_those_keras_hub_enable_lora_gives(kind, spec):
    ours, theirs = build_backbone(kind), build_backbone(kind)
    manifest = surgery.apply(ours, spec)
    theirs.enable_lora(4)  # its default targets: the layers named query and value
    assert lora_variables(ours) == lora_variables(theirs)
    assert lora_variables(ours)  # (something to compare)
    # freeze all + lora trains the factors and nothing else: keras_hub also trains the biases.
    assert trainable_paths(ours) == lora_variables(ours)
    assert set(trainable_paths(ours)) <= set(trainable_paths(theirs))
    assert manifest.data["totals"]["trainable_params"]["after"] == trainable_count(ours)
    assert manifest.data["totals"]["params"] == ours.count_params()
    # The same ranks and scale as keras_hub's: outputs before any training are the base's.
    for a, b in zip(ours._flatten_layers(), theirs._flatten_layers()):
        if getattr(b, "lora_enabled", False):
            assert (a.lora_rank, a.lora_alpha) == (b.lora_rank, b.lora_alpha)


def test_a_composite_layer_selects_the_dense_layers_inside_it():
    model = build_backbone("bert")
    surgery.apply(model, "freeze all\nlora rank=2 transformer_layer_0\n")
    adapted = sorted(layer.path if hasattr(layer, "path") else layer.name
                     for layer in model._flatten_layers() if getattr(layer, "lora_enabled", False))
    import keras

    block = model.get_layer("transformer_layer_0")
    loop = [lyr for lyr in block._flatten_layers(include_self=False)
            if isinstance(lyr, (keras.layers.Dense, keras.layers.EinsumDense))]
    assert len(adapted) == len(loop) == 6  # query, key, value, output, two feed-forward


@pytest.mark.backends
def test_refusals_leave_the_model_unchanged():
    import keras

    inputs = keras.Input((4,))
    out = keras.layers.Dense(3, kernel_constraint=keras.constraints.MaxNorm(2), name="fc")(inputs)
    model = keras.Model(inputs, out)
    before = trainable_paths(model)
    with pytest.raises(surgery.SpecError, match="kernel_constraint"):
        surgery.apply(model, "lora rank=2 fc")
    assert trainable_paths(model) == before and not model.get_layer("fc").lora_enabled
    model = build_backbone("bert")
    surgery.apply(model, "lora rank=2 pooled_dense")
    with pytest.raises(surgery.SpecError, match="already has LoRA with rank 2"):
        surgery.apply(model, "lora rank=4 pooled_dense")


# --- save, reload, train again: in a fresh process ------------------------------------------


def _conv_model():
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="cnn")


CONV_SPEC = "freeze all\nlora rank=2 alpha=6 conv*\nunfreeze head\n"
BERT_SPEC = ("freeze all\nlora rank=4 alpha=8 **/self_attention_layer/query, "
             "**/self_attention_layer/value\nunfreeze logits\n")


def _data(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    if isinstance(model.input, dict) or len(model.inputs) > 1:
        x = {"token_ids": rng.integers(1, 500, (n, 16)).astype("int32"),
             "segment_ids": np.zeros((n, 16), "int32"),
             "padding_mask": np.ones((n, 16), "int32")}
    else:
        x = rng.standard_normal((n, 8, 8, 3)).astype("float32")
    y = rng.standard_normal((n,) + tuple(model.output.shape[1:])).astype("float32")
    return x, y


def _fit(model, x, y):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=[])
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)


FRESH = r'''
import json, sys
import numpy as np
import keras, keras_hub
import surgery
job = json.loads(sys.argv[1])
out = {}
for name, files in job.items():
    x = {k: np.array(v, dtype="int32") for k, v in files["x"].items()} \
        if isinstance(files["x"], dict) else np.array(files["x"], dtype="float32")
    ref = np.load(files["ref"])
    result = {}
    for how in ("surgery_apply", "model_save"):
        model = surgery.load_model(files[how], compile=False)
        lora = [l for l in model._flatten_layers() if getattr(l, "lora_enabled", False)]
        got = model.predict(x, verbose=0)
        before = {v.path: np.array(v.numpy()) for v in model.weights}
        # Adam: any gradient at all moves a weight (by about the learning rate), so a factor
        # that did not move had none.
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=[])
        model.fit(x, np.ones_like(got), batch_size=4, epochs=2, shuffle=False, verbose=0)
        moved = sorted(p for p, v in before.items()
                       if not np.array_equal(v, [w for w in model.weights if w.path == p][0].numpy()))
        result[how] = {"alphas": sorted({float(l.lora_alpha) for l in lora}), "layers": len(lora),
                       "max_diff": float(np.abs(got - ref).max()) if how == "model_save" else None,
                       "moved": moved, "trainable": sorted(v.path for v in model.trainable_weights)}
    fresh = keras.models.load_model(files["base"], compile=False)
    surgery.apply(fresh, files["spec"])
    surgery.load_adapters(fresh, files["adapters"])
    result["adapters_diff"] = float(np.abs(fresh.predict(x, verbose=0) -
                                           np.load(files["ref_adapters"])).max())
    merged = keras.models.load_model(files["merged"], compile=False)
    result["merged_lora"] = sum(1 for l in merged._flatten_layers()
                                if getattr(l, "lora_enabled", False))
    result["merged_diff"] = float(np.abs(merged.predict(x, verbose=0) - ref).max())
    out[name] = result
print("FRESH " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """For the Conv2D model and a BERT classifier: the base model saved; `surgery apply` of the
    LoRA spec; the same spec applied in Python, trained, then saved with model.save (the
    trained outputs kept as the reference), its adapters and its merge."""
    import keras

    root = tmp_path_factory.mktemp("lora")
    jobs, trained = {}, {}
    for name, build, spec in (("conv", _conv_model, CONV_SPEC),
                              ("bert", build_bert_classifier, BERT_SPEC)):
        d = root / name
        d.mkdir()
        keras.utils.set_random_seed(0)
        model = build()
        base = str(d / "base.keras")
        model.save(base)
        (d / "spec.frz").write_text(spec)
        surgery.apply_file(str(d / "spec.frz"), base, str(d / "applied.keras"), engine="keras")
        surgery.apply(model, spec)
        x, y = _data(model)
        kernels = {v.path: np.array(v.numpy()) for v in model.weights if v.path.endswith(
            ("/kernel", "/embeddings")) and not v.trainable}
        # The head trains too; adapters hold the factors only: with the head as it was before
        # training, the trained model gives what the base model and the adapters give.
        head = [v for v in model.trainable_weights if "lora_" not in v.path]
        head_before = [np.array(v.numpy()) for v in head]
        _fit(model, x, y)
        ref = model.predict(x, verbose=0)
        np.save(d / "ref.npy", ref)
        head_after = [np.array(v.numpy()) for v in head]
        for v, value in zip(head, head_before):
            v.assign(value)
        np.save(d / "ref_adapters.npy", model.predict(x, verbose=0))
        for v, value in zip(head, head_after):
            v.assign(value)
        model.save(str(d / "trained.keras"))
        surgery.save_adapters(model, str(d / "adapters.safetensors"))
        merged = surgery.merge_file(str(d / "trained.keras"), str(d / "merged.keras"))
        trained[name] = {"model": model, "kernels": kernels, "merged": merged}
        jobs[name] = {"x": {k: v.tolist() for k, v in x.items()} if isinstance(x, dict)
                      else x.tolist(), "ref": str(d / "ref.npy"), "base": base,
                      "ref_adapters": str(d / "ref_adapters.npy"), "spec": spec,
                      "surgery_apply": str(d / "applied.keras"),
                      "model_save": str(d / "trained.keras"),
                      "adapters": str(d / "adapters.safetensors"),
                      "merged": str(d / "merged.keras")}
    done = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("FRESH ")][-1]
    return json.loads(line[len("FRESH "):]), trained, jobs


@pytest.mark.parametrize("name,alpha", [("conv", 6.0), ("bert", 8.0)])
def test_training_continues_after_a_reload_in_a_fresh_process(saved, name, alpha):
    fresh, trained, _ = saved
    model = trained[name]["model"]
    factors = [v.path for v in model.trainable_weights if "lora_" in v.path]
    for how in ("surgery_apply", "model_save"):
        r = fresh[name][how]
        assert r["layers"] == len(factors) // 2 and r["alphas"] == [alpha], how
        # What trains after the reload is what trained before the save.
        assert r["trainable"] == sorted(v.path for v in model.trainable_weights), how
        # The factors really train again (both zero would give neither a gradient), and only
        # what trains moved: the LoRA kernels and every frozen weight stay bit-exact.
        assert set(factors) <= set(r["moved"]), how
        assert set(r["moved"]) <= set(r["trainable"]), how
    # The same outputs as the trained model (the saved kernel is the merged one).
    assert fresh[name]["model_save"]["max_diff"] < 1e-4


@pytest.mark.parametrize("name", ["conv", "bert"])
def test_adapters_alone_rebuild_the_trained_model(saved, name):
    fresh, _, _ = saved
    assert fresh[name]["adapters_diff"] < 1e-4


@pytest.mark.parametrize("name", ["conv", "bert"])
def test_a_merged_model_loads_in_plain_keras_without_lora(saved, name):
    fresh, trained, jobs = saved
    assert fresh[name]["merged_lora"] == 0
    assert fresh[name]["merged_diff"] < 1e-4
    assert trained[name]["merged"].layers  # it said which layers it merged


def test_load_adapters_refuses_a_mismatch_and_loads_nothing(saved, tmp_path):
    import keras

    _, _, jobs = saved
    job = jobs["conv"]
    other = keras.models.load_model(job["base"], compile=False)
    surgery.apply(other, "freeze all\nlora rank=1 conv*\nunfreeze head")  # another rank
    values = {v.path: np.array(v.numpy()) for v in other.weights}
    with pytest.raises(AdaptersError, match="rank 1 in the model, 2 in the file"):
        surgery.load_adapters(other, job["adapters"])
    assert all(np.array_equal(values[v.path], v.numpy()) for v in other.weights)
    partial = keras.models.load_model(job["base"], compile=False)
    surgery.apply(partial, "lora rank=2 alpha=6 conv1")
    with pytest.raises(AdaptersError, match="'conv2' has LoRA in the file, not in the model"):
        surgery.load_adapters(partial, job["adapters"])
    with pytest.raises(AdaptersError, match="no LoRA layer"):
        surgery.save_adapters(keras.models.load_model(job["base"], compile=False),
                              tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()


def test_the_archive_engine_hands_lora_to_keras_and_plans_it_without_tensorflow(saved, tmp_path):
    _, _, jobs = saved
    job = jobs["conv"]
    from surgery.modelfile import read_model
    from surgery.plan import plan_spec

    read = read_model(job["base"], engine="archive")
    plan = plan_spec(surgery.parse(CONV_SPEC), read.tree)
    assert [lp.path for lp in plan.layers if lp.adapter is not None] == ["conv1", "conv2"]
    result = surgery.apply_file(CONV_SPEC, job["base"], str(tmp_path / "out.keras"))
    assert result.engine == "keras" and "LoRA" in result.fallback


@pytest.mark.slow
def test_lora_on_a_conv2d_stage_of_resnet50():
    import keras

    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    manifest = surgery.apply(model, "freeze all\nlora rank=4 conv5_*\n")
    loop = [layer.name for layer in model.layers
            if layer.name.startswith("conv5_") and isinstance(layer, keras.layers.Conv2D)]
    assert [e["path"] for e in manifest.layers if "lora" in e] == loop
    assert [layer.name for layer in model.layers if getattr(layer, "lora_enabled", False)] == loop
    assert trainable_paths(model) == sorted(f"{n}/{f}" for n in loop
                                            for f in ("lora_kernel_a", "lora_kernel_b"))
    assert manifest.data["totals"]["trainable_params"]["after"] == trainable_count(model)
    assert manifest.data["totals"]["params"] == model.count_params()


@pytest.mark.backends
def test_a_schedule_trains_the_factors_then_the_bias_then_nothing():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="fc")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    spec = ("freeze all\nlora rank=2 fc\nunfreeze head\n"
            "at epoch 1:\n  unfreeze fc\nat epoch 2:\n  freeze fc\n")
    x = np.random.default_rng(0).standard_normal((8, 6)).astype("float32")
    y = np.ones((8, 1), "float32")
    fc = model.get_layer("fc")
    seen = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:  # the factors exist once the schedule wrote phase 0
                seen.append({v.name: np.array(v.numpy()) for v in fc.weights})

        def on_epoch_end(self, epoch, logs=None):
            seen.append({v.name: np.array(v.numpy()) for v in fc.weights})

    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, epochs=3, batch_size=4, verbose=0,
              callbacks=[surgery.Schedule(spec, verbose=0), Snapshot()])
    moved = [sorted(n for n in after if not np.array_equal(before[n], after[n]))
             for before, after in zip(seen, seen[1:])]
    assert moved == [["lora_kernel_a", "lora_kernel_b"],
                     ["bias", "lora_kernel_a", "lora_kernel_b"], []]
