"""LoRA adapters on their own: `save_adapters` writes only the factors of a model's LoRA layers,
`load_adapters` puts them back into a model with the same LoRA layers, all or nothing.

The file is safetensors (the format PEFT ships adapters in): a flat map of named tensors and a
string-to-string metadata header, read without running any code from the file, and mapped
rather than unpickled. Tensors are keyed by surgery path (``{layer path}/{variable name}``,
e.g. ``transformer_layer_0/self_attention_layer/query/lora_kernel_a``), never by position among
layers: keras_hub's own ``save_lora_weights`` keys them by position, so after an architecture
change they load into the wrong layers (keras-hub issue 2701). The metadata holds the format,
each layer's rank and alpha, and the sha256 of the spec that created them, where known.

This module is that file's one encoder (`save_adapters`) and one decoder (`_read`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .errors import SurgeryError

__all__ = ["save_adapters", "load_adapters", "AdaptersError", "FORMAT"]

FORMAT = "surgery-adapters/1"
# Where `surgery.apply` leaves the sha256 of the spec it applied on a live model (read here).
SPEC_ATTR = "_surgery_spec_sha256"


class AdaptersError(SurgeryError):
    """An adapters file that cannot be written, read or loaded into this model."""

    def __init__(self, path: str, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}")


def save_adapters(model, path, *, spec_sha256: Optional[str] = None) -> dict:
    """Write the LoRA factors of ``model`` to ``path`` (safetensors), with each layer's rank and
    alpha and the sha256 of the spec that created them (``spec_sha256``, else the one
    `surgery.apply` recorded on the model). The file appears whole or not at all. Returns the
    metadata written. Raises `AdaptersError` where the model has no LoRA layer."""
    import numpy as np

    path = os.fspath(path)
    save_file = _safetensors(path).save_file
    layers, _ = _lora_layers(model)
    if not layers:
        raise AdaptersError(path, "the model has no LoRA layer: nothing to save (give layers "
                            "LoRA with a 'lora rank=R ...' statement first)")
    tensors, described = {}, {}
    for p, (layer, base, a, b) in layers.items():
        for v in (a, b):
            tensors[f"{p}/{v.name}"] = np.ascontiguousarray(np.asarray(v.numpy()))
        described[p] = {"class": base, "rank": int(layer.lora_rank),
                        "alpha": float(layer.lora_alpha), "variable_path": str(a.path)}
    sha = spec_sha256 or getattr(model, SPEC_ATTR, None)
    metadata = {"format": FORMAT, "layers": json.dumps(described, sort_keys=True),
                **({"spec_sha256": sha} if sha else {})}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    except OSError as exc:
        raise AdaptersError(path, f"cannot write: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return metadata


def load_adapters(model, path) -> dict:
    """Load the LoRA factors in ``path`` into ``model``, which must have LoRA on exactly the
    layers the file names, with the same rank, alpha and shapes. Every check runs before any
    value is assigned: on a mismatch `AdaptersError` lists it and the model is unchanged.
    Returns the file's metadata."""
    path = os.fspath(path)
    metadata, tensors = _read(path)
    described = metadata["layers"]
    layers, paths = _lora_layers(model)
    problems = []
    for p in sorted(set(described) - set(layers)):
        problems.append(f"'{p}' has LoRA in the file, " + (
            "not in the model" if p in paths else "and the model has no such layer"))
    for p in sorted(set(layers) - set(described)):
        problems.append(f"'{p}' has LoRA in the model, not in the file")
    assignments = []
    for p in sorted(set(layers) & set(described)):
        layer, base, a, b = layers[p]
        want = described[p]
        if int(layer.lora_rank) != want["rank"]:
            problems.append(f"'{p}' has rank {layer.lora_rank} in the model, {want['rank']} in "
                            f"the file")
            continue
        if float(layer.lora_alpha) != float(want["alpha"]):
            problems.append(f"'{p}' has alpha {float(layer.lora_alpha):g} in the model, "
                            f"{float(want['alpha']):g} in the file")
            continue
        for v in (a, b):
            key = f"{p}/{v.name}"
            value = tensors.get(key)
            if value is None:
                problems.append(f"'{key}' is missing from the file")
            elif tuple(value.shape) != tuple(v.shape):
                problems.append(f"'{key}' is {tuple(value.shape)} in the file, "
                                f"{tuple(v.shape)} in the model")
            else:
                assignments.append((v, value))
    extra = sorted(set(tensors) - {f"{p}/{n}" for p in described for n in _factor_names(
        described[p].get("class"))})
    problems += [f"'{k}' in the file belongs to no LoRA layer it describes" for k in extra]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 5 else "")
        raise AdaptersError(path, f"does not fit this model, nothing loaded: {shown}")
    for v, value in assignments:
        v.assign(value.astype(v.dtype) if str(value.dtype) != str(v.dtype) else value)
    return metadata


def _read(path: str) -> tuple[dict, dict]:
    """The metadata (``layers`` decoded) and the tensors of an adapters file."""
    _safetensors(path)
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise AdaptersError(path, "no such file")
    try:
        with safe_open(path, framework="numpy") as f:  # the header and the tensors, one open
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdaptersError(path, f"not a readable safetensors file: {str(exc)[:200]}") from None
    if metadata.get("format") != FORMAT:
        raise AdaptersError(path, f"not a surgery adapters file (format "
                            f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        layers = json.loads(metadata["layers"])
        for p, d in layers.items():
            if not (isinstance(d, dict) and isinstance(d.get("rank"), int)
                    and isinstance(d.get("alpha"), (int, float))):
                raise ValueError(p)
    except (KeyError, ValueError, TypeError, AttributeError):
        raise AdaptersError(path, "its metadata does not describe the LoRA layers") from None
    return {**metadata, "layers": layers}, tensors


def _safetensors(path: str):
    try:
        import safetensors.numpy
    except ImportError:
        raise AdaptersError(path, "adapters files need safetensors, which is not installed: "
                            "pip install 'surgery[tensorflow]' (or [jax], [torch])") from None
    return safetensors.numpy


def _factor_names(cls) -> tuple[str, ...]:
    from .lora import LORA_WEIGHTS

    return LORA_WEIGHTS.get(cls, ("", "lora_kernel_a", "lora_kernel_b"))[1:]


def _lora_layers(model) -> tuple[dict, set]:
    """surgery path -> (layer, its LoRA class, factor A, factor B), for every LoRA layer; and
    every layer's path (from the one description of the model)."""
    from .engines import live
    from .lora import LORA_WEIGHTS, lora_base

    tree, objects = live.describe(model)
    out = {}
    for node in tree.layers():
        layer = objects[node.path]
        base = lora_base(node)
        if base is None or not getattr(layer, "lora_enabled", False):
            continue
        a, b = (getattr(layer, n) for n in LORA_WEIGHTS[base][1:])
        out[node.path] = (layer, base, a, b)
    return out, {n.path for n in tree.layers()}
