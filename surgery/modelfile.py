"""Model files: a model file read into a LayerTree, and a spec applied from file to file.

`read_model` is what `plan`, `show`, `verify`, `lint --model` and `diff --spec` read a model
with; `apply_file` is `surgery apply` (and `surgery.apply_file` for a Python user): the engine
chosen once, the fallback and its reason returned as data, the two pipelines, the manifest, and
the atomic commit of the model and its manifest. Nothing here prints: notes come back in the
result, errors as `SurgeryError`s, and the command line renders both.

Engines. ``archive`` reads the layer tree from a ``.keras`` zip and rewrites its config.json
(engines/archive.py: no TensorFlow); ``keras`` loads and saves through Keras (engines/live.py);
``auto`` takes the archive when it can and Keras otherwise, saying why in ``fallback``. Only the
archive engine's own refusal (`ArchiveUnsupported`, with its reason) falls back; anything else
it raises is an error about the file or a bug, never a silent retry through Keras.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .api import SpecLike, apply_plan, as_spec
from .appcall import parse_application
from .atomic import AtomicOutputs
from .digest import FileDigest, InputChanged, sha256_file
from .engines import APPLICATIONS_PREFIX
from .errors import ModelError, SurgeryError, UsageError
from .ir import Spec
from .manifest import Manifest, build_manifest
from . import saved_state
from .plan import Plan, plan_spec
from .progress import SILENT, Progress
from .tree import LayerTree

__all__ = ["Engine", "ModelRead", "AppliedFile", "MergedFile", "read_model", "apply_file",
           "merge_file", "planned_manifest", "model_sha256"]

_OUTPUT_SUFFIXES = (".keras", ".h5")
# An archive copy is a step worth showing from this size on: about half a second on a fast disk
# (bench_archive.py: VGG16's 554 MB take 0.8 s), longer on a slow one.
_LARGE_ARCHIVE = 256 * 2**20
PathLike = Union[str, os.PathLike]


class Engine(str, enum.Enum):
    """Which engine reads (and writes) a model file; a str, so ``engine == "archive"`` works."""

    AUTO = "auto"
    ARCHIVE = "archive"
    KERAS = "keras"

    @classmethod
    def of(cls, value: Union["Engine", str]) -> "Engine":
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"engine {value!r}: expected auto, archive or keras") from None


@dataclass(frozen=True)
class ModelRead:
    """A model file read by a command that changes nothing. ``engine`` is the one that read it
    (archive or keras); ``fallback`` why ``auto`` could not read it from the archive (None when
    it did, or when Keras was the only way: a Keras engine asked for, a file that is no .keras)."""

    tree: LayerTree
    engine: Engine
    fallback: Optional[str] = None


@dataclass(frozen=True)
class AppliedFile:
    """What `apply_file` did: the plan, the manifest written, the two paths as given, the engine
    that wrote the output and, under ``auto``, why it was not the archive engine (``fallback``).
    The spec's findings that did not stop the run (warnings) are ``diagnostics``."""

    plan: Plan
    manifest: Manifest
    output: str
    manifest_path: str
    engine: Engine
    fallback: Optional[str] = None
    # Where a plain keras.models.load_model would not give the plan back (keras_hub models,
    # MultiHeadAttention's sublayers, variable flags): the layers, and what to call instead.
    # The state is then recorded in the output (surgery/saved_state.py).
    unrestored: Optional[str] = None

    @property
    def diagnostics(self):
        return self.plan.diagnostics


_BACKEND_MODULES = ("keras", "tensorflow", "jax", "jaxlib", "torch")


