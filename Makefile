# One entry point per chore; the README and .ci/run use these targets.
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: demo dev test generate lint bench deps build fuzz

## deps: install what the tests and the demo need besides Rust (a real nats-server >= 2.12)
deps:
	@bash scripts/install-deps.sh

## build: every binary of the workspace (tests drive the real binaries from target/debug)
build:
	$(CARGO) build --workspace --bins

## demo: run Conveyor end to end on the embedded Kubernetes test double — no cluster needed
demo: deps build
	./target/debug/conveyor dev --demo

## dev: start NATS + the Kubernetes test double + the operator and keep them running
dev: deps build
	./target/debug/conveyor dev

## test: every test of the workspace (unit, component against nats-server, end to end)
test: deps build
	$(CARGO) nextest run --workspace --no-fail-fast

## generate: regenerate the CRD YAML from the Rust types
generate:
	$(CARGO) run -q -p conveyor-crds --bin crdgen -- --out crds/ --out charts/conveyor/crds/

## lint: formatting, clippy with warnings denied (also on the CLI built without `dev`/`bench`), no
## import circles between the modules of a crate, the Helm chart's values against its schema
MODULE_CYCLE_FREE := cli/src operator/src
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p conveyor-cli --no-default-features --all-targets -- -D warnings
	python3 scripts/check-module-cycles.py --self-test
	python3 scripts/check-module-cycles.py $(MODULE_CYCLE_FREE)
	python3 scripts/check-chart.py

## bench: throughput/latency against raw JetStream in the same run (see docs/benchmarks.md)
bench: deps
	$(CARGO) build --release --workspace --bins
	./target/release/conveyor bench
	$(CARGO) bench -p conveyor-operator --bench scaling
	$(CARGO) bench -p conveyor --bench flow

## fuzz: each fuzz target of the wire codecs for FUZZ_SECONDS (10 min) in turn, at low priority;
## not part of test or CI (make test replays the saved corpus instead). See docs/development.md.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= header_block records duration jsonl
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 nice -n 19 $(CARGO) fuzz run -O $$target corpus/$$target regressions/$$target -- \
			-dict=dict/conveyor.dict -max_len=8192 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			|| exit 1; \
	done
