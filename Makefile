# Front door. Everything runs in ./.venv, created by scripts/install.sh.
PY := .venv/bin/python
ASAN_LIBS = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)

.PHONY: all build test bench debug sanitize clean mypy

all: build

# The in-place extension is built in one of three modes (release, debug, sanitize); switching modes
# forces a full rebuild, since setuptools cannot tell that only the flags changed.
define build_mode
	@if [ "$$(cat .build-mode 2>/dev/null)" != "$(1)" ]; then rm -rf build dwcp/_core*.so dwcp/_core.c; fi
	$(2) ./scripts/install.sh
	@echo $(1) > .build-mode
endef

build:
	$(call build_mode,release,)

test: build
	./scripts/test

bench: build
	$(PY) bench/throughput

debug:
	$(call build_mode,debug,DWCP_DEBUG=1)
	DWCP_DEBUG=1 $(PY) -m pytest tests/unit tests/e2e -q

# ASan/UBSan build of the C core and the suite run under it. LD_PRELOAD because the interpreter itself
# is not built with ASan; leak checking is off because CPython's own allocations would drown ours.
sanitize:
	$(call build_mode,sanitize,DWCP_SANITIZE=1)
	LD_PRELOAD=$(ASAN_LIBS) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(PY) -m pytest tests -q -p no:cacheprovider

mypy: build
	$(PY) -m mypy

clean:
	rm -rf build dist *.egg-info dwcp/_core*.so dwcp/_core.c .build-mode .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
