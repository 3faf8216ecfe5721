"""The compiled form of a spec: its ordered operations as plain data (canonical JSON).

This is what `surgery compile` prints and what a manifest embeds: the meaning of the spec with
its spelling normalised (two specs that differ only in layout or quoting compile the same,
positions aside), each operation pinned to its line and column.
"""

from __future__ import annotations

from .fmt import format_rule, format_selector
from .ir import All, AnyDepth, Glob, Index, Name, Range, Regex, Rule, Selector, Slice, Spec, TypeGlob

__all__ = ["compile_spec", "FORMAT"]

FORMAT = 1


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


def _operation(rule: Rule) -> dict:
    return {
        "number": rule.number,
        "line": rule.span.line,
        "column": rule.span.column,
        "action": rule.action,
        "statement": format_rule(rule),
        "select": [_selector(s) for s in rule.selectors],
        "except": [_selector(s) for s in rule.excepts],
    }


def compile_spec(spec: Spec) -> dict:
    return {"format": FORMAT, "operations": [_operation(r) for r in spec.rules]}
