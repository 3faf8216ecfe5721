"""Sub-layer freezing through the language and the command: `surgery apply` writes a model whose
frozen filters and units stay bit-identical through training in a fresh process, and `plan`,
the manifest and `verify` report them."""

import json
import subprocess
import sys
import textwrap

import pytest

from surgery.cli import main

SPEC = """\
freeze conv.filters[0:6]
unfreeze conv.filters[1]
freeze all except conv, head
freeze head.units[::2]
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import keras

    keras.backend.clear_session()
    x = keras.Input((8, 8, 3), name="x")
    h = keras.layers.Conv2D(8, 3, name="conv")(x)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(4, name="head")(h)
    tmp = tmp_path_factory.mktemp("parts")
    path = tmp / "model.keras"
    keras.Model(x, out).save(path)
    spec = tmp / "spec.frz"
    spec.write_text(SPEC)
    tuned = tmp / "tuned.keras"
    assert main(["apply", str(spec), str(path), "-o", str(tuned)]) == 0
    return tmp, spec, path, tuned


def test_manifest_records_frozen_entries_as_ranges(saved):
    _, _, _, tuned = saved
    manifest = json.loads((tuned.parent / "tuned.keras.manifest.json").read_text())
    layers = {e["path"]: e for e in manifest["layers"]}
    conv = layers["conv"]
    assert conv["trainable"] is True
    assert [(p["weight"], p["frozen"], p["of"], p["entries"]) for p in conv["frozen_parts"]] == [
        ("kernel", "0,2-5", 8, 5 * 27), ("bias", "0,2-5", 8, 5)]
    assert conv["trainable_params"] == conv["params"] - 5 * 27 - 5
    head = layers["head"]
    assert [(p["weight"], p["frozen"]) for p in head["frozen_parts"]] == [
        ("kernel", "0,2"), ("bias", "0,2")]
    assert layers["dw"]["trainable"] is False and "frozen_parts" not in layers["dw"]


def test_reloaded_in_a_fresh_process_frozen_entries_stay_bit_identical(saved):
    _, _, _, tuned = saved
    script = textwrap.dedent(f"""
        import numpy as np, surgery, keras
        m = keras.models.load_model({str(tuned)!r})
        conv, head = m.get_layer("conv"), m.get_layer("head")
        before = [np.array(v.numpy()) for v in (conv.kernel, conv.bias, head.kernel, head.bias)]
        m.compile(optimizer=keras.optimizers.AdamW(0.05, weight_decay=0.1), loss="mse")
        rng = np.random.default_rng(0)
        m.fit(rng.standard_normal((16, 8, 8, 3)), rng.standard_normal((16, 4)), epochs=2,
              batch_size=4, verbose=0)
        after = [np.array(v.numpy()) for v in (conv.kernel, conv.bias, head.kernel, head.bias)]
        frozen_f, free_f = [0, 2, 3, 4, 5], [1, 6, 7]
        frozen_u, free_u = [0, 2], [1, 3]
        k0, b0, hk0, hb0 = before
        k1, b1, hk1, hb1 = after
        assert np.array_equal(k0[..., frozen_f], k1[..., frozen_f])
        assert np.array_equal(b0[frozen_f], b1[frozen_f])
        assert not np.array_equal(k0[..., free_f], k1[..., free_f])
        assert np.array_equal(hk0[:, frozen_u], hk1[:, frozen_u])
        assert np.array_equal(hb0[frozen_u], hb1[frozen_u])
        assert not np.array_equal(hk0[:, free_u], hk1[:, free_u])
        dw = m.get_layer("dw")
        assert not dw.trainable and dw.trainable_weights == []
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_plan_shows_the_entries_frozen_inside_layers(saved, capsys):
    _, spec, path, _ = saved
    capsys.readouterr()
    assert main(["plan", str(spec), str(path)]) == 0
    out = capsys.readouterr().out
    assert "frozen inside trainable layers:" in out
    assert "  conv.kernel (3, 3, 3, 8): 0,2-5 of 8 on axis 3 (135 entries)" in out
    assert "  head.kernel (16, 4): 0,2 of 4 on axis 1 (32 entries)" in out
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["conv"])
    assert "partial *" in row


def test_verify_catches_a_single_filter_changed(saved, tmp_path, capsys):
    import keras
    from surgery.engines.constraint import set_frozen

    _, _, _, tuned = saved
    model = keras.models.load_model(tuned)
    set_frozen(model.get_layer("conv"), "kernel", [0, 2, 3, 4])  # filter 5 no longer frozen
    drifted = tmp_path / "drifted.keras"
    model.save(drifted)
    capsys.readouterr()
    assert main(["verify", f"{tuned}.manifest.json", str(drifted)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "conv.kernel: the manifest has entries [0,2-5] frozen, the model [0,2-4]"]
    assert main(["verify", f"{tuned}.manifest.json", str(tuned)]) == 0


def test_part_errors_name_the_layer_shape_and_axis(saved, tmp_path, capsys):
    _, _, path, _ = saved
    spec = tmp_path / "bad.frz"
    spec.write_text("freeze conv.filters[0:9]\nfreeze head.filters[0]\n")
    assert main(["apply", str(spec), str(path), "-o", str(tmp_path / "o.keras")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:1:12: error: layer 'conv' (Conv2D): filters[0:9] is out of range: kernel " \
           f"(3, 3, 3, 8) has 8 filters on axis 3" in err
    assert f"{spec}:2:12: error: layer 'head' (Dense) has no part 'filters'" in err
    assert not (tmp_path / "o.keras").exists()
