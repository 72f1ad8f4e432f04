"""Fixtures for credlock's end-to-end tests: the IMDS emulator, moto (STS) and credlock itself.

    /work/main/.venv/bin/python -m pytest -q tests/e2e

Everything listens on 127.0.0.1 on free ports, so the suite runs next to other credlock
instances. Every process is started directly (no shell, no pyenv shim) and killed by its PID.

Environment:
  CREDLOCK_BIN   the credlock binary (default: <repo>/target/debug/credlock). Missing -> the
                 tests FAIL (they are never skipped).
  E2E_PYTHON     interpreter for the emulator (default: <repo>/.venv/bin/python)

Tests talk to the peers with raw http.client / sockets (never through credlock's own code) and
use the emulator's control API as the ground truth: GET /state holds the raw IMDSv1/IMDSv2
credential sets that must never leak, GET /requests shows what actually reached the upstream.
Each test request carries a unique User-Agent marker so it can be found in that log.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CREDLOCK_BIN = Path(os.environ.get("CREDLOCK_BIN", REPO / "target" / "debug" / "credlock"))
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = Path(os.environ.get("E2E_PYTHON", VENV_BIN / "python"))
MOTO_SERVER = VENV_BIN / "moto_server"
EMULATOR = REPO / "tests" / "support" / "imds_emulator.py"
JS_DIR = REPO / "tests" / "js"

READY_TIMEOUT = 20.0  # credlock /readyz, moto, emulator start-up
HTTP_TIMEOUT = 10.0  # any single test request
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"

# Variables that would let an SDK find credentials somewhere other than IMDS, or send its
# traffic through a proxy: removed from every environment we hand to a client or to credlock.
SCRUBBED_ENV_PREFIXES = ("AWS_",)
SCRUBBED_ENV = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                "all_proxy", "NO_PROXY", "no_proxy"}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def new_marker() -> str:
    """A unique User-Agent so one request can be found in the emulator's GET /requests."""
    return f"credlock-e2e/{uuid.uuid4().hex}"


class Reply:
    """One HTTP response as seen on the wire."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 version: str = "", elapsed: float = 0.0):
        self.status = status
        self.headers = headers
        self.body = body
        self.version = version
        self.elapsed = elapsed

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (f"Reply({self.status}, headers={self.headers!r}, "
                f"body={self.body[:300]!r}{'...' if len(self.body) > 300 else ''})")


def http_request(addr: str, method: str, path: str, headers: dict | None = None,
                 body: bytes | None = None, timeout: float = HTTP_TIMEOUT) -> Reply:
    """One request on a fresh connection with http.client; the path is sent exactly as given."""
    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(resp.version, str(resp.version))
        return Reply(resp.status, resp.getheaders(), data, version, time.monotonic() - started)
    finally:
        conn.close()


def raw_request(addr: str, data: bytes, timeout: float = HTTP_TIMEOUT,
                head: bool = False) -> Reply:
    """Send bytes exactly as given (for targets http.client would not produce) and parse the
    answer. The request should ask for Connection: close (or be HTTP/1.0)."""
    host, port = split_addr(addr)
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            # Stop once a complete response is in (the server may keep the connection open).
            whole = b"".join(chunks)
            if b"\r\n\r\n" in whole:
                head_part, _, rest = whole.partition(b"\r\n\r\n")
                length = None
                for line in head_part.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if head or (length is not None and len(rest) >= length):
                    break
    raw = b"".join(chunks)
    elapsed = time.monotonic() - started
    if not raw:
        return Reply(0, [], b"", "", elapsed)  # connection closed without an answer
    head_part, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    reply = Reply(int(status), headers, rest, version, elapsed)
    length = reply.header("Content-Length")
    if length is not None and not head:
        reply.body = rest[:int(length)]
    return reply


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - keep polling until the deadline
            last_error = err
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- log tail ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}){tail}")


class Process:
    """A child process started without a shell; stop() kills exactly its PID."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 stdout_pipe: bool = False):
        self.name = name
        self.log = log
        self.log_file = open(log, "wb")
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self.log_file,
            stderr=self.log_file, start_new_session=True)

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


# --------------------------------------------------------------------------------------------
# The stack: emulator + credlock (+ the session's moto)
# --------------------------------------------------------------------------------------------

