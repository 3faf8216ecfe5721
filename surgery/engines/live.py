"""The Keras edge: a live ``keras.Model`` <-> LayerTree, flag writing, loading and saving.

This is the only module that imports Keras (and through it TensorFlow). Everything it hands to
the rest of surgery is plain data: a `LayerTree` to resolve against, version strings for the
manifest. Writing follows a `Plan` computed beforehand, so no decision is made here.
"""

from __future__ import annotations

import contextlib
import math
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
from ..layerparts import whole_selection  # noqa: E402
from ..plan import Plan  # noqa: E402
from ..resolve import BATCHNORM_CLASSES  # noqa: E402
from ..saved_state import ENTRY, SavedState, installs_constraint  # noqa: E402
from ..saved_state import read as read_state  # noqa: E402
from ..tree import Layer, LayerTree, Weight  # noqa: E402

__all__ = ["describe", "write", "restore", "load", "load_model", "save", "APPLICATIONS_PREFIX"]

from . import APPLICATIONS_PREFIX  # noqa: E402,F401  (re-exported: live.APPLICATIONS_PREFIX)


def describe(model) -> tuple[LayerTree, dict[str, object]]:
    """The model as a LayerTree, and each path's live layer object (for `write`).

    The tree goes all the way down (tree.py): a nested model's children are ``model.layers``,
    any other layer's the layers Keras tracks in it, in its order. Paths join names, so inside a
    composite layer they are the prefixes of Keras's own ``variable.path``
    (``transformer_layer_0/self_attention_layer/query/kernel``); inside a nested model they keep
    the model's name, which Keras's variable paths leave out."""
    objects = _Objects()
    root = _node(model, "", 0, objects, True, False, set(), is_root=True)
    return LayerTree(root), objects


class _Objects(dict):
    """path -> live layer, and path -> the layer's own variables as the tree lists them."""

    def __init__(self):
        super().__init__()
        self.variables: dict[str, list] = {}


def _is_container(layer) -> bool:
    # What '/' walks into as a nested model: its children are model.layers. Every other layer
    # that holds layers (MultiHeadAttention, a keras_hub transformer block) is a composite.
    return isinstance(layer, keras.Model)


def _sublayers(layer) -> list:
    if _is_container(layer):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _lists_its_layers(layer) -> bool:
    """Whether the model's saved config holds each of its layers' configs (so their flags come
    back from the file), rather than the constructor arguments it is rebuilt from."""
    from keras.src.models.functional import Functional, functional_like_constructor

    kind = type(layer)
    if isinstance(layer, keras.Sequential):
        return kind.get_config is keras.Sequential.get_config
    return isinstance(layer, Functional) and kind.get_config is Functional.get_config and \
        functional_like_constructor(kind)


def _node(layer, parent_path: str, index: int, objects: _Objects, parent_chain: bool,
          rebuilt: bool, seen: set, is_root: bool = False, name: str = "") -> Layer:
    name = name or layer.name
    path = "" if is_root else (f"{parent_path}/{name}" if parent_path else name)
    objects[path] = layer
    chain = parent_chain and bool(layer.trainable)
    variables, weights = _weights(layer, chain, seen)
    objects.variables[path] = variables
    inner_rebuilt = rebuilt or not (_is_container(layer) and _lists_its_layers(layer))
    children = []
    names: set[str] = set()
    for i, sub in enumerate(_sublayers(layer)):
        # Keras keeps a model's layer names unique, not a composite layer's: a repeated name
        # gets its position, so that every path names one layer.
        own = sub.name if sub.name not in names else f"{sub.name}@{i}"
        names.add(own)
        children.append(_node(sub, path, i, objects, chain, inner_rebuilt, seen, name=own))
    affine = is_affine(layer)
    # An affine BatchNormalization is described as the BatchNormalization it is, plus the flag:
    # selectors ('type:BatchNormalization') and fingerprints do not depend on the policy.
    cls = "BatchNormalization" if affine else type(layer).__name__
    return Layer(name=name, path=path, cls=cls, index=index, trainable=bool(layer.trainable),
                 weights=weights, children=tuple(children), container=_is_container(layer),
                 details=_details(layer), affine=affine, rebuilt=rebuilt and not is_root)


def _own_variables(layer) -> list:
    """The variables the layer created itself (not its sublayers'), each once."""
    out, ids = [], set()
    for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        if id(v) not in ids:
            ids.add(id(v))
            out.append(v)
    return out


