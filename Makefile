# ctinotify: make demo | make test | make run | make check | make bench
PYTHON ?= python3
CONFIG ?= ctinotify.conf
VENV   := .venv

.PHONY: help demo test run check bench clean

help:
	@echo "make demo   - run the daemon on recorded calls (no Asterisk needed)"
	@echo "make test   - run the test suite (installs pytest into $(VENV) if missing)"
	@echo "make run    - run the daemon in the foreground with $(CONFIG)"
	@echo "make check  - validate $(CONFIG)"
	@echo "make bench  - measure speed and memory (QUICK=1: a short run; PROFILE=1: cProfile the daemons)"

demo:
	$(PYTHON) tests/fakeami.py --demo

# Use the pytest that is importable; else install it into a local venv.
test:
	@if $(PYTHON) -c "import pytest" 2>/dev/null; then \
		$(PYTHON) -m pytest -q test_ctinotify.py; \
	else \
		if ! $(VENV)/bin/python -c "import pytest" 2>/dev/null; then \
			echo "pytest not found: installing it into $(VENV)"; \
			$(PYTHON) -m venv $(VENV) && $(VENV)/bin/python -m pip install --quiet pytest; \
		fi; \
		$(VENV)/bin/python -m pytest -q test_ctinotify.py; \
	fi

run:
	$(PYTHON) ctinotify.py run -c $(CONFIG)

check:
	$(PYTHON) ctinotify.py check -c $(CONFIG)

# Builds big traces in bench-data/ (about 200 MB), then about two minutes of
# measurements; prints a table (README "Performance").  Never part of make test.
bench:
	$(PYTHON) tests/bench.py $(if $(QUICK),--quick) $(if $(PROFILE),--profile)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__ bench-data
