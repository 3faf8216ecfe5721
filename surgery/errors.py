"""Every exception surgery raises on purpose, under `SurgeryError`, and `SurgeryWarning`.

Problems in a spec are `SpecError`s and always carry a span (file, line, column); the command
renders them once (surgery/render.py), as ``file:line:col: severity: message``, the source line
and a single caret. Anything else that escapes is a bug of ours, and the command says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Span
from .render import headline, render_diagnostics

__all__ = [
    "Diagnostic",
    "SurgeryError",
    "SpecError",
    "SpecSyntaxError",
    "SelectorError",
    "ModelError",
    "UsageError",
    "PartError",
    "SurgeryWarning",
]


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a spec: an error or a warning, pinned to the text that caused it."""

    severity: str  # "error" | "warning" | "note"
    message: str
    span: Span

    def headline(self) -> str:
        return headline(self)


class SurgeryWarning(UserWarning):
    """A spec finding that does not stop the run (a rule with no effect, an empty selector with
    ``allow_empty``), or a model state the user must act on (compile again)."""


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
    """The text is not a spec: bad token, missing selector, malformed slice or regex, or a spec
    whose statements cannot go together (phases out of order, a phase without statements)."""


class SelectorError(SpecError):
    """The spec is well formed but a selector does not fit the model: it matches no layer, an index
    is out of range, a range's ends are missing or reversed."""


class ModelError(SurgeryError):
    """A model file that cannot be read or written; the message names the file as the user typed it."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def unreadable(path: str, exc: OSError, what: str) -> str:
    """The one wording for a file the user named that cannot be read (a spec, a manifest)."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such {what}"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not a {what}"
    return f"{path}: cannot read the {what}: {exc.strerror or exc}"


class UsageError(SurgeryError):
    """Arguments that cannot work together (an existing output without --force, ...)."""


class OutputExists(UsageError):
    """A new output's destination exists at the commit: another run (or anything else) created
    it after this run checked. Nothing of this run is left."""

    def __init__(self, typed: str):
        self.path = typed
        super().__init__(f"{typed}: already exists; pass --force to replace it")


class ManifestError(SurgeryError):
    """A manifest file that cannot be read or is not one surgery writes; the message names the
    file and, for a structure error, the key (``layers[3].path: missing``)."""


class PartError(SurgeryError):
    """A part the layer does not have, or indices outside it. The message names the layer, its
    class, the weight's shape and the axis, so it can be shown as is under a spec line."""

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
