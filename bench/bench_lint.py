"""Benchmark `surgery lint` against `python -c "import tensorflow"`.

A pre-commit hook must cost little; the target is a lint run under 0.15x of a bare TensorFlow
import. Both run as whole processes (interpreter start-up counts for both), interleaved after a
warm-up so the page cache and any drift of the machine hit both alike; medians are reported.

    python bench/bench_lint.py [--runs 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.15
ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.frz"
        # A realistic spec: every example shipped in specs/, one after the other.
        spec.write_text("\n".join(p.read_text() for p in sorted((ROOT / "specs").glob("*.frz"))))
        # Lint exits 1 on findings (the examples have none, but either code is a full run).
        lint = [sys.executable, "-m", "surgery", "lint", str(spec)]
        subprocess.run(lint, capture_output=True)
        tf = [sys.executable, "-c", "import tensorflow"]
        timed(tf)
        lint_times, tf_times = [], []
        for _ in range(args.runs):
            tf_times.append(timed(tf))
            start = time.perf_counter()
            subprocess.run(lint, capture_output=True)
            lint_times.append(time.perf_counter() - start)

    lint_s, tf_s = statistics.median(lint_times), statistics.median(tf_times)
    ratio = lint_s / tf_s
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"median of {args.runs} runs, whole processes\n")
    print("| command | wall time (s) |")
    print("|---|---:|")
    print(f"| `python -c \"import tensorflow\"` | {tf_s:.3f} |")
    print(f"| `surgery lint spec.frz` | {lint_s:.3f} |")
    print(f"| ratio (target <= {TARGET}x) | {ratio:.3f}x {verdict} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lint.json").write_text(json.dumps(
        {"runs": args.runs, "lint_s": lint_s, "import_tensorflow_s": tf_s, "ratio": ratio,
         "target": TARGET, "lint_all": lint_times, "tf_all": tf_times}, indent=2) + "\n")


if __name__ == "__main__":
    main()
