"""Model files that cannot be used, Keras safe mode, atomic outputs, and stdout/stderr.

What tests/test_cli.py already covers (a missing path, a directory, random bytes, a truncated
`.keras`, a Lambda layer refused in safe mode) is not repeated here. This file adds:

* an `.h5` that holds no model, a `.keras` whose custom layer class is not registered, and
  `--unsafe` (a warning, then a Lambda model loads): exit 2, exactly one line on stderr that
  names the file as the user typed it (relative paths, run from the folder), nothing written;
* a real `surgery apply` killed with SIGTERM / SIGINT while it saves over an existing output:
  the destination is byte-identical afterwards, no temporary file is left (in the output
  folder, or in TMPDIR), exit 130, no traceback;
* saves that fail for real reasons once the output folder has been checked (a file size limit
  inside Keras's save, a name the file system refuses at the final rename): nothing is left
  behind, and an existing output keeps its bytes; names up to the file system's limit work;
* `AtomicOutputs` on its own: anonymous temporaries (O_TMPFILE) that have no name until the
  commit links them in, short hidden named ones where a writer needs a suffix, a best-effort
  discard, a commit that a failing rename undoes and that SIGINT waits for, and an exclusive
  claim of a new output (of two runs, exactly one wins);
* SIGKILL: after the write (a process holding its temporary), in the middle of a real save,
  and a kill loop (20 kills at spread-out moments of a 134 MB model's write, more than
  ResNet50's 98 MB, each over the previous run's output) that counts what each kill left;
* results on stdout, diagnostics on stderr, so scripts can pipe them.

The models are built once, in a subprocess, so the custom layer's registration never reaches
this process: loading it here is exactly what a user without the class's code would do.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import surgery
from surgery import atomic
from surgery.atomic import AtomicOutputs, OutputExists
from surgery.cli import main

SURGERY = str(Path(sys.executable).parent / "surgery")

BUILD_MODELS = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import h5py, keras, numpy as np

    os.chdir(sys.argv[1])

    @keras.saving.register_keras_serializable(package="private")
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    def tiny():
        inputs = keras.Input((4,), name="x")
        h = keras.layers.Dense(8, name="stem")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="tiny")

    tiny().save("tiny.keras")
    tiny().save_weights("tiny.weights.h5")  # a weights file: an .h5 without a model

    inputs = keras.Input((4,), name="x")
    outputs = keras.layers.Dense(2, name="head")(Scale(name="scale")(inputs))
    keras.Model(inputs, outputs, name="custom").save("custom.keras")
    keras.Model(inputs, outputs, name="custom").save("custom.h5")

    inputs = keras.Input((3,), name="x")
    doubled = keras.layers.Lambda(lambda t: t * 2, name="double")(inputs)
    keras.Model(inputs, keras.layers.Dense(2, name="head")(doubled), name="lam").save("lambda.keras")

    # Big enough that saving takes a good fraction of a second (2 x 4096x4096 float32, ~130 MB),
    # few enough layers that loading it is quick.
    inputs = keras.Input((4096,), name="x")
    h = keras.layers.Dense(4096, name="wide1")(inputs)
    h = keras.layers.Dense(4096, name="wide2")(h)
    keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="wide").save("wide.keras")

    with h5py.File("data.h5", "w") as f:  # HDF5, but some data set, not a model
        f.create_dataset("images", data=np.zeros((4, 8, 8), dtype="uint8"))
    with h5py.File("empty.h5", "w"):
        pass
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    proc = subprocess.run([sys.executable, "-c", BUILD_MODELS, str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture
def here(tmp_path, models, monkeypatch):
    """A working folder with the spec, the models and an empty `out/` folder; the test runs
    from it, so every path below is relative, as a user types it."""
    for name in ("tiny.keras", "tiny.weights.h5", "custom.keras", "custom.h5", "lambda.keras",
                 "data.h5", "empty.h5"):
        os.link(models / name, tmp_path / name)
    (tmp_path / "spec.frz").write_text("freeze all\nunfreeze head\n")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


needs_anonymous = pytest.mark.skipif(
    not atomic.anonymous_temporaries(tempfile.gettempdir()),  # where tmp_path is
    reason="no O_TMPFILE here (not Linux, or a file system without it)")


def listing(folder) -> list[str]:
    """Every entry, hidden ones included."""
    return sorted(os.listdir(folder))


def cli(capsys, *args):
    # -q: these tests read stderr line by line, without the progress lines of Keras-path runs
    # (tests/test_new_user.py checks those).
    quiet = ["-q"] if args and args[0] in ("apply", "plan", "show", "verify", "lint") else []
    rc = main([str(a) for a in args] + quiet)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(err: str, path: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"surgery: error: {path}: "), err
    assert "Traceback" not in err
    return lines[0]


# --- model files that hold no usable model ------------------------------------------------------


@pytest.mark.parametrize("model", [
    "data.h5",          # HDF5 with a data set, no model
    "empty.h5",         # HDF5 with nothing in it
    "tiny.weights.h5",  # the usual mistake: the weights file instead of the model
    "./out/../data.h5",  # an odd path is quoted exactly as typed, not normalized
])
@pytest.mark.parametrize("command", ["apply", "plan"])
def test_an_h5_file_without_a_model(here, capsys, model, command):
    extra = ["-o", "out/tuned.keras"] if command == "apply" else []
    rc, out, err = cli(capsys, command, "spec.frz", model, *extra)
    assert rc == 2 and out == ""
    line = assert_one_line_error(err, model)
    assert "model" in line[len(f"surgery: error: {model}: "):].lower()
    assert listing("out") == []


@pytest.mark.parametrize("model", ["custom.keras", "custom.h5"])
def test_an_unregistered_custom_layer(here, capsys, model):
    import keras

    # The class was registered in the subprocess that saved the model, never here.
    assert keras.saving.get_registered_object("private>Scale") is None
    rc, out, err = cli(capsys, "apply", "spec.frz", model, "-o", "out/tuned.keras")
    assert rc == 2 and out == ""
    assert_one_line_error(err, model)
    assert listing("out") == []


def test_an_unregistered_custom_layer_is_named_in_the_message(here, capsys):
    rc, out, err = cli(capsys, "apply", "spec.frz", "custom.keras", "-o", "out/tuned.keras")
    assert rc == 2
    line = assert_one_line_error(err, "custom.keras")
    assert "Scale" in line


def test_unsafe_warns_and_loads_a_lambda_model(here, capsys):
    rc, out, err = cli(capsys, "apply", "spec.frz", "lambda.keras", "-o", "out/tuned.keras",
                       "--unsafe", "--engine", "keras")
    assert rc == 0
    assert err.splitlines() == [
        "surgery: warning: --unsafe: Keras safe mode is off; code stored in the model file may run"]
    assert "wrote out/tuned.keras" in out.splitlines()
    assert listing("out") == ["tuned.keras", "tuned.keras.manifest.json"]

    # The default engine cannot read a Lambda from the archive: it says so once, after loading.
    rc, out, err = cli(capsys, "plan", "spec.frz", "lambda.keras", "--unsafe")
    assert rc == 0 and "double" in out
    assert err.startswith("surgery: warning: --unsafe") and err.count("\n") == 2
    assert err.splitlines()[1].startswith("surgery: note: layer 'double': a Lambda layer")


def test_safe_mode_is_the_default_for_plan_and_show_too(here, capsys):
    # apply refusing a Lambda is in test_cli.py; plan and show load the same way.
    for args in (["plan", "spec.frz", "lambda.keras"], ["show", "lambda.keras"]):
        rc, out, err = cli(capsys, *args)
        assert rc == 2 and out == ""
        assert "safe" in assert_one_line_error(err, "lambda.keras")


# --- stdout for results, stderr for diagnostics ------------------------------------------------


def test_results_on_stdout_and_nothing_on_stderr_from_the_console_script(here):
    proc = subprocess.run([SURGERY, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras"],
                          capture_output=True, text=True, cwd=here, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[-2:] == ["wrote out/tuned.keras", "manifest out/tuned.keras.manifest.json"]
    assert any(line.startswith("trainable params") for line in lines)
    assert listing(here / "out") == ["tuned.keras", "tuned.keras.manifest.json"]


def test_warnings_go_to_stderr_and_the_table_to_stdout(here, capsys):
    (here / "spec.frz").write_text("freeze stem\nfreeze all\nunfreeze head\n")  # line 1: no effect
    rc, out, err = cli(capsys, "plan", "spec.frz", "tiny.keras")
    assert rc == 0
    assert err.splitlines()[0].startswith("spec.frz:1:1: warning: this rule has no effect")
    assert "warning" not in out and out.split()[:2] == ["#", "layer"]


@pytest.mark.parametrize("spec_text,model", [
    ("freeze all\nunfreez head\n", "tiny.keras"),  # a spec error: Keras is never imported
    ("freeze all\n", "missing.keras"),
])
def test_failures_print_nothing_on_stdout(here, spec_text, model):
    Path("sub").mkdir()
    Path("sub/spec.frz").write_text(spec_text)
    proc = subprocess.run([SURGERY, "apply", "./sub//spec.frz", model, "-o", "out/t.keras"],
                          capture_output=True, text=True, cwd=here, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("./sub//spec.frz:2:1: error:" if "unfreez" in spec_text
                            else "surgery: error: missing.keras: no such file")
    assert listing(here / "out") == []


# --- saves that fail after the checks ----------------------------------------------------------

NAME_MAX = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
# One character more than the file system allows. Every check passes (the folder exists, nothing
# is there); the temporary, which has a short name of its own, is written; the final rename fails
# with a real OSError (ENAMETOOLONG).
TOO_LONG_OUT = "out/" + "m" * (NAME_MAX + 1 - len(".keras")) + ".keras"
TOO_LONG_MANIFEST = "out/" + "j" * (NAME_MAX + 1 - len(".json")) + ".json"


def test_a_failing_model_save_leaves_nothing_and_names_the_output_as_typed(here):
    # A real failure inside Keras's save: the process may not write a file larger than 4 KiB
    # (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG, 'File too large').
    resource = pytest.importorskip("resource")

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    Path("out/tuned.keras").write_bytes(b"previous model\n")
    Path("out/tuned.keras.manifest.json").write_bytes(b"{}\n")
    proc = subprocess.run([SURGERY, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras",
                           "--force"], capture_output=True, text=True, cwd=here, timeout=300,
                          preexec_fn=limited)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "cannot save the model" in assert_one_line_error(proc.stderr, "out/tuned.keras")
    assert listing("out") == ["tuned.keras", "tuned.keras.manifest.json"]
    assert Path("out/tuned.keras").read_bytes() == b"previous model\n"
    assert Path("out/tuned.keras.manifest.json").read_bytes() == b"{}\n"


def test_an_output_name_the_file_system_refuses_leaves_nothing(here, capsys):
    rc, stdout, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", TOO_LONG_OUT,
                          "--manifest", "out/m.json")
    assert rc == 2 and stdout == ""
    assert "File name too long" in assert_one_line_error(err, TOO_LONG_OUT)
    assert listing("out") == []


def test_a_failing_manifest_write_removes_the_saved_model(here, capsys):
    # Both temporaries are written; the model's rename succeeds, the manifest's fails. The
    # commit is undone: the existing output keeps its bytes and nothing else remains.
    Path("out/tuned.keras").write_bytes(b"previous model\n")
    rc, stdout, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras",
                          "--manifest", TOO_LONG_MANIFEST, "--force")
    assert rc == 2 and stdout == ""
    assert_one_line_error(err, TOO_LONG_MANIFEST)
    assert listing("out") == ["tuned.keras"]
    assert Path("out/tuned.keras").read_bytes() == b"previous model\n"


def test_a_failing_manifest_write_is_reported_for_the_manifest_as_typed(here, capsys,
                                                                        monkeypatch):
    # A full disk while the manifest's temporary is written (injected: no real file system
    # failure hits a small .json write and not the model's save before it).
    real_write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        if text.startswith("{"):  # the manifest (its temporary may be an anonymous /proc path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    rc, _, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras",
                     "--manifest", "out/m.json")
    assert rc == 2
    assert listing("out") == []
    assert_one_line_error(err, "out/m.json")


@pytest.mark.parametrize("spare", [10, 0])  # 0: the longest name the file system takes
def test_a_long_but_legal_output_name_can_be_written(here, capsys, spare):
    out = "out/" + "m" * (NAME_MAX - len(".keras") - spare) + ".keras"
    rc, _, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", out,
                     "--manifest", "out/m.json")
    assert rc == 0, err
    assert Path(out).exists()
    assert listing("out") == sorted([out[len("out/"):], "m.json"])


def test_an_interrupt_between_the_two_renames_changes_nothing(here, capsys, monkeypatch):
    # Fault injection at the one point a real signal cannot be aimed at (and, since SIGINT and
    # SIGTERM are held during the commit, cannot reach): the first rename onto a destination
    # happens, then something fails. The commit is undone.
    Path("out/tuned.keras").write_bytes(b"previous model\n")
    Path("out/tuned.keras.manifest.json").write_bytes(b"{}\n")
    real_replace = os.replace
    failed = []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "tuned.keras" and not failed:
            failed.append(dst)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    rc, _, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras", "--force")
    assert failed
    assert rc == 130 and "nothing was written" in err
    assert listing("out") == ["tuned.keras", "tuned.keras.manifest.json"]
    assert Path("out/tuned.keras").read_bytes() == b"previous model\n"
    assert Path("out/tuned.keras.manifest.json").read_bytes() == b"{}\n"


# --- AtomicOutputs on its own ------------------------------------------------------------------


def _reserve_and_write(outputs, folder: Path, contents: dict, replace: bool = True,
                       named: bool = False) -> None:
    for name, data in contents.items():
        outputs.reserve(folder / name, Path(name).suffix, replace=replace,
                        named=named).write_bytes(data)


def test_named_temporaries_are_short_hidden_and_keep_the_suffix(tmp_path):
    with AtomicOutputs() as outputs:
        tmp = outputs.reserve(tmp_path / ("m" * (NAME_MAX - 6) + ".keras"), ".keras", named=True)
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".surgery-") and tmp.name.endswith(".tmp.keras")
        assert str(os.getpid()) in tmp.name and len(tmp.name) < 64
        assert not tmp.exists()  # created by the writer, with the usual permissions


def test_discard_removes_every_temporary_and_never_hides_the_error(tmp_path, monkeypatch):
    real_unlink = Path.unlink
    refused = []

    def unlink(self, *args, **kwargs):
        if self.name.endswith(".tmp.keras"):
            refused.append(self.name)
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(ValueError, match="the real error"):
        with AtomicOutputs() as outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"a", "b.json": b"b", "c.h5": b"c"},
                               named=True)
            raise ValueError("the real error")
    assert refused  # the first one could not be removed; the later ones still were
    assert [n for n in listing(tmp_path) if not n.endswith(".tmp.keras")] == []


@pytest.mark.parametrize("hard_links", [True, False])
@pytest.mark.parametrize("existed", [True, False])
def test_a_failing_rename_undoes_the_commit(tmp_path, monkeypatch, hard_links, existed):
    if existed:
        (tmp_path / "a.keras").write_bytes(b"old a")
    (tmp_path / "b.json").write_bytes(b"old b")
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "b.json" and Path(src).name.startswith(".surgery-") \
                and ".tmp" in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    if not hard_links:
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(surgery.SurgeryError, match="b.json: cannot write: Input/output error"):
        with AtomicOutputs() as outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"new a", "b.json": b"new b"})
            outputs.commit()
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before


def test_a_signal_during_the_commit_waits_until_it_is_complete(tmp_path, monkeypatch):
    (tmp_path / "a.keras").write_bytes(b"old a")
    (tmp_path / "b.json").write_bytes(b"old b")
    real_replace = os.replace
    sent = []
    handler = signal.getsignal(signal.SIGINT)

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two renames

    monkeypatch.setattr(os, "replace", replace_then_signal)
    outputs = AtomicOutputs()
    with pytest.raises(KeyboardInterrupt):
        with outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"new a", "b.json": b"new b"})
            outputs.commit()
    assert sent and outputs.committed
    assert listing(tmp_path) == ["a.keras", "b.json"]
    assert (tmp_path / "a.keras").read_bytes() == b"new a"
    assert (tmp_path / "b.json").read_bytes() == b"new b"
    assert signal.getsignal(signal.SIGINT) is handler  # put back


# --- new outputs are claimed at the commit: two runs never both write one file ----------------


def _no_hard_links(monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_link)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_new_output_that_appears_before_the_commit_is_not_replaced(tmp_path, monkeypatch,
                                                                     hard_links):
    # Another run's commit lands between this run's checks and its own commit.
    if not hard_links:
        _no_hard_links(monkeypatch)
    outputs = AtomicOutputs()
    with pytest.raises(OutputExists, match="b.json: already exists; pass --force"):
        with outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"mine", "b.json": b"mine"},
                               replace=False)
            (tmp_path / "b.json").write_bytes(b"the other run's")
            outputs.commit()
    assert not outputs.committed
    # a.keras was placed first and taken back: nothing of this run is left
    assert listing(tmp_path) == ["b.json"]
    assert (tmp_path / "b.json").read_bytes() == b"the other run's"


@needs_anonymous
@pytest.mark.parametrize("replace", [False, True])
def test_a_failing_copy_out_of_an_anonymous_temporary_leaves_nothing(tmp_path, monkeypatch,
                                                                      replace):
    # No hard links: an anonymous temporary is copied to a named one at the commit; a disk
    # that fills up during that copy must not leave the partial copy behind.
    _no_hard_links(monkeypatch)
    (tmp_path / "a.keras").write_bytes(b"old a")
    before = {"a.keras": b"old a"} if replace else {}
    if not replace:
        (tmp_path / "a.keras").unlink()

    def full_disk(src, dst, length=0):
        dst.write(src.read(3))
        dst.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.shutil, "copyfileobj", full_disk)
    with pytest.raises(surgery.SurgeryError, match="a.keras: cannot write: No space left"):
        with AtomicOutputs() as outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"new a"}, replace=replace)
            outputs.commit()
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before


@pytest.mark.parametrize("named", [False, True])
def test_a_replaced_file_keeps_its_permissions(tmp_path, named):
    for name, mode in (("private.keras", 0o600), ("group.json", 0o640)):
        (tmp_path / name).write_bytes(b"old")
        (tmp_path / name).chmod(mode)
    with AtomicOutputs() as outputs:
        _reserve_and_write(outputs, tmp_path, {"private.keras": b"new", "group.json": b"new"},
                           named=named)
        outputs.commit()
    assert {n: ((tmp_path / n).read_bytes(), (tmp_path / n).stat().st_mode & 0o777)
            for n in listing(tmp_path)} == {"private.keras": (b"new", 0o600),
                                            "group.json": (b"new", 0o640)}


@pytest.mark.parametrize("replace", [False, True])
def test_a_symlinked_destination_is_written_through(tmp_path, replace):
    # open() and model.save write where a link points; so does the commit, and the link stays.
    # A link to no file yet (replace=False) gets its target created, exclusively as ever.
    target = tmp_path / "runs" / "3.keras"
    target.parent.mkdir()
    if replace:
        target.write_bytes(b"old")
    link = tmp_path / "latest.keras"
    link.symlink_to(target)
    with AtomicOutputs() as outputs:
        outputs.reserve(link, ".keras", replace=replace).write_bytes(b"new")
        outputs.commit()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["latest.keras", "runs"] and listing(target.parent) == ["3.keras"]


def test_of_two_commits_to_one_new_file_exactly_one_wins(tmp_path):
    first, second = AtomicOutputs(), AtomicOutputs()
    with first, second:
        _reserve_and_write(first, tmp_path, {"m.keras": b"first"}, replace=False)
        _reserve_and_write(second, tmp_path, {"m.keras": b"second"}, replace=False)
        first.commit()
        with pytest.raises(OutputExists):
            second.commit()
    assert listing(tmp_path) == ["m.keras"]
    assert (tmp_path / "m.keras").read_bytes() == b"first"


# --- anonymous temporaries (O_TMPFILE): nothing has a name until the commit gives it one -------


def _temporaries_of(pid: int, folder: Path) -> list[Path]:
    """What process ``pid`` is writing into ``folder``: its anonymous files (open descriptors of
    files without a name there, which /proc shows as ``FOLDER/#INODE (deleted)``), then its
    hidden named temporaries (its PID in the name). Paths that stat the file's current size."""
    found = []
    fds = Path(f"/proc/{pid}/fd")
    try:
        entries = sorted(fds.iterdir(), key=lambda p: int(p.name))
    except OSError:  # the process is gone
        entries = []
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith(f"{folder}/#") and target.endswith(" (deleted)"):
            found.append(entry)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        names = []
    return found + [folder / n for n in names
                    if n.startswith(f".surgery-{atomic._HOST}-{pid}-") and ".tmp" in n]


@needs_anonymous
@pytest.mark.parametrize("replace", [False, True])
def test_an_anonymous_temporary_has_no_name_until_the_commit(tmp_path, replace):
    if replace:
        (tmp_path / "m.keras").write_bytes(b"old")
    (tmp_path / "plain").write_bytes(b"")  # the mode an ordinary open() gives, for comparison
    before = listing(tmp_path)
    with AtomicOutputs() as outputs:
        tmp = outputs.reserve(tmp_path / "m.keras", ".keras", replace=replace)
        assert str(tmp).startswith("/proc/self/fd/")
        tmp.write_bytes(b"new content")
        assert [p.name for p in _temporaries_of(os.getpid(), tmp_path)] == [tmp.name]
        assert listing(tmp_path) == before  # written, and still nowhere to be seen
        outputs.commit()
    assert _temporaries_of(os.getpid(), tmp_path) == []  # its descriptor is closed
    assert listing(tmp_path) == sorted({"m.keras", "plain"})
    assert (tmp_path / "m.keras").read_bytes() == b"new content"
    assert (tmp_path / "m.keras").stat().st_mode == (tmp_path / "plain").stat().st_mode


@needs_anonymous
def test_a_discarded_anonymous_temporary_is_gone_with_its_descriptor(tmp_path):
    with pytest.raises(ValueError):
        with AtomicOutputs() as outputs:
            _reserve_and_write(outputs, tmp_path, {"a.keras": b"a" * 4096, "b.json": b"b"})
            assert len(_temporaries_of(os.getpid(), tmp_path)) == 2
            raise ValueError("an error before the commit")
    assert _temporaries_of(os.getpid(), tmp_path) == []
    assert listing(tmp_path) == []


_WRITE_THEN_WAIT = """
import sys, time
from pathlib import Path
from surgery.atomic import AtomicOutputs
outputs = AtomicOutputs()
tmp = outputs.reserve(Path(sys.argv[1]) / "m.keras", ".keras", named=sys.argv[2] == "named")
tmp.write_bytes(b"x" * (1 << 20))
print("written", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("named", [pytest.param(False, marks=needs_anonymous), True])
def test_sigkill_after_writing_leaves_a_file_only_if_the_temporary_was_named(tmp_path, named):
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_THEN_WAIT, str(tmp_path),
                             "named" if named else "anonymous"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "written\n"
        held = _temporaries_of(proc.pid, tmp_path)
        assert len(held) == 1 and held[0].stat().st_size == 1 << 20
    finally:
        proc.kill()
        proc.wait()
    left = listing(tmp_path)
    if named:  # the fallback: the next run into the folder removes it (a dead process's)
        assert len(left) == 1 and left[0].startswith(f".surgery-{atomic._HOST}-{proc.pid}-")
        assert atomic.remove_stale(tmp_path) == left
    assert listing(tmp_path) == []


_KILLED_AS_THE_OLD_CONTENT_IS_FREED = """
import os, signal, sys
from pathlib import Path
from surgery.atomic import AtomicOutputs
folder = Path(sys.argv[1])
old = {(folder / n).stat().st_ino for n in ("m.keras", "m.json")}

def held_elsewhere(ino, but=None):
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) != but:
            try:
                if os.stat(f"/proc/self/fd/{fd}").st_ino == ino:
                    return True
            except OSError:
                pass
    return False

