# kproxy: `make demo` and `make test` install what is missing, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KPROXY := $(VENV)/bin/kproxy
PYTEST_ARGS ?=

.PHONY: deps demo test test-unit test-vm bench clean-cluster

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(KPROXY) demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	  exit $$rc

# Live tests on a stock kernel (IPVS, dummy links) in a throwaway qemu VM: docs/vm.md.
# The first run downloads Debian's kernel package (~70 MB) into vm/ (git-ignored).
# The harness's own tests come first: they prove that exit codes come back from the VM.
VM_TESTS ?= tests/integration/test_ipvs_live.py tests/integration/test_modes.py
test-vm: deps
	@bash scripts/install-deps.sh --vm
	@KPROXY_VM_TESTS=1 $(PY) -m pytest -m vm tests/integration/test_vm_harness.py $(PYTEST_ARGS)
	@KPROXY_READY_TIMEOUT=120 scripts/vm/run.sh -- $(PY) -m pytest $(VM_TESTS) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test-vm: pytest collected no tests" >&2; exit 1; fi; \
	  exit $$rc

test-unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: deps
	$(PY) bench/pods.py
	$(PY) bench/services.py
	$(PY) bench/trace.py
	$(PY) bench/explain.py
	$(PY) bench/modes.py

clean-cluster: deps
	$(KPROXY) clean --all
