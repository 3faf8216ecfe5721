"""The archive edge: a `.keras` file <-> LayerTree and flags, without Keras or TensorFlow.

A `.keras` file is a zip of ``metadata.json``, ``config.json`` (the architecture, every layer's
``trainable`` flag) and ``model.weights.h5``. Freezing whole layers changes only the ``trainable``
fields of ``config.json``, so this engine reads the layer tree from the archive, and writes the
decided flags back into ``config.json`` while every other entry is copied byte for byte (the
weights are streamed, never held in memory). Loading and saving through Keras, which the live
engine (engines/live.py) pays, costs seconds and gigabytes; this costs a file copy.

It must describe a model exactly as `engines.live.describe` describes the same model loaded by
``keras.models.load_model``: resolution, planning and the manifest are shared, so the two engines
must feed them equal `LayerTree`s. What it knows of Keras 3's format (checked by
tests/test_archive.py against the live engine on keras.applications architectures):

- ``config.json`` nests layer configs: a ``Functional`` or ``Sequential`` model holds
  ``config["layers"]`` in ``model.layers`` order. A Functional model's ``.layers`` includes its
  InputLayers; a Sequential's excludes the InputLayer its config starts with. Non-layer operations
  of a functional graph (``keras.ops`` calls, module ``keras.src.ops.*``) are not layers at all.
- ``model.weights.h5`` stores each layer's variables under ``<path>/vars/0, 1, ...`` (no variable
  names), where ``<path>`` is ``layers/<snake_case(class)>[_n]`` at each level of nesting, the
  counter running over the container's ``.layers`` by class, and the ``vars`` group carries the
  layer's name as an attribute. Variables are stored in ``layer.weights`` order (trainable ones,
  then the others), so names come from a per-class table (`_weight_names`).
- Loading restores every layer's own flag from its config, without recursing: a Functional
  model's flag comes from its config, a Sequential model's flag is not read at all (it comes back
  True), an InputLayer has none (True).
- A variable created without a name (ConvNeXt's LayerScale) is named by a per-process counter
  (``variable``, ``variable_1``, ...) in the order the layers are deserialized: this engine gives
  the names a fresh process loading the file gives.

- Entries frozen inside a layer (sub-layer freezing, engines/constraint.py) are a FrozenEntries
  constraint in the layer's config, values included: describing them needs only the config, and
  so does removing them (the constraint it wraps comes back). Freezing new entries stores their
  values, read from the weights file (`_H5.dataset`: the pure reader reads the contiguous float
  datasets h5py writes) and encoded as the constraint's get_config does.
- surgery's AffineBatchNormalization (the 'batchnorm affine' policy) is saved as a
  BatchNormalization entry with surgery's module and registered name: same config, same weights
  groups. Switching a layer to it and back rewrites those two fields (`_AFFINE_ENTRY`).
- A model saved compiled has ``compile_config`` in config.json and an ``optimizer`` group in the
  weights file, beside the layers. `describe(path, compiled=True)` reads it (for commands that
  only read); `write` does not, since ``load_model(compile=False)`` drops that state and a Keras
  save afterwards leaves it out, which copying the weights entry cannot do.

Whatever it is not sure of raises `ArchiveUnsupported` with a one-line reason, and the caller falls
back to the live engine: not a zip with ``config.json``, a subclassed or custom class, a Lambda,
a custom object anywhere in the config, a layer whose weights are nested or cannot be named,
layers shared between models, compile state (when writing), quantized or LoRA layers, weights
stored in a form neither reader reads.

Importing this module imports no TensorFlow, Keras, NumPy or h5py: ``model.weights.h5`` is read
by a small reader of the HDF5 metadata h5py writes (superblock 0/1, symbol-table groups, version-1
object headers), with h5py, imported lazily, as the fallback for any other HDF5 layout.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import queue
import re
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from ..digest import InputChanged, _read_into, changed, sha256_file
from ..parts import PartError, index_runs, select
from ..tree import Layer, LayerTree, Weight

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import Plan

__all__ = ["ArchiveUnsupported", "DamagedArchive", "Written", "Opened", "describe", "write",
           "is_archive"]

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"


class ArchiveUnsupported(Exception):
    """This archive cannot be handled without Keras; ``str(exc)`` is a one-line reason."""


class DamagedArchive(Exception):
    """An entry of the archive fails its CRC-32 check: Keras would refuse the file too, and a
    copy would carry the damage into the output. ``str(exc)`` does not name the file."""


class Written(NamedTuple):
    """What `write` produced: the sha256 of the output file and of the source file, both
    computed while copying, so the manifest needs no second read of either."""

    sha256: str
    source_sha256: str


# --- public interface ----------------------------------------------------------------------------


def is_archive(path: str) -> bool:
    """A cheap test for a zip file with a config.json, for choosing an engine."""
    try:
        with zipfile.ZipFile(path) as zf:
            return CONFIG in zf.NameToInfo
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def describe(path: str, *, compiled: bool = False) -> LayerTree:
    """The model in a `.keras` archive as a LayerTree, equal to
    ``engines.live.describe(keras.models.load_model(path, compile=False))[0]``.

    ``compiled=True`` also reads an archive saved from a compiled model (every checkpoint
    `ModelCheckpoint` writes): its compile settings and optimizer variables are beside the
    layers and change none of them, so commands that only read (show, plan, verify, lint) can
    take it. `write` cannot: Keras drops that state when it loads with compile=False, and the
    output of both engines must be the same, so `apply` loads such a file through Keras."""
    with Opened(path, compiled=compiled) as opened:
        return opened.tree


def write(src: str, plan: "Plan", dst: str) -> Written:
    """Copy the archive ``src`` to ``dst`` in ``plan``'s state: `Opened.write`."""
    with Opened(src) as opened:
        return opened.write(plan, dst)


class Opened:
    """A `.keras` archive read once: ``tree`` (what `describe` gives) and ``name`` (the model's),
    then `write` from the same parsed config, so `apply` reads and checks the archive once.
    Use it as a context manager (or `close` it)."""

    def __init__(self, path: str, *, compiled: bool = False):
        self._archive = _Archive(path)
        try:
            self._cfg = self._archive.config()
            self._root = _structure(self._cfg, compiled_ok=compiled)
            self.tree = _read_tree(self._archive, self._root)
        except BaseException:
            self._archive.close()
            raise
        self.name = self._root.name
        self._prepared: Optional["Plan"] = None

    def unsupported(self, plan: "Plan") -> Optional[str]:
        """Why `write` would refuse ``plan`` (raising ArchiveUnsupported), or None. It reads what
        the plan needs (the values of the entries it newly freezes inside layers) and keeps it
        for `write`, so a refusal comes before any output exists."""
        try:
            self._prepare(plan)
        except ArchiveUnsupported as exc:
            return str(exc)
        return None

    def _prepare(self, plan: "Plan") -> None:
        if self._prepared is plan:
            return
        if self._prepared is not None:
            raise RuntimeError("an Opened archive is written for one plan")
        if self._root.compiled:
            raise ArchiveUnsupported(_COMPILED)
        _check_plan(self._root, plan)
        values = _Values(self._archive)
        try:
            _set_flags(self._root, plan, values)
        finally:
            values.close()
        self._prepared = plan

    def write(self, plan: "Plan", dst: str) -> Written:
        """Write the archive to ``dst`` in ``plan``'s state: every layer's ``trainable`` flag, its
        class (affine or not), the entries frozen inside it.

        ``config.json`` is rewritten (same JSON layout as Keras writes, only those values
        changed); every other entry is copied as stored (same bytes,
        compression, timestamp), in the original order; the weights are streamed in chunks. The
        output depends only on the input bytes and the plan, so it is byte-reproducible. ``dst``
        is written in place (the caller passes a temporary path and renames it). For one plan:
        its state is set in the parsed config."""
        self._prepare(plan)
        config_bytes = json.dumps(self._cfg).encode("utf-8")
        return _copy_zip(self._archive, dst, {CONFIG: config_bytes})

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(path: str, *, use_h5py: bool = False) -> LayerTree:
    """`describe` with h5py as the reader of the weights file, if ``use_h5py`` (for tests)."""
    with _Archive(path) as archive:
        return _read_tree(archive, _structure(archive.config()), use_h5py=use_h5py)


