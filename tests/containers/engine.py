"""Podman for the container tests: the project's containers.conf, the base images, builds, running containers.

Every command runs with containers/containers.conf selected (runc, cgroupfs, ulimits within the host's hard
limits) and builds in Docker's image format, which keeps HEALTHCHECK (the OCI format drops it). Without podman
the tests skip with the reason, except under CI=true, where they fail: CI must run them (.ci/run installs podman).
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest
import yaml

from tests.conftest import BIN_DIR, REPO_ROOT

CONTAINERS_DIR = REPO_ROOT / "containers"
CONTAINERS_CONF = CONTAINERS_DIR / "containers.conf"
BUILD_LOCAL_BASE = CONTAINERS_DIR / "build-local-base.sh"
# The stand-ins build-local-base.sh makes for python:3.11-slim-bookworm and the postgres image.
LOCAL_BASE_IMAGES = {"PYTHON_IMAGE": ("python", "localhost/dmat-base-python:3.11-bookworm"),
                     "POSTGRES_IMAGE": ("postgres", "localhost/dmat-base-postgres:15-bookworm")}
# A site's own Debian Python base (python3 and python3-venv, externally managed, no pip): the serve image must build on
# it too. build-local-base.sh makes it only when asked (target debian-python), under a name of its own: the stand-ins
# above keep the names and contents main's recipe gives them.
PLAIN_DEBIAN_PYTHON = ("debian-python", "localhost/dmat-base-debian-python:bookworm")
COMMAND_TIMEOUT_S = 180
BUILD_TIMEOUT_S = 1800
RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, where a skipped container test would pass unseen."""
    if in_ci():
        pytest.fail(f"{reason}. CI must run the container tests: .ci/run installs podman when it runs as root on "
                    "Debian (containers/install-engine.sh)", pytrace=False)
    pytest.skip(reason)


def engine_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "BUILDAH_FORMAT": "docker",
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run(command: list[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env or engine_env(), capture_output=True, text=True, timeout=timeout,
                            cwd=REPO_ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def podman(*args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run(["podman", *args], check=check, timeout=timeout)


def check_engine() -> None:
    """podman is installed and works with the project's containers.conf on this host."""
    if shutil.which("podman") is None:
        unavailable("podman not found (Debian: apt-get install podman runc catatonit debootstrap)")
    defaults = tomllib.loads(CONTAINERS_CONF.read_text())["containers"]["default_ulimits"]
    for entry in defaults:
        name, _, limits = entry.partition("=")
        hard = int(limits.split(":")[-1])
        host_hard = resource.getrlimit(RLIMITS[name])[1]
        assert host_hard == resource.RLIM_INFINITY or hard <= host_hard, (
            f"{CONTAINERS_CONF.name} sets {entry}, above this host's hard limit {host_hard}: containers could not "
            "start; lower it there")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    if info.returncode != 0:
        unavailable(f"`podman info` fails here: {info.stderr.strip()[-500:]}")


def base_images() -> dict[str, str]:
    """PYTHON_IMAGE and POSTGRES_IMAGE: from the environment (the official images, where a registry is reachable),
    else the local stand-ins. As root these are always built by containers/build-local-base.sh (engine-cached, so
    seconds when nothing changed): an image someone else tagged with the same name is never taken on trust."""
    images, local, missing = {}, [], []
    for variable, (target, name) in LOCAL_BASE_IMAGES.items():
        images[variable] = os.environ.get(variable) or name
        if images[variable] == name:
            local.append(target)
            if podman("image", "exists", name, check=False).returncode != 0:
                missing.append(target)
    if local and os.geteuid() == 0:
        run([str(BUILD_LOCAL_BASE), *local], timeout=BUILD_TIMEOUT_S)
    elif missing:
        unavailable(f"local base images {missing} missing, and building them needs root: run "
                    f"{BUILD_LOCAL_BASE.relative_to(REPO_ROOT)} as root, or set PYTHON_IMAGE/POSTGRES_IMAGE")
    return images


def plain_debian_python() -> str:
    """The plain Debian Python base, built through containers/build-local-base.sh as root (engine-cached: seconds when
    nothing changed), so that an image someone else tagged with its name is never taken on trust."""
    target, name = PLAIN_DEBIAN_PYTHON
    if os.geteuid() == 0:
        run([str(BUILD_LOCAL_BASE), target], timeout=BUILD_TIMEOUT_S)
    elif podman("image", "exists", name, check=False).returncode != 0:
        unavailable(f"{name} missing, and building it needs root: run {BUILD_LOCAL_BASE.relative_to(REPO_ROOT)} "
                    f"{target} as root")
    return name


def compose_image(service: str) -> str:
    """The image name docker-compose.yml gives a service: what the tests build and run."""
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][service]["image"]


def build(target: str, tag: str, python_image: str, *build_args: str) -> str:
    podman("build", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={python_image}",
           *[arg for value in build_args for arg in ("--build-arg", value)], "--target", target, "-t", tag,
           str(REPO_ROOT), timeout=BUILD_TIMEOUT_S)
    return tag


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def container(image: str, *run_args: str, name: str | None = None) -> Iterator[str]:
    """`podman run -d` the image; the container is removed when the block ends, whatever happened."""
    name = name or unique_name("dmat-test")
    podman("run", "-d", "--name", name, *run_args, image)
    try:
        yield name
    finally:
        podman("rm", "--force", name, check=False)


def wait_for_http(url: str, timeout: float, describe: Callable[[], str]) -> None:
    """Until `url` answers 200; on timeout fail with `describe()` (say, the container's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {timeout:.0f} s:\n{describe()}")


def healthcheck(name: str, attempts: int = 3) -> subprocess.CompletedProcess:
    """`podman healthcheck run NAME` until it passes, at most `attempts` times: like Docker, which calls a container
    unhealthy only after several failures in a row (a loaded CI machine can make one check overrun its timeout)."""
    for _ in range(attempts):
        result = podman("healthcheck", "run", name, check=False)
        if result.returncode == 0:
            break
    return result


def logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return (result.stdout + result.stderr)[-4000:]