def freed(ino):  # the old content's last reference is about to go: die right there
    print("killed with", sorted(os.listdir(folder)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

real_unlink, real_close = os.unlink, os.close

def unlink(path, *args, **kwargs):
    st = os.lstat(path, dir_fd=kwargs.get("dir_fd"))
    if st.st_ino in old and st.st_nlink == 1 and not held_elsewhere(st.st_ino):
        freed(st.st_ino)
    return real_unlink(path, *args, **kwargs)

def close(fd):
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is not None and st.st_ino in old and st.st_nlink == 0 and \
            not held_elsewhere(st.st_ino, but=fd):
        freed(st.st_ino)
    return real_close(fd)

os.unlink, os.close = unlink, close
with AtomicOutputs() as outputs:
    for name, size in (("m.keras", 1 << 22), ("m.json", 10)):
        outputs.reserve(folder / name, Path(name).suffix, replace=True).write_bytes(b"n" * size)
    outputs.commit()
print("not killed", flush=True)
"""


def test_a_replacement_frees_the_old_content_only_once_no_backup_has_a_name(tmp_path):
    # Unlinking a large file's last name frees its blocks inside the call (tens of ms for a
    # model), long enough for a SIGKILL to land: killed right there, the replacement of two
    # files must have removed both backups' names already, so nothing is left behind.
    (tmp_path / "m.keras").write_bytes(b"o" * (1 << 22))
    (tmp_path / "m.json").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_AS_THE_OLD_CONTENT_IS_FREED,
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert proc.stdout.startswith("killed with ['m.json', 'm.keras']"), proc.stdout
    assert listing(tmp_path) == ["m.json", "m.keras"]
    assert (tmp_path / "m.keras").read_bytes() == b"n" * (1 << 22)
    assert (tmp_path / "m.json").read_bytes() == b"n" * 10


def test_apply_exits_2_when_its_new_output_appears_meanwhile(here, capsys, monkeypatch):
    real_commit = AtomicOutputs.commit

    def another_run_commits_first(self):
        Path("out/tuned.keras").write_bytes(b"the other run's model\n")
        return real_commit(self)

    monkeypatch.setattr(AtomicOutputs, "commit", another_run_commits_first)
    rc, out, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras")
    assert rc == 2 and out == ""
    assert err == "surgery: error: out/tuned.keras: already exists; pass --force to replace it\n"
    assert listing("out") == ["tuned.keras"]  # no manifest, no temporary
    assert Path("out/tuned.keras").read_bytes() == b"the other run's model\n"


@pytest.mark.slow
def test_two_real_runs_writing_one_new_output_never_both_succeed(here):
    # Both start together and pass the check at start-up; the commit decides. Without the
    # exclusive commit both exited 0 in 9 of 10 tries, one output silently replacing the other.
    for attempt in range(12):
        out = f"out/race{attempt}.keras"
        procs = [subprocess.Popen([SURGERY, "apply", "spec.frz", "tiny.keras", "-o", out],
                                  cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 2], results
        loser = next(err for rc, _, err in results if rc == 2)
        assert "already exists; pass --force to replace it" in loser
    hidden = [n for n in listing("out") if n.startswith(".")]
    assert hidden == []


# --- temporaries a killed run left behind --------------------------------------------------------


def _default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM as a shell gives them. A disposition set to
    ignore is inherited across exec, and Python then leaves SIGINT ignored; the process these
    tests run in may have inherited one (a test runner's worker), which is no state of ours."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _python_sigint():
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal, whatever the worker set up."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_temporaries_of_dead_processes_only(here, capsys):
    from surgery import atomic

    dead, alive = _dead_pid(), os.getppid()
    host = atomic._HOST
    other_host = "0" * 6 if host != "0" * 6 else "1" * 6
    names = {
        "stale": f".surgery-{host}-{dead}-0123abcd.tmp.keras",
        "stale manifest": f".surgery-{host}-{dead}-89abcdef.tmp.json",
        "a running process's": f".surgery-{host}-{alive}-0123abcd.tmp.keras",
        "another host's": f".surgery-{other_host}-{dead}-0123abcd.tmp.keras",
        "a linked backup": f".surgery-{host}-{dead}-11111111.bak",
        # A hard-linked backup of a destination since replaced: the old content, superseded.
        "a superseded backup": f".surgery-{host}-{dead}-33333333.bak",
        # A destination moved aside (no hard links): maybe the only copy of the file.
        "an only copy": f".surgery-{host}-{dead}-22222222.mov",
        "the user's": ".surgery-notes.txt",
    }
    for name in names.values():
        Path("out", name).write_bytes(b"x")
    os.link(Path("out", names["a linked backup"]), "out/previous.keras")
    rc, _, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras")
    assert rc == 0, err
    kept = {k for k, n in names.items() if Path("out", n).exists()}
    assert kept == {"a running process's", "another host's", "an only copy", "the user's"}
    assert Path("out/previous.keras").read_bytes() == b"x"


# --- fsync: opt-in (the temporary + rename is what makes outputs all-or-nothing) ---------------


def test_the_sweep_never_removes_an_input_named_like_a_stale_temporary(here, capsys):
    # A killed run's leftover, given back to surgery as its model or its spec, is an input: the
    # sweep of that folder (a dead process's temporaries) must leave it, and another one goes.
    dead = _dead_pid()
    model = f".surgery-{atomic._HOST}-{dead}-0123abcd.tmp.keras"
    spec = f".surgery-{atomic._HOST}-{dead}-4567abcd.tmp.frz"
    stale = f".surgery-{atomic._HOST}-{dead}-89abcdef.tmp.keras"
    os.link("tiny.keras", model)
    Path(spec).write_text("freeze all\nunfreeze head\n")
    Path(stale).write_bytes(b"a killed run's")
    rc, _, err = cli(capsys, "apply", spec, model, "-o", "tuned.keras")
    assert rc == 0, err
    assert Path(model).read_bytes() == Path("tiny.keras").read_bytes()
    assert Path(spec).read_text() == "freeze all\nunfreeze head\n"
    assert not Path(stale).exists()



def _record_fsyncs(monkeypatch) -> list:
    """Every os.fsync and os.replace from here on, in order: ("fsync", (st_dev, st_ino)) or
    ("replace", destination name)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _inode(path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_outputs_are_not_flushed_to_the_disk_by_default(tmp_path, monkeypatch):
    (tmp_path / "a.keras").write_bytes(b"old a")
    events = _record_fsyncs(monkeypatch)
    with AtomicOutputs() as outputs:
        _reserve_and_write(outputs, tmp_path, {"a.keras": b"new a", "b.json": b"new b"})
        outputs.commit()
    assert [e for e in events if e[0] == "fsync"] == []
    assert [e for e in events if e[0] == "replace"] == [("replace", "a.keras"),
                                                         ("replace", "b.json")]
    assert listing(tmp_path) == ["a.keras", "b.json"]
    assert (tmp_path / "a.keras").read_bytes() == b"new a"


def test_fsync_flushes_every_output_before_the_renames_and_the_folder_after(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "a.keras").write_bytes(b"old a")
    events = _record_fsyncs(monkeypatch)
    with AtomicOutputs(fsync=True) as outputs:
        _reserve_and_write(outputs, tmp_path, {"a.keras": b"new a", "b.json": b"new b"})
        outputs.commit()
    a, b, folder = (_inode(tmp_path / "a.keras"), _inode(tmp_path / "b.json"),
                    _inode(tmp_path))
    assert events == [("fsync", a), ("fsync", b), ("replace", "a.keras"), ("replace", "b.json"),
                      ("fsync", folder)]


@pytest.mark.parametrize("flag", [False, True])
def test_apply_flushes_the_model_and_the_manifest_only_with_fsync(here, capsys, monkeypatch,
                                                                  flag):
    events = _record_fsyncs(monkeypatch)
    rc, out, err = cli(capsys, "apply", "spec.frz", "tiny.keras", "-o", "out/tuned.keras",
                       "--engine", "archive", *(["--fsync"] if flag else []))
    assert rc == 0, err
    flushed = {inode for kind, inode in events if kind == "fsync"}
    wanted = {_inode("out/tuned.keras"), _inode("out/tuned.keras.manifest.json"),
              _inode("out")}
    assert flushed == (wanted if flag else set())


@pytest.mark.parametrize("flag", [False, True])
def test_fmt_write_flushes_only_with_fsync(tmp_path, capsys, monkeypatch, flag):
    spec = tmp_path / "spec.frz"
    spec.write_text("freeze   all\n")
    events = _record_fsyncs(monkeypatch)
    rc, out, err = cli(capsys, "fmt", "--write", spec, *(["--fsync"] if flag else []))
    assert rc == 0, err
    assert spec.read_text() == "freeze all\n"
    flushed = {inode for kind, inode in events if kind == "fsync"}
    assert flushed == ({_inode(spec), _inode(tmp_path)} if flag else set())


# --- the parser cache: never trusted, never required ------------------------------------------


@pytest.fixture
def parser_cache(tmp_path, monkeypatch):
    """A fresh, empty parser cache folder for this test; the process's parser is rebuilt from
    it (and again afterwards, for the tests that follow)."""
    import importlib

    parse_module = importlib.import_module("surgery.parse")
    folder = tmp_path / "cache"
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(folder))
    parse_module._parser.cache_clear()
    yield parse_module, folder
    parse_module._parser.cache_clear()


def _no_build(monkeypatch, parse_module):
    grammar = importlib.import_module("surgery.grammar")  # where the parser is built or loaded

    class NotBuilt(grammar.Lark):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the parser was built, not loaded from the cache")

    monkeypatch.setattr(grammar, "Lark", NotBuilt)


_CACHE_CORPUS = [
    "freeze all\nunfreeze conv5_* except conv5_block1_*  # a comment\n",
    "freeze /block[0-9]+/, type:Conv2D, head.kernel[0:8], model/**/dense\n",
    "unfreez all\n", "freeze\n", "freeze [\n", "freeze all except\n", "# only a comment\n", "",
] + [p.read_text() for p in sorted(Path(__file__).resolve().parent.parent.glob("specs/*.frz"))]


def _outcomes(parse_module) -> list:
    results = []
    for text in _CACHE_CORPUS:
        try:
            results.append(parse_module.parse(text, "spec.frz"))
        except surgery.SpecError as exc:
            results.append(("error", exc.render()))
    return results


def test_the_parser_is_cached_and_the_cached_one_parses_the_same(parser_cache, monkeypatch):
    parse_module, folder = parser_cache
    built = _outcomes(parse_module)  # builds the tables and writes the cache
    files = sorted(folder.iterdir())
    assert [f.name[:7] for f in files] == ["parser-"] and files[0].suffix == ".pickle"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    parse_module._parser.cache_clear()
    _no_build(monkeypatch, parse_module)
    assert _outcomes(parse_module) == built


@pytest.mark.parametrize("content", [
    b"", b"not json", b'{"format": 1, "key": "', b"\x80\x04\x95 a pickle is not read",
    b'{"format": 1, "key": "another grammar", "data": {}, "memo": {}}', b"[1, 2, 3]",
])
def test_a_damaged_or_foreign_cache_file_is_rebuilt_not_trusted(parser_cache, monkeypatch,
                                                                content):
    parse_module, folder = parser_cache
    parse_module._parser()
    (path,) = folder.iterdir()
    path.write_bytes(content)
    parse_module._parser.cache_clear()
    assert parse_module.parse("freeze all\n").rules[0].action == "freeze"
    assert listing(folder) == [path.name]  # written again, no temporary left
    parse_module._parser.cache_clear()
    _no_build(monkeypatch, parse_module)  # and loadable again
    assert parse_module.parse("unfreeze all\n").rules[0].action == "unfreeze"


def test_an_unwritable_cache_folder_only_costs_the_build(parser_cache, tmp_path, monkeypatch):
    parse_module, _ = parser_cache
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would be\n")
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(blocker / "cache"))
    parse_module._parser.cache_clear()
    assert parse_module.parse("freeze all\n").rules[0].action == "freeze"
    assert blocker.read_text() == "a file where the cache folder would be\n"


def test_a_changed_grammar_gets_a_parser_of_its_own(parser_cache, monkeypatch):
    parse_module, folder = parser_cache
    parse_module._parser()
    before = listing(folder)
    grammar = importlib.import_module("surgery.grammar")
    text = grammar.grammar_text()
    monkeypatch.setattr(grammar, "grammar_text", lambda: text + "\n// changed\n")
    parse_module._parser.cache_clear()
    parse_module._parser()
    after = listing(folder)
    assert len(before) == 1 and len(after) == 2 and set(before) < set(after)


# --- interrupted while saving: a real process, a real signal ----------------------------------


def _kill_mid_save(models: Path, work: Path, sig: int, min_size: int, attempts: int = 3):
    """Run `surgery apply --force` over an existing output and manifest; send ``sig`` once the
    hidden temporary output exists and holds at least ``min_size`` bytes (0: the moment it
    appears; a few MB: while Keras copies the weights into it, the last step of the save).

    The copy takes a fraction of a second; on a loaded machine this poller can miss it, and the
    run then simply completes. Such a miss says nothing about surgery, so the run is repeated
    (up to ``attempts`` times) and the test skipped if no signal ever lands mid-save."""
    misses = []
    for attempt in range(attempts):
        run = _one_kill(models, work / f"attempt{attempt}", sig, min_size)
        if run["landed"]:
            return run
        misses.append(run["missed"])
    pytest.skip(f"could not signal mid-save in {attempts} attempts: {misses}")


def _one_kill(models: Path, work: Path, sig: int, min_size: int) -> dict:
    work.mkdir()
    os.link(models / "wide.keras", work / "wide.keras")
    full_size = (models / "wide.keras").stat().st_size
    (work / "spec.frz").write_text("freeze all\nunfreeze head\n")
    out_dir = work / "out"
    out_dir.mkdir()
    old_model, old_manifest = b"previous model bytes\n", b'{"previous": "manifest"}\n'
    (out_dir / "tuned.keras").write_bytes(old_model)
    (out_dir / "tuned.keras.manifest.json").write_bytes(old_manifest)
    before = listing(out_dir)
    tmpdir = work / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}

    proc = subprocess.Popen([SURGERY, "apply", "spec.frz", "wide.keras", "-o", "out/tuned.keras",
                             "--force"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    temporary, size, missed = None, -1, None
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            held = _temporaries_of(proc.pid, out_dir)
            if held:
                temporary = held[0]  # the model's: it is reserved (and written) first
                try:
                    size = temporary.stat().st_size
                except FileNotFoundError:  # closed (or renamed) meanwhile
                    size = -1
                if size >= min_size:
                    break
            time.sleep(0.001)
        if temporary is None or size < min_size:
            missed = "the save ended before the signal"
        elif size >= full_size * 0.9:
            missed = f"too late: {size} of {full_size} bytes already written"
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if missed:
        return {"landed": False, "missed": missed}
    # The temporary of this very run; anonymous (a descriptor of the process, nothing in the
    # folder) wherever the file system gives O_TMPFILE.
    assert str(temporary).startswith(f"/proc/{proc.pid}/fd/") == \
        atomic.anonymous_temporaries(out_dir), temporary
    return {"landed": True, "rc": proc.returncode, "stdout": stdout, "stderr": stderr,
            "before": before, "old_model": old_model, "old_manifest": old_manifest,
            "out_dir": out_dir, "tmpdir": tmpdir}


@pytest.fixture(scope="module")
def sigint_during_weights_copy(models, tmp_path_factory):
    """One run, Ctrl-C'd while Keras writes the weights into the temporary (shared by the two
    tests below, so the 10 s run happens once)."""
    return _kill_mid_save(models, tmp_path_factory.mktemp("sigint"), signal.SIGINT,
                          min_size=2 ** 20)


def _assert_destination_untouched(run):
    assert run["rc"] == 130, run["stderr"]
    assert run["stdout"] == ""
    assert "Traceback" not in run["stderr"]
    assert run["stderr"].splitlines()[-1] == "surgery: interrupted; nothing was written"
    assert listing(run["out_dir"]) == run["before"]  # no temporary left, nothing new
    assert (run["out_dir"] / "tuned.keras").read_bytes() == run["old_model"]
    assert (run["out_dir"] / "tuned.keras.manifest.json").read_bytes() == run["old_manifest"]


@pytest.mark.slow
def test_sigterm_as_the_temporary_appears_leaves_the_destination_as_it_was(models, tmp_path):
    run = _kill_mid_save(models, tmp_path, signal.SIGTERM, min_size=0)
    _assert_destination_untouched(run)
    assert listing(run["tmpdir"]) == []  # nor anything in TMPDIR


@pytest.mark.slow
def test_ctrl_c_while_the_weights_are_written_leaves_the_destination_as_it_was(
        sigint_during_weights_copy):
    _assert_destination_untouched(sigint_during_weights_copy)


@pytest.mark.slow
def test_ctrl_c_while_the_weights_are_written_leaves_no_temporary_in_tmpdir(
        sigint_during_weights_copy):
    assert listing(sigint_during_weights_copy["tmpdir"]) == []


@pytest.mark.slow
def test_sigkill_while_the_weights_are_written_leaves_the_destination_as_it_was(models,
                                                                                tmp_path):
    # What makes the fsync optional: a process killed outright runs no cleanup at all, and
    # still the destination keeps its bytes, because only a rename, which never happened,
    # could have changed it. Its temporary had no name (O_TMPFILE), so nothing at all is left;
    # without O_TMPFILE it left its hidden temporary, which the next run into the folder
    # removes (its process is gone).
    run = _kill_mid_save(models, tmp_path, signal.SIGKILL, min_size=2 ** 20)
    assert run["rc"] == -signal.SIGKILL
    assert (run["out_dir"] / "tuned.keras").read_bytes() == run["old_model"]
    assert (run["out_dir"] / "tuned.keras.manifest.json").read_bytes() == run["old_manifest"]
    left = sorted(set(listing(run["out_dir"])) - set(run["before"]))
    if atomic.anonymous_temporaries(run["out_dir"]):
        assert left == []
    else:
        assert len(left) == 1 and left[0].startswith(".surgery-") and \
            left[0].endswith(".tmp.keras")
    work = run["out_dir"].parent
    proc = subprocess.run([SURGERY, "apply", "spec.frz", "wide.keras", "-o", "out/other.keras"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert listing(run["out_dir"]) == sorted(run["before"] + ["other.keras",
                                                              "other.keras.manifest.json"])


KILLS = 20


@pytest.mark.slow
def test_a_kill_loop_leaves_no_temporary_behind(models, tmp_path):
    # SIGKILL at spread-out moments of the write (from the first byte of the temporary to most
    # of it), each run over the output of the one before. With O_TMPFILE a killed run leaves
    # nothing in the folder; without it, its one hidden temporary, which the next run removes.
    os.link(models / "wide.keras", tmp_path / "wide.keras")
    (tmp_path / "spec.frz").write_text("freeze all\nunfreeze head\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    anonymous = atomic.anonymous_temporaries(out_dir)
    full = (models / "wide.keras").stat().st_size
    kills, runs, leftovers = 0, 0, []
    while kills < KILLS and runs < 2 * KILLS:
        runs += 1
        proc = subprocess.Popen([SURGERY, "apply", "spec.frz", "wide.keras", "-o",
                                 "out/tuned.keras", "--force"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = full * (kills % 10) // 11  # 0, 1/11, ..., 9/11 of the file, twice
        while proc.poll() is None:
            held = _temporaries_of(proc.pid, out_dir)
            try:
                if held and held[0].stat().st_size >= target:
                    proc.kill()
                    kills += 1
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
        proc.wait()
        left = [n for n in listing(out_dir) if n.startswith(".")]
        leftovers.append(len(left))
        assert len(left) <= (0 if anonymous else 1), left  # never an older run's
    assert kills == KILLS, f"only {kills} of {runs} runs were killed mid-write"
    assert subprocess.run([SURGERY, "apply", "spec.frz", "wide.keras", "-o", "out/tuned.keras",
                           "--force"], cwd=tmp_path, capture_output=True).returncode == 0
    assert [n for n in listing(out_dir) if n.startswith(".")] == []
    print(f"kill loop: {kills} kills in {runs} runs, hidden files left after each: {leftovers}")
