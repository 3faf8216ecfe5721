"""Specs in repositories: lint without TensorFlow, fmt, the YAML form, compile, verify, diff."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import surgery
from surgery.cli import main
from surgery.spec_json import compile_spec
from surgery.fmt import format_policy, format_rule, format_spec
from surgery.yaml_read import parse_yaml
from surgery.yaml_write import to_yaml

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.frz"))


def run(*args):
    return main([str(a) for a in args])


def _layout_free(compiled, key="operations"):
    """The compiled operations (or policies, or phases) without positions: what a spec means,
    not where it was written."""
    return [{k: v for k, v in op.items() if k not in ("line", "column")}
            for op in compiled[key]]


def _meaning(spec):
    """Everything a spec means, positions aside: rules, policies and phases with their epochs."""
    compiled = compile_spec(spec)
    return {key: _layout_free(compiled, key) for key in ("operations", "policies", "phases")}


# --- lint ------------------------------------------------------------------------------------


def test_lint_clean_spec_exits_0(tmp_path, capsys):
    spec = tmp_path / "ok.frz"
    spec.write_text("freeze all\nunfreeze conv5_*\n")
    assert run("lint", spec) == 0
    assert capsys.readouterr() == ("", "")


def test_lint_reports_each_finding_with_position(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze a\nfreeze layers[5:2], b, b\nfreeze a\nfreeze x\nfreeze all\n"
                    "unfreeze c\n")
    assert run("lint", spec) == 1
    err = capsys.readouterr().err
    headlines = [line for line in err.splitlines() if line.startswith(str(spec))]
    assert headlines == [
        f"{spec}:1:1: warning: this rule has no effect: later rules decide every layer it "
        f"covers: 'freeze all' (line 5)",
        f"{spec}:2:1: warning: this rule has no effect: later rules decide every layer it "
        f"covers: 'freeze all' (line 5)",
        f"{spec}:2:8: warning: 'layers[5:2]' is empty for every model: the slice selects no layer",
        f"{spec}:2:24: warning: 'b' is listed twice in this statement",
        f"{spec}:3:1: warning: duplicate statement: the same as line 1",
        f"{spec}:4:1: warning: this rule has no effect: later rules decide every layer it "
        f"covers: 'freeze all' (line 5)",
    ]


def test_lint_dead_rule_by_later_selectors(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze x, y\nunfreeze x\nunfreeze y, z\nfreeze w except x\nunfreeze w\n")
    assert run("lint", spec) == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:1: warning: this rule has no effect: later rules decide every layer it " \
           f"covers: 'unfreeze x' (line 2), 'unfreeze y, z' (line 3)" in err
    assert f"{spec}:4:1: warning" in err
    assert f"{spec}:2:1" not in err  # only partly covered by later rules: not dead


def test_lint_syntax_error_is_a_finding_and_missing_file_is_exit_2(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("unfreez a\n")
    assert run("lint", spec) == 1
    assert "did you mean 'unfreeze'?" in capsys.readouterr().err
    assert run("lint", tmp_path / "missing.frz") == 2
    assert "no such spec file" in capsys.readouterr().err


def test_lint_with_model_reports_every_selector_that_matches_nothing(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze bn_conv1, conv1_conv\nunfreeze conv9_*\n")
    assert run("lint", spec, "--model", "keras.applications.VGG16") == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:8: error: 'bn_conv1' matches no layer" in err
    assert f"{spec}:1:18: error: 'conv1_conv' matches no layer" in err
    assert f"{spec}:2:10: error: 'conv9_*' matches no layer" in err


def test_lint_imports_neither_tensorflow_nor_keras(tmp_path):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze all\nunfreeze conv5_*\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "surgery", "lint", str(spec)],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    modules = [line.split("|")[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")]
    assert "lark" in modules and "surgery.lint" in modules  # the measurement worked
    heavy = [m for m in modules if m.split(".")[0] in ("tensorflow", "keras", "numpy", "h5py")]
    assert heavy == []


# --- fmt -------------------------------------------------------------------------------------

MESSY = """# header

