"""Fuzzing the parser, the compiler and the resolver: for any text whatsoever, `surgery.parse`
(and the YAML form's `parse_yaml`), then compile / format / lint / resolve / plan, either return
or raise `surgery.SpecError` with a usable position.

Property checked on every input (``_check``):

* nothing but `SpecError` (or a subclass) escapes: no Lark exception, no IndexError, no
  RecursionError, no re.error;
* the error's ``.line`` and ``.column`` are ints >= 1 that point into the text (Lark counts lines
  by '\\n' only, so the text has ``text.count('\\n') + 1`` lines and a column is at most one past
  the end of its line);
* ``.render()`` returns a string;
* a spec that parses compiles (`compile_spec`), formats (`format_spec`) to text that parses back
  to the same operations, BatchNormalization policies and phases (each statement with its
  epoch) and formats to itself, lints, and converts to YAML (`to_yaml`) that reads back to the
  same.

Input sources: raw text (every code point hypothesis draws, NUL and control characters
included), raw bytes decoded as latin-1 and with 'surrogateescape' (what a careless reader of a
binary file would hand over), a grammar-aware strategy that assembles statements, `batchnorm`
policies and `at epoch N:` phases from the pieces of the language, valid and broken, then mutates
them (drop / duplicate / insert / move
characters), and the same pieces inside YAML documents. Budgets are fixed and derandomized, so
the file takes the same time and finds the same things on every run. Then explicit,
non-hypothesis cases for sizes a random search never reaches: 1 MB lines, 100k repeated tokens,
thousands of nested '**/', a million-digit index.

Bugs found are pinned by `xfail(strict=True)` tests at the end, each with its reason; the tests
there without one pin bugs since fixed.
No TensorFlow: everything runs on plain `LayerTree`s.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from surgery.spec_json import compile_spec
from surgery.fmt import format_spec
from surgery.lint import lint
from surgery.plan import plan_spec
from surgery.tree import LayerTree
from surgery.yaml_read import parse_yaml
from surgery.yaml_write import to_yaml

# --- the models the fuzzed specs resolve against ----------------------------------------------

# Names the grammar pieces below refer to, so a fair share of fuzzed specs resolve for real
# (and walk into nested models) instead of all failing on the first unknown name.
TREES = {
    "flat": LayerTree.from_dict({"name": "m", "layers": [
        "input_1:InputLayer", "conv1_pad:ZeroPadding2D", "conv1_conv:Conv2D",
        "conv1_bn:BatchNormalization", "conv1_relu:Activation",
        "conv5_block1_1_conv:Conv2D", "conv5_block1_1_bn:BatchNormalization",
        "conv5_block1_out:Add", "avg_pool:GlobalAveragePooling2D", "predictions:Dense",
    ]}),
    "nested": LayerTree.from_dict({"name": "classifier", "layers": [
        "input_layer_1:InputLayer",
        {"name": "mobilenetv2_1.00_224", "class": "Functional", "layers": [
            "input_layer:InputLayer", "Conv1:Conv2D", "bn_Conv1:BatchNormalization",
            {"name": "inner", "class": "Sequential", "layers": [
                "a:Dense", "b:Dense", {"name": "deepest", "layers": ["x:Dense", "y:Dense"]}]},
            "block_16_project:Conv2D", "out_relu:ReLU",
        ]},
        {"name": "empty", "class": "Sequential", "layers": []},
        "dropout:Dropout", "head:Dense", {"name": "dup", "layers": ["a:Dense"]},
        "conv1_pad:ZeroPadding2D", "conv1_conv:Conv2D", "conv1_bn:BatchNormalization",
        "conv1_relu:Activation", "conv5_block1_1_conv:Conv2D", "predictions:Dense",
    ]}),
    "empty": LayerTree.from_dict({"name": "nothing", "layers": []}),
}


# --- the property ------------------------------------------------------------------------------


def _check_error(err: surgery.SpecError, text: str) -> None:
    assert isinstance(err.line, int) and not isinstance(err.line, bool), err.line
    assert isinstance(err.column, int) and not isinstance(err.column, bool), err.column
    assert err.line >= 1 and err.column >= 1, (err.line, err.column, err.message)
    lines = text.split("\n")
    assert err.line <= len(lines), (err.line, len(lines), err.message)
    assert err.column <= len(lines[err.line - 1]) + 1, (
        err.line, err.column, len(lines[err.line - 1]), err.message)
    assert isinstance(err.message, str) and err.message
    rendered = err.render()
    assert isinstance(rendered, str) and rendered
    for d in err.diagnostics:  # every diagnostic of a multi-error report is in range too
        assert 1 <= d.span.line <= len(lines) and d.span.column >= 1, d


def _operations(spec) -> dict:
    """The compiled spec without its positions (which formatting moves): the operations, the
    BatchNormalization policies and the phases, each statement with its epoch."""
    compiled = compile_spec(spec)
    return {key: [{k: v for k, v in op.items() if k not in ("line", "column")}
                  for op in compiled[key]]
            for key in ("operations", "policies", "phases")}


def _check_compiled(spec) -> None:
    """What every parsed spec must survive without any exception: the compiler, the formatter
    (whose output parses back to the same operations and formats to itself) and lint."""
    operations = _operations(spec)
    text = format_spec(spec)
    again = surgery.parse(text, "formatted.frz")
    assert _operations(again) == operations, text
    assert format_spec(again) == text
    lint(spec)
    _check_yaml_writer(spec)


def _check(text: str, *, resolve: bool = True, compiled: bool = True) -> None:
    """Parse, compile, format (and resolve against every tree): return, or a SpecError with a
    sane position."""
    try:
        spec = surgery.parse(text, "fuzz.frz")
    except surgery.SpecError as err:
        _check_error(err, text)
        return
    assert isinstance(spec, surgery.Spec)
    if compiled:
        _check_compiled(spec)
    if not resolve:
        return
    for tree in TREES.values():
        for allow_empty in (False, True):
            try:
                plan = plan_spec(spec, tree, allow_empty=allow_empty)
            except surgery.SpecError as err:  # allow_empty too: parts of layers are refused
                _check_error(err, text)
            else:
                assert len(plan.layers) == len(tree.layers())
                for d in plan.diagnostics:
                    assert d.span.line >= 1 and d.span.column >= 1


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def bounded(code: str, *, cpu_seconds: int, memory_bytes: int = 2 << 30, args=(),
            status: int = 0) -> str:
    """Run ``code`` in a fresh Python with this checkout's surgery, under a CPU-time and an
    address-space limit (`resource.setrlimit`, enforced by the kernel); it must exit with
    ``status``; return its stdout (with ``status`` 2, its stderr: where errors go).

    Resource bounds belong here rather than in a clock read by the test: a loaded machine slows
    the wall clock, not the CPU a process may burn, and the limits are set far above what the
    linear code needs and far below what the regression they guard would take."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def limit():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=30 * cpu_seconds)
    assert proc.returncode == status, (
        f"exit {proc.returncode} under {cpu_seconds} s of CPU and {memory_bytes >> 20} MiB "
        f"(a negative exit is the signal that stopped it):\n{proc.stderr[-2000:]}")
    return (proc.stderr if status == 2 else proc.stdout).strip()


