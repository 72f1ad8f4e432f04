"""credlock's opt-in loopback container credentials endpoint ([containers.endpoint]) and
`credlock endpoint-token`, end to end.

    .venv/bin/python -m pytest -q tests/e2e/test_container_endpoint.py

Must run as root (tokens are owned by `nobody`, the digests file by root, and `credlock
endpoint-token` refuses to run as anyone else): the module FAILS otherwise, it never skips.

One stack per module: conftest's IMDS emulator and moto (the session's) with one credlock whose
[containers.endpoint] listens on a free 127.0.0.1 port and reads its token digests from this
module's tmp dir. Before credlock starts, `credlock endpoint-token --user nobody` makes the
token every test uses (NOBODY_TOKEN); clients reach the endpoint the way the AWS SDKs and Tools
Reference Guide, "Container credential provider", describes:
AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/credentials plus
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (the SDK sends the file's content as Authorization).

What is tested:
  * boto3 (method "container-role"), the AWS CLI v1, the JS SDK v3 and the Rust SDK's default
    chain (examples/sdk_chain_child.rs), with no other credential source, get the set credlock's
    IMDS listener serves for the instance role (same AccessKeyId), and moto knows it as
    arn:aws:sts::ACCOUNT:assumed-role/ROLE/INSTANCE-ID; never a raw emulator value;
  * the document: 200 application/json with AccessKeyId, SecretAccessKey, Token, Expiration
    (YYYY-MM-DDTHH:MM:SSZ) and RoleArn, all equal to the IMDS listener's locked set;
  * refusals: no Authorization -> 401, an unknown or a revoked token -> 403 (also on other paths
    and methods: auth comes first), a good token on another path -> 404, another method -> 405;
    no body carries a locked or raw value; credlock_endpoint_requests_total moves by exactly the
    requests made;
  * `credlock endpoint-token`: a 0400 token file of 64 lowercase hex characters owned by the
    user and the user's primary group; a 0644 root-owned digests file with exactly one line
    "<sha256 of the token> <user>" per user; a second run replaces the user's line (new token
    accepted, old one refused after the reload); a symlink at --file is refused and its target
    untouched; --revoke removes the line and the file; not root -> exit 1, one "credlock: " line;
    no --user -> exit 2;
  * fail closed: a digests file others can write, owned by nobody, or in a directory others can
    write -> a good token gets 403 (and an ERROR line is logged), and 200 again once fixed;
  * off by default: a credlock without [containers.endpoint] listens on nothing but its IMDS and
    admin addresses; a non-loopback [containers.endpoint] listen fails `credlock check-config`
    with 78.

Ground truth is never credlock's code: moto's GetCallerIdentity on the sets the SDKs resolved;
the emulator's GET /state (the raw IMDSv1/IMDSv2 sets, which must never come out); the set
credlock's IMDS listener serves for the role path (fetched with raw http.client); sha256 of the
token file computed here; file modes, owners and contents on disk (os.lstat, pwd); and the kernel's
table of listening sockets (/proc/net/tcp*, /proc/PID/fd).

The JS SDK v3: @aws-sdk/credential-provider-http (tests/js/package.json), the default chain's
container provider fromHttp, which reads AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE itself; missing
-> the test fails, saying so.

AWS documents relied on (by title):
  * AWS SDKs and Tools Reference Guide, "Container credential provider"
    (AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE,
    AWS_CONTAINER_AUTHORIZATION_TOKEN; http full URIs must be loopback);
  * AWS STS API Reference, "GetCallerIdentity"; IAM User Guide, "IAM identifiers" (the
    assumed-role ARN arn:aws:sts::ACCOUNT:assumed-role/ROLE-NAME/SESSION-NAME);
  * Amazon EC2 User Guide, "IAM roles for Amazon EC2" (the credentials document served on the
    IMDS role path).
"""

from __future__ import annotations

