"""config.json -> a tree of `Node`s: the layers as Keras will load them, and what is refused.

Keras 3's config nests layer configs: a ``Functional`` or ``Sequential`` model holds
``config["layers"]`` in ``model.layers`` order. A Functional model's ``.layers`` includes its
InputLayers; a Sequential's excludes the InputLayer its config starts with. Non-layer operations
of a functional graph (``keras.ops`` calls, module ``keras.src.ops.*``) are not layers at all.
Loading restores every layer's own flag from its config without recursing: a Functional model's
from its config, a Sequential model's not at all (True), an InputLayer has none (True).

Whatever this engine cannot be sure of without Keras raises `ArchiveUnsupported` with a one-line
reason: a subclassed or custom class, a Lambda (code), a custom object anywhere in the config
(but surgery's own two, engines/frozen_format.py), layers shared between models, a legacy
config, compile state when writing. Each `Node` keeps the very dicts of the parsed config, so
engines/archive/rewrite.py changes them in place and the whole config is dumped again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from ...errors import ArchiveUnsupported
from ..frozen_format import FROZEN_REGISTERED, is_affine_entry
from .keras_layout import CONFIG, GroupNames, join

__all__ = ["Node", "structure", "COMPILED", "MAX_MODEL_DEPTH"]

# Models nested deeper than this are refused: no real model comes near it, and every stage
# after this one (the tree, resolution, the plan) recurses once per level.
MAX_MODEL_DEPTH = 64

COMPILED = ("the model was saved compiled (optimizer and compile state), which Keras drops when "
            "it loads with compile=False")


@dataclass
class Node:
    """A layer as config.json describes it, with where its variables are in the weights file."""

    name: str
    path: str  # the names from the top joined by '/' ("" for the root)
    cls: str
    index: int  # position in the parent's .layers
    kind: str  # "functional" | "sequential" (models, the root included) | "input" | "leaf"
    conf: dict  # the dict holding "name" and "trainable" (the entry's "config")
    h5: str  # the group of this layer in model.weights.h5 ("" for the root)
    module: str = ""
    children: list["Node"] = field(default_factory=list)
    compiled: bool = False  # the root of a model saved compiled: its weights file has optimizer/
    entry: dict = field(default_factory=dict)  # the whole layer entry: class, module, config
    affine: bool = False  # surgery's AffineBatchNormalization (engines/batchnorm.py)

    @property
    def container(self) -> bool:
        return self.kind in ("functional", "sequential")

    @property
    def where(self) -> str:
        return self.path or self.name

    def walk(self) -> Iterator["Node"]:
        """Every node below this one, pre-order (LayerTree.layers() order)."""
        for child in self.children:
            yield child
            yield from child.walk()

    def loaded_flag(self) -> bool:
        """The layer's ``trainable`` after keras.models.load_model."""
        if self.kind in ("input", "sequential"):
            # InputLayer keeps no flag; Sequential.from_config does not pass its flag on.
            return True
        value = self.conf.get("trainable", True)
        if not isinstance(value, bool):
            raise ArchiveUnsupported(f"layer {self.where!r} has trainable={value!r}")
        return value


_FUNCTIONAL_MODULES = ("keras.src.models.functional", "keras.models", "keras")
_SEQUENTIAL_MODULES = ("keras", "keras.models", "keras.src.models.sequential")
# Layers whose state or code lives outside what config.json and the weights table describe.
_REFUSED = {
    "Lambda": "a Lambda layer holds Python code: Keras safe mode decides whether it loads",
    "TFSMLayer": "a TFSMLayer wraps a SavedModel",
    "TorchModuleWrapper": "a TorchModuleWrapper wraps a torch module",
    "JaxLayer": "a JaxLayer wraps JAX functions",
    "FlaxLayer": "a FlaxLayer wraps a Flax module",
}


def structure(cfg: dict, *, compiled_ok: bool = False) -> Node:
    """The model config.json describes, as Nodes; ``compiled_ok`` takes a model saved compiled
    (for commands that only read)."""
    kind = _model_kind(cfg)
    cls = cfg.get("class_name")
    if kind is None:
        raise ArchiveUnsupported(
            f"the model is a {cls!s} (module {cfg.get('module')!s}), not a Functional or "
            "Sequential model: config.json does not describe its layers")
    if cfg.get("compile_config") and not compiled_ok:
        raise ArchiveUnsupported(COMPILED)
    conf = cfg.get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("name"), str):
        raise ArchiveUnsupported(f"{CONFIG} has no model name")
    root = Node(name=conf["name"], path="", cls=cls, index=0, kind=kind, conf=conf, h5="",
                compiled=bool(cfg.get("compile_config")), module=cfg.get("module") or "")
    _children(root, conf, kind, depth=1)
    foreign = _foreign_object(conf)
    if foreign:
        raise ArchiveUnsupported(f"the config uses {foreign}, which only Keras can resolve")
    return root