# A variable whose flag surgery turned off to freeze it whole (plan.FrozenPart covering all of
# it): not the model's own choice, so a later rule that unfreezes its layer turns it on again.
_FROZEN_WHOLE = "_surgery_frozen_whole"


def _weights(layer, chain: bool, seen: set) -> tuple[list, tuple[Weight, ...]]:
    # A variable trains when its layer does only if the layer created it as trainable; Keras
    # keeps those in `_trainable_variables` (a frozen layer flips their flags, so `v.trainable`
    # alone cannot tell a frozen kernel from BatchNormalization's moving mean). A variable that
    # two layers track is described once, where it is met first, as Keras counts it.
    capable = {id(v) for v in layer._trainable_variables}
    variables = [v for v in _own_variables(layer) if id(v) not in seen]
    seen.update(id(v) for v in variables)
    shapes = {v.name: tuple(int(d) for d in v.shape) for v in variables}
    out = []
    for v in variables:
        c = getattr(v, "constraint", None)
        indices, entries = (c.indices, int(c.values.size)) if isinstance(c, FrozenEntries) \
            else ((), 0)
        now = bool(v.trainable)
        whole = getattr(v, _FROZEN_WHOLE, False) and not now  # (a flag set on since: no more)
        if whole and not indices:  # frozen whole by its flag alone: every position of it
            indices = whole_selection(layer.name, type(layer).__name__, shapes,
                                      dict(_details(layer)), v.name).indices
            entries = math.prod(shapes[v.name])
        can = id(v) in capable
        out.append(Weight(
            v.name, shapes[v.name], can, indices, entries,
            flag=now if now != (can and chain) else None,
            held=can and bool(layer.trainable) and not now and not whole,
            path=str(getattr(v, "path", "") or "")))
    return variables, tuple(out)


def _details(layer) -> tuple[tuple[str, str], ...]:
    # What decides a part's output axis (surgery/parts.py reads EinsumDense's equation), and
    # whether LoRA is on (its config re-enables it on load: saved_state.unrestored).
    out = []
    if type(layer).__name__ == "EinsumDense":
        out = list(axis_details("EinsumDense", layer.get_config()))
    if getattr(layer, "lora_enabled", False):
        out.append(("lora_rank", str(layer.lora_rank)))
    return tuple(out)


def write(model, plan: Plan, objects: dict[str, object]) -> None:
    """Set every layer's flag and every variable's to its planned state and check Keras agrees.

    Pre-order (a layer before what it holds): the recursive setter on a layer resets what it
    holds, and the writes that follow put their decided state back; then each variable's own
    flag, which the setters also reset: what the model holds off (LoRA's kernels) stays off,
    and a weight frozen whole is its variable's flag. Class and constraints are compared with
    the live layers, not with the plan's description of them: a training schedule writes the
    plans of successive phases, all computed against the model as it was at the start, into
    the same live model.
    """
    model.trainable = plan.root_after
    for lp in plan.layers:
        if lp.batchnorm is not None:
            switch(objects[lp.path], lp.affine)
        objects[lp.path].trainable = lp.after
    # Entries frozen inside trainable layers: one constraint per weight, installed from the final
    # state (and removed where a layer no longer has any), never per rule.
    for lp in plan.layers:
        if not lp.layer.weights:
            continue
        layer = objects[lp.path]
        wanted = {p.weight: p.indices for p in lp.frozen_parts if installs_constraint(lp, p)}
        carried = _carried(layer)
        for weight in sorted(set(wanted) | set(carried)):
            if wanted.get(weight, ()) != carried.get(weight, ()):
                set_frozen(layer, weight, wanted.get(weight, ()))
    expected = set()
    for lp in plan.layers:
        trains = plan.trains(lp)
        for w, v in zip(lp.layer.weights, objects.variables[lp.path]):
            if trains[w.name]:
                expected.add(id(v))
            if bool(v.trainable) != trains[w.name]:
                v.trainable = trains[w.name]
            whole = any(p.weight == w.name and p.entries == w.size for p in lp.frozen_parts)
            if whole or getattr(v, _FROZEN_WHOLE, False):
                setattr(v, _FROZEN_WHOLE, whole)
    actual = {id(w) for w in model.trainable_weights}
    if expected != actual:
        shared = _shared_paths(objects)
        detail = (f"; layer objects shared between paths {shared} take one state only"
                  if shared else "")
        raise SurgeryError(
            f"Keras reports {len(actual)} trainable weights where the plan has {len(expected)}"
            f"{detail}")


