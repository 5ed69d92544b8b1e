"""Comparing runs in the MLflow UI, as a person does it, on the grid's store (two variants × three seeds,
tests/e2e/conftest.py): `dmat ui` starts the UI and prints its links; the parent run of each pipeline execution,
read through the REST API, follows its stages and carries their values; a real headless Chromium (Debian's
`chromium` and `chromium-driver`, driven by Selenium: nothing downloaded) opens the printed links and finds the
pipeline rows with their robust accuracy and variant, and the groups by variant.

Screenshots go to $DMAT_TEST_ARTIFACTS (default tests/artifacts/, ignored by git). Without Chromium the browser
tests skip with the reason, except under CI=true, where they fail: CI installs it (.ci/install-browser.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean

import pytest

from tests.conftest import BIN_DIR, REPO_ROOT
from tests.e2e.conftest import REAL_ONLY
from tests.e2e.test_pipeline import project_copy
from tests.test_team_tracking import free_port, key_values, mlflow_server, rest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LINK = re.compile(r"^\s*(pipeline runs|grouped by variant):\s+(\S+)\s*$", re.MULTILINE)
UI_START_TIMEOUT_S = 120
PAGE_TIMEOUT_S = 90
ROBUST = "evaluate_linf.robust_acc"
# Run-cache stages of a real-only seed-1 run: the grid's generated seed-1 run trained them (its params upstream of the
# mix, the profile included, are the real-only run's; the tiny pipeline's own run lacks the profile and so differs).
SHARED_WITH_THE_GENERATED_RUN = ("prepare", "train_reference", "train_diffusion", "generate")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1920,1000")


@pytest.fixture(scope="module")
def ui(variants: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`dmat ui` on the grid's store: {"base": its URL, "pipeline runs": link, "grouped by variant": link}."""
    log = tmp_path_factory.mktemp("ui") / "dmat-ui.log"
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as sink:
        process = subprocess.Popen([str(BIN_DIR / "dmat"), "ui", "--port", str(port)], cwd=variants, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        links = _printed_links(process, log)
        yield {"base": f"http://127.0.0.1:{port}", **links}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # `dmat ui` stops its server with it
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]


