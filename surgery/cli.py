"""The ``surgery`` command: arguments, exit codes, and every diagnostic rendered once.

A thin shell: each command parses its arguments, calls the library (modelfile.py for model
files, manifest.py for manifests, lint, fmt), prints what comes back (results on stdout; notes,
warnings and errors on stderr) and returns the exit code: 0 done; 1 a check found something;
2 an error in the spec, the model or the arguments (every one a `SurgeryError`); 130 when
interrupted. Anything else is a bug of surgery's: one line, "internal error", and its traceback
with SURGERY_DEBUG=1.

The spec is parsed before Keras is imported, so a typo costs milliseconds, not a TensorFlow start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .atomic import AtomicOutputs, InterruptedAfterCommit
from .errors import SpecError, SurgeryError, UsageError, unreadable
from .ir import Spec
from .render import render_diagnostics
from .specfile import load_spec
from .versions import __version__

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Terminated(BaseException):
    """SIGTERM, raised as an exception so that cleanup (temporary files) runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Freeze and unfreeze parts of Keras models from a spec file.")
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model_help = ("a .keras or .h5 file, or keras.applications.NAME, or "
                  "keras.applications.NAME(arg=value, ...) with literal keyword arguments "
                  "(built with weights=None)")

    p = sub.add_parser("apply", help="apply a spec to a model and write the result and a manifest")
    p.add_argument("spec", metavar="SPEC", help="the spec file (.frz, .yaml, .yml)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="where to write the model (.keras, or .h5)")
    p.add_argument("--manifest", metavar="PATH",
                   help="where to write the manifest (default: OUT.manifest.json)")
    p.add_argument("--force", action="store_true", help="replace OUT and the manifest if they exist")
    _fsync_option(p)
    _common(p)
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("merge", help="fold a model's LoRA adapters into its kernels: a plain "
                       "Keras model for deployment")
    p.add_argument("model", metavar="MODEL", help="a .keras file with LoRA layers")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write it (.keras)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _fsync_option(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("plan", help="show what a spec would do to a model, changing nothing")
    p.add_argument("spec", metavar="SPEC", help="the spec file (.frz, .yaml, .yml)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--changed", action="store_true",
                   help="only the layers whose state the spec changes")
    p.add_argument("--summary", action="store_true",
                   help="one line per block of layers (a nested model, a composite layer, a run "
                        "of layers sharing a name prefix such as conv4_block*), with counts")
    _common(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("show", help="show every layer of a model and its trainable state")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
    _quiet_option(p)
    p.set_defaults(func=_cmd_show, allow_empty=False)

    p = sub.add_parser("lint", help="check specs without loading TensorFlow (exit 1 on findings)")
    p.add_argument("specs", metavar="SPEC", nargs="+", help="spec files (.frz, .yaml, .yml)")
    p.add_argument("--model", metavar="MODEL",
                   help="also report selectors that match nothing in this model")
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
    _quiet_option(p)
    p.set_defaults(func=_cmd_lint)

    p = sub.add_parser("fmt", help="print specs in canonical form, or check or rewrite them")
    p.add_argument("specs", metavar="SPEC", nargs="+", help="spec files (.frz, .yaml, .yml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a file is not in canonical form; change nothing")
    mode.add_argument("--write", action="store_true", help="rewrite files in canonical form")
    p.add_argument("--to", choices=("frz", "yaml"),
                   help="print the spec converted to this form instead")
    _fsync_option(p)
    p.set_defaults(func=_cmd_fmt)

    p = sub.add_parser("compile", help="print a spec's ordered operations as canonical JSON")
    p.add_argument("spec", metavar="SPEC")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("verify", help="check a model's trainable state against a manifest "
                                      "(exit 1 on differences)")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--epoch", type=int, metavar="N",
                   help="check the state the manifest's schedule gives at epoch N (0-based, as "
                        "Keras's initial_epoch; ModelCheckpoint's {epoch} counts from 1, so "
                        "epoch_03.keras is --epoch 2): for a checkpoint saved during training")
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
    _quiet_option(p)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("diff", help="compare two manifests, or one spec applied to two models "
                                    "(exit 1 on differences)")
    p.add_argument("a", metavar="A", help="a manifest (or a model, with --spec)")
    p.add_argument("b", metavar="B", help="a manifest (or a model, with --spec)")
    p.add_argument("--spec", metavar="SPEC", help="plan SPEC on the models A and B and compare")
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
    _quiet_option(p)
    p.set_defaults(func=_cmd_diff)
    return parser


def _fsync_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fsync", action="store_true",
                   help="flush what is written to the disk before it replaces anything, so that "
                        "it survives a power loss too (slower; an interrupted or killed run "
                        "never leaves a partial file either way)")


def _engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "archive", "keras"), default="auto",
                   help="auto (default): the archive engine when it can, else Keras, with a "
                        "note; archive: read and rewrite the .keras file directly, without "
                        "TensorFlow; keras: load and save through Keras")


