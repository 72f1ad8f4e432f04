#!/usr/bin/env python3
"""A faithful local stand-in for the Amazon ECS container agent's task-credential endpoint (the
server that ecs-init exposes to containers as 169.254.170.2:80), for credlock's ECS tests.

Standard library only (Python 3.11). Same CLI shape and control conventions as imds_emulator.py:

    python3 ecs_agent_emulator.py --listen 127.0.0.1:0 [--listen [::1]:0] [--control 127.0.0.1:0]

It prints one line per bound socket, agent listeners first, flushed, then serves until
SIGTERM/SIGINT (exit 0). A bad address is a usage error (exit 2); a failed bind exits 1.

    listening 127.0.0.1:41234
    control 127.0.0.1:41236

Sources. AWS documents only the happy path; every error shape below is read from the agent's
published source, github.com/aws/amazon-ecs-agent (snapshot of 2026-06-30, commit 8dfceca6):
  [ECS-dev]   Amazon ECS Developer Guide, "IAM Roles for Tasks" (docs.aws.amazon.com/AmazonECS/
              latest/developerguide/task-iam-roles.html; awsdocs/amazon-ecs-developer-guide
              doc_source/task-iam-roles.md).
  [ECS-bp]    Amazon ECS Best Practices Guide, "Using IAM roles with Amazon ECS tasks"
              (docs.aws.amazon.com/AmazonECS/latest/bestpracticesguide/security-iam-roles.html).
  [v1]        ecs-agent/tmds/handlers/v1/credentials_handler.go
  [v2]        ecs-agent/tmds/handlers/v2/credentials_handler.go
  [mgr]       ecs-agent/credentials/manager.go
  [utils]     ecs-agent/tmds/handlers/utils/helpers.go
  [tmds]      ecs-agent/tmds/server.go
  [setup]     agent/handlers/task_server_setup.go
  [cfg]       agent/config/config.go (DefaultTaskMetadataSteadyStateRate/BurstRate)
  [toll]      agent/vendor/github.com/didip/tollbooth/tollbooth.go and limiter/limiter.go
  [test]      ecs-agent/tmds/handlers/credentials_handler_test.go (the exact bodies below)
  [mux]       github.com/gorilla/mux v1.8.1 (agent/go.mod), Router.ServeHTTP and cleanPath

Rules implemented (agent listener):
  * GET /v2/credentials/<id> -> 200, Content-Type application/json, the compact JSON
    {"RoleArn":..,"AccessKeyId":..,"SecretAccessKey":..,"Token":..,"Expiration":..} in exactly
    that key order, no trailing newline ([mgr] IAMRoleCredentials json tags, [test]
    credentialsResponseJSON; fields documented in [ECS-dev] "IAM Roles for Tasks" and [ECS-bp]).
    Containers get AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/<id> and the SDK asks
    http://169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI ([ECS-bp]); the ID is a UUID in
    practice ([ECS-bp]) but any string is served. No header is required: the agent reads no
    Authorization or metadata header on this path ([v1], [v2]).
  * GET /v1/credentials?id=<id>: the same document (the older relative URI form
    "/credential_provider_version/credentials?id=task_credential_id" of [ECS-dev]; [v1]).
  * Errors ([v1] processCredentialsRequest; bodies exactly as [test] credentialsErrorResponseJSON,
    application/json, utils.ErrorMessage marshals HTTPErrorCode too because it has no json tag):
      - no ID (/v2/credentials/, /v1/credentials, /v1/credentials?id=) -> 400
        {"code":"NoIdInRequest","message":"CredentialsV2Request: No Credential ID in the request",
         "HTTPErrorCode":400}   ("CredentialsV1Request: ..." on /v1)
      - ID known but its credentials not arrived yet -> 503 "CredentialsUninitialized",
        "...: Credentials uninitialized for ID" ([mgr] IsCredentialsPending; control POST /pending)
      - unknown ID -> 400 "InvalidIdInRequest", "...: Credentials not found"
  * Methods: the routes are registered with HandleFunc and no .Methods() ([setup]), so POST, PUT,
    DELETE, ... answer exactly like GET; HEAD gets GET's status and headers without a body (Go).
    The task-protection routes are the only method-restricted ones and are not emulated.
  * Other paths -> 404 "404 page not found\\n" text/plain (gorilla/mux NotFoundHandler). The
    agent's task-metadata v2/v3/v4 routes exist on the real agent but are NOT emulated.
  * Path cleaning: both routers have SkipClean(false) ([tmds], [setup]): a path that Go's
    path.Clean changes ("//v2//credentials/x", "/v2/credentials/../x") gets 301 with a Location
    of the cleaned path (query kept) and no body ([mux] Router.ServeHTTP). The trailing slash
    survives cleaning, so "/v2/credentials/" is a 400, not a redirect ([v2] comment). Percent
    escapes are decoded before matching ([mux] matches URL.Path), so "/v2/credentials/a%2Fb" is
    ID "a/b"; a malformed escape is Go's 400 Bad Request.
  * Rate limit ([tmds] tollbooth, [cfg] 40 requests/s steady, burst 60, [toll] key = client IP +
    path): over the limit -> 429, text/plain; charset=utf-8, "You have reached maximum request
    limit." (no newline). Every rate-limited response (all but the 301) carries X-Rate-Limit-Limit
    "40.00", X-Rate-Limit-Duration "1", X-Rate-Limit-Request-Forwarded-For (the request's
    X-Forwarded-For, often empty) and X-Rate-Limit-Request-Remote-Addr "ip:port" ([toll]
    setResponseHeaders). Control: "rate_limit": {"steady": 40, "burst": 60} or null (off).
  * Expiration is echoed verbatim from what ACS sent ([mgr] comment on Expiration); this stand-in
    issues "YYYY-MM-DDTHH:MM:SSZ", 6 h ahead ([ECS-dev]: "The default expiration time for the
    generated IAM role credentials is 6 hours"). ❓ The wire format ACS uses is undocumented (an
    agent test fixture shows "2016-03-25T06:17:19.318+0000"); tests may set any string.
  * HTTP/1.1 without a Host header -> Go's 400 "Bad Request: missing required Host header".

Raw-credential markers (so tests can prove raw values never reach a client through credlock):
AccessKeyId is 20 characters of [A-Z0-9] starting with "ASIARAWE", SecretAccessKey is 40
characters containing "RAWSECRET", Token contains "RAWTOKEN". RAW_MARKERS lists the strings.

Control API (JSON, only on the --control listener):
  GET  /state                 credentials by ID (each with relative_uri, task_arn, role_type and
                              the served document), pending IDs, delay_ms, down, rate_limit
  POST /state                 merge runtime keys: delay_ms (sleep before answering), down (close
                              connections without answering), rate_limit ({steady, burst} | null)
  POST /credentials           create or replace one credential ID (SetTaskCredentials):
                              {"id"?: default a new UUID, "task_arn"?, "role_arn"?,
                               "role_type"?: "TaskApplication" | "TaskExecution",
                               "lifetime_s"?: default 21600, "document"?: {field: string | null}}
                              "document" overrides served fields after generation (null = "").
                              Returns the entry, with "relative_uri": "/v2/credentials/<id>".
  POST /credentials/rotate    {"id"}: a new raw set for the same ID and role (ACS refresh)
  POST /credentials/remove    {"id"}: forget the ID (RemoveCredentials; the agent then 400s it)
  POST /pending               {"id"}: an ID known but without credentials yet (-> 503)
  GET  /requests              the last 1000 agent requests: method, path (raw target), version,
                              headers [[name, value], ...], client, listener, status, time
  POST /requests/clear        forget them
  POST /reset                 back to the start-up state (no IDs, limits on, requests cleared)
"""

