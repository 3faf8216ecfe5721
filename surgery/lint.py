"""Checks on a spec alone, without a model and without TensorFlow (a pre-commit hook must be fast).

Syntax problems are caught by the parser; this module finds what parses but cannot be meant:
slices that are empty for every model, statements written twice, selectors listed twice,
rules that later rules override completely, where that can be decided from the text alone
(LoRA statements too: they decide their layers' adapters, not the layers, so no rule kills one),
and regexes with nested repeats, which can take exponential time (resolve.py stops them).
Given a model's LayerTree, it also reports every selector that matches nothing.
"""

from __future__ import annotations

from .errors import Diagnostic
from .fmt import format_lora, format_rule, format_selector
from .ir import All, Regex, Rule, Slice, Spec
from .lora import resolve_lora
from .plan import SpanIndex, check_schedule_size, plan_phases
from .regex_text import nested_repeat
from .resolve import REGEX_TIMEOUT, resolve
from .tree import LayerTree

__all__ = ["lint", "lint_with_model"]


def lint(spec: Spec) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    found += _empty_slices(spec)
    found += _slow_regexes(spec)
    # Within a phase only: the same statement in two phases, or a phase-0 rule a later phase
    # overrides, each decide some epochs.
    for epoch in spec.epochs:
        rules = [r for r in spec.rules if r.epoch == epoch]
        found += _repeated(rules)
        found += _dead_rules(rules)
    found += _repeated(list(spec.loras), format_lora)
    return sorted(found, key=lambda d: (d.span.line, d.span.column))


def lint_with_model(spec: Spec, tree: LayerTree) -> list[Diagnostic]:
    """`lint` plus what only a model can tell: selectors that match nothing (errors, as in
    `apply`), rules that the model's layers make ineffective, BatchNormalization layers unfrozen
    without a policy, and phases that change nothing."""
    check_schedule_size(spec)
    unmatched: list[Diagnostic] = []
    findings: list[Diagnostic] = []
    # LoRA statements first, as plan.py resolves them: the rules see the model with its adapters.
    adapters = resolve_lora(spec, tree, allow_empty=True)
    unmatched += adapters.unmatched
    tree = adapters.tree
    for epoch in spec.epochs:
        # Each phase's statements, resolved after everything before them: what they do then.
        resolution = resolve(spec.until(epoch), tree, allow_empty=True)
        mine = SpanIndex([s.span for s in spec.rules + spec.policies if s.epoch == epoch])
        unmatched += [d for d in resolution.unmatched if d.span in mine]
        findings += [d for d in resolution.findings if d.span in mine]
    headers = [p.span for p in spec.phases]
    findings += [d for ph in plan_phases(spec, adapters.original, allow_empty=True)
                 for d in ph.plan.diagnostics if d.span in headers]
    errors = {(d.span.line, d.span.column) for d in unmatched}
    found = [d for d in lint(spec) if (d.span.line, d.span.column) not in errors]
    found += unmatched
    # A rule the text already shows dead is not reported again by the model.
    seen = {(d.span.line, d.span.column, d.message[:20]) for d in found}
    found += [d for d in findings if (d.span.line, d.span.column, d.message[:20]) not in seen]
    return sorted(found, key=lambda d: (d.span.line, d.span.column))


def _empty_slices(spec: Spec) -> list[Diagnostic]:
    out = []
    for rule in spec.rules + spec.loras:
        for sel in rule.selectors + rule.excepts:
            for seg in sel.segments:
                if isinstance(seg, Slice) and _always_empty(seg):
                    out.append(Diagnostic("warning", f"'{format_selector(sel)}' is empty for "
                                          "every model: the slice selects no layer", seg.span))
    return out


def _slow_regexes(spec: Spec) -> list[Diagnostic]:
    out = []
    for statement in spec.rules + spec.policies:
        for sel in statement.selectors + statement.excepts:
            for seg in sel.segments:
                if isinstance(seg, Regex):
                    at = nested_repeat(seg.pattern)
                    if at is not None:
                        out.append(Diagnostic(
                            "warning", f"/{seg.pattern}/ repeats a group that holds a repeated "
                            f"part ('{at}'): on a long name such a regex can backtrack for "
                            f"minutes (surgery stops it after {REGEX_TIMEOUT:g} s); write each "
                            "repeated part once", seg.span))
    return out


def _always_empty(s: Slice) -> bool:
    """True when the slice is empty whatever the number of layers: both bounds on the same side
    (both from the start or both from the end) and not in the direction of the step."""
    if s.start is None or s.stop is None or (s.start < 0) != (s.stop < 0):
        return False
    step = s.step if s.step is not None else 1
    return s.start >= s.stop if step > 0 else s.start <= s.stop


def _repeated(rules: list, spelled=format_rule) -> list[Diagnostic]:
    out = []
    first_seen: dict[str, Rule] = {}
    for rule in rules:
        text = spelled(rule)
        if text in first_seen:
            out.append(Diagnostic("warning", f"duplicate statement: the same as line "
                                  f"{first_seen[text].span.line}", rule.span))
        else:
            first_seen[text] = rule
        listed: set[str] = set()
        for sel in rule.selectors + rule.excepts:
            key = format_selector(sel)
            if key in listed:
                out.append(Diagnostic("warning", f"'{key}' is listed twice in this statement",
                                      sel.span))
            listed.add(key)
    return out


def _dead_rules(rules: list[Rule]) -> list[Diagnostic]:
    """A rule is dead when later rules without 'except' cover each of its selectors: a later
    'all' (at the top level) covers everything; otherwise the same selector written later."""
    out = []
    texts = [format_rule(r) for r in rules]
    first_index: dict[str, int] = {}
    for i, t in enumerate(texts):
        first_index.setdefault(t, i)
    covered_after: set[str] = set()
    everything_after: Rule | None = None
    deciders: dict[str, Rule] = {}
    for i in range(len(rules) - 1, -1, -1):
        rule = rules[i]
        keys = [format_selector(s) for s in rule.selectors]
        if first_index[texts[i]] == i:  # a repeat is reported as such, once
            if everything_after is not None:
                out.append(_dead(rule, [everything_after]))
            elif keys and all(k in covered_after for k in keys):
                out.append(_dead(rule, [deciders[k] for k in keys]))
        if not rule.excepts:
            for k, sel in zip(keys, rule.selectors):
                covered_after.add(k)
                deciders.setdefault(k, rule)
                if len(sel.segments) == 1 and isinstance(sel.segments[0], All):
                    everything_after = everything_after or rule
    return out


def _dead(rule: Rule, by: list[Rule]) -> Diagnostic:
    unique = sorted({r.number: r for r in by}.values(), key=lambda r: r.number)
    named = ", ".join(f"'{format_rule(r)}' (line {r.span.line})" for r in unique[:3])
    return Diagnostic("warning", f"this rule has no effect: later rules decide every layer it "
                      f"covers: {named}", rule.span)
