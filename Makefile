# agentcube (Rust). `make run` starts the system, `make test` installs what it needs and runs every test.
SHELL := /bin/bash
CARGO ?= cargo
STATE_DIR ?= $(if $(filter 0,$(shell id -u)),/var/lib/agentcube,$(CURDIR)/.cache/state)

.PHONY: run test cgroup-v2 e2e e2e-run deps deps-run build fmt lint crds check-crds bench bench-build bench-picod bench-http bench-sdk bench-wm bench-kube bench-soak bench-instructions bench-critical-path kube kube-up cluster clean

## run: build and start the embedded default (Router :8081, Workload Manager :8080, loopback)
run: deps-run
	$(CARGO) build --release -p agentcube
	CARGO=$(CARGO) scripts/build-picod.sh
	"$${CARGO_TARGET_DIR:-target}/release/agentcube" up --manifests examples --state-dir $(STATE_DIR)

## test: install dependencies, check formatting and lints, build, run every test
STEP = @scripts/step.sh
test:
	$(STEP) deps $(MAKE) --no-print-directory deps
	$(STEP) lint $(MAKE) --no-print-directory lint
	$(STEP) build $(CARGO) build --workspace --bins
	$(STEP) cargo-test $(CARGO) test --workspace --all-targets
	$(STEP) doc-test $(CARGO) test --workspace --doc
	$(STEP) cgroup-v2 $(MAKE) --no-print-directory cgroup-v2
	$(STEP) python-test sh -c '.venv/bin/python -m mypy --strict sdk-python/agentcube bench scripts && .venv/bin/python -m mypy tests sdk-python/tests && .venv/bin/python -m pytest -q sdk-python/tests tests/helm tests/docs'
	$(STEP) chart-install-e2e .venv/bin/python scripts/cluster.py --e2e --bin-dir target/debug
	$(STEP) e2e $(MAKE) --no-print-directory e2e-run

## e2e: the end-to-end suite on both backends: `agentcube up` (bubblewrap sandboxes), then the
## router + workload-manager binaries on the Kubernetes backend against the test cluster (real
## control plane + agent-sandbox, process kubelet, real Redis, the chart's RBAC); also on a real
## cluster when AGENTCUBE_E2E_WM_URL is set (see README).
e2e: deps
	$(CARGO) build --workspace --bins
	$(MAKE) --no-print-directory e2e-run

e2e-run:
	$(STEP) e2e-local env AGENTCUBE_E2E_BACKEND=local .venv/bin/python -m pytest -q tests/e2e
	$(STEP) e2e-kube env AGENTCUBE_E2E_BACKEND=kube .venv/bin/python -m pytest -q tests/e2e
	@if [ -n "$${AGENTCUBE_E2E_WM_URL:-}" ]; then \
	  AGENTCUBE_E2E_BACKEND=cluster .venv/bin/python -m pytest -q tests/e2e; \
	else echo "e2e on a real cluster: skipped (set KUBECONFIG, AGENTCUBE_E2E_WM_URL, AGENTCUBE_E2E_ROUTER_URL)"; fi

deps:
	$(STEP) install-deps scripts/install-deps.sh
	$(STEP) fetch-helm sh -c 'scripts/fetch-helm.sh >/dev/null'
	$(STEP) build-kube scripts/build-kube.sh
	$(STEP) build-oidc scripts/build-oidc.sh

## cgroup-v2: the local backend's cgroup limits where every controller is on cgroup v2 (a login
## session's scope, a service with Delegate=yes, a container, a user's delegated scope), in a QEMU
## guest (scripts/vm.py); then under a real systemd there (a Delegate=yes service, a user's
## `systemd-run --user --scope`, deploy/systemd/agentcube.service)
cgroup-v2:
	@$(CARGO) build -q --bin workload-manager --bin picod
	@bin=$$($(CARGO) test -q -p agentcube-workload-manager --test isolation --no-run --message-format=json \
	  | .venv/bin/python -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if "/isolation-" in (m.get("executable") or "")][0])') \
	  && .venv/bin/python scripts/vm.py -- $(CURDIR)/tests/vm/cgroup-v2.sh "$$bin" \
	  && .venv/bin/python scripts/vm.py --systemd -- $(CURDIR)/tests/vm/systemd.sh $(CURDIR) "$$bin"

