"""What surgery reads from the text of a spec's /regex/ before running it.

The `regex` package (resolve.py matches with it, for its timeout) unrolls counted repeats when it
compiles: '(?:a{1000}){1000}' takes 270 MB and '(?:a{65535}){65535}' all the memory there is. So
the parser refuses a pattern whose unrolled size is beyond any layer name (`unrolled_size`), and
lint warns about nested repeats, the shape that backtracks for minutes (`nested_repeat`). Both
read the text alone, which `re.compile` has already accepted: escapes and character classes are
single atoms, and an alternative or a '(?' prefix counts as if it were matched too (a bound from
above is all that is needed).
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

__all__ = ["MAX_UNROLLED", "unrolled_size", "nested_repeat"]

# Characters a pattern may stand for once its counted repeats are unrolled (the `regex` package
# takes some 300 bytes for each): far more than any layer name holds.
MAX_UNROLLED = 100_000

_COUNT = re.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}")


def _atoms(pattern: str) -> Iterator[tuple[str, int, int, int]]:
    """(kind, start, end, repeat end) for each atom: kind is '(' for a group's opening, ')' for
    its closing (start: the group's opening), '.' for anything else; the repeat that follows an
    atom is pattern[end:repeat end]."""
    opened: list[int] = []
    i, n = 0, len(pattern)
    while i < n:
        ch, start, kind = pattern[i], i, "."
        if ch == "(":
            opened.append(i)
            yield "(", i, i + 1, i + 1
            i += 1
            continue
        if ch == "\\":
            i += 2
        elif ch == "[":
            j = i + 1
            j += j < n and pattern[j] == "^"
            j += j < n and pattern[j] == "]"  # a ']' first in a class is a character
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif ch == ")" and opened:
            start, kind = opened.pop(), ")"
            i += 1
        else:
            i += 1
        end = i
        if i < n and pattern[i] in "*+?":
            i += 1
        else:
            m = _COUNT.match(pattern, i)
            if m and (m.group(1) or m.group(3)):
                i = m.end()
        yield kind, start, end, i


def _count(repeat: str) -> tuple[int, bool]:
    """The most copies a repeat unrolls, and whether it is unbounded."""
    if not repeat:
        return 1, False
    if repeat in "?":
        return 1, False
    if repeat in "*+":
        return 1, True
    low, comma, high = _COUNT.fullmatch(repeat).groups()
    if comma and not high:
        return int(low or 0), True
    return int(high or low or 0), False


def unrolled_size(pattern: str) -> int:
    """An upper bound on the characters the pattern stands for with counted repeats unrolled."""
    sizes = [0]  # the running size of each open group, the whole pattern first
    for kind, start, end, stop in _atoms(pattern):
        if kind == "(":
            sizes.append(0)
            continue
        size = sizes.pop() if kind == ")" and len(sizes) > 1 else 1
        copies, _ = _count(pattern[end:stop])
        sizes[-1] += size * max(copies, 1)
        if sizes[-1] > MAX_UNROLLED:  # already too large: stop before the numbers grow
            return sizes[-1]
    return sum(sizes)


def nested_repeat(pattern: str) -> Optional[str]:
    """The first group repeated without bound that holds a part repeated without bound, as
    written ('(a+)+', '(\\w*)*'); None if there is none. A bounded repeat ('{2,5}') is not
    counted."""
    inside: list[bool] = []  # each open group: whether an unbounded repeat is inside it
    for kind, start, end, stop in _atoms(pattern):
        if kind == "(":
            inside.append(False)
            continue
        inner = inside.pop() if kind == ")" and inside else False
        _, unbounded = _count(pattern[end:stop])
        if unbounded and inner:
            return pattern[start:stop]
        if inside and (unbounded or inner):
            inside[-1] = True
    return None
