"""`dmat robustness`: evaluate any classifier on a canonical store, outside the pipeline.

MODEL is a DMAT classifier checkpoint (.pt), a `torch.export` program (.pt2) of any classifier
that maps float32 NCHW images in [0, 1] to logits, or an ONNX file. An ONNX model runs in an
onnxruntime session, which has no gradients: only the gradient-free Square attack runs, and the
JSON says so (`gradient_free_only: true`).

Under `torchrun --nproc_per_node=N dmat robustness ...` the points are spread over N processes in
whole batches, each batch seeded by its global index: the report equals a single-process run's with
the same batch size (and threads per process); rank 0 writes it. Evaluation is always float32.

Exit codes: 0 success (the JSON's `sanity_passed` and `flags` say how much to trust the number),
1 a model or data file that cannot be used, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

NORMS = ("Linf", "L2", "L1")
VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
LARGE_EPS = {"Linf": 0.5, "L2": 20.0}  # where any honest evaluation falls to chance


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="DMAT checkpoint (.pt), torch.export program (.pt2) or .onnx")
    parser.add_argument("--data", required=True, metavar="DIR", help="canonical store (e.g. data/real/test)")
    # --points: the same under torchrun, whose own argument parser mistakes --n for an abbreviation of its options.
    parser.add_argument("--n", "--points", dest="n", type=_positive_int, default=None,
                        help="evaluate the first N points (default: all)")
    parser.add_argument("--norm", choices=NORMS, default="Linf")
    parser.add_argument("--eps", type=_eps, required=True, help="radius of the threat model; fractions like 8/255")
    parser.add_argument("--version", choices=VERSIONS, default="standard", help="AutoAttack version")
    parser.add_argument("--attacks", type=_attack_list, default=None,
                        help=f"comma-separated, version custom only: {','.join(ATTACKS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=250)
    parser.add_argument("--square-queries", type=_positive_int, default=None,
                        help="Square's query budget (default: AutoAttack's 5000)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", dest="json_out", metavar="OUT", default=None,
                        help="write the report here (default: print it)")


def run(args: argparse.Namespace) -> int:
    if (args.version == "custom") != (args.attacks is not None):
        return _fail("--attacks goes with --version custom, and only with it", 2)
    import torch

    from dmat.core.robustness import ContractError, EvaluationSettings, Shard, evaluate_robustness
    from dmat.data.store import ArrayStore
    from dmat.data.tensors import first_points
    from dmat.distributed import all_gather_object, world
    from dmat.errors import CheckpointError, StoreError
    from dmat.files import write_json
    from dmat.stage_setup import resolve_device

    started = time.perf_counter()
    try:
        device = resolve_device(args.device)
        store = ArrayStore.open(args.data)
        x, y = first_points(store, args.n)
        with world(device) as w:
            model, kind = load_model(Path(args.model), w.device)
            settings = EvaluationSettings(
                norm=args.norm, eps=args.eps, version=args.version, attacks=args.attacks, seed=args.seed,
                batch_size=args.batch_size, device=w.device, square_queries=args.square_queries,
                sweep=(args.eps / 2, args.eps * 2), large_eps=LARGE_EPS.get(args.norm), gradient_free=kind == "onnx")
            torch.manual_seed(args.seed)
            progress = (lambda line: print(f"  {line}", file=sys.stderr, flush=True)) if w.is_main else None
            report, _ = evaluate_robustness(model, x, y, store.classes, settings, progress=progress,
                                            shard=Shard(w.rank, w.size, functools.partial(all_gather_object, w)))
    except (StoreError, CheckpointError, ContractError, ModelFileError) as err:
        return _fail(str(err), 1)
    except ValueError as err:  # e.g. --device cuda without a GPU
        return _fail(str(err), 2)
    if not w.is_main:
        return 0
    report = {"clean_acc": report.pop("clean_acc"), "robust_acc": report.pop("robust_acc"), **report,  # headline first
              "settings": {"model": str(args.model), "model_kind": kind, "data": str(args.data), "processes": w.size,
                           "data_sha256": store.digest, "norm": args.norm, "eps": args.eps, "version": args.version,
                           "attacks": args.attacks, "seed": args.seed, "batch_size": args.batch_size,
                           "square_queries": args.square_queries, "device": device},
              "seconds": time.perf_counter() - started}
    _emit(report, args.json_out, write_json)
    return 0


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message names it."""


def load_model(path: Path, device: str):
    """(callable model, kind) for a DMAT checkpoint, a torch.export program or an ONNX file."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.suffix == ".onnx":
        from dmat.artifacts.onnx_classifier import OnnxClassifier

        try:
            return OnnxClassifier(path), "onnx"
        except ValueError as err:
            raise ModelFileError(str(err)) from None
    if path.suffix == ".pt2":
        import torch

        try:
            program = torch.export.load(str(path))
        except Exception as err:  # torch raises many types for a damaged archive
            raise ModelFileError(f"{path}: not a loadable torch.export program ({type(err).__name__}: {err})") from None
        return program.module().to(device), "torch.export"
    from dmat.artifacts.loaders import load_classifier

    return load_classifier(path, device)[0], "dmat-checkpoint"


def _emit(report: dict, out: str | None, write_json) -> None:
    import json

    if out:
        write_json(out, report)
        print(f"robustness: clean {report['clean_acc']:.4f} robust {report['robust_acc']:.4f} "
              f"(n={report['n']}) -> {out}", file=sys.stderr)
    else:
        print(json.dumps(report, indent=2, sort_keys=True))


def _fail(message: str, code: int) -> int:
    print(f"dmat robustness: error: {message}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: expected an integer >= 1")
    return value


def _eps(text: str) -> float:
    from dmat.config import to_float

    value = to_float(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected a number >= 0 (fractions like 8/255)")
    return value


def _attack_list(text: str) -> tuple[str, ...]:
    attacks = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected a comma-separated list of "
                                         f"{', '.join(ATTACKS)}")
    return attacks
