"""The structure read from config.json + the weights file -> the LayerTree.

It must equal what ``engines.live.describe`` gives for the model ``keras.models.load_model``
loads, since resolution, planning and the manifest are shared by the two engines. Weight names
and trainability come from Keras's per-class tables (engines/archive/keras_layout.py), shapes
from the weights file, and every group the config implies is checked to be where Keras saves
it: anything else (nested state, a weight surgery cannot name, layers shared between models) is
`ArchiveUnsupported`.

Each weight's shape and dtype are checked against those its layer's config declares
(engines/archive/declared.py), so weights that belong to another architecture, or were stored in
another precision than the config says, are an error.

Entries frozen inside a layer (sub-layer freezing) are a FrozenEntries constraint in its config,
values included; describing them needs only the config (engines/frozen_format.py decodes it,
checked against the weight's shape from the weights file).
"""

from __future__ import annotations

import json

from ...errors import ArchiveUnsupported, DamagedArchive, FrozenEntriesError
from ...tree import Layer, LayerTree, Weight
from ..frozen_format import FrozenConfig, axis_details, decode, is_frozen_object
from .config import Node
from .declared import BadSize, contradiction, declared_dtype, declared_shapes
from .h5 import Reader
from .keras_layout import WEIGHTS, AutoNames, constrained_weight, join, weight_names

__all__ = ["describe_tree", "frozen_constraints"]


def describe_tree(root: Node, reader: Reader) -> LayerTree:
    top = reader.children("")
    known = {"layers", "vars", "optimizer"} if root.compiled else {"layers", "vars"}
    if top is None or not set(top) <= known:
        extra = sorted(set(top or ()) - known)
        raise ArchiveUnsupported(f"{WEIGHTS} holds state beyond the layers ({', '.join(extra)})")
    return LayerTree(_layer(root, reader, AutoNames()))


def _layer(node: Node, reader: Reader, auto: AutoNames) -> Layer:
    if node.container:
        _check_container_group(node, reader)
        children = tuple(_layer(c, reader, auto) for c in node.children)
        weights: tuple[Weight, ...] = ()
    else:
        children = ()
        vars_path, shapes = _layer_vars(node, reader)
        named = weight_names(node.cls, node.module, node.conf, len(shapes), auto)
        if named is None:
            raise ArchiveUnsupported(
                f"layer {node.where!r} ({node.cls}) has {len(shapes)} weight"
                f"{'s' if len(shapes) != 1 else ''} surgery cannot name without Keras")
        by_name = dict(zip((n for n, _ in named), shapes))
        _check_declared(node, reader, by_name,
                        {n: f"{vars_path}/{i}" for i, (n, _) in enumerate(named)})
        frozen = {weight: fc for weight, (_attr, fc) in
                  frozen_constraints(node, by_name).items()}
        weights = tuple(Weight(n, s, t, frozen=frozen[n].indices,
                               frozen_entries=frozen[n].entries)
                        if n in frozen else Weight(n, s, t)
                        for (n, t), s in zip(named, shapes))
    details = () if node.container else axis_details(node.cls, node.conf)
    return Layer(name=node.name, path=node.path, cls=node.cls, index=node.index,
                 trainable=node.loaded_flag(), weights=weights, children=children,
                 container=node.container, details=details, affine=node.affine)


