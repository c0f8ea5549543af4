#!/usr/bin/env python3
"""ctinotify: caller-ID popups and call events from Asterisk, for the desktop.

ctinotify runs on the Asterisk box, keeps one connection to the Asterisk
Manager Interface (AMI), follows every channel, dial and bridge, and tells
each logged-in desktop client about *its own* calls: incoming (with caller
ID), outgoing, answered, missed, busy, hung up.

How it fits together
--------------------
The file reads top down in the order the data travels: limits and
vocabulary, errors, configuration, the AMI codec and session, the call
engine, the client protocol with its line framing, the desktop client's
protocol and replay (all of these sans-I/O: bytes or messages in,
messages or notifications out), then the event loop and I/O, then the
command line.  One AMI byte's way to a desktop line::

    Asterisk --bytes--> AmiLink            socket, TLS, reconnects     [I/O]
        AmiSession.receive_data(bytes)     login, Ping, ActionIDs      [AMI session]
          AmiParser.feed -> AmiMessage     framing, limits, decoding   [AMI codec]
        CallEngine.handle(msg, now)        -> [Notification]           [engine]
    Daemon.deliver(notifications)          call log, then the hub      [I/O]
      ClientHub.deliver                    the connections of the user [I/O]
        encode_notification(fields, fmt)   one text or JSON line       [client protocol]
        WebEventBuffer.publish(user, ...)  its SSE frame, kept to replay [HTTP]
        LineClient/HttpClient.queue ... flush  written before the sleep [I/O]
    desktop <--line-- (watch: LineFramer -> WatchSession -> render_event)
    browser <--SSE--- (the page: EventSource -> handle -> textContent)

1. One ``selectors`` Loop, no threads.  A pass waits for sockets until the
   nearest timer (one heap of Timers), reads the clock once (``now`` for
   deadlines, ``wall`` for event times), runs the ready sockets' handlers,
   then the due timers, then one flush that writes every client's output.
2. An AmiLink per PBX owns its socket and state (idle, connecting,
   handshaking, login, resync, up; LINK_TIMEOUTS bounds each).  Bytes it
   reads go to its AmiSession, which frames them with an AmiParser, logs
   in and pings; messages come out, and the link hands each to its
   CallEngine (a response or list event first to whoever sent the action:
   ``send_action``), or a phone's state to the daemon's Board.  After a
   login it resyncs with CoreShowChannels (and the Board's lists).
3. The engine's notifications go to the Daemon, which appends finished
   calls to the CallLog (and the HISTORY it answers from) and passes them
   to the ClientHub; the hub encodes each once per format and queues it on
   every connection of its user that wants the kind (with the web on, the
   user's replay buffer keeps its SSE frame first, for every user).  The
   Board takes them too, and the hub sends each BoardChange to the viewers
   allowed to see it.
4. Each connection owns its buffers, state and deadline (handshaking, open,
   closing, closed): output limits, the lingering close, login timeouts.
   What a desktop sends goes through a LineFramer (bounded lines) into its
   ClientSession, whose reply lines go back the same way; LOGIN subscribes
   the connection to its user.  A Listener names the protocol its
   connections speak: LineClient, or HttpClient on ``web_port``, where an
   HttpRequestParser feeds route_web_request and ``GET /events`` makes the
   connection an event stream the hub delivers to like any other.  An
   action (DIAL, HANGUP, TRANSFER), once checked (ServerView.act,
   plan_action), goes to the ActionDesk, which sends it on its PBX's
   AmiLink and queues the reply on the connection that asked when Asterisk
   answers; the connection holds its later commands until then.

The same engine is fed from a live socket (``run``), from a recorded trace
(``replay``) and by the tests; ``watch`` is split the same way, a
WatchSession taking the server's lines and saying what to send, show, run
or open.

Run it::

    python3 ctinotify.py check  -c ctinotify.conf     # validate the config
    python3 ctinotify.py check  -c FILE --live        # ... and the AMI user, live
    python3 ctinotify.py run    -c ctinotify.conf     # the daemon
    python3 ctinotify.py replay TRACE.ami -c FILE     # what clients would see
    python3 ctinotify.py record OUT.ami -c FILE       # capture AMI traffic
    python3 ctinotify.py watch HOST --user NAME       # the desktop client

Test it: ``make test`` (pytest).  Standard library only, Python 3.8+.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import errno
import functools
import getpass
import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import re
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import webbrowser
try:
    import ssl
except ImportError:  # a Python built without OpenSSL: no TLS, all else works
    ssl = None  # type: ignore[assignment]
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

log = logging.getLogger("ctinotify")

# ---------------------------------------------------------------------------
# Limits, defaults and vocabulary (every limit has its unit in its name)
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_PATHS = ("/etc/asterisk/ctinotify.conf", "ctinotify.conf")
DEFAULT_CLIENT_PORT = 5039
#: The web client's own port (``[general] web_port``).  Not the line
#: protocol's port: that one greets on connect, and a browser opens
#: connections speculatively and may send its request seconds later, so one
#: port could not keep the greeting from browsers without delaying it for nc.
DEFAULT_WEB_PORT = 5041
#: A web login lasts this long (``web_session_hours``).
WEB_SESSION_HOURS = 12.0
#: The loop's deadline for a request's head, from the connection's accept or
#: the end of the previous response: 408 if a request was begun, else a
#: silent close (an idle keep-alive or a browser's speculative connection),
#: so it is the keep-alive idle timeout too.  A body announced by its head
#: (Content-Length) must follow within as long again.  The default of
#: ``web_request_timeout``.
HTTP_HEADER_TIMEOUT_S = 10.0
DEFAULT_AMI_PORT = 5038
#: Asterisk's TLS manager port (manager.conf ``tlsbindport``).  It is also
#: ctinotify's default client port: on one box only one of them can have it.
DEFAULT_AMI_TLS_PORT = 5039

#: Asterisk sends whole events; none of ours comes close to this.  A bigger
#: message is skipped, never buffered without bound.
MAX_AMI_MESSAGE_BYTES = 256 * 1024
#: The banner ``Asterisk Call Manager/x.y.z`` is a short line.
MAX_AMI_BANNER_BYTES = 256
AMI_CONNECT_TIMEOUT_S = 10.0
AMI_LOGIN_TIMEOUT_S = 15.0
AMI_PING_INTERVAL_S = 20.0
AMI_PING_TIMEOUT_S = 10.0
AMI_RECONNECT_MIN_S = 1.0
AMI_RECONNECT_MAX_S = 30.0
AMI_RECV_BYTES = 256 * 1024
#: Calls in progress outlive a lost AMI link this long: a quick reconnect
#: resynchronises them from CoreShowChannels instead of ending them.  The
#: time runs until a resync has finished, not only until a login.
AMI_RESYNC_GRACE_S = 60.0
#: A channel list (CoreShowChannels) not finished this long after the
#: request means a broken link: it is dropped and reconnected.  Asterisk
#: lists thousands of channels in well under a second.
AMI_RESYNC_TIMEOUT_S = 30.0

#: A client command is one short line.
MAX_CLIENT_LINE_BYTES = 1024
#: Caller ID and the other PBX text that reaches clients is cut to this many
#: characters: real names and numbers are far shorter, and a longer one
#: (attacker text, escaped up to 6 times over) would only strain clients.
MAX_FIELD_CHARS = 256
#: Received bytes a client may have waiting to be processed (complete lines
#: held back while a failed login's reply is delayed, plus a partial line).
MAX_CLIENT_PENDING_INPUT_BYTES = 4 * MAX_CLIENT_LINE_BYTES
CLIENT_AUTH_TIMEOUT_S = 30.0
CLIENT_RECV_BYTES = 4096
#: Output buffer limits, as Redis' ``client-output-buffer-limit pubsub``:
#: a client whose unsent output passes the hard limit is disconnected; one
#: that stays over the soft limit for the soft time, too.  Config keys
#: ``client_buffer_hard``, ``client_buffer_soft``, ``client_buffer_soft_seconds``.
CLIENT_OUTPUT_HARD_LIMIT_BYTES = 4 * 1024 * 1024
CLIENT_OUTPUT_SOFT_LIMIT_BYTES = 1024 * 1024
CLIENT_OUTPUT_SOFT_S = 60.0
#: The smallest hard limit the config accepts: a HISTORY reply must fit.
MIN_CLIENT_OUTPUT_LIMIT_BYTES = 64 * 1024
#: The kernel send buffer of a client socket.  Without it Linux grows it to
#: 4 MiB per idle reader (net.ipv4.tcp_wmem), memory the limits above do
#: not see; events are small, 64 KiB is plenty even across a WAN.
CLIENT_SNDBUF_BYTES = 64 * 1024
#: Connections at once, in total and per source address (an IPv6 source
#: counts per /64).  Config keys ``max_clients``, ``max_clients_per_host``.
MAX_CLIENTS = 1000
MAX_CLIENTS_PER_HOST = 50
#: Failed logins per source address: the ERR reply to the n-th failure is
#: delayed LOGIN_FAIL_DELAY_S * 2**(n-1), at most LOGIN_FAIL_DELAY_GROWTH times that;
#: the LOGIN_BLOCK_AFTER-th blocks the address for LOGIN_BLOCK_S.  Failures
#: older than LOGIN_FAIL_FORGET_S are forgotten; at most
#: MAX_LOGIN_TRACKED_HOSTS addresses are remembered (least recent dropped,
#: never a blocked one: then further addresses share one count).
LOGIN_FAIL_DELAY_S = 0.5
LOGIN_FAIL_DELAY_GROWTH = 16
LOGIN_BLOCK_AFTER = 10
LOGIN_BLOCK_S = 300.0
LOGIN_FAIL_FORGET_S = 900.0
MAX_LOGIN_TRACKED_HOSTS = 4096
#: Failed logins per account, from any address: the first LOGIN_ACCOUNT_FREE
#: (typos) cost nothing; after each further one the account takes no login
#: for LOGIN_ACCOUNT_DELAY_S, doubling per failure up to
#: LOGIN_ACCOUNT_DELAY_MAX_S, except from the LOGIN_KNOWN_ADDRESSES it last
#: logged in from.  At most MAX_LOGIN_TRACKED_ACCOUNTS names are remembered.
LOGIN_ACCOUNT_FREE = 3
LOGIN_ACCOUNT_DELAY_S = 1.0
LOGIN_ACCOUNT_DELAY_MAX_S = 30.0
LOGIN_KNOWN_ADDRESSES = 8
MAX_LOGIN_TRACKED_ACCOUNTS = 4096
#: Failed logins on one connection before it is closed.
MAX_LOGIN_ATTEMPTS_PER_CONNECTION = 3
#: Bad commands a connection may send before logging in (binary junk, a
#: browser, a TLS client on the plain port) before it is closed.
MAX_CLIENT_ERRORS_BEFORE_LOGIN = 10
#: After a connection's last reply: how long to wait for the peer to read
#: it and close, discarding what it still sends, before closing anyway.
CLIENT_LINGER_S = 2.0
#: TCP keepalive on client sockets finds desktops that vanished without a
#: FIN (a laptop lid, a pulled cable): idle seconds, probe interval, probes.
CLIENT_KEEPALIVE_IDLE_S = 60
CLIENT_KEEPALIVE_INTERVAL_S = 10
CLIENT_KEEPALIVE_PROBES = 6
#: Out of file descriptors: stop accepting for this long instead of
#: spinning on a listener that stays readable (as asyncio does).
ACCEPT_PAUSE_S = 1.0
#: Connections accepted per readable listener before the others get a turn.
ACCEPT_BURST = 64
#: A repeated warning (refused connections, bad AMI messages) is logged at
#: most once per this interval, with a count of the ones left out.
LOG_REPEAT_INTERVAL_S = 10.0
#: HISTORY: finished calls kept per user, and the default and largest n.
HISTORY_PER_USER = 100
HISTORY_DEFAULT_COUNT = 10
#: How much of the call log's tail seeds the history at start.
HISTORY_SEED_MAX_BYTES = 4 * 1024 * 1024
#: A listen() backlog for bursts of desktop reconnects.
LISTEN_BACKLOG = 128

#: ``ctinotify watch`` waits 1, 2, 4 ... s, at most this long, between reconnects.
WATCH_RECONNECT_MIN_S = 1.0
WATCH_RECONNECT_MAX_S = 30.0
WATCH_CONNECT_TIMEOUT_S = 10.0
#: The longest a blocking read waits, so hooks are reaped and Ctrl-C is
#: seen (on Windows a blocked recv() does not see it) this often.
WATCH_TICK_S = 1.0
#: A server silent this long is sent PING; no answer within the timeout
#: means a dead connection (a laptop resumed, a NAT forgot the mapping).
WATCH_PING_INTERVAL_S = 60.0
WATCH_PONG_TIMEOUT_S = 15.0
#: ``HISTORY <n>`` after login: the calls searched for missed ones.
WATCH_HISTORY_CALLS = 20
#: A server line (HISTORY records with a long path are the longest).
MAX_WATCH_LINE_BYTES = 256 * 1024
WATCH_RECV_BYTES = 64 * 1024
#: Hook processes running at once; beyond it an event's hook is skipped.
MAX_HOOK_PROCESSES = 8
DEFAULT_WATCH_STATE = os.path.join("~", ".ctinotify-watch.json")
#: Hangup reasons of a missed call (``role=callee``, ``direction = in``):
#: nobody of the user's answered it, whatever the reason.  Not
#: answered_elsewhere: somebody took that call.
MISSED_REASONS = ("noanswer", "cancelled", "busy", "failed")
#: Calls watch remembers the popup url and forwards of, until their hangup
#: (a call whose hangup never came is forgotten, oldest first).
WATCH_CALL_MEMORY = 256
#: ``watch --missed``: the calls asked for (the server keeps 100 per user).
WATCH_MISSED_HISTORY = 100

#: DIAL, HANGUP and TRANSFER a user may send a minute, by default (config
#: ``actions_per_minute``): a desktop gone wild cannot flood Asterisk.
ACTIONS_PER_MINUTE = 10
#: Seconds Asterisk may take to answer an action before the desktop gets
#: ERR 504 (config ``action_timeout``); it answers in milliseconds.
ACTION_TIMEOUT_S = 10.0
#: How long DIAL rings the user's own phone (Originate ``Timeout``, sent
#: explicitly: Asterisk's own default, so the wait for its outcome is known).
DIAL_RING_S = 30.0
#: The longest number DIAL and TRANSFER take, once spaces and punctuation
#: are dropped (E.164 is 15 digits; room for prefixes and ``*`` codes).
MAX_DIAL_CHARS = 32
#: The dialplan context DIAL and TRANSFER dial in (config ``dial_context``).
DEFAULT_DIAL_CONTEXT = "from-internal"
#: ``watch --dial`` gives up on an outcome after this long: the ring time,
#: the server's wait for Asterisk on top (twice), and the connect.
WATCH_DIAL_WAIT_S = DIAL_RING_S + 2 * ACTION_TIMEOUT_S + WATCH_CONNECT_TIMEOUT_S


# -- the vocabulary of events: each value a client can see, named once ------


class Kind:
    """The kinds of event (``event=``) a client can subscribe to."""

    INCOMING = "incoming"
    OUTGOING = "outgoing"
    PICKUP = "pickup"
    HANGUP = "hangup"
    TIMEOUT = "timeout"
    BUSY = "busy"
    DIVERT = "divert"
    TRANSFER = "transfer"
    QUEUE = "queue"
    PARK = "park"
    UNPARK = "unpark"
    CONFERENCE = "conference"
    HOLD = "hold"
    UNHOLD = "unhold"
    #: A colleague's line on the office board changed (not a call of the
    #: user's own: only for users whose ``board`` is not ``none``).
    STATE = "state"


#: Every kind of event a client can subscribe to with ``events=``, in order.
EVENT_KINDS = (
    Kind.INCOMING, Kind.OUTGOING, Kind.PICKUP, Kind.HANGUP, Kind.TIMEOUT, Kind.BUSY,
    Kind.DIVERT, Kind.TRANSFER, Kind.QUEUE, Kind.PARK, Kind.UNPARK, Kind.CONFERENCE,
    Kind.HOLD, Kind.UNHOLD, Kind.STATE,
)


#: Words a person may type for kinds (``events =``, ``EVENTS``, ``watch
#: --exec``) and the protocol kinds each stands for.  ``answered`` is
#: ``pickup`` (the call was answered, by the user or by another phone);
#: ``missed`` is ``hangup``, the event whose reason says whether an
#: incoming call was missed (``watch --exec missed=`` runs for those only).
KIND_ALIASES = {"answered": (Kind.PICKUP,), "missed": (Kind.HANGUP,)}


def kinds_of(word: str) -> Tuple[str, ...]:
    """The protocol kinds a typed word stands for; () for no kind."""
    word = word.strip().lower()
    if word in EVENT_KINDS:
        return (word,)
    return KIND_ALIASES.get(word, ())


class Reason:
    """Why a call ended for its user (``hangup reason=``); all but
    COMPLETED and TRANSFERRED are also the verdict on a call not answered."""

    COMPLETED = "completed"
    BUSY = "busy"
    NOANSWER = "noanswer"
    CANCELLED = "cancelled"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    TRANSFERRED = "transferred"
    FAILED = "failed"
    UNKNOWN = "unknown"


#: A user call's ``direction`` (call log): the user is called, or calls.
CALL_IN, CALL_OUT = "in", "out"


class Direction:
    """``direction=`` of divert and transfer events, as the user sees it."""

    TO = "to"        # the user's call went elsewhere (the user transferred it)
    FROM = "from"    # it came to the user from another number (or transferer)
    MOVED = "moved"  # someone else transferred the user's own call


class TransferKind:
    """``kind=`` of a transfer: BLONDE is attended, completed while ringing."""

    BLIND = "blind"
    ATTENDED = "attended"
    BLONDE = "blonde"


class Action:
    """``action=`` of queue and conference events."""

    JOIN = "join"
    LEAVE = "leave"
    ABANDON = "abandon"


class ParkResult:
    """``result=`` of an unpark."""

    RETRIEVED = "retrieved"
    TIMEOUT = "timeout"
    ABANDONED = "abandoned"


class PickupMethod:
    """``method=`` of a pickup by another extension's pickup code."""

    DIRECTED = "directed"
    GROUP = "group"


class CallState:
    """``state=`` of a call in progress (the CALLS command)."""

    RINGING = "ringing"
    UP = "up"


class CallAction:
    """What a desktop may do to calls: the commands DIAL, HANGUP and
    TRANSFER, and the names a user's ``actions =`` allows them by."""

    DIAL = "dial"
    HANGUP = "hangup"
    TRANSFER = "transfer"


#: Every action a user's ``actions`` may allow, in order.
CALL_ACTIONS = (CallAction.DIAL, CallAction.HANGUP, CallAction.TRANSFER)

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class CtiError(Exception):
    """Base class of every error ctinotify raises on purpose."""


class ConfigError(CtiError):
    """The configuration is invalid; ``problems`` holds one line per error,
    each ``FILE:LINE: [section] key: what is wrong, what was expected``."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class AmiProtocolError(CtiError):
    """The AMI peer sent something that is not the manager protocol."""


class ClientProtocolError(CtiError):
    """A desktop client broke the line protocol; ``code`` and ``text`` are
    its ``ERR`` reply, ``reason`` says more, for the log."""

    def __init__(self, code: str, text: str, reason: str = ""):
        super().__init__("%s %s" % (code, text))
        self.code = code
        self.text = text
        self.reason = reason or text


class WatchProtocolError(CtiError):
    """The server ``watch`` connected to broke the client protocol."""


# ---------------------------------------------------------------------------
# Configuration: Asterisk-style INI in, validated immutable objects out
# ---------------------------------------------------------------------------


class IniOption:
    """One ``key = value`` line, remembered with where it came from."""

    __slots__ = ("key", "value", "lineno")

    def __init__(self, key: str, value: str, lineno: int):
        self.key = key
        self.value = value
        self.lineno = lineno


class IniSection:
    """A ``[name]`` block, with Asterisk template inheritance applied."""

    __slots__ = ("name", "lineno", "options", "is_template", "templates")

    def __init__(self, name: str, lineno: int, is_template: bool = False):
        self.name = name
        self.lineno = lineno
        self.options: List[IniOption] = []
        self.is_template = is_template
        #: The templates (``[name](!)``) it inherits, directly or through
        #: another template: what ``board = @name`` goes by.
        self.templates: Tuple[str, ...] = ()

    def inherit(self, parent: "IniSection") -> None:
        """Note ``parent``'s templates (and itself, if one) as ours."""
        inherited = ((parent.name,) if parent.is_template else ()) + parent.templates
        self.templates += tuple(t for t in inherited if t not in self.templates)

    def get(self, key: str) -> Optional[IniOption]:
        """The last ``key`` line of the section (later lines override)."""
        found = None
        for option in self.options:
            if option.key == key:
                found = option
        return found


_SECTION_LINE = re.compile(r"^\[([^\]]+)\]\s*(?:\(([^)]*)\))?\s*$")


def parse_ini(text: str, filename: str) \
        -> Tuple[List[IniSection], List[str], Dict[str, List[str]]]:
    """Parse Asterisk-style INI text into sections, a list of problems,
    and each template's sections (template name -> the names of the
    sections that inherit it, directly or not).

    Accepts ``;`` comments (``\\;`` is a literal semicolon), ``key = value``
    and ``key => value``, and templates: ``[name](!)`` defines one,
    ``[name](tpl1,tpl2)`` inherits their options.  Keys are case-insensitive.
    """
    sections: List[IniSection] = []
    by_name: Dict[str, IniSection] = {}
    problems: List[str] = []
    current: Optional[IniSection] = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(?<!\\);.*", "", raw).replace("\\;", ";").strip()
        if not line:
            continue
        if line.startswith("#"):
            problems.append("%s:%d: %s: directives are not supported, inline the file"
                            % (filename, lineno, line.split()[0]))
            continue
        match = _SECTION_LINE.match(line)
        if match:
            name = match.group(1).strip()
            flags = [f.strip() for f in (match.group(2) or "").split(",") if f.strip()]
            current = IniSection(name, lineno, is_template="!" in flags)
            for template in flags:
                if template == "!":
                    continue
                parent = by_name.get(template)
                if parent is None:
                    problems.append("%s:%d: [%s]: unknown template %r, define it above"
                                    % (filename, lineno, name, template))
                else:
                    current.options.extend(parent.options)
                    current.inherit(parent)
            if name in by_name and not by_name[name].is_template:
                problems.append("%s:%d: [%s]: section defined twice (first at line %d), "
                                "expected each section once"
                                % (filename, lineno, name, by_name[name].lineno))
            by_name[name] = current
            sections.append(current)
            continue
        key, sep, value = line.partition("=")
        if not sep:
            where = "[%s] " % current.name if current else ""
            # Only the first word: the rest may be a secret with a typo.
            word = re.split(r"[\s:]", line, 1)[0][:40]
            problems.append("%s:%d: %s%s: not a 'key = value' line, expected key = value"
                            % (filename, lineno, where, word))
            continue
        value = value[1:] if value.startswith(">") else value
        key = key.strip().lower()
        if current is None:
            problems.append("%s:%d: %s: option outside any section, expected a [section] above"
                            % (filename, lineno, key))
            continue
        current.options.append(IniOption(key, value.strip(), lineno))
    return [s for s in sections if not s.is_template], problems, _template_members(sections)


def _template_members(sections: Sequence[IniSection]) -> Dict[str, List[str]]:
    """Each template -> the sections that inherit it (``board = @name``)."""
    members: Dict[str, List[str]] = {s.name: [] for s in sections if s.is_template}
    for section in sections:
        if not section.is_template:
            for template in section.templates:
                members[template].append(section.name)
    return members


#: Channel technology prefixes as users write them -> as Asterisk names them.
_TECH_ALIASES = {
    "sip": "SIP", "pjsip": "PJSIP", "iax": "IAX2", "iax2": "IAX2", "zap": "DAHDI",
    "dahdi": "DAHDI", "local": "Local", "skinny": "Skinny", "sccp": "SCCP",
    "motif": "Motif", "unistim": "USTM", "ustm": "USTM", "console": "Console",
}


def normalize_device(text: str) -> str:
    """``iax/100`` -> ``IAX2/100``, ``Zap/1`` -> ``DAHDI/1``; the resource keeps its case."""
    tech, sep, resource = text.strip().partition("/")
    if not sep or not tech or not resource:
        raise ValueError("not a device")
    return _TECH_ALIASES.get(tech.lower(), tech) + "/" + resource


def split_device(text: str) -> Tuple[str, str]:
    """``branch:PJSIP/100`` -> ``("branch", "PJSIP/100")``: a device on one
    PBX only; ``PJSIP/100`` -> ``("", "PJSIP/100")``: on every PBX."""
    pbx, colon, device = text.partition(":")
    if not colon or "/" in pbx:
        return "", text
    return pbx, device


def device_of_interface(text: str) -> str:
    """A device as Asterisk names it in a queue member Interface or a dial
    string (``PJSIP/al-ice``, ``Local/100@from-queue/n``, ``SIP/1,20``):
    unlike a channel name it has no ``-<sequence>`` to strip."""
    device = text.partition(",")[0].partition("&")[0]
    if device.endswith("/n"):
        device = device[:-2]
    tech, sep, resource = device.partition("/")
    return _TECH_ALIASES.get(tech.lower(), tech) + sep + resource


def device_of_channel(channel_name: str) -> str:
    """The device a channel belongs to: ``PJSIP/100-0000001a`` -> ``PJSIP/100``.

    Asterisk names channels ``TECH/resource-<sequence>``; Local channels are
    ``Local/exten@context-<seq>;1`` and their device is ``Local/exten@context``.
    """
    name = channel_name
    if name.endswith((";1", ";2")):
        name = name[:-2]
    head, sep, _seq = name.rpartition("-")
    if sep and "/" in head:
        name = head
    tech, sep, resource = name.partition("/")
    return _TECH_ALIASES.get(tech.lower(), tech) + sep + resource


class UserConfig:
    """One client account: ``[name]`` with its secret and what it may see."""

    __slots__ = ("name", "secret", "hosts", "devices", "extensions", "events", "lineno",
                 "popup_url", "board", "board_details", "fullname",
                 "actions", "dial_device", "dial_context", "dial_callerid", "actions_per_minute")

    def __init__(self, name: str, secret: str, hosts: Optional[Tuple[object, ...]],
                 devices: Tuple[str, ...], extensions: Tuple[Tuple[str, str], ...],
                 events: Tuple[str, ...], lineno: int = 0, popup_url: str = "",
                 board: Optional[frozenset] = frozenset(), board_details: bool = False,
                 fullname: str = "",
                 actions: Tuple[str, ...] = (), dial_device: str = "", dial_context: str = "",
                 dial_callerid: str = "", actions_per_minute: int = 0):
        self.name = name
        self.secret = secret
        #: ``None`` means ``host = dynamic`` (any address); else ip_network objects.
        self.hosts = hosts
        #: Normalized device names (``PJSIP/100``).
        self.devices = devices
        #: ``(number, context)`` pairs; an empty context matches any context.
        self.extensions = extensions
        #: The event kinds this user may receive.
        self.events = events
        self.lineno = lineno
        #: A URL template with ``{from_num}``-style placeholders (empty: none);
        #: its ``incoming`` events carry it, filled in, as ``url``.
        self.popup_url = popup_url
        #: The colleagues whose board line the user may see: None for
        #: ``board = all``, empty for ``none`` (then no ``state`` event either).
        self.board = board
        #: ``board_details``: also with whom those colleagues are on the phone.
        self.board_details = board_details
        #: The name the board shows (empty: learned from their phone, or the user name).
        self.fullname = fullname
        #: What the user may do to calls (CALL_ACTIONS): DIAL, HANGUP, TRANSFER.
        self.actions = actions
        #: The phone DIAL rings first, one of ``devices`` (empty: no DIAL).
        self.dial_device = dial_device
        #: The context DIAL and TRANSFER dial in; empty: [general]'s.
        self.dial_context = dial_context
        #: ``"Name" <number>``: the caller ID of the calls DIAL makes.
        self.dial_callerid = dial_callerid
        #: Actions a minute; 0: [general]'s ``actions_per_minute``.
        self.actions_per_minute = actions_per_minute

    def host_allowed(self, address: str) -> bool:
        if self.hosts is None:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.hosts)  # type: ignore[operator]


#: The name of the PBX of the ``[ami]`` section; ``[ami:NAME]`` adds others.
DEFAULT_PBX = "default"
_PBX_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def is_host_name(host: str) -> bool:
    """A name getaddrinfo can look up: dot-separated labels of letters,
    digits, '-' and '_', non-ASCII ones in IDNA form.  ``pbx..example.com``
    is not (getaddrinfo would raise UnicodeError, not OSError)."""
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_name[:-1].split(".") if ascii_name.endswith(".") else ascii_name.split(".")
    return len(ascii_name) <= 253 and all(map(_HOST_LABEL.match, labels))


class Setting:
    """One key of a section: its type, default, bounds and meaning.  The
    tables below drive key checks, parsing, the objects built and
    ``check``'s output (the README's configuration reference says the same).

    ``kind``: ``text``; ``address`` (an IP address); ``host`` (an IP address
    or a host name); ``number`` (seconds, say) or ``integer`` from ``low``
    to ``high``; ``size`` (bytes: ``4mb``; ``allow_zero``: 0 too);
    ``choice`` (one of ``choices``); ``boolean``; ``port`` (``allow_off``:
    ``off`` gives None; a default of None: no value means no such port).
    ``advanced`` keys are for tests and odd networks: ``check`` shows them
    only when set.  ``needs``: shown only while that key is on (a tuple:
    while one of them is).
    """

    __slots__ = ("key", "kind", "default", "low", "high", "choices", "help", "advanced",
                 "needs", "secret", "required", "allow_zero", "allow_off")

    def __init__(self, key: str, kind: str, default: object, help: str, low: float = 0,
                 high: float = 0, choices: Sequence[str] = (), advanced: bool = False,
                 needs: Union[str, Tuple[str, ...]] = "", secret: bool = False,
                 required: bool = False,
                 allow_zero: bool = False, allow_off: bool = False):
        self.key = key
        self.kind = kind
        self.default = default
        self.help = help
        self.low = low
        self.high = high
        self.choices = tuple(choices)
        self.advanced = advanced
        self.needs = (needs,) if isinstance(needs, str) and needs else tuple(needs)
        self.secret = secret
        self.required = required
        self.allow_zero = allow_zero
        self.allow_off = allow_off

    def shown(self, value: object) -> str:
        """The value as ``check`` prints it (a secret masked)."""
        if value is None:
            return "off"
        if self.secret:
            return mask(str(value))
        if self.kind == "boolean":
            return "yes" if value else "no"
        if self.kind == "number":
            return "%g" % value  # type: ignore[str-format]
        return str(value)

    def describe(self, values: Dict[str, object]) -> List[str]:
        """``key = value`` for ``check``, or nothing if it goes unsaid."""
        value = values[self.key]
        if self.needs and all(values[k] is None or values[k] is False for k in self.needs) or \
                value is None and not self.allow_off or \
                self.advanced and value == self.default:
            return []
        return ["%s = %s" % (self.key, self.shown(value))]


_LOGLEVELS = ("debug", "info", "warning", "error")
#: Where ``run`` may log (``log =`` in [general]).
LOG_TARGETS = ("auto", "stderr", "syslog")
#: Where syslog(3) listens on Linux and the BSDs.
DEFAULT_SYSLOG_SOCKET = "/dev/log"
SYSLOG_FACILITIES = ("daemon",) + tuple("local%d" % n for n in range(8))

#: ``[general]``: the client ports and the daemon itself.
GENERAL_SETTINGS = (
    Setting("bind", "address", "0.0.0.0", "address for clients; :: for IPv4 and IPv6"),
    # Port 0 asks the kernel for a free port (the tests use it).
    Setting("port", "port", DEFAULT_CLIENT_PORT, "the plain-text client port; off: TLS only",
            0, 65535, allow_off=True),
    Setting("loglevel", "choice", "info", "how much run logs", choices=_LOGLEVELS),
    Setting("calllog", "text", "", "file to append every finished call to (JSON lines)"),
    Setting("login_timeout", "number", CLIENT_AUTH_TIMEOUT_S, "seconds a client may stay "
            "connected without logging in (TLS port: also without its handshake)", 1, 3600),
    Setting("log", "choice", "auto", "where run logs: auto (syslog with --daemon, else "
            "stderr), stderr or syslog; read at start only", choices=LOG_TARGETS),
    Setting("syslog_facility", "choice", "daemon", "the syslog facility",
            choices=SYSLOG_FACILITIES),
    Setting("syslog_socket", "text", DEFAULT_SYSLOG_SOCKET, "the Unix socket syslog listens on"),
    Setting("max_clients", "integer", MAX_CLIENTS, "connections at once", 1, 100000),
    Setting("max_clients_per_host", "integer", MAX_CLIENTS_PER_HOST,
            "connections at once from one address (IPv6: one /64)", 1, 100000),
    Setting("client_buffer_hard", "size", CLIENT_OUTPUT_HARD_LIMIT_BYTES, "unsent output a "
            "client may have before it is disconnected", MIN_CLIENT_OUTPUT_LIMIT_BYTES,
            1024 ** 3),
    Setting("client_buffer_soft", "size", CLIENT_OUTPUT_SOFT_LIMIT_BYTES, "unsent output a "
            "client may have for client_buffer_soft_seconds (0: no soft limit)",
            MIN_CLIENT_OUTPUT_LIMIT_BYTES, 1024 ** 3, allow_zero=True),
    Setting("client_buffer_soft_seconds", "number", CLIENT_OUTPUT_SOFT_S,
            "how long a client may stay over the soft limit", 0, 3600),
    Setting("login_fail_delay", "number", LOGIN_FAIL_DELAY_S, "seconds the reply to an "
            "address's first failed login waits (doubling per failure)", 0, 60),
    Setting("login_block_after", "integer", LOGIN_BLOCK_AFTER, "failed logins from an "
            "address that block it (0: never)", 0, 1000),
    Setting("login_block_seconds", "number", LOGIN_BLOCK_S, "how long such a block lasts",
            1, 86400),
    # Actions on calls (DIAL, HANGUP, TRANSFER): a user's own key overrides the first two.
    Setting("dial_context", "text", DEFAULT_DIAL_CONTEXT, "the dialplan context DIAL and "
            "TRANSFER dial numbers in"),
    Setting("actions_per_minute", "integer", ACTIONS_PER_MINUTE, "DIAL, HANGUP and TRANSFER "
            "commands one user may send a minute", 1, 1000),
    Setting("action_timeout", "number", ACTION_TIMEOUT_S, "seconds Asterisk may take to "
            "answer an action before the desktop gets ERR 504", 0.01, 300, advanced=True),
    Setting("tls_port", "port", None, "the TLS client port (empty: none)", 0, 65535),
    Setting("tls_cert", "text", "", "PEM certificate (chain) of the TLS ports",
            needs=("tls_port", "web_tls_port")),
    Setting("tls_key", "text", "", "its PEM key (empty: in tls_cert)",
            needs=("tls_port", "web_tls_port")),
    Setting("web", "boolean", True, "serve the web page and event streams (web_port)"),
    Setting("web_port", "port", DEFAULT_WEB_PORT, "the web page's HTTP port; off: HTTPS "
            "only", 0, 65535, allow_off=True, needs="web"),
    Setting("web_tls_port", "port", None, "the web page's HTTPS port (empty: none; with "
            "tls_cert)", 0, 65535, needs="web"),
    Setting("web_session_hours", "number", WEB_SESSION_HOURS, "hours a browser login lasts",
            0.0001, 24 * 366, needs="web"),
    Setting("linger_timeout", "number", CLIENT_LINGER_S, "seconds a closing connection "
            "waits for the client to read its last reply and close", 0.01, 60,
            advanced=True),
    Setting("web_request_timeout", "number", HTTP_HEADER_TIMEOUT_S, "seconds a browser "
            "has to send a request's head (from its connect or the last reply: an idle "
            "connection closes then), and its body after that", 0.01, 3600, advanced=True),
)

#: ``[ami]`` and ``[ami:NAME]``: one Asterisk to connect to.
AMI_SETTINGS = (
    Setting("host", "host", "127.0.0.1", "where Asterisk's manager listens"),
    Setting("port", "port", DEFAULT_AMI_PORT, "its port (%d with tls = yes)"
            % DEFAULT_AMI_TLS_PORT, 1, 65535),
    Setting("username", "text", "", "the manager.conf user", required=True),
    Setting("secret", "text", "", "its secret", secret=True, required=True),
    Setting("auth", "choice", "plain", "md5: log in with a challenge, never sending the "
            "secret", choices=("plain", "md5")),
    Setting("ping_interval", "number", AMI_PING_INTERVAL_S, "seconds between keep-alive "
            "Pings", 1, 3600),
    Setting("reconnect_max", "number", AMI_RECONNECT_MAX_S, "longest wait between "
            "reconnects", 1, 3600),
    Setting("tls", "boolean", False, "connect with TLS (manager.conf tlsenable)"),
    Setting("tls_verify", "boolean", True, "check Asterisk's certificate and host name",
            needs="tls"),
    Setting("tls_ca", "text", "", "the CAs to check it against (empty: the system's)",
            needs="tls"),
    Setting("connect_timeout", "number", AMI_CONNECT_TIMEOUT_S, "seconds to connect (and "
            "finish TLS) before trying again", 0.01, 3600, advanced=True),
    Setting("login_timeout", "number", AMI_LOGIN_TIMEOUT_S, "seconds Asterisk may take to "
            "greet and answer the login", 0.01, 3600, advanced=True),
    Setting("ping_timeout", "number", AMI_PING_TIMEOUT_S, "seconds a Ping may go "
            "unanswered before the link counts as lost", 0.01, 3600, advanced=True),
    Setting("resync_timeout", "number", AMI_RESYNC_TIMEOUT_S, "seconds the channel list "
            "may take after a login before the link counts as lost", 0.01, 3600,
            advanced=True),
    Setting("resync_grace", "number", AMI_RESYNC_GRACE_S, "seconds calls in progress "
            "outlive a lost link, waiting for a resync to say which went on", 0.01, 3600,
            advanced=True),
)

GENERAL_KEYS = tuple(setting.key for setting in GENERAL_SETTINGS)
AMI_KEYS = tuple(setting.key for setting in AMI_SETTINGS)


class _Immutable:
    """Set in ``__init__``, never changed after: a reload builds new ones."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("%s is immutable: build a new one" % type(self).__name__)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)


class AmiConfig(_Immutable):
    """An ``[ami]`` or ``[ami:NAME]`` section: how to reach and log in to one
    Asterisk.  Every key of AMI_SETTINGS is an attribute of the same name."""

    __slots__ = ("name", "_values") + AMI_KEYS

    def __init__(self, name: str = DEFAULT_PBX, **values: object):
        #: The PBX's name: ``default`` for [ami], NAME for [ami:NAME].
        self._set("name", name)
        self._set("_values", {s.key: values.pop(s.key, s.default) for s in AMI_SETTINGS})
        if values:
            raise TypeError("not [ami] keys: %s" % ", ".join(values))
        for key, value in self._values.items():
            self._set(key, value)

    def key(self) -> tuple:
        """What a reload compares: another key is another link."""
        return (self.name,) + tuple(self._values.values())

    def describe(self) -> List[str]:
        lines = ["[ami]" if self.name == DEFAULT_PBX else "[ami:%s]" % self.name]
        for setting in AMI_SETTINGS:
            lines += setting.describe(self._values)
        return lines


class Config(_Immutable):
    """The whole validated configuration, built once: a reload builds a new
    one.  Every key of GENERAL_SETTINGS is an attribute of the same name."""

    __slots__ = ("path", "pbxes", "ami", "users", "origins", "tls_context",
                 "ami_tls_contexts", "_values") + GENERAL_KEYS

    def __init__(self, path: str, general: Dict[str, object], pbxes: Sequence[AmiConfig],
                 users: Dict[str, UserConfig], origins: Optional[Dict[str, str]] = None,
                 tls_context: Optional["ssl.SSLContext"] = None,
                 ami_tls_contexts: Optional[Dict[str, "ssl.SSLContext"]] = None):
        self._set("path", path)
        self._set("_values", {s.key: general.get(s.key, s.default) for s in GENERAL_SETTINGS})
        for key, value in self._values.items():
            self._set(key, value)
        #: The PBXes to connect to: [ami] first, then each [ami:NAME].
        self._set("pbxes", tuple(pbxes))
        self._set("ami", self.pbxes[0])
        self._set("users", users)
        #: ``key -> "FILE:LINE: [section] key"`` for problems found after parsing.
        self._set("origins", dict(origins or {}))
        #: Built by load_config from the files named (None otherwise).
        self._set("tls_context", tls_context)
        #: TLS contexts of the PBXes with ``tls = yes``, by name.
        self._set("ami_tls_contexts", dict(ami_tls_contexts or {}))

    def replace(self, **changes: object) -> "Config":
        """A new Config, this one with ``changes`` (path, TLS contexts)."""
        fields: Dict[str, object] = dict(
            path=self.path, general=self._values, pbxes=self.pbxes, users=self.users,
            origins=self.origins, tls_context=self.tls_context,
            ami_tls_contexts=self.ami_tls_contexts)
        fields.update(changes)
        return Config(**fields)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The effective configuration as INI, secrets masked."""
        lines = ["; effective configuration of %s" % self.path, "[general]"]
        for setting in GENERAL_SETTINGS:
            lines += setting.describe(self._values)
        for ami in self.pbxes:
            lines += [""] + ami.describe()
        for user in self.users.values():
            hosts = "dynamic" if user.hosts is None else ",".join(str(h) for h in user.hosts)
            exts = ",".join(n + ("@" + c if c else "") for n, c in user.extensions)
            lines += ["", "[%s]" % user.name, "secret = %s" % mask(user.secret),
                      "host = %s" % hosts, "devices = %s" % ",".join(user.devices),
                      "extensions = %s" % exts, "events = %s" % ",".join(user.events)]
            if user.popup_url:
                lines.append("popup_url = %s" % user.popup_url)
            if user.board is None or user.board:
                lines.append("board = %s" % ("all" if user.board is None else ",".join(
                    name for name in self.users if name in user.board)))
                lines.append("board_details = %s" % ("yes" if user.board_details else "no"))
            if user.fullname:
                lines.append("fullname = %s" % user.fullname)
            lines += self._describe_actions(user)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _describe_actions(user: UserConfig) -> List[str]:
        """A user's action keys, for ``check``: none without actions."""
        if not user.actions:
            return []
        lines = ["actions = %s" % ",".join(user.actions)]
        if CallAction.DIAL in user.actions:
            lines += ["dial_device = %s" % user.dial_device,
                      "dial_callerid = %s" % user.dial_callerid]
        if user.dial_context:
            lines.append("dial_context = %s" % user.dial_context)
        if user.actions_per_minute:
            lines.append("actions_per_minute = %d" % user.actions_per_minute)
        return lines

    def advisories(self) -> List[str]:
        """Valid but likely unmeant settings, for ``check`` and ``run`` (at
        start and at each reload) to warn about: no users, a published
        example secret (nobody can log in with it), a device no channel can
        ever belong to, a user who can never receive an event, a number
        that counts on every PBX, users who may act on calls (the manager
        user needs the classes for it)."""
        notes = []
        if not self.users:
            notes.append("%s defines no client users: nobody can log in" % self.path)
        for pbx in self.pbxes:
            if is_example_secret(pbx.secret):
                notes.append("%s: a published example secret; give the manager user a "
                             "secret of its own, in manager.conf and here"
                             % self.origins.get("secret:" + pbx.name, self.path))
        for user in self.users.values():
            notes += user_advisories(user, self.path)
        return notes + self._action_advisories() + self._site_advisories()

    def _site_advisories(self) -> List[str]:
        """With several PBXes, a number without ``NAME:`` counts on every
        one, though the user's phones are all on some of them (two sites
        with the same numbering would see each other's calls)."""
        notes: List[str] = []
        if len(self.pbxes) < 2:
            return notes
        for user in self.users.values():
            sites = {split_device(device)[0] for device in user.devices}
            if not user.devices or "" in sites:
                continue  # some phone counts on every PBX anyway
            for number, _context in user.extensions:
                if ":" not in number:
                    notes.append("%s:%d: [%s] extensions: %s counts on every PBX, but %s's "
                                 "phones are on %s only; write %s:%s to keep it there"
                                 % (self.path, user.lineno, user.name, number, user.name,
                                    ", ".join(sorted(sites)), sorted(sites)[0], number))
        return notes


    def _action_advisories(self) -> List[str]:
        """Users with actions: the manager user must be allowed to send them."""
        acting = [user.name for user in self.users.values() if user.actions]
        if not acting:
            return []
        return ["%s: %s may act on calls (actions =): the manager.conf user%s %s need%s "
                "write = originate,call (Originate for DIAL, Hangup and BlindTransfer for "
                "HANGUP and TRANSFER), else Asterisk answers them 'Permission denied'"
                % (self.path, ", ".join(acting), "s" if len(self.pbxes) > 1 else "",
                   ", ".join(sorted({pbx.username for pbx in self.pbxes})),
                   "" if len(self.pbxes) > 1 else "s")]


def mask(secret: str) -> str:
    return "********" if secret else "(empty)"


#: Secrets that ctinotify's own files publish as examples: the example
#: ctinotify.conf (this one and the earlier ones), the README's
#: configuration snippets and the original request's ``[client1]``.  Anyone
#: can read them, so a LOGIN (or web login) with one is refused, whoever
#: it names, and ``check``/``run`` name the users that have one.  The test
#: configurations (tests/*.conf: ``LOGIN demo demo`` of ``make demo``) are
#: not among them: they bind 127.0.0.1 and are not copied to a PBX.
EXAMPLE_SECRETS = frozenset((
    "blah", "change-me", "change-me-too", "alice-desk-secret", "bob-desk-secret", "...",
))


def is_example_secret(secret: str) -> bool:
    """Whether ``secret`` is a published example (case and spaces aside)."""
    return secret.strip().casefold() in EXAMPLE_SECRETS


#: The channel technologies of phones (``core show channeltypes``); any
#: other is most likely a typo.  Local is one too, but never a phone: the
#: engine follows a Local channel through to the phone it rings.
PHONE_TECHNOLOGIES = ("PJSIP", "SIP", "IAX2", "DAHDI", "Skinny", "SCCP", "MGCP", "OOH323",
                      "Motif", "USTM", "Console")
#: The ``-<sequence>`` Asterisk appends to a device to name one channel:
#: 8 hex digits (PJSIP, SIP: PJSIP/100-0000001a), a number for DAHDI (DAHDI/1-1).
_CHANNEL_SEQUENCE = re.compile(r"-[0-9a-fA-F]{8}$|^DAHDI/[0-9]+-[0-9]+$")


def device_problem(device: str) -> str:
    """Why no channel can ever belong to ``device`` (a normalized device,
    maybe ``NAME:`` qualified), or "" if one can."""
    device = split_device(device)[1]
    tech, _, resource = device.partition("/")
    if tech == "Local":
        return ("a Local channel, which ctinotify follows through to the phone it rings; "
                "name that phone (PJSIP/100), or the number in extensions")
    if tech not in PHONE_TECHNOLOGIES:
        return ("unknown technology %s, expected one of %s (asterisk -rx \"core show "
                "channeltypes\")" % (tech, ", ".join(PHONE_TECHNOLOGIES)))
    if "/" in resource:
        return ("a / too many: a device is TECH/name as pjsip show endpoints lists it, "
                "e.g. %s/%s" % (tech, resource.partition("/")[0]))
    if _CHANNEL_SEQUENCE.search(device):
        return ("looks like a channel name from core show channels; its phone is %s"
                % device_of_channel(device))
    if tech == "DAHDI" and re.match(r"^[gGrR][0-9]+$", resource):
        return ("a DAHDI group, which dials channels; each is DAHDI/<number> (DAHDI/1), as "
                "dahdi show channels lists them")
    return ""


def user_advisories(user: UserConfig, path: str) -> List[str]:
    """What makes a valid user unable to log in or to receive anything."""
    where = "%s:%d: [%s]" % (path, user.lineno, user.name)
    notes = []
    if is_example_secret(user.secret):
        notes.append("%s secret: a published example secret: nobody can log in as %s until "
                     "it has a secret of its own" % (where, user.name))
    problems = [(device, device_problem(device)) for device in user.devices]
    for device, problem in problems:
        if problem:
            notes.append("%s devices: %s cannot match a phone: %s" % (where, device, problem))
    if not user.events:
        notes.append("%s events: empty: %s receives no event at all; expected all or a "
                     "list of kinds" % (where, user.name))
    elif user.devices and not user.extensions and all(problem for _, problem in problems):
        notes.append("%s: none of %s's devices can match a phone and there are no "
                     "extensions: %s will never receive an event" % (where, user.name, user.name))
    return notes


_USER_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_EXTENSION = re.compile(r"^([A-Za-z0-9_.-]{1,32}:)?[0-9A-Za-z*#+_.-]{1,40}"
                        r"(@[A-Za-z0-9_.-]{1,80})?$")
_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|k|kb|m|mb|g|gb)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "g": 1024 ** 3, "gb": 1024 ** 3}
_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}
USER_KEYS = ("secret", "host", "devices", "extensions", "events", "popup_url", "board",
             "board_details", "fullname",
             "actions", "dial_device", "dial_context", "dial_callerid", "actions_per_minute")
#: A dialplan context DIAL and TRANSFER may name (Asterisk allows 79 characters).
_DIAL_CONTEXT = re.compile(r"^[A-Za-z0-9_.-]{1,79}$")
#: ``dial_callerid``: ``"Name" <number>``, ``Name <number>``, ``<number>`` or
#: ``number``.  No quote, angle bracket or backslash in the name: Asterisk's
#: ast_callerid_parse() would read the rest differently (main/callerid.c);
#: no ``;``, which ``check`` would print as the start of a comment.
_DIAL_CALLERID = re.compile(r'^(?:"([^"<>\\;]{0,64})"|([^"<>\\;]{0,64}?))\s*<([0-9+*#]{1,32})>$'
                            r"|^([0-9+*#]{1,32})$")

#: The placeholders of ``popup_url``: the flattened fields of an ``incoming``
#: event (as in its text line), and the user's login name.
POPUP_URL_FIELDS = ("from_num", "from_name", "to_num", "to_name", "dialed", "call", "time",
                    "role", "device", "queue", "user")
#: ``{name}`` in a URL template.  Any other brace is an error: a URL has none.
_URL_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def resolve_board_setting(value: str, user_names: Iterable[str],
                          templates: Optional[Dict[str, Iterable[str]]] = None) \
        -> Optional[frozenset]:
    """A user's ``board`` setting -> the users they may see: None for
    ``all``, an empty set for ``none`` (and an empty value), else the users
    named and every user whose section inherits a template named
    ``@template`` (``templates``: template -> its users).  A name that is no
    user or template raises ValueError saying which."""
    words = [word.strip() for word in value.split(",") if word.strip()]
    lowered = [word.lower() for word in words]
    if lowered in ([], ["none"]):
        return frozenset()
    if lowered == ["all"]:
        return None
    if "all" in lowered or "none" in lowered:
        raise ValueError("'all' and 'none' stand alone")
    known = set(user_names)
    templates = templates or {}
    names: Set[str] = set()
    for word in words:
        if word.startswith("@"):
            if word[1:] not in templates:
                raise ValueError("unknown template %r" % word[1:])
            names.update(templates[word[1:]])
        elif word in known:
            names.add(word)
        else:
            raise ValueError("unknown user %r" % word)
    return frozenset(names)


class _ConfigReader:
    """Validates parsed INI sections, collecting every problem with its place."""

    def __init__(self, filename: str):
        self.filename = filename
        self.problems: List[str] = []
        #: The PBX names a device may be qualified with (NAME:PJSIP/100).
        self.pbx_names: List[str] = [DEFAULT_PBX]

    def problem(self, section: IniSection, option: Optional[IniOption], what: str) -> None:
        lineno = option.lineno if option else section.lineno
        key = (" " + option.key) if option else ""
        self.problems.append("%s:%d: [%s]%s: %s" % (self.filename, lineno, section.name, key, what))

    def check_keys(self, section: IniSection, allowed: Sequence[str]) -> None:
        for option in section.options:
            if option.key not in allowed:
                self.problem(section, option, "unknown key, expected one of: %s" % ", ".join(allowed))

    def text(self, section: IniSection, key: str, default: str, required: bool = False) -> str:
        option = section.get(key)
        if option is None or option.value == "":
            if required and option is None:
                self.problems.append("%s:%d: [%s] %s: missing, expected %s = <value>"
                                     % (self.filename, section.lineno, section.name, key, key))
            elif required:
                self.problem(section, option, "empty, expected a non-empty value")
            return default
        if any(c in option.value for c in "\r\n\0"):
            self.problem(section, option, "control characters are not allowed")
        return option.value

    def number(self, section: IniSection, key: str, default: float, low: float, high: float,
               integer: bool = False) -> float:
        option = section.get(key)
        if option is None:
            return default
        try:
            value = int(option.value) if integer else float(option.value)
        except ValueError:
            self.problem(section, option, "%r is not a number, expected %s from %g to %g"
                         % (option.value, "an integer" if integer else "a number", low, high))
            return default
        if not low <= value <= high:
            self.problem(section, option, "%r is out of range, expected %g to %g"
                         % (option.value, low, high))
            return default
        return value

    def choice(self, section: IniSection, key: str, default: str, choices: Sequence[str]) -> str:
        option = section.get(key)
        if option is None:
            return default
        value = option.value.lower()
        if value not in choices:
            self.problem(section, option, "%r is not allowed, expected one of: %s"
                         % (option.value, ", ".join(choices)))
            return default
        return value

    def size(self, section: IniSection, key: str, default: int, low: int, high: int,
             allow_zero: bool = False) -> int:
        """Bytes, Redis style: ``1048576``, ``1024k``, ``1mb``, ``1g``."""
        option = section.get(key)
        if option is None:
            return default
        match = _SIZE.match(option.value)
        if match is None:
            self.problem(section, option, "%r is not a size, expected bytes such as "
                         "4194304, 4096k or 4mb" % option.value)
            return default
        value = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
        if not (low <= value <= high or (allow_zero and value == 0)):
            self.problem(section, option, "%r is out of range, expected %s%d to %d bytes"
                         % (option.value, "0 or " if allow_zero else "", low, high))
            return default
        return value

    def boolean(self, section: IniSection, key: str, default: bool) -> bool:
        option = section.get(key)
        if option is None:
            return default
        value = _BOOLEANS.get(option.value.lower())
        if value is None:
            self.problem(section, option, "%r is not yes or no" % option.value)
            return default
        return value

    def origin(self, section: IniSection, key: str) -> str:
        option = section.get(key)
        return "%s:%d: [%s] %s" % (self.filename, option.lineno if option else section.lineno,
                                   section.name, key)

    def items(self, section: IniSection, key: str) -> Tuple[Optional[IniOption], List[str]]:
        option = section.get(key)
        if option is None:
            return None, []
        return option, [item.strip() for item in option.value.split(",") if item.strip()]

    def read_settings(self, section: IniSection, settings: Sequence[Setting],
                      require: bool = True) -> Dict[str, object]:
        """Every key of a schema table, checked against its type and bounds
        (a wrong one gets its default, and a problem)."""
        self.check_keys(section, [setting.key for setting in settings])
        return {setting.key: self.setting(section, setting, require) for setting in settings}

    def setting(self, section: IniSection, setting: Setting, require: bool) -> object:
        kind, key, default = setting.kind, setting.key, setting.default
        if kind in ("text", "address", "host"):
            value = self.text(section, key, str(default), required=setting.required and require)
            if kind == "address" and not is_ip_address(value):
                self.problem(section, section.get(key), "%r is not an IP address, expected "
                             "e.g. 0.0.0.0, 127.0.0.1 or ::" % value)
            elif kind == "host" and not is_ip_address(value) and not is_host_name(value):
                self.problem(section, section.get(key), "%r is neither an IP address nor a "
                             "host name" % value)
            return value
        if kind == "port":
            option = section.get(key)
            if option is not None and setting.allow_off and option.value.lower() == "off":
                return None
            if option is None or default is None and option.value == "":
                return default
            kind = "integer"
        if kind in ("number", "integer"):
            number = self.number(section, key, default, setting.low, setting.high,  # type: ignore[arg-type]
                                 integer=kind == "integer")
            return int(number) if kind == "integer" and number is not None else number
        if kind == "size":
            return self.size(section, key, default, int(setting.low), int(setting.high),  # type: ignore[arg-type]
                             allow_zero=setting.allow_zero)
        if kind == "choice":
            return self.choice(section, key, str(default), setting.choices)
        return self.boolean(section, key, bool(default))

    def read_general(self, general: IniSection) -> Dict[str, object]:
        """[general], and what its keys say about each other."""
        values = self.read_settings(general, GENERAL_SETTINGS)
        if not str(values["syslog_socket"]).startswith("/"):
            self.problem(general, general.get("syslog_socket"), "%r is not an absolute path, "
                         "expected the syslog socket such as /dev/log" % values["syslog_socket"])
        if not _DIAL_CONTEXT.match(str(values["dial_context"])):
            self.problem(general, general.get("dial_context"), "%r is not a context name, "
                         "expected 1-79 of A-Z a-z 0-9 _ . - such as from-internal"
                         % values["dial_context"])
        hard, soft = values["client_buffer_hard"], values["client_buffer_soft"]
        if general.get("client_buffer_soft") is None and soft > hard:  # type: ignore[operator]
            values["client_buffer_soft"] = hard // 4  # type: ignore[operator]
        elif soft > hard:  # type: ignore[operator]
            self.problem(general, general.get("client_buffer_soft"),
                         "%d bytes is more than client_buffer_hard (%d), expected at most that "
                         "or 0 for no soft limit" % (soft, hard))  # type: ignore[str-format]
        tls_keys = [key for key in ("tls_port", "web_tls_port") if values[key] is not None
                    and (key == "tls_port" or values["web"])]
        for key in tls_keys:
            if not values["tls_cert"]:
                self.problem(general, general.get(key),
                             "TLS needs a certificate, expected tls_cert = /path/to/cert.pem")
        if (values["tls_cert"] or values["tls_key"]) and not tls_keys:
            self.problem(general, general.get("tls_cert") or general.get("tls_key"),
                         "set without tls_port or web_tls_port, expected tls_port = 5040 (or "
                         "remove it)")
        if values["port"] is None and values["tls_port"] is None:
            self.problem(general, general.get("port"), "'off' leaves no client port, expected "
                         "a port number or tls_port")
        self.check_port_clashes(general, values)
        return values

    def check_port_clashes(self, general: IniSection, values: Dict[str, object]) -> None:
        """Each port for one listener (0, a free port each, may repeat)."""
        keys = ["port", "tls_port"] + (["web_port", "web_tls_port"] if values["web"] else [])
        seen: Dict[object, str] = {}
        for key in keys:
            port = values[key]
            if not port:
                continue
            if port in seen:
                self.problem(general, general.get(key) or general.get(seen[port]),
                             "%s is already used by %s = %s, expected a port of its own"
                             % (port, seen[port], port))
            else:
                seen[port] = key

    def read_ami(self, section: IniSection, name: str, required: bool) -> AmiConfig:
        """[ami] or [ami:NAME]: one Asterisk to connect to."""
        values = self.read_settings(section, AMI_SETTINGS, required)
        if values["tls"] and section.get("port") is None:
            values["port"] = DEFAULT_AMI_TLS_PORT  # manager.conf tlsbindport
        if not values["tls"] and (section.get("tls_verify") or section.get("tls_ca")):
            self.problem(section, section.get("tls_ca") or section.get("tls_verify"),
                         "only used with TLS, expected tls = yes as well")
        return AmiConfig(name, **values)

    def read_pbxes(self, sections: Sequence[IniSection], require_ami: bool) -> List[AmiConfig]:
        """[ami] first, then each [ami:NAME]."""
        ami_section = next((s for s in sections if s.name.lower() == "ami"), None)
        if ami_section is None:
            ami = AmiConfig()
            if require_ami:
                self.problems.append("%s:1: [ami]: section missing, expected [ami] with "
                                     "username and secret of a manager.conf user" % self.filename)
        else:
            ami = self.read_ami(ami_section, DEFAULT_PBX, require_ami)
        pbxes = [ami]
        for section in sections:
            kind, colon, name = section.name.partition(":")
            if not colon or kind.lower() != "ami":
                continue
            if not _PBX_NAME.match(name) or name == DEFAULT_PBX:
                self.problem(section, None, "invalid PBX name %r, expected 1-32 of A-Z a-z 0-9 "
                             "_ . - other than %r" % (name, DEFAULT_PBX))
                continue
            pbxes.append(self.read_ami(section, name, True))
        self.pbx_names = [pbx.name for pbx in pbxes]
        return pbxes

    def read_user(self, section: IniSection) -> UserConfig:
        self.check_keys(section, USER_KEYS)
        if not _USER_NAME.match(section.name):
            self.problem(section, None, "invalid user name, expected 1-64 of A-Z a-z 0-9 _ . @ + -")
        secret = self.text(section, "secret", "", required=True)
        hosts = self.user_hosts(section)
        devices = self.user_devices(section)
        extensions = self.user_extensions(section)
        events = self.user_events(section)
        if not devices and not extensions:
            self.problem(section, None, "the user has neither devices nor extensions, "
                         "expected devices = PJSIP/100 or extensions = 100")
        popup_url = self.popup_url(section)
        fullname = self.text(section, "fullname", "")
        if len(fullname) > MAX_FIELD_CHARS:
            self.problem(section, section.get("fullname"), "%d characters, expected at most %d"
                         % (len(fullname), MAX_FIELD_CHARS))
        acting = self.user_actions(section, devices, extensions, fullname)
        # ``board`` needs every user's name: read_boards resolves it.
        return UserConfig(section.name, secret, hosts, devices, extensions,
                          events, section.lineno, popup_url,
                          board_details=self.boolean(section, "board_details", False),
                          fullname=fullname, **acting)

    def user_hosts(self, section: IniSection) -> Optional[Tuple[object, ...]]:
        """``host``: None for ``dynamic`` (anywhere), else the networks."""
        option, hosts_text = self.items(section, "host")
        if option is None or [h.lower() for h in hosts_text] == ["dynamic"]:
            return None
        nets = []
        for item in hosts_text:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.problem(section, option, "%r is not an address or CIDR, expected "
                             "'dynamic' or a comma list like 192.168.1.0/24, ::1" % item)
        if not hosts_text:
            self.problem(section, option, "empty, expected 'dynamic' or addresses")
        return tuple(nets)

    def user_devices(self, section: IniSection) -> Tuple[str, ...]:
        option, device_texts = self.items(section, "devices")
        devices = []
        for item in device_texts:
            pbx, device = split_device(item)
            if pbx and pbx not in self.pbx_names:
                self.problem(section, option, "%r names no PBX, expected one of: %s"
                             % (item, ", ".join(self.pbx_names)))
                continue
            try:
                devices.append((pbx + ":" if pbx else "") + normalize_device(device))
            except ValueError:
                self.problem(section, option, "%r is not a device, expected TECH/name such as "
                             "PJSIP/100, SIP/100, IAX2/100, DAHDI/1 or NAME:PJSIP/100" % item)
        return tuple(devices)

    def user_extensions(self, section: IniSection) -> Tuple[Tuple[str, str], ...]:
        option, ext_texts = self.items(section, "extensions")
        extensions = []
        for item in ext_texts:
            if not _EXTENSION.match(item):
                self.problem(section, option, "%r is not an extension, expected a number such "
                             "as 100, optionally 100@context or NAME:100" % item)
                continue
            number, _, context = item.partition("@")
            pbx = number.partition(":")[0] if ":" in number else ""
            if pbx and pbx not in self.pbx_names:
                self.problem(section, option, "%r names no PBX, expected one of: %s"
                             % (item, ", ".join(self.pbx_names)))
                continue
            extensions.append((number, context))
        return tuple(extensions)

    def user_events(self, section: IniSection) -> Tuple[str, ...]:
        option, kinds = self.items(section, "events")
        if option is None or [k.lower() for k in kinds] == ["all"]:
            return EVENT_KINDS
        events: List[str] = []
        for word in kinds:
            if not kinds_of(word):
                self.problem(section, option, "unknown event kind %r, expected 'all' or "
                             "any of: %s" % (word, ", ".join(EVENT_KINDS + tuple(KIND_ALIASES))))
            events += [kind for kind in kinds_of(word) if kind not in events]
        return tuple(events)

    def user_actions(self, section: IniSection, devices: Tuple[str, ...],
                     extensions: Tuple[Tuple[str, str], ...],
                     fullname: str = "") -> Dict[str, object]:
        """``actions`` and what they need: the phone DIAL rings first, the
        context, the caller ID, the rate (README, "Actions on calls")."""
        option, names = self.items(section, "actions")
        actions: List[str] = []
        lowered = [name.lower() for name in names]
        if lowered == ["all"]:
            actions = list(CALL_ACTIONS)
        elif lowered != ["none"]:
            for name in lowered:
                if name not in CALL_ACTIONS:
                    self.problem(section, option, "unknown action %r, expected none, all or "
                                 "any of: %s" % (name, ", ".join(CALL_ACTIONS)))
                elif name not in actions:
                    actions.append(name)
        device = self.dial_device(section, devices)
        if CallAction.DIAL in actions and not device:
            self.problem(section, option, "dial needs a phone to ring first, expected "
                         "devices = PJSIP/100 (or dial_device)")
        context = self.text(section, "dial_context", "")
        if context and not _DIAL_CONTEXT.match(context):
            self.problem(section, section.get("dial_context"), "%r is not a context name, "
                         "expected 1-79 of A-Z a-z 0-9 _ . -" % context)
        callerid = self.dial_callerid(section, extensions, device, fullname)
        if CallAction.DIAL in actions and not callerid:
            self.problem(section, option, "dial needs the user's caller ID and no extension "
                         "gives it, expected dial_callerid = \"Name\" <number>")
        rate = self.number(section, "actions_per_minute", 0, 1, 1000, integer=True)
        return {"actions": tuple(a for a in CALL_ACTIONS if a in actions),
                "dial_device": device, "dial_context": context, "dial_callerid": callerid,
                "actions_per_minute": int(rate)}

    def dial_device(self, section: IniSection, devices: Tuple[str, ...]) -> str:
        """``dial_device``: one of the user's own devices; default the first."""
        option = section.get("dial_device")
        if option is None or not option.value:
            return devices[0] if devices else ""
        pbx, device = split_device(option.value)
        try:
            wanted = (pbx + ":" if pbx else "") + normalize_device(device)
        except ValueError:
            wanted = option.value
        if wanted not in devices:
            self.problem(section, option, "%r is not one of the user's devices, expected one "
                         "of: %s" % (option.value, ", ".join(devices) or "(none)"))
            return ""
        return wanted

    def dial_callerid(self, section: IniSection, extensions: Tuple[Tuple[str, str], ...],
                      device: str, fullname: str = "") -> str:
        """``dial_callerid`` as ``"Name" <number>`` or ``<number>``; by default
        the number of the user's first extension (or of the phone's name),
        with the ``fullname`` if it can be one."""
        option = section.get("dial_callerid")
        text = self.text(section, "dial_callerid", "").strip()
        if not text:
            numbers = [number.rpartition(":")[2] for number, _context in extensions]
            numbers.append(device.partition("/")[2])
            number = next((n for n in numbers if re.match(r"^[0-9+*#]{1,32}$", n)), "")
            if not number:
                return ""
            named = '"%s" <%s>' % (fullname, number)
            usable = fullname and _DIAL_CALLERID.match(named) and \
                not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in fullname)
            return named if usable else "<%s>" % number
        match = _DIAL_CALLERID.match(text)
        if match is None or any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in text):
            self.problem(section, option, "%r is not a caller ID, expected \"Name\" <number> "
                         "with a number of 0-9 + * # and no quotes or <> in the name" % text)
            return ""
        name = (match.group(1) or match.group(2) or "").strip()
        number = match.group(3) or match.group(4)
        return '"%s" <%s>' % (name, number) if name else "<%s>" % number
    def read_boards(self, sections: Sequence[IniSection], users: Dict[str, UserConfig],
                    templates: Dict[str, List[str]]) -> None:
        """Each user's ``board`` (all, none, users, @templates), now that
        every user is known; a user whose board is none has no ``state``
        events (an ``events`` line that names them is a problem)."""
        members = {name: [n for n in names if n in users] for name, names in templates.items()}
        for section in sections:
            user = users.get(section.name)
            if user is None:
                continue
            option = section.get("board")
            try:
                user.board = resolve_board_setting(option.value if option else "none",
                                                   users, members)
            except ValueError as e:
                self.problem(section, option, "%s, expected all, none, or a comma list of "
                             "users and @templates" % e)
                continue
            if user.board is not None and not user.board and Kind.STATE in user.events:
                events = section.get("events")
                if events is not None and Kind.STATE in \
                        [k.strip().lower() for k in events.value.split(",")]:
                    self.problem(section, events, "state needs a board, expected board = all "
                                 "or a list of users (or no state)")
                user.events = tuple(k for k in user.events if k != Kind.STATE)

    def popup_url(self, section: IniSection) -> str:
        """``popup_url``: an http(s) URL whose placeholders are all known and
        sit after the host, so a caller ID can never choose the server."""
        url = self.text(section, "popup_url", "")
        if not url:
            return ""
        option = section.get("popup_url")
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            self.problem(section, option, "%r is not an http or https URL, expected e.g. "
                         "https://crm.example.com/search?phone={from_num}" % url)
            return ""
        problems = len(self.problems)
        for name in _URL_PLACEHOLDER.findall(url):
            if name not in POPUP_URL_FIELDS:
                self.problem(section, option, "unknown placeholder {%s}, expected any of: %s"
                             % (name, ", ".join("{%s}" % f for f in POPUP_URL_FIELDS)))
        rest = _URL_PLACEHOLDER.sub("", url)
        if "{" in rest or "}" in rest:
            self.problem(section, option, "a brace that is not part of a {placeholder}, "
                         "expected {name} placeholders only")
        if "{" in parts.netloc or "}" in parts.netloc:
            self.problem(section, option, "a placeholder in the host, expected placeholders "
                         "only in the path, query or fragment")
        if any(c.isspace() for c in url):
            self.problem(section, option, "a space in the URL, expected %20 instead")
        return url if len(self.problems) == problems else ""


def _is_ami_section(section: IniSection) -> bool:
    name = section.name.lower()
    return name == "ami" or name.startswith("ami:")


def parse_config(text: str, filename: str, require_ami: bool = True) -> Config:
    """Validate INI text; raise ConfigError listing every problem found."""
    sections, problems, templates = parse_ini(text, filename)
    reader = _ConfigReader(filename)
    reader.problems.extend(problems)
    general = next((s for s in sections if s.name.lower() == "general"),
                   IniSection("general", 0))
    values = reader.read_general(general)
    pbxes = reader.read_pbxes(sections, require_ami)
    users: Dict[str, UserConfig] = {}
    for section in sections:
        if section is not general and not _is_ami_section(section):
            users[section.name] = reader.read_user(section)
    reader.read_boards(sections, users, templates)
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=_problem_line))
    origins = {"tls_cert": reader.origin(general, "tls_cert")}
    for section in sections:
        if _is_ami_section(section):
            name = DEFAULT_PBX if section.name.lower() == "ami" else section.name[4:]
            origins["tls_ca:" + name] = reader.origin(section, "tls_ca")
            origins["secret:" + name] = reader.origin(section, "secret")
    return Config(filename, values, pbxes, users, origins)


def _problem_line(problem: str) -> int:
    """Sort key: the LINE of ``FILE:LINE: ...``."""
    match = re.search(r":(\d+): ", problem)
    return int(match.group(1)) if match else 0


def load_config(path: str, require_ami: bool = True) -> Config:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(["%s:0: cannot read the file: %s" % (path, e.strerror or e)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(["%s:%d: the file is not UTF-8 text" % (path, line)])
    config = parse_config(text, path, require_ami)
    problems = []
    tls_context = None
    if config.tls_port is not None or config.web and config.web_tls_port is not None:
        try:
            tls_context = server_tls_context(config.tls_cert, config.tls_key or None)
        except (OSError, ValueError) as e:
            problems.append("%s: cannot load the certificate and key: %s, expected PEM files"
                            % (config.origins["tls_cert"], _ssl_reason(e)))
    ami_contexts = {}
    for pbx in config.pbxes:
        if not pbx.tls:
            continue
        try:
            ami_contexts[pbx.name] = client_tls_context(pbx.tls_ca, pbx.tls_verify)
        except (OSError, ValueError) as e:
            problems.append("%s: cannot load the CA file: %s, expected PEM certificates"
                            % (config.origins.get("tls_ca:" + pbx.name,
                                                  path + ":0: [ami] tls_ca"), _ssl_reason(e)))
    if problems:
        raise ConfigError(problems)
    return config.replace(tls_context=tls_context, ami_tls_contexts=ami_contexts)


def _ssl_reason(error: Exception) -> str:
    if ssl is not None and isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return getattr(error, "strerror", None) or str(error)


def server_tls_context(cert: str, key: Optional[str]) -> "ssl.SSLContext":
    """The context of the TLS client listener: TLS 1.2 or newer, no client
    certificates (clients log in with LOGIN, as on the plain port)."""
    if ssl is None:
        raise ValueError("this Python has no ssl module")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


#: ``check``, ``run`` (and once a day while running) warn this long before
#: the client TLS port's certificate expires.
TLS_CERT_WARN_BEFORE_S = 14 * 86400
TLS_CERT_CHECK_INTERVAL_S = 86400.0
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----")


def _der_element(data: bytes, pos: int) -> Tuple[int, int, int]:
    """One DER element at ``pos``: (tag, where its content starts, where it
    ends).  ValueError if it does not fit in ``data``."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[pos], data[pos + 1]
    start = pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or start + size > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[start:start + size], "big")
        start += size
    if start + length > len(data):
        raise ValueError("truncated")
    return tag, start, start + length


def _der_time(tag: int, text: bytes) -> float:
    """UTCTime (YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime
    (YYYYMMDDHHMMSSZ) as X.509 writes them (RFC 5280 4.1.2.5): seconds."""
    digits = text.decode("ascii")
    if tag == 0x17 and len(digits) == 13 and digits.endswith("Z"):
        year = int(digits[:2])
        digits = ("19" if year >= 50 else "20") + digits
    elif not (tag == 0x18 and len(digits) == 15 and digits.endswith("Z")):
        raise ValueError("not an X.509 time")
    when = datetime.datetime(int(digits[:4]), int(digits[4:6]), int(digits[6:8]),
                             int(digits[8:10]), int(digits[10:12]), int(digits[12:14]),
                             tzinfo=datetime.timezone.utc)
    return when.timestamp()


def certificate_validity(der: bytes) -> Tuple[float, float]:
    """(notBefore, notAfter) of one DER X.509 certificate, in seconds since
    the epoch: Certificate is SEQUENCE { tbsCertificate SEQUENCE { [0]
    version (optional), serialNumber, signature, issuer, validity SEQUENCE
    { notBefore, notAfter } ... } ... } (RFC 5280 4.1).  ValueError if
    it is not one.  (The ssl module reads dates only through a private
    function, or for CA certificates.)"""
    tag, pos, _ = _der_element(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, _ = _der_element(der, pos)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, after = _der_element(der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = after
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _der_element(der, pos)[2]
    tag, pos, _ = _der_element(der, pos)
    if tag != 0x30:
        raise ValueError("no validity")
    tag, start, stop = _der_element(der, pos)
    not_before = _der_time(tag, der[start:stop])
    tag, start, stop = _der_element(der, stop)
    return not_before, _der_time(tag, der[start:stop])


def certificate_dates(path: str) -> List[Tuple[float, float]]:
    """The validity of each certificate in a PEM file, in its order (the
    server's own first, then its chain); [] if it cannot be read."""
    try:
        with open(path, "rb") as f:
            pem = f.read(1024 * 1024)
        return [certificate_validity(base64.b64decode(b"".join(block.split())))
                for block in _PEM_CERTIFICATE.findall(pem)]
    except (OSError, ValueError):
        return []


def certificate_warnings(config: "Config", now: float) -> List[str]:
    """What ``check`` and ``run`` say of the client TLS port's certificate
    (``tls_cert``): not valid yet, expired, or expiring within
    TLS_CERT_WARN_BEFORE_S.  Clients refuse such a certificate, and the
    daemon serves it without a word otherwise."""
    if config.tls_port is None or not config.tls_cert:
        return []
    notes = []
    where = config.origins.get("tls_cert") or "%s: [general] tls_cert" % config.path
    dates = certificate_dates(config.tls_cert)
    for n, (not_before, not_after) in enumerate(dates):
        which = "the certificate %s" % config.tls_cert if n == 0 else \
            "certificate %d of %s (its chain)" % (n + 1, config.tls_cert)
        span = "valid from %s to %s" % tuple(time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                          time.gmtime(t))
                                            for t in (not_before, not_after))
        if now < not_before:
            notes.append("%s: %s is not valid yet (%s): TLS clients refuse it until then; "
                         "is the clock right?" % (where, which, span))
        elif now >= not_after:
            notes.append("%s: %s has expired (%s): TLS clients refuse it; renew it"
                         % (where, which, span))
        elif not_after - now <= TLS_CERT_WARN_BEFORE_S:
            left = (not_after - now) / 86400
            notes.append("%s: %s expires in %s (%s): renew it" % (
                where, which, "%d days" % left if left >= 2 else "1 day" if left >= 1
                else "%d hours" % (left * 24), span))
    return notes


def client_tls_context(cafile: str = "", verify: bool = True) -> "ssl.SSLContext":
    """The context of a TLS connection we open (to Asterisk, or ``watch`` to
    the daemon): TLS 1.2 or newer, the server verified against ``cafile``
    (a CA, or the server's own certificate) or the system's CAs, unless
    ``verify`` is off (``[ami] tls_verify = no``)."""
    if ssl is None:
        raise ValueError("this Python has no ssl module")
    context = ssl.create_default_context(cafile=cafile or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def find_config(path: Optional[str]) -> str:
    if path:
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if os.path.exists(candidate):
            return candidate
    return DEFAULT_CONFIG_PATHS[-1]


# ---------------------------------------------------------------------------
# AMI codec (no I/O): bytes in, messages out; actions to bytes
# ---------------------------------------------------------------------------

AMI_BANNER_PREFIX = "Asterisk Call Manager/"

#: The end of a message: the end of a line, then an empty line.  Asterisk
#: sends CRLF; manager.c accepts a bare LF, and so do we (main/manager.c).
_AMI_MESSAGE_END = re.compile(rb"\n\r?\n")
_AMI_LEADING_BLANKS = re.compile(rb"(?:\r?\n)+")
#: Old-style ``Response: Follows`` (Command action, Asterisk <= 13) ends with
#: this marker, and its body may hold blank lines.
_FOLLOWS_START = b"Response: Follows"
_FOLLOWS_END = re.compile(rb"--END COMMAND--\r?\n(?:\r?\n)?")
_FOLLOWS_HEADERS = ("Response", "Privilege", "ActionID", "Message")


class AmiMessage(dict):
    """One manager message: ``msg["Key"]`` is the first value of that key.

    Repeated keys (several ``ChanVariable`` or ``Output`` lines) keep every
    value, in order, in ``getall``.  Lines that are not ``Key: Value`` (the
    body of ``Response: Follows``) are kept in ``body``.
    """

    # Class-level defaults instead of an __init__: a parser makes one
    # message per AMI event, and dict's own constructor is much cheaper.
    #: key -> every value, for keys that occur more than once; else None.
    repeated: Optional[Dict[str, List[str]]] = None
    #: Lines that are not ``Key: Value``, in order; else None.
    body: Optional[List[str]] = None

    @property
    def event(self) -> Optional[str]:
        return self.get("Event")

    @property
    def response(self) -> Optional[str]:
        return self.get("Response")

    def getall(self, key: str) -> List[str]:
        if self.repeated and key in self.repeated:
            return list(self.repeated[key])
        return [self[key]] if key in self else []

    def add(self, key: str, value: str) -> None:
        if key not in self:
            self[key] = value
            return
        if self.repeated is None:
            self.repeated = {}
        self.repeated.setdefault(key, [self[key]]).append(value)

    def to_bytes(self) -> bytes:
        """The message in wire form (used by tests and the fake Asterisk)."""
        lines = []
        for key in self:
            for value in self.getall(key):
                lines.append("%s: %s" % (key, value))
        lines.extend(self.body or ())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


#: Events that come with every call, or every few seconds, and that the
#: call engine does not read: their fields are split out only if something
#: asks for them.  With ``read = all`` VarSet alone (a Set() in the
#: dialplan) is 62% of the events in tests/traces/t_load.ami.  A test keeps
#: this list apart from the engine's handlers.
DEFERRED_EVENTS = frozenset((
    "VarSet", "NewAccountCode", "HangupRequest", "SoftHangupRequest",
    "BridgeCreate", "BridgeDestroy", "DeviceStateChange", "ExtensionStatus",
    "PresenceStateChange", "RTCPSent", "RTCPReceived", "DTMFBegin", "DTMFEnd",
    "ContactStatus", "PeerStatus", "Cdr", "CEL",
))


class _DeferredAmiMessage(AmiMessage):
    """An AmiMessage that holds only ``Event`` until a reader asks for more.

    Asking whether a key is there costs a substring search when the key
    cannot be (the AMI session asks every event for ``ActionID``); any
    other access splits the text into fields first, so to every reader this
    is exactly the message the full parse gives.
    """

    __slots__ = ("_text",)

    def __init__(self, event: str, text: str):
        dict.__init__(self, Event=event)
        self._text: Optional[str] = text

    def _parse(self) -> None:
        text = self._text
        if text is not None:
            self._text = None
            full = _parse_message(text, defer=False)
            dict.clear(self)
            dict.update(self, full)
            if full.repeated is not None:
                self.__dict__["repeated"] = full.repeated
            if full.body is not None:
                self.__dict__["body"] = full.body

    def _lacks(self, key: object) -> bool:
        """True if ``key`` is surely not in the message: no line but the
        first (``Event: ...``) starts with ``key:``, which covers both
        ``Key: Value`` and ``Key:``."""
        text = self._text
        return text is not None and isinstance(key, str) and "\n" + key + ":" not in text

    def __missing__(self, key: str) -> str:
        if self._text is None or self._lacks(key):
            raise KeyError(key)
        self._parse()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        if self._text is not None and not dict.__contains__(self, key):
            if self._lacks(key):
                return default
            self._parse()
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        if self._text is not None and not dict.__contains__(self, key):
            if self._lacks(key):
                return False
            self._parse()
        return dict.__contains__(self, key)

    def __eq__(self, other: object) -> bool:
        # dict's comparison reads the other side's storage directly.
        self._parse()
        if isinstance(other, _DeferredAmiMessage):
            other._parse()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __reduce_ex__(self, protocol):  # type: ignore[no-untyped-def]
        # Copies and pickles are plain AmiMessages.
        self._parse()
        return (_plain_message, (dict(self), self.repeated, self.body))

    @property  # type: ignore[override]
    def repeated(self) -> Optional[Dict[str, List[str]]]:
        self._parse()
        return self.__dict__.get("repeated")

    @repeated.setter
    def repeated(self, value: Optional[Dict[str, List[str]]]) -> None:
        self._parse()
        self.__dict__["repeated"] = value

    @property  # type: ignore[override]
    def body(self) -> Optional[List[str]]:
        self._parse()
        return self.__dict__.get("body")

    @body.setter
    def body(self, value: Optional[List[str]]) -> None:
        self._parse()
        self.__dict__["body"] = value


def _plain_message(fields: Dict[str, str], repeated: Optional[Dict[str, List[str]]],
                   body: Optional[List[str]]) -> AmiMessage:
    msg = AmiMessage(fields)
    msg.repeated, msg.body = repeated, body
    return msg


def _parsed_first(name: str) -> object:
    """A dict method that splits a deferred message's fields first."""
    method = getattr(dict, name)

    @functools.wraps(method)
    def parsed_first(self, *args, **kwargs):
        self._parse()
        return method(self, *args, **kwargs)
    return parsed_first


for _name in ("__iter__", "__len__", "__reversed__", "__repr__",
              "__setitem__", "__delitem__", "__or__", "__ror__", "__ior__", "__sizeof__",
              "keys", "values", "items", "copy", "setdefault", "pop", "popitem", "update",
              "clear"):
    if hasattr(dict, _name):  # __or__ and friends: Python 3.9+
        setattr(_DeferredAmiMessage, _name, _parsed_first(_name))


def parse_ami_block(block: Union[bytes, memoryview]) -> AmiMessage:
    """One framed message (without its terminating blank line) to AmiMessage.

    Decoding happens here, after framing, so a UTF-8 character split across
    reads is whole again; invalid bytes become U+FFFD, nothing is dropped.
    """
    # The block ends before the final LF, so its last CR is still there;
    # cut it before decoding (a memoryview slice copies nothing).
    if block and block[-1] == 13:
        block = block[:-1]
    return _parse_message(str(block, "utf-8", "replace"))


def _parse_message(text: str, defer: bool = True) -> AmiMessage:
    """A decoded message without its final line end.

    Every event Asterisk sends is distinct ``Key: Value`` lines ending in
    CRLF: that case takes one pass; anything else (bare LF, repeated keys,
    ``Key:`` with no space, body lines) is redone by the general rules.
    With ``defer``, DEFERRED_EVENTS wait unsplit until something reads them.
    """
    msg = _plain_or_deferred(text, framed=True) if defer else _parse_plain(text)
    if msg is None:
        msg = _message_from_lines(text.replace("\r\n", "\n").split("\n"))
    return msg


def _plain_or_deferred(text: str, framed: bool) -> Optional[AmiMessage]:
    """One pass for the common case, shared by both framings: a deferred
    event left unsplit, or distinct CRLF ``Key: Value`` lines; else None.

    ``framed``: the general framing cut this message out.  Otherwise it is
    a block cut at CRLF CRLF (AmiParser._plain_events), which must also
    prove it is one event and nothing else: a response or anything odd is
    None, and so is a deferred one holding a bare LF (an LF-framed message).
    """
    if text.startswith("Event: "):
        end = text.find("\r\n")
        name = text[7:end] if end >= 0 else text[7:]
        if name in DEFERRED_EVENTS:
            if framed or text.count("\n") == text.count("\r\n"):
                return _DeferredAmiMessage(name, text)
            return None
    elif not framed:
        return None
    return _parse_plain(text)


def _parse_plain(text: str) -> Optional[AmiMessage]:
    """The one pass of the common case, or None where the general rules
    must redo it."""
    lines = text.split("\r\n")
    msg = AmiMessage()
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            return None
        msg[key] = value
    # Every line was "Key: Value": done, unless a key was repeated or a
    # bare LF hid a line inside another.
    if len(msg) == len(lines) and text.count("\n") == len(lines) - 1:
        return msg
    return None


def _message_from_lines(lines: List[str]) -> AmiMessage:
    msg = AmiMessage()
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            # "Key:" with an empty value and no space is legal too.
            if line.endswith(":") and " " not in line:
                key, value = line[:-1], ""
            else:
                if line:
                    if msg.body is None:
                        msg.body = []
                    msg.body.append(line)
                continue
        if key in msg:
            msg.add(key, value)
        else:
            msg[key] = value
    return msg


def _parse_follows_block(block: bytes) -> AmiMessage:
    """``Response: Follows``: a few headers, then free-form output lines."""
    msg = AmiMessage()
    msg.body = []
    in_headers = True
    for line in block.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        key, sep, value = line.partition(": ")
        if in_headers and sep and key in _FOLLOWS_HEADERS:
            msg.add(key, value)
            continue
        in_headers = False
        msg.body.append(line)
    while msg.body and msg.body[-1] == "":
        msg.body.pop()
    return msg


class AmiParser:
    """Incremental, bounded parser of the manager protocol.

    ``feed(data)`` takes bytes split anywhere and returns the complete
    messages they finish.  The first line must be the banner
    ``Asterisk Call Manager/x.y.z`` (``expect_banner=False`` skips that, for
    streams that start mid-way).  A message longer than ``max_message_bytes``
    is skipped and described in ``problems``; the stream stays usable.  The
    only exception raised is AmiProtocolError, for a peer that is not
    Asterisk at all.
    """

    def __init__(self, expect_banner: bool = True,
                 max_message_bytes: int = MAX_AMI_MESSAGE_BYTES):
        self.banner: Optional[str] = None if expect_banner else ""
        self.max_message_bytes = max_message_bytes
        #: Human-readable notes about skipped input; the caller logs and clears.
        self.problems: List[str] = []
        self._buffer = bytearray()
        self._scan_from = 0
        self._skipping = False

    def feed(self, data: bytes) -> List[AmiMessage]:
        buf = self._buffer
        buf += data
        if self.banner is None and not self._read_banner():
            return []
        messages = [] if self._skipping else self._plain_events()
        pos = 0
        end_search = _AMI_MESSAGE_END.search
        while True:
            if self._skipping:
                # Before any blank-line skipping: the kept tail of the
                # oversized message may be the start of its own terminator.
                found = end_search(buf, max(pos, self._scan_from))
                if found is None:
                    # Keep only what could begin the terminator.
                    del buf[:max(pos, len(buf) - 2)]
                    self._scan_from = 0
                    return messages
                pos = found.end()
                self._skipping = False
                self._scan_from = 0
                continue
            lead = _AMI_LEADING_BLANKS.match(buf, pos)
            if lead:
                pos = lead.end()
            if buf.startswith(_FOLLOWS_START, pos):
                found = _FOLLOWS_END.search(buf, max(pos, self._scan_from))
                if found is not None:
                    if found.end() - pos <= self.max_message_bytes:
                        messages.append(_parse_follows_block(bytes(buf[pos:found.start()])))
                    else:
                        self._note_oversized(found.end() - pos)
                    pos = found.end()
                    self._scan_from = 0
                    continue
            else:
                found = end_search(buf, max(pos, self._scan_from))
                if found is not None:
                    pos = self._read_messages(pos, found, messages)
                    self._scan_from = 0
                    continue
            # No complete message left: keep the partial one, bounded.
            if len(buf) - pos > self.max_message_bytes:
                self._note_oversized(len(buf) - pos)
                self._skipping = True
                self._scan_from = 0
                continue
            del buf[:pos]
            # Resume the search where a terminator could still begin.
            self._scan_from = max(0, len(buf) - 32)
            return messages

    def _plain_events(self) -> List[AmiMessage]:
        """The run of plain events at the start of the buffer, cut out with
        one split at CRLF CRLF (bench: the general loop below costs 0.4 us a
        message more).  It stops at the first block that is not one, which
        the general loop then frames by the full rules, as it does the rest
        of this read."""
        buf = self._buffer
        last = buf.rfind(b"\r\n\r\n")
        if last < 0:
            return []
        region = bytes(buf[:last])
        if _FOLLOWS_START in region:
            return []  # a body with blank lines: not cut at CRLF CRLF
        messages: List[AmiMessage] = []
        limit = self.max_message_bytes
        end = 0
        for block in region.split(b"\r\n\r\n"):
            # The general loop counts a message's final CR: so does this.
            if not block or block[0] in (10, 13) or len(block) >= limit:
                break
            msg = _plain_or_deferred(str(block, "utf-8", "replace"), framed=False)
            if msg is None:
                break
            messages.append(msg)
            end += len(block) + 4
        if end:
            del buf[:end]
            self._scan_from = 0  # it pointed into the partial message consumed
        return messages

    def _read_messages(self, pos: int, found: "re.Match[bytes]",
                       messages: List[AmiMessage]) -> int:
        """Take the ordinary messages from ``pos`` on, the first one ending
        at ``found``, while they come back to back; return where the rest
        starts (a partial message, blank lines or ``Response: Follows``:
        feed() deals with those)."""
        buf = self._buffer
        end_search = _AMI_MESSAGE_END.search
        with memoryview(buf) as view:
            while True:
                end = found.start()
                if end - pos <= self.max_message_bytes:
                    messages.append(parse_ami_block(view[pos:end]))  # no copy
                else:
                    self._note_oversized(end - pos)
                pos = found.end()
                if buf.startswith((b"\r", b"\n", _FOLLOWS_START), pos):
                    return pos
                found = end_search(buf, pos)
                if found is None:
                    return pos

    def _read_banner(self) -> bool:
        buf = self._buffer
        newline = buf.find(b"\n")
        if newline < 0:
            if len(buf) > MAX_AMI_BANNER_BYTES:
                raise AmiProtocolError("no manager banner in the first %d bytes" % len(buf))
            return False
        line = bytes(buf[:newline]).rstrip(b"\r").decode("utf-8", "replace")
        if newline > MAX_AMI_BANNER_BYTES or not line.startswith(AMI_BANNER_PREFIX):
            raise AmiProtocolError("not an Asterisk manager banner: %r" % line[:80])
        self.banner = line
        del buf[:newline + 1]
        return True

    def _note_oversized(self, size: int) -> None:
        self.problems.append("skipped a message of more than %d bytes (%d seen)"
                             % (self.max_message_bytes, size))


def encode_action(action: str, fields: Iterable[Tuple[str, str]] = ()) -> bytes:
    """An AMI action in wire form.  CR or LF in the action, a key or a value
    would let it forge further headers or actions (Asterisk ends a line at
    either, main/manager.c get_input), so they are refused outright: the
    last defence, whatever the callers checked before."""
    lines = []
    for key, value in [("Action", action)] + list(fields):
        if "\r" in key or "\n" in key or "\r" in value or "\n" in value:
            raise ValueError("CR or LF inside AMI action field %r" % key[:40])
        lines.append("%s: %s" % (key, value))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


# ---------------------------------------------------------------------------
# AMI session (no I/O): banner, login, ActionIDs, ping
# ---------------------------------------------------------------------------


class AmiLoggedIn:
    """The login was accepted; ``banner`` names the Asterisk side."""

    def __init__(self, banner: str):
        self.banner = banner


class AmiLoginFailed:
    """Asterisk refused the login; ``reason`` is its own Message text."""

    def __init__(self, reason: str):
        self.reason = reason


class AmiSession:
    """The client side of one AMI connection, without the socket.

    Feed it received bytes with ``receive_data``; it returns AmiLoggedIn,
    AmiLoginFailed, and every AmiMessage that is an event or a response to
    an action of ours.  ``data_to_send`` drains the bytes it wants written.
    Timing is passed in: ``poll(now)`` queues pings and returns a reason
    string once the peer has stopped answering.
    """

    def __init__(self, username: str, secret: str, auth: str = "plain", now: float = 0.0,
                 ping_interval: float = AMI_PING_INTERVAL_S, events: str = "on",
                 login_timeout: float = AMI_LOGIN_TIMEOUT_S,
                 ping_timeout: float = AMI_PING_TIMEOUT_S):
        self.username = username
        self._secret = secret
        self.auth = auth
        self.events = events
        self.ping_interval = ping_interval
        self.login_timeout = login_timeout
        self.ping_timeout = ping_timeout
        self.parser = AmiParser()
        self.logged_in = False
        self._outgoing = bytearray()
        self._action_seq = 0
        self._pending: Dict[str, str] = {}  # ActionID -> action name
        self._login_id: Optional[str] = None
        self._challenge_id: Optional[str] = None
        self._login_deadline: Optional[float] = now + login_timeout
        self._ping_due: Optional[float] = None
        self._pong_deadline: Optional[float] = None
        self._ping_id: Optional[str] = None

    # -- sending -----------------------------------------------------------

    def send_action(self, action: str, fields: Iterable[Tuple[str, str]] = ()) -> str:
        """Queue an action; returns the ActionID its response will carry."""
        self._action_seq += 1
        action_id = "ctinotify-%d" % self._action_seq
        self._outgoing += encode_action(action, [("ActionID", action_id)] + list(fields))
        self._pending[action_id] = action
        return action_id

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def redacted(self, data: bytes) -> bytes:
        """``data`` as sent, with the secret and MD5 key replaced (for record)."""
        return re.sub(rb"(?im)^(Secret|Key): [^\r\n]*", rb"\1: ********", data)

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list:
        had_banner = self.parser.banner is not None
        out: list = []
        messages = self.parser.feed(data)
        if not had_banner and self.parser.banner is not None:
            self._start_login()
        for msg in messages:
            self._receive_message(msg, now, out)
        return out

    def _start_login(self) -> None:
        if self.auth == "md5":
            self._challenge_id = self.send_action("Challenge", [("AuthType", "MD5")])
        else:
            self._login_id = self.send_action(
                "Login", [("Username", self.username), ("Secret", self._secret),
                          ("Events", self.events)])

    def _receive_message(self, msg: AmiMessage, now: float, out: list) -> None:
        action_id = msg.get("ActionID")
        if "Response" in msg and action_id in self._pending:
            action = self._pending.pop(action_id)
            if action_id == self._challenge_id:
                self._on_challenge(msg, out)
                return
            if action_id == self._login_id:
                self._on_login(msg, now, out)
                return
            if action_id == self._ping_id:
                self._pong_deadline = None
                self._ping_id = None
                return
            # Keep the list's ActionID pending until its Complete event.
            if msg.get("EventList", "").lower() == "start":
                self._pending[action_id] = action
        elif "Event" in msg and action_id in self._pending:
            if msg.get("EventList", "").lower() in ("complete", "cancelled"):
                del self._pending[action_id]
        if self.logged_in:
            out.append(msg)

    def _on_challenge(self, msg: AmiMessage, out: list) -> None:
        challenge = msg.get("Challenge")
        if msg.get("Response") != "Success" or not challenge:
            out.append(AmiLoginFailed(msg.get("Message") or "challenge refused"))
            self._login_deadline = None
            return
        key = hashlib.md5((challenge + self._secret).encode("utf-8")).hexdigest()
        self._login_id = self.send_action(
            "Login", [("AuthType", "MD5"), ("Username", self.username), ("Key", key),
                      ("Events", self.events)])

    def _on_login(self, msg: AmiMessage, now: float, out: list) -> None:
        self._login_deadline = None
        if msg.get("Response") == "Success":
            self.logged_in = True
            self._ping_due = now + self.ping_interval
            out.append(AmiLoggedIn(self.parser.banner or ""))
        else:
            out.append(AmiLoginFailed(msg.get("Message") or "login refused"))

    # -- timing ------------------------------------------------------------

    def next_deadline(self) -> Optional[float]:
        # While a Ping waits for its answer no other is sent, so its due
        # time is no deadline (with ping_interval under the Ping timeout,
        # an overdue one would make the loop spin).
        ping_due = self._ping_due if self._ping_id is None else None
        times = [t for t in (self._login_deadline, ping_due, self._pong_deadline)
                 if t is not None]
        return min(times) if times else None

    def poll(self, now: float) -> Optional[str]:
        """Queue a due Ping; return why the link is dead, or None."""
        if self._login_deadline is not None and now >= self._login_deadline:
            return "no login response within %g s" % self.login_timeout
        if self._pong_deadline is not None and now >= self._pong_deadline:
            return "no answer to Ping within %g s" % self.ping_timeout
        if self._ping_due is not None and now >= self._ping_due and self._ping_id is None:
            self._ping_id = self.send_action("Ping")
            self._pong_deadline = now + self.ping_timeout
            self._ping_due = now + self.ping_interval
        return None


#: Distinct calling channels whose DialBegin came without a single Newexten
#: on the link: then the manager user evidently lacks read class dialplan.
PROBE_DIALS = 3
#: Distinct channels in Newexten without a single Newchannel: no class call.
PROBE_EXTENS = 3

#: What a missing class costs, said once per link (log, STATUS warning=).
NO_DIALPLAN_CLASS = ("no Newexten events: the manager user lacks read class dialplan "
                     "(or an eventfilter drops Newexten), so calls to a user's number that "
                     "ring elsewhere, such as forwards to mobiles, are lost")
NO_CALL_CLASS = ("no Newchannel events: the manager user lacks read class call, so "
                 "no call is followed")
NO_REPORTING_CLASS = ("CoreShowChannels refused (%s): the manager user lacks write class "
                      "reporting, so calls that went on while the link was down are lost")


class ManagerClassProbe:
    """What one login's events say about the manager user's classes
    (manager.conf ``read =``, ``write =``), which Asterisk never tells.

    ``observe(event, msg)`` takes every message of the login and returns
    the problems it has just become sure of, each once: DialBegins of
    PROBE_DIALS callers with no Newexten at all (each Dial the dialplan
    runs is a Newexten first, main/pbx.c), or Newexten of PROBE_EXTENS
    channels with no Newchannel at all.  ``refused(message)``: the
    resync's CoreShowChannels was refused.  Once Newexten and Newchannel
    were both seen, ``done``: nothing is left to learn.
    """

    __slots__ = ("done", "said", "_newexten", "_newchannel", "_callers", "_extens")

    def __init__(self) -> None:
        self.done = False
        self.said: List[str] = []
        self._newexten = False
        self._newchannel = False
        self._callers: Set[str] = set()
        self._extens: Set[str] = set()

    def observe(self, event: Optional[str], msg: AmiMessage) -> List[str]:
        if event == "Newexten":
            self._newexten = True
            if not self._newchannel and len(self._extens) < PROBE_EXTENS:
                self._extens.add(msg.get("Uniqueid", ""))
                if len(self._extens) == PROBE_EXTENS:
                    return self._say(NO_CALL_CLASS)
        elif event == "Newchannel":
            self._newchannel = True
        elif event == "DialBegin" and not self._newexten and len(self._callers) < PROBE_DIALS:
            caller = msg.get("Uniqueid")
            if caller:  # an Originate's dial has no calling channel
                self._callers.add(caller)
                if len(self._callers) == PROBE_DIALS:
                    return self._say(NO_DIALPLAN_CLASS)
        self.done = self._newexten and self._newchannel
        return []

    def refused(self, message: str) -> List[str]:
        return self._say(NO_REPORTING_CLASS % (message[:80] or "refused"))

    def _say(self, problem: str) -> List[str]:
        if problem in self.said:
            return []
        self.said.append(problem)
        return [problem]


# ---------------------------------------------------------------------------
# Channel model (no users): channels, bridges, Local pairs, who is in a call
# ---------------------------------------------------------------------------

# How a call flows through the engine (this section and the two after it):
#
# 1. An AMI event reaches CallEngine.handle(), whose HANDLERS table names
#    one handler per event (on_<event>); events without one cost a lookup.
# 2. The handler first brings the channels it names up to date (_snapshot):
#    the Channel model below knows Asterisk's side only (channels, who
#    dialed whom, Local pairs, bridges) and answers "who is in this call".
# 3. The rules then decide what each user is told.  A UserCall is one user's
#    view of one call: the CallBook links it to the channels that keep it
#    alive, and its phase (CALL_PHASES) says what may be told next:
#    incoming/outgoing first, hangup last and once.
# 4. Every notification goes into the Outbox handed down the handlers, which
#    handle() returns: the engine never knows who listens.

#: What Asterisk sends for "no caller ID".
_UNKNOWN_CALLERID = frozenset(("", "<unknown>", "<Unknown>", "unknown"))
#: Local channel chains are short; this bounds a walk through a broken one.
MAX_LINEAGE_HOPS = 16
#: Uniqueids of channels that hung up, remembered so that a late event
#: (Asterisk 13 sometimes sends NewConnectedLine after Hangup, see
#: cacofonisk/queue__queue_simple.ami) cannot bring a channel back to life.
MAX_RECENT_HANGUPS = 4096


class Party(collections.namedtuple("Party", "num name")):
    """Caller ID of one side: number and name, '' where Asterisk has none."""

    __slots__ = ()

    def __new__(cls, num: str = "", name: str = "") -> "Party":
        return tuple.__new__(cls, (num[:MAX_FIELD_CHARS], name[:MAX_FIELD_CHARS]))

    @classmethod
    def of(cls, num: Optional[str], name: Optional[str]) -> "Party":
        # tuple.__new__ itself: one Python call less, and caller ID changes
        # a few times on every channel.
        return tuple.__new__(cls, (
            "" if num in _UNKNOWN_CALLERID or num is None else num[:MAX_FIELD_CHARS],
            "" if name in _UNKNOWN_CALLERID or name is None else name[:MAX_FIELD_CHARS]))

    def as_dict(self) -> Dict[str, str]:
        return {"num": self.num, "name": self.name}

    def __bool__(self) -> bool:
        return bool(self.num or self.name)

NOBODY = Party("", "")


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC, to the second: ``2026-11-26T21:19:10Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

#: Times from the PBX outside this are not times (a Uniqueid can be set by
#: Originate's ChannelId; ``inf`` would break every date after it).
MAX_EPOCH_S = 2 ** 33


def sane_epoch(text: str) -> Optional[float]:
    try:
        epoch = float(text)
    except ValueError:
        return None
    return epoch if 0 < epoch < MAX_EPOCH_S else None


def uniqueid_epoch(uniqueid: str) -> Optional[float]:
    """When Asterisk created a channel: a Uniqueid is ``[system-]epoch.seq``
    (main/channel.c), so a channel seen mid-call still has a start time."""
    return sane_epoch(uniqueid.rpartition("-")[2].partition(".")[0])


def local_exten(device: str) -> str:
    """``Local/101@from-internal`` -> ``101``: the number a Local channel runs."""
    return device.partition("/")[2].partition("@")[0]


class Channel:
    """One Asterisk channel, as the engine last saw it."""

    __slots__ = ("uniqueid", "name", "device", "is_local", "local_half", "local_peer",
                 "linkedid", "state", "caller", "connected", "context", "exten",
                 "first_exten", "app", "appdata", "created", "answered_at", "bridge",
                 "dialer", "dial_targets", "originated", "user_calls", "diverted_from",
                 "transferred_by", "queue", "queue_join", "queue_told", "hold_told", "parked",
                 "callback", "caller_raw", "connected_raw", "new_call",
                 "picks")

    def __init__(self, uniqueid: str, name: str, now: float):
        self.uniqueid = uniqueid
        self.name = name
        self.device = device_of_channel(name)
        self.is_local = self.device.startswith("Local/")
        #: "1" or "2" for the halves of a Local channel pair, else "".
        self.local_half = name[-1] if self.is_local and name[-2:-1] == ";" else ""
        self.local_peer: Optional[Channel] = None
        self.linkedid = uniqueid
        self.state = ""
        self.caller = NOBODY
        self.connected = NOBODY
        #: Caller ID as Asterisk last sent it: most events repeat it, and
        #: comparing the raw pair spares rebuilding ``caller`` every time.
        self.caller_raw: Tuple[Optional[str], Optional[str]] = (None, None)
        self.connected_raw: Tuple[Optional[str], Optional[str]] = (None, None)
        self.context = ""
        self.exten = ""
        #: The extension the channel was created at: what a caller dialed.
        self.first_exten: Optional[str] = None
        #: The dialplan application it runs (Newexten, CoreShowChannel).
        self.app = ""
        self.appdata = ""
        self.created = now
        self.answered_at: Optional[float] = None
        self.bridge: Optional[str] = None
        #: The channel whose Dial created this one (None: a caller, or originated).
        self.dialer: Optional[Channel] = None
        #: Channels this one is dialing and whose DialEnd has not come yet.
        self.dial_targets: Set[Channel] = set()
        #: Rung by an Originate action (click-to-dial), not by a caller.
        self.originated = False
        #: The user calls this channel keeps alive.
        self.user_calls: List[UserCall] = []
        #: The number this channel's call was meant for before a divert.
        self.diverted_from: Optional[Party] = None
        #: (transferer, kind) once a blind transfer sent this channel on.
        self.transferred_by: Optional[Tuple[Party, str]] = None
        #: The queue this (caller) channel waits in, and the members told so.
        self.queue: Optional[str] = None
        self.queue_join: Tuple[str, str] = ("", "")  # position, count at join
        self.queue_told: Set[str] = set()
        #: While this channel holds its call: the user calls told "hold".
        self.hold_told: Optional[List[UserCall]] = None
        #: (space, lot, parked by) while parked.
        self.parked: Optional[Tuple[str, str, Party]] = None
        #: The id of a new call on the same Linkedid (FollowOnCalls): the
        #: parked call rung back at the parker (ParkedCallTimeOut), or a call
        #: found again after the link-lost grace had ended it.
        self.new_call: Optional[str] = None
        #: For an originated Local channel (click-to-dial through the
        #: dialplan): the user's phone it rang first, the real caller.
        self.callback: Optional[Channel] = None
        #: The pickup method its dialplan ran (Pickup, PickupChan), kept:
        #: the picked-up call's AppDial replaces the application at once.
        self.picks = ""

    def lineage(self) -> Iterable["Channel"]:
        """The channel, then the ones that caused it: a Local ;2 half leads to
        its ;1 half, a dialed channel to the channel that dialed it."""
        chan: Optional[Channel] = self
        hops = 0
        while chan is not None and hops < MAX_LINEAGE_HOPS:
            yield chan
            hops += 1
            if chan.local_half == "2" and chan.local_peer is not None:
                chan = chan.local_peer
            else:
                chan = chan.dialer

    def rung_through(self) -> List["Channel"]:
        """The channel, and what a dial of it rings further on: across a
        Local pair to its ;2 half, and whatever that half dials."""
        found: List[Channel] = []
        seen: Set[Channel] = set()
        todo = [self]
        while todo:
            chan = todo.pop()
            if chan in seen:
                continue
            seen.add(chan)
            found.append(chan)
            if chan.local_half == "1" and chan.local_peer is not None:
                todo.append(chan.local_peer)
            todo.extend(chan.dial_targets)
        return found

    @property
    def call_id(self) -> str:
        """The call this channel is in, as users are told: its Linkedid, or
        the new call it began by coming back from a park."""
        return self.new_call or self.linkedid

    def root(self) -> "Channel":
        """The channel that started it all: the caller."""
        root = self
        for root in self.lineage():
            pass
        return root

    def __repr__(self) -> str:
        return "<Channel %s %s>" % (self.name, self.uniqueid)


class ChannelTable:
    """Asterisk's side of the calls: the live channels by Uniqueid, Local
    channel pairs, bridges, and the Uniqueids hung up lately.  It knows no
    users; CallEngine keeps it up to date and reads it."""

    def __init__(self) -> None:
        self.channels: Dict[str, Channel] = {}
        #: bridge id -> the channels in it.
        self.bridges: Dict[str, List[Channel]] = {}
        #: Local channel halves waiting for their other half, by the name
        #: both share (without ";1" / ";2").
        self._unpaired_locals: Dict[str, Channel] = {}
        #: Late events of a channel that hung up must not bring it back.
        self._recent_hangups: Set[str] = set()
        self._recent_hangup_order: "collections.deque[str]" = collections.deque()

    def add(self, chan: Channel) -> None:
        self.channels[chan.uniqueid] = chan
        if chan.local_half:
            base = chan.name[:-2]
            other = self._unpaired_locals.pop(base, None)
            if other is None:
                self._unpaired_locals[base] = chan
            else:
                chan.local_peer, other.local_peer = other, chan

    def remove(self, chan: Channel) -> None:
        """The channel hung up: out of the table and its bridge, and its
        Uniqueid remembered for a while (MAX_RECENT_HANGUPS)."""
        self.channels.pop(chan.uniqueid, None)
        self._recent_hangups.add(chan.uniqueid)
        self._recent_hangup_order.append(chan.uniqueid)
        if len(self._recent_hangup_order) > MAX_RECENT_HANGUPS:
            self._recent_hangups.discard(self._recent_hangup_order.popleft())
        if chan.local_half:
            self._unpaired_locals.pop(chan.name[:-2], None)
        self.leave_bridge(chan)

    def hung_up_lately(self, uniqueid: str) -> bool:
        return uniqueid in self._recent_hangups

    def enter_bridge(self, chan: Channel, bridge_id: str) -> None:
        if chan.bridge == bridge_id:
            return
        self.leave_bridge(chan)
        chan.bridge = bridge_id
        self.bridges.setdefault(bridge_id, []).append(chan)

    def leave_bridge(self, chan: Channel) -> None:
        members = self.bridges.get(chan.bridge or "")
        if members is not None:
            if chan in members:
                members.remove(chan)
            if not members:
                del self.bridges[chan.bridge]  # type: ignore[arg-type]
        chan.bridge = None

    def bridged_with(self, chan: Channel) -> List[Channel]:
        return [c for c in self.bridges.get(chan.bridge or "", ()) if c is not chan]

    def talking_with(self, chan: Channel) -> List[Channel]:
        """The channels in ``chan``'s bridge and, across Local channel pairs
        in it (a ring group, a queue member, a FreePBX forward), in the
        bridges beyond: everyone on the other end of the conversation."""
        found: List[Channel] = []
        seen = {chan}
        todo = [chan]
        while todo:
            for other in self.bridged_with(todo.pop()):
                for hop in (other, other.local_peer if other.is_local else None):
                    if hop is not None and hop not in seen:
                        seen.add(hop)
                        found.append(hop)
                        todo.append(hop)
        return found

    def parties(self, chan: Channel, exclude: Sequence[Channel] = ()) -> List[Channel]:
        """Everyone in ``chan``'s call but ``chan`` (and ``exclude``): those
        it talks with (``talking_with``, from either half of a Local pair),
        the caller that started the call, and every channel that caller's
        dials reached, ringing or not.  Local channels too: a call to a
        user's number may be anchored on one.  The one answer to "who is in
        this call" for hold, parking and transfers."""
        found: List[Channel] = []
        seen = set(exclude)
        seen.add(chan)
        root = chan.root()
        candidates = self.talking_with(chan)
        if chan.is_local and chan.local_peer is not None:
            candidates += [chan.local_peer] + self.talking_with(chan.local_peer)
        candidates.append(root)
        candidates += [c for c in self.channels.values() if root in set(c.lineage())]
        for c in candidates:
            if c not in seen:
                seen.add(c)
                found.append(c)
        return found

    def far_side(self, chan: Channel) -> List[Channel]:
        """What a Local channel leads to beyond its other half: that half's
        bridge, what led to it and what it dials.  A transfer names the
        half on its side (``Local/101@from-internal;1``) while the other half
        is already bridged to the transferer's: only the far side is the
        target (k_attended_transfer)."""
        far = chan.local_peer
        if far is None:
            return []
        found: List[Channel] = []
        for c in self.bridged_with(far) + list(far.lineage())[1:] + \
                [c for c in self.channels.values() if c is not far and far in set(c.lineage())]:
            if c not in found:
                found.append(c)
        return found

    def clear(self) -> None:
        """The AMI link is gone: nothing is known any more."""
        self.channels.clear()
        self.bridges.clear()
        self._unpaired_locals.clear()
        self._recent_hangups.clear()
        self._recent_hangup_order.clear()

    def is_idle(self) -> bool:
        """No channel is up: nothing is kept but the hangups of late."""
        return not self.channels and not self.bridges and not self._unpaired_locals

    def check(self) -> List[str]:
        """Where bridges or Local halves name channels that are gone, or the
        memory of hangups outgrew its bound: for the tests; [] when all is
        well."""
        problems = []
        for bridge_id, members in self.bridges.items():
            for chan in members:
                if self.channels.get(chan.uniqueid) is not chan or chan.bridge != bridge_id:
                    problems.append("bridge %s lists %r, gone or elsewhere" % (bridge_id, chan))
            if not members:
                problems.append("bridge %s is empty but kept" % bridge_id)
        for chan in self.channels.values():
            if chan.bridge is not None and chan not in self.bridges.get(chan.bridge, ()):
                problems.append("%r is in bridge %s, which does not list it"
                                % (chan, chan.bridge))
        problems += ["unpaired Local half %r is gone" % (chan,)
                     for chan in self._unpaired_locals.values()
                     if self.channels.get(chan.uniqueid) is not chan]
        if len(self._recent_hangups) > MAX_RECENT_HANGUPS:
            problems.append("%d hangups remembered" % len(self._recent_hangups))
        return problems


# ---------------------------------------------------------------------------
# User calls: each user's view of a call, its phases, and the call book
# ---------------------------------------------------------------------------

#: Q.850 cause texts, for causes Asterisk sent without ``Cause-txt`` and for
#: the ones ctinotify infers (main/causes.h).
Q850_CAUSES = {
    0: "Unknown", 1: "Unallocated (unassigned) number", 3: "No route to destination",
    16: "Normal Clearing", 17: "User busy", 18: "No user responding",
    19: "User alerting, no answer", 20: "Subscriber absent", 21: "Call Rejected",
    22: "Number changed", 26: "Answered elsewhere", 27: "Destination out of order",
    28: "Invalid number format", 29: "Facility rejected", 31: "Normal, unspecified",
    34: "Circuit/channel congestion", 38: "Network out of order", 41: "Temporary failure",
    42: "Switching equipment congestion", 58: "Bearer capability not available",
    88: "Incompatible destination", 102: "Recovery on timer expiry",
    127: "Interworking, unspecified",
}
#: Causes that mean the call could not be set up at all.
_FAILURE_CAUSES = frozenset((1, 3, 20, 22, 27, 28, 29, 34, 38, 41, 42, 58, 88, 102))
#: The cause reported for an outcome when the channel's own cause was 0.
_OUTCOME_CAUSES = {Reason.COMPLETED: 16, Reason.BUSY: 17, Reason.NOANSWER: 19,
                   Reason.ANSWERED_ELSEWHERE: 26, Reason.FAILED: 34, Reason.CANCELLED: 16}


class Directory:
    """Which configured users a device or a dialed extension belongs to, on
    one PBX: a device named ``NAME:PJSIP/100`` counts on PBX NAME only."""

    def __init__(self, users: Iterable[UserConfig] = (), pbx: str = DEFAULT_PBX):
        by_device: Dict[str, List[str]] = {}
        by_extension: Dict[str, List[Tuple[str, str]]] = {}
        for user in users:
            for qualified in user.devices:
                on, device = split_device(qualified)
                if on and on != pbx:
                    continue
                by_device.setdefault(device, []).append(user.name)
            for qualified, context in user.extensions:
                on, colon, number = qualified.rpartition(":")
                if on and on != pbx:
                    continue  # NAME:100 is number 100 on PBX NAME only
                by_extension.setdefault(number, []).append((context, user.name))
        self._by_device = {k: tuple(v) for k, v in by_device.items()}
        self._by_extension = by_extension

    def device_users(self, device: str) -> Tuple[str, ...]:
        return self._by_device.get(device, ())

    def extension_users(self, exten: str, context: str = "") -> Tuple[str, ...]:
        """Users with this number; ``context=""`` matches any context."""
        entries = self._by_extension.get(exten)
        if not entries:
            return ()
        return tuple(user for ctx, user in entries if not ctx or not context or ctx == context)

    def interface_users(self, interface: str) -> Tuple[str, ...]:
        """Users behind a queue member interface: a device, or a Local
        channel to a user's number (FreePBX ``Local/100@from-queue/n``)."""
        if not interface or "/" not in interface:
            return ()
        device = device_of_interface(interface)
        if device.startswith("Local/"):
            return self.extension_users(local_exten(device))
        return self.device_users(device)


class IllegalTransition(CtiError):
    """The engine was about to tell a user something their call's phase
    does not allow (CALL_PHASES): a bug in ctinotify, never in the input."""


class Phase:
    """Where a user call is in its life: the rows of CALL_PHASES."""

    ROUTED = "routed"            # it reached the user's number; nothing told yet
    TRIED = "tried"              # ... and its dialplan ran Dial for the user
    RINGING = "ringing"          # incoming/outgoing told; not answered
    ANSWERED = "answered"        # the user talks (pickup, or retrieved from a park)
    TAKEN = "taken"              # someone else answered; the user's phone rings down
    TRANSFERRED = "transferred"  # the user handed it on; ends reason=transferred
    ENDED = "ended"              # hangup told, or forgotten before anything was told

#: The phases in which the user has been told of the call.
TOLD_PHASES = frozenset((Phase.RINGING, Phase.ANSWERED, Phase.TAKEN, Phase.TRANSFERRED))


class Move:
    """The keys of CALL_PHASES beside the plain kinds (a kind is told and
    moves the call): ``(kind, variant)`` for a kind that moves it elsewhere,
    ``(None, what)`` for a move that tells the user nothing."""

    PICKUP_ELSEWHERE = (Kind.PICKUP, "elsewhere")  # another phone answered
    RETRIEVED = (Kind.UNPARK, ParkResult.RETRIEVED)  # the user took a parked call
    TRANSFER_AWAY = (Kind.TRANSFER, Direction.TO)  # the user transferred it
    TRY = (None, "try")                            # the dialplan dials the user
    APP_ANSWERED = (None, "app answered")          # a conference, voicemail answered
    FORGET = (None, "forget")                      # routed elsewhere, never told


def _stay(phase: str, *kinds: object) -> Dict[object, str]:
    return {kind: phase for kind in kinds}

#: News that may come in every phase the user was told of: it moves nothing.
_SIDE_NEWS = (Kind.TRANSFER, Kind.PARK, Kind.CONFERENCE, Kind.HOLD, Kind.UNHOLD)
#: phase -> {what is told (a Kind or a Move) -> the phase it moves the call
#: to}.  Anything else is a bug (IllegalTransition), never a silent drop:
#: code that may meet a call in another phase asks ``can()`` first, or
#: checks the phase, and says why it skips.  Every call told of starts with
#: incoming or outgoing and ends with one hangup: only INCOMING and OUTGOING
#: lead from an untold phase to a told one, only HANGUP leads from a told
#: phase to ENDED, and ENDED allows nothing.
CALL_PHASES: Dict[str, Dict[object, str]] = {
    Phase.ROUTED: {
        Kind.INCOMING: Phase.RINGING, Kind.OUTGOING: Phase.RINGING,
        Move.TRY: Phase.TRIED, Move.FORGET: Phase.ENDED},
    Phase.TRIED: {Kind.INCOMING: Phase.RINGING, Move.FORGET: Phase.ENDED},
    Phase.RINGING: {
        **_stay(Phase.RINGING, Kind.TIMEOUT, Kind.BUSY, Kind.DIVERT, Kind.UNPARK, *_SIDE_NEWS),
        Kind.PICKUP: Phase.ANSWERED, Move.PICKUP_ELSEWHERE: Phase.TAKEN,
        Move.RETRIEVED: Phase.ANSWERED, Move.APP_ANSWERED: Phase.ANSWERED,
        Move.TRANSFER_AWAY: Phase.TRANSFERRED, Kind.HANGUP: Phase.ENDED},
    Phase.ANSWERED: {
        **_stay(Phase.ANSWERED, Move.RETRIEVED, *_SIDE_NEWS),
        Move.TRANSFER_AWAY: Phase.TRANSFERRED, Kind.HANGUP: Phase.ENDED},
    Phase.TAKEN: {
        **_stay(Phase.TAKEN, *_SIDE_NEWS),
        Move.RETRIEVED: Phase.ANSWERED, Kind.HANGUP: Phase.ENDED},
    Phase.TRANSFERRED: {
        **_stay(Phase.TRANSFERRED, Move.RETRIEVED, *_SIDE_NEWS),
        Kind.HANGUP: Phase.ENDED},
    Phase.ENDED: {},
}


class UserCall:
    """One user's view of one call: what that user has been told so far.

    A user call is made when a call reaches one of the user's devices or
    extensions and moves through the phases of CALL_PHASES: announced once
    (``incoming``/``outgoing``), ended exactly once with ``hangup`` when the
    last channel keeping it alive is gone.
    """

    __slots__ = ("user", "call_id", "direction", "device", "me", "peer", "dialed",
                 "started", "answered_at", "phase", "channels", "anchor",
                 "outcome", "answered_by", "cause", "cause_txt", "diverted_to",
                 "path", "queue", "queue_caller", "leg_outcome")

    def __init__(self, user: str, call_id: str, direction: str, me: Party, peer: Party,
                 dialed: str, now: float):
        self.user = user
        self.call_id = call_id
        #: CALL_IN (the user is called) or CALL_OUT (the user calls).
        self.direction = direction
        self.device = ""
        self.me = me
        self.peer = peer
        self.dialed = dialed
        self.started = now
        self.answered_at: Optional[float] = None
        #: A Phase; changed only by move().
        self.phase = Phase.ROUTED
        #: The user's own channels in this call (kept by the CallBook).
        self.channels: List[Channel] = []
        #: For a call that reached the user's *extension*: the caller-side
        #: channel running that extension.  It keeps the user call alive
        #: while the call rings elsewhere (a forward to a mobile).
        self.anchor: Optional[Channel] = None
        #: Why it was not answered, once known: noanswer, busy, cancelled,
        #: failed, unknown.
        self.outcome: Optional[str] = None
        self.answered_by: Optional[Party] = None
        self.cause = 0
        self.cause_txt = ""
        #: Numbers the user was told the call was diverted to.
        self.diverted_to: List[str] = []
        #: Diverts, transfers and parking, for the call log.
        self.path: List[Dict[str, object]] = []
        self.queue = ""
        #: The verdict of a leg that ended while another of the user's phones
        #: still rang (a busy desk phone while the softphone rings).
        self.leg_outcome: Optional[str] = None
        #: The caller waiting in ``queue`` that rang the user (queue calls).
        self.queue_caller: Optional[Channel] = None

    def __repr__(self) -> str:
        return "<UserCall %s %s %s %s>" % (self.user, self.call_id, self.direction, self.phase)

    def can(self, move: object) -> bool:
        """Whether telling ``move`` (a Kind or a Move) is legal now."""
        return move in CALL_PHASES[self.phase]

    def move(self, move: object) -> None:
        """Go where ``move`` leads from the current phase (CALL_PHASES)."""
        to = CALL_PHASES[self.phase].get(move)
        if to is None:
            raise IllegalTransition("%r: %r is not allowed in phase %s"
                                    % (self, move, self.phase))
        self.phase = to

    @property
    def told(self) -> bool:
        """The user has heard of this call (and it has not ended)."""
        return self.phase in TOLD_PHASES

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.call_id, self.user, self.direction)

    @property
    def role(self) -> str:
        return "callee" if self.direction == CALL_IN else "caller"

    @property
    def parties(self) -> Tuple[Party, Party]:
        """(from, to) as the user sees them."""
        return (self.peer, self.me) if self.direction == CALL_IN else (self.me, self.peer)

    def reason(self) -> str:
        """Why the call ended for this user: what was seen, else the cause."""
        if self.phase is Phase.TRANSFERRED:
            return Reason.TRANSFERRED
        if self.answered_at is not None:
            return Reason.COMPLETED
        if self.phase is Phase.TAKEN:
            return Reason.ANSWERED_ELSEWHERE
        if self.cause == 26 and self.outcome in (None, Reason.CANCELLED):
            return Reason.ANSWERED_ELSEWHERE
        if self.outcome is not None:
            return self.outcome
        if self.cause == 17:
            return Reason.BUSY
        if self.cause in (18, 19):
            return Reason.NOANSWER
        if self.cause in _FAILURE_CAUSES:
            return Reason.FAILED
        return Reason.CANCELLED

    def ending(self, now: float, reason: Optional[str] = None) -> Dict[str, object]:
        """The fields of this call's ``hangup`` at ``now``."""
        reason = reason or self.reason()
        cause, cause_txt = self.cause, self.cause_txt
        if not cause and reason in _OUTCOME_CAUSES:
            cause = _OUTCOME_CAUSES[reason]
            cause_txt = Q850_CAUSES[cause]
        duration = int(round(max(0.0, now - self.started)))
        talk_time = int(round(max(0.0, now - self.answered_at))) if self.answered_at else 0
        return {"reason": reason, "cause": cause,
                "cause_txt": cause_txt or Q850_CAUSES.get(cause, ""),
                "duration": duration, "talk_time": min(talk_time, duration)}

    def record(self, end: str, ending: Dict[str, object]) -> Dict[str, object]:
        """The call log line of this finished call."""
        frm, to = self.parties
        return {
            "user": self.user, "call": self.call_id, "direction": self.direction,
            "device": self.device, "from": frm.as_dict(), "to": to.as_dict(),
            "dialed": self.dialed[:MAX_FIELD_CHARS], "start": iso_time(self.started),
            "answer": iso_time(self.answered_at) if self.answered_at else None,
            "end": end, "answered": self.answered_at is not None,
            "answered_by": self.answered_by.as_dict() if self.answered_by else None,
            "reason": ending["reason"], "cause": ending["cause"],
            "duration": ending["duration"], "talk_time": ending["talk_time"],
            "queue": self.queue[:MAX_FIELD_CHARS], "path": self.path,
        }


class FollowOnCalls:
    """Call ids for the new calls that follow on one Asterisk call (one
    Linkedid) after the user's call of that id ended: ``<linkedid>+1``,
    ``+2``...  A parked call that comes back to the parker is such a call,
    and so is a call still up at the PBX when the link comes back after the
    grace ended it (``link_lost``): one ``hangup`` per call id, always last.
    Remembered across a link loss, for at most MAX_RECENT_HANGUPS Linkedids."""

    def __init__(self) -> None:
        #: Linkedid -> how many calls followed on it, least recent first.
        self._count: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        #: Linkedid -> the id its channels take from now on (after link_lost);
        #: read by the engine for every channel event: mostly empty.
        self.restarted: "collections.OrderedDict[str, str]" = collections.OrderedDict()

    def new_id(self, linkedid: str) -> str:
        """The id of the next call to follow on ``linkedid``."""
        count = self._count.pop(linkedid, 0) + 1
        self._count[linkedid] = count
        if len(self._count) > MAX_RECENT_HANGUPS:
            self._count.popitem(last=False)
        return "%s+%d" % (linkedid, count)

    def restart(self, linkedid: str) -> None:
        """The users' calls on ``linkedid`` ended (link lost): what is seen
        of it from now on is a new call."""
        self.restarted.pop(linkedid, None)
        self.restarted[linkedid] = self.new_id(linkedid)
        if len(self.restarted) > MAX_RECENT_HANGUPS:
            self.restarted.popitem(last=False)

    def check(self) -> List[str]:
        return ["%d call ids remembered" % len(memory) for memory in (self._count, self.restarted)
                if len(memory) > MAX_RECENT_HANGUPS]


class CallBook:
    """The user calls in progress, and their links to channels.

    A user call keeps a list of the user's own channels in it
    (``UserCall.channels``) and maybe an *anchor* (``UserCall.anchor``:
    the caller-side channel running the user's number); each of those
    channels lists the call back in ``Channel.user_calls``.  The book is the
    only code that changes these links, so they stay two-way: ``check()``
    says where they do not.  A user call is *open* from ``user_call()`` to
    ``close()``; closing unlinks it from everything.
    """

    def __init__(self) -> None:
        #: (call id, user, direction) -> the open user call.
        self._by_key: Dict[Tuple[str, str, str], UserCall] = {}
        #: call id -> its open user calls, to tell the others when one answers.
        self._by_call: Dict[str, List[UserCall]] = {}
        #: Queue caller Uniqueid -> its members' calls that stopped ringing
        #: while the caller still waits (the queue may ring them again).
        self._queue_held: Dict[str, List[UserCall]] = {}

    # -- queries ---------------------------------------------------------------

    def is_open(self, uc: UserCall) -> bool:
        return self._by_key.get(uc.key) is uc

    def has_call(self, call_id: str) -> bool:
        """Whether any user is part of this call (most calls, on a big PBX,
        have none)."""
        return call_id in self._by_call

    def of_call(self, call_id: str) -> List[UserCall]:
        """The open user calls of one call, a copy (telling may close some)."""
        return list(self._by_call.get(call_id, ()))

    def of_user(self, user: str) -> List[UserCall]:
        return [uc for uc in self._by_key.values() if uc.user == user]

    def all(self) -> List[UserCall]:
        return list(self._by_key.values())

    def is_idle(self) -> bool:
        """No user call is open."""
        return not self._by_key and not self._by_call and not self._queue_held

    def check(self, table: "ChannelTable") -> List[str]:
        """Where the links are not two-way, or name a channel that is gone,
        or a call that is not open: for the tests; [] when all is well."""
        problems = []
        for key, uc in self._by_key.items():
            if uc.key != key or uc not in self._by_call.get(uc.call_id, ()):
                problems.append("%r is not booked under its key and call" % (uc,))
            if uc.phase is Phase.ENDED:
                problems.append("%r is open" % (uc,))
            elif (uc.answered_at is not None) != (uc.phase is Phase.ANSWERED) and \
                    uc.phase is not Phase.TRANSFERRED:
                problems.append("%r has answered_at %r" % (uc, uc.answered_at))
            for chan in uc.channels:
                if uc not in chan.user_calls:
                    problems.append("%r does not list %r" % (chan, uc))
                if table.channels.get(chan.uniqueid) is not chan:
                    problems.append("%r keeps %r, which is gone" % (uc, chan))
            anchor = uc.anchor
            if anchor is not None:
                if uc not in anchor.user_calls:
                    problems.append("anchor %r does not list %r" % (anchor, uc))
                if table.channels.get(anchor.uniqueid) is not anchor:
                    problems.append("%r is anchored on %r, which is gone" % (uc, anchor))
        for call_id, ucs in self._by_call.items():
            if not ucs or any(not self.is_open(uc) or uc.call_id != call_id for uc in ucs):
                problems.append("call %s lists user calls not open: %r" % (call_id, ucs))
        for chan in table.channels.values():
            for uc in chan.user_calls:
                if not self.is_open(uc):
                    problems.append("%r lists %r, which is not open" % (chan, uc))
                elif chan not in uc.channels and uc.anchor is not chan:
                    problems.append("%r lists %r, which does not keep it" % (chan, uc))
            if len(set(chan.user_calls)) != len(chan.user_calls):
                problems.append("%r lists a user call twice" % (chan,))
        for uid, held in self._queue_held.items():
            problems += ["queue caller %s holds %r, which is not open" % (uid, uc)
                         for uc in held if not self.is_open(uc)]
        return problems

    # -- opening and linking ---------------------------------------------------

    def user_call(self, call_id: str, user: str, direction: str, me: Party, peer: Party,
             dialed: str, now: float) -> UserCall:
        """The user's open call of this call and direction, made if new."""
        key = (call_id, user, direction)
        uc = self._by_key.get(key)
        if uc is None:
            uc = UserCall(user, call_id, direction, me, peer, dialed, now)
            self._by_key[key] = uc
            self._by_call.setdefault(call_id, []).append(uc)
        return uc

    def attach(self, uc: UserCall, chan: Channel) -> None:
        """``chan`` is one of the user's own phones in the call."""
        if chan not in uc.channels:
            uc.channels.append(chan)
        if uc not in chan.user_calls:
            chan.user_calls.append(uc)

    def anchor(self, uc: UserCall, chan: Channel) -> None:
        """The call lives on while ``chan`` (running the user's number) does."""
        if uc.anchor is chan:
            return
        self.release_anchor(uc)
        uc.anchor = chan
        if uc not in chan.user_calls:
            chan.user_calls.append(uc)

    def release_anchor(self, uc: UserCall) -> None:
        """Answered on the user's own phone (or gone elsewhere): from now on
        the user call lives as long as the user's channels, not as long as
        the caller's."""
        anchor = uc.anchor
        if anchor is not None:
            uc.anchor = None
            if uc in anchor.user_calls and anchor not in uc.channels:
                anchor.user_calls.remove(uc)

    def swap(self, old: Channel, new: Channel) -> None:
        """``new`` took ``old``'s place in a bridge (a Local channel pair
        optimized away, Asterisk 12+): calls anchored on the vanishing Local
        channel follow the channel that replaced it."""
        for half in (old, old.local_peer):
            if half is None:
                continue
            for uc in list(half.user_calls):
                if uc.anchor is half and new not in uc.channels:
                    half.user_calls.remove(uc)
                    uc.anchor = new
                    new.user_calls.append(uc)

    def detach(self, chan: Channel) -> List[UserCall]:
        """The channel hung up: no user call keeps it any more.  Returns the
        user calls it was linked to."""
        linked, chan.user_calls = chan.user_calls, []
        for uc in linked:
            if chan in uc.channels:
                uc.channels.remove(chan)
            if uc.anchor is chan:
                uc.anchor = None
        return linked

    def hold_for_queue(self, uc: UserCall, caller: Channel) -> None:
        """Keep ``uc`` open, without a channel, while ``caller`` waits in
        the queue that rang the user (it may ring them again)."""
        held = self._queue_held.setdefault(caller.uniqueid, [])
        if uc not in held:
            held.append(uc)

    def release_queue_held(self, caller: Channel) -> List[UserCall]:
        """The caller left the queue: the user calls held for it."""
        return self._queue_held.pop(caller.uniqueid, [])

    # -- closing ---------------------------------------------------------------

    def close(self, uc: UserCall) -> bool:
        """Unlink and forget the user call; False if it was not open."""
        if self._by_key.get(uc.key) is not uc:
            return False
        del self._by_key[uc.key]
        siblings = self._by_call.get(uc.call_id)
        if siblings is not None:
            if uc in siblings:
                siblings.remove(uc)
            if not siblings:
                del self._by_call[uc.call_id]
        for chan in uc.channels:
            if uc in chan.user_calls:
                chan.user_calls.remove(uc)
        if uc.anchor is not None and uc in uc.anchor.user_calls:
            uc.anchor.user_calls.remove(uc)
        uc.channels = []
        uc.anchor = None
        caller = uc.queue_caller
        held = self._queue_held.get(caller.uniqueid) if caller is not None else None
        if held is not None and uc in held:
            held.remove(uc)
            if not held:
                del self._queue_held[caller.uniqueid]  # type: ignore[union-attr]
        return True

    def clear(self) -> None:
        """The AMI link is gone: every user call was closed or is forgotten."""
        self._by_key.clear()
        self._by_call.clear()
        self._queue_held.clear()


class Notification:
    """One event for one user: ``fields`` is what the client receives."""

    __slots__ = ("user", "kind", "fields", "record")

    def __init__(self, user: str, kind: str, fields: Dict[str, object],
                 record: Optional[Dict[str, object]] = None):
        self.user = user
        self.kind = kind
        self.fields = fields
        #: For ``hangup``: the finished call's summary, for the call log.
        self.record = record

    def __repr__(self) -> str:
        return "<Notification %s %s %s>" % (self.user, self.kind, self.fields.get("call"))

_NO_NOTIFICATIONS: Tuple[Notification, ...] = ()


class Outbox:
    """One call into the engine: the time it runs at, and the notifications
    it causes, in order.  Handed down through the handlers, so that nothing
    of one message is left on the engine for the next."""

    __slots__ = ("now", "notes")

    def __init__(self, now: float):
        self.now = now
        self.notes: List[Notification] = []


# ---------------------------------------------------------------------------
# Call-state engine (pure): AMI events in, per-user notifications out
# ---------------------------------------------------------------------------

#: The Dial application's DIALSTATUS (apps/app_dial.c) as a call outcome.
_DIAL_OUTCOMES = {
    "NOANSWER": Reason.NOANSWER, "BUSY": Reason.BUSY, "CANCEL": Reason.CANCELLED,
    "CONGESTION": Reason.FAILED, "CHANUNAVAIL": Reason.FAILED, "DONTCALL": Reason.FAILED,
    "TORTURE": Reason.FAILED, "INVALIDARGS": Reason.FAILED,
}
#: Dialplan extensions that are not numbers anybody dialed.
_SPECIAL_EXTENS = frozenset(("", "s", "h", "i", "t", "T", "o", "a", "e", "fax", "talk"))
#: The applications that pick up another phone's ringing call.
_PICKUP_APPS = frozenset(("pickup", "pickupchan"))
#: The channel snapshot fields every channel event carries, in the order
#: CallEngine._snapshot reads them; prefixed ("Dest", "Transferee"...) per role.
_SNAPSHOT_FIELDS = ("Uniqueid", "Channel", "ChannelStateDesc", "CallerIDNum", "CallerIDName",
                    "ConnectedLineNum", "ConnectedLineName", "Linkedid", "Exten", "Context")
_SNAPSHOT_KEYS: Dict[str, Tuple[str, ...]] = {}
#: Every ``<role>Uniqueid`` an event handled by the engine names a channel by.
_CHANNEL_ID_KEYS = tuple(role + "Uniqueid" for role in (
    "", "Dest", "Target", "Transferer", "Transferee", "OrigTransferer", "SecondTransferer",
    "TransferTarget", "LocalOne", "LocalTwo", "Parkee", "Parker", "Retriever", "Swap"))
#: Events that only bring the model up to date and tell no user anything:
#: they need not wait for a late DialBegin (LocalDialOrder).
_MODEL_ONLY_EVENTS = frozenset(("Newchannel", "Newstate", "NewCallerid", "NewConnectedLine",
                                "LocalBridge"))
#: The longest a Local channel's events wait for the DialBegin of its ;1
#: half (LocalDialOrder).  Asterisk publishes that DialBegin right after the
#: call starts, microseconds later; the bound is for a dial that never says.
LOCAL_DIAL_WAIT_S = 2.0


def _channels_named(msg: AmiMessage) -> Set[str]:
    """The Uniqueids of the channels an event names, in any role."""
    return {uid for uid in map(msg.get, _CHANNEL_ID_KEYS) if uid}


class _LocalWait:
    """One Local channel pair whose ;1 half's DialBegin has not come yet."""

    __slots__ = ("one", "channels", "held", "since")

    def __init__(self, one: Channel, two: Channel):
        self.one = one
        #: Uniqueids whose events wait: the ;2 half, and the channels its
        #: held events name with it (never ``one`` itself).
        self.channels = {two.uniqueid}
        #: (message, handler, time received), in the order received.
        self.held: List[Tuple[AmiMessage, object, float]] = []
        self.since = 0.0


class LocalDialOrder:
    """Puts back in order what a Local channel's two halves tell at once.

    A dial to a Local channel starts the dialplan of its ;2 half in a thread
    of its own (``ast_call``, main/core_local.c) and only then publishes the
    DialBegin to the ;1 half (apps/app_dial.c, apps/app_queue.c,
    main/dial.c).  So the ;2 half may run its dialplan, dial a phone and
    ring it before that DialBegin reaches us (seen live on Asterisk 22:
    tests/traces/live/h_forward_late_dialbegin.ami), and until it comes
    nothing says whose call the phone rings for.  Once the ;2 half does
    anything that may tell a user something (not ``_MODEL_ONLY_EVENTS``),
    its events, and every later event of a channel they name, are held
    until the DialBegin, then handled after it in their own order.  Events
    of other channels pass: Asterisk never ordered them against these.

    What else ends the wait: an event of the ;1 half itself (the DialBegin
    is then not coming first; its events from the dialing thread all follow
    the DialBegin), unless another wait holds that event (a Local pair
    dialed from a held ;2 side); its hangup; LOCAL_DIAL_WAIT_S; or a channel
    list after a reconnect (CoreShowChannels: everything is listed again).

    XXX: the engine has no timer, so LOCAL_DIAL_WAIT_S ends a wait at the
    next event after it: a PBX that falls silent meanwhile keeps the held
    events until it speaks again (while the ;2 side dials, it does)."""

    def __init__(self) -> None:
        #: ;1 half Uniqueid -> its wait, in the order the pairs appeared.
        #: Read by CallEngine.handle for every event: empty, nothing waits.
        self.waits: Dict[str, _LocalWait] = {}

    def expect_dial(self, one: Channel, two: Channel) -> None:
        """A Local pair was just requested: its ;1 half's DialBegin is due."""
        if one.uniqueid not in self.waits:
            self.waits[one.uniqueid] = _LocalWait(one, two)

    def due(self, msg: AmiMessage, now: float) -> list:
        """The held events to handle before ``msg``, their wait over: the
        ;1 half did something else first (or hung up), ``msg`` joins two
        waiting calls (order is lost then), LOCAL_DIAL_WAIT_S passed, or a
        channel list begins or ends."""
        event = msg.get("Event")
        named = _channels_named(msg)
        resync = event in ("CoreShowChannel", "CoreShowChannelsComplete")
        holders = [wait for wait in self.waits.values() if named & wait.channels]
        # An event a wait holds is not yet an event of the ;1 half it names
        # (a nested Local pair: it comes after that pair's own DialBegin).
        to_hold = len(holders) == 1 and (holders[0].held or event not in _MODEL_ONLY_EVENTS)
        awaited = msg.get("DestUniqueid") if event == "DialBegin" else None
        due: list = []
        for wait in list(self.waits.values()):
            one = wait.one.uniqueid
            if resync or (wait.held and now - wait.since > LOCAL_DIAL_WAIT_S) or \
                    (len(holders) > 1 and wait in holders) or \
                    (not to_hold and one in named and one != awaited and
                     (wait.held or event == "Hangup")):
                due += self._end(wait)
        return due

    def hold(self, msg: AmiMessage, handler: object, now: float) -> bool:
        """Keep ``msg`` back if it is the waiting ;2 side's (True)."""
        named = _channels_named(msg)
        holders = [wait for wait in self.waits.values() if named & wait.channels]
        if len(holders) != 1:
            return False
        wait = holders[0]
        if not wait.held:
            if msg.get("Event") in _MODEL_ONLY_EVENTS:
                return False  # nothing to tell yet: no need to wait
            wait.since = now
        wait.held.append((msg, handler, now))
        named.discard(wait.one.uniqueid)
        wait.channels |= named
        return True

    def dialed(self, msg: AmiMessage) -> list:
        """After the awaited DialBegin ``msg`` (handled): what waited for it."""
        if msg.get("Event") != "DialBegin":
            return []
        wait = self.waits.get(msg.get("DestUniqueid", ""))
        return self._end(wait) if wait is not None else []

    def _end(self, wait: _LocalWait) -> list:
        del self.waits[wait.one.uniqueid]
        return wait.held

    def clear(self) -> None:
        """The link is gone: what was held never happened for any user."""
        self.waits.clear()

    def check(self, table: ChannelTable) -> List[str]:
        """Waits for a ;1 half that is gone: for the tests."""
        return ["a DialBegin to %r is awaited, but it is gone" % (wait.one,)
                for wait in self.waits.values()
                if table.channels.get(wait.one.uniqueid) is not wait.one]


class _EngineCore:
    """The engine's state, and what every rule needs: the channel an event
    is about (``_snapshot``), who is who, and telling a user (``_tell``,
    ``_end``).  The rules come in layers, each building on those above it:
    dialing and answering, transfers and parking, queues, conferences and
    hold, then hangups and resync; CallEngine puts them behind one table."""

    def __init__(self, directory: Optional[Directory] = None, pbx: str = ""):
        self.directory = directory or Directory()
        #: With several PBXes: the name every notification carries as ``pbx``.
        self.pbx = pbx
        #: What Asterisk has: channels, Local pairs, bridges.
        self.table = ChannelTable()
        #: The users' views of the calls, and their links to channels.
        self.book = CallBook()
        #: Events of Local channels held until the DialBegin that dialed them.
        self.order = LocalDialOrder()
        #: Ids of calls that follow on an Asterisk call whose id was ended.
        self.follow_ons = FollowOnCalls()
        #: queue name -> the users among its members.
        self.queue_members: Dict[str, Set[str]] = {}
        #: conference name -> the channels in it.
        self.conferences: Dict[str, List[Channel]] = {}
        #: Uniqueids seen since a resync began (None: no resync running),
        #: and those of the channels not answered when it began.
        self._resync_seen: Optional[Set[str]] = None
        self._resync_unanswered: Set[str] = set()

    # -- the channel an event is about -----------------------------------------

    def _snapshot(self, out: Outbox, msg: AmiMessage, prefix: str) -> Optional[Channel]:
        """The channel an event is about, updated from the event's snapshot
        fields (every channel event carries state, caller ID and position).

        Runs for almost every event (bench: the engine's hottest spot), so
        the prefixed keys are built once and an unchanged value costs one
        compare."""
        keys = _SNAPSHOT_KEYS.get(prefix)
        if keys is None:
            keys = _SNAPSHOT_KEYS[prefix] = tuple(prefix + key for key in _SNAPSHOT_FIELDS)
        get = msg.get
        uniqueid = get(keys[0])
        if not uniqueid:
            return None
        if self._resync_seen is not None:
            self._resync_seen.add(uniqueid)
        chan = self.table.channels.get(uniqueid)
        if chan is None:
            name = get(keys[1])
            if not name or self.table.hung_up_lately(uniqueid):
                return None
            # A channel that existed before we connected, or whose
            # Newchannel was lost: adopt it, dated by its Uniqueid.
            chan = Channel(uniqueid, name, uniqueid_epoch(uniqueid) or out.now)
            self.table.add(chan)
        state = get(keys[2])
        if state is not None and state != chan.state:
            chan.state = state
            if state == "Up" and chan.answered_at is None:
                chan.answered_at = out.now
        num = get(keys[3])
        if num is not None:
            raw = (num, get(keys[4]))
            if raw != chan.caller_raw:
                chan.caller_raw = raw
                chan.caller = Party.of(*raw)
        num = get(keys[5])
        if num is not None:
            raw = (num, get(keys[6]))
            if raw != chan.connected_raw:
                chan.connected_raw = raw
                chan.connected = Party.of(*raw)
        linkedid = get(keys[7])
        if linkedid:
            chan.linkedid = linkedid
            restarted = self.follow_ons.restarted
            if restarted and chan.new_call is None:
                chan.new_call = restarted.get(linkedid)
        exten = get(keys[8])
        if exten:
            context = get(keys[9]) or chan.context
            if exten != chan.exten or context != chan.context:
                chan.exten = exten
                chan.context = context
                self._visit_exten(out, chan)
        if chan.first_exten is None:
            chan.first_exten = chan.exten  # where it was created: what a caller dialed
        return chan

    def _visit_exten(self, out: Outbox, chan: Channel) -> None:
        """A channel runs dialplan at an extension: if that is a user's
        number, the call is for that user, wherever it rings next."""
        if chan.local_half == "1":
            return  # a ;1 half only mirrors its caller's position
        users = self.directory.extension_users(chan.exten, chan.context)
        if not users:
            return
        root = chan.root()
        if root.originated and root.is_local and root.callback is None:
            # Click-to-dial through a Local channel (Originate Local/100@...,
            # FreePBX UCP, CRMs): this first leg rings the clicking user.
            return
        callers = self._users_of(root)
        for user in users:
            if user in callers:
                continue  # the user's own phone dialing through their own number
            uc = self.book.user_call(root.call_id, user, CALL_IN, Party(chan.exten, ""),
                                     root.caller, self._dialed_number(root, ""), out.now)
            if uc.anchor is None and uc.answered_at is None:
                self.book.anchor(uc, chan)

    # -- who is who ------------------------------------------------------------

    def _users_of(self, chan: Channel) -> Tuple[str, ...]:
        return () if chan.is_local else self.directory.device_users(chan.device)

    def _dialed_number(self, caller: Channel, dialstring: str) -> str:
        for candidate in (caller.first_exten, caller.exten):
            if candidate and candidate not in _SPECIAL_EXTENS:
                return candidate
        return self._dialstring_number(dialstring)

    @staticmethod
    def _dialstring_number(dialstring: str) -> str:
        # Dial(PJSIP/+1555@trunk) -> "+1555@trunk"; Local -> "101@ctx/n".
        number = dialstring.partition("@")[0].rpartition("/")[2]
        return number[4:] if number.startswith("sip:") else number

    def _remote_party(self, chan: Channel, me: Party) -> Party:
        """The party on a channel, as the user sees it.  An outbound trunk
        channel may carry our own caller's name (Originate's CallerID,
        o_click_to_dial.ami): a name equal to the user's own is dropped."""
        name = chan.caller.name
        if not self._users_of(chan) and name == me.name:
            name = ""
        return Party(chan.caller.num, name)

    # -- telling the user ------------------------------------------------------

    def _announce(self, out: Outbox, uc: UserCall, kind: str, when: Optional[float] = None,
                  **extra: object) -> None:
        """Tell ``kind`` (incoming, outgoing) unless the user knows of the
        call; it begins now (not when routing began: an IVR may come first),
        or ``when`` it began for a call found while the link was down."""
        if not uc.told:
            uc.started = out.now if when is None else when
            self._tell(out, uc, kind, when, dialed=uc.dialed, **extra)

    def _tell(self, out: Outbox, uc: UserCall, move: object, when: Optional[float] = None,
              **extra: object) -> Dict[str, object]:
        """Tell the user ``move`` (a Kind, or a Move with a kind) about their
        call, which moves it on (CALL_PHASES; IllegalTransition if it may
        not).  Its ``time`` is now, or ``when`` it happened, if earlier."""
        uc.move(move)
        kind: str = move if move.__class__ is str else move[0]  # type: ignore[index,assignment]
        frm, to = uc.parties
        fields = self._fields(kind, uc.call_id, out.now if when is None else when, uc.role,
                              uc.device, frm, to, **extra)
        out.notes.append(Notification(uc.user, kind, fields))
        return fields

    def _fields(self, event: str, call_id: str, when: float, role: str, device: str,
                frm: Party, to: Party, **extra: object) -> Dict[str, object]:
        """What every event carries, in this order, then its own fields."""
        fields: Dict[str, object] = {
            "event": event, "call": call_id, "time": iso_time(when), "role": role,
            "device": device, "from": frm.as_dict(), "to": to.as_dict(),
        }
        if self.pbx:
            fields["pbx"] = self.pbx
        for key, value in extra.items():  # dialed, queue, room ...: PBX text too
            fields[key] = value[:MAX_FIELD_CHARS] if value.__class__ is str else value
        return fields

    def _end(self, out: Outbox, uc: UserCall, reason: Optional[str] = None) -> None:
        if not self.book.close(uc):
            return  # already ended
        if uc.phase is Phase.ROUTED:
            uc.move(Move.FORGET)  # it went elsewhere before it rang: no call of the user's
            return
        if uc.phase is Phase.TRIED:
            # It never rang, but the dialplan tried: still the user's call, and it failed.
            self._announce(out, uc, Kind.INCOMING)
            uc.outcome = uc.outcome or Reason.FAILED
        ending = uc.ending(out.now, reason)
        if ending["reason"] == Reason.BUSY and uc.direction == CALL_OUT:
            self._tell(out, uc, Kind.BUSY)
        fields = self._tell(out, uc, Kind.HANGUP, **ending)
        record = uc.record(fields["time"], ending)
        if self.pbx:
            record["pbx"] = self.pbx
        out.notes[-1].record = record

    def _forget(self, uc: UserCall) -> None:
        """Close, without a word, a call routed to the user's number that went
        elsewhere before anything was told."""
        self.book.close(uc)
        uc.move(Move.FORGET)


class _Dialing(_EngineCore):
    """Channels appear, run dialplan, dial and ring: the users whose phones
    or numbers they reach are told ``incoming`` (the caller ``outgoing``),
    with the diverts on the way."""

    # -- handlers: channels, dialplan, bridges ---------------------------------

    def on_newchannel(self, msg: AmiMessage, out: Outbox) -> None:
        uniqueid = msg.get("Uniqueid")
        name = msg.get("Channel")
        if not uniqueid or not name:
            return
        if uniqueid not in self.table.channels:  # else a repeated Newchannel: an update
            chan = Channel(uniqueid, name, out.now)
            self.table.add(chan)
            peer = chan.local_peer
            if peer is not None:  # a Local pair just requested: its DialBegin is due
                one, two = (chan, peer) if chan.local_half == "1" else (peer, chan)
                if one.dialer is None and not one.originated and one.answered_at is None:
                    self.order.expect_dial(one, two)
        self._snapshot(out, msg, "")

    def on_snapshot(self, msg: AmiMessage, out: Outbox) -> None:
        self._snapshot(out, msg, "")

    def on_newexten(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is None:
            return
        chan.app = msg.get("Application", chan.app)
        chan.appdata = msg.get("AppData", chan.appdata)
        app = chan.app.lower()
        if app in _PICKUP_APPS:
            chan.picks = PickupMethod.DIRECTED if chan.appdata else PickupMethod.GROUP
        if app not in ("dial", "voicemail"):
            return
        for uc in chan.user_calls:
            if uc.anchor is chan and uc.direction == CALL_IN and not uc.told:
                if uc.phase is Phase.ROUTED:
                    uc.move(Move.TRY)
                if app == "voicemail":
                    # Straight to voicemail: the user's phone could not be
                    # reached (unavailable, DND); still a call for them.
                    root = chan.root()
                    self._announce_incoming(out, uc, root.caller, self._dialed_number(root, ""),
                                            chan)
                    uc.outcome = Reason.FAILED
        if app == "voicemail":
            self._to_voicemail(out, chan)

    def _to_voicemail(self, out: Outbox, chan: Channel) -> None:
        """The caller reached voicemail: for the users whose number it was,
        and whose phones no longer ring, the call ends now, missed (not when
        the message is done: CALLS must not show it ringing meanwhile)."""
        mailbox = chan.appdata.partition(",")[0][:MAX_FIELD_CHARS]
        for uc in list(chan.user_calls):
            if uc.anchor is chan and uc.direction == CALL_IN and uc.told \
                    and uc.answered_at is None and not uc.channels:
                uc.path.append({"voicemail": mailbox})
                uc.outcome = uc.outcome or Reason.NOANSWER
                self.book.release_anchor(uc)
                self._end(out, uc)

    def on_localbridge(self, msg: AmiMessage, out: Outbox) -> None:
        one = self._snapshot(out, msg, "LocalOne")
        two = self._snapshot(out, msg, "LocalTwo")
        if one is not None and two is not None:
            one.local_peer, two.local_peer = two, one

    def on_bridgeenter(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        bridge_id = msg.get("BridgeUniqueid")
        if chan is None or not bridge_id:
            return
        self.table.enter_bridge(chan, bridge_id)
        swapped = self.table.channels.get(msg.get("SwapUniqueid") or "")
        if swapped is not None:
            self.book.swap(swapped, chan)

    def on_bridgeleave(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is not None:
            self.table.leave_bridge(chan)

    # -- handlers: dialing -----------------------------------------------------

    def on_dialbegin(self, msg: AmiMessage, out: Outbox) -> None:
        src = self._snapshot(out, msg, "")
        dest = self._snapshot(out, msg, "Dest")
        if dest is not None:
            self._dial_begin(out, src, dest, msg.get("DialString", ""))

    def on_dialstate(self, msg: AmiMessage, out: Outbox) -> None:
        src = self._snapshot(out, msg, "")
        dest = self._snapshot(out, msg, "Dest")
        if dest is not None and msg.get("DialStatus") == "FORWARD":
            self._forwarded(out, src, dest, msg.get("Forward", ""))

    # -- a dial begins: who rings, who calls -----------------------------------

    def _dial_begin(self, out: Outbox, src: Optional[Channel], dest: Channel,
                    dialstring: str) -> None:
        """``src`` dials ``dest``: the caller's outgoing call, and the
        incoming calls of the users it rings (at their phones or numbers)."""
        dest.dialer = src
        if src is None:
            # Originate (click-to-dial): the phone rings for a call its own
            # user asked for; the outgoing call starts when it dials out.
            dest.originated = True
            return
        src.dial_targets.add(dest)
        root = src.root()
        if root.originated and root.is_local and root.callback is None and \
                self._click_to_dial_leg(out, src, dest, root):
            return
        dialed = self._dialed_number(root, dialstring)
        caller_chan = root.callback if root.callback is not None else root
        if root.callback is not None:
            # The number the click-to-dial user asked for, not the
            # originate's internal routing extension.
            dialed = (dest.caller.num if not dest.is_local else local_exten(dest.device)) \
                or dialed
        if (caller_chan is root.callback or caller_chan.dialer is None) \
                and not caller_chan.is_local and caller_chan.transferred_by is None:
            self._announce_caller(out, caller_chan, dest, dialed)
        caller = caller_chan.caller
        if not dest.is_local and dest.connected:
            caller = dest.connected  # what the ringing phone displays
        self._ring(out, src, dest, root.call_id, caller, dialed, dialstring)

    def _click_to_dial_leg(self, out: Outbox, src: Channel, dest: Channel,
                           root: Channel) -> bool:
        """Still the first leg of a click-to-dial through Local channels
        (Originate Local/..., FreePBX UCP, cacofonisk ctd_*): numbers it runs
        on its way to the user's phone are no calls to anyone, and the first
        phone it rings is the user who asked for the call (True: that is
        all this dial is)."""
        on_the_way = list(src.lineage())
        if dest.is_local and dest.local_peer is not None:
            on_the_way.append(dest.local_peer)
        self._drop_unannounced(out, on_the_way)
        if not self._users_of(dest):
            return False
        root.callback = dest
        dest.originated = True
        return True

    def _announce_caller(self, out: Outbox, caller_chan: Channel, dest: Channel,
                         dialed: str) -> None:
        """The calling phone is a user's: their outgoing call."""
        peer = self._remote_party(dest, caller_chan.caller) if not dest.is_local \
            else Party(dialed, "")
        for user in self._users_of(caller_chan):
            uc = self.book.user_call(caller_chan.call_id, user, CALL_OUT, caller_chan.caller,
                                     peer, dialed, out.now)
            if not uc.device:
                uc.device = caller_chan.device
            self.book.attach(uc, caller_chan)
            self._announce(out, uc, Kind.OUTGOING)

    def _ring(self, out: Outbox, src: Channel, dest: Channel, call_id: str, caller: Party,
              dialed: str, dialstring: str) -> None:
        """``dest`` rings: calls that reached a user's number ring somewhere
        now, and the users whose phone ``dest`` is hear of the call."""
        dest_users = () if dest.is_local else self._users_of(dest)
        # Elsewhere than at that user's phones (announced below) is a
        # divert, told first so that the phone rung next learns where the
        # call came from (a forward on no answer straight to another phone).
        for chan in src.lineage():
            for uc in list(chan.user_calls):
                if uc.direction == CALL_IN and uc.anchor is chan and uc.user not in dest_users:
                    self._announce_incoming(out, uc, caller, dialed, chan)
                    if chan is src:  # deeper Local hops are routing, not diverts
                        self._divert_if_elsewhere(out, uc, chan, dest, dialstring)
        for user in dest_users:
            uc = self.book.user_call(call_id, user, CALL_IN, dest.caller, caller, dialed, out.now)
            if not uc.told:
                uc.device = dest.device
                uc.me = dest.caller
            self.book.attach(uc, dest)
            self._announce_incoming(out, uc, caller, dialed, dest)

    def _caller_call(self, out: Outbox, chan: Channel) -> List[UserCall]:
        """The outgoing user calls of a user's own phone that is calling:
        created and announced on first need (a dial, a conference, a queue)."""
        if chan.is_local or chan.dialer is not None:
            return []
        calls = [uc for uc in chan.user_calls if uc.direction == CALL_OUT]
        if calls or (chan.originated and chan.answered_at is None):
            return calls
        for user in self._users_of(chan):
            dialed = self._dialed_number(chan, "")
            uc = self.book.user_call(chan.call_id, user, CALL_OUT, chan.caller,
                                     Party(dialed, ""), dialed, out.now)
            uc.device = uc.device or chan.device
            self.book.attach(uc, chan)
            # Told only now (at a conference join, or at the hangup of a call
            # to voicemail): it began when the channel did, and may have
            # been answered (by the application) before it could be told.
            self._announce(out, uc, Kind.OUTGOING, chan.created)
            if chan.answered_at is not None and uc.can(Move.APP_ANSWERED):
                uc.move(Move.APP_ANSWERED)
                uc.answered_at = chan.answered_at
            calls.append(uc)
        return calls

    def _drop_unannounced(self, out: Outbox, chans: List[Channel]) -> None:
        """Forget, without a word, the calls to users' numbers anchored on
        these channels that have not been told yet."""
        for chan in chans:
            for uc in list(chan.user_calls):
                if uc.direction == CALL_IN and uc.anchor is chan and not uc.told:
                    self.book.release_anchor(uc)
                    self._forget(uc)

    def _announce_incoming(self, out: Outbox, uc: UserCall, caller: Party, dialed: str,
                           rung: Channel, when: Optional[float] = None) -> None:
        """The caller is known best when the call rings, not when it was
        routed: a Local channel learns its caller only once dialed."""
        if uc.told:
            return
        uc.peer = caller
        uc.dialed = dialed
        extra: Dict[str, object] = {}
        for chan in rung.lineage():
            if chan.queue:
                uc.queue = chan.queue
                uc.queue_caller = chan
                extra["queue"] = chan.queue
                break
        self._announce(out, uc, Kind.INCOMING, when, **extra)
        # Told after the incoming: where it came from before it was diverted
        # or transferred to this user.
        for chan in rung.lineage():
            if chan.transferred_by is not None:
                by, kind = chan.transferred_by
                uc.path.append({"transfer": kind, "by": by.num})
                self._tell(out, uc, Kind.TRANSFER, kind=kind, direction=Direction.FROM,
                           by=by.as_dict(), target=uc.me.as_dict())
                break
            original = chan.diverted_from
            if original is not None and original.num != uc.me.num and \
                    uc.user not in self.directory.extension_users(original.num):
                uc.path.append({"diverted_from": original.num})
                self._tell(out, uc, Kind.DIVERT, direction=Direction.FROM,
                           original=original.as_dict(), target=uc.me.as_dict(), external=False)
                break

    # -- diverts and forwards --------------------------------------------------

    def _divert_if_elsewhere(self, out: Outbox, uc: UserCall, anchor: Channel, dest: Channel,
                             dialstring: str) -> None:
        """The channel running a user's number dials something that is not
        one of that user's phones: the user's call is diverted there."""
        if uc.user in self._users_of(dest) or uc.answered_at is not None:
            return
        if dest.is_local:
            number = local_exten(dest.device)
            if uc.user in self.directory.extension_users(number):
                return  # the user's own number, through a Local channel
            target = Party(number, "")
            inside = bool(self.directory.extension_users(number))
        else:
            target = Party(dest.caller.num or self._dialstring_number(dialstring),
                           dest.caller.name if self._users_of(dest) else "")
            inside = bool(self._users_of(dest))
        self._divert(out, uc, anchor, target, inside)

    def _divert(self, out: Outbox, uc: UserCall, carrier: Channel, target: Party,
                inside: bool) -> None:
        if target.num in uc.diverted_to:
            return
        uc.diverted_to.append(target.num)
        original = Party(uc.me.num or uc.dialed, uc.me.name)
        carrier.diverted_from = original
        uc.path.append({"divert": target.num})
        if uc.phase is not Phase.RINGING:
            # Not rung yet (nothing is news before the incoming), or answered
            # elsewhere or handed on already: not the user's to follow.
            return
        self._tell(out, uc, Kind.DIVERT, direction=Direction.TO, original=original.as_dict(),
                   target=target.as_dict(), external=not inside)

    def _forwarded(self, out: Outbox, src: Optional[Channel], dest: Channel,
                   number: str) -> None:
        """The rung phone forwarded the call (SIP 302): its user follows the
        call to the new number, as with a dialplan forward."""
        if src is None:
            return
        target = Party(number, "")
        inside = bool(self.directory.extension_users(number))
        for uc in list(dest.user_calls):
            if uc.direction == CALL_IN and uc.answered_at is None:
                if uc.anchor is None:
                    self.book.anchor(uc, src)
                self._divert(out, uc, src, target, inside)
                src.diverted_from = uc.me


class _Answering(_Dialing):
    """A dial ends: answered (``pickup``, for the user or elsewhere) or not
    (``timeout``, ``busy``: the verdict, told once)."""

    def on_dialend(self, msg: AmiMessage, out: Outbox) -> None:
        src = self._snapshot(out, msg, "")
        dest = self._snapshot(out, msg, "Dest")
        if dest is None:
            return
        status = msg.get("DialStatus", "")
        if status == "FORWARD" or msg.get("Forward"):
            # SIP 302 or a phone's own call forward (app_dial.c): the call
            # goes on to another number, dialed next by the same caller.
            self._forwarded(out, src, dest, msg.get("Forward", ""))
            if src is not None:
                src.dial_targets.discard(dest)
            return
        self._dial_end(out, src, dest, status)

    def _dial_end(self, out: Outbox, src: Optional[Channel], dest: Channel, status: str) -> None:
        picker = False
        if src is not None:
            if dest.dialer is src and dest not in src.dial_targets:
                # Handed on by a blonde transfer (or a repeated DialEnd): the
                # transferer's dial "ends" NOANSWER while the target rings on
                # for the transferee (xfer_blonde_group_a).  Nothing to learn.
                return
            # Answered by a channel it never dialed while its own still
            # ring: a phone that picked the call up (Asterisk 12+ swaps the
            # picker in for the ringing one).  The Pickup event that says so
            # may come only after this DialEnd (seen live on Asterisk 22,
            # tests/traces/live/l_directed_pickup.live.ami): the method is
            # known already, from what the picker dialed.
            picker = dest.dialer is None and not dest.is_local and \
                bool(src.dial_targets - {dest})
            src.dial_targets.discard(dest)
        if status == "ANSWER":
            self._answered(out, src, dest, self._pickup_method(dest) if picker else "")
            return
        outcome = _DIAL_OUTCOMES.get(status)
        if outcome is None:
            return
        # What rang through ``dest`` shares its verdict: a ring group of
        # Local channels that times out as a whole is a timeout at every
        # phone, though each is then hung up with CANCEL (app_dial.c).
        ending = dest.rung_through()
        for chan in ending:
            for uc in chan.user_calls:
                if uc.direction == CALL_IN:
                    self._leg_outcome(out, uc, outcome, ending)
        # Up the chain, as long as no other branch of a dial still rings:
        # a forward that was not answered, the caller's own outgoing call.
        came_from = dest
        for chan in src.lineage() if src is not None else ():
            if any(target is not came_from for target in chan.dial_targets):
                break
            for uc in chan.user_calls:
                self._set_outcome(out, uc, outcome)
            came_from = chan

    @staticmethod
    def _pickup_method(picker: Channel) -> str:
        """Directed when the picker's dialplan named the phone (Pickup(100),
        PickupChan, a ``**100`` code), else group (``*8``, Pickup())."""
        if picker.picks:
            return picker.picks
        directed = any(exten.startswith("**") for exten in (picker.exten, picker.first_exten or ""))
        return PickupMethod.DIRECTED if directed else PickupMethod.GROUP

    def _leg_outcome(self, out: Outbox, uc: UserCall, outcome: str, ending: List[Channel]) -> None:
        """One ringing leg of the user's call ended without an answer.  While
        another of the user's phones still rings (a second device, another
        contact of the same endpoint) that is no verdict yet: the last leg
        gives it, unless it only failed (unreachable) and an earlier leg
        said more (busy, declined)."""
        if any(chan not in ending and chan.dialer is not None
               and chan in chan.dialer.dial_targets for chan in uc.channels):
            uc.leg_outcome = uc.leg_outcome or outcome
            return
        if outcome == Reason.FAILED and uc.leg_outcome is not None:
            outcome = uc.leg_outcome
        self._set_outcome(out, uc, outcome)

    def _set_outcome(self, out: Outbox, uc: UserCall, outcome: str) -> None:
        if uc.phase not in (Phase.ROUTED, Phase.TRIED, Phase.RINGING):
            return  # answered (here or elsewhere) or handed on: no verdict to give
        if uc.direction == CALL_OUT:
            # The caller's dialplan may go on (a hunt list, a forward): the
            # last attempt's verdict counts, and is told with the hangup.
            uc.outcome = outcome
            return
        if uc.outcome is not None:
            return  # the first verdict stands
        uc.outcome = outcome
        if not uc.told:
            return  # not rung yet: told with the incoming's end, if it is tried
        if outcome == Reason.NOANSWER:
            self._tell(out, uc, Kind.TIMEOUT)
        elif outcome == Reason.BUSY:
            self._tell(out, uc, Kind.BUSY)

    def _answered(self, out: Outbox, src: Optional[Channel], answerer: Channel,
                  method: str = "") -> None:
        if answerer.is_local:
            return  # the endpoint behind the Local channel reports the answer
        call_ids = {answerer.call_id, answerer.root().call_id}
        if src is not None:
            call_ids.add(src.root().call_id)
        if not any(self.book.has_call(call_id) for call_id in call_ids):
            return  # a call no user is part of (most calls, on a big PBX)
        lineage = set(answerer.lineage())
        root = answerer.root()
        if root.callback is not None:
            lineage.add(root.callback)  # click-to-dial: the user who asked for it
        forwarder = self._forwarder_of(answerer) if not self._users_of(answerer) else None
        caller = root.callback if root.callback is not None else root
        answered_by = self._remote_party(answerer, caller.caller)
        extra: Dict[str, object] = {"answered_by": dict(answered_by.as_dict(),
                                                        device=answerer.device)}
        if method:
            extra["method"] = method
        for call_id in call_ids:
            for uc in self.book.of_call(call_id):
                if not uc.told:
                    continue  # routed to the user's number, not rung yet: no news
                if uc.answered_at is not None:
                    if answerer not in uc.channels and \
                            any(chan in lineage for chan in uc.channels):
                        # Talking already, now to someone new: the party a
                        # blind transfer sent this user's call to.
                        uc.peer = self._remote_party(answerer, uc.me)
                    continue
                if uc.phase is not Phase.RINGING:
                    continue  # answered elsewhere already, or handed on by the user
                if uc.direction == CALL_OUT:
                    if not any(chan in lineage for chan in uc.channels):
                        continue
                    remote = self._remote_party(answerer, uc.me)
                    uc.peer = Party(remote.num or uc.peer.num, remote.name or uc.peer.name)
                    self._answer(out, uc, answerer, extra)
                elif answerer in uc.channels or uc is forwarder:
                    # Answered on the user's phone, or on the outside number
                    # the user's calls are forwarded to (a mobile).
                    if answerer in uc.channels:
                        self.book.release_anchor(uc)
                        uc.device = answerer.device  # of several phones, this one
                    self._answer(out, uc, answerer, extra)
                elif uc.channels or uc.anchor is not None or uc.queue_caller is not None:
                    self._answered_elsewhere(out, uc, answered_by, extra)

    def _forwarder_of(self, answerer: Channel) -> Optional[UserCall]:
        """An outside number answering belongs to the nearest forward above
        it: with 100 -> 101 -> 101's mobile, the mobile is 101's, not 100's."""
        for chan in answerer.lineage():
            for uc in chan.user_calls:
                if uc.anchor is chan and uc.direction == CALL_IN:
                    return uc
        return None

    def _answered_elsewhere(self, out: Outbox, uc: UserCall, answered_by: Party,
                            extra: Dict[str, object]) -> None:
        """Someone else's call now, even after it timed out or was busy here
        (a forward on no answer): it lasts for this user only as long as the
        user's own phone still rings down."""
        uc.answered_by = answered_by
        self._tell(out, uc, Move.PICKUP_ELSEWHERE, **extra)
        self.book.release_anchor(uc)
        if not uc.channels:
            self._end(out, uc)

    def _answer(self, out: Outbox, uc: UserCall, answerer: Channel,
                extra: Dict[str, object]) -> None:
        uc.answered_at = out.now
        uc.answered_by = self._remote_party(answerer, uc.me)
        self._tell(out, uc, Kind.PICKUP, **extra)


class _Moving(_Answering):
    """Calls that move: transfers (blind, attended, blonde), pickup by
    another phone, parking and retrieving."""

    # -- transfers -------------------------------------------------------------

    def on_blindtransfer(self, msg: AmiMessage, out: Outbox) -> None:
        if msg.get("Result") != "Success":
            return
        transferer = self._snapshot(out, msg, "Transferer")
        transferee = self._snapshot(out, msg, "Transferee")
        if transferer is None:
            return
        target = Party(msg.get("Extension", ""), "")
        by = transferer.caller
        told = list(transferer.user_calls)
        self._tell_transferer(out, told, TransferKind.BLIND, by, target)
        if transferee is not None:
            # The transferee goes on in the dialplan on its own: whatever it
            # dials next is a call transferred by ``by``, not by its dialer.
            transferee.transferred_by = (by, TransferKind.BLIND)
            transferee.dialer = None
            self._tell_transferees(out, self._phones_of(transferee, [transferer]), told,
                                   TransferKind.BLIND, by, target)

    def _tell_transferer(self, out: Outbox, calls: List[UserCall], kind: str, by: Party,
                         target: Party) -> None:
        """The user who transferred: their call ends with reason=transferred."""
        for uc in calls:
            if not uc.can(Move.TRANSFER_AWAY):
                continue  # not rung yet, or no longer the user's to hand on
            uc.path.append({"transfer": kind, "to": target.num})
            self._tell(out, uc, Move.TRANSFER_AWAY, kind=kind, direction=Direction.TO,
                       by=by.as_dict(), target=target.as_dict())

    def _tell_transferees(self, out: Outbox, parties: List[Channel], told: List[UserCall],
                          kind: str, by: Party, target: Party) -> None:
        """The party transferred, when it is a user's phone: told by whom
        and to whom (a colleague's call handed on), once per user call."""
        for chan in parties:
            for uc in list(chan.user_calls):
                if uc in told:
                    continue
                told.append(uc)
                if not uc.told:
                    continue  # routed to the user's number, not rung yet: no news
                uc.path.append({"transfer": kind, "by": by.num, "to": target.num})
                self._tell(out, uc, Kind.TRANSFER, kind=kind, direction=Direction.MOVED,
                           by=by.as_dict(), target=target.as_dict())

    def on_attendedtransfer(self, msg: AmiMessage, out: Outbox) -> None:
        """The transferer joins two calls: the transferee (on hold) and the
        target (consulted, or still ringing: "blonde").  Asterisk 13 names
        only the transferer channels (cacofonisk xfer_attended_*), so the
        other parties are found from bridges and dial lineage."""
        if msg.get("Result") != "Success":
            return
        first = self._snapshot(out, msg, "OrigTransferer")
        second = self._snapshot(out, msg, "SecondTransferer")
        if first is None:
            return
        transferers = [c for c in (first, second) if c is not None]
        targets, transferees = self._transferred(out, msg, first, second, transferers)
        kind = TransferKind.ATTENDED if targets and all(t.state == "Up" for t in targets) \
            else TransferKind.BLONDE
        consult = [uc for uc in (second.user_calls if second is not None else ())
                   if uc not in first.user_calls]
        if len(targets) == 1 and targets[0].caller:
            target_party = self._remote_party(targets[0], first.caller)
        elif consult:
            target_party = consult[0].peer
        else:
            target_party = Party(second.exten if second is not None else "", "")
        by = first.caller
        customer = transferees[0].caller if transferees else NOBODY
        if second is not None:
            second.dial_targets.clear()  # still ringing: the transferee's now
        told = list(first.user_calls) + consult
        self._tell_transferer(out, list(told), kind, by, target_party)
        for chan in targets:
            for uc in list(chan.user_calls):
                if uc in told:
                    continue
                told.append(uc)
                if not uc.told:
                    continue  # routed to the target's number, not rung yet: no news
                uc.peer = customer  # their screen shows the customer now
                uc.path.append({"transfer": kind, "by": by.num})
                self._tell(out, uc, Kind.TRANSFER, kind=kind, direction=Direction.FROM,
                           by=by.as_dict(), target=uc.me.as_dict())
        if targets:
            for chan in transferees:
                for uc in chan.user_calls:
                    if uc not in told:
                        uc.peer = self._remote_party(targets[0], uc.me)
        self._tell_transferees(out, transferees, told, kind, by, target_party)

    def _transferred(self, out: Outbox, msg: AmiMessage, first: Channel,
                     second: Optional[Channel],
                     transferers: List[Channel]) -> Tuple[List[Channel], List[Channel]]:
        """The phones an attended transfer joins: (targets, transferees).
        Named by the event when it says; else found from the bridges and
        the dial lineage, which say the same."""
        target = self._snapshot(out, msg, "TransferTarget")
        transferee = self._snapshot(out, msg, "Transferee")
        if target is None and transferee is not None and msg.get("DestType") == "Bridge":
            # Asterisk 20 leaves out the whole TransferTarget block in about
            # one attended transfer of three (k2_attended_transfer_no_target
            # .ami): the target is who the transfer put into the destination
            # bridge beside the transferee.
            joined = [c for c in self.table.bridges.get(msg.get("DestBridgeUniqueid", ""), ())
                      if c is not transferee and c not in transferers]
            targets = [p for c in joined for p in self._phones_of(c, transferers)]
        elif target is not None:
            targets = self._phones_of(target, transferers)
        else:
            targets = self._phones_around(second, transferers) if second is not None else []
        transferees = self._phones_of(transferee, transferers) if transferee is not None \
            else self._phones_around(first, transferers)
        return targets, [t for t in transferees if t not in targets]

    def _phones_of(self, chan: Channel, exclude: List[Channel]) -> List[Channel]:
        """The phones or trunks a channel named by a transfer stands for:
        itself, or for a Local channel the real ones on the far side of its
        pair (k_attended_transfer: the target is ``Local/101@from-internal;1``,
        the phone is PJSIP/101); failing those, the phones in its call."""
        if not chan.is_local:
            return [chan] if chan not in exclude else []
        return [c for c in self.table.far_side(chan) if not c.is_local and c not in exclude] \
            or self._phones_around(chan, exclude)

    def _phones_around(self, chan: Channel, exclude: List[Channel]) -> List[Channel]:
        """The phones and trunks in ``chan``'s call (not Local channels)."""
        return [c for c in self.table.parties(chan, exclude) if not c.is_local]

    # -- pickup and parking ----------------------------------------------------

    def on_pickup(self, msg: AmiMessage, out: Outbox) -> None:
        """Another phone took a ringing call (features pickupexten, the
        Pickup or PickupChan application)."""
        picker = self._snapshot(out, msg, "")
        target = self._snapshot(out, msg, "Target")
        if picker is None or target is None:
            return
        method = self._pickup_method(picker)
        root = target.root() if target.dialer is not None else target
        caller = target.connected or root.caller
        dialed = self._dialed_number(root, "")
        for user in self._users_of(picker):
            uc = self.book.user_call(root.call_id, user, CALL_IN, picker.caller, caller, dialed,
                                     out.now)
            uc.device = uc.device or picker.device
            self.book.attach(uc, picker)
            for own in [u for u in picker.user_calls if u.direction == CALL_OUT]:
                self._end(out, own)  # the pickup code was no call of its own
            self._announce_incoming(out, uc, caller, dialed, target)
        picker.dialer = target.dialer
        self._answered(out, target.dialer, picker, method)

    def on_parkedcall(self, msg: AmiMessage, out: Outbox) -> None:
        parkee = self._snapshot(out, msg, "Parkee")
        if parkee is None:
            return
        space, lot = msg.get("ParkingSpace", ""), msg.get("Parkinglot", "")
        parker_device = device_of_interface(msg.get("ParkerDialString", ""))
        parker = self._snapshot(out, msg, "Parker")
        by = parker.caller if parker is not None else NOBODY
        parkers = set(self._users_of(parker)) if parker is not None else set()
        parkers.update(self.directory.device_users(parker_device))
        ucs = [uc for chan in [parkee] + self.table.parties(parkee) for uc in chan.user_calls
               if uc.user in parkers]
        if not by:
            by = next((uc.me for uc in ucs), NOBODY)
        parkee.parked = (space, lot, by)
        for uc in ucs:
            if not uc.told:
                continue  # routed to the parker's number, not rung: no news
            uc.path.append({"park": space})
            self._tell(out, uc, Kind.PARK, space=space, lot=lot, by=by.as_dict(),
                       timeout=msg.get("ParkingTimeout", ""))

    def on_unparkedcall(self, msg: AmiMessage, out: Outbox) -> None:
        parkee = self._snapshot(out, msg, "Parkee")
        retriever = self._snapshot(out, msg, "Retriever")
        if parkee is None or retriever is None:
            return
        space, lot, by = parkee.parked or (msg.get("ParkingSpace", ""),
                                           msg.get("Parkinglot", ""), NOBODY)
        parkee.parked = None
        # A click-to-dial's trunk leg carries the parker's own name: dropped.
        caller = self._remote_party(parkee, by)
        for user in self._users_of(retriever):
            uc = self.book.user_call(parkee.call_id, user, CALL_IN, retriever.caller, caller,
                                     retriever.exten, out.now)
            uc.device = uc.device or retriever.device
            self.book.attach(uc, retriever)
            self._announce_incoming(out, uc, caller, retriever.exten, retriever)
            uc.answered_at = out.now
            uc.answered_by = retriever.caller
            uc.path.append({"unpark": space})
            self._tell(out, uc, Move.RETRIEVED, space=space, lot=lot,
                       result=ParkResult.RETRIEVED, parked_by=by.as_dict(),
                       retrieved_by=retriever.caller.as_dict())

    def on_parkedcalltimeout(self, msg: AmiMessage, out: Outbox) -> None:
        """Nobody retrieved the parked call in time: it comes back to the
        parker (comebacktoorigin: Asterisk dials the parker's phone from
        context park-dial, on the same Linkedid; x_park_timeout_return.ami).
        The parker's own call ended when their phone left it, so for them
        this is a new call, with its own id: incoming, unpark result=timeout,
        then whatever the ringing brings (pickup, timeout) and its hangup.
        It lives as long as the caller waits, or the parker's phone talks."""
        parkee = self._snapshot(out, msg, "Parkee")
        if parkee is None or parkee.parked is None:
            return
        space, lot, by = parkee.parked
        parkee.parked = None
        parkee.new_call = self.follow_ons.new_id(parkee.linkedid)
        device = device_of_interface(msg.get("ParkerDialString", ""))
        caller = self._remote_party(parkee, by)
        for user in self.directory.device_users(device):
            uc = self.book.user_call(parkee.call_id, user, CALL_IN, by, caller,
                                     self._dialed_number(parkee, ""), out.now)
            uc.device = device
            self.book.anchor(uc, parkee)
            self._announce(out, uc, Kind.INCOMING)
            uc.path.append({"unpark": space})
            self._tell(out, uc, Kind.UNPARK, space=space, lot=lot, result=ParkResult.TIMEOUT,
                       parked_by=by.as_dict(), retrieved_by=NOBODY.as_dict())

    def on_parkedcallgiveup(self, msg: AmiMessage, out: Outbox) -> None:
        """The parked caller hung up: the parker's users are told, though
        their call ended when their phone left it (so without a call)."""
        parkee = self._snapshot(out, msg, "Parkee")
        if parkee is None or parkee.parked is None:
            return
        space, lot, by = parkee.parked
        parkee.parked = None
        parker_device = device_of_interface(msg.get("ParkerDialString", ""))
        fields = self._fields(Kind.UNPARK, parkee.call_id, out.now, "callee", parker_device,
                              self._remote_party(parkee, by), by, space=space, lot=lot,
                              result=ParkResult.ABANDONED,
                              parked_by=by.as_dict(), retrieved_by=NOBODY.as_dict())
        for user in self.directory.device_users(parker_device):
            out.notes.append(Notification(user, Kind.UNPARK, dict(fields)))


class _Gathering(_Moving):
    """Where several parties meet: queues (members hear of callers; a call
    a queue may ring again stays open), conference rooms, and hold."""

    # -- queues ----------------------------------------------------------------

    def on_queuemember(self, msg: AmiMessage, out: Outbox) -> None:
        """A member in the QueueStatus list (after every login)."""
        self._learn_members(msg)

    def on_queuememberadded(self, msg: AmiMessage, out: Outbox) -> None:
        self._learn_members(msg)

    def on_queuememberstatus(self, msg: AmiMessage, out: Outbox) -> None:
        """A member's device changed state: still a member, maybe one added
        while the link was down."""
        self._learn_members(msg)

    def on_agentcalled(self, msg: AmiMessage, out: Outbox) -> None:
        """The queue rings a member.  A member learned of only now (no
        QueueStatus, no member event yet, n_queue.ami) still hears of the
        caller before it rings."""
        queue = self._learn_members(msg)
        if not queue:
            return
        caller = self._snapshot(out, msg, "")
        if caller is not None and caller.queue == queue:
            self._tell_queue(out, caller, queue, Action.JOIN, msg)

    def _learn_members(self, msg: AmiMessage) -> str:
        """The users behind a member event's interfaces are members of its
        queue; returns the queue ('' if none is named)."""
        queue = msg.get("Queue")
        if not queue:
            return ""
        users = set(self.directory.interface_users(msg.get("Interface", "")))
        users.update(self.directory.interface_users(msg.get("StateInterface", "")))
        if users:
            self.queue_members.setdefault(queue, set()).update(users)
        return queue

    def on_queuememberremoved(self, msg: AmiMessage, out: Outbox) -> None:
        members = self.queue_members.get(msg.get("Queue", ""))
        if members is not None:
            members.difference_update(self.directory.interface_users(msg.get("Interface", "")))

    def on_queuecallerjoin(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is None:
            return
        queue = msg.get("Queue", "")
        chan.queue = queue
        chan.queue_join = (msg.get("Position", ""), msg.get("Count", ""))
        self._caller_call(out, chan)  # a user calling a queue: an outgoing call
        self._tell_queue(out, chan, queue, Action.JOIN, msg)

    def on_queuecallerabandon(self, msg: AmiMessage, out: Outbox) -> None:
        """The caller hung up while waiting (QueueCallerLeave follows)."""
        chan = self._snapshot(out, msg, "")
        if chan is not None:
            self._leave_queue(out, chan, msg, Action.ABANDON)

    def on_queuecallerleave(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is not None and chan.queue is not None:  # else the abandon was told
            self._leave_queue(out, chan, msg, Action.LEAVE)

    def _leave_queue(self, out: Outbox, chan: Channel, msg: AmiMessage, action: str) -> None:
        chan.queue = None
        self._tell_queue(out, chan, msg.get("Queue", ""), action, msg)
        chan.queue_told = set()
        self._end_queue_held(out, chan)

    def _tell_queue(self, out: Outbox, chan: Channel, queue: str, action: str,
                    msg: AmiMessage) -> None:
        """Queue members hear of callers joining and leaving their queue,
        whether or not their phone rings for them."""
        members = self.queue_members.get(queue)
        if action == Action.JOIN:
            members = members and members - chan.queue_told
            if members:
                chan.queue_told.update(members)
        if not members:
            return
        fields = self._fields(
            Kind.QUEUE, chan.call_id, out.now, "callee", "", chan.caller,
            Party(chan.exten if chan.exten not in _SPECIAL_EXTENS else "", queue),
            action=action, queue=queue, position=msg.get("Position") or chan.queue_join[0],
            count=msg.get("Count") or chan.queue_join[1])
        if action == Action.LEAVE:
            answered = [c for c in self.table.bridged_with(chan) + list(chan.dial_targets)
                        if c.answered_at is not None and self._users_of(c)]
            if chan.connected:
                fields["answered_by"] = chan.connected.as_dict()
            elif answered:
                fields["answered_by"] = answered[0].caller.as_dict()
        for user in sorted(members):
            out.notes.append(Notification(user, Kind.QUEUE, dict(fields)))

    def _hold_for_queue(self, uc: UserCall) -> bool:
        """A queue stopped ringing the user (a member timeout) while its
        caller still waits, and may ring them again (the queue's retry):
        the user's call stays open, one call, until the caller leaves."""
        caller = uc.queue_caller
        if caller is None or caller.queue != uc.queue or \
                self.table.channels.get(caller.uniqueid) is not caller:
            return False
        self.book.hold_for_queue(uc, caller)
        return True

    def _end_queue_held(self, out: Outbox, caller: Channel, reason: Optional[str] = None) -> None:
        """The caller left the queue or hung up: its members' calls that no
        phone rings any more end."""
        for uc in self.book.release_queue_held(caller):
            if not uc.channels and uc.anchor is None:
                self._end(out, uc, reason)

    # -- conferences -----------------------------------------------------------

    def on_confbridgejoin(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        room = msg.get("Conference", "")
        if chan is None or not room:
            return
        self._caller_call(out, chan)
        members = self.conferences.setdefault(room, [])
        if chan not in members:
            members.append(chan)
        self._tell_conference(out, room, chan, Action.JOIN)

    def on_confbridgeleave(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        room = msg.get("Conference", "")
        if chan is not None and room:
            self._leave_conference(out, chan, room)

    def on_confbridgeend(self, msg: AmiMessage, out: Outbox) -> None:
        self.conferences.pop(msg.get("Conference", ""), None)

    def _leave_conference(self, out: Outbox, chan: Channel, room: str) -> None:
        members = self.conferences.get(room)
        if members is None or chan not in members:
            return
        members.remove(chan)
        self._tell_conference(out, room, chan, Action.LEAVE)
        if not members:
            del self.conferences[room]

    def _tell_conference(self, out: Outbox, room: str, who: Channel, action: str) -> None:
        """Everyone of ours in the room hears who joined or left.  The room
        is ConfBridge's own list (its join and leave events, or the resync),
        not ``ChannelTable.parties``: a room joins many calls, and a member
        leaving may have left its bridge first."""
        count = len(self.conferences.get(room, ()))
        listeners = list(self.conferences.get(room, ()))
        if who not in listeners:
            listeners.append(who)
        for chan in listeners:
            for uc in chan.user_calls:
                if uc.told:  # (not a call routed to a user's number, not rung yet)
                    self._tell(out, uc, Kind.CONFERENCE, action=action, room=room,
                               members=count, who=who.caller.as_dict())

    # -- hold ------------------------------------------------------------------

    def on_hold(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is not None and chan.hold_told is None:
            chan.hold_told = self._tell_hold(out, chan, Kind.HOLD, [])

    def on_unhold(self, msg: AmiMessage, out: Outbox) -> None:
        # Only a hold told ends: PJSIP re-INVITEs repeat Unhold (j_blind_transfer.ami).
        chan = self._snapshot(out, msg, "")
        if chan is not None:
            self._end_hold(out, chan)

    def _end_hold(self, out: Outbox, chan: Channel) -> None:
        """Unhold, or the holder hung up (a completed transfer): Asterisk
        sends no Unhold then, but the held party hears music on hold no more
        (k_attended_transfer.ami: MusicOnHoldStop, no Unhold).  Leaving the
        bridge is no end: an attended transfer's consultation does that."""
        told, chan.hold_told = chan.hold_told, None
        if told is not None:
            self._tell_hold(out, chan, Kind.UNHOLD, [uc for uc in told
                                             if self.book.is_open(uc)])

    def _tell_hold(self, out: Outbox, chan: Channel, kind: str,
                   also: List[UserCall]) -> List[UserCall]:
        """Tell ``kind`` by ``chan`` to its call's parties (and ``also``):
        those told of their call (not one routed to a user's number that has
        not rung yet).  Returns whom it told."""
        told = list(also)
        for other in [chan] + self.table.parties(chan):
            for uc in other.user_calls:
                if uc.told and uc not in told:
                    told.append(uc)
        for uc in told:
            self._tell(out, uc, kind, by=chan.caller.as_dict())
        return told


class _Resync(_Gathering):
    """Channels that end, seen (Hangup) or missing from the channel list a
    resync brings after a reconnect, and the calls that list reveals."""

    # -- hangup ----------------------------------------------------------------

    def on_hangup(self, msg: AmiMessage, out: Outbox) -> None:
        chan = self._snapshot(out, msg, "")
        if chan is None:
            return
        try:
            cause = int(msg.get("Cause", "0"))
        except ValueError:
            cause = 0
        self._hangup(out, chan, cause, msg.get("Cause-txt") or Q850_CAUSES.get(cause, ""))

    def _hangup(self, out: Outbox, chan: Channel, cause: int, cause_txt: str,
                reason: Optional[str] = None) -> None:
        self._end_hold(out, chan)
        self.table.remove(chan)
        for room in [r for r, members in self.conferences.items() if chan in members]:
            self._leave_conference(out, chan, room)
        if not chan.user_calls and reason is None:
            # A user's phone that called an application (voicemail, an IVR)
            # or a number that failed before anything rang: an outgoing call
            # too, for the call log.
            self._caller_call(out, chan)
        for uc in self.book.detach(chan):
            if cause:
                uc.cause, uc.cause_txt = cause, cause_txt
            if not uc.channels and uc.anchor is None and \
                    (reason is not None or not self._hold_for_queue(uc)):
                self._end(out, uc, reason)
        chan.dial_targets.clear()
        self._end_queue_held(out, chan, reason)

    # -- resync after (re)connecting -------------------------------------------

    def begin_resync(self) -> None:
        """A CoreShowChannels list is coming: channels it does not name (and
        no other event touches meanwhile) are gone when it completes.  Queue
        membership is relearned (QueueStatus follows): it may have changed."""
        # A resync cut short by a lost link and begun again keeps the
        # channels it found unanswered: the snapshots since may have
        # answered them, and end_resync must still tell those answers.
        if self._resync_seen is None:
            self._resync_unanswered = set()
        self._resync_seen = set()
        self._resync_unanswered |= {uid for uid, chan in self.table.channels.items()
                                    if chan.answered_at is None}
        self.queue_members.clear()

    def on_coreshowchannel(self, msg: AmiMessage, out: Outbox) -> None:
        if self._resync_seen is None:
            self.begin_resync()
        chan = self._snapshot(out, msg, "")
        if chan is None:
            return
        chan.app = msg.get("Application", chan.app)
        chan.appdata = msg.get("ApplicationData", chan.appdata)
        bridge_id = msg.get("BridgeId")
        if bridge_id:
            self.table.enter_bridge(chan, bridge_id)
        if chan.app.lower() == "confbridge":
            # In a room since before we connected (ConfBridge(room,...)):
            # its later joins and leaves are told, and counted right.
            room = chan.appdata.partition(",")[0]
            members = self.conferences.setdefault(room, []) if room else []
            if room and chan not in members:
                members.append(chan)

    def on_coreshowchannelscomplete(self, msg: AmiMessage, out: Outbox) -> None:
        self._end_resync(out)

    def end_resync(self, now: float) -> List[Notification]:
        """The channel list is complete (or unavailable: then every channel
        no event has touched since the resync began counts as gone)."""
        out = Outbox(now)
        self._end_resync(out)
        return out.notes

    def _end_resync(self, out: Outbox) -> None:
        seen = self._resync_seen
        self._resync_seen = None
        if seen is None:
            seen = set()
        for chan in [c for c in self.table.channels.values() if c.uniqueid not in seen]:
            # Hung up while we were not listening: how is unknowable.
            self._hangup(out, chan, 0, "", reason=Reason.UNKNOWN)
        for chan in list(self.table.channels.values()):
            if chan.app.lower() == "voicemail":
                self._to_voicemail(out, chan)  # got there while we were away
        unanswered, self._resync_unanswered = self._resync_unanswered, set()
        for uid in sorted(unanswered):
            chan = self.table.channels.get(uid)
            if chan is None or chan.answered_at is None or chan.is_local:
                continue
            # Answered while we were away: told as if we had seen it, by the
            # channel that answered (a callee: what dialed it is known).  A
            # caller's own channel being Up says nothing: a click-to-dial
            # phone is Up while the far end still rings.
            if chan.dialer is not None or any(uc.direction == CALL_IN and chan in uc.channels
                                              for uc in chan.user_calls):
                self._answered(out, chan.dialer, chan)
        for chan in list(self.table.channels.values()):
            if not chan.user_calls and self._users_of(chan):
                self._adopt(out, chan)

    def _adopt(self, out: Outbox, chan: Channel) -> None:
        """A user's phone in a call that began while we were not connected:
        told now as it would have been live, so that whatever comes next
        (hold, a transfer, the hangup) belongs to a call the user knows of:
        ``incoming`` (or ``outgoing``) stamped with the time the channel was
        created, not the time we learn of it (after a long outage that may
        be a minute later; issue 16.5), then ``pickup`` if it is answered.
        So does a call whose first part the link loss ended, now a call of
        its own (FollowOnCalls): it began then too."""
        callee = chan.app == "AppDial" or chan.dialer is not None
        # An outgoing call to an application (a conference room, voicemail)
        # has no connected party: the number the phone dialed stands in.
        dialed = "" if callee else self._dialed_number(chan, "")
        peer = chan.connected or Party(dialed, "")
        for user in self._users_of(chan):
            uc = self.book.user_call(chan.call_id, user, CALL_IN if callee else CALL_OUT,
                                     chan.caller, peer, dialed, out.now)
            uc.device = chan.device
            self.book.attach(uc, chan)
            if callee:
                self._announce_incoming(out, uc, chan.connected, "", chan, chan.created)
            else:
                self._announce(out, uc, Kind.OUTGOING, chan.created)
            if chan.state == "Up" and uc.phase is Phase.RINGING:
                self._adopt_answer(out, uc, chan, callee)

    def _adopt_answer(self, out: Outbox, uc: UserCall, chan: Channel, callee: bool) -> None:
        """The adopted call is up: answered by the user, on a call to them;
        else by whoever the phone talks with (the number it called, if that
        is unknown).  When is unknown too: the answer counts from now."""
        answerer: Optional[Channel] = chan
        if callee:
            by = uc.me
        else:
            answerer = next((c for c in self.table.talking_with(chan) if not c.is_local), None)
            by = self._remote_party(answerer, uc.me) if answerer is not None else uc.peer
        uc.answered_at = chan.answered_at or out.now
        uc.answered_by = by
        self._tell(out, uc, Kind.PICKUP, uc.answered_at, answered_by=dict(
            by.as_dict(), device=answerer.device if answerer is not None else ""))


class CallEngine(_Resync):
    """Follows channels, dials and bridges; tells each user about their calls.

    ``handle(message, now)`` takes one AMI message and returns the
    notifications it causes.  The engine reads no clock and does no I/O;
    messages it has no handler for cost one dictionary lookup.

    The model: a ``Channel`` per Asterisk channel (in ``table``, a
    ``ChannelTable`` with the bridges), linked by who dialed whom
    (``dialer``) and by Local channel pairs (``local_peer``), so that any
    channel's *lineage* leads back to the caller.  A ``UserCall`` per user
    and call holds what that user was told; it lives as long as the user's
    own channels in the call, or, for a call to the user's number that rings
    elsewhere, as long as the caller's channel (its *anchor*).
    """

    #: AMI event -> the name of its handler, one per event, in the order a
    #: call meets them.
    HANDLERS = {
        # channel lifecycle
        "Newchannel": "on_newchannel",
        "Hangup": "on_hangup",
        # snapshots: state, caller ID, dialplan position
        "Newstate": "on_snapshot",
        "NewCallerid": "on_snapshot",
        "NewConnectedLine": "on_snapshot",
        "Newexten": "on_newexten",
        # dialing
        "DialBegin": "on_dialbegin",
        "DialState": "on_dialstate",
        "DialEnd": "on_dialend",
        # bridges and Local channels
        "BridgeEnter": "on_bridgeenter",
        "BridgeLeave": "on_bridgeleave",
        "LocalBridge": "on_localbridge",
        # (LocalOptimizationBegin/End need no handler: the BridgeEnter with
        # SwapUniqueid that completes an optimization says what matters.)
        # moving calls: transfer, pickup, parking
        "BlindTransfer": "on_blindtransfer",
        "AttendedTransfer": "on_attendedtransfer",
        "Pickup": "on_pickup",
        "ParkedCall": "on_parkedcall",
        "UnParkedCall": "on_unparkedcall",
        "ParkedCallTimeOut": "on_parkedcalltimeout",
        "ParkedCallGiveUp": "on_parkedcallgiveup",
        # queues (read class "agent")
        "QueueCallerJoin": "on_queuecallerjoin",
        "QueueCallerLeave": "on_queuecallerleave",
        "QueueCallerAbandon": "on_queuecallerabandon",
        "QueueMemberStatus": "on_queuememberstatus",
        "QueueMemberAdded": "on_queuememberadded",
        "QueueMember": "on_queuemember",
        "AgentCalled": "on_agentcalled",
        "QueueMemberRemoved": "on_queuememberremoved",
        # conferences, hold
        "ConfbridgeJoin": "on_confbridgejoin",
        "ConfbridgeLeave": "on_confbridgeleave",
        "ConfbridgeEnd": "on_confbridgeend",
        "Hold": "on_hold",
        "Unhold": "on_unhold",
        # resync after (re)connecting: the CoreShowChannels list
        "CoreShowChannel": "on_coreshowchannel",
        "CoreShowChannelsComplete": "on_coreshowchannelscomplete",
    }

    def __init__(self, directory: Optional[Directory] = None, pbx: str = ""):
        super().__init__(directory, pbx)
        self._handlers = {event: getattr(self, name) for event, name in self.HANDLERS.items()}

    # -- entry points ----------------------------------------------------------

    def handle(self, msg: AmiMessage, now: float) -> Sequence[Notification]:
        handler = self._handlers.get(msg.get("Event"))  # type: ignore[arg-type]
        if handler is None:
            return _NO_NOTIFICATIONS
        out = Outbox(now)
        if self.order.waits:
            self._in_order(msg, handler, out)
        else:
            handler(msg, out)
        return out.notes or _NO_NOTIFICATIONS

    def _in_order(self, msg: AmiMessage, handler, out: Outbox) -> None:
        """Handle ``msg`` while Local channels wait for their DialBegin
        (LocalDialOrder): maybe later, maybe after what waited."""
        for held in self.order.due(msg, out.now):
            self._handle_held(held, out)
        if self.order.hold(msg, handler, out.now):
            return
        handler(msg, out)
        for held in self.order.dialed(msg):
            self._handle_held(held, out)

    def _handle_held(self, held: Tuple[AmiMessage, object, float], out: Outbox) -> None:
        """A held event, at the time it came (its notifications say so)."""
        msg, handler, now = held
        mine = Outbox(now)
        if self.order.waits:
            self._in_order(msg, handler, mine)
        else:
            handler(msg, mine)  # type: ignore[operator]
        out.notes += mine.notes

    def link_lost(self, now: float) -> List[Notification]:
        """The AMI link is gone for good: no call may stay 'ringing' at a
        client.  Every announced call ends with ``reason=unknown``."""
        out = Outbox(now)
        for uc in self.book.all():
            self._end(out, uc, reason=Reason.UNKNOWN)
        # A call still up at the PBX when the link comes back (the resync
        # lists it) is told again, but as a new call: the one of this id
        # has had its hangup (seen live: tests/traces/live/grace/).
        ended = {note.fields["call"] for note in out.notes if note.kind == Kind.HANGUP}
        for linkedid in {chan.linkedid for chan in self.table.channels.values()
                         if chan.call_id in ended or chan.linkedid in ended}:
            self.follow_ons.restart(linkedid)
        self.table.clear()
        self.book.clear()
        self.order.clear()
        self.conferences.clear()
        self._resync_seen = None
        self._resync_unanswered = set()
        return out.notes

    def set_directory(self, directory: Directory) -> None:
        """New users and devices apply to calls that start from now on."""
        self.directory = directory

    def active_calls(self, user: str) -> List[UserCall]:
        """The user's announced calls in progress, oldest first."""
        calls = [uc for uc in self.book.of_user(user) if uc.told]
        return sorted(calls, key=lambda uc: uc.started)

    def call_fields(self, uc: UserCall) -> Dict[str, object]:
        """A call in progress as event fields, for the CALLS command."""
        frm, to = uc.parties
        fields = self._fields("call", uc.call_id, uc.started, uc.role, uc.device, frm, to,
                              state=CallState.RINGING if uc.answered_at is None
                              else CallState.UP, dialed=uc.dialed)
        if uc.answered_at is not None:
            fields["answered"] = iso_time(uc.answered_at)
        return fields

    def user_channels(self, user: str, call_id: str) -> Optional[List[Channel]]:
        """The user's own phones in one of their calls in progress, for
        HANGUP and TRANSFER: [] while none is in it (a call to their number
        that rings elsewhere); None if the user was told of no such call."""
        calls = [uc for uc in self.book.of_call(call_id) if uc.user == user and uc.told]
        if not calls:
            return None
        return list(dict.fromkeys(chan for uc in calls for chan in uc.channels))

    def knows_call(self, call_id: str) -> bool:
        """Whether a call of this id is in progress, whoever is in it."""
        return self.book.has_call(call_id) or \
            any(chan.call_id == call_id for chan in self.table.channels.values())

    # -- for the tests: is anything left, is it consistent ---------------------

    def is_idle(self) -> bool:
        """No channel, no user call, no conference is known: what the engine
        comes back to when every call has ended."""
        return self.table.is_idle() and self.book.is_idle() and not self.conferences \
            and not self.order.waits

    def check(self) -> List[str]:
        """What is inconsistent in the engine's state (links not two-way,
        channels that are gone but still named): [] when all is well.  For
        the tests, after every message of a trace."""
        problems = self.table.check() + self.book.check(self.table) + \
            self.order.check(self.table) + self.follow_ons.check()
        for room, members in self.conferences.items():
            problems += ["conference %s lists %r, which is gone" % (room, chan)
                         for chan in members if self.table.channels.get(chan.uniqueid) is not chan]
        return problems

    def channels(self) -> List[Channel]:
        """The channels Asterisk has, as last seen."""
        return list(self.table.channels.values())


# ---------------------------------------------------------------------------
# Call actions (no I/O): DIAL, HANGUP and TRANSFER, from a command to AMI actions
# ---------------------------------------------------------------------------
#
# A desktop's command passes these checks before a byte goes to Asterisk
# (ServerView.act): the session is logged in; the user is under their rate
# (ActionRate); their ``actions`` allow it; every argument is valid
# (ActionRequest.parse: a number is digits, + * # and nothing else); the
# call is one the user was told of, and the user's own phone is in it
# (plan_action asks the engine).  What is sent is built here, from checked
# parts only, and checked once more (_check_fields); encode_action refuses
# CR and LF in any key or value as the last defence.
#
# Asterisk answers each action with a Response of the same ActionID: that
# is the reply, OK or ERR, sent in the order of the commands.  An Originate
# is sent with ``Async: true``: its Response says only that it is queued
# (the user's phone is being rung), so the outcome (answered, busy, no
# answer, failed) comes later in the OriginateResponse event, and goes to
# the desktop as a ``STATUS dial=...`` line.

#: What a pasted number may hold that is dropped: spaces (also the no-break
#: ones of web pages and Office documents), dashes, dots and parentheses.
_NUMBER_DROPPED = dict.fromkeys(map(ord, " \t\u00a0\u202f-.()"))
_NUMBER = re.compile(r"[0-9+*#]{1,%d}" % MAX_DIAL_CHARS)
#: A call id as users are told them: Asterisk's Linkedid, ``[system-]epoch.seq``.
_CALL_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A channel name that may go into an AMI field: TECH/resource, printable,
#: no space.  Never one that starts with "/": Hangup takes ``/.../`` for a
#: regular expression over every channel (Asterisk 22, manager.c, Hangup).
_SAFE_CHANNEL = re.compile(r"[A-Za-z][A-Za-z0-9_]*/[^\s\x00-\x1f\x7f-\x9f]{1,200}")
#: Any value of an action we send: printable, one line.
_SAFE_FIELD = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]{0,256}")
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: OriginateResponse ``Reason``: the last control frame of the user's phone
#: (AST_CONTROL_* in include/asterisk/frame.h): 4 answered, 5 busy, 3 it was
#: still ringing when Originate's Timeout ran out; 8 congestion, 1 hung up
#: (rejected), 0 no channel at all (an unregistered phone) are failures.
ORIGINATE_REASONS = {"4": "answered", "5": "busy", "3": "noanswer"}
#: ``STATUS dial=`` when no OriginateResponse came (timeout, link lost).
DIAL_UNKNOWN = "unknown"


def parse_number(text: str) -> str:
    """A number as a person pastes it, as it goes into ``Exten``:
    ``(555) 123-4567`` -> ``5551234567``.  ValueError for anything else:
    letters, ``;``, ``/``, ``@``, ``,``, ``&``, ``|``, control characters
    (a channel, a dial string or a second header could hide behind them)."""
    number = text.translate(_NUMBER_DROPPED)
    if not _NUMBER.fullmatch(number):
        raise ValueError("not a number: only digits, + * # (and spaces, dashes, dots, "
                         "parentheses) up to %d digits" % MAX_DIAL_CHARS)
    return number


class ActionRequest:
    """One DIAL, HANGUP or TRANSFER as a user sent it, arguments checked:
    ``call_id`` for HANGUP and TRANSFER, ``number`` for DIAL and TRANSFER."""

    __slots__ = ("verb", "user", "call_id", "number")

    def __init__(self, verb: str, user: UserConfig, call_id: str = "", number: str = ""):
        self.verb = verb
        self.user = user
        self.call_id = call_id
        self.number = number

    _USAGE = {CallAction.DIAL: "DIAL <number>", CallAction.HANGUP: "HANGUP <call>",
              CallAction.TRANSFER: "TRANSFER <call> <number>"}

    @classmethod
    def parse(cls, verb: str, argument: str, user: UserConfig) -> "ActionRequest":
        """The command's argument checked; ClientProtocolError 400 if it is not
        valid, and then nothing of it is echoed back or sent on."""
        usage = ClientProtocolError("400", "%s: usage: %s" % (verb, cls._USAGE[verb]))
        call_id, number = "", argument.strip()
        if verb != CallAction.DIAL:
            words = number.split(None, 1)
            if not words or (verb == CallAction.HANGUP) != (len(words) == 1):
                raise usage
            call_id, number = words[0], words[1] if len(words) > 1 else ""
            if not _CALL_ID.fullmatch(call_id):
                raise ClientProtocolError("400", "%s: not a call id, expected the call= of "
                                          "one of your calls" % verb)
        elif not number:
            raise usage
        if verb != CallAction.HANGUP:
            try:
                number = parse_number(number)
            except ValueError as e:
                raise ClientProtocolError("400", "%s: %s" % (verb, e))
        return cls(verb, user, call_id, number)

    def target(self) -> str:
        """What it acts on, for replies and the log: ``number=...``, ``call=...``."""
        if self.verb == CallAction.DIAL:
            return "number=%s device=%s" % (self.number, self.user.dial_device)
        if self.verb == CallAction.HANGUP:
            return "call=%s" % self.call_id
        return "call=%s to=%s" % (self.call_id, self.number)


class ActionPlan:
    """What one request sends, and where: ``pbx`` (the PBX of the user's
    dial device, or of the call), ``steps`` (action, fields) in order, and
    ``outcome_event``, the event that ends an action answered in two
    steps (Originate: OriginateResponse), or ''."""

    __slots__ = ("request", "pbx", "steps", "outcome_event")

    def __init__(self, request: ActionRequest, pbx: str,
                 steps: List[Tuple[str, List[Tuple[str, str]]]], outcome_event: str = ""):
        self.request = request
        self.pbx = pbx
        self.steps = steps
        self.outcome_event = outcome_event

    def ok(self) -> str:
        """The reply once Asterisk accepted every action."""
        return "OK %s %s" % (self.request.verb, self.request.target())

    def error(self, code: str, text: str) -> str:
        """An ERR reply that names the command, so it reads alone in a log."""
        return "ERR %s %s %s: %s" % (code, self.request.verb, self.request.target(), text)


def plan_action(request: ActionRequest, engines: Sequence[Tuple[str, CallEngine]],
                dial_context: str) -> ActionPlan:
    """The AMI actions a checked request becomes, on the PBX it belongs to.
    ClientProtocolError when the call is nobody's (404), someone else's
    (403), or has no phone of the user's in it to act on (409).

    DIAL is an Originate from the user's ``dial_device``, with the user's
    own caller ID: Asterisk makes it the caller ID *and* the connected line
    of that channel (main/channel.c, __ast_request_and_dial), so it is what
    the callee sees, what the CDR records and what our ``outgoing`` event
    reports (o_click_to_dial.ami sent ``"Alice Smith" <100>``).  TRANSFER
    is a BlindTransfer of the user's *own* channel: Asterisk moves "all
    channels currently bridged to the specified channel" and drops the
    named one, the transferer (Asterisk 22, BlindTransfer action;
    j_blind_transfer named Alice's channel to send John to 101).
    """
    user = request.user
    context = user.dial_context or dial_context
    if request.verb == CallAction.DIAL:
        pbx, device = split_device(user.dial_device)
        steps = [("Originate", [
            ("Channel", device), ("Context", context), ("Exten", request.number),
            ("Priority", "1"), ("CallerID", user.dial_callerid),
            ("Timeout", "%d" % (DIAL_RING_S * 1000)), ("Async", "true")])]
        return _checked(ActionPlan(request, pbx or DEFAULT_PBX, steps, "OriginateResponse"))
    pbx, channels = _find_user_call(request, engines)
    if request.verb == CallAction.HANGUP:
        if not channels:
            raise ClientProtocolError("409", "hangup %s: none of your phones is in the call"
                                      % request.target())
        steps = [("Hangup", [("Channel", chan.name)]) for chan in channels]
        return _checked(ActionPlan(request, pbx, steps))
    talking = [chan for chan in channels if chan.bridge is not None]
    if not talking:
        raise ClientProtocolError("409", "transfer %s: you are not talking on it, only an "
                                  "answered call can be transferred" % request.target())
    steps = [("BlindTransfer", [("Channel", talking[0].name), ("Context", context),
                                ("Exten", request.number)])]
    return _checked(ActionPlan(request, pbx, steps))


def _find_user_call(request: ActionRequest,
                    engines: Sequence[Tuple[str, CallEngine]]) -> Tuple[str, List[Channel]]:
    """(PBX, the user's own channels in it) of the user's call; 403 if the
    call is someone else's, 404 if no call has that id."""
    for pbx, engine in engines:
        channels = engine.user_channels(request.user.name, request.call_id)
        if channels is not None:
            return pbx, channels
    if any(engine.knows_call(request.call_id) for _pbx, engine in engines):
        raise ClientProtocolError("403", "%s %s: not your call" % (request.verb,
                                                                   request.target()))
    raise ClientProtocolError("404", "%s %s: no such call in progress" % (request.verb,
                                                                          request.target()))


def _checked(plan: ActionPlan) -> ActionPlan:
    """The plan, once every field is known safe to send; a channel name from
    Asterisk that is not (a 502) is never sent back to it."""
    for action, fields in plan.steps:
        for key, value in fields:
            if key == "Channel" and not _SAFE_CHANNEL.fullmatch(value) or \
                    not _SAFE_FIELD.fullmatch(value):
                raise ClientProtocolError("502", "%s %s: refused to send %s %s %.40r"
                                          % (plan.request.verb, plan.request.target(),
                                             action, key, value))
    return plan


def refusal_text(message: str) -> str:
    """Asterisk's Message of an Error response, one line, for the ERR reply."""
    text = _UNSAFE_TEXT.sub(" ", message or "refused")[:200]
    if text.lower() == "permission denied":
        text += " (the manager.conf user of ctinotify needs write = originate,call)"
    return "Asterisk answered: " + text


def dial_outcome(msg: AmiMessage) -> Dict[str, object]:
    """An OriginateResponse as ``STATUS dial=...`` fields: ``answered``
    (the user lifted the phone: Asterisk now dials the number), ``busy``,
    ``noanswer`` or ``failed``, with Asterisk's ``code``."""
    reason = msg.get("Reason", "")
    code = reason if reason.isdigit() and len(reason) < 4 else "?"
    return {"dial": ORIGINATE_REASONS.get(code, "failed"), "code": code}


class ActionRate:
    """Actions per user in the last minute, a sliding window: what
    ``actions_per_minute`` allows.  Every attempt counts, allowed or not by
    the user's ``actions``, valid or not: guessing call ids is as slow as
    anything else.  One deque of at most ``limit`` times per user."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._times: Dict[str, "collections.deque[float]"] = {}

    def allow(self, user: str, limit: int, now: float) -> bool:
        """Count an attempt at ``now``; False (not counted) over the limit."""
        times = self._times.setdefault(user, collections.deque())
        while times and now - times[0] >= self.WINDOW_S:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    def wait(self, user: str, now: float) -> float:
        """Seconds until ``user`` may act again."""
        times = self._times.get(user)
        return max(0.0, times[0] + self.WINDOW_S - now) if times else 0.0


# ---------------------------------------------------------------------------
# Client protocol (no I/O): login, subscriptions, text and JSON lines
# ---------------------------------------------------------------------------

#: Characters no line sent to a client carries raw, beyond the C0 controls:
#: DEL and the C1 controls (U+009B is the 8-bit CSI: terminal escape
#: sequences; U+0085 ends a line for str.splitlines()), the line and
#: paragraph separators, and the bidi overrides and isolates, which reorder
#: what a terminal or log viewer shows (watch escapes them on screen too).
_UNSAFE_BEYOND_C0 = list(range(0x7f, 0xa0)) + [0x2028, 0x2029] + \
    list(range(0x202a, 0x202f)) + list(range(0x2066, 0x206a))
#: Characters that force a text value into quotes: anything that could end
#: a line for some reader (CR, LF, VT, FF, NEL, U+2028...), spaces, quotes,
#: '=', backslashes, and the rest of the above.
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]')
_TEXT_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n",
                 ord("\r"): "\\r", ord("\t"): "\\t"}
for _code in list(range(0x20)) + _UNSAFE_BEYOND_C0:
    _TEXT_ESCAPES.setdefault(_code, "\\u%04x" % _code)
#: json.dumps escapes the C0 controls; these are escaped after it, the same
#: way (``\\u009b``): still valid JSON, and the same string once parsed.
_JSON_EXTRA_ESCAPES = {code: "\\u%04x" % code for code in _UNSAFE_BEYOND_C0}
#: Whether a line holds any (a line rarely does).
_JSON_NEEDS_EXTRA = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_TEXT_PAIR = re.compile(r'\s*([A-Za-z0-9_]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
_TEXT_UNESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|.)')


def quote_value(value: str) -> str:
    """A value for a text line: bare when safe, else quoted and escaped."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return '"' + value.translate(_TEXT_ESCAPES) + '"'


def _unescape(match: "re.Match[str]") -> str:
    code = match.group(1)
    if code[0] == "u" and len(code) == 5:
        return chr(int(code[1:], 16))
    return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)


def unquote_value(text: str) -> str:
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return _TEXT_UNESCAPE.sub(_unescape, text[1:-1])
    return text


def flatten_fields(fields: Dict[str, object]) -> List[Tuple[str, str]]:
    """``{"from": {"num": "1"}}`` -> ``[("from_num", "1")]``, in order."""
    pairs: List[Tuple[str, str]] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                pairs.append((key + "_" + sub, "" if subvalue is None else str(subvalue)))
        elif isinstance(value, bool):
            pairs.append((key, "yes" if value else "no"))
        elif isinstance(value, (list, tuple)):
            # A call log record's ``path`` (diverts, transfers): JSON, quoted.
            pairs.append((key, json.dumps(value, ensure_ascii=False, separators=(",", ":"))))
        else:
            pairs.append((key, "" if value is None else str(value)))
    return pairs


def encode_text_line(tag: str, fields: Dict[str, object]) -> str:
    """``EVENT incoming call=... from_num=...``: one line, whatever the values."""
    parts = [tag]
    for key, value in flatten_fields(fields):
        parts.append(key + "=" + quote_value(value))
    return " ".join(parts)


def encode_json_line(fields: Dict[str, object]) -> str:
    """One JSON object on one line, readable as it is on a terminal."""
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    # An ASCII line (most: isascii() reads a flag) can hold only DEL of them.
    if (not text.isascii() and _JSON_NEEDS_EXTRA.search(text)) or "\x7f" in text:
        text = text.translate(_JSON_EXTRA_ESCAPES)
    return text


def parse_text_line(line: str) -> Tuple[str, str, Dict[str, str]]:
    """The inverse of encode_text_line: ``(tag, kind, {key: value})``.
    For ``EVENT`` lines ``kind`` is the event kind; for others, ''."""
    tag, _, rest = line.partition(" ")
    kind = ""
    if tag == "EVENT":
        kind, _, rest = rest.partition(" ")
    values: Dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _TEXT_PAIR.match(rest, pos)
        if match is None or match.end() == pos:
            raise ValueError("not key=value at %r" % rest[pos:pos + 20])
        values[match.group(1)] = unquote_value(match.group(2))
        pos = match.end()
    return tag, kind, values


def encode_notification(fields: Dict[str, object], fmt: str) -> bytes:
    if fmt == "json":
        return (encode_json_line(fields) + "\r\n").encode("utf-8")
    kind = str(fields.get("event"))
    rest = {k: v for k, v in fields.items() if k != "event"}
    return (encode_text_line("EVENT " + kind, rest) + "\r\n").encode("utf-8")


def encode_status(fields: Dict[str, object], fmt: str) -> bytes:
    """A link status line: ``STATUS pbx=down ...`` or ``{"event":"status",...}``."""
    if fmt == "json":
        return (encode_json_line(dict({"event": "status"}, **fields)) + "\r\n").encode("utf-8")
    return (encode_text_line("STATUS", fields) + "\r\n").encode("utf-8")


def fill_popup_url(template: str, fields: Dict[str, object], user: str) -> str:
    """The ``popup_url`` of a user, its placeholders filled from an event.

    Every value is percent-encoded whole (``safe=""``): a caller ID can add
    neither a ``&``, ``#`` or ``/`` nor another placeholder to the URL, and
    a value of ``.`` or ``..`` is left out.
    """
    values = dict(flatten_fields(fields))
    values["user"] = user

    def fill(match: "re.Match[str]") -> str:
        value = values.get(match.group(1), "")
        if value in (".", ".."):
            return ""  # in a path, a step up to another page (%2E%2E too)
        return urllib.parse.quote(value, safe="")
    return _URL_PLACEHOLDER.sub(fill, template)


def with_popup_url(fields: Dict[str, object], account: Optional[UserConfig]) -> Dict[str, object]:
    """An event as this user receives it: ``incoming`` events, and only
    those, get ``url`` when the user has a ``popup_url``.  Never changes
    ``fields`` itself: the engine's notification may go to other users."""
    if account is None or not account.popup_url or fields.get("event") != "incoming":
        return fields
    return dict(fields, url=fill_popup_url(account.popup_url, fields, account.name))


def encode_history(record: Dict[str, object], fmt: str) -> str:
    """One HISTORY item: ``HISTORY user=alice call=...`` or a JSON object
    with ``"event":"history"``."""
    if fmt == "json":
        return encode_json_line(dict({"event": "history"}, **record))
    return encode_text_line("HISTORY", record)


CLIENT_HELP = ("commands: LOGIN <user> <secret> | EVENTS <kind>[,<kind>...]|ALL | "
               "FORMAT text|json | CALLS | HISTORY [n] | BOARD | DIAL <number> | "
               "HANGUP <call> | TRANSFER <call> <number> | PING | HELP | QUIT")


def address_key(address: str) -> str:
    """What limits count per source: the IPv4 address (also when it comes
    IPv4-mapped), or the /64 of an IPv6 address, which one host usually owns whole."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            return str(ip.ipv4_mapped)  # type: ignore[union-attr]
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class _FailureTable:
    """Failures per key (an address, an account name), in at most ``limit``
    entries, each ``[failures, time of the last, penalty until]``.  An entry
    is forgotten ``forget_s`` after its last failure, once its penalty is
    over.  To make room the least recently failing entry without a penalty
    goes; a penalised one never does (else a flood of other keys would lift
    its penalty): while every entry is penalised, new keys share one entry,
    SHARED."""

    SHARED = "*"
    #: While full of penalties, expired ones are looked for at most this often.
    PURGE_INTERVAL_S = 1.0

    def __init__(self, limit: int, forget_s: float):
        self.limit = limit
        self.forget_s = forget_s
        #: Entries without a penalty, least recently failing first.
        self._free: "collections.OrderedDict[str, List[float]]" = collections.OrderedDict()
        self._penalised: Dict[str, List[float]] = {}
        self._shared: Optional[List[float]] = None
        self._purge_at = 0.0

    def __len__(self) -> int:
        return len(self._free) + len(self._penalised)

    def key_for(self, key: str, now: float) -> str:
        """``key``, or SHARED while there is no room for it."""
        if self.get(key, now) is not None or len(self) < self.limit or self._free:
            return key
        if now >= self._purge_at:
            self._purge_at = now + self.PURGE_INTERVAL_S
            for old in [k for k, e in self._penalised.items() if now >= e[2]]:
                self._free[old] = self._penalised.pop(old)
        return key if self._free else self.SHARED

    def get(self, key: str, now: float) -> Optional[List[float]]:
        if key == self.SHARED:
            entry = self._shared
        else:
            entry = self._penalised.get(key)
            if entry is not None and now >= entry[2]:
                self._free[key] = self._penalised.pop(key)  # its penalty is over
            elif entry is None:
                entry = self._free.get(key)
        if entry is None or now < entry[2] or now - entry[1] < self.forget_s:
            return entry
        if key == self.SHARED:
            self._shared = None
        else:
            del self._free[key]
        return None

    def fail(self, key: str, now: float) -> Tuple[str, List[float]]:
        """Count a failure of ``key`` (or of SHARED, if no room): which, and its entry."""
        key = self.key_for(key, now)
        entry = self.get(key, now)
        if entry is None:
            entry = [0, now, 0.0]
            if key == self.SHARED:
                self._shared = entry
            else:
                if len(self) >= self.limit:
                    self._free.popitem(last=False)
                self._free[key] = entry
        elif key in self._free:
            self._free.move_to_end(key)
        entry[0] += 1
        entry[1] = now
        return key, entry

    def penalise(self, key: str, entry: List[float], until: float) -> None:
        entry[2] = until
        if key in self._free:
            self._penalised[key] = self._free.pop(key)

    def penalty_left(self, key: str, now: float) -> float:
        entry = self.get(self.key_for(key, now), now)
        return max(0.0, entry[2] - now) if entry is not None else 0.0


class LoginThrottle:
    """Failed logins: per source address a growing delay, then a block; per
    account a short cool-down.

    ``failed(address, now)`` records an address's failure and returns how
    long to hold the reply back and whether the address is blocked from
    now on; ``blocked_for(address, now)`` how long a block has left.  A
    success does not reset an address's count: logging in to one's own
    account must not buy more guesses at someone else's.

    Guesses at one account from many addresses are slowed down apart:
    ``account_failed(name, now)`` counts them (known names or not, so the
    answers never tell them apart), and after LOGIN_ACCOUNT_FREE failures
    the name takes no login for a while (``account_wait``), doubling per
    failure up to LOGIN_ACCOUNT_DELAY_MAX_S: a guesser gets a try or two a
    minute, never a lock-out of its owner for long.  An address the account
    logged in from before (``account_succeeded``) is not held back at all.
    Memory is bounded (_FailureTable), and penalties outlast any flood.
    """

    def __init__(self, delay_s: float = LOGIN_FAIL_DELAY_S, block_after: int = LOGIN_BLOCK_AFTER,
                 block_s: float = LOGIN_BLOCK_S, forget_s: float = LOGIN_FAIL_FORGET_S,
                 max_hosts: int = MAX_LOGIN_TRACKED_HOSTS,
                 max_accounts: int = MAX_LOGIN_TRACKED_ACCOUNTS):
        self.delay_s = delay_s
        self.block_after = block_after
        self.block_s = block_s
        self.forget_s = forget_s
        self._hosts = _FailureTable(max_hosts, forget_s)
        self._accounts = _FailureTable(max_accounts, forget_s)
        #: account -> the addresses it logged in from lately, newest last.
        self._owners: Dict[str, "collections.OrderedDict[str, None]"] = {}

    def configure(self, delay_s: float, block_after: int, block_s: float) -> None:
        self.delay_s, self.block_after, self.block_s = delay_s, block_after, block_s

    def __len__(self) -> int:
        return len(self._hosts)

    def blocked_for(self, key: str, now: float) -> float:
        return self._hosts.penalty_left(key, now)

    def failed(self, key: str, now: float) -> Tuple[float, bool]:
        key, entry = self._hosts.fail(key, now)
        failures = int(entry[0])
        delay = self.delay_s * min(2 ** min(failures - 1, 16), LOGIN_FAIL_DELAY_GROWTH)
        if self.block_after and failures >= self.block_after and now >= entry[2]:
            entry[0] = 0  # the block is the punishment; afterwards start over
            self._hosts.penalise(key, entry, now + self.block_s)
            return delay, True
        return delay, False

    def account_wait(self, name: str, address: str, now: float) -> float:
        """Seconds until ``name`` may be tried from ``address`` (0: now)."""
        if address in self._owners.get(name, ()):
            return 0.0
        return self._accounts.penalty_left(name[:64], now)

    def account_failed(self, name: str, now: float) -> float:
        """A failed login as ``name``: the cool-down it starts (0: none)."""
        # A longer name is no account's (at most 64 characters): cut, it counts as one.
        key, entry = self._accounts.fail(name[:64], now)
        over = int(entry[0]) - LOGIN_ACCOUNT_FREE
        if over <= 0:
            return 0.0
        pause = min(LOGIN_ACCOUNT_DELAY_S * 2 ** min(over - 1, 16), LOGIN_ACCOUNT_DELAY_MAX_S)
        self._accounts.penalise(key, entry, now + pause)
        return pause

    def login_failed(self, name: str, address: str, now: float) -> Tuple[float, bool, float]:
        """A failed login as ``name`` from ``address`` (LOGIN or the web):
        how long to hold the reply back, whether the address is blocked from
        now on, and the cool-down it starts for the name (0: none)."""
        pause = self.account_failed(name, now)
        delay, blocked = self.failed(address, now)
        return delay, blocked, pause

    def account_succeeded(self, name: str, address: str) -> None:
        owners = self._owners.setdefault(name, collections.OrderedDict())
        owners[address] = None
        owners.move_to_end(address)
        while len(owners) > LOGIN_KNOWN_ADDRESSES:
            owners.popitem(last=False)


#: The reply text to a login with a published example secret: not "login
#: failed", so the person at the desktop knows it is no typo of theirs.
EXAMPLE_SECRET_REFUSED = "example secret refused, the admin must set a secret of its own"


def check_login(users: Dict[str, UserConfig], name: str, secret: str,
                peer_host: str) -> Tuple[Optional[UserConfig], str, str]:
    """LOGIN's rules, one place for the line protocol and the web alike:
    ``(account, "", "")``, or ``(None, why, reply)``: why for the log, the
    reply's text for the client.

    A published example secret (EXAMPLE_SECRETS) is refused whoever it
    names, so its distinct reply tells nothing about the accounts; every
    other failure is the same ``login failed``.  The secret is compared
    even for unknown users, so timing does not tell them apart either.
    """
    account = users.get(name)
    expected = account.secret if account is not None else "\0unknown user"
    secret_ok = hmac.compare_digest(secret.encode("utf-8"), expected.encode("utf-8"))
    if is_example_secret(secret):
        why = "the secret is a published example"
        if account is not None and secret_ok:
            why += ", and [%s] has it: give it a secret of its own" % account.name
        return None, why, EXAMPLE_SECRET_REFUSED
    if account is None or not secret_ok or not account.host_allowed(peer_host):
        why = ("unknown user" if account is None else
               "wrong secret" if not secret_ok else "address not allowed by host=")
        return None, why, "login failed"
    return account, "", ""


class CallHistory:
    """The last finished calls of every user, for HISTORY: bounded per user,
    and only ever looked up by the user a record names."""

    def __init__(self, per_user: int = HISTORY_PER_USER):
        self.per_user = per_user
        self._by_user: Dict[str, "collections.deque[Dict[str, object]]"] = {}

    def add(self, record: Dict[str, object]) -> None:
        user = record.get("user")
        if not isinstance(user, str):
            return
        calls = self._by_user.get(user)
        if calls is None:
            calls = self._by_user[user] = collections.deque(maxlen=self.per_user)
        calls.append(record)

    def last(self, user: str, count: int) -> List[Dict[str, object]]:
        """The user's last ``count`` calls, oldest first."""
        calls = self._by_user.get(user)
        if not calls or count <= 0:
            return []
        return list(calls)[-count:]

    def seed(self, lines: Iterable[str], users: Iterable[str]) -> int:
        """Load call log lines (oldest first); skip broken ones and other users."""
        wanted = set(users)
        loaded = 0
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("user") in wanted:
                self.add(record)
                loaded += 1
        return loaded

    def retain(self, users: Iterable[str]) -> None:
        """Forget the history of users no longer configured."""
        keep = set(users)
        for user in [u for u in self._by_user if u not in keep]:
            del self._by_user[user]


class ServerView:
    """What a client session may ask of the server it is connected to.

    The daemon implements these for real; tests and replay use this class.
    """

    def __init__(self, users: Dict[str, UserConfig], engine: Optional[CallEngine] = None,
                 history: Optional[CallHistory] = None):
        self.users = users
        self.engine = engine
        self.call_history = history if history is not None else CallHistory()
        #: Attempts at actions per user, shared by all their sessions.
        self.action_rate = ActionRate()
        #: What the tests and replay use; DaemonView has the real ones.
        self.now = 0.0
        self.dial_context = DEFAULT_DIAL_CONTEXT
        self.actions_per_minute = ACTIONS_PER_MINUTE

    def engines(self) -> List[CallEngine]:
        return [self.engine] if self.engine is not None else []

    def calls(self, user: str) -> List[Dict[str, object]]:
        """The user's calls in progress (on every PBX), as event fields."""
        return [engine.call_fields(uc) for engine in self.engines()
                for uc in engine.active_calls(user)]

    def history(self, user: str, count: int) -> List[Dict[str, object]]:
        """The user's last ``count`` finished calls, newest last."""
        return self.call_history.last(user, count)

    def board(self, user: str) -> Optional[List[Dict[str, object]]]:
        """The office board as ``user`` may see it, one ``state`` item per
        colleague; None if their board is ``none`` (or there is no board)."""
        return None

    def login_blocked(self, peer_host: str) -> bool:
        """Whether logins from this address are blocked for now."""
        return False

    def account_wait(self, name: str, peer_host: str) -> float:
        """Seconds until a login as ``name`` from this address is heard (0: now)."""
        return 0.0

    # -- actions on calls (DIAL, HANGUP, TRANSFER) ------------------------------

    def clock(self) -> float:
        """Monotonic seconds, for the rate of actions."""
        return self.now

    def action_defaults(self) -> Tuple[str, int]:
        """[general]'s ``dial_context`` and ``actions_per_minute``."""
        return self.dial_context, self.actions_per_minute

    def pbx_engines(self) -> List[Tuple[str, CallEngine]]:
        """Each PBX's name and engine: where the calls of an action are."""
        return [(DEFAULT_PBX, engine) for engine in self.engines()]

    def act(self, verb: str, argument: str, session: "ClientSession") -> List[str]:
        """A DIAL, HANGUP or TRANSFER of a logged-in session (a ClientSession,
        or the page's WebActor: ``user``, ``tag``, ``reply_to``), checked
        (rate, permission, arguments, whose call) and sent: [] while its
        reply is owed (it goes to ``session.reply_to`` later), else the
        reply now.  A refusal raises ClientProtocolError; nothing is sent."""
        user = session.user
        assert user is not None
        dial_context, per_minute = self.action_defaults()
        limit = user.actions_per_minute or per_minute
        if not self.action_rate.allow(user.name, limit, self.clock()):
            log.debug("%s: %s refused: over %d actions a minute", session.tag, verb, limit)
            raise ClientProtocolError("429", "%s: more than %d actions a minute, try again in "
                                      "%d s" % (verb, limit, math.ceil(self.action_rate.wait(
                                          user.name, self.clock()))))
        try:
            if verb not in user.actions:
                raise ClientProtocolError("403", "%s: not allowed, the actions of %s do not "
                                          "include %s" % (verb, user.name, verb))
            request = ActionRequest.parse(verb, argument, user)
            plan = plan_action(request, self.pbx_engines(), dial_context)
            return self.send_plan(plan, session)
        except ClientProtocolError as e:
            log.info("%s: action %s %.60r refused: ERR %s %s", session.tag, verb, argument,
                     e.code, e.text)
            raise

    def send_plan(self, plan: ActionPlan, session: "ClientSession") -> List[str]:
        """Send the actions of a plan to its PBX (the daemon does)."""
        raise ClientProtocolError("503", "%s %s: no PBX connected here"
                                  % (plan.request.verb, plan.request.target()))


class ClientSession:
    """One desktop connection's protocol state, without the socket.

    ``handle_line`` takes one received line and returns the reply lines.
    Nothing but replies reaches the client before LOGIN succeeds; after it,
    ``wants(kind)`` says whether a notification of that kind is for it.
    ``closing`` asks the caller to close the connection after the replies,
    ``close_reason`` says why (for the log).
    """

    def __init__(self, peer_host: str, tag: str = "client"):
        self.peer_host = peer_host
        self.tag = tag
        self.user: Optional[UserConfig] = None
        self.fmt = "text"
        self.kinds: frozenset = frozenset()
        #: The kinds EVENTS asked for; None: all the account allows (also
        #: after a reload adds kinds to it).
        self.chosen_kinds: Optional[frozenset] = None
        self.closing = False
        self.close_reason = ""
        self.failed_logins = 0
        #: The name the last failed LOGIN gave (for the throttle).
        self.failed_as = ""
        self.errors = 0
        #: Who takes the replies that come later (DIAL, HANGUP, TRANSFER):
        #: the connection, with ``action_reply(line)`` and
        #: ``action_status(fields)``; None: nobody, they are only logged.
        self.reply_to: Optional[object] = None
        #: A reply is owed: the connection holds further commands until it
        #: is sent, so replies keep the order of the commands.
        self.awaiting = False

    @staticmethod
    def greeting() -> str:
        return "CTINOTIFY/%d ctinotify %s ready; LOGIN <user> <secret>" % (
            PROTOCOL_VERSION, __version__)

    def wants(self, kind: str) -> bool:
        return kind in self.kinds

    def handle_line(self, line: str, server: "ServerView") -> List[str]:
        words = line.strip().split(None, 1)
        if not words:
            return []  # an empty line: telnet users press Enter
        command = words[0].upper()
        argument = words[1] if len(words) > 1 else ""
        handler = {
            "LOGIN": self._login, "EVENTS": self._events, "FORMAT": self._format,
            "CALLS": self._calls, "HISTORY": self._history, "PING": self._ping,
            "BOARD": self._board,
            "HELP": self._help, "QUIT": self._quit,
            "DIAL": self._dial, "HANGUP": self._hangup, "TRANSFER": self._transfer,
        }.get(command)
        try:
            if handler is None:
                raise ClientProtocolError("400", "unknown command, try HELP")
            return handler(argument, server)
        except ClientProtocolError as e:
            if self.user is None and e.code in ("400", "403", "429"):
                self.errors += 1
                if self.errors >= MAX_CLIENT_ERRORS_BEFORE_LOGIN:
                    self.request_close("%d bad commands before login" % self.errors)
            return ["ERR %s %s" % (e.code, e.text)]

    def request_close(self, reason: str) -> None:
        """Close the connection after the replies; ``reason`` is for the log."""
        if not self.closing:
            self.closing = True
            self.close_reason = reason

    def _login(self, argument: str, server: ServerView) -> List[str]:
        if self.user is not None:
            raise ClientProtocolError("409", "already logged in as %s" % self.user.name)
        if server.login_blocked(self.peer_host):
            self.request_close("login while the address is blocked")
            raise ClientProtocolError("429", "too many failed logins from your address, "
                                      "try again later")
        name, _, secret = argument.partition(" ")
        wait = server.account_wait(name, self.peer_host)
        if wait > 0:
            # Unheard: the secret is not even compared.  Any name, known or
            # not, is answered the same.
            raise ClientProtocolError("429", "too many failed logins for this user, try again "
                                      "in %d s" % math.ceil(wait))
        account, why, reply = check_login(server.users, name, secret, self.peer_host)
        if account is None:
            self.failed_logins += 1
            self.failed_as = name
            log.warning("%s: login as %r refused: %s", self.tag, name[:64], why)
            if self.failed_logins >= MAX_LOGIN_ATTEMPTS_PER_CONNECTION:
                self.request_close("%d failed logins" % self.failed_logins)
            raise ClientProtocolError("401", reply)
        self.user = account
        self.kinds = frozenset(account.events)
        self.tag = "client %s@%s" % (account.name, self.tag.partition(" ")[2] or self.peer_host)
        log.info("%s: logged in", self.tag)
        return ["OK logged in as %s; events=%s" % (account.name, ",".join(account.events))]

    def _events(self, argument: str, server: ServerView) -> List[str]:
        if self.user is None:
            raise ClientProtocolError("403", "login first")
        wanted = [k.strip().lower() for k in re.split(r"[\s,]+", argument) if k.strip()]
        if not wanted:
            raise ClientProtocolError("400", "usage: EVENTS <kind>[,<kind>...] or EVENTS ALL")
        if wanted == ["all"]:
            self.kinds = frozenset(self.user.events)
            self.chosen_kinds = None
        else:
            chosen: Set[str] = set()
            for word in wanted:
                if not kinds_of(word):
                    raise ClientProtocolError("400", "unknown event kind %s" % quote_value(word[:40]))
                for kind in kinds_of(word):
                    if kind not in self.user.events:
                        raise ClientProtocolError("403", "event kind %s not allowed for %s"
                                                  % (kind, self.user.name))
                    chosen.add(kind)
            self.kinds = self.chosen_kinds = frozenset(chosen)
        return ["OK events=%s" % ",".join(k for k in EVENT_KINDS if k in self.kinds)]

    def account_changed(self, account: UserConfig) -> None:
        """A reload changed the account (devices, events) but kept its secret."""
        self.user = account
        allowed = frozenset(account.events)
        self.kinds = allowed if self.chosen_kinds is None else self.chosen_kinds & allowed

    def _format(self, argument: str, server: ServerView) -> List[str]:
        fmt = argument.strip().lower()
        if fmt not in ("text", "json"):
            raise ClientProtocolError("400", "usage: FORMAT text|json")
        self.fmt = fmt
        return ["OK format=%s" % fmt]

    def _calls(self, argument: str, server: ServerView) -> List[str]:
        """The user's calls in progress, so a desktop that (re)connects can
        draw them: one ``CALL`` line (or JSON object) each, then ``OK``."""
        if self.user is None:
            raise ClientProtocolError("403", "login first")
        items = server.calls(self.user.name)
        return [self.encode_item("CALL", fields) for fields in items] + \
            ["OK calls=%d" % len(items)]

    def encode_item(self, tag: str, fields: Dict[str, object]) -> str:
        """A list item in the session's format: ``TAG key=value ...`` or JSON."""
        if self.fmt == "json":
            return encode_json_line(fields)
        return encode_text_line(tag, {k: v for k, v in fields.items() if k != "event"})

    def _history(self, argument: str, server: ServerView) -> List[str]:
        if self.user is None:
            raise ClientProtocolError("403", "login first")
        text = argument.strip()
        count = HISTORY_DEFAULT_COUNT
        if text:
            if not re.match(r"^[0-9]{1,6}$", text) or not 1 <= int(text) <= HISTORY_PER_USER:
                raise ClientProtocolError("400", "usage: HISTORY [n], n from 1 to %d"
                                          % HISTORY_PER_USER)
            count = int(text)
        # Only ever this session's own user: the history of anyone else is
        # not reachable from here.
        records = server.history(self.user.name, count)
        lines = [encode_history(record, self.fmt) for record in records
                 if record.get("user") == self.user.name]
        return lines + ["OK history=%d" % len(lines)]

    def _board(self, argument: str, server: ServerView) -> List[str]:
        """The office board now: one ``STATE`` line (or JSON object) per
        colleague the user's ``board`` shows, then ``OK board=<n>``."""
        if self.user is None:
            raise ClientProtocolError("403", "login first")
        # Only ever this session's own user's view of it.
        items = server.board(self.user.name)
        if items is None:
            raise ClientProtocolError("403", "no board for %s" % self.user.name)
        return [self.encode_item("STATE", fields) for fields in items] + \
            ["OK board=%d" % len(items)]
    def _dial(self, argument: str, server: ServerView) -> List[str]:
        return self._act(CallAction.DIAL, argument, server)

    def _hangup(self, argument: str, server: ServerView) -> List[str]:
        return self._act(CallAction.HANGUP, argument, server)

    def _transfer(self, argument: str, server: ServerView) -> List[str]:
        return self._act(CallAction.TRANSFER, argument, server)

    def _act(self, verb: str, argument: str, server: ServerView) -> List[str]:
        """An action on calls: checked and sent by the server; its reply
        comes when Asterisk has answered (README, "Actions on calls")."""
        if self.user is None:
            raise ClientProtocolError("403", "login first")
        replies = server.act(verb, argument, self)
        self.awaiting = not replies and self.reply_to is not None
        return replies

    def _ping(self, argument: str, server: ServerView) -> List[str]:
        return ["OK PONG"]

    def _help(self, argument: str, server: ServerView) -> List[str]:
        return ["OK " + CLIENT_HELP]

    def _quit(self, argument: str, server: ServerView) -> List[str]:
        self.request_close("quit")
        return ["OK bye"]


# ---------------------------------------------------------------------------
# Office board (no I/O): one state per user, and what each viewer may see
# ---------------------------------------------------------------------------
#
# Who is free, ringing, on the phone or away, for the receptionist's board.
# Two sources, through the two seams: the engine's notifications (the calls
# each user is in, including a call to their number answered on their
# mobile: a notification follows the user, not the phone set) and Asterisk's
# own states of the phones (DeviceStateChange, hints, registrations).  Calls
# decide first, because they say more (with whom, since when, held or not);
# a phone's own state speaks only where no call of its user explains it: a
# phone off the hook for a call ctinotify does not see, do-not-disturb, a
# phone that is not registered.

#: The states of the board, strongest first: a user is in the strongest
#: state any of their calls or phones is in.  Why this order:
#:   talking > on_hold    a user talking while another call of theirs is
#:                        held is in a conversation (the held call waits);
#:   on_hold > ringing    a user with a call on hold is in the middle of it:
#:                        a call ringing meanwhile does not make them free;
#:   ringing > busy       do-not-disturb, and a queue rings the phone anyway;
#:   busy > away          a phone set to DND is there, just not taking calls;
#:   away > free          only when *every* phone Asterisk reported is gone:
#:                        one reachable phone makes its user free.
#: Calls come first because they say more than a phone's flag (with whom,
#: held or not): a user talking on their mobile whose desk phone is
#: unplugged is talking.  Asterisk sums up the devices of one hint in
#: another order (main/devicestate.c, ast_devstate_aggregate_add: RINGINUSE
#: > BUSY > INUSE > RINGING > ONHOLD > NOT_INUSE > UNAVAILABLE): BUSY over
#: INUSE there because chan_sip reports a phone at its call-limit, in a
#: call, as BUSY; the board speaks about people, and a call explains that.
BOARD_TALKING = "talking"
BOARD_ON_HOLD = "on_hold"
BOARD_RINGING = "ringing"
BOARD_BUSY = "busy"
BOARD_AWAY = "away"
BOARD_FREE = "free"
BOARD_STATES = (BOARD_TALKING, BOARD_ON_HOLD, BOARD_RINGING, BOARD_BUSY, BOARD_AWAY, BOARD_FREE)
_BOARD_RANK = {state: rank for rank, state in enumerate(BOARD_STATES)}
#: The states in words, for people (``watch --board``, the page).
BOARD_STATE_WORDS = {
    BOARD_TALKING: "on the phone", BOARD_ON_HOLD: "on hold", BOARD_RINGING: "ringing",
    BOARD_BUSY: "busy", BOARD_AWAY: "away", BOARD_FREE: "free",
}
#: A user's calls the board follows at once; more would be a broken
#: stream (the engine ends every call it announced), and the oldest goes.
MAX_BOARD_CALLS_PER_USER = 32
#: PJSIP contacts remembered per endpoint (a few phones share one AOR).
MAX_BOARD_CONTACTS_PER_DEVICE = 16

# -- what the calls say: one phase per user call, moved by notifications ---------

# XXX: between a queue's member timeout and its retry the engine keeps the
# member's call open without a word (CallEngine._hold_for_queue), so the
# board shows that member ringing through the pause as well.
_PH_RINGING = "ringing"    # rings one of the user's phones, or their mobile
_PH_DIALING = "dialing"    # the user calls out, not answered yet
_PH_TALKING = "talking"
_PH_HELD = "held"          # on hold, or waiting in a parking lot
_PH_OFF = "off"            # still the user's call for the engine, on none of
#                            their phones (timed out, forwarded to a colleague,
#                            answered elsewhere, parked by the user)
#: The board state of a call in each phase.  Calling out counts as being on
#: the phone: the phone is off the hook (Asterisk says INUSE) and the user
#: cannot take another call.
_PHASE_STATES = {_PH_RINGING: BOARD_RINGING, _PH_DIALING: BOARD_TALKING,
                 _PH_TALKING: BOARD_TALKING, _PH_HELD: BOARD_ON_HOLD, _PH_OFF: None}
#: move -> {phase before: phase after}.  A move is a notification kind,
#: refined where one kind means two things (``_board_move``); the key None
#: is a call the board has not seen yet (adopted silently at the engine's
#: resync, or older than the board): a move without a None entry ignores
#: such a call, one with it starts following it.  A phase not listed stays.
_CALL_MOVES: Dict[str, Dict[Optional[str], str]] = {
    "incoming": {None: _PH_RINGING},
    "outgoing": {None: _PH_DIALING},
    "answered": {None: _PH_TALKING, _PH_RINGING: _PH_TALKING, _PH_DIALING: _PH_TALKING,
                 _PH_OFF: _PH_TALKING},
    "answered_elsewhere": {_PH_RINGING: _PH_OFF},
    "timeout": {_PH_RINGING: _PH_OFF},
    "busy": {_PH_RINGING: _PH_OFF, _PH_DIALING: _PH_OFF},
    "forwarded_away": {_PH_RINGING: _PH_OFF},
    "forwarded_out": {_PH_OFF: _PH_RINGING},
    "hold": {None: _PH_HELD, _PH_TALKING: _PH_HELD, _PH_DIALING: _PH_HELD},
    "unhold": {None: _PH_TALKING, _PH_HELD: _PH_TALKING},
    "parked": {None: _PH_HELD, _PH_TALKING: _PH_HELD},
    "parked_away": {_PH_TALKING: _PH_OFF, _PH_HELD: _PH_OFF},
    "retrieved": {None: _PH_TALKING, _PH_RINGING: _PH_TALKING, _PH_HELD: _PH_TALKING,
                  _PH_OFF: _PH_TALKING},
    "transferred_in": {None: _PH_TALKING},
    "conference": {None: _PH_TALKING, _PH_RINGING: _PH_TALKING, _PH_DIALING: _PH_TALKING},
    # A CALL item (what the CALLS command shows), fed for the calls the
    # engine adopted silently at its resync: the board starts following them.
    "seen_ringing": {None: _PH_RINGING},
    "seen_dialing": {None: _PH_DIALING},
    "seen_up": {None: _PH_TALKING},
}


def _party(fields: Dict[str, object], key: str) -> Party:
    value = fields.get(key)
    if not isinstance(value, dict):
        return NOBODY
    return Party(str(value.get("num") or ""), str(value.get("name") or ""))


def _me_and_peer(fields: Dict[str, object]) -> Tuple[Party, Party]:
    """(the user's side, the other side) of a notification, by its role."""
    if fields.get("role") == "caller":
        return _party(fields, "from"), _party(fields, "to")
    return _party(fields, "to"), _party(fields, "from")


class BoardCall:
    """One call of one user, as the board follows it."""

    __slots__ = ("call_id", "pbx", "tagged", "direction", "phase", "peer", "devices",
                 "forwarded_out")

    def __init__(self, call_id: str, pbx: str, direction: str, tagged: bool = False):
        self.call_id = call_id
        self.pbx = pbx
        #: Its events carry ``pbx`` (ctinotify watches several): so does its entry.
        self.tagged = tagged
        #: "in" or "out", as in the call log.
        self.direction = direction
        self.phase: Optional[str] = None
        #: The other party, as the user's own events name it.
        self.peer = NOBODY
        #: The user's phones its events named (none: it reached their number
        #: and rang elsewhere, e.g. their mobile).
        self.devices: Set[str] = set()
        #: Told ``divert`` to a number outside the office: an outside phone
        #: answering is the user (their mobile), not a colleague.
        self.forwarded_out = False


# -- what the phones say: device states, hints, registrations ------------------

#: DeviceStateChange ``State`` (main/devicestate.c, ast_devstate_str) ->
#: (what the phone is doing, whether it is reachable).  None: nothing said.
#: RINGINUSE is a second call ringing at a phone in use: on the phone.
_DEVICE_STATES: Dict[str, Tuple[Optional[str], Optional[bool]]] = {
    "NOT_INUSE": (None, True), "INUSE": (BOARD_TALKING, True), "BUSY": (BOARD_BUSY, True),
    "INVALID": (None, False), "UNAVAILABLE": (None, False), "RINGING": (BOARD_RINGING, True),
    "RINGINUSE": (BOARD_TALKING, True), "ONHOLD": (BOARD_ON_HOLD, True),
    "UNKNOWN": (None, None),
}
#: ExtensionStatus ``Status`` of a hint (include/asterisk/pbx.h,
#: ast_extension_states): the same, for all the devices of the hint.  A
#: hint with a Custom:DND device (FreePBX) is Busy while DND is on.
_HINT_STATES: Dict[int, Tuple[Optional[str], Optional[bool]]] = {
    0: (None, True), 1: (BOARD_TALKING, True), 2: (BOARD_BUSY, True), 4: (None, False),
    8: (BOARD_RINGING, True), 9: (BOARD_TALKING, True), 16: (BOARD_ON_HOLD, True),
    17: (BOARD_TALKING, True),
}
#: ExtensionStatus -1 and -2: the hint or the extension left the dialplan.
_HINT_REMOVED = (-1, -2)
#: ContactStatus ``ContactStatus`` (res_pjsip, ast_sip_get_contact_status_label):
#: whether the contact can take calls.  Unknown: registered, not qualified yet.
_CONTACT_UP = {"created": True, "reachable": True, "nonqualified": True,
               "unqualified": True, "updated": True, "unknown": True,
               "removed": False, "unreachable": False}
#: PeerStatus ``PeerStatus`` (chan_sip, chan_iax2): one registration per peer.
_PEER_UP = {"registered": True, "reachable": True, "lagged": True,
            "unregistered": False, "unreachable": False, "rejected": False}
#: States of a phone that a call of its user explains, and that the hangup
#: of that call makes old news (Asterisk reports the phone idle a moment
#: after the Hangup, e.g. tests/traces/a_inbound_answered.ami).
_CALL_ACTIVITIES = frozenset((BOARD_TALKING, BOARD_ON_HOLD, BOARD_RINGING))


class BoardSource:
    """One phone (``("dev", pbx, device)``) or hint (``("hint", pbx, exten,
    context)``) of a user, as Asterisk last reported it."""

    __slots__ = ("activity", "available", "has_devstate", "contacts")

    def __init__(self) -> None:
        #: talking, on_hold, ringing or busy; None: idle or not known.
        self.activity: Optional[str] = None
        #: Reachable (True), not (False), not known (None).
        self.available: Optional[bool] = None
        #: Asterisk has reported a device or hint state for it.
        self.has_devstate = False
        #: PJSIP contact URI -> up, since the link came up.
        self.contacts: Dict[str, bool] = {}

    def device_state(self, activity: Optional[str], available: Optional[bool]) -> None:
        self.activity = activity
        if available is not None:
            self.available = available
            self.has_devstate = True

    def registration(self, up: bool) -> None:
        """chan_sip or IAX2 peer status: the peer's one registration."""
        self.available = up

    def contact(self, uri: str, up: bool) -> None:
        """A PJSIP contact of the endpoint came or went."""
        self.contacts.pop(uri, None)
        self.contacts[uri] = up
        while len(self.contacts) > MAX_BOARD_CONTACTS_PER_DEVICE:
            del self.contacts[next(iter(self.contacts))]
        if up:
            self.available = True  # registration back: before its DeviceStateChange
        elif not self.has_devstate and not any(self.contacts.values()):
            # Without device states, contacts are all there is.  With them, a
            # contact going is no verdict: another one, registered before we
            # connected and never reported since, may still be there, and
            # Asterisk sends UNAVAILABLE itself when the endpoint goes offline.
            self.available = False


# -- one user ---------------------------------------------------------------------


class BoardEntry:
    """One user's line on the board at one moment (immutable).

    ``peer``, ``direction``, ``call`` and ``pbx`` are the details (the other
    party of the call that makes the state; only for ringing, talking and
    on hold); everything else is for every viewer.
    """

    __slots__ = ("user", "name", "numbers", "state", "since", "peer", "direction", "call",
                 "pbx", "_fields", "_lines")

    def __init__(self, user: str, name: str, numbers: str, state: str, since: float,
                 call: Optional[BoardCall] = None):
        self.user = user
        self.name = name
        #: The user's numbers, comma-separated (numbers hold no comma).
        self.numbers = numbers
        self.state = state
        #: When the state began (epoch seconds).
        self.since = since
        self.peer = call.peer if call is not None else NOBODY
        self.direction = call.direction if call is not None else ""
        self.call = call.call_id if call is not None else ""
        self.pbx = call.pbx if call is not None and call.tagged else ""
        self._fields: Dict[bool, Dict[str, object]] = {}
        self._lines: Dict[Tuple[bool, str], bytes] = {}

    def same_details(self, other: "BoardEntry") -> bool:
        return (self.peer, self.direction, self.call, self.pbx) == \
            (other.peer, other.direction, other.call, other.pbx)

    def fields(self, details: bool) -> Dict[str, object]:
        """The ``state`` event: the same dict for every viewer with the same
        ``details`` (callers must not change it)."""
        fields = self._fields.get(details)
        if fields is None:
            fields = {"event": "state", "user": self.user, "name": self.name,
                      "numbers": self.numbers, "state": self.state,
                      "since": iso_time(self.since)}
            if details and self.call:
                fields["with"] = self.peer.as_dict()
                fields["direction"] = self.direction
                fields["call"] = self.call
                if self.pbx:
                    fields["pbx"] = self.pbx
            self._fields[details] = fields
        return fields

    def event_bytes(self, details: bool, fmt: str) -> bytes:
        """The pushed line (``EVENT state ...`` or JSON), encoded once per
        kind of viewer however many watch."""
        line = self._lines.get((details, fmt))
        if line is None:
            line = self._lines[(details, fmt)] = encode_notification(self.fields(details), fmt)
        return line

    def __repr__(self) -> str:
        return "<BoardEntry %s %s %s>" % (self.user, self.state, self.call)


#: What changed in a BoardChange, strongest first: a viewer without details
#: sees only "state" and "name" changes.
BOARD_CHANGE_STATE = "state"
BOARD_CHANGE_NAME = "name"
BOARD_CHANGE_DETAILS = "details"


class BoardChange:
    """A user's board entry changed: ``entry`` is the new one, ``kind``
    says what changed (state, name, or only the details)."""

    __slots__ = ("entry", "kind")

    def __init__(self, entry: BoardEntry, kind: str):
        self.entry = entry
        self.kind = kind

    @property
    def user(self) -> str:
        return self.entry.user

    def __repr__(self) -> str:
        return "<BoardChange %s %s %s>" % (self.kind, self.entry.user, self.entry.state)


def _plain_number(qualified: str) -> str:
    """``branch:100`` -> ``100``: the number as people dial it."""
    return qualified.rpartition(":")[2]


class BoardUser:
    """One user's calls and phones, and the entry last published."""

    __slots__ = ("name", "devices", "numbers", "own_ids", "fullname", "learned_name",
                 "calls", "sources", "entry")

    def __init__(self, config: UserConfig, fullname: str, now: float):
        self.name = config.name
        #: (pbx qualifier or "", device) of each configured phone.
        self.devices = frozenset(split_device(d) for d in config.devices)
        numbers: List[str] = []
        for qualified, _context in config.extensions:
            number = _plain_number(qualified)
            if number not in numbers:
                numbers.append(number)
        self.numbers = ",".join(numbers)
        #: The numbers the user's own phones may call themselves: their
        #: extensions and their phones' names (PJSIP/100 -> 100).
        self.own_ids = frozenset(numbers) | {d.partition("/")[2] for _, d in self.devices}
        self.fullname = fullname
        self.learned_name = ""
        #: (pbx, call id, direction) -> the call, oldest first.
        self.calls: Dict[Tuple[str, str, str], BoardCall] = {}
        self.sources: Dict[tuple, BoardSource] = {}
        self.entry = BoardEntry(self.name, self.display_name(), self.numbers, BOARD_FREE, now)

    def has_device(self, pbx: str, device: str) -> bool:
        return ("", device) in self.devices or (pbx, device) in self.devices

    def display_name(self) -> str:
        return self.fullname or self.learned_name or self.name

    def learn_name(self, fields: Dict[str, object], pbx: str) -> None:
        """The caller ID name of the user's own phone, from an event of a
        call on it.  Never a caller's name: the phone must be the user's,
        the number one of their own, and a name the other side shows too (a
        PBX that copies the caller's ID onto the called phone) proves nothing."""
        device = fields.get("device")
        if not device or not self.has_device(pbx, str(device)):
            return
        me, peer = _me_and_peer(fields)
        if me.name and me.num in self.own_ids and me.name != peer.name:
            self.learned_name = me.name

    def state_now(self) -> Tuple[str, Optional[BoardCall]]:
        """The user's state from what is known now, and the call it is about."""
        best, about = len(BOARD_STATES), None
        explained = set()
        for call in self.calls.values():
            explained.update(("dev", call.pbx, device) for device in call.devices)
            state = _PHASE_STATES[call.phase] if call.phase else None
            if state is not None and _BOARD_RANK[state] <= best:  # ties: the latest call
                best, about = _BOARD_RANK[state], call
        up = down = False
        for key, source in self.sources.items():
            activity = source.activity
            # A phone's call state speaks where no call explains it (a hint
            # sums up all the user's phones: any call of theirs explains it);
            # busy is the phone's own flag, and a call outranks it anyway.
            if activity in _CALL_ACTIVITIES and \
                    (key in explained or (key[0] == "hint" and self.calls)):
                activity = None
            if activity is not None and _BOARD_RANK[activity] < best:
                best, about = _BOARD_RANK[activity], None
            if source.available:
                up = True
            elif source.available is False:
                down = True
        if best < len(BOARD_STATES):
            return BOARD_STATES[best], about
        return (BOARD_AWAY if down and not up else BOARD_FREE), None

    def forget_call(self, call: BoardCall) -> None:
        """The call ended: what its phones said about it is old news until
        Asterisk reports them again."""
        self.calls.pop((call.pbx, call.call_id, call.direction), None)
        for key, source in self.sources.items():
            if source.activity in _CALL_ACTIVITIES and (key[0] == "hint" or (
                    key[1] == call.pbx and key[2] in call.devices)):
                source.activity = None


# -- the board ----------------------------------------------------------------------

#: The AMI events the board reads: what the link hands it, and nothing else
#: (they are none of the engine's).
BOARD_AMI_EVENTS = frozenset((
    "DeviceStateChange", "DeviceStateListComplete", "ExtensionStatus",
    "ExtensionStateListComplete", "ContactStatus", "PeerStatus",
))
#: The AMI list actions of the board's resync after each login, and the
#: event that ends each list.
BOARD_LIST_ACTIONS = (("DeviceStateList", "DeviceStateListComplete"),
                      ("ExtensionStateList", "ExtensionStateListComplete"))
#: What the board needs of Asterisk (manager.conf of the AMI user, and
#: modules), for ``check`` and the log.  DeviceStateList and the
#: DeviceStateChange events both come from res_manager_devicestate.so.
BOARD_AMI_NEEDS = (
    "the office board needs, for the AMI user in manager.conf:",
    "  read = call (DeviceStateChange, ExtensionStatus) and system (ContactStatus, PeerStatus)",
    "  write = reporting (DeviceStateList, ExtensionStateList)",
    "and res_manager_devicestate.so loaded (DeviceStateList, DeviceStateChange)",
)


class Board:
    """Every configured user's state: ``free``, ``ringing``, ``talking``,
    ``on_hold``, ``busy`` or ``away``, since when, and with whom.

    Feed it what the engine tells users (``on_notifications``) and every
    AMI message (``on_ami``; those it has no handler for cost one lookup);
    after each login to a PBX call ``begin_resync`` and send DeviceStateList
    and ExtensionStateList.  Each feeding returns the BoardChanges it caused:
    at most one per user, with the state it ends in (what a batch does in
    one instant is no change to show), in the order the users were touched.
    It reads no clock and does no I/O; who may see what is BoardScope's.
    """

    def __init__(self, users: Iterable[UserConfig], now: float = 0.0,
                 fullnames: Optional[Dict[str, str]] = None):
        self.users: Dict[str, BoardUser] = {}
        #: device -> (pbx qualifier, user) of everyone with that phone.
        self._by_device: Dict[str, List[Tuple[str, BoardUser]]] = {}
        #: number -> (pbx qualifier, context, user) of everyone with it.
        self._by_number: Dict[str, List[Tuple[str, str, BoardUser]]] = {}
        self._add_users(users, now, fullnames or {})
        #: (pbx, "dev" or "hint") -> the sources a resync list has named so
        #: far; only while that list runs.
        self._resync: Dict[Tuple[str, str], Set[tuple]] = {}
        self._touched: Dict[str, BoardUser] = {}
        self._ami_handlers = {
            "DeviceStateChange": self.on_devicestatechange,
            "DeviceStateListComplete": self.on_devicestatelistcomplete,
            "ExtensionStatus": self.on_extensionstatus,
            "ExtensionStateListComplete": self.on_extensionstatelistcomplete,
            "ContactStatus": self.on_contactstatus,
            "PeerStatus": self.on_peerstatus,
        }

    def _add_users(self, users: Iterable[UserConfig], now: float,
                   fullnames: Dict[str, str]) -> None:
        """The users and the indexes from their phones and numbers to them
        (``fullnames`` before each user's own ``fullname``)."""
        self.users = {}
        self._by_device = {}
        self._by_number = {}
        for config in users:
            user = BoardUser(config, fullnames.get(config.name, config.fullname), now)
            self.users[user.name] = user
            for on, device in user.devices:
                self._by_device.setdefault(device, []).append((on, user))
            for qualified, context in config.extensions:
                on, _, number = qualified.rpartition(":")
                self._by_number.setdefault(number, []).append((on, context, user))

    def reconfigure(self, users: Iterable[UserConfig], now: float) -> List[BoardChange]:
        """A reload: the users as configured now.  A user kept keeps their
        calls, what Asterisk said of the phones and numbers still theirs,
        and their line (``since`` too); a new user starts ``free`` and is a
        change; a removed user is gone, and nothing more is said of them.
        A changed ``fullname`` is a name change.  New phones are unknown
        until Asterisk reports them: the caller asks for the lists again."""
        old = self.users
        self._add_users(users, now, {})
        changes = []
        for user in self.users.values():
            before = old.get(user.name)
            if before is None:
                changes.append(BoardChange(user.entry, BOARD_CHANGE_STATE))
                continue
            user.calls = before.calls
            if user.devices == before.devices:
                user.learned_name = before.learned_name
            user.sources = {key: source for key, source in before.sources.items()
                            if any(owner is user for owner, _ in self._sources_of(*key))}
            user.entry = before.entry
            self._touched[user.name] = user
        return changes + self._publish(now)

    def entries(self) -> List[BoardEntry]:
        """The board now, in the order of the configuration."""
        return [user.entry for user in self.users.values()]

    # -- feeding: the engine's notifications --------------------------------------

    def on_notifications(self, notes: Iterable[Notification], now: float,
                         pbx: str = DEFAULT_PBX) -> List[BoardChange]:
        """``pbx``: the PBX of the engine that made them, for notifications
        without a ``pbx`` field (a single PBX).  Besides the engine's own
        kinds it takes ``call`` items (``CallEngine.call_fields``, what CALLS
        shows): after the engine's resync, the calls it adopted without a
        word (already answered when we connected) are news to the board."""
        for note in notes:
            user = self.users.get(note.user)
            if user is None or note.kind == "queue":
                continue  # queue events are about the queue, not a call of the user's
            fields = note.fields
            on = str(fields.get("pbx") or pbx)
            user.learn_name(fields, on)
            self._follow_call(user, note.kind, fields, on)
            self._touched[user.name] = user
        return self._publish(now)

    def _follow_call(self, user: BoardUser, kind: str, fields: Dict[str, object],
                     pbx: str) -> None:
        direction = "out" if fields.get("role") == "caller" else "in"
        key = (pbx, str(fields.get("call", "")), direction)
        call = user.calls.get(key)
        if kind == "hangup":
            if call is not None:
                user.forget_call(call)
            return
        move = self._board_move(user, kind, fields, call, pbx)
        after = _CALL_MOVES.get(move, {}).get(call.phase if call is not None else None) \
            if move else None
        if call is None:
            if after is None:
                return  # about a call the board does not follow, and no reason to
            call = user.calls[key] = BoardCall(key[1], pbx, direction, "pbx" in fields)
            while len(user.calls) > MAX_BOARD_CALLS_PER_USER:
                del user.calls[next(iter(user.calls))]
        if after is not None:
            call.phase = after
        if move == "forwarded_out":
            call.forwarded_out = True
        call.peer = _me_and_peer(fields)[1]
        if fields.get("device"):
            call.devices.add(str(fields["device"]))

    def _board_move(self, user: BoardUser, kind: str, fields: Dict[str, object],
                    call: Optional[BoardCall], pbx: str) -> Optional[str]:
        """The notification kind, refined where one kind means two things."""
        if kind == "pickup":
            return "answered" if self._answered_by_user(user, fields, call, pbx) \
                else "answered_elsewhere"
        if kind == "divert":
            if fields.get("direction") != "to":
                return None  # forwarded *to* the user: it rings here as before
            return "forwarded_out" if fields.get("external") is True else "forwarded_away"
        if kind == "park":
            # The engine tells the users who parked the call (it leaves their
            # phone); a user parked by someone else waits in the lot.
            return "parked_away" if _party(fields, "by") == _me_and_peer(fields)[0] \
                else "parked"
        if kind == "unpark":
            return "retrieved" if fields.get("result") == "retrieved" else None
        if kind == "transfer":
            return "transferred_in" if fields.get("direction") in ("from", "moved") else None
        if kind == "call":
            if fields.get("state") == "up":
                return "seen_up"
            return "seen_dialing" if fields.get("role") == "caller" else "seen_ringing"
        return kind

    def _answered_by_user(self, user: BoardUser, fields: Dict[str, object],
                          call: Optional[BoardCall], pbx: str) -> bool:
        """Whether a ``pickup`` is this user answering: always for their own
        outgoing call; for a call to them, when one of their phones answered,
        or an outside phone after a forward outside (their mobile)."""
        if fields.get("role") == "caller":
            return True
        answered_by = fields.get("answered_by")
        device = str(answered_by.get("device") or "") if isinstance(answered_by, dict) else ""
        if user.has_device(pbx, device):
            return True
        return call is not None and call.forwarded_out and not any(
            on in ("", pbx) for on, _ in self._by_device.get(device, ()))

    # -- feeding: Asterisk's device, hint and registration states ------------------

    def on_ami(self, msg: AmiMessage, pbx: str, now: float) -> List[BoardChange]:
        """One AMI message from PBX ``pbx``, live or part of a resync list."""
        handler = self._ami_handlers.get(msg.get("Event"))  # type: ignore[arg-type]
        if handler is None:
            return []
        handler(msg, pbx)
        return self._publish(now)

    def begin_resync(self, pbx: str) -> None:
        """The link to ``pbx`` is (back) up and DeviceStateList and
        ExtensionStateList are on their way: when a list completes, what it
        did not name is no longer known.  A list that never completes (an
        Asterisk without it, a link lost again) forgets nothing."""
        self._resync[(pbx, "dev")] = set()
        self._resync[(pbx, "hint")] = set()

    def _sources_of(self, kind: str, pbx: str, name: str, context: str = "") \
            -> Iterable[Tuple[BoardUser, tuple]]:
        if kind == "dev":
            for on, user in self._by_device.get(name, ()):
                if on in ("", pbx):
                    yield user, ("dev", pbx, name)
        else:
            for on, ctx, user in self._by_number.get(name, ()):
                if on in ("", pbx) and (not ctx or ctx == context):
                    yield user, ("hint", pbx, name, context)

    def _report(self, kind: str, pbx: str, name: str, context: str = "") \
            -> List[BoardSource]:
        """The sources Asterisk just reported, created as needed, their
        users touched and the resync told they were named."""
        found = []
        seen = self._resync.get((pbx, kind))
        for user, key in self._sources_of(kind, pbx, name, context):
            source = user.sources.get(key)
            if source is None:
                source = user.sources[key] = BoardSource()
            if seen is not None:
                seen.add(key)
            self._touched[user.name] = user
            found.append(source)
        return found

    def on_devicestatechange(self, msg: AmiMessage, pbx: str) -> None:
        tech, sep, resource = (msg.get("Device") or "").partition("/")
        device = _TECH_ALIASES.get(tech.lower(), tech) + sep + resource
        activity, available = _DEVICE_STATES.get((msg.get("State") or "").upper(),
                                                 (None, None))
        for source in self._report("dev", pbx, device):
            source.device_state(activity, available)

    def on_extensionstatus(self, msg: AmiMessage, pbx: str) -> None:
        exten, context = msg.get("Exten") or "", msg.get("Context") or ""
        try:
            status = int(msg.get("Status") or "")
        except ValueError:
            return
        if status in _HINT_REMOVED:
            for user, key in self._sources_of("hint", pbx, exten, context):
                if user.sources.pop(key, None) is not None:
                    self._touched[user.name] = user
            return
        activity, available = _HINT_STATES.get(status, (None, None))
        for source in self._report("hint", pbx, exten, context):
            source.device_state(activity, available)

    def on_contactstatus(self, msg: AmiMessage, pbx: str) -> None:
        up = _CONTACT_UP.get((msg.get("ContactStatus") or "").lower())
        endpoint = msg.get("EndpointName") or ""
        if up is None or not endpoint:
            return
        for source in self._report("dev", pbx, "PJSIP/" + endpoint):
            source.contact(msg.get("URI") or "", up)

    def on_peerstatus(self, msg: AmiMessage, pbx: str) -> None:
        up = _PEER_UP.get((msg.get("PeerStatus") or "").lower())
        tech, sep, resource = (msg.get("Peer") or "").partition("/")
        if up is None or not sep:
            return
        for source in self._report("dev", pbx, _TECH_ALIASES.get(tech.lower(), tech) + "/"
                                   + resource):
            source.registration(up)

    def on_devicestatelistcomplete(self, msg: AmiMessage, pbx: str) -> None:
        self._end_list(pbx, "dev")

    def on_extensionstatelistcomplete(self, msg: AmiMessage, pbx: str) -> None:
        self._end_list(pbx, "hint")

    def _end_list(self, pbx: str, kind: str) -> None:
        seen = self._resync.pop((pbx, kind), None)
        if seen is None:
            return  # a list nobody asked for since the last login: no verdict
        for user in self.users.values():
            gone = [key for key in user.sources
                    if key[0] == kind and key[1] == pbx and key not in seen]
            for key in gone:
                del user.sources[key]
            if gone:
                self._touched[user.name] = user

    # -- changes ---------------------------------------------------------------------

    def _publish(self, now: float) -> List[BoardChange]:
        changes: List[BoardChange] = []
        for user in self._touched.values():
            state, call = user.state_now()
            old = user.entry
            name = user.display_name()
            since = now if state != old.state else old.since
            entry = BoardEntry(user.name, name, user.numbers, state, since, call)
            if state != old.state:
                kind = BOARD_CHANGE_STATE
            elif name != old.name:
                kind = BOARD_CHANGE_NAME
            elif not entry.same_details(old):
                kind = BOARD_CHANGE_DETAILS
            else:
                continue
            user.entry = entry
            changes.append(BoardChange(entry, kind))
        self._touched.clear()
        return changes


# -- who sees what -------------------------------------------------------------------


class BoardScope:
    """What one viewer may receive of the board: the colleagues of their
    ``board`` setting (``users``: None for all, empty for none) and, with
    ``board_details``, the other party and call id of their calls.

    A viewer whose board is not ``none`` sees their own line too: it is
    their own phone, and a receptionist looks for herself on the board as
    well.  Their own details follow ``board_details`` like everyone's.
    """

    __slots__ = ("viewer", "users", "details")

    def __init__(self, viewer: str, users: Optional[Iterable[str]], details: bool = False):
        self.viewer = viewer
        self.users = None if users is None else frozenset(users)
        self.details = details

    @property
    def is_empty(self) -> bool:
        """``board = none``: nothing of the board, ever."""
        return self.users is not None and not self.users

    def sees(self, user: str) -> bool:
        if self.users is None:
            return True
        return bool(self.users) and (user in self.users or user == self.viewer)


def board_scopes(users: Dict[str, UserConfig]) -> Dict[str, BoardScope]:
    """The board's viewers and what each may see: every user whose
    ``board`` is not ``none`` (the others are no viewers at all)."""
    return {user.name: BoardScope(user.name, user.board, user.board_details)
            for user in users.values() if user.board is None or user.board}


def board_views_changed(old_scopes: Dict[str, BoardScope], old_users: Iterable[str],
                        new_scopes: Dict[str, BoardScope], new_users: Iterable[str]) -> Set[str]:
    """The viewers whose board a reload changed: other colleagues on it,
    details or none, a board gained or lost.  Their clients are told to
    ask for the board again (a colleague they no longer see must leave
    their screen: no event will say so)."""
    def view(scopes: Dict[str, BoardScope], users: List[str], viewer: str) -> tuple:
        scope = scopes.get(viewer)
        if scope is None:
            return ()
        return (scope.details,) + tuple(user for user in users if scope.sees(user))
    before, after = list(old_users), list(new_users)
    return {viewer for viewer in set(old_scopes) | set(new_scopes)
            if view(old_scopes, before, viewer) != view(new_scopes, after, viewer)}


def view_entry(entry: BoardEntry, scope: BoardScope) -> Optional[Dict[str, object]]:
    """The ``state`` fields of one entry for this viewer, or None if the
    viewer may not see that user."""
    return entry.fields(scope.details) if scope.sees(entry.user) else None


def view_board(board: Board, scope: BoardScope) -> List[Dict[str, object]]:
    """What the BOARD command shows this viewer, in configuration order."""
    return [entry.fields(scope.details) for entry in board.entries() if scope.sees(entry.user)]


def view_change(change: BoardChange, scope: BoardScope) -> Optional[Dict[str, object]]:
    """The ``state`` event this change is for this viewer, or None: a
    colleague outside their board, or only details changed and they see none."""
    if not scope.sees(change.entry.user):
        return None
    if change.kind == BOARD_CHANGE_DETAILS and not scope.details:
        return None
    return change.entry.fields(scope.details)


def change_bytes(change: BoardChange, scope: BoardScope, fmt: str) -> Optional[bytes]:
    """``view_change`` encoded as this viewer's line, or None.  The line is
    encoded once per change and kind of viewer, however many watch."""
    if view_change(change, scope) is None:
        return None
    return change.entry.event_bytes(scope.details, fmt)


def encode_board_item(fields: Dict[str, object], fmt: str) -> str:
    """One line of a BOARD reply: ``STATE user=bob ...`` or the JSON object
    of the ``state`` event."""
    if fmt == "json":
        return encode_json_line(fields)
    return encode_text_line("STATE", {k: v for k, v in fields.items() if k != "event"})


def board_reply(board: Board, scope: BoardScope, fmt: str) -> List[str]:
    """The BOARD command's reply lines: one per visible user, then
    ``OK board=<n>``."""
    lines = [encode_board_item(fields, fmt) for fields in view_board(board, scope)]
    return lines + ["OK board=%d" % len(lines)]


# ---------------------------------------------------------------------------
# HTTP and the web client protocol (no I/O)
# ---------------------------------------------------------------------------

#: Request limits, each with the status it answers: the request line (414),
#: the header lines together and their count (431), a body (413: the login
#: form is the only body, and it is tiny).
MAX_HTTP_REQUEST_LINE_BYTES = 8 * 1024
MAX_HTTP_HEADER_BYTES = 16 * 1024
MAX_HTTP_HEADERS = 64
MAX_HTTP_BODY_BYTES = 8 * 1024
#: Received bytes a connection may have waiting (a pipelined request behind
#: one whose reply is held back): one whole request at the limits.
MAX_HTTP_PENDING_INPUT_BYTES = (MAX_HTTP_REQUEST_LINE_BYTES + MAX_HTTP_HEADER_BYTES
                                + MAX_HTTP_BODY_BYTES)
#: Server-Sent Events: a comment line this often keeps proxies and NATs
#: from closing an idle stream; a browser waits ``retry`` before reconnecting.
SSE_HEARTBEAT_S = 25.0
SSE_RETRY_MS = 3000
#: The notification format of an event stream, beside ``text`` and ``json``:
#: what the hub encodes once per notification for every stream of a user.
SSE_FORMAT = "sse"
#: Events kept per user for ``Last-Event-ID`` (a laptop that lost Wi-Fi for
#: a while): at most this many, and at most this many bytes of frames.
WEB_EVENT_BUFFER_EVENTS = 100
WEB_EVENT_BUFFER_BYTES = 64 * 1024
#: ... and at most this many bytes for all users together (the oldest go
#: first, whoever's they are): events are kept for every configured user,
#: so without it 10,000 busy users could hold 640 MiB.
WEB_EVENT_BUFFER_TOTAL_BYTES = 32 * 1024 * 1024
#: There are at most this many web sessions, and per user (the oldest of
#: the user's ends first).
MAX_WEB_SESSIONS = 10000
MAX_WEB_SESSIONS_PER_USER = 32
#: Random bytes in a session token and an anti-CSRF token.
WEB_TOKEN_BYTES = 32
WEB_SESSION_COOKIE = "ctinotify_session"
#: ``GET /history?n=``: the default count (the page's journal).
WEB_HISTORY_DEFAULT_COUNT = 50

HTTP_REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    417: "Expectation Failed", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
#: Methods of RFC 9110 (and PATCH): the router answers 405 to those a path
#: does not take; any other token is 501, as the RFC asks.
HTTP_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT",
                                "OPTIONS", "TRACE", "PATCH"))


class HttpProtocolError(CtiError):
    """A browser (or anything on the web port) sent what is not a request
    we take: answer ``status`` with ``text`` and close."""

    def __init__(self, status: int, text: str):
        super().__init__("%d %s" % (status, text))
        self.status = status
        self.text = text


class HttpRequest:
    """One parsed request.  ``headers`` are ``(lower-case name, value)``
    pairs in order, values decoded as Latin-1 (RFC 9110 obs-text)."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body",
                 "keep_alive")

    def __init__(self, method: str, target: str, version: str,
                 headers: List[Tuple[str, str]], body: bytes = b"", keep_alive: bool = True):
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        #: The path, still percent-encoded (every route is plain ASCII).
        self.path = path
        self.query = query
        #: ``HTTP/1.0`` or ``HTTP/1.1``.
        self.version = version
        self.headers = headers
        self.body = body
        #: The connection stays open after the response.
        self.keep_alive = keep_alive

    def header(self, name: str) -> Optional[str]:
        """The first value of a header, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> List[str]:
        return [value for key, value in self.headers if key == name]

    def params(self) -> Dict[str, str]:
        """The query string's parameters (the first of a repeated one);
        HttpProtocolError(400) for more than 32 of them."""
        try:
            pairs = urllib.parse.parse_qsl(self.query, keep_blank_values=True,
                                           max_num_fields=32)
        except ValueError:
            raise HttpProtocolError(400, "too many query parameters")
        found: Dict[str, str] = {}
        for key, value in pairs:
            found.setdefault(key, value)
        return found


class HttpContinue:
    """The head of a request with ``Expect: 100-continue`` is in and its
    body is not: the client waits for ``HTTP_CONTINUE_BYTES`` before sending it."""

    __slots__ = ()


HTTP_CONTINUE_BYTES = b"HTTP/1.1 100 Continue\r\n\r\n"
_HTTP_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HTTP_VERSION = re.compile(rb"^HTTP/([0-9])\.([0-9])$")
_HTTP_TARGET = re.compile(rb"^[\x21-\x7e]+$")
_HTTP_ABSOLUTE = re.compile(r"^https?://[^/?#]*", re.IGNORECASE)


class HttpRequestParser:
    """Requests from one connection, without the socket (h11's shape).

    ``receive_data(data)`` adds received bytes (``b""``: the peer closed its
    side); ``next_event()`` returns the next ``HttpRequest``, an
    ``HttpContinue``, or None when more bytes are needed.  Every problem with
    the input raises ``HttpProtocolError`` carrying the status to answer;
    the parser is useless afterwards (close the connection).  A request
    without keep-alive is the last one: bytes after it are ignored.

    The states, each read by one method: ``request_line`` -> ``headers`` ->
    ``body`` -> back to ``request_line``, or ``done`` after the last request.
    """

    def __init__(self, max_request_line: int = MAX_HTTP_REQUEST_LINE_BYTES,
                 max_header_bytes: int = MAX_HTTP_HEADER_BYTES,
                 max_headers: int = MAX_HTTP_HEADERS, max_body: int = MAX_HTTP_BODY_BYTES):
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body = max_body
        self._buf = bytearray()
        self.state = "request_line"
        #: The peer closed its sending side.
        self.eof = False
        self._line: Tuple[str, str, str] = ("", "", "")
        self._headers: List[Tuple[str, str]] = []
        self._header_bytes = 0
        self._body_length = 0
        self._continue_due = False
        self._steps = {"request_line": self._read_request_line, "headers": self._read_headers,
                       "body": self._read_body, "done": lambda: None}

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet consumed (for the loop's input bound)."""
        return len(self._buf)

    @property
    def in_progress(self) -> bool:
        """A request has begun and is not complete: a timeout is a 408 then."""
        return self.state in ("headers", "body") or bool(self._buf.strip(b"\r\n"))

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.eof = True
        elif self.state != "done":
            self._buf += data

    def next_event(self) -> Union[HttpRequest, HttpContinue, None]:
        event = self._steps[self.state]()
        if event is None and self.eof and self.in_progress and self.state != "done":
            raise HttpProtocolError(400, "the connection ended inside a request")
        return event

    def _take_line(self, limit: int, status: int, what: str) -> Optional[bytes]:
        """One line without its end (CRLF or a bare LF), or None for now."""
        end = self._buf.find(b"\n", 0, limit + 2)
        if end < 0:
            if len(self._buf) > limit + 1:
                raise HttpProtocolError(status, "%s longer than %d bytes" % (what, limit))
            return None
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            raise HttpProtocolError(status, "%s longer than %d bytes" % (what, limit))
        if b"\r" in line or b"\0" in line:
            raise HttpProtocolError(400, "a bare CR or a NUL in the %s" % what)
        return line

    def _read_request_line(self) -> Optional[HttpRequest]:
        # RFC 9112 2.2: empty lines before a request line are skipped.
        while True:
            if self._buf.startswith(b"\r\n"):
                del self._buf[:2]
            elif self._buf.startswith(b"\n"):
                del self._buf[:1]
            else:
                break
        line = self._take_line(self.max_request_line, 414, "request line")
        if line is None:
            return None
        parts = line.split(b" ")
        if len(parts) != 3 or not all(parts):
            raise HttpProtocolError(400, "not a request line: METHOD TARGET HTTP/1.1")
        method, target, version = parts
        if not _HTTP_TOKEN.match(method):
            raise HttpProtocolError(400, "the method is not a token")
        match = _HTTP_VERSION.match(version)
        if match is None:
            raise HttpProtocolError(400, "not an HTTP version")
        if match.group(1) != b"1":
            raise HttpProtocolError(505, "HTTP/1.0 and HTTP/1.1 only")
        if not _HTTP_TARGET.match(target):
            raise HttpProtocolError(400, "the request target has a control character")
        name = method.decode("ascii")
        if name not in HTTP_KNOWN_METHODS:
            raise HttpProtocolError(501, "method %s not implemented" % name[:20])
        text = target.decode("ascii")
        absolute = _HTTP_ABSOLUTE.match(text)
        if absolute is not None:  # RFC 9112 3.2.2: a server must accept it
            text = text[absolute.end():] or "/"
        if not (text.startswith("/") or (text == "*" and name == "OPTIONS")):
            raise HttpProtocolError(400, "the request target is not a path")
        # A 1.x above 1.1 is served as 1.1 (RFC 9110 2.5).
        self._line = (name, text.partition("#")[0],
                      "HTTP/1.0" if match.group(2) == b"0" else "HTTP/1.1")
        self._headers = []
        self._header_bytes = 0
        self.state = "headers"
        return self._read_headers()

    def _read_headers(self) -> Union[HttpRequest, HttpContinue, None]:
        while True:
            room = self.max_header_bytes - self._header_bytes
            before = len(self._buf)
            line = self._take_line(max(room, 0), 431, "header section")
            if line is None:
                return None
            self._header_bytes += before - len(self._buf)
            if self._header_bytes > self.max_header_bytes:
                raise HttpProtocolError(431, "header section longer than %d bytes"
                                        % self.max_header_bytes)
            if not line:
                return self._headers_done()
            if line[:1] in (b" ", b"\t"):
                raise HttpProtocolError(400, "a folded header line (obs-fold)")
            name, colon, value = line.partition(b":")
            if not colon or not _HTTP_TOKEN.match(name):
                raise HttpProtocolError(400, "not a header line: Name: value")
            if len(self._headers) >= self.max_headers:
                raise HttpProtocolError(431, "more than %d header lines" % self.max_headers)
            self._headers.append((name.decode("ascii").lower(),
                                  value.strip(b" \t").decode("latin-1")))

    def _headers_done(self) -> Union[HttpRequest, HttpContinue, None]:
        method, target, version = self._line
        headers = self._headers
        hosts = [v for k, v in headers if k == "host"]
        if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
            raise HttpProtocolError(400, "HTTP/1.1 needs exactly one Host header")
        codings = [v for k, v in headers if k == "transfer-encoding"]
        if codings:
            last = ",".join(codings).split(",")[-1].strip().lower()
            if last == "chunked":
                raise HttpProtocolError(411, "a chunked body: send Content-Length instead")
            raise HttpProtocolError(501, "Transfer-Encoding %s not implemented" % last[:20])
        lengths = {item.strip() for k, v in headers if k == "content-length"
                   for item in v.split(",")}
        if len(lengths) > 1 or any(not n.isdigit() or not n.isascii() for n in lengths):
            raise HttpProtocolError(400, "a bad Content-Length")
        self._body_length = int(lengths.pop()) if lengths else 0
        if self._body_length > self.max_body:
            raise HttpProtocolError(413, "a body over %d bytes" % self.max_body)
        expect = ",".join(v for k, v in headers if k == "expect").strip().lower()
        if expect and expect != "100-continue":
            raise HttpProtocolError(417, "only Expect: 100-continue is understood")
        self._continue_due = bool(expect) and self._body_length > 0 and \
            version == "HTTP/1.1"
        self.state = "body"
        return self._read_body()

    def _read_body(self) -> Union[HttpRequest, HttpContinue, None]:
        if len(self._buf) < self._body_length:
            if self._continue_due:
                self._continue_due = False
                return HttpContinue()
            return None
        self._continue_due = False
        body = bytes(self._buf[:self._body_length])
        del self._buf[:self._body_length]
        method, target, version = self._line
        tokens = {t.strip().lower() for k, v in self._headers if k == "connection"
                  for t in v.split(",")}
        keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
        request = HttpRequest(method, target, version, self._headers, body, keep_alive)
        self.state = "request_line" if keep_alive else "done"
        if not keep_alive:
            self._buf.clear()
        return request


# -- responses -------------------------------------------------------------------

class HttpResponse:
    """A response to encode: ``status``, ``headers`` (name, value) pairs and
    ``body``.  ``stream``: the body goes on after this (Server-Sent Events),
    so it has no Content-Length and the connection closes when it ends."""

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status: int, headers: Optional[List[Tuple[str, str]]] = None,
                 body: bytes = b"", stream: bool = False):
        self.status = status
        self.headers = list(headers or [])
        self.body = body
        self.stream = stream

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


#: Every response: no sniffing a JSON reply into a script, no framing by
#: another site (clickjacking), no Referer to a screen-popped CRM page.
HTTP_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
#: Responses other than the page run nothing at all.
HTTP_DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_HTTP_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_HTTP_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                "Nov", "Dec")


def http_date(epoch: float) -> str:
    """RFC 9110 IMF-fixdate, whatever the locale: ``Thu, 26 Nov 2026 21:19:10 GMT``."""
    t = time.gmtime(epoch)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _HTTP_DAYS[t.tm_wday], t.tm_mday, _HTTP_MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


def encode_response(response: HttpResponse, keep_alive: bool, head_only: bool = False,
                    date: Optional[float] = None) -> bytes:
    """The response as bytes: status line, headers (ours, then the security
    headers, unless the response set them), blank line, body.  A header
    value with CR, LF or NUL raises ValueError: nothing, not even a caller
    ID, may add a header or a body."""
    status = response.status
    keep_alive = keep_alive and not response.stream
    lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "Unknown"))]
    headers = list(response.headers)
    names = {name.lower() for name, _ in headers}
    if date is not None and "date" not in names:
        headers.append(("Date", http_date(date)))
    if "content-security-policy" not in names:
        headers.append(("Content-Security-Policy", HTTP_DEFAULT_CSP))
    headers += [pair for pair in HTTP_SECURITY_HEADERS if pair[0].lower() not in names]
    if not response.stream and status not in (204, 304) and status >= 200:
        headers.append(("Content-Length", str(len(response.body))))
    if status >= 200:
        headers.append(("Connection", "keep-alive" if keep_alive else "close"))
    for name, value in headers:
        if not _HTTP_TOKEN.match(name.encode("latin-1", "replace")) or \
                any(c in value for c in "\r\n\0"):
            raise ValueError("header %r: a line end or NUL in a header" % name)
        lines.append("%s: %s" % (name, value))
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    if head_only or status in (204, 304):
        return head
    return head + response.body


def json_response(status: int, value: object,
                  headers: Optional[List[Tuple[str, str]]] = None) -> HttpResponse:
    """A JSON reply; never cached (it holds a user's calls)."""
    body = (encode_json_line(value) + "\n").encode("utf-8")  # type: ignore[arg-type]
    return HttpResponse(status, [("Content-Type", "application/json; charset=utf-8"),
                                 ("Cache-Control", "no-store")] + list(headers or []), body)


def json_list_response(items: List[Dict[str, object]]) -> HttpResponse:
    """A JSON array of line-format objects, one per line."""
    body = ("[" + ",\n".join(encode_json_line(item) for item in items) + "]\n").encode("utf-8")
    return HttpResponse(200, [("Content-Type", "application/json; charset=utf-8"),
                              ("Cache-Control", "no-store")], body)


def error_response(status: int, text: str,
                   headers: Optional[List[Tuple[str, str]]] = None) -> HttpResponse:
    """``{"error": "..."}`` with the status: what the page shows, what curl prints."""
    return json_response(status, {"error": text, "status": status}, headers)


# -- Server-Sent Events ------------------------------------------------------------

SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"),
               ("Cache-Control", "no-store"),
               ("X-Accel-Buffering", "no")]  # nginx in front: do not buffer the stream


def encode_sse_event(fields: Dict[str, object], event_id: Optional[str] = None) -> bytes:
    """One SSE frame: ``id:`` (if any) and one ``data:`` line holding the
    JSON object of the JSON line format.  encode_json_line escapes CR, LF,
    NEL, U+2028 and U+2029 (and every other control character and bidi
    override), so no caller ID can end the line early or start a field; a
    frame is always exactly these lines."""
    data = "data: " + encode_json_line(fields) + "\n\n"
    if event_id is not None:
        data = "id: " + event_id + "\n" + data
    return data.encode("utf-8")


def encode_sse_comment(text: str = "") -> bytes:
    """A comment frame (a heartbeat): ignored by every SSE reader."""
    return (":" + re.sub(r"[\r\n]", " ", text) + "\n\n").encode("utf-8")


def encode_sse_retry(milliseconds: int = SSE_RETRY_MS) -> bytes:
    return b"retry: %d\n\n" % milliseconds


# -- cookies, Basic auth, forms ------------------------------------------------------

def parse_cookies(values: Iterable[str]) -> Dict[str, str]:
    """``Cookie:`` header values -> ``{name: value}``; of a name sent twice
    the first wins (a browser sends the most specific one first)."""
    cookies: Dict[str, str] = {}
    for header in values:
        for item in header.split(";"):
            name, eq, value = item.strip().partition("=")
            if eq and name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                cookies.setdefault(name, value)
    return cookies


def parse_basic_auth(value: Optional[str]) -> Optional[Tuple[str, str]]:
    """``Authorization: Basic base64(user:secret)`` -> ``(user, secret)``,
    UTF-8 (RFC 7617); anything else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    user, colon, secret = text.partition(":")
    return (user, secret) if colon else None


def parse_form(body: bytes) -> Dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body -> ``{name: value}``
    (the first of a repeated name); HttpProtocolError(400) if it is not one."""
    try:
        text = body.decode("ascii")
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=32,
                                       encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpProtocolError(400, "not a form (application/x-www-form-urlencoded)")
    form: Dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def session_cookie(token: str, max_age_s: int, secure: bool) -> str:
    """The session cookie: unreadable by scripts (HttpOnly), never sent by
    a request another site starts (SameSite=Strict), for the whole server,
    only over TLS when it came over TLS (Secure)."""
    return "%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict%s" % (
        WEB_SESSION_COOKIE, token, max_age_s, "; Secure" if secure else "")


# -- web sessions and the event buffer ----------------------------------------------

def new_token() -> str:
    return secrets.token_urlsafe(WEB_TOKEN_BYTES)


class WebSession:
    """One browser login: the cookie's token, the anti-CSRF token every
    POST must carry, whose it is and until when (``now`` units)."""

    __slots__ = ("token", "csrf", "account", "expires", "key")

    def __init__(self, token: str, csrf: str, account: UserConfig, expires: float, key: bytes):
        self.token = token
        self.csrf = csrf
        #: The account as it was at login: a reload that changes its secret
        #: ends the session (WebSessionStore.reconfigure).
        self.account = account
        self.expires = expires
        self.key = key

    @property
    def user(self) -> str:
        return self.account.name


def _token_key(token: str) -> bytes:
    """Sessions are found by the token's hash: the lookup's timing says
    nothing about the tokens that exist."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class WebSessionStore:
    """Web sessions, without a clock: every call takes ``now``.

    ``create`` after a good login; ``get`` for each request (None: no such
    session, or it expired); ``end`` on logout; ``end_user`` and
    ``reconfigure`` when a reload removes a user or changes a secret;
    ``expire(now)`` when ``next_expiry()`` is due.  Each returns the
    sessions it ended, so the loop can close their event streams.
    """

    def __init__(self, lifetime_s: float = WEB_SESSION_HOURS * 3600,
                 max_sessions: int = MAX_WEB_SESSIONS,
                 max_per_user: int = MAX_WEB_SESSIONS_PER_USER,
                 token_factory=new_token):
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user
        self._token_factory = token_factory
        self._sessions: Dict[bytes, WebSession] = {}
        self._by_user: Dict[str, "collections.OrderedDict[bytes, WebSession]"] = {}
        #: (expires, key): the nearest expiry first; ended ones are skipped.
        self._expiries: List[Tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, account: UserConfig, now: float) -> Optional[WebSession]:
        """A new session; None when the store is full (answer 503)."""
        mine = self._by_user.get(account.name)
        if mine is not None and len(mine) >= self.max_per_user:
            self._remove(next(iter(mine.values())))  # the user's oldest
        if len(self._sessions) >= self.max_sessions:
            return None
        token = self._token_factory()
        key = _token_key(token)
        session = WebSession(token, self._token_factory(), account, now + self.lifetime_s, key)
        self._sessions[key] = session
        self._by_user.setdefault(account.name, collections.OrderedDict())[key] = session
        heapq.heappush(self._expiries, (session.expires, key))
        if len(self._expiries) > 2 * len(self._sessions) + 64:
            self._expiries = [(s.expires, k) for k, s in self._sessions.items()]
            heapq.heapify(self._expiries)
        return session

    def get(self, token: str, now: float) -> Optional[WebSession]:
        session = self._sessions.get(_token_key(token)) if token else None
        if session is None or now >= session.expires:
            return None
        return session

    def end(self, token: str) -> Optional[WebSession]:
        session = self._sessions.get(_token_key(token)) if token else None
        if session is not None:
            self._remove(session)
        return session

    def end_user(self, name: str) -> List[WebSession]:
        ended = list(self._by_user.get(name, {}).values())
        for session in ended:
            self._remove(session)
        return ended

    def reconfigure(self, users: Dict[str, UserConfig],
                    lifetime_s: Optional[float] = None) -> List[WebSession]:
        """After a reload: end the sessions of users removed or whose secret
        changed; later logins get the new lifetime."""
        if lifetime_s is not None:
            self.lifetime_s = lifetime_s
        ended: List[WebSession] = []
        for name in list(self._by_user):
            fresh = users.get(name)
            sessions = list(self._by_user[name].values())
            if fresh is None or fresh.secret != sessions[0].account.secret:
                ended += self.end_user(name)
            else:
                for session in sessions:
                    session.account = fresh
        return ended

    def next_expiry(self) -> Optional[float]:
        heap = self._expiries
        while heap and self._sessions.get(heap[0][1]) is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> List[WebSession]:
        ended = []
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _expires, key = heapq.heappop(heap)
            session = self._sessions.get(key)
            if session is not None and session.expires <= now:
                self._remove(session)
                ended.append(session)
        return ended

    def _remove(self, session: WebSession) -> None:
        self._sessions.pop(session.key, None)
        mine = self._by_user.get(session.user)
        if mine is not None:
            mine.pop(session.key, None)
            if not mine:
                del self._by_user[session.user]


class WebEventBuffer:
    """Each user's last events as SSE frames, for ``Last-Event-ID``.

    An id is ``EPOCH-SEQ``: EPOCH is random per daemon start, SEQ counts up.
    A browser that comes back with an id of this start gets the events
    after it; with an id of an earlier start (the daemon restarted) it gets
    every event buffered since; with none (a fresh page), none.  Bounded per
    user in events and bytes, and in bytes for all users together;
    ``replay`` says whether events were lost.
    """

    def __init__(self, epoch: Optional[str] = None, max_events: int = WEB_EVENT_BUFFER_EVENTS,
                 max_bytes: int = WEB_EVENT_BUFFER_BYTES,
                 max_total_bytes: int = WEB_EVENT_BUFFER_TOTAL_BYTES):
        self.epoch = epoch or secrets.token_hex(4)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self._seq = 0
        #: user -> deque of (seq, frame), bytes held, newest seq dropped.
        self._frames: Dict[str, "collections.deque[Tuple[int, bytes]]"] = {}
        self._bytes: Dict[str, int] = {}
        self._dropped: Dict[str, int] = {}
        #: Every frame kept, oldest first, as (user, seq): a frame is the
        #: oldest of its user's when it comes up here, unless gone already.
        self._order: "collections.deque[Tuple[str, int]]" = collections.deque()
        self._total = 0

    def publish(self, user: str, fields: Dict[str, object]) -> bytes:
        """Give an event for ``user`` the next id, keep it, return its frame."""
        self._seq += 1
        frame = encode_sse_event(fields, "%s-%d" % (self.epoch, self._seq))
        frames = self._frames.get(user)
        if frames is None:
            frames = self._frames[user] = collections.deque()
            self._bytes[user] = 0
        frames.append((self._seq, frame))
        self._order.append((user, self._seq))
        self._bytes[user] += len(frame)
        self._total += len(frame)
        while frames and (len(frames) > self.max_events or self._bytes[user] > self.max_bytes):
            self._drop_oldest(user)
        while self._total > self.max_total_bytes:
            oldest, seq = self._order.popleft()
            mine = self._frames.get(oldest)
            if mine and mine[0][0] == seq:
                self._drop_oldest(oldest)
        if len(self._order) > 2 * self.max_events * max(1, len(self._frames)):
            # Entries of frames dropped per user: rebuilt, so memory follows what is kept.
            self._order = collections.deque(sorted(
                ((u, seq) for u, mine in self._frames.items() for seq, _f in mine),
                key=lambda entry: entry[1]))
        return frame

    def _drop_oldest(self, user: str) -> None:
        seq, old = self._frames[user].popleft()
        self._bytes[user] -= len(old)
        self._total -= len(old)
        self._dropped[user] = seq

    def last_id(self) -> str:
        return "%s-%d" % (self.epoch, self._seq)

    def replay(self, user: str, last_event_id: Optional[str]) -> Tuple[List[bytes], bool]:
        """The frames a stream resuming after ``last_event_id`` missed, and
        whether that is all of them (False: some were dropped already)."""
        if last_event_id is None:
            return [], True
        epoch, _, seq_text = last_event_id.strip().rpartition("-")
        frames = self._frames.get(user, ())
        if epoch != self.epoch or not seq_text.isdigit() or not seq_text.isascii():
            after = 0  # an earlier daemon's id: all this one has
        else:
            after = int(seq_text)
        missed = [frame for seq, frame in frames if seq > after]
        # With an earlier daemon's id, all since this start is wanted: was it kept?
        complete = self._dropped.get(user, 0) <= after
        return missed, complete and (after <= self._seq)

    def retain(self, users: Iterable[str]) -> None:
        keep = set(users)
        for user in [u for u in self._frames if u not in keep]:
            del self._frames[user]
            self._total -= self._bytes.pop(user, 0)
            self._dropped.pop(user, None)

    def held_bytes(self) -> int:
        return self._total


# -- routes ------------------------------------------------------------------------

class WebView(ServerView):
    """What the web routes may ask of the server: ServerView's accounts,
    calls and history, plus the login throttle (the same one LOGIN uses),
    the web sessions, the event buffer and the PBX links' status lines.

    The daemon's view shares its throttle and fills ``link_status``; tests
    make one with a fake engine or none.
    """

    def __init__(self, users: Dict[str, UserConfig], engine: Optional[CallEngine] = None,
                 history: Optional[CallHistory] = None,
                 sessions: Optional[WebSessionStore] = None,
                 events: Optional[WebEventBuffer] = None,
                 throttle: Optional[LoginThrottle] = None):
        super().__init__(users, engine, history)
        self.sessions = sessions if sessions is not None else WebSessionStore()
        self.events = events if events is not None else WebEventBuffer()
        self.throttle = throttle if throttle is not None else LoginThrottle()

    def link_status(self) -> List[Dict[str, object]]:
        """The ``status`` fields of every PBX link (``pbx=up|down``), sent
        at the start of each event stream as after a LOGIN."""
        return []


class WebStream:
    """The reply to ``GET /events``: from now on this connection is an
    event stream for ``user``.  ``session`` is the web session it belongs
    to (None: Basic auth), so ending the session can close it."""

    __slots__ = ("user", "session")

    def __init__(self, user: str, session: Optional[WebSession]):
        self.user = user
        self.session = session


class WebReply:
    """What to do with a request: send ``response``; with ``stream``, keep
    the connection as an event stream; ``delay_s``: hold the response back
    that long (a failed login, as LOGIN's reply); ``close``: close after it;
    ``ended``: sessions that ended (close their streams); ``failed_login``:
    the request was a failed login (three on one connection close it)."""

    __slots__ = ("response", "stream", "delay_s", "close", "ended", "failed_login", "owed")

    def __init__(self, response: HttpResponse, stream: Optional[WebStream] = None,
                 delay_s: float = 0.0, close: bool = False,
                 ended: Optional[List[WebSession]] = None, failed_login: bool = False,
                 owed: Optional["WebActor"] = None):
        self.response = response
        self.stream = stream
        self.delay_s = delay_s
        self.close = close
        self.ended = ended or []
        self.failed_login = failed_login
        #: ``POST /action`` sent to Asterisk: the response is owed until it
        #: answers (the connection waits, the loop does not); ``response``
        #: is then only a placeholder.
        self.owed = owed


class WebRequestContext:
    """One request as the routes see it: where from, over TLS or not, when."""

    __slots__ = ("request", "view", "peer_host", "tls", "now", "tag")

    def __init__(self, request: HttpRequest, view: WebView, peer_host: str, tls: bool,
                 now: float, tag: str):
        self.request = request
        self.view = view
        self.peer_host = peer_host
        self.tls = tls
        self.now = now
        self.tag = tag


class WebAuthFailed(CtiError):
    """A route needs a logged-in user and the request has none: ``reply``
    is the answer (403, 401 with a Basic challenge, 429)."""

    def __init__(self, reply: WebReply):
        super().__init__(reply.response.status)
        self.reply = reply


def _login_check(ctx: WebRequestContext, name: str, secret: str,
                 how: str) -> Union[UserConfig, WebReply]:
    """LOGIN's rules on the web, with LOGIN's own throttle object: the same
    check_login, the same address blocks and delays and the same per-name
    cool-down, counted together (a guess on the web port is a guess).  The
    account, or the reply refusing it."""
    view, key = ctx.view, address_key(ctx.peer_host)
    throttle = view.throttle
    if throttle.blocked_for(key, ctx.now) > 0:
        return WebReply(error_response(429, "too many failed logins from your address, "
                                            "try again later"), close=True)
    wait = throttle.account_wait(name, key, ctx.now)
    if wait > 0:
        # Unheard, as LOGIN: the secret is not even compared.
        return WebReply(error_response(429, "too many failed logins for this user, try "
                                            "again in %d s" % math.ceil(wait)))
    account, why, text = check_login(view.users, name, secret, ctx.peer_host)
    if account is not None:
        throttle.account_succeeded(account.name, key)
        return account
    log.warning("%s: %s login as %r refused: %s", ctx.tag, how, name[:64], why)
    delay, blocked, pause = throttle.login_failed(name[:64], key, ctx.now)
    if pause:
        log.warning("%s: logins as %r held back %g s: more than %d failed logins as it "
                    "lately", ctx.tag, name[:64], pause, LOGIN_ACCOUNT_FREE)
    if blocked:
        log.warning("%s: logins from %s blocked for %g s after %d failed logins",
                    ctx.tag, key, throttle.block_s, throttle.block_after)
    challenge = [("WWW-Authenticate", 'Basic realm="ctinotify", charset="UTF-8"')] \
        if how == "basic" else []
    return WebReply(error_response(401, text, challenge), delay_s=delay,
                    close=blocked, failed_login=True)


def _authenticate(ctx: WebRequestContext) -> Tuple[UserConfig, Optional[WebSession]]:
    """The request's user: by its session cookie, else by Basic auth (for
    scripts: ``curl -u alice:SECRET``).  Raises WebAuthFailed."""
    request, view = ctx.request, ctx.view
    token = parse_cookies(request.header_values("cookie")).get(WEB_SESSION_COOKIE, "")
    session = view.sessions.get(token, ctx.now)
    if session is not None:
        account = view.users.get(session.user)
        if account is not None and account.host_allowed(ctx.peer_host):
            return account, session
    credentials = parse_basic_auth(request.header("authorization"))
    if credentials is None:
        # No challenge: a browser would pop up its own password dialog.
        raise WebAuthFailed(WebReply(error_response(403, "login first")))
    result = _login_check(ctx, credentials[0], credentials[1], "basic")
    if isinstance(result, WebReply):
        raise WebAuthFailed(result)
    return result, None


def _same_origin(ctx: WebRequestContext) -> bool:
    """A POST must come from the page itself: browsers send Origin (and
    Sec-Fetch-Site) with every POST, and another site's form cannot fake
    them.  A client that sends neither (curl) is no browser to trick."""
    request = ctx.request
    site = request.header("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.header("origin")
    if origin is None:
        return True
    host = request.header("host") or ""
    return origin == "%s://%s" % ("https" if ctx.tls else "http", host)


def _csrf_ok(ctx: WebRequestContext, session: Optional[WebSession]) -> bool:
    if session is None:
        return True  # Basic auth: no cookie a forged request could ride on
    sent = ctx.request.header("x-csrf-token") or ""
    return hmac.compare_digest(sent.encode("utf-8", "replace"),
                               session.csrf.encode("utf-8"))


def _route_page(ctx: WebRequestContext) -> WebReply:
    etag = '"%s"' % WEB_PAGE_ETAG
    # A 304's headers replace the cached ones: it needs the page's CSP too.
    headers = [("Cache-Control", "no-cache"), ("ETag", etag),
               ("Content-Security-Policy", WEB_PAGE_CSP)]
    if ctx.request.header("if-none-match") == etag:
        return WebReply(HttpResponse(304, headers))
    return WebReply(HttpResponse(200, [("Content-Type", "text/html; charset=utf-8")] + headers,
                                 WEB_PAGE_BYTES))


def _route_login(ctx: WebRequestContext) -> WebReply:
    request = ctx.request
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return WebReply(error_response(415, "expected a form: user=...&secret=..."))
    form = parse_form(request.body)
    result = _login_check(ctx, form.get("user", ""), form.get("secret", ""), "web")
    if isinstance(result, WebReply):
        return result
    session = ctx.view.sessions.create(result, ctx.now)
    if session is None:
        log.warning("%s: web login as %s refused: %d sessions open", ctx.tag, result.name,
                    len(ctx.view.sessions))
        return WebReply(error_response(503, "too many web sessions, try again later"))
    log.info("%s: web login as %s", ctx.tag, result.name)
    cookie = session_cookie(session.token, int(ctx.view.sessions.lifetime_s), ctx.tls)
    return WebReply(json_response(200, _session_fields(session), [("Set-Cookie", cookie)]))


def _session_fields(session: WebSession) -> Dict[str, object]:
    return _account_fields(session.account, session.csrf)


def _account_fields(account: UserConfig, csrf: str) -> Dict[str, object]:
    """Who is logged in, as the page needs to know it: ``board`` says
    whether the user has an office board at all (``board = none``: the
    page shows no Board tab and never asks for ``/board``)."""
    return {"user": account.name, "csrf": csrf, "events": list(account.events),
            "actions": list(account.actions),
            "board": account.board is None or bool(account.board)}


def _route_logout(ctx: WebRequestContext) -> WebReply:
    token = parse_cookies(ctx.request.header_values("cookie")).get(WEB_SESSION_COOKIE, "")
    session = ctx.view.sessions.get(token, ctx.now)
    if session is None:
        return WebReply(error_response(403, "login first"))
    if not _csrf_ok(ctx, session):
        return WebReply(error_response(403, "missing or wrong X-CSRF-Token"))
    ctx.view.sessions.end(token)
    log.info("%s: web logout of %s", ctx.tag, session.user)
    return WebReply(HttpResponse(204, [("Set-Cookie", session_cookie("", 0, ctx.tls)),
                                       ("Cache-Control", "no-store")]), ended=[session])


def _route_session(ctx: WebRequestContext) -> WebReply:
    """Who is logged in: ``{"user": null}`` when nobody is (not an error:
    it is how the page learns to show its login form)."""
    try:
        account, session = _authenticate(ctx)
    except WebAuthFailed as e:
        if e.reply.response.status == 403:
            return WebReply(json_response(200, {"user": None, "csrf": "", "events": []}))
        raise
    if session is None:
        return WebReply(json_response(200, _account_fields(account, "")))
    return WebReply(json_response(200, _session_fields(session)))


def _route_events(ctx: WebRequestContext) -> WebReply:
    """``GET /events``: the stream's head, then what the browser missed
    (``Last-Event-ID``, or ``?last_event_id=`` from a page that had to
    log in again), then the PBX links' status; the loop sends the rest."""
    account, session = _authenticate(ctx)
    request, view = ctx.request, ctx.view
    last_id = request.header("last-event-id")
    if last_id is None:
        last_id = request.params().get("last_event_id") or None
    missed, complete = view.events.replay(account.name, last_id)
    body = [encode_sse_retry()] + missed
    if not complete:
        body.append(encode_sse_event({"event": "status", "replay": "incomplete"}))
    body += [encode_sse_event(dict({"event": "status"}, **fields))
             for fields in view.link_status()]
    log.info("%s: event stream for %s%s", ctx.tag, account.name,
             " from %s (%d missed)" % (last_id[:40], len(missed)) if last_id else "")
    return WebReply(HttpResponse(200, SSE_HEADERS, b"".join(body), stream=True),
                    stream=WebStream(account.name, session))


def _route_calls(ctx: WebRequestContext) -> WebReply:
    account, _session = _authenticate(ctx)
    return WebReply(json_list_response(ctx.view.calls(account.name)))


def _route_board(ctx: WebRequestContext) -> WebReply:
    """``GET /board``: the office board as BOARD shows it to this user in
    JSON, one ``state`` object per colleague their ``board`` allows, with
    whom only under ``board_details``: the view scopes it, as for BOARD and
    the ``state`` events, so the page never holds what it may not show."""
    account, _session = _authenticate(ctx)
    items = ctx.view.board(account.name)
    if items is None:
        return WebReply(error_response(403, "no board for %s" % account.name))
    return WebReply(json_list_response(items))


def _route_history(ctx: WebRequestContext) -> WebReply:
    account, _session = _authenticate(ctx)
    text = ctx.request.params().get("n", "")
    count = WEB_HISTORY_DEFAULT_COUNT
    if text:
        if not re.match(r"^[0-9]{1,6}$", text) or not 1 <= int(text) <= HISTORY_PER_USER:
            return WebReply(error_response(400, "n from 1 to %d" % HISTORY_PER_USER))
        count = int(text)
    # Only ever the user's own calls, as HISTORY.
    records = [dict({"event": "history"}, **record)
               for record in ctx.view.history(account.name, count)
               if record.get("user") == account.name]
    return WebReply(json_list_response(records))


class WebActor:
    """Who sent ``POST /action``, as ServerView.act and the ActionDesk see a
    session: the user, a tag for the log, and where the answers go
    (``reply_to``, itself).  The reply goes to the connection once the
    daemon attached it (``conn``); DIAL's outcome goes to ``to_streams``,
    the event streams of the same web session."""

    __slots__ = ("user", "session", "tag", "conn", "to_streams")

    def __init__(self, user: UserConfig, session: Optional[WebSession], tag: str):
        self.user: Optional[UserConfig] = user
        self.session = session
        self.tag = tag
        self.conn: Optional[object] = None
        self.to_streams = None  # type: ignore[var-annotated]

    @property
    def reply_to(self) -> "WebActor":
        return self

    def action_reply(self, line: str) -> None:
        if self.conn is not None:
            self.conn.action_reply(line)  # type: ignore[attr-defined]

    def action_status(self, fields: Dict[str, object]) -> None:
        if self.to_streams is not None:
            self.to_streams(self, fields)


#: ``POST /action``: the form fields of each verb, in the order of its
#: command's words (``TRANSFER <call> <number>``).
WEB_ACTION_FIELDS = {CallAction.DIAL: ("number",), CallAction.HANGUP: ("call",),
                     CallAction.TRANSFER: ("call", "number")}


def action_response(line: str) -> HttpResponse:
    """An action's reply line as the answer to ``POST /action``: 200 for
    ``OK``, else the ``ERR``'s code (they are HTTP's), the line in JSON."""
    code = line.split(" ", 2)[1] if line.startswith("ERR ") else ""
    status = 200 if line.startswith("OK") else \
        int(code) if code.isdigit() and 400 <= int(code) <= 599 else 502
    return json_response(status, {"ok": status == 200, "reply": line})


def _route_action(ctx: WebRequestContext) -> WebReply:
    """``POST /action``: DIAL, HANGUP or TRANSFER from the page (a form:
    ``verb``, ``number``, ``call``), checked and sent as the line
    protocol's command; answered when Asterisk has answered."""
    account, session = _authenticate(ctx)
    if not _csrf_ok(ctx, session):
        return WebReply(error_response(403, "missing or wrong X-CSRF-Token"))
    content_type = (ctx.request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return WebReply(error_response(415, "expected a form: verb=dial&number=..."))
    form = parse_form(ctx.request.body)
    verb = form.get("verb", "").lower()
    names = WEB_ACTION_FIELDS.get(verb)
    if names is None or any(c.isspace() for c in form.get("call", "")):
        return WebReply(error_response(400, "expected verb=dial&number=..., verb=hangup&"
                                            "call=... or verb=transfer&call=...&number=..."))
    actor = WebActor(account, session, ctx.tag)
    try:
        replies = ctx.view.act(verb, " ".join(form.get(name, "") for name in names), actor)
    except ClientProtocolError as e:
        return WebReply(action_response("ERR %s %s" % (e.code, e.text)))
    if replies:
        return WebReply(action_response(replies[0]))
    return WebReply(json_response(202, {"ok": True, "reply": ""}), owed=actor)


#: path -> {method: route}.  HEAD is answered as GET, without the body.
WEB_ROUTES = {
    "/": {"GET": _route_page},
    "/login": {"POST": _route_login},
    "/logout": {"POST": _route_logout},
    "/session": {"GET": _route_session},
    "/events": {"GET": _route_events},
    "/calls": {"GET": _route_calls},
    "/history": {"GET": _route_history},
    "/board": {"GET": _route_board},
    "/action": {"POST": _route_action},
}


def route_web_request(request: HttpRequest, view: WebView, peer_host: str, now: float,
                      tls: bool = False, tag: str = "web") -> WebReply:
    """Answer one request: the page, a login or logout, a JSON list, or the
    start of an event stream.  ``now`` is the clock of the session store
    and the throttle (monotonic in the daemon).  Never raises for anything
    the request holds."""
    ctx = WebRequestContext(request, view, peer_host, tls, now, tag)
    methods = WEB_ROUTES.get(request.path)
    if methods is None:
        return WebReply(error_response(404, "no such page"))
    method = "GET" if request.method == "HEAD" else request.method
    route = methods.get(method)
    if route is None:
        allow = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
        return WebReply(error_response(405, "method not allowed", [("Allow", allow)]))
    if method == "POST" and not _same_origin(ctx):
        log.warning("%s: a POST %s from another site refused", tag, request.path)
        return WebReply(error_response(403, "cross-site request refused"))
    try:
        reply = route(ctx)
    except WebAuthFailed as e:
        reply = e.reply
    except HttpProtocolError as e:
        reply = WebReply(error_response(e.status, e.text), close=True)
    if request.method == "HEAD":
        reply.stream = None
        reply.response.stream = False
    return reply


def http_error_bytes(error: HttpProtocolError, date: Optional[float] = None) -> bytes:
    """The last reply to a request the parser refused: its status, then close."""
    return encode_response(error_response(error.status, error.text), keep_alive=False,
                           date=date)


# ---------------------------------------------------------------------------
# Line framing (no I/O): bytes in, bounded lines out
# ---------------------------------------------------------------------------


#: Bytes that no text line holds: C0 controls other than TAB, CR and LF, and DEL.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class LineFramer:
    """Cuts a byte stream into lines, within limits (h11's receive buffer).

    ``receive_data(data)`` takes bytes split anywhere; ``next_line()``
    returns the next complete line, or None until one is complete.  A line
    ends in LF or CRLF and is returned without it, decoded as UTF-8 after
    framing (a character split across reads is whole again; invalid bytes
    become U+FFFD).  Both line protocols frame here: the client commands
    the daemon reads and the server lines ``watch`` reads.

    ``max_line_bytes`` counts a line's bytes without its line end.  A longer
    line is refused (ClientProtocolError 413, at once for a complete one,
    by ``check()`` for an unfinished one), or with ``skip_long`` dropped and
    counted in ``skipped``, framing going on after its end.  ``check()`` also
    refuses more than ``max_pending_bytes`` received and not yet taken, and
    while ``text_only``, input that is not text (binary junk, a TLS hello):
    it may never end in a newline, and then no line would ever refuse it.
    """

    def __init__(self, max_line_bytes: int, max_pending_bytes: Optional[int] = None,
                 skip_long: bool = False):
        self.max_line_bytes = max_line_bytes
        self.max_pending_bytes = max_pending_bytes
        self.skip_long = skip_long
        #: check() refuses control bytes (400).
        self.text_only = False
        #: Lines dropped for their length (``skip_long``).
        self.skipped = 0
        self._buffer = bytearray()
        #: No LF before this offset: the next search starts here.
        self._scan_from = 0
        #: Dropping the rest of an over-long line, up to its LF.
        self._skipping = False

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received and not yet taken as lines."""
        return len(self._buffer)

    def clear(self) -> None:
        self._buffer.clear()
        self._scan_from = 0

    def next_line(self) -> Optional[str]:
        buf = self._buffer
        while True:
            newline = buf.find(b"\n", self._scan_from)
            if newline < 0:
                self._scan_from = len(buf)
                if self.skip_long and (self._skipping or self._too_long(len(buf), buf)):
                    # Kept neither way: what follows, up to the LF, is the same line.
                    if not self._skipping:
                        self.skipped += 1
                        self._skipping = True
                    self.clear()
                return None
            self._scan_from = 0
            end = newline - 1 if newline and buf[newline - 1] == 13 else newline
            if self._skipping:
                self._skipping = False
            elif end <= self.max_line_bytes:
                line = buf[:end].decode("utf-8", "replace")
                del buf[:newline + 1]
                return line
            elif not self.skip_long:
                raise ClientProtocolError("413", "line too long", "line of more than %d bytes"
                                          % self.max_line_bytes)
            else:
                self.skipped += 1
            del buf[:newline + 1]

    def _too_long(self, size: int, tail: bytearray) -> bool:
        """Whether an unfinished line of ``size`` bytes is over the limit
        already (a final CR may yet turn out to be part of its line end)."""
        return size - (1 if tail.endswith(b"\r") else 0) > self.max_line_bytes

    def check(self) -> None:
        """Raise ClientProtocolError 413 if the unfinished line is too long
        already, or too much input waits to be taken."""
        buf = self._buffer
        tail = len(buf) - (buf.rfind(b"\n") + 1)
        if tail and self._too_long(tail, buf):
            raise ClientProtocolError("413", "line too long", "more than %d bytes without "
                                      "a newline" % self.max_line_bytes)
        if self.max_pending_bytes is not None and len(buf) > self.max_pending_bytes:
            raise ClientProtocolError("413", "too much input at once", "more than %d bytes of "
                                      "input waiting" % self.max_pending_bytes)
        if self.text_only and _BINARY_BYTES.search(buf):
            raise ClientProtocolError("400", "binary data, expected text lines", "binary data")


# ---------------------------------------------------------------------------
# Desktop client (no I/O): the watch protocol, event lines and hook commands
# ---------------------------------------------------------------------------

class WatchSend:
    """A command line for the server."""

    __slots__ = ("line",)

    def __init__(self, line: str):
        self.line = line


class WatchLoggedIn:
    """The server accepted LOGIN; ``reply`` is its ``OK logged in ...``."""

    __slots__ = ("reply",)

    def __init__(self, reply: str):
        self.reply = reply


class WatchRefused:
    """The server refused LOGIN (``ERR 401``), or ``watch --board`` the
    board (``what`` is ``board``): retrying cannot help."""

    __slots__ = ("reply", "what")

    def __init__(self, reply: str, what: str = "login"):
        self.reply = reply
        self.what = what


#: Who answered, as ``WatchEvent.answer`` says of a pickup.
ANSWERED_HERE = "here"        # a phone of the user (or, calling out, the party called)
ANSWERED_OUTSIDE = "outside"  # the outside number the call was forwarded to (a mobile)
ANSWERED_OTHER = "other"      # a colleague's phone


class WatchEvent:
    """A line from the server: an event, a status, a CALLS or HISTORY item;
    or what watch makes of them: ``missed`` after the hangup of a missed
    call, ``status`` when the server is out of reach.

    ``kind`` is the event kind, ``status``, ``call`` or ``missed``;
    ``fields`` are flattened as in the text format (``from_num``), all
    strings; ``raw`` is the line as received ("" for what watch made).
    ``answer`` (a pickup): ANSWERED_HERE, _OUTSIDE or _OTHER; ``url``: the
    call's popup url, on its incoming and on the pickup; ``missed``: a
    hangup of a missed call (the ``missed`` event follows it).
    """

    __slots__ = ("kind", "fields", "raw", "answer", "url", "missed")

    def __init__(self, kind: str, fields: Dict[str, str], raw: str):
        self.kind = kind
        self.fields = fields
        self.raw = raw
        self.answer = ""
        self.url = ""
        self.missed = False


def answer_of(fields: Dict[str, str], forwarded_out: bool = False) -> str:
    """Who answered a pickup: the user (one of their phones, or the party
    they called), the outside number their call was forwarded to, or a
    colleague.  ``device`` is the user's phone that rang, ``answered_by``
    the one that answered (as the web page tells them apart)."""
    if fields.get("role") == "caller":
        return ANSWERED_HERE
    device = fields.get("device", "")
    if device and fields.get("answered_by_device") == device:
        return ANSWERED_HERE
    return ANSWERED_OUTSIDE if forwarded_out and not device else ANSWERED_OTHER


def is_missed(fields: Dict[str, str]) -> bool:
    """An incoming call of the user that nobody of theirs answered: a
    ``hangup`` (``role=callee``) or a HISTORY record (``direction=in``)."""
    return (fields.get("role") == "callee" or fields.get("direction") == CALL_IN) and \
        fields.get("reason") in MISSED_REASONS


class _WatchCall:
    """What watch remembers of a call until its hangup."""

    __slots__ = ("url", "forwarded_out")

    def __init__(self) -> None:
        self.url = ""
        self.forwarded_out = False


class WatchMissed:
    """The reply to HISTORY: the missed calls since ``since``, oldest first.
    ``supported`` is False for a server without HISTORY; ``complete`` is
    False when the oldest call of the reply is after ``since`` too, and
    the server had as many as were asked for: older ones may be missing."""

    __slots__ = ("calls", "supported", "complete")

    def __init__(self, calls: List[WatchEvent], supported: bool, complete: bool = True):
        self.calls = calls
        self.supported = supported
        self.complete = complete


class WatchCalls:
    """The reply to CALLS: the user's calls in progress."""

    __slots__ = ("calls",)

    def __init__(self, calls: List[WatchEvent]):
        self.calls = calls


class WatchDialed:
    """The reply to DIAL: ``OK dial ...`` (the phone rings) or ``ERR ...``."""

    __slots__ = ("reply",)

    def __init__(self, reply: str):
        self.reply = reply

    @property
    def ok(self) -> bool:
        return self.reply.startswith("OK")


#: The URL schemes ``watch --dial`` takes: RFC 3966 tel:, and callto: as
#: Skype and older CRMs write it (``callto://+15551234567``).
DIAL_URL_SCHEMES = ("tel", "callto")


def dial_target(text: str) -> str:
    """What ``watch --dial`` was given, as the number DIAL sends: a number as
    pasted, or a tel: or callto: URL as a browser hands it to its handler
    (``tel:+1-555-123-4567;phone-context=example.com``, ``tel:%2B1555...``).
    The parameters after ``;`` (and a query) are dropped, the rest
    percent-decoded, then held to parse_number: whatever the decoding
    reveals (``%0D%0A``, ``%3B``, ``%2F``) is refused.  ValueError if it is
    no number."""
    value = text.strip()
    scheme, colon, rest = value.partition(":")
    if colon:
        if scheme.lower() not in DIAL_URL_SCHEMES:
            raise ValueError("not a number, nor a tel: or callto: URL")
        rest = rest[2:] if rest.startswith("//") else rest
        rest = rest.split(";", 1)[0].split("?", 1)[0]
        value = urllib.parse.unquote(rest.rstrip("/"), errors="strict")
    return parse_number(value)
class WatchBoard:
    """The reply to BOARD: one ``state`` item per colleague, in order."""

    __slots__ = ("items",)

    def __init__(self, items: List[WatchEvent]):
        self.items = items


#: The command whose reply a list item belongs to.
_ITEM_COMMANDS = {"call": "calls", "history": "history", Kind.STATE: "board"}


def parse_iso_time(text: Optional[str]) -> Optional[float]:
    """``2026-11-26T21:19:10Z`` -> epoch seconds; None if it is not one."""
    try:
        stamp = datetime.datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


class WatchSession:
    """One connection of ``ctinotify watch``, without the socket.

    ``receive_line`` takes each line from the server and returns what to
    do: ``WatchSend`` (a command to send), ``WatchLoggedIn``,
    ``WatchRefused``, ``WatchEvent``, ``WatchMissed``, ``WatchCalls`` and
    ``WatchBoard``.  A server that breaks the protocol raises
    WatchProtocolError.

    After the greeting it sends ``FORMAT json`` (before LOGIN, so even the
    STATUS line that follows a login is JSON) and ``LOGIN``; once logged
    in, ``HISTORY`` and ``CALLS`` (the user's own calls: if the account
    has the office board's ``state`` events too, ``EVENTS`` without them
    first).  With ``board``, ``EVENTS state`` and ``BOARD`` instead, and
    ``BOARD`` again when the server says the board changed (a reload).
    Replies are matched to commands in order; items (HISTORY, CALL, STATE
    lines) are collected until their ``OK``.  Lines in either format are
    understood whatever was asked for.
    """

    def __init__(self, user: str, secret: str, fmt: str = "json",
                 since: Optional[float] = None, history: int = WATCH_HISTORY_CALLS,
                 since_calls: Optional[Iterable[str]] = None, board: bool = False,
                 dial: str = ""):
        self.user = user
        self._secret = secret
        #: ``watch --board``: the office board, not the user's calls.
        self.board = board
        #: ``watch --dial``: the number to DIAL after the login, instead of
        #: asking for HISTORY and CALLS.
        self.dial = dial
        #: The board's ``state`` events were turned off (plain watch): one
        #: that comes before the server has read EVENTS is dropped.
        self._no_state = False
        #: The format asked of the server: ``json`` or ``text``.
        self.fmt = fmt
        #: Missed calls that ended after this (epoch; None: every one listed),
        #: or in its very second but not among ``since_calls`` (times are
        #: to the second: a call seen then, and one not, can share it);
        #: ``since_calls`` None (not known): none of that second is listed.
        self.since = since
        self.since_calls = None if since_calls is None else frozenset(since_calls)
        self.history = history
        #: "greeting" -> "login" -> "ready".
        self.state = "greeting"
        self._pending: "collections.deque[str]" = collections.deque()
        self._items: List[WatchEvent] = []
        self._newest: Optional[float] = None
        self._newest_calls: Set[str] = set()
        self._history_done = False
        #: Calls until their hangup, oldest first (WATCH_CALL_MEMORY).
        self._calls: "collections.OrderedDict[str, _WatchCall]" = collections.OrderedDict()
        #: The missed calls said, live or listed: each is said once.
        self._missed_said: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    @property
    def seen_until(self) -> Optional[float]:
        """The newest server time seen, once the missed calls were listed
        (before, a crash would skip them next time); None until then."""
        return self._newest if self._history_done else None

    @property
    def seen_calls(self) -> Set[str]:
        """The calls seen in the second of ``seen_until``."""
        return self._newest_calls

    def _command(self, name: str, line: str) -> WatchSend:
        self._pending.append(name)
        return WatchSend(line)

    def ping(self) -> WatchSend:
        return self._command("ping", "PING")

    def receive_line(self, line: str) -> list:
        line = line.rstrip("\r")
        if self.state == "greeting":
            if not line.startswith("CTINOTIFY/"):
                raise WatchProtocolError("not a ctinotify server, it said %r" % line[:80])
            self.state = "login"
            out = [self._command("format", "FORMAT json")] if self.fmt == "json" else []
            return out + [self._command("login", "LOGIN %s %s" % (self.user, self._secret))]
        if line == "OK" or line.startswith(("OK ", "ERR ")):
            return self._reply(line)
        if not line:
            return []
        item = self._parse_item(line)
        if item is None:
            return []  # a line type of a newer server
        if item.kind in ("call", "history") or (item.kind == Kind.STATE and self._pending
                                                 and self._pending[0] == "board"):
            # A JSON board item looks like a state event; one pushed before
            # the server read BOARD is as good an item (the newest wins).
            if not self._pending or self._pending[0] != _ITEM_COMMANDS[item.kind]:
                raise WatchProtocolError("a %s item nobody asked for" % item.kind)
            self._items.append(item)
            return []
        if item.kind == Kind.STATE:
            return [] if self._no_state else [item]  # a colleague's, not a call's time
        self._saw(parse_iso_time(item.fields.get("time")), item.fields.get("call"))
        if self.board and item.kind == "status" and item.fields.get("board") == "changed":
            return [item, self._command("board", "BOARD")]
        return self._follow(item)

    def _follow(self, event: WatchEvent) -> List[WatchEvent]:
        """What one call event says beyond itself: the incoming's url and a
        forward outside, remembered until the hangup; who answered a
        pickup; a hangup that is a missed call, followed by ``missed``."""
        fields, kind = event.fields, event.kind
        call = fields.get("call", "")
        if kind == Kind.INCOMING and call:
            memo = self._calls.pop(call, None) or _WatchCall()
            memo.url = fields.get("url", "")
            self._calls[call] = memo
            while len(self._calls) > WATCH_CALL_MEMORY:
                self._calls.popitem(last=False)
            event.url = memo.url
        elif kind == Kind.DIVERT and call in self._calls:
            if fields.get("direction") == Direction.TO and fields.get("external") == "yes":
                self._calls[call].forwarded_out = True
        elif kind == Kind.PICKUP:
            memo = self._calls.get(call)
            event.answer = answer_of(fields, memo is not None and memo.forwarded_out)
            event.url = memo.url if memo is not None else ""
        elif kind == Kind.HANGUP:
            self._calls.pop(call, None)
            if is_missed(fields) and self._say_missed(call):
                event.missed = True
                return [event, WatchEvent("missed", fields, "")]
        return [event]

    def _say_missed(self, call: str) -> bool:
        """True the first time a missed call is to be said (a call without
        an id, every time)."""
        if not call:
            return True
        if call in self._missed_said:
            return False
        self._missed_said[call] = None
        while len(self._missed_said) > WATCH_CALL_MEMORY:
            self._missed_said.popitem(last=False)
        return True

    def _parse_item(self, line: str) -> Optional[WatchEvent]:
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                raise WatchProtocolError("not a JSON object: %r" % line[:80])
            if not isinstance(obj, dict):
                raise WatchProtocolError("not a JSON object: %r" % line[:80])
            fields = dict(flatten_fields(obj))
            if not fields.get("event"):
                return None
            return WatchEvent(fields["event"], fields, line)
        try:
            tag, kind, values = parse_text_line(line)
        except ValueError as e:
            raise WatchProtocolError("not a protocol line (%s): %r" % (e, line[:80]))
        kind = {"EVENT": kind, "STATUS": "status", "CALL": "call",
                "HISTORY": "history", "STATE": Kind.STATE}.get(tag, "")
        if not kind:
            return None
        fields = dict([("event", kind)] + list(values.items()))
        return WatchEvent(kind, fields, line)

    def _reply(self, line: str) -> list:
        if not self._pending:
            raise WatchProtocolError("a reply to no command: %r" % line[:80])
        command = self._pending.popleft()
        ok = not line.startswith("ERR ")
        items, self._items = self._items, []
        if command == "login":
            if line.startswith("ERR 401"):
                return [WatchRefused(line)]
            if not ok:
                raise WatchProtocolError("LOGIN answered %r" % line[:80])
            self.state = "ready"
            return [WatchLoggedIn(line)] + self._after_login(line)
        if command == "format" and not ok:
            raise WatchProtocolError("FORMAT json answered %r" % line[:80])
        if command in ("board", "board events") and not ok:
            return [WatchRefused(line, "board")]
        if command == "board":
            return [WatchBoard(items)]
        if command == "history":
            # An older server: ERR 400 unknown command.  Nothing to list then.
            self._history_done = True
            missed = self._missed(items) if ok else []
            first_end = parse_iso_time(items[0].fields.get("end")) if items else None
            complete = len(items) < self.history or self.since is None or \
                (first_end is not None and first_end <= self.since)
            return [WatchMissed(missed, ok, complete)]
        if command == "calls":
            return [WatchCalls(items)]
        if command == "dial":
            return [WatchDialed(line)]
        return []

    def _after_login(self, reply: str) -> List[WatchSend]:
        """The commands after ``OK logged in as alice; events=...``."""
        if self.dial:
            return [self._command("dial", "DIAL " + self.dial)]
        if self.board:
            return [self._command("board events", "EVENTS state"),
                    self._command("board", "BOARD")]
        kinds = reply.partition("events=")[2].split(",")
        others = [kind for kind in kinds if kind and kind != Kind.STATE]
        first = []
        if Kind.STATE in kinds and others:
            self._no_state = True
            first = [self._command("events", "EVENTS " + ",".join(others))]
        return first + [self._command("history", "HISTORY %d" % self.history),
                        self._command("calls", "CALLS")]

    def _missed(self, records: List[WatchEvent]) -> List[WatchEvent]:
        missed = []
        for record in records:
            fields = record.fields
            if not is_missed(fields):
                continue
            end = parse_iso_time(fields.get("end"))
            if self.since is not None and (end is None or end < self.since or
                                           end == self.since and
                                           (self.since_calls is None or
                                            fields.get("call") in self.since_calls)):
                continue
            self._saw(end, fields.get("call"))
            if self._say_missed(fields.get("call", "")):
                missed.append(WatchEvent("missed", fields, record.raw))
        return missed

    def _saw(self, when: Optional[float], call: Optional[str]) -> None:
        if when is None:
            return
        if self._newest is None or when > self._newest:
            self._newest = when
            self._newest_calls = set()
        if when == self._newest and call:
            self._newest_calls.add(str(call))


# -- one line per event ---------------------------------------------------------

#: What a terminal could take for a command: C0 and C1 controls (escape
#: sequences), line and paragraph separators, and bidi overrides that
#: reorder what is shown.  A caller ID reaches the screen escaped.
_DISPLAY_ESCAPES = {code: "\\u%04x" % code for code in
                    list(range(0x20)) + list(range(0x7f, 0xa0)) +
                    [0x2028, 0x2029] + list(range(0x202a, 0x202f)) +
                    list(range(0x2066, 0x206a))}


def _caller(fields: Dict[str, str], prefix: str) -> str:
    """``John Customer <+15551230001>``: a party as a caller is shown."""
    num, name = fields.get(prefix + "_num", ""), fields.get(prefix + "_name", "")
    if name and num and name != num:
        return "%s <%s>" % (name, num)
    return name or num or "unknown"


def _called(fields: Dict[str, str], prefix: str) -> str:
    """``100 (Alice Smith)``: a party as a called number is shown."""
    num, name = fields.get(prefix + "_num", ""), fields.get(prefix + "_name", "")
    if name and num and name != num:
        return "%s (%s)" % (num, name)
    return num or name or "unknown"


def _seconds(fields: Dict[str, str], key: str) -> str:
    return "%s s" % (fields.get(key) or "0")


def _said_incoming(f: Dict[str, str]) -> str:
    parts = []
    if f.get("dialed") and f.get("dialed") != f.get("to_num"):
        parts.append("dialed " + f["dialed"])
    if f.get("queue"):
        parts.append("queue " + f["queue"])
    return "  ".join(parts)


def _said_pickup(f: Dict[str, str], answer: str = "") -> str:
    """A colleague's pickup reads "picked up by Bob Jones <101>"; the
    user's own answer (shown as ``answered``) needs no more words, but
    where: on the mobile the call was forwarded to."""
    method = f.get("method")
    how = " (%s pickup)" % method if method else ""
    answer = answer or answer_of(f)
    if answer == ANSWERED_HERE:
        return "by %s pickup" % method if method else ""
    if answer == ANSWERED_OUTSIDE:
        return "on %s%s" % (_caller(f, "answered_by"), how)
    return "picked up by %s%s" % (_caller(f, "answered_by"), how)


def _said_divert(f: Dict[str, str]) -> str:
    if f.get("direction") == "from":
        return "forwarded from %s" % _called(f, "original")
    return "forwarded to %s%s" % (_called(f, "target"),
                                  " (external)" if f.get("external") == "yes" else "")


def _said_transfer(f: Dict[str, str]) -> str:
    return "%s transfer by %s to %s" % (f.get("kind") or "a", _caller(f, "by"),
                                        _called(f, "target"))


def _said_queue(f: Dict[str, str]) -> str:
    text = "queue %s: %s" % (f.get("queue", ""), f.get("action", ""))
    if f.get("action") == "join":
        text += ", position %s of %s" % (f.get("position", "?"), f.get("count", "?"))
    elif f.get("answered_by_num") or f.get("answered_by_name"):
        text += ", answered by %s" % _caller(f, "answered_by")
    return text


def _said_park(f: Dict[str, str]) -> str:
    return "parked at %s (lot %s) by %s, timeout %s" % (
        f.get("space", "?"), f.get("lot", "?"), _caller(f, "by"), _seconds(f, "timeout"))


def _said_unpark(f: Dict[str, str]) -> str:
    space = f.get("space", "?")
    result = f.get("result")
    if result == "retrieved":
        return "retrieved from %s by %s" % (space, _caller(f, "retrieved_by"))
    if result == "timeout":
        return "parked too long at %s, back to %s" % (space, _caller(f, "parked_by"))
    return "%s at %s" % (result or "unparked", space)


def _said_conference(f: Dict[str, str]) -> str:
    verb = {"join": "joined", "leave": "left"}.get(f.get("action", ""), f.get("action", ""))
    return "%s %s room %s, %s members" % (_caller(f, "who"), verb, f.get("room", "?"),
                                          f.get("members", "?"))


#: How a hangup reason reads on the screen.
_REASON_TEXT = {
    "completed": "ended", "noanswer": "not answered", "busy": "busy",
    "cancelled": "caller hung up", "answered_elsewhere": "answered elsewhere",
    "transferred": "transferred", "failed": "failed",
    "unknown": "ended while the link to the PBX was down",
}


def _said_hangup(f: Dict[str, str]) -> str:
    reason = f.get("reason", "")
    text = "%s after %s" % (_REASON_TEXT.get(reason, reason or "ended"), _seconds(f, "duration"))
    if f.get("talk_time") not in (None, "", "0"):
        text += ", talked %s" % _seconds(f, "talk_time")
    if reason == "failed" and f.get("cause_txt"):
        text += " (%s)" % f["cause_txt"]
    return text


def _said_call(f: Dict[str, str]) -> str:
    return "in progress: %s" % (f.get("state") or "?")


def _said_missed(f: Dict[str, str]) -> str:
    reason = f.get("reason", "")
    if reason == "answered_elsewhere" and (f.get("answered_by_num") or
                                           f.get("answered_by_name")):
        return "answered by %s" % _caller(f, "answered_by")
    return "%s after %s" % (_REASON_TEXT.get(reason, reason), _seconds(f, "duration"))


#: The words after "caller -> called" per kind, one small function each.
_SAID = {
    "incoming": _said_incoming, "outgoing": _said_incoming, "pickup": _said_pickup,
    "timeout": lambda f: "not answered", "busy": lambda f: "busy",
    "divert": _said_divert, "transfer": _said_transfer, "queue": _said_queue,
    "park": _said_park, "unpark": _said_unpark, "conference": _said_conference,
    "hold": lambda f: "on hold by %s" % _caller(f, "by"),
    "unhold": lambda f: "off hold by %s" % _caller(f, "by"),
    "hangup": _said_hangup, "call": _said_call, "missed": _said_missed,
}

#: The fields every call event has; an unknown kind shows the others.
_COMMON_FIELDS = ("event", "call", "time", "role", "device", "from_num", "from_name",
                  "to_num", "to_name")


def _local_time(text: Optional[str], fmt: str) -> str:
    epoch = parse_iso_time(text)
    if epoch is None:
        return "--:--:--"
    return datetime.datetime.fromtimestamp(epoch).strftime(fmt)


def render_event(event: WatchEvent) -> str:
    """One readable line, the time local::

        14:02:11  incoming  John Customer <+15551230001> -> 100 (Alice Smith)  dialed +15557000100

    Missed calls show the date too.  Control characters in caller IDs are
    shown escaped: a line never ends early or moves the cursor.
    """
    f = event.fields
    if event.kind == "missed" and "time" not in f:
        when = _local_time(f.get("end") or f.get("start"), "%Y-%m-%d %H:%M")  # HISTORY
    elif event.kind == Kind.STATE:
        when = _local_time(f.get("since"), "%H:%M:%S")  # since when the state holds
    else:
        when = _local_time(f.get("time"), "%H:%M:%S")
    return ("%s  %-8s  %s" % (when, shown_kind(event), event_text(event))
            ).translate(_DISPLAY_ESCAPES)


def shown_kind(event: WatchEvent) -> str:
    """The kind as a person reads it: the user's own answer is
    ``answered``, a colleague's stays ``pickup``."""
    if event.kind == Kind.PICKUP and (event.answer or answer_of(event.fields)) != ANSWERED_OTHER:
        return "answered"
    return event.kind


def event_text(event: WatchEvent) -> str:
    """``render_event``'s words after the kind (unescaped): also the
    ``{text}`` of a hook."""
    f = event.fields
    if event.kind == "status":
        return _status_text(f)
    if event.kind == Kind.STATE:
        return _board_said(f)
    if event.kind == Kind.PICKUP:
        detail = _said_pickup(f, event.answer)
    else:
        said = _SAID.get(event.kind)
        if said is not None:
            detail = said(f)
        else:
            detail = encode_text_line("", {k: v for k, v in f.items()
                                           if k not in _COMMON_FIELDS}).strip()
    text = "%s -> %s" % (_caller(f, "from"), _called(f, "to"))
    return text + "  " + detail if detail else text


def _status_text(f: Dict[str, str]) -> str:
    if f.get("server") == "stopping":
        return "the ctinotify server is stopping"
    if f.get("board") == "changed":
        return "the board changed (the server's configuration was reloaded)"
    if f.get("server") == "unreachable":
        return "no connection to the ctinotify server" + (": " + f["reason"]
                                                          if f.get("reason") else "")
    if f.get("pbx") == "up":
        return "PBX connected" + ("; the server warns: " + f["warning"]
                                  if f.get("warning") else "")
    if f.get("pbx") == "down":
        return "PBX link down" + (": " + f["reason"] if f.get("reason") else "")
    if f.get("dial"):
        said = _DIAL_SAID.get(f["dial"], _DIAL_SAID["failed"])
        return "dial %s: %s" % (f.get("number", "?"), said.format(
            number=f.get("number", "?"), device=f.get("device", "?"), code=f.get("code", "?"),
            reason=f.get("reason", "?")))
    return encode_text_line("", {k: v for k, v in f.items() if k != "event"}).strip()


# -- the office board: watch --board -------------------------------------------

#: Columns of the board table: name and numbers are cut to these widths.
BOARD_NAME_CHARS = 24
BOARD_NUMBERS_CHARS = 12


def _board_who(f: Dict[str, str]) -> str:
    """``Alice Smith (100)``: a colleague as the board names them."""
    name, numbers = f.get("name") or f.get("user", "?"), f.get("numbers", "")
    return "%s (%s)" % (name, numbers) if numbers and numbers != name else name


def _board_with(f: Dict[str, str]) -> str:
    """``from John Customer <+15551230001>`` (or ``to ...``): with whom,
    for a viewer with board_details; empty otherwise."""
    if not (f.get("with_num") or f.get("with_name")):
        return ""
    if f.get("direction") == "out":
        return "to " + _called(f, "with")
    return "from " + _caller(f, "with")


def _board_said(f: Dict[str, str]) -> str:
    state = f.get("state", "")
    text = "%s: %s" % (_board_who(f), BOARD_STATE_WORDS.get(state, state))
    with_whom = _board_with(f)
    return text + ("  " + with_whom if with_whom else "")


def board_timer(seconds: float) -> str:
    """How long a state has lasted: ``0:07``, ``12:40``, ``1:02:03``, ``2d 03h``."""
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return "%dd %02dh" % (seconds // 86400, seconds % 86400 // 3600)
    if seconds >= 3600:
        return "%d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)
    return "%d:%02d" % (seconds // 60, seconds % 60)


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "~"


class BoardTable:
    """``watch --board``: the office board as a table of text.

    ``reset`` takes the BOARD reply, ``update`` each ``state`` event (a
    colleague not yet on it is added at the end); ``render(now)`` is the
    table with each state's timer at that time, one string per row, and
    ``note`` a line above it (the PBX link down, say).  Control characters
    from the server (a caller ID) are shown escaped: a row stays one row.
    """

    HEADINGS = ("NAME", "NUMBER", "STATE", "FOR", "WITH")

    def __init__(self) -> None:
        #: user -> the fields of their latest line, in the server's order.
        self.rows: Dict[str, Dict[str, str]] = {}
        self.note = ""

    def reset(self, items: Iterable[WatchEvent]) -> None:
        self.rows = {}
        for item in items:
            self.update(item)

    def update(self, event: WatchEvent) -> None:
        self.rows[event.fields.get("user", "")] = event.fields

    def render(self, now: float) -> List[str]:
        table = [self.HEADINGS]
        for f in self.rows.values():
            since = parse_iso_time(f.get("since"))
            state = f.get("state", "")
            table.append((
                _cut((f.get("name") or f.get("user", "?")).translate(_DISPLAY_ESCAPES),
                     BOARD_NAME_CHARS),
                _cut(f.get("numbers", "").translate(_DISPLAY_ESCAPES), BOARD_NUMBERS_CHARS),
                BOARD_STATE_WORDS.get(state, state.translate(_DISPLAY_ESCAPES)),
                board_timer(now - since) if since is not None else "",
                _board_with(f).translate(_DISPLAY_ESCAPES)))
        widths = [max(len(row[col]) for row in table) for col in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4]
                 for row in table]
        if not self.rows:
            lines.append("(nobody on your board)")
        return ([self.note] if self.note else []) + [line.rstrip() for line in lines]
#: ``STATUS dial=...``: what became of a DIAL, in words.
_DIAL_SAID = {
    "answered": "your phone answered, calling {number}",
    "busy": "your phone {device} is busy",
    "noanswer": "your phone {device} did not answer",
    "failed": "your phone {device} could not be rung (Asterisk's reason {code})",
    DIAL_UNKNOWN: "what became of it is not known: {reason}",
}


def is_web_url(url: str) -> bool:
    """Whether ``watch --open`` may hand url to the browser: http or https
    with a host, no spaces or control characters, so never a file, a
    script URL or something a browser could take for an option."""
    if not url or any(c.isspace() or ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


# -- hooks ------------------------------------------------------------------------

#: The placeholders a hook may use: every field an event, a status line or
#: a HISTORY record (a missed call from before) can carry, flattened as in
#: the text format, and ``text``, the words watch shows.  Any other name is
#: a typo, refused at start (it would be filled with "").
HOOK_FIELDS = frozenset((
    "event", "call", "time", "role", "device", "from_num", "from_name", "to_num", "to_name",
    "pbx", "dialed", "queue", "url", "answered_by_num", "answered_by_name",
    "answered_by_device", "method", "direction", "original_num", "original_name",
    "target_num", "target_name", "external", "kind", "by_num", "by_name", "action",
    "position", "count", "space", "lot", "timeout", "result", "parked_by_num",
    "parked_by_name", "retrieved_by_num", "retrieved_by_name", "room", "members", "who_num",
    "who_name", "reason", "cause", "cause_txt", "duration", "talk_time",
    "name", "server", "session", "replay", "warning",                       # status
    "user", "start", "answer", "end", "answered", "answered_by", "path",    # HISTORY
    "state",                                                                # CALL
    "numbers", "since", "with_num", "with_name", "board",                   # board
    "text",                                                                 # watch's words
))
#: The kinds ``--exec`` takes besides the event kinds and their aliases:
#: all (every event kind), missed (a missed call, once, from a hangup or
#: the list at login), status (the PBX link, the server stopping or out of reach).
HOOK_KINDS = ("all", "missed", "status")

#: ``{name}`` in a hook argument; ``{{`` and ``}}`` are literal braces.
_HOOK_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z0-9_]*)\}")


def fill_placeholders(template: str, fields: Dict[str, str]) -> str:
    """Replace each ``{name}`` with ``fields[name]`` (unknown: empty), in one
    pass: a ``{`` in a value is never read as a placeholder again.  A NUL,
    which no program argument can hold, becomes U+FFFD."""
    def fill(match: "re.Match[str]") -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        return fields.get(match.group(1), "").replace("\0", "\ufffd")
    return _HOOK_PLACEHOLDER.sub(fill, template)


class ExecHook:
    """``--exec KIND=COMMAND``: a program run for each event of a kind.

    COMMAND is split once, like a POSIX shell would (``shlex.split``), into
    an argument list; placeholders are then filled inside each argument,
    and the list is run without a shell.  Whatever a caller ID holds
    (quotes, ``;``, ``$(...)``, newlines), it stays inside its argument.
    """

    def __init__(self, kind: str, template: List[str]):
        #: An event kind, or one of HOOK_KINDS.
        self.kind = kind
        self.template = template

    @classmethod
    def parse(cls, spec: str) -> "ExecHook":
        """``incoming=notify-send -- "Call from {from_name}" {from_num}``;
        ValueError says what is wrong.  KIND may be ``answered`` (pickup);
        ``missed`` here is watch's own: a missed call, not every hangup."""
        word, sep, command = spec.partition("=")
        word = word.strip().lower()
        kind = word if word in HOOK_KINDS else (kinds_of(word) or ("",))[0]
        if not sep or not kind:
            raise ValueError("%r: expected KIND=COMMAND, KIND one of: %s, %s, answered"
                             % (spec[:40], ", ".join(HOOK_KINDS), ", ".join(EVENT_KINDS)))
        try:
            template = shlex.split(command)
        except ValueError as e:
            raise ValueError("%r: the command does not split into arguments: %s"
                             % (spec[:40], e))
        if not template:
            raise ValueError("%r: no command after %s=" % (spec[:40], word))
        if any(m.group(1) is not None for m in _HOOK_PLACEHOLDER.finditer(template[0])):
            # Else a caller ID would choose the program.
            raise ValueError("%r: a placeholder in the program name, expected them in "
                             "its arguments only" % spec[:40])
        unknown = sorted({m.group(1) for arg in template for m in _HOOK_PLACEHOLDER.finditer(arg)
                          if m.group(1) is not None and m.group(1) not in HOOK_FIELDS})
        if unknown:
            raise ValueError("%r: unknown placeholder %s, expected any of: %s"
                             % (spec[:40], ", ".join("{%s}" % n for n in unknown),
                                ", ".join("{%s}" % n for n in sorted(HOOK_FIELDS))))
        return cls(kind, template)

    def wants(self, kind: str) -> bool:
        # "all" is every kind of call event: a colleague's state (watch
        # --board) runs only a hook that names it.
        return kind == self.kind or (self.kind == "all" and kind in EVENT_KINDS and
                                     kind != Kind.STATE)

    def argv(self, fields: Dict[str, str]) -> List[str]:
        return [fill_placeholders(arg, fields) for arg in self.template]


# ---------------------------------------------------------------------------
# Replay (no I/O): a recorded trace through parser and engine
# ---------------------------------------------------------------------------


class TraceClock:
    """The time of a recorded message, for replay.

    With ``timestampevents = yes`` in manager.conf every event carries
    ``Timestamp: <epoch>``; without it, the newest channel creation time
    (a Uniqueid is ``epoch.seq``) is the best clock a recording has.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def observe(self, msg: AmiMessage) -> float:
        stamp = sane_epoch(msg.get("Timestamp") or "")
        if stamp is not None:
            self.now = max(self.now, stamp)
            return self.now
        uniqueid = msg.get("Uniqueid")
        if uniqueid:
            epoch = uniqueid_epoch(uniqueid)
            if epoch is not None and epoch > self.now:
                self.now = epoch
        return self.now


def replay_trace(stream, users: Dict[str, UserConfig], chunk_bytes: int = 1 << 16,
                 pbx: str = DEFAULT_PBX, tag: str = ""):
    """Feed a recorded AMI byte stream through parser and engine; yield
    ``(user, fields)`` for every notification a client of that user with
    all its allowed kinds would receive.  ``pbx`` is the PBX it was
    recorded on (for devices named ``NAME:...``); ``tag`` the ``pbx`` field
    events carry when the configuration has several."""
    engine = CallEngine(Directory(users.values(), pbx), tag)
    clock = TraceClock()
    first = stream.read(chunk_bytes)
    parser = AmiParser(expect_banner=first.startswith(AMI_BANNER_PREFIX.encode()))
    data = first
    while data:
        for msg in parser.feed(data):
            for note in engine.handle(msg, clock.observe(msg)):
                account = users.get(note.user)
                if account is not None and note.kind in account.events:
                    yield note.user, with_popup_url(note.fields, account)
        for problem in parser.problems:
            log.warning("replay: %s", problem)
        parser.problems.clear()
        data = stream.read(chunk_bytes)


# ---------------------------------------------------------------------------
# Event loop and I/O: from here on, sockets, clocks, files and signals
# ---------------------------------------------------------------------------


#: Socket options of every accepted client connection (those this
#: platform has): no Nagle delay for small event lines, TCP keepalive to
#: find peers that vanished without a FIN, and a bounded kernel send buffer.
_CLIENT_SOCKOPTS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                    (socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF_BYTES)]
for _name, _value in (("TCP_KEEPIDLE", CLIENT_KEEPALIVE_IDLE_S),
                      ("TCP_KEEPINTVL", CLIENT_KEEPALIVE_INTERVAL_S),
                      ("TCP_KEEPCNT", CLIENT_KEEPALIVE_PROBES)):
    if hasattr(socket, _name):
        _CLIENT_SOCKOPTS.append((socket.IPPROTO_TCP, getattr(socket, _name), _value))

#: A non-blocking TLS socket that needs the peer (or the kernel) first:
#: like BlockingIOError, not an error.
_SSL_WOULD_BLOCK: tuple = ((ssl.SSLWantReadError, ssl.SSLWantWriteError)
                           if ssl is not None else ())


_WOULD_BLOCK = (BlockingIOError, InterruptedError) + _SSL_WOULD_BLOCK


def send_some(sock: socket.socket, buf: bytearray) -> Optional[str]:
    """Write what the socket takes now and drop it from ``buf``; the rest
    waits for the next writable (CPython selector_events).  Returns why the
    connection is broken, or None."""
    try:
        sent = sock.send(buf)
    except _WOULD_BLOCK:
        return None
    except OSError as e:
        return "write failed: %s" % _error_text(e)
    del buf[:sent]
    return None


def recv_some(sock: socket.socket, size: int) -> Tuple[Optional[bytes], str]:
    """``(data, "")``; ``(None, "")`` when nothing can be read now;
    ``(b"", "")`` at the peer's end of stream; ``(None, why)`` when broken."""
    try:
        return sock.recv(size), ""
    except _WOULD_BLOCK:
        return None, ""
    except OSError as e:
        return None, "read failed: %s" % _error_text(e)


def _error_text(error: Exception) -> str:
    """A short reason for a socket or TLS error, for the log."""
    if ssl is not None and isinstance(error, ssl.SSLCertVerificationError):
        return "certificate verify failed: %s" % error.verify_message
    if ssl is not None and isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


# ---------------------------------------------------------------------------
# I/O: the loop (selector, timers, clock)
# ---------------------------------------------------------------------------


class Timer:
    """A call Timers will make at ``when`` (monotonic), unless cancelled."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback):  # type: ignore[no-untyped-def]
        self.when = when
        self.callback = callback
        #: Cancelled, or made already: either way, it will not be made.
        self.cancelled = False


class Timers:
    """Every deadline of the daemon in one heap (Redis' ae.c, asyncio's
    ``_scheduled``): the nearest is the select timeout.  A cancelled timer
    stays until it comes up, or until cancelled ones are most of the heap,
    which is then rebuilt: memory follows the live timers, whatever a flood
    of short connections leaves behind."""

    #: Below this many cancelled timers the heap is never rebuilt.
    COMPACT_AFTER = 256

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Timer]] = []
        self._seq = 0
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, callback) -> Timer:  # type: ignore[no-untyped-def]
        """Call ``callback(now)`` once ``when`` has come."""
        timer = Timer(when, callback)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))
        return timer

    def cancel(self, timer: Optional[Timer]) -> None:
        if timer is None or timer.cancelled:
            return
        timer.cancelled = True
        self._cancelled += 1
        if self._cancelled > self.COMPACT_AFTER and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_due(self) -> Optional[float]:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> None:
        """Make the calls due by ``now``; those they set for now or earlier
        wait for the next pass, so no timer can hold the loop."""
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.cancelled = True
                due.append(timer)
        for timer in due:
            timer.callback(now)


class Loop:
    """What every connection and link shares: the selector, the timers, the
    clock and a rate-limited log.  The clock is read once per pass, after
    select: ``now`` (monotonic) for deadlines, ``wall`` for the times events
    carry; everything done in one pass sees the same time."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.now = time.monotonic()
        self.wall = time.time()
        #: Repeated warnings: kind -> [when last logged, how many left out since].
        self._repeats: Dict[str, List[float]] = {}

    def tick(self) -> None:
        self.now = time.monotonic()
        self.wall = time.time()

    def at(self, when: float, callback) -> Timer:  # type: ignore[no-untyped-def]
        return self.timers.at(when, callback)

    def run_once(self) -> None:
        """Wait for sockets until the nearest timer, then serve them."""
        due = self.timers.next_due()
        ready = self.selector.select(None if due is None else max(0.0, due - self.now))
        self.tick()
        for key, mask in ready:
            key.data(mask)  # the handler registered with the socket

    def run_timers(self, now: Optional[float] = None) -> None:
        if now is not None:
            self.now = now
        self.timers.run_due(self.now)

    def forget(self, sock: socket.socket) -> None:
        """Take a socket out of the selector, if it is in."""
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        self.selector.close()

    def log_repeated(self, kind: str, level: int, fmt: str, *args: object) -> None:
        """Log at most once per LOG_REPEAT_INTERVAL_S per kind, so a flood
        (of connections, of bad messages) cannot flood the log as well."""
        now = self.now
        entry = self._repeats.get(kind)
        if entry is not None and now - entry[0] < LOG_REPEAT_INTERVAL_S:
            entry[1] += 1
            return
        if entry is not None and entry[1]:
            fmt += " (and %d more like it in the last %d s)"
            args += (int(entry[1]), int(now - entry[0]))
        if len(self._repeats) >= 256:
            self._repeats.clear()  # kinds are few; this only bounds odd ones
        self._repeats[kind] = [now, 0]
        log.log(level, fmt, *args)


# ---------------------------------------------------------------------------
# I/O: client connections, the line protocol on them, the hub of them all
# ---------------------------------------------------------------------------

#: The states of a client connection, in the order it goes through them.
CONN_HANDSHAKING = "handshaking"  # TLS, before anything else
CONN_OPEN = "open"
CONN_CLOSING = "closing"          # the last reply queued: write it, FIN, wait for the peer's
CONN_CLOSED = "closed"


class ClientConnection:
    """One accepted client socket: its TLS handshake, its output buffer with
    its limits, and a close that never leaves the peer without its last
    reply (CPython's selector transports).  The protocol spoken on it is a
    subclass (LineClient), which the listener names.

    Each state has at most one deadline, ``deadline``, and ``_EXPIRED``
    names what happens when it passes: a TLS handshake and a login must end
    within ``login_timeout``; a closing connection waits ``linger_timeout``
    at most.  Output past the hard limit, or over the soft one for too long,
    marks the connection (``overflow``): the hub closes it in its flush
    after the pass, never from inside a write or a delivery.
    """

    __slots__ = ("hub", "sock", "peer", "host", "host_key", "_tag", "tls", "state", "outbuf",
                 "events", "closing", "close_level", "shut", "peer_eof", "overflow",
                 "soft_since", "deadline", "_timer")

    #: state -> the method called when its deadline passes.
    _EXPIRED = {CONN_HANDSHAKING: "_handshake_expired", CONN_OPEN: "open_expired",
                CONN_CLOSING: "_linger_expired"}
    #: What the listener's log line calls the peers.
    PEERS = "clients"

    def __init__(self, hub: "ClientHub", sock: socket.socket, peer: Tuple, tls: bool):
        self.hub = hub
        self.sock = sock
        self.peer = peer
        self.host = peer[0] if peer else "?"
        #: What per-address limits count this connection under (address_key).
        self.host_key = address_key(self.host)
        self._tag = "client %s:%s" % (self.host, peer[1] if peer else "?")
        self.tls = tls
        self.state = CONN_HANDSHAKING if tls else CONN_OPEN
        self.outbuf = bytearray()
        #: The selector events the socket is registered for (0: none).
        self.events = 0
        #: Once closing: why (for the log), and the level to log it at.
        self.closing = ""
        self.close_level = logging.INFO
        #: Our side sent its FIN; the peer sent its own.
        self.shut = False
        self.peer_eof = False
        #: Why the output went over a limit: it is closed after the pass.
        self.overflow: Optional[str] = None
        #: When the output buffer went over the soft limit (monotonic).
        self.soft_since: Optional[float] = None
        #: When this state's wait ends (monotonic); None: no limit.
        self.deadline: Optional[float] = hub.loop.now + hub.config.login_timeout
        self._timer: Optional[Timer] = None

    @property
    def tag(self) -> str:
        """For log lines: ``client HOST:PORT`` (the protocol may say more)."""
        return self._tag

    @property
    def closed(self) -> bool:
        return self.state == CONN_CLOSED

    @property
    def user(self) -> Optional[UserConfig]:
        """The account logged in on this connection: its events come here."""
        return None

    @property
    def fmt(self) -> str:
        """The format notifications and STATUS lines are sent in."""
        return "text"

    def wants(self, kind: str) -> bool:
        """Whether a notification of this kind is for this connection."""
        return False

    # -- what a protocol overrides --------------------------------------------

    def connection_made(self) -> None:
        """The connection is open (after its TLS handshake)."""

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer, while open."""

    def eof_received(self) -> None:
        """The peer will send no more (it may still read): by default, close
        once the output is written."""
        self.finish("closed by the client")

    def open_expired(self, now: float) -> None:
        """The open state's deadline passed."""

    def before_finish(self) -> None:
        """The connection is about to close: queue what it still owes."""

    def connection_lost(self) -> None:
        """The socket is closed: drop what the protocol holds."""

    def account_changed(self, users: Dict[str, UserConfig]) -> None:
        """A reload: the session goes on with its account as it is now, or ends."""

    @staticmethod
    def refusal_bytes(status: int, text: str) -> bytes:
        """What a connection refused at accept is sent (plain text only)."""
        return ("ERR %d %s\r\n" % (status, text)).encode("utf-8")

    # -- events from the loop -------------------------------------------------

    def start(self) -> None:
        """Registered with the selector: greet, or begin the TLS handshake."""
        self.set_deadline(self.deadline)
        if self.state == CONN_HANDSHAKING:
            self._handshake()
        else:
            self.connection_made()

    def on_ready(self, mask: int) -> None:
        """The selector callback."""
        if self.state == CONN_CLOSED:
            return  # closed earlier in this same pass
        try:
            if self.state == CONN_HANDSHAKING:
                self._handshake()
                return
            if mask & selectors.EVENT_WRITE:
                self.send()
            if mask & selectors.EVENT_READ and self.state != CONN_CLOSED:
                self._read()
        except Exception:
            # Our bug: close this one connection, keep serving the others.
            log.exception("%s: internal error, closing the connection", self.tag)
            self.close("internal error", logging.ERROR)

    def _handshake(self) -> None:
        """One step of a server-side TLS handshake, never blocking."""
        assert ssl is not None
        try:
            self.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self.watch(selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self.watch(selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as e:
            self.close("TLS handshake failed: %s" % _error_text(e), logging.WARNING)
            return
        self.state = CONN_OPEN
        log.debug("%s: TLS established (%s)", self.tag,
                  self.sock.version())  # type: ignore[attr-defined]
        self.connection_made()
        self.watch()

    def _read(self) -> None:
        # A TLS socket may hold more decrypted bytes than one recv returns.
        for _ in range(16):
            data, broken = recv_some(self.sock, CLIENT_RECV_BYTES)
            if broken:
                self.close(broken)
                return
            if data is None:
                return
            if not data:
                self.peer_eof = True
                if self.state == CONN_OPEN:
                    self.eof_received()  # answer what it sent, then close
                elif self.shut or not self.outbuf:
                    self.close(self.closing, self.close_level)
                else:
                    self.watch()  # write the rest, then close
                return
            if self.state == CONN_OPEN:
                self.data_received(data)  # closing: discarded
            if self.state == CONN_CLOSED or \
                    not (self.tls and self.sock.pending()):  # type: ignore[attr-defined]
                return

    # -- deadlines -------------------------------------------------------------

    def set_deadline(self, when: Optional[float]) -> None:
        """This state's deadline (None: none); the timer follows."""
        self.deadline = when
        times = [t for t in (when, self._soft_deadline()) if t is not None]
        due = min(times) if times else None
        timer = self._timer
        if timer is not None and not timer.cancelled and timer.when == due:
            return
        self.hub.loop.timers.cancel(timer)
        self._timer = self.hub.loop.at(due, self._on_timer) if due is not None else None

    def _soft_deadline(self) -> Optional[float]:
        if self.soft_since is None or self.overflow is not None:
            return None
        return self.soft_since + self.hub.config.client_buffer_soft_seconds

    def _on_timer(self, now: float) -> None:
        if self.state == CONN_CLOSED:
            return
        try:
            soft_deadline = self._soft_deadline()
            if soft_deadline is not None and now >= soft_deadline:
                cfg = self.hub.config
                self.over_limit("output buffer over the soft limit of %d bytes for %g s: "
                                "client not reading" % (cfg.client_buffer_soft,
                                                        cfg.client_buffer_soft_seconds))
            if self.deadline is not None and now >= self.deadline:
                getattr(self, self._EXPIRED[self.state])(now)
        except Exception:
            log.exception("%s: internal error, closing the connection", self.tag)
            self.close("internal error", logging.ERROR)
        if self.state != CONN_CLOSED:
            self.set_deadline(self.deadline)

    def _handshake_expired(self, now: float) -> None:
        self.close("no TLS handshake within %g s" % self.hub.config.login_timeout,
                   logging.WARNING)

    def _linger_expired(self, now: float) -> None:
        self.close(self.closing, self.close_level)

    # -- writing ---------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        """Output for the next flush (nothing once closing or over a limit)."""
        if self.state != CONN_OPEN or self.overflow is not None:
            return
        outbuf = self.outbuf
        outbuf += data
        self.hub.dirty.add(self)
        size = len(outbuf)
        cfg = self.hub.config
        if size > cfg.client_buffer_hard:
            self.over_limit("output buffer of %d bytes over the hard limit of %d: "
                            "client not reading" % (size, cfg.client_buffer_hard))
        elif cfg.client_buffer_soft and size > cfg.client_buffer_soft and \
                self.soft_since is None:
            self.soft_since = self.hub.loop.now
            self.set_deadline(self.deadline)

    def over_limit(self, reason: str) -> None:
        """Mark the connection over an output limit; the flush after this
        pass closes it.  Marking, not closing, keeps every loop over the
        clients (a delivery, a status broadcast) safe from a set changing
        under it."""
        if self.overflow is None:
            self.overflow = reason
            self.outbuf.clear()
            self.hub.dirty.add(self)

    def flush(self) -> None:
        """Once per pass, before the loop sleeps: write, or close if over a limit."""
        if self.state == CONN_CLOSED:
            return
        if self.overflow is not None:
            self.close(self.overflow, logging.WARNING)
        else:
            self.send()

    def send(self) -> None:
        if self.state in (CONN_CLOSED, CONN_HANDSHAKING):
            return
        if self.outbuf:
            broken = send_some(self.sock, self.outbuf)
            if broken:
                self.close(broken)
                return
        if self.soft_since is not None and len(self.outbuf) <= self.hub.config.client_buffer_soft:
            self.soft_since = None  # its timer finds nothing to do
        if self.state == CONN_CLOSING and not self.outbuf:
            self._shut()
            if self.state == CONN_CLOSED:
                return
        self.watch()

    def watch(self, events: Optional[int] = None) -> None:
        """Register for what the connection waits for now: reading unless
        the peer is done, writing while output waits."""
        if events is None:
            events = (0 if self.peer_eof else selectors.EVENT_READ) | \
                (selectors.EVENT_WRITE if self.outbuf else 0)
        if events == self.events:
            return
        selector = self.hub.loop.selector
        # Nothing to wait for (the peer closed its side, a failed-login
        # reply is held back): out of the selector, or EOF would wake it.
        if not events:
            selector.unregister(self.sock)
        elif not self.events:
            selector.register(self.sock, events, self.on_ready)
        else:
            selector.modify(self.sock, events, self.on_ready)
        self.events = events

    # -- closing ----------------------------------------------------------------

    def finish(self, reason: str, reply: bytes = b"", level: int = logging.INFO) -> None:
        """Send a last reply, then close: never leave a peer hanging.

        The close waits until the reply is written, sends a FIN and reads
        (discarding) until the peer's FIN, at most ``linger_timeout``:
        closing at once with input unread would reset the connection and
        could destroy the reply before the peer reads it."""
        if self.state == CONN_HANDSHAKING:
            self.close(reason, level)
            return
        if self.state != CONN_OPEN:
            return
        self.before_finish()
        if reply:
            self.queue(reply)
        self.state = CONN_CLOSING
        self.closing = reason
        self.close_level = level
        self.set_deadline(self.hub.loop.now + self.hub.config.linger_timeout)
        self.hub.dirty.add(self)

    def _shut(self) -> None:
        """The last reply is out: send our FIN, wait for the peer's."""
        if self.shut:
            return
        self.shut = True
        if self.peer_eof or self.tls:
            # The peer is done already; or TLS, where a half-close would
            # leave the TLS layer behind: close now.
            self.close(self.closing, self.close_level)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(self.closing, self.close_level)

    def close(self, reason: str, level: int = logging.INFO) -> None:
        if self.state == CONN_CLOSED:
            return
        self.state = CONN_CLOSED
        self.log_close(reason, level)
        self.hub.forget(self)
        self.hub.loop.timers.cancel(self._timer)
        self._timer = None
        self.hub.loop.forget(self.sock)
        self.sock.close()
        self.outbuf.clear()
        self.connection_lost()

    def log_close(self, reason: str, level: int) -> None:
        if level >= logging.WARNING:
            # Misbehaviour before a login: logged, but at most once per
            # interval for each reason, whoever floods us with it.
            self.hub.loop.log_repeated("close: " + reason, level, "%s: disconnected: %s",
                                       self.tag, reason)
        else:
            log.debug("%s: disconnected: %s", self.tag, reason)


class LineClient(ClientConnection):
    """The line protocol on a client connection: a LineFramer in, the
    ClientSession's replies out.  The reply to a failed login is held back
    for the throttle's delay (the connection's further input waits, the
    other clients do not); once logged in, the user's notifications and
    STATUS lines follow.  Until then only replies are sent, and a login
    must come within ``login_timeout``."""

    __slots__ = ("session", "framer", "login_by", "hold_until", "held")

    def __init__(self, hub: "ClientHub", sock: socket.socket, peer: Tuple, tls: bool):
        super().__init__(hub, sock, peer, tls)
        self.session = ClientSession(self.host, tag=self._tag)
        self.session.reply_to = self  # late replies to DIAL, HANGUP, TRANSFER
        self.framer = LineFramer(MAX_CLIENT_LINE_BYTES, MAX_CLIENT_PENDING_INPUT_BYTES)
        # Junk before a login closes the connection (README, Security).
        self.framer.text_only = True
        #: No login by then: ERR 408, closed (monotonic).
        self.login_by = self.deadline
        #: The reply to a failed login is held back until then (monotonic).
        self.hold_until: Optional[float] = None
        self.held: List[bytes] = []

    @property
    def tag(self) -> str:
        return self.session.tag

    @property
    def user(self) -> Optional[UserConfig]:
        return self.session.user

    @property
    def fmt(self) -> str:
        """The notification format: ``text`` or ``json``."""
        return self.session.fmt

    def wants(self, kind: str) -> bool:
        return kind in self.session.kinds

    def connection_made(self) -> None:
        # DEBUG until it logs in: anyone can connect, so connections must
        # not be able to flood the log.
        log.debug("%s: connected%s", self.tag, " (TLS)" if self.tls else "")
        self.queue((ClientSession.greeting() + "\r\n").encode("utf-8"))

    def data_received(self, data: bytes) -> None:
        self.framer.receive_data(data)
        self._process_input()

    def eof_received(self) -> None:
        if self.hold_until is not None or self.session.awaiting:
            self.watch()  # _release or _resume answers the rest, then closes
        else:
            self.finish("closed by the client")

    def _process_input(self) -> None:
        """Run the complete lines received, unless a reply is held back."""
        try:
            while self.state == CONN_OPEN and self.hold_until is None and \
                    not self.session.awaiting:
                line = self.framer.next_line()
                if line is None:
                    break
                self._line(line)
            if self.state == CONN_OPEN:
                self.framer.check()
        except ClientProtocolError as e:
            self.finish(e.reason, ("ERR %s %s\r\n" % (e.code, e.text)).encode("utf-8"),
                        logging.WARNING)

    def _line(self, text: str) -> None:
        session = self.session
        was_user = session.user
        failures = session.failed_logins
        replies = [(reply.replace("\r", " ").replace("\n", " ") + "\r\n").encode("utf-8")
                   for reply in session.handle_line(text, self.hub.view)]
        if session.failed_logins > failures and self._hold(replies):
            return
        for data in replies:
            self.queue(data)
        if session.user is not None and was_user is None:
            self.framer.text_only = False
            self.hub.throttle.account_succeeded(session.user.name, self.host_key)
            self.hub.subscribe(self, session.user.name)
            for fields in self.hub.view.pbx_statuses():
                self.queue(encode_status(fields, session.fmt))
            self._update_deadline()
        if session.closing:
            self.finish(session.close_reason)

    def _hold(self, replies: List[bytes]) -> bool:
        """A failed login: the throttle's verdict.  True if the replies are
        held back (they wait in the loop, never in a sleep)."""
        throttle, now = self.hub.throttle, self.hub.loop.now
        name = self.session.failed_as[:64]
        delay, blocked, pause = throttle.login_failed(name, self.host_key, now)
        if pause:
            self.hub.loop.log_repeated("account " + name, logging.WARNING,
                                       "%s: logins as %r held back %g s: more than %d failed "
                                       "logins as it lately", self.tag, name, pause,
                                       LOGIN_ACCOUNT_FREE)
        if blocked:
            log.warning("client %s: logins from %s blocked for %g s after %d failed logins",
                        self.host, self.host_key, throttle.block_s, throttle.block_after)
            self.session.request_close("logins from the address blocked")
        if delay <= 0:
            return False
        log.debug("%s: reply to the failed login delayed %g s", self.tag, delay)
        self.hold_until = now + delay
        self.held.extend(replies)
        self._update_deadline()
        return True

    def _release(self) -> None:
        """A held failed-login reply is due: send it, go on with the input."""
        self.hold_until = None
        held, self.held = self.held, []
        for data in held:
            self.queue(data)
        if self.session.closing:
            self.finish(self.session.close_reason)
            return
        self._update_deadline()
        self._process_input()
        if self.peer_eof and self.hold_until is None:
            self.finish("closed by the client")
        else:
            self.watch()

    def action_reply(self, line: str) -> None:
        """The reply to this connection's DIAL, HANGUP or TRANSFER, once
        Asterisk answered: queued now, and the commands held behind it go
        on in this pass's timers (never from inside the AMI link's read)."""
        if self.state != CONN_OPEN:
            return
        self.session.awaiting = False
        self.queue((line.replace("\r", " ").replace("\n", " ") + "\r\n").encode("utf-8"))
        self.hub.loop.at(self.hub.loop.now, self._resume)

    def action_status(self, fields: Dict[str, object]) -> None:
        """What became of a DIAL (OriginateResponse): a STATUS line."""
        if self.state == CONN_OPEN:
            self.queue(encode_status(fields, self.session.fmt))

    def _resume(self, now: float) -> None:
        if self.state != CONN_OPEN or self.session.awaiting:
            return
        try:
            self._process_input()
            if self.state == CONN_OPEN and self.peer_eof and self.hold_until is None and \
                    not self.session.awaiting:
                self.finish("closed by the client")
            elif self.state == CONN_OPEN:
                self.watch()
        except Exception:
            log.exception("%s: internal error, closing the connection", self.tag)
            self.close("internal error", logging.ERROR)

    def _update_deadline(self) -> None:
        if self.state != CONN_OPEN:
            return
        times = [t for t in (self.login_by if self.session.user is None else None,
                             self.hold_until) if t is not None]
        self.set_deadline(min(times) if times else None)

    def open_expired(self, now: float) -> None:
        if self.hold_until is not None and now >= self.hold_until:
            self._release()
        if self.state == CONN_OPEN and self.session.user is None and self.login_by <= now:
            self.finish("no login within %g s" % self.hub.config.login_timeout,
                        b"ERR 408 login timeout\r\n")

    def before_finish(self) -> None:
        held, self.held, self.hold_until = self.held, [], None
        for data in held:
            self.queue(data)
        self.framer.clear()

    def end_session(self, reason: str) -> None:
        """Close a logged-in session, telling the client why first."""
        fields: Dict[str, object] = {"session": "closed", "reason": reason,
                                     "time": iso_time(self.hub.loop.wall)}
        self.finish(reason, encode_status(fields, self.session.fmt))

    def account_changed(self, users: Dict[str, UserConfig]) -> None:
        """A reload: the session goes on with its account as it is now, or
        ends if the account is gone, its secret changed or its address is
        no longer allowed."""
        account = self.session.user
        if account is None or self.state != CONN_OPEN:
            return
        fresh = users.get(account.name)
        if fresh is None:
            self.end_session("account removed by reload")
        elif fresh.secret != account.secret:
            self.end_session("secret changed by reload")
        elif not fresh.host_allowed(self.host):
            self.end_session("address no longer allowed by host= after reload")
        else:
            self.session.account_changed(fresh)

    def log_close(self, reason: str, level: int) -> None:
        if self.session.user is not None:
            log.log(level, "%s: disconnected: %s", self.tag, reason)
        else:
            super().log_close(reason, level)

    def connection_lost(self) -> None:
        self.framer.clear()
        self.held.clear()


def board_bytes(entry: BoardEntry, details: bool, fmt: str) -> bytes:
    """A board change in a connection's format: its ``EVENT state`` line
    (encoded once per kind of viewer), or on an event stream an SSE event
    without an id (a page that reconnects asks for the board again)."""
    if fmt == SSE_FORMAT:
        return encode_sse_event(entry.fields(details))
    return entry.event_bytes(details, fmt)


def status_bytes(fields: Dict[str, object], fmt: str) -> bytes:
    """A link or server status in a connection's format: a STATUS line, or
    on an event stream an SSE event without an id (status is not replayed:
    each stream starts with the links' status as they are then)."""
    if fmt == SSE_FORMAT:
        return encode_sse_event(dict({"event": "status"}, **fields))
    return encode_status(fields, fmt)


class HttpClient(ClientConnection):
    """HTTP on a client connection (``web_port``): an HttpRequestParser in,
    route_web_request's responses out, one request at a time; ``GET
    /events`` turns the connection into an event stream for its user.

    Nothing a browser sends can hold the loop or the connection forever:
    the head of each request must be in within ``web_request_timeout``
    (HTTP_HEADER_TIMEOUT_S) of the accept or of the previous response (408
    if it was begun, else a silent close: the keep-alive idle timeout), its
    body within as long again after its head; input waiting behind a
    held-back reply is bounded.  A
    failed login's reply is held back for the throttle's delay, as LOGIN's;
    three on one connection close it.  A stream takes no more input, gets
    its user's events and status lines from the hub (SSE_FORMAT), a
    heartbeat comment every SSE_HEARTBEAT_S, and the line clients' output
    limits."""

    __slots__ = ("parser", "stream", "account", "request_by", "body_by", "hold_until",
                 "held", "failed_logins", "owed")

    #: What the listener's log line calls the peers.
    PEERS = "web browsers"

    def __init__(self, hub: "ClientHub", sock: socket.socket, peer: Tuple, tls: bool):
        super().__init__(hub, sock, peer, tls)
        self._tag = "web %s:%s" % (self.host, peer[1] if peer else "?")
        self.parser: Optional[HttpRequestParser] = HttpRequestParser()
        #: Once ``GET /events`` is answered: the stream, and its account as
        #: it is now (a reload may change its event kinds).
        self.stream: Optional[WebStream] = None
        self.account: Optional[UserConfig] = None
        #: The next request's head must be in by then; its body by body_by.
        self.request_by = self.deadline
        self.body_by: Optional[float] = None
        #: A failed login's response, held back until hold_until: (bytes, keep-alive).
        self.hold_until: Optional[float] = None
        self.held: Optional[Tuple[bytes, bool]] = None
        self.failed_logins = 0
        #: ``POST /action`` sent to Asterisk: (keep-alive) until it answers
        #: (the ActionDesk guarantees an answer within ``action_timeout``).
        self.owed: Optional[bool] = None

    @staticmethod
    def refusal_bytes(status: int, text: str) -> bytes:
        return encode_response(error_response(status, text), keep_alive=False)

    @property
    def user(self) -> Optional[UserConfig]:
        return self.account

    @property
    def fmt(self) -> str:
        return SSE_FORMAT

    def wants(self, kind: str) -> bool:
        return self.account is not None and kind in self.account.events

    def connection_made(self) -> None:
        log.debug("%s: connected%s", self.tag, " (TLS)" if self.tls else "")
        self.request_by = self.hub.loop.now + self.hub.config.web_request_timeout
        self._update_deadline()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return  # an event stream: the browser has nothing more to say
        self.parser.receive_data(data)
        if self.hold_until is not None and \
                self.parser.buffered_bytes > MAX_HTTP_PENDING_INPUT_BYTES:
            self._refuse(HttpProtocolError(400, "more than %d bytes sent ahead of a reply"
                                           % MAX_HTTP_PENDING_INPUT_BYTES))
            return
        self._process_input()

    def eof_received(self) -> None:
        if self.parser is not None:
            self.parser.receive_data(b"")
        if self.hold_until is not None or self.owed is not None:
            self.watch()  # _release or action_reply answers, then closes
            return
        self._process_input()
        self.finish("closed by the client")

    def _process_input(self) -> None:
        """Answer the complete requests received, one at a time, unless a
        reply is held back or the connection became a stream."""
        try:
            while self.state == CONN_OPEN and self.parser is not None and \
                    self.hold_until is None and self.owed is None:
                event = self.parser.next_event()
                if event is None:
                    break
                if isinstance(event, HttpContinue):
                    self.queue(HTTP_CONTINUE_BYTES)
                else:
                    self._request(event)
        except HttpProtocolError as e:
            self._refuse(e)
            return
        parser = self.parser
        if self.state == CONN_OPEN and parser is not None and self.hold_until is None and \
                self.owed is None:
            if parser.state == "body" and self.body_by is None:
                self.body_by = self.hub.loop.now + self.hub.config.web_request_timeout
            self._update_deadline()

    def _refuse(self, error: HttpProtocolError) -> None:
        """A request we do not take: its 4xx (or 5xx), then close."""
        self.parser = None
        self.finish("refused: %d %s" % (error.status, error.text),
                    http_error_bytes(error, self.hub.loop.wall), logging.WARNING)

    def _request(self, request: HttpRequest) -> None:
        hub, now = self.hub, self.hub.loop.now
        reply = route_web_request(request, hub.view, self.host, now, self.tls, self.tag)
        self.body_by = None
        log.debug("%s: %s %s %d", self.tag, request.method, request.path[:80],
                  reply.response.status)
        if reply.failed_login:
            self.failed_logins += 1
            if self.failed_logins >= MAX_LOGIN_ATTEMPTS_PER_CONNECTION:
                reply.close = True
        keep = request.keep_alive and not reply.close
        data = encode_response(reply.response, keep, request.method == "HEAD", hub.loop.wall)
        if reply.ended:
            hub.end_web_sessions(reply.ended, "logged out")
        hub.watch_sessions()
        if reply.stream is not None:
            self.queue(data)
            self._start_stream(reply.stream)
        elif reply.owed is not None:
            reply.owed.conn, reply.owed.to_streams = self, hub.web_action_status
            self.owed = keep
            self.set_deadline(None)
        elif reply.delay_s > 0:
            self.hold_until = now + reply.delay_s
            self.held = (data, keep)
            self._update_deadline()
        else:
            self._respond(data, keep)

    def _respond(self, data: bytes, keep: bool) -> None:
        self.queue(data)
        if keep:
            self.request_by = self.hub.loop.now + self.hub.config.web_request_timeout
        else:
            self.parser = None
            self.finish("answered, not kept alive")

    def _start_stream(self, stream: WebStream) -> None:
        account = self.hub.view.users.get(stream.user)
        if account is None:  # the route just found it: cannot happen
            self.finish("no such account")
            return
        self.stream, self.account, self.parser = stream, account, None
        self._tag = "web %s@%s" % (account.name, self._tag.partition(" ")[2])
        self.hub.subscribe(self, account.name)
        self.hub.add_stream(self)
        self.set_deadline(None)

    def _release(self) -> None:
        """A held-back reply is due: send it, go on with the input."""
        held, self.held, self.hold_until = self.held, None, None
        if held is not None:
            self._respond(*held)
        if self.state != CONN_OPEN:
            return
        self._process_input()
        if self.peer_eof and self.hold_until is None:
            self.finish("closed by the client")
        else:
            self.watch()

    def action_reply(self, line: str) -> None:
        """Asterisk answered this connection's ``POST /action``: its
        response now, and the requests behind it in this pass's timers."""
        keep, self.owed = self.owed, None
        if keep is None or self.state != CONN_OPEN:
            return
        self._respond(encode_response(action_response(line), keep, False,
                                      self.hub.loop.wall), keep)
        if self.state == CONN_OPEN:
            self.hub.loop.at(self.hub.loop.now, self._resume)

    def _resume(self, now: float) -> None:
        if self.state != CONN_OPEN or self.owed is not None or self.hold_until is not None:
            return
        try:
            self._process_input()
            if self.state == CONN_OPEN and self.peer_eof and self.owed is None:
                self.finish("closed by the client")
            elif self.state == CONN_OPEN:
                self.watch()
        except Exception:
            log.exception("%s: internal error, closing the connection", self.tag)
            self.close("internal error", logging.ERROR)

    def _update_deadline(self) -> None:
        if self.state != CONN_OPEN or self.stream is not None or self.owed is not None:
            return
        if self.hold_until is not None:
            self.set_deadline(self.hold_until)
        else:
            self.set_deadline(self.body_by if self.body_by is not None else self.request_by)

    def open_expired(self, now: float) -> None:
        if self.hold_until is not None:
            if now >= self.hold_until:
                self._release()
            return
        if self.parser is None or self.stream is not None or self.owed is not None:
            return
        timeout = self.hub.config.web_request_timeout
        if self.body_by is not None and now >= self.body_by:
            self._refuse(HttpProtocolError(408, "no request body within %g s" % timeout))
        elif now >= self.request_by:
            if self.parser.in_progress:
                self._refuse(HttpProtocolError(408, "no request within %g s" % timeout))
            else:
                self.parser = None
                self.finish("idle for %g s" % timeout)

    def before_finish(self) -> None:
        held, self.held, self.hold_until = self.held, None, None
        if held is not None:
            self.queue(held[0])

    def end_session(self, reason: str) -> None:
        """Close an event stream, telling the page why first."""
        fields: Dict[str, object] = {"session": "closed", "reason": reason,
                                     "time": iso_time(self.hub.loop.wall)}
        self.finish(reason, status_bytes(fields, SSE_FORMAT))

    def account_changed(self, users: Dict[str, UserConfig]) -> None:
        """A reload: a stream goes on with its account as it is now, or ends
        as a line client's session would (the store ends web sessions)."""
        account = self.account
        if account is None or self.state != CONN_OPEN:
            return
        fresh = users.get(account.name)
        if fresh is None:
            self.end_session("account removed by reload")
        elif fresh.secret != account.secret:
            self.end_session("secret changed by reload")
        elif not fresh.host_allowed(self.host):
            self.end_session("address no longer allowed by host= after reload")
        else:
            self.account = fresh

    def log_close(self, reason: str, level: int) -> None:
        if self.stream is not None:
            log.log(level, "%s: event stream closed: %s", self.tag, reason)
        else:
            super().log_close(reason, level)

    def connection_lost(self) -> None:
        self.parser = None
        self.held = None


class Listener:
    """A listening socket, and the protocol its connections speak: the
    ClientConnection subclass made for each, in plain text or TLS."""

    __slots__ = ("sock", "tls", "protocol")

    def __init__(self, sock: socket.socket, tls: bool, protocol: type):
        self.sock = sock
        self.tls = tls
        self.protocol = protocol

    @property
    def address(self) -> Tuple[str, int]:
        return self.sock.getsockname()[:2]


class ClientHub:
    """Every client connection: the listeners and the limits on accepting
    (connections in total and per address, blocked addresses), the users'
    subscriptions, delivery of notifications and STATUS lines, and the one
    flush per pass that writes all output before the loop sleeps."""

    def __init__(self, loop: Loop, config: Config, view: "DaemonView"):
        self.loop = loop
        self.config = config
        #: What client sessions may ask of the daemon.
        self.view = view
        self.tls_context = config.tls_context
        self.listeners: List[Listener] = []
        self.clients: Set[ClientConnection] = set()
        #: Open connections per address_key(), for max_clients_per_host.
        self.per_host: Dict[str, int] = {}
        #: The logged-in connections of each user: where their events go.
        self.subscribers: Dict[str, Set[ClientConnection]] = {}
        #: Connections with output (or a close) for the flush.
        self.dirty: Set[ClientConnection] = set()
        #: LOGIN's throttle, the web login's too (one object: a guess is a guess).
        self.throttle = view.throttle
        self.throttle.configure(config.login_fail_delay, config.login_block_after,
                                config.login_block_seconds)
        #: The connections that are event streams: the heartbeat's.
        self.streams: Set[ClientConnection] = set()
        #: The office board's viewers (users whose board is not none) and
        #: what each may see: ``state`` events go to these users only.
        self.board_scopes = board_scopes(config.users)
        self._resume_timer: Optional[Timer] = None
        self._heartbeat_timer: Optional[Timer] = None
        self._session_timer: Optional[Timer] = None

    # -- listening and accepting ------------------------------------------------

    def listen(self, port: int, tls: bool, protocol: Optional[type] = None) -> Listener:
        """Bind a client port (may raise OSError); its connections speak
        ``protocol`` (LineClient unless said otherwise)."""
        if tls and self.tls_context is None:
            self.tls_context = server_tls_context(self.config.tls_cert,
                                                  self.config.tls_key or None)
        bind = self.config.bind
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and bind == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((bind, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            log.error("cannot listen on %s port %d: %s", bind, port, _error_text(e))
            raise
        sock.setblocking(False)
        listener = Listener(sock, tls, protocol or LineClient)
        self.listeners.append(listener)
        self._watch_listener(listener)
        host, real_port = listener.address
        log.info("ctinotify %s listening for %s%s on %s port %d",
                 __version__, "TLS " if tls else "", listener.protocol.PEERS, host, real_port)
        return listener

    def _watch_listener(self, listener: Listener) -> None:
        self.loop.selector.register(listener.sock, selectors.EVENT_READ,
                                    functools.partial(self._on_accept, listener))

    def close_listeners(self) -> None:
        for listener in self.listeners:
            self.loop.forget(listener.sock)  # accepting may be paused
            listener.sock.close()
        self.listeners = []

    def _on_accept(self, listener: Listener, mask: int) -> None:
        for _ in range(ACCEPT_BURST):  # a burst, then let the others have the loop
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(e)
                else:
                    log.warning("accept failed: %s", _error_text(e))
                return
            try:
                self._accept(listener, sock, peer)
            except Exception:
                log.exception("accepting a connection from %s failed", peer)
                sock.close()

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors: the listener stays readable, so stop watching
        it for a moment rather than spin (asyncio's selector_events does too)."""
        log.error("accept failed: %s; not accepting connections for %g s",
                  _error_text(error), ACCEPT_PAUSE_S)
        for listener in self.listeners:
            self.loop.forget(listener.sock)
        self._resume_timer = self.loop.at(self.loop.now + ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self, now: float) -> None:
        self._resume_timer = None
        for listener in self.listeners:
            self._watch_listener(listener)
        log.info("accepting connections again")

    def _refusal(self, key: str) -> Optional[Tuple[str, int, str, str]]:
        """Why a new connection from ``key`` is refused: (kind, status, text
        for the peer, why for the log).  Line and web connections count
        together."""
        cfg = self.config
        if len(self.clients) >= cfg.max_clients:
            return ("max_clients", 503, "too many connections, try again later",
                    "%d connections already (max_clients)" % len(self.clients))
        if self.per_host.get(key, 0) >= cfg.max_clients_per_host:
            return ("max_clients_per_host", 503, "too many connections from your address",
                    "%d connections from %s already (max_clients_per_host)"
                    % (self.per_host[key], key))
        blocked = self.throttle.blocked_for(key, self.loop.now)
        if blocked:
            return ("blocked", 429, "too many failed logins from your address, "
                    "try again later",
                    "logins from %s blocked for %d more s" % (key, int(blocked) + 1))
        return None

    def _accept(self, listener: Listener, sock: socket.socket, peer: Tuple) -> None:
        host = peer[0] if peer else "?"
        key = address_key(host)
        refusal = self._refusal(key)
        if refusal is not None:
            kind, status, text, why = refusal
            reply = listener.protocol.refusal_bytes(status, text)
            self.loop.log_repeated(kind, logging.WARNING, "client %s:%s: refused: %s",
                                   host, peer[1] if peer else "?", why)
            if not listener.tls:  # a fresh socket: one short send cannot block
                try:
                    sock.setblocking(False)
                    sock.send(reply)
                except OSError:
                    pass
            sock.close()
            return
        sock.setblocking(False)
        for level, option, value in _CLIENT_SOCKOPTS:
            try:
                sock.setsockopt(level, option, value)
            except OSError:
                pass
        if listener.tls:
            assert self.tls_context is not None
            try:
                sock = self.tls_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            except (OSError, ValueError) as e:
                log.warning("client %s: TLS setup failed: %s", host, _error_text(e))
                sock.close()
                return
        conn = listener.protocol(self, sock, peer, listener.tls)
        self.clients.add(conn)
        self.per_host[key] = self.per_host.get(key, 0) + 1
        try:
            conn.watch(selectors.EVENT_READ)
            conn.start()
        except Exception:
            # Our bug: this connection only, and nothing of it left behind.
            log.exception("%s: internal error, closing the connection", conn.tag)
            conn.close("internal error", logging.ERROR)

    # -- who gets what ------------------------------------------------------------

    def subscribe(self, conn: ClientConnection, user: str) -> None:
        """``conn`` is logged in as ``user``: their notifications go to it."""
        self.subscribers.setdefault(user, set()).add(conn)

    def forget(self, conn: ClientConnection) -> None:
        """A closed connection leaves every count and subscription."""
        self.clients.discard(conn)
        self.streams.discard(conn)
        count = self.per_host.get(conn.host_key, 0) - 1
        if count > 0:
            self.per_host[conn.host_key] = count
        else:
            self.per_host.pop(conn.host_key, None)
        user = conn.user
        if user is not None:
            conns = self.subscribers.get(user.name)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.subscribers[user.name]

    def deliver(self, notifications: List[Notification]) -> None:
        """Each notification to the connections of its user that want its
        kind.  With the web on, each one the account takes goes into the
        user's replay buffer first, whoever is connected: a page that
        reconnects with ``Last-Event-ID`` catches up from there, and its
        frame (with its id) is what every event stream of the user gets."""
        users, events = self.config.users, self.view.events
        for note in notifications:
            conns = self.subscribers.get(note.user)
            account = users.get(note.user)
            web = self.config.web and account is not None and note.kind in account.events
            if not conns and not web:
                continue
            # The same for every session of the user, so encoded once per format.
            fields = with_popup_url(note.fields, account)
            encoded: Dict[str, bytes] = {}
            if web:
                encoded[SSE_FORMAT] = events.publish(note.user, fields)
            for conn in conns or ():
                if not conn.wants(note.kind):
                    continue
                fmt = conn.fmt
                data = encoded.get(fmt)
                if data is None:
                    data = encoded[fmt] = encode_notification(fields, fmt)
                conn.queue(data)

    def deliver_board(self, changes: List[BoardChange]) -> None:
        """Each change of the office board to the connections that want
        ``state`` of the viewers allowed to see it: the line is encoded once
        per change, kind of viewer (details or not) and format."""
        scopes, subscribers = self.board_scopes, self.subscribers
        # Whichever is fewer: the viewers, or the users logged in.
        viewers = scopes if len(scopes) <= len(subscribers) else subscribers
        for change in changes:
            entry = change.entry
            for viewer in viewers:
                scope = scopes.get(viewer)
                conns = subscribers.get(viewer)
                if scope is None or not conns or view_change(change, scope) is None:
                    continue
                for conn in conns:
                    if conn.wants(Kind.STATE):
                        conn.queue(board_bytes(entry, scope.details, conn.fmt))

    def broadcast_status(self, fields: Dict[str, object]) -> None:
        """A STATUS line to every logged-in connection and event stream."""
        encoded: Dict[str, bytes] = {}
        for conns in self.subscribers.values():
            for conn in conns:
                fmt = conn.fmt
                if fmt not in encoded:
                    encoded[fmt] = status_bytes(fields, fmt)
                conn.queue(encoded[fmt])

    # -- event streams and web sessions -----------------------------------------

    def web_action_status(self, actor: WebActor, fields: Dict[str, object]) -> None:
        """What became of a page's DIAL: a status to the event streams of
        the web session that asked (Basic auth: the user's Basic streams)."""
        data = status_bytes(fields, SSE_FORMAT)
        token = actor.session.token if actor.session is not None else None
        for conn in self.subscribers.get(actor.user.name if actor.user else "", ()):
            stream = getattr(conn, "stream", None)
            if stream is not None and \
                    (stream.session.token if stream.session is not None else None) == token:
                conn.queue(data)

    def add_stream(self, conn: ClientConnection) -> None:
        """``conn`` is an event stream now: it gets the heartbeat."""
        self.streams.add(conn)
        if self._heartbeat_timer is None:
            self._heartbeat_timer = self.loop.at(self.loop.now + SSE_HEARTBEAT_S,
                                                 self._heartbeat)

    def _heartbeat(self, now: float) -> None:
        """A comment on every stream (one timer for all of them): proxies
        and NAT boxes see traffic, a vanished browser shows as a failed write."""
        self._heartbeat_timer = None
        if not self.streams:
            return
        comment = encode_sse_comment()
        for conn in self.streams:
            conn.queue(comment)
        self._heartbeat_timer = self.loop.at(now + SSE_HEARTBEAT_S, self._heartbeat)

    def end_web_sessions(self, sessions: List[WebSession], reason: str) -> None:
        """Web sessions ended (logout, expiry, reload): their streams close,
        telling the page why first."""
        for session in sessions:
            for conn in list(self.subscribers.get(session.user, ())):
                if isinstance(conn, HttpClient) and conn.stream is not None and \
                        conn.stream.session is session:
                    conn.end_session(reason)

    def watch_sessions(self) -> None:
        """Keep a timer on the nearest web session expiry."""
        due = self.view.sessions.next_expiry()
        timer = self._session_timer
        if due is None or timer is not None and not timer.cancelled and timer.when <= due:
            return
        self.loop.timers.cancel(timer)
        self._session_timer = self.loop.at(due, self._expire_sessions)

    def _expire_sessions(self, now: float) -> None:
        self._session_timer = None
        self.end_web_sessions(self.view.sessions.expire(now), "session expired")
        self.watch_sessions()

    def flush(self) -> None:
        """Write every connection's output: once per pass, before the sleep."""
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            conn.flush()

    # -- reload and shutdown --------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """A reload: new limits for everyone, and every session checked
        against its account as it is now (bind and ports stay)."""
        old_users, old_scopes = list(self.config.users), self.board_scopes
        self.config = config
        if config.tls_context is not None and self.tls_context is not None:
            self.tls_context = config.tls_context  # a renewed certificate, for new connections
        self.throttle.configure(config.login_fail_delay, config.login_block_after,
                                config.login_block_seconds)
        for conn in list(self.clients):
            conn.account_changed(config.users)
        # Web sessions of users removed or with a new secret end (their
        # streams closed above already); later logins last the new hours.
        view = self.view
        self.end_web_sessions(view.sessions.reconfigure(config.users,
                                                        config.web_session_hours * 3600),
                              "account changed by reload")
        view.events.retain(config.users)
        self.watch_sessions()
        self.board_scopes = board_scopes(config.users)
        changed = board_views_changed(old_scopes, old_users, self.board_scopes, config.users)
        if changed:
            # Ask again: a colleague no longer on someone's board must
            # leave their screen, and no state event will say so.
            fields = {"board": "changed", "time": iso_time(self.loop.wall)}
            for viewer in changed:
                for conn in self.subscribers.get(viewer, ()):
                    conn.queue(status_bytes(fields, conn.fmt))

    def close_all(self, reason: str) -> None:
        """Shutdown: a last STATUS line to the logged-in, then every
        connection closed."""
        stopping = {"server": "stopping", "time": iso_time(self.loop.wall)}
        for conn in list(self.clients):
            if conn.user is not None:
                conn.queue(status_bytes(stopping, conn.fmt))
            conn.send()
            conn.close(reason)
        for timer in (self._resume_timer, self._heartbeat_timer, self._session_timer):
            self.loop.timers.cancel(timer)
        self.close_listeners()


# ---------------------------------------------------------------------------
# I/O: the link to each Asterisk
# ---------------------------------------------------------------------------

def ami_session(config: AmiConfig, now: float) -> AmiSession:
    """A fresh AmiSession for a new connection to this PBX."""
    return AmiSession(config.username, config.secret, config.auth, now,
                      ping_interval=config.ping_interval, login_timeout=config.login_timeout,
                      ping_timeout=config.ping_timeout)


def resolve(host: str, port: int) -> Tuple[int, tuple]:
    """(family, sockaddr) of host:port.  For a name, run only before the loop
    starts or on reload, never per connect: a DNS lookup would block every
    client."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr


#: The states of an AMI link.
LINK_IDLE = "idle"                # waiting to (re)connect
LINK_CONNECTING = "connecting"    # a non-blocking connect() under way
LINK_HANDSHAKING = "handshaking"  # TLS ([ami] tls = yes)
LINK_LOGIN = "login"              # connected: banner, Challenge, Login
LINK_RESYNC = "resync"            # logged in: the channel list is coming
LINK_UP = "up"                    # following the calls

#: What bounds a state of an AMI link: the [ami] key of its timeout, and
#: why the link is dropped when it passes.  Idle waits for its reconnect
#: time instead; from login on, the AmiSession's deadlines (banner and
#: login, Ping answers) bound the link as well.
LINK_TIMEOUTS = {
    LINK_CONNECTING: ("connect_timeout", "no connection within %g s"),
    LINK_HANDSHAKING: ("connect_timeout", "no TLS handshake within %g s"),
    LINK_RESYNC: ("resync_timeout", "no end of the channel list within %g s"),
}


class AmiLink:
    """One PBX: the socket to its Asterisk, the AmiSession on it, the
    reconnect schedule, and the CallEngine that follows its calls.

    Bytes from Asterisk go through the session into the engine; the
    engine's notifications, and the link going up and down, go to the
    daemon (``owner.deliver``, ``owner.link_status``).  ``send_action``
    sends an action and routes its response (and a list's events) to
    whoever asked, by ActionID.  After a login the link resynchronises:
    CoreShowChannels tells the engine which calls went on meanwhile.
    """

    def __init__(self, loop: Loop, owner: "Daemon", config: AmiConfig,
                 tls_context: Optional["ssl.SSLContext"], engine: CallEngine):
        self.loop = loop
        self.owner = owner
        self.config = config
        #: For ``[ami] tls = yes``: built with the configuration.
        self.tls_context = tls_context
        self.engine = engine
        self.state = LINK_IDLE
        #: When this state's timeout passes (LINK_TIMEOUTS), monotonic.
        self.state_deadline: Optional[float] = None
        #: Logged in, as the clients were last told.
        self.up = False
        #: When calls kept across a lost link are given up (monotonic).
        self.stale_deadline: Optional[float] = None
        self.sock: Optional[socket.socket] = None
        self.session: Optional[AmiSession] = None
        self.outbuf = bytearray()
        self.backoff = AMI_RECONNECT_MIN_S
        self.next_attempt = loop.now
        self.address: Optional[Tuple[int, tuple]] = None
        #: ActionID -> who waits for the response (send_action).
        self._replies: Dict[str, object] = {}
        #: ActionID -> the event that ends its answer, for an action
        #: answered in two steps (Originate: OriginateResponse).
        self._reply_until: Dict[str, str] = {}
        self._timer: Optional[Timer] = None
        #: What this login's events say of the manager user's classes, and
        #: the problems found (STATUS ``warning=``); each logged once ever.
        self.probe = ManagerClassProbe()
        self.warnings: List[str] = []
        self._logged_warnings: Set[str] = set()
        self._rearm()

    @property
    def tag(self) -> str:
        """For log lines: ``ami``, or ``ami:NAME`` for a further PBX."""
        return "ami" if self.config.name == DEFAULT_PBX else "ami:" + self.config.name

    # -- actions ---------------------------------------------------------------

    def send_action(self, action: str, fields: Iterable[Tuple[str, str]] = (),
                    on_reply=None, until: str = "") -> Optional[str]:  # type: ignore[no-untyped-def]
        """Send an action to this Asterisk now.  Its response, and for a
        list action every event of the list up to its end, go to
        ``on_reply(msg)`` (and to the engine, as all messages do);
        ``on_reply(None)`` if the link goes down first.  ``until``: an
        event of the same ActionID that ends the answer after a Success
        response (Originate with Async: OriginateResponse).  Returns the
        ActionID, or None when the link is not logged in."""
        session = self.session
        if session is None or not session.logged_in:
            return None
        action_id = session.send_action(action, fields)
        if on_reply is not None:
            self._replies[action_id] = on_reply
            if until:
                self._reply_until[action_id] = until
        self._write()
        return action_id

    def forget_reply(self, action_id: str) -> None:
        """Nobody waits for this action's answer any more (it took too long)."""
        self._replies.pop(action_id, None)
        self._reply_until.pop(action_id, None)

    @staticmethod
    def _reply_done(msg: AmiMessage, until: str = "") -> bool:
        """Whether ``msg`` is the last message of its action's answer."""
        if until:
            return msg.get("Event") == until or msg.get("Response") not in (None, "Success")
        listing = msg.get("EventList", "").lower()
        if "Event" in msg:
            return listing in ("complete", "cancelled")
        return listing != "start"

    # -- the state and its deadline ----------------------------------------------

    def _enter(self, state: str) -> None:
        self.state = state
        timeout = LINK_TIMEOUTS.get(state)
        self.state_deadline = (self.loop.now + getattr(self.config, timeout[0])
                               if timeout is not None else None)
        self._rearm()

    def _rearm(self) -> None:
        """One timer for the nearest of the link's deadlines."""
        times = [self.stale_deadline]
        if self.state == LINK_IDLE:
            times.append(self.next_attempt)
        times.append(self.state_deadline)
        if self.session is not None:
            times.append(self.session.next_deadline())
        due = min((t for t in times if t is not None), default=None)
        timer = self._timer
        if timer is not None and not timer.cancelled and timer.when == due:
            return
        self.loop.timers.cancel(timer)
        self._timer = self.loop.at(due, self._on_timer) if due is not None else None

    def _on_timer(self, now: float) -> None:
        try:
            self._deadlines(now)
        except Exception:
            log.exception("%s: internal error; dropping the link", self.tag)
            self.lost("internal error")
        self._rearm()

    def _deadlines(self, now: float) -> None:
        if self.state == LINK_IDLE:
            if now >= self.next_attempt:
                self._connect(now)
        elif self.state_deadline is not None and now >= self.state_deadline:
            key, why = LINK_TIMEOUTS[self.state]
            self.lost(why % getattr(self.config, key))
        elif self.session is not None:
            reason = self.session.poll(now)
            if reason:
                self.lost(reason)
            else:
                self._write()
        if self.stale_deadline is not None and now >= self.stale_deadline:
            grace = self.config.resync_grace
            if self.state == LINK_RESYNC:
                # The rest of this list would land on calls ended below: start over.
                self.lost("no resync within %g s of losing the link" % grace)
            self.stale_deadline = None
            log.warning("%s: no link and resync for %g s: ending the calls it had in "
                        "progress", self.tag, grace)
            self.owner.deliver(self.engine.link_lost(self.loop.wall))

    # -- connecting --------------------------------------------------------------

    def resolve(self) -> None:
        """Look the host up: at start and on reload only, never in the loop."""
        cfg = self.config
        try:
            self.address = resolve(cfg.host, cfg.port)
        except (OSError, UnicodeError, ValueError) as e:  # idna rejects some names
            self.address = None
            log.error("%s: cannot resolve %s: %s", self.tag, cfg.host, e)

    def _connect(self, now: float) -> None:
        if self.address is None:
            if not is_ip_address(self.config.host):
                # A name is looked up at start and on reload only: DNS must
                # never hold the loop (and every client) up.
                self.lost("cannot resolve %s; fix DNS and send SIGHUP, or use an IP "
                          "address" % self.config.host)
                return
            self.resolve()
        if self.address is None:
            self.lost("no address for %s" % self.config.host)
            return
        family, sockaddr = self.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # out of file descriptors, say
            self.lost("cannot open a socket: %s" % _error_text(e))
            return
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        self.sock = sock
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self.lost("connect to %s port %d failed: %s"
                      % (self.config.host, self.config.port, os.strerror(err)))
            return
        self.loop.selector.register(sock, selectors.EVENT_WRITE, self.on_ready)
        self._enter(LINK_CONNECTING)
        log.debug("%s: connecting to %s port %d", self.tag, self.config.host, self.config.port)

    def on_ready(self, mask: int) -> None:
        """The selector callback."""
        try:
            self._ready(mask)
        except Exception:
            # Our bug, not Asterisk's: drop this link, keep serving.
            log.exception("%s: internal error; dropping the link", self.tag)
            self.lost("internal error")
        self._rearm()

    def _ready(self, mask: int) -> None:
        sock = self.sock
        assert sock is not None
        if self.state == LINK_CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.lost("connect to %s port %d failed: %s"
                          % (self.config.host, self.config.port, os.strerror(err)))
            elif self.config.tls:
                self._start_tls(sock)
            else:
                self._connected()
            return
        if self.state == LINK_HANDSHAKING:
            self._handshake()
            return
        if mask & selectors.EVENT_READ:
            self._read(sock)
        if mask & selectors.EVENT_WRITE and self.sock is sock:
            self._write()

    def _start_tls(self, sock: socket.socket) -> None:
        if self.tls_context is None:
            self.lost("tls = yes, but no TLS context could be made")
            return
        self.loop.selector.unregister(sock)
        try:
            # The handshake runs in the loop (do_handshake_on_connect=False),
            # so a slow or silent Asterisk cannot stall the clients.
            self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.config.host,
                                                     do_handshake_on_connect=False)
        except (OSError, ValueError) as e:
            self.sock = sock
            self.loop.selector.register(sock, selectors.EVENT_READ, self.on_ready)
            self.lost("TLS setup failed: %s" % _error_text(e))
            return
        self.loop.selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                    self.on_ready)
        self._enter(LINK_HANDSHAKING)
        self._handshake()

    def _handshake(self) -> None:
        sock = self.sock
        assert sock is not None and ssl is not None
        try:
            sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self.loop.selector.modify(sock, selectors.EVENT_READ, self.on_ready)
            return
        except ssl.SSLWantWriteError:
            self.loop.selector.modify(sock, selectors.EVENT_WRITE, self.on_ready)
            return
        except (OSError, ValueError) as e:
            self.lost("TLS handshake with %s failed: %s" % (self.config.host, _error_text(e)))
            return
        log.info("%s: TLS established with %s (%s)", self.tag, self.config.host,
                 sock.version())  # type: ignore[attr-defined]
        self._connected()

    def _connected(self) -> None:
        assert self.sock is not None
        cfg = self.config
        self.session = ami_session(cfg, self.loop.now)
        self.loop.selector.modify(self.sock, selectors.EVENT_READ, self.on_ready)
        self._enter(LINK_LOGIN)
        log.info("%s: connected to %s port %d", self.tag, cfg.host, cfg.port)

    # -- reading -------------------------------------------------------------------

    def _read(self, sock: socket.socket) -> None:
        # A TLS socket may hold decrypted bytes the selector cannot see.
        for _ in range(64):
            data, broken = recv_some(sock, AMI_RECV_BYTES)
            if broken:
                self.lost(broken)
                return
            if data is None:
                break
            if not data:
                self.lost("connection closed by Asterisk")
                return
            if not self._receive(data) or self.sock is not sock:
                return
            if not (self.config.tls and sock.pending()):  # type: ignore[attr-defined]
                break
        self._write()

    def _receive(self, data: bytes) -> bool:
        """Bytes from Asterisk through the session into the engine; False
        once the link was dropped."""
        session = self.session
        assert session is not None
        try:
            items = session.receive_data(data, self.loop.now)
        except AmiProtocolError as e:
            self.lost(str(e))
            return False
        for problem in session.parser.problems:
            log.warning("%s: %s", self.tag, problem)
        session.parser.problems.clear()
        for item in items:
            if isinstance(item, AmiMessage):
                self._message(item)
            elif isinstance(item, AmiLoggedIn):
                self.backoff = AMI_RECONNECT_MIN_S
                log.info("%s: logged in as %s (%s)", self.tag, self.config.username, item.banner)
                self.probe, self.warnings = ManagerClassProbe(), []
                self._set_up(True, "")
                self._start_resync()
            elif isinstance(item, AmiLoginFailed):
                self.lost("login as %s refused by Asterisk: %s"
                          % (self.config.username, item.reason))
            if self.session is not session:
                return False  # dropped meanwhile
        return True

    def _message(self, msg: AmiMessage) -> None:
        event = msg.get("Event")
        if event == "Shutdown":
            self.lost("Asterisk is shutting down (%s)" % msg.get("Shutdown", "?"))
            return
        if not self.probe.done:
            self._warn(self.probe.observe(event, msg))
        action_id = msg.get("ActionID") if self._replies else None
        on_reply = self._replies.get(action_id) if action_id is not None else None
        if on_reply is not None:
            if self._reply_done(msg, self._reply_until.get(action_id, "")):  # type: ignore[arg-type]
                self.forget_reply(action_id)  # type: ignore[arg-type]
            on_reply(msg)  # type: ignore[operator]
        elif event is None:
            if msg.get("Response") == "Error":
                self.loop.log_repeated("ami-error", logging.WARNING,
                                       "%s: Asterisk refused an action: %r", self.tag,
                                       msg.get("Message", "")[:200])
            elif "Response" not in msg:
                self.loop.log_repeated("ami-junk", logging.WARNING,
                                       "%s: ignored a message that is neither an event nor a "
                                       "response: %.200r", self.tag, dict(msg) or msg.body)
                return
        if event in BOARD_AMI_EVENTS:  # phones' states: the board's, none of the engine's
            self.owner.board_message(self, msg)
            return
        try:
            notifications = self.engine.handle(msg, self.loop.wall)
        except Exception:
            # Our bug, not Asterisk's: skip the message, keep the link.
            log.exception("engine failed on a %.40r event; skipped it", msg.get("Event"))
            return
        if notifications:
            self.owner.deliver(notifications)

    def _start_resync(self) -> None:
        """Calls may have started or ended while we were away: ask for every
        channel, and for queue members (queue events need membership).  The
        calls kept since the link was lost stay on their grace time until
        the list has ended: a list that never does must not keep them."""
        self._enter(LINK_RESYNC)
        self.engine.begin_resync()
        self.send_action("CoreShowChannels", on_reply=self._resync_reply)
        self.send_action("QueueStatus")
        self.owner.link_resyncing(self)

    def _resync_reply(self, msg: Optional[AmiMessage]) -> None:
        if msg is None:
            return  # the link went down; the next login resyncs again
        if msg.get("Response") not in (None, "Success"):
            # No "reporting" or "system" write permission (manager.conf):
            # the probe says so once, this at every login.
            self._warn(self.probe.refused(msg.get("Message", "")))
            log.warning("%s: cannot list channels to resync (%s): calls from before the "
                        "reconnect end now", self.tag, msg.get("Message", "refused"))
            self._resynced()
            self.owner.deliver(self.engine.end_resync(self.loop.wall))
        elif msg.get("Event") == "CoreShowChannelsComplete":
            self._resynced()
            log.info("%s: resynchronised: %s channels in progress", self.tag,
                     msg.get("ListItems", "?"))

    def _resynced(self) -> None:
        self.stale_deadline = None
        self._enter(LINK_UP)

    def _warn(self, problems: List[str]) -> None:
        """What the probe found: logged once, told to the clients now and
        with every STATUS of this login (``warning=``)."""
        for problem in problems:
            self.warnings.append(problem)
            if problem not in self._logged_warnings:
                self._logged_warnings.add(problem)
                log.warning("%s: %s", self.tag, problem)
        if problems:
            self.owner.link_status(self, "")

    # -- writing and closing ----------------------------------------------------------

    def _write(self) -> None:
        if self.session is None or self.sock is None:
            return
        self.outbuf += self.session.data_to_send()
        if self.outbuf:
            broken = send_some(self.sock, self.outbuf)
            if broken:
                self.lost(broken)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.loop.selector.modify(self.sock, events, self.on_ready)

    def close(self) -> None:
        """Drop the connection (no reconnect is planned here: see lost)."""
        if self.sock is not None:
            self.loop.forget(self.sock)
            self.sock.close()
        self.sock = None
        self.session = None
        self.outbuf.clear()
        self.state = LINK_IDLE
        self.state_deadline = None
        replies, self._replies = self._replies, {}
        self._reply_until.clear()
        for on_reply in replies.values():
            on_reply(None)  # type: ignore[operator]

    def lost(self, reason: str, immediate: bool = False) -> None:
        """The link is broken: close it, reconnect after the backoff (at
        once if ``immediate``), tell the clients; its calls are kept for
        ``resync_grace`` in case a reconnect resynchronises them."""
        self.close()
        delay = 0.0 if immediate else self.backoff
        self.next_attempt = self.loop.now + delay
        if not immediate:
            self.backoff = min(self.backoff * 2, self.config.reconnect_max)
        log.warning("%s: %s; reconnecting in %g s", self.tag, reason, delay)
        if self.up:
            self._set_up(False, reason)
            if self.stale_deadline is None:
                self.stale_deadline = self.loop.now + self.config.resync_grace
        self._rearm()

    def stop(self, logoff: bool = False) -> None:
        """For good (shutdown, removed by a reload): close, with a Logoff
        first if asked and logged in (best effort); no reconnect."""
        if logoff and self.state in (LINK_LOGIN, LINK_RESYNC, LINK_UP) and self.sock is not None:
            try:
                self.sock.send(encode_action("Logoff"))
            except (OSError, ValueError):
                pass
        self.close()
        self.loop.timers.cancel(self._timer)
        self._timer = None

    def reconfigure(self, config: AmiConfig, tls_context: Optional["ssl.SSLContext"],
                    several: bool) -> None:
        """A reload: a changed section reconnects, an unchanged one keeps
        its link and calls."""
        self.engine.pbx = config.name if several else ""
        if config.key() == self.config.key():
            if self.address is None:
                self.resolve()  # maybe DNS works now (SIGHUP)
            return
        log.info("reload: [%s] changed, reconnecting", self.tag)
        self.config = config
        self.tls_context = tls_context
        self.resolve()
        self.lost("configuration changed", immediate=True)

    def _set_up(self, up: bool, reason: str) -> None:
        self.up = up
        self.owner.link_status(self, reason)


# ---------------------------------------------------------------------------
# I/O: actions on calls, sent to Asterisk and answered to the desktop
# ---------------------------------------------------------------------------

#: Where an action is: waiting for Asterisk's Response(s); answered OK and
#: waiting for the outcome event (DIAL); done.
STAGE_REPLY, STAGE_OUTCOME, STAGE_DONE = "reply", "outcome", "done"


class ActionTicket:
    """One action under way: its plan; who asked (``reply_to``, the
    connection, None if it cannot take late replies; ``tag`` for the log);
    the link it went out on; the ActionIDs whose Response is still owed;
    the first refusal; its stage and its one timer."""

    __slots__ = ("plan", "reply_to", "tag", "link", "sent", "waiting", "accepted", "error",
                 "stage", "early", "timer", "sending", "reply")

    def __init__(self, plan: ActionPlan, reply_to: Optional[object], tag: str, link: AmiLink):
        self.plan = plan
        self.reply_to = reply_to
        self.tag = tag
        self.link = link
        #: The ActionIDs sent, and those whose Response is still owed.
        self.sent: List[str] = []
        self.waiting: Set[str] = set()
        #: Responses that were Success, and Asterisk's words of the first
        #: that was not: a HANGUP of two ringing phones, one of which has
        #: just stopped ("No such channel"), still did what was asked.
        self.accepted = 0
        self.error: Optional[str] = None
        self.stage = STAGE_REPLY
        #: An outcome event that came before the Response (Asterisk sends the
        #: Response after queueing the Originate, whose thread may be quicker).
        self.early: Optional[AmiMessage] = None
        self.timer: Optional[Timer] = None
        #: Still inside send(): a reply now is returned, not delivered.
        self.sending = False
        self.reply: Optional[str] = None


class ActionDesk:
    """The actions desktops asked for, until Asterisk has answered them.

    ``send(plan, session)`` sends a plan's actions on the link of its PBX,
    each with a callback bound to its ticket (AmiLink.send_action): the
    ActionID of Asterisk's answer finds the ticket, and the ticket the
    connection that asked (``session.reply_to``).  A connection closed
    meanwhile gets nothing; the action's one log line is written all the
    same.  A ticket lives until its answer, its timeout (``action_timeout``:
    ERR 504; for DIAL's outcome, the ring time on top) or the loss of the
    link (ERR 503), never longer; the loop never waits for one.
    """

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.loop = daemon.loop
        #: The tickets under way.
        self.tickets: Set[ActionTicket] = set()

    def send(self, plan: ActionPlan, session: ClientSession) -> List[str]:
        """Send the plan; [] while the reply is owed, else the reply now."""
        request = plan.request
        link = self.daemon.link_named(plan.pbx)
        if link is None or not link.up:
            raise ClientProtocolError("503", "%s %s: %s is not connected to Asterisk" % (
                request.verb, request.target(), "PBX " + plan.pbx if len(self.daemon.links) > 1
                else "the server"))
        ticket = ActionTicket(plan, session.reply_to, session.tag, link)
        self.tickets.add(ticket)
        ticket.sending = True
        for action, fields in plan.steps:
            try:
                action_id = link.send_action(action, fields,
                                             functools.partial(self._answer, ticket),
                                             until=plan.outcome_event)
            except ValueError:  # encode_action's last defence: never met, as planned
                log.exception("%s: action %s not sent", ticket.tag, action)
                action_id = None
            if action_id is None or ticket.stage == STAGE_DONE:
                break  # the link broke while writing: its callbacks were told
            ticket.sent.append(action_id)
            ticket.waiting.add(action_id)
        if ticket.stage == STAGE_REPLY and not ticket.waiting:
            self._lost(ticket)
        ticket.sending = False
        if ticket.reply is not None:
            return [ticket.reply]
        self._arm(ticket, self.daemon.config.action_timeout)
        return []

    # -- Asterisk's answers ----------------------------------------------------------

    def _answer(self, ticket: ActionTicket, msg: Optional[AmiMessage]) -> None:
        """A message of one of the ticket's ActionIDs (None: the link is gone)."""
        if ticket.stage == STAGE_DONE:
            return
        if msg is None:
            self._lost(ticket)
            return
        plan = ticket.plan
        if "Event" in msg:
            if msg.get("Event") == plan.outcome_event:
                if ticket.stage == STAGE_REPLY:
                    ticket.early = msg
                else:
                    self._outcome(ticket, dial_outcome(msg))
            return
        ticket.waiting.discard(msg.get("ActionID", ""))
        if msg.get("Response") == "Success":
            ticket.accepted += 1
        elif ticket.error is None:
            ticket.error = msg.get("Message", "")
        if ticket.waiting:
            return
        if not ticket.accepted:
            assert ticket.error is not None
            denied = ticket.error.strip().lower() == "permission denied"
            self._finish(ticket, "502", refusal_text(ticket.error),
                         logging.WARNING if denied else logging.INFO)
        elif not plan.outcome_event:
            self._finish(ticket)
        else:
            # Queued: the reply now, the outcome when the event comes.
            ticket.stage = STAGE_OUTCOME
            self._deliver(ticket, plan.ok())
            if ticket.early is not None:
                self._outcome(ticket, dial_outcome(ticket.early))
            else:
                self._arm(ticket, DIAL_RING_S + self.daemon.config.action_timeout)

    def _lost(self, ticket: ActionTicket) -> None:
        why = "the link to Asterisk was lost before it answered"
        if ticket.stage == STAGE_OUTCOME:
            self._outcome(ticket, {"dial": DIAL_UNKNOWN, "reason": why})
        else:
            self._finish(ticket, "503", why, logging.WARNING)

    def _on_timer(self, ticket: ActionTicket, now: float) -> None:
        ticket.timer = None
        if ticket.stage == STAGE_REPLY:
            self._finish(ticket, "504", "no answer from Asterisk within %g s"
                         % self.daemon.config.action_timeout, logging.WARNING)
        elif ticket.stage == STAGE_OUTCOME:
            self._outcome(ticket, {"dial": DIAL_UNKNOWN, "reason": "no %s from Asterisk"
                                   % ticket.plan.outcome_event})

    # -- the end of a ticket -----------------------------------------------------------

    def _arm(self, ticket: ActionTicket, seconds: float) -> None:
        self.loop.timers.cancel(ticket.timer)
        ticket.timer = self.loop.at(self.loop.now + seconds,
                                    functools.partial(self._on_timer, ticket))

    def _outcome(self, ticket: ActionTicket, outcome: Dict[str, object]) -> None:
        """DIAL's outcome: a STATUS line to the connection, the log line."""
        request = ticket.plan.request
        fields: Dict[str, object] = {"dial": outcome["dial"], "number": request.number,
                                     "device": request.user.dial_device}
        fields.update((k, v) for k, v in outcome.items() if k != "dial")
        fields["time"] = iso_time(self.loop.wall)
        self._done(ticket, "OK, then %s" % encode_text_line("dial=%s" % outcome["dial"], {
            k: v for k, v in outcome.items() if k != "dial"}))
        reply_to = ticket.reply_to
        if reply_to is not None:
            reply_to.action_status(fields)  # type: ignore[attr-defined]

    def _finish(self, ticket: ActionTicket, code: str = "", text: str = "",
                level: int = logging.INFO) -> None:
        """The reply that ends the ticket: OK, or ERR ``code`` with ``text``."""
        plan = ticket.plan
        self._done(ticket, "ERR %s %s" % (code, text) if code else "OK", level)
        self._deliver(ticket, plan.error(code, text) if code else plan.ok())

    def _done(self, ticket: ActionTicket, result: str, level: int = logging.INFO) -> None:
        """Forget the ticket everywhere; its one log line: user, address,
        action, target, result."""
        ticket.stage = STAGE_DONE
        self.loop.timers.cancel(ticket.timer)
        ticket.timer = None
        for action_id in ticket.sent:
            ticket.link.forget_reply(action_id)
        ticket.waiting.clear()
        self.tickets.discard(ticket)
        request = ticket.plan.request
        log.log(level, "%s: action %s %s: %s", ticket.tag, request.verb, request.target(),
                result)

    def _deliver(self, ticket: ActionTicket, line: str) -> None:
        if ticket.sending:
            ticket.reply = line
        elif ticket.reply_to is not None:
            ticket.reply_to.action_reply(line)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# I/O: the daemon (call log, signals, reload, shutdown)
# ---------------------------------------------------------------------------


class CallLog:
    """The call log file and the history HISTORY answers from.

    Every finished call's record goes to the history (the last calls of
    each user, in memory) and, with a ``calllog``, to the file: opened
    O_APPEND, one write(2) per record.  At start the history is seeded from
    the file's tail; SIGHUP reopens the file (log rotation)."""

    def __init__(self, loop: Loop, path: str):
        self.loop = loop
        self.path = path
        self.history = CallHistory()
        self.fd: Optional[int] = None
        #: The file ends in a partial line (after a failed write).
        self._torn = False

    def open(self) -> None:
        if not self.path:
            return
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                              | getattr(os, "O_CLOEXEC", 0), 0o640)
        except OSError as e:
            log.error("cannot open call log %s: %s", self.path, _error_text(e))
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    self._torn = f.read(1) != b"\n"
        except OSError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        self._torn = False

    def reopen(self, path: str) -> None:
        self.close()
        self.path = path
        self.open()

    def add(self, record: Dict[str, object]) -> None:
        self.history.add(record)
        if self.fd is not None:
            self._write(record)

    def _write(self, record: Dict[str, object]) -> None:
        """One record, one line, one write(2) on an O_APPEND descriptor: a
        daemon killed at any moment leaves only whole lines, and nothing
        waits in a buffer of ours."""
        assert self.fd is not None
        data = (encode_json_line(record) + "\n").encode("utf-8")
        if self._torn:
            data = b"\n" + data  # end the broken line; keep this one whole
        written = 0
        try:
            while written < len(data):  # a short write: only on a full disk
                written += os.write(self.fd, data[written:])
            self._torn = False
        except OSError as e:
            self._torn = self._torn or written > 0
            self.loop.log_repeated("calllog", logging.ERROR, "cannot write call log %s: %s",
                                   self.path, _error_text(e))

    def seed(self, users: Iterable[str]) -> None:
        """HISTORY knows the calls before a restart: the call log's tail."""
        if not self.path:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                start = max(0, f.tell() - HISTORY_SEED_MAX_BYTES)
                f.seek(start)
                data = f.read(HISTORY_SEED_MAX_BYTES)
        except OSError:
            return
        lines = data.decode("utf-8", "replace").split("\n")
        if start > 0:
            lines = lines[1:]  # cut in the middle
        loaded = self.history.seed(lines, users)
        log.info("history: %d calls from %s", loaded, self.path)


class DaemonView(WebView):
    """The running daemon as its client sessions and web requests see it:
    the accounts, the calls in progress on every PBX, the call history,
    the login throttle, the web sessions and replay buffer, and the links'
    status (the clock is read here, not in sessions)."""

    def __init__(self, daemon: "Daemon"):
        config = daemon.config
        super().__init__(config.users, None, daemon.calllog.history,
                         sessions=WebSessionStore(config.web_session_hours * 3600),
                         throttle=LoginThrottle(config.login_fail_delay,
                                                config.login_block_after,
                                                config.login_block_seconds))
        self._daemon = daemon

    def engines(self) -> List[CallEngine]:
        return [link.engine for link in self._daemon.links]

    def login_blocked(self, peer_host: str) -> bool:
        return self.throttle.blocked_for(address_key(peer_host), self._daemon.loop.now) > 0

    def account_wait(self, name: str, peer_host: str) -> float:
        return self.throttle.account_wait(name, address_key(peer_host), self._daemon.loop.now)

    def pbx_statuses(self) -> List[Dict[str, object]]:
        """A STATUS line's fields per PBX, for a client that just logged in."""
        return [self._daemon.pbx_status(link) for link in self._daemon.links]

    def clock(self) -> float:
        return self._daemon.loop.now

    def action_defaults(self) -> Tuple[str, int]:
        config = self._daemon.config
        return config.dial_context, config.actions_per_minute

    def pbx_engines(self) -> List[Tuple[str, CallEngine]]:
        return [(link.config.name, link.engine) for link in self._daemon.links]

    def send_plan(self, plan: ActionPlan, session: ClientSession) -> List[str]:
        return self._daemon.actions.send(plan, session)
    def link_status(self) -> List[Dict[str, object]]:
        return self.pbx_statuses()

    def board(self, user: str) -> Optional[List[Dict[str, object]]]:
        scope = self._daemon.hub.board_scopes.get(user)
        return view_board(self._daemon.board, scope) if scope is not None else None


#: A board list Asterisk refused: what is missing, and what to do about it.
_BOARD_LIST_PROBLEMS = {
    "DeviceStateList": ("the phones' states", "load res_manager_devicestate.so and grant "
                        "the AMI user write = reporting"),
    "ExtensionStateList": ("the hints' states", "grant the AMI user write = reporting"),
}


def _board_phones(config: Config) -> set:
    """What the board follows Asterisk's states of: each user's phones and numbers."""
    return {(user.name, user.devices, user.extensions) for user in config.users.values()}


class Daemon:
    """The daemon: one Loop, the AMI links in, the ClientHub out, the call
    log beside; signals, reload and shutdown.

    Everything protocol-shaped is delegated: each AmiLink feeds its
    CallEngine, whose notifications come back here (``deliver``) for the
    call log and the hub, which queues them on the connections of their
    user.  Timers use the monotonic clock, event times the wall clock, both
    read once per pass.  Output is written in one flush before the loop
    sleeps.
    """

    def __init__(self, config: Config):
        self.config = config
        self.loop = Loop()
        self.calllog = CallLog(self.loop, config.calllog)
        self.view = DaemonView(self)
        self.hub = ClientHub(self.loop, config, self.view)
        #: The office board: every user's state, from every PBX.
        self.board = Board(config.users.values(), self.loop.wall)
        #: One link per PBX ([ami], then each [ami:NAME]).
        self.links: List[AmiLink] = [self._make_link(pbx, config) for pbx in config.pbxes]
        #: DIAL, HANGUP and TRANSFER under way.
        self.actions = ActionDesk(self)
        #: The listeners as started: a reload cannot change them.
        self._listening = self._listeners(config)
        self.running = False
        self._pending_signals: List[int] = []
        self._wakeup: Optional[Tuple[socket.socket, socket.socket]] = None

    def link_named(self, name: str) -> Optional[AmiLink]:
        """The link of the PBX of this name (DEFAULT_PBX: [ami])."""
        return next((link for link in self.links if link.config.name == name), None)

    def _make_link(self, pbx: AmiConfig, config: Config) -> AmiLink:
        # With several PBXes every event says which one it came from.
        engine = CallEngine(Directory(config.users.values(), pbx.name),
                            pbx.name if len(config.pbxes) > 1 else "")
        return AmiLink(self.loop, self, pbx, config.ami_tls_contexts.get(pbx.name), engine)

    # -- lifecycle -----------------------------------------------------------

    @staticmethod
    def _listeners(config: Config) -> Tuple[object, ...]:
        """What the listening sockets are made of (a reload changes none)."""
        return (config.bind, config.port, config.tls_port, "yes" if config.web else "no",
                config.web_port if config.web else None,
                config.web_tls_port if config.web else None)

    def start(self) -> None:
        """Bind the client and web ports, open the call log (may raise OSError)."""
        config = self.config
        for port, tls, protocol in ((config.port, False, LineClient),
                                    (config.tls_port, True, LineClient),
                                    (config.web_port, False, HttpClient),
                                    (config.web_tls_port, True, HttpClient)):
            if port is not None and (protocol is LineClient or config.web):
                self.hub.listen(port, tls, protocol)
        self.calllog.open()
        self.calllog.seed(self.config.users)
        for link in self.links:
            link.resolve()
        if self.config.tls_port is not None:
            # run warned at the start; a certificate may expire months later.
            self.loop.at(self.loop.now + TLS_CERT_CHECK_INTERVAL_S, self._check_certificate)

    def _check_certificate(self, now: float) -> None:
        """Once a day: is the TLS port's certificate (the one of the
        configuration now in force) about to expire, or expired?"""
        for note in certificate_warnings(self.config, self.loop.wall):
            log.warning("%s", note)
        self.loop.at(now + TLS_CERT_CHECK_INTERVAL_S, self._check_certificate)

    def serve_forever(self) -> int:
        if self._wakeup is None:
            self.install_signal_handlers()
        self.running = True
        loop = self.loop
        while self.running:
            loop.run_once()
            self._handle_signals()
            loop.run_timers()
            self.hub.flush()
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        log.info("shutting down")
        self.loop.tick()
        # Calls in progress end now, for the desktops and the call log, as
        # when the link to Asterisk is lost.
        for link in self.links:
            self.deliver(link.engine.link_lost(self.loop.wall))
        self.hub.close_all("server shutting down")
        for link in self.links:
            link.stop(logoff=True)
        self.calllog.close()
        log.info("stopped")

    # -- what the links report --------------------------------------------------

    def deliver(self, notifications: List[Notification]) -> None:
        """The engines' notifications: finished calls to the call log, each
        one to the connections of its user."""
        for note in notifications:
            if note.record is not None:
                self.calllog.add(note.record)
        self.hub.deliver(notifications)
        changes = self.board.on_notifications(notifications, self.loop.wall)
        if changes:
            self.hub.deliver_board(changes)

    def board_message(self, link: AmiLink, msg: AmiMessage) -> None:
        """A phone's, hint's or registration's state from a PBX: to the board."""
        changes = self.board.on_ami(msg, link.config.name, self.loop.wall)
        if changes:
            self.hub.deliver_board(changes)

    def link_resyncing(self, link: AmiLink) -> None:
        """A link logged in and asked for the calls: the board asks for the
        state of every phone and hint, so that it is right from the first
        second (also for phones busy before we connected)."""
        self.board.begin_resync(link.config.name)
        for action, _end in BOARD_LIST_ACTIONS:
            link.send_action(action, on_reply=functools.partial(self._board_list_reply, link,
                                                                action))

    def _board_list_reply(self, link: AmiLink, action: str, msg: Optional[AmiMessage]) -> None:
        if msg is None or msg.get("Response") in (None, "Success"):
            return  # the link went down (the next login asks again), or it went well
        # An Asterisk without res_manager_devicestate.so answers DeviceStateList
        # "Invalid/unknown command" (main/manager.c), and never sends
        # DeviceStateChange either; without write = reporting (or call):
        # "Permission denied".  The board goes on with what it has.
        what, remedy = _BOARD_LIST_PROBLEMS[action]
        self.loop.log_repeated("board-list %s %s" % (link.tag, action), logging.WARNING,
                               "%s: the office board cannot list %s (%s): %s; until then it "
                               "knows only what calls and registrations say", link.tag, what,
                               msg.get("Message", "refused")[:200], remedy)

    def pbx_status(self, link: AmiLink, reason: str = "") -> Dict[str, object]:
        """``STATUS pbx=up|down``; with several PBXes ``name=`` says which."""
        fields: Dict[str, object] = {"pbx": "up" if link.up else "down"}
        if len(self.links) > 1:
            fields["name"] = link.config.name
        fields["time"] = iso_time(self.loop.wall)
        if reason:
            fields["reason"] = reason
        if link.up and link.warnings:
            fields["warning"] = "; ".join(link.warnings)
        return fields

    def link_status(self, link: AmiLink, reason: str) -> None:
        """A link went up or down: every logged-in client is told."""
        self.hub.broadcast_status(self.pbx_status(link, reason))

    # -- signals -------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """From here on SIGHUP/SIGTERM/SIGINT are noted and handled by the
        loop."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self.loop.selector.register(reader, selectors.EVENT_READ,
                                    functools.partial(self._on_wakeup, reader))
        signal.set_wakeup_fd(writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def take_signals(self, signals: List[int]) -> None:
        """Signals noted before the daemon existed, to handle in the loop."""
        self._pending_signals.extend(signals)
        del signals[:]

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs between bytecodes: only note it; the loop acts on it.
        self._pending_signals.append(signum)

    def _on_wakeup(self, sock: socket.socket, mask: int) -> None:
        try:
            while sock.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            if signum == signal.SIGHUP:
                try:
                    self.reload()
                except Exception:  # our bug: keep serving with what runs now
                    log.exception("reload of %s failed", self.config.path)
            else:
                log.info("signal %d received", signum)
                self.running = False

    # -- reload --------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; on any error keep the running one.  The call
        log is reopened either way: log rotation sends SIGHUP too."""
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("reload of %s rejected, keeping the running configuration:",
                      self.config.path)
            for problem in e.problems:
                log.error("  %s", problem)
            self.calllog.reopen(self.config.calllog)
            return
        if self._listeners(new) != self._listening:
            log.warning("reload: bind, port, tls_port, web, web_port and web_tls_port changes "
                        "need a restart; still on %s port %s, TLS port %s, web %s, web port "
                        "%s, web TLS port %s", *self._listening)
        old_phones = _board_phones(self.config)
        self.config = new
        self.view.users = new.users
        self.calllog.history.retain(new.users)
        for link in self.links:
            link.engine.set_directory(Directory(new.users.values(), link.config.name))
        logging.getLogger("ctinotify").setLevel(new.loglevel.upper())
        board_changes = self.board.reconfigure(new.users.values(), self.loop.wall)
        self.hub.reconfigure(new)
        self.hub.deliver_board(board_changes)
        if _board_phones(new) != old_phones:
            for link in self.links:
                if link.up:
                    self.link_resyncing(link)  # the states of phones new to the board
        self.calllog.reopen(new.calllog)
        self._reload_links(new)
        log.info("configuration reloaded from %s (%d users)", new.path, len(new.users))
        for note in new.advisories() + certificate_warnings(new, self.loop.wall):
            log.warning("%s", note)

    def _reload_links(self, new: Config) -> None:
        """A PBX whose section changed reconnects; one removed ends its
        calls; one added connects.  The others keep their link and calls."""
        fresh = {pbx.name: pbx for pbx in new.pbxes}
        kept: List[AmiLink] = []
        for link in self.links:
            pbx = fresh.pop(link.config.name, None)
            if pbx is None:
                log.info("reload: [%s] removed, disconnecting", link.tag)
                link.stop()
                self.deliver(link.engine.link_lost(self.loop.wall))
                continue
            link.reconfigure(pbx, new.ami_tls_contexts.get(pbx.name), len(new.pbxes) > 1)
            kept.append(link)
        for pbx in fresh.values():
            link = self._make_link(pbx, new)
            log.info("reload: [%s] added", link.tag)
            link.resolve()
            kept.append(link)
        self.links = kept


# ---------------------------------------------------------------------------
# Desktop client I/O: one blocking socket, reconnects, hooks, the browser
# ---------------------------------------------------------------------------


class WatchState:
    """The small JSON file that remembers, per user and server, the newest
    server time ``watch`` has seen, so the next start lists only the calls
    missed since.  A missing or broken file means: never connected."""

    def __init__(self, path: str, key: str):
        self.path = os.path.expanduser(path)
        self.key = key
        self.last_seen: Optional[float] = None
        #: The calls seen in the second of ``last_seen`` (None: not known,
        #: a file written before they were kept).
        self.last_calls: Optional[Set[str]] = None
        self._saved: Optional[Tuple[float, frozenset]] = None
        self._warned = False

    def _read(self) -> Dict[str, object]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring the state file %s: %s", self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def load(self) -> None:
        data = self._read()
        seen, calls = data.get("last_seen"), data.get("last_calls")
        if isinstance(seen, dict):
            self.last_seen = parse_iso_time(str(seen.get(self.key, "")))
        if self.last_seen is not None:
            self.last_calls = self._calls_at(calls, self.last_seen)
            self._saved = (self.last_seen, frozenset(self.last_calls or ()))

    def _calls_at(self, calls: object, when: float) -> Optional[Set[str]]:
        """The calls the file says were seen in the second ``when``, or None
        if it does not say (an older file, another second, odd JSON)."""
        entry = calls.get(self.key) if isinstance(calls, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("calls"), list) \
                or parse_iso_time(str(entry.get("time", ""))) != when:
            return None
        return {str(call) for call in entry["calls"]}

    def advance(self, when: Optional[float], calls: Iterable[str] = ()) -> None:
        """Remember when (and the calls seen in its second), if newer, and
        write the file if that changed."""
        if when is None or (self.last_seen is not None and when < self.last_seen):
            return
        if when != self.last_seen:
            self.last_seen, self.last_calls = when, set()
        if self.last_calls is not None:
            self.last_calls.update(calls)
        self.save()

    def save(self) -> None:
        if self.last_seen is None or \
                (self.last_seen, frozenset(self.last_calls or ())) == self._saved:
            return
        data = self._read()
        seen = data.get("last_seen")
        if not isinstance(seen, dict):
            seen = data["last_seen"] = {}
        calls = data.get("last_calls")
        if not isinstance(calls, dict):
            calls = data["last_calls"] = {}
        # Another watch of this user may have saved a newer time meanwhile.
        theirs = parse_iso_time(str(seen.get(self.key, "")))
        if theirs is not None and theirs > self.last_seen:
            self.last_seen = theirs
            self.last_calls = self._calls_at(calls, theirs)
        seen[self.key] = iso_time(self.last_seen)
        if self.last_calls is not None:
            # With their second: a watch of an older version may move
            # last_seen on and leave these behind, then they say nothing.
            calls[self.key] = {"time": iso_time(self.last_seen),
                               "calls": sorted(self.last_calls)}
        else:
            calls.pop(self.key, None)
        temporary = "%s.%d.tmp" % (self.path, os.getpid())
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(temporary, self.path)
            self._saved = (self.last_seen, frozenset(self.last_calls or ()))
        except OSError as e:
            if not self._warned:
                log.warning("cannot write the state file %s: %s", self.path, e.strerror or e)
                self._warned = True
            try:
                os.unlink(temporary)
            except OSError:
                pass


#: ANSI: cursor home; erase to the end of the line; to the end of the screen.
_ANSI_HOME, _ANSI_ERASE_LINE, _ANSI_ERASE_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def ansi_terminal(out) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``out`` is a terminal that takes ANSI escapes: any on POSIX;
    on Windows, a console that agrees to (Windows 10 and newer: the
    console mode ENABLE_VIRTUAL_TERMINAL_PROCESSING, for standard output)."""
    try:
        if not out.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    if os.name != "nt":
        return True
    try:
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.GetStdHandle(-11)  # STD_OUTPUT_HANDLE
        mode = ctypes.c_uint32()
        if out is not sys.stdout or not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))
    except (ImportError, AttributeError, OSError):
        return False


class BoardScreen:
    """Where ``watch --board`` shows the board: on a terminal, the table
    redrawn in place on every change and every second (the timers); else
    (a pipe, a file, a Windows console without ANSI escapes) one plain
    line per colleague at the start and per change after, so a script can
    read it."""

    def __init__(self, out, title: str, tty: Optional[bool] = None):  # type: ignore[no-untyped-def]
        self.out = out
        self.title = title
        self.tty = ansi_terminal(out) if tty is None else tty
        self.table = BoardTable()
        self._drawn_at: Optional[int] = None

    def show_board(self, items: List[WatchEvent]) -> None:
        self.table.reset(items)
        if self.tty:
            self.draw(time.time())
        else:
            for item in items:
                self._line(render_event(item))

    def change(self, event: WatchEvent) -> None:
        if event.kind == Kind.STATE:
            self.table.update(event)
        elif event.kind == "status":
            self.table.note = "" if event.fields.get("pbx") == "up" else render_event(event)
        if self.tty:
            self.draw(time.time())
        else:
            self._line(render_event(event))

    def tick(self) -> None:
        """Once a second on a terminal: the timers move on."""
        now = time.time()
        if self.tty and self._drawn_at is not None and int(now) != self._drawn_at:
            self.draw(now)

    def draw(self, now: float) -> None:
        self._drawn_at = int(now)
        head = "%s  %s" % (self.title, time.strftime("%H:%M:%S", time.localtime(now)))
        lines = [head, ""] + self.table.render(now)
        self.out.write(_ANSI_HOME + "".join(line + _ANSI_ERASE_LINE + "\n" for line in lines)
                       + _ANSI_ERASE_BELOW)
        self.out.flush()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class WatchClient:
    """``ctinotify watch``: a blocking socket with a short timeout, which
    works the same on Windows, macOS and Linux (no select() on stdin).

    Each connection gets a fresh WatchSession; this class only moves its
    lines, prints, runs hooks, opens pages and waits between reconnects.
    """

    def __init__(self, host: str, port: int, user: str, secret: str,
                 fmt: str = "readable", hooks: Sequence[ExecHook] = (),
                 open_on: str = "", state: Optional[WatchState] = None,
                 out=None, tls_context: Optional["ssl.SSLContext"] = None, tls_ca: str = "",
                 board: bool = False, dial: str = ""):
        self.host = host
        self.port = port
        #: Set: the server's TLS port, its certificate verified (against
        #: ``tls_ca``, else the system's CAs).
        self.tls_context = tls_context
        self.tls_hint = ("is %s the server's certificate, or its CA's?" % tls_ca if tls_ca
                         else "give the server's certificate (or its CA) with --tls-ca")
        self.user = user
        self._secret = secret
        #: ``readable`` lines, or the server's raw ``text`` or ``json`` lines.
        self.fmt = fmt
        self.hooks = list(hooks)
        #: When a call's popup url opens: ``ring`` (its incoming), ``answer``
        #: (the user answers it on one of their phones), "" never.
        self.open_on = open_on
        self.state = state
        # pythonw (Windows, started at login) has no console: sys.stdout is None.
        self.out = out or sys.stdout or open(os.devnull, "w", encoding="utf-8")
        #: "The server is out of reach" was said (a status hook ran): not
        #: again until a login succeeds.
        self._offline_said = False
        self.children: List[subprocess.Popen] = []
        self.where = "%s port %d" % (host, port)
        #: ``--board``: the office board instead of the user's calls.
        self.board = BoardScreen(self.out, "ctinotify board of %s, %s" % (user, self.where)) \
            if board else None
        #: The connection of the moment: logged in; when the server was
        #: last heard and a PING sent (monotonic).
        self._logged_in = False
        self._last_heard = 0.0
        self._ping_sent: Optional[float] = None
        #: ``--dial``: the number; the exit status once its outcome is known;
        #: when to stop waiting for it (monotonic).
        self.dial = dial
        self._exit: Optional[int] = None
        self._dial_by = 0.0

    def run(self) -> int:
        """Until Ctrl-C (0) or a refused login (1); with ``dial``, until the
        outcome of that one DIAL (0: the phone answered, else 1)."""
        if self.dial:
            return self._dial_once()
        backoff = WATCH_RECONNECT_MIN_S
        try:
            while True:
                fatal, logged_in, reason = self._connect_once()
                if fatal:
                    return 1
                if logged_in:
                    backoff = WATCH_RECONNECT_MIN_S
                log.warning("%s; reconnecting in %g s", reason, backoff)
                self._offline(reason)
                self._sleep(backoff)
                backoff = min(backoff * 2, WATCH_RECONNECT_MAX_S)
        except KeyboardInterrupt:
            return 0
        finally:
            if self.state is not None:
                self.state.save()

    def _dial_once(self) -> int:
        """``--dial``: one connection, one DIAL, its outcome; no reconnect
        (a click on a tel: link must not ring the phone twice)."""
        self._dial_by = time.monotonic() + WATCH_DIAL_WAIT_S
        try:
            _fatal, _logged_in, reason = self._connect_once()
        except KeyboardInterrupt:
            return 1
        if self._exit is None:
            log.error("dial %s: %s", self.dial, reason)
            return 1
        return self._exit
    def list_missed(self, since: float) -> int:
        """``watch --missed``: log in, print the calls missed since ``since``
        (the day's start) as the server's HISTORY has them, and leave: 0, or
        1 when that cannot be done.  The state file is not touched."""
        sock, (_fatal, _, failure) = self._dial()
        if sock is None:
            log.error("%s", failure)
            return 1
        session = WatchSession(self.user, self._secret, "text" if self.fmt == "text" else "json",
                               since, WATCH_MISSED_HISTORY, since_calls=())
        framer = LineFramer(MAX_WATCH_LINE_BYTES, skip_long=True)
        try:
            sock.settimeout(WATCH_CONNECT_TIMEOUT_S)
            while True:
                data = sock.recv(WATCH_RECV_BYTES)
                if not data:
                    log.error("%s closed the connection", self.where)
                    return 1
                framer.receive_data(data)
                line = framer.next_line()
                while line is not None:
                    for item in session.receive_line(line):
                        status = self._missed_item(sock, item)
                        if status is not None:
                            return status
                    line = framer.next_line()
        except (OSError, WatchProtocolError) as e:
            log.error("%s: %s", self.where, _error_text(e) if isinstance(e, OSError) else e)
            return 1
        finally:
            sock.close()

    def _missed_item(self, sock: socket.socket, item: object) -> Optional[int]:
        """One item of ``--missed``'s session: the exit status once done."""
        if isinstance(item, WatchRefused):
            log.error("%s refused the login as %s (%s)", self.where, self.user, item.reply)
            return 1
        if isinstance(item, WatchSend):
            self._send(sock, item)
        elif isinstance(item, WatchMissed):
            if not item.supported:
                log.error("%s has no HISTORY command: it cannot list missed calls", self.where)
                return 1
            for call in item.calls:
                self._show(call)
            log.info("%d missed call%s today", len(item.calls), "" if len(item.calls) == 1 else "s")
            if not item.complete:
                log.warning("the server keeps the last %d calls: missed calls of today before "
                            "those are not listed", WATCH_MISSED_HISTORY)
            self._send(sock, WatchSend("QUIT"))
            return 0
        return None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._reap()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, WATCH_TICK_S))

    def _connect_once(self) -> Tuple[bool, bool, str]:
        """One connection: ``(fatal, logged_in, why it ended)``."""
        sock, failure = self._dial()
        if sock is None:
            return failure
        since = self.state.last_seen if self.state is not None else None
        session = WatchSession(self.user, self._secret,
                               "text" if self.fmt == "text" else "json", since,
                               since_calls=self.state.last_calls if self.state is not None else (),
                               board=self.board is not None, dial=self.dial)
        self._logged_in = False
        try:
            return self._serve(sock, session)
        except WatchProtocolError as e:
            return False, self._logged_in, "%s: %s" % (self.where, e)
        except OSError as e:
            return False, self._logged_in, "connection to %s lost: %s" % (self.where,
                                                                           e.strerror or e)
        finally:
            sock.close()

    def _dial(self) -> Tuple[Optional[socket.socket], Tuple[bool, bool, str]]:
        """Connect, with TLS if asked: ``(socket, _)``, or ``(None, (fatal,
        False, why not))``."""
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=WATCH_CONNECT_TIMEOUT_S)
        except OSError as e:
            return None, (False, False, "cannot connect to %s: %s" % (self.where,
                                                                      e.strerror or e))
        if self.tls_context is not None:
            try:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
            except OSError as e:
                sock.close()
                if isinstance(e, ssl.SSLCertVerificationError):
                    # Trying again would not help; somebody may be in between.
                    log.error("%s: %s; %s", self.where, _error_text(e), self.tls_hint)
                    return None, (True, False, "certificate not trusted")
                return None, (False, False, "TLS with %s failed: %s" % (self.where,
                                                                        _error_text(e)))
        return sock, (False, False, "")

    def _serve(self, sock: socket.socket, session: WatchSession) -> Tuple[bool, bool, str]:
        """Read, frame and act on the server's lines until the connection ends."""
        sock.settimeout(WATCH_TICK_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # An over-long line is skipped, not a reason to reconnect: the same
        # line (a HISTORY record) would come again, and again.
        framer = LineFramer(MAX_WATCH_LINE_BYTES, skip_long=True)
        self._last_heard, self._ping_sent = time.monotonic(), None
        while True:
            self._reap()
            try:
                data: Optional[bytes] = sock.recv(WATCH_RECV_BYTES)
            except socket.timeout:
                data = None
            now = time.monotonic()
            if data == b"":
                return False, self._logged_in, "%s closed the connection" % self.where
            if data:
                self._last_heard, self._ping_sent = now, None
                framer.receive_data(data)
                if self._dispatch(sock, session, framer):
                    return True, False, "login refused"
            elif session.state == "ready" and not self._keepalive(sock, session, now):
                return False, self._logged_in, "%s does not answer PING" % self.where
            if self._exit is not None:
                return False, self._logged_in, "done"
            if self.dial and now >= self._dial_by:
                return False, self._logged_in, "no outcome within %g s" % WATCH_DIAL_WAIT_S
            if self.board is not None:
                self.board.tick()

    def _dispatch(self, sock: socket.socket, session: WatchSession,
                  framer: LineFramer) -> bool:
        """Act on every complete line; True if the login was refused."""
        skipped = framer.skipped
        while True:
            line = framer.next_line()
            if framer.skipped > skipped:
                log.warning("%s: skipped a line longer than %d bytes",
                            self.where, MAX_WATCH_LINE_BYTES)
                skipped = framer.skipped
            if line is None:
                return False
            for item in session.receive_line(line):
                if isinstance(item, WatchRefused) and item.what == "board":
                    log.error("%s shows %s no board (%s): the user's board is none, or "
                              "their events lack state", self.where, self.user, item.reply)
                    return True
                if isinstance(item, WatchRefused):
                    log.error("%s refused the login as %s (%s): check the user, "
                              "the secret, and the host= allowed for the user",
                              self.where, self.user, item.reply)
                    return True
                if isinstance(item, WatchLoggedIn):
                    self._logged_in = True
                    self._offline_said = False
                    log.info("connected to %s: %s", self.where, item.reply)
                self._act(sock, session, item)

    def _keepalive(self, sock: socket.socket, session: WatchSession, now: float) -> bool:
        """PING a server silent for a while; False once it failed to answer."""
        if self._ping_sent is None and now - self._last_heard >= WATCH_PING_INTERVAL_S:
            self._send(sock, session.ping())
            self._ping_sent = now
        elif self._ping_sent is not None and now - self._ping_sent >= WATCH_PONG_TIMEOUT_S:
            return False
        return True

    @staticmethod
    def _send(sock: socket.socket, command: WatchSend) -> None:
        # A few short commands on a client's own socket: sendall is fine here.
        sock.sendall((command.line + "\r\n").encode("utf-8"))

    def _act(self, sock: socket.socket, session: WatchSession, item: object) -> None:
        if self.state is not None:
            # Before anything is shown: what the user saw is remembered.
            self.state.advance(session.seen_until, session.seen_calls)
        if isinstance(item, WatchSend):
            self._send(sock, item)
        elif self.dial:
            self._dial_news(item)
        elif isinstance(item, WatchBoard):
            if self.board is not None and self.fmt == "readable":
                self.board.show_board(item.items)
            else:
                for entry in item.items:
                    self._show(entry)
        elif isinstance(item, WatchEvent):
            if self.board is not None and self.fmt == "readable":
                self.board.change(item)
                if item.kind in EVENT_KINDS:
                    self._run_hooks(item)  # --exec state=: the board's changes too
            else:
                self._event(item)
        elif isinstance(item, WatchMissed):
            if not item.supported:
                log.info("%s has no HISTORY command: missed calls are not listed", self.where)
            # Missed while away: said once, as live ones; on the very first
            # start they are only listed (they may be days old).
            first_start = session.since is None
            for call in item.calls:
                self._show(call)
                if not first_start:
                    self._run_hooks(call)
        elif isinstance(item, WatchCalls):
            for call in item.calls:
                self._show(call)

    def _dial_news(self, item: object) -> None:
        """``--dial``: the reply to DIAL, then its outcome (``STATUS dial=``);
        the events of the call that follows are for a watch that stays."""
        if isinstance(item, WatchDialed):
            if not item.ok:
                log.error("%s", item.reply)
                self._exit = 1
            elif self.fmt != "readable":
                self.out.write(item.reply.translate(_DISPLAY_ESCAPES) + "\n")
            else:
                fields = parse_text_line("OK " + item.reply.split(" ", 2)[-1])[2]
                self.out.write(("%s  %-8s  %s: ringing your phone %s, lift it to call" % (
                    time.strftime("%H:%M:%S"), "dial", fields.get("number", self.dial),
                    fields.get("device", "?"))).translate(_DISPLAY_ESCAPES) + "\n")
            self.out.flush()
        elif isinstance(item, WatchEvent) and item.kind == "status" and item.fields.get("dial"):
            self._show(item)
            self._exit = 0 if item.fields["dial"] == "answered" else 1
    def _event(self, event: WatchEvent) -> None:
        """A call event or status: shown (in the server's own formats only
        what the server sent; readable, a missed call's hangup as the
        ``missed`` line after it), its hooks run, its page opened."""
        if (event.raw or self.fmt == "readable") and not (event.missed and
                                                           self.fmt == "readable"):
            self._show(event)
        if event.kind == "status" and event.fields.get("server") == "stopping":
            self._offline_said = True  # said by the server itself
        if event.kind in EVENT_KINDS or event.kind in HOOK_KINDS:
            self._run_hooks(event)
        if self.open_on == "ring" and event.kind == Kind.INCOMING or \
                self.open_on == "answer" and event.kind == Kind.PICKUP and \
                event.answer == ANSWERED_HERE and event.fields.get("role") == "callee":
            self._open(event.url)

    def _offline(self, reason: str) -> None:
        """The server is out of reach (lost, or never reached): shown, and
        the status hooks told, once until a login succeeds."""
        if self._offline_said:
            return
        self._offline_said = True
        self._event(WatchEvent("status", {"event": "status", "server": "unreachable",
                                          "reason": reason, "time": iso_time(time.time())}, ""))

    def _show(self, event: WatchEvent) -> None:
        if self.fmt == "readable":
            text = render_event(event)
        else:
            text = event.raw.translate(_DISPLAY_ESCAPES)
        self.out.write(text + "\n")
        self.out.flush()

    def _run_hooks(self, event: WatchEvent) -> None:
        for hook in self.hooks:
            if not hook.wants(event.kind):
                continue
            self._reap()
            argv = hook.argv(dict(event.fields, text=event_text(event)))
            if len(self.children) >= MAX_HOOK_PROCESSES:
                log.warning("--exec %s: %d hooks still running, not starting %s",
                            hook.kind, len(self.children), argv[0])
                continue
            try:
                # An argument list and no shell: nothing in argv is ever parsed again.
                # On Windows no console window flashes up per hook (pythonw
                # at login has none to share); elsewhere the flag is 0.
                self.children.append(subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL,
                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0)))
            except (OSError, ValueError) as e:
                log.warning("--exec %s: cannot run %s: %s", hook.kind, argv[0], e)

    def _reap(self) -> None:
        """Collect finished hooks (no zombies); never waits for one."""
        self.children = [child for child in self.children if child.poll() is None]

    def _open(self, url: str) -> None:
        if not url:
            return
        if not is_web_url(url):
            log.warning("not opening %s: only http and https pages are opened",
                        url[:200].translate(_DISPLAY_ESCAPES))
            return
        try:
            if not webbrowser.open(url):
                log.warning("no web browser found to open %s", url)
        except webbrowser.Error as e:
            log.warning("cannot open %s: %s", url, e)


# ---------------------------------------------------------------------------
# The web page: HTML, CSS and plain JavaScript, served at GET /
# ---------------------------------------------------------------------------

# Everything that comes from the PBX or a user reaches the page through
# textContent and attribute setters, never innerHTML (the CSP's Trusted
# Types rule makes an innerHTML assignment throw); a screen pop opens http
# and https URLs only.  The script and the style are allowed by their
# hashes, so the page runs its own script and nothing else.

WEB_PAGE_CSS = """
:root { --bg: #f6f7f9; --fg: #1d2330; --muted: #667085; --card: #fff; --line: #d9dee7;
  --ring: #b45309; --talk: #047857; --bad: #b42318; --accent: #1d4ed8; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  background: var(--bg); color: var(--fg); }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; padding: 10px 14px;
  background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { font-size: 18px; margin: 0 auto 0 0; }
.pill { font-size: 13px; padding: 2px 10px; border-radius: 999px; background: #e7eaf0; }
.pill.ok { background: #d1fadf; color: #05603a; }
.pill.bad { background: #fee4e2; color: var(--bad); font-weight: 600; }
.banner { position: sticky; top: 0; z-index: 2; padding: 12px 14px; font-weight: 700;
  background: var(--bad); color: #fff; text-align: center; font-size: 17px; }
main { max-width: 760px; margin: 0 auto; padding: 12px; }
button, select, input { font: inherit; }
button { cursor: pointer; border: 1px solid var(--line); background: var(--card);
  border-radius: 8px; padding: 6px 12px; min-height: 36px; }
button.primary { background: var(--accent); color: #fff; border-color: var(--accent); }
form.login { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 18px; max-width: 380px; margin: 40px auto; display: grid; gap: 12px; }
form.login label { display: grid; gap: 4px; }
form.login input { padding: 8px; border: 1px solid var(--line); border-radius: 8px; }
.error { color: var(--bad); min-height: 1.4em; margin: 0; }
.tabs { display: flex; gap: 6px; margin-bottom: 10px; }
.tab.active { background: var(--fg); color: #fff; border-color: var(--fg); }
.badge { display: inline-block; min-width: 22px; padding: 0 6px; margin-left: 4px;
  border-radius: 999px; background: var(--bad); color: #fff; font-size: 13px; font-weight: 700; }
ul.calls, ul.journal, ul.activity { list-style: none; margin: 0; padding: 0; display: grid; gap: 8px; }
li.call { background: var(--card); border: 1px solid var(--line); border-left: 6px solid var(--muted);
  border-radius: 10px; padding: 10px 12px; }
li.call.ringing { border-left-color: var(--ring); }
li.call.talking { border-left-color: var(--talk); }
li.call.held, li.call.parked { border-left-color: var(--accent); }
.row { display: flex; flex-wrap: wrap; align-items: baseline; gap: 8px; }
.dir { color: var(--muted); font-size: 14px; }
.state { font-weight: 700; }
li.call.ringing .state { color: var(--ring); }
li.call.talking .state { color: var(--talk); }
.timer { margin-left: auto; font-variant-numeric: tabular-nums; color: var(--muted); }
.who { font-size: 20px; font-weight: 600; }
.who, .num, .words { overflow-wrap: anywhere; word-break: break-word; unicode-bidi: isolate; }
.num { color: var(--muted); }
.words { color: var(--fg); font-size: 15px; }
li.entry { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 8px 12px; display: grid; gap: 2px; }
li.entry.missed { border-left: 6px solid var(--bad); }
li.entry.missed .words { color: var(--bad); font-weight: 600; }
.when { color: var(--muted); font-size: 14px; }
.quiet { color: var(--muted); }
ul.activity li { color: var(--muted); font-size: 14px; }
details.settings { margin-top: 18px; background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; padding: 8px 12px; }
details.settings label, details.settings p { display: block; margin: 8px 0; }
a.pop { display: inline-block; margin-top: 4px; }
form.dial { display: flex; gap: 8px; margin-bottom: 10px; }
form.dial input, form.transfer input { flex: 1; min-width: 0; padding: 6px 8px;
  border: 1px solid var(--line); border-radius: 8px; }
.acts { display: flex; flex-wrap: wrap; gap: 8px; margin-top: 6px; }
form.transfer { display: flex; gap: 8px; flex-basis: 100%; }
button.hangup { border-color: var(--bad); color: var(--bad); }
.note { min-height: 1.4em; margin: 0 0 8px; font-weight: 600; }
.note.bad { color: var(--bad); }
a.tel { font-size: 14px; }
main.wide { max-width: 1180px; }
.panes.beside { display: grid; grid-template-columns: minmax(0, 1fr) minmax(300px, 440px);
  gap: 16px; align-items: start; }
.panes.beside > #now-view, .panes.beside > #journal-view { grid-column: 1; grid-row: 1; }
.panes.beside > #board-view { grid-column: 2; grid-row: 1; }
.pane-title { font-size: 15px; margin: 0 0 6px; color: var(--muted); font-weight: 600; }
.hint { font-size: 14px; margin: 0 0 8px; }
li.call.draggable { cursor: grab; }
/* The board's states: a colour each (Okabe-Ito, told apart with every
   kind of colour blindness), and never the colour alone: each has its
   word and its own sign, and away a dashed edge. */
li.card.st-free { --st: #007a5a; --st-bg: #dcf3ea; }
li.card.st-ringing { --st: #9a5b00; --st-bg: #fcebc4; }
li.card.st-talking { --st: #005f94; --st-bg: #d8eaf6; }
li.card.st-on_hold { --st: #8e3b6f; --st-bg: #f5dcea; }
li.card.st-busy { --st: #b04a00; --st-bg: #fadfcf; }
li.card.st-away { --st: #5b6170; --st-bg: #e7e9ee; }
ul.board { list-style: none; margin: 0; padding: 0; display: grid; gap: 8px;
  grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); }
li.card { --st: var(--muted); --st-bg: #eef0f4; background: var(--card); border: 1px solid var(--line);
  border-left: 6px solid var(--st); border-radius: 10px; padding: 8px 10px; display: grid;
  gap: 4px; min-width: 0; align-content: start; }
li.card.st-away { border-left-style: dashed; }
li.card.dials { cursor: pointer; }
li.card.dials:hover { border-color: var(--st); }
li.card:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
li.card.drop { outline: 3px dashed var(--accent); outline-offset: 2px; background: #eef3ff; }
body.dragging li.card.takes { border-style: dashed; }
li.card .who { font-size: 16px; }
.you { font-size: 12px; color: var(--muted); }
.st { display: inline-flex; gap: 4px; align-items: center; padding: 0 8px; border-radius: 999px;
  background: var(--st-bg); color: var(--st); font-weight: 700; font-size: 14px; }
.st .sign { font-size: 12px; }
li.card .timer { font-size: 14px; }
.with { font-size: 14px; overflow-wrap: anywhere; word-break: break-word; }
form.transfer select { min-width: 0; max-width: 100%; flex-basis: 100%; padding: 6px 4px;
  border: 1px solid var(--line); border-radius: 8px; background: var(--card); }
form.transfer { flex-wrap: wrap; }
@media (max-width: 480px) {
  body { font-size: 15px; }
  header h1 { flex-basis: 100%; }
  .who { font-size: 18px; }
  main { padding: 8px; }
  ul.board { grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); }
}
"""

WEB_PAGE_JS = r"""
"use strict";
(function () {
  var MISSED = ["noanswer", "cancelled", "busy", "failed"];  // as MISSED_REASONS
  var POP_DELAY_MS = 250;  // a replayed ring followed by its hangup pops nothing
  var state = {
    user: null, csrf: "", es: null, lastId: null, gen: 0, calls: new Map(),
    ended: new Set(), notes: new Map(), popped: new Set(), links: {}, stopping: false,
    conn: "idle", history: [], activity: [], view: "now", sessionNote: "", actions: [],
    acts: 0, outcomeOf: 0,
    // The office board: user -> their state item, in the server's order;
    // their cards; the users a state event told while /board was asked.
    hasBoard: false, board: new Map(), cards: new Map(), boardGen: 0, boardTold: null,
    dragging: null
  };
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function load(key, fallback) {
    try { var v = window.localStorage.getItem(key); return v === null ? fallback : v; }
    catch (e) { return fallback; }
  }
  function save(key, value) {
    try { window.localStorage.setItem(key, String(value)); } catch (e) { /* private mode */ }
  }
  function webUrl(text) {
    if (typeof text !== "string" || !text) { return null; }
    try {
      var url = new URL(text);
      return (url.protocol === "http:" || url.protocol === "https:") ? url.href : null;
    } catch (e) { return null; }
  }
  function party(p) {
    p = p || {};
    var name = p.name || "", num = p.num || "";
    return { main: name || num || "unknown", num: (name && num && name !== num) ? num : "" };
  }
  function said(p) {
    var x = party(p);
    return x.num ? x.main + " (" + x.num + ")" : x.main;
  }
  function secs(text) { var t = Date.parse(text || ""); return isNaN(t) ? null : t; }
  function clock(ms) {
    var s = Math.max(0, Math.floor(ms / 1000)), h = Math.floor(s / 3600);
    var m = Math.floor((s % 3600) / 60), r = s % 60;
    var mm = (h ? String(m).padStart(2, "0") : String(m)) + ":" + String(r).padStart(2, "0");
    return h ? h + ":" + mm : mm;
  }
  function talked(seconds) {
    var s = Number(seconds) || 0;
    return s < 60 ? s + " s" : clock(s * 1000);
  }

  function api(method, path, body) {
    var headers = {};
    if (body !== undefined) { headers["Content-Type"] = "application/x-www-form-urlencoded"; }
    if (method === "POST" && state.csrf) { headers["X-CSRF-Token"] = state.csrf; }
    return fetch(path, { method: method, headers: headers, body: body,
                         credentials: "same-origin", cache: "no-store" });
  }

  // -- connection and PBX link, impossible to miss ---------------------------
  function showBanner() {
    var banner = $("banner"), text = "";
    var down = Object.keys(state.links).filter(function (k) { return state.links[k] === "down"; });
    if (state.stopping) { text = "The ctinotify server is stopping: no calls are shown until it is back"; }
    else if (state.user && state.conn !== "connected") {
      text = "Not connected to the server: reconnecting…";
    } else if (down.length) {
      text = "PBX link down" + (down[0] !== "default" ? " (" + down.join(", ") + ")" : "") +
        ": calls are not shown until it is back";
    }
    banner.textContent = text;
    banner.hidden = !text;
    var conn = $("conn");
    conn.textContent = { connected: "connected", connecting: "connecting…",
                         reconnecting: "reconnecting…", idle: "not connected" }[state.conn] || state.conn;
    conn.className = "pill " + (state.conn === "connected" ? "ok" : "bad");
    var pbx = $("pbx"), keys = Object.keys(state.links);
    pbx.hidden = !keys.length;
    pbx.textContent = down.length ? "PBX link down" : "PBX connected";
    pbx.className = "pill " + (down.length ? "bad" : "ok");
  }
  function setConn(value) { state.conn = value; showBanner(); }

  // -- login -----------------------------------------------------------------
  function showLogin(note) {
    closeStream();
    state.user = null; state.csrf = ""; state.actions = [];
    setBoard(false);
    $("app").hidden = true; $("logout").hidden = true; $("who").textContent = "";
    $("login").hidden = false;
    $("login-error").textContent = note || "";
    state.conn = "idle"; showBanner();
    var user = document.querySelector("#login-form input[name=user]");
    if (user && !user.value) { user.focus(); }
  }
  function loggedIn(info) {
    state.user = info.user; state.csrf = info.csrf || "";
    state.actions = Array.isArray(info.actions) ? info.actions : [];
    $("dial-form").hidden = !can("dial");
    setBoard(info.board === true);
    note("");
    $("login").hidden = true; $("app").hidden = false; $("logout").hidden = !state.csrf;
    $("who").textContent = info.user;
    state.stopping = false;
    updateMissed();
    openStream();
  }
  function onLoginSubmit(event) {
    event.preventDefault();
    var form = event.target, error = $("login-error");
    var body = new URLSearchParams();
    body.set("user", form.elements.user.value);
    body.set("secret", form.elements.secret.value);
    error.textContent = "Logging in…";
    $("login-button").disabled = true;
    api("POST", "/login", body.toString()).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        $("login-button").disabled = false;
        if (r.ok) { form.elements.secret.value = ""; error.textContent = ""; loggedIn(j); return; }
        error.textContent = r.status === 401 ? "Wrong user name or secret." :
          r.status === 429 ? "Too many failed logins from this computer: try again in a few minutes." :
          "The server refused the login (" + r.status + ").";
      });
    }, function () {
      $("login-button").disabled = false;
      error.textContent = "Cannot reach the server.";
    });
  }
  function logout() {
    api("POST", "/logout").then(function () { showLogin("Logged out."); },
                                function () { showLogin("Logged out."); });
  }
  function checkSession(note) {
    api("GET", "/session").then(function (r) {
      if (!r.ok) { throw new Error(String(r.status)); }
      return r.json().then(function (j) {
        if (!j.user) { showLogin(note); }
        else if (state.user && j.user === state.user) {
          state.csrf = j.csrf || state.csrf; setTimeout(openStream, 2000);
        }
        else { loggedIn(j); }
      });
    }).catch(function () { setConn("reconnecting"); setTimeout(function () { checkSession(note); }, 3000); });
  }

  // -- the event stream --------------------------------------------------------
  function closeStream() { if (state.es) { state.es.close(); state.es = null; } }
  function openStream() {
    closeStream();
    var url = "/events" + (state.lastId ? "?last_event_id=" + encodeURIComponent(state.lastId) : "");
    var es = new EventSource(url);
    state.es = es;
    setConn(state.conn === "connected" ? "reconnecting" : "connecting");
    es.onopen = function () { state.stopping = false; setConn("connected"); refresh(); };
    es.onmessage = function (m) {
      if (m.lastEventId) { state.lastId = m.lastEventId; }
      var event;
      try { event = JSON.parse(m.data); } catch (e) { return; }
      if (event && typeof event === "object") { handle(event); }
    };
    es.onerror = function () {
      if (es !== state.es) { return; }
      if (es.readyState === EventSource.CLOSED) {  // refused: the session may be gone
        state.es = null; setConn("reconnecting");
        checkSession(state.sessionNote || "Your session ended (the server restarted, or it expired): log in again.");
      } else { setConn("reconnecting"); }
    };
  }
  function refresh() {
    var gen = ++state.gen;
    api("GET", "/calls").then(function (r) { return r.ok ? r.json() : null; }).then(function (list) {
      if (!Array.isArray(list)) { return; }
      var seen = new Set();
      list.forEach(function (f) {
        var key = keyOf(f);
        if (state.ended.has(key)) { return; }
        seen.add(key);
        var call = state.calls.get(key);
        if (!call) { call = newCall(f); state.calls.set(key, call); }
        if (f.state === "up" && call.state === "ringing") {
          call.state = "talking"; call.answeredAt = secs(f.answered) || call.since;
        }
      });
      state.calls.forEach(function (call, key) {
        if (!seen.has(key) && call.gen < gen) { state.calls.delete(key); closeNote(call); }
      });
      renderCalls();
    }).catch(function () {});
    loadHistory();
    loadBoard();
  }
  function loadHistory() {
    api("GET", "/history?n=50").then(function (r) { return r.ok ? r.json() : null; }).then(function (list) {
      if (Array.isArray(list)) { state.history = list; renderJournal(); updateMissed(); }
    }).catch(function () {});
  }

  // -- calls -------------------------------------------------------------------
  function keyOf(f) { return String(f.call) + "@" + String(f.pbx || ""); }
  function newCall(f) {
    return { key: keyOf(f), id: String(f.call), dir: f.role === "caller" ? "out" : "in",
             from: f.from || {}, to: f.to || {},
             device: f.device || "", state: f.state === "up" ? "talking" : "ringing",
             since: secs(f.time) || Date.now(), answeredAt: f.state === "up" ? (secs(f.answered) || secs(f.time)) : null,
             words: "", url: null, gen: state.gen };
  }
  function handle(f) {
    if (f.event === "status") { onStatus(f); return; }
    // Events that belong to no call of the user's are dispatched here by
    // their "event", before the calls' steps (a board item may name a call).
    if (f.event === "state") { onState(f); return; }
    if (typeof f.call !== "string" && typeof f.call !== "number") { return; }
    var key = keyOf(f), call = state.calls.get(key);
    if (f.event === "queue" || (f.event === "unpark" && !call)) { onActivity(f); return; }
    if (state.ended.has(key)) { return; }
    if (!call) { call = newCall(f); state.calls.set(key, call); }
    call.gen = state.gen + 1;
    var step = STEPS[f.event];
    if (step) { step(call, f); }
    if (f.event === "hangup") {
      state.calls.delete(key); state.ended.add(key); closeNote(call);
      setTimeout(loadHistory, 300);
    }
    renderCalls();
  }
  function mine(f) {
    var by = f.answered_by || {};
    return !!(f.device && by.device && by.device === f.device);
  }
  var STEPS = {
    incoming: function (c, f) {
      c.dir = "in"; c.state = "ringing"; c.from = f.from || {}; c.to = f.to || {};
      c.since = secs(f.time) || Date.now(); c.url = webUrl(f.url);
      var extra = [];
      if (f.dialed && f.dialed !== (f.to || {}).num) { extra.push("dialed " + f.dialed); }
      if (f.queue) { extra.push("via queue " + f.queue); }
      c.words = extra.join(" · ");
      later(c, function () { notify(c); if (popMode() === "ring") { pop(c); } });
    },
    outgoing: function (c, f) {
      c.dir = "out"; c.state = "ringing"; c.from = f.from || {}; c.to = f.to || {};
      c.since = secs(f.time) || Date.now(); c.words = "";
    },
    pickup: function (c, f) {
      c.state = "talking"; c.answeredAt = secs(f.time) || Date.now();
      closeNote(c);
      if (c.dir === "in" && !mine(f)) {
        c.words = c.external ? "answered on " + c.external : "answered by " + said(f.answered_by);
      } else { c.words = f.method ? "picked up (" + f.method + " pickup)" : ""; }
      if (c.dir === "in" && mine(f) && popMode() === "answer") { later(c, function () { pop(c); }); }
    },
    timeout: function (c) { c.state = "missed"; c.words = "not answered"; closeNote(c); },
    busy: function (c) { c.state = "busy"; c.words = "busy"; closeNote(c); },
    divert: function (c, f) {
      c.state = "forwarded";
      if (f.direction === "from") { c.words = "forwarded from " + said(f.original); return; }
      var external = f.external === true || f.external === "yes";
      c.external = external ? "mobile " + said(f.target) : "";
      c.words = "forwarded to " + (external ? "mobile " : "") + said(f.target);
    },
    transfer: function (c, f) {
      c.state = "transferred";
      c.words = f.direction === "to" ? "transferred to " + said(f.target) :
        "transferred by " + said(f.by) + (f.direction === "moved" ? " to " + said(f.target) : "");
    },
    park: function (c, f) { c.state = "parked"; c.words = "parked at " + (f.space || "?") + " by " + said(f.by); },
    unpark: function (c, f) {
      if (f.result === "retrieved") { c.state = "talking"; c.words = "taken from parking by " + said(f.retrieved_by); }
      else if (f.result === "timeout") { c.state = "ringing"; c.words = "back from parking"; }
      else { c.words = "the caller hung up while parked"; }
    },
    hold: function (c, f) {
      var me = (c.dir === "in" ? c.to : c.from) || {}, by = f.by || {};
      c.state = "on hold";
      c.words = by.num && by.num === me.num ? "you put it on hold" : "put on hold by " + said(by);
    },
    unhold: function (c) {
      // Also sent when the holding phone hangs up after a transfer: keep that.
      if (c.state === "on hold") { c.state = "talking"; c.words = ""; }
    },
    conference: function (c, f) {
      c.state = "conference";
      c.words = said(f.who) + (f.action === "leave" ? " left" : " joined") + " room " + (f.room || "?") +
        ", " + (f.members || "?") + " in it";
    },
    hangup: function (c) { c.state = "ended"; }
  };
  function later(c, action) {
    setTimeout(function () { if (state.calls.get(c.key) === c) { action(); } }, POP_DELAY_MS);
  }
  function onStatus(f) {
    if (f.pbx) { state.links[f.name || "default"] = f.pbx; }
    if (f.server === "stopping") { state.stopping = true; }
    if (f.session === "closed") {
      state.sessionNote = "Your session was closed: " + (f.reason || "by the server") + ".";
    }
    if (f.replay === "incomplete") { refresh(); }
    if (f.board === "changed") { reloadAccount(); }
    if (f.dial) {
      state.outcomeOf = state.acts;
      note(DIAL_SAID[f.dial] || DIAL_SAID.failed, f.dial !== "answered");
    }
    showBanner();
  }
  function onActivity(f) {
    var text = f.event === "queue" ?
      "Queue " + (f.queue || "?") + ": " + said(f.from) + " " +
        ({ join: "is waiting (position " + (f.position || "?") + ")", leave: "left the queue",
           abandon: "hung up while waiting" }[f.action] || f.action || "") :
      "Parked call at " + (f.space || "?") + ": " + (f.result === "timeout" ? "rang back" : f.result || "");
    state.activity.unshift({ time: secs(f.time) || Date.now(), text: text });
    state.activity = state.activity.slice(0, 10);
    var list = $("activity");
    list.replaceChildren();
    state.activity.forEach(function (a) { list.appendChild(el("li", "", new Date(a.time).toLocaleTimeString() + "  " + a.text)); });
  }

  // -- desktop notifications and the screen pop ----------------------------------
  function notify(c) {
    if (!("Notification" in window) || Notification.permission !== "granted" || state.notes.has(c.key)) { return; }
    var p = party(c.from);
    try {
      var note = new Notification("Call from " + p.main, {
        body: (p.num ? p.num + "\n" : "") + "to " + said(c.to), tag: "ctinotify-" + c.key, requireInteraction: true
      });
      note.onclick = function () { window.focus(); note.close(); };
      state.notes.set(c.key, note);
    } catch (e) { /* mobile browsers need a service worker for this */ }
  }
  function closeNote(c) {
    var note = state.notes.get(c.key);
    if (note) { note.close(); state.notes.delete(c.key); }
  }
  function popMode() { return load("ctinotify.popmode", "ring"); }
  function pop(c) {
    if (!c.url || state.popped.has(c.key)) { return; }
    state.popped.add(c.key);
    window.open(c.url, "_blank", "noopener,noreferrer");
  }
  function showNotifyState() {
    var s = !("Notification" in window) ? "not available in this browser" :
      Notification.permission === "granted" ? "on" :
      Notification.permission === "denied" ? "blocked: allow them in the browser's site settings" : "off";
    $("notify-state").textContent = "Desktop notifications: " + s;
    $("notify-enable").hidden = !("Notification" in window) || Notification.permission !== "default";
  }

  // -- actions: dial, hang up, transfer (the user's actions allow them) ----------
  var DIAL_SAID = {
    answered: "You answered: calling now.", busy: "Your phone is busy: nothing was dialled.",
    noanswer: "Your phone was not answered: nothing was dialled.",
    failed: "Your phone could not be rung: nothing was dialled.",
    unknown: "What became of the call is not known (the PBX did not say)."
  };
  function can(action) { return state.actions.indexOf(action) >= 0; }
  function note(text, bad) {
    var n = $("action-note");
    n.textContent = text || "";
    n.className = "note" + (bad ? " bad" : "");
    n.hidden = !text;
  }
  function act(verb, fields, doing, done) {
    var body = new URLSearchParams(), sent = ++state.acts;
    body.set("verb", verb);
    Object.keys(fields).forEach(function (k) { body.set(k, fields[k]); });
    note(doing);
    return api("POST", "/action", body.toString()).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        var reply = typeof j.reply === "string" ? j.reply : "";
        // A quick phone's outcome (on the stream) may come before the reply.
        if (r.ok && state.outcomeOf === sent) { return; }
        if (r.ok) { note(done); return; }
        var why = reply.indexOf(": ") >= 0 ? reply.slice(reply.indexOf(": ") + 2) : reply;
        note("Not done: " + (why || "the server refused it (" + r.status + ")") + ".", true);
      });
    }, function () { note("Not done: cannot reach the server.", true); });
  }
  function dial(number, who) {
    var them = who ? who + " (" + number + ")" : number;
    act("dial", { number: number }, "Calling " + them + "…",
        "Your phone is ringing: lift the handset to call " + them + ".");
  }
  function onDialSubmit(event) {
    event.preventDefault();
    var input = $("dial-number"), number = input.value.trim();
    if (!number) { input.focus(); return; }
    dial(number);
  }
  // What a person pastes (spaces, dashes, dots, parentheses dropped), else
  // no link: a caller ID is no URL of any other kind.
  function dialable(num) {
    var n = String(num || "").replace(/[\s\-.()]/g, "");
    return /^[0-9+*#]{1,32}$/.test(n) ? n : "";
  }
  function telLink(p) {
    var n = dialable(p.num);
    if (!n) { return null; }
    var link = el("a", "tel", can("dial") ? "Call back" : "Call");
    link.setAttribute("href", "tel:" + n);
    link.title = "Call " + n;
    // With dial allowed the page rings the user's own phone; without, the
    // link goes to the computer's tel: handler (ctinotify watch --dial).
    link.addEventListener("click", function (event) {
      if (can("dial")) { event.preventDefault(); dial(n); }
    });
    return link;
  }
  function callActions(c) {
    var hangup = can("hangup") && c.state !== "ended";
    var transfer = can("transfer") && c.state === "talking";
    if (!hangup && !transfer) { return null; }
    var box = el("div", "acts");
    if (hangup) {
      var end = el("button", "hangup", "Hang up");
      end.type = "button";
      end.addEventListener("click", function () {
        act("hangup", { call: c.id }, "Hanging up…", "Hung up.");
      });
      box.appendChild(end);
    }
    if (transfer) {
      var open = el("button", "transfer-open", "Transfer…");
      open.type = "button";
      open.addEventListener("click", function () { c.transferring = !c.transferring; renderCalls(); });
      box.appendChild(open);
      if (c.transferring) { box.appendChild(transferForm(c)); }
    }
    return box;
  }
  function transferForm(c) {
    var form = el("form", "transfer");
    var pick = colleagueChoice(c);
    if (pick) { form.appendChild(pick); }
    var input = el("input");
    input.type = "tel"; input.setAttribute("inputmode", "tel"); input.maxLength = 64;
    input.placeholder = "Transfer to"; input.setAttribute("aria-label", "Transfer to");
    input.value = c.transferTo || "";
    // The list is drawn again on every event: what is typed stays.
    input.addEventListener("input", function () { c.transferTo = input.value; c.transferWho = ""; });
    if (pick) {
      // Choosing a colleague fills the number in: Transfer sends it (a
      // keyboard moving through the list must not transfer on the way).
      pick.addEventListener("change", function () {
        var f = state.board.get(pick.value);
        input.value = c.transferTo = f ? firstNumber(f) : "";
        c.transferWho = f ? String(f.name || f.user) : "";
      });
    }
    var go = el("button", "primary", "Transfer");
    go.type = "submit";
    form.appendChild(input); form.appendChild(go);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var to = input.value.trim(), who = c.transferWho ? c.transferWho + " (" + to + ")" : to;
      if (!to) { input.focus(); return; }
      c.transferring = false; c.transferTo = ""; c.transferWho = "";
      act("transfer", { call: c.id, number: to }, "Transferring to " + who + "…",
          "Transferred to " + who + ".");
      renderCalls();
    });
    setTimeout(function () { if (document.activeElement === document.body) { input.focus(); } }, 0);
    return form;
  }

  // -- the office board: a card per colleague, live (issue 13) ---------------------
  // The server sends only what this user may see (their board, details
  // only with board_details): the page shows all it gets and filters nothing.
  var BOARD_WORDS = @BOARD_WORDS@;  // BOARD_STATE_WORDS
  // A sign per state beside its word and colour: never the colour alone.
  var BOARD_SIGNS = { free: "\u2713", ringing: "\u260e", talking: "\u25cf", on_hold: "\u275a\u275a",
                      busy: "\u2298", away: "\u25cb" };
  var DRAG_TYPE = "application/x-ctinotify-call";
  var WIDE = window.matchMedia ? window.matchMedia("(min-width: 960px)") : null;
  function boardBeside() { return !!(state.hasBoard && WIDE && WIDE.matches); }
  function setBoard(on) {
    state.hasBoard = on;
    if (!on) {
      state.board = new Map(); state.boardTold = null; state.boardGen += 1;
      state.cards = new Map(); $("board").replaceChildren();
    }
    $("no-board").hidden = state.board.size > 0;
    showView(state.view);
  }
  function boardHint(beside) {
    var hint = [];
    if (can("dial")) { hint.push("Click a colleague to call them."); }
    if (can("transfer")) {
      // The calls are beside the board on a wide screen only.
      hint.push(beside ? "Drag a call onto a colleague to transfer it there." :
                "To transfer a call to a colleague: Transfer\u2026 on the call.");
    }
    $("board-hint").textContent = hint.join(" ");
    $("board-hint").hidden = !hint.length;
  }
  function reloadAccount() {
    // A reload changed this user's board (or gave or took one): ask again.
    api("GET", "/session").then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
      if (!j || !state.user || j.user !== state.user) { return; }
      state.actions = Array.isArray(j.actions) ? j.actions : [];
      $("dial-form").hidden = !can("dial");
      setBoard(j.board === true);
      renderCalls();
      loadBoard();
    }).catch(function () {});
  }
  function loadBoard() {
    if (!state.hasBoard) { return; }
    var gen = ++state.boardGen;
    state.boardTold = new Set();
    api("GET", "/board").then(function (r) {
      if (r.status === 403 && gen === state.boardGen) { setBoard(false); }
      return r.ok ? r.json() : null;
    }).then(function (list) {
      if (!Array.isArray(list) || gen !== state.boardGen) { return; }
      // A state event that came while the server answered is newer than
      // its answer: it stays.
      var told = state.boardTold || new Set(), next = new Map();
      list.forEach(function (f) {
        if (!f || typeof f.user !== "string") { return; }
        next.set(f.user, told.has(f.user) && state.board.has(f.user) ? state.board.get(f.user) : f);
      });
      state.board = next; state.boardTold = null;
      renderBoard();
      if (Array.from(state.calls.values()).some(function (c) { return c.transferring; })) { renderCalls(); }
    }).catch(function () {});
  }
  function onState(f) {
    if (!state.hasBoard || typeof f.user !== "string") { return; }
    if (state.boardTold) { state.boardTold.add(f.user); }
    var known = state.board.has(f.user);
    state.board.set(f.user, f);
    drawCard(f.user);
    if (!known) { renderBoard(); }
  }
  function renderBoard() {
    var list = $("board");
    state.cards.forEach(function (card, user) {
      if (!state.board.has(user)) { card.remove(); state.cards.delete(user); }
    });
    var i = 0;
    state.board.forEach(function (f, user) {
      var card = drawCard(user);
      // Moved only when out of place: a card moved loses the keyboard focus.
      if (list.children[i] !== card) { list.insertBefore(card, list.children[i] || null); }
      i += 1;
    });
    $("no-board").hidden = state.board.size > 0;
    tick();
  }
  function firstNumber(f) { return dialable(String(f.numbers || "").split(",")[0]); }
  function colleague(user) {
    var f = state.board.get(user);
    return f && user !== state.user && firstNumber(f) ? f : null;
  }
  function drawCard(user) {
    var f = state.board.get(user), card = state.cards.get(user);
    if (!card) {
      card = el("li", "card");
      card.dataset.user = user;
      card.addEventListener("click", function () { cardDial(user); });
      card.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); cardDial(user); }
      });
      cardDropTarget(card, user);
      state.cards.set(user, card);
      $("board").appendChild(card);
    }
    var st = Object.prototype.hasOwnProperty.call(BOARD_SIGNS, f.state) ? f.state : "";
    var name = String(f.name || f.user), numbers = String(f.numbers || "").split(",").join(", ");
    var dials = can("dial") && !!colleague(user);
    card.className = "card" + (st ? " st-" + st : "") + (dials ? " dials" : "") +
      (can("transfer") && colleague(user) ? " takes" : "");
    card.dataset.state = String(f.state);
    if (dials) {
      card.tabIndex = 0;
      card.setAttribute("role", "button");
      card.title = "Call " + name + " (" + firstNumber(f) + ")";
    } else {
      card.removeAttribute("tabindex"); card.removeAttribute("role"); card.removeAttribute("title");
    }
    var head = el("div", "row");
    head.appendChild(el("bdi", "who", name));
    if (numbers) { head.appendChild(el("bdi", "num", numbers)); }
    if (user === state.user) { head.appendChild(el("span", "you", "(you)")); }
    card.replaceChildren(head);
    var line = el("div", "row");
    var badge = el("span", "st");
    var sign = el("span", "sign", BOARD_SIGNS[st] || "?");
    sign.setAttribute("aria-hidden", "true");
    badge.appendChild(sign);
    badge.appendChild(el("span", "word", BOARD_WORDS[st] || String(f.state)));
    line.appendChild(badge);
    var since = secs(f.since);
    if (since !== null) {
      var timer = el("span", "timer", "");
      timer.dataset.since = String(since);
      timer.textContent = clock(Date.now() - since);
      line.appendChild(timer);
    }
    card.appendChild(line);
    if (f["with"] && typeof f["with"] === "object") {
      var toward = { "in": "from ", out: "to " }[f.direction] || "with ";
      var other = el("div", "with", toward);
      other.appendChild(el("bdi", "", said(f["with"])));
      card.appendChild(other);
    }
    return card;
  }
  function cardDial(user) {
    var f = colleague(user);
    if (!f || !can("dial")) { return; }
    dial(firstNumber(f), String(f.name || f.user));
  }
  function colleagueChoice(c) {
    var users = Array.from(state.board.keys()).filter(colleague);
    if (!state.hasBoard || !users.length) { return null; }
    var pick = el("select");
    pick.setAttribute("aria-label", "Transfer to a colleague");
    pick.appendChild(new Option("A colleague\u2026", ""));
    users.forEach(function (user) {
      var f = state.board.get(user);
      pick.appendChild(new Option(String(f.name || f.user) + " (" + firstNumber(f) + "), " +
                                  (BOARD_WORDS[f.state] || String(f.state)), user));
    });
    var chosen = Array.from(pick.options).filter(function (o) {
      var f = state.board.get(o.value);
      return f && c.transferWho && firstNumber(f) === c.transferTo;
    })[0];
    if (chosen) { pick.value = chosen.value; }
    return pick;
  }
  function transferTo(c, f) {
    var n = firstNumber(f), who = String(f.name || f.user) + " (" + n + ")";
    c.transferring = false;
    act("transfer", { call: c.id, number: n }, "Transferring to " + who + "…",
        "Transferred to " + who + ".");
    renderCalls();
  }
  // -- drag a call onto a colleague's card: a blind transfer there ----------------
  function canDrag(c) { return can("transfer") && c.state === "talking" && state.hasBoard; }
  function dragSource(item, c) {
    item.draggable = true;
    item.classList.add("draggable");
    item.addEventListener("dragstart", function (event) {
      event.dataTransfer.setData(DRAG_TYPE, c.key);
      event.dataTransfer.effectAllowed = "move";
      state.dragging = c.key;
      document.body.classList.add("dragging");
    });
  }
  function dragEnded() {
    state.dragging = null;
    document.body.classList.remove("dragging");
    state.cards.forEach(function (card) { card.classList.remove("drop"); });
  }
  function carriesCall(event) {
    var types = event.dataTransfer ? Array.from(event.dataTransfer.types || []) : [];
    return state.dragging !== null || types.indexOf(DRAG_TYPE) >= 0;
  }
  function cardDropTarget(card, user) {
    function takes(event) { return can("transfer") && !!colleague(user) && carriesCall(event); }
    card.addEventListener("dragover", function (event) {
      if (!takes(event)) { return; }
      event.preventDefault();
      event.dataTransfer.dropEffect = "move";
      card.classList.add("drop");
    });
    card.addEventListener("dragleave", function () { card.classList.remove("drop"); });
    card.addEventListener("drop", function (event) {
      card.classList.remove("drop");
      if (!takes(event)) { return; }
      event.preventDefault();
      var key = event.dataTransfer.getData(DRAG_TYPE) || state.dragging;
      var c = state.calls.get(key), f = colleague(user);
      dragEnded();
      if (c && f && c.state === "talking") { transferTo(c, f); }
    });
  }

  // -- drawing -------------------------------------------------------------------
  var STATE_WORDS = { ringing: "Ringing", talking: "Talking", "on hold": "On hold", parked: "Parked",
    forwarded: "Forwarded", transferred: "Transferred", missed: "Missed", busy: "Busy",
    conference: "In conference", ended: "Ended" };
  function renderCalls() {
    var list = $("calls");
    list.replaceChildren();
    state.calls.forEach(function (c) {
      var item = el("li", "call " + { "on hold": "held", ringing: "ringing", talking: "talking", parked: "parked" }[c.state]);
      item.dataset.call = c.key;
      item.dataset.state = c.state;
      var top = el("div", "row");
      top.appendChild(el("span", "dir", c.dir === "in" ? "↘ Incoming" : "↗ Outgoing"));
      top.appendChild(el("span", "state", STATE_WORDS[c.state] || c.state));
      var timer = el("span", "timer", "");
      timer.dataset.since = String(c.state === "ringing" || !c.answeredAt ? c.since : c.answeredAt);
      top.appendChild(timer);
      item.appendChild(top);
      var p = party(c.dir === "in" ? c.from : c.to);
      var who = el("div", "row");
      who.appendChild(el("bdi", "who", p.main));
      if (p.num) { who.appendChild(el("bdi", "num", p.num)); }
      item.appendChild(who);
      var other = c.dir === "in" ? "to " + said(c.to) : "from " + said(c.from);
      item.appendChild(el("div", "words", c.words ? c.words + " · " + other : other));
      var acts = callActions(c);
      if (acts) { item.appendChild(acts); }
      if (canDrag(c)) { dragSource(item, c); }
      if (c.url) {
        var link = el("a", "pop", "Open the caller's page");
        link.setAttribute("href", c.url);
        link.setAttribute("target", "_blank");
        link.setAttribute("rel", "noopener noreferrer");
        item.appendChild(link);
      }
      list.appendChild(item);
    });
    $("no-calls").hidden = state.calls.size > 0;
    tick();
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".timer").forEach(function (t) { t.textContent = clock(now - Number(t.dataset.since)); });
  }
  function journalWords(r) {
    var path = Array.isArray(r.path) ? r.path : [], bits = [];
    path.forEach(function (step) {
      if (!step || typeof step !== "object") { return; }
      if (step.divert) { bits.push("forwarded to " + step.divert); }
      else if (step.transfer && step.by && r.reason !== "transferred") { bits.push("transferred by " + step.by); }
      else if (step.voicemail) { bits.push("to voicemail"); }
      else if (step.park) { bits.push("parked at " + step.park); }
    });
    var talk = Number(r.talk_time) > 0 ? ", talked " + talked(r.talk_time) : "";
    var words;
    if (r.direction === "in") {
      words = { completed: "answered" + talk, noanswer: "missed: not answered",
                cancelled: "missed: the caller hung up", busy: "missed: busy",
                answered_elsewhere: "answered by " + said(r.answered_by),
                failed: "failed", unknown: "ended while the PBX link was down" }[r.reason];
      if (r.reason === "transferred") {
        var moved = path.filter(function (s) { return s && s.transfer && s.to; }).pop();
        words = "transferred" + (moved ? " to " + moved.to : "") + talk;
      }
    } else {
      words = { completed: "called" + talk, noanswer: "no answer", busy: "busy",
                cancelled: "hung up before the answer", transferred: "transferred" + talk,
                failed: "failed", unknown: "ended while the PBX link was down" }[r.reason];
    }
    return [words || r.reason || "ended"].concat(bits).join(" · ");
  }
  function isMissed(r) { return r.direction === "in" && MISSED.indexOf(r.reason) >= 0; }
  function renderJournal() {
    var list = $("journal");
    list.replaceChildren();
    state.history.slice().reverse().forEach(function (r) {
      var item = el("li", "entry" + (isMissed(r) ? " missed" : ""));
      item.dataset.call = String(r.call);
      var when = secs(r.start);
      var head = el("div", "row");
      head.appendChild(el("span", "when", when ? new Date(when).toLocaleString() : ""));
      head.appendChild(el("span", "dir", r.direction === "in" ? "↘ in" : "↗ out"));
      item.appendChild(head);
      var p = party(r.direction === "in" ? r.from : r.to);
      var who = el("div", "row");
      who.appendChild(el("bdi", "who", p.main));
      if (p.num) { who.appendChild(el("bdi", "num", p.num)); }
      var back = telLink((r.direction === "in" ? r.from : r.to) || {});
      if (back) { who.appendChild(back); }
      item.appendChild(who);
      item.appendChild(el("div", "words", journalWords(r)));
      list.appendChild(item);
    });
    $("no-journal").hidden = state.history.length > 0;
  }
  function seenKey() { return "ctinotify.seen." + state.user; }
  function updateMissed() {
    if (!state.user) { return; }
    var seen = Number(load(seenKey(), "0")) || 0;
    var lookingAt = state.view === "journal" && document.visibilityState === "visible";
    var newest = seen, count = 0;
    state.history.forEach(function (r) {
      if (!isMissed(r)) { return; }
      var end = secs(r.end) || secs(r.start) || 0;
      if (end > seen) { count += 1; newest = Math.max(newest, end); }
    });
    if (lookingAt && count) { save(seenKey(), newest); count = 0; }
    var badge = $("missed-count");
    badge.textContent = String(count);
    badge.hidden = !count;
    document.title = (count ? "(" + count + ") " : "") + "ctinotify";
  }
  function showView(name) {
    var beside = boardBeside();
    if (name === "board" && (beside || !state.hasBoard)) { name = "now"; }
    state.view = name;
    $("now-view").hidden = name !== "now";
    $("journal-view").hidden = name !== "journal";
    $("board-view").hidden = !(state.hasBoard && (beside || name === "board"));
    $("tab-board").hidden = !state.hasBoard || beside;
    $("panes").classList.toggle("beside", beside);
    $("main").classList.toggle("wide", beside);
    boardHint(beside);
    $("tab-now").classList.toggle("active", name === "now");
    $("tab-journal").classList.toggle("active", name === "journal");
    $("tab-board").classList.toggle("active", name === "board");
    updateMissed();
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("logout").addEventListener("click", logout);
    $("tab-now").addEventListener("click", function () { showView("now"); });
    $("tab-journal").addEventListener("click", function () { showView("journal"); });
    $("tab-board").addEventListener("click", function () { showView("board"); });
    if (WIDE) {
      var relayout = function () { showView(state.view); };
      if (WIDE.addEventListener) { WIDE.addEventListener("change", relayout); }
      else if (WIDE.addListener) { WIDE.addListener(relayout); }
    }
    document.addEventListener("dragend", dragEnded);
    $("dial-form").addEventListener("submit", onDialSubmit);
    document.addEventListener("visibilitychange", updateMissed);
    var mode = $("pop-mode");
    mode.value = popMode();
    mode.addEventListener("change", function () { save("ctinotify.popmode", mode.value); });
    $("notify-enable").addEventListener("click", function () {
      Notification.requestPermission().then(showNotifyState, showNotifyState);
    });
    showNotifyState();
    setInterval(tick, 1000);
    checkSession("");
  });
})();
""".replace("@BOARD_WORDS@", json.dumps(BOARD_STATE_WORDS, sort_keys=True))

WEB_PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ctinotify</title>
<link rel="icon" href="data:,">
<style>@CSS@</style>
</head>
<body>
<div id="banner" class="banner" role="alert" hidden></div>
<header>
  <h1>ctinotify</h1>
  <span id="conn" class="pill">not connected</span>
  <span id="pbx" class="pill" hidden></span>
  <span id="who"></span>
  <button id="logout" type="button" hidden>Log out</button>
</header>
<main id="main">
  <section id="login" hidden>
    <form id="login-form" class="login" method="post" action="/login">
      <h2>Log in</h2>
      <label>User <input name="user" autocomplete="username" autocapitalize="none" required></label>
      <label>Secret <input name="secret" type="password" autocomplete="current-password" required></label>
      <button id="login-button" type="submit" class="primary">Log in</button>
      <p id="login-error" class="error" role="alert"></p>
    </form>
  </section>
  <section id="app" hidden>
    <nav class="tabs">
      <button id="tab-now" type="button" class="tab active">Calls now</button>
      <button id="tab-journal" type="button" class="tab">Journal<span id="missed-count" class="badge" hidden></span></button>
      <button id="tab-board" type="button" class="tab" hidden>Board</button>
    </nav>
    <p id="action-note" class="note" role="status" hidden></p>
    <div id="panes" class="panes">
    <div id="now-view">
      <form id="dial-form" class="dial" hidden>
        <input id="dial-number" type="tel" inputmode="tel" autocomplete="off" maxlength="64"
               placeholder="Number to call" aria-label="Number to call">
        <button id="dial-button" type="submit" class="primary">Call</button>
      </form>
      <ul id="calls" class="calls"></ul>
      <p id="no-calls" class="quiet">No calls right now.</p>
      <ul id="activity" class="activity"></ul>
    </div>
    <div id="journal-view" hidden>
      <ul id="journal" class="journal"></ul>
      <p id="no-journal" class="quiet">No calls yet.</p>
    </div>
    <section id="board-view" aria-labelledby="board-title" hidden>
      <h2 id="board-title" class="pane-title">Office board</h2>
      <p id="board-hint" class="quiet hint" hidden></p>
      <ul id="board" class="board"></ul>
      <p id="no-board" class="quiet">Nobody on the board.</p>
    </section>
    </div>
    <details class="settings">
      <summary>Settings</summary>
      <label>Open the caller's page:
        <select id="pop-mode">
          <option value="ring">when the call rings</option>
          <option value="answer">when I answer</option>
          <option value="never">never</option>
        </select>
      </label>
      <p><span id="notify-state"></span> <button id="notify-enable" type="button">Turn on</button></p>
    </details>
  </section>
</main>
<script>@JS@</script>
</body>
</html>
"""


def _csp_source(text: str) -> str:
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


#: Only the page's own script and style run (by their hashes); it talks
#: only to this server; Trusted Types make an innerHTML assignment throw.
WEB_PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
                "img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'; "
                "require-trusted-types-for 'script'; trusted-types 'none'"
                % (_csp_source(WEB_PAGE_JS), _csp_source(WEB_PAGE_CSS)))
WEB_PAGE_BYTES = WEB_PAGE_HTML.replace("@CSS@", WEB_PAGE_CSS).replace(
    "@JS@", WEB_PAGE_JS).encode("utf-8")
WEB_PAGE_ETAG = hashlib.sha256(WEB_PAGE_BYTES).hexdigest()[:20]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    config = load_config(path)
    sys.stdout.write(config.describe())
    if board_scopes(config.users):
        sys.stdout.write("\n" + "".join("; %s\n" % line for line in BOARD_AMI_NEEDS))
    for note in config.advisories() + certificate_warnings(config, time.time()):
        log.warning("%s", note)
    _warn_if_world_readable(path)
    if not args.live:
        return 0
    results = [_LiveCheck(config, pbx).run(args.listen) for pbx in config.pbxes]
    return 0 if all(results) else 1


class _LiveCheck:
    """``check --live``: log in to one PBX as the daemon would, ask for the
    channel list (write class reporting), listen a while, and say what the
    manager user evidently may and may not (ManagerClassProbe).  A plain
    blocking socket: nothing else shares this process."""

    def __init__(self, config: Config, cfg: AmiConfig):
        self.config = config
        self.cfg = cfg
        self.tag = "ami" if cfg.name == DEFAULT_PBX else "ami:" + cfg.name
        self.session = ami_session(cfg, time.monotonic())
        self.probe = ManagerClassProbe()
        self.problems: List[str] = []
        self.classes: "collections.Counter[str]" = collections.Counter()
        self.listing: Optional[str] = None
        #: Until then: the login, the channel list, then the listening.
        self.deadline = time.monotonic() + cfg.login_timeout + cfg.connect_timeout
        self.listening = False

    def run(self, listen_s: float) -> bool:
        """True if the manager user can do all ctinotify needs, as far as
        ``listen_s`` seconds of events tell."""
        cfg = self.cfg
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
            if cfg.tls:
                sock = self.config.ami_tls_contexts[cfg.name].wrap_socket(
                    sock, server_hostname=cfg.host)
        except OSError as e:
            log.error("%s: cannot connect to %s port %d: %s", self.tag, cfg.host, cfg.port,
                      _error_text(e))
            return False
        with sock:
            sock.settimeout(0.2)
            try:
                if not self._talk(sock, listen_s):
                    return False
            except (OSError, AmiProtocolError) as e:
                log.error("%s: %s", self.tag, _error_text(e) if isinstance(e, OSError) else e)
                return False
        return self._report(listen_s)

    def _talk(self, sock: socket.socket, listen_s: float) -> bool:
        while time.monotonic() < self.deadline and not (
                self.listening and (self.probe.done or self.probe.said)):
            outgoing = self.session.data_to_send()
            if outgoing:
                sock.sendall(outgoing)
            try:
                data = sock.recv(AMI_RECV_BYTES)
            except socket.timeout:
                data = None
            if data == b"":
                log.error("%s: Asterisk closed the connection", self.tag)
                return False
            now = time.monotonic()
            for item in self.session.receive_data(data, now) if data else []:
                if not self._item(item, now, listen_s):
                    return False
            reason = self.session.poll(now)
            if reason:
                log.error("%s: %s", self.tag, reason)
                return False
        if not self.session.logged_in:
            log.error("%s: no login within %g s", self.tag, self.cfg.login_timeout)
        return self.session.logged_in

    def _item(self, item: object, now: float, listen_s: float) -> bool:
        if isinstance(item, AmiLoginFailed):
            log.error("%s: login as %s refused by Asterisk: %s; check username and secret, "
                      "and that manager.conf's permit lets this machine in", self.tag,
                      self.cfg.username, item.reason)
            return False
        if isinstance(item, AmiLoggedIn):
            log.info("%s: logged in as %s (%s)", self.tag, self.cfg.username, item.banner)
            self.listing = self.session.send_action("CoreShowChannels")
            self.deadline = now + self.cfg.resync_timeout
        elif isinstance(item, AmiMessage) and self.listing is not None and \
                item.get("ActionID") == self.listing:
            if item.get("Response") not in (None, "Success"):
                self.problems += self.probe.refused(item.get("Message", ""))
            elif item.get("Event") != "CoreShowChannelsComplete":
                return True
            else:
                log.info("%s: CoreShowChannels: %s channels in progress", self.tag,
                         item.get("ListItems", "?"))
            self.listing, self.listening, self.deadline = None, True, now + listen_s
        elif isinstance(item, AmiMessage) and "Event" in item:
            privilege = item.get("Privilege", "").partition(",")[0].lower()
            self.classes[privilege or "?"] += 1
            self.problems += self.probe.observe(item.get("Event"), item)
        return True

    def _report(self, listen_s: float) -> bool:
        for problem in self.problems:
            log.warning("%s: %s", self.tag, problem)
        heard = ", ".join("%s %d" % pair for pair in sorted(self.classes.items()))
        if self.probe.done:
            log.info("%s: events of classes call and dialplan arrive (%s)", self.tag, heard)
        elif self.classes["call"] or self.classes["dialplan"]:
            log.info("%s: in %g s: %s; no verdict yet on the classes: listen during a few "
                     "calls (--listen 120)", self.tag, listen_s, heard)
        else:
            log.info("%s: no call event in %g s (%s): make a call while check --live "
                     "listens (--listen 120) to see the read classes at work", self.tag,
                     listen_s, heard or "nothing at all")
        return not self.problems


def _cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP (an init script's reload) right after the start must not
    # kill the process, as its default action would: noted now, handled
    # once the loop runs.  SIGTERM and SIGINT keep their default action
    # until start() is done, so they stop a long start (a big call
    # history to load) at once.
    early_signals: List[int] = []
    signal.signal(signal.SIGHUP, lambda number, frame: early_signals.append(number))
    config = load_config(find_config(args.config))
    logging.getLogger("ctinotify").setLevel(config.loglevel.upper())
    _warn_if_world_readable(config.path)
    for note in config.advisories() + certificate_warnings(config, time.time()):
        log.warning("%s", note)
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    if pidfile is not None:
        try:
            owner = _pidfile_process(pidfile)
        except OSError as e:
            log.error("cannot read the pidfile %s: %s", pidfile, e.strerror or e)
            return 1
        if owner is not None:
            log.error("%s names process %d, which is running: is ctinotify running already?",
                      pidfile, owner)
            return 1
    ready_fd = None
    if args.daemon:
        # The daemon runs in /, so every path it opens later must be absolute.
        if config.calllog and not os.path.isabs(config.calllog):
            log.error("%s: [general] calllog: %r is a relative path, expected an absolute "
                      "path with --daemon (the daemon runs in /)", config.path, config.calllog)
            return 1
        config = config.replace(path=os.path.abspath(config.path))
        status, ready_fd = _detach()
        if ready_fd is None:
            return status
    startup_handlers = _log_to(config, args.daemon)
    daemon = Daemon(config)
    try:
        daemon.start()
    except (OSError, ValueError) as e:
        log.error("cannot start: %s", _error_text(e))
        return 1
    daemon.install_signal_handlers()
    daemon.take_signals(early_signals)
    if pidfile is not None:
        try:
            _write_pidfile(pidfile)
        except OSError as e:
            log.error("cannot write the pidfile %s: %s", pidfile, e.strerror or e)
            return 1
    for handler in startup_handlers:
        logging.getLogger().removeHandler(handler)
    if ready_fd is not None:
        _report_ready(ready_fd)
        log.info("running as a daemon, pid %d", os.getpid())
    status = daemon.serve_forever()
    # Only a clean exit removes it: after a crash, "dead with a pidfile" is the truth.
    if pidfile is not None:
        _remove_pidfile(pidfile)
    return status


def _detach() -> Tuple[int, Optional[int]]:
    """Become a daemon: fork, setsid, fork again, chdir /, umask 027.

    Returns ``(0, fd)`` in the daemon, which writes ``ok`` to fd once it
    serves (`_report_ready`).  The original process waits for that and
    returns ``(status, None)``: 0 once the daemon serves, 1 if it exited
    first (it has said why on the stderr the two still share).
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        os.waitpid(pid, 0)  # the first child exits as soon as it has forked
        with os.fdopen(read_fd, "rb") as ready:
            answer = ready.read()  # until every write end is closed
        if answer == b"ok":
            return 0, None
        sys.stderr.write("ctinotify: the daemon exited during startup\n")
        return 1, None
    os.close(read_fd)
    os.setsid()  # a new session without a controlling terminal
    if os.fork() > 0:
        os._exit(0)  # not a session leader, so it never gets a terminal again
    os.chdir("/")
    os.umask(0o027)
    return 0, write_fd


def _report_ready(ready_fd: int) -> None:
    """Stdin, stdout and stderr to /dev/null, then tell the waiting parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    os.write(ready_fd, b"ok")
    os.close(ready_fd)


def _log_to(config: Config, daemonized: bool) -> List[logging.Handler]:
    """Send the log where ``[general] log`` says.

    Returns the stderr handlers that stay, for WARNING and worse only,
    until startup is over (so a startup error is seen on the terminal
    even with syslog); the caller removes them then.
    """
    target = config.log
    if target == "auto":
        target = "syslog" if daemonized else "stderr"
    gone = " (with --daemon: nowhere once detached)" if daemonized else ""
    if target == "stderr":
        if daemonized:
            log.warning("log = stderr: the log goes nowhere once detached; "
                        "use log = syslog or auto")
        return []
    problem = _syslog_problem(config.syslog_socket)
    if problem:
        log.warning("log = syslog: no syslog at %s (%s); logging to stderr%s",
                    config.syslog_socket, problem, gone)
        return []
    handler = logging.handlers.SysLogHandler(
        address=config.syslog_socket,
        facility=logging.handlers.SysLogHandler.facility_names[config.syslog_facility])
    handler.ident = "ctinotify[%d]: " % os.getpid()  # after the forks: the daemon's pid
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    startup = list(root.handlers)
    for stderr_handler in startup:
        stderr_handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    return startup


def _syslog_problem(path: str) -> Optional[str]:
    """Why nothing takes syslog messages at path, or None if something does.

    SysLogHandler silently drops every message when the socket is missing
    at start, so ask the socket first, datagram then stream, as it does.
    """
    problem = "nothing listens there"
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
            return None
        except OSError as e:
            problem = e.strerror or str(e)
        finally:
            probe.close()
    return problem


def _pidfile_process(path: str) -> Optional[int]:
    """The running process a pidfile names; None for no file, no number, or a dead pid."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64)
    except FileNotFoundError:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, and another user's
    return pid


def _write_pidfile(path: str) -> None:
    """Atomically: a reader sees no file or the whole number."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(temporary, "w", encoding="ascii") as f:
            f.write("%d\n" % os.getpid())
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _remove_pidfile(path: str) -> None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            mine = f.read(64).strip() == str(os.getpid())
        if mine:
            os.unlink(path)
    except OSError as e:
        log.warning("cannot remove the pidfile %s: %s", path, e.strerror or e)


def _chosen_pbx(config: Config, name: Optional[str]) -> AmiConfig:
    for pbx in config.pbxes:
        if pbx.name == (name or DEFAULT_PBX):
            return pbx
    raise ConfigError(["%s: no PBX %r, expected one of: %s"
                       % (config.path, name, ", ".join(p.name for p in config.pbxes))])


def _cmd_replay(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config), require_ami=False)
    pbx = _chosen_pbx(config, args.pbx)
    tag = pbx.name if len(config.pbxes) > 1 else ""
    out = sys.stdout
    try:
        stream = open(args.trace, "rb")
    except OSError as e:
        log.error("cannot read %s: %s", args.trace, _error_text(e))
        return 1
    if args.user and args.user not in config.users:
        log.error("%s: no user %r, expected one of: %s", config.path, args.user,
                  ", ".join(config.users) or "(none)")
        return 1
    with stream:
        for user, fields in replay_trace(stream, config.users, pbx=pbx.name, tag=tag):
            if args.user and user != args.user:
                continue
            out.write(_replayed_line(user, fields, args.format, bool(args.user)) + "\n")
    out.flush()
    return 0


def _replayed_line(user: str, fields: Dict[str, object], fmt: str, alone: bool) -> str:
    """A replayed event: as the user's ``nc`` shows it (text: ``EVENT ...``;
    json: as after ``FORMAT json``), after ``user: `` or in a ``client``
    key unless only one user's lines are printed."""
    if fmt == "text":
        line = encode_notification(fields, "text").decode("utf-8").rstrip("\r\n")
        return line if alone else "%s: %s" % (user, line)
    return encode_json_line(fields if alone else dict({"client": user}, **fields))


def _cmd_record(args: argparse.Namespace) -> int:
    """Capture what Asterisk sends, as a trace for replay or a bug report.

    A plain blocking socket is enough here: nothing else shares this process.
    Ctrl-C or SIGTERM ends the recording cleanly (with a Logoff).
    """
    config = load_config(find_config(args.config))
    cfg = _chosen_pbx(config, args.pbx)
    # Ctrl-C and SIGTERM only set a flag the loop checks (recv times out
    # every second): an exception could land anywhere, even after the try.
    # Handlers also take SIGINT back from a shell that ignores it.
    stopping: List[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: stopping.append(number))
    session = ami_session(cfg, time.monotonic())
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
        if cfg.tls:
            sock = config.ami_tls_contexts[cfg.name].wrap_socket(sock, server_hostname=cfg.host)
    except OSError as e:
        log.error("cannot connect to %s port %d: %s", cfg.host, cfg.port, _error_text(e))
        return 1
    sock.settimeout(1.0)
    log.info("recording %s port %d to %s; Ctrl-C stops", cfg.host, cfg.port, args.output)
    with open(args.output, "wb") as out, open(args.output + ".sent", "wb") as sent_log:
        recording = _Recording(cfg, sock, session, out, sent_log)
        try:
            status = recording.run(stopping)
        except AmiProtocolError as e:
            log.error("%s", e)
            return 1
        except OSError as e:  # reset, TLS failure: what was received is kept
            log.error("connection to %s port %d lost: %s", cfg.host, cfg.port, _error_text(e))
            status = 1
        finally:
            sock.close()
    if status is None:
        return 1  # the login was refused
    log.info("recorded %d bytes to %s", recording.received, args.output)
    return status


class _Recording:
    """``record``'s connection: what Asterisk sends goes to ``out`` as it
    comes, what we send (secrets masked) to ``sent_log``."""

    def __init__(self, cfg: AmiConfig, sock: socket.socket, session: AmiSession,
                 out, sent_log):  # type: ignore[no-untyped-def]
        self.cfg = cfg
        self.sock = sock
        self.session = session
        self.out = out
        self.sent_log = sent_log
        self.received = 0

    def run(self, stopping: List[int]) -> Optional[int]:
        """Until a signal (0, after a Logoff) or a failure (1; None: the
        login was refused)."""
        session = self.session
        while not stopping:
            outgoing = session.data_to_send()
            if outgoing:
                self.sock.sendall(outgoing)
                self.sent_log.write(session.redacted(outgoing))
            try:
                data = self.sock.recv(AMI_RECV_BYTES)
            except socket.timeout:
                data = None
            if data == b"":
                log.error("Asterisk closed the connection")
                return 1
            if data and not self._received(data):
                return None
            reason = session.poll(time.monotonic())
            if reason:
                log.error("%s", reason)
                return 1
        logoff = encode_action("Logoff")
        try:
            self.sock.sendall(logoff)
            self.sent_log.write(logoff)
        except OSError:
            pass
        return 0

    def _received(self, data: bytes) -> bool:
        """Keep the bytes; False if they say the login was refused."""
        self.out.write(data)
        self.out.flush()
        self.received += len(data)
        for item in self.session.receive_data(data, time.monotonic()):
            if isinstance(item, AmiLoginFailed):
                log.error("login as %s refused: %s", self.cfg.username, item.reason)
                return False
            if isinstance(item, AmiLoggedIn):
                log.info("logged in (%s)", item.banner)
        return True


def _server_address(text: str) -> Tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[v6]:PORT`` or a bare IPv6 address (argparse type)."""
    host, port = text.strip(), str(DEFAULT_CLIENT_PORT)
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError("%r: expected [ADDRESS]:PORT" % text)
            port = rest[1:]
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("%r: expected HOST or HOST:PORT, PORT 1 to 65535"
                                         % text)
    return host, int(port)


def _user_name(text: str) -> str:
    if not _USER_NAME.match(text):
        raise argparse.ArgumentTypeError("%r: expected 1-64 of A-Z a-z 0-9 _ . @ + -" % text)
    return text


def _exec_hook(text: str) -> ExecHook:
    try:
        return ExecHook.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _read_secret(args: argparse.Namespace, host: str) -> Optional[str]:
    """The secret from --secret-file (its first line) or a prompt; never
    from the command line, where every user of the machine could read it."""
    if args.secret_file:
        try:
            # ~ too: a desktop file or a registry entry runs no shell to expand it.
            with open(os.path.expanduser(args.secret_file), encoding="utf-8") as f:
                secret = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            log.error("cannot read the secret file %s: %s", args.secret_file,
                      getattr(e, "strerror", None) or e)
            return None
        if os.name == "posix":
            _warn_if_world_readable(args.secret_file)
    else:
        secret = getpass.getpass("secret for %s on %s: " % (args.user, host)).strip()
    if not secret:
        log.error("the secret is empty")
        return None
    return secret


def _cmd_watch(args: argparse.Namespace) -> int:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(LogFormatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    # A caller ID the console cannot encode (Windows) is shown as '?'.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    host, port = args.server
    number = ""
    if args.dial is not None:
        try:
            number = dial_target(args.dial)
        except ValueError as e:
            log.error("--dial %.80r: %s", args.dial, e)
            return 2
        if args.hooks or args.open or args.open_on or args.board or args.missed:
            # One DIAL and out: a tel: URL made to carry "--exec" gets nowhere.
            log.error("--dial takes no --exec, --open, --open-on, --board or --missed")
            return 2
    try:
        secret = _read_secret(args, host)
    except KeyboardInterrupt:
        return 0
    if secret is None:
        return 1
    tls_context = None
    if args.tls or args.tls_ca:
        try:
            tls_context = client_tls_context(args.tls_ca or "")
        except (OSError, ValueError) as e:
            log.error("cannot use TLS with %s: %s", args.tls_ca or "the system's CAs",
                      _ssl_reason(e))
            return 1
    state = None if number else WatchState(args.state, "%s@%s:%d" % (args.user, host, port))
    open_on = args.open_on or ("ring" if args.open else "")
    client = WatchClient(host, port, args.user, secret, args.format, args.hooks,
                         open_on, state, tls_context=tls_context, tls_ca=args.tls_ca or "",
                         board=args.board, dial=number)
    if args.missed:
        midnight = datetime.datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        return client.list_missed(midnight.timestamp())
    if state is not None:
        state.load()
    return client.run()


#: Control characters in a log message are escaped: whatever a peer put in
#: a value (a caller ID, a user name), one log record stays one line.
_LOG_ESCAPES = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7f, 0xa0))}
_LOG_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


class LogFormatter(logging.Formatter):
    """Formats like logging.Formatter, with control characters escaped in
    the message (a traceback after it keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_LOG_ESCAPES)


def _warn_if_world_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o004:
        log.warning("%s is readable by every user on this machine and holds secrets; "
                    "chmod 640 it", path)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = _argument_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(
        "%(asctime)s ctinotify[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    command = {"check": _cmd_check, "run": _cmd_run, "replay": _cmd_replay,
               "record": _cmd_record, "watch": _cmd_watch}[args.command]
    try:
        return command(args)
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write(problem + "\n")
        return 1


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctinotify", description="Call notifications from Asterisk AMI for desktop clients.")
    parser.add_argument("--version", action="version", version="ctinotify " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config_help = "configuration file (default: %s, else ./%s)" % DEFAULT_CONFIG_PATHS
    cmd = commands.add_parser("check", help="validate the configuration and print it")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd.add_argument("--live", action="store_true",
                     help="also log in to each PBX's AMI, ask for the channel list and listen "
                          "to its events: say what the manager user lacks (exit status 1)")
    cmd.add_argument("--listen", type=float, default=10.0, metavar="SECONDS",
                     help="with --live: how long to listen to events at most (default "
                          "%(default)g; it ends as soon as the classes are known)")
    cmd = commands.add_parser("run", help="run the daemon (in the foreground unless --daemon)")
    cmd.add_argument("-c", "--config", help=config_help)
    mode = cmd.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true",
                      help="stay in the foreground (the default; for systemd)")
    mode.add_argument("--daemon", action="store_true",
                      help="detach once serving: double fork, setsid, chdir /, umask 027, "
                           "stdio to /dev/null; the exit status says whether it started")
    cmd.add_argument("--pidfile", metavar="FILE",
                     help="write the daemon's pid to FILE once it serves and remove it at a "
                          "clean exit; refuse to start if FILE names a running process")
    pbx_help = "the PBX: default ([ami]) or NAME of an [ami:NAME] section"
    cmd = commands.add_parser("replay", help="print what clients would receive for a trace")
    cmd.add_argument("trace", help="a recorded AMI byte stream (.ami)")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd.add_argument("--pbx", help="the PBX the trace was recorded on; " + pbx_help)
    cmd.add_argument("--format", choices=("json", "text"), default="json",
                     help="json: one object per event with the user as \"client\" (the "
                          "default); text: each event as the user's nc shows it, after "
                          "\"USER: \"")
    cmd.add_argument("--user", metavar="NAME",
                     help="only NAME's events, exactly as NAME's client shows them")
    cmd = commands.add_parser("record", help="record AMI traffic to a file")
    cmd.add_argument("output", help="file to write the received bytes to")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd.add_argument("--pbx", help="the PBX to record; " + pbx_help)
    _watch_arguments(commands)
    return parser


def _watch_arguments(commands) -> None:  # type: ignore[no-untyped-def]
    # allow_abbrev=False: "--secret X" must not pass as --secret-file X.
    cmd = commands.add_parser(
        "watch", allow_abbrev=False,
        help="the desktop client: show your calls, run commands, open pages",
        description="Connect to a ctinotify server, log in and print each of your calls' "
                    "events as one line; reconnect when the server goes away.  The secret "
                    "is read from --secret-file or asked for, never taken as an argument.")
    cmd.add_argument("server", metavar="HOST[:PORT]", type=_server_address,
                     help="the ctinotify server (port %d if not given)" % DEFAULT_CLIENT_PORT)
    cmd.add_argument("-u", "--user", required=True, type=_user_name,
                     help="your user name ([section] of the server)")
    cmd.add_argument("--secret-file", metavar="FILE",
                     help="read the secret from the first line of FILE (chmod 600 it); "
                          "without it, the secret is asked for")
    cmd.add_argument("--exec", dest="hooks", action="append", default=[], type=_exec_hook,
                     metavar="KIND=COMMAND",
                     help="run COMMAND for each event of KIND (an event kind or all), split "
                          "into arguments like a shell would, {from_num}, {from_name} ... "
                          "filled in each argument, never through a shell; repeatable")
    cmd.add_argument("--open", action="store_true",
                     help="open the url of incoming calls (the server's popup_url) in the "
                          "web browser; http and https only")
    cmd.add_argument("--open-on", choices=("ring", "answer"),
                     help="when --open opens the page (implies --open): as the call rings "
                          "(the default), or once you answer it on one of your phones")
    cmd.add_argument("--missed", action="store_true",
                     help="print today's missed calls (as the server's HISTORY has them) "
                          "and exit")
    cmd.add_argument("--tls", action="store_true",
                     help="connect to the server's TLS port (its tls_port), verifying its "
                          "certificate against the system's CAs")
    cmd.add_argument("--tls-ca", metavar="FILE",
                     help="verify the server against FILE instead: its CA, or its own "
                          "certificate if self-signed (implies --tls)")
    cmd.add_argument("--format", choices=("readable", "text", "json"), default="readable",
                     help="readable lines (the default), or the server's text or JSON lines")
    cmd.add_argument("--board", action="store_true",
                     help="show the office board instead of your calls: every colleague your "
                          "board setting allows, free, ringing, on the phone, on hold, busy or "
                          "away, and for how long; a table redrawn in place on a terminal, a "
                          "line per change otherwise")
    cmd.add_argument("--state", metavar="FILE", default=DEFAULT_WATCH_STATE,
                     help="where to remember when you were last connected, for the missed "
                          "calls (default: %(default)s)")
    cmd.add_argument("--dial", metavar="NUMBER",
                     help="ring your phone, then call NUMBER (or a tel: or callto: URL: "
                          "watch as the desktop's tel: handler) and exit: 0 once you answered, "
                          "1 if not")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into head(1) and the like: not an error.
        return 0


if __name__ == "__main__":
    sys.exit(main())
