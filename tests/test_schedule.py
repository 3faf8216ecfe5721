"""surgery.Schedule and the BatchNormalization policies on real Keras models, trained on CPU.

Small models and tiny random data built here (a few steps an epoch), shuffle=False and fixed
seeds. A recording callback placed after the Schedule sees each epoch as the Schedule left it:
which variables train, what the optimizer holds, and which values moved during the epoch.

The tests marked `backends` run on TensorFlow and again on JAX (`make test`); on JAX the
epoch-by-epoch and resume checks run a second time with the models replicated over two host
devices by keras.distribution.DataParallel (the `placement` fixture).
"""

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import surgery
from conftest import trainable_paths, weighted_flags

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4
BATCH = 4

# Phase 0 trains the head; phase 1 adds conv2 and bn2 (affine: gamma/beta only); phase 2 adds
# two of conv1's four filters and two of fc's five units, and lets bn2 update its statistics.
SPEC = """\
freeze all
unfreeze head
batchnorm affine
at epoch 1:
  unfreeze conv2, bn2
at epoch 2:
  unfreeze conv1.filters[1:3], fc.units[0:2]
  batchnorm train bn2
"""

HEAD = ["head/kernel", "head/bias"]
PHASE1 = ["conv2/kernel", "conv2/bias", "bn2/gamma", "bn2/beta"]
# What each epoch trains, in Keras's order (model.trainable_variables follows the layers).
TRAINABLE = {
    0: HEAD,
    1: PHASE1 + HEAD,
    2: ["conv1/kernel", "conv1/bias"] + PHASE1 + ["fc/kernel", "fc/bias"] + HEAD,
}
TRAINABLE[3] = TRAINABLE[2]
# What each epoch moves: the trainable variables, plus bn2's statistics once its policy is train.
MOVES = {e: set(TRAINABLE[e]) for e in range(EPOCHS)}
MOVES[2] |= {"bn2/moving_mean", "bn2/moving_variance"}
MOVES[3] = MOVES[2]
# Entries left frozen inside conv1 and fc from phase 2 on: (variable, axis, frozen positions).
FROZEN_ENTRIES = [("conv1/kernel", 3, [0, 3]), ("conv1/bias", 0, [0, 3]),
                  ("fc/kernel", 1, [2, 3, 4]), ("fc/bias", 0, [2, 3, 4])]


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


def data(x_shape=(8, 8, 3), y_dim=2, n=16, seed=0):
    rng = np.random.default_rng(seed)
    # Off-centre inputs, so that batch statistics differ from the moving ones (0 and 1).
    x = (rng.standard_normal((n,) + x_shape) * 2 + 0.5).astype("float32")
    y = rng.standard_normal((n, y_dim)).astype("float32")
    return x, y


def conv_model(keras, compile=True, **adam):
    """Conv -> BN -> tanh twice, pooled, then two Dense. tanh, not ReLU: every entry gets a
    gradient, so 'every trainable entry moves' holds and can be checked."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.Activation("tanh", name="act1")(h)
    h = keras.layers.Conv2D(6, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Activation("tanh", name="act2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    h = keras.layers.Dense(5, activation="tanh", name="fc")(h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="toy")
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01, **adam), loss="mse")
    return model


def classes(model):
    # Layers with weights: Keras numbers InputLayer names per process.
    return {layer.name: type(layer).__qualname__ for layer in model.layers if layer.weights}


def snapshot(variables):
    return {v.path: np.array(v.numpy()) for v in variables}


def slot_names(variables):
    """An optimizer variable's path without the optimizer's own name (Keras numbers optimizers
    per process: adam, adam_1, ...)."""
    return [v.path.split("/", 1)[1] for v in variables]


def adam_slots(model):
    """The optimizer variables Keras builds for ``model.trainable_variables``, in its order."""
    names = ["iteration", "learning_rate"]
    for v in model.trainable_variables:
        stem = v.path.replace("/", "_")
        names += [f"{stem}_momentum", f"{stem}_velocity"]
    return names


def optimizer_state(model):
    opt = model.optimizer
    return dict(zip(slot_names(opt.variables), (np.array(v.numpy()) for v in opt.variables)))


def recorder(keras):
    class _Recorder(keras.callbacks.Callback):
        """Placed after the Schedule: at each epoch's start it sees the phase in force."""

        def __init__(self):
            super().__init__()
            self.begin, self.end = {}, {}

        def _state(self):
            model = self.model
            opt = model.optimizer
            return {
                "weights": snapshot(model.weights),
                "trainable": [v.path for v in model.trainable_variables],
                "optimizer": optimizer_state(model) if opt.built else None,
                "slots": adam_slots(model),
                "classes": classes(model),
            }

        def on_epoch_begin(self, epoch, logs=None):
            self.begin[epoch] = self._state()

        def on_epoch_end(self, epoch, logs=None):
            self.end[epoch] = self._state()

    return _Recorder()


