"""surgery: freeze and unfreeze parts of Keras models from a spec file, with a manifest.

    import surgery
    manifest = surgery.apply(model, "freeze all; unfreeze conv5_*")
    model.fit(data, epochs=10, callbacks=[surgery.Schedule("finetune.frz")])  # phases

Importing this package loads no TensorFlow: Keras is imported by the calls that need a model.
"""

from .api import SurgeryWarning, apply, load_model, plan
from .errors import ModelError, SelectorError, SpecError, SpecSyntaxError, SurgeryError
from .ir import Spec
from .manifest import Manifest
from .parse import load_spec, parse
from ._register import install as _install_keras_hooks

# Registers surgery's Keras classes (the sub-layer freezing constraint) the moment Keras is
# imported, so keras.models.load_model reads models surgery wrote; Keras itself is not imported.
_install_keras_hooks()

__version__ = "0.1.0"

__all__ = [
    "parse",
    "load_spec",
    "apply",
    "plan",
    "load_model",
    "Schedule",
    "Spec",
    "Manifest",
    "SurgeryError",
    "SpecError",
    "SpecSyntaxError",
    "SelectorError",
    "ModelError",
    "SurgeryWarning",
    "__version__",
]


def __getattr__(name):
    # Schedule subclasses keras.callbacks.Callback: importing it imports Keras, which
    # `import surgery` must not (a lint run loads no TensorFlow). It loads on first use.
    if name == "Schedule":
        from .engines.schedule import Schedule

        return Schedule
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
