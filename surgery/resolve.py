"""Selectors against a LayerTree: which layers each rule covers, and which rule decides each layer.

Rules apply in order and the last rule that covers a layer decides it (gitignore semantics). The
unit of decision is a leaf layer: a rule that matches a nested model covers every layer inside it.
A selector that matches nothing is an error (the silent failure of hand-written loops), reported
with the closest names; ``allow_empty`` turns those errors into warnings.
"""

from __future__ import annotations

import bisect
import fnmatch
import re
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .bn_policies import held_by_frozen_policy, resolve_policies, unfrozen_without_policy
from .errors import Diagnostic, SelectorError
from .ir import (
    All, AnyDepth, BatchNormRule, Glob, Index, Name, Range, Regex, Rule, Selector,
    Slice, Spec, TypeGlob,
)
from .layerparts import part_selections
from .parts import Selection
from .suggest import suggest
from .tree import Layer, LayerTree

__all__ = ["RuleResult", "PartOp", "Resolution", "resolve", "select_units",
           "REGEX_TIMEOUT", "REGEXES_TIMEOUT", "REGEX_MATCH_TIME"]

# How long a spec's /regexes/ may take to match a model's names in one resolution (one per
# phase): a regex that means something takes a microsecond or two per name, while one with
# nested repeats ('(a|a)+') backtracks for minutes on a 30-letter name. One regex (its text) may
# take REGEX_TIMEOUT seconds over all the names it is matched with; all of them together
# REGEXES_TIMEOUT plus REGEX_MATCH_TIME per match, so the bound grows with the work, as the
# rest of planning does (a 100,000-statement spec of 25,000 regexes makes 2.6 million
# matches). A regex written again costs nothing more: its matches in a scope are kept. Going
# over is an error at the regex, whatever 'allow_empty' says.
REGEX_TIMEOUT = 1.0
REGEXES_TIMEOUT = 5.0
REGEX_MATCH_TIME = 10e-6


@dataclass(frozen=True)
class RuleResult:
    """What one rule did: the leaf layers it covers (after ``except``), in model order, and the
    ones it still decides once every later rule has been applied. A rule on parts of layers
    (``conv1.filters[0:8]``) covers and decides those layers' entries, not the layers."""

    rule: Rule
    covered: tuple[str, ...]
    decided: tuple[str, ...]


@dataclass(frozen=True)
class PartOp:
    """One rule's effect on entries of one layer's weights (surgery/parts.py selections)."""

    rule: Rule
    selections: tuple[Selection, ...]


@dataclass(frozen=True)
class Resolution:
    rules: tuple[RuleResult, ...]
    deciding: Mapping[str, Rule]  # leaf path -> the last rule that covers it whole
    part_ops: Mapping[str, tuple[PartOp, ...]]  # leaf path -> part rules after that one, in order
    unmatched: tuple[Diagnostic, ...]  # selectors that match nothing (kept only with allow_empty)
    findings: tuple[Diagnostic, ...]  # rules with no effect, rules emptied by 'except'
    # BatchNormalization leaf path -> the last 'batchnorm' statement that covers it
    policies: Mapping[str, BatchNormRule] = field(default_factory=dict)

    @property
    def diagnostics(self) -> tuple[Diagnostic, ...]:
        """Everything worth telling the user, as warnings, in source order."""
        found = [Diagnostic("warning", d.message, d.span) for d in self.unmatched]
        found += self.findings
        return tuple(sorted(found, key=lambda d: (d.span.line, d.span.column)))


