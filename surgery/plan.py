"""The final state of every layer and variable, computed before anything is written to a model.

Units (tree.py: a layer with weights of its own, or holding no layers) take the state of the rule
that decides them, or keep their state when no rule covers them. A layer that holds layers (a
nested model, a composite layer) is trainable exactly when something inside it is: Keras's
``trainable`` setter recurses into sublayers, so their flags are derived from the units inside,
never decided on their own; where such a layer has weights of its own that stay frozen under a
flag turned on for its sublayers, their variable flags say it (`LayerPlan.off`).

A variable's own flag is state too (LoRA turns its kernel's off): a rule that unfreezes a layer
leaves off what the model holds off, and a layer no rule covers keeps every variable as it was.

LoRA statements (lora.py) are resolved first, into the tree the model will be once its adapters
exist; the rules resolve against that tree. A layer with an adapter a statement asks for trains
its two factors unless a rule after the statement covers the layer and freezes it (then the rule
decides them, as it decides the rest); its other weights keep what the rules decide, so its flag
is on when either trains, and what must not train is held off by its variable's flag (`off`).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

from .errors import Diagnostic, SelectorError, SpecError, SurgeryError
from .ir import BN_AFFINE, BN_FROZEN, BN_TRAIN, BatchNormRule, Phase, Rule, Spec
from .layerparts import whole_weight
from .lora import Adapter, Adapters, LoraResult, resolve_lora
from .parts import PartError
from .parts import select as select_part
from .bn_policies import BATCHNORM_CLASSES
from .resolve import PartOp, Resolution, RuleResult, resolve
from .tree import Layer, LayerTree

__all__ = ["compact_ranges", "FrozenPart", "LayerPlan", "Plan", "Totals", "PhasePlan", "SpanIndex",
           "make_plan", "plan_spec", "plan_phases", "changed_layers", "check_schedule_size",
           "MAX_PHASE_STATEMENTS"]



@dataclass(frozen=True)
class FrozenPart:
    """Entries of one weight frozen inside a trainable layer: ``indices`` are positions on the
    weight's output ``axes`` (channels), ``entries`` the scalars they hold."""

    weight: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    indices: tuple[int, ...]
    size: int  # positions on the axes
    entries: int

    @property
    def ranges(self) -> str:
        """The frozen positions as compact inclusive ranges: ``0-31,40,48-63``."""
        return compact_ranges(self.indices)


def compact_ranges(indices) -> str:
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class LayerPlan:
    """One layer's state before and after, and the rule that decided it (None: no rule covered
    it, or it is a container whose state follows from the layers inside it). ``frozen_parts``:
    weights frozen entry by entry inside a layer left trainable."""

    layer: Layer
    before: bool
    after: bool
    rule: Optional[Rule]
    trainable_params_before: int
    trainable_params_after: int
    frozen_parts: tuple[FrozenPart, ...] = ()
    # Own weights that the layer's flag would train but whose variable flag stays off: what the
    # model holds off (LoRA's merged kernel, a flag set by hand), which a rule never turns on;
    # in a layer no rule covers, every weight found off; the own weights of a layer that holds
    # layers, frozen while a sublayer trains. ``was_off``: the same before the plan.
    off: tuple[str, ...] = ()
    was_off: tuple[str, ...] = ()
    # BatchNormalization leaves only: the 'batchnorm' statement that decides the layer's policy
    # (None: no policy covers it, and it keeps its class), and whether it ends up normalizing
    # with its moving statistics while it trains (surgery's AffineBatchNormalization).
    policy: Optional[BatchNormRule] = None
    affine: bool = False
    # The layer's LoRA (lora.py), where it has or gets one (`Plan.trains` says if it trains).
    adapter: Optional[Adapter] = None

    @property
    def partial(self) -> bool:
        return bool(self.frozen_parts)

    @property
    def path(self) -> str:
        return self.layer.path

    @property
    def batchnorm(self) -> Optional[str]:
        """The policy in force for a BatchNormalization leaf, None for other layers."""
        if self.layer.cls not in BATCHNORM_CLASSES or self.layer.children:
            return None
        if self.policy is not None:
            return self.policy.mode
        return BN_AFFINE if self.affine else BN_TRAIN

    @property
    def changed(self) -> bool:
        """Whether writing this plan changes the layer: its flag, the entries frozen inside it
        (compared with those the model already carries) or its BatchNormalization class."""
        carried = {w.name: w.frozen for w in self.layer.weights if w.frozen}
        wanted = {p.weight: p.indices for p in self.frozen_parts}
        return (self.before != self.after or carried != wanted or self.affine != self.layer.affine
                or (self.after and self.off != self.was_off)
                or (self.adapter is not None and self.adapter.new))


