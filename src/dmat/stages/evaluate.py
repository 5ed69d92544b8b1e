"""`evaluate`: robustness of the best EMA classifier under each threat model in `evaluate.threats`.

For one threat model (dvc.yaml runs one stage per entry, `dmat evaluate --threat NAME`):
clean accuracy and AutoAttack on the first n test images (RobustBench's rule), optional extra
PGD-CE/CW on the points AutoAttack left, a PGD eps sweep, and the sanity checks of
`dmat.core.robustness`. Writes

- metrics/evaluate_<threat>.json: the headline numbers (n, eps, clean and robust accuracy, whether every
  sanity check passed, seconds);
- plots/evaluate_<threat>_sweep.csv: robust accuracy against eps (a `dvc plots` curve);
- models/eval/<threat>/: the adversarial examples (float32 N×H×W×C in [0, 1], the canonical
  layout) with their labels and the PyTorch predictions, for the deployment-side checks; report.json, the
  full report (accuracy per attack (cumulative) and per class, flags, sanity checks, timings: an
  `artifacts.records.EvalReport`, read back with `artifacts.loaders.load_eval_report`); and
  robustbench.json, a RobustBench-style record.

The MLflow run's params hold the whole upstream recipe (diffusion AT mode, generated images used,
synthetic fraction, classifier recipe), read from the artifacts this stage depends on, so one
table compares pipeline outcomes side by side.

Always in float32 (never the training stages' bf16/fp16 or TF32), with deterministic cuDNN algorithms.
Under torchrun (`base.nproc`, or `torchrun --nproc_per_node=N dmat evaluate`) whole batches of test points
are spread over N processes (GPUs); each batch's attacks are seeded by its global index, so the outputs
equal a single-process run's with the same batch size on the same GPU model and software stack.
"""

from __future__ import annotations

import csv
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import RobustClassifierHeader, generated_source, load_classifier, load_mix_manifest
from dmat.artifacts.records import EvalReport, EvalRows, PerClassAccuracy, SweepPoint, to_json
from dmat.config import Params, ParamsError, ThreatEvalConfig, flatten
from dmat.core.precision import full_precision
from dmat.core.robustness import ContractError, EvaluationSettings, Shard, evaluate_robustness, predict
from dmat.core.stats import rows_identity, wilson_interval
from dmat.data.store import ArrayStore
from dmat.data.tensors import first_points
from dmat.distributed import World, all_gather_object, world
from dmat.errors import CheckpointError
from dmat.files import atomic_path, sha256_file, write_json
from dmat.plots import save_curve
from dmat.stage_setup import apply_torch, evaluation_network
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
CONFIDENCE = 0.95
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads


def metrics_file(threat: str) -> Path:
    return layout.metrics_file(f"{STAGE}_{threat}")


def upstream_recipe(checkpoint: RobustClassifierHeader) -> dict:
    """The pipeline choices that produced the classifier, from the files this stage depends on. `mix.source` says
    which store supplied the "synthetic" share (generated, or heldout_real: the held-out real control); `diffusion`
    and `generate` describe data/synthetic either way."""
    manifest, _ = load_mix_manifest()
    generated = generated_source()
    diffusion = generated.get("diffusion", {})
    return {
        "diffusion": {"model": diffusion.get("model"), "adversarial_mode": diffusion.get("adversarial", {}).get("mode"),
                      "adversarial": diffusion.get("adversarial"), "corrupt": diffusion.get("corrupt"),
                      "train_steps": diffusion.get("train_steps"), "run_id": diffusion.get("mlflow_run_id")},
        "generate": {**{k: generated.get(k) for k in ("sampler", "steps", "guidance", "filter_keep")},
                     "filter_scorer": generated.get("filter", {}).get("scorer")},
        "mix": {"source": manifest.source, "synthetic_fraction": manifest.synthetic_fraction,
                "generated_images_used": manifest.synthetic.used, "real_images": manifest.real.images},
        "train": {**checkpoint.train_config, "run_id": checkpoint.mlflow_run_id},
    }


