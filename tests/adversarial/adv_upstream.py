#!/usr/bin/env python3
"""Adversarial IMDS upstreams for credlock's adversarial suite (tests/adversarial).

    python adv_upstream.py --personality ignorebody|readbody|closeearly|pieces|deviant

Every personality serves what credlock itself needs (token PUT, identity document, partition,
iam listing, the role's credentials, the network tree) from the faithful emulator's metadata tree
(tests/support/imds_emulator.py), but frames HTTP its own, deliberately different, way:

  ignorebody  never reads a request body, on any method (like python's http.server): body bytes
              are parsed as the next request on the connection. A malformed request line gets a
              400 and a close, as http.server does.
  readbody    reads Content-Length and chunked bodies completely (the well-behaved upstream).
  closeearly  reads bodies, answers, then closes every connection WITHOUT saying
              `Connection: close` (a client that pools it finds it dead).
  pieces      reads bodies; sends two 1xx interim answers (100, 103) before every final answer,
              frames bodies chunked (with chunk extensions and a trailer), and writes everything
              in tiny pieces with small delays.
  deviant     reads bodies; on credential routes honours Range (206 with a slice of the raw
              document), If-None-Match / If-Modified-Since (304) and Accept-Encoding: gzip.

Raw values are marked: every AccessKeyId, SecretAccessKey and Token the upstream owns contains
RAWMARKER, so a test can prove none of them ever reaches a client.

Request ids: every answer carries `X-Adv-Req` (the request's own `X-Adv-Req` header, if any) and
`X-Adv-Target` (the request target the upstream parsed), and GET /latest/meta-data/echo/<id>
answers `ECHO <id>`, so a client can prove an answer belongs to its own request.

Special routes (any personality), under /latest/meta-data/adv/<kind>/<id>:
  stall      head + part of the body, a pause longer than credlock's upstream timeout, then the
             rest, followed by an unsolicited complete response carrying the raw credentials
  truncated  Content-Length: 100, 10 bytes, close
  noanswer   close without answering
  halfhead   half a status line and header, close
  extra      the answer, then in the same write an unsolicited response with the raw credentials
  lateextra  the answer, then 30 ms later an unsolicited response with the raw credentials
  headbody   on HEAD: the head, then 30 ms later "body" bytes that form a complete response with
             the raw credentials (an upstream that wrongly sends a body on HEAD)

Credential variants: POST /variant {"token": T, "variant": V} on the control listener makes every
credential answer to a request carrying IMDSv2 token T deviate (see VARIANTS). Credlock's own
token is never labelled, so its background keeps working.

Control API (JSON, --control listener only): GET /log, POST /clear, POST /variant, GET /state.
Prints "listening ADDR" then "control ADDR", flushed; serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import copy
import email.utils
import gzip
import http.server
import json
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import imds_emulator as emu  # noqa: E402

MARK = "RAWMARKER"
ROLE = "credlock-adv-role"
STALL_SECONDS = 1.6  # longer than credlock's default upstream timeout (1 s)
MAX_HEAD = 1 << 20
MAX_BODY = 1 << 20
LOG_SIZE = 20000
PERSONALITIES = ("ignorebody", "readbody", "closeearly", "pieces", "deviant")


def marked_credentials(label: str) -> dict:
    fields = emu.new_credentials(label)
    fields["AccessKeyId"] = ("ASIA" + MARK + label + fields["AccessKeyId"][4:])[:20]
    fields["SecretAccessKey"] = (MARK + label + "Secret" + fields["SecretAccessKey"])[:40]
    fields["Token"] = MARK + label + "Token" + fields["Token"]
    return fields


class State:
    def __init__(self, personality: str):
        self.personality = personality
        instance = copy.deepcopy(emu.DEFAULT_INSTANCE)
        instance["role"] = ROLE
        self.emulator = emu.Emulator(instance, "optional")
        self.emulator.merge({"credentials": {
            "v1": marked_credentials("V1"), "v2": marked_credentials("V2"),
            "identity": marked_credentials("ID")}})
        self.creds = self.emulator.snapshot()["credentials"]
        # Credentials never rotate during a run: the trees are built once.
        self.trees = {d: self.emulator.tree("latest", d) for d in ("v1", "v2")}
        self.lock = threading.Lock()
        self.log: collections.deque = collections.deque(maxlen=LOG_SIZE)
        self.variants: dict[str, str] = {}
        self.next_conn = 0

    def record(self, entry: dict) -> None:
        with self.lock:
            self.log.append(entry)

    def variant_for(self, token: str | None) -> str:
        if token is None:
            return "normal"
        with self.lock:
            return self.variants.get(token, "normal")

    def conn_id(self) -> int:
        with self.lock:
            self.next_conn += 1
            return self.next_conn


# ---------------------------------------------------------------------------------------------
# Credential documents, normal and deviant
# ---------------------------------------------------------------------------------------------

def doc_text(document: dict) -> bytes:
    return emu.aws_json(document).encode()


def standard(fields: dict) -> dict:
    return {k: fields[k] for k in emu.CREDENTIAL_KEYS if k in fields}


def escaped(value: str) -> str:
    """The JSON text of a string whose first character is \\u-escaped (decodes to value)."""
    return "\\u%04x" % ord(value[0]) + value[1:]


def variant_answer(variant: str, fields: dict) -> tuple[int, bytes, str]:
    """(status, body, content type) of a credential answer in the given variant."""
    doc = standard(fields)
    key, secret, token = fields["AccessKeyId"], fields["SecretAccessKey"], fields["Token"]
    ctype = "text/plain"
    if variant == "normal":
        return 200, doc_text(doc), ctype
    if variant == "extra_key_no_secret":
        return 200, doc_text({**doc, "AccountId": "123456789012", "Foo": "bar"}), ctype
    if variant == "code_missing":
        doc.pop("Code")
        return 200, doc_text(doc), ctype
    if variant == "code_success_space":
        return 200, doc_text({**doc, "Code": "Success "}), ctype
    if variant == "code_lowercase":
        return 200, doc_text({**doc, "Code": "success"}), ctype
    if variant == "code_true":
        return 200, doc_text({**doc, "Code": True}), ctype
    if variant == "code_list":
        return 200, doc_text({**doc, "Code": ["Success"]}), ctype
    if variant == "secret_lowercase_key":
        return 200, doc_text({**doc, "secretaccesskey": secret}), ctype
    if variant == "secret_nested":
        return 200, doc_text({**doc, "Credentials": {
            "AccessKeyId": key, "SecretAccessKey": secret, "Token": token}}), ctype
    if variant == "secret_in_message":
        return 200, doc_text({**doc, "Message": token}), ctype
    if variant == "secret_in_array":
        return 200, doc_text({**doc, "Extra": [key, secret]}), ctype
    if variant == "secret_escaped":
        text = doc_text({**doc, "Note": "PLACEHOLDER"}).decode()
        return 200, text.replace("PLACEHOLDER", escaped(secret)).encode(), ctype
    if variant == "keys_other_case":
        other = {"Code": "Success", "LastUpdated": doc["LastUpdated"], "Type": "AWS-HMAC",
                 "accessKeyId": key, "secretAccessKey": secret, "token": token,
                 "Expiration": doc["Expiration"]}
        return 200, doc_text(other), ctype
    if variant == "token_not_string":
        return 200, doc_text({**doc, "Token": {"Value": token}}), ctype
    if variant == "expiration_not_string":
        return 200, doc_text({**doc, "Expiration": 1893456000}), ctype
    if variant == "field_missing":
        doc.pop("Token")
        return 200, doc_text(doc), ctype
    if variant == "duplicate_secret_key":
        text = doc_text(doc).decode()
        text = text[:-2] + f',\n  "SecretAccessKey" : "{secret}"\n}}'
        return 200, text.encode(), ctype
    if variant.startswith("status_"):
        return int(variant.split("_")[1]), doc_text(doc), ctype
    if variant == "error_documented":
        return 200, doc_text({"Code": "AssumeRoleUnauthorizedAccess",
                              "Message": "EC2 cannot assume the role.",
                              "LastUpdated": doc["LastUpdated"]}), ctype
    if variant == "error_with_secret":
        return 200, doc_text({"Code": "AssumeRoleUnauthorizedAccess",
                              "Message": f"EC2 cannot assume the role {token}",
                              "LastUpdated": doc["LastUpdated"]}), ctype
    if variant == "not_json_with_secret":
        return 200, f"AccessKeyId={key}\nSecretAccessKey={secret}\nToken={token}\n".encode(), ctype
    if variant == "truncated_json":
        text = doc_text(doc)
        return 200, text[:len(text) // 2], ctype
    if variant == "html_404":
        return 404, emu.error_page(404), "text/html"
    raise ValueError(f"unknown variant {variant}")


VARIANTS = (
    "normal", "extra_key_no_secret", "code_missing", "code_success_space", "code_lowercase",
    "code_true", "code_list", "secret_lowercase_key", "secret_nested", "secret_in_message",
    "secret_in_array", "secret_escaped", "keys_other_case", "token_not_string",
    "expiration_not_string", "field_missing", "duplicate_secret_key", "status_203",
    "status_206", "status_404", "status_500", "error_documented", "error_with_secret",
    "not_json_with_secret", "truncated_json", "html_404",
)


def bait_response(state: State) -> bytes:
    """A complete, unsolicited HTTP response carrying the raw IMDSv2 credentials."""
    body = doc_text(standard(state.creds["v2"]))
    return (b"HTTP/1.1 200 OK\r\nServer: EC2ws\r\nX-Adv-Req: bait\r\nX-Adv-Target: bait\r\n"
            b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


# ---------------------------------------------------------------------------------------------
# HTTP on raw sockets
# ---------------------------------------------------------------------------------------------

class Closed(Exception):
    pass


class Request:
    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # [(name, value)]
        self.body = b""
        self.body_declared = None  # Content-Length value or "chunked"

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class Answer:
    def __init__(self, status: int, body: bytes = b"", ctype: str = "text/plain",
                 headers: list | None = None):
        self.status = status
        self.body = body
        self.ctype = ctype
        self.headers = headers or []
        self.special = None  # name of a special route's behaviour
        self.trailer = None  # pieces: a trailer value


class Connection:
    def __init__(self, sock: socket.socket, state: State):
        self.sock = sock
        self.state = state
        self.buf = b""
        self.id = state.conn_id()

    def recv_more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed()
        self.buf += data

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                return None
            self.recv_more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.recv_more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise Closed()
            self.recv_more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self.read_line().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.read_line():  # trailers up to the empty line
                    pass
                return body
            body += self.read_exact(size)
            self.read_line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def parse_request(head: bytes) -> Request | None:
    lines = head.decode("latin-1").split("\r\n")
    while lines and lines[0] == "":  # stray CRLFs before a request line are allowed
        lines.pop(0)
    if not lines:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name, value.strip()))
    return Request(parts[0], parts[1], parts[2], headers)


def serve_connection(sock: socket.socket, state: State) -> None:
    conn = Connection(sock, state)
    personality = state.personality
    try:
        while True:
            head = conn.read_head()
            req = parse_request(head) if head is not None else None
            if req is None:
                body = emu.error_page(400)
                conn.send(b"HTTP/1.1 400 Bad Request\r\nServer: EC2ws\r\nContent-Type: text/html"
                          b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
                state.record({"conn": conn.id, "malformed": (head or b"")[:200].decode("latin-1"),
                              "t": time.time()})
                return
            te = req.header("Transfer-Encoding")
            cl = req.header("Content-Length")
            if te is not None:
                req.body_declared = "chunked"
            elif cl is not None:
                req.body_declared = cl
            if personality != "ignorebody":
                if te is not None and "chunked" in te.lower():
                    req.body = conn.read_chunked()
                elif cl is not None and cl.strip().isdigit() and 0 < int(cl) <= MAX_BODY:
                    req.body = conn.read_exact(int(cl))
            answer = respond(state, req)
            state.record({
                "conn": conn.id, "method": req.method, "target": req.target,
                "headers": req.headers, "body_declared": req.body_declared,
                "body_len": len(req.body), "status": answer.status,
                "special": answer.special, "t": time.time()})
            keep = write_answer(conn, state, req, answer)
            if not keep or personality == "closeearly":
                return
            if (req.header("Connection") or "").lower() == "close" or req.version == "HTTP/1.0":
                return
    except (Closed, OSError):
        return
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def head_bytes(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {emu.reason(status)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def write_answer(conn: Connection, state: State, req: Request, answer: Answer) -> bool:
    """Writes the answer; False: the connection must close now."""
    is_head = req.method == "HEAD"
    headers = [("Server", "EC2ws"), ("Content-Type", answer.ctype)]
    if req.header("X-Adv-Req") is not None:
        headers.append(("X-Adv-Req", req.header("X-Adv-Req")))
    headers.append(("X-Adv-Target", req.target))
    headers += answer.headers
    special = answer.special
    bodiless_status = answer.status in (204, 304) or answer.status < 200

    if special == "noanswer":
        return False
    if special == "halfhead":
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Le")
        return False
    if special == "truncated":
        conn.send(head_bytes(200, headers + [("Content-Length", "100")]) + b"0123456789")
        return False
    if special == "stall":
        body = answer.body
        conn.send(head_bytes(200, headers + [("Content-Length", str(len(body)))]) + body[:4])
        time.sleep(STALL_SECONDS)
        conn.send(body[4:] + bait_response(state))
        return True
    if special == "headbody" and is_head:
        bait = bait_response(state)
        conn.send(head_bytes(200, headers + [("Content-Length", str(len(bait)))]))
        time.sleep(0.03)
        conn.send(bait)
        return True

    if state.personality == "pieces":
        interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
                   b"HTTP/1.1 103 Early Hints\r\nLink: </adv>; rel=preload\r\n\r\n")
        if is_head or bodiless_status:
            data = interim + head_bytes(answer.status, headers + [
                ("Content-Length", str(len(answer.body)))])
        else:
            chunks = []
            body = answer.body
            at = 0
            while at < len(body):
                n = random.randint(1, 97)
                chunks.append(b"%x;adv=%d\r\n" % (len(body[at:at + n]), at) + body[at:at + n]
                              + b"\r\n")
                at += n
            trailer = b""
            if answer.trailer:
                trailer = b"X-Adv-Trailer: " + answer.trailer.encode() + b"\r\n"
            data = (interim + head_bytes(answer.status, headers + [
                ("Transfer-Encoding", "chunked"), ("Trailer", "X-Adv-Trailer")])
                + b"".join(chunks) + b"0\r\n" + trailer + b"\r\n")
        at = 0
        writes = 0
        while at < len(data):
            n = random.randint(1, 48)
            conn.send(data[at:at + n])
            at += n
            writes += 1
            if writes % 6 == 0:
                time.sleep(0.001)
    else:
        framing = [("Content-Length", str(len(answer.body)))]
        data = head_bytes(answer.status, headers + framing)
        if not is_head and not bodiless_status:
            data += answer.body
        if special == "extra":
            data += bait_response(state)
        conn.send(data)
        if special == "lateextra":
            time.sleep(0.03)
            conn.send(bait_response(state))
    return True


def respond(state: State, req: Request) -> Answer:
    emulator = state.emulator
    segments, _ = emu.canonical_segments(req.target)
    if req.method == "PUT":
        if segments != ["latest", "api", "token"]:
            return Answer(403, emu.error_page(403), "text/html")
        ttl = req.header(emu.TTL_HEADER)
        if ttl is None or not ttl.strip().isdigit() or not 1 <= int(ttl) <= 21600:
            return Answer(400, emu.error_page(400), "text/html")
        return Answer(200, emulator.issue_token(int(ttl)).encode(),
                      headers=[(emu.TTL_HEADER, ttl.strip())])
    if req.method not in ("GET", "HEAD"):
        return Answer(405, emu.error_page(405), "text/html", [("Allow", "GET, HEAD, PUT")])
    token = req.header(emu.TOKEN_HEADER)
    if token is not None:
        token = token.strip()
        if not emulator.token_valid(token):
            return Answer(401, emu.error_page(401), "text/html")
        delivery = "v2"
    else:
        delivery = "v1"

    if segments[:3] == ["latest", "meta-data", "echo"] and len(segments) == 4:
        return Answer(200, f"ECHO {segments[3]}".encode())
    if segments[:3] == ["latest", "meta-data", "adv"] and len(segments) == 5:
        answer = Answer(200, f"ECHO {segments[4]}".encode())
        answer.special = segments[3]
        return answer

    if (len(segments) == 5 and segments[:2] == ["latest", "meta-data"]
            and segments[2] == "iam"
            and segments[3] in ("security-credentials", "security-credentials-extended")
            and segments[4] == ROLE):
        return credential_answer(state, req, delivery, token,
                                 segments[3] == "security-credentials-extended")

    if not segments:
        return Answer(200, "\n".join(emu.VERSIONS).encode())
    if segments[0] != "latest":
        return Answer(404, emu.error_page(404), "text/html")
    node = state.trees[delivery]
    for segment in segments[1:]:
        if not isinstance(node, dict) or segment not in node:
            return Answer(404, emu.error_page(404), "text/html")
        node = node[segment]
    if isinstance(node, dict):
        return Answer(200, emu.listing(node, mark_directories=len(segments) > 1).encode())
    if isinstance(node, bytes):
        return Answer(200, node, "application/octet-stream")
    return Answer(200, node.encode())


def credential_answer(state: State, req: Request, delivery: str, token: str | None,
                      extended: bool) -> Answer:
    fields = dict(state.creds[delivery])
    variant = state.variant_for(token)
    status, body, ctype = variant_answer(variant, fields)
    if extended and variant == "normal":
        body = doc_text({**standard(fields), "AccountId": "123456789012"})
    answer = Answer(status, body, ctype)
    answer.special = None if variant == "normal" else f"variant:{variant}"
    if state.personality == "pieces":
        answer.trailer = fields["Token"]  # a raw value in a trailer must never reach a client
    if state.personality == "deviant":
        honour_representation_headers(req, answer, fields)
    return answer


def honour_representation_headers(req: Request, answer: Answer, fields: dict) -> None:
    """What an upstream that implements RFC 9110 fully would do with the client's headers."""
    etag = '"adv-etag"'
    answer.headers.append(("ETag", etag))
    answer.headers.append(("Last-Modified", email.utils.formatdate(usegmt=True)))
    answer.headers.append(("Accept-Ranges", "bytes"))
    if req.header("If-None-Match") is not None or req.header("If-Modified-Since") is not None:
        answer.status, answer.body = 304, b""
        return
    rng = req.header("Range")
    if rng and rng.startswith("bytes=") and answer.status == 200:
        first, _, last = rng[6:].partition("-")
        size = len(answer.body)
        start = int(first) if first else max(0, size - int(last))
        end = min(int(last), size - 1) if first and last else size - 1
        answer.headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        answer.status, answer.body = 206, answer.body[start:end + 1]
        return
    if "gzip" in (req.header("Accept-Encoding") or "").lower() and answer.status == 200:
        answer.headers.append(("Content-Encoding", "gzip"))
        answer.headers.append(("Vary", "Accept-Encoding"))
        answer.body = gzip.compress(answer.body)


