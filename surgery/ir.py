"""The intermediate representation of a spec: frozen dataclasses, each carrying its source span.

Parsing produces these and nothing later needs the text or the parser again: any error found while
resolving against a model points back at the segment that caused it through its ``span``.
They are slotted (a spec of 10,000 statements holds some 40,000 of them, Spans most of all: a
slotted Span takes a third of the memory of one with a ``__dict__``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Union

__all__ = [
    "Span", "Name", "Glob", "Regex", "TypeGlob", "Index", "Slice", "Range", "All", "AnyDepth",
    "Segment", "Part", "WEIGHT", "FILTERS", "UNITS", "Selector", "Rule", "BatchNormRule", "LoraRule",
    "Phase", "Comment", "Spec", "Statement", "FREEZE", "UNFREEZE", "BATCHNORM", "LORA", "AT",
    "KEYWORDS",
    "STATEMENT_KEYWORDS", "BN_FROZEN", "BN_TRAIN", "BN_AFFINE", "BN_MODES",
]

FREEZE = "freeze"
UNFREEZE = "unfreeze"
BATCHNORM = "batchnorm"  # a BatchNormalization policy statement
LORA = "lora"  # a LoRA statement, 'lora rank=R [alpha=A] selectors'
AT = "at"  # a phase header, 'at epoch N:'

# The words the language reserves: a layer of that name is written quoted ("all"). Both spec
# readers and the formatter take them from here, so a new keyword is quoted everywhere at once.
KEYWORDS = (FREEZE, UNFREEZE, "all", "except", BATCHNORM, LORA, AT)
# The keywords that start a statement or a phase header.
STATEMENT_KEYWORDS = (FREEZE, UNFREEZE, BATCHNORM, LORA, AT)

# BatchNormalization policies: how a BatchNormalization layer behaves once it is trainable.
BN_FROZEN = "frozen"  # stays frozen whatever the rules say: inference mode, nothing updates
BN_TRAIN = "train"    # Keras's default: batch statistics in training, moving averages update
BN_AFFINE = "affine"  # gamma/beta learn; normalizes with the fixed moving statistics
BN_MODES = (BN_FROZEN, BN_TRAIN, BN_AFFINE)


@dataclass(frozen=True, slots=True)
class Span:
    """Where a piece of the spec is: 1-based line and column, end exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int


# --- segments: one step of a selector path ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Name:
    """An exact layer name: a bare name without glob characters, or any quoted name."""

    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class Glob:
    """An fnmatch pattern, case-sensitive, matched against the whole name."""

    pattern: str
    span: Span
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Regex:
    """A /regular expression/, full match on the name. ``regex`` is compiled by the `regex`
    package (its matches take a timeout), not by `re`."""

    pattern: str
    span: Span
    regex: object = field(compare=False, repr=False, default=None)


@dataclass(frozen=True, slots=True)
class TypeGlob:
    """``type:Pattern``: layers whose class name matches the glob."""

    pattern: str
    span: Span
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Index:
    """``layers[i]``: one layer by position, Python semantics (negative counts from the end)."""

    index: int
    span: Span


@dataclass(frozen=True, slots=True)
class Slice:
    """``layers[a:b:c]``: Python slice semantics over ``model.layers``."""

    start: Optional[int]
    stop: Optional[int]
    step: Optional[int]
    span: Span


@dataclass(frozen=True, slots=True)
class Range:
    """``first..last``: inclusive, in layer order; either end may be open (None)."""

    first: Optional[str]
    last: Optional[str]
    span: Span
    first_span: Optional[Span] = None
    last_span: Optional[Span] = None


@dataclass(frozen=True, slots=True)
class All:
    """``all``: every layer of the current scope."""

    span: Span


@dataclass(frozen=True, slots=True)
class AnyDepth:
    """``**``: the current scope and every nested model below it, at any depth."""

    span: Span


Segment = Union[Name, Glob, Regex, TypeGlob, Index, Slice, Range, All, AnyDepth]

WEIGHT = "weight"
FILTERS = "filters"
UNITS = "units"


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Selector:
    """A path of segments; ``/`` walks into nested models; an optional ``part`` narrows the
    selection to some weights of the layers. ``text`` is the selector as written."""

    segments: tuple[Segment, ...]
    text: str
    span: Span
    part: Optional[Part] = None


@dataclass(frozen=True, slots=True)
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
    epoch: int = 0  # the phase it belongs to

    @property
    def trainable(self) -> bool:
        return self.action == UNFREEZE


@dataclass(frozen=True, slots=True)
class BatchNormRule:
    """``batchnorm MODE [selectors] [except selectors]``: the policy of the BatchNormalization
    layers among the selected ones (every BatchNormalization layer when ``selectors`` is empty).
    The last policy statement that covers a layer decides it, across phases as for rules.
    ``number`` is its position among the spec's policy statements."""

    mode: str
    selectors: tuple[Selector, ...]
    excepts: tuple[Selector, ...]
    text: str
    span: Span
    number: int
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class LoraRule:
    """``lora rank=R [alpha=A] selectors [except selectors]``: LoRA adapters of rank ``rank`` on
    the selected layers, their updates scaled by ``alpha / rank`` (``alpha`` None: the rank, as
    Keras defaults it). The layer's kernel is held frozen and its two factors train, unless a
    later freeze rule covers the layer; the statement decides nothing else (a bias keeps what
    the other rules decide). ``number`` is its position among the spec's LoRA statements;
    ``order`` how many freeze/unfreeze rules come before it (rules numbered ``order`` and up
    come after it), which is how it is ordered against them."""

    rank: int
    alpha: Optional[float]
    selectors: tuple[Selector, ...]
    excepts: tuple[Selector, ...]
    text: str
    span: Span
    number: int
    order: int
    epoch: int = 0

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass(frozen=True, slots=True)
class Phase:
    """An ``at epoch N:`` header. The statements after it, up to the next header, carry
    ``epoch == N``; statements before the first header are phase 0 and have no header."""

    epoch: int
    span: Span


@dataclass(frozen=True, slots=True)
class Comment:
    """A ``#`` comment, kept so that formatting and conversion do not lose it."""

    text: str  # with the leading '#'
    span: Span


Statement = Union[Rule, BatchNormRule, LoraRule, Phase]  # what a line of a spec holds, besides comments


@dataclass(frozen=True, slots=True)
class Spec:
    """A parsed spec: its rules in order, and the text they came from (for messages and manifests).

    ``policies`` are the BatchNormalization policy statements, ``loras`` the LoRA statements and
    ``phases`` the ``at epoch N:``
    headers, each in source order; every statement carries the epoch of its phase.
    ``comments`` are carried for `fmt` and conversions only; they never change what a spec means.
    """

    rules: tuple[Rule, ...]
    source: str
    file: str = "<string>"
    comments: tuple[Comment, ...] = ()
    policies: tuple[BatchNormRule, ...] = ()
    phases: tuple[Phase, ...] = ()
    loras: tuple[LoraRule, ...] = ()

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs at which the state changes: 0, then each header's epoch."""
        return (0,) + tuple(p.epoch for p in self.phases if p.epoch != 0)

    def until(self, epoch: int) -> "Spec":
        """The spec as it stands at ``epoch``: the statements of every phase that has started."""
        return replace(self, rules=tuple(r for r in self.rules if r.epoch <= epoch),
                       policies=tuple(p for p in self.policies if p.epoch <= epoch),
                       loras=tuple(lo for lo in self.loras if lo.epoch <= epoch),
                       phases=tuple(p for p in self.phases if p.epoch <= epoch))
