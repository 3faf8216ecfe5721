"""The shapes and dtype a layer's config declares for its weights, to check the weights file
against.

A weights file whose shapes contradict config.json (a Dense kernel stored as (5, 2) where the
config makes it (4, 2)) is a file Keras refuses to load; copied, it gives an output Keras
refuses too, and counted, wrong parameter totals. The shapes follow from the layer's config and
the input shape its ``build_config`` records, as each Keras class builds its variables
(keras/src/layers/...). A dimension the config does not fix (no build_config, a value of an
unexpected type) is None and is not checked; a class not listed here is not checked at all.

The dtype: Keras creates these weights in the layer's variable dtype, which its dtype policy in
the config names: the policy's own name, or float32 for the mixed policies (measured for every
class listed here under float16, bfloat16, float32, float64, mixed_float16 and mixed_bfloat16:
h5py stores them so, bfloat16 as opaque 2-byte items marked ``dtype="bfloat16"``). Keras casts a
weight of another dtype as it loads it, silently; the archive engine copies the bytes as they
are, so a float64 kernel in a float32 layer would stay float64 in its output, a file that says
one thing and holds another. A quantized policy (int8 kernels and float scales) or one this
table does not know is not checked.
"""

from __future__ import annotations

from typing import Mapping, Optional

__all__ = ["declared_shapes", "declared_dtype", "contradiction", "BadSize"]

Shape = tuple[Optional[int], ...]

_RANK = {"1D": 1, "2D": 2, "3D": 3}
# A dtype policy's name -> the dtype of the variables it creates (keras/src/dtype_policies).
_VARIABLE_DTYPE = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32",
                   "float64": "float64", "mixed_float16": "float32", "mixed_bfloat16": "float32"}


def _int(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


class BadSize(Exception):
    """A config field that sizes the layer's weights holds what Keras cannot build them from
    (``"4"``, ``true``, ``-4``, ``4.0``): the file does not load in Keras, and an output copied
    from it would not either. ``field`` and ``value`` say which."""

    def __init__(self, field: str, value) -> None:
        self.field, self.value = field, value
        super().__init__(f"{field} {value!r}")


def _size(conf: Mapping, field: str) -> Optional[int]:
    """A positive whole number the layer's weights are sized by; None when the config leaves it
    out (not checked); `BadSize` for anything else."""
    if field not in conf:
        return None
    value = conf[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadSize(field, value)
    return value


def _input_shape(entry: Mapping) -> Optional[list]:
    """The one input shape build_config records, as a list of ints and Nones; None when it
    records none, several, or something else."""
    build = entry.get("build_config")
    shape = build.get("input_shape") if isinstance(build, Mapping) else None
    if not isinstance(shape, list) or any(isinstance(d, (list, dict)) for d in shape):
        return None
    return [_int(d) for d in shape]


def _dim(shape: Optional[list], axis) -> Optional[int]:
    if shape is None or not isinstance(axis, int) or isinstance(axis, bool) or \
            not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def _kernel_size(conf: Mapping, rank: int) -> Shape:
    size = conf.get("kernel_size")
    if isinstance(size, list):  # one per spatial axis; another length is not checked here
        return tuple(_size({"kernel_size": k}, "kernel_size") for k in size) \
            if len(size) == rank else (None,) * rank
    return (_size(conf, "kernel_size"),) * rank


def _conv(cls: str, conf: Mapping, shape: Optional[list]) -> Optional[dict[str, Shape]]:
    rank = _RANK.get(cls[-2:])
    if rank is None:
        return None
    channels = _dim(shape, 1 if conf.get("data_format") == "channels_first" else -1)
    kernel = _kernel_size(conf, rank)
    filters = None if cls.startswith("DepthwiseConv") else _size(conf, "filters")
    if cls.startswith("DepthwiseConv"):
        multiplier = _size(conf, "depth_multiplier")
        out = None if channels is None or multiplier is None else channels * multiplier
        return {"kernel": kernel + (channels, multiplier), "bias": (out,)}
    if cls.startswith("SeparableConv"):
        multiplier = _size(conf, "depth_multiplier")
        mid = None if channels is None or multiplier is None else channels * multiplier
        return {"depthwise_kernel": kernel + (channels, multiplier),
                "pointwise_kernel": (1,) * rank + (mid, filters), "bias": (filters,)}
    if cls.endswith("Transpose"):
        return {"kernel": kernel + (filters, channels), "bias": (filters,)}
    groups = _size(conf, "groups") or 1
    per_group = None if channels is None or not groups or channels % groups else channels // groups
    return {"kernel": kernel + (per_group, filters), "bias": (filters,)}


def _axes(conf: Mapping, shape: Optional[list]) -> Shape:
    axis = conf.get("axis", -1)
    axes = axis if isinstance(axis, list) else [axis]
    return tuple(_dim(shape, a) for a in axes)


def declared_shapes(cls: str, conf: Mapping, entry: Mapping) -> dict[str, Shape]:
    """weight name -> the shape the config declares, for the weights it declares one for."""
    shape = _input_shape(entry)
    if cls == "Dense":
        units = _size(conf, "units")
        return {"kernel": (_dim(shape, -1), units), "bias": (units,)}
    if "Conv" in cls and cls[-2:] in _RANK:
        return _conv(cls, conf, shape) or {}
    if cls == "Embedding":
        return {"embeddings": (_size(conf, "input_dim"), _size(conf, "output_dim"))}
    if cls in ("BatchNormalization", "GroupNormalization"):
        axes = _axes(conf, shape)
        return {name: axes for name in ("gamma", "beta", "moving_mean", "moving_variance")}
    if cls == "LayerNormalization":
        axes = _axes(conf, shape)
        return {"gamma": axes, "beta": axes}
    if cls == "PReLU" and shape is not None:
        alpha = list(shape[1:])
        shared = conf.get("shared_axes") or []
        for axis in shared if isinstance(shared, list) else [shared]:
            if _int(axis) is not None and 1 <= axis <= len(alpha):
                alpha[axis - 1] = 1
        return {"alpha": tuple(alpha)}
    return {}


def declared_dtype(conf: Mapping) -> Optional[str]:
    """The dtype the weights `declared_shapes` lists are created in, from the layer's ``dtype``
    (a policy's config as Keras 3 saves it, or a bare name); None when it is not checked."""
    policy = conf.get("dtype")
    if isinstance(policy, Mapping):
        if policy.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy"):
            return None  # quantized, a policy map, or a class of the user's
        inner = policy.get("config")
        policy = inner.get("name") if isinstance(inner, Mapping) else None
    return _VARIABLE_DTYPE.get(policy) if isinstance(policy, str) else None


def contradiction(declared: Shape, stored: tuple[int, ...]) -> bool:
    """Whether a stored shape contradicts a declared one (None: any size)."""
    return len(declared) != len(stored) or any(
        d is not None and d != s for d, s in zip(declared, stored))
