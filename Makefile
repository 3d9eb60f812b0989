# Front door. Everything runs in ./.venv, created by scripts/install.sh.
PY := .venv/bin/python
ASAN_LIBS = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)

.PHONY: all build test bench debug sanitize clean mypy

all: build

build:
	./scripts/install.sh

test: build
	./scripts/test

bench: build
	$(PY) bench/throughput

debug:
	DWCP_DEBUG=1 ./scripts/install.sh
	DWCP_DEBUG=1 $(PY) -m pytest tests/unit tests/e2e -q

# ASan/UBSan build of the C core and the suite run under it. LD_PRELOAD because the interpreter itself
# is not built with ASan; leak checking is off because CPython's own allocations would drown ours.
sanitize:
	DWCP_SANITIZE=1 ./scripts/install.sh
	LD_PRELOAD=$(ASAN_LIBS) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(PY) -m pytest tests -q -p no:cacheprovider

mypy: build
	$(PY) -m mypy

clean:
	rm -rf build dist *.egg-info dwcp/_core*.so dwcp/_core.c dwcp/_ebpf*.so dwcp/_ebpf.c dwcp/netlab/dwcp-delayline .build-mode .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
