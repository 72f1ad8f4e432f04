"""The ECS task-credential proxy ([containers.ecs], src/container.rs) under attack.

    .venv/bin/python -m pytest -q tests/adversarial/test_adversarial_ecs.py     (as root)

Threat model: every local process may be hostile (any bytes, many connections, waiting
forever, any uid), and the ECS agent's answers may deviate from its documentation. Nothing may
put a task's RAW credentials into any byte credlock sends, hand one task another task's locked
set, or let one client deny others their locked sets.

Processes: moto (conftest), an adversarial IMDS upstream (`readbody`, for credlock's own
instance lock), the ECS agent stand-in (tests/support/ecs_agent_emulator.py), a recording STS
front in this process (tests/support/recording_sts.py: every AssumeRole's role, session,
signing key, session token and issued key; roles named "deny-..." are refused with STS's
AccessDenied, like a task role that does not trust itself), a HOSTILE agent in this process
(answers each credential id with bytes chosen by the test) and credlocks whose [containers.ecs]
points at one agent or the other (config written here, mirroring adversarial_lib.Credlock).

Ground truth is never credlock's code: the raw values the agents served (the stand-in's /state
and /requests, the hostile agent's own log), the STS front's log, and the flooder's counters.
Every byte a client receives is scanned for the raw markers (ASIARAWE, RAWSECRET, RAWTOKEN), for
every exact raw value and for 16-character fragments of them: literally, with NULs dropped
(UTF-16), inside gzip members and inside every JSON string literal (escapes resolved, duplicates
included).

Tests:
  * hostile agent answers (duplicate keys, secrets nested / in other keys / in arrays / escaped,
    error bodies, headers, non-UTF-8, BOM, UTF-16, lone surrogates, deep nesting, trailing bytes,
    huge bodies under every framing, wrong types, partial documents, 1xx/2xx/3xx with a document,
    trailers, gzip, Range) -> no raw byte;
  * path tricks on the stand-in (v1 query forms, escapes, //, ../, absolute-form, methods,
    bodies, HTTP/1.0, pipelines) -> no raw byte; a 200 is the set STS issued for that task;
  * cross-task: a concurrent flood alternating three tasks on keep-alive connections (one task
    rotated midway) only ever yields each id's own set; an agent that gives two tasks one
    AccessKeyId must not make one task's answer carry the other's set;
  * resources: flooder.py (as nobody) holding / trickling connections to the ECS listener while a
    victim task keeps getting its locked set within 1 s; a task whose AssumeRole fails, hammered
    by nobody, must not hold every connection slot; the agent's per-(client, path) rate limit
    must not become shared by all tasks;
  * STS budget: a burst of new tasks beyond the budget gets 503 for some, never raw, at most the
    budget's calls reach STS, and every task is locked once the budget refills; failing tasks
    must neither exceed the budget's rate at STS nor starve new tasks.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import gzip
import json
import os
import re
import secrets
import socket
import socketserver
import string
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

import pytest

import adversarial_lib as lib

if str(lib.REPO / "tests" / "support") not in sys.path:
    sys.path.insert(0, str(lib.REPO / "tests" / "support"))  # as adv_upstream.py does
import ecs_agent_control  # noqa: E402  (the agent stand-in's control API)
import recording_sts  # noqa: E402  (the recording STS front)

AGENT_SCRIPT = lib.REPO / "tests" / "support" / "ecs_agent_emulator.py"
ACCOUNT = "123456789012"
MARKERS = ("ASIARAWE", "RAWSECRET", "RAWTOKEN")
FRAGMENT = 16  # a run of this many characters of a raw secret or token is a leak
SESSION_PREFIX = "credlock-ecs-"
DENY_PREFIX = "deny-"
ECS_HOST = "169.254.170.2"
READY_TIMEOUT = 30.0
AGENT_DEFAULT_RATE_LIMIT = {"steady": 40, "burst": 60}  # the stand-in's (and the agent's)


# --------------------------------------------------------------------------------------------
# Raw values and the leak detector
# --------------------------------------------------------------------------------------------

def raw_set() -> dict:
    """A raw set marked like the stand-in's (standin.raw_secrets with prefix ASIARAWE)."""
    upper = string.ascii_uppercase + string.digits
    alphabet = string.ascii_letters + string.digits + "+/"
    return {
        "AccessKeyId": "ASIARAWE" + "".join(secrets.choice(upper) for _ in range(12)),
        "SecretAccessKey": "RAWSECRET" + "".join(secrets.choice(alphabet) for _ in range(31)),
        "Token": "RAWTOKEN" + base64.b64encode(secrets.token_bytes(120)).decode(),
    }


def expiration(hours: float = 6) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=hours)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _views(data: bytes) -> list[tuple[str, bytes]]:
    views = [("bytes", data), ("bytes without NULs", data.replace(b"\x00", b""))]
    at = data.find(b"\x1f\x8b\x08")
    while at >= 0:
        try:
            views.append(("a gzip member", zlib.decompressobj(wbits=31).decompress(data[at:])))
        except zlib.error:
            pass
        at = data.find(b"\x1f\x8b\x08", at + 1)
    return views


def leak_findings(data: bytes, raw_values) -> list[str]:
    """Every way a raw value shows in `data` (see the module docstring)."""
    raw_values = [v for v in raw_values if v]
    fragments = {}
    for value in raw_values:
        if not value.startswith("ASIA"):  # key ids are not secret; their prefix is a marker
            for i in range(0, len(value) - FRAGMENT + 1):
                fragments.setdefault(value[i:i + FRAGMENT], value)
    found: list[str] = []
    texts: list[tuple[str, str]] = []
    for name, view in _views(data):
        texts.append((name, view.decode("latin-1")))
        for match in _JSON_STRING.finditer(view):
            try:
                decoded = json.loads(match.group(0).decode("latin-1"))
            except ValueError:
                continue
            if "\\" in match.group(0).decode("latin-1"):
                texts.append((f"an escaped JSON string in {name}", decoded))
    for name, text in texts:
        upper = text.upper()
        for marker in MARKERS:
            if marker in upper:
                found.append(f"marker {marker} in {name}")
        for value in raw_values:
            if value in text:
                found.append(f"raw value {value[:14]}... in {name}")
        for i in range(0, len(text) - FRAGMENT + 1):
            value = fragments.get(text[i:i + FRAGMENT])
            if value is not None:
                found.append(f"a {FRAGMENT}-character fragment of raw {value[:12]}... in {name}")
                break
    return sorted(set(found))


# --------------------------------------------------------------------------------------------
# Raw HTTP to credlock's ECS listener
# --------------------------------------------------------------------------------------------

def ecs_request(method: str, target: str, headers=(), body: bytes = b"", close: bool = True,
                version: str = "HTTP/1.1", host: bool = True) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append(f"Host: {ECS_HOST}")
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(addr: str, data: bytes, head: bool = False, timeout: float = 8.0,
             drain: float = 0.3) -> tuple[lib.Reply | None, bytes]:
    """Send `data` on a fresh connection; (first reply, EVERY byte received until close or
    `drain` seconds after it)."""
    wire = lib.Wire(addr, timeout)
    try:
        wire.send(data)
        try:
            reply = wire.reply(head=head)
        except lib.Incomplete:
            reply = None
        if drain:
            try:
                wire.closed_within(drain)
            except OSError:
                pass
        return reply, wire.received
    finally:
        wire.close()


