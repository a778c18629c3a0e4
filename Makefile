# Two commands for a newcomer: `make dev` runs everything on loopback, `make test` runs the
# whole suite. Both set up what they need: the venv, the packages, the Kafka jars.

PYTHON ?= python3
# rustup installs cargo here; a non-login shell (CI) may not have it on its PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
SHARED := ../shared/conformance
# The worker's native fast path (Rust, built with maturin into the venv).
NATIVE_SRC   := native/Cargo.toml native/Cargo.lock native/pyproject.toml $(wildcard native/src/*.rs)
NATIVE_STAMP := $(VENV)/.native-$(shell cat $(NATIVE_SRC) | sha1sum | cut -c1-12)

.PHONY: install jars dev test test-unit chaos bench bench-quick conformance clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# It embeds RocksDB (built from source by the rocksdb crate: ~8 min on 2 cores, once: the
# build directory is kept outside the checkout, so a fresh clone reuses it). The crate's
# bindgen needs libclang: taken from PyPI into a folder beside it (not the venv: its path
# is part of what cargo checks, and one that moved with each clone rebuilt RocksDB), with
# the C compiler's own headers.
CACHE            := $(HOME)/.cache/streamledger
CARGO_TARGET_DIR ?= $(CACHE)/cargo-target
export CARGO_TARGET_DIR
LIBCLANG         := $(CACHE)/libclang-18.1.1
export LIBCLANG_PATH := $(LIBCLANG)/clang/native

$(LIBCLANG_PATH)/libclang.so: $(STAMP)
	$(BIN)/python -m pip install -q --target $(LIBCLANG) libclang==18.1.1

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC) $(LIBCLANG_PATH)/libclang.so
	@command -v cargo >/dev/null || { echo "cargo not found: the worker's native path (native/) is Rust; install it with rustup" >&2; exit 1; }
	@echo "building native/ (the first build compiles RocksDB: several minutes)"
	BINDGEN_EXTRA_CLANG_ARGS="-I$$($${CC:-cc} -print-file-name=include)" $(BIN)/python -m pip install -q ./native
	@rm -f $(VENV)/.native-*
	@touch $(NATIVE_STAMP)

install: $(STAMP) $(NATIVE_STAMP)

jars: install
	@$(BIN)/python -c "from streamledger.kafka_local import ensure_jars; print('kafka jars:', ensure_jars())"

dev: jars
	$(BIN)/streamledger dev

test: jars
	@if [ -d $(SHARED)/numscript ]; then \
		$(BIN)/streamledger numscript test $(SHARED)/numscript; \
	else echo "skipped: Numscript conformance ($(SHARED)/numscript not found)"; fi
	@if [ -f $(SHARED)/formance/logs-v2.1-hashchain.jsonl ]; then \
		$(BIN)/streamledger verify $(SHARED)/formance/logs-v2.1-hashchain.jsonl; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not integration"

conformance: install
	$(BIN)/streamledger numscript test $(SHARED)/numscript
	$(BIN)/streamledger verify $(SHARED)/formance/logs-v2.1-hashchain.jsonl

chaos: jars
	$(BIN)/python bench/chaos.py

bench: jars
	$(BIN)/python bench/throughput.py

bench-quick: jars
	$(BIN)/python bench/throughput.py --quick

clean:
	rm -rf $(VENV) .data build *.egg-info native/target
