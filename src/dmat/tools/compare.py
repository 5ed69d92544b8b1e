"""`dmat compare`: pipeline variants side by side, as evidence about recipes (docs/evidence.md).

Reads the evaluation runs (`evaluate@<threat>`) from MLflow and groups them by variant — the run's
`dmat.variant` tag, i.e. the params its pipeline changed from the committed profile, the seed excluded —
so the seeds of one variant go together. A claim about a recipe is a claim over training runs, so the
seed is the unit of inference:

- per variant: the per-seed clean and robust accuracies, their mean with a Student-t 95% interval over
  seeds, and a two-level bootstrap interval (seeds, then the test points they share);
- per comparison with the baseline, for clean and robust accuracy alike: the per-seed paired differences
  (seeds paired by number), their mean with a t-interval, the paired t-test p and the exact sign-flip p
  (and the smallest p the number of seeds allows), the two-level bootstrap interval of the difference,
  Holm's adjustment of the table's paired-t p-values, how many seeds a paired t-test at 0.05 with 80%
  power would need given the measured spread, and — secondary, labelled as such — the exact McNemar
  test on the test points, discordant points summed over seeds, which is conditional on these trained
  models (training variance is not in its null hypothesis);
- the chance level (1 / classes), the attack suite that ran and the generated-data metrics of the same
  pipeline executions (`evaluate_diffusion`).

Every run must have been scored on the same test points (`dmat.rows_id`): the seed varies training, not
the yardstick. Writes compare.md, compare.csv (a row per variant), seeds.csv (a row per run),
comparisons.csv, compare.json and compare.png (seed-level whiskers, each seed a dot, the chance level)
into `--out`, logs them to a `compare` MLflow run, and prints the Markdown (or `--format json`).
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
METRICS = ("clean", "robust")  # accuracy kinds: `<kind>_acc` metrics, `<kind>_correct` per-point outcomes
# Generated-data metrics shown when the pipeline executions have them (evaluate_diffusion's headline names).
GENERATED_METRICS = ("conditional_accuracy", "fd_reference", "knn_precision", "knn_recall", "memorisation_rate")
ALPHA, POWER = 0.05, 0.8


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
                        help="where the tables and the picture go (default reports/compare)")
    parser.add_argument("--no-log", action="store_true", help="do not log the tables to a `compare` MLflow run")
    parser.add_argument("--doc", metavar="FILE",
                        help="also put the Markdown tables into FILE, between its lines `<!-- compare: DIR -->` and "
                             "`<!-- /compare -->` (a docs page that publishes the result; DIR is --out)")
    parser.epilog = ("Variants are DVC experiments (`dmat queue GRID`, or `dvc exp run --queue -S KEY=VALUE "
                     "-S base.seed=0,1,2`); every run carries the tags dmat.variant and dmat.seed.")


@dataclass
class Accuracy:
    """One accuracy of one variant over its seeds."""

    per_seed: list[float]
    mean: float
    std: float | None
    t_ci: list[float] | None  # Student-t 95% interval over seeds (None with one seed)
    bootstrap_ci: list[float]  # two-level bootstrap 95% interval: seeds, then test points
    pooled_ci: list[float]  # Wilson 95% interval of the test-point sampling alone (training variation left out)


@dataclass
class Variant:
    """One row of the comparison: a variant over its seeds."""

    variant: str
    seeds: list[int]
    n: int
    clean: Accuracy
    robust: Accuracy
    name: str = ""  # the variant's name in the grid (--grid)
    generated: dict[str, float] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """One accuracy of a variant against the baseline's, paired seed by seed."""

    variant: str
    metric: str  # clean | robust
    seeds: list[int]  # the seeds both ran, on the same test points
    differences: list[float]  # variant − baseline, per seed
    mean: float | None
    t_ci: list[float] | None
    p_t: float | None  # paired t-test, two-sided
    p_holm: float | None  # p_t adjusted for every comparison of the table (Holm)
    p_sign_flip: float | None  # exact sign-flip (permutation) test
    p_sign_flip_floor: float | None  # the smallest p the sign-flip test can give with these seeds
    bootstrap_ci: list[float] | None
    seeds_for_power: int | None  # seeds a paired t-test at 0.05 needs for 80% power, given the measured spread
    mcnemar_p: float | None  # exact McNemar on the test points, summed over seeds: conditional on these models
    only_variant: int | None  # test points (summed over seeds) only the variant gets right
    only_baseline: int | None
    name: str = ""
    note: str = ""


