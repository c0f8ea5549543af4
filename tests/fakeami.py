#!/usr/bin/env python3
"""A fake Asterisk Manager Interface that serves recorded traces.

Used by the end-to-end tests (in a background thread, driven step by step)
and by ``make demo`` (``--demo``: loops the bundled traces at a human pace
and runs the real daemon against them).  Standard library only.

It speaks just enough of the manager protocol: the banner, ``Login`` (plain
or MD5 after ``Challenge``), ``Ping``, ``Events``, ``CoreShowChannels``
(an empty list), ``DeviceStateList`` and ``ExtensionStateList`` (the
states the tests set) and ``Logoff``; ``Originate`` (queued, then an
``OriginateResponse``), ``Hangup`` and ``BlindTransfer`` are answered as
``answers`` says: success, ``Permission denied`` or not at all; everything
else gets an error response, as Asterisk gives it.  ``received`` keeps
every byte it was sent.
With ``tls_context`` (a server-side ssl.SSLContext) it speaks TLS, as
Asterisk's manager does on its ``tlsbindport``.
"""

import argparse
import errno
import hashlib
import os
import random
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ctinotify import AmiParser  # noqa: E402  (the real parser reads the actions)

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
#: ExtensionStatus StatusText (main/pbx.c, extension_states[]).
HINT_STATUS_TEXT = {0: "Idle", 1: "InUse", 2: "Busy",
                    4: "Unavailable", 8: "Ringing", 9: "InUse&Ringing", 16: "Hold",
                    17: "InUse&Hold"}


def trace_events(data):
    """The event messages of a recorded trace, as exact wire bytes.

    The recording's banner and the responses to the recorder's own actions
    are left out: the fake answers our daemon's actions itself.
    """
    text = data.replace(b"\r\n", b"\n")
    if text.startswith(b"Asterisk Call Manager/"):
        text = text.split(b"\n", 1)[1]
    events = []
    for block in text.split(b"\n\n"):
        block = block.strip(b"\n")
        if block.startswith(b"Event:"):
            events.append(block.replace(b"\n", b"\r\n") + b"\r\n\r\n")
    return events


def channel_list(data):
    """The CoreShowChannel events of a trace (s_connect_midcall.ami has
    them), without their ActionID: what the fake lists as channels."""
    events = []
    for block in trace_events(data):
        if block.startswith(b"Event: CoreShowChannel\r\n"):
            lines = [l for l in block.split(b"\r\n") if l and not l.startswith(b"ActionID:")]
            events.append(lines)
    return events


class AmiPeer:
    """One connection from the daemon under test."""

    def __init__(self, sock, tls=False):
        self.sock = sock
        #: A TLS connection whose handshake is not done yet.
        self.handshaking = tls
        self.parser = AmiParser(expect_banner=False)
        self.outbuf = bytearray(BANNER)
        self.logged_in = False
        self.challenge = None
        self.close_after_flush = False


