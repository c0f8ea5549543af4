"""Tests for ctinotify: ``make test``.

Recorded AMI traces are the backbone: tests/traces/*.ami are byte-exact
recordings of a real Asterisk 22 (manifests in *.json say what happened),
tests/golden/*.jsonl the notifications every user must receive for them.
End-to-end tests run the daemon as a real process against the fake
Asterisk of tests/fakeami.py, with real TCP clients on 127.0.0.1.
"""

import ast
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import struct
import socket
import ssl
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

    def __init__(self, tmp_path, ami_port, users=None, general="", ami="", preexec_fn=None):
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
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
            preexec_fn=preexec_fn)
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


# ---------------------------------------------------------------------------
# Robustness (issue 4): output buffer limits
# ---------------------------------------------------------------------------

def uniquify(data, tag):
    """The same calls with new identities: every Uniqueid and Linkedid
    (and DestUniqueid, BridgeUniqueid, ...) gets the prefix ``tag-``, which
    Asterisk's own ``system-epoch.seq`` form allows."""
    return re.sub(rb"((?:Uniqueid|Linkedid): )", rb"\1" + tag + b"-", data)


_BIG_TRACES = {}


def big_trace(rounds, names=BASIC_SCENARIOS):
    """``rounds`` copies of the ordinary-call traces, as events only, each
    copy's calls distinct from every other's."""
    key = (rounds, names)
    if key not in _BIG_TRACES:
        events = []
        for i in range(rounds):
            for name in names:
                events += trace_events(uniquify(read_trace(name), b"r%d" % i))
        _BIG_TRACES[key] = b"".join(events)
    return _BIG_TRACES[key]


def expected_events(data, user):
    """(kind, call) of every notification ``user`` must get for ``data``."""
    return [(fields["event"], fields["call"])
            for who, fields in ctinotify.replay_trace(io.BytesIO(data), office().users)
            if who == user]


def raw_client(port, login=None, rcvbuf=None, source=None):
    """A Client whose socket options are set before it connects."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    client = Client.__new__(Client)
    client.sock = sock
    client.buffer = b""
    client.greeting = client.line()
    if login:
        client.send("LOGIN %s" % login)
        reply = client.line()
        assert reply.startswith("OK logged in"), reply
        client.status = client.line()
    return client


class Reader(threading.Thread):
    """Collects a client's EVENT lines in the background until it has ``count``."""

    def __init__(self, client, count):
        super().__init__(daemon=True)
        self.client, self.count = client, count
        self.events, self.error = [], None
        self.start()

    def run(self):
        try:
            while len(self.events) < self.count:
                line = self.client.line(timeout=60)
                if line.startswith("EVENT "):
                    _, kind, fields = ctinotify.parse_text_line(line)
                    self.events.append((kind, fields["call"]))
        except Exception as e:  # reported by the test
            self.error = e


def vm_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


#: The daemon's peak resident memory while 20 MB of AMI go through it and a
#: client stops reading: the interpreter (about 15 MB), the parser's read
#: buffer and one output buffer at its limit.  Without the limits, the
#: client's buffer alone would hold every event of the trace.
RSS_BOUND_KIB = 64 * 1024
SLOW_CLIENT_ROUNDS = 80


def stream_with_a_client_that_never_reads(fake, daemon, clients, reason):
    data = big_trace(SLOW_CLIENT_ROUNDS)
    want = expected_events(data, "alice")
    stuck = raw_client(daemon.port, "alice alice-secret", rcvbuf=4096)
    readers = [Reader(clients(daemon.port, login), len(want))
               for login in ("alice alice-secret", "alice alice-secret")]
    fake.send(data)
    daemon.wait_log(reason, timeout=60)
    for reader in readers:
        reader.join(90)
        assert reader.error is None and reader.events == want
    assert stuck.closed(timeout=30)  # what was queued, then the end
    stuck.close()
    peak = vm_kib(daemon.proc.pid, "VmHWM")
    assert peak < RSS_BOUND_KIB, "daemon peak RSS %d KiB" % peak
    # ... and the others are still served.
    late = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(late.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]


def test_e2e_hard_output_limit_cuts_off_a_client_that_never_reads(fake, daemon_factory, clients):
    daemon = daemon_factory(general="client_buffer_hard = 128k\nclient_buffer_soft = 0")
    fake.wait_for_logins(1)
    stream_with_a_client_that_never_reads(
        fake, daemon, clients,
        r"WARNING client alice@127\.0\.0\.1:\d+: disconnected: output buffer of \d+ bytes "
        r"over the hard limit of 131072: client not reading")


def test_e2e_soft_output_limit_cuts_off_a_client_that_stays_over_it(fake, daemon_factory,
                                                                     clients):
    daemon = daemon_factory(general="client_buffer_hard = 64mb\nclient_buffer_soft = 64k\n"
                                    "client_buffer_soft_seconds = 1")
    fake.wait_for_logins(1)
    stream_with_a_client_that_never_reads(
        fake, daemon, clients,
        r"WARNING client alice@127\.0\.0\.1:\d+: disconnected: output buffer over the soft "
        r"limit of 65536 bytes for 1 s: client not reading")


def test_config_output_buffer_limits():
    base = "[ami]\nusername=u\nsecret=s\n[general]\n"
    config = parse_config(base, "f")
    assert (config.client_buffer_hard, config.client_buffer_soft,
            config.client_buffer_soft_seconds) == (4 * 1024 ** 2, 1024 ** 2, 60)
    config = parse_config(base + "client_buffer_hard = 8mb\nclient_buffer_soft = 512K\n"
                          "client_buffer_soft_seconds = 5\n", "f")
    assert (config.client_buffer_hard, config.client_buffer_soft,
            config.client_buffer_soft_seconds) == (8 * 1024 ** 2, 512 * 1024, 5)
    assert parse_config(base + "client_buffer_hard = 128k\n", "f").client_buffer_soft == 32768
    assert parse_config(base + "client_buffer_soft = 0\n", "f").client_buffer_soft == 0
    for text, fragment in (
            ("client_buffer_hard = lots", ":5: [general] client_buffer_hard: 'lots' is not a size"),
            ("client_buffer_hard = 0", "client_buffer_hard: '0' is out of range, expected 65536"),
            ("client_buffer_hard = 1mb\nclient_buffer_soft = 2mb",
             ":6: [general] client_buffer_soft: 2097152 bytes is more than client_buffer_hard"),
            ("client_buffer_soft_seconds = -1", "client_buffer_soft_seconds: '-1' is out of range")):
        with pytest.raises(ConfigError) as info:
            parse_config(base + text + "\n", "f")
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# Robustness: connection limits, keepalive, running out of descriptors
# ---------------------------------------------------------------------------

def test_config_connection_and_login_limits():
    base = "[ami]\nusername=u\nsecret=s\n[general]\n"
    config = parse_config(base, "f")
    assert (config.max_clients, config.max_clients_per_host) == (1000, 50)
    assert (config.login_fail_delay, config.login_block_after, config.login_block_seconds) == \
        (0.5, 10, 300)
    config = parse_config(base + "max_clients = 5\nmax_clients_per_host = 2\n"
                          "login_fail_delay = 0\nlogin_block_after = 0\n", "f")
    assert (config.max_clients, config.max_clients_per_host) == (5, 2)
    assert (config.login_fail_delay, config.login_block_after) == (0, 0)
    for text, fragment in (("max_clients = 0", ":5: [general] max_clients: '0' is out of range"),
                           ("max_clients_per_host = many", "'many' is not a number"),
                           ("login_block_seconds = 0", "login_block_seconds: '0' is out of range"),
                           ("login_fail_delay = soon", "login_fail_delay: 'soon' is not a number")):
        with pytest.raises(ConfigError) as info:
            parse_config(base + text + "\n", "f")
        assert fragment in str(info.value)