@dataclass
class Contrast:
    """A planned contrast of a grid (e.g. the interaction of a 2×2 design), per seed: Σ weight · accuracy."""

    name: str
    weights: dict[str, float]  # variant name -> weight
    metric: str
    seeds: list[int]  # the seeds every variant of the contrast ran, on the same test points
    values: list[float]
    mean: float | None
    t_ci: list[float] | None
    p_t: float | None  # one-sample t-test of the per-seed values against 0
    p_holm: float | None  # adjusted over the grid's contrasts
    p_sign_flip: float | None
    p_sign_flip_floor: float | None
    bootstrap_ci: list[float] | None
    seeds_for_power: int | None
    note: str = ""


@dataclass
class Table:
    """Everything `dmat compare` reports."""

    threat: str
    baseline: str
    n: int
    chance: float | None  # 1 / classes
    attacks: str  # the attack suite that ran, e.g. "APGD-CE + APGD-T"
    rows_id: str | None
    variants: list[Variant]
    comparisons: list[Comparison]
    contrasts: list[Contrast] = field(default_factory=list)


def table_from_json(data: dict[str, Any]) -> Table:
    """A table as `compare.json` holds it (what a committed result is checked against)."""
    variants = [Variant(**{**v, "clean": Accuracy(**v["clean"]), "robust": Accuracy(**v["robust"])})
                for v in data["variants"]]
    return Table(**{**data, "variants": variants, "comparisons": [Comparison(**c) for c in data["comparisons"]],
                    "contrasts": [Contrast(**c) for c in data.get("contrasts", [])]})


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
        outcomes = OutcomeReader()
        table = compare(runs, baseline, outcomes, lambda members: generated_metrics(members, experiments),
                        args.threat)
        if grid:
            name_rows(table, grid.labels)
            table.contrasts = contrasts(runs, grid.contrasts, grid.labels, outcomes)
    except (LookupError, GridError) as err:
        return _fail(str(err), EXIT_USAGE)
    except (TrackingError, DataError) as err:
        return _fail(str(err), EXIT_FAILED)
    out = Path(args.out)
    files = write_outputs(table, out)
    if args.doc:
        try:
            publish(Path(args.doc), out, markdown(table))
        except (OSError, LookupError) as err:
            return _fail(str(err), EXIT_USAGE)
    if not args.no_log:
        try:
            log_comparison(files, experiments[0], table)
        except TrackingError as err:
            return _fail(str(err), EXIT_FAILED)
    print(json.dumps(asdict(table), indent=2) if args.format == "json" else markdown(table))
    print(f"dmat compare: {len(table.variants)} variants, {sum(len(v.seeds) for v in table.variants)} runs -> {out}",
          file=sys.stderr)
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


