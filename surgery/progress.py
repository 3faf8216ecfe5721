"""Progress for the steps that take seconds (building a keras.applications model, loading or
saving through Keras, copying a large archive), so that a slow command is not a silent one.

The code that runs the steps (modelfile.py) names each one to a `Progress` it is given and
prints nothing itself; the command line picks how steps are shown (`for_stderr`): a spinner with
the step's name when stderr is a terminal, one plain line per step otherwise (CI logs, pipes),
nothing with ``--quiet``. A Python caller gets `SILENT` unless it passes one.

`rich` (a Keras dependency) draws the spinner; it is imported only when a spinner is shown, so
commands that load no model (`lint`, `fmt`) never pay for it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import ContextManager, TextIO

__all__ = ["Progress", "SILENT", "Lines", "Spinner", "for_stderr"]


class Progress:
    """Shows nothing: the base, and what a Python caller gets by default."""

    def step(self, name: str) -> ContextManager[None]:
        """A context around one step; ``name`` says what it does ('building ...')."""
        return contextlib.nullcontext()


SILENT = Progress()


class Lines(Progress):
    """One line per step, when it starts: what a log shows while the step runs."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def step(self, name: str) -> ContextManager[None]:
        print(f"surgery: {name} ...", file=self.stream, flush=True)
        return contextlib.nullcontext()


class Spinner(Progress):
    """A spinner with the step's name while it runs, erased when it ends (a terminal)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    @contextlib.contextmanager
    def step(self, name: str):
        from rich.console import Console

        console = Console(file=self.stream, force_terminal=True)
        with console.status(f"surgery: {name} ...", spinner="dots"):
            yield


def for_stderr(*, quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """The progress the command line shows on stderr."""
    stream = stream if stream is not None else sys.stderr
    if quiet:
        return SILENT
    if _is_terminal(stream):
        return Spinner(stream)
    return Lines(stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: no terminal to draw on
        return False
