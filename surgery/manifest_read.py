"""Reading a manifest back: its one decoder, which checks the manifest's structure once.

A manifest comes from a file anyone can edit, and `verify` and `diff` index into it: every key
they read must be there with the type they expect, or the reader stops with one line naming the
key (``layers[3].path: missing``), never a KeyError or TypeError deep inside a comparison. The
table below is the manifest that `build_manifest` writes; keys ending in ``?`` are optional, and
keys the table does not name are ignored (a later surgery may add some). Checking walks the
table, not the data, so its depth is the table's whatever the data holds.

Written here rather than with ``jsonschema``: the table is twenty lines, the checker thirty, and
a schema library would add a dependency (and its import time) to commands that load no model.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ManifestError, SurgeryError, unreadable  # noqa: F401  (ManifestError re-exported)
from .inputfile import InputTooLarge, read_bounded
from .manifest import FORMAT, Manifest

__all__ = ["ManifestError", "load_manifest", "decode_manifest", "SCHEMA", "MAX_DEPTH"]

# A manifest nests 6 levels (compiled selectors); keys it does not know are ignored, not walked,
# but comparing or printing a value recurses, so no value may nest deeper than this.
MAX_DEPTH = 32


def load_manifest(path: str) -> Manifest:
    """Read a manifest written by `surgery apply`; `ManifestError` says what is wrong with it."""
    try:
        data = read_bounded(path)
    except InputTooLarge as exc:
        raise ManifestError(f"{path}: not a manifest: {exc}") from None
    except OSError as exc:
        raise ManifestError(unreadable(path, exc, "manifest")) from None
    return decode_manifest(data, path)


def decode_manifest(data: bytes, where: str = "<manifest>") -> Manifest:
    """A manifest from its bytes, its structure checked; ``where`` names it in errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not a manifest: not UTF-8 text (byte {exc.start})") \
            from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not a manifest: invalid JSON at line {exc.lineno}, "
                            f"column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # the json module recurses once per level of nesting
        raise ManifestError(f"{where}: not a manifest: JSON nested deeper than {MAX_DEPTH} "
                            f"levels") from None
    except ValueError as exc:  # a number with more digits than Python converts
        raise ManifestError(f"{where}: not a manifest: {exc}") from None
    if not _nested_at_most(value, MAX_DEPTH):
        raise ManifestError(f"{where}: not a manifest: JSON nested deeper than {MAX_DEPTH} "
                            f"levels")
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a surgery manifest (format {FORMAT})")
    try:
        check(value)
        _check_order(value)
    except StructureError as exc:
        raise ManifestError(f"{where}: not a valid manifest: {exc}") from None
    return Manifest(value)


def _nested_at_most(value: Any, limit: int) -> bool:
    """Whether no list or object in ``value`` lies deeper than ``limit`` (walked without
    recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return True


def _check_order(data: dict) -> None:
    """What the schema cannot say: each layer once; phases from epoch 0, in increasing order."""
    seen = set()
    for i, entry in enumerate(data["layers"]):
        if entry["path"] in seen:
            raise StructureError(f"layers[{i}].path: {entry['path']!r} appears twice")
        seen.add(entry["path"])
    schedule = data.get("schedule")
    if schedule is None:
        return
    if not schedule or schedule[0]["epoch"] != 0:
        raise StructureError("schedule: the first phase must start at epoch 0")
    for i in range(1, len(schedule)):
        if schedule[i]["epoch"] <= schedule[i - 1]["epoch"]:
            raise StructureError(f"schedule[{i}].epoch: phases must start at increasing epochs")


class StructureError(ValueError):
    """A value of the wrong type, or a key that is missing; ``str(exc)`` names where."""


class ListOf:
    def __init__(self, item):
        self.item = item


class MapOf:
    """An object whose keys are layer paths, each value of one kind."""

    def __init__(self, value):
        self.value = value


class Number:
    """An integer or a float (a LoRA alpha)."""


class Maybe:
    def __init__(self, kind):
        self.kind = kind


_PART = {"weight": str, "shape": ListOf(int), "axes": ListOf(int), "frozen": str, "of": int,
         "entries": int}
_LAYER = {"path": str, "index": int, "class": str, "container": bool, "params": int,
          "trainable_params": int, "before": bool, "trainable": bool, "rule": Maybe(int),
          "frozen_parts?": ListOf(_PART), "batchnorm?": Maybe(str), "affine?": bool,
          "lora?": {"rank": int, "alpha": Number, "params": int, "new": bool, "trains": bool,
                    "statement": Maybe(int)}}
_BEFORE_AFTER = {"before": int, "after": int}
_PHASE = {"epoch": int, "line": Maybe(int), "trainable": ListOf(str),
          "frozen_parts": MapOf(ListOf(_PART)), "batchnorm": MapOf(str), "affine": ListOf(str),
          "trainable_params": int}

SCHEMA = {
    "format": int,
    "versions": MapOf(Maybe(str)),
    "spec": {"file": str, "sha256": str, "text": str},
    "model": {"source": str, "name": str, "sha256": Maybe(str), "architecture": str,
              "layers": int},
    "compiled": dict,
    "rules": ListOf({"number": int, "line": int, "column": int, "action": str, "text": str,
                     "matched": ListOf(str), "decides": int}),
    "layers": ListOf(_LAYER),
    "model_trainable": bool,
    "totals": {"params": int, "trainable_params": _BEFORE_AFTER,
               "non_trainable_params": _BEFORE_AFTER, "new_params?": int},
    "notes": ListOf(str),
    "warnings": ListOf({"line": int, "column": int, "message": str}),
    "schedule?": ListOf(_PHASE),
    "output?": {"sha256": str},
}

_NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "an object"}


def check(value: Any, schema: Any = SCHEMA, where: str = "") -> None:
    """Raise `StructureError` unless ``value`` has the structure ``schema`` describes."""
    if isinstance(schema, Maybe):
        if value is not None:
            check(value, schema.kind, where)
        return
    if isinstance(schema, dict):
        _expect(isinstance(value, dict), value, "an object", where)
        for key, sub in schema.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise StructureError(f"{_join(where, name)}: missing")
            check(value[name], sub, _join(where, name))
    elif isinstance(schema, ListOf):
        _expect(isinstance(value, list), value, "a list", where)
        for i, item in enumerate(value):
            check(item, schema.item, f"{where}[{i}]")
    elif isinstance(schema, MapOf):
        _expect(isinstance(value, dict), value, "an object", where)
        for key, item in value.items():
            check(item, schema.value, f"{where}[{key!r}]")
    elif schema is Number:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), value,
                "a number", where)
    elif schema is int:  # a JSON true is no count
        _expect(isinstance(value, int) and not isinstance(value, bool), value, _NAMES[int],
                where)
    else:
        _expect(isinstance(value, schema), value, _NAMES[schema], where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expect(ok: bool, value: Any, what: str, where: str) -> None:
    if not ok:
        found = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                 type(None): "null"}.get(type(value), "a number")
        raise StructureError(f"{where or 'the manifest'}: {what} expected, found {found}")
