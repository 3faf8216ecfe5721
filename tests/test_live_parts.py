"""Freezing entries of a weight (surgery/parts.py, surgery/engines/constraint.py), on real models.

What is frozen is checked against Keras's own computation: perturbing the frozen entries of a
layer must move exactly the frozen output channels, and perturbing the rest exactly the others.
What "frozen" means is checked bit for bit after training: through fit with each optimizer
family (momentum, Adam, decoupled weight decay, RMSprop, and loss scaling, accumulation,
clipping, XLA), a GradientTape loop, save and load in a fresh process (.keras and .h5), and
MirroredStrategy on two logical CPUs (a fresh process too: logical devices must be configured
before TensorFlow initializes its own). Keras's EMA, which bypasses constraints, is pinned down
with the `restore` that undoes it.

The tests marked `backends` run again under JAX (`make test`), with hand-written loops and a
custom train_step in each backend's own idiom, and DataParallel on two host devices.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from surgery import parts
from surgery.parts import PartError

ROOT = Path(__file__).resolve().parent.parent


# --- registration: `import surgery` stays light, `import keras` registers -----------------------


def test_installing_the_hook_loads_no_tensorflow_then_importing_keras_registers():
    # Through tf.keras here: TensorFlow imports Keras lazily, through the import system, like
    # any `import keras` (which the save/load and MirroredStrategy tests below go through).
    code = """
        import sys
        import surgery, surgery.parts, surgery._register
        surgery._register.install()
        heavy = sorted(m for m in ("tensorflow", "keras", "wrapt") if m in sys.modules)
        assert not heavy, heavy
        import tensorflow as tf
        tf.keras.layers.Dense  # the hook fires when this imports keras
        import keras
        from surgery.engines.constraint import FrozenEntries
        assert keras.saving.get_registered_object("surgery>FrozenEntries") is FrozenEntries
        assert not [f for f in sys.meta_path if type(f).__module__ == "surgery._register"]
        assert "exec_module" not in vars(keras.__spec__.loader)  # the loader is itself again
        print("OK")
    """
    assert _python(code).strip().endswith("OK")


def test_install_runs_the_hook_at_once_when_keras_is_already_imported(monkeypatch):
    import keras  # noqa: F401

    import surgery._register as register

    calls = []
    monkeypatch.setattr(register, "_installed", False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(register, "_on_keras", lambda module: calls.append(module.__name__))
    register.install()
    register.install()  # idempotent
    assert calls == ["keras"]
    assert not [f for f in sys.meta_path if type(f).__module__ == "surgery._register"]


def test_import_surgery_alone_registers_for_load_model():
    if "_register" not in (ROOT / "surgery" / "__init__.py").read_text():
        pytest.skip("surgery/__init__.py does not call _register.install() yet")
    out = _python("""
        import surgery, keras
        print(keras.saving.get_registered_object("surgery>FrozenEntries"))
    """)
    assert "FrozenEntries" in out


# --- pure resolution: no Keras ------------------------------------------------------------------

CONV = {"kernel": (3, 3, 3, 8), "bias": (8,)}


@pytest.mark.parametrize("cls, shapes, part, index, expected", [
    ("Conv2D", CONV, "filters", slice(0, 2), [("kernel", (3,), (0, 1)), ("bias", (0,), (0, 1))]),
    ("Conv1D", {"kernel": (3, 4, 6)}, "filters", -1, [("kernel", (2,), (5,))]),
    ("Conv3D", {"kernel": (2, 2, 2, 3, 4), "bias": (4,)}, "kernel", [3, 1],
     [("kernel", (4,), (1, 3))]),
    ("Conv2DTranspose", {"kernel": (3, 3, 5, 4), "bias": (5,)}, "filters", slice(3, None),
     [("kernel", (2,), (3, 4)), ("bias", (0,), (3, 4))]),
    ("Conv3DTranspose", {"kernel": (2, 2, 2, 5, 4)}, "filters", 0, [("kernel", (3,), (0,))]),
    ("DepthwiseConv2D", {"kernel": (3, 3, 3, 2), "bias": (6,)}, "filters", slice(None, None, 4),
     [("kernel", (2, 3), (0, 4)), ("bias", (0,), (0, 4))]),
    ("SeparableConv2D", {"depthwise_kernel": (3, 3, 3, 2), "pointwise_kernel": (1, 1, 6, 5),
                         "bias": (5,)}, "filters", 4,
     [("pointwise_kernel", (3,), (4,)), ("bias", (0,), (4,))]),
    ("SeparableConv2D", {"depthwise_kernel": (3, 3, 3, 2), "pointwise_kernel": (1, 1, 6, 5)},
     "depthwise_kernel", None, [("depthwise_kernel", (2, 3), tuple(range(6)))]),
    ("Dense", {"kernel": (5, 3), "bias": (3,)}, "units", slice(-1, None),
     [("kernel", (1,), (2,)), ("bias", (0,), (2,))]),
    ("BatchNormalization", {"gamma": (4,), "beta": (4,), "moving_mean": (4,),
                            "moving_variance": (4,)}, "gamma", slice(1, 3),
     [("gamma", (0,), (1, 2))]),
    # A subclass resolves as its first known base.
    (("MyConv", "Conv2D", "BaseConv", "Layer"), CONV, "filters", 7,
     [("kernel", (3,), (7,)), ("bias", (0,), (7,))]),
])
def test_select_names_the_output_axis_of_each_layer_class(cls, shapes, part, index, expected):
    got = parts.select("l", cls, shapes, part, index)
    assert [(s.weight, s.axes, s.indices) for s in got] == expected


def test_select_einsum_dense_finds_the_one_output_letter():
    cfg = {"equation": "abc,dc->abd", "bias_axes": "bd"}
    got = parts.select("e", "EinsumDense", {"kernel": (6, 5), "bias": (3, 6)}, "units", [1, 4],
                       config=cfg)
    assert [(s.weight, s.axes, s.indices) for s in got] == [("kernel", (0,), (1, 4)),
                                                            ("bias", (1,), (1, 4))]


@pytest.mark.parametrize("args, message", [
    (("head", "Dense", {"kernel": (5, 3)}, "bias"),
     "layer 'head' (Dense) has no part 'bias': its weights are kernel (5, 3); "
     "its parts: units (kernel axis 1), kernel"),
    (("conv", "Conv2D", CONV, "units", 0),
     "layer 'conv' (Conv2D) has no part 'units': its weights are kernel (3, 3, 3, 8), bias (8,); "
     "its parts: filters (kernel axis 3, bias axis 0), kernel, bias"),
    (("pool", "MaxPooling2D", {}, "filters"),
     "layer 'pool' (MaxPooling2D) has no part 'filters': its weights are none; "
     "its parts: none that surgery can freeze entry by entry"),
    (("conv", "Conv2D", CONV, "filters", slice(0, 100)),
     "layer 'conv' (Conv2D): filters[0:100] is out of range: kernel (3, 3, 3, 8) has 8 filters "
     "on axis 3"),
    (("conv", "Conv2D", CONV, "filters", 8),
     "layer 'conv' (Conv2D): filters[8] is out of range: kernel (3, 3, 3, 8) has 8 filters on "
     "axis 3"),
    (("conv", "Conv2D", CONV, "bias", slice(4, 4)),
     "layer 'conv' (Conv2D): bias[4:4] is empty: bias (8,) has 8 entries on axis 0"),
    (("up", "Conv2DTranspose", {"kernel": (3, 3, 5, 4)}, "filters", [0, 5]),
     "layer 'up' (Conv2DTranspose): filters[0, 5] is out of range: kernel (3, 3, 5, 4) has 5 "
     "filters on axis 2"),
    (("dw", "DepthwiseConv2D", {"kernel": (3, 3, 3, 2)}, "filters", slice(0, 7)),
     "layer 'dw' (DepthwiseConv2D): filters[0:7] is out of range: kernel (3, 3, 3, 2) has 6 "
     "filters on axes 2-3 (channels x depth multiplier)"),
    (("attn", "EinsumDense", {"kernel": (16, 4, 8)}, "units", slice(0, 2),
      {"equation": "abc,cde->abde"}),
     "layer 'attn' (EinsumDense) has no single output axis for units[0:2]: its equation "
     "'abc,cde->abde' gives the kernel output axes 1 ('d') and 2 ('e'); kernel shape (16, 4, 8)"),
    (("proj", "EinsumDense", {"kernel": (16, 4), "bias": (3, 1)}, "units", 0,
      {"equation": "abc,cd->abd", "bias_axes": "b"}),
     "layer 'proj' (EinsumDense) has no single output axis for units[0]: its bias (bias_axes "
     "'b') is shared across units; bias shape (3, 1)"),
])
def test_part_errors_name_the_layer_its_shape_and_the_axis(args, message):
    layer, cls, shapes, part, *rest = args
    index = rest[0] if rest else None
    config = rest[1] if len(rest) > 1 else None
    with pytest.raises(PartError) as info:
        parts.select(layer, cls, shapes, part, index, config=config)
    assert str(info.value) == message


def test_whole_einsum_kernel_needs_no_output_axis():
    (sel,) = parts.select("attn", "EinsumDense", {"kernel": (16, 4, 8)}, "kernel",
                          config={"equation": "abc,cde->abde"})
    assert sel.whole and sel.entries == 16 * 4 * 8


@given(size=st.integers(1, 40), start=st.none() | st.integers(-40, 40),
       stop=st.none() | st.integers(-40, 40), step=st.none() | st.integers(-5, 5).filter(bool))
def test_indices_are_python_slicing_except_out_of_range_and_empty(size, start, stop, step):
    s = slice(start, stop, step)
    in_range = all(b is None or -size <= b <= size for b in (start, stop))
    python = sorted(range(size)[s])
    if in_range and python:
        assert parts.indices(s, size) == tuple(python)
    else:
        with pytest.raises(IndexError):
            parts.indices(s, size)


# --- the constraint on live layers --------------------------------------------------------------


@pytest.fixture
def keras():
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return keras


def _layer_cases():
    import keras

    L = keras.layers
    return {
        "Conv1D": (lambda: L.Conv1D(5, 3), (2, 9, 4)),
        "Conv2D groups": (lambda: L.Conv2D(6, 3, groups=2), (2, 7, 7, 4)),
        "Conv3D": (lambda: L.Conv3D(5, 2), (2, 4, 4, 4, 3)),
        "Conv1DTranspose": (lambda: L.Conv1DTranspose(5, 3), (2, 6, 4)),
        "Conv2DTranspose": (lambda: L.Conv2DTranspose(5, 3, strides=2), (2, 5, 5, 4)),
        "Conv3DTranspose": (lambda: L.Conv3DTranspose(5, 2), (2, 3, 3, 3, 2)),
        "DepthwiseConv1D": (lambda: L.DepthwiseConv1D(3, depth_multiplier=3), (2, 8, 2)),
        "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 6, 6, 3)),
        "SeparableConv1D": (lambda: L.SeparableConv1D(5, 3, depth_multiplier=2), (2, 8, 3)),
        "SeparableConv2D": (lambda: L.SeparableConv2D(5, 3, depth_multiplier=2), (2, 6, 6, 3)),
        "Dense": (lambda: L.Dense(5), (2, 4)),
        "Dense 3-D input": (lambda: L.Dense(5), (2, 3, 4)),
        "EinsumDense": (lambda: L.EinsumDense("ab,bc->ac", output_shape=5, bias_axes="c"),
                        (2, 4)),
        "EinsumDense kernel dc": (lambda: L.EinsumDense("abc,dc->abd", output_shape=(3, 5),
                                                        bias_axes="d"), (2, 3, 4)),
        "EinsumDense bias bd": (lambda: L.EinsumDense("abc,cd->abd", output_shape=(3, 5),
                                                      bias_axes="bd"), (2, 3, 4)),
    }


LAYER_CASES = ["Conv1D", "Conv2D groups", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
               "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
               "SeparableConv2D", "Dense", "Dense 3-D input", "EinsumDense",
               "EinsumDense kernel dc", "EinsumDense bias bd"]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_freezing_channels_freezes_exactly_what_produces_them(keras, case):
    """Keras computes the outputs: perturbing the frozen entries moves exactly the frozen output
    channels, perturbing the other entries of the same weights exactly the other channels."""
    from surgery.engines.constraint import freeze

    make, shape = _layer_cases()[case]
    layer = make()
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    y0 = keras.ops.convert_to_numpy(layer(x))
    channels = y0.shape[-1]
    chosen = freeze(layer, "units" if "Dense" in case else "filters", slice(1, None, 3))
    frozen_channels = set(range(1, channels, 3))
    carriers = {"SeparableConv1D": {"pointwise_kernel", "bias"},
                "SeparableConv2D": {"pointwise_kernel", "bias"}}.get(case, {"kernel", "bias"})
    assert {s.weight for s in chosen} == carriers
    variables = {v.name: v for v in layer.weights}
    assert {n for n, v in variables.items() if v.constraint is not None} == carriers

    rng = np.random.default_rng(2)
    for sel in chosen:
        var = variables[sel.weight]
        mask = _frozen_mask(keras, var)
        assert mask.sum() == sel.entries
        delta = rng.uniform(0.5, 1.0, var.shape).astype("float32")
        assert _moved_channels(keras, layer, x, var, delta * mask) == frozen_channels, sel.weight
        assert _moved_channels(keras, layer, x, var, delta * ~mask) == (
            set(range(channels)) - frozen_channels), sel.weight


def _frozen_mask(keras, var):
    """Which entries the variable's constraint puts back: move every entry, see what returns."""
    value = keras.ops.convert_to_numpy(var)
    moved = value + 1.0
    restored = keras.ops.convert_to_numpy(var.constraint(keras.ops.convert_to_tensor(moved)))
    mask = restored == value
    assert np.array_equal(restored[~mask], moved[~mask])  # the others pass through untouched
    return mask