@dataclass(frozen=True)
class Totals:
    """Parameter counts before and after. ``trainable`` leaves out the entries frozen inside
    trainable variables (sub-layer freezing); Keras's ``model.trainable_weights`` holds them,
    since a constraint, not the variable's flag, keeps them: ``held`` counts them, so that
    ``trainable + held`` is Keras's count."""

    params: int  # after the plan: the LoRA factors it creates included
    trainable_before: int
    trainable_after: int
    held_before: int = 0
    held_after: int = 0
    added: int = 0  # parameters the plan creates (new LoRA factors)

    @property
    def in_variables_before(self) -> int:
        """The parameters ``model.trainable_weights`` holds before the plan (Keras's count)."""
        return self.trainable_before + self.held_before

    @property
    def in_variables_after(self) -> int:
        return self.trainable_after + self.held_after

    @property
    def non_trainable_before(self) -> int:
        return self.params - self.added - self.trainable_before

    @property
    def non_trainable_after(self) -> int:
        return self.params - self.trainable_after


@dataclass(frozen=True)
class Plan:
    tree: LayerTree
    layers: tuple[LayerPlan, ...]  # every layer below the root, pre-order
    root_before: bool
    root_after: bool
    rules: tuple[RuleResult, ...]
    diagnostics: tuple[Diagnostic, ...]
    # A spec with phases: every phase's plan, phase 0 first (this plan is phase 0's state).
    phases: tuple["PhasePlan", ...] = ()
    # What each LoRA statement did (lora.py), in spec order.
    lora: tuple[LoraResult, ...] = ()

    @property
    def totals(self) -> Totals:
        # The top-level layers' counts hold everything inside them, each weight once.
        top = [lp for lp in self.layers if "/" not in lp.path]
        tree = self.tree
        return Totals(
            params=sum(lp.layer.params for lp in top),
            trainable_before=sum(lp.trainable_params_before for lp in top),
            trainable_after=sum(lp.trainable_params_after for lp in top),
            added=sum(lp.adapter.params for lp in self.layers
                      if lp.adapter is not None and lp.adapter.new),
            held_before=sum(w.frozen_entries for lp in self.layers for w in lp.layer.weights
                            if tree.trains(lp.layer, w)),
            held_after=sum(p.entries for lp in self.layers if lp.frozen_parts
                           for p in lp.frozen_parts if self.trains(lp)[p.weight]),
        )

    def trains(self, lp: LayerPlan) -> dict[str, bool]:
        """Whether each of ``lp``'s own variables trains once the plan is written: the model's
        flag and its layer's on, not held off (`LayerPlan.off`), not frozen whole (a weight
        frozen whole is its variable's flag; entries frozen in part leave it training)."""
        on = self.root_after and lp.after
        whole = {p.weight for p in lp.frozen_parts if p.entries == math.prod(p.shape)}
        return {w.name: on and w.trainable and w.name not in lp.off and w.name not in whole
                for w in lp.layer.weights}

    @functools.cached_property
    def by_path(self) -> dict[str, LayerPlan]:
        return {lp.path: lp for lp in self.layers}

    @property
    def notes(self) -> tuple[str, ...]:
        """Facts about the outcome a user must know to train it as they expect."""
        bn = [lp for lp in self.layers if lp.batchnorm is not None]
        frozen = sum(1 for lp in bn if not lp.after)
        affine = sum(1 for lp in bn if lp.after and lp.affine)
        trainable = len(bn) - frozen - affine
        notes = []
        partial_bn = [lp for lp in bn if lp.partial and not lp.affine]
        if partial_bn:  # (an affine one is told below: its statistics stay fixed)
            notes.append(
                f"{len(partial_bn)} BatchNormalization layer{'s have' if len(partial_bn) > 1 else ' has'}"
                " frozen parts but stay trainable: in training they normalize with batch "
                "statistics and update their moving averages.")
        if frozen:
            notes.append(
                f"{frozen} BatchNormalization layer{'s are' if frozen > 1 else ' is'} frozen: "
                "Keras runs a frozen BatchNormalization in inference mode (it normalizes with its "
                "moving mean and variance and stops updating them).")
        if trainable and frozen:
            notes.append(
                f"{trainable} BatchNormalization layer{'s stay' if trainable > 1 else ' stays'} "
                "trainable: in training they normalize with batch statistics and update their "
                "moving averages, which small fine-tuning batches can disturb.")
        if affine:
            notes.append(
                f"{affine} BatchNormalization layer{'s train' if affine > 1 else ' trains'} gamma "
                "and beta under 'batchnorm affine': in training too they normalize with their "
                "fixed moving statistics and never update them.")
        lora = [lp for lp in self.layers if lp.adapter is not None]
        if lora:
            trains = sum(lp.adapter.params for lp in lora
                         if all(self.trains(lp)[n] for n in lp.adapter.factors))
            notes.append(
                f"{len(lora)} layer{'s have' if len(lora) > 1 else ' has'} LoRA, with {trains:,} "
                "factor parameters training: save with 'surgery apply' or read back with "
                "surgery.load_model, which gives LoRA back with its alpha and factors that "
                "train (keras.models.load_model zeroes both factors, so they never move).")
        held = sum(1 for lp in self.layers if lp.after
                   for w in lp.layer.weights if w.held and w.name in lp.off and
                   not (lp.adapter is not None and w.name == lp.adapter.weight))
        if held:
            notes.append(
                f"{held} variable{'s keep their' if held > 1 else ' keeps its'} own trainable "
                "flag off (LoRA's merged kernels, flags set by hand): rules that unfreeze their "
                "layers leave them off.")
        return tuple(notes)


