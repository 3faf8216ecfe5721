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
import zlib

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
from .. import lora as lora_spec  # noqa: E402
from ..plan import Plan  # noqa: E402
from ..bn_policies import BATCHNORM_CLASSES  # noqa: E402
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
    base = _lora_class(layer) if getattr(layer, "lora_enabled", False) else None
    lora_weight = lora_spec.LORA_WEIGHTS[base][0] if base else None
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
        # LoRA's adapted weight is held off whatever its layer's flag: a rule that unfreezes a
        # frozen LoRA layer must not train it. Its other weights off while it trains (a bias
        # the rules froze beside factors that train) are surgery's doing, not the model's.
        merged = can and v.name == lora_weight and not now
        out.append(Weight(
            v.name, shapes[v.name], can, indices, entries,
            flag=now if now != (can and chain) else None,
            held=(can and bool(layer.trainable) and not now and not whole and base is None)
            or merged,
            path=str(getattr(v, "path", "") or "")))
    return variables, tuple(out)


def _details(layer) -> tuple[tuple[str, str], ...]:
    # What decides a part's output axis (surgery/parts.py reads EinsumDense's equation), and
    # whether LoRA is on (its config re-enables it on load: saved_state.unrestored).
    out = []
    if type(layer).__name__ == "EinsumDense":
        out = list(axis_details("EinsumDense", layer.get_config()))
    base = _lora_class(layer)
    if base is not None and base != type(layer).__name__:
        out.append((lora_spec.BASE, base))
    if getattr(layer, "lora_enabled", False):
        out.append((lora_spec.RANK, str(layer.lora_rank)))
        out.append((lora_spec.ALPHA, repr(float(layer.lora_alpha))))
    elif base is not None:
        blocked = _lora_blocked(layer, base)
        if blocked:
            out.append((lora_spec.BLOCKED, blocked))
    return tuple(out)


def _lora_class(layer) -> str | None:
    """The Keras class whose LoRA the layer has (a subclass takes its parent's), or None."""
    for cls in type(layer).__mro__:
        if cls.__name__ in lora_spec.LORA_WEIGHTS and cls.__module__.startswith("keras."):
            return cls.__name__
    return None


def _lora_blocked(layer, base: str) -> str:
    """Why Keras's enable_lora would refuse the layer ("" where it would not)."""
    attr = "embeddings_constraint" if base == "Embedding" else "kernel_constraint"
    constraint = getattr(layer, attr, None)
    if constraint is not None and not isinstance(constraint, FrozenEntries):
        return f"a {attr} ({type(constraint).__name__})"
    if getattr(layer, "quantization_mode", None):
        return f"quantized weights ({layer.quantization_mode})"
    return ""


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
    _enable_lora(plan, objects)
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


def _enable_lora(plan: Plan, objects: dict[str, object]) -> None:
    """Create the factors of every adapter the plan adds, with Keras's own enable_lora (A from
    a He-uniform initializer seeded by the layer's path, so that a run is reproducible; B zero,
    which leaves the layer's outputs as they were), and list them among the layer's variables
    where the adapted tree lists them: after its own weights."""
    for lp in plan.layers:
        ad = lp.adapter
        if ad is None or not ad.new:
            continue
        layer = objects[lp.path]
        if getattr(layer, "lora_enabled", False):
            # A schedule writes each phase's plan, all made against the model before LoRA:
            # the first write created these factors.
            if (layer.lora_rank, float(layer.lora_alpha)) != (ad.rank, ad.alpha):
                raise SurgeryError(f"'{lp.path}' has LoRA rank {layer.lora_rank} alpha "
                                   f"{float(layer.lora_alpha):g}; the plan was made for the "
                                   f"model without it")
        else:
            layer.enable_lora(ad.rank, lora_alpha=ad.alpha,
                              a_initializer=_a_initializer(lp.path))
        factors = [getattr(layer, ad.a.name), getattr(layer, ad.b.name)]
        listed = objects.variables[lp.path]
        if not any(v is factors[0] for v in listed):
            objects.variables[lp.path] = list(listed) + factors


