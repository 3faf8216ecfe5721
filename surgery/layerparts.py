"""A selector's part against the layers it matched: which weights of which layers it names.

surgery/parts.py knows, per layer class, where a weight carries the output channels; this module
applies a part to tree nodes: a part after a selector that matches several layers (``**/*.bias``,
``transformer_layer_*/**/*.kernel``) names that weight of every matched layer that has it, and is
an error only when none has it; a whole weight (``.embeddings``, ``.class_token``) can be named
on any layer, whether or not parts.py knows its class; and an error on a layer that holds layers
lists the weights inside it by path, not one shape per short name.
"""

from __future__ import annotations

import math
from typing import Optional

from .errors import Diagnostic
from .ir import WEIGHT, Index, Selector
from .parts import PartError, Selection, parts_of
from .parts import select as select_part
from .tree import Layer

__all__ = ["part_selections", "whole_weight", "whole_selection"]


def whole_weight(node: Layer, weight: str) -> Selection:
    """Every entry of one of ``node``'s weights. parts.py gives it where it knows the class (the
    attribute its constraint is saved under); for other classes the selection has every axis
    and no attribute: the weight can be frozen whole (by its variable's flag), not in part."""
    return whole_selection(node.path, node.cls, node.shapes, dict(node.details), weight)


def whole_selection(path: str, cls: str, shapes: dict, details: dict, weight: str) -> Selection:
    """`whole_weight` from a layer's parts, for an engine describing a layer."""
    try:
        return select_part(path, cls, shapes, weight, None, details)[0]
    except PartError:
        if weight not in shapes:
            raise
    shape = tuple(shapes[weight])
    return Selection(path, cls, weight, "", shape, tuple(range(len(shape))),
                     tuple(range(math.prod(shape))))


def _has(node: Layer, sel: Selector) -> bool:
    part = sel.part
    if part.kind == WEIGHT:
        return part.name in node.shapes
    return part.kind in parts_of(node.path, node.cls, node.shapes, dict(node.details))


def part_selections(sel: Selector, nodes: list[Layer], held: bool
                    ) -> tuple[dict[str, tuple[Selection, ...]], Optional[Diagnostic]]:
    """The entries ``sel.part`` names on the matched ``nodes`` (layer path -> selections), or
    the first reason it names none. ``held``: the rule unfreezes, and so cannot name a weight
    whose variable flag the model keeps off (LoRA's merged kernel)."""
    if len(nodes) > 1:
        having = [n for n in nodes if _has(n, sel)]
        if not having:
            return {}, _none_has(sel, nodes)
        nodes = having
    out: dict[str, tuple[Selection, ...]] = {}
    for node in nodes:
        selections, problem = _on_layer(sel, node)
        if problem is None and held:
            problem = _held(sel, node, selections)
        if problem is not None:
            return {}, problem
        out[node.path] = selections
    return out, None


def _on_layer(sel: Selector, node: Layer) -> tuple[tuple[Selection, ...], Optional[Diagnostic]]:
    part = sel.part
    if node.children and not node.weights:
        if node.container:
            return (), Diagnostic("error", f"'{node.path}' is a nested model: a part names "
                                  f"weights of one layer, as in '{node.path}/conv1.kernel'",
                                  part.span)
        return (), Diagnostic("error", _inside(node, part), part.span)
    if part.kind == WEIGHT:
        name, index = part.name, None
    else:
        name = part.kind
        ch = part.channels
        index = ch.index if isinstance(ch, Index) else slice(ch.start, ch.stop, ch.step)
    try:
        if index is None and part.kind == WEIGHT:
            return (whole_weight(node, name),), None
        return select_part(node.path, node.cls, node.shapes, name, index,
                           dict(node.details)), None
    except PartError as exc:
        message = str(exc)
        if node.children:
            message += "; " + _inside(node, part, own=False)
        return (), Diagnostic("error", message, part.span)


def _inside(node: Layer, part, own: bool = True) -> str:
    """What a layer that holds layers has inside it, by path, and how to name one."""
    found = [(n.path, w) for n in _below(node) for w in n.weights]
    name = part.name if part.kind == WEIGHT else part.kind
    listed = ", ".join(f"{p}/{w.name} {w.shape}" for p, w in found[:6]) + (
        f", ... ({len(found)} in all)" if len(found) > 6 else "")
    example = next((p for p, w in found if w.name == name), found[0][0] if found else "")
    rel = example[len(node.path) + 1:] if example else ""
    lead = (f"'{node.path}' ({node.cls}) holds layers and has no weight {name!r} of its own: "
            if own else "")
    if not found:
        return lead + "the layers inside it have no weights"
    return (f"{lead}the weights inside it are {listed}; name the layer that holds one with '/', "
            f"as in '{node.path}/{rel}.{_written(part)}', or '{node.path}/**/*.{_written(part)}' "
            f"for every layer inside that has it")


def _below(node: Layer):
    for c in node.children:
        yield c
        yield from _below(c)


def _written(part) -> str:
    if part.kind == WEIGHT:
        return part.name
    return part.kind + "[...]"


def _none_has(sel: Selector, nodes: list[Layer]) -> Diagnostic:
    part = sel.part
    name = part.name if part.kind == WEIGHT else part.kind
    seen = sorted({w.name for n in nodes for w in n.weights})
    shown = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "") if seen else "none"
    return Diagnostic("error", f"none of the {len(nodes)} layers that "
                      f"'{sel.text[:len(sel.text) - len(_part_text(sel))]}' matches has a part "
                      f"{name!r}; their weights are named {shown}", part.span)


def _part_text(sel: Selector) -> str:
    span = sel.part.span
    if span.line == sel.span.line == span.end_line:
        return sel.text[span.column - sel.span.column:]
    return ""  # pragma: no cover - selectors do not span lines


def _held(sel: Selector, node: Layer, selections: tuple[Selection, ...]) -> Optional[Diagnostic]:
    held = {w.name for w in node.weights if w.held}
    for s in selections:
        if s.weight in held:
            return Diagnostic(
                "error", f"'{node.path}.{s.weight}' keeps its variable's own trainable flag off "
                "(LoRA's merged kernel, or a flag set by hand), and surgery leaves such flags as "
                "the model has them: set the variable's trainable flag before surgery, or "
                "unfreeze the layer's other weights", sel.part.span)
    return None
