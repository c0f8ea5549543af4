# ctinotify: make demo | make test | make test-live | make run | make check | make bench | make install
PYTHON ?= python3
# what make test runs (make test-live: the live tier, tests/test_live.py)
TESTS  ?= test_ctinotify.py
CONFIG ?= ctinotify.conf
VENV   := .venv

# make install: $(DESTDIR) is prepended to every path (for packaging and the
# tests); only the program goes under $(PREFIX).
PREFIX  ?= /usr/local
DESTDIR ?=
SBINDIR := $(PREFIX)/sbin
CONFDIR := /etc/asterisk
UNITDIR ?= /lib/systemd/system
INITDIR := /etc/init.d

.PHONY: help demo test test-live run check bench screenshot clean install uninstall

help:
	@echo "make demo   - run the daemon on recorded calls (no Asterisk needed)"
	@echo "make test   - run the test suite (installs pytest into $(VENV) if missing)"
	@echo "make test-live - the live tier: a real Asterisk (../shared/asterisk, or AST_PREFIX) and sipp"
	@echo "make run    - run the daemon in the foreground with $(CONFIG)"
	@echo "make check  - validate $(CONFIG)"
	@echo "make bench  - measure speed and memory (QUICK=1: a short run; PROFILE=1: cProfile the daemons)"
	@echo "make screenshot - retake the README's pictures of the web page (needs Chromium)"
	@echo "make install   - the program, service files and (if none exists) the config"
	@echo "make uninstall - remove the program and service files; keeps the config"

demo:
	$(PYTHON) tests/fakeami.py --demo

# Use the pytest that is importable; else install it into a local venv.
test:
	@if $(PYTHON) -c "import pytest" 2>/dev/null; then \
		$(PYTHON) -m pytest -q $(TESTS); \
	else \
		if ! $(VENV)/bin/python -c "import pytest" 2>/dev/null; then \
			echo "pytest not found: installing it into $(VENV)"; \
			$(PYTHON) -m venv $(VENV) && $(VENV)/bin/python -m pip install --quiet pytest; \
		fi; \
		$(VENV)/bin/python -m pytest -q $(TESTS); \
	fi

# The live tier: says in one line why it cannot run (no Asterisk, no sipp, the lab's
# ports taken) and fails; else starts the lab, plays every call flow, stops it all.
test-live:
	@$(PYTHON) tests/livelab.py preflight
	@CTINOTIFY_LIVE=1 $(MAKE) --no-print-directory test TESTS="tests/test_live.py $(LIVE_ARGS)"

run:
	$(PYTHON) ctinotify.py run -c $(CONFIG)

check:
	$(PYTHON) ctinotify.py check -c $(CONFIG)

# Builds big traces in bench-data/ (about 200 MB), then about two minutes of
# measurements; prints a table (README "Performance").  Never part of make test.
bench:
	$(PYTHON) tests/bench.py $(if $(QUICK),--quick) $(if $(PROFILE),--profile)

# The browser tests take the pictures (tests/screenshots/) from recorded calls
# played to the daemon; CI=1 makes a missing Chromium a failure, not a skip.
screenshot:
	mkdir -p tests/screenshots
	CI=1 CTINOTIFY_SCREENSHOTS="$(CURDIR)/tests/screenshots" $(PYTHON) -m pytest -q \
		test_ctinotify.py -k "page_screenshot_of_a_recorded_call or page_fits_a_phone_screen \
		or page_screenshot_of_the_board or page_board_fits_a_phone_screen"

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__ bench-data

# mkdir -p, not install -d: install -d would chmod an existing /etc/asterisk.
# The service files name the program's installed path, $(SBINDIR)/ctinotify.
install:
	mkdir -p "$(DESTDIR)$(SBINDIR)" "$(DESTDIR)$(CONFDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(INITDIR)"
	install -m 755 ctinotify.py "$(DESTDIR)$(SBINDIR)/ctinotify"
	sed 's|/usr/local/sbin/ctinotify|$(SBINDIR)/ctinotify|g' contrib/ctinotify.service \
		> "$(DESTDIR)$(UNITDIR)/ctinotify.service"
	chmod 644 "$(DESTDIR)$(UNITDIR)/ctinotify.service"
	sed 's|/usr/local/sbin/ctinotify|$(SBINDIR)/ctinotify|g' contrib/ctinotify.init \
		> "$(DESTDIR)$(INITDIR)/ctinotify"
	chmod 755 "$(DESTDIR)$(INITDIR)/ctinotify"
	@if [ -e "$(DESTDIR)$(CONFDIR)/ctinotify.conf" ]; then \
		echo "kept $(DESTDIR)$(CONFDIR)/ctinotify.conf: an existing configuration is never overwritten"; \
	else \
		install -m 640 ctinotify.conf "$(DESTDIR)$(CONFDIR)/ctinotify.conf" && \
		echo "installed the example $(DESTDIR)$(CONFDIR)/ctinotify.conf (mode 640): edit it, then chgrp asterisk it"; \
	fi

uninstall:
	rm -f "$(DESTDIR)$(SBINDIR)/ctinotify" "$(DESTDIR)$(UNITDIR)/ctinotify.service" \
		"$(DESTDIR)$(INITDIR)/ctinotify"
	@echo "kept $(DESTDIR)$(CONFDIR)/ctinotify.conf: it is your configuration; remove it by hand if you mean to"
