#!/usr/bin/env python3
"""ctinotify: caller-ID popups and call events from Asterisk, for the desktop.

ctinotify runs on the Asterisk box, keeps one connection to the Asterisk
Manager Interface (AMI), follows every channel, dial and bridge, and tells
each logged-in desktop client about *its own* calls: incoming (with caller
ID), outgoing, answered, missed, busy, hung up.

Data flow::

    Asterisk --AMI bytes--> AmiParser --AmiMessage--> AmiSession
                                                          |
                                          events          v
    desktop <--text/JSON lines-- ClientSession <-- CallEngine
                                 (per user,      (channels -> calls ->
                                  per kind)       per-user notifications)

Everything above the "Event loop" section is sans-I/O: bytes or messages
in, messages or notifications out.  The same engine is fed from a live
socket (``run``), from a recorded trace (``replay``) and by the tests.

Run it::

    python3 ctinotify.py check  -c ctinotify.conf     # validate the config
    python3 ctinotify.py run    -c ctinotify.conf     # the daemon
    python3 ctinotify.py replay TRACE.ami -c FILE     # what clients would see
    python3 ctinotify.py record OUT.ami -c FILE       # capture AMI traffic

Test it: ``make test`` (pytest).  Standard library only, Python 3.8+.
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

log = logging.getLogger("ctinotify")

# ---------------------------------------------------------------------------
# Limits and defaults (every limit has its unit in its name)
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_PATHS = ("/etc/asterisk/ctinotify.conf", "ctinotify.conf")
DEFAULT_CLIENT_PORT = 5039
DEFAULT_AMI_PORT = 5038

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

#: A client command is one short line.
MAX_CLIENT_LINE_BYTES = 1024
CLIENT_AUTH_TIMEOUT_S = 30.0
CLIENT_RECV_BYTES = 4096
#: Unsent output a client may have queued before it is disconnected.
CLIENT_OUTPUT_HARD_LIMIT_BYTES = 4 * 1024 * 1024
#: A listen() backlog for bursts of desktop reconnects.
LISTEN_BACKLOG = 128

#: Every kind of event a client can subscribe to with ``events=``.
EVENT_KINDS = (
    "incoming", "outgoing", "pickup", "hangup", "timeout", "busy",
    "divert", "transfer", "queue", "park", "unpark", "conference",
    "hold", "unhold",
)

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
    """A desktop client broke the line protocol; ``code`` is stable."""

    def __init__(self, code: str, text: str):
        super().__init__("%s %s" % (code, text))
        self.code = code
        self.text = text


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

    __slots__ = ("name", "lineno", "options", "is_template")

    def __init__(self, name: str, lineno: int, is_template: bool = False):
        self.name = name
        self.lineno = lineno
        self.options: List[IniOption] = []
        self.is_template = is_template

    def get(self, key: str) -> Optional[IniOption]:
        """The last ``key`` line of the section (later lines override)."""
        found = None
        for option in self.options:
            if option.key == key:
                found = option
        return found


_SECTION_LINE = re.compile(r"^\[([^\]]+)\]\s*(?:\(([^)]*)\))?\s*$")


def parse_ini(text: str, filename: str) -> Tuple[List[IniSection], List[str]]:
    """Parse Asterisk-style INI text into sections and a list of problems.

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
            problems.append("%s:%d: %s%s: not a 'key = value' line, expected key = value"
                            % (filename, lineno, where, line[:40]))
            continue
        value = value[1:] if value.startswith(">") else value
        key = key.strip().lower()
        if current is None:
            problems.append("%s:%d: %s: option outside any section, expected a [section] above"
                            % (filename, lineno, key))
            continue
        current.options.append(IniOption(key, value.strip(), lineno))
    return [s for s in sections if not s.is_template], problems


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

    __slots__ = ("name", "secret", "hosts", "devices", "extensions", "events", "lineno")

    def __init__(self, name: str, secret: str, hosts: Optional[Tuple[object, ...]],
                 devices: Tuple[str, ...], extensions: Tuple[Tuple[str, str], ...],
                 events: Tuple[str, ...], lineno: int = 0):
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


class AmiConfig:
    """The ``[ami]`` section: how to reach and log in to Asterisk."""

    __slots__ = ("host", "port", "username", "secret", "auth", "ping_interval", "reconnect_max")

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_AMI_PORT,
                 username: str = "", secret: str = "", auth: str = "plain",
                 ping_interval: float = AMI_PING_INTERVAL_S,
                 reconnect_max: float = AMI_RECONNECT_MAX_S):
        self.host = host
        self.port = port
        self.username = username
        self.secret = secret
        self.auth = auth
        self.ping_interval = ping_interval
        self.reconnect_max = reconnect_max

    def key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)


class Config:
    """The whole validated configuration."""

    def __init__(self, path: str, bind: str, port: int, loglevel: str, calllog: str,
                 ami: AmiConfig, users: Dict[str, UserConfig],
                 login_timeout: float = CLIENT_AUTH_TIMEOUT_S):
        self.path = path
        #: Seconds a client may stay connected without logging in.
        self.login_timeout = login_timeout
        self.bind = bind
        self.port = port
        self.loglevel = loglevel
        self.calllog = calllog
        self.ami = ami
        self.users = users

    def describe(self) -> str:
        """The effective configuration as INI, secrets masked."""
        lines = ["; effective configuration of %s" % self.path,
                 "[general]", "bind = %s" % self.bind, "port = %d" % self.port,
                 "loglevel = %s" % self.loglevel, "calllog = %s" % self.calllog,
                 "login_timeout = %g" % self.login_timeout, "",
                 "[ami]"]
        ami = self.ami
        lines += ["host = %s" % ami.host, "port = %d" % ami.port,
                  "username = %s" % ami.username, "secret = %s" % mask(ami.secret),
                  "auth = %s" % ami.auth, "ping_interval = %g" % ami.ping_interval,
                  "reconnect_max = %g" % ami.reconnect_max]
        for user in self.users.values():
            hosts = "dynamic" if user.hosts is None else ",".join(str(h) for h in user.hosts)
            exts = ",".join(n + ("@" + c if c else "") for n, c in user.extensions)
            lines += ["", "[%s]" % user.name, "secret = %s" % mask(user.secret),
                      "host = %s" % hosts, "devices = %s" % ",".join(user.devices),
                      "extensions = %s" % exts, "events = %s" % ",".join(user.events)]
        return "\n".join(lines) + "\n"


def mask(secret: str) -> str:
    return "********" if secret else "(empty)"


_USER_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
_EXTENSION = re.compile(r"^[0-9A-Za-z*#+_.-]{1,40}(@[A-Za-z0-9_.-]{1,80})?$")
_LOGLEVELS = ("debug", "info", "warning", "error")

GENERAL_KEYS = ("bind", "port", "loglevel", "calllog", "login_timeout")
AMI_KEYS = ("host", "port", "username", "secret", "auth", "ping_interval", "reconnect_max")
USER_KEYS = ("secret", "host", "devices", "extensions", "events")


