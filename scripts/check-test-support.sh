#!/usr/bin/env bash
# The fake Kubernetes API server is test support: no shipped binary may depend on it, and no image
# recipe may build it.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for p in agentcube-workload-manager agentcube-router agentcube agentcube-picod; do
  if cargo tree -q -p "$p" -e normal,build | grep -q agentcube-fake-kube; then
    echo "check-test-support: $p depends on agentcube-fake-kube (test support only)" >&2
    status=1
  fi
done
if grep -l "fake-kube\|fake-cluster" deploy/docker/* >/dev/null 2>&1; then
  echo "check-test-support: an image recipe builds the fake cluster" >&2
  status=1
fi
exit $status
