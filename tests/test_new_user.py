"""What a new user trips over (issue 16), each checked on the real thing: the tutorial's slice trap
on its real classifier, keras.applications constructor arguments against the constructor called
in Python, progress lines and --quiet in a real subprocess, plan --changed / --summary on
ResNet50 against the recipe's own loop, diff --spec agreement, both parameter counts against
Keras's model.trainable_weights, the demo's Makefile target, the README's first YAML example and
the seed spec's comment.

The first part needs no TensorFlow. The real models are built once per module and saved, so
most commands read them through the archive engine in-process.
"""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main
from surgery.plan import plan_spec
from surgery.progress import SILENT, Lines, Spinner, for_stderr
from surgery.report import block_table, plan_table
from surgery.tree import LayerTree

ROOT = Path(__file__).resolve().parent.parent
SURGERY = str(Path(sys.executable).parent / "surgery")
TUTORIAL_SHAPE = (160, 160, 3)


def run(*args):
    return main([str(a) for a in args])


# --- without TensorFlow -------------------------------------------------------------------------


@pytest.mark.parametrize("model,message", [
    ("keras.applications.ResNet50(1)", "positional arguments are not taken: name each one, as "
     "in keras.applications.ResNet50(input_shape=(160, 160, 3))"),
    ("keras.applications.ResNet50(input_shape=__import__('os').getcwd())",
     "'input_shape=__import__('os').getcwd()': only literal values are taken (numbers, strings, "
     "True, False, None, tuples, lists, dicts); nothing is evaluated"),
    ("keras.applications.ResNet50(weights='imagenet')", "weights='imagenet': surgery builds "
     "keras.applications models with weights=None (nothing is downloaded); to start from "
     "pre-trained weights, save the model in Python and pass the file"),
    ("keras.applications.ResNet50(**{'a': 1})", "'**' is not taken: write each argument as "
     "name=value"),
    ("keras.applications.ResNet50(pooling='avg', pooling='max')", "'pooling' is given twice"),
    ("keras.applications.ResNet50(include_top=False", "not a keras.applications call ('(' was "
     "never closed): write keras.applications.NAME(arg=value, ...) with literal values, e.g. "
     "keras.applications.ResNet50(include_top=False, input_shape=(160, 160, 3))"),
    ("keras.applications.ResNet50(a=1).summary()", "not a keras.applications call: write "
     "keras.applications.NAME(arg=value, ...) with literal values, e.g. "
     "keras.applications.ResNet50(include_top=False, input_shape=(160, 160, 3))"),
])
def test_a_malformed_application_call_is_one_line_exit_2_before_keras(model, message, tmp_path,
                                                                       capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze all\n")
    for args in (("plan", spec, model), ("show", model), ("lint", spec, "--model", model),
                 ("apply", spec, model, "-o", tmp_path / "out.keras"),
                 ("diff", "--spec", spec, model, model)):
        assert run(*args) == 2, args
        captured = capsys.readouterr()
        assert captured.err == f"surgery: error: {model}: {message}\n", args
        assert captured.out == ""
    assert list(tmp_path.iterdir()) == [spec]  # a failed run writes nothing


def test_a_malformed_application_call_does_not_start_tensorflow(tmp_path):
    # The command line's own process: the call is refused before TensorFlow is imported.
    spec = tmp_path / "s.frz"
    spec.write_text("freeze all\n")
    probe = ("import sys; from surgery.cli import main; "
             "code = main(['plan', sys.argv[1], 'keras.applications.ResNet50(1)']); "
             "heavy = 'tensorflow' in sys.modules or 'keras' in sys.modules; "
             "print('heavy' if heavy else 'light'); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, str(spec)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "light\n", done.stderr
    assert "Traceback" not in done.stderr


def test_progress_reporters():
    stream = io.StringIO()
    assert isinstance(for_stderr(stream=stream), Lines)  # not a terminal: plain lines
    assert for_stderr(quiet=True, stream=stream) is SILENT
    with for_stderr(stream=stream).step("building keras.applications.ResNet50 (weights=None)"):
        pass
    with SILENT.step("saving x.keras"):
        pass
    assert stream.getvalue() == "surgery: building keras.applications.ResNet50 (weights=None) ...\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    reporter = for_stderr(stream=term)
    assert isinstance(reporter, Spinner)
    with reporter.step("loading m.keras through Keras"):
        pass
    assert "surgery: loading m.keras through Keras ..." in term.getvalue()  # rich drew it


def _tree_with_parts():
    return LayerTree.from_dict({"name": "m", "layers": [
        "x:InputLayer", {"name": "conv", "class": "Conv2D",
                         "weights": [["kernel", [3, 3, 3, 8]], ["bias", [8]]]},
        {"name": "head", "class": "Dense", "weights": [["kernel", [8, 2]], ["bias", [2]]]}]})


def test_show_has_one_state_column_and_plan_changed_only_the_changes():
    tree = _tree_with_parts()
    shown = plan_table(plan_spec(surgery.parse(""), tree), with_rules=False).splitlines()
    assert shown[0].split() == ["#", "layer", "class", "params", "state"]
    assert shown[2].split() == ["0", "x", "InputLayer", "0", "trainable"]
    plan = plan_spec(surgery.parse("freeze head"), tree)
    rows = plan_table(plan, changed_only=True).splitlines()
    assert rows[0].split() == ["#", "layer", "class", "params", "before", "after", "rule"]
    assert [r.split()[1] for r in rows[2:rows.index("")]] == ["head"]
    assert "* state changed by the spec (1 of 3 layers shown)" in rows
    nothing = plan_table(plan_spec(surgery.parse("unfreeze all"), tree), changed_only=True)
    assert nothing.splitlines()[0] == "no layer changes state (3 layers)"


def test_totals_explain_frozen_entries_inside_trainable_variables():
    plan = plan_spec(surgery.parse("freeze conv.filters[0:2]"), _tree_with_parts())
    kernel, bias = 3 * 3 * 3 * 8, 8
    held = 3 * 3 * 3 * 2 + 2
    everything = kernel + bias + 8 * 2 + 2
    t = plan.totals
    assert (t.trainable_after, t.held_after, t.in_variables_after) == (
        everything - held, held, everything)
    text = plan_table(plan).splitlines()
    assert [line.split() for line in text if line.startswith("in trainable variables")] == [
        ["in", "trainable", "variables", f"{everything:,}", "->", f"{everything:,}"]]
    assert (f"trainable variables hold {everything:,} parameters; {held:,} of them are frozen "
            f"entries kept by constraints (Keras's model.trainable_weights counts them, the "
            f"trainable params above do not)") in text
    # Where the two counts agree, one count only.
    plain = plan_table(plan_spec(surgery.parse("freeze head"), _tree_with_parts()))
    assert "in trainable variables" not in plain and "frozen entries" not in plain


def test_summary_groups_runs_by_name_prefix_nested_models_and_composite_layers():
    tree = LayerTree.from_dict({"name": "m", "layers": [
        "input_layer:InputLayer", "conv1_pad:ZeroPadding2D", "conv1_conv:Conv2D",
        "pool1_pad:ZeroPadding2D", "pool1_pool:MaxPooling2D",
        "conv4_block1_1_conv:Conv2D", "conv4_block1_out:Activation", "conv4_block2_1_conv:Conv2D",
        {"name": "base.v2", "layers": ["a:Dense", "b:Dense"]},
        {"name": "mha", "class": "MultiHeadAttention", "kind": "composite",
         "layers": ["query:EinsumDense", "key:EinsumDense"]},
        "predictions:Dense", "head.v1_a:Dense", "head.v1_b:Dense", "conv1_extra:Dense"]})
    plan = plan_spec(surgery.parse("freeze all\nunfreeze predictions, mha/key"), tree)
    lines = block_table(plan).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line and line[0] != " "
            and not line.startswith(("trainable", "non-", "total", "units", "note"))}
    # A prefix that needs quoting, or whose glob would match layers outside the run (conv1_
    # again at the end), is written as the run's range.
    assert list(rows) == ["input_layer", "conv1_pad..conv1_conv", "pool1_*", "conv4_block*",
                          '"base.v2"', "mha", "predictions", '"head.v1_a".."head.v1_b"',
                          "conv1_extra"]
    # kind, units, frozen, changed
    assert rows["conv4_block*"][:6] == ["run", "of", "3", "3", "3", "3"]
    assert rows['"base.v2"'][:4] == ["model", "2", "2", "2"]
    assert rows["mha"][:4] == ["composite", "2", "1", "1"]
    assert rows["predictions"][:4] == ["layer", "1", "0", "0"]
    changed = block_table(plan, changed_only=True)
    assert "predictions" not in changed and "mha" in changed
    # Every block line's selector names exactly its layers, and the units add up.
    top = [n.name for n in tree.root.children]
    seen = []
    for selector in rows:
        frozen = plan_spec(surgery.parse(f"freeze {selector}"), tree)
        seen += [lp.path.split("/")[0] for lp in frozen.layers
                 if "/" not in lp.path and not lp.after]
    assert seen == top


def test_seed_example3_comment_quotes_the_seed_loop():
    # The seed (Example 3): `if i < num_freeze_layers: ... trainable = False` else True; the
    # first ten are frozen, as the spec's `freeze layers[0:10]` does.
    text = (ROOT / "specs" / "seed_example3_first_ten.frz").read_text()
    comment = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"if i < num_freeze_layers:\s+base_model\.layers\[i\]\.trainable = False"
                     r"\s+else:\s+base_model\.layers\[i\]\.trainable = True", comment)
    assert "trainable = i < 10" not in comment
    assert "freeze layers[0:10]" in text


