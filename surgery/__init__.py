"""surgery: freeze and unfreeze parts of Keras models from a spec file, with a manifest.

    import surgery
    manifest = surgery.apply(model, "freeze all; unfreeze conv5_*")       # a live model
    result = surgery.apply_file("finetune.frz", "base.keras", "tuned.keras")  # file to file
    model.fit(data, epochs=10, callbacks=[surgery.Schedule("finetune.frz")])  # phases
    surgery.save_adapters(model, "adapters.safetensors")  # LoRA factors alone, keyed by path

Importing this package loads no TensorFlow: Keras is imported by the calls that need a model.
"""

from .adapters import load_adapters, save_adapters
from .api import apply, load_model, plan
from .errors import (
    ModelError, SelectorError, SpecError, SpecSyntaxError, SurgeryError, SurgeryWarning,
)
from .ir import Spec
from .manifest import Manifest
from .modelfile import apply_file, merge_file
from .parse import parse
from .specfile import load_spec
from .versions import __version__
from ._register import install as _install_keras_hooks

# Registers surgery's Keras classes (the sub-layer freezing constraint) the moment Keras is
# imported, so keras.models.load_model reads models surgery wrote; Keras itself is not imported.
_install_keras_hooks()

__all__ = [
    "parse",
    "load_spec",
    "apply",
    "apply_file",
    "plan",
    "load_model",
    "save_adapters",
    "load_adapters",
    "merge_file",
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
