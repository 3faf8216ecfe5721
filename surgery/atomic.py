"""Atomic output: files appear at their destination complete, or not at all.

Each output is first written to a temporary file in the destination's own folder (so the final
link or rename never crosses file systems; anonymous where Linux allows it, see SIGKILL below),
and put in place only when every output of the run is ready. Whatever happens before that (an
error, Ctrl-C, SIGTERM, even SIGKILL), the destinations are left as they were, and the
temporaries are removed when the process can still do it.

That needs no fsync: a killed process cannot undo a rename, and the kernel keeps the data it was
given. Only a power loss or a kernel crash can lose data the kernel has not written to the disk
yet, so flushing to the disk is opt-in (``AtomicOutputs(fsync=True)``, ``--fsync`` on the
command line): the temporaries are then flushed before the renames and their folders after. It
costs about as much as the write itself on a large model, and ``model.save`` does not do it.

**New outputs are claimed at the commit, not only checked at the start.** An output reserved
without ``replace`` is put in place with ``link(temporary, destination)``, which fails if the
destination exists, then the temporary's name is dropped: of two runs writing the same new file,
exactly one gets it and the other fails with `OutputExists` (a check at start-up alone lets both
pass it, and the second rename silently replaces the first). Where the file system has no hard
links, the name is claimed with ``open(O_CREAT | O_EXCL)`` and the temporary renamed onto it.

**Replacing** (``replace=True``, ``--force``): every existing destination is first kept under a
hidden backup name (a hard link where the file system has them, so the destination never
disappears), then the temporaries are renamed in, then the backups are removed. A replaced file
keeps its permissions, and a destination that is a symlink is written through (its target is
replaced, the link stays), as an editor saves a file. A failing step
puts the backups back, and removes the new outputs it had placed. SIGINT and SIGTERM that arrive
meanwhile (Python handles them in the main thread) are held for the few system calls this takes
and delivered, as usual, once the commit is complete: `InterruptedAfterCommit` then says that
every output is in place.

**SIGKILL** runs no cleanup. Where Linux gives it (``O_TMPFILE``, on ext4, XFS, btrfs, tmpfs
and overlayfs), a temporary is an anonymous file in the destination's folder: it has no name
until the commit gives it one (``linkat`` through ``/proc/self/fd``, which fails if the name is
taken: the exclusive claim above), so a killed run leaves nothing at all, the kernel frees it
with the process. Writers reach it by the path `reserve` returns, ``/proc/self/fd/N``, which
opens that file (Keras's savers are given the format by the suffix separately, see
engines/live.py `save`); a writer that needs its path to carry a suffix can ask for a named
temporary (``named=True``). A replacement is given a hidden name for the
two system calls of its commit (``rename`` replaces, ``linkat`` cannot), and its backups'
names are all removed before the old content is freed (which takes tens of milliseconds for a
large model, inside the call that drops its last reference).

Named temporaries and backups are ``.surgery-<host>-<pid>-<random>.tmp<suffix>`` (short,
whatever the destination's name, so an output whose name is close to the file system's limit
can be written), and the next run that writes into the folder removes those of processes that
no longer exist (same host tag, which is the host name and the PID namespace, so a folder shared
between machines or containers is safe; a backup only while its content is still reachable by
another name; never a file the run reads, ``inputs``, whatever its name). They are what a
SIGKILL can leave: the temporary of a filesystem without ``O_TMPFILE``, or a replacement killed
within its commit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

from .errors import OutputExists, SurgeryError, UsageError  # noqa: F401  (re-exported)

__all__ = ["AtomicOutputs", "OutputExists", "InterruptedAfterCommit"]


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, where the program turns it into an exception) arrived during the
    commit: it was held until every output was in place. ``written`` names them as given."""

    def __init__(self, written: tuple[str, ...]):
        self.written = written
        super().__init__(f"interrupted after writing {' and '.join(written)}")


def _host_tag() -> str:
    node = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # containers on one host differ here
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{node}\0{namespace}".encode()).hexdigest()[:6]


_HOST = _host_tag()
# What _hidden_name makes, whatever suffix follows: ".surgery-<host>-<pid>-<random>.tmp.keras".
_OURS = re.compile(r"\.surgery-([0-9a-f]{6})-([0-9]+)-[0-9a-f]{8}\.(tmp|bak|mov)")
# link() errors that mean "this file system has no hard links", not "the name is taken".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_O_TMPFILE = getattr(os, "O_TMPFILE", None)  # Linux only


