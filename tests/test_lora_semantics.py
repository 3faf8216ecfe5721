"""The 'lora' statement without TensorFlow: parsing in both spec forms, what it adapts, what
trains, the errors that say how to fix them, and the manifest, against plain layer trees.

Expected sets come from a loop over the same tree description (what a user would write over the
model's layers), never from lists typed in.
"""

import dataclasses
import math

import pytest

import surgery
from surgery.fmt import format_spec
from surgery.lora import LORA_WEIGHTS
from surgery.manifest import build_manifest
from surgery.verify import check_manifest, state_differences
from surgery.plan import plan_spec
from surgery.spec_json import compile_spec
from surgery.tree import LayerTree
from surgery.yaml_read import parse_yaml
from surgery.yaml_write import to_yaml


def _block(name):
    return {"name": name, "class": "TransformerEncoder", "kind": "composite", "layers": [
        {"name": "self_attention_layer", "class": "MultiHeadAttention", "kind": "composite",
         "layers": ["query:EinsumDense", "key:EinsumDense", "value:EinsumDense",
                    "softmax:Softmax", "attention_output:EinsumDense"]},
        "self_attention_layer_norm:LayerNormalization",
        "feedforward_intermediate_dense:Dense", "feedforward_output_dense:Dense"]}


TREE = LayerTree.from_dict({"name": "backbone", "layers": [
    "token_ids:InputLayer",
    {"name": "token_embedding", "class": "Embedding", "weights": [["embeddings", [50, 8]]]},
    _block("transformer_layer_0"), _block("transformer_layer_1"),
    {"name": "head", "class": "Dense", "weights": [["kernel", [8, 4]], ["bias", [4]]]},
    {"name": "conv", "class": "Conv2D", "weights": [["kernel", [3, 3, 3, 8]], ["bias", [8]]]},
    "conv_bn:BatchNormalization",
]})


def training(plan):
    return [f"{lp.path}/{name}" for lp in plan.layers for name, on in plan.trains(lp).items()
            if on]


def factor_paths(tree, names):
    """The factors Keras's enable_lora gives each layer named in ``names``: the loop."""
    out = []
    for node in tree.layers():
        if node.name in names and node.cls in LORA_WEIGHTS:
            out += [f"{node.path}/{n}" for n in LORA_WEIGHTS[node.cls][1:]]
    return out


def plan(text, tree=TREE):
    return plan_spec(surgery.parse(text, "spec.frz"), tree)


def test_freeze_all_then_lora_trains_exactly_the_factors_of_the_selected_layers():
    p = plan("freeze all\nlora rank=2 alpha=4 **/self_attention_layer/query, "
             "**/self_attention_layer/value")
    assert training(p) == factor_paths(TREE, {"query", "value"})
    # What trains is what the totals count; the factors are the parameters the plan adds.
    sizes = {f"{lp.path}/{w.name}": w.size for lp in p.layers for w in lp.layer.weights}
    assert p.totals.trainable_after == sum(sizes[t] for t in training(p))
    expected_added = 0
    for node in TREE.layers():
        if node.name in ("query", "value"):
            kernel = node.shapes["kernel"]
            expected_added += math.prod(kernel[:-1]) * 2 + 2 * kernel[-1]
    assert p.totals.added == expected_added
    assert p.totals.params == TREE.root.params + expected_added
    # Before, only what never trains was non-trainable (BatchNormalization's moving statistics).
    assert p.totals.non_trainable_before == sum(w.size for n in TREE.layers() for w in n.weights
                                                if not w.trainable)