def run(params: Params, threat: str | None = None) -> dict[str, EvalReport]:
    cfg = params.evaluate
    names = [threat] if threat else list(cfg.threats)
    for name in names:
        if name not in cfg.threats:
            raise ParamsError(f"--threat {name!r} is not allowed: expected one of {', '.join(cfg.threats)} "
                              "(the keys of evaluate.threats)")
    device = apply_torch(params.base)
    with world(device) as w, full_precision():  # under torchrun each process attacks its share of the points
        model, checkpoint = load_classifier(layout.CLASSIFIER_BEST, w.device)
        model = evaluation_network(model, params.base, w.device)
        test = ArrayStore.open(layout.REAL_TEST)
        x, y = first_points(test, cfg.n)
        recipe = upstream_recipe(checkpoint)
        reports = {name: evaluate_threat(params, name, model, checkpoint, test, x, y, recipe, w) for name in names}
    return reports if w.is_main else {}


def evaluate_threat(params: Params, name: str, model, checkpoint: RobustClassifierHeader, test: ArrayStore,
                    x: torch.Tensor, y: torch.Tensor, recipe: dict, w: World) -> EvalReport | None:
    """One threat model; every torchrun rank attacks its shard, rank 0 reports and writes (the other ranks
    return None)."""
    threat, device = params.evaluate.threats[name], w.device
    with stage_run(f"{STAGE}@{name}", params, SECTIONS, enabled=w.is_main) as tracked:
        tracked.log_params({f"recipe.{k}": v for k, v in flatten(recipe).items()})
        tracked.set_tags({"dmat.threat": name, "dmat.train_run_id": checkpoint.mlflow_run_id or ""})
        tracked.log_store(test, "test", context="evaluation")
        started = time.perf_counter()
        try:
            measured, attacked = evaluate_robustness(
                model, x, y, test.classes, settings_for(params, threat, device),
                progress=(lambda line: print(f"  {line}", flush=True)) if w.is_main else None,
                shard=Shard(w.rank, w.size, functools.partial(all_gather_object, w)))
        except ContractError as err:
            raise CheckpointError(f"{layout.CLASSIFIER_BEST}: {err}") from None
        if not w.is_main:
            return None
        seconds_total = time.perf_counter() - started
        predictions = predict(model, attacked.to(device), params.evaluate.batch_size).cpu()
        clean_correct = (predict(model, x.to(device), params.evaluate.batch_size).cpu() == y).numpy()
        report = eval_report(measured, threat=name, classes=tuple(test.classes),
                             model=checkpoint.model_config.name,
                             checkpoint_sha256=sha256_file(layout.CLASSIFIER_BEST), test_sha256=test.digest,
                             train_run_id=checkpoint.mlflow_run_id, mlflow_run_id=tracked.run_id,
                             seconds_total=seconds_total, **intervals(measured, y.numpy(), test))
        record = robustbench_record(report, checkpoint, recipe, test)
        write_outputs(name, report, record, attacked, y, predictions, clean_correct)
        log_results(tracked, name, report, record)
    _print_summary(name, report)
    return report


def eval_report(measured: dict, **fields) -> EvalReport:
    """The report on disk: what `evaluate_robustness` measured (plain data) and the stage's own `fields`."""
    return EvalReport(**{**measured, **fields, "attacks": tuple(measured["attacks"]),
                         "per_class": PerClassAccuracy(**measured["per_class"]), "flags": tuple(measured["flags"]),
                         "autoattack_warnings": tuple(measured["autoattack_warnings"]),
                         "sweep": tuple(SweepPoint(**row) for row in measured["sweep"])})


def intervals(measured: dict, labels: np.ndarray, test: ArrayStore) -> dict:
    """95% Wilson intervals for every accuracy `evaluate_robustness` measured (overall, per attack, per class),
    with the n each rests on, and the identity of the test rows (what a paired comparison must share): the
    report's interval fields."""
    n, classes = measured["n"], test.classes
    class_n = dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist(), strict=True))
    return {
        "confidence": CONFIDENCE, "rows": EvalRows(first=n, rows_id=rows_identity(range(n), test.digest)),
        "clean_acc_ci": _interval(measured["clean_acc"], n), "robust_acc_ci": _interval(measured["robust_acc"], n),
        "per_attack_ci": {name: list(_interval(acc, n)) for name, acc in measured["per_attack"].items()},
        "per_class_n": class_n,
        "per_class_ci": {kind: {name: None if acc is None else list(_interval(acc, class_n[name]))
                                for name, acc in accuracies.items()}
                         for kind, accuracies in measured["per_class"].items()},
    }


