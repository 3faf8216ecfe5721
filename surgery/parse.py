"""Spec text -> IR: a .frz spec (`parse`), or one selector string of the YAML form
(`parse_selectors`). Lark stays inside this module: nothing else sees a Tree or a Token.

One LALR parser with two start rules (``start``, a whole spec; ``selectors``, one list of
selectors) is built once from ``grammars/surgery.lark`` and kept on disk between runs
(surgery/grammar.py). A Lark `Transformer`, one method per grammar rule, turns the tree into the IR; the
statements and phase headers go through `checks.Statements`, which numbers them and checks the
phases with the same words as the YAML reader. Lark's exceptions become `SpecSyntaxError`s here,
with a line, a column and a message for people (surgery/parse_messages.py).
"""

from __future__ import annotations

import fnmatch
import gc
import re
from typing import Callable, NamedTuple, Optional

from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import parse_messages
from .checks import Statements, integer
from .errors import SpecError, SpecSyntaxError
from .grammar import grammar_text  # noqa: F401  (re-exported: parse.grammar_text, as before)
from .grammar import parser as _parser
from .ir import (
    FILTERS, KEYWORDS, STATEMENT_KEYWORDS, UNITS, WEIGHT, All, AnyDepth, Comment, Glob, Index,
    Name, Part, Range, Regex, Selector, Slice, Span, Spec, TypeGlob,
)
from .regex_text import MAX_UNROLLED, unrolled_size
from .render import Lines

__all__ = ["parse", "parse_selectors", "grammar_text"]

_GLOB_MAGIC = re.compile(r"[*?\[]")
_BLANKS = " \t\f\r"  # the grammar's WS: what may stand between two tokens of one statement


# --- entry points ----------------------------------------------------------------------------------


class _Where:
    """The text being parsed and where it sits: an index of the text -> a position in the
    document that errors render against (the .frz text itself, or the YAML file a selector
    string came from)."""

    def __init__(self, text: str, file: str, document: Optional[str] = None,
                 position: Optional[Callable[[int], tuple[int, int]]] = None):
        self.text = text
        self.file = file
        self.lines = Lines(text)
        self.document = text if document is None else document
        self.position = position or self.lines.position

    def span(self, start: int, end: int) -> Span:
        return Span(self.file, *self.position(start), *self.position(max(end, start)))

    def point(self, index: int, width: int = 1) -> Span:
        line, column = self.position(index)
        return Span(self.file, line, column, line, column + width)

    def error(self, message: str, span: Span) -> SpecSyntaxError:
        return SpecSyntaxError(message, span, source=self.document)


def parse(text: str, file: str = "<string>") -> Spec:
    """Parse .frz spec text into a `Spec`. Raises `SpecSyntaxError` (with line and column) on
    bad input. (`surgery.load_spec` reads a file of either form: surgery/specfile.py.)"""
    if not isinstance(text, str):
        raise TypeError(f"spec text must be str, not {type(text).__name__}")
    check_length(text, file)
    where = _Where(text, file)
    # The tree and the IR hold no reference cycles, yet Python's cyclic collector walks all of
    # them again and again as they grow: half the time of a 100,000-statement parse (15 s with
    # it, 7.5 s without). Off while parsing, as it was after; `_parse` collects the young
    # generation now and then, for the short-lived cycles Lark makes (without it, a million
    # statements on one line peaked at 976 MB at the token bound; with it, 378 MB at 350,000).
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            tree = _parse(where, "start")
        except UnexpectedInput as exc:
            raise _syntax_error(exc, where) from None
        return _transform(where, tree)
    finally:
        if collecting:
            gc.enable()