def _live(model: str):
    """engines.live, to load ``model``, or a ModelError: the path is not one Keras can load (said
    before TensorFlow starts, which takes seconds), or what to install (the core install, lark
    and pyyaml, reads and rewrites .keras archives without Keras; loading needs Keras and a
    backend)."""
    _check_loadable(model)
    try:
        from .engines import live
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "surgery":
            raise  # surgery's own bug: an internal error, with its traceback under SURGERY_DEBUG
        if exc.name in _BACKEND_MODULES:
            raise ModelError(model, f"loading it needs Keras and a backend, and {exc.name} is "
                                    f"not installed: pip install 'surgery[tensorflow]' (or [jax], "
                                    f"[torch])") from None
        # Installed, yet it does not import: a library that does not load (under a memory limit
        # such as `ulimit -v` 1 GiB, TensorFlow's cannot be mapped), a broken install.
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = " (too little memory for TensorFlow's libraries?)" if "map segment" in problem \
            or "allocate memory" in problem else ""
        raise ModelError(model, f"loading it needs Keras, and importing it failed: "
                                f"{problem}{hint}") from None
    except MemoryError:
        raise ModelError(model, "loading it needs Keras, and there is not enough memory to "
                                "import it") from None
    return live


def _check_loadable(model: str) -> None:
    """A ModelError for a path no engine can read as a model, before anything reads it."""
    if model.startswith(APPLICATIONS_PREFIX):
        return
    if not os.path.exists(model):
        raise ModelError(model, "no such file")
    if os.path.isdir(model):
        raise ModelError(model, "is a directory, not a model file (.keras or .h5)")
    if not os.path.isfile(model):  # Keras would read /dev/zero until memory runs out
        raise ModelError(model, "is not a regular file (a device, a pipe or a socket): a model "
                         "file is read by seeking in it")
    if not model.endswith((".keras", ".h5", ".hdf5")):
        raise ModelError(model, "unsupported model format: expected a .keras or .h5 file, or "
                         "keras.applications.NAME")


def read_model(model: str, *, engine: Union[Engine, str] = Engine.AUTO,
               safe_mode: bool = True, progress: Progress = SILENT) -> ModelRead:
    """The layer tree of a model file (or ``keras.applications.NAME(...)``), for a command that
    only reads: from the archive when the engine allows (a checkpoint saved compiled too), else
    loaded through Keras with safe mode as given. ``progress`` is told the slow steps."""
    engine = Engine.of(engine)
    parse_application(model)  # a malformed call is an error before TensorFlow starts
    opened, fallback = _archive(model, engine, compiled=True)
    if opened is not None:
        with opened:
            return ModelRead(opened.tree, Engine.ARCHIVE)
    with _loading(progress, model):
        live = _live(model)
        loaded = live.load(model, safe_mode=safe_mode)
    return ModelRead(live.describe(loaded)[0], Engine.KERAS, fallback)


def _loading(progress: Progress, model: str):
    """The step that gets a model through Keras (TensorFlow's start included); none for a path
    that Keras will not get to load (missing, a folder, another format): its error comes at
    once, without a line announcing work that does not happen."""
    if model.startswith(APPLICATIONS_PREFIX):
        return progress.step(f"building {model} (weights=None)")
    if os.path.isfile(model) and model.endswith((".keras", ".h5", ".hdf5")):
        return progress.step(f"loading {model} through Keras")
    return contextlib.nullcontext()


def planned_manifest(spec: Spec, model: str, *, engine: Union[Engine, str] = Engine.AUTO,
                     safe_mode: bool = True,
                     progress: Progress = SILENT) -> tuple[Manifest, ModelRead]:
    """The manifest `apply_file` would write for ``spec`` on ``model``, computed without writing
    (no ``output.sha256``: nothing is written), and how the model was read."""
    read = read_model(model, engine=engine, safe_mode=safe_mode, progress=progress)
    manifest = build_manifest(plan_spec(spec, read.tree), spec, model_source=model,
                              model_sha256=model_sha256(model), model_name=read.tree.root.name)
    return manifest, read