def fit(model, x, y, schedule, epochs=EPOCHS, initial_epoch=0, callbacks=()):
    with warnings.catch_warnings():
        # fit(epochs=k) that stops before a phase warns; those warnings are tested on their own.
        warnings.simplefilter("ignore", surgery.SurgeryWarning)
        return model.fit(x, y, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch,
                         shuffle=False, verbose=0, callbacks=[schedule, *callbacks])


def final_state(model):
    return {
        "flags": weighted_flags(model),
        "trainable": trainable_paths(model),
        "slots": slot_names(model.optimizer.variables),
        "weights": snapshot(model.weights),
        "optimizer": optimizer_state(model),
        "classes": classes(model),
    }


@pytest.fixture(scope="module", params=["one device", "DataParallel"])
def placement(request, keras):
    """Where a test's models live and train: a context to build, load and fit them in. The
    default device; or, on JAX, replicated over two host devices by DataParallel, each batch
    split between them (conftest asks XLA for two host devices when JAX starts)."""
    if request.param == "one device":
        return contextlib.nullcontext
    if keras.backend.backend() != "jax":
        pytest.skip("DataParallel over host devices is checked on JAX (TensorFlow: "
                    "test_under_a_distribution_strategy_new_slots_are_created_in_its_scope)")
    import jax

    devices = jax.devices("cpu")
    assert len(devices) == 2, os.environ.get("XLA_FLAGS")
    return keras.distribution.DataParallel(devices=devices).scope


def copies(variable):
    """The value of ``variable`` on every device that holds it (one, or each replica)."""
    value = variable.value
    shards = getattr(value, "addressable_shards", None)
    if shards is None:
        return [np.array(variable.numpy())]
    return [np.array(s.data) for s in shards]


@pytest.fixture(scope="module")
def uninterrupted(keras, placement):
    """One run of the 3-phase spec for EPOCHS epochs, recorded epoch by epoch."""
    with placement():
        x, y = data()
        model = conv_model(keras)
        initial = snapshot(model.weights)
        schedule = surgery.Schedule(SPEC, verbose=0)
        rec = recorder(keras)
        history = fit(model, x, y, schedule, callbacks=[rec])
    return {"model": model, "initial": initial, "schedule": schedule, "rec": rec,
            "history": history.history, "final": final_state(model),
            "copies": {v.path: copies(v) for v in model.weights}}


@pytest.mark.backends
def test_every_device_ends_with_the_same_values(placement, uninterrupted):
    """Under DataParallel each device holds a replica: the frozen entries and everything else
    must agree on all of them, not only on the copy numpy() reads."""
    replicas = 1 if placement is contextlib.nullcontext else 2
    for path, values in uninterrupted["copies"].items():
        assert len(values) == replicas, path
        assert all(np.array_equal(v, values[0]) for v in values[1:]), path
        assert np.array_equal(values[0], uninterrupted["final"]["weights"][path]), path


# --- a. exactly the scheduled variables change, epoch by epoch ------------------------------------


@pytest.mark.backends
@pytest.mark.parametrize("epoch", range(EPOCHS))
def test_each_epoch_moves_exactly_the_scheduled_variables(uninterrupted, epoch):
    rec = uninterrupted["rec"]
    begin, end = rec.begin[epoch]["weights"], rec.end[epoch]["weights"]
    assert rec.begin[epoch]["trainable"] == TRAINABLE[epoch]
    moved = {p for p in begin if not np.array_equal(begin[p], end[p])}
    assert moved == MOVES[epoch]
    # Everything else is bit for bit what the model started with, not only what the epoch began
    # with: nothing drifts between epochs either.
    initial = uninterrupted["initial"]
    for path in set(begin) - set().union(*(MOVES[e] for e in range(epoch + 1))):
        assert np.array_equal(end[path], initial[path]), path