# --- raw text and bytes ------------------------------------------------------------------------

# Every code point except lone surrogates (a str from a file decoded as UTF-8 cannot hold them;
# the bytes test below covers them through 'surrogateescape').
ANY_CHAR = st.characters(codec=None, exclude_categories=("Cs",))
CONTROL = st.sampled_from(["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x1c",
                           "\x7f", "\x85", "\u2028", "\u2029", "\ufeff", "\r", "\n",
                           "\t"])


@settings(FUZZ, max_examples=600)
@given(st.text(alphabet=st.one_of(ANY_CHAR, CONTROL), max_size=80))
def test_raw_text(text):
    _check(text)


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=120), st.sampled_from(["latin-1", "surrogateescape"]))
def test_raw_bytes(data, how):
    text = data.decode("latin-1") if how == "latin-1" else data.decode("utf-8", "surrogateescape")
    _check(text)


@settings(FUZZ, max_examples=200)
@given(st.text(alphabet=st.one_of(ANY_CHAR, CONTROL), max_size=40))
def test_raw_text_after_a_valid_prefix(tail):
    # Random text where a selector, a path or a slice is expected, not only at the start.
    for prefix in ("freeze ", "freeze a/", "freeze layers[", "unfreeze all except ", "freeze **/"):
        _check(prefix + tail)


# --- grammar-aware -----------------------------------------------------------------------------

# Each piece of the language in a valid and a broken form. A spec is drawn either from valid
# pieces only (so most of those parse and go on to resolve against the trees, reaching the
# resolver's error paths and hints) or from both; `mutated` then damages it character by
# character.

# Names and selectors that match something in the trees above ...
MATCHING = [
    "conv1_conv", "conv1_bn", "conv5_*", "conv5_block1_*", "conv[45]_*", "[!c]*", "[a-z]*", "*",
    "head", "predictions", "conv1_?ad", '"conv1_conv"', "'conv1_bn'", "conv1_pad..conv1_relu",
    "..conv1_bn", "conv1_relu..", "all", "type:BatchNormalization", "type:Conv*", "type:[!B]*",
    "type:*", "type:Conv2?", "/conv\\d+_.*/", "/.*/", "/conv[45]_block\\d+_[12]_conv/",
    "/(?i)CONV1_.*/", "/\\w+_bn/", "/(a|c)onv.*/",
]
# ... and well-formed ones that match nothing, to reach the resolver's hints.
MISSING = [
    "bn_conv1", "block_1?_*", "?", "a-b", "_", "Conv1", "x", "inner", "deepest", "0", "-1",
    "9" * 50, '"mobilenetv2_1.00_224"', "'a b'", '"with \\" escape"', '""', "''", '"a\\\\"',
    "'\u00e9\u4e2d'", "conv1_relu..conv1_pad", "a..zz", '"a".."b"', "type:batchnorm",
    "/a\\/b/", "/x+/", "/(a|)*/", "/conv1/", "CONV1_*", "mobilenetv2*", "empty", "dup",
]
BROKEN_NAMES = [
    "[z-a]", "[&&]x", "[\\]x", "**x", "***", "**", '"unterminated', "'x\\'", '"\\"', '"tab\there"',
    "type:", "type:[", "type:type:", "type:Conv 2D", "..", "a..b..c", "a...b", "a. .b", "a.b",
    "/(/", "/[/", "/a{2,1}/", "/*/", "/(?P<x>a)(?P<x>b)/", "/\\/", "//", "/(((((/",
    "/a{99999999999}/", "/(?<=a+)b/", "/\\p{L}/", "/x**/", "/" + "(" * 300 + "/", "/\\", "/a",
    "/(?P<n>a)(?P=m)/", "/[[:alpha:]]/", "/\\0/", "freeze", "unfreeze", "except", "\x00", "é",
    "a b", "a,", ",", "layers", "layers[", "layers[]", "layers[::0]", "layers[1:2:3:4]",
    "layers[a]", "layers [1]", "Layers[1]", "layers[[1]]", "layers[1", "layers[+-1]", "]",
]
# Parts of a layer's weights (the grammar reads them; resolution refuses them for now).
PARTS = [".kernel", ".bias", ".gamma", ".filters[0:32]", ".units[::2]", ".filters[-1]",
         ".units[3]", ".filters[:]"]
