"""Freezing some entries of a weight, bit for bit, through every Keras training path.

The mechanism is one Keras constraint, `FrozenEntries`, installed on the weight: it holds the
frozen positions and their values and maps ``w`` to ``w`` with those entries put back. Keras
optimizers assign ``variable.constraint(variable)`` to every trained variable after each update
(keras/src/optimizers/base_optimizer.py, ``apply``), after momentum, Adam's moments and decoupled
weight decay, under ``fit``, custom ``apply_gradients`` loops and MirroredStrategy alike. So the
frozen entries end every step exactly as stored, whatever the optimizer did to them.

It is installed twice, and both are needed:
- on the variable (``variable.constraint``): what the optimizer reads;
- as the layer attribute its get_config serializes (``kernel_constraint``, ...): what
  ``model.save`` keeps (Keras drops a variable's own constraint) and what a loaded layer passes
  back to ``add_weight``, so a reloaded model is frozen the same way with no extra step.
The values travel inside the layer config (they cannot be snapshotted after loading: the
constraint first runs after an update has already moved them). A constraint the layer had
(max_norm, ...) is kept inside and still applies to the trainable entries.

Resolving which entries a part names is surgery/parts.py (pure Python); this module applies it.
The class is registered as ``surgery>FrozenEntries``; surgery/_register.py imports this module as
soon as Keras is imported, so ``import surgery`` is enough for ``keras.models.load_model``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ..parts import PartError, Positions, Selection, select  # noqa: E402
from .frozen_format import (AXIS_CONFIG_KEYS, FROZEN_CLASS, FROZEN_PACKAGE,  # noqa: E402
                            decode, encode_values, frozen_config)

__all__ = [
    "FrozenEntries",
    "FrozenWeight",
    "selections",
    "freeze",
    "unfreeze",
    "set_frozen",
    "frozen_weights",
    "restore",
]

# Above this many alternating frozen/trainable runs on the axis, one select replaces slicing:
# a concatenation of hundreds of slices makes a large graph for no gain.
_MAX_PIECES = 16


@keras.saving.register_keras_serializable(package=FROZEN_PACKAGE, name=FROZEN_CLASS)
class FrozenEntries(keras.constraints.Constraint):
    """``w -> w`` with the entries at ``indices`` on ``axes`` reset to ``values``, around
    ``inner`` (the layer's own constraint, or None).

    ``shape``: the weight's shape. ``axes``: consecutive axes carrying the output channels,
    flattened in C order when there are several. ``indices``: the frozen positions on them,
    sorted. ``values``: the frozen entries only, shaped like the weight with the flattened axes
    replaced by ``len(indices)`` (positions in ``indices`` order).
    """

    def __init__(self, shape, axes, indices, values, inner=None):
        self.shape = tuple(int(d) for d in shape)
        self.axes = tuple(int(a) for a in axes)
        self.indices = tuple(sorted(int(i) for i in indices))
        self.inner = inner
        a0, a1 = self.axes[0], self.axes[-1]
        if self.axes != tuple(range(a0, a1 + 1)) or a1 >= len(self.shape):
            raise ValueError(f"FrozenEntries: axes {self.axes} are not consecutive axes of "
                             f"shape {self.shape}")
        self._axis = a0
        self._size = math.prod(self.shape[a0:a1 + 1])
        self._flat_shape = self.shape[:a0] + (self._size,) + self.shape[a1 + 1:]
        values = np.asarray(values)
        want = self.shape[:a0] + (len(self.indices),) + self.shape[a1 + 1:]
        if values.shape != want:
            raise ValueError(f"FrozenEntries: values of shape {values.shape}, expected {want}")
        if len(set(self.indices)) != len(self.indices) or not all(
                0 <= i < self._size for i in self.indices) or not self.indices:
            raise ValueError(f"FrozenEntries: indices must be distinct, in [0, {self._size})")
        self.values = values
        self._pieces = _pieces(self.indices, self._size)
        self._encoded: Optional[str] = None
        self._tensors: dict = {}  # per device: the constants `_restore` reads

    # -- what the optimizer calls -------------------------------------------------------------

    def __call__(self, w):
        if self.inner is None:
            return self._restore(w)
        # Restore before the inner constraint too: one that looks across channels (a norm over
        # the output axis) must see the frozen entries as they are, not as the update left them.
        return self._restore(self.inner(self._restore(w)))

    def _restore(self, w):
        ops = keras.ops
        if len(self.indices) == self._size:  # the whole weight: nothing of `w` survives
            return self._constant("whole", w)
        flat = ops.reshape(w, self._flat_shape)
        axis = self._axis
        if len(self._pieces) <= _MAX_PIECES:
            parts = []
            for start, stop, frozen_at in self._pieces:
                if frozen_at is None:
                    parts.append(_take_range(flat, axis, start, stop))
                else:
                    parts.append(self._constant(("piece", start), w))
            out = ops.concatenate(parts, axis=axis)
        else:
            # Many runs ([::2], scattered indices): one select against the frozen values laid
            # out at their places. It holds a weight-sized tensor where slicing holds only the
            # frozen entries, but a gather ([w | values] reordered) took up to 7x the time on CPU.
            out = ops.where(self._constant("mask", w), self._constant("placed", w), flat)
        return ops.reshape(out, self.shape)

    def _constant(self, key, w):
        """A tensor this constraint needs, made once per device, outside any graph being traced
        (a captured eager tensor, not a constant baked into every traced step)."""
        device = _device_of(w)
        tensor = self._tensors.get((key, device))
        if tensor is None:
            array = self._array(key)
            with _eager_on(device):
                tensor = keras.ops.convert_to_tensor(array)
            self._tensors[(key, device)] = tensor
        return tensor

    def _array(self, key):
        axis = self._axis
        if key == "whole":
            return self.values.reshape(self.shape)
        if key in ("mask", "placed"):
            mask = np.zeros(self._size, dtype=bool)
            mask[list(self.indices)] = True
            mask = mask.reshape((1,) * axis + (self._size,) + (1,) * (len(self._flat_shape)
                                                                     - axis - 1))
            if key == "mask":
                return mask
            placed = np.zeros(self._flat_shape, dtype=self.values.dtype)
            index = [slice(None)] * placed.ndim
            index[axis] = list(self.indices)
            placed[tuple(index)] = self.values
            return placed
        _, start = key
        for s, stop, frozen_at in self._pieces:
            if s == start:
                index = [slice(None)] * self.values.ndim
                index[axis] = slice(frozen_at, frozen_at + (stop - s))
                return np.ascontiguousarray(self.values[tuple(index)])
        raise KeyError(key)

    # -- saving ---------------------------------------------------------------------------------

    def get_config(self):
        # The format is engines/frozen_format.py's, shared with the archive engine.
        if self._encoded is None:
            # Cached: the values never change and every save (and get_config) asks again.
            raw = np.ascontiguousarray(self.values, dtype=self.values.dtype.newbyteorder("<"))
            self._encoded = encode_values(raw.tobytes())
        inner = keras.constraints.serialize(self.inner) if self.inner is not None else None
        return frozen_config(self.shape, self.axes, self.indices, _dtype_name(self.values.dtype),
                             self._encoded, inner)

    @classmethod
    def from_config(cls, config):
        # Checked before anything is expanded or inflated: the config comes from a file.
        fc = decode(config)
        dtype = _np_dtype(fc.dtype)
        values = np.frombuffer(fc.values_bytes(), dtype=dtype.newbyteorder("<")).astype(
            dtype).reshape(fc.values_shape)
        inner = keras.constraints.deserialize(fc.inner) if fc.inner is not None else None
        out = cls(fc.shape, fc.axes, fc.indices, values, inner)
        out._encoded = fc.values
        return out

    def __repr__(self):
        return (f"FrozenEntries(shape={self.shape}, axes={self.axes}, "
                f"{len(self.indices)} of {self._size} frozen, inner={self.inner!r})")


# --- acting on layers -----------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenWeight:
    """One weight with frozen entries, as found in a (possibly reloaded) model.

    ``on_variable`` / ``in_config``: whether the variable's constraint (what training applies)
    and the layer attribute (what saving keeps) hold it; both are True after `freeze`, and after
    `keras.models.load_model`. ``in_sync``: whether the variable's frozen entries equal the stored
    values, bit for bit. It is False when something wrote the variable since (``load_weights``,
    ``assign``): the next training step would put the stored values back. Freeze after loading
    the weights to keep, or freeze again to keep the new ones."""

    path: str  # the layer's path in the model, '/' through nested models
    cls: str
    weight: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    indices: tuple[int, ...]
    entries: int  # frozen scalars
    inner: Optional[str]  # class name of the layer's own constraint kept inside
    on_variable: bool
    in_config: bool
    in_sync: bool


def selections(layer, part: str, index: Positions = None) -> tuple[Selection, ...]:
    """What ``layer.part[index]`` names on a live, built layer (changes nothing). Raises
    `PartError` (see surgery/parts.py) for a part the layer lacks or indices out of range."""
    variables = _variables(layer)
    return select(layer.name, _classes(layer), {n: tuple(v.shape) for n, v in variables.items()},
                  part, index, _config(layer))


def freeze(layer, part: str, index: Positions = None) -> tuple[Selection, ...]:
    """Freeze the entries ``layer.part[index]`` names, adding to those already frozen: their
    current values are kept bit for bit by every later training step, save and load included.
    Compile (or ``make_train_function(force=True)``) after: a traced step keeps the constraints
    it was traced with. Returns what was selected."""
    chosen = selections(layer, part, index)
    for sel in chosen:
        set_frozen(layer, sel.weight, set(_frozen_indices(layer, sel)) | set(sel.indices))
    return chosen


def unfreeze(layer, part: str, index: Positions = None) -> tuple[Selection, ...]:
    """Let the entries ``layer.part[index]`` names train again (those not frozen are ignored)."""
    chosen = selections(layer, part, index)
    for sel in chosen:
        set_frozen(layer, sel.weight, set(_frozen_indices(layer, sel)) - set(sel.indices))
    return chosen


def set_frozen(layer, weight: str, indices: Iterable[int]) -> Optional[FrozenEntries]:
    """Make exactly ``indices`` (positions on ``weight``'s output axes, see surgery/parts.py) the
    frozen entries of ``weight``, at their current values; an empty set unfreezes them all and
    puts the layer's own constraint back. Installs the constraint on the variable and on the
    layer attribute that get_config saves. Returns the installed constraint, or None."""
    variables = _variables(layer)
    wanted = tuple(sorted(set(int(i) for i in indices)))
    sel = select(layer.name, _classes(layer), {n: tuple(v.shape) for n, v in variables.items()},
                 weight, wanted or None, _config(layer))[0]
    _check_supported(layer, sel)
    variable = variables[weight]
    current = getattr(layer, sel.attr, None)
    inner = current.inner if isinstance(current, FrozenEntries) else current
    if not wanted:
        installed = None
        new = inner
    else:
        value = keras.ops.convert_to_numpy(variable)
        a0, a1 = sel.axes[0], sel.axes[-1]
        flat = value.reshape(sel.shape[:a0] + (sel.size,) + sel.shape[a1 + 1:])
        frozen = np.take(flat, np.asarray(wanted, dtype=np.int64), axis=a0)
        installed = new = FrozenEntries(sel.shape, sel.axes, wanted, frozen, inner)
    setattr(layer, sel.attr, new)
    variable.constraint = new
    return installed


def frozen_weights(model) -> tuple[FrozenWeight, ...]:
    """Every weight with frozen entries in ``model`` (a model or a single layer), nested models
    included, in layer order."""
    out = []
    for path, layer in _walk(model):
        variables = _variables(layer, strict=False)
        shapes = {n: tuple(v.shape) for n, v in variables.items()}
        for name, variable in variables.items():
            on_var = variable.constraint
            try:
                attr = select(layer.name, _classes(layer), shapes, name, None,
                              _config(layer))[0].attr
            except PartError:
                attr = None
            in_cfg = getattr(layer, attr, None) if attr else None
            c = on_var if isinstance(on_var, FrozenEntries) else in_cfg
            if not isinstance(c, FrozenEntries):
                continue
            out.append(FrozenWeight(
                path=path, cls=type(layer).__name__, weight=name, shape=c.shape, axes=c.axes,
                indices=c.indices, entries=int(c.values.size),
                inner=type(c.inner).__name__ if c.inner is not None else None,
                on_variable=on_var is c, in_config=in_cfg is c, in_sync=_in_sync(c, variable)))
    return tuple(out)


def restore(model) -> int:
    """Put every frozen entry of ``model`` (a model or a layer) back to its stored value, as a
    training step would; returns how many weights it wrote. For what writes variables outside
    the optimizer's update and its constraints: an optimizer with ``use_ema=True`` overwrites
    every variable with its moving average when fit ends (Keras averages the values from
    before the constraints run), so call it after fit, or from a callback's on_train_end,
    which runs after that overwrite."""
    count = 0
    for _, layer in _walk(model):
        for variable in _variables(layer, strict=False).values():
            if isinstance(variable.constraint, FrozenEntries):
                variable.assign(variable.constraint(variable))
                count += 1
    return count


# --- helpers ----------------------------------------------------------------------------------


def _frozen_indices(layer, sel: Selection) -> tuple[int, ...]:
    current = getattr(layer, sel.attr, None)
    if isinstance(current, FrozenEntries) and current.axes == sel.axes:
        return current.indices
    return ()


def _in_sync(c: FrozenEntries, variable) -> bool:
    if tuple(variable.shape) != c.shape:
        return False
    value = keras.ops.convert_to_numpy(variable).reshape(c._flat_shape)
    now = np.take(value, np.asarray(c.indices, dtype=np.int64), axis=c._axis)
    return now.shape == c.values.shape and now.tobytes() == np.ascontiguousarray(
        c.values, dtype=now.dtype).tobytes()


def _check_supported(layer, sel: Selection) -> None:
    if getattr(layer, "quantization_mode", None):
        raise PartError(f"layer {layer.name!r} ({sel.cls}) is quantized "
                        f"({layer.quantization_mode}): its {sel.weight} entries cannot be frozen")
    if sel.attr == "kernel_constraint" and getattr(layer, "lora_enabled", False):
        # Keras refuses LoRA with a kernel constraint when the saved layer is rebuilt.
        raise PartError(f"layer {layer.name!r} ({sel.cls}) has LoRA enabled: its kernel is "
                        "already frozen and Keras cannot load LoRA with a kernel constraint")
    if not hasattr(layer, sel.attr):
        raise PartError(f"layer {layer.name!r} ({sel.cls}) has no attribute {sel.attr!r} to "
                        f"save a constraint on {sel.weight} {sel.shape}")


def _variables(layer, strict: bool = True) -> dict:
    """The layer's own variables by name, not its sublayers' (Keras keeps them in these two
    lists whatever the layer's trainable flag)."""
    if strict and not layer.built:
        raise PartError(f"layer {layer.name!r} ({type(layer).__name__}) is not built: it has no "
                        "weights yet (call the model on data or build it first)")
    own = (list(getattr(layer, "_trainable_variables", ()))
           + list(getattr(layer, "_non_trainable_variables", ())))
    return {v.name: v for v in own}


def _classes(layer) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(layer).__mro__)


def _config(layer) -> dict:
    # Only EinsumDense's equation is read; get_config would also serialize any frozen values.
    return {k: getattr(layer, k) for k in AXIS_CONFIG_KEYS if hasattr(layer, k)}


def _walk(model, prefix: str = ""):
    layers = model.layers if isinstance(model, keras.Model) else [model]
    for layer in layers:
        path = prefix + layer.name
        if isinstance(layer, keras.Model) and layer is not model:
            yield from _walk(layer, path + "/")
        else:
            yield path, layer


def _pieces(indices: tuple[int, ...], size: int) -> list[tuple[int, int, Optional[int]]]:
    """Runs over ``range(size)``: (start, stop, None) for a trainable run, (start, stop, k) for a
    frozen run whose values start at position k of the stored values."""
    frozen = set(indices)
    out = []
    k = 0
    start = 0
    for i in range(1, size + 1):
        if i == size or (i in frozen) != (start in frozen):
            if start in frozen:
                out.append((start, i, k))
                k += i - start
            else:
                out.append((start, i, None))
            start = i
    return out


def _take_range(x, axis: int, start: int, stop: int):
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _np_dtype(name: str):
    # A name frozen_format.decode accepted: a number type.
    if name == "bfloat16":
        import ml_dtypes  # a Keras dependency; NumPy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _device_of(w) -> str:
    """Where ``w``'s storage lives under TensorFlow (a keras.Variable's tf.Variable, or a
    tensor's device), '' for the default. Not ``w.value``: under an autocast or stateless scope
    that is a new tensor, not the storage."""
    if keras.backend.backend() != "tensorflow":
        return ""
    storage = getattr(w, "_value", None)
    return str(getattr(w if storage is None else storage, "device", "") or "")


def _eager_on(device: str):
    """Leave any graph being traced (TensorFlow's init_scope, JAX's compile-time evaluation) and
    place on ``device``, so a constant is made once, on the variable's device, and captured by
    every step after. Under JAX a tensor made inside ``jit`` is a tracer of that one trace:
    cached, it would leak into the next trace (a rebuilt train function, ``restore`` after
    ``fit``) and JAX would refuse it."""
    stack = contextlib.ExitStack()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        stack.enter_context(tf.init_scope())
        if device:
            stack.enter_context(tf.device(device))
    elif backend == "jax":
        import jax

        stack.enter_context(jax.ensure_compile_time_eval())
    return stack
