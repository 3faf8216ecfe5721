"""A Plan -> the parsed config.json in that plan's state, changed in place.

What ``model.save`` writes after the live engine wrote the plan (engines.live.write): each
layer's ``trainable`` flag, its class entry (affine BatchNormalization or not), and the entries
frozen inside it: a FrozenEntries constraint per weight, changed only where the planned entries
differ from those it carries. Freezing new entries stores their values, read from the weights
file and encoded by engines/frozen_format.py, the encoder the live engine's constraint uses too.
Removing them puts back the constraint the FrozenEntries wrapped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from ...errors import ArchiveUnsupported
from ...parts import PartError, select
from ...tree import Layer
from ..frozen_format import (AXIS_CONFIG_KEYS, FrozenConfig, encode_values, frozen_config,
                             frozen_object, index_runs, set_affine_entry)
from .config import Node
from .describe import frozen_constraints
from .h5 import Reader
from .keras_layout import join

if TYPE_CHECKING:  # pragma: no cover
    from ...plan import Plan

__all__ = ["check_plan", "set_state", "take"]


def check_plan(root: Node, plan: "Plan") -> None:
    """The plan must be for this architecture: same layer paths and classes, in order."""
    ours = [(n.path, n.cls) for n in root.walk()]
    theirs = [(lp.path, lp.layer.cls) for lp in plan.layers]
    if ours != theirs:
        raise ValueError("the plan was made for another model than this archive")


def set_state(root: Node, plan: "Plan", reader: Reader) -> None:
    """Write ``plan``'s state into the config dicts ``root`` holds; ``reader`` gives the
    values of entries newly frozen inside weights."""
    root.conf["trainable"] = bool(plan.root_after)
    for node in root.walk():
        if node.kind == "input":
            continue  # InputLayer.get_config has no trainable key
        lp = plan.by_path[node.path]
        node.conf["trainable"] = bool(lp.after)
        if node.container:
            continue
        if lp.affine != node.affine:  # engines.batchnorm.switch: only the class entry changes
            set_affine_entry(node.entry, lp.affine)
        wanted = {p.weight: p.indices for p in lp.frozen_parts}
        carried = {w.name: w.frozen for w in lp.layer.weights if w.frozen}
        current = frozen_constraints(node, lp.layer.shapes)
        for weight in sorted(set(wanted) | set(carried)):
            indices = wanted.get(weight, ())
            if indices == carried.get(weight, ()):
                continue
            if not indices:  # set_frozen(layer, weight, ()): the layer's own constraint is back
                attr, fc = current[weight]
                node.conf[attr] = fc.inner
                continue
            found = current.get(weight)
            _freeze_entries(node, lp.layer, weight, indices, found[1] if found else None,
                            reader)


def _freeze_entries(node: Node, layer: Layer, weight: str, indices: tuple[int, ...],
                    current: Optional[FrozenConfig], reader: Reader) -> None:
    """engines.constraint.set_frozen on the config: a FrozenEntries constraint holding the
    values of ``indices`` read from the weights file, around the layer's own constraint."""
    try:
        sel = select(node.name, node.cls, layer.shapes, weight, indices,
                     {k: node.conf[k] for k in AXIS_CONFIG_KEYS if k in node.conf})[0]
    except PartError as exc:
        raise ArchiveUnsupported(str(exc)) from None
    k = [w.name for w in layer.weights].index(weight)
    path = f"{join(node.h5, 'vars')}/{k}"
    try:
        dtype, raw = reader.dataset(path)
    except ArchiveUnsupported as exc:
        raise ArchiveUnsupported(f"layer {node.path!r}: {exc}") from None
    itemsize = len(raw) // max(math.prod(sel.shape), 1)
    a0, a1 = sel.axes[0], sel.axes[-1]
    taken = take(raw, math.prod(sel.shape[:a0]), sel.size,
                 math.prod(sel.shape[a1 + 1:]) * itemsize, sel.indices)
    inner = current.inner if current is not None else node.conf.get(sel.attr)
    node.conf[sel.attr] = frozen_object(frozen_config(sel.shape, sel.axes, sel.indices, dtype,
                                                      encode_values(taken), inner))


def take(raw: bytes, outer: int, size: int, row: int, indices: tuple[int, ...]) -> bytes:
    """``np.take(a, indices, axis=1)`` of a C-order array of shape (outer, size, row bytes),
    without NumPy, by whichever is cheaper: a slice copy per run of indices per outer position
    (memcpy speed, one Python step each), or a strided copy per byte column (few Python steps,
    about ten times slower per byte). Measured here: 0.3 us a step, 1 and 10 ns a byte."""
    n = len(indices)
    out = bytearray(outer * n * row)
    dst, src = memoryview(out), memoryview(raw)
    runs = index_runs(indices)
    if outer * len(runs) * 300 + len(out) <= n * row * 300 + 10 * len(out):
        at = 0
        for o in range(outer):
            for start, stop in runs:
                chunk = (stop - start) * row
                begin = (o * size + start) * row
                dst[at:at + chunk] = src[begin:begin + chunk]
                at += chunk
    else:
        for j, i in enumerate(indices):
            for b in range(row):
                dst[j * row + b::n * row] = src[i * row + b::size * row]
    return bytes(out)
