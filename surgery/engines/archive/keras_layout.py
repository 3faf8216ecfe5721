"""What Keras 3 writes where in a `.keras` archive, as far as the archive engine relies on it.

- The zip holds ``config.json`` (the architecture) and ``model.weights.h5`` (the variables).
- ``model.weights.h5`` stores each layer's variables under ``<path>/vars/0, 1, ...`` with no
  variable names, where ``<path>`` is ``layers/<snake_case(class)>[_n]`` at each level of
  nesting, the counter running over the container's ``.layers`` by class (`GroupNames`).
- The variables are stored in ``layer.weights`` order (trainable ones, then the others), so
  their names come from a per-class table (`weight_names`), from the layer's config alone.
- A variable created without a name (ConvNeXt's LayerScale) is named by a per-process counter
  (``variable``, ``variable_1``, ...) in the order the layers are deserialized (`AutoNames`).
- A constraint in a layer config goes to the weight its attribute names (`constrained_weight`).

Checked against the live engine on keras.applications architectures by tests/test_archive_engine.py.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

__all__ = ["CONFIG", "WEIGHTS", "AutoNames", "join", "snake_case", "GroupNames",
           "weight_names", "constrained_weight"]

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"


def snake_case(name: str) -> str:
    # keras.src.utils.naming.to_snake_case, which names the weights file's groups.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


class GroupNames:
    """The group names of a container's ``.layers`` in the weights file, layer by layer in
    order: ``dense``, ``dense_1``, ``conv2d``, ... (keras/src/saving/saving_lib.py)."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def next(self, cls: str) -> str:
        snake = snake_case(cls)
        if snake not in self._used:
            self._used[snake] = 0
            return snake
        self._used[snake] += 1
        return f"{snake}_{self._used[snake]}"


class AutoNames:
    """keras.src.utils.naming.uniquify for variables created without a name, as in a fresh
    process: "variable", "variable_1", ... in creation (deserialization) order."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> str:
        name = "variable" if self.count == 0 else f"variable_{self.count}"
        self.count += 1
        return name


_CONVS = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
          "DepthwiseConv1D", "DepthwiseConv2D"}


def weight_names(cls: str, module: str, conf: Mapping, n: int,
                 auto: AutoNames) -> Optional[list[tuple[str, bool]]]:
    """(name, trainable-capable) of each stored variable of a layer, in order; None if unknown.

    Only classes whose variables a config fully determines are listed; every other class with
    variables sends the model to the live engine. ``n`` is the count the weights file holds."""
    if n == 0:
        return []
    c = conf
    if c.get("lora_rank") or c.get("quantization_config") or _quantized(c.get("dtype")):
        return None
    bias = [("bias", True)] if c.get("use_bias", True) else []
    names: list[tuple[Optional[str], bool]]
    if cls in _CONVS or cls == "Dense":
        names = [("kernel", True)] + bias
    elif cls in ("SeparableConv1D", "SeparableConv2D"):
        names = [("depthwise_kernel", True), ("pointwise_kernel", True)] + bias
    elif cls == "EinsumDense":
        names = [("kernel", True)] + ([("bias", True)] if c.get("bias_axes") else [])
    elif cls == "BatchNormalization":
        if c.get("renorm"):
            return None
        names = ([("gamma", True)] if c.get("scale", True) else []) + \
                ([("beta", True)] if c.get("center", True) else []) + \
                [("moving_mean", False), ("moving_variance", False)]
    elif cls == "LayerNormalization":
        rms = c.get("rms_scaling", False)
        names = ([("gamma", True)] if c.get("scale", True) or rms else []) + \
                ([("beta", True)] if c.get("center", True) and not rms else [])
    elif cls == "GroupNormalization":
        names = ([("gamma", True)] if c.get("scale", True) else []) + \
                ([("beta", True)] if c.get("center", True) else [])
    elif cls == "Normalization":
        names = [("mean", False), ("variance", False), ("count", False)]
    elif cls == "RMSNormalization":
        names = [("scale", True)]
    elif cls == "Embedding":
        names = [("embeddings", True)]
    elif cls == "PReLU":
        names = [("alpha", True)]
    elif cls == "LayerScale" and module == "keras.src.applications.convnext":
        names = [(None, True)]  # named below, in creation order
    else:
        return None
    if len(names) != n:
        return None
    return [(auto.next() if name is None else name, t) for name, t in names]


def _quantized(dtype) -> bool:
    if isinstance(dtype, dict):
        if dtype.get("class_name") not in (None, "DTypePolicy", "FloatDTypePolicy"):
            return True
        inner = dtype.get("config")
        dtype = inner.get("name") if isinstance(inner, dict) else None
    return isinstance(dtype, str) and dtype.split("_")[0] in ("int8", "int4", "float8", "gptq",
                                                               "awq")


_CONSTRAINT_OF = {"kernel_constraint": "kernel", "bias_constraint": "bias",
                  "gamma_constraint": "gamma", "beta_constraint": "beta",
                  "pointwise_constraint": "pointwise_kernel",
                  "embeddings_constraint": "embeddings"}


def constrained_weight(cls: str, attr: str) -> Optional[str]:
    """The weight a constraint attribute of a layer config applies to, or None."""
    if attr == "depthwise_constraint":
        return "depthwise_kernel" if cls.startswith("SeparableConv") else "kernel"
    return _CONSTRAINT_OF.get(attr)
