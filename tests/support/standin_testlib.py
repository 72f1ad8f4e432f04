"""The harness the stand-ins' tests share (test_imds_emulator.py, test_ecs_agent_emulator.py,
test_pod_identity_emulator.py, test_lambda_extensions_emulator.py): a stand-in runs as a real
subprocess, its start-up lines say where it listens (standin.py), and requests go over real
sockets with http.client. The autouse fixture that resets a test module's shared stand-in
(`emu`) before each test is in conftest.py.
"""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTUP_SECONDS = 10


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def loopback_listeners() -> list[str]:
    """--listen 127.0.0.1:0, and --listen [::1]:0 where the host has an IPv6 loopback."""
    args = ["--listen", "127.0.0.1:0"]
    if ipv6_loopback_available():
        args += ["--listen", "[::1]:0"]
    return args


def parse(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def lower_headers(response: http.client.HTTPResponse) -> dict:
    """Header names lower-cased (HTTP header names are case-insensitive)."""
    return {name.lower(): value for name, value in response.getheaders()}


class StandIn:
    """A running stand-in process (`script`, a file in this folder, set by a subclass) and small
    clients for its listeners: `lines` are its start-up lines, `listeners` the (host, port) of
    each protocol listener, `control_address` that of the control listener (None without
    --control)."""

    script: str
    control_timeout = 5.0

    @classmethod
    def run(cls, *args: str) -> subprocess.CompletedProcess:
        """Run the stand-in to completion (for usage errors): exit code, stdout, stderr."""
        return subprocess.run([sys.executable, str(HERE / cls.script), *args],
                              capture_output=True, text=True, timeout=10)

    def __init__(self, *args: str, python: str = sys.executable, **popen_kwargs):
        self.proc = subprocess.Popen(
            [python, str(HERE / self.script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
        self.lines: list[str] = []
        self.stderr = ""
        # One line per --listen (default one listener) and per --control.
        expected = max(args.count("--listen"), 1) + args.count("--control")
        deadline = time.monotonic() + STARTUP_SECONDS
        while len(self.lines) < expected:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(deadline - time.monotonic(), 0))
            line = self.proc.stdout.readline() if ready else ""
            if not line:  # no line in time, or it exited
                code = self.stop()
                raise AssertionError(f"{self.script} did not start (exit {code}); "
                                     f"stderr: {self.stderr}")
            self.lines.append(line.rstrip("\n"))
        self.listeners = [parse(line.split(" ", 1)[1]) for line in self.lines
                          if line.startswith("listening ")]
        controls = [parse(line.split(" ", 1)[1]) for line in self.lines
                    if line.startswith("control ")]
        self.control_address = controls[0] if controls else None

    def stop(self) -> int:
        """SIGTERM (unless it has exited), then its exit code; what it wrote to stderr is in
        self.stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=5)
        finally:
            self.stderr = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.proc.stdout.close()
            self.proc.stderr.close()

    def request(self, method: str, path: str, headers: dict | None = None, body=None,
                listener: int = 0, timeout: float = 5):
        """One request on a new connection to a protocol listener: (status, headers with
        lower-case names, body). A dict or list body is sent as JSON."""
        host, port = self.listeners[listener]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, lower_headers(response), response.read()
        finally:
            conn.close()

    def control(self, method: str, path: str, body=None):
        """A control API request: (status, the JSON answer)."""
        host, port = self.control_address
        conn = http.client.HTTPConnection(host, port, timeout=self.control_timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def state(self) -> dict:
        return self.control("GET", "/state")[1]

    def control_ok(self, path: str, body=None):
        """POST to the control API, which must answer 200: the JSON answer."""
        status, answer = self.control("POST", path, body)
        assert status == 200, answer
        return answer

    def set_state(self, **patch) -> dict:
        return self.control_ok("/state", patch)

    def assert_refused_unchanged(self, path: str, body) -> None:
        """POST body to the control API's path: 400 with an error, and the state unchanged."""
        before = self.state()
        status, answer = self.control("POST", path, body)
        assert status == 400 and "error" in answer, (status, answer)
        assert self.state() == before

    def raw(self, data: bytes, listener: int = 0, until_closed: bool = False) -> bytes:
        """Send raw bytes to a protocol listener; the first chunk of the answer, or everything
        up to the server's close."""
        with socket.create_connection(self.listeners[listener], timeout=5) as sock:
            sock.sendall(data)
            answer = sock.recv(4096)
            while until_closed and (chunk := sock.recv(4096)):
                answer += chunk
        return answer


def running(standin_class: type[StandIn], *args: str):
    """Body of a module-scoped `emu` fixture: the stand-in for the module's tests, which must
    exit 0 on SIGTERM at the end."""
    standin = standin_class(*args)
    yield standin
    assert standin.stop() == 0


def assert_sigterm_and_sigint_exit_zero(standin_class: type[StandIn]) -> None:
    """Both signals stop the stand-in promptly with exit 0 (standin.py)."""
    standin = standin_class("--listen", "127.0.0.1:0")
    started = time.monotonic()
    assert standin.stop() == 0
    assert time.monotonic() - started < 3
    standin = standin_class("--listen", "127.0.0.1:0")
    standin.proc.send_signal(signal.SIGINT)
    assert standin.stop() == 0