def parse_selectors(text: str, file: str, *, document: str,
                    position: Callable[[int], tuple[int, int]], whole: Span) -> tuple[Selector, ...]:
    """The selectors of one selector string of the YAML form. ``position`` maps an index of
    ``text`` to its (line, column) in ``document``; an error about the string as a whole (it holds
    statements, not selectors) points at ``whole``."""
    where = _Where(text, file, document, position)
    try:
        tree = _parse(where, "selectors")
    except UnexpectedInput as exc:
        if isinstance(exc, UnexpectedToken) and exc.token.type in ("SEMICOLON", "_NL"):
            raise where.error(parse_messages.NOT_SELECTORS, whole) from None
        if isinstance(exc, UnexpectedToken) and exc.token.type == "EXCEPT":
            raise where.error(parse_messages.EXCEPT_IN_SELECTORS,
                              where.point(exc.token.start_pos, len("except"))) from None
        raise _syntax_error(exc, where) from None
    selectors = _transform(where, tree)
    if "#" in text[_end(tree):]:  # a comment: '#' outside every token
        raise where.error(parse_messages.NOT_SELECTORS, whole)
    return selectors


# Past this many characters a spec (either form) is refused before it is read, so that what
# reading costs has a bound whatever the text: the lexer's terminals are possessive (the grammar
# says why) and a glob is at most MAX_UNROLLED characters, so the worst text of this size,
# 8 million escapes in one quoted name, takes 7 s and 190 MB; PyYAML reads 1.5 MB a second.
# Five times what 100,000 statements take (about 3 million characters, bench/bench_scale.py).
MAX_CHARS = 16 * 2**20


def check_length(text: str, file: str) -> None:
    """`SpecSyntaxError` at the start of a spec longer than `MAX_CHARS`."""
    if len(text) > MAX_CHARS:
        raise SpecSyntaxError(f"the spec is too large: {len(text):,} characters, and surgery "
                              f"reads up to {MAX_CHARS:,} (100,000 statements take about 3 "
                              f"million); split it", Span(file, 1, 1, 1, 2))


# Past this many tokens (names, keywords, punctuation) a spec is refused: Lark's tree and the IR
# cost about 1 KB per token, so an unbounded input would take gigabytes before any answer. It
# is far above any real spec (the seven in specs/ hold under 200 tokens each) and allows, for
# instance, 160,000 one-name statements (three tokens each, with the newline) or one statement
# of 250,000 selectors, while a spec refused at the bound peaks near 550 MB (a million
# statements on one line, bench/bench_scale.py).
MAX_TOKENS = 500_000


def _parse(where: _Where, start: str):
    """The tree of ``where.text`` from the rule ``start``; the tokens are counted as they are
    read, so an input past `MAX_TOKENS` stops there (Lark's interactive parser is the loop
    ``parse`` runs, with each token handed out on its way in). Raises Lark's UnexpectedInput."""
    parser = _parser().parse_interactive(where.text, start=start)
    token = None
    for count, token in enumerate(parser.iter_parse(), 1):
        if count % 4096 == 0 and not gc.isenabled():
            gc.collect(0)  # the young garbage Lark makes in cycles, never the tree built so far
        if count > MAX_TOKENS:
            raise where.error(f"the spec is too large: surgery reads up to {MAX_TOKENS:,} tokens "
                              f"(names, keywords and punctuation), and this one has more; split "
                              f"it", where.point(token.start_pos, len(token)))
    return parser.feed_eof(token)


def _transform(where: _Where, tree):
    to_ir = _ToIR(where)
    try:
        if tree.data != "start":
            return to_ir.transform(tree)
        # Statement by statement, each one's tree dropped once its IR exists: a large spec never
        # holds the whole tree and the whole IR at once.
        children, items = tree.children, []
        for i, child in enumerate(children):
            items.append(to_ir.transform(child))
            children[i] = None
        return to_ir.start(tree.meta, items)
    except VisitError as exc:  # Lark wraps what a Transformer method raises
        if isinstance(exc.orig_exc, SpecError):
            raise exc.orig_exc from None
        raise


def _end(tree) -> int:
    return tree.meta.end_pos if not tree.meta.empty else 0


# --- tree -> IR ------------------------------------------------------------------------------------


class _Item(NamedTuple):
    """A statement, a policy or a phase header, before `Statements` numbers it."""

    kind: str  # "rule" | "policy" | "lora" | "phase"
    span: Span
    start: int
    end: int
    args: tuple  # what Statements.rule, .policy or .header takes besides the span


