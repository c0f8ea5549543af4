"""The live test tier's harness: a real Asterisk, the simulated office, ctinotify, clients.

``make test-live`` runs ``tests/test_live.py`` with the fixtures of ``tests/conftest.py``,
which are built from the pieces here:

- ``Lab``: the simulated office of ``tests/lab`` (a copy of ``../shared/asterisk/lab``, the
  one that recorded ``tests/traces``) on a real Asterisk 22, unpacked from the release
  tarball into a temporary directory, or the installed one ``AST_PREFIX`` names. It plays
  the lab driver's scenarios and sends AMI actions on the lab's own ``labctl`` user.
- ``Daemon``: ``ctinotify.py run`` as a child process against it.
- ``Client``: a logged-in line client, text or JSON, that keeps what it receives.
- ``AmiProxy``: a relay between ctinotify and the AMI that a test can cut and restore.
- ``normalise``: a user's notifications with what differs from run to run taken out.

Everything started here is a child (or, for Asterisk and sipp, a PID file in the lab's
directory) and is stopped by PID: nothing is ever killed by name. ``python3
tests/livelab.py preflight`` says in one line why the tier cannot run, or nothing.
"""

import atexit
import glob
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LAB_DIR = os.path.join(HERE, "lab")
OFFICE_CONF = os.path.join(HERE, "office.conf")
GOLDEN = os.path.join(HERE, "golden")
TRACES = os.path.join(HERE, "traces")
sys.path.insert(0, REPO)

import ctinotify  # noqa: E402

# ---------------------------------------------------------------------------
# Where the Asterisk comes from, and whether the lab can run here
# ---------------------------------------------------------------------------

#: A directory holding ``asterisk-*.tar.gz`` (the release the traces came from).
ASTERISK_DIR_VAR = "CTINOTIFY_ASTERISK"
DEFAULT_ASTERISK_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "asterisk"))