@pytest.mark.backends
@pytest.mark.parametrize("epoch", [2, 3])
def test_a_phase_unfreezing_filters_and_units_moves_only_those_entries(uninterrupted, epoch):
    rec = uninterrupted["rec"]
    begin, end = rec.begin[epoch]["weights"], rec.end[epoch]["weights"]
    initial = uninterrupted["initial"]
    for path, axis, frozen in FROZEN_ENTRIES:
        free = [i for i in range(begin[path].shape[axis]) if i not in frozen]
        assert np.array_equal(np.take(end[path], frozen, axis),
                              np.take(initial[path], frozen, axis))
        # Every entry of the unfrozen filters/units moved (tanh and Adam: no zero gradient).
        assert np.all(np.take(end[path], free, axis) != np.take(begin[path], free, axis)), path


@pytest.mark.backends
def test_bn_classes_follow_the_policy_of_each_phase(uninterrupted):
    rec = uninterrupted["rec"]
    affine, plain = "AffineBatchNormalization", "BatchNormalization"
    assert [(rec.begin[e]["classes"]["bn1"], rec.begin[e]["classes"]["bn2"])
            for e in range(EPOCHS)] == [(plain, plain), (plain, affine)] + [(plain, plain)] * 2
    # (bn1 never trains: under the affine policy but frozen, it keeps the plain class.)


@pytest.mark.backends
def test_logs_and_history_record_the_phase_and_the_trainable_parameters(uninterrupted):
    history, rec = uninterrupted["history"], uninterrupted["rec"]
    assert history["surgery_phase"] == [0, 1, 2, 2]
    # The logged count is the number of trainable scalars that the epoch actually moved: whole
    # variables, less the entries frozen inside conv1 and fc.
    moved = []
    for e in range(EPOCHS):
        begin, end = rec.begin[e]["weights"], rec.end[e]["weights"]
        moved.append(int(sum(np.sum(begin[p] != end[p]) for p in TRAINABLE[e])))
    assert history["trainable_params"] == moved
    assert moved[0] < moved[1] < moved[2] == moved[3]


@pytest.mark.backends
def test_phase_changes_are_recorded_with_the_layers_and_counts(uninterrupted):
    changes = uninterrupted["schedule"].phase_changes
    history = uninterrupted["history"]
    assert [(c.epoch, c.phase, c.line) for c in changes] == [(0, 0, None), (1, 1, 4), (2, 2, 6)]
    assert [(c.unfrozen, c.frozen, c.changed) for c in changes] == [
        ((), ("conv1", "bn1", "conv2", "bn2", "fc"), ()),
        (("conv2", "bn2"), (), ()),
        (("conv1", "fc"), (), ("bn2",)),
    ]
    counts = [(c.trainable_params_before, c.trainable_params_after) for c in changes]
    total = sum(int(np.prod(v.shape)) for v in uninterrupted["model"].weights
                if "moving" not in v.path)
    t = history["trainable_params"]
    assert counts == [(total, t[0]), (t[0], t[1]), (t[1], t[2])]
    assert changes[2].describe() == (
        f"surgery: epoch 2: 'at epoch 2:' (line 6): 2 unfrozen (conv1, fc); 1 changed (bn2); "
        f"trainable params {t[1]:,} -> {t[2]:,}")


# --- b. optimizer state across phase changes ----------------------------------------------------


@pytest.mark.backends
@pytest.mark.parametrize("epoch", [1, 2])
def test_state_of_variables_already_training_is_kept_and_new_ones_start_fresh(uninterrupted,
                                                                              epoch):
    rec = uninterrupted["rec"]
    before = rec.end[epoch - 1]["optimizer"]  # right before the change
    after = rec.begin[epoch]["optimizer"]  # right after it
    steps = 16 // BATCH
    assert after["iteration"] == before["iteration"] == steps * epoch
    kept = {f"{p.replace('/', '_')}_{s}" for p in TRAINABLE[epoch - 1]
            for s in ("momentum", "velocity")}
    for name in kept:
        assert np.array_equal(after[name], before[name]), name
        assert np.any(after[name] != 0), name  # real state, not a fresh slot that happens to match
    new = set(after) - kept - {"iteration", "learning_rate"}
    assert new == {f"{p.replace('/', '_')}_{s}" for p in TRAINABLE[epoch]
                   if p not in TRAINABLE[epoch - 1] for s in ("momentum", "velocity")}
    for name in new:
        assert not np.any(after[name]), name


