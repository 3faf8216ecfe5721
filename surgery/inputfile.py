"""Reading a text input the user named, a spec or a manifest: whole, but never more than a bound.

``read_bytes()`` reads until the end, and some paths have none: ``surgery lint /dev/zero`` took
23 GB before it was killed. A pipe is a fine spec (``surgery lint /dev/stdin``), so the bound is
on what is read, not on the kind of file: one byte past the bound and the reading stops. A
manifest may hold `MAX_BYTES` (the manifest of the largest spec is a fraction of it); a spec
file, what its characters can take in UTF-8 (parse.MAX_CHARS, four bytes each at most).
"""

from __future__ import annotations

import os

__all__ = ["MAX_BYTES", "read_bounded", "InputTooLarge"]

MAX_BYTES = 64 * 2**20


class InputTooLarge(Exception):
    """The input has more than the bound; ``str(exc)`` says so without naming it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit // 2**20} MiB, more than surgery reads")


def read_bounded(path: str | os.PathLike, limit: int = MAX_BYTES) -> bytes:
    """The whole content of ``path``; `InputTooLarge` past ``limit`` bytes, OSError if
    unreadable."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputTooLarge(limit)
    return data
