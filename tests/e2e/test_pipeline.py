"""End to end: `dvc repro` for real in a temporary copy of the repository, then read MLflow back.

The harness grows with every stage: it copies the project (tracked and untracked-but-not-ignored
files, as a fresh clone would have them), writes tiny params, and runs the real pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dmat.data.store import ArrayStore
from dmat.files import sha256_file
from tests.conftest import BIN_DIR, REPO_ROOT, SHARED_ARCHIVE, encode_png, make_archive, make_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GIT_ENV = {"GIT_AUTHOR_NAME": "dmat-test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "dmat-test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def tiny_params(data_path: Path) -> str:
    """Every stage doing its real job on a few images, in seconds."""
    return f"""
base: {{seed: 1, experiment: e2e, precision: auto, memory_format: auto, compile: false}}
data:
  name: cifar10
  source: imagefolder
  path: {data_path}
  val_size: 20
  train_limit: 60
  test_limit: 30
  heldout_size: 20
train_reference: {{epochs: 1, batch_size: 16, val_limit: 8}}
train_diffusion: {{steps: 4, batch_size: 8, log_every: 2, checkpoint_every: 2, grid_steps: 2, label_dropout: 0.1,
                  adversarial: {{mode: adversarial}}}}
generate: {{per_class: 2, batch_size: 8, network_batch: 4, steps: 2, guidance: 3}}
mix: {{synthetic_fraction: 0.5}}
train: {{epochs: 1, batch_size: 16, val_limit: 8, attack: {{steps: 1}}, val_attack_steps: 2}}
evaluate:
  n: 30
  version: custom
  attacks: [apgd-ce, apgd-t, square]
  square_queries: 100
  pgd_steps: 2
  sweep_steps: 5
  threats:
    linf: {{norm: Linf, eps: 8/255, sweep: [0, 4/255, 8/255], large_eps: 0.5}}
    l2: {{norm: L2, eps: 0.5, sweep: [0, 0.5], large_eps: 20}}
verify: {{parity_batches: [1, 7, 30], square_n: 10, square_queries: 50, latency_runs: 5, registered_model: e2e-model}}
evaluate_diffusion: {{n_real: 30, n_generated_per_class: 2, n_denoiser: 8, sigmas: [0.2, 1.0], attack_steps: 2,
                     batch_size: 8}}
"""


STAGES = ("prepare", "train_reference", "train_diffusion", "generate", "mix", "train", "evaluate@linf", "evaluate@l2",
          "export", "verify", "evaluate_diffusion")


def copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(cmd: list[str], cwd: Path, expect: int | None = 0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` as a user would (the venv on PATH; `env` adds or overrides variables); assert its exit code
    (`expect=None`: any)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_STAGE")},
           **GIT_ENV, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert expect is None or result.returncode == expect, \
        f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline: Path) -> Path:
    """The session's tiny pipeline (tests/conftest.py), read only: tests that change a project use a copy."""
    return tiny_pipeline


def project_copy(pipeline: Path, tmp_path: Path) -> Path:
    return shutil.copytree(pipeline, tmp_path / "project", symlinks=True)


def build_pipeline(base: Path) -> Path:
    """Copy the repository into `base`, commit it with tiny params and run `dvc repro` (other e2e modules use it)."""
    if SHARED_ARCHIVE.is_file():
        data_path = SHARED_ARCHIVE
    else:  # a fresh clone without the offline archive beside it: a small image folder made here
        data_path = make_archive(make_image_folder(base / "folder", {"train": 40, "test": 10}, size=32),
                                 base / "tiny.tar.gz")
    project = copy_project(base / "project")
    (project / "params.yaml").write_text(tiny_params(data_path))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "e2e"], project)
    # every stage records the project files it opens (dmat.audit), for test_stages_open_only_what_they_declare
    run([str(BIN_DIR / "dvc"), "repro"], project, env={"DMAT_AUDIT": str(base / "audit.jsonl")})
    return project


def test_outputs_are_canonical_stores(pipeline: Path) -> None:
    sizes = {n: len(ArrayStore.open(pipeline / "data" / "real" / n, verify=True))
             for n in ("train", "val", "test", "heldout")}
    assert sizes == {"train": 60, "val": 20, "test": 30, "heldout": 20}
    assert len(ArrayStore.open(pipeline / "data" / "synthetic", verify=True)) == 2 * 10