def get(addr: str, target: str, headers=(), method: str = "GET", timeout: float = 8.0):
    return exchange(addr, ecs_request(method, target, headers), head=method == "HEAD",
                    timeout=timeout)


# --------------------------------------------------------------------------------------------
# The ECS agent stand-in (a process) and the hostile agent (in this process)
# --------------------------------------------------------------------------------------------

class AgentStandIn(ecs_agent_control.AgentControl):
    """The stand-in as a process (`addr`, its agent listener) and its control API."""

    def __init__(self, workdir: Path):
        self.proc = lib.Process([str(lib.PYTHON), str(AGENT_SCRIPT), "--listen", "127.0.0.1:0",
                                 "--control", "127.0.0.1:0"], workdir / "ecs-agent-adv.log",
                                env=lib.clean_env(), stdout_pipe=True)
        found = lib.read_addresses(self.proc, ("listening", "control"), READY_TIMEOUT)
        super().__init__(found["control"], ACCOUNT)
        self.addr = found["listening"]

    def set_rate_limit(self, value) -> None:
        self.control("POST", "/state", {"rate_limit": value})

    def stop(self) -> None:
        self.proc.stop()


class Raw(str):
    """A JSON fragment written as is into a hand-made document."""


def document(pairs) -> bytes:
    """A JSON object from (key, value) pairs in order, duplicates kept; Raw values verbatim."""
    parts = []
    for key, value in pairs:
        text = value if isinstance(value, Raw) else json.dumps(value)
        parts.append(f"{json.dumps(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode()


HOSTILE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/adv-ecs-hostile-role"


def doc_pairs(raw: dict, role: str = HOSTILE_ROLE) -> list:
    return [("RoleArn", role), ("AccessKeyId", raw["AccessKeyId"]),
            ("SecretAccessKey", raw["SecretAccessKey"]), ("Token", raw["Token"]),
            ("Expiration", expiration())]


def answer(status: int, body: bytes = b"", headers=(), framing: str = "length",
           trailer: str = "", interim: bytes = b"", reason: str = "Hostile") -> bytes:
    """A whole HTTP/1.1 answer as bytes: framed by Content-Length, chunked (with `trailer`) or
    by the close; `interim` (1xx heads) first."""
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n" % len(body[i:i + 4096]) + body[i:i + 4096] + b"\r\n"
                           for i in range(0, len(body), 4096))
        payload += b"0\r\n" + (trailer.encode() + b"\r\n" if trailer else b"") + b"\r\n"
    else:  # until the close
        payload = body
    return interim + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def agent_error(status: int, code: str, message: str, headers=()) -> bytes:
    return answer(status, json.dumps({"code": code, "message": message,
                                      "HTTPErrorCode": status}, separators=(",", ":")).encode(),
                  headers)


class _HostileHandler(socketserver.BaseRequestHandler):
    agent: "HostileAgent"

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk or len(data) > 65536:
                    return
                data += chunk
        except OSError:
            return
        lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        if path == "/v1/credentials":
            case = urllib.parse.parse_qs(query).get("id", [""])[0]
        else:
            case = path.rsplit("/", 1)[-1]
        request = {"method": method, "target": target, "headers": headers, "case": case}
        respond = self.agent.cases.get(case)
        out = respond(request) if respond else agent_error(
            400, "InvalidIdInRequest", "CredentialsV2Request: Credentials not found")
        request["served"] = respond is not None
        self.agent.record(request)
        try:
            sock.sendall(out)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2)
            while sock.recv(65536):
                pass
        except OSError:
            pass


class HostileAgent:
    """An ECS agent that deviates: `cases[id](request) -> bytes` is the whole answer to a
    request for credential id `id`. `raw_values` holds every raw value it was given."""

    def __init__(self):
        self.cases: dict = {}
        self.log: list[dict] = []
        self.raw_values: set[str] = set()
        self.lock = threading.Lock()
        handler = type("HostileHandler", (_HostileHandler,), {"agent": self})
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"

    def add(self, respond, *raws: dict) -> str:
        case = "hostile-" + uuid.uuid4().hex[:16]
        for raw in raws:
            self.raw_values.update(raw.values())
        self.cases[case] = respond
        return case

    def record(self, request: dict) -> None:
        with self.lock:
            self.log.append(request)

    def served(self, case: str) -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["case"] == case and r["served"]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# credlock with [containers.ecs] (mirrors adversarial_lib.Credlock; the config is written here)
# --------------------------------------------------------------------------------------------