def _main_checkout():
    """The repository's main checkout when this is a linked git worktree, else None."""
    try:
        common = subprocess.run(["git", "-C", REPO, "rev-parse", "--git-common-dir"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                universal_newlines=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    main = os.path.dirname(os.path.abspath(os.path.join(REPO, common))) if common else None
    return main if main and os.path.normpath(main) != os.path.normpath(REPO) else None

#: An installed Asterisk: ``$AST_PREFIX/sbin/asterisk`` (configure --prefix, make install).
PREFIX_VAR = "AST_PREFIX"
HOW_TO_POINT = ("no Asterisk to test against: no asterisk-*.tar.gz in %s; set {0}=DIR to the "
                "directory that has it, or {1}=PREFIX to an installed Asterisk (PREFIX/sbin/asterisk)"
                .format(ASTERISK_DIR_VAR, PREFIX_VAR))
#: The lab's fixed addresses (tests/lab/lab.py, etc/pjsip.conf, etc/manager.conf), all on
#: 127.0.0.1: only one lab can run on a machine at a time.
LAB_TCP_PORTS = (5038,)
LAB_UDP_PORTS = (5060,) + tuple(range(5080, 5085)) + (5090,) + tuple(range(5100, 5104)) \
    + tuple(range(5200, 5204))
AMI_PORT = 5038
#: Start-up of Asterisk: run-lab.sh waits up to 30 s for it to boot.
LAB_START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 10


class LabUnavailable(Exception):
    """The live tier cannot run here; the message says why in one line."""


def asterisk_source():
    """``("prefix", dir)`` for an installed Asterisk, else ``("tarball", path)``."""
    prefix = os.environ.get(PREFIX_VAR)
    if prefix:
        if not os.access(os.path.join(prefix, "sbin", "asterisk"), os.X_OK):
            raise LabUnavailable("%s=%s: no sbin/asterisk there (it names an installed Asterisk, "
                                 "PREFIX/sbin/asterisk; unset, the tarball is used)" % (PREFIX_VAR, prefix))
        return "prefix", os.path.abspath(prefix)
    places = [os.environ.get(ASTERISK_DIR_VAR)] if os.environ.get(ASTERISK_DIR_VAR) else [DEFAULT_ASTERISK_DIR]
    main = _main_checkout() if not os.environ.get(ASTERISK_DIR_VAR) else None
    if main:  # a worktree elsewhere: ../shared/asterisk of the main checkout too
        places.append(os.path.join(os.path.dirname(main), "shared", "asterisk"))
    for where in places:
        found = sorted(glob.glob(os.path.join(where, "asterisk-*.tar.gz")))
        if found:
            return "tarball", os.path.abspath(found[-1])
    raise LabUnavailable(HOW_TO_POINT % " or ".join(places))


def _socket_owners():
    """{socket inode: "pid N program"} for the processes we may look at."""
    owners = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                program = os.path.basename(f.read().split(b"\0")[0].decode("utf-8", "replace"))
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[8:-1]] = "pid %s %s" % (pid, program)
    return owners


def _port_owner(proto, port):
    """Who holds a local port, from /proc/net (best effort: '' when unknown)."""
    inodes = []
    for table in ("/proc/net/%s" % proto, "/proc/net/%s6" % proto):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and (proto == "udp" or cols[3] == "0A"):
                inodes.append(cols[9])
    owners = _socket_owners() if inodes else {}
    return ", ".join(owners[i] for i in inodes if i in owners)


def _port_free(proto, port):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    try:
        if proto == "tcp":  # connections of an earlier run in TIME_WAIT do not count
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def taken_ports():
    """The lab's ports something else holds, grouped by owner when known:
    ``["tcp 5038, udp 5060 (pid 12 asterisk)", ...]``."""
    owners = {}
    for proto, ports in (("tcp", LAB_TCP_PORTS), ("udp", LAB_UDP_PORTS)):
        for port in ports:
            if not _port_free(proto, port):
                owners.setdefault(_port_owner(proto, port), []).append("%s %d" % (proto, port))
    return ["%s%s" % (", ".join(ports), " (%s)" % owner if owner else "") for owner, ports in owners.items()]


def preflight():
    """Raise LabUnavailable (one line) unless the lab can start here now."""
    asterisk_source()
    if shutil.which("sipp") is None:
        raise LabUnavailable("sipp is missing (the lab's phones): apt-get install sip-tester")
    taken = taken_ports()
    if taken:
        raise LabUnavailable("the Asterisk lab's ports are taken (one lab per machine; stop the other "
                             "first): %s" % "; ".join(taken))


# ---------------------------------------------------------------------------
# Processes: every child is registered, and stopped by PID
# ---------------------------------------------------------------------------

_children = []


def spawn(args, **kwargs):
    """subprocess.Popen, registered so that stop_children() ends it whatever happens."""
    proc = subprocess.Popen(args, **kwargs)
    _children.append(proc)
    return proc


def stop_process(proc, timeout=STOP_TIMEOUT_S):
    """SIGTERM, then SIGKILL after ``timeout``; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stop_children():
    """Stop every registered child still running (a session-wide cleanup)."""
    for proc in list(_children):
        stop_process(proc)
        _children.remove(proc)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie has finished
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pid(pid, timeout=STOP_TIMEOUT_S):
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def pids_mentioning(path):
    """Processes whose command line names ``path``: what a lab in that directory started."""
    found = []
    needle = path.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if needle in f.read() and int(pid) != os.getpid():
                    found.append(int(pid))
        except OSError:
            continue
    return found


atexit.register(stop_children)


# ---------------------------------------------------------------------------
# The lab: Asterisk, sipp phones and carrier, the scenario driver
# ---------------------------------------------------------------------------

#: Longest a driver scenario may take (t_load is about 80 s; others 5-25 s).
SCENARIO_TIMEOUT_S = 300


class ScenarioRun:
    """One play of a lab scenario: the driver's log, the AMI trace it recorded, its manifest."""

    def __init__(self, lab, name, returncode):
        self.name = name
        self.returncode = returncode
        self.trace = os.path.join(lab.traces, name + ".ami")
        self.log_path = os.path.join(lab.traces, name + ".driver.log")
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            self.log = f.read()
        try:
            with open(os.path.join(lab.traces, name + ".json")) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError):
            self.manifest = {}

    @property
    def ok(self):
        return self.returncode == 0


