"""The `dmat` command: one subcommand per DVC stage. Argument parsing and exit codes only.

Exit codes: 0 success; 1 bad data, a broken store or tracking failure (message names it);
2 bad params or usage (before anything is written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dmat import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _run_prepare(args: argparse.Namespace) -> None:
    from dmat.stages import prepare

    params = _load(args)
    prepare.run(params)


STAGES: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "prepare": (_run_prepare, "Real data -> data/real/{train,val,test} canonical stores, split and subset as "
                              "params.yaml's `data` section says (source: torchvision, imagefolder or npz)."),
}


def _load(args: argparse.Namespace):
    from dmat.config import load_params
    from dmat.runtime import apply_base

    params = load_params(args.params)
    apply_base(params.base)
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmat",
        description="DMAT pipeline stages. Each reads params.yaml from the working directory and writes "
                    "exactly the outputs its dvc.yaml stage declares; `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"dmat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text.split(". ")[0], description=help_text)
        sub.add_argument("--params", default="params.yaml", metavar="FILE",
                         help="params file to read (default: params.yaml in the working directory)")
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dmat.config import ParamsError
    from dmat.data.sources import DataError
    from dmat.data.store import StoreError
    from dmat.tracking import TrackingError

    try:
        args.handler(args)
    except ParamsError as err:
        return _fail(args.command, err, EXIT_USAGE)
    except (DataError, StoreError, TrackingError) as err:
        return _fail(args.command, err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def _fail(command: str, message: object, code: int) -> int:
    print(f"dmat {command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
