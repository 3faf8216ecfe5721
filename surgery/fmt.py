"""The canonical text of a spec: what `surgery fmt` prints and what conversions produce.

One statement per line, ``action selector, selector except selector`` (``batchnorm MODE ...``
for a BatchNormalization policy), names unquoted where the grammar allows, comments kept where
they were (own line, or after the statement they follow). A phase header ``at epoch N:`` stands
on its own line after a blank one, and the statements of its block follow it indented by two
spaces:

    freeze all

    at epoch 3:
      unfreeze conv5_*
      batchnorm affine

Formatting formatted text gives the same text, and parses to the same rules, policies and phases.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from .ir import (
    BATCHNORM, KEYWORDS, LORA, WEIGHT, All, AnyDepth, BatchNormRule, Comment, Glob, Index,
    LoraRule, Name, Part, Phase, Range, Regex, Rule, Selector, Slice, Spec, Statement, TypeGlob,
)

__all__ = ["format_spec", "format_rule", "format_policy", "format_lora", "format_phase",
           "format_selector", "format_name", "statement_text", "layout", "Line"]

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


def statement_text(head: str, selectors: tuple[Selector, ...],
                   excepts: tuple[Selector, ...]) -> str:
    """``head selector, selector except selector``: a statement's canonical text from its parts
    (``head`` is ``freeze``, ``unfreeze`` or ``batchnorm MODE``)."""
    text = head
    if selectors:
        text += " " + ", ".join(format_selector(s) for s in selectors)
    if excepts:
        text += " except " + ", ".join(format_selector(s) for s in excepts)
    return text


def format_rule(rule: Rule) -> str:
    return statement_text(rule.action, rule.selectors, rule.excepts)


def format_policy(policy: BatchNormRule) -> str:
    """``batchnorm MODE``, then its selectors and exceptions when it has any."""
    return statement_text(f"{BATCHNORM} {policy.mode}", policy.selectors, policy.excepts)


def format_lora(lora: LoraRule) -> str:
    """``lora rank=R``, ``alpha=A`` where it is written, then the selectors and exceptions."""
    head = f"{LORA} rank={lora.rank}"
    if lora.alpha is not None:
        head += f" alpha={format_number(lora.alpha)}"
    return statement_text(head, lora.selectors, lora.excepts)


def format_number(value: float) -> str:
    """An alpha as it reads best, and parses back to the same float: 16, not 16.0."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def format_phase(phase: Phase) -> str:
    return f"at epoch {phase.epoch}:"


def format_statement(item: Statement) -> str:
    """A rule, a policy or a phase header, as its canonical line (without indentation)."""
    if isinstance(item, Rule):
        return format_rule(item)
    if isinstance(item, BatchNormRule):
        return format_policy(item)
    if isinstance(item, LoraRule):
        return format_lora(item)
    if isinstance(item, Phase):
        return format_phase(item)
    raise AssertionError(f"not a statement: {item!r}")  # pragma: no cover


@dataclass(frozen=True)
class Line:
    """One line of canonical output: a statement (a rule, a policy or an ``at epoch N:`` header;
    with the comment that ends its line, if any) or a comment of its own. ``blank_before`` puts
    one blank line before it: where the source had some, and before every phase header (or before
    the comments written right above the header, which introduce it). ``indented`` lines are
    inside an ``at epoch N:`` block."""

    statement: Optional[Statement]
    comment: Optional[str]
    blank_before: bool
    indented: bool = False

    @property
    def rule(self) -> Optional[Rule]:
        """The freeze/unfreeze rule on this line, if that is what it holds."""
        return self.statement if isinstance(self.statement, Rule) else None

    @property
    def header(self) -> Optional[Phase]:
        return self.statement if isinstance(self.statement, Phase) else None


def layout(spec: Spec) -> list[Line]:
    """Statements, phase headers and comments in source order.

    A comment on the line where a statement (or a header) ends stays with it; any other comment
    keeps a line of its own. Statements after a header are indented, up to the next header; so
    is an own-line comment there, when a statement of the block follows it, or, at the end of a
    block, when it was written to the right of the header (in the .frz text and in the YAML
    form alike: deeper than the header's column). A comment at the end of a block written no
    deeper than the header belongs to what follows: with the next header, it is that header's
    introduction and the blank line before the header goes above it.
    """
    statements = [*spec.rules, *spec.policies, *spec.loras, *spec.phases]
    items = sorted([(s.span.line, s.span.column, s) for s in statements] +
                   [(c.span.line, c.span.column, c) for c in spec.comments],
                   key=lambda t: (t[0], t[1]))
    # For each item, whether the next statement or header after it is a statement.
    statement_follows = [False] * len(items)
    follows = False
    for n in range(len(items) - 1, -1, -1):
        statement_follows[n] = follows
        if not isinstance(items[n][2], Comment):
            follows = not isinstance(items[n][2], Phase)
    out: list[Line] = []
    header: Optional[Phase] = None  # the header of the block the items are in
    last_end = None  # the source line where the previous output line ended
    for n, (line, column, item) in enumerate(items):
        if isinstance(item, Comment) and out and line == last_end and out[-1].comment is None \
                and out[-1].statement is not None:
            last = out[-1]
            out[-1] = Line(last.statement, item.text, last.blank_before, last.indented)
            continue
        blank = last_end is not None and line > last_end + 1
        if isinstance(item, Comment):
            inside = header is not None and (statement_follows[n] or column > header.span.column)
            out.append(Line(None, item.text, blank, inside))
            last_end = line
            continue
        if isinstance(item, Phase):
            header = item
        out.append(Line(item, None, blank, header is not None and item is not header))
        last_end = item.span.end_line
    # A blank line before each header, above the comments that lead into it.
    for i, ln in enumerate(out):
        if ln.header is None:
            continue
        k = i
        while k > 0 and not out[k].blank_before and out[k - 1].statement is None and \
                not out[k - 1].indented:
            k -= 1
        if k > 0 and not out[k].blank_before:
            out[k] = dataclasses.replace(out[k], blank_before=True)
    return out


def format_spec(spec: Spec) -> str:
    """Canonical .frz text; formatting formatted text gives the same text."""
    lines = []
    for ln in layout(spec):
        if ln.blank_before:
            lines.append("")
        text = format_statement(ln.statement) if ln.statement is not None else ""
        if ln.comment is not None:
            text = f"{text}  {ln.comment}" if text else ln.comment
        lines.append(("  " if ln.indented else "") + text)
    return "\n".join(lines) + "\n" if lines else ""
