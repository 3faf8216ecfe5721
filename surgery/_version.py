"""The package's version, in a module of its own: every module that records it (the manifest,
the command's --version) imports it from here rather than from the package, whose __init__
imports them back (an import cycle)."""

__version__ = "0.1.0"
