"""`dmat known-distribution report`: a grid of the known-distribution benchmark, per seed and compared over seeds.

Reads the newest finished `kd-evaluate@<truth>` run of every (truth, variant, seed) of the grid from MLflow and
writes, into --out:
- per_seed.csv: one row per truth, variant and seed, with the grid's axis values and every metric of the run;
- summary.csv and summary.md, computed from per_seed.csv alone (`--from-csv` recomputes them without MLflow):
  per truth, condition (the values of the other axes) and metric, each value of the compared axis (--against,
  default mode=none) against the reference value on the same seeds: the seed-level mean difference with its
  95% t-interval, the paired t-test and the exact sign-flip test over seeds, Holm's adjustment over every
  comparison of the truth and metric, next to the reference measures of the truth itself (`_true`: fresh true
  samples, the finite-sample floor; `_exact`: the Bayes-optimal denoiser through the same sampler);
- samples_<truth>.png for 2-D truths: the first seed's samples of every variant over the true density.
The seed is the unit of inference (training varies with it; every run is scored on the same evaluation draws).
Exit 0; 1 when the tracking store cannot be read; 2 for a bad grid or no runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STAGE_PREFIX = "kd-evaluate@"
HIGHER_IS_BETTER = {"log_density", "mode_coverage"}
ID_COLUMNS = ("truth", "variant", "seed")
# The paper's claims for diffusion AT, each with the training-data condition that tests it and its measures.
CLAIMS = (
    ("a", "tolerance to noisy and corrupted training data", "corrupted",
     ("denoiser_error_weighted", "sliced_w2", "log_density", "off_mode_rate")),
    ("b", "reduced memorisation", "small-n", ("memorisation_rate", "sliced_w2", "denoiser_error_weighted")),
    ("c", "robustness to outliers", "outliers",
     ("denoiser_error_weighted", "sliced_w2", "off_mode_rate", "log_density")),
    ("d", "resilience to iterative attacks on sampling", "clean",
     ("attack_displacement", "attack_mode_change", "random_displacement")),
)
METRICS = tuple(dict.fromkeys(m for *_, metrics in CLAIMS for m in metrics)) + ("mode_tv", "mode_coverage")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, metavar="FILE",
                        help="the grid the runs were queued from (experiments/known-distribution/grid.yaml)")
    parser.add_argument("--out", default="experiments/results/known-distribution", metavar="DIR",
                        help="where per_seed.csv, summary.csv, summary.md and the pictures go")
    parser.add_argument("--against", default="mode=none", metavar="AXIS=VALUE",
                        help="the axis compared and its reference value (default mode=none)")
    parser.add_argument("--from-csv", action="store_true",
                        help="recompute summary.csv and summary.md from DIR/per_seed.csv, without MLflow")
    parser.add_argument("--doc", metavar="FILE",
                        help="also write the tables into FILE between `<!-- compare: DIR -->` and `<!-- /compare -->` "
                             "(the docs page that publishes the result; DIR is --out)")


def run(args: argparse.Namespace) -> int:
    from dmat.errors import DataError, TrackingError
    from dmat.tools.grid import GridError, load_grid

    out = Path(args.out)
    try:
        grid = load_grid(args.grid)
        axis, reference = _against(args.against, grid)
        if args.from_csv:
            rows = read_per_seed(out / "per_seed.csv")
        else:
            runs = collect_runs(grid)
            rows = per_seed_rows(grid, runs)
            write_csv(out / "per_seed.csv", rows)
            draw_sample_panels(grid, runs, out)
        summary = summarise(rows, grid.axes, axis, reference)
    except (GridError, LookupError, ValueError) as err:
        return _fail(str(err), EXIT_USAGE)
    except (TrackingError, DataError) as err:
        return _fail(str(err), EXIT_FAILED)
    write_csv(out / "summary.csv", [vars(row) for row in summary])
    text = markdown(summary, axis, reference, len({r["seed"] for r in rows}))
    (out / "summary.md").write_text(text, encoding="utf-8")
    if args.doc:
        from dmat.tools.compare import publish

        try:
            publish(Path(args.doc), out, text)
        except (OSError, LookupError) as err:
            return _fail(str(err), EXIT_USAGE)
    print(text)
    print(f"dmat known-distribution report: {len(rows)} runs -> {out}", file=sys.stderr)
    return EXIT_OK


def _against(value: str, grid: Any) -> tuple[str, str]:
    axis, _, reference = value.partition("=")
    if not grid.axes:
        raise ValueError(f"{grid.path}: the report compares along an axis; the grid has variants, not axes")
    values = {axes[axis] for axes in grid.axes.values() if axis in axes}
    if reference not in values:
        raise ValueError(f"--against {value}: the grid has no axis {axis!r} with value {reference!r}")
    return axis, reference


# --- Runs -> per-seed rows ------------------------------------------------------------------------------------

def collect_runs(grid: Any) -> dict[tuple[str, str, int], dict]:
    """(truth, variant, seed) -> the newest finished evaluation run of the grid's experiment."""
    from dmat.tracking import search_runs

    variant_of = {label: name for name, label in grid.labels.items()}
    newest: dict[tuple[str, str, int], dict] = {}
    for run in search_runs([grid.experiment], [f"tags.`dmat.stage` LIKE '{STAGE_PREFIX}%'"]):
        variant, seed = variant_of.get(run["tags"].get("dmat.variant")), int(run["tags"].get("dmat.seed", -1))
        if variant is None or seed not in grid.seeds:
            continue
        key = (run["tags"]["dmat.stage"].removeprefix(STAGE_PREFIX), variant, seed)
        if key not in newest or run["start_time"] > newest[key]["start_time"]:
            newest[key] = run
    if not newest:
        raise LookupError(f"no finished {STAGE_PREFIX}<truth> runs of the grid {grid.path} in MLflow experiment "
                          f"{grid.experiment!r}: queue it with `dmat queue {grid.path} --start 2`")
    return newest