def _read_tree(archive: "_Archive", root: "_Node", *, use_h5py: bool = False) -> LayerTree:
    reader: Optional[_H5] = None
    try:
        if not use_h5py:
            try:
                reader = archive.weights_reader()
                return LayerTree(_describe_tree(root, reader))
            except _H5Format:
                pass  # a layout the small reader does not read: h5py reads it
        reader = archive.weights_reader(use_h5py=True)
        return LayerTree(_describe_tree(root, reader))
    except ArchiveUnsupported:
        raise
    except Exception as exc:  # h5py's errors on a damaged file are many types
        raise ArchiveUnsupported(f"{WEIGHTS} is unreadable: {_first_line(exc)}") from None
    finally:
        if reader is not None:
            reader.close()


# --- the archive ---------------------------------------------------------------------------------


class _Archive:
    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self.file = open(self.path, "rb")
        except OSError as exc:
            raise ArchiveUnsupported(f"cannot open: {exc.strerror or exc}") from None
        # Whatever is read from here on (config, weights, values, the copy) must come from this
        # version of the file: `_copy_zip` checks at the end that it was not written meanwhile.
        self.stat = os.fstat(self.file.fileno())
        try:
            self.zip = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError):
            self.file.close()
            raise ArchiveUnsupported("not a zip archive (a .keras file is one)") from None
        names = self.zip.NameToInfo
        if CONFIG not in names:
            self.close()
            raise ArchiveUnsupported(f"the archive has no {CONFIG}")
        if WEIGHTS not in names:
            self.close()
            others = [n for n in names if n.startswith("model.weights")]
            detail = f" (it has {others[0]})" if others else ""
            raise ArchiveUnsupported(f"the archive has no {WEIGHTS}{detail}")
        for info in self.zip.infolist():
            if info.flag_bits & 0x1:
                self.close()
                raise ArchiveUnsupported(f"the entry {info.filename} is encrypted")

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        self.file.close()

    def config(self) -> dict:
        try:
            data = self.zip.read(CONFIG)
            cfg = json.loads(data)
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise ArchiveUnsupported(f"{CONFIG} is unreadable: {_first_line(exc)}") from None
        if not isinstance(cfg, dict):
            raise ArchiveUnsupported(f"{CONFIG} does not hold a model config")
        return cfg

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where the (compressed) bytes of an entry start in the file."""
        header = os.pread(self.file.fileno(), 30, info.header_offset)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ArchiveUnsupported(f"bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def weights_reader(self, *, use_h5py: bool = False) -> "_H5":
        info = self.zip.getinfo(WEIGHTS)
        if info.compress_type == zipfile.ZIP_STORED:
            start = self.data_offset(info)
            fd = self.file.fileno()
            size = info.file_size

            def read(offset: int, n: int) -> bytes:
                if offset < 0 or offset + n > size:
                    raise _H5Format("read outside the weights file")
                return os.pread(fd, n, start + offset)

            opener = lambda: _Window(fd, start, size)  # noqa: E731
        else:  # Keras stores entries; a recompressed archive is read through zipfile
            def opener():
                return self.zip.open(WEIGHTS)

            read = None
        if read is not None and not use_h5py:
            return _PureH5(read)
        return _H5pyReader(opener)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# --- config.json -> structure --------------------------------------------------------------------


@dataclass
class _Node:
    """A layer as config.json describes it, with where its variables are in the weights file."""

    name: str
    path: str
    cls: str
    index: int
    kind: str  # "functional" | "sequential" (models, the root included) | "input" | "leaf"
    conf: dict  # the dict holding "name" and "trainable"
    h5: str  # the group of this layer in model.weights.h5 ("" for the root)
    module: str = ""
    children: list["_Node"] = field(default_factory=list)
    compiled: bool = False  # the root of a model saved compiled: its weights file has optimizer/
    entry: dict = field(default_factory=dict)  # the whole layer entry: class, module, config
    affine: bool = False  # surgery's AffineBatchNormalization (engines/batchnorm.py)

    @property
    def container(self) -> bool:
        return self.kind in ("functional", "sequential")

    def walk(self):
        """Every node below this one, pre-order (LayerTree.layers() order)."""
        for child in self.children:
            yield child
            yield from child.walk()


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


def _model_kind(layer_config: dict) -> Optional[str]:
    cls = layer_config.get("class_name")
    module = layer_config.get("module")
    if cls == "Functional" and module in _FUNCTIONAL_MODULES:
        return "functional"
    if cls == "Sequential" and module in _SEQUENTIAL_MODULES:
        return "sequential"
    return None


_COMPILED = ("the model was saved compiled (optimizer and compile state), which Keras drops when "
             "it loads with compile=False")


def _structure(cfg: dict, *, compiled_ok: bool = False) -> _Node:
    kind = _model_kind(cfg)
    cls = cfg.get("class_name")
    if kind is None:
        raise ArchiveUnsupported(
            f"the model is a {cls!s} (module {cfg.get('module')!s}), not a Functional or "
            "Sequential model: config.json does not describe its layers")
    if cfg.get("compile_config") and not compiled_ok:
        raise ArchiveUnsupported(_COMPILED)
    conf = cfg.get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("name"), str):
        raise ArchiveUnsupported(f"{CONFIG} has no model name")
    root = _Node(name=conf["name"], path="", cls=cls, index=0, kind=kind, conf=conf, h5="",
                 compiled=bool(cfg.get("compile_config")),
                 module=cfg.get("module") or "")
    _children(root, conf, kind)
    foreign = _foreign_object(conf)
    if foreign:
        raise ArchiveUnsupported(f"the config uses {foreign}, which only Keras can resolve")
    return root


def _foreign_object(value) -> Optional[str]:
    """The first serialized object from outside Keras (a custom initializer, constraint,
    activation...) but surgery's own FrozenEntries: loading such a file depends on what is
    registered, which only a Keras load can tell."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module = item.get("module")
            if isinstance(module, str) and not (module == "keras" or module.startswith("keras.")):
                if _is_affine(item):
                    stack.append(item.get("config"))
                    continue
                if item.get("registered_name") != _FROZEN_ENTRIES:
                    return (f"{item.get('class_name')} (module {module}, registered as "
                            f"{item.get('registered_name')!r})")
                stack.append(item.get("config", {}).get("inner") if isinstance(
                    item.get("config"), dict) else None)
                continue
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))
    return None


