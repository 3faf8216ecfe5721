"""The YAML form of a spec -> IR, so that rules can live inside a training config:

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
outside every phase after one would be ambiguous, so it is an error), and phases do not nest.
What both forms require of phases (epochs in increasing order, a statement in each) is checked
by surgery/checks.py, with the same words as for the .frz form.

The rules may also sit under a ``surgery:`` key of a larger config. YAML is read with safe-loading
semantics only (a ``!!python/...`` tag is an error, never executed); a key we read that is
written twice is an error (PyYAML would keep the last one and drop the other without a word).
Each selector string is parsed by the one grammar's ``selectors`` rule (`parse.parse_selectors`),
every position mapped to the YAML line and column it came from. The result is the same IR as the
.frz form; surgery/yaml_write.py writes it back.
"""

from __future__ import annotations

import re
from typing import Optional

import yaml

from .checks import Statements, integer
from .errors import SpecSyntaxError
from .fmt import format_number, statement_text
from .ir import BATCHNORM, BN_MODES, FREEZE, LORA, UNFREEZE, Comment, Selector, Span, Spec
from .parse import check_length, parse_selectors
from .render import Lines
from .suggest import did_you_mean

__all__ = ["parse_yaml", "is_embedded"]

_ACTIONS = (FREEZE, UNFREEZE)
_KEYS = [FREEZE, UNFREEZE, "except", BATCHNORM, "select", LORA, "rank", "alpha"]
_LORA_KEYS = ("rank", "alpha")  # the keys only a 'lora:' item has
_PHASE_KEY = re.compile(r"at(?:\s|$)")  # a key that means to be a phase header
_PHASE = re.compile(r"at\s+epoch\s+([+-]?[0-9]+)")
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq",
                                                  "map", "timestamp", "binary", "set", "omap",
                                                  "pairs", "merge", "value")}
_MAX_DEPTH = 100


