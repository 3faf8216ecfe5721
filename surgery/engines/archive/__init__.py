"""The archive engine: a `.keras` file <-> LayerTree and flags, without Keras or TensorFlow.

A `.keras` file is a zip of ``metadata.json``, ``config.json`` (the architecture, every layer's
``trainable`` flag) and ``model.weights.h5``. Freezing whole layers changes only the
``trainable`` fields of ``config.json``, so this engine reads the layer tree from the archive
and writes the decided state back into ``config.json``, while every other entry is copied byte
for byte (the weights streamed, never held in memory). Loading and saving through Keras, which
the live engine (engines/live.py) pays, costs seconds and gigabytes; this costs a file copy.

It must describe a model exactly as `engines.live.describe` describes the same model loaded by
``keras.models.load_model``: resolution, planning and the manifest are shared. The pipeline,
one module per step:

- `zip_io`: open and check the zip, read ``config.json`` (capped), expose the weights entry;
- `config`: ``config.json`` -> a tree of Nodes, and what only Keras can read (refused);
- `keras_layout`: where Keras puts what: weight-name tables, group names, auto names;
- `h5`: the weights file through one Reader interface, pure or h5py, chosen once;
- `describe`: Nodes + Reader -> LayerTree;
- `rewrite`: a Plan -> the parsed config in that state;
- `zip_copy`: the output zip, hashed as it is written.

Errors (surgery/errors.py): whatever this engine is not sure of is `ArchiveUnsupported` with a
one-line reason, the only error on which ``--engine auto`` falls back to Keras; a file that
contradicts itself is `DamagedArchive` (`H5FormatError` in the weights file): an error, since
Keras would refuse it too. Anything else is a bug and propagates as one.

A model saved compiled has ``compile_config`` in config.json and an ``optimizer`` group in the
weights file. ``compiled=True`` reads it (for commands that only read); `Opened.write` does not,
since ``load_model(compile=False)`` drops that state and a Keras save afterwards leaves it out,
which copying the weights entry cannot do.

Importing this package imports no TensorFlow, Keras, NumPy or h5py (h5py only when its backend
is chosen, see engines/archive/h5/).
"""

from __future__ import annotations

import json
import zipfile
from typing import TYPE_CHECKING, Optional

from ...errors import ArchiveUnsupported, DamagedArchive, H5FormatError
from ...tree import LayerTree
from .config import COMPILED, structure
from .describe import describe_tree
from .h5 import open_reader
from .keras_layout import CONFIG
from .rewrite import check_plan, set_state
from .zip_copy import Written, copy
from .zip_io import ArchiveFile

if TYPE_CHECKING:  # pragma: no cover
    from ...plan import Plan

__all__ = ["ArchiveUnsupported", "DamagedArchive", "H5FormatError", "Written", "Opened",
           "describe", "write", "is_archive", "merge_lora"]


def is_archive(path: str) -> bool:
    """A cheap test for a zip file with a config.json, for choosing an engine."""
    if not zipfile.is_zipfile(path):  # False for a path that does not open, too
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return CONFIG in zf.NameToInfo
    except zipfile.BadZipFile:  # an end record, but no directory where it says
        return False


def describe(path: str, *, compiled: bool = False, h5: str = "best") -> LayerTree:
    """The model in a `.keras` archive as a LayerTree, equal to
    ``engines.live.describe(keras.models.load_model(path, compile=False))[0]``.

    ``compiled=True`` also reads an archive saved from a compiled model (every checkpoint
    `ModelCheckpoint` writes): its compile settings and optimizer variables are beside the
    layers and change none of them, so commands that only read (show, plan, verify, lint) can
    take it. `write` cannot: Keras drops that state when it loads with compile=False, and the
    output of both engines must be the same, so `apply` loads such a file through Keras.
    ``h5``: the weights file's reader, ``"best"``, ``"pure"`` or ``"h5py"`` (engines/archive/h5/)."""
    with Opened(path, compiled=compiled, h5=h5) as opened:
        return opened.tree


def write(src: str, plan: "Plan", dst: str) -> Written:
    """Copy the archive ``src`` to ``dst`` in ``plan``'s state: `Opened.write`."""
    with Opened(src) as opened:
        return opened.write(plan, dst)


