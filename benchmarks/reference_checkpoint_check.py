"""`dmat import` checked against the reference implementation's own code: logits equal to 1e-5.

Not a test (it needs the reference's source, which is not part of DMAT) and not a timing: a check to rerun
when the import or the networks change. It extracts the `core/` package of a snapshot of
github.com/wzekai99/DM-Improves-AT into a temporary directory (never into this repository), builds each
network with the reference's own `create_model` (as its trainer does: `DataParallel(Sequential(network))`,
or `DataParallel(Sequential(Normalization, network))` with `--normalize`), gives every weight, BatchNorm
affine parameter and running statistic seeded random values (so that a swapped BatchNorm would show),
saves it as the reference's trainer saves (`torch.save({'model_state_dict': averaged, 'unaveraged_model_state_dict':
live}, path)`), imports the file with `dmat import` and compares the logits of the reference's network with
those of the imported DMAT checkpoint (loaded as every DMAT consumer loads it) on real CIFAR-10 test images
(the offline archive, read with DMAT's image-folder source). Prints one JSON line per configuration and exits 1
when any max |logit difference| exceeds the tolerance.

The reference's data package imports RandAugment (an augmentation library installed from git) when
`core.models` is imported; the check registers an empty stand-in module under that name, which no model code
uses.

Commands (the snapshot may be a clone or a bare mirror; `git archive` reads either):

    git clone https://github.com/wzekai99/DM-Improves-AT /tmp/DM-Improves-AT   # on a machine with a network
    PYTHONPATH=src .venv/bin/python -m benchmarks.reference_checkpoint_check --reference /tmp/DM-Improves-AT \\
        --data ../shared/data/cifar10-jpeg.tar.gz --n 100
    # add --quick to leave out WRN-70-16 (267M parameters: about a minute and 4 GB of memory on a CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from dmat.artifacts.loaders import load_classifier
from dmat.cli import main as dmat_main
from dmat.data.sources import open_source
from dmat.data.tensors import to_unit_tensor

# (reference model name, its data name, --normalize, classes); the reference's names and datasets
CONFIGURATIONS = (
    ("wrn-28-10-swish", "cifar10", False, 10),
    ("wrn-28-10-swish", "cifar10", True, 10),
    ("wrn-28-10-swish", "cifar100", False, 100),
    ("wrn-70-16-swish", "cifar10", False, 10),
)
TOLERANCE = 1e-5


def extract_reference(snapshot: Path, into: Path) -> Path:
    """The reference's `core/` package at the snapshot's HEAD, in `into`; returns the commit."""
    archive = subprocess.run(["git", "-C", str(snapshot), "archive", "HEAD", "core"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return subprocess.run(["git", "-C", str(snapshot), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def reference_modules(code: Path):
    """The reference's `create_model` and its dataset table, imported from the extracted code."""
    sys.modules.setdefault("RandAugment", types.SimpleNamespace(RandAugment=None))  # see the module docstring
    sys.path.insert(0, str(code))
    from core.data import get_data_info  # noqa: PLC0415 (the reference's code exists only at run time)
    from core.models import create_model  # noqa: PLC0415

    return create_model, get_data_info


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter and BatchNorm statistic (kept in ranges a trained net has)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype != torch.float32:
                continue  # num_batches_tracked
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.5)
            elif "batchnorm" in name and name.endswith("weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.1 if tensor.dim() == 1
                                                                                else (1.0 / fan_in) ** 0.5))


def test_images(archive: Path, n: int) -> torch.Tensor:
    """The first n images of the archive's test split (in archive order), as float32 NCHW in [0, 1]."""
    test = open_source("imagefolder", archive, name="cifar10")["test"]
    rows = np.sort(np.random.default_rng(0).choice(len(test.labels), size=n, replace=False))
    images = np.stack([image for _, image in test.read(rows)])
    return to_unit_tensor(images, "cpu")


def check(create_model, get_data_info, name: str, data: str, normalize: bool, classes: int, x: torch.Tensor,
          workdir: Path, seed: int) -> dict:
    info = get_data_info(f"/nonexistent/{data}")  # the reference reads the dataset from the folder's name
    info["num_classes"] = classes
    reference = create_model(name, normalize, info, "cpu")  # DataParallel(Sequential([Normalization,] network))
    randomise(reference, seed)
    reference.eval()
    source = workdir / f"{name}-{data}-{'normalize' if normalize else 'plain'}.pt"
    state = reference.state_dict()
    torch.save({"model_state_dict": state, "unaveraged_model_state_dict": state}, source)  # as its trainer saves
    out = workdir / f"{source.stem}-dmat.pt"
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON summary; the check prints its own
        code = dmat_main(["import", str(source), "--arch", name, "--dataset", data, "--classes", str(classes),
                          "--out", str(out)])
    seconds = time.perf_counter() - started
    if code != 0:
        return {"model": name, "data": data, "normalize": normalize, "passed": False, "exit_code": code}
    imported, _ = load_classifier(out)
    with torch.no_grad():
        theirs, ours = reference(x), imported(x)
    difference = float((theirs - ours).abs().max())
    return {"model": name, "data": data, "normalize": normalize, "classes": classes, "images": len(x),
            "keys_example": next(iter(state)), "max_abs_logit_difference": difference,
            "max_abs_logit": float(theirs.abs().max()),
            "same_predictions": bool((theirs.argmax(1) == ours.argmax(1)).all()),
            "import_seconds": round(seconds, 1), "passed": difference <= TOLERANCE}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_checkpoint_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a clone or bare mirror of DM-Improves-AT")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"),
                        help="CIFAR-10 image folder or archive (train/<class>/, test/<class>/)")
    parser.add_argument("--n", type=int, default=100, help="test images compared")
    parser.add_argument("--quick", action="store_true", help="leave out WRN-70-16")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = test_images(args.data, args.n)
    results = []
    with tempfile.TemporaryDirectory(prefix="dmat-reference-check-") as tmp:
        commit = extract_reference(args.reference, Path(tmp) / "code")
        create_model, get_data_info = reference_modules(Path(tmp) / "code")
        for seed, (name, data, normalize, classes) in enumerate(CONFIGURATIONS):
            if args.quick and name.startswith("wrn-70-16"):
                continue
            result = {"reference_commit": commit, **check(create_model, get_data_info, name, data, normalize,
                                                          classes, x, Path(tmp), seed)}
            print(json.dumps(result), flush=True)
            results.append(result)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
