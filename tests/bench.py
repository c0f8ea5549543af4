#!/usr/bin/env python3
"""ctinotify benchmark (issue 5): ``make bench``, or ``make bench QUICK=1``.

Measures, in one run on this machine, and prints one table:

1. parse + engine throughput (AmiParser + CallEngine, no sockets) on two
   big traces, beside a naive reference parser, and ``ctinotify.py replay``;
2. fan-out: the daemon as a process, a fake Asterisk pushing a big trace,
   logged-in clients on loopback: events/s end to end, and the delay from
   the AMI byte leaving the fake server to a client receiving the event at
   a fixed AMI rate;
3. scale of connections: daemon RSS idle, with 1,000 and 10,000 clients,
   and its CPU time per AMI event with 100 vs 10,000 clients connected;
4. bounded memory: daemon RSS after the big trace once and ten times;
5. the office board (issue 13): a state change reaching 100 board
   watchers, in process and through the daemon's sockets;
6. browsers on ``GET /events`` (issue 11): the delay of section 2 over
   Server-Sent Events to 1,000 event streams, the daemon's RSS with 10,000
   idle streams, and its CPU per AMI event with 1,000 streams open vs none.

The big traces are built in ``bench-data/`` from the recorded ones: copies
back to back, each *uniquified* (Uniqueid/Linkedid/bridge ids and channel
sequence numbers rewritten per copy) so that no two copies collide.

Benchmark figures, not tests: nothing here asserts a time.  Standard
library only; all clients and the fake Asterisk share one selectors loop.
"""

import argparse
import base64
import collections
import gc
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import ctinotify  # noqa: E402
from fakeami import BANNER, trace_events  # noqa: E402

DATA_DIR = os.path.join(ROOT, "bench-data")
TRACES = os.path.join(HERE, "traces")
OFFICE_CONF = os.path.join(HERE, "office.conf")
CTINOTIFY = os.path.join(ROOT, "ctinotify.py")

