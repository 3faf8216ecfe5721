"""Did-you-mean: the one algorithm behind every hint surgery gives for a misspelled word.

Layer names, class names, statement keywords, policies, YAML keys and keras.applications models
all go through `suggest`, so a hint reads the same wherever it comes from.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

__all__ = ["suggest", "did_you_mean"]

_WORD_PARTS = re.compile(r"[_\-]")


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest candidates, best first: the same parts or letters in another order first
    (``bn_conv1`` -> ``conv1_bn``), then the nearest spellings ignoring case (``Batchnorm`` ->
    ``BatchNormalization``); each in its real spelling, never ``word`` itself."""
    if not word:
        return []
    unique = list(dict.fromkeys(candidates))
    folded: dict[str, str] = {}
    for c in unique:
        folded.setdefault(c.lower(), c)
    key = word.lower()
    parts = sorted(_WORD_PARTS.split(key))
    letters = sorted(key)
    reordered = [c for c in unique if c != word and (
        sorted(_WORD_PARTS.split(c.lower())) == parts or sorted(c.lower()) == letters)]
    close = [folded[c] for c in difflib.get_close_matches(key, list(folded), n=n, cutoff=0.6)]
    return [c for c in dict.fromkeys(reordered + close) if c != word][:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    close = suggest(word, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