class _Output:
    """One reserved output and how far its commit got (for undoing a partial commit)."""

    __slots__ = ("tmp", "fd", "named", "suffix", "dest", "typed", "replace", "backup", "moved",
                 "mode", "started", "claimed")

    def __init__(self, tmp: Path, fd: int | None, suffix: str, dest: Path, typed: str,
                 replace: bool):
        self.tmp = tmp  # where the writer writes: /proc/self/fd/N for an anonymous file
        self.fd = fd  # the anonymous file (O_TMPFILE), while it has no name; else None
        self.named = fd is None  # tmp is a name in the folder, which a discard must remove
        self.suffix = suffix
        self.dest = dest
        self.typed = typed  # the destination as the caller named it, for messages
        self.replace = replace  # an existing destination is replaced; else it is an error
        self.backup: Path | None = None  # the destination's previous content, kept during commit
        self.moved = False  # the backup was made by a rename: the destination is gone meanwhile
        self.mode: int | None = None  # the permissions of the file replaced, which it keeps
        self.started = False  # putting the temporary in place was attempted
        self.claimed = False  # a new output's destination name was created by this commit


class AtomicOutputs:
    """Use as a context manager: `reserve` temporaries, write them, `commit` puts them all in
    place."""

    def __init__(self, *, fsync: bool = False, inputs=()) -> None:
        self._pending: list[_Output] = []
        self._swept: set[Path] = set()
        self.committed = False
        self.fsync = fsync  # flush the outputs to the disk (power-loss durability), see above
        # The files the run reads, which the sweep of stale temporaries never removes, whatever
        # their name: a leftover temporary given back to surgery as its input is an input.
        self._inputs = _identities(inputs)

    def reserve(self, destination: str | os.PathLike, suffix: str, *,
                replace: bool = False, named: bool = False) -> Path:
        """A temporary path to write ``destination``'s content to (opened for writing, it is
        truncated). ``replace``: an existing destination is replaced (else the commit fails with
        `OutputExists` if it exists by then). The temporary is anonymous where the folder's
        file system allows it (see above); ``named``: the writer needs a path ending in
        ``suffix`` (Keras picks some formats from it), so it is a hidden file of that suffix,
        not created yet: the writer creates it, with the usual permissions."""
        # A symlink is written through, as open() and model.save do: its target gets the new
        # content and the link stays (a rename onto the link would replace the link itself).
        dest = Path(os.path.realpath(destination))
        if dest.parent not in self._swept:
            self._swept.add(dest.parent)
            remove_stale(dest.parent, keep=self._inputs)
        fd = None if named else _anonymous(dest.parent)
        tmp = Path(f"/proc/self/fd/{fd}") if fd is not None else \
            _hidden_name(dest.parent, ".tmp" + suffix)
        self._pending.append(_Output(tmp, fd, suffix, dest, os.fspath(destination), replace))
        return tmp

    def commit(self) -> None:
        """Put every temporary in place: all of them, or (on an error) none."""
        if self.fsync:
            for out in self._pending:
                try:
                    _fsync(out.tmp)
                except OSError as exc:
                    raise _cannot_write(out.typed, exc) from None
        written = tuple(out.typed for out in self._pending)
        try:
            with _signals_held():
                self._commit()
        except BaseException as exc:
            if self.committed:  # the signal held during the commit, delivered now
                raise InterruptedAfterCommit(written) from exc
            raise

    def _commit(self) -> None:
        current = None
        try:
            for out in self._pending:
                if out.replace:
                    current = out
                    _set_aside(out)
            for out in self._pending:
                current = out
                _place(out)
        except BaseException as exc:
            _undo(self._pending)
            if isinstance(exc, OSError) and current is not None:
                raise _cannot_write(current.typed, exc) from None
            raise
        # The backups' names go first, all of them, and only then their content: unlinking the
        # last name of a large file frees its blocks inside the call (40 ms for 134 MB on
        # ext4), and a SIGKILL meanwhile would leave the other backups' names behind. A
        # descriptor held over the unlink defers that freeing to its close, when no name is left.
        held = []
        for out in self._pending:
            if out.backup is not None:
                held.append(_hold(out.backup))
                _remove(out.backup)
            _close(out)
        for fd in held:
            if fd is not None:
                os.close(fd)
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
            if out.named:
                _remove(out.tmp)
            _close(out)  # an anonymous file goes with its last descriptor

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit nothing is pending; otherwise nothing must be left


