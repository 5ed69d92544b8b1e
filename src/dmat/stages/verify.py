"""`verify`: deployment-side checks of models/export, then the MLflow model registry.

Gates (tolerances in params.yaml's `verify` section), each recorded with its measured value in
reports/verify.json (metrics/verify.json holds the headline numbers):
- onnx_checker: `onnx.checker` full check of classifier.onnx and denoiser.onnx;
- runtime_versions: their opset and IR version are within what the installed onnxruntime loads
  (probed with a one-node model per version, not read from a table);
- contract: input `image` float32 [batch, C, H, W] with a symbolic batch, output `logits` [batch, K];
- parity: logits of onnxruntime and PyTorch on clean test batches agree within `parity_atol`, with
  identical predicted classes;
- robust_accuracy_preserved: onnxruntime's accuracy on `evaluate`'s adversarial examples equals
  the PyTorch model's within `robust_acc_tolerance`;
- square_no_gradient_masking: black-box Square run against the onnxruntime session itself gives
  AutoAttack robust accuracy <= Square robust accuracy <= clean accuracy on the same points;
- latency_budget (only with `latency_budget_ms`): onnxruntime p95 at batch 1;
- denoiser_parity: denoiser.onnx vs the PyTorch EMA denoiser at several σ.
When every gate passes the ONNX classifier is registered (alias `candidate`). `champion` moves to it only
by evidence: when there is no champion, or when it was evaluated under the same threat model and attack
suite (pyautoattack version, attacks, budgets) on the same test points as the champion, withstands
attacks on significantly more of them and is not significantly less accurate on the clean points (exact
McNemar tests on the points where the two disagree, level `champion_alpha`); different points, threat
models or attack suites are refused as not comparable. Both tests, their p-values and the decision are
in the report, metrics/verify.json and the version's tags. A
failed gate exits 1 and
names the gate; nothing is registered.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import (
    load_adversarial_examples,
    load_classifier,
    load_denoiser,
    load_eval_report,
    load_outcomes,
)
from dmat.artifacts.onnx_checks import contract_gate, onnx_checker_gate, parity_gate, runtime_versions_gate
from dmat.artifacts.onnx_classifier import OnnxClassifier
from dmat.config import Params
from dmat.core.robustness import run_autoattack
from dmat.core.stats import ChampionDecision, EvaluationSummary, champion_decision
from dmat.data.store import ArrayStore
from dmat.data.tensors import first_points
from dmat.errors import GateFailed
from dmat.files import write_json
from dmat.onnx_contract import DENOISER_INPUTS, DENOISER_OUTPUT
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
THROUGHPUT_BATCH = 64


def robust_accuracy_gate(onnx_model: OnnxClassifier, threat: str, tolerance: float) -> dict:
    examples = load_adversarial_examples(threat)
    labels, torch_predictions = examples.labels, examples.predictions
    chw = np.ascontiguousarray(examples.images.transpose(0, 3, 1, 2))
    predictions = np.concatenate([onnx_model.run(chw[i:i + 256]).argmax(1) for i in range(0, len(chw), 256)])
    onnx_acc, torch_acc = float((predictions == labels).mean()), float((torch_predictions == labels).mean())
    return {"passed": abs(onnx_acc - torch_acc) <= tolerance, "threat": threat, "n": len(labels),
            "onnxruntime_acc": onnx_acc, "pytorch_acc": torch_acc, "tolerance": tolerance,
            "changed_predictions": int((predictions != torch_predictions).sum())}


def square_gate(onnx_model: OnnxClassifier, x: torch.Tensor, y: torch.Tensor, threat: str, params: Params) -> dict:
    """Square on the deployed artifact must not beat the white-box evaluation, nor do worse than nothing."""
    cfg = params.verify
    report = load_eval_report(threat)
    n = min(cfg.square_n, len(x), report.n)
    examples = load_adversarial_examples(threat)
    autoattack_acc = float((examples.predictions[:n] == examples.labels[:n]).mean())
    result = run_autoattack(onnx_model, x[:n], y[:n], norm=report.norm, eps=report.eps, version="custom",
                            attacks=("square",), seed=params.base.seed, batch_size=n, square_queries=cfg.square_queries)
    clean_acc = float(result.per_attack["clean"])
    square_acc = float(result.correct.double().mean())
    tol = cfg.square_tolerance
    return {"passed": autoattack_acc - tol <= square_acc <= clean_acc + tol, "n": n, "queries": cfg.square_queries,
            "square_acc": square_acc, "autoattack_acc": autoattack_acc, "clean_acc": clean_acc,
            "flags": result.flags, "seconds": result.seconds}


def latency(run_batch, x: torch.Tensor, runs: int) -> dict:
    """p50/p95 milliseconds at batch 1 and images/s at batch 64 (after a warm-up call each)."""
    one, many = x[:1], x[:THROUGHPUT_BATCH]
    run_batch(one)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run_batch(one)
        times.append(1000 * (time.perf_counter() - started))
    run_batch(many)
    repeats = max(3, runs // 10)
    started = time.perf_counter()
    for _ in range(repeats):
        run_batch(many)
    seconds = time.perf_counter() - started
    quantiles = statistics.quantiles(times, n=20)
    return {"p50_ms_batch1": statistics.median(times), "p95_ms_batch1": quantiles[18],
            "images_per_s_batch64": repeats * len(many) / seconds}


def denoiser_parity_gate(path: Path, sigmas: tuple[float, ...], atol: float, seed: int) -> dict:
    import onnxruntime

    denoiser, state = load_denoiser()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = state.model_config
    shape = (config.in_channels, config.img_resolution, config.img_resolution)
    generator = torch.Generator().manual_seed(seed)
    per_sigma = {}
    for sigma in sigmas:
        clean = torch.rand(4, *shape, generator=generator) * 2 - 1
        noisy = clean + sigma * torch.randn(4, *shape, generator=generator)
        sigmas_t, labels = torch.full((4,), float(sigma)), torch.arange(4) % config.num_classes
        with torch.no_grad():
            reference = denoiser(noisy, sigmas_t, labels).numpy()
        inputs = dict(zip(DENOISER_INPUTS, (noisy.numpy(), sigmas_t.numpy(), labels.numpy()), strict=True))
        ours = session.run([DENOISER_OUTPUT], inputs)[0]
        per_sigma[str(sigma)] = float(np.abs(ours - reference).max())
    return {"passed": all(d <= atol for d in per_sigma.values()), "atol": atol, "max_abs_diff": per_sigma}


def run(params: Params) -> dict:
    cfg = params.verify
    apply_torch(params.base)
    torch.set_grad_enabled(False)
    onnx_path, denoiser_path = layout.EXPORTED_CLASSIFIER_ONNX, layout.EXPORTED_DENOISER_ONNX
    manifest = json.loads(layout.EXPORT_MANIFEST.read_text())
    model, _ = load_classifier(layout.CLASSIFIER_BEST, "cpu")
    onnx_model = OnnxClassifier(onnx_path)
    n = max(max(cfg.parity_batches), cfg.square_n, THROUGHPUT_BATCH)
    x, y = first_points(ArrayStore.open(layout.REAL_TEST), n)
    threat = manifest["threat"]["name"]
    with stage_run(STAGE, params, SECTIONS) as tracked:
        gates = {
            "onnx_checker": onnx_checker_gate([onnx_path, denoiser_path]),
            "runtime_versions": runtime_versions_gate([onnx_path, denoiser_path]),
            "contract": contract_gate(onnx_model.session, manifest["input"]["shape"], len(manifest["classes"])),
            "parity": parity_gate(onnx_model, model, x, cfg.parity_batches, cfg.parity_atol),
            "robust_accuracy_preserved": robust_accuracy_gate(onnx_model, threat, cfg.robust_acc_tolerance),
            "square_no_gradient_masking": square_gate(onnx_model, x, y, threat, params),
            "denoiser_parity": denoiser_parity_gate(denoiser_path, cfg.denoiser_sigmas, cfg.denoiser_atol,
                                                    params.base.seed),
        }
        timings = {"onnxruntime": latency(lambda b: onnx_model.run(b.numpy()), x, cfg.latency_runs),
                   "pytorch_eager": latency(lambda b: model(b), x, cfg.latency_runs)}
        if cfg.latency_budget_ms is not None:
            p95 = timings["onnxruntime"]["p95_ms_batch1"]
            gates["latency_budget"] = {"passed": p95 <= cfg.latency_budget_ms, "p95_ms_batch1": p95,
                                       "budget_ms": cfg.latency_budget_ms}
        failed = [name for name, gate in gates.items() if not gate["passed"]]
        report = {"passed": not failed, "failed": failed, "gates": gates, "latency": timings,
                  "onnx_vs_torch_latency_ratio_batch1": timings["onnxruntime"]["p50_ms_batch1"]
                  / timings["pytorch_eager"]["p50_ms_batch1"],
                  "onnx_vs_torch_throughput_ratio_batch64": timings["onnxruntime"]["images_per_s_batch64"]
                  / timings["pytorch_eager"]["images_per_s_batch64"]}
        if not failed and cfg.register:
            metrics = manifest["metrics"]
            card = {"norm": manifest["threat"]["norm"], "eps": manifest["threat"]["eps"],
                    "robust_acc": metrics["robust_acc"], "robust_acc_ci": metrics["robust_acc_ci"],
                    "clean_acc": metrics["clean_acc"], "clean_acc_ci": metrics["clean_acc_ci"],
                    "n": metrics["n"], "train_run_id": manifest["lineage"]["train_run_id"],
                    "onnx_sha256": manifest["files"][onnx_path.name]}
            outcomes = load_outcomes(layout.eval_dir(threat) / layout.OUTCOMES_FILE)
            candidate = EvaluationSummary(norm=card["norm"], eps=float(card["eps"]), rows_id=metrics["rows_id"],
                                          robust_correct=outcomes.robust_correct,
                                          clean_correct=outcomes.clean_correct, suite=metrics.get("attack_suite"))
            example = x[:1].numpy()
            report["registry"] = register(tracked, onnx_path, cfg, example, onnx_model.run(example), card, candidate)
        write_json(layout.report_file(STAGE), report)
        write_json(layout.metrics_file(STAGE), headline(report))
        tracked.log_metrics(_flat_numbers(report))
        tracked.log_artifact(layout.report_file(STAGE))
        _print_summary(report)
        if failed:  # raised inside the run: the stage run, and so its pipeline run, ends FAILED naming verify
            raise GateFailed(f"deployment gate(s) failed: {', '.join(failed)} (measured values in "
                             f"{layout.report_file(STAGE)})")
    return report


def register(tracked, onnx_path: Path, cfg, example: np.ndarray, output: np.ndarray, card: dict,
             candidate: EvaluationSummary) -> dict:
    """A new registered version (alias `candidate`, tagged with its threat model, accuracies, attack suite, test
    rows and per-point outcomes); `champion` moves to it only by the evidence rule of `core.stats`."""
    name = cfg.registered_model
    version = tracked.register_onnx_model(onnx_path, name, example, output, {**card, **outcome_tags(candidate)})
    current = tracked.model_version_tags(name, "champion")
    decision = champion_by_evidence(candidate, current, cfg.champion_alpha)
    if decision.decision == "moves":
        tracked.set_model_alias(name, "champion", version)
    record = {"test": "exact McNemar on the discordant test points (conditional on these two trained models)",
              "alpha": cfg.champion_alpha, "decision": decision.decision, "reason": decision.reason,
              **_test_record("robust", decision.robust), **_test_record("clean", decision.clean),
              "compared_with_version": current["version"] if current else None}
    tracked.set_model_version_tags(name, version, {f"champion_rule.{key}": value for key, value in record.items()})
    moved = decision.decision == "moves"
    return {"name": name, "version": version, "aliases": ["candidate", "champion"] if moved else ["candidate"],
            "champion_moved": moved, "champion_rule": record, "reason": decision.reason,
            "model_uri": f"models:/{name}/{version}"}


def _test_record(kind: str, test) -> dict:
    """One paired test of the rule, flat: p-value and the points only the candidate / only the champion got."""
    return {f"{kind}_p_value": test.p_value if test else None, f"{kind}_candidate_only": test.a_only if test else None,
            f"{kind}_champion_only": test.b_only if test else None}


def champion_by_evidence(candidate: EvaluationSummary, current: dict | None, alpha: float) -> ChampionDecision:
    """The champion rule against the version `champion` points at, read from its registry tags (a version
    registered without per-point outcomes or its attack suite is refused as not comparable)."""
    if current is None:
        return champion_decision(candidate, None, alpha)
    if "robust_outcomes" not in current:
        return ChampionDecision("refused", f"not comparable: champion v{current['version']} was registered without "
                                           "per-point outcomes")
    n = int(current["n"])
    champion = EvaluationSummary(
        norm=current["norm"], eps=float(current["eps"]), rows_id=current["rows_id"],
        robust_correct=unpack_outcomes(current["robust_outcomes"], n),
        clean_correct=unpack_outcomes(current["clean_outcomes"], n) if "clean_outcomes" in current else None,
        suite=json.loads(current["attack_suite"]) if "attack_suite" in current else None)
    return champion_decision(candidate, champion, alpha)


def outcome_tags(summary: EvaluationSummary) -> dict[str, str]:
    """Registry tags that let a later version be compared with this one point by point, under the same suite."""
    tags = {"rows_id": summary.rows_id, "robust_outcomes": pack_outcomes(summary.robust_correct),
            "attack_suite": json.dumps(summary.suite, sort_keys=True)}
    if summary.clean_correct is not None:
        tags["clean_outcomes"] = pack_outcomes(summary.clean_correct)
    return tags


def pack_outcomes(correct) -> str:
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_outcomes(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def headline(report: dict) -> dict:
    """metrics/verify.json: whether every gate passed, the parity and robustness-after-export margins, the
    latencies and how the exported model compares with PyTorch, and what the registry did."""
    gates, onnx = report["gates"], report["latency"]["onnxruntime"]
    registry = report.get("registry") or {}
    return {
        "verify_passed": report["passed"], "verify_gates_failed": len(report["failed"]),
        "parity_max_abs_diff": max(b["max_abs_diff"] for b in gates["parity"]["batches"].values()),
        "robust_acc_onnx_minus_torch": (gates["robust_accuracy_preserved"]["onnxruntime_acc"]
                                        - gates["robust_accuracy_preserved"]["pytorch_acc"]),
        "square_acc": gates["square_no_gradient_masking"]["square_acc"],
        "onnx_p50_ms_batch1": onnx["p50_ms_batch1"], "onnx_p95_ms_batch1": onnx["p95_ms_batch1"],
        "onnx_vs_torch_latency_ratio_batch1": report["onnx_vs_torch_latency_ratio_batch1"],
        "onnx_vs_torch_throughput_ratio_batch64": report["onnx_vs_torch_throughput_ratio_batch64"],
        "registered_version": int(registry["version"]) if registry else None,
        "champion_moved": registry.get("champion_moved"),
        "champion_p_value": (registry.get("champion_rule") or {}).get("robust_p_value"),
    }


def _flat_numbers(report: dict) -> dict[str, float]:
    from dmat.config import flatten

    return {k: float(v) for k, v in flatten(report).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and "registry" not in k}


def _print_summary(report: dict) -> None:
    for name, gate in report["gates"].items():
        print(f"verify: {name}: {'passed' if gate['passed'] else 'FAILED'}")
    registry = report.get("registry")
    if registry:
        print(f"verify: registered {registry['name']} v{registry['version']} as "
              f"{' and '.join(registry['aliases'])} ({registry['reason']})")
