# kproxy: `make demo` and `make test` install what is missing, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KPROXY := $(VENV)/bin/kproxy
PYTEST_ARGS ?=

.PHONY: deps demo test test-unit bench clean-cluster

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(KPROXY) demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	  exit $$rc

test-unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: deps
	$(PY) bench/pods.py

clean-cluster: deps
	$(KPROXY) clean --all
