"""Shared helpers for the tests that build real Keras models (never mocks, never downloads)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Keras picks its backend once, when first imported, from KERAS_BACKEND: `make test` runs the
# suite on TensorFlow, then the tests marked `backends` again with KERAS_BACKEND=jax. Under JAX
# the host CPU shows as two devices, for keras.distribution.DataParallel; XLA reads the flag when
# JAX starts, so it is set here, before any test module imports Keras.
if os.environ.get("KERAS_BACKEND") == "jax" and \
        "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2").strip()

import numpy as np
import pytest


def pytest_runtest_setup(item):
    """``@pytest.mark.only_backend("tensorflow", ...)``: the test needs one of those Keras
    backends (tf.distribute, GradientTape; DataParallel on JAX) and is skipped on the others."""
    wanted = [name for mark in item.iter_markers("only_backend") for name in mark.args]
    if wanted:
        import keras

        if keras.backend.backend() not in wanted:
            pytest.skip(f"needs the {' or '.join(wanted)} backend, not "
                        f"{keras.backend.backend()} (KERAS_BACKEND)")


def trainable_paths(model):
    """The variables Keras will train, by path: what the optimizer actually sees."""
    return sorted(v.path for v in model.trainable_weights)


def layer_flags(model, prefix="", by_name=False):
    """Every layer's own flag, nested models included, keyed by path. Keras numbers InputLayer
    names per process (input_layer, input_layer_1, ...), so to compare two builds of one
    architecture they are keyed by position unless ``by_name``."""
    import keras

    flags = {}
    for i, layer in enumerate(model.layers):
        name = layer.name
        if not by_name and isinstance(layer, keras.layers.InputLayer):
            name = f"<input {i}>"
        path = f"{prefix}{name}"
        flags[path] = layer.trainable
        if isinstance(layer, keras.Model):
            flags.update(layer_flags(layer, path + "/", by_name))
    return flags


def weighted_flags(model):
    """Flags of the layers that own weights: the only flags with meaning for training (Keras
    does not keep an InputLayer's flag across save/load)."""
    import keras

    out = {}
    def walk(m, prefix):
        for layer in m.layers:
            path = f"{prefix}{layer.name}"
            if isinstance(layer, keras.Model):
                out[path] = layer.trainable
                walk(layer, path + "/")
            elif layer.weights:
                out[path] = layer.trainable
    walk(model, "")
    return out


def frozen_variable_paths(model):
    """Paths of every variable of a layer that is effectively frozen (its flag, or a container's
    above it, is False): none of them may move in training, BatchNorm statistics included."""
    import keras

    out = set()
    def walk(m, frozen_above):
        for layer in m.layers:
            frozen = frozen_above or not layer.trainable
            if isinstance(layer, keras.Model):
                walk(layer, frozen)
            elif frozen:
                out.update(v.path for v in layer.weights)
    walk(model, not model.trainable)
    return out


def train_one_step(model, batch=2, seed=0):
    """One SGD step on random data; returns {variable path: (before, after)} for every weight."""
    import keras

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + tuple(model.input_shape[1:])).astype("float32")
    y = rng.standard_normal((batch,) + tuple(model.output_shape[1:])).astype("float32")
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    model.train_on_batch(x, y)
    return {v.path: (before[v.path], np.array(v.numpy())) for v in model.weights}


@pytest.fixture
def keras_module():
    import keras

    keras.backend.clear_session()
    return keras


# --- keras_hub models and composite layers (tests/test_hub.py, tests/test_composite.py) ---------
# Real keras_hub backbones built from constructor arguments with tiny dimensions (no preset, no
# download), each built once per session (per xdist worker); tests that change flags call
# `reset_state` first, so that each starts from the state Keras builds.