def model_sha256(model: str) -> Optional[str]:
    """The sha256 of a model file; None for ``keras.applications.NAME(...)``, built, not read."""
    if model.startswith(APPLICATIONS_PREFIX):
        return None
    try:
        return sha256_file(model)
    except OSError as exc:  # InputChanged included: it says what happened
        raise ModelError(model, f"cannot read it: {exc.strerror or exc}") from None


def apply_file(spec: SpecLike, model: PathLike, output: PathLike, *,
               manifest: Optional[PathLike] = None, force: bool = False,
               engine: Union[Engine, str] = Engine.AUTO, allow_empty: bool = False,
               fsync: bool = False, safe_mode: bool = True,
               progress: Progress = SILENT) -> AppliedFile:
    """Apply ``spec`` to the model file ``model`` and write the result to ``output`` (``.keras``
    or ``.h5``) and its manifest to ``manifest`` (default ``OUTPUT.manifest.json``).

    ``spec`` is a `Spec`, spec text or a path; ``model`` a ``.keras``/``.h5`` file or
    ``keras.applications.NAME``. The model is never modified, and no output may be an input
    (the model, the spec file) or the other output, whatever links lead there. Both files are
    written atomically: an error or an interrupt leaves the destinations as they were. An
    existing output is an error unless ``force``, and stays one at the moment of writing: of two
    runs writing the same new file, one gets it and the other raises. ``engine`` and the
    fallback: see the module. ``fsync`` flushes both files to the disk before they replace
    anything. ``safe_mode=False`` lets Keras run code stored in the file (only for files you
    trust). ``progress`` (surgery/progress.py) is told each step that may take seconds.
    Raises `SpecError` for the spec, `ModelError` for the model, `UsageError` for the paths;
    writes nothing then."""
    engine = Engine.of(engine)
    the_spec = as_spec(spec)
    model, output = os.fspath(model), os.fspath(output)
    parse_application(model)  # a malformed call is an error before TensorFlow starts
    manifest_path = os.fspath(manifest) if manifest is not None else output + ".manifest.json"
    _check_outputs(output, manifest_path, _inputs(model, the_spec), force=force)

    why_not = None if output.endswith(".keras") else "an .h5 output"
    opened, fallback = _archive(model, engine, compiled=False, why_not=why_not)
    if opened is not None:
        with opened:
            the_plan = plan_spec(the_spec, opened.tree, allow_empty=allow_empty)
            reason = opened.unsupported(the_plan)
            if reason is None:
                written = _apply_archive(opened, the_plan, the_spec, model, output,
                                         manifest_path, force=force, fsync=fsync,
                                         progress=progress)
                return AppliedFile(the_plan, written, output, manifest_path, Engine.ARCHIVE)
            fallback = _fallback(model, engine, reason)
    the_plan, written, unrestored = _apply_keras(the_spec, model, output, manifest_path,
                                                 allow_empty=allow_empty, force=force,
                                                 fsync=fsync, safe_mode=safe_mode,
                                                 progress=progress)
    return AppliedFile(the_plan, written, output, manifest_path, Engine.KERAS, fallback,
                       unrestored)


@dataclass(frozen=True)
class MergedFile:
    """What `merge_file` wrote: the output, its sha256 and the LoRA layers folded into it."""

    output: str
    sha256: str
    layers: tuple[str, ...]