def _moved_channels(keras, layer, x, var, delta):
    before = keras.ops.convert_to_numpy(var)
    y0 = keras.ops.convert_to_numpy(layer(x))
    var.assign(before + delta)
    y1 = keras.ops.convert_to_numpy(layer(x))
    var.assign(before)
    moved = np.abs(y1 - y0).reshape(-1, y0.shape[-1]).max(axis=0) > 0
    return set(np.flatnonzero(moved).tolist())


def test_depthwise_channel_k_is_input_k_div_multiplier(keras):
    from surgery.engines.constraint import freeze

    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    layer.build((None, 6, 6, 3))
    freeze(layer, "filters", [1, 4])  # = (input 0, m 1) and (input 2, m 0)
    mask = _frozen_mask(keras, layer.kernel)
    assert np.array_equal(mask.any(axis=(0, 1)), [[False, True], [False, False], [True, False]])


def test_live_layer_errors(keras):
    from surgery.engines.constraint import freeze

    head = keras.layers.Dense(3, use_bias=False, name="head")
    with pytest.raises(PartError) as info:
        freeze(head, "units", 0)
    assert str(info.value) == ("layer 'head' (Dense) is not built: it has no weights yet "
                               "(call the model on data or build it first)")
    head.build((None, 5))
    with pytest.raises(PartError) as info:
        freeze(head, "bias")
    assert str(info.value) == ("layer 'head' (Dense) has no part 'bias': its weights are "
                               "kernel (5, 3); its parts: units (kernel axis 1), kernel")
    with pytest.raises(PartError) as info:
        freeze(head, "units", slice(2, 4))
    assert str(info.value) == ("layer 'head' (Dense): units[2:4] is out of range: kernel (5, 3) "
                               "has 3 units on axis 1")
    assert head.kernel.constraint is None and head.kernel_constraint is None  # nothing changed


