"""The archive engine (surgery/engines/archive/) against the live engine.

For every architecture: the LayerTree read from the `.keras` archive equals the one the live
engine reads from the model Keras loads; for several specs, both engines give byte-identical
manifests, and their outputs (the live one saved by `model.save`, the archive one written without
Keras) load in Keras to the same flags, the same `trainable_weights` and bit-identical weights.
Plus: byte-reproducible outputs, no TensorFlow on the archive path, and every refusal
(`ArchiveUnsupported`) for what only Keras can read.

Each live load starts with `keras.backend.clear_session()`: a fresh process's name counters, which
number variables created without a name (ConvNeXt's LayerScale) as the archive engine does and as
`surgery apply` sees them (one model per process).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

import surgery
from conftest import layer_flags, trainable_paths
from surgery.engines import archive
from surgery.engines.archive import ArchiveUnsupported, zip_copy
from surgery.engines.archive.rewrite import take
from surgery.manifest import build_manifest, environment_versions, sha256_file
from surgery.verify import verify
from surgery.plan import plan_spec

SMALL = (32, 32, 3)


# --- architectures -------------------------------------------------------------------------------


def _zoo_sequential(keras):
    L = keras.layers
    return keras.Sequential([
        keras.Input((16,)), L.Dense(8, name="fc1"), L.BatchNormalization(center=False, name="bn1"),
        L.PReLU(name="prelu"), L.Dense(8, use_bias=False, name="fc2"),
        L.LayerNormalization(name="ln"), L.Dropout(0.1, name="drop"), L.Dense(2, name="out"),
    ], name="zoo_sequential")


def _zoo_functional(keras):
    """Every class of the weight-name table that keras.applications does not use, a keras.ops
    call in the graph (an operation, not a layer), a layer called twice, a nested Sequential, two
    inputs."""
    L = keras.layers
    x = keras.Input((12, 6), name="signal")
    h = L.Conv1D(4, 3, name="conv")(x)
    h = L.SeparableConv1D(4, 3, name="sep")(h)
    h = L.DepthwiseConv1D(3, name="dw")(h)
    h = L.Conv1DTranspose(4, 3, use_bias=False, name="convt")(h)
    h = L.GroupNormalization(groups=2, name="gn")(h)
    h = L.RMSNormalization(name="rms")(h)
    h = L.LayerNormalization(center=False, name="ln")(h)
    h = L.Normalization(axis=-1, name="norm")(h)
    h = L.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d", name="einsum")(h)
    h = keras.ops.add(h, 1.0)
    twice = L.Dense(5, name="twice")
    h = twice(twice(h))
    inner = keras.Sequential([keras.Input((8, 5)), L.Dense(3, name="inner_fc"),
                              L.BatchNormalization(name="inner_bn")], name="inner_seq")
    h = L.GlobalAveragePooling1D(name="pool")(inner(h))
    ids = keras.Input((4,), dtype="int32", name="ids")
    e = L.Flatten(name="flat")(L.Embedding(10, 3, name="embed")(ids))
    out = L.Dense(2, name="head")(L.Concatenate(name="cat")([h, e]))
    return keras.Model([x, ids], out, name="zoo")


def _app(name, **kw):
    def build(keras):
        return getattr(keras.applications, name)(weights=None, include_top=False,
                                                 input_shape=kw.get("input_shape", SMALL))
    return build


def _nested_mobilenet(keras):
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=SMALL)
    inputs = keras.Input(SMALL)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="classifier")


# Entries frozen inside eight layers of _zoo_functional (sub-layer freezing).
PARTS_SPEC = ("freeze conv.filters[0:2]\nfreeze sep.filters[1:3]\nfreeze dw.filters[::2]\n"
              "freeze einsum.units[0:2]\nfreeze inner_seq/inner_bn.gamma\nfreeze head.units[1]\n"
              "freeze convt.kernel\nfreeze ln.gamma")


@dataclass(frozen=True)
class Arch:
    build: object
    specs: tuple[str, ...]
    slow: bool = True


ARCHS = {
    "zoo_sequential": Arch(_zoo_sequential, (
        "freeze all\nunfreeze layers[-2:]",
        "freeze type:BatchNormalization, prelu",
        "freeze all",
        "freeze fc1\nbatchnorm affine",  # bn1 becomes surgery's AffineBatchNormalization
    ), slow=False),
    "zoo_functional": Arch(_zoo_functional, (
        "freeze all\nunfreeze head",
        "freeze inner_seq",
        "freeze **/type:BatchNormalization, twice, embed",
        "freeze inner_seq/inner_fc\nfreeze layers[0:6]",
        PARTS_SPEC,  # entries frozen inside eight layers: their values read from the weights
    ), slow=False),
    "VGG16": Arch(_app("VGG16"), (
        "freeze all\nunfreeze block5_*",
        "freeze layers[0:10]",
        "freeze block1_conv1.filters[::2]\nfreeze block5_conv3.filters[100:300]",
    ), slow=False),
    "MobileNetV2_nested": Arch(_nested_mobilenet, (
        "freeze mobilenetv2*/layers[:100]",
        "freeze all except **/block_16_*",
        "freeze mobilenetv2*",
        "freeze all except **/block_16_*\nbatchnorm affine",
        "freeze **/expanded_conv_depthwise.filters[0:4]\nfreeze head.units[1]\n"
        "freeze **/Conv1.kernel",
    ), slow=False),
    "ResNet50": Arch(_app("ResNet50"), (
        "freeze all\nunfreeze conv5_*",
        "freeze **/type:BatchNormalization",
    )),
    "MobileNetV2": Arch(_app("MobileNetV2"), (
        "freeze all\nunfreeze block_16_*, Conv_1, Conv_1_bn",
    )),
    "EfficientNetB0": Arch(_app("EfficientNetB0"), (
        "freeze all\nunfreeze block7a_*, top_*",
    )),
    "DenseNet121": Arch(_app("DenseNet121"), (
        "freeze all\nunfreeze conv5_block16_*, bn",
    )),
    "ConvNeXtTiny": Arch(_app("ConvNeXtTiny"), (
        "freeze all\nunfreeze convnext_tiny_stage_3_*",
        "freeze convnext_tiny_stem/layers[0]\nfreeze convnext_tiny_downsampling_block_0",
    )),
    "NASNetMobile": Arch(_app("NASNetMobile", input_shape=(224, 224, 3)), (
        "freeze all\nunfreeze layers[-60:]",
    )),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> path of that architecture saved by Keras, built once per module, on demand."""
    import keras

    folder = tmp_path_factory.mktemp("archives")
    paths: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in paths:
            keras.backend.clear_session()
            path = str(folder / f"{name}.keras")
            ARCHS[name].build(keras).save(path)
            paths[name] = path
        return paths[name]

    return get