import datetime
import grp
import hashlib
import importlib.util
import json
import os
import pwd
import random
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load(name: str, path: Path):
    """tests/e2e/conftest.py's helpers as a module of their own name (as test_ecs_tasks does)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _load("credlock_e2e_helpers", HERE / "conftest.py")

if os.geteuid() != 0:
    pytest.fail("tests/e2e/test_container_endpoint.py must run as root (token files owned by "
                "nobody, a root-owned digests file, `credlock endpoint-token` as root)",
                pytrace=False)

ACCOUNT = "123456789012"  # the emulator's account (and moto's default)
REGION = "us-east-1"
RUN_TIMEOUT = 60
# The daemon re-reads the digests file at most once every 2 s: a change shows within ~3 s.
RELOAD_TIMEOUT = 4.5
TOKEN_FORMAT = re.compile(r"[0-9a-f]{64}")
DIGEST_LINE = re.compile(r"([0-9a-f]{64}) (\S+)")
EXPIRATION_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
DOCUMENT_KEYS = {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
RESULTS = ("served", "unauthorized", "forbidden", "unavailable", "refused")
METRIC_LINE = re.compile(r"^credlock_endpoint_requests_total\{([^}]*)\}\s+(\S+)\s*$", re.M)
JS_DIR = REPO / "tests" / "js"
JS_HTTP_PACKAGE = "@aws-sdk/credential-provider-http"
NOBODY = pwd.getpwnam("nobody")
OTHER_USER = "daemon"  # the second user (a token that gets revoked)
THIRD_USER = "bin"  # the symlink refusals (never gets a token)

JS_SCRIPT = """
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const httpPaths = (process.env.E2E_JS_HTTP_PATHS || "").split(":").filter(Boolean);
const { fromHttp } = require(require.resolve("@aws-sdk/credential-provider-http",
                                             { paths: httpPaths }));
const provider = fromHttp({ timeout: 5000, maxRetries: 0 });
const name = "fromHttp";
try {
  const c = await provider();
  process.stdout.write(JSON.stringify({
    provider: name, accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey,
    sessionToken: c.sessionToken,
    expiration: c.expiration ? c.expiration.toISOString() : null,
  }) + "\\n");
} catch (error) {
  process.stderr.write(`${name}: ${error?.name}: ${error?.message}` +
    (error?.statusCode ? ` (HTTP ${error.statusCode})` : "") + "\\n");
  process.exit(1);
}
"""

BOTO3_SCRIPT = """
import json, boto3
s = boto3.Session()
c = s.get_credentials()
f = c.get_frozen_credentials()
arn = s.client("sts").get_caller_identity()["Arn"]
print(json.dumps({"method": c.method, "key": f.access_key, "secret": f.secret_key,
                  "token": f.token, "arn": arn}))
"""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def identity(moto_url: str, key: str, secret: str, token: str) -> dict:
    sts = boto3.client("sts", endpoint_url=moto_url, region_name=REGION,
                       aws_access_key_id=key, aws_secret_access_key=secret,
                       aws_session_token=token)
    return sts.get_caller_identity()


def digest_lines(source: Path | str) -> list[tuple[str, str]]:
    """(digest, user) for every non-empty line of a digests file (a path, or its text); any
    line of another shape fails the test."""
    text = source.read_text() if isinstance(source, Path) else source
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = DIGEST_LINE.fullmatch(line)
        assert match, f"a digests line is not '<sha256 hex> <user>': {line!r}"
        pairs.append((match.group(1), match.group(2)))
    return pairs


def lines_for(source: Path | str, user: str) -> list[str]:
    return [digest for digest, owner in digest_lines(source) if owner == user]


class Run:
    def __init__(self, result: subprocess.CompletedProcess):
        self.rc = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr

    def __repr__(self) -> str:
        return f"Run(rc={self.rc}, stdout={self.stdout[:300]!r}, stderr={self.stderr[:600]!r})"


def endpoint_token(*args: str, as_nobody: bool = False) -> Run:
    """`credlock endpoint-token ARGS`, as root (or as nobody:nogroup with no groups)."""
    argv = [str(e2e.CREDLOCK_BIN), "endpoint-token", *args]
    if as_nobody:
        argv = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv]
    result = subprocess.run(argv, env=e2e.clean_env(), cwd="/", stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return Run(result)


def assert_error_line(run: Run, rc: int = 1) -> str:
    assert run.rc == rc, run
    assert run.stdout == "", f"something was printed on stdout on error: {run!r}"
    lines = run.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"stderr is not one line: {run.stderr!r}"
    assert lines[0].startswith("credlock: "), run.stderr
    return lines[0]


def listening(pid: int) -> set[int]:
    """The TCP ports this process holds in LISTEN, from the kernel's tables."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------

def free_privileged_port() -> int:
    """A free loopback port below 1024: the endpoint's must be one only root may bind."""
    for port in random.sample(range(700, 1024), 324):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free loopback port below 1024")