def merge_file(model: PathLike, output: PathLike, *, force: bool = False,
               fsync: bool = False) -> MergedFile:
    """Write the ``.keras`` file ``model`` to ``output`` with its LoRA adapters folded into the
    kernels and LoRA gone from the config: a model plain ``keras.models.load_model`` loads as an
    ordinary one, with the same outputs (engines/archive `merge_lora`; no TensorFlow). The
    output is written atomically, never over the input; an error writes nothing."""
    from .engines import archive

    model, output = os.fspath(model), os.fspath(output)
    if not output.endswith(".keras"):
        raise UsageError(f"{output}: the merged model is a .keras file")
    _check_outputs(output, None, [(model, "model")], force=force)
    _check_loadable(model)  # the path checks every model gets, then merge's own
    if not model.endswith(".keras"):
        raise ModelError(model, "merge reads a .keras file")
    with AtomicOutputs(fsync=fsync, inputs=[model]) as outputs:
        tmp = outputs.reserve(output, ".keras", replace=force)
        try:
            written, layers = archive.merge_lora(model, str(tmp))
        except (archive.ArchiveUnsupported, archive.DamagedArchive, InputChanged) as exc:
            raise ModelError(model, str(exc)) from None
        except OSError as exc:
            raise SurgeryError(f"{output}: cannot write the model: {exc.strerror or exc}") \
                from None
        if not layers:
            raise ModelError(model, "has no LoRA layer to merge")
        outputs.commit()
    return MergedFile(output, written.sha256, layers)


# --- the engine, chosen once ----------------------------------------------------------------------


def _archive(model: str, engine: Engine, *, compiled: bool, why_not: Optional[str] = None):
    """(the archive opened, None) when the archive engine runs; else (None, the reason ``auto``
    falls back), the reason None where no note is due (Keras asked for; a model the archive
    engine cannot take by its kind, ``why_not``). ``compiled``: a checkpoint saved compiled is
    read too (for commands that only read)."""
    if engine is Engine.KERAS:
        return None, None
    if why_not is None and not (model.endswith(".keras") and os.path.isfile(model)):
        why_not = f"{model} (a .keras file is needed)"
    if why_not is not None:
        if engine is Engine.ARCHIVE:
            raise UsageError(f"--engine archive cannot handle {why_not}")
        return None, None
    from .engines import archive

    try:
        return archive.Opened(model, compiled=compiled), None
    except archive.ArchiveUnsupported as exc:
        return None, _fallback(model, engine, str(exc))
    except archive.DamagedArchive as exc:
        raise ModelError(model, str(exc)) from None
    except OSError as exc:  # unreadable (permissions, I/O): the file's fault, not a reason for Keras
        raise ModelError(model, f"cannot read it: {exc.strerror or exc}") from None


def _fallback(model: str, engine: Engine, reason: str) -> str:
    if engine is Engine.ARCHIVE:
        raise ModelError(model, f"the archive engine cannot handle it: {reason}")
    return reason


# --- the two pipelines ----------------------------------------------------------------------------


def _apply_archive(opened, plan: Plan, spec: Spec, model: str, output: str, manifest_path: str,
                   *, force: bool, fsync: bool, progress: Progress) -> Manifest:
    """Rewrite the archive into ``output``'s temporary, then commit it with its manifest."""
    from .engines import archive

    large = _size(model) >= _LARGE_ARCHIVE
    with AtomicOutputs(fsync=fsync, inputs=[model, spec.file]) as outputs:
        tmp = outputs.reserve(output, ".keras", replace=force)
        try:
            with progress.step(f"copying {model} to {output}") if large else \
                    contextlib.nullcontext():
                written = opened.write(plan, str(tmp))
        except (InputChanged, archive.DamagedArchive) as exc:  # the input's fault
            raise ModelError(model, str(exc)) from None
        except (OSError, archive.ArchiveUnsupported) as exc:
            raise SurgeryError(f"{output}: cannot save the model: {exc}") from None
        manifest = build_manifest(plan, spec, model_source=model,
                                  model_sha256=written.source_sha256, model_name=opened.name,
                                  output_sha256=written.sha256)
        _commit(outputs, manifest, manifest_path, force=force)
    return manifest


