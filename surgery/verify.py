"""A manifest against a model, and two manifests against each other: `verify` and `diff`.

The manifest was read by its one decoder (manifest_read.py), which checked its structure once,
so nothing here meets a missing key or a value of the wrong type. `verify` checks the manifest
against itself before comparing it with the model: everything a manifest records but the
input's sha256 follows from its spec text and the model's structure, so verify plans the spec
again and reports any field that does not follow (an altered manifest), and only then every
difference in the model's state. No Keras here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from typing import Optional

from .errors import SpecError
from .ir import BN_AFFINE, Spec
from .lora import ALPHA as LORA_ALPHA
from .lora import LORA_WEIGHTS, lora_base
from .lora import RANK as LORA_RANK
from .manifest import Manifest, architecture_fingerprint, build_manifest, phase_layers
from .parse import parse
from .parts import PartError
from .parts import select as select_part
from .plan import Plan, compact_ranges, plan_spec
from .report import state_word as _state
from .spec_json import compile_spec
from .tree import LayerTree

__all__ = ["verify", "check_manifest", "model_differences", "state_differences",
           "matching_phase", "diff"]


def verify(manifest: Manifest, tree: LayerTree, *, epoch: Optional[int] = None) -> list[str]:
    """Every problem, one line each: the manifest's own (`check_manifest`), then the model's
    differences from it (`model_differences`)."""
    return check_manifest(manifest, tree) + model_differences(manifest, tree, epoch=epoch)


def model_differences(manifest: Manifest, tree: LayerTree, *,
                      epoch: Optional[int] = None) -> list[str]:
    """The model's architecture if its fingerprint is not the recorded one, then every
    difference between the trainable state the manifest records (at ``epoch`` of its schedule,
    if given) and the model's (`state_differences`)."""
    lines = []
    recorded, actual = manifest.data["model"]["architecture"], architecture_fingerprint(tree)
    if recorded != actual:
        lines.append(f"architecture: the model's fingerprint {actual[:12]} is not the "
                     f"manifest's {recorded[:12]} (layers, classes or weight shapes differ)")
    if manifest.data["model"]["name"] != tree.root.name:
        lines.append(f"name: the manifest's model is {manifest.data['model']['name']!r}, this "
                     f"one is {tree.root.name!r}")
    return lines + state_differences(manifest, tree, epoch=epoch)


def check_manifest(manifest: Manifest, tree: LayerTree) -> list[str]:
    """What in the manifest does not follow from its own spec text and the model's structure,
    one line each, starting ``manifest:``: a manifest altered after `apply` wrote it.

    The spec text must have its sha256 and compile to the recorded operations. When the model
    has the recorded architecture, the spec is planned again on it, set to the state the
    manifest records before the surgery (each layer's flag before; the entries frozen inside
    it and its BatchNormalization class as recorded after, which a spec that starts from them
    decides the same way), and every recorded field must be what that plan gives: rules,
    layers, totals, ``model_trainable``, notes, warnings, the schedule. Otherwise only what the
    manifest says of itself is checked (its totals against its layers, ``model_trainable``)."""
    data = manifest.data
    lines = []
    spec_data = data["spec"]
    if hashlib.sha256(spec_data["text"].encode("utf-8")).hexdigest() != spec_data["sha256"]:
        lines.append("manifest: spec.sha256 is not the sha256 of spec.text (altered?)")
    try:
        spec = _recorded_spec(spec_data)
    except SpecError as exc:
        return lines + [f"manifest: spec.text is not a spec (altered?): {exc}"]
    if compile_spec(spec) != data["compiled"]:
        lines.append("manifest: compiled is not what spec.text compiles to (altered?)")
    replanned = None
    if data["model"]["architecture"] == architecture_fingerprint(tree):
        replanned = _replanned(manifest, spec, tree)
    if replanned is None:
        return lines + _self_inconsistencies(data)
    return lines + replanned


def _recorded_spec(spec_data: dict) -> Spec:
    # The reader by suffix, as load_spec chooses it for a file.
    if spec_data["file"].endswith((".yaml", ".yml")):
        from .yaml_read import parse_yaml

        return parse_yaml(spec_data["text"], spec_data["file"])
    return parse(spec_data["text"], spec_data["file"])


class _Unrecorded(Exception):
    """The model has a layer the manifest's layers do not account for."""


class _Inconsistent(Exception):
    """What the manifest records of a layer cannot be true of it; ``str(exc)`` says what."""