#: What a full run measures, and the smaller QUICK=1 run.
SETTINGS = {
    "full": {"min_events": 200000, "repeats": 5, "clients": 1000, "few_clients": 100,
             "many_clients": 10000, "paced_rate": 2000, "paced_s": 20.0, "rounds": 10,
             "board_changes": 30000, "board_socket_changes": 4000, "board_rate": 200,
             "streams": 1000, "many_streams": 10000},
    "quick": {"min_events": 40000, "repeats": 1, "clients": 200, "few_clients": 100,
              "many_clients": 2000, "paced_rate": 2000, "paced_s": 5.0, "rounds": 3,
              "board_changes": 3000, "board_socket_changes": 600, "board_rate": 200,
              "streams": 200, "many_streams": 2000},
}
#: Feed size for the in-process parsers: what ``replay`` reads at a time.
CHUNK_BYTES = 1 << 16
#: The phones of tests/office.conf; the fan-out trace spreads their
#: channels over one device per client.
OFFICE_PHONES = ("PJSIP/100", "PJSIP/101", "PJSIP/102", "PJSIP/103")
#: Uniquified epochs start here (2026-11-26, like t_load) ...
EPOCH_BASE = 1795727900
#: ... and copy n is moved n * EPOCH_STRIDE_S seconds later.
EPOCH_STRIDE_S = 3600
#: Channel sequence numbers of copy n get n << 20 added (8 hex digits hold
#: MAX_COPIES copies of a recording with fewer than 2**20 channels).
SEQ_SHIFT = 20
MAX_COPIES = 1 << (32 - SEQ_SHIFT)
#: The ids whose values identify a channel or a call (every Uniqueid and
#: Linkedid field: Dest..., LocalOne..., Transferee..., Bridge...).
_ID_LINE = re.compile(rb"(?m)^(?:[A-Za-z]*(?:Uniqueid|Linkedid)): ([^\r\n]*)\r$")
#: A channel name with its sequence number: ``PJSIP/100-0000001a``,
#: ``Local/600@from-internal-00000003;1``, in any field or variable value.
_CHANNEL = re.compile(rb"\b([A-Za-z][A-Za-z0-9]*/[^\s,;/]*?)-([0-9a-f]{8})(?![0-9A-Za-z])")
_EPOCH_ID = re.compile(rb"^(.*?)(\d{9,11})\.(\d+)$")
_UUID_ID = re.compile(rb"^[0-9a-f]{8}(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


# ---------------------------------------------------------------------------
# Big traces: uniquified copies of recorded traces, back to back
# ---------------------------------------------------------------------------


class TraceTemplate:
    """The events of one recorded trace, cut into literal bytes and the
    places that must differ per copy, so ``render(n)`` is a fast join.

    Copy ``n`` gets its Uniqueid/Linkedid epochs moved ``n`` hours on (the
    engine keys channels by Uniqueid, and replay takes its clock from it),
    bridge UUIDs whose first group is ``n``, and channel sequence numbers
    plus ``n << 20``.  Everything else, CRLFs included, is byte for byte
    the recording.
    """

    def __init__(self, path):
        with open(path, "rb") as f:
            raw = f.read()
        self.name = os.path.basename(path)
        self.banner, self.login_response, self.goodbye = _framing(raw)
        events = trace_events(raw)
        self.events = len(events)
        text = b"".join(events)
        epochs = [int(m.group(2)) for m in map(_EPOCH_ID.match, _ID_LINE.findall(text)) if m]
        first_epoch = min(epochs) if epochs else EPOCH_BASE
        if epochs and max(epochs) - first_epoch >= EPOCH_STRIDE_S:
            raise ValueError("%s spans more than %d s" % (path, EPOCH_STRIDE_S))
        self.pieces = []   # bytes, or a tuple describing what to rewrite
        pos = 0
        spans = [(m.start(1), m.end(1), "id") for m in _ID_LINE.finditer(text)]
        spans += [(m.start(), m.end(), "chan") for m in _CHANNEL.finditer(text)]
        spans.sort()
        for start, end, kind in spans:
            if start < pos:
                continue  # a channel-looking string inside an id value
            self.pieces.append(text[pos:start])
            value = text[start:end]
            if kind == "chan":
                name, seq = _CHANNEL.match(value).groups()
                if int(seq, 16) >> SEQ_SHIFT:
                    raise ValueError("%s: channel sequence %s too big" % (path, seq))
                self.pieces.append(("chan", name.decode(), int(seq, 16)))
            else:
                epoch = _EPOCH_ID.match(value)
                uuid = _UUID_ID.match(value)
                if epoch:
                    self.pieces.append(("epoch", epoch.group(1).decode(),
                                        int(epoch.group(2)) - first_epoch + EPOCH_BASE,
                                        epoch.group(3).decode()))
                elif uuid:
                    self.pieces.append(("uuid", uuid.group(1).decode()))
                else:
                    raise ValueError("%s: cannot uniquify id %r" % (path, value))
            pos = end
        self.pieces.append(text[pos:])

    def render(self, n, phones=None):
        """Copy ``n`` of the events, as wire bytes.  ``phones``: the number
        of devices to spread the office phones' channels over (fan-out)."""
        if not 0 <= n < MAX_COPIES:
            raise ValueError("copy %d: at most %d copies" % (n, MAX_COPIES))
        out = []
        append = out.append
        epoch_shift = n * EPOCH_STRIDE_S
        seq_shift = n << SEQ_SHIFT
        for piece in self.pieces:
            if piece.__class__ is bytes:
                append(piece)
                continue
            kind = piece[0]
            if kind == "chan":
                name, seq = piece[1], piece[2] + seq_shift
                if phones and name in OFFICE_PHONES:
                    name = phone_device(seq, phones)
                append(("%s-%08x" % (name, seq)).encode())
            elif kind == "epoch":
                append(("%s%d.%s" % (piece[1], piece[2] + epoch_shift, piece[3])).encode())
            else:
                append(("%08x%s" % (n, piece[1])).encode())
        return b"".join(out)


def phone_device(seq, phones):
    """The device a phone channel of the fan-out trace is moved to: spread
    evenly (Knuth's multiplicative hash of its unique sequence number)."""
    return "PJSIP/p%04d" % ((seq * 2654435761 & 0xFFFFFFFF) % phones)


def _framing(raw):
    """A recording's banner line, login response and final Goodbye."""
    banner, _, rest = raw.partition(b"\r\n")
    if not banner.startswith(b"Asterisk Call Manager/"):
        banner, rest = BANNER[:-2], raw
    blocks = rest.split(b"\r\n\r\n")
    login = blocks[0] + b"\r\n\r\n" if blocks[0].startswith(b"Response:") else b""
    goodbye = [b + b"\r\n\r\n" for b in blocks if b.startswith(b"Response: Goodbye")]
    return banner + b"\r\n", login, goodbye[-1] if goodbye else b""


class BigTrace:
    """Copies of one or more templates, back to back, enough for
    ``min_events``; each template's copy is a unit with its own number."""

    def __init__(self, templates, min_events, phones=None):
        self.templates = templates
        per_round = sum(t.events for t in templates)
        self.copies = -(-min_events // per_round)
        self.events = self.copies * per_round
        self.phones = phones

    def units(self, round_=0):
        """(template, unit number) in stream order; round r continues the
        numbering, so every round is new to the engine."""
        n = round_ * self.copies * len(self.templates)
        for _copy in range(self.copies):
            for template in self.templates:
                yield template, n
                n += 1

    def event_bytes(self, round_=0):
        return b"".join(t.render(n, self.phones) for t, n in self.units(round_))

    def write(self, path):
        """The whole trace as a recording: banner once, the login response,
        every copy's events, the Goodbye."""
        first = self.templates[0]
        with open(path, "wb") as f:
            f.write(first.banner + first.login_response)
            for template, n in self.units():
                f.write(template.render(n, self.phones))
            f.write(first.goodbye)


def cached_trace(name, trace, sources):
    """Write ``bench-data/NAME`` unless an identical one is there already."""
    digest = hashlib.sha256()
    for path in sources + [os.path.abspath(__file__)]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(repr((trace.copies, trace.phones)).encode())
    path = os.path.join(DATA_DIR, name)
    stamp = path + ".sha256"
    if os.path.exists(path) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest.hexdigest():
                return path
    os.makedirs(DATA_DIR, exist_ok=True)
    trace.write(path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(stamp, "w") as f:
        f.write(digest.hexdigest() + "\n")
    return path


# ---------------------------------------------------------------------------
# Parse + engine throughput, in this process
# ---------------------------------------------------------------------------


def read_chunks(path):
    with open(path, "rb") as f:
        data = f.read()
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]


def naive_parse(chunks):
    """The reference: split messages on the blank line, each line once on
    ': ' into a dict of str.  No engine, no limits, no bare-LF support."""
    count = 0
    pending = b""
    first = True
    for chunk in chunks:
        blocks = (pending + chunk).split(b"\r\n\r\n")
        pending = blocks.pop()
        for block in blocks:
            text = block.decode("utf-8", "replace")
            if first:
                text = text.split("\r\n", 1)[1]  # the banner line
                first = False
            msg = {}
            for line in text.split("\r\n"):
                key, _, value = line.partition(": ")
                msg[key] = value
            count += 1
    return count


def parse_and_engine(chunks, users):
    """What the daemon does per AMI read, minus the sockets: the messages
    of one read share its time."""
    parser = ctinotify.AmiParser()
    engine = ctinotify.CallEngine(ctinotify.Directory(users))
    clock = time.time
    count = 0
    for chunk in chunks:
        now = clock()
        for msg in parser.feed(chunk):
            engine.handle(msg, now)
            count += 1
    return count


def best_replay_time(path, repeats):
    best = None
    with open(os.devnull, "wb") as devnull:
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, CTINOTIFY, "replay", path, "-c", OFFICE_CONF],
                           stdout=devnull, check=True)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
    return best


# ---------------------------------------------------------------------------
# The daemon as a process
# ---------------------------------------------------------------------------

#: Descriptors for 10,000 clients on each side, plus some to spare.
WANTED_FDS = 12000


def raise_fd_limit():
    """Raise RLIMIT_NOFILE towards WANTED_FDS (here and in the daemon)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANTED_FDS if hard == resource.RLIM_INFINITY else min(WANTED_FDS, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def users_config(users):
    """``[name]`` sections for (name, devices, extensions) triples; a
    fourth item is more lines of the section (a board)."""
    out = []
    for name, devices, extensions, *more in users:
        out.append("[%s]\nsecret = bench\ndevices = %s\n" % (name, devices))
        if extensions:
            out.append("extensions = %s\n" % extensions)
        out.extend(more)
    return "".join(out)


OFFICE_USERS = [("alice", "PJSIP/100", "100"), ("bob", "PJSIP/101", "101"),
                ("carol", "PJSIP/102", "102"), ("dave", "PJSIP/103", "103")]


class DaemonProcess:
    """``ctinotify.py run`` with a generated config, its log in bench-data/."""

    #: Run under cProfile, writing bench-data/NAME.prof (``--profile``).
    profile = False

    def __init__(self, name, ami_port, users):
        self.config = os.path.join(DATA_DIR, name + ".conf")
        self.log = os.path.join(DATA_DIR, name + ".log")
        python = [sys.executable]
        if self.profile:
            python += ["-m", "cProfile", "-o", os.path.join(DATA_DIR, name + ".prof")]
        with open(self.config, "w") as f:
            f.write("[general]\nbind = 127.0.0.1\nport = 0\nweb_port = 0\nlogin_timeout = 60\n"
                    # Every bench client comes from 127.0.0.1: lift the limits.
                    "max_clients = 100000\nmax_clients_per_host = 100000\n"
                    "login_block_after = 0\n\n"
                    "[ami]\nhost = 127.0.0.1\nport = %d\nusername = bench\nsecret = bench\n\n%s"
                    % (ami_port, users_config(users)))
        os.chmod(self.config, 0o600)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                python + [CTINOTIFY, "run", "-c", self.config],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=raise_fd_limit)
        found = self.wait_log(r"listening for clients on \S+ port (\d+)")
        self.port = int(found.group(1))
        found = self.wait_log(r"listening for web browsers on \S+ port (\d+)")
        self.web_port = int(found.group(1))

    def wait_log(self, pattern, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, errors="replace") as f:
                found = re.search(pattern, f.read())
            if found:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon: no %r in %s" % (pattern, self.log))
            time.sleep(0.02)

    def rss_mb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            kb = re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)
        return int(kb) / 1024.0

    def cpu_s(self):
        """User + system CPU seconds the daemon has used."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# One selectors loop: the fake Asterisk and every client
