"""Experiment tracking: the only module that imports mlflow.

One MLflow run per stage execution, all in one experiment (`base.experiment`), each the child of the parent run of
its pipeline execution (see `stage_run` for how the parent follows its stages). The default store
is `sqlite:///<project root>/mlflow.db`, resolved to the real project root even when DVC runs the
stage in a temporary copy under `.dvc/tmp` (`dvc exp run --temp/--queue`), so every run of the
project lands in one database. `MLFLOW_TRACKING_URI` overrides it (e.g. a team tracking server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dmat.config import as_dict, flatten, to_yaml
from dmat.data.store import ArrayStore
from dmat.errors import TrackingError
from dmat.execution import Execution, current_execution, headline_metrics, pipeline_status, reused_stages
from dmat.files import project_root

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow stores a dataset digest in a 36-character column; the full sha256 goes into a tag.
MLFLOW_DIGEST_LENGTH = 36
PREFLIGHT_TIMEOUT_S = 5.0
PIPELINE_SECONDS = "pipeline.seconds"


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the sqlite store of `root` (default: the project of the working directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail in seconds, naming the URI, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PREFLIGHT_TIMEOUT_S) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset "
                            "MLFLOW_TRACKING_URI to use the local mlflow.db") from None


def prepare_store(uri: str | None = None) -> str:
    """Create, or migrate, the tracking store now, from one process, and return its URI. Several processes using a
    new local database for the first time at once (the queue workers of a grid) would each run its schema
    migrations, and the loser leaves it half-migrated: every later run then fails."""
    uri = uri or tracking_uri()
    check_reachable(uri)
    with _quiet_mlflow():
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # the store itself is broken: say which one
            raise TrackingError(f"cannot use MLflow tracking store {uri}: {err}") from None
    return uri


# --- read-only lookups (`dmat lineage`): never start, change or create anything -------------------------

def download_model_version(name: str, destination: Path, *, alias: str | None = None,
                           version: str | None = None) -> tuple[Path, dict[str, str]]:
    """Download the files of registered model `name` at `alias` (pinned to its version first, so an
    alias moving meanwhile cannot mix two versions' files) or at `version`. Needs only mlflow-skinny
    against a tracking server; raises TrackingError naming the store when it cannot."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError as err:
        raise TrackingError(f"resolving registered models needs mlflow (or mlflow-skinny): {err}") from None
    store = tracking_uri()
    check_reachable(store)  # seconds, where mlflow's own retries would take minutes
    try:
        if alias is not None:
            client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
            version = str(client.get_model_version_by_alias(name, alias).version)
        registered = {"name": name, **({"alias": alias} if alias else {}), "version": str(version)}
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                    dst_path=str(destination), tracking_uri=store,
                                                    registry_uri=store)
    except MlflowException as err:
        raise TrackingError(f"the MLflow registry at {store}: {err.message}") from None
    return Path(local), registered


def describe_run(run_id: str, uri: str | None = None) -> dict[str, Any] | None:
    """A run's status, DMAT/git/DVC tags, params and dataset inputs, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    try:
        with _quiet_mlflow():  # a first look at an older store migrates it, logging at INFO
            run = _read_client(uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"cannot read run {run_id} from MLflow tracking store {uri}: {err}") from None
    return _run_summary(run)


def find_runs(stage: str, *, tags: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
              input_digest: str | None = None, uri: str | None = None) -> list[dict[str, Any]]:
    """Runs of one stage with these tags, params and (a prefix of) an input dataset's sha256, newest first."""
    from mlflow.exceptions import MlflowException

    conditions = [f"tags.`dmat.stage` = {_quoted(stage)}"]
    conditions += [f"tags.`{key}` = {_quoted(value)}" for key, value in (tags or {}).items()]
    conditions += [f"params.`{key}` = {_quoted(value)}" for key, value in (params or {}).items()]
    if input_digest:
        conditions.append(f"datasets.digest = {_quoted(input_digest[:MLFLOW_DIGEST_LENGTH])}")
    uri = uri or tracking_uri()
    client = _read_client(uri)
    try:
        with _quiet_mlflow():
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, " AND ".join(conditions),
                                      order_by=["attributes.start_time DESC"], max_results=50)
    except MlflowException as err:
        raise TrackingError(f"cannot search MLflow tracking store {uri}: {err}") from None
    return [_run_summary(run) for run in runs]


