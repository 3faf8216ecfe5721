"""What surgery writes into a layer's config, encoded and decoded in one place for both engines.

Two things of surgery's travel inside a saved model's ``config.json``, and both engines read and
write them: the live engine through Keras (engines/constraint.py's ``get_config`` and
``from_config``, engines/batchnorm.py's registered class), the archive engine on the JSON itself
(engines/archive/). A format written in two places drifts, so this module is its only encoder
and its only decoder. Pure Python: the archive engine must not import NumPy.

- **FrozenEntries** (entries frozen inside a weight, sub-layer freezing): a constraint on the
  layer attribute Keras passes to that weight (``kernel_constraint``, ...), registered as
  ``surgery>FrozenEntries``, with the config ``{"shape", "axes", "indices", "dtype", "values",
  "inner"}``: the weight's shape; the consecutive axes carrying its output channels (flattened
  in C order); the frozen positions on them as sorted ``[start, stop)`` runs; the values' dtype
  name; the frozen values only (the weight with the flattened axes cut to the frozen positions,
  little-endian bytes in C order, zlib level 6, base64); the layer's own constraint, serialized,
  or None.
- **The affine BatchNormalization** (the 'batchnorm affine' policy): a BatchNormalization entry
  whose module and registered name are surgery's; everything else (class name, config, weights
  groups) is BatchNormalization's, so switching a layer changes exactly those two fields.
- **What decides an output axis** (surgery/parts.py): EinsumDense's ``equation`` and
  ``bias_axes``, the config keys both engines read to place a part.

Decoding validates every size against the shape before anything is expanded or inflated: a
config from a file may claim a run of 10**10 indices or a zlib bomb, and must be an error, not
gigabytes of memory.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..errors import FrozenEntriesError

__all__ = [
    "FROZEN_PACKAGE", "FROZEN_CLASS", "FROZEN_MODULE", "FROZEN_REGISTERED",
    "AFFINE_PACKAGE", "AFFINE_CLASS", "AFFINE_MODULE", "AFFINE_REGISTERED",
    "AXIS_CONFIG_KEYS", "FrozenConfig", "index_runs", "encode_values", "frozen_config",
    "frozen_object", "is_frozen_object", "decode", "is_affine_entry", "set_affine_entry",
    "axis_details",
]

FROZEN_PACKAGE, FROZEN_CLASS = "surgery", "FrozenEntries"
FROZEN_MODULE = "surgery.engines.constraint"  # where the class is defined: Keras records it
FROZEN_REGISTERED = f"{FROZEN_PACKAGE}>{FROZEN_CLASS}"

AFFINE_PACKAGE, AFFINE_CLASS = "surgery", "AffineBatchNormalization"
AFFINE_MODULE = "surgery.engines.batchnorm"
AFFINE_REGISTERED = f"{AFFINE_PACKAGE}>{AFFINE_CLASS}"
# A plain BatchNormalization entry as Keras saves it: module and registered name.
_BATCHNORM_ENTRY = ("keras.layers", None)

AXIS_CONFIG_KEYS = ("equation", "bias_axes")

# Bytes per item of the dtypes a weight can have (numpy's names; bfloat16 from ml_dtypes).
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1,
             "int8": 1, "int16": 2, "int32": 4, "int64": 8,
             "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8}
# Deflate cannot expand data more than about 1032 times: values that claim more than this many
# bytes per stored byte are not what they say, and are refused before anything is inflated.
_MAX_INFLATE_RATIO = 1032
_ZLIB_LEVEL = 6


# --- FrozenEntries -------------------------------------------------------------------------------


def index_runs(indices: Sequence[int]) -> list[list[int]]:
    """Sorted, distinct indices as [start, stop) runs: ``filters[0:32]`` is [[0, 32]]."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def encode_values(raw: bytes) -> str:
    """The frozen values (little-endian bytes, C order) as the config stores them."""
    return base64.b64encode(zlib.compress(raw, _ZLIB_LEVEL)).decode("ascii")


def frozen_config(shape: Sequence[int], axes: Sequence[int], indices: Sequence[int],
                  dtype: str, values: str, inner: Optional[dict]) -> dict:
    """The FrozenEntries config (what its ``get_config`` returns): ``values`` as
    `encode_values` gives it, ``inner`` the serialized constraint it wraps, or None."""
    return {"shape": [int(d) for d in shape], "axes": [int(a) for a in axes],
            "indices": index_runs(sorted(int(i) for i in indices)), "dtype": dtype,
            "values": values, "inner": inner}


def frozen_object(config: dict) -> dict:
    """The constraint as ``keras.saving.serialize_keras_object`` writes it into a layer config,
    around `frozen_config`'s ``config``."""
    return {"module": FROZEN_MODULE, "class_name": FROZEN_CLASS, "config": config,
            "registered_name": FROZEN_REGISTERED}


def is_frozen_object(value: Any) -> bool:
    return isinstance(value, dict) and value.get("registered_name") == FROZEN_REGISTERED