def _load(path):
    import keras

    keras.backend.clear_session()  # see the module docstring
    return keras.models.load_model(path, compile=False)


def _first_difference(a, b):
    """The first field where two Layer trees differ, for a readable failure."""
    for f in ("name", "path", "cls", "index", "trainable", "weights", "container"):
        if getattr(a, f) != getattr(b, f):
            return f"{a.path or '<root>'}: {f}: {getattr(a, f)!r} != {getattr(b, f)!r}"
    if len(a.children) != len(b.children):
        return f"{a.path or '<root>'}: {len(a.children)} != {len(b.children)} children"
    for x, y in zip(a.children, b.children):
        found = _first_difference(x, y)
        if found:
            return found
    return None


def _assert_same_tree(archive_tree, live_tree):
    assert archive_tree.root == live_tree.root, _first_difference(archive_tree.root,
                                                                   live_tree.root)


def _manifest(plan, spec, *, src, sha, name, versions):
    return build_manifest(plan, spec, model_source=src, model_sha256=sha, model_name=name,
                          versions=versions, surgery_version=surgery.__version__)


def _state(model):
    return (layer_flags(model), trainable_paths(model),
            {v.path: v.numpy() for v in model.weights})


# --- the engines agree ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if a.slow else n
                                  for n, a in ARCHS.items()])
def test_engines_agree(name, saved, tmp_path):
    from surgery.engines import live

    src = saved(name)
    model = _load(src)
    live_tree, objects = live.describe(model)
    tree = archive.describe(src)
    _assert_same_tree(tree, live_tree)
    _assert_same_tree(archive.describe(src, h5="h5py"), live_tree)  # the other backend
    with archive.Opened(src) as opened:
        assert opened.name == model.name
    versions = environment_versions()
    source_sha = sha256_file(src)

    for i, text in enumerate(ARCHS[name].specs):
        spec = surgery.parse(text)
        live_plan = plan_spec(spec, live_tree)
        archive_plan = plan_spec(spec, tree)
        # The live model is reused across specs: `live.write` sets every flag from the plan.
        live.write(model, live_plan, objects)
        live_out = str(tmp_path / f"live{i}.keras")
        model.save(live_out)
        archive_out = str(tmp_path / f"archive{i}.keras")
        written = archive.write(src, archive_plan, archive_out)
        assert written == (sha256_file(archive_out), source_sha)

        m_live = _manifest(live_plan, spec, src=src, sha=source_sha, name=model.name,
                           versions=versions)
        m_arch = _manifest(archive_plan, spec, src=src, sha=written.source_sha256,
                           name=model.name, versions=versions)
        assert m_arch.to_json() == m_live.to_json(), text

        loaded_live = _load(live_out)
        flags_l, trainable_l, weights_l = _state(loaded_live)
        out_tree_live = live.describe(loaded_live)[0]
        loaded_arch = _load(archive_out)
        assert live.describe(loaded_arch)[0].root == out_tree_live.root  # classes too (affine)
        assert _constraints(loaded_arch) == _constraints(loaded_live), text  # values included
        flags_a, trainable_a, weights_a = _state(loaded_arch)
        assert flags_a == flags_l, text
        assert trainable_a == trainable_l, text
        assert weights_a.keys() == weights_l.keys()
        for key, value in weights_l.items():
            assert weights_a[key].dtype == value.dtype, key
            assert np.array_equal(weights_a[key], value), key
        # Reading the output back gives what Keras gives, and it trains what the manifest says.
        _assert_same_tree(archive.describe(archive_out), out_tree_live)
        assert verify(m_arch, archive.describe(archive_out)) == []
        # Only config.json changed: every other entry is the source's, byte for byte.
        with zipfile.ZipFile(src) as a, zipfile.ZipFile(archive_out) as b:
            assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
            for ia, ib in zip(a.infolist(), b.infolist()):
                assert ia.date_time == ib.date_time and ia.compress_type == ib.compress_type
                if ia.filename != "config.json":
                    assert (ia.CRC, ia.file_size) == (ib.CRC, ib.file_size)
        if i == 0:  # byte-reproducible
            again = archive.write(src, archive_plan, str(tmp_path / "again.keras"))
            assert again == written


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "float64", "mixed_float16",
                                    "mixed_bfloat16"])
