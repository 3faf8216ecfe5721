"""Spec text -> IR. Lark stays inside this module: nothing else sees a Tree or a Token.

One LALR parser is built once (``_parser``) from ``grammars/surgery.lark``. Lark's exceptions are
turned into ``SpecSyntaxError`` here, with a line, a column and a message written for people
(``unknown statement 'unfreez'; did you mean 'unfreeze'?``), never Lark's own text.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import threading
from dataclasses import replace
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .errors import SpecSyntaxError
from .ir import (
    FILTERS, FREEZE, UNFREEZE, UNITS, WEIGHT, All, AnyDepth, BatchNormRule, Comment, Glob, Index,
    Name, Part, Phase, Range, Regex, Rule, Selector, Slice, Span, Spec, TypeGlob,
)

__all__ = ["parse", "load_spec", "grammar_text", "KEYWORDS"]

KEYWORDS = (FREEZE, UNFREEZE, "all", "except", "batchnorm", "at")
_ACTIONS = (FREEZE, UNFREEZE, "batchnorm", "at")
_GLOB_MAGIC = re.compile(r"[*?\[]")


def grammar_text() -> str:
    """The grammar: packaged inside the wheel as surgery/surgery.lark, or read from the source tree."""
    # Plain files first (importlib.resources costs ~5 ms of imports): beside this module in an
    # installed wheel, in grammars/ in the source tree; importlib.resources for anything else
    # (a package inside a zip).
    here = Path(__file__).resolve().parent
    for path in (here / "surgery.lark", here.parent / "grammars" / "surgery.lark"):
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            pass
    from importlib import resources

    return resources.files("surgery").joinpath("surgery.lark").read_text(encoding="utf-8")


class _CommentSink:
    """Collects COMMENT tokens (which the grammar ignores) during one parse."""

    def __init__(self) -> None:
        self.tokens: list[Token] = []

    def __call__(self, token: Token) -> Token:
        self.tokens.append(token)
        return token


_comments = _CommentSink()
_lock = threading.Lock()


_LARK_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
_PARSER_CACHE_FORMAT = 1


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    """One parser for the process; the lexer callback feeds a module-level sink that `parse`
    empties around each run, under a lock so that threads do not share comments.

    Building the LALR tables from the grammar costs 40-60 ms, more than the rest of a `surgery`
    run on a small model, so the built parser is kept in the user's cache folder
    (``$SURGERY_CACHE_DIR``, else ``$XDG_CACHE_HOME/surgery``, else ``~/.cache/surgery``) and
    loaded from there in about 5 ms. The file is named and checked by a key over the grammar
    text, the Lark and Python versions and the options, so a changed grammar or upgraded Lark
    builds (and caches) a new parser. It is JSON, not a pickle: a damaged or forged file can
    only fail to load, never run code, and a file that fails to load is rebuilt. Where the
    folder cannot be written the parser is built on every run, as before; nothing else changes.
    """
    callbacks = {"COMMENT": _comments}
    text = grammar_text()
    key = _parser_key(text)
    path = _parser_cache_path(key)
    if path is not None:
        try:
            return _load_parser(path, key, callbacks)
        except Exception:  # missing, unreadable, damaged, from another Lark: build it again
            pass
    parser = Lark(text, **_LARK_OPTIONS, lexer_callbacks=callbacks)
    if path is not None:
        _save_parser(parser, path, key)
    return parser


def _parser_key(text: str) -> str:
    import hashlib
    import sys

    import lark

    what = [_PARSER_CACHE_FORMAT, lark.__version__, list(sys.version_info[:2]),
            sorted(_LARK_OPTIONS.items()), text]
    return hashlib.sha256(repr(what).encode("utf-8")).hexdigest()


def _parser_cache_path(key: str):
    import os

    folder = os.environ.get("SURGERY_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        if not os.path.isabs(base):
            return None  # no usable home (expanduser left "~"): do not cache in the cwd
        folder = os.path.join(base, "surgery")
    return Path(folder) / f"parser-{key[:24]}.json"


def _load_parser(path: Path, key: str, callbacks: dict) -> Lark:
    import json

    with open(path, "rb") as f:
        saved = json.loads(f.read(), object_hook=_untag)
    if saved.get("format") != _PARSER_CACHE_FORMAT or saved.get("key") != key:
        raise ValueError("another parser")
    # Lark's own loader for saved parsers (Lark.load reads the same dict from a pickle).
    return Lark._load_from_dict(saved["data"], saved["memo"], lexer_callbacks=callbacks,
                                propagate_positions=_LARK_OPTIONS["propagate_positions"])


def _save_parser(parser: Lark, path: Path, key: str) -> None:
    """Write the cache file atomically (concurrent runs never read half a file); any failure,
    a read-only or full disk included, leaves the run as it was."""
    import json
    import os
    import secrets

    from lark.grammar import Rule
    from lark.lark import _LOAD_ALLOWED_OPTIONS
    from lark.lexer import TerminalDef

    tmp = None
    try:
        data, memo = parser.memo_serialize([TerminalDef, Rule])
        # As Lark.save does: options given again at load time (callbacks) are not stored.
        data["options"] = {k: v for k, v in data["options"].items()
                           if k not in _LOAD_ALLOWED_OPTIONS}
        payload = json.dumps({"format": _PARSER_CACHE_FORMAT, "key": key,
                              "data": _tag(data), "memo": _tag(memo)},
                             separators=(",", ":")).encode("utf-8")
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except Exception:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _tag(value):
    """Lark's serialized parser as JSON: tuples and dicts with non-string keys (the LALR
    tables' state numbers) are tagged, so that `_untag` gives back the very same values."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and
                                                           ("<dict>" in value or
                                                            "<tuple>" in value)):
            return {k: _tag(v) for k, v in value.items()}
        return {"<dict>": [[_tag(k), _tag(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"<tuple>": [_tag(v) for v in value]}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the parser cache")


def _untag(obj: dict):
    if len(obj) == 1:
        if "<dict>" in obj:
            return {k: v for k, v in obj["<dict>"]}
        if "<tuple>" in obj:
            return tuple(obj["<tuple>"])
    return obj


def parse(text: str, file: str = "<string>") -> Spec:
    """Parse spec text into a `Spec`. Raises `SpecSyntaxError` (with line and column) on bad input."""
    if not isinstance(text, str):
        raise TypeError(f"spec text must be str, not {type(text).__name__}")
    parser = _parser()
    with _lock:
        _comments.tokens = []
        try:
            tree = parser.parse(text)
        except UnexpectedInput as exc:
            raise _syntax_error(exc, text, file) from None
        finally:
            tokens, _comments.tokens = _comments.tokens, []
    builder = _Builder(text, file)
    comments = tuple(Comment(str(t).rstrip(), builder.span(t)) for t in tokens)
    return replace(builder.spec(tree), comments=comments)


def load_spec(path: str | Path) -> Spec:
    """Read and parse a spec file: .frz text, or the YAML form (.yaml, .yml). The path is kept
    as given, for messages."""
    shown = str(path)
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        span = Span(shown, line, column, line, column + 1)
        raise SpecSyntaxError(f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})", span,
                              source=data.decode("utf-8", "replace")) from None
    if shown.endswith((".yaml", ".yml")):
        from .yamlspec import parse_yaml  # yamlspec builds on this module

        return parse_yaml(text, shown)
    return parse(text, shown)


# --- tree -> IR --------------------------------------------------------------------------------


class _Builder:
    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file

    def span(self, node) -> Span:
        if isinstance(node, Token):
            return Span(self.file, node.line, node.column, node.end_line, node.end_column)
        m = node.meta
        return Span(self.file, m.line, m.column, m.end_line, m.end_column)

    def source_of(self, node) -> str:
        if isinstance(node, Token):
            return str(node)
        return self.text[node.meta.start_pos:node.meta.end_pos]

    def error(self, message: str, node_or_span) -> SpecSyntaxError:
        span = node_or_span if isinstance(node_or_span, Span) else self.span(node_or_span)
        return SpecSyntaxError(message, span, source=self.text)

    def spec(self, tree: Tree) -> Spec:
        rules: list[Rule] = []
        policies: list[BatchNormRule] = []
        phases: list[Phase] = []
        header = None  # the current phase's header
        block_column = None  # the indentation of its first statement on a line of its own
        counts: dict[int, int] = {0: 0}
        for node in tree.children:
            if node.data == "phase":
                header = self.phase(node, phases, counts)
                phases.append(header)
                counts.setdefault(header.epoch, 0)
                block_column = None
                continue
            epoch = header.epoch if header is not None else 0
            if header is not None and node.meta.line > header.span.line:
                if block_column is None:
                    block_column = node.meta.column
                if node.meta.column < header.span.column or \
                        block_column > header.span.column >= node.meta.column:
                    raise self.error(
                        f"this statement is outdented out of the 'at epoch {epoch}:' block above "
                        f"it (line {header.span.line}), but a block runs to the next 'at': indent "
                        f"it to run at epoch {epoch}, or move it before the first 'at' to be part "
                        f"of phase 0", node)
            counts[epoch] += 1
            if node.data == "policy":
                policies.append(self.policy(node, len(policies), epoch))
            else:
                rules.append(self.rule(node, len(rules), epoch))
        for ph in phases:
            if not counts[ph.epoch]:
                raise self.error(f"the phase 'at epoch {ph.epoch}:' has no statements", ph.span)
        return Spec(rules=tuple(rules), source=self.text, file=self.file,
                    policies=tuple(policies), phases=tuple(phases))

    def phase(self, node: Tree, phases: list[Phase], counts: dict[int, int]) -> Phase:
        _at, _epoch, number = node.children
        epoch = self.integer(number)
        span = self.span(node)
        if epoch < 0:
            raise self.error("an epoch is 0 or more (Keras counts epochs from 0, as for "
                             "initial_epoch)", number)
        for earlier in phases:
            if earlier.epoch == epoch:
                raise self.error(f"the phase 'at epoch {epoch}:' overlaps the one on line "
                                 f"{earlier.span.line}: write its statements in one block", span)
            if earlier.epoch > epoch:
                raise self.error(f"phases run in epoch order: 'at epoch {epoch}:' comes after "
                                 f"'at epoch {earlier.epoch}:' (line {earlier.span.line}); move it "
                                 f"before that one", span)
        if epoch == 0 and counts[0]:
            raise self.error("'at epoch 0:' overlaps the statements before it, which already form "
                             "phase 0: write them in one block", span)
        return Phase(epoch, span)

    def rule(self, st: Tree, number: int, epoch: int = 0) -> Rule:
        action_tree, selectors, _except, excepts = st.children
        action = str(action_tree.children[0])
        return Rule(
            action=action,
            selectors=self.selectors(selectors),
            excepts=self.selectors(excepts) if excepts is not None else (),
            text=self.source_of(st),
            span=self.span(st),
            number=number,
            epoch=epoch,
        )

    def policy(self, node: Tree, number: int, epoch: int) -> BatchNormRule:
        _kw, mode, selectors, _except, excepts = node.children
        return BatchNormRule(
            mode=str(mode),
            selectors=self.selectors(selectors) if selectors is not None else (),
            excepts=self.selectors(excepts) if excepts is not None else (),
            text=self.source_of(node),
            span=self.span(node),
            number=number,
            epoch=epoch,
        )

    def selectors(self, tree: Tree) -> tuple[Selector, ...]:
        out = tuple(self.selector(s) for s in tree.children)
        # Commas are optional, but two selectors written against each other are a typo: above
        # all `bn.gamma[0:2]`, which would read as `bn.gamma` and the glob `[0:2]`.
        for prev, cur in zip(out, out[1:]):
            if (prev.span.end_line, prev.span.end_column) == (cur.span.line, cur.span.column):
                if prev.part is not None and prev.part.kind == "weight" and \
                        cur.text.startswith("["):
                    raise self.error(f"'.{prev.part.name}' takes no index: only .filters[...] "
                                     "and .units[...] select entries inside a layer", cur.span)
                raise self.error(f"'{cur.text}' is written against '{prev.text}': separate "
                                 "selectors with a comma or a space", cur.span)
        return out

    def selector(self, tree: Tree) -> Selector:
        *path, part_tree = tree.children
        segments = tuple(self.segment(c) for c in path if not isinstance(c, Token))
        if isinstance(segments[-1], AnyDepth):
            raise self.error("'**' must be followed by '/' and a selector, as in '**/conv1_*'",
                             segments[-1].span)
        part = self.part(part_tree) if part_tree is not None else None
        return Selector(segments=segments, text=self.source_of(tree), span=self.span(tree),
                        part=part)

    def part(self, tree: Tree) -> Part:
        span = self.span(tree)
        if tree.data == "weight_part":
            return Part(WEIGHT, str(tree.children[1]), None, span)
        _dot, opener, index = tree.children
        kind = FILTERS if str(opener).startswith(FILTERS) else UNITS
        return Part(kind, None, self.index(index, span), span)

    def segment(self, tree: Tree):
        kind = tree.data
        span = self.span(tree)
        if kind == "all":
            return All(span)
        if kind == "any_depth":
            return AnyDepth(span)
        if kind == "glob":
            return self.glob(tree.children[0])
        if kind == "exact":
            return Name(_unquote(tree.children[0]), span)
        if kind == "regex":
            return self.regex(tree.children[0])
        if kind == "type":
            token = tree.children[1]
            return TypeGlob(str(token), span, regex=_glob_regex(str(token)))
        if kind == "layers":
            return self.index(tree.children[1], span)
        if kind == "range":
            first, dots, last = tree.children
            self.tight(first, dots, last)
            return self.range(span, first, last)
        if kind == "range_to":
            dots, last = tree.children
            self.tight(None, dots, last)
            return self.range(span, None, last)
        raise AssertionError(f"grammar rule without a builder: {kind}")  # pragma: no cover

    def glob(self, token: Token):
        text = str(token)
        if text in KEYWORDS:
            hint = ("start a new statement on a new line or after ';'" if text in _ACTIONS
                    else f'quote it to mean a layer named {text}: "{text}"')
            if text in ("at", "batchnorm"):  # keywords since phases and policies came in
                hint += f' (or quote it to mean a layer named {text}: "{text}")'

            raise self.error(f"'{text}' is a keyword here; {hint}", token)
        span = self.span(token)
        if _GLOB_MAGIC.search(text):
            return Glob(text, span, regex=_glob_regex(text))
        return Name(text, span)

    def regex(self, token: Token) -> Regex:
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
                compiled = re.compile(pattern)
        except re.error as exc:
            pos = exc.pos or 0
            col = token.column + 1 + min(pos, len(body))
            span = Span(self.file, token.line, col, token.line, col + 1)
            raise self.error(f"invalid regular expression: {exc.msg}", span) from None
        except (OverflowError, RecursionError, ValueError):
            raise self.error("regular expression is too large", token) from None
        return Regex(pattern, self.span(token), regex=compiled)

    def index(self, tree: Tree, span: Span):
        values = [self.integer(t) if t is not None else None for t in tree.children]
        if tree.data == "item":
            return Index(values[0], span)
        start, stop, step = values
        if step == 0:
            raise self.error("slice step cannot be zero", tree.children[2])
        return Slice(start, stop, step, span)

    def integer(self, token: Token) -> int:
        try:
            return int(str(token))
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise self.error("number is too large", token) from None

    def tight(self, first, dots: Token, last) -> None:
        """A range is written without blanks: commas between selectors are optional, so
        'a.. b' would otherwise silently read as the range 'a..b'."""
        before = first is not None and first.meta.end_pos != dots.start_pos
        after = last is not None and dots.end_pos != last.meta.start_pos
        if before or after:
            raise self.error("write a range without blanks ('a..b'); to list an open range and "
                             "another selector, separate them with a comma ('a.., b')", dots)

    def range(self, span: Span, first, last) -> Range:
        ends = []
        for end in (first, last):
            if end is None:
                ends.append((None, None))
                continue
            token = end.children[0]
            if end.data == "glob":
                if _GLOB_MAGIC.search(str(token)):
                    raise self.error("the ends of a range are exact layer names; globs are not "
                                     "allowed here", token)
                if str(token) in KEYWORDS:
                    raise self.glob(token)  # pragma: no cover - glob() raises for keywords
                ends.append((str(token), self.span(token)))
            else:
                ends.append((_unquote(token), self.span(token)))
        (a, a_span), (b, b_span) = ends
        return Range(a, b, span, a_span, b_span)


def _unquote(token: Token) -> str:
    return re.sub(r"\\(.)", r"\1", str(token)[1:-1])


def _glob_regex(pattern: str) -> re.Pattern:
    return re.compile(fnmatch.translate(pattern))


# --- Lark errors -> SpecSyntaxError --------------------------------------------------------------

_SELECTOR_START = {"GLOB", "STRING", "TYPE_PREFIX", "LAYERS_OPEN", "ALL", "ANY_DEPTH", "REGEX",
                   "RANGE"}
_TOKEN_WORDS = {
    "_NL": "end of line", "$END": "end of file", "SEMICOLON": "';'", "COMMA": "','",
    "RSQB": "']'", "COLON": "':'", "SLASH": "'/'", "RANGE": "'..'", "EXCEPT": "'except'",
}


def _expected_words(expected: set[str]) -> str:
    if expected & _SELECTOR_START >= {"GLOB", "REGEX"}:
        return "a selector"
    if {FREEZE.upper(), UNFREEZE.upper()} <= expected:
        return "'freeze' or 'unfreeze'"
    if expected & {"GLOB", "STRING"} == {"GLOB", "STRING"}:
        return "a layer name"
    if "INT" in expected:
        return "an integer, ':' or ']'"
    if expected == {"GLOB"}:
        return "a layer class name, as in 'type:BatchNormalization'"
    if "RSQB" in expected:
        return "']'"
    words = sorted(_TOKEN_WORDS.get(e, e.lower()) for e in expected if e not in ("_NL", "$END"))
    return " or ".join(words) if words else "end of statement"


def _found(token: Token) -> str:
    if token.type in ("_NL", "$END"):
        return _TOKEN_WORDS[token.type]
    return f"'{token}'"


def _syntax_error(exc: UnexpectedInput, text: str, file: str) -> SpecSyntaxError:
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            # Lark's $END borrows the position of the last token; point just after it.
            line, column = token.end_line or 1, token.end_column or 1
        else:
            line, column = token.line, token.column
        message = _unexpected_token_message(token, set(exc.expected), text)
        width = max(1, len(str(token)))
    elif isinstance(exc, UnexpectedCharacters):
        line, column = exc.line, exc.column
        message = _unexpected_char_message(text, exc.pos_in_stream, set(exc.allowed or ()))
        width = 1
    else:  # pragma: no cover - LALR raises only the two above
        line, column, message, width = getattr(exc, "line", 1), getattr(exc, "column", 1), \
            "invalid spec", 1
    span = Span(file, line, column, line, column + width)
    return SpecSyntaxError(message, span, source=text)


def _unexpected_token_message(token: Token, expected: set[str], text: str) -> str:
    word = str(token)
    if {"FREEZE", "UNFREEZE"} <= expected and token.type == "GLOB":
        close = difflib.get_close_matches(word, KEYWORDS, n=1, cutoff=0.6)
        if close and close[0] in _ACTIONS:
            return f"unknown statement '{word}'; did you mean '{close[0]}'?"
        return (f"unknown statement '{word}'; a statement starts with 'freeze', 'unfreeze' or "
                f"'batchnorm', and a phase with 'at epoch N:'")
    if "BN_MODE" in expected:
        close = [m for m in ("frozen", "train", "affine") if word.lower().startswith(m)] or \
            difflib.get_close_matches(word.lower(), ("frozen", "train", "affine"), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close and token.type not in ("_NL", "$END") \
            else ""
        return (f"expected a BatchNormalization policy, 'frozen', 'train' or 'affine', found "
                f"{_found(token)}{hint}")
    if "EPOCH" in expected:
        return f"expected 'epoch' after 'at', as in 'at epoch 3:', found {_found(token)}"
    if expected == {"INT"} and token.type != "INT":
        return f"expected an epoch number, as in 'at epoch 3:', found {_found(token)}"
    if expected == {"COLON"}:
        return f"expected ':' to end the phase header, as in 'at epoch 3:', found {_found(token)}"
    if token.type in ("LAYERS_OPEN", "TYPE_PREFIX", "STRING", "REGEX", "GLOB") and \
            "SLASH" in expected:
        return f"expected ',' or end of statement before '{word}'"
    if "PART_NAME" in expected and token.type == "GLOB":
        before = _before(text, token)
        name = re.split(r"[\s,;/]", before)[-1] + word
        return (f"unexpected '{word}' after '.': a name containing '.' is written quoted, as in "
                f"\"{name}\"; after a layer, '.' names a part: .kernel, .bias, .filters[...], "
                f".units[...]")
    if "PART_NAME" in expected:
        return ("expected a part after '.': a weight name (.kernel, .bias, ...), "
                ".filters[...] or .units[...]")
    if token.type in ("_NL", "$END") and "RSQB" in expected:
        return "unclosed '[': expected ']'"
    if token.type == "SLASH" and "REGEX" in expected:
        return "unterminated regular expression: add the closing '/'"
    before = _before(text, token)
    if token.type in ("_NL", "$END") and "REGEX" in expected and before.endswith("/"):
        if re.search(r"\s/[^/\s]+/$", before):
            return ("expected a selector after '/'; a /regex/ that follows another selector needs "
                    "a comma before it: 'a, /regex/'")
        return "expected a selector after '/'"
    return f"expected {_expected_words(expected)}, found {_found(token)}"


def _before(text: str, token: Token) -> str:
    """The text before a token's position, without trailing blanks and comments."""
    lines = text.splitlines()
    if token.type == "$END":
        line_no, col = (token.end_line or 1), (token.end_column or 1)
    else:
        line_no, col = token.line, token.column
    line = lines[line_no - 1] if 0 < line_no <= len(lines) else ""
    return line[: col - 1].rstrip()


def _unexpected_char_message(text: str, pos: int, allowed: set[str]) -> str:
    ch = text[pos] if pos < len(text) else ""
    if ch == '"' or ch == "'":
        return f"unterminated string: add the closing {ch}"
    if ch == "/" and "REGEX" in allowed:
        return "unterminated regular expression: add the closing '/'"
    if ch == ".":
        start = pos
        while start > 0 and not text[start - 1].isspace() and text[start - 1] not in ",;/":
            start -= 1
        end = pos
        while end < len(text) and not text[end].isspace() and text[end] not in ",;#/":
            end += 1
        name = text[start:end]
        return (f"unexpected '.': a name containing '.' is written quoted, as in \"{name}\"; "
                f"'..' makes a range")
    if "INT" in allowed:
        return f"expected an integer, ':' or ']' inside '[...]', found {_char(ch)}"
    if allowed & _SELECTOR_START:
        return (f"unexpected {_char(ch)}: names with special characters are written quoted, "
                f"as in \"my layer\"")
    return f"unexpected {_char(ch)}"


def _char(ch: str) -> str:
    if ch.isprintable() and ch not in " \t":
        return f"character '{ch}'"
    return f"character {ch!r} (U+{ord(ch):04X})" if ch else "end of input"
