"""The layering of docs/ARCHITECTURE.md, checked on the code: no stage imports another stage, serving imports
neither torch nor training code, dvc.yaml is the rendering of the stage declarations (src/dmat/pipeline.py),
whose code deps cover every module each stage runs (otherwise `dvc repro` silently reuses outputs built by older
code), and the audit of what stages open names undeclared reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmat.audit import undeclared, unstaged
from dmat.cli import STAGES
from dmat.config import read_yaml
from dmat.pipeline import stage
from dmat.tools.imports import SRC, all_modules, closure, dmat_imports, module_file, third_party_imports
from dmat.tools.pipeline import render_dvc_yaml, stage_table
from tests.conftest import REPO_ROOT

# Layers from the ground up: a module may import its own layer and the layers below it.
LAYERS = [
    ("foundation", ("dmat", "dmat.errors", "dmat.files", "dmat.config", "dmat.onnx_contract",
                    "dmat.known_distribution_config")),
    ("core", ("dmat.core",)),
    ("data", ("dmat.data",)),
    ("artifacts and tracking", ("dmat.artifacts", "dmat.tracking", "dmat.execution", "dmat.checkpoint",
                                "dmat.distributed", "dmat.stage_setup", "dmat.training", "dmat.plots", "dmat.pipeline",
                                "dmat.audit", "dmat.precision_decisions")),
    ("stages", ("dmat.stages",)),
    ("tools and serving", ("dmat.tools", "dmat.deploy")),
    ("cli", ("dmat.cli",)),
]
TORCH_LIBRARIES = {"torch", "torchvision", "pyautoattack", "onnxscript"}


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS (and docs/ARCHITECTURE.md)"
    return max(matches)[1]


def test_every_module_imports_only_its_layer_and_below() -> None:
    wrong = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
             for module in all_modules() for name in dmat_imports(module) if layer_of(name) > layer_of(module)]
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage() -> None:
    stages = {m for m in all_modules() if m.startswith("dmat.stages.")}
    wrong = [f"{module} imports {name}" for module in all_modules() for name in dmat_imports(module) & stages
             if name != module]
    assert not wrong, "stages talk through files (dmat.artifacts), never by importing each other:\n" + "\n".join(wrong)


def test_serving_imports_neither_torch_nor_training_code() -> None:
    serving = {m for m in all_modules() if m.startswith("dmat.deploy")}
    reached = closure(*serving)
    training = {m for m in reached if m.startswith(("dmat.stages", "dmat.core", "dmat.artifacts.loaders"))}
    assert not training, f"the serving image has no training code, yet dmat.deploy reaches {sorted(training)}"
    heavy = {f"{m} imports {lib}" for m in reached for lib in third_party_imports(m) & TORCH_LIBRARIES}
    assert not heavy, sorted(heavy)


def test_parsing_arguments_and_loading_the_server_import_no_torch() -> None:
    code = ("import sys; import dmat.cli, dmat.deploy.serve; dmat.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, with foreach stages reduced to their `do` template."""
    stages = read_yaml((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def test_dvc_yaml_is_the_rendering_of_the_stage_declarations() -> None:
    assert (REPO_ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), (
        "dvc.yaml differs from src/dmat/pipeline.py's declarations: run `dmat pipeline render` (edit the "
        "declarations, not dvc.yaml)")
    readme = (REPO_ROOT / "README.md").read_text()
    assert stage_table() in readme, "the README's stage table is stale: run `dmat pipeline render`"


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(SRC.parent)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_yaml_code_deps_cover_the_stage_import_closure(name: str) -> None:
    dvc_stage = dvc_stages()[name]
    deps = [dep for dep in dvc_stage.get("deps", []) if isinstance(dep, str)]
    modules = closure(stage(name).module, "dmat.cli")  # `dmat <stage>` runs the CLI, then the stage module
    missing = sorted(str(module_file(m).relative_to(SRC.parent)) for m in modules if not covered(module_file(m), deps))
    assert not missing, f"dvc.yaml stage {name!r} lacks code deps {missing}: run `dmat pipeline render`"


def test_every_stage_command_has_a_dvc_stage() -> None:
    commands = {dvc_stage["cmd"].split()[1] for dvc_stage in dvc_stages().values()}
    assert commands == set(STAGES)


def test_the_audit_names_an_undeclared_read_and_write() -> None:
    records = [
        {"stage": "train-reference", "path": "data/real/train/images.npy", "write": False},  # declared
        {"stage": "train-reference", "path": "models/reference/best.pt", "write": True},  # its own output
        {"stage": "train-reference", "path": ".dmat/work/train_reference/last.pt", "write": True},  # checkpoints
        {"stage": "evaluate", "path": "metrics/evaluate_linf.json", "write": True},  # a foreach entry's output
        {"stage": "verify", "path": "tests/e2e/.gitignore", "write": False},  # DVC's own reads: what is current
        {"stage": "verify", "path": "dvc.lock", "write": False},
        # what a stage must declare: the held-out store is not train_reference's input, plots/ not its output
        {"stage": "train-reference", "path": "data/real/heldout/images.npy", "write": False},
        {"stage": "train-reference", "path": "plots/other.csv", "write": True},
        {"stage": "mix", "path": "models/reference/best.pt", "write": False},
    ]
    assert undeclared(records) == ["mix reads models/reference/best.pt",
                                   "train_reference reads data/real/heldout/images.npy",
                                   "train_reference writes plots/other.csv"]
    assert unstaged("data/.real.tmp-abc123/train/images.npy") == "data/real/train/images.npy"