class EndpointStack(e2e.Stack):
    """conftest's Stack (IMDS emulator + credlock) with credlock's [containers.endpoint]
    listening on a free loopback port and reading the digests file `tokens`."""

    def __init__(self, moto_url: str, workdir: Path, tokens: Path,
                 endpoint_port: int | None = None):
        super().__init__("optional", moto_url, workdir)
        self.tokens_file = tokens
        self.endpoint = ""
        # A port another process holds already: credlock must still serve IMDS.
        self.endpoint_port = endpoint_port

    def _start_credlock(self) -> None:
        if not (e2e.CREDLOCK_BIN.is_file() and os.access(e2e.CREDLOCK_BIN, os.X_OK)):
            pytest.fail(f"credlock binary missing or not executable: {e2e.CREDLOCK_BIN}")
        self.proxy = f"127.0.0.1:{e2e.free_port()}"
        self.admin = f"127.0.0.1:{e2e.free_port()}"
        self.endpoint = f"127.0.0.1:{self.endpoint_port or free_privileged_port()}"
        config = self.workdir / "credlock.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.proxy}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{self.imds}"\n'
            "\n[discovery.echo]\nenabled = false\n"
            "\n[containers.endpoint]\n"
            f'listen = "{self.endpoint}"\n'
            f'tokens = "{self.tokens_file}"\n')
        env = e2e.clean_env(AWS_ENDPOINT_URL_STS=self.moto_url, HOME=str(self.workdir))
        proc = e2e.Process("credlock-endpoint",
                           [str(e2e.CREDLOCK_BIN), "run", "--config", str(config)],
                           self.workdir / "credlock.log", env=env)
        self.processes.append(proc)

        def ready():
            if not proc.alive():
                pytest.fail(f"credlock exited with {proc.popen.returncode}:\n"
                            f"{proc.log.read_text(errors='replace')[-4000:]}")
            return e2e.http_request(self.admin, "GET", "/readyz", timeout=2).status == 200

        e2e.wait_for(ready, e2e.READY_TIMEOUT, f"credlock /readyz on {self.admin}", proc.log)
        if self.endpoint_port is not None:
            return

        def endpoint_listening():
            with socket.create_connection(e2e.split_addr(self.endpoint), timeout=1):
                return True

        e2e.wait_for(endpoint_listening, e2e.READY_TIMEOUT,
                     f"credlock's container endpoint {self.endpoint}", proc.log)


