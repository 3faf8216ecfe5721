"""The final state of every layer, computed before anything is written to a model.

Leaf layers take the state of the rule that decides them, or keep their effective state when no
rule covers them. A container (nested model) is trainable exactly when something inside it is:
Keras's ``trainable`` setter recurses into sublayers and a frozen container hides its children's
weights, so containers are derived from their leaves, never decided on their own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from .errors import Diagnostic
from .ir import Rule, Spec
from .resolve import Resolution, RuleResult, resolve
from .tree import Layer, LayerTree

__all__ = ["LayerPlan", "Plan", "Totals", "make_plan", "plan_spec"]

_BATCHNORM = ("BatchNormalization", "SyncBatchNormalization")


@dataclass(frozen=True)
class LayerPlan:
    """One layer's state before and after, and the rule that decided it (None: no rule covered
    it, or it is a container whose state follows from the layers inside it)."""

    layer: Layer
    before: bool
    after: bool
    rule: Optional[Rule]
    trainable_params_before: int
    trainable_params_after: int

    @property
    def path(self) -> str:
        return self.layer.path

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class Totals:
    params: int
    trainable_before: int
    trainable_after: int

    @property
    def non_trainable_before(self) -> int:
        return self.params - self.trainable_before

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

    @property
    def totals(self) -> Totals:
        leaves = [lp for lp in self.layers if not lp.layer.children]
        return Totals(
            params=sum(lp.layer.params for lp in leaves),
            trainable_before=sum(lp.trainable_params_before for lp in leaves),
            trainable_after=sum(lp.trainable_params_after for lp in leaves),
        )

    def state(self, path: str) -> bool:
        if path == "":
            return self.root_after
        return self.by_path[path].after

    @functools.cached_property
    def by_path(self) -> dict[str, LayerPlan]:
        return {lp.path: lp for lp in self.layers}

    @property
    def notes(self) -> tuple[str, ...]:
        """Facts about the outcome a user must know to train it as they expect."""
        bn = [lp for lp in self.layers if lp.layer.cls in _BATCHNORM]
        frozen = sum(1 for lp in bn if not lp.after)
        trainable = len(bn) - frozen
        notes = []
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
        return tuple(notes)


def make_plan(tree: LayerTree, resolution: Resolution) -> Plan:
    after: dict[str, bool] = {}
    rule_of: dict[str, Optional[Rule]] = {}

    def settle(node: Layer) -> bool:
        if not node.children:
            rule = resolution.deciding.get(node.path)
            state = rule.trainable if rule is not None else tree.effectively_trainable(node)
            rule_of[node.path] = rule
        else:
            # Evaluate every child (no short-circuit: each needs its own state).
            state = any([settle(c) for c in node.children])
            rule_of[node.path] = None
        after[node.path] = state
        return state

    root_after = settle(tree.root)

    def trainable_params(node: Layer, trains) -> int:
        if node.children:
            return sum(trainable_params(c, trains) for c in node.children)
        return node.trainable_capable_params if trains(node) else 0

    trains_after = lambda n: after[n.path]  # noqa: E731

    layers = tuple(
        LayerPlan(
            layer=n,
            before=tree.effectively_trainable(n),
            after=after[n.path],
            rule=rule_of[n.path],
            trainable_params_before=trainable_params(n, tree.effectively_trainable),
            trainable_params_after=trainable_params(n, trains_after),
        )
        for n in tree.layers()
    )
    return Plan(tree, layers, tree.root.trainable, root_after, resolution.rules,
                resolution.diagnostics)


def plan_spec(spec: Spec, tree: LayerTree, *, allow_empty: bool = False) -> Plan:
    """Resolve ``spec`` against ``tree`` and compute the plan: the pure core of every command."""
    return make_plan(tree, resolve(spec, tree, allow_empty=allow_empty))
