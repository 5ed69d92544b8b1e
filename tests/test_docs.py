"""The repository is self-contained: every document, experiment, profile or benchmark the code and the docs cite
exists in it, and nothing cites the team's notes outside it."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

# documents (docs/*.md, README.md, ...) and the experiments, profiles and benchmarks people are sent to
CITED = re.compile(r"(?<![\w/.])((?:[\w\-]+/)*(?:docs/[\w\-/]+|[A-Z][A-Z_]+)\.md|"
                   r"(?:benchmarks|experiments|profiles)/[\w\-./]+\.(?:py|yaml))")
SOURCES = [*REPO_ROOT.glob("src/**/*.py"), *REPO_ROOT.glob("docs/**/*.md"), *REPO_ROOT.glob("benchmarks/**/*.py"),
           REPO_ROOT / "README.md", REPO_ROOT / "benchmarks/README.md"]


def test_every_cited_file_exists() -> None:
    missing = sorted({f"{path.relative_to(REPO_ROOT)} cites {cited}" for path in SOURCES
                      for cited in CITED.findall(path.read_text(encoding="utf-8"))
                      if not (REPO_ROOT / cited).exists() and not (path.parent / cited).exists()})
    assert not missing, "\n".join(missing)


def test_nothing_cites_the_team_notes_outside_the_repository() -> None:
    outside = sorted(str(path.relative_to(REPO_ROOT)) for path in [*SOURCES, *REPO_ROOT.glob("tests/**/*.py")]
                     if path.name != "test_docs.py" and "DESIGN.md" in path.read_text(encoding="utf-8"))
    assert not outside, f"cite docs/ instead of the team's DESIGN.md: {outside}"
