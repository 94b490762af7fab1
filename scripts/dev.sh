#!/usr/bin/env bash
# sluicegate developer entry point (see README).
#
#   scripts/dev.sh run [--port PORT] [--config FILE] [--no-install]
#                          set up, then run the gateway on the embedded default (127.0.0.1:8080),
#                          with the demo upstream (`python -m sluicegate demo`) on 127.0.0.1:8791
#   scripts/dev.sh test    set up a test environment (and the MCP SDK's, $VENV-mcp): ruff, mypy,
#                          the whole test suite, then scripts/adversarial_smoke.py
#   scripts/dev.sh setup   only set up: virtualenv, install, local dev CA / signing key under certs/
#
# run options: --port (default 8080, or SLUICEGATE_PORT), --config (default config/dev.yaml, or
# SLUICEGATE_CONFIG; relative to the checkout), --no-install (use VENV as it is, e.g. another
# checkout's: this checkout's package is used through PYTHONPATH).
# Environment: PYTHON (default python3; 3.11 gets mitmproxy 11.0.2, 3.12+ gets mitmproxy 12),
# VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PORT=${SLUICEGATE_PORT:-8080}
CONFIG=${SLUICEGATE_CONFIG:-config/dev.yaml}
INSTALL=1
# This checkout's package first, whichever venv runs it.
export PYTHONPATH="$REPO/addons${PYTHONPATH:+:$PYTHONPATH}"

venv() {
    local extras=$1
    if [ "$INSTALL" = 0 ]; then
        [ -x "$VENV/bin/mitmdump" ] || { echo "error: --no-install: no mitmdump in $VENV" >&2; exit 2; }
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml changed since the last install into this venv.
    local stamp="$VENV/.sluicegate-install-$extras"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing sluicegate${extras:+[$extras]} into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
        echo "$want" > "$stamp"
    fi
}

setup() {
    venv "${1:-}"
    "$VENV/bin/python" scripts/dev_setup.py
}

run() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --port) PORT=${2:?--port needs a value}; shift 2 ;;
            --port=*) PORT=${1#--port=}; shift ;;
            --config) CONFIG=${2:?--config needs a value}; shift 2 ;;
            --config=*) CONFIG=${1#--config=}; shift ;;
            --no-install) INSTALL=0; shift ;;
            *) echo "usage: scripts/dev.sh run [--port PORT] [--config FILE] [--no-install]" >&2; exit 2 ;;
        esac
    done
    case "$PORT" in ''|*[!0-9]*) echo "error: --port must be a number" >&2; exit 2 ;; esac
    case "$CONFIG" in /*) ;; *) CONFIG="$REPO/$CONFIG" ;; esac
    [ -f "$CONFIG" ] || { echo "error: no config file $CONFIG" >&2; exit 2; }
    setup ""
    local py="$VENV/bin/python" agent="$REPO/certs/agent"
    # The agent side of README "Onboarding an agent host", for this machine: a dev token, the CA
    # export and the environment, under certs/agent/ (the token file and agent.env are 0600).
    mkdir -p -m 700 "$agent"
    (umask 077 && "$py" -m sluicegate mint-token --config "$CONFIG" --sub "${USER:-dev}-dev" \
        --groups agents --ttl 43200 > "$agent/token")
    "$py" -m sluicegate ca export --confdir "$REPO/certs/mitmproxy" --out "$agent/gateway-ca.pem"
    "$py" -m sluicegate agent-env --proxy "127.0.0.1:$PORT" --token-file "$agent/token" \
        --ca "$agent/gateway-ca.pem" --out "$agent/agent.env"
    local demo_config=""
    [ "$CONFIG" = "$REPO/config/dev.yaml" ] || demo_config=" --config $CONFIG"
    cat <<MSG

sluicegate is starting on 127.0.0.1:$PORT with $CONFIG.
On an agent host (here), in the agent's shell:

  . $agent/agent.env
  $py -m sluicegate demo$demo_config      # a round trip through the gateway, with fake secrets
  $py -m sluicegate doctor

agent.env holds a 12-hour dev token for group 'agents' (certs/agent/token). Mint another:
  $py -m sluicegate mint-token --config $CONFIG --sub NAME --groups agents
Upstream keys the gateway injects live in certs/secrets/ (never give them to the agent).

MSG
    # demo.py (the demo upstream, dev only) loads first: its option must exist when the chain
    # checks that every sluicegate_* option is known.
    exec "$VENV/bin/mitmdump" \
        --listen-host 127.0.0.1 --listen-port "$PORT" \
        --set confdir="$REPO/certs/mitmproxy" \
        -s "$REPO/addons/demo.py" \
        --set sluicegate_demo="$REPO/certs/demo" \
        -s "$REPO/addons/gateway.py" \
        --set sluicegate_config="$CONFIG" \
        --set ssl_verify_upstream_trusted_ca="$REPO/certs/demo/upstream-trust.pem"
}

# Tests run real redis-server processes (shared state of several replicas): install it when
# missing (as root, from the distribution's packages); never skip the tests that need it.
ensure_redis() {
    command -v redis-server >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        # The package may start a system instance; the tests start their own.
        (service redis-server stop || true) >/dev/null 2>&1
    fi
    command -v redis-server >/dev/null 2>&1 || {
        echo "error: redis-server is required by the tests (apt-get install redis-server)" >&2
        exit 1
    }
}

# The console's browser tests drive Debian's Chromium (never a browser Playwright downloads):
# install it when missing, like redis-server.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing chromium"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    command -v chromium >/dev/null 2>&1 || {
        echo "error: chromium is required by the console's browser tests (apt-get install chromium)" >&2
        exit 1
    }
}

# The MCP e2e tests run the official MCP SDK's server and client, which need newer HTTP libraries
# than mitmproxy 11 allows: they get their own virtualenv ($VENV-mcp), set up here.
ensure_mcp_venv() {
    export SLUICEGATE_MCP_VENV="${SLUICEGATE_MCP_VENV:-$REPO/$VENV-mcp}"
    echo "==> MCP SDK virtualenv ($SLUICEGATE_MCP_VENV)"
    "$VENV/bin/python" -m tests.support.mcp_env >/dev/null
}

test_suite() {
    ensure_redis
    ensure_chromium
    venv test
    ensure_mcp_venv
    echo "==> ruff"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # Types: the whole package, strict on the engines ([tool.mypy] in pyproject.toml).
    echo "==> mypy"
    "$VENV/bin/mypy"
    echo "==> pytest ($("$VENV/bin/python" -c 'import mitmproxy.version as v, sys; print(f"mitmproxy {v.VERSION}, Python {sys.version.split()[0]}")'))"
    "$VENV/bin/python" -m pytest -q "$@"
    echo "==> adversarial smoke run (a real gateway, known attack classes; fails on any leak)"
    "$VENV/bin/python" scripts/adversarial_smoke.py
}

case "${1:-run}" in
    run) shift || true; run "$@" ;;
    test) shift; test_suite "$@" ;;
    setup) setup "" ;;
    *) echo "usage: scripts/dev.sh [run|test|setup]" >&2; exit 2 ;;
esac
