"""The one error hierarchy, and how a diagnostic is rendered for a person.

Every problem a user can cause is a `SurgeryError`. Problems in a spec are `SpecError`s and always
carry a span (file, line, column); the CLI renders them once, as
``file:line:col: severity: message``, the source line and a single caret.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Span

__all__ = [
    "Diagnostic",
    "SurgeryError",
    "SpecError",
    "SpecSyntaxError",
    "SelectorError",
    "ModelError",
    "UsageError",
    "render_diagnostic",
    "render_diagnostics",
]


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a spec: an error or a warning, pinned to the text that caused it."""

    severity: str  # "error" | "warning" | "note"
    message: str
    span: Span

    def headline(self) -> str:
        s = self.span
        return f"{s.file}:{s.line}:{s.column}: {self.severity}: {self.message}"


def render_diagnostic(diag: Diagnostic, source: str | None) -> str:
    """``file:line:col: severity: message``, then the source line and one caret under the column."""
    return _render(diag, _source_lines(source) if source is not None else None)


def render_diagnostics(diagnostics, source: str | None) -> str:
    """Several diagnostics about one source, one after the other; the source is split once."""
    lines = _source_lines(source) if source is not None else None
    return "\n".join(_render(d, lines) for d in diagnostics)


# The last source split, by identity: callers that render many diagnostics of one spec one at a
# time (the CLI's warnings) split it once, not once per diagnostic.
_last_split: tuple[str | None, list[str]] = (None, [])


def _source_lines(source: str) -> list[str]:
    r"""The source's lines as Lark counts them: broken at '\n' only (a '\f', a lone '\r' or a
    '\u2028' is a character of its line), with the '\r' of a '\r\n' left out of the display."""
    global _last_split
    cached_source, cached = _last_split
    if cached_source is source:
        return cached
    lines = source.split("\n")
    _last_split = (source, lines)
    return lines


def _render(diag: Diagnostic, lines: list[str] | None) -> str:
    out = [diag.headline()]
    if lines is not None and 1 <= diag.span.line <= len(lines):
        text = lines[diag.span.line - 1]
        if text.endswith("\r"):
            text = text[:-1]
        # Very long lines are cut around the column so the caret stays on screen.
        col = max(diag.span.column - 1, 0)
        start = max(0, col - 60) if len(text) > 120 else 0
        shown = text[start : start + 120]
        prefix = "..." if start else ""
        out.append("  " + prefix + _printable(shown))
        out.append("  " + " " * (len(prefix) + col - start) + "^")
    return "\n".join(out)


def _printable(text: str) -> str:
    # Control characters (NUL, escape sequences) must not reach the user's terminal raw; replacing
    # each by one character keeps the caret aligned.
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text).replace("\t", " ")


class SurgeryError(Exception):
    """Base of every error surgery raises on purpose. The CLI turns it into exit code 2."""


class SpecError(SurgeryError):
    """A problem in a spec, with the line and column where it is.

    ``diagnostics`` holds every error found in one pass (the first one is this error's own), so a
    spec with three misspelled names is reported once, not three runs in a row.
    """

    def __init__(self, message: str, span: Span, *, source: str | None = None,
                 diagnostics: tuple[Diagnostic, ...] = ()):
        self.message = message
        self.span = span
        self.source = source
        first = Diagnostic("error", message, span)
        self.diagnostics = diagnostics or (first,)
        super().__init__(first.headline())

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def column(self) -> int:
        return self.span.column

    def render(self) -> str:
        return render_diagnostics(self.diagnostics, self.source)


class SpecSyntaxError(SpecError):
    """The text is not a spec: bad token, missing selector, malformed slice or regex."""


class SelectorError(SpecError):
    """The spec is well formed but a selector does not fit the model: it matches no layer, an index
    is out of range, a range's ends are missing or reversed."""


class ModelError(SurgeryError):
    """A model file that cannot be read or written; the message names the file as the user typed it."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UsageError(SurgeryError):
    """Arguments that cannot work together (an existing output without --force, ...)."""


# --- the archive engine's errors (surgery/engines/archive/, engines/frozen_format.py) ----------
# Raised on purpose with a one-line reason that does not name the file (the caller, which knows
# the path the user typed, puts it in front). Nothing else an engine raises is caught as one of
# these: a KeyError in surgery's own code is a bug, and says so.


class ArchiveUnsupported(SurgeryError):
    """The archive engine cannot handle this `.keras` file without Keras (a custom class, a
    layer whose weights it cannot name, a layout its HDF5 reader does not read, compile state
    when writing). The only error ``--engine auto`` answers by loading the file through Keras,
    with ``str(exc)`` as the note."""


class DamagedArchive(SurgeryError):
    """The file contradicts its own structure: an entry fails its CRC-32 check, an address
    points outside the file, a record does not carry its signature, a size lies. Keras would
    refuse it too, and a copy would carry the damage into the output: an error, never a reason
    to try another engine."""


class H5FormatError(DamagedArchive):
    """``model.weights.h5`` is malformed where the reader looked (what, and at which address),
    or asks for more work than a file of its size can hold (a hostile file). ``reason`` is what
    the reader found; ``str(exc)`` names the entry."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"model.weights.h5 is damaged: {reason}")


class FrozenEntriesError(SurgeryError, ValueError):
    """A stored FrozenEntries constraint config (engines/frozen_format.py) that does not hold
    together: a missing key, indices outside the weight, values that do not fill the shape. A
    ValueError too, as Keras expects of a ``from_config`` that refuses its config."""
