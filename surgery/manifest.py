"""The manifest: a canonical JSON record of what a spec did to a model.

Canonical means sorted keys, a fixed indent, a trailing newline and no timestamps, so the same
spec applied to the same model gives the same bytes (a manifest can be committed and diffed).
Built from a `Plan` and plain facts (hashes, versions) handed in by the caller: no Keras here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .spec_json import compile_spec
from .digest import sha256_file
from .ir import BN_AFFINE, Spec
from .plan import Plan, compact_ranges
from .tree import LayerTree

__all__ = ["Manifest", "build_manifest", "architecture_fingerprint", "sha256_file", "verify",
           "phase_layers", "diff", "load_manifest", "FORMAT"]

FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    """What was done, as plain data (``data``) and as canonical JSON (`to_json`)."""

    data: dict

    def to_json(self) -> str:
        return canonical_json(self.data)

    @property
    def layers(self) -> list[dict]:
        return self.data["layers"]

    @property
    def frozen(self) -> list[str]:
        """Paths of the layers left frozen (leaves and containers), in model order."""
        return [e["path"] for e in self.layers if not e["trainable"]]

    @property
    def trainable(self) -> list[str]:
        return [e["path"] for e in self.layers if e["trainable"]]


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def environment_versions() -> dict[str, Optional[str]]:
    """Keras, TensorFlow and backend versions, read from package metadata and Keras's settings
    without importing either: both engines (one never imports TensorFlow) record the same."""
    found = _dist_info_versions()

    def version(*dists: str) -> Optional[str]:
        for dist in dists:
            key = _normalized(dist)
            if key in found:
                return found[key]
            from importlib import metadata  # eggs, unusual installs: the slow, general way

            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {"keras": version("keras", "keras-nightly"),
            "tensorflow": version("tensorflow", "tensorflow-cpu", "tensorflow-gpu",
                                  "tensorflow-macos", "tf-nightly", "tf-nightly-cpu"),
            "backend": _keras_backend()}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_info_versions() -> dict[str, str]:
    """Installed versions from the ``NAME-VERSION.dist-info`` folders on sys.path, first one
    wins, as importlib.metadata finds them: importing importlib.metadata alone costs more (15 ms)
    than the rest of an archive-engine `apply` on a small model spends outside its real work."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            dist, _, rest = name[:-len(".dist-info")].partition("-")
            if rest:
                found.setdefault(_normalized(dist), rest)
    return found


def _keras_backend() -> str:
    # As keras/src/backend/config.py decides: KERAS_BACKEND, else keras.json in KERAS_HOME or
    # ~/.keras (/tmp/.keras when home is not writable), else tensorflow.
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend or "tensorflow"


def architecture_fingerprint(tree: LayerTree) -> str:
    """sha256 of the structure the spec resolves against: paths, classes, weight shapes.

    Two models with the same fingerprint resolve every spec the same way."""
    rows = [[n.path, n.cls, n.index, [[w.name, list(w.shape), w.trainable] for w in n.weights]]
            for n in tree.layers()]
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


def build_manifest(plan: Plan, spec: Spec, *, model_source: str, model_sha256: Optional[str],
                   model_name: str, versions: Optional[dict] = None,
                   surgery_version: Optional[str] = None,
                   output_sha256: Optional[str] = None) -> Manifest:
    """``output_sha256`` is recorded only for outputs that are byte-reproducible (the archive
    engine's): a Keras save stamps the date, and a manifest must not change from run to run."""
    if versions is None:
        versions = environment_versions()
    if surgery_version is None:
        from ._version import __version__ as surgery_version
    totals = plan.totals
    data = {
        "format": FORMAT,
        "versions": {"surgery": surgery_version, **versions},
        "spec": {
            "file": os.path.basename(spec.file),
            "sha256": hashlib.sha256(spec.source.encode("utf-8")).hexdigest(),
            "text": spec.source,
        },
        "model": {
            "source": _shown_source(model_source),
            "name": model_name,
            "sha256": model_sha256,
            "architecture": architecture_fingerprint(plan.tree),
            "layers": len(plan.layers),
        },
        "compiled": compile_spec(spec),
        "rules": [
            {
                "number": r.rule.number,
                "line": r.rule.span.line,
                "column": r.rule.span.column,
                "action": r.rule.action,
                "text": r.rule.text,
                "matched": list(r.covered),
                "decides": len(r.decided),
            }
            for r in plan.rules
        ],
        "layers": [
            {
                "path": lp.path,
                "index": lp.layer.index,
                "class": lp.layer.cls,
                "container": bool(lp.layer.children),
                "params": lp.layer.params,
                "trainable_params": lp.trainable_params_after,
                "before": lp.before,
                "trainable": lp.after,
                "rule": lp.rule.number if lp.rule is not None else None,
                **({"frozen_parts": _parts(lp)} if lp.frozen_parts else {}),
                **({"batchnorm": lp.batchnorm, "affine": lp.affine}
                   if lp.policy is not None or lp.affine else {}),
            }
            for lp in plan.layers
        ],
        "model_trainable": plan.root_after,
        "totals": {
            "params": totals.params,
            "trainable_params": {"before": totals.trainable_before,
                                 "after": totals.trainable_after},
            "non_trainable_params": {"before": totals.non_trainable_before,
                                     "after": totals.non_trainable_after},
        },
        "notes": list(plan.notes),
        "warnings": [
            {"line": d.span.line, "column": d.span.column, "message": d.message}
            for d in plan.diagnostics
        ],
    }
    if plan.phases:
        data["schedule"] = [_phase(ph) for ph in plan.phases]
    if output_sha256 is not None:
        data["output"] = {"sha256": output_sha256}
    return Manifest(data)


