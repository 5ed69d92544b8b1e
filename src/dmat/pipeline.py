"""Every stage of the pipeline, declared once: its command, the params it reads, the files it reads and writes.

This is the one home of the pipeline's graph. `dvc.yaml` is rendered from it (`dmat pipeline render`; a
test holds the committed file equal to the rendering), adding each stage's code dependencies — every
module `dmat <command>` imports — so that `dvc repro` reruns a stage whenever its code changes. The CLI's
help, `dmat lineage`'s upstream links and the README's stage table come from here too, and the
end-to-end tests check that a stage opens no project file it does not declare (`dmat.audit`).

Paths are the `artifacts.layout` constants; a stage that runs once per entry of a params mapping
(`foreach`) spells the entry as `${key}`. Standard library only: the CLI imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dmat.artifacts import layout

KEY = "${key}"  # the foreach entry in paths and commands (DVC's own syntax)
TRAINING = ("base.seed", "base.precision", "base.memory_format", "base.compile")  # what changes a trained model


@dataclass(frozen=True)
class Read:
    """A file or directory a stage reads, with why when it is not obvious."""

    path: Path
    why: str = ""


@dataclass(frozen=True)
class Write:
    """A file or directory a stage writes: an output DVC caches (`out`), or a `metric` / `plot` file
    committed to git (`cache` false) so that `dvc exp show` and `dvc plots` have every experiment's figures."""

    path: Path
    kind: str = "out"  # out | metric | plot
    cache: bool = True
    why: str = ""
    plot: tuple[tuple[str, str], ...] = ()  # dvc plot properties (x, y, title)


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage name (snake_case)
    command: str  # the `dmat` subcommand (kebab-case)
    module: str  # the module whose run(params) the command calls
    summary: str  # one line: what it does (the CLI's help; the README table)
    params: tuple[str, ...]  # params.yaml keys or sections DVC reruns it for
    reads: tuple[Read, ...] = ()
    writes: tuple[Write, ...] = ()
    foreach: str | None = None  # a params mapping: one stage per entry (`${key}` in paths and the command)
    always_changed: bool = False
    why: str = ""  # a comment on the stage

    @property
    def sections(self) -> tuple[str, ...]:
        """The params sections it reads (what its MLflow run logs), in order."""
        return tuple(dict.fromkeys(key.split(".")[0] for key in self.params))

    @property
    def cmd(self) -> str:
        return f"dmat {self.command}" + (f" --threat {KEY}" if self.foreach else "")

    def paths(self, kind: str | None = None) -> list[Path]:
        return [w.path for w in self.writes if kind is None or w.kind == kind]


def _read(*paths: Path | tuple[Path, str]) -> tuple[Read, ...]:
    return tuple(Read(*p) if isinstance(p, tuple) else Read(p) for p in paths)


def _outs(*paths: Path, report: str | None = None) -> tuple[Write, ...]:
    return tuple(Write(p) for p in paths) + ((Write(layout.report_file(report)),) if report else ())


def _metrics(name: str) -> Write:
    return Write(layout.metrics_file(name), kind="metric", cache=False)