freeze   conv1_* ;freeze layers[ 0 : 10 ]   # inline
unfreeze "conv5_block1_out" , type:BatchNormalization except   /conv5_block\\d_1_.*/



# trailing comment
"""

CANONICAL = """# header

freeze conv1_*
freeze layers[0:10]  # inline
unfreeze conv5_block1_out, type:BatchNormalization except /conv5_block\\d_1_.*/

# trailing comment
"""


def test_fmt_canonical_form_and_fixed_point():
    assert format_spec(surgery.parse(MESSY)) == CANONICAL
    assert format_spec(surgery.parse(CANONICAL)) == CANONICAL


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_example_spec_is_canonical_and_round_trips_through_yaml(path):
    spec = surgery.load_spec(path)
    assert format_spec(spec) == path.read_text()
    as_yaml = to_yaml(spec)
    back = parse_yaml(as_yaml, "x.yaml")
    assert format_spec(back) == path.read_text()  # comments and blank lines included
    assert _layout_free(compile_spec(back)) == _layout_free(compile_spec(spec))
    assert to_yaml(back) == as_yaml


def test_fmt_check_write_and_print(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text(MESSY)
    assert run("fmt", "--check", spec) == 1
    assert "not in canonical form" in capsys.readouterr().err
    assert spec.read_text() == MESSY
    assert run("fmt", spec) == 0
    assert capsys.readouterr().out == CANONICAL
    assert run("fmt", "--write", spec) == 0
    assert spec.read_text() == CANONICAL
    assert run("fmt", "--check", spec) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["s.frz"]  # no temporary left


def test_fmt_write_keeps_the_file_s_mode_and_writes_through_a_symlink(tmp_path, capsys):
    # As an editor saves: the file keeps who may read it, and a link into another folder (a
    # shared spec) stays a link, its target reformatted, never replaced by a copy.
    shared = tmp_path / "shared"
    shared.mkdir()
    spec = shared / "s.frz"
    spec.write_text(MESSY)
    spec.chmod(0o640)
    link = tmp_path / "s.frz"
    link.symlink_to(spec)
    assert run("fmt", "--write", link) == 0
    assert capsys.readouterr().out == f"reformatted {link}\n"
    assert link.is_symlink() and os.readlink(link) == str(spec)
    assert spec.read_text() == CANONICAL
    assert spec.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in shared.iterdir()) == ["s.frz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.frz", "shared"]


def test_fmt_converts_between_forms(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text(CANONICAL)
    assert run("fmt", "--to", "yaml", spec) == 0
    as_yaml = capsys.readouterr().out
    (tmp_path / "s.yaml").write_text(as_yaml)
    assert run("fmt", "--to", "frz", tmp_path / "s.yaml") == 0
    assert capsys.readouterr().out == CANONICAL


def test_fmt_refuses_to_rewrite_a_larger_config(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("lr: 0.001\nsurgery:\n  rules:\n    - freeze: all\n")
    assert run("fmt", "--write", config) == 2
    assert "inside a larger config" in capsys.readouterr().err
    assert config.read_text().startswith("lr: 0.001")


# Phases and BatchNormalization policies: every kind of comment, a one-line header, a block
# written without indentation, blank lines to squeeze.
PHASED_MESSY = """# fine-tune in two stages
freeze all   # the base
batchnorm   frozen
# stage two
at epoch 3: unfreeze conv5_* ;batchnorm affine conv5_*_bn,conv5_x except conv5_y  # top
    # the head too
    unfreeze predictions


  # end of stage two
at epoch 10:   # last
unfreeze all
batchnorm train
# the end
"""

PHASED = """# fine-tune in two stages
freeze all  # the base
batchnorm frozen

# stage two
at epoch 3:
  unfreeze conv5_*
  batchnorm affine conv5_*_bn, conv5_x except conv5_y  # top
  # the head too
  unfreeze predictions

  # end of stage two

at epoch 10:  # last
  unfreeze all
  batchnorm train
