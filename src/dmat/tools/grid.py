"""An experiment grid: a committed profile, the variants to run from it, and the seeds of each.

A grid file (e.g. `experiments/cpu-scale.yaml`) names the profile every run starts from, the seeds, the
variants (each a few `key: value` changes to the profile), the baseline variant and the stages to
reproduce. `dmat queue` turns it into queued DVC experiments and `dmat compare --grid` reads their
outcomes back under the variants' names. Everything is validated here, before anything is queued: a
typo in a key, a value out of bounds or two variants that would be indistinguishable stop it with a
message naming the variant.

Two optional keys: `pipeline`, the dvc.yaml the grid runs (default the repository's `dvc.yaml`; another
pipeline's params file and schema come with it, see PIPELINES), and `axes` instead of `variants`: named
axes, each a mapping of value names to changes, whose product is the variants (named `<value>-<value>`,
in the axes' order), e.g. AT modes × training-data conditions.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmat.config import Params, ParamsError, as_dict, flatten, parse_params, read_yaml
from dmat.execution import SEED_KEY, variant_label
from dmat.known_distribution_config import KnownDistributionParams

if TYPE_CHECKING:
    from dmat.tools.slurm import Resources

NAME = re.compile(r"^[a-z0-9][a-z0-9\-]{0,40}$")  # DVC experiment names are built from these
KEYS = {"profile", "name", "seeds", "baseline", "targets", "variants", "contrasts", "pipeline", "axes", "slurm"}
# The repository's pipelines: dvc.yaml -> the params class of its params file (which knows the file's path).
PIPELINES: dict[str, type] = {schema.DVC_FILE: schema for schema in (Params, KnownDistributionParams)}


class GridError(ValueError):
    """A grid file that cannot be queued: names the file, the entry and what is wrong."""


@dataclass(frozen=True)
class Grid:
    path: Path
    profile: str  # path of the profile, relative to the project root (as committed)
    profile_text: str  # the complete params.yaml the profile makes (defaults + its changes)
    name: str
    seeds: tuple[int, ...]
    baseline: str
    targets: tuple[str, ...]
    variants: dict[str, dict[str, Any]]  # variant name -> {dotted key: value}
    labels: dict[str, str]  # variant name -> the `dmat.variant` label its runs carry
    experiment: str  # the MLflow experiment the profile's runs go into
    # contrast name -> {variant name: weight}: per seed, the weighted sum of the variants' accuracies (e.g. an
    # interaction of a 2×2 design: {a1b1: 1, a1b0: -1, a0b1: -1, a0b0: 1}); `dmat compare --grid` tests each
    contrasts: dict[str, dict[str, float]] = field(default_factory=dict)
    pipeline: str = Params.DVC_FILE  # the dvc.yaml it runs, relative to the project root
    params_file: str = Params.PARAMS_FILE  # that pipeline's params file, which `dvc exp run -S` sets
    axes: dict[str, dict[str, str]] | None = None  # variant name -> {axis: value name}, for grids of `axes`
    report: str = Params.GRID_REPORT  # the command that reads the grid's runs back
    slurm: Resources | None = None  # what each run asks SLURM for under `dmat queue --slurm` (the `slurm:` block)

    def experiment_name(self, variant: str, seed: int) -> str:
        return f"{self.name}-{variant}-s{seed}"

    def baseline_label(self, requested: str | None = None) -> str:
        """The `dmat.variant` label of the requested baseline (a variant's name, or a label as
        `dmat compare` prints it), or of the grid's own baseline when none is requested."""
        if requested is None:
            return self.labels[self.baseline]
        return self.labels.get(requested, requested)


