"""Tests for ctinotify: ``make test``.

Recorded AMI traces are the backbone: tests/traces/*.ami are byte-exact
recordings of a real Asterisk 22 (manifests in *.json say what happened),
tests/golden/*.jsonl the notifications every user must receive for them.
End-to-end tests run the daemon as a real process against the fake
Asterisk of tests/fakeami.py, with real TCP clients on 127.0.0.1.
"""

import ast
import copy
import hashlib
import io
import json
import os
import pickle
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import ctinotify
from ctinotify import (AmiMessage, AmiParser, AmiProtocolError, AmiSession, CallEngine,
                       ConfigError, Directory, parse_config)

HERE = os.path.dirname(os.path.abspath(__file__))
TRACES = os.path.join(HERE, "tests", "traces")
GOLDEN = os.path.join(HERE, "tests", "golden")
OFFICE_CONF = os.path.join(HERE, "tests", "office.conf")
sys.path.insert(0, os.path.join(HERE, "tests"))

from fakeami import FakeAsterisk, trace_events  # noqa: E402

#: Scenarios of ordinary calls with golden notifications (issue 2).
BASIC_SCENARIOS = ("a_inbound_answered", "b_inbound_noanswer", "c_inbound_busy",
                   "d_inbound_cancel", "e_internal_answered", "f_outbound_answered",
                   "g_ringgroup")


def trace_path(name):
    return os.path.join(TRACES, name + ".ami")


def read_trace(name):
    with open(trace_path(name), "rb") as f:
        return f.read()


def all_trace_names():
    names = sorted(f[:-4] for f in os.listdir(TRACES) if f.endswith(".ami"))
    caco = os.path.join(TRACES, "cacofonisk")
    names += sorted("cacofonisk/" + f[:-4] for f in os.listdir(caco) if f.endswith(".ami"))
    return names


def office():
    return ctinotify.load_config(OFFICE_CONF)


def replay(name, users=None):
    users = users if users is not None else office().users
    with open(trace_path(name), "rb") as f:
        return [dict({"client": user}, **fields)
                for user, fields in ctinotify.replay_trace(f, users)]


# ---------------------------------------------------------------------------
# The fixed design
# ---------------------------------------------------------------------------

STDLIB_FALLBACK = {
    "__future__", "argparse", "collections", "errno", "functools", "hashlib", "heapq",
    "hmac", "ipaddress", "json", "logging", "os", "re", "selectors", "signal", "socket",
    "sys", "time", "typing", "ssl", "syslog", "stat", "io", "tempfile", "base64",
    "webbrowser", "urllib", "shlex", "getpass", "resource", "subprocess", "datetime",
}


