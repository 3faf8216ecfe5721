"""Benchmark the archive engine against the cost floor of a bare Keras load + save.

What it measures: wall time and peak resident memory of applying a spec to a `.keras` file
through the archive engine (surgery/engines/archive.py: config.json rewritten, the weights
streamed, no TensorFlow), next to `keras.models.load_model` + `model.save` of the same file, on
ResNet50 (weights=None, about 100 MB) and VGG16 with its classifier (about 550 MB). Target: the
archive path at most 0.05x the floor in wall time and in peak memory.

The archive command does what `surgery apply --engine archive` does: read the spec, describe the
archive, plan, write the output and the manifest (with the source's and the output's sha256)
through `AtomicOutputs` (temporary files, fsync, rename), print the summary. If the installed
`surgery` already has `apply --engine archive`, that command is measured instead. A second row
measures the same work without the fsync, as `model.save` (the floor) does not fsync either: the
difference is what durability costs, not the engine.

Method, as bench/bench_apply.py: whole processes (imports count), peak RSS from os.wait4 per
child (not RUSAGE_CHILDREN, a running maximum), one untimed warm-up of each command, then N runs
interleaved so drift hits every command alike, medians reported. A report, not a test: it exits 0
when a target is missed and prints FAIL for it. Markdown to stdout, JSON to
bench/results/archive.json.

Usage:
    python bench/bench_archive.py [--runs 5] [--workdir DIR] [--keep] [--models resnet50,vgg16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import run_measured  # bench/ is on sys.path when a bench runs

TARGET_RATIO = 0.05

MODELS = {
    "resnet50": {
        "label": "ResNet50",
        "build": "keras.applications.ResNet50(weights=None)",
        "spec": "freeze all\nunfreeze conv5_*\n",
    },
    "vgg16": {
        "label": "VGG16 (include_top=True)",
        "build": "keras.applications.VGG16(weights=None, include_top=True)",
        "spec": "freeze all\nunfreeze block5_*, fc1, fc2, predictions\n",
    },
}

FLOOR_CODE = (
    "import keras, sys; "
    "m = keras.models.load_model(sys.argv[1], compile=False); "
    "m.save(sys.argv[2])"
)

# What `surgery apply --engine archive SPEC MODEL -o OUT` does, until the CLI has it.
ARCHIVE_CODE = r"""
import sys
from pathlib import Path

import surgery
from surgery.atomic import AtomicOutputs
from surgery.engines import archive
from surgery.manifest import build_manifest
from surgery.plan import plan_spec
from surgery.report import plan_summary

spec_path, model, out, durable = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
manifest_path = out + ".manifest.json"
spec = surgery.load_spec(spec_path)
tree = archive.describe(model)
plan = plan_spec(spec, tree)


def write(model_out, manifest_out):
    written = archive.write(model, plan, str(model_out))
    manifest = build_manifest(plan, spec, model_source=model, model_sha256=written.source_sha256,
                              model_name=tree.root.name,
                              surgery_version=surgery.__version__)
    manifest.data["output"] = {"sha256": written.sha256}
    Path(manifest_out).write_text(manifest.to_json(), encoding="utf-8")


if durable:
    with AtomicOutputs() as outputs:
        write(outputs.reserve(out, Path(out).suffix), outputs.reserve(manifest_path, ".json"))
        outputs.commit()
else:
    write(out, manifest_path)
