"""How parse and resolution time grow with the size of the spec and of the model.

What it measures, in one process with time.perf_counter (no TensorFlow: models are plain
LayerTrees, as in tests/test_cases.py):

* parse: `surgery.parse` on specs of 1,000 / 5,000 / 10,000 statements of mixed kinds
  (names, globs, quoted names, regexes, slices, ranges, type:, paths, '**/', except).
  Reported as microseconds per statement and milliseconds per 1,000 statements; linear
  parsing keeps both flat as the spec grows. Measured again with the cyclic garbage collector
  off, which separates the parser's own cost from the collector's (it grows with the heap).
* resolution: `resolve` (selectors -> covered layers -> deciding rule) and `make_plan` on
  models of 500 / 1,000 / 2,000 / 5,000 layers (ResNet-style names, a nested backbone
  with nested stages) x 100 / 1,000 / 10,000 rules of mixed selector kinds, parse excluded.
  A glob, regex, type: or slice has to look at every layer of its scope, so the expected cost
  is proportional to layers x rules; the table reports nanoseconds per (layer x rule) and the
  growth exponent along each axis (time ~ size^k: k = 1 is linear, k = 2 quadratic).
* exact-name rules only (10,000 of them) against each model size: a name is a dictionary
  lookup, so this time should not grow with the number of layers at all.
* error reporting: a spec whose every line names a missing layer, resolved (closest-name
  suggestions included) and rendered with SpecError.render(), as the CLI prints it.
* the whole pipeline of `plan`, `lint --model` and `apply`'s manifest on specs of 1,000 /
  4,000 / 16,000 / 100,000 one-selector statements (names, globs, quoted names, regexes; two
  tokens each, so 100,000 fit under the parser's token limit) against a 175-layer model, the
  size of ResNet50: parse, plan_spec, lint_with_model, build_manifest + its JSON, each timed
  (issue 14: plan was quadratic, 16,000 statements took 106 s).
* `surgery compile` of 1,000,000 statements on one line, as a subprocess: its wall time, exit
  code and peak RSS (the parser refuses it past its token limit; the target is under 1 GB).

Each figure is the median of several runs, with gc.collect() before each. Results: Markdown
tables on stdout and bench/results/scale.json (git-ignored).

Usage:
    python bench/bench_scale.py [--runs 5] [--resolve-runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import surgery
from surgery.plan import make_plan
from surgery.resolve import resolve
from surgery.tree import LayerTree

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"

PARSE_SIZES = (1_000, 5_000, 10_000)
LAYER_SIZES = (500, 1_000, 2_000, 5_000)
RULE_SIZES = (100, 1_000, 10_000)
ERROR_SIZES = (1_000, 2_000, 4_000, 8_000)


# --- models ------------------------------------------------------------------------------------

_BLOCK = (("conv", "Conv2D"), ("bn", "BatchNormalization"), ("relu", "Activation"))


def _resnet_names(prefix: str, count: int) -> list[str]:
    """``count`` layers named like ResNet50's: conv{stage}_block{b}_{k}_{conv|bn|relu}, with
    an '_add' and '_out' closing each block."""
    out: list[str] = []
    stage, block = 2, 1
    while len(out) < count:
        for k in (1, 2, 3):
            for part, cls in _BLOCK:
                out.append(f"{prefix}conv{stage}_block{block}_{k}_{part}:{cls}")
        out.append(f"{prefix}conv{stage}_block{block}_add:Add")
        out.append(f"{prefix}conv{stage}_block{block}_out:Activation")
        block += 1
        if block > 6:
            stage, block = stage + 1, 1
    return out[:count]


def make_model(layers: int) -> dict:
    """Exactly ``layers`` layers (containers included): 60% at the top level, a nested
    'backbone' holding 30%, and inside it four nested stages sharing the rest."""
    fixed = 3 + 3 + 1 + 1 + 4  # stem and head, the backbone and its input, the stage containers
    top, backbone = round(layers * 0.6), round(layers * 0.3)
    rest = layers - fixed - top - backbone
    sizes = [rest // 4 + (1 if s < rest % 4 else 0) for s in range(4)]
    nested = [{"name": f"stage{s}", "class": "Sequential",
               "layers": [f"s{s}_bn{i}:BatchNormalization" if i % 3 == 0 else f"s{s}_dense{i}:Dense"
                          for i in range(size)]} for s, size in enumerate(sizes)]
    return {"name": "model", "layers": (
        ["input_1:InputLayer", "conv1_pad:ZeroPadding2D", "conv1_conv:Conv2D"]
        + _resnet_names("", top)
        + [{"name": "backbone", "class": "Functional",
            "layers": ["bb_input:InputLayer"] + _resnet_names("bb_", backbone) + nested}]
        + ["avg_pool:GlobalAveragePooling2D", "dropout:Dropout", "predictions:Dense"])}


# --- specs -------------------------------------------------------------------------------------


def _top_names(tree: LayerTree) -> list[str]:
    return [c.name for c in tree.root.children]


def mixed_rules(n: int, tree: LayerTree) -> str:
    """``n`` statements cycling through every selector kind; each one matches something in
    ``tree`` (so resolution does real work and raises nothing)."""
    names = [x for x in _top_names(tree) if x.startswith("conv") and "_block" in x]
    bb = [c.name for c in tree.get("backbone").children if c.name.startswith("bb_conv")]
    m = len(tree.root.children)
    lines = []
    for i in range(n):
        action = "freeze" if i % 2 == 0 else "unfreeze"
        a = names[(i * 7) % len(names)]
        b = names[min(len(names) - 1, (i * 7) % len(names) + 10)]
        stage, block = a.split("_")[0], a.split("_")[1]
        kind = i % 12
        if kind == 0:
            sel = a                                        # exact name
        elif kind == 1:
            sel = f"{stage}_{block}_*"                     # glob
        elif kind == 2:
            sel = "type:BatchNormalization" if i % 4 else "type:Conv*"
        elif kind == 3:
            lo = (i * 13) % m
            sel = f"layers[{lo}:{lo + 20}]"                # slice
        elif kind == 4:
            sel = f"{a}..{b}"                              # range
        elif kind == 5:
            sel = f"/{stage}_{block}_\\d_(bn|conv)/"      # regex
        elif kind == 6:
            sel = f"backbone/{bb[(i * 5) % len(bb)]}"      # path, exact
        elif kind == 7:
            sel = f"backbone/bb_{bb[(i * 3) % len(bb)].split('_')[1]}_*"  # path, glob
        elif kind == 8:
            sel = "**/type:Dense"                          # any depth
        elif kind == 9:
            sel = f'"{a}", layers[-3:]'                    # quoted, two selectors
        elif kind == 10:
            sel = f"all except {stage}_*, **/type:BatchNormalization"
        else:
            sel = f"backbone/stage{i % 4}/layers[::2]"     # nested twice, slice
        lines.append(f"{action} {sel}")
    return "\n".join(lines) + "\n"


def name_rules(n: int, tree: LayerTree) -> str:
    names = [x for x in _top_names(tree) if x.startswith("conv")]
    return "".join(f"{'freeze' if i % 2 == 0 else 'unfreeze'} {names[(i * 7) % len(names)]}\n"
                   for i in range(n))


# --- timing ------------------------------------------------------------------------------------


def median_time(fn, runs: int) -> tuple[float, list[float]]:
    """The median of ``runs`` timings, and all of them (the JSON keeps them: on a shared
    machine the minimum is the figure least disturbed by other load)."""
    samples = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def exponent(t1: float, t2: float, n1: int, n2: int) -> float:
    return math.log(t2 / t1) / math.log(n2 / n1)


def bench_parse(runs: int, sizes) -> list[dict]:
    tree = LayerTree.from_dict(make_model(2_000))
    rows = []
    for n in sizes:
        text = mixed_rules(n, tree)
        surgery.parse(text)  # warm-up (builds the Lark parser once)
        t, samples = median_time(lambda: surgery.parse(text, "bench.frz"), runs)
        gc.disable()  # the same, without Python's cyclic collector (what share of it is GC)
        try:
            t_nogc, samples_nogc = median_time(lambda: surgery.parse(text, "bench.frz"), runs)
        finally:
            gc.enable()
        rows.append({"statements": n, "bytes": len(text.encode()), "median_s": t,
                     "us_per_statement": t / n * 1e6, "ms_per_1000": t / n * 1e6,
                     "samples_s": samples, "median_s_gc_off": t_nogc,
                     "us_per_statement_gc_off": t_nogc / n * 1e6,
                     "samples_s_gc_off": samples_nogc})
    return rows


def bench_resolve(runs: int, layer_sizes, rule_sizes) -> tuple[list[dict], list[dict]]:
    rows, names_rows = [], []
    for layers in layer_sizes:
        tree = LayerTree.from_dict(make_model(layers))
        count = len(tree.layers())
        for rules in rule_sizes:
            spec = surgery.parse(mixed_rules(rules, tree), "bench.frz")
            resolution = resolve(spec, tree)  # warm-up, and proof that it resolves
            t_res, samples = median_time(lambda: resolve(spec, tree), runs)
            t_plan, _ = median_time(lambda: make_plan(tree, resolution), runs)
            covered = sum(len(r.covered) for r in resolution.rules)
            rows.append({"layers": count, "rules": rules, "resolve_s": t_res, "plan_s": t_plan,
                         "ns_per_layer_rule": t_res / (count * rules) * 1e9,
                         "covered_total": covered, "warnings": len(resolution.diagnostics),
                         "samples_s": samples})
            print(f"  resolved {count:>5} layers x {rules:>6} rules: {t_res * 1e3:9.1f} ms",
                  file=sys.stderr)
        spec = surgery.parse(name_rules(max(rule_sizes), tree), "bench.frz")
        resolve(spec, tree)
        t, samples = median_time(lambda: resolve(spec, tree), runs)
        names_rows.append({"layers": count, "rules": max(rule_sizes), "resolve_s": t,
                           "us_per_rule": t / max(rule_sizes) * 1e6, "samples_s": samples})
    return rows, names_rows


PIPELINE_SIZES = (1_000, 4_000, 16_000, 100_000)
PIPELINE_LAYERS = 175  # ResNet50 (include_top=False)
COMPILE_STATEMENTS = 1_000_000


def single_rules(n: int, tree: LayerTree) -> str:
    """``n`` statements of one selector each (two tokens), cycling through names, globs,
    quoted names and regexes that match ``tree``'s top-level layers."""
    names = [x for x in _top_names(tree) if x.startswith("conv") and "_block" in x]
    lines = []
    for i in range(n):
        a = names[(i * 7) % len(names)]
        stage, block = a.split("_")[0], a.split("_")[1]
        sel = (a, f"{stage}_{block}_*", f'"{a}"', f"/{stage}_{block}_\\d_(bn|conv)/")[i % 4]
        lines.append(f"{'freeze' if i % 2 == 0 else 'unfreeze'} {sel}")
    return "\n".join(lines) + "\n"


