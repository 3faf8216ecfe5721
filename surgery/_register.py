"""Registering surgery's Keras classes without importing Keras.

A saved model that uses `FrozenEntries` (surgery/engines/constraint.py) names it
``surgery>FrozenEntries``; ``keras.models.load_model`` finds it only if it was registered first,
and Keras imports modules by name only for its own packages. Importing that module imports Keras
and TensorFlow (seconds), which a lint run of ``import surgery`` must not pay. So `install` asks
wrapt (a TensorFlow dependency) to import it right after Keras itself is imported, whoever
imports Keras; if Keras is already imported, wrapt runs the hook at once.
"""

from __future__ import annotations

import warnings

__all__ = ["install"]

_installed = False


def install() -> None:
    """Register surgery's Keras classes when Keras is (or once it is) imported. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        import wrapt
    except ImportError:  # no TensorFlow installed either: nothing will load a Keras model
        return
    wrapt.register_post_import_hook(_on_keras, "keras")


def _on_keras(_module) -> None:
    # Runs inside the user's `import keras`: a failure here must not break that import, only
    # the loading of models that need these classes (which then names the missing class).
    try:
        from .engines import constraint  # noqa: F401  (registers on import)
    except Exception as e:  # pragma: no cover - depends on a broken Keras install
        warnings.warn(f"surgery: could not register its Keras classes: {e}", stacklevel=2)
