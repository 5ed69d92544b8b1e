"""The known-distribution benchmark as a pipeline: its params, dvc.yaml, stages' contract, grid and report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.config import load_params, parse_params, read_yaml
from dmat.known_distribution_config import PIPELINE_DIR, KnownDistributionParams
from dmat.tools.grid import GridError, load_grid
from dmat.tools.imports import SRC, closure, module_file
from dmat.tools.known_distribution import STAGES
from dmat.tools.known_distribution_report import read_per_seed, summarise
from dmat.tools.queue import queue_commands
from tests.conftest import REPO_ROOT, run_dmat

PIPELINE = REPO_ROOT / PIPELINE_DIR


def tiny_params(experiment: str = "kd-test", steps: int = 5) -> str:
    """One 2-D truth, a few training steps, small evaluation sets: seconds per stage."""
    return f"""
base: {{seed: 0, threads: 1, experiment: {experiment}, profile: {PIPELINE_DIR}/params.yaml}}
truths:
  ring: {{distribution: ring, modes: 4, classes: 2, scale: 0.8, std: 0.05, model: mlp-2d}}
data: {{n: 64, corrupt_fraction: 0.0, corrupt_sigma: 0.3, outlier_fraction: 0.0}}
train: {{steps: {steps}, batch_size: 32, log_every: 2,
        adversarial: {{mode: none, lam: 3.0, floor_min: 0.5, floor_max: 1.0}}}}
evaluate: {{sigmas: [0.1, 1.0], n_denoiser: 64, n_weighted: 64, n_samples: 64, sampler_steps: 4, projections: 16,
           memorisation_quantile: 0.05, attack_n: 8, attack_steps: 2}}