# the end
"""


def test_fmt_phases_and_policies_canonical_form_and_fixed_point():
    messy = surgery.parse(PHASED_MESSY)
    assert format_spec(messy) == PHASED
    canonical = surgery.parse(PHASED)
    assert format_spec(canonical) == PHASED
    # Meaning-preserving: the same rules, policies and phases, each statement with its epoch.
    assert _meaning(canonical) == _meaning(messy)
    assert [(r.text, r.epoch) for r in canonical.rules] == [
        ("freeze all", 0), ("unfreeze conv5_*", 3), ("unfreeze predictions", 3),
        ("unfreeze all", 10)]
    assert [(p.text, p.epoch) for p in canonical.policies] == [
        ("batchnorm frozen", 0), ("batchnorm affine conv5_*_bn, conv5_x except conv5_y", 3),
        ("batchnorm train", 10)]
    assert [p.epoch for p in canonical.phases] == [3, 10]


@pytest.mark.parametrize("text,canonical", [
    ("at epoch 3: unfreeze a; unfreeze b", "at epoch 3:\n  unfreeze a\n  unfreeze b\n"),
    ("at epoch 3:unfreeze a\n  unfreeze b  # b\n",
     "at epoch 3:\n  unfreeze a\n  unfreeze b  # b\n"),
    ("freeze a; at epoch 2: freeze b; at epoch 4: freeze c",
     "freeze a\n\nat epoch 2:\n  freeze b\n\nat epoch 4:\n  freeze c\n"),
    # 'at epoch 0:' before any statement is kept: phase 0 with a header.
    ("# lead\nat epoch 0:\nfreeze all\n", "# lead\nat epoch 0:\n  freeze all\n"),
    # A comment right above a header introduces it: the blank line goes above the comment.
    ("freeze a\n# now the top\nat epoch 1:\n  unfreeze b\n",
     "freeze a\n\n# now the top\nat epoch 1:\n  unfreeze b\n"),
    # An indented comment at the end of a block stays in that block.
    ("at epoch 1:\n  unfreeze b\n  # later: c\nat epoch 2:\n  unfreeze d\n",
     "at epoch 1:\n  unfreeze b\n  # later: c\n\nat epoch 2:\n  unfreeze d\n"),
    # A comment before the block's first statement is indented with it, wherever it was.
    ("at epoch 1:\n# why\nunfreeze b\n", "at epoch 1:\n  # why\n  unfreeze b\n"),
    ("batchnorm affine\nbatchnorm frozen conv1_bn,conv2_bn except x\n",
     "batchnorm affine\nbatchnorm frozen conv1_bn, conv2_bn except x\n"),
    # 'at' and 'batchnorm' are keywords: such layer names stay quoted; 'epoch' and the modes not.
    ('freeze "at", "batchnorm", epoch, frozen, train, affine',
     'freeze "at", "batchnorm", epoch, frozen, train, affine\n'),
])
def test_fmt_phase_layouts(text, canonical):
    spec = surgery.parse(text)
    assert format_spec(spec) == canonical
    again = surgery.parse(canonical)
    assert format_spec(again) == canonical
    assert _meaning(again) == _meaning(spec)


def test_format_policy_and_format_rule():
    spec = surgery.parse("batchnorm affine\nbatchnorm   frozen conv1_bn  conv2_bn except x\n"
                         "freeze  a  b")
    assert [format_policy(p) for p in spec.policies] == [
        "batchnorm affine", "batchnorm frozen conv1_bn, conv2_bn except x"]
    assert format_rule(spec.rules[0]) == "freeze a, b"


def test_fmt_check_and_write_with_phases(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text(PHASED_MESSY)
    assert run("fmt", "--check", spec) == 1
    assert run("fmt", "--write", spec) == 0
    assert spec.read_text() == PHASED
    assert run("fmt", "--check", spec) == 0


def test_fmt_converts_phases_policies_and_comments_between_forms(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text(PHASED_MESSY)
    assert run("fmt", "--to", "yaml", spec) == 0
    as_yaml = capsys.readouterr().out
    assert as_yaml == PHASED_YAML
    (tmp_path / "s.yaml").write_text(as_yaml)
    assert run("fmt", "--check", tmp_path / "s.yaml") == 0  # canonical YAML too
    assert run("fmt", "--to", "frz", tmp_path / "s.yaml") == 0
    assert capsys.readouterr().out == PHASED


# --- the YAML form ---------------------------------------------------------------------------

ISSUE_YAML = """version: 1
rules:
  - freeze: all
  - unfreeze: [conv5_*, 'type:BatchNormalization']
  - freeze: 'layers[0:10]'