def _model_kind(entry: dict) -> Optional[str]:
    cls = entry.get("class_name")
    module = entry.get("module")
    if cls == "Functional" and module in _FUNCTIONAL_MODULES:
        return "functional"
    if cls == "Sequential" and module in _SEQUENTIAL_MODULES:
        return "sequential"
    return None


def _foreign_object(value) -> Optional[str]:
    """The first serialized object from outside Keras (a custom initializer, constraint,
    activation...) but surgery's own: loading such a file depends on what is registered, which
    only a Keras load can tell. Iterative: the config's depth is the file's to choose."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module = item.get("module")
            if isinstance(module, str) and not (module == "keras" or module.startswith("keras.")):
                if is_affine_entry(item):
                    stack.append(item.get("config"))
                    continue
                if item.get("registered_name") != FROZEN_REGISTERED:
                    return (f"{item.get('class_name')} (module {module}, registered as "
                            f"{item.get('registered_name')!r})")
                config = item.get("config")
                stack.append(config.get("inner") if isinstance(config, dict) else None)
                continue
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))
    return None


def _children(node: Node, conf: dict, kind: str, depth: int) -> None:
    if depth > MAX_MODEL_DEPTH:
        raise ArchiveUnsupported(f"the model nests models more than {MAX_MODEL_DEPTH} deep "
                                 f"(at {node.where!r})")
    layers = conf.get("layers")
    if not isinstance(layers, list):
        raise ArchiveUnsupported(f"the model {node.name!r} has no layer list in {CONFIG}")
    groups = GroupNames()
    names: set[str] = set()
    position = 0
    for i, lc in enumerate(layers):
        if not isinstance(lc, dict) or not isinstance(lc.get("config"), dict):
            raise ArchiveUnsupported(f"an entry of {node.name!r}'s layers is not a layer config")
        if "module" not in lc:
            raise ArchiveUnsupported("the config is in a legacy format (no 'module' keys)")
        cls = lc.get("class_name")
        module = lc.get("module") or ""
        lconf = lc["config"]
        name = lconf.get("name", lc.get("name"))
        if not isinstance(cls, str) or not isinstance(name, str) or not isinstance(module, str):
            raise ArchiveUnsupported(f"a layer of {node.name!r} has no class or name")
        if module.startswith("keras.src.ops."):
            continue  # a keras.ops call in a functional graph: an operation, not a layer
        if cls == "InputLayer" and module == "keras.layers":
            child_kind = "input"
            if kind == "sequential":
                if i != 0:
                    raise ArchiveUnsupported(f"{node.name!r} has an InputLayer after its first "
                                             "layer")
                continue  # Sequential.layers leaves out its InputLayer
        else:
            child_kind = _model_kind(lc) or _leaf(lc, cls, module, name)
        if name in names:
            raise ArchiveUnsupported(f"the model {node.name!r} has two layers named {name!r}")
        names.add(name)
        child = Node(name=name, path=join(node.path, name), cls=cls, index=position,
                     kind=child_kind, conf=lconf, h5=join(join(node.h5, "layers"),
                                                          groups.next(cls)),
                     module=module, entry=lc, affine=is_affine_entry(lc))
        position += 1
        node.children.append(child)
        if child.container:
            _children(child, lconf, child_kind, depth + 1)


def _leaf(entry: dict, cls: str, module: str, name: str) -> str:
    """"leaf" for a layer of Keras's own this engine can describe; else why not."""
    if cls in _REFUSED:
        raise ArchiveUnsupported(f"layer {name!r}: {_REFUSED[cls]}")
    if "shared_object_id" in entry:
        raise ArchiveUnsupported(f"layer {name!r} is shared between models")
    if is_affine_entry(entry):
        return "leaf"  # a BatchNormalization in all but its call (engines/batchnorm.py)
    if not (module == "keras.layers" or module.startswith("keras.src.")) or \
            module.startswith("keras.src.models"):
        registered = entry.get("registered_name")
        raise ArchiveUnsupported(
            f"layer {name!r} is of class {cls} (module {module or '?'}"
            f"{', registered as ' + repr(registered) if registered else ''}), which "
            "surgery does not know without Keras")
    return "leaf"
