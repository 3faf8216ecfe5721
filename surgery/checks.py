"""What makes a list of statements a spec, checked once for both spec forms.

The .frz parser and the YAML reader each read their own layout (indentation, list items) and hand
the statements and phase headers here in source order. `Statements` numbers them (rules and
policies each from 0, in source order), gives each the epoch of the phase it is in, and refuses,
with the same words for both forms, what no spec can mean:

- an epoch below 0, or a number too large to convert;
- two headers for one epoch, headers out of epoch order, 'at epoch 0:' after phase 0's
  statements;
- a phase without statements;
- a LoRA statement in a later phase (it creates variables, which a running fit cannot take on),
  a rank below 1, an alpha that is not a positive number.

Each form points the error at its own text: the header's line and column, or the number in it.
"""

from __future__ import annotations

from typing import Optional

from .errors import SpecSyntaxError
from .ir import BatchNormRule, Comment, LoraRule, Phase, Rule, Selector, Span, Spec

__all__ = ["Statements", "integer"]


def integer(digits: str, span: Span, source: str) -> int:
    """The number ``digits`` writes (an optional sign and decimal digits)."""
    try:
        return int(digits)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise SpecSyntaxError("number is too large", span, source=source) from None


class Statements:
    """One spec's statements and phase headers, added in source order; `spec` gives the Spec."""

    def __init__(self, source: str, file: str):
        self.source = source
        self.file = file
        self.rules: list[Rule] = []
        self.policies: list[BatchNormRule] = []
        self.phases: list[Phase] = []
        self.loras: list[LoraRule] = []
        self._in_phase = 0  # statements added since the last header (or the start)
        self._checked = True  # whether the current phase's statements were counted

    @property
    def phase(self) -> Optional[Phase]:
        """The header of the phase statements are now added to; None in phase 0."""
        return self.phases[-1] if self.phases else None

    @property
    def epoch(self) -> int:
        return self.phases[-1].epoch if self.phases else 0

    def error(self, message: str, span: Span) -> SpecSyntaxError:
        return SpecSyntaxError(message, span, source=self.source)

    def header(self, epoch: int, span: Span, number_span: Optional[Span] = None) -> Phase:
        """Start the phase ``at epoch {epoch}:`` written at ``span`` (``number_span``: where its
        number is, for an error about the number). The phase before it must have statements."""
        self.end_phase()
        if epoch < 0:
            raise self.error("an epoch is 0 or more (Keras counts epochs from 0, as for "
                             "initial_epoch)", number_span or span)
        for earlier in self.phases:
            if earlier.epoch == epoch:
                raise self.error(f"the phase 'at epoch {epoch}:' overlaps the one on line "
                                 f"{earlier.span.line}: write its statements under one header",
                                 span)
            if earlier.epoch > epoch:
                raise self.error(f"phases run in epoch order: 'at epoch {epoch}:' comes after "
                                 f"'at epoch {earlier.epoch}:' (line {earlier.span.line}); move it "
                                 f"before that one", span)
        if epoch == 0 and (self.rules or self.policies or self.loras):
            raise self.error("'at epoch 0:' overlaps the statements before it, which already form "
                             "phase 0: remove the header, or move those statements under it", span)
        phase = Phase(epoch, span)
        self.phases.append(phase)
        self._in_phase = 0
        self._checked = False
        return phase

    def end_phase(self) -> None:
        """The current phase's statements are all added: it must have one. (Called again, or in
        phase 0, it checks nothing.)"""
        if not self._checked:
            self._checked = True
            if not self._in_phase:
                ph = self.phases[-1]
                raise self.error(f"the phase 'at epoch {ph.epoch}:' has no statements", ph.span)

    def rule(self, action: str, selectors: tuple[Selector, ...], excepts: tuple[Selector, ...],
             text: str, span: Span) -> Rule:
        rule = Rule(action=action, selectors=selectors, excepts=excepts, text=text, span=span,
                    number=len(self.rules), epoch=self.epoch)
        self.rules.append(rule)
        self._in_phase += 1
        return rule

    def policy(self, mode: str, selectors: tuple[Selector, ...], excepts: tuple[Selector, ...],
               text: str, span: Span) -> BatchNormRule:
        policy = BatchNormRule(mode=mode, selectors=selectors, excepts=excepts, text=text,
                               span=span, number=len(self.policies), epoch=self.epoch)
        self.policies.append(policy)
        self._in_phase += 1
        return policy

    def lora(self, rank: int, alpha: Optional[float], selectors: tuple[Selector, ...],
             excepts: tuple[Selector, ...], text: str, span: Span, rank_span: Span,
             alpha_span: Optional[Span]) -> LoraRule:
        if self.epoch:
            raise self.error(
                f"'lora' belongs to phase 0: it creates the adapter variables, which a running fit "
                f"cannot take on; put it before the first 'at' and write 'freeze' for its layers "
                f"there, then 'unfreeze' them under 'at epoch {self.epoch}:' (the adapters follow "
                f"freeze and unfreeze rules)", span)
        if rank < 1:
            raise self.error(f"a LoRA rank is 1 or more, not {rank}", rank_span)
        if alpha is not None and not (alpha > 0 and alpha < float("inf")):
            raise self.error(f"a LoRA alpha is a positive number, not {alpha:g}",
                             alpha_span or span)
        lora = LoraRule(rank=rank, alpha=alpha, selectors=selectors, excepts=excepts, text=text,
                        span=span, number=len(self.loras), order=len(self.rules),
                        epoch=self.epoch)
        self.loras.append(lora)
        self._in_phase += 1
        return lora

    def spec(self, comments: tuple[Comment, ...] = ()) -> Spec:
        self.end_phase()
        return Spec(rules=tuple(self.rules), source=self.source, file=self.file,
                    comments=comments, policies=tuple(self.policies), phases=tuple(self.phases),
                    loras=tuple(self.loras))
