"""`dmat import CHECKPOINT`: a robust checkpoint of the reference implementation as a DMAT classifier checkpoint.

CHECKPOINT is a file saved by the trainer of Wang et al. 2023 (github.com/wzekai99/DM-Improves-AT), such as
the WRN-28-10 and WRN-70-16 checkpoints published there: `{"model_state_dict": ...}` of its WideResNet with
Swish, with or without the DataParallel and Sequential prefixes its trainer adds (docs/published.md lists the
layout). The weights are mapped onto DMAT's registry network of the same architecture, which computes the
same function, so the logits are identical. Anything else is refused, naming the keys or shapes that do not
match. The output is a DMAT classifier checkpoint (what `dmat robustness`, generate's `filter_scorer` and the
pipeline's later stages read) whose `imported` record holds the source file's path, size, sha256 and key
layout.

`--onnx FILE` also exports the classifier with the `export` stage's exporter (same contract; the imported
lineage in its `dmat.*` metadata) and runs the deployment checks of `verify` that need no pipeline run:
ONNX checker, the runtime's opset and IR limits, the input/output contract, and parity with PyTorch on the
first images of the `--classes-from` store (seeded uniform noise without one). `dmat serve FILE` serves it.

Exit codes: 0 imported (and exported); 1 a file that cannot be used or a failed check (named); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

DATASETS = ("cifar10", "cifar100", "svhn")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
# Label order of the reference's datasets (torchvision's); CIFAR-100's names come from --classes-from, else
# indices, as the reference itself names them.
CLASS_NAMES = {"cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
               "svhn": tuple("0123456789")}
DEFAULT_EPS = {"Linf": "8/255", "L2": "128/255"}  # the reference's threat models
IMAGE_SHAPE = (32, 32, 3)  # H, W, C: the reference's WideResNets pool an 8×8 map, i.e. take 32×32 inputs
PARITY_BATCHES = (1, 7, 64)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the reference's checkpoint file (.pt)")
    parser.add_argument("--arch", required=True, type=_architecture, metavar="wrn-DEPTH-WIDTH",
                        help="its WideResNet, e.g. wrn-28-10 or wrn-70-16 (the reference's names with -swish work "
                             "too); a registry entry of dmat.core.classifiers")
    parser.add_argument("--activation", choices=("swish",), default="swish",
                        help="swish (SiLU), the only one: the reference's ReLU WideResNet is another network")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="what it was trained on: picks the normalisation constants inside the network")
    parser.add_argument("--classes", type=int, default=None, help="number of classes (default: the dataset's)")
    parser.add_argument("--classes-from", metavar="STORE", default=None,
                        help="a canonical store (e.g. data/real/test) whose class names the checkpoint takes (default: "
                             "torchvision's names for cifar10, digits for svhn, indices for cifar100)")
    parser.add_argument("--norm", choices=tuple(DEFAULT_EPS), default="Linf",
                        help="the threat model it was trained for")
    parser.add_argument("--eps", default=None,
                        help="its radius; fractions like 8/255 (default: 8/255 Linf, 128/255 L2)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="the DMAT checkpoint to write (default: models/imported/<CHECKPOINT's name>.pt)")
    parser.add_argument("--onnx", metavar="FILE", default=None,
                        help="also export it as ONNX here, and check the export")
    parser.add_argument("--parity-atol", type=float, default=1e-4,
                        help="max |logit difference| onnxruntime vs PyTorch (verify's default)")


def run(args: argparse.Namespace) -> int:
    from dmat.config import to_float
    from dmat.core.classifiers import CLASSIFIERS
    from dmat.errors import USER_ERRORS

    if args.arch not in CLASSIFIERS:
        wide = ", ".join(name for name in CLASSIFIERS if name.startswith("wrn-"))
        return _fail(f"--arch {args.arch} is not allowed: expected a WideResNet of DMAT's registry ({wide})", 2)
    eps = to_float(args.eps or DEFAULT_EPS[args.norm])
    if eps is None or eps < 0:
        return _fail(f"--eps {args.eps!r} is not allowed: expected a number >= 0 (fractions like 8/255)", 2)
    if args.classes is not None and args.classes < 2:
        return _fail(f"--classes {args.classes} is not allowed: expected an integer >= 2", 2)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else Path("models/imported") / f"{source.stem}.pt"
    try:
        classes = class_names(args.dataset, args.classes, args.classes_from)
        summary = import_checkpoint(source, out, args.arch, args.dataset, classes, {"norm": args.norm, "eps": eps})
        if args.onnx:
            summary["onnx"] = export_onnx(out, Path(args.onnx), args.classes_from, args.parity_atol)
    except USER_ERRORS as err:
        return _fail(str(err), 1)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def class_names(dataset: str, count: int | None, store_path: str | None) -> tuple[str, ...]:
    """The checkpoint's class names: the store's, else the dataset's; checked against --classes."""
    from dmat.data.store import ArrayStore
    from dmat.errors import DataError

    count = count or NUM_CLASSES[dataset]
    if store_path is None:
        names = CLASS_NAMES.get(dataset, tuple(str(i) for i in range(count)))
    else:
        store = ArrayStore.open(store_path)
        if store.image_shape != IMAGE_SHAPE:
            raise DataError(f"{store_path}: images are {store.image_shape} (H, W, C); the reference's WideResNets take "
                            f"{IMAGE_SHAPE}")
        names = store.classes
    if len(names) != count:
        raise DataError(f"{store_path or dataset}: {len(names)} classes, but the checkpoint is to have {count} "
                        "(--classes)")
    return tuple(names)


