"""`dmat pipeline render | check | show`: dvc.yaml and the README's stage table, rendered from `dmat.pipeline`.

`render` writes dvc.yaml (and the stage table between the README's `<!-- stages -->` markers) from the stage
declarations, adding each stage's code dependencies: every module of `src/dmat` that `dmat <command>`
imports (the CLI's and the stage module's static import closure, function-level imports included), so that
`dvc repro` reruns a stage whenever code it runs changes. `check` exits 1, naming the file, when the
committed files differ from the rendering; `show` prints the stage table. Run from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_STALE = 0, 1
README_BEGIN, README_END = "<!-- stages: rendered by `dmat pipeline render` -->", "<!-- /stages -->"
HEADER = """\
# DMAT pipeline: rendered from src/dmat/pipeline.py by `dmat pipeline render` -- edit the declarations there,
# not this file (a test holds the two equal). Each stage's cmd is its `dmat` subcommand; it reads params.yaml
# and writes exactly the outs listed here. deps list its inputs, then every module of src/dmat the command
# imports, so that a code change reruns it. The model stages (train_reference, train_diffusion, train) keep
# their resumable checkpoints outside these outs, in .dmat/work/<stage>, until they finish; no out is
# `persist`, so DVC's run cache restores any stage it has run before with the same params and inputs.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("render", help="write dvc.yaml and the README's stage table from the declarations")
    actions.add_parser("check", help="exit 1 when dvc.yaml or the README's stage table differ from the rendering")
    actions.add_parser("show", help="print the stage table (Markdown)")


def run(args: argparse.Namespace) -> int:
    root = Path.cwd()
    if args.action == "show":
        print(stage_table())
        return EXIT_OK
    rendered = {root / "dvc.yaml": render_dvc_yaml()}
    readme = root / "README.md"
    if readme.is_file():
        rendered[readme] = with_stage_table(readme.read_text(encoding="utf-8"))
    stale = [path for path, text in rendered.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.action == "check":
        for path in stale:
            print(f"dmat pipeline: {path.name} differs from the declarations in src/dmat/pipeline.py: run "
                  "`dmat pipeline render`", file=sys.stderr)
        return EXIT_STALE if stale else EXIT_OK
    from dmat.files import atomic_path

    for path in stale:
        with atomic_path(path) as tmp:
            tmp.write_text(rendered[path], encoding="utf-8")
        print(f"dmat pipeline: wrote {path.name}", file=sys.stderr)
    return EXIT_OK


def code_deps(module: str) -> list[str]:
    """The files of src/dmat that `dmat <command>` runs for a stage module, relative to the repository."""
    from dmat.tools.imports import SRC, closure, module_file

    return sorted(f"src/{module_file(m).relative_to(SRC).as_posix()}" for m in closure(module, "dmat.cli"))


def render_dvc_yaml() -> str:
    from dmat.pipeline import PLOTS, STAGES

    lines = [HEADER.rstrip("\n"), "stages:"]
    for index, declared in enumerate(STAGES):
        lines += ([""] if index else []) + _stage_lines(declared)
    lines += ["", "# What `dvc plots show` draws beside the stages' own plots.", "plots:"]
    for plot in PLOTS:
        if isinstance(plot, Path):
            lines.append(f"  - {plot}")
            continue
        title, files = plot
        lines += [f"  - {title}:", "      template: linear", "      x: epoch", "      y:"]
        lines += [f"        {file}: [{', '.join(columns)}]" for file, columns in files.items()]
    return "\n".join(lines) + "\n"


def _stage_lines(declared) -> list[str]:
    indent = "      " if declared.foreach else "    "
    head = [f"  {declared.name}:" + (f"  # {declared.why}" if declared.why else "")]
    if declared.foreach:
        head += [f"    foreach: ${{{declared.foreach}}}", "    do:"]
    body = [f"cmd: {declared.cmd}", "deps:"]
    body += [f"  - {read.path}" + (f"  # {read.why}" if read.why else "") for read in declared.reads]
    body += [f"  - {dep}" for dep in code_deps(declared.module)]
    body += ["params:", *(f"  - {key}" for key in declared.params)]
    for kind, title in (("out", "outs"), ("metric", "metrics"), ("plot", "plots")):
        written = [w for w in declared.writes if w.kind == kind]
        if written:
            body.append(f"{title}:")
            body += [line for w in written for line in _write_lines(w)]
    if declared.always_changed:
        body.append("always_changed: true")
    return head + [indent + line for line in body]


def _write_lines(written) -> list[str]:
    options = ([] if written.cache else ["cache: false"]) + [f"{k}: {v}" for k, v in written.plot]
    comment = f"  # {written.why}" if written.why else ""
    if not options:
        return [f"  - {written.path}{comment}"]
    return [f"  - {written.path}:{comment}", *(f"      {option}" for option in options)]


def stage_table() -> str:
    """The README's table: stage, command, what it reads, what it writes."""
    from dmat.pipeline import STAGES

    rows = ["| stage | command | reads | writes |", "|---|---|---|---|"]
    for declared in STAGES:
        name = f"`{declared.name}@<threat>`" if declared.foreach else f"`{declared.name}`"
        reads = ", ".join(f"`{r.path}`" for r in declared.reads) or "—"
        writes = ", ".join(f"`{w.path}`" for w in declared.writes)
        rows.append(f"| {name} | `{declared.cmd.replace(' --threat ${key}', ' --threat <threat>')}` | {reads} | "
                    f"{writes.replace('${key}', '<threat>')} |")
    return "\n".join(rows)


def with_stage_table(readme: str) -> str:
    """The README with the rendered table between its markers (unchanged when it has no markers)."""
    if README_BEGIN not in readme or README_END not in readme:
        return readme
    before, rest = readme.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    return f"{before}{README_BEGIN}\n{stage_table()}\n{README_END}{after}"
