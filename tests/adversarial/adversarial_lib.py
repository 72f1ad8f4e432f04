"""Shared machinery of the adversarial suite: processes (moto, adversarial upstreams, credlock),
a raw HTTP/1.1 client that parses exactly what credlock sends, and the raw-value detector.

Nothing here talks through credlock's own code: clients are raw sockets. Every process is
started without a shell and stopped by its PID.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CREDLOCK_BIN = Path(os.environ.get("CREDLOCK_BIN", REPO / "target" / "debug" / "credlock"))
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = Path(os.environ.get("E2E_PYTHON", VENV_BIN / "python"))
MOTO_SERVER = VENV_BIN / "moto_server"
UPSTREAM = HERE / "adv_upstream.py"
FLOODER = HERE / "flooder.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # the flooder's interpreter: runnable by `nobody`

MARK = "RAWMARKER"
ROLE = "credlock-adv-role"
CRED_PATH = f"/latest/meta-data/iam/security-credentials/{ROLE}"
EXT_PATH = f"/latest/meta-data/iam/security-credentials-extended/{ROLE}"
TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
READY_TIMEOUT = 30.0

SCRUBBED_ENV = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                "all_proxy", "NO_PROXY", "no_proxy"}


class Failure(AssertionError):
    pass


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_id(prefix: str = "r") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class Process:
    """A child started without a shell; stop() signals exactly its PID."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None,
                 stdout_pipe: bool = False, **popen):
        self.log = log
        self.log_file = open(log, "wb")
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self.log_file,
            stderr=self.log_file, start_new_session=True, **popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        if self.popen.stdout:
            self.popen.stdout.close()
        self.log_file.close()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def read_addresses(proc: Process, kinds: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Lines "KIND ADDR" printed by a child, until every kind is seen."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.popen.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline and len(found) < len(kinds):
        if not proc.alive():
            raise Failure(f"{proc.log} exited: {proc.tail()}")
        try:
            chunk = proc.popen.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            buffer += chunk
            for line in buffer.decode().splitlines():
                kind, _, addr = line.partition(" ")
                if kind in kinds:
                    found[kind] = addr
        else:
            time.sleep(0.05)
    if len(found) < len(kinds):
        raise Failure(f"child did not print {kinds}: {buffer!r} {proc.tail()}")
    return found


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def simple_http(addr: str, method: str, path: str, body: bytes | None = None,
                timeout: float = 5.0) -> tuple[int, bytes]:
    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Finding raw values
# ---------------------------------------------------------------------------------------------

def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def raw_findings(data: bytes) -> list[str]:
    """Where a raw (marked) value shows in bytes a client received: literally, in any case,
    inside a gzip member, or as a JSON string after unescaping."""
    found = []
    if MARK.encode() in data.upper():
        found.append("RAWMARKER in the bytes")
    at = data.find(b"\x1f\x8b\x08")
    while at >= 0:
        try:
            plain = zlib.decompressobj(wbits=31).decompress(data[at:])
            if MARK.encode() in plain.upper():
                found.append("RAWMARKER inside a gzip member")
        except zlib.error:
            pass
        at = data.find(b"\x1f\x8b\x08", at + 1)
    return found


def body_findings(body: bytes, headers: list[tuple[str, str]]) -> list[str]:
    found = raw_findings(body)
    encoding = ",".join(v for k, v in headers if k.lower() == "content-encoding").lower()
    if "gzip" in encoding:
        try:
            body = gzip.decompress(body)
            found += [f"{f} (decoded body)" for f in raw_findings(body)]
        except (OSError, EOFError, zlib.error):
            pass
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if document is not None and any(MARK in s.upper() for s in _strings(document)):
        found.append("RAWMARKER in a JSON string")
    return found


# ---------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client
# ---------------------------------------------------------------------------------------------

class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 interim: list[int], trailers: bytes = b"", elapsed: float = 0.0):
        self.status = status
        self.headers = headers
        self.body = body
        self.interim = interim
        self.trailers = trailers
        self.elapsed = elapsed

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)

    def findings(self) -> list[str]:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers).encode("latin-1", "replace")
        return (raw_findings(head) + raw_findings(self.trailers)
                + body_findings(self.body, self.headers))

    def __repr__(self) -> str:
        return (f"Reply({self.status}, {self.headers!r}, body={self.body[:200]!r}"
                f"{'...' if len(self.body) > 200 else ''})")


class Incomplete(Exception):
    pass