def compare(runs: list[dict], baseline: str | None, outcomes: Any, generated: Any, threat: str = "linf") -> Table:
    """The comparison of `runs` (evaluate runs as `tracking.search_runs` returns them) against `baseline`.
    `outcomes(run)` gives a run's per-point outcomes ({"clean": bool array, "robust": bool array}), `generated(runs)`
    the generated-data metrics of the runs' pipeline executions."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for found in runs:
        groups[found["tags"].get("dmat.variant", "unknown")].append(found)
    if baseline is not None and baseline not in groups:
        raise LookupError(f"--baseline {baseline!r} is not among the variants: {', '.join(sorted(groups))}")
    baseline = baseline or (BASELINE if BASELINE in groups else max(groups, key=lambda v: len(groups[v])))
    for members in groups.values():
        members.sort(key=_seed)
    n = _one_value(runs, lambda r: int(r["metrics"]["n"]), "numbers of test points")
    order = sorted(groups, key=lambda name: (name != baseline, name))
    variants = [summarise(name, groups[name], n, outcomes, generated) for name in order]
    comparisons = [paired(name, metric, groups[name], groups[baseline], outcomes)
                   for name in order[1:] for metric in METRICS]
    adjust(comparisons)
    rows_ids = {r["tags"].get("dmat.rows_id") for r in runs}
    return Table(threat=threat, baseline=baseline, n=n, chance=_chance(runs), attacks=_attacks(runs),
                 rows_id=rows_ids.pop() if len(rows_ids) == 1 else None, variants=variants, comparisons=comparisons)


def summarise(name: str, members: list[dict], n: int, outcomes: Any, generated: Any) -> Variant:
    """A variant's accuracies over its seeds: per seed, mean with t-interval, two-level bootstrap, pooled Wilson."""
    import numpy as np

    from dmat.core.stats import pooled_interval, t_interval, two_level_bootstrap

    def accuracy(kind: str) -> Accuracy:
        values = [r["metrics"][f"{kind}_acc"] for r in members]
        seeds = t_interval(values)
        points = np.stack([outcomes(r)[kind] for r in members])
        return Accuracy(per_seed=values, mean=seeds.mean, std=seeds.std,
                        t_ci=None if seeds.low is None else [seeds.low, seeds.high],
                        bootstrap_ci=list(two_level_bootstrap(points)),
                        pooled_ci=list(pooled_interval([round(a * n) for a in values], n)))

    return Variant(variant=name, seeds=[_seed(r) for r in members], n=n, clean=accuracy("clean"),
                   robust=accuracy("robust"), generated=generated(members), run_ids=[r["run_id"] for r in members])


def paired(name: str, metric: str, members: list[dict], base_members: list[dict], outcomes: Any) -> Comparison:
    """One accuracy of a variant against the baseline, over the seeds both ran on the same test points."""
    import numpy as np

    from dmat.core import stats

    base_by_seed = {_seed(r): r for r in base_members}
    pairs, refused = [], []
    for found in members:
        other = base_by_seed.get(_seed(found))
        if other is None:
            continue
        if found["tags"].get("dmat.rows_id") != other["tags"].get("dmat.rows_id"):
            refused.append(f"seed {_seed(found)}: different test rows")
            continue
        pairs.append((found, other))
    if not pairs:
        note = "; ".join(refused) or "no seed in common with the baseline: not paired"
        return Comparison(name, metric, [], [], *[None] * 11, note=note)
    differences = [a["metrics"][f"{metric}_acc"] - b["metrics"][f"{metric}_acc"] for a, b in pairs]
    mine = np.stack([outcomes(a)[metric] for a, _ in pairs])
    theirs = np.stack([outcomes(b)[metric] for _, b in pairs])
    seeds = stats.t_interval(differences)
    points = stats.mcnemar_exact_counts(int((mine & ~theirs).sum()), int((theirs & ~mine).sum()))
    return Comparison(
        variant=name, metric=metric, seeds=[_seed(a) for a, _ in pairs], differences=differences, mean=seeds.mean,
        t_ci=None if seeds.low is None else [seeds.low, seeds.high], p_t=stats.paired_t_p(differences), p_holm=None,
        p_sign_flip=stats.sign_flip_p(differences), p_sign_flip_floor=stats.smallest_sign_flip_p(len(pairs)),
        bootstrap_ci=list(stats.two_level_bootstrap(mine, theirs)),
        seeds_for_power=stats.seeds_for_power(seeds.mean, seeds.std, ALPHA, POWER),
        mcnemar_p=points.p_value, only_variant=points.a_only, only_baseline=points.b_only, note="; ".join(refused))


def adjust(comparisons: list[Comparison]) -> None:
    """Holm-adjust the paired-t p-values of every comparison the table makes (variants × clean and robust)."""
    from dmat.core.stats import holm

    for comparison, adjusted in zip(comparisons, holm([c.p_t for c in comparisons]), strict=True):
        comparison.p_holm = adjusted