class _ConfigReader:
    """Validates parsed INI sections, collecting every problem with its place."""

    def __init__(self, filename: str):
        self.filename = filename
        self.problems: List[str] = []

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

    def items(self, section: IniSection, key: str) -> Tuple[Optional[IniOption], List[str]]:
        option = section.get(key)
        if option is None:
            return None, []
        return option, [item.strip() for item in option.value.split(",") if item.strip()]

    def read_user(self, section: IniSection) -> UserConfig:
        self.check_keys(section, USER_KEYS)
        if not _USER_NAME.match(section.name):
            self.problem(section, None, "invalid user name, expected 1-64 of A-Z a-z 0-9 _ . @ + -")
        secret = self.text(section, "secret", "", required=True)
        option, hosts_text = self.items(section, "host")
        hosts: Optional[Tuple[object, ...]] = None
        if option is not None and [h.lower() for h in hosts_text] != ["dynamic"]:
            nets = []
            for item in hosts_text:
                try:
                    nets.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    self.problem(section, option, "%r is not an address or CIDR, expected "
                                 "'dynamic' or a comma list like 192.168.1.0/24, ::1" % item)
            hosts = tuple(nets)
            if not hosts_text:
                self.problem(section, option, "empty, expected 'dynamic' or addresses")
        option, device_texts = self.items(section, "devices")
        devices = []
        for item in device_texts:
            try:
                devices.append(normalize_device(item))
            except ValueError:
                self.problem(section, option, "%r is not a device, expected TECH/name such as "
                             "PJSIP/100, SIP/100, IAX2/100 or DAHDI/1" % item)
        option, ext_texts = self.items(section, "extensions")
        extensions = []
        for item in ext_texts:
            if not _EXTENSION.match(item):
                self.problem(section, option, "%r is not an extension, expected a number such "
                             "as 100, optionally 100@context" % item)
                continue
            number, _, context = item.partition("@")
            extensions.append((number, context))
        option, kinds = self.items(section, "events")
        if option is None or [k.lower() for k in kinds] == ["all"]:
            events = EVENT_KINDS
        else:
            events_list = []
            for kind in kinds:
                if kind.lower() not in EVENT_KINDS:
                    self.problem(section, option, "unknown event kind %r, expected 'all' or "
                                 "any of: %s" % (kind, ", ".join(EVENT_KINDS)))
                elif kind.lower() not in events_list:
                    events_list.append(kind.lower())
            events = tuple(events_list)
        if not devices and not extensions:
            self.problem(section, None, "the user has neither devices nor extensions, "
                         "expected devices = PJSIP/100 or extensions = 100")
        return UserConfig(section.name, secret, hosts, tuple(devices), tuple(extensions),
                          events, section.lineno)


def parse_config(text: str, filename: str, require_ami: bool = True) -> Config:
    """Validate INI text; raise ConfigError listing every problem found."""
    sections, problems = parse_ini(text, filename)
    reader = _ConfigReader(filename)
    reader.problems.extend(problems)
    by_name = {s.name.lower(): s for s in sections}
    general = by_name.get("general") or IniSection("general", 0)
    reader.check_keys(general, GENERAL_KEYS)
    bind = reader.text(general, "bind", "0.0.0.0")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        reader.problem(general, general.get("bind"),
                       "%r is not an IP address, expected e.g. 0.0.0.0, 127.0.0.1 or ::" % bind)
    # Port 0 asks the kernel for a free port (the tests use it).
    port = int(reader.number(general, "port", DEFAULT_CLIENT_PORT, 0, 65535, integer=True))
    loglevel = reader.choice(general, "loglevel", "info", _LOGLEVELS)
    calllog = reader.text(general, "calllog", "")
    login_timeout = reader.number(general, "login_timeout", CLIENT_AUTH_TIMEOUT_S, 1, 3600)

    ami_section = by_name.get("ami")
    if ami_section is None:
        ami = AmiConfig()
        if require_ami:
            reader.problems.append("%s:1: [ami]: section missing, expected [ami] with "
                                   "username and secret of a manager.conf user" % filename)
    else:
        reader.check_keys(ami_section, AMI_KEYS)
        ami = AmiConfig(
            host=reader.text(ami_section, "host", "127.0.0.1"),
            port=int(reader.number(ami_section, "port", DEFAULT_AMI_PORT, 1, 65535, integer=True)),
            username=reader.text(ami_section, "username", "", required=require_ami),
            secret=reader.text(ami_section, "secret", "", required=require_ami),
            auth=reader.choice(ami_section, "auth", "plain", ("plain", "md5")),
            ping_interval=reader.number(ami_section, "ping_interval", AMI_PING_INTERVAL_S, 1, 3600),
            reconnect_max=reader.number(ami_section, "reconnect_max", AMI_RECONNECT_MAX_S, 1, 3600),
        )
    users: Dict[str, UserConfig] = {}
    for section in sections:
        if section.name.lower() in ("general", "ami"):
            continue
        users[section.name] = reader.read_user(section)
    if reader.problems:
        raise ConfigError(sorted(reader.problems, key=_problem_line))
    return Config(filename, bind, port, loglevel, calllog, ami, users, login_timeout)


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
    return parse_config(text, path, require_ami)


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


def parse_ami_block(block: bytes) -> AmiMessage:
    """One framed message (without its terminating blank line) to AmiMessage.

    Decoding happens here, after framing, so a UTF-8 character split across
    reads is whole again; invalid bytes become U+FFFD, nothing is dropped.
    """
    text = str(block, "utf-8", "replace")
    # The block ends before the final LF, so its last CR is still there.
    return _parse_message(text[:-1] if text.endswith("\r") else text)


def _parse_message(text: str, defer: bool = True) -> AmiMessage:
    """A decoded message without its final line end.

    Every event Asterisk sends is distinct ``Key: Value`` lines ending in
    CRLF: that case takes one pass; anything else (bare LF, repeated keys,
    ``Key:`` with no space, body lines) is redone by the general rules.
    With ``defer``, DEFERRED_EVENTS wait unsplit until something reads them.
    """
    if defer and text.startswith("Event: "):
        end = text.find("\r\n")
        name = text[7:end] if end >= 0 else text[7:]
        if name in DEFERRED_EVENTS:
            return _DeferredAmiMessage(name, text)
    lines = text.split("\r\n")
    msg = AmiMessage()
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            break
        msg[key] = value
    else:
        # Every line was "Key: Value": done, unless a key was repeated or
        # a bare LF hid a line inside another.
        if len(msg) == len(lines) and text.count("\n") == len(lines) - 1:
            return msg
    return _message_from_lines(text.replace("\r\n", "\n").split("\n"))


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
        messages: List[AmiMessage] = []
        pos = 0
        end_search = _AMI_MESSAGE_END.search
        while True:
            lead = _AMI_LEADING_BLANKS.match(buf, pos)
            if lead:
                pos = lead.end()
            if self._skipping:
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
                    # Decode straight from the buffer, without the last CR.
                    last = end - 1 if buf[end - 1] == 13 else end
                    messages.append(_parse_message(str(view[pos:last], "utf-8", "replace")))
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
    """An AMI action in wire form.  CR and LF in a value would let it forge
    further headers or actions, so they are refused outright."""
    lines = ["Action: " + action]
    for key, value in fields:
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
                 ping_interval: float = AMI_PING_INTERVAL_S, events: str = "on"):
        self.username = username
        self._secret = secret
        self.auth = auth
        self.events = events
        self.ping_interval = ping_interval
        self.parser = AmiParser()
        self.logged_in = False
        self._outgoing = bytearray()
        self._action_seq = 0
        self._pending: Dict[str, str] = {}  # ActionID -> action name
        self._login_id: Optional[str] = None
        self._challenge_id: Optional[str] = None
        self._login_deadline: Optional[float] = now + AMI_LOGIN_TIMEOUT_S
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
        times = [t for t in (self._login_deadline, self._ping_due, self._pong_deadline)
                 if t is not None]
        return min(times) if times else None

    def poll(self, now: float) -> Optional[str]:
        """Queue a due Ping; return why the link is dead, or None."""
        if self._login_deadline is not None and now >= self._login_deadline:
            return "no login response within %g s" % AMI_LOGIN_TIMEOUT_S
        if self._pong_deadline is not None and now >= self._pong_deadline:
            return "no answer to Ping within %g s" % AMI_PING_TIMEOUT_S
        if self._ping_due is not None and now >= self._ping_due and self._ping_id is None:
            self._ping_id = self.send_action("Ping")
            self._pong_deadline = now + AMI_PING_TIMEOUT_S
            self._ping_due = now + self.ping_interval
        return None


# ---------------------------------------------------------------------------
# Call-state engine (pure): AMI events in, per-user notifications out
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
#: The Dial application's DIALSTATUS (apps/app_dial.c) as a call outcome.
_DIAL_OUTCOMES = {
    "NOANSWER": "noanswer", "BUSY": "busy", "CANCEL": "cancelled",
    "CONGESTION": "failed", "CHANUNAVAIL": "failed", "DONTCALL": "failed",
    "TORTURE": "failed", "INVALIDARGS": "failed",
}
#: The cause reported for an outcome when the channel's own cause was 0.
_OUTCOME_CAUSES = {"completed": 16, "busy": 17, "noanswer": 19,
                   "answered_elsewhere": 26, "failed": 34, "cancelled": 16}