def _children(node: _Node, conf: dict, kind: str) -> None:
    layers = conf.get("layers")
    if not isinstance(layers, list):
        raise ArchiveUnsupported(f"the model {node.name!r} has no layer list in {CONFIG}")
    used_h5: dict[str, int] = {}
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
        if not isinstance(cls, str) or not isinstance(name, str):
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
            child_kind = _model_kind(lc)
            if child_kind is None:
                if cls in _REFUSED:
                    raise ArchiveUnsupported(f"layer {name!r}: {_REFUSED[cls]}")
                if "shared_object_id" in lc:
                    raise ArchiveUnsupported(f"layer {name!r} is shared between models")
                if _is_affine(lc):
                    pass  # a BatchNormalization in all but its call: see _AFFINE_MODULE
                elif not (module == "keras.layers" or module.startswith("keras.src.")) or \
                        module.startswith("keras.src.models"):
                    registered = lc.get("registered_name")
                    raise ArchiveUnsupported(
                        f"layer {name!r} is of class {cls} (module {module or '?'}"
                        f"{', registered as ' + repr(registered) if registered else ''}), which "
                        "surgery does not know without Keras")
                child_kind = "leaf"
        if name in names:
            raise ArchiveUnsupported(f"the model {node.name!r} has two layers named {name!r}")
        names.add(name)
        snake = _snake_case(cls)
        if snake in used_h5:
            used_h5[snake] += 1
            h5_name = f"{snake}_{used_h5[snake]}"
        else:
            used_h5[snake] = 0
            h5_name = snake
        path = f"{node.path}/{name}" if node.path else name
        h5 = _join(_join(node.h5, "layers"), h5_name)
        child = _Node(name=name, path=path, cls=cls, index=position, kind=child_kind,
                      conf=lconf, h5=h5, module=module, entry=lc, affine=_is_affine(lc))
        position += 1
        node.children.append(child)
        if child_kind in ("functional", "sequential"):
            _children(child, lconf, child_kind)


def _snake_case(name: str) -> str:
    # keras.src.utils.naming.to_snake_case, which names the weights file's groups.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()
    return name


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _loaded_flag(node: _Node) -> bool:
    """The layer's ``trainable`` after keras.models.load_model."""
    if node.kind in ("input", "sequential"):
        # InputLayer keeps no flag; Sequential.from_config does not pass its flag on.
        return True
    value = node.conf.get("trainable", True)
    if not isinstance(value, bool):
        raise ArchiveUnsupported(f"layer {node.path or node.name!r} has trainable={value!r}")
    return value


# --- structure + weights -> LayerTree ------------------------------------------------------------


def _describe_tree(root: _Node, reader: "_H5") -> Layer:
    if isinstance(reader, _PureH5):
        try:
            return _describe_tree_with(root, reader)
        except (struct.error, IndexError, KeyError, ValueError, RecursionError) as exc:
            # Malformed or unexpected metadata (UnicodeDecodeError is a ValueError).
            raise _H5Format(_first_line(exc)) from None
    return _describe_tree_with(root, reader)


def _describe_tree_with(root: _Node, reader: "_H5") -> Layer:
    top = reader.children("")
    known = {"layers", "vars", "optimizer"} if root.compiled else {"layers", "vars"}
    if top is None or not set(top) <= known:
        extra = sorted(set(top or ()) - known)
        raise ArchiveUnsupported(f"{WEIGHTS} holds state beyond the layers ({', '.join(extra)})")
    auto = _AutoNames()
    return _layer(root, reader, auto)


def _layer(node: _Node, reader: "_H5", auto: "_AutoNames") -> Layer:
    where = node.path or node.name
    if node.container:
        _check_container_group(node, reader)
        children = tuple(_layer(c, reader, auto) for c in node.children)
        weights: tuple[Weight, ...] = ()
    else:
        children = ()
        shapes = _layer_vars(node, reader)
        named = _weight_names(node, len(shapes), auto)
        if named is None:
            raise ArchiveUnsupported(
                f"layer {where!r} ({node.cls}) has {len(shapes)} weight"
                f"{'s' if len(shapes) != 1 else ''} surgery cannot name without Keras")
        frozen = _frozen_entries(node, dict(zip((n for n, _ in named), shapes)))
        weights = tuple(Weight(n, s, t, frozen=frozen[n][0], frozen_entries=frozen[n][1])
                        if n in frozen else Weight(n, s, t)
                        for (n, t), s in zip(named, shapes))
    return Layer(name=node.name, path=node.path, cls=node.cls, index=node.index,
                 trainable=_loaded_flag(node), weights=weights, children=children,
                 container=node.container, details=_details(node), affine=node.affine)


def _details(node: _Node) -> tuple[tuple[str, str], ...]:
    # As engines.live._details: what decides EinsumDense's output axis (surgery/parts.py).
    if node.cls != "EinsumDense" or node.container:
        return ()
    return tuple((k, str(node.conf.get(k))) for k in ("equation", "bias_axes")
                 if node.conf.get(k) is not None)


# Entries frozen inside a weight (surgery/engines/constraint.py, sub-layer freezing) travel in the
# layer config as a FrozenEntries constraint on the attribute Keras passes to that weight.
_FROZEN_ENTRIES = "surgery>FrozenEntries"

# The 'batchnorm affine' policy's class (engines/batchnorm.py), as Keras saves it: the class name
# stays BatchNormalization (its weights-file groups and config are BatchNormalization's), the
# module and registered name are surgery's. Switching a layer to it and back changes only these
# two fields of the layer's entry (tests/test_archive.py compares with a Keras save).
_AFFINE_ENTRY = ("surgery.engines.batchnorm", "surgery>AffineBatchNormalization")
_BATCHNORM_ENTRY = ("keras.layers", None)


def _is_affine(entry: dict) -> bool:
    return entry.get("class_name") == "BatchNormalization" and \
        (entry.get("module"), entry.get("registered_name")) == _AFFINE_ENTRY

_CONSTRAINT_OF = {"kernel_constraint": "kernel", "bias_constraint": "bias",
                  "gamma_constraint": "gamma", "beta_constraint": "beta",
                  "pointwise_constraint": "pointwise_kernel",
                  "embeddings_constraint": "embeddings"}


def _constrained_weight(cls: str, attr: str) -> Optional[str]:
    if attr == "depthwise_constraint":
        return "depthwise_kernel" if cls.startswith("SeparableConv") else "kernel"
    return _CONSTRAINT_OF.get(attr)


def _frozen_constraints(node: _Node) -> dict[str, tuple[str, dict]]:
    """weight -> (config attribute, FrozenEntries config) for the weights with frozen entries."""
    out = {}
    for attr, value in node.conf.items():
        if isinstance(value, dict) and value.get("registered_name") == _FROZEN_ENTRIES:
            weight = _constrained_weight(node.cls, attr)
            if weight is None or not isinstance(value.get("config"), dict):
                raise ArchiveUnsupported(f"layer {node.path!r} has frozen entries on {attr}, "
                                         "which surgery cannot place without Keras")
            out[weight] = (attr, value["config"])
    return out


