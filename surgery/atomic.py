"""Atomic output: files appear at their destination complete, or not at all.

Each output is first written to a hidden temporary file in the destination's own folder (so the
final rename never crosses file systems), flushed to disk, and renamed only when every output of
the run is ready. Whatever happens before that (an error, Ctrl-C, SIGTERM), the temporaries are
removed and the destinations are left as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["AtomicOutputs"]


class AtomicOutputs:
    """Use as a context manager: `reserve` temporaries, write them, `commit` renames them all."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def reserve(self, destination: str | os.PathLike, suffix: str) -> Path:
        dest = Path(destination)
        # Keras picks the format from the suffix, so the temporary keeps the destination's.
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp{suffix}")
        self._pending.append((tmp, dest))
        return tmp

    def commit(self) -> None:
        for tmp, _ in self._pending:
            _fsync(tmp)
        for tmp, dest in self._pending:
            os.replace(tmp, dest)
        _fsync_dirs({dest.parent for _, dest in self._pending})
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._pending.clear()

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit nothing is pending; otherwise nothing must be left


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dirs(dirs) -> None:
    for d in dirs:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
