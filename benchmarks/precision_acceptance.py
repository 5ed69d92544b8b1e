"""Issue 16's acceptance figures in one command: step speed vs the reference, diffusion, end to end, equal accuracy.

1. `bench_train.precision_table`: TRADES step images/s of the reference and of DMAT per setting
   (wrn-16-1, wrn-16-4, batch 128), and `auto`'s pick.
2. `bench_diffusion.precision_table`: diffusion training step and sampling images/s per setting.
3. `repro_timing`: `dvc repro` of the CPU default, fp32 forced vs auto (fresh clones of HEAD).
4. `equal_accuracy`: `dmat train` on the fp32 clone's data, fp32 vs auto, seeds 0 and 1.

Run on a machine with nothing else running (about 1.5 hours on 2 cores):

    python -m benchmarks.precision_acceptance [--out results.json] [--skip-end-to-end]

Every part reports the CPU model and its bf16/fp16 flags; every speed figure is a ratio to a
baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import bench_diffusion, bench_train, equal_accuracy, repro_timing
from benchmarks.measure import machine


def run(end_to_end: bool = True) -> dict:
    results = {"machine": machine(), "train_step": bench_train.precision_table(),
               "diffusion": bench_diffusion.precision_table()}
    print(json.dumps(results, indent=2), file=sys.stderr, flush=True)
    if end_to_end:
        with tempfile.TemporaryDirectory(prefix="dmat-acceptance-") as tmp:
            results["repro"] = repro_timing.run(rounds=1, keep=Path(tmp))
            results["equal_accuracy"] = equal_accuracy.run(Path(tmp) / "fp32-0")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_acceptance",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the step benchmarks (parts 1-2)")
    args = parser.parse_args()
    results = run(end_to_end=not args.skip_end_to_end)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