def _settle_parts(node: Layer, state: bool, rule: Optional[Rule], ops: tuple[PartOp, ...],
                  source: str) -> tuple[bool, Optional[Rule], tuple[FrozenPart, ...]]:
    """A leaf's final state once part rules apply after its whole-layer state: the layer flag,
    the last rule that touched it, and the entries frozen inside it."""
    existing = {w.name: w.frozen for w in node.weights if w.frozen}
    if not ops:
        if state and rule is None and existing:  # earlier sub-layer freezes stay as they were
            return True, None, _frozen_parts(node, {n: set(i) for n, i in existing.items()},
                                             source, None)
        return state, rule, ()
    if not state and not any(op.rule.trainable for op in ops):
        return False, rule, ()  # freezing parts of a frozen layer changes nothing
    frozen: dict[str, set[int]] = {}
    if state:
        if rule is None:  # untouched by whole rules: start from what the model carries
            frozen = {name: set(idx) for name, idx in existing.items()}
    else:
        # Unfreezing part of a frozen layer: every weight that trains with it starts frozen.
        for w in node.weights:
            if w.follows_layer:
                frozen[w.name] = set(range(_positions(node, w.name, ops[0], source)))
    for op in ops:
        for sel in op.selections:
            current = frozen.setdefault(sel.weight, set())
            if op.rule.trainable:
                current.difference_update(sel.indices)
            else:
                current.update(sel.indices)
    last_rule = ops[-1].rule
    sizes = {w.name: _positions(node, w.name, ops[-1], source) for w in node.weights
             if w.follows_layer and w.name in frozen}
    capable = [w.name for w in node.weights if w.follows_layer]
    if not state and all(len(frozen.get(n, ())) == sizes.get(n, -1) for n in capable):
        # Frozen whole in the end: the flag says it for free. The rule to name is the one that
        # froze it back, if parts of it were unfrozen on the way; else the whole-layer rule.
        refrozen = any(op.rule.trainable for op in ops)
        return False, (last_rule if refrozen else rule), ()
    if not any(frozen.values()):
        return True, last_rule, ()
    return True, last_rule, _frozen_parts(node, frozen, source, ops[-1])


