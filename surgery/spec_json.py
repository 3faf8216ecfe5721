"""A spec's canonical JSON: its ordered operations as plain data (was surgery/compiled.py).

This is what `surgery compile` prints and what a manifest embeds: the meaning of the spec with
its spelling normalised (two specs that differ only in layout or quoting compile the same,
positions aside), each operation pinned to its line and column.

    {"format": 2,
     "operations": [{"number": 0, "line": 1, "column": 1, "epoch": 0, "action": "freeze",
                     "statement": "freeze all except conv5_*",
                     "select": [{"text": "all", "path": [{"kind": "all"}]}],
                     "except": [{"text": "conv5_*", "path": [...]}]}, ...],
     "policies": [{"number": 0, "line": 4, "column": 3, "epoch": 3, "action": "batchnorm",
                   "mode": "affine", "statement": "batchnorm affine", "select": [], "except": []}],
     "phases": [{"epoch": 3, "line": 3, "column": 1}]}

``operations`` are the freeze/unfreeze rules in order (the last one that covers a layer decides
it); ``policies`` the ``batchnorm frozen|train|affine`` statements in order, kept apart because
they decide something else (how a BatchNormalization layer behaves, not whether it trains), an
empty ``select`` meaning every BatchNormalization layer; ``phases`` the ``at epoch N:`` headers.
Every operation and policy carries the ``epoch`` of its phase (0 before the first header): the
spec in force at epoch E is the entries with ``epoch <= E``. Format 2 added ``epoch``,
``policies`` and ``phases``; the rules' fields are those of format 1. ``lora`` (present only
when the spec has LoRA statements, so that every other spec compiles as before) lists them in
order, each with its ``rank``, the ``alpha`` in force (the rank where none is written) and
``after_operations``, the number of operations before it: those from that number on come after
it and decide its layers' adapters too.
"""

from __future__ import annotations

from .fmt import format_lora, format_policy, format_rule, format_selector
from .ir import (
    All, AnyDepth, BatchNormRule, Glob, Index, LoraRule, Name, Phase, Range, Regex, Rule, Selector, Slice,
    Spec, TypeGlob,
)

__all__ = ["compile_spec", "FORMAT"]

FORMAT = 2


def _segment(seg) -> dict:
    if isinstance(seg, Name):
        return {"kind": "name", "value": seg.value}
    if isinstance(seg, Glob):
        return {"kind": "glob", "pattern": seg.pattern}
    if isinstance(seg, Regex):
        return {"kind": "regex", "pattern": seg.pattern}
    if isinstance(seg, TypeGlob):
        return {"kind": "type", "pattern": seg.pattern}
    if isinstance(seg, Index):
        return {"kind": "index", "index": seg.index}
    if isinstance(seg, Slice):
        return {"kind": "slice", "start": seg.start, "stop": seg.stop, "step": seg.step}
    if isinstance(seg, Range):
        return {"kind": "range", "first": seg.first, "last": seg.last}
    if isinstance(seg, All):
        return {"kind": "all"}
    if isinstance(seg, AnyDepth):
        return {"kind": "any_depth"}
    raise AssertionError(f"unknown segment {seg!r}")  # pragma: no cover


def _selector(sel: Selector) -> dict:
    out = {"text": format_selector(sel), "path": [_segment(s) for s in sel.segments]}
    if sel.part is not None:
        p = sel.part
        out["part"] = {"kind": p.kind, "name": p.name,
                       "channels": _segment(p.channels) if p.channels is not None else None}
    return out


def _where(st) -> dict:
    return {"number": st.number, "line": st.span.line, "column": st.span.column,
            "epoch": st.epoch}


def _operation(rule: Rule) -> dict:
    return {
        **_where(rule),
        "action": rule.action,
        "statement": format_rule(rule),
        "select": [_selector(s) for s in rule.selectors],
        "except": [_selector(s) for s in rule.excepts],
    }


def _policy(policy: BatchNormRule) -> dict:
    return {
        **_where(policy),
        "action": "batchnorm",
        "mode": policy.mode,
        "statement": format_policy(policy),
        "select": [_selector(s) for s in policy.selectors],
        "except": [_selector(s) for s in policy.excepts],
    }


def _lora(lora: LoraRule) -> dict:
    return {
        **_where(lora),
        "action": "lora",
        "rank": lora.rank,
        "alpha": lora.scale_alpha,
        "after_operations": lora.order,
        "statement": format_lora(lora),
        "select": [_selector(s) for s in lora.selectors],
        "except": [_selector(s) for s in lora.excepts],
    }


def _phase(phase: Phase) -> dict:
    return {"epoch": phase.epoch, "line": phase.span.line, "column": phase.span.column}


def compile_spec(spec: Spec) -> dict:
    return {
        "format": FORMAT,
        "operations": [_operation(r) for r in spec.rules],
        "policies": [_policy(p) for p in spec.policies],
        **({"lora": [_lora(lo) for lo in spec.loras]} if spec.loras else {}),
        "phases": [_phase(p) for p in spec.phases],
    }
