"""credlock in front of the EKS Pod Identity Agent ([containers.pod_identity]), end to end.

    .venv/bin/python -m pytest -q tests/e2e/test_pod_identity.py

Must run as root (the listener's port is below 1024, as credlock requires): the module FAILS
otherwise, it never skips.

One stack per module: the Pod Identity Agent stand-in (tests/support/pod_identity_emulator.py,
started with --target-host 127.0.0.1 so that credlock, which asks it at 127.0.0.1, passes its
Host check), the IMDS emulator and moto (credlock's own instance lock needs them, as in the rest
of tests/e2e), a recording STS front in this process between credlock and moto
(tests/support/recording_sts.py) and one credlock whose [containers.pod_identity] listener (a
free loopback port below 1024) points at the stand-in. Pods reach it the way EKS configures
them ("How EKS Pod Identity works", Amazon EKS User Guide):
AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/v1/credentials plus
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (the service-account token, sent as Authorization).

A pod's raw credentials are a real moto session: for each pod the test assumes the pod's role
in moto itself (session eks-<cluster>-<pod>-<id>, as EKS Auth names them) and registers the
stand-in's token with that set as its document ("document" override of POST /tokens). So
moto's GetCallerIdentity signed with the raw set names assumed-role/<role>/<eks session>, as
AWS would, and credlock's lookup of the pod's role is answered by a real peer. The one
exception is the rotation test: POST /tokens/rotate makes the stand-in mint keys moto never
issued, and the front presents them to moto as a moto set of the same role and session (moto
does not verify signatures, so the key in Credential= and the session token are all it reads);
the front's log keeps what credlock sent.

What is tested:
  * boto3, the AWS CLI v1, the JS SDK v3 (@aws-sdk/credential-provider-http fromHttp) and the
    Rust SDK's default chain (examples/sdk_chain_child.rs) resolve a set that moto knows as
    arn:aws:sts::ACCOUNT:assumed-role/<pod role>/credlock-eks-<pod session>; the front shows
    that set was issued by an AssumeRole signed with that pod's own raw key and session token,
    after a GetCallerIdentity signed with them too;
  * the served document keeps the agent's AccountId and key order, has no RoleArn, an RFC 3339
    Expiration never later than the STS set's;
  * no raw value (moto's raw sets, the stand-in's RAW markers or any raw value it served)
    appears in any answer or any SDK's output;
  * pods are isolated (each token only ever yields the set issued for its own raw credentials,
    also under concurrent requests, cold or cached: one lookup and one AssumeRole per pod's
    raw set); repeated requests are one GetCallerIdentity and one
    AssumeRole (cached); a rotated raw set is looked up and locked again with the new raw key;
  * a role with a path listed in `roles` is assumed at that ARN, an unlisted one at role/NAME;
    session names are credlock-eks-<pod session> up to STS's 64 characters, a digest beyond;
  * the agent's own answers (400 empty/malformed/expired token, EKS Auth errors for an unknown,
    removed or refused token, 404 wrong path, 301 unclean path, 403 target host, 429 rate
    limit, 500 expiring credentials) pass unchanged, and requests reach the agent with the
    pod's token and only the allow-listed headers;
  * fail closed: an STS refusal of the pod's AssumeRole, or raw credentials that are not a role
    session, give 502 with a short text/plain body and no credential, counted in
    credlock_task_credentials_total{agent="pod_identity",result=...};
  * `credlock check-config` refuses a [containers.pod_identity] listener on a port >= 1024
    (exit 78), and the IMDS side keeps locking.

Ground truth is never credlock's code: moto (GetCallerIdentity on served sets), the stand-in's
GET /state and GET /requests, and the STS front's log of every call credlock made.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
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
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUPPORT = REPO / "tests" / "support"


def _load(name: str, path: Path):
    """tests/e2e/conftest.py's helpers as a module of their own name (as test_ecs_tasks does)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _load("credlock_e2e_helpers", HERE / "conftest.py")
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
import recording_sts  # noqa: E402  (the recording STS front)
import standin  # noqa: E402  (the stand-ins' shared constants)

if os.geteuid() != 0:
    pytest.fail("tests/e2e/test_pod_identity.py must run as root ([containers.pod_identity] "
                "listens on a port below 1024)", pytrace=False)

AGENT_SCRIPT = SUPPORT / "pod_identity_emulator.py"
ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
CLUSTER = "credlock-test-cluster"
SESSION_PREFIX = "credlock-eks-"
DENY_PREFIX = "deny-"  # role names the STS front refuses
RAW_MARKERS = tuple(standin.RAW_MARKERS) + ("ASIARAWP",)  # pod_identity_emulator's raw keys
# The agent's answer, in the order it marshals it (pod_identity_emulator.DOCUMENT_KEYS).
DOCUMENT_KEYS = ["AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration"]
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)  # STS API Reference, AssumeRole
REQUEST_ID = re.compile(rb"^\[[0-9a-f-]{36}\]: ")  # the agent's errors (errors.go)
ASSUME_RATE = 20
RUN_TIMEOUT = 60
METRIC_LINE = re.compile(r"^credlock_task_credentials_total\{([^}]*)\}\s+(\S+)\s*$", re.M)
RESULTS = ("locked", "cached", "passed", "refused", "failed")

ROLE = "e2e-pod-role"
OTHER_ROLE = "e2e-pod-other-role"
SDK_ROLE = "e2e-pod-sdk-role"
PATH_ROLE, ROLE_PATH = "e2e-pod-path-role", "/team/e2e/"
UNLISTED_PATH_ROLE = "e2e-pod-unlisted-path-role"
DENIED_ROLE = f"{DENY_PREFIX}e2e-pod-role"
ROLES = {ROLE: "/", OTHER_ROLE: "/", SDK_ROLE: "/", PATH_ROLE: ROLE_PATH,
         UNLISTED_PATH_ROLE: ROLE_PATH, DENIED_ROLE: "/"}
LISTED_ROLES = [f"arn:aws:iam::{ACCOUNT}:role{ROLE_PATH}{PATH_ROLE}"]