class EcsCredlock:
    def __init__(self, name: str, agent_addr: str, imds: lib.Upstream,
                 gate: recording_sts.RecordingSts, workdir: Path, assume_rate: float = 50,
                 max_tasks: int | None = None, max_connections: int | None = None):
        if not (lib.CREDLOCK_BIN.is_file() and os.access(lib.CREDLOCK_BIN, os.X_OK)):
            raise lib.Failure(f"credlock binary missing: {lib.CREDLOCK_BIN}")
        self.name = name
        self.addr = f"127.0.0.1:{lib.free_port()}"
        self.admin = f"127.0.0.1:{lib.free_port()}"
        self.ecs = f"127.0.0.1:{lib.free_port()}"
        self.started = time.monotonic()
        config = workdir / f"credlock-{name}.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.addr}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{imds.addr}"\n'
            + (f"max_connections = {max_connections}\n" if max_connections else "")
            + "\n[discovery.echo]\nenabled = false\n"
            "\n[containers.ecs]\n"
            f'listen = ["{self.ecs}"]\n'
            f'agent = "http://{agent_addr}"\n'
            f"assume_rate = {assume_rate}\n"
            + (f"max_tasks = {max_tasks}\n" if max_tasks else ""))
        env = lib.clean_env(AWS_ENDPOINT_URL_STS=gate.url, HOME=str(workdir),
                            AWS_REGION="us-east-1")
        self.proc = lib.Process([str(lib.CREDLOCK_BIN), "run", "--config", str(config)],
                                workdir / f"credlock-{name}.log", env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not self.proc.alive():
                raise lib.Failure(f"credlock ({name}) exited: {self.proc.tail()}")
            try:
                if lib.simple_http(self.admin, "GET", "/readyz", timeout=3)[0] == 200:
                    with socket.create_connection(lib.split_addr(self.ecs), timeout=2):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise lib.Failure(f"credlock ({name}) not ready: {self.proc.tail()}")
            time.sleep(0.1)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.alive()

    def metric(self, name: str, labels: str = "") -> float:
        status, body = lib.simple_http(self.admin, "GET", "/metrics")
        if status != 200:
            raise lib.Failure(f"credlock /metrics: {status}")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def stop(self) -> None:
        self.proc.stop()


def wait_ready_without_budget(credlock: EcsCredlock, agent: "AgentStandIn") -> None:
    """Until credlock judges task documents (a document without RoleArn is refused 502 once the
    instance and its environment are known, before any STS budget is spent)."""
    probe = agent.new_task("adv-ecs-ready-role", document={"RoleArn": None})
    deadline = time.monotonic() + 15
    last = None
    while time.monotonic() < deadline:
        last, _ = get(credlock.ecs, f"/v2/credentials/{probe['id']}")
        if last is not None and last.status == 502:
            return
        time.sleep(0.2)
    raise lib.Failure(f"credlock ({credlock.name}) never judged a task document: {last!r}")


def wait_locked(credlock: EcsCredlock, target: str, timeout: float = 15.0) -> lib.Reply:
    """The first 200 on `target` (credlock may still be learning its environment)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        reply, _ = get(credlock.ecs, target)
        if reply is not None and reply.status == 200:
            return reply
        last = reply
        time.sleep(0.2)
    raise lib.Failure(f"credlock ({credlock.name}) never served {target}: {last!r} "
                      f"{credlock.proc.tail()}")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate(moto_url):
    """The recording STS front; its queries see task sets (session credlock-ecs-...) only."""
    with recording_sts.RecordingSts(moto_url, deny_prefix=DENY_PREFIX,
                                    session_prefix=SESSION_PREFIX) as sts:
        yield sts


@pytest.fixture(scope="module")
def imds(workdir):
    upstream = lib.Upstream("readbody", workdir, name="ecs-imds")
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def agent(workdir):
    a = AgentStandIn(workdir)
    try:
        a.set_rate_limit(None)
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def hostile():
    h = HostileAgent()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def hostile_credlock(hostile, imds, gate, workdir):
    c = EcsCredlock("ecs-hostile", hostile.addr, imds, gate, workdir)
    try:
        raw = raw_set()
        case = hostile.add(lambda _r: answer(200, document(doc_pairs(raw))), raw)
        wait_locked(c, f"/v2/credentials/{case}")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def ecs(agent, imds, gate, workdir):
    c = EcsCredlock("ecs-standin", agent.addr, imds, gate, workdir)
    try:
        probe = agent.new_task("adv-ecs-probe-role")
        wait_locked(c, f"/v2/credentials/{probe['id']}")
        yield c
    finally:
        c.stop()


def assert_alive(credlock: EcsCredlock) -> None:
    assert credlock.alive(), f"credlock ({credlock.name}) died: {credlock.proc.tail()}"


# --------------------------------------------------------------------------------------------
# (a) Hostile agent answers: no raw byte, whatever the agent says
# --------------------------------------------------------------------------------------------

def _plain(raw, other):
    return lambda r: answer(200, document(doc_pairs(raw)))


def _with(extra):
    """A documented credential document plus extra pairs (extra(raw, other) -> pairs)."""
    return lambda raw, other: (lambda r: answer(200, document(doc_pairs(raw) + extra(raw, other))))


def _escape_all(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _duplicate_every_field(raw, other):
    first = [(k, other[k]) for k in ("AccessKeyId", "SecretAccessKey", "Token")]
    return lambda r: answer(200, document(first + [("Expiration", "x")] + doc_pairs(raw)))


def _status_with_document(status, headers=()):
    return lambda raw, other: (lambda r: answer(status, document(doc_pairs(raw)), headers))


def _body(make):
    """A 200 whose body is make(raw, other) (bytes)."""
    return lambda raw, other: (lambda r: answer(200, make(raw, other)))


def _padded(size):
    def make(raw, other):
        pad = b" " * max(0, size - 600)
        return b"{" + pad + document(doc_pairs(raw))[1:]
    return make


def _huge(framing):
    return lambda raw, other: (lambda r: answer(200, _padded(1_572_864)(raw, other),
                                                framing=framing))


def _wrong(field, value):
    def make(raw, other):
        pairs = [(k, (Raw(value(raw)) if k == field else v)) for k, v in doc_pairs(raw)]
        return document(pairs)
    return _body(make)


def _without(field):
    return _body(lambda raw, other: document([(k, v) for k, v in doc_pairs(raw) if k != field]))


# name -> (builder(raw, other) -> respond(request) -> bytes, must it be served locked?)
HOSTILE_CASES = {
    "control-documented-shape": (_plain, True),
    # duplicate keys
    "duplicate-secret-key": (_with(lambda raw, o: [("SecretAccessKey", o["SecretAccessKey"])]),
                             False),
    "duplicate-every-field-first-other-set": (_duplicate_every_field, False),
    "duplicate-note-escaped-own-secret": (
        _with(lambda raw, o: [("Note", Raw('"' + _escape_all(raw["SecretAccessKey"]) + '"')),
                              ("Note", "ok")]), False),
    # secrets outside the replaced fields
    "other-case-secret-key-other-set": (
        _with(lambda raw, o: [("secretAccessKey", o["SecretAccessKey"])]), False),
    "nested-credentials-other-set": (
        _with(lambda raw, o: [("Credentials", {k: o[k] for k in o})]), False),
    "nested-secret-own-set": (_with(lambda raw, o: [("Debug", {"SecretAccessKey":
                                                               raw["SecretAccessKey"]})]), False),
    "token-in-array-other-set": (_with(lambda raw, o: [("Extra", [o["Token"]])]), False),
    "secret-as-key-name-other-set": (_with(lambda raw, o: [(o["SecretAccessKey"], 1)]), False),
    "escaped-own-secret-in-note": (
        _with(lambda raw, o: [("Note", Raw('"' + _escape_all(raw["SecretAccessKey"]) + '"'))]),
        False),
    # bodies serde cannot parse but other JSON readers can (or that hold the bytes anyway)
    "non-utf8-byte-in-note": (_body(lambda raw, o: document(doc_pairs(raw))[:-1]
                                    + b',"Note":"\xff"}'), False),
    "utf8-bom": (_body(lambda raw, o: b"\xef\xbb\xbf" + document(doc_pairs(raw))), False),
    "utf16-document": (_body(lambda raw, o: document(doc_pairs(raw)).decode().encode("utf-16")),
                       False),
    "lone-surrogate-in-note": (_with(lambda raw, o: [("Note", Raw('"\\ud800"'))]), False),
    "nesting-deeper-than-serde": (_with(lambda raw, o: [("Note", Raw("[" * 200 + "]" * 200))]),
                                  False),
    "trailing-bytes": (_body(lambda raw, o: document(doc_pairs(raw)) + b"\n<!-- x -->"), False),
    "two-documents": (_body(lambda raw, o: document(doc_pairs(raw)) * 2), False),
    "nan-in-note": (_with(lambda raw, o: [("Note", Raw("NaN"))]), False),
    # huge bodies (credlock reads at most 1 MiB)
    "huge-under-limit": (_body(_padded(900_000)), False),
    "huge-over-limit-content-length": (_huge("length"), False),
    "huge-over-limit-chunked": (_huge("chunked"), False),
    "huge-over-limit-until-close": (_huge("close"), False),
    # wrong types, partial documents
    "token-number": (_wrong("Token", lambda raw: "12345"), False),
    "secret-object": (_wrong("SecretAccessKey",
                             lambda raw: json.dumps({"value": raw["SecretAccessKey"]})), False),
    "key-array": (_wrong("AccessKeyId", lambda raw: json.dumps([raw["AccessKeyId"]])), False),
    "expiration-number": (_wrong("Expiration", lambda raw: "1700000000"), False),
    "expiration-null": (_wrong("Expiration", lambda raw: "null"), False),
    "partial-no-token": (_without("Token"), False),
    "partial-no-expiration": (_without("Expiration"), False),
    "empty-access-key-id": (_body(lambda raw, o: document(
        [(k, "" if k == "AccessKeyId" else v) for k, v in doc_pairs(raw)])), False),
    "200-credentials-under-other-names": (_body(lambda raw, o: document([
        ("RoleArn", HOSTILE_ROLE), ("Credential", f"{raw['AccessKeyId']}:"
                                                  f"{raw['SecretAccessKey']}:{raw['Token']}"),
        ("Expiration", expiration())])), False),
    # error answers and headers
    "error-500-message-with-raw": (lambda raw, o: (lambda r: agent_error(
        500, "InternalError", f"refresh failed for {raw['AccessKeyId']} secret "
                              f"{raw['SecretAccessKey']} token {raw['Token']}")), False),
    "error-400-with-secret-key": (lambda raw, o: (lambda r: answer(400, document(
        [("code", "x"), ("SecretAccessKey", raw["SecretAccessKey"])]))), False),
    "error-503-plain-text-raw": (lambda raw, o: (lambda r: answer(
        503, f"unavailable {raw['SecretAccessKey']}".encode(),
        [("Content-Type", "text/plain")])), False),
    "header-own-raw-on-200": (lambda raw, o: (lambda r: answer(
        200, document(doc_pairs(raw)), [("X-Debug", raw["SecretAccessKey"])])), False),
    "header-other-raw-on-200": (lambda raw, o: (lambda r: answer(
        200, document(doc_pairs(raw)), [("X-Amz-Security-Token", o["Token"])])), False),
    "header-raw-on-400": (lambda raw, o: (lambda r: agent_error(
        400, "InvalidIdInRequest", "CredentialsV2Request: Credentials not found",
        [("X-Debug", raw["SecretAccessKey"])])), False),
    # statuses other than 200 carrying the document
    **{f"status-{s}-with-document": (_status_with_document(s), False)
       for s in (201, 202, 203, 206, 226, 299, 300, 301, 302, 307, 308)},
    "status-204-with-body": (_status_with_document(204), False),
    "status-304-with-body": (_status_with_document(304), False),
    "status-301-location-with-raw": (lambda raw, o: (lambda r: answer(
        301, b"", [("Location", f"/v2/credentials/x?s={raw['SecretAccessKey']}")])), False),
    # framing extras
    "interim-103-with-raw-then-document": (lambda raw, o: (lambda r: answer(
        200, document(doc_pairs(raw)), interim=(
            f"HTTP/1.1 103 Early Hints\r\nLink: <{o['SecretAccessKey']}>\r\n\r\n").encode())),
        True),
    "chunked-trailer-with-other-raw": (lambda raw, o: (lambda r: answer(
        200, document(doc_pairs(raw)), framing="chunked",
        trailer=f"X-Raw: {o['SecretAccessKey']}")), True),
    "gzip-always": (lambda raw, o: (lambda r: answer(
        200, gzip.compress(document(doc_pairs(raw))), [("Content-Encoding", "gzip")])), False),
}


@pytest.mark.parametrize("case_name", list(HOSTILE_CASES))
def test_hostile_agent_answer_never_reaches_a_client_raw(hostile, hostile_credlock, gate,
                                                         case_name):
    builder, must_lock = HOSTILE_CASES[case_name]
    raw, other = raw_set(), raw_set()
    case = hostile.add(builder(raw, other), raw, other)
    reply, data = get(hostile_credlock.ecs, f"/v2/credentials/{case}")
    assert hostile.served(case), "the hostile answer was never asked for: the test proves nothing"
    findings = leak_findings(data, hostile.raw_values)
    assert not findings, (f"RAW VALUE reached the client ({case_name}): {findings}\n"
                          f"{data[:700]!r}")
    assert reply is not None, f"no answer ({case_name})"
    if must_lock:
        assert reply.status == 200, reply
        assert reply.json()["AccessKeyId"] in gate.issued_for(raw["AccessKeyId"]), \
            f"not a set STS issued for this document's raw credentials: {reply!r}"
    assert_alive(hostile_credlock)


def test_hostile_agent_error_with_raw_values_credlock_has_seen(hostile, hostile_credlock):
    """The agent first serves a document (locked), then an error quoting its raw values: then
    the same after it answered 400 for the id (credlock drops the id's sets), and gzipped."""
    raw = raw_set()
    steps = iter([
        ("document", lambda: answer(200, document(doc_pairs(raw)))),
        ("500 quoting the set", lambda: agent_error(500, "InternalError",
                                                    f"bad secret {raw['SecretAccessKey']}")),
        ("the document gzipped", lambda: answer(200, gzip.compress(document(doc_pairs(raw))),
                                                [("Content-Encoding", "gzip")])),
        ("400 (id gone)", lambda: agent_error(400, "InvalidIdInRequest",
                                              "CredentialsV2Request: Credentials not found")),
        ("500 quoting the set after the 400", lambda: agent_error(
            500, "InternalError", f"bad secret {raw['SecretAccessKey']} {raw['Token']}")),
    ])
    current = {}

    def respond(_request):
        return current["make"]()

    case = hostile.add(respond, raw)
    problems = []
    for label, make in steps:
        current["make"] = make
        reply, data = get(hostile_credlock.ecs, f"/v2/credentials/{case}")
        if label == "document" and (reply is None or reply.status != 200):
            pytest.fail(f"the first, documented answer was not served locked: {reply!r}")
        findings = leak_findings(data, hostile.raw_values)
        if findings:
            problems.append(f"{label}: RAW VALUE reached the client: {findings} {data[:300]!r}")
    assert not problems, "\n".join(problems)


def test_hostile_agent_honouring_accept_encoding_and_range(hostile, hostile_credlock):
    """An agent behind a compressing / range-serving layer (as any RFC 9110 server may be): a
    client's Accept-Encoding or Range must never turn its task's raw document into bytes it
    receives (the IMDS listener strips these headers on credential routes)."""
    raw = raw_set()
    body = document(doc_pairs(raw))

    def respond(request):
        headers = request["headers"]
        if "gzip" in headers.get("accept-encoding", ""):
            return answer(200, gzip.compress(body), [("Content-Encoding", "gzip")])
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
        if match:
            start, end = int(match.group(1)), min(int(match.group(2)), len(body) - 1)
            return answer(206, body[start:end + 1],
                          [("Content-Range", f"bytes {start}-{end}/{len(body)}")])
        return answer(200, body)

    case = hostile.add(respond, raw)
    target = f"/v2/credentials/{case}"
    reply, _ = get(hostile_credlock.ecs, target)
    assert reply is not None and reply.status == 200, f"plain request not locked: {reply!r}"
    problems = []
    _, data = get(hostile_credlock.ecs, target, [("Accept-Encoding", "gzip")])
    if leak_findings(data, hostile.raw_values):
        problems.append(f"Accept-Encoding: gzip: {leak_findings(data, hostile.raw_values)}")
    collected = b""
    for start in range(0, len(body), 40):
        _, data = get(hostile_credlock.ecs, target, [("Range", f"bytes={start}-{start + 59}")])
        collected += data
    if leak_findings(collected, hostile.raw_values):
        problems.append(f"Range slices: {leak_findings(collected, hostile.raw_values)}")
    forwarded = sorted({name for r in hostile.served(case) for name in r["headers"]
                        if name in ("accept-encoding", "range")})
    assert not problems, (f"RAW VALUES reached the client: {problems}; headers the agent "
                          f"received from credlock: {forwarded}")


# --------------------------------------------------------------------------------------------
# (b) Path tricks against the faithful stand-in
# --------------------------------------------------------------------------------------------

def _escaped(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def test_path_tricks_never_yield_raw_values(agent, ecs, gate):
    task = agent.new_task("adv-ecs-paths-role")
    cid = task["id"]
    raw_key = task["document"]["AccessKeyId"]
    probe = uuid.uuid4().hex
    requests = [
        ("GET", f"/v2/credentials/{cid}", (), b""),
        ("GET", f"/v1/credentials?id={cid}", (), b""),
        ("GET", f"/v1/credentials?id={cid}&id=other", (), b""),
        ("GET", f"/v1/credentials?id=other&id={cid}", (), b""),
        ("GET", f"/v1/credentials?x=1&id={cid}", (), b""),
        ("GET", f"/v1/credentials?id={_escaped(cid)}", (), b""),
        ("GET", f"/v1/credentials?%69d={cid}", (), b""),
        ("GET", f"/v1/credentials/?id={cid}", (), b""),
        ("GET", f"/v2/credentials/{_escaped(cid)}", (), b""),
        ("GET", f"/%76%32/credentials/{cid}", (), b""),
        ("GET", f"/v2/credentials%2F{cid}", (), b""),
        ("GET", f"//v2/credentials/{cid}", (), b""),
        ("GET", f"/v2//credentials/{cid}", (), b""),
        ("GET", f"/v2/credentials/../credentials/{cid}", (), b""),
        ("GET", f"/v2/./credentials/{cid}", (), b""),
        ("GET", f"/v2/credentials/x/../{cid}", (), b""),
        ("GET", f"/v2/credentials/{cid}/", (), b""),
        ("GET", f"/v2/credentials/{cid}?x=1", (), b""),
        ("GET", f"/v2/credentials/{cid}%00", (), b""),
        ("GET", f"/v2/credentials/{cid}%", (), b""),
        ("GET", f"http://{ECS_HOST}/v2/credentials/{cid}", (), b""),
        ("GET", f"http://{agent.addr}/v2/credentials/{cid}", (), b""),
        ("GET", f"HTTP://{ECS_HOST}:80/v2/credentials/{cid}", (), b""),
        ("HEAD", f"/v2/credentials/{cid}", (), b""),
        ("OPTIONS", f"/v2/credentials/{cid}", (), b""),
        ("OPTIONS", "*", (), b""),
        ("DELETE", f"/v2/credentials/{cid}", (), b""),
        ("PUT", f"/v2/credentials/{cid}", (("Content-Length", "0"),), b""),
        ("POST", f"/v2/credentials/{cid}", (("Content-Length", "0"),), b""),
        ("POST", f"/v2/credentials/{cid}", (("Content-Length", "2"), ("X-Probe", probe)), b"{}"),
        ("POST", f"/v2/credentials/{cid}",
         (("Transfer-Encoding", "chunked"), ("X-Probe", probe)), b"2\r\n{}\r\n0\r\n\r\n"),
        ("GET", f"/v2/credentials/{cid}", (("Content-Length", "5"), ("X-Probe", probe)), b"GET /"),
        ("GET", f"/v2/credentials/{cid}", (("Accept-Encoding", "gzip"), ("Range", "bytes=0-60"),
                                           ("If-None-Match", "*")), b""),
        ("GET", f"/v2/credentials/{cid}", (("Expect", "100-continue"),), b""),
        ("get", f"/v2/credentials/{cid}", (), b""),
    ]
    problems = []
    locked_keys = set()
    raw_values = agent.raw_values()
    for method, target, headers, body in requests:
        data = ecs_request(method, target, headers, body)
        reply, received = exchange(ecs.ecs, data, head=method == "HEAD")
        label = f"{method} {target} {dict(headers)}"
        findings = leak_findings(received, raw_values)
        if findings:
            problems.append(f"{label}: RAW VALUE reached the client: {findings}")
        if reply is not None and reply.status == 200 and method != "HEAD":
            try:
                key = reply.json()["AccessKeyId"]
            except (ValueError, KeyError):
                problems.append(f"{label}: a 200 that is not a document: {reply!r}")
                continue
            locked_keys.add(key)
            if key not in gate.issued_for(raw_key):
                problems.append(f"{label}: 200 with a key STS did not issue for this task: {key}")
        if reply is not None and reply.status == 301:
            location = reply.header("Location") or ""
            if location.startswith("/"):
                _, received = get(ecs.ecs, location)
                if leak_findings(received, raw_values):
                    problems.append(f"{label} -> {location}: {leak_findings(received, raw_values)}")
    # Three HTTP/1.0 and pipelined forms on one connection each.
    for data in (ecs_request("GET", f"/v2/credentials/{cid}", version="HTTP/1.0", host=False,
                             close=False),
                 ecs_request("GET", "/v2/credentials/unknown-id", close=False)
                 + ecs_request("GET", f"/v2/credentials/{cid}", close=False)
                 + ecs_request("GET", f"/v1/credentials?id={cid}"),
                 ecs_request("HEAD", f"/v2/credentials/{cid}", close=False)
                 + ecs_request("GET", f"/v2/credentials/{cid}")):
        _, received = exchange(ecs.ecs, data, drain=1.0)
        if leak_findings(received, raw_values):
            problems.append(f"pipeline {data[:60]!r}: {leak_findings(received, raw_values)}")
    reached = [r for r in agent.agent_requests()
               if any(k.lower() == "x-probe" and v == probe for k, v in r["headers"])]
    if reached:
        problems.append(f"a request with a body reached the agent: {reached[:2]}")
    assert locked_keys, "no trick was served a locked set: the test proves nothing"
    assert not problems, "\n".join(problems)
    assert_alive(ecs)


# --------------------------------------------------------------------------------------------
# (c) Cross-task
# --------------------------------------------------------------------------------------------

def test_concurrent_alternating_tasks_only_ever_get_their_own_sets(agent, ecs, gate):
    tasks = {"A": agent.new_task("adv-ecs-shared-role"), "B": agent.new_task("adv-ecs-shared-role"),
             "C": agent.new_task("adv-ecs-other-role")}
    ids = {name: t["id"] for name, t in tasks.items()}
    first = {}
    for name, cid in ids.items():
        reply = wait_locked(ecs, f"/v2/credentials/{cid}")
        first[name] = reply.json()["AccessKeyId"]
    assert len(set(first.values())) == 3, f"two tasks got one set: {first}"
    names = list(ids)
    answers = []
    lock = threading.Lock()
    rotated = threading.Event()
    halfway = threading.Barrier(13, timeout=30)  # 12 workers and this thread

    def worker(index: int) -> None:
        wire = lib.Wire(ecs.ecs, timeout=10)
        try:
            for n in range(24):
                if n == 12:
                    halfway.wait()
                    rotated.wait(30)
                name = names[(index + n) % 3]
                try:
                    wire.send(ecs_request("GET", f"/v2/credentials/{ids[name]}", close=False))
                    reply = wire.reply()
                except (OSError, lib.Incomplete) as err:
                    reply = f"{type(err).__name__}: {err}"
                with lock:
                    answers.append((name, rotated.is_set(), reply))
                if isinstance(reply, str) or reply is None:
                    return
        finally:
            received = wire.received
            wire.close()
            with lock:
                answers.append(("bytes", None, received))

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(worker, i) for i in range(12)]
        halfway.wait()
        rotated_raw = agent.rotate(ids["A"])["document"]
        rotated.set()
        for f in futures:
            f.result(timeout=60)
    raw_values = agent.raw_values()
    problems = []
    served = {name: set() for name in names}
    for name, _, reply in answers:
        if name == "bytes":
            if leak_findings(reply, raw_values):
                problems.append(f"RAW VALUE on a connection: {leak_findings(reply, raw_values)}")
            continue
        if isinstance(reply, str) or reply is None or reply.status != 200:
            problems.append(f"{name}: {reply!r}")
            continue
        key = reply.json()["AccessKeyId"]
        served[name].add(key)
        call = gate.call_that_issued(key)
        owner = agent.owner.get(call["signer"]) if call else None
        if owner != ids[name]:
            holder = [n for n, cid in ids.items() if cid == owner]
            problems.append(f"task {name} was served {key}, issued for "
                            f"{holder or owner or 'no task'}")
    for name in ("B", "C"):
        if served[name] != {first[name]}:
            problems.append(f"task {name}'s set changed without a rotation: {served[name]}")
    after = {reply.json()["AccessKeyId"] for name, late, reply in answers
             if name == "A" and late and not isinstance(reply, (str, bytes)) and reply
             and reply.status == 200}
    if not after & gate.issued_for(rotated_raw["AccessKeyId"]):
        problems.append(f"after A's rotation, A was never served a set locked with its new raw "
                        f"credentials: {after}")
    assert len(answers) > 12 * 24 * 0.9, len(answers)
    assert not problems, "\n".join(problems[:20])


def test_two_tasks_with_one_raw_access_key_id_never_share_a_set(agent, ecs, gate):
    """An agent (deviating) that hands task B a raw set whose AccessKeyId is task A's but whose
    secret and token are B's: B's answer must be locked with B's own credentials, never A's
    set (credlock keys its sets by the raw AccessKeyId alone)."""
    a = agent.new_task("adv-ecs-collide-role")
    b = agent.new_task("adv-ecs-collide-role",
                       document={"AccessKeyId": a["document"]["AccessKeyId"]})
    assert b["document"]["SecretAccessKey"] != a["document"]["SecretAccessKey"]
    key_a = wait_locked(ecs, f"/v2/credentials/{a['id']}").json()["AccessKeyId"]
    reply, data = get(ecs.ecs, f"/v2/credentials/{b['id']}")
    assert not leak_findings(data, agent.raw_values()), leak_findings(data, agent.raw_values())
    assert reply is not None, "no answer"
    if reply.status == 200:
        key_b = reply.json()["AccessKeyId"]
        issued_with_b = gate.issued_for(b["document"]["AccessKeyId"],
                                        token=b["document"]["Token"])
        assert key_b != key_a, (
            f"task B ({b['id']}) was served task A's locked set {key_a} (session "
            f"{SESSION_PREFIX}{a['id']}, signed with A's secret): no AssumeRole was made with "
            f"B's own credentials")
        assert key_b in issued_with_b, f"B's set was not issued with B's token: {key_b}"
    else:
        assert reply.status in (502, 503), reply


# --------------------------------------------------------------------------------------------
# (d) Connection floods on the ECS listener
# --------------------------------------------------------------------------------------------

FLOOD_SLOTS = 64
FLOOD_SECONDS = 6.0
FLOOD_WARMUP = 2.0
VICTIM_LIMIT = 1.0
MIN_VICTIM_REQUESTS = 12
RSS_BOUND_MB = 48
# mode: (connections, new connections per second, proof of a real flood)
ECS_FLOODS = {"idle-keepalive": (160, 150, "evicted"), "trickle": (160, 150, "evicted"),
              "unsent-body": (160, 150, "refused")}


def run_as_nobody(argv: list[str], out) -> subprocess.Popen:
    if os.geteuid() != 0:
        pytest.fail("needs root: the attacker runs as `nobody`, another user than the victim")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            user="nobody", group="nogroup", extra_groups=[], cwd="/",
                            env={"PATH": "/usr/bin:/bin"}, start_new_session=True)


def wait_started(proc, out, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out.seek(0)
        if b"started" in out.read():
            return time.monotonic()
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    out.seek(0)
    pytest.fail(f"the attacker did not start: {out.read()[-2000:]!r}")


def finish(proc, out, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, 9)
        proc.wait(timeout=5)
        pytest.fail("the attacker overran its duration")
    out.seek(0)
    lines = out.read().decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"attacker output: {lines[-20:]}")


def victim_rounds(credlock: EcsCredlock, target: str, key: str, until: float,
                  raw_values) -> list:
    """Fresh-connection requests for the victim's task until `until`: (seconds, problem)."""
    results = []
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            reply, data = get(credlock.ecs, target, timeout=2.5)
            took = time.monotonic() - started
            problem = None
            if leak_findings(data, raw_values):
                problem = f"RAW: {leak_findings(data, raw_values)}"
            elif reply is None or reply.status != 200:
                problem = f"answer {reply!r}"
            elif reply.json().get("AccessKeyId") != key:
                problem = f"not the victim's locked set: {reply!r}"
        except Exception as err:  # noqa: BLE001 - resets and timeouts are what is counted
            took, problem = time.monotonic() - started, f"{type(err).__name__}: {err}"
        results.append((took, problem))
        time.sleep(0.15)
    return results


def judge_victims(results: list, report: str) -> list[str]:
    problems = []
    failed = [r for r in results if r[1] is not None]
    slow = [r for r in results if r[1] is None and r[0] > VICTIM_LIMIT]
    if len(results) < MIN_VICTIM_REQUESTS:
        problems.append(f"only {len(results)} victim requests (need {MIN_VICTIM_REQUESTS})")
    if failed:
        problems.append(f"{len(failed)} of {len(results)} victim requests failed, e.g. "
                        f"{failed[:3]}")
    if slow:
        problems.append(f"{len(slow)} victim requests took over {VICTIM_LIMIT} s, e.g. "
                        f"{[round(t, 3) for t, _ in slow[:5]]}")
    return [f"{p} ({report})" for p in problems]


@pytest.fixture(scope="module")
def flood_credlock(agent, imds, gate, workdir):
    c = EcsCredlock("ecs-flood", agent.addr, imds, gate, workdir, max_connections=FLOOD_SLOTS)
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize("mode", list(ECS_FLOODS))
def test_connection_flood_by_nobody_keeps_a_victim_task_served(agent, flood_credlock, workdir,
                                                               mode):
    credlock = flood_credlock
    conns, rate, proof = ECS_FLOODS[mode]
    victim = agent.new_task("adv-ecs-flood-victim-role")
    target = f"/v2/credentials/{victim['id']}"
    key = wait_locked(credlock, target).json()["AccessKeyId"]
    evicted_before = credlock.metric("credlock_connections_evicted_total", 'listener="ecs"')
    raw_values = agent.raw_values()
    out = open(workdir / f"ecs-flooder-{mode}.out", "w+b")
    proc = run_as_nobody([lib.SYSTEM_PYTHON, str(lib.FLOODER), "--mode", mode,
                          "--target", credlock.ecs, "--conns", str(conns), "--rate", str(rate),
                          "--duration", str(FLOOD_SECONDS)], out)
    try:
        started = wait_started(proc, out)
        time.sleep(FLOOD_WARMUP)
        results = victim_rounds(credlock, target, key, started + FLOOD_SECONDS - 0.3, raw_values)
        stats = finish(proc, out, FLOOD_SECONDS + 20)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(timeout=5)
        out.close()
    evicted = credlock.metric("credlock_connections_evicted_total", 'listener="ecs"') \
        - evicted_before
    hwm = lib.proc_status(credlock.pid)["VmHWM"]
    report = f"flood {mode}: evicted={evicted:.0f} VmHWM={hwm} kB flooder={stats}"
    print(report)
    problems = judge_victims(results, report)
    if proof == "evicted" and evicted < conns - FLOOD_SLOTS:
        problems.append(f"the flood was not real: evicted {evicted} < {conns - FLOOD_SLOTS}")
    if proof == "refused" and stats["statuses"].get("400", 0) < conns:
        problems.append(f"the flood was not real: {stats['statuses']}")
    if stats.get("uid") == 0:
        problems.append("the flooder ran as root")
    if stats.get("raw_seen"):
        problems.append(f"RAW VALUES reached the flooder {stats['raw_seen']} times")
    if hwm > RSS_BOUND_MB * 1024:
        problems.append(f"peak RSS {hwm / 1024:.1f} MB > {RSS_BOUND_MB} MB")
    if not credlock.alive():
        problems.append(f"credlock died: {credlock.proc.tail()}")
    assert not problems, report + "\n" + "\n".join(problems)


# A hostile client of its own (run as nobody with /usr/bin/python3): `conns` threads, each on a
# keep-alive connection (reopened when closed) asking for one of PATHS again and again.
HAMMER = r"""
import json, os, socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
duration, conns, pause, paths = (float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                 sys.argv[5:])
end = time.monotonic() + duration
stats = {"requests": 0, "answers": 0, "statuses": {}, "reconnects": 0, "connect_errors": 0,
         "raw_seen": 0, "uid": os.getuid()}
lock = threading.Lock()
def worker(i):
    request = ("GET %s HTTP/1.1\r\nHost: 169.254.170.2\r\n\r\n" % paths[i % len(paths)]).encode()
    while time.monotonic() < end:
        try:
            s = socket.create_connection((host, int(port)),
                                         timeout=max(0.2, end - time.monotonic()),
                                         source_address=("127.0.0.%d" % (2 + i % 8), 0))
        except OSError:
            with lock: stats["connect_errors"] += 1
            time.sleep(0.05)
            continue
        buf = b""
        try:
            while time.monotonic() < end:
                s.sendall(request)
                with lock: stats["requests"] += 1
                while b"\r\n\r\n" not in buf:
                    d = s.recv(65536)
                    if not d: raise EOFError
                    buf += d
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length": length = int(v)
                while len(rest) < length:
                    d = s.recv(65536)
                    if not d: raise EOFError
                    rest += d
                body, buf = rest[:length], rest[length:]
                code = head.split(b" ")[1].decode()
                with lock:
                    stats["answers"] += 1
                    stats["statuses"][code] = stats["statuses"].get(code, 0) + 1
                    if any(m in head + body for m in (b"ASIARAWE", b"RAWSECRET", b"RAWTOKEN")):
                        stats["raw_seen"] += 1
                if pause:
                    time.sleep(pause)
        except (OSError, EOFError, ValueError, IndexError):
            with lock: stats["reconnects"] += 1
        finally:
            s.close()
for i in range(conns):
    threading.Thread(target=worker, args=(i,), daemon=True).start()
print("started", flush=True)
time.sleep(max(0.0, end - time.monotonic()) + 0.2)
with lock:
    print(json.dumps(stats), flush=True)
os._exit(0)
"""


def start_hammer(target: str, duration: float, conns: int, paths: list[str], out,
                 pause: float = 0.0):
    """`pause`: seconds each connection waits after an answer before its next request."""
    return run_as_nobody([lib.SYSTEM_PYTHON, "-c", HAMMER, target, str(duration), str(conns),
                          str(pause), *paths], out)


def test_a_task_whose_assume_role_fails_cannot_hold_every_connection_slot(agent, imds, gate,
                                                                         workdir):
    """nobody hammers the credential id of a task whose role STS refuses (a task role that does
    not trust itself) with more connections than credlock has slots, the agent's own rate limit
    on (40/s, burst 60). Every such request queues on the task's lock while it waits for the
    STS budget, so its connection is 'busy' and never evicted. Another task (already locked)
    must still get its set within 1 s on fresh connections."""
    agent.set_rate_limit(AGENT_DEFAULT_RATE_LIMIT)
    credlock = EcsCredlock("ecs-slots", agent.addr, imds, gate, workdir, assume_rate=1,
                           max_connections=FLOOD_SLOTS)
    proc = None
    out = open(workdir / "ecs-hammer-slots.out", "w+b")
    try:
        victim = agent.new_task("adv-ecs-slot-victim-role")
        target = f"/v2/credentials/{victim['id']}"
        key = wait_locked(credlock, target).json()["AccessKeyId"]
        failing = agent.new_task(f"{DENY_PREFIX}adv-ecs-slot-role")
        raw_values = agent.raw_values()
        duration = 7.0
        # Paced (each connection asks again 0.1 s after an answer, up to ~1,000 requests/s in
        # all): the slots are what is attacked, not the agent's or this machine's throughput.
        # A request that waited on the failing task's lock held its slot for seconds; more
        # connections than slots then starved every other task, whatever the pace.
        proc = start_hammer(credlock.ecs, duration, FLOOD_SLOTS + 36,
                            [f"/v2/credentials/{failing['id']}"], out, pause=0.1)
        started = wait_started(proc, out)
        time.sleep(2.0)
        results = victim_rounds(credlock, target, key, started + duration - 0.3, raw_values)
        stats = finish(proc, out, duration + 20)
        calls = gate.assumes(signers=[failing["document"]["AccessKeyId"]])
        report = (f"hammer: {stats}; AssumeRole calls for the failing task: {len(calls)}; "
                  f"victim timings {sorted(round(t, 2) for t, _ in results)[-5:]}")
        print(report)
        problems = judge_victims(results, report)
        if stats.get("uid") == 0:
            problems.append("the attacker ran as root")
        if stats.get("raw_seen"):
            problems.append(f"RAW VALUES reached the attacker {stats['raw_seen']} times")
        if not calls:
            problems.append("the failing task's AssumeRole never reached STS: proves nothing")
        assert not problems, "\n".join(problems)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(timeout=5)
        out.close()
        credlock.stop()
        agent.set_rate_limit(None)


# --------------------------------------------------------------------------------------------
# (e) The STS budget
# --------------------------------------------------------------------------------------------

BUDGET_RATE = 2.0  # assume_rate: a bucket of 4
BUDGET_BURST = 2 * BUDGET_RATE
BUDGET_TASKS = 16


def assert_fail_closed(reply, data: bytes, raw_values, context: str) -> None:
    assert not leak_findings(data, raw_values), f"{context}: {leak_findings(data, raw_values)}"
    assert reply.status in (502, 503), f"{context}: {reply!r}"
    assert len(reply.body) < 1024 and b"AccessKeyId" not in data and b"Token" not in data, reply


def test_burst_of_new_tasks_beyond_the_sts_budget(agent, imds, gate, workdir):
    credlock = EcsCredlock("ecs-budget", agent.addr, imds, gate, workdir,
                           assume_rate=BUDGET_RATE)
    try:
        wait_ready_without_budget(credlock, agent)
        tasks = [agent.new_task("adv-ecs-budget-role") for _ in range(BUDGET_TASKS)]
        signers = {t["document"]["AccessKeyId"]: t for t in tasks}
        time.sleep(BUDGET_BURST / BUDGET_RATE + 0.2)  # the bucket is full
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=BUDGET_TASKS) as pool:
            results = list(pool.map(lambda t: (t, *get(credlock.ecs, f"/v2/credentials/{t['id']}",
                                                       timeout=15)), tasks))
        t1 = time.monotonic()
        raw_values = agent.raw_values()
        served, refused = [], []
        for task, reply, data in results:
            assert reply is not None, f"no answer for {task['id']}"
            if reply.status == 200:
                assert not leak_findings(data, raw_values), leak_findings(data, raw_values)
                served.append((task, reply.json()["AccessKeyId"]))
            else:
                assert_fail_closed(reply, data, raw_values, f"task {task['id']}")
                assert reply.status == 503, f"over the budget is 503: {reply!r}"
                refused.append(task)
        calls = gate.assumes(signers=signers, between=(t0, t1))
        cap = BUDGET_BURST + BUDGET_RATE * (t1 - t0) + 1
        assert len(calls) <= cap, (f"{len(calls)} AssumeRole calls reached STS in {t1 - t0:.1f}"
                                   f" s; assume_rate {BUDGET_RATE} allows {cap:.0f}")
        assert refused, (f"all {BUDGET_TASKS} new tasks were locked at once with a budget of "
                         f"{BUDGET_BURST:.0f}: nothing was capped")
        assert len(served) >= BUDGET_BURST, f"only {len(served)} served: {[r[1] for r in results]}"
        for task, key in served:
            assert key in gate.issued_for(task["document"]["AccessKeyId"]), (task["id"], key)

        # The budget recovers: every refused task is locked once the bucket refills.
        time.sleep(BUDGET_BURST / BUDGET_RATE + 0.2)
        for task in refused:
            reply, data = get(credlock.ecs, f"/v2/credentials/{task['id']}", timeout=15)
            assert not leak_findings(data, raw_values)
            assert reply is not None and reply.status == 200, f"not recovered: {reply!r}"
            assert reply.json()["AccessKeyId"] in gate.issued_for(task["document"]["AccessKeyId"])
        per_task = {s: len(gate.assumes(signers=[s])) for s in signers}
        assert set(per_task.values()) == {1}, f"AssumeRole calls per task: {per_task}"
    finally:
        credlock.stop()