# ---------------------------------------------------------------------------


class Loop:
    """A selectors loop: each socket is registered with its handler,
    ``handler(mask)``; tickers have ``next_due()`` and ``tick(now)``."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.tickers = []

    def run(self, done, timeout, what):
        """Serve until ``done()``; RuntimeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            now = time.perf_counter()
            wait = 0.05
            for ticker in self.tickers:
                due = ticker.next_due()
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
            for key, mask in self.selector.select(wait):
                key.data(mask)
            now = time.perf_counter()
            for ticker in self.tickers:
                ticker.tick(now)
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for %s" % what)


#: The board's list actions, lower case -> the event that ends the list.
BOARD_LISTS = {action.lower(): end for action, end in ctinotify.BOARD_LIST_ACTIONS}


class AmiFeeder:
    """A fake Asterisk for one daemon at a time: the banner, Login, Ping,
    and whatever the benchmark pushes (``fakeami.FakeAsterisk`` runs its
    own thread; here everything shares the benchmark's one loop).
    ``sent_at[i]`` is when the kernel took the last byte of paced event i."""

    def __init__(self, loop):
        self.loop = loop
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        loop.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        loop.tickers.append(self)
        self.sock = None
        self._reset()

    def _reset(self):
        self.parser = ctinotify.AmiParser(expect_banner=False)
        self.outbuf = bytearray()
        self.logged_in = False
        self.sent_total = 0     # bytes the kernel took on this connection
        self.queued_total = 0   # bytes ever put into outbuf
        self.marks = collections.deque()  # (end offset in the stream, event index)
        self.sent_at = {}
        self.paced = None       # (events, first, stop, rate, start time)
        self.next_paced = 0

    def close(self):
        if self.sock is not None:
            self.loop.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def _on_accept(self, mask):
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.close()  # a new daemon: the benchmark runs one at a time
        self._reset()
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.selector.register(sock, selectors.EVENT_READ, self._on_peer)
        self._queue(BANNER)
        self._flush()

    def _on_peer(self, mask):
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                self.close()
                return
            for msg in self.parser.feed(data or b""):
                self._on_action(msg)
        self._flush()

    def _on_action(self, msg):
        action = msg.get("Action", "").lower()
        head = "Response: %%s\r\nActionID: %s\r\n" % msg.get("ActionID", "")
        if action == "login":
            ok = msg.get("Username") == "bench" and msg.get("Secret") == "bench"
            self._queue(((head % ("Success" if ok else "Error"))
                         + "Message: Authentication %s\r\n\r\n" % ("accepted" if ok else "failed")
                         + "Event: FullyBooted\r\nPrivilege: system,all\r\n"
                         "Status: Fully Booted\r\n\r\n").encode())
            self.logged_in = ok
        elif action == "ping":
            self._queue(((head % "Success") + "Ping: Pong\r\n\r\n").encode())
        elif action in BOARD_LISTS:
            # The office board's lists after a login: empty, every phone idle.
            self._queue(((head % "Success") + "EventList: start\r\n\r\nEvent: %s\r\n"
                         "ActionID: %s\r\nEventList: Complete\r\nListItems: 0\r\n\r\n"
                         % (BOARD_LISTS[action], msg.get("ActionID", ""))).encode())
        else:
            self._queue(((head % "Error") + "Message: Invalid/unknown command\r\n\r\n").encode())

    def _queue(self, data, index=None):
        self.outbuf += data
        self.queued_total += len(data)
        if index is not None:
            self.marks.append((self.queued_total, index))

    def _flush(self):
        if self.sock is None:
            return
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                sent = 0
            del self.outbuf[:sent]
            self.sent_total += sent
            if self.marks and self.marks[0][0] <= self.sent_total:
                now = time.perf_counter()
                while self.marks and self.marks[0][0] <= self.sent_total:
                    self.sent_at[self.marks.popleft()[1]] = now
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.loop.selector.modify(self.sock, events, self._on_peer)

    def push(self, data):
        """All at once: the daemon reads it as fast as it can."""
        self._queue(data)
        self._flush()

    def pace(self, events, first, stop, rate):
        """Send events[first:stop], ``rate`` per second, each marked."""
        self.paced = (events, first, stop, rate, time.perf_counter())
        self.next_paced = first

    def pacing(self):
        return self.paced is not None

    def drained(self):
        return not self.outbuf

    def next_due(self):
        if self.paced is None:
            return None
        _events, first, _stop, rate, start = self.paced
        return start + (self.next_paced - first) / rate

    def tick(self, now):
        if self.paced is None:
            return
        events, first, stop, rate, start = self.paced
        due = min(stop, first + int((now - start) * rate) + 1)
        if self.next_paced < due:
            for index in range(self.next_paced, due):
                self._queue(events[index], index)
            self.next_paced = due
            self._flush()
        if self.next_paced >= stop:
            self.paced = None


class Client:
    """One desktop client: connect, LOGIN, then read EVENT lines."""

    __slots__ = ("swarm", "sock", "user", "inbuf", "ready")

    def __init__(self, swarm, user):
        self.swarm = swarm
        self.user = user
        self.inbuf = b""
        self.ready = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", swarm.port))
        swarm.loop.selector.register(self.sock, selectors.EVENT_WRITE, self.on_connected)

    def on_connected(self, mask):
        swarm = self.swarm
        swarm.connecting -= 1
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise RuntimeError("client %s: connect: %s" % (self.user, os.strerror(err)))
        self.sock.send(("LOGIN %s bench\r\n" % self.user).encode())
        swarm.loop.selector.modify(self.sock, selectors.EVENT_READ, self.on_readable)

    def on_readable(self, mask):
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            data = b""
        now = time.perf_counter()
        if not data:
            self.swarm.lost(self)
            return
        lines = (self.inbuf + data).split(b"\r\n")
        self.inbuf = lines.pop()
        for line in lines:
            if line.startswith(b"EVENT "):
                self.swarm.on_event(self.user, line.decode("utf-8"), now)
            elif line.startswith(b"STATUS pbx=") and not self.ready:
                self.ready = True  # LOGIN done: OK, then the link status
                self.swarm.ready += 1
            elif line.startswith(b"ERR"):
                raise RuntimeError("client %s: %s" % (self.user, line.decode()))

    def close(self):
        self.swarm.loop.selector.unregister(self.sock)
        self.sock.close()