def test_the_statement_decides_the_factors_only_and_later_rules_decide_them_too():
    p = plan("lora rank=2 transformer_layer_0\nfreeze transformer_layer_0/self_attention_layer/key"
             "\nfreeze head\nunfreeze head")
    by = p.by_path
    base = "transformer_layer_0/self_attention_layer/"
    # No rule before: the bias keeps training; the kernel is held off from now on.
    assert p.trains(by[base + "query"]) == {"kernel": False, "bias": True,
                                            "lora_kernel_a": True, "lora_kernel_b": True}
    # A freeze after the statement freezes the factors too.
    assert not any(p.trains(by[base + "key"]).values())
    # Layers a composite holds: every Dense and EinsumDense inside the block got LoRA.
    adapted = sorted(lp.path for lp in p.layers if lp.adapter is not None)
    assert adapted == sorted(n.path for n in TREE.layers()
                             if n.path.startswith("transformer_layer_0/") and
                             n.cls in ("Dense", "EinsumDense"))
    # The LayerNormalization it covers is told of, not adapted.
    assert dict(p.lora[0].skipped) == {"LayerNormalization": 1}


def test_unfreeze_after_lora_trains_the_bias_and_factors_never_the_kernel():
    p = plan("freeze all\nlora rank=2 head\nunfreeze head")
    assert p.trains(p.by_path["head"]) == {"kernel": False, "bias": True,
                                           "lora_kernel_a": True, "lora_kernel_b": True}
    p = plan("freeze all\nunfreeze head\nlora rank=2 head")  # the rule before decides the bias
    assert p.trains(p.by_path["head"])["bias"] is True
    p = plan("unfreeze all\nlora rank=2 head\nfreeze all")
    assert not any(p.trains(p.by_path["head"]).values())


def test_factor_shapes_follow_keras_for_each_class():
    p = plan("lora rank=3 token_embedding, head, conv")
    shapes = {lp.path: {w.name: w.shape for w in lp.layer.weights} for lp in p.layers}
    assert shapes["token_embedding"]["lora_embeddings_a"] == (50, 3)
    assert shapes["token_embedding"]["lora_embeddings_b"] == (3, 8)
    assert shapes["head"]["lora_kernel_a"] == (8, 3) and shapes["head"]["lora_kernel_b"] == (3, 4)
    assert shapes["conv"]["lora_kernel_a"] == (3, 3, 3, 3)
    assert shapes["conv"]["lora_kernel_b"] == (3, 8)


@pytest.mark.parametrize("text,where,words", [
    ("lora rank=2 conv_bn", (1, 13), "covers no layer that Keras can give LoRA"),
    ("lora rank=2 conv*", None, None),  # a glob: the BatchNormalization is skipped, not an error
    ("lora rank=5 head", (1, 1), "rank 5 is larger than 'head.kernel' (8, 4) allows"),
    ("lora rank=0 head", (1, 11), "a LoRA rank is 1 or more"),
    ("lora rank=2 alpha=0 head", (1, 13), "alpha is a positive number"),
    ("lora rank=2 head.kernel", (1, 17), "'lora' selects layers, not parts"),
    ("lora rank=2 heda", (1, 13), "'heda' matches no layer"),
    ("lora rank=2 head\nlora rank=3 head", (2, 1), "a layer has one LoRA"),
    ("lora rank=2 head\nfreeze head.units[0:2]", (2, 1), "its weights are decided whole"),
    ("at epoch 1:\n  lora rank=2 head", (2, 3), "'lora' belongs to phase 0"),
    ("lora 2 head", (1, 6), "expected 'rank=' after 'lora'"),
    ("freeze lora", (1, 8), "'lora' is a keyword here"),
])
def test_errors_point_at_the_statement_and_say_the_fix(text, where, words):
    if where is None:
        assert plan(text).lora[0].targets == ("conv",)
        return
    with pytest.raises(surgery.SpecError) as info:
        plan(text)
    assert (info.value.line, info.value.column) == where
    assert words in info.value.message


def _with_details(tree, path, details):
    """``tree`` with the layer at ``path`` carrying ``details`` (what engines/live.py reads)."""
    def rebuild(node):
        children = tuple(rebuild(c) for c in node.children)
        return dataclasses.replace(node, children=children,
                                   **({"details": details} if node.path == path else {}))

    return LayerTree(rebuild(tree.root))