def _check_declared(node: Node, reader: Reader, stored: dict[str, tuple[int, ...]],
                    paths: dict[str, str]) -> None:
    """The shape and dtype of each weight the layer's config declares, against the file."""
    try:
        declared = declared_shapes(node.cls, node.conf, node.entry)
    except BadSize as exc:
        raise DamagedArchive(f"layer {node.where!r} ({node.cls}): config.json has {exc.field} "
                             f"{json.dumps(exc.value)}, where Keras needs a positive whole "
                             "number: Keras cannot load this model") from None
    for weight, want in declared.items():
        shape = stored.get(weight)
        if shape is not None and contradiction(want, shape):
            wanted = "(" + ", ".join("?" if d is None else str(d) for d in want) + \
                ("," if len(want) == 1 else "") + ")"
            raise DamagedArchive(f"layer {node.where!r} ({node.cls}): {WEIGHTS} holds its "
                                 f"{weight} as {shape}, where config.json makes it {wanted}: "
                                 "the weights do not belong to this architecture")
    dtype = declared_dtype(node.conf) if declared else None
    for weight in declared if dtype is not None else ():
        if weight in paths and (found := reader.dtype(paths[weight])) != dtype:
            raise DamagedArchive(f"layer {node.where!r} ({node.cls}): {WEIGHTS} holds its "
                                 f"{weight} as {found}, where config.json makes it {dtype}: "
                                 "the weights do not match the config (Keras would cast them as "
                                 "it loads them)")


def frozen_constraints(node: Node, shapes: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[str, FrozenConfig]]:
    """weight -> (config attribute, its FrozenEntries config, checked against the weight's
    shape) for the layer's weights with entries frozen inside."""
    out = {}
    for attr, value in node.conf.items():
        if not is_frozen_object(value):
            continue
        weight = constrained_weight(node.cls, attr)
        if weight is None or weight not in shapes:
            raise ArchiveUnsupported(f"layer {node.path!r} has frozen entries on {attr}, "
                                     "which surgery cannot place without Keras")
        try:
            out[weight] = (attr, decode(value.get("config"), shape=shapes[weight]))
        except FrozenEntriesError as exc:
            raise DamagedArchive(f"layer {node.path!r}, {attr}: {exc}") from None
    return out


def _check_container_group(node: Node, reader: Reader) -> None:
    if node.path:  # the root's group is the file itself
        group = reader.children(node.h5)
        if group is None or not set(group) <= {"vars", "layers"}:
            raise ArchiveUnsupported(f"model {node.where!r} is not where Keras saves it in "
                                     f"{WEIGHTS}")
        if reader.children(join(node.h5, "vars")):
            raise ArchiveUnsupported(f"model {node.where!r} has variables of its own")
        _check_name(node, reader)
    expected = {c.h5.rsplit("/", 1)[-1] for c in node.children}
    present = reader.children(join(node.h5, "layers")) or {}
    if set(present) != expected:
        extra = sorted(set(present) - expected)
        missing = sorted(expected - set(present))
        raise ArchiveUnsupported(
            f"the layers of {node.where!r} do not match {WEIGHTS}"
            + (f" (saved but not in the config: {', '.join(extra[:3])})" if extra else "")
            + (f" (not saved: {', '.join(missing[:3])}; layers shared between models?)"
               if missing else ""))


def _check_name(node: Node, reader: Reader) -> None:
    saved = reader.name_attr(join(node.h5, "vars"))
    if saved is not None and saved != node.name:
        raise ArchiveUnsupported(f"{WEIGHTS} has {saved!r} where the config has {node.name!r}")


def _layer_vars(node: Node, reader: Reader) -> tuple[str, list[tuple[int, ...]]]:
    """(the layer's vars group, the shape of each of its variables in order)."""
    group = reader.children(node.h5)
    if group is None:
        raise ArchiveUnsupported(f"layer {node.path!r} has no entry in {WEIGHTS}; layers shared "
                                 "between models?")
    if set(group) != {"vars"}:
        raise ArchiveUnsupported(f"layer {node.path!r} ({node.cls}) holds nested layers or "
                                 f"state ({', '.join(sorted(set(group) - {'vars'})[:3])})")
    vars_path = join(node.h5, "vars")
    _check_name(node, reader)
    entries = reader.children(vars_path) or {}
    n = len(entries)
    if set(entries) != {str(i) for i in range(n)} or any(k != "dataset" for k in entries.values()):
        raise ArchiveUnsupported(f"layer {node.path!r} ({node.cls}) stores its variables in a "
                                 "layout surgery does not know")
    return vars_path, [reader.shape(f"{vars_path}/{i}") for i in range(n)]
