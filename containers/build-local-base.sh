#!/usr/bin/env bash
# Local stand-ins for the registry images that DMAT's Dockerfile and docker-compose.yml start from, for machines
# that reach the Debian and Python package indexes but no container registry:
#
#   localhost/dmat-base-debian:bookworm       debootstrap --variant=minbase, with this host's extra CA certificates
#   localhost/dmat-base-python:3.11-bookworm  Debian's Python 3.11 in a venv: stands in for python:3.11-slim-bookworm
#   localhost/dmat-base-postgres:15-bookworm  Debian's PostgreSQL 15, configured like the official postgres image
#
# and, on request only (target debian-python), a base to prove the Dockerfile builds on a site's own image:
#
#   localhost/dmat-base-debian-python:bookworm  Debian's python3 and python3-venv, nothing more: externally managed
#                                               (PEP 668), no venv, no pip on PATH
#
# Usage (root: debootstrap needs it):   containers/build-local-base.sh [python] [postgres] [debian-python]
#                                       (default: python and postgres)
# then build and run with them:
#   podman build --format docker --build-arg PYTHON_IMAGE=localhost/dmat-base-python:3.11-bookworm --target serve ...
#   PYTHON_IMAGE=... POSTGRES_IMAGE=... podman-compose up -d mlflow      (or put both in .env)
#
# Environment: CONTAINER_ENGINE (podman, the default, or docker); DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR (default:
# the mirrors this host's apt uses, else deb.debian.org); REBUILD=1 bootstraps the Debian image again even if it exists.
# The Debian image is bootstrapped once; the other two are ordinary builds, cached by the engine.
set -euo pipefail

SUITE=bookworm
DEBIAN_IMAGE=localhost/dmat-base-debian:${SUITE}
PYTHON_IMAGE=localhost/dmat-base-python:3.11-${SUITE}
POSTGRES_IMAGE=localhost/dmat-base-postgres:15-${SUITE}
DEBIAN_PYTHON_IMAGE=localhost/dmat-base-debian-python:${SUITE}
# Debian's own directory for extra CA certificates (the input of update-ca-certificates). Where TLS to the package
# index passes through a proxy with its own CA, pip inside a build needs that CA: the base image carries it, so the
# Dockerfile stays free of anything host-specific.
LOCAL_CA_DIR=/usr/local/share/ca-certificates

here=$(cd "$(dirname "$0")" && pwd)
engine=${CONTAINER_ENGINE:-podman}

die() { echo "build-local-base: $*" >&2; exit 1; }

# The first http(s) URI in this host's apt sources whose path ends in /$1 (debian or debian-security), if any.
host_mirror() {
    grep -hsE '^[[:space:]]*(deb|URIs:)[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources | grep -oE 'https?://[^[:space:]]+' | sed 's:/*$::' | grep -E "/$1\$" \
        | head -n 1 || true
}

build_debian() {
    if [[ ${REBUILD:-0} != 1 ]] && "$engine" image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        echo "build-local-base: $DEBIAN_IMAGE exists (REBUILD=1 to bootstrap it again)"
        return
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root: run this script as root (sudo)"
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
    local mirror security rootfs
    mirror=${DEBIAN_MIRROR:-$(host_mirror debian)}
    mirror=${mirror:-http://deb.debian.org/debian}
    security=${DEBIAN_SECURITY_MIRROR:-$(host_mirror debian-security)}
    security=${security:-http://deb.debian.org/debian-security}
    rootfs=$(mktemp -d /var/tmp/dmat-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-local-base: debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security $SUITE-security main
EOF
    # ca-certificates is not installed yet: the images that install it pick these up (update-ca-certificates).
    if [[ -d $LOCAL_CA_DIR ]]; then
        mkdir -p "$rootfs$LOCAL_CA_DIR"
        cp -a "$LOCAL_CA_DIR/." "$rootfs$LOCAL_CA_DIR/"
    fi
    # What the official slim images leave out as well: downloaded packages and package lists.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "build-local-base: built $DEBIAN_IMAGE"
}

build_from_debian() {  # $1: Containerfile under containers/, $2: image name
    "$engine" build --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" -f "$here/$1" -t "$2" "$here"
    echo "build-local-base: built $2"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(python postgres)
for target in "${targets[@]}"; do
    [[ $target == python || $target == postgres || $target == debian-python ]] \
        || die "unknown image '$target' (choose from python, postgres, debian-python)"
done
command -v "$engine" >/dev/null || die "$engine not found (CONTAINER_ENGINE=podman or docker)"
build_debian
for target in "${targets[@]}"; do
    case $target in
        python) build_from_debian python.Containerfile "$PYTHON_IMAGE" ;;
        postgres) build_from_debian postgres.Containerfile "$POSTGRES_IMAGE" ;;
        debian-python) build_from_debian debian-python.Containerfile "$DEBIAN_PYTHON_IMAGE" ;;
    esac
done
echo "build-local-base: use them with PYTHON_IMAGE=$PYTHON_IMAGE POSTGRES_IMAGE=$POSTGRES_IMAGE"
