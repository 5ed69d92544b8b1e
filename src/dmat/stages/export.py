"""`export`: the deployable artifacts of the best EMA classifier and the EMA denoiser.

Writes models/export/:
- classifier.onnx: dynamo exporter, dynamic batch, normalisation inside the graph; input `image`
  (float32 N×C×H×W in [0, 1]), output `logits`. Its `metadata_props` tell where it came from:
  class names, input contract, threat model, clean and AutoAttack accuracy from `evaluate`, the
  MLflow run ids of training and evaluation, the git commit and the sha256 of the data stores.
- classifier.pt2: a `torch.export` program of the same classifier, for white-box evaluation of the
  exported artifact (`dmat robustness models/export/classifier.pt2 ...`).
- denoiser.onnx: the EMA denoiser D(x; σ, y); inputs `noisy` (N×C×H×W), `sigma` (N) and
  `class_labels` (N, int64), output `denoised`.
- manifest.json: the same provenance as the metadata, plus the sha256 of every exported file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import (
    RobustClassifierHeader,
    generated_source,
    load_classifier,
    load_denoiser,
    load_eval_report,
    load_mix_manifest,
)
from dmat.artifacts.onnx_export import EXAMPLE_BATCH, batch_dim, export_classifier_onnx, save_onnx
from dmat.config import Params
from dmat.execution import git_commit
from dmat.files import atomic_path, project_root, sha256_file, write_json
from dmat.onnx_contract import DENOISER_INPUTS, DENOISER_OUTPUT, INPUT_NAME, encode_metadata
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads


class DenoiserForExport(nn.Module):
    """D(x; σ, y) with the argument names the ONNX graph exposes."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.denoiser(noisy, sigma, class_labels)


def export_denoiser_onnx(denoiser: nn.Module, shape: tuple[int, int, int], path: Path,
                         metadata: dict[str, str]) -> None:
    noisy = torch.randn(EXAMPLE_BATCH, *shape)
    sigma = torch.linspace(0.1, 10, EXAMPLE_BATCH)
    labels = torch.arange(EXAMPLE_BATCH) % 2
    dims = {"noisy": {0: batch_dim()}, "sigma": {0: batch_dim()}, "class_labels": {0: batch_dim()}}
    program = torch.onnx.export(DenoiserForExport(denoiser).eval(), (noisy, sigma, labels), dynamo=True,
                                input_names=list(DENOISER_INPUTS), output_names=[DENOISER_OUTPUT],
                                dynamic_shapes=dims, verbose=False)
    save_onnx(program.model_proto, path, metadata)


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim()},))
    torch.export.save(program, str(path))  # into the stage's staging directory: published with it


def primary_threat(params: Params, checkpoint: RobustClassifierHeader) -> str:
    """The evaluated threat model the classifier was trained against (else the first one evaluated)."""
    trained = checkpoint.threat
    for name, threat in params.evaluate.threats.items():
        if threat.norm == trained.norm and abs(threat.eps - trained.eps) < 1e-9:
            return name
    return next(iter(params.evaluate.threats))


