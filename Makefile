# agentcube (Rust). `make run` starts the system, `make test` installs what it needs and runs every test.
SHELL := /bin/bash
CARGO ?= cargo
RUN_ADDR ?= 127.0.0.1:8080

.PHONY: run test deps build fmt lint crds check-crds bench bench-picod clean

## run: build and start the system on this machine (today: PicoD alone, auth disabled, loopback only)
run: deps
	$(CARGO) build --release -p agentcube-picod --bin picod
	@mkdir -p .cache/workspace
	@echo "PicoD on http://$(RUN_ADDR) (workspace .cache/workspace, loopback only, auth disabled)"
	@echo "  curl -s http://$(RUN_ADDR)/health"
	@echo "  curl -s http://$(RUN_ADDR)/api/execute -d '{\"command\":[\"echo\",\"hello\"]}'"
	./target/release/picod --listen $(RUN_ADDR) --workspace .cache/workspace --insecure-no-auth

## test: install dependencies, check formatting and lints, build, run every test
test: deps lint
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --workspace --all-targets

fmt:
	$(CARGO) fmt --all

lint: check-crds
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## crds: regenerate config/crd/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p agentcube-crds --bin crdgen

## check-crds: fail when the committed CRD YAML is stale
check-crds:
	$(CARGO) run -q -p agentcube-crds --bin crdgen -- --check

## bench: benchmarks that print ratios against same-run baselines (they never fail)
bench: bench-picod

bench-picod:
	$(CARGO) build --release -p agentcube-picod --bin picod --example bench
	./target/release/examples/bench target/release/picod

clean:
	$(CARGO) clean
	rm -rf .cache