@dataclass(frozen=True)
class FrozenConfig:
    """A FrozenEntries config, checked: every field consistent with ``shape``."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    dtype: str
    values: str  # as stored: base64 of the zlib stream
    inner: Optional[dict]

    @property
    def size(self) -> int:
        """Positions on the flattened axes."""
        return math.prod(self.shape[self.axes[0]:self.axes[-1] + 1])

    @property
    def count(self) -> int:
        """Frozen positions."""
        return sum(stop - start for start, stop in self.runs)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(i for start, stop in self.runs for i in range(start, stop))

    @property
    def values_shape(self) -> tuple[int, ...]:
        a0, a1 = self.axes[0], self.axes[-1]
        return self.shape[:a0] + (self.count,) + self.shape[a1 + 1:]

    @property
    def entries(self) -> int:
        """Frozen scalars."""
        return math.prod(self.values_shape)

    @property
    def nbytes(self) -> int:
        return self.entries * _ITEMSIZE[self.dtype]

    def values_bytes(self) -> bytes:
        """The stored values, inflated: exactly `nbytes` little-endian bytes, or an error
        (never more than `nbytes` inflated, whatever the stream holds)."""
        try:
            packed = base64.b64decode(self.values, validate=True)
        except binascii.Error:
            raise FrozenEntriesError("FrozenEntries: the stored values are not base64") from None
        if self.nbytes > _MAX_INFLATE_RATIO * len(packed) + 64:
            raise FrozenEntriesError(self._short())
        inflate = zlib.decompressobj()
        try:
            raw = inflate.decompress(packed, self.nbytes + 1)
        except zlib.error:
            raise FrozenEntriesError("FrozenEntries: the stored values are not a zlib "
                                     "stream") from None
        if len(raw) != self.nbytes or inflate.unconsumed_tail:
            raise FrozenEntriesError(self._short())
        return raw

    def _short(self) -> str:
        return (f"FrozenEntries: stored values do not fill shape {self.values_shape} of "
                f"{self.dtype}")


def decode(config: Mapping, *, shape: Optional[Sequence[int]] = None) -> FrozenConfig:
    """A stored FrozenEntries config, checked (types, axes within the shape, runs sorted,
    disjoint and within the axes, a known dtype) before any run is expanded; ``shape``, when
    the weight's own shape is known, must be the config's. Raises FrozenEntriesError."""
    if not isinstance(config, Mapping):
        raise FrozenEntriesError("FrozenEntries: the config is not a mapping")
    missing = [k for k in ("shape", "axes", "indices", "dtype", "values") if k not in config]
    if missing:
        raise FrozenEntriesError(f"FrozenEntries: the config has no {', '.join(missing)}")
    dims = _ints(config["shape"], "shape")
    axes = _ints(config["axes"], "axes")
    if any(d < 0 for d in dims):
        raise FrozenEntriesError(f"FrozenEntries: shape {dims} has a negative dimension")
    if shape is not None and dims != tuple(shape):
        raise FrozenEntriesError(f"FrozenEntries: shape {dims} is not the weight's "
                                 f"{tuple(shape)}")
    if not axes or axes != tuple(range(axes[0], axes[-1] + 1)) or axes[0] < 0 or \
            axes[-1] >= len(dims):
        raise FrozenEntriesError(f"FrozenEntries: axes {axes} are not consecutive axes of "
                                 f"shape {dims}")
    size = math.prod(dims[axes[0]:axes[-1] + 1])
    runs = _runs(config["indices"], size)
    dtype = config["dtype"]
    if dtype not in _ITEMSIZE:
        raise FrozenEntriesError(f"FrozenEntries: values of dtype {dtype!r}")
    values = config["values"]
    if not isinstance(values, str):
        raise FrozenEntriesError("FrozenEntries: the stored values are not text")
    inner = config.get("inner")
    if inner is not None and not isinstance(inner, dict):
        raise FrozenEntriesError("FrozenEntries: the inner constraint is not a config")
    return FrozenConfig(dims, axes, runs, dtype, values, inner)


def _ints(value, what: str) -> tuple[int, ...]:
    # bool is an int to Python, not to a shape.
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FrozenEntriesError(f"FrozenEntries: {what} is not a list of integers")
    return tuple(value)


def _runs(value, size: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise FrozenEntriesError("FrozenEntries: indices is not a non-empty list of runs")
    out = []
    end = 0
    for run in value:
        if not isinstance(run, (list, tuple)) or len(run) != 2:
            raise FrozenEntriesError("FrozenEntries: a run of indices is not [start, stop]")
        start, stop = _ints(run, "a run of indices")
        if not end <= start < stop <= size:
            raise FrozenEntriesError(f"FrozenEntries: indices must be distinct, in [0, {size}), "
                                     "as sorted [start, stop) runs")
        out.append((start, stop))
        end = stop
    return tuple(out)


# --- the affine BatchNormalization ---------------------------------------------------------------


def is_affine_entry(entry: Mapping) -> bool:
    """Whether a layer entry of config.json is surgery's AffineBatchNormalization."""
    return entry.get("class_name") == "BatchNormalization" and \
        (entry.get("module"), entry.get("registered_name")) == (AFFINE_MODULE, AFFINE_REGISTERED)


def set_affine_entry(entry: dict, affine: bool) -> None:
    """Make a BatchNormalization entry the affine class, or the plain one: the two fields
    ``engines.batchnorm.switch`` changes in what Keras saves."""
    entry["module"], entry["registered_name"] = \
        (AFFINE_MODULE, AFFINE_REGISTERED) if affine else _BATCHNORM_ENTRY


# --- what decides an output axis -----------------------------------------------------------------


def axis_details(cls: str, config: Mapping) -> tuple[tuple[str, str], ...]:
    """``Layer.details`` (surgery/tree.py): the config values surgery/parts.py reads to place a
    part, as text, for the one class that has them."""
    if cls != "EinsumDense":
        return ()
    return tuple((k, str(config[k])) for k in AXIS_CONFIG_KEYS if config.get(k) is not None)