def test_freeze_adds_unfreeze_removes_and_the_layers_own_constraint_comes_back(keras):
    from surgery.engines.constraint import FrozenEntries, freeze, frozen_weights, unfreeze

    norm = keras.constraints.MaxNorm(2.0, axis=0)
    layer = keras.layers.Dense(8, kernel_constraint=norm, name="d")
    layer.build((None, 4))
    freeze(layer, "units", slice(0, 4))
    freeze(layer, "units", 6)
    unfreeze(layer, "units", slice(1, 3))
    (kernel, bias) = frozen_weights(layer)
    assert kernel.indices == bias.indices == (0, 3, 6)
    assert kernel.inner == "MaxNorm" and bias.inner is None
    assert kernel.on_variable and kernel.in_config
    assert isinstance(layer.kernel_constraint, FrozenEntries)
    assert layer.kernel.constraint is layer.kernel_constraint
    unfreeze(layer, "units")
    assert frozen_weights(layer) == ()
    assert layer.kernel_constraint is norm and layer.kernel.constraint is norm
    assert layer.bias_constraint is None and layer.bias.constraint is None


def test_in_sync_tells_when_the_variable_was_written_since(keras):
    from surgery.engines.constraint import freeze, frozen_weights

    layer = keras.layers.Dense(4, name="d")
    layer.build((None, 3))
    freeze(layer, "units", [1, 2])
    assert [f.in_sync for f in frozen_weights(layer)] == [True, True]
    layer.kernel.assign(np.zeros((3, 4), "float32"))  # as load_weights would
    assert [f.in_sync for f in frozen_weights(layer)] == [False, True]
    freeze(layer, "units", [1])  # freezing again keeps the values there now
    assert [f.in_sync for f in frozen_weights(layer)] == [True, True]
    assert not layer.kernel_constraint.values.any()