def test_e2e_connections_are_limited_per_address_and_in_total(fake, daemon_factory, clients):
    daemon = daemon_factory(general="max_clients = 5\nmax_clients_per_host = 3")
    first = [clients(daemon.port) for _ in range(3)]
    fourth = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        assert fourth.recv(100) == b"ERR 503 too many connections from your address\r\n"
        assert fourth.recv(100) == b""
    finally:
        fourth.close()
    daemon.wait_log(r"WARNING client 127\.0\.0\.1:\d+: refused: 3 connections from 127\.0\.0\.1 "
                    r"already \(max_clients_per_host\)")
    others = [raw_client(daemon.port, source="127.0.0.2") for _ in range(2)]
    sixth = socket.socket()
    sixth.bind(("127.0.0.3", 0))
    sixth.settimeout(10)
    try:
        sixth.connect(("127.0.0.1", daemon.port))
        assert sixth.recv(100) == b"ERR 503 too many connections, try again later\r\n"
    finally:
        sixth.close()
    daemon.wait_log(r"refused: 5 connections already \(max_clients\)")
    for client in others:
        client.close()
    first[0].close()
    # Slots are given back when connections close.
    deadline = time.monotonic() + 10
    while True:
        try:
            again = clients(daemon.port, "alice alice-secret")
            break
        except (AssertionError, EOFError, OSError):
            assert time.monotonic() < deadline, "no slot came free"
            time.sleep(0.1)
    assert again.events_until_pong() == []