def _identities(paths) -> set[tuple[int, int]]:
    found = set()
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def remove_stale(folder: Path, keep: set[tuple[int, int]] = frozenset()) -> list[str]:
    """Remove the temporaries that killed runs on this host left in ``folder``, and their
    backups where the content is still reachable by another name, but never a file in ``keep``
    (device and inode: the run's inputs); the names removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        found = _OURS.match(name)
        if found is None or found[1] != _HOST or _alive(int(found[2])):
            continue
        path = folder / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in keep:
            continue
        # A '.bak' is a hard link to a destination being replaced (--force): once the run died,
        # the replacement it was asked for is done or abandoned, and the link is a leftover.
        # A '.mov' is a destination moved aside where the filesystem has no hard links: it may
        # be the only copy of that file, so it stays unless another name still reaches it.
        if found[3] == "mov" and st.st_nlink < 2:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process can have: leave it)
    return True


def _anonymous(folder: Path) -> int | None:
    """A descriptor of a new anonymous file in ``folder`` (O_TMPFILE), reachable at
    /proc/self/fd/N; None where the system or the file system has none, or /proc is missing."""
    if _O_TMPFILE is None:
        return None
    try:  # the mode a writer's open() would give, the umask applied by the kernel
        fd = os.open(folder, _O_TMPFILE | os.O_RDWR, 0o666)
    except OSError:  # EOPNOTSUPP, EISDIR (old kernels), a missing folder: a named one then
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def anonymous_temporaries(folder: str | os.PathLike) -> bool:
    """Whether outputs written into ``folder`` have anonymous temporaries (see above)."""
    fd = _anonymous(Path(folder))
    if fd is not None:
        os.close(fd)
    return fd is not None


def _close(out: _Output) -> None:
    if out.fd is not None:
        fd, out.fd = out.fd, None
        try:
            os.close(fd)
        except OSError:
            pass


def _link_anonymous(proc_path: Path, dest: Path) -> None:
    """Give the file /proc/self/fd/N the name ``dest``: linkat(AT_SYMLINK_FOLLOW), which follows
    that link to the file. Python calls link(2), which links the /proc entry itself (EXDEV),
    unless a directory descriptor is given: the destination's folder is."""
    folder = os.open(dest.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.link(proc_path, dest.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _give_name(out: _Output) -> None:
    """Give an anonymous temporary a hidden name (for a rename, or where the destination cannot
    be linked to): a link, or a copy where the file system refuses links."""
    named = _hidden_name(out.dest.parent, ".tmp" + out.suffix)
    try:
        _link_anonymous(out.tmp, named)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        with open(out.tmp, "rb") as src:
            _close(out)  # src holds the anonymous file now
            out.tmp, out.named = named, True  # a partial copy is removed by discard too
            with open(named, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return
    out.tmp, out.named = named, True
    _close(out)


def _hidden_name(folder: Path, suffix: str) -> Path:
    while True:
        path = folder / f".surgery-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        if not os.path.lexists(path):
            return path


def _set_aside(out: _Output) -> None:
    """Keep the destination's current content under a hidden backup name, if there is one."""
    try:
        st = os.lstat(out.dest)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        out.mode = stat.S_IMODE(st.st_mode)
    out.backup = _hidden_name(out.dest.parent, ".bak")
    try:
        os.link(out.dest, out.backup, follow_symlinks=False)
        return
    except (OSError, NotImplementedError):  # no hard links here: move it aside instead
        pass
    out.moved = True
    out.backup = _hidden_name(out.dest.parent, ".mov")
    os.replace(out.dest, out.backup)


def _place(out: _Output) -> None:
    """Put the temporary at its destination: replacing it, or only if the name is free."""
    out.started = True
    if out.fd is not None and not out.replace:
        try:  # the anonymous file gets the destination's name, only if it is free
            _link_anonymous(out.tmp, out.dest)
        except FileExistsError:
            raise OutputExists(out.typed) from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        else:
            out.claimed = True
            _close(out)
            return
    if out.fd is not None:
        _give_name(out)
    if out.replace:
        if out.mode is not None:  # a replaced file keeps who may read it (chmod 600 stays so)
            try:
                os.chmod(out.tmp, out.mode)
            except OSError:
                pass
        os.replace(out.tmp, out.dest)
        return
    try:
        os.link(out.tmp, out.dest)
    except FileExistsError:
        raise OutputExists(out.typed) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        try:  # no hard links: claim the name exclusively, then rename the content onto it
            os.close(os.open(out.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise OutputExists(out.typed) from None
        out.claimed = True
        os.replace(out.tmp, out.dest)
        return
    out.claimed = True
    _remove(out.tmp)


def _undo(outputs: list[_Output]) -> None:
    """Put back what a partial commit changed (best effort: this runs while an error is raised)."""
    for out in reversed(outputs):
        try:
            if not out.replace:
                if out.claimed:
                    os.unlink(out.dest)  # the name this commit created: free it again
            elif out.backup is not None:
                if out.moved or (out.started and not os.path.lexists(out.tmp)):
                    os.replace(out.backup, out.dest)  # the previous content, back in place
                else:
                    os.unlink(out.backup)  # a hard link: the destination was never replaced
            elif out.started and not os.path.lexists(out.tmp):
                os.unlink(out.dest)  # there was nothing before: remove the new file
        except OSError:
            pass


def _hold(path: Path) -> int | None:
    """A descriptor that keeps ``path``'s file (not its name) alive; None where none opens."""
    try:
        return os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None


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