@pytest.mark.backends
@pytest.mark.parametrize("epoch", range(1, EPOCHS))
def test_optimizer_variables_are_exactly_the_slots_of_the_trainable_variables(uninterrupted,
                                                                             epoch):
    rec = uninterrupted["rec"]
    for state in (rec.begin[epoch], rec.end[epoch]):
        assert list(state["optimizer"]) == state["slots"]
    assert uninterrupted["final"]["slots"] == adam_slots(uninterrupted["model"])


@pytest.mark.backends
def test_a_phase_that_freezes_drops_the_state_and_ema_starts_from_the_variable(keras):
    """use_ema: a variable that starts training mid-run gets an average equal to its value (as
    Keras starts every average at step 0), or fit's end would write a shrunken average into it.
    The head, frozen at epoch 1, leaves the optimizer."""
    x, y = data()
    model = conv_model(keras, use_ema=True, ema_momentum=0.9)
    rec = recorder(keras)
    spec = ("freeze all\nbatchnorm frozen\nunfreeze head\n"
            "at epoch 1:\n  freeze head\n  unfreeze fc\n")
    fit(model, x, y, surgery.Schedule(spec, verbose=0), epochs=2, callbacks=[rec])
    opt = rec.begin[1]["optimizer"]
    weights = rec.begin[1]["weights"]
    assert rec.begin[1]["trainable"] == ["fc/kernel", "fc/bias"]
    assert not any(name.startswith("head_") for name in opt)
    assert [n for n in opt if n.endswith("_average")] == ["fc_kernel_average", "fc_bias_average"]
    for path in ("fc/kernel", "fc/bias"):
        assert np.array_equal(opt[f"{path.replace('/', '_')}_average"], weights[path])
    # fit ends by writing the averages into the model: close to where training left fc.
    last = rec.end[1]["weights"]["fc/kernel"]
    final = model.get_layer("fc").kernel.numpy()
    assert not np.array_equal(final, last)  # the averages were written
    assert np.linalg.norm(final - last) < 0.2 * np.linalg.norm(last)


@pytest.mark.only_backend("tensorflow")
def test_under_a_distribution_strategy_new_slots_are_created_in_its_scope(keras):
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = conv_model(keras)
    x, y = data()
    rec = recorder(keras)
    fit(model, x, y, surgery.Schedule("freeze all\nunfreeze head\nat epoch 1:\n  unfreeze fc\n",
                                      verbose=0), epochs=2, callbacks=[rec])
    assert rec.begin[1]["trainable"] == ["fc/kernel", "fc/bias"] + HEAD
    assert list(rec.end[1]["optimizer"]) == adam_slots(model)
    moved = {p for p, v in rec.end[1]["weights"].items()
             if not np.array_equal(v, rec.begin[1]["weights"][p])}
    assert moved == {"fc/kernel", "fc/bias"} | set(HEAD)


# --- c. interrupted and resumed -------------------------------------------------------------------