def is_embedded(text: str) -> bool:
    """Whether the rules sit under a 'surgery:' key of a larger config."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):  # not YAML at all: then not a larger config either
        return False
    return isinstance(root, yaml.MappingNode) and any(
        isinstance(k, yaml.ScalarNode) and k.value == "surgery" for k, _ in root.value)


def parse_yaml(text: str, file: str = "<string>") -> Spec:
    check_length(text, file)  # as the .frz form: PyYAML reads 1.5 MB a second
    return _Reader(text, file).spec()


class _Reader:
    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        # Positions as Lark counts them ('\n' only), from the character index of PyYAML's marks:
        # PyYAML's own line numbers also break at '\r', '\x85', '\u2028' and '\u2029'.
        self.lines = Lines(text)

    def span(self, mark, width: int = 1) -> Span:
        index = max(0, min(mark.index if mark is not None else 0, len(self.text)))
        line, col = self.lines.position(index)
        return Span(self.file, line, col, line, col + width)

    def error(self, message: str, mark, width: int = 1) -> SpecSyntaxError:
        return SpecSyntaxError(message, self.span(mark, width), source=self.text)

    def error_at(self, message: str, index: int) -> SpecSyntaxError:
        line, col = self.lines.position(max(0, min(index, len(self.text))))
        return SpecSyntaxError(message, Span(self.file, line, col, line, col + 1),
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
            raise self.error(f"invalid YAML: {' '.join(str(exc).split())}", None) from None
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
            if embedded:  # a top-level config may hold anything besides our keys
                self._check_keys(body, ("version", "rules"))
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
        out = Statements(self.text, self.file)
        self.statements(items, out)
        if embedded:
            start = self.lines.position(body.start_mark.index)[0]
            end = self.lines.position(body.end_mark.index)[0]
        else:
            start, end = 1, 1 << 62
        comments = tuple(c for c in _comments(self.text, self.file, self.lines)
                         if start <= c.span.line <= end)
        return out.spec(comments)

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
        """The value of ``key`` in ``mapping``, or None; the key written twice is an error."""
        found = None
        for k, v in mapping.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                if found is not None:
                    raise self._twice(k, found[0])
                found = (k, v)
        return found[1] if found is not None else None

    def _twice(self, key: yaml.ScalarNode, first: yaml.ScalarNode) -> SpecSyntaxError:
        line = self.lines.position(first.start_mark.index)[0]
        return self.error(f"the key '{key.value}' is written twice (first on line {line}); YAML "
                          f"would keep only the last one: write it once", key.start_mark,
                          len(key.value))

    def _key(self, key) -> str:
        """A mapping key's name; a list or a mapping used as a key is an error at the key."""
        if not isinstance(key, yaml.ScalarNode):
            kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
            raise self.error(f"a key must be a name such as 'freeze', not a {kind}",
                             key.start_mark)
        return key.value

    def _keys(self, mapping: yaml.MappingNode) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(name, key, value) for each entry of a mapping read whole; no key twice."""
        seen: dict[str, yaml.ScalarNode] = {}
        out = []
        for k, v in mapping.value:
            name = self._key(k)
            if name in seen:
                raise self._twice(k, seen[name])
            seen[name] = k
            out.append((name, k, v))
        return out

    def _check_keys(self, mapping: yaml.MappingNode, allowed) -> None:
        for name, k, _ in self._keys(mapping):
            if name not in allowed:
                raise self.error(f"unknown key '{name}'{did_you_mean(name, allowed)}",
                                 k.start_mark, len(name))

    def statements(self, items, out: Statements) -> None:
        for item in items:
            key = self._phase_key(item)
            if key is None:
                if out.phase is not None:
                    last = out.phase
                    raise self.error(
                        f"this statement follows the phase 'at epoch {last.epoch}:' (line "
                        f"{last.span.line}) but is not in its list: indent it under that header "
                        f"to run at epoch {last.epoch}, or move it before the first phase to be "
                        f"part of phase 0", item.start_mark)
                self.statement(item, out)
                continue
            phase = self.phase(item, key, out)
            body = item.value[0][1]
            if isinstance(body, yaml.ScalarNode) and body.value in ("", "~", "null") or \
                    isinstance(body, yaml.SequenceNode) and not body.value:
                out.end_phase()  # raises: the phase has no statements
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
                self.statement(node, out)
            out.end_phase()

    def _phase_key(self, node):
        """The key of a phase item ('at epoch 3'), or None for a statement."""
        if not isinstance(node, yaml.MappingNode):
            return None
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and _PHASE_KEY.match(key.value):
                return key
        return None

    def phase(self, node: yaml.MappingNode, key: yaml.ScalarNode, out: Statements):
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
        line, column = self.lines.position(key.start_mark.index)
        end_line, end_column = self.lines.position(max(key.end_mark.index, key.start_mark.index))
        span = Span(self.file, line, column, end_line, end_column)
        return out.header(integer(match.group(1), span, self.text), span)

    def statement(self, node, out: Statements) -> None:
        """A rule (``freeze:``/``unfreeze:``, ``except:``), a BatchNormalization policy
        (``batchnorm:``, ``select:``, ``except:``) or a LoRA statement (``lora:`` with its
        selectors, ``rank:``, ``alpha:``, ``except:``)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error("a rule is a mapping such as '- freeze: conv1_*'", node.start_mark)
        action: Optional[str] = None
        mode: Optional[str] = None
        selectors: tuple[Selector, ...] = ()
        excepts: tuple[Selector, ...] = ()
        select_key = None
        lora: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for name, key, value in self._keys(node):
            if name in _ACTIONS or name in (BATCHNORM, LORA):
                if action is not None:
                    raise self.error("a statement has one action: 'freeze', 'unfreeze', "
                                     "'lora' or 'batchnorm'", key.start_mark, len(name))
                action = name
                if name == BATCHNORM:
                    mode = self.mode(value)
                else:
                    selectors = self.selectors(value)
            elif name == "except":
                excepts = self.selectors(value)
            elif name == "select":
                select_key = key
                selected = self.selectors(value)
            elif name in _LORA_KEYS:
                lora[name] = (key, value)
            else:
                raise self.error(f"unknown key '{name}'{did_you_mean(name, _KEYS)}",
                                 key.start_mark, len(name))
        if action is None:
            raise self.error("a rule needs 'freeze:', 'unfreeze:', 'lora:' or 'batchnorm:'",
                             node.start_mark)
        if action != LORA and lora:
            name, (key, _) = next(iter(lora.items()))
            raise self.error(f"'{name}' goes with 'lora:', as in '- lora: query' with "
                             f"'rank: 8' below it", key.start_mark, len(name))
        if select_key is not None:
            if action != BATCHNORM:
                raise self.error(f"'select' goes with 'batchnorm:'; a {action} rule lists its "
                                 f"selectors as the value of '{action}:'", select_key.start_mark,
                                 len("select"))
            selectors = selected
        # The mapping's own end mark sits at the next token, past any comment lines; the rule
        # ends where its last value does.
        end_line = max(self.lines.position(v.end_mark.index)[0] for _, v in node.value)
        line, col = self.lines.position(node.start_mark.index)
        span = Span(self.file, line, col, end_line, 1)
        if action == BATCHNORM:
            head = f"{BATCHNORM} {mode}"
            out.policy(mode, selectors, excepts, statement_text(head, selectors, excepts), span)
        elif action == LORA:
            if "rank" not in lora:
                raise self.error("a 'lora:' rule needs 'rank: R', the adapters' rank, as in "
                                 "'rank: 8'", node.start_mark)
            rank, rank_span = self.number(lora["rank"][1], whole=True)
            alpha, alpha_span = (self.number(lora["alpha"][1], whole=False) if "alpha" in lora
                                 else (None, None))
            head = f"{LORA} rank={rank}" + (
                f" alpha={format_number(alpha)}" if alpha is not None else "")
            out.lora(rank, alpha, selectors, excepts, statement_text(head, selectors, excepts),
                     span, rank_span, alpha_span)
        else:
            out.rule(action, selectors, excepts, statement_text(action, selectors, excepts), span)

    def number(self, node, *, whole: bool):
        """A rank (``whole``: an integer) or an alpha (any number), and where it is written."""
        start = node.start_mark.index
        width = max(1, node.end_mark.index - start)
        line, col = self.lines.position(start)
        span = Span(self.file, line, col, line, col + width)
        tags = ("int",) if whole else ("int", "float")
        if isinstance(node, yaml.ScalarNode) and node.tag in {
                f"tag:yaml.org,2002:{t}" for t in tags}:
            text = node.value.replace("_", "")
            try:
                return (integer(text, span, self.text) if whole else float(text)), span
            except ValueError:
                pass
        what = "the rank, an integer, as in 'rank: 8'" if whole else \
            "alpha, a number, as in 'alpha: 16'"
        raise SpecSyntaxError(f"expected {what}", span, source=self.text)

    def mode(self, node) -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and \
                node.value in BN_MODES:
            return node.value
        if isinstance(node, yaml.ScalarNode):
            hint = did_you_mean(node.value, BN_MODES)
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
        """The selectors of one YAML string, each position that of the YAML character (or
        escape sequence) it was read from."""
        offsets = _value_offsets(self.text, item)
        last = len(offsets) - 1
        position = self.lines.position

        def where(index: int) -> tuple[int, int]:
            return position(offsets[min(max(index, 0), last)])

        return parse_selectors(item.value, self.file, document=self.text, position=where,
                               whole=self.span(item.start_mark))


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

_YAML_LINE = re.compile(r"[^\r\n\x85\u2028\u2029]*(?:\r\n|[\r\n\x85\u2028\u2029]|\Z)")


def _comments(text: str, file: str, lines: Lines) -> list[Comment]:
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
