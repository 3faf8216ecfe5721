"""Parts of a layer below the whole layer: which entries of which weight a part names.

``conv1_conv.filters[0:32]`` names, in every weight that carries the layer's output channels, the
entries that produce output channels 0..31: the kernel's slices on its output axis and the
matching bias entries. ``conv1_conv.bias`` names a whole weight; ``head.kernel[0:2]`` one weight's
slices on its output axis. This module only answers *which entries*: pure Python on class names,
weight shapes and the layer's config (no Keras, no NumPy), so plans and their errors can be
computed and tested without TensorFlow. engines/constraint.py turns a `Selection` into a frozen
weight.

The output axis depends on the layer class (Keras's kernel layouts):

    Conv1D/2D/3D               kernel (*k, in/groups, filters)     last axis
    Conv1D/2D/3DTranspose      kernel (*k, filters, in)            the axis before last
    DepthwiseConv1D/2D         kernel (*k, in, multiplier)         last two axes, flattened:
                                                                   output c = i * multiplier + m
    SeparableConv1D/2D         pointwise_kernel (1.., in*mult, filters), last axis; the
                               depthwise_kernel as DepthwiseConv, freezable on its own
    Dense                      kernel (in, units)                  last axis
    EinsumDense                the one kernel letter that the output has; none or several is an
                               error (no single output axis)
    BatchNormalization,        gamma, beta: every axis (one entry per normalized channel)
    LayerNormalization

Every bias is indexed by output channel on axis 0, except EinsumDense's, where the output letter
sits where ``bias_axes`` puts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

from .errors import PartError

__all__ = [
    "PartError",
    "Selection",
    "Positions",
    "select",
    "indices",
    "format_index",
]

# Which output channels (positions) of a part: all of them (None), one, a slice, or a list.
# (Not ir.Index, which is the `layers[3]` selector segment.)
Positions = Union[None, int, slice, Iterable[int]]


@dataclass(frozen=True)
class _Rule:
    """Where one weight of a layer class carries the output channels."""

    weight: str  # the variable's name in Keras ("kernel", "pointwise_kernel", ...)
    attr: str  # the layer attribute its get_config serializes ("kernel_constraint", ...)
    axes: Optional[tuple[int, ...]]  # consecutive axes, negative from the end; None: every axis
    unit: bool  # whether the unit part (filters/units) includes this weight


_CONV = (_Rule("kernel", "kernel_constraint", (-1,), True),
         _Rule("bias", "bias_constraint", (0,), True))
_CONV_TRANSPOSE = (_Rule("kernel", "kernel_constraint", (-2,), True),
                   _Rule("bias", "bias_constraint", (0,), True))
# Depthwise kernels are (*k, in, multiplier) and TensorFlow numbers output channels
# in * multiplier + m: the C-order flattening of the last two axes.
_DEPTHWISE = (_Rule("kernel", "depthwise_constraint", (-2, -1), True),
              _Rule("bias", "bias_constraint", (0,), True))
_SEPARABLE = (_Rule("depthwise_kernel", "depthwise_constraint", (-2, -1), False),
              _Rule("pointwise_kernel", "pointwise_constraint", (-1,), True),
              _Rule("bias", "bias_constraint", (0,), True))
_DENSE = (_Rule("kernel", "kernel_constraint", (-1,), True),
          _Rule("bias", "bias_constraint", (0,), True))
_NORM = (_Rule("gamma", "gamma_constraint", None, False),
         _Rule("beta", "beta_constraint", None, False))

# Matched against the class and its bases in MRO order, so a user's subclass of Conv2D (or the
# Keras base classes the public ones share) resolves like its parent. The unit part's name is what
# the layer's constructor calls its outputs.
_TABLE: dict[str, tuple[str, tuple[_Rule, ...]]] = {
    **{c: ("filters", _CONV) for c in ("Conv1D", "Conv2D", "Conv3D", "BaseConv")},
    **{c: ("filters", _CONV_TRANSPOSE)
       for c in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "BaseConvTranspose")},
    **{c: ("filters", _DEPTHWISE)
       for c in ("DepthwiseConv1D", "DepthwiseConv2D", "BaseDepthwiseConv")},
    **{c: ("filters", _SEPARABLE)
       for c in ("SeparableConv1D", "SeparableConv2D", "BaseSeparableConv")},
    "Dense": ("units", _DENSE),
    "EinsumDense": ("units", ()),  # computed from the equation
    **{c: ("", _NORM) for c in ("BatchNormalization", "LayerNormalization")},
}

@dataclass(frozen=True)
class Selection:
    """Entries of one weight: ``indices`` (sorted, unique) over ``axes`` of ``shape``, flattened
    in C order when there are several (DepthwiseConv's in x multiplier). ``attr`` is the layer
    attribute whose constraint Keras saves with the layer."""

    layer: str
    cls: str
    weight: str
    attr: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    indices: tuple[int, ...]

    @property
    def size(self) -> int:
        """Positions on the (flattened) axes."""
        return math.prod(self.shape[a] for a in self.axes)

    @property
    def whole(self) -> bool:
        return len(self.indices) == self.size

    @property
    def entries(self) -> int:
        """Frozen scalars: the selected positions times everything off the axes."""
        return len(self.indices) * (math.prod(self.shape) // max(self.size, 1))


@dataclass(frozen=True)
class _Weight:
    rule: _Rule
    shape: tuple[int, ...]
    axes: Optional[tuple[int, ...]]  # non-negative; None: no single output axis
    why: str = ""  # when axes is None: the reason, for the error


def _class_rules(classes: Sequence[str]) -> tuple[str, str, tuple[_Rule, ...]]:
    for c in classes:
        if c in _TABLE:
            unit, rules = _TABLE[c]
            return c, unit, rules
    return "", "", ()


def _weights(classes: Sequence[str], shapes: Mapping[str, Sequence[int]],
             config: Mapping) -> tuple[str, dict[str, _Weight]]:
    """The unit part's name and every weight the layer has that a part can name."""
    known, unit, rules = _class_rules(classes)
    out: dict[str, _Weight] = {}
    if known == "EinsumDense":
        return unit, _einsum(shapes, config)
    for rule in rules:
        if rule.weight not in shapes:
            continue  # use_bias=False, center=False, ...
        shape = tuple(int(d) for d in shapes[rule.weight])
        if rule.axes is None:
            axes = tuple(range(len(shape)))
        else:
            axes = tuple(a % len(shape) for a in rule.axes)
        out[rule.weight] = _Weight(rule, shape, axes)
    return unit, out


def _einsum(shapes: Mapping[str, Sequence[int]], config: Mapping) -> dict[str, _Weight]:
    # Keras's EinsumDense: the kernel's letters that appear in the output are its output axes
    # (keras/src/layers/core/einsum_dense.py, _analyze_split_string). The bias spans the output
    # spec from its first bias letter on, size 1 where a letter is not in bias_axes.
    equation = str(config.get("equation", "")).replace("...", "")
    try:
        inputs, rest = equation.split(",")
        kernel_spec, output_spec = rest.split("->")
    except ValueError:
        return {}
    out: dict[str, _Weight] = {}
    letters = [c for c in kernel_spec if c in output_spec]
    if "kernel" in shapes:
        shape = tuple(int(d) for d in shapes["kernel"])
        rule = _Rule("kernel", "kernel_constraint", None, True)
        if len(letters) == 1:
            out["kernel"] = _Weight(rule, shape, (kernel_spec.index(letters[0]),))
        else:
            which = ("output axes " + " and ".join(f"{kernel_spec.index(c)} ({c!r})"
                                                   for c in letters)
                     if letters else "no output axis")
            out["kernel"] = _Weight(rule, shape, None,
                                    f"its equation {config.get('equation')!r} gives the kernel "
                                    f"{which}")
    if "bias" in shapes:
        shape = tuple(int(d) for d in shapes["bias"])
        rule = _Rule("bias", "bias_constraint", None, True)
        bias_axes = str(config.get("bias_axes") or "")
        if len(letters) == 1 and letters[0] in bias_axes:
            first = min(output_spec.index(c) for c in bias_axes)
            out["bias"] = _Weight(rule, shape, (output_spec[first:].index(letters[0]),))
        else:
            # A bias without the unit letter is shared by every unit: freezing "the entries of
            # unit k" in it would freeze the other units' too.
            out["bias"] = _Weight(rule, shape, None,
                                  f"its bias (bias_axes {config.get('bias_axes')!r}) is shared "
                                  "across units")
    return out


def parts_of(layer: str, classes: Union[str, Sequence[str]], shapes: Mapping[str, Sequence[int]],
             config: Optional[Mapping] = None) -> tuple[str, ...]:
    """The part names the layer has: its unit part (``filters``/``units``) first, then weights
    (layerparts.py asks it which layers a part after a glob applies to)."""
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    unit, weights = _weights(classes, shapes, config or {})
    names = [unit] if unit and any(w.rule.unit for w in weights.values()) else []
    return tuple(names + list(weights))


def select(layer: str, classes: Union[str, Sequence[str]], shapes: Mapping[str, Sequence[int]],
           part: str, index: Positions = None, config: Optional[Mapping] = None
           ) -> tuple[Selection, ...]:
    """The entries ``layer.part[index]`` names, one `Selection` per weight.

    ``classes``: the layer's class name, or its class and base names in MRO order (a subclass of
    Conv2D resolves as Conv2D). ``shapes``: the layer's weights by variable name. ``config``: the
    layer's get_config() (EinsumDense's equation and bias_axes). ``part``: ``filters``/``units``
    (every weight carrying the output channels: kernel and bias), or a weight name. ``index``:
    None (the whole part), an int, a slice or an iterable of ints over the output channels.
    Raises `PartError` for a part the layer lacks or indices outside it.
    """
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    cls = classes[0] if classes else "?"
    if index is not None and not isinstance(index, (int, slice)):
        index = tuple(index)  # read twice: once to pick, once for an error message
    unit, weights = _weights(classes, shapes, config or {})
    if part and part == unit:
        chosen = [w for w in weights.values() if w.rule.unit]
        if not chosen:
            raise PartError(_no_part(layer, cls, part, unit, weights, shapes))
    elif part in weights:
        chosen = [weights[part]]
    else:
        raise PartError(_no_part(layer, cls, part, unit, weights, shapes))

    out = []
    for w in chosen:
        if w.axes is None:
            if index is None and part == w.rule.weight:
                axes = tuple(range(len(w.shape)))  # the whole weight needs no output axis
            else:
                raise PartError(f"layer {layer!r} ({cls}) has no single output axis for "
                                f"{part}{format_index(index)}: {w.why}; {w.rule.weight} shape "
                                f"{w.shape}")
        else:
            axes = w.axes
        size = math.prod(w.shape[a] for a in axes)
        what = part if part == unit else "entries"
        where = (f"{w.rule.weight} {w.shape} has {size} {what} on "
                 f"{_axes_text(axes, cls)}")
        try:
            picked = indices(index, size)
        except IndexError as e:
            raise PartError(f"layer {layer!r} ({cls}): {part}{format_index(index)} {e}: "
                            f"{where}") from None
        out.append(Selection(layer, cls, w.rule.weight, w.rule.attr, w.shape, axes, picked))
    return tuple(out)


def _axes_text(axes: tuple[int, ...], cls: str = "") -> str:
    if len(axes) == 1:
        return f"axis {axes[0]}"
    text = f"axes {axes[0]}-{axes[-1]}"
    if "Depthwise" in cls or "Separable" in cls:
        text += " (channels x depth multiplier)"
    return text


def _no_part(layer, cls, part, unit, weights, shapes) -> str:
    shown = ", ".join(f"{n} {tuple(int(d) for d in s)}" for n, s in shapes.items()) or "none"
    offered = []
    if unit and any(w.rule.unit for w in weights.values()):
        carriers = ", ".join(f"{w.rule.weight} {_axes_text(w.axes)}"
                             for w in weights.values() if w.rule.unit and w.axes is not None)
        offered.append(f"{unit} ({carriers})" if carriers else unit)
    offered += list(weights)
    parts = ", ".join(offered) if offered else "none that surgery can freeze entry by entry"
    return (f"layer {layer!r} ({cls}) has no part {part!r}: its weights are {shown}; "
            f"its parts: {parts}")


def indices(index: Positions, size: int) -> tuple[int, ...]:
    """``index`` over ``range(size)`` as sorted unique ints. Unlike Python's slicing, bounds past
    the end are errors, not clamped (``filters[0:100]`` on 64 filters is a mistake), and so is an
    empty selection. Raises IndexError with the reason (the caller adds the layer)."""
    if index is None:
        return tuple(range(size))
    if isinstance(index, bool):
        raise IndexError("is not an index")
    if isinstance(index, int):
        if not -size <= index < size:
            raise IndexError("is out of range")
        return (index % size,)
    if isinstance(index, slice):
        for bound in (index.start, index.stop):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise IndexError("has a bound that is not an int")
            if bound is not None and not -size <= bound <= size:
                raise IndexError("is out of range")
        if index.step == 0:
            raise IndexError("has step 0")
        picked = sorted(range(size)[index])
        if not picked:
            raise IndexError("is empty")
        return tuple(picked)
    picked = set()
    for i in index:
        if isinstance(i, bool) or not isinstance(i, int):
            raise IndexError("has an index that is not an int")
        if not -size <= i < size:
            raise IndexError("is out of range")
        picked.add(i % size)
    if not picked:
        raise IndexError("is empty")
    return tuple(sorted(picked))


def format_index(index: Positions) -> str:
    """How ``index`` is written after a part name: ``[0:32]``, ``[3]``, ``[::2]``, ``[1, 4]``."""
    if index is None:
        return ""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, slice):
        def b(v):
            return "" if v is None else str(v)
        text = f"{b(index.start)}:{b(index.stop)}"
        if index.step is not None:
            text += f":{index.step}"
        return f"[{text}]"
    return f"[{', '.join(str(i) for i in index)}]"
