"""Equal-accuracy check (issue 16): the CPU default `train` stage in fp32 and in `auto`'s choice, same data, 2 seeds.

A speed-up counts only if the classifier it trains is as robust. In a workspace where the pipeline
has run up to `mix` (data/real, data/synthetic, data/mixed; by default the current directory),
every run is the real `dmat train` in a temporary directory that links that `data/` and holds the
workspace's params.yaml with only base.seed and base.precision/memory_format changed. Seeds and
settings alternate (seed 0 fp32, seed 0 auto, seed 1 fp32, ...) so both settings see the same
machine conditions. Reported per run: the setting `auto` chose, validation clean and PGD-40 (CW)
accuracy of the best epoch with 95% Wilson intervals (n = train.val_limit points), the epochs' time
and the whole stage's wall time (probe included);
per setting: mean and std over seeds; and whether auto's mean robust accuracy lies within the fp32
runs' seed range, and within the fp32 mean's Wilson interval.

    python -m benchmarks.equal_accuracy [--workspace DIR] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import machine

SETTINGS = {"fp32": ("fp32", "contiguous"), "auto": ("auto", "auto")}


def with_base(params_text: str, seed: int, precision: str, memory_format: str) -> str:
    """params.yaml text with base.seed, base.precision and base.memory_format replaced (comments kept)."""
    for key, value in (("seed", seed), ("precision", precision), ("memory_format", memory_format)):
        params_text, count = re.subn(rf"(?m)^(  {key}:)[ \t]*[^\s#]+", rf"\g<1> {value}", params_text, count=1)
        if count != 1:
            raise ValueError(f"params.yaml has no base.{key} line to set")
    return params_text


def wilson(successes: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def train_once(workspace: Path, seed: int, setting: str) -> dict:
    precision, memory_format = SETTINGS[setting]
    with tempfile.TemporaryDirectory(prefix="dmat-equal-accuracy-") as tmp:
        work = Path(tmp)
        (work / "data").symlink_to((workspace / "data").resolve(), target_is_directory=True)
        (work / "params.yaml").write_text(with_base((workspace / "params.yaml").read_text(), seed, precision,
                                                    memory_format))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dmat.cli", "train"], cwd=work, env=env, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(f"dmat train (seed {seed}, {setting}) failed:\n{result.stderr[-3000:]}")
        # The metrics file has the choice; the report adds its source and the probe's timings.
        return {**json.loads((work / "reports/train.json").read_text()), "stage_s": time.perf_counter() - started}


def run(workspace: Path = Path("."), seeds: tuple[int, ...] = (0, 1)) -> dict:
    val_n = _validation_points(workspace)
    runs = []
    for seed in seeds:
        for setting in SETTINGS:
            metrics = train_once(workspace, seed, setting)
            clean, robust = metrics["best_val_clean_acc"], metrics["best_val_robust_acc"]
            chosen = f"{metrics['precision']}_{metrics['memory_format']}"
            runs.append({"seed": seed, "setting": setting, "chosen": chosen, "val_clean_acc": clean,
                         "val_robust_acc": robust, "val_clean_ci95": wilson(clean * val_n, val_n),
                         "val_robust_ci95": wilson(robust * val_n, val_n), "train_s": round(metrics["train_s"], 1),
                         "stage_s": round(metrics["stage_s"], 1), "probe_ms": metrics.get("probe_ms")})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {setting: _summary([r for r in runs if r["setting"] == setting]) for setting in SETTINGS}
    fp32, auto = summary["fp32"], summary["auto"]
    fp32_robust = [r["val_robust_acc"] for r in runs if r["setting"] == "fp32"]
    auto_robust = auto["val_robust_acc_mean"]
    return {"machine": machine(), "workspace": str(workspace.resolve()), "validation_points": val_n,
            "seeds": list(seeds), "runs": runs, "by_setting": summary,
            "train_speedup_auto_vs_fp32": round(fp32["train_s_mean"] / auto["train_s_mean"], 3),
            "stage_speedup_auto_vs_fp32": round(fp32["stage_s_mean"] / auto["stage_s_mean"], 3),  # probe included
            "robust_acc_difference_auto_minus_fp32": round(auto_robust - fp32["val_robust_acc_mean"], 4),
            "auto_within_fp32_seed_range": min(fp32_robust) <= auto_robust <= max(fp32_robust),
            "auto_within_fp32_mean_ci95": _within(auto_robust, fp32["val_robust_acc_mean"], val_n)}


def _validation_points(workspace: Path) -> int:
    from dmat.config import load_params
    from dmat.data.store import ArrayStore

    limit = load_params(workspace / "params.yaml").train.val_limit
    available = len(ArrayStore.open(workspace / "data/real/val"))
    return available if limit is None else min(limit, available)


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("val_clean_acc", "val_robust_acc", "train_s", "stage_s"):
        values = [r[key] for r in runs]
        out[f"{key}_mean"] = round(statistics.mean(values), 4)
        out[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
    return out


def _within(value: float, reference: float, n: int) -> bool:
    low, high = wilson(reference * n, n)
    return low <= value <= high


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.equal_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("."), help="where `dvc repro mix` has run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(json.dumps(run(args.workspace, tuple(args.seeds)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