def test_a_damaged_config_is_refused(keras):
    import base64
    import zlib

    from surgery.engines.constraint import FrozenEntries

    good = FrozenEntries((2, 4), (1,), [0], np.ones((2, 1), "float32")).get_config()
    bomb = dict(good, values=base64.b64encode(zlib.compress(bytes(10**7))).decode())
    with pytest.raises(ValueError, match="do not fill shape"):
        FrozenEntries.from_config(bomb)
    with pytest.raises(ValueError, match="dtype 'object'"):
        FrozenEntries.from_config(dict(good, dtype="object"))
    with pytest.raises(ValueError, match=r"distinct, in \[0, 4\)"):
        FrozenEntries.from_config(dict(good, indices=[[4, 5]]))


def test_config_round_trip_is_exact_and_compact(keras):
    from surgery.engines.constraint import FrozenEntries

    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 3, 16, 5)).astype("float32")
    c = FrozenEntries((3, 3, 16, 12), (3,), [0, 1, 2, 3, 4], values,
                      keras.constraints.MaxNorm(1.0, axis=[0, 1, 2]))
    config = keras.constraints.serialize(c)
    assert config["registered_name"] == "surgery>FrozenEntries"
    assert config["config"]["indices"] == [[0, 5]]
    back = keras.constraints.deserialize(json.loads(json.dumps(config)))
    assert np.array_equal(back.values, values) and back.values.dtype == values.dtype
    assert back.indices == c.indices and isinstance(back.inner, keras.constraints.MaxNorm)
    assert back.inner.get_config() == c.inner.get_config()
    # Stored bytes: the frozen entries only, plus base64's third (zlib finds little in floats).
    assert len(config["config"]["values"]) <= values.nbytes * 4 / 3 + 8