def contrasts(runs: list[dict], planned: dict[str, dict[str, float]], labels: dict[str, str],
              outcomes: Any) -> list[Contrast]:
    """Each planned contrast (variant names -> weights), on clean and robust accuracy, Holm-adjusted together."""
    from dmat.core.stats import holm

    by_label: dict[str, dict[int, dict]] = defaultdict(dict)
    for found in runs:
        by_label[found["tags"].get("dmat.variant", "unknown")][_seed(found)] = found
    rows = [contrast(name, weights, metric, {variant: by_label.get(labels[variant], {}) for variant in weights},
                     outcomes) for name, weights in planned.items() for metric in METRICS]
    for row, adjusted in zip(rows, holm([row.p_t for row in rows]), strict=True):
        row.p_holm = adjusted
    return rows


def contrast(name: str, weights: dict[str, float], metric: str, runs: dict[str, dict[int, dict]],
             outcomes: Any) -> Contrast:
    """One contrast on one accuracy over the seeds every variant in it ran on the same test points."""
    import numpy as np

    from dmat.core import stats

    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in runs.values())))
    seeds = [seed for seed in seeds if len({runs[v][seed]["tags"].get("dmat.rows_id") for v in runs}) == 1]
    if not seeds:
        return Contrast(name, weights, metric, [], [], *[None] * 8,
                        note="no seed that every variant ran on the same test points")
    values = [sum(w * runs[v][seed]["metrics"][f"{metric}_acc"] for v, w in weights.items()) for seed in seeds]
    points = sum(w * np.stack([outcomes(runs[v][seed])[metric] for seed in seeds]).astype(np.float64)
                 for v, w in weights.items())
    summary = stats.t_interval(values)
    return Contrast(name=name, weights=weights, metric=metric, seeds=seeds, values=values, mean=summary.mean,
                    t_ci=None if summary.low is None else [summary.low, summary.high], p_t=stats.paired_t_p(values),
                    p_holm=None, p_sign_flip=stats.sign_flip_p(values),
                    p_sign_flip_floor=stats.smallest_sign_flip_p(len(seeds)),
                    bootstrap_ci=list(stats.two_level_bootstrap(points)),
                    seeds_for_power=stats.seeds_for_power(summary.mean, summary.std, ALPHA, POWER))


