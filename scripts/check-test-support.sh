#!/usr/bin/env bash
# The test cluster (real control plane + process kubelet) is test support: no shipped binary may
# depend on it, and no image recipe may build it.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for p in agentcube-workload-manager agentcube-router agentcube agentcube-picod; do
  if cargo tree -q -p "$p" -e normal,build | grep -q agentcube-test-cluster; then
    echo "check-test-support: $p depends on agentcube-test-cluster (test support only)" >&2
    status=1
  fi
done
if grep -l "test-cluster\|process-kubelet" deploy/docker/* >/dev/null 2>&1; then
  echo "check-test-support: an image recipe builds the test cluster" >&2
  status=1
fi
exit $status
