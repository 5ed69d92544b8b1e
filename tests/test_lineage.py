"""`dmat lineage` on a small hand-built project: real stores, a diffusion checkpoint, a generated store and a
mix manifest, recorded in a real dvc.lock (DVC's own `commit`) and a real MLflow store.

The full chain from the ONNX model after `dvc repro` is covered by tests/e2e/test_lineage.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dmat.artifacts import layout
from dmat.artifacts.records import DenoiserConfig, DiffusionHeader, checkpoint_contents
from dmat.checkpoint import save_checkpoint
from dmat.cli import main
from dmat.data.store import ArrayStore, write_store
from dmat.files import sha256_file, write_json
from dmat.tools.lineage import MISSING, STALE, VERIFIED, locate, node_key

CLASSES = ("a", "b")
DVC_YAML = """
stages:
  prepare:
    cmd: "true"
    deps: [source.bin]
    outs: [data/real/train]
  train_diffusion:
    cmd: "true"
    deps: [data/real/train]
    outs: [models/diffusion]
  generate:
    cmd: "true"
    deps: [models/diffusion]
    outs: [data/synthetic]
  mix:
    cmd: "true"
    deps: [data/real/train, data/synthetic]
    params: [mix.synthetic_fraction]
    outs: [data/mixed]
"""


def tiny_store(path: Path, seed: int, source: dict) -> ArrayStore:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    return write_store(path, images, np.arange(6) % len(CLASSES), CLASSES, source)


def diffusion_run(root: Path, real: ArrayStore) -> str:
    """A finished `train_diffusion` run that logged data/real/train as its input, as the stage does."""
    import mlflow

    from dmat.tracking import StageRun

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("lineage", artifact_location=(root / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment, tags={"dmat.stage": "train_diffusion"}) as run:
        StageRun(mlflow, run.info.run_id).log_store(real, "real/train", context="training")
    return run.info.run_id


def build_project(root: Path) -> Path:
    from dvc.repo import Repo

    (root / "source.bin").write_bytes(b"the real images, as downloaded")
    real = tiny_store(root / "data/real/train", 0, {"kind": "npz", "path": "source.bin",
                                                     "sha256": sha256_file(root / "source.bin"), "split": "train"})
    run_id = diffusion_run(root, real)
    checkpoint = root / "models/diffusion/checkpoint.pt"
    header = DiffusionHeader(
        format=layout.DIFFUSION_FORMAT, fingerprint="0" * 16, step=4,
        model_config=DenoiserConfig(name="unet-tiny", img_resolution=8, in_channels=3, num_classes=2,
                                    label_dropout=0.0),
        classes=("a", "b"), adversarial={"mode": "adversarial", "lam": 0.3}, mlflow_run_id=run_id, log=(),
        train_config={"steps": 4, "corrupt": {"fraction": 0.0}}, precision={"precision": "fp32"})
    save_checkpoint(checkpoint, checkpoint_contents(header, {}))
    synthetic = tiny_store(root / "data/synthetic", 1, {
        "kind": "generated", "sampler": "heun", "steps": 2, "seed": 0, "filter_keep": 1.0,
        "diffusion": {"mlflow_run_id": run_id, "checkpoint_sha256": sha256_file(checkpoint),
                      "adversarial": {"mode": "adversarial"}}})
    (root / "data/mixed").mkdir(parents=True)
    np.save(root / "data/mixed/synthetic_indices.npy", np.arange(6))
    write_json(root / "data/mixed/manifest.json", {
        "real": {"path": "data/real/train", "sha256": real.digest, "images": 6},
        "synthetic": {"path": "data/synthetic", "sha256": synthetic.digest, "images": 6, "used": 6},
        "synthetic_fraction": 0.5, "synthetic_limit": None, "seed": 0, "indices_file": "synthetic_indices.npy",
        "indices_sha256": sha256_file(root / "data/mixed/synthetic_indices.npy")})
    (root / "params.yaml").write_text("mix:\n  synthetic_fraction: 0.5\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    with Repo.init(str(root), no_scm=True) as repo:
        repo.commit(force=True)  # dvc.lock records the files as they are: what `dvc repro` would have written
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lineage") / "project"
    root.mkdir()
    with contextlib.chdir(root):  # DVC works in the working directory, MLflow's default experiment too
        return build_project(root)


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the built project to change, as the working directory."""
    root = shutil.copytree(built, tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def lineage(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict, str]:
    code = main(["lineage", *args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def stage_statuses(report: dict) -> dict[str, str]:
    return {stage["path"]: stage["status"] for stage in report["stages"]}


@pytest.mark.parametrize(("given", "stage"), [
    ("models/export", "export:models/export/classifier.onnx"),
    ("models/export/denoiser.onnx", "export:models/export/denoiser.onnx"),
    ("models/classifier", "classifier:models/classifier/best.pt"),
    ("models/classifier/last.pt", "classifier:models/classifier/last.pt"),
    ("models/eval/linf/images.npy", "evaluation:models/eval/linf"),
    ("models/diffusion", "diffusion:models/diffusion/checkpoint.pt"),
    ("data/synthetic/meta.json", "synthetic:data/synthetic"),
    ("data/real/val", "real:data/real/val"),
    ("README.md", None),
])
def test_paths_map_to_the_stage_that_wrote_them(tmp_path: Path, given: str, stage: str | None) -> None:
    expected = None if stage is None else node_key(stage.split(":")[0], tmp_path / stage.split(":")[1])
    assert locate(tmp_path, tmp_path / given) == expected


def test_fresh_chain_is_verified_stage_by_stage(project: Path, capsys: pytest.CaptureFixture) -> None:
    code, report, err = lineage(capsys, "data/mixed")
    assert code == 0 and report["status"] == VERIFIED and not report["problems"] and not err
    assert stage_statuses(report) == {"data/mixed": VERIFIED, "data/synthetic": VERIFIED,
                                      "models/diffusion/checkpoint.pt": VERIFIED, "data/real/train": VERIFIED,
                                      "source.bin": VERIFIED}
    diffusion = report["stages"][2]
    assert diffusion["details"]["mlflow_run"].split()[0] in json.dumps(diffusion["checks"])
    assert "mode adversarial" in diffusion["details"]["adversarial_training"]
    checks = " | ".join(c["check"] for stage in report["stages"] for c in stage["checks"])
    for evidence in ("dvc.lock `mix` output data/mixed", "dvc.lock `generate` input models/diffusion",
                     "MLflow run of `train_diffusion`", "data/mixed/manifest.json synthetic.sha256",
                     "data/synthetic/meta.json source.diffusion.checkpoint_sha256", "input real/train"):
        assert evidence in checks, evidence


def test_text_output_lists_the_chain(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["lineage", "data/synthetic"]) == 0
    out = capsys.readouterr().out
    assert out.index("generated store: data/synthetic") < out.index("diffusion model:") < out.index("real data:")
    assert out.rstrip().endswith("-> VERIFIED")


def test_changed_store_is_stale_and_the_rest_verified(project: Path, capsys: pytest.CaptureFixture) -> None:
    images = np.load(project / "data/real/train/images.npy", mmap_mode="r+")
    images[0, 0, 0, 0] ^= 1
    images.flush()
    del images
    code, report, err = lineage(capsys, "data/mixed")
    assert code == 1 and report["status"] == STALE
    assert stage_statuses(report) == {"data/mixed": VERIFIED, "data/synthetic": VERIFIED,
                                      "models/diffusion/checkpoint.pt": VERIFIED, "data/real/train": STALE,
                                      "source.bin": VERIFIED}
    stale = {p["check"] for p in report["problems"]}
    assert any("images.npy" in c and "meta.json" in c for c in stale)  # the store's own record
    assert any("data/mixed/manifest.json real.sha256" in c for c in stale)  # the downstream artifact's record
    assert any("input real/train" in c and "MLflow run" in c for c in stale)  # the run that read it
    assert any("dvc.lock `prepare` output data/real/train" in c for c in stale)
    assert "data/real/train" in err and "stale" in err


def test_changed_params_mark_the_stage_that_read_them(project: Path, capsys: pytest.CaptureFixture) -> None:
    (project / "params.yaml").write_text("mix:\n  synthetic_fraction: 0.7\n")
    code, report, _ = lineage(capsys, "data/mixed")
    assert code == 1 and stage_statuses(report)["data/mixed"] == STALE
    assert [p["check"] for p in report["problems"]] == [
        "dvc.lock `mix` code and params changed since it ran: params.yaml:mix.synthetic_fraction modified"]


def test_store_generated_before_diffusion_was_recorded(project: Path, capsys: pytest.CaptureFixture) -> None:
    meta_file = project / "data/synthetic/meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["source"]["diffusion"]
    write_json(meta_file, meta)
    code, report, _ = lineage(capsys, "data/synthetic")
    assert code == 1
    diffusion = next(s for s in report["stages"] if s["stage"] == "diffusion")
    assert [c["status"] for c in diffusion["checks"] if "source.diffusion" in c["check"]] == [MISSING]
    assert stage_statuses(report)["data/real/train"] == VERIFIED  # the walk goes on through dvc.lock


def test_run_missing_from_the_tracking_store(project: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other.db"
    code, report, _ = lineage(capsys, "models/diffusion/checkpoint.pt", "--tracking-uri", f"sqlite:///{elsewhere}")
    assert code == 1 and not elsewhere.exists()  # looked up, never created
    problems = [p for p in report["problems"] if "MLflow run of `train_diffusion`" in p["check"]]
    assert [p["status"] for p in problems] == [MISSING] and "does not exist" in problems[0]["check"]


def test_stage_never_run_under_dvc_is_missing_from_the_lock(project: Path, capsys: pytest.CaptureFixture) -> None:
    (project / "dvc.lock").unlink()
    code, report, _ = lineage(capsys, "data/real/train")
    assert code == 1
    assert [p["status"] for p in report["problems"]] == [MISSING]
    assert "not recorded" in report["problems"][0]["check"]


def test_missing_artifact_and_bad_usage(project: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(project / "data/mixed")
    code, report, _ = lineage(capsys, "data/mixed")
    assert code == 1 and report["stages"][0]["status"] == MISSING
    assert main(["lineage", "params.yaml"]) == 2
    assert "not an artifact DMAT traces" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "says"), [('{"real": "a string", "synthetic": []}', "unexpected shape"),
                                               ("[1, 2]", "unreadable"), ("{not json", "unreadable")])
def test_tampered_manifest_is_stale_not_a_crash(project: Path, capsys: pytest.CaptureFixture, content: str,
                                                says: str) -> None:
    (project / "data/mixed/manifest.json").write_text(content)
    code, report, _ = lineage(capsys, "data/mixed")
    assert code == 1 and stage_statuses(report)["data/mixed"] == STALE
    assert any(says in p["check"] and p["path"] == "data/mixed" for p in report["problems"])


def test_tracking_lookups_read_runs_and_find_them_by_digest(built: Path) -> None:
    from dmat.tracking import describe_run, find_runs

    uri = f"sqlite:///{built / 'mlflow.db'}"
    real = ArrayStore.open(built / "data/real/train")
    (found,) = find_runs("train_diffusion", input_digest=real.digest, uri=uri)
    run = describe_run(found["run_id"], uri)
    assert run["status"] == "FINISHED" and run["tags"]["dmat.stage"] == "train_diffusion"
    assert [(i["name"], i["dmat.sha256"], i["context"]) for i in run["inputs"]] == [
        ("real/train", real.digest, "training")]
    assert find_runs("train_diffusion", input_digest="0" * 64, uri=uri) == []
    assert find_runs("generate", uri=uri) == []
    assert describe_run("0" * 32, uri) is None


@pytest.mark.parametrize(("edit", "says"), [
    (None, None),
    (lambda d: d.pop("robust_acc"), "models/eval/linf/report.json: missing robust_acc"),
    (lambda d: d.update(n="4"), "models/eval/linf/report.json: n = '4' is not of type int"),
])
def test_an_evaluation_report_of_another_shape_is_stale_naming_the_key(project: Path, capsys: pytest.CaptureFixture,
                                                                       edit, says: str | None) -> None:
    from dmat.artifacts.records import to_json
    from tests.test_records import eval_report

    data = to_json(eval_report())
    if edit:
        edit(data)
    write_json(project / "models/eval/linf/report.json", data)
    _, report, _ = lineage(capsys, "models/eval/linf")
    evaluation = next(s for s in report["stages"] if s["path"] == "models/eval/linf")
    stale = [p["check"] for p in report["problems"] if p["path"] == "models/eval/linf" and p["status"] == STALE]
    if says is None:
        assert not stale and evaluation["details"]["accuracy"].startswith("clean 0.75, robust 0.25 (n=4;")
    else:
        assert evaluation["status"] == STALE and len(stale) == 1 and stale[0].startswith(says)
        assert "accuracy" not in evaluation["details"]