# --- training paths ------------------------------------------------------------------------------


def _model(keras):
    """Small, with every restore path: a slice of filters (with bias), depthwise channels
    (input x multiplier), a whole bias, and many alternating units (the select path)."""
    from surgery.engines.constraint import freeze

    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name="conv",
                 kernel_constraint=keras.constraints.MaxNorm(1.0, axis=[0, 1, 2]))(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(40, activation="relu", name="mid")(x)
    outputs = L.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    freeze(model.get_layer("conv"), "filters", slice(0, 4))
    freeze(model.get_layer("dw"), "filters", [1, 4, 9, 15])
    freeze(model.get_layer("mid"), "units", slice(None, None, 2))  # 40 runs: select
    freeze(model.get_layer("head"), "bias")
    return model


def _data(n=24):
    rng = np.random.default_rng(3)
    return (rng.standard_normal((n, 8, 8, 3)).astype("float32"),
            rng.standard_normal((n, 3)).astype("float32"))


def _snapshot(model):
    """Every weight's value, and which positions of it are frozen, keyed by variable path."""
    from surgery.engines.constraint import frozen_weights

    frozen = {f"{f.path}/{f.weight}": f for f in frozen_weights(model)}
    assert len(frozen) == 7  # conv kernel+bias, dw kernel+bias, mid kernel+bias, head bias
    return {v.path: (np.array(v.numpy()), frozen.get(v.path)) for v in model.trainable_weights}


def _assert_frozen_exact_and_rest_learned(model, snapshot):
    for v in model.trainable_weights:
        before, f = snapshot[v.path]
        after = np.array(v.numpy())
        if f is None:
            assert not np.array_equal(after, before), f"{v.path} did not train"
            continue
        a0, a1 = f.axes[0], f.axes[-1]
        flat = f.shape[:a0] + (-1,) + f.shape[a1 + 1:]
        b, a = before.reshape(flat), after.reshape(flat)
        idx = np.asarray(f.indices)
        rest = np.setdiff1d(np.arange(b.shape[a0]), idx)
        assert np.array_equal(np.take(a, idx, a0), np.take(b, idx, a0)), f"{v.path} frozen moved"
        if not len(rest):
            continue
        # Every trainable channel moved somewhere: the rest of the weight still learns.
        moved = np.moveaxis(np.take(a, rest, a0) != np.take(b, rest, a0), a0, 0)
        assert moved.reshape(len(rest), -1).any(axis=1).all(), f"{v.path} stopped learning"


OPTIMIZERS = {
    "SGD nesterov momentum": lambda k: k.optimizers.SGD(0.05, momentum=0.9, nesterov=True,
                                                         weight_decay=0.01),
    "Adam": lambda k: k.optimizers.Adam(0.01),
    "AdamW": lambda k: k.optimizers.AdamW(0.01, weight_decay=0.5),
    "RMSprop momentum": lambda k: k.optimizers.RMSprop(0.01, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.backends
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_keeps_frozen_entries_bit_exact(keras, name):
    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(OPTIMIZERS[name](keras), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _assert_frozen_exact_and_rest_learned(model, snapshot)


@pytest.mark.backends
def test_fit_under_xla_keeps_frozen_entries_bit_exact(keras):
    # jit_compile="auto" means XLA wherever TensorFlow sees a GPU: the same restore, compiled.
    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.5), "mse", jit_compile=True)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _assert_frozen_exact_and_rest_learned(model, snapshot)


@pytest.mark.backends
def test_ema_overwrites_at_the_end_of_fit_and_restore_puts_frozen_entries_back(keras):
    # Keras averages the values from before constraints run and writes the averages into the
    # model when fit ends, bypassing constraints: restore() from on_train_end undoes that.
    from surgery.engines.constraint import restore

    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(AssertionError, match="frozen moved"):
        _assert_frozen_exact_and_rest_learned(model, snapshot)
    assert restore(model) == 7
    _assert_frozen_exact_and_rest_learned(model, snapshot)

    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5), "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_end=lambda logs: restore(model))])
    _assert_frozen_exact_and_rest_learned(model, snapshot)


MORE_OPTIMIZERS = {
    # Loss scaling (mixed precision), gradient accumulation, clipping, Lion: all end in the
    # optimizer's apply(), which runs the constraints.
    "LossScaleOptimizer(AdamW)": lambda k: k.optimizers.LossScaleOptimizer(
        k.optimizers.AdamW(0.01, weight_decay=0.5)),
    "AdamW gradient_accumulation_steps=2": lambda k: k.optimizers.AdamW(
        0.01, weight_decay=0.5, gradient_accumulation_steps=2),
    "SGD clipnorm": lambda k: k.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1),
    "Lion": lambda k: k.optimizers.Lion(0.001, weight_decay=0.3),
}