BROKEN_PARTS = [".", ".filters[", ".units[x]", ".kernel.bias", ".filters[::0]", "..kernel",
                ".9", ".filters[1:2:3:4]", ". kernel", ".units[" + "9" * 5000 + "]", ".layers[1]"]
INTS = [0, 1, -1, 3, -3, 9, 12, -12, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 40, -(10 ** 40),
        10 ** 300, -(10 ** 4000)]
SLICE_SHAPES = ["i", "a:b", "a:b:c", "::c", ":", "::", "a:", ":b", "::-1", "a::c"]


CLEAN, VALID, BROKEN = 0, 1, 2  # how a spec is drawn: see `specs`


@st.composite
def layer_indexes(draw, mode):
    shape = draw(st.sampled_from(SLICE_SHAPES))
    ints = INTS[:6] if mode == CLEAN else INTS
    body = "".join(str(draw(st.sampled_from(ints))) if ch in "abci" else ch for ch in shape)
    return f"layers[{body}]"


@st.composite
def segments(draw, mode):
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return draw(layer_indexes(mode))
    if kind == 1 and mode != CLEAN:
        return draw(st.sampled_from(BROKEN_NAMES if mode == BROKEN else MISSING))
    if kind == 2 and mode == BROKEN:
        return draw(st.sampled_from(MISSING))
    return draw(st.sampled_from(MATCHING))


@st.composite
def selectors(draw, mode):
    # Valid paths walk through the nested models the trees really have; broken ones anywhere.
    prefixes = ["", "**/"] if mode == CLEAN else [
        "", "", "", "", "", "**/", "**/**/", "mobilenetv2*/", "**/inner/",
        '"mobilenetv2_1.00_224"/inner/deepest/', "dup/"]
    out = draw(st.sampled_from(prefixes)) + draw(segments(mode))
    if mode == BROKEN:
        for _ in range(draw(st.integers(0, 2))):
            out += draw(st.sampled_from(["/", "/", "//", " / ", "/**/"]))
            out += draw(segments(mode))
    if mode != CLEAN and draw(st.integers(0, 5)) == 0:
        out += draw(st.sampled_from(PARTS + (BROKEN_PARTS if mode == BROKEN else [])))
    return out


BN_MODES = ["frozen", "train", "affine"]
BROKEN_BN_MODES = ["froze", "Frozen", "", "all", "freeze", "affine affine", "except", "train:"]


@st.composite
def policies(draw, mode):
    """``batchnorm MODE [selectors [except selectors]]``."""
    broken = mode == BROKEN
    modes = BN_MODES + (BROKEN_BN_MODES if broken else [])
    text = "batchnorm " + draw(st.sampled_from(modes))
    if draw(st.booleans()):
        for i in range(draw(st.integers(1, 2))):
            text += (", " if i else " ") + draw(selectors(mode))
        if draw(st.integers(0, 2)) == 0:
            text += " except " + draw(selectors(mode))
    elif broken and draw(st.integers(0, 3)) == 0:
        text += " except " + draw(selectors(mode))  # 'except' needs selectors before it
    return text


@st.composite
def statements(draw, mode):
    if draw(st.integers(0, 4)) == 0:
        return draw(policies(mode))
    broken = mode == BROKEN
    heads = ["freeze", "unfreeze"] + (["all", "except", "unfreez", "Freeze", "freezeall", ""]
                                      if broken else [])
    text = draw(st.sampled_from(heads)) + " "
    seps = [", ", ",", " ", "  ", " , "] + ([",,", "\t", ", \\\n", ";"] if broken else [])
    for i in range(draw(st.integers(0 if broken else 1, 3))):
        text += (draw(st.sampled_from(seps)) if i else "") + draw(selectors(mode))
    if draw(st.integers(0, 3)) == 0:
        text += " except "
        for i in range(draw(st.integers(0 if broken else 1, 2))):
            text += (", " if i else "") + draw(selectors(mode))
    return text


STATEMENT_SEPS = ["\n", ";", "; ", " ; ", "\r\n", "\n\n", ";;", "\n;\n", " # comment\n", "#\n",
                  "\x0c\n", "\t\n"]


BROKEN_HEADERS = ["at epoch:", "at 3:", "At epoch 3:", "at epoch 3", "at epoch -1:",
                  "at epoch 3.5:", "at epoch 3::", "at epoch x:", "at epoch 3:at epoch 4:",
                  "at", "epoch 3:", "at epoch " + "9" * 5000 + ":", "at epoch 1 :", "at  epoch\t2:"]


@st.composite
def epochs(draw, mode, count, first):
    """``count`` phase epochs: increasing, from 0 (when allowed by ``first``) on; in BROKEN
    mode also repeated, decreasing, negative or huge."""
    out, epoch = [], draw(st.integers(first, 3))
    for _ in range(count):
        out.append(epoch)
        epoch += draw(st.integers(1, 5))
        if mode == BROKEN and draw(st.integers(0, 3)) == 0:
            epoch = draw(st.sampled_from([0, epoch - 6, out[-1], -1, 2 ** 64]))
    return out


