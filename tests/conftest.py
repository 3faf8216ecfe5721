"""Shared helpers for the tests that build real Keras models (never mocks, never downloads)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


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