def test_the_demo_builds_its_model_once_as_a_file_target():
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^DEMO_MODEL := (\S+)$", makefile, re.M).group(1)
    assert target.startswith("build/") and target.endswith(".keras")
    demo = re.search(r"^demo: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert demo.group(1).strip() == "$(DEMO_MODEL)"
    assert "keras.applications" not in demo.group(2)  # plan and apply read the saved file
    assert demo.group(2).count("$(DEMO_MODEL)") == 2
    assert re.search(r"^\$\(DEMO_MODEL\): \| \$\(STAMP\)$", makefile, re.M)


# --- real models ----------------------------------------------------------------------------------


def _tutorial_classifier(keras):
    """The TensorFlow transfer-learning tutorial's classifier, 6 top-level layers around the
    nested MobileNetV2: input, preprocessing (as a Rescaling layer), base, pooling, dropout,
    head."""
    base = keras.applications.MobileNetV2(input_shape=TUTORIAL_SHAPE, include_top=False,
                                          weights=None)
    inputs = keras.Input(shape=TUTORIAL_SHAPE)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs, name="classifier"), base


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """(the classifier, its base, the classifier saved as a .keras file)."""
    import keras

    keras.backend.clear_session()
    model, base = _tutorial_classifier(keras)
    path = tmp_path_factory.mktemp("tutorial") / "classifier.keras"
    model.save(path)
    return model, base, path


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    """keras.applications.ResNet50(weights=None), built once and saved."""
    import keras

    keras.backend.clear_session()
    model = keras.applications.ResNet50(weights=None)
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.keras"
    model.save(path)
    return model, path


