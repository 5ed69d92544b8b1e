"""`dmat compare`: pipeline variants side by side, as evidence (DESIGN.md §8).

Reads the evaluation runs (`evaluate@<threat>`) from MLflow and groups them by variant — the run's
`dmat.variant` tag, i.e. the params its pipeline changed from the committed `params.yaml`, the seed
excluded — so the seeds of one variant go together. Per variant it reports how many seeds, clean and
AutoAttack accuracy as mean ± std over the seeds with the pooled 95% Wilson interval (the interval of
the test-point sampling; the std is the training variation), the exact McNemar p-value against a
baseline variant on the test points both evaluated (discordant points summed over the seeds both ran),
and the generated-data metrics of the same pipeline executions (their `evaluate_diffusion` runs).

Writes the table as Markdown and CSV and a PNG (accuracy per variant with interval whiskers) into
`--out`, logs the three to a `compare` MLflow run, and prints the Markdown (or `--format json`).
Exit 0; 1 when the tracking store cannot be read; 2 for an unknown experiment, DVC experiment or run
(named), or when nothing matches.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BASELINE = "baseline"
# Generated-data metrics shown when the pipeline executions have them (evaluate_diffusion's headline names).
GENERATED_METRICS = ("conditional_accuracy", "fd_reference", "knn_precision", "knn_recall", "memorisation_rate")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", metavar="FILE",
                        help="an experiment grid (`dmat queue`): its variants by name, its profile's experiment, its "
                             "baseline; runs of other variants are left out")
    parser.add_argument("--experiment", action="append", metavar="NAME",
                        help="MLflow experiment to read (repeatable; default: base.experiment of params.yaml)")
    parser.add_argument("--dvc-exp", action="append", metavar="NAME",
                        help="only the runs of this DVC experiment (repeatable; `dvc exp show` lists the names)")
    parser.add_argument("--run", action="append", metavar="RUN_ID", help="only this evaluate run (repeatable)")
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only runs with this tag (repeatable)")
    parser.add_argument("--threat", default="linf", help="evaluation to compare (an evaluate.threats key; "
                                                         "default linf)")
    parser.add_argument("--baseline", metavar="VARIANT",
                        help=f"variant the others are tested against (default: {BASELINE!r} when present, "
                             "else the variant with the most seeds; with --grid, a variant's name, default the "
                             "grid's baseline)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown", help="what to print")
    parser.add_argument("--out", default="reports/compare", metavar="DIR",
                        help="where compare.md, compare.csv and compare.png go (default reports/compare)")
    parser.add_argument("--no-log", action="store_true", help="do not log the table to a `compare` MLflow run")
    parser.epilog = ("Variants are DVC experiments (`dvc exp run --queue -S KEY=VALUE -S base.seed=0,1,2`); "
                     "every run carries the tags dmat.variant and dmat.seed.")


@dataclass
class Variant:
    """One row of the comparison."""

    variant: str
    seeds: list[int]
    n: int
    clean_mean: float
    clean_std: float | None
    robust_mean: float
    robust_std: float | None
    robust_pooled_ci: list[float]
    clean_pooled_ci: list[float]
    paired_seeds: int = 0
    p_value: float | None = None
    only_variant: int | None = None  # test points (summed over paired seeds) only this variant withstands
    only_baseline: int | None = None
    note: str = ""
    generated: dict[str, float] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    name: str = ""  # the variant's name in the grid (--grid)


def run(args: argparse.Namespace) -> int:
    from dmat.errors import DataError, TrackingError
    from dmat.tools.grid import GridError, load_grid

    try:
        grid = load_grid(args.grid) if args.grid else None
        experiments = args.experiment or [grid.experiment if grid else default_experiment()]
        runs = select_runs(args, experiments)
        baseline = args.baseline
        if grid:
            runs = [r for r in runs if r["tags"].get("dmat.variant") in grid.labels.values()]
            baseline = grid.baseline_label(baseline)
        rows = compare(runs, baseline, OutcomeReader(), lambda members: generated_metrics(members, experiments))
        if grid:
            rows = name_rows(rows, grid.labels)
    except (LookupError, GridError) as err:
        return _fail(str(err), EXIT_USAGE)
    except (TrackingError, DataError) as err:
        return _fail(str(err), EXIT_FAILED)
    out = Path(args.out)
    files = write_outputs(rows, out, args.threat)
    if not args.no_log:
        try:
            log_comparison(files, experiments[0], args.threat, rows)
        except TrackingError as err:
            return _fail(str(err), EXIT_FAILED)
    print(json.dumps([asdict(row) for row in rows], indent=2) if args.format == "json" else markdown(rows))
    print(f"dmat compare: {len(rows)} variants, {sum(len(r.seeds) for r in rows)} runs -> {out}", file=sys.stderr)
    return EXIT_OK


def select_runs(args: argparse.Namespace, experiments: list[str]) -> list[dict]:
    """The newest finished evaluate@<threat> run per (variant, seed) that matches the filters."""
    from dmat.tracking import search_runs

    conditions = [f"tags.`dmat.stage` = '{_escape('evaluate@' + args.threat)}'"]
    for pair in args.tag or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LookupError(f"--tag {pair!r} is not KEY=VALUE")
        conditions.append(f"tags.`{key}` = '{_escape(value)}'")
    runs = search_runs(experiments, conditions)
    for option, key, wanted in (("--dvc-exp", "dvc.exp_name", args.dvc_exp), ("--run", "run_id", args.run)):
        if wanted:
            present = {r["tags"].get(key, "") if key != "run_id" else r["run_id"] for r in runs}
            missing = [name for name in wanted if name not in present]
            if missing:
                raise LookupError(f"{option} {missing[0]!r}: no finished evaluate@{args.threat} run has it")
            runs = [r for r in runs if (r["run_id"] if key == "run_id" else r["tags"].get(key)) in wanted]
    if not runs:
        raise LookupError(f"no finished evaluate@{args.threat} run matches")
    newest: dict[tuple[str, str], dict] = {}
    for found in sorted(runs, key=lambda r: r["start_time"]):
        newest[(found["tags"].get("dmat.variant", "unknown"), found["tags"].get("dmat.seed", "?"))] = found
    return list(newest.values())


def default_experiment() -> str:
    from dmat.config import ParamsError, load_params

    try:
        return load_params("params.yaml").base.experiment
    except ParamsError:
        return "dmat"


def compare(runs: list[dict], baseline: str | None, outcomes: Any, generated: Any) -> list[Variant]:
    """One row per variant; `outcomes(run)` gives a run's per-point robust outcomes for the paired test,
    `generated(runs)` the generated-data metrics of the runs' pipeline executions."""
    from dmat.core.stats import mean_std, pooled_interval

    groups: dict[str, list[dict]] = defaultdict(list)
    for found in runs:
        groups[found["tags"].get("dmat.variant", "unknown")].append(found)
    if baseline is not None and baseline not in groups:
        raise LookupError(f"--baseline {baseline!r} is not among the variants: {', '.join(sorted(groups))}")
    baseline = baseline or (BASELINE if BASELINE in groups else max(groups, key=lambda v: len(groups[v])))
    rows = []
    for name, members in sorted(groups.items(), key=lambda item: (item[0] != baseline, item[0])):
        members.sort(key=lambda r: _seed(r))
        sizes = {int(r["metrics"]["n"]) for r in members}
        if len(sizes) != 1:
            raise LookupError(f"variant {name!r}: its runs were evaluated on different numbers of test points "
                              f"({sorted(sizes)}): not comparable")
        n = sizes.pop()
        clean = [r["metrics"]["clean_acc"] for r in members]
        robust = [r["metrics"]["robust_acc"] for r in members]
        clean_summary, robust_summary = mean_std(clean), mean_std(robust)
        rows.append(Variant(
            variant=name, seeds=[_seed(r) for r in members], n=n,
            clean_mean=clean_summary.mean, clean_std=clean_summary.std,
            robust_mean=robust_summary.mean, robust_std=robust_summary.std,
            clean_pooled_ci=list(pooled_interval([round(a * n) for a in clean], n)),
            robust_pooled_ci=list(pooled_interval([round(a * n) for a in robust], n)),
            generated=generated(members), run_ids=[r["run_id"] for r in members]))
    by_name = {row.variant: row for row in rows}
    for row in rows:
        if row.variant != baseline:
            paired_test(row, by_name[baseline], groups[row.variant], groups[baseline], outcomes)
        else:
            row.note = "baseline"
    return rows


