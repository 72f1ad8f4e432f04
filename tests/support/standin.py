"""What the stand-ins in this folder share: the plumbing that says nothing about the AWS protocol
each one speaks (imds_emulator.py, ecs_agent_emulator.py, pod_identity_emulator.py,
lambda_extensions_emulator.py). The protocol rules and their citations stay in those files.

Standard library only (Python 3.11). A stand-in runs as a script from this folder, so Python
finds this module next to it (sys.path[0]); a program that imports a stand-in as a module puts
this folder on sys.path first (tests/adversarial/adv_upstream.py does).

Conventions every stand-in follows through this module:
  * CLI: --listen HOST:PORT or [IPV6]:PORT (repeatable, default 127.0.0.1:0) and
    --control HOST:PORT. A bad address is a usage error (exit 2); a failed bind exits 1.
  * Start-up: one line per bound socket, flushed, protocol listeners first, then the control
    listener ("listening 127.0.0.1:41234", "listening [::1]:41235", "control 127.0.0.1:41236");
    then serve until SIGTERM/SIGINT, and exit 0.
  * Every request on a protocol listener is recorded (GET /requests on the control listener):
    method, path (the request target), version, headers [[name, value], ...], what a stand-in
    adds (the Lambda one: body), client, listener, status (None until answered, "dropped" when
    `down`), time; the last 1000 are kept.
  * Runtime keys: delay_ms (sleep before answering) and down (close the connection without
    answering).
  * Control API (JSON, only on the --control listener): GET /state, POST /state (merge),
    GET /requests, POST /requests/clear, POST /reset, plus each stand-in's own routes. A
    rejected request is 400 {"error": ...} (404 for an unknown route).
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
import traceback
import urllib.parse
from typing import Callable

REQUEST_LOG_SIZE = 1000
MAX_BODY = 1 << 20  # request bodies are read, up to 1 MiB
IDLE_CONNECTION_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle

# Raw-credential markers: a raw AccessKeyId starts with "ASIARAW" and a stand-in's own letter,
# the secret contains "RAWSECRET", the token "RAWTOKEN" (raw_secrets).
RAW_MARKERS = ("ASIARAW", "RAWSECRET", "RAWTOKEN")


# --------------------------------------------------------------------------------------------
# Addresses and errors
# --------------------------------------------------------------------------------------------

def parse_address(text: str, allow_empty_host: bool = False) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port). allow_empty_host: ":PORT" is (all
    interfaces, PORT), as imds_emulator.py has always accepted."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host or not (host or allow_empty_host):
            raise ValueError(f"{text!r}: expected HOST:PORT or [IPV6]:PORT")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: bad port")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ValidationError(ValueError):
    """A control request (or start-up file) with a bad value: 400 {"error": message}."""


class ControlError(Exception):
    """A control request refused with another status: `status` {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_keys(body, allowed: set[str], list_allowed: bool = False) -> None:
    """A control request's body: a JSON object with keys among `allowed` (named in the error
    with list_allowed)."""
    if not isinstance(body, dict):
        raise ValidationError("body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ValidationError(f"unknown keys {sorted(unknown)}"
                              + (f"; allowed: {sorted(allowed)}" if list_allowed else ""))


def check_runtime_keys(values: dict) -> None:
    """The runtime keys, where present: delay_ms a number >= 0, down a boolean."""
    if "delay_ms" in values:
        delay = values["delay_ms"]
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise ValidationError("delay_ms must be a number >= 0")
    if "down" in values and not isinstance(values["down"], bool):
        raise ValidationError("down must be true or false")


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------

def utc_timestamp(moment: datetime.datetime) -> str:
    """YYYY-MM-DDTHH:MM:SSZ, no fraction."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_chars(alphabet: str, count: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(count))


def raw_secrets(prefix: str) -> dict:
    """A fresh raw AccessKeyId (20 characters of [A-Z0-9] starting with prefix), SecretAccessKey
    (40 characters containing "RAWSECRET") and Token (containing "RAWTOKEN"), marked so a test can
    prove raw values never reach a client (RAW_MARKERS)."""
    upper_digits = string.ascii_uppercase + string.digits
    secret_alphabet = string.ascii_letters + string.digits + "+/"
    return {
        "AccessKeyId": prefix + random_chars(upper_digits, 20 - len(prefix)),
        "SecretAccessKey": "RAWSECRET" + random_chars(secret_alphabet, 31),
        "Token": "RAWTOKEN" + base64.b64encode(secrets.token_bytes(216)).decode(),
    }


# --------------------------------------------------------------------------------------------
# Go's answers, for the stand-ins of agents written in Go (ECS agent, Pod Identity Agent, the
# Lambda Runtime Interface Emulator)
# --------------------------------------------------------------------------------------------

def go_json(document) -> str:
    """encoding/json.Marshal: compact, HTML characters escaped, no trailing newline."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def json_kind(value) -> str:
    """The JSON kind Go's json.Unmarshal names in its type errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def go_clean_path(path: str) -> str:
    """Go's path.Clean, rooted, keeping a trailing slash: cleanPath of gorilla/mux and of
    net/http's ServeMux alike."""
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
    """An answer of a Go stand-in: status, body, headers in the order they are sent."""

    def __init__(self, status: int, body: bytes = b"",
                 headers: list[tuple[str, str]] | None = None):
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

class Backend:
    """Base of a stand-in's state object: one lock over all mutable state (requests are tiny, so
    contention does not matter) and the request log behind GET /requests. A subclass provides
    snapshot(), merge(patch) and reset() for the control API; its reset() clears the log."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.deque = collections.deque(maxlen=REQUEST_LOG_SIZE)

    def runtime(self) -> tuple:
        """(delay_ms, down, ...): how to answer right now."""
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
    """HTTP/1.1 with keep-alive, every method to dispatch(). A stand-in's handler base adds how
    it frames answers: send(response) and json_response(status, body)."""

    protocol_version = "HTTP/1.1"
    # The stdlib treats a request line without a version as HTTP/0.9 and answers with a bare
    # body; clients never speak 0.9, so always send a status line and headers.
    default_request_version = "HTTP/1.0"
    timeout = IDLE_CONNECTION_TIMEOUT
    # Buffer the response and send it in one write, with Nagle off: headers and body written
    # separately meet the peer's delayed ACK and cost ~40 ms per keep-alive request.
    wbufsize = -1
    disable_nagle_algorithm = True
    max_body = MAX_BODY
    backend: Backend  # set on the per-listener subclass (make_server)

    def log_message(self, format, *args) -> None:  # quiet: tests read GET /requests instead
        pass

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler looks up do_<METHOD> and answers 501 if it is missing; route
        # every method (POST, DELETE, PATCH, OPTIONS, made-up ones) to one dispatcher instead.
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self) -> None:
        raise NotImplementedError

    def read_body(self) -> bytes:
        """The Content-Length body; an invalid length or one over max_body reads nothing and
        closes the connection after the answer."""
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit() or int(length) > self.max_body:
            self.close_connection = True
            return b""
        return self.rfile.read(int(length)) if int(length) else b""

    def read_chunked_body(self) -> bytes:
        """A Transfer-Encoding: chunked body (RFC 9112 7.1): chunk extensions and trailer
        fields are read and dropped."""
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def record(self, path: str, **extra) -> dict:
        """Log this request (GET /requests); the entry's status is set when it is answered."""
        entry = {
            "method": self.command,
            "path": path,
            "version": self.request_version,
            "headers": [[name, value] for name, value in self.headers.items()],
            **extra,
            "client": list(self.client_address[:2]),
            "listener": format_address(*self.server.server_address[:2]),
            "status": None,
            "time": time.time(),
        }
        self.backend.log_request(entry)
        return entry

    def delay_or_drop(self, entry: dict) -> bool:
        """Sleep delay_ms, then, if the stand-in is down, close the connection without an answer
        and return True."""
        delay_ms = self.backend.runtime()[0]
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        if not self.backend.runtime()[1]:  # as it is when the answer would go out
            return False
        # Simulated outage: no status line at all, just a closed connection.
        self.close_connection = True
        self.backend.set_status(entry, "dropped")
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    @staticmethod
    def respond_safely(respond: Callable, fallback: Callable):
        try:
            return respond()
        except Exception:  # a stand-in bug: say so loudly rather than drop the connection
            traceback.print_exc()
            return fallback()


class GoHandler(BaseHandler):
    """HTTP/1.1 keep-alive like Go's net/http: Date and Content-Length on every answer, no Server
    header. dispatch() records the request, answers Go's 400 to a missing or repeated Host,
    applies delay_ms/down and sends respond(body)."""

    def dispatch(self) -> None:
        body = self.read_body()  # read even where ignored, so keep-alive stays in sync
        entry = self.record(self.raw_target(), **self.record_body(body))
        problem = self.host_problem()
        if problem:
            self.backend.set_status(entry, 400)
            self.send_go_bad_request(problem)
            return
        if self.delay_or_drop(entry):
            return
        response = self.respond_safely(lambda: self.respond(body), self.internal_error)
        if response is None:  # a target Go cannot parse
            self.backend.set_status(entry, 400)
            self.send_go_bad_request("")
            return
        self.backend.set_status(entry, response.status)
        try:
            self.send(response)
        except OSError:  # the client went away (e.g. an extension while its Next blocked)
            self.close_connection = True

    def respond(self, body: bytes) -> Response | None:
        """The answer to this request; None for Go's 400 to an unparseable target."""
        raise NotImplementedError

    def record_body(self, body: bytes) -> dict:
        """Extra fields for the request log entry."""
        return {}

    @staticmethod
    def internal_error() -> Response:
        return go_http_error(500, "Internal Server Error")

    def send_response(self, code, message=None) -> None:
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self.read_chunked_body()
        return super().read_body()

    def send(self, response: Response) -> None:
        if self.request_version == "HTTP/1.0":
            self.close_connection = True
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()

    @staticmethod
    def json_response(status: int, body: bytes) -> Response:
        return Response(status, body, [("Content-Type", "application/json")])

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


class GoRouterHandler(GoHandler):
    """A Go router in front of the routes (gorilla/mux, net/http's ServeMux): the target parsed
    as url.ParseRequestURI does (a malformed escape is Go's 400), percent escapes decoded before
    matching, and a path that Go's path.Clean changes redirected (redirect) instead of served
    (serve_path)."""

    def respond(self, body: bytes) -> Response | None:
        target = split_target(self.raw_target())
        if target is None:
            return None
        raw_path, query, has_query = target
        path = urllib.parse.unquote(raw_path)
        cleaned = go_clean_path(path)
        if cleaned != path:
            return self.redirect(go_escape_path(cleaned), query, has_query)
        return self.serve_path(path, query)

    def redirect(self, location: str, query: str, has_query: bool) -> Response:
        """The 301 to `location`, the escaped clean path."""
        raise NotImplementedError

    def serve_path(self, path: str, query: str) -> Response:
        raise NotImplementedError


class ControlAPI:
    """The JSON control API, mixed in before a stand-in's handler base (which provides
    send and json_response). A stand-in adds its routes by overriding route() and
    calling super().route() for the shared ones."""

    # Whether a body that is not JSON is refused on every route (400) or only where it is read.
    json_body_checked_first = True

    def dispatch(self) -> None:
        self.body = self.read_body()
        split = urllib.parse.urlsplit(self.path)
        self.query = split.query
        try:
            if self.json_body_checked_first:
                self.payload()
            result = self.route(self.command, split.path.rstrip("/") or "/")
        except ValidationError as err:
            self.send_json(400, {"error": str(err)})
            return
        except ControlError as err:
            self.send_json(err.status, {"error": str(err)})
            return
        self.send_json(200, result)

    def payload(self):
        """The request's JSON body; {} when empty."""
        try:
            return json.loads(self.body) if self.body.strip() else {}
        except json.JSONDecodeError as err:
            raise ValidationError(f"invalid JSON: {err}") from None

    def field(self, name: str):
        """A field of the JSON object body; None when it is missing or the body is no object."""
        payload = self.payload()
        return payload.get(name) if isinstance(payload, dict) else None

    def route(self, method: str, path: str):
        backend = self.backend
        if (method, path) == ("GET", "/state"):
            return backend.snapshot()
        if (method, path) == ("POST", "/state"):
            return backend.merge(self.payload())
        if (method, path) == ("GET", "/requests"):
            return backend.request_log()
        if (method, path) == ("POST", "/requests/clear"):
            backend.clear_requests()
            return {"cleared": True}
        if (method, path) == ("POST", "/reset"):
            backend.reset()
            return backend.snapshot()
        raise ControlError(404, f"no route {method} {path}")

    def send_json(self, status: int, document) -> None:
        self.send(self.json_response(status, json.dumps(document, indent=2).encode()))


# --------------------------------------------------------------------------------------------
# Servers and main
# --------------------------------------------------------------------------------------------

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a sleeping (delay_ms) handler must not block shutdown
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # [::]:80 must not also grab 0.0.0.0:80.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's getfqdn() (can be slow)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port


def make_server(address: str, handler: type, backend: Backend,
                allow_empty_host: bool = False) -> Server:
    host, port = parse_address(address, allow_empty_host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (Server,), {"address_family": family})
    handler_class = type(handler.__name__, (handler,), {"backend": backend})
    return server_class((host, port), handler_class)


def add_listen_argument(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    parser.add_argument("--listen", action="append", metavar="ADDR",
                        help=f"{what} listener, HOST:PORT or [IPV6]:PORT; repeatable{note} "
                             "(default 127.0.0.1:0)")


def add_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="ADDR", help="control API listener, HOST:PORT")


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, handler: type,
          control_handler: type, backend: Backend, allow_empty_host: bool = False,
          on_bound: Callable[[list[Server]], None] | None = None) -> int:
    """Bind args.listen (default 127.0.0.1:0) with `handler` and args.control with
    `control_handler`, print the start-up lines and serve until SIGTERM/SIGINT (0). A bad
    address is parser.error (exit 2); a failed bind prints "<name>: cannot bind: ..." and
    returns 1. on_bound sees the servers, listeners first, before the start-up lines."""
    servers = []
    try:
        for address in args.listen or ["127.0.0.1:0"]:
            servers.append(("listening", make_server(address, handler, backend, allow_empty_host)))
        if args.control:
            servers.append(("control", make_server(args.control, control_handler, backend,
                                                   allow_empty_host)))
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        print(f"{name}: cannot bind: {err}", file=sys.stderr, flush=True)
        return 1
    if on_bound is not None:
        on_bound([server for _, server in servers])

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