def _parts(lp) -> list[dict]:
    return [{"weight": p.weight, "shape": list(p.shape), "axes": list(p.axes),
             "frozen": p.ranges, "of": p.size, "entries": p.entries} for p in lp.frozen_parts]


def _phase(ph) -> dict:
    """One phase's whole state (every layer with weights that trains, entries frozen inside
    them, BatchNormalization policies), so `verify --epoch` can check a checkpoint taken in it."""
    leaves = [lp for lp in ph.plan.layers if not lp.layer.children and lp.layer.weights]
    return {
        "epoch": ph.epoch,
        "line": ph.header.span.line if ph.header is not None else None,
        "trainable": [lp.path for lp in leaves if lp.after],
        "frozen_parts": {lp.path: _parts(lp) for lp in leaves if lp.frozen_parts},
        "batchnorm": {lp.path: lp.batchnorm for lp in leaves
                      if lp.policy is not None or lp.affine},
        "affine": [lp.path for lp in leaves if lp.affine],
        "trainable_params": ph.plan.totals.trainable_after,
    }


def _shown_source(source: str) -> str:
    # The file name, not the path it was reached by: the same model gives the same manifest
    # wherever it sits.
    if source.startswith("keras.applications."):
        return source
    return os.path.basename(source)


def load_manifest(path: str) -> Manifest:
    """Read a manifest written by `surgery apply`; ValueError says what is wrong with it."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a manifest: invalid JSON at line {exc.lineno}, column "
                             f"{exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "layers" not in data:
        raise ValueError(f"not a surgery manifest (format {FORMAT})")
    return Manifest(data)


def _state(trainable: bool) -> str:
    return "trainable" if trainable else "frozen"


def phase_layers(manifest: Manifest, epoch: int) -> list[dict]:
    """The manifest's layer entries as they stand at ``epoch`` of its schedule: the state a
    checkpoint saved during that epoch must have: without a schedule, the one state."""
    schedule = manifest.data.get("schedule")
    if not schedule:
        return manifest.layers
    phase = [p for p in schedule if p["epoch"] <= epoch][-1]
    trainable = set(phase["trainable"])
    parts = phase.get("frozen_parts", {})
    entries = [dict(e) for e in manifest.layers]
    leaf = {e["path"]: e for e in entries if not e["container"]}
    for e in leaf.values():
        if e["params"]:
            e["trainable"] = e["path"] in trainable
        e.pop("frozen_parts", None)
        if e["path"] in parts:
            e["frozen_parts"] = parts[e["path"]]
        e.pop("batchnorm", None)
        e.pop("affine", None)
        if e["path"] in phase.get("batchnorm", {}):
            e["batchnorm"] = phase["batchnorm"][e["path"]]
            e["affine"] = e["path"] in phase.get("affine", ())
    for e in entries:
        if e["container"]:
            prefix = e["path"] + "/"
            e["trainable"] = any(p in trainable for p in leaf if p.startswith(prefix))
    return entries


def verify(manifest: Manifest, tree: LayerTree, *, epoch: Optional[int] = None) -> list[str]:
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


def _trains(tree: LayerTree, node) -> bool:
    if not node.children:
        return tree.effectively_trainable(node)
    return any(_trains(tree, c) for c in node.children if c.params)


def diff(a: Manifest, b: Manifest) -> list[str]:
    """What changed from manifest ``a`` to manifest ``b``, one line each, layers by path."""
    lines = []
    for key, label in (("spec", "spec"), ("model", "model")):
        if a.data[key]["sha256"] != b.data[key]["sha256"]:
            lines.append(f"{label}: {a.data[key].get('file') or a.data[key].get('source')} "
                         f"({_short(a.data[key]['sha256'])}) -> "
                         f"{b.data[key].get('file') or b.data[key].get('source')} "
                         f"({_short(b.data[key]['sha256'])})")
    if a.data["model"]["architecture"] != b.data["model"]["architecture"]:
        lines.append("architecture: differs (layers added, removed or reshaped)")
    layers_a = {e["path"]: e for e in a.layers}
    layers_b = {e["path"]: e for e in b.layers}
    for path, ea in layers_a.items():
        eb = layers_b.get(path)
        if eb is None:
            lines.append(f"- {path}: {_described(ea)} (only in the first)")
        elif _described(ea) != _described(eb):
            lines.append(f"~ {path}: {_described(ea)} -> {_described(eb)}")
    for path, eb in layers_b.items():
        if path not in layers_a:
            lines.append(f"+ {path}: {_described(eb)} (only in the second)")
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
        word += f" (batchnorm {entry['batchnorm']})"
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


def _short(digest: Optional[str]) -> str:
    return digest[:12] if digest else "no file"
