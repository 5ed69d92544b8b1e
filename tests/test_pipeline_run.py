"""The parent run of a pipeline execution follows its stages: RUNNING while one runs, then FINISHED, FAILED naming
the stage or KILLED; it carries the variant's params and each stage's headline numbers. Real MLflow (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dmat.execution import pipeline_status
from tests.conftest import write_params
from tests.e2e.test_pipeline import GIT_ENV


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git checkout with committed params (the variant's reference), as the working directory."""
    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path / "params.yaml", "base: {experiment: parents, seed: 3}\n")
    for command in (["init", "-q"], ["add", "params.yaml"], ["commit", "-q", "-m", "params"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True, env={**os.environ, **GIT_ENV})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def parent_of(project: Path, run_id: str):
    runs = client(project)
    return runs.get_run(runs.get_run(run_id).data.tags["mlflow.parentRunId"])


def test_the_parent_is_running_while_a_stage_runs_and_spans_its_stages(project: Path) -> None:
    from dmat.config import load_params
    from dmat.tracking import stage_run

    params = load_params("params.yaml")
    Path("metrics").mkdir()
    Path("metrics/evaluate_linf.json").write_text(json.dumps(
        {"linf_robust_acc": 0.25, "linf_robust_acc_ci_low": 0.1, "linf_sanity_passed": True, "linf_note": "text"}))
    with stage_run("prepare", params, ("base",)) as first:
        assert parent_of(project, first.run_id).info.status == "RUNNING"
    assert parent_of(project, first.run_id).info.status == "FINISHED"
    with stage_run("evaluate@linf", params, ("base",)) as second:
        assert parent_of(project, second.run_id).info.status == "RUNNING"
    parent = parent_of(project, second.run_id)
    stages = [client(project).get_run(run.run_id).info for run in (first, second)]
    assert parent.info.status == "FINISHED" and parent.info.run_id == parent_of(project, first.run_id).info.run_id
    assert parent.info.start_time <= stages[0].start_time and parent.info.end_time >= stages[1].end_time
    assert parent.data.metrics["pipeline.seconds"] == pytest.approx(
        (parent.info.end_time - parent.info.start_time) / 1000)
    # headline numbers prefixed by the stage; the threat is in the stage name, not repeated; no text values
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("evaluate_linf.")} == {
        "evaluate_linf.robust_acc": 0.25, "evaluate_linf.robust_acc_ci_low": 0.1, "evaluate_linf.sanity_passed": 1.0}
    assert parent.data.tags["dmat.role"] == "pipeline" and parent.data.tags["dmat.seed"] == "3"
    assert parent.data.params == {"base.seed": "3", "base.profile": "null"}  # the committed params: no changes
    assert parent.data.tags["dmat.variant"] == "baseline"


def test_the_parent_carries_the_variants_params_as_the_stages_log_them(project: Path) -> None:
    from dmat.config import load_params
    from dmat.tracking import stage_run

    write_params(project / "variant.yaml", "base: {experiment: parents, seed: 4}\nmix: {synthetic_fraction: 0}\n")
    with stage_run("mix", load_params("variant.yaml"), ("base", "mix")) as tracked:
        pass
    parent, stage = parent_of(project, tracked.run_id), client(project).get_run(tracked.run_id)
    assert parent.data.params == {"mix.synthetic_fraction": "0.0", "base.seed": "4", "base.profile": "null"}
    assert all(stage.data.params[key] == value for key, value in parent.data.params.items())
    assert parent.data.tags["dmat.variant"] == "mix.synthetic_fraction=0.0"


