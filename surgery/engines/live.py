"""The Keras edge: a live ``keras.Model`` <-> LayerTree, flag writing, loading and saving.

This is the only module that imports Keras (and through it TensorFlow). Everything it hands to
the rest of surgery is plain data: a `LayerTree` to resolve against, version strings for the
manifest. Writing follows a `Plan` computed beforehand, so no decision is made here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter is not ours


@contextlib.contextmanager
def _native_stderr_captured():
    """Hold back what TensorFlow's C++ side writes to fd 2 while it starts (CUDA probes on
    machines without a GPU, absl banners: no env var silences them all). Replayed if the block
    fails, so a real start-up problem is still shown."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with _native_stderr_captured():
    import keras  # noqa: E402

from ..errors import ModelError, SurgeryError  # noqa: E402
from .batchnorm import is_affine, switch  # noqa: E402
from .constraint import FrozenEntries, set_frozen  # noqa: E402
from .frozen_format import axis_details  # noqa: E402
from ..plan import Plan  # noqa: E402
from ..tree import Layer, LayerTree, Weight  # noqa: E402

__all__ = ["describe", "write", "load", "save", "APPLICATIONS_PREFIX"]

from . import APPLICATIONS_PREFIX  # noqa: E402,F401  (re-exported: live.APPLICATIONS_PREFIX)


def describe(model) -> tuple[LayerTree, dict[str, object]]:
    """The model as a LayerTree, and each path's live layer object (for `write`)."""
    objects: dict[str, object] = {}
    root = _node(model, "", 0, objects, is_root=True)
    return LayerTree(root), objects


def _is_container(layer) -> bool:
    # Nested Functional, Sequential and subclassed models are what '/' walks into. Other layers
    # with sublayers (MultiHeadAttention, ...) are leaves: their flag covers their sublayers.
    return isinstance(layer, keras.Model)


def _node(layer, parent_path: str, index: int, objects: dict, is_root: bool = False) -> Layer:
    path = "" if is_root else (f"{parent_path}/{layer.name}" if parent_path else layer.name)
    objects[path] = layer
    if _is_container(layer):
        children = tuple(_node(c, path, i, objects) for i, c in enumerate(layer.layers))
        weights = ()
    else:
        children = ()
        weights = _weights(layer)
    affine = is_affine(layer)
    # An affine BatchNormalization is described as the BatchNormalization it is, plus the flag:
    # selectors ('type:BatchNormalization') and fingerprints do not depend on the policy.
    cls = "BatchNormalization" if affine else type(layer).__name__
    return Layer(name=layer.name, path=path, cls=cls, index=index,
                 trainable=bool(layer.trainable), weights=weights, children=children,
                 container=_is_container(layer), details=_details(layer), affine=affine)


def _weights(layer) -> tuple[Weight, ...]:
    # A variable trains when its layer does only if the layer created it as trainable; Keras
    # keeps those in `_trainable_variables` (a frozen layer flips their flags, so `v.trainable`
    # alone cannot tell a frozen kernel from BatchNormalization's moving mean).
    capable = {id(v) for sub in layer._flatten_layers(include_self=True)
               for v in getattr(sub, "_trainable_variables", ())}
    out = []
    for v in layer.weights:
        c = getattr(v, "constraint", None)
        frozen = c if isinstance(c, FrozenEntries) else None
        out.append(Weight(v.name, tuple(int(d) for d in v.shape), id(v) in capable,
                          frozen.indices if frozen else (),
                          int(frozen.values.size) if frozen else 0))
    return tuple(out)


def _details(layer) -> tuple[tuple[str, str], ...]:
    # Only what decides a part's output axis (surgery/parts.py reads EinsumDense's equation).
    if type(layer).__name__ != "EinsumDense":
        return ()
    return axis_details("EinsumDense", layer.get_config())