@st.composite
def specs(draw):
    # CLEAN: only selectors that match at the top level, so many specs resolve and plan;
    # VALID: also well-formed selectors that match nothing and paths into nested models (the
    # resolver's errors and hints); BROKEN: also malformed pieces (the parser's errors).
    # Some specs have phases: statements of phase 0, then 'at epoch N:' headers, each followed
    # by its block (on the header's line, indented on the lines below, or both).
    mode = draw(st.sampled_from([CLEAN, VALID, BROKEN]))
    broken = mode == BROKEN
    text = draw(st.sampled_from(["", "", "# header\n", "\n\n", ";"]))
    extra = ["", "\r", " "] if broken else []
    seps = STATEMENT_SEPS + extra
    headers = draw(st.sampled_from([0, 0, 1, 2]))
    before = draw(st.integers(0 if headers else 1, 4 - headers))
    for _ in range(before):
        text += draw(statements(mode)) + draw(st.sampled_from(seps))
    # 'at epoch 0:' only where no statement comes before it
    for epoch in draw(epochs(mode, headers, 1 if before else 0)):
        if broken and draw(st.integers(0, 4)) == 0:
            header = draw(st.sampled_from(BROKEN_HEADERS))
        else:
            header = f"at epoch {epoch}:"
        indent = draw(st.sampled_from(["  ", "  ", "", "\t", "    "]))
        text += header + draw(st.sampled_from(["\n", "\n", " ", "  # why\n", "\n\n"]))
        for i in range(draw(st.integers(0 if broken else 1, 2))):
            pad = indent if (i or not text.endswith(" ")) else ""
            if broken and draw(st.integers(0, 5)) == 0:
                pad = draw(st.sampled_from(["", " ", "\t\t", "      "]))  # outdented, or not
            text += pad + draw(statements(mode)) + draw(st.sampled_from(seps))
        if draw(st.integers(0, 3)) == 0:
            text += draw(st.sampled_from([indent, ""])) + "# end of block\n"
    return text


JUNK = st.one_of(st.sampled_from(list("\x00\x0b\x7f\"'/\\[]:.,;#*?!- \t\n\r") +
                                 ["..", "**", "layers[", "type:", "except", "freeze", "\u2028",
                                  "\x85", "é", "\U0001F600", "9" * 30]), ANY_CHAR)