JS_HTTP_PACKAGE = "@aws-sdk/credential-provider-http"
JS_SCRIPT = """
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const httpPaths = (process.env.E2E_JS_HTTP_PATHS || "").split(":").filter(Boolean);
const { fromHttp } = require(require.resolve("@aws-sdk/credential-provider-http",
                                             { paths: httpPaths }));
try {
  const c = await fromHttp({ timeout: 5000, maxRetries: 0 })();
  process.stdout.write(JSON.stringify({
    accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey,
    sessionToken: c.sessionToken,
    expiration: c.expiration ? c.expiration.toISOString() : null,
  }) + "\\n");
} catch (error) {
  process.stderr.write(`fromHttp: ${error?.name}: ${error?.message}` +
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

def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def utc_text(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role{ROLES.get(name, '/')}{name}"


def assumed_arn(name: str, session: str) -> str:
    """arn:aws:sts::ACCOUNT:assumed-role/ROLE-NAME/SESSION-NAME (IAM User Guide, "IAM
    identifiers"): the role's name, never its path."""
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{name}/{session}"


def metric_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def answer_bytes(reply: e2e.Reply) -> bytes:
    """What a client read: the head's fields and the body."""
    head = "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
    return head.encode("latin-1") + b"\r\n" + reply.body


def free_privileged_port() -> int:
    """A free loopback port below 1024: credlock's Pod Identity listener must be one only root
    may bind."""
    for port in random.sample(range(700, 1024), 324):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free loopback port below 1024")


def moto_client(moto_url: str, service: str, **creds):
    creds = creds or {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    return boto3.client(service, endpoint_url=moto_url, region_name=REGION, **creds)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------

class PodSts(recording_sts.RecordingSts):
    """The recording front, which can also present a raw key moto never issued to moto as a
    set moto did issue (`aliases`: raw AccessKeyId -> moto's AccessKeyId and SessionToken).
    Only what is relayed changes: the log keeps the key and token credlock signed with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases: dict[str, tuple[str, str]] = {}

    def relay(self, method: str, target: str, headers, body: bytes):
        credential = recording_sts.CREDENTIAL.search(headers.get("Authorization", ""))
        with self.lock:
            alias = self.aliases.get(credential.group(1)) if credential else None
        if alias is None:
            return super().relay(method, target, headers, body)
        raw_key = credential.group(1)
        moto_key, moto_token = alias
        relayed = {}
        for name, value in headers.items():
            if name.lower() == "authorization":
                value = value.replace(f"Credential={raw_key}/", f"Credential={moto_key}/")
            elif name.lower() == "x-amz-security-token":
                value = moto_token
            relayed[name] = value
        return super().relay(method, target, relayed, body)


def start_agent(workdir: Path) -> tuple:
    """The Pod Identity Agent stand-in: (process, agent address, control address)."""
    argv = [str(e2e.PYTHON), str(AGENT_SCRIPT), "--listen", "127.0.0.1:0",
            "--control", "127.0.0.1:0", "--cluster-name", CLUSTER,
            "--target-host", "127.0.0.1"]
    proc = e2e.Process("pod-identity-agent", argv, workdir / "pod-agent.log",
                       env=e2e.clean_env(), stdout_pipe=True)
    addresses: dict[str, str] = {}
    deadline = time.monotonic() + e2e.READY_TIMEOUT
    os.set_blocking(proc.popen.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline and len(addresses) < 2:
        if not proc.alive():
            proc.stop()
            pytest.fail(f"Pod Identity Agent stand-in exited: "
                        f"{proc.log.read_text(errors='replace')}")
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
        pytest.fail(f"Pod Identity Agent stand-in did not print its addresses: {buffer!r}")
    return proc, addresses["listening"], addresses["control"]


class PodStack(e2e.Stack):
    """conftest's Stack (IMDS emulator + credlock) with credlock's [containers.pod_identity]
    listener pointed at the agent stand-in and its STS endpoint at the recording front."""

    def __init__(self, moto_url: str, sts_url: str, agent: str, workdir: Path):
        super().__init__("optional", moto_url, workdir)
        self.sts_url = sts_url
        self.agent = agent
        self.pods = ""  # credlock's Pod Identity listener

    def _start_credlock(self) -> None:
        if not (e2e.CREDLOCK_BIN.is_file() and os.access(e2e.CREDLOCK_BIN, os.X_OK)):
            pytest.fail(f"credlock binary missing or not executable: {e2e.CREDLOCK_BIN}")
        self.proxy = f"127.0.0.1:{e2e.free_port()}"
        self.admin = f"127.0.0.1:{e2e.free_port()}"
        self.pods = f"127.0.0.1:{free_privileged_port()}"
        config = self.workdir / "credlock.toml"
        config.write_text(
            "[server]\n"
            f'listen = ["{self.proxy}"]\n'
            f'admin_listen = "{self.admin}"\n'
            f'upstream = "http://{self.imds}"\n'
            "\n[discovery.echo]\nenabled = false\n"
            "\n[containers.pod_identity]\n"
            f'listen = ["{self.pods}"]\n'
            f'agent = "http://{self.agent}"\n'
            f"assume_rate = {ASSUME_RATE}\n"
            f"roles = {json.dumps(LISTED_ROLES)}\n")
        env = e2e.clean_env(AWS_ENDPOINT_URL_STS=self.sts_url, HOME=str(self.workdir))
        proc = e2e.Process("credlock-pods", [str(e2e.CREDLOCK_BIN), "run", "--config",
                                             str(config)],
                           self.workdir / "credlock.log", env=env)
        self.processes.append(proc)

        def ready():
            if not proc.alive():
                pytest.fail(f"credlock exited with {proc.popen.returncode}:\n"
                            f"{proc.log.read_text(errors='replace')[-4000:]}")
            return e2e.http_request(self.admin, "GET", "/readyz", timeout=2).status == 200

        e2e.wait_for(ready, e2e.READY_TIMEOUT, f"credlock /readyz on {self.admin}", proc.log)

        def pods_listening():
            with socket.create_connection(e2e.split_addr(self.pods), timeout=1):
                return True

        e2e.wait_for(pods_listening, e2e.READY_TIMEOUT,
                     f"credlock's Pod Identity listener {self.pods}", proc.log)


class Pods:
    """What the tests use: credlock's Pod Identity listener, the agent stand-in (control API
    and ground truth), the STS front's log, credlock's metrics and moto."""

    timeout = 10.0

    def __init__(self, stack: PodStack, sts: PodSts, agent: str, control_addr: str,
                 moto_url: str, workdir: Path):
        self.stack = stack
        self.sts = sts
        self.agent = agent
        self.control_addr = control_addr
        self.moto_url = moto_url
        self.workdir = workdir
        self.proxy = stack.pods
        self.admin = stack.admin
        self.raw_seen: set[str] = set()  # every raw value a pod was ever given

    # ---- the stand-in ----

    def control(self, method: str, path: str, document=None):
        body = json.dumps(document).encode() if document is not None else None
        reply = e2e.http_request(self.control_addr, method, path,
                                 {"Content-Type": "application/json"} if body else None, body)
        assert reply.status == 200, f"agent control {method} {path}: {reply!r}"
        answer = reply.json()
        self._remember(answer)
        return answer

    def _remember(self, answer) -> None:
        entries = []
        if isinstance(answer, dict) and isinstance(answer.get("tokens"), dict):
            entries = list(answer["tokens"].values())
        elif isinstance(answer, dict) and "document" in answer:
            entries = [answer]
        for entry in entries:
            doc = entry.get("document") or {}
            self.raw_seen.update(doc[k] for k in ("AccessKeyId", "SecretAccessKey", "Token")
                                 if doc.get(k))

    def moto_session(self, name: str, session: str) -> dict:
        """A set moto issues for role NAME, session SESSION (what EKS Auth gives a pod)."""
        got = moto_client(self.moto_url, "sts").assume_role(
            RoleArn=role_arn(name), RoleSessionName=session, DurationSeconds=3600)
        creds = got["Credentials"]
        return {"AccessKeyId": creds["AccessKeyId"], "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds["SessionToken"], "Expiration": utc_text(creds["Expiration"])}

    def new_pod(self, role: str, session: str | None = None, moto_raw: bool = True,
                **spec) -> dict:
        """A pod of role ROLE: its service-account token registered with the stand-in (and
        written to a token file), and its raw set, by default a moto session of that role
        named `session` (eks-<cluster>-<pod>-<id> unless given)."""
        pod_name = f"pod-{uuid.uuid4().hex[:6]}"
        session = session or f"eks-{CLUSTER}-{pod_name}-{uuid.uuid4().hex[:8]}"
        raw = self.moto_session(role, session) if moto_raw else None
        if raw is not None:
            self.raw_seen.update(raw[k] for k in ("AccessKeyId", "SecretAccessKey", "Token"))
            # The agent's own Expiration (6 h) is kept: later than any locked set's, so a
            # served document that kept it would show.
            spec.setdefault("document", {k: raw[k] for k in
                                         ("AccessKeyId", "SecretAccessKey", "Token")})
        entry = self.control("POST", "/tokens", {"pod_name": pod_name,
                                                 "role_arn": role_arn(role), **spec})
        token_file = self.workdir / f"{pod_name}.token"
        token_file.write_text(entry["token"])
        return {"name": pod_name, "role": role, "session": session, "token": entry["token"],
                "token_file": token_file, "raw": entry["document"], "entry": entry}

    def rotate(self, pod: dict) -> dict:
        """POST /tokens/rotate: the stand-in's new raw set for this pod (keys moto never issued,
        presented to moto by the front as a fresh moto set of the pod's role and session)."""
        entry = self.control("POST", "/tokens/rotate", {"token": pod["token"]})
        fresh = self.moto_session(pod["role"], pod["session"])
        self.raw_seen.update(fresh[k] for k in ("AccessKeyId", "SecretAccessKey", "Token"))
        with self.sts.lock:
            self.sts.aliases[entry["document"]["AccessKeyId"]] = (fresh["AccessKeyId"],
                                                                   fresh["Token"])
        pod["raw"] = entry["document"]
        return entry["document"]

    def state(self) -> dict:
        return self.control("GET", "/state")

    def agent_requests(self) -> list[dict]:
        return self.control("GET", "/requests")

    # ---- requests ----

    def via(self, path: str = "/v1/credentials", token: str | None = None,
            headers: dict | None = None, method: str = "GET") -> e2e.Reply:
        fields = dict(headers or {})
        if token is not None:
            fields["Authorization"] = token
        return e2e.http_request(self.proxy, method, path, fields)

    def direct(self, path: str = "/v1/credentials", token: str | None = None,
               headers: dict | None = None, method: str = "GET") -> e2e.Reply:
        fields = dict(headers or {})
        if token is not None:
            fields["Authorization"] = token
        return e2e.http_request(self.agent, method, path, fields)

    def uri(self) -> str:
        return f"http://{self.proxy}/v1/credentials"

    def locked(self, pod: dict) -> dict:
        reply = self.via(token=pod["token"])
        assert reply.status == 200, reply
        self.assert_clean(answer_bytes(reply), f"for pod {pod['name']}")
        return reply.json()

    # ---- ground truth checks ----

    def assert_clean(self, data: bytes | str, context: str = "") -> None:
        """No raw marker and no raw value any pod was ever given, anywhere in these bytes."""
        self.state()  # picks up the stand-in's current raw values too
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        for marker in RAW_MARKERS:
            assert marker not in text, f"raw marker {marker!r} reached the client {context}"
        for value in self.raw_seen:
            assert value not in text, f"a pod's RAW credential leaked {context}: {value[:24]}..."

    def assert_looked_up(self, pod: dict) -> list[dict]:
        """credlock asked GetCallerIdentity with the pod's own raw key and session token."""
        calls = [c for c in self.sts.calls(action="GetCallerIdentity")
                 if c["signer"] == pod["raw"]["AccessKeyId"]]
        assert calls, f"no GetCallerIdentity signed with pod {pod['name']}'s raw key"
        assert all(c["token"] == pod["raw"]["Token"] for c in calls), \
            "the pod's GetCallerIdentity did not carry the pod's own raw session token"
        return calls

    def assert_locked_for(self, pod: dict, access_key: str, secret: str | None = None,
                          token: str | None = None, arn: str | None = None) -> dict:
        """This set is one STS issued to an AssumeRole of the pod's role, session
        credlock-eks-<pod session>, signed with the pod's own raw key and token (after a
        GetCallerIdentity signed with them); no part of it is raw; moto knows it as that
        session. Returns the AssumeRole call."""
        for value in (access_key, secret, token):
            if value is not None:
                assert value not in self.raw_seen, "a raw pod credential value was served"
                for marker in RAW_MARKERS:
                    assert marker not in value, f"raw marker {marker!r} in the served set"
        session = SESSION_PREFIX + pod["session"]
        calls = self.sts.assumes(session=session)
        assert calls, f"no AssumeRole with session {session} reached STS"
        issued = [c for c in calls if c["issued_key"] == access_key]
        assert issued, (f"the served AccessKeyId was not issued by an AssumeRole for pod "
                        f"{pod['name']}: {access_key} not in {[c['issued_key'] for c in calls]}")
        call = issued[-1]
        assert call["role_arn"] == role_arn(pod["role"]), call
        assert call["signer"] == pod["raw"]["AccessKeyId"], \
            "the pod's AssumeRole was not signed with the pod's own raw AccessKeyId"
        assert call["token"] == pod["raw"]["Token"], \
            "the pod's AssumeRole did not carry the pod's own raw session token"
        assert call["policy"], "the pod's AssumeRole carried no session policy"
        lookups = self.assert_looked_up(pod)
        assert min(c["time"] for c in lookups) <= call["time"], \
            "the pod's role was assumed before its GetCallerIdentity lookup"
        expected = assumed_arn(pod["role"], session)
        if secret is not None and token is not None:
            assert self.identity(access_key, secret, token)["Arn"] == expected
        if arn is not None:
            assert arn == expected, f"moto says {arn}, expected {expected}"
        return call

    def identity(self, access_key: str, secret: str, token: str) -> dict:
        return moto_client(self.moto_url, "sts", aws_access_key_id=access_key,
                           aws_secret_access_key=secret,
                           aws_session_token=token).get_caller_identity()

    def metrics(self) -> dict[str, float]:
        """credlock_task_credentials_total{agent="pod_identity",result=...} (0 when absent)."""
        reply = e2e.http_request(self.admin, "GET", "/metrics")
        assert reply.status == 200, reply
        values = dict.fromkeys(RESULTS, 0.0)
        for labels, value in METRIC_LINE.findall(reply.body.decode()):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if fields.get("agent") == "pod_identity" and fields.get("result") in values:
                values[fields["result"]] = float(value)
        return values

    def client_env(self, pod: dict, home: Path, **extra: str) -> dict:
        """A client whose only credential source is credlock's Pod Identity listener, with the
        pod's token file, as EKS sets them; STS at moto."""
        home.mkdir(exist_ok=True)
        env = e2e.clean_env(
            AWS_CONTAINER_CREDENTIALS_FULL_URI=self.uri(),
            AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(pod["token_file"]),
            AWS_ENDPOINT_URL_STS=self.moto_url,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=str(home / "no-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            HOME=str(home),
        )
        env.update(extra)
        return env


def create_roles(moto_url: str) -> None:
    """The pods' roles in moto's IAM (a role with a path among them), each trusting EKS Pod
    Identity and itself (credlock's AssumeRole is made with the role's own session)."""
    iam = moto_client(moto_url, "iam")
    for name, path in ROLES.items():
        trust = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
             "Action": ["sts:AssumeRole", "sts:TagSession"]},
            {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
             "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
             "Condition": {"ArnLike": {"aws:PrincipalArn": role_arn(name)}}}]}
        try:
            iam.create_role(RoleName=name, Path=path,
                            AssumeRolePolicyDocument=json.dumps(trust))
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        assert iam.get_role(RoleName=name)["Role"]["Arn"] == role_arn(name)


