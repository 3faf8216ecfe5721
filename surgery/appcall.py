"""``keras.applications.NAME(arg=literal, ...)``: a MODEL argument that builds a Keras
application with its constructor's keyword arguments, read without Keras and without running
anything.

The text is parsed with Python's own `ast` and each value read with `ast.literal_eval`
(numbers, strings, True/False/None, tuples, lists, dicts of those): no name is looked up, no
call is made but the constructor's, so a MODEL argument from a script or a CI config cannot run
code. Only keyword arguments: positional ones depend on the signature's order, which a
reader of the command line cannot see. ``weights`` is always None (nothing is downloaded):
``weights=None`` may be written, any other value is an error rather than a silent change.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

from .engines import APPLICATIONS_PREFIX as PREFIX
from .errors import ModelError

__all__ = ["parse_application"]

# Far beyond any real call (input_shape, classes, pooling, ...); keeps a hostile argument from
# costing the parser time or memory.
_MAX_LENGTH = 2_000


def parse_application(source: str) -> Optional[tuple[str, dict[str, Any]]]:
    """(NAME, keyword arguments) for ``keras.applications.NAME`` or
    ``keras.applications.NAME(arg=literal, ...)``; None for any other MODEL (a file). Raises
    `ModelError` naming what is wrong with a malformed call."""
    if not source.startswith(PREFIX):
        return None
    rest = source[len(PREFIX):]
    if "(" not in rest:
        return rest, {}
    if len(source) > _MAX_LENGTH:
        raise ModelError(source[:60] + "...", f"a keras.applications call of {len(source):,} "
                         f"characters; at most {_MAX_LENGTH:,}")
    form = "write keras.applications.NAME(arg=value, ...) with literal values, e.g. " \
           "keras.applications.ResNet50(include_top=False, input_shape=(160, 160, 3))"
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise ModelError(source, f"not a keras.applications call ({detail}): {form}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and _dotted(call.func) == source[:source.index("(")]
            .strip()):
        raise ModelError(source, f"not a keras.applications call: {form}")
    name = _dotted(call.func)[len(PREFIX):]
    if "." in name or not name:
        raise ModelError(source, f"not a keras.applications call: {form}")
    if call.args:
        raise ModelError(source, f"positional arguments are not taken: name each one, as "
                         f"in {PREFIX}{name}(input_shape=(160, 160, 3))")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ModelError(source, "'**' is not taken: write each argument as name=value")
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            written = ast.get_source_segment(source, kw.value) or "..."
            raise ModelError(source, f"'{kw.arg}={written}': only literal values are taken "
                             f"(numbers, strings, True, False, None, tuples, lists, dicts); "
                             f"nothing is evaluated") from None
        if kw.arg in kwargs:
            raise ModelError(source, f"'{kw.arg}' is given twice")
        if kw.arg == "weights" and value is not None:
            raise ModelError(source, f"weights={value!r}: surgery builds keras.applications "
                             f"models with weights=None (nothing is downloaded); to start from "
                             f"pre-trained weights, save the model in Python and pass the file")
        kwargs[kw.arg] = value
    kwargs.pop("weights", None)
    return name, kwargs


def _dotted(node) -> str:
    """``a.b.c`` for an attribute chain on a name, "" for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(node.id)
    return ".".join(reversed(parts))