@v_args(meta=True)
class _ToIR(Transformer):
    """One method per grammar rule (or alias), each given the rule's meta and its children
    already transformed. Tokens stay Tokens (``visit_tokens=False``)."""

    def __init__(self, where: _Where):
        super().__init__(visit_tokens=False)
        self.where = where
        self.text = where.text

    def _span(self, meta) -> Span:
        return self.where.span(meta.start_pos, meta.end_pos)

    def _token_span(self, token: Token) -> Span:
        return self.where.span(token.start_pos, token.end_pos)

    def _error(self, message: str, span: Span) -> SpecSyntaxError:
        return self.where.error(message, span)

    # statements

    def start(self, meta, items: list[_Item]) -> Spec:
        out = Statements(self.where.document, self.where.file)
        block_column = None  # the indentation of the block's first statement on a line of its own
        for item in items:
            if item.kind == "phase":
                epoch, number_span = item.args
                out.header(epoch, item.span, number_span)
                block_column = None
                continue
            header = out.phase
            if header is not None and item.span.line > header.span.line:
                if block_column is None:
                    block_column = item.span.column
                if item.span.column < header.span.column or \
                        block_column > header.span.column >= item.span.column:
                    raise self._error(
                        f"this statement is outdented out of the 'at epoch {header.epoch}:' block "
                        f"above it (line {header.span.line}), but a block runs to the next 'at': "
                        f"indent it to run at epoch {header.epoch}, or move it before the first "
                        f"'at' to be part of phase 0", item.span)
            if item.kind == "lora":
                rank, alpha, selectors, excepts, text, rank_span, alpha_span = item.args
                out.lora(rank, alpha, selectors, excepts, text, item.span, rank_span, alpha_span)
                continue
            (out.rule if item.kind == "rule" else out.policy)(*item.args, item.span)
        return out.spec(self._comments(items))

    def _comments(self, items: list[_Item]) -> tuple[Comment, ...]:
        """The comments, which the grammar ignores. Between two items there are only blanks,
        ';', line breaks and comments, and a comment runs to the end of its line: so the first
        '#' of such a gap starts one."""
        text, found, pos = self.text, [], 0
        for start, end in [(it.start, it.end) for it in items] + [(len(text), len(text))]:
            i = text.find("#", pos, start)
            while i >= 0:
                stop = text.find("\n", i, start)
                stop = start if stop < 0 else stop
                found.append(Comment(text[i:stop].rstrip(), self.where.span(i, stop)))
                i = text.find("#", stop, start)
            pos = end
        return tuple(found)

    def statement(self, meta, children) -> _Item:
        action, selectors, _except, excepts = children
        return _Item("rule", self._span(meta), meta.start_pos, meta.end_pos,
                     (action, selectors, excepts or (), self.text[meta.start_pos:meta.end_pos]))

    def action(self, meta, children) -> str:
        return str(children[0])

    def policy(self, meta, children) -> _Item:
        _keyword, mode, selectors, _except, excepts = children
        return _Item("policy", self._span(meta), meta.start_pos, meta.end_pos,
                     (str(mode), selectors or (), excepts or (),
                      self.text[meta.start_pos:meta.end_pos]))

    def lora(self, meta, children) -> _Item:
        _keyword, _rank_eq, rank, alpha, selectors, _except, excepts = children
        rank_span = self._token_span(rank)
        alpha_span = self._token_span(alpha) if alpha is not None else None
        alpha_value = None
        if alpha is not None:
            number = str(alpha).split("=", 1)[1].strip()
            try:
                alpha_value = float(number)
            except ValueError:
                raise self._error(f"alpha={number} is not a number, as in 'alpha=16'",
                                  alpha_span) from None
        return _Item("lora", self._span(meta), meta.start_pos, meta.end_pos,
                     (self._integer(rank), alpha_value, selectors, excepts or (),
                      self.text[meta.start_pos:meta.end_pos], rank_span, alpha_span))

    def phase(self, meta, children) -> _Item:
        _at, _epoch, number = children
        number_span = self._token_span(number)
        epoch = integer(str(number), number_span, self.where.document)
        return _Item("phase", self._span(meta), meta.start_pos, meta.end_pos, (epoch, number_span))

    # selectors

    def selectors(self, meta, items) -> tuple[Selector, ...]:
        # Commas are optional, but two selectors written against each other are a typo: above
        # all `bn.gamma[0:2]`, which would read as `bn.gamma` and the glob `[0:2]`.
        for (prev, _, prev_end), (cur, cur_start, _) in zip(items, items[1:]):
            if prev_end == cur_start:
                if prev.part is not None and prev.part.kind == WEIGHT and \
                        cur.text.startswith("["):
                    raise self._error(f"'.{prev.part.name}' takes no index: only .filters[...] "
                                      "and .units[...] select entries inside a layer", cur.span)
                raise self._error(f"'{cur.text}' is written against '{prev.text}': separate "
                                  "selectors with a comma or a space", cur.span)
        return tuple(sel for sel, _, _ in items)

    def selector(self, meta, children) -> tuple[Selector, int, int]:
        *path, part = children
        segments = tuple(c for c in path if not isinstance(c, Token))  # without the '/'s
        if isinstance(segments[-1], AnyDepth):
            raise self._error("'**' must be followed by '/' and a selector, as in '**/conv1_*'",
                              segments[-1].span)
        selector = Selector(segments=segments, text=self.text[meta.start_pos:meta.end_pos],
                            span=self._span(meta), part=part)
        return selector, meta.start_pos, meta.end_pos

    def weight_part(self, meta, children) -> Part:
        _dot, name = children
        return Part(WEIGHT, str(name), None, self._span(meta))

    def channel_part(self, meta, children) -> Part:
        _dot, opener, index = children
        span = self._span(meta)
        kind = FILTERS if str(opener).startswith(FILTERS) else UNITS
        return Part(kind, None, _index(index, span), span)

    # segments

    def all(self, meta, children) -> All:
        return All(self._span(meta))

    def any_depth(self, meta, children) -> AnyDepth:
        return AnyDepth(self._span(meta))

    def layers(self, meta, children):
        _open, index = children
        return _index(index, self._span(meta))

    def type(self, meta, children) -> TypeGlob:
        _prefix, token = children
        self._glob_size(token)
        return TypeGlob(str(token), self._span(meta), regex=_glob_regex(str(token)))

    def _glob_size(self, token) -> None:
        # A glob becomes a regular expression: one of millions of '[a]' took 15 s and 700 MB.
        if len(token) > MAX_UNROLLED:
            raise self._error(f"the glob is too large: more than {MAX_UNROLLED:,} characters, "
                              f"longer than any layer name", self._token_span(token))

    def glob(self, meta, children):
        (token,) = children
        text = str(token)
        if text in KEYWORDS:
            hint = ("start a new statement on a new line or after ';'" if text in STATEMENT_KEYWORDS
                    else f'quote it to mean a layer named {text}: "{text}"')
            if text in ("at", "batchnorm", "lora"):  # keywords since phases, policies, LoRA came in
                hint += f' (or quote it to mean a layer named {text}: "{text}")'
            raise self._error(f"'{text}' is a keyword here; {hint}", self._token_span(token))
        span = self._token_span(token)
        if _GLOB_MAGIC.search(text):
            self._glob_size(token)
            return Glob(text, span, regex=_glob_regex(text))
        return Name(text, span)

    def exact(self, meta, children) -> Name:
        (token,) = children
        return Name(re.sub(r"\\(.)", r"\1", str(token)[1:-1]), self._token_span(token))

    def regex(self, meta, children) -> Regex:
        (token,) = children
        body = str(token)[1:-1]
        pattern = body.replace("\\/", "/")
        try:
            # Python warns about some patterns (a POSIX-style '[[:alpha:]]' is a "possible nested
            # set"); the pattern is compiled as Python reads it today, and the warning, a message
            # about Python's future, is not printed as Python's own two lines on the user's stderr.
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                re.compile(pattern)  # Python's own messages and positions for a bad pattern
            if unrolled_size(pattern) > MAX_UNROLLED:
                raise self._error(
                    f"regular expression is too large: its counted repeats stand for more than "
                    f"{MAX_UNROLLED:,} characters, longer than any layer name",
                    self._token_span(token))
            compiled = _matcher(pattern)
        except re.error as exc:
            at = token.start_pos + 1 + min(exc.pos or 0, len(body))
            raise self._error(f"invalid regular expression: {exc.msg}",
                              self.where.point(at)) from None
        except (OverflowError, RecursionError, ValueError):  # what re.compile raises on size
            raise self._error("regular expression is too large", self._token_span(token)) from None
        return Regex(pattern, self._token_span(token), regex=compiled)

    def range(self, meta, children) -> Range:
        first, dots, last = children
        return self._range(meta, first, dots, last)

    def range_to(self, meta, children) -> Range:
        dots, last = children
        return self._range(meta, None, dots, last)

    def _range(self, meta, first, dots: Token, last) -> Range:
        # A range is written without blanks: commas between selectors are optional, so 'a.. b'
        # would otherwise silently read as the range 'a..b'.
        before = first is not None and self.text[dots.start_pos - 1] in _BLANKS
        after = last is not None and self.text[dots.end_pos] in _BLANKS
        if before or after:
            raise self._error("write a range without blanks ('a..b'); to list an open range and "
                              "another selector, separate them with a comma ('a.., b')",
                              self._token_span(dots))
        for end in (first, last):
            if isinstance(end, Glob):
                raise self._error("the ends of a range are exact layer names; globs are not "
                                  "allowed here", end.span)
        return Range(first.value if first else None, last.value if last else None,
                     self._span(meta), first.span if first else None,
                     last.span if last else None)

    # indices: the rule that holds one (layers[...], .filters[...]) gives it its span

    def item(self, meta, children) -> tuple:
        (number,) = children
        return ("item", self._integer(number))

    def slice(self, meta, children) -> tuple:
        start, stop, step = (self._integer(t) if t is not None else None for t in children)
        if step == 0:
            raise self._error("slice step cannot be zero", self._token_span(children[2]))
        return ("slice", start, stop, step)

    def _integer(self, token: Token) -> int:
        return integer(str(token), self._token_span(token), self.where.document)


