"""The canonical text of a spec: what `surgery fmt` prints and what conversions produce.

One statement per line, ``action selector, selector except selector``, names unquoted where the
grammar allows, comments kept where they were (own line, or after the statement they follow).
Formatting formatted text gives the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .ir import (
    WEIGHT, All, AnyDepth, Comment, Glob, Index, Name, Part, Range, Regex, Rule, Selector, Slice,
    Spec, TypeGlob,
)
from .parse import KEYWORDS

__all__ = ["format_spec", "format_rule", "format_selector", "format_name", "layout", "Line"]

_BARE = re.compile(r"[A-Za-z0-9_\-]+")


def format_name(name: str) -> str:
    """A layer name as the grammar reads it back exactly: bare when it can be, else quoted."""
    if _BARE.fullmatch(name) and name not in KEYWORDS and not name.startswith("layers["):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _segment(seg) -> str:
    if isinstance(seg, Name):
        return format_name(seg.value)
    if isinstance(seg, Glob):
        return seg.pattern
    if isinstance(seg, Regex):
        return "/" + seg.pattern.replace("/", "\\/") + "/"
    if isinstance(seg, TypeGlob):
        return "type:" + seg.pattern
    if isinstance(seg, Index):
        return f"layers[{seg.index}]"
    if isinstance(seg, Slice):
        parts = ["" if v is None else str(v) for v in (seg.start, seg.stop)]
        text = ":".join(parts)
        if seg.step is not None:
            text += f":{seg.step}"
        return f"layers[{text}]"
    if isinstance(seg, Range):
        first = format_name(seg.first) if seg.first is not None else ""
        last = format_name(seg.last) if seg.last is not None else ""
        return f"{first}..{last}"
    if isinstance(seg, All):
        return "all"
    if isinstance(seg, AnyDepth):
        return "**"
    raise AssertionError(f"unknown segment {seg!r}")  # pragma: no cover


def format_part(part: Part) -> str:
    if part.kind == WEIGHT:
        return f".{part.name}"
    return f".{part.kind}{_segment(part.channels)[len('layers'):]}"


def format_selector(sel: Selector) -> str:
    text = "/".join(_segment(s) for s in sel.segments)
    return text + format_part(sel.part) if sel.part is not None else text


def format_rule(rule: Rule) -> str:
    text = f"{rule.action} " + ", ".join(format_selector(s) for s in rule.selectors)
    if rule.excepts:
        text += " except " + ", ".join(format_selector(s) for s in rule.excepts)
    return text


@dataclass(frozen=True)
class Line:
    """One line of canonical output: a statement (with the comment that ends its line, if any)
    or a comment of its own; ``blank_before`` keeps one blank line where the source had some."""

    rule: Optional[Rule]
    comment: Optional[str]
    blank_before: bool


def layout(spec: Spec) -> list[Line]:
    """Statements and comments in source order. A comment on the line where a statement ends
    stays with it; any other comment keeps a line of its own."""
    items = sorted([(r.span.line, r.span.column, r) for r in spec.rules] +
                   [(c.span.line, c.span.column, c) for c in spec.comments],
                   key=lambda t: (t[0], t[1]))
    out: list[Line] = []
    last_end = None  # the source line where the previous output line ended
    for line, _col, item in items:
        if isinstance(item, Comment) and out and line == last_end and out[-1].comment is None \
                and out[-1].rule is not None:
            out[-1] = Line(out[-1].rule, item.text, out[-1].blank_before)
            continue
        blank = last_end is not None and line > last_end + 1
        if isinstance(item, Comment):
            out.append(Line(None, item.text, blank))
            last_end = line
        else:
            out.append(Line(item, None, blank))
            last_end = item.span.end_line
    return out


def format_spec(spec: Spec) -> str:
    """Canonical .frz text; formatting formatted text gives the same text."""
    lines = []
    for ln in layout(spec):
        if ln.blank_before:
            lines.append("")
        text = format_rule(ln.rule) if ln.rule is not None else ""
        if ln.comment is not None:
            text = f"{text}  {ln.comment}" if text else ln.comment
        lines.append(text)
    return "\n".join(lines) + "\n" if lines else ""