def bench_pipeline(runs: int, sizes) -> list[dict]:
    from surgery.lint import lint_with_model
    from surgery.manifest import build_manifest
    from surgery.plan import plan_spec

    tree = LayerTree.from_dict(make_model(PIPELINE_LAYERS))
    rows = []
    for n in sizes:
        text = single_rules(n, tree)
        spec = surgery.parse(text, "bench.frz")
        plan = plan_spec(spec, tree)
        steps = {
            "parse_s": lambda: surgery.parse(text, "bench.frz"),
            "plan_s": lambda: plan_spec(spec, tree),
            "lint_model_s": lambda: lint_with_model(spec, tree),
            "manifest_s": lambda: build_manifest(
                plan, spec, model_source="bench.keras", model_sha256=None, model_name="model",
                versions={}, surgery_version="bench").to_json(),
        }
        row = {"statements": n, "layers": len(tree.layers())}
        for key, fn in steps.items():
            row[key], row[key.replace("_s", "_samples_s")] = median_time(fn, runs if n < 50_000
                                                                          else 1)
        rows.append(row)
        print(f"  {n:>7} statements: " + ", ".join(f"{k[:-2]} {row[k]:.2f} s" for k in steps),
              file=sys.stderr)
    return rows


def bench_compile(statements: int) -> dict:
    """`surgery compile` of ``statements`` on one line, in a child process: wall time, exit
    code and the child's peak RSS (os.wait4 gives the rusage of that one child)."""
    import os
    import subprocess
    import tempfile

    text = "; ".join(f"{'freeze' if i % 2 else 'unfreeze'} layer_{i % 97}"
                     for i in range(statements)) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "line.frz"
        path.write_text(text)
        exe = Path(sys.executable).parent / "surgery"
        start = time.perf_counter()
        child = subprocess.Popen([str(exe), "compile", str(path)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        err = child.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    return {"statements": statements, "bytes": len(text.encode()), "wall_s": wall,
            "exit": child.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,
            "message": err.splitlines()[0] if err else ""}


ERROR_MODEL_LAYERS = 200  # closest-name suggestions scan the model once per error


def bench_errors(runs: int, sizes) -> list[dict]:
    tree = LayerTree.from_dict(make_model(ERROR_MODEL_LAYERS))
    rows = []
    for n in sizes:
        spec = surgery.parse("".join(f"freeze missing_layer_{i}\n" for i in range(n)), "e.frz")
        caught: list[surgery.SpecError] = []

        def run():
            try:
                resolve(spec, tree)
            except surgery.SpecError as exc:
                caught.append(exc)

        t_res, _ = median_time(run, runs)
        err = caught[-1]
        assert len(err.diagnostics) == n
        t_render, samples = median_time(err.render, runs)
        rows.append({"lines": n, "diagnostics": n, "layers": len(tree.layers()),
                     "resolve_s": t_res, "render_s": t_render,
                     "render_us_per_diagnostic": t_render / n * 1e6, "samples_s": samples})
        print(f"  {n} errors: resolve {t_res:.2f} s, render {t_render:.2f} s", file=sys.stderr)
    return rows


# --- report ------------------------------------------------------------------------------------


def report(parse_rows, resolve_rows, names_rows, error_rows, pipeline_rows=(),
           compile_row=None) -> str:
    out = _scale_report(parse_rows, resolve_rows, names_rows, error_rows) if resolve_rows else []
    out += _pipeline_report(pipeline_rows, compile_row)
    return "\n".join(out).strip("\n")


def _scale_report(parse_rows, resolve_rows, names_rows, error_rows) -> list[str]:
    out = ["### Parse (mixed statements)", "",
           "| statements | bytes | median | µs / statement | ms / 1,000 statements "
           "| µs / statement, gc off |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in parse_rows:
        out.append(f"| {r['statements']:,} | {r['bytes']:,} | {r['median_s'] * 1e3:,.0f} ms | "
                   f"{r['us_per_statement']:.1f} | {r['ms_per_1000']:.1f} "
                   f"| {r['us_per_statement_gc_off']:.1f} |")
    if len(parse_rows) > 1:
        a, b = parse_rows[0], parse_rows[-1]
        n1, n2 = a["statements"], b["statements"]
        out += ["", f"growth exponent {n1:,} -> {n2:,} statements: "
                f"{exponent(a['median_s'], b['median_s'], n1, n2):.2f}, gc off: "
                f"{exponent(a['median_s_gc_off'], b['median_s_gc_off'], n1, n2):.2f}"
                " (1 = linear)"]

    layers = sorted({r["layers"] for r in resolve_rows})
    rules = sorted({r["rules"] for r in resolve_rows})
    cell = {(r["layers"], r["rules"]): r for r in resolve_rows}
    out += ["", "### Resolution (mixed selectors; parse excluded): median resolve time", "",
            "| layers \\ rules | " + " | ".join(f"{n:,}" for n in rules) + " |",
            "|---:|" + "---:|" * len(rules)]
    for n in layers:
        out.append(f"| {n:,} | " + " | ".join(_ms(cell[n, k]["resolve_s"]) for k in rules) + " |")
    out += ["", "ns per (layer x rule):", "",
            "| layers \\ rules | " + " | ".join(f"{n:,}" for n in rules) + " |",
            "|---:|" + "---:|" * len(rules)]
    for n in layers:
        out.append(f"| {n:,} | " + " | ".join(
            f"{cell[n, k]['ns_per_layer_rule']:.0f}" for k in rules) + " |")
    if len(layers) > 1 and len(rules) > 1:
        by_layers = [exponent(cell[layers[0], k]["resolve_s"], cell[layers[-1], k]["resolve_s"],
                              layers[0], layers[-1]) for k in rules]
        by_rules = [exponent(cell[n, rules[0]]["resolve_s"], cell[n, rules[-1]]["resolve_s"],
                             rules[0], rules[-1]) for n in layers]
        out += ["", "growth exponent along layers (per rule count "
                + ", ".join(f"{k:,}" for k in rules) + "): "
                + ", ".join(f"{e:.2f}" for e in by_layers),
                "growth exponent along rules (per layer count "
                + ", ".join(f"{n:,}" for n in layers) + "): "
                + ", ".join(f"{e:.2f}" for e in by_rules) + "  (1 = linear, 2 = quadratic)"]
    out += ["", "make_plan (after resolve) at the largest rule count: " + ", ".join(
        f"{n:,} layers {_ms(cell[n, rules[-1]]['plan_s'])}" for n in layers)]

    out += ["", f"### Exact-name rules only ({names_rows[0]['rules']:,} rules)", "",
            "| layers | median resolve | µs / rule |", "|---:|---:|---:|"]
    for r in names_rows:
        out.append(f"| {r['layers']:,} | {_ms(r['resolve_s'])} | {r['us_per_rule']:.1f} |")

    if error_rows:
        out += ["", "### Error reporting (every line names a missing layer; "
                f"{error_rows[0]['layers']}-layer model)", "",
                "| lines = diagnostics | resolve (with suggestions) | render | "
                "render µs / diagnostic |", "|---:|---:|---:|---:|"]
        for r in error_rows:
            out.append(f"| {r['lines']:,} | {_ms(r['resolve_s'])} | {_ms(r['render_s'])} | "
                       f"{r['render_us_per_diagnostic']:.0f} |")
        if len(error_rows) > 1:
            a, b = error_rows[0], error_rows[-1]
            out += ["", "growth exponent of render: "
                    f"{exponent(a['render_s'], b['render_s'], a['lines'], b['lines']):.2f}, of "
                    f"resolve: {exponent(a['resolve_s'], b['resolve_s'], a['lines'], b['lines']):.2f}"]
    return out


def _pipeline_report(pipeline_rows, compile_row) -> list[str]:
    out: list[str] = []
    if pipeline_rows:
        out += ["", f"### Whole pipeline, one-selector statements, "
                f"{pipeline_rows[0]['layers']}-layer model", "",
                "| statements | parse | plan | lint --model | manifest |",
                "|---:|---:|---:|---:|---:|"]
        for r in pipeline_rows:
            out.append(f"| {r['statements']:,} | {_ms(r['parse_s'])} | {_ms(r['plan_s'])} | "
                       f"{_ms(r['lint_model_s'])} | {_ms(r['manifest_s'])} |")
        if len(pipeline_rows) > 1:
            a, b = pipeline_rows[0], pipeline_rows[-1]
            out += ["", "growth exponent " + ", ".join(
                f"{k[:-2]} {exponent(a[k], b[k], a['statements'], b['statements']):.2f}"
                for k in ("parse_s", "plan_s", "lint_model_s", "manifest_s")) + " (1 = linear)"]
    if compile_row:
        r = compile_row
        out += ["", f"`surgery compile` of {r['statements']:,} statements on one line "
                f"({r['bytes'] / 1e6:.0f} MB): exit {r['exit']} in {r['wall_s']:.1f} s, peak RSS "
                f"{r['peak_rss_mb']:.0f} MB ({r['message']!r})"]
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per parse figure (median)")
    parser.add_argument("--resolve-runs", type=int, default=3,
                        help="runs per resolution and error figure (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test)")
    parser.add_argument("--no-errors", action="store_true", help="skip the error-reporting table")
    parser.add_argument("--only-pipeline", action="store_true",
                        help="only the whole-pipeline sizes and the one-line compile")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)

    parse_sizes = (200, 1_000) if args.quick else PARSE_SIZES
    layer_sizes = (500, 1_000) if args.quick else LAYER_SIZES
    rule_sizes = (100, 1_000) if args.quick else RULE_SIZES
    error_sizes = () if args.no_errors else ((250, 500) if args.quick else ERROR_SIZES)

    pipeline_sizes = (1_000, 4_000) if args.quick else PIPELINE_SIZES
    compile_size = 100_000 if args.quick else COMPILE_STATEMENTS

    started = time.perf_counter()
    parse_rows, resolve_rows, names_rows, error_rows = [], [], [], []
    if not args.only_pipeline:
        print("parse ...", file=sys.stderr)
        parse_rows = bench_parse(args.runs, parse_sizes)
        print("resolve ...", file=sys.stderr)
        resolve_rows, names_rows = bench_resolve(args.resolve_runs, layer_sizes, rule_sizes)
        print("errors ...", file=sys.stderr)
        error_rows = bench_errors(args.resolve_runs, error_sizes) if error_sizes else []
    print("pipeline ...", file=sys.stderr)
    pipeline_rows = bench_pipeline(args.resolve_runs, pipeline_sizes)
    print("compile ...", file=sys.stderr)
    compile_row = bench_compile(compile_size)

    table = report(parse_rows, resolve_rows, names_rows, error_rows, pipeline_rows, compile_row)
    print(table)
    result = {
        "benchmark": "surgery parse and resolve scaling (in-process, plain LayerTrees)",
        "statistic": "median", "parse_runs": args.runs, "resolve_runs": args.resolve_runs,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "machine": platform.machine(), "surgery": surgery.__version__},
        "parse": parse_rows, "resolve": resolve_rows, "exact_names": names_rows,
        "errors": error_rows, "pipeline": pipeline_rows, "compile_one_line": compile_row,
        "markdown": table,
        "wall_s": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