class Stack:
    """One IMDS emulator (in a given --tokens mode) with one credlock in front of it."""

    def __init__(self, tokens: str, moto_url: str, workdir: Path):
        self.tokens = tokens
        self.moto_url = moto_url
        self.workdir = workdir
        self.processes: list[Process] = []
        self.imds = ""  # emulator IMDS listener, host:port
        self.control = ""  # emulator control API, host:port
        self.proxy = ""  # credlock IMDS listener, host:port
        self.admin = ""  # credlock admin listener, host:port

    # ---- lifecycle ----

    def start(self) -> "Stack":
        self._start_emulator()
        self._start_credlock()
        return self

    def _start_emulator(self) -> None:
        argv = [str(PYTHON), str(EMULATOR), "--listen", "127.0.0.1:0",
                "--control", "127.0.0.1:0", "--tokens", self.tokens]
        proc = Process(f"imds-emulator-{self.tokens}", argv, self.workdir / "emulator.log",
                       env=clean_env(), stdout_pipe=True)
        self.processes.append(proc)
        # The emulator prints "listening ADDR" then "control ADDR", flushed, once bound.
        deadline = time.monotonic() + READY_TIMEOUT
        os.set_blocking(proc.popen.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline and not (self.imds and self.control):
            if not proc.alive():
                pytest.fail(f"IMDS emulator exited with {proc.popen.returncode}: "
                            f"{proc.log.read_text(errors='replace')}")
            try:
                chunk = proc.popen.stdout.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                buffer += chunk
                for line in buffer.decode().splitlines():
                    kind, _, addr = line.partition(" ")
                    if kind == "listening" and not self.imds:
                        self.imds = addr
                    elif kind == "control":
                        self.control = addr
            else:
                time.sleep(0.05)
        if not (self.imds and self.control):
            pytest.fail(f"IMDS emulator did not print its addresses: {buffer!r}")

    def _start_credlock(self) -> None:
        if not (CREDLOCK_BIN.is_file() and os.access(CREDLOCK_BIN, os.X_OK)):
            pytest.fail(f"credlock binary missing or not executable: {CREDLOCK_BIN} "
                        "(build it with `cargo build --bin credlock`, or set CREDLOCK_BIN)")
        self.proxy = f"127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"
        config = self.workdir / "credlock.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.proxy}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{self.imds}"\n'
            "\n[discovery.echo]\nenabled = false\n")
        env = clean_env(AWS_ENDPOINT_URL_STS=self.moto_url, HOME=str(self.workdir))
        proc = Process(f"credlock-{self.tokens}",
                       [str(CREDLOCK_BIN), "run", "--config", str(config)],
                       self.workdir / "credlock.log", env=env)
        self.processes.append(proc)

        def ready():
            if not proc.alive():
                pytest.fail(f"credlock exited with {proc.popen.returncode}:\n"
                            f"{proc.log.read_text(errors='replace')[-4000:]}")
            return http_request(self.admin, "GET", "/readyz", timeout=2).status == 200

        wait_for(ready, READY_TIMEOUT, f"credlock /readyz on {self.admin}", proc.log)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def credlock_alive(self) -> bool:
        return self.processes[-1].alive()

    def credlock_log(self) -> str:
        return (self.workdir / "credlock.log").read_text(errors="replace")

    # ---- the emulator's control API ----

    def _control(self, method: str, path: str, document: dict | None = None):
        body = json.dumps(document).encode() if document is not None else None
        reply = http_request(self.control, method, path,
                             {"Content-Type": "application/json"} if body else None, body)
        assert reply.status == 200, f"control {method} {path}: {reply!r}"
        return reply.json()

    def state(self) -> dict:
        return self._control("GET", "/state")

    def set_state(self, **patch) -> dict:
        return self._control("POST", "/state", patch)

    def requests_log(self) -> list[dict]:
        return self._control("GET", "/requests")

    def clear_requests(self) -> None:
        self._control("POST", "/requests/clear")

    def seen(self, marker: str) -> list[dict]:
        """Requests that reached the emulator carrying this User-Agent marker."""
        return [r for r in self.requests_log()
                if any(k.lower() == "user-agent" and v == marker for k, v in r["headers"])]

    # ---- IMDS through credlock / directly ----

    raw_request = staticmethod(raw_request)  # bytes on a socket, for tests (no conftest import)

    def via(self, method: str, path: str, headers: dict | None = None, **kw) -> Reply:
        return http_request(self.proxy, method, path, headers, **kw)

    def direct(self, method: str, path: str, headers: dict | None = None, **kw) -> Reply:
        return http_request(self.imds, method, path, headers, **kw)

    def token(self, addr: str | None = None, ttl: int = 300) -> str:
        reply = http_request(addr or self.imds, "PUT", "/latest/api/token",
                             {TOKEN_TTL_HEADER: str(ttl)})
        assert reply.status == 200, reply
        return reply.body.decode()

    # ---- ground truth about credentials ----

    @property
    def role(self) -> str:
        return self.state()["role"]

    def raw_role_sets(self) -> dict[str, dict]:
        """The emulator's IMDSv1 and IMDSv2 role credential sets (what must never leak)."""
        creds = self.state()["credentials"]
        return {"v1": creds["v1"], "v2": creds["v2"]}

    def raw_secret_values(self) -> list[str]:
        return [fields[key] for fields in self.raw_role_sets().values()
                for key in ("AccessKeyId", "SecretAccessKey", "Token") if key in fields]

    def assert_no_raw(self, body: bytes, context: str = "") -> None:
        text = body.decode("utf-8", "replace")
        for value in self.raw_secret_values():
            assert value not in text, f"RAW credential value leaked {context}: {value[:24]}..."
        assert "ASIAV1" not in text and "ASIAV2" not in text, f"raw AccessKeyId leaked {context}"

    def locked(self) -> dict:
        """The credentials credlock serves, fetched through it with an IMDSv2 token."""
        token = self.token(self.proxy)
        reply = self.via("GET", f"/latest/meta-data/iam/security-credentials/{self.role}",
                         {TOKEN_HEADER: token})
        assert reply.status == 200, reply
        return reply.json()