def test_models_saved_in_any_float_policy_are_read_as_keras_loads_them(policy, tmp_path):
    # The dtype each weight is checked against (engines/archive/declared.py) is the one Keras
    # stores under that policy: the two engines see the same tree, with both HDF5 readers, and
    # a weight stored otherwise is refused (tests/test_hostile.py).
    import keras
    from surgery.engines import live

    keras.backend.clear_session()  # first: it resets the global policy too
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        paths = []
        for build in (_zoo_sequential, _zoo_functional):
            paths.append(str(tmp_path / f"{build.__name__}.keras"))
            build(keras).save(paths[-1])
    finally:
        keras.config.set_dtype_policy(previous)
    for path in paths:
        live_tree = live.describe(_load(path))[0]
        _assert_same_tree(archive.describe(path), live_tree)
        _assert_same_tree(archive.describe(path, h5="h5py"), live_tree)
    with zipfile.ZipFile(paths[1]) as z:  # the policy reached the layers the check covers
        assert z.read("config.json").count(f'"name": "{policy}"'.encode()) >= 10


def test_both_readers_name_a_dtype_alike(saved, tmp_path):
    src = saved("zoo_sequential")
    for dtype in ("float16", "float64", "int32", "uint8"):
        out = str(tmp_path / f"{dtype}.keras")
        _copy_replacing_weights(src, out, lambda f, dtype=dtype: _restore_as(f, dtype))
        messages = set()
        for backend in ("best", "h5py"):
            with pytest.raises(surgery.errors.DamagedArchive) as caught:
                archive.describe(out, h5=backend)
            messages.add(str(caught.value))
        assert len(messages) == 1, messages
        assert f"holds its kernel as {dtype}, where config.json makes it float32" in \
            messages.pop()


def _restore_as(data: bytes, dtype: str) -> bytes:
    import io

    import h5py

    buffer, path = io.BytesIO(data), "layers/dense/vars/0"
    with h5py.File(buffer, "a") as f:
        values = f[path][()]
        del f[path]
        f.create_dataset(path, data=values.astype(dtype))
    return buffer.getvalue()


def _constraints(model):
    """layer path -> weight -> (constraint class, frozen indices, frozen values as bytes, inner
    constraint) for every constrained weight."""
    import keras

    out = {}
    def walk(m, prefix):
        for layer in m.layers:
            path = prefix + layer.name
            if isinstance(layer, keras.Model):
                walk(layer, path + "/")
                continue
            for v in layer.weights:
                c = v.constraint
                if c is not None:
                    values = getattr(c, "values", None)
                    out.setdefault(path, {})[v.name] = (
                        type(c).__name__, getattr(c, "indices", None),
                        None if values is None else (values.dtype.str, values.tobytes()),
                        type(getattr(c, "inner", None)).__name__)
    walk(model, "")
    return out


@pytest.fixture(scope="module")
def partly_frozen(saved, tmp_path_factory):
    """zoo_functional with entries frozen inside eight layers (sub-layer freezing), saved."""
    from surgery.engines import live

    model = _load(saved("zoo_functional"))
    tree, objects = live.describe(model)
    live.write(model, plan_spec(surgery.parse(PARTS_SPEC), tree), objects)
    path = str(tmp_path_factory.mktemp("parts") / "parts.keras")
    model.save(path)
    return path


@pytest.mark.parametrize("text", ["freeze all", "unfreeze head", "unfreeze conv, einsum",
                                  "freeze inner_seq\nfreeze twice", "freeze conv.filters[2:3]",
                                  "unfreeze dw.filters[0]", "freeze twice.units[0]",
                                  "freeze convt.filters[1]\nunfreeze ln"])
def test_engines_agree_on_entries_frozen_inside_layers(partly_frozen, text, tmp_path):
    """A model carrying sub-layer freezes: both engines describe them alike; plans that keep,
    remove, extend or shrink them are written by the archive engine as the live engine writes
    them (new values read from the weights file)."""
    from surgery.engines import live

    src = partly_frozen
    model = _load(src)
    live_tree, objects = live.describe(model)
    tree = archive.describe(src)
    _assert_same_tree(tree, live_tree)
    assert {n.path for n in tree.layers() if any(w.frozen for w in n.weights)} == {
        "conv", "sep", "dw", "einsum", "inner_seq/inner_bn", "head", "convt", "ln"}
    spec = surgery.parse(text)
    live_plan, archive_plan = plan_spec(spec, live_tree), plan_spec(spec, tree)
    live.write(model, live_plan, objects)
    model.save(str(tmp_path / "live.keras"))
    with archive.Opened(src) as opened:  # as `surgery apply` does: check, then write
        assert opened.unsupported(archive_plan) is None
        written = opened.write(archive_plan, str(tmp_path / "archive.keras"))
    versions = environment_versions()
    assert _manifest(archive_plan, spec, src=src, sha=written.source_sha256,
                     name=opened.name, versions=versions).to_json() == \
        _manifest(live_plan, spec, src=src, sha=written.source_sha256, name=model.name,
                  versions=versions).to_json()
    a = _load(str(tmp_path / "live.keras"))
    state_a, constraints_a, tree_a = _state(a), _constraints(a), live.describe(a)[0]
    b = _load(str(tmp_path / "archive.keras"))
    state_b, constraints_b = _state(b), _constraints(b)
    assert state_a[:2] == state_b[:2]
    assert all(np.array_equal(state_a[2][k], state_b[2][k]) for k in state_a[2])
    assert constraints_a == constraints_b
    _assert_same_tree(archive.describe(str(tmp_path / "archive.keras")), tree_a)