def search_runs(experiments: Sequence[str], conditions: Sequence[str], uri: str | None = None) -> list[dict[str, Any]]:
    """Finished runs of the named experiments that match every condition (MLflow's search syntax), with their
    metrics. An experiment the store does not have raises LookupError naming it."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = _read_client(uri)
    try:
        with _quiet_mlflow():
            ids = []
            for name in experiments:
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise LookupError(f"no MLflow experiment named {name!r} in {uri}")
                ids.append(experiment.experiment_id)
            query = " AND ".join(["attributes.status = 'FINISHED'", *conditions])
            runs = client.search_runs(ids, query, max_results=5000)
    except MlflowException as err:
        raise TrackingError(f"cannot search MLflow tracking store {uri}: {err}") from None
    return [_run_summary(run) for run in runs]


def download_run_artifact(run_id: str, path: str, destination: Path, uri: str | None = None) -> Path:
    """One artifact file of a run, downloaded into `destination`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(destination), tracking_uri=uri))
    except (MlflowException, OSError) as err:
        raise TrackingError(f"cannot download {path} of run {run_id} from {uri}: {err}") from None


def pipeline_metric_keys(experiment: str, uri: str | None = None) -> tuple[str, set[str]]:
    """The id of `experiment` and the metric keys its pipeline runs carry (`dmat ui` picks its columns from them).
    An experiment the store does not have raises LookupError naming it."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = _read_client(uri)
    try:
        with _quiet_mlflow():
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise LookupError(f"no MLflow experiment named {experiment!r} in {uri}")
            runs = client.search_runs([found.experiment_id], "tags.`dmat.role` = 'pipeline'", max_results=5000)
    except MlflowException as err:
        raise TrackingError(f"cannot search MLflow tracking store {uri}: {err}") from None
    return found.experiment_id, {key for run in runs for key in run.data.metrics}


def set_experiment_tags(experiment_id: str, tags: Mapping[str, str], uri: str | None = None) -> None:
    """Tag an experiment (e.g. the MLflow UI's shared views, `mlflow.sharedViewState.<key>`)."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = _read_client(uri)
    try:
        with _quiet_mlflow():
            for key, value in tags.items():
                client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as err:
        raise TrackingError(f"cannot tag experiment {experiment_id} in MLflow tracking store {uri}: {err}") from None


@contextlib.contextmanager
def tool_run(name: str, experiment: str, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """An MLflow run for a command that is not a stage (e.g. `dmat compare`), in `experiment`."""
    uri = tracking_uri()
    check_reachable(uri)
    with _quiet_mlflow():
        import mlflow

        mlflow.set_tracking_uri(uri)
        _use_experiment(mlflow, experiment, uri)
        with mlflow.start_run(run_name=name, tags={"dmat.stage": name, **(tags or {})}) as run:
            yield StageRun(mlflow, run.info.run_id)


def _read_client(uri: str) -> Any:
    """An MlflowClient for reading; a local sqlite store that does not exist is an error, not created."""
    check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"MLflow tracking store {uri} does not exist")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _run_summary(run: Any) -> dict[str, Any]:
    prefixes = ("dmat.", "dvc.", "git.")
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
        "start_time": run.info.start_time, "end_time": run.info.end_time,
        "tags": {k: v for k, v in run.data.tags.items() if k.startswith(prefixes)},
        "params": dict(run.data.params), "metrics": dict(run.data.metrics),
        "inputs": [{"name": d.dataset.name, "digest": d.dataset.digest,
                    **{t.key.removeprefix("mlflow.data."): t.value for t in d.tags}}
                   for d in run.inputs.dataset_inputs],
    }


