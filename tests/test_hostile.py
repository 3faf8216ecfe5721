"""Hostile inputs, family by family (issue 14): each one refused in bounded time and memory.

Every case is crafted here from real small models saved by Keras (built once, in a subprocess)
or from spec text, and run as the real `surgery` command in a subprocess whose limits the
harness sets: an address-space limit (RLIMIT_AS) and a wall-clock timeout, so a case that hangs
or balloons fails the test instead of the machine. Each must exit 2 with a one-line message
that says what is wrong, no traceback and no "internal error", write nothing, and leave its
inputs byte for byte as they were. The commands run with ``--engine archive`` where they read
a model: no TensorFlow, so the memory limit measures surgery, not TensorFlow's reservations.

The families (what the issue's review found, and what earlier fixes hold):

* regexes: a pattern that backtracks for minutes is stopped at its time bound, in plan, apply
  and lint --model; one whose counted repeats unroll to gigabytes is refused as it is parsed;
* sizes of specs: a schedule too large to plan (a spec past the token limit, a million
  statements on one line, is tests/test_fuzz.py's, under the same 1 GiB, marked slow);
* weights against the config: a shape the config contradicts, for each class it declares, and a
  dtype (the config's policy changed, or a weight stored in another precision or as integers);
* zip entries: a wrong CRC-32 in a deflated entry, the weights' or another's;
* structure taken on trust: config.json nested 100,000 deep or inflating past its cap, YAML
  keys written twice, manifests of the wrong shape, an output that is an input;
* paths that are no regular file: a spec, a manifest or a model that is /dev/zero or a pipe;
* spec text of every size up to its bound, and past it; config fields that size weights in a
  form Keras cannot build them from; Keras itself, where the memory limit keeps it from loading.

Runtime: 37 s on one core (the models' build is 9 s of it; each regex case runs into its 1 s
bound three times, about 2 s; the largest spec, 8 million escapes, 8 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

SURGERY = str(Path(sys.executable).parent / "surgery")
SECONDS = 60  # per command: every case here is refused in a few seconds
MEMORY = 1 << 30  # address space per command: 1 GiB

BUILD = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    os.chdir(sys.argv[1])
    inputs = keras.Input((6, 6, 3), name="x")
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(8, name="a" * 30 + "!")(h)  # a long name for backtracking regexes
    keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="small").save("small.keras")

    tokens = keras.Input((5,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(20, 6, name="embed")(tokens)
    e = keras.layers.LayerNormalization(name="norm")(e)
    keras.Model(tokens, e, name="text").save("text.keras")
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile-models")
    subprocess.run([sys.executable, "-c", BUILD, str(folder)], check=True, capture_output=True)
    return folder


@pytest.fixture
def work(tmp_path, models) -> Path:
    for name in ("small.keras", "text.keras"):
        (tmp_path / name).write_bytes((models / name).read_bytes())
    (tmp_path / "freeze.frz").write_text("freeze conv\n")
    return tmp_path


# --- the harness -----------------------------------------------------------------------------


def _limits(memory: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return apply


def _snapshot(folder: Path) -> dict[str, str]:
    # A link to a device or a pipe is recorded as such: reading /dev/zero would never end.
    return {p.name: f"-> {os.readlink(p)}" if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
            for p in sorted(folder.iterdir())}


def refused(folder: Path, *args: str, says: str, memory: int = MEMORY) -> str:
    """Run ``surgery ARGS`` in ``folder`` under the limits; assert it refuses the input as it
    should: exit 2, ``says`` in a message without a traceback, the folder as it was."""
    before = _snapshot(folder)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SURGERY_DEBUG", None)
    proc = subprocess.run([SURGERY, *args], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=SECONDS, preexec_fn=_limits(memory))
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert "MemoryError" not in err, err[-2000:]
    assert says in err, err[-2000:]
    assert _snapshot(folder) == before  # nothing written, nothing changed
    return err


# --- crafting archives -------------------------------------------------------------------------


def rewrite(src: Path, dst: Path, change=None, deflate=()) -> None:
    """``src`` copied entry by entry to ``dst``: ``change(name, data)`` gives each entry's new
    bytes; the entries named in ``deflate`` are compressed."""
    with zipfile.ZipFile(src) as zin:
        entries = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in entries:
            data = change(name, data) if change else data
            zout.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name in deflate
                          else zipfile.ZIP_STORED)


def with_config(src: Path, dst: Path, edit) -> None:
    """``src`` with ``edit(config)`` applied to its parsed config.json."""
    def change(name, data):
        if name != "config.json":
            return data
        cfg = json.loads(data)
        edit(cfg)
        return json.dumps(cfg).encode()
    rewrite(src, dst, change)


def layer_entry(cfg: dict, name: str) -> dict:
    return next(e for e in cfg["config"]["layers"] if e["config"]["name"] == name)


def wrong_crc(src: Path, dst: Path, entry: str) -> None:
    """``src`` with ``entry`` deflated and its content altered by one byte, while the zip
    records the CRC-32 of the original content: a valid deflate stream with a wrong CRC."""
    with zipfile.ZipFile(src) as zin:
        original = zin.read(entry)
    altered = original[:-1] + bytes([original[-1] ^ 0x01])
    rewrite(src, dst, lambda name, data: altered if name == entry else data, deflate=(entry,))
    raw = dst.read_bytes()
    good = zipfile.crc32(original).to_bytes(4, "little")
    bad = zipfile.crc32(altered).to_bytes(4, "little")
    assert raw.count(bad) == 2  # the local header and the central directory
    dst.write_bytes(raw.replace(bad, good))


def bomb_config(src: Path, dst: Path, size: int) -> None:
    """config.json inflating to ``size`` bytes of valid JSON from a few kilobytes."""
    def change(name, data):
        return b'{"pad": "' + b" " * size + b'"}' if name == "config.json" else data
    rewrite(src, dst, change, deflate=("config.json",))


# --- regexes -----------------------------------------------------------------------------------

SLOW = "freeze head\nfreeze /(a|a)+/\n"  # the regex package gets past '(a+)+'; not this


@pytest.mark.parametrize("command", [
    ["plan", "slow.frz", "small.keras", "--engine", "archive"],
    ["apply", "slow.frz", "small.keras", "--engine", "archive", "-o", "out.keras"],
    ["lint", "slow.frz", "--model", "small.keras", "--engine", "archive"],
], ids=["plan", "apply", "lint-model"])
def test_a_backtracking_regex_is_stopped_at_its_bound(work, command):
    (work / "slow.frz").write_text(SLOW)
    err = refused(work, *command, says="/(a|a)+/ is too slow")
    assert err.startswith("slow.frz:2:8: error:")


def test_lint_warns_about_nested_repeats_from_the_text(work):
    (work / "nested.frz").write_text("freeze /(a+)+/\n")
    proc = subprocess.run([SURGERY, "lint", "nested.frz"], cwd=work, capture_output=True,
                          text=True, timeout=SECONDS, preexec_fn=_limits(MEMORY))
    assert proc.returncode == 1, proc.stderr
    assert "nested.frz:1:8: warning: /(a+)+/ repeats a group that holds a repeated part" in \
        proc.stderr


def test_a_regex_that_unrolls_past_any_name_is_refused_as_parsed(work):
    # regex.compile takes all the memory there is for this one.
    (work / "huge.frz").write_text("freeze /(?:a{65535}){65535}/\n")
    refused(work, "plan", "huge.frz", "small.keras", "--engine", "archive",
            says="regular expression is too large")


# --- sizes of specs ----------------------------------------------------------------------------


MAX_CHARS = 16 * 2**20  # surgery/parse.py's bound, written out: the test must not follow it


@pytest.mark.parametrize("name, text, says", [
    ("past.frz", "freeze a\n" + " " * MAX_CHARS,
     "past.frz:1:1: error: the spec is too large: 16,777,225 characters"),
    ("past.yaml", "rules:\n  - freeze: a\n" + " " * MAX_CHARS,
     "past.yaml:1:1: error: the spec is too large"),
    # Within the bound, the worst for the lexer: one token's regex once kept ~100 bytes a
    # repetition (a gigabyte for these); a line break each, and a glob of bracket classes.
    ("breaks.frz", "freeze zz\n" + "\n" * (MAX_CHARS - 20),
     "breaks.frz:1:8: error: 'zz' matches no layer"),
    ("escapes.frz", 'freeze "' + "\\a" * (MAX_CHARS // 2 - 10) + '"', "matches no layer"),
    ("classes.frz", "freeze " + "[a]" * (MAX_CHARS // 3 - 3),
     "classes.frz:1:8: error: the glob is too large: more than 100,000 characters"),
], ids=["past-frz", "past-yaml", "line-breaks", "escapes", "glob"])
def test_a_spec_of_any_size_is_read_within_the_bounds(work, name, text, says):
    (work / name).write_text(text)
    refused(work, "plan", name, "small.keras", "--engine", "archive", says=says)


def test_a_schedule_too_large_to_plan_is_refused_at_its_header(work):
    (work / "phases.frz").write_text("".join(
        f"at epoch {i + 1}:\n  {'freeze' if i % 2 else 'unfreeze'} head\n" for i in range(1000)))
    refused(work, "plan", "phases.frz", "small.keras", "--engine", "archive",
            says="the schedule is too large to plan")


# --- weights against the config ------------------------------------------------------------------


def _units(cfg):
    layer_entry(cfg, "head")["config"]["units"] = 3


def _filters(cfg):
    layer_entry(cfg, "conv")["config"]["filters"] = 5


def _bn_input(cfg):
    layer_entry(cfg, "bn")["build_config"]["input_shape"][-1] = 6


def _dense_input(cfg):
    layer_entry(cfg, "head")["build_config"]["input_shape"][-1] = 9


def _vocabulary(cfg):
    layer_entry(cfg, "embed")["config"]["input_dim"] = 21


def _norm_input(cfg):
    layer_entry(cfg, "norm")["build_config"]["input_shape"][-1] = 7


CONTRADICTIONS = [
    ("small.keras", _units, "layer 'head' (Dense): model.weights.h5 holds its kernel as (8, 2)"),
    ("small.keras", _filters, "layer 'conv' (Conv2D): model.weights.h5 holds its kernel as "
                              "(3, 3, 3, 4)"),
    ("small.keras", _bn_input, "layer 'bn' (BatchNormalization): model.weights.h5 holds its "
                               "gamma as (4,)"),
    ("small.keras", _dense_input, "layer 'head' (Dense): model.weights.h5 holds its kernel"),
    ("text.keras", _vocabulary, "layer 'embed' (Embedding): model.weights.h5 holds its "
                                "embeddings as (20, 6)"),
    ("text.keras", _norm_input, "layer 'norm' (LayerNormalization)"),
]


@pytest.mark.parametrize("model, edit, says", CONTRADICTIONS,
                         ids=[e.__name__.strip("_") for _, e, _ in CONTRADICTIONS])
@pytest.mark.parametrize("command", ["show", "plan", "apply"])
def test_weights_the_config_contradicts_are_refused(work, model, edit, says, command):
    with_config(work / model, work / "odd.keras", edit)
    args = {"show": ["show", "odd.keras"], "plan": ["plan", "freeze.frz", "odd.keras"],
            "apply": ["apply", "freeze.frz", "odd.keras", "-o", "out.keras"]}[command]
    err = refused(work, *args, "--engine", "archive", says=says)
    assert "the weights do not belong to this architecture" in err


def _field(layer: str, field: str, value):
    def edit(cfg):
        layer_entry(cfg, layer)["config"][field] = value
    return edit


@pytest.mark.parametrize("model, layer, field, value", [
    ("small.keras", "head", "units", "2"),
    ("small.keras", "head", "units", True),
    ("small.keras", "head", "units", -2),
    ("small.keras", "head", "units", 2.0),
    ("small.keras", "conv", "filters", "4"),
    ("small.keras", "conv", "kernel_size", [3, "3"]),
    ("text.keras", "embed", "input_dim", 0),
], ids=["str", "bool", "negative", "float", "filters", "kernel-size", "zero"])
def test_a_weight_size_keras_cannot_build_from_is_refused(work, model, layer, field, value):
    # Keras refuses to load each of these; copied, the output would be refused as well, after
    # an apply that said it wrote it.
    with_config(work / model, work / "odd.keras", _field(layer, field, value))
    shown = json.dumps(value[1] if isinstance(value, list) else value)  # the element at fault
    err = refused(work, "apply", "freeze.frz", "odd.keras", "-o", "out.keras",
                  "--engine", "archive", says=f"config.json has {field} {shown}, where Keras "
                                              f"needs a positive whole number")
    assert f"layer '{layer}'" in err


def _policy(layer: str, name: str):
    def edit(cfg):
        layer_entry(cfg, layer)["config"]["dtype"]["config"]["name"] = name
    edit.__name__ = f"_{layer}_{name}"
    return edit


def _stored_as(h5_path: str, dtype: str):
    """``model.weights.h5`` with the dataset at ``h5_path`` stored as ``dtype`` (bfloat16 as
    Keras stores it: opaque 2-byte items marked so), values cast."""
    def change(name, data):
        if name != "model.weights.h5":
            return data
        import io

        import h5py
        import numpy as np

        buffer = io.BytesIO(data)
        with h5py.File(buffer, "a") as f:
            group, _, key = h5_path.rpartition("/")
            values = f[h5_path][()]
            del f[h5_path]
            if dtype == "bfloat16":
                import ml_dtypes

                ds = f[group].create_dataset(key, data=values.astype(ml_dtypes.bfloat16))
                ds.attrs["dtype"] = "bfloat16"
            else:
                f[group].create_dataset(key, data=values.astype(np.dtype(dtype)))
        return buffer.getvalue()
    change.__name__ = f"{h5_path.split('/')[1]}_{dtype}"
    return change


DTYPES = [  # (model, how the file is crafted, what the error says)
    ("small.keras", lambda s, d: with_config(s, d, _policy("head", "float64")),
     "layer 'head' (Dense): model.weights.h5 holds its kernel as float32, where config.json "
     "makes it float64"),
    ("small.keras", lambda s, d: with_config(s, d, _policy("bn", "mixed_bfloat16")) or
     rewrite(d, d, _stored_as("layers/batch_normalization/vars/2", "float16")),
     "layer 'bn' (BatchNormalization): model.weights.h5 holds its moving_mean as float16, "
     "where config.json makes it float32"),
    ("small.keras", lambda s, d: rewrite(s, d, _stored_as("layers/conv2d/vars/1", "bfloat16")),
     "layer 'conv' (Conv2D): model.weights.h5 holds its bias as bfloat16"),
    ("text.keras", lambda s, d: rewrite(s, d, _stored_as("layers/embedding/vars/0", "int64")),
     "layer 'embed' (Embedding): model.weights.h5 holds its embeddings as int64"),
    ("text.keras", lambda s, d: rewrite(s, d, _stored_as("layers/layer_normalization/vars/1",
                                                         "float64")),
     "layer 'norm' (LayerNormalization): model.weights.h5 holds its beta as float64"),
]


@pytest.mark.parametrize("model, craft, says", DTYPES,
                         ids=["policy", "mixed-policy", "bfloat16", "int64", "float64"])
@pytest.mark.parametrize("command", ["show", "plan", "apply"])
def test_weights_stored_in_another_dtype_than_the_config_are_refused(work, model, craft, says,
                                                                      command):
    # Keras would load each of these, casting; the archive engine copies the bytes as they are,
    # so its output would hold what its config does not say.
    craft(work / model, work / "odd.keras")
    args = {"show": ["show", "odd.keras"], "plan": ["plan", "freeze.frz", "odd.keras"],
            "apply": ["apply", "freeze.frz", "odd.keras", "-o", "out.keras"]}[command]
    err = refused(work, *args, "--engine", "archive", says=says)
    assert "the weights do not match the config" in err


# --- zip entries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry, commands", [
    ("model.weights.h5", ("show", "plan", "apply")),
    ("metadata.json", ("apply",)),  # only the copy reads it
])
def test_a_deflated_entry_with_a_wrong_crc_is_refused(work, entry, commands):
    wrong_crc(work / "small.keras", work / "crc.keras", entry)
    for command in commands:
        args = {"show": ["show", "crc.keras"], "plan": ["plan", "freeze.frz", "crc.keras"],
                "apply": ["apply", "freeze.frz", "crc.keras", "-o", "out.keras"]}[command]
        refused(work, *args, "--engine", "archive", says="CRC-32")


def test_a_deflated_archive_that_is_sound_is_copied(work):
    rewrite(work / "small.keras", work / "deflated.keras",
            deflate=("config.json", "model.weights.h5", "metadata.json"))
    proc = subprocess.run([SURGERY, "apply", "freeze.frz", "deflated.keras", "-o", "out.keras",
                           "--engine", "archive"], cwd=work, capture_output=True, text=True,
                          timeout=SECONDS, preexec_fn=_limits(MEMORY))
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(work / "out.keras") as z:
        assert z.testzip() is None


# --- structure taken on trust --------------------------------------------------------------------


def test_a_config_nested_100000_deep_is_refused(work):
    rewrite(work / "small.keras", work / "deep.keras",
            lambda name, data: b"[" * 100_000 + b"]" * 100_000 if name == "config.json" else data)
    refused(work, "show", "deep.keras", "--engine", "archive", says="config.json nests deeper")


def test_a_config_that_inflates_past_its_cap_is_refused(work):
    bomb_config(work / "small.keras", work / "bomb.keras", 80 << 20)
    assert (work / "bomb.keras").stat().st_size < 1 << 20
    refused(work, "show", "bomb.keras", "--engine", "archive",
            says="more than a model config beside these weights holds")


def test_yaml_keys_written_twice_are_refused(work):
    (work / "twice.yaml").write_text("rules:\n  - freeze: conv\nrules:\n  - freeze: head\n")
    refused(work, "plan", "twice.yaml", "small.keras", "--engine", "archive",
            says="the key 'rules' is written twice")


@pytest.mark.parametrize("text", [
    '{"layers": "x"}',
    "[" * 100_000 + "]" * 100_000,
    '{"format": 1, "layers": {"a": 1}}',
], ids=["layers-a-string", "deep", "layers-a-dict"])
def test_a_malformed_manifest_is_refused(work, text):
    (work / "m.json").write_text(text)
    refused(work, "verify", "m.json", "small.keras", "--engine", "archive", says="m.json")


def test_the_manifest_cannot_overwrite_the_spec(work):
    refused(work, "apply", "freeze.frz", "small.keras", "-o", "out.keras", "--manifest",
            "freeze.frz", "--force", "--engine", "archive", says="would overwrite the spec")


# --- paths that are no regular file: endless, or waiting for a writer ------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
@pytest.mark.parametrize("args, says", [
    (["fmt", "zero.frz"], "zero.frz:1:1: error: the file is larger than 64 MiB"),
    (["compile", "zero.yaml"], "zero.yaml:1:1: error: the file is larger than 64 MiB"),
    (["plan", "zero.frz", "small.keras"], "zero.frz:1:1: error: the file is larger than 64 MiB"),
    (["verify", "zero.json", "small.keras"], "zero.json: not a manifest: larger than 64 MiB"),
    (["diff", "zero.json", "zero.json"], "zero.json: not a manifest: larger than 64 MiB"),
    (["show", "zero.keras"], "zero.keras: is not a regular file"),
    (["show", "pipe.keras", "--engine", "keras"], "pipe.keras: is not a regular file"),
    (["apply", "freeze.frz", "zero.keras", "-o", "out.keras"], "zero.keras: is not a regular"),
    (["plan", "freeze.frz", "pipe.h5"], "pipe.h5: is not a regular file"),
], ids=["fmt", "compile", "plan", "verify", "diff", "show", "show-keras", "apply",
        "plan-h5"])
def test_an_endless_input_is_read_up_to_its_bound(work, args, says):
    # Every name here leads to /dev/zero or to a pipe nobody writes to: a spec or a manifest
    # is read up to its bound (a pipe is a fine spec: /dev/stdin), a model never (it is read
    # by seeking), and Keras is not even imported for it. (`lint` says the same, exit 1, as
    # for any spec it finds wrong.)
    for name in ("zero.frz", "zero.yaml", "zero.json", "zero.keras"):
        (work / name).symlink_to("/dev/zero")
    for name in ("pipe.keras", "pipe.h5"):
        os.mkfifo(work / name)
    refused(work, *args, says=says)



# --- too little memory for Keras itself -----------------------------------------------------------


def test_keras_that_cannot_be_imported_under_the_limit_is_one_clear_line(work):
    # The harness's 1 GiB of address space is too little for TensorFlow's libraries here: a
    # command that needs Keras says so in one line, never as an internal error. (Where they do
    # fit, the command simply works.)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SURGERY_DEBUG", None)
    proc = subprocess.run([SURGERY, "show", "small.keras", "--engine", "keras"], cwd=work,
                          capture_output=True, text=True, env=env, timeout=SECONDS,
                          preexec_fn=_limits(MEMORY))
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert "head" in proc.stdout
    else:
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[-1].startswith(
            "surgery: error: small.keras: loading it needs Keras, and "), proc.stderr
