"""LayerTree: the plain description of a model that selectors resolve against.

It holds what the language can talk about and nothing Keras-specific: names, class names, the
order of ``model.layers`` at every level, nested models, weight names and shapes, trainable flags.
The Keras adapter (engines/live.py) produces one from a live model; tests build them from plain
dicts (`LayerTree.from_dict`), so the semantics need no TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["Weight", "Layer", "LayerTree"]


@dataclass(frozen=True)
class Weight:
    """One variable of a layer. ``trainable`` is whether it trains when its layer does
    (False for BatchNormalization's moving statistics, whatever the layer's flag)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    # Positions on the weight's output axes already frozen entry by entry (surgery/parts.py),
    # and how many scalars that is: a sub-layer freeze the model carries from an earlier run.
    frozen: tuple[int, ...] = ()
    frozen_entries: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layer:
    """A layer at one place in the model. ``index`` is its position in its parent's ``.layers``;
    ``path`` joins the names from the top with '/' (Keras forbids '/' in layer names)."""

    name: str
    path: str
    cls: str
    index: int
    trainable: bool
    weights: tuple[Weight, ...] = ()
    children: tuple["Layer", ...] = ()
    container: bool = False
    # The few config values that decide where a layer's output axis is (EinsumDense's equation
    # and bias_axes), as (key, value) pairs so the dataclass stays hashable.
    details: tuple[tuple[str, str], ...] = ()
    # A BatchNormalization layer that normalizes with its moving statistics even while it trains
    # (the 'batchnorm affine' policy: surgery's AffineBatchNormalization class). ``cls`` still
    # says BatchNormalization, so selectors and fingerprints do not depend on the policy.
    affine: bool = False

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {w.name: w.shape for w in self.weights}

    @property
    def params(self) -> int:
        return sum(w.size for w in self.weights) + sum(c.params for c in self.children)

    @property
    def trainable_capable_params(self) -> int:
        """Parameters that train when this layer and its ancestors are trainable."""
        return sum(w.size for w in self.weights if w.trainable) + sum(
            c.trainable_capable_params for c in self.children)

    @property
    def depth(self) -> int:
        return self.path.count("/")


class LayerTree:
    """A model as a tree of `Layer`s, with lookups the resolver needs, built once."""

    def __init__(self, root: Layer):
        self.root = root
        self._nodes: list[Layer] = []
        self._parent: dict[str, Optional[Layer]] = {}
        self._effective: dict[str, bool] = {}
        self._by_path: dict[str, Layer] = {}
        self._walk(root, None, True)

    def _walk(self, node: Layer, parent: Optional[Layer], parent_trainable: bool) -> None:
        # Iterative would be safer for absurd depths, but nesting depth is that of Keras models
        # (a handful); breadth (thousands of layers) is a loop, not recursion.
        effective = parent_trainable and node.trainable
        if parent is not None:
            self._nodes.append(node)
        self._parent[node.path] = parent
        self._effective[node.path] = effective
        self._by_path[node.path] = node
        for child in node.children:
            self._walk(child, node, effective)

    # --- queries -----------------------------------------------------------------------------

    def layers(self) -> list[Layer]:
        """Every layer below the root, in pre-order (a container before what it holds)."""
        return list(self._nodes)

    def leaves(self) -> Iterator[Layer]:
        return (n for n in self._nodes if not n.children)

    def get(self, path: str) -> Layer:
        return self._by_path[path]

    def parent(self, layer: Layer) -> Optional[Layer]:
        return self._parent[layer.path]

    def effectively_trainable(self, layer: Layer) -> bool:
        """Keras trains a layer's weights only if the layer and every container above it are
        trainable: a frozen container hides its children's weights whatever their own flags."""
        return self._effective[layer.path]

    # --- construction for tests and tools ----------------------------------------------------

    @classmethod
    def from_dict(cls, description: dict) -> "LayerTree":
        """Build from plain data::

            {"name": "model", "layers": ["input_1", "conv1:Conv2D",
                                         {"name": "base", "class": "Functional", "layers": [...]},
                                         {"name": "fc", "class": "Dense", "trainable": false,
                                          "weights": [["kernel", [4, 2]], ["bias", [2]]]},
                                         {"name": "bn", "class": "BatchNormalization",
                                          "affine": true}]}

        A string is ``name`` or ``name:Class``; a layer without ``weights`` gets one weight of
        size 1 unless its class is an InputLayer, so parameter totals stay meaningful.
        """
        return cls(_layer_from_dict(description, "", 0, is_root=True))


# Default weights for test descriptions: small, but with the layouts Keras uses, so parts
# (filters, units) resolve on them as on real layers.
_SHAPES = {
    "Conv2D": {"kernel": (3, 3, 3, 8), "bias": (8,)},
    "Dense": {"kernel": (8, 4), "bias": (4,)},
    "BatchNormalization": {"gamma": (8,), "beta": (8,), "moving_mean": (8,),
                           "moving_variance": (8,)},
}


def _layer_from_dict(d, parent_path: str, index: int, is_root: bool = False) -> Layer:
    if isinstance(d, str):
        name, _, klass = d.partition(":")
        d = {"name": name, "class": klass or "Layer"}
    name = d["name"]
    path = "" if is_root else (f"{parent_path}/{name}" if parent_path else name)
    children = tuple(_layer_from_dict(c, path, i) for i, c in enumerate(d.get("layers", ())))
    klass = d.get("class") or ("Functional" if "layers" in d else "Layer")
    if "weights" in d:
        weights = tuple(Weight(w[0], tuple(w[1]), bool(w[2]) if len(w) > 2 else True)
                        for w in d["weights"])
    elif klass in _SHAPES:
        weights = tuple(Weight(n, shape, n not in ("moving_mean", "moving_variance"))
                        for n, shape in _SHAPES[klass].items())
    elif children or klass == "InputLayer" or "layers" in d:
        weights = ()
    else:
        weights = (Weight("w", (1,)),)
    return Layer(name=name, path=path, cls=klass, index=index,
                 trainable=bool(d.get("trainable", True)), weights=weights, children=children,
                 container="layers" in d, affine=bool(d.get("affine", False)))
