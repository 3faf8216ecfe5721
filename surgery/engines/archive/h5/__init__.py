"""model.weights.h5 as the archive engine reads it: one interface, two backends chosen once.

`Reader` is what describing and rewriting need of the weights file: the members of a group, a
dataset's shape (checked against the bytes stored for it), the ``name`` attribute Keras puts on
a layer's ``vars`` group, and a dataset's values (for entries newly frozen inside a weight).

Two backends answer it, as pathspec's backends answer ``match_file``: ``"pure"``
(`h5.pure`, the HDF5 metadata h5py writes by default, read without NumPy or h5py) and
``"h5py"`` (`h5.h5py_backend`). `open_reader` picks one once, up front, by name; ``"best"``
looks at the file's superblock and takes the pure reader when it reads that layout (what Keras
writes), h5py otherwise. Nothing switches backend halfway: a layout the chosen backend does not
read is `ArchiveUnsupported` with its reason, a malformed file `H5FormatError`, a
`DamagedArchive`.
"""

from __future__ import annotations

from ....errors import ArchiveUnsupported
from .base import Reader, Source
from .pure import PureReader, reads

__all__ = ["BACKENDS", "Reader", "Source", "open_reader"]

BACKENDS = ("pure", "h5py")


def open_reader(source: Source, backend: str = "best") -> Reader:
    """A Reader of ``source`` by the backend named: ``"pure"``, ``"h5py"``, or ``"best"``, the
    pure reader when `pure.reads` this file's layout, else h5py."""
    if backend not in ("best",) + BACKENDS:
        raise ValueError(f"no HDF5 backend {backend!r}: one of best, {', '.join(BACKENDS)}")
    if backend != "h5py":
        why = reads(source)
        if why is None:
            return PureReader(source)
        if backend == "pure":
            raise ArchiveUnsupported(f"the pure HDF5 reader cannot read it: {why}")
    from .h5py_backend import H5pyReader  # imports h5py and NumPy: only when chosen

    return H5pyReader(source)
