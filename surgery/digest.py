"""sha256 of a model file, computed in a background thread while TensorFlow loads.

The manifest records the input model's sha256: 0.35 s of a core for a 554 MB file here
(SHA-256 is sequential, one stream per core, about 1.6 GB/s with the CPU's SHA instructions).
The Keras engine begins it before importing TensorFlow and loading the model, seconds of work
that leave a core free, and `hashlib` releases the GIL on large updates, so the digest costs
that path no wall time. (The archive engine needs no head start: it hashes the file from the
same reads that copy it, see engines/archive.py, and its Python work before the copy is short
and holds the GIL, which a hashing thread would wait on.)

The bytes are read with `preadv` into one reused buffer rather than mapped: a mapping is no
faster here, and a file truncated under a mapping kills the process with SIGBUS where a read
just comes back short. The digest is returned only if the file was not changed meanwhile (size,
modification and change times of the open file, and the path still naming it), so a manifest
never pairs one version's hash with another version's content.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional

__all__ = ["FileDigest", "InputChanged", "sha256_file", "changed"]

_BUFFER = 1 << 18  # fits the CPU's L2: the copy in and the hash read stay out of main memory


class InputChanged(OSError):
    """The input file was written, or replaced, while it was being read. ``str(exc)`` does not
    name the file: the caller says which."""

    def __init__(self) -> None:
        super().__init__("changed while it was being read; run again once whatever writes it "
                         "is done")


class FileDigest:
    """Hash ``path`` in a daemon thread; `result` waits for the hex digest. Use it as a context
    manager, or call `cancel`, so that a command that fails early stops the thread."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._stat = os.fstat(self._fd)
        self._digest = hashlib.sha256()
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="surgery-input-sha256",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd, digest, stop = self._fd, self._digest, self._stop
        buf = bytearray(_BUFFER)
        view = memoryview(buf)
        offset = 0
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while not stop.is_set():
                n = _read_into(fd, view, offset)
                if n == 0:
                    return
                digest.update(view[:n])
                offset += n
        except BaseException as exc:  # whatever stopped it, result() must not return a digest
            self._error = exc

    def result(self) -> str:
        """The hex sha256 of the file as it was when this object was made."""
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            if self._stop.is_set():
                raise RuntimeError("the digest was cancelled")
            if changed(self._stat, os.fstat(self._fd), self.path):
                raise InputChanged()
            return self._digest.hexdigest()
        finally:
            self._close()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileDigest":
        return self

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            self.cancel()


def changed(before: os.stat_result, after: os.stat_result, path: str) -> bool:
    """Whether an open file was written (``after`` is a new fstat of it) or its path now names
    another file, since ``before``."""
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != \
            (before.st_size, before.st_mtime_ns, before.st_ctime_ns):
        return True
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # pragma: no cover - platforms without preadv
    view[:len(data)] = data
    return len(data)


def sha256_file(path: str) -> str:
    """The hex sha256 of a file, waited for: `FileDigest` with its check that the file did not
    change while it was read."""
    with FileDigest(path) as digest:
        return digest.result()
