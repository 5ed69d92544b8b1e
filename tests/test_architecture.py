"""The layering of docs/ARCHITECTURE.md, checked on the code: no stage imports another stage, serving imports
neither torch nor training code, and every stage's code deps in dvc.yaml cover every module the stage runs
(otherwise `dvc repro` silently reuses outputs built by older code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmat.cli import STAGES
from dmat.config import read_yaml
from tests.conftest import REPO_ROOT
from tests.import_graph import SRC, all_modules, closure, dmat_imports, module_file, third_party_imports

# Layers from the ground up: a module may import its own layer and the layers below it.
LAYERS = [
    ("foundation", ("dmat", "dmat.errors", "dmat.files", "dmat.config", "dmat.onnx_contract",
                    "dmat.known_distribution_config")),
    ("core", ("dmat.core",)),
    ("data", ("dmat.data",)),
    ("artifacts and tracking", ("dmat.artifacts", "dmat.tracking", "dmat.execution", "dmat.checkpoint",
                                "dmat.distributed", "dmat.stage_setup", "dmat.plots")),
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


def stage_module(stage: dict) -> str:
    command = stage["cmd"].split()
    assert command[0] == "dmat" and command[1] in STAGES, stage["cmd"]
    return STAGES[command[1]][0]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(SRC.parent)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_yaml_code_deps_cover_the_stage_import_closure(name: str) -> None:
    stage = dvc_stages()[name]
    deps = [dep for dep in stage.get("deps", []) if isinstance(dep, str)]
    modules = closure(stage_module(stage), "dmat.cli")  # `dmat <stage>` runs the CLI, then the stage module
    missing = sorted(str(module_file(m).relative_to(SRC.parent)) for m in modules if not covered(module_file(m), deps))
    lines = "\n".join(f"  - {m}" for m in missing)
    assert not missing, (f"dvc.yaml stage {name!r} runs modules its deps do not list, so `dvc repro` would reuse "
                         f"stale outputs after they change; add to its deps:\n{lines}")


def test_every_stage_command_has_a_dvc_stage() -> None:
    commands = {stage["cmd"].split()[1] for stage in dvc_stages().values()}
    assert commands == set(STAGES)
