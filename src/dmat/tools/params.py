"""`dmat params check | render | apply | diff`: the params files, without running a stage.

- `check [FILE]`: validate a params file (or a profile) as the stages would (with `--resolved`, print the fully
  resolved config, defaults included). Exit 0 valid, 2 not.
- `render [--check]`: write params.yaml from the defaults in src/dmat/config.py (`--check`: exit 1 when the
  committed file differs).
- `apply PROFILE [--out FILE]`: write the complete params file a profile makes (defaults + its changes, each marked
  with its reason, and base.profile naming it) to params.yaml or FILE.
- `diff [FILE]`: print what a params file changes from the defaults, as a profile would hold it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_STALE, EXIT_INVALID = 0, 1, 2


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate a params file (exit 0 valid, 2 invalid)",
                               description="Validate every section of a params file as the stages would, "
                                           "without running anything.")
    check.add_argument("file", nargs="?", default="params.yaml", metavar="FILE",
                       help="params file (default: params.yaml in the working directory)")
    check.add_argument("--resolved", action="store_true",
                       help="print the fully resolved config (defaults filled in) as YAML")
    render = actions.add_parser("render", help="write params.yaml from the defaults in src/dmat/config.py")
    render.add_argument("--check", action="store_true", help="only check: exit 1 when params.yaml differs")
    apply = actions.add_parser("apply", help="write the params file a profile makes (defaults + its changes)")
    apply.add_argument("profile", metavar="PROFILE", help="e.g. profiles/paper-cifar10.yaml")
    apply.add_argument("--out", default="params.yaml", metavar="FILE", help="where to write it (default params.yaml)")
    diff = actions.add_parser("diff", help="print what a params file changes from the defaults (as a profile)")
    diff.add_argument("file", nargs="?", default="params.yaml", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from dmat.config import ParamsError

    try:
        return {"check": _check, "render": _render, "apply": _apply, "diff": _diff}[args.action](args)
    except ParamsError as err:
        print(f"dmat params: error: {err}", file=sys.stderr)
        return EXIT_INVALID


def _check(args: argparse.Namespace) -> int:
    from dmat.config import as_dict, to_yaml
    from dmat.profiles import load_any

    params = load_any(args.file)
    print(to_yaml(as_dict(params)) if args.resolved else f"{args.file}: valid", end="" if args.resolved else "\n")
    return EXIT_OK


def _render(args: argparse.Namespace) -> int:
    from dmat.config import Params
    from dmat.profiles import render

    return _write(Path("params.yaml"), render(Params()), only_check=args.check)


def _apply(args: argparse.Namespace) -> int:
    from dmat.profiles import load_profile, profile_title, render

    params, reasons = load_profile(args.profile)
    return _write(Path(args.out), render(params, reasons, profile_title(Path(args.profile).as_posix())))


def _diff(args: argparse.Namespace) -> int:
    from dmat.profiles import format_value, load_any, profile_changes

    for key, value in profile_changes(load_any(args.file)).items():
        print(f"{key}: {format_value(value)}")
    return EXIT_OK


def _write(path: Path, text: str, only_check: bool = False) -> int:
    from dmat.files import atomic_path

    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return EXIT_OK
    if only_check:
        print(f"dmat params: {path} differs from the defaults in src/dmat/config.py: run `dmat params render`",
              file=sys.stderr)
        return EXIT_STALE
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"dmat params: wrote {path}", file=sys.stderr)
    return EXIT_OK
