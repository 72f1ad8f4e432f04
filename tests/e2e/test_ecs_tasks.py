"""credlock's ECS task-credential proxy ([containers.ecs]), end to end.

    .venv/bin/python -m pytest -q tests/e2e/test_ecs_tasks.py

One stack per module: the ECS agent stand-in (tests/support/ecs_agent_emulator.py), the IMDS
emulator and moto (credlock's own instance lock needs them, as in the rest of tests/e2e), a
recording STS front in this process between credlock and moto (tests/support/recording_sts.py),
and one credlock whose [containers.ecs] listener points at the agent stand-in. Clients reach
task credentials the way a container does, with
AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/v2/credentials/ID.

What is tested:
  * boto3 (container provider), the AWS CLI and the JS SDK v3 (fromContainerMetadata) get a
    locked set, and moto knows it as arn:aws:sts::ACCOUNT:assumed-role/ROLE/credlock-ecs-ID;
  * the locked document keeps the agent's RoleArn and key order, Expiration is
    YYYY-MM-DDTHH:MM:SSZ and never later than the STS set's own expiration;
  * no raw value (the stand-in's markers or any exact raw value it ever served) appears in the
    bytes of any answer, credential or error;
  * tasks are isolated (each id gets the set STS issued for its own raw credentials, also under
    concurrent requests); repeated requests are cached (one AssumeRole); a rotated raw set is
    locked again with the NEW raw credentials; session names follow the credential id;
  * the agent's own answers (400, 503, 404, 301, 429) pass unchanged, byte for byte, and
    requests reach the agent with their method, target and end-to-end headers;
  * fail closed: an STS refusal, or a 200 document that cannot be locked, gives 502/503 with a
    short text/plain body and no credential, counted in
    credlock_task_credentials_total{agent="ecs",result=...};
  * the IMDS side keeps locking and /readyz stays 200.

Ground truth is never credlock's code: the agent stand-in's GET /state (raw sets) and
GET /requests (what reached it), and the STS front's log of every AssumeRole: which role and
session name, signed with which access key and session token, and which key STS issued. moto
alone cannot say which credentials signed a call (it does not verify signatures); the front can.
Role names starting with "deny-" are refused by the front with STS's AccessDenied (403).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.util
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import botocore.session
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUPPORT = REPO / "tests" / "support"


def _load(name: str, path: Path):
    """tests/e2e/conftest.py's helpers as a module of their own name (pytest loads that file as
    a plugin named "conftest", which another folder's conftest may shadow in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _load("credlock_e2e_helpers", HERE / "conftest.py")
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))  # the stand-ins' shared modules, as adv_upstream.py does
import ecs_agent_control  # noqa: E402  (the agent stand-in's control API)
import recording_sts  # noqa: E402  (the recording STS front)
import standin  # noqa: E402  (the stand-ins' shared constants)

AGENT_SCRIPT = SUPPORT / "ecs_agent_emulator.py"
ACCOUNT = "123456789012"  # the agent stand-in's account (and moto's default)
RAW_MARKERS = tuple(standin.RAW_MARKERS) + ("ASIARAWE",)  # ecs_agent_emulator: raw key prefix
# The agent's document, in the order the agent marshals it (amazon-ecs-agent credentials/
# manager.go IAMRoleCredentials json tags; ecs_agent_emulator.DOCUMENT_KEYS).
DOCUMENT_KEYS = ["RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"]
EXPIRATION_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# STS RoleSessionName: 2-64 characters of [\w+=,.@-] (STS API Reference, AssumeRole).
SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
SESSION_PREFIX = "credlock-ecs-"
DENY_PREFIX = "deny-"  # role names the STS front refuses
ASSUME_RATE = 20
CLIENT_TIMEOUT = 60
JS_DIR = REPO / "tests" / "js"
JS_CONTAINER_SCRIPT = """
import { fromContainerMetadata } from "@smithy/credential-provider-imds";
try {
  const c = await fromContainerMetadata({ timeout: 5000, maxRetries: 0 })();
  process.stdout.write(JSON.stringify({
    accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey,
    sessionToken: c.sessionToken,
    expiration: c.expiration ? c.expiration.toISOString() : null,
  }) + "\\n");
} catch (error) {
  process.stderr.write(`fromContainerMetadata: ${error?.name}: ${error?.message}` +
    (error?.statusCode ? ` (HTTP ${error.statusCode})` : "") + "\\n");
  process.exit(1);
}
"""


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------