def test_frozen_values_are_taken_as_numpy_takes_them():
    """rewrite.take against np.take on the middle axis, both copy strategies (row runs, byte
    columns)."""
    rng = np.random.default_rng(0)
    cases = [(1, 7, 1, [0, 1, 2, 5]), (6, 5, 3, [4]), (2, 9, 1, [1, 3, 5, 7]),
             (3, 4, 2, [0, 1, 2, 3]), (5, 8, 4, [0, 2, 3, 6])]
    for outer, size, inner, picks in cases:
        a = rng.standard_normal((outer, size, inner)).astype("float32")
        got = take(a.tobytes(), outer, size, inner * 4, tuple(picks))
        assert got == np.take(a, picks, axis=1).tobytes()


# --- properties of the archive path --------------------------------------------------------------


def test_written_file_is_reproducible_and_a_no_op_changes_no_byte(saved, tmp_path):
    src = saved("zoo_functional")
    tree = archive.describe(src)
    plan = plan_spec(surgery.parse("freeze all\nunfreeze head"), tree)
    first = archive.write(src, plan, str(tmp_path / "a.keras"))
    second = archive.write(src, plan, str(tmp_path / "b.keras"))
    assert first == second
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    assert first.sha256 != first.source_sha256
    # An empty spec rewrites config.json to the same bytes (Keras writes json.dumps output), and
    # the zip layout is the one Python's zipfile gives: the copy is the source, byte for byte.
    noop = archive.write(src, plan_spec(surgery.parse(""), tree), str(tmp_path / "c.keras"))
    assert noop.sha256 == noop.source_sha256


def test_a_plan_for_another_model_is_refused(saved, tmp_path):
    other = plan_spec(surgery.parse("freeze all"), archive.describe(saved("zoo_sequential")))
    with pytest.raises(ValueError, match="another model"):
        archive.write(saved("zoo_functional"), other, str(tmp_path / "out.keras"))


def test_deflated_archive_is_read_and_written(saved, tmp_path):
    """Keras stores its entries; a recompressed archive is read through zipfile and h5py, and
    each entry keeps its compression."""
    src = saved("zoo_functional")
    deflated = str(tmp_path / "deflated.keras")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated, "w") as zout:
        for info in zin.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(copy, zin.read(info.filename))
    _assert_same_tree(archive.describe(deflated), archive.describe(src))
    spec = surgery.parse("freeze inner_seq, conv")
    out_stored = str(tmp_path / "stored_out.keras")
    out_deflated = str(tmp_path / "deflated_out.keras")
    archive.write(src, plan_spec(spec, archive.describe(src)), out_stored)
    written = archive.write(deflated, plan_spec(spec, archive.describe(deflated)), out_deflated)
    assert written.sha256 == sha256_file(out_deflated)
    with zipfile.ZipFile(out_deflated) as z:
        assert z.testzip() is None
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    a, b = _state(_load(out_stored)), _state(_load(out_deflated))
    assert a[:2] == b[:2]
    assert all(np.array_equal(a[2][k], b[2][k]) for k in a[2])


def _copy_replacing_weights(src: str, dst: str, change) -> None:
    """A copy of the archive ``src`` whose model.weights.h5 is ``change(its bytes)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "model.weights.h5":
                data = change(data)
            zout.writestr(info, data)


def test_other_hdf5_layouts_are_read_through_h5py(saved, tmp_path):
    """The small HDF5 reader knows what h5py writes by default; a weights file written with
    libver='latest' (version-2 object headers, link messages) is read by h5py instead."""
    import io

    import h5py

    src = saved("zoo_functional")
    latest = str(tmp_path / "latest.keras")
    def rewritten(data):
        buffer = io.BytesIO()
        with h5py.File(io.BytesIO(data), "r") as fin, \
                h5py.File(buffer, "w", libver="latest") as fout:
            for key in fin:
                fin.copy(fin[key], fout, name=key)
        return buffer.getvalue()

    _copy_replacing_weights(src, latest, rewritten)
    with archive.Opened(latest) as opened:  # "best" looks at the superblock: h5py's
        assert opened.h5_backend == "h5py"
        _assert_same_tree(opened.tree, archive.describe(src))
    with pytest.raises(ArchiveUnsupported, match="superblock version 3"):
        archive.describe(latest, h5="pure")
    with archive.Opened(src) as opened:
        assert opened.h5_backend == "pure"


@pytest.mark.parametrize("pool", [(1, 1), (2, 3), (6, 16)])
def test_the_copy_and_both_digests_hold_whatever_the_buffer_pool(saved, tmp_path, monkeypatch,
                                                                  pool):
    """The weights are copied and hashed twice (as source and as output) through a small pool
    of reused buffers: with tiny chunks, every buffer is reused many times, handed to both
    hashers, and the copy must still be exact and both digests those of the files."""
    src = saved("zoo_functional")
    monkeypatch.setattr(zip_copy, "_CHUNK", 4096)
    monkeypatch.setattr(zip_copy, "_MIN_CHUNKS", pool[0])
    monkeypatch.setattr(zip_copy, "_MAX_CHUNKS", pool[1])
    plan = plan_spec(surgery.parse("freeze all\nunfreeze head"), archive.describe(src))
    out = tmp_path / "small_chunks.keras"
    written = archive.write(src, plan, str(out))
    assert written == (sha256_file(str(out)), sha256_file(src))
    monkeypatch.undo()
    assert archive.write(src, plan, str(tmp_path / "usual.keras")) == written
    assert out.read_bytes() == (tmp_path / "usual.keras").read_bytes()


def test_zip64_fields_are_written_when_sizes_need_them(saved, tmp_path, monkeypatch):
    """Weights over 4 GiB need zip64 sizes and offsets: exercised by lowering the limits."""
    src = saved("zoo_sequential")
    monkeypatch.setattr(zip_copy, "_ZIP64_LIMIT", 64)
    monkeypatch.setattr(zip_copy, "_ZIP64_COUNT", 1)
    out = str(tmp_path / "zip64.keras")
    plan = plan_spec(surgery.parse("freeze fc1, bn1"), archive.describe(src))
    written = archive.write(src, plan, out)
    assert written.sha256 == sha256_file(out)
    with open(out, "rb") as f:
        assert b"PK\x06\x06" in f.read()  # the zip64 end of central directory record
    with zipfile.ZipFile(out) as z, zipfile.ZipFile(src) as s:
        assert z.testzip() is None
        assert [(i.filename, i.file_size, i.CRC) for i in s.infolist() if i.filename !=
                "config.json"] == [(i.filename, i.file_size, i.CRC) for i in z.infolist()
                                   if i.filename != "config.json"]
    flags = layer_flags(_load(out))
    assert (flags["fc1"], flags["bn1"], flags["fc2"]) == (False, False, True)


_NO_TF = r"""
import sys
import surgery
from surgery.engines import archive
from surgery.manifest import build_manifest
from surgery.verify import verify
from surgery.plan import plan_spec
from surgery.report import plan_table