@pytest.fixture(scope="module")
def failing_tasks_scenario(agent, imds, gate, workdir):
    """nobody hammers six tasks whose AssumeRole STS refuses (two connections each) for
    8 s on a credlock with assume_rate 2 (a bucket of 4); meanwhile four new tasks
    ask for their first set, a second apart (each answered before the hammer ends)."""
    rate = 2.0
    credlock = EcsCredlock("ecs-drain", agent.addr, imds, gate, workdir, assume_rate=rate)
    out = open(workdir / "ecs-hammer-drain.out", "w+b")
    proc = None
    try:
        wait_ready_without_budget(credlock, agent)
        failing = [agent.new_task(f"{DENY_PREFIX}adv-ecs-drain-role") for _ in range(6)]
        victims = [agent.new_task("adv-ecs-drain-victim-role") for _ in range(4)]
        raw_values = agent.raw_values()
        duration = 8.0
        proc = start_hammer(credlock.ecs, duration, 12,
                            [f"/v2/credentials/{t['id']}" for t in failing], out)
        t0 = wait_started(proc, out)

        def first_request(task, at):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            started = time.monotonic()
            reply, data = get(credlock.ecs, f"/v2/credentials/{task['id']}", timeout=15)
            ended = time.monotonic()
            return task, reply, data, ended - started, ended - t0 < duration

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(victims)) as pool:
            outcomes = list(pool.map(first_request, victims, [1.5, 2.5, 3.5, 4.5]))
        stats = finish(proc, out, duration + 20)
        t1 = time.monotonic()
        signers = [t["document"]["AccessKeyId"] for t in failing + victims]
        yield {"rate": rate, "burst": 2 * rate, "t0": t0, "t1": t1, "stats": stats,
               "calls": gate.assumes(signers=signers, between=(t0, t1)),
               "failing_calls": gate.assumes(
                   signers=[t["document"]["AccessKeyId"] for t in failing]),
               "outcomes": outcomes, "raw_values": raw_values}
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(timeout=5)
        out.close()
        credlock.stop()


