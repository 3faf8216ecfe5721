"""The YAML form of a spec, so that rules can live inside a training config:

    version: 1
    rules:
      - freeze: all
      - unfreeze: [conv5_*, 'type:BatchNormalization']
      - freeze: all
        except: conv5_*

The rules may also sit under a ``surgery:`` key of a larger config. YAML is read with safe-loading
semantics only (a ``!!python/...`` tag is an error, never executed), and every selector string is
parsed by the one grammar, its positions moved to the YAML line and column it came from. The
result is the same IR as the .frz form; `to_yaml` writes it back, comments included.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import yaml

from .errors import SpecError, SpecSyntaxError
from .fmt import format_rule, format_selector, layout
from .ir import FREEZE, UNFREEZE, Comment, Rule, Selector, Span, Spec
from .parse import parse
from .resolve import suggest

__all__ = ["parse_yaml", "to_yaml", "is_yaml_path", "is_embedded"]

_ACTIONS = (FREEZE, UNFREEZE)
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
    except yaml.YAMLError:
        return False
    return isinstance(root, yaml.MappingNode) and any(
        isinstance(k, yaml.ScalarNode) and k.value == "surgery" for k, _ in root.value)


def parse_yaml(text: str, file: str = "<string>") -> Spec:
    return _Reader(text, file).spec()


class _Reader:
    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file

    def error(self, message: str, mark, width: int = 1) -> SpecSyntaxError:
        line = (mark.line + 1) if mark is not None else 1
        col = (mark.column + 1) if mark is not None else 1
        return SpecSyntaxError(message, Span(self.file, line, col, line, col + width),
                               source=self.text)

    def spec(self) -> Spec:
        try:
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            raise self._yaml_error(exc) from None
        except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
            raise self.error(f"invalid YAML: {exc}", None) from None
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
            if version is not None and version.value != "1":
                raise self.error(f"unsupported version {version.value!r}: this surgery reads "
                                 f"version 1", version.start_mark)
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
        rules = tuple(self.rule(item, n) for n, item in enumerate(items))
        start, end = (body.start_mark.line, body.end_mark.line) if embedded else (0, 1 << 30)
        comments = tuple(c for c in _comments(self.text, self.file)
                         if start <= c.span.line - 1 <= end)
        return Spec(rules=rules, source=self.text, file=self.file, comments=comments)

    def _yaml_error(self, exc: yaml.MarkedYAMLError) -> SpecSyntaxError:
        mark = exc.problem_mark or exc.context_mark
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        if "undefined alias" in problem or "expected alphabetic or numeric character" in problem:
            problem += ("; in YAML, quote a selector that starts with '*' (such as '**/conv1_*') "
                        "or contains '[' or ','")
        return self.error(f"invalid YAML: {problem}", mark)

    def _check_tags(self, node) -> None:
        # compose() builds no Python object, so nothing a tag names can run; still, a config
        # that safe_load would refuse is refused here too, at the tag's position.
        stack = [node] if node is not None else []
        while stack:
            n = stack.pop()
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

    def _check_keys(self, mapping: yaml.MappingNode, allowed, *, strict: bool) -> None:
        if not strict:
            return  # a top-level config may hold anything besides our keys
        for k, _ in mapping.value:
            if k.value not in allowed:
                close = suggest(k.value, list(allowed))
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.error(f"unknown key '{k.value}'{hint}", k.start_mark, len(k.value))

    def rule(self, node, number: int) -> Rule:
        if not isinstance(node, yaml.MappingNode):
            raise self.error("a rule is a mapping such as '- freeze: conv1_*'", node.start_mark)
        action: Optional[str] = None
        selectors: tuple[Selector, ...] = ()
        excepts: tuple[Selector, ...] = ()
        for key, value in node.value:
            name = key.value
            if name in _ACTIONS:
                if action is not None:
                    raise self.error("a rule has one action: 'freeze' or 'unfreeze'",
                                     key.start_mark, len(name))
                action = name
                selectors = self.selectors(value)
            elif name == "except":
                excepts = self.selectors(value)
            else:
                close = suggest(name, list(_ACTIONS) + ["except"])
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.error(f"unknown key '{name}'{hint}", key.start_mark, len(name))
        if action is None:
            raise self.error("a rule needs 'freeze:' or 'unfreeze:'", node.start_mark)
        # The mapping's own end mark sits at the next token, past any comment lines; the rule
        # ends where its last value does.
        end_line = max(v.end_mark.line for _, v in node.value) + 1
        span = Span(self.file, node.start_mark.line + 1, node.start_mark.column + 1, end_line, 1)
        rule = Rule(action=action, selectors=selectors, excepts=excepts, text="", span=span,
                    number=number)
        return dataclasses.replace(rule, text=format_rule(rule))

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
        line = item.start_mark.line + 1
        col0 = item.start_mark.column + (1 if item.style in ("'", '"') else 0)
        shift = col0 - len(_PREFIX)  # synthetic column c (1-based) -> YAML column c + shift
        try:
            parsed = parse(_PREFIX + item.value, self.file)
        except SpecError as exc:
            raise SpecSyntaxError(exc.message, _moved(exc.span, line, shift),
                                  source=self.text) from None
        if len(parsed.rules) != 1 or parsed.comments or "\n" in item.value:
            raise self.error("one rule per list item: write selectors, not statements, here",
                             item.start_mark)
        return tuple(_moved(s, line, shift) for s in parsed.rules[0].selectors)


def _moved(obj, line: int, shift: int):
    """Every Span inside ``obj`` moved from the synthetic one-line statement to the YAML text."""
    if isinstance(obj, Span):
        return Span(obj.file, line, obj.column + shift, line, obj.end_column + shift)
    if isinstance(obj, tuple):
        return tuple(_moved(x, line, shift) for x in obj)
    if dataclasses.is_dataclass(obj):
        changes = {f.name: _moved(getattr(obj, f.name), line, shift)
                   for f in dataclasses.fields(obj)
                   if isinstance(getattr(obj, f.name), (Span, tuple)) or
                   dataclasses.is_dataclass(getattr(obj, f.name))}
        return dataclasses.replace(obj, **changes)
    return obj


_COMMENT = re.compile(r"""(?:^|\s)(#.*)$""")


def _comments(text: str, file: str) -> list[Comment]:
    """YAML comments with their positions (PyYAML drops them): a '#' at the start of a line or
    after a blank, outside quotes."""
    out = []
    for i, raw in enumerate(text.splitlines(), start=1):
        quote = None
        for j, ch in enumerate(raw):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"" and (j == 0 or raw[j - 1] in " \t[,:-{"):
                quote = ch
            elif ch == "#" and (j == 0 or raw[j - 1] in " \t"):
                out.append(Comment(raw[j:].rstrip(), Span(file, i, j + 1, i, len(raw) + 1)))
                break
    return out


# --- writing -------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-?]*\*?[A-Za-z0-9_\-?*]*")


def _scalar(text: str) -> str:
    if _PLAIN.fullmatch(text) and text.lower() not in ("y", "n", "yes", "no", "on", "off",
                                                      "true", "false", "null", "~") \
            and not re.fullmatch(r"[0-9][0-9_]*", text):
        return text
    return "'" + text.replace("'", "''") + "'"


def _value(selectors: tuple[Selector, ...]) -> str:
    texts = [_scalar(format_selector(s)) for s in selectors]
    return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"


def to_yaml(spec: Spec) -> str:
    """The YAML form: one list item per statement, comments and blank lines where they were."""
    lines = ["version: 1", "rules:"]
    body = layout(spec)
    if not any(ln.rule is not None for ln in body):
        lines[-1] = "rules: []"
    for ln in body:
        if ln.blank_before:
            lines.append("")
        if ln.rule is None:
            lines.append(f"  {ln.comment}")
            continue
        first = f"  - {ln.rule.action}: {_value(ln.rule.selectors)}"
        if ln.comment is not None and not ln.rule.excepts:
            first += f"  {ln.comment}"
        lines.append(first)
        if ln.rule.excepts:
            last = f"    except: {_value(ln.rule.excepts)}"
            if ln.comment is not None:
                last += f"  {ln.comment}"
            lines.append(last)
    return "\n".join(lines) + "\n"