STAGES: tuple[Stage, ...] = (
    Stage("fetch", "fetch", "dmat.stages.fetch",
          "Find the real data (data.path when it exists, else torchvision's download into data.download_dir, once) "
          "and record which, with its sha256", params=("data",),
          writes=(Write(layout.SOURCE_RECORD),), always_changed=True,
          why="the data lives outside DVC's view; prepare reruns only when the record changes"),
    Stage("prepare", "prepare", "dmat.stages.prepare",
          "Real data -> canonical train/val/test/heldout stores, split and subset as the `data` section says",
          params=("base.seed", "data"), reads=_read(layout.SOURCE_RECORD),
          writes=(*_outs(layout.REAL_TRAIN, layout.REAL_VAL, layout.REAL_TEST),
                  Write(layout.REAL_HELDOUT, why="held-out real images (data.heldout_size; empty when 0): the control"),
                  Write(layout.report_file("prepare")), _metrics("prepare"))),
    Stage("train_reference", "train-reference", "dmat.stages.train_reference",
          "Standard training of the reference classifier on real data only: the yardstick of generated data and "
          "the scorer of generate's filter (resumes after a kill; runs under torchrun)",
          params=(*TRAINING, "train_reference"), reads=_read(layout.REAL_TRAIN, layout.REAL_VAL, layout.REAL_TEST),
          writes=(*_outs(layout.REFERENCE_DIR, report="train_reference"), _metrics("train_reference"),
                  Write(layout.REFERENCE_CURVES, kind="plot", cache=False)),
          why="standard training on real data only: the yardstick of generated data, generate's filter scorer"),
    Stage("train_diffusion", "train-diffusion", "dmat.stages.train_diffusion",
          "Train the class-conditional EDM denoiser with adversarial training of the diffusion model (mode none | "
          "random | adversarial | invariance); resumes after a kill; runs under torchrun",
          params=(*TRAINING, "train_diffusion"), reads=_read(layout.REAL_TRAIN),
          writes=(*_outs(layout.DIFFUSION_DIR, report="train_diffusion"), _metrics("train_diffusion"))),
    Stage("fetch_generated", "fetch-generated", "dmat.stages.fetch_generated",
          "Record which external files generate.source external reads (path, size, modification time; no hashing), "
          "so that generate reruns when they change", params=("generate",),
          writes=(Write(layout.GENERATED_SOURCE_RECORD),), always_changed=True,
          why="the files live outside DVC's view; generate reruns only when the record changes (docs/published.md)"),
    Stage("generate", "generate", "dmat.stages.generate",
          "Sample generate.per_class images per class from the EMA denoiser into a class-sorted store "
          "(byte-identical for any batch size or number of processes), or, generate.source external, stream "
          "published .npz parts, an image folder or a store into it with each file's sha256",
          params=("base.seed", "base.precision", "base.memory_format", "generate"),
          reads=_read((layout.GENERATED_SOURCE_RECORD, "generate.source external: stands for the files it names"),
                      (layout.REAL_TRAIN, "generate.source external: the dataset's classes and image size"),
                      layout.DIFFUSION_DIR, (layout.REFERENCE_DIR, "the scorer of generate.filter_scorer: reference "
                                                                   "(another checkpoint: add its path here)")),
          writes=(*_outs(layout.SYNTHETIC_DIR, report="generate"), _metrics("generate"),
                  Write(layout.GENERATE_GRID, kind="plot"))),
    Stage("mix", "mix", "dmat.stages.mix",
          "Choose the generated (or, mix.source heldout_real, held-out real) images the classifier may use and "
          "their share of every batch", params=("base.seed", "mix"),
          reads=_read(layout.REAL_TRAIN, layout.SYNTHETIC_DIR,
                      (layout.REAL_HELDOUT, "mix.source heldout_real mixes it in place of data/synthetic")),
          writes=_outs(layout.MIXED_DIR)),
    Stage("train", "train", "dmat.stages.train",
          "Adversarial training (TRADES or PGD-AT) of the classifier on mixed real/generated batches (resumes "
          "after a kill; runs under torchrun)", params=(*TRAINING, "train"),
          reads=_read(layout.REAL_TRAIN, layout.REAL_VAL, layout.SYNTHETIC_DIR,
                      (layout.REAL_HELDOUT, "read instead of data/synthetic when the mix manifest names it"),
                      layout.MIXED_DIR),
          writes=(*_outs(layout.CLASSIFIER_DIR, report="train"), _metrics("train"),
                  Write(layout.TRAIN_CURVES, kind="plot", cache=False))),
    Stage("evaluate", "evaluate", "dmat.stages.evaluate",
          "Robustness of the best EMA classifier per threat model: clean accuracy, AutoAttack, a PGD eps sweep and "
          "sanity checks on the first evaluate.n test images", params=("base.seed", "evaluate"),
          reads=_read(layout.CLASSIFIER_DIR, layout.REAL_TEST, layout.MIXED_DIR, layout.SYNTHETIC_DIR),
          writes=(Write(layout.eval_dir(KEY)), _metrics(f"evaluate_{KEY}"),
                  Write(layout.sweep_file(KEY), kind="plot", cache=False,
                        plot=(("x", "eps"), ("y", "robust_acc"), ("title", "Robust accuracy vs eps (PGD-CE)")))),
          foreach="evaluate.threats", why="one stage per threat model in params.yaml's evaluate.threats"),
    Stage("export", "export", "dmat.stages.export",
          "Export the best EMA classifier (ONNX with provenance metadata, torch.export .pt2) and the EMA denoiser "
          "(ONNX)", params=("base.seed", "evaluate.threats"),
          reads=_read(layout.CLASSIFIER_DIR, layout.DIFFUSION_DIR, layout.EVAL_DIR, layout.MIXED_DIR,
                      layout.SYNTHETIC_DIR / "meta.json"),
          writes=_outs(layout.EXPORT_DIR)),
    Stage("verify", "verify", "dmat.stages.verify",
          "Deployment-side checks of the export (ONNX checker, contract, parity, robustness after export, Square "
          "on onnxruntime, latency, denoiser parity); registers the model in MLflow when every gate passes",
          params=("base.seed", "verify"),
          reads=_read(layout.EXPORT_DIR, layout.EVAL_DIR, layout.CLASSIFIER_DIR, layout.DIFFUSION_DIR,
                      layout.REAL_TEST),
          writes=(Write(layout.report_file("verify")), _metrics("verify"))),
    Stage("evaluate_diffusion", "evaluate-diffusion", "dmat.stages.evaluate_diffusion",
          "Evaluate the diffusion model: denoiser error under random and adversarial perturbations; sample quality "
          "under the reference classifier next to held-out real images", params=("base.seed", "evaluate_diffusion"),
          reads=_read(layout.DIFFUSION_DIR,
                      (layout.REFERENCE_DIR, "the yardstick: never the classifier trained on data/synthetic"),
                      layout.SYNTHETIC_DIR, (layout.MIXED_DIR, "which generated rows to leave out (trained on)"),
                      layout.REAL_TEST, (layout.REAL_HELDOUT, "the control"),
                      (layout.REAL_TRAIN, "memorisation: the diffusion model's training images"),
                      (layout.REAL_VAL, "calibrates the memorisation threshold")),
          writes=(Write(layout.report_file("evaluate_diffusion")), _metrics("evaluate_diffusion"))),
)