#: Dialplan extensions that are not numbers anybody dialed.
_SPECIAL_EXTENS = frozenset(("", "s", "h", "i", "t", "T", "o", "a", "e", "fax", "talk"))
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

    @classmethod
    def of(cls, num: Optional[str], name: Optional[str]) -> "Party":
        return cls("" if num in _UNKNOWN_CALLERID or num is None else num,
                   "" if name in _UNKNOWN_CALLERID or name is None else name)

    def as_dict(self) -> Dict[str, str]:
        return {"num": self.num, "name": self.name}


NOBODY = Party("", "")


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC, to the second: ``2026-11-26T21:19:10Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def uniqueid_epoch(uniqueid: str) -> Optional[float]:
    """When Asterisk created a channel: a Uniqueid is ``[system-]epoch.seq``
    (main/channel.c), so a channel seen mid-call still has a start time."""
    try:
        epoch = float(uniqueid.rpartition("-")[2].partition(".")[0])
    except ValueError:
        return None
    return epoch if epoch > 0 else None


class Directory:
    """Which configured users a device or a dialed extension belongs to."""

    def __init__(self, users: Iterable[UserConfig] = ()):
        by_device: Dict[str, List[str]] = {}
        by_extension: Dict[str, List[Tuple[str, str]]] = {}
        for user in users:
            for device in user.devices:
                by_device.setdefault(device, []).append(user.name)
            for number, context in user.extensions:
                by_extension.setdefault(number, []).append((context, user.name))
        self._by_device = {k: tuple(v) for k, v in by_device.items()}
        self._by_extension = by_extension

    def device_users(self, device: str) -> Tuple[str, ...]:
        return self._by_device.get(device, ())

    def extension_users(self, exten: str, context: str) -> Tuple[str, ...]:
        entries = self._by_extension.get(exten)
        if not entries:
            return ()
        return tuple(user for ctx, user in entries if not ctx or ctx == context)


class Channel:
    """One Asterisk channel, as the engine last saw it."""

    __slots__ = ("uniqueid", "name", "device", "is_local", "local_half", "local_peer",
                 "linkedid", "state", "caller", "connected", "context", "exten",
                 "first_exten", "created", "answered_at", "bridge", "dialer",
                 "dial_targets", "originated", "user_calls")

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
        self.context = ""
        self.exten = ""
        #: The extension the channel was created at: what a caller dialed.
        self.first_exten: Optional[str] = None
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

    def __repr__(self) -> str:
        return "<Channel %s %s>" % (self.name, self.uniqueid)


class UserCall:
    """One user's view of one call: what that user has been told so far.

    A user call is created when a call reaches one of the user's devices or
    extensions, announced once (``incoming``/``outgoing``), and ended exactly
    once with ``hangup`` when the last channel keeping it alive is gone.
    """

    __slots__ = ("user", "call_id", "direction", "device", "me", "peer", "dialed",
                 "started", "answered_at", "announced", "channels", "anchor",
                 "outcome", "answered_by", "cause", "cause_txt")

    def __init__(self, user: str, call_id: str, direction: str, me: Party, peer: Party,
                 dialed: str, now: float):
        self.user = user
        self.call_id = call_id
        #: "in" (the user is called) or "out" (the user calls).
        self.direction = direction
        self.device = ""
        self.me = me
        self.peer = peer
        self.dialed = dialed
        self.started = now
        self.answered_at: Optional[float] = None
        self.announced = False
        #: The user's own channels in this call.
        self.channels: List[Channel] = []
        #: For a call that reached the user's *extension*: the caller-side
        #: channel running that extension.  It keeps the user call alive
        #: while the call rings elsewhere (a forward to a mobile).
        self.anchor: Optional[Channel] = None
        #: Why it was not answered, once known: noanswer, busy, cancelled,
        #: failed, answered_elsewhere.
        self.outcome: Optional[str] = None
        self.answered_by: Optional[Party] = None
        self.cause = 0
        self.cause_txt = ""

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.call_id, self.user, self.direction)

    @property
    def parties(self) -> Tuple[Party, Party]:
        """(from, to) as the user sees them."""
        return (self.peer, self.me) if self.direction == "in" else (self.me, self.peer)


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


_NO_NOTIFICATIONS: List[Notification] = []