def _replanned(manifest: Manifest, spec: Spec, tree: LayerTree) -> Optional[list[str]]:
    """Fields the spec planned again does not give (see `check_manifest`); None when the model's
    layers are not the recorded ones (`state_differences` says how)."""
    data = manifest.data
    try:
        given = _as_given(tree, {e["path"]: e for e in data["layers"]})
    except _Unrecorded:
        return None
    except _Inconsistent as exc:
        return [f"manifest: {exc} (altered?)"]
    try:
        plan = plan_spec(spec, given, allow_empty=True)
    except SpecError as exc:
        return [f"manifest: its spec does not plan on this model (altered?): {exc}"]
    versions = {k: v for k, v in data["versions"].items() if k != "surgery"}
    exact_before = not any(w.frozen for n in given.layers() for w in n.weights)

    def rebuilt(p: Plan) -> dict:
        return build_manifest(p, spec, model_source=data["model"]["source"],
                              model_sha256=data["model"]["sha256"],
                              model_name=data["model"]["name"], versions=versions,
                              surgery_version=data["versions"].get("surgery"),
                              output_sha256=data.get("output", {}).get("sha256")).data

    # `surgery.apply(model, spec, epoch=k)` records phase k's state as the layer table.
    candidates = [plan] + [replace(ph.plan, phases=plan.phases, diagnostics=plan.diagnostics)
                           for ph in plan.phases[1:]]
    best = None
    for candidate in candidates:
        found = _unfollowed(data, rebuilt(candidate), exact_before)
        if best is None or len(found) < len(best):
            best = found
        if not found:
            break
    return best


def _as_given(tree: LayerTree, entries: dict) -> LayerTree:
    def rebuild(node):
        entry = entries.get(node.path) if node.path else None
        if node.path and entry is None:
            raise _Unrecorded(node.path)
        kids = tuple(rebuild(c) for c in node.children)
        if node.children or entry is None:
            return replace(node, trainable=True if entry is None else entry["before"],
                           children=kids)
        parts = {p["weight"]: p for p in entry.get("frozen_parts", ())}
        where = f"layers[{node.path!r}].frozen_parts"
        unknown = sorted(set(parts) - {w.name for w in node.weights})
        if unknown:
            raise _Inconsistent(f"{where} names {unknown[0]!r}, a weight the layer does not have")
        if parts and not entry["trainable"]:
            raise _Inconsistent(f"{where}: the layer is recorded frozen, with entries frozen "
                                f"inside it")
        weights = tuple(replace(w, frozen=_positions(parts[w.name], _size(node, w.name), where),
                                frozen_entries=parts[w.name]["entries"])
                        if w.name in parts else replace(w, frozen=(), frozen_entries=0)
                        for w in node.weights)
        node = replace(node, trainable=entry["before"], weights=weights,
                       affine=bool(entry.get("affine", False)))
        return _without_new_lora(node, entry)

    return LayerTree(rebuild(tree.root))


def _without_new_lora(node, entry: dict):
    """The layer before the run that gave it LoRA (``lora.new``): without the factors and the
    rank, its adapted weight following its flag again."""
    recorded = entry.get("lora")
    if not recorded or not recorded.get("new"):
        return node
    base = lora_base(node)
    if base is None or dict(node.details).get(LORA_RANK) is None:
        raise _Inconsistent(f"layers[{node.path!r}].lora: the model's layer has no LoRA")
    weight, a_name, b_name = LORA_WEIGHTS[base]
    # Every weight followed the layer's flag before: the flags off now are the plan's.
    weights = tuple(replace(w, flag=None, held=False)
                    for w in node.weights if w.name not in (a_name, b_name))
    details = tuple(kv for kv in node.details if kv[0] not in (LORA_RANK, LORA_ALPHA))
    return replace(node, weights=weights, details=details)


def _size(node, weight: str) -> int:
    """The positions a weight's entries can be frozen at (its output channels, surgery/parts.py)."""
    try:
        (sel,) = select_part(node.path, node.cls, node.shapes, weight, None, dict(node.details))
    except PartError as exc:
        raise _Inconsistent(f"layers[{node.path!r}].frozen_parts: {exc}") from None
    return sel.size


_RUN = re.compile(r"([0-9]{1,12})(?:-([0-9]{1,12}))?")