@pytest.mark.slow
def test_the_tutorials_slice_trap_is_an_error_with_the_nested_path(tutorial, tmp_path, capsys):
    model, base, path = tutorial
    assert len(model.layers) == 6 and len(base.layers) == 154
    assert base.name == "mobilenetv2_1.00_160"
    spec = tmp_path / "tutorial.frz"
    spec.write_text("# fine_tune_at = 100, written at the wrong level\nfreeze layers[:100]\n")
    before = path.read_bytes()
    message = ("layers[:100] reaches past the end: the model has 6 layers here; "
               "'mobilenetv2_1.00_160' has 154: did you mean 'mobilenetv2*/layers[:100]'?")
    for args in (("plan", spec, path), ("apply", spec, path, "-o", tmp_path / "out.keras")):
        assert run(*args) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [
            f"{spec}:2:8: error: {message}", "  freeze layers[:100]", "         ^"]
        assert captured.out == ""
    assert not (tmp_path / "out.keras").exists() and path.read_bytes() == before
    assert run("lint", spec, "--model", path) == 1
    assert f"{spec}:2:8: error: {message}" in capsys.readouterr().err

    # The suggestion, followed, is the tutorial's own loop:
    #   for layer in base_model.layers[:fine_tune_at]: layer.trainable = False
    spec.write_text("freeze mobilenetv2*/layers[:100]\n")
    plan = surgery.plan(model, str(spec))
    frozen = {lp.path for lp in plan.layers if not lp.layer.children and not lp.after}
    assert frozen == {f"{base.name}/{layer.name}" for layer in base.layers[:100]}
    assert plan.by_path["head"].after is True

    # Python's semantics inside the range: the top level's 6 layers, and negative bounds clamp.
    spec.write_text("freeze layers[:6]\n")
    assert run("plan", spec, path, "--summary") == 0
    assert "trainable params" in capsys.readouterr().out
    spec.write_text("freeze layers[-100:-1]\n")
    plan = plan_spec(surgery.load_spec(spec), surgery.plan(model, "").tree)
    assert [lp.path for lp in plan.layers if "/" not in lp.path and not lp.after] == [
        layer.name for layer in model.layers[-100:-1]]


