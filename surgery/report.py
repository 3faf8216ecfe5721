"""Plans rendered for people: the layer table of `plan` and `show`, and the summary of `apply`.

Plain aligned text, so it reads the same in a terminal, a CI log and a pipe.
"""

from __future__ import annotations

from .plan import LayerPlan, Plan

__all__ = ["plan_table", "plan_summary", "state_word"]


def state_word(trainable: bool) -> str:
    return "trainable" if trainable else "frozen"


def _rule_cell(lp: LayerPlan, with_rules: bool) -> str:
    if not with_rules:
        return ""
    if lp.layer.children:
        return "(follows the layers inside)"
    if lp.rule is None:
        return "-"
    text = lp.rule.text if len(lp.rule.text) <= 40 else lp.rule.text[:37] + "..."
    return f"line {lp.rule.span.line}: {text}"


def plan_table(plan: Plan, *, with_rules: bool = True) -> str:
    """Every layer: index, path, class, parameters, state before -> after, the deciding rule."""
    header = ["#", "layer", "class", "params", "before", "after"] + (["rule"] if with_rules else [])
    rows = []
    for lp in plan.layers:
        mark = " *" if with_rules and lp.changed else ""
        rows.append([
            str(lp.layer.index),
            lp.path,
            lp.layer.cls,
            f"{lp.layer.params:,}",
            state_word(lp.before),
            ("partial" if lp.partial else state_word(lp.after)) + mark,
        ] + ([_rule_cell(lp, with_rules)] if with_rules else []))
    right = {0, 3}
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    partial = [lp for lp in plan.layers if lp.partial]
    if partial:
        lines.append("frozen inside trainable layers:")
        for lp in partial:
            for p in lp.frozen_parts:
                axis = "positions" if len(p.axes) != 1 else f"axis {p.axes[0]}"
                lines.append(f"  {lp.path}.{p.weight} {p.shape}: {p.ranges} of {p.size} on "
                             f"{axis} ({p.entries:,} entries)")
        lines.append("")
    lines.extend(_totals(plan, with_change=with_rules))
    if with_rules and any(lp.changed for lp in plan.layers):
        lines.append("* state changed by the spec")
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)


def _totals(plan: Plan, *, with_change: bool) -> list[str]:
    t = plan.totals
    rows = [("trainable params", t.trainable_before, t.trainable_after),
            ("non-trainable params", t.non_trainable_before, t.non_trainable_after),
            ("total params", t.params, t.params)]
    if not with_change:
        return [f"{label}: {before:,}" for label, before, _ in rows]
    w = max(len(f"{b:,}") for _, b, _ in rows)
    return [f"{label:<21} {before:>{w},} -> {after:,}" for label, before, after in rows]


def plan_summary(plan: Plan) -> str:
    """What `apply` prints: each rule with what it covers and decides, then the totals."""
    lines = []
    for r in plan.rules:
        n, d = len(r.covered), len(r.decided)
        lines.append(f"line {r.rule.span.line}: {r.rule.text}  ({n} layer{'s' if n != 1 else ''}"
                     f", decides {d})")
    frozen = sum(1 for lp in plan.layers if not lp.layer.children and not lp.after)
    leaves = sum(1 for lp in plan.layers if not lp.layer.children)
    partial = sum(1 for lp in plan.layers if lp.partial)
    lines.append(f"{frozen} of {leaves} layers frozen" + (
        f", {partial} frozen in part" if partial else ""))
    lines.extend(_totals(plan, with_change=True))
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)
