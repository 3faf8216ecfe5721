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
    out = [diag.headline()]
    if source is not None:
        lines = source.splitlines()
        if 1 <= diag.span.line <= len(lines):
            text = lines[diag.span.line - 1]
            # Very long lines are cut around the column so the caret stays on screen.
            col = diag.span.column - 1
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
        return "\n".join(render_diagnostic(d, self.source) for d in self.diagnostics)


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
