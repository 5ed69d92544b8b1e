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

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# subcommand -> (stage module with run(params), help text)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("dmat.stages.prepare",
                "Real data -> data/real/{train,val,test} canonical stores, split and subset as params.yaml's "
                "`data` section says (source: torchvision, imagefolder or npz)."),
    "train-diffusion": ("dmat.stages.train_diffusion",
                        "Train the class-conditional EDM denoiser on data/real/train, with adversarial training of "
                        "the diffusion model (mode none | random | adversarial | invariance) -> "
                        "models/diffusion/checkpoint.pt, metrics/train_diffusion.json. Resumes after a kill; runs "
                        "under torchrun for several processes."),
    "generate": ("dmat.stages.generate",
                 "Sample generate.per_class images per class from the EMA denoiser -> data/synthetic (canonical "
                 "store, byte-identical for any batch size or number of torchrun processes), metrics/generate.json, "
                 "plots/generate_grid.png."),
    "mix": ("dmat.stages.mix",
            "Choose the generated images the classifier may use and their share of every batch -> data/mixed/ "
            "(manifest with both stores' sha256 digests, and the chosen rows)."),
    "train": ("dmat.stages.train",
              "Adversarial training (TRADES or PGD-AT) of the classifier on mixed real/generated batches -> "
              "models/classifier/{best,last}.pt, metrics/train.json, plots/train_curves.csv. Resumes after a kill; "
              "runs under torchrun for several processes."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmat",
        description="DMAT pipeline stages. Each reads params.yaml from the working directory and writes "
                    "exactly the outputs its dvc.yaml stage declares; `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"dmat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        sub.add_argument("--params", default="params.yaml", metavar="FILE",
                         help="params file to read (default: params.yaml in the working directory)")
        sub.set_defaults(stage_module=module)
    return parser


def run_stage(module_name: str, params_file: str) -> None:
    from dmat.config import load_params
    from dmat.runtime import apply_base

    params = load_params(params_file)  # validated before anything is imported or written
    apply_base(params.base)
    importlib.import_module(module_name).run(params)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dmat.checkpoint import CheckpointError
    from dmat.config import ParamsError
    from dmat.data.sources import DataError
    from dmat.data.store import StoreError
    from dmat.tracking import TrackingError

    try:
        run_stage(args.stage_module, args.params)
    except ParamsError as err:
        return _fail(args.command, err, EXIT_USAGE)
    except (DataError, StoreError, CheckpointError, TrackingError) as err:
        return _fail(args.command, err, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", EXIT_INTERRUPTED)
    return EXIT_OK


def _fail(command: str, message: object, code: int) -> int:
    print(f"dmat {command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