def _carried(layer) -> dict[str, tuple[int, ...]]:
    out = {}
    for v in _own_variables(layer):
        c = getattr(v, "constraint", None)
        if isinstance(c, FrozenEntries):
            out[v.name] = c.indices
    return out


def _shared_paths(objects: dict[str, object]) -> list[tuple[str, str]]:
    seen: dict[int, str] = {}
    pairs = []
    for path, obj in objects.items():
        if id(obj) in seen:
            pairs.append((seen[id(obj)], path))
        else:
            seen[id(obj)] = path
    return pairs


def restore(model, state: SavedState, where: str) -> None:
    """Put a loaded model in the state recorded in its file (saved_state.py), checking first
    that the model is the one recorded: the same layers with weights or sublayers, in order,
    with the same classes and weight shapes. ``where`` names the file in errors."""
    tree, objects = describe(model)
    nodes = [n for n in tree.layers() if n.weights or n.children]
    problem = _mismatch(nodes, state)
    if problem:
        raise ModelError(where, f"the state recorded in it ({ENTRY}) is for another model: "
                         f"{problem}")
    model.trainable = state.model_trainable
    for node, rec in zip(nodes, state.layers):
        layer = objects[node.path]
        if rec.cls in BATCHNORM_CLASSES and rec.affine != node.affine:
            switch(layer, rec.affine)
        layer.trainable = rec.trainable
    expected = set()
    for node, rec in zip(nodes, state.layers):
        layer = objects[node.path]
        frozen = dict(rec.frozen)
        carried = _carried(layer)
        for weight in sorted(set(frozen) | set(carried)):
            if frozen.get(weight, ()) != carried.get(weight, ()):
                set_frozen(layer, weight, frozen.get(weight, ()))
        for v, (name, _, trains) in zip(objects.variables[node.path], rec.weights):
            v.trainable = trains
            setattr(v, _FROZEN_WHOLE, name in rec.whole)
            if trains:
                expected.add(id(v))
    if {id(v) for v in model.trainable_weights} != expected:
        raise ModelError(where, f"Keras trains {len(model.trainable_weights)} weights after "
                         f"restoring the recorded state, which has {len(expected)}")


def _mismatch(nodes, state: SavedState) -> str:
    if len(nodes) != len(state.layers):
        return (f"{len(state.layers)} layers with weights or sublayers recorded, the model has "
                f"{len(nodes)}")
    for node, rec in zip(nodes, state.layers):
        have = tuple((w.name, w.shape) for w in node.weights)
        want = tuple((name, shape) for name, shape, _ in rec.weights)
        if node.cls != rec.cls or have != want:
            return (f"'{rec.path}' is a {rec.cls} with weights {list(want)} in the record, the "
                    f"model has '{node.path}', a {node.cls} with weights {list(have)}")
    return ""


def load_model(path, **kwargs):
    """``keras.models.load_model(path, **kwargs)``, then the state surgery recorded in the file
    (saved_state.py) restored and checked: what `surgery apply` planned, where the file's saved
    form cannot hold it (keras_hub models, MultiHeadAttention's sublayers, variable flags)."""
    with _native_stderr_captured():
        model = keras.models.load_model(path, **kwargs)
    state = read_state(str(path))
    if state is not None and isinstance(model, keras.Model):
        restore(model, state, str(path))
    return model


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
    # A file `surgery apply` wrote with the state its saved form cannot hold: every command
    # sees the model as surgery.load_model gives it.
    try:
        state = read_state(source) if source.endswith(".keras") else None
    except ValueError as exc:
        raise ModelError(source, str(exc)) from None
    if state is not None:
        restore(model, state, source)
    return model


def _application(source: str):
    from ..appcall import parse_application

    name, kwargs = parse_application(source)
    builders = {n: getattr(keras.applications, n) for n in dir(keras.applications)
                if n[:1].isupper() and callable(getattr(keras.applications, n))}
    if name not in builders:
        from ..suggest import suggest

        close = suggest(name, list(builders))
        hint = f"; did you mean {APPLICATIONS_PREFIX}{close[0]}?" if close else ""
        raise ModelError(source, f"keras.applications has no model '{name}'{hint}")
    try:
        return builders[name](**kwargs, weights=None)
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