def _interval(accuracy: float, n: int) -> tuple[float, ...]:
    return tuple(wilson_interval(round(accuracy * n), n, CONFIDENCE))


def settings_for(params: Params, threat: ThreatEvalConfig, device: str) -> EvaluationSettings:
    cfg = params.evaluate
    return EvaluationSettings(
        norm=threat.norm, eps=threat.eps, version=cfg.version, attacks=cfg.attacks, seed=params.base.seed,
        batch_size=cfg.batch_size, device=device, square_queries=cfg.square_queries, pgd_steps=cfg.pgd_steps,
        pgd_restarts=cfg.pgd_restarts, sweep=threat.sweep, large_eps=threat.large_eps, sweep_steps=cfg.sweep_steps,
        sweep_n=cfg.sweep_n, tolerance=cfg.tolerance)


def robustbench_record(report: EvalReport, checkpoint: RobustClassifierHeader, recipe: dict, test: ArrayStore) -> dict:
    """A RobustBench-style model card entry (accuracies as percentage strings, as RobustBench writes them)."""
    used = recipe["mix"]["generated_images_used"]
    return {
        "name": f"DMAT {checkpoint.model_config.name}", "link": "", "authors": "", "venue": "",
        "dataset": checkpoint.model_config.dataset or test.meta.source.get("dataset", ""),
        "threat_model": report.norm, "eps": _eps_text(report.eps, report.norm),
        "architecture": checkpoint.model_config.name, "number_forward_passes": 1,
        # Generated images come from a diffusion model trained on the same training split, which
        # RobustBench does not count as additional data.
        "additional_data": False,
        "clean_acc": f"{100 * report.clean_acc:.2f}", "autoattack_acc": f"{100 * report.robust_acc:.2f}",
        "n_examples": report.n, "autoattack_version": report.version,
        "unreliable": not report.sanity_passed,
        "footnote": (f"{used} held-out real images in place of generated ones"
                     if recipe["mix"]["source"] == "heldout_real" else
                     f"{used} generated images (diffusion AT mode {recipe['diffusion']['adversarial_mode']})") + ", "
                    f"synthetic fraction {recipe['mix']['synthetic_fraction']}, {recipe['train']['loss']} training. "
                    f"95% Wilson intervals on the first {report.n} test points: clean "
                    f"{_percent_range(report.clean_acc_ci)}, AutoAttack {_percent_range(report.robust_acc_ci)}.",
        "clean_acc_ci": [f"{100 * bound:.2f}" for bound in report.clean_acc_ci],
        "autoattack_acc_ci": [f"{100 * bound:.2f}" for bound in report.robust_acc_ci],
    }


def _percent_range(bounds: tuple[float, ...]) -> str:
    return f"[{100 * bounds[0]:.2f}, {100 * bounds[1]:.2f}]%"


def _eps_text(eps: float, norm: str) -> str:
    scaled = eps * 255
    return f"{round(scaled)}/255" if norm == "Linf" and abs(scaled - round(scaled)) < 1e-6 else f"{eps:g}"


def write_outputs(name: str, report: EvalReport, record: dict, x_adv: torch.Tensor, y: torch.Tensor,
                  predictions: torch.Tensor, clean_correct: np.ndarray) -> None:
    write_examples(layout.eval_dir(name), x_adv, y, predictions, clean_correct, report, record)
    with atomic_path(layout.sweep_file(name)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["eps", "robust_acc"])
        writer.writeheader()
        writer.writerows(to_json(report.sweep))
    write_json(metrics_file(name), headline(report))


def headline(report: EvalReport) -> dict:
    """What metrics/evaluate_<threat>.json declares to DVC: the numbers people compare across experiments
    (the full report, with per-attack and per-class accuracies, flags and sanity details, is in models/eval).
    Keys carry the threat's name (`linf_robust_acc`): unique across metrics files, `dvc exp show` keeps its
    columns short."""
    numbers = {"n": report.n, "eps": report.eps, "clean_acc": report.clean_acc,
               "clean_acc_ci_low": report.clean_acc_ci[0], "clean_acc_ci_high": report.clean_acc_ci[1],
               "robust_acc": report.robust_acc, "robust_acc_ci_low": report.robust_acc_ci[0],
               "robust_acc_ci_high": report.robust_acc_ci[1], "sanity_passed": report.sanity_passed,
               "s": report.seconds_total}
    return {f"{report.threat}_{key}": value for key, value in numbers.items()}


