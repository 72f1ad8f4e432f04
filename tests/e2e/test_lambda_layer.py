"""The credlock Lambda layer (layer/): its external extension and its exec wrapper, end to end.

    .venv/bin/python -m pytest -q tests/e2e/test_lambda_layer.py

The layer zip is built with layer/build.sh from the debug binary (CREDLOCK_BIN) and unpacked
into a tmp directory that stands for /opt (the real /opt is never touched). Each Lambda
execution environment is tests/support/lambda_extensions_emulator.py: the extension
(opt/extensions/credlock) and the "runtime" (opt/credlock-wrapper, then a Python function) are
separate processes, started together with the environments the emulator gives an extension and
a function (GET /environment), as Lambda starts them at init. The "runtime" is a long-lived
Python process with one boto3 session; each line "invoke" on its stdin is one invocation (it
calls sts GetCallerIdentity and prints what its SDK resolved), delivered right after the
emulator's POST /invoke has handed the extension its INVOKE event.

STS is moto behind the recording front (tests/support/recording_sts.py) for every process, so
the front records which key signed each call and which set each AssumeRole issued. Role names
starting "short-" get sets that expire SHORT_LIFETIME seconds after they are issued (credlock's
serve margin is SERVE_MARGIN here, its session duration the default); "deny-" roles are refused.
The echo source asks a local echo server that answers ECHO_IP.

What is tested:
  * the layer zip: its entries and modes (extension and wrapper executable);
  * the function sees the locked set: boto3 resolves it through the container provider
    (method container-role), moto knows it as assumed-role/ROLE/credlock-lambda-FUNCTION, the
    front saw the key STS issued to credlock (whose AssumeRole the function's raw key signed,
    with a session policy holding the echo and static addresses and the self-assume deny) sign
    the function's call; the AWS CLI v1, the Rust SDK's default chain and the JS SDK v3's
    fromHttp, each started through the wrapper, get the same set;
  * the raw credentials (ASIARAWL..., RAWSECRET, RAWTOKEN) appear nowhere the function or an
    SDK sees: the function's environment, its printed output, the endpoint's answers, the CLIs'
    output; nor in the extension's log, nor in /proc/PID/environ of the runtime or the
    extension (which the function's user can read);
  * the endpoint: no token 401, a wrong or repeated token 403, a good token on another path 404,
    another method 405, none of these carrying a credential; the token file is 0600 in a 0700
    directory;
  * refresh across an expiry: after the first set has expired, an INVOKE makes the extension
    assume again before the function asks, and the function's SDK then signs with the new set;
    a request to the endpoint within the serve margin, without an INVOKE, gets a new set too;
  * SHUTDOWN ends the extension with 0 and removes the token file; an Extensions API failure
    (500 on Next after the emulator's reset) ends it non-zero with a line on stderr;
  * the role from GetCallerIdentity when CREDLOCK_ROLE_ARN is not set;
  * init fails closed: with a role STS refuses, the extension reports init/error
    (Extension.CredlockNoLockedCredentials) and exits non-zero, the wrapper exits 1 with one line
    and the function never runs.

Ground truth is never credlock's code: the emulator's GET /state (raw credentials, extension
states, init errors), the front's log, moto's GetCallerIdentity, files on disk.

AWS documents relied on (by title): AWS Lambda Developer Guide, "Lambda Extensions API" and
"Modifying the runtime environment" (AWS_LAMBDA_EXEC_WRAPPER); AWS SDKs and Tools Reference
Guide, "Container credential provider"; AWS STS API Reference, "AssumeRole".
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import select
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _load("credlock_e2e_helpers", HERE / "conftest.py")
SUPPORT = REPO / "tests" / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
import recording_sts  # noqa: E402

EMULATOR = SUPPORT / "lambda_extensions_emulator.py"
ACCOUNT = "123456789012"
REGION = "us-east-1"
SERVE_MARGIN = 5  # lock.serve_margin_seconds in the test config
SHORT_LIFETIME = SERVE_MARGIN + 8  # a "short-" set expires this long after it is issued
ECHO_IP = "198.51.100.23"
STATIC_CIDR = "10.9.8.0/24"
RAW_MARKERS = ("ASIARAWL", "RAWSECRET", "RAWTOKEN")
WAIT = 20.0
FUNCTION_NAME = "credlock-test-function"
SESSION = f"credlock-lambda-{FUNCTION_NAME}"
INIT_ERROR_TYPE = "Extension.CredlockNoLockedCredentials"

FUNCTION_PY = r"""
import json, os, sys
import boto3
session = boto3.session.Session()
client = session.client("sts")
print(json.dumps({"ready": True, "environ": dict(os.environ)}), flush=True)
for line in sys.stdin:
    if line.strip() != "invoke":
        break
    try:
        arn = client.get_caller_identity()["Arn"]
        creds = session.get_credentials()
        out = {"arn": arn, "key": creds.get_frozen_credentials().access_key,
               "method": creds.method}
    except Exception as err:  # printed for the test to show
        out = {"error": repr(err)}
    print(json.dumps(out), flush=True)