def _frozen_entries(node: _Node, shapes: dict[str, tuple[int, ...]]
                    ) -> dict[str, tuple[tuple[int, ...], int]]:
    """weight -> (frozen positions, frozen scalars), as Weight.frozen / frozen_entries."""
    out = {}
    for weight, (attr, fc) in _frozen_constraints(node).items():
        try:
            shape = tuple(int(d) for d in fc["shape"])
            axes = tuple(int(a) for a in fc["axes"])
            indices = tuple(sorted(i for start, stop in fc["indices"]
                                   for i in range(int(start), int(stop))))
            a0, a1 = axes[0], axes[-1]
            entries = math.prod(shape[:a0]) * len(indices) * math.prod(shape[a1 + 1:])
        except (KeyError, TypeError, ValueError, IndexError):
            raise ArchiveUnsupported(f"layer {node.path!r}: unreadable frozen entries on "
                                     f"{attr}") from None
        if weight not in shapes or shapes[weight] != shape:
            raise ArchiveUnsupported(f"layer {node.path!r}: frozen entries on {attr} do not fit "
                                     f"its {weight}")
        out[weight] = (indices, entries)
    return out


def _check_container_group(node: _Node, reader: "_H5") -> None:
    where = node.path or node.name
    if node.path:  # the root's group is the file itself
        group = reader.children(node.h5)
        if group is None or not set(group) <= {"vars", "layers"}:
            raise ArchiveUnsupported(f"model {where!r} is not where Keras saves it in {WEIGHTS}")
        if reader.children(_join(node.h5, "vars")):
            raise ArchiveUnsupported(f"model {where!r} has variables of its own")
        _check_name(node, reader)
    expected = {c.h5.rsplit("/", 1)[-1] for c in node.children}
    present = reader.children(_join(node.h5, "layers")) or {}
    if set(present) != expected:
        extra = sorted(set(present) - expected)
        missing = sorted(expected - set(present))
        raise ArchiveUnsupported(
            f"the layers of {where!r} do not match {WEIGHTS}"
            + (f" (saved but not in the config: {', '.join(extra[:3])})" if extra else "")
            + (f" (not saved: {', '.join(missing[:3])}; layers shared between models?)"
               if missing else ""))


def _check_name(node: _Node, reader: "_H5") -> None:
    saved = reader.name_attr(_join(node.h5, "vars"))
    if saved is not None and saved != node.name:
        raise ArchiveUnsupported(f"{WEIGHTS} has {saved!r} where the config has {node.name!r}")


def _layer_vars(node: _Node, reader: "_H5") -> list[tuple[int, ...]]:
    where = node.path
    group = reader.children(node.h5)
    if group is None:
        raise ArchiveUnsupported(f"layer {where!r} has no entry in {WEIGHTS}; layers shared "
                                 "between models?")
    if set(group) != {"vars"}:
        # issue 13: a composite layer's sublayers (MultiHeadAttention's query, ...) are described
        # through Keras until this engine describes them too.
        raise ArchiveUnsupported(f"layer {where!r} holds sublayers or other state ({node.cls}: "
                                 f"{', '.join(sorted(set(group) - {'vars'})[:3])})")
    vars_path = _join(node.h5, "vars")
    _check_name(node, reader)
    entries = reader.children(vars_path) or {}
    n = len(entries)
    if set(entries) != {str(i) for i in range(n)} or any(k != "dataset" for k in entries.values()):
        raise ArchiveUnsupported(f"layer {where!r} ({node.cls}) stores its variables in a layout "
                                 "surgery does not know")
    return [reader.shape(f"{vars_path}/{i}") for i in range(n)]


class _AutoNames:
    """keras.src.utils.naming.uniquify for variables created without a name, as in a fresh
    process: "variable", "variable_1", ... in creation (deserialization) order."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> str:
        name = "variable" if self.count == 0 else f"variable_{self.count}"
        self.count += 1
        return name


_CONVS = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
          "DepthwiseConv1D", "DepthwiseConv2D"}


def _weight_names(node: _Node, n: int, auto: _AutoNames) -> Optional[list[tuple[str, bool]]]:
    """(name, trainable-capable) of each stored variable, in order; None if unknown.

    Only classes whose variables a config fully determines are listed; every other class with
    variables sends the model to the live engine. ``n`` is the count the weights file holds."""
    if n == 0:
        return []
    c = node.conf
    cls = node.cls
    if c.get("lora_rank") or c.get("quantization_config") or _quantized(c.get("dtype")):
        return None
    bias = [("bias", True)] if c.get("use_bias", True) else []
    names: Optional[list[tuple[str, bool]]]
    if cls in _CONVS or cls == "Dense":
        names = [("kernel", True)] + bias
    elif cls in ("SeparableConv1D", "SeparableConv2D"):
        names = [("depthwise_kernel", True), ("pointwise_kernel", True)] + bias
    elif cls == "EinsumDense":
        names = [("kernel", True)] + ([("bias", True)] if c.get("bias_axes") else [])
    elif cls == "BatchNormalization":
        if c.get("renorm"):
            return None
        names = ([("gamma", True)] if c.get("scale", True) else []) + \
                ([("beta", True)] if c.get("center", True) else []) + \
                [("moving_mean", False), ("moving_variance", False)]
    elif cls == "LayerNormalization":
        rms = c.get("rms_scaling", False)
        names = ([("gamma", True)] if c.get("scale", True) or rms else []) + \
                ([("beta", True)] if c.get("center", True) and not rms else [])
    elif cls == "GroupNormalization":
        names = ([("gamma", True)] if c.get("scale", True) else []) + \
                ([("beta", True)] if c.get("center", True) else [])
    elif cls == "Normalization":
        names = [("mean", False), ("variance", False), ("count", False)]
    elif cls == "RMSNormalization":
        names = [("scale", True)]
    elif cls == "Embedding":
        names = [("embeddings", True)]
    elif cls == "PReLU":
        names = [("alpha", True)]
    elif cls == "LayerScale" and node.module == "keras.src.applications.convnext":
        names = [(None, True)]  # type: ignore[list-item]  # named below, in creation order
    else:
        return None
    if len(names) != n:
        return None
    return [(auto.next() if name is None else name, t) for name, t in names]


def _quantized(dtype) -> bool:
    if isinstance(dtype, dict):
        if dtype.get("class_name") not in (None, "DTypePolicy", "FloatDTypePolicy"):
            return True
        dtype = (dtype.get("config") or {}).get("name")
    return isinstance(dtype, str) and dtype.split("_")[0] in ("int8", "int4", "float8", "gptq",
                                                               "awq")


# --- writing flags -------------------------------------------------------------------------------


def _check_plan(root: _Node, plan: "Plan") -> None:
    """The plan must be for this architecture: same layer paths and classes, in order."""
    ours = [(n.path, n.cls) for n in root.walk()]
    theirs = [(lp.path, lp.layer.cls) for lp in plan.layers]
    if ours != theirs:
        raise ValueError("the plan was made for another model than this archive")


def _set_flags(root: _Node, plan: "Plan", values: "_Values") -> None:
    # What model.save writes after the live engine wrote the plan (engines.live.write): each
    # layer's flag, its class (affine or not), and the entries frozen inside it, a constraint
    # per weight changed only where the planned entries differ from those it carries.
    root.conf["trainable"] = bool(plan.root_after)
    for node in root.walk():
        if node.kind == "input":
            continue  # InputLayer.get_config has no trainable key
        lp = plan.by_path[node.path]
        node.conf["trainable"] = bool(lp.after)
        if node.container:
            continue
        if lp.affine != node.affine:  # engines.batchnorm.switch: only the class entry changes
            node.entry["module"], node.entry["registered_name"] = \
                _AFFINE_ENTRY if lp.affine else _BATCHNORM_ENTRY
        wanted = {p.weight: p.indices for p in lp.frozen_parts}
        carried = {w.name: w.frozen for w in lp.layer.weights if w.frozen}
        current = _frozen_constraints(node)
        for weight in sorted(set(wanted) | set(carried)):
            indices = wanted.get(weight, ())
            if indices == carried.get(weight, ()):
                continue
            if not indices:  # set_frozen(layer, weight, ()): the layer's own constraint is back
                attr, fc = current[weight]
                node.conf[attr] = fc.get("inner")
                continue
            _freeze_entries(node, lp.layer, weight, indices, current.get(weight), values)


def _freeze_entries(node: _Node, layer: Layer, weight: str, indices: tuple[int, ...],
                    current: Optional[tuple[str, dict]], values: "_Values") -> None:
    """engines.constraint.set_frozen on the config: a FrozenEntries constraint holding the
    values of ``indices`` read from the weights file, around the layer's own constraint."""
    shapes = {w.name: w.shape for w in layer.weights}
    try:
        sel = select(node.name, node.cls, shapes, weight, indices,
                     {k: node.conf[k] for k in ("equation", "bias_axes") if k in node.conf})[0]
    except PartError as exc:
        raise ArchiveUnsupported(str(exc)) from None
    k = [w.name for w in layer.weights].index(weight)
    dtype, raw = values.get(f"{_join(node.h5, 'vars')}/{k}", node.path)
    itemsize = len(raw) // max(math.prod(sel.shape), 1)
    a0, a1 = sel.axes[0], sel.axes[-1]
    taken = _take(raw, math.prod(sel.shape[:a0]), sel.size,
                  math.prod(sel.shape[a1 + 1:]) * itemsize, sel.indices)
    if current is not None:
        inner = current[1].get("inner")
    else:
        inner = node.conf.get(sel.attr)
    node.conf[sel.attr] = {
        "module": "surgery.engines.constraint", "class_name": "FrozenEntries",
        "config": {"shape": list(sel.shape), "axes": list(sel.axes),
                   "indices": index_runs(sel.indices), "dtype": dtype,
                   # As FrozenEntries.get_config: little-endian bytes, zlib level 6, base64.
                   "values": base64.b64encode(zlib.compress(taken, 6)).decode("ascii"),
                   "inner": inner},
        "registered_name": _FROZEN_ENTRIES}