@pytest.mark.slow
def test_an_application_call_builds_the_real_architecture(capsys):
    import keras

    from surgery.engines import live

    source = ("keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, "
              "include_top=False, pooling='avg', weights=None)")
    built = live.load(source)
    keras.backend.clear_session()
    direct = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35,
                                            include_top=False, pooling="avg", weights=None)

    def described(m):
        # Keras numbers the names it makes up (input_layer_1, global_average_pooling2d_1) per
        # process: those are compared without the number.
        auto = ("InputLayer", "GlobalAveragePooling2D")
        return [(re.sub(r"_\d+$", "", layer.name) if type(layer).__name__ in auto else layer.name,
                 type(layer).__name__, layer.count_params()) for layer in m.layers]

    assert built.name == direct.name == "mobilenetv2_0.35_96"
    assert described(built) == described(direct)
    assert [tuple(w.shape) for w in built.weights] == [tuple(w.shape) for w in direct.weights]
    assert built.output_shape == direct.output_shape == (None, 1280)

    # The command line takes the same text: show counts every parameter Keras counts.
    assert run("show", "-q", source) == 0
    out = capsys.readouterr().out
    assert f"total params: {direct.count_params():,}" in out.splitlines()


@pytest.mark.slow
def test_plan_changed_and_summary_on_resnet50(resnet50, tmp_path, capsys):
    import keras

    model, path = resnet50
    spec = tmp_path / "finetune.frz"
    spec.write_text("freeze all\nunfreeze conv5_*, predictions\nbatchnorm frozen\n")
    # The recipe's own loop, on the names: what it changes from the all-trainable model.
    bn = {l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    trains = {l.name for l in model.layers
              if (l.name.startswith("conv5_") or l.name == "predictions") and l.name not in bn}
    changed = [l.name for l in model.layers if l.name not in trains]

    assert run("plan", spec, path, "--changed") == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:out.index("")]]
    assert [r[1] for r in rows] == changed
    assert all(r[4:6] == ["trainable", "frozen"] and r[6] == "*" for r in rows)
    assert f"* state changed by the spec ({len(changed)} of {len(model.layers)} layers shown)" \
        in out

    assert run("plan", spec, path, "--summary") == 0
    out = capsys.readouterr().out.splitlines()
    table = [line.split() for line in out[2:out.index("")]]
    blocks = {r[0]: r for r in table}
    assert list(blocks) == ["input_layer", "conv1_*", "pool1_*", "conv2_block*", "conv3_block*",
                            "conv4_block*", "conv5_block*", "avg_pool", "predictions"]
    for stage in ("conv2", "conv3", "conv4", "conv5"):
        names = [l.name for l in model.layers if l.name.startswith(stage + "_")]
        row = blocks[f"{stage}_block*"]
        # kind ("run of N"), units, frozen, changed
        assert row[1:6] == ["run", "of", str(len(names)), str(len(names)),
                            str(sum(1 for n in names if n not in trains))], stage
        frozen = sum(1 for n in names if n not in trains)
        assert row[5] == str(frozen) and row[6] == str(frozen)
    assert sum(int(r[3] if r[1] == "run" else r[2]) for r in table) == len(model.layers)
    assert run("plan", spec, path, "--summary", "--changed") == 0
    assert "predictions" not in capsys.readouterr().out.split("\n\n")[0]