@pytest.mark.backends
@pytest.mark.parametrize("k", [2, 3], ids=["saved-before-a-phase-change", "saved-after-the-last"])
def test_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(keras, placement,
                                                                         uninterrupted, tmp_path,
                                                                         k):
    x, y = data()
    with placement():
        first = conv_model(keras)
        fit(first, x, y, surgery.Schedule(SPEC, verbose=0), epochs=k)
        first.save(tmp_path / "checkpoint.keras")  # compiled: the optimizer state is saved too
        resumed = keras.models.load_model(tmp_path / "checkpoint.keras")
        assert slot_names(resumed.optimizer.variables) == slot_names(first.optimizer.variables)
        schedule = surgery.Schedule(SPEC, verbose=0)
        history = fit(resumed, x, y, schedule, initial_epoch=k)

    want, got = uninterrupted["final"], final_state(resumed)
    assert got["flags"] == want["flags"]
    assert got["trainable"] == want["trainable"]
    assert got["slots"] == want["slots"]
    assert got["classes"] == want["classes"]
    # Bit for bit: on CPU, with shuffle=False and no dropout, every step runs the same ops on the
    # same batches from the same values (the checkpoint holds the weights, the frozen entries'
    # constraints and Adam's state, iteration count included), so nothing may differ.
    for path, value in want["weights"].items():
        assert np.array_equal(got["weights"][path], value), path
    for name, value in want["optimizer"].items():
        assert np.array_equal(got["optimizer"][name], value), name
    assert history.history["surgery_phase"] == uninterrupted["history"]["surgery_phase"][k:]
    assert history.history["trainable_params"] == uninterrupted["history"]["trainable_params"][k:]
    # The resumed run enters the phase of epoch k: a checkpoint saved in that phase already has
    # its state, so nothing is reported as changed.
    (entered,) = schedule.phase_changes
    assert (entered.epoch, entered.phase) == (k, 2)
    if k == 3:
        assert (entered.unfrozen, entered.frozen, entered.changed) == ((), (), ())
        assert entered.trainable_params_before == entered.trainable_params_after
    else:
        assert (entered.unfrozen, entered.frozen, entered.changed) == (("conv1", "fc"), (),
                                                                        ("bn2",))


@pytest.mark.backends
@pytest.mark.parametrize("k", [1, 3])
def test_resumed_from_the_initial_model_replays_every_phase_up_to_k(keras, placement,
                                                                     uninterrupted, k):
    x, y = data()
    with placement():
        model = conv_model(keras)
        schedule = surgery.Schedule(SPEC, verbose=0)
        fit(model, x, y, schedule, initial_epoch=k)
    want, got = uninterrupted["final"], final_state(model)
    for key in ("flags", "trainable", "slots", "classes"):
        assert got[key] == want[key], key
    # One write, of the phase in force at k, then the phases still to come.
    assert [c.epoch for c in schedule.phase_changes] == [k] + [e for e in (2,) if e > k]


# --- d. the BatchNormalization policies -----------------------------------------------------------


BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
POLICIES = {
    # mode: (class, trainable flag, what training moves, training output == inference output)
    "frozen": ("BatchNormalization", False, set(), True),
    "train": ("BatchNormalization", True, set(BN_WEIGHTS), False),
    "affine": ("AffineBatchNormalization", True, {"gamma", "beta"}, True),
}


def bn_model(keras):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, name="fc")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="bn_toy")


def bn_behaviour(keras, model):
    """Train a few steps; return (class, flag, the bn weights that moved, whether the layer's
    training-mode output equals its inference output)."""
    x, y = data((6,), 1, n=24, seed=3)
    bn = model.get_layer("bn")
    before = {w.name: np.array(w.numpy()) for w in bn.weights}
    # 0.01, not 0.1: from the weights JAX's initializers draw for this seed, two fits at 0.1
    # diverge to NaN (and NaN never equals itself), on any class.
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    moved = {w.name for w in bn.weights if not np.array_equal(w.numpy(), before[w.name])}
    h = model.get_layer("fc")(x[:8])
    out = keras.ops.convert_to_numpy  # a torch output carries autograd state: np.asarray refuses
    same = bool(np.array_equal(out(bn(h, training=True)), out(bn(h, training=False))))
    return type(bn).__qualname__, bn.trainable, moved, same


@pytest.mark.backends
@pytest.mark.parametrize("mode", POLICIES)
def test_each_policy_behaves_as_stated_and_survives_save_and_load(keras, tmp_path, mode):
    model = bn_model(keras)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no finding on this spec: a warning would be a bug
        surgery.apply(model, f"batchnorm {mode}")
    assert bn_behaviour(keras, model) == POLICIES[mode]
    model.save(tmp_path / "m.keras")
    saved = snapshot(model.weights)
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    for path, value in saved.items():  # the weights come back where they were
        assert np.array_equal(snapshot(loaded.weights)[path], value), path
    assert bn_behaviour(keras, loaded) == POLICIES[mode]