class CallEngine:
    """Follows channels, dials and bridges; tells each user about their calls.

    ``handle(message, now)`` takes one AMI message and returns the
    notifications it causes.  The engine reads no clock and does no I/O;
    messages it has no handler for cost one dictionary lookup.
    """

    def __init__(self, directory: Optional[Directory] = None):
        self.directory = directory or Directory()
        self.channels: Dict[str, Channel] = {}
        #: (call id, user, direction) -> the user's view of that call.
        self.user_calls: Dict[Tuple[str, str, str], UserCall] = {}
        #: call id -> its user calls, to tell the others when one answers.
        self.calls: Dict[str, List[UserCall]] = {}
        #: Local channel ;1 halves waiting for their ;2 (by name without ";1").
        self._unpaired_locals: Dict[str, Channel] = {}
        self._recent_hangups: Set[str] = set()
        self._recent_hangup_order: "collections.deque[str]" = collections.deque()
        self._out: List[Notification] = []
        self._now = 0.0
        self._handlers = {
            # channel lifecycle
            "Newchannel": self.on_newchannel,
            "Hangup": self.on_hangup,
            # snapshots: state, caller ID, dialplan position
            "Newstate": self.on_snapshot,
            "NewCallerid": self.on_snapshot,
            "NewConnectedLine": self.on_snapshot,
            "Newexten": self.on_snapshot,
            # dialing
            "DialBegin": self.on_dialbegin,
            "DialState": self.on_dialstate,
            "DialEnd": self.on_dialend,
            # bridges and Local channels
            "BridgeEnter": self.on_bridgeenter,
            "BridgeLeave": self.on_bridgeleave,
            "LocalBridge": self.on_localbridge,
        }

    # -- entry points --------------------------------------------------------

    def handle(self, msg: AmiMessage, now: float) -> List[Notification]:
        handler = self._handlers.get(msg.get("Event"))  # type: ignore[arg-type]
        if handler is None:
            return _NO_NOTIFICATIONS
        self._now = now
        handler(msg)
        if not self._out:
            return _NO_NOTIFICATIONS
        out, self._out = self._out, []
        return out

    def set_directory(self, directory: Directory) -> None:
        """New users and devices apply to calls that start from now on."""
        self.directory = directory

    def link_lost(self, now: float) -> List[Notification]:
        """The AMI link is gone: no call may stay 'ringing' at a client.
        Every announced call ends with ``reason=unknown``; all state is dropped."""
        self._now = now
        for uc in list(self.user_calls.values()):
            uc.outcome = "unknown"
            self._end(uc, reason="unknown")
        self.channels.clear()
        self.user_calls.clear()
        self.calls.clear()
        self._unpaired_locals.clear()
        self._recent_hangups.clear()
        self._recent_hangup_order.clear()
        out, self._out = self._out, []
        return out

    def active_calls(self, user: str) -> List[UserCall]:
        return [uc for uc in self.user_calls.values() if uc.user == user and uc.announced]

    # -- handlers ------------------------------------------------------------

    def on_newchannel(self, msg: AmiMessage) -> None:
        uniqueid = msg.get("Uniqueid")
        name = msg.get("Channel")
        if not uniqueid or not name:
            return
        chan = Channel(uniqueid, name, self._now)
        self.channels[uniqueid] = chan
        if chan.local_half:
            self._pair_local(chan)
        self._update(chan, msg, "")
        chan.first_exten = chan.exten

    def on_snapshot(self, msg: AmiMessage) -> None:
        self._snapshot(msg, "")

    def on_localbridge(self, msg: AmiMessage) -> None:
        one = self._snapshot(msg, "LocalOne")
        two = self._snapshot(msg, "LocalTwo")
        if one is not None and two is not None:
            one.local_peer, two.local_peer = two, one

    def on_dialbegin(self, msg: AmiMessage) -> None:
        src = self._snapshot(msg, "")
        dest = self._snapshot(msg, "Dest")
        if dest is not None:
            self._dial_begin(src, dest, msg.get("DialString", ""))

    def on_dialstate(self, msg: AmiMessage) -> None:
        self._snapshot(msg, "")
        self._snapshot(msg, "Dest")

    def on_dialend(self, msg: AmiMessage) -> None:
        src = self._snapshot(msg, "")
        dest = self._snapshot(msg, "Dest")
        if dest is not None:
            self._dial_end(src, dest, msg.get("DialStatus", ""))

    def on_bridgeenter(self, msg: AmiMessage) -> None:
        chan = self._snapshot(msg, "")
        if chan is not None:
            chan.bridge = msg.get("BridgeUniqueid")

    def on_bridgeleave(self, msg: AmiMessage) -> None:
        chan = self._snapshot(msg, "")
        if chan is not None:
            chan.bridge = None

    def on_hangup(self, msg: AmiMessage) -> None:
        chan = self._snapshot(msg, "")
        if chan is None:
            return
        try:
            cause = int(msg.get("Cause", "0"))
        except ValueError:
            cause = 0
        self._hangup(chan, cause, msg.get("Cause-txt") or Q850_CAUSES.get(cause, ""))

    # -- channel bookkeeping -------------------------------------------------

    def _snapshot(self, msg: AmiMessage, prefix: str) -> Optional[Channel]:
        """The channel an event is about, updated from the event's snapshot
        fields (every channel event carries state, caller ID and position)."""
        uniqueid = msg.get(prefix + "Uniqueid")
        if not uniqueid:
            return None
        chan = self.channels.get(uniqueid)
        if chan is None:
            name = msg.get(prefix + "Channel")
            if not name or uniqueid in self._recent_hangups:
                return None
            # A channel that existed before we connected, or whose
            # Newchannel was lost: adopt it, dated by its Uniqueid.
            chan = Channel(uniqueid, name, uniqueid_epoch(uniqueid) or self._now)
            self.channels[uniqueid] = chan
            if chan.local_half:
                self._pair_local(chan)
            self._update(chan, msg, prefix)
            chan.first_exten = chan.exten
            return chan
        self._update(chan, msg, prefix)
        return chan

    def _update(self, chan: Channel, msg: AmiMessage, prefix: str) -> None:
        get = msg.get
        state = get(prefix + "ChannelStateDesc")
        if state is not None and state != chan.state:
            chan.state = state
            if state == "Up" and chan.answered_at is None:
                chan.answered_at = self._now
        num = get(prefix + "CallerIDNum")
        if num is not None:
            name = get(prefix + "CallerIDName")
            if num != chan.caller.num or name != chan.caller.name:
                chan.caller = Party.of(num, name)
        num = get(prefix + "ConnectedLineNum")
        if num is not None:
            name = get(prefix + "ConnectedLineName")
            if num != chan.connected.num or name != chan.connected.name:
                chan.connected = Party.of(num, name)
        linkedid = get(prefix + "Linkedid")
        if linkedid:
            chan.linkedid = linkedid
        exten = get(prefix + "Exten")
        if exten:
            context = get(prefix + "Context") or chan.context
            if exten != chan.exten or context != chan.context:
                chan.exten = exten
                chan.context = context
                self._visit_exten(chan)

    def _pair_local(self, chan: Channel) -> None:
        base = chan.name[:-2]
        other = self._unpaired_locals.pop(base, None)
        if other is None:
            self._unpaired_locals[base] = chan
        else:
            chan.local_peer, other.local_peer = other, chan

    def _lineage(self, chan: Optional[Channel]) -> Iterable[Channel]:
        """The channel, then the ones that caused it: a Local ;2 half leads to
        its ;1 half, a dialed channel to the channel that dialed it."""
        hops = 0
        while chan is not None and hops < MAX_LINEAGE_HOPS:
            yield chan
            hops += 1
            if chan.local_half == "2" and chan.local_peer is not None:
                chan = chan.local_peer
            else:
                chan = chan.dialer

    def _root(self, chan: Channel) -> Channel:
        """The channel that started it all: the caller."""
        root = chan
        for root in self._lineage(chan):
            pass
        return root

    def _dialed_number(self, caller: Channel, dialstring: str) -> str:
        for candidate in (caller.first_exten, caller.exten):
            if candidate and candidate not in _SPECIAL_EXTENS:
                return candidate
        # Dial(PJSIP/+1555@trunk) -> "+1555@trunk"; Local -> "101@ctx/n".
        number = dialstring.partition("@")[0].rpartition("/")[2]
        return number[4:] if number.startswith("sip:") else number

    # -- calls as the users see them -------------------------------------------

    def _user_call(self, call_id: str, user: str, direction: str, me: Party, peer: Party,
                   dialed: str) -> UserCall:
        key = (call_id, user, direction)
        uc = self.user_calls.get(key)
        if uc is None:
            uc = UserCall(user, call_id, direction, me, peer, dialed, self._now)
            self.user_calls[key] = uc
            self.calls.setdefault(call_id, []).append(uc)
        return uc

    def _attach(self, uc: UserCall, chan: Channel) -> None:
        if chan not in uc.channels:
            uc.channels.append(chan)
        if uc not in chan.user_calls:
            chan.user_calls.append(uc)

    def _visit_exten(self, chan: Channel) -> None:
        """A channel runs dialplan at an extension: if that is a user's
        number, the call is for that user, wherever it rings next."""
        if chan.local_half == "1":
            return  # a ;1 half only mirrors its caller's position
        users = self.directory.extension_users(chan.exten, chan.context)
        if not users:
            return
        root = self._root(chan)
        callers = self.directory.device_users(root.device)
        for user in users:
            if user in callers:
                continue  # the user's own phone dialing through their own number
            uc = self._user_call(root.linkedid, user, "in", Party(chan.exten, ""),
                                 root.caller, self._dialed_number(root, ""))
            if uc.anchor is None and uc.answered_at is None:
                uc.anchor = chan
                if uc not in chan.user_calls:
                    chan.user_calls.append(uc)

    def _dial_begin(self, src: Optional[Channel], dest: Channel, dialstring: str) -> None:
        dest.dialer = src
        if src is None:
            # Originate (click-to-dial): the phone rings for a call its own
            # user asked for; the outgoing call starts when it dials out.
            dest.originated = True
            return
        src.dial_targets.add(dest)
        root = self._root(src)
        dialed = self._dialed_number(root, dialstring)
        if root.dialer is None and not root.is_local:
            peer = Party(dest.caller.num or dialed, dest.caller.name) if not dest.is_local \
                else Party(dialed, "")
            for user in self.directory.device_users(root.device):
                uc = self._user_call(root.linkedid, user, "out", root.caller, peer, dialed)
                if not uc.device:
                    uc.device = root.device
                self._attach(uc, root)
                self._announce(uc, "outgoing")
        caller = root.caller
        if not dest.is_local:
            if dest.connected.num or dest.connected.name:
                caller = dest.connected  # what the ringing phone displays
            for user in self.directory.device_users(dest.device):
                uc = self._user_call(root.linkedid, user, "in", dest.caller, caller, dialed)
                if not uc.announced:
                    uc.device = dest.device
                    uc.me = dest.caller
                self._attach(uc, dest)
                self._announce_incoming(uc, caller, dialed)
        # A call that reached a user's extension rings somewhere now.
        for chan in self._lineage(src):
            for uc in chan.user_calls:
                if uc.direction == "in":
                    self._announce_incoming(uc, caller, dialed)

    def _dial_end(self, src: Optional[Channel], dest: Channel, status: str) -> None:
        if src is not None:
            src.dial_targets.discard(dest)
        if status == "ANSWER":
            self._answered(src, dest)
            return
        outcome = _DIAL_OUTCOMES.get(status)
        if outcome is None:
            return
        for uc in dest.user_calls:
            if uc.direction == "in":
                self._set_outcome(uc, outcome)
        # Up the chain, as long as no other branch of a dial still rings:
        # a forward that was not answered, the caller's own outgoing call.
        came_from = dest
        chan = src
        hops = 0
        while chan is not None and hops < MAX_LINEAGE_HOPS:
            if any(target is not came_from for target in chan.dial_targets):
                break
            for uc in chan.user_calls:
                self._set_outcome(uc, outcome)
            came_from = chan
            chan = chan.local_peer if chan.local_half == "2" else chan.dialer
            hops += 1

    def _set_outcome(self, uc: UserCall, outcome: str) -> None:
        if uc.outcome is not None or uc.answered_at is not None:
            return  # the first verdict stands
        uc.outcome = outcome
        if not uc.announced:
            return
        if outcome == "noanswer" and uc.direction == "in":
            self._emit(uc, "timeout")
        elif outcome == "busy":
            self._emit(uc, "busy")

    def _answered(self, src: Optional[Channel], answerer: Channel) -> None:
        if answerer.is_local:
            return  # the endpoint behind the Local channel reports the answer
        lineage = set(self._lineage(answerer))
        call_ids = {answerer.linkedid}
        if src is not None:
            call_ids.add(self._root(src).linkedid)
        outside = not self.directory.device_users(answerer.device)
        for call_id in call_ids:
            for uc in list(self.calls.get(call_id, ())):
                if uc.answered_at is not None or not uc.announced:
                    continue
                if uc.direction == "out":
                    if not any(chan in lineage for chan in uc.channels):
                        continue
                    uc.peer = Party(answerer.caller.num or uc.peer.num,
                                    answerer.caller.name or uc.peer.name)
                    self._answer(uc, answerer)
                elif answerer in uc.channels or (outside and uc.anchor in lineage):
                    # Answered on the user's phone, or on the outside number
                    # the user's calls are forwarded to (a mobile).
                    if answerer in uc.channels:
                        self._release_anchor(uc)
                    self._answer(uc, answerer)
                elif uc.outcome is None:
                    uc.outcome = "answered_elsewhere"
                    uc.answered_by = answerer.caller
                    self._emit(uc, "pickup", answered_by=self._answerer_fields(answerer))

    def _release_anchor(self, uc: UserCall) -> None:
        """Answered on the user's own phone: from now on the user call lives
        as long as the user's channels, not as long as the caller's."""
        if uc.anchor is not None:
            if uc in uc.anchor.user_calls:
                uc.anchor.user_calls.remove(uc)
            uc.anchor = None

    def _answer(self, uc: UserCall, answerer: Channel) -> None:
        uc.answered_at = self._now
        uc.answered_by = answerer.caller
        self._emit(uc, "pickup", answered_by=self._answerer_fields(answerer))

    @staticmethod
    def _answerer_fields(answerer: Channel) -> Dict[str, str]:
        return {"num": answerer.caller.num, "name": answerer.caller.name,
                "device": answerer.device}

    def _hangup(self, chan: Channel, cause: int, cause_txt: str) -> None:
        self.channels.pop(chan.uniqueid, None)
        self._recent_hangups.add(chan.uniqueid)
        self._recent_hangup_order.append(chan.uniqueid)
        if len(self._recent_hangup_order) > MAX_RECENT_HANGUPS:
            self._recent_hangups.discard(self._recent_hangup_order.popleft())
        if chan.local_half:
            self._unpaired_locals.pop(chan.name[:-2], None)
        for uc in list(chan.user_calls):
            if chan in uc.channels:
                uc.channels.remove(chan)
            if uc.anchor is chan:
                self._release_anchor(uc)
            if cause:
                uc.cause, uc.cause_txt = cause, cause_txt
            if not uc.channels and uc.anchor is None:
                self._end(uc)
        chan.user_calls = []
        chan.dial_targets.clear()

    # -- the end of a user call ------------------------------------------------

    def _reason(self, uc: UserCall) -> str:
        if uc.answered_at is not None:
            return "completed"
        if uc.outcome is not None:
            return uc.outcome
        if uc.cause == 26:
            return "answered_elsewhere"
        if uc.cause == 17:
            return "busy"
        if uc.cause in (18, 19):
            return "noanswer"
        if uc.cause in _FAILURE_CAUSES:
            return "failed"
        return "cancelled"

    def _end(self, uc: UserCall, reason: Optional[str] = None) -> None:
        if self.user_calls.get(uc.key) is not uc:
            return  # already ended
        del self.user_calls[uc.key]
        siblings = self.calls.get(uc.call_id)
        if siblings is not None:
            if uc in siblings:
                siblings.remove(uc)
            if not siblings:
                del self.calls[uc.call_id]
        for chan in uc.channels:
            if uc in chan.user_calls:
                chan.user_calls.remove(uc)
        if uc.anchor is not None and uc in uc.anchor.user_calls:
            uc.anchor.user_calls.remove(uc)
        uc.channels = []
        uc.anchor = None
        if not uc.announced:
            return
        reason = reason or self._reason(uc)
        cause, cause_txt = uc.cause, uc.cause_txt
        if not cause and reason in _OUTCOME_CAUSES:
            cause = _OUTCOME_CAUSES[reason]
            cause_txt = Q850_CAUSES[cause]
        now = self._now
        duration = int(round(max(0.0, now - uc.started)))
        talk_time = int(round(max(0.0, now - uc.answered_at))) if uc.answered_at else 0
        fields = self._emit(uc, "hangup", reason=reason, cause=cause,
                            cause_txt=cause_txt or Q850_CAUSES.get(cause, ""),
                            duration=duration, talk_time=talk_time)
        frm, to = uc.parties
        self._out[-1].record = {
            "user": uc.user, "call": uc.call_id, "direction": uc.direction,
            "device": uc.device, "from": frm.as_dict(), "to": to.as_dict(),
            "dialed": uc.dialed, "start": iso_time(uc.started),
            "answer": iso_time(uc.answered_at) if uc.answered_at else None,
            "end": fields["time"], "answered": uc.answered_at is not None,
            "answered_by": uc.answered_by.as_dict() if uc.answered_by else None,
            "reason": reason, "cause": cause, "duration": duration, "talk_time": talk_time,
        }

    # -- output ----------------------------------------------------------------

    def _announce(self, uc: UserCall, kind: str) -> None:
        if not uc.announced:
            uc.announced = True
            uc.started = self._now  # not when routing began: an IVR may come first
            self._emit(uc, kind, dialed=uc.dialed)

    def _announce_incoming(self, uc: UserCall, caller: Party, dialed: str) -> None:
        """The caller is known best when the call rings, not when it was
        routed: a Local channel learns its caller only once dialed."""
        if not uc.announced:
            uc.peer = caller
            uc.dialed = dialed
            self._announce(uc, "incoming")

    def _emit(self, uc: UserCall, kind: str, **extra: object) -> Dict[str, object]:
        frm, to = uc.parties
        fields: Dict[str, object] = {
            "event": kind, "call": uc.call_id, "time": iso_time(self._now),
            "direction": uc.direction, "device": uc.device,
            "from": frm.as_dict(), "to": to.as_dict(),
        }
        fields.update(extra)
        self._out.append(Notification(uc.user, kind, fields))
        return fields