def resolve(spec: Spec, tree: LayerTree, *, allow_empty: bool = False) -> Resolution:
    r = _Resolver(tree, spec.source)
    errors: list[Diagnostic] = []
    warnings: list[Diagnostic] = []
    covered_by_rule: list[list[str]] = []

    parts_by_rule: list[dict[str, tuple[Selection, ...]]] = []

    for rule in spec.rules:
        picked: dict[str, None] = {}
        parts: dict[str, tuple[Selection, ...]] = {}
        for sel in rule.selectors:
            nodes, problem = r.select(sel)
            if problem:
                errors.append(problem)
            if sel.part is None:
                for node in nodes:
                    picked.update(dict.fromkeys(r.units(node)))
                continue
            found, problem = part_selections(sel, nodes, held=rule.trainable)
            if problem:
                errors.append(problem)
            for path, selections in found.items():
                parts[path] = parts.get(path, ()) + selections
        for sel in rule.excepts:
            if sel.part is not None:
                errors.append(Diagnostic(
                    "error", "a part cannot follow 'except': write a later rule instead, as in "
                    f"'{_opposite(rule.action)} {sel.text}'", sel.part.span))
        removed = r.covered_by([s for s in rule.excepts if s.part is None], errors)
        covered = [p for p in picked if p not in removed]
        covered.sort(key=r.order.__getitem__)
        if picked and not covered and not parts:
            warnings.append(Diagnostic(
                "warning", "this rule covers no layer once 'except' is applied", rule.span))
        covered_by_rule.append(covered)
        parts_by_rule.append(parts)

    if errors and not allow_empty:
        first = errors[0]
        raise SelectorError(first.message, first.span, source=spec.source,
                            diagnostics=tuple(errors))

    # Rule numbers, not Rule objects, in the hot loops: hashing a frozen dataclass walks all of
    # its fields, which made long specs slow.
    last: dict[str, int] = {}
    for n, covered in enumerate(covered_by_rule):
        for path in covered:
            last[path] = n

    # A part rule counts only after the last rule that decides its layer whole.
    part_ops: dict[str, list[PartOp]] = {}
    for n, parts in enumerate(parts_by_rule):
        for path, selections in parts.items():
            if last.get(path, -1) < n:
                part_ops.setdefault(path, []).append(PartOp(spec.rules[n], selections))

    results = []
    for n, (rule, covered) in enumerate(zip(spec.rules, covered_by_rule)):
        parts = parts_by_rule[n]
        decided = tuple(p for p in covered if last[p] == n) + tuple(
            p for p in parts if last.get(p, -1) < n)
        touched = list(covered) + list(parts)
        if touched and not decided:
            later = [spec.rules[k] for k in sorted({last[p] for p in touched})]
            named = ", ".join(f"'{r.text}' (line {r.span.line})" for r in later[:3])
            warnings.append(Diagnostic(
                "warning", f"this rule has no effect: later rules decide every layer it covers: "
                f"{named}{', ...' if len(later) > 3 else ''}", rule.span))
        results.append(RuleResult(rule, tuple(covered) + tuple(
            sorted(parts, key=r.order.__getitem__)), decided))

    deciding = {path: spec.rules[n] for path, n in last.items()}
    ops = {path: tuple(v) for path, v in part_ops.items()}
    policies = resolve_policies(spec, r, errors, warnings, allow_empty)
    warnings += unfrozen_without_policy(r, results, policies)
    warnings += held_by_frozen_policy(r, results, policies)
    return Resolution(tuple(results), deciding, ops, tuple(errors), tuple(warnings), policies)


def select_units(tree: LayerTree, selectors, excepts, source: str = "") -> tuple[
        list[tuple[Selector, list[Layer]]], list[str], list[Diagnostic]]:
    """What a statement's selectors name, for statements that are not rules (lora.py): each
    selector with the layers it matches, the units they cover less those ``excepts`` cover, in
    model order, and why a selector matches nothing. ``source``: the spec's text, for errors."""
    r = _Resolver(tree, source)
    problems: list[Diagnostic] = []
    matched = []
    picked: dict[str, None] = {}
    for sel in selectors:
        nodes, problem = r.select(sel)
        if problem:
            problems.append(problem)
        matched.append((sel, nodes))
        for node in nodes:
            picked.update(dict.fromkeys(r.units(node)))
    removed = r.covered_by(excepts, problems)
    covered = sorted((p for p in picked if p not in removed), key=r.order.__getitem__)
    return matched, covered, problems