def _take(raw: bytes, outer: int, size: int, row: int, indices: tuple[int, ...]) -> bytes:
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


class _Values:
    """The weights file's datasets, read on demand by the pure reader, else by h5py."""

    def __init__(self, archive: "_Archive"):
        self._archive = archive
        self._reader: Optional[_H5] = None

    def get(self, path: str, layer: str) -> tuple[str, bytes]:
        try:
            return self._read(path)
        except ArchiveUnsupported as exc:
            raise ArchiveUnsupported(f"layer {layer!r}: {exc}") from None
        except Exception as exc:  # h5py's errors on a damaged file are many types
            raise ArchiveUnsupported(f"layer {layer!r}: cannot read its weights from {WEIGHTS}: "
                                     f"{_first_line(exc)}") from None

    def _read(self, path: str) -> tuple[str, bytes]:
        if self._reader is None:
            try:
                self._reader = self._archive.weights_reader()
            except _H5Format:  # a layout the small reader does not read: h5py reads it
                self._reader = self._archive.weights_reader(use_h5py=True)
        if isinstance(self._reader, _PureH5):
            try:
                return self._reader.dataset(path)
            except (_H5Format, struct.error, IndexError, KeyError, ValueError):
                self._reader = self._archive.weights_reader(use_h5py=True)
        return self._reader.dataset(path)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# --- the zip copy --------------------------------------------------------------------------------

_CHUNK = 1 << 20
# How many chunks may be read ahead of the slower hasher: 6 MiB, and up to 16 MiB for files
# from 512 MiB on (1/32 of the file). Two hashers and the copy share two cores on small
# machines; more slack lets each keep going while the scheduler runs the others (on VGG16,
# 554 MB, 16 chunks write in 0.58 s where 6 take 0.62 s), at a memory cost that stays small
# next to the file's size.
_MIN_CHUNKS, _MAX_CHUNKS = 6, 16
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from this value on need zip64 fields
_ZIP64_COUNT = 0xFFFF