def write_examples(out: Path, x_adv: torch.Tensor, y: torch.Tensor, predictions: torch.Tensor,
                   clean_correct: np.ndarray, report: EvalReport, record: dict) -> None:
    """images.npy (float32 N×H×W×C), labels.npy, predictions.npy, the per-point outcomes, the reports and
    meta.json, published in one rename."""
    with atomic_path(out, directory=True) as staging:
        np.savez(staging / layout.OUTCOMES_FILE, rows=np.arange(len(y), dtype=np.int64), clean_correct=clean_correct,
                 robust_correct=(predictions == y).numpy())
        arrays = (x_adv.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32), y.numpy().astype(np.int64),
                  predictions.numpy().astype(np.int64))
        for name, array in zip(layout.EXAMPLE_ARRAYS, arrays, strict=True):
            np.save(staging / name, array)
        meta = {"format": layout.EXAMPLES_FORMAT, "classes": list(report.classes), "norm": report.norm,
                "eps": report.eps, "n": report.n, "clean_acc": report.clean_acc,
                "robust_acc": report.robust_acc, "layout": "NHWC", "dtype": "float32", "range": [0, 1],
                "sha256": {f: sha256_file(staging / f) for f in layout.EXAMPLE_ARRAYS}}
        write_json(staging / "meta.json", meta)
        write_json(staging / layout.ROBUSTBENCH_FILE, record)
        write_json(staging / layout.EVAL_REPORT_FILE, to_json(report))  # what export and verify read


def log_results(tracked, name: str, report: EvalReport, record: dict) -> None:
    metrics = {"n": report.n, "clean_acc": report.clean_acc, "robust_acc": report.robust_acc,
               **{f"{key}_ci_{side}": bounds[i] for key, bounds in (("clean_acc", report.clean_acc_ci),
                                                                   ("robust_acc", report.robust_acc_ci))
                  for i, side in enumerate(("low", "high"))},
               "sanity_passed": float(report.sanity_passed), "seconds_autoattack": report.seconds_autoattack,
               "images_per_s": report.images_per_s}
    metrics.update({f"per_attack.{k}": v for k, v in report.per_attack.items()})
    for kind, accuracies in (("clean", report.per_class.clean), ("robust", report.per_class.robust)):
        metrics.update({f"per_class.{kind}.{c}": v for c, v in accuracies.items() if v is not None})
    tracked.log_metrics(metrics)
    # what `dmat compare` needs to label a table: the attacks that ran and the chance level (1 / classes)
    tracked.set_tags({"dmat.flags": ",".join(report.flags) or "none", "dmat.attacks": ",".join(report.attacks),
                      "dmat.classes": str(len(report.classes))})
    tracked.log_artifact(layout.eval_dir(name) / layout.EVAL_REPORT_FILE)
    tracked.log_artifact(layout.eval_dir(name) / layout.OUTCOMES_FILE)  # what `dmat compare` pairs runs on
    tracked.set_tags({"dmat.rows_id": report.rows.rows_id})
    tracked.log_dict(record, "robustbench.json")
    with tempfile.TemporaryDirectory() as tmp:  # the picture is for MLflow; `dvc plots` draws the CSV
        curve = Path(tmp) / f"evaluate_{name}_sweep.png"
        save_curve(curve, [point.eps for point in report.sweep],
                   {"PGD-CE": [point.robust_acc for point in report.sweep]},
                   xlabel=f"eps ({report.norm})", ylabel="robust accuracy", title=f"{name}: robust accuracy vs eps")
        tracked.log_artifact(curve)


def _range(bounds: tuple[float, ...]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _print_summary(name: str, report: EvalReport) -> None:
    failed = report.failed_checks()
    print(f"evaluate {name}: n={report.n} clean {report.clean_acc:.4f} {_range(report.clean_acc_ci)} "
          f"robust {report.robust_acc:.4f} {_range(report.robust_acc_ci)} "
          f"({report.version} AutoAttack, {report.norm} eps={report.eps:.5g}, "
          f"{report.seconds_autoattack:.0f}s); flags: {', '.join(report.flags) or 'none'}; "
          f"sanity: {'passed' if not failed else 'FAILED ' + ', '.join(failed)}", flush=True)