def per_seed_rows(grid: Any, runs: dict[tuple[str, str, int], dict]) -> list[dict[str, Any]]:
    truths = sorted({truth for truth, _, _ in runs})
    missing = [f"{t}/{v}/s{s}" for t in truths for v in grid.variants for s in grid.seeds if (t, v, s) not in runs]
    if missing:
        print(f"dmat known-distribution report: {len(missing)} runs missing: {', '.join(missing[:10])}",
              file=sys.stderr)
    rows = []
    for (truth, variant, seed), run in sorted(runs.items(), key=lambda item: _order(item[0], grid)):
        rows.append({"truth": truth, "variant": variant, "seed": seed, **grid.axes[variant],
                     **dict(sorted(run["metrics"].items())), "run_id": run["run_id"]})
    return rows


def _order(key: tuple[str, str, int], grid: Any) -> tuple:
    truth, variant, seed = key
    return truth, list(grid.variants).index(variant), seed


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from dmat.files import atomic_path

    columns = list(dict.fromkeys(column for row in rows for column in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def _cell(value: Any) -> Any:
    return "" if value is None else repr(value) if isinstance(value, float) else value


def read_per_seed(path: Path) -> list[dict[str, Any]]:
    from dmat.errors import DataError

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise DataError(f"{path}: cannot read the per-seed table: {err}") from None
    if not rows or not set(ID_COLUMNS) <= set(rows[0]):
        raise DataError(f"{path}: expected a per-seed table with columns {', '.join(ID_COLUMNS)}")
    for row in rows:
        row["seed"] = int(row["seed"])
    return rows


# --- Per-seed rows -> seed-level comparisons ------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """One value of the compared axis against the reference, for one truth, condition and metric."""

    truth: str
    condition: str
    metric: str
    value: str
    seeds: int
    reference_mean: float
    mean: float
    difference: float
    ci_low: float | None
    ci_high: float | None
    p_t: float | None
    p_sign_flip: float | None
    p_holm: float | None
    floor_true: float | None
    floor_exact: float | None
    seeds_for_power: int | None  # seeds a paired t-test at 0.05 needs for 80% power, if the differences spread so
    verdict: str


def summarise(rows: list[dict[str, Any]], axes: dict[str, dict[str, str]], axis: str,
              reference: str) -> list[Comparison]:
    """Every value of `axis` against `reference`, paired by seed, per truth, condition and metric; Holm over each
    truth and metric's comparisons."""
    from dmat.core import stats

    other_axes = [name for name in next(iter(axes.values())) if name != axis]
    values = list(dict.fromkeys(a[axis] for a in axes.values() if a[axis] != reference))
    conditions = list(dict.fromkeys("-".join(a[name] for name in other_axes) for a in axes.values()))
    table: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)  # (truth, condition, value) -> seed -> row
    for row in rows:
        table[(row["truth"], "-".join(str(row[name]) for name in other_axes), row[axis])][row["seed"]] = row
    out = []
    for truth in dict.fromkeys(row["truth"] for row in rows):
        for metric in METRICS:
            family = []
            for condition in conditions:
                base = table.get((truth, condition, reference), {})
                for value in values:
                    runs = table.get((truth, condition, value), {})
                    seeds = sorted(set(base) & set(runs))
                    if not seeds or metric not in runs[seeds[0]] or runs[seeds[0]][metric] in ("", None):
                        continue
                    differences = [_number(runs[s], metric) - _number(base[s], metric) for s in seeds]
                    interval = stats.t_interval(differences)
                    family.append(dict(
                        truth=truth, condition=condition, metric=metric, value=value, seeds=len(seeds),
                        reference_mean=statistics.fmean(_number(base[s], metric) for s in seeds),
                        mean=statistics.fmean(_number(runs[s], metric) for s in seeds), difference=interval.mean,
                        ci_low=interval.low, ci_high=interval.high, p_t=stats.paired_t_p(differences),
                        p_sign_flip=stats.sign_flip_p(differences),
                        seeds_for_power=stats.seeds_for_power(interval.mean, interval.std),
                        floor_true=_mean_of(list(base.values()) + list(runs.values()), f"{metric}_true"),
                        floor_exact=_mean_of(list(base.values()) + list(runs.values()), f"{metric}_exact")))
            for entry, adjusted in zip(family, stats.holm([e["p_t"] for e in family]), strict=True):
                out.append(Comparison(**entry, p_holm=adjusted, verdict=_verdict(entry, adjusted)))
    return out


def _number(row: dict, metric: str) -> float:
    return float(row[metric])


def _mean_of(rows: list[dict], metric: str) -> float | None:
    present = [float(row[metric]) for row in rows if row.get(metric) not in (None, "")]
    return statistics.fmean(present) if present else None


def _verdict(entry: dict, p_holm: float | None, alpha: float = 0.05) -> str:
    if p_holm is None or p_holm >= alpha:
        return "no significant difference"
    better = (entry["difference"] > 0) == (entry["metric"] in HIGHER_IS_BETTER)
    return "better" if better else "worse"


# --- Tables ---------------------------------------------------------------------------------------------------

def markdown(summary: list[Comparison], axis: str, reference: str, seeds: int) -> str:
    """One table per claim: its condition's comparisons on its measures, with the truth's own reference values."""
    out = io.StringIO()
    out.write(f"Each {axis} against `{reference}` on the same seeds ({seeds} seeds): mean difference with its 95% "
              "t-interval, paired t p-value, exact sign-flip p-value, Holm-adjusted paired t p-value (over the "
              f"{axis} × condition comparisons of each truth and measure), the seeds a paired t-test at 0.05 would "
              "need for 80% power at the observed spread. `true`: fresh true samples (the finite-sample floor); "
              "`exact`: the Bayes-optimal denoiser through the same sampler. Lower is better except "
              f"{', '.join(sorted(HIGHER_IS_BETTER))}.\n")
    for letter, claim, condition, metrics in CLAIMS:
        rows = [c for c in summary if c.condition == condition and c.metric in metrics]
        if not rows:
            continue
        out.write(f"\n### ({letter}) {claim}: condition `{condition}`\n\n")
        out.write(f"| truth | measure | {axis} | {reference} | {axis} value | difference [95% CI] | p (t) "
                  "| p (sign-flip) | p (Holm) | verdict | seeds for power | true | exact |\n")
        out.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for c in sorted(rows, key=lambda c: (c.truth, metrics.index(c.metric))):
            interval = "" if c.ci_low is None else f" [{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]"
            out.write(f"| {c.truth} | {c.metric} | {c.value} | {_fmt(c.reference_mean)} | {_fmt(c.mean)} | "
                      f"{_fmt(c.difference)}{interval} | {_fmt_p(c.p_t)} | {_fmt_p(c.p_sign_flip)} "
                      f"| {_fmt_p(c.p_holm)} | {c.verdict} | {c.seeds_for_power or '–'} | {_fmt(c.floor_true)} "
                      f"| {_fmt(c.floor_exact)} |\n")
    return out.getvalue()


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}"