from __future__ import annotations

import argparse
import base64
import collections
import copy
import datetime
import http.server
import json
import re
import secrets
import signal
import socket
import socketserver
import string
import sys
import threading
import time
import urllib.parse
import uuid

RAW_ACCESS_KEY_PREFIX = "ASIARAWE"
RAW_MARKERS = ("ASIARAW", "RAWSECRET", "RAWTOKEN")

ACCOUNT_ID = "123456789012"
DEFAULT_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/credlock-task-role"
ROLE_TYPES = ("TaskApplication", "TaskExecution")  # [mgr] ApplicationRoleType, ExecutionRoleType
DEFAULT_LIFETIME_S = 6 * 3600  # [ECS-dev]: default expiration 6 hours
DOCUMENT_KEYS = ("RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration")  # [mgr]

V1_PATH = "/v1/credentials"  # [mgr] V1CredentialsPath
V2_PREFIX = "/v2/credentials/"  # [v2] CredentialsPath = "/v2/credentials/{id:.*}"
ID_QUERY_PARAMETER = "id"  # [mgr] CredentialsIDQueryParameterName

ERR_NO_ID = "NoIdInRequest"  # [v1] error codes
ERR_INVALID_ID = "InvalidIdInRequest"
ERR_UNINITIALIZED = "CredentialsUninitialized"

