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
    "fetch": ("dmat.stages.fetch",
              "Find the real data (source auto: data.path when it exists, else torchvision's download into "
              "data.download_dir, once) and record which -> data/source.json (kind, path, sha256 per split)."),
    "prepare": ("dmat.stages.prepare",
                "Real data -> data/real/{train,val,test,heldout} canonical stores, split and subset as params.yaml's "
                "`data` section says (source: auto, imagefolder, npz or torchvision)."),
    "train-reference": ("dmat.stages.train_reference",
                        "Standard (non-adversarial) training of the reference classifier on data/real/train only: "
                        "the fixed yardstick of generated data and the scorer of generate's filter -> "
                        "models/reference/{best,last}.pt, metrics/train_reference.json (clean accuracy on all of "
                        "data/real/test), plots/train_reference_curves.csv. Resumes after a kill; runs under "
                        "torchrun."),
    "train-diffusion": ("dmat.stages.train_diffusion",
                        "Train the class-conditional EDM denoiser on data/real/train, with adversarial training of "
                        "the diffusion model (mode none | random | adversarial | invariance) -> "
                        "models/diffusion/checkpoint.pt, metrics/train_diffusion.json. Resumes after a kill; runs "
                        "under torchrun for several processes."),
    "generate": ("dmat.stages.generate",
                 "Sample generate.per_class images per class from the EMA denoiser -> data/synthetic (canonical "
                 "store, byte-identical on one machine for any batch size or number of torchrun processes), "
                 "metrics/generate.json, plots/generate_grid.png."),
    "mix": ("dmat.stages.mix",
            "Choose the generated (or, mix.source heldout_real, held-out real) images the classifier may use and "
            "their share of every batch -> data/mixed/ (manifest with both stores' paths and sha256 digests, and the "
            "chosen rows)."),
    "evaluate": ("dmat.stages.evaluate",
                 "Robustness of the best EMA classifier: clean accuracy, AutoAttack, a PGD eps sweep and sanity "
                 "checks on the first evaluate.n test images, per threat model -> metrics/evaluate_<threat>.json, "
                 "plots/evaluate_<threat>_sweep.csv, models/eval/<threat>/ (adversarial examples, RobustBench "
                 "record)."),
    "train": ("dmat.stages.train",
              "Adversarial training (TRADES or PGD-AT) of the classifier on mixed real/generated batches -> "
              "models/classifier/{best,last}.pt, metrics/train.json, plots/train_curves.csv. Resumes after a kill; "
              "runs under torchrun for several processes."),
    "evaluate-diffusion": ("dmat.stages.evaluate_diffusion",
                           "Evaluate the diffusion model: denoiser error and output change under random and "
                           "adversarial perturbations in a fixed AT box at several noise levels; sample quality of "
                           "data/synthetic under the reference classifier (conditional accuracy, Frechet distance, "
                           "k-NN precision and recall in its features, memorisation of data/real/train) next to "
                           "held-out real images (FID with local Inception weights only) -> "
                           "metrics/evaluate_diffusion.json."),
    "export": ("dmat.stages.export",
               "Export the best EMA classifier (ONNX with provenance metadata, torch.export .pt2) and the EMA "
               "denoiser (ONNX) -> models/export/."),
    "verify": ("dmat.stages.verify",
               "Deployment-side checks of models/export (ONNX checker, contract, parity, robustness after export, "
               "Square on onnxruntime, latency, denoiser parity) -> metrics/verify.json; registers the model in "
               "MLflow when every gate passes. Exits 1 naming the failed gate."),
}

# Stage arguments besides --params (passed to the stage's run() as keyword arguments).
STAGE_OPTIONS: dict[str, dict[str, dict]] = {
    "evaluate": {"--threat": {"metavar": "NAME", "help": "evaluate only this entry of evaluate.threats "
                                                         "(dvc.yaml runs one stage per entry); default: all"}},
}

# Commands that are not pipeline stages: subcommand -> module with configure(parser) and run(args) -> exit code.
# Each module parses its own arguments; the serving command must work where torch is not installed.
TOOLS: dict[str, tuple[str, str]] = {
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
    for name, (module, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        sub.add_argument("--params", default="params.yaml", metavar="FILE",
                         help="params file to read (default: params.yaml in the working directory)")
        for flag, options in STAGE_OPTIONS.get(name, {}).items():
            sub.add_argument(flag, **options)
        sub.set_defaults(stage_module=module)
    for name, (module, help_text) in TOOLS.items():
        sub = commands.add_parser(name, help=help_text.split(" -> ")[0], description=help_text)
        importlib.import_module(module).configure(sub)
        sub.set_defaults(tool_module=module)
    return parser


def run_stage(module_name: str, params_file: str, argv: Sequence[str] = (), **options: object) -> None:
    """Run a stage; a stage that runs under torchrun (its module's TORCHRUN) and `base.nproc` > 1 re-executes
    `dmat ARGV` under torchrun instead."""
    from dmat.config import load_params
    from dmat.stage_setup import apply_base

    params = load_params(params_file)  # validated before anything is imported or written
    apply_base(params.base)
    module = importlib.import_module(module_name)
    if getattr(module, "TORCHRUN", False):
        from dmat.distributed import relaunch_under_torchrun

        relaunch_under_torchrun(params.base, argv)
    module.run(params, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tool_module", None):
        return importlib.import_module(args.tool_module).run(args)
    from dmat.config import ParamsError
    from dmat.errors import USER_ERRORS

    try:
        options = {flag.lstrip("-"): getattr(args, flag.lstrip("-")) for flag in STAGE_OPTIONS.get(args.command, {})}
        run_stage(args.stage_module, args.params, sys.argv[1:] if argv is None else argv, **options)
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