def _quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress on stderr for the slow steps (building, loading, saving)")


def _common(p: argparse.ArgumentParser) -> None:
    _engine_option(p)
    _quiet_option(p)
    p.add_argument("--allow-empty", action="store_true",
                   help="a selector that matches no layer is a warning, not an error")
    p.add_argument("--unsafe", action="store_true",
                   help="load the model with Keras safe mode off (runs code stored in the file: "
                        "only for files you trust)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if _loads_model(args) and args.unsafe and args.engine != "archive":
            print("surgery: warning: --unsafe: Keras safe mode is off; code stored in the model "
                  "file may run", file=sys.stderr)
        return args.func(args)
    except SpecError as exc:
        _diagnostics(exc.diagnostics, exc.source)
        return EXIT_ERROR
    except SurgeryError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except InterruptedAfterCommit as exc:  # held until the outputs were all in place
        print(f"surgery: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (KeyboardInterrupt, _Terminated):
        print("surgery: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug of ours: one line, and the way to see more
        if os.environ.get("SURGERY_DEBUG"):
            raise
        print(f"surgery: internal error: {type(exc).__name__}: {exc} "
              f"(run with SURGERY_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


def _loads_model(args) -> bool:
    if args.command == "lint":
        return bool(args.model)
    if args.command == "diff":
        return bool(args.spec)
    return args.command in ("apply", "plan", "show", "verify")


# --- commands ------------------------------------------------------------------------------------


def _cmd_apply(args) -> int:
    from .modelfile import apply_file
    from .report import plan_summary

    spec = _read_spec(args.spec)
    result = apply_file(spec, args.model, args.output, manifest=args.manifest, force=args.force,
                        engine=args.engine, allow_empty=args.allow_empty, fsync=args.fsync,
                        safe_mode=not args.unsafe, progress=_progress(args))
    _note(result.fallback)
    _diagnostics(result.diagnostics, spec.source)
    if result.unrestored:
        print(f"surgery: note: {result.unrestored}", file=sys.stderr)
    print(plan_summary(result.plan))
    print(f"wrote {result.output}")
    print(f"manifest {result.manifest_path}")
    return EXIT_OK


def _cmd_merge(args) -> int:
    from .modelfile import merge_file

    result = merge_file(args.model, args.output, force=args.force, fsync=args.fsync)
    n = len(result.layers)
    shown = ", ".join(result.layers[:3]) + (", ..." if n > 3 else "")
    print(f"merged LoRA into the kernels of {n} layer{'s' if n != 1 else ''} ({shown})")
    print(f"wrote {result.output} (sha256 {result.sha256[:12]}): a plain Keras model, no LoRA")
    return EXIT_OK


def _cmd_plan(args) -> int:
    from .plan import plan_spec
    from .report import block_table, plan_table

    spec = _read_spec(args.spec)
    the_plan = plan_spec(spec, _model_tree(args, args.model), allow_empty=args.allow_empty)
    _diagnostics(the_plan.diagnostics, spec.source)
    if args.summary:
        print(block_table(the_plan, changed_only=args.changed))
    else:
        print(plan_table(the_plan, changed_only=args.changed))
    return EXIT_OK


def _cmd_show(args) -> int:
    from .plan import plan_spec
    from .report import plan_table

    empty = Spec(rules=(), source="")
    print(plan_table(plan_spec(empty, _model_tree(args, args.model)), with_rules=False))
    return EXIT_OK


def _cmd_lint(args) -> int:
    from .lint import lint, lint_with_model

    tree = _model_tree(args, args.model) if args.model else None
    status = EXIT_OK
    for path in args.specs:
        try:
            spec = _read_spec(path)
        except SpecError as exc:  # not a spec at all: the parser's findings
            _diagnostics(exc.diagnostics, exc.source)
            status = max(status, EXIT_FINDINGS)
            continue
        except UsageError as exc:
            print(f"surgery: error: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        found = lint(spec) if tree is None else lint_with_model(spec, tree)
        _diagnostics(found, spec.source)
        if found:
            status = max(status, EXIT_FINDINGS)
    return status


def _cmd_fmt(args) -> int:
    from .fmt import format_spec
    from .specfile import is_yaml_path
    from .yaml_read import is_embedded
    from .yaml_write import to_yaml

    if len(args.specs) > 1 and not (args.check or args.write):
        raise UsageError("several files: pass --check or --write (printing is for one file)")
    if args.to and (args.check or args.write):
        raise UsageError("--to prints the converted spec; it does not combine with --check or "
                         "--write")
    status = EXIT_OK
    for path in args.specs:
        spec = _read_spec(path)
        target = args.to or ("yaml" if is_yaml_path(path) else "frz")
        if target == "yaml" and is_yaml_path(path) and is_embedded(spec.source) and not args.to:
            raise UsageError(f"{path}: the rules sit inside a larger config; fmt rewrites "
                             f"standalone spec files only (use --to frz or --to yaml to print)")
        text = to_yaml(spec) if target == "yaml" else format_spec(spec)
        if args.check:
            if text != spec.source:
                print(f"{path}: not in canonical form (surgery fmt --write {path})",
                      file=sys.stderr)
                status = EXIT_FINDINGS
        elif args.write:
            if text != spec.source:
                with AtomicOutputs(fsync=args.fsync, inputs=[path]) as outputs:
                    outputs.reserve(path, ".tmp", replace=True).write_text(text, encoding="utf-8")
                    outputs.commit()
                print(f"reformatted {path}")
        else:
            sys.stdout.write(text)
    return status


def _cmd_compile(args) -> int:
    from .spec_json import compile_spec
    from .manifest import canonical_json

    sys.stdout.write(canonical_json(compile_spec(_read_spec(args.spec))))
    return EXIT_OK


def _cmd_verify(args) -> int:
    from .verify import check_manifest, matching_phase, model_differences
    from .manifest_read import load_manifest
    from .modelfile import model_sha256

    manifest = load_manifest(args.manifest)
    if args.epoch is not None and args.epoch < 0:
        raise UsageError(f"--epoch {args.epoch}: an epoch is 0 or more")
    tree = _model_tree(args, args.model)
    altered = check_manifest(manifest, tree)
    differences = model_differences(manifest, tree, epoch=args.epoch)
    for line in altered + differences:
        print(line)
    if altered:
        print(f"{args.manifest} does not follow from its own spec and the model: "
              f"{_count(altered, 'problem')}; was it edited after surgery apply wrote it?",
              file=sys.stderr)
    if differences:
        print(f"{args.model} does not match {args.manifest}: "
              f"{_count(differences, 'difference')}", file=sys.stderr)
        phase = matching_phase(manifest, tree, besides=args.epoch)
        if phase is not None:
            print(f"note: it matches the state from 'at epoch {phase['epoch']}:' (line "
                  f"{phase['line']}) on: for a checkpoint saved during training, pass --epoch "
                  f"N, the 0-based epoch it was saved in (ModelCheckpoint's {{epoch}} counts "
                  f"from 1)", file=sys.stderr)
    # Whether the model is the very file `apply` wrote: after training it is not, and its
    # state, not its bytes, is what verify checks; saying which keeps "matches" from reading as
    # "is the same file".
    written = manifest.data.get("output", {}).get("sha256")
    actual = None if written is None else model_sha256(args.model)
    if actual is not None and actual != written:
        shown = 12 if actual[:12] != written[:12] else 64  # prefixes that tell them apart
        print(f"note: {args.model} is not the file surgery apply wrote (sha256 "
              f"{actual[:shown]}, the manifest records {written[:shown]}): its state is what is "
              "compared, as for a checkpoint saved during training", file=sys.stderr)
    if altered or differences:
        return EXIT_FINDINGS
    same = "; the very file apply wrote" if actual is not None and actual == written else ""
    print(f"{args.model} matches {args.manifest} ({len(manifest.layers)} layers{same})")
    return EXIT_OK


def _cmd_diff(args) -> int:
    from .verify import diff
    from .manifest_read import load_manifest

    if args.spec:
        spec = _read_spec(args.spec)
        a, b = (_planned(args, spec, model) for model in (args.a, args.b))
        # The two models differ by construction: what is compared is what the spec does to them.
        lines = diff(a, b, inputs=False)
        agreed = f"the two plans agree ({len(a.layers)} layers)"
    else:
        a, b = load_manifest(args.a), load_manifest(args.b)
        lines = diff(a, b)
        agreed = "no differences"
    for line in lines:
        print(line)
    if not lines:
        print(agreed)
    return EXIT_FINDINGS if lines else EXIT_OK


# --- helpers ---------------------------------------------------------------------------------


def _read_spec(path: str) -> Spec:
    try:
        return load_spec(path)
    except OSError as exc:
        raise UsageError(unreadable(path, exc, "spec file")) from None


def _model_tree(args, model: str):
    from .modelfile import read_model

    read = read_model(model, engine=args.engine, safe_mode=not args.unsafe,
                      progress=_progress(args))
    _note(read.fallback)
    return read.tree


def _planned(args, spec: Spec, model: str):
    from .modelfile import planned_manifest

    manifest, read = planned_manifest(spec, model, engine=args.engine, safe_mode=not args.unsafe,
                                      progress=_progress(args))
    _note(read.fallback)
    return manifest


def _progress(args):
    from .progress import for_stderr

    return for_stderr(quiet=args.quiet)


def _note(fallback) -> None:
    if fallback is not None:
        print(f"surgery: note: {fallback}; loaded through Keras", file=sys.stderr)


def _count(lines: list, word: str) -> str:
    return f"{len(lines)} {word}{'s' if len(lines) != 1 else ''}"


def _diagnostics(diagnostics, source) -> None:
    """The one place diagnostics become text: file:line:col, the source line and a caret."""
    if diagnostics:
        print(render_diagnostics(diagnostics, source), file=sys.stderr)
