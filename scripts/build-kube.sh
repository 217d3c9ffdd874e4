#!/usr/bin/env bash
# Builds the test cluster's upstream programs from their Go modules (kube/controlplane/go.mod pins
# Kubernetes and agent-sandbox) into .cache/kube/bin, and copies agent-sandbox's CRDs into
# .cache/kube/crds. Go's build cache makes a rebuild with nothing changed take seconds; the
# binaries are only relinked when the module or this script changed (stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/kube
mkdir -p "$out/bin" "$out/crds"
command -v go >/dev/null 2>&1 || { echo "build-kube: Go is required (see README: Development)" >&2; exit 1; }
stamp=$(cat kube/controlplane/go.mod kube/controlplane/go.sum kube/controlplane/*.go "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ] && [ -x "$out/bin/controlplane" ] && [ -x "$out/bin/agent-sandbox-controller" ]; then
  exit 0
fi
cd kube/controlplane
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
major=${k8s#v}; minor=${major#*.}; major=${major%%.*}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
start=$SECONDS
echo "build-kube: building Kubernetes $k8s (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl) and agent-sandbox $(go list -m -f '{{.Version}}' sigs.k8s.io/agent-sandbox)"
go build -trimpath -ldflags "$ldflags" -o "../../$out/bin/controlplane" .
go build -trimpath -ldflags "-s -w" -o "../../$out/bin/agent-sandbox-controller" sigs.k8s.io/agent-sandbox/cmd/agent-sandbox-controller
cp "$(go list -m -f '{{.Dir}}' sigs.k8s.io/agent-sandbox)"/k8s/crds/*.yaml "../../$out/crds/"
chmod u+w "../../$out/crds/"*.yaml
cd ../..
echo "$stamp" > "$out/stamp"
echo "build-kube: done in $((SECONDS - start)) s"
