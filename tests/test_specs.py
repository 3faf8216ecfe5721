"""The schedule recipes in specs/: ResNet50 gradual unfreezing and the TensorFlow transfer-learning
tutorial's fine_tune_at = 100 as a phase.

The text checks need no TensorFlow. The Keras test plans both specs against the real
architectures (weights=None: nothing is downloaded) and checks, phase by phase, which layers
train and how their BatchNormalization layers behave, against sets computed from the models
themselves, and for the tutorial against the tutorial's own Python loop.
"""

from pathlib import Path

import pytest

import surgery
from surgery.cli import main

SPECS = Path(__file__).resolve().parent.parent / "specs"
RESNET = SPECS / "resnet50_gradual_unfreeze.frz"
TUTORIAL = SPECS / "mobilenetv2_fine_tune_at_100.frz"
TUTORIAL_SHAPE = (160, 160, 3)  # the tutorial's IMG_SIZE + (3,)
FINE_TUNE_AT = 100


# --- the text alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [RESNET, TUTORIAL], ids=lambda p: p.name)
def test_lint_is_clean(path, capsys):
    assert main(["lint", str(path)]) == 0
    assert capsys.readouterr() == ("", "")


def test_phase_epochs():
    # 0-based, as Keras's initial_epoch: the tutorial fine-tunes after its 10 initial epochs.
    assert surgery.load_spec(RESNET).epochs == (0, 2, 4, 6)
    assert surgery.load_spec(TUTORIAL).epochs == (0, 10)


# --- against the real architectures ---------------------------------------------------------------


def _tutorial_model(keras):
    """The tutorial's classifier: a nested MobileNetV2 base called with training=False, between
    data augmentation + preprocessing and a GlobalAveragePooling2D / Dropout / Dense(1) head."""
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                keras.layers.RandomRotation(0.2)])
    base = keras.applications.MobileNetV2(input_shape=TUTORIAL_SHAPE, include_top=False,
                                          weights=None)
    base.trainable = False
    inputs = keras.Input(shape=TUTORIAL_SHAPE)
    x = keras.applications.mobilenet_v2.preprocess_input(augment(inputs))
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs), base


def _phases(spec_path, model):
    from surgery.engines.live import describe
    from surgery.plan import plan_phases

    tree, objects = describe(model)
    return plan_phases(surgery.load_spec(spec_path), tree), objects


def _training(plan):
    """Paths of the leaf layers with weights that train in this phase."""
    return {lp.path for lp in plan.layers
            if not lp.layer.children and lp.layer.weights and lp.after}


def _is_bn(lp):
    return lp.layer.cls == "BatchNormalization" and not lp.layer.children


@pytest.mark.slow
def test_resnet50_gradual_unfreeze_phase_by_phase(keras_module):
    keras = keras_module
    model = keras.applications.ResNet50(weights=None)
    phases, _ = _phases(RESNET, model)
    assert [ph.epoch for ph in phases] == [0, 2, 4, 6]

    bn = {l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    weighted = [l.name for l in model.layers if l.weights and l.name not in bn]

    def convs(prefix):
        return {n for n in weighted if n.startswith(prefix)}

    expected = {
        0: {"predictions"},
        2: {"predictions"} | convs("conv5_block3_"),
        4: {"predictions"} | convs("conv5_"),
        6: {"predictions"} | convs("conv5_") | convs("conv4_"),
    }
    assert len(convs("conv5_block3_")) == 3 and len(convs("conv4_")) == 19  # names as assumed
    for ph in phases:
        assert _training(ph.plan) == expected[ph.epoch], ph.epoch
        assert not ph.plan.diagnostics, ph.plan.diagnostics  # no warning, no finding
        # 'batchnorm frozen': every BatchNormalization stays frozen, in inference mode, in every
        # phase, including those inside the stages the phases unfreeze.
        bn_plans = [lp for lp in ph.plan.layers if _is_bn(lp)]
        assert {lp.path for lp in bn_plans} == bn
        assert all(lp.batchnorm == "frozen" and not lp.after and not lp.affine
                   for lp in bn_plans)
    # Each phase only adds: the trainable parameter count grows at every change.
    counts = [ph.plan.totals.trainable_after for ph in phases]
    assert counts == sorted(set(counts))


@pytest.mark.slow
def test_mobilenetv2_tutorial_fine_tune_at_100_phase_by_phase(keras_module):
    keras = keras_module
    model, base = _tutorial_model(keras)
    phases, objects = _phases(TUTORIAL, model)
    assert [ph.epoch for ph in phases] == [0, 10]
    first, fine = phases[0].plan, phases[1].plan

    prefix = base.name + "/"
    assert base.name == "mobilenetv2_1.00_160"
    assert len(base.layers) == 154  # the tutorial prints it before choosing fine_tune_at
    top = {prefix + l.name for l in base.layers[FINE_TUNE_AT:] if l.weights}
    top_bn = {prefix + l.name for l in base.layers[FINE_TUNE_AT:]
              if isinstance(l, keras.layers.BatchNormalization)}

    # Feature extraction: base_model.trainable = False, only the head trains.
    assert _training(first) == {"head"}
    assert not any(lp.affine for lp in first.layers)
    # Fine-tuning: the head and exactly layers[100:] of the base.
    assert _training(fine) == {"head"} | top
    assert len(top_bn) == 18
    for lp in fine.layers:
        if _is_bn(lp):
            # affine where the tutorial's training=False call lets gamma and beta learn; the
            # frozen ones keep Keras's own class.
            assert lp.affine == (lp.path in top_bn), lp.path
            assert lp.after == (lp.path in top_bn), lp.path
    assert not first.diagnostics and not fine.diagnostics

    # The same trainable variables as the tutorial's own loop on a second build of the model.
    by_loop, loop_base = _tutorial_model(keras)
    loop_base.trainable = True
    for layer in loop_base.layers[:FINE_TUNE_AT]:
        layer.trainable = False
    expected = sorted(v.path for v in by_loop.trainable_variables)
    assert len(expected) == 56  # as the tutorial prints: len(model.trainable_variables)
    assert fine.totals.trainable_after == sum(
        int(v.numpy().size) for v in by_loop.trainable_variables)

    from surgery.engines.batchnorm import is_affine
    from surgery.engines.live import write

    write(model, first, objects)
    assert sorted(v.path for v in model.trainable_variables) == ["head/bias", "head/kernel"]
    write(model, fine, objects)
    assert sorted(v.path for v in model.trainable_variables) == expected
    assert {prefix + l.name for l in base.layers if is_affine(l)} == top_bn
