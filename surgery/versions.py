"""Versions: surgery's own, and those a manifest records beside it (Keras, TensorFlow, backend).

Read from package metadata and Keras's settings without importing either: both engines (one
never imports TensorFlow) record the same.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

__all__ = ["__version__", "environment_versions"]

__version__ = "0.1.0"  # surgery's own (pyproject.toml has the same)


def environment_versions() -> dict[str, Optional[str]]:
    """Keras, TensorFlow and backend versions, read from package metadata and Keras's settings
    without importing either: both engines (one never imports TensorFlow) record the same."""
    found = _dist_info_versions()

    def version(*dists: str) -> Optional[str]:
        for dist in dists:
            key = _normalized(dist)
            if key in found:
                return found[key]
            from importlib import metadata  # eggs, unusual installs: the slow, general way

            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {"keras": version("keras", "keras-nightly"),
            "tensorflow": version("tensorflow", "tensorflow-cpu", "tensorflow-gpu",
                                  "tensorflow-macos", "tf-nightly", "tf-nightly-cpu"),
            "backend": _keras_backend()}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_info_versions() -> dict[str, str]:
    """Installed versions from the ``NAME-VERSION.dist-info`` folders on sys.path, first one
    wins, as importlib.metadata finds them: importing importlib.metadata alone costs more (15 ms)
    than the rest of an archive-engine `apply` on a small model spends outside its real work."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            dist, _, rest = name[:-len(".dist-info")].partition("-")
            if rest:
                found.setdefault(_normalized(dist), rest)
    return found


def _keras_backend() -> str:
    # As keras/src/backend/config.py decides: KERAS_BACKEND, else keras.json in KERAS_HOME or
    # ~/.keras (/tmp/.keras when home is not writable), else tensorflow.
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend or "tensorflow"