def _positions(node: Layer, weight: str, op: PartOp, source: str) -> int:
    try:
        sel = whole_weight(node, weight)
    except PartError as exc:
        raise SelectorError(f"{exc}; so its other weights cannot stay frozen around a part",
                            op.rule.span, source=source) from None
    return sel.size


def _frozen_parts(node: Layer, frozen: dict[str, set[int]], source: str,
                  op: Optional[PartOp]) -> tuple[FrozenPart, ...]:
    out = []
    for w in node.weights:
        idx = frozen.get(w.name)
        if not idx:
            continue
        try:
            whole = whole_weight(node, w.name)
            if len(idx) == whole.size:  # a whole weight needs no output axis (EinsumDense's)
                sel = whole
            else:
                (sel,) = select_part(node.path, node.cls, node.shapes, w.name, sorted(idx),
                                     dict(node.details))
        except PartError as exc:
            if op is None:  # the model's own record disagrees with its shapes
                raise SurgeryError(str(exc)) from None
            raise SelectorError(str(exc), op.rule.span, source=source) from None
        out.append(FrozenPart(w.name, sel.shape, sel.axes, sel.indices, sel.size, sel.entries))
    return tuple(out)


def make_plan(tree: LayerTree, resolution: Resolution, source: str = "",
              adapters: Optional[Adapters] = None) -> Plan:
    """The plan of ``resolution``, resolved against ``tree``: the model as it is, or, with
    ``adapters``, as it will be once its new LoRA factors exist (``adapters.tree``; then the
    state before is read from ``adapters.original``)."""
    before_tree = adapters.original if adapters is not None else tree
    lora = adapters.by_path if adapters is not None else {}
    after: dict[str, bool] = {}
    own: dict[str, bool] = {}  # a unit's own weights: whether they train with its flag
    rule_of: dict[str, Optional[Rule]] = {}
    parts_of: dict[str, tuple[FrozenPart, ...]] = {}
    off_of: dict[str, tuple[str, ...]] = {}

    def settle(node: Layer) -> bool:
        rule_of[node.path] = None
        if node.unit:
            rule = resolution.deciding.get(node.path)
            ops = resolution.part_ops.get(node.path, ())
            state = rule.trainable if rule is not None else tree.effectively_trainable(node)
            adapter = lora.get(node.path)
            if adapter is not None and adapter.statement is not None:
                _no_parts_on(adapter, ops, source)
                # The statement trains the factors; a rule after it that covers the layer
                # decides them as it decides the rest of the layer.
                ab = rule.trainable if rule is not None and \
                    rule.number >= adapter.statement.order else True
                rule_of[node.path] = rule
                parts_of[node.path] = ()
                own[node.path] = state or ab
                off_of[node.path] = _lora_off(node, adapter, state, ab)
            else:
                state, rule, parts = _settle_parts(node, state, rule, ops, source)
                policy = resolution.policies.get(node.path)
                if policy is not None and policy.mode == BN_FROZEN:
                    state, parts = False, ()  # the policy stands whatever the rules unfreeze
                rule_of[node.path] = rule
                parts_of[node.path] = parts
                own[node.path] = state
                off_of[node.path] = _off(tree, node, state, rule is not None or bool(ops))
        # Evaluate every child (no short-circuit: each needs its own state).
        inside = any([settle(c) for c in node.children])
        state = own.get(node.path, False) or inside
        if state and not own.get(node.path, True):  # own weights frozen, sublayers training
            off_of[node.path] = tuple(w.name for w in node.weights if w.trainable)
        after[node.path] = state
        return state

    root_after = settle(tree.root)

    def params_after(node: Layer) -> int:
        off = off_of.get(node.path, ())
        entries = {p.weight: p.entries for p in parts_of.get(node.path, ())}
        mine = sum(w.size - entries.get(w.name, 0) for w in node.weights
                   if w.trainable and w.name not in off) if after[node.path] else 0
        return mine + sum(params_after(c) for c in node.children)

    def params_before(node: Layer) -> int:
        return sum(w.size - w.frozen_entries for w in node.weights
                   if before_tree.trains(node, w)) + \
            sum(params_before(c) for c in node.children)

    def was(n: Layer) -> Layer:
        return before_tree.get(n.path) if before_tree is not tree else n

    layers = tuple(
        LayerPlan(
            layer=n,
            before=before_tree.effectively_trainable(was(n)),
            after=after[n.path],
            rule=rule_of[n.path],
            trainable_params_before=params_before(was(n)),
            trainable_params_after=params_after(n),
            frozen_parts=parts_of.get(n.path, ()),
            off=off_of.get(n.path, ()),
            was_off=_found_off(before_tree, was(n)),
            policy=resolution.policies.get(n.path),
            affine=_affine(n, resolution.policies.get(n.path), after[n.path]),
            adapter=lora.get(n.path),
        )
        for n in tree.layers()
    )
    return Plan(tree, layers, tree.root.trainable, root_after, resolution.rules,
                resolution.diagnostics)


