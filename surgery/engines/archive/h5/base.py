"""The interface every HDF5 backend of the archive engine implements (see h5/__init__.py)."""

from __future__ import annotations

from typing import BinaryIO, Callable, NamedTuple, Optional

__all__ = ["Source", "Reader"]


class Source(NamedTuple):
    """The bytes of the weights entry, as the zip holds them."""

    size: int
    # Random access to the bytes, when the entry is stored (as Keras writes it); None when it
    # is compressed and can only be streamed.
    pread: Optional[Callable[[int, int], bytes]]
    open: Callable[[], BinaryIO]  # a seekable file of the bytes, for h5py


class Reader:
    """What the archive engine needs of the weights file. Paths are relative to the root ('' is
    the root)."""

    backend = ""

    def children(self, path: str) -> Optional[dict[str, str]]:
        """name -> "group" | "dataset" for the group at ``path``; None if there is none."""
        raise NotImplementedError

    def shape(self, path: str) -> tuple[int, ...]:
        """The shape of the dataset at ``path``, which must exist; its entries fit the bytes
        stored for it (a hostile header cannot claim 10**10 of them in a small file)."""
        raise NotImplementedError

    def dtype(self, path: str) -> str:
        """The NumPy name of the dataset's element type at ``path``, which must exist
        ("float32", "bfloat16" for Keras's opaque 2-byte items marked so, "int64"), or words
        naming a type NumPy has no name for ("opaque 3-byte items", "a compound type")."""
        raise NotImplementedError

    def name_attr(self, path: str) -> Optional[str]:
        """The string attribute ``name`` of the object at ``path``, if it has one."""
        raise NotImplementedError

    def dataset(self, path: str) -> tuple[str, bytes]:
        """(dtype name, the values as little-endian bytes in C order) of the float dataset at
        ``path``: what freezing entries of a weight stores (engines/frozen_format.py)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
