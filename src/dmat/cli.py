"""The `dmat` command: one subcommand per DVC stage. Argument parsing and exit codes only.

Exit codes: 0 success; 1 bad data, a broken store or checkpoint, or a tracking failure (the
message names it); 2 bad params or usage (before anything is written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dmat import __version__
from dmat.pipeline import commands

# subcommand -> the stage it runs (module, help), from the stage declarations of dmat.pipeline
STAGES = commands()

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Commands that are not pipeline stages: subcommand -> module with configure(parser) and run(args) -> exit code.
# Each module parses its own arguments; the serving command must work where torch is not installed.
TOOLS: dict[str, tuple[str, str]] = {
    "import": ("dmat.tools.import_checkpoint",
               "Import a robust checkpoint published by the reference implementation (DM-Improves-AT's WideResNet "
               "with Swish, any wrapper prefixes) into a DMAT classifier checkpoint with identical logits and a "
               "lineage record of the source file; optionally export and check ONNX -> a .pt (and .onnx)."),
    "robustness": ("dmat.tools.robustness",
                   "Evaluate any classifier (DMAT checkpoint, torch.export .pt2, or .onnx with Square only) on a "
                   "canonical store with AutoAttack -> a JSON report."),
    "serve": ("dmat.deploy.serve",
              "Serve an ONNX classifier (a .onnx path or models:/name@alias) over HTTP on 127.0.0.1."),
    "lineage": ("dmat.tools.lineage",
                "Print the chain of stages, runs and files that produced an artifact, each link checked."),
    "compare": ("dmat.tools.compare",
                "Pipeline variants side by side from MLflow: accuracy mean ± std over seeds, pooled 95% intervals, "
                "the paired exact McNemar p-value against a baseline, generated-data metrics -> a Markdown/CSV/PNG "
                "table."),
    "queue": ("dmat.tools.queue",
              "Queue an experiment grid (a profile, its variants, the seeds) as DVC experiments, one per variant and "
              "seed; `dmat compare --grid` reads them back."),
    "precision": ("dmat.tools.precision",
                  "Show or clear the precision decisions this machine keeps for base.precision auto (one per "
                  "stage, network and batch): `dmat precision show`, `dmat precision clear [KEY ...]`."),
    "pipeline": ("dmat.tools.pipeline",
                 "Render dvc.yaml and the README's stage table from the stage declarations (src/dmat/pipeline.py): "
                 "`dmat pipeline render`, `check`, `show`."),
    "ui": ("dmat.tools.ui",
           "Start the MLflow UI on the project's tracking store and print the links to its pipeline runs (one row per "
           "pipeline execution with its variant and headline metrics) and to the same rows grouped by variant."),
    "params": ("dmat.tools.params",
               "Validate a params file without running a stage: `dmat params check [FILE]` (exit 0 valid, 2 not)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmat",
        description="DMAT pipeline stages. Each reads params.yaml from the working directory and writes "
                    "exactly the outputs its dvc.yaml stage declares; `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"dmat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in STAGES.items():
        sub = commands.add_parser(name, help=command.help.split(" -> ")[0], description=command.help)
        sub.add_argument("--params", default="params.yaml", metavar="FILE",
                         help="params file to read (default: params.yaml in the working directory)")
        for flag, options in command.options.items():
            sub.add_argument(flag, **options)
        sub.set_defaults(stage_module=command.module)
    for name, (module, help_text) in TOOLS.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        importlib.import_module(module).configure(sub)
        sub.set_defaults(tool_module=module)
    return parser


def run_stage(module_name: str, params_file: str, **options: object) -> None:
    from dmat.config import load_params
    from dmat.stage_setup import apply_base

    params = load_params(params_file)  # validated before anything is imported or written
    apply_base(params.base)
    importlib.import_module(module_name).run(params, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tool_module", None):
        return importlib.import_module(args.tool_module).run(args)
    from dmat.audit import install
    from dmat.config import ParamsError
    from dmat.errors import USER_ERRORS

    install(args.command)  # DMAT_AUDIT set: record the project files the stage opens (tests)

    try:
        options = {flag.lstrip("-"): getattr(args, flag.lstrip("-")) for flag in STAGES[args.command].options}
        run_stage(args.stage_module, args.params, **options)
    except ParamsError as err:
        return _fail(args.command, err, EXIT_USAGE)
    except USER_ERRORS as err:
        return _fail(args.command, err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def _fail(command: str, message: object, code: int) -> int:
    print(f"dmat {command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
