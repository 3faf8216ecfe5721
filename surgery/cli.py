"""The ``surgery`` command: argument handling, exit codes, and every error rendered once.

Exit codes: 0 done; 1 a check found something; 2 an error in the spec, the model or the arguments
(also for anything unexpected: no traceback reaches the user unless SURGERY_DEBUG=1); 130 when
interrupted. Results go to stdout, diagnostics to stderr.

The spec is parsed before Keras is imported, so a typo costs milliseconds, not a TensorFlow start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .digest import InputChanged
from .engines import APPLICATIONS_PREFIX
from .errors import SpecError, SurgeryError, UsageError, render_diagnostics
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

    p = sub.add_parser("plan", help="show what a spec would do to a model, changing nothing")
    p.add_argument("spec", metavar="SPEC", help="the spec file (.frz, .yaml, .yml)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    _common(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("show", help="show every layer of a model and its trainable state")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
    p.set_defaults(func=_cmd_show, allow_empty=False)

    p = sub.add_parser("lint", help="check specs without loading TensorFlow (exit 1 on findings)")
    p.add_argument("specs", metavar="SPEC", nargs="+", help="spec files (.frz, .yaml, .yml)")
    p.add_argument("--model", metavar="MODEL",
                   help="also report selectors that match nothing in this model")
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
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
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("diff", help="compare two manifests, or one spec applied to two models "
                                    "(exit 1 on differences)")
    p.add_argument("a", metavar="A", help="a manifest (or a model, with --spec)")
    p.add_argument("b", metavar="B", help="a manifest (or a model, with --spec)")
    p.add_argument("--spec", metavar="SPEC", help="plan SPEC on the models A and B and compare")
    p.add_argument("--unsafe", action="store_true", help=argparse.SUPPRESS)
    _engine_option(p)
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


def _common(p: argparse.ArgumentParser) -> None:
    _engine_option(p)
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

    from .report import plan_summary

    result = None
    opened = _open_archive(args) if out.endswith(".keras") else _no_archive(args, "an .h5 output")
    if opened is not None:
        with opened:
            result = _apply_with_archive(args, spec, opened, out, manifest_path)
    if result is None:
        result = _apply_with_keras(args, spec, out, manifest_path)
    the_plan, status = result
    if status is not None:
        return status
    print(plan_summary(the_plan))
    print(f"wrote {out}")
    print(f"manifest {manifest_path}")
    return EXIT_OK


def _apply_with_archive(args, spec: Spec, opened, out: str, manifest_path: str):
    """(plan, exit status or None) by rewriting the archive; None when Keras must do it."""
    from .atomic import AtomicOutputs
    from .engines import archive
    from .manifest import build_manifest
    from .plan import plan_spec

    the_plan = plan_spec(spec, opened.tree, allow_empty=args.allow_empty)
    reason = opened.unsupported(the_plan)
    if reason is not None:
        _fallback(args, reason)
        return None
    _print_diagnostics(the_plan.diagnostics, spec)
    with AtomicOutputs(fsync=args.fsync) as outputs:
        model_tmp = outputs.reserve(out, ".keras")
        try:
            written = opened.write(the_plan, str(model_tmp))
        except (InputChanged, archive.DamagedArchive) as exc:  # the input's fault
            raise SurgeryError(f"{args.model}: {exc}") from None
        except (OSError, archive.ArchiveUnsupported) as exc:
            raise SurgeryError(f"{out}: cannot save the model: {exc}") from None
        manifest = build_manifest(the_plan, spec, model_source=args.model,
                                  model_sha256=written.source_sha256, model_name=opened.name,
                                  output_sha256=written.sha256)
        return the_plan, _write_manifest_and_commit(outputs, manifest, manifest_path, out)


def _apply_with_keras(args, spec: Spec, out: str, manifest_path: str):
    """(plan, exit status or None) by loading, changing and saving the model through Keras."""
    from .api import apply_plan
    from .atomic import AtomicOutputs

    # Hashed in a thread while TensorFlow imports and the model loads: begun before the import.
    with _input_digest(args.model) as source:
        from .engines import live

        model = _load_model(live, args)
        digest = None
        if source is not None:
            try:
                digest = source.result()
            except InputChanged as exc:
                raise SurgeryError(f"{args.model}: {exc}") from None
            except OSError as exc:
                raise SurgeryError(f"{args.model}: cannot read it: "
                                   f"{exc.strerror or exc}") from None
    the_plan, manifest = apply_plan(model, spec, allow_empty=args.allow_empty,
                                    model_source=args.model, model_sha256=digest)
    _print_diagnostics(the_plan.diagnostics, spec)
    with AtomicOutputs(fsync=args.fsync) as outputs:
        model_tmp = outputs.reserve(out, Path(out).suffix)
        try:
            live.save(model, str(model_tmp))
        except Exception as exc:
            raise SurgeryError(f"{out}: cannot save the model: {exc}") from None
        # Where the saved form cannot hold the plan (keras_hub models, MultiHeadAttention's
        # sublayers, variable flags): the state goes into the file, and the user is told.
        from .saved_state import record

        note = record(str(model_tmp), the_plan, shown=out)
        if note:
            print(f"surgery: note: {note}", file=sys.stderr)
        return the_plan, _write_manifest_and_commit(outputs, manifest, manifest_path, out)


def _input_digest(model: str):
    """The model file's sha256 begun in the background (surgery/digest.py says why); a no-op
    context, giving None, for a `keras.applications.NAME` model, which is built, not read, and
    for a path that does not open, which loading the model then reports."""
    from .digest import FileDigest

    # As engines.live.load decides: a keras.applications name is built, whatever the folder has.
    if not model.startswith(APPLICATIONS_PREFIX) and os.path.isfile(model):
        try:
            return FileDigest(model)
        except OSError:
            pass
    return contextlib.nullcontext()


def _write_manifest_and_commit(outputs, manifest, manifest_path: str, out: str):
    """Write the manifest beside the model's temporary and commit both; an exit code when
    interrupted after the commit, else None."""
    manifest_tmp = outputs.reserve(manifest_path, ".json")
    try:
        manifest_tmp.write_text(manifest.to_json(), encoding="utf-8")
    except OSError as exc:
        raise SurgeryError(f"{manifest_path}: cannot write the manifest: "
                           f"{exc.strerror or exc}") from None
    try:
        outputs.commit()
    except (KeyboardInterrupt, _Terminated):
        # The commit defers a signal until both files are in place: say what exists.
        if outputs.committed:
            print(f"surgery: interrupted after writing {out} and {manifest_path}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    return None


def _no_archive(args, why: str):
    if getattr(args, "engine", "keras") == "archive":
        raise UsageError(f"--engine archive cannot handle {why}")
    return None


def _fallback(args, reason: str) -> None:
    if args.engine == "archive":
        raise SurgeryError(f"{args.model}: the archive engine cannot handle it: {reason}")
    # Said once Keras has loaded the model: a file Keras cannot read either gets one line, the
    # error, not a note about engines first.
    args.fallback_note = f"surgery: note: {reason}; loaded through Keras"


def _open_archive(args, *, read_only: bool = False):
    """The model's .keras archive opened and described without TensorFlow
    (`engines.archive.Opened`), or None when the Keras engine must load it (chosen, or --engine
    auto and the archive cannot be read alone). A command that only reads (``read_only``) also
    takes an archive saved compiled."""
    engine = getattr(args, "engine", "keras")
    if engine == "keras":
        return None
    if not args.model.endswith(".keras") or not os.path.isfile(args.model):
        return _no_archive(args, f"{args.model} (a .keras file is needed)")
    from .engines import archive

    try:
        return archive.Opened(args.model, compiled=read_only)
    except archive.ArchiveUnsupported as exc:
        _fallback(args, str(exc))
    except (OSError, ValueError) as exc:
        _fallback(args, f"cannot read the archive ({exc})")
    return None


def _model_tree(args):
    opened = _open_archive(args, read_only=True)
    if opened is not None:
        with opened:
            return opened.tree
    from .engines import live

    return live.describe(_load_model(live, args))[0]


def _cmd_plan(args) -> int:
    spec = _read_spec(args.spec)
    from .plan import plan_spec
    from .report import plan_table

    tree = _model_tree(args)
    the_plan = plan_spec(spec, tree, allow_empty=args.allow_empty)
    _print_diagnostics(the_plan.diagnostics, spec)
    print(plan_table(the_plan))
    return EXIT_OK


def _cmd_show(args) -> int:
    from .plan import plan_spec
    from .report import plan_table

    tree = _model_tree(args)
    empty = Spec(rules=(), source="")
    print(plan_table(plan_spec(empty, tree), with_rules=False))
    return EXIT_OK


def _cmd_lint(args) -> int:
    from .lint import lint, lint_with_model

    tree = _model_tree(args) if args.model else None
    status = EXIT_OK
    for path in args.specs:
        try:
            spec = _read_spec(path)
        except SpecError as exc:  # not a spec at all: the parser's findings
            print(exc.render(), file=sys.stderr)
            status = max(status, EXIT_FINDINGS)
            continue
        except UsageError as exc:
            print(f"surgery: error: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        found = lint(spec) if tree is None else lint_with_model(spec, tree)
        _print_diagnostics(found, spec)
        if found:
            status = max(status, EXIT_FINDINGS)
    return status


def _cmd_fmt(args) -> int:
    from .atomic import AtomicOutputs
    from .fmt import format_spec
    from .yamlspec import is_embedded, is_yaml_path, to_yaml

    if len(args.specs) > 1 and not (args.check or args.write):
        raise UsageError("several files: pass --check or --write (printing is for one file)")
    status = EXIT_OK
    for path in args.specs:
        spec = _read_spec(path)
        target = args.to or ("yaml" if is_yaml_path(path) else "frz")
        if target == "yaml" and is_yaml_path(path) and is_embedded(spec.source) and not args.to:
            raise UsageError(f"{path}: the rules sit inside a larger config; fmt rewrites "
                             f"standalone spec files only (use --to frz or --to yaml to print)")
        text = to_yaml(spec) if target == "yaml" else format_spec(spec)
        if args.to and (args.check or args.write):
            raise UsageError("--to prints the converted spec; it does not combine with "
                             "--check or --write")
        if args.check:
            if text != spec.source:
                print(f"{path}: not in canonical form (surgery fmt --write {path})",
                      file=sys.stderr)
                status = EXIT_FINDINGS
        elif args.write:
            if text != spec.source:
                with AtomicOutputs(fsync=args.fsync) as outputs:
                    tmp = outputs.reserve(path, ".tmp")
                    tmp.write_text(text, encoding="utf-8")
                    try:
                        outputs.commit()
                    except (KeyboardInterrupt, _Terminated):
                        if outputs.committed:
                            print(f"surgery: interrupted after writing {path}", file=sys.stderr)
                            return EXIT_INTERRUPTED
                        raise
                print(f"reformatted {path}")
        else:
            sys.stdout.write(text)
    return status


def _cmd_compile(args) -> int:
    from .compiled import compile_spec
    from .manifest import canonical_json

    sys.stdout.write(canonical_json(compile_spec(_read_spec(args.spec))))
    return EXIT_OK


def _read_manifest(path: str):
    from .manifest import load_manifest

    try:
        return load_manifest(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the manifest: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _cmd_verify(args) -> int:
    from .manifest import verify

    manifest = _read_manifest(args.manifest)
    if args.epoch is not None and args.epoch < 0:
        raise UsageError(f"--epoch {args.epoch}: an epoch is 0 or more")
    tree = _model_tree(args)
    differences = verify(manifest, tree, epoch=args.epoch)
    for line in differences:
        print(line)
    if differences:
        print(f"{args.model} does not match {args.manifest}: {len(differences)} "
              f"difference{'s' if len(differences) != 1 else ''}", file=sys.stderr)
        schedule = manifest.data.get("schedule") or []
        for phase in schedule[1:]:
            if phase["epoch"] != args.epoch and not verify(manifest, tree, epoch=phase["epoch"]):
                print(f"note: it matches the state from 'at epoch {phase['epoch']}:' (line "
                      f"{phase['line']}) on: for a checkpoint saved during training, pass --epoch "
                      f"N, the 0-based epoch it was saved in (ModelCheckpoint's "
                      f"{{epoch}} counts from 1)", file=sys.stderr)
                break
        return EXIT_FINDINGS
    print(f"{args.model} matches {args.manifest} ({len(manifest.layers)} layers)")
    return EXIT_OK


def _cmd_diff(args) -> int:
    from .manifest import diff

    if args.spec:
        a, b = (_planned_manifest(args, args.spec, m) for m in (args.a, args.b))
    else:
        a, b = _read_manifest(args.a), _read_manifest(args.b)
    lines = diff(a, b)
    for line in lines:
        print(line)
    if not lines:
        print("no differences")
    return EXIT_FINDINGS if lines else EXIT_OK


def _planned_manifest(args, spec_path: str, model_path: str):
    """The manifest `apply` would write for this spec and model, computed without writing."""
    from . import __version__
    from .manifest import build_manifest, sha256_file
    from .plan import plan_spec

    spec = _read_spec(spec_path)
    # Read as plan reads it: from the archive when it can, else through Keras, with a note.
    tree = _model_tree(argparse.Namespace(model=model_path, unsafe=args.unsafe,
                                          engine=args.engine))
    digest = None if model_path.startswith(APPLICATIONS_PREFIX) else sha256_file(model_path)
    return build_manifest(plan_spec(spec, tree), spec, model_source=model_path,
                          model_sha256=digest, model_name=tree.root.name,
                          surgery_version=__version__)


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
    model = live.load(args.model, safe_mode=not args.unsafe)
    note = getattr(args, "fallback_note", None)
    if note:
        print(note, file=sys.stderr)
    return model


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
    if diagnostics:
        print(render_diagnostics(diagnostics, spec.source), file=sys.stderr)