def _positions(part: dict, size: int, where: str) -> tuple[int, ...]:
    """A recorded ``frozen`` range text (``0-31,40``) as positions, each checked against the
    weight's positions before any range is expanded (a crafted ``0-9999999999`` stays a line)."""
    out: set[int] = set()
    for run in part["frozen"].split(","):
        found = _RUN.fullmatch(run)
        a, b = (int(found[1]), int(found[2] or found[1])) if found else (0, -1)
        if not a <= b < size:
            raise _Inconsistent(f"{where}: {part['weight']}[{part['frozen'][:40]}] is not a "
                                f"range of the weight's {size} positions")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def _unfollowed(recorded: dict, rebuilt: dict, exact_before: bool) -> list[str]:
    lines = []
    for key in ("rules", "layers", "model", "model_trainable", "totals", "notes", "warnings",
                "schedule"):
        a, b = recorded.get(key), rebuilt.get(key)
        if key == "totals" and not exact_before:
            # The entries frozen inside layers before the surgery are not recorded (only
            # after), so the trainable totals before cannot be planned again: they are held
            # to what the layer table bounds instead (`_totals_before`).
            lines += _totals_before(recorded)
            a = {**a, "trainable_params": a["trainable_params"]["after"],
                 "non_trainable_params": a["non_trainable_params"]["after"]}
            b = {**b, "trainable_params": b["trainable_params"]["after"],
                 "non_trainable_params": b["non_trainable_params"]["after"]}
        where = _first_difference(a, b, key)
        if where is not None:
            path, was, should = where
            lines.append(f"manifest: {path} is {_shown(was)}, but its spec on this model gives "
                         f"{_shown(should)} (altered?)")
    return lines


def _leaves(data: dict) -> list[dict]:
    return [e for e in data["layers"] if not e["container"]]


def _totals_before(data: dict) -> list[str]:
    """The trainable totals before the surgery against what the layer table allows: together
    they are the parameters there were (all but the new LoRA factors), and no more trained than
    the layers whose flag was on held (entries frozen inside them then can only lower it)."""
    totals = data["totals"]
    trained = totals["trainable_params"]["before"]
    lines = _sum_before(totals)
    most = sum(e["params"] - (e["lora"]["params"] if e.get("lora", {}).get("new") else 0)
               for e in _leaves(data) if e["before"])
    if trained > most:
        lines.append(f"manifest: totals.trainable_params.before is {trained}, more than the "
                     f"{most} parameters of the layers it records trainable before (altered?)")
    return lines


def _sum_before(totals: dict) -> list[str]:
    was = totals["non_trainable_params"]["before"]
    should = totals["params"] - totals.get("new_params", 0) - totals["trainable_params"]["before"]
    return [] if was == should else [
        f"manifest: totals.non_trainable_params.before is {_shown(was)}, but its layers give "
        f"{_shown(should)} (altered?)"]