class Endpoint:
    """What the tests use: the stack, the endpoint, the token files and the digests file."""

    def __init__(self, stack: EndpointStack, workdir: Path):
        self.stack = stack
        self.moto_url = stack.moto_url
        self.workdir = workdir
        self.etc = stack.tokens_file.parent
        self.tokens = stack.tokens_file
        self.token_dir = workdir / "endpoint"
        self.nobody_file = self.token_dir / "nobody.token"

    @property
    def url(self) -> str:
        return f"http://{self.stack.endpoint}/credentials"

    def token(self) -> str:
        """nobody's current token (the file's content, as an SDK would send it)."""
        return self.nobody_file.read_text()

    def get(self, token: str | None, path: str = "/credentials", method: str = "GET"):
        headers = {"Authorization": token} if token is not None else None
        return e2e.http_request(self.stack.endpoint, method, path, headers)

    def wait_status(self, token: str | None, status: int, what: str,
                    timeout: float = RELOAD_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            reply = self.get(token)
            if reply.status == status:
                return reply
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        pytest.fail(f"{what}: no {status} within {timeout} s (last answer {reply!r})\n"
                    f"--- credlock log tail ---\n{self.stack.credlock_log()[-3000:]}")

    def locked(self) -> dict:
        """The set credlock's IMDS listener serves for the role path (IMDSv2)."""
        return self.stack.locked()

    def expected_arn(self) -> str:
        state = self.stack.state()
        return (f"arn:aws:sts::{state['account_id']}:assumed-role/"
                f"{state['role']}/{state['instance_id']}")

    def assert_clean(self, body: bytes, context: str, locked: dict | None = None) -> None:
        """No raw value (the emulator's sets) and, for refusals, no locked value either."""
        self.stack.assert_no_raw(body, context)
        if locked is not None:
            text = body.decode("utf-8", "replace")
            for key in ("AccessKeyId", "SecretAccessKey", "Token"):
                assert locked[key] not in text, f"locked {key} in a refusal {context}"
            assert "AccessKeyId" not in text and "SecretAccessKey" not in text, (context, body)

    def metrics(self) -> dict[str, float]:
        reply = e2e.http_request(self.stack.admin, "GET", "/metrics")
        assert reply.status == 200, reply
        values = dict.fromkeys(RESULTS, 0.0)
        for labels, value in METRIC_LINE.findall(reply.body.decode()):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("result") in values:
                values[fields["result"]] += float(value)
        return values

    def client_env(self, home: Path, **extra: str) -> dict:
        """Only the container provider's two variables, the Region and STS at moto
        (AWS_DEFAULT_REGION too: botocore and the CLI v1 read that one, not AWS_REGION)."""
        home.mkdir(exist_ok=True)
        env = e2e.clean_env(
            AWS_CONTAINER_CREDENTIALS_FULL_URI=self.url,
            AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(self.nobody_file),
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL_STS=self.moto_url,
            AWS_EC2_METADATA_DISABLED="true",
            HOME=str(home),
        )
        env.update(extra)
        return env


def metric_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


@pytest.fixture(scope="module")
def endpoint_stack(moto_url, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("endpoint")
    etc = workdir / "etc"
    etc.mkdir()
    os.chmod(etc, 0o755)
    token_dir = workdir / "endpoint"
    token_dir.mkdir()
    os.chmod(token_dir, 0o755)
    tokens = etc / "endpoint-tokens"
    run = endpoint_token("--user", "nobody", "--file", str(token_dir / "nobody.token"),
                         "--tokens", str(tokens))
    assert run.rc == 0, f"credlock endpoint-token failed before the daemon started: {run!r}"
    stack = EndpointStack(moto_url, workdir, tokens)
    try:
        stack.start()
        yield Endpoint(stack, workdir)
    finally:
        stack.stop()


@pytest.fixture
def ep(endpoint_stack) -> Endpoint:
    """The module's endpoint, with credlock alive, a sane digests file and nobody's current
    token accepted (a previous test may have just replaced it)."""
    stack = endpoint_stack.stack
    assert stack.credlock_alive(), f"credlock died:\n{stack.credlock_log()[-4000:]}"
    tokens = endpoint_stack.tokens
    os.chown(tokens, 0, 0)
    os.chmod(tokens, 0o644)
    os.chmod(tokens.parent, 0o755)
    endpoint_stack.wait_status(endpoint_stack.token(), 200, "nobody's current token")
    return endpoint_stack


@pytest.fixture(scope="module")
def revoked(endpoint_stack) -> dict:
    """A token of OTHER_USER that was accepted, then revoked with --revoke (and refused)."""
    ep = endpoint_stack
    path = ep.token_dir / f"{OTHER_USER}.token"
    run = endpoint_token("--user", OTHER_USER, "--file", str(path), "--tokens", str(ep.tokens))
    assert run.rc == 0, run
    token = path.read_text()
    assert TOKEN_FORMAT.fullmatch(token), repr(token)
    ep.wait_status(token, 200, f"{OTHER_USER}'s new token")
    before = ep.tokens.read_text()
    run = endpoint_token("--user", OTHER_USER, "--revoke", "--file", str(path),
                         "--tokens", str(ep.tokens))
    assert run.rc == 0, run
    ep.wait_status(token, 403, f"{OTHER_USER}'s revoked token")
    return {"token": token, "path": path, "before": before, "run": run}


# --------------------------------------------------------------------------------------------
# 1-4. SDK clients
# --------------------------------------------------------------------------------------------

def check_sdk_set(ep: Endpoint, key: str, secret: str | None, token: str | None,
                  arn: str | None, context: str) -> dict:
    """The SDK's set is the IMDS listener's locked set; moto knows it as the role's session;
    nothing of it is raw."""
    locked = ep.locked()
    seen = {"key": key, "secret": secret, "token": token}
    ep.stack.assert_no_raw(json.dumps(seen).encode(), context)
    assert key == locked["AccessKeyId"], \
        f"{context}: AccessKeyId {key} is not the IMDS listener's {locked['AccessKeyId']}"
    if secret is not None:
        assert (secret, token) == (locked["SecretAccessKey"], locked["Token"]), context
    expected = ep.expected_arn()
    assert identity(ep.moto_url, locked["AccessKeyId"], locked["SecretAccessKey"],
                    locked["Token"])["Arn"] == expected, "premise: moto's view of the IMDS set"
    if arn is not None:
        assert arn == expected, f"{context}: moto says {arn}, expected {expected}"
    return locked


def test_boto3_container_provider(ep, tmp_path):
    before = ep.metrics()
    result = subprocess.run([str(e2e.PYTHON), "-c", BOTO3_SCRIPT],
                            env=ep.client_env(tmp_path / "home"), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"boto3 failed:\n{result.stdout}\n{result.stderr}"
    seen = json.loads(result.stdout)
    assert seen["method"] == "container-role", seen["method"]
    check_sdk_set(ep, seen["key"], seen["secret"], seen["token"], seen["arn"], "boto3")
    assert metric_delta(before, ep.metrics()) == {"served": 1}


def test_aws_cli_v1_get_caller_identity(ep, tmp_path):
    aws = e2e.VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing (awscli is in tests/e2e/requirements.txt)"
    before = ep.metrics()
    result = subprocess.run([str(aws), "sts", "get-caller-identity", "--output", "json"],
                            env=ep.client_env(tmp_path / "home"), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"aws cli failed:\n{result.stdout}\n{result.stderr}"
    ep.stack.assert_no_raw((result.stdout + result.stderr).encode(), "in the CLI's output")
    seen = json.loads(result.stdout)
    assert seen["Arn"] == ep.expected_arn(), seen
    assert seen["Account"] == ACCOUNT, seen
    delta = metric_delta(before, ep.metrics())
    assert set(delta) == {"served"} and delta["served"] >= 1, delta


def js_http_paths() -> list[str]:
    candidates = [JS_DIR]
    if os.environ.get("E2E_NODE_MODULES_DIR"):
        candidates.append(Path(os.environ["E2E_NODE_MODULES_DIR"]))
    return [str(d) for d in candidates
            if (d / "node_modules" / JS_HTTP_PACKAGE / "package.json").exists()]


def test_js_sdk_v3_container_provider(ep, node_project, tmp_path):
    paths = js_http_paths()
    if not paths:
        pytest.fail(f"{JS_HTTP_PACKAGE} is not installed in tests/js (tests/setup.sh runs npm ci "
                    "there) nor in E2E_NODE_MODULES_DIR")
    env = ep.client_env(tmp_path / "home", E2E_JS_HTTP_PATHS=":".join(paths))
    script = tmp_path / "container.mjs"
    script.write_text(JS_SCRIPT)
    before = ep.metrics()
    result = subprocess.run(["node", str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    creds = json.loads(result.stdout)
    assert creds["provider"] == "fromHttp", creds
    arn = identity(ep.moto_url, creds["accessKeyId"], creds["secretAccessKey"],
                   creds["sessionToken"])["Arn"]
    locked = check_sdk_set(ep, creds["accessKeyId"], creds["secretAccessKey"],
                           creds["sessionToken"], arn, f"JS SDK v3 {creds['provider']}")
    assert creds["expiration"] is not None
    assert abs((parse_time(creds["expiration"]) - parse_time(locked["Expiration"]))
               .total_seconds()) < 1.0, (creds["expiration"], locked["Expiration"])
    assert metric_delta(before, ep.metrics()) == {"served": 1}


def test_rust_sdk_default_chain(ep, tmp_path):
    child = e2e.CREDLOCK_BIN.parent / "examples" / "sdk_chain_child"
    assert child.is_file(), f"{child} missing (cargo build --all-targets builds it)"
    before = ep.metrics()
    result = subprocess.run([str(child)], env=ep.client_env(tmp_path / "home"),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"the Rust SDK failed:\n{result.stdout}\n{result.stderr}"
    lines = [l for l in result.stdout.splitlines() if l.startswith("SDK-CHAIN-REPORT ")]
    assert len(lines) == 1, result.stdout
    seen = json.loads(lines[0].removeprefix("SDK-CHAIN-REPORT "))
    assert seen["sts_error"] is None, seen
    locked = check_sdk_set(ep, seen["access_key_id"], None, None, seen["arn"], "Rust SDK")
    assert seen["expiry"] is not None, seen
    assert abs(seen["expiry"] - parse_time(locked["Expiration"]).timestamp()) < 1.0, \
        (seen["expiry"], locked["Expiration"])
    delta = metric_delta(before, ep.metrics())
    assert set(delta) == {"served"} and delta["served"] >= 1, delta


def test_document_is_the_locked_set(ep):
    reply = ep.get(ep.token())
    assert reply.status == 200, reply
    assert (reply.header("Content-Type") or "").startswith("application/json"), reply
    ep.assert_clean(reply.body, "in the endpoint's document")
    doc = reply.json()
    assert set(doc) == DOCUMENT_KEYS, sorted(doc)
    assert EXPIRATION_FORMAT.fullmatch(doc["Expiration"]), doc["Expiration"]
    state = ep.stack.state()
    assert doc["RoleArn"] == f"arn:aws:iam::{state['account_id']}:role/{state['role']}", doc
    locked = ep.locked()
    for key in ("AccessKeyId", "SecretAccessKey", "Token"):
        assert doc[key] == locked[key], f"{key} differs from the IMDS listener's locked set"
    assert parse_time(doc["Expiration"]) == parse_time(locked["Expiration"])
    assert parse_time(doc["Expiration"]) > datetime.datetime.now(datetime.timezone.utc)
    assert identity(ep.moto_url, doc["AccessKeyId"], doc["SecretAccessKey"],
                    doc["Token"])["Arn"] == ep.expected_arn()


def test_control_raw_set_is_not_an_assumed_role_session(ep):
    """Control for the ARN assertions: moto does not know the emulator's raw sets as an
    assumed-role session, so the assumed-role ARN proves a locked set was used."""
    for name, raw in ep.stack.raw_role_sets().items():
        arn = identity(ep.moto_url, raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])["Arn"]
        assert ":assumed-role/" not in arn, (name, arn)


# --------------------------------------------------------------------------------------------
# 5. Refusals
# --------------------------------------------------------------------------------------------

def test_refusals_401_403_and_metrics(ep, revoked):
    locked = ep.locked()
    wrong = secrets.token_hex(32)
    before = ep.metrics()
    cases = [
        (None, "/credentials", "GET", 401),
        (None, "/no-such-path", "GET", 401),
        (None, "/credentials", "POST", 401),
        (wrong, "/credentials", "GET", 403),
        (wrong, "/no-such-path", "GET", 403),
        (wrong, "/credentials", "PUT", 403),
        (revoked["token"], "/credentials", "GET", 403),
    ]
    for token, path, method, status in cases:
        reply = ep.get(token, path, method)
        context = f"{method} {path} with {'no' if token is None else 'a bad'} token"
        assert reply.status == status, f"{context}: {reply!r}"
        assert (reply.header("Content-Type") or "").startswith("text/plain"), (context, reply)
        ep.assert_clean(reply.body, context, locked)
    good = ep.get(ep.token())
    assert good.status == 200, good
    delta = metric_delta(before, ep.metrics())
    assert delta == {"unauthorized": 3, "forbidden": 4, "served": 1}, delta


def test_good_token_other_path_404_other_method_405(ep):
    locked = ep.locked()
    before = ep.metrics()
    other = ep.get(ep.token(), "/latest/meta-data/iam/security-credentials/")
    assert other.status == 404, other
    ep.assert_clean(other.body, "on a 404", locked)
    post = ep.get(ep.token(), "/credentials", "POST")
    assert post.status == 405, post
    ep.assert_clean(post.body, "on a 405", locked)
    delta = metric_delta(before, ep.metrics())
    assert delta == {"refused": 2}, delta


# --------------------------------------------------------------------------------------------
# 6. credlock endpoint-token
# --------------------------------------------------------------------------------------------

def test_token_file_and_digests_file_on_disk(ep):
    token_st = os.lstat(ep.nobody_file)
    assert stat.S_ISREG(token_st.st_mode), "the token file is not a regular file"
    assert stat.S_IMODE(token_st.st_mode) == 0o400, oct(token_st.st_mode)
    assert (token_st.st_uid, token_st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), \
        (token_st.st_uid, token_st.st_gid, grp.getgrgid(NOBODY.pw_gid).gr_name)
    token = ep.token()
    assert TOKEN_FORMAT.fullmatch(token), f"not 64 lowercase hex characters: {token!r}"
    digests_st = os.lstat(ep.tokens)
    assert stat.S_ISREG(digests_st.st_mode)
    assert stat.S_IMODE(digests_st.st_mode) == 0o644, oct(digests_st.st_mode)
    assert digests_st.st_uid == 0, digests_st.st_uid
    assert lines_for(ep.tokens, "nobody") == [sha256_hex(token)], ep.tokens.read_text()


def test_second_run_replaces_the_users_line(ep):
    old = ep.token()
    run = endpoint_token("--user", "nobody", "--file", str(ep.nobody_file),
                         "--tokens", str(ep.tokens))
    assert run.rc == 0, run
    assert run.stdout == f"nobody: {ep.nobody_file}\n", run
    new = ep.token()
    assert TOKEN_FORMAT.fullmatch(new) and new != old, (old, new)
    assert mode(ep.nobody_file) == 0o400
    assert os.lstat(ep.nobody_file).st_uid == NOBODY.pw_uid
    assert lines_for(ep.tokens, "nobody") == [sha256_hex(new)], ep.tokens.read_text()
    assert mode(ep.tokens) == 0o644 and os.lstat(ep.tokens).st_uid == 0
    # Only the file and its lock (0600 root: runs cannot undo each other's changes).
    assert sorted(os.listdir(ep.etc)) == ["endpoint-tokens", "endpoint-tokens.lock"], \
        f"left behind next to the digests file: {os.listdir(ep.etc)}"
    lock = ep.etc / "endpoint-tokens.lock"
    assert mode(lock) == 0o600 and os.lstat(lock).st_uid == 0
    ep.wait_status(new, 200, "the new token after a second run")
    ep.wait_status(old, 403, "the replaced token")


@pytest.mark.parametrize("kind", ["to-a-file", "dangling"])
def test_symlink_at_file_is_refused(ep, tmp_path, kind):
    victim = tmp_path / "victim"
    if kind == "to-a-file":
        victim.write_text("precious\n")
        os.chmod(victim, 0o644)
    link = ep.token_dir / f"{THIRD_USER}-{kind}.token"
    if link.is_symlink():
        link.unlink()
    os.symlink(victim, link)
    digests_before = ep.tokens.read_bytes()
    try:
        run = endpoint_token("--user", THIRD_USER, "--file", str(link), "--tokens",
                             str(ep.tokens))
        assert_error_line(run, rc=1)
        assert link.is_symlink() and os.readlink(link) == str(victim), \
            "the symlink at --file was replaced or removed"
        if kind == "to-a-file":
            st = os.lstat(victim)
            assert victim.read_text() == "precious\n", "the symlink's target was written"
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o644, 0), \
                "the symlink's target changed mode or owner"
        else:
            assert not os.path.lexists(victim), "a file was created through a dangling symlink"
        assert ep.tokens.read_bytes() == digests_before, \
            "a refused run changed the digests file"
    finally:
        link.unlink()


def test_revoke_removes_the_line_and_the_file(ep, revoked):
    assert revoked["run"].rc == 0
    assert lines_for(revoked["before"], OTHER_USER) == [sha256_hex(revoked["token"])], \
        "premise: the user had one line, for the revoked token"
    assert lines_for(ep.tokens, OTHER_USER) == [], ep.tokens.read_text()
    assert not os.path.lexists(revoked["path"]), "--revoke left the token file"
    assert lines_for(ep.tokens, "nobody") == [sha256_hex(ep.token())], \
        "--revoke of another user touched nobody's line"
    assert mode(ep.tokens) == 0o644 and os.lstat(ep.tokens).st_uid == 0
    assert ep.get(revoked["token"]).status == 403
    assert ep.get(ep.token()).status == 200


def test_not_root_is_refused(ep):
    scratch = Path(tempfile.mkdtemp(prefix="credlock-e2e-notroot-"))
    try:
        os.chmod(scratch, 0o755)
        os.chown(scratch, NOBODY.pw_uid, NOBODY.pw_gid)  # nobody could write there
        run = endpoint_token("--user", "nobody", "--file", str(scratch / "nobody.token"),
                             "--tokens", str(scratch / "endpoint-tokens"), as_nobody=True)
        assert_error_line(run, rc=1)
        assert os.listdir(scratch) == [], f"a non-root run wrote: {os.listdir(scratch)}"
    finally:
        shutil.rmtree(scratch)


def test_usage_without_user_exit_2(ep):
    run = endpoint_token("--tokens", str(ep.tokens))
    assert run.rc == 2, run
    assert lines_for(ep.tokens, "nobody") == [sha256_hex(ep.token())]


# --------------------------------------------------------------------------------------------
# 7. Fail closed on an unsafe digests file
# --------------------------------------------------------------------------------------------

def _others_can_write(ep):
    os.chmod(ep.tokens, 0o646)


def _owned_by_nobody(ep):
    os.chown(ep.tokens, NOBODY.pw_uid, -1)


def _directory_others_can_write(ep):
    os.chmod(ep.etc, 0o757)


@pytest.mark.parametrize("make_unsafe", [_others_can_write, _owned_by_nobody,
                                         _directory_others_can_write],
                         ids=lambda f: f.__name__.strip("_"))
def test_unsafe_digests_file_fails_closed(ep, make_unsafe):
    token = ep.token()
    locked = ep.locked()
    log_before = len(ep.stack.credlock_log())
    try:
        make_unsafe(ep)
        refused = ep.wait_status(token, 403, f"a good token with the digests file {make_unsafe}")
        ep.assert_clean(refused.body, "while the digests file is unsafe", locked)
        new_log = ep.stack.credlock_log()[log_before:]
        assert " ERROR " in new_log, f"no error logged for the unsafe digests file:\n{new_log}"
        # Still refused a moment later (not a one-off).
        assert ep.get(token).status == 403
    finally:
        os.chown(ep.tokens, 0, 0)
        os.chmod(ep.tokens, 0o644)
        os.chmod(ep.etc, 0o755)
    ep.wait_status(token, 200, "the good token once the digests file is safe again")


# --------------------------------------------------------------------------------------------
# 8. Off by default; loopback only
# --------------------------------------------------------------------------------------------

def test_off_by_default(stack, endpoint_stack):
    """conftest's credlock has no [containers.endpoint]: it listens on its IMDS and admin
    addresses only. Control: this module's credlock also holds the endpoint's port."""
    plain = listening(stack.processes[-1].pid)
    assert plain == {e2e.split_addr(stack.proxy)[1], e2e.split_addr(stack.admin)[1]}, plain
    with_endpoint = listening(endpoint_stack.stack.processes[-1].pid)
    assert e2e.split_addr(endpoint_stack.stack.endpoint)[1] in with_endpoint, with_endpoint


@pytest.mark.parametrize("listen,privileged,rc",
                         [("0.0.0.0", True, 78), ("127.0.0.1", False, 78), ("127.0.0.1", True, 0)],
                         ids=["unspecified-78", "unprivileged-port-78", "control-loopback-0"])
def test_check_config_requires_loopback_and_a_privileged_port(endpoint_stack, tmp_path, listen,
                                                              privileged, rc):
    ep = endpoint_stack
    port = free_privileged_port() if privileged else e2e.free_port()
    config = tmp_path / "credlock.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["127.0.0.1:{e2e.free_port()}"]\n'
        f'admin_listen = "127.0.0.1:{e2e.free_port()}"\n'
        'upstream = "http://127.0.0.1:9"\n'
        "\n[discovery.echo]\nenabled = false\n"
        "\n[containers.endpoint]\n"
        f'listen = "{listen}:{port}"\n'
        f'tokens = "{ep.tokens}"\n')
    result = subprocess.run([str(e2e.CREDLOCK_BIN), "check-config", "--config", str(config)],
                            env=e2e.clean_env(HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == rc, (result.returncode, result.stdout, result.stderr)


def test_no_user_can_listen_on_the_endpoint_port_first(endpoint_stack):
    """The port is below net.ipv4.ip_unprivileged_port_start: the kernel refuses it to nobody,
    so no user can stand in for the endpoint and collect the tokens SDKs send."""
    port = free_privileged_port()
    result = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         str(e2e.PYTHON), "-c",
         f"import socket\ns = socket.socket()\ns.bind(('127.0.0.1', {port}))\n"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode != 0 and "PermissionError" in result.stderr, result
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert port < start, (port, start)


def test_an_endpoint_port_held_elsewhere_does_not_take_imds_down(moto_url, endpoint_stack,
                                                                  tmp_path):
    """The endpoint's port held by another (root) process, e.g. credlock.socket left out of a
    restart: credlock starts, says so in its log, holds nothing there, and its IMDS listener
    serves the locked set (the stack waits for /readyz, whose probe fetches the role's
    credentials through that listener and compares them with the held set)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", free_privileged_port()))
    holder.listen(8)
    port = holder.getsockname()[1]
    try:
        stack = EndpointStack(moto_url, tmp_path, endpoint_stack.tokens, endpoint_port=port)
        try:
            stack.start()
            proc = stack.processes[-1]
            assert proc.alive()
            log = proc.log.read_text(errors="replace")
            assert "container-credentials endpoint is unavailable" in log, log[-2000:]
            assert port not in listening(proc.pid)
            ready = e2e.http_request(stack.admin, "GET", "/readyz", timeout=5)
            assert ready.status == 200, ready
        finally:
            stack.stop()
    finally:
        holder.close()


def test_a_token_under_a_directory_a_user_controls_is_refused(ep, tmp_path):
    """The reviewer's attack: the token's user owns a directory on --file's path and swaps a
    component for a symlink while root writes. Refused before anything is written: every
    directory from / down must be root's and writable by root only (or a root sticky one)."""
    home = tmp_path / "home-of-nobody"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    target = tmp_path / "root-only"
    target.mkdir(mode=0o755)
    victim = target / "app.token"
    victim.write_text("root's file\n")
    os.symlink(target, home / ".aws")  # nobody's symlink, in nobody's directory
    for file in (home / "x.token", home / ".aws" / "app.token"):
        run = endpoint_token("--user", "nobody", "--file", str(file), "--tokens", str(ep.tokens))
        line = assert_error_line(run)
        assert "home-of-nobody" in line and "owned by uid" in line, line
    assert victim.read_text() == "root's file\n" and os.lstat(victim).st_uid == 0
    assert sorted(os.listdir(home)) == [".aws"]
    # The digests file's directory too.
    run = endpoint_token("--user", "nobody", "--file", str(ep.nobody_file),
                         "--tokens", str(home / "endpoint-tokens"))
    assert "owned by uid" in assert_error_line(run)
