"""Measuring one child process: wall time and its own peak memory (shared by the benches).

Peak memory is the child's ru_maxrss from os.wait4, not RUSAGE_CHILDREN, which is a running
maximum over every child reaped so far. The same rusage gives the child's CPU time (user +
system), which another process competing for the cores changes far less than the wall time;
on Linux the CPU time the rest of the machine used meanwhile is read from /proc/stat, so a run
disturbed by something else (a test suite, a writeback of dirty pages) can be told apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

__all__ = ["run_measured", "measure", "Measured", "precompile"]


class Measured(NamedTuple):
    wall_s: float  # whole process, start to exit
    peak_mib: float  # the child's own peak RSS
    cpu_s: float  # the child's user + system CPU time (its threads included)
    others_cpu_s: float  # CPU time used meanwhile by everything else (NaN where unknown)


def run_measured(argv: list[str], log_stem: Path) -> tuple[float, float]:
    """Run argv to completion; return (wall seconds, peak RSS in MiB)."""
    m = measure(argv, log_stem)
    return m.wall_s, m.peak_mib


def measure(argv: list[str], log_stem: Path) -> Measured:
    """Run argv to completion and measure it.

    The child's output goes to files rather than pipes: with wait4 nobody
    would be reading a pipe, and a chatty child (TensorFlow logs) would block
    once the pipe buffer filled.
    """
    out_path = log_stem.with_suffix(".stdout")
    err_path = log_stem.with_suffix(".stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy_before = _busy_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy_after = _busy_cpu_s()
    # Popen does not know we reaped the child; tell it, so it does not try
    # to wait on a pid that may since have been reused.
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(
            f"command failed with exit code {proc.returncode}: {' '.join(argv)}\n"
            f"--- stderr ---\n{err_path.read_text(errors='replace')}\n"
        )
        raise SystemExit(1)
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    peak_mib = rusage.ru_maxrss * scale / (1024 * 1024)
    cpu = rusage.ru_utime + rusage.ru_stime
    others = float("nan")
    if busy_before is not None and busy_after is not None:
        others = max(0.0, busy_after - busy_before - cpu)
    return Measured(wall, peak_mib, cpu, others)


def _busy_cpu_s() -> float | None:
    """Non-idle CPU seconds of the whole machine so far (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def precompile() -> str:
    """Write the bytecode of the installed `surgery` package, as `pip install` of the wheel
    does; returns the package folder. Without it, an environment with
    PYTHONDONTWRITEBYTECODE=1 (or a read-only source tree) compiles every module of surgery
    from source on every run (about 50 ms on 2 cores), which no installed copy pays; Keras,
    TensorFlow and Lark, installed by pip, already have theirs."""
    code = ("import compileall, importlib.util, os; "
            "d = os.path.dirname(importlib.util.find_spec('surgery').origin); "
            "compileall.compile_dir(d, quiet=1); print(d)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True)
    return done.stdout.strip()


_VERSIONS_CODE = (
    "import json, keras, tensorflow as tf; "
    "print(json.dumps({'keras': keras.__version__, 'tensorflow': tf.__version__}))"
)


def machine_info() -> dict:
    """The machine and the Keras/TensorFlow versions the figures were measured with (read in a
    child process, so the bench itself never imports TensorFlow)."""
    versions = json.loads(
        subprocess.run([sys.executable, "-c", _VERSIONS_CODE], check=True, capture_output=True,
                       text=True).stdout.strip().splitlines()[-1]
    )
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def interleave(commands: dict[str, list[str]], runs: int, workdir: Path,
               before_each=None) -> dict[str, dict[str, list[float]]]:
    """Run each command once untimed (warm-up), then ``runs`` times interleaved (a, b, c, a, b,
    c, ...), so that slow drift of a shared machine hits every command alike; returns each
    command's samples of every `Measured` field. ``before_each(name)`` runs untimed before each
    run (delete the last output, sync)."""
    samples = {name: {f: [] for f in Measured._fields} for name in commands}
    for i in range(runs + 1):
        label = "warm-up" if i == 0 else f"run {i}/{runs}"
        for name, argv in commands.items():
            if before_each is not None:
                before_each(name)
            m = measure(argv, workdir / f"{name}-{i}")
            print(f"{label:>9}  {name:<14} {m.wall_s:7.2f} s  cpu {m.cpu_s:6.2f} s  "
                  f"{m.peak_mib:8.1f} MiB  others {m.others_cpu_s:5.2f} s", flush=True)
            if i > 0:
                for f in Measured._fields:
                    samples[name][f].append(getattr(m, f))
    return samples


@contextlib.contextmanager
def work_directory(requested: Optional[Path], keep: bool, prefix: str):
    """The bench's work folder: ``requested`` (created) or a new temporary one, removed at the
    end unless ``keep``."""
    workdir = requested.resolve() if requested else Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield workdir
    finally:
        if keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def write_results(path: Path, result: dict) -> None:
    """The figures as JSON beside the bench (bench/results/, not committed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