class FakeAsterisk:
    """Serves AMI on 127.0.0.1:port; thread-safe control from the tests."""

    def __init__(self, username="ctitest", secret="ctitest", port=0, refuse_logins=False,
                 answer_pings=True, tls_context=None, refused_actions=()):
        self.tls_context = tls_context
        #: Why TLS handshakes failed, for the tests.
        self.tls_errors = []
        self.username = username
        self.secret = secret
        self.refuse_logins = refuse_logins
        self.answer_pings = answer_pings
        #: Actions answered "Permission denied", as for a manager user
        #: without their write class (lower case: "coreshowchannels").
        self.refused_actions = frozenset(refused_actions)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.peers = []
        self.lock = threading.Condition()
        self.logins = 0
        self.failed_logins = 0
        self.actions = []
        #: Every byte received from the daemon, in order (all connections).
        self.received = bytearray()
        #: Action (lower case) -> "ok", "denied" (Permission denied, as
        #: Asterisk answers a user without the write class) or "silent".
        self.answers = {"originate": "ok", "hangup": "ok", "blindtransfer": "ok"}
        #: The Reason of the OriginateResponse after a queued Originate (4:
        #: answered, 5 busy, 3 no answer, 0 failed); None: none is sent.
        self.originate_reason = "4"
        #: Channels CoreShowChannels lists: lists of header lines (channel_list).
        self.channels = []
        #: False: the list never ends (no CoreShowChannelsComplete), as an
        #: Asterisk that hangs mid-way.
        self.end_channel_lists = True
        #: What DeviceStateList lists: (device, state) pairs, as
        #: res_manager_devicestate.c sends them.
        self.device_states = []
        #: What ExtensionStateList lists: (exten, context, hint, status).
        self.hints = []
        #: False: an Asterisk without res_manager_devicestate.so, which knows
        #: no DeviceStateList (and sends no DeviceStateChange).
        self.devicestate_module = True
        self._commands = []
        self._running = False
        self._thread = None

    # -- control (any thread) --------------------------------------------------

    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self.serve_forever, name="fakeami", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._call(self._stop)
        if self._thread is not None:
            self._thread.join(5)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def send(self, data):
        """Send raw bytes to every logged-in connection."""
        self._call(lambda: self._broadcast(data))

    def send_trace(self, path):
        with open(path, "rb") as f:
            self.send(b"".join(trace_events(f.read())))

    def drop(self):
        """Close every connection, as a crashed or restarted Asterisk would."""
        self._call(self._drop)

    def wait_for_logins(self, count, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.logins < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("only %d AMI logins, expected %d" % (self.logins, count))
                self.lock.wait(left)

    def wait_for_action(self, name, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not any(a.get("Action", "").lower() == name.lower() for a in self.actions):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no %s action received" % name)
                self.lock.wait(left)

    def _call(self, func):
        with self.lock:
            self._commands.append(func)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop (its own thread, or the main thread for --demo) -------------

    def serve_forever(self, tick=None, tick_interval=0.05):
        self._running = True
        while self._running:
            for key, _mask in self.selector.select(tick_interval if tick else 0.5):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    self._on_peer(key.data, _mask)
            with self.lock:
                commands, self._commands = self._commands, []
            for func in commands:
                func()
            if tick is not None:
                tick()
        for peer in list(self.peers):
            self._close(peer)
        self.listener.close()

    def _stop(self):
        self._running = False

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        peer = AmiPeer(sock, tls=self.tls_context is not None)
        self.peers.append(peer)
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)

    def _on_peer(self, peer, mask):
        if peer.handshaking:
            try:
                peer.sock.do_handshake()
                peer.handshaking = False
            except ssl.SSLWantReadError:
                self.selector.modify(peer.sock, selectors.EVENT_READ, peer)
                return
            except ssl.SSLWantWriteError:
                self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
                return
            except OSError as e:
                with self.lock:
                    self.tls_errors.append(str(e))
                    self.lock.notify_all()
                self._close(peer)
                return
        if mask & selectors.EVENT_READ:
            try:
                data = peer.sock.recv(65536)
                while getattr(peer.sock, "pending", lambda: 0)():
                    data += peer.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(peer)
                return
            if data:
                with self.lock:
                    self.received += data
                for msg in peer.parser.feed(data):
                    self._on_action(peer, msg)
        self._flush(peer)

    def _on_action(self, peer, msg):
        with self.lock:
            self.actions.append(dict(msg))
            self.lock.notify_all()
        action = msg.get("Action", "").lower()
        action_id = msg.get("ActionID")
        head = "ActionID: %s\r\n" % action_id if action_id else ""
        if action in self.refused_actions:
            # main/manager.c, process_message(): the action needs a class the user lacks.
            self._reply(peer, "Response: Error\r\n%sMessage: Permission denied\r\n\r\n" % head)
        elif action == "challenge":
            peer.challenge = "%09d" % random.randrange(10 ** 9)
            self._reply(peer, "Response: Success\r\n%sChallenge: %s\r\n\r\n" % (head, peer.challenge))
        elif action == "login":
            if msg.get("AuthType", "").lower() == "md5":
                expected = hashlib.md5(((peer.challenge or "") + self.secret).encode()).hexdigest()
                ok = msg.get("Key") == expected
            else:
                ok = msg.get("Secret") == self.secret
            ok = ok and msg.get("Username") == self.username and not self.refuse_logins
            if ok:
                self._reply(peer, "Response: Success\r\n%sMessage: Authentication accepted\r\n\r\n"
                            "Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"
                            % head)
                peer.logged_in = True
                with self.lock:
                    self.logins += 1
                    self.lock.notify_all()
            else:
                # What Asterisk 22 does (v_login_wrong_secret.ami): error, then close.
                self._reply(peer, "Response: Error\r\n%sMessage: Authentication failed\r\n\r\n" % head)
                peer.close_after_flush = True
                with self.lock:
                    self.failed_logins += 1
                    self.lock.notify_all()
        elif action == "ping":
            if self.answer_pings:
                self._reply(peer, "Response: Success\r\n%sPing: Pong\r\nTimestamp: %.6f\r\n\r\n"
                            % (head, time.time()))
        elif action == "coreshowchannels":
            items = "".join("%s\r\n%s%s\r\n\r\n" % (
                lines[0].decode(), head, "\r\n".join(l.decode() for l in lines[1:]))
                for lines in self.channels)
            end = ("Event: CoreShowChannelsComplete\r\n%sEventList: Complete\r\n"
                   "ListItems: %d\r\n\r\n" % (head, len(self.channels))
                   if self.end_channel_lists else "")
            self._reply(peer, "Response: Success\r\n%sEventList: start\r\n"
                        "Message: Channels will follow\r\n\r\n%s%s" % (head, items, end))
        elif action == "queuestatus":
            self._reply(peer, "Response: Success\r\n%sEventList: start\r\n"
                        "Message: Queue status will follow\r\n\r\n"
                        "Event: QueueStatusComplete\r\n%sEventList: Complete\r\n"
                        "ListItems: 0\r\n\r\n" % (head, head))
        elif action == "devicestatelist" and self.devicestate_module:
            items = ["Event: DeviceStateChange\r\n%sDevice: %s\r\nState: %s\r\n\r\n"
                     % (head, device, state) for device, state in self.device_states]
            self._reply(peer, self._list(head, "Device State Changes", items,
                                         "DeviceStateListComplete"))
        elif action == "extensionstatelist":
            items = ["Event: ExtensionStatus\r\n%sExten: %s\r\nContext: %s\r\nHint: %s\r\n"
                     "Status: %d\r\nStatusText: %s\r\n\r\n"
                     % (head, exten, context, hint, status, HINT_STATUS_TEXT.get(status, "Unknown"))
                     for exten, context, hint, status in self.hints]
            self._reply(peer, self._list(head, "Extension Statuses", items,
                                         "ExtensionStateListComplete"))
        elif action == "events":
            self._reply(peer, "Response: Success\r\n%sEvents: On\r\n\r\n" % head)
        elif action in ("originate", "hangup", "blindtransfer"):
            self._act(peer, action, msg, head)
        elif action == "logoff":
            self._reply(peer, "Response: Goodbye\r\n%sMessage: Thanks for all the fish.\r\n\r\n" % head)
            peer.close_after_flush = True
        else:
            # main/manager.c, process_message().
            self._reply(peer, "Response: Error\r\n%sMessage: Invalid/unknown command: %s. Use "
                        "Action: ListCommands to show available commands.\r\n\r\n"
                        % (head, msg.get("Action", "")))

    @staticmethod
    def _list(head, what, items, complete):
        """A list action's answer: the response, the items, the end."""
        return ("Response: Success\r\n%sEventList: start\r\nMessage: %s will follow\r\n\r\n"
                "%sEvent: %s\r\n%sEventList: Complete\r\nListItems: %d\r\n\r\n"
                % (head, what, "".join(items), complete, head, len(items)))

    #: What Asterisk 22 answers a successful action (main/manager.c).
    ACKS = {"originate": "Originate successfully queued", "hangup": "Channel Hungup",
            "blindtransfer": "Transfer succeeded"}

    def _act(self, peer, action, msg, head):
        answer = self.answers.get(action, "ok")
        if answer == "silent":
            return
        if answer == "denied":
            self._reply(peer, "Response: Error\r\n%sMessage: Permission denied\r\n\r\n" % head)
            return
        self._reply(peer, "Response: Success\r\n%sMessage: %s\r\n\r\n" % (head, self.ACKS[action]))
        if action == "originate" and self.originate_reason is not None:
            # As o_click_to_dial.ami shows it, once the phone answered or not.
            name, _, number = msg.get("CallerID", "").rpartition("<")
            self._reply(peer, "Event: OriginateResponse\r\nPrivilege: call,all\r\n%s"
                        "Response: %s\r\nChannel: %s\r\nContext: %s\r\nExten: %s\r\n"
                        "Reason: %s\r\nUniqueid: <null>\r\nCallerIDNum: %s\r\n"
                        "CallerIDName: %s\r\n\r\n"
                        % (head, "Success" if self.originate_reason == "4" else "Failure",
                           msg.get("Channel", ""), msg.get("Context", ""), msg.get("Exten", ""),
                           self.originate_reason, number.rstrip(">"), name.strip().strip('"')))

    def _reply(self, peer, text):
        peer.outbuf += text.encode("utf-8")

    def _broadcast(self, data):
        for peer in self.peers:
            if peer.logged_in:
                peer.outbuf += data
                self._flush(peer)

    def _flush(self, peer):
        if peer.sock.fileno() < 0 or peer.handshaking:
            return
        if peer.outbuf:
            try:
                sent = peer.sock.send(peer.outbuf)
                del peer.outbuf[:sent]
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                pass
            except OSError:
                self._close(peer)
                return
        if not peer.outbuf and peer.close_after_flush:
            self._close(peer)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbuf else 0)
        self.selector.modify(peer.sock, events, peer)

    def _drop(self):
        for peer in list(self.peers):
            self._close(peer)

    def _close(self, peer):
        if peer in self.peers:
            self.peers.remove(peer)
            try:
                self.selector.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
            peer.sock.close()