def test_stages_open_only_what_they_declare(pipeline: Path) -> None:
    """DVC reruns a stage only when a declared input changes: a stage must not read (or write) anything else."""
    from dmat.audit import read_records, undeclared

    records = read_records(pipeline.parent / "audit.jsonl")
    assert {r["stage"] for r in records} >= {"prepare", "train", "generate", "evaluate", "verify", "export"}
    assert any(r["path"] == "data/real/train/images.npy" and not r["write"] for r in records if r["stage"] == "train")
    assert undeclared(records) == [], "declare them in src/dmat/pipeline.py (then `dmat pipeline render`)"


def test_every_stage_wrote_its_declared_outputs(pipeline: Path) -> None:
    for path in ("metrics/prepare.json", "metrics/train_diffusion.json", "metrics/generate.json",
                 "plots/generate_grid.png", "data/mixed/manifest.json", "models/diffusion/checkpoint.pt",
                 "models/classifier/best.pt", "models/classifier/last.pt", "metrics/train.json",
                 "plots/train_curves.csv", "metrics/evaluate_linf.json", "metrics/evaluate_l2.json",
                 "plots/evaluate_linf_sweep.csv", "models/eval/linf/images.npy", "models/eval/l2/robustbench.json",
                 "models/export/classifier.onnx", "models/export/classifier.pt2", "models/export/denoiser.onnx",
                 "metrics/verify.json", "metrics/evaluate_diffusion.json", "models/eval/linf/report.json",
                 "models/reference/best.pt", "metrics/train_reference.json", "plots/train_reference_curves.csv",
                 *(f"reports/{stage}.json" for stage in ("prepare", "train_diffusion", "generate", "verify",
                                                         "evaluate_diffusion", "train_reference"))):
        assert (pipeline / path).is_file(), path
    result = run([str(BIN_DIR / "dvc"), "metrics", "show", "--json"], pipeline)
    for key in ("best_val_robust_acc", "diffusion_images_per_s", "linf_robust_acc", "l2_sanity_passed",
                "fd_reference", "heldout_fd_reference", "reference_test_acc"):
        assert key in result.stdout, key
    plots = run([str(BIN_DIR / "dvc"), "plots", "show", "--json"], pipeline).stdout
    assert "evaluate_linf_sweep.csv" in plots and "generate_grid.png" in plots


def test_evaluation_reports_attacks_classes_and_sanity(pipeline: Path) -> None:
    report = json.loads((pipeline / "models/eval/linf/report.json").read_text())
    assert report["n"] == 30 and 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    dlr_possible = len(report["classes"]) >= 4  # the tiny fallback folder has 3 classes: no targeted DLR
    assert report["attacks"] == ["apgd-ce", *(["apgd-t"] if dlr_possible else []), "square", "pgd-ce", "pgd-cw"]
    assert set(report["per_attack"]) == {"clean", *report["attacks"]}
    assert report["per_attack"]["pgd-cw"] == report["robust_acc"]
    assert set(report["per_class"]["robust"]) == set(report["classes"])
    assert report["sanity"]["examples_in_ball"]["passed"] and report["sanity"]["eps_zero_equals_clean"]["passed"]
    examples = np.load(pipeline / "models/eval/linf/images.npy")
    assert examples.shape == (30, 32, 32, 3) and examples.dtype == np.float32
    record = json.loads((pipeline / "models/eval/linf/robustbench.json").read_text())
    assert record["eps"] == "8/255" and float(record["autoattack_acc"]) == pytest.approx(100 * report["robust_acc"])


def test_stage_robust_accuracy_equals_a_direct_pyautoattack_call(pipeline: Path) -> None:
    """Same model, points, seed and attacks: the stage's AutoAttack part is exactly pyautoattack's."""
    import pyautoattack
    import torch

    from dmat.artifacts.loaders import load_classifier
    from dmat.core.robustness import batch_seed
    from dmat.data.tensors import first_points

    report = json.loads((pipeline / "models/eval/linf/report.json").read_text())
    model, _ = load_classifier(pipeline / "models/classifier/best.pt")
    x, y = first_points(ArrayStore.open(pipeline / "data/real/test"), report["n"])
    attacks = [a for a in report["attacks"] if not a.startswith("pgd-")]
    assert report["n"] <= 250  # one batch of evaluate.batch_size: one AutoAttack run, seeded for global batch 0
    adversary = pyautoattack.AutoAttack(model, attacks=attacks, device="cpu", eps=report["eps"], norm="Linf",
                                        seed=batch_seed(report["seed"], 0), version="custom")
    adversary.apgd_targeted.n_target_classes = min(9, len(report["classes"]) - 1)
    adversary.square.n_queries = 100
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=250)
    with torch.no_grad():
        direct = (model(x_adv).argmax(1) == y).double().mean().item()
    assert report["per_attack"][attacks[-1]] == direct