@st.composite
def mutated(draw, base):
    text = draw(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "dup", "insert", "move", "cut"]))
        if not text and op != "insert":
            continue
        i = draw(st.integers(0, max(0, len(text) - 1)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        if op == "drop":
            text = text[:i] + text[j:]
        elif op == "dup":
            text = text[:j] + text[i:j] * draw(st.integers(1, 5)) + text[j:]
        elif op == "insert":
            text = text[:i] + draw(JUNK) + text[i:]
        elif op == "move":
            chunk, rest = text[i:j], text[:i] + text[j:]
            k = draw(st.integers(0, len(rest)))
            text = rest[:k] + chunk + rest[k:]
        else:
            text = text[:j]
    return text


_outcomes: dict[str, int] = {}
_parsed_with: dict[str, int] = {}  # parsed specs that have phases, policies, several phases


def _count_constructs(spec, counts: dict[str, int]) -> None:
    for name, present in (("phases", bool(spec.phases)), ("policies", bool(spec.policies)),
                          ("two phases", len(spec.phases) > 1),
                          ("phase comments", bool(spec.phases) and bool(spec.comments))):
        if present:
            counts[name] = counts.get(name, 0) + 1


def _tally(text: str) -> str:
    """Which stage a spec reaches; used to keep the strategies honest about coverage."""
    try:
        spec = surgery.parse(text)
    except surgery.SpecError:
        return "syntax error"
    for tree in TREES.values():
        try:
            plan_spec(spec, tree)
        except surgery.SpecError:
            continue
        return "resolved"
    return "selector error"


@settings(FUZZ, max_examples=250)
@given(specs())
def test_grammar_pieces(text):
    _check(text)
    stage = _tally(text)
    _outcomes[stage] = _outcomes.get(stage, 0) + 1
    try:
        _count_constructs(surgery.parse(text), _parsed_with)
    except surgery.SpecError:
        pass


def test_grammar_pieces_reach_every_stage():
    # Runs after test_grammar_pieces (file order): a strategy that only ever produced syntax
    # errors would test nothing past the parser.
    if not _outcomes:
        pytest.skip("test_grammar_pieces did not run in this session")
    assert {"syntax error", "selector error", "resolved"} <= set(_outcomes), _outcomes
    assert min(_outcomes.values()) >= 20, _outcomes
    # ... and one that never produced a valid phase or policy would leave fmt, YAML and compile
    # untested on them.
    assert set(_parsed_with) == {"phases", "policies", "two phases", "phase comments"}, \
        _parsed_with
    assert min(_parsed_with.values()) >= 15, _parsed_with


@settings(FUZZ, max_examples=250)
@given(mutated(specs()))
def test_grammar_pieces_mutated(text):
    _check(text)


# --- the YAML form ----------------------------------------------------------------------------

# `load_spec` reads .yaml/.yml specs with surgery.yamlspec.parse_yaml: the same property holds.
# PyYAML counts '\r', '\x85', '\u2028' and '\u2029' as line breaks too; yamlspec reports
# positions as Lark does ('\n' only, from the character index of PyYAML's marks), so a YAML
# error is checked exactly as a .frz one (selector positions are moved character by character
# from the parsed selector string to the YAML text, see test_yaml_position_* below).


def _check_yaml(text: str) -> None:
    try:
        spec = parse_yaml(text, "fuzz.yaml")
    except surgery.SpecError as err:
        _check_error(err, text)
        return
    _check_compiled(spec)
    _check_yaml_writer(spec)
    for tree in (TREES["flat"], TREES["nested"]):
        try:
            plan_spec(spec, tree, allow_empty=True)
        except surgery.SpecError as err:
            assert err.line >= 1 and err.column >= 1


def _check_yaml_writer(spec) -> None:
    """`to_yaml` writes what `parse_yaml` reads back as the same operations."""
    back = parse_yaml(to_yaml(spec), "back.yaml")
    assert _operations(back) == _operations(spec)


def _yaml_quoted(draw, text: str, mode=VALID) -> str:
    style = draw(st.sampled_from(["plain", "single", "double"]))
    if mode != BROKEN and style == "plain" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
        style = "single"  # valid YAML, so that valid specs reach the reader and the writer
    if style == "single":
        return "'" + text.replace("'", "''") + "'"
    if style == "double":
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _yaml_statement(draw, mode, pad: str) -> list[str]:
    """The lines of one statement item of the YAML form, its '- ' at ``pad``."""
    broken = mode == BROKEN
    sels = [_yaml_quoted(draw, draw(selectors(mode)), mode)
            for _ in range(draw(st.integers(1, 3)))]
    shape = draw(st.sampled_from(["scalar", "flow", "block"]))
    if shape == "scalar":
        value = " " + sels[0]
    elif shape == "flow":
        value = " [" + ", ".join(sels) + "]"
    else:
        value = "".join(f"\n{pad}    - {x}" for x in sels)
    indent = draw(st.sampled_from(["", "", "\t", " ", "  "] if broken else [""]))
    lines = []
    excepts = True
    if draw(st.integers(0, 4)) == 0:  # a BatchNormalization policy
        modes = BN_MODES + (["froze", "[frozen]", "", "'affine'", "1"] if broken else [])
        lines.append(f"{pad}{indent}- batchnorm: {draw(st.sampled_from(modes))}")
        excepts = broken
        if draw(st.booleans()):
            key = draw(st.sampled_from(["select", "select", "slect", "freeze"] if broken
                                       else ["select"]))
            lines.append(f"{pad}  {key}:{value}")
            excepts = True
    else:
        keys = ["freeze", "unfreeze"] + (["freez", "Freeze", "except", "1", "~", "'freeze'",
                                          "select"] if broken else [])
        lines.append(f"{pad}{indent}- {draw(st.sampled_from(keys))}:{value}")
    if excepts and draw(st.integers(0, 3)) == 0:
        ex = _yaml_quoted(draw, draw(selectors(mode)), mode)
        lines.append(f"{pad}  except: {ex}")
    if broken and draw(st.integers(0, 4)) == 0:
        lines.append(f"{pad}  " + draw(st.sampled_from(
            ["unfreeze: all", "freeze: 10", "freeze: true", "freeze: []", "freeze:",
             "freeze: [[a]]", "freeze: {a: b}", "freeze: !!python/object:os.system x",
             "freeze: &a all", "freeze: *a", "freeze: 'a; freeze b'", "freeze: |\n  a",
             "freeze: 'a; batchnorm affine'", "at epoch 9: [{freeze: a}]"])))
    if draw(st.integers(0, 4)) == 0:
        lines.append(f"{pad}# a comment")
    return lines


@st.composite
def yaml_specs(draw):
    mode = draw(st.sampled_from([CLEAN, VALID, BROKEN]))
    broken = mode == BROKEN
    embedded = draw(st.booleans())
    lines = ["training:", "  epochs: 3", "surgery:"] if embedded else []
    pad = "  " if embedded else ""
    if draw(st.booleans()):
        lines.append(pad + "version: " + draw(st.sampled_from(
            ["1", "1", "'1'", "2", "one", "[1]"] if broken else ["1"])))
    lines.append(pad + "rules:" + draw(st.sampled_from([" []", " ~", ""] if broken else [""])))
    # Statements of phase 0, then phases: '- at epoch N:' items holding their statements.
    headers = draw(st.sampled_from([0, 0, 1, 2]))
    before = draw(st.integers(0, 4 - headers))
    for _ in range(before):
        lines += _yaml_statement(draw, mode, pad + "  ")
    for epoch in draw(epochs(mode, headers, 1 if before else 0)):
        header = f"at epoch {epoch}"
        if broken and draw(st.integers(0, 4)) == 0:
            header = draw(st.sampled_from(["at epoch", "at 3", "At epoch 3", "at epoch -1",
                                           "at epoch x", "at", "'at epoch 3'", "at epoch 3 "]))
        comment = draw(st.sampled_from(["", "", "  # why"]))
        lines.append(f"{pad}  - {header}:{comment}")
        inner = pad + draw(st.sampled_from(["      ", "    "]))  # one column per list
        for _ in range(draw(st.integers(0 if broken else 1, 2))):
            if broken and draw(st.integers(0, 4)) == 0:
                inner = pad + draw(st.sampled_from(["      ", "    ", "  ", "     "]))
            lines += _yaml_statement(draw, mode, inner)
        if broken and draw(st.integers(0, 4)) == 0:  # a statement after a phase, outside it
            lines += _yaml_statement(draw, mode, pad + "  ")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n", "\n\n"]))


@settings(FUZZ, max_examples=400)
@given(st.text(alphabet=st.one_of(ANY_CHAR, CONTROL,
                                  st.sampled_from(list("-:[]{},&*!|>'\"#?% \n"))), max_size=80))
def test_yaml_raw_text(text):
    _check_yaml(text)


_yaml_parsed_with: dict[str, int] = {}


@settings(FUZZ, max_examples=250)
@given(yaml_specs())
def test_yaml_pieces(text):
    _check_yaml(text)
    try:
        _count_constructs(parse_yaml(text, "fuzz.yaml"), _yaml_parsed_with)
    except surgery.SpecError:
        pass


def test_yaml_pieces_reach_phases_and_policies():
    # Runs after test_yaml_pieces: the YAML strategy must produce valid phases and policies.
    if not _yaml_parsed_with:
        pytest.skip("test_yaml_pieces did not run in this session")
    assert set(_yaml_parsed_with) == {"phases", "policies", "two phases", "phase comments"}, \
        _yaml_parsed_with
    assert min(_yaml_parsed_with.values()) >= 5, _yaml_parsed_with


# --- explicit sizes a random search never reaches ----------------------------------------------

MB = 1_000_000


def _assert_spec_error(text: str, message_part: str | None = None) -> surgery.SpecError:
    with pytest.raises(surgery.SpecError) as info:
        spec = surgery.parse(text, "big.frz")
        for tree in TREES.values():
            plan_spec(spec, tree)
    _check_error(info.value, text)
    if message_part is not None:
        assert message_part in info.value.message
    return info.value


@pytest.mark.parametrize("make", [
    pytest.param(lambda: "freeze " + "a" * MB, id="one 1MB name"),
    pytest.param(lambda: 'freeze "' + "x" * MB + '"', id="one 1MB quoted name"),
    pytest.param(lambda: "freeze /" + "x" * MB + "/", id="one 1MB regex",
                 marks=pytest.mark.slow),  # Lark's REGEX token alone takes seconds to lex
    pytest.param(lambda: "freeze a # " + "c" * MB + "\nfreez b", id="1MB comment, then an error"),
    pytest.param(lambda: "freeze a " + "\x00" * MB, id="1MB of NUL"),
    pytest.param(lambda: "freeze " + "a" * MB + " \x00", id="error at column 1M"),
    pytest.param(lambda: 'freeze "' + "x" * MB, id="1MB unterminated string"),
    pytest.param(lambda: "freeze layers[" + "1:" * (MB // 2) + "]", id="1MB of slice colons"),
])
def test_one_megabyte_lines(make):
    text = make()
    assert len(text) >= MB
    _check(text, compiled=False)


def test_a_megabyte_name_reports_its_error_with_a_short_rendered_line():
    err = _assert_spec_error("freeze " + "a" * MB + " \x00", "unexpected character")
    assert (err.line, err.column) == (1, MB + 9)
    shown = err.render().splitlines()
    assert len(shown) == 3 and all(len(line) < 300 for line in shown)


def test_a_million_digit_index_is_a_spec_error():
    err = _assert_spec_error("freeze layers[" + "7" * MB + "]", "too large")
    assert (err.line, err.column) == (1, 15)


@pytest.mark.parametrize("text", [
    "freeze layers[" + "9" * 4300 + "]",  # at Python's int-from-str limit: converts
    "freeze layers[-" + "9" * 4300 + ":" + "9" * 4300 + ":-" + "9" * 4300 + "]",
    "freeze layers[" + "9" * 4301 + "]",  # one past it: 'number is too large'
    "freeze layers[::-" + "9" * 4301 + "]",
    "freeze layers[" + str(2 ** 63) + ":" + str(-(2 ** 63) - 1) + ":" + str(2 ** 64) + "]",
])
def test_huge_numbers_in_slices(text):
    _check(text)


def test_huge_slice_bounds_resolve_as_python_slices():
    tree = TREES["flat"]
    # Negative bounds keep Python's semantics (they clamp); a bound past the end is an error.
    spec = surgery.parse(f"freeze layers[-{10 ** 50}:-1:{10 ** 40}]")
    plan = plan_spec(spec, tree)
    assert [lp.path for lp in plan.layers if not lp.after] == ["input_1"]
    with pytest.raises(surgery.SelectorError) as info:
        plan_spec(surgery.parse(f"freeze layers[-{10 ** 50}:{10 ** 50}:{10 ** 40}]"), tree)
    assert "reaches past the end: the model has 10 layers here" in info.value.message
    with pytest.raises(surgery.SelectorError) as info:
        plan_spec(surgery.parse(f"freeze layers[{10 ** 50}]"), tree)
    assert "out of range" in info.value.message


@pytest.mark.slow
def test_a_hundred_thousand_repeated_selectors():
    text = "freeze " + ",".join(["conv1_conv"] * 100_000)
    spec = surgery.parse(text)
    assert len(spec.rules[0].selectors) == 100_000
    plan = plan_spec(spec, TREES["flat"])
    assert plan.by_path["conv1_conv"].after is False
    _check(text + ",\x00", resolve=False)  # and an error at its end still has a position


def test_ten_thousand_repeated_statements_and_separators():
    text = "freeze all;" * 10_000
    plan = plan_spec(surgery.parse(text), TREES["flat"])
    assert len(plan.diagnostics) == 9_999  # every rule but the last has no effect
    err = _assert_spec_error(";" * 20_000 + "\n" * 20_000 + "freez x")
    assert (err.line, err.column) == (20_001, 1)


# A spec past parse.MAX_TOKENS is refused where the bound is crossed, before its tree and IR
# take gigabytes (issue 14: a million statements on one line once took some 5 GB).
def test_a_spec_past_the_token_bound_is_an_error_where_it_crosses_it(monkeypatch):
    import importlib

    parse_module = importlib.import_module("surgery.parse")
    monkeypatch.setattr(parse_module, "MAX_TOKENS", 30)
    assert len(surgery.parse("freeze a;" * 10).rules) == 10  # 30 tokens: read
    err = _assert_spec_error("freeze a\n" * 10 + "freeze b;freeze c")
    assert (err.line, err.column) == (11, 1)
    assert err.message == ("the spec is too large: surgery reads up to 30 tokens (names, "
                           "keywords and punctuation), and this one has more; split it")


@pytest.mark.slow  # parsing up to the bound takes seconds
def test_compile_of_a_million_statements_on_one_line_stays_within_a_gigabyte(tmp_path):
    spec = tmp_path / "huge.frz"
    spec.write_text("freeze a;" * 1_000_000)
    err = bounded("import sys\nfrom surgery.cli import main\nsys.exit(main(sys.argv[1:]))",
                  args=("compile", str(spec)), cpu_seconds=120, memory_bytes=1 << 30, status=2)
    assert err.splitlines()[0] == (
        f"{spec}:1:1500003: error: the spec is too large: surgery reads up to 500,000 tokens "
        f"(names, keywords and punctuation), and this one has more; split it")


@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_deeply_repeated_any_depth(depth):
    spec = surgery.parse("freeze " + "**/" * depth + "x")
    plan = plan_spec(spec, TREES["nested"])
    assert not plan.by_path["mobilenetv2_1.00_224/inner/deepest/x"].after
    _check("freeze " + "**/" * depth)  # '**/' with nothing after it
    _check("freeze " + "**" * depth)
    _check("freeze " + "a/" * depth + "a")
    _check("freeze " + "/" * depth)


@pytest.mark.parametrize("text", [
    "freeze /" + "(" * 100_000 + "/",
    "freeze /" + "(" * 100_000 + ")" * 100_000 + "/",
    "freeze /" + "(?:" * 5_000 + "a" + ")" * 5_000 + "/",
    "freeze /" + "a{1000}" * 1000 + "/",
    "freeze /(?:a{65535}){65535}/",
    "freeze /" + "[" * 10_000 + "/",
    "freeze /" + "\\" * 10_001 + "/",
])
def test_pathological_regexes(text):
    _check(text)


@pytest.mark.parametrize("text", [
    "freeze " + "[" * 10_000,
    "freeze " + "[a]" * 10_000,
    "freeze " + '"' * 10_001,
    "freeze " + "'" * 10_001,
    "freeze " + "layers[" * 10_000,
    "freeze " + "]" * 10_000,
    "freeze " + ".." * 10_000,
    "freeze " + "a.." * 1_000 + "b",
    "freeze " + "type:" * 10_000,
    "freeze all " + "except " * 10_000,
    "freeze " + "except all " * 10_000,
    "freeze " + "#" * 10_000,
    "freeze a" + "\\" * 10_000,
    "\ufeff" * 10_000 + "freeze a",
    "\r" * 10_000 + "freeze",
])
def test_unbalanced_and_repeated_tokens(text):
    _check(text)


# --- render shows the line Lark counted -------------------------------------------------------


# Was a bug: render_diagnostic used str.splitlines(), which also breaks at \f, \v, \r, \x1c-\x1e,
# \x85, \u2028, \u2029, while Lark counts '\n' only; the caret was shown under the wrong line.
@pytest.mark.parametrize("text", [
    "freeze a\x0cb\nfreez x",          # form feed: whitespace in the grammar
    "freeze a\rb\nfreez x",            # a lone CR: whitespace in the grammar
    "# note\u2028more\nfreez x",       # any character is allowed in a comment
    "# note\x1c\nfreez x",
])
def test_render_shows_the_line_the_error_is_on(text):
    with pytest.raises(surgery.SpecError) as info:
        surgery.parse(text, "f.frz")
    err = info.value
    assert (err.line, err.column) == (2, 1)
    assert err.render().splitlines()[1] == "  freez x"


# Was a bug: rendering split the whole source once per diagnostic (quadratic). 10,000 diagnostics
# of a 100,000-line spec take well under a second of CPU when the source is split once, and
# minutes when it is split per diagnostic: the harness's CPU limit tells the two apart.
def test_rendering_many_diagnostics_splits_the_source_once():
    out = bounded("""
from surgery.errors import Diagnostic, SelectorError
from surgery.ir import Span
lines = 100_000
source = "freeze conv1_conv  # filler\\n" * lines
diags = tuple(Diagnostic("error", "'zz' matches no layer", Span("big.frz", n, 8, n, 10))
              for n in range(1, lines + 1, 10))
err = SelectorError(diags[0].message, diags[0].span, source=source, diagnostics=diags)
print(err.render().count("\\n") + 1)
""", cpu_seconds=20)
    assert out == str(3 * 10_000)


# --- the YAML form: fixed bugs ----------------------------------------------------------------


# Was a bug: a list or mapping used as a key reached suggest() and raised AttributeError.
@pytest.mark.parametrize("text", [
    "rules:\n  - [freeze]: all\n",
    "rules:\n  - {[a]: b}\n",
    "rules:\n  - ? {a: 1}\n    : b\n",
    "surgery:\n  [rules]: []\n",
])
def test_yaml_a_key_that_is_not_a_string(text):
    _check_yaml(text)


# Was a bug: yaml.compose's RecursionError escaped; now 'YAML nested too deeply' at the nesting.
def test_yaml_deeply_nested_flow_sequences():
    text = "rules: " + "[" * 2_000 + "]" * 2_000 + "\n"
    _check_yaml(text)
    with pytest.raises(surgery.SpecError, match="YAML nested too deeply") as info:
        parse_yaml(text, "deep.yaml")
    assert info.value.line == 1 and text[info.value.column - 1] == "["


# Was a bug: _check_tags walked aliases again and again (exponential: a billion laughs). Nine
# levels of ten aliases each name 10^10 nodes: walked once each, they are a few dozen; expanded,
# the walk would not end within the harness's CPU limit.
def test_yaml_aliases_are_not_expanded():
    levels = 9
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, levels + 1))
    text += "rules:\n  - freeze: all\n"
    out = bounded(f"""
from surgery.yaml_read import parse_yaml
print(len(parse_yaml({text!r}, "laughs.yaml").rules))
""", cpu_seconds=20)
    assert out == "1"


# Was a bug: PyYAML's ReaderError (not a MarkedYAMLError) was reported at 1:1 on two lines.
def test_yaml_position_of_a_control_character():
    text = "rules:\n  - freeze: ok\n  - freeze: [a,\n      b\x00]\n"
    with pytest.raises(surgery.SpecError) as info:
        parse_yaml(text, "f.yaml")
    assert (info.value.line, info.value.column) == (4, 8)
    assert "\n" not in info.value.message


# Was a bug: a constant column shift put errors in folded or escaped scalars past the line's end.
@pytest.mark.parametrize("text,line,column", [
    ("rules:\n  - freeze: a\n      zz!\n", 3, 9),
    ('rules:\n  - freeze: "a\\x41\\x41 !"\n', 2, 24),
])
def test_yaml_position_inside_a_scalar(text, line, column):
    with pytest.raises(surgery.SpecError) as info:
        parse_yaml(text, "f.yaml")
    assert (info.value.line, info.value.column) == (line, column)


# Was a bug: '?' was written bare inside a flow list, where PyYAML ends a plain scalar.
def test_yaml_writer_quotes_a_question_mark_in_a_list():
    spec = surgery.parse("freeze a, conv1_?ad\n")
    back = parse_yaml(to_yaml(spec), "back.yaml")
    assert _operations(back) == _operations(spec)


# Names YAML would read as another type (an int, a timestamp, a bool) are quoted.
@pytest.mark.parametrize("name", ["0x1f", "0o17", "2024-01-02", "Off", "y", "NULL", "1_000"])
def test_yaml_writer_quotes_what_yaml_reads_as_another_type(name):
    spec = surgery.parse(f"freeze {name}, a\nunfreeze {name}\n")
    back = parse_yaml(to_yaml(spec), "back.yaml")
    assert _operations(back) == _operations(spec)


# Was a bug: comments and names were copied raw; a '\u2028' or '\r' in a comment injected rules.
@pytest.mark.parametrize("text", [
    "freeze a  # x\u2028  - unfreeze: all\n",
    "freeze a  # x\r  - unfreeze: all\n",
    "freeze a  # bell \x07\n",
    'freeze "a\x00b"\n',
])
def test_yaml_writer_keeps_comments_and_names_intact(text):
    spec = surgery.parse(text)
    back = parse_yaml(to_yaml(spec), "back.yaml")
    assert _operations(back) == _operations(spec)


# Was a bug: re.compile's FutureWarning reached the user's stderr as Python's own two lines.
def test_a_regex_python_warns_about_is_not_a_python_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = surgery.parse("freeze /[[:alpha:]]+/\n", "w.frz")  # still a valid regex
    assert spec.rules[0].selectors[0].segments[0].pattern == "[[:alpha:]]+"


# --- positions: render.Lines against the plain definition ----------------------------------------


def _positions_by_definition(text: str):
    """(line, column) of every index, the end included, and every line, by the definition:
    lines broken at '\\n' only."""
    lines = text.split("\n")
    positions, line, column = [], 1, 1
    for ch in text + "\0":  # the end of the text is a position too
        positions.append((line, column))
        line, column = (line + 1, 1) if ch == "\n" else (line, column + 1)
    return positions, [t[:-1] if t.endswith("\r") else t for t in lines]


@settings(FUZZ, max_examples=300)
@given(text=st.text(alphabet=st.sampled_from("ab\n\r\u2028é"), max_size=60),
       block=st.sampled_from([1, 2, 3, 7, 4096]))
def test_lines_give_every_position_and_line_as_defined(text, block):
    # Lines counts a block at a time; blocks of 1, 2, 3 and 7 characters put every boundary
    # case (a break at a block's edge, a block without breaks, a line over many blocks) in
    # these short texts.
    from surgery import render

    previous, render._BLOCK = render._BLOCK, block
    try:
        lines = render.Lines(text)
        positions, expected_lines = _positions_by_definition(text)
        assert [lines.position(i) for i in range(len(text) + 1)] == positions
        assert len(lines) == len(expected_lines)
        assert [lines.line(n) for n in range(1, len(lines) + 1)] == expected_lines
        assert [lines.before(i) for i in range(len(text) + 1)] == [
            text[:i].rpartition("\n")[2] for i in range(len(text) + 1)]
    finally:
        render._BLOCK = previous