@pytest.mark.backends
@pytest.mark.parametrize("mode", POLICIES)
def test_each_policy_in_a_schedule_phase_behaves_as_stated(keras, mode):
    """Phase 0 keeps the layer frozen; the policy comes with the phase that unfreezes it."""
    model = bn_model(keras)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x, y = data((6,), 1, n=16, seed=3)
    rec = recorder(keras)
    spec = f"freeze bn\nat epoch 1:\n  unfreeze bn\n  batchnorm {mode}\n"
    fit(model, x, y, surgery.Schedule(spec, verbose=0), epochs=2, callbacks=[rec])
    cls, _flag, moves, _same = POLICIES[mode]
    begin, end = rec.begin[1]["weights"], rec.end[1]["weights"]
    assert rec.begin[1]["classes"]["bn"] == cls
    assert {p.split("/")[1] for p in begin if p.startswith("bn/") and
            not np.array_equal(begin[p], end[p])} == moves
    assert {p for p in rec.begin[0]["weights"] if p.startswith("bn/") and not np.array_equal(
        rec.begin[0]["weights"][p], rec.end[0]["weights"][p])} == set()


def test_the_cli_switches_the_class_and_back_without_keras(keras, tmp_path, capsys):
    """The archive engine writes the affine class (two fields of the layer's config entry), and
    Keras loads it as the class a Keras save of the same model gives."""
    from surgery.cli import main

    plain = tmp_path / "plain.keras"
    model = bn_model(keras)
    model.save(plain)
    weights = snapshot(model.weights)

    def cli(mode, source, out):
        spec = tmp_path / f"{mode}.frz"
        spec.write_text(f"batchnorm {mode}\n")
        capsys.readouterr()
        assert main(["apply", str(spec), str(source), "-o", str(out)]) == 0
        return capsys.readouterr().err

    err = cli("affine", plain, tmp_path / "affine.keras")
    assert "loaded through Keras" not in err
    affine = keras.models.load_model(tmp_path / "affine.keras", compile=False)
    assert (type(affine.get_layer("bn")).__qualname__, affine.get_layer("bn").trainable) == (
        "AffineBatchNormalization", True)
    for path, value in weights.items():
        assert np.array_equal(snapshot(affine.weights)[path], value), path
    assert bn_behaviour(keras, affine) == POLICIES["affine"]
    # A fresh process that imports surgery (which imports no Keras) and then Keras loads it.
    code = ("import surgery, keras, numpy as np\n"
            f"bn = keras.models.load_model({str(tmp_path / 'affine.keras')!r}).get_layer('bn')\n"
            "x = np.random.default_rng(0).standard_normal((8, 4)).astype('float32') * 3 + 1\n"
            "same = np.array_equal(np.asarray(bn(x, training=True)), np.asarray(bn(x)))\n"
            "print(type(bn).__qualname__, bn.trainable, same)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["AffineBatchNormalization", "True", "True"]

    err = cli("train", tmp_path / "affine.keras", tmp_path / "train.keras")
    assert "loaded through Keras" not in err
    back = keras.models.load_model(tmp_path / "train.keras", compile=False)
    assert type(back.get_layer("bn")).__qualname__ == "BatchNormalization"
    for path, value in weights.items():
        assert np.array_equal(snapshot(back.weights)[path], value), path

    err = cli("frozen", plain, tmp_path / "frozen.keras")
    assert "loaded through Keras" not in err
    frozen = keras.models.load_model(tmp_path / "frozen.keras", compile=False)
    assert bn_behaviour(keras, frozen) == POLICIES["frozen"]


def test_switch_refuses_a_batchnormalization_subclass(keras):
    from surgery.engines.batchnorm import switch

    class MyNorm(keras.layers.BatchNormalization):
        pass

    layer = MyNorm(name="mine")
    with pytest.raises(TypeError, match="'mine' is a MyNorm"):
        switch(layer, True)
    assert type(layer) is MyNorm


# --- e. the warning for a run that ends before a phase, and the printed log -----------------------


@pytest.mark.backends
def test_fit_that_ends_before_a_phase_warns_and_logs_each_epoch(keras, tmp_path, capsys):
    spec = tmp_path / "late.frz"
    spec.write_text("freeze fc, bn\nat epoch 5:\n  unfreeze fc, bn\n")
    model = bn_model(keras)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x, y = data((6,), 1, n=8, seed=3)
    schedule = surgery.Schedule(str(spec))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[schedule])
    said = [str(w.message) for w in caught if issubclass(w.category, surgery.SurgeryWarning)]
    assert len(said) == 2
    # The spec's findings, as surgery.apply gives them: here the phase's BatchNormalization
    # unfrozen without a policy ...
    assert said[0].startswith(f"{spec}:3:3: warning: this rule unfreezes BatchNormalization "
                              f"layers (bn) without a policy")
    # ... and a run too short for the phase.
    assert said[1] == ("fit(epochs=2) ends before 'at epoch 5:' (line 2) begins: epochs count "
                       "from 0, so the last epoch of this run is 1")
    head = 4 * 1 + 1
    assert history.history["surgery_phase"] == [0, 0]
    assert history.history["trainable_params"] == [head, head]
    everything = 6 * 4 + 4 + 4 + 4 + head  # fc, bn's gamma and beta (not its statistics), head
    assert capsys.readouterr().out.splitlines() == [
        f"surgery: epoch 0: phase 0: 2 frozen (fc, bn); trainable params {everything} -> {head}"]
    # A run long enough for every phase does not say it is too short.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=6, initial_epoch=5, verbose=0,
                            callbacks=[surgery.Schedule(spec, verbose=0)])
    assert not [w for w in caught if "ends before" in str(w.message)]
    assert history.history["surgery_phase"] == [5]
    assert history.history["trainable_params"] == [everything]