def start_agent(workdir: Path) -> tuple:
    """The ECS agent stand-in: (process, agent address, control address)."""
    argv = [str(e2e.PYTHON), str(AGENT_SCRIPT), "--listen", "127.0.0.1:0",
            "--control", "127.0.0.1:0"]
    proc = e2e.Process("ecs-agent", argv, workdir / "ecs-agent.log", env=e2e.clean_env(),
                       stdout_pipe=True)
    addresses: dict[str, str] = {}
    deadline = time.monotonic() + e2e.READY_TIMEOUT
    os.set_blocking(proc.popen.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline and len(addresses) < 2:
        if not proc.alive():
            proc.stop()
            pytest.fail(f"ECS agent stand-in exited: {proc.log.read_text(errors='replace')}")
        try:
            chunk = proc.popen.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            buffer += chunk
            for line in buffer.decode().splitlines():
                kind, _, addr = line.partition(" ")
                if kind in ("listening", "control"):
                    addresses.setdefault(kind, addr)
        else:
            time.sleep(0.05)
    if len(addresses) < 2:
        proc.stop()
        pytest.fail(f"ECS agent stand-in did not print its addresses: {buffer!r}")
    return proc, addresses["listening"], addresses["control"]


class EcsStack(e2e.Stack):
    """conftest's Stack (IMDS emulator + credlock) with credlock's [containers.ecs] listener
    pointed at the agent stand-in and its STS endpoint at the recording front."""

    def __init__(self, moto_url: str, sts_url: str, agent: str, workdir: Path):
        super().__init__("optional", moto_url, workdir)
        self.sts_url = sts_url
        self.agent = agent
        self.ecs = ""  # credlock's ECS listener

    def _start_credlock(self) -> None:
        if not (e2e.CREDLOCK_BIN.is_file() and os.access(e2e.CREDLOCK_BIN, os.X_OK)):
            pytest.fail(f"credlock binary missing or not executable: {e2e.CREDLOCK_BIN}")
        self.proxy = f"127.0.0.1:{e2e.free_port()}"
        self.admin = f"127.0.0.1:{e2e.free_port()}"
        self.ecs = f"127.0.0.1:{e2e.free_port()}"
        config = self.workdir / "credlock.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.proxy}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{self.imds}"\n'
            "\n[discovery.echo]\nenabled = false\n"
            "\n[containers.ecs]\n"
            f'listen = ["{self.ecs}"]\n'
            f'agent = "{self.agent}"\n'
            f"assume_rate = {ASSUME_RATE}\n")
        env = e2e.clean_env(AWS_ENDPOINT_URL_STS=self.sts_url, HOME=str(self.workdir))
        proc = e2e.Process("credlock-ecs", [str(e2e.CREDLOCK_BIN), "run", "--config", str(config)],
                           self.workdir / "credlock.log", env=env)
        self.processes.append(proc)

        def ready():
            if not proc.alive():
                pytest.fail(f"credlock exited with {proc.popen.returncode}:\n"
                            f"{proc.log.read_text(errors='replace')[-4000:]}")
            return e2e.http_request(self.admin, "GET", "/readyz", timeout=2).status == 200

        e2e.wait_for(ready, e2e.READY_TIMEOUT, f"credlock /readyz on {self.admin}", proc.log)

        def ecs_listening():
            with socket.create_connection(e2e.split_addr(self.ecs), timeout=1):
                return True

        e2e.wait_for(ecs_listening, e2e.READY_TIMEOUT, f"credlock's ECS listener {self.ecs}",
                     proc.log)


