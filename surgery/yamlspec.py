"""The YAML form of a spec, so that rules can live inside a training config:

    version: 1
    rules:
      - freeze: all
      - unfreeze: [conv5_*, 'type:BatchNormalization']
      - freeze: all
        except: conv5_*
      - batchnorm: frozen               # a BatchNormalization policy
        select: [conv1_bn, conv2_*]     # optional: without it, every BatchNormalization layer
        except: conv2_block1_1_bn       # only with 'select'

      - at epoch 3:                     # a phase: its statements, as a list under the header
          - unfreeze: conv4_*
          - batchnorm: affine

The ``rules`` list holds the statements in order, as the .frz text does: a ``freeze:`` or
``unfreeze:`` rule (selectors, one string or a list; ``except:`` optional), a ``batchnorm:``
policy (``frozen``, ``train`` or ``affine``; ``select:`` and ``except:`` optional), or a phase,
a list item with the one key ``at epoch N`` whose value is the list of that phase's statements.
Statements before the first phase are phase 0; after a phase, only phases follow (a statement
outside every phase after one would be ambiguous, so it is an error), epochs increase, phases
do not nest and a phase has at least one statement, as in the .frz form.

The rules may also sit under a ``surgery:`` key of a larger config. YAML is read with safe-loading
semantics only (a ``!!python/...`` tag is an error, never executed), and every selector string is
parsed by the one grammar, its positions moved to the YAML line and column it came from. The
result is the same IR as the .frz form; `to_yaml` writes it back, comments included.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from typing import Optional

import yaml

from .errors import SpecError, SpecSyntaxError
from .fmt import format_policy, format_rule, format_selector, layout
from .ir import (
    BN_MODES, FREEZE, UNFREEZE, BatchNormRule, Comment, Phase, Rule, Selector, Span, Spec,
)
from .parse import parse
from .resolve import suggest

__all__ = ["parse_yaml", "to_yaml", "is_yaml_path", "is_embedded"]

_ACTIONS = (FREEZE, UNFREEZE)
_BATCHNORM = "batchnorm"
_KEYS = [FREEZE, UNFREEZE, "except", _BATCHNORM, "select"]
_PHASE_KEY = re.compile(r"at(?:\s|$)")  # a key that means to be a phase header
_PHASE = re.compile(r"at\s+epoch\s+([+-]?[0-9]+)")
_PREFIX = "freeze "  # selectors are parsed as the statement "freeze <selector>"
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq",
                                                  "map", "timestamp", "binary", "set", "omap",
                                                  "pairs", "merge", "value")}


def is_yaml_path(path: str) -> bool:
    return str(path).endswith((".yaml", ".yml"))


def is_embedded(text: str) -> bool:
    """Whether the rules sit under a 'surgery:' key of a larger config."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return False
    return isinstance(root, yaml.MappingNode) and any(
        isinstance(k, yaml.ScalarNode) and k.value == "surgery" for k, _ in root.value)


def parse_yaml(text: str, file: str = "<string>") -> Spec:
    return _Reader(text, file).spec()


class _Lines:
    """Character index -> (line, column), 1-based, with lines broken at '\n' only: the notion of
    the .frz parser (Lark) and of `render_diagnostic`. PyYAML's own marks also break lines at
    '\r', '\x85', '\u2028' and '\u2029', so positions are taken from a mark's index instead."""

    def __init__(self, text: str):
        self.starts = [0]
        find = text.find
        i = find("\n")
        while i >= 0:
            self.starts.append(i + 1)
            i = find("\n", i + 1)

    def position(self, index: int) -> tuple[int, int]:
        n = bisect.bisect_right(self.starts, index) - 1
        return n + 1, index - self.starts[n] + 1

    def line(self, index: int) -> int:
        return bisect.bisect_right(self.starts, index)


