"""Tracking: the store location survives DVC's temporary copies; an unreachable server fails fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from dmat.files import project_root
from dmat.tracking import TrackingError, check_reachable
from tests.conftest import EVERY_IMAGE, run_dmat, write_params


def test_project_root_looks_through_dvc_temp_copies(tmp_path: Path) -> None:
    (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc" / "src").mkdir(parents=True)
    assert project_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc" / "src") == tmp_path.resolve()
    assert project_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc") == tmp_path.resolve()


def test_project_root_is_the_dvc_project(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert project_root(tmp_path / "a" / "b") == tmp_path.resolve()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        check_reachable(uri)


def test_stage_with_unreachable_server_exits_in_seconds(tmp_path: Path, image_archive: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    write_params(tmp_path / "params.yaml", f"data:\n  path: {image_archive}\n  val_size: 3\n{EVERY_IMAGE}")
    started = time.monotonic()
    result = run_dmat("prepare", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1 and uri in result.stderr and "unreachable" in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "data" / "real").exists()


def test_params_paths_resolve_against_the_project_root_from_dvc_temp_copies(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue` runs stages in <root>/.dvc/tmp/exps/<name>: the data directory beside <root> is not
    beside the copy."""
    from dmat.files import in_project

    (tmp_path / ".dvc").mkdir()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert in_project("../shared/data.tgz") == tmp_path.resolve() / "../shared/data.tgz"
    assert in_project("/abs/data.tgz") == Path("/abs/data.tgz")
    monkeypatch.chdir(tmp_path)
    assert in_project("../shared/data.tgz") == Path("../shared/data.tgz")  # in the project itself: as written


def test_a_resumed_checkpoint_continues_its_run_only_within_its_pipeline_execution(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A queued experiment that resumes from the committed checkpoint gets its own run under its own parent;
    the committed execution's finished run is never reopened (it was, and ended FAILED when the stage did)."""
    from mlflow.tracking import MlflowClient

    from dmat.config import load_params
    from dmat.tracking import stage_run

    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path / "params.yaml", "base: {experiment: resume}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params("params.yaml")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "first")
    with stage_run("train", params, ("base",)) as first:
        pass
    with stage_run("train", params, ("base",), resume_run_id=first.run_id) as again:  # killed, rerun: same run
        assert again.continued and again.run_id == first.run_id
    monkeypatch.setenv("DVC_EXP_NAME", "second")
    for resume_id in (first.run_id, "0" * 32):  # another execution's run; a run the store does not have
        with stage_run("train", params, ("base",), resume_run_id=resume_id) as other:
            assert not other.continued and other.run_id != first.run_id
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        tags = client.get_run(other.run_id).data.tags
        assert tags["dmat.pipeline"] == "exp:second@aaaaaaaaaaaa"
        assert "base.experiment" in client.get_run(other.run_id).data.params
        assert client.get_run(tags["mlflow.parentRunId"]).data.tags["dmat.pipeline"] == "exp:second@aaaaaaaaaaaa"
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(first.run_id).info.status == "FINISHED"


def test_an_experiment_name_queued_again_on_a_later_commit_gets_a_parent_of_its_own(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """DVC names experiments per baseline commit: rerunning a grid on a new commit reuses every name. Its runs
    must not land under the earlier execution's parent, or the UI mixes two outcomes in one row."""
    from mlflow.tracking import MlflowClient

    from dmat.config import load_params
    from dmat.tracking import stage_run

    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path / "params.yaml", "base: {experiment: rerun}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "grid-a-s0")
    params, parents = load_params("params.yaml"), []
    for baseline in ("a" * 40, "b" * 40, "b" * 40):
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
        with stage_run("train", params, ("base",)) as tracked:
            pass
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        parents.append(client.get_run(tracked.run_id).data.tags["mlflow.parentRunId"])
    assert parents[0] != parents[1] == parents[2]  # a new commit: a new parent; stages of one execution: one
    assert client.get_run(parents[1]).info.run_name == "grid-a-s0"


def test_an_experiment_first_created_by_a_queued_run_keeps_its_artifacts_in_the_project(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """A queued `dvc exp run` works in <root>/.dvc/tmp/exps/<name>, which DVC deletes afterwards: an experiment
    it creates must put artifacts in <root>/mlruns, or every run's outcomes.npz is gone (`dmat compare` needs it).
    Also when MLFLOW_TRACKING_URI is set to the local store, as `mlflow.set_tracking_uri` itself does."""
    from mlflow.tracking import MlflowClient

    from dmat.config import load_params
    from dmat.tracking import stage_run

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    write_params(copy / "params.yaml", "base: {experiment: queued}\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "queued-1")
    (copy / "report.json").write_text("{}")
    with stage_run("evaluate@linf", load_params("params.yaml"), ("base",)) as tracked:
        tracked.log_artifact(copy / "report.json")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracked.run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri()), run.info.artifact_uri
    assert list((tmp_path / "mlruns").rglob("report.json"))


def _select_experiments_at_the_barrier(barrier: Any, uri: str, names: list[str]) -> list[str]:
    import mlflow

    from dmat import tracking

    mlflow.set_tracking_uri(uri)
    outcomes = []
    for name in names:
        barrier.wait(timeout=120)
        try:  # an error is an outcome: the other processes still meet at every barrier
            outcomes.append(tracking._use_experiment(mlflow, name, uri))
        except Exception as error:
            outcomes.append(f"{name}: {error}")
    return outcomes


def test_stages_starting_at_once_share_one_new_experiment(tmp_path: Path) -> None:
    """Queue workers start their first stages at the same moment on a new experiment: each creates it or finds it,
    marks it as model development, and none fails on another's write (a grid once lost a run this way). Several
    new experiments in a row, so that the processes do meet in the window."""
    import multiprocessing

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the store's tables, made once, as the first stage would
    starts, names = 4, [f"new-grid-{i}" for i in range(8)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(starts) as pool:
        barrier = manager.Barrier(starts)
        outcomes = pool.starmap(_select_experiments_at_the_barrier, [(barrier, uri, names)] * starts)
    client = mlflow.MlflowClient(uri)
    for same in zip(*outcomes, strict=True):
        assert len(set(same)) == 1, same
        assert client.get_experiment(same[0]).tags["mlflow.experimentKind"] == "custom_model_development"
