#!/usr/bin/env bash
# Builds Ory Hydra (a real OpenID Connect provider, pinned in kube/oidc/go.mod) into
# .cache/oidc/bin/hydra for the authentication tests: discovery, JWKS with key rotation, OAuth2
# client credentials with JWT access tokens, in-memory storage (SQLite, hence the build tags).
# Go's build cache makes a rebuild take seconds; the binary is relinked only when the module or
# this script changed (stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/oidc
mkdir -p "$out/bin"
command -v go >/dev/null 2>&1 || { echo "build-oidc: Go is required (see README: Development)" >&2; exit 1; }
stamp=$(cat kube/oidc/go.mod kube/oidc/go.sum "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ] && [ -x "$out/bin/hydra" ]; then
  exit 0
fi
cd kube/oidc
start=$SECONDS
echo "build-oidc: building Ory Hydra $(go list -m -f '{{.Version}}' github.com/ory/hydra/v2)"
go build -trimpath -tags sqlite,sqlite_omit_load_extension -ldflags "-s -w" -o "../../$out/bin/hydra" github.com/ory/hydra/v2
cd ../..
echo "$stamp" > "$out/stamp"
echo "build-oidc: done in $((SECONDS - start)) s"
