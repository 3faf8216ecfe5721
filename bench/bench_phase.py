"""Benchmark the cost of a phase change made by `surgery.Schedule` during ``model.fit``.

What it measures, on keras.applications.MobileNetV2(alpha=0.35, weights=None) at 96x96, batch
16, Adam, synthetic data, ``--steps`` steps per epoch, through one ordinary
``model.fit(..., callbacks=[surgery.Schedule(spec)])`` with four phases of ``--epochs-per-phase``
epochs each (the classifier; + the top block; + blocks 13-15; everything):

(a) for every phase change, the wall time of the first epoch of the new phase against the median
    of the other epochs of that same phase (the "normal" epochs, which train exactly the same
    variables with the same train function);
(b) the time spent inside the callback's phase change itself (``Schedule.on_epoch_begin``, timed
    around the call: planning is done at train begin, so this is writing the flags and classes,
    rebuilding the optimizer's state for the new trainable set and making a new train function);
    the rest of (a)'s extra time is TensorFlow tracing the new train function on its first step;
(c) for reference, the first epoch of the run (where Keras traces the train function anyway)
    against the normal epochs of phase 0; and, after the scheduled fit, the hand-written way to
    the last phase's state in the same process (``model.compile`` again and ``fit``, as the
    TensorFlow tutorial does between its phases): its first epoch against its other epochs.

Why it is built this way:

* Each run is a fresh process (``--child``), as a training job is: nothing traced or allocated by
  an earlier run is reused. Runs are sequential, so they do not compete for the cores.
* Every ratio compares epochs of the same run and the same phase, so a machine that is slower
  during one run moves both sides; the figures are the medians over runs of each run's ratios.
* Epochs are timed from ``on_epoch_begin`` to ``on_epoch_end`` of a callback placed before the
  Schedule: the phase change is inside the epoch it starts, as the user sees it. No validation.
* Process CPU time per epoch is recorded too; on a shared machine it moves less than wall time.

It is a report, not a test: it exits 0 whatever the figures. Results go to stdout as a Markdown
table and to bench/results/phase.json.

The Keras backend is the one KERAS_BACKEND names (tensorflow by default), or ``--backend``;
on JAX the extra time of a phase change is XLA compiling the new train step.

Usage:
    python bench/bench_phase.py [--runs 5] [--steps 30] [--epochs-per-phase 4]
                                [--policy affine|frozen|train] [--backend tensorflow|jax|torch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

BATCH = 16
CLASSES = 10
ALPHA = 0.35

# The names of keras.applications.MobileNetV2(alpha=0.35, include_top=True): top to bottom.
PHASES = (
    "freeze all\nunfreeze predictions\nbatchnorm {policy}\n",
    "unfreeze block_16_*, Conv_1, Conv_1_bn\n",
    "unfreeze block_13_*, block_14_*, block_15_*\n",
    "unfreeze all\n",
)


def spec_text(epochs_per_phase: int, policy: str) -> str:
    out = PHASES[0].format(policy=policy)
    for i, body in enumerate(PHASES[1:], start=1):
        out += f"at epoch {i * epochs_per_phase}:\n  {body}"
    return out


# --- one run (a child process) -------------------------------------------------------------------


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    import surgery

    keras.utils.set_random_seed(0)
    shape = (args.size, args.size, 3)
    model = keras.applications.MobileNetV2(alpha=ALPHA, input_shape=shape, weights=None,
                                           classes=CLASSES)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    n = args.steps * BATCH
    x = rng.standard_normal((n,) + shape).astype("float32")
    y = rng.integers(0, CLASSES, n)

    schedule = surgery.Schedule(spec_text(args.epochs_per_phase, args.policy), verbose=0)
    callback_s: dict[int, float] = {}
    inner = schedule.on_epoch_begin

    def timed_on_epoch_begin(epoch, logs=None):
        t = time.perf_counter()
        inner(epoch, logs)
        callback_s[epoch] = time.perf_counter() - t

    schedule.on_epoch_begin = timed_on_epoch_begin

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall: dict[int, float] = {}
            self.cpu: dict[int, float] = {}

        def on_epoch_begin(self, epoch, logs=None):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.wall[epoch] = time.perf_counter() - self._t
            self.cpu[epoch] = time.process_time() - self._c

    timer = EpochTimer()
    epochs = len(PHASES) * args.epochs_per_phase
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=[timer, schedule])
    opt = model.optimizer
    optimizer_variables = len(opt.variables)
    # The hand-written way to the last phase, for comparison: compile again (a new optimizer and
    # train function, as the tutorial's second compile) and fit, the flags left as they are.
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    recompiled = EpochTimer()
    model.fit(x, y, batch_size=BATCH, epochs=args.epochs_per_phase, shuffle=False, verbose=0,
              callbacks=[recompiled])
    print(json.dumps({
        "wall_s": [timer.wall[e] for e in range(epochs)],
        "cpu_s": [timer.cpu[e] for e in range(epochs)],
        "callback_s": [callback_s[e] for e in range(epochs)],
        "phase": history.history["surgery_phase"],
        "trainable_params": history.history["trainable_params"],
        "changes": [{"epoch": c.epoch, "phase": c.phase, "unfrozen": len(c.unfrozen),
                     "changed": len(c.changed), "before": c.trainable_params_before,
                     "after": c.trainable_params_after} for c in schedule.phase_changes],
        "optimizer_variables": optimizer_variables,
        "recompiled_wall_s": [recompiled.wall[e] for e in range(args.epochs_per_phase)],
        "recompiled_cpu_s": [recompiled.cpu[e] for e in range(args.epochs_per_phase)],
        "jit_compile": bool(getattr(model, "jit_compile", False)),
        "backend": keras.backend.backend(),
        "params": model.count_params(),
    }))


# --- the parent: runs, medians, the table ----------------------------------------------------------


def one_run(args) -> dict:
    argv = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--size",
            str(args.size), "--epochs-per-phase", str(args.epochs_per_phase), "--policy",
            args.policy]
    env = dict(os.environ, KERAS_BACKEND=args.backend)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"a run failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(run: dict, epp: int) -> list[dict]:
    """Per phase of one run: its first epoch against the median of its other epochs."""
    out = []
    for p in range(len(PHASES)):
        first = p * epp
        rest = range(first + 1, first + epp)
        normal = statistics.median(run["wall_s"][e] for e in rest)
        normal_cpu = statistics.median(run["cpu_s"][e] for e in rest)
        out.append({
            "epoch": first,
            "first_s": run["wall_s"][first],
            "normal_s": normal,
            "ratio": run["wall_s"][first] / normal,
            "ratio_cpu": run["cpu_s"][first] / normal_cpu,
            "extra_s": run["wall_s"][first] - normal,
            "callback_s": run["callback_s"][first],
            "callback_normal_s": statistics.median(run["callback_s"][e] for e in rest),
            "trainable_params": run["trainable_params"][first],
        })
    wall, cpu = run["recompiled_wall_s"], run["recompiled_cpu_s"]
    normal, normal_cpu = statistics.median(wall[1:]), statistics.median(cpu[1:])
    out.append({
        "epoch": None, "first_s": wall[0], "normal_s": normal, "ratio": wall[0] / normal,
        "ratio_cpu": cpu[0] / normal_cpu, "extra_s": wall[0] - normal, "callback_s": 0.0,
        "callback_normal_s": 0.0, "trainable_params": run["trainable_params"][-1],
    })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="steps per epoch")
    ap.add_argument("--size", type=int, default=96, help="input height and width")
    ap.add_argument("--epochs-per-phase", type=int, default=4)
    ap.add_argument("--policy", choices=("affine", "frozen", "train"), default="affine")
    ap.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                    default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.epochs_per_phase < 2:
        ap.error("--epochs-per-phase must be at least 2: a phase needs a normal epoch")
    if args.child:
        child(args)
        return 0

    epp = args.epochs_per_phase
    runs = []
    for i in range(args.runs):
        t = time.perf_counter()
        runs.append(one_run(args))
        print(f"run {i + 1}/{args.runs}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    per_run = [ratios(r, epp) for r in runs]

    def med(p, key):
        return statistics.median(pr[p][key] for pr in per_run)

    def spread(p, key):
        values = [pr[p][key] for pr in per_run]
        return min(values), max(values)

    rows = []
    for p in range(len(PHASES) + 1):
        rows.append({k: med(p, k) for k in per_run[0][p] if k != "epoch"} | {
            "epoch": per_run[0][p]["epoch"], "ratio_range": spread(p, "ratio"),
            "trainable_params": per_run[0][p]["trainable_params"]})
    phase_change = rows[1:len(PHASES)]

    head = ("| at the start of | trainable params | first epoch | normal epoch | first / normal "
            "(wall) | first / normal (CPU) | in the callback |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for p, row in enumerate(rows):
        what = ("epoch 0 (run start: first trace)" if p == 0 else
                f"epoch {row['epoch']} (phase change)" if p < len(PHASES) else
                "compile + fit again, last phase's state (by hand)")
        lo, hi = row["ratio_range"]
        lines.append(
            f"| {what} | {row['trainable_params']:,} | {row['first_s']:.2f} s | "
            f"{row['normal_s']:.2f} s | **{row['ratio']:.2f}×** ({lo:.2f}–{hi:.2f}) | "
            f"{row['ratio_cpu']:.2f}× | {row['callback_s'] * 1000:.0f} ms |")
    print("\n".join(lines))
    print(f"\nmedians of {args.runs} runs (min–max of the wall ratio in brackets); "
          f"MobileNetV2 alpha={ALPHA} {args.size}x{args.size}, batch {BATCH}, "
          f"{args.steps} steps per epoch, Adam, batchnorm {args.policy}, "
          f"backend {runs[0]['backend']}, "
          f"jit_compile={runs[0]['jit_compile']}")
    extra = [r["extra_s"] for r in phase_change]
    cb = [r["callback_s"] for r in phase_change]
    print(f"a phase change adds {min(extra):.2f}–{max(extra):.2f} s to its epoch, of which "
          f"{min(cb) * 1000:.0f}–{max(cb) * 1000:.0f} ms in the callback; the first epoch of "
          f"the run adds {rows[0]['extra_s']:.2f} s; compiling again by hand for the last "
          f"phase's state adds {rows[-1]['extra_s']:.2f} s")

    import importlib.metadata

    import keras

    # One file per backend (phase.json stays TensorFlow's), so that both sit side by side.
    results_path = RESULTS_DIR / ("phase.json" if args.backend == "tensorflow"
                                  else f"phase-{args.backend}.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({
        "command": "python bench/bench_phase.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])),
        "model": f"MobileNetV2(alpha={ALPHA}, input_shape=({args.size}, {args.size}, 3), "
                 f"weights=None, classes={CLASSES})",
        "batch": BATCH, "steps_per_epoch": args.steps, "epochs_per_phase": epp,
        "policy": args.policy, "spec": spec_text(epp, args.policy),
        "keras": keras.__version__, "backend": args.backend,
        args.backend: importlib.metadata.version(args.backend),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "phases": rows, "runs": runs,
    }, indent=2) + "\n")
    print(f"\nwrote {results_path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