## kube: build the test control plane (Kubernetes + agent-sandbox from kube/controlplane/go.mod)
kube:
	@scripts/build-kube.sh

## cluster: `helm install` of deploy/helm/agentcube on the test control plane (process kubelet), in
## the foreground; prints `export KUBECONFIG=... WORKLOAD_MANAGER_URL=... ROUTER_URL=...`, Ctrl-C
## uninstalls and stops everything
cluster: deps
	$(CARGO) build --release -p agentcube-router -p agentcube-workload-manager -p agentcube-test-cluster --bins
	CARGO=$(CARGO) scripts/build-picod.sh
	.venv/bin/python scripts/cluster.py

## kube-up: a real control plane (etcd, kube-apiserver, controller-manager, scheduler, agent-sandbox
## controller) with a process kubelet, in the foreground; prints `export KUBECONFIG=...`, Ctrl-C stops it
kube-up: kube
	$(CARGO) build -p agentcube-test-cluster -p agentcube-picod -p agentcube-router -p agentcube-workload-manager --bins
	./target/debug/test-cluster --state-dir $(CURDIR)/.cache/kube-up

# `make run` needs only bubblewrap (and util-linux's setpriv, always present on Debian).
deps-run:
	@command -v bwrap >/dev/null 2>&1 || scripts/install-deps.sh --run-only

build:
	$(CARGO) build --workspace --all-targets

fmt:
	$(CARGO) fmt --all

lint: check-crds
	scripts/check-test-support.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -q --workspace --no-deps --document-private-items

## crds: regenerate config/crd/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p agentcube-crds --bin crdgen
	cp config/crd/*.yaml deploy/helm/agentcube/crds/

## check-crds: fail when the committed CRD YAML is stale
check-crds:
	$(CARGO) run -q -p agentcube-crds --bin crdgen -- --check

## bench: benchmarks against the release binaries as separate processes, with real clients (wrk,
## the Python SDKs, requests); each prints one table with ratios against baselines from the same
## run and never fails on numbers. BENCH_SECS shortens or lengthens the timed phases.
BENCH_SECS ?= 10
bench: deps bench-build
	@.venv/bin/python bench/harness.py
	$(MAKE) --no-print-directory bench-picod bench-http bench-critical-path bench-sdk bench-wm bench-kube bench-soak

bench-build:
	$(CARGO) build --release -p agentcube -p agentcube-router -p agentcube-workload-manager -p agentcube-test-cluster --bins
	CARGO=$(CARGO) scripts/build-picod.sh
	$(CARGO) build --release -p agentcube-picod --example picod-bench
	$(CARGO) build --release -p agentcube-workload-manager --example wm-bench
	$(CARGO) build --release -p agentcube-router --example bare-proxy

bench-picod:
	./target/release/examples/picod-bench target/release/picod

bench-http:
	cd bench && ../.venv/bin/python http_proxy.py $(BENCH_SECS)

## bench-critical-path: the Router's and nginx's own time per proxied request, from kernel
## tracepoints (perf; prints why and skips without it)
bench-critical-path:
	cd bench && ../.venv/bin/python critical_path.py 8

bench-sdk:
	cd bench && ../.venv/bin/python sdk.py 200 50

bench-wm:
	./target/release/examples/wm-bench target/release/picod

bench-kube:
	cd bench && ../.venv/bin/python kube.py 50

## bench-instructions: the Router's instructions per proxied request (callgrind; not in `make bench`)
bench-instructions:
	$(CARGO) build --release -p agentcube-router --example bare-proxy
	cd bench && ../.venv/bin/python instructions.py 2000

bench-soak:
	cd bench && ../.venv/bin/python soak.py $$(( $(BENCH_SECS) * 6 ))

clean:
	$(CARGO) clean
	rm -rf .cache