def test_failing_tasks_do_not_starve_new_tasks_of_the_sts_budget(failing_tasks_scenario, gate):
    s = failing_tasks_scenario
    assert s["failing_calls"], "the failing tasks never reached STS: the test proves nothing"
    assert s["stats"]["uid"] != 0 and not s["stats"]["raw_seen"], s["stats"]
    problems = []
    assert all(during for *_, during in s["outcomes"]), "a victim was answered after the hammer"
    for task, reply, data, took, _ in s["outcomes"]:
        if leak_findings(data, s["raw_values"]):
            problems.append(f"RAW: {leak_findings(data, s['raw_values'])}")
        elif reply is None or reply.status != 200:
            problems.append(f"new task {task['id']} refused after {took:.1f} s: {reply!r}")
        elif reply.json()["AccessKeyId"] not in gate.issued_for(task["document"]["AccessKeyId"]):
            problems.append(f"new task {task['id']}: not its own set: {reply!r}")
    assert not problems, (f"while tasks whose AssumeRole fails were asked for again and again "
                          f"({len(s['failing_calls'])} AssumeRole calls for them, every one "
                          f"refused), new tasks were denied the STS budget:\n"
                          + "\n".join(problems) + f"\nhammer: {s['stats']}")


def test_sts_calls_stay_within_assume_rate_while_tasks_fail(failing_tasks_scenario):
    s = failing_tasks_scenario
    elapsed = s["t1"] - s["t0"]
    cap = s["burst"] + s["rate"] * elapsed + 1
    calls = s["calls"]
    by_si = sum(1 for c in calls if c["source_identity"])
    assert len(calls) <= cap, (
        f"{len(calls)} AssumeRole calls reached STS in {elapsed:.1f} s with assume_rate "
        f"{s['rate']} (at most {cap:.0f}); {by_si} with SourceIdentity, {len(calls) - by_si} "
        f"without (each refused call is made again without SourceIdentity, outside the budget)")