@pytest.fixture(scope="module")
def pod_stack(moto_url, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pod-identity")
    create_roles(moto_url)
    sts = PodSts(moto_url, deny_prefix=DENY_PREFIX, session_prefix=SESSION_PREFIX)
    agent_proc = stack = None
    try:
        agent_proc, agent, control = start_agent(workdir)
        stack = PodStack(moto_url, sts.url, agent, workdir)
        stack.start()
        yield Pods(stack, sts, agent, control, moto_url, workdir)
    finally:
        if stack is not None:
            stack.stop()
        if agent_proc is not None:
            agent_proc.stop()
        sts.stop()


@pytest.fixture
def pods(pod_stack) -> Pods:
    """The module's stack, credlock alive and the stand-in's switches at their start-up values
    (a previous test may have changed them)."""
    assert pod_stack.stack.credlock_alive(), \
        f"credlock died:\n{pod_stack.stack.credlock_log()[-4000:]}"
    pod_stack.control("POST", "/state", {"target_hosts": ["127.0.0.1"], "delay_ms": 0,
                                         "down": False,
                                         "rate_limit": {"rate": 1000, "burst": 500},
                                         "unknown_token_error": {"code": "InvalidTokenException"}})
    return pod_stack


# --------------------------------------------------------------------------------------------
# SDK clients
# --------------------------------------------------------------------------------------------

def test_boto3_container_provider(pods, tmp_path):
    pod = pods.new_pod(SDK_ROLE)
    before = pods.metrics()
    result = subprocess.run([str(e2e.PYTHON), "-c", BOTO3_SCRIPT],
                            env=pods.client_env(pod, tmp_path / "home"), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"boto3 failed:\n{result.stdout}\n{result.stderr}"
    pods.assert_clean(result.stdout + result.stderr, "in boto3's output")
    seen = json.loads(result.stdout)
    assert seen["method"] == "container-role", seen["method"]
    pods.assert_locked_for(pod, seen["key"], seen["secret"], seen["token"], seen["arn"])
    assert_sdk_metrics(before, pods.metrics())


def assert_sdk_metrics(before: dict, after: dict) -> None:
    """One lock for the SDK's pod; any further fetch of it served from the cache."""
    delta = metric_delta(before, after)
    assert delta.get("locked") == 1 and set(delta) <= {"locked", "cached"}, delta


def test_aws_cli_v1_get_caller_identity(pods, tmp_path):
    aws = e2e.VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing (awscli is in tests/e2e/requirements.txt)"
    pod = pods.new_pod(SDK_ROLE)
    before = pods.metrics()
    result = subprocess.run([str(aws), "sts", "get-caller-identity", "--endpoint-url",
                             pods.moto_url, "--output", "json"],
                            env=pods.client_env(pod, tmp_path / "home"), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"aws cli failed:\n{result.stdout}\n{result.stderr}"
    pods.assert_clean(result.stdout + result.stderr, "in the CLI's output")
    seen = json.loads(result.stdout)
    session = SESSION_PREFIX + pod["session"]
    assert seen["Arn"] == assumed_arn(SDK_ROLE, session), seen
    assert seen["Account"] == ACCOUNT, seen
    # That session exists only as AssumeRole calls signed with this pod's raw credentials.
    calls = pods.sts.assumes(session=session)
    assert calls and all(c["signer"] == pod["raw"]["AccessKeyId"] for c in calls), calls
    pods.assert_looked_up(pod)
    # And the CLI's request reached the agent through credlock, with the pod's token.
    assert any(r["path"] == "/v1/credentials" and
               ("authorization", pod["token"]) in [(k.lower(), v) for k, v in r["headers"]]
               for r in pods.agent_requests()), "the pod's token never reached the agent"
    assert_sdk_metrics(before, pods.metrics())


def js_http_paths() -> list[str]:
    candidates = [e2e.JS_DIR]
    if os.environ.get("E2E_NODE_MODULES_DIR"):
        candidates.append(Path(os.environ["E2E_NODE_MODULES_DIR"]))
    return [str(d) for d in candidates
            if (d / "node_modules" / JS_HTTP_PACKAGE / "package.json").exists()]


def test_js_sdk_v3_from_http(pods, node_project, tmp_path):
    paths = js_http_paths()
    if not paths:
        pytest.fail(f"{JS_HTTP_PACKAGE} is not installed in tests/js (tests/setup.sh runs npm ci "
                    "there) nor in E2E_NODE_MODULES_DIR")
    pod = pods.new_pod(SDK_ROLE)
    script = tmp_path / "pod.mjs"
    script.write_text(JS_SCRIPT)
    before = pods.metrics()
    result = subprocess.run(["node", str(script)], cwd=tmp_path,
                            env=pods.client_env(pod, tmp_path / "home",
                                                E2E_JS_HTTP_PATHS=":".join(paths)),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    pods.assert_clean(result.stdout + result.stderr, "in the JS SDK's output")
    creds = json.loads(result.stdout)
    call = pods.assert_locked_for(pod, creds["accessKeyId"], creds["secretAccessKey"],
                                  creds["sessionToken"])
    assert creds["expiration"] is not None, creds
    assert parse_time(creds["expiration"]) <= parse_time(call["issued"]["Expiration"]) \
        + datetime.timedelta(seconds=1), (creds["expiration"], call["issued"]["Expiration"])
    assert_sdk_metrics(before, pods.metrics())


def test_rust_sdk_default_chain(pods, tmp_path):
    child = e2e.CREDLOCK_BIN.parent / "examples" / "sdk_chain_child"
    assert child.is_file(), f"{child} missing (cargo build --examples builds it)"
    pod = pods.new_pod(SDK_ROLE)
    before = pods.metrics()
    result = subprocess.run([str(child)], env=pods.client_env(pod, tmp_path / "home"),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"the Rust SDK failed:\n{result.stdout}\n{result.stderr}"
    pods.assert_clean(result.stdout + result.stderr, "in the Rust SDK's output")
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("SDK-CHAIN-REPORT ")]
    assert len(lines) == 1, result.stdout
    seen = json.loads(lines[0].removeprefix("SDK-CHAIN-REPORT "))
    assert seen["sts_error"] is None, seen
    call = pods.assert_locked_for(pod, seen["access_key_id"], arn=seen["arn"])
    assert seen["expiry"] is not None, seen
    assert seen["expiry"] <= parse_time(call["issued"]["Expiration"]).timestamp() + 1, \
        (seen["expiry"], call["issued"]["Expiration"])
    assert_sdk_metrics(before, pods.metrics())


def test_control_the_raw_set_is_the_pods_own_session(pods):
    """Control for the ARN assertions: moto knows a pod's raw set as the EKS session of its
    role (what credlock's lookup finds), not as credlock-eks-<session>, so that ARN proves a
    locked set was used; the stand-in serves that raw set as is."""
    pod = pods.new_pod(ROLE)
    raw = pod["raw"]
    assert pods.identity(raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])["Arn"] == \
        assumed_arn(ROLE, pod["session"])
    direct = pods.direct(token=pod["token"])
    assert direct.status == 200, direct
    assert direct.json()["AccessKeyId"] == raw["AccessKeyId"]


# --------------------------------------------------------------------------------------------
# The locked document
# --------------------------------------------------------------------------------------------

def test_document_keeps_account_id_and_key_order(pods):
    pod = pods.new_pod(ROLE)
    direct = pods.direct(token=pod["token"])
    assert direct.status == 200, direct
    raw_pairs = json.loads(direct.body, object_pairs_hook=list)
    assert [k for k, _ in raw_pairs] == DOCUMENT_KEYS, "premise: the agent's own key order"
    reply = pods.via(token=pod["token"])
    assert reply.status == 200, reply
    pods.assert_clean(answer_bytes(reply), "on a locked pod document")
    assert reply.header("Content-Type") == direct.header("Content-Type") == "application/json"
    pairs = json.loads(reply.body, object_pairs_hook=list)
    assert [k for k, _ in pairs] == DOCUMENT_KEYS, pairs
    doc = dict(pairs)
    assert "RoleArn" not in doc
    assert doc["AccountId"] == dict(raw_pairs)["AccountId"] == ACCOUNT
    for key in ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"):
        assert doc[key] != dict(raw_pairs)[key], f"{key} was not replaced"
    assert RFC3339_UTC.fullmatch(doc["Expiration"]), doc["Expiration"]
    call = pods.assert_locked_for(pod, doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])
    served = parse_time(doc["Expiration"])
    issued = parse_time(call["issued"]["Expiration"])
    assert served <= issued, (served, issued)
    assert served > datetime.datetime.now(datetime.timezone.utc), served


# --------------------------------------------------------------------------------------------
# Isolation, caching, rotation, roles with a path, session names
# --------------------------------------------------------------------------------------------

def test_pods_are_isolated(pods):
    group = {"A": pods.new_pod(ROLE), "B": pods.new_pod(ROLE), "C": pods.new_pod(OTHER_ROLE)}
    first = {}
    for name, pod in group.items():
        doc = pods.locked(pod)
        pods.assert_locked_for(pod, doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])
        first[name] = doc
    keys = [doc["AccessKeyId"] for doc in first.values()]
    assert len(set(keys)) == 3, f"two pods got the same locked set: {keys}"

    # Interleaved concurrent requests: each token only ever yields its own pod's set.
    order = [name for name in group for _ in range(8)]
    random.Random(11).shuffle(order)

    def fetch(name):
        return name, pods.via(token=group[name]["token"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(fetch, order))
    for name, reply in answers:
        assert reply.status == 200, (name, reply)
        pods.assert_clean(answer_bytes(reply), f"for pod {name}")
        doc = reply.json()
        own = {c["issued_key"] for c in
               pods.sts.assumes(session=SESSION_PREFIX + group[name]["session"])}
        assert doc["AccessKeyId"] in own, f"pod {name} was served another pod's set"
        assert doc["AccessKeyId"] == first[name]["AccessKeyId"], \
            f"pod {name} got a new set under concurrent requests"
    for name, pod in group.items():
        calls = pods.sts.assumes(signers=[pod["raw"]["AccessKeyId"]])
        assert len(calls) == 1, f"pod {name}: {len(calls)} AssumeRole calls"
        assert calls[0]["session"] == SESSION_PREFIX + pod["session"], calls[0]


def test_concurrent_first_requests_lock_each_pod_once(pods):
    """Cold pods asked for at once, interleaved: each token only ever yields the one set
    issued for its own raw credentials, with one lookup and one AssumeRole per pod."""
    group = {name: pods.new_pod(role) for name, role in
             (("D", ROLE), ("E", ROLE), ("F", OTHER_ROLE))}
    order = [name for name in group for _ in range(6)]
    random.Random(23).shuffle(order)
    before = pods.metrics()

    def fetch(name):
        return name, pods.via(token=group[name]["token"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(fetch, order))
    served: dict[str, set[str]] = {name: set() for name in group}
    for name, reply in answers:
        assert reply.status == 200, (name, reply)
        pods.assert_clean(answer_bytes(reply), f"for pod {name}")
        served[name].add(reply.json()["AccessKeyId"])
    for name, pod in group.items():
        calls = pods.sts.assumes(signers=[pod["raw"]["AccessKeyId"]])
        assert len(calls) == 1, f"pod {name}: {len(calls)} AssumeRole calls for one raw set"
        assert served[name] == {calls[0]["issued_key"]}, \
            f"pod {name} was served {served[name]}, its own AssumeRole issued {calls[0]}"
        assert len(pods.assert_looked_up(pod)) == 1, f"pod {name}: more than one lookup"
    assert metric_delta(before, pods.metrics()) == {"locked": 3, "cached": len(order) - 3}


def test_repeated_requests_are_served_from_the_cache(pods):
    pod = pods.new_pod(ROLE)
    before = pods.metrics()
    one = pods.locked(pod)
    two = pods.locked(pod)
    assert two == one, "a second request for the same pod got another set"
    assert metric_delta(before, pods.metrics()) == {"locked": 1, "cached": 1}
    assert len(pods.sts.assumes(signers=[pod["raw"]["AccessKeyId"]])) == 1, \
        "more than one AssumeRole for one pod's repeated requests"
    assert len(pods.assert_looked_up(pod)) == 1, \
        "more than one GetCallerIdentity for one raw set"
    pods.assert_locked_for(pod, one["AccessKeyId"], one["SecretAccessKey"], one["Token"])


def test_rotation_locks_again_with_the_new_raw_credentials(pods):
    pod = pods.new_pod(ROLE)
    old_raw = dict(pod["raw"])
    old = pods.locked(pod)
    new_raw = pods.rotate(pod)
    assert new_raw["AccessKeyId"] != old_raw["AccessKeyId"]
    before = pods.metrics()
    reply = pods.via(token=pod["token"])
    assert reply.status == 200, reply
    pods.assert_clean(answer_bytes(reply), "after rotation")  # neither the old nor the new raw
    new = reply.json()
    assert new["AccessKeyId"] != old["AccessKeyId"], "the rotated raw set was served the old set"
    call = pods.assert_locked_for(pod, new["AccessKeyId"], new["SecretAccessKey"], new["Token"])
    assert call["signer"] == new_raw["AccessKeyId"] != old_raw["AccessKeyId"]
    assert len(pods.assert_looked_up(pod)) == 1  # the new raw set's own lookup
    assert len(pods.sts.assumes(signers=[old_raw["AccessKeyId"]])) == 1
    assert metric_delta(before, pods.metrics()) == {"locked": 1}


@pytest.mark.parametrize("role,expected", [
    (PATH_ROLE, f"arn:aws:iam::{ACCOUNT}:role{ROLE_PATH}{PATH_ROLE}"),
    (UNLISTED_PATH_ROLE, f"arn:aws:iam::{ACCOUNT}:role/{UNLISTED_PATH_ROLE}"),
], ids=["listed-in-roles", "not-listed"])
def test_role_with_a_path(pods, role, expected):
    """GetCallerIdentity names the role without its path; a role listed in `roles` is assumed
    at its ARN (with the path), any other at role/NAME."""
    pod = pods.new_pod(role)
    raw = pod["raw"]
    assert pods.identity(raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])["Arn"] == \
        assumed_arn(role, pod["session"]), "premise: moto names the session without the path"
    reply = pods.via(token=pod["token"])
    pods.assert_clean(answer_bytes(reply), f"for a pod of {role}")
    calls = pods.sts.assumes(signers=[raw["AccessKeyId"]])
    assert [c["role_arn"] for c in calls] == [expected], calls
    if role == PATH_ROLE:
        assert reply.status == 200, reply
        doc = reply.json()
        pods.assert_locked_for(pod, doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])


def test_session_names_follow_the_pods_session(pods):
    """credlock-eks-<pod session> when it fits STS's 64 characters (a 51-character session), a
    digest of the pod's session otherwise (52 characters; and a 64-character one shaped like
    EKS's, eks-<cluster>-<pod>-<uuid>): always a valid RoleSessionName, never a raw value."""
    base = f"eks-{CLUSTER}-"
    cases = {
        "fits": base + "p" * (51 - len(base)),
        "one-over": base + "q" * (52 - len(base)),
        "eks-shape": f"{base}web-7d9f8c6b5-x2x4z-{uuid.uuid4()}"[:64],
    }
    names = {}
    for what, session in cases.items():
        pod = pods.new_pod(ROLE, session=session)
        reply = pods.via(token=pod["token"])
        assert reply.status == 200, (what, reply)
        pods.assert_clean(answer_bytes(reply), f"for session {what}")
        doc = reply.json()
        calls = pods.sts.assumes(signers=[pod["raw"]["AccessKeyId"]])
        assert len(calls) == 1 and calls[0]["issued_key"] == doc["AccessKeyId"], (what, calls)
        name = calls[0]["session"]
        assert SESSION_NAME.fullmatch(name), f"{what}: not a valid RoleSessionName: {name!r}"
        assert pods.identity(doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"])["Arn"] \
            == assumed_arn(ROLE, name), what
        names[what] = name
    assert names["fits"] == SESSION_PREFIX + cases["fits"], names
    for what in ("one-over", "eks-shape"):
        digest = hashlib.sha256(cases[what].encode()).hexdigest()[:24]
        assert names[what] == SESSION_PREFIX + digest, (what, names[what])


# --------------------------------------------------------------------------------------------
# The agent's own answers
# --------------------------------------------------------------------------------------------

def _no_token(pods):
    return {"token": None}, 400


def _empty_token(pods):
    return {"token": ""}, 400


def _malformed_token(pods):
    return {"token": "not-a-jwt"}, 400


def _expired_token(pods):
    pod = pods.new_pod(ROLE, moto_raw=False, exp=int(time.time()) - 60)
    return {"token": pod["token"]}, 400


def _unknown_token(pods):
    pod = pods.new_pod(ROLE, moto_raw=False)
    pods.control("POST", "/tokens/remove", {"token": pod["token"]})
    return {"token": pod["token"]}, 400


def _eks_auth_access_denied(pods):
    pod = pods.new_pod(ROLE, moto_raw=False, error={"code": "AccessDeniedException"})
    return {"token": pod["token"]}, 400


def _eks_auth_not_found(pods):
    pod = pods.new_pod(ROLE, moto_raw=False, error={"code": "ResourceNotFoundException"})
    return {"token": pod["token"]}, 404


def _eks_auth_unavailable(pods):
    pod = pods.new_pod(ROLE, moto_raw=False, error={"code": "ServiceUnavailableException"})
    return {"token": pod["token"]}, 503


def _expiring_credentials(pods):
    soon = utc_text(datetime.datetime.now(datetime.timezone.utc)
                    + datetime.timedelta(seconds=5))
    pod = pods.new_pod(ROLE, moto_raw=False, document={"Expiration": soon})
    return {"token": pod["token"]}, 500


def _wrong_path(pods):
    return {"token": pods.new_pod(ROLE)["token"], "path": "/v2/credentials"}, 404


def _root_path(pods):
    return {"token": pods.new_pod(ROLE)["token"], "path": "/"}, 404


def _unclean_path(pods):
    return {"token": pods.new_pod(ROLE)["token"], "path": "//v1/credentials"}, 301


def _target_host(pods):
    pods.control("POST", "/state", {"target_hosts": ["169.254.170.23", "fd00:ec2::23"]})
    return {"token": pods.new_pod(ROLE)["token"]}, 403


CASES = [_no_token, _empty_token, _malformed_token, _expired_token, _unknown_token,
         _eks_auth_access_denied, _eks_auth_not_found, _eks_auth_unavailable,
         _expiring_credentials, _wrong_path, _root_path, _unclean_path, _target_host]


def comparable(body: bytes) -> bytes:
    """The agent's answer with what differs per request replaced: the request id of an EKS
    Auth error ([<uuid>]: ...) and the seconds left in the expiring-credentials error."""
    body = REQUEST_ID.sub(b"[REQUEST-ID]: ", body)
    return re.sub(rb"within the next -?\d+\.\d{2} seconds", b"within the next N seconds", body)


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.strip("_"))
def test_agent_answers_pass_unchanged(pods, case):
    request, status = case(pods)
    before = pods.metrics()
    via = pods.via(**request)
    after = pods.metrics()
    direct = pods.direct(**request)
    assert direct.status == status, f"the stand-in itself answered {direct!r}"
    assert via.status == direct.status, f"credlock answered {via!r}, the agent {direct!r}"
    if comparable(direct.body) == direct.body:
        assert via.body == direct.body, f"credlock changed the agent's body: {via.body!r}"
    else:
        assert comparable(via.body) == comparable(direct.body), \
            f"credlock changed the agent's body: {via.body!r} vs {direct.body!r}"
        assert REQUEST_ID.match(via.body) or b"within the next" in via.body, via
    for name in ("Content-Type", "X-Content-Type-Options", "Location"):
        assert via.header_all(name) == direct.header_all(name), (name, via, direct)
    pods.assert_clean(answer_bytes(via), f"on {case.__name__}")
    assert b"AccessKeyId" not in via.body and b"SecretAccessKey" not in via.body, via
    assert metric_delta(before, after) == {"passed": 1}


def test_agent_rate_limit_429_passes_unchanged(pods):
    pod = pods.new_pod(ROLE)
    assert pods.via(token=pod["token"]).status == 200  # locked before the limit
    pods.control("POST", "/state", {"rate_limit": {"rate": 0.01, "burst": 1}})
    try:
        first = pods.direct(token=pod["token"])  # the bucket's one token
        assert first.status == 200, first
        before = pods.metrics()
        via = pods.via(token=pod["token"])
        after = pods.metrics()
        direct = pods.direct(token=pod["token"])
    finally:
        pods.control("POST", "/state", {"rate_limit": {"rate": 1000, "burst": 500}})
    assert direct.status == 429, direct
    assert via.status == 429, f"credlock answered {via!r} where the agent says 429"
    assert via.body == direct.body == b"Too Many Requests\n"
    assert via.header("Content-Type") == direct.header("Content-Type")
    pods.assert_clean(answer_bytes(via), "on a 429")
    assert metric_delta(before, after) == {"passed": 1}


def test_requests_reach_the_agent_with_the_pods_token(pods):
    """Method, target and the pod's Authorization as sent; Host the agent's own authority
    (what its target-host check reads); only the allow-listed request headers."""
    pod = pods.new_pod(ROLE)
    marker = e2e.new_marker()
    reply = pods.via(token=pod["token"], headers={
        "User-Agent": marker, "Accept": "application/json", "X-E2E-Trace": "t-1",
        "Accept-Encoding": "gzip", "Range": "bytes=0-59", "Cookie": "a=b",
        "Connection": "close, X-E2E-Hop", "X-E2E-Hop": "must-not-be-forwarded"})
    assert reply.status == 200, reply
    seen = [r for r in pods.agent_requests()
            if any(k.lower() == "user-agent" and v == marker for k, v in r["headers"])]
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/credentials")], seen
    headers = {k.lower(): v for k, v in seen[0]["headers"]}
    assert headers.get("authorization") == pod["token"], "the pod's token was not forwarded"
    assert headers.get("accept") == "application/json", headers
    assert headers.get("host") == pods.agent, headers
    assert set(headers) <= {"host", "user-agent", "accept", "authorization"}, headers


# --------------------------------------------------------------------------------------------
# Fail closed
# --------------------------------------------------------------------------------------------

def assert_fail_closed(pods, reply, context: str) -> None:
    assert reply.status == 502, f"{context}: credlock answered {reply!r}"
    assert (reply.header("Content-Type") or "").startswith("text/plain"), reply
    assert len(reply.body) < 1024, f"{context}: not a short body: {reply.body[:200]!r}"
    for field in (b"AccessKeyId", b"SecretAccessKey", b"Token\"", b"ASIA"):
        assert field not in reply.body, (context, reply.body)
    pods.assert_clean(answer_bytes(reply), context)


def test_sts_refusal_fails_closed(pods):
    pod = pods.new_pod(DENIED_ROLE)
    before = pods.metrics()
    reply = pods.via(token=pod["token"])
    assert_fail_closed(pods, reply, "when STS refuses the pod's AssumeRole")
    pods.assert_looked_up(pod)
    calls = pods.sts.assumes(signers=[pod["raw"]["AccessKeyId"]])
    assert calls and all(c["status"] == 403 for c in calls), \
        f"the failure was not STS's refusal of this pod's AssumeRole: {calls}"
    assert all(c["role_arn"] == role_arn(DENIED_ROLE) for c in calls), calls
    assert metric_delta(before, pods.metrics()) == {"failed": 1}
    # During the pod's back-off: 502 at once, no STS call, counted again.
    mark = pods.sts.mark()
    again = pods.via(token=pod["token"])
    assert_fail_closed(pods, again, "during the back-off")
    assert pods.sts.calls(mark) == [], "a pod in back-off reached STS"
    assert metric_delta(before, pods.metrics()) == {"failed": 2}


def test_raw_credentials_that_are_not_a_role_session_fail_closed(pods):
    """The stand-in's own minted raw set is not a session moto issued: GetCallerIdentity names
    no assumed role, so there is no role to assume and nothing is served."""
    pod = pods.new_pod(ROLE, moto_raw=False)
    raw = pod["raw"]
    assert ":assumed-role/" not in \
        pods.identity(raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])["Arn"]
    before = pods.metrics()
    reply = pods.via(token=pod["token"])
    assert_fail_closed(pods, reply, "on raw credentials that are not a role session")
    pods.assert_looked_up(pod)
    assert pods.sts.assumes(signers=[raw["AccessKeyId"]]) == []
    assert metric_delta(before, pods.metrics()) == {"failed": 1}