def _opposite(action: str) -> str:
    return "unfreeze" if action == "freeze" else "freeze"


class _Resolver:
    def __init__(self, tree: LayerTree, source: str = ""):
        self.tree = tree
        self.source = source
        self._regex_spent: dict[str, float] = {}  # pattern -> seconds spent matching it
        self._regexes_left = REGEXES_TIMEOUT
        self._regex_hits: dict[tuple[str, str], list[Layer]] = {}  # (pattern, scope) -> matches
        self.order = {n.path: i for i, n in enumerate(tree.layers())}
        self._units: dict[str, tuple[str, ...]] = {}
        self._by_name: dict[str, dict[str, Layer]] = {}
        self._sorted: dict[str, tuple[list[str], list[int]]] = {}

    def units(self, node: Layer) -> tuple[str, ...]:
        """The units a match on ``node`` covers (tree.py): its own weights, if it has any or
        holds no layers, and every unit inside it."""
        cached = self._units.get(node.path)
        if cached is None:
            own = (node.path,) if node.unit else ()
            cached = own + tuple(u for c in node.children for u in self.units(c))
            self._units[node.path] = cached
        return cached

    def covered_by(self, selectors, problems: list) -> dict[str, None]:
        """The leaf layers the selectors cover, in the order met (a dict used as an ordered set);
        why a selector matches nothing goes to ``problems``."""
        out: dict[str, None] = {}
        for sel in selectors:
            nodes, problem = self.select(sel)
            if problem:
                problems.append(problem)
            for node in nodes:
                out.update(dict.fromkeys(self.units(node)))
        return out

    def children_by_name(self, scope: Layer) -> dict[str, Layer]:
        table = self._by_name.get(scope.path)
        if table is None:
            table = {c.name: c for c in scope.children}
            self._by_name[scope.path] = table
        return table

    def _with_prefix(self, scope: Layer, prefix: str) -> list[Layer]:
        """The children whose names start with ``prefix``, in layer order: a sorted index makes
        a glob like conv5_* cost a bisection, not a scan of every layer, when specs are long."""
        if not prefix:
            return list(scope.children)
        index = self._sorted.get(scope.path)
        if index is None:
            pairs = sorted((c.name, c.index) for c in scope.children)
            index = ([name for name, _ in pairs], [i for _, i in pairs])
            self._sorted[scope.path] = index
        names, positions = index
        lo = bisect.bisect_left(names, prefix)
        hi = bisect.bisect_left(names, prefix + "\U0010ffff")
        return [scope.children[i] for i in sorted(positions[lo:hi])]

    def select(self, sel: Selector) -> tuple[list[Layer], Optional[Diagnostic]]:
        """The layers a selector names, or the diagnostic that explains why it names none."""
        scopes = [self.tree.root]
        segments = sel.segments
        for i, seg in enumerate(segments):
            if isinstance(seg, AnyDepth):
                scopes = self._with_descendants(scopes)
                continue
            if isinstance(seg, Slice):
                problem = self._past_the_end(seg, sel, scopes)
                if problem is not None:
                    return [], problem
            matched: list[Layer] = []
            seen: set[str] = set()
            for scope in scopes:
                for node in self._match(seg, scope):
                    if node.path not in seen:
                        seen.add(node.path)
                        matched.append(node)
            if not matched:
                return [], self._explain(seg, sel, scopes, after_any=i > 0 and isinstance(
                    segments[i - 1], AnyDepth))
            if i == len(segments) - 1:
                return matched, None
            scopes = [m for m in matched if m.children]
            if not scopes:
                return [], _nothing_inside(sel, seg, matched, segments[i + 1])
        raise AssertionError("selector without segments")  # pragma: no cover

    def _with_descendants(self, scopes: list[Layer]) -> list[Layer]:
        out: dict[str, Layer] = {}
        stack = list(reversed(scopes))
        while stack:
            node = stack.pop()
            if node.path in out:
                continue
            out[node.path] = node
            stack.extend(c for c in reversed(node.children) if c.children)
        return list(out.values())

    def _match(self, seg, scope: Layer) -> list[Layer]:
        children = scope.children
        if isinstance(seg, Name):
            hit = self.children_by_name(scope).get(seg.value)
            return [hit] if hit is not None else []
        if isinstance(seg, Glob):
            match = seg.regex.fullmatch
            return [c for c in self._with_prefix(scope, _literal_prefix(seg.pattern))
                    if match(c.name)]
        if isinstance(seg, Regex):
            key = (seg.pattern, scope.path)
            hits = self._regex_hits.get(key)
            if hits is None:
                hits = [c for c in children if self.regex(seg, "fullmatch", c.name)]
                self._regex_hits[key] = hits
            return list(hits)
        if isinstance(seg, TypeGlob):
            match = seg.regex.fullmatch
            return [c for c in children if match(c.cls)]
        if isinstance(seg, All):
            return list(children)
        if isinstance(seg, Index):
            n = len(children)
            return [children[seg.index]] if -n <= seg.index < n else []
        if isinstance(seg, Slice):
            return list(children[seg.start:seg.stop:seg.step])
        if isinstance(seg, Range):
            table = self.children_by_name(scope)
            first = table.get(seg.first) if seg.first is not None else children[0] if children \
                else None
            last = table.get(seg.last) if seg.last is not None else children[-1] if children \
                else None
            if first is None or last is None or first.index > last.index:
                return []
            return list(children[first.index:last.index + 1])
        raise AssertionError(f"unknown segment {seg!r}")  # pragma: no cover

    def regex(self, seg: Regex, how: str, name: str):
        """``seg.regex.fullmatch(name)`` (or ``search``) within the time left to the regex and
        to all of the spec's regexes; a SelectorError at the regex once either is spent."""
        spent = self._regex_spent.get(seg.pattern, 0.0)
        self._regexes_left += REGEX_MATCH_TIME
        left = min(REGEX_TIMEOUT - spent, self._regexes_left)
        if left > 0:
            start = time.monotonic()
            try:
                return getattr(seg.regex, how)(name, timeout=left)
            except TimeoutError:
                pass
            finally:
                took = time.monotonic() - start
                self._regex_spent[seg.pattern] = spent + took
                self._regexes_left -= took
        if self._regex_spent.get(seg.pattern, 0.0) >= REGEX_TIMEOUT:
            why = f"it took over {REGEX_TIMEOUT:g} s to match the model's layer names"
        else:
            why = (f"the spec's regexes took over {REGEXES_TIMEOUT:g} s together, beyond "
                   f"{REGEX_MATCH_TIME * 1e6:g} µs per name matched")
        raise SelectorError(
            f"/{seg.pattern}/ is too slow: {why}; a repeated group that can match the same "
            f"text in many ways (nested repeats as in '(a*)*', alternatives that overlap as in "
            f"'(a|a)+') backtracks without end: write each repeated part once",
            seg.span, source=self.source)

    # --- why nothing matched -------------------------------------------------------------------

    def _explain(self, seg, sel: Selector, scopes: list[Layer], after_any: bool) -> Diagnostic:
        where = _where(scopes, after_any)
        names = [c.name for s in scopes for c in s.children]
        text = _seg_text(sel, seg)
        if isinstance(seg, Index):
            n = len(scopes[0].children)
            msg = f"{text} is out of range: {where} has {n} layer{'s' if n != 1 else ''}"
            return Diagnostic("error", msg, seg.span)
        if isinstance(seg, Slice):
            n = len(scopes[0].children)
            return Diagnostic("error", f"{text} selects no layer: {where} has {n} layer"
                              f"{'s' if n != 1 else ''}", seg.span)
        if isinstance(seg, Range):
            table = {c.name: c for s in scopes for c in s.children}
            for end, span in ((seg.first, seg.first_span), (seg.last, seg.last_span)):
                if end is not None and end not in table:
                    hint = self._deeper(end.__eq__, text, scopes) or _did_you_mean(end, names)
                    return Diagnostic("error", f"'{end}' matches no layer{_in(where)}{hint}",
                                      span or seg.span)
            a, b = table.get(seg.first), table.get(seg.last)
            return Diagnostic("error", f"range {text} is empty: '{seg.last}' (index {b.index}) "
                              f"comes before '{seg.first}' (index {a.index})", seg.span)
        if isinstance(seg, TypeGlob):
            classes = sorted({c.cls for s in scopes for c in s.children})
            return Diagnostic("error", f"'{text}' matches no layer{_in(where)}"
                              f"{_did_you_mean(seg.pattern, classes, prefix='type:')}", seg.span)
        if isinstance(seg, All):
            return Diagnostic("error", f"'all' matches no layer: {where} has no layers", seg.span)
        if isinstance(seg, Name):
            match = seg.value.__eq__
            hint = self._deeper(match, text, scopes) or _literal_hint(seg, text, names) or \
                _did_you_mean(seg.value, names)
        elif isinstance(seg, Glob):
            hint = self._deeper(seg.regex.fullmatch, text, scopes) or _case_hint(seg, names) or \
                _did_you_mean(re.sub(r"[*?\[\]]", "", seg.pattern), names)
        else:  # Regex
            hint = self._deeper(lambda name: self.regex(seg, "fullmatch", name), text,
                                scopes) or _search_hint(seg, names, self.regex)
        return Diagnostic("error", f"'{text}' matches no layer{_in(where)}{hint}", seg.span)

    def _past_the_end(self, seg: Slice, sel: Selector,
                      scopes: list[Layer]) -> Optional[Diagnostic]:
        """A slice bound past the end of a level it indexes: Python would clamp it, and
        ``layers[:100]`` on a classifier of 6 layers around a base of 154 would freeze the whole
        classifier, its new head included, without a word. Negative bounds keep Python's
        semantics (they count from the end; clamping them is what ``layers[-5:]`` means)."""
        bound = max((b for b in (seg.start, seg.stop) if b is not None and b >= 0), default=None)
        if bound is None:
            return None
        for scope in scopes:
            n = len(scope.children)
            if bound <= n:
                continue
            where = "the model" if scope.path == "" else f"'{scope.path}'"
            text = _seg_text(sel, seg)
            msg = f"{text} reaches past the end: {where} has {n} layer{'s' if n != 1 else ''} here"
            if len(scopes) == 1:
                msg += self._deep_enough(scope, bound, sel, seg, text)
            return Diagnostic("error", msg, seg.span)
        return None

    def _deep_enough(self, scope: Layer, bound: int, sel: Selector, seg: Slice, text: str) -> str:
        """'; NAME has N: did you mean PATH?' for the first layer below ``scope`` (nested models
        before composite layers, then in layer order, nearest first) with enough layers."""
        below = self._with_descendants([scope])[1:]
        fits = [n for n in below if len(n.children) >= bound]
        if not fits:
            return ""
        node = min(fits, key=lambda n: (not n.container, n.depth, self.order[n.path]))
        steps, parent = [], node
        while parent.path != scope.path:
            steps.append(parent)
            parent = self.tree.parent(parent)
        rel = "/".join(_short_name(p, self.tree.parent(p)) for p in reversed(steps))
        before = sel.text[:seg.span.column - sel.span.column]
        return f"; '{node.name}' has {len(node.children)}: did you mean '{before}{rel}/{text}'?"

    def _deeper(self, match, written: str, scopes: list[Layer]) -> str:
        """A hint when the name exists inside a nested model that the selector did not walk into."""
        for scope in scopes:
            for node in self._with_descendants([scope])[1:]:
                if any(match(c.name) for c in node.children):
                    rel = _quote_path(node.path[len(scope.path):].lstrip("/"))
                    what = f"the nested model '{node.name}'" if node.container else \
                        f"the layer '{node.name}' ({node.cls})"
                    return f"; it is inside {what}: write '**/{written}' or '{rel}/{written}'"
        return ""


