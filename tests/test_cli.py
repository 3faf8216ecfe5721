"""The `surgery` command on small real models: outputs, manifests, exit codes and messages.

Most tests call `surgery.cli.main` in-process (one TensorFlow start for the module); a few run
the installed console script to prove what a user's shell sees.
"""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from surgery.cli import main
from conftest import frozen_variable_paths, train_one_step, trainable_paths, weighted_flags

SURGERY = str(Path(sys.executable).parent / "surgery")


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A Functional model with a nested Sequential block and a BatchNormalization, saved."""
    import keras

    keras.backend.clear_session()
    block = keras.Sequential([keras.layers.Dense(8, name="b1"),
                              keras.layers.BatchNormalization(name="b_bn"),
                              keras.layers.Dense(8, name="b2")], name="block")
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, name="stem")(inputs)
    h = block(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs, name="tiny")
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


@pytest.fixture
def work(tmp_path, model_file):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\nunfreeze head, block/b2\n")
    return tmp_path, spec, model_file


def run(*args):
    return main([str(a) for a in args])


def test_apply_writes_model_and_manifest_and_leaves_the_input_alone(work, capsys):
    tmp, spec, model = work
    before = sha(model)
    out = tmp / "tuned.keras"
    assert run("apply", spec, model, "-o", out) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and f"manifest {out}.manifest.json" in stdout
    assert sha(model) == before
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    states = {e["path"]: e["trainable"] for e in manifest["layers"]}
    assert states == {"x": False, "stem": False, "block": True, "block/b1": False,
                      "block/b_bn": False, "block/b2": True, "head": True}
    assert manifest["model"]["sha256"] == before
    assert manifest["model"]["source"] == "tiny.keras"
    assert manifest["spec"]["text"] == spec.read_text()
    assert [r["text"] for r in manifest["rules"]] == ["freeze all", "unfreeze head, block/b2"]
    assert manifest["rules"][1]["matched"] == ["block/b2", "head"]
    assert manifest["layers"][2]["rule"] is None  # the container follows its layers
    assert {"keras", "tensorflow", "backend", "surgery"} <= set(manifest["versions"])
    assert sorted(p.name for p in tmp.iterdir()) == ["spec.frz", "tuned.keras",
                                                     "tuned.keras.manifest.json"]


def test_reloaded_output_trains_exactly_what_the_manifest_says(work):
    import keras

    tmp, spec, model = work
    out = tmp / "tuned.keras"
    assert run("apply", spec, model, "-o", out) == 0
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    reloaded = keras.models.load_model(out)
    expected = {e["path"]: e["trainable"] for e in manifest["layers"] if e["params"]}
    assert weighted_flags(reloaded) == expected
    trainable_layers = {e["path"].rsplit("/", 1)[-1] for e in manifest["layers"]
                        if e["trainable"] and not e["container"] and e["params"]}
    assert {p.split("/")[-2] for p in trainable_paths(reloaded)} == trainable_layers
    frozen = frozen_variable_paths(reloaded)
    steps = train_one_step(reloaded)
    assert all(np.array_equal(*steps[p]) for p in frozen)
    assert all(not np.array_equal(*steps[p]) for p in trainable_paths(reloaded))


def test_the_same_spec_and_model_give_byte_identical_manifests(work, tmp_path):
    tmp, spec, model = work
    first, second = tmp / "a.keras", tmp / "sub"
    second.mkdir()
    assert run("apply", spec, model, "-o", first) == 0
    assert run("apply", spec, model, "-o", second / "b.keras",
               "--manifest", second / "m.json") == 0
    assert Path(f"{first}.manifest.json").read_bytes() == (second / "m.json").read_bytes()


def test_refuses_an_existing_output_unless_forced(work, capsys):
    tmp, spec, model = work
    out = tmp / "tuned.keras"
    out.write_bytes(b"precious")
    assert run("apply", spec, model, "-o", out) == 2
    assert capsys.readouterr().err == (
        f"surgery: error: {out}: already exists; pass --force to replace it\n")
    assert out.read_bytes() == b"precious"
    assert run("apply", spec, model, "-o", out, "--force") == 0
    assert out.read_bytes() != b"precious"


def test_never_overwrites_the_input_even_with_force(work, capsys):
    tmp, spec, model = work
    before = sha(model)
    assert run("apply", spec, model, "-o", model, "--force") == 2
    assert "never modifies its input" in capsys.readouterr().err
    assert sha(model) == before


def test_spec_errors_exit_2_with_a_caret_and_write_nothing(work, capsys):
    tmp, spec, model = work
    spec.write_text("freeze all\nunfreez head\n")
    out = tmp / "tuned.keras"
    assert run("apply", spec, model, "-o", out) == 2
    assert capsys.readouterr().err == (
        f"{spec}:2:1: error: unknown statement 'unfreez'; did you mean 'unfreeze'?\n"
        "  unfreez head\n"
        "  ^\n")
    assert sorted(p.name for p in tmp.iterdir()) == ["spec.frz"]


def test_every_unmatched_selector_is_reported_at_once(work, capsys):
    tmp, spec, model = work
    spec.write_text("freeze stme, haed\n")
    assert run("apply", spec, model, "-o", tmp / "t.keras") == 2
    err = capsys.readouterr().err
    assert f"{spec}:1:8: error: 'stme' matches no layer; did you mean 'stem'?" in err
    assert f"{spec}:1:14: error: 'haed' matches no layer; did you mean 'head'?" in err
    assert sorted(p.name for p in tmp.iterdir()) == ["spec.frz"]


def test_allow_empty_turns_unmatched_selectors_into_warnings(work, capsys):
    tmp, spec, model = work
    spec.write_text("freeze stem, nothing_like_this\n")
    assert run("apply", spec, model, "-o", tmp / "t.keras", "--allow-empty") == 0
    err = capsys.readouterr().err
    assert f"{spec}:1:14: warning: 'nothing_like_this' matches no layer" in err
    manifest = json.loads((tmp / "t.keras.manifest.json").read_text())
    assert manifest["warnings"][0]["message"] == "'nothing_like_this' matches no layer"


@pytest.mark.parametrize("make,problem", [
    (lambda d: d / "missing.keras", "no such file"),
    (lambda d: d, "is a directory, not a model file (.keras or .h5)"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt",
     "unsupported model format: expected a .keras or .h5 file, or keras.applications.NAME"),
])
def test_model_path_errors(tmp_path, capsys, make, problem):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\n")
    model = make(tmp_path)
    assert run("plan", spec, model) == 2
    assert capsys.readouterr().err == f"surgery: error: {model}: {problem}\n"


def test_random_bytes_and_truncated_files_are_one_line_errors(tmp_path, model_file, capsys):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\n")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(os.urandom(4096))
    truncated = tmp_path / "cut.keras"
    truncated.write_bytes(model_file.read_bytes()[:2000])
    for bad in (junk, truncated):  # -q: without the progress line, stderr is the error alone
        assert run("apply", spec, bad, "-o", tmp_path / "out.keras", "-q") == 2
        err = capsys.readouterr().err
        assert err == (f"surgery: error: {bad}: cannot load the model: not a readable .keras "
                       "file (a zip archive): truncated or damaged?\n")  # not "File not found"
    assert not (tmp_path / "out.keras").exists()


def test_unknown_application_suggests_the_right_one(tmp_path, capsys):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\n")
    assert run("plan", spec, "keras.applications.Resnet50", "-q") == 2
    assert capsys.readouterr().err == (
        "surgery: error: keras.applications.Resnet50: keras.applications has no model "
        "'Resnet50'; did you mean keras.applications.ResNet50?\n")


def test_lambda_layers_are_refused_in_safe_mode(tmp_path, capsys):
    import keras

    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * 2, name="double")(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\n")
    assert run("apply", spec, path, "-o", tmp_path / "out.keras", "-q") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"surgery: error: {path}: cannot load the model: ")
    assert "safe" in err
    assert not (tmp_path / "out.keras").exists()


def test_plan_shows_every_layer_with_the_deciding_rule(work, capsys):
    tmp, spec, model = work
    assert run("plan", spec, model) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["#", "layer", "class", "params", "before", "after", "rule"]
    rows = {line.split()[1]: line for line in out[2:9]}
    assert set(rows) == {"x", "stem", "block", "block/b1", "block/b_bn", "block/b2", "head"}
    assert rows["stem"].split()[4:7] == ["trainable", "frozen", "*"]
    assert rows["stem"].endswith("line 1: freeze all")
    assert rows["head"].endswith("line 2: unfreeze head, block/b2")
    assert rows["block"].endswith("(follows the layers inside)")
    assert any(line.startswith("note: 1 BatchNormalization layer is frozen") for line in out)
    assert not list(tmp.glob("*.keras"))  # a dry run writes nothing


def test_show_lists_layers_and_totals(work, capsys):
    tmp, spec, model = work
    assert run("show", model) == 0
    out = capsys.readouterr().out
    assert "block/b_bn" in out and "BatchNormalization" in out
    assert "trainable params: " in out and "rule" not in out.splitlines()[0]


def test_output_folder_must_exist(work, capsys):
    tmp, spec, model = work
    assert run("apply", spec, model, "-o", tmp / "nope" / "t.keras") == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_and_module_agree_and_never_print_a_traceback(tmp_path):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all\n")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"\x00" * 100)
    for cmd in ([SURGERY], [sys.executable, "-m", "surgery"]):
        proc = subprocess.run(cmd + ["apply", str(spec), str(junk), "-o", str(tmp_path / "o.keras"),
                                     "-q"], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith(f"surgery: error: {junk}: cannot load the model")
    version = subprocess.run([SURGERY, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("surgery ")


def test_bad_arguments_exit_2():
    proc = subprocess.run([SURGERY, "apply", "only-one-arg"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_archive_engine_writes_reproducible_outputs_that_verify(work, capsys):
    import keras

    tmp, spec, model = work
    a, b = tmp / "a.keras", tmp / "b.keras"
    assert run("apply", spec, model, "-o", a, "--engine", "archive") == 0
    assert run("apply", spec, model, "-o", b, "--engine", "archive") == 0
    assert sha(a) == sha(b)  # byte-reproducible, unlike a Keras save (which stamps the date)
    manifest = json.loads(Path(f"{a}.manifest.json").read_text())
    assert manifest["output"]["sha256"] == sha(a)
    live_out = tmp / "live.keras"
    assert run("apply", spec, model, "-o", live_out, "--engine", "keras") == 0
    live = json.loads(Path(f"{live_out}.manifest.json").read_text())
    assert "output" not in live
    del manifest["output"]
    assert manifest == live  # the two engines record the same surgery
    reloaded = keras.models.load_model(a)
    assert weighted_flags(reloaded) == weighted_flags(keras.models.load_model(live_out))
    capsys.readouterr()
    assert run("verify", f"{a}.manifest.json", a, "--engine", "archive") == 0


def test_auto_engine_falls_back_to_keras_with_a_note(work, capsys):
    import keras

    tmp, spec, model = work
    # Saved compiled: the output must drop the compile state as load_model(compile=False) does,
    # which rewriting config.json and copying the weights entry cannot.
    compiled = keras.models.load_model(model, compile=False)
    compiled.compile(optimizer="adam", loss="mse")
    compiled.train_on_batch(np.zeros((2, 6), "float32"), np.zeros((2, 2), "float32"))
    model = tmp / "compiled.keras"
    compiled.save(model)
    assert run("apply", spec, model, "-o", tmp / "t.keras", "--engine", "auto", "-q") == 0
    err = capsys.readouterr().err
    assert err.startswith("surgery: note: the model was saved compiled")
    assert "loaded through Keras" in err
    assert not json.loads(zipfile.ZipFile(tmp / "t.keras").read("config.json")).get(
        "compile_config")  # Keras writes {} for a model loaded with compile=False
    assert run("apply", spec, model, "-o", tmp / "u.keras", "--engine", "archive") == 2
    assert "the archive engine cannot handle it" in capsys.readouterr().err


# --- no output may be an input -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["the path", "a hard link", "a symlink"])
def test_the_manifest_never_overwrites_the_spec_even_with_force(work, capsys, how):
    tmp, spec, model = work
    text = spec.read_text()
    target = spec
    if how == "a hard link":
        target = tmp / "alias.json"
        os.link(spec, target)
    elif how == "a symlink":
        target = tmp / "alias.json"
        target.symlink_to(spec)
    assert run("apply", spec, model, "-o", tmp / "t.keras", "--manifest", target, "--force") == 2
    err = capsys.readouterr().err
    assert err == (f"surgery: error: {target}: the manifest would overwrite the spec; surgery "
                   f"never modifies its input\n")
    assert spec.read_text() == text
    assert not (tmp / "t.keras").exists()


def test_the_manifest_never_overwrites_the_model_and_the_output_not_the_spec(work, capsys):
    tmp, spec, model = work
    before = sha(model)
    assert run("apply", spec, model, "-o", tmp / "t.keras", "--manifest", model, "--force") == 2
    assert "the manifest would overwrite the input model" in capsys.readouterr().err
    link = tmp / "spec.keras"
    link.symlink_to(spec)
    assert run("apply", spec, model, "-o", link, "--force") == 2
    assert "the output would overwrite the spec" in capsys.readouterr().err
    assert sha(model) == before and spec.read_text().startswith("freeze all")


# --- malformed manifests: one line, exit 2, never an internal error ------------------------------


@pytest.fixture
def good_manifest(work):
    tmp, spec, model = work
    out = tmp / "good.keras"
    assert run("apply", spec, model, "-o", out) == 0
    return json.loads(Path(f"{out}.manifest.json").read_text())


def _phase(epoch):
    return {"epoch": epoch, "line": 3, "trainable": [], "frozen_parts": {}, "batchnorm": {},
            "affine": [], "trainable_params": 0}


MALFORMED = {
    # name: (what to write, the message after "not a ..." for verify and diff alike)
    "100k-deep JSON": (lambda m: '{"format": 1, "layers": ' + "[" * 100_000 + "]" * 100_000 + "}",
                       "not a manifest: JSON nested deeper than 32 levels"),
    "a 900-deep value under a key no one reads": (
        lambda m: {**m, "extra": json.loads("[" * 900 + "]" * 900)},
        "not a manifest: JSON nested deeper than 32 levels"),
    "layers as strings": (lambda m: {**m, "layers": ["x", "stem"]},
                          "not a valid manifest: layers[0]: an object expected, found a string"),
    "layers as a dict": (lambda m: {**m, "layers": {e["path"]: e for e in m["layers"]}},
                         "not a valid manifest: layers: a list expected, found an object"),
    "an entry without path": (
        lambda m: {**m, "layers": [{k: v for k, v in e.items() if k != "path"}
                                   for e in m["layers"]]},
        "not a valid manifest: layers[0].path: missing"),
    "no spec": (lambda m: {k: v for k, v in m.items() if k != "spec"},
                "not a valid manifest: spec: missing"),
    "a schedule without phase 0": (
        lambda m: {**m, "schedule": [_phase(2), _phase(4)]},
        "not a valid manifest: schedule: the first phase must start at epoch 0"),
    "phases out of order": (lambda m: {**m, "schedule": [_phase(0), _phase(4), _phase(2)]},
                            "not a valid manifest: schedule[2].epoch: phases must start at "
                            "increasing epochs"),
    "a count that is a boolean": (
        lambda m: {**m, "totals": {**m["totals"], "params": True}},
        "not a valid manifest: totals.params: an integer expected, found a boolean"),
    "a layer twice": (lambda m: {**m, "layers": m["layers"] + m["layers"][:1]},
                      "not a valid manifest: layers[7].path: 'x' appears twice"),
    "a 5000-digit number": (lambda m: '{"format": 1, "n": ' + "9" * 5000 + "}",
                            "not a manifest: Exceeds the limit"),
    "not JSON": (lambda m: "{'format': 1}",
                 "not a manifest: invalid JSON at line 1, column 2: Expecting property name "
                 "enclosed in double quotes"),
    "no format": (lambda m: {k: v for k, v in m.items() if k != "format"},
                  "not a surgery manifest (format 1)"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("command", ["verify", "verify --epoch 0", "diff", "diff (second)"])
def test_a_malformed_manifest_is_one_line_and_exit_2(work, good_manifest, capsys, name,
                                                     command):
    tmp, spec, model = work
    make, message = MALFORMED[name]
    content = make(good_manifest)
    bad = tmp / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    good = tmp / "good.keras.manifest.json"
    args = {"verify": ["verify", bad, tmp / "good.keras"],
            "verify --epoch 0": ["verify", bad, tmp / "good.keras", "--epoch", "0"],
            "diff": ["diff", bad, good], "diff (second)": ["diff", good, bad]}[command]
    assert run(*args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"surgery: error: {bad}: {message}"), captured.err
    assert captured.err.count("\n") == 1 and "internal error" not in captured.err


def _applied(work, capsys):
    """(folder, output, manifest) of `apply` on the work model; its output read away."""
    tmp, spec, model = work
    out = tmp / "t.keras"
    assert run("apply", spec, model, "-o", out) == 0
    capsys.readouterr()
    return tmp, out, Path(f"{out}.manifest.json")


def _edited(manifest: Path, folder: Path, edit) -> Path:
    """A copy of ``manifest`` in ``folder`` with ``edit(data)`` applied."""
    data = json.loads(manifest.read_text())
    edit(data)
    edited = folder / "edited.json"
    edited.write_text(json.dumps(data))
    return edited


def test_verify_says_whether_the_model_is_the_very_file_apply_wrote(work, capsys):
    import keras

    tmp, out, manifest = _applied(work, capsys)
    assert run("verify", manifest, out) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{out} matches {manifest} (")
    assert captured.out.endswith(" layers; the very file apply wrote)\n")
    assert captured.err == ""
    # The same state in other bytes, as a checkpoint has it: it matches, and verify says the
    # file is not the one apply wrote, with both digests.
    resaved = tmp / "resaved.keras"
    keras.saving.load_model(out).save(resaved)
    assert sha(resaved) != sha(out)
    assert run("verify", manifest, resaved) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{resaved} matches {manifest} (")
    assert "the very file" not in captured.out
    assert captured.err == (f"note: {resaved} is not the file surgery apply wrote (sha256 "
                            f"{sha(resaved)[:12]}, the manifest records {sha(out)[:12]}): its "
                            "state is what is compared, as for a checkpoint saved during "
                            "training\n")
    # Digests that share their first 12 characters are shown whole, so the note never says
    # "X, the manifest records X".
    digest = sha(out)
    near = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    edited = _edited(manifest, tmp, lambda data: data["output"].update(sha256=near))
    assert run("verify", edited, out) == 0
    assert f"(sha256 {digest}, the manifest records {near})" in capsys.readouterr().err


def test_verify_says_an_edited_manifest_was_altered_and_diff_names_the_fields(work, capsys):
    tmp, out, manifest = _applied(work, capsys)
    assert run("verify", manifest, out) == 0
    capsys.readouterr()

    def more_trained(data):
        data["totals"]["trainable_params"]["after"] += 1

    edited = _edited(manifest, tmp, more_trained)
    assert run("verify", edited, out) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith(
        "manifest: totals.trainable_params.after is ")
    assert captured.err.startswith(f"{edited} does not follow from its own spec and the model")

    def other_output(data):
        data["output"]["sha256"] = "0" * 64
        data["model_trainable"] = False

    edited = _edited(manifest, tmp, other_output)
    assert run("diff", manifest, edited) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"output: {sha(out)[:12]} -> {'0' * 12}" in lines
    assert "model_trainable: true -> false" in lines


# --- the Python API for file to file: surgery.apply_file ----------------------------------------


def test_apply_file_writes_what_the_command_writes_and_prints_nothing(work, capsys):
    import surgery
    from surgery.modelfile import AppliedFile, Engine

    tmp, spec, model = work
    assert run("apply", spec, model, "-o", tmp / "cli.keras") == 0
    capsys.readouterr()
    result = surgery.apply_file(spec, model, tmp / "api.keras")
    assert capsys.readouterr() == ("", "")  # notes and diagnostics are data, not output
    assert isinstance(result, AppliedFile)
    assert (result.engine, result.fallback) == (Engine.ARCHIVE, None) and result.engine == "archive"
    assert (result.output, result.manifest_path) == (str(tmp / "api.keras"),
                                                     f"{tmp / 'api.keras'}.manifest.json")
    assert Path(result.manifest_path).read_text() == result.manifest.to_json()
    assert Path(result.manifest_path).read_bytes() == \
        (tmp / "cli.keras.manifest.json").read_bytes()
    assert sha(tmp / "api.keras") == sha(tmp / "cli.keras")  # the archive engine reproduces
    assert result.plan.totals.trainable_after == \
        result.manifest.data["totals"]["trainable_params"]["after"]
    assert result.diagnostics == ()


def test_apply_file_takes_spec_text_an_engine_and_refuses_an_existing_output(work):
    import surgery
    from surgery.modelfile import Engine

    tmp, spec, model = work
    out = tmp / "k.keras"
    result = surgery.apply_file("freeze all\nunfreeze head\n", model, out, engine="keras",
                                manifest=tmp / "k.json")
    assert (result.engine, result.fallback) == (Engine.KERAS, None)
    assert "output" not in result.manifest.data  # a Keras save is not byte-reproducible
    assert json.loads((tmp / "k.json").read_text())["rules"][1]["text"] == "unfreeze head"
    with pytest.raises(surgery.SurgeryError, match="already exists; pass --force"):
        surgery.apply_file(spec, model, out, manifest=tmp / "other.json")
    assert not (tmp / "other.json").exists()
    assert surgery.apply_file(spec, model, out, manifest=tmp / "k.json", force=True,
                              engine=Engine.ARCHIVE).engine is Engine.ARCHIVE
    with pytest.raises(surgery.SurgeryError,
                       match="engine 'fast': expected auto, archive or keras"):
        surgery.apply_file(spec, model, tmp / "x.keras", engine="fast")


def test_apply_file_returns_the_fallback_and_its_reason(work):
    import keras

    import surgery
    from surgery.modelfile import Engine

    tmp, spec, model = work
    compiled = keras.models.load_model(model, compile=False)
    compiled.compile(optimizer="adam", loss="mse")
    saved = tmp / "compiled.keras"
    compiled.save(saved)
    result = surgery.apply_file(spec, saved, tmp / "t.keras")
    assert result.engine is Engine.KERAS
    assert result.fallback.startswith("the model was saved compiled")
    with pytest.raises(surgery.ModelError, match="the archive engine cannot handle it: the "
                                                 "model was saved compiled"):
        surgery.apply_file(spec, saved, tmp / "u.keras", engine="archive")
    assert not (tmp / "u.keras").exists()
    # An .h5 output cannot come from the archive engine: Keras writes it, and no note is due.
    h5 = surgery.apply_file(spec, model, tmp / "t.h5")
    assert (h5.engine, h5.fallback) == (Engine.KERAS, None)


def test_an_h5_output_is_written_without_a_name_and_holds_what_the_manifest_says(work,
                                                                                 monkeypatch):
    # Keras picks the legacy format from the suffix, and the anonymous temporary has none:
    # surgery saves it as model.save(PATH.h5) would, into the open file.
    import keras

    import surgery
    from surgery import atomic
    from surgery.engines import live

    tmp, spec, model = work
    given = []
    real_save = live.save

    def watched(loaded, path, suffix=""):
        given.append(path)
        return real_save(loaded, path, suffix)

    monkeypatch.setattr(live, "save", watched)
    out_dir = tmp / "h5out"
    out_dir.mkdir()
    surgery.apply_file(spec, model, out_dir / "t.h5")
    assert given[0].startswith("/proc/self/fd/") == atomic.anonymous_temporaries(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["t.h5", "t.h5.manifest.json"]
    saved = keras.models.load_model(out_dir / "t.h5", compile=False)
    recorded = {e["path"]: e["trainable"] for e in json.loads(
        (out_dir / "t.h5.manifest.json").read_text())["layers"] if e["params"]}
    flags = weighted_flags(saved)  # as Keras loads them back, by path
    assert flags and {p: recorded[p] for p in flags} == flags
    assert False in flags.values() and True in flags.values()  # the spec froze some, not all


def test_a_bug_is_one_line_and_surgery_debug_shows_its_traceback(work, capsys, monkeypatch):
    import importlib

    plan_module = importlib.import_module("surgery.plan")  # surgery.plan is also the function
    tmp, spec, model = work

    def buggy(*args, **kwargs):
        return {}["a typo in surgery's own code"]

    monkeypatch.setattr(plan_module, "plan_spec", buggy)
    monkeypatch.delenv("SURGERY_DEBUG", raising=False)
    assert run("plan", spec, model) == 2
    assert capsys.readouterr().err == (
        "surgery: internal error: KeyError: \"a typo in surgery's own code\" (run with "
        "SURGERY_DEBUG=1 for a traceback)\n")
    monkeypatch.setenv("SURGERY_DEBUG", "1")
    with pytest.raises(KeyError):
        run("plan", spec, model)