# --------------------------------------------------------------------------------------------
# Configuration; the IMDS side
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("port,rc", [("unprivileged", 78), ("zero", 78), ("privileged", 0)],
                         ids=["unprivileged-port-78", "port-0-78", "control-privileged-0"])
def test_check_config_requires_a_privileged_port(pods, tmp_path, port, rc):
    number = {"unprivileged": e2e.free_port(), "zero": 0,
              "privileged": free_privileged_port()}[port]
    config = tmp_path / "credlock.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["127.0.0.1:{e2e.free_port()}"]\n'
        f'admin_listen = "127.0.0.1:{e2e.free_port()}"\n'
        'upstream = "http://127.0.0.1:9"\n'
        "\n[discovery.echo]\nenabled = false\n"
        "\n[containers.pod_identity]\n"
        f'listen = ["127.0.0.1:{number}"]\n'
        f'agent = "http://{pods.agent}"\n'
        f"roles = {json.dumps(LISTED_ROLES)}\n")
    result = subprocess.run([str(e2e.CREDLOCK_BIN), "check-config", "--config", str(config)],
                            env=e2e.clean_env(HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == rc, (result.returncode, result.stdout, result.stderr)
    if rc:
        assert "containers.pod_identity.listen" in result.stdout + result.stderr, result


def test_imds_side_still_locks_and_is_ready(pods):
    stack = pods.stack
    assert e2e.http_request(stack.admin, "GET", "/readyz").status == 200
    locked = stack.locked()
    stack.assert_no_raw(json.dumps(locked).encode(), "on the IMDS side")
    identity = pods.identity(locked["AccessKeyId"], locked["SecretAccessKey"], locked["Token"])
    state = stack.state()
    assert identity["Arn"] == (f"arn:aws:sts::{state['account_id']}:assumed-role/"
                               f"{state['role']}/{state['instance_id']}"), identity