def _no_parts_on(adapter: Adapter, ops: tuple[PartOp, ...], source: str) -> None:
    if ops:
        op = ops[0]
        raise SelectorError(
            f"'{adapter.path}' gets LoRA (line {adapter.statement.span.line}): its "
            f"{adapter.weight} is frozen whole and its update trains in the two factors, so its "
            f"weights are decided whole: write '{op.rule.action} {adapter.path}' (the factors "
            f"and the bias follow it)", op.rule.span, source=source)


def _lora_off(node: Layer, adapter: Adapter, base: bool, factors: bool) -> tuple[str, ...]:
    """What stays off in a layer with LoRA whose flag is on: the adapted weight always, the
    other weights where the rules freeze them, the factors where a later rule froze them."""
    if not (base or factors):
        return ()
    out = []
    for w in node.weights:
        if not w.trainable:
            continue
        if w.name == adapter.weight or w.held:
            out.append(w.name)
        elif w.name in adapter.factors:
            if not factors:
                out.append(w.name)
        elif not base:
            out.append(w.name)
    return tuple(out)


def _off(tree: LayerTree, node: Layer, state: bool, decided: bool) -> tuple[str, ...]:
    """A unit's own weights whose variable flags stay off while its flag is on."""
    if not state:
        return ()
    if decided:
        return tuple(w.name for w in node.weights if w.trainable and w.held)
    return _found_off(tree, node)


def _found_off(tree: LayerTree, node: Layer) -> tuple[str, ...]:
    if not tree.effectively_trainable(node):
        return ()
    return tuple(w.name for w in node.weights if w.trainable and not tree.trains(node, w))


def _affine(node: Layer, policy: Optional[BatchNormRule], trainable: bool) -> bool:
    # Under a policy, only a layer that trains needs the class: frozen, every BatchNormalization
    # behaves alike, and a plain one keeps the output loadable without surgery. Without one, the
    # class stays as it is: a later phase that unfreezes the layer (against the model as applied)
    # must find it as the spec's author left it. The manifest records the class (verify reads it).
    if policy is None:
        return node.affine
    return policy.mode == BN_AFFINE and trainable


@dataclass(frozen=True)
class PhasePlan:
    """The state from ``epoch`` on: ``plan`` is the spec up to that phase, against the model as
    it was given (so ``before`` is always the input's state); ``header`` is None for phase 0."""

    epoch: int
    header: Optional[Phase]
    plan: Plan


# Each phase is planned from every statement up to it, so a schedule costs the sum, over its
# phases, of the statements up to each: past this many (a real schedule has a handful of phases,
# a real spec dozens of statements; 700 one-statement phases, 245,000, took 10 s) the spec is refused
# rather than planned for minutes.
MAX_PHASE_STATEMENTS = 100_000


