#!/usr/bin/env bash
# Installs, where missing, the tools the chart tests (tests/chart.rs) use, all from the
# registries this machine reaches, none of them a cluster:
#
#   .services/chart-venv     Python: helm-python-sdk (Helm's Go SDK as a library: lint,
#                            render, schema validation, no helm binary), kubernetes-validate
#                            (the Kubernetes schemas), PyYAML
#   .services/chart-node     npm: @kubernetes-models/keda and /prometheus-operator (the CRD
#                            schemas of ScaledObject, TriggerAuthentication, ServiceMonitor,
#                            PrometheusRule)
#   promtool                 Debian's `prometheus` package (apt-get; needs root)
#
# Exits non-zero naming what could not be installed. FLYWHEEL_NO_INSTALL=1 only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.services/chart-venv"
NODE_DIR="$ROOT/.services/chart-node"
PY_PACKAGES=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3)
NPM_PACKAGES=(@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)
FAILED=()

say() { echo "chart tools: $*" >&2; }
may_install() { [ "${FLYWHEEL_NO_INSTALL:-0}" != 1 ]; }

# The Python packages (a marker names the pinned set, so a change reinstalls).
marker="$VENV/.installed-$(echo "${PY_PACKAGES[*]}" | sha256sum | cut -c1-12)"
if [ ! -f "$marker" ]; then
    if may_install && python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "${PY_PACKAGES[@]}"; then
        touch "$marker"
        say "installed ${PY_PACKAGES[*]} in $VENV"
    else
        FAILED+=("python packages (${PY_PACKAGES[*]})")
    fi
fi

# The CRD models.
marker="$NODE_DIR/.installed-$(echo "${NPM_PACKAGES[*]}" | sha256sum | cut -c1-12)"
if [ ! -f "$marker" ]; then
    if ! command -v npm >/dev/null && may_install && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q nodejs npm >/dev/null || true
    fi
    mkdir -p "$NODE_DIR"
    if may_install && command -v npm >/dev/null \
        && npm install --prefix "$NODE_DIR" --no-audit --no-fund --silent "${NPM_PACKAGES[@]}"; then
        touch "$marker"
        say "installed ${NPM_PACKAGES[*]} in $NODE_DIR"
    else
        FAILED+=("npm packages (${NPM_PACKAGES[*]}; needs node and npm)")
    fi
fi

# promtool.
if ! command -v promtool >/dev/null; then
    if may_install && [ "$(id -u)" = 0 ] \
        && { apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }; then
        say "installed promtool (Debian's prometheus package)"
    else
        FAILED+=("promtool (apt-get install prometheus, as root)")
    fi
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
    exit 1
fi