def test_model_state_refusals_name_the_layer():
    tree = LayerTree.from_dict({"name": "m", "layers": [
        {"name": "fc", "class": "Dense", "weights": [["kernel", [8, 4]], ["bias", [4]]]}]})
    blocked = _with_details(tree, "fc", (("lora_blocked", "a kernel_constraint (MaxNorm)"),))
    with pytest.raises(surgery.SpecError, match=r"'fc' \(Dense\) has a kernel_constraint"):
        plan("lora rank=2 fc", blocked)
    # Already LoRA with another rank (a model Keras's enable_lora was called on).
    with_lora = LayerTree.from_dict({"name": "m", "layers": [
        {"name": "fc", "class": "Dense", "weights": [
            ["kernel", [8, 4], True, {"flag": False, "held": True}], ["bias", [4]],
            ["lora_kernel_a", [8, 2]], ["lora_kernel_b", [2, 4]]]}]})
    with_lora = _with_details(with_lora, "fc", (("lora_rank", "2"),))
    with pytest.raises(surgery.SpecError, match="already has LoRA with rank 2"):
        plan("lora rank=4 fc", with_lora)
    same = plan("freeze all\nlora rank=2 fc", with_lora)  # the same LoRA: decides the factors
    assert not same.by_path["fc"].adapter.new and same.totals.added == 0
    assert training(same) == ["fc/lora_kernel_a", "fc/lora_kernel_b"]


def test_both_spec_forms_and_fmt_round_trip_and_compile():
    text = ("freeze all  # base\nlora rank=4 alpha=16 **/self_attention_layer/query, "
            "**/self_attention_layer/value except transformer_layer_1\nunfreeze head\n")
    spec = surgery.parse(text, "spec.frz")
    assert format_spec(spec) == text
    from_yaml = parse_yaml(to_yaml(spec), "spec.yaml")
    assert [(lo.rank, lo.alpha, lo.text, lo.order) for lo in from_yaml.loras] == \
        [(lo.rank, lo.alpha, lo.text, lo.order) for lo in spec.loras]
    assert plan_spec(from_yaml, TREE).totals == plan_spec(spec, TREE).totals
    compiled = compile_spec(spec)["lora"][0]
    assert (compiled["rank"], compiled["alpha"], compiled["after_operations"]) == (4, 16.0, 1)
    assert "lora" not in compile_spec(surgery.parse("freeze all"))  # other specs as before


@pytest.mark.parametrize("yaml_text,words", [
    ("rules:\n  - lora: head\n", "needs 'rank: R'"),
    ("rules:\n  - lora: head\n    rank: two\n", "expected the rank, an integer"),
    ("rules:\n  - freeze: head\n    rank: 2\n", "'rank' goes with 'lora:'"),
    ("rules:\n  - lora: head\n    rank: 2\n    alpha: [1]\n", "expected alpha, a number"),
])
def test_yaml_form_errors(yaml_text, words):
    with pytest.raises(surgery.SpecError, match=words):
        parse_yaml(yaml_text, "spec.yaml")


def test_manifest_records_lora_and_verify_catches_an_altered_one():
    spec = surgery.parse("freeze all\nlora rank=2 alpha=4 **/query, **/value", "spec.frz")
    p = plan_spec(spec, TREE)
    manifest = build_manifest(p, spec, model_source="m.keras", model_sha256=None,
                              model_name="backbone", versions={})
    entries = {e["path"]: e for e in manifest.layers}
    q = entries["transformer_layer_0/self_attention_layer/query"]["lora"]
    assert q == {"rank": 2, "alpha": 4.0, "params": p.by_path[
        "transformer_layer_0/self_attention_layer/query"].adapter.params, "new": True,
        "trains": True, "statement": 0}
    assert manifest.data["totals"]["new_params"] == p.totals.added
    # The model as apply leaves it is the plan's tree: the manifest follows from it.
    assert check_manifest(manifest, p.tree) == []
    q["rank"] = 3
    assert any("altered" in line for line in check_manifest(manifest, p.tree))
    # A model without the LoRA the manifest records.
    q["rank"] = 2
    assert any("the manifest has LoRA" in d for d in state_differences(manifest, TREE))
