"""`dmat ui`: the MLflow UI on the project's tracking store, opened where people compare pipeline executions.

It starts `mlflow server` on the store the stages write to (the project's `mlflow.db`, or says so when
MLFLOW_TRACKING_URI names a tracking server, which already serves its UI) and prints two links into the
experiment: its pipeline runs, one row per `dvc repro` or `dvc exp run` with its variant and headline numbers,
and the same rows grouped by variant with the seeds' averages.

Two facts of the MLflow 3 UI shape the links. Its sidebar shows either GenAI or Model training, a choice kept in
the browser's localStorage (`mlflow.workflowType_v1`) that starts on GenAI; the URL parameter
`workflowType=machine_learning` selects Model training for that page. And the runs table's columns, filter and
grouping are browser state too, except for a *shared view*: an experiment tag `mlflow.sharedViewState.<key>`
holding that state as JSON, which the URL parameter `viewStateShareKey=<key>` applies. `dmat ui` writes two
such views (the columns are the headline metrics the store's pipeline runs carry) before it prints their links.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
START_TIMEOUT_S = 120
RUNS_VIEW, GROUPED_VIEW = "dmat-pipelines", "dmat-pipelines-by-variant"
VIEW_TAG = "mlflow.sharedViewState."
# The columns of both views, in this order where the store has them (few enough to fit a screen): Linf robust
# accuracy with its 95% interval, robust and clean accuracy per threat model, the generated-data yardstick, the
# validation figure that chose the checkpoint, the time it took. Every number is on each run's page.
HEADLINE_COLUMNS = ("evaluate_linf.robust_acc", "evaluate_linf.robust_acc_ci_low", "evaluate_linf.robust_acc_ci_high",
                    "evaluate_*.robust_acc", "evaluate_*.clean_acc", "evaluate_diffusion.knn_recall",
                    "train.best_val_robust_acc", "pipeline.seconds")
TAG_COLUMNS = ("dmat.variant", "dmat.seed")
PIPELINE_FILTER = "tags.`dmat.role` = 'pipeline'"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; the UI has no login)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    parser.add_argument("--experiment", metavar="NAME",
                        help="MLflow experiment to open (default: base.experiment of --params)")
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="params file whose base.experiment is opened (default: params.yaml)")


def run(args: argparse.Namespace) -> int:
    from dmat.config import ParamsError, load_params
    from dmat.errors import TrackingError
    from dmat.tracking import pipeline_metric_keys, set_experiment_tags, tracking_uri

    try:
        experiment = args.experiment or load_params(args.params).base.experiment
    except ParamsError as err:
        return _fail(err, EXIT_USAGE)
    if not 0 < args.port < 65536:
        return _fail(f"--port {args.port} is not a TCP port (1-65535)", EXIT_USAGE)
    uri = tracking_uri()
    try:
        experiment_id, metric_keys = pipeline_metric_keys(experiment, uri)
        set_experiment_tags(experiment_id, {VIEW_TAG + key: json.dumps(view)
                                            for key, view in pipeline_views(metric_keys).items()}, uri)
    except (LookupError, TrackingError) as err:
        return _fail(err, EXIT_FAILED)
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        print_links(uri, experiment, experiment_id)
        return EXIT_OK
    return serve(uri, args.host, args.port, experiment, experiment_id)


def pipeline_views(metric_keys: Iterable[str]) -> dict[str, dict]:
    """The two shared views: pipeline runs newest first with the headline columns; the same grouped by variant."""
    keys = sorted(metric_keys)
    metrics = [key for pattern in HEADLINE_COLUMNS for key in fnmatch.filter(keys, pattern)]
    columns = [f"metrics.`{key}`" for key in dict.fromkeys(metrics)] + [f"tags.`{tag}`" for tag in TAG_COLUMNS]
    runs = {"searchFilter": PIPELINE_FILTER, "orderByKey": "attributes.start_time", "orderByAsc": False,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": columns, "groupBy": None}
    grouped = {**runs, "groupBy": {"aggregateFunction": "average",
                                   "groupByKeys": [{"mode": "tag", "groupByData": "dmat.variant"}]}}
    return {RUNS_VIEW: runs, GROUPED_VIEW: grouped}


def view_link(base: str, experiment_id: str, view: str) -> str:
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={view}&workflowType=machine_learning")


def print_links(base: str, experiment: str, experiment_id: str) -> None:
    print(f"MLflow UI: {base}  (experiment {experiment!r}, id {experiment_id})")
    print(f"  pipeline runs:          {view_link(base, experiment_id, RUNS_VIEW)}")
    print(f"  grouped by variant:     {view_link(base, experiment_id, GROUPED_VIEW)}", flush=True)


def serve(uri: str, host: str, port: int, experiment: str, experiment_id: str) -> int:
    """Run `mlflow server` on `uri` until Ctrl-C or SIGTERM; print the links once it answers."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    # its own process group: mlflow runs uvicorn as a child, and both stop with us
    server = subprocess.Popen(command, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        if not _wait_until_healthy(base, server):
            return _fail(f"mlflow server did not answer at {base} within {START_TIMEOUT_S} s (exit code "
                         f"{server.poll()}); is port {port} in use? Try --port", EXIT_FAILED)
        print_links(base, experiment, experiment_id)
        print("Ctrl-C stops it.", flush=True)
        return EXIT_OK if server.wait() == 0 else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        _stop(server)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_until_healthy(base: str, server: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _fail(message: object, code: int) -> int:
    print(f"dmat ui: error: {message}", file=sys.stderr)
    return code