# ---------------------------------------------------------------------------
# Client protocol (no I/O): login, subscriptions, text and JSON lines
# ---------------------------------------------------------------------------

#: Characters that force a text value into quotes: anything that could end
#: a line for some reader (CR, LF, VT, FF, NEL, U+2028...), spaces, quotes,
#: '=' and backslashes.
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_TEXT_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n",
                 ord("\r"): "\\r", ord("\t"): "\\t"}
for _code in list(range(0x20)) + list(range(0x7f, 0xa0)) + [0x2028, 0x2029]:
    _TEXT_ESCAPES.setdefault(_code, "\\u%04x" % _code)
#: json.dumps escapes C0 controls but not these, which str.splitlines() and
#: some terminals treat as line ends.
_JSON_EXTRA_ESCAPES = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_JSON_EXTRA_LINE_ENDS = re.compile("[\x85\u2028\u2029]")
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
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    if _JSON_EXTRA_LINE_ENDS.search(text):
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


CLIENT_HELP = ("commands: LOGIN <user> <secret> | EVENTS <kind>[,<kind>...]|ALL | "
               "FORMAT text|json | PING | HELP | QUIT")


class ServerView:
    """What a client session may ask of the server it is connected to.

    The daemon implements these for real; tests and replay use this class.
    """

    def __init__(self, users: Dict[str, UserConfig]):
        self.users = users

    def calls(self, user: str) -> List[Dict[str, object]]:
        """The user's calls in progress, as event fields."""
        return []

    def history(self, user: str, count: int) -> List[Dict[str, object]]:
        """The user's last ``count`` finished calls, newest last."""
        return []