def test_serve_answers_a_png_upload_with_the_right_class(pipeline: Path, tmp_path: Path) -> None:
    from dmat.artifacts.onnx_classifier import OnnxClassifier
    from tests.deploy.helpers import http_request, multipart, running_server, serve_command

    test = ArrayStore.open(pipeline / "data/real/test")
    images, labels = test.read(np.arange(len(test)))
    logits = OnnxClassifier(pipeline / "models/export/classifier.onnx").run(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255)
    right = np.flatnonzero(logits.argmax(1) == labels)[:3]
    assert len(right), "the tiny model classifies no test image correctly"
    body, content_type = multipart([("image", f"{i}.png", encode_png(images[i])) for i in right])
    with running_server(serve_command("models/export/classifier.onnx"), tmp_path / "serve.log", cwd=pipeline) as (
            url, _):
        status, _, answer = http_request(url, "POST", "/predict", body, {"Content-Type": content_type})
    assert status == 200
    assert [p["class_name"] for p in answer["predictions"]] == [test.classes[labels[i]] for i in right]


def test_verify_passes_every_gate_and_registers_the_model(pipeline: Path) -> None:
    report = json.loads((pipeline / "reports/verify.json").read_text())
    assert report["passed"] and not report["failed"]
    assert report["gates"]["parity"]["batches"]["7"]["max_abs_diff"] <= 1e-4
    assert report["registry"]["version"] == "1" and report["registry"]["champion_moved"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("e2e-model", "champion")
    assert champion.tags["dmat.norm"] == "Linf" and float(champion.tags["dmat.robust_acc"]) == pytest.approx(
        json.loads((pipeline / "metrics/evaluate_linf.json").read_text())["linf_robust_acc"])


def test_robustness_command_on_the_exported_artifacts(pipeline: Path, tmp_path: Path) -> None:
    common = ["--data", "data/real/test", "--n", "10", "--eps", "8/255", "--seed", "3"]
    run([str(BIN_DIR / "dmat"), "robustness", "models/export/classifier.pt2", *common, "--version", "custom",
         "--attacks", "apgd-ce", "--json", str(tmp_path / "pt2.json")], pipeline)
    white_box = json.loads((tmp_path / "pt2.json").read_text())
    assert white_box["settings"]["model_kind"] == "torch.export" and not white_box["gradient_free_only"]
    run([str(BIN_DIR / "dmat"), "robustness", "models/export/classifier.onnx", *common, "--version", "custom",
         "--attacks", "square", "--square-queries", "30", "--json", str(tmp_path / "onnx.json")], pipeline)
    black_box = json.loads((tmp_path / "onnx.json").read_text())
    assert black_box["gradient_free_only"] and black_box["attacks"] == ["square"]
    assert black_box["clean_acc"] == white_box["clean_acc"]


EXP_SHOW_COLUMN_BUDGET = 300  # today about 275: metrics ~60, params ~130 (the tiny params and the known-distribution
# benchmark's params file, which DVC shows too), deps ~80; the README's command keeps 160 columns (tested below)
HEADLINE_BUDGET = 12  # numbers per metrics file


def test_metrics_files_hold_headline_numbers_and_exp_show_stays_narrow(pipeline: Path) -> None:
    seen: dict[str, str] = {}
    for path in sorted((pipeline / "metrics").glob("*.json")):
        keys = json.loads(path.read_text())
        assert len(keys) <= HEADLINE_BUDGET, f"{path.name}: details belong in a report file"
        shared = {key: seen[key] for key in keys if key in seen}
        assert not shared, f"{path.name} repeats keys of other metrics files (DVC then widens the columns): {shared}"
        seen.update(dict.fromkeys(keys, path.name))
    table = run([str(BIN_DIR / "dvc"), "exp", "show", "--no-pager", "--md"], pipeline).stdout
    columns = table.splitlines()[0].count("|") - 1
    assert columns <= EXP_SHOW_COLUMN_BUDGET, f"`dvc exp show --md` has {columns} columns"


def image_pipeline_status(project: Path) -> dict:
    """`dvc status` of the image pipeline's stages: not the other pipelines' (`path/dvc.yaml:stage`, never run
    here), nor fetch and fetch_generated (`always_changed`: they check data outside DVC's view on every repro)."""
    status = json.loads(run([str(BIN_DIR / "dvc"), "status", "--json"], project).stdout)
    return {stage: changes for stage, changes in status.items()
            if ":" not in stage and stage not in ("fetch", "fetch_generated")}


def test_a_code_change_marks_the_stage_that_runs_it_and_what_follows(pipeline: Path, tmp_path: Path) -> None:
    """dvc.yaml lists each stage's whole import closure: editing the guidance code invalidates `generate`."""
    import networkx as nx
    from dvc.repo import Repo

    project = project_copy(pipeline, tmp_path)
    guidance = project / "src/dmat/core/guidance.py"
    guidance.write_text(guidance.read_text() + "\nGUIDANCE_EDITED = True\n")
    status = image_pipeline_status(project)
    assert status == {"generate": [{"changed deps": {"src/dmat/core/guidance.py": "modified"}}]}
    with Repo(str(project)) as repo:  # everything downstream of generate reruns once data/synthetic changes
        graph = repo.index.graph
        # stage.name, not stage.addressing: addressing is relative to the working directory (path:name here)
        generate = next(stage for stage in graph if getattr(stage, "name", None) == "generate")
        downstream = {stage.name for stage in graph if generate in nx.descendants(graph, stage)}
    assert downstream == {"mix", "train", "evaluate@linf", "evaluate@l2", "export", "verify", "evaluate_diffusion"}


def test_a_diffusion_variant_reruns_the_diffusion_chain_but_not_the_reference(pipeline: Path,
                                                                             tmp_path: Path) -> None:
    """The reference classifier is the fixed yardstick: `-S train_diffusion.adversarial.mode=...` changes the
    diffusion chain, never train_reference (nor the robust classifier's own evaluation of it)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides

    project = project_copy(pipeline, tmp_path)
    apply_overrides(str(project / "params.yaml"), ["train_diffusion.adversarial.mode=none"])  # what `-S` does
    status = image_pipeline_status(project)
    assert status == {"train_diffusion": [{"changed deps": {"params.yaml": {"train_diffusion": "modified"}}}]}
    with Repo(str(project)) as repo:
        graph = repo.index.graph
        stage = {s.name: s for s in graph if hasattr(s, "name")}  # names: addressing is cwd-relative
        reruns = {s.name for s in graph if stage["train_diffusion"] in nx.descendants(graph, s)}
        feeds_evaluation = {s.name for s in nx.descendants(graph, stage["evaluate_diffusion"])}
    assert reruns == {"generate", "mix", "train", "evaluate@linf", "evaluate@l2", "export", "verify",
                      "evaluate_diffusion"}
    assert "train_reference" not in reruns and "train_reference" in feeds_evaluation  # the yardstick, unchanged


def test_params_switched_back_restore_the_trained_models_from_the_run_cache(pipeline: Path, tmp_path: Path) -> None:
    """The model stages keep no `persist` outputs, so DVC's run cache knows them: back on params it has trained
    with (the next seed of a grid's variant sharing the diffusion model, or an edit undone), `dvc repro` checks
    the trained models out instead of training them again."""
    from dvc.utils.hydra import apply_overrides

    project = project_copy(pipeline, tmp_path)
    models = ("models/diffusion/checkpoint.pt", "models/reference/best.pt", "models/classifier/best.pt")
    trained = {path: sha256_file(project / path) for path in models}
    committed = (project / "params.yaml").read_text()
    apply_overrides(str(project / "params.yaml"), ["train_diffusion.label_dropout=0.2", "train_reference.val_limit=7",
                                                   "train.val_limit=7"])
    changed = run([str(BIN_DIR / "dvc"), "repro", "train_diffusion", "train_reference", "train"], project)
    assert {"train_diffusion", "train_reference", "train"} <= set(re.findall(r"Running stage '([^']+)'",
                                                                               changed.stdout)), changed.stdout
    assert all(sha256_file(project / path) != trained[path] for path in models)
    assert not (project / ".dmat/work").exists() or not any((project / ".dmat/work").iterdir())
    (project / "params.yaml").write_text(committed)
    back = run([str(BIN_DIR / "dvc"), "repro", "train_diffusion", "train_reference", "train"], project)
    for stage in ("train_diffusion", "train_reference", "train"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back.stdout, back.stdout
    assert {path: sha256_file(project / path) for path in models} == trained


def test_second_repro_is_up_to_date(pipeline: Path) -> None:
    """Only `fetch` and `fetch_generated` run again (they always look at the data outside DVC's view); the data has
    not changed, so nothing else does."""
    result = run([str(BIN_DIR / "dvc"), "repro"], pipeline)
    assert sorted(re.findall(r"Running stage '([^']+)'", result.stdout)) == ["fetch", "fetch_generated"], \
        result.stdout


def stage_runs(client, experiment_id: str) -> dict:
    """The stage runs of an experiment by name (without the parent runs of pipeline executions)."""
    return {r.info.run_name: r for r in client.search_runs([experiment_id])
            if r.data.tags.get("dmat.role") != "pipeline"}


def test_mlflow_has_one_run_per_stage_with_lineage(pipeline: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = stage_runs(client, experiment.experiment_id)
    assert set(runs) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # one `dvc repro` of the committed params: one parent run, variant "baseline", the committed seed
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
    assert {(r.data.tags["dmat.variant"], r.data.tags["dmat.seed"]) for r in runs.values()} == {("baseline", "1")}
    commit = run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    for name, stage_run in runs.items():
        assert stage_run.data.tags["dvc.stage"] == name and stage_run.data.tags["git.commit"] == commit
    assert runs["prepare"].data.params["data.train_limit"] == "60"
    assert {d.dataset.name for d in runs["prepare"].inputs.dataset_inputs} >= {"real/train", "real/val", "real/test"}
    synthetic = ArrayStore.open(pipeline / "data" / "synthetic").digest
    assert {d.dataset.digest for d in runs["train"].inputs.dataset_inputs} >= {synthetic[:36]}
    assert runs["generate"].data.tags["dmat.adversarial_mode"] == "adversarial"
    recipe = runs["evaluate@linf"].data.params
    assert recipe["recipe.diffusion.adversarial_mode"] == "adversarial"
    assert recipe["recipe.mix.synthetic_fraction"] == "0.5" and recipe["recipe.train.loss"] == "trades"
    assert runs["evaluate@linf"].data.metrics["robust_acc"] <= runs["evaluate@linf"].data.metrics["clean_acc"]


@pytest.fixture(scope="module")
def experimented(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the pipeline with one more experiment, run in DVC's temporary copy: `dvc exp run --temp`."""
    project = project_copy(pipeline, tmp_path_factory.mktemp("experimented"))
    run([str(BIN_DIR / "dvc"), "exp", "run", "--temp", "-n", "more-epochs", "-S", "train.epochs=2"], project)
    return project


def test_dvc_exp_run_temp_lands_in_the_same_store(experimented: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = experimented
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = stage_runs(client, experiment.experiment_id)
    assert "train@more-epochs" in runs and "verify@more-epochs" in runs
    version2 = client.get_model_version("e2e-model", "2")  # the experiment's model: a second registered version
    assert str(client.get_model_version_by_alias("e2e-model", "candidate").version) == "2"
    champion = str(client.get_model_version_by_alias("e2e-model", "champion").version)
    # the champion moves only on evidence (McNemar against version 1 on the same points), recorded on version 2
    rule = {k.removeprefix("dmat.champion_rule."): v for k, v in version2.tags.items() if "champion_rule." in k}
    assert rule["compared_with_version"] == "1" and rule["decision"] in ("moves", "stays")
    assert champion == ("2" if rule["decision"] == "moves" else "1")
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
    artifacts = Path(runs["train@more-epochs"].info.artifact_uri.removeprefix("file://"))
    assert not artifacts.is_relative_to(project.resolve() / ".dvc") and (artifacts / "train_curves.csv").is_file()


def readme_comparison_command() -> list[str]:
    """The `dvc exp show` command the README gives for comparing experiments."""
    import shlex

    lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines() if line.startswith("dvc exp show")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("  #")[0])


def test_readme_comparison_command_fits_a_160_column_terminal(experimented: Path) -> None:
    command = readme_comparison_command()
    env = {"COLUMNS": "160"}
    result = subprocess.run([str(BIN_DIR / "dvc"), *command[1:], "--no-pager"], cwd=experimented, capture_output=True,
                            text=True, env={**os.environ, **env, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"},
                            timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 160, result.stdout
    header = next(line for line in lines if "Experiment" in line)
    assert "…" not in header and "linf_robust_acc" in header and "mix.synthetic_fraction" in header, result.stdout
    more_epochs = next(line for line in lines if "more-epochs" in line)
    assert "!" not in more_epochs and "-" not in more_epochs.split("]", 1)[1], result.stdout  # every figure is there


def test_failed_gate_exits_nonzero_naming_it(pipeline: Path, tmp_path: Path) -> None:
    project = project_copy(pipeline, tmp_path)
    strict = tmp_path / "strict.yaml"
    params = (project / "params.yaml").read_text().replace("latency_runs: 5,", "latency_runs: 5, "
                                                            "latency_budget_ms: 0.000001, register: false,")
    strict.write_text(params)
    result = run([str(BIN_DIR / "dmat"), "verify", "--params", str(strict)], project, expect=1)
    assert "latency_budget" in result.stderr
    assert json.loads((project / "reports/verify.json").read_text())["failed"] == ["latency_budget"]
