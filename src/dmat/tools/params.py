"""`dmat params check [FILE]`: validate a params file without running a stage.

Exit 0 when every section is valid (with `--resolved`, the fully resolved config is printed as
YAML, defaults included); exit 2 with the same one-line message a stage would give otherwise. Another
pipeline's params file (e.g. experiments/known-distribution/params.yaml) is checked against its own schema.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_INVALID = 0, 2


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate a params file (exit 0 valid, 2 invalid)",
                               description="Validate every section of a params file as the stages would, "
                                           "without running anything.")
    check.add_argument("file", nargs="?", default="params.yaml", metavar="FILE",
                       help="params file (default: params.yaml in the working directory)")
    check.add_argument("--resolved", action="store_true",
                       help="print the fully resolved config (defaults filled in) as YAML")


def run(args: argparse.Namespace) -> int:
    from dmat.config import ParamsError, as_dict, load_params, to_yaml

    try:
        params = load_params(args.file, schema_of(args.file))
    except ParamsError as err:
        print(f"dmat params: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.resolved:
        print(to_yaml(as_dict(params)), end="")
    else:
        print(f"{args.file}: valid")
    return EXIT_OK


def schema_of(file: str) -> type:
    """The params class of the pipeline whose params file `file` is (the repository's params.yaml otherwise)."""
    from dmat.config import Params
    from dmat.files import project_root
    from dmat.tools.grid import PIPELINES

    path = Path(file).resolve()
    return next((schema for schema in PIPELINES.values() if (project_root() / schema.PARAMS_FILE).resolve() == path),
                Params)