@pytest.mark.backends
@pytest.mark.parametrize("name", list(MORE_OPTIMIZERS))
def test_other_optimizer_paths(keras, name):
    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(MORE_OPTIMIZERS[name](keras), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _assert_frozen_exact_and_rest_learned(model, snapshot)


def _loop_step(keras, model, opt, traced):
    """One hand-written training step on this backend, as its Keras guide writes a custom loop:
    TensorFlow's GradientTape (eager, or in a tf.function); JAX's gradient of
    ``stateless_call`` with ``apply_gradients`` (eager), or the whole step stateless under
    ``jax.jit`` with the state written back after each step; PyTorch's ``backward`` (eager)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(xb, training=True) - yb) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        return tf.function(step) if traced else step
    if backend == "jax":
        import jax

        opt.build(model.trainable_variables)

        def loss_fn(trainable, non_trainable, xb, yb):
            out, non_trainable = model.stateless_call(trainable, non_trainable, xb,
                                                      training=True)
            return keras.ops.mean((out - yb) ** 2), non_trainable

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if not traced:
            def step(xb, yb):
                (_, non_trainable), grads = grad_fn(
                    [v.value for v in model.trainable_variables],
                    [v.value for v in model.non_trainable_variables], xb, yb)
                opt.apply_gradients(zip(grads, model.trainable_variables))

            return step

        @jax.jit
        def stateless(trainable, non_trainable, opt_vars, xb, yb):
            (_, non_trainable), grads = grad_fn(trainable, non_trainable, xb, yb)
            trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
            return trainable, non_trainable, opt_vars

        def step(xb, yb):
            state = stateless([v.value for v in model.trainable_variables],
                              [v.value for v in model.non_trainable_variables],
                              [v.value for v in opt.variables], xb, yb)
            for variables, values in zip((model.trainable_variables,
                                          model.non_trainable_variables, opt.variables), state):
                for v, value in zip(variables, values):
                    v.assign(value)

        return step
    if backend == "torch" and not traced:
        def step(xb, yb):
            model.zero_grad()
            loss = keras.ops.mean((model(xb, training=True) - keras.ops.convert_to_tensor(yb))
                                  ** 2)
            loss.backward()
            grads = [v.value.grad for v in model.trainable_variables]
            opt.apply_gradients(zip(grads, model.trainable_variables))

        return step
    pytest.skip(f"no traced hand-written loop on {backend}")


@pytest.mark.backends
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_a_hand_written_loop_with_apply_gradients(keras, traced):
    model = _model(keras)
    snapshot = _snapshot(model)
    opt = keras.optimizers.AdamW(0.01, weight_decay=0.5)
    x, y = _data()
    step = _loop_step(keras, model, opt, traced)
    for i in range(3):
        step(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
    _assert_frozen_exact_and_rest_learned(model, snapshot)


def _custom_train_step_model(keras, model):
    """``model`` wrapped in a Model subclass whose ``train_step`` is written by hand, as each
    backend's "customizing what happens in fit()" guide writes it; fit still runs the step."""
    backend = keras.backend.backend()

    class Custom(keras.Model):
        if backend == "jax":
            def train_step(self, state, data):
                import jax

                trainable, non_trainable, opt_vars, metrics_vars = state
                xb, yb = data

                def loss_fn(trainable, non_trainable):
                    out, non_trainable = self.stateless_call(trainable, non_trainable, xb,
                                                             training=True)
                    return keras.ops.mean((out - yb) ** 2), non_trainable

                (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    trainable, non_trainable)
                trainable, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, trainable)
                return {"loss": loss}, (trainable, non_trainable, opt_vars, metrics_vars)
        elif backend == "tensorflow":
            def train_step(self, data):
                import tensorflow as tf

                xb, yb = data
                with tf.GradientTape() as tape:
                    loss = keras.ops.mean((self(xb, training=True) - yb) ** 2)
                grads = tape.gradient(loss, self.trainable_variables)
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
                return {"loss": loss}
        else:
            def train_step(self, data):
                xb, yb = data
                self.zero_grad()
                loss = keras.ops.mean((self(xb, training=True) - yb) ** 2)
                loss.backward()
                grads = [v.value.grad for v in self.trainable_variables]
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
                return {"loss": loss}

    return Custom(model.inputs, model.outputs)