class Browser:
    """One browser on the event stream: ``GET /events`` with Basic auth (as
    ``curl -N -u``), then Server-Sent Events frames.  The same interface as
    Client: its swarm counts it ready at the stream's first status event."""

    __slots__ = ("swarm", "sock", "user", "inbuf", "ready")

    def __init__(self, swarm, user):
        self.swarm = swarm
        self.user = user
        self.inbuf = b""
        self.ready = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", swarm.port))
        swarm.loop.selector.register(self.sock, selectors.EVENT_WRITE, self.on_connected)

    def on_connected(self, mask):
        swarm = self.swarm
        swarm.connecting -= 1
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise RuntimeError("browser %s: connect: %s" % (self.user, os.strerror(err)))
        auth = base64.b64encode(("%s:bench" % self.user).encode()).decode()
        self.sock.send(("GET /events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Basic "
                        "%s\r\nAccept: text/event-stream\r\n\r\n" % (swarm.port, auth)).encode())
        swarm.loop.selector.modify(self.sock, selectors.EVENT_READ, self.on_readable)

    def on_readable(self, mask):
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            data = b""
        now = time.perf_counter()
        if not data:
            self.swarm.lost(self)
            return
        frames = (self.inbuf + data).split(b"\n\n")
        self.inbuf = frames.pop()
        for frame in frames:
            if frame.startswith(b"id: "):
                self.swarm.on_event(self.user, frame, now)
            elif frame.startswith(b"data: {\"event\":\"status\"") and not self.ready:
                self.ready = True
                self.swarm.ready += 1
            elif frame.startswith(b"HTTP/") and not frame.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError("browser %s: %s" % (self.user, frame.split(b"\r\n")[0]))

    def close(self):
        self.swarm.loop.selector.unregister(self.sock)
        self.sock.close()


class ClientSwarm:
    """Many clients (or browsers: ``kind``), connected a few hundred at a
    time (the daemon's listen backlog is 128), all driven by the
    benchmark's loop."""

    MAX_CONNECTING = 100

    def __init__(self, loop, port, kind=None):
        self.loop = loop
        self.port = port
        self.kind = kind or Client
        self.clients = []
        self.waiting = collections.deque()
        self.connecting = 0
        self.ready = 0
        self.lost_count = 0
        self.received = 0
        #: (user, kind, call id) -> receive times, when latency is tracked.
        self.arrivals = None
        loop.tickers.append(self)

    def connect(self, users, timeout=300.0):
        """Log in one client per name in ``users``; return once all are."""
        target = self.ready + len(users)
        self.waiting.extend(users)
        self.loop.run(lambda: self.ready >= target, timeout, "%d client logins" % target)

    def next_due(self):
        return time.perf_counter() if self.waiting and self.connecting < self.MAX_CONNECTING \
            else None

    def tick(self, now):
        while self.waiting and self.connecting < self.MAX_CONNECTING:
            self.clients.append(self.kind(self, self.waiting.popleft()))
            self.connecting += 1

    def on_event(self, user, line, now):
        self.received += 1
        if self.arrivals is not None:
            kind, call = event_key(line)
            self.arrivals.append((user, kind, call, now))

    def lost(self, client):
        self.lost_count += 1
        client.close()
        self.clients.remove(client)

    def close(self):
        for client in self.clients:
            client.close()
        self.clients = []


def event_key(line):
    """(kind, call id) of an ``EVENT <kind> call=<id> ...`` line, or of an
    SSE frame (bytes: ``id: ...`` then ``data: {JSON}``)."""
    if isinstance(line, bytes):
        fields = json.loads(line.split(b"\ndata: ", 1)[1])
        return fields["event"], fields["call"]
    _tag, kind, call = line.split(" ", 3)[:3]
    if call.startswith("call=") and not call.startswith('call="'):
        return kind, call[5:]
    return kind, ctinotify.parse_text_line(line)[2]["call"]


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------


def split_events(data):
    """Wire bytes of back-to-back events -> one bytes per event."""
    return [block + b"\r\n\r\n" for block in data.split(b"\r\n\r\n")[:-1]]


def office_users():
    return list(ctinotify.load_config(OFFICE_CONF, require_ami=False).users.values())


def measure_throughput(traces, settings):
    """{trace name: figures} for parse + engine, naive and replay."""
    users = office_users()
    results = {}
    for name, path, events, _built in traces:
        chunks = read_chunks(path)
        best = {"naive": None, "ours": None}
        for _ in range(settings["repeats"]):
            for key, func, args in (("naive", naive_parse, (chunks,)),
                                    ("ours", parse_and_engine, (chunks, users))):
                gc.collect()
                start = time.perf_counter()
                count = func(*args)
                elapsed = time.perf_counter() - start
                if best[key] is None or elapsed < best[key]:
                    best[key] = elapsed
        replay_s = best_replay_time(path, max(1, settings["repeats"] - 1))
        results[name] = {"messages": count, "events": events,
                         "naive": count / best["naive"], "ours": count / best["ours"],
                         "replay_s": replay_s, "replay": count / replay_s}
        del chunks
    return results


def expected_notifications(events, users, rate=2000.0):
    """(user, kind, call id) -> indexes of the events that cause it, in
    order: the same parser and engine as the daemon, offline, with a clock
    that moves as if the events came at ``rate`` per second."""
    parser = ctinotify.AmiParser(expect_banner=False)
    engine = ctinotify.CallEngine(ctinotify.Directory(users))
    expected = collections.defaultdict(collections.deque)
    messages = parser.feed(b"".join(events))
    if len(messages) != len(events):
        raise RuntimeError("%d events made %d messages" % (len(events), len(messages)))
    for index, msg in enumerate(messages):
        for note in engine.handle(msg, index / rate):
            expected[(note.user, note.kind, note.fields["call"])].append(index)
    return expected


def wait_idle(loop, daemon, settle_s=0.3):
    """Serve the loop until the daemon has used no CPU for ``settle_s``."""
    while True:
        before = daemon.cpu_s()
        until = time.monotonic() + settle_s
        loop.run(lambda: time.monotonic() >= until, settle_s + 5, "a quiet daemon")
        if daemon.cpu_s() == before:
            return


