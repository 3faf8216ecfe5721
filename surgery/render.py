r"""Diagnostics to text, and the one notion of a line that every position in surgery uses.

A position is a 1-based line and column with lines broken at '\n' only: that is how Lark counts
while parsing a .frz spec, and the YAML reader reports PyYAML's marks the same way (from their
character index), so a '\f', a '\v', a lone '\r', '\x85' or '\u2028' is a character of its line
everywhere. `str.splitlines()` breaks at all of those too, and once showed the caret under the
wrong line: no code that turns an index or a line number into source text uses it; it uses
`Lines`.

A diagnostic renders as ``file:line:col: severity: message``, then the source line and one caret
under the column. `render_diagnostics` is what the command calls, once, for everything it prints.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Optional

__all__ = ["Lines", "render_diagnostics", "headline"]

# Lines longer than this are cut around the column, so the caret stays on screen.
_SHOWN = 120


class Lines:
    r"""A text's lines, broken at '\n' only: an index -> (line, column), and a line's text.

    Built once per text (one pass over its line breaks); every lookup is then a bisection, so a
    thousand diagnostics of one spec cost a thousand lookups, not a thousand splits."""

    def __init__(self, text: str):
        self.text = text
        starts = [0]
        find = text.find
        i = find("\n")
        while i >= 0:
            starts.append(i + 1)
            i = find("\n", i + 1)
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def position(self, index: int) -> tuple[int, int]:
        """The (line, column) of the character at ``index``; the end of the text is valid."""
        n = bisect.bisect_right(self.starts, index) - 1
        return n + 1, index - self.starts[n] + 1

    def line(self, number: int) -> str:
        r"""Line ``number`` (1-based) for display: without its '\n' and a '\r' that ends it."""
        start = self.starts[number - 1]
        end = self.starts[number] - 1 if number < len(self.starts) else len(self.text)
        text = self.text[start:end]
        return text[:-1] if text.endswith("\r") else text

    def before(self, index: int) -> str:
        """The text of the line of ``index`` up to that index."""
        line, _ = self.position(index)
        return self.text[self.starts[line - 1]:index]


def headline(diag) -> str:
    """``file:line:col: severity: message``."""
    s = diag.span
    return f"{s.file}:{s.line}:{s.column}: {diag.severity}: {diag.message}"


def render_diagnostics(diagnostics: Iterable, source: Optional[str]) -> str:
    """Each diagnostic's headline, then (when ``source`` is given and holds the line) the line
    and one caret under the column; the source is split once for all of them."""
    lines = Lines(source) if source is not None else None
    return "\n".join(_render(d, lines) for d in diagnostics)


def _render(diag, lines: Optional[Lines]) -> str:
    out = [headline(diag)]
    if lines is not None and 1 <= diag.span.line <= len(lines):
        text = lines.line(diag.span.line)
        col = max(diag.span.column - 1, 0)
        start = max(0, col - _SHOWN // 2) if len(text) > _SHOWN else 0
        shown = text[start:start + _SHOWN]
        prefix = "..." if start else ""
        out.append("  " + prefix + _printable(shown))
        out.append("  " + " " * (len(prefix) + col - start) + "^")
    return "\n".join(out)


def _printable(text: str) -> str:
    # Control characters (NUL, escape sequences) must not reach the user's terminal raw; replacing
    # each by one character keeps the caret aligned.
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text).replace("\t", " ")