print(plan_summary(plan))
print(f"wrote {out}")
"""

MAKE_MODEL_CODE = "import keras, sys; {build}.save(sys.argv[1])"

VERSIONS_CODE = (
    "import json, keras, tensorflow as tf; "
    "print(json.dumps({'keras': keras.__version__, 'tensorflow': tf.__version__}))"
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "archive.json"


def remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".manifest.json")):
        if p.exists():
            p.unlink()


def cli_has_archive_engine(surgery_bin: Path) -> bool:
    if not surgery_bin.exists():
        return False
    result = subprocess.run([str(surgery_bin), "apply", "--help"], capture_output=True,
                            text=True)
    return result.returncode == 0 and "--engine" in result.stdout and "archive" in result.stdout


def machine_info() -> dict:
    versions = json.loads(
        subprocess.run([sys.executable, "-c", VERSIONS_CODE], check=True, capture_output=True,
                       text=True).stdout.strip().splitlines()[-1]
    )
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= TARGET_RATIO else "FAIL"


def bench_model(key: str, workdir: Path, runs: int, use_cli: bool, surgery_bin: Path) -> dict:
    info = MODELS[key]
    model = workdir / f"{key}.keras"
    spec = workdir / f"{key}.frz"
    spec.write_text(info["spec"])
    if not model.exists():
        print(f"building {model} (untimed) ...", flush=True)
        subprocess.run([sys.executable, "-c", MAKE_MODEL_CODE.format(build=info["build"]),
                        str(model)], check=True, stderr=subprocess.DEVNULL)
    size_mb = model.stat().st_size / 1e6

    outs = {name: workdir / f"{key}_{name}.keras" for name in ("floor", "archive", "nofsync")}
    if use_cli:
        archive_argv = [str(surgery_bin), "apply", "--engine", "archive", str(spec), str(model),
                        "-o", str(outs["archive"]), "--force"]
    else:
        archive_argv = [sys.executable, "-c", ARCHIVE_CODE, str(spec), str(model),
                        str(outs["archive"]), "1"]
    commands = {
        "floor": [sys.executable, "-c", FLOOR_CODE, str(model), str(outs["floor"])],
        "archive": archive_argv,
        "nofsync": [sys.executable, "-c", ARCHIVE_CODE, str(spec), str(model),
                    str(outs["nofsync"]), "0"],
    }
    samples = {name: {"wall_s": [], "peak_mib": []} for name in commands}
    for i in range(runs + 1):
        label = "warm-up" if i == 0 else f"run {i}/{runs}"
        for name, argv in commands.items():
            remove(outs[name])
            wall, peak = run_measured(argv, workdir / f"{key}-{name}-{i}")
            print(f"{key:>9} {label:>9}  {name:<8} {wall:7.3f} s  {peak:8.1f} MiB", flush=True)
            if i > 0:
                samples[name]["wall_s"].append(wall)
                samples[name]["peak_mib"].append(peak)
    for out in outs.values():
        remove(out)
    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    ratios = {name: {k: med[name][k] / med["floor"][k] for k in ("wall_s", "peak_mib")}
              for name in ("archive", "nofsync")}
    return {"model": info["label"], "file_mb": round(size_mb, 1), "spec": info["spec"],
            "archive_command": "surgery apply --engine archive" if use_cli else
            "python -c ARCHIVE_CODE (what apply --engine archive does)",
            **{name: {**med[name], "samples": samples[name]} for name in commands},
            "ratio": ratios,
            "pass": {name: {k: r <= TARGET_RATIO for k, r in rs.items()}
                     for name, rs in ratios.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--models", default="resnet50,vgg16",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if args.runs < 1 or not keys or any(k not in MODELS for k in keys):
        parser.error("--runs must be at least 1 and --models a list of known models")

    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(
        prefix="surgery-bench-archive-"))
    workdir.mkdir(parents=True, exist_ok=True)
    surgery_bin = Path(sys.executable).parent / "surgery"
    use_cli = cli_has_archive_engine(surgery_bin)
    try:
        results = [bench_model(k, workdir, args.runs, use_cli, surgery_bin) for k in keys]
        info = machine_info()
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"Machine: {info['cpu_count']} CPUs ({info['machine']}), Python {info['python']}, "
          f"Keras {info['keras']}, TensorFlow {info['tensorflow']}; weights=None, median of "
          f"{args.runs} interleaved runs; archive command: {results[0]['archive_command']}")
    print()
    print("| model | file | command | wall time (s) | peak RSS (MiB) | wall ratio | peak ratio |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        f = r["floor"]
        print(f"| {r['model']} | {r['file_mb']:.0f} MB | `load_model` + `save` (floor) | "
              f"{f['wall_s']:.2f} | {f['peak_mib']:.0f} | 1 | 1 |")
        for name, label in (("archive", "archive engine, as `apply` (atomic, fsync)"),
                            ("nofsync", "archive engine, no fsync")):
            m, ra = r[name], r["ratio"][name]
            print(f"| | | {label} | {m['wall_s']:.3f} | {m['peak_mib']:.0f} | "
                  f"{ra['wall_s']:.3f}x {verdict(ra['wall_s'])} | "
                  f"{ra['peak_mib']:.3f}x {verdict(ra['peak_mib'])} |")
    print()
    print(f"Target: at most {TARGET_RATIO:.2f}x the floor in wall time and in peak memory.")

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({
        "benchmark": "archive engine vs keras load_model + save",
        "runs": args.runs,
        "statistic": "median",
        "target_ratio": TARGET_RATIO,
        "machine": info,
        "load_average_after": os.getloadavg(),
        "results": results,
    }, indent=2) + "\n")
    print(f"results written to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