class _Reader:
    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        self.lines = _Lines(text)

    def error(self, message: str, mark, width: int = 1) -> SpecSyntaxError:
        index = mark.index if mark is not None else 0
        return self.error_at(message, index, width)

    def error_at(self, message: str, index: int, width: int = 1) -> SpecSyntaxError:
        line, col = self.lines.position(max(0, min(index, len(self.text))))
        return SpecSyntaxError(message, Span(self.file, line, col, line, col + width),
                               source=self.text)

    def spec(self) -> Spec:
        try:
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            raise self._yaml_error(exc) from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow, such as NUL
            raise self.error_at(f"invalid YAML: the character U+{exc.character:04X} is not "
                                f"allowed in YAML", exc.position) from None
        except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
            first = (str(exc).splitlines() or ["invalid YAML"])[0]
            raise self.error(f"invalid YAML: {first}", None) from None
        except RecursionError:
            raise self.error_at("YAML nested too deeply", self._too_deep()) from None
        self._check_tags(root)
        if root is None:
            raise self.error("empty YAML document: expected 'rules:' (or a 'surgery:' section)",
                             None)
        if not isinstance(root, yaml.MappingNode):
            raise self.error("expected a mapping with 'rules:' (or a 'surgery:' section)",
                             root.start_mark)
        section = self._get(root, "surgery")
        embedded = section is not None
        body = section if embedded else root
        if isinstance(body, yaml.SequenceNode):
            rules_node = body
        elif isinstance(body, yaml.MappingNode):
            if not embedded:
                self._check_keys(root, ("version", "rules", "surgery"), strict=False)
            else:
                self._check_keys(body, ("version", "rules"), strict=True)
            version = self._get(body, "version")
            if version is not None and not (isinstance(version, yaml.ScalarNode) and
                                            version.value == "1"):
                shown = repr(version.value) if isinstance(version, yaml.ScalarNode) else \
                    "(not a number)"
                raise self.error(f"unsupported version {shown}: this surgery reads version 1",
                                 version.start_mark)
            rules_node = self._get(body, "rules")
            if rules_node is None:
                raise self.error("missing 'rules:' list", body.start_mark)
        else:
            raise self.error("'surgery:' must hold a mapping with 'rules:' or a list of rules",
                             body.start_mark)
        if isinstance(rules_node, yaml.ScalarNode) and rules_node.value in ("", "~", "null"):
            items = []
        elif not isinstance(rules_node, yaml.SequenceNode):
            raise self.error("'rules' must be a list of rules such as '- freeze: all'",
                             rules_node.start_mark)
        else:
            items = rules_node.value
        rules, policies, phases = self.statements(items)
        if embedded:
            start = self.lines.line(body.start_mark.index)
            end = self.lines.line(body.end_mark.index)
        else:
            start, end = 1, 1 << 62
        comments = tuple(c for c in _comments(self.text, self.file, self.lines)
                         if start <= c.span.line <= end)
        return Spec(rules=rules, source=self.text, file=self.file, comments=comments,
                    policies=policies, phases=phases)

    def _yaml_error(self, exc: yaml.MarkedYAMLError) -> SpecSyntaxError:
        mark = exc.problem_mark or exc.context_mark
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        problem = " ".join(problem.split())  # one line, whatever PyYAML wrote
        if "undefined alias" in problem or "expected alphabetic or numeric character" in problem:
            problem += ("; in YAML, quote a selector that starts with '*' (such as '**/conv1_*') "
                        "or contains '[' or ','")
        return self.error(f"invalid YAML: {problem}", mark)

    def _too_deep(self) -> int:
        """Where the nesting that exhausted the composer's recursion goes past a sane depth (the
        event stream is read without recursion)."""
        depth, deepest, where = 0, 0, 0
        try:
            for event in yaml.parse(self.text, Loader=yaml.SafeLoader):
                if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                    depth += 1
                    if depth > deepest:
                        deepest, where = depth, event.start_mark.index
                    if depth > _MAX_DEPTH:
                        return event.start_mark.index
                elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                    depth -= 1
        except (yaml.YAMLError, RecursionError):
            pass
        return where

    def _check_tags(self, node) -> None:
        # compose() builds no Python object, so nothing a tag names can run; still, a config
        # that safe_load would refuse is refused here too, at the tag's position. An alias is
        # the very node of its anchor: each node is checked once, so aliases are never expanded.
        stack = [node] if node is not None else []
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.tag not in _SAFE_TAGS and not n.tag.startswith("!"):
                raise self.error(f"the YAML tag {n.tag.replace('tag:yaml.org,2002:', '!!')!r} is "
                                 f"not allowed: specs are read with safe loading only",
                                 n.start_mark)
            if n.tag.startswith("!"):
                raise self.error(f"the YAML tag {n.tag!r} is not allowed: specs are read with "
                                 f"safe loading only", n.start_mark)
            if isinstance(n, yaml.SequenceNode):
                stack.extend(n.value)
            elif isinstance(n, yaml.MappingNode):
                for k, v in n.value:
                    stack.extend((k, v))

    def _get(self, mapping: yaml.MappingNode, key: str):
        for k, v in mapping.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
        return None

    def _key(self, key) -> str:
        """A mapping key's name; a list or a mapping used as a key is an error at the key."""
        if not isinstance(key, yaml.ScalarNode):
            kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
            raise self.error(f"a key must be a name such as 'freeze', not a {kind}",
                             key.start_mark)
        return key.value

    def _check_keys(self, mapping: yaml.MappingNode, allowed, *, strict: bool) -> None:
        if not strict:
            return  # a top-level config may hold anything besides our keys
        for k, _ in mapping.value:
            name = self._key(k)
            if name not in allowed:
                close = suggest(name, list(allowed))
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.error(f"unknown key '{name}'{hint}", k.start_mark, len(name))

    def statements(self, items) -> tuple[tuple[Rule, ...], tuple[BatchNormRule, ...],
                                          tuple[Phase, ...]]:
        rules: list[Rule] = []
        policies: list[BatchNormRule] = []
        phases: list[Phase] = []

        def add(node, epoch: int) -> None:
            item = self.statement(node, len(rules), len(policies), epoch)
            (rules if isinstance(item, Rule) else policies).append(item)

        for item in items:
            key = self._phase_key(item)
            if key is None:
                if phases:
                    last = phases[-1]
                    raise self.error(
                        f"this statement follows the phase 'at epoch {last.epoch}:' (line "
                        f"{last.span.line}) but is not in its list: indent it under that header "
                        f"to run at epoch {last.epoch}, or move it before the first phase to be "
                        f"part of phase 0", item.start_mark)
                add(item, 0)
                continue
            phase = self.phase(item, key, phases, bool(rules or policies))
            phases.append(phase)
            body = item.value[0][1]
            if isinstance(body, yaml.ScalarNode) and body.value in ("", "~", "null") or \
                    isinstance(body, yaml.SequenceNode) and not body.value:
                raise self.error(f"the phase 'at epoch {phase.epoch}:' has no statements",
                                 key.start_mark, len(key.value))
            if not isinstance(body, yaml.SequenceNode):
                raise self.error(f"a phase holds a list of statements: '- at epoch "
                                 f"{phase.epoch}:', then items such as '- freeze: conv1_*' "
                                 f"indented under it", body.start_mark)
            for node in body.value:
                inner = self._phase_key(node)
                if inner is not None:
                    raise self.error("phases do not nest: write this phase after the one it is "
                                     "in, as an item of the same list", inner.start_mark,
                                     len(inner.value))
                add(node, phase.epoch)
        return tuple(rules), tuple(policies), tuple(phases)

    def _phase_key(self, node):
        """The key of a phase item ('at epoch 3'), or None for a statement."""
        if not isinstance(node, yaml.MappingNode):
            return None
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and _PHASE_KEY.match(key.value):
                return key
        return None

    def phase(self, node: yaml.MappingNode, key: yaml.ScalarNode, phases: list[Phase],
              after_statements: bool) -> Phase:
        for other, _ in node.value:
            if other is not key:
                name = self._key(other)
                raise self.error(f"a phase item holds only its 'at epoch N:' key, with the "
                                 f"phase's statements listed under it: move '{name}' into that "
                                 f"list", other.start_mark, len(name))
        match = _PHASE.fullmatch(key.value.strip())
        if match is None:
            raise self.error(f"expected a phase header 'at epoch N', as in '- at epoch 3:', "
                             f"found {key.value!r}", key.start_mark, len(key.value))
        digits = match.group(1)
        try:
            epoch = int(digits)
        except ValueError:  # more digits than Python converts
            raise self.error("number is too large", key.start_mark, len(key.value)) from None
        line, column = self.lines.position(key.start_mark.index)
        end_line, end_column = self.lines.position(max(key.end_mark.index, key.start_mark.index))
        span = Span(self.file, line, column, end_line, end_column)
        if epoch < 0:
            raise self.error("an epoch is 0 or more (Keras counts epochs from 0, as for "
                             "initial_epoch)", key.start_mark, len(key.value))
        for earlier in phases:
            if earlier.epoch == epoch:
                raise self.error(f"the phase 'at epoch {epoch}:' overlaps the one on line "
                                 f"{earlier.span.line}: write its statements in one list",
                                 key.start_mark, len(key.value))
            if earlier.epoch > epoch:
                raise self.error(f"phases run in epoch order: 'at epoch {epoch}:' comes after "
                                 f"'at epoch {earlier.epoch}:' (line {earlier.span.line}); move "
                                 f"it before that one", key.start_mark, len(key.value))
        if epoch == 0 and after_statements:
            raise self.error("'at epoch 0:' overlaps the statements before it, which already "
                             "form phase 0: write them in one list", key.start_mark,
                             len(key.value))
        return Phase(epoch, span)

    def statement(self, node, rule_number: int, policy_number: int,
                  epoch: int = 0) -> Rule | BatchNormRule:
        """A rule (``freeze:``/``unfreeze:``, ``except:``) or a BatchNormalization policy
        (``batchnorm:``, ``select:``, ``except:``)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error("a rule is a mapping such as '- freeze: conv1_*'", node.start_mark)
        action: Optional[str] = None
        mode: Optional[str] = None
        selectors: tuple[Selector, ...] = ()
        excepts: tuple[Selector, ...] = ()
        select_key = None
        for key, value in node.value:
            name = self._key(key)
            if name in _ACTIONS or name == _BATCHNORM:
                if action is not None:
                    raise self.error("a statement has one action: 'freeze', 'unfreeze' or "
                                     "'batchnorm'", key.start_mark, len(name))
                action = name
                if name == _BATCHNORM:
                    mode = self.mode(value)
                else:
                    selectors = self.selectors(value)
            elif name == "except":
                excepts = self.selectors(value)
            elif name == "select":
                select_key = key
                selected = self.selectors(value)
            else:
                close = suggest(name, _KEYS)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.error(f"unknown key '{name}'{hint}", key.start_mark, len(name))
        if action is None:
            raise self.error("a rule needs 'freeze:', 'unfreeze:' or 'batchnorm:'",
                             node.start_mark)
        if select_key is not None:
            if action != _BATCHNORM:
                raise self.error(f"'select' goes with 'batchnorm:'; a {action} rule lists its "
                                 f"selectors as the value of '{action}:'", select_key.start_mark,
                                 len("select"))
            selectors = selected
        # The mapping's own end mark sits at the next token, past any comment lines; the rule
        # ends where its last value does.
        end_line = max(self.lines.line(v.end_mark.index) for _, v in node.value)
        line, col = self.lines.position(node.start_mark.index)
        span = Span(self.file, line, col, end_line, 1)
        if action == _BATCHNORM:
            policy = BatchNormRule(mode=mode, selectors=selectors, excepts=excepts, text="",
                                   span=span, number=policy_number, epoch=epoch)
            return dataclasses.replace(policy, text=format_policy(policy))
        rule = Rule(action=action, selectors=selectors, excepts=excepts, text="", span=span,
                    number=rule_number, epoch=epoch)
        return dataclasses.replace(rule, text=format_rule(rule))

    def mode(self, node) -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and \
                node.value in BN_MODES:
            return node.value
        if isinstance(node, yaml.ScalarNode):
            close = suggest(node.value, list(BN_MODES))
            hint = f"; did you mean '{close[0]}'?" if close else ""
            found = repr(node.value) if node.value else "nothing"
        else:
            hint, found = "", "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        raise self.error(f"expected a BatchNormalization policy, 'frozen', 'train' or 'affine', "
                         f"found {found}{hint}", node.start_mark)

    def selectors(self, node) -> tuple[Selector, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not items:
            raise self.error("expected at least one selector", node.start_mark)
        out: list[Selector] = []
        for item in items:
            if not isinstance(item, yaml.ScalarNode):
                raise self.error("expected a selector string", item.start_mark)
            if item.tag != "tag:yaml.org,2002:str":  # a plain 10, true or ~ is not a name
                raise self.error(f"expected a selector string, found {item.value!r}; quote it "
                                 f"if it is a layer name", item.start_mark)
            out.extend(self.selector_text(item))
        return tuple(out)

    def selector_text(self, item: yaml.ScalarNode) -> tuple[Selector, ...]:
        synthetic = _PREFIX + item.value
        offsets = _value_offsets(self.text, item)
        starts = _Lines(synthetic).starts

        def move(span: Span) -> Span:
            # A position in the synthetic statement -> the YAML character it came from.
            def index(line: int, column: int) -> int:
                at = starts[min(max(line, 1), len(starts)) - 1] + column - 1 - len(_PREFIX)
                return offsets[min(max(at, 0), len(offsets) - 1)]

            first = index(span.line, span.column)
            last = max(index(span.end_line, span.end_column), first)
            line, col = self.lines.position(first)
            end_line, end_col = self.lines.position(last)
            return Span(span.file, line, col, end_line, end_col)

        try:
            parsed = parse(synthetic, self.file)
        except SpecError as exc:
            raise SpecSyntaxError(exc.message, move(exc.span), source=self.text) from None
        if len(parsed.rules) != 1 or parsed.policies or parsed.phases or parsed.comments or \
                "\n" in item.value:
            raise self.error("one rule per list item: write selectors, not statements, here",
                             item.start_mark)
        return tuple(_moved(s, move) for s in parsed.rules[0].selectors)


_MAX_DEPTH = 100


def _value_offsets(text: str, node: yaml.ScalarNode) -> list[int]:
    """For each character of the scalar's value, the index in ``text`` of the character (or
    escape sequence) it was read from; then one entry for the end. A value folded over several
    lines or written with escapes ('\\x41', '\'\'') maps character by character."""
    quote = node.style if node.style in ("'", '"') else ""
    begin = node.start_mark.index + len(quote)
    end = max(node.end_mark.index - len(quote), begin)
    value = node.value
    if node.style in ("|", ">"):
        return _shifted(text, node, begin, end)
    out: list[int] = []
    i = begin
    for ch in value:
        while i < end:
            size, produced = _unit(text, i, quote)
            if produced == ch:
                out.append(i)
                i += size
                break
            i += size
        else:
            return _shifted(text, node, begin, end)  # not aligned: fall back to the start
    out.append(min(i, end))
    return out


def _shifted(text: str, node, begin: int, end: int) -> list[int]:
    # Block scalars and anything that does not align: the scalar's start, clamped to its end.
    return [min(begin + k, end) for k in range(len(node.value) + 1)]


_ESCAPES = yaml.scanner.Scanner.ESCAPE_REPLACEMENTS
_ESCAPE_CODES = yaml.scanner.Scanner.ESCAPE_CODES
_BREAKS = "\r\n\x85\u2028\u2029"


def _unit(text: str, i: int, quote: str) -> tuple[int, str | None]:
    """One unit of scalar source at ``i``: (its length, the value character it reads as, or None
    for what reads as nothing by itself: an escaped line break)."""
    ch = text[i]
    if quote == '"' and ch == "\\" and i + 1 < len(text):
        code = text[i + 1]
        if code in _ESCAPE_CODES:
            digits = text[i + 2 : i + 2 + _ESCAPE_CODES[code]]
            try:
                return 2 + len(digits), chr(int(digits, 16))
            except (ValueError, OverflowError):
                return 2, None
        if code in _ESCAPES:
            return 2, _ESCAPES[code]
        if code in _BREAKS:
            return (3 if text[i + 1 : i + 3] == "\r\n" else 2), None
    if quote == "'" and text.startswith("''", i):
        return 2, "'"
    if ch == "\r" and text.startswith("\r\n", i):
        return 2, "\n"
    if ch in _BREAKS:
        return 1, "\n"
    return 1, ch


def _moved(obj, move):
    """Every Span inside ``obj`` moved by ``move`` (synthetic statement -> YAML text)."""
    if isinstance(obj, Span):
        return move(obj)
    if isinstance(obj, tuple):
        return tuple(_moved(x, move) for x in obj)
    if dataclasses.is_dataclass(obj):
        changes = {f.name: _moved(getattr(obj, f.name), move)
                   for f in dataclasses.fields(obj)
                   if isinstance(getattr(obj, f.name), (Span, tuple)) or
                   dataclasses.is_dataclass(getattr(obj, f.name))}
        return dataclasses.replace(obj, **changes)
    return obj


_YAML_LINE = re.compile(r"[^\r\n\x85\u2028\u2029]*(?:\r\n|[\r\n\x85\u2028\u2029]|\Z)")


def _comments(text: str, file: str, lines: _Lines) -> list[Comment]:
    """YAML comments with their positions (PyYAML drops them): a '#' at the start of a line or
    after a blank, outside quotes, up to the end of the line as YAML sees lines (which end at
    '\r', '\x85', '\u2028' and '\u2029' too)."""
    out = []
    for m in _YAML_LINE.finditer(text):
        raw = m.group().rstrip(_BREAKS)
        if not raw:
            if m.end() >= len(text):
                break
            continue
        quote = None
        for j, ch in enumerate(raw):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"" and (j == 0 or raw[j - 1] in " \t[,:-{"):
                quote = ch
            elif ch == "#" and (j == 0 or raw[j - 1] in " \t"):
                line, col = lines.position(m.start() + j)
                end_line, end_col = lines.position(m.start() + len(raw))
                out.append(Comment(raw[j:].rstrip(), Span(file, line, col, end_line, end_col)))
                break
    return out


# --- writing -------------------------------------------------------------------------------------

# Written bare only when plainly safe in a flow list too (PyYAML ends a plain scalar there at any
# of ',[]{}:?#') and read as a string (not as 'y', 'no', '10', '0x1f' or '2024-01-02').
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\*?[A-Za-z0-9_\-*]*")
_DOUBLE_QUOTED = {"\\": "\\\\", '"': '\\"', "\t": "\\t", "\r": "\\r", "\n": "\\n",
                  "\x00": "\\0", "\x85": "\\N", "\u2028": "\\L", "\u2029": "\\P"}


_RESOLVER = yaml.resolver.Resolver()


def _scalar(text: str) -> str:
    if _PLAIN.fullmatch(text) and \
            _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str":
        return text
    if text.isprintable():  # no control character, no line break of any kind
        return "'" + text.replace("'", "''") + "'"
    # A double-quoted scalar carries any character as an escape.
    return '"' + "".join(_DOUBLE_QUOTED.get(c) or (c if c.isprintable() else _escape(c))
                         for c in text) + '"'


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _comment(text: str) -> str:
    """A comment as YAML can carry it: on one line, with only characters YAML accepts. A
    character that is not printable (a control character, '\\r', '\\x85', '\\u2028', which
    YAML would read as a line break and the rest of the comment as YAML) is written as a visible
    escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else _escape(c) for c in text)