@pytest.mark.backends
def test_a_custom_train_step_in_fit(keras):
    model = _custom_train_step_model(keras, _model(keras))
    snapshot = _snapshot(model)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01))
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _assert_frozen_exact_and_rest_learned(model, snapshot)


@pytest.mark.backends
def test_the_layers_own_constraint_still_applies_to_the_trainable_part(keras):
    from surgery.engines.constraint import freeze

    inputs = keras.Input((6,))
    layer = keras.layers.Dense(4, kernel_constraint=keras.constraints.MaxNorm(0.3, axis=0),
                               name="d")
    model = keras.Model(inputs, layer(inputs))
    layer.kernel.assign(np.full((6, 4), 0.5, "float32"))  # every unit's norm ~1.22 > 0.3
    before = layer.kernel.numpy().copy()
    freeze(layer, "units", [0])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(np.ones((8, 6), "float32"), np.zeros((8, 4), "float32"), verbose=0)
    after = layer.kernel.numpy()
    assert np.array_equal(after[:, 0], before[:, 0])  # frozen: kept, norm and all
    norms = np.sqrt((after[:, 1:] ** 2).sum(axis=0))
    assert (norms <= 0.3 + 1e-6).all(), norms


# --- save and load in a fresh process; MirroredStrategy ------------------------------------------


@pytest.mark.only_backend("tensorflow")
@pytest.mark.slow
@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_saved_model_reloaded_in_a_fresh_process_keeps_frozen_entries(keras, tmp_path, ext):
    from surgery.engines.constraint import frozen_weights

    model = _model(keras)
    snapshot = _snapshot(model)
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.5), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _assert_frozen_exact_and_rest_learned(model, snapshot)
    path = tmp_path / f"m{ext}"
    model.save(path)
    np.savez(tmp_path / "original.npz", **{k: v[0] for k, v in snapshot.items()})
    np.savez(tmp_path / "saved.npz", **{v.path: v.numpy() for v in model.trainable_weights})
    np.savez(tmp_path / "data.npz", x=x, y=y)
    expected = [[f"{f.path}/{f.weight}", list(f.indices), f.inner] for f in frozen_weights(model)]
    assert ["conv/kernel", [0, 1, 2, 3], "MaxNorm"] in expected

    out = _python(f"""
        import json, numpy as np
        import surgery, surgery._register
        surgery._register.install()  # what `import surgery` does once wired in its __init__
        import keras, tensorflow as tf
        from surgery.engines.constraint import FrozenEntries, frozen_weights

        d = {str(tmp_path)!r}
        if "{ext}" == ".h5":  # legacy HDF5 cannot restore a compiled "mse" (a Keras limit)
            model = keras.models.load_model(d + "/m{ext}", compile=False)
            model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.5), "mse")
        else:
            model = keras.models.load_model(d + "/m{ext}")  # its AdamW state comes back too
        found = frozen_weights(model)
        assert all(f.on_variable and f.in_config for f in found), found
        print(json.dumps([[f"{{f.path}}/{{f.weight}}", list(f.indices), f.inner] for f in found]))
        original, saved, data = (np.load(d + n) for n in ("/original.npz", "/saved.npz",
                                                              "/data.npz"))
        frozen = {{f"{{f.path}}/{{f.weight}}": f for f in found}}

        def check(tag):
            for v in model.trainable_weights:
                now = v.numpy()
                f = frozen.get(v.path)
                if f is None:
                    assert not np.array_equal(now, saved[v.path]), (tag, v.path)
                    continue
                a0, a1 = f.axes[0], f.axes[-1]
                shape = f.shape[:a0] + (-1,) + f.shape[a1 + 1:]
                now, was, last = (a.reshape(shape) for a in (now, original[v.path], saved[v.path]))
                idx = np.asarray(f.indices)
                rest = np.setdiff1d(np.arange(now.shape[a0]), idx)
                assert np.array_equal(np.take(now, idx, a0), np.take(was, idx, a0)), (tag, v.path)
                if len(rest):
                    assert not np.array_equal(np.take(now, rest, a0), np.take(last, rest, a0)), (
                        tag, v.path)

        # more fit: AdamW with weight decay
        model.fit(data["x"], data["y"], batch_size=8, epochs=1, verbose=0)
        check("fit")
        # a custom loop with a new optimizer that has momentum
        opt = keras.optimizers.RMSprop(0.01, momentum=0.9, weight_decay=0.1)
        for i in range(3):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(data["x"][:8]) - data["y"][:8]) ** 2)
            g = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(g, model.trainable_variables))
        check("tape")
        # and a second generation: save, load, train
        model.save(d + "/again{ext}")
        model = keras.models.load_model(d + "/again{ext}", compile=False)
        frozen = {{f"{{f.path}}/{{f.weight}}": f for f in frozen_weights(model)}}
        assert len(frozen) == len(found)
        saved = {{v.path: v.numpy() for v in model.trainable_weights}}
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
                      "mse")
        model.fit(data["x"], data["y"], batch_size=8, epochs=1, verbose=0)
        check("second generation")
        print("OK")
    """)
    lines = out.strip().splitlines()
    assert lines[-1] == "OK"
    assert json.loads(lines[-2]) == expected