def _apply_keras(spec: Spec, model: str, output: str, manifest_path: str, *, allow_empty: bool,
                 force: bool, fsync: bool, safe_mode: bool,
                 progress: Progress) -> tuple[Plan, Manifest]:
    """Load through Keras (hashing the file meanwhile), apply, save, commit with the manifest."""
    # Hashed in a thread while TensorFlow imports and the model loads: begun before the import.
    with _input_digest(model) as source:
        with _loading(progress, model):
            live = _live(model)
            loaded = live.load(model, safe_mode=safe_mode)
        digest = None
        if source is not None:
            try:
                digest = source.result()
            except InputChanged as exc:
                raise ModelError(model, str(exc)) from None
            except OSError as exc:
                raise ModelError(model, f"cannot read it: {exc.strerror or exc}") from None
    plan, manifest = apply_plan(loaded, spec, allow_empty=allow_empty, model_source=model,
                                model_sha256=digest)
    with AtomicOutputs(fsync=fsync, inputs=[model, spec.file]) as outputs:
        suffix = Path(output).suffix
        # The suffix is passed on: Keras picks the format from it, and the temporary has none.
        tmp = outputs.reserve(output, suffix, replace=force)
        try:
            with progress.step(f"saving {output}"):
                live.save(loaded, str(tmp), suffix)
        except OSError as exc:  # a full disk, a file size limit: what Keras's writers raise
            raise SurgeryError(f"{output}: cannot save the model: {exc.strerror or exc}") \
                from None
        # Before the commit: an output that cannot hold the plan is an error, not a file.
        unrestored = saved_state.record(str(tmp), plan, shown=output)
        _commit(outputs, manifest, manifest_path, force=force)
    return plan, manifest, unrestored


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # the copy reports it
        return 0


def _input_digest(model: str):
    """The model file's sha256 begun in the background (surgery/digest.py says why); a no-op
    context, giving None, for a `keras.applications.NAME` model, which is built, not read, and
    for a path that does not open, which loading the model then reports."""
    # As engines.live.load decides: a keras.applications name is built, whatever the folder has.
    if not model.startswith(APPLICATIONS_PREFIX) and os.path.isfile(model):
        try:
            return FileDigest(model)
        except OSError:
            pass
    return contextlib.nullcontext()


def _commit(outputs: AtomicOutputs, manifest: Manifest, manifest_path: str, *,
            force: bool) -> None:
    """Write the manifest beside the model's temporary and put both in place."""
    tmp = outputs.reserve(manifest_path, ".json", replace=force)
    try:
        tmp.write_text(manifest.to_json(), encoding="utf-8")
    except OSError as exc:
        raise SurgeryError(f"{manifest_path}: cannot write the manifest: "
                           f"{exc.strerror or exc}") from None
    outputs.commit()


# --- the outputs' checks --------------------------------------------------------------------------


def _inputs(model: str, spec: Spec) -> list[tuple[str, str]]:
    """The files the run reads, which no output may be: (path, what it is)."""
    found = []
    if not model.startswith(APPLICATIONS_PREFIX):
        found.append((model, "input model"))
    if os.path.isfile(spec.file):
        found.append((spec.file, "spec"))
    return found


def _check_outputs(output: str, manifest_path: Optional[str], inputs: list[tuple[str, str]], *,
                   force: bool) -> None:
    """What can be said before any work: a usable name, no input overwritten, the folder there,
    nothing in the way unless ``force``. (The commit checks existence again, atomically.)"""
    if not output.endswith(_OUTPUT_SUFFIXES):
        raise UsageError(f"{output}: the output must end with .keras (or .h5)")
    if manifest_path is not None and _same_file(output, manifest_path):
        raise UsageError("the output and the manifest must be different files")
    targets = [(output, "output")] + ([(manifest_path, "manifest")] if manifest_path else [])
    for path, what in targets:
        for source, kind in inputs:
            if _same_file(path, source):
                raise UsageError(f"{path}: the {what} would overwrite the {kind}; surgery never "
                                 f"modifies its input")
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory")
        if os.path.lexists(path) and not force:
            raise UsageError(f"{path}: already exists; pass --force to replace it")
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"{path}: the folder {parent} does not exist")


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links and symlinks
    included), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
