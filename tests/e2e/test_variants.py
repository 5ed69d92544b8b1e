"""The README's variant workflow on the COMMITTED params.yaml: `dvc exp run -S` rewrites the file as YAML 1.2,
and every stage must still read it (a YAML 1.1 reader once turned `off` into False and failed every experiment).

Each experiment runs only `prepare`, with a tiny image folder passed by -S as well: `prepare` validates the
whole params file, as every stage does, so the first stage to run proves that the rewritten file is read
back unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import BIN_DIR, make_archive, make_image_folder
from tests.e2e.test_pipeline import copy_project, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DVC = str(BIN_DIR / "dvc")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("variants")
    archive = make_archive(make_image_folder(base / "folder", {"train": 30, "test": 10}, size=32), base / "tiny.tgz")
    project = copy_project(base / "project")  # params.yaml exactly as committed
    (project / "tiny-data.txt").write_text(str(archive))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "committed params"], project)
    return project


def tiny_data(project: Path) -> list[str]:
    """-S overrides that point prepare at the tiny folder (the committed path is the offline CIFAR-10 archive's)."""
    archive = (project / "tiny-data.txt").read_text()
    return [arg for setting in (f"data.path={archive}", "data.val_size=12", "data.train_limit=60",
                                "data.test_limit=30", "data.heldout_size=9") for arg in ("-S", setting)]


def experiments(project: Path) -> dict[str, dict]:
    """name -> {error, params} of every experiment `dvc exp show` knows (DVC 3 reports no status there: a finished
    experiment has a commit and no error; a failed queued one has no commit and shows as Failed in the queue)."""
    shown = json.loads(run([DVC, "exp", "show", "--json", "--no-fetch"], project).stdout)
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            revision = experiment["revs"][0]
            params = revision["data"]["params"]["params.yaml"]["data"]
            found[experiment["name"]] = {"error": revision.get("error"), "params": params}
    return found


def wait_for_queue(project: Path, timeout: float = 900) -> None:
    """Until `dvc queue status` lists nothing queued or running. The status itself can fail for a moment (exit 255)
    while a worker updates the queue's state: it is asked again, as `dmat queue --watch` does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run([DVC, "queue", "status"], project, expect=None)
        if status.returncode == 0 and not any(word in status.stdout for word in ("Queued", "Running")):
            return
        time.sleep(3)
    raise AssertionError(f"the experiment queue did not finish in {timeout} s:\n{status.stdout}{status.stderr}")


def test_readme_variant_commands_run_on_the_committed_params(project: Path) -> None:
    # A workspace run, exactly as the README's first variant command; then back to the committed params.
    run([DVC, "exp", "run", "-n", "real-only", "-S", "mix.synthetic_fraction=0", *tiny_data(project), "prepare"],
        project)
    run(["git", "checkout", "--", "params.yaml", "dvc.lock"], project)
    # Queued runs, as the README gives them: another variant, and a grid over seeds.
    run([DVC, "exp", "run", "--queue", "-n", "no-diffusion-at", "-S", "train_diffusion.adversarial.mode=none",
         *tiny_data(project), "prepare"], project)
    run([DVC, "exp", "run", "--queue", "-S", "base.seed=0,1,2", *tiny_data(project), "prepare"], project)
    run([DVC, "queue", "start"], project)
    wait_for_queue(project)
    found = experiments(project)
    assert len(found) == 5, found
    queue = run([DVC, "queue", "status"], project).stdout
    failed = {name: e["error"] for name, e in found.items() if e["error"]}
    assert not failed and "Failed" not in queue, f"{failed}\n{queue}"
    assert found["real-only"]["params"]["mix"]["synthetic_fraction"] == 0
    assert found["no-diffusion-at"]["params"]["train_diffusion"]["adversarial"]["mode"] == "none"
    assert sorted(e["params"]["base"]["seed"] for name, e in found.items()
                  if name not in ("real-only", "no-diffusion-at")) == [0, 1, 2]
    for experiment in found.values():  # what DVC wrote back is what the stages read
        assert experiment["params"]["base"]["precision"] == "auto"