# ---------------------------------------------------------------------------
# make demo, and any recording played to the real daemon
# ---------------------------------------------------------------------------

DEMO_TRACES = ("a_inbound_answered", "e_internal_answered", "g_ringgroup", "b_inbound_noanswer",
               "i_forward_to_mobile", "j_blind_transfer", "f_outbound_answered",
               "n_queue", "l_directed_pickup", "k_attended_transfer", "c_inbound_busy",
               "p_park_retrieve", "r_hold_unhold", "h_forward_to_ext", "d_inbound_cancel")
#: Events worth a pause in the demo, so a person can watch a call unfold.
DEMO_PACED = (b"Event: DialBegin", b"Event: DialEnd", b"Event: Hangup", b"Event: BridgeEnter")
#: The manager user the fake accepts (and the derived configuration logs in as).
FAKE_USER = FAKE_SECRET = "ctitest"


class PortInUse(Exception):
    """A port the player needs is taken: one line says which and what to do."""


def check_port_free(port, option):
    """Raise PortInUse if the daemon could not bind 127.0.0.1:port."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon does
        probe.bind(("127.0.0.1", port))
    except OSError as e:
        raise PortInUse("port %d on 127.0.0.1 is in use (%s): stop what listens there "
                        "(make run, another demo?) or choose another port with %s"
                        % (port, e.strerror or e, option))
    finally:
        probe.close()


def _one_pbx(value, pbx):
    """A devices or extensions value as PBX ``pbx`` sees it: ``NAME:X``
    items of another PBX left out, those of ``pbx`` unqualified."""
    items = []
    for item in (i.strip() for i in value.split(",")):
        head, colon, rest = item.partition(":")
        if colon and "/" not in head:
            if head == pbx:
                items.append(rest)
        elif item:
            items.append(item)
    return ", ".join(items)


def derived_config(path, pbx, ami_port, port):
    """The user's configuration pointed at the fake: [general] on
    127.0.0.1:port, [ami] the fake on ami_port, no further PBXes (the
    trace is PBX ``pbx``'s), each user as written but allowed in from this
    machine only.  Returns (text, skipped users)."""
    from ctinotify import parse_ini  # noqa: E402
    with open(path, encoding="utf-8") as f:
        sections, problems, _templates = parse_ini(f.read(), path)
    if problems:
        raise ValueError("; ".join(problems))
    general = next((s for s in sections if s.name.lower() == "general"), None)
    loglevel = general.get("loglevel") if general is not None else None
    lines = ["[general]", "bind = 127.0.0.1", "port = %d" % port,
             "loglevel = %s" % (loglevel.value if loglevel else "info"), "",
             "[ami]", "host = 127.0.0.1", "port = %d" % ami_port, "username = " + FAKE_USER,
             "secret = " + FAKE_SECRET, "ping_interval = 5", ""]
    skipped = []
    for section in sections:
        name = section.name.lower()
        if name in ("general", "ami") or name.startswith("ami:"):
            continue
        values = {}
        for option in section.options:  # the last of a key wins, in first-seen order
            values[option.key] = option.value
        for key in ("devices", "extensions"):
            if key in values:
                values[key] = _one_pbx(values[key], pbx)
        if not values.get("devices") and not values.get("extensions"):
            skipped.append(section.name)
            continue
        values["host"] = "127.0.0.1, ::1"
        lines.append("[%s]" % section.name)
        lines += ["%s = %s" % (k, v.replace(";", "\\;")) for k, v in values.items()]
        lines.append("")
    return "\n".join(lines), skipped


def play(config, traces, pace, ami_port, loop, banner, delay=3.0):
    """Serve ``traces`` (lists of events) on 127.0.0.1:ami_port, at ``pace``
    seconds per call step, to the real daemon run with ``config``: once,
    or in a loop, starting ``delay`` s after the daemon logged in.  Until
    Ctrl-C or SIGTERM (0), or the daemon's end (1)."""
    fake = FakeAsterisk(port=ami_port)
    state = {"trace": 0, "event": 0, "due": None, "daemon": None,
             "died": False}

    def tick():
        daemon = state["daemon"]
        if daemon is not None and daemon.poll() is not None and not state["died"]:
            print("fakeami: the daemon stopped (exit status %d); its log says why"
                  % daemon.returncode, file=sys.stderr, flush=True)
            state["died"] = True
            fake._stop()
            return
        if fake.logins == 0 or state["trace"] is None:
            return
        if state["due"] is None:
            state["due"] = time.monotonic() + delay
        if time.monotonic() < state["due"]:
            return
        current = traces[state["trace"]]
        while state["event"] < len(current):
            event = current[state["event"]]
            state["event"] += 1
            fake._broadcast(event)
            if event.startswith(DEMO_PACED) and pace > 0:
                state["due"] = time.monotonic() + pace
                return
        state["event"] = 0
        state["trace"] = state["trace"] + 1
        if state["trace"] == len(traces):
            state["trace"] = 0 if loop else None
            if not loop:
                print("the recorded calls are over; Ctrl-C stops", flush=True)
        state["due"] = time.monotonic() + 3 * pace

    # A private copy: a fresh clone's demo.conf is readable by everyone, and
    # the daemon rightly warns about that for a file that holds secrets.
    private = tempfile.mkdtemp(prefix="ctinotify-demo-")
    private_config = os.path.join(private, "ctinotify.conf")
    with open(private_config, "w", encoding="utf-8") as f:
        f.write(config)
    os.chmod(private_config, 0o600)
    state["daemon"] = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(HERE), "ctinotify.py"), "run", "-c",
         private_config])
    print("\n".join(["=" * 72] + banner + ["=" * 72]), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: fake._stop())
    try:
        fake.serve_forever(tick=tick)
    except KeyboardInterrupt:
        pass
    finally:
        daemon = state["daemon"]
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(private, ignore_errors=True)
    return 1 if state["died"] else 0