# What `dvc plots show` draws beside each stage's own plots: (title, template, x, {file: [columns]}) or a file.
PLOTS: tuple[tuple[str, dict[str, list[str]]] | Path, ...] = (
    ("Robust and clean accuracy per epoch", {str(layout.TRAIN_CURVES): ["val_robust_acc", "val_clean_acc",
                                                                        "train_adv_acc"]}),
    ("Reference classifier accuracy per epoch", {str(layout.REFERENCE_CURVES): ["val_acc", "train_acc"]}),
    layout.GENERATE_GRID,
)


def stage(name: str) -> Stage:
    """The declaration of the stage called `name` (its DVC name)."""
    for declared in STAGES:
        if declared.name == name:
            return declared
    raise KeyError(f"no pipeline stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def for_module(module: str) -> Stage:
    """The declaration of the stage that `module` (a stage module's __name__) runs."""
    for declared in STAGES:
        if declared.module == module:
            return declared
    raise KeyError(f"{module} is not a declared stage module (dmat.pipeline.STAGES)")


def producer(path: Path) -> Stage | None:
    """The stage that writes `path` (relative to the project root, anywhere inside a written directory).
    Fixed paths win over a foreach stage's `${key}` patterns (metrics/evaluate_diffusion.json is not an
    entry of evaluate's metrics/evaluate_${key}.json)."""
    candidates = [path, *path.parents]
    for declared in sorted(STAGES, key=lambda s: s.foreach is not None):
        for written in declared.paths():
            if KEY not in str(written):
                if written in candidates:
                    return declared
            elif any(re.fullmatch(re.escape(str(written)).replace(re.escape(KEY), "[^/]+"), str(p))
                     for p in candidates):
                return declared
    return None


@dataclass(frozen=True)
class Command:
    """A `dmat` subcommand that runs a stage: the module and the help the CLI shows."""

    module: str
    help: str
    options: dict[str, dict] = field(default_factory=dict)


def commands() -> dict[str, Command]:
    """The stage subcommands of the CLI, from the declarations (help: summary -> what it writes)."""
    out = {}
    for declared in STAGES:
        written = ", ".join(str(p) for p in declared.paths() if p.parts[0] != "reports")
        options = {"--threat": {"metavar": "NAME", "help": "evaluate only this entry of evaluate.threats "
                                                          "(dvc.yaml runs one stage per entry); default: all"}} \
            if declared.foreach else {}
        out[declared.command] = Command(declared.module, f"{declared.summary} -> {written}", options)
    return out
