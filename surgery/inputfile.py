"""Reading a text input the user named, a spec or a manifest: whole, but never more than a bound.

``read_bytes()`` reads until the end, and some paths have none: ``surgery lint /dev/zero`` took
23 GB before it was killed. A pipe is a fine spec (``surgery lint /dev/stdin``), so the bound is
on what is read, not on the kind of file: one byte past `MAX_BYTES` and the reading stops.
64 MiB holds every spec the parser reads (500,000 tokens, see parse.MAX_TOKENS) and the manifest
of the largest one, with room to spare.
"""

from __future__ import annotations

import os

__all__ = ["MAX_BYTES", "read_bounded", "InputTooLarge"]

MAX_BYTES = 64 * 2**20


class InputTooLarge(Exception):
    """The input has more than `MAX_BYTES`; ``str(exc)`` says so without naming it."""

    def __init__(self) -> None:
        super().__init__(f"larger than {MAX_BYTES // 2**20} MiB, more than surgery reads")


def read_bounded(path: str | os.PathLike) -> bytes:
    """The whole content of ``path``; `InputTooLarge` past `MAX_BYTES`, OSError if unreadable."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise InputTooLarge()
    return data
