"""The skeleton every model-training stage runs (`train_reference`, `train_diffusion`, `train`).

`ModelTraining.run(params)` is a training stage from start to end: the registry and precision checks before
anything is written, resuming from the work directory's checkpoint (`layout.work_dir`) when it belongs to the
same configuration and inputs, the precision decision (`stage_setup.choose_setting`), the stage's MLflow run,
training, the stage's results, and publishing the finished checkpoints to its output directory. A stage
subclasses it (the classifier stages through `training.classifier`, which adds the loop over epochs) and keeps
only what is its own: its network and data, its loss and batches, its validation and its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm import tqdm

from dmat.artifacts import layout
from dmat.artifacts.records import checkpoint_contents, from_json
from dmat.checkpoint import load_resumable, publish, restore_training, save_checkpoint
from dmat.config import Params, ParamsError, as_dict
from dmat.distributed import World, barrier, broadcast_object, world
from dmat.files import write_json
from dmat.pipeline import Stage
from dmat.stage_setup import apply_torch, check_precision, choose_setting, log_precision, probe_batch, training_network
from dmat.tracking import stage_run

if TYPE_CHECKING:
    from dmat.core.precision import Decision


class ModelTraining:
    """One run of a model-training stage: network, weight average, optimiser, precision, progress, MLflow run.

    A subclass declares its stage and checkpoints (the class attributes below), builds in `__init__` (after
    `super().__init__`) `real` (its training store), `model`, `model_config` (a record), `optimizer`, `fingerprint` and,
    when it averages weights, `ema`; and implements `probe_passes`, `log_inputs`, `train` and `finish`.
    """

    DECLARED: ClassVar[Stage]  # the stage's declaration (`pipeline.for_module`)
    SECTION: ClassVar[str]  # the params section it trains from
    NETWORKS: ClassVar[dict]  # the registry its `model` names one of
    FORMAT: ClassVar[str]  # its checkpoints' format (`layout`), which loaders check
    HEADER: ClassVar[type]  # its checkpoints' header (`artifacts.records`)
    CHECKPOINTS: ClassVar[tuple[Path, ...]]  # what it publishes, one output directory; a re-run resumes the last
    COUNTER: ClassVar[str] = "epoch"  # the attribute counting what is trained, and its header's field
    HISTORY: ClassVar[str] = "history"  # the attribute holding its per-epoch or per-interval rows, and its field

    def __init__(self, params: Params, w: World):
        self.params, self.world, self.cfg = params, w, getattr(params, self.SECTION)
        self.work = layout.work_dir(self.DECLARED.name)  # resumable checkpoints while training
        self.ema = None  # a stage that averages its weights sets its `core.ema.WeightAverage`
        # Set by use(), once the precision is chosen; a resumed run brings its recorded choice and loss scale.
        self.trained, self.scaler, self.precision = None, None, None
        self.recorded_precision, self.recorded_scaler = None, None
        self.run_id = None
        setattr(self, self.COUNTER, 0)
        setattr(self, self.HISTORY, [])

    # --- the stage, from start to end -------------------------------------------------------------------

    @classmethod
    def run(cls, params: Params) -> dict:
        device = apply_torch(params.base)
        cls.check(params, device)
        with world(device) as w:
            trainer = cls(params, w)
            trainer.resume()
            trainer.use(choose_setting(params.base, w, trainer.probe_passes, trainer.recorded_precision,
                                       workload=trainer.workload()))
            with stage_run(cls.DECLARED.name, params, cls.DECLARED.sections, resume_run_id=trainer.run_id,
                           enabled=w.is_main) as tracked:
                trainer.run_id = broadcast_object(w, tracked.run_id)
                if not tracked.continued:
                    trainer.log_inputs(tracked)
                    log_precision(tracked, trainer.precision)
                trainer.train(tracked)
                metrics = trainer.finish(tracked)
                trainer.publish()
        return metrics

    @classmethod
    def check(cls, params: Params, device: str) -> None:
        """Checks that need the registries or the device: still before anything is written."""
        model = getattr(params, cls.SECTION).model
        if model not in cls.NETWORKS:
            raise ParamsError(f"{cls.SECTION}.model = {model!r} is not allowed: expected one of "
                              f"{', '.join(cls.NETWORKS)}")
        check_precision(params.base, device)

    # --- what the stage implements ------------------------------------------------------------------------

    def probe_passes(self):
        """Forward and backward passes of the network at this rank's micro-batch, for the `auto` probe."""
        raise NotImplementedError

    def log_inputs(self, tracked) -> None:
        """What a new MLflow run records first: its datasets and the params the stage derives."""
        raise NotImplementedError

    def train(self, tracked) -> None:
        """Train from where the run stands to the end, checkpointing on the way (rank 0 writes and logs)."""
        raise NotImplementedError

    def finish(self, tracked) -> dict:
        """The stage's results (every rank returns them; rank 0 writes and logs them), before publishing."""
        raise NotImplementedError

    # --- precision --------------------------------------------------------------------------------------

    def workload(self) -> dict[str, Any]:
        """What the probe measures, for the machine's kept precision decision."""
        batch = probe_batch(self.cfg.batch_size, self.cfg.micro_batch, self.world)  # as probe_passes
        return {"stage": self.DECLARED.name, "network": self.cfg.model, "batch": batch,
                "image_shape": list(self.real.image_shape)}

    def use(self, decision: Decision) -> None:
        """Train from now on in `decision`'s setting (the EMA copy, if any, stays float32 and contiguous)."""
        self.precision = decision
        self.trained, self.scaler = training_network(self.model, decision, self.world, compile=self.params.base.compile,
                                                     scaler_state=self.recorded_scaler)

    # --- checkpoints ------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Load the work directory's last checkpoint if it belongs to this configuration and these inputs."""
        path = self.work / self.CHECKPOINTS[-1].name
        state = load_resumable(path, format=self.FORMAT, fingerprint=self.fingerprint, map_location=self.world.device)
        if state is None:
            return False
        header = from_json(self.HEADER, state, str(path))
        restore_training(state, model=self.model, ema=self.ema, optimizer=self.optimizer)
        setattr(self, self.COUNTER, getattr(header, self.COUNTER))
        setattr(self, self.HISTORY, list(getattr(header, self.HISTORY)))
        self.run_id = header.mlflow_run_id
        self.recorded_precision, self.recorded_scaler = header.precision, state.get("grad_scaler")
        return True

    def record(self) -> dict[str, Any]:
        """The fields of the header that only this stage's checkpoints have (after the classes)."""
        return {}

    def header(self):
        """The header of a checkpoint written now (a `HEADER`)."""
        return self.HEADER(format=self.FORMAT, fingerprint=self.fingerprint,
                           **{self.COUNTER: getattr(self, self.COUNTER)}, model_config=self.model_config,
                           classes=tuple(self.real.classes), **self.record(), mlflow_run_id=self.run_id,
                           **{self.HISTORY: tuple(getattr(self, self.HISTORY))}, train_config=as_dict(self.cfg),
                           precision=self.precision.record())

    def checkpoint_state(self, *, with_optimizer: bool) -> dict[str, Any]:
        """What a checkpoint holds: its header and weights; `with_optimizer`: also what resuming needs (the
        optimiser, the loss scale)."""
        weights = {"model": self.model.state_dict(), **({} if self.ema is None else {"ema": self.ema.state_dict()})}
        training = ({"optimizer": self.optimizer.state_dict(), "grad_scaler": self.scaler.state_dict()}
                    if with_optimizer else None)
        return checkpoint_contents(self.header(), weights, training)

    def save(self, checkpoint: Path, *, with_optimizer: bool = True) -> None:
        """Write `checkpoint` (a `CHECKPOINTS` path) atomically into the work directory."""
        save_checkpoint(self.work / checkpoint.name, self.checkpoint_state(with_optimizer=with_optimizer))

    def publish(self) -> None:
        """Move the finished checkpoints to the output directory, once every rank is done reading them."""
        barrier(self.world)
        if self.world.is_main:
            publish(self.work, self.CHECKPOINTS[0].parent, tuple(path.name for path in self.CHECKPOINTS))

    # --- progress and results ---------------------------------------------------------------------------

    def progress_bar(self, total: int, initial: int) -> tqdm:
        """Steps done out of `total`, on rank 0's console only."""
        return tqdm(total=total, initial=initial, desc=self.DECLARED.name, unit="step",
                    disable=not self.world.is_main, mininterval=2)

    def write_results(self, metrics: dict, headline: dict, **report: Any) -> None:
        """metrics/<stage>.json: the `headline` numbers; reports/<stage>.json: `metrics`, the precision choice,
        the number of processes and `report`."""
        name = self.DECLARED.name
        write_json(layout.metrics_file(name), headline)
        write_json(layout.report_file(name), {**metrics, **self.precision.summary(), "processes": self.world.size,
                                              **report})

