"""`Schedule`: a spec's phases applied during one ordinary ``model.fit``.

    model.fit(data, epochs=10, callbacks=[surgery.Schedule("finetune.frz")])

At the start of training the spec is resolved against the model once, one plan per phase
(surgery/plan.py `plan_phases`): a selector that matches nothing fails before the first step,
not at epoch 6. At the start of every epoch the callback makes the model's state that of the
last phase that has begun. It writes the whole state of that phase, not a difference, so a run
resumed with ``initial_epoch=k`` replays every phase up to k and is in the state an
uninterrupted run reaches.

What Keras needs for a change to take effect inside a running ``fit`` is done here:
- the optimizer was built for the variables trainable at its first step; Keras refuses
  gradients for any other. It is rebuilt in place for the new trainable set: the variables that
  were already training keep their state (matched by the optimizer variable's path, which
  Keras derives from the model variable's path), the new ones start from fresh state, and those
  no longer training drop theirs. So the optimizer always holds exactly the state of
  ``model.trainable_variables``, in their order: a checkpoint saved mid-schedule loads with its
  optimizer state, which Keras restores only when the counts match;
- the traced train function captured the old trainable set (and BatchNormalization classes):
  it is rebuilt (``make_train_function(force=True)``, as KERAS-FACTS notes).

The same holds on JAX: its ``fit`` re-reads the trainable, non-trainable and optimizer variables
from the model at the first step after ``on_epoch_begin`` (keras/src/backend/jax/trainer.py), so
what this callback writes there is what the epoch trains; and on PyTorch, whose steps read the
variables directly.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from ..errors import SurgeryWarning  # noqa: E402
from ..ir import Spec  # noqa: E402
from ..plan import PhasePlan, changed_layers, plan_phases  # noqa: E402
from . import live  # noqa: E402

__all__ = ["Schedule", "PhaseChange"]


@dataclass(frozen=True)
class PhaseChange:
    """One phase entered during training. ``phase`` is the epoch of its header (0 for the
    statements before any header); ``epoch`` the epoch it was entered at (later than ``phase``
    when a resumed run replays it). ``unfrozen``/``frozen``/``changed`` are leaf layer paths:
    made trainable, made frozen, or changed otherwise (frozen entries, BatchNormalization
    policy)."""

    epoch: int
    phase: int
    line: Optional[int]
    unfrozen: tuple[str, ...]
    frozen: tuple[str, ...]
    changed: tuple[str, ...]
    trainable_params_before: int
    trainable_params_after: int

    def describe(self) -> str:
        where = f"'at epoch {self.phase}:' (line {self.line})" if self.line else "phase 0"
        parts = []
        for word, paths in (("unfrozen", self.unfrozen), ("frozen", self.frozen),
                            ("changed", self.changed)):
            if paths:
                shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
                parts.append(f"{len(paths)} {word} ({shown})")
        what = "; ".join(parts) if parts else "no layer changes"
        return (f"surgery: epoch {self.epoch}: {where}: {what}; trainable params "
                f"{self.trainable_params_before:,} -> {self.trainable_params_after:,}")


class Schedule(keras.callbacks.Callback):
    """Apply each phase of ``spec`` (a path, spec text or a parsed `Spec`) at the start of its
    epoch. ``verbose``: print one line per phase change. ``phase_changes``: the `PhaseChange`s made,
    in order. Each epoch's ``logs`` get ``surgery_phase`` (the epoch of the phase in force) and
    ``trainable_params``, so History, CSVLogger and TensorBoard record the schedule. The spec's
    findings (what ``surgery.apply`` warns about, every phase's) are `SurgeryWarning`s when
    training begins, as is a ``fit(epochs=...)`` that ends before a phase."""

    def __init__(self, spec: Union[Spec, str, Path], *, allow_empty: bool = False,
                 verbose: int = 1):
        super().__init__()
        from ..specfile import as_spec

        self.spec = as_spec(spec)
        self.allow_empty = allow_empty
        self.verbose = verbose
        self.phase_changes: list[PhaseChange] = []
        self._phases: tuple[PhasePlan, ...] = ()
        self._objects: dict = {}
        self._for_model: Optional[int] = None
        self._current: Optional[int] = None  # index into _phases of the state last written

    # --- Keras hooks ----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._for_model != id(self.model):
            # Planned once per model, against the model as this first fit finds it; later fit
            # calls on the same model (fit(..., initial_epoch=k) to continue) reuse the plans.
            tree, self._objects = live.describe(self.model)
            self._phases = plan_phases(self.spec, tree, allow_empty=self.allow_empty)
            self._for_model = id(self.model)
            self._current = None
            # The findings `surgery.apply` would warn about (a rule without effect, BatchNorm
            # layers unfrozen without a policy, ...), every phase's, once per planning.
            found = sorted((d for ph in self._phases for d in ph.plan.diagnostics),
                           key=lambda d: (d.span.line, d.span.column))
            for d in found:
                warnings.warn(SurgeryWarning(d.headline()), stacklevel=2)
        epochs = (self.params or {}).get("epochs")
        if epochs is not None:
            late = [ph for ph in self._phases if ph.header is not None and ph.epoch >= epochs]
            if late:
                shown = ", ".join(f"'at epoch {ph.epoch}:' (line {ph.header.span.line})"
                                  for ph in late)
                warnings.warn(SurgeryWarning(
                    f"fit(epochs={epochs}) ends before {shown} begins: epochs count from 0, so "
                    f"the last epoch of this run is {epochs - 1}"), stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        target = self.phase_index(epoch)
        if target != self._current:
            self._enter(target, epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            plan = self._phases[self._current].plan
            logs["surgery_phase"] = self._phases[self._current].epoch
            logs["trainable_params"] = plan.totals.trainable_after

    # --- the work ---------------------------------------------------------------------------------

    def phase_index(self, epoch: int) -> int:
        """The phase in force at ``epoch``: the last one that has begun."""
        index = 0
        for i, ph in enumerate(self._phases):
            if ph.epoch <= epoch:
                index = i
        return index

    def _enter(self, target: int, epoch: int) -> None:
        model = self.model
        before_vars = [id(v) for v in model.trainable_variables]
        phase = self._phases[target]
        live.write(model, phase.plan, self._objects)
        previous = self._phases[self._current].plan if self._current is not None else None
        self._current = target
        _sync_optimizer(model)
        model.make_train_function(force=True)
        if previous is None:
            # Against the model as this run found it (a resumed checkpoint may already be in
            # this phase's state): a layer that carries the planned flag, frozen entries and
            # class has not changed.
            changed = tuple(lp for lp in phase.plan.layers if not lp.layer.children and lp.changed)
            was = {lp.path: lp.before for lp in changed}
            params_before = phase.plan.totals.trainable_before
        else:
            changed = changed_layers(previous, phase.plan)
            was = {lp.path: previous.by_path[lp.path].after for lp in changed}
            params_before = previous.totals.trainable_after
        changed = tuple(lp for lp in changed if lp.layer.weights)  # a flag on no weight is noise
        record = PhaseChange(
            epoch=epoch, phase=phase.epoch,
            line=phase.header.span.line if phase.header is not None else None,
            unfrozen=tuple(lp.path for lp in changed if lp.after and not was[lp.path]),
            frozen=tuple(lp.path for lp in changed if not lp.after and was[lp.path]),
            changed=tuple(lp.path for lp in changed if lp.after == was[lp.path]),
            # The plan's counts, as in logs['trainable_params']: entries frozen inside a
            # trainable weight (.filters[...], .units[...]) are not trainable parameters.
            trainable_params_before=params_before,
            trainable_params_after=phase.plan.totals.trainable_after,
        )
        self.phase_changes.append(record)
        if self.verbose and (record.unfrozen or record.frozen or record.changed or
                             before_vars != [id(v) for v in model.trainable_variables]):
            print(record.describe(), flush=True)


def _sync_optimizer(model) -> None:
    """Make the optimizer track exactly ``model.trainable_variables``, keeping the state of every
    variable it already tracked. Keras has no public way to add variables to a built optimizer,
    so this uses the fields its own ``build`` sets (keras/src/optimizers/base_optimizer.py).

    Under a ``tf.distribute`` strategy the new slots are created in the strategy's scope (as
    Keras creates them at the first step), or they would not be mirrored. With ``use_ema`` a new
    variable's moving average starts from the variable's value, as Keras starts every average at
    the first step: left at zero, the averages that ``fit`` writes into the model at its end
    would shrink every layer unfrozen mid-run towards zero."""
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return
    opt = getattr(opt, "inner_optimizer", opt)  # a LossScaleOptimizer keeps state in its inner one
    if not getattr(opt, "built", False):
        return  # it builds itself at the first step, for the variables trainable then
    wanted = list(model.trainable_variables)
    tracked = list(getattr(opt, "_trainable_variables", ()))
    if [id(v) for v in tracked] == [id(v) for v in wanted]:
        return
    old = {v.path: v for v in opt.variables}
    keep = {id(opt._iterations)}
    if isinstance(getattr(opt, "_learning_rate", None), keras.Variable):
        keep.add(id(opt._learning_rate))
    strategy = getattr(model, "distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        for v in opt.variables:
            if id(v) not in keep:
                opt._untrack_variable(v)
        opt.built = False
        opt._trainable_variables_indices = {}
        opt.build(wanted)  # its add_variable names every new variable under the optimizer's scope
        opt.built = True
        for v in opt.variables:
            earlier = old.get(v.path)
            if earlier is not None and earlier is not v and tuple(earlier.shape) == tuple(v.shape):
                v.assign(earlier)
        if getattr(opt, "use_ema", False):
            averages = getattr(opt, "_model_variables_moving_average", None) or ()
            for variable, average in zip(wanted, averages):
                if average is not None and average.path not in old:
                    # A copy: on JAX an assign shares the buffer, and the train step donates
                    # each state buffer once (two variables on one buffer fail there).
                    average.assign(keras.ops.copy(variable))