def _fmt_p(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"


# --- Pictures -------------------------------------------------------------------------------------------------

def draw_sample_panels(grid: Any, runs: dict[tuple[str, str, int], dict], out: Path) -> None:
    """For each 2-D truth: the first seed's samples of every variant over the true density, rows by the first
    axis's values, columns by the others'."""
    import tempfile

    import numpy as np

    from dmat.artifacts.known_distribution import truth_of
    from dmat.config import parse_params, read_yaml
    from dmat.core.known_distribution import log_density_grid
    from dmat.known_distribution_config import KnownDistributionParams
    from dmat.plots import save_scatter_panels
    from dmat.tracking import download_run_artifact

    params = parse_params(read_yaml(grid.profile_text), KnownDistributionParams)
    seed = grid.seeds[0]
    for truth, cfg in params.truths.items():
        mixture = truth_of(cfg)
        if mixture.dim != 2 or not any(key[0] == truth and key[2] == seed for key in runs):
            continue
        panels = {}
        with tempfile.TemporaryDirectory() as tmp:
            for variant in grid.variants:
                run = runs.get((truth, variant, seed))
                if run is not None:
                    path = download_run_artifact(run["run_id"], "samples.npz", Path(tmp) / variant)
                    with np.load(path, allow_pickle=False) as arrays:
                        panels[variant] = arrays["model"]
        ticks, log_density = log_density_grid(mixture, 1.25 * mixture.extent(), points=160)
        first, *others = list(next(iter(grid.axes.values())))
        rows = list(dict.fromkeys(a[first] for a in grid.axes.values()))
        columns = list(dict.fromkeys("-".join(a[o] for o in others) for a in grid.axes.values()))
        placed = {(rows.index(a[first]), columns.index("-".join(a[o] for o in others))): (variant, panels[variant])
                  for variant, a in grid.axes.items() if variant in panels}
        save_scatter_panels(out / f"samples_{truth}.png", ticks.numpy(), log_density.numpy(), placed, len(rows),
                            len(columns), title=f"{truth}: samples of seed {seed} ({first} by row)")


def _fail(message: str, code: int) -> int:
    print(f"dmat known-distribution report: error: {message}", file=sys.stderr)
    return code
