"""The grammar, and the LALR parser Lark builds from it: built once and kept on disk.

parse.py parses with `parser()`; this file only finds the grammar (in the wheel or the source
tree) and keeps the built tables in the user's cache folder, trusted with no code (see
`parser`).
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Optional

from lark import Lark

__all__ = ["grammar_text", "parser"]


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


_LARK_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True,
                 "start": ["start", "selectors"]}
_CACHE_FORMAT = 2  # 1 was a JSON file read through Lark's private loader


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    """One parser for the process.

    Building the LALR tables from the grammar costs 30-60 ms, more than the rest of a `surgery`
    run on a small model, so the built parser is kept in the user's cache folder
    (``$SURGERY_CACHE_DIR``, else ``$XDG_CACHE_HOME/surgery``, else ``~/.cache/surgery``) and
    loaded from there in about 3 ms, with Lark's public `Lark.save` and `Lark.load`. The file is
    named and checked by a key over the grammar text, the Lark and Python versions and the
    options, so a changed grammar or an upgraded Lark builds (and caches) a parser of its own.
    Lark saves a pickle, and a pickle can name code to run; the file is trusted with none: its
    header holds the SHA-256 of the rest, and the rest is first read by an unpickler that
    refuses every class and function (`_DataOnly`), so only plain data (dicts, lists, strings,
    numbers) ever reaches `Lark.load`. Any file that fails those checks or fails to load is
    rebuilt; where the folder cannot be written the parser is built on every run, as before.
    """
    text = grammar_text()
    key = _parser_key(text)
    path = _parser_cache_path(key)
    built = _load_parser(path, key) if path is not None else None
    if built is None:
        built = Lark(text, **_LARK_OPTIONS)
        if path is not None:
            _save_parser(built, path, key)
    return built


def _parser_key(text: str) -> str:
    import hashlib
    import sys

    import lark

    what = [_CACHE_FORMAT, lark.__version__, list(sys.version_info[:2]),
            sorted(_LARK_OPTIONS.items()), text]
    return hashlib.sha256(repr(what).encode("utf-8")).hexdigest()


def _parser_cache_path(key: str) -> Optional[Path]:
    import os

    folder = os.environ.get("SURGERY_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        if not os.path.isabs(base):
            return None  # no usable home (expanduser left "~"): do not cache in the cwd
        folder = os.path.join(base, "surgery")
    return Path(folder) / f"parser-{key[:24]}.pickle"


def _header(key: str, payload: bytes) -> bytes:
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    return f"surgery-parser {_CACHE_FORMAT} {key} {digest}\n".encode("ascii")


class _DataOnly(pickle.Unpickler):
    """Refuses every global: the only way a pickle reaches a class or a function to call."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"the parser cache names {module}.{name}")


def _load_parser(path: Path, key: str) -> Optional[Lark]:
    """The cached parser, or None when there is none this run can trust."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:  # missing or unreadable: build it
        return None
    end = data.find(b"\n") + 1
    payload = data[end:]
    if not end or data[:end] != _header(key, payload):
        return None  # another grammar, Lark or format, a truncated or damaged file
    try:
        _DataOnly(io.BytesIO(payload)).load()
        parser = Lark.load(io.BytesIO(payload))
    except Exception:  # noqa: BLE001 - see below
        # Only a file forged to match its own digest gets here, and only as plain data: what
        # Lark's loader raises on such data is not ours to list, and the cure is the same for
        # every kind, building the tables again. No code of ours runs inside this 'try'.
        return None
    return parser if isinstance(parser, Lark) else None


def _save_parser(parser: Lark, path: Path, key: str) -> None:
    """Write the cache file atomically (concurrent runs never read half a file); a read-only or
    full disk leaves the run as it was."""
    import os
    import secrets

    buffer = io.BytesIO()
    parser.save(buffer)
    payload = buffer.getvalue()
    tmp = None
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_header(key, payload) + payload)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