def _copy_zip(archive: _Archive, dst: str, replace: dict[str, bytes]) -> Written:
    infos = archive.zip.infolist()
    fd = archive.file.fileno()
    src_size = os.fstat(fd).st_size
    spans = []  # (local header offset, data offset, data end) in the source, per entry
    for info in infos:
        start = archive.data_offset(info)
        spans.append((info.header_offset, start, start + info.compress_size))
    # One sequential pass hashes the source while its entries are copied, when they lie in
    # central-directory order (as zipfile writes them); otherwise the source is hashed apart.
    sequential = all(spans[i][2] <= spans[i + 1][0] for i in range(len(spans) - 1)) and \
        (not spans or spans[-1][2] <= src_size)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    buffers = _Buffers(max(_MIN_CHUNKS, min(_MAX_CHUNKS, src_size // (32 * _CHUNK))), _CHUNK)
    out_hash = _Hasher()
    src_hash = _Hasher()
    try:
        with open(dst, "wb", buffering=0) as out:
            writer = _Out(out, out_hash)
            pos = 0  # how far the source has been hashed
            central = []
            for info, (header, start, end) in zip(infos, spans):
                if sequential:
                    _pass(fd, pos, start, buffers, src_hash)  # gap, local header
                    pos = start
                new = replace.get(info.filename)
                if new is not None:
                    data, crc, usize = _compress(new, info)
                    entry = _entry(info, writer.offset, len(data), usize, crc)
                    writer.write(entry.local_header())
                    writer.write(data)
                    if sequential:
                        _pass(fd, start, end, buffers, src_hash)
                else:
                    entry = _entry(info, writer.offset, info.compress_size, info.file_size,
                                   info.CRC)
                    writer.write(entry.local_header())
                    crc = _pass(fd, start, end, buffers, src_hash if sequential else None, writer)
                    # Stored bytes are the content: check them as any zip reader will. (A
                    # compressed entry's CRC is over its inflated bytes, which are not read.)
                    if info.compress_type == zipfile.ZIP_STORED and crc != info.CRC:
                        raise DamagedArchive(f"{info.filename} fails its CRC-32 check: the file "
                                             "is damaged")
                if sequential:
                    pos = end
                central.append(entry)
            if sequential:
                _pass(fd, pos, src_size, buffers, src_hash)  # data descriptors, central directory
            _write_central(writer, central, archive.zip.comment)
        digest_out = out_hash.finish()
        digest_in = src_hash.finish() if sequential else sha256_file(archive.path)
        if changed(archive.stat, os.fstat(fd), archive.path):
            raise InputChanged()  # the config, the values, the copy and the digests may disagree
    finally:
        out_hash.close()
        src_hash.close()
    return Written(digest_out, digest_in)


def _compress(data: bytes, info: zipfile.ZipInfo) -> tuple[bytes, int, int]:
    crc = zlib.crc32(data) & 0xFFFFFFFF
    if info.compress_type == zipfile.ZIP_STORED:
        return data, crc, len(data)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(), crc, len(data)
    raise ArchiveUnsupported(f"{info.filename} uses compression method {info.compress_type}")


@dataclass
class _Entry:
    name: bytes
    flags: int
    method: int
    dostime: int
    dosdate: int
    crc: int
    csize: int
    usize: int
    offset: int
    create_version: int
    create_system: int
    extract_version: int
    internal_attr: int
    external_attr: int
    comment: bytes

    def _zip64_local(self) -> bool:
        return self.csize >= _ZIP64_LIMIT or self.usize >= _ZIP64_LIMIT

    def local_header(self) -> bytes:
        extra = b""
        csize, usize = self.csize, self.usize
        if self._zip64_local():
            extra = struct.pack("<HHQQ", 1, 16, usize, csize)
            csize = usize = 0xFFFFFFFF
        version = max(self.extract_version, 45 if extra else 20)
        return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", version, 0, self.flags, self.method,
                           self.dostime, self.dosdate, self.crc, csize, usize, len(self.name),
                           len(extra)) + self.name + extra

    def central_header(self) -> bytes:
        fields = []
        csize, usize, offset = self.csize, self.usize, self.offset
        if self._zip64_local():  # as in the local header: both sizes, in this order
            fields += [usize, csize]
            csize = usize = 0xFFFFFFFF
        if offset >= _ZIP64_LIMIT:
            fields.append(offset)
            offset = 0xFFFFFFFF
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = max(self.extract_version, 45 if extra else 20)
        return struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", max(self.create_version, version),
                           self.create_system, version, 0, self.flags, self.method, self.dostime,
                           self.dosdate, self.crc, csize, usize, len(self.name), len(extra),
                           len(self.comment), 0, self.internal_attr, self.external_attr,
                           offset) + self.name + extra + self.comment


def _entry(info: zipfile.ZipInfo, offset: int, csize: int, usize: int, crc: int) -> _Entry:
    flags = info.flag_bits & ~0x08  # sizes go in the header: no data descriptor
    try:
        name = info.filename.encode("ascii")
        flags &= ~0x800
    except UnicodeEncodeError:
        name = info.filename.encode("utf-8")
        flags |= 0x800
    y, mo, d, h, mi, s = info.date_time
    dosdate = (max(y, 1980) - 1980) << 9 | mo << 5 | d
    dostime = h << 11 | mi << 5 | (s // 2)
    return _Entry(name=name, flags=flags, method=info.compress_type, dostime=dostime,
                  dosdate=dosdate, crc=crc & 0xFFFFFFFF, csize=csize, usize=usize, offset=offset,
                  create_version=min(info.create_version, 63), create_system=info.create_system,
                  extract_version=min(info.extract_version, 63),
                  internal_attr=info.internal_attr & 0xFFFF,
                  external_attr=info.external_attr & 0xFFFFFFFF, comment=info.comment or b"")


def _write_central(writer: "_Out", entries: list[_Entry], comment: bytes) -> None:
    start = writer.offset
    for e in entries:
        writer.write(e.central_header())
    size = writer.offset - start
    count = len(entries)
    if count > _ZIP64_COUNT or size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
        end64 = writer.offset
        writer.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                                 size, start))
        writer.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1))
        count16 = min(count, 0xFFFF)
        size32 = min(size, 0xFFFFFFFF)
        start32 = min(start, 0xFFFFFFFF)
    else:
        count16, size32, start32 = count, size, start
    comment = comment[:0xFFFF]
    writer.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count16, count16, size32, start32,
                             len(comment)) + comment)


