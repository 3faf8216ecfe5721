"""The language: every form the issue lists parses to the IR it means; bad text gets one exact,
human message with line and column. No TensorFlow here."""

import importlib

import pytest

import surgery
from surgery.ir import (
    All, AnyDepth, BatchNormRule, Glob, Index, Name, Range, Regex, Slice, Span, TypeGlob,
)


def segments(text):
    spec = surgery.parse(text)
    (rule,) = spec.rules
    return [[type(seg).__name__ for seg in sel.segments] for sel in rule.selectors]


def test_issue_examples_parse_to_the_meant_ir():
    spec = surgery.parse(
        "freeze conv1_* ; freeze layers[0:10] ; unfreeze conv5_*\n"
        "freeze all\n"
        "freeze conv1_conv, conv1_bn                 # several selectors in one statement\n"
        'freeze "conv1_conv"                         # quoted: the exact name, no glob\n'
        r"freeze /conv[45]_block\d+_[12]_conv/        # regex, full match on the name" "\n"
        "freeze layers[0:10]   layers[-5:]   layers[3]   layers[::2]   # Python slices\n"
        "freeze type:BatchNormalization              # class name; globs allowed (type:Conv*)\n"
        "freeze conv1_pad..conv2_block3_out          # inclusive range\n"
        "freeze mobilenetv2*/layers[:100]            # '/' walks into a nested model\n"
        "freeze **/conv1_*                           # '**/' at any depth of nesting\n"
        "freeze all except conv5_*, type:BatchNormalization\n",
        "spec.frz",
    )
    actions = [r.action for r in spec.rules]
    assert actions == ["freeze", "freeze", "unfreeze"] + ["freeze"] * 10
    lines = [r.span.line for r in spec.rules]
    assert lines == [1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    sel = lambda i, j=0: spec.rules[i].selectors[j].segments  # noqa: E731
    assert sel(0) == (Glob("conv1_*", sel(0)[0].span),)
    assert sel(1)[0] == Slice(0, 10, None, sel(1)[0].span)
    assert isinstance(sel(3)[0], All)
    assert [s[0].value for s in (sel(4, 0), sel(4, 1))] == ["conv1_conv", "conv1_bn"]
    assert sel(5) == (Name("conv1_conv", sel(5)[0].span),)
    assert isinstance(sel(6)[0], Regex) and sel(6)[0].pattern == r"conv[45]_block\d+_[12]_conv"
    slices = [spec.rules[7].selectors[j].segments[0] for j in range(4)]
    assert [(type(s).__name__, getattr(s, "start", getattr(s, "index", None))) for s in slices] == [
        ("Slice", 0), ("Slice", -5), ("Index", 3), ("Slice", None)]
    assert slices[3].step == 2
    assert sel(8) == (TypeGlob("BatchNormalization", sel(8)[0].span),)
    assert sel(9)[0].first == "conv1_pad" and sel(9)[0].last == "conv2_block3_out"
    assert [type(s) for s in sel(10)] == [Glob, Slice]
    assert [type(s) for s in sel(11)] == [AnyDepth, Glob]
    assert [e.segments[0].__class__ for e in spec.rules[12].excepts] == [Glob, TypeGlob]


def test_statement_text_and_spans_point_at_the_source():
    spec = surgery.parse("freeze a\n  unfreeze  b, c   # why\n", "x.frz")
    rule = spec.rules[1]
    assert rule.text == "unfreeze  b, c"
    assert (rule.span.file, rule.span.line, rule.span.column) == ("x.frz", 2, 3)
    assert [(s.text, s.span.column) for s in rule.selectors] == [("b", 13), ("c", 16)]


@pytest.mark.parametrize("text,kinds", [
    ("freeze ..conv1", [["Range"]]),
    ("freeze conv1..", [["Range"]]),
    ('freeze "a b"..\'c\'', [["Range"]]),
    ('freeze "mobilenetv2_1.00_224"/**/type:Conv*', [["Name", "AnyDepth", "TypeGlob"]]),
    ("freeze layers_1, alls, typex", [["Name"], ["Name"], ["Name"]]),
    ("freeze a, /b/ c/d", [["Name"], ["Regex"], ["Name", "Name"]]),
    (r"freeze /a\/b/", [["Regex"]]),
    ("freeze conv[45]_*", [["Glob"]]),
    ("freeze efficientnetv2-s/layers[-1]", [["Name", "Index"]]),
])
def test_selector_forms(text, kinds):
    assert segments(text) == kinds


def test_quoted_names_unescape_and_keep_glob_characters_literal():
    (rule,) = surgery.parse(r'freeze "we\"ird*"').rules
    assert rule.selectors[0].segments[0] == Name('we"ird*', rule.selectors[0].segments[0].span)


def test_regex_slash_escape():
    (rule,) = surgery.parse(r"freeze /a\/b/").rules
    assert rule.selectors[0].segments[0].pattern == "a/b"


def test_empty_and_comment_only_specs_have_no_rules():
    assert surgery.parse("").rules == ()
    assert surgery.parse("# just a note\n\n;;\n").rules == ()


def test_range_fields():
    (rule,) = surgery.parse("freeze ..b").rules
    seg = rule.selectors[0].segments[0]
    assert isinstance(seg, Range) and (seg.first, seg.last) == (None, "b")
    assert isinstance(surgery.parse("freeze layers[-1]").rules[0].selectors[0].segments[0], Index)


def test_phases_give_each_statement_its_epoch():
    spec = surgery.parse("freeze all\nbatchnorm frozen\n"
                         "at epoch 3: unfreeze a; unfreeze b  # one line\n"
                         "  batchnorm affine x\n"
                         "at epoch 7:\n"
                         "unfreeze c\n", "p.frz")
    assert [(r.text, r.epoch, r.number) for r in spec.rules] == [
        ("freeze all", 0, 0), ("unfreeze a", 3, 1), ("unfreeze b", 3, 2), ("unfreeze c", 7, 3)]
    assert [(p.text, p.epoch, p.number) for p in spec.policies] == [
        ("batchnorm frozen", 0, 0), ("batchnorm affine x", 3, 1)]
    assert [(p.epoch, p.span.line, p.span.column, p.span.end_column) for p in spec.phases] == [
        (3, 3, 1, 12), (7, 5, 1, 12)]
    # A statement on the header's line starts after it; a block need not be indented.
    assert (spec.rules[1].span.line, spec.rules[1].span.column) == (3, 13)
    assert spec.epochs == (0, 3, 7)
    assert [r.text for r in spec.until(3).rules] == ["freeze all", "unfreeze a", "unfreeze b"]


def test_a_header_before_any_statement_and_headers_after_semicolons():
    spec = surgery.parse("# lead\nat epoch 0:\n  freeze a\n")
    assert [p.epoch for p in spec.phases] == [0] and spec.rules[0].epoch == 0
    spec = surgery.parse("freeze a;at epoch 2:freeze b;at epoch 4:freeze c")
    assert [(r.text, r.epoch) for r in spec.rules] == [("freeze a", 0), ("freeze b", 2),
                                                      ("freeze c", 4)]
    assert [(p.epoch, p.span.column) for p in spec.phases] == [(2, 10), (4, 30)]


def test_batchnorm_policy_ir():
    spec = surgery.parse("batchnorm affine\n"
                         "batchnorm frozen conv1_bn  base/**/type:BatchNormalization except x\n"
                         "batchnorm train train\n")
    every, some, named = spec.policies
    assert every == BatchNormRule("affine", (), (), "batchnorm affine", every.span, 0, 0)
    assert some.mode == "frozen" and [s.text for s in some.selectors] == [
        "conv1_bn", "base/**/type:BatchNormalization"]
    assert [s.text for s in some.excepts] == ["x"] and some.number == 1
    # After the mode, a mode word is a layer name.
    assert named.mode == "train" and named.selectors[0].segments[0].value == "train"
    assert spec.rules == ()


def test_new_keywords_quoted_and_words_that_stay_names():
    spec = surgery.parse('freeze "at", "batchnorm", epoch, frozen, train, affine')
    assert [s.segments[0].value for s in spec.rules[0].selectors] == [
        "at", "batchnorm", "epoch", "frozen", "train", "affine"]


# Exact messages: what a user reads. Columns are 1-based.
@pytest.mark.parametrize("text,line,column,message", [
    ("unfreez conv5_*", 1, 1, "unknown statement 'unfreez'; did you mean 'unfreeze'?"),
    ("freeze a\nfrezee b", 2, 1, "unknown statement 'frezee'; did you mean 'freeze'?"),
    ("train conv5_*", 1, 1, "unknown statement 'train'; a statement starts with 'freeze', 'unfreeze', 'lora' or 'batchnorm', and a phase with 'at epoch N:'"),
    ("freeze a freeze b", 1, 10, "'freeze' is a keyword here; start a new statement on a new line or after ';'"),
    ("freeze", 1, 7, "expected a selector, found end of file"),
    ("freeze\nfreeze a", 1, 7, "expected a selector, found end of line"),
    ("freeze a,", 1, 10, "expected a selector, found end of file"),
    ("freeze all except", 1, 18, "expected a selector, found end of file"),
    ("freeze ..", 1, 10, "expected a layer name, found end of file"),
    ("freeze a/", 1, 10, "expected a selector after '/'"),
    ("freeze a /b/", 1, 13, "expected a selector after '/'; a /regex/ that follows another selector needs a comma before it: 'a, /regex/'"),
    ("freeze layers[1:2", 1, 18, "unclosed '[': expected ']'"),
    ("freeze layers[a]", 1, 15, "expected an integer, ':' or ']', found 'a'"),
    ("freeze layers[::0]", 1, 17, "slice step cannot be zero"),
    ("freeze mobilenetv2_1.00_224/x", 1, 22, "unexpected '00_224' after '.': a name containing '.' is written quoted, as in \"mobilenetv2_1.00_224\"; after a layer, '.' names a part: .kernel, .bias, .filters[...], .units[...]"),
    ("freeze conv1_conv.", 1, 19, "expected a part after '.': a weight name (.kernel, .bias, ...), .filters[...] or .units[...]"),
    ("freeze conv1_conv.filters[1:", 1, 29, "unclosed '[': expected ']'"),
    ('freeze "abc', 1, 8, 'unterminated string: add the closing "'),
    ("freeze /abc", 1, 8, "unterminated regular expression: add the closing '/'"),
    ("freeze /a(/", 1, 10, "invalid regular expression: missing ), unterminated subpattern"),
    ("freeze @x", 1, 8, "unexpected character '@': names with special characters are written quoted, as in \"my layer\""),
    ("freeze a\x00", 1, 9, "unexpected character '\\x00' (U+0000): names with special characters are written quoted, as in \"my layer\""),
    ("freeze **", 1, 8, "'**' must be followed by '/' and a selector, as in '**/conv1_*'"),
    ("freeze a*..b", 1, 8, "the ends of a range are exact layer names; globs are not allowed here"),
    ("freeze except", 1, 8, "'except' is a keyword here; quote it to mean a layer named except: \"except\""),
    ("freeze type:", 1, 13, "expected a layer class name, as in 'type:BatchNormalization', found end of file"),
    ("freeze layers[" + "9" * 5000 + "]", 1, 15, "number is too large"),
    ("freeze bn.gamma[0:2]", 1, 16, "'.gamma' takes no index: only .filters[...] and .units[...] select entries inside a layer"),
    ('freeze a"b"', 1, 9, "'\"b\"' is written against 'a': separate selectors with a comma or a space"),
    # phases and policies
    ("freeze at", 1, 8, "'at' is a keyword here; start a new statement on a new line or after ';' "
     '(or quote it to mean a layer named at: "at")'),
    ("freeze batchnorm", 1, 8, "'batchnorm' is a keyword here; start a new statement on a new line or after ';' "
     '(or quote it to mean a layer named batchnorm: "batchnorm")'),
    ("at epoch 3:\n  freeze a\nfreeze b", 3, 1, "this statement is outdented out of the 'at epoch 3:' block above it (line 1), but a block runs to the next 'at': indent it to run at epoch 3, or move it before the first 'at' to be part of phase 0"),
    ("at epoch 3:", 1, 1, "the phase 'at epoch 3:' has no statements"),
    ("at epoch 3:\nat epoch 4: freeze a", 1, 1, "the phase 'at epoch 3:' has no statements"),
    ("at epoch 3: freeze a\nat epoch 3: freeze b", 2, 1, "the phase 'at epoch 3:' overlaps the one on line 1: write its statements under one header"),
    ("at epoch 5: freeze a\nat epoch 3: freeze b", 2, 1, "phases run in epoch order: 'at epoch 3:' comes after 'at epoch 5:' (line 1); move it before that one"),
    ("freeze a\nat epoch 0: freeze b", 2, 1, "'at epoch 0:' overlaps the statements before it, which already form phase 0: remove the header, or move those statements under it"),
    ("at epoch -1: freeze a", 1, 10, "an epoch is 0 or more (Keras counts epochs from 0, as for initial_epoch)"),
    ("at epok 3: freeze a", 1, 4, "expected 'epoch' after 'at', as in 'at epoch 3:', found 'epok'"),
    ("at epoch: freeze a", 1, 9, "expected an epoch number, as in 'at epoch 3:', found ':'"),
    ("at epoch 3 freeze a", 1, 12, "expected ':' to end the phase header, as in 'at epoch 3:', found 'freeze'"),
    ("batchnorm", 1, 10, "expected a BatchNormalization policy, 'frozen', 'train' or 'affine', found end of file"),
    ("batchnorm froze", 1, 11, "expected a BatchNormalization policy, 'frozen', 'train' or 'affine', found 'froze'; did you mean 'frozen'?"),
])
def test_syntax_errors(text, line, column, message):
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse(text, "spec.frz")
    err = info.value
    assert (err.line, err.column, err.message) == (line, column, message)
    assert str(err) == f"spec.frz:{line}:{column}: error: {message}"


def test_rendered_error_shows_the_line_and_one_caret():
    with pytest.raises(surgery.SpecError) as info:
        surgery.parse("freeze all\n  unfreez conv5_*\n", "spec.frz")
    assert info.value.render() == (
        "spec.frz:2:3: error: unknown statement 'unfreez'; did you mean 'unfreeze'?\n"
        "    unfreez conv5_*\n"
        "    ^"
    )


def test_load_spec_reports_non_utf8_bytes_with_position(tmp_path):
    path = tmp_path / "bad.frz"
    path.write_bytes(b"freeze a\nfreeze \xff\n")
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.load_spec(path)
    assert (info.value.line, info.value.column) == (2, 8)
    assert info.value.message == "the file is not UTF-8 text (byte 0xff)"
    assert info.value.span.file == str(path)


def test_a_policy_without_selectors_can_still_except_some_layers():
    spec = surgery.parse("batchnorm frozen except conv5_*\n")
    (policy,) = spec.policies
    assert (policy.mode, policy.selectors) == ("frozen", ())
    assert [s.text for s in policy.excepts] == ["conv5_*"]


@pytest.mark.parametrize("text,line", [
    ("freeze a\n  at epoch 3:\n  freeze b\nfreeze c\n", 4),  # back under the header's column
    ("  at epoch 3:\nfreeze b\n", 2),                         # left of its own header
])
def test_a_statement_left_of_its_phase_header_is_an_error(text, line):
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse(text)
    assert info.value.line == line and "outdented" in info.value.message


@pytest.mark.parametrize("text,column,found,meant", [
    ("batchnorm trainable", 11, "trainable", "train"),
    ("batchnorm afine", 11, "afine", "affine"),
    ("batchnorm Frozen", 11, "Frozen", "frozen"),
    ("batchnorm frozenbn1", 11, "frozenbn1", "frozen"),
])
def test_a_policy_is_a_whole_word_and_a_typo_gets_a_suggestion(text, column, found, meant):
    # 'batchnorm trainable' once read as the policy 'train' on a layer named 'able'
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse(text)
    assert info.value.column == column
    assert info.value.message.endswith(f"found '{found}'; did you mean '{meant}'?")


@pytest.mark.parametrize("text,message", [
    ("freezeconv1", "unknown statement 'freezeconv1'; did you mean 'freeze'?"),
    ("atepoch 3: freeze a", "unknown statement 'atepoch'; a statement starts with 'freeze', "
     "'unfreeze', 'lora' or 'batchnorm', and a phase with 'at epoch N:'"),
    ("at epochs 3: freeze a", "expected 'epoch' after 'at', as in 'at epoch 3:', found 'epochs'"),
])
def test_statement_keywords_are_whole_words(text, message):
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse(text)
    assert info.value.message == message


# Was a bug: the hint took the text before the token from str.splitlines(), which also breaks
# lines at '\f' (and '\v', '\x1c'-'\x1e', '\x85', '\u2028', ...) where Lark counts '\n' only:
# the comment's 'b' was read as the start of line 2 and the hint said to quote "b9x".
def test_a_hint_quotes_the_text_of_the_line_lark_counted():
    with pytest.raises(surgery.SpecSyntaxError) as info:
        surgery.parse("# a\x0cb\nfreeze conv1.9x", "spec.frz")
    assert info.value.render() == (
        "spec.frz:2:14: error: unexpected '9x' after '.': a name containing '.' is written "
        "quoted, as in \"conv1.9x\"; after a layer, '.' names a part: .kernel, .bias, "
        ".filters[...], .units[...]\n"
        "  freeze conv1.9x\n"
        "               ^"
    )


def test_comments_are_kept_with_their_positions_and_hashes_inside_tokens_are_not_comments():
    spec = surgery.parse('freeze "a#b", /c#d/ # one\n\n  # two\r\nunfreeze e;# three', "c.frz")
    assert [s.segments[0].value if hasattr(s.segments[0], "value") else s.segments[0].pattern
            for s in spec.rules[0].selectors] == ["a#b", "c#d"]
    assert [(c.text, c.span.line, c.span.column) for c in spec.comments] == [
        ("# one", 1, 21), ("# two", 3, 3), ("# three", 4, 12)]


# --- the YAML form: what a selector string may hold, keys written twice -------------------------


def _yaml_error(text):
    from surgery.yaml_read import parse_yaml

    with pytest.raises(surgery.SpecSyntaxError) as info:
        parse_yaml(text, "s.yaml")
    return info.value


@pytest.mark.parametrize("text,line,column,message", [
    # PyYAML keeps the last of two equal keys and drops the other without a word (issue 14)
    ("rules:\n  - freeze: all\nrules:\n  - unfreeze: head\n", 3, 1,
     "the key 'rules' is written twice (first on line 1); YAML would keep only the last one: "
     "write it once"),
    ("epochs: 3\nsurgery:\n  rules: []\n  rules: [{freeze: a}]\n", 4, 3,
     "the key 'rules' is written twice (first on line 3); YAML would keep only the last one: "
     "write it once"),
    ("rules:\n  - freeze: all\n    except: a\n    except: b\n", 4, 5,
     "the key 'except' is written twice (first on line 3); YAML would keep only the last one: "
     "write it once"),
    ("rules:\n  - at epoch 2:\n      - {unfreeze: a, unfreeze: b}\n", 3, 23,
     "the key 'unfreeze' is written twice (first on line 3); YAML would keep only the last one: "
     "write it once"),
    # a selector string holds selectors: not statements, comments or an 'except'
    ("rules:\n  - freeze: 'a # why'\n", 2, 13,
     "one rule per list item: write selectors, not statements, here"),
    ("rules:\n  - freeze: |\n      a\n      b\n", 2, 13,
     "one rule per list item: write selectors, not statements, here"),
    ("rules:\n  - freeze: 'a except b'\n", 2, 16,
     "'except' is a key of the YAML form: list the exceptions under 'except:' beside the "
     "selectors"),
    # positions inside the string are the YAML text's, escapes and quotes counted
    ('rules:\n  - freeze: "a\\x2e\\x2e b"\n', 2, 15,
     "write a range without blanks ('a..b'); to list an open range and another selector, "
     "separate them with a comma ('a.., b')"),
    ("rules:\n  - freeze: ''\n", 2, 14, "expected a selector, found end of file"),
])
def test_yaml_selector_strings_and_keys_written_twice(text, line, column, message):
    err = _yaml_error(text)
    assert (err.line, err.column, err.message) == (line, column, message)


def test_a_yaml_selector_string_reads_as_the_same_selectors_as_frz():
    from surgery.yaml_read import parse_yaml

    text = "conv1_*, **/type:BatchNormalization layers[-5:] a..b head.units[0:2] /x\\/y/"
    from_yaml = parse_yaml(f"rules:\n  - freeze: '{text}'\n", "s.yaml").rules[0]
    from_frz = surgery.parse(f"freeze {text}\n").rules[0]
    assert [s.text for s in from_yaml.selectors] == [s.text for s in from_frz.selectors]
    assert [s.span.column - 13 for s in from_yaml.selectors] == \
        [s.span.column - 7 for s in from_frz.selectors]
    strip = [(type(seg).__name__, getattr(seg, "value", getattr(seg, "pattern", None)))
             for s in from_frz.selectors for seg in s.segments]
    assert strip == [(type(seg).__name__, getattr(seg, "value", getattr(seg, "pattern", None)))
                     for s in from_yaml.selectors for seg in s.segments]


# --- the parser cache: public Lark.save/Lark.load, never trusted -------------------------------


@pytest.fixture
def parser_module(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("surgery.parse")
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    module._parser.cache_clear()
    yield module
    module._parser.cache_clear()


class _Touch:
    """A pickle that creates a file when it is loaded: what a forged cache file would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_forged_cache_file_with_a_valid_digest_runs_no_code(parser_module, tmp_path):
    import pickle

    parser_module._parser()
    (path,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "ran"
    grammar = importlib.import_module("surgery.grammar")
    key = grammar._parser_key(grammar.grammar_text())
    payload = pickle.dumps({"data": _Touch(marker), "memo": {}})
    path.write_bytes(grammar._header(key, payload) + payload)
    parser_module._parser.cache_clear()
    assert parser_module.parse("freeze all\n").rules[0].action == "freeze"
    assert not marker.exists()
    head, _, rest = path.read_bytes().partition(b"\n")
    assert rest != payload and grammar._header(key, rest) == head + b"\n"  # rebuilt


def test_the_cache_holds_plain_data_and_loads_without_building(parser_module, tmp_path,
                                                               monkeypatch):
    import io

    parser_module._parser()
    (path,) = (tmp_path / "cache").iterdir()
    payload = path.read_bytes().partition(b"\n")[2]
    importlib.import_module("surgery.grammar")._DataOnly(io.BytesIO(payload)).load()  # data only
    parser_module._parser.cache_clear()

    def no_build(*args, **kwargs):
        raise AssertionError("built, not loaded")

    monkeypatch.setattr(importlib.import_module("surgery.grammar").Lark, "__init__", no_build)
    assert [s.text for s in parser_module.parse_selectors(
        "a, b", "s.yaml", document="a, b", position=lambda i: (1, i + 1),
        whole=Span("s.yaml", 1, 1, 1, 2))] == ["a", "b"]
