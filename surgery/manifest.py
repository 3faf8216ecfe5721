"""The manifest: a canonical JSON record of what a spec did to a model.

Canonical means sorted keys, a fixed indent, a trailing newline and no timestamps, so the same
spec applied to the same model gives the same bytes (a manifest can be committed and diffed).
Built from a `Plan` and plain facts (hashes, versions) handed in by the caller: no Keras here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from .ir import Spec
from .plan import Plan
from .tree import LayerTree

__all__ = ["Manifest", "build_manifest", "architecture_fingerprint", "sha256_file", "FORMAT"]

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


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def architecture_fingerprint(tree: LayerTree) -> str:
    """sha256 of the structure the spec resolves against: paths, classes, weight shapes.

    Two models with the same fingerprint resolve every spec the same way."""
    rows = [[n.path, n.cls, n.index, [[w.name, list(w.shape), w.trainable] for w in n.weights]]
            for n in tree.layers()]
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


def build_manifest(plan: Plan, spec: Spec, *, model_source: str, model_sha256: Optional[str],
                   model_name: str, versions: dict, surgery_version: str) -> Manifest:
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
    return Manifest(data)


def _shown_source(source: str) -> str:
    # The file name, not the path it was reached by: the same model gives the same manifest
    # wherever it sits.
    if source.startswith("keras.applications."):
        return source
    return os.path.basename(source)
