"""The 'batchnorm affine' policy as a Keras class: BatchNormalization that learns gamma and beta
but always normalizes with its moving statistics and never updates them.

Keras gives a BatchNormalization two behaviours only: trainable (batch statistics in training,
moving averages updated) or frozen (inference mode, gamma and beta fixed). Keras decides inside
``call`` (``training and self.trainable``), so no flag or config value gives the third; a
subclass whose ``call`` always takes the inference branch does, and gradients still reach gamma
and beta through it. It adds no state and no config, the weights file is the same for both classes (see
the note on ``__name__`` below), and a layer
switches policy by switching class (``switch``), in place, so the model graph is untouched.

Registered as ``surgery>AffineBatchNormalization``; surgery/_register.py imports this module as
soon as Keras is imported, so ``import surgery`` is enough for ``keras.models.load_model``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from .frozen_format import AFFINE_CLASS, AFFINE_PACKAGE  # noqa: E402

__all__ = ["AffineBatchNormalization", "is_affine", "switch"]


# Registered under the name engines/frozen_format.py writes into configs (the archive engine).
@keras.saving.register_keras_serializable(package=AFFINE_PACKAGE, name=AFFINE_CLASS)
class AffineBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization in inference mode whatever ``training`` says: normalizes with the
    moving mean and variance, leaves them as they are, and trains gamma and beta when the layer
    is trainable."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


# Keras names a layer's group in a weights file after its class's __name__ (saving_lib): under
# its own name an affine layer would save as 'affine_batch_normalization', and a weights-only
# checkpoint (ModelCheckpoint(save_weights_only=True), BackupAndRestore) would not load into the
# plain model it came from. Under BatchNormalization's name the weights file is the same for both
# classes; the config still finds this class through its registered name.
AffineBatchNormalization.__name__ = "BatchNormalization"
AffineBatchNormalization.__qualname__ = "AffineBatchNormalization"


def is_affine(layer) -> bool:
    return isinstance(layer, AffineBatchNormalization)


def switch(layer, affine: bool) -> None:
    """Give a live BatchNormalization layer the affine behaviour, or take it back. Same
    attributes, same variables; a traced train function must be rebuilt to see it."""
    if affine == is_affine(layer):
        return
    if affine:
        if type(layer) is not keras.layers.BatchNormalization:
            raise TypeError(f"'{layer.name}' is a {type(layer).__name__}: the affine policy "
                            f"applies to keras.layers.BatchNormalization only")
        layer.__class__ = AffineBatchNormalization
    else:
        layer.__class__ = keras.layers.BatchNormalization