@pytest.mark.slow
def test_the_readme_yaml_example_lints_clean_on_resnet50(resnet50, tmp_path, capsys):
    _, path = resnet50
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    spec = tmp_path / "example.yaml"
    spec.write_text(first)
    assert run("lint", spec, "--model", path) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_diff_spec_says_the_plans_agree(tutorial, tmp_path, capsys):
    model, base, path = tutorial
    frozen_base = tmp_path / "frozen_base.keras"
    spec = tmp_path / "base.frz"
    spec.write_text("freeze mobilenetv2*\n")
    assert run("apply", spec, path, "-o", frozen_base) == 0
    capsys.readouterr()
    # A spec that decides every layer gives both models the same plan.
    spec.write_text("freeze all\nunfreeze head\n")
    assert run("diff", "--spec", spec, path, frozen_base) == 0
    layers = len(surgery.plan(model, "").layers)
    assert capsys.readouterr().out == f"the two plans agree ({layers} layers)\n"
    # One that leaves the base to each model's own state does not.
    spec.write_text("freeze head\n")
    assert run("diff", "--spec", spec, path, frozen_base) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"~ {base.name}: trainable -> frozen" in out
    assert not any(line.startswith("model:") for line in out)


@pytest.mark.slow
def test_both_counts_match_keras_under_sub_layer_freezing(tmp_path, capsys):
    import keras

    keras.backend.clear_session()
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    path = tmp_path / "small.keras"
    model.save(path)
    spec = tmp_path / "parts.frz"
    spec.write_text("freeze conv.filters[0:6]\nfreeze head.kernel\n")

    surgery.apply(model, str(spec))
    keras_count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    held = 3 * 3 * 3 * 6 + 6  # the kernel slice and bias entries of 6 filters
    assert run("plan", spec, path) == 0
    out = capsys.readouterr().out.splitlines()
    trainable = next(line for line in out if line.startswith("trainable params"))
    assert trainable.endswith(f"-> {keras_count - held:,}")
    assert next(line for line in out if line.startswith("in trainable variables")).endswith(
        f"-> {keras_count:,}")
    assert (f"trainable variables hold {keras_count:,} parameters; {held:,} of them are frozen "
            "entries kept by constraints (Keras's model.trainable_weights counts them, the "
            "trainable params above do not)") in out


@pytest.mark.slow
def test_progress_lines_when_not_a_terminal_and_silence_with_quiet(tmp_path):
    import keras

    keras.backend.clear_session()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs))
    path = tmp_path / "small.keras"
    model.save(path)
    spec = tmp_path / "s.frz"
    spec.write_text("freeze head\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "out.keras"
    loud = subprocess.run([SURGERY, "apply", str(spec), str(path), "-o", str(out),
                           "--engine", "keras"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert loud.returncode == 0, loud.stderr
    steps = [line for line in loud.stderr.splitlines() if line.startswith("surgery: ")]
    assert steps == [f"surgery: loading {path} through Keras ...", f"surgery: saving {out} ..."]
    quiet = subprocess.run([SURGERY, "apply", str(spec), str(path), "-o", str(out), "--force",
                            "--engine", "keras", "-q"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("surgery: ")]
    assert quiet.stdout == loud.stdout  # results on stdout either way
    # The archive engine reads without Keras: a small model has no slow step to show.
    fast = subprocess.run([SURGERY, "plan", str(spec), str(path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert fast.returncode == 0 and fast.stderr == "", fast.stderr


@pytest.mark.slow
def test_a_large_archive_copy_is_a_step(tmp_path, monkeypatch):
    import keras

    from surgery import modelfile
    from surgery.progress import Progress

    class Recorded(Progress):
        def __init__(self):
            self.steps = []

        def step(self, name):
            self.steps.append(name)
            return super().step(name)

    keras.backend.clear_session()
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs)).save(tmp_path / "m.keras")
    small, large = Recorded(), Recorded()
    surgery.apply_file("freeze head", tmp_path / "m.keras", tmp_path / "a.keras", progress=small)
    assert small.steps == []  # a small copy takes milliseconds
    monkeypatch.setattr(modelfile, "_LARGE_ARCHIVE", 1)  # every archive counts as large
    done = surgery.apply_file("freeze head", tmp_path / "m.keras", tmp_path / "b.keras",
                              progress=large)
    assert done.engine == "archive"
    assert large.steps == [f"copying {tmp_path / 'm.keras'} to {tmp_path / 'b.keras'}"]