def _nothing_inside(sel: Selector, seg, matched: list[Layer], following) -> Diagnostic:
    """'/' after a selector that matches only layers that hold none."""
    text = _seg_text(sel, seg)
    weights = {w.name for m in matched for w in m.weights}
    if isinstance(following, Name) and following.value in weights:
        return Diagnostic("error", f"'{text}' holds no layers to walk into with '/': a weight is "
                          f"named with '.', as in '{text}.{following.value}'", seg.span)
    return Diagnostic("error", f"'{text}' holds no layers: '/' walks into nested models and "
                      "layers that hold layers (MultiHeadAttention, a transformer block, ...)",
                      seg.span)


def _short_name(node: Layer, parent: Layer) -> str:
    """How to write ``node``'s name in a path: as it is when the grammar takes it bare, else a
    glob of its leading letters and digits when that names only it among its siblings
    (``mobilenetv2*`` for ``mobilenetv2_1.00_160``), else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_\-]+", node.name):
        return node.name
    lead = re.match(r"[A-Za-z0-9]+", node.name)
    if lead and sum(1 for c in parent.children if c.name.startswith(lead.group())) == 1:
        return lead.group() + "*"
    return f'"{node.name}"'


def _literal_prefix(pattern: str) -> str:
    m = re.search(r"[*?\[]", pattern)
    return pattern[:m.start()] if m else pattern


def _quoted(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_\-]+", name) else f'"{name}"'


def _quote_path(rel: str) -> str:
    return "/".join(_quoted(p) for p in rel.split("/"))


def _seg_text(sel: Selector, seg) -> str:
    """The segment as the user wrote it, cut out of the selector's text by columns."""
    if seg.span.line == sel.span.line == seg.span.end_line:
        start = seg.span.column - sel.span.column
        return sel.text[start:start + seg.span.end_column - seg.span.column]
    return sel.text  # pragma: no cover - selectors do not span lines