"""


def test_the_committed_params_are_valid_and_name_themselves() -> None:
    params = load_params(PIPELINE / "params.yaml", KnownDistributionParams)
    assert params.base.profile == KnownDistributionParams.PARAMS_FILE
    assert {cfg.distribution for cfg in params.truths.values()} >= {"ring", "patterns"}


def test_params_check_validates_the_benchmarks_file_against_its_own_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmat.config import Params
    from dmat.tools.params import schema_of

    monkeypatch.chdir(REPO_ROOT)
    assert schema_of(f"{PIPELINE_DIR}/params.yaml") is KnownDistributionParams
    assert schema_of("params.yaml") is Params


def test_dvc_yaml_code_deps_cover_what_its_stage_runs() -> None:
    stages = read_yaml((PIPELINE / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["benchmark"] and stages["benchmark"]["cmd"] == "dmat known-distribution run"
    deps = {(PIPELINE / dep).resolve() for dep in stages["benchmark"]["deps"]}
    modules = closure(*(module for module, _ in STAGES.values()), "dmat.tools.known_distribution", "dmat.cli")
    missing = sorted(str(module_file(m).relative_to(SRC.parent)) for m in modules
                     if module_file(m).resolve() not in deps)
    assert not missing, f"{PIPELINE_DIR}/dvc.yaml runs modules its deps do not list: {missing}"


def test_bad_params_and_unknown_truths_exit_2_before_writing(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text(tiny_params().replace("n: 64", "n: 1"))
    result = run_dmat("known-distribution", "train", "--truth", "ring", cwd=tmp_path)
    assert result.returncode == 2 and "data.n = 1" in result.stderr, result.stderr
    (tmp_path / "params.yaml").write_text(tiny_params())
    for command in ("train", "run"):
        result = run_dmat("known-distribution", command, "--truth", "moon", cwd=tmp_path)
        assert result.returncode == 2 and "truths.moon" in result.stderr and "ring" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dvc", "params.yaml"]


def test_run_gives_each_truth_the_numbers_its_separate_stages_give(tmp_path: Path) -> None:
    """`run` (DVC's stage) trains and evaluates every truth in one process; the same commands one process each give
    the same files bit for bit: each stage seeds its own draws, so nothing carries over from the truth before."""
    second = "  ring6: {distribution: ring, modes: 6, classes: 2, scale: 0.8, std: 0.05, model: mlp-2d}\n"
    params = tiny_params().replace("\ndata:", f"\n{second}data:")
    together, apart = tmp_path / "together", tmp_path / "apart"
    for project in (together, apart):
        (project / ".dvc").mkdir(parents=True)
        (project / "params.yaml").write_text(params)
    result = run_dmat("known-distribution", "run", cwd=together)
    assert result.returncode == 0, result.stderr
    for truth in ("ring", "ring6"):
        for stage in ("train", "evaluate"):
            result = run_dmat("known-distribution", stage, "--truth", truth, cwd=apart)
            assert result.returncode == 0, result.stderr
    for truth in ("ring", "ring6"):
        for name in ("train.npz", "samples.npz"):
            with np.load(together / "data" / truth / name) as one, np.load(apart / "data" / truth / name) as other:
                assert one.files == other.files and all(np.array_equal(one[k], other[k]) for k in one.files)
        for stage in ("train", "evaluate"):
            one, other = ({k: v for k, v in json.loads((p / "metrics" / f"{stage}_{truth}.json").read_text()).items()
                           if k != "train_s"} for p in (together, apart))  # train_s: a duration
            assert one == other


def test_evaluate_refuses_a_model_of_another_truth(tmp_path: Path) -> None:
    from dmat.artifacts import known_distribution as layout
    from dmat.checkpoint import save_checkpoint
    from dmat.config import as_dict
    from dmat.core.denoisers import build_denoiser

    (tmp_path / ".dvc").mkdir()
    trained_on = parse_params(read_yaml(tiny_params()), KnownDistributionParams).truths["ring"]
    config = {"name": "mlp-2d", "num_classes": 2, "label_dropout": 0.0, "in_channels": 2, "img_resolution": 1}
    save_checkpoint(tmp_path / layout.model_file("ring"), {
        "format": layout.MODEL_FORMAT, "model_config": config, "model": build_denoiser(**config).state_dict(),
        "truth_config": as_dict(trained_on)})
    (tmp_path / "params.yaml").write_text(tiny_params().replace("modes: 4", "modes: 6"))
    result = run_dmat("known-distribution", "evaluate", "--truth", "ring", cwd=tmp_path)
    assert result.returncode == 1 and "another truth" in result.stderr, result.stderr
    assert not (tmp_path / "metrics" / "evaluate_ring.json").exists()


def test_the_grid_is_the_product_of_its_axes_and_queues_the_benchmarks_pipeline() -> None:
    grid = load_grid(PIPELINE / "grid.yaml", REPO_ROOT)
    assert grid.pipeline == KnownDistributionParams.DVC_FILE and grid.experiment == "known-distribution"
    assert len(grid.variants) == 16 and len(grid.seeds) >= 5
    assert grid.axes["adversarial-corrupted"] == {"mode": "adversarial", "condition": "corrupted"}
    assert grid.variants["adversarial-corrupted"] == {"train.adversarial.mode": "adversarial",
                                                      "data.corrupt_fraction": 0.9}
    name, command = queue_commands(grid, ["random-small-n"])[0]
    file = KnownDistributionParams.PARAMS_FILE
    assert name == "kd-random-small-n-s0"
    assert command[-1] == KnownDistributionParams.DVC_FILE
    assert {f"{file}:train.adversarial.mode=random", f"{file}:data.n=64", f"{file}:base.seed=0"} <= set(command)


@pytest.mark.parametrize(("axes", "message"), [
    ("a: {x: {train.steps: 2}}\n  b: {y: {train.steps: 3}}", "two axes set train.steps"),
    ("a: {x: {train.no_such_key: 2}}", "no such key"),
    ("a: {}", "non-empty mapping"),
])
def test_bad_axes_are_refused_naming_the_problem(tmp_path: Path, axes: str, message: str) -> None:
    (tmp_path / PIPELINE_DIR).mkdir(parents=True)
    shutil.copy(PIPELINE / "params.yaml", tmp_path / PIPELINE_DIR / "params.yaml")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"pipeline: {PIPELINE_DIR}/dvc.yaml\nprofile: {PIPELINE_DIR}/params.yaml\naxes:\n  {axes}\n")
    with pytest.raises(GridError, match=message):
        load_grid(grid, tmp_path)


def test_the_summary_pairs_seeds_and_tests_over_them(tmp_path: Path) -> None:
    """adversarial is lower than none by exactly 1 on every seed; random differs by noise around 0."""
    axes = {f"{m}-{c}": {"mode": m, "condition": c} for m in ("none", "random", "adversarial") for c in ("clean",)}
    rows = []
    for seed, noise in enumerate([0.3, -0.2, 0.1, -0.4, 0.2]):
        for mode, shift in (("none", 0.0), ("adversarial", -1.0), ("random", noise)):
            rows.append({"truth": "ring", "variant": f"{mode}-clean", "seed": seed, "mode": mode, "condition": "clean",
                         "sliced_w2": 10.0 + seed + shift, "sliced_w2_true": 2.0, "log_density": 1.0 + shift})
    path = tmp_path / "per_seed.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {(c.metric, c.value): c for c in summarise(read_per_seed(path), axes, "mode", "none")}
    adversarial = summary[("sliced_w2", "adversarial")]
    assert adversarial.seeds == 5 and adversarial.difference == pytest.approx(-1.0)
    assert adversarial.p_t == 0.0 and adversarial.p_sign_flip == pytest.approx(2 / 32)
    assert adversarial.verdict == "better" and adversarial.floor_true == 2.0
    assert summary[("log_density", "adversarial")].verdict == "worse"  # higher is better there
    noisy = summary[("sliced_w2", "random")]
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.p_t > 0.5 and noisy.verdict == "no significant difference"


def test_profile_variant_labels_are_the_changes_from_the_pipelines_own_file() -> None:
    from dmat.execution import variant_label

    raw = read_yaml((PIPELINE / "params.yaml").read_text())
    reference = parse_params(raw, KnownDistributionParams)
    raw["train"]["adversarial"]["mode"] = "adversarial"
    from dmat.config import as_dict, flatten

    label = variant_label(parse_params(raw, KnownDistributionParams), flatten(as_dict(reference)))
    assert label == 'train.adversarial.mode="adversarial"'


def test_the_2d_picture_is_drawn_when_the_sampler_diverged(tmp_path: Path) -> None:
    """A diverged model (samples at 1e22, as the invariance ablation makes at λ = 3) still gets its picture: the
    view stops at a few times the truth's extent instead of flattening the density's contours to nothing."""
    import torch

    from dmat.artifacts.known_distribution import truth_of
    from dmat.stages.known_distribution.evaluate import _scatter

    params = load_params(PIPELINE / "params.yaml", KnownDistributionParams)
    mixture = truth_of(params.truths["ring"])
    samples = torch.cat([mixture.sample(64, torch.Generator().manual_seed(0))[0], torch.full((64, 2), 1e22)])
    picture = tmp_path / "samples.png"
    _scatter(picture, "diverged", mixture, samples, mixture.sample(32, torch.Generator().manual_seed(1))[0])
    assert picture.read_bytes().startswith(b"\x89PNG")


RESULTS = REPO_ROOT / "experiments" / "results" / "known-distribution"


def test_the_published_tables_come_from_the_committed_per_seed_values() -> None:
    """docs/known-distribution.md quotes `dmat known-distribution report --doc`: its tables are what the committed
    per-seed CSV gives today (anyone can recompute them with `--from-csv`)."""
    from dmat.tools.compare import doc_markers
    from dmat.tools.known_distribution_report import markdown

    if not (RESULTS / "per_seed.csv").is_file():
        pytest.skip("no committed results of the known-distribution grid")
    grid = load_grid(PIPELINE / "grid.yaml", REPO_ROOT)
    rows = read_per_seed(RESULTS / "per_seed.csv")
    expected = markdown(summarise(rows, grid.axes, "mode", "none"), "mode", "none", len({r["seed"] for r in rows}))
    page = (REPO_ROOT / "docs" / "known-distribution.md").read_text(encoding="utf-8")
    begin, end = doc_markers(Path("experiments/results/known-distribution"))
    assert page.split(begin, 1)[1].split(end, 1)[0] == f"\n{expected}"
    assert (RESULTS / "summary.md").read_text(encoding="utf-8") == expected