def import_checkpoint(source: Path, out: Path, arch: str, dataset: str, classes: tuple[str, ...],
                      threat: dict[str, Any]) -> dict[str, Any]:
    """Load the reference's checkpoint into DMAT's `arch`, write it as a DMAT classifier checkpoint at `out`, and
    check that the written file gives the very logits of the loaded network."""
    import torch

    from dmat.artifacts import layout
    from dmat.artifacts.loaders import load_classifier
    from dmat.artifacts.records import ClassifierConfig, ImportedClassifierHeader, Threat, checkpoint_contents
    from dmat.checkpoint import load_checkpoint, save_checkpoint
    from dmat.core.classifiers import DATASET_STATS, build_classifier
    from dmat.core.reference_layout import REFERENCE_INPUT_NORMALIZATION, LayoutMismatch, load_reference_weights
    from dmat.errors import CheckpointError
    from dmat.files import sha256_file

    state = load_checkpoint(source)  # weights_only=True; names the file when it is not a checkpoint
    weights = reference_state_dict(source, state)
    mean, std = DATASET_STATS[dataset]
    model = build_classifier(arch, num_classes=len(classes), mean=mean, std=std)
    try:
        found = load_reference_weights(model, weights, REFERENCE_INPUT_NORMALIZATION[dataset])
    except LayoutMismatch as err:
        raise CheckpointError(f"{source}: not the reference's {arch}-swish with {len(classes)} classes: "
                              f"{err}") from None
    model.eval()
    record = {"path": str(source), "sha256": sha256_file(source), "size": source.stat().st_size,
              "origin": "DM-Improves-AT (Wang et al. 2023), wideresnetwithswish", "architecture": f"{arch}-swish",
              "dataset": dataset, "top_level_keys": sorted(state), "tensors": len(weights),
              "key_prefix": found.prefix, "data_parallel": found.data_parallel,
              "sequential_index": found.sequential_index, "input_normalization_folded": found.input_normalization}
    normalisation = model.normalize
    header = ImportedClassifierHeader(
        format=layout.CLASSIFIER_FORMAT, epoch=None,
        model_config=ClassifierConfig(name=arch, num_classes=len(classes),
                                      mean=tuple(normalisation.mean.flatten().tolist()),
                                      std=tuple(normalisation.std.flatten().tolist()), dataset=dataset,
                                      input_shape=tuple(IMAGE_SHAPE)),
        classes=tuple(classes), threat=Threat(**threat), mlflow_run_id=None, history=(), train_config={},
        imported=record)
    save_checkpoint(out, checkpoint_contents(header, {"ema": model.state_dict()}))
    probe = torch.rand(4, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(load_classifier(out)[0](probe), model(probe))
    if not same:
        out.unlink()
        raise CheckpointError(f"{out}: the written checkpoint does not reproduce the imported network's logits")
    print(f"import: {source} ({record['key_prefix'] or 'no prefix'}, {record['tensors']} tensors) -> {out}",
          file=sys.stderr)
    return {"checkpoint": str(out), "sha256": sha256_file(out), "imported": record}


def reference_state_dict(source: Path, state: dict) -> dict:
    """The network's weights in a checkpoint of the reference's trainer: `model_state_dict` (the weight average
    its evaluation uses), or the file itself when it is a bare state dict."""
    import torch

    from dmat.errors import CheckpointError

    weights = state.get("model_state_dict", state)
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{source}: no 'model_state_dict' of tensors (top-level keys: "
                              f"{', '.join(map(str, sorted(state)[:8]))}): not a checkpoint of the reference's trainer")
    return weights


def export_onnx(checkpoint: Path, path: Path, store_path: str | None, atol: float) -> dict[str, Any]:
    """The imported classifier as ONNX (the export stage's exporter), written only when verify's checks pass."""
    import torch

    from dmat.artifacts.loaders import load_classifier
    from dmat.artifacts.onnx_checks import contract_gate, onnx_checker_gate, parity_gate, runtime_versions_gate
    from dmat.artifacts.onnx_classifier import OnnxClassifier
    from dmat.artifacts.onnx_export import EXAMPLE_BATCH, export_classifier_onnx
    from dmat.data.store import ArrayStore
    from dmat.data.tensors import first_points
    from dmat.errors import GateFailed
    from dmat.files import atomic_path, sha256_file
    from dmat.onnx_contract import INPUT_NAME, encode_metadata

    model, state = load_classifier(checkpoint)
    height, width, channels = state.model_config.input_shape
    info = {"classes": list(state.classes),
            "input": {"name": INPUT_NAME, "shape": [channels, height, width], "dtype": "float32", "range": [0, 1],
                      "layout": "NCHW"},
            "threat": {"name": "imported", "norm": state.threat.norm, "eps": state.threat.eps},
            "lineage": {"imported": state.imported, "checkpoint_sha256": sha256_file(checkpoint)}}
    count = max(PARITY_BATCHES)
    if store_path:
        x = first_points(ArrayStore.open(store_path), count)[0]
    else:
        x = torch.rand(count, channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), atomic_path(path) as tmp:
        export_classifier_onnx(model, x[:EXAMPLE_BATCH], tmp, encode_metadata(info))
        onnx_model = OnnxClassifier(tmp)
        gates = {"onnx_checker": onnx_checker_gate([tmp]), "runtime_versions": runtime_versions_gate([tmp]),
                 "contract": contract_gate(onnx_model.session, info["input"]["shape"], len(info["classes"])),
                 "parity": parity_gate(onnx_model, model, x, PARITY_BATCHES, atol)}
        failed = [name for name, gate in gates.items() if not gate["passed"]]
        if failed:
            raise GateFailed(f"{path}: export check(s) failed: {', '.join(failed)} "
                             f"({json.dumps({name: gates[name] for name in failed}, default=str)[:600]})")
    print(f"import: exported {path}; onnx checker, runtime versions, contract and parity passed (max |logit "
          f"difference| {max(b['max_abs_diff'] for b in gates['parity']['batches'].values()):.2e})", file=sys.stderr)
    return {"path": str(path), "sha256": sha256_file(path), "gates": gates,
            "parity_inputs": f"first {len(x)} images of {store_path}" if store_path else "seeded uniform noise"}


def _architecture(text: str) -> str:
    name = text.removesuffix("-swish")
    if not re.fullmatch(r"wrn-\d+-\d+", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected wrn-DEPTH-WIDTH (e.g. wrn-28-10, "
                                         "wrn-70-16)")
    return name


def _fail(message: str, code: int) -> int:
    print(f"dmat import: error: {message}", file=sys.stderr)
    return code