def test_single_file_parses_as_python_38_and_imports_only_stdlib():
    with open(os.path.join(HERE, "ctinotify.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read(), feature_version=(3, 8))
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or STDLIB_FALLBACK
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= stdlib, imported - stdlib


def test_the_protocol_core_does_no_io():
    """From the AMI codec to the client protocol: no sockets, clocks or files."""
    with open(os.path.join(HERE, "ctinotify.py"), encoding="utf-8") as f:
        source = f.read()
    core = source.split("# AMI codec (no I/O)")[1].split("# Event loop and I/O")[0]
    for forbidden in (r"\bsocket\.[a-z]", r"\bselectors\.[A-Za-z]", r"\btime\.(time|monotonic)\(",
                      r"\bopen\(", r"\bsys\.std", r"\bprint\("):
        assert not re.search(forbidden, core), forbidden


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

ORIGINAL_REQUEST = """\
[general]
port=5039
[ami]
username = ctitest
secret = ctitest
[client1]
secret=blah
host=dynamic
devices=SIP/xxx,IAX/xxx,Zap/xxx
events=incoming, outgoing, transfer, divert, pickup, hangup, timeout
"""


def test_the_original_requests_client_section_loads_unchanged():
    config = parse_config(ORIGINAL_REQUEST, "orig.conf")
    user = config.users["client1"]
    assert user.secret == "blah"
    assert user.hosts is None
    assert user.devices == ("SIP/xxx", "IAX2/xxx", "DAHDI/xxx")
    assert user.events == ("incoming", "outgoing", "transfer", "divert", "pickup",
                           "hangup", "timeout")
    assert config.port == 5039


def test_the_example_config_is_valid():
    config = ctinotify.load_config(os.path.join(HERE, "ctinotify.conf"))
    assert "client1" in config.users and config.ami.auth == "md5"


def test_config_defaults():
    config = parse_config("[ami]\nusername=u\nsecret=s\n[a]\nsecret=x\ndevices=PJSIP/1\n", "f")
    assert (config.bind, config.port, config.loglevel, config.calllog) == \
        ("0.0.0.0", 5039, "info", "")
    assert (config.ami.host, config.ami.port, config.ami.auth) == ("127.0.0.1", 5038, "plain")
    assert config.ami.ping_interval == 20 and config.ami.reconnect_max == 30
    assert config.users["a"].events == ctinotify.EVENT_KINDS


def test_config_errors_name_file_line_section_and_key_all_at_once():
    text = ("[general]\nport = 99999\ncolour = blue\n[ami]\nusername = u\n"
            "[bob]\nsecret = s\ndevices = PJSIP100\nhost = 10.0.0.300\nevents = incoming, bogus\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/asterisk/ctinotify.conf")
    problems = info.value.problems
    assert problems == sorted(problems, key=lambda p: int(p.split(":")[1]))
    joined = "\n".join(problems)
    assert "/etc/asterisk/ctinotify.conf:2: [general] port: '99999' is out of range" in joined
    assert "/etc/asterisk/ctinotify.conf:3: [general] colour: unknown key" in joined
    assert "[ami] secret: missing, expected secret = <value>" in joined
    assert ":8: [bob] devices: 'PJSIP100' is not a device, expected" in joined
    assert ":9: [bob] host: '10.0.0.300' is not an address or CIDR" in joined
    assert ":10: [bob] events: unknown event kind 'bogus'" in joined
    assert ":6: [bob]: the user has neither devices nor extensions" in joined
    assert len(problems) == 7


@pytest.mark.parametrize("text, fragment", [
    ("[ami]\nusername=u\nsecret=s\n[a]\ndevices=PJSIP/1\n", "[a] secret: missing"),
    ("[ami]\nusername=u\nsecret=s\n[a]\nsecret=\ndevices=PJSIP/1\n", "[a] secret: empty"),
    ("[ami]\nusername=u\nsecret=s\n[a]\nsecret=x\n", "neither devices nor extensions"),
    ("[ami]\nusername=u\nsecret=s\nauth=sha\n", "[ami] auth: 'sha' is not allowed"),
    ("[general]\nbind=localhost\n[ami]\nusername=u\nsecret=s\n", "[general] bind"),
    ("[ami]\nusername=u\nsecret=s\nthis is not an option\n", ":4: [ami] this is not an opti"),
    ("port=1\n", ":1: port: option outside any section"),
    ("[ami]\nusername=u\nsecret=s\n[a b]\nsecret=x\ndevices=SIP/1\n", "invalid user name"),
    ("[ami]\nusername=u\nsecret=s\n[a](tpl)\nsecret=x\n", "unknown template 'tpl'"),
    ("#include other.conf\n", ":1: #include: directives are not supported"),
    ("[general]\nport=1\n[general]\nport=2\n", "section defined twice"),
    ("[ami]\nusername=u\nsecret=s\n[a]\nsecret=x\nextensions=10 0\n", "is not an extension"),
])
def test_config_error_messages(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.conf")
    assert fragment in str(info.value)
    assert all(re.match(r"c\.conf:\d+: ", p) for p in info.value.problems)


def test_config_templates_comments_and_arrows():
    text = ("[ami]\nusername = u ; the AMI user\nsecret => s\\;t\n"
            "[office](!)\nhost = 192.168.1.0/24, fe80::/10\nevents = incoming, hangup\n"
            "[alice](office)\nsecret = a\ndevices = pjsip/100\nextensions = 100@from-internal, 200\n")
    config = parse_config(text, "t.conf")
    assert config.ami.username == "u" and config.ami.secret == "s;t"
    alice = config.users["alice"]
    assert set(config.users) == {"alice"}
    assert alice.devices == ("PJSIP/100",)
    assert alice.extensions == (("100", "from-internal"), ("200", ""))
    assert alice.events == ("incoming", "hangup")
    assert alice.host_allowed("192.168.1.77") and alice.host_allowed("::ffff:192.168.1.7")
    assert alice.host_allowed("fe80::1") and not alice.host_allowed("10.0.0.1")


def test_host_dynamic_allows_any_address():
    user = parse_config("[u]\nsecret=x\nhost=dynamic\ndevices=SIP/1\n", "f", require_ami=False).users["u"]
    assert user.host_allowed("203.0.113.9") and user.host_allowed("2001:db8::1")


@pytest.mark.parametrize("channel, device", [
    ("PJSIP/100-0000001a", "PJSIP/100"),
    ("SIP/150010001-00000004", "SIP/150010001"),
    ("SIP/voipgrid-siproute-dev-0000000c", "SIP/voipgrid-siproute-dev"),
    ("IAX2/100-12345", "IAX2/100"),
    ("DAHDI/1-1", "DAHDI/1"),
    ("Local/100@from-internal-00000000;1", "Local/100@from-internal"),
    ("Local/+15559870003@from-internal-00000006;2", "Local/+15559870003@from-internal"),
    ("PJSIP/trunk", "PJSIP/trunk"),
])
def test_device_of_channel(channel, device):
    assert ctinotify.device_of_channel(channel) == device


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(HERE, "ctinotify.py")] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                          universal_newlines=True, **kwargs)


def test_check_prints_the_effective_config_with_secrets_masked():
    result = run_cli("check", "-c", OFFICE_CONF)
    assert result.returncode == 0, result.stderr
    assert "[alice]" in result.stdout and "devices = PJSIP/100" in result.stdout
    assert "alice-secret" not in result.stdout + result.stderr
    assert "ctitest" not in result.stdout.replace("username = ctitest", "")
    assert "secret = ********" in result.stdout


def test_check_and_run_refuse_a_broken_config(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[ami]\nusername = u\nsecret = s\nport = http\n[x]\nsecret = 1\n")
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(bad))
        assert result.returncode == 1
        assert "%s:4: [ami] port: 'http' is not a number" % bad in result.stderr
        assert "%s:5: [x]: the user has neither devices nor extensions" % bad in result.stderr


# ---------------------------------------------------------------------------
# AMI parser
# ---------------------------------------------------------------------------

def parse_all(data, chunks=None, expect_banner=True):
    parser = AmiParser(expect_banner=expect_banner)
    messages = []
    if chunks is None:
        messages += parser.feed(data)
    else:
        pos = 0
        for size in chunks:
            messages += parser.feed(data[pos:pos + size])
            pos += size
        messages += parser.feed(data[pos:])
    return parser, [(dict(m), m.repeated, m.body) for m in messages]


SMALL_TRACES = ("a_inbound_answered", "c_inbound_busy", "w_login_challenge_md5",
                "v_login_wrong_secret", "u_events_toggle", "cacofonisk/simple__ab_success_a_hangup")


@pytest.mark.parametrize("name", [n for n in all_trace_names() if n != "t_load"])
def test_parser_gives_the_same_messages_at_random_splits(name):
    data = read_trace(name)
    parser, whole = parse_all(data)
    assert parser.banner.startswith("Asterisk Call Manager/")
    assert whole and not parser.problems
    assert len(whole) == data.count(b"\r\n\r\n")
    rng = random.Random(name)
    sizes = [rng.randint(1, 700) for _ in range(len(data) // 300 + 1)]
    assert parse_all(data, sizes)[1] == whole


@pytest.mark.parametrize("name", SMALL_TRACES)
def test_parser_byte_by_byte(name):
    data = read_trace(name)
    assert parse_all(data, [1] * len(data))[1] == parse_all(data)[1]


def test_parser_keeps_a_trailing_partial_message_until_it_completes():
    parser = AmiParser(expect_banner=False)
    assert [dict(m) for m in parser.feed(b"Event: A\r\n\r\nEvent: B\r\nKey: v")] == [{"Event": "A"}]
    assert parser.feed(b"al\r\n") == []
    assert [dict(m) for m in parser.feed(b"\r\n")] == [{"Event": "B", "Key": "val"}]


def test_parser_accepts_bare_lf_and_mixed_line_ends():
    data = b"Asterisk Call Manager/5.0.1\nEvent: A\nX: 1\n\nEvent: B\r\nY: 2\n\r\nEvent: C\n\n"
    _, messages = parse_all(data)
    assert [m[0] for m in messages] == [{"Event": "A", "X": "1"}, {"Event": "B", "Y": "2"},
                                        {"Event": "C"}]


def test_parser_keeps_repeated_keys_in_order_and_colons_in_values():
    data = (b"Event: Newchannel\r\nChanVariable: A=1\r\nChanVariable: B=2: x\r\n"
            b"Message: a: b: c\r\nChanVariable: C=3\r\nEmpty:\r\nAlso: \r\n\r\n")
    msg = AmiParser(expect_banner=False).feed(data)[0]
    assert msg["ChanVariable"] == "A=1"
    assert msg.getall("ChanVariable") == ["A=1", "B=2: x", "C=3"]
    assert msg["Message"] == "a: b: c"
    assert msg["Empty"] == "" and msg["Also"] == ""
    assert msg.getall("Missing") == []


def test_parser_response_follows_body_with_blank_lines():
    data = (b"Response: Follows\r\nPrivilege: Command\r\nActionID: 7\r\n"
            b"Name/username: Host\r\n\r\n100/100: 10.0.0.1\r\n--END COMMAND--\r\n\r\n"
            b"Event: After\r\n\r\n")
    messages = AmiParser(expect_banner=False).feed(data)
    assert messages[0]["Response"] == "Follows" and messages[0]["ActionID"] == "7"
    assert messages[0].body == ["Name/username: Host", "", "100/100: 10.0.0.1"]
    assert dict(messages[1]) == {"Event": "After"}
    split = AmiParser(expect_banner=False)
    got = []
    for i in range(len(data)):
        got += split.feed(data[i:i + 1])
    assert [m.body for m in got] == [m.body for m in messages]


def test_parser_decodes_utf8_after_framing_and_replaces_invalid_bytes():
    name = "Jos\u00e9 M\u00fcller \u4e2d".encode("utf-8")
    data = b"Event: X\r\nCallerIDName: " + name + b"\r\nBad: \xff\xfeok\r\n\r\n"
    parser = AmiParser(expect_banner=False)
    messages = []
    for i in range(len(data)):  # splits every multi-byte character
        messages += parser.feed(data[i:i + 1])
    assert messages[0]["CallerIDName"] == "Jos\u00e9 M\u00fcller \u4e2d"
    assert messages[0]["Bad"] == "\ufffd\ufffdok"


def test_parser_skips_an_oversized_message_and_stays_usable():
    parser = AmiParser(expect_banner=False, max_message_bytes=1000)
    big = b"Event: Big\r\nJunk: " + b"x" * 5000 + b"\r\n\r\n"
    messages = []
    for i in range(0, len(big), 100):
        messages += parser.feed(big[i:i + 100])
    messages += parser.feed(b"Event: Next\r\n\r\n")
    assert [dict(m) for m in messages] == [{"Event": "Next"}]
    assert parser.problems and "skipped a message" in parser.problems[0]
    whole = AmiParser(expect_banner=False, max_message_bytes=1000)
    assert [dict(m) for m in whole.feed(big + b"Event: Next\r\n\r\n")] == [{"Event": "Next"}]
    assert len(parser._buffer) < 2000


def test_parser_rejects_a_peer_that_is_not_asterisk():
    with pytest.raises(AmiProtocolError):
        AmiParser().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(AmiProtocolError):
        AmiParser().feed(b"x" * 1000)


def reference_block(block):
    """The message rules, written plainly: lines end in CRLF or LF, the last
    CR goes, ``Key: Value`` (first value wins, repeats in ``getall``),
    ``Key:`` is an empty value, anything else is a body line."""
    text = block.decode("utf-8", "replace").replace("\r\n", "\n")
    if text.endswith("\r"):
        text = text[:-1]
    pairs, body = [], []
    for line in text.split("\n"):
        if ": " in line:
            pairs.append(tuple(line.split(": ", 1)))
        elif line.endswith(":") and " " not in line:
            pairs.append((line[:-1], ""))
        elif line:
            body.append(line)
    first = {}
    for key, value in pairs:
        first.setdefault(key, value)
    return first, {k: [v for kk, v in pairs if kk == k] for k in first}, body or None


def test_parser_block_rules_hold_on_every_path():
    # The parser takes a one-pass path for plain CRLF "Key: Value" blocks
    # and the general rules for the rest; both must give the same message.
    rng = random.Random(5)
    parts = [b"Event: X", b"A: 1", b"A: 2", b"B: x: y", b"C:", b"C :", b": v", b"junk",
             b"", b"\r", b"\xc3\xa9", b"\xff", b"Key: \rv"]
    for _ in range(3000):
        lines = [rng.choice(parts) for _ in range(rng.randint(1, 6))]
        block = b"".join(line + rng.choice([b"\r\n", b"\r\n", b"\n"]) for line in lines)
        block = block[:-1]  # the parser's blocks end before the final LF
        msg = ctinotify.parse_ami_block(block)
        first, repeated, body = reference_block(block)
        assert dict(msg) == first, block
        assert {k: msg.getall(k) for k in msg} == repeated, block
        assert msg.body == body, block


DEFERRED_BLOCKS = [
    b"Event: VarSet\r\nChannel: PJSIP/100-00000001\r\nVariable: X\r\nValue: a: b",
    b"Event: VarSet\r\nA: 1\r\nA: 2\r\nEmpty:\r\nbody line\r\nActionID: 9",
    b"Event: VarSet\r\nBare: lf\nKey: v",
    b"Event: VarSet",
    b"Event: RTCPSent\r\nEvent: Other\r\nX: \xc3\xa9",
]


def deferred_and_eager(block):
    deferred = AmiParser(expect_banner=False).feed(block + b"\r\n\r\n")[0]
    assert type(deferred) is not AmiMessage  # the bulk event is deferred...
    return deferred, ctinotify._parse_message(block.decode("utf-8"), defer=False)  # ...this not


ACCESSES = [
    lambda m: m.get("Event"), lambda m: m.get("ActionID"), lambda m: m.get("Missing", "d"),
    lambda m: m.get("Value"), lambda m: "ActionID" in m, lambda m: "A" in m,
    lambda m: "Response" in m, lambda m: 5 in m, lambda m: m.event, lambda m: m.response,
    lambda m: m["Event"], lambda m: m["A"] if "A" in m else m.get("Key"),
    lambda m: len(m), lambda m: bool(m), lambda m: list(m), lambda m: list(reversed(m)),
    lambda m: list(m.keys()), lambda m: list(m.values()), lambda m: list(m.items()),
    lambda m: dict(m), lambda m: {**m}, lambda m: repr(m), lambda m: m.copy(),
    lambda m: m.getall("A"), lambda m: m.getall("Event"), lambda m: m.repeated,
    lambda m: m.body, lambda m: m.to_bytes(), lambda m: json.dumps(m),
    lambda m: dict(copy.copy(m)), lambda m: dict(pickle.loads(pickle.dumps(m))),
    lambda m: (m == dict(m), m != {}, {} == m),
    lambda m: (m.setdefault("New", "n"), dict(m)), lambda m: (m.pop("Event"), dict(m)),
    lambda m: (m.update(Z="z"), dict(m)), lambda m: (m.add("A", "3"), m.getall("A")),
    lambda m: (m.__setitem__("A", "x"), dict(m)), lambda m: (m.clear(), dict(m)),
]


@pytest.mark.parametrize("block", DEFERRED_BLOCKS)
def test_a_deferred_bulk_event_reads_exactly_like_a_parsed_one(block):
    for access in ACCESSES:
        outcomes = []
        for msg in deferred_and_eager(block):
            try:
                outcomes.append(("ok", access(msg)))
            except KeyError as e:
                outcomes.append(("KeyError", e.args))
        assert outcomes[0] == outcomes[1], (block, outcomes)
    deferred, eager = deferred_and_eager(block)
    with pytest.raises(KeyError):
        deferred["Missing"]
    assert isinstance(copy.copy(deferred), AmiMessage) and deferred == eager
    one, two = AmiParser(expect_banner=False).feed(block + b"\r\n\r\n" + block + b"\r\n\r\n")
    assert one == two and not one != two  # both still unsplit
    assert eager == AmiParser(expect_banner=False).feed(block + b"\r\n\r\n")[0]


def test_deferred_events_are_none_the_engine_reads():
    assert not ctinotify.DEFERRED_EVENTS & set(CallEngine()._handlers)


def test_parser_garbage_raises_nothing_but_its_own_error():
    rng = random.Random(1234)
    alphabet = b"\r\n:\x00 \xffEvent: Response: Follows--END COMMAND--ab"
    for _ in range(1500):
        parser = AmiParser(expect_banner=rng.random() < 0.5, max_message_bytes=300)
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 600)))
        try:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 50)
                for msg in parser.feed(data[pos:pos + step]):
                    assert isinstance(msg, AmiMessage)
                pos += step
        except AmiProtocolError:
            pass


