"""The manifest: a canonical JSON record of what a spec did to a model (verify.py reads it back
against a model, and compares two).

Canonical means sorted keys, a fixed indent, a trailing newline and no timestamps, so the same
spec applied to the same model gives the same bytes (a manifest can be committed and diffed).
Built from a `Plan` and plain facts (hashes, versions) handed in by the caller: no Keras here.

A manifest read back comes from a file anyone can edit: its one decoder (manifest_read.py)
checks the structure once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from .spec_json import compile_spec
from .digest import sha256_file  # noqa: F401  (tests/test_archive_engine.py imports it from here)
from .ir import Spec
from .plan import Plan
from .tree import LayerTree
from .versions import __version__, environment_versions

__all__ = ["Manifest", "build_manifest", "architecture_fingerprint", "canonical_json",
           "phase_layers", "FORMAT"]

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
        surgery_version = __version__
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
                **({"lora": _lora(plan, lp)} if lp.adapter is not None else {}),
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
            **({"new_params": totals.added} if totals.added else {}),
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


def _lora(plan: Plan, lp) -> dict:
    """A layer's LoRA: rank, alpha, the factors' parameters, whether this run created them and
    whether they train, and the statement that asks for it (None: the model had it)."""
    ad = lp.adapter
    trains = plan.trains(lp)
    return {"rank": ad.rank, "alpha": ad.alpha, "params": ad.params, "new": ad.new,
            "trains": all(trains[n] for n in ad.factors),
            "statement": ad.statement.number if ad.statement is not None else None}


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


# --- verify --------------------------------------------------------------------------------------


def phase_layers(manifest: Manifest, epoch: int) -> list[dict]:
    """The manifest's layer entries as they stand at ``epoch`` of its schedule: the state a
    checkpoint saved during that epoch must have: without a schedule, the one state."""
    if epoch < 0:
        raise ValueError(f"epoch must be 0 or more, not {epoch}")
    schedule = manifest.data.get("schedule")
    if not schedule:
        return manifest.layers
    phase = [p for p in schedule if p["epoch"] <= epoch][-1]  # the decoder checked phase 0
    trainable = set(phase["trainable"])
    parts = phase["frozen_parts"]
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
        if e["path"] in phase["batchnorm"]:
            e["batchnorm"] = phase["batchnorm"][e["path"]]
            e["affine"] = e["path"] in phase["affine"]
    for e in entries:
        if e["container"]:
            prefix = e["path"] + "/"
            e["trainable"] = any(p in trainable for p in leaf if p.startswith(prefix))
    return entries