HUB_ARGS = {
    "bert": ("BertBackbone", dict(vocabulary_size=500, num_layers=2, num_heads=2, hidden_dim=32,
                                  intermediate_dim=64, max_sequence_length=32)),
    "gpt2": ("GPT2Backbone", dict(vocabulary_size=500, num_layers=2, num_heads=2, hidden_dim=32,
                                  intermediate_dim=64, max_sequence_length=32)),
    "gemma": ("GemmaBackbone", dict(vocabulary_size=500, num_layers=2, num_query_heads=2,
                                    num_key_value_heads=1, hidden_dim=32, intermediate_dim=64,
                                    head_dim=16)),
    "vit": ("ViTBackbone", dict(image_shape=(32, 32, 3), patch_size=8, num_layers=2,
                                num_heads=2, hidden_dim=32, mlp_dim=64)),
}


def build_backbone(kind, **extra):
    """A fresh keras_hub backbone of ``kind`` (HUB_ARGS), named as its class is, so that paths do
    not depend on how many were built before in this process."""
    import keras_hub

    cls, args = HUB_ARGS[kind]
    name = {"bert": "bert_backbone", "gpt2": "gpt2_backbone", "gemma": "gemma_backbone",
            "vit": "vit_backbone"}[kind]
    return getattr(keras_hub.models, cls)(**args, name=name, **extra)


def build_bert_classifier():
    """keras_hub's BertTextClassifier around a tiny BertBackbone, without a preprocessor."""
    import keras_hub

    return keras_hub.models.BertTextClassifier(backbone=build_backbone("bert"), num_classes=2,
                                               preprocessor=None, name="bert_text_classifier")


def build_mha_model(keras):
    """A plain Keras Functional model around a MultiHeadAttention layer named 'mha'."""
    inputs = keras.Input((5, 8), name="x")
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(inputs, inputs)
    normed = keras.layers.LayerNormalization(name="norm")(attended + inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(normed), name="mha_model")


@pytest.fixture(scope="session")
def hub_models():
    """kind -> that backbone (and "bert_classifier"), built once per session on first use."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build_bert_classifier() if kind == "bert_classifier" else \
                build_backbone(kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def mha_model():
    import keras

    return build_mha_model(keras)


def reset_state(model):
    """Every layer and variable of ``model`` trainable, no entries frozen inside: the state Keras
    builds (keras's recursive setter turns on each layer's own variables)."""
    from surgery.engines.constraint import FrozenEntries, set_frozen

    model.trainable = True
    for layer in model._flatten_layers(include_self=False):
        for v in list(layer._trainable_variables):
            if isinstance(getattr(v, "constraint", None), FrozenEntries):
                set_frozen(layer, v.name, ())
    return model


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


PROBE = r'''
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import keras
import surgery
from surgery.engines import live

def training(tree):
    # What trains: the variable's flag on, and not every entry held by a FrozenEntries constraint.
    return sorted(f"{n.path}/{w.name}" for n in tree.layers() for w in n.weights
                  if tree.trains(n, w) and w.frozen_entries < w.size)

out = {}
for job in json.loads(sys.argv[1]):
    result = {}
    plain = keras.models.load_model(job["path"], compile=False)
    result["plain"] = training(live.describe(plain)[0])
    model = surgery.load_model(job["path"], compile=False)
    tree, objects = live.describe(model)
    result["surgery"] = training(tree)
    if job.get("train"):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        shape = lambda t: (4,) + tuple(d or 8 for d in t.shape[1:])  # noqa: E731
        x = {i.name: np.ones(shape(i), i.dtype) if "int" in str(i.dtype)
             else rng.standard_normal(shape(i)).astype("float32") for i in model.inputs}
        y = rng.standard_normal(shape(model.output)).astype("float32")
        named = [(f"{p}/{w.name}", v) for p, vs in objects.variables.items()
                 for w, v in zip(tree.get(p).weights, vs)]
        before = {n: np.array(v.numpy()) for n, v in named}
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)
        result["moved"] = sorted(n for n, v in named if not np.array_equal(before[n], v.numpy()))
    out[job["path"]] = result
print("PROBE " + json.dumps(out))
'''


def probe_in_fresh_process(jobs, tmp_path):
    """Load each saved model in a new Python process, with plain keras.models.load_model and
    with surgery.load_model: what trains after each (by surgery path), and, for jobs with
    ``train``, which variables a few SGD steps moved after surgery.load_model."""
    import json
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = subprocess.run([sys.executable, str(script), json.dumps(jobs)], capture_output=True,
                          text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):])