src, dst = sys.argv[1], sys.argv[2]
spec = surgery.parse("freeze **/type:BatchNormalization\nfreeze inner_seq")
with archive.Opened(src) as opened:  # as `surgery apply` reads and writes it
    plan = plan_spec(spec, opened.tree)
    assert opened.unsupported(plan) is None
    written = opened.write(plan, dst)
manifest = build_manifest(plan, spec, model_source=src, model_sha256=written.source_sha256,
                          model_name=opened.name, surgery_version=surgery.__version__)
assert verify(manifest, archive.describe(dst)) == []                  # verify
plan_table(plan_spec(surgery.parse(""), archive.describe(dst)), with_rules=False)  # show
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("tensorflow", "keras", "numpy", "h5py", "jax", "torch"))
print("heavy:", " ".join(heavy))
"""


def test_archive_path_imports_no_tensorflow(saved, tmp_path):
    src = saved("zoo_functional")
    result = subprocess.run([sys.executable, "-c", _NO_TF, src, str(tmp_path / "out.keras")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy:"  # not TensorFlow, Keras, NumPy nor h5py


def test_importing_the_engine_is_light():
    code = ("import sys, surgery.engines.archive; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'numpy', 'h5py')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- what the archive path refuses ---------------------------------------------------------------


def _refused(path):
    with pytest.raises(ArchiveUnsupported) as info:
        archive.describe(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    assert "not a zip" in _refused(str(path))
    assert "cannot open" in _refused(str(tmp_path / "missing.keras"))
    assert archive.is_archive(str(path)) is False


def test_zip_without_config_is_refused(tmp_path):
    path = str(tmp_path / "model.keras")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.weights.h5", b"")
    assert "config.json" in _refused(path)


@pytest.mark.parametrize("backend", ["best", "h5py"])
def test_damaged_weights_file_is_an_error(saved, tmp_path, backend):
    """Zeroed metadata where groups should be: an error with its reason from either backend
    (Keras would refuse the file too), not a reason to try another engine."""
    src = saved("zoo_sequential")
    path = str(tmp_path / "damaged.keras")
    # The superblock kept, the rest zeroed.
    _copy_replacing_weights(src, path, lambda data: data[:600] + bytes(len(data) - 600))
    with pytest.raises(archive.H5FormatError) as info:
        archive.describe(path, h5=backend)
    assert str(info.value) and "\n" not in str(info.value)
    if backend == "best":  # the pure reader says what it did not find, and where
        assert re.fullmatch(r"no (local heap|group B-tree node) at address \d+",
                            info.value.reason)


def test_legacy_h5_file_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    path = str(tmp_path / "model.h5")
    _zoo_sequential(keras).save(path)
    assert "not a zip" in _refused(path)


class _Subclassed:
    """Built lazily: defining a keras.Model subclass needs Keras imported."""

    @staticmethod
    def build(keras):
        class Tower(keras.Model):
            def __init__(self, **kw):
                super().__init__(**kw)
                self.fc = keras.layers.Dense(3)

            def call(self, x):
                return self.fc(x)

        model = Tower(name="tower")
        model(np.zeros((1, 4), "float32"))
        return model


def test_subclassed_model_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    path = str(tmp_path / "sub.keras")
    _Subclassed.build(keras).save(path)
    assert "Tower" in _refused(path)


def test_lambda_layer_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    path = str(tmp_path / "lambda.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2, name="double"),
                      keras.layers.Dense(2)]).save(path)
    assert "Lambda" in _refused(path)


def test_custom_layer_is_refused(tmp_path):
    import keras

    @keras.saving.register_keras_serializable(package="surgery_test")
    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    keras.backend.clear_session()
    path = str(tmp_path / "custom.keras")
    keras.Sequential([keras.Input((4,)), Scale(name="scale"), keras.layers.Dense(2)]).save(path)
    assert "Scale" in _refused(path)


def test_layer_with_nested_state_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    path = str(tmp_path / "lstm.keras")
    keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4, name="lstm")]).save(path)
    assert "lstm" in _refused(path)


def test_layer_shared_between_models_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    shared = keras.layers.Dense(4, name="shared")
    i = keras.Input((4,))
    inner = keras.Model(i, shared(i), name="inner")
    j = keras.Input((4,))
    path = str(tmp_path / "shared.keras")
    keras.Model(j, shared(inner(j)), name="outer").save(path)
    assert "shared" in _refused(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """What `ModelCheckpoint` writes during a `fit` under a `Schedule` with 'batchnorm affine':
    a compiled model (compile settings in config.json, optimizer variables in the weights file)
    holding surgery's AffineBatchNormalization."""
    import keras

    keras.backend.clear_session()
    model = _nested_mobilenet(keras)
    model.compile(optimizer="adam", loss="mse")
    path = str(tmp_path_factory.mktemp("checkpoint") / "epoch1.keras")
    spec = "freeze all except **/block_16_*, head\nbatchnorm affine"
    model.fit(np.zeros((4,) + SMALL, "float32"), np.zeros((4, 2), "float32"), epochs=1,
              verbose=0, callbacks=[surgery.Schedule(spec),
                                    keras.callbacks.ModelCheckpoint(path)])
    return path, spec