def _first_difference(a, b, where: str):
    """The first place two JSON values differ: (where, a's value there, b's); None if equal.
    The values are rebuilt manifests' or checked by the decoder: their depth is the schema's."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                label = f"{where}[{x['path']!r}]" if isinstance(x, dict) and "path" in x and \
                    isinstance(y, dict) and x.get("path") == y.get("path") else f"{where}[{i}]"
                return _first_difference(x, y, label)
        if len(a) != len(b):
            return f"{where} (length)", len(a), len(b)
    return where, a, b


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _self_inconsistencies(data: dict) -> list[str]:
    """Totals and ``model_trainable`` against the layer table (when the spec cannot be planned
    again on the model)."""
    leaves = _leaves(data)
    totals = data["totals"]
    checks = [
        ("totals.params", totals["params"], sum(e["params"] for e in leaves)),
        ("totals.trainable_params.after", totals["trainable_params"]["after"],
         sum(e["trainable_params"] for e in leaves)),
        ("totals.non_trainable_params.after", totals["non_trainable_params"]["after"],
         totals["params"] - totals["trainable_params"]["after"]),
        ("totals.new_params", totals.get("new_params", 0),
         sum(e["lora"]["params"] for e in leaves if e.get("lora", {}).get("new"))),
        ("model.layers", data["model"]["layers"], len(data["layers"])),
        ("model_trainable", data["model_trainable"],
         any(e["trainable"] for e in data["layers"] if "/" not in e["path"])),
    ]
    return [f"manifest: {name} is {_shown(was)}, but its layers give {_shown(should)} "
            f"(altered?)" for name, was, should in checks if was != should] + _sum_before(totals)


def state_differences(manifest: Manifest, tree: LayerTree, *,
                      epoch: Optional[int] = None) -> list[str]:
    """Every difference between the trainable state a manifest records and a model's, by path.
    With ``epoch``, the state its schedule gives at that epoch.

    Layers without weights are compared for presence and class only: their flag carries no
    meaning for training, and Keras does not keep an InputLayer's flag across save/load. A nested
    model is compared by what it trains (whether any layer inside it does), not by its own flag,
    which Keras may restore differently from its children's after a reload.
    """
    differences = []
    nodes = {n.path: n for n in tree.layers()}
    recorded = set()
    entries = manifest.layers if epoch is None else phase_layers(manifest, epoch)
    for entry in entries:
        path = entry["path"]
        recorded.add(path)
        node = nodes.get(path)
        if node is None:
            differences.append(f"{path}: in the manifest, missing from the model")
            continue
        if node.cls != entry["class"]:
            differences.append(f"{path}: the manifest has a {entry['class']}, the model a "
                               f"{node.cls}")
            continue
        # The class the plan gave the layer (plan._affine); a manifest written before it was
        # recorded has only the mode, which under a policy means the class where the layer trains.
        want_affine = entry["affine"] if "affine" in entry else (
            entry.get("batchnorm") == BN_AFFINE and bool(entry.get("trainable")))
        if want_affine != node.affine:
            word = lambda affine: "affine" if affine else "not affine"  # noqa: E731
            differences.append(f"{path}: the manifest has this BatchNormalization "
                               f"{word(want_affine)}, the model {word(node.affine)}")
        differences += _lora_differences(path, entry.get("lora"), node, tree)
        if node.params == 0:
            continue
        actual = _trains(tree, node)
        if actual != entry["trainable"]:
            differences.append(f"{path}: the manifest says {_state(entry['trainable'])}, the "
                               f"model has it {_state(actual)}")
            continue
        if not node.children and actual:
            recorded_parts = {p["weight"]: p["frozen"] for p in entry.get("frozen_parts", ())}
            model_parts = {w.name: compact_ranges(w.frozen) for w in node.weights if w.frozen}
            for weight in sorted(set(recorded_parts) | set(model_parts)):
                want, have = recorded_parts.get(weight, ""), model_parts.get(weight, "")
                if want != have:
                    differences.append(f"{path}.{weight}: the manifest has entries "
                                       f"[{want or 'none'}] frozen, the model [{have or 'none'}]")
    for path in nodes:
        if path not in recorded:
            differences.append(f"{path}: in the model, missing from the manifest")
    return differences


def _lora_differences(path: str, recorded: Optional[dict], node, tree: LayerTree) -> list[str]:
    details = dict(node.details)
    have = details.get(LORA_RANK)
    if recorded is None:
        return [f"{path}: the model has LoRA (rank {have}), the manifest none"] if have else []
    if have is None:
        return [f"{path}: the manifest has LoRA (rank {recorded['rank']}), the model none"]
    alpha = float(details.get(LORA_ALPHA, have))
    if (int(have), alpha) != (recorded["rank"], float(recorded["alpha"])):
        return [f"{path}: the manifest has LoRA rank {recorded['rank']} alpha "
                f"{float(recorded['alpha']):g}, the model rank {have} alpha {alpha:g}"]
    factors = LORA_WEIGHTS[lora_base(node)][1:]
    trains = all(tree.trains(node, w) for w in node.weights if w.name in factors)
    if trains != recorded["trains"]:
        return [f"{path}: the manifest has its LoRA factors {_state(recorded['trains'])}, the "
                f"model {_state(trains)}"]
    return []


def _trains(tree: LayerTree, node) -> bool:
    if not node.children:
        return tree.effectively_trainable(node)
    return any(_trains(tree, c) for c in node.children if c.params)


def matching_phase(manifest: Manifest, tree: LayerTree, *,
                   besides: Optional[int] = None) -> Optional[dict]:
    """The first later phase of the schedule whose state the model is in (other than the one
    at epoch ``besides``): for a checkpoint saved during training and checked without the
    epoch it was saved in. None if there is none."""
    for phase in (manifest.data.get("schedule") or [])[1:]:
        if phase["epoch"] != besides and not state_differences(manifest, tree,
                                                               epoch=phase["epoch"]):
            return phase
    return None


# --- diff ----------------------------------------------------------------------------------------


def diff(a: Manifest, b: Manifest, *, inputs: bool = True) -> list[str]:
    """What changed from manifest ``a`` to manifest ``b``, one line each, layers by path: the
    spec's, the input's and the output's sha256 (unless not ``inputs``: `diff --spec` compares
    two plans of one spec on models that differ by construction), the architecture, each
    layer's class and state (flag, entries frozen inside, BatchNormalization policy), whether
    the model trains, the trainable parameters, and the state at every epoch where either
    schedule starts a phase."""
    lines = []
    for key, label in (("spec", "spec"), ("model", "model")) if inputs else ():
        if a.data[key]["sha256"] != b.data[key]["sha256"]:
            lines.append(f"{label}: {a.data[key].get('file') or a.data[key].get('source')} "
                         f"({_short(a.data[key]['sha256'])}) -> "
                         f"{b.data[key].get('file') or b.data[key].get('source')} "
                         f"({_short(b.data[key]['sha256'])})")
    out_a, out_b = (m.data.get("output", {}).get("sha256") for m in (a, b))
    if inputs and out_a != out_b:
        lines.append(f"output: {_short(out_a, 'not recorded')} -> {_short(out_b, 'not recorded')}")
    if a.data["model"]["architecture"] != b.data["model"]["architecture"]:
        lines.append("architecture: differs (layers added, removed or reshaped)")
    layers_a = {e["path"]: e for e in a.layers}
    layers_b = {e["path"]: e for e in b.layers}
    for path, ea in layers_a.items():
        eb = layers_b.get(path)
        if eb is None:
            lines.append(f"- {path}: {_described(ea)} (only in the first)")
        else:
            if ea["class"] != eb["class"]:
                lines.append(f"~ {path}: class {ea['class']} -> {eb['class']}")
            if _described(ea) != _described(eb):
                lines.append(f"~ {path}: {_described(ea)} -> {_described(eb)}")
    for path, eb in layers_b.items():
        if path not in layers_a:
            lines.append(f"+ {path}: {_described(eb)} (only in the second)")
    if a.data["model_trainable"] != b.data["model_trainable"]:
        lines.append(f"model_trainable: {json.dumps(a.data['model_trainable'])} -> "
                     f"{json.dumps(b.data['model_trainable'])}")
    ta, tb = a.data["totals"], b.data["totals"]
    if ta["trainable_params"]["after"] != tb["trainable_params"]["after"]:
        lines.append(f"trainable params: {ta['trainable_params']['after']:,} -> "
                     f"{tb['trainable_params']['after']:,}")
    lines += _schedule_diff(a, b)
    return lines


def _described(entry: dict) -> str:
    """A layer entry's state in words: flag, entries frozen inside, BatchNormalization policy."""
    word = _state(entry["trainable"])
    parts = entry.get("frozen_parts")
    if parts:
        word += " with " + ", ".join(f"{p['weight']}[{p['frozen']}]" for p in parts) + " frozen"
    if entry.get("batchnorm"):
        # The class too: under 'batchnorm affine' a layer's class changes with its phase.
        affine = ", the affine class" if entry.get("affine") else ""
        word += f" (batchnorm {entry['batchnorm']}{affine})"
    lora = entry.get("lora")
    if lora:
        word += (f" (LoRA rank {lora['rank']} alpha {float(lora['alpha']):g}, factors "
                 f"{_state(lora['trains'])})")
    return word


def _schedule_diff(a: Manifest, b: Manifest) -> list[str]:
    """Later phases compared epoch by epoch (phase 0 is the layer table above): at each epoch
    where either schedule starts a phase, the layers whose state differs between the two."""
    sa, sb = a.data.get("schedule") or [], b.data.get("schedule") or []
    if not sa and not sb:
        return []
    lines = []
    epochs = sorted({p["epoch"] for p in sa} | {p["epoch"] for p in sb} - {0})
    for epoch in epochs:
        la = {e["path"]: e for e in (phase_layers(a, epoch) if sa else a.layers)}
        lb = {e["path"]: e for e in (phase_layers(b, epoch) if sb else b.layers)}
        changed = [f"  ~ {p}: {_described(la[p])} -> {_described(lb[p])}"
                   for p in la if p in lb and not la[p]["container"] and
                   _described(la[p]) != _described(lb[p])]
        if changed:
            lines.append(f"at epoch {epoch}:")
            lines += changed
    return lines


def _short(digest: Optional[str], missing: str = "no file") -> str:
    return digest[:12] if digest else missing
