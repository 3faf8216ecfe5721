"""End to end on real keras.applications architectures (weights=None: nothing is downloaded).

The seed's three loops against the specs in specs/, nested models, and a saved-and-reloaded
result that trains exactly what the manifest says.
"""

from pathlib import Path

import numpy as np
import pytest

import surgery
from conftest import (frozen_variable_paths, layer_flags, train_one_step, trainable_paths,
                      weighted_flags)

SPECS = Path(__file__).resolve().parent.parent / "specs"
SMALL = (32, 32, 3)


def _apply(model, name):
    return surgery.apply(model, surgery.load_spec(SPECS / name))


def test_seed_example1_freeze_the_base(keras_module):
    keras = keras_module
    by_loop = keras.applications.VGG16(weights=None, include_top=False, input_shape=SMALL)
    for layer in by_loop.layers:
        layer.trainable = False
    by_spec = keras.applications.VGG16(weights=None, include_top=False, input_shape=SMALL)
    _apply(by_spec, "seed_example1_freeze_base.frz")
    assert layer_flags(by_spec) == layer_flags(by_loop)
    assert trainable_paths(by_spec) == trainable_paths(by_loop) == []


def test_seed_example2_by_name_and_its_misspelling(keras_module):
    keras = keras_module
    # The seed's list, misspelling included: the loop freezes three layers and says nothing.
    seed_list = ["conv1_conv", "bn_conv1", "conv2_block1_1_conv", "conv2_block1_2_conv"]
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SMALL)
    before = layer_flags(model)
    with pytest.raises(surgery.SelectorError) as info:
        surgery.apply(model, "unfreeze all\nfreeze " + ", ".join(seed_list))
    assert info.value.message == "'bn_conv1' matches no layer; did you mean 'conv1_bn'?"
    assert (info.value.line, info.value.column) == (2, 20)
    assert layer_flags(model) == before  # a failed apply changes nothing

    fixed = ["conv1_conv", "conv1_bn", "conv2_block1_1_conv", "conv2_block1_2_conv"]
    for layer in model.layers:
        layer.trainable = layer.name not in fixed
    by_spec = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SMALL)
    _apply(by_spec, "seed_example2_by_name.frz")
    assert layer_flags(by_spec) == layer_flags(model)
    assert trainable_paths(by_spec) == trainable_paths(model)
    assert not by_spec.get_layer("conv1_bn").trainable


@pytest.mark.backends
def test_seed_example3_first_ten_layers(keras_module):
    keras = keras_module
    by_loop = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SMALL)
    for i in range(len(by_loop.layers)):
        by_loop.layers[i].trainable = not i < 10
    by_spec = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SMALL)
    manifest = _apply(by_spec, "seed_example3_first_ten.frz")
    assert layer_flags(by_spec) == layer_flags(by_loop)
    assert trainable_paths(by_spec) == trainable_paths(by_loop)
    assert manifest.frozen == [layer.name for layer in by_spec.layers[:10]]
    assert manifest.frozen[0] == by_spec.layers[0].name  # the InputLayer counts, as in the loop


def _classifier(keras, base):
    inputs = keras.Input(base.input_shape[1:])
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="classifier")


def test_nested_mobilenetv2_matches_the_tutorial_and_survives_save_load(keras_module, tmp_path):
    keras = keras_module
    # TensorFlow's fine-tuning tutorial: base.trainable = True, then freeze base.layers[:100].
    tutorial_base = keras.applications.MobileNetV2(weights=None, include_top=False,
                                                   input_shape=(64, 64, 3))
    tutorial = _classifier(keras, tutorial_base)
    tutorial_base.trainable = True
    for layer in tutorial_base.layers[:100]:
        layer.trainable = False

    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(64, 64, 3))
    model = _classifier(keras, base)
    manifest = _apply(model, "mobilenetv2_classifier.frz")
    assert trainable_paths(model) == trainable_paths(tutorial)
    assert weighted_flags(model) == weighted_flags(tutorial)
    assert base.trainable is True  # something inside trains, so the container must

    # The manifest agrees with Keras, layer by layer.
    flags = layer_flags(model, by_name=True)
    states = {e["path"]: e["trainable"] for e in manifest.layers}
    assert states == flags

    path = tmp_path / "tuned.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert weighted_flags(reloaded) == weighted_flags(model)
    assert trainable_paths(reloaded) == trainable_paths(model)

    frozen = frozen_variable_paths(reloaded)
    assert len(frozen) > 100
    steps = train_one_step(reloaded)
    trained = set(trainable_paths(reloaded))
    for var_path in frozen:
        old, new = steps[var_path]
        assert np.array_equal(old, new), f"{var_path} is frozen but changed"
    changed = [p for p in trained if not np.array_equal(*steps[p])]
    assert "head/kernel" in changed and len(changed) > len(trained) // 2


@pytest.mark.backends
def test_freezing_a_nested_base_then_unfreezing_inside_it(keras_module):
    keras = keras_module
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    base.trainable = False  # the usual first step of transfer learning, done by hand
    model = _classifier(keras, base)
    with pytest.warns(surgery.SurgeryWarning, match="without a policy"):  # BatchNorm unfrozen
        surgery.apply(model, "unfreeze **/block_16_*, head")
    trained = trainable_paths(model)
    assert trained and all(p.startswith(("block_16_", "head/")) for p in trained)
    expected = sorted(v.path for layer in base.layers if layer.name.startswith("block_16_")
                      for v in layer.trainable_weights) + ["head/bias", "head/kernel"]
    assert trained == sorted(expected)
    # Layers no rule covered keep their effective state: frozen, as they were under the base.
    assert base.get_layer("Conv1").trainable is False


@pytest.mark.slow
def test_efficientnetb0_by_class_and_range(keras_module):
    keras = keras_module
    model = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=SMALL)
    manifest = surgery.apply(model, "freeze all\nunfreeze block7a_expand_conv..top_activation\n"
                                    "freeze type:BatchNormalization")
    names = [layer.name for layer in model.layers]
    start, stop = names.index("block7a_expand_conv"), names.index("top_activation")
    expected = {layer.name for layer in model.layers[start:stop + 1]
                if type(layer).__name__ != "BatchNormalization"}
    trainable = {layer.name for layer in model.layers if layer.trainable}
    assert trainable == expected
    assert trainable_paths(model) == sorted(
        v.path for layer in model.layers if layer.name in expected for v in layer.trainable_weights)
    assert manifest.data["totals"]["trainable_params"]["after"] == sum(
        int(np.prod(v.shape)) for v in model.trainable_weights)


def test_apply_warns_that_a_compiled_model_needs_compiling_again(keras_module):
    keras = keras_module
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(1, name="b")])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(surgery.SurgeryWarning, match="compile"):
        surgery.apply(model, "freeze a")
    assert trainable_paths(model) == sorted(v.path for v in model.get_layer("b").weights)


@pytest.mark.backends
def test_manifest_counts_match_keras(keras_module):
    keras = keras_module
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SMALL)
    with pytest.warns(surgery.SurgeryWarning, match="without a policy"):  # BatchNorm unfrozen
        manifest = surgery.apply(model, "freeze all; unfreeze conv5_*")
    totals = manifest.data["totals"]
    keras_trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    keras_total = sum(int(np.prod(v.shape)) for v in model.weights)
    assert totals["trainable_params"]["after"] == keras_trainable
    assert totals["params"] == keras_total
    assert totals["trainable_params"]["before"] + totals["non_trainable_params"]["before"] == \
        keras_total
