"""Benchmark `surgery apply` against the cost floor of a bare load + save.

What it measures: wall time and peak resident memory of `surgery apply` on a
ResNet50 `.keras` file (weights=None, about 100 MB), next to the least any
tool that rewrites that file must pay: `keras.models.load_model` followed by
`model.save`, with the same arguments surgery uses (compile=False, safe mode
on). The target is that surgery stays within 1.10x of that floor on both.

Why it is built this way:

* Each command runs as a whole, separate process. Most of the cost of a
  CLI like this one is importing TensorFlow/Keras and deserialising the
  model; timing a function inside one long-lived interpreter would hide the
  import cost and share caches between the two contenders.
* Peak memory is the child's own ru_maxrss from os.wait4, not
  RUSAGE_CHILDREN, which is a running maximum over every child reaped so far
  and so could never show a later run being smaller than an earlier one.
* The two commands are interleaved (floor, surgery, floor, surgery, ...)
  after one untimed warm-up of each, so the page cache is warm for both and
  any slow drift of the machine (thermal, background load) hits both sides
  alike instead of biasing whichever ran second.
* The median of N runs is reported, since a single stray slow run on a
  shared machine would drag a mean.

* surgery's own bytecode is written first (as `pip install` of the wheel
  does; see _measure.precompile), so an environment that sets
  PYTHONDONTWRITEBYTECODE does not charge surgery a compile on every run.
* `--engine` picks the engine `surgery apply` uses (default: auto, which is
  the archive engine on a .keras file; keras: load and save through Keras).

It is a report, not a test: it exits 0 even when a target is missed, and
prints FAIL for it. Results go to stdout as a Markdown table (for the README)
and to bench/results/apply.json.

Usage:
    python bench/bench_apply.py [--runs 5] [--workdir DIR] [--keep] [--engine auto|archive|keras]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import machine_info, measure, precompile  # bench/ is on sys.path when a bench runs

TARGET_RATIO = 1.10

SPEC_TEXT = "freeze all\nunfreeze conv5_*\n"

# The same call surgery makes when it loads and writes a model, so the floor
# differs from surgery only by what surgery adds on top.
FLOOR_CODE = (
    "import keras, sys; "
    "m = keras.models.load_model(sys.argv[1], compile=False); "
    "m.save(sys.argv[2])"
)

MAKE_MODEL_CODE = (
    "import keras, sys; keras.applications.ResNet50(weights=None).save(sys.argv[1])"
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "apply.json"


def remove(path: Path) -> None:
    """Delete a previous run's output, so every run writes a fresh file."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    # surgery also writes a manifest next to its output.
    manifest = path.with_name(path.name + ".manifest.json")
    if manifest.exists():
        manifest.unlink()


def setup(workdir: Path) -> tuple[Path, Path]:
    model = workdir / "resnet50.keras"
    spec = workdir / "spec.frz"
    spec.write_text(SPEC_TEXT)
    print(f"building {model} (untimed) ...", flush=True)
    subprocess.run([sys.executable, "-c", MAKE_MODEL_CODE, str(model)], check=True)
    return model, spec


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= TARGET_RATIO else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (default 5)")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--engine", choices=("auto", "archive", "keras"), default="auto",
                        help="the engine surgery apply uses (default: auto)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    if args.workdir is not None:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="surgery-bench-"))

    surgery_bin = Path(sys.executable).parent / "surgery"
    if not surgery_bin.exists():
        sys.stderr.write(f"no surgery console script at {surgery_bin}; install the package first\n")
        return 1

    print(f"bytecode written for {precompile()}", flush=True)
    try:
        model, spec = setup(workdir)
        floor_out = workdir / "floor_out.keras"
        surgery_out = workdir / "surgery_out.keras"
        commands = {
            "floor": (
                [sys.executable, "-c", FLOOR_CODE, str(model), str(floor_out)],
                floor_out,
            ),
            "surgery": (
                [str(surgery_bin), "apply", str(spec), str(model), "-o", str(surgery_out), "--force",
                 "--engine", args.engine],
                surgery_out,
            ),
        }

        samples: dict[str, dict[str, list[float]]] = {
            name: {"wall_s": [], "peak_mib": [], "cpu_s": [], "others_cpu_s": []}
            for name in commands
        }
        # Run 0 is the untimed warm-up.
        for i in range(args.runs + 1):
            label = "warm-up" if i == 0 else f"run {i}/{args.runs}"
            for name, (argv, out) in commands.items():
                remove(out)
                m = measure(argv, workdir / f"{name}-{i}")
                print(f"{label:>9}  {name:<8} {m.wall_s:7.2f} s  cpu {m.cpu_s:6.2f} s  "
                      f"{m.peak_mib:8.1f} MiB  others {m.others_cpu_s:5.2f} s", flush=True)
                if i > 0:
                    for metric in samples[name]:
                        samples[name][metric].append(getattr(m, metric))
            for _, out in commands.values():
                remove(out)

        info = machine_info()
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {
        name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()
    }
    ratios = {k: med["surgery"][k] / med["floor"][k] for k in ("wall_s", "peak_mib")}

    print()
    print(
        f"Machine: {info['cpu_count']} CPUs ({info['machine']}), Python {info['python']}, "
        f"Keras {info['keras']}, TensorFlow {info['tensorflow']}; "
        f"ResNet50 (weights=None), median of {args.runs} runs; surgery apply --engine {args.engine}"
    )
    print()
    print("| command | wall time (s) | CPU (s) | peak RSS (MiB) | others' CPU (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("floor", "`load_model` + `save` (floor)"),
                        ("surgery", f"`surgery apply --engine {args.engine}`")):
        m = med[name]
        print(f"| {label} | {m['wall_s']:.3f} | {m['cpu_s']:.2f} | {m['peak_mib']:.0f} | "
              f"{m['others_cpu_s']:.2f} |")
    print(
        f"| ratio (target <= {TARGET_RATIO:.2f}x) | {ratios['wall_s']:.3f}x {verdict(ratios['wall_s'])} "
        f"| | {ratios['peak_mib']:.3f}x {verdict(ratios['peak_mib'])} | |"
    )
    print()
    failed = [k for k, r in ratios.items() if r > TARGET_RATIO]
    if failed:
        print(f"FAIL: surgery apply is over {TARGET_RATIO:.2f}x the floor on: {', '.join(failed)}")
    else:
        print(f"PASS: surgery apply is within {TARGET_RATIO:.2f}x the floor on wall time and peak memory")

    result = {
        "benchmark": "surgery apply vs keras load_model + save, ResNet50 (weights=None)",
        "engine": args.engine,
        "runs": args.runs,
        "statistic": "median",
        "target_ratio": TARGET_RATIO,
        "machine": info,
        "floor": {**med["floor"], "samples": samples["floor"]},
        "surgery": {**med["surgery"], "samples": samples["surgery"]},
        "ratio": ratios,
        "pass": {k: r <= TARGET_RATIO for k, r in ratios.items()},
    }
    path = RESULTS_PATH if args.engine == "auto" else \
        RESULTS_PATH.with_name(f"apply-{args.engine}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
    # A report, not a test: a missed target is printed, not signalled.
    return 0


if __name__ == "__main__":
    sys.exit(main())
