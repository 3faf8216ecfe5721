"""Measuring one child process: wall time and its own peak memory (shared by the benches).

Peak memory is the child's ru_maxrss from os.wait4, not RUSAGE_CHILDREN, which is a running
maximum over every child reaped so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_measured"]


def run_measured(argv: list[str], log_stem: Path) -> tuple[float, float]:
    """Run argv to completion; return (wall seconds, peak RSS in MiB).

    The child's output goes to files rather than pipes: with wait4 nobody
    would be reading a pipe, and a chatty child (TensorFlow logs) would block
    once the pipe buffer filled.
    """
    out_path = log_stem.with_suffix(".stdout")
    err_path = log_stem.with_suffix(".stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
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
    return wall, peak_mib