def test_compiled_checkpoint_is_read_for_reading_only(checkpoint, tmp_path):
    """show, plan, verify and lint read a checkpoint without Keras; apply does not write one
    (Keras drops the compile state when it loads with compile=False, and so must the output)."""
    from surgery.engines import live

    path, spec = checkpoint
    assert "compiled" in _refused(path)  # archive.describe(path): what apply reads
    tree = archive.describe(path, compiled=True)
    _assert_same_tree(tree, live.describe(_load(path))[0])
    assert {n.path for n in tree.layers() if n.affine} == {
        "mobilenetv2_1.00_32/block_16_expand_BN", "mobilenetv2_1.00_32/block_16_depthwise_BN",
        "mobilenetv2_1.00_32/block_16_project_BN"}
    plan = plan_spec(surgery.parse(spec), tree)
    manifest = build_manifest(plan, surgery.parse(spec), model_source=path, model_sha256=None,
                              model_name=tree.root.name, surgery_version=surgery.__version__)
    assert verify(manifest, tree) == []
    # The command line, in a process that must not import TensorFlow to verify the checkpoint.
    manifest_path = tmp_path / "m.json"
    manifest_path.write_text(manifest.to_json())
    result = _cli_without_keras(["verify", str(manifest_path), path])
    assert "note:" not in result.stderr  # read by the archive engine, no fallback


def _cli_without_keras(argv):
    """Run the command line in a fresh process and check it imported neither TensorFlow nor
    Keras (nor NumPy or h5py): the archive path, not a fallback."""
    code = ("import sys; from surgery.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'numpy', 'h5py')]; print('heavy:', heavy); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heavy: []" in result.stdout
    return result


def test_cli_writes_sub_layer_freezes_and_the_affine_class_without_keras(saved, tmp_path):
    src = saved("zoo_functional")
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze all except inner_seq, conv, head\n"
                    "freeze conv.filters[0:2], head.units[1]\nbatchnorm affine\n")
    out = tmp_path / "out.keras"
    result = _cli_without_keras(["apply", str(spec), src, "-o", str(out)])
    assert "loaded through Keras" not in result.stderr
    model = _load(str(out))
    assert type(model.get_layer("inner_seq").get_layer("inner_bn")).__qualname__ == \
        "AffineBatchNormalization"
    frozen = _constraints(model)
    assert frozen["conv"]["kernel"][:2] == ("FrozenEntries", (0, 1))
    assert frozen["head"]["bias"][:2] == ("FrozenEntries", (1,))
    _cli_without_keras(["verify", str(out) + ".manifest.json", str(out)])


# --- found by review: damaged, changing and unusual inputs -------------------------------------