def name_rows(rows: list[Variant], labels: dict[str, str]) -> list[Variant]:
    """Give rows their grid names, in the grid's order (the baseline stays first)."""
    order = {label: (index, name) for index, (name, label) in enumerate(labels.items())}
    for row in rows:
        row.name = order[row.variant][1]
    return rows[:1] + sorted(rows[1:], key=lambda row: order[row.variant][0])


def paired_test(row: Variant, base: Variant, members: list[dict], base_members: list[dict], outcomes: Any) -> None:
    """Exact McNemar on the discordant test points, summed over the seeds both variants ran on the same rows."""
    from dmat.core.stats import mcnemar_exact_counts

    base_by_seed = {_seed(r): r for r in base_members}
    only_row = only_base = paired = 0
    refused = []
    for found in members:
        other = base_by_seed.get(_seed(found))
        if other is None:
            continue
        if found["tags"].get("dmat.rows_id") != other["tags"].get("dmat.rows_id"):
            refused.append(f"seed {_seed(found)}: different test rows")
            continue
        mine, theirs = outcomes(found), outcomes(other)
        only_row += int((mine & ~theirs).sum())
        only_base += int((theirs & ~mine).sum())
        paired += 1
    row.paired_seeds = paired
    if paired:
        test = mcnemar_exact_counts(only_row, only_base)
        row.p_value, row.only_variant, row.only_baseline = test.p_value, only_row, only_base
    row.note = "; ".join(refused) or ("" if paired else "no seed in common with the baseline: not paired")


