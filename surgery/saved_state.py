"""The decided state that a saved `.keras` file cannot hold, and the zip entry that holds it.

Keras saves a layer's ``trainable`` flag in its config, and builds its variables from it when it
loads the file. That gives a plan back only where the file holds the layer's config: a keras_hub
backbone or task saves its constructor arguments and builds every layer inside again (with
default flags); MultiHeadAttention builds its query, key, value and output layers from its own
arguments; and no saved form holds a variable's own flag (a weight frozen whole inside a
trainable layer, LoRA's merged kernel held off by hand). `unrestored` predicts, from the plan
alone, which layers a plain ``keras.models.load_model`` gives back in another state.

For those files the decided state travels in the archive as one extra entry, ``ENTRY`` (Keras
ignores entries it does not know; a later ``model.save`` drops it). This module is its one
encoder (`encode`, from `from_plan`) and its one decoder (`decode`); ``surgery.load_model`` and
every command that loads a model through Keras (engines/live.py) restore and check it.

The entry lists, in the model's pre-order, every layer that has weights of its own or holds
layers (weightless leaves carry no state, and Keras numbers their names per process: a Softmax
inside MultiHeadAttention is softmax_3 in one process and softmax_7 in another), each with its
class, its flag, its own weights (name, shape, whether the variable trains) and the entries
frozen inside them. Layers are matched to the loaded model by that order and checked by class
and weight shapes, not by name, for the same reason. Pure Python: no Keras, NumPy or h5py.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from typing import Optional

from .errors import SurgeryError
from .engines.frozen_format import index_runs
from .parts import PartError
from .parts import select as select_part
from .plan import LayerPlan, Plan

__all__ = ["ENTRY", "FORMAT", "LayerState", "SavedState", "from_plan", "encode", "decode",
           "unrestored", "record", "read", "note"]

ENTRY = "surgery/state.json"
FORMAT = "surgery-state/1"


@dataclass(frozen=True)
class LayerState:
    """One layer as the plan leaves it: ``weights`` are (name, shape, trains) of its own
    variables; ``frozen`` (weight, positions) the entries frozen inside a trainable layer;
    ``whole`` the weights frozen whole inside it (by their variables' flags)."""

    path: str
    cls: str
    trainable: bool
    weights: tuple[tuple[str, tuple[int, ...], bool], ...] = ()
    frozen: tuple[tuple[str, tuple[int, ...]], ...] = ()
    whole: tuple[str, ...] = ()
    affine: bool = False
    # LoRA: (rank, alpha). No saved form keeps both: Keras reloads a Dense or an Embedding with
    # alpha set to the rank and both factors zero, and a keras_hub model without LoRA at all.
    lora: Optional[tuple[int, float]] = None


@dataclass(frozen=True)
class SavedState:
    model_trainable: bool
    layers: tuple[LayerState, ...]

    @property
    def trainable_params(self) -> int:
        return sum(math.prod(shape) for lay in self.layers for _, shape, trains in lay.weights
                   if trains)


def _whole(p) -> bool:
    return p.entries == math.prod(p.shape)


def from_plan(plan: Plan) -> SavedState:
    layers = []
    for lp in plan.layers:
        if not (lp.layer.weights or lp.layer.children):
            continue
        trains = plan.trains(lp)
        layers.append(LayerState(
            path=lp.path, cls=lp.layer.cls, trainable=lp.after,
            weights=tuple((w.name, w.shape, trains[w.name]) for w in lp.layer.weights),
            frozen=tuple((p.weight, p.indices) for p in lp.frozen_parts if not _whole(p)),
            whole=tuple(p.weight for p in lp.frozen_parts if _whole(p)),
            affine=lp.affine,
            lora=(lp.adapter.rank, lp.adapter.alpha) if lp.adapter is not None else None))
    return SavedState(plan.root_after, tuple(layers))


def encode(state: SavedState) -> bytes:
    data = {
        "format": FORMAT,
        "model_trainable": state.model_trainable,
        "layers": [
            {"path": s.path, "class": s.cls, "trainable": s.trainable,
             "weights": [[name, list(shape), trains] for name, shape, trains in s.weights],
             **({"frozen": {w: index_runs(i) for w, i in s.frozen}} if s.frozen else {}),
             **({"whole": list(s.whole)} if s.whole else {}),
             **({"affine": True} if s.affine else {}),
             **({"lora": {"rank": s.lora[0], "alpha": s.lora[1]}} if s.lora else {})}
            for s in state.layers
        ],
    }
    return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode("utf-8")


def decode(raw: bytes) -> SavedState:
    """The state `encode` wrote; ValueError says what is wrong with anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r} (this surgery reads "
                             f"{FORMAT})")
        layers = []
        for e in data["layers"]:
            frozen = tuple((w, tuple(i for start, stop in runs for i in range(start, stop)))
                           for w, runs in sorted(e.get("frozen", {}).items()))
            layers.append(LayerState(
                path=str(e["path"]), cls=str(e["class"]), trainable=_bool(e["trainable"]),
                weights=tuple((str(n), tuple(int(d) for d in shape), _bool(t))
                              for n, shape, t in e["weights"]),
                frozen=frozen, whole=tuple(str(w) for w in e.get("whole", ())),
                affine=_bool(e.get("affine", False)), lora=_lora(e.get("lora"))))
        return SavedState(_bool(data["model_trainable"]), tuple(layers))
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed {ENTRY}: {type(exc).__name__}: {exc}") from None


def _lora(value) -> Optional[tuple[int, float]]:
    if value is None:
        return None
    rank, alpha = value["rank"], value["alpha"]
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0) or \
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"malformed {ENTRY}: LoRA {value!r} is not a positive rank and alpha")
    return rank, float(alpha)


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"malformed {ENTRY}: {value!r} is not true or false")
    return value


# --- what a plain keras.models.load_model gives back -----------------------------------------


def unrestored(plan: Plan) -> tuple[str, ...]:
    """The layers whose planned state a plain ``keras.models.load_model`` of the saved model
    does not give back, in model order: from the file, Keras sets each layer's flag from its
    config where it holds one (and a rebuilt layer's to True), then creates its variables
    trainable with it, LoRA's kernel excepted where the config enables LoRA; the constraints
    that hold entries frozen come back with the config that holds them."""
    out = []
    for lp in plan.layers:
        if not lp.layer.weights:
            continue
        if lp.adapter is not None:  # no saved form gives LoRA back whole (LayerState.lora)
            out.append(lp.path)
            continue
        lora = dict(lp.layer.details).get("lora_rank") is not None
        saved = not lp.layer.rebuilt
        flag = lp.after if saved else True
        planned = plan.trains(lp)
        kept = {p.weight for p in lp.frozen_parts if saved and _installable(lp, p)}
        for w in lp.layer.weights:
            loaded = plan.root_after and flag and w.trainable and not (
                lora and saved and w.name == "kernel")
            # A weight frozen whole keeps its values through a saved constraint: not trained.
            if w.name in kept and _whole_part(lp, w.name):
                loaded = False
            if loaded != planned[w.name]:
                out.append(lp.path)
                break
        else:
            partial = {p.weight for p in lp.frozen_parts if not _whole(p)}
            if partial - kept or (lp.affine != lp.layer.affine and not saved):
                out.append(lp.path)
    return tuple(out)


def _whole_part(lp: LayerPlan, weight: str) -> bool:
    return any(p.weight == weight and _whole(p) for p in lp.frozen_parts)


def _installable(lp: LayerPlan, p) -> bool:
    """Whether engines/live.py saves a FrozenEntries constraint for ``p`` in the layer's config:
    parts.py must know the attribute and an output axis for the entries."""
    node = lp.layer
    try:
        sel = select_part(node.path, node.cls, node.shapes, p.weight, list(p.indices),
                          dict(node.details))[0]
    except PartError:
        return False
    return bool(sel.attr)


def installs_constraint(lp: LayerPlan, p) -> bool:
    """Whether the Keras engine writes ``p`` as a FrozenEntries constraint: entries frozen in
    part always; a weight frozen whole (its variable's flag says it, at no cost) also where the
    layer's config is saved, so that a plain load keeps it frozen."""
    if not _whole(p):
        return True
    return not lp.layer.rebuilt and _installable(lp, p)


def note(paths: tuple[str, ...], out: str, plan: Optional[Plan] = None) -> str:
    """The one line `apply` prints when the output needs surgery.load_model."""
    shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
    return (f"keras.models.load_model({out!r}) will not restore the state of {len(paths)} "
            f"layer{'s' if len(paths) != 1 else ''} ({shown}): {_why(paths, plan)}; load it "
            f"with surgery.load_model({out!r}), which restores and checks the state recorded "
            f"in the file")


def _why(paths: tuple[str, ...], plan: Optional[Plan]) -> str:
    if plan is None:
        return "the saved form does not hold it"
    rebuilt = sum(1 for p in paths if plan.by_path[p].layer.rebuilt)
    reasons = []
    if rebuilt:
        reasons.append("Keras builds them again from their parent's constructor arguments"
                       if rebuilt == len(paths) else
                       f"Keras builds {rebuilt} of them again from constructor arguments")
    lora = sum(1 for p in paths if plan.by_path[p].adapter is not None)
    if lora:
        reasons.append("Keras reloads LoRA with both factors zero (they would never train) and "
                       "a Dense's or an Embedding's alpha set to its rank; a keras_hub model "
                       "without LoRA")
    if any(not plan.by_path[p].layer.rebuilt and plan.by_path[p].adapter is None for p in paths):
        reasons.append("no saved form keeps a variable's own trainable flag")
    return " and ".join(reasons)


def record(path: str, plan: Plan, shown: Optional[str] = None) -> Optional[str]:
    """After the Keras engine saved ``plan``'s model to ``path``: where a plain load would not
    give the plan back, add the entry and return the line to print (None: nothing to say).
    ``shown``: the output's name for that line (``path`` is usually a temporary)."""
    paths = unrestored(plan)
    if not paths:
        return None
    out = shown or path
    if not path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise SurgeryError(f"{out}: an .h5 file cannot hold the state of {len(paths)} layer"
                           f"{'s' if len(paths) != 1 else ''} ({', '.join(paths[:3])}"
                           f"{', ...' if len(paths) > 3 else ''}), which keras.models.load_model "
                           "would give back in another state: write a .keras file")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(ENTRY, encode(from_plan(plan)))
    return note(paths, out, plan)


def read(path: str) -> Optional[SavedState]:
    """The state recorded in a .keras file, or None where it holds none."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        try:
            raw = archive.read(ENTRY)
        except KeyError:
            return None
    return decode(raw)
