"""The wheel is the real thing: built, installed into a fresh virtual environment outside the
source tree, and run from there (which proves grammars/surgery.lark ships inside it)."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True)
    (wheel,) = dist.glob("surgery-*.whl")

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # The heavy dependencies (TensorFlow, Keras) come from the test environment's site-packages,
    # appended after the fresh one: surgery itself can only be found in the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True)
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
