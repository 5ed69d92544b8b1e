#!/usr/bin/env bash
# Installs what the container tests need (podman, runc, catatonit for --init, debootstrap for the local base
# images) when they are missing: with apt as root on Debian, and otherwise fails saying what to install.
# podman-compose comes from requirements-dev.txt (Debian's 1.0.3 ignores profiles and leaves networks behind).
set -euo pipefail

PACKAGES=(podman runc catatonit debootstrap)
PROGRAMS=(podman runc /usr/libexec/podman/catatonit debootstrap)

missing() {
    local program
    for program in "${PROGRAMS[@]}"; do
        command -v "$program" >/dev/null || return 0
    done
    return 1
}

if ! missing; then
    echo "install-engine: $(podman --version) and runc, catatonit, debootstrap are installed"
    exit 0
fi
if [[ $(id -u) != 0 || ! -f /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
    echo "install-engine: the container tests need ${PACKAGES[*]}; install them (this script does so only as" \
        "root on Debian), or deselect the tests with: python -m pytest -m 'not containers'" >&2
    exit 1
fi
echo "install-engine: apt-get install ${PACKAGES[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
echo "install-engine: $(podman --version)"