# ---------------------------------------------------------------------------------------------
# Control API and main
# ---------------------------------------------------------------------------------------------

def control_handler(state: State):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status: int, document) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/log":
                with state.lock:
                    self.reply(200, list(state.log))
            elif self.path == "/state":
                self.reply(200, {"personality": state.personality, "role": ROLE,
                                 "credentials": state.creds})
            else:
                self.reply(404, {"error": self.path})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            document = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/clear":
                with state.lock:
                    state.log.clear()
                self.reply(200, {"cleared": True})
            elif self.path == "/variant":
                if document["variant"] not in VARIANTS:
                    self.reply(400, {"error": "unknown variant"})
                    return
                with state.lock:
                    state.variants[document["token"]] = document["variant"]
                self.reply(200, {"ok": True})
            else:
                self.reply(404, {"error": self.path})

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personality", choices=PERSONALITIES, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--control", default="127.0.0.1:0")
    args = parser.parse_args()
    state = State(args.personality)

    host, port = emu.parse_address(args.listen)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    chost, cport = emu.parse_address(args.control)
    control = http.server.ThreadingHTTPServer((chost, cport), control_handler(state))
    control.daemon_threads = True

    print(f"listening {emu.format_address(*listener.getsockname()[:2])}", flush=True)
    print(f"control {emu.format_address(*control.server_address[:2])}", flush=True)

    def accept_loop():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve_connection, args=(sock, state), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    threading.Thread(target=control.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
