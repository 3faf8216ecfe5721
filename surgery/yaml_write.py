"""IR -> the YAML form of a spec (surgery/yaml_read.py reads it): what `surgery fmt --to yaml`
prints and what `fmt` writes for a .yaml spec.

One list item per statement, a phase as an item holding its statements, comments and blank lines
where they were (the layout is fmt's, `fmt.layout`). A name is written bare only where YAML
reads it back as that very string; anything else is quoted, and a character YAML cannot carry
raw is written as an escape.
"""

from __future__ import annotations

import re

import yaml

from .fmt import format_number, format_selector, layout
from .ir import BATCHNORM, LORA, BatchNormRule, LoraRule, Phase, Selector, Spec

__all__ = ["to_yaml"]

# Written bare only when plainly safe in a flow list too (PyYAML ends a plain scalar there at any
# of ',[]{}:?#') and read as a string (not as 'y', 'no', '10', '0x1f' or '2024-01-02').
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\*?[A-Za-z0-9_\-*]*")
_DOUBLE_QUOTED = {"\\": "\\\\", '"': '\\"', "\t": "\\t", "\r": "\\r", "\n": "\\n",
                  "\x00": "\\0", "\x85": "\\N", "\u2028": "\\L", "\u2029": "\\P"}


_RESOLVER = yaml.resolver.Resolver()


def _scalar(text: str) -> str:
    if _PLAIN.fullmatch(text) and \
            _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str":
        return text
    if text.isprintable():  # no control character, no line break of any kind
        return "'" + text.replace("'", "''") + "'"
    # A double-quoted scalar carries any character as an escape.
    return '"' + "".join(_DOUBLE_QUOTED.get(c) or (c if c.isprintable() else _escape(c))
                         for c in text) + '"'


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _comment(text: str) -> str:
    """A comment as YAML can carry it: on one line, with only characters YAML accepts. A
    character that is not printable (a control character, '\\r', '\\x85', '\\u2028', which
    YAML would read as a line break and the rest of the comment as YAML) is written as a visible
    escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else _escape(c) for c in text)


def _value(selectors: tuple[Selector, ...]) -> str:
    texts = [_scalar(format_selector(s)) for s in selectors]
    return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"


def to_yaml(spec: Spec) -> str:
    """The YAML form: one list item per statement, a phase as an item holding its statements,
    comments and blank lines where they were."""
    lines = ["version: 1", "rules:"]
    body = layout(spec)
    if not any(ln.statement is not None for ln in body):
        lines[-1] = "rules: []"
    for ln in body:
        if ln.blank_before:
            lines.append("")
        comment = _comment(ln.comment) if ln.comment is not None else None
        pad = "      " if ln.indented else "  "  # inside a phase: under '  - at epoch N:'
        st = ln.statement
        if st is None:
            lines.append(f"{pad}{comment}")
            continue
        if isinstance(st, Phase):
            item = [f"- at epoch {st.epoch}:"]
        elif isinstance(st, BatchNormRule):
            item = [f"- {BATCHNORM}: {st.mode}"]
            if st.selectors:
                item.append(f"  select: {_value(st.selectors)}")
        elif isinstance(st, LoraRule):
            item = [f"- {LORA}: {_value(st.selectors)}", f"  rank: {st.rank}"]
            if st.alpha is not None:
                item.append(f"  alpha: {format_number(st.alpha)}")
        else:
            item = [f"- {st.action}: {_value(st.selectors)}"]
        if not isinstance(st, Phase) and st.excepts:
            item.append(f"  except: {_value(st.excepts)}")
        if comment is not None:
            item[-1] += f"  {comment}"
        lines.extend(pad + x for x in item)
    return "\n".join(lines) + "\n"