def test_encode_action_refuses_header_injection():
    assert ctinotify.encode_action("Ping", [("ActionID", "1")]) == \
        b"Action: Ping\r\nActionID: 1\r\n\r\n"
    with pytest.raises(ValueError):
        ctinotify.encode_action("Originate", [("CallerID", "x\r\nAction: Hangup")])


# ---------------------------------------------------------------------------
# AMI session
# ---------------------------------------------------------------------------

def test_session_plain_login_and_events():
    session = AmiSession("ctitest", "s3cret", now=0.0)
    assert session.receive_data(b"Asterisk Call Manager/11.0.0\r\n", 0.0) == []
    sent = session.data_to_send()
    assert sent == (b"Action: Login\r\nActionID: ctinotify-1\r\nUsername: ctitest\r\n"
                    b"Secret: s3cret\r\nEvents: on\r\n\r\n")
    assert b"s3cret" not in session.redacted(sent)
    out = session.receive_data(b"Response: Success\r\nActionID: ctinotify-1\r\n"
                               b"Message: Authentication accepted\r\n\r\n"
                               b"Event: FullyBooted\r\nStatus: Fully Booted\r\n\r\n", 0.1)
    assert isinstance(out[0], ctinotify.AmiLoggedIn) and out[0].banner.endswith("11.0.0")
    assert out[1]["Event"] == "FullyBooted"