class Ecs(ecs_agent_control.AgentControl):
    """What the tests use: credlock's ECS listener, the agent stand-in (its control API and
    ground truth: new_task, rotate, state, raw, raw_seen, agent_requests), the STS front's log,
    credlock's metrics and moto."""

    def __init__(self, stack: EcsStack, sts: recording_sts.RecordingSts, agent: str,
                 control: str, moto_url: str):
        super().__init__(control, ACCOUNT)
        self.stack = stack
        self.sts = sts
        self.agent = agent
        self.moto_url = moto_url
        self.proxy = stack.ecs
        self.admin = stack.admin

    # ---- requests ----

    def via(self, target: str, **kw) -> tuple[bytes, e2e.Reply]:
        return wire(self.proxy, target, **kw)

    def direct(self, target: str, **kw) -> tuple[bytes, e2e.Reply]:
        return wire(self.agent, target, **kw)

    def uri(self, cred_id: str) -> str:
        return f"http://{self.proxy}/v2/credentials/{cred_id}"

    def locked(self, cred_id: str) -> dict:
        """The document credlock serves for this id (must be 200 and clean)."""
        data, reply = self.via(f"/v2/credentials/{cred_id}")
        assert reply.status == 200, reply
        self.assert_clean(data, f"on /v2/credentials/{cred_id}")
        return reply.json()

    # ---- ground truth checks ----

    def assert_clean(self, data: bytes, context: str = "") -> None:
        """No raw marker and no raw value the agent ever served, anywhere in these bytes."""
        self.state()  # pick up the current raw values
        text = data.decode("latin-1")
        for marker in RAW_MARKERS:
            assert marker not in text, f"raw marker {marker!r} reached the client {context}"
        for value in self.raw_seen:
            assert value not in text, f"RAW task credential leaked {context}: {value[:24]}..."

    def assert_locked_for(self, task_id: str, access_key: str, secret: str, token: str) -> dict:
        """This set is one STS issued for task_id's own raw credentials under session
        credlock-ecs-<id>, and no part of it is raw. Returns that AssumeRole call."""
        raw = self.raw(task_id)
        assert not access_key.startswith(RAW_MARKERS), f"raw AccessKeyId served: {access_key}"
        for value in (access_key, secret, token):
            assert value not in self.raw_seen, "a raw task credential value was served"
            for marker in RAW_MARKERS:
                assert marker not in value, f"raw marker {marker!r} in the served set"
        calls = self.sts.assumes(session=SESSION_PREFIX + task_id)
        assert calls, f"no AssumeRole with session {SESSION_PREFIX}{task_id} reached STS"
        issued = [c for c in calls if c["issued_key"] == access_key]
        assert issued, (f"the served AccessKeyId was not issued by an AssumeRole for this task: "
                        f"{access_key} not in {[c['issued_key'] for c in calls]}")
        call = issued[-1]
        assert call["role_arn"] == raw["RoleArn"], call
        assert call["signer"] == raw["AccessKeyId"], \
            "the task's AssumeRole was not signed with the task's own raw AccessKeyId"
        assert call["token"] == raw["Token"], \
            "the task's AssumeRole did not carry the task's own raw session token"
        return call

    def identity(self, access_key: str, secret: str, token: str) -> dict:
        sts = boto3.client("sts", endpoint_url=self.moto_url, region_name="us-east-1",
                           aws_access_key_id=access_key, aws_secret_access_key=secret,
                           aws_session_token=token)
        return sts.get_caller_identity()

    def metrics(self) -> dict[str, float]:
        """credlock_task_credentials_total{agent="ecs",result=...} by result (0 when absent)."""
        reply = e2e.http_request(self.admin, "GET", "/metrics")
        assert reply.status == 200, reply
        values = dict.fromkeys(("locked", "cached", "passed", "refused", "failed"), 0.0)
        for labels, value in METRIC_LINE.findall(reply.body.decode()):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("agent") == "ecs" and fields.get("result") in values:
                values[fields["result"]] = float(value)
        return values


METRIC_LINE = re.compile(r"^credlock_task_credentials_total\{([^}]*)\}\s+(\S+)\s*$", re.M)


def assumed_arn(role_arn: str, session: str) -> str:
    """arn:aws:sts::ACCOUNT:assumed-role/ROLE-NAME/SESSION-NAME (IAM User Guide, IAM ARNs)."""
    account = role_arn.split(":")[4]
    return f"arn:aws:sts::{account}:assumed-role/{role_arn.rsplit('/', 1)[-1]}/{session}"


def metric_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------
# Raw HTTP (the bytes exactly as credlock sends them)
# --------------------------------------------------------------------------------------------

def _message_complete(data: bytes, head_only: bool) -> bool:
    if b"\r\n\r\n" not in data:
        return False
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    if head_only or status in (204, 304) or 100 <= status < 200:
        return True
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        return rest.endswith(b"0\r\n\r\n")
    if b"content-length" in fields:
        return len(rest) >= int(fields[b"content-length"])
    return False  # delimited by close


def _parse(data: bytes, head_only: bool) -> e2e.Reply:
    if b"\r\n\r\n" not in data:
        return e2e.Reply(0, [], data)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    reply = e2e.Reply(int(status), headers, b"" if head_only else rest, version)
    if "chunked" in (reply.header("Transfer-Encoding") or "").lower():
        body, rest = b"", reply.body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
        reply.body = body
    elif reply.header("Content-Length") is not None and not head_only:
        reply.body = rest[:int(reply.header("Content-Length"))]
    return reply


