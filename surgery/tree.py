"""LayerTree: the plain description of a model that selectors resolve against.

It holds what the language can talk about and nothing Keras-specific: names, class names, the
order of layers at every level, weight names and shapes, trainable flags (of layers, and of
variables where they depart from their layers'). The Keras adapter (engines/live.py) produces one
from a live model; tests build them from plain dicts (`LayerTree.from_dict`), so the semantics
need no TensorFlow.

Three kinds of node (`Layer.kind`), all walked into with '/':

- ``model``: a nested ``keras.Model`` (Functional, Sequential, a subclassed model, a keras_hub
  backbone or task); its children are ``model.layers``.
- ``composite``: a layer that is not a model and holds layers, the ones Keras tracks in it
  (``layer._flatten_layers(include_self=False, recursive=False)``, in that order):
  MultiHeadAttention holds query, key, value, attention_output (and a Softmax and a Dropout);
  keras_hub's TransformerEncoder holds its attention, LayerNorms and Dense layers.
- ``layer``: a layer that holds no layers.

Weights are listed on the node that created them (``_trainable_variables`` and
``_non_trainable_variables``), never on a node above it, so each counts once: most composite
layers have none of their own (MultiHeadAttention, TransformerEncoder), some do (ViT's
ViTPatchingAndEmbedding holds its class token beside its Conv2D and Embedding).

The unit of decision is a *unit*: a node with weights of its own, or without children. A rule that
covers a node covers its own weights and every unit inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

__all__ = ["Weight", "Layer", "LayerTree", "MODEL", "COMPOSITE", "LAYER"]

MODEL, COMPOSITE, LAYER = "model", "composite", "layer"


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
    # The variable's own `trainable` flag where it is not what its layers' flags give it (LoRA
    # turns its kernel's off; a user may set one by hand); None where it follows them, which is
    # all a saved file can say. Keras trains a variable when the model and its flag are on.
    flag: Optional[bool] = None
    # The flag is off by the model's choice, not surgery's, while its own layer's is on (LoRA's
    # merged kernel, a flag set by hand): a rule that unfreezes the layer leaves it off.
    held: bool = False
    # Keras's `variable.path`, for people: inside a nested model it leaves out the model's name
    # that surgery's paths keep. "" where unknown (a saved file does not store it).
    path: str = field(default="", compare=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def follows_layer(self) -> bool:
        """Whether the weight trains exactly when its layer does (surgery decides it)."""
        return self.trainable and not self.held


@dataclass(frozen=True)
class Layer:
    """A layer at one place in the model. ``index`` is its position in its parent's layers;
    ``path`` joins the names from the top with '/' (Keras forbids '/' in layer names)."""

    name: str
    path: str
    cls: str
    index: int
    trainable: bool
    weights: tuple[Weight, ...] = ()
    children: tuple["Layer", ...] = ()
    container: bool = False  # a nested model (kind "model"), not a composite layer
    # The few config values that decide where a layer's output axis is (EinsumDense's equation
    # and bias_axes), as (key, value) pairs so the dataclass stays hashable.
    details: tuple[tuple[str, str], ...] = ()
    # A BatchNormalization layer that normalizes with its moving statistics even while it trains
    # (the 'batchnorm affine' policy: surgery's AffineBatchNormalization class). ``cls`` still
    # says BatchNormalization, so selectors and fingerprints do not depend on the policy.
    affine: bool = False
    # The saved form does not hold this layer's config: Keras builds it again from its parent's
    # constructor arguments when it loads the file (every layer inside a keras_hub model, the
    # sublayers of MultiHeadAttention), so its flags come back as the constructor sets them.
    rebuilt: bool = False

    @property
    def kind(self) -> str:
        if self.container:
            return MODEL
        return COMPOSITE if self.children else LAYER

    @property
    def unit(self) -> bool:
        """Whether rules decide this node's own weights (it has some, or it holds no layers)."""
        return bool(self.weights) or not self.children

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
        self._chain: dict[str, bool] = {}
        self._by_path: dict[str, Layer] = {}
        self._walk(root, None, True)

    def _walk(self, node: Layer, parent: Optional[Layer], parent_trainable: bool) -> None:
        # Iterative would be safer for absurd depths, but nesting depth is that of Keras models
        # (a handful); breadth (thousands of layers) is a loop, not recursion.
        chain = parent_trainable and node.trainable
        if parent is not None:
            self._nodes.append(node)
        self._parent[node.path] = parent
        self._chain[node.path] = chain
        self._by_path[node.path] = node
        for child in node.children:
            self._walk(child, node, chain)

    # --- queries -----------------------------------------------------------------------------

    def layers(self) -> list[Layer]:
        """Every layer below the root, in pre-order (a layer before what it holds)."""
        return list(self._nodes)

    def leaves(self) -> Iterator[Layer]:
        return (n for n in self._nodes if not n.children)

    def units(self) -> Iterator[Layer]:
        """Every node whose own weights rules decide (`Layer.unit`), in pre-order."""
        return (n for n in self._nodes if n.unit)

    def get(self, path: str) -> Layer:
        return self._by_path[path]

    def parent(self, layer: Layer) -> Optional[Layer]:
        return self._parent[layer.path]

    def trains(self, layer: Layer, weight: Weight) -> bool:
        """Whether ``weight`` of ``layer`` trains now: Keras trains a variable when the model is
        trainable and the variable's own flag is on; that flag follows the layers' flags (set
        from the top down, as Keras's setter and a load set them) unless it departs."""
        if weight.flag is not None:
            return self.root.trainable and weight.flag
        return weight.trainable and self._chain[layer.path]

    def effectively_trainable(self, layer: Layer) -> bool:
        """Whether the layer trains: every layer above it and itself trainable, as Keras sets
        variables when flags are written from the top down; where its variables' own flags
        depart from that (LoRA, flags set by hand), whether any of them trains."""
        if any(w.flag is not None for w in layer.weights):
            return any(self.trains(layer, w) for w in layer.weights)
        return self._chain[layer.path]

    # --- construction for tests and tools ----------------------------------------------------

    @classmethod
    def from_dict(cls, description: dict) -> "LayerTree":
        """Build from plain data::

            {"name": "model", "layers": ["input_1", "conv1:Conv2D",
                                         {"name": "base", "class": "Functional", "layers": [...]},
                                         {"name": "mha", "class": "MultiHeadAttention",
                                          "kind": "composite", "layers": [...]},
                                         {"name": "fc", "class": "Dense", "trainable": false,
                                          "weights": [["kernel", [4, 2]], ["bias", [2]]]},
                                         {"name": "bn", "class": "BatchNormalization",
                                          "affine": true}]}

        A string is ``name`` or ``name:Class``; a layer without ``weights`` gets one weight of
        size 1 unless its class is an InputLayer or it holds layers, so parameter totals stay
        meaningful. A dict with ``layers`` is a nested model unless ``"kind": "composite"``. A
        weight is ``[name, shape]``, ``[name, shape, trainable]`` or ``[name, shape, trainable,
        {"flag": bool, "held": bool}]`` (a variable's own flag, as engines/live.py reads it).
        """
        return cls(_layer_from_dict(description, "", 0, is_root=True))