def test_session_md5_challenge_login():
    session = AmiSession("ctitest", "ctitest", auth="md5")
    session.receive_data(b"Asterisk Call Manager/11.0.0\r\n", 0.0)
    assert session.data_to_send() == (b"Action: Challenge\r\nActionID: ctinotify-1\r\n"
                                      b"AuthType: MD5\r\n\r\n")
    session.receive_data(b"Response: Success\r\nActionID: ctinotify-1\r\n"
                         b"Challenge: 840415273\r\n\r\n", 0.0)
    sent = session.data_to_send().decode()
    key = hashlib.md5(b"840415273ctitest").hexdigest()
    assert "AuthType: MD5\r\nUsername: ctitest\r\nKey: %s\r\n" % key in sent
    assert "Secret" not in sent


def test_session_reports_a_refused_login_with_asterisks_reason():
    # The exact bytes Asterisk 22 answered a wrong secret with.
    reply = read_trace("v_login_wrong_secret").replace(b"rec-111", b"ctinotify-1")
    session = AmiSession("ctitest", "wrong")
    out = session.receive_data(reply, 0.0)
    assert len(out) == 1 and isinstance(out[0], ctinotify.AmiLoginFailed)
    assert out[0].reason == "Authentication failed"


def test_session_pings_and_declares_a_silent_link_dead():
    session = AmiSession("u", "s", ping_interval=20)
    session.receive_data(b"Asterisk Call Manager/11.0.0\r\n", 0.0)
    session.data_to_send()
    session.receive_data(b"Response: Success\r\nActionID: ctinotify-1\r\n\r\n", 1.0)
    assert session.next_deadline() == 21.0
    assert session.poll(20.0) is None and session.data_to_send() == b""
    assert session.poll(21.0) is None
    assert session.data_to_send() == b"Action: Ping\r\nActionID: ctinotify-2\r\n\r\n"
    session.receive_data(b"Response: Success\r\nActionID: ctinotify-2\r\nPing: Pong\r\n\r\n", 22.0)
    assert session.poll(30.9) is None
    assert session.poll(41.0) is None and session.data_to_send().startswith(b"Action: Ping")
    assert session.poll(50.9) is None
    assert "no answer to Ping" in session.poll(51.0)


def test_session_login_timeout():
    session = AmiSession("u", "s", now=100.0)
    assert session.poll(100.0 + ctinotify.AMI_LOGIN_TIMEOUT_S - 1) is None
    assert "no login response" in session.poll(100.0 + ctinotify.AMI_LOGIN_TIMEOUT_S)


def test_session_passes_event_lists_through_in_order():
    session = AmiSession("u", "s")
    session.receive_data(b"Asterisk Call Manager/11.0.0\r\n", 0.0)
    session.receive_data(b"Response: Success\r\nActionID: ctinotify-1\r\n\r\n", 0.0)
    action_id = session.send_action("CoreShowChannels")
    data = ("Response: Success\r\nActionID: {0}\r\nEventList: start\r\n\r\n"
            "Event: CoreShowChannel\r\nActionID: {0}\r\nChannel: PJSIP/100-1\r\n\r\n"
            "Event: CoreShowChannelsComplete\r\nActionID: {0}\r\nEventList: Complete\r\n\r\n"
            ).format(action_id).encode()
    out = session.receive_data(data, 0.0)
    assert [m.get("Event") or m.get("Response") for m in out] == \
        ["Success", "CoreShowChannel", "CoreShowChannelsComplete"]
    assert action_id not in session._pending


