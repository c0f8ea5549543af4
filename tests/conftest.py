"""Fixtures of the live test tier (``make test-live``; tests/livelab.py has the pieces).

``make test`` never loads this file (it collects test_ctinotify.py only). With
CTINOTIFY_LIVE=1, as make test-live sets it, a live test that cannot run is a failure:
a skip is turned into one.

- ``lab``: the running office PBX for the whole session (livelab.Lab): ``lab.run_scenario(name)``
  plays a scenario of tests/lab/scenarios.py; ``lab.ami(action, **fields)`` sends an action on
  the lab's own ``labctl`` user; ``lab.phone(ext, mode)`` and ``lab.call_in(caller, ext)`` set
  phones and place calls (undone after the test); ``lab.wait_event``, ``lab.cli``,
  ``lab.restart_now()``, ``lab.crash()``; ``lab.sim`` is tests/lab/lab.py itself.
- ``daemon(**config)``: ctinotify run against it, stopped after the test.
- ``client(user, fmt)``: a logged-in client of the last daemon started (or of ``port=``).
- ``office``: one daemon for a whole module with every office user logged in as text and JSON.
- ``ami_proxy``: a relay to the AMI that the test can cut (``daemon(ami_port=ami_proxy.port)``).
"""

import os
import signal
import time

import pytest

LIVE = os.environ.get("CTINOTIFY_LIVE") == "1"
#: What make test-live must stay within on two cores (issue 17).
LIVE_BUDGET_S = 15 * 60

if LIVE:
    import livelab


def _interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def pytest_configure(config):
    """SIGTERM (a CI timeout) ends the run as Ctrl-C does: the fixtures' finalizers still
    stop the lab, the daemons and the phones."""
    if LIVE:
        config._live_started = time.monotonic()
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_terminal_summary(terminalreporter, config):
    if LIVE:
        wall = time.monotonic() - config._live_started
        terminalreporter.write_line("live tier: %.0f s wall (budget %d s)" % (wall, LIVE_BUDGET_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if LIVE and report.skipped:
        report.outcome = "failed"
        report.longrepr = "a live test that cannot run is a failure, not a skip: %s" % (report.longrepr,)


@pytest.fixture(scope="session")
def live_session():
    """A cleanup of every child left, whatever happened."""
    yield
    livelab.stop_children()


@pytest.fixture(scope="session")
def lab(live_session):
    try:
        livelab.preflight()
        office_lab = livelab.Lab()
    except livelab.LabUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        office_lab.start()
    except BaseException:
        office_lab.stop()
        raise
    yield office_lab
    livelab.stop_children()
    stragglers = office_lab.stop()
    assert not stragglers, "the lab's stop script left processes running: %s" % stragglers


@pytest.fixture(autouse=True)
def lab_reset(request):
    """A test that drove the lab itself leaves it as it found it."""
    yield
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").reset()


@pytest.fixture
def daemon(lab, tmp_path):
    started = []

    def start(wait_login=True, **config):
        d = livelab.Daemon(str(tmp_path), **config)
        started.append(d)
        if wait_login:
            d.wait_log("ami: logged in as ctitest")
        return d
    start.started = started
    yield start
    for d in started:
        d.stop()


@pytest.fixture
def client(daemon):
    opened = []

    def connect(user, fmt="text", port=None):
        c = livelab.Client(port or daemon.started[-1].port, user, fmt=fmt)
        opened.append(c)
        return c
    yield connect
    for c in opened:
        c.close()


@pytest.fixture(scope="module")
def office(lab, tmp_path_factory):
    d = livelab.Daemon(str(tmp_path_factory.mktemp("office")))
    try:
        d.wait_log("ami: logged in as ctitest")
        o = livelab.Office(d)
        yield o
        o.close()
    finally:
        d.stop()


@pytest.fixture
def ami_proxy(lab, tmp_path):
    """Its traffic is recorded in the test's tmp_path (ami-1.ami, ami-2.ami ...)."""
    proxy = livelab.AmiProxy(record_dir=str(tmp_path))
    yield proxy
    proxy.close()
