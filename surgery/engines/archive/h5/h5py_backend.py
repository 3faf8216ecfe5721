"""The h5py backend: any HDF5 layout h5py reads (newer file formats, compressed entries).

Chosen up front (h5/__init__.py) for what the pure reader does not read; importing this module
imports h5py and NumPy. h5py reports a damaged file as OSError, KeyError, ValueError or
RuntimeError, as it maps HDF5's error classes (h5py/_errors.pyx): `_call` turns those, raised
by the one h5py call it wraps and by nothing of surgery's, into `H5FormatError`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, TypeVar

from ....errors import ArchiveUnsupported, H5FormatError
from ..keras_layout import WEIGHTS
from .base import Reader, Source

try:
    import h5py
except ImportError:  # h5py comes with Keras; a lint-only install may lack it
    h5py = None

__all__ = ["H5pyReader"]

T = TypeVar("T")

# Deflate cannot expand data more than about 1032 times: a dataset claiming more entries than
# that from its stored bytes is not what it says (see Reader.shape).
_MAX_INFLATE_RATIO = 1032


def _call(what: str, fn: Callable[..., T], *args) -> T:
    try:
        return fn(*args)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # h5py's, see above
        text = str(exc).strip().partition("\n")[0] or type(exc).__name__
        raise H5FormatError(f"{what or '/'}: {text}") from None


class H5pyReader(Reader):
    backend = "h5py"

    def __init__(self, source: Source):
        if h5py is None:
            raise ArchiveUnsupported(f"{WEIGHTS} needs h5py to be read, which is not installed")
        self._fileobj = source.open()
        try:
            self._file = _call("h5py cannot open it", h5py.File, self._fileobj, "r")
        except BaseException:
            self._fileobj.close()
            raise

    def _get(self, path: str):
        """The object at ``path``, or None."""
        if not path:
            return self._file
        if not _call(path, self._file.__contains__, path):
            return None
        return _call(path, self._file.__getitem__, path)

    def children(self, path: str) -> Optional[dict[str, str]]:
        obj = self._get(path)
        if not isinstance(obj, h5py.Group):
            return None
        keys = _call(path, list, obj.keys())
        return {k: ("group" if isinstance(_call(f"{path}/{k}", obj.get, k),
                                          h5py.Group) else "dataset") for k in keys}

    def _dataset(self, path: str):
        obj = self._get(path)
        if not isinstance(obj, h5py.Dataset):
            raise H5FormatError(f"no dataset {path}")
        return obj

    def shape(self, path: str) -> tuple[int, ...]:
        ds = self._dataset(path)
        shape = tuple(int(d) for d in ds.shape)
        stored = _call(path, ds.id.get_storage_size)
        if math.prod(shape) * ds.dtype.itemsize > _MAX_INFLATE_RATIO * stored + 4096:
            raise ArchiveUnsupported(f"{path} claims {math.prod(shape)} entries in {stored} "
                                     "stored bytes")
        return shape

    def dtype(self, path: str) -> str:
        ds = self._dataset(path)
        dt = ds.dtype
        if dt.kind in "fiub":
            return dt.name
        if dt.kind == "V" and not dt.fields:
            tag = _call(path, ds.attrs.get, "dtype")
            if dt.itemsize == 2 and tag in ("bfloat16", b"bfloat16"):
                return "bfloat16"  # how Keras stores it (keras/src/saving/saving_lib.py)
            return f"opaque {dt.itemsize}-byte items"
        return "a compound type" if dt.fields else f"items of type {dt.str!r}"

    def dataset(self, path: str) -> tuple[str, bytes]:
        values = _call(path, self._dataset(path).__getitem__, ())
        dtype = values.dtype  # NumPy: h5py's own dependency
        if dtype.kind != "f":  # Keras stores bfloat16 as opaque 2-byte items ('|V2')
            raise ArchiveUnsupported(f"its weights are stored as {dtype.str!r}, not as IEEE "
                                     "floats (bfloat16 is stored so)")
        return dtype.name, values.astype(dtype.newbyteorder("<")).tobytes()

    def name_attr(self, path: str) -> Optional[str]:
        obj = self._get(path)
        if obj is None or not _call(path, obj.attrs.__contains__, "name"):
            return None
        value = _call(path, obj.attrs.__getitem__, "name")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value if isinstance(value, str) else None

    def close(self) -> None:
        self._file.close()
        self._fileobj.close()
