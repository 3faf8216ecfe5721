"""Atomic output: files appear at their destination complete, or not at all.

Each output is first written to a hidden temporary file in the destination's own folder (so the
final rename never crosses file systems), and renamed only when every output of the run is ready.
Whatever happens before that (an error, Ctrl-C, SIGTERM, even SIGKILL, which leaves only a hidden
temporary behind), the destinations are left as they were, and the temporaries are removed when
the process can still do it.

That needs no fsync: a killed process cannot undo a rename, and the kernel keeps the data it was
given. Only a power loss or a kernel crash can lose data the kernel has not written to the disk
yet, so flushing to the disk is opt-in (``AtomicOutputs(fsync=True)``, ``--fsync`` on the
command line): the temporaries are then flushed before the renames and their folders after. It
costs about as much as the write itself on a large model, and ``model.save`` does not do it.

The commit itself is all-or-nothing too: every existing destination is first kept under a hidden
backup name (a hard link where the file system has them, so the destination never disappears),
then the temporaries are renamed in, then the backups are removed. A failing rename puts the
backups back. SIGINT and SIGTERM that arrive meanwhile (Python handles them in the main thread)
are held for the few system calls this takes and delivered, as usual, once the commit is complete.

Temporary and backup names are short (``.surgery-<pid>-<random>.tmp<suffix>``), whatever the
destination's name, so an output whose name is close to the file system's limit can be written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from pathlib import Path

from .errors import SurgeryError

__all__ = ["AtomicOutputs"]


class _Output:
    """One reserved output and how far its commit got (for undoing a partial commit)."""

    __slots__ = ("tmp", "dest", "typed", "backup", "moved", "started")

    def __init__(self, tmp: Path, dest: Path, typed: str):
        self.tmp = tmp
        self.dest = dest
        self.typed = typed  # the destination as the caller named it, for messages
        self.backup: Path | None = None  # the destination's previous content, kept during commit
        self.moved = False  # the backup was made by a rename: the destination is gone meanwhile
        self.started = False  # the temporary's rename onto the destination was attempted


class AtomicOutputs:
    """Use as a context manager: `reserve` temporaries, write them, `commit` renames them all."""

    def __init__(self, *, fsync: bool = False) -> None:
        self._pending: list[_Output] = []
        self.committed = False
        self.fsync = fsync  # flush the outputs to the disk (power-loss durability), see above

    def reserve(self, destination: str | os.PathLike, suffix: str) -> Path:
        """A temporary path to write ``destination``'s content to. It is not created: the caller's
        writer creates it (with the usual permissions). Keras picks the format from the suffix,
        so the temporary keeps the one given."""
        dest = Path(destination)
        tmp = _hidden_name(dest.parent, ".tmp" + suffix)
        self._pending.append(_Output(tmp, dest, os.fspath(destination)))
        return tmp

    def commit(self) -> None:
        """Rename every temporary onto its destination: all of them, or (on an error) none."""
        if self.fsync:
            for out in self._pending:
                try:
                    _fsync(out.tmp)
                except OSError as exc:
                    raise _cannot_write(out.typed, exc) from None
        with _signals_held():
            current = None
            try:
                for out in self._pending:
                    current = out
                    _set_aside(out)
                for out in self._pending:
                    current = out
                    out.started = True
                    os.replace(out.tmp, out.dest)
            except BaseException as exc:
                _undo(self._pending)
                if isinstance(exc, OSError) and current is not None:
                    raise _cannot_write(current.typed, exc) from None
                raise
            for out in self._pending:
                if out.backup is not None:
                    _remove(out.backup)
            dirs = {out.dest.parent for out in self._pending}
            self._pending.clear()
            self.committed = True
            if self.fsync:
                _fsync_dirs(dirs)

    def discard(self) -> None:
        """Remove every temporary not committed; best effort, so that it never hides the error
        that led here (a name the file system refuses cannot be removed either)."""
        pending, self._pending = self._pending, []
        for out in pending:
            _remove(out.tmp)

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit nothing is pending; otherwise nothing must be left


def _hidden_name(folder: Path, suffix: str) -> Path:
    while True:
        path = folder / f".surgery-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        if not os.path.lexists(path):
            return path


def _set_aside(out: _Output) -> None:
    """Keep the destination's current content under a hidden backup name, if there is one."""
    if not os.path.lexists(out.dest):
        return
    out.backup = _hidden_name(out.dest.parent, ".bak")
    try:
        os.link(out.dest, out.backup, follow_symlinks=False)
        return
    except (OSError, NotImplementedError):  # no hard links here: move it aside instead
        pass
    out.moved = True
    os.replace(out.dest, out.backup)


def _undo(outputs: list[_Output]) -> None:
    """Put back what a partial commit changed (best effort: this runs while an error is raised)."""
    for out in reversed(outputs):
        try:
            if out.backup is not None:
                if out.moved or (out.started and not os.path.lexists(out.tmp)):
                    os.replace(out.backup, out.dest)  # the previous content, back in place
                else:
                    os.unlink(out.backup)  # a hard link: the destination was never replaced
            elif out.started and not os.path.lexists(out.tmp):
                os.unlink(out.dest)  # there was nothing before: remove the new file
        except OSError:
            pass


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _cannot_write(typed: str, exc: OSError) -> SurgeryError:
    return SurgeryError(f"{typed}: cannot write: {exc.strerror or exc}")


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done; then they are delivered as usual.

    Python runs signal handlers in the main thread, between bytecodes; for the block, the handlers
    only take note, and the signals noted are raised again once the previous handlers are back.
    (Blocking the signals with pthread_sigmask would not do: it holds them for the calling thread
    only, and Keras's threads would take them, the main thread still running the handler.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs handlers: nothing interrupts this one
        return
    noted: list[int] = []

    def note(signum, frame):
        noted.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:  # installed by C code: it cannot be put back, so it is left alone
            continue
        signal.signal(sig, note)
        previous[sig] = handler
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


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
