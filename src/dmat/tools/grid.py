"""An experiment grid: a committed profile, the variants to run from it, and the seeds of each.

A grid file (e.g. `experiments/cpu-scale.yaml`) names the profile every run starts from, the seeds, the
variants (each a few `key: value` changes to the profile), the baseline variant and the stages to
reproduce. `dmat queue` turns it into queued DVC experiments and `dmat compare --grid` reads their
outcomes back under the variants' names. Everything is validated here, before anything is queued: a
typo in a key, a value out of bounds or two variants that would be indistinguishable stop it with a
message naming the variant.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmat.config import ParamsError, as_dict, flatten, parse_params, read_yaml
from dmat.execution import SEED_KEY, variant_label

if TYPE_CHECKING:
    from dmat.tools.slurm import Resources

NAME = re.compile(r"^[a-z0-9][a-z0-9\-]{0,40}$")  # DVC experiment names are built from these
KEYS = {"profile", "name", "seeds", "baseline", "targets", "variants", "contrasts", "slurm"}


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
    if not isinstance(raw, dict) or set(raw) - KEYS or not {"profile", "variants"} <= set(raw):
        raise GridError(f"{path}: expected a mapping with 'profile' and 'variants' (and optionally 'name', 'seeds', "
                        "'baseline', 'targets', 'contrasts', 'slurm'); got "
                        f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    profile = str(raw["profile"])
    profile_raw, profile_text = _read_profile(path, root, profile)
    name = str(raw.get("name", path.stem))
    if not NAME.match(name):
        raise GridError(f"{path}: name {name!r} is not allowed: lower-case letters, digits and '-'")
    seeds = _seeds(path, raw.get("seeds", [0]))
    variants = _variants(path, raw["variants"])
    baseline = str(raw.get("baseline", next(iter(variants))))
    if baseline not in variants:
        raise GridError(f"{path}: baseline {baseline!r} is not one of the variants: {', '.join(variants)}")
    targets = raw.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise GridError(f"{path}: targets must be a list of dvc.yaml stage names (e.g. evaluate@linf); [] = all")
    reference = flatten(as_dict(parse_params(profile_raw)))
    labels = {}
    for variant, changes in variants.items():
        try:
            params = parse_params(apply_changes(profile_raw, changes))
        except (ParamsError, KeyError) as err:
            raise GridError(f"{path}: variant {variant!r}: {err.args[0]}") from None
        labels[variant] = variant_label(params, reference)
    _check_distinct(path, labels)
    return Grid(path=path, profile=profile, profile_text=profile_text, name=name, seeds=seeds, baseline=baseline,
                targets=tuple(targets), variants=variants, labels=labels,
                experiment=parse_params(profile_raw).base.experiment,
                contrasts=_contrasts(path, raw.get("contrasts", {}), variants), slurm=_slurm(path, raw.get("slurm")))


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


def _read_profile(path: Path, root: Path, profile: str) -> tuple[dict[str, Any], str]:
    """The params the profile makes (plain data) and the complete params.yaml text `dmat queue` puts in place."""
    from dmat.profiles import load_profile, profile_title, render

    try:
        params, reasons = load_profile(profile, root)
    except ValueError as err:  # ParamsError included
        raise GridError(f"{path}: profile {profile}: {err}") from None
    return as_dict(params), render(params, reasons, profile_title(profile))


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