def name_rows(table: Table, labels: dict[str, str]) -> None:
    """Give rows their grid names, in the grid's order (the baseline stays first)."""
    order = {label: (index, name) for index, (name, label) in enumerate(labels.items())}
    for row in [*table.variants, *table.comparisons]:
        row.name = order[row.variant][1]
    table.variants = table.variants[:1] + sorted(table.variants[1:], key=lambda row: order[row.variant][0])
    table.comparisons.sort(key=lambda c: (order[c.variant][0], METRICS.index(c.metric)))


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
    """Per-point clean and robust outcomes of an evaluate run, downloaded once from its MLflow artifacts."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="dmat-compare-")

    def __call__(self, found: dict) -> dict[str, Any]:
        from dmat.artifacts.loaders import load_outcomes
        from dmat.tracking import download_run_artifact

        run_id = found["run_id"]
        if run_id not in self._cache:
            path = download_run_artifact(run_id, "outcomes.npz", Path(self._dir.name) / run_id)
            loaded = load_outcomes(path)
            self._cache[run_id] = {"clean": loaded.clean_correct.astype(bool),
                                   "robust": loaded.robust_correct.astype(bool)}
        return self._cache[run_id]


# --- what is written ------------------------------------------------------------------------------------------


def markdown(table: Table) -> str:
    """The tables as Markdown: the variants (seed level first), the comparisons with the baseline, the runs."""
    chance = f"{100 * table.chance:.0f}%" if table.chance else "unknown"
    lines = [f"Threat model `{table.threat}`, attacks: {table.attacks}; n = {table.n} test points, the same for "
             f"every run{'' if table.rows_id else ' (NOT the same rows: pairing refused where they differ)'}; "
             f"chance level {chance}. Accuracies in %: mean over seeds [95% t-interval over seeds]; "
             "seeds+points: two-level bootstrap 95% interval.", ""]
    generated = sorted({name for row in table.variants for name in row.generated})
    lines += _rows(["variant", "seeds", "clean", "clean, seeds+points", "robust", "robust, seeds+points",
                    *generated],
                   [[_label(row), ",".join(map(str, row.seeds)), _mean_ci(row.clean.mean, row.clean.t_ci),
                     _ci(row.clean.bootstrap_ci), _mean_ci(row.robust.mean, row.robust.t_ci),
                     _ci(row.robust.bootstrap_ci), *(_number(row.generated.get(name)) for name in generated)]
                    for row in table.variants])
    if table.comparisons:
        lines += ["", f"Against the baseline `{table.baseline}`, seed by seed (differences in percentage points). "
                      "p: paired t-test over seeds; Holm: adjusted for the table's comparisons; sign-flip: exact "
                      "permutation test (its smallest possible p in brackets); seeds for 80% power: a paired t-test "
                      "at 0.05, given the measured spread. McNemar: exact test on the test points, summed over "
                      "seeds — conditional on these trained models, not a test of the recipe.", ""]
        lines += _rows(["variant", "accuracy", "per-seed differences", "mean [95% t-interval]", "p", "Holm p",
                        "sign-flip p", "seeds+points 95%", "seeds for 80% power", "McNemar p (these models)"],
                       [_comparison_cells(c) for c in table.comparisons])
    if table.contrasts:
        lines += ["", "Planned contrasts of the grid, per seed: Σ weight × accuracy (percentage points); p: t-test "
                      "of the per-seed values against 0; Holm: adjusted over the contrasts.", ""]
        lines += _rows(["contrast", "weights", "accuracy", "per seed", "mean [95% t-interval]", "p", "Holm p",
                        "sign-flip p", "seeds+points 95%", "seeds for 80% power"],
                       [_contrast_cells(c) for c in table.contrasts])
    lines += ["", "Per run:", ""]
    lines += _rows(["variant", "seed", "clean", "robust", "run"],
                   [[_label(row), str(seed), _pct(clean), _pct(robust), f"`{run_id[:12]}`"]
                    for row in table.variants
                    for seed, clean, robust, run_id in zip(row.seeds, row.clean.per_seed, row.robust.per_seed,
                                                           row.run_ids, strict=True)])
    return "\n".join(lines) + "\n"


def _comparison_cells(c: Comparison) -> list[str]:
    if not c.seeds:
        return [_label(c), c.metric, c.note, "", "", "", "", "", "", ""]
    return [_label(c), c.metric, ", ".join(f"{100 * d:+.1f}" for d in c.differences),
            f"{100 * c.mean:+.1f}" + (f" [{100 * c.t_ci[0]:+.1f}, {100 * c.t_ci[1]:+.1f}]" if c.t_ci else ""),
            _p(c.p_t), _p(c.p_holm), f"{_p(c.p_sign_flip)} ({_p(c.p_sign_flip_floor)})",
            f"[{100 * c.bootstrap_ci[0]:+.1f}, {100 * c.bootstrap_ci[1]:+.1f}]",
            "—" if c.seeds_for_power is None else str(c.seeds_for_power),
            f"{_p(c.mcnemar_p)} ({c.only_variant} vs {c.only_baseline})"]


def _contrast_cells(c: Contrast) -> list[str]:
    weights = " ".join(f"{w:+g}·{v}" for v, w in c.weights.items())
    if not c.seeds:
        return [f"**{c.name}**", weights, c.metric, c.note, "", "", "", "", "", ""]
    return [f"**{c.name}**", weights, c.metric, ", ".join(f"{100 * v:+.1f}" for v in c.values),
            f"{100 * c.mean:+.1f}" + (f" [{100 * c.t_ci[0]:+.1f}, {100 * c.t_ci[1]:+.1f}]" if c.t_ci else ""),
            _p(c.p_t), _p(c.p_holm), f"{_p(c.p_sign_flip)} ({_p(c.p_sign_flip_floor)})",
            f"[{100 * c.bootstrap_ci[0]:+.1f}, {100 * c.bootstrap_ci[1]:+.1f}]",
            "—" if c.seeds_for_power is None else str(c.seeds_for_power)]


def write_outputs(table: Table, out: Path) -> list[Path]:
    from dmat.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    texts = {"compare.md": markdown(table), "compare.json": json.dumps(asdict(table), indent=2) + "\n",
             "compare.csv": _variants_csv(table), "seeds.csv": _seeds_csv(table),
             "comparisons.csv": _comparisons_csv(table), "contrasts.csv": _contrasts_csv(table)}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    _plot(table, out / "compare.png")
    return [out / name for name in texts] + [out / "compare.png"]


def doc_markers(out: Path) -> tuple[str, str]:
    return f"<!-- compare: {out.as_posix()} -->", "<!-- /compare -->"


def publish(doc: Path, out: Path, text: str) -> None:
    """Put `text` into `doc` between the markers of the result directory `out` (the page a result is quoted on)."""
    from dmat.files import atomic_path

    page = doc.read_text(encoding="utf-8")
    begin, end = doc_markers(out)
    if begin not in page or end not in page.split(begin, 1)[1]:
        raise LookupError(f"{doc} has no lines {begin} ... {end} to put the tables between")
    before, rest = page.split(begin, 1)
    with atomic_path(doc) as tmp:
        tmp.write_text(f"{before}{begin}\n{text}{end}{rest.split(end, 1)[1]}", encoding="utf-8")


def _variants_csv(table: Table) -> str:
    generated = sorted({name for row in table.variants for name in row.generated})
    header = ["name", "variant", "seeds", "n"] + [f"{kind}_{part}" for kind in METRICS for part in (
        "mean", "std", "t_ci_low", "t_ci_high", "bootstrap_ci_low", "bootstrap_ci_high", "pooled_ci_low",
        "pooled_ci_high")] + generated
    rows = []
    for row in table.variants:
        cells: list[Any] = [row.name, row.variant, " ".join(map(str, row.seeds)), row.n]
        for accuracy in (row.clean, row.robust):
            cells += [accuracy.mean, accuracy.std, *(accuracy.t_ci or [None, None]), *accuracy.bootstrap_ci,
                      *accuracy.pooled_ci]
        rows.append(cells + [row.generated.get(name) for name in generated])
    return _csv(header, rows)


def _seeds_csv(table: Table) -> str:
    return _csv(["name", "variant", "seed", "n", "clean_acc", "robust_acc", "run_id"],
                [[row.name, row.variant, seed, row.n, clean, robust, run_id] for row in table.variants
                 for seed, clean, robust, run_id in zip(row.seeds, row.clean.per_seed, row.robust.per_seed,
                                                        row.run_ids, strict=True)])


def _comparisons_csv(table: Table) -> str:
    header = ["name", "variant", "metric", "seeds", "differences", "mean", "t_ci_low", "t_ci_high", "p_t", "p_holm",
              "p_sign_flip", "p_sign_flip_floor", "bootstrap_ci_low", "bootstrap_ci_high", "seeds_for_power",
              "mcnemar_p", "only_variant", "only_baseline", "note"]
    return _csv(header, [[c.name, c.variant, c.metric, " ".join(map(str, c.seeds)), " ".join(map(repr, c.differences)),
                          c.mean, *(c.t_ci or [None, None]), c.p_t, c.p_holm, c.p_sign_flip, c.p_sign_flip_floor,
                          *(c.bootstrap_ci or [None, None]), c.seeds_for_power, c.mcnemar_p, c.only_variant,
                          c.only_baseline, c.note] for c in table.comparisons])


def _contrasts_csv(table: Table) -> str:
    header = ["contrast", "weights", "metric", "seeds", "values", "mean", "t_ci_low", "t_ci_high", "p_t", "p_holm",
              "p_sign_flip", "p_sign_flip_floor", "bootstrap_ci_low", "bootstrap_ci_high", "seeds_for_power", "note"]
    return _csv(header, [[c.name, " ".join(f"{v}={w:g}" for v, w in c.weights.items()), c.metric,
                          " ".join(map(str, c.seeds)), " ".join(map(repr, c.values)), c.mean,
                          *(c.t_ci or [None, None]), c.p_t, c.p_holm, c.p_sign_flip, c.p_sign_flip_floor,
                          *(c.bootstrap_ci or [None, None]), c.seeds_for_power, c.note] for c in table.contrasts])


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _plot(table: Table, path: Path) -> None:
    """Mean over seeds with its t-interval (seed-level whiskers), each seed a dot, the chance level a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from dmat.files import atomic_path

    rows = table.variants
    figure, axes = plt.subplots(figsize=(max(6.0, 1.5 * len(rows)), 4.2), dpi=100)
    for offset, kind, colour, label in ((-0.13, "clean", "tab:blue", "clean"),
                                        (0.13, "robust", "tab:red", table.attacks)):
        for position, row in enumerate(rows):
            accuracy = getattr(row, kind)
            x = position + offset
            axes.scatter([x + 0.06] * len(accuracy.per_seed), accuracy.per_seed, s=12, color=colour, alpha=0.5,
                         linewidths=0, label=f"{label}: one seed" if position == 0 else None)
            whisker = None if accuracy.t_ci is None else [[accuracy.mean - accuracy.t_ci[0]],
                                                          [accuracy.t_ci[1] - accuracy.mean]]
            axes.errorbar([x], [accuracy.mean], yerr=whisker, fmt="o", capsize=4, color=colour,
                          label=f"{label}: mean, 95% t-interval over seeds" if position == 0 else None)
    if table.chance:
        axes.axhline(table.chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({table.chance:.0%})")
    axes.set_xticks(range(len(rows)), [row.name or _short(row.variant) for row in rows], rotation=15, ha="right",
                    fontsize=8)
    axes.set(ylabel="accuracy", title=f"{table.threat}: accuracy per variant (n = {table.n} test points)", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def log_comparison(files: list[Path], experiment: str, table: Table) -> None:
    from dmat.tracking import tool_run

    with tool_run("compare", experiment, {"dmat.threat": table.threat}) as tracked:
        tracked.log_params({"threat": table.threat, "variants": len(table.variants), "baseline": table.baseline,
                            "n": table.n, "attacks": table.attacks})
        for path in files:
            tracked.log_artifact(path)


# --- small helpers ------------------------------------------------------------------------------------------


def _one_value(runs: list[dict], value: Any, what: str) -> Any:
    values = {value(r) for r in runs}
    if len(values) != 1:
        raise LookupError(f"the runs were evaluated on different {what} ({sorted(values)}): not comparable")
    return values.pop()


def _chance(runs: list[dict]) -> float | None:
    """1 / classes, from the evaluate runs' `dmat.classes` tag (None when they do not carry it)."""
    counts = {r["tags"].get("dmat.classes") for r in runs}
    return 1 / int(counts.pop()) if len(counts) == 1 and None not in counts else None


def _attacks(runs: list[dict]) -> str:
    """The attack suite the runs ran, as people name it ("APGD-CE + APGD-T"); refused when it differs."""
    return _one_value(runs, lambda r: " + ".join(a.upper() for a in r["tags"].get("dmat.attacks", "").split(",") if a)
                      or "AutoAttack", "attack suites")


def _seed(found: dict) -> int:
    try:
        return int(found["tags"].get("dmat.seed", "-1"))
    except ValueError:
        return -1


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def _label(row: Variant | Comparison) -> str:
    return f"**{row.name}** `{row.variant}`" if row.name else f"`{row.variant}`"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_ci(mean: float, ci: list[float] | None) -> str:
    return _pct(mean) + ("" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]")


def _ci(ci: list[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _short(label: str, limit: int = 40) -> str:
    return label if len(label) <= limit else label[:limit - 1] + "…"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _fail(message: str, code: int) -> int:
    print(f"dmat compare: error: {message}", file=sys.stderr)
    return code