def _quoted(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class StageRun:
    """What a stage may report: metrics, datasets, files, pictures. Wraps one active MLflow run."""

    def __init__(self, mlflow_module: Any, run_id: str, *, continued: bool = False, parent_id: str | None = None):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.continued = continued  # an interrupted run of this execution, reopened: its inputs are logged
        self.parent_id = parent_id  # the pipeline execution's run

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dataset(self, name: str, uri: str, sha256: str, context: str, **tags: Any) -> None:
        """Record a dataset as an MLflow run input: its sha256 is the digest (MLflow keeps 36 chars)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, digest=sha256[:MLFLOW_DIGEST_LENGTH])
        self._mlflow.log_input(dataset, context=context,
                               tags={"dmat.sha256": sha256, **{f"dmat.{k}": str(v) for k, v in tags.items()}})

    def log_store(self, store: ArrayStore, name: str, context: str) -> None:
        """Record a canonical store as a run input, identified by its sha256."""
        self.log_dataset(name, str(store.path.resolve()), store.digest, context, images=len(store))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._mlflow.log_dict(data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self._mlflow.log_image(image, artifact_file=artifact_file)

    def log_torch_model(self, module: Any, input_example: Any, name: str = "model") -> None:
        """Log a PyTorch model (with signature from `input_example`) as an MLflow model of this run."""
        import mlflow.pytorch

        requirements = [f"torch=={_version('torch')}", f"numpy=={_version('numpy')}"]
        with warnings.catch_warnings():  # mlflow warns about pickling and unpinned extras it cannot act on
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(module, name=name, input_example=input_example, pip_requirements=requirements)


    def register_onnx_model(self, onnx_path: str | Path, name: str, input_example: Any, output_example: Any,
                            tags: Mapping[str, Any]) -> str:
        """Log the ONNX model into this run, register it as a new version of `name`, tag the version with
        `tags` (as `dmat.<key>`) and point the alias `candidate` at it; returns the version."""
        import onnx
        from mlflow.models import infer_signature

        with _quiet_mlflow():
            info = self._mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name="model", input_example=input_example,
                signature=infer_signature(input_example, output_example), registered_model_name=name,
                save_as_external_data=False)  # one file, byte-identical to the verified export
        client = self._mlflow.MlflowClient()
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, f"dmat.{key}", str(value))
        client.set_registered_model_alias(name, "candidate", version)
        if self.parent_id:  # the pipeline row links to the model it produced
            client.set_tag(self.parent_id, "dmat.model_version", f"models:/{name}/{version}")
        return version

    def model_version_tags(self, name: str, alias: str) -> dict[str, str] | None:
        """The `dmat.*` tags (prefix removed) and `version` of the version `alias` points at; None without one."""
        try:
            version = self._mlflow.MlflowClient().get_model_version_by_alias(name, alias)
        except self._mlflow.exceptions.MlflowException:  # the registered model or the alias does not exist yet
            return None
        tags = {k.removeprefix("dmat."): v for k, v in version.tags.items() if k.startswith("dmat.")}
        return {**tags, "version": str(version.version)}

    def set_model_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        client = self._mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, f"dmat.{key}", "null" if value is None else str(value))

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self._mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


class NullRun:
    """What torchrun ranks other than 0 get: every report is dropped (rank 0 reports for all)."""

    run_id = ""
    continued = False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(stage: str, params: Any, sections: tuple[str, ...], *, resume_run_id: str | None = None,
              enabled: bool = True) -> Iterator[StageRun | NullRun]:
    """Open the MLflow run of one stage execution; it ends FAILED if the stage raises, KILLED if it is interrupted
    (Ctrl-C, or SIGTERM: turned into KeyboardInterrupt while the run is open, so the stage cleans up as for Ctrl-C).

    `sections` are the params sections the stage reads; they are logged flattened as run params.
    `resume_run_id` continues the run of an interrupted execution (its checkpoint knows the id) when that run
    belongs to this pipeline execution; a checkpoint reused by another execution (a queued experiment resuming
    from the committed checkpoint) gets a new run under its own parent. `tracked.continued` says which.
    `enabled=False` (torchrun ranks other than 0) yields a run that records nothing.

    The run is a child of its pipeline execution's parent run (`_pipeline_run`), which follows its stages: DVC
    starts each stage as a process of its own, so each one sets the parent RUNNING when it starts and, when it
    ends, copies its headline numbers to the parent and sets the parent's status and end time from all its
    stage runs (`_settle_pipeline`).
    """
    if not enabled:
        yield NullRun()
        return
    uri = tracking_uri()
    check_reachable(uri)
    execution = current_execution(params, project_root())
    with _quiet_mlflow():
        import mlflow

        mlflow.set_tracking_uri(uri)
        try:
            client = mlflow.MlflowClient()
            experiment_id = _use_experiment(mlflow, params.base.experiment, uri)
            parent_id = _pipeline_run(client, experiment_id, execution)
            continued = bool(resume_run_id) and _run_of(client, resume_run_id, execution)
        except Exception as err:  # the store itself is broken: say which one
            raise TrackingError(f"cannot use MLflow tracking store {uri}: {err}") from None
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    run_name = f"{stage}@{exp_name}" if exp_name else stage
    tags = {"dmat.stage": stage, "dvc.stage": os.environ.get("DVC_STAGE", ""), "dvc.exp_name": exp_name,
            "git.commit": execution.commit, "mlflow.source.git.commit": execution.commit,
            "dmat.variant": execution.variant, "dmat.seed": execution.seed, "dmat.pipeline": execution.key,
            "mlflow.parentRunId": parent_id}
    if continued:
        run = mlflow.start_run(run_id=resume_run_id)
    else:
        run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    tracked = StageRun(mlflow, run.info.run_id, continued=continued, parent_id=parent_id)
    status = "FAILED"
    try:
        with _sigterm_interrupts():
            if not continued:
                _log_config(tracked, params, sections)
            yield tracked
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        try:
            with _quiet_mlflow():
                _settle_pipeline(client, experiment_id, parent_id, stage, tracked.run_id, status)
        except Exception as err:  # the stage's outcome stands; only its summary on the pipeline run is missing
            print(f"dmat: the pipeline run {parent_id} was not updated after {stage}: {err}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a queue worker stopped, torchrun ending its other ranks) while a stage run is open."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises `_Terminated` (a KeyboardInterrupt): the run then ends KILLED and the
    stage's own cleanup runs, where Python's default would end the process on the spot."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_of(client: Any, run_id: str, execution: Execution) -> bool:
    """Whether run `run_id` exists in the store and belongs to this pipeline execution."""
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or recorded in another store
        return False
    return run.data.tags.get("dmat.pipeline") == execution.key


def _use_experiment(mlflow_module: Any, name: str, uri: str) -> str:
    """Select the experiment, creating it with its artifacts beside the project when the store is a local
    database or directory (a tracking server keeps its own), and mark it as model development (the UI then
    opens on training runs, not on GenAI traces). Returns its id.

    MLflow would otherwise put artifacts under ./mlruns of the working directory, which for a queued
    `dvc exp run` is a temporary copy that DVC deletes afterwards. (Whether the store is local is read
    from `uri`, not from MLFLOW_TRACKING_URI: `mlflow.set_tracking_uri` sets that variable itself.)
    """
    local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if local_store and mlflow_module.get_experiment_by_name(name) is None:
        from mlflow.exceptions import MlflowException

        try:
            mlflow_module.create_experiment(name, artifact_location=(project_root() / "mlruns").as_uri(),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as err:  # two queued experiments starting at once: the other one created it
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow_module.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        _mark_model_development(mlflow_module.MlflowClient(), experiment.experiment_id)
    return experiment.experiment_id


def _mark_model_development(client: Any, experiment_id: str) -> None:
    """Tag an experiment as model development. Two stages starting at once may both find the tag missing, and the
    store then refuses the second write of the same key: no error, as long as the tag is there afterwards."""
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception:
        if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            raise


def _pipeline_run(client: Any, experiment_id: str, execution: Execution) -> str:
    """The parent run of a pipeline execution, created by its first stage run, and set RUNNING: a stage of it runs
    now. Its stage runs are its children, so the UI shows one `dvc repro` or `dvc exp run` as one row; it carries
    the variant (tags `dmat.variant`, `dmat.seed` to group by; the changed params, the seed and the profile as
    params, in the children's formatting)."""
    query = f"tags.`dmat.role` = 'pipeline' AND tags.`dmat.pipeline` = {_quoted(execution.key)}"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=execution.name, tags={
            "dmat.role": "pipeline", "dmat.pipeline": execution.key, "dmat.variant": execution.variant,
            "dmat.seed": str(execution.seed), "git.commit": execution.commit,
            "mlflow.source.git.commit": execution.commit, "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "")})
    # params cannot change once logged: a key already there (an experiment name rerun with --force) keeps its value
    new = {k: _param_value(v) for k, v in execution.params.items() if k not in run.data.params}
    if new:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in new.items()])
    return run.info.run_id


def _settle_pipeline(client: Any, experiment_id: str, parent_id: str, stage: str, run_id: str, status: str) -> None:
    """After stage `stage` ended with `status`: copy its headline numbers and dataset inputs to the parent run, and
    those of the stages DVC reused for this execution without running them (tag `dmat.reused_stages`); then set
    the parent's status from all its stage runs (`execution.pipeline_status`; tag `dmat.failed_stages` names
    the failed ones), its end time to now and `pipeline.seconds` to its duration.

    The parent cannot know whether DVC will run another stage after this one (DVC does not tell a stage its
    targets), so it ends after every stage, and the next stage of the execution sets it RUNNING again: between
    two stages it reads FINISHED, and its duration always spans the stages that have run."""
    from mlflow.entities import DatasetInput, Metric

    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = {_quoted(parent_id)}",
                                  max_results=5000)
    parent = client.get_run(parent_id)
    now = int(time.time() * 1000)
    ran = {child.data.tags.get("dmat.stage", "") for child in children}
    reused = set(filter(None, parent.data.tags.get("dmat.reused_stages", "").split(",")))
    newly_reused = reused_stages(exclude=ran | reused | {stage})
    metrics = headline_metrics(stage) if status == "FINISHED" else {}
    for name in newly_reused:
        metrics.update(headline_metrics(name))
    metrics[PIPELINE_SECONDS] = (now - parent.info.start_time) / 1000
    client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    inputs = client.get_run(run_id).inputs.dataset_inputs if status == "FINISHED" else []
    if inputs:
        client.log_inputs(parent_id, datasets=[DatasetInput(d.dataset, d.tags) for d in inputs])
    reused = (reused | set(newly_reused)) - ran - {stage}
    if reused != set(filter(None, parent.data.tags.get("dmat.reused_stages", "").split(","))):
        client.set_tag(parent_id, "dmat.reused_stages", ",".join(sorted(reused)))
    outcome, stages = pipeline_status((c.data.tags.get("dmat.stage", ""), c.info.status, c.info.start_time)
                                      for c in children)
    if outcome == "FINISHED":
        if "dmat.failed_stages" in parent.data.tags:
            client.delete_tag(parent_id, "dmat.failed_stages")
    else:
        client.set_tag(parent_id, "dmat.failed_stages", ",".join(stages))
    client.set_terminated(parent_id, outcome, end_time=now)


def _log_config(tracked: StageRun, params: Any, sections: tuple[str, ...]) -> None:
    """The stage's params, flattened, plus the fully resolved config file next to the results."""
    resolved = {name: as_dict(params.section(name)) for name in sections}
    tracked.log_params(flatten(resolved))
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "params.resolved.yaml"
        config_file.write_text(to_yaml(resolved))
        tracked.log_artifact(config_file)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


def _param_value(value: Any) -> str:
    return "null" if value is None else str(value)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's database migrations log at INFO on first use; keep the stage output readable."""
    loggers = [logging.getLogger(name) for name in ("alembic", "mlflow.store.db.utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