def generated_metrics(members: list[dict], experiments: list[str]) -> dict[str, float]:
    """Means over the variant's seeds of the generated-data metrics of the same pipeline executions."""
    from dmat.tracking import search_runs

    values: dict[str, list[float]] = defaultdict(list)
    for found in members:
        pipeline = found["tags"].get("dmat.pipeline")
        if not pipeline:
            continue
        runs = search_runs(experiments, ["tags.`dmat.stage` = 'evaluate_diffusion'",
                                         f"tags.`dmat.pipeline` = '{_escape(pipeline)}'"])
        for name in GENERATED_METRICS:
            if runs and name in runs[0]["metrics"]:
                values[name].append(runs[0]["metrics"][name])
    return {name: sum(v) / len(v) for name, v in values.items()}


class OutcomeReader:
    """Per-point robust outcomes of an evaluate run, downloaded once from its MLflow artifacts."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="dmat-compare-")

    def __call__(self, found: dict) -> Any:
        from dmat.artifacts.loaders import load_outcomes
        from dmat.tracking import download_run_artifact

        run_id = found["run_id"]
        if run_id not in self._cache:
            path = download_run_artifact(run_id, "outcomes.npz", Path(self._dir.name) / run_id)
            self._cache[run_id] = load_outcomes(path).robust_correct.astype(bool)
        return self._cache[run_id]


def markdown(rows: list[Variant]) -> str:
    generated = sorted({name for row in rows for name in row.generated})
    header = ["variant", "seeds", "n", "clean (mean ± std)", "AutoAttack (mean ± std)", "AutoAttack 95% CI (pooled)",
              "p vs baseline (paired seeds)", *generated]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.p_value is not None:
            p = f"{row.p_value:.3g} ({row.only_variant} vs {row.only_baseline} points; {row.paired_seeds})"
        else:
            p = row.note or "—"
        label = f"**{row.name}** `{row.variant}`" if row.name else f"`{row.variant}`"
        cells = [label, ",".join(map(str, row.seeds)), str(row.n),
                 _mean_std(row.clean_mean, row.clean_std), _mean_std(row.robust_mean, row.robust_std),
                 f"[{100 * row.robust_pooled_ci[0]:.1f}, {100 * row.robust_pooled_ci[1]:.1f}]", p,
                 *(f"{row.generated[name]:.3g}" if name in row.generated else "—" for name in generated)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Variant], out: Path, threat: str) -> list[Path]:
    from dmat.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.md", out / "compare.csv", out / "compare.png"]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(markdown(rows), encoding="utf-8")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(_csv(rows), encoding="utf-8")
    _plot(rows, paths[2], threat)
    return paths


def _csv(rows: list[Variant]) -> str:
    buffer = io.StringIO()
    generated = sorted({name for row in rows for name in row.generated})
    writer = csv.writer(buffer)
    writer.writerow(["name", "variant", "seeds", "n", "clean_mean", "clean_std", "robust_mean", "robust_std",
                     "robust_ci_low", "robust_ci_high", "clean_ci_low", "clean_ci_high", "paired_seeds", "p_value",
                     "only_variant", "only_baseline", "note", *generated])
    for row in rows:
        writer.writerow([row.name, row.variant, " ".join(map(str, row.seeds)), row.n, row.clean_mean, row.clean_std,
                         row.robust_mean, row.robust_std, *row.robust_pooled_ci, *row.clean_pooled_ci,
                         row.paired_seeds, row.p_value, row.only_variant, row.only_baseline, row.note,
                         *(row.generated.get(name) for name in generated)])
    return buffer.getvalue()


def _plot(rows: list[Variant], path: Path, threat: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from dmat.files import atomic_path

    figure, axes = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4), dpi=100)
    positions = range(len(rows))
    for offset, kind, colour in ((-0.12, "clean", "tab:blue"), (0.12, "robust", "tab:red")):
        means = [getattr(row, f"{kind}_mean") for row in rows]
        low = [m - getattr(row, f"{kind}_pooled_ci")[0] for m, row in zip(means, rows, strict=True)]
        high = [getattr(row, f"{kind}_pooled_ci")[1] - m for m, row in zip(means, rows, strict=True)]
        axes.errorbar([p + offset for p in positions], means, yerr=[low, high], fmt="o", capsize=4, color=colour,
                      label=f"{'AutoAttack' if kind == 'robust' else 'clean'} (mean over seeds, pooled 95% CI)")
    axes.set_xticks(list(positions), [row.name or _short(row.variant) for row in rows], rotation=15, ha="right",
                    fontsize=8)
    axes.set(ylabel="accuracy", title=f"{threat}: accuracy per variant", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def log_comparison(files: list[Path], experiment: str, threat: str, rows: list[Variant]) -> None:
    from dmat.tracking import tool_run

    with tool_run("compare", experiment, {"dmat.threat": threat}) as tracked:
        tracked.log_params({"threat": threat, "variants": len(rows), "baseline": rows[0].variant})
        for path in files:
            tracked.log_artifact(path)


def _seed(found: dict) -> int:
    try:
        return int(found["tags"].get("dmat.seed", "-1"))
    except ValueError:
        return -1


def _mean_std(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _short(label: str, limit: int = 40) -> str:
    return label if len(label) <= limit else label[:limit - 1] + "…"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _fail(message: str, code: int) -> int:
    print(f"dmat compare: error: {message}", file=sys.stderr)
    return code