class Wire:
    """One client connection: bytes out exactly as given, replies parsed one by one. Every
    byte received is kept in `received` so tests can scan all of it for raw values."""

    def __init__(self, addr: str, timeout: float = 5.0, source: str | None = None):
        host, port = split_addr(addr)
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.received = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.buf += data
        self.received += data

    def _take_until(self, sep: bytes, deadline: float) -> bytes:
        while sep not in self.buf:
            if self.eof:
                raise Incomplete(self.buf[:300])
            self._fill(deadline)
        part, _, self.buf = self.buf.partition(sep)
        return part

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise Incomplete(self.buf[:300])
            self._fill(deadline)
        part, self.buf = self.buf[:n], self.buf[n:]
        return part

    def reply(self, head: bool = False, timeout: float | None = None) -> Reply | None:
        """The next final reply; None if the server closed before sending any byte of it.
        Raises Incomplete on a reply cut short, socket.timeout past the deadline."""
        started = time.monotonic()
        deadline = started + (timeout or self.timeout)
        interim = []
        while True:
            while not self.buf and not self.eof:
                self._fill(deadline)
            if not self.buf and self.eof:
                return None
            head_bytes = self._take_until(b"\r\n\r\n", deadline)
            lines = head_bytes.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise Incomplete(b"bad status line: " + head_bytes[:200])
            status = int(parts[1])
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
            if 100 <= status < 200:
                interim.append(status)
                continue
            break
        reply = Reply(status, headers, b"", interim)
        te = (reply.header("Transfer-Encoding") or "").lower()
        cl = reply.header("Content-Length")
        if head or status in (204, 304):
            pass
        elif "chunked" in te:
            body = b""
            while True:
                size = int(self._take_until(b"\r\n", deadline).split(b";")[0].strip(), 16)
                if size == 0:
                    trailers = b""
                    while True:
                        line = self._take_until(b"\r\n", deadline)
                        if not line:
                            break
                        trailers += line + b"\r\n"
                    reply.trailers = trailers
                    break
                body += self._take(size, deadline)
                self._take_until(b"\r\n", deadline)
            reply.body = body
        elif cl is not None:
            reply.body = self._take(int(cl), deadline)
        else:
            while not self.eof:
                self._fill(deadline)
            reply.body, self.buf = self.buf, b""
        reply.elapsed = time.monotonic() - started
        return reply

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within `seconds` (bytes it sends meanwhile
        are kept in `received`)."""
        deadline = time.monotonic() + seconds
        try:
            while not self.eof:
                self._fill(deadline)
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"", close: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 169.254.169.254"]
    lines += [f"{k}: {v}" for k, v in (headers or [])]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---------------------------------------------------------------------------------------------
# Processes: moto, upstreams, credlock
# ---------------------------------------------------------------------------------------------

class Moto:
    def __init__(self, workdir: Path):
        if not MOTO_SERVER.exists():
            raise Failure(f"{MOTO_SERVER} missing: run tests/setup.sh")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Process([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                            workdir / "moto.log", env=clean_env())
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise Failure(f"moto exited: {self.proc.tail()}")
            try:
                if simple_http(f"127.0.0.1:{port}", "GET", "/moto-api/data.json", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise Failure(f"moto did not start: {self.proc.tail()}")

    def stop(self) -> None:
        self.proc.stop()


class Upstream:
    def __init__(self, personality: str, workdir: Path, name: str | None = None):
        self.personality = personality
        self.proc = Process([str(PYTHON), str(UPSTREAM), "--personality", personality],
                            workdir / f"upstream-{name or personality}.log", env=clean_env(),
                            stdout_pipe=True)
        found = read_addresses(self.proc, ("listening", "control"), READY_TIMEOUT)
        self.addr, self.control = found["listening"], found["control"]

    def _control(self, method: str, path: str, document=None):
        body = json.dumps(document).encode() if document is not None else None
        status, data = simple_http(self.control, method, path, body)
        if status != 200:
            raise Failure(f"upstream control {method} {path}: {status} {data[:200]!r}")
        return json.loads(data)

    def log(self) -> list[dict]:
        return self._control("GET", "/log")

    def clear(self) -> None:
        self._control("POST", "/clear", {})

    def set_variant(self, token: str, variant: str) -> None:
        self._control("POST", "/variant", {"token": token, "variant": variant})

    def raw_values(self) -> list[str]:
        creds = self._control("GET", "/state")["credentials"]
        return [c[k] for c in creds.values() for k in ("AccessKeyId", "SecretAccessKey", "Token")]

    def stop(self) -> None:
        self.proc.stop()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


class Credlock:
    def __init__(self, upstream: Upstream, moto_url: str, workdir: Path, name: str,
                 extra_server: str = ""):
        if not (CREDLOCK_BIN.is_file() and os.access(CREDLOCK_BIN, os.X_OK)):
            raise Failure(f"credlock binary missing: {CREDLOCK_BIN} (cargo build --bin credlock "
                          "or set CREDLOCK_BIN)")
        self.upstream = upstream
        self.addr = f"127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / f"credlock-{name}.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.addr}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{upstream.addr}"\n'
            f"{extra_server}"
            "\n[discovery.echo]\nenabled = false\n")
        env = clean_env(AWS_ENDPOINT_URL_STS=moto_url, HOME=str(workdir),
                        AWS_REGION="us-east-1")
        self.proc = Process([str(CREDLOCK_BIN), "run", "--config", str(config)],
                            workdir / f"credlock-{name}.log", env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not self.proc.alive():
                raise Failure(f"credlock ({name}) exited: {self.proc.tail()}")
            try:
                if simple_http(self.admin, "GET", "/readyz", timeout=3)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise Failure(f"credlock ({name}) not ready: {self.proc.tail()}")
            time.sleep(0.1)
        self.locked_key = None
        token = self.token()
        reply = self.get(CRED_PATH, [(TOKEN_HEADER, token)])
        if reply is None or reply.status != 200 or reply.findings():
            raise Failure(f"credlock ({name}) does not serve locked credentials: {reply!r}")
        self.locked_key = reply.json()["AccessKeyId"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.alive()

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid)

    def stop(self) -> None:
        self.proc.stop()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of credlock's /metrics (`name{labels}`, labels as exposed), 0 if absent."""
        status, body = simple_http(self.admin, "GET", "/metrics")
        if status != 200:
            raise Failure(f"credlock /metrics: {status}")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    # ---- one request, one fresh connection ----

    def exchange(self, data: bytes, head: bool = False, timeout: float = 5.0) -> Reply | None:
        wire = Wire(self.addr, timeout)
        try:
            wire.send(data)
            return wire.reply(head=head)
        finally:
            wire.close()

    def get(self, path: str, headers=None, method: str = "GET",
            timeout: float = 5.0) -> Reply | None:
        return self.exchange(request_bytes(method, path, headers, close=True),
                             head=method == "HEAD", timeout=timeout)

    def token(self, ttl: int = 21600, timeout: float = 5.0) -> str:
        reply = self.exchange(request_bytes("PUT", TOKEN_PATH, [(TTL_HEADER, str(ttl))],
                                            close=True), timeout=timeout)
        if reply is None or reply.status != 200:
            raise Failure(f"token PUT through credlock failed: {reply!r}")
        return reply.body.decode()

    def echo(self, rid: str | None = None) -> tuple[str, Reply | None]:
        rid = rid or new_id("v")
        return rid, self.get(f"/latest/meta-data/echo/{rid}", [("X-Adv-Req", rid)])