def start_daemon(loop, feeder, name, users):
    daemon = DaemonProcess(name, feeder.port, users)
    loop.run(lambda: feeder.logged_in, 20, "the daemon's AMI login")
    wait_idle(loop, daemon)
    return daemon


def measure_fanout(loop, feeder, template, settings, browsers=False):
    """1,000 clients, one phone each; the trace's phones spread over them.
    ``browsers``: each an event stream on the web port instead."""
    clients = settings["streams" if browsers else "clients"]
    trace = BigTrace([template], settings["min_events"], phones=clients)
    events = split_events(trace.event_bytes())
    users = [("p%04d" % i, "PJSIP/p%04d" % i, "") for i in range(clients)]
    daemon = start_daemon(loop, feeder, "bench-%s" % ("sse" if browsers else "fanout"), users)
    try:
        expected = expected_notifications(
            events, ctinotify.load_config(daemon.config).users.values(), settings["paced_rate"])
        total = sum(len(v) for v in expected.values())
        swarm = ClientSwarm(loop, daemon.web_port, Browser) if browsers else \
            ClientSwarm(loop, daemon.port)
        swarm.connect([name for name, _, _ in users])
        wait_idle(loop, daemon)
        # Fixed rate: the delay of every event a client receives.
        rate = settings["paced_rate"]
        stop = min(len(events) // 2, int(rate * settings["paced_s"]))
        in_paced = sum(1 for v in expected.values() for i in v if i < stop)
        swarm.arrivals = []
        feeder.pace(events, 0, stop, rate)
        loop.run(lambda: not feeder.pacing() and swarm.received >= in_paced,
                 settings["paced_s"] * 3 + 30, "the paced events")
        delays = []
        for user, kind, call, arrived in swarm.arrivals:
            causes = expected.get((user, kind, call))
            if not causes:
                raise RuntimeError("%s got %s %s, which the offline engine did not give"
                                   % (user, kind, call))
            delays.append(arrived - feeder.sent_at[causes.popleft()])
        swarm.arrivals = None
        wait_idle(loop, daemon)
        # As fast as the daemon reads: the rest of the trace.
        first = swarm.received
        last = [time.perf_counter()]
        on_event = swarm.on_event

        def timed(user, line, now):
            on_event(user, line, now)
            last[0] = now
        swarm.on_event = timed
        start = time.perf_counter()
        feeder.push(b"".join(events[stop:]))
        loop.run(lambda: swarm.received >= total, 300, "all %d notifications" % total)
        elapsed = last[0] - start
        delays.sort()
        result = {
            "clients": clients, "events": len(events), "paced_events": stop, "rate": rate,
            "delay_n": len(delays), "delay_median_ms": 1000 * delays[len(delays) // 2],
            "delay_p99_ms": 1000 * delays[min(len(delays) - 1, int(len(delays) * 0.99))],
            "full_events": len(events) - stop, "full_s": elapsed,
            "full_events_per_s": (len(events) - stop) / elapsed,
            "full_notes_per_s": (total - first) / elapsed, "lost": swarm.lost_count,
        }
        swarm.close()
        return result
    finally:
        daemon.stop()


def push_round(loop, feeder, daemon, swarm, data, notifications):
    """Push one round; (daemon CPU s, wall s) until it is all delivered."""
    target = swarm.received + notifications
    cpu = daemon.cpu_s()
    start = time.perf_counter()
    feeder.push(data)
    loop.run(lambda: swarm.received >= target, 300, "%d notifications" % target)
    wall = time.perf_counter() - start
    wait_idle(loop, daemon)
    return daemon.cpu_s() - cpu, wall


def measure_scale(loop, feeder, template, settings):
    """RSS idle, with 1,000 and 10,000 clients; CPU per AMI event with few
    and with many clients connected, only the office's four subscribed to
    the busy phones (the others are users whose phones never ring)."""
    many, few = settings["many_clients"], settings["few_clients"]
    trace = BigTrace([template], settings["min_events"])
    idle = [("i%05d" % i, "PJSIP/i%05d" % i, "") for i in range(many - len(OFFICE_USERS))]
    daemon = start_daemon(loop, feeder, "bench-scale", OFFICE_USERS + idle)
    try:
        result = {"rss_idle": daemon.rss_mb(), "events": trace.events, "few": few, "many": many}
        notes = sum(len(v) for v in expected_notifications(
            split_events(trace.event_bytes(0)), office_users()).values())
        swarm = ClientSwarm(loop, daemon.port)
        names = [name for name, _, _ in OFFICE_USERS + idle]
        swarm.connect(names[:few])
        push_round(loop, feeder, daemon, swarm, trace.event_bytes(0), notes)  # warm-up
        result["cpu_few"], result["wall_few"] = push_round(
            loop, feeder, daemon, swarm, trace.event_bytes(1), notes)
        swarm.connect(names[few:settings["clients"]])
        wait_idle(loop, daemon)
        result["rss_clients"] = (settings["clients"], daemon.rss_mb())
        swarm.connect(names[settings["clients"]:many])
        wait_idle(loop, daemon)
        result["rss_many"] = daemon.rss_mb()
        result["cpu_many"], result["wall_many"] = push_round(
            loop, feeder, daemon, swarm, trace.event_bytes(2), notes)
        result["rss_many_after"] = daemon.rss_mb()
        result["lost"] = swarm.lost_count
        swarm.close()
        return result
    finally:
        daemon.stop()


def measure_streams(loop, feeder, template, settings):
    """Event streams that stay open: the daemon's CPU per AMI event with
    the office's four line clients and no stream, then with 1,000 streams
    open (the office users' four among them, the others idle users whose
    phones never ring); RSS with 1,000 and with 10,000 idle streams."""
    few, many = settings["streams"], settings["many_streams"]
    trace = BigTrace([template], settings["min_events"])
    idle = [("w%05d" % i, "PJSIP/w%05d" % i, "") for i in range(many - len(OFFICE_USERS))]
    daemon = start_daemon(loop, feeder, "bench-streams", OFFICE_USERS + idle)
    try:
        result = {"rss_idle": daemon.rss_mb(), "events": trace.events, "few": few, "many": many}
        notes = sum(len(v) for v in expected_notifications(
            split_events(trace.event_bytes(0)), office_users()).values())
        lines = ClientSwarm(loop, daemon.port)
        lines.connect([name for name, _, _ in OFFICE_USERS])
        push_round(loop, feeder, daemon, lines, trace.event_bytes(0), notes)  # warm-up
        # CPU time comes in 10 ms ticks and the machine may be shared: the
        # better of two rounds each way.
        result["cpu_none"] = min(push_round(loop, feeder, daemon, lines,
                                            trace.event_bytes(r), notes)[0] for r in (1, 2))
        streams = ClientSwarm(loop, daemon.web_port, Browser)
        names = [name for name, _, _ in OFFICE_USERS + idle]
        streams.connect(names[:few])
        wait_idle(loop, daemon)
        result["rss_few"] = daemon.rss_mb()
        received = streams.received
        result["cpu_few"] = min(push_round(loop, feeder, daemon, lines,
                                           trace.event_bytes(r), notes)[0] for r in (3, 4))
        loop.run(lambda: streams.received >= received + 2 * notes, 60, "the streams' events")
        streams.connect(names[few:many])
        wait_idle(loop, daemon)
        result["rss_many"] = daemon.rss_mb()
        result["lost"] = lines.lost_count + streams.lost_count
        lines.close()
        streams.close()
        return result
    finally:
        daemon.stop()


def measure_rounds(loop, feeder, template, settings):
    """Daemon RSS after each round of the big trace (new ids every round)."""
    trace = BigTrace([template], settings["min_events"])
    daemon = start_daemon(loop, feeder, "bench-rounds", OFFICE_USERS)
    try:
        notes = sum(len(v) for v in expected_notifications(
            split_events(trace.event_bytes(0)), office_users()).values())
        swarm = ClientSwarm(loop, daemon.port)
        swarm.connect([name for name, _, _ in OFFICE_USERS])
        rss = []
        for round_ in range(settings["rounds"]):
            push_round(loop, feeder, daemon, swarm, trace.event_bytes(round_), notes)
            rss.append(daemon.rss_mb())
        swarm.close()
        return {"rss": rss, "events": trace.events}
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------
# Office board fan-out: in process, and through the daemon's sockets
# ---------------------------------------------------------------------------

BOARD_USERS = 500
BOARD_WATCHERS = 100


def board_office(users):
    """``users`` users, one phone and one number each."""
    text = "[ami]\nusername = u\nsecret = s\n" + "".join(
        "[u%03d]\nsecret = s\ndevices = PJSIP/%d\nextensions = %d\n" % (i, 1000 + i, 1000 + i)
        for i in range(users))
    return ctinotify.parse_config(text, "board-bench.conf").users


def board_watchers(names, watchers):
    """(scope, format) of each watcher: half see everyone with details, a
    quarter everyone without, a quarter a list of 50 colleagues; text and
    JSON alternate."""
    out = []
    for i in range(watchers):
        viewer = names[i % len(names)]
        if i % 4 == 3:
            scope = ctinotify.BoardScope(viewer, names[i:i + 50], False)
        else:
            scope = ctinotify.BoardScope(viewer, None, i % 4 != 2)
        out.append((scope, "json" if i % 2 else "text"))
    return out


def measure_board(changes, users=BOARD_USERS, watchers=BOARD_WATCHERS):
    """The in-process cost of one board change reaching every watcher: the
    board taking the notification that causes it, then each watcher's line
    (view and encoding).  {"p50_ms", "p99_ms", "max_ms", "changes", "lines"}."""
    config = board_office(users)
    names = list(config)
    board = ctinotify.Board(config.values(), 0.0)
    audience = board_watchers(names, watchers)
    cycle = ("incoming", "pickup", "hangup")
    times, lines = [], 0
    gc.collect()
    for n in range(changes):
        i, kind = (n // 3) % users, cycle[n % 3]
        fields = {"event": kind, "call": "c%d" % (n // 3), "time": "", "role": "callee",
                  "device": "PJSIP/%d" % (1000 + i),
                  "from": {"num": "+1555%07d" % n, "name": "Caller %d" % n},
                  "to": {"num": str(1000 + i), "name": "User %d" % i},
                  "answered_by": {"num": str(1000 + i), "name": "",
                                  "device": "PJSIP/%d" % (1000 + i)}}
        note = ctinotify.Notification(names[i], kind, fields)
        start = time.perf_counter()
        for change in board.on_notifications([note], float(n)):
            for scope, fmt in audience:
                if ctinotify.change_bytes(change, scope, fmt) is not None:
                    lines += 1
        times.append(time.perf_counter() - start)
    times.sort()
    return {"p50_ms": 1e3 * times[len(times) // 2], "p99_ms": 1e3 * times[int(len(times) * 0.99)],
            "max_ms": 1e3 * times[-1], "changes": changes, "lines": lines,
            "users": users, "watchers": watchers}


def board_socket_users(users, watchers):
    """The daemon's users for the socket measurement: one phone each; the
    first ``watchers`` have boards as board_watchers() gives them (half
    everyone with details, a quarter everyone, a quarter 50 colleagues)."""
    names = ["u%03d" % i for i in range(users)]
    config = []
    for i, name in enumerate(names):
        board = ""
        if i < watchers:
            if i % 4 == 3:
                board = "board = %s\n" % ", ".join(names[i:i + 50])
            else:
                board = "board = all\nboard_details = %s\n" % ("no" if i % 4 == 2 else "yes")
        config.append((name, "PJSIP/%d" % (1000 + i), str(1000 + i), board))
    return config


def measure_board_sockets(loop, feeder, settings, users=BOARD_USERS, watchers=BOARD_WATCHERS):
    """The daemon as a process with ``users`` users, ``watchers`` of them
    logged in with a board; the fake Asterisk sends one DeviceStateChange
    at a time (``board_rate`` a second), each turning one user's phone in
    use or idle, which is one board change.  The time from the AMI byte
    leaving the fake to each watcher's line, and to the last watcher that
    sees that user."""
    config = board_socket_users(users, watchers)
    names = [name for name, _, _, _ in config]
    daemon = start_daemon(loop, feeder, "bench-board", config)
    try:
        scopes = ctinotify.board_scopes(ctinotify.load_config(daemon.config).users)
        count, rate = settings["board_socket_changes"], settings["board_rate"]
        events, causes = [], []
        for n in range(count):
            i = (n * 7) % users  # every user in turn, 7 apart: no two changes in flight
            state = "INUSE" if (n // users) % 2 == 0 else "NOT_INUSE"
            events.append(("Event: DeviceStateChange\r\nPrivilege: call,all\r\n"
                           "Device: PJSIP/%d\r\nState: %s\r\n\r\n" % (1000 + i, state))
                          .encode())
            causes.append(names[i])
        audience = {user: [w for w, scope in scopes.items() if scope.sees(user)]
                    for user in set(causes)}
        expected = sum(len(audience[user]) for user in causes)
        # The k-th change of a user, as each watcher sees it -> the event index.
        index_of = collections.defaultdict(list)
        for index, user in enumerate(causes):
            index_of[user].append(index)
        swarm = ClientSwarm(loop, daemon.port)
        swarm.connect(list(scopes))
        wait_idle(loop, daemon)
        seen = collections.Counter()
        arrivals = []

        def on_event(watcher, line, now):
            swarm.received += 1
            user = line.split(" ", 3)[2][5:]  # EVENT state user=<name> ...
            k = seen[(watcher, user)]
            seen[(watcher, user)] += 1
            arrivals.append((index_of[user][k], now))
        swarm.on_event = on_event
        feeder.pace(events, 0, count, rate)
        loop.run(lambda: not feeder.pacing() and swarm.received >= expected,
                 count / rate * 3 + 30, "%d board lines" % expected)
        lines, last = [], {}
        for index, arrived in arrivals:
            delay = arrived - feeder.sent_at[index]
            lines.append(delay)
            last[index] = max(last.get(index, 0.0), delay)
        lines.sort()
        reach = sorted(last.values())
        swarm.close()
        return {"users": users, "watchers": len(scopes), "changes": count, "rate": rate,
                "lines": len(lines), "lost": swarm.lost_count,
                "line_p50_ms": 1e3 * lines[len(lines) // 2],
                "line_p99_ms": 1e3 * lines[int(len(lines) * 0.99)],
                "reach_p50_ms": 1e3 * reach[len(reach) // 2],
                "reach_p99_ms": 1e3 * reach[int(len(reach) * 0.99)],
                "reach_max_ms": 1e3 * reach[-1]}
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

TARGET_RATE = 110000


def verdict(ok, full_size=True):
    """``full_size``: the run was as big as the target says (not QUICK)."""
    if not full_size:
        return "not measured (QUICK)"
    return "met" if ok else "NOT met"


def report(settings, mode, traces, through, fanout, scale, rounds, seconds, board=None,
           sse=None, streams=None, board_sockets=None):
    lines = []
    add = lines.append
    add("ctinotify %s benchmark (%s run, %.0f s): Python %s (%s), %s, %d CPUs"
        % (ctinotify.__version__, mode, seconds, platform.python_version(),
           platform.python_implementation(), platform.machine(), os.cpu_count() or 0))
    add("")
    add("1. Parse + engine, no sockets (events/s, best of %d; users of tests/office.conf)"
        % settings["repeats"])
    names = [name for name, _, _, _ in traces]

    def row(label, cells):
        add("   %-36s" % label + "".join("%22s" % cell for cell in cells))
    row("", names)
    row("built from (uniquified copies)", [t[3] for t in traces])
    row("events", [format(through[n]["events"], ",") for n in names])
    row("naive reference parser", [format(int(through[n]["naive"]), ",") for n in names])
    row("AmiParser + CallEngine", [format(int(through[n]["ours"]), ",") for n in names])
    row("ratio to naive", ["%.3f" % (through[n]["ours"] / through[n]["naive"]) for n in names])
    row("ctinotify.py replay > /dev/null", ["%.1f s = %s ev/s" % (
        through[n]["replay_s"], format(int(through[n]["replay"]), ",")) for n in names])
    add("")
    add("2. Fan-out: daemon process, %s clients, one phone each (t_load copies, phones spread)"
        % format(fanout["clients"], ","))
    add("   %-56s %s" % ("AMI events/s end to end, pushed as fast as read",
                         format(int(fanout["full_events_per_s"]), ",")))
    add("   %-56s %s" % ("notifications delivered/s in that run",
                         format(int(fanout["full_notes_per_s"]), ",")))
    add("   %-56s %.2f ms / %.2f ms (%d events)" % (
        "AMI byte out -> client has the event, %s ev/s: median / p99"
        % format(fanout["rate"], ","), fanout["delay_median_ms"], fanout["delay_p99_ms"],
        fanout["delay_n"]))
    add("")
    add("3. Connections (daemon RSS; CPU per AMI event, only 4 clients' phones ring)")
    add("   %-56s %.1f MB" % ("idle: AMI up, no client", scale["rss_idle"]))
    add("   %-56s %.1f MB" % ("%s clients logged in" % format(scale["rss_clients"][0], ","),
                              scale["rss_clients"][1]))
    add("   %-56s %.1f MB (%.1f MB after a round of traffic)" % (
        "%s clients logged in" % format(scale["many"], ","), scale["rss_many"],
        scale["rss_many_after"]))
    few_us = 1e6 * scale["cpu_few"] / scale["events"]
    many_us = 1e6 * scale["cpu_many"] / scale["events"]
    add("   %-56s %.2f us vs %.2f us (x%.2f)" % (
        "CPU per AMI event, %s vs %s clients" % (format(scale["few"], ","),
                                                 format(scale["many"], ",")),
        few_us, many_us, many_us / few_us))
    add("")
    rss = rounds["rss"]
    add("4. Bounded memory: daemon RSS after each round of %s events (new ids each round)"
        % format(rounds["events"], ","))
    add("   " + " ".join("%.1f" % r for r in rss) + " MB: after %d rounds %+.1f%% vs after 1"
        % (len(rss), 100.0 * (rss[-1] - rss[0]) / rss[0]))
    if fanout["lost"] or scale["lost"]:
        add("   (clients disconnected by the daemon: %d)" % (fanout["lost"] + scale["lost"]))
    if board is not None:
        add("")
        add("5. Office board in process: %s users, a change reaches %d watchers (%s changes)"
            % (format(board["users"], ","), board["watchers"], format(board["changes"], ",")))
        add("   %-56s %.3f ms / %.3f ms / %.3f ms" % (
            "board update + every watcher's line: median / p99 / max",
            board["p50_ms"], board["p99_ms"], board["max_ms"]))
    if board_sockets is not None:
        bs = board_sockets
        add("   Through the daemon: %s users, %d watchers logged in, %s changes at %d/s"
            % (format(bs["users"], ","), bs["watchers"], format(bs["changes"], ","), bs["rate"]))
        add("   %-56s %.2f ms / %.2f ms (%s lines)" % (
            "AMI byte out -> a watcher has the line: median / p99", bs["line_p50_ms"],
            bs["line_p99_ms"], format(bs["lines"], ",")))
        add("   %-56s %.2f ms / %.2f ms / %.2f ms" % (
            "... -> the last watcher has it: median / p99 / max", bs["reach_p50_ms"],
            bs["reach_p99_ms"], bs["reach_max_ms"]))
    if sse is not None and streams is not None:
        add("")
        add("6. Browsers: event streams on the web port (GET /events, Basic auth)")
        add("   %-56s %.2f ms / %.2f ms (%d events)" % (
            "AMI byte out -> %s streams have the event, %s ev/s: median / p99"
            % (format(sse["clients"], ","), format(sse["rate"], ",")),
            sse["delay_median_ms"], sse["delay_p99_ms"], sse["delay_n"]))
        add("   %-56s %s" % ("AMI events/s end to end to them, as fast as read",
                             format(int(sse["full_events_per_s"]), ",")))
        add("   %-56s %.1f MB / %.1f MB / %.1f MB" % (
            "daemon RSS: no stream / %s / %s idle streams" % (
                format(streams["few"], ","), format(streams["many"], ",")),
            streams["rss_idle"], streams["rss_few"], streams["rss_many"]))
        none_us = 1e6 * streams["cpu_none"] / streams["events"]
        open_us = 1e6 * streams["cpu_few"] / streams["events"]
        add("   %-56s %.2f us vs %.2f us (x%.2f)" % (
            "CPU per AMI event, no stream vs %s streams open" % format(streams["few"], ","),
            none_us, open_us, open_us / none_us))
        add("   %-56s %s vs %s ev/s" % (
            "AMI throughput (events per daemon CPU second)",
            format(int(1e6 / none_us), ","), format(int(1e6 / open_us), ",")))
        if sse["lost"] or streams["lost"]:
            add("   (streams disconnected by the daemon: %d)" % (sse["lost"] + streams["lost"]))
    add("")
    add("Targets (README, Performance):")
    full = mode == "full"
    for name in names:
        figures = through[name]
        add("   %-66s %s" % ("parse + engine >= 110,000 ev/s on %s (%s)"
                             % (name, format(int(figures["ours"]), ",")),
                             verdict(figures["ours"] >= TARGET_RATE, full)))
        add("   %-66s %s" % ("... and >= half the naive parser (%.3f)"
                             % (figures["ours"] / figures["naive"]),
                             verdict(figures["ours"] >= figures["naive"] / 2, full)))
    add("   %-66s %s" % ("p99 delay < 5 ms at %s ev/s with %s clients (%.2f ms)" % (
        format(fanout["rate"], ","), format(fanout["clients"], ","), fanout["delay_p99_ms"]),
        verdict(fanout["delay_p99_ms"] < 5.0, fanout["clients"] >= 1000)))
    add("   %-66s %s" % ("< 150 MB RSS with %s clients (%.1f MB)"
                         % (format(scale["many"], ","), scale["rss_many"]),
                         verdict(scale["rss_many"] < 150, scale["many"] >= 10000)))
    add("   %-66s %s" % ("CPU per event, %s vs %s clients within 20%% (x%.2f)"
                         % (format(scale["few"], ","), format(scale["many"], ","),
                            many_us / few_us),
                         verdict(many_us <= 1.2 * few_us, scale["many"] >= 10000)))
    add("   %-66s %s" % ("no RSS growth across %d rounds (%+.1f%%, margin 5%%)"
                         % (len(rss), 100.0 * (rss[-1] - rss[0]) / rss[0]),
                         verdict(rss[-1] <= rss[0] * 1.05, len(rss) >= 10)))
    if sse is not None and streams is not None:
        add("   %-66s %s" % ("p99 delay < 5 ms at %s ev/s with %s browsers (%.2f ms)" % (
            format(sse["rate"], ","), format(sse["clients"], ","), sse["delay_p99_ms"]),
            verdict(sse["delay_p99_ms"] < 5.0, sse["clients"] >= 1000)))
        add("   %-66s %s" % ("< 200 MB RSS with %s idle event streams (%.1f MB)"
                             % (format(streams["many"], ","), streams["rss_many"]),
                             verdict(streams["rss_many"] < 200, streams["many"] >= 10000)))
        add("   %-66s %s" % ("AMI throughput with %s streams within 10%% of none (x%.2f)"
                             % (format(streams["few"], ","), open_us / none_us),
                             verdict(open_us <= 1.1 * none_us, streams["few"] >= 1000)))
    if board is not None:
        add("   %-66s %s" % ("board change to %d watchers, p99 < 5 ms in process (%.3f ms)"
                             % (board["watchers"], board["p99_ms"]),
                             verdict(board["p99_ms"] < 5.0, full)))
    if board_sockets is not None:
        add("   %-66s %s" % ("board change to its last of %d watchers, p99 < 5 ms (%.2f ms)"
                             % (board_sockets["watchers"], board_sockets["reach_p99_ms"]),
                             verdict(board_sockets["reach_p99_ms"] < 5.0, full)))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller traces, fewer clients and rounds (make bench QUICK=1)")
    parser.add_argument("--profile", action="store_true",
                        help="run the daemons under cProfile: bench-data/bench-*.prof")
    args = parser.parse_args(argv)
    DaemonProcess.profile = args.profile
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    started = time.monotonic()
    fds = raise_fd_limit()
    if fds < settings["many_clients"] + 100:
        sys.exit("need %d file descriptors, RLIMIT_NOFILE allows %d"
                 % (settings["many_clients"] + 100, fds))

    def step(text):
        sys.stderr.write("[%5.1f s] %s\n" % (time.monotonic() - started, text))
        sys.stderr.flush()

    step("building the big traces in %s" % DATA_DIR)
    caco_sources = sorted(os.path.join(TRACES, "cacofonisk", f)
                          for f in os.listdir(os.path.join(TRACES, "cacofonisk"))
                          if f.endswith(".ami"))
    tload_source = os.path.join(TRACES, "t_load.ami")
    tload = TraceTemplate(tload_source)
    caco = BigTrace([TraceTemplate(p) for p in caco_sources], settings["min_events"])
    tload_big = BigTrace([tload], settings["min_events"])
    traces = [
        ("cacofonisk", cached_trace("cacofonisk-%s.ami" % mode, caco, caco_sources),
         caco.events, "%d x %d recordings" % (caco.copies, len(caco_sources))),
        ("t_load", cached_trace("t_load-%s.ami" % mode, tload_big, [tload_source]),
         tload_big.events, "%d x t_load.ami" % tload_big.copies),
    ]
    step("1/5 parse + engine throughput, naive parser, replay")
    through = measure_throughput(traces, settings)
    loop = Loop()
    feeder = AmiFeeder(loop)
    step("2/5 fan-out: %d clients, %d ev/s for %g s, then full speed"
         % (settings["clients"], settings["paced_rate"], settings["paced_s"]))
    fanout = measure_fanout(loop, feeder, tload, settings)
    step("3/5 connections: idle, %d, %d and %d clients"
         % (settings["few_clients"], settings["clients"], settings["many_clients"]))
    scale = measure_scale(loop, feeder, tload, settings)
    step("4/5 bounded memory: %d rounds" % settings["rounds"])
    rounds = measure_rounds(loop, feeder, tload, settings)
    step("5/5 office board: %d users, %d watchers, through the daemon's sockets"
         % (BOARD_USERS, BOARD_WATCHERS))
    board_sockets = measure_board_sockets(loop, feeder, settings)
    step("+ browsers: %d event streams at %d ev/s, then %d idle"
         % (settings["streams"], settings["paced_rate"], settings["many_streams"]))
    sse = measure_fanout(loop, feeder, tload, settings, browsers=True)
    streams = measure_streams(loop, feeder, tload, settings)
    feeder.close()
    step("+ office board in process")
    board = measure_board(settings["board_changes"])
    text = report(settings, mode, traces, through, fanout, scale, rounds,
                  time.monotonic() - started, board, sse, streams, board_sockets)
    print(text)
    with open(os.path.join(DATA_DIR, "last-%s-run.txt" % mode), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