def _where(scopes: list[Layer], after_any: bool) -> str:
    if after_any:
        return "the model and its nested models"
    if len(scopes) == 1:
        return "the model" if scopes[0].path == "" else f"'{scopes[0].path}'"
    return "the nested models " + ", ".join(f"'{s.path}'" for s in scopes[:3]) + (
        ", ..." if len(scopes) > 3 else "")


def _in(where: str) -> str:
    return "" if where == "the model" else f" in {where}"


def _literal_hint(seg: Name, text: str, names: list[str]) -> str:
    """Why an exact name missed when a glob of the same letters would hit."""
    if text[:1] in "\"'" and re.search(r"[*?\[]", seg.value):
        n = sum(1 for x in names if fnmatch.fnmatchcase(x, seg.value))
        if n:
            return (f"; a quoted name is exact: unquoted, {seg.value} is a glob that matches "
                    f"{n} layer{'s' if n != 1 else ''}")
        return ""
    n = sum(1 for x in names if x.startswith(seg.value))
    if n:
        return (f"; a name matches whole names only: '{_quoted(seg.value)}*' matches {n} layer"
                f"{'s' if n != 1 else ''}")
    return ""


def _case_hint(seg: Glob, names: list[str]) -> str:
    folded = re.compile(seg.regex.pattern, re.IGNORECASE)
    hits = [x for x in names if folded.fullmatch(x)]
    if hits:
        return (f"; names are case-sensitive: {len(hits)} layer{'s' if len(hits) != 1 else ''} "
                f"match{'es' if len(hits) == 1 else ''} it ignoring case, such as '{hits[0]}'")
    return ""


def _search_hint(seg: Regex, names: list[str], timed) -> str:
    hits = [x for x in names if timed(seg, "search", x)]
    if hits:
        return (f"; a regex must match the whole name: /.*{seg.pattern}.*/ matches {len(hits)} "
                f"layer{'s' if len(hits) != 1 else ''}")
    return ""


def _did_you_mean(word: str, candidates: list[str], prefix: str = "") -> str:
    found = suggest(word, candidates)
    if not found:
        return ""
    quoted = [f"'{prefix}{c}'" for c in found]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {listed}?"
