# The two commands a newcomer types: `make demo` (the embedded default, end to end) and `make test`.
# Both create or reuse .venv idempotently: the install runs again only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)
# torch: the builds that work on this machine (x86_64 + Python 3.11 from local files; aarch64 the CPU wheels).
ifeq ($(ARCH),x86_64)
TORCH := torch==2.14.1 torchvision==0.29.1
else
TORCH := torch==2.9.1 torchvision==0.24.1
endif

.PHONY: demo test lint clean-runs

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[dev]' $(TORCH)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cfkd run

# pytest exits 5 when it collects no test: not a failure of the suite.
test: $(STAMP)
	$(VENV)/bin/python -m pytest; status=$$?; if [ $$status -eq 5 ]; then exit 0; fi; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline annotation_app tests benchmarks
	$(VENV)/bin/ruff format --check pipeline annotation_app tests benchmarks

clean-runs:
	rm -rf runs