def tcp_timer(local_port, remote_port):
    """The timer column ``tr:when`` of a socket in /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1].endswith(":%04X" % local_port) and \
                    fields[2].endswith(":%04X" % remote_port):
                timer, when = fields[5].split(":")
                return int(timer, 16), int(when, 16)
    return None


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="Linux /proc/net/tcp needed")
def test_e2e_client_sockets_have_tcp_keepalive(fake, daemon_factory, clients):
    """A desktop that vanishes without a FIN is found by keepalive probes."""
    daemon = daemon_factory()
    alice = clients(daemon.port, "alice alice-secret")
    deadline = time.monotonic() + 10
    while True:  # 1 (retransmit) while the login reply is not acknowledged yet
        timer = tcp_timer(daemon.port, alice.sock.getsockname()[1])
        if timer is not None and timer[0] != 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert timer is not None and timer[0] == 2, timer  # 2: the keepalive timer
    assert timer[1] <= ctinotify.CLIENT_KEEPALIVE_IDLE_S * 100  # USER_HZ ticks


def test_e2e_out_of_descriptors_pauses_accepting_and_recovers(tmp_path, clients):
    import resource

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    server = FakeAsterisk().start()
    daemon = Daemon(tmp_path, server.port, general="max_clients = 500\n"
                    "max_clients_per_host = 500\nlogin_timeout = 60", preexec_fn=few_descriptors)
    socks = []
    try:
        server.wait_for_logins(1)
        for _ in range(60):
            socks.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=10))
        daemon.wait_log(r"ERROR accept failed: Too many open files; not accepting connections "
                        r"for 1 s")
        assert daemon.proc.poll() is None
        for sock in socks:
            sock.close()
        socks = []
        daemon.wait_log("accepting connections again")
        deadline = time.monotonic() + 20
        while True:
            try:
                alice = clients(daemon.port, "alice alice-secret")
                break
            except (AssertionError, EOFError, OSError):
                assert time.monotonic() < deadline, "the daemon did not recover"
                time.sleep(0.2)
        assert alice.events_until_pong() == []
        # Paused, not spinning: a handful of log lines, not thousands.
        assert sum("accept failed" in line for line in daemon.log) < 30
    finally:
        for sock in socks:
            sock.close()
        daemon.stop()
        server.stop()


# ---------------------------------------------------------------------------
# Robustness: failed logins are slowed down, then blocked, per address
# ---------------------------------------------------------------------------

def test_login_throttle_delays_grow_then_block_and_expire():
    throttle = ctinotify.LoginThrottle(delay_s=0.5, block_after=6, block_s=60, forget_s=900)
    delays = [throttle.failed("10.0.0.1", 100.0 + i) for i in range(5)]
    assert delays == [(0.5, False), (1.0, False), (2.0, False), (4.0, False), (8.0, False)]
    assert throttle.blocked_for("10.0.0.1", 105.0) == 0
    assert throttle.failed("10.0.0.1", 105.0) == (8.0, True)  # capped; the 6th blocks
    assert throttle.blocked_for("10.0.0.1", 105.0) == 60
    assert throttle.blocked_for("10.0.0.1", 164.0) == 1
    assert throttle.blocked_for("10.0.0.2", 105.0) == 0  # per address
    assert throttle.blocked_for("10.0.0.1", 165.0) == 0
    # After the block the count starts over; old failures are forgotten.
    assert throttle.failed("10.0.0.1", 166.0) == (0.5, False)
    assert throttle.failed("10.0.0.1", 166.0 + 901) == (0.5, False)


def test_login_throttle_state_is_bounded():
    throttle = ctinotify.LoginThrottle(delay_s=1, block_after=2, block_s=60, max_hosts=100)
    for i in range(10000):
        throttle.failed("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1000.0)
    assert len(throttle) == 100
    throttle.failed("10.0.39.15", 1000.0)  # the newest are kept: this blocks it
    assert throttle.blocked_for("10.0.39.15", 1000.0) == 60
    assert ctinotify.LoginThrottle(delay_s=0).failed("h", 0.0) == (0.0, False)


@pytest.mark.parametrize("address, key", [
    ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("fe80::1%eth0", "fe80::/64"),
    ("not an address", "not an address")])
def test_address_key(address, key):
    assert ctinotify.address_key(address) == key


def test_client_session_refuses_login_from_a_blocked_address():
    class Blocked(ctinotify.ServerView):
        def login_blocked(self, peer_host):
            return peer_host == "10.0.0.66"
    view = Blocked(office().users)
    session = ctinotify.ClientSession("10.0.0.66")
    assert session.handle_line("LOGIN alice alice-secret", view) == \
        ["ERR 429 too many failed logins from your address, try again later"]
    assert session.user is None and session.closing
    assert ctinotify.ClientSession("10.0.0.1").handle_line(
        "LOGIN alice alice-secret", view)[0].startswith("OK logged in")


def test_e2e_failed_logins_are_delayed_then_the_address_is_blocked(fake, daemon_factory,
                                                                   clients):
    daemon = daemon_factory(general="login_fail_delay = 0.2\nlogin_block_after = 4\n"
                                    "login_block_seconds = 3")
    first = clients(daemon.port)
    first.send("LOGIN alice wrong1\r\nLOGIN nobody wrong2\r\nLOGIN alice wrong3")  # pipelined
    assert [first.line() for _ in range(3)] == ["ERR 401 login failed"] * 3
    assert first.closed()
    delays = [float(m) for m in re.findall(r"reply to the failed login delayed ([\d.]+) s",
                                           "".join(daemon.log))]
    assert delays == [0.2, 0.4, 0.8]
    second = clients(daemon.port)
    second.send("LOGIN alice wrong4")
    assert second.line() == "ERR 401 login failed"
    assert second.closed()
    daemon.wait_log(r"WARNING client 127\.0\.0\.1: logins from 127\.0\.0\.1 blocked for 3 s "
                    r"after 4 failed logins")
    blocked = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        assert blocked.recv(200) == \
            b"ERR 429 too many failed logins from your address, try again later\r\n"
    finally:
        blocked.close()
    elsewhere = raw_client(daemon.port, "alice alice-secret", source="127.0.0.2")
    assert elsewhere.events_until_pong() == []
    elsewhere.close()
    # The block ends by itself.
    deadline = time.monotonic() + 15
    while True:
        try:
            alice = clients(daemon.port, "alice alice-secret")
            break
        except (AssertionError, EOFError, OSError):
            assert time.monotonic() < deadline, "the block did not end"
            time.sleep(0.2)
    assert alice.events_until_pong() == []
    log = "".join(daemon.log)
    for secret in ("wrong1", "wrong2", "wrong3", "wrong4", "alice-secret"):
        assert secret not in log


def test_e2e_a_held_login_reply_holds_only_that_client(fake, daemon_factory, clients):
    daemon = daemon_factory(general="login_fail_delay = 30")
    fake.wait_for_logins(1)
    slow = clients(daemon.port)
    slow.send("LOGIN alice guess")
    slow.send("PING")
    daemon.wait_log("reply to the failed login delayed 30 s")
    alice = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    assert slow.buffer == b""  # its reply, and the PING after it, still wait


def test_e2e_pending_input_is_bounded_while_a_reply_is_held(fake, daemon_factory, clients):
    daemon = daemon_factory(general="login_fail_delay = 30")
    hog = clients(daemon.port)
    hog.send("LOGIN alice guess")
    daemon.wait_log("reply to the failed login delayed 30 s")
    hog.sock.sendall(b"PING\r\n" * (ctinotify.MAX_CLIENT_PENDING_INPUT_BYTES // 6 + 10))
    assert hog.line() == "ERR 401 login failed"  # what it was owed, then the refusal
    assert hog.line() == "ERR 413 too much input at once"
    assert hog.closed()
    daemon.wait_log(r"disconnected: more than 4096 bytes of input waiting")


# ---------------------------------------------------------------------------
# Robustness: garbage from clients
# ---------------------------------------------------------------------------

def test_client_session_closes_after_too_many_bad_commands_before_login():
    view = session_users()
    session = ctinotify.ClientSession("10.0.0.1")
    for _ in range(ctinotify.MAX_CLIENT_ERRORS_BEFORE_LOGIN - 1):
        assert session.handle_line("GET / HTTP/1.1", view) == ["ERR 400 unknown command, try HELP"]
        assert not session.closing
    session.handle_line("\x16\x03\x01\x02\x00\x01", view)
    assert session.closing and "bad commands before login" in session.close_reason
    logged_in = ctinotify.ClientSession("10.0.0.1")
    logged_in.handle_line("LOGIN alice alice-secret", view)
    for _ in range(50):  # a logged-in user's typos cost nothing
        logged_in.handle_line("TYPO", view)
    assert not logged_in.closing


def assert_still_serving(fake, daemon, clients, trace="a_inbound_answered"):
    assert daemon.proc.poll() is None
    alice = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path(trace))
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup")))[0] in \
        ("incoming", "outgoing")
    alice.close()


def test_e2e_binary_garbage_gets_errors_or_a_close(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    rng = random.Random(4)
    for size in (100, 5000, 65536):
        junk = clients(daemon.port)
        # Random bytes, then enough junk lines to use up the bad commands
        # a connection may send before it logs in.
        data = bytes(rng.getrandbits(8) for _ in range(size)) + b"\r\n\x00\x1b[2J\r\n" * 12
        try:
            junk.sock.sendall(data)
        except OSError:
            pass  # closed while we were still sending: fine
        replies = []
        try:
            while True:
                replies.append(junk.line())
        except (EOFError, OSError):
            pass
        assert all(r.startswith("ERR ") for r in replies), replies
        assert all(r.isprintable() for r in replies)
    assert_still_serving(fake, daemon, clients)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", "".join(daemon.log))


def test_e2e_a_megabyte_without_a_newline_is_refused_and_others_are_served(
        fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    watcher = clients(daemon.port, "alice alice-secret")
    hog = clients(daemon.port)

    def blast():
        try:
            hog.sock.sendall(b"x" * (1024 * 1024))
        except OSError:
            pass
    sender = threading.Thread(target=blast, daemon=True)
    sender.start()
    assert hog.line() == "ERR 413 line too long"  # the lingering close keeps the reply
    assert hog.closed(timeout=10)
    sender.join(10)
    daemon.wait_log(r"WARNING client 127\.0\.0\.1:\d+: disconnected: more than 1024 bytes "
                    r"without a newline")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(watcher.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]


def test_e2e_half_open_connections(fake, daemon_factory, clients):
    daemon = daemon_factory(general="login_timeout = 1")
    # Half a line, then silence: the login timeout ends it.
    mute = clients(daemon.port)
    mute.sock.sendall(b"LOGIN ali")
    assert mute.line(timeout=10) == "ERR 408 login timeout"
    assert mute.closed()
    # Half-closed after its commands: it gets every reply, then the end.
    done = clients(daemon.port)
    done.sock.sendall(b"PING\r\nLOGIN alice alice-secret\r\nHISTORY\r\nQUIT\r\nPING\r\n")
    done.sock.shutdown(socket.SHUT_WR)
    lines = done.lines_until(lambda l: l == "OK bye")
    assert lines[0] == "OK PONG" and lines[1].startswith("OK logged in")
    assert lines[-2:] == ["OK history=0", "OK bye"]
    assert done.closed()
    daemon.wait_log(r"client alice@127\.0\.0\.1:\d+: disconnected: quit")
    # Half-closed right away: closed, nothing left behind.
    gone = clients(daemon.port)
    gone.sock.shutdown(socket.SHUT_WR)
    assert gone.closed()
    daemon.wait_log(r"client 127\.0\.0\.1:%d: disconnected: closed by the client"
                    % gone.sock.getsockname()[1])
    assert_still_serving(fake, daemon, clients)


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_e2e_thousands_of_connects_and_disconnects(fake, daemon_factory, clients):
    daemon = daemon_factory(general="max_clients_per_host = 1000")
    fake.wait_for_logins(1)
    watcher = clients(daemon.port, "alice alice-secret")
    baseline = open_fds(daemon.proc.pid)

    def storm(seed):
        rng = random.Random(seed)
        for i in range(500):
            sock = socket.socket()
            try:
                sock.connect(("127.0.0.1", daemon.port))
                how = rng.randrange(4)
                if how == 1:
                    sock.sendall(b"PING\r\nHEL")
                elif how == 2:  # close with a reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif how == 3:
                    sock.sendall(b"\x00\xff" * rng.randrange(1, 700))
            except OSError:
                pass
            finally:
                sock.close()
    # Four at a time: 2000 connections, each closed at once, some with a reset.
    threads = [threading.Thread(target=storm, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    deadline = time.monotonic() + 20
    while open_fds(daemon.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(daemon.proc.pid) <= baseline  # nothing leaked
    # Nor can a flood of connections flood the log: before a login they are
    # DEBUG lines, and warnings about their misbehaviour are rate limited.
    assert not [l for l in daemon.log if re.search(r"INFO client [\d.]+:\d+: ", l)]
    assert sum(" WARNING " in l for l in daemon.log) < 20
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(watcher.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    assert_still_serving(fake, daemon, clients)


# ---------------------------------------------------------------------------
# Robustness: hostile caller ID, through the real daemon
# ---------------------------------------------------------------------------

#: Caller ID names and numbers an attacker can put on a SIP INVITE.  LF (and
#: so CRLF) cannot travel inside an AMI value: Asterisk writes values
#: unescaped, so an LF would end the header line and break AMI framing
#: itself; a lone CR, which ends no line for the parser, can.
HOSTILE_CALLER_IDS = [
    (b'Say "hi" = \\back\\slash\\', b'+1"555=\\'),
    (b"nul\x00byte \x1b[31mred\ttab", b"+1555\x00123"),
    (b"caf\xe9 \xff\xfe not UTF-8 \xc3", b"\xff+1555"),
    (b"line\xe2\x80\xa8sep\xe2\x80\xa9para\xc2\x85nel", b"12\xe2\x80\xa834"),
    (b"lone\rCR EVENT incoming call=forged", b"555\r1"),
    (b"  padded  ", b"'; rm -rf / #"),
    (b"Ab= \\\"" * 1024, b"9" * 4096),  # 4-6 KB
]


def hostile_trace(name, num, tag):
    """a_inbound_answered with the trunk caller's name and number replaced
    wherever Asterisk carries them (caller ID and connected line)."""
    data = read_trace("a_inbound_answered")
    data = re.sub(rb"(?m)^((?:Dest)?(?:CallerIDName|ConnectedLineName)): John Customer\r$",
                  lambda m: m.group(1) + b": " + name + b"\r", data)
    data = re.sub(rb"(?m)^((?:Dest)?(?:CallerIDNum|ConnectedLineNum)): \+15551230001\r$",
                  lambda m: m.group(1) + b": " + num + b"\r", data)
    assert b"CallerIDName: John Customer\r" not in data
    return b"".join(trace_events(uniquify(data, tag)))


def test_e2e_hostile_caller_id_stays_one_line_and_parses_back(fake, daemon_factory, clients,
                                                             tmp_path):
    daemon = daemon_factory(general="calllog = %s" % (tmp_path / "calls.jsonl"))
    fake.wait_for_logins(1)
    text = clients(daemon.port, "alice alice-secret")
    jsonc = clients(daemon.port, "alice alice-secret")
    jsonc.send("FORMAT json")
    assert jsonc.line() == "OK format=json"
    for i, (name, num) in enumerate(HOSTILE_CALLER_IDS):
        want_name = name.decode("utf-8", "replace")
        want_num = num.decode("utf-8", "replace")
        fake.send(hostile_trace(name, num, b"h%d" % i))
        lines = text.lines_until(lambda l: l.startswith("EVENT hangup"))
        assert event_kinds(lines) == ["incoming", "pickup", "hangup"]
        for line in lines:
            assert not re.search("[\r\n\x00\x85\u2028\u2029]", line), repr(line)
            _, _, fields = ctinotify.parse_text_line(line)
            assert (fields["from_name"], fields["from_num"]) == (want_name, want_num)
        for line in jsonc.lines_until(lambda l: '"event":"hangup"' in l):
            assert not re.search("[\r\n\x85\u2028\u2029]", line), repr(line)
            event = json.loads(line)
            assert event["from"] == {"num": want_num, "name": want_name}
        # The same call, as the user's history, parses back too.
        text.send("HISTORY 1")
        (item, done) = text.lines_until(lambda l: l.startswith("OK history="))
        assert done == "OK history=1"
        tag, _, record = ctinotify.parse_text_line(item)
        assert tag == "HISTORY"
        assert (record["from_name"], record["from_num"]) == (want_name, want_num)
    records = [json.loads(l) for l in (tmp_path / "calls.jsonl").read_text("utf-8").splitlines()]
    assert [r["from"]["name"] for r in records] == \
        [n.decode("utf-8", "replace") for n, _ in HOSTILE_CALLER_IDS]
    log = "".join(daemon.log)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]", log)
    assert "forged" not in log and "rm -rf" not in log


# ---------------------------------------------------------------------------
# Robustness: AMI faults
# ---------------------------------------------------------------------------

def test_e2e_malformed_truncated_unknown_and_oversized_ami_messages(fake, daemon_factory,
                                                                    clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    fake.send(b"this line is not a header\r\nneither is this one\r\n\r\n"
              b"Event: Hangup\r\nUniqueid\r\n\r\n"                        # no channel
              b"Event: FrobnicateXYZ\r\nFoo: bar\r\n\r\n"                 # unknown event
              b"Event: \xff\xfe\x00\r\nChannel: \x00\r\n\r\n"             # binary
              b"Event: Newchannel\r\nChannel: PJSIP/100-00000099\r\nUniq"  # cut short...
              b"Event: Hangup\r\nChannel: PJSIP/100-00000099\r\n\r\n"      # ...runs into this
              b"Response: Error\r\nActionID: 77\r\nMessage: Permission denied\r\n\r\n"
              b"Event: VarSet\r\nValue: " + b"x" * (ctinotify.MAX_AMI_MESSAGE_BYTES + 10) +
              b"\r\n\r\n")
    daemon.wait_log(r"WARNING ami: ignored a message that is neither an event nor a response: "
                    r"\['this line is not a header'")
    daemon.wait_log(r"WARNING ami: Asterisk refused an action: 'Permission denied'")
    daemon.wait_log(r"WARNING ami: skipped a message of more than 262144 bytes")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    assert fake.logins == 1 and daemon.proc.poll() is None  # the link was kept
    assert "Traceback" not in "".join(daemon.log)


def ringing_part(name="a_inbound_answered", tag=None):
    """The events of a recorded call up to the moment it rings."""
    data = read_trace(name)
    events = trace_events(uniquify(data, tag) if tag else data)
    ringing = [e for e in events if not e.startswith((b"Event: Hangup", b"Event: Bridge"))]
    cut = next(i for i, e in enumerate(ringing) if e.startswith(b"Event: DialState"))
    return b"".join(ringing[:cut + 1])


def test_e2e_asterisk_restart_ends_calls_and_resumes(fake, daemon_factory, clients, tmp_path):
    calllog = tmp_path / "calls.jsonl"
    daemon = daemon_factory(general="calllog = %s" % calllog)
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    fake.send(ringing_part(tag=b"before"))
    assert event_kinds([alice.line()]) == ["incoming"]
    fake.send(b"Event: Shutdown\r\nPrivilege: system,all\r\nShutdown: Cleanly\r\n"
              b"Restart: True\r\n\r\n")
    lines = alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    assert lines[0].startswith("STATUS pbx=down") and "Asterisk is shutting down" in lines[0]
    assert ctinotify.parse_text_line(lines[-1])[2]["reason"] == "unknown"
    fake.wait_for_logins(2)  # the fake answers FullyBooted after the login, as Asterisk does
    assert alice.line().startswith("STATUS pbx=up")
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    records = [json.loads(l) for l in calllog.read_text().splitlines()]
    assert [r["reason"] for r in records] == ["unknown", "completed"]


def test_e2e_truncated_message_at_a_dropped_link(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    fake.send(ringing_part(tag=b"cut") + b"Event: DialEnd\r\nChannel: PJSIP/trunk-0000")
    assert event_kinds([alice.line()]) == ["incoming"]
    fake.drop()
    lines = alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    assert ctinotify.parse_text_line(lines[-1])[2]["reason"] == "unknown"
    fake.wait_for_logins(2)
    assert alice.line().startswith("STATUS pbx=up")
    fake.send_trace(trace_path("a_inbound_answered"))  # the half message is gone
    assert event_kinds(alice.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]


def test_e2e_a_stalled_ami_link_is_declared_dead(tmp_path, clients):
    """No Pong, no close: Asterisk hangs.  The link is dropped after the
    ping timeout, calls end, and the daemon reconnects."""
    server = FakeAsterisk(answer_pings=False).start()
    daemon = Daemon(tmp_path, server.port, ami="ping_interval = 1")
    try:
        daemon.wait_log("ami: logged in as ctitest")
        alice = clients(daemon.port, "alice alice-secret")
        server.send(ringing_part(tag=b"stall"))
        assert event_kinds([alice.line()]) == ["incoming"]
        timeout = ctinotify.AMI_PING_TIMEOUT_S + 15
        lines = alice.lines_until(lambda l: l.startswith("EVENT hangup"), timeout=timeout)
        assert lines[0].startswith("STATUS pbx=down") and "no answer to Ping" in lines[0]
        assert ctinotify.parse_text_line(lines[-1])[2]["reason"] == "unknown"
        daemon.wait_log(r"WARNING ami: no answer to Ping within 10 s; reconnecting in 1 s")
        server.wait_for_logins(2)
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
        server.stop()


def test_e2e_a_peer_that_is_not_asterisk(tmp_path, clients):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def serve():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            accepted.append(sock)
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    daemon = Daemon(tmp_path, listener.getsockname()[1])
    try:
        daemon.wait_log(r"WARNING ami: not an Asterisk manager banner: 'HTTP/1\.1 400 Bad "
                        r"Request'; reconnecting in 1 s")
        daemon.wait_log(r"not an Asterisk manager banner: .*; reconnecting in 2 s")
        client = clients(daemon.port, "alice alice-secret")
        assert client.status.startswith("STATUS pbx=down")
    finally:
        daemon.stop()
        listener.close()
        for sock in accepted:
            sock.close()


# ---------------------------------------------------------------------------
# Robustness: seeded fuzzing of parser and engine with mutated traces
# ---------------------------------------------------------------------------

FUZZ_TRACES = [n for n in all_trace_names() if not n.startswith("cacofonisk/") and
               n not in ("t_load", "v_login_wrong_secret", "w_login_challenge_md5")]


def trace_messages(name):
    """(banner line, [each message in wire form]) of a recorded trace."""
    banner, _, rest = read_trace(name).partition(b"\r\n")
    return banner + b"\r\n", [b + b"\r\n\r\n" for b in rest.split(b"\r\n\r\n") if b.strip()]


def mutate_messages(rng, messages, traces):
    """1-4 random mutations: bit flips, truncation, swaps, shuffled windows,
    duplicated runs, dropped runs, dropped or doubled header lines, another
    trace interleaved, a header value moved to another message."""
    msgs = list(messages)
    for _ in range(rng.randint(1, 4)):
        msgs = [m for m in msgs if m]
        if not msgs:
            break
        i = rng.randrange(len(msgs))
        j = rng.randrange(len(msgs))
        op = rng.randrange(9)
        if op == 0:
            flipped = bytearray(msgs[i])
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            msgs[i] = bytes(flipped)
        elif op == 1:
            msgs = msgs[:i] + [msgs[i][:rng.randrange(len(msgs[i]))]]
        elif op == 2:
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif op == 3:
            window = msgs[i:i + rng.randint(2, 10)]
            rng.shuffle(window)
            msgs[i:i + len(window)] = window
        elif op == 4:
            msgs[i:i] = msgs[i:i + rng.randint(1, 20)]
        elif op == 5:
            del msgs[i:i + rng.randint(1, 5)]
        elif op == 6:
            lines = msgs[i].split(b"\r\n")
            k = rng.randrange(len(lines))
            if rng.random() < 0.5:
                del lines[k]
            else:
                lines.insert(k, lines[rng.randrange(len(lines))])
            msgs[i] = b"\r\n".join(lines)
        elif op == 7:
            other = list(traces[rng.choice(sorted(traces))][1])
            mixed = []
            while msgs or other:
                source = msgs if msgs and (not other or rng.random() < 0.5) else other
                mixed.append(source.pop(0))
            msgs = mixed
        else:
            into, source = msgs[i].split(b"\r\n"), msgs[j].split(b"\r\n")
            a, b = rng.randrange(len(into)), rng.randrange(len(source))
            head, sep, _ = into[a].partition(b": ")
            value = source[b].partition(b": ")[2]
            if sep and value:
                into[a] = head + b": " + value
                msgs[i] = b"\r\n".join(into)
    return msgs


def check_call_invariants(notes):
    """Every announced user call ends exactly once; nothing is said about a
    call that is not open; no negative durations.  Returns the problems."""
    problems, open_calls = [], set()
    for user, kind, fields in notes:
        key = (user, fields["call"], fields["direction"])
        if kind in ("incoming", "outgoing"):
            if key in open_calls:
                problems.append("announced twice: %s" % (key,))
            open_calls.add(key)
        elif kind == "hangup":
            if key not in open_calls:
                problems.append("hangup without an announcement: %s" % (key,))
            open_calls.discard(key)
            if fields["duration"] < 0 or fields["talk_time"] < 0:
                problems.append("negative duration: %s" % (fields,))
        elif key not in open_calls:
            problems.append("%s outside an open call: %s" % (kind, key))
    problems += ["never ended: %s" % (key,) for key in sorted(open_calls)]
    return problems


def fuzz_once(data, expect_banner, rng, users):
    """Feed ``data`` at random splits through parser and engine, then lose
    the link.  Only AmiProtocolError may escape the parser."""
    parser = AmiParser(expect_banner=expect_banner, max_message_bytes=8192)
    engine = CallEngine(Directory(users.values()))
    now, notes, pos = 1000.0, [], 0
    while pos < len(data):
        step = rng.randint(1, 4096)
        try:
            messages = parser.feed(data[pos:pos + step])
        except AmiProtocolError:
            break
        pos += step
        for msg in messages:
            # Mostly forward, sometimes back: the wall clock may be set back.
            now += rng.uniform(-3, 1) if rng.random() < 0.1 else 0.25
            notes += [(n.user, n.kind, n.fields) for n in engine.handle(msg, now)]
    notes += [(n.user, n.kind, n.fields) for n in engine.link_lost(now + 1)]
    problems = check_call_invariants(notes)
    if engine.channels or engine.user_calls or engine.calls:
        problems.append("state left after link_lost: %d channels, %d user calls, %d calls"
                        % (len(engine.channels), len(engine.user_calls), len(engine.calls)))
    return problems


FUZZ_ITERATIONS = 3000


def test_fuzz_mutated_traces_through_parser_and_engine():
    rng = random.Random(20261126)
    traces = {name: trace_messages(name) for name in FUZZ_TRACES}
    users = office().users
    for iteration in range(FUZZ_ITERATIONS):
        name = rng.choice(FUZZ_TRACES)
        banner, messages = traces[name]
        with_banner = rng.random() < 0.2
        data = (banner if with_banner else b"") + b"".join(mutate_messages(rng, messages, traces))
        if with_banner and rng.random() < 0.3:
            flipped = bytearray(data)
            flipped[rng.randrange(30)] ^= 0x20  # a banner that is not one
            data = bytes(flipped)
        problems = fuzz_once(data, with_banner, rng, users)
        assert not problems, "iteration %d (%s): %s; input: %r" % (
            iteration, name, problems[:3], data[:2000])


# ---------------------------------------------------------------------------
# TLS: the client listener and the link to Asterisk
# ---------------------------------------------------------------------------

def make_certificate(directory, name):
    """A throwaway self-signed certificate for 127.0.0.1, by openssl(1)."""
    cert, key = str(directory / (name + ".pem")), str(directory / (name + ".key"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=ctinotify-test", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    return {"server": make_certificate(directory, "server"),
            "other": make_certificate(directory, "other")}


class TlsClient(Client):
    """Client over TLS, verifying the daemon's certificate."""

    def __init__(self, port, cafile, login=None):
        context = ssl.create_default_context(cafile=cafile)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""
        self.greeting = self.line()
        if login:
            self.send("LOGIN %s" % login)
            reply = self.line()
            assert reply.startswith("OK logged in"), reply
            self.status = self.line()