# Default weights for test descriptions: small, but with the layouts Keras uses, so parts
# (filters, units) resolve on them as on real layers.
_SHAPES = {
    "Conv2D": {"kernel": (3, 3, 3, 8), "bias": (8,)},
    "Dense": {"kernel": (8, 4), "bias": (4,)},
    "EinsumDense": {"kernel": (8, 2, 4), "bias": (2, 4)},
    "BatchNormalization": {"gamma": (8,), "beta": (8,), "moving_mean": (8,),
                           "moving_variance": (8,)},
    "LayerNormalization": {"gamma": (8,), "beta": (8,)},
}
_WEIGHTLESS = ("InputLayer", "Dropout", "Softmax")


def _weight_from_list(w) -> Weight:
    extra = w[3] if len(w) > 3 else {}
    return Weight(w[0], tuple(w[1]), bool(w[2]) if len(w) > 2 else True,
                  flag=extra.get("flag"), held=bool(extra.get("held", False)))


def _layer_from_dict(d, parent_path: str, index: int, is_root: bool = False) -> Layer:
    if isinstance(d, str):
        name, _, klass = d.partition(":")
        d = {"name": name, "class": klass or "Layer"}
    name = d["name"]
    path = "" if is_root else (f"{parent_path}/{name}" if parent_path else name)
    children = tuple(_layer_from_dict(c, path, i) for i, c in enumerate(d.get("layers", ())))
    composite = d.get("kind") == COMPOSITE
    klass = d.get("class") or ("Functional" if "layers" in d else "Layer")
    if "weights" in d:
        weights = tuple(_weight_from_list(w) for w in d["weights"])
    elif klass in _SHAPES:
        weights = tuple(Weight(n, shape, n not in ("moving_mean", "moving_variance"))
                        for n, shape in _SHAPES[klass].items())
    elif children or klass in _WEIGHTLESS or "layers" in d:
        weights = ()
    else:
        weights = (Weight("w", (1,)),)
    details = ()
    if klass == "EinsumDense" and "weights" not in d:
        details = (("bias_axes", "de"), ("equation", "abc,cde->abde"))
    return Layer(name=name, path=path, cls=klass, index=index,
                 trainable=bool(d.get("trainable", True)), weights=weights, children=children,
                 container="layers" in d and not composite, details=details,
                 affine=bool(d.get("affine", False)), rebuilt=bool(d.get("rebuilt", False)))