class _Hasher:
    """sha256 in a worker thread, fed in order through a queue. hashlib releases the GIL on
    large updates, so hashing the output, hashing the source and copying run on separate cores.
    The queue needs no bound of its own: the chunks in it come from `_Buffers`, whose fixed
    pool bounds the memory held whatever the file size (the few other items are zip headers
    and the rewritten config.json)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="surgery-sha256", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, done = item
            try:
                self._digest.update(data)
            except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                self._error = exc
            if done is not None:
                done()

    def update(self, data, done: Optional[Callable[[], None]] = None) -> None:
        """Hash ``data`` next; ``done()`` is called once it has been hashed."""
        self._queue.put((data, done))

    def finish(self) -> str:
        self.close()
        if self._error is not None:  # pragma: no cover
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()


class _Buffers:
    """A few reused chunk buffers: a fresh megabyte per read would be a fresh mmap, page faults
    and zeroing for every chunk (glibc serves large allocations with mmap). A buffer goes back to
    the pool when every hasher it was handed to is done with it."""

    def __init__(self, count: int, size: int):
        self._free: "queue.SimpleQueue[bytearray]" = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        return self._free.get()

    def release_after(self, buf: bytearray, users: int) -> Callable[[], None]:
        left = [max(users, 1)]

        def done() -> None:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._free.put(buf)
        return done


class _Out:
    """The output file, its sha256 and the offset reached."""

    def __init__(self, f, hasher: _Hasher):
        self.f = f
        self.hasher = hasher
        self.offset = 0

    def write(self, data, done: Optional[Callable[[], None]] = None) -> None:
        view = memoryview(data)
        while view:
            n = self.f.write(view)
            view = view[n:]
        self.hasher.update(data, done)
        self.offset += len(data)


def _pass(fd: int, begin: int, end: int, buffers: _Buffers, src_hash: Optional[_Hasher],
          writer: Optional[_Out] = None) -> int:
    """Read [begin, end) of the source in chunks: hash it as source bytes, copy it out, or both.
    The CRC-32 of the bytes copied (0 when none are)."""
    crc = 0
    while begin < end:
        n = min(_CHUNK, end - begin)
        buf = buffers.get()
        view = memoryview(buf)[:n]
        if _read_into(fd, view, begin) != n:
            buffers.release_after(buf, 1)()
            raise ArchiveUnsupported("the archive is truncated")
        users = (writer is not None) + (src_hash is not None)
        done = buffers.release_after(buf, users)
        if not users:
            done()
        if writer is not None:
            writer.write(view, done)
            crc = zlib.crc32(view, crc)
        if src_hash is not None:
            src_hash.update(view, done)
        begin += n
    return crc


# --- model.weights.h5 ----------------------------------------------------------------------------


class _H5Format(Exception):
    """The pure reader met an HDF5 layout it does not read; h5py takes over."""


class _H5:
    """What describe needs of the weights file. Paths are relative to the root, '' is the root."""

    def children(self, path: str) -> Optional[dict[str, str]]:
        """name -> "group" | "dataset" for the group at ``path``; None if there is none."""
        raise NotImplementedError

    def shape(self, path: str) -> tuple[int, ...]:
        raise NotImplementedError

    def name_attr(self, path: str) -> Optional[str]:
        raise NotImplementedError

    def dataset(self, path: str) -> tuple[str, bytes]:
        """(dtype name, the values as little-endian bytes in C order) of the dataset at
        ``path``: what freezing entries of a weight stores (engines/constraint.py)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _PureH5(_H5):
    """The HDF5 metadata h5py writes by default (libver 'earliest'): superblock version 0 or 1,
    version-1 object headers, groups as symbol tables (v1 B-trees, local heaps), attributes of
    variable-length strings in the global heap. Anything else raises _H5Format."""

    def __init__(self, read: Callable[[int, int], bytes]):
        self._raw = read
        sig = read(0, 8)
        if sig != b"\x89HDF\r\n\x1a\n":
            raise _H5Format("no HDF5 signature at offset 0")
        head = read(8, 16)
        version = head[0]
        if version not in (0, 1):
            raise _H5Format(f"superblock version {version}")
        self.o, self.l = head[5], head[6]  # sizes of offsets and lengths
        if self.o != 8 or self.l != 8:
            raise _H5Format("offsets or lengths are not 8 bytes")
        pos = 24 + (4 if version == 1 else 0)
        base, _free, _eof, _driver = struct.unpack("<4Q", read(pos, 32))
        self.base = base
        entry = read(pos + 32, 40)
        _name_off, header, cache, _res = struct.unpack("<QQLL", entry[:24])
        self._groups: dict[str, dict[str, tuple[int, Optional[tuple[int, int]]]]] = {}
        self._root = (header, struct.unpack("<QQ", entry[24:40]) if cache == 1 else None)
        self._heaps: dict[int, bytes] = {}
        self._collections: dict[int, dict[int, bytes]] = {}
        self._messages: dict[int, list[tuple[int, bytes]]] = {}

    def read(self, addr: int, n: int) -> bytes:
        data = self._raw(self.base + addr, n)
        if len(data) != n:
            raise _H5Format("short read")
        return data

    # object headers

    def messages(self, addr: int) -> list[tuple[int, bytes]]:
        cached = self._messages.get(addr)
        if cached is not None:
            return cached
        prefix = self.read(addr, 16)
        if prefix[:4] == b"OHDR":
            raise _H5Format("version-2 object header")
        version, _r, count, _refs, size = struct.unpack("<BBHLL", prefix[:12])
        if version != 1:
            raise _H5Format(f"object header version {version}")
        blocks = [(addr + 16, size)]
        out: list[tuple[int, bytes]] = []
        while blocks:
            start, length = blocks.pop(0)
            block = self.read(start, length)
            p = 0
            while p + 8 <= length:
                mtype, msize, _flags = struct.unpack("<HHB", block[p:p + 5])
                data = block[p + 8:p + 8 + msize]
                p += 8 + msize
                if mtype == 0x10:  # continuation
                    c_addr, c_len = struct.unpack("<QQ", data[:16])
                    blocks.append((c_addr, c_len))
                elif mtype != 0:
                    out.append((mtype, data))
        self._messages[addr] = out
        return out

    # groups

    def _group_at(self, header: int, table: Optional[tuple[int, int]]
                  ) -> dict[str, tuple[int, Optional[tuple[int, int]]]]:
        if table is None:
            found = [d for t, d in self.messages(header) if t == 0x11]
            if not found:
                raise _H5Format("not a symbol-table group")
            table = struct.unpack("<QQ", found[0][:16])
        btree, heap = table
        members: dict[str, tuple[int, Optional[tuple[int, int]]]] = {}
        self._walk_btree(btree, self._heap(heap), members)
        return members

    def _heap(self, addr: int) -> bytes:
        """The data segment of a local heap (a group's member names)."""
        cached = self._heaps.get(addr)
        if cached is None:
            head = self.read(addr, 32)
            if head[:4] != b"HEAP":
                raise _H5Format("no local heap")
            size, _free, data = struct.unpack("<QQQ", head[8:32])
            if size > 1 << 26:
                raise _H5Format("local heap too large")
            cached = self._heaps[addr] = self.read(data, size)
        return cached

    @staticmethod
    def _heap_name(heap: bytes, offset: int) -> str:
        end = heap.find(b"\0", offset)
        if offset >= len(heap) or end < 0:
            raise _H5Format("name outside the local heap")
        return heap[offset:end].decode("utf-8")

    def _walk_btree(self, addr: int, heap: bytes, members: dict, depth: int = 0) -> None:
        if depth > 32:
            raise _H5Format("B-tree too deep")
        head = self.read(addr, 24)
        if head[:4] != b"TREE" or head[4] != 0:
            raise _H5Format("not a group B-tree node")
        level = head[5]
        used = struct.unpack("<H", head[6:8])[0]
        body = self.read(addr + 24, (2 * used + 1) * 8)
        children = [struct.unpack("<Q", body[8 + 16 * i:16 + 16 * i])[0] for i in range(used)]
        for child in children:
            if level > 0:
                self._walk_btree(child, heap, members, depth + 1)
                continue
            snod = self.read(child, 8)
            if snod[:4] != b"SNOD":
                raise _H5Format("not a symbol table node")
            count = struct.unpack("<H", snod[6:8])[0]
            entries = self.read(child + 8, 40 * count)
            for k in range(count):
                e = entries[40 * k:40 * (k + 1)]
                name_off, header, cache = struct.unpack("<QQL", e[:20])
                if cache == 2:
                    raise _H5Format("symbolic link")
                table = struct.unpack("<QQ", e[24:40]) if cache == 1 else None
                members[self._heap_name(heap, name_off)] = (header, table)

    def _members(self, path: str):
        cached = self._groups.get(path)
        if cached is not None:
            return cached
        if path == "":
            header, table = self._root
        else:
            parent, _, name = path.rpartition("/")
            members = self._members(parent)
            if members is None or name not in members:
                return None
            header, table = members[name]
            if table is None and not self._is_group(header):
                return None
        result = self._group_at(header, table)
        self._groups[path] = result
        return result

    def _is_group(self, header: int) -> bool:
        types = {t for t, _ in self.messages(header)}
        if 0x02 in types or 0x06 in types:
            raise _H5Format("new-style group")
        return 0x11 in types

    def _lookup(self, path: str) -> int:
        parent, _, name = path.rpartition("/")
        members = self._members(parent)
        if members is None or name not in members:
            raise _H5Format(f"no object {path}")
        return members[name][0]

    def children(self, path: str) -> Optional[dict[str, str]]:
        members = self._members(path)
        if members is None:
            return None
        return {name: ("group" if table is not None or self._is_group(header) else "dataset")
                for name, (header, table) in members.items()}

    def shape(self, path: str) -> tuple[int, ...]:
        for mtype, data in self.messages(self._lookup(path)):
            if mtype == 0x01:
                return _dataspace(data)[0]
        raise _H5Format(f"{path} has no dataspace")

    def dataset(self, path: str) -> tuple[str, bytes]:
        # What h5py writes for a weight: a float datatype, a contiguous (or compact) layout
        # version 3, no filters. Anything else is left to h5py.
        found = dict(self.messages(self._lookup(path)))
        if 0x0B in found:
            raise _H5Format(f"{path} is filtered (compressed)")
        if 0x01 not in found or 0x03 not in found or 0x08 not in found:
            raise _H5Format(f"{path} is not a plain dataset")
        dims, _scalar = _dataspace(found[0x01])
        dtype, itemsize = _float_type(found[0x03])
        layout = found[0x08]
        if layout[0] != 3:
            raise _H5Format(f"{path}: data layout version {layout[0]}")
        nbytes = math.prod(dims) * itemsize
        if layout[1] == 1:  # contiguous: address, size
            address, size = struct.unpack("<QQ", layout[2:18])
            if size != nbytes or address == 0xFFFFFFFFFFFFFFFF:
                raise _H5Format(f"{path}: {size} bytes stored for {nbytes}")
            return dtype, self.read(address, nbytes)
        if layout[1] == 0:  # compact: the bytes are in the header
            (size,) = struct.unpack("<H", layout[2:4])
            if size != nbytes:
                raise _H5Format(f"{path}: {size} bytes stored for {nbytes}")
            return dtype, bytes(layout[4:4 + size])
        raise _H5Format(f"{path}: data layout class {layout[1]} (chunked)")

    def name_attr(self, path: str) -> Optional[str]:
        members = self._members(path.rpartition("/")[0])
        name = path.rpartition("/")[2]
        if members is None or name not in members:
            return None
        for mtype, data in self.messages(members[name][0]):
            if mtype == 0x0C:
                attr_name, value = self._attribute(data)
                if attr_name == "name":
                    return value
        return None

    def _attribute(self, data: bytes) -> tuple[str, Optional[str]]:
        version = data[0]
        if version == 1:
            name_size, dt_size, ds_size = struct.unpack("<HHH", data[2:8])
            p = 8
            pad = lambda n: (n + 7) & ~7  # noqa: E731
        elif version in (2, 3):
            if data[1] & 0x3:
                raise _H5Format("shared attribute datatype")
            name_size, dt_size, ds_size = struct.unpack("<HHH", data[2:8])
            p = 8 + (1 if version == 3 else 0)
            pad = lambda n: n  # noqa: E731
        else:
            raise _H5Format(f"attribute message version {version}")
        name = data[p:p + name_size].split(b"\0", 1)[0].decode("utf-8")
        p += pad(name_size)
        dtype = data[p:p + dt_size]
        p += pad(dt_size)
        dims, scalar = _dataspace(data[p:p + ds_size])
        p += pad(ds_size)
        if not scalar:
            return name, None
        value = data[p:]
        klass = dtype[0] & 0x0F
        if klass == 3:  # fixed-length string
            size = struct.unpack("<L", dtype[4:8])[0]
            return name, value[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
        if klass == 9 and (dtype[1] & 0x0F) == 1:  # variable-length string
            length, collection, index = struct.unpack("<LQL", value[:16])
            return name, self._global_object(collection, index)[:length].decode("utf-8",
                                                                                 "replace")
        return name, None

    def _global_object(self, collection: int, index: int) -> bytes:
        objects = self._collections.get(collection)
        if objects is None:
            head = self.read(collection, 16)
            if head[:4] != b"GCOL":
                raise _H5Format("no global heap collection")
            size = struct.unpack("<Q", head[8:16])[0]
            if size > 1 << 26:
                raise _H5Format("global heap collection too large")
            body = self.read(collection + 16, size - 16)
            objects = self._collections[collection] = {}
            p = 0
            while p + 16 <= len(body):
                obj_index, _refs, _res, obj_size = struct.unpack("<HHLQ", body[p:p + 16])
                if obj_index == 0:
                    break
                objects[obj_index] = body[p + 16:p + 16 + obj_size]
                p += 16 + ((obj_size + 7) & ~7)
        try:
            return objects[index]
        except KeyError:
            raise _H5Format("global heap object not found") from None


def _dataspace(data: bytes) -> tuple[tuple[int, ...], bool]:
    """(dims, is_scalar) of a dataspace message."""
    version, rank = data[0], data[1]
    if version == 1:
        p = 8
        scalar = rank == 0
    elif version == 2:
        p = 4
        if data[3] == 2:
            raise _H5Format("null dataspace")
        scalar = data[3] == 0
    else:
        raise _H5Format(f"dataspace version {version}")
    dims = struct.unpack(f"<{rank}Q", data[p:p + 8 * rank])
    return tuple(int(d) for d in dims), scalar


# (itemsize, exponent bits, mantissa bits) of the float types h5py writes for weights. Keras
# stores bfloat16 as opaque 2-byte items, not as an HDF5 float: h5py reads those, and refuses.
_FLOATS = {(2, 5, 10): "float16", (4, 8, 23): "float32", (8, 11, 52): "float64"}


def _float_type(data: bytes) -> tuple[str, int]:
    """(dtype name, itemsize) of a little-endian IEEE float datatype message."""
    cls, bits0 = data[0] & 0x0F, data[1]
    (size,) = struct.unpack("<L", data[4:8])
    if cls != 1 or bits0 & 0x01:  # floating point; bit 0: big-endian
        raise _H5Format("not a little-endian float dataset")
    exp_bits, mant_bits = data[8 + 5], data[8 + 7]
    name = _FLOATS.get((size, exp_bits, mant_bits))
    if name is None:
        raise _H5Format(f"float of {size} bytes, {exp_bits}-bit exponent")
    return name, size


class _Window(io.RawIOBase):
    """A read-only file over [start, start + size) of a file descriptor (the stored weights
    entry inside the zip), for h5py."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _H5pyReader(_H5):
    """The same answers through h5py (imported here, only when the pure reader gave up)."""

    def __init__(self, opener: Callable[[], object]):
        try:
            import h5py
        except ImportError:
            raise ArchiveUnsupported(f"{WEIGHTS} needs h5py to be read, which is not "
                                     "installed") from None
        self._h5py = h5py
        self._fileobj = opener()
        try:
            self._file = h5py.File(self._fileobj, "r")
        except Exception as exc:  # h5py raises OSError and others on a bad file
            raise ArchiveUnsupported(f"{WEIGHTS} is unreadable: {_first_line(exc)}") from None

    def _get(self, path: str):
        try:
            return self._file[path] if path else self._file
        except KeyError:
            return None

    def children(self, path: str) -> Optional[dict[str, str]]:
        obj = self._get(path)
        if not isinstance(obj, self._h5py.Group):
            return None
        return {k: ("group" if isinstance(obj.get(k, getlink=False), self._h5py.Group)
                    else "dataset") for k in obj.keys()}

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._get(path).shape)

    def dataset(self, path: str) -> tuple[str, bytes]:
        values = self._get(path)[()]  # NumPy: h5py's own dependency
        dtype = values.dtype
        if dtype.kind != "f":  # Keras stores bfloat16 as opaque 2-byte items ('|V2')
            raise ArchiveUnsupported(f"its weights are stored as {dtype.str!r}, not as IEEE "
                                     "floats (bfloat16 is stored so)")
        return dtype.name, values.astype(dtype.newbyteorder("<")).tobytes()

    def name_attr(self, path: str) -> Optional[str]:
        obj = self._get(path)
        if obj is None or "name" not in obj.attrs:
            return None
        value = obj.attrs["name"]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value if isinstance(value, str) else None

    def close(self) -> None:
        self._file.close()
        close = getattr(self._fileobj, "close", None)
        if close:
            close()
