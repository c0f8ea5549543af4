#!/usr/bin/env python3
"""A fake Asterisk Manager Interface that serves recorded traces.

Used by the end-to-end tests (in a background thread, driven step by step)
and by ``make demo`` (``--demo``: loops the bundled traces at a human pace
and runs the real daemon against them).  Standard library only.

It speaks just enough of the manager protocol: the banner, ``Login`` (plain
or MD5 after ``Challenge``), ``Ping``, ``Events``, ``CoreShowChannels``
(an empty list) and ``Logoff``; everything else gets an error response.
With ``tls_context`` (a server-side ssl.SSLContext) it speaks TLS, as
Asterisk's manager does on its ``tlsbindport``.
"""

import argparse
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
        #: Channels CoreShowChannels lists: lists of header lines (channel_list).
        self.channels = []
        #: False: the list never ends (no CoreShowChannelsComplete), as an
        #: Asterisk that hangs mid-way.
        self.end_channel_lists = True
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
        elif action == "events":
            self._reply(peer, "Response: Success\r\n%sEvents: On\r\n\r\n" % head)
        elif action == "logoff":
            self._reply(peer, "Response: Goodbye\r\n%sMessage: Thanks for all the fish.\r\n\r\n" % head)
            peer.close_after_flush = True
        else:
            self._reply(peer, "Response: Error\r\n%sMessage: Invalid/unknown command\r\n\r\n" % head)

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
# make demo
# ---------------------------------------------------------------------------

DEMO_TRACES = ("a_inbound_answered", "e_internal_answered", "g_ringgroup", "b_inbound_noanswer",
               "i_forward_to_mobile", "j_blind_transfer", "f_outbound_answered",
               "n_queue", "l_directed_pickup", "k_attended_transfer", "c_inbound_busy",
               "p_park_retrieve", "r_hold_unhold", "h_forward_to_ext", "d_inbound_cancel")
#: Events worth a pause in the demo, so a person can watch a call unfold.
DEMO_PACED = (b"Event: DialBegin", b"Event: DialEnd", b"Event: Hangup", b"Event: BridgeEnter")


def run_demo(config, pace, ami_port=15038):
    fake = FakeAsterisk(port=ami_port)
    events = []
    for name in DEMO_TRACES:
        with open(os.path.join(HERE, "traces", name + ".ami"), "rb") as f:
            events.append(trace_events(f.read()))
    state = {"trace": 0, "event": 0, "due": time.monotonic() + 3.0}

    def tick():
        if fake.logins == 0 or time.monotonic() < state["due"]:
            return
        current = events[state["trace"]]
        while state["event"] < len(current):
            event = current[state["event"]]
            state["event"] += 1
            fake._broadcast(event)
            if event.startswith(DEMO_PACED):
                state["due"] = time.monotonic() + pace
                return
        state["trace"] = (state["trace"] + 1) % len(events)
        state["event"] = 0
        state["due"] = time.monotonic() + 3 * pace

    # A private copy: a fresh clone's demo.conf is readable by everyone, and
    # the daemon rightly warns about that for a file that holds secrets.
    private = tempfile.mkdtemp(prefix="ctinotify-demo-")
    private_config = os.path.join(private, "demo.conf")
    shutil.copyfile(config, private_config)
    os.chmod(private_config, 0o600)
    daemon = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "ctinotify.py"),
                               "run", "-c", private_config])
    print("=" * 72)
    print(" ctinotify DEMO - recorded Asterisk calls replayed by a fake PBX on")
    print(" 127.0.0.1:15038; no real Asterisk is involved.  In another terminal:")
    print()
    print("     nc 127.0.0.1 5039          (or: telnet 127.0.0.1 5039)")
    print("     LOGIN demo demo            sees every call")
    print("     LOGIN alice alice          sees only extension 100's calls")
    print("     FORMAT json                JSON lines instead of text")
    print()
    print(" Calls repeat in a loop.  Ctrl-C stops the demo.")
    print("=" * 72, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: fake._stop())
    try:
        fake.serve_forever(tick=tick)
    except KeyboardInterrupt:
        pass
    finally:
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(private, ignore_errors=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="run the demo (see make demo)")
    parser.add_argument("--config", default=os.path.join(HERE, "demo.conf"))
    parser.add_argument("--pace", type=float, default=0.8, help="seconds between call steps")
    parser.add_argument("--ami-port", type=int, default=15038,
                        help="the fake PBX's port (the config's [ami] port)")
    args = parser.parse_args(argv)
    if args.demo:
        return run_demo(args.config, args.pace, args.ami_port)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