def echo_problems(reply: Reply | None, rid: str) -> list[str]:
    """Why `reply` is not the answer to GET /latest/meta-data/echo/<rid>."""
    if reply is None:
        return [f"{rid}: no answer"]
    problems = [f"{rid}: {f}" for f in reply.findings()]
    if reply.status != 200 or reply.body != f"ECHO {rid}".encode():
        problems.append(f"{rid}: not its own answer: {reply!r}")
    req = reply.header("X-Adv-Req")
    if req is not None and req != rid:
        problems.append(f"{rid}: answer carries request id {req!r}")
    return problems


def credential_problems(reply: Reply | None, locked_key: str, rid: str | None = None,
                        head: bool = False) -> list[str]:
    """Why `reply` is not a locked credential answer (to request `rid`)."""
    if reply is None:
        return ["no answer"]
    problems = reply.findings()
    if reply.status != 200:
        problems.append(f"status {reply.status}: {reply!r}")
        return problems
    if rid is not None:
        req = reply.header("X-Adv-Req")
        if req is not None and req != rid:
            problems.append(f"answer carries request id {req!r}, not {rid!r}")
    if head:
        return problems
    try:
        doc = reply.json()
    except ValueError:
        return problems + [f"not JSON: {reply!r}"]
    if doc.get("Code") != "Success" or doc.get("AccessKeyId") != locked_key:
        problems.append(f"not the locked set: {reply!r}")
    return problems