class ClientSession:
    """One desktop connection's protocol state, without the socket.

    ``handle_line`` takes one received line and returns the reply lines.
    Nothing but replies reaches the client before LOGIN succeeds; after it,
    ``wants(kind)`` says whether a notification of that kind is for it.
    """

    def __init__(self, peer_host: str, tag: str = "client"):
        self.peer_host = peer_host
        self.tag = tag
        self.user: Optional[UserConfig] = None
        self.fmt = "text"
        self.kinds: frozenset = frozenset()
        self.closing = False
        self.failed_logins = 0

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
            "PING": self._ping, "HELP": self._help, "QUIT": self._quit,
        }.get(command)
        try:
            if handler is None:
                raise ClientProtocolError("400", "unknown command, try HELP")
            return handler(argument, server)
        except ClientProtocolError as e:
            return ["ERR %s %s" % (e.code, e.text)]

    def _login(self, argument: str, server: ServerView) -> List[str]:
        if self.user is not None:
            raise ClientProtocolError("409", "already logged in as %s" % self.user.name)
        name, _, secret = argument.partition(" ")
        account = server.users.get(name)
        # Compare even for unknown users, so timing does not tell them apart.
        expected = account.secret if account is not None else "\0unknown user"
        secret_ok = hmac.compare_digest(secret.encode("utf-8"), expected.encode("utf-8"))
        if account is None or not secret_ok or not account.host_allowed(self.peer_host):
            self.failed_logins += 1
            why = ("unknown user" if account is None else
                   "wrong secret" if not secret_ok else "address not allowed by host=")
            log.warning("%s: login as %r refused: %s", self.tag, name[:64], why)
            raise ClientProtocolError("401", "login failed")
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
        else:
            for kind in wanted:
                if kind not in EVENT_KINDS:
                    raise ClientProtocolError("400", "unknown event kind %s" % quote_value(kind[:40]))
                if kind not in self.user.events:
                    raise ClientProtocolError("403", "event kind %s not allowed for %s"
                                              % (kind, self.user.name))
            self.kinds = frozenset(wanted)
        return ["OK events=%s" % ",".join(k for k in EVENT_KINDS if k in self.kinds)]

    def _format(self, argument: str, server: ServerView) -> List[str]:
        fmt = argument.strip().lower()
        if fmt not in ("text", "json"):
            raise ClientProtocolError("400", "usage: FORMAT text|json")
        self.fmt = fmt
        return ["OK format=%s" % fmt]

    def _ping(self, argument: str, server: ServerView) -> List[str]:
        return ["OK PONG"]

    def _help(self, argument: str, server: ServerView) -> List[str]:
        return ["OK " + CLIENT_HELP]

    def _quit(self, argument: str, server: ServerView) -> List[str]:
        self.closing = True
        return ["OK bye"]


# ---------------------------------------------------------------------------
# Event loop and I/O: the only place with sockets, clocks and signals
# ---------------------------------------------------------------------------


class ClientConnection:
    """A desktop client's socket, its buffers and its ClientSession."""

    __slots__ = ("sock", "session", "peer", "inbuf", "outbuf", "writing",
                 "closed", "close_after_flush", "overflowed", "auth_deadline")

    def __init__(self, sock: socket.socket, peer: Tuple, login_deadline: float):
        self.sock = sock
        self.peer = peer
        host = peer[0] if peer else "?"
        self.session = ClientSession(host, tag="client %s:%s" % (host, peer[1] if peer else "?"))
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = False
        self.closed = False
        self.close_after_flush: Optional[str] = None
        self.overflowed = False
        self.auth_deadline = login_deadline

    @property
    def tag(self) -> str:
        return self.session.tag


class AmiLink:
    """The socket to Asterisk, its AmiSession and its reconnect schedule."""

    def __init__(self, config: AmiConfig):
        self.config = config
        self.sock: Optional[socket.socket] = None
        #: "idle" (waiting to reconnect), "connecting" or "connected".
        self.state = "idle"
        self.session: Optional[AmiSession] = None
        self.outbuf = bytearray()
        self.backoff = AMI_RECONNECT_MIN_S
        self.next_attempt = 0.0
        self.connect_deadline = 0.0
        self.address: Optional[Tuple[int, tuple]] = None