"""


def test_yaml_compiles_to_the_same_rules_as_frz():
    from_yaml = parse_yaml(ISSUE_YAML, "s.yaml")
    from_frz = surgery.parse("freeze all\nunfreeze conv5_*, type:BatchNormalization\n"
                             "freeze layers[0:10]\n")
    assert _layout_free(compile_spec(from_yaml)) == _layout_free(compile_spec(from_frz))
    assert [r.span.line for r in from_yaml.rules] == [3, 4, 5]


def test_yaml_inside_a_larger_config_and_load_spec_by_suffix(tmp_path):
    config = tmp_path / "train.yml"
    config.write_text("model: resnet50\nepochs: 3\nsurgery:\n  version: 1\n  rules:\n"
                      "    - freeze: all\n      except: [conv5_*, predictions]\n")
    spec = surgery.load_spec(config)
    (rule,) = spec.rules
    assert rule.text == "freeze all except conv5_*, predictions"
    assert (rule.span.line, rule.span.column) == (6, 7)
    listed = surgery.load_spec(tmp_path / "train.yml")
    assert listed.rules == spec.rules


@pytest.mark.parametrize("text,line,column,message", [
    ("rules:\n  - freeze: bn_conv1 layers[a]\n", 2, 29,
     "expected an integer, ':' or ']', found 'a'"),
    ("rules:\n  - freeze: 'layers[::0]'\n", 2, 23, "slice step cannot be zero"),
    ("rules:\n  - frezee: all\n", 2, 5, "unknown key 'frezee'; did you mean 'freeze'?"),
    ("rules:\n  - freeze: **/conv1_*\n", 2, 14,
     "invalid YAML: expected alphabetic or numeric character, but found '*'; in YAML, quote a "
     "selector that starts with '*' (such as '**/conv1_*') or contains '[' or ','"),
    ("rules:\n  - freeze: !!python/object/apply:os.system ['echo pwned']\n", 2, 13,
     "the YAML tag '!!python/object/apply:os.system' is not allowed: specs are read with safe "
     "loading only"),
    ("rules:\n  - freeze: 3\n", 2, 13,
     "expected a selector string, found '3'; quote it if it is a layer name"),
    ("version: 2\nrules: []\n", 1, 10, "unsupported version '2': this surgery reads version 1"),
    ("rules:\n  - freeze: 'a; unfreeze b'\n", 2, 13,
     "one rule per list item: write selectors, not statements, here"),
])
def test_yaml_errors_point_at_the_yaml_line_and_column(text, line, column, message):
    with pytest.raises(surgery.SpecError) as info:
        parse_yaml(text, "s.yaml")
    assert (info.value.line, info.value.column, info.value.message) == (line, column, message)


def test_yaml_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"rules:\n  - freeze: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(surgery.SpecError):
        parse_yaml(text, "s.yaml")
    assert not marker.exists()


PHASED_YAML = """version: 1
rules:
  # fine-tune in two stages
  - freeze: all  # the base
  - batchnorm: frozen

  # stage two
  - at epoch 3:
      - unfreeze: conv5_*
      - batchnorm: affine
        select: [conv5_*_bn, conv5_x]
        except: conv5_y  # top
      # the head too
      - unfreeze: predictions

      # end of stage two

  - at epoch 10:  # last
      - unfreeze: all
      - batchnorm: train
  # the end