def provenance(params: Params, checkpoint: RobustClassifierHeader) -> dict:
    """Where the classifier came from: runs, commit, recipe and the digests of everything upstream."""
    reports = {name: load_eval_report(name) for name in params.evaluate.threats}
    manifest, _ = load_mix_manifest()
    generated = generated_source()
    main = primary_threat(params, checkpoint)
    report = reports[main]
    return {
        "classes": list(checkpoint.classes),
        "input": {"name": INPUT_NAME, "shape": _chw(checkpoint.model_config.input_shape), "dtype": "float32",
                  "range": [0, 1], "layout": "NCHW"},
        "threat": {"name": main, "norm": report.norm, "eps": report.eps},
        "metrics": {"clean_acc": report.clean_acc, "robust_acc": report.robust_acc,
                    "clean_acc_ci": list(report.clean_acc_ci), "robust_acc_ci": list(report.robust_acc_ci),
                    "confidence": report.confidence, "n": report.n, "rows_id": report.rows.rows_id,
                    "attack": f"autoattack-{report.version}", "attack_suite": report.suite,
                    "sanity_passed": report.sanity_passed},
        "evaluations": {name: {"norm": r.norm, "eps": r.eps, "clean_acc": r.clean_acc, "robust_acc": r.robust_acc,
                               "n": r.n, "mlflow_run_id": r.mlflow_run_id}
                        for name, r in reports.items()},
        "lineage": {
            "git_commit": git_commit(project_root()),
            "train_run_id": checkpoint.mlflow_run_id,
            "evaluate_run_ids": {name: r.mlflow_run_id for name, r in reports.items()},
            "diffusion_run_id": generated.get("diffusion", {}).get("mlflow_run_id"),
            "adversarial_mode": generated.get("diffusion", {}).get("adversarial", {}).get("mode"),
            "checkpoint_sha256": sha256_file(layout.CLASSIFIER_BEST),
            "diffusion_checkpoint_sha256": generated.get("diffusion", {}).get("checkpoint_sha256"),
            "data_sha256": {"train": manifest.real.sha256, "synthetic": manifest.synthetic.sha256,
                            "mixed_indices": manifest.indices_sha256,
                            "test": report.test_sha256},
        },
    }


def run(params: Params) -> dict:
    apply_torch(params.base)
    torch.set_grad_enabled(False)
    model, checkpoint = load_classifier(layout.CLASSIFIER_BEST, "cpu")  # exported graphs are device-free
    denoiser, diffusion_state = load_denoiser()
    info = provenance(params, checkpoint)
    shape = tuple(info["input"]["shape"])
    example = torch.rand(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(params.base.seed))
    with stage_run(STAGE, params, SECTIONS) as tracked:
        tracked.set_tags({"dmat.train_run_id": checkpoint.mlflow_run_id or ""})
        with atomic_path(layout.EXPORT_DIR, directory=True) as staging:
            staged = {path: staging / path.name for path in (layout.EXPORTED_CLASSIFIER_ONNX,
                                                             layout.EXPORTED_CLASSIFIER_PT2,
                                                             layout.EXPORTED_DENOISER_ONNX, layout.EXPORT_MANIFEST)}
            export_classifier_onnx(model, example, staged[layout.EXPORTED_CLASSIFIER_ONNX], encode_metadata(info))
            export_program(model, example, staged[layout.EXPORTED_CLASSIFIER_PT2])
            denoiser_info = {"lineage": {"diffusion_run_id": diffusion_state.mlflow_run_id,
                                         "checkpoint_sha256": sha256_file(layout.DIFFUSION_CHECKPOINT)},
                             "classes": list(diffusion_state.classes), "sigma_data": 0.5}
            export_denoiser_onnx(denoiser, shape, staged[layout.EXPORTED_DENOISER_ONNX], encode_metadata(denoiser_info))
            files = {name: sha256_file(staging / name) for name in layout.EXPORTED_FILES}
            write_json(staged[layout.EXPORT_MANIFEST], {**info, "files": files, "denoiser": denoiser_info,
                                                        "export_run_id": tracked.run_id})
        for path in (layout.EXPORTED_CLASSIFIER_ONNX, layout.EXPORT_MANIFEST):
            tracked.log_artifact(path, "export")
        tracked.log_params({"opset": _opset(layout.EXPORTED_CLASSIFIER_ONNX), "primary_threat": info["threat"]["name"]})
    sizes = ", ".join(f"{layout.EXPORT_DIR / name} ({(layout.EXPORT_DIR / name).stat().st_size / 1e6:.2f} MB)"
                      for name in files)
    print(f"export: {sizes}")
    return {"files": files, **info}


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _chw(hwc: list[int]) -> list[int]:
    return [hwc[2], hwc[0], hwc[1]]