DEFAULT_RATE_LIMIT = {"steady": 40, "burst": 60}  # [cfg]
RATE_LIMIT_MESSAGE = "You have reached maximum request limit."  # [toll] limiter.New defaults

REQUEST_LOG_SIZE = 1000
MAX_BODY = 1 << 20
IDLE_CONNECTION_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# Helpers shared in shape with the other stand-ins (each file is self-contained on purpose)
# --------------------------------------------------------------------------------------------

def utc_timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_chars(alphabet: str, count: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(count))


def raw_credentials(prefix: str, lifetime_s: int) -> dict:
    """A fresh raw set, marked so a test can grep for it (module docstring)."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    upper_digits = string.ascii_uppercase + string.digits
    secret_alphabet = string.ascii_letters + string.digits + "+/"
    return {
        "AccessKeyId": prefix + random_chars(upper_digits, 20 - len(prefix)),
        "SecretAccessKey": "RAWSECRET" + random_chars(secret_alphabet, 31),
        "Token": "RAWTOKEN" + base64.b64encode(secrets.token_bytes(216)).decode(),
        "Expiration": utc_timestamp(now + datetime.timedelta(seconds=lifetime_s)),
    }


def go_json(document) -> str:
    """encoding/json.Marshal: compact, HTML characters escaped, no trailing newline."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def go_clean_path(path: str) -> str:
    """gorilla/mux cleanPath: Go's path.Clean, rooted, keeping a trailing slash."""
    if not path:
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    cleaned = "/" + "/".join(parts)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def split_target(target: str) -> tuple[str, str, bool] | None:
    """(raw path, raw query, has '?') of a request target, as Go's url.ParseRequestURI sees it;
    None when a percent escape is malformed (Go answers 400)."""
    if target.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(target)
        raw_path, query, has_query = parts.path or "/", parts.query, "?" in target
    else:
        raw_path, sep, query = target.partition("?")
        has_query = bool(sep)
    if BAD_ESCAPE.search(raw_path):
        return None
    return raw_path, query, has_query


def go_escape_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/$&+,:;=@-._~")


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT or [IPV6]:PORT")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: bad port")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ValidationError(ValueError):
    pass


