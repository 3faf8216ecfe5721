"""Registering surgery's Keras classes without importing Keras.

A saved model that uses `FrozenEntries` (surgery/engines/constraint.py) names it
``surgery>FrozenEntries`` (and ``surgery>AffineBatchNormalization``, surgery/engines/batchnorm.py); ``keras.models.load_model`` finds it only if it was registered first,
and Keras imports modules by name only for its own packages. Importing that module imports Keras
and TensorFlow (seconds), which a lint run of ``import surgery`` must not pay. So `install` runs
the registration right after Keras itself is imported, whoever imports it (``import keras``,
``tf.keras``, ...), or at once if Keras is already imported.

This is a post-import hook. wrapt (a TensorFlow dependency) has one, but importing wrapt pulls in
asyncio, inspect and importlib.metadata: 0.1-0.3 s on 2 cores, as much as all of ``import
surgery``. The hook needed here is one module name, fired once: a finder first on
``sys.meta_path`` that lets the other finders locate ``keras``, then runs the registration after
that loader's ``exec_module`` and steps aside.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings

__all__ = ["install"]

_TARGET = "keras"
_installed = False
_lock = threading.Lock()


def install() -> None:
    """Register surgery's Keras classes when Keras is (or once it is) imported. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        module = sys.modules.get(_TARGET)
        if module is None:
            sys.meta_path.insert(0, _AfterImport())
    if module is not None:
        _on_keras(module)


class _AfterImport:
    """A meta-path finder for ``keras`` only: it returns the spec the other finders give, with
    the registration chained after that loader's ``exec_module``."""

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._searching:
            return None
        self._searching = True  # importlib.util.find_spec asks every finder, this one too
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # nothing to chain after (a namespace package): leave it be
        run = loader.exec_module

        def exec_module(module):
            try:
                run(module)
            finally:
                loader.__dict__.pop("exec_module", None)  # the loader's own method back
            # Keras is imported: this finder's work is done. (Had the import failed, it would
            # stay, for the next attempt.)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _on_keras(module)

        loader.exec_module = exec_module
        return spec


def _on_keras(_module) -> None:
    # Runs inside the user's `import keras`: a failure here must not break that import, only
    # the loading of models that need these classes (which then names the missing class).
    try:
        from .engines import batchnorm, constraint  # noqa: F401  (register on import)
    except Exception as e:  # pragma: no cover - depends on a broken Keras install
        warnings.warn(f"surgery: could not register its Keras classes: {e}", stacklevel=2)