def _weights_rewritten(src, dst, rewrite):
    """Copy the archive ``src`` to ``dst`` with model.weights.h5 replaced by rewrite(bytes)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            out.writestr(info, rewrite(data) if info.filename == "model.weights.h5" else data)


def test_sub_layer_values_are_read_by_h5py_when_the_small_reader_cannot(saved, tmp_path):
    """A weights file in HDF5's newer format (superblock 3), which only h5py reads: freezing
    entries still goes through the archive engine, and matches a Keras save."""
    import io

    import h5py

    def latest(data):
        src = h5py.File(io.BytesIO(data), "r")
        buf = io.BytesIO()
        with h5py.File(buf, "w", libver="latest") as dst:
            for key in src:
                src.copy(src[key], dst, key)
        return buf.getvalue()

    src = str(tmp_path / "latest.keras")
    _weights_rewritten(saved("zoo_sequential"), src, latest)
    with archive.Opened(src) as opened:
        plan = plan_spec(surgery.parse("freeze fc1.units[0:3], out.kernel"), opened.tree)
        assert opened.unsupported(plan) is None
        opened.write(plan, str(tmp_path / "out.keras"))
    model = _load(str(tmp_path / "out.keras"))
    reference = _load(saved("zoo_sequential"))
    assert _constraints(model)["fc1"]["kernel"][2] == (
        "<f4", reference.get_layer("fc1").kernel.numpy()[:, 0:3].tobytes())


def test_a_damaged_weights_entry_is_an_error_not_a_copy(saved, tmp_path):
    """Bytes that fail the entry's CRC-32 (what Keras checks on load) stop `apply` with exit 2,
    nothing written, instead of an output that cannot load."""
    from surgery.cli import main

    src = saved("zoo_sequential")
    data = bytearray(open(src, "rb").read())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("model.weights.h5")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size - 64] ^= 0xFF  # inside the last dataset's bytes
    bad = tmp_path / "bad.keras"
    bad.write_bytes(bytes(data))
    spec = tmp_path / "s.frz"
    spec.write_text("freeze fc1\n")
    out = tmp_path / "out.keras"
    assert main(["apply", str(spec), str(bad), "-o", str(out), "--engine", "archive"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras", "s.frz"]  # nothing else
    with pytest.raises(archive.DamagedArchive, match="CRC-32"):
        archive.write(str(bad), plan_spec(surgery.parse("freeze fc1"), archive.describe(str(bad))),
                      str(tmp_path / "direct.keras"))


def test_an_input_rewritten_after_it_was_opened_is_an_error(saved, tmp_path):
    """The state is checked from the moment the archive is opened: a checkpoint written over the
    path between planning and copying (same size, other weights) is refused."""
    import shutil

    from surgery.digest import InputChanged

    src = tmp_path / "live.keras"
    shutil.copy(saved("zoo_sequential"), src)
    opened = archive.Opened(str(src))
    plan = plan_spec(surgery.parse("freeze fc1.units[0:2]"), opened.tree)
    assert opened.unsupported(plan) is None  # values read now, from the first version
    data = bytearray(src.read_bytes())
    with open(src, "r+b") as f:  # in place, as a save over the same path does
        f.write(bytes(data))
    with pytest.raises(InputChanged):
        opened.write(plan, str(tmp_path / "out.keras"))
    opened.close()


# --- hostile files (issue 14): bounded work and memory, one clear line, exit 2 ------------------
# Each file is crafted here from a real Keras save; `surgery show` runs in a child process under
# a 1 GiB address-space and 60 s CPU limit: a reader that loops, recurses or inflates what the
# file claims would be killed, or report an internal error, instead of this one line.


def _limited(*argv):
    import resource

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    return subprocess.run([sys.executable, "-m", "surgery", *map(str, argv)],
                          capture_output=True, text=True, timeout=180, preexec_fn=limits)


def _assert_refused(path, reason, *extra):
    result = _limited("show", path, "--engine", "archive", *extra)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"surgery: error: {path}: "), result.stderr
    assert re.search(reason, result.stderr), result.stderr


def _rezipped(src, dst, *, weights=None, config=None):
    """``src`` copied to ``dst`` with model.weights.h5 and config.json passed through the given
    functions of their bytes."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename == "model.weights.h5" and weights:
                data = weights(bytearray(data))
            if info.filename == "config.json" and config:
                data = config(data)
            out.writestr(info, bytes(data))
    return dst


def _pure_reader(data):
    from surgery.engines.archive.h5.base import Source
    from surgery.engines.archive.h5.pure import PureReader

    return PureReader(Source(len(data), lambda o, n: bytes(data[o:o + n]), None))


def _continuation_to_itself(data):
    """The first dataset's object header: its first message of 16 bytes or more becomes a
    continuation into the header's own message block."""
    import struct

    header = _pure_reader(data)._lookup("layers/dense/vars/0")
    size = struct.unpack_from("<L", data, header + 8)[0]
    p = header + 16
    while struct.unpack_from("<H", data, p + 2)[0] < 16:
        p += 8 + struct.unpack_from("<H", data, p + 2)[0]
    struct.pack_into("<H", data, p, 0x10)
    struct.pack_into("<QQ", data, p + 8, header + 16, size)
    return data


def _btree_into_itself(data):
    """The root group's B-tree node claims level 1, its first child being itself."""
    import struct

    btree = _pure_reader(data)._root[1][0]
    data[btree + 5] = 1
    struct.pack_into("<Q", data, btree + 24 + 8, btree)
    return data


def _huge_heap(data):
    """The root group's local heap claims 2**60 bytes of names."""
    import struct

    heap = _pure_reader(data)._root[1][1]
    struct.pack_into("<Q", data, heap + 8, 1 << 60)
    return data


@pytest.mark.parametrize("craft,reason", [
    (_continuation_to_itself, r"model\.weights\.h5 is damaged: the object header at address "
                              r"\d+ continues into itself"),
    (_btree_into_itself, r"the group B-tree reaches node \d+ twice"),
    (_huge_heap, r"local heap data at address \d+ lies outside the file"),
])
def test_hostile_weights_structures_are_errors(saved, tmp_path, craft, reason):
    path = _rezipped(saved("zoo_sequential"), tmp_path / "hostile.keras", weights=craft)
    _assert_refused(path, reason)


def _set_size(path, name, size):
    """Make the zip at ``path`` declare ``size`` uncompressed bytes for ``name``, in its local
    header and its central directory alike."""
    import struct

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    struct.pack_into("<L", data, info.header_offset + 22, size)
    for at in _central_headers(data):
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_len] == name.encode():
            struct.pack_into("<L", data, at + 24, size)
    path.write_bytes(bytes(data))


def _central_headers(data):
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        yield at
        at = data.find(b"PK\x01\x02", at + 4)


def test_a_config_claiming_gigabytes_is_an_error(saved, tmp_path):
    path = _rezipped(saved("zoo_sequential"), tmp_path / "big.keras")
    _set_size(path, "config.json", 2 << 30)  # 2 GiB, far beyond what these weights allow
    _assert_refused(path, r"config\.json is 2147483648 bytes, more than a model config beside "
                          r"these weights holds")