@pytest.fixture(scope="session")
def credlock_bin() -> Path:
    if not (CREDLOCK_BIN.is_file() and os.access(CREDLOCK_BIN, os.X_OK)):
        pytest.fail(f"credlock binary missing or not executable: {CREDLOCK_BIN} "
                    "(build it with `cargo build --bin credlock`, or set CREDLOCK_BIN)")
    return CREDLOCK_BIN


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory, credlock_bin) -> str:
    if not MOTO_SERVER.exists():
        pytest.fail(f"{MOTO_SERVER} missing: create the venv (tests/setup.sh or the contract)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = Process("moto", [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], log,
                   env=clean_env())
    url = f"http://127.0.0.1:{port}"

    def up():
        if not proc.alive():
            pytest.fail(f"moto_server exited: {log.read_text(errors='replace')}")
        return http_request(f"127.0.0.1:{port}", "GET", "/moto-api/data.json", timeout=2).status == 200

    try:
        wait_for(up, READY_TIMEOUT, f"moto on {url}", log)
        yield url
    finally:
        proc.stop()


class StackPool:
    """One stack per --tokens mode, started on first use and stopped at the end of the session."""

    def __init__(self, moto: str, tmp_path_factory):
        self.moto = moto
        self.tmp_path_factory = tmp_path_factory
        self.stacks: dict[str, Stack] = {}
        self.failed: dict[str, str] = {}

    def get(self, tokens: str) -> Stack:
        if tokens in self.failed:
            pytest.fail(f"the {tokens!r} stack failed to start earlier: {self.failed[tokens]}")
        stack = self.stacks.get(tokens)
        if stack is None:
            stack = Stack(tokens, self.moto, self.tmp_path_factory.mktemp(f"stack-{tokens}"))
            self.stacks[tokens] = stack  # stopped at session end even if start() fails
            try:
                stack.start()
            except BaseException as err:
                self.failed[tokens] = str(err)[:2000]
                raise
        return stack

    def stop(self) -> None:
        for stack in self.stacks.values():
            stack.stop()


@pytest.fixture(scope="session")
def stack_pool(moto_url, tmp_path_factory):
    pool = StackPool(moto_url, tmp_path_factory)
    try:
        yield pool
    finally:
        pool.stop()


def _healthy(stack: Stack) -> Stack:
    """Undo what a previous test may have left (hang/outage), and require a live credlock."""
    state = stack.state()
    if state["delay_ms"] or state["down"]:
        stack.set_state(delay_ms=0, down=False)
    assert stack.credlock_alive(), f"credlock died:\n{stack.credlock_log()[-4000:]}"
    return stack


@pytest.fixture
def stack(stack_pool) -> Stack:
    """credlock in front of an emulator with HttpTokens=optional (IMDSv1 and v2 allowed)."""
    return _healthy(stack_pool.get("optional"))


@pytest.fixture
def stack_required(stack_pool) -> Stack:
    """credlock in front of an emulator started with --tokens required (IMDSv2 only)."""
    return _healthy(stack_pool.get("required"))


@pytest.fixture(params=["optional", "required"])
def any_stack(request, stack_pool) -> Stack:
    return _healthy(stack_pool.get(request.param))


@pytest.fixture
def sdk_env(tmp_path):
    """Environment for an SDK client whose ONLY credential source is IMDS at credlock."""

    def make(stack: Stack) -> dict:
        return clean_env(
            AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://{stack.proxy}",
            AWS_CONFIG_FILE="/dev/null",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            HOME=str(tmp_path),
        )

    return make


@pytest.fixture(scope="session")
def node_project() -> Path:
    """tests/js with its locked dependencies installed (npm ci, only when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are required for the JS SDK test")
    installed = JS_DIR / "node_modules" / "@smithy" / "credential-provider-imds" / "package.json"
    if not installed.exists():
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            pytest.fail(f"npm ci failed in {JS_DIR}:\n{result.stdout}\n{result.stderr}")
    return JS_DIR


def pytest_report_header(config):
    return [f"credlock binary: {CREDLOCK_BIN}", f"python for emulator: {PYTHON}",
            f"interpreter: {sys.executable}"]
