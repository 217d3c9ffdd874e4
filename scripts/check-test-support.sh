#!/usr/bin/env bash
# The test cluster (real control plane + process kubelet) and the fake Kubernetes API server are
# test support: no shipped binary may depend on them, and no image recipe may build them.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for p in agentcube-workload-manager agentcube-router agentcube agentcube-picod; do
  for support in agentcube-fake-kube agentcube-test-cluster; do
    if cargo tree -q -p "$p" -e normal,build | grep -q "$support"; then
      echo "check-test-support: $p depends on $support (test support only)" >&2
      status=1
    fi
  done
done
if grep -l "fake-kube\|fake-cluster\|test-cluster" deploy/docker/* >/dev/null 2>&1; then
  echo "check-test-support: an image recipe builds the fake cluster" >&2
  status=1
fi
exit $status