# ---------------------------------------------------------------------------
# Call engine: golden notifications per recorded scenario
# ---------------------------------------------------------------------------

def golden_path(name):
    return os.path.join(GOLDEN, name + ".jsonl")


def load_golden(name):
    with open(golden_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", BASIC_SCENARIOS)
def test_golden_notifications(name):
    got = replay(name)
    if os.environ.get("CTINOTIFY_WRITE_GOLDEN"):
        with open(golden_path(name), "w", encoding="utf-8") as f:
            for item in got:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    assert got == load_golden(name)


#: Manifest outcome texts (tests/traces/*.json) -> the hangup reason a user
#: with that outcome must get.
MANIFEST_OUTCOMES = {
    "answered": "completed",
    "answered (outgoing internal)": "completed",
    "answered (outgoing external)": "completed",
    "missed (no-answer timeout)": "noanswer",
    "busy": "busy",
    "missed (caller cancelled)": "cancelled",
    "answered elsewhere (ring group)": "answered_elsewhere",
}
OFFICE_USERS = {"100": "alice", "101": "bob", "102": "carol", "103": "dave"}


@pytest.mark.parametrize("name", BASIC_SCENARIOS)
def test_goldens_agree_with_the_manifest(name):
    """An independent reading of the manifest: who is told, and how it ended."""
    with open(os.path.join(TRACES, name + ".json")) as f:
        manifest = json.load(f)
    golden = load_golden(name)
    (call,) = manifest["calls"]
    involved = {OFFICE_USERS[who]: outcome for who, outcome in call["outcome"].items()
                if who in OFFICE_USERS}
    caller_num = call["caller"].split()[0]
    if caller_num in OFFICE_USERS:
        involved.setdefault(OFFICE_USERS[caller_num], call["outcome"][caller_num])
    assert {e["client"] for e in golden} == set(involved)
    for user, outcome in involved.items():
        events = [e for e in golden if e["client"] == user]
        first, last = events[0], events[-1]
        assert first["event"] == ("outgoing" if user == OFFICE_USERS.get(caller_num)
                                  else "incoming")
        assert [e["event"] for e in events].count("hangup") == 1 and last["event"] == "hangup"
        assert last["reason"] == MANIFEST_OUTCOMES[outcome]
        assert len({e["call"] for e in events}) == 1
        if first["event"] == "incoming":
            assert first["from"]["num"] == caller_num
            assert first["dialed"] == call["dialed"]
        else:
            assert first["dialed"] == call["dialed"]
        pickups = [e for e in events if e["event"] == "pickup"]
        if call["answered_by"]:
            assert pickups and pickups[0]["answered_by"]["num"] == call["answered_by"]
        else:
            assert not pickups
        if last["reason"] == "noanswer":
            assert "timeout" in [e["event"] for e in events]
        if last["reason"] == "busy":
            assert "busy" in [e["event"] for e in events]


@pytest.mark.parametrize("name", all_trace_names())
def test_every_trace_replays_and_leaves_no_state(name):
    """After a recording whose calls all ended, the engine holds nothing."""
    engine = CallEngine(Directory(office().users.values()))
    parser = AmiParser()
    clock = ctinotify.TraceClock()
    announced, hangups = {}, {}
    for msg in parser.feed(read_trace(name)):
        for note in engine.handle(msg, clock.observe(msg)):
            key = (note.user, note.fields["call"], note.fields["direction"])
            if note.kind in ("incoming", "outgoing"):
                announced[key] = announced.get(key, 0) + 1
            elif note.kind == "hangup":
                hangups[key] = hangups.get(key, 0) + 1
                assert note.fields["duration"] >= 0 and note.fields["talk_time"] >= 0
    if name == "s_connect_midcall":
        return  # begins mid-call: the resync of issue 3 covers it
    assert announced == hangups and all(v == 1 for v in announced.values())
    assert not engine.channels and not engine.user_calls and not engine.calls


def feed(engine, text, now):
    return engine.handle(AmiParser(expect_banner=False).feed(text.encode())[0], now)


def test_engine_durations_come_from_the_clock_it_is_given():
    """Message i arrives at 1000 + 10*i s: durations follow that clock exactly."""
    engine = CallEngine(Directory(office().users.values()))
    messages = AmiParser().feed(read_trace("a_inbound_answered"))
    times = {}
    notes = []
    for i, msg in enumerate(messages):
        now = 1000.0 + 10 * i
        for note in engine.handle(msg, now):
            times[note.kind] = now
            notes.append(note)
    assert [n.kind for n in notes] == ["incoming", "pickup", "hangup"]
    hangup = notes[-1]
    assert hangup.fields["duration"] == times["hangup"] - times["incoming"]
    assert hangup.fields["talk_time"] == times["hangup"] - times["pickup"]
    assert hangup.fields["time"] == ctinotify.iso_time(times["hangup"])
    assert hangup.record["answered"] is True
    assert hangup.record["start"] == ctinotify.iso_time(times["incoming"])
    assert hangup.record["answer"] == ctinotify.iso_time(times["pickup"])


def test_engine_link_lost_ends_every_call_with_reason_unknown():
    engine = CallEngine(Directory(office().users.values()))
    notes = []
    for msg in AmiParser().feed(read_trace("a_inbound_answered")):
        notes += engine.handle(msg, 10.0)
        if msg.get("Event") == "DialBegin":
            break
    assert [n.kind for n in notes] == ["incoming"]
    lost = engine.link_lost(25.0)
    assert [(n.user, n.kind, n.fields["reason"], n.fields["duration"]) for n in lost] == \
        [("alice", "hangup", "unknown", 15)]
    assert not engine.channels and not engine.user_calls
    assert engine.link_lost(26.0) == []


def test_engine_ignores_events_it_does_not_need():
    engine = CallEngine()
    assert feed(engine, "Event: VarSet\r\nChannel: PJSIP/1-1\r\nUniqueid: 1.1\r\n\r\n", 0) == []
    assert not engine.channels


# ---------------------------------------------------------------------------
# Client protocol
# ---------------------------------------------------------------------------

HOSTILE_VALUES = ["", "plain", "John Customer", 'say "hi"', "a=b", "back\\slash",
                  "line\r\nEVENT incoming call=forged", "nul\x00byte", "tab\there",
                  "\u2028sep\u2029", "nel\x85", "\x1b[31mred", "caf\u00e9 \u4e2d",
                  "x" * 3000, "trailing\\"]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_text_values_stay_on_one_line_and_parse_back(value):
    fields = {"call": "1.2", "from": {"num": value, "name": value}, "reason": value}
    line = ctinotify.encode_notification(fields | {"event": "incoming"}
                                         if sys.version_info >= (3, 9)
                                         else dict(fields, event="incoming"), "text")
    text = line.decode("utf-8")
    assert text.endswith("\r\n") and text.count("\n") == 1 and text.count("\r") == 1
    assert len(text[:-2].splitlines()) == 1
    tag, kind, values = ctinotify.parse_text_line(text[:-2])
    assert (tag, kind) == ("EVENT", "incoming")
    assert values == {"call": "1.2", "from_num": value, "from_name": value, "reason": value}


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_json_lines_stay_on_one_line_and_are_valid(value):
    data = ctinotify.encode_notification({"event": "incoming", "from": {"name": value}}, "json")
    text = data.decode("utf-8")
    assert text.endswith("\r\n") and len(text[:-2].splitlines()) == 1
    assert json.loads(text)["from"]["name"] == value


def session_users():
    return ctinotify.ServerView(office().users)


def test_client_session_login_and_commands():
    users = session_users()
    session = ctinotify.ClientSession("127.0.0.1")
    assert session.greeting().startswith("CTINOTIFY/1 ctinotify ")
    assert session.handle_line("EVENTS ALL", users) == ["ERR 403 login first"]
    assert session.handle_line("PING", users) == ["OK PONG"]
    assert session.handle_line("", users) == []
    assert session.handle_line("nonsense", users) == ["ERR 400 unknown command, try HELP"]
    assert session.handle_line("login alice wrong", users) == ["ERR 401 login failed"]
    assert session.handle_line("LOGIN nobody alice-secret", users) == ["ERR 401 login failed"]
    assert session.failed_logins == 2 and session.user is None
    assert not session.wants("incoming")
    assert session.handle_line("LOGIN alice alice-secret", users)[0].startswith(
        "OK logged in as alice")
    assert session.wants("incoming") and session.wants("hold")
    assert session.handle_line("LOGIN alice alice-secret", users)[0].startswith("ERR 409")
    assert session.handle_line("events incoming, hangup", users) == ["OK events=incoming,hangup"]
    assert session.wants("hangup") and not session.wants("pickup")
    assert session.handle_line("EVENTS teleport", users)[0].startswith("ERR 400 unknown event")
    assert session.handle_line("EVENTS", users)[0].startswith("ERR 400 usage")
    assert session.handle_line("EVENTS all", users)[0].startswith("OK events=incoming,outgoing")
    assert session.handle_line("FORMAT json", users) == ["OK format=json"]
    assert session.handle_line("FORMAT xml", users)[0].startswith("ERR 400")
    assert session.handle_line("HELP", users)[0].startswith("OK commands: LOGIN")
    assert session.handle_line("QUIT", users) == ["OK bye"] and session.closing


def test_client_session_events_limited_to_the_users_kinds():
    users = ctinotify.ServerView(parse_config(
        "[u]\nsecret=x\ndevices=SIP/1\nevents=incoming, hangup\n", "f", require_ami=False).users)
    session = ctinotify.ClientSession("10.0.0.1")
    session.handle_line("LOGIN u x", users)
    assert session.handle_line("EVENTS pickup", users) == \
        ["ERR 403 event kind pickup not allowed for u"]
    assert session.handle_line("EVENTS ALL", users) == ["OK events=incoming,hangup"]


def test_client_session_refuses_a_host_not_allowed_and_a_secret_with_spaces_works():
    users = ctinotify.ServerView(parse_config(
        "[u]\nsecret=two words\nhost=192.168.0.0/16\ndevices=SIP/1\n", "f", require_ami=False).users)
    outside = ctinotify.ClientSession("10.1.1.1")
    assert outside.handle_line("LOGIN u two words", users) == ["ERR 401 login failed"]
    inside = ctinotify.ClientSession("192.168.4.4")
    assert inside.handle_line("LOGIN u two words", users)[0].startswith("OK")


# ---------------------------------------------------------------------------
# Command line: replay and record
# ---------------------------------------------------------------------------

def test_replay_command_prints_the_golden_json_lines():
    result = run_cli("replay", trace_path("g_ringgroup"), "-c", OFFICE_CONF)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == load_golden("g_ringgroup")


def test_replay_honours_each_users_event_kinds(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[alice]\nsecret=x\ndevices=PJSIP/100\nevents=incoming,hangup\n")
    result = run_cli("replay", trace_path("a_inbound_answered"), "-c", str(conf))
    assert [json.loads(l)["event"] for l in result.stdout.splitlines()] == ["incoming", "hangup"]


def test_replay_of_an_unconfigured_device_prints_nothing(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[zed]\nsecret=x\ndevices=PJSIP/999\n")
    result = run_cli("replay", trace_path("e_internal_answered"), "-c", str(conf))
    assert result.returncode == 0 and result.stdout == ""


# ---------------------------------------------------------------------------
# End to end: the daemon as a process, a fake Asterisk, real TCP clients
# ---------------------------------------------------------------------------

class Daemon:
    """ctinotify.py run, as a child process, with its log collected."""

    def __init__(self, tmp_path, ami_port, users=None, general="", ami=""):
        self.config = tmp_path / "ctinotify.conf"
        with open(OFFICE_CONF) as f:
            office_text = f.read()
        users_text = users if users is not None else office_text.split("[alice]", 1)[1]
        users_text = users_text if users is not None else "[alice]" + users_text
        self.config.write_text(
            "[general]\nbind = 127.0.0.1\nport = 0\nloglevel = debug\n%s\n"
            "[ami]\nhost = 127.0.0.1\nport = %d\nusername = ctitest\nsecret = ctitest\n"
            "reconnect_max = 2\n%s\n%s" % (general, ami_port, ami, users_text))
        os.chmod(str(self.config), 0o600)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ctinotify.py"), "run", "-c", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.log = []
        self._lines = queue.Queue()
        threading.Thread(target=self._read_log, daemon=True).start()
        line = self.wait_log(r"listening for clients on \S+ port (\d+)")
        self.port = int(re.search(r"port (\d+)", line).group(1))

    def _read_log(self):
        for line in self.proc.stdout:
            self.log.append(line)
            self._lines.put(line)

    def wait_log(self, pattern, timeout=10.0):
        deadline = time.monotonic() + timeout
        for line in list(self.log):
            if re.search(pattern, line):
                return line
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no log line matching %r in:\n%s"
                                     % (pattern, "".join(self.log)))
            if re.search(pattern, line):
                return line

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Client:
    """A line-protocol client, as nc would be."""

    def __init__(self, port, login=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.line()
        if login:
            self.send("LOGIN %s" % login)
            reply = self.line()
            assert reply.startswith("OK logged in"), reply
            self.status = self.line()

    def send(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def line(self, timeout=10.0):
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; pending %r" % self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8")

    def lines_until(self, predicate, timeout=10.0):
        lines = []
        while True:
            lines.append(self.line(timeout))
            if predicate(lines[-1]):
                return lines

    def events_until_pong(self):
        """Everything received before the reply to a PING sent now."""
        self.send("PING")
        return self.lines_until(lambda l: l == "OK PONG")[:-1]

    def closed(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


@pytest.fixture
def fake():
    server = FakeAsterisk().start()
    yield server
    server.stop()


@pytest.fixture
def daemon_factory(tmp_path, fake):
    started = []

    def start(**kwargs):
        daemon = Daemon(tmp_path, fake.port, **kwargs)
        started.append(daemon)
        daemon.wait_log("ami: logged in as ctitest")
        return daemon
    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def clients():
    opened = []

    def connect(port, login=None):
        client = Client(port, login)
        opened.append(client)
        return client
    yield connect
    for client in opened:
        client.close()


def event_kinds(lines):
    return [ctinotify.parse_text_line(l)[1] for l in lines if l.startswith("EVENT ")]


def test_e2e_each_user_sees_only_their_own_calls(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    daemon.wait_log("ami: logged in as ctitest")
    alice = clients(daemon.port, "alice alice-secret")
    bob = clients(daemon.port, "bob bob-secret")
    carol = clients(daemon.port, "carol carol-secret")
    assert alice.status.startswith("STATUS pbx=up")
    fake.send_trace(trace_path("a_inbound_answered"))
    alice_lines = alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    assert event_kinds(alice_lines) == ["incoming", "pickup", "hangup"]
    _, _, incoming = ctinotify.parse_text_line(alice_lines[0])
    assert incoming["from_num"] == "+15551230001" and incoming["from_name"] == "John Customer"
    assert incoming["to_num"] == "100" and incoming["device"] == "PJSIP/100"
    assert bob.events_until_pong() == [] and carol.events_until_pong() == []

    fake.send_trace(trace_path("e_internal_answered"))  # alice calls bob
    alice_lines = alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    bob_lines = bob.lines_until(lambda l: l.startswith("EVENT hangup"))
    assert event_kinds(alice_lines) == ["outgoing", "pickup", "hangup"]
    assert event_kinds(bob_lines) == ["incoming", "pickup", "hangup"]
    assert ctinotify.parse_text_line(bob_lines[0])[2]["from_name"] == "Alice Smith"
    assert carol.events_until_pong() == []


def test_e2e_json_format_and_event_filter(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    alice.send("FORMAT json")
    assert alice.line() == "OK format=json"
    alice.send("EVENTS incoming,hangup")
    assert alice.line() == "OK events=incoming,hangup"
    fake.send_trace(trace_path("b_inbound_noanswer"))
    lines = alice.lines_until(lambda l: '"hangup"' in l)
    events = [json.loads(l) for l in lines]
    assert [e["event"] for e in events] == ["incoming", "hangup"]
    golden = [dict(e) for e in load_golden("b_inbound_noanswer") if e["event"] in
              ("incoming", "hangup")]
    for got, want in zip(events, golden):
        want.pop("client")
        assert set(got) == set(want)
        assert {k: v for k, v in got.items() if k not in ("time", "duration", "talk_time")} == \
            {k: v for k, v in want.items() if k not in ("time", "duration", "talk_time")}


def test_e2e_wrong_secret_wrong_host_and_no_login(fake, daemon_factory, clients):
    users = ("[alice]\nsecret = alice-secret\nhost = 127.0.0.1\ndevices = PJSIP/100\n"
             "[faraway]\nsecret = far\nhost = 10.9.9.9\ndevices = PJSIP/100\n")
    daemon = daemon_factory(users=users)
    fake.wait_for_logins(1)
    wrong = clients(daemon.port)
    wrong.send("LOGIN alice not-the-secret")
    assert wrong.line() == "ERR 401 login failed"
    far = clients(daemon.port)
    far.send("LOGIN faraway far")
    assert far.line() == "ERR 401 login failed"
    anonymous = clients(daemon.port)
    watcher = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path("a_inbound_answered"))
    watcher.lines_until(lambda l: l.startswith("EVENT hangup"))
    for client in (wrong, far, anonymous):
        assert client.events_until_pong() == []
    log = "".join(daemon.log)
    assert "login as 'alice' refused: wrong secret" in log
    assert "login as 'faraway' refused: address not allowed" in log
    assert "not-the-secret" not in log and "alice-secret" not in log


def test_e2e_three_failed_logins_disconnect(fake, daemon_factory, clients):
    daemon = daemon_factory()
    client = clients(daemon.port)
    for _ in range(3):
        client.send("LOGIN alice nope")
        assert client.line() == "ERR 401 login failed"
    assert client.closed()


def test_e2e_login_timeout_closes_idle_connections(fake, daemon_factory, clients):
    daemon = daemon_factory(general="login_timeout = 1")
    idle = clients(daemon.port)
    started = time.monotonic()
    assert idle.line(timeout=5) == "ERR 408 login timeout"
    assert idle.closed() and time.monotonic() - started < 5
    daemon.wait_log("no login within 1 s")


def test_e2e_ami_drop_reconnects_and_tells_clients(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    # A call is ringing when the link dies: it must not ring forever.
    events = trace_events(read_trace("a_inbound_answered"))
    ringing = [e for e in events if not e.startswith((b"Event: Hangup", b"Event: Bridge"))]
    cut = next(i for i, e in enumerate(ringing) if e.startswith(b"Event: DialState"))
    fake.send(b"".join(ringing[:cut + 1]))
    assert event_kinds([alice.line()]) == ["incoming"]
    fake.drop()
    down = alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    assert down[0].startswith("STATUS pbx=down")
    assert ctinotify.parse_text_line(down[-1])[2]["reason"] == "unknown"
    fake.wait_for_logins(2)
    assert alice.line().startswith("STATUS pbx=up")
    daemon.wait_log("ami: connection closed by Asterisk; reconnecting in 1 s")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]


def test_e2e_refused_ami_login_is_retried_with_backoff(tmp_path, clients):
    server = FakeAsterisk(refuse_logins=True).start()
    daemon = Daemon(tmp_path, server.port)
    try:
        daemon.wait_log("login as ctitest refused by Asterisk: Authentication failed; "
                        "reconnecting in 1 s")
        daemon.wait_log("refused by Asterisk: Authentication failed; reconnecting in 2 s")
        assert daemon.proc.poll() is None
        client = clients(daemon.port, "alice alice-secret")
        assert client.status.startswith("STATUS pbx=down")
    finally:
        daemon.stop()
        server.stop()


def test_e2e_md5_login(tmp_path, clients):
    server = FakeAsterisk().start()
    daemon = Daemon(tmp_path, server.port, users="", ami="auth = md5")
    try:
        server.wait_for_logins(1)
        login = [a for a in server.actions if a.get("Action") == "Login"][0]
        assert login["AuthType"] == "MD5" and "Secret" not in login
    finally:
        daemon.stop()
        server.stop()


def test_e2e_sigterm_sends_a_closing_line_and_exits_0(fake, daemon_factory, clients):
    daemon = daemon_factory()
    alice = clients(daemon.port, "alice alice-secret")
    daemon.proc.send_signal(signal.SIGTERM)
    assert alice.line().startswith("STATUS server=stopping")
    assert alice.closed()
    assert daemon.proc.wait(10) == 0


def test_e2e_a_client_that_sends_a_huge_line_is_cut_off(fake, daemon_factory, clients):
    daemon = daemon_factory()
    hog = clients(daemon.port)
    hog.sock.sendall(b"A" * (ctinotify.MAX_CLIENT_LINE_BYTES + 10))
    assert hog.line() == "ERR 413 line too long"
    assert hog.closed()
    other = clients(daemon.port, "alice alice-secret")
    assert other.events_until_pong() == []


def test_e2e_calllog_gets_one_line_per_user_and_call(fake, daemon_factory, clients, tmp_path):
    calllog = tmp_path / "calls.jsonl"
    daemon = daemon_factory(general="calllog = %s" % calllog)
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path("e_internal_answered"))
    alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    daemon.wait_log("DEBUG|INFO")  # the log is alive
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [json.loads(l) for l in calllog.read_text().splitlines()]
        if len(records) == 2:
            break
        time.sleep(0.05)
    assert sorted((r["user"], r["direction"], r["reason"]) for r in records) == \
        [("alice", "out", "completed"), ("bob", "in", "completed")]


def test_record_writes_the_received_bytes_and_redacts_the_secret(fake, tmp_path):
    conf = tmp_path / "rec.conf"
    conf.write_text("[ami]\nhost=127.0.0.1\nport=%d\nusername=ctitest\nsecret=ctitest\n"
                    "[x]\nsecret=y\ndevices=SIP/1\n" % fake.port)
    out = tmp_path / "capture.ami"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "ctinotify.py"), "record",
                             str(out), "-c", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fake.wait_for_logins(1)
        fake.send_trace(trace_path("a_inbound_answered"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not out.exists() or
                                               b"Event: Hangup" not in out.read_bytes()):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0
    captured = out.read_bytes()
    assert captured.startswith(b"Asterisk Call Manager/11.0.0\r\nResponse: Success")
    sent = (tmp_path / "capture.ami.sent").read_bytes()
    assert b"Username: ctitest" in sent and b"Secret: ********" in sent
    assert b"Secret: ctitest" not in sent and sent.endswith(b"Action: Logoff\r\n\r\n")
    replayed = run_cli("replay", str(out), "-c", OFFICE_CONF)
    assert [json.loads(l)["event"] for l in replayed.stdout.splitlines()] == \
        ["incoming", "pickup", "hangup"]


# ---------------------------------------------------------------------------
# The README's examples are run, so they cannot drift from the code
# ---------------------------------------------------------------------------

def readme_block(marker):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    after = text.split("<!-- %s -->" % marker, 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1].rstrip("\n").split("\n")


def normalize(line):
    """Wall-clock values differ between a recording and a live run."""
    line = re.sub(r"\btime=\S+", "time=T", line)
    line = re.sub(r"duration=\d+ talk_time=\d+", "duration=D talk_time=D", line)
    return line.replace("ctinotify %s ready" % ctinotify.__version__, "ctinotify V ready")


def test_readme_example_session_is_what_the_daemon_says(fake, daemon_factory):
    block = readme_block("example-session: a_inbound_answered")
    assert block[0] == "$ nc 127.0.0.1 5039"
    daemon = daemon_factory()
    client = Client.__new__(Client)
    client.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    client.buffer = b""
    trace_sent = False
    try:
        for expected in block[1:]:
            if expected.startswith("> "):
                client.send(expected[2:])
                continue
            if expected.startswith("EVENT") and not trace_sent:
                fake.send_trace(trace_path("a_inbound_answered"))
                trace_sent = True
            assert normalize(client.line()) == normalize(expected)
        assert client.closed()
    finally:
        client.close()


def test_readme_json_example_is_the_golden_event():
    (line,) = readme_block("example-json: a_inbound_answered")
    golden = dict(load_golden("a_inbound_answered")[0])
    golden.pop("client")
    assert json.loads(line) == golden
    assert ctinotify.encode_notification(golden, "json").decode().rstrip("\r\n") == line


def test_readme_commands_exist():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(HERE, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    for target in re.findall(r"^make (\w+)", text, re.M):
        assert re.search(r"^%s:" % target, makefile, re.M), target
    for path in re.findall(r"(tests/[\w/.-]+\.(?:ami|conf|py))", text):
        assert os.path.exists(os.path.join(HERE, path)), path
    with open(os.path.join(HERE, ".ci", "run")) as f:
        assert "make test" in f.read()


def test_e2e_asterisk_shutdown_event_means_reconnect(fake, daemon_factory, clients):
    daemon = daemon_factory()
    alice = clients(daemon.port, "alice alice-secret")
    fake.send(b"Event: Shutdown\r\nPrivilege: system,all\r\nShutdown: Cleanly\r\n"
              b"Restart: True\r\n\r\n")
    assert alice.line().startswith("STATUS pbx=down")
    daemon.wait_log(r"Asterisk is shutting down \(Cleanly\); reconnecting in 1 s")
    fake.wait_for_logins(2)
    assert alice.line().startswith("STATUS pbx=up")