class Lab:
    """The simulated office on a real Asterisk, in a temporary directory of its own."""

    def __init__(self, source=None):
        self.kind, where = source or asterisk_source()
        self.dir = tempfile.mkdtemp(prefix="ctinotify-live-")
        self.prefix = where if self.kind == "prefix" else os.path.join(self.dir, "ast")
        self.tarball = where if self.kind == "tarball" else None
        self.var = os.path.join(self.dir, "var")
        self.traces = os.path.join(self.dir, "traces")
        os.makedirs(self.traces)
        self.env = dict(os.environ, AST_PREFIX=self.prefix, LAB_VAR=self.var, LAB_TRACES=self.traces)
        self.env["LD_LIBRARY_PATH"] = os.path.join(self.prefix, "lib") + (
            ":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")
        self.asterisk_pids = set()
        self.sim = None          # tests/lab/lab.py: phones, carrier, callers (once started)
        self.callers = []        # sipp callers started by call_in(); stopped by reset()
        self.phones_changed = False
        self._ctl = None
        self._ami_client = None

    # -- start and stop -----------------------------------------------------
    def start(self):
        if self.tarball and not os.path.exists(os.path.join(self.prefix, "sbin", "asterisk")):
            subprocess.run(["tar", "-xzf", self.tarball, "-C", self.dir], check=True)
        self.run_lab_script("run-lab.sh")
        self._load_lab_modules()
        self.ctl  # log in as labctl now: a lab that cannot be driven fails here
        return self

    def run_lab_script(self, script):
        result = subprocess.run([os.path.join(LAB_DIR, script)], env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True, timeout=LAB_START_TIMEOUT_S)
        self.note_asterisk_pid()
        if result.returncode != 0:
            raise LabUnavailable("%s failed: %s" % (script, result.stdout.strip()[-500:]))
        return result.stdout

    def _load_lab_modules(self):
        """lab.py reads its directories from the environment when imported."""
        os.environ.update(AST_PREFIX=self.prefix, LAB_VAR=self.var, LAB_TRACES=self.traces)
        if LAB_DIR not in sys.path:
            sys.path.insert(0, LAB_DIR)
        import ami_recorder
        import lab as sim
        assert sim.VAR == self.var, "tests/lab/lab.py was imported for another lab"
        self.sim, self._ami_client = sim, ami_recorder.AmiClient

    @property
    def pidfile(self):
        return os.path.join(self.var, "run", "asterisk.pid")

    def asterisk_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def note_asterisk_pid(self):
        """Remember every Asterisk PID the lab had (a restart forks a new one)."""
        pid = self.asterisk_pid()
        if pid:
            self.asterisk_pids.add(pid)
        return pid

    def stop(self):
        """Stop all the lab started (by PID file, then any process naming its directory),
        remove its directory; the processes that had to be killed the hard way."""
        if self._ctl is not None:
            self._ctl.close(logoff=False)
            self._ctl = None
        self.note_asterisk_pid()
        try:
            self.run_lab_script("stop-lab.sh")
        except (LabUnavailable, subprocess.TimeoutExpired):
            pass
        stragglers = [pid for pid in self.asterisk_pids if pid_alive(pid)]
        stragglers += [pid for pid in pids_mentioning(self.dir) if pid not in stragglers]
        for pid in stragglers:
            kill_pid(pid)
        shutil.rmtree(self.dir, ignore_errors=True)
        return stragglers

    # -- the lab's own AMI connection (user labctl) ---------------------------
    @property
    def ctl(self):
        """The labctl AMI connection; opened again when Asterisk restarted."""
        if self._ctl is None or self._ctl.closed.is_set():
            if self._ctl is not None:
                self._ctl.close(logoff=False)
            deadline = time.monotonic() + 30
            while True:
                client = self._ami_client(name="labctl-test")
                try:
                    client.connect(5)
                    client.login("labctl", "labctl", "on")
                    break
                except (OSError, RuntimeError):
                    client.close(logoff=False)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            self._ctl = client
        return self._ctl

    def ami(self, action, **fields):
        """Send an action as labctl; its response (a dict)."""
        response = self.ctl.action(action, **fields)
        assert response is not None, "no response to %s" % action
        return response

    def mark(self):
        """A point in the labctl event stream for wait_event(since=...)."""
        return len(self.ctl.messages)

    def wait_event(self, event, since=0, timeout=30, **fields):
        """The first ``event`` at or after ``since`` whose fields match (values or predicates)."""
        def matches(msg):
            if msg.get("Event") != event:
                return False
            for key, want in fields.items():
                value = msg.get(key, "")
                if not (want(value) if callable(want) else value == want):
                    return False
            return True
        msg = self.ctl.wait_for(matches, timeout, since)
        assert msg is not None, "no %s %s within %s s" % (event, fields, timeout)
        return msg

    def channels(self):
        return self.ctl.list_action("CoreShowChannels")[1]

    def wait_idle(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self.channels():
            assert time.monotonic() < deadline, "channels still up: %s" % [
                c.get("Channel") for c in self.channels()]
            time.sleep(0.3)

    # -- phones and callers for tests of their own ------------------------------
    def phone(self, ext, mode="answer", ring_ms=None, talk_ms=None):
        """Set how phone ``ext`` behaves: answer after ring_ms, noanswer, busy."""
        self.phones_changed = True
        kwargs = {k: v for k, v in (("ring_ms", ring_ms), ("talk_ms", talk_ms)) if v is not None}
        self.sim.phone(ext, mode, **kwargs)

    def call_in(self, caller, ext, port=5080, talk_ms=120000):
        """An external caller ``(number, name)`` dials the DID of extension ``ext`` from the
        carrier port ``port`` (5080-5084: one call at a time each) and talks ``talk_ms``
        once answered. A sipp process, stopped by reset() at the latest."""
        did = "+1555700" + ext.zfill(4)
        uac = self.sim.trunk_call("live-%d" % port, [(caller[0], caller[1], did)], port=port,
                                  params={"TALK_MS": talk_ms})
        self.callers.append(uac)
        return uac

    def reset(self):
        """After a test of its own: its callers stopped, calls hung up, phones as by default
        (and Asterisk started again if the test left it dead)."""
        if not pid_alive(self.asterisk_pid() or 0):
            self.start_asterisk()
        for uac in self.callers:
            uac.stop()
        self.callers = []
        for channel in self.channels():
            self.ctl.action("Hangup", Channel=channel["Channel"])
        if self.phones_changed:
            self.sim.phones_default()
            self.phones_changed = False
        self.wait_idle()

    # -- the Asterisk CLI and restarts ---------------------------------------
    def cli(self, command, timeout=30):
        conf = os.path.join(self.var, "run", "asterisk.conf")
        result = subprocess.run([os.path.join(self.prefix, "sbin", "asterisk"), "-C", conf, "-rx", command],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True, timeout=timeout)
        return result.stdout

    def wait_booted(self, old_pid=None, timeout=60):
        """Until Asterisk (a new process when old_pid is given) is fully booted."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self.note_asterisk_pid()
            if pid and pid != old_pid and pid_alive(pid) and \
                    "Asterisk has fully booted" in self.cli("core waitfullybooted", 10):
                return pid
            assert time.monotonic() < deadline, "Asterisk did not come back"
            time.sleep(0.2)

    def restart_now(self):
        """``core restart now``: Asterisk hangs up every call and starts again."""
        old = self.note_asterisk_pid()
        self.cli("core restart now")
        return self.wait_booted(old)

    def crash(self):
        """Asterisk dies (SIGKILL): no Hangup, no Shutdown; nothing is listening until start()."""
        pid = self.note_asterisk_pid()
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
        # It is a zombie until init reaps it, and run-lab.sh's kill -0 would take that for
        # a running Asterisk: its PID file goes, as after any crash that a reboot follows.
        os.unlink(self.pidfile)

    def start_asterisk(self):
        """run-lab.sh again after a crash (it restarts the phones too)."""
        self.run_lab_script("run-lab.sh")
        return self.wait_booted()

    # -- scenarios ----------------------------------------------------------
    def driver(self, *names):
        """The lab's scenario driver in the background (a registered child)."""
        log = open(os.path.join(self.traces, names[0] + ".driver.log"), "w")
        try:
            return spawn([sys.executable, os.path.join(LAB_DIR, "scenarios.py"), "run"] + list(names),
                         env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def finish(self, proc, name, timeout=SCENARIO_TIMEOUT_S):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        return ScenarioRun(self, name, proc.returncode)

    def run_scenario(self, name, timeout=SCENARIO_TIMEOUT_S):
        """Play a lab scenario to its end (the driver waits until no channel is left)."""
        return self.finish(self.driver(name), name, timeout)

    def keep(self, name, why):
        """Copy a scenario's trace, manifest and driver log to live-data/ for a report."""
        dest = os.path.join(REPO, "live-data")
        os.makedirs(dest, exist_ok=True)
        for path in glob.glob(os.path.join(self.traces, name + ".*")):
            shutil.copy(path, dest)
        with open(os.path.join(dest, name + ".why"), "w") as f:
            f.write(why)
        return dest


# ---------------------------------------------------------------------------
# ctinotify as a process, and its clients
# ---------------------------------------------------------------------------

def office_users():
    """The [alice] ... [dave] sections of tests/office.conf (PJSIP/100-103)."""
    with open(OFFICE_CONF) as f:
        text = f.read()
    return text[text.index("[alice]"):]


class Daemon:
    """``ctinotify.py run`` as a child process with its log collected.

    ``grace_s``: how long calls are kept while the AMI link is down (README: 60 s), the
    ``[ami] resync_grace`` key.
    """

    def __init__(self, workdir, ami_port=AMI_PORT, users=None, general="", ami="", grace_s=None,
                 loglevel="info"):
        self.config = os.path.join(workdir, "ctinotify-%d.conf" % len(os.listdir(workdir)))
        if grace_s is not None:
            ami += "\nresync_grace = %g\n" % grace_s
        with open(self.config, "w") as f:
            f.write("[general]\nbind = 127.0.0.1\nport = 0\nweb_port = 0\nloglevel = %s\n%s\n"
                    "[ami]\nhost = 127.0.0.1\nport = %d\nusername = ctitest\nsecret = ctitest\n"
                    "reconnect_max = 2\n%s\n%s"
                    % (loglevel, general, ami_port, ami, users if users is not None else office_users()))
        os.chmod(self.config, 0o600)
        program = os.path.join(REPO, "ctinotify.py")
        args = [sys.executable, program, "run", "-c", self.config]
        self.proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.log = []
        self._lines = queue.Queue()
        threading.Thread(target=self._read_log, daemon=True).start()
        line = self.wait_log(r"listening for clients on \S+ port (\d+)")
        self.port = int(re.search(r"port (\d+)", line).group(1))

    def _read_log(self):
        for line in self.proc.stdout:
            self.log.append(line)
            self._lines.put(line)

    def wait_log(self, pattern, timeout=20.0, since=0):
        """The first log line from index ``since`` on that matches."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for line in self.log[seen:]:
                seen += 1
                if re.search(pattern, line):
                    return line
            try:
                self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no log line matching %r in:\n%s" % (pattern, "".join(self.log[-40:])))

    def stop(self):
        rc = stop_process(self.proc)
        if self.proc in _children:
            _children.remove(self.proc)
        return rc


class Client:
    """A logged-in client of the line protocol (``fmt`` text or json) with a reader thread.

    Notifications (EVENT and STATUS lines, or JSON objects) go to ``notes``; replies
    (OK/ERR lines and the CALL/HISTORY items before them) to ``command()``.
    """

    def __init__(self, port, user, secret=None, fmt="text"):
        self.user, self.fmt = user, fmt
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        self.notes = []           # (arrival time, line)
        self.taken = 0
        self.closed = threading.Event()
        self._replies = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        greeting = self._replies.get(timeout=10)
        assert greeting.startswith("CTINOTIFY/"), greeting
        reply = self.command("LOGIN %s %s" % (user, secret or user + "-secret"))[-1]
        assert reply.startswith("OK logged in as %s" % user), reply
        if fmt == "json":
            assert self.command("FORMAT json")[-1] == "OK format=json"

    def _is_note(self, line):
        if line.startswith("{"):
            return json.loads(line).get("event") not in ("call", "history")
        return line.startswith(("EVENT ", "STATUS "))

    def _read(self):
        buffer = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n" in buffer:
                    raw, buffer = buffer.split(b"\r\n", 1)
                    line = raw.decode("utf-8")
                    if self._is_note(line):
                        with self._cond:
                            self.notes.append((time.monotonic(), line))
                            self._cond.notify_all()
                    else:
                        self._replies.put(line)
        except OSError:
            pass
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()

    def command(self, text, timeout=10.0):
        """Send a command; its reply lines (items, then the OK/ERR line)."""
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        lines = []
        while True:
            lines.append(self._replies.get(timeout=timeout))
            if lines[-1].startswith(("OK", "ERR", "CTINOTIFY/")):
                return lines

    def calls(self):
        """CALLS: the calls in progress, as dicts (text items parsed)."""
        *items, done = self.command("CALLS")
        assert done.startswith("OK calls="), done
        return [self.parse(line) for line in items]

    def parse(self, line):
        """A notification line as a dict: JSON as it is; text flattened (from_num ...)."""
        if line.startswith("{"):
            return json.loads(line)
        tag, kind, fields = ctinotify.parse_text_line(line)
        fields["event"] = kind or tag.lower()
        return fields

    def take(self):
        """The notification lines received since the last take()."""
        with self._cond:
            lines = [line for _, line in self.notes[self.taken:]]
            self.taken = len(self.notes)
        return lines

    def wait_note(self, predicate, timeout=30.0):
        """The first notification not taken yet (parsed) for which predicate holds; it and
        those before it count as taken."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self.taken < len(self.notes):
                    note = self.parse(self.notes[self.taken][1])
                    self.taken += 1
                    if predicate(note):
                        return note
                remaining = deadline - time.monotonic()
                assert remaining > 0 and not self.closed.is_set(), \
                    "%s: no such notification; got %s" % (self.user, [l for _, l in self.notes])
                self._cond.wait(remaining)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


USERS = ("alice", "bob", "carol", "dave")


class Office:
    """A daemon with each office user logged in twice, in text and in JSON."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.json = {u: Client(daemon.port, u, fmt="json") for u in USERS}
        self.text = {u: Client(daemon.port, u, fmt="text") for u in USERS}

    def clients(self):
        return list(self.json.values()) + list(self.text.values())

    def take(self):
        """{user: [events]} received since the last take (status lines left out). The text
        client must have received each event exactly as the JSON one, written as text."""
        got = {}
        for user in USERS:
            events = [e for e in map(self.json[user].parse, self.json[user].take())
                      if e["event"] != "status"]
            text = [line for line in self.text[user].take() if line.startswith("EVENT ")]
            want = [ctinotify.encode_notification(e, "text").decode().rstrip("\r\n")
                    for e in events]
            assert text == want, "%s: the text client differs from the JSON one" % user
            if events:
                got[user] = events
        return got

    def settle_and_take(self, timeout=30.0):
        settle(self.clients(), timeout)
        return self.take()

    def close(self):
        for c in self.clients():
            c.close()


def settle(clients, timeout=30.0):
    """Until no client has a call in progress, and all that came before has arrived
    (PING's reply comes after every notification queued before it)."""
    deadline = time.monotonic() + timeout
    for client in clients:
        while client.calls():
            assert time.monotonic() < deadline, "%s still has calls: %s" % (client.user, client.calls())
            time.sleep(0.2)
    for client in clients:
        assert client.command("PING") == ["OK PONG"]


# ---------------------------------------------------------------------------
# Comparing notifications with the golden files
# ---------------------------------------------------------------------------

#: What may differ between two runs of the same call flow: clock readings, and the
#: ids Asterisk gives out (``call`` is replaced by the call's order of appearance).
VOLATILE_FIELDS = ("time", "duration", "talk_time", "client")


def normalise(events):
    """One user's notifications (dicts) in order, with the volatile fields dropped and
    each call id replaced by ``#1``, ``#2`` ... in the order the calls first appear."""
    labels = {}
    out = []
    for event in events:
        event = {k: v for k, v in event.items() if k not in VOLATILE_FIELDS}
        if "call" in event:
            event["call"] = labels.setdefault(event["call"], "#%d" % (len(labels) + 1))
        out.append(event)
    return out


def by_user(events):
    """{user: [events]} from golden lines (with ``client``)."""
    users = {}
    for event in events:
        users.setdefault(event["client"], []).append(event)
    return users


def load_golden(name):
    with open(os.path.join(GOLDEN, name + ".jsonl"), encoding="utf-8") as f:
        return by_user(json.loads(line) for line in f if line.strip())


def per_call(events):
    """A user's normalised events as a sorted list of calls (each its own events, in order):
    for comparing flows whose calls overlap at random."""
    calls = {}
    for event in events:
        event = dict(event)
        calls.setdefault(event.pop("call", None), []).append(event)
    return sorted(json.dumps(c, sort_keys=True) for c in calls.values())


def differences(want, got, order_free=False):
    """Lines saying how two {user: [events]} differ after normalising; [] when they agree."""
    lines = []
    for user in sorted(set(want) | set(got)):
        a, b = normalise(want.get(user, [])), normalise(got.get(user, []))
        if order_free:
            a, b = per_call(a), per_call(b)
        if a == b:
            continue
        lines.append("%s: golden %d events, live %d" % (user, len(a), len(b)))
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x != y:
                lines.append("  [%d] golden %s" % (i, json.dumps(x, sort_keys=True)))
                lines.append("  [%d] live   %s" % (i, json.dumps(y, sort_keys=True)))
    return lines


def replay(trace, users_text=None):
    """What ``ctinotify.py replay`` gives for a trace, as {user: [events]}: run on the live
    recording, it tells an engine difference from a daemon (I/O, resync) difference."""
    workdir = tempfile.mkdtemp(prefix="ctinotify-replay-")
    try:
        conf = os.path.join(workdir, "office.conf")
        with open(conf, "w") as f:
            f.write(users_text if users_text is not None else office_users())
        out = subprocess.run([sys.executable, os.path.join(REPO, "ctinotify.py"), "replay", trace,
                              "-c", conf], stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return by_user(json.loads(line) for line in out.stdout.splitlines() if line.strip())


# ---------------------------------------------------------------------------
# A relay between ctinotify and the AMI that a test can cut
# ---------------------------------------------------------------------------

class AmiProxy:
    """Listens on 127.0.0.1 (port 0) and relays to Asterisk's AMI. ``cut()`` closes every
    relayed connection and makes new ones close at once (as when a link drops and the
    PBX is unreachable) until ``restore()``; Asterisk itself and its calls go on."""

    def __init__(self, target_port=AMI_PORT, record_dir=None):
        """record_dir: each relayed connection's traffic goes to ami-N.ami there (what
        Asterisk sent, a trace for ``ctinotify.py replay``) and ami-N.ami.sent (the rest)."""
        self.target_port = target_port
        self.record_dir = record_dir
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.connections = 0
        self._pairs = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                inner, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if not self.up:
                    inner.close()
                    continue
                try:
                    outer = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                except OSError:
                    inner.close()
                    continue
                outer.settimeout(None)
                self.connections += 1
                self._pairs.append((inner, outer))
            for a, b, suffix in ((inner, outer, ".ami.sent"), (outer, inner, ".ami")):
                record = None
                if self.record_dir:
                    name = "ami-%d%s" % (self.connections, suffix)
                    record = open(os.path.join(self.record_dir, name), "wb")
                threading.Thread(target=self._pump, args=(a, b, record), daemon=True).start()

    @staticmethod
    def _pump(src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    record.write(data)
                    record.flush()
                dst.sendall(data)
        except OSError:
            pass
        if record:
            record.close()
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self._lock:
            self.up = False
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def restore(self):
        with self._lock:
            self.up = True

    def close(self):
        self.cut()
        self.listener.close()


def main(argv):
    if argv[1:] == ["preflight"]:
        try:
            preflight()
        except LabUnavailable as e:
            print("make test-live: %s" % e, file=sys.stderr)
            return 2
        return 0
    print("usage: livelab.py preflight", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
