"""The wheel is the real thing: built, installed into a fresh virtual environment outside the
source tree, and run from there (which proves grammars/surgery.lark ships inside it)."""

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _venv_with_wheel(tmp_path, env_dir):
    """surgery's real wheel, built from the repository and installed (without dependencies)
    into a fresh virtual environment at ``env_dir``: its python and its site-packages."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("surgery-*.whl")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True)
    return python, site


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    env_dir = tmp_path / "fresh"
    python, site = _venv_with_wheel(tmp_path, env_dir)
    # The heavy dependencies (TensorFlow, Keras) come from the test environment's site-packages,
    # appended after the fresh one: surgery itself can only be found in the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (env_dir / "bin" / "surgery").write_text(
        f"#!{python}\nimport sys\nfrom surgery.cli import main\nsys.exit(main())\n")
    (env_dir / "bin" / "surgery").chmod(0o755)

    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import surgery; from surgery.parse import grammar_text; "
                            "print(surgery.__file__); print(len(grammar_text()))"],
        check=True, capture_output=True, text=True, cwd=work).stdout.split()
    assert where[0].startswith(str(site))
    assert (site / "surgery" / "surgery.lark").read_text() == \
        (ROOT / "grammars" / "surgery.lark").read_text()
    assert int(where[1]) > 100

    spec = work / "spec.frz"
    spec.write_text("freeze all\nunfreeze block_16_*, Conv_1*, out_relu, predictions\n")
    surgery_bin = str(env_dir / "bin" / "surgery")
    lint = subprocess.run([surgery_bin, "lint", "spec.frz"], cwd=work, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stderr
    apply = subprocess.run([surgery_bin, "apply", "spec.frz", "keras.applications.MobileNetV2",
                            "-o", "out.keras"], cwd=work, capture_output=True, text=True)
    assert apply.returncode == 0, apply.stderr
    assert (work / "out.keras").stat().st_size > 1_000_000
    assert "wrote out.keras" in apply.stdout


@pytest.mark.slow
def test_the_core_install_runs_the_archive_path_without_tensorflow_or_keras(tmp_path):
    """The core package (lark, pyyaml, regex, rich: no Keras) in a fresh virtual environment that
    has no TensorFlow, Keras, NumPy or h5py at all: lint, show, plan, apply and verify on a
    .keras archive work; a command that must load a model through Keras says what to install,
    exit 2, no traceback."""
    import shutil

    import keras

    env_dir = tmp_path / "core"
    python, site = _venv_with_wheel(tmp_path, env_dir)
    # The core's dependencies the archive path imports, copied from the test environment (no
    # registry needed): the packages themselves, nothing they would pull in. (rich draws the
    # progress spinner only where stderr is a terminal, which it is not here.)
    import lark
    import regex
    import yaml

    for module in (lark, yaml, regex):
        shutil.copytree(Path(module.__file__).parent, site / module.__name__)
    requires = [line for line in subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires("
                            "'surgery') or ()))"], check=True, capture_output=True,
        text=True).stdout.splitlines() if "extra ==" not in line]
    assert sorted(re.split("[<>=!~ ]", r)[0] for r in requires) == ["lark", "pyyaml", "regex",
                                                                     "rich"]
    missing = subprocess.run([str(python), "-c", "\n".join(
        f"try:\n    import {m}\n    print('{m}')\nexcept ImportError:\n    pass"
        for m in ("tensorflow", "keras", "jax", "torch", "numpy", "h5py"))],
        capture_output=True, text=True, check=True)
    assert missing.stdout.split() == []  # none of them can be imported there

    work = tmp_path / "work"
    work.mkdir()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    keras.Model(inputs, keras.layers.Dense(2, name="head")(h)).save(work / "m.keras")
    (work / "spec.frz").write_text("freeze all\nunfreeze head\nunfreeze conv.filters[0:2]\n")

    def surgery_cmd(*args):
        return subprocess.run([str(python), "-m", "surgery", *args], cwd=work,
                              capture_output=True, text=True, timeout=120)

    for args in (("lint", "spec.frz"), ("show", "m.keras"), ("plan", "spec.frz", "m.keras"),
                 ("apply", "spec.frz", "m.keras", "-o", "out.keras"),
                 ("verify", "out.keras.manifest.json", "out.keras")):
        done = surgery_cmd(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    assert "matches" in done.stdout
    # The output loads in Keras as the plan says (in this process, which has Keras; importing
    # surgery registers FrozenEntries).
    import surgery  # noqa: F401

    out = keras.models.load_model(work / "out.keras", compile=False)
    assert [v.path for v in out.trainable_weights] == ["conv/kernel", "conv/bias",
                                                      "head/kernel", "head/bias"]
    needs = surgery_cmd("show", "keras.applications.MobileNetV2")
    assert needs.returncode == 2, needs.stderr
    assert "Traceback" not in needs.stderr
    assert "pip install 'surgery[tensorflow]'" in needs.stderr
