"""The intermediate representation of a spec: frozen dataclasses, each carrying its source span.

Parsing produces these and nothing later needs the text or the parser again: any error found while
resolving against a model points back at the segment that caused it through its ``span``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = [
    "Span", "Name", "Glob", "Regex", "TypeGlob", "Index", "Slice", "Range", "All", "AnyDepth",
    "Segment", "Part", "WEIGHT", "FILTERS", "UNITS", "Selector", "Rule", "Comment", "Spec", "FREEZE", "UNFREEZE",
]

FREEZE = "freeze"
UNFREEZE = "unfreeze"


@dataclass(frozen=True)
class Span:
    """Where a piece of the spec is: 1-based line and column, end exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int


# --- segments: one step of a selector path ---------------------------------------------------


@dataclass(frozen=True)
class Name:
    """An exact layer name: a bare name without glob characters, or any quoted name."""

    value: str
    span: Span


@dataclass(frozen=True)
class Glob:
    """An fnmatch pattern, case-sensitive, matched against the whole name."""

    pattern: str
    span: Span
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class Regex:
    """A /regular expression/, full match on the name."""

    pattern: str
    span: Span
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class TypeGlob:
    """``type:Pattern``: layers whose class name matches the glob."""

    pattern: str
    span: Span
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class Index:
    """``layers[i]``: one layer by position, Python semantics (negative counts from the end)."""

    index: int
    span: Span


@dataclass(frozen=True)
class Slice:
    """``layers[a:b:c]``: Python slice semantics over ``model.layers``."""

    start: Optional[int]
    stop: Optional[int]
    step: Optional[int]
    span: Span


@dataclass(frozen=True)
class Range:
    """``first..last``: inclusive, in layer order; either end may be open (None)."""

    first: Optional[str]
    last: Optional[str]
    span: Span
    first_span: Optional[Span] = None
    last_span: Optional[Span] = None


@dataclass(frozen=True)
class All:
    """``all``: every layer of the current scope."""

    span: Span


@dataclass(frozen=True)
class AnyDepth:
    """``**``: the current scope and every nested model below it, at any depth."""

    span: Span


Segment = Union[Name, Glob, Regex, TypeGlob, Index, Slice, Range, All, AnyDepth]

WEIGHT = "weight"
FILTERS = "filters"
UNITS = "units"


@dataclass(frozen=True)
class Part:
    """A part of each selected layer's weights.

    ``.kernel`` (kind "weight", ``name`` the weight's name) is one whole weight; ``.filters[...]``
    and ``.units[...]`` (``channels`` an Index or Slice over the layer's output channels) are the
    entries that produce those outputs: the kernel slice and the matching bias entries.
    """

    kind: str
    name: Optional[str]
    channels: Optional[Union[Index, Slice]]
    span: Span


@dataclass(frozen=True)
class Selector:
    """A path of segments; ``/`` walks into nested models; an optional ``part`` narrows the
    selection to some weights of the layers. ``text`` is the selector as written."""

    segments: tuple[Segment, ...]
    text: str
    span: Span
    part: Optional[Part] = None


@dataclass(frozen=True)
class Rule:
    """One statement: ``freeze``/``unfreeze`` some selectors, optionally ``except`` others.

    ``number`` is the statement's position in the spec (0-based); ``text`` the statement as written.
    """

    action: str
    selectors: tuple[Selector, ...]
    excepts: tuple[Selector, ...]
    text: str
    span: Span
    number: int

    @property
    def trainable(self) -> bool:
        return self.action == UNFREEZE


@dataclass(frozen=True)
class Comment:
    """A ``#`` comment, kept so that formatting and conversion do not lose it."""

    text: str  # with the leading '#'
    span: Span


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its rules in order, and the text they came from (for messages and manifests).

    ``comments`` are carried for `fmt` and conversions only; they never change what a spec means.
    """

    rules: tuple[Rule, ...]
    source: str
    file: str = "<string>"
    comments: tuple[Comment, ...] = ()
