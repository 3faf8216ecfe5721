"""SIGKILL at any moment of `surgery apply --force`: what is left in the output folder.

tests/test_safety.py's kill loop kills at moments chosen by the size of the temporary, so every
kill lands while the model is being written. This report kills at moments chosen by the clock,
spread evenly over a whole run (start-up, reading, writing, the manifest, the commit, exit), on
ResNet50 (weights=None, about 100 MB), each run over the output of the one before, and counts
after each kill the hidden files in the folder (`.surgery-*`: a named temporary or a backup). With
anonymous temporaries (O_TMPFILE, surgery/atomic.py) only a kill within the few system calls of
a replacement's commit can leave one; the next run into the folder removes them (their process
is gone). It also checks that the destination is, after every kill, byte for byte either the
previous output or a complete new one (a manifest that records its sha256), never half-written.

    .venv/bin/python bench/bench_kill.py [--kills 48] [--model build/resnet50.keras]

A report, not a test: it prints the figures and exits 0 unless a destination was lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surgery import atomic  # noqa: E402

SURGERY = str(Path(sys.executable).with_name("surgery"))


def _hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=48)
    parser.add_argument("--model", type=Path, default=None,
                        help="a .keras model (default: ResNet50(weights=None), built here)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:  # TMPDIR: choose the filesystem to measure
        work = Path(tmp)
        model = work / "model.keras"
        if args.model is not None:
            shutil.copyfile(args.model, model)
        else:
            subprocess.run([sys.executable, "-c", "import keras; keras.applications.ResNet50("
                            "weights=None).save('model.keras')"], cwd=work, check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        (work / "spec.frz").write_text("freeze all\n")  # any model: what is written is all of it
        out = work / "out"
        out.mkdir()
        argv = [SURGERY, "apply", "spec.frz", "model.keras", "-o", "out/tuned.keras", "--force",
                "-q"]

        def complete() -> float:
            start = time.perf_counter()
            subprocess.run(argv, cwd=work, check=True, capture_output=True)
            return time.perf_counter() - start

        complete()  # warm-up: bytecode, page cache
        duration = statistics.median(complete() for _ in range(3))
        print(f"model: {model.stat().st_size / 1e6:.0f} MB, a complete run: {duration:.2f} s "
              f"(median of 3), anonymous temporaries here: "
              f"{atomic.anonymous_temporaries(out)}")

        left_after, kinds, lost, kills = [], {}, 0, 0
        for i in range(args.kills):
            proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(duration * (i + 0.5) / args.kills)
            proc.kill()
            kills += proc.wait() == -9
            hidden = _hidden(out)
            left_after.append(len(hidden))
            for name in hidden:  # '.tmp.keras', '.bak', ...: what the commit had named
                kind = name[name.index(".", 1):]
                kinds[kind] = kinds.get(kind, 0) + 1
            manifest = json.loads((out / "tuned.keras.manifest.json").read_text())
            if manifest["output"]["sha256"] != _sha256(out / "tuned.keras"):
                lost += 1  # destination and manifest disagree: a half-written commit
        complete()
        final = _hidden(out)
        print(f"{kills} of {args.kills} runs killed (the others had finished), at moments "
              f"spread evenly over {duration:.2f} s")
        print(f"hidden files left after each: {left_after}")
        print(f"kills that left one: {sum(1 for n in left_after if n)}, at most "
              f"{max(left_after)} at a time ({kinds}); after the next complete run: {len(final)} left")
        print(f"destinations that did not match their manifest after a kill: {lost}")
        return 1 if lost or final else 0


if __name__ == "__main__":
    sys.exit(main())