def _value(selectors: tuple[Selector, ...]) -> str:
    texts = [_scalar(format_selector(s)) for s in selectors]
    return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"


def to_yaml(spec: Spec) -> str:
    """The YAML form: one list item per statement, a phase as an item holding its statements,
    comments and blank lines where they were."""
    lines = ["version: 1", "rules:"]
    body = layout(spec)
    if not any(ln.statement is not None for ln in body):
        lines[-1] = "rules: []"
    for ln in body:
        if ln.blank_before:
            lines.append("")
        comment = _comment(ln.comment) if ln.comment is not None else None
        pad = "      " if ln.indented else "  "  # inside a phase: under '  - at epoch N:'
        st = ln.statement
        if st is None:
            lines.append(f"{pad}{comment}")
            continue
        if isinstance(st, Phase):
            item = [f"- at epoch {st.epoch}:"]
        elif isinstance(st, BatchNormRule):
            item = [f"- {_BATCHNORM}: {st.mode}"]
            if st.selectors:
                item.append(f"  select: {_value(st.selectors)}")
        else:
            item = [f"- {st.action}: {_value(st.selectors)}"]
        if not isinstance(st, Phase) and st.excepts:
            item.append(f"  except: {_value(st.excepts)}")
        if comment is not None:
            item[-1] += f"  {comment}"
        lines.extend(pad + x for x in item)
    return "\n".join(lines) + "\n"
