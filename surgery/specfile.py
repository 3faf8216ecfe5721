"""A spec file, a path or spec text -> `Spec`: the form chosen by the file's suffix.

``.yaml`` and ``.yml`` files are the YAML form (surgery/yaml_read.py), anything else the .frz
text (surgery/parse.py). The file is read as UTF-8; a byte that is not is an error at its line
and column, and so is a file larger than any spec (surgery/inputfile.py). The path is kept as
the user gave it, for messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import SpecSyntaxError
from .inputfile import InputTooLarge, read_bounded
from .ir import Span, Spec
from .parse import MAX_CHARS, parse

__all__ = ["load_spec", "as_spec", "is_yaml_path", "SpecLike", "YAML_SUFFIXES"]

YAML_SUFFIXES = (".yaml", ".yml")
SpecLike = Union[Spec, str, Path]


def is_yaml_path(path: Union[str, Path]) -> bool:
    return str(path).endswith(YAML_SUFFIXES)


def load_spec(path: Union[str, Path]) -> Spec:
    """Read and parse a spec file: .frz text, or the YAML form (.yaml, .yml). Raises
    `SpecError` for what the file says, OSError (FileNotFoundError, ...) for reading it."""
    shown = str(path)
    try:
        data = read_bounded(path, 4 * MAX_CHARS)
    except InputTooLarge as exc:
        raise SpecSyntaxError(f"the file is {exc}", Span(shown, 1, 1, 1, 2)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        span = Span(shown, line, column, line, column + 1)
        raise SpecSyntaxError(f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})", span,
                              source=data.decode("utf-8", "replace")) from None
    if is_yaml_path(shown):
        from .yaml_read import parse_yaml  # PyYAML is imported by the YAML form only

        return parse_yaml(text, shown)
    return parse(text, shown)


def as_spec(spec: SpecLike) -> Spec:
    """A `Spec` as given, the file a `Path` names, or a string: a path when it names an existing
    file (or looks like one: one line ending in .frz/.yaml/.yml), else .frz spec text."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Path):
        return load_spec(spec)
    if isinstance(spec, str):
        # A path given as a string is read as a path: 'finetune.frz' parsed as spec text would
        # only say "unknown statement 'finetune'".
        one_line = "\n" not in spec and ";" not in spec
        if one_line and os.path.isfile(spec):
            return load_spec(spec)
        if one_line and spec.strip().lower().endswith((".frz",) + YAML_SUFFIXES):
            raise FileNotFoundError(f"no such spec file: {spec!r} (pass a path to an existing "
                                    f".frz/.yaml file, or spec text)")
        return parse(spec)
    raise TypeError(f"spec must be a Spec, spec text or a path, not {type(spec).__name__}")
