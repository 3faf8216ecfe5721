"""LoRA statements against a LayerTree: the adapters a spec asks for, and the tree that has them.

``lora rank=R [alpha=A] SELECTORS`` gives each layer it covers (covering as for rules: a
composite layer or a nested model covers the layers inside it) that Keras can adapt two low-rank
factors, A and B, whose product, scaled by ``alpha / rank``, is added to the layer's kernel.
Resolved before the freeze/unfreeze rules, into `Adapters`: which layers get LoRA (or have it
already), and the tree as it will be once they have it (`Adapters.tree`): the adapted weight
held off by its variable's own flag, as Keras's ``enable_lora`` leaves it, and the two factors
after the layer's weights, where Keras appends them. The rules then resolve against that tree,
so a later ``freeze`` that covers the layer freezes its factors too; plan.py settles what the
statement itself decides: the factors train, nothing else changes.

Pure: no Keras. The classes, weight names and factor shapes are Keras 3's (``enable_lora`` in
keras/src/layers/core/dense.py, einsum_dense.py, embedding.py, convolutional/base_conv.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import Diagnostic, SelectorError
from .ir import LoraRule, Name, Spec
from .resolve import select_units
from .tree import Layer, LayerTree, Weight

__all__ = ["LORA_WEIGHTS", "Adapter", "LoraResult", "Adapters", "resolve_lora", "lora_base"]

# The classes Keras gives LoRA: the weight it adapts and the names of its two factors.
LORA_WEIGHTS = {
    "Dense": ("kernel", "lora_kernel_a", "lora_kernel_b"),
    "EinsumDense": ("kernel", "lora_kernel_a", "lora_kernel_b"),
    "Embedding": ("embeddings", "lora_embeddings_a", "lora_embeddings_b"),
    "Conv1D": ("kernel", "lora_kernel_a", "lora_kernel_b"),
    "Conv2D": ("kernel", "lora_kernel_a", "lora_kernel_b"),
    "Conv3D": ("kernel", "lora_kernel_a", "lora_kernel_b"),
}
_CLASSES = ", ".join(LORA_WEIGHTS)

# Layer.details keys. engines/live.py writes them: "lora_base" names the Keras class a subclass
# takes LoRA from (keras_hub's ReversibleEmbedding is an Embedding); "lora_blocked" why Keras
# would refuse it (a kernel constraint of the user's, quantization).
RANK, ALPHA, BASE, BLOCKED = "lora_rank", "lora_alpha", "lora_base", "lora_blocked"


def lora_base(node: Layer) -> Optional[str]:
    """The class whose LoRA the layer has (its own, or the Keras class it derives from)."""
    details = dict(node.details)
    cls = details.get(BASE, node.cls)
    return cls if cls in LORA_WEIGHTS else None


@dataclass(frozen=True)
class Adapter:
    """LoRA on one layer: ``weight`` is the weight it adapts (held frozen), ``a`` and ``b`` the
    factors as the adapted tree lists them. ``statement``: the last LoRA statement that covers
    the layer (None: the model has LoRA there and no statement names it); ``new``: the plan
    creates the factors (False: the model has them)."""

    path: str
    rank: int
    alpha: float
    weight: str
    a: Weight
    b: Weight
    statement: Optional[LoraRule]
    new: bool

    @property
    def params(self) -> int:
        return self.a.size + self.b.size

    @property
    def factors(self) -> tuple[str, str]:
        return (self.a.name, self.b.name)


@dataclass(frozen=True)
class LoraResult:
    """What one statement did: the layers it gives LoRA (model order), and the classes of the
    layers with weights it covers but cannot adapt, with their counts (a glob such as conv5_*
    covers BatchNormalization layers too)."""

    statement: LoraRule
    targets: tuple[str, ...]
    skipped: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Adapters:
    original: LayerTree
    tree: LayerTree  # the model once every new adapter exists
    by_path: Mapping[str, Adapter]  # every adapter the model will have, new or not
    results: tuple[LoraResult, ...] = ()
    unmatched: tuple[Diagnostic, ...] = ()

    @property
    def new(self) -> tuple[Adapter, ...]:
        return tuple(a for a in self.by_path.values() if a.new)


def resolve_lora(spec: Spec, tree: LayerTree, *, allow_empty: bool = False) -> Adapters:
    """The adapters of ``tree`` once ``spec``'s LoRA statements apply. Raises `SelectorError`
    for what Keras would refuse or what the statement cannot mean (every problem listed)."""
    existing = {n.path: a for n in tree.units() if (a := _existing(n)) is not None}
    if not spec.loras:
        return Adapters(tree, tree, existing)
    errors: list[Diagnostic] = []
    unmatched: list[Diagnostic] = []
    wanted: dict[str, Adapter] = {}
    results = []
    for st in spec.loras:
        for sel in st.selectors + st.excepts:
            if sel.part is not None:
                errors.append(Diagnostic(
                    "error", "'lora' selects layers, not parts of them: it adapts the layer's "
                    "kernel (or an Embedding's embeddings) and nothing else", sel.part.span))
        matched, covered, problems = select_units(tree, st.selectors, st.excepts, spec.source)
        unmatched += problems
        kept = set(covered)
        for sel, nodes in matched:
            units = [u for n in nodes for u in _units(n) if u.path in kept]
            if nodes and not any(lora_base(u) for u in units):
                classes = Counter(u.cls for u in units if u.weights)
                found = ", ".join(f"{c} x{k}" if k > 1 else c for c, k in classes.most_common(4))
                errors.append(Diagnostic(
                    "error", f"'{sel.text}' covers no layer that Keras can give LoRA "
                    f"({_CLASSES} have it){': it covers ' + found if found else ''}", sel.span))
                continue
            exact = isinstance(sel.segments[-1], Name)  # a glob may cover other classes
            for n in nodes:
                if exact and n.unit and n.weights and not n.children and not lora_base(n):
                    errors.append(Diagnostic(
                        "error", f"'{n.path}' is a {n.cls}, which has no LoRA in Keras ("
                        f"{_CLASSES} have it)", sel.span))
        targets, skipped = [], Counter()
        for path in covered:
            node = tree.get(path)
            if not lora_base(node):
                if node.weights:
                    skipped[node.cls] += 1
                continue
            problem = _refused(node, st, existing.get(path))
            if problem:
                errors.append(Diagnostic("error", problem, st.span))
                continue
            earlier = wanted.get(path)
            if earlier is not None and (earlier.rank, earlier.alpha) != (st.rank, st.scale_alpha):
                errors.append(Diagnostic(
                    "error", f"'{path}' gets LoRA from line {earlier.statement.span.line} "
                    f"(rank {earlier.rank}, alpha {earlier.alpha:g}) and from this statement "
                    f"(rank {st.rank}, alpha {st.scale_alpha:g}): a layer has one LoRA", st.span))
                continue
            had = existing.get(path)
            wanted[path] = dataclasses.replace(had, statement=st) if had is not None else \
                _adapter(node, st)
            targets.append(path)
        results.append(LoraResult(st, tuple(targets), tuple(skipped.most_common())))
    if unmatched and not allow_empty:
        errors = unmatched + errors
    if errors:
        errors.sort(key=lambda d: (d.span.line, d.span.column))
        raise SelectorError(errors[0].message, errors[0].span, source=spec.source,
                            diagnostics=tuple(errors))
    by_path = {**existing, **wanted}
    new = {p: a for p, a in by_path.items() if a.new}
    return Adapters(tree, _adapted(tree, new) if new else tree, by_path, tuple(results),
                    tuple(unmatched))


def _units(node: Layer):
    if node.unit:
        yield node
    for c in node.children:
        yield from _units(c)


def _existing(node: Layer) -> Optional[Adapter]:
    """The adapter a layer of the model already has (Keras's enable_lora, an earlier run)."""
    details = dict(node.details)
    base = lora_base(node)
    if details.get(RANK) is None or base is None:
        return None
    weight, a_name, b_name = LORA_WEIGHTS[base]
    found = {w.name: w for w in node.weights}
    if a_name not in found or b_name not in found:
        return None
    rank = int(details[RANK])
    alpha = float(details.get(ALPHA, rank))
    return Adapter(node.path, rank, alpha, weight, found[a_name], found[b_name], None, False)


def _refused(node: Layer, st: LoraRule, had: Optional[Adapter]) -> str:
    """Why ``node`` cannot take the LoRA ``st`` asks for ("" if it can)."""
    details = dict(node.details)
    weight = LORA_WEIGHTS[lora_base(node)][0]
    shapes = node.shapes
    if weight not in shapes:
        return (f"'{node.path}' ({node.cls}) has no {weight} (is it built?): Keras gives LoRA "
                f"only to a built layer")
    if details.get(BLOCKED):
        return (f"'{node.path}' ({node.cls}) has {details[BLOCKED]}, and Keras refuses LoRA on "
                f"such a layer: remove it from the layer, or leave the layer out of the "
                f"statement ('except {node.name}')")
    w = next(w for w in node.weights if w.name == weight)
    if w.frozen:
        return (f"'{node.path}.{weight}' has entries frozen by an earlier surgery run (a "
                f"FrozenEntries constraint), and Keras refuses LoRA with a kernel constraint: "
                f"LoRA freezes the whole {weight} anyway; unfreeze those entries first "
                f"('unfreeze {node.path}.{weight}') in a run before this one")
    if had is not None:
        if had.rank != st.rank or had.alpha != st.scale_alpha:
            return (f"'{node.path}' already has LoRA with rank {had.rank} and alpha "
                    f"{had.alpha:g}, and Keras enables LoRA once per layer: write "
                    f"'lora rank={had.rank} alpha={had.alpha:g}' for it, or start from a model "
                    f"without LoRA")
        return ""
    limit = min(math.prod(w.shape[:-1]), w.shape[-1]) if len(w.shape) >= 2 else 0
    if st.rank > limit:
        return (f"rank {st.rank} is larger than '{node.path}.{weight}' {w.shape} allows: an "
                f"update of that weight has rank {limit} at most; choose a rank of {limit} or "
                f"less")
    return ""


def _adapter(node: Layer, st: LoraRule) -> Adapter:
    weight, a_name, b_name = LORA_WEIGHTS[lora_base(node)]
    shape = node.shapes[weight]
    a = Weight(a_name, tuple(shape[:-1]) + (st.rank,), True)
    b = Weight(b_name, (st.rank, shape[-1]), True)
    return Adapter(node.path, st.rank, st.scale_alpha, weight, a, b, st, True)


def _adapted(tree: LayerTree, new: Mapping[str, Adapter]) -> LayerTree:
    """``tree`` with each new adapter in place: its weight held off (the variable's own flag, as
    enable_lora sets it), its factors after the layer's weights, its rank and alpha recorded."""

    def rebuild(node: Layer) -> Layer:
        children = tuple(rebuild(c) for c in node.children)
        ad = new.get(node.path)
        if ad is None:
            return node if children == node.children else dataclasses.replace(
                node, children=children)
        weights = tuple(dataclasses.replace(w, flag=False, held=True) if w.name == ad.weight
                        else w for w in node.weights) + (ad.a, ad.b)
        details = tuple(kv for kv in node.details if kv[0] not in (RANK, ALPHA)) + (
            (RANK, str(ad.rank)), (ALPHA, repr(ad.alpha)))
        return dataclasses.replace(node, weights=weights, children=children, details=details)

    return LayerTree(rebuild(tree.root))