def _printed_links(process: subprocess.Popen, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        links = dict(LINK.findall(log.read_text()))
        if len(links) == 2:
            return links
        assert process.poll() is None, f"dmat ui exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    pytest.fail(f"dmat ui printed no links in {UI_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def runs_of(base: str, experiment: str = "e2e") -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """The experiment's pipeline runs by id, and their stage runs by parent id, as the REST API returns them."""
    experiment_id = rest(base, "mlflow/experiments/get-by-name", experiment_name=experiment)["experiment"][
        "experiment_id"]
    found = rest(base, "mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
    parents = {r["info"]["run_id"]: r for r in found if key_values(r["data"]["tags"]).get("dmat.role") == "pipeline"}
    children: dict[str, list[dict]] = {run_id: [] for run_id in parents}
    for r in found:
        parent_id = key_values(r["data"]["tags"]).get("mlflow.parentRunId")
        if parent_id in children:
            children[parent_id].append(r)
    return parents, children


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def params_of(run: dict) -> dict[str, str]:
    return key_values(run["data"].get("params", []))


def stage_of(run: dict) -> str:
    return key_values(run["data"]["tags"])["dmat.stage"]


# --- the parent run, through the REST API ------------------------------------------------------------------------

def test_each_pipeline_run_ran_as_long_as_its_stages_and_ended_with_them(ui: dict[str, str]) -> None:
    parents, children = runs_of(ui["base"])
    assert len(parents) >= 3, parents.keys()
    for parent_id, parent in parents.items():
        info, stages = parent["info"], [c["info"] for c in children[parent_id]]
        assert stages and all(s["status"] == "FINISHED" for s in stages), (info["run_name"], stages)
        assert info["status"] == "FINISHED", info
        first, last = min(int(s["start_time"]) for s in stages), max(int(s["end_time"]) for s in stages)
        assert int(info["start_time"]) <= first and last <= int(info["end_time"]) <= last + 30_000, info
        duration = (int(info["end_time"]) - int(info["start_time"])) / 1000
        assert metrics_of(parent)["pipeline.seconds"] == pytest.approx(duration, abs=1e-3)


def test_pipeline_params_and_metrics_equal_the_stage_values_they_were_copied_from(ui: dict[str, str]) -> None:
    parents, children = runs_of(ui["base"])
    for parent_id, parent in parents.items():
        tags, params, metrics = key_values(parent["data"]["tags"]), params_of(parent), metrics_of(parent)
        assert params["base.seed"] == tags["dmat.seed"] and "base.profile" in params
        assert (REAL_ONLY in tags["dmat.variant"]) == (params.get("mix.synthetic_fraction") == "0.0")
        stages = {stage_of(c): c for c in children[parent_id]}
        for stage in stages.values():  # every param the stage logged under the same key has the same value
            shared = params.keys() & params_of(stage).keys()
            assert {k: params[k] for k in shared} == {k: params_of(stage)[k] for k in shared}
        evaluation = metrics_of(stages["evaluate@linf"])
        for key in ("robust_acc", "robust_acc_ci_low", "robust_acc_ci_high", "clean_acc", "n"):
            assert metrics[f"evaluate_linf.{key}"] == evaluation[key], key
        if "train" in stages:
            assert metrics["train.best_val_robust_acc"] == metrics_of(stages["train"])["best_val_robust_acc"]
        inputs = {i["dataset"]["digest"] for i in parent["inputs"].get("dataset_inputs", [])}
        for stage in stages.values():
            assert {i["dataset"]["digest"] for i in stage["inputs"].get("dataset_inputs", [])} <= inputs


def test_stages_taken_from_the_run_cache_bring_the_numbers_recorded_when_they_ran(ui: dict[str, str]) -> None:
    parents, children = runs_of(ui["base"])
    by_name = {p["info"]["run_name"]: p for p in parents.values()}
    reused = next(p for p in parents.values() if key_values(p["data"]["tags"])["dmat.variant"] == REAL_ONLY
                  and key_values(p["data"]["tags"])["dmat.seed"] == "1")
    trained = by_name["e2e-generated-s1"]
    assert set(SHARED_WITH_THE_GENERATED_RUN) <= {stage_of(c) for c in children[trained["info"]["run_id"]]}
    ran = {stage_of(c) for c in children[reused["info"]["run_id"]]}
    listed = key_values(reused["data"]["tags"])["dmat.reused_stages"].split(",")
    assert set(SHARED_WITH_THE_GENERATED_RUN) <= set(listed) and not ran & set(listed), (listed, ran)
    for stage in SHARED_WITH_THE_GENERATED_RUN:
        copied = {k: v for k, v in metrics_of(reused).items() if k.startswith(f"{stage}.")}
        assert copied and copied == {k: v for k, v in metrics_of(trained).items() if k.startswith(f"{stage}.")}


def test_a_failing_stage_marks_its_pipeline_run_failed_naming_it(variants: Path, tmp_path: Path) -> None:
    """`dvc exp run` with a latency budget no model meets: verify fails its gate, and so does the pipeline run,
    which still carries the numbers of the stages the experiment reused."""
    project = project_copy(variants, tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")},
           "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(BIN_DIR / "dvc"), "exp", "run", "-n", "too-slow", "-S",
                             "++verify.latency_budget_ms=0.000001", "-S", "++verify.register=false", "verify"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "gate(s) failed: latency_budget" in output, output[-3000:]
    with mlflow_server(f"sqlite:///{project / 'mlflow.db'}", tmp_path / "server.log") as base:
        parents, children = runs_of(base)
    (failed,) = [p for p in parents.values() if p["info"]["run_name"] == "too-slow"]
    tags = key_values(failed["data"]["tags"])
    assert failed["info"]["status"] == "FAILED" and tags["dmat.failed_stages"] == "verify"
    assert [(stage_of(c), c["info"]["status"]) for c in children[failed["info"]["run_id"]]] == [("verify", "FAILED")]
    assert {"train", "evaluate@linf"} <= set(tags["dmat.reused_stages"].split(","))
    assert ROBUST in metrics_of(failed) and "verify.verify_passed" not in metrics_of(failed)


# --- the UI in a real browser -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("DMAT_TEST_ARTIFACTS") or REPO_ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the MLflow UI go to {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(ui: dict[str, str]) -> Iterator[object]:
    """Headless Chromium with a new empty profile, through Debian's chromedriver (Selenium Manager stays off)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        reason = "Debian's chromium and chromium-driver are not installed (.ci/install-browser.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: under CI the browser tests must run")
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium look for a browser or driver to download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="dmat-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        # The first visit of the UI opens its assistant panel over a third of the page: closed, as a person would.
        session.get(f"{ui['base']}/health")
        session.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                               "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
        yield session
    finally:
        session.quit()
        shutil.rmtree(profile, ignore_errors=True)


def table_rows(browser, wanted: set[str]) -> dict[str, dict[str, str]]:
    """The runs table's rows by row id, each {column id: text}, once every wanted row id is there. The table
    (ag-grid) draws a row in several containers (pinned and scrolled columns): their cells are merged."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def rows(driver) -> dict[str, dict[str, str]] | None:
        found: dict[str, dict[str, str]] = {}
        for row in driver.find_elements(By.CSS_SELECTOR, ".ag-row[row-id]"):
            cells = found.setdefault(row.get_attribute("row-id"), {})
            cells.update({cell.get_attribute("col-id"): cell.text
                          for cell in row.find_elements(By.CSS_SELECTOR, ".ag-cell[col-id]")})
        complete = wanted <= found.keys() and all(any(found[w].values()) for w in wanted)
        return found if complete else None

    return WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
        rows, f"the runs table never showed rows {sorted(wanted)}")


def full_text(browser, row_id: str, column_id: str) -> str:
    """A cell's whole text, also where the column is too narrow to paint it: a long aggregate such as
    "0.14444444444444446 (average)" is cut to "0.1444444..." on screen, and Selenium's `text` reads what is painted."""
    from selenium.webdriver.common.by import By

    cell = browser.find_element(By.CSS_SELECTOR, f'.ag-row[row-id="{row_id}"] .ag-cell[col-id="{column_id}"]')
    return " ".join(cell.get_attribute("textContent").split())


def number(text: str) -> float:
    """A metric cell's number: the table shows the value in full ("0.315", "0.315 (average)")."""
    return float(text.split()[0].rstrip("…"))


def test_the_runs_page_lists_each_pipeline_with_its_robust_accuracy_and_variant(ui, browser, artifacts) -> None:
    parents, _ = runs_of(ui["base"])
    browser.get(ui["pipeline runs"])
    rows = table_rows(browser, set(parents))
    time.sleep(1)  # let the last columns paint before the picture
    browser.save_screenshot(str(artifacts / "mlflow-ui-pipeline-runs.png"))
    assert set(rows) == set(parents), "the page lists exactly the pipeline runs"
    for run_id, parent in parents.items():
        cells, tags = rows[run_id], key_values(parent["data"]["tags"])
        assert cells["attributes.`Run Name`"].splitlines()[-1] == parent["info"]["run_name"]  # after its colour
        assert number(cells[f"metrics.`{ROBUST}`"]) == pytest.approx(metrics_of(parent)[ROBUST], abs=1e-3)
        assert cells["tags.`dmat.variant`"] == tags["dmat.variant"]
        assert cells["tags.`dmat.seed`"] == tags["dmat.seed"]
    assert "Model training" in browser.page_source and "/runs" in browser.current_url


def test_grouping_by_variant_shows_each_variant_with_its_seeds_average(ui, browser, artifacts) -> None:
    parents, _ = runs_of(ui["base"])
    by_variant: dict[str, list[float]] = {}
    for parent in parents.values():
        by_variant.setdefault(key_values(parent["data"]["tags"])["dmat.variant"], []).append(
            metrics_of(parent)[ROBUST])
    assert set(by_variant) == {"baseline", REAL_ONLY} and all(len(v) >= 2 for v in by_variant.values())
    browser.get(ui["grouped by variant"])
    groups = {f"tag.dmat.variant.{variant}" for variant in by_variant}
    rows = table_rows(browser, groups)
    time.sleep(1)
    browser.save_screenshot(str(artifacts / "mlflow-ui-grouped-by-variant.png"))
    for variant, values in by_variant.items():
        cells = rows[f"tag.dmat.variant.{variant}"]
        name, count = cells["attributes.`Run Name`"].splitlines()[-2:]
        assert name == f"Group: {variant}" and int(count) == len(values), cells
        average = full_text(browser, f"tag.dmat.variant.{variant}", f"metrics.`{ROBUST}`")
        assert average.endswith("(average)") and number(average) == pytest.approx(mean(values), abs=1e-3)