# --- the one slow test: gradual unfreezing of a keras.applications base ---------------------------


@pytest.mark.slow
def test_gradual_unfreezing_of_mobilenetv2(keras):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    spec = """
freeze all
unfreeze head
batchnorm frozen
at epoch 1:
  unfreeze mobilenetv2*/block_16_*, mobilenetv2*/Conv_1
at epoch 2:
  unfreeze mobilenetv2*/layers[100:]
"""
    x, y = data((32, 32, 3), 3, n=8)
    rec = recorder(keras)
    fit(model, x, y, surgery.Schedule(spec, verbose=0), epochs=3, callbacks=[rec])

    def weights_of(layers):
        return {v.path for layer in layers if not isinstance(
            layer, keras.layers.BatchNormalization) for v in layer.trainable_weights}

    head = {"head/kernel", "head/bias"}
    top = [layer for layer in base.layers if layer.name.startswith("block_16_")
           or layer.name == "Conv_1"]
    expected = [head, head | weights_of(top), head | weights_of(base.layers[100:])]
    assert len(expected[0]) < len(expected[1]) < len(expected[2])
    for epoch in range(3):
        assert set(rec.begin[epoch]["trainable"]) == expected[epoch]
        begin, end = rec.begin[epoch]["weights"], rec.end[epoch]["weights"]
        moved = {p for p in begin if not np.array_equal(begin[p], end[p])}
        # 'batchnorm frozen': no statistic of the base moves, whatever the phase unfreezes.
        assert head <= moved <= expected[epoch]
        assert list(rec.end[epoch]["optimizer"]) == rec.end[epoch]["slots"]


@pytest.mark.backends
def test_a_weights_only_checkpoint_of_an_affine_phase_loads_into_a_fresh_model(keras, tmp_path):
    """ModelCheckpoint(save_weights_only=True) and BackupAndRestore save weights only. Taken in
    the affine phase (epoch 1), such a file loads into a freshly built model brought to that
    phase with surgery.apply(..., epoch=1), weights and Adam state alike, and the resumed fit
    ends where the uninterrupted one does."""
    x, y = data()
    path = str(tmp_path / "epoch1.weights.h5")
    saver = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: e == 1 and model.save_weights(path))
    model = conv_model(keras)
    fit(model, x, y, surgery.Schedule(SPEC, verbose=0), callbacks=[saver])
    assert type(model.get_layer("bn2")).__qualname__ == "BatchNormalization"  # train from epoch 2

    fresh = conv_model(keras)
    with pytest.warns(surgery.SurgeryWarning):
        surgery.apply(fresh, SPEC, epoch=1)
    assert type(fresh.get_layer("bn2")).__qualname__ == "AffineBatchNormalization"
    fresh.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras only warns when it skips the optimizer state
        fresh.load_weights(path)
    fit(fresh, x, y, surgery.Schedule(SPEC, verbose=0), initial_epoch=2)
    for v, w in zip(model.weights, fresh.weights):
        assert np.array_equal(v.numpy(), w.numpy()), v.path
