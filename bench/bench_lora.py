"""Benchmark a LoRA training step set up by surgery against keras_hub's own and full fine-tuning.

What it measures, on a keras_hub BertBackbone built from constructor arguments (the largest the
2-core CI machine affords: 4 layers, hidden 256, 4 heads, feed-forward 1024, sequence 128) with
a Dense head on its pooled output, batch 8, Adam, synthetic tokens, ``model.fit`` for
``--epochs`` epochs of ``--steps`` steps:

* ``full``: every variable trains;
* ``keras_hub``: ``backbone.enable_lora(8)`` (rank 8 on the layers named query and value; it
  freezes everything else and leaves those layers' biases training), the head trainable;
* ``surgery``: ``surgery.apply`` of ``freeze all; lora rank=8 **/self_attention_layer/query,
  **/self_attention_layer/value; unfreeze **/self_attention_layer/query,
  **/self_attention_layer/value; unfreeze head``: the same trainable set as keras_hub's (the
  factors and the biases; the kernels held), checked before timing.

Per mode: the median wall and process CPU time of a step (each epoch timed by a callback, the
first epoch left out: it traces the train function; CPU time moves less than wall time on a
shared machine), and the peak resident memory the fit adds (``ru_maxrss``
after the fit minus before it). Each mode runs in a fresh process, modes in rotated order within
each run, runs sequential; ratios are taken within a run, medians over runs.

It is a report, not a test: it exits 0 whatever the figures. Results go to stdout as a Markdown
table and to bench/results/lora.json.

Usage:
    python bench/bench_lora.py [--runs 5] [--steps 20] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "bench" / "results" / "lora.json"
MODES = ("full", "keras_hub", "surgery")
BATCH, SEQ, RANK = 8, 128, 8
BERT = dict(vocabulary_size=5000, num_layers=4, num_heads=4, hidden_dim=256,
            intermediate_dim=1024, max_sequence_length=SEQ)
QV = "**/self_attention_layer/query, **/self_attention_layer/value"
SPEC = f"freeze all\nlora rank={RANK} {QV}\nunfreeze {QV}\nunfreeze head\n"


def child(mode: str, steps: int, epochs: int) -> dict:
    import resource
    import time

    import numpy as np
    import keras
    import keras_hub

    import surgery

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(**BERT, name="bert_backbone")
    inputs = {k: keras.Input((SEQ,), dtype="int32", name=k)
              for k in ("token_ids", "segment_ids", "padding_mask")}
    out = keras.layers.Dense(1, name="head")(backbone(inputs)["pooled_output"])
    model = keras.Model(inputs, out)
    if mode == "keras_hub":
        backbone.enable_lora(RANK)
    elif mode == "surgery":
        surgery.apply(model, SPEC)
    trained = sorted(v.path for v in model.trainable_weights)
    rng = np.random.default_rng(0)
    n = BATCH * steps
    x = {"token_ids": rng.integers(1, BERT["vocabulary_size"], (n, SEQ)).astype("int32"),
         "segment_ids": np.zeros((n, SEQ), "int32"), "padding_mask": np.ones((n, SEQ), "int32")}
    y = rng.standard_normal((n, 1)).astype("float32")
    times, cpu = [], []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[Timer()])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "step_s": statistics.median(times[1:]) / steps,
            "step_cpu_s": statistics.median(cpu[1:]) / steps,
            "fit_rss_mib": (after - before) / 1024, "peak_rss_mib": after / 1024,
            "trainable": trained,
            "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.epochs)))
        return
    runs = []
    for r in range(args.runs):
        order = MODES[r % 3:] + MODES[:r % 3]
        got = {}
        for mode in order:
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--steps",
                                   str(args.steps), "--epochs", str(args.epochs)],
                                  capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            got[mode] = json.loads(lines[-1][len("RESULT "):])
        if got["surgery"]["trainable"] != got["keras_hub"]["trainable"]:
            sys.exit("surgery and keras_hub train different variables: the comparison is void")
        runs.append(got)
        print(f"run {r + 1}: " + ", ".join(f"{m} {got[m]['step_s'] * 1000:.1f} ms"
                                             for m in MODES), file=sys.stderr)

    def med(f):
        return statistics.median(f(run) for run in runs)

    summary = {
        "step_ms": {m: med(lambda run, m=m: run[m]["step_s"] * 1000) for m in MODES},
        "step_cpu_ms": {m: med(lambda run, m=m: run[m]["step_cpu_s"] * 1000) for m in MODES},
        "fit_rss_mib": {m: med(lambda run, m=m: run[m]["fit_rss_mib"]) for m in MODES},
        "peak_rss_mib": {m: med(lambda run, m=m: run[m]["peak_rss_mib"]) for m in MODES},
        "trainable_params": {m: runs[0][m]["trainable_params"] for m in MODES},
        "surgery_vs_keras_hub_step": med(
            lambda run: run["surgery"]["step_s"] / run["keras_hub"]["step_s"]),
        "surgery_vs_full_step": med(lambda run: run["surgery"]["step_s"] / run["full"]["step_s"]),
        "surgery_vs_keras_hub_step_cpu": med(
            lambda run: run["surgery"]["step_cpu_s"] / run["keras_hub"]["step_cpu_s"]),
        "surgery_vs_keras_hub_step_per_run": [
            run["surgery"]["step_s"] / run["keras_hub"]["step_s"] for run in runs],
        "surgery_vs_keras_hub_peak": med(
            lambda run: run["surgery"]["peak_rss_mib"] / run["keras_hub"]["peak_rss_mib"]),
        "surgery_vs_full_peak": med(
            lambda run: run["surgery"]["peak_rss_mib"] / run["full"]["peak_rss_mib"]),
    }
    result = {"runs": args.runs, "steps": args.steps, "epochs": args.epochs, "batch": BATCH,
              "seq": SEQ, "rank": RANK, "bert": BERT, "machine": platform.platform(),
              "cpus": os.cpu_count(), "summary": summary,
              "per_run": [{m: {k: v for k, v in run[m].items() if k != "trainable"}
                           for m in MODES} for run in runs]}
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=1) + "\n")
    print("| mode | trainable params | step, wall (ms) | step, CPU (ms) | peak RSS (MiB) | "
          "RSS added by fit (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in MODES:
        print(f"| {m} | {summary['trainable_params'][m]:,} | {summary['step_ms'][m]:.1f} | "
              f"{summary['step_cpu_ms'][m]:.1f} | "
              f"{summary['peak_rss_mib'][m]:.0f} | {summary['fit_rss_mib'][m]:.0f} |")
    spread = summary["surgery_vs_keras_hub_step_per_run"]
    print(f"\nsurgery / keras_hub: step {summary['surgery_vs_keras_hub_step']:.3f}x wall "
          f"(per run {min(spread):.2f}-{max(spread):.2f}), "
          f"{summary['surgery_vs_keras_hub_step_cpu']:.3f}x CPU, peak "
          f"{summary['surgery_vs_keras_hub_peak']:.3f}x; surgery / full: step "
          f"{summary['surgery_vs_full_step']:.3f}x, peak {summary['surgery_vs_full_peak']:.3f}x "
          f"(medians of per-run ratios, {args.runs} runs)")


if __name__ == "__main__":
    main()