def check_schedule_size(spec: Spec) -> None:
    """A SpecError at the phase header where planning the schedule would pass
    `MAX_PHASE_STATEMENTS`."""
    if not spec.phases:
        return
    counts: dict[int, int] = {}
    for s in spec.rules + spec.policies:
        counts[s.epoch] = counts.get(s.epoch, 0) + 1
    headers = {p.epoch: p for p in spec.phases}
    upto = work = 0
    for epoch in spec.epochs:
        upto += counts.get(epoch, 0)
        work += upto
        if work > MAX_PHASE_STATEMENTS:
            raise SpecError(
                f"the schedule is too large to plan: each phase is planned from every statement "
                f"up to it, and by this phase that is over {MAX_PHASE_STATEMENTS:,} statements "
                f"in all ({len(spec.epochs):,} phases, {len(spec.rules) + len(spec.policies):,} "
                f"statements); use fewer phases", headers[epoch].span, source=spec.source)


def plan_phases(spec: Spec, tree: LayerTree, *, allow_empty: bool = False) -> tuple[PhasePlan, ...]:
    """One plan per phase, each resolving every statement up to its phase. Each phase reports
    the findings about its own statements only (a phase-0 rule that a later phase overrides
    still decides the epochs before it: it is not 'without effect')."""
    check_schedule_size(spec)
    out = []
    headers = {p.epoch: p for p in spec.phases}
    # LoRA statements are phase 0's (checks.py): one set of adapters for every phase.
    adapters = resolve_lora(spec, tree, allow_empty=allow_empty)
    for epoch in spec.epochs:
        plan = make_plan(adapters.tree, resolve(spec.until(epoch), adapters.tree,
                                                allow_empty=allow_empty), spec.source, adapters)
        if epoch == 0 and adapters.unmatched:
            plan = replace(plan, diagnostics=plan.diagnostics + tuple(
                Diagnostic("warning", d.message, d.span) for d in adapters.unmatched))
        if epoch == 0 and adapters.results:
            plan = replace(plan, lora=adapters.results)
        own = SpanIndex([s.span for s in spec.rules + spec.policies + spec.loras
                         if s.epoch == epoch])
        mine = tuple(d for d in plan.diagnostics if d.span in own)
        header = headers.get(epoch)
        if out and not changed_layers(out[-1].plan, plan):
            mine += (Diagnostic("warning", f"the phase 'at epoch {epoch}:' changes no layer: "
                                "the state it asks for is the one before it", header.span),)
        out.append(PhasePlan(epoch, header, replace(plan, diagnostics=mine)))
    return tuple(out)


class SpanIndex:
    """The spans of some statements, to ask which spans lie inside one of them: statements never
    overlap, so the one that may hold a span is the last to start before it (a bisection; a
    scan of every statement for every diagnostic made long specs quadratic)."""

    def __init__(self, spans):
        ordered = sorted({((s.line, s.column), (s.end_line, s.end_column)) for s in spans})
        self._starts = [a for a, _ in ordered]
        self._ends = [b for _, b in ordered]

    def __contains__(self, span) -> bool:
        i = bisect.bisect_right(self._starts, (span.line, span.column)) - 1
        return i >= 0 and (span.end_line, span.end_column) <= self._ends[i]


def changed_layers(before: Plan, after: Plan) -> tuple[LayerPlan, ...]:
    """The leaves whose state differs between two phases' plans (flag, frozen parts or class),
    as they are in ``after``."""
    out = []
    for lp in after.layers:
        if not lp.layer.unit:
            continue
        was = before.by_path[lp.path]
        if (was.after, was.frozen_parts, was.affine, was.off) != (
                lp.after, lp.frozen_parts, lp.affine, lp.off):
            out.append(lp)
    return tuple(out)


def plan_spec(spec: Spec, tree: LayerTree, *, allow_empty: bool = False) -> Plan:
    """Resolve ``spec`` against ``tree`` and compute the plan: the pure core of every command.
    With phases, this is the state training starts from (phase 0), and its diagnostics are
    those of every phase, so that a selector of a later phase that matches nothing fails now,
    not in the middle of a training run."""
    phases = plan_phases(spec, tree, allow_empty=allow_empty)
    first = phases[0].plan
    if len(phases) == 1:
        return first
    every = tuple(d for ph in phases for d in ph.plan.diagnostics)
    return replace(first, phases=phases, diagnostics=tuple(
        sorted(every, key=lambda d: (d.span.line, d.span.column))))