class TokenBucket:
    """golang.org/x/time/rate.Limiter.Allow: starts full (burst), refills at `rate` per second."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Response:
    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None):
        self.status, self.body, self.headers = status, body, headers or []


def go_http_error(status: int, message: str) -> Response:
    """net/http.Error: text/plain; charset=utf-8, nosniff, the message plus a newline."""
    return Response(status, (message + "\n").encode(), [
        ("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")])


def json_response(status: int, text: str) -> Response:
    return Response(status, text.encode(), [("Content-Type", "application/json")])


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def validate_rate_limit(value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"steady", "burst"}:
        raise ValidationError("rate_limit must be null or {\"steady\": N, \"burst\": N}")
    for key in ("steady", "burst"):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            raise ValidationError(f"rate_limit.{key} must be a number > 0")


class Agent:
    """All mutable state behind one lock. credentials: id -> entry; pending: known IDs without
    credentials ([mgr] knownCredentialsIDs minus idToTaskCredentials)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.deque = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.credentials: dict[str, dict] = {}
            self.pending: set[str] = set()
            self.delay_ms = 0
            self.down = False
            self.rate_limit = copy.deepcopy(DEFAULT_RATE_LIMIT)
            self.buckets: dict[tuple[str, str], TokenBucket] = {}
            self.requests.clear()

    # ---- control ----

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "credentials": copy.deepcopy(self.credentials),
                "pending": sorted(self.pending),
                "delay_ms": self.delay_ms,
                "down": self.down,
                "rate_limit": copy.deepcopy(self.rate_limit),
            }

    def merge(self, patch) -> dict:
        if not isinstance(patch, dict):
            raise ValidationError("body must be a JSON object")
        unknown = set(patch) - {"delay_ms", "down", "rate_limit"}
        if unknown:
            raise ValidationError(f"unknown keys {sorted(unknown)}; allowed: delay_ms, down, "
                                  "rate_limit")
        if "delay_ms" in patch:
            delay = patch["delay_ms"]
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
                raise ValidationError("delay_ms must be a number >= 0")
        if "down" in patch and not isinstance(patch["down"], bool):
            raise ValidationError("down must be true or false")
        if "rate_limit" in patch:
            validate_rate_limit(patch["rate_limit"])
        with self.lock:
            for key, value in patch.items():
                setattr(self, key, copy.deepcopy(value))
            if "rate_limit" in patch:
                self.buckets.clear()
        return self.snapshot()

    def set_credentials(self, spec) -> dict:
        """SetTaskCredentials ([mgr]): the ID and the task ARN must not be empty."""
        if not isinstance(spec, dict):
            raise ValidationError("body must be a JSON object")
        unknown = set(spec) - {"id", "task_arn", "role_arn", "role_type", "lifetime_s", "document"}
        if unknown:
            raise ValidationError(f"unknown keys {sorted(unknown)}")
        cred_id = spec.get("id", str(uuid.uuid4()))
        if not isinstance(cred_id, str) or not cred_id:
            raise ValidationError("CredentialsId is empty")  # [mgr] SetTaskCredentials
        task_arn = spec.get("task_arn",
                            f"arn:aws:ecs:us-east-1:{ACCOUNT_ID}:task/default/{uuid.uuid4().hex}")
        if not isinstance(task_arn, str) or not task_arn:
            raise ValidationError("task ARN is empty")  # [mgr] SetTaskCredentials
        role_arn = spec.get("role_arn", DEFAULT_ROLE_ARN)
        role_type = spec.get("role_type", "TaskApplication")
        lifetime = spec.get("lifetime_s", DEFAULT_LIFETIME_S)
        overrides = spec.get("document", {})
        if not isinstance(role_arn, str):
            raise ValidationError("role_arn must be a string")
        if role_type not in ROLE_TYPES:
            raise ValidationError(f"role_type must be one of {list(ROLE_TYPES)}")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int):
            raise ValidationError("lifetime_s must be an integer")
        if not isinstance(overrides, dict) or set(overrides) - set(DOCUMENT_KEYS) or not all(
                value is None or isinstance(value, str) for value in overrides.values()):
            raise ValidationError(f"document maps fields among {list(DOCUMENT_KEYS)} to strings "
                                  "or null")
        document = {"RoleArn": role_arn, **raw_credentials(RAW_ACCESS_KEY_PREFIX, lifetime)}
        for key, value in overrides.items():
            document[key] = "" if value is None else value  # the Go struct always has all five
        entry = {
            "id": cred_id,
            "relative_uri": V2_PREFIX + cred_id,
            "task_arn": task_arn,
            "role_type": role_type,
            "lifetime_s": lifetime,
            "document": {key: document[key] for key in DOCUMENT_KEYS},
        }
        with self.lock:
            self.credentials[cred_id] = entry
            self.pending.discard(cred_id)
        return copy.deepcopy(entry)

    def rotate(self, cred_id) -> dict:
        with self.lock:
            entry = self.credentials.get(cred_id) if isinstance(cred_id, str) else None
            if entry is None:
                raise KeyError(cred_id)
            fresh = raw_credentials(RAW_ACCESS_KEY_PREFIX, entry["lifetime_s"])
            entry["document"].update(fresh)
            return copy.deepcopy(entry)

    def remove(self, cred_id) -> bool:
        with self.lock:  # [mgr] RemoveCredentials drops it from both maps
            self.pending.discard(cred_id)
            return self.credentials.pop(cred_id, None) is not None

    def add_pending(self, cred_id) -> None:
        if not isinstance(cred_id, str) or not cred_id:
            raise ValidationError("id must be a non-empty string")
        with self.lock:  # [mgr] AddKnownCredentialsID
            if cred_id not in self.credentials:
                self.pending.add(cred_id)

    # ---- serving ----

    def lookup(self, cred_id: str) -> tuple[str, dict | None]:
        with self.lock:
            if cred_id in self.pending:
                return "pending", None
            entry = self.credentials.get(cred_id)
            return ("found", copy.deepcopy(entry)) if entry else ("missing", None)

    def rate_allowed(self, client_ip: str, path: str) -> tuple[bool, dict | None]:
        with self.lock:
            limit = copy.deepcopy(self.rate_limit)
            if limit is None:
                return True, None
            key = (client_ip, path)
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = TokenBucket(limit["steady"], int(limit["burst"]))
            return bucket.allow(), limit

    def runtime(self) -> tuple[float, bool]:
        with self.lock:
            return self.delay_ms, self.down

    def log_request(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def set_status(self, entry: dict, status) -> None:
        with self.lock:
            entry["status"] = status

    def request_log(self) -> list:
        with self.lock:
            return copy.deepcopy(list(self.requests))

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class BaseHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive like Go's net/http: Date and Content-Length on every answer, no Server
    header; every method goes to dispatch()."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"
    timeout = IDLE_CONNECTION_TIMEOUT
    wbufsize = -1
    disable_nagle_algorithm = True
    agent: Agent

    def log_message(self, format, *args) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def send_response(self, code, message=None) -> None:
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            return b""
        return self.rfile.read(int(length)) if int(length) else b""

    def send(self, response: Response) -> None:
        if self.request_version == "HTTP/1.0":
            self.close_connection = True
        self.send_response(response.status)
        names = set()
        for name, value in response.headers:
            self.send_header(name, value)
            names.add(name.lower())
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()

    def send_error(self, code, message=None, explain=None) -> None:
        self.send_go_bad_request("")

    def send_go_bad_request(self, reason: str) -> None:
        """Go's net/http answer to a request it cannot parse: 400, then close."""
        self.close_connection = True
        body = ("400 Bad Request" + (": " + reason if reason else "")).encode()
        self.send_response_only(400)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def raw_target(self) -> str:
        """The request target as sent: http.server rewrites a leading "//" in self.path."""
        words = self.requestline.split()
        return words[1] if len(words) == 3 else self.path

    def host_problem(self) -> str | None:
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            return "too many Host headers"
        if not hosts and self.request_version == "HTTP/1.1":
            return "missing required Host header"
        return None


class AgentHandler(BaseHandler):
    def dispatch(self) -> None:
        self.read_body()  # the agent ignores bodies; read it so keep-alive stays in sync
        entry = {
            "method": self.command,
            "path": self.raw_target(),
            "version": self.request_version,
            "headers": [[name, value] for name, value in self.headers.items()],
            "client": list(self.client_address[:2]),
            "listener": format_address(*self.server.server_address[:2]),
            "status": None,
            "time": time.time(),
        }
        self.agent.log_request(entry)
        problem = self.host_problem()
        if problem:
            self.agent.set_status(entry, 400)
            self.send_go_bad_request(problem)
            return
        delay_ms, _ = self.agent.runtime()
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        _, down = self.agent.runtime()
        if down:
            self.close_connection = True
            self.agent.set_status(entry, "dropped")
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        target = split_target(self.raw_target())
        if target is None:
            self.agent.set_status(entry, 400)
            self.send_go_bad_request("")
            return
        try:
            response = self.respond(*target)
        except Exception:
            import traceback
            traceback.print_exc()
            response = go_http_error(500, "Internal Server Error")
        self.agent.set_status(entry, response.status)
        self.send(response)

    def respond(self, raw_path: str, query: str, has_query: bool) -> Response:
        path = urllib.parse.unquote(raw_path)
        cleaned = go_clean_path(path)
        if cleaned != path:
            # [mux] Router.ServeHTTP: 301, Location = the cleaned URL, query kept, no body.
            location = go_escape_path(cleaned) + ("?" + query if has_query else "")
            return Response(301, b"", [("Location", location)])

        # [tmds] tollbooth in front of every route; headers on every answer ([toll]).
        client_ip = self.client_address[0]
        allowed, limit = self.agent.rate_allowed(client_ip, path)
        rate_headers = []
        if limit is not None:
            rate_headers = [
                ("X-Rate-Limit-Limit", f"{float(limit['steady']):.2f}"),
                ("X-Rate-Limit-Duration", "1"),
                ("X-Rate-Limit-Request-Forwarded-For", self.headers.get("X-Forwarded-For", "")),
                ("X-Rate-Limit-Request-Remote-Addr",
                 format_address(*self.client_address[:2])),
            ]
            if not allowed:
                return Response(429, RATE_LIMIT_MESSAGE.encode(), rate_headers + [
                    ("Content-Type", "text/plain; charset=utf-8")])

        if path == V1_PATH:
            values = urllib.parse.parse_qs(query, keep_blank_values=True)
            cred_id = values[ID_QUERY_PARAMETER][0] if ID_QUERY_PARAMETER in values else ""
            response = self.credentials(cred_id, "CredentialsV1Request: ")
        elif path.startswith(V2_PREFIX):
            response = self.credentials(path[len(V2_PREFIX):], "CredentialsV2Request: ")
        else:
            response = go_http_error(404, "404 page not found")
        response.headers = rate_headers + response.headers
        return response

    def credentials(self, cred_id: str, prefix: str) -> Response:
        """[v1] processCredentialsRequest, in its order: no ID, pending, not found, success."""
        if cred_id == "":
            return self.error(ERR_NO_ID, prefix + "No Credential ID in the request", 400)
        state, entry = self.agent.lookup(cred_id)
        if state == "pending":
            return self.error(ERR_UNINITIALIZED, prefix + "Credentials uninitialized for ID", 503)
        if state == "missing":
            return self.error(ERR_INVALID_ID, prefix + "Credentials not found", 400)
        return json_response(200, go_json(entry["document"]))

    @staticmethod
    def error(code: str, message: str, status: int) -> Response:
        # utils.ErrorMessage: {"code","message","HTTPErrorCode"} ([utils], [test])
        return json_response(status, go_json({"code": code, "message": message,
                                              "HTTPErrorCode": status}))


class ControlHandler(BaseHandler):
    def dispatch(self) -> None:
        body = self.read_body()
        route = (self.command, urllib.parse.urlsplit(self.path).path.rstrip("/") or "/")
        try:
            try:
                payload = json.loads(body) if body.strip() else {}
            except json.JSONDecodeError as err:
                raise ValidationError(f"invalid JSON: {err}") from None
            if route == ("GET", "/state"):
                result = self.agent.snapshot()
            elif route == ("POST", "/state"):
                result = self.agent.merge(payload)
            elif route == ("POST", "/credentials"):
                result = self.agent.set_credentials(payload)
            elif route == ("POST", "/credentials/rotate"):
                try:
                    result = self.agent.rotate(payload.get("id") if isinstance(payload, dict) else None)
                except KeyError:
                    self.send_json(404, {"error": "no such credential ID"})
                    return
            elif route == ("POST", "/credentials/remove"):
                cred_id = payload.get("id") if isinstance(payload, dict) else None
                result = {"removed": self.agent.remove(cred_id)}
            elif route == ("POST", "/pending"):
                self.agent.add_pending(payload.get("id") if isinstance(payload, dict) else None)
                result = self.agent.snapshot()
            elif route == ("GET", "/requests"):
                result = self.agent.request_log()
            elif route == ("POST", "/requests/clear"):
                self.agent.clear_requests()
                result = {"cleared": True}
            elif route == ("POST", "/reset"):
                self.agent.reset()
                result = self.agent.snapshot()
            else:
                self.send_json(404, {"error": f"no route {route[0]} {route[1]}"})
                return
        except ValidationError as err:
            self.send_json(400, {"error": str(err)})
            return
        self.send_json(200, result)

    def send_json(self, status: int, document) -> None:
        self.send(Response(status, json.dumps(document, indent=2).encode(),
                           [("Content-Type", "application/json")]))


# --------------------------------------------------------------------------------------------
# Servers and main
# --------------------------------------------------------------------------------------------

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port


def make_server(address: str, handler: type, agent: Agent) -> Server:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (Server,), {"address_family": family})
    handler_class = type(handler.__name__, (handler,), {"agent": agent})
    return server_class((host, port), handler_class)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local stand-in for the ECS agent's task-credential endpoint "
                    "(see the module docstring).")
    parser.add_argument("--listen", action="append", metavar="ADDR",
                        help="agent listener, HOST:PORT or [IPV6]:PORT; repeatable "
                             "(default 127.0.0.1:0)")
    parser.add_argument("--control", metavar="ADDR", help="control API listener, HOST:PORT")
    args = parser.parse_args(argv)
    agent = Agent()
    servers = []
    try:
        for address in args.listen or ["127.0.0.1:0"]:
            servers.append(("listening", make_server(address, AgentHandler, agent)))
        if args.control:
            servers.append(("control", make_server(args.control, ControlHandler, agent)))
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        print(f"ecs_agent_emulator: cannot bind: {err}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for label, server in servers:
        print(f"{label} {format_address(*server.server_address[:2])}", flush=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    while not stop.wait(1.0):
        pass
    for _, server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