def test_a_failing_stage_marks_the_parent_failed_naming_it_until_it_succeeds(project: Path) -> None:
    from dmat.config import load_params
    from dmat.tracking import stage_run

    params = load_params("params.yaml")
    with pytest.raises(RuntimeError), stage_run("train", params, ("base",)) as failed:
        raise RuntimeError("diverged")
    parent = parent_of(project, failed.run_id)
    assert client(project).get_run(failed.run_id).info.status == "FAILED"
    assert parent.info.status == "FAILED" and parent.data.tags["dmat.failed_stages"] == "train"
    with stage_run("train", params, ("base",)) as again:  # `dvc repro` again: the stage reruns and succeeds
        pass
    parent = parent_of(project, again.run_id)
    assert parent.info.status == "FINISHED" and "dmat.failed_stages" not in parent.data.tags


@pytest.mark.parametrize("interrupt", ["ctrl-c", "sigterm"])
def test_an_interrupted_stage_marks_both_runs_killed(project: Path, interrupt: str) -> None:
    from dmat.config import load_params
    from dmat.tracking import stage_run

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stage_run("train", load_params("params.yaml"), ("base",)) as tracked:
        if interrupt == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the stage run's only
    assert client(project).get_run(tracked.run_id).info.status == "KILLED"
    parent = parent_of(project, tracked.run_id)
    assert parent.info.status == "KILLED" and parent.data.tags["dmat.failed_stages"] == "train"


def test_pipeline_status_reads_the_latest_run_of_each_stage() -> None:
    assert pipeline_status([("prepare", "FINISHED", 1), ("train", "FAILED", 2), ("train", "FINISHED", 3)]) == (
        "FINISHED", [])
    assert pipeline_status([("train", "FINISHED", 1), ("evaluate@linf", "FAILED", 2), ("export", "KILLED", 3)]) == (
        "FAILED", ["evaluate@linf"])
    assert pipeline_status([("train", "KILLED", 2), ("verify", "RUNNING", 3)]) == ("KILLED", ["train"])
    assert pipeline_status([("verify", "RUNNING", 3)]) == ("FINISHED", [])


WRITE_METRICS = "import os; os.makedirs('metrics', exist_ok=True); open('metrics/reused.json', 'w').write('{}')"
REUSE_PROBE = """\
import json, sys
from dmat.execution import reused_stages
json.dump(reused_stages(exclude={"probe"}), open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("queued", [False, True], ids=["workspace", "queue-worker"])
def test_a_stage_learns_which_stages_dvc_reused_in_the_workspace_and_in_a_queue_worker(
        tmp_path: Path, queued: bool) -> None:
    """`reused` is up to date when `probe` runs (its metrics file exists): the probe names it, whether DVC runs
    the experiment in the checkout or in a queue worker's copy of it (where $DVC_ROOT still names the checkout)."""
    import sys

    (tmp_path / "probe.py").write_text(REUSE_PROBE)
    seen = tmp_path.parent / f"seen-{tmp_path.name}.json"  # outside the project: DVC's copies do not move it
    (tmp_path / "params.yaml").write_text("probe: 1\n")
    (tmp_path / "dvc.yaml").write_text(f"""stages:
  reused:
    cmd: {sys.executable} -c "{WRITE_METRICS}"
    metrics: [metrics/reused.json: {{cache: false}}]
  probe:
    cmd: {sys.executable} probe.py {seen}
    deps: [metrics/reused.json, probe.py]
    params: [probe]
""")
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("DVC_ROOT", None)
    env.pop("DVC_STAGE", None)

    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=tmp_path, check=True, env=env, stdout=subprocess.DEVNULL)

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "repro", "reused")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "reused stage ran")
    if queued:
        run("dvc", "exp", "run", "--queue", "-S", "probe=2")
        run("dvc", "queue", "start", "-j", "1")
        for _ in range(240):
            status = subprocess.run(["dvc", "queue", "status"], cwd=tmp_path, env=env, capture_output=True,
                                    text=True).stdout
            if any(word in status for word in ("Success", "Failed")):
                break
            time.sleep(0.5)
        run("dvc", "queue", "stop", "--kill")
        assert "Success" in status, status
    else:
        run("dvc", "exp", "run", "-S", "probe=2")
    assert json.loads(seen.read_text()) == ["reused"]