def load_grid(path: str | Path, root: Path | None = None) -> Grid:
    path = Path(path)
    root = root or Path.cwd()
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise GridError(f"{path}: cannot read the grid file: {err}") from None
    except ValueError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None
    if (not isinstance(raw, dict) or set(raw) - KEYS or "profile" not in raw
            or ("variants" in raw) == ("axes" in raw)):
        raise GridError(f"{path}: expected a mapping with 'profile' and 'variants' (or instead 'axes'; optionally "
                        "'name', 'seeds', 'baseline', 'targets', 'contrasts', 'pipeline', 'slurm'); got "
                        f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    pipeline = str(raw.get("pipeline", Params.DVC_FILE))
    if pipeline not in PIPELINES:
        raise GridError(f"{path}: pipeline {pipeline!r} is not one of this repository's: {', '.join(PIPELINES)}")
    schema = PIPELINES[pipeline]
    profile = str(raw["profile"])
    profile_raw, profile_text = _read_profile(path, root, profile, schema)
    name = str(raw.get("name", path.stem))
    if not NAME.match(name):
        raise GridError(f"{path}: name {name!r} is not allowed: lower-case letters, digits and '-'")
    seeds = _seeds(path, raw.get("seeds", [0]))
    axes = _axes(path, raw["axes"]) if "axes" in raw else None
    variants = _variants(path, _product(path, raw["axes"]) if axes else raw["variants"])
    baseline = str(raw.get("baseline", next(iter(variants))))
    if baseline not in variants:
        raise GridError(f"{path}: baseline {baseline!r} is not one of the variants: {', '.join(variants)}")
    targets = raw.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise GridError(f"{path}: targets must be a list of dvc.yaml stage names (e.g. evaluate@linf); [] = all")
    reference = flatten(as_dict(parse_params(profile_raw, schema)))
    labels = {}
    for variant, changes in variants.items():
        try:
            params = parse_params(apply_changes(profile_raw, changes), schema)
        except (ParamsError, KeyError) as err:
            raise GridError(f"{path}: variant {variant!r}: {err.args[0]}") from None
        labels[variant] = variant_label(params, reference)
    _check_distinct(path, labels)
    return Grid(path=path, profile=profile, profile_text=profile_text, name=name, seeds=seeds, baseline=baseline,
                targets=tuple(targets), variants=variants, labels=labels,
                experiment=parse_params(profile_raw, schema).base.experiment,
                contrasts=_contrasts(path, raw.get("contrasts", {}), variants), pipeline=pipeline,
                params_file=schema.PARAMS_FILE, axes=axes, report=schema.GRID_REPORT,
                slurm=_slurm(path, raw.get("slurm")))


def apply_changes(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of a params mapping with dotted-key changes applied; KeyError for a key the profile lacks."""
    out = copy.deepcopy(raw)
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"{dotted}: the profile has no section {part!r} there")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"{dotted}: the profile has no such key (write every key the variant changes in the "
                           "profile, so that `dvc exp run -S` can set it)")
        node[leaf] = value
    return out


def _read_profile(path: Path, root: Path, profile: str, schema: type) -> tuple[dict[str, Any], str]:
    """The params the profile makes (plain data) and the complete params file text `dmat queue` puts in place. Another
    pipeline's profile is a complete params file of its schema, naming itself in base.profile."""
    from dmat.profiles import load_profile, profile_title, render

    if schema is not Params:
        return _read_complete_profile(path, root, profile, schema)
    try:
        params, reasons = load_profile(profile, root)
    except ValueError as err:  # ParamsError included
        raise GridError(f"{path}: profile {profile}: {err}") from None
    return as_dict(params), render(params, reasons, profile_title(profile))


def _read_complete_profile(path: Path, root: Path, profile: str, schema: type) -> tuple[dict[str, Any], str]:
    try:
        text = (root / profile).read_text(encoding="utf-8")
        params = parse_params(read_yaml(text), schema)
    except OSError as err:
        raise GridError(f"{path}: profile {profile}: cannot read it: {err}") from None
    except ValueError as err:  # ParamsError included
        raise GridError(f"{path}: profile {profile}: {err}") from None
    if params.base.profile != profile:
        raise GridError(f"{path}: profile {profile} must name itself in base.profile (it says "
                        f"{params.base.profile!r}): the runs' variant labels are the changes from it")
    return as_dict(params), text


def _seeds(path: Path, seeds: Any) -> tuple[int, ...]:
    if (not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in seeds)):
        raise GridError(f"{path}: seeds must be a non-empty list of distinct integers >= 0; got {seeds!r}")
    return tuple(seeds)


def _variants(path: Path, variants: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(variants, dict) or not variants:
        raise GridError(f"{path}: variants must be a non-empty mapping of name -> {{key: value}}")
    out = {}
    for name, changes in variants.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise GridError(f"{path}: variant name {name!r} is not allowed: lower-case letters, digits and '-'")
        changes = changes or {}
        if not isinstance(changes, dict) or not all(isinstance(k, str) for k in changes):
            raise GridError(f"{path}: variant {name!r}: expected a mapping of dotted params keys to values")
        if SEED_KEY in changes:
            raise GridError(f"{path}: variant {name!r} sets {SEED_KEY}: seeds are the grid's 'seeds' list")
        bad = [k for k, v in changes.items() if isinstance(v, dict | list)]
        if bad:
            raise GridError(f"{path}: variant {name!r}: {bad[0]} must be a single value (set nested keys one by one)")
        out[name] = dict(changes)
    return out


def _axes(path: Path, axes: Any) -> dict[str, dict[str, str]]:
    """variant name -> {axis: value name} for the product of the axes (validated by `_product`)."""
    names = list(_product(path, axes))
    values = itertools.product(*(list(options) for options in axes.values()))
    return {name: dict(zip(axes, combination, strict=True)) for name, combination in zip(names, values, strict=True)}


def _product(path: Path, axes: Any) -> dict[str, dict[str, Any]]:
    """The variants of a grid of axes: one per combination of the axes' values, their changes merged."""
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, dict) and v for v in axes.values()):
        raise GridError(f"{path}: axes must be a non-empty mapping of axis -> {{value name: {{key: value}}}}")
    variants = {}
    for combination in itertools.product(*(list(options.items()) for options in axes.values())):
        name = "-".join(str(value) for value, _ in combination)
        changes: dict[str, Any] = {}
        for value, change in combination:
            if not isinstance(change, dict | None):
                raise GridError(f"{path}: axis value {value!r}: expected a mapping of dotted params keys to values")
            shared = set(changes) & set(change or {})
            if shared:
                raise GridError(f"{path}: variant {name!r}: two axes set {sorted(shared)[0]}")
            changes.update(change or {})
        if name in variants:
            raise GridError(f"{path}: two combinations of the axes are both named {name!r}")
        variants[name] = changes
    return variants


