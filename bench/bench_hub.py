"""Benchmark `surgery plan` and `surgery apply --engine keras` on a BERT-base-sized keras_hub model.

What it measures: wall time and peak RSS of `surgery plan` and `surgery apply --engine keras` on
a saved `keras_hub.models.BertBackbone` of BERT-base size (12 layers, hidden 768, 12 heads,
intermediate 3072, vocabulary 30,522: about 110 M parameters, 440 MB), built from constructor
arguments (no preset download), next to the floors no tool can go under: a bare
`keras.models.load_model` (for `plan`, which must see the model) and `load_model` + `model.save`
(for `apply`), with keras_hub imported as surgery imports it (its classes must be registered).
Target (issue 13): within 1.10x of the floor in wall time and peak memory.

The spec reaches inside the encoder blocks (`**/type:LayerNormalization`), so the layer tree is
described to every depth, and keras_hub's saved config keeps no per-layer flags, so `apply`
records the decided state in the output archive: both costs are in the figures.

Method as bench/bench_apply.py: whole processes, interleaved after one untimed warm-up, medians,
peak RSS from os.wait4, surgery's bytecode written first. A report, not a test: a missed target
prints FAIL and the exit code stays 0. Markdown to stdout, JSON to bench/results/hub.json.

Usage:
    python bench/bench_hub.py [--runs 5] [--workdir DIR] [--keep] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _measure import interleave, machine_info, precompile, work_directory, write_results  # bench/ is on sys.path

TARGET_RATIO = 1.10

SPEC_TEXT = ("freeze token_embedding, position_embedding, segment_embedding\n"
             "freeze transformer_layer_[0-8]\n"
             "unfreeze **/type:LayerNormalization\n")

BERT_BASE = dict(vocabulary_size=30522, num_layers=12, num_heads=12, hidden_dim=768,
                 intermediate_dim=3072, max_sequence_length=512)
# --small: the same architecture at test size, to check the bench itself in seconds.
BERT_SMALL = dict(vocabulary_size=500, num_layers=12, num_heads=2, hidden_dim=32,
                  intermediate_dim=64, max_sequence_length=32)

MAKE_MODEL_CODE = ("import json, sys, keras_hub; "
                   "keras_hub.models.BertBackbone(**json.loads(sys.argv[2])).save(sys.argv[1])")
LOAD_CODE = ("import sys, keras, keras_hub; "
             "keras.models.load_model(sys.argv[1], compile=False)")
LOAD_SAVE_CODE = ("import sys, keras, keras_hub; "
                  "keras.models.load_model(sys.argv[1], compile=False).save(sys.argv[2])")

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "hub.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny dimensions (checks the bench)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    surgery_bin = str(Path(sys.executable).parent / "surgery")
    dims = BERT_SMALL if args.small else BERT_BASE
    print(f"bytecode written for {precompile()}", flush=True)
    with work_directory(args.workdir, args.keep, "surgery-bench-hub-") as workdir:
        model, spec = workdir / "bert.keras", workdir / "spec.frz"
        spec.write_text(SPEC_TEXT)
        print(f"building {model} (untimed) ...", flush=True)
        subprocess.run([sys.executable, "-c", MAKE_MODEL_CODE, str(model), json.dumps(dims)],
                       check=True)
        outs = {"floor_apply": workdir / "floor.keras", "apply": workdir / "out.keras"}
        commands = {
            "floor_plan": [sys.executable, "-c", LOAD_CODE, str(model)],
            "plan": [surgery_bin, "plan", str(spec), str(model), "--engine", "keras"],
            "floor_apply": [sys.executable, "-c", LOAD_SAVE_CODE, str(model),
                            str(outs["floor_apply"])],
            "apply": [surgery_bin, "apply", str(spec), str(model), "-o", str(outs["apply"]),
                      "--force", "--engine", "keras"],
        }

        def before_each(name: str) -> None:
            out = outs.get(name)
            for p in (out, out and out.with_name(out.name + ".manifest.json")):
                if p is not None and p.exists():
                    p.unlink()
            os.sync()  # no run pays for the writeback of the one before

        samples = interleave(commands, args.runs, workdir, before_each)
        info = machine_info()

    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    rows = []
    for cmd, floor in (("plan", "floor_plan"), ("apply", "floor_apply")):
        ratio = {k: med[cmd][k] / med[floor][k] for k in ("wall_s", "peak_mib")}
        rows.append((cmd, floor, ratio))
    size = "test-size" if args.small else "BERT-base-size"
    print(f"\nMachine: {info['cpu_count']} CPUs, Python {info['python']}, Keras {info['keras']}, "
          f"TensorFlow {info['tensorflow']}; {size} BertBackbone, median of {args.runs} runs\n")
    print("| command | floor | floor wall, peak | surgery wall, peak | wall ratio | peak ratio |")
    print("|---|---|---|---|---|---|")
    labels = {"floor_plan": "`load_model`", "floor_apply": "`load_model` + `save`"}
    for cmd, floor, r in rows:
        f, s = med[floor], med[cmd]
        print(f"| `surgery {cmd} --engine keras` | {labels[floor]} | {f['wall_s']:.2f} s, "
              f"{f['peak_mib']:.0f} MiB | {s['wall_s']:.2f} s, {s['peak_mib']:.0f} MiB | "
              f"{r['wall_s']:.3f}x | {r['peak_mib']:.3f}x |")
    failed = [f"{cmd} {k}" for cmd, _, r in rows for k, v in r.items() if v > TARGET_RATIO]
    print("\n" + (f"FAIL (over {TARGET_RATIO:.2f}x): {', '.join(failed)}" if failed
                  else f"PASS: within {TARGET_RATIO:.2f}x of the floor"))
    result = {"benchmark": f"surgery plan/apply --engine keras vs load_model(+save), {size} "
                           f"BertBackbone", "dims": dims, "runs": args.runs,
              "statistic": "median", "target_ratio": TARGET_RATIO, "machine": info,
              "median": med, "samples": samples,
              "ratio": {cmd: r for cmd, _, r in rows}}
    write_results(RESULTS_PATH, result)
    return 0  # a report, not a test


if __name__ == "__main__":
    sys.exit(main())