def _index(draft: tuple, span: Span):
    if draft[0] == "item":
        return Index(draft[1], span)
    _, start, stop, step = draft
    return Slice(start, stop, step, span)


def _matcher(pattern: str):
    """The pattern compiled by the `regex` package, whose matches take a ``timeout`` (resolve.py
    bounds the time a spec's regexes may take: '(a+)+' backtracks for minutes on a 30-letter
    name). VERSION0 reads a pattern as Python's `re` does. Imported here, not at the top: only
    a spec that holds a regex pays for the import."""
    import regex

    try:
        return regex.compile(pattern, regex.VERSION0)
    except regex.error as exc:  # a pattern that `re` reads and `regex` does not
        raise re.error(exc.msg, pattern, exc.pos) from None


def _glob_regex(pattern: str) -> re.Pattern:
    return re.compile(fnmatch.translate(pattern))


# --- Lark errors -> SpecSyntaxError ----------------------------------------------------------------


def _syntax_error(exc: UnexpectedInput, where: _Where) -> SpecSyntaxError:
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            # Lark's $END borrows the position of the last token; point just after it.
            index = token.end_pos if token.end_pos is not None else (token.start_pos or 0)
        else:
            index = token.start_pos
        before = where.lines.before(index).rstrip()
        message = parse_messages.unexpected_token(str(token), token.type, set(exc.expected),
                                                  before)
        width = max(1, len(str(token)))
    elif isinstance(exc, UnexpectedCharacters):
        index = exc.pos_in_stream
        message = parse_messages.unexpected_character(where.text, index, set(exc.allowed or ()))
        width = 1
    else:  # pragma: no cover - LALR raises only the two above
        index, message, width = 0, "invalid spec", 1
    return where.error(message, where.point(index, width))
