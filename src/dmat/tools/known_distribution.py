"""`dmat known-distribution`: the known-distribution benchmark, a pipeline of its own.

    dmat known-distribution train --truth NAME       a stage of experiments/known-distribution/dvc.yaml
    dmat known-distribution evaluate --truth NAME    a stage of experiments/known-distribution/dvc.yaml
    dmat known-distribution report --grid GRID       the grid's runs, from MLflow, as per-seed and summary tables

The stages read `params.yaml` of the working directory (DVC runs them in experiments/known-distribution) as
the benchmark's schema (dmat.known_distribution_config) and exit as `dmat <stage>` does: 0 success; 1 bad
data, a missing or foreign model, or a tracking failure; 2 bad params or usage, before anything is written;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STAGES = {
    "train": ("dmat.stages.known_distribution.train",
              "Draw the truth's training set under the data condition and train the denoiser (AT mode "
              "train.adversarial.mode) -> models/<truth>/denoiser.pt, data/<truth>/train.npz, "
              "metrics/train_<truth>.json."),
    "evaluate": ("dmat.stages.known_distribution.evaluate",
                 "The exact measures of the trained denoiser against the truth -> metrics/evaluate_<truth>.json, "
                 "plots/<truth>/ (error per noise level, samples), data/<truth>/samples.npz."),
}


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="kd_command", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        sub.add_argument("--truth", required=True, metavar="NAME", help="an entry of the params file's `truths`")
        sub.add_argument("--params", default="params.yaml", metavar="FILE",
                         help="params file (default: params.yaml of the working directory, as DVC runs the stage)")
    report_module = _report_module()
    report = commands.add_parser("report", help="per-seed and summary tables of a grid's runs",
                                 description=report_module.__doc__.split("\n\n")[0])
    report_module.configure(report)


def _report_module():
    # Imported by name, as the CLI imports tools: the stages do not run the report, so it is no code dependency
    # of theirs (a change to it must not make DVC retrain every model).
    return importlib.import_module("dmat.tools.known_distribution_report")


def run(args: argparse.Namespace) -> int:
    if args.kd_command == "report":
        return _report_module().run(args)
    from dmat.config import ParamsError
    from dmat.errors import USER_ERRORS

    try:
        run_stage(STAGES[args.kd_command][0], args.params, args.truth)
    except ParamsError as err:
        return _fail(args.kd_command, err, EXIT_USAGE)
    except USER_ERRORS as err:
        return _fail(args.kd_command, err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args.kd_command, "interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def run_stage(module_name: str, params_file: str, truth: str) -> None:
    from dmat.config import load_params
    from dmat.known_distribution_config import KnownDistributionParams
    from dmat.stage_setup import apply_base

    params = load_params(params_file, KnownDistributionParams)  # validated before anything is imported or written
    params.truth(truth)
    apply_base(params.base)
    importlib.import_module(module_name).run(params, truth)


def _fail(command: str, message: object, code: int) -> int:
    print(f"dmat known-distribution {command}: error: {message}", file=sys.stderr)
    return code