def _contrasts(path: Path, contrasts: Any, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    if not isinstance(contrasts, dict):
        raise GridError(f"{path}: contrasts must be a mapping of name -> {{variant: weight}}")
    out = {}
    for name, weights in contrasts.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise GridError(f"{path}: contrast name {name!r} is not allowed: lower-case letters, digits and '-'")
        if (not isinstance(weights, dict) or len(weights) < 2
                or not all(isinstance(w, int | float) and not isinstance(w, bool) and w for w in weights.values())):
            raise GridError(f"{path}: contrast {name!r}: expected at least two variants with non-zero number weights")
        unknown = [v for v in weights if v not in variants]
        if unknown:
            raise GridError(f"{path}: contrast {name!r}: {unknown[0]!r} is not one of the variants: "
                            f"{', '.join(variants)}")
        if abs(sum(weights.values())) > 1e-9:
            raise GridError(f"{path}: contrast {name!r}: its weights must sum to 0 (a difference of accuracies), "
                            f"they sum to {sum(weights.values()):g}")
        out[name] = {variant: float(weight) for variant, weight in weights.items()}
    return out


def _slurm(path: Path, block: Any) -> Resources:
    from dmat.tools.slurm import parse_resources

    try:
        return parse_resources(block, str(path))
    except ValueError as err:
        raise GridError(str(err)) from None


def _check_distinct(path: Path, labels: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, label in labels.items():
        if label in seen:
            raise GridError(f"{path}: variants {seen[label]!r} and {name!r} run the same params ({label}): "
                            "their runs could not be told apart")
        seen[label] = name
