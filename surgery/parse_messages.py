"""The words for a syntax error: what the parser found where it expected something else, said
for people (``unknown statement 'unfreez'; did you mean 'unfreeze'?``), never Lark's own text.

surgery/parse.py hands over plain values (the token's kind and text, the kinds the grammar would
have accepted, the text before it on its line), so this module sees no Lark object; the kinds are
the grammar's terminal names (grammars/surgery.lark).
"""

from __future__ import annotations

import re

from .ir import BN_MODES, FREEZE, KEYWORDS, STATEMENT_KEYWORDS, UNFREEZE
from .suggest import did_you_mean, suggest

__all__ = ["unexpected_token", "unexpected_character", "NOT_SELECTORS", "EXCEPT_IN_SELECTORS"]

# A selector string of the YAML form holding a ';' or a line break: statements, not selectors.
NOT_SELECTORS = "one rule per list item: write selectors, not statements, here"
EXCEPT_IN_SELECTORS = ("'except' is a key of the YAML form: list the exceptions under 'except:' "
                       "beside the selectors")

_SELECTOR_START = {"GLOB", "STRING", "TYPE_PREFIX", "LAYERS_OPEN", "ALL", "ANY_DEPTH", "REGEX",
                   "RANGE"}
_ENDS = ("_NL", "$END")
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
    words = sorted(_TOKEN_WORDS.get(e, e.lower()) for e in expected if e not in _ENDS)
    return " or ".join(words) if words else "end of statement"


def _found(word: str, kind: str) -> str:
    return _TOKEN_WORDS[kind] if kind in _ENDS else f"'{word}'"


def unexpected_token(word: str, kind: str, expected: set[str], before: str) -> str:
    """A token of ``kind`` (its text ``word``) where the grammar expected one of ``expected``;
    ``before`` is the text of its line before it, without trailing blanks."""
    found = _found(word, kind)
    if {"FREEZE", "UNFREEZE"} <= expected and kind == "GLOB":
        close = suggest(word, KEYWORDS, n=1)
        if close and close[0] in STATEMENT_KEYWORDS:
            return f"unknown statement '{word}'; did you mean '{close[0]}'?"
        return (f"unknown statement '{word}'; a statement starts with 'freeze', 'unfreeze', "
                f"'lora' or 'batchnorm', and a phase with 'at epoch N:'")
    if "BN_MODE" in expected:
        hint = did_you_mean(word, BN_MODES) if kind not in _ENDS else ""
        return (f"expected a BatchNormalization policy, 'frozen', 'train' or 'affine', found "
                f"{found}{hint}")
    if "RANK_EQ" in expected:
        return f"expected 'rank=' after 'lora', as in 'lora rank=8 query, value', found {found}"
    if expected == {"INT"} and before.endswith("="):
        return f"expected the rank, an integer, as in 'lora rank=8 query', found {found}"
    if "EPOCH" in expected:
        return f"expected 'epoch' after 'at', as in 'at epoch 3:', found {found}"
    if expected == {"INT"} and kind != "INT":
        return f"expected an epoch number, as in 'at epoch 3:', found {found}"
    if expected == {"COLON"}:
        return f"expected ':' to end the phase header, as in 'at epoch 3:', found {found}"
    if kind in ("LAYERS_OPEN", "TYPE_PREFIX", "STRING", "REGEX", "GLOB") and "SLASH" in expected:
        return f"expected ',' or end of statement before '{word}'"
    if "PART_NAME" in expected and kind == "GLOB":
        name = re.split(r"[\s,;/]", before)[-1] + word
        return (f"unexpected '{word}' after '.': a name containing '.' is written quoted, as in "
                f"\"{name}\"; after a layer, '.' names a part: .kernel, .bias, .filters[...], "
                f".units[...]")
    if "PART_NAME" in expected:
        return ("expected a part after '.': a weight name (.kernel, .bias, ...), "
                ".filters[...] or .units[...]")
    if kind in _ENDS and "RSQB" in expected:
        return "unclosed '[': expected ']'"
    if kind == "SLASH" and "REGEX" in expected:
        return "unterminated regular expression: add the closing '/'"
    if kind in _ENDS and "REGEX" in expected and before.endswith("/"):
        if re.search(r"\s/[^/\s]+/$", before):
            return ("expected a selector after '/'; a /regex/ that follows another selector needs "
                    "a comma before it: 'a, /regex/'")
        return "expected a selector after '/'"
    return f"expected {_expected_words(expected)}, found {found}"


def unexpected_character(text: str, pos: int, allowed: set[str]) -> str:
    """A character at ``pos`` of ``text`` that starts no token the grammar accepts there."""
    ch = text[pos] if pos < len(text) else ""
    if ch == "=" and re.search(r"\balpha[ \t]*$", text[:pos]):
        return "expected a number after 'alpha=', as in 'lora rank=8 alpha=16 query'"
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