def wire(addr: str, target: str, method: str = "GET", headers: dict | None = None,
         timeout: float = e2e.HTTP_TIMEOUT) -> tuple[bytes, e2e.Reply]:
    """One request with the target exactly as given; (every byte of the answer, parsed)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {addr}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if not any(name.lower() == "connection" for name in (headers or {})):
        lines.append("Connection: close")
    data = b""
    with socket.create_connection(e2e.split_addr(addr), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            if _message_complete(data, method == "HEAD"):
                break
    return data, _parse(data, method == "HEAD")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ecs_stack(moto_url, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ecs")
    sts = recording_sts.RecordingSts(moto_url, deny_prefix=DENY_PREFIX,
                                     session_prefix=SESSION_PREFIX)
    agent_proc = stack = None
    try:
        agent_proc, agent, control = start_agent(workdir)
        stack = EcsStack(moto_url, sts.url, agent, workdir)
        stack.start()
        yield Ecs(stack, sts, agent, control, moto_url)
    finally:
        if stack is not None:
            stack.stop()
        if agent_proc is not None:
            agent_proc.stop()
        sts.stop()


@pytest.fixture
def ecs(ecs_stack) -> Ecs:
    assert ecs_stack.stack.credlock_alive(), \
        f"credlock died:\n{ecs_stack.stack.credlock_log()[-4000:]}"
    return ecs_stack


def container_env(ecs: Ecs, cred_id: str, home: Path) -> dict:
    """A client whose only credential source is the container endpoint at credlock."""
    return e2e.clean_env(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=ecs.uri(cred_id),
        AWS_ENDPOINT_URL_STS=ecs.moto_url,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        HOME=str(home),
    )


# --------------------------------------------------------------------------------------------
# SDK clients
# --------------------------------------------------------------------------------------------

def test_boto3_container_provider_gets_a_locked_task_set(ecs, monkeypatch, tmp_path):
    task = ecs.new_task("e2e-boto3-role")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name, raising=False)
    for name, value in container_env(ecs, task["id"], tmp_path).items():
        if name.startswith("AWS_") or name == "HOME":
            monkeypatch.setenv(name, value)
    core = botocore.session.Session()
    resolver = core.get_component("credential_provider")
    resolver.providers = [resolver.get_provider("container-role")]
    session = boto3.Session(botocore_session=core, region_name="us-east-1")

    credentials = session.get_credentials()
    assert credentials is not None, "botocore found no credentials at credlock's ECS listener"
    assert credentials.method == "container-role"
    frozen = credentials.get_frozen_credentials()
    assert not frozen.access_key.startswith("ASIARAWE"), "boto3 got the raw AccessKeyId"
    ecs.assert_locked_for(task["id"], frozen.access_key, frozen.secret_key, frozen.token)

    identity = session.client("sts", endpoint_url=ecs.moto_url).get_caller_identity()
    assert identity["Arn"] == assumed_arn(task["document"]["RoleArn"],
                                          SESSION_PREFIX + task["id"]), identity
    assert identity["Account"] == ACCOUNT


def test_aws_cli_get_caller_identity_through_the_task_endpoint(ecs, tmp_path):
    aws = e2e.VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing (awscli is in tests/e2e/requirements.txt)"
    task = ecs.new_task("e2e-cli-role")
    result = subprocess.run(
        [str(aws), "sts", "get-caller-identity", "--endpoint-url", ecs.moto_url,
         "--output", "json"],
        env=container_env(ecs, task["id"], tmp_path), capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"aws cli failed:\n{result.stdout}\n{result.stderr}"
    identity = json.loads(result.stdout)
    assert identity["Arn"] == assumed_arn(task["document"]["RoleArn"],
                                          SESSION_PREFIX + task["id"]), identity
    # That session exists only as an AssumeRole signed with this task's raw credentials.
    calls = ecs.sts.assumes(session=SESSION_PREFIX + task["id"])
    assert calls and all(c["signer"] == task["document"]["AccessKeyId"] for c in calls), calls
    # And the CLI's request reached the agent through credlock.
    assert any(r["path"] == f"/v2/credentials/{task['id']}" for r in ecs.agent_requests())


def test_js_sdk_v3_from_container_metadata(ecs, node_project, tmp_path):
    task = ecs.new_task("e2e-js-role")
    result = subprocess.run(["node", "--input-type=module", "-e", JS_CONTAINER_SCRIPT],
                            cwd=JS_DIR, env=container_env(ecs, task["id"], tmp_path),
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    creds = json.loads(result.stdout)
    ecs.assert_locked_for(task["id"], creds["accessKeyId"], creds["secretAccessKey"],
                          creds["sessionToken"])
    identity = ecs.identity(creds["accessKeyId"], creds["secretAccessKey"], creds["sessionToken"])
    assert identity["Arn"] == assumed_arn(task["document"]["RoleArn"],
                                          SESSION_PREFIX + task["id"]), identity


def test_control_raw_task_credentials_are_not_an_assumed_role_session(ecs):
    """Control for the ARN assertions: moto does not know the raw task credentials as an
    assumed-role session, so an assumed-role ARN proves a locked set was used."""
    raw = ecs.new_task("e2e-control-role")["document"]
    identity = ecs.identity(raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])
    assert ":assumed-role/" not in identity["Arn"], identity


# --------------------------------------------------------------------------------------------
# The locked document
# --------------------------------------------------------------------------------------------

def test_locked_document_keeps_role_arn_and_key_order(ecs):
    task = ecs.new_task("e2e-shape-role")
    data, reply = ecs.via(f"/v2/credentials/{task['id']}")
    assert reply.status == 200, reply
    ecs.assert_clean(data, "on a locked task document")
    pairs = json.loads(reply.body, object_pairs_hook=list)
    assert [key for key, _ in pairs] == DOCUMENT_KEYS, pairs
    doc = dict(pairs)
    assert doc["RoleArn"] == task["document"]["RoleArn"]
    assert EXPIRATION_FORMAT.fullmatch(doc["Expiration"]), doc["Expiration"]
    call = ecs.assert_locked_for(task["id"], doc["AccessKeyId"], doc["SecretAccessKey"],
                                 doc["Token"])
    # The served Expiration never outlives the STS set (second precision) and is in the future.
    served = parse_time(doc["Expiration"])
    issued = parse_time(call["issued"]["Expiration"])
    assert served <= issued.replace(microsecond=0) + datetime.timedelta(seconds=1), (served, issued)
    assert served > datetime.datetime.now(datetime.timezone.utc), served
    assert call["policy"], "the task's AssumeRole carried no session policy"
    identity = ecs.identity(doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])
    assert identity["Arn"] == assumed_arn(doc["RoleArn"], SESSION_PREFIX + task["id"])


def test_no_raw_value_in_any_answer(ecs):
    task = ecs.new_task("e2e-leak-role")
    pending = f"pending-{uuid.uuid4()}"
    ecs.control("POST", "/pending", {"id": pending})
    unknown = str(uuid.uuid4())
    targets = {
        f"/v2/credentials/{task['id']}": 200,
        f"/v1/credentials?id={task['id']}": 200,
        f"/v2/credentials/{unknown}": 400,
        f"/v1/credentials?id={unknown}": 400,
        "/v2/credentials/": 400,
        "/v1/credentials": 400,
        f"/v2/credentials/{pending}": 503,
        "/v3/no-such-thing": 404,
        "/": 404,
        f"/v2//credentials/{task['id']}": 301,
    }
    for target, status in targets.items():
        data, reply = ecs.via(target)
        assert reply.status == status, (target, reply)
        ecs.assert_clean(data, f"on {target} ({reply.status})")
        if status != 200:
            assert b"SecretAccessKey" not in data and b"AccessKeyId" not in data, (target, data)
    # HEAD of a credential path: no body, and nothing raw in the head either.
    data, reply = ecs.via(f"/v2/credentials/{task['id']}", method="HEAD")
    ecs.assert_clean(data, "on HEAD")


# --------------------------------------------------------------------------------------------
# Isolation, caching, rotation, session names
# --------------------------------------------------------------------------------------------

def test_tasks_are_isolated(ecs):
    tasks = {"A": ecs.new_task("e2e-shared-role"), "B": ecs.new_task("e2e-shared-role"),
             "C": ecs.new_task("e2e-other-role")}
    first = {}
    for name, task in tasks.items():
        doc = ecs.locked(task["id"])
        ecs.assert_locked_for(task["id"], doc["AccessKeyId"], doc["SecretAccessKey"],
                              doc["Token"])
        first[name] = doc
    keys = [doc["AccessKeyId"] for doc in first.values()]
    assert len(set(keys)) == 3, f"two tasks got the same locked set: {keys}"

    # Interleaved concurrent requests: each id only ever yields a set issued for its own task.
    order = [name for name in tasks for _ in range(8)]
    random.Random(7).shuffle(order)

    def fetch(name):
        data, reply = ecs.via(f"/v2/credentials/{tasks[name]['id']}")
        return name, data, reply

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(fetch, order))
    for name, data, reply in answers:
        assert reply.status == 200, (name, reply)
        ecs.assert_clean(data, f"for task {name}")
        doc = reply.json()
        own = {c["issued_key"] for c in
               ecs.sts.assumes(session=SESSION_PREFIX + tasks[name]["id"])}
        assert doc["AccessKeyId"] in own, f"task {name} was served another task's set"
        assert doc["RoleArn"] == tasks[name]["document"]["RoleArn"]

    for name, doc in first.items():
        identity = ecs.identity(doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])
        assert identity["Arn"] == assumed_arn(tasks[name]["document"]["RoleArn"],
                                              SESSION_PREFIX + tasks[name]["id"]), (name, identity)


def test_repeated_requests_are_served_from_the_cache(ecs):
    task = ecs.new_task("e2e-cache-role")
    session = SESSION_PREFIX + task["id"]
    before = ecs.metrics()
    one = ecs.locked(task["id"])
    two = ecs.locked(task["id"])
    assert two == one, "a second request for the same task got another set"
    calls = ecs.sts.assumes(session=session)
    assert len(calls) == 1, f"{len(calls)} AssumeRole calls for one task's repeated requests"
    ecs.assert_locked_for(task["id"], one["AccessKeyId"], one["SecretAccessKey"], one["Token"])
    assert metric_delta(before, ecs.metrics()) == {"locked": 1, "cached": 1}

    # The older relative URI form for the same raw credential is the same cached set.
    data, reply = ecs.via(f"/v1/credentials?id={task['id']}")
    assert reply.status == 200, reply
    ecs.assert_clean(data, "on /v1/credentials")
    assert reply.json()["AccessKeyId"] == one["AccessKeyId"]
    assert len(ecs.sts.assumes(signers=[task["document"]["AccessKeyId"]])) == 1


def test_rotation_locks_again_with_the_new_raw_credentials(ecs):
    task = ecs.new_task("e2e-rotate-role")
    old = ecs.locked(task["id"])
    rotated = ecs.rotate(task["id"])["document"]
    assert rotated["AccessKeyId"] != task["document"]["AccessKeyId"]
    data, reply = ecs.via(f"/v2/credentials/{task['id']}")
    assert reply.status == 200, reply
    ecs.assert_clean(data, "after rotation")  # neither the old nor the new raw set
    new = reply.json()
    call = ecs.assert_locked_for(task["id"], new["AccessKeyId"], new["SecretAccessKey"],
                                 new["Token"])
    assert call["signer"] == rotated["AccessKeyId"]  # (assert_locked_for: the current raw set)
    assert len(ecs.sts.assumes(signers=[task["document"]["AccessKeyId"]])) == 1
    identity = ecs.identity(new["AccessKeyId"], new["SecretAccessKey"], new["Token"])
    assert identity["Arn"] == assumed_arn(new["RoleArn"], SESSION_PREFIX + task["id"])
    assert old["RoleArn"] == new["RoleArn"]


def locked_session_name(ecs, cred_id: str) -> str:
    """Define task credentials with this id, fetch them through credlock and return the session
    name of the one AssumeRole made with them (checking the served set is the one it issued)."""
    task = ecs.new_task("e2e-names-role", cred_id=cred_id)
    data, reply = ecs.via(f"/v2/credentials/{cred_id}")
    assert reply.status == 200, (cred_id, reply)
    ecs.assert_clean(data, f"for id {cred_id!r}")
    doc = reply.json()
    calls = ecs.sts.assumes(signers=[task["document"]["AccessKeyId"]])
    assert len(calls) == 1, (cred_id, calls)
    assert calls[0]["issued_key"] == doc["AccessKeyId"]
    session = calls[0]["session"]
    assert SESSION_NAME.fullmatch(session), f"not a valid RoleSessionName: {session!r}"
    assert session.startswith(SESSION_PREFIX), session
    identity = ecs.identity(doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])
    assert identity["Arn"] == assumed_arn(doc["RoleArn"], session)
    return session


ID_CHARACTERS = "task_+=,.@-" + "0123456789abcdefABCDEF" * 3  # [A-Za-z0-9_+=,.@-]


def test_session_names_follow_the_credential_id(ecs):
    """An id that fits a session name is used as is (48 characters of the allowed set); one
    with another character, or one that cannot fit in STS's 64 characters, is replaced (by a
    digest) and still gives a valid RoleSessionName; different ids, different names."""
    exact = ID_CHARACTERS[:48]
    assert locked_session_name(ecs, exact) == SESSION_PREFIX + exact
    odd = f"task:{uuid.uuid4().hex[:8]}"
    too_long = ID_CHARACTERS[:60]  # credlock-ecs- + 60 > 64
    hashed = {cred_id: locked_session_name(ecs, cred_id) for cred_id in (odd, too_long)}
    for cred_id, session in hashed.items():
        assert session != SESSION_PREFIX + cred_id, hashed
    assert hashed[odd] != hashed[too_long]


def test_session_name_uses_the_id_up_to_stss_64_characters(ecs):
    """STS allows RoleSessionName of 2-64 characters of [\\w+=,.@-] ("AssumeRole", AWS STS API
    Reference): after the 13-character prefix "credlock-ecs-", an id of 51 allowed characters
    is used as is (64 in all) and one of 52 is replaced by a digest."""
    fits = ID_CHARACTERS[:51]
    assert locked_session_name(ecs, fits) == SESSION_PREFIX + fits
    over = ID_CHARACTERS[:51] + "y"
    session = locked_session_name(ecs, over)
    assert session != SESSION_PREFIX + over, \
        f"a 52-character id was used as the session name: {session!r}"


# --------------------------------------------------------------------------------------------
# The agent's own answers
# --------------------------------------------------------------------------------------------

def _unknown(ecs):
    return f"/v2/credentials/{uuid.uuid4()}", 400, "InvalidIdInRequest"


def _unknown_v1(ecs):
    return f"/v1/credentials?id={uuid.uuid4()}", 400, "InvalidIdInRequest"


def _no_id(ecs):
    return "/v2/credentials/", 400, "NoIdInRequest"


def _no_id_v1(ecs):
    return "/v1/credentials?id=", 400, "NoIdInRequest"


def _pending(ecs):
    cred_id = f"pending-{uuid.uuid4()}"
    ecs.control("POST", "/pending", {"id": cred_id})
    return f"/v2/credentials/{cred_id}", 503, "CredentialsUninitialized"


def _not_found(ecs):
    return "/v2/metadata-nope", 404, None


def _redirect(ecs):
    return f"/v2//credentials/{ecs.new_task('e2e-redirect-role')['id']}", 301, None


@pytest.mark.parametrize("case", [_unknown, _unknown_v1, _no_id, _no_id_v1, _pending, _not_found,
                                  _redirect], ids=lambda f: f.__name__.strip("_"))
def test_agent_answers_pass_unchanged(ecs, case):
    target, status, code = case(ecs)
    before = ecs.metrics()
    data, via = ecs.via(target)
    after = ecs.metrics()
    _, direct = ecs.direct(target)
    assert direct.status == status, f"the stand-in itself answered {direct!r}"
    assert via.status == direct.status, f"credlock answered {via!r}, the agent {direct!r}"
    assert via.body == direct.body, f"credlock changed the agent's body: {via.body!r}"
    assert via.header("Content-Type") == direct.header("Content-Type"), (via, direct)
    if code is not None:
        assert via.json()["code"] == code, via
    if status == 301:
        assert via.header("Location") == direct.header("Location"), (via, direct)
    ecs.assert_clean(data, f"on {target}")
    assert metric_delta(before, after) == {"passed": 1}


def test_agent_rate_limit_429_passes_unchanged(ecs):
    target = f"/v2/credentials/{uuid.uuid4()}"
    ecs.control("POST", "/state", {"rate_limit": {"steady": 0.01, "burst": 1}})
    try:
        _, first = ecs.via(target)
        assert first.status == 400, first  # the one token of this (client, path) bucket
        data, via = ecs.via(target)
        _, direct = ecs.direct(target)
    finally:
        ecs.control("POST", "/state", {"rate_limit": {"steady": 40, "burst": 60}})
    assert direct.status == 429, direct
    assert via.status == 429, f"credlock answered {via!r} where the agent says 429"
    assert via.body == direct.body == b"You have reached maximum request limit."
    assert via.header("Content-Type") == direct.header("Content-Type")
    ecs.assert_clean(data, "on a 429")


def test_requests_reach_the_agent_as_sent(ecs):
    """Method and target as sent; only the allow-listed request headers."""
    task = ecs.new_task("e2e-relay-role")
    marker = e2e.new_marker()
    targets = [f"/v2/credentials/{task['id']}", f"/v1/credentials?id={task['id']}&extra=1"]
    for target in targets:
        _, reply = ecs.via(target, headers={"User-Agent": marker, "X-E2E-Trace": "t-1",
                                            "Accept": "application/json",
                                            "Accept-Encoding": "gzip",
                                            "Range": "bytes=0-59",
                                            "Connection": "close, X-E2E-Hop",
                                            "X-E2E-Hop": "must-not-be-forwarded"})
        assert reply.status == 200, (target, reply)
    seen = [r for r in ecs.agent_requests()
            if any(k.lower() == "user-agent" and v == marker for k, v in r["headers"])]
    assert [(r["method"], r["path"]) for r in seen] == [("GET", t) for t in targets], seen
    for request in seen:
        headers = {k.lower(): v for k, v in request["headers"]}
        # What an SDK's container provider sends and the agent may read is forwarded
        # (User-Agent above, Accept, Authorization); nothing else: in particular nothing
        # that would change the bytes of the answer credlock judges (an encoding, a range).
        assert headers.get("accept") == "application/json", request
        assert set(headers) <= {"host", "user-agent", "accept", "authorization"}, request
        # RFC 9110 7.6.1: a header named in Connection is hop-by-hop, not forwarded.
        assert "x-e2e-hop" not in headers, request


# --------------------------------------------------------------------------------------------
# Fail closed
# --------------------------------------------------------------------------------------------

def assert_fail_closed(ecs, data: bytes, reply, context: str) -> None:
    assert reply.status in (502, 503), f"{context}: credlock answered {reply!r}"
    assert (reply.header("Content-Type") or "").startswith("text/plain"), reply
    assert len(reply.body) < 1024, f"{context}: not a short body: {reply.body[:200]!r}"
    assert b"AccessKeyId" not in data and b"SecretAccessKey" not in data and b"Token\"" not in data
    ecs.assert_clean(data, context)


def test_sts_refusal_fails_closed(ecs):
    task = ecs.new_task(f"{DENY_PREFIX}e2e-role")
    before = ecs.metrics()
    data, reply = ecs.via(f"/v2/credentials/{task['id']}")
    assert_fail_closed(ecs, data, reply, "when STS refuses the task's AssumeRole")
    calls = ecs.sts.assumes(signers=[task["document"]["AccessKeyId"]])
    assert calls and all(c["status"] == 403 for c in calls), \
        f"the failure was not STS's refusal of this task's AssumeRole: {calls}"
    delta = metric_delta(before, ecs.metrics())
    assert delta == {"failed": 1}, delta


def test_unlockable_credential_document_is_refused(ecs):
    """A 200 credential document without a RoleArn carries raw values and cannot be locked."""
    task = ecs.new_task("e2e-empty-arn-role", document={"RoleArn": None})
    assert task["document"]["RoleArn"] == ""
    _, direct = ecs.direct(f"/v2/credentials/{task['id']}")
    assert direct.status == 200 and b"ASIARAWE" in direct.body  # what a raw pass would leak
    before = ecs.metrics()
    data, reply = ecs.via(f"/v2/credentials/{task['id']}")
    assert_fail_closed(ecs, data, reply, "on a document without RoleArn")
    delta = metric_delta(before, ecs.metrics())
    assert delta in ({"refused": 1}, {"failed": 1}), delta


# --------------------------------------------------------------------------------------------
# The IMDS side
# --------------------------------------------------------------------------------------------

def test_imds_side_still_locks_and_is_ready(ecs):
    stack = ecs.stack
    assert e2e.http_request(stack.admin, "GET", "/readyz").status == 200
    locked = stack.locked()
    stack.assert_no_raw(json.dumps(locked).encode(), "on the IMDS side")
    identity = ecs.identity(locked["AccessKeyId"], locked["SecretAccessKey"], locked["Token"])
    state = stack.state()
    assert identity["Arn"] == (f"arn:aws:sts::{state['account_id']}:assumed-role/"
                               f"{state['role']}/{state['instance_id']}"), identity