def resolve(host: str, port: int) -> Tuple[int, tuple]:
    """(family, sockaddr) of host:port.  Run before the loop starts or on
    reload, never per connect: a DNS lookup would block every client."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr


class Daemon:
    """The selectors loop: the AMI link in, client connections out.

    Everything protocol-shaped is delegated: bytes from Asterisk go to the
    AmiSession, its messages to the CallEngine, notifications to the
    ClientSessions of their user.  Timers use the monotonic clock; event
    times the wall clock.
    """

    def __init__(self, config: Config):
        self.config = config
        self.engine = CallEngine(Directory(config.users.values()))
        self.selector = selectors.DefaultSelector()
        self.listeners: List[socket.socket] = []
        self.clients: Set[ClientConnection] = set()
        self.sessions_by_user: Dict[str, Set[ClientConnection]] = {}
        self.ami = AmiLink(config.ami)
        self.pbx_up = False
        self.running = False
        self._dirty: Set[ClientConnection] = set()
        self._auth_deadlines: List[Tuple[float, int, ClientConnection]] = []
        self._deadline_seq = 0
        self._pending_signals: List[int] = []
        self._wakeup: Optional[Tuple[socket.socket, socket.socket]] = None
        self.calllog = None
        self.view = ServerView(config.users)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Bind the client port and open the call log (may raise OSError)."""
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and self.config.bind == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((self.config.bind, self.config.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._on_accept, sock))
        self.listeners.append(sock)
        host, port = sock.getsockname()[:2]
        log.info("ctinotify %s listening for clients on %s port %d", __version__, host, port)
        self._open_calllog()
        self._resolve_ami()

    @property
    def client_port(self) -> int:
        return self.listeners[0].getsockname()[1]

    def serve_forever(self) -> int:
        self._install_signal_handlers()
        self.running = True
        while self.running:
            timeout = self._next_timeout(time.monotonic())
            for key, mask in self.selector.select(timeout):
                key.data(mask)  # the handler registered with the socket
            self._handle_signals()
            self._run_timers(time.monotonic())
            self._flush_clients()
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        log.info("shutting down")
        stopping = {"server": "stopping", "time": iso_time(time.time())}
        for conn in list(self.clients):
            if conn.session.user is not None:
                self._queue(conn, encode_status(stopping, conn.session.fmt))
            self._send(conn)
            self._close(conn, "server shutting down")
        if self.ami.state == "connected" and self.ami.sock is not None:
            try:
                self.ami.sock.send(encode_action("Logoff"))
            except OSError:
                pass
        self._ami_close()
        for sock in self.listeners:
            self.selector.unregister(sock)
            sock.close()
        if self.calllog is not None:
            self.calllog.close()
        log.info("stopped")

    # -- signals -------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self.selector.register(reader, selectors.EVENT_READ, functools.partial(self._on_wakeup, reader))
        signal.set_wakeup_fd(writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

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
                self.reload()
            else:
                log.info("signal %d received", signum)
                self.running = False

    # -- reload --------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; on any error keep the running one."""
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("reload of %s rejected, keeping the running configuration:",
                      self.config.path)
            for problem in e.problems:
                log.error("  %s", problem)
            return
        old = self.config
        self.config = new
        self.view.users = new.users
        self.engine.set_directory(Directory(new.users.values()))
        logging.getLogger("ctinotify").setLevel(new.loglevel.upper())
        if (new.bind, new.port) != (old.bind, old.port):
            log.warning("reload: bind/port changes need a restart; still on %s port %d",
                        old.bind, old.port)
            new.bind, new.port = old.bind, old.port
        for conn in list(self.clients):
            account = conn.session.user
            if account is None:
                continue
            fresh = new.users.get(account.name)
            if fresh is None or fresh.secret != account.secret:
                self._close(conn, "account removed or secret changed by reload")
            elif not fresh.host_allowed(conn.session.peer_host):
                self._close(conn, "address no longer allowed by host= after reload")
            else:
                conn.session.user = fresh
                conn.session.kinds = conn.session.kinds & frozenset(fresh.events)
        if self.calllog is not None:
            self.calllog.close()
            self.calllog = None
        self._open_calllog()
        if new.ami.key() != old.ami.key():
            log.info("reload: [ami] changed, reconnecting")
            self.ami.config = new.ami
            self._resolve_ami()
            self._ami_lost("configuration changed", immediate=True)
        log.info("configuration reloaded from %s (%d users)", new.path, len(new.users))

    def _open_calllog(self) -> None:
        if not self.config.calllog:
            return
        try:
            self.calllog = open(self.config.calllog, "a", encoding="utf-8")
        except OSError as e:
            log.error("cannot open call log %s: %s", self.config.calllog, e)

    # -- timers --------------------------------------------------------------

    def _next_timeout(self, now: float) -> Optional[float]:
        deadlines = []
        link = self.ami
        if link.state == "idle":
            deadlines.append(link.next_attempt)
        elif link.state == "connecting":
            deadlines.append(link.connect_deadline)
        elif link.session is not None:
            deadline = link.session.next_deadline()
            if deadline is not None:
                deadlines.append(deadline)
        if self._auth_deadlines:
            deadlines.append(self._auth_deadlines[0][0])
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _run_timers(self, now: float) -> None:
        link = self.ami
        if link.state == "idle" and now >= link.next_attempt:
            self._ami_connect(now)
        elif link.state == "connecting" and now >= link.connect_deadline:
            self._ami_lost("no connection within %g s" % AMI_CONNECT_TIMEOUT_S)
        elif link.state == "connected" and link.session is not None:
            reason = link.session.poll(now)
            if reason:
                self._ami_lost(reason)
            else:
                self._ami_write()
        heap = self._auth_deadlines
        while heap and heap[0][0] <= now:
            _deadline, _seq, conn = heapq.heappop(heap)
            if not conn.closed and conn.session.user is None:
                self._queue(conn, b"ERR 408 login timeout\r\n")
                self._send(conn)
                self._close(conn, "no login within %g s" % self.config.login_timeout)

    # -- the AMI link --------------------------------------------------------

    def _resolve_ami(self) -> None:
        cfg = self.config.ami
        try:
            self.ami.address = resolve(cfg.host, cfg.port)
        except OSError as e:
            self.ami.address = None
            log.error("ami: cannot resolve %s: %s", cfg.host, e)

    def _ami_connect(self, now: float) -> None:
        link = self.ami
        if link.address is None:
            self._resolve_ami()
            if link.address is None:
                self._ami_lost("cannot resolve %s" % link.config.host)
                return
        family, sockaddr = link.address
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        link.sock = sock
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._ami_lost("connect to %s port %d failed: %s"
                           % (link.config.host, link.config.port, os.strerror(err)))
            return
        link.state = "connecting"
        link.connect_deadline = now + AMI_CONNECT_TIMEOUT_S
        self.selector.register(sock, selectors.EVENT_WRITE, self._on_ami)
        log.debug("ami: connecting to %s port %d", link.config.host, link.config.port)

    def _on_ami(self, mask: int) -> None:
        link = self.ami
        sock = link.sock
        assert sock is not None
        if link.state == "connecting":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._ami_lost("connect to %s port %d failed: %s"
                               % (link.config.host, link.config.port, os.strerror(err)))
                return
            link.state = "connected"
            cfg = link.config
            link.session = AmiSession(cfg.username, cfg.secret, cfg.auth, time.monotonic(),
                                      ping_interval=cfg.ping_interval)
            self.selector.modify(sock, selectors.EVENT_READ, self._on_ami)
            log.info("ami: connected to %s port %d", cfg.host, cfg.port)
            return
        if mask & selectors.EVENT_READ:
            self._ami_read(sock)
        if mask & selectors.EVENT_WRITE and link.state == "connected":
            self._ami_write()

    def _ami_read(self, sock: socket.socket) -> None:
        link = self.ami
        try:
            data = sock.recv(AMI_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._ami_lost("read failed: %s" % (e.strerror or e))
            return
        if not data:
            self._ami_lost("connection closed by Asterisk")
            return
        session = link.session
        assert session is not None
        try:
            items = session.receive_data(data, time.monotonic())
        except AmiProtocolError as e:
            self._ami_lost(str(e))
            return
        for problem in session.parser.problems:
            log.warning("ami: %s", problem)
        session.parser.problems.clear()
        for item in items:
            if isinstance(item, AmiMessage):
                if item.get("Event") == "Shutdown":
                    self._ami_lost("Asterisk is shutting down (%s)" % item.get("Shutdown", "?"))
                    return
                self._feed_engine(item)
            elif isinstance(item, AmiLoggedIn):
                link.backoff = AMI_RECONNECT_MIN_S
                log.info("ami: logged in as %s (%s)", link.config.username, item.banner)
                self._set_pbx_status(True, "")
            elif isinstance(item, AmiLoginFailed):
                self._ami_lost("login as %s refused by Asterisk: %s"
                               % (link.config.username, item.reason))
                return
        self._ami_write()

    def _feed_engine(self, msg: AmiMessage) -> None:
        try:
            notifications = self.engine.handle(msg, time.time())
        except Exception:
            # Our bug, not Asterisk's: skip the message, keep the link.
            log.exception("engine failed on a %s event; skipped it", msg.get("Event"))
            return
        if notifications:
            self._deliver(notifications)

    def _ami_write(self) -> None:
        link = self.ami
        if link.session is None or link.sock is None:
            return
        link.outbuf += link.session.data_to_send()
        if link.outbuf:
            try:
                sent = link.sock.send(link.outbuf)
                del link.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._ami_lost("write failed: %s" % (e.strerror or e))
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.outbuf else 0)
        self.selector.modify(link.sock, events, self._on_ami)

    def _ami_close(self) -> None:
        link = self.ami
        if link.sock is not None:
            try:
                self.selector.unregister(link.sock)
            except (KeyError, ValueError):
                pass
            link.sock.close()
        link.sock = None
        link.session = None
        link.outbuf.clear()
        link.state = "idle"

    def _ami_lost(self, reason: str, immediate: bool = False) -> None:
        link = self.ami
        self._ami_close()
        delay = 0.0 if immediate else link.backoff
        link.next_attempt = time.monotonic() + delay
        if not immediate:
            link.backoff = min(link.backoff * 2, link.config.reconnect_max)
        log.warning("ami: %s; reconnecting in %g s", reason, delay)
        if self.pbx_up:
            self._set_pbx_status(False, reason)
            self._deliver(self.engine.link_lost(time.time()))

    def _set_pbx_status(self, up: bool, reason: str) -> None:
        self.pbx_up = up
        fields: Dict[str, object] = {"pbx": "up" if up else "down", "time": iso_time(time.time())}
        if reason:
            fields["reason"] = reason
        encoded: Dict[str, bytes] = {}
        for conn in self.clients:
            fmt = conn.session.fmt
            if conn.session.user is not None:
                if fmt not in encoded:
                    encoded[fmt] = encode_status(fields, fmt)
                self._queue(conn, encoded[fmt])

    # -- notifications out ---------------------------------------------------

    def _deliver(self, notifications: List[Notification]) -> None:
        for note in notifications:
            if note.record is not None and self.calllog is not None:
                self._write_calllog(note.record)
            conns = self.sessions_by_user.get(note.user)
            if not conns:
                continue
            encoded: Dict[str, bytes] = {}
            for conn in conns:
                session = conn.session
                if note.kind not in session.kinds:
                    continue
                data = encoded.get(session.fmt)
                if data is None:
                    data = encoded[session.fmt] = encode_notification(note.fields, session.fmt)
                self._queue(conn, data)

    def _write_calllog(self, record: Dict[str, object]) -> None:
        assert self.calllog is not None
        try:
            self.calllog.write(encode_json_line(record) + "\n")
            self.calllog.flush()
        except OSError as e:
            log.error("cannot write call log %s: %s", self.config.calllog, e)

    # -- clients -------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, mask: int) -> None:
        for _ in range(64):  # a burst, then let the others have the loop
            try:
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            client.setblocking(False)
            try:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = ClientConnection(client, peer, time.monotonic() + self.config.login_timeout)
            self.clients.add(conn)
            self.selector.register(client, selectors.EVENT_READ,
                                   functools.partial(self._on_client, conn))
            self._deadline_seq += 1
            heapq.heappush(self._auth_deadlines, (conn.auth_deadline, self._deadline_seq, conn))
            log.info("%s: connected", conn.tag)
            self._queue(conn, (ClientSession.greeting() + "\r\n").encode("utf-8"))

    def _on_client(self, conn: ClientConnection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._send(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._client_read(conn)

    def _client_read(self, conn: ClientConnection) -> None:
        try:
            data = conn.sock.recv(CLIENT_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(conn, "read failed: %s" % (e.strerror or e))
            return
        if not data:
            self._close(conn, "closed by the client")
            return
        conn.inbuf += data
        while not conn.closed and conn.close_after_flush is None:
            newline = conn.inbuf.find(b"\n")
            if newline < 0:
                break
            line = bytes(conn.inbuf[:newline])
            del conn.inbuf[:newline + 1]
            if len(line) > MAX_CLIENT_LINE_BYTES:
                self._refuse(conn, b"ERR 413 line too long\r\n", "line too long")
                return
            self._client_line(conn, line)
        if len(conn.inbuf) > MAX_CLIENT_LINE_BYTES:
            self._refuse(conn, b"ERR 413 line too long\r\n",
                         "more than %d bytes without a newline" % MAX_CLIENT_LINE_BYTES)

    def _client_line(self, conn: ClientConnection, raw: bytes) -> None:
        session = conn.session
        was_user = session.user
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        for reply in session.handle_line(text, self.view):
            self._queue(conn, (reply.replace("\r", " ").replace("\n", " ") + "\r\n")
                        .encode("utf-8"))
        if session.user is not None and was_user is None:
            self.sessions_by_user.setdefault(session.user.name, set()).add(conn)
            status: Dict[str, object] = {"pbx": "up" if self.pbx_up else "down",
                                         "time": iso_time(time.time())}
            self._queue(conn, encode_status(status, session.fmt))
        if session.closing:
            self._refuse(conn, b"", "quit")
        elif session.failed_logins >= 3:
            self._refuse(conn, b"", "too many failed logins")

    def _refuse(self, conn: ClientConnection, reply: bytes, reason: str) -> None:
        """Send a last reply, then close: never leave a peer hanging."""
        if reply:
            self._queue(conn, reply)
        self._send(conn)
        self._close(conn, reason)

    def _queue(self, conn: ClientConnection, data: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += data
        self._dirty.add(conn)
        if len(conn.outbuf) > CLIENT_OUTPUT_HARD_LIMIT_BYTES:
            conn.overflowed = True  # closed after this pass, never mid-write

    def _flush_clients(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if conn.closed:
                continue
            if conn.overflowed:
                self._close(conn, "output buffer over %d bytes: client not reading"
                            % CLIENT_OUTPUT_HARD_LIMIT_BYTES)
                continue
            self._send(conn)

    def _send(self, conn: ClientConnection) -> None:
        if conn.closed:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._close(conn, "write failed: %s" % (e.strerror or e))
                return
        want_write = bool(conn.outbuf)
        if want_write != conn.writing:
            conn.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(conn.sock, events, functools.partial(self._on_client, conn))

    def _close(self, conn: ClientConnection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        log.info("%s: disconnected: %s", conn.tag, reason)
        self.clients.discard(conn)
        if conn.session.user is not None:
            conns = self.sessions_by_user.get(conn.session.user.name)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.sessions_by_user[conn.session.user.name]
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.outbuf.clear()


# ---------------------------------------------------------------------------
# Command line
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
        stamp = msg.get("Timestamp")
        if stamp:
            try:
                self.now = max(self.now, float(stamp))
                return self.now
            except ValueError:
                pass
        uniqueid = msg.get("Uniqueid")
        if uniqueid:
            epoch = uniqueid_epoch(uniqueid)
            if epoch is not None and epoch > self.now:
                self.now = epoch
        return self.now


def replay_trace(stream, users: Dict[str, UserConfig], chunk_bytes: int = 1 << 16):
    """Feed a recorded AMI byte stream through parser and engine; yield
    ``(user, fields)`` for every notification a client of that user with
    all its allowed kinds would receive."""
    engine = CallEngine(Directory(users.values()))
    clock = TraceClock()
    first = stream.read(chunk_bytes)
    parser = AmiParser(expect_banner=first.startswith(AMI_BANNER_PREFIX.encode()))
    data = first
    while data:
        for msg in parser.feed(data):
            for note in engine.handle(msg, clock.observe(msg)):
                account = users.get(note.user)
                if account is not None and note.kind in account.events:
                    yield note.user, note.fields
        for problem in parser.problems:
            log.warning("replay: %s", problem)
        parser.problems.clear()
        data = stream.read(chunk_bytes)


def _cmd_check(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    config = load_config(path)
    sys.stdout.write(config.describe())
    if not config.users:
        log.warning("%s defines no client users: nobody can log in", path)
    _warn_if_world_readable(path)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    logging.getLogger("ctinotify").setLevel(config.loglevel.upper())
    _warn_if_world_readable(config.path)
    daemon = Daemon(config)
    try:
        daemon.start()
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", config.bind, config.port, e)
        return 1
    return daemon.serve_forever()


def _cmd_replay(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config), require_ami=False)
    out = sys.stdout
    with open(args.trace, "rb") as stream:
        for user, fields in replay_trace(stream, config.users):
            out.write(encode_json_line(dict({"client": user}, **fields)) + "\n")
    out.flush()
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    """Capture what Asterisk sends, as a trace for replay or a bug report.

    A plain blocking socket is enough here: nothing else shares this process.
    """
    config = load_config(find_config(args.config))
    cfg = config.ami
    session = AmiSession(cfg.username, cfg.secret, cfg.auth, time.monotonic(),
                         ping_interval=cfg.ping_interval)
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=AMI_CONNECT_TIMEOUT_S)
    except OSError as e:
        log.error("cannot connect to %s port %d: %s", cfg.host, cfg.port, e)
        return 1
    sock.settimeout(1.0)
    received = 0
    log.info("recording %s port %d to %s; Ctrl-C stops", cfg.host, cfg.port, args.output)
    with open(args.output, "wb") as out, open(args.output + ".sent", "wb") as sent_log:
        try:
            while True:
                outgoing = session.data_to_send()
                if outgoing:
                    sock.sendall(outgoing)
                    sent_log.write(session.redacted(outgoing))
                try:
                    data = sock.recv(AMI_RECV_BYTES)
                except socket.timeout:
                    data = None
                if data == b"":
                    log.warning("Asterisk closed the connection")
                    break
                if data:
                    out.write(data)
                    out.flush()
                    received += len(data)
                    for item in session.receive_data(data, time.monotonic()):
                        if isinstance(item, AmiLoginFailed):
                            log.error("login as %s refused: %s", cfg.username, item.reason)
                            return 1
                        if isinstance(item, AmiLoggedIn):
                            log.info("logged in (%s)", item.banner)
                reason = session.poll(time.monotonic())
                if reason:
                    log.error("%s", reason)
                    break
        except KeyboardInterrupt:
            logoff = encode_action("Logoff")
            try:
                sock.sendall(logoff)
                sent_log.write(logoff)
            except OSError:
                pass
        except AmiProtocolError as e:
            log.error("%s", e)
            return 1
        finally:
            sock.close()
    log.info("recorded %d bytes to %s", received, args.output)
    return 0


def _warn_if_world_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o004:
        log.warning("%s is readable by every user on this machine and holds secrets; "
                    "chmod 640 it", path)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(
        prog="ctinotify", description="Call notifications from Asterisk AMI for desktop clients.")
    parser.add_argument("--version", action="version", version="ctinotify " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config_help = "configuration file (default: %s, else ./%s)" % DEFAULT_CONFIG_PATHS
    cmd = commands.add_parser("check", help="validate the configuration and print it")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd = commands.add_parser("run", help="run the daemon in the foreground")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd = commands.add_parser("replay", help="print what clients would receive for a trace")
    cmd.add_argument("trace", help="a recorded AMI byte stream (.ami)")
    cmd.add_argument("-c", "--config", help=config_help)
    cmd = commands.add_parser("record", help="record AMI traffic to a file")
    cmd.add_argument("output", help="file to write the received bytes to")
    cmd.add_argument("-c", "--config", help=config_help)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s ctinotify[%(process)d] %(levelname)s %(message)s")
    handler = {"check": _cmd_check, "run": _cmd_run, "replay": _cmd_replay,
               "record": _cmd_record}[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write(problem + "\n")
        return 1


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