"""

JS_SCRIPT = """
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { fromHttp } = require(require.resolve("@aws-sdk/credential-provider-http",
                                             { paths: [process.env.E2E_JS_DIR] }));
try {
  const c = await fromHttp({ timeout: 5000, maxRetries: 0 })();
  process.stdout.write(JSON.stringify({ accessKeyId: c.accessKeyId,
    expiration: c.expiration ? c.expiration.toISOString() : null }) + "\\n");
} catch (error) {
  process.stderr.write(`fromHttp: ${error?.name}: ${error?.message}\\n`);
  process.exit(1);
}
"""


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


def assumed_arn(role: str, session: str = SESSION) -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{session}"


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_no_raw(text: str, context: str) -> None:
    for marker in RAW_MARKERS:
        assert marker not in text, f"a raw credential marker {marker} reached {context}"


# --------------------------------------------------------------------------------------------
# The stand-ins
# --------------------------------------------------------------------------------------------

class EchoHandler(BaseHTTPRequestHandler):
    """Every GET answers ECHO_IP as text (what checkip.amazonaws.com does)."""

    def do_GET(self):  # noqa: N802
        body = (ECHO_IP + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Environment:
    """One emulated execution environment: the emulator, the extension, the wrapped function."""

    def __init__(self, opt: Path, workdir: Path, front_url: str, config: Path,
                 role: str | None):
        self.opt, self.workdir, self.front_url, self.config = opt, workdir, front_url, config
        self.role = role
        self.port = e2e.free_port()
        self.token_file = workdir / "run" / "credlock" / "token"
        (workdir / "run").mkdir(mode=0o755, parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.extension: subprocess.Popen | None = None
        self.function: subprocess.Popen | None = None
        argv = [str(e2e.PYTHON), str(EMULATOR), "--listen", "127.0.0.1:0",
                "--control", "127.0.0.1:0", "--function-name", FUNCTION_NAME]
        emulator = subprocess.Popen(argv, env=e2e.clean_env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE,
                                    stderr=open(workdir / "emulator.log", "wb"),
                                    start_new_session=True)
        self.processes.append(emulator)
        self.api = self.control = ""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not (self.api and self.control):
            ready, _, _ = select.select([emulator.stdout], [], [], 0.5)
            if ready:
                kind, _, addr = emulator.stdout.readline().decode().strip().partition(" ")
                if kind == "listening" and not self.api:
                    self.api = addr
                elif kind == "control":
                    self.control = addr
            elif emulator.poll() is not None:
                break
        if not (self.api and self.control):
            pytest.fail("the Lambda emulator did not print its addresses")

    # ---- the emulator's control API ----

    def ctl(self, method: str, path: str, document: dict | None = None, timeout: float = 30):
        body = json.dumps(document).encode() if document is not None else None
        reply = e2e.http_request(self.control, method, path,
                                 {"Content-Type": "application/json"} if body else None,
                                 body, timeout=timeout)
        assert reply.status == 200, f"control {method} {path}: {reply!r}"
        return reply.json()

    def state(self) -> dict:
        return self.ctl("GET", "/state")

    def extension_state(self) -> dict:
        (ext,) = [e for e in self.state()["extensions"] if e["name"] == "credlock"]
        return ext

    def raw(self) -> dict:
        return self.state()["credentials"]

    # ---- processes ----

    def settings(self) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir),
               "CREDLOCK_CONFIG": str(self.config),
               "CREDLOCK_LAMBDA_LISTEN": f"127.0.0.1:{self.port}",
               "CREDLOCK_LAMBDA_TOKEN_FILE": str(self.token_file),
               "AWS_ENDPOINT_URL_STS": self.front_url,
               "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
               # The function's configuration, which its extensions see too ("Modifying the
               # runtime environment", AWS Lambda Developer Guide).
               "AWS_LAMBDA_EXEC_WRAPPER": str(self.opt / "credlock-wrapper")}
        if self.role:
            env["CREDLOCK_ROLE_ARN"] = role_arn(self.role)
        return env

    def start_extension(self, without: tuple[str, ...] = ()) -> subprocess.Popen:
        env = {**self.ctl("GET", "/environment?for=extension"), **self.settings()}
        for name in without:
            env.pop(name, None)
        self.extension_log = self.workdir / "extension.log"
        self.extension = subprocess.Popen(
            [str(self.opt / "extensions" / "credlock")], env=env, stdin=subprocess.DEVNULL,
            stdout=open(self.extension_log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.processes.append(self.extension)
        return self.extension

    def function_env(self, **extra: str) -> dict:
        return {**self.ctl("GET", "/environment"), **self.settings(),
                "AWS_LAMBDA_EXEC_WRAPPER": str(self.opt / "credlock-wrapper"), **extra}

    def wrapped(self, argv: list[str], **extra: str) -> subprocess.CompletedProcess:
        """A one-shot command started through the wrapper, as the runtime would be."""
        return subprocess.run([str(self.opt / "credlock-wrapper"), *argv],
                              env=self.function_env(**extra), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    def start_function(self, script: Path, **extra: str) -> subprocess.Popen:
        self.function = subprocess.Popen(
            [str(self.opt / "credlock-wrapper"), str(e2e.PYTHON), str(script)],
            env=self.function_env(**extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.workdir / "function.log", "wb"), start_new_session=True)
        self.processes.append(self.function)
        self.function_output: list[str] = []
        return self.function

    def function_line(self, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.function.stdout], [], [], 0.5)
            if ready:
                line = self.function.stdout.readline().decode()
                if not line:
                    break
                self.function_output.append(line)
                return json.loads(line)
        log = (self.workdir / "function.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"the function printed nothing within {timeout:.0f} s:\n{log}")

    def invoke(self) -> dict:
        """One invocation: INVOKE to the extension (waiting until it asks for the next event
        again, its work done), then the function's turn."""
        result = self.ctl("POST", "/invoke", {"wait_s": 15, "wait_done": True})
        assert result["done"], result
        self.function.stdin.write(b"invoke\n")
        self.function.stdin.flush()
        return self.function_line()

    def endpoint(self, token: str | None | list[str], path: str = "/credentials",
                 method: str = "GET") -> e2e.Reply:
        headers = []
        for value in ([] if token is None else [token] if isinstance(token, str) else token):
            headers.append(f"Authorization: {value}\r\n")
        request = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{''.join(headers)}"
                   "Connection: close\r\n\r\n").encode()
        return e2e.raw_request(f"127.0.0.1:{self.port}", request)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt(credlock_bin, tmp_path_factory) -> Path:
    """layer/build.sh's zip of the debug binary, unpacked as a stand-in /opt."""
    work = tmp_path_factory.mktemp("layer")
    out = work / "credlock-layer.zip"
    build = subprocess.run([str(REPO / "layer" / "build.sh"), "-b", str(credlock_bin),
                            "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"layer/build.sh failed:\n{build.stdout}\n{build.stderr}"
    root = work / "opt"
    with zipfile.ZipFile(out) as zf:
        modes = {}
        for info in zf.infolist():
            zf.extract(info, root)
            modes[info.filename] = info.external_attr >> 16
            if not info.is_dir():
                os.chmod(root / info.filename, stat.S_IMODE(info.external_attr >> 16))
    files = {name: stat.S_IMODE(mode) for name, mode in modes.items() if not name.endswith("/")}
    assert files == {"extensions/credlock": 0o755, "credlock-wrapper": 0o755,
                     "credlock/credlock": 0o755, "credlock/credlock.toml": 0o644}, files
    check = subprocess.run([str(root / "credlock/credlock"), "check-config", "--config",
                            str(root / "credlock/credlock.toml")], capture_output=True, timeout=30)
    assert check.returncode == 0, check  # the shipped (stripped) binary runs, its config is valid
    return root


@pytest.fixture(scope="module")
def front(moto_url):
    with recording_sts.RecordingSts(moto_url, deny_prefix="deny-", short_prefix="short-",
                                    short_lifetime=SHORT_LIFETIME) as sts:
        yield sts


@pytest.fixture(scope="module")
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def config(tmp_path_factory, echo) -> Path:
    path = tmp_path_factory.mktemp("config") / "credlock.toml"
    path.write_text(
        f"[lock]\nserve_margin_seconds = {SERVE_MARGIN}\n"
        "\n[discovery.imds]\nenabled = false\n"
        f'\n[discovery.echo]\nurls = ["{echo}"]\n'
        f'\n[discovery.static]\nipv4 = ["{STATIC_CIDR}"]\n')
    return path


@pytest.fixture(scope="module")
def running(opt, front, config, tmp_path_factory):
    """One environment after its init: the extension holds a set, the function is started."""
    role = f"short-fn-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("env")
    env = Environment(opt, workdir, front.url, config, role)
    try:
        mark = front.mark()
        script = workdir / "function.py"
        script.write_text(FUNCTION_PY)
        env.start_extension()
        env.start_function(script)
        env.ready = env.function_line()
        e2e.wait_for(lambda: env.extension_state()["waiting"], WAIT, "the extension's init")
        env.mark = mark
        env.first = env.invoke()
        yield env
    finally:
        env.stop()


def locked_assumes(front, env, mark: int = 0) -> list[dict]:
    return [c for c in front.assumes(mark, session=SESSION) if c["role_arn"] == role_arn(env.role)]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_function_sees_only_the_locked_set(running, front):
    env = running
    raw = env.raw()
    assert raw["AccessKeyId"].startswith("ASIARAWL"), "premise: the emulator marks raw sets"
    # The runtime's environment: no raw credential, the endpoint instead.
    environ = env.ready["environ"]
    assert_no_raw(json.dumps(environ), "the function's environment")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_ACCESS_KEY", "AWS_SECURITY_TOKEN"):
        assert name not in environ, name
    assert environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == \
        f"http://127.0.0.1:{env.port}/credentials"
    assert environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"] == env.token_file.read_text()
    # What any process of the function's user can read: the runtime's and the extension's
    # /proc/PID/environ (the extension re-executes itself without the raw variables).
    for proc in (env.function, env.extension):
        seen = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        assert_no_raw(seen, f"/proc/{proc.pid}/environ")
        assert "AWS_SECRET_ACCESS_KEY=" not in seen
    # The SDK's view and moto's.
    first = env.first
    assert "error" not in first, first
    assert first["method"] == "container-role", first
    assert first["arn"] == assumed_arn(env.role), first
    # The front: one AssumeRole for the environment, signed by the raw key, and the function's
    # call signed by the key it issued.
    (assume,) = locked_assumes(front, env, env.mark)
    assert assume["signer"] == raw["AccessKeyId"] and assume["token"] == raw["Token"]
    assert assume["issued_key"] == first["key"]
    policy = json.loads(assume["policy"])
    text = json.dumps(policy)
    assert ECHO_IP in text and STATIC_CIDR in text, text
    assert any(s.get("Sid") == "DenySelfAssume" for s in policy["Statement"]), text
    calls = front.calls(env.mark, "GetCallerIdentity")
    assert [c["signer"] for c in calls] == [first["key"]], calls
    assert_no_raw("".join(env.function_output), "the function's output")


def test_other_sdks_through_the_wrapper(running, node_project, tmp_path):
    env = running
    key = env.endpoint(env.token_file.read_text()).json()["AccessKeyId"]
    aws = e2e.VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing"
    cli = env.wrapped([str(aws), "sts", "get-caller-identity", "--output", "json"])
    assert cli.returncode == 0, cli
    assert_no_raw(cli.stdout + cli.stderr, "the AWS CLI's output")
    assert json.loads(cli.stdout)["Arn"] == assumed_arn(env.role)
    child = e2e.CREDLOCK_BIN.parent / "examples" / "sdk_chain_child"
    assert child.is_file(), f"{child} missing (cargo build --examples)"
    rust = env.wrapped([str(child)])
    assert rust.returncode == 0, rust
    assert_no_raw(rust.stdout + rust.stderr, "the Rust SDK's output")
    (line,) = [l for l in rust.stdout.splitlines() if l.startswith("SDK-CHAIN-REPORT ")]
    seen = json.loads(line.removeprefix("SDK-CHAIN-REPORT "))
    assert seen["arn"] == assumed_arn(env.role) and seen["access_key_id"] == key, seen
    script = tmp_path / "from_http.mjs"
    script.write_text(JS_SCRIPT)
    js = env.wrapped(["node", str(script)], E2E_JS_DIR=str(node_project))
    assert js.returncode == 0, js
    assert_no_raw(js.stdout + js.stderr, "the JS SDK's output")
    assert json.loads(js.stdout)["accessKeyId"] == key


def test_endpoint_refusals_and_token_file(running):
    env = running
    token = env.token_file.read_text()
    assert len(token) == 64 and all(c in "0123456789abcdef" for c in token)
    assert stat.S_IMODE(os.lstat(env.token_file).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(env.token_file.parent).st_mode) == 0o700
    good = env.endpoint(token)
    assert good.status == 200, good
    doc = good.json()
    assert set(doc) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
    assert doc["RoleArn"] == role_arn(env.role)
    assert_no_raw(good.body.decode(), "the endpoint's answer")
    cases = [(None, "/credentials", "GET", 401), ("0" * 64, "/credentials", "GET", 403),
             ([token, token], "/credentials", "GET", 403), (token[:-1], "/credentials", "GET", 403),
             (None, "/other", "POST", 401), (token, "/other", "GET", 404),
             (token, "/credentials", "POST", 405)]
    for given, path, method, status in cases:
        reply = env.endpoint(given, path, method)
        assert reply.status == status, (given and len(given), path, method, reply)
        body = reply.body.decode()
        for value in (doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"]):
            assert value not in body, (path, method, status)
        assert_no_raw(body, f"a {status} answer")


def test_refresh_on_invoke_across_an_expiry(running, front):
    env = running
    first = env.endpoint(env.token_file.read_text()).json()
    expires = parse_time(first["Expiration"]).timestamp()
    assert expires - time.time() <= SHORT_LIFETIME + 1, "premise: the front shortened the set"
    time.sleep(max(0.0, expires - time.time() + 0.5))  # the first set has expired
    mark = front.mark()
    result = env.ctl("POST", "/invoke", {"wait_s": 15, "wait_done": True})
    assert result["done"], result
    # The extension assumed again on INVOKE, before the function asked.
    (renewal,) = locked_assumes(front, env, mark)
    assert renewal["signer"] == env.raw()["AccessKeyId"]
    env.function.stdin.write(b"invoke\n")
    env.function.stdin.flush()
    second = env.function_line()
    assert "error" not in second, second
    assert second["key"] == renewal["issued_key"] != first["AccessKeyId"], second
    assert second["arn"] == assumed_arn(env.role)
    assert [c["signer"] for c in front.calls(mark, "GetCallerIdentity")] == [second["key"]]
    assert len(locked_assumes(front, env, mark)) == 1
    assert_no_raw("".join(env.function_output), "the function's output")


def test_refresh_on_request_within_the_margin(running, front):
    env = running
    token = env.token_file.read_text()
    held = env.endpoint(token).json()
    expires = parse_time(held["Expiration"]).timestamp()
    time.sleep(max(0.0, expires - SERVE_MARGIN - time.time() + 0.5))
    mark = front.mark()
    renewed = env.endpoint(token)
    assert renewed.status == 200, renewed
    (renewal,) = locked_assumes(front, env, mark)
    assert renewed.json()["AccessKeyId"] == renewal["issued_key"] != held["AccessKeyId"]


def test_shutdown_ends_the_extension_with_0(running):
    env = running
    assert env.extension.poll() is None, "the extension ended early"
    result = env.ctl("POST", "/shutdown", {"wait_s": 5})
    assert result["received"], result
    assert env.extension.wait(timeout=10) == 0
    assert not env.token_file.exists()
    env.function.stdin.close()
    env.function.wait(timeout=10)
    log = env.extension_log.read_text(errors="replace")
    assert "SHUTDOWN" in log, log[-2000:]
    assert_no_raw(log, "the extension's log")


def test_role_from_caller_identity_and_api_failure(opt, front, config, moto_url,
                                                   tmp_path_factory):
    role = f"short-cid-{uuid.uuid4().hex[:8]}"
    sts = boto3.client("sts", endpoint_url=moto_url, region_name=REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    source = sts.assume_role(RoleArn=role_arn(role), RoleSessionName="lambda-fn")["Credentials"]
    env = Environment(opt, tmp_path_factory.mktemp("cid"), front.url, config, None)
    try:
        env.ctl("POST", "/state", {"credentials": {
            "AccessKeyId": source["AccessKeyId"], "SecretAccessKey": source["SecretAccessKey"],
            "Token": source["SessionToken"]}})
        mark = front.mark()
        env.start_extension()
        e2e.wait_for(lambda: env.extension_state()["waiting"] or env.extension.poll() is not None,
                   WAIT, "the extension's init")
        assert env.extension.poll() is None, env.extension_log.read_text(errors="replace")
        doc = env.endpoint(env.token_file.read_text()).json()
        assert doc["RoleArn"] == role_arn(role)
        (who,) = front.calls(mark, "GetCallerIdentity")
        assert who["signer"] == source["AccessKeyId"]
        (assume,) = front.assumes(mark, session=SESSION)
        assert assume["role_arn"] == role_arn(role) and assume["signer"] == source["AccessKeyId"]
        assert assume["issued_key"] == doc["AccessKeyId"]
        # The emulator's reset answers the waiting Next with 500: the extension must end.
        e2e.http_request(env.control, "POST", "/reset")
        assert env.extension.wait(timeout=10) != 0
        log = env.extension_log.read_text(errors="replace")
        assert "event/next" in log and "500" in log, log[-2000:]
    finally:
        env.stop()


def test_init_fails_closed_when_sts_refuses(opt, front, config, tmp_path_factory):
    role = f"deny-fn-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("deny")
    env = Environment(opt, workdir, front.url, config, role)
    ran = workdir / "function-ran"
    try:
        mark = front.mark()
        env.start_extension()
        wrapper = subprocess.Popen(
            [str(opt / "credlock-wrapper"), str(e2e.PYTHON), "-c",
             f"open({str(ran)!r}, 'w').write('ran')"],
            env=env.function_env(CREDLOCK_LAMBDA_WAIT_SECONDS="4"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert env.extension.wait(timeout=WAIT) != 0
        out, err = wrapper.communicate(timeout=WAIT)
        assert wrapper.returncode == 1, (out, err)
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("credlock-wrapper: no locked credentials"), err
        assert not ran.exists(), "the function ran without a locked set"
        assert not env.token_file.exists()
        ext = env.extension_state()
        assert ext["state"] == "InitError" and ext["error_type"] == INIT_ERROR_TYPE, ext
        assert_no_raw(json.dumps(ext), "the init error")
        refused = [c for c in front.assumes(mark, session=SESSION)
                   if c["role_arn"] == role_arn(role)]
        assert refused and all(c["status"] == 403 and not c["issued"] for c in refused), refused
        log = env.extension_log.read_text(errors="replace")
        assert "AccessDenied" in log or "access_denied" in log, log[-2000:]
        assert_no_raw(log, "the extension's log")
    finally:
        env.stop()


def test_init_fails_closed_without_credlocks_exec_wrapper(opt, front, config, tmp_path_factory):
    """A function configured without AWS_LAMBDA_EXEC_WRAPPER would start its runtime with the
    raw credentials beside an unused locked set: the extension fails the init instead, before
    any STS call, and says why."""
    role = f"short-nowrap-{uuid.uuid4().hex[:8]}"
    env = Environment(opt, tmp_path_factory.mktemp("nowrap"), front.url, config, role)
    try:
        mark = front.mark()
        env.start_extension(without=("AWS_LAMBDA_EXEC_WRAPPER",))
        assert env.extension.wait(timeout=WAIT) != 0
        ext = env.extension_state()
        assert ext["state"] == "InitError" and ext["error_type"] == INIT_ERROR_TYPE, ext
        assert not env.token_file.exists()
        assert not front.assumes(mark, session=SESSION), "an AssumeRole was made anyway"
        log = env.extension_log.read_text(errors="replace")
        assert "AWS_LAMBDA_EXEC_WRAPPER" in log, log[-2000:]
        assert_no_raw(log, "the extension's log")
    finally:
        env.stop()
