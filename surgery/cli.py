"""The ``surgery`` command: argument handling, exit codes, and every error rendered once.

Exit codes: 0 done; 1 a check found something; 2 an error in the spec, the model or the arguments
(also for anything unexpected: no traceback reaches the user unless SURGERY_DEBUG=1); 130 when
interrupted. Results go to stdout, diagnostics to stderr.

The spec is parsed before Keras is imported, so a typo costs milliseconds, not a TensorFlow start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import SpecError, SurgeryError, UsageError, render_diagnostic
from .ir import Spec
from .parse import load_spec

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
_OUTPUT_SUFFIXES = (".keras", ".h5")


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

    model_help = "a .keras or .h5 file, or keras.applications.NAME (built with weights=None)"

    p = sub.add_parser("apply", help="apply a spec to a model and write the result and a manifest")
    p.add_argument("spec", metavar="SPEC", help="the spec file (.frz)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="where to write the model (.keras, or .h5)")
    p.add_argument("--manifest", metavar="PATH",
                   help="where to write the manifest (default: OUT.manifest.json)")
    p.add_argument("--force", action="store_true", help="replace OUT and the manifest if they exist")
    _common(p)
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("plan", help="show what a spec would do to a model, changing nothing")
    p.add_argument("spec", metavar="SPEC", help="the spec file (.frz)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    _common(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("show", help="show every layer of a model and its trainable state")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_show, allow_empty=False)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-empty", action="store_true",
                   help="a selector that matches no layer is a warning, not an error")
    p.add_argument("--unsafe", action="store_true",
                   help="load the model with Keras safe mode off (runs code stored in the file: "
                        "only for files you trust)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_ERROR
    except SurgeryError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
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


# --- commands ------------------------------------------------------------------------------------


def _cmd_apply(args) -> int:
    out = args.output
    manifest_path = args.manifest or out + ".manifest.json"
    _check_output(out, args.model, args.force, what="output")
    _check_output(manifest_path, args.model, args.force, what="manifest")
    if os.path.abspath(out) == os.path.abspath(manifest_path):
        raise UsageError("the output and the manifest must be different files")
    spec = _read_spec(args.spec)

    from .api import apply_plan
    from .atomic import AtomicOutputs
    from .engines import live
    from .manifest import sha256_file
    from .report import plan_summary

    model = _load_model(live, args)
    digest = None if args.model.startswith(live.APPLICATIONS_PREFIX) else sha256_file(args.model)
    the_plan, manifest = apply_plan(model, spec, allow_empty=args.allow_empty,
                                    model_source=args.model, model_sha256=digest)
    _print_diagnostics(the_plan.diagnostics, spec)
    with AtomicOutputs() as outputs:
        model_tmp = outputs.reserve(out, Path(out).suffix)
        try:
            live.save(model, str(model_tmp))
        except Exception as exc:
            raise SurgeryError(f"{out}: cannot save the model: {exc}") from None
        manifest_tmp = outputs.reserve(manifest_path, ".json")
        manifest_tmp.write_text(manifest.to_json(), encoding="utf-8")
        outputs.commit()
    print(plan_summary(the_plan))
    print(f"wrote {out}")
    print(f"manifest {manifest_path}")
    return EXIT_OK


def _cmd_plan(args) -> int:
    spec = _read_spec(args.spec)
    from .engines import live
    from .plan import plan_spec
    from .report import plan_table

    model = _load_model(live, args)
    tree, _ = live.describe(model)
    the_plan = plan_spec(spec, tree, allow_empty=args.allow_empty)
    _print_diagnostics(the_plan.diagnostics, spec)
    print(plan_table(the_plan))
    return EXIT_OK


def _cmd_show(args) -> int:
    from .engines import live
    from .plan import plan_spec
    from .report import plan_table

    model = _load_model(live, args)
    tree, _ = live.describe(model)
    empty = Spec(rules=(), source="")
    print(plan_table(plan_spec(empty, tree), with_rules=False))
    return EXIT_OK


# --- helpers ---------------------------------------------------------------------------------


def _read_spec(path: str) -> Spec:
    try:
        return load_spec(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such spec file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a spec file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the spec: {exc.strerror}") from None


def _load_model(live, args):
    if args.unsafe:
        print("surgery: warning: --unsafe: Keras safe mode is off; code stored in the model file "
              "may run", file=sys.stderr)
    return live.load(args.model, safe_mode=not args.unsafe)


def _check_output(path: str, model: str, force: bool, *, what: str) -> None:
    if what == "output" and not path.endswith(_OUTPUT_SUFFIXES):
        raise UsageError(f"{path}: the output must end with .keras (or .h5)")
    if os.path.exists(model) and os.path.exists(path) and os.path.samefile(model, path):
        raise UsageError(f"{path}: the {what} would overwrite the input model; surgery never "
                         f"modifies its input")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory")
    if os.path.exists(path) and not force:
        raise UsageError(f"{path}: already exists; pass --force to replace it")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: the folder {parent} does not exist")


def _print_diagnostics(diagnostics, spec: Spec) -> None:
    for d in diagnostics:
        print(render_diagnostic(d, spec.source), file=sys.stderr)
