"""`dmat known-distribution`: the known-distribution benchmark, a pipeline of its own.

    dmat known-distribution run [--truth NAME ...]   train, then evaluate, every truth: the stage of
                                                     experiments/known-distribution/dvc.yaml
    dmat known-distribution train --truth NAME       one truth's training alone
    dmat known-distribution evaluate --truth NAME    one truth's evaluation alone
    dmat known-distribution report --grid GRID       the grid's runs, from MLflow, as per-seed and summary tables

`run` does in one process what `train` and `evaluate` do per truth, each still its own MLflow stage run: a run
of the benchmark computes for under a minute, and every process it starts pays several seconds to import torch
and MLflow and open the tracking store (docs/known-distribution.md, "How long the grid took").

The commands read `params.yaml` of the working directory (DVC runs them in experiments/known-distribution) as
the benchmark's schema (dmat.known_distribution_config) and exit as `dmat <stage>` does: 0 success; 1 bad
data, a missing or foreign model, or a tracking failure; 2 bad params or usage, before anything is written;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmat.known_distribution_config import KnownDistributionParams

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


RUN_HELP = ("Train, then evaluate, every truth of the params file (or those --truth names), in one process: the "
            "stage of experiments/known-distribution/dvc.yaml -> what train and evaluate write, for each truth.")


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="kd_command", required=True, metavar="STAGE")
    run_all = commands.add_parser("run", help=RUN_HELP.split(" -> ")[0], description=RUN_HELP)
    run_all.add_argument("--truth", action="append", metavar="NAME",
                         help="only this entry of the params file's `truths` (repeatable; default: all)")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        sub.add_argument("--truth", required=True, metavar="NAME", help="an entry of the params file's `truths`")
    for sub in (run_all, *(commands.choices[name] for name in STAGES)):
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
        if args.kd_command == "run":
            run_truths(args.params, args.truth)
        else:
            run_stage(STAGES[args.kd_command][0], args.params, args.truth)
    except ParamsError as err:
        return _fail(args.kd_command, err, EXIT_USAGE)
    except USER_ERRORS as err:
        return _fail(args.kd_command, err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args.kd_command, "interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def run_stage(module_name: str, params_file: str, truth: str) -> None:
    params = _load(params_file, [truth])
    importlib.import_module(module_name).run(params, truth)


def run_truths(params_file: str, truths: list[str] | None) -> None:
    """Each truth trained, then evaluated (both stages seed torch themselves: the same numbers as separate runs)."""
    params = _load(params_file, truths)
    for truth in truths or list(params.truths):
        for module_name, _ in STAGES.values():
            importlib.import_module(module_name).run(params, truth)


def _load(params_file: str, truths: list[str] | None) -> KnownDistributionParams:
    from dmat.config import load_params
    from dmat.known_distribution_config import KnownDistributionParams
    from dmat.stage_setup import apply_base

    params = load_params(params_file, KnownDistributionParams)  # validated before anything is imported or written
    for truth in truths or []:
        params.truth(truth)
    apply_base(params.base)
    return params


def _fail(command: str, message: object, code: int) -> int:
    print(f"dmat known-distribution {command}: error: {message}", file=sys.stderr)
    return code
