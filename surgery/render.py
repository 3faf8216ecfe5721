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


# Lines keeps, per block of this many characters, the count of line breaks before it and where
# the last of them is: a lookup counts within one block. (A list of every line's start took 36
# bytes a line: a 64 MiB spec of line breaks needed 2.3 GB.)
_BLOCK = 4096


class Lines:
    r"""A text's lines, broken at '\n' only: an index -> (line, column), and a line's text.

    Built once per text (one pass of C-speed counts, a block at a time); a lookup then counts
    the line breaks of one block, so a thousand diagnostics of one spec cost a thousand short
    counts, not a thousand scans, and the index takes 16 bytes per 4,096 characters."""

    def __init__(self, text: str):
        self.text = text
        count, rfind = text.count, text.rfind
        breaks, last = [0], [-1]  # at each block's start: line breaks before it, the last one
        for start in range(0, len(text), _BLOCK):
            end = start + _BLOCK
            breaks.append(breaks[-1] + count("\n", start, end))
            found = rfind("\n", start, end)
            last.append(found if found >= 0 else last[-1])
        self._breaks, self._last = breaks, last

    def __len__(self) -> int:
        return self._breaks[-1] + 1

    def _line_start(self, index: int) -> int:
        block = index // _BLOCK
        found = self.text.rfind("\n", block * _BLOCK, index)
        return (found if found >= 0 else self._last[block]) + 1

    def position(self, index: int) -> tuple[int, int]:
        """The (line, column) of the character at ``index``; the end of the text is valid."""
        block = index // _BLOCK
        line = self._breaks[block] + self.text.count("\n", block * _BLOCK, index) + 1
        return line, index - self._line_start(index) + 1

    def _start(self, number: int) -> int:
        """The index where line ``number`` (1-based, at most len(self)) starts."""
        wanted = number - 1  # the line breaks before it
        if wanted == 0:
            return 0
        block = bisect.bisect_left(self._breaks, wanted) - 1  # the block of break `wanted`
        i = block * _BLOCK - 1
        for _ in range(wanted - self._breaks[block]):
            i = self.text.find("\n", i + 1)
        return i + 1

    def line(self, number: int) -> str:
        r"""Line ``number`` (1-based) for display: without its '\n' and a '\r' that ends it."""
        start = self._start(number)
        end = self.text.find("\n", start)
        text = self.text[start:end if end >= 0 else len(self.text)]
        return text[:-1] if text.endswith("\r") else text

    def before(self, index: int) -> str:
        """The text of the line of ``index`` up to that index."""
        return self.text[self._line_start(index):index]


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