"""


def test_yaml_phases_and_policies_read_as_the_frz_form():
    from_yaml = parse_yaml(PHASED_YAML, "s.yaml")
    from_frz = surgery.parse(PHASED)
    assert _meaning(from_yaml) == _meaning(from_frz)
    assert [(p.epoch, p.span.line, p.span.column) for p in from_yaml.phases] == [(3, 8, 5),
                                                                                 (10, 18, 5)]
    assert [(r.text, r.epoch, r.span.line, r.span.column) for r in from_yaml.rules] == [
        ("freeze all", 0, 4, 5), ("unfreeze conv5_*", 3, 9, 9), ("unfreeze predictions", 3, 14, 9),
        ("unfreeze all", 10, 19, 9)]
    assert [(p.text, p.epoch, p.number) for p in from_yaml.policies] == [
        ("batchnorm frozen", 0, 0), ("batchnorm affine conv5_*_bn, conv5_x except conv5_y", 3, 1),
        ("batchnorm train", 10, 2)]
    assert to_yaml(from_yaml) == PHASED_YAML
    assert to_yaml(from_frz) == PHASED_YAML
    assert format_spec(from_yaml) == PHASED


def test_yaml_hand_written_phases_flow_lists_and_a_larger_config(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 20\nsurgery:\n  rules:\n    - freeze: all\n"
                      "    - at epoch 5: [{unfreeze: conv5_*}, {batchnorm: affine}]\n"
                      "    - 'at epoch 12':\n      - unfreeze: all\n"
                      "      - batchnorm: frozen\n        select: 'type:BatchNormalization'\n")
    spec = surgery.load_spec(config)
    assert format_spec(spec) == ("freeze all\n\nat epoch 5:\n  unfreeze conv5_*\n"
                                 "  batchnorm affine\n\nat epoch 12:\n  unfreeze all\n"
                                 "  batchnorm frozen type:BatchNormalization\n")
    assert [p.epoch for p in spec.phases] == [5, 12]


@pytest.mark.parametrize("text,line,column,message", [
    ("rules:\n  - at epoch 3:\n      - freeze: a\n  - freeze: b\n", 4, 5,
     "this statement follows the phase 'at epoch 3:' (line 2) but is not in its list: indent it "
     "under that header to run at epoch 3, or move it before the first phase to be part of "
     "phase 0"),
    ("rules:\n  - at epoch 3:\n", 2, 5, "the phase 'at epoch 3:' has no statements"),
    ("rules:\n  - at epoch 3: []\n", 2, 5, "the phase 'at epoch 3:' has no statements"),
    ("rules:\n  - at epoch 3: {freeze: a}\n", 2, 17,
     "a phase holds a list of statements: '- at epoch 3:', then items such as "
     "'- freeze: conv1_*' indented under it"),
    ("rules:\n  - at epoch 3:\n      - at epoch 4: [{freeze: a}]\n", 3, 9,
     "phases do not nest: write this phase after the one it is in, as an item of the same list"),
    ("rules:\n  - at epoch 3: [{freeze: a}]\n    freeze: b\n", 3, 5,
     "a phase item holds only its 'at epoch N:' key, with the phase's statements listed under "
     "it: move 'freeze' into that list"),
    ("rules:\n  - at epok 3: [{freeze: a}]\n", 2, 5,
     "expected a phase header 'at epoch N', as in '- at epoch 3:', found 'at epok 3'"),
    ("rules:\n  - at epoch -3: [{freeze: a}]\n", 2, 5,
     "an epoch is 0 or more (Keras counts epochs from 0, as for initial_epoch)"),
    ("rules:\n  - at epoch 3: [{freeze: a}]\n  - at epoch 3: [{freeze: b}]\n", 3, 5,
     "the phase 'at epoch 3:' overlaps the one on line 2: write its statements under one header"),
    ("rules:\n  - at epoch 5: [{freeze: a}]\n  - at epoch 3: [{freeze: b}]\n", 3, 5,
     "phases run in epoch order: 'at epoch 3:' comes after 'at epoch 5:' (line 2); move it "
     "before that one"),
    ("rules:\n  - freeze: x\n  - at epoch 0: [{freeze: a}]\n", 3, 5,
     "'at epoch 0:' overlaps the statements before it, which already form phase 0: remove the "
     "header, or move those statements under it"),
    ("rules:\n  - batchnorm: froze\n", 2, 16, "expected a BatchNormalization policy, 'frozen', "
     "'train' or 'affine', found 'froze'; did you mean 'frozen'?"),
    ("rules:\n  - batchnorm: [affine]\n", 2, 16, "expected a BatchNormalization policy, "
     "'frozen', 'train' or 'affine', found a list"),
    ("rules:\n  - freeze: a\n    select: b\n", 3, 5,
     "'select' goes with 'batchnorm:'; a freeze rule lists its selectors as the value of "
     "'freeze:'"),
    ("rules:\n  - batchnorm: frozen\n    freeze: a\n", 3, 5,
     "a statement has one action: 'freeze', 'unfreeze', 'lora' or 'batchnorm'"),
    ("rules:\n  - batchnrm: frozen\n", 2, 5, "unknown key 'batchnrm'; did you mean 'batchnorm'?"),
    ("rules:\n  - batchnorm: frozen\n    select: [a, 'layers[::0]']\n", 3, 27,
     "slice step cannot be zero"),
    # A selector string holds selectors, never statements: a policy or a phase hidden in one
    # would otherwise be dropped.
    ("rules:\n  - freeze: 'a; batchnorm affine'\n", 2, 13,
     "one rule per list item: write selectors, not statements, here"),
    ("rules:\n  - unfreeze: 'a; at epoch 3: freeze b'\n", 2, 15,
     "one rule per list item: write selectors, not statements, here"),
])
def test_yaml_phase_and_policy_errors(text, line, column, message):
    with pytest.raises(surgery.SpecError) as info:
        parse_yaml(text, "s.yaml")
    assert (info.value.line, info.value.column, info.value.message) == (line, column, message)


# --- compile ---------------------------------------------------------------------------------


def test_compile_prints_canonical_json(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze all except conv5_*\nunfreeze layers[-3:]\n")
    assert run("compile", spec) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert out == json.dumps(data, sort_keys=True, indent=2) + "\n"
    ops = data["operations"]
    assert [op["statement"] for op in ops] == ["freeze all except conv5_*",
                                               "unfreeze layers[-3:]"]
    assert ops[1]["select"][0]["path"] == [{"kind": "slice", "start": -3, "stop": None,
                                            "step": None}]
    assert [op["epoch"] for op in ops] == [0, 0]
    assert (data["policies"], data["phases"]) == ([], [])


def test_compile_carries_phases_policies_and_epochs(tmp_path, capsys):
    spec = tmp_path / "s.frz"
    spec.write_text("freeze all\nbatchnorm frozen\nat epoch 3: unfreeze conv5_*\n"
                    "  batchnorm affine conv5_*_bn except conv5_x\n")
    assert run("compile", spec) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == 2
    assert [(op["statement"], op["epoch"], op["line"]) for op in data["operations"]] == [
        ("freeze all", 0, 1), ("unfreeze conv5_*", 3, 3)]
    assert data["operations"][1]["column"] == 13
    assert data["policies"] == [
        {"number": 0, "line": 2, "column": 1, "epoch": 0, "action": "batchnorm",
         "mode": "frozen", "statement": "batchnorm frozen", "select": [], "except": []},
        {"number": 1, "line": 4, "column": 3, "epoch": 3, "action": "batchnorm",
         "mode": "affine", "statement": "batchnorm affine conv5_*_bn except conv5_x",
         "select": [{"text": "conv5_*_bn", "path": [{"kind": "glob", "pattern": "conv5_*_bn"}]}],
         "except": [{"text": "conv5_x", "path": [{"kind": "name", "value": "conv5_x"}]}]},
    ]
    assert data["phases"] == [{"epoch": 3, "line": 3, "column": 1}]
    # Layout and spelling aside, the formatted spec and its YAML form compile the same.
    parsed = surgery.load_spec(spec)
    assert _meaning(surgery.parse(format_spec(parsed))) == _meaning(parsed)
    assert _meaning(parse_yaml(to_yaml(parsed))) == _meaning(parsed)


# --- verify and diff -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """A nested model, a spec applied to it by `surgery apply`, the output and its manifest."""
    import keras

    tmp = tmp_path_factory.mktemp("verify")
    inner = keras.Sequential([keras.layers.Dense(4, name="i1"), keras.layers.Dense(4, name="i2")],
                             name="inner")
    x = keras.Input((3,), name="x")
    out = keras.layers.Dense(2, name="head")(inner(keras.layers.Dense(4, name="stem")(x)))
    model_path = tmp / "model.keras"
    keras.Model(x, out).save(model_path)
    spec = tmp / "spec.frz"
    spec.write_text("freeze all\nunfreeze head, inner/i2\n")
    tuned = tmp / "tuned.keras"
    assert main(["apply", str(spec), str(model_path), "-o", str(tuned)]) == 0
    return tmp, spec, model_path, tuned


def _resave(src, dst, change):
    import keras

    model = keras.models.load_model(src)
    change(model)
    model.save(dst)


def test_verify_passes_on_the_applied_model(applied, capsys):
    tmp, _, _, tuned = applied
    capsys.readouterr()
    assert run("verify", f"{tuned}.manifest.json", tuned) == 0
    assert "matches" in capsys.readouterr().out


@pytest.mark.parametrize("change,expected", [
    (lambda m: setattr(m.get_layer("stem"), "trainable", True),
     ["stem: the manifest says frozen, the model has it trainable"]),
    (lambda m: setattr(m.get_layer("inner").get_layer("i1"), "trainable", True),
     ["inner/i1: the manifest says frozen, the model has it trainable"]),
    # A container is compared by what it trains (its own flag does not survive save/load
    # reliably): frozen whole, it trains nothing, and neither does its trainable layer.
    (lambda m: setattr(m.get_layer("inner"), "trainable", False),
     ["inner: the manifest says trainable, the model has it frozen",
      "inner/i2: the manifest says trainable, the model has it frozen"]),
])
def test_verify_catches_a_changed_layer(applied, tmp_path, capsys, change, expected):
    _, _, _, tuned = applied
    drifted = tmp_path / "drifted.keras"
    _resave(tuned, drifted, change)
    capsys.readouterr()
    assert run("verify", f"{tuned}.manifest.json", drifted) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == expected
    assert "does not match" in err


def test_verify_rejects_a_file_that_is_not_a_manifest(applied, capsys):
    tmp, spec, _, tuned = applied
    assert run("verify", spec, tuned) == 2
    assert "not a manifest" in capsys.readouterr().err


def test_diff_two_manifests_and_a_spec_on_two_models(applied, tmp_path, capsys):
    tmp, spec, model_path, tuned = applied
    other_spec = tmp_path / "other.frz"
    other_spec.write_text("freeze all\nunfreeze head\n")
    other = tmp_path / "other.keras"
    assert run("apply", other_spec, model_path, "-o", other) == 0
    capsys.readouterr()
    assert run("diff", f"{tuned}.manifest.json", f"{other}.manifest.json") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("spec: spec.frz (") and "-> other.frz (" in out[0]
    assert "~ inner: trainable -> frozen" in out
    assert "~ inner/i2: trainable -> frozen" in out
    assert run("diff", f"{tuned}.manifest.json", f"{tuned}.manifest.json") == 0
    assert capsys.readouterr().out == "no differences\n"
    # The same spec planned on the input and on the output: only the files differ, which
    # --spec takes for granted, so the plans agree (issue 16: it printed the file names, exit 1).
    # Read from the archives by default, through Keras on request: the same answer.
    for engine in ("auto", "keras"):
        assert run("diff", "--spec", spec, model_path, tuned, "--engine", engine) == 0
        captured = capsys.readouterr()
        assert captured.out.splitlines() == ["the two plans agree (6 layers)"]
        assert "note:" not in captured.err


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_pre_commit_hooks_offer_lint_and_fmt():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    by_id = {h["id"]: h for h in hooks}
    assert by_id["surgery-lint"]["entry"] == "surgery lint"
    assert by_id["surgery-fmt"]["entry"] == "surgery fmt --check"
    for hook in hooks:
        assert hook["language"] == "python"
        assert re.search(hook["files"], "specs/x.frz") and not re.search(hook["files"], "a.py")
