"""The static import graph of the `dmat` package: which module imports which, function-level imports included.

`dmat pipeline render` lists each stage's import closure as its code dependencies in dvc.yaml (so a code
change reruns the stage); the architecture tests check the layering with it (no stage imports another).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]  # the directory that holds the `dmat` package (src/ in the repository)


def module_file(module: str) -> Path | None:
    """src/dmat/a/b.py or src/dmat/a/b/__init__.py for `dmat.a.b`; None when neither exists."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def all_modules() -> list[str]:
    return sorted(".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for path in (SRC / "dmat").rglob("*.py"))


@cache
def imports_of(module: str) -> frozenset[str]:
    """The dmat modules `module` imports (at any depth of its code), and the third-party top-level names."""
    path = module_file(module)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            # `from dmat.x import y` imports the module dmat.x.y when there is one
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return frozenset(name if name.startswith("dmat") else name.split(".")[0] for name in found if name) - {module}


def dmat_imports(module: str) -> set[str]:
    """The dmat modules that exist among `module`'s imports, with the packages that importing them runs."""
    names = set()
    for name in imports_of(module):
        if name.startswith("dmat"):
            parts = name.split(".")
            names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return {name for name in names if module_file(name)}


def third_party_imports(module: str) -> set[str]:
    return {name for name in imports_of(module) if not name.startswith("dmat")}


def closure(*roots: str) -> set[str]:
    """Every dmat module that importing `roots` can run (static imports, transitively)."""
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(dmat_imports(module) - seen)
    return seen