def socket_closed(sock, timeout=10.0):
    """Read until the peer closes (True) or the timeout (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def tls_port_of(daemon):
    line = daemon.wait_log(r"listening for TLS clients on \S+ port (\d+)")
    return int(re.search(r"port (\d+)", line).group(1))


def test_e2e_tls_clients_and_non_blocking_handshakes(fake, daemon_factory, clients,
                                                     certificates):
    cert, key = certificates["server"]
    daemon = daemon_factory(general="tls_port = 0\ntls_cert = %s\ntls_key = %s\n"
                                    "login_timeout = 2" % (cert, key))
    fake.wait_for_logins(1)
    port = tls_port_of(daemon)
    # A connection that never starts its handshake must not hold up others.
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    # Plain text on the TLS port: the handshake fails, the connection closes.
    plain = socket.create_connection(("127.0.0.1", port), timeout=10)
    plain.sendall(b"LOGIN alice alice-secret\r\n")
    try:
        alice = TlsClient(port, cert, "alice alice-secret")
        assert alice.greeting.startswith("CTINOTIFY/1 ")
        assert alice.status.startswith("STATUS pbx=up")
        alice.send("FORMAT json")
        assert alice.line() == "OK format=json"
        # Enough events that TLS records arrive split and several at once.
        data = big_trace(3)
        fake.send(data)
        want = expected_events(data, "alice")
        got = []
        while len(got) < len(want):
            event = json.loads(alice.line())
            got.append((event["event"], event["call"]))
        assert got == want
        assert socket_closed(plain)  # perhaps after a TLS alert
        daemon.wait_log(r"WARNING client 127\.0\.0\.1:\d+: disconnected: TLS handshake failed")
        assert socket_closed(stalled)  # by the login timeout
        daemon.wait_log(r"disconnected: no TLS handshake within 2 s")
        daemon.wait_log(r"client 127\.0\.0\.1:\d+: TLS established \(TLSv1\.[23]\)")
        # A client that does not trust the certificate gives up; others go on.
        with pytest.raises(ssl.SSLError):
            TlsClient(port, certificates["other"][0])
        plain_client = clients(daemon.port, "alice alice-secret")
        assert plain_client.events_until_pong() == []
        alice.close()
    finally:
        stalled.close()
        plain.close()


def server_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_e2e_ami_over_tls(tmp_path, clients, certificates):
    cert, key = certificates["server"]
    server = FakeAsterisk(tls_context=server_context(cert, key)).start()
    daemon = Daemon(tmp_path, server.port, ami="tls = yes\ntls_ca = %s" % cert)
    try:
        daemon.wait_log(r"INFO ami: TLS established with 127\.0\.0\.1 \(TLSv1\.[23]\)")
        daemon.wait_log("ami: logged in as ctitest")
        alice = clients(daemon.port, "alice alice-secret")
        data = big_trace(3)  # many TLS records, read in arbitrary pieces
        want = expected_events(data, "alice")
        server.send(data)
        got = []
        while len(got) < len(want):
            _, kind, fields = ctinotify.parse_text_line(alice.line())
            got.append((kind, fields["call"]))
        assert got == want
    finally:
        daemon.stop()
        server.stop()


def test_e2e_ami_over_tls_refuses_a_certificate_it_cannot_verify(tmp_path, certificates):
    cert, key = certificates["server"]
    server = FakeAsterisk(tls_context=server_context(cert, key)).start()
    daemon = Daemon(tmp_path, server.port,
                    ami="tls = yes\ntls_ca = %s" % certificates["other"][0])
    try:
        daemon.wait_log(r"WARNING ami: TLS handshake with 127\.0\.0\.1 failed: certificate "
                        r"verify failed: self.signed certificate; reconnecting in 1 s")
        assert server.logins == 0
    finally:
        daemon.stop()
        server.stop()
    # tls_verify = no: encrypted, but anyone can pose as Asterisk.
    server = FakeAsterisk(tls_context=server_context(cert, key)).start()
    daemon = Daemon(tmp_path, server.port, ami="tls = yes\ntls_verify = no")
    try:
        daemon.wait_log(r"ami: TLS established with 127\.0\.0\.1")
        server.wait_for_logins(1)
    finally:
        daemon.stop()
        server.stop()


def test_config_tls_keys(tmp_path, certificates):
    cert, key = certificates["server"]
    base = "[ami]\nusername=u\nsecret=s\n"
    config = parse_config(base + "tls = yes\n", "f")
    assert (config.ami.tls, config.ami.tls_verify, config.ami.port) == (True, True, 5039)
    assert parse_config(base + "tls = yes\nport = 5040\ntls_verify = no\n", "f").ami.port == 5040
    config = parse_config("[general]\nport = off\ntls_port = 5040\ntls_cert = c.pem\n" + base,
                          "f")
    assert (config.port, config.tls_port, config.tls_cert, config.tls_key) == \
        (None, 5040, "c.pem", "")
    for text, fragment in (
            ("[general]\ntls_port = 5040\n", ":5: [general] tls_port: TLS needs a certificate"),
            ("[general]\ntls_cert = c.pem\n", ":5: [general] tls_cert: set without tls_port"),
            ("[general]\nport = off\n", ":5: [general] port: 'off' leaves no client port"),
            ("[ami]\ntls = maybe\n", "[ami] tls: 'maybe' is not yes or no"),
            ("[ami]\ntls_ca = /etc/ca.pem\n", "[ami] tls_ca: only used with TLS")):
        with pytest.raises(ConfigError) as info:
            parse_config(text.replace("[ami]\n", base) if "[ami]" in text else base + text,
                         "f")
        assert fragment in str(info.value)
    conf = tmp_path / "tls.conf"
    conf.write_text(base + "[general]\ntls_port = 0\ntls_cert = %s\ntls_key = %s\n"
                    % (tmp_path / "missing.pem", key))
    with pytest.raises(ConfigError) as info:
        ctinotify.load_config(str(conf))
    assert "%s:6: [general] tls_cert: cannot load the certificate and key:" % conf in \
        str(info.value)
    conf.write_text(base + "[general]\ntls_port = 0\ntls_cert = %s\ntls_key = %s\n"
                    % (cert, key))
    assert ctinotify.load_config(str(conf)).tls_context is not None
    result = run_cli("check", "-c", str(conf))
    assert result.returncode == 0 and "tls_port = 0" in result.stdout


# ---------------------------------------------------------------------------
# Reload (SIGHUP) and shutdown (SIGTERM, SIGINT)
# ---------------------------------------------------------------------------

def wait_log_count(daemon, pattern, count, timeout=10.0):
    """Wait until ``pattern`` has matched ``count`` log lines."""
    deadline = time.monotonic() + timeout
    while sum(bool(re.search(pattern, l)) for l in list(daemon.log)) < count:
        assert time.monotonic() < deadline, "fewer than %d log lines matching %r in:\n%s" % (
            count, pattern, "".join(daemon.log))
        time.sleep(0.02)


def edit_config(daemon, *replacements):
    text = daemon.config.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    daemon.config.write_text(text)


def test_e2e_reload_applies_users_and_keeps_the_ami_link(fake, daemon_factory, clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    bob = clients(daemon.port, "bob bob-secret")
    carol = clients(daemon.port, "carol carol-secret")
    dave = clients(daemon.port, "dave dave-secret")
    alice.send("FORMAT json")
    assert alice.line() == "OK format=json"
    edit_config(daemon, ("secret = alice-secret", "secret = alice-new-secret"),
                ("[carol]\nsecret = carol-secret\nhost = dynamic\ndevices = PJSIP/102\n"
                 "extensions = 102\n", ""),
                ("devices = PJSIP/103", "devices = PJSIP/103, PJSIP/100"),
                ("[dave]", "[erin]\nsecret = erin-secret\ndevices = PJSIP/104\n[dave]"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"configuration reloaded from \S+ \(4 users\)")
    closing = json.loads(alice.line())
    assert (closing["event"], closing["session"], closing["reason"]) == \
        ("status", "closed", "secret changed by reload")
    assert alice.closed()
    assert carol.line().startswith('STATUS session=closed reason="account removed by reload"')
    assert carol.closed()
    daemon.wait_log(r"client alice@127\.0\.0\.1:\d+: disconnected: secret changed by reload")
    daemon.wait_log(r"client carol@127\.0\.0\.1:\d+: disconnected: account removed by reload")
    erin = clients(daemon.port, "erin erin-secret")
    again = clients(daemon.port, "alice alice-new-secret")
    refused = clients(daemon.port)
    refused.send("LOGIN alice alice-secret")
    assert refused.line() == "ERR 401 login failed"
    # Dave's new device applies to his session that was already there.
    fake.send_trace(trace_path("a_inbound_answered"))
    assert event_kinds(dave.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    assert event_kinds(again.lines_until(lambda l: l.startswith("EVENT hangup"))) == \
        ["incoming", "pickup", "hangup"]
    assert bob.events_until_pong() == [] and erin.events_until_pong() == []
    assert fake.logins == 1  # [ami] unchanged: the link was kept
    # A changed [ami] reconnects.
    edit_config(daemon, ("reconnect_max = 2", "reconnect_max = 3"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"reload: \[ami\] changed, reconnecting")
    fake.wait_for_logins(2)
    for secret in ("alice-secret", "alice-new-secret", "erin-secret"):
        assert secret not in "".join(daemon.log)


def test_e2e_reload_rejects_an_invalid_config_and_keeps_the_running_one(fake, daemon_factory,
                                                                        clients):
    daemon = daemon_factory()
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    edit_config(daemon, ("secret = alice-secret", "secret = changed"),
                ("port = 0", "port = 0\nmax_clients = none"),
                ("devices = PJSIP/101", "devices = PJSIP101"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"ERROR reload of \S+ rejected, keeping the running configuration:")
    daemon.wait_log(r"ERROR   \S+:4: \[general\] max_clients: 'none' is not a number")
    daemon.wait_log(r"ERROR   \S+:\d+: \[bob\] devices: 'PJSIP101' is not a device")
    assert alice.events_until_pong() == []  # still connected
    again = clients(daemon.port, "alice alice-secret")  # the old secret still works
    assert again.events_until_pong() == []
    assert fake.logins == 1 and daemon.proc.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_e2e_shutdown_ends_calls_logs_them_and_exits_0(fake, daemon_factory, clients, tmp_path,
                                                       signum):
    calllog = tmp_path / "calls.jsonl"
    daemon = daemon_factory(general="calllog = %s" % calllog)
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    fake.send_trace(trace_path("e_internal_answered"))
    alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    fake.send(ringing_part(tag=b"stop"))
    assert event_kinds([alice.line()]) == ["incoming"]
    daemon.proc.send_signal(signum)
    lines = alice.lines_until(lambda l: l.startswith("STATUS server=stopping"))
    assert event_kinds(lines) == ["hangup"]
    assert ctinotify.parse_text_line(lines[0])[2]["reason"] == "unknown"
    assert alice.closed()
    assert daemon.proc.wait(10) == 0
    records = [json.loads(l) for l in calllog.read_text().splitlines()]
    assert [(r["user"], r["reason"]) for r in records] == \
        [("alice", "completed"), ("bob", "completed"), ("alice", "unknown")] or \
        [(r["user"], r["reason"]) for r in records] == \
        [("bob", "completed"), ("alice", "completed"), ("alice", "unknown")]


# ---------------------------------------------------------------------------
# The call log loses nothing; HISTORY
# ---------------------------------------------------------------------------

def read_records(path):
    text = path.read_text("utf-8") if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def wait_records(path, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text("utf-8") if path.exists() else ""
        if text.count("\n") >= count:
            return
        assert time.monotonic() < deadline, "%d of %d call log lines" % (text.count("\n"), count)
        time.sleep(0.02)


def test_e2e_sigkill_mid_stream_leaves_only_whole_valid_lines(fake, daemon_factory, tmp_path):
    calllog = tmp_path / "calls.jsonl"
    daemon = daemon_factory(general="calllog = %s" % calllog)
    fake.wait_for_logins(1)
    fake.send(big_trace(SLOW_CLIENT_ROUNDS))
    wait_records(calllog, 100)
    daemon.proc.kill()
    daemon.proc.wait(10)
    data = calllog.read_bytes()
    assert data.endswith(b"\n")
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) >= 100
    for line in lines:
        record = json.loads(line)
        assert record["user"] in OFFICE_USERS.values() and record["end"]


def test_e2e_calllog_is_reopened_on_sighup_for_rotation(fake, daemon_factory, clients, tmp_path):
    calllog = tmp_path / "calls.jsonl"
    daemon = daemon_factory(general="calllog = %s" % calllog)
    fake.wait_for_logins(1)
    fake.send_trace(trace_path("a_inbound_answered"))
    wait_records(calllog, 1)
    rotated = tmp_path / "calls.jsonl.1"
    os.rename(str(calllog), str(rotated))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    fake.send_trace(trace_path("b_inbound_noanswer"))
    wait_records(calllog, 1)
    assert [r["reason"] for r in read_records(rotated)] == ["completed"]
    assert [r["reason"] for r in read_records(calllog)] == ["noanswer"]
    # Rotation works even when the config has just been broken.
    os.rename(str(calllog), str(tmp_path / "calls.jsonl.2"))
    edit_config(daemon, ("port = 0", "port = 0\nbogus = 1"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload of .* rejected")
    fake.send_trace(trace_path("c_inbound_busy"))
    wait_records(calllog, 1)
    assert [r["reason"] for r in read_records(calllog)] == ["busy"]


def in_process_daemon(tmp_path, calllog):
    config = parse_config("[general]\ncalllog = %s\n[ami]\nusername=u\nsecret=s\n"
                          "[alice]\nsecret=a\ndevices=PJSIP/100\n" % calllog, "t.conf")
    return ctinotify.Daemon(config)


def test_calllog_passes_every_record_field_through_and_mends_a_torn_line(tmp_path):
    calllog = tmp_path / "calls.jsonl"
    calllog.write_bytes(b'{"user":"alice","call":"torn by a full di')
    daemon = in_process_daemon(tmp_path, calllog)
    try:
        daemon._open_calllog()
        record = {"user": "alice", "call": "1.1", "reason": "completed",
                  "path": [{"kind": "divert", "to": "101"}, {"kind": "transfer", "to": "102"}]}
        daemon._deliver([ctinotify.Notification("alice", "hangup", {"event": "hangup"},
                                                record=record)])
        daemon._deliver([ctinotify.Notification("alice", "hangup", {"event": "hangup"},
                                                record=dict(record, call="1.2"))])
    finally:
        daemon._close_calllog()
        daemon.selector.close()
    lines = calllog.read_text().split("\n")
    assert lines[0] == '{"user":"alice","call":"torn by a full di'
    assert [json.loads(l) for l in lines[1:3]] == [record, dict(record, call="1.2")]
    assert lines[3:] == [""]
    assert daemon.history.last("alice", 5) == [record, dict(record, call="1.2")]
    text = ctinotify.encode_history(record, "text")
    assert ctinotify.parse_text_line(text)[2]["path"] == json.dumps(record["path"],
                                                                    separators=(",", ":"))


def test_call_history_is_bounded_and_per_user():
    history = ctinotify.CallHistory(per_user=3)
    for i in range(10):
        history.add({"user": "alice", "call": str(i)})
        history.add({"user": "bob", "call": "b%d" % i})
    history.add({"call": "nobody's"})
    assert [r["call"] for r in history.last("alice", 100)] == ["7", "8", "9"]
    assert [r["call"] for r in history.last("alice", 2)] == ["8", "9"]
    assert history.last("carol", 5) == [] and history.last("alice", 0) == []
    history.retain(["bob"])
    assert history.last("alice", 5) == [] and len(history.last("bob", 5)) == 3
    seeded = ctinotify.CallHistory()
    assert seeded.seed(['{"user":"alice","call":"1"}', "not json", "[1]",
                        '{"user":"mallory","call":"2"}', ""], ["alice"]) == 1


def test_client_session_history_command():
    class View(ctinotify.ServerView):
        def history(self, user, count):
            # A server bug must not leak anyone else's calls.
            return [{"user": "bob", "call": "secret"},
                    {"user": user, "call": "1.1", "from": {"num": "1", "name": 'A "B"'}}][-count:]
    view = View(office().users)
    session = ctinotify.ClientSession("127.0.0.1")
    assert session.handle_line("HISTORY", view) == ["ERR 403 login first"]
    session.handle_line("LOGIN alice alice-secret", view)
    assert session.handle_line("HISTORY", view) == [
        'HISTORY user=alice call=1.1 from_num=1 from_name="A \\"B\\""', "OK history=1"]
    assert session.handle_line("history 1", view)[-1] == "OK history=1"
    for bad in ("0", "101", "ten", "-1", "\u00b2", "1 2"):
        assert session.handle_line("HISTORY " + bad, view) == \
            ["ERR 400 usage: HISTORY [n], n from 1 to 100"]
    session.handle_line("FORMAT json", view)
    item, done = session.handle_line("HISTORY 5", view)
    assert json.loads(item) == {"event": "history", "user": "alice", "call": "1.1",
                                "from": {"num": "1", "name": 'A "B"'}}
    assert done == "OK history=1"


def test_e2e_history_returns_only_the_users_own_calls_and_survives_restarts(
        fake, daemon_factory, clients, tmp_path):
    calllog = tmp_path / "calls.jsonl"
    calllog.write_text(
        '{"user":"alice","call":"old.1","direction":"in","reason":"noanswer"}\n'
        '{"user":"mallory","call":"old.2","direction":"in","reason":"completed"}\n'
        'not json at all\n'
        '{"user":"bob","call":"old.3","direction":"out","reason":"busy"}\n')
    daemon = daemon_factory(general="calllog = %s" % calllog)
    daemon.wait_log(r"INFO history: 2 calls from ")
    fake.wait_for_logins(1)
    alice = clients(daemon.port, "alice alice-secret")
    bob = clients(daemon.port, "bob bob-secret")
    fake.send_trace(trace_path("e_internal_answered"))  # alice calls bob
    fake.send_trace(trace_path("a_inbound_answered"))   # a caller calls alice
    alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    alice.lines_until(lambda l: l.startswith("EVENT hangup"))
    bob.lines_until(lambda l: l.startswith("EVENT hangup"))
    alice.send("HISTORY")
    lines = alice.lines_until(lambda l: l.startswith("OK history="))
    assert lines[-1] == "OK history=3"
    items = [ctinotify.parse_text_line(l) for l in lines[:-1]]
    assert [tag for tag, _, _ in items] == ["HISTORY"] * 3
    assert [(f["user"], f["call"], f["direction"]) for _, _, f in items] == \
        [("alice", "old.1", "in"), ("alice", "1795727994.6", "out"),
         ("alice", "1795727950.0", "in")]
    assert items[2][2]["from_name"] == "John Customer" and items[2][2]["answered"] == "yes"
    bob.send("FORMAT json")
    bob.line()
    bob.send("HISTORY 100")
    lines = bob.lines_until(lambda l: l.startswith("OK history="))
    assert lines[-1] == "OK history=2"
    records = [json.loads(l) for l in lines[:-1]]
    assert [(r["event"], r["user"], r["call"]) for r in records] == \
        [("history", "bob", "old.3"), ("history", "bob", "1795727994.6")]
    bob.send("HISTORY 1")
    assert [json.loads(l)["call"] for l in bob.lines_until(lambda l: l.startswith("OK"))[:-1]] \
        == ["1795727994.6"]


# ---------------------------------------------------------------------------
# Secrets: never logged, never echoed
# ---------------------------------------------------------------------------

def test_e2e_secrets_never_reach_the_log_or_a_client(tmp_path, clients):
    ami_secret = "ami-S3cret-q7"
    server = FakeAsterisk(secret=ami_secret).start()
    users = ("[alice]\nsecret = alice-S3cret-x1\nhost = 127.0.0.1\ndevices = PJSIP/100\n"
             "[bob]\nsecret = bob-S3cret-y2\ndevices = PJSIP/101\n")
    daemon = Daemon(tmp_path, server.port, users=users, ami="secret = %s" % ami_secret,
                    general="login_fail_delay = 0.05")
    seen = []
    try:
        server.wait_for_logins(1)
        login = [a for a in server.actions if a.get("Action") == "Login"][0]
        assert login["Secret"] == ami_secret  # plain auth: it did travel, to Asterisk only
        alice = clients(daemon.port, "alice alice-S3cret-x1")
        seen += [alice.greeting, alice.status]
        wrong = clients(daemon.port)
        for attempt in ("alice guess-S3cret-1", "bob alice-S3cret-x1", "nobody bob-S3cret-y2"):
            wrong.send("LOGIN " + attempt)
            seen.append(wrong.line())
        daemon.config.write_text(daemon.config.read_text().replace("bob-S3cret-y2",
                                                                   "bob-N3w-S3cret-z3"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded")
        bob = clients(daemon.port, "bob bob-N3w-S3cret-z3")
        bob.send("HELP")
        seen += [bob.status, bob.line()]
        bob.send("LOGIN bob bob-N3w-S3cret-z3")
        seen.append(bob.line())
        daemon.config.write_text(daemon.config.read_text().replace("port = 0", "port = x"))
        daemon.proc.send_signal(signal.SIGHUP)  # rejected: its errors are logged
        daemon.wait_log("rejected")
        seen += alice.events_until_pong()
    finally:
        daemon.stop()
        server.stop()
    log = "".join(daemon.log)
    assert "login as 'alice' refused: wrong secret" in log
    for secret in (ami_secret, "alice-S3cret-x1", "bob-S3cret-y2", "bob-N3w-S3cret-z3",
                   "guess-S3cret-1", "S3cret"):
        assert secret not in log
        assert not any(secret in line for line in seen), seen


# ---------------------------------------------------------------------------
# The documentation of issue 4's keys and commands
# ---------------------------------------------------------------------------

def test_readme_history_example_is_what_the_session_says():
    block = readme_block("example-history: a_inbound_answered")
    engine = CallEngine(Directory(office().users.values()))
    clock = ctinotify.TraceClock()
    history = ctinotify.CallHistory()
    for msg in AmiParser().feed(read_trace("a_inbound_answered")):
        for note in engine.handle(msg, clock.observe(msg)):
            if note.record is not None:
                history.add(note.record)
    session = ctinotify.ClientSession("127.0.0.1")
    view = ctinotify.ServerView(office().users, history)
    session.handle_line("LOGIN alice alice-secret", view)
    assert block[0] == "> HISTORY 1"
    stamps = re.compile(r"\b(start|answer|end)=\S+|duration=\d+ talk_time=\d+")
    assert [stamps.sub("T", l) for l in session.handle_line("HISTORY 1", view)] == \
        [stamps.sub("T", l) for l in block[1:]]


def test_every_config_key_is_documented():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(HERE, "ctinotify.conf"), encoding="utf-8") as f:
        example = f.read()
    for key in ctinotify.GENERAL_KEYS + ctinotify.AMI_KEYS:
        assert "`%s`" % key in readme, key
        assert re.search(r"^;?%s =" % key, example, re.M), key


def test_the_example_configs_commented_settings_are_valid():
    with open(os.path.join(HERE, "ctinotify.conf"), encoding="utf-8") as f:
        text = f.read()
    config = parse_config(re.sub(r"(?m)^;(\w+ = )", r"\1", text), "ctinotify.conf")
    assert config.tls_port == 5040 and config.ami.tls and config.client_buffer_hard == 4 << 20


def test_check_warns_when_the_config_is_readable_by_everyone(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[ami]\nusername=u\nsecret=s\n[a]\nsecret=x\ndevices=SIP/1\n")
    os.chmod(str(conf), 0o644)
    assert "is readable by every user on this machine and holds secrets; chmod 640 it" in \
        run_cli("check", "-c", str(conf)).stderr
    os.chmod(str(conf), 0o640)
    assert "readable by every user" not in run_cli("check", "-c", str(conf)).stderr


def test_timers_of_closed_connections_do_not_pile_up(tmp_path):
    daemon = in_process_daemon(tmp_path, "")
    try:
        for i in range(10000):
            conn = ctinotify.ClientConnection(None, ("10.0.0.1", i), 30.0)
            conn.closed = True  # a flood: connected and gone again at once
            daemon._add_timer(30.0, "login", conn)
        assert len(daemon._timers) <= 4 * len(daemon.clients) + 257
    finally:
        daemon.selector.close()
