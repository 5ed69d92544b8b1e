#!/usr/bin/env bash
# Installs what the MLflow UI browser tests drive (tests/e2e/test_mlflow_ui.py): Debian's chromium and its
# chromedriver, when they are missing. Selenium talks to them; nothing downloads a browser. As root on Debian with
# apt; elsewhere it fails saying what to install (under CI=true the browser tests fail rather than skip).
set -euo pipefail

PACKAGES=(chromium chromium-driver)

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "install-browser: $(chromium --version 2>/dev/null) and chromedriver are installed"
    exit 0
fi
if [[ $(id -u) != 0 || ! -f /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
    echo "install-browser: the MLflow UI tests need ${PACKAGES[*]} (chromium and chromedriver on PATH);" \
        "install them (this script does so only as root on Debian)" >&2
    exit 1
fi
echo "install-browser: apt-get install ${PACKAGES[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "install-browser: $(chromium --version 2>/dev/null)"