DEMO_BANNER = [
    " ctinotify DEMO - recorded Asterisk calls replayed by a fake PBX on",
    " 127.0.0.1:15038; no real Asterisk is involved.  In another terminal:",
    "",
    "     nc 127.0.0.1 5039          (or: telnet 127.0.0.1 5039)",
    "     LOGIN demo demo            sees every call",
    "     LOGIN alice alice          sees only extension 100's calls",
    "     FORMAT json                JSON lines instead of text",
    "",
    " Or open http://127.0.0.1:5041/ in a browser: user demo, secret demo.",
    "",
    " Calls repeat in a loop.  Ctrl-C stops the demo.",
]


def run_demo(config, pace, ami_port=15038):
    from ctinotify import load_config  # noqa: E402
    check_port_free(load_config(config).port, "a copy of tests/demo.conf (its port)")
    with open(config, encoding="utf-8") as f:
        text = f.read()
    traces = []
    for name in DEMO_TRACES:
        with open(os.path.join(HERE, "traces", name + ".ami"), "rb") as f:
            traces.append(trace_events(f.read()))
    return play(text, traces, pace, ami_port, True, DEMO_BANNER)


def run_traces(paths, config, pbx, pace, ami_port, port, loop, delay):
    """Play the recordings ``paths`` to the daemon, with the users of the
    configuration ``config`` (its [ami] replaced by this fake)."""
    check_port_free(port, "--port")
    text, skipped = derived_config(config, pbx, ami_port, port)
    traces = []
    for path in paths:
        with open(path, "rb") as f:
            events = trace_events(f.read())
        if not events:
            raise ValueError("%s holds no AMI event: is it a recording of ctinotify.py "
                             "record?" % path)
        traces.append(events)
    banner = [" ctinotify with a fake PBX playing %d recording%s on 127.0.0.1:%d"
              % (len(paths), "" if len(paths) == 1 else "s", ami_port),
              " (%s)." % ", ".join(os.path.basename(p) for p in paths),
              " Your users of %s log in from this machine, in another terminal:" % config,
              "",
              "     nc 127.0.0.1 %d               then LOGIN <user> <secret>" % port,
              "     python3 ctinotify.py watch 127.0.0.1:%d --user <user>" % port,
              "",
              " The calls play %s, %g s after the daemon is connected."
              % ("in a loop" if loop else "once", delay),
              " Ctrl-C stops."]
    if skipped:
        banner.append(" Users with no phone or number on PBX %s left out: %s"
                      % (pbx, ", ".join(skipped)))
    return play(text, traces, pace, ami_port, loop, banner, delay)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="A fake Asterisk playing recorded calls to the real ctinotify daemon: "
                    "the demo (--demo), or your recordings (ctinotify.py record) with your "
                    "configuration's users.")
    parser.add_argument("traces", nargs="*", metavar="TRACE",
                        help="recordings to play, in order (ctinotify.py record OUT.ami)")
    parser.add_argument("--demo", action="store_true", help="run the demo (see make demo)")
    parser.add_argument("-c", "--config",
                        help="the configuration: for --demo, tests/demo.conf as it is; with "
                             "TRACEs, yours (default ./ctinotify.conf): its users, allowed in "
                             "from 127.0.0.1 only, and its [ami] replaced by this fake")
    parser.add_argument("--pbx", default="default",
                        help="the PBX the TRACEs were recorded on (its NAME:... devices count)")
    parser.add_argument("--pace", type=float, default=0.8,
                        help="seconds between call steps (0: as fast as they go)")
    parser.add_argument("--ami-port", type=int, default=15038,
                        help="the fake PBX's port on 127.0.0.1 (for --demo: the config's "
                             "[ami] port)")
    parser.add_argument("--port", type=int, default=5039,
                        help="with TRACEs: the daemon's client port on 127.0.0.1")
    parser.add_argument("--loop", action="store_true",
                        help="with TRACEs: play them again and again")
    parser.add_argument("--delay", type=float, default=10.0,
                        help="with TRACEs: seconds to connect a client before the calls start")
    args = parser.parse_args(argv)
    if not args.demo and not args.traces:
        parser.print_help()
        return 2
    try:
        if args.demo:
            return run_demo(args.config or os.path.join(HERE, "demo.conf"), args.pace,
                            args.ami_port)
        return run_traces(args.traces, args.config or "ctinotify.conf", args.pbx, args.pace,
                          args.ami_port, args.port, args.loop, args.delay)
    except PortInUse as e:
        print("fakeami: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print("fakeami: port %d on 127.0.0.1 is in use: stop what listens there or choose "
                  "another with --ami-port" % args.ami_port, file=sys.stderr)
        else:
            print("fakeami: %s: %s" % (getattr(e, "filename", None) or "error",
                                       e.strerror or e), file=sys.stderr)
        return 1
    except (ValueError, UnicodeDecodeError) as e:
        print("fakeami: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
