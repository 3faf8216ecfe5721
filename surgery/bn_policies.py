"""The 'batchnorm frozen|train|affine' statements against a model: which policy each
BatchNormalization layer gets (the last statement that covers it), and the two warnings about
rules and policies together. Called by resolve.py with its resolver (``r``: ``covered_by``,
``tree``), so that policies select layers exactly as rules do.
"""

from __future__ import annotations

from .errors import Diagnostic, SelectorError
from .ir import BN_FROZEN, BatchNormRule, Spec

__all__ = ["BATCHNORM_CLASSES", "resolve_policies", "held_by_frozen_policy",
           "unfrozen_without_policy"]

BATCHNORM_CLASSES = ("BatchNormalization", "SyncBatchNormalization")

_POLICY_CHOICES = ("'batchnorm frozen' keeps them in inference mode (nothing updates), "
                   "'batchnorm affine' trains gamma and beta and normalizes with the fixed moving "
                   "statistics, 'batchnorm train' is Keras's default (batch statistics in training, "
                   "moving averages updated by every fine-tuning batch)")


def resolve_policies(spec: Spec, r, errors: list, warnings: list,
                      allow_empty: bool) -> dict[str, BatchNormRule]:
    """Each BatchNormalization leaf's policy: the last 'batchnorm' statement covering it."""
    bn_leaves = [n.path for n in r.tree.leaves() if n.cls in BATCHNORM_CLASSES]
    decided: dict[str, BatchNormRule] = {}
    problems: list[Diagnostic] = []
    for pol in spec.policies:
        if pol.selectors:
            problems += [Diagnostic("error", "a policy applies to whole BatchNormalization "
                                    "layers: remove the part", sel.part.span)
                         for sel in pol.selectors if sel.part is not None]
            picked = r.covered_by([s for s in pol.selectors if s.part is None], problems)
            bn_set = set(bn_leaves)
            picked_bn = [p for p in picked if p in bn_set]
            if picked and not picked_bn:
                problems.append(Diagnostic(
                    "error", "this policy's selectors match no BatchNormalization layer",
                    pol.span))
        else:
            picked_bn = list(bn_leaves)
            if not picked_bn:
                warnings.append(Diagnostic(
                    "warning", "the model has no BatchNormalization layer: this policy does "
                    "nothing", pol.span))
        removed = r.covered_by(pol.excepts, problems)
        covered = [p for p in picked_bn if p not in removed]
        if picked_bn and not covered:
            warnings.append(Diagnostic(
                "warning", "this policy covers no layer once 'except' is applied", pol.span))
        for path in covered:
            decided[path] = pol
    if problems:
        errors.extend(problems)
        if not allow_empty:
            first = problems[0]
            raise SelectorError(first.message, first.span, source=spec.source,
                                diagnostics=tuple(problems))
    return decided


def held_by_frozen_policy(r, results, policies) -> list[Diagnostic]:
    """An unfreeze rule whose every layer with weights is a BatchNormalization layer that a
    'batchnorm frozen' policy keeps frozen: the rule does nothing, which the user must know."""
    found = []
    for res in results:
        if not res.rule.trainable:
            continue
        weighted = [p for p in res.decided if r.tree.get(p).weights]
        held = [p for p in weighted if p in policies and policies[p].mode == BN_FROZEN]
        if weighted and len(held) == len(weighted):
            pol = policies[held[0]]
            found.append(Diagnostic(
                "warning", f"this rule has no effect: '{pol.text}' (line {pol.span.line}) keeps "
                f"{'these BatchNormalization layers' if len(held) > 1 else repr(held[0])} frozen "
                f"whatever rules unfreeze; a later 'batchnorm affine' or 'batchnorm train' for "
                f"them lets them train", res.rule.span))
    return found


def unfrozen_without_policy(r, results, policies) -> list[Diagnostic]:
    """An unfreeze rule that leaves BatchNormalization layers trainable with no policy: the
    silent choice that most often ruins fine-tuning, so the user is asked to make it."""
    found = []
    for res in results:
        if not res.rule.trainable:
            continue
        # A layer that already carries the affine class has its policy (plan keeps it).
        bn = [p for p in res.decided if p not in policies and
              r.tree.get(p).cls in BATCHNORM_CLASSES and not r.tree.get(p).affine]
        if not bn:
            continue
        shown = ", ".join(bn[:3]) + (f", ... ({len(bn)} in all)" if len(bn) > 3 else "")
        found.append(Diagnostic(
            "warning", f"this rule unfreezes BatchNormalization layers ({shown}) without a "
            f"policy; say how they train: {_POLICY_CHOICES}", res.rule.span))
    return found