class Opened:
    """A `.keras` archive read once: ``tree`` (what `describe` gives) and ``name`` (the model's),
    then `write` from the same parsed config, so `apply` reads and checks the archive once.
    Use it as a context manager (or `close` it)."""

    def __init__(self, path: str, *, compiled: bool = False, h5: str = "best"):
        self._archive = ArchiveFile(path)
        try:
            self._cfg = self._archive.config()
            self._root = structure(self._cfg, compiled_ok=compiled)
            self._reader = open_reader(self._archive.weights(), h5)
        except BaseException:
            self._archive.close()
            raise
        try:
            self.tree = describe_tree(self._root, self._reader)
        except BaseException:
            self.close()
            raise
        self.name = self._root.name
        self._prepared: Optional["Plan"] = None

    @property
    def h5_backend(self) -> str:
        """Which backend reads the weights file: "pure" or "h5py"."""
        return self._reader.backend

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
            raise ArchiveUnsupported(COMPILED)
        if any(lp.adapter is not None and lp.adapter.new for lp in plan.layers):
            raise ArchiveUnsupported("the spec gives layers LoRA, whose factors only Keras "
                                     "creates")
        check_plan(self._root, plan)
        set_state(self._root, plan, self._reader)
        self._prepared = plan

    def write(self, plan: "Plan", dst: str) -> Written:
        """Write the archive to ``dst`` in ``plan``'s state: every layer's ``trainable`` flag, its
        class (affine or not), the entries frozen inside it.

        ``config.json`` is rewritten (same JSON layout as Keras writes, only those values
        changed); every other entry is copied as stored (same bytes, compression, timestamp), in
        the original order; the weights are streamed in chunks. The output depends only on the
        input bytes and the plan, so it is byte-reproducible. ``dst`` is written in place (the
        caller passes a temporary path and renames it). For one plan: its state is set in the
        parsed config."""
        self._prepare(plan)
        config_bytes = json.dumps(self._cfg).encode("utf-8")
        return copy(self._archive, dst, {CONFIG: config_bytes})

    def close(self) -> None:
        self._reader.close()
        self._archive.close()

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_lora(src: str, dst: str) -> tuple[Written, tuple[str, ...]]:
    """Write ``src`` to ``dst`` as a model without LoRA: the saved weights already hold each
    LoRA layer's merged kernel (Keras saves ``kernel + alpha / rank * A @ B``, never the
    factors), so only config.json changes: ``lora_rank`` and ``lora_alpha`` leave every layer
    config that has them; and surgery's state entry, which would give LoRA back on
    surgery.load_model, is left out (the merged model loads as Keras loads it). Returns the
    output's digests and the LoRA layers merged, by name (empty: ``src`` has none, and ``dst``
    is not written)."""
    from ...saved_state import ENTRY, decode

    with ArchiveFile(src) as archive:
        cfg = archive.config()
        names = _strip_lora(cfg)
        drop = frozenset()
        if ENTRY in archive.zip.NameToInfo:
            info = archive.zip.getinfo(ENTRY)
            if info.file_size > (64 << 20):
                raise DamagedArchive(f"{ENTRY} is {info.file_size} bytes: a damaged or hostile "
                                     "file?")
            try:
                state = decode(archive.zip.read(ENTRY))
            except ValueError as exc:
                raise DamagedArchive(str(exc)) from None
            recorded = [s.path for s in state.layers if s.lora]
            names = recorded or names  # paths where the record has them, else config names
            drop = frozenset({ENTRY})
        if not names:
            return Written("", ""), ()
        return copy(archive, dst, {CONFIG: json.dumps(cfg).encode("utf-8")}, drop), \
            tuple(names)


def _strip_lora(cfg: dict) -> list[str]:
    """Remove LoRA from every layer config in ``cfg`` (in place); the layers' names. A stack,
    not recursion: config.json was read with a bound on its nesting, not on Python's stack."""
    names, stack = [], [cfg]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            conf = item.get("config")
            if isinstance(conf, dict) and "class_name" in item and conf.get("lora_rank"):
                conf.pop("lora_rank")
                conf.pop("lora_alpha", None)
                names.append(str(conf.get("name", "?")))
            stack.extend(item.values())
    return sorted(names)