def _a_initializer(path: str):
    return keras.initializers.HeUniform(seed=zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


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
    if len(nodes) == len(state.layers) and any(rec.lora for rec in state.layers):
        _restore_lora(nodes, state, objects, where)
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


def _restore_lora(nodes, state: SavedState, objects, where: str) -> None:
    """Give back the LoRA recorded in the file, which no saved form holds whole: where the
    loaded layer has none (a keras_hub model), enable it; set the recorded alpha (Keras resets
    a Dense's or an Embedding's to the rank); and where both factors came back zero, as Keras
    loads them (the file holds the merged kernel only), draw A again from the initializer, with
    B zero: the outputs stay those of the merged kernel and the factors train again (with both
    zero, neither gets a gradient). The classes and shapes are checked after, by `_mismatch`."""
    for node, rec in zip(nodes, state.layers):
        if rec.lora is None or node.cls != rec.cls:
            continue
        rank, alpha = rec.lora
        layer = objects[node.path]
        if _lora_class(layer) is None:
            continue  # another class: _mismatch reports it
        if not getattr(layer, "lora_enabled", False):
            layer.enable_lora(rank, lora_alpha=alpha, a_initializer=_a_initializer(node.path))
        elif layer.lora_rank != rank:
            raise ModelError(where, f"'{node.path}' has LoRA rank {layer.lora_rank}, the state "
                             f"recorded in it ({ENTRY}) rank {rank}")
        layer.lora_alpha = alpha
        _redraw_a(layer, _lora_class(layer), node.path)


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
    elif isinstance(model, keras.Model):
        revive_lora(model, str(path))
    return model


def keep_lora_on_save(model) -> None:
    """Make ``model.save`` to a .keras file record surgery's state entry too (saved_state.py),
    as `surgery apply` does, taken from the model as it is when saved: without it a keras_hub
    model saved after training comes back without its LoRA (its saved form is constructor
    arguments), and its trained factors lost from the file but for the merged kernel. The
    model's own ``save`` runs first, unchanged; the entry is added to the file it wrote."""
    if getattr(model, "_surgery_keeps_state", False):
        return
    original = model.save

    def save(filepath, *args, **kwargs):
        result = original(filepath, *args, **kwargs)
        path = os.fspath(filepath)
        if path.endswith(".keras") and os.path.isfile(path):
            from ..ir import Spec
            from ..plan import plan_spec
            from ..saved_state import record

            tree, _ = describe(model)
            record(path, plan_spec(Spec(rules=(), source=""), tree))
        return result

    # Past Keras's attribute tracking: a function is no state of the model.
    object.__setattr__(model, "save", save)
    object.__setattr__(model, "_surgery_keeps_state", True)
    object.__setattr__(model, _PLAIN_SAVE, original)


_PLAIN_SAVE = "_surgery_plain_save"  # the model's own save, for `save` (which records itself)


def revive_lora(model, path: str) -> tuple[str, ...]:
    """After a plain load of a file without surgery's record (``model.save`` after
    ``surgery.apply``): give each LoRA layer the alpha its config holds (Keras resets a Dense's
    and an Embedding's to the rank when it builds them) and, where both factors came back zero,
    A drawn again (see `_restore_lora`), so that they train. The layers changed, by path."""
    alphas = _config_alphas(path) if str(path).endswith(".keras") else {}
    tree, objects = describe(model)
    changed = []
    for node in tree.layers():
        layer = objects[node.path]
        base = _lora_class(layer) if getattr(layer, "lora_enabled", False) else None
        if base is None:
            continue
        if node.path in alphas and alphas[node.path] != float(layer.lora_alpha):
            layer.lora_alpha = alphas[node.path]
            changed.append(node.path)
        if _redraw_a(layer, base, node.path) and node.path not in changed:
            changed.append(node.path)
    return tuple(changed)


def _redraw_a(layer, base: str, path: str) -> bool:
    a, b = (getattr(layer, name) for name in lora_spec.LORA_WEIGHTS[base][1:])
    if keras.ops.convert_to_numpy(a).any() or keras.ops.convert_to_numpy(b).any():
        return False
    a.assign(_a_initializer(path)(a.shape, dtype=a.dtype))
    return True


def _config_alphas(path: str) -> dict[str, float]:
    """surgery path -> ``lora_alpha`` of each layer config in a .keras file's config.json that
    has one (the configs of Functional and Sequential models, which list their layers)."""
    from .archive.zip_io import ArchiveFile
    from ..errors import ArchiveUnsupported, DamagedArchive

    try:
        with ArchiveFile(path) as archive:
            cfg = archive.config()
    except (ArchiveUnsupported, DamagedArchive, OSError):
        return {}
    out: dict[str, float] = {}
    stack = [("", cfg)]
    while stack:
        prefix, entry = stack.pop()
        conf = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(conf, dict):
            continue
        for child in conf.get("layers") or ():
            c = child.get("config") if isinstance(child, dict) else None
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                continue
            where = f"{prefix}/{c['name']}" if prefix else c["name"]
            alpha = c.get("lora_alpha")
            if c.get("lora_rank") and isinstance(alpha, (int, float)) and alpha > 0:
                out[where] = float(alpha)
            stack.append((where, child))
    return out


def load(source: str, *, safe_mode: bool = True):
    """A model from a `.keras`/`.h5` file, or `keras.applications.NAME` built with weights=None.

    Keras safe mode stays on unless the caller turns it off: a Lambda layer's code is refused."""
    with _native_stderr_captured():
        return _load(source, safe_mode)


def _load(source: str, safe_mode: bool):
    if source.startswith(APPLICATIONS_PREFIX):
        return _application(source)
    # The path itself was checked before Keras was imported (modelfile._check_loadable).
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
    else:
        revive_lora(model, source)
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


def save(model, path: str, suffix: str = "") -> None:
    """Save to ``path`` in the format of ``suffix`` (by default its own): not the destination
    but its temporary, ``/proc/self/fd/N`` where anonymous (surgery/atomic.py).

    Keras stages a .keras file in a folder of the system temp dir and does not remove it when
    interrupted; a private scratch folder, removed on every way out, keeps TMPDIR clean."""
    with tempfile.TemporaryDirectory(prefix="surgery-") as scratch:
        previous = tempfile.tempdir
        tempfile.tempdir = scratch
        try:
            if suffix == ".keras" and not path.endswith(".keras"):
                # What `model.save(PATH.keras)` does once it has checked the suffix: open the
                # path and save into the file (keras/src/saving/saving_api.py, saving_lib.py).
                from keras.src.saving import saving_lib

                with open(path, "r+b") as f:
                    saving_lib.save_model(model, f)
            elif suffix in (".h5", ".hdf5") and not path.endswith(suffix):
                # And what `model.save(PATH.h5)` does then, into an h5py file on the open file:
                # HDF5 itself cannot open /proc/self/fd/N ("can't retrieve real path").
                import h5py
                from keras.src.legacy.saving import legacy_h5_format

                with open(path, "r+b") as raw, h5py.File(raw, "w") as f:
                    legacy_h5_format.save_model_to_hdf5(model, f)
            else:
                # The model's own save: `surgery apply` records the state itself, from its plan.
                getattr(model, _PLAIN_SAVE, model.save)(path)
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