@pytest.mark.only_backend("tensorflow")
@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    out = _python(f"""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        two = [tf.config.LogicalDeviceConfiguration()] * 2
        tf.config.set_logical_device_configuration(cpu, two)
        import surgery, surgery._register
        surgery._register.install()
        import keras
        from surgery.engines.constraint import freeze, frozen_weights

        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((32, 8, 8, 3)).astype("float32")
        y = rng.standard_normal((32, 3)).astype("float32")
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2

        def check(model, original):
            for f in frozen_weights(model):
                var = {{v.path: v for v in model.weights}}[f"{{f.path}}/{{f.weight}}"]
                a0, a1 = f.axes[0], f.axes[-1]
                shape = f.shape[:a0] + (-1,) + f.shape[a1 + 1:]
                idx = np.asarray(f.indices)
                rest = np.setdiff1d(np.arange(np.prod([f.shape[a] for a in f.axes])), idx)
                replicas = var.value.values
                assert len(replicas) == 2
                for r in replicas:
                    now = r.numpy().reshape(shape)
                    was = original[var.path].reshape(shape)
                    assert np.array_equal(np.take(now, idx, a0), np.take(was, idx, a0)), var.path
                    if len(rest):
                        assert not np.array_equal(np.take(now, rest, a0), np.take(was, rest, a0))

        with strategy.scope():
            inputs = keras.Input((8, 8, 3))
            h = keras.layers.Conv2D(8, 3, name="conv")(inputs)
            h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            h = keras.layers.Dense(40, name="mid")(h)
            model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
            freeze(model.get_layer("conv"), "filters", slice(0, 4))
            freeze(model.get_layer("dw"), "filters", [1, 4, 9, 15])
            freeze(model.get_layer("mid"), "units", slice(None, None, 2))
            original = {{v.path: v.numpy() for v in model.weights}}
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True,
                                               weight_decay=0.1), "mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        check(model, original)

        model.save({str(tmp_path / "m.keras")!r})
        with strategy.scope():
            model = keras.models.load_model({str(tmp_path / "m.keras")!r})
            model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.5), "mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        check(model, original)
        print("OK")
    """)
    assert out.strip().endswith("OK")


@pytest.mark.backends
@pytest.mark.only_backend("jax")
def test_data_parallel_on_two_host_devices_keeps_frozen_entries_on_each(keras, tmp_path):
    """JAX's counterpart of the MirroredStrategy test: keras.distribution.DataParallel over two
    host CPU devices (conftest asks XLA for two when JAX starts), the batch split between them
    and the variables replicated; every replica's frozen entries stay bit-exact, through SGD
    with momentum, and AdamW after save and load under the distribution."""
    import jax

    devices = jax.devices("cpu")
    assert len(devices) == 2, os.environ.get("XLA_FLAGS")
    x, y = _data(32)

    def check(model, snapshot):
        _assert_frozen_exact_and_rest_learned(model, snapshot)
        for v in model.weights:
            copies = [np.array(shard.data) for shard in v.value.addressable_shards]
            assert len(copies) == 2, v.path
            assert all(np.array_equal(c, copies[0]) for c in copies), v.path

    with keras.distribution.DataParallel(devices=devices).scope():
        model = _model(keras)
        snapshot = _snapshot(model)
        model.compile(OPTIMIZERS["SGD nesterov momentum"](keras), "mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        check(model, snapshot)
        model.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
        loaded.compile(OPTIMIZERS["AdamW"](keras), "mse")
        loaded.fit(x, y, batch_size=16, epochs=2, verbose=0)
        check(loaded, snapshot)


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (fresh TensorFlow state); its stdout, or the failure."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout
