"""Plans rendered for people: the layer table of `plan` and `show`, `plan`'s one line per block
(``--summary``), and the summary of `apply`.

Plain aligned text, so it reads the same in a terminal, a CI log and a pipe.
"""

from __future__ import annotations

import os
import re

from .fmt import format_name
from .ir import BN_FROZEN
from .plan import LayerPlan, Plan, changed_layers

__all__ = ["plan_table", "block_table", "plan_summary", "phase_report", "state_word"]


def state_word(trainable: bool) -> str:
    return "trainable" if trainable else "frozen"


def _rule_cell(lp: LayerPlan, with_rules: bool) -> str:
    if not with_rules:
        return ""
    if lp.layer.children:
        return "(follows the layers inside)"
    deciding = lp.rule
    if lp.policy is not None and (lp.policy.mode == BN_FROZEN or deciding is None):
        deciding = lp.policy
    ad = lp.adapter
    if ad is not None and ad.statement is not None and (
            lp.rule is None or lp.rule.number < ad.statement.order):
        deciding = ad.statement  # the factors train from it; the rule (if any) decides the rest
    if deciding is None:
        return "-"
    text = deciding.text if len(deciding.text) <= 40 else deciding.text[:37] + "..."
    return f"line {deciding.span.line}: {text}"


def _after_cell(lp: LayerPlan) -> str:
    word = "partial" if lp.partial else state_word(lp.after)
    if lp.adapter is not None and lp.after:
        own = [w.name for w in lp.layer.weights if w.trainable and w.name not in lp.off and
               w.name not in lp.adapter.factors]
        factors = not set(lp.adapter.factors) & set(lp.off)
        word = ("trainable, lora" if own and factors else "lora only" if factors else word)
    return f"{word}, affine" if lp.affine else word


def plan_table(plan: Plan, *, with_rules: bool = True, changed_only: bool = False) -> str:
    """Every layer: index, path, class, parameters, state before -> after, the deciding rule.
    Without ``with_rules`` (`show`: nothing is planned) one state column, the model's.
    ``changed_only``: only the layers whose state the plan changes (`plan --changed`)."""
    if with_rules:
        header = ["#", "layer", "class", "params", "before", "after", "rule"]
    else:
        header = ["#", "layer", "class", "params", "state"]
    shown = [lp for lp in plan.layers if lp.changed] if changed_only else list(plan.layers)
    rows = []
    for lp in shown:
        cells = [str(lp.layer.index), lp.path, lp.layer.cls, f"{lp.layer.params:,}"]
        if with_rules:
            cells += [state_word(lp.before), _after_cell(lp) + (" *" if lp.changed else ""),
                      _rule_cell(lp, with_rules)]
        else:
            cells.append(_after_cell(lp))
        rows.append(cells)
    lines = _aligned(header, rows, right={0, 3}) if rows else [
        f"no layer changes state ({len(plan.layers)} layers)"]
    lines.append("")
    partial = [lp for lp in shown if lp.partial]
    if partial:
        lines.append("frozen inside trainable layers:")
        for lp in partial:
            for p in lp.frozen_parts:
                axis = "positions" if len(p.axes) != 1 else f"axis {p.axes[0]}"
                lines.append(f"  {lp.path}.{p.weight} {p.shape}: {p.ranges} of {p.size} on "
                             f"{axis} ({p.entries:,} entries)")
        lines.append("")
    lines.extend(_lora_lines(plan))
    lines.extend(_variable_lines(plan, with_paths=not with_rules))
    lines.extend(_totals(plan, with_change=with_rules))
    if changed_only and rows:
        lines.append(f"* state changed by the spec ({len(rows)} of {len(plan.layers)} layers "
                     f"shown)")
    elif with_rules and any(lp.changed for lp in plan.layers):
        lines.append("* state changed by the spec")
    lines.extend(f"note: {n}" for n in plan.notes)
    if plan.phases:
        lines.append("")
        lines.append(phase_report(plan))
    return "\n".join(lines)


def _lora_lines(plan: Plan) -> list[str]:
    """The layers with LoRA: rank, alpha, the factors' parameters and state, and what each
    statement covered but could not adapt."""
    with_lora = [lp for lp in plan.layers if lp.adapter is not None]
    if not with_lora:
        return []
    lines = ["LoRA (the adapted weight stays frozen; the factors A and B hold its update, "
             "scaled by alpha/rank):"]
    for lp in with_lora:
        ad = lp.adapter
        trains = plan.trains(lp)
        state = state_word(all(trains[n] for n in ad.factors))
        origin = ", ".join(([f"line {ad.statement.span.line}"] if ad.statement else []) +
                           ([] if ad.new else ["already in the model"]))
        lines.append(f"  {lp.path}.{ad.weight}: rank {ad.rank}, alpha {ad.alpha:g}, "
                     f"{ad.params:,} factor parameters, {state} ({origin})")
    for res in plan.lora:
        if res.skipped:
            shown = ", ".join(f"{k} {c}" for c, k in res.skipped)
            lines.append(f"  line {res.statement.span.line} also covers layers without LoRA "
                         f"in Keras, left as the rules decide: {shown}")
    lines.append("")
    return lines


def _aligned(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# --- plan --summary: one line per block --------------------------------------------------------


def block_table(plan: Plan, *, changed_only: bool = False) -> str:
    """One line per block of top-level layers: a nested model, a composite layer, or a run of
    consecutive layers whose names share a prefix (ResNet50's ``conv4_block*``, MobileNetV2's
    ``block_3_*``), written as the selector that names it; with the layers inside it (units),
    how many end frozen, how many change, and its trainable parameters before -> after."""
    top = [lp for lp in plan.layers if "/" not in lp.path]
    units_of: dict[str, list[LayerPlan]] = {}
    for lp in plan.layers:
        if lp.layer.unit:
            units_of.setdefault(lp.path.split("/", 1)[0], []).append(lp)
    rows = []
    for block, members in _blocks(top):
        units = [lp for m in members for lp in units_of.get(m.path, ())]
        changed = sum(1 for lp in units if lp.changed)
        if changed_only and not changed:
            continue
        frozen = sum(1 for lp in units if not lp.after)
        partial = sum(1 for lp in units if lp.partial)
        before = sum(m.trainable_params_before for m in members)
        after = sum(m.trainable_params_after for m in members)
        kind = members[0].layer.kind if len(members) == 1 else f"run of {len(members)}"
        rows.append([block, kind, str(len(units)), str(frozen)
                     + (f" (+{partial} in part)" if partial else ""), str(changed),
                     f"{sum(m.layer.params for m in members):,}", f"{before:,}", f"{after:,}"])
    header = ["block", "kind", "units", "frozen", "changed", "params", "trainable before",
              "after"]
    lines = _aligned(header, rows, right={2, 4, 5, 6, 7}) if rows else [
        f"no layer changes state ({len(plan.layers)} layers)"]
    lines.append("")
    lines.extend(_totals(plan, with_change=True))
    lines.append("units: layers whose own weights rules decide (a nested model or a composite "
                 "layer counts the ones inside it)")
    lines.extend(f"note: {n}" for n in plan.notes)
    if plan.phases:
        lines.append("")
        lines.append(phase_report(plan, layers=False))
    return "\n".join(lines)


def _blocks(top: list[LayerPlan]):
    """(selector text, members) for consecutive top-level layers: a layer holding layers is a
    block of its own; other layers group while their names share a prefix key (_prefix_key).
    The text is a selector that names exactly the block's layers: the prefix glob, or the
    range ``first..last`` where the glob would need quoting or match layers outside the run."""
    out: list[tuple[str, list[LayerPlan]]] = []
    run: list[LayerPlan] = []
    key = None
    everything = [lp.layer.name for lp in top]

    def flush():
        if not run:
            return
        if len(run) == 1:
            out.append((format_name(run[0].layer.name), list(run)))
        else:
            names = [m.layer.name for m in run]
            common = os.path.commonprefix(names)
            # Cut back to where names part at a '_' or at a number (conv4_block*, not pool1_p*).
            while len(common) > len(key) and not common.endswith("_") and not all(
                    n[len(common):len(common) + 1].isdigit() for n in names):
                common = common[:-1]
            if re.fullmatch(_BARE, common) and sum(
                    1 for n in everything if n.startswith(common)) == len(run):
                out.append((common + "*", list(run)))
            else:
                out.append((f"{format_name(names[0])}..{format_name(names[-1])}", list(run)))
        run.clear()

    for lp in top:
        if lp.layer.children:
            flush()
            key = None
            out.append((format_name(lp.layer.name), [lp]))
            continue
        k = _prefix_key(lp.layer.name)
        if run and k != key:
            flush()
        key = k
        run.append(lp)
    flush()
    return out


def _prefix_key(name: str) -> str:
    """The part of a name that layers of one block share: the name up to and including its
    first '_'-separated token that holds a digit (``conv4_``, ``block_3_``, ``pool1_``), or its
    first token when none does (``expanded_``); a name without '_' is its own key."""
    tokens = name.split("_")
    if len(tokens) == 1:
        return name
    for i, tok in enumerate(tokens[:-1]):
        if any(ch.isdigit() for ch in tok):
            return "_".join(tokens[:i + 1]) + "_"
    return tokens[0] + "_"


_BARE = r"[A-Za-z0-9_\-]+"  # a prefix the grammar takes unquoted (and no glob character)


def _variable_lines(plan: Plan, *, with_paths: bool) -> list[str]:
    """Variables whose own trainable flag the model holds off inside trainable layers (LoRA's
    kernels), and, for `show`, where Keras's variable.path is not surgery's path."""
    lines = []
    held = [(lp.path, w) for lp in plan.layers if lp.after
            for w in lp.layer.weights if w.held and w.name in lp.off and
            not (lp.adapter is not None and w.name == lp.adapter.weight)]
    if held:
        lines.append("variables whose own trainable flag is off (LoRA's merged kernels, flags set "
                     "by hand; rules that unfreeze their layers leave them off):")
        lines += [f"  {path}/{w.name} {w.shape}" for path, w in held]
        lines.append("")
    if not with_paths:
        return lines
    dropped: dict[str, list[tuple[str, str]]] = {}
    for lp in plan.layers:
        for w in lp.layer.weights:
            ours = f"{lp.path}/{w.name}"
            if w.path and w.path != ours:
                prefix = ours[:-len(w.path)] if ours.endswith("/" + w.path) else None
                dropped.setdefault(prefix or "", []).append((ours, w.path))
    for prefix, pairs in sorted(dropped.items()):
        ours, theirs = pairs[0]
        if prefix:
            lines.append(f"Keras names the {len(pairs)} variable{'s' if len(pairs) != 1 else ''} "
                         f"inside '{prefix.rstrip('/')}' without it: surgery's '{ours}' is "
                         f"Keras's variable.path '{theirs}'")
        else:
            lines.append(f"{len(pairs)} variable{'s' if len(pairs) != 1 else ''} with a "
                         f"variable.path other than surgery's path, such as '{theirs}' for "
                         f"'{ours}'")
    return lines + ([""] if dropped else [])


def phase_report(plan: Plan, *, layers: bool = True) -> str:
    """Each later phase: when it starts, the layers it changes (with ``layers``) and the
    trainable parameters before -> after; the table above is phase 0."""
    first = "phase 0 (the table above)" if layers else "phase 0 (written now)"
    lines = [f"schedule: {first}, then {len(plan.phases) - 1} phase"
             f"{'s' if len(plan.phases) > 2 else ''} applied by surgery.Schedule during fit:"]
    for prev, ph in zip(plan.phases, plan.phases[1:]):
        changed = [lp for lp in changed_layers(prev.plan, ph.plan) if lp.layer.weights]
        was = prev.plan.by_path
        count = {"unfrozen": 0, "frozen": 0, "changed": 0}
        rows = []
        for lp in changed:
            before, after = was[lp.path].after, lp.after
            what = "unfrozen" if after and not before else "frozen" if before and not after \
                else "changed"
            count[what] += 1
            rows.append((what, lp))
        summary = ", ".join(f"{n} {w}" for w, n in count.items() if n) or "no layer changes"
        before_t = prev.plan.totals.trainable_after
        after_t = ph.plan.totals.trainable_after
        lines.append(f"  at epoch {ph.epoch} (line {ph.header.span.line}): {summary}; "
                     f"trainable params {before_t:,} -> {after_t:,}")
        if layers:
            w = max((len(lp.path) for _, lp in rows), default=0)
            wc = max((len(lp.layer.cls) for _, lp in rows), default=0)
            for what, lp in rows:
                lines.append(f"    {what:<8}  {lp.path:<{w}}  {lp.layer.cls:<{wc}}  -> "
                             f"{_after_cell(lp)}")
    return "\n".join(lines)


def _totals(plan: Plan, *, with_change: bool) -> list[str]:
    """Trainable, non-trainable and total parameters; where entries frozen inside trainable
    variables make Keras's count (``model.trainable_weights``) differ, that count too, and one
    line saying why both are right."""
    t = plan.totals
    rows = [("trainable params", t.trainable_before, t.trainable_after),
            ("non-trainable params", t.non_trainable_before, t.non_trainable_after),
            ("total params", t.params - t.added, t.params)]
    held = t.held_after if with_change else t.held_before
    if t.held_before or (with_change and t.held_after):
        rows.append(("in trainable variables", t.in_variables_before, t.in_variables_after))
    if not with_change:
        lines = [f"{label}: {before:,}" for label, before, _ in rows]
    else:
        w = max(len(f"{b:,}") for _, b, _ in rows)
        lw = max(len(label) for label, _, _ in rows)
        lines = [f"{label:<{lw}} {before:>{w},} -> {after:,}" for label, before, after in rows]
    if held:
        holding = t.in_variables_after if with_change else t.in_variables_before
        lines.append(f"trainable variables hold {holding:,} parameters; {held:,} of them are "
                     f"frozen entries kept by constraints (Keras's model.trainable_weights counts "
                     f"them, the trainable params above do not)")
    elif with_change and t.held_before:
        lines.append(f"trainable variables held {t.in_variables_before:,} parameters before; "
                     f"{t.held_before:,} of them were frozen entries kept by constraints")
    return lines


def plan_summary(plan: Plan) -> str:
    """What `apply` prints: each rule with what it covers and decides, then the totals."""
    lines = []
    for r in plan.rules:
        n, d = len(r.covered), len(r.decided)
        lines.append(f"line {r.rule.span.line}: {r.rule.text}  ({n} layer{'s' if n != 1 else ''}"
                     f", decides {d})")
    policies: dict = {}
    for lp in plan.layers:
        if lp.policy is not None:
            policies.setdefault(lp.policy, []).append(lp)
    for pol, lps in sorted(policies.items(), key=lambda kv: kv[0].number):
        lines.append(f"line {pol.span.line}: {pol.text}  ({len(lps)} BatchNormalization layer"
                     f"{'s' if len(lps) != 1 else ''})")
    for res in plan.lora:
        n = len(res.targets)
        lines.append(f"line {res.statement.span.line}: {res.statement.text}  (LoRA on {n} "
                     f"layer{'s' if n != 1 else ''})")
    frozen = sum(1 for lp in plan.layers if not lp.layer.children and not lp.after)
    leaves = sum(1 for lp in plan.layers if not lp.layer.children)
    partial = sum(1 for lp in plan.layers if lp.partial)
    to_affine = sum(1 for lp in plan.layers if lp.affine and not lp.layer.affine)
    from_affine = sum(1 for lp in plan.layers if lp.layer.affine and not lp.affine)
    switched = "".join(
        f", {n} BatchNormalization layer{'s' if n != 1 else ''} switched {way} the affine class"
        for n, way in ((to_affine, "to"), (from_affine, "from")) if n)
    lines.append(f"{frozen} of {leaves} layers frozen" + (
        f", {partial} frozen in part" if partial else "") + switched)
    lines.extend(_totals(plan, with_change=True))
    lines.extend(f"note: {n}" for n in plan.notes)
    if plan.phases:
        lines.append(phase_report(plan, layers=False))
    return "\n".join(lines)