def test_a_config_that_inflates_past_its_size_is_an_error(saved, tmp_path):
    """A deflate bomb (1 GiB of zeros) under a small declared size: read no further than the
    declared size, and refused by its CRC-32."""
    bomb = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bytes(1 << 24)
    packed = b"".join(bomb.compress(chunk) for _ in range(64)) + bomb.flush()
    src = saved("zoo_sequential")
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            if info.filename == "config.json":
                out.writestr(info.filename, z.read(info.filename))
            else:
                out.writestr(info, z.read(info.filename))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("config.json")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    # Same declared sizes and CRC, a stream that inflates to 1 GiB where 'compressed' bytes were.
    rebuilt = data[:start] + packed + data[start + info.compress_size:]
    rebuilt = _with_compressed_size(rebuilt, info, len(packed))
    path.write_bytes(bytes(rebuilt))
    _assert_refused(path, r"config\.json: Bad CRC-32 for file 'config\.json'")


def _with_compressed_size(data, info, size):
    """The zip bytes with ``info``'s compressed size set to ``size`` and every later offset
    moved by the change (local header, central directory, end record)."""
    import struct

    delta = size - info.compress_size
    struct.pack_into("<L", data, info.header_offset + 18, size)
    for at in _central_headers(data):
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        offset = struct.unpack_from("<L", data, at + 42)[0]
        if data[at + 46:at + 46 + name_len] == info.filename.encode():
            struct.pack_into("<L", data, at + 20, size)
        elif offset > info.header_offset:
            struct.pack_into("<L", data, at + 42, offset + delta)
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 16, struct.unpack_from("<L", data, end + 16)[0] + delta)
    return data


def test_a_config_nested_beyond_any_reader_is_an_error(saved, tmp_path):
    path = _rezipped(saved("zoo_sequential"), tmp_path / "deep.keras",
                     config=lambda _: b"[" * 200_000 + b"]" * 200_000)
    _assert_refused(path, r"config\.json nests deeper than a JSON reader follows")


def test_models_nested_beyond_the_bound_are_refused(saved, tmp_path):
    import json

    layer = {"module": "keras.layers", "class_name": "Dense", "config": {"name": "fc"}}
    for depth in range(70):
        layer = {"module": "keras", "class_name": "Sequential",
                 "config": {"name": f"level{depth}", "layers": [layer]}}
    path = _rezipped(saved("zoo_sequential"), tmp_path / "nested.keras",
                     config=lambda _: json.dumps(layer).encode())
    _assert_refused(path, r"the archive engine cannot handle it: the model nests models more "
                          r"than 64 deep")


def test_frozen_index_runs_are_checked_before_they_are_expanded(saved, tmp_path):
    """A FrozenEntries config claiming indices [0, 10**10): an error against the weight's
    shape, not 10**10 integers (what expanding the run first would cost: about 11 GB)."""
    import json

    src = saved("zoo_sequential")
    frozen = str(tmp_path / "frozen.keras")
    with archive.Opened(src) as opened:
        opened.write(plan_spec(surgery.parse("freeze fc1.units[0:2]"), opened.tree), frozen)

    def hostile(data):
        cfg = json.loads(data)
        fc1 = next(lc for lc in cfg["config"]["layers"] if lc["config"].get("name") == "fc1")
        fc1["config"]["kernel_constraint"]["config"]["indices"] = [[0, 10**10]]
        return json.dumps(cfg).encode()

    path = _rezipped(frozen, tmp_path / "hostile.keras", config=hostile)
    _assert_refused(path, r"layer 'fc1', kernel_constraint: FrozenEntries: indices must be "
                          r"distinct, in \[0, 8\)")


_DECODE_HOSTILE = r"""
import sys
from surgery.engines import frozen_format
from surgery.errors import FrozenEntriesError
good = {"shape": [10**10], "axes": [0], "indices": [[0, 10**10]], "dtype": "float32",
        "values": frozen_format.encode_values(bytes(64)), "inner": None}
fc = frozen_format.decode(good)  # what FrozenEntries.from_config sees: no weight shape yet
try:
    fc.values_bytes()
except FrozenEntriesError as exc:
    print(exc)
"""


def test_the_decoder_refuses_values_that_cannot_fill_the_claimed_shape():
    """Keras's from_config has no weight to check against: the stored values must fill the
    claimed shape, checked before inflating (a 10**10-entry claim from 64 bytes) and before
    the runs are expanded."""
    import resource

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    result = subprocess.run([sys.executable, "-c", _DECODE_HOSTILE], capture_output=True,
                            text=True, timeout=60, preexec_fn=limits)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("FrozenEntries: stored values do not fill shape (10000000000,) "
                             "of float32\n")


def test_the_formats_names_are_those_keras_serializes():
    """engines/frozen_format.py writes configs without Keras: its names must be what Keras
    writes for the registered classes, module included (it is the class's __module__)."""
    import keras

    from surgery.engines import frozen_format as ff
    from surgery.engines.batchnorm import AffineBatchNormalization
    from surgery.engines.constraint import FrozenEntries

    c = FrozenEntries((2, 3), (1,), [0, 2], np.ones((2, 2), "float32"))
    assert keras.saving.serialize_keras_object(c) == ff.frozen_object(c.get_config())
    assert keras.saving.get_registered_object(ff.FROZEN_REGISTERED) is FrozenEntries
    entry = keras.saving.serialize_keras_object(AffineBatchNormalization(name="bn"))
    assert ff.is_affine_entry(entry)
    plain = keras.saving.serialize_keras_object(keras.layers.BatchNormalization(name="bn"))
    ff.set_affine_entry(plain, True)
    assert plain == entry
    ff.set_affine_entry(plain, False)
    assert plain == keras.saving.serialize_keras_object(keras.layers.BatchNormalization(name="bn"))