def write(model, plan: Plan, objects: dict[str, object]) -> None:
    """Set every layer's flag to its planned state and check Keras agrees.

    Pre-order (a container before what it holds): the recursive setter on a container resets its
    children, and the children's own writes that follow put their decided state back.
    Class and constraints are compared with the live layers, not with the plan's description of
    them: a training schedule writes the plans of successive phases, all computed against the
    model as it was at the start, into the same live model.
    """
    model.trainable = plan.root_after
    for lp in plan.layers:
        if lp.batchnorm is not None:
            switch(objects[lp.path], lp.affine)
        objects[lp.path].trainable = lp.after
    # Entries frozen inside trainable layers: one constraint per weight, installed from the final
    # state (and removed where a layer no longer has any), never per rule.
    for lp in plan.layers:
        if lp.layer.children:
            continue
        wanted = {p.weight: p.indices for p in lp.frozen_parts}
        carried = {w.name: w.frozen for w in _weights(objects[lp.path]) if w.frozen}
        for weight in sorted(set(wanted) | set(carried)):
            if wanted.get(weight, ()) != carried.get(weight, ()):
                set_frozen(objects[lp.path], weight, wanted.get(weight, ()))

    expected = set()
    for lp in plan.layers:
        if not lp.layer.children and lp.after:
            expected.update(id(w) for w in objects[lp.path].trainable_weights)
    actual = {id(w) for w in model.trainable_weights}
    if expected != actual:
        shared = _shared_paths(objects)
        detail = (f"; layer objects shared between paths {shared} take one state only"
                  if shared else "")
        raise SurgeryError(
            f"Keras reports {len(actual)} trainable weights where the plan has {len(expected)}"
            f"{detail}")


def _shared_paths(objects: dict[str, object]) -> list[tuple[str, str]]:
    seen: dict[int, str] = {}
    pairs = []
    for path, obj in objects.items():
        if id(obj) in seen:
            pairs.append((seen[id(obj)], path))
        else:
            seen[id(obj)] = path
    return pairs


def load(source: str, *, safe_mode: bool = True):
    """A model from a `.keras`/`.h5` file, or `keras.applications.NAME` built with weights=None.

    Keras safe mode stays on unless the caller turns it off: a Lambda layer's code is refused."""
    with _native_stderr_captured():
        return _load(source, safe_mode)


def _load(source: str, safe_mode: bool):
    if source.startswith(APPLICATIONS_PREFIX):
        return _application(source)
    if not os.path.exists(source):
        raise ModelError(source, "no such file")
    if os.path.isdir(source):
        raise ModelError(source, "is a directory, not a model file (.keras or .h5)")
    if not source.endswith((".keras", ".h5", ".hdf5")):
        raise ModelError(source, "unsupported model format: expected a .keras or .h5 file, or "
                         "keras.applications.NAME")
    try:
        model = keras.models.load_model(source, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types for bad files; the user needs one line.
        raise ModelError(source, f"cannot load the model: {_load_problem(exc)}") from None
    if not isinstance(model, keras.Model):
        raise ModelError(source, f"holds a {type(model).__name__}, not a Keras model")
    return model


def _application(source: str):
    name = source[len(APPLICATIONS_PREFIX):]
    builders = {n: getattr(keras.applications, n) for n in dir(keras.applications)
                if n[:1].isupper() and callable(getattr(keras.applications, n))}
    if name not in builders:
        from ..suggest import suggest

        close = suggest(name, list(builders))
        hint = f"; did you mean {APPLICATIONS_PREFIX}{close[0]}?" if close else ""
        raise ModelError(source, f"keras.applications has no model '{name}'{hint}")
    try:
        return builders[name](weights=None)
    except Exception as exc:
        raise ModelError(source, f"cannot build the model: {_first_line(exc)}") from None


def save(model, path: str) -> None:
    """Save to ``path`` (which must not be the final destination: see cli's atomic writer).

    Keras stages a .keras file in a folder of the system temp dir and does not remove it when
    interrupted; a private scratch folder, removed on every way out, keeps TMPDIR clean."""
    with tempfile.TemporaryDirectory(prefix="surgery-") as scratch:
        previous = tempfile.tempdir
        tempfile.tempdir = scratch
        try:
            model.save(path)
        finally:
            tempfile.tempdir = previous


def _load_problem(exc: BaseException) -> str:
    """One line on why Keras could not load a file. Keras's first line for a missing custom
    class is about the outer model ("could not be deserialized"); the class is named deeper."""
    missing = re.search(r"Could not locate class '([^']+)'", str(exc))
    if missing:
        return (f"the class '{missing.group(1)}' is not registered: import the module that "
                f"defines it (decorated with @keras.saving.register_keras_serializable) before "
                f"loading")
    if str(exc).startswith("File not found: filepath="):
        # What Keras says of any .keras file that is not a readable zip, though the file is there.
        return "not a readable .keras file (a zip archive): truncated or damaged?"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
