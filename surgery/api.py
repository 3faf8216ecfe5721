"""The Python API on a live model: `surgery.apply` and `surgery.plan` (file to file, the command
line and `surgery.apply_file` go through modelfile.py, which builds on `apply_plan` here).

The pure pipeline (parse -> resolve -> plan -> manifest) runs on plain data; only the calls into
`engines.live` touch Keras, and that module is imported on first use so that `import surgery`
stays light.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Optional

from .adapters import SPEC_ATTR
from .errors import SurgeryWarning  # re-exported: surgery.api.SurgeryWarning, as before
from .ir import Spec
from .manifest import Manifest, build_manifest
from .plan import Plan, plan_spec
from .specfile import SpecLike
from .specfile import as_spec

__all__ = ["apply", "plan", "apply_plan", "load_model", "as_spec", "SpecLike", "SurgeryWarning"]


def plan(model, spec: SpecLike, *, allow_empty: bool = False) -> Plan:
    """What `apply` would do to ``model``, without changing it."""
    from .engines import live

    tree, _ = live.describe(model)
    return plan_spec(as_spec(spec), tree, allow_empty=allow_empty)


def apply(model, spec: SpecLike, *, allow_empty: bool = False, epoch: int = 0) -> Manifest:
    """Apply ``spec`` to a live ``keras.Model`` in place and return the manifest of what was done.

    Raises `SpecError` (nothing is changed) when the spec is malformed or a selector matches no
    layer. A model compiled before the call must be compiled again for the new state to train.
    A spec with phases is applied in the state of the phase in force at ``epoch`` (phase 0, the
    state training starts from, by default); `Schedule` runs the later phases during ``fit``.
    A fresh model brought to the state of epoch k this way loads a weights-only checkpoint
    taken then (``load_weights``) with its optimizer state, which Keras restores only into the
    same trainable set.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be 0 or more, not {epoch}")
    the_spec = as_spec(spec)
    the_plan, manifest = apply_plan(model, the_spec, allow_empty=allow_empty, epoch=epoch)
    for d in the_plan.diagnostics:
        warnings.warn(SurgeryWarning(d.headline()), stacklevel=2)
    later = [ph for ph in the_plan.phases if ph.epoch > epoch]
    if later:
        named = ", ".join(f"'at epoch {ph.epoch}:'" for ph in later)
        warnings.warn(SurgeryWarning(
            f"the spec has later phases ({named}): apply set the state at epoch {epoch}; pass "
            f"surgery.Schedule(spec) to model.fit to run them"), stacklevel=2)
    if getattr(model, "optimizer", None) is not None:
        warnings.warn(SurgeryWarning(
            "the model was compiled before surgery: call model.compile(...) again, or the "
            "training step built for the old trainable state keeps running"), stacklevel=2)
    return manifest


def apply_plan(model, spec: Spec, *, allow_empty: bool = False, model_source: str = "<live model>",
               model_sha256: Optional[str] = None, epoch: int = 0) -> tuple[Plan, Manifest]:
    """Resolve, plan, write the flags and build the manifest: the one path `apply` and the
    Keras engine of `surgery.apply_file` (modelfile.py) take. Nothing is written to the model
    unless the whole plan resolved. ``epoch`` picks the phase whose state is written (the
    manifest keeps the whole schedule)."""
    from dataclasses import replace

    from .engines import live

    tree, objects = live.describe(model)
    the_plan = plan_spec(spec, tree, allow_empty=allow_empty)
    if the_plan.phases:
        in_force = [ph for ph in the_plan.phases if ph.epoch <= epoch][-1].plan
        the_plan = replace(in_force, phases=the_plan.phases, diagnostics=the_plan.diagnostics)
    live.write(model, the_plan, objects)
    if spec.loras:  # what save_adapters records as the adapters' origin
        setattr(model, SPEC_ATTR, hashlib.sha256(spec.source.encode("utf-8")).hexdigest())
    if any(lp.adapter is not None for lp in the_plan.layers):
        live.keep_lora_on_save(model)
    manifest = build_manifest(the_plan, spec, model_source=model_source,
                              model_sha256=model_sha256, model_name=model.name)
    return the_plan, manifest


def load_model(path, **kwargs):
    """Load a model with ``keras.models.load_model(path, **kwargs)`` and restore the trainable
    state `surgery apply` recorded in the file where its saved form cannot hold it (keras_hub
    backbones and tasks, MultiHeadAttention's sublayers, variable flags), checking that the
    model is the one recorded. A file without such a record loads as Keras loads it."""
    from .engines import live

    return live.load_model(path, **kwargs)
