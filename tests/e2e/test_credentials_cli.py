"""`credlock credentials`: print a locked credential set once and exit, end to end.

    .venv/bin/python -m pytest -q tests/e2e/test_credentials_cli.py

Peers, all on 127.0.0.1: moto (STS and IAM, the session's), a recording STS front in this
process between every client and moto (tests/support/recording_sts.py; AWS_ENDPOINT_URL_STS
points at it), conftest's IMDS
emulator + credlock daemon (for the "credlock runs here" path) and small fake listeners run as
`nobody` or root (for the listener-ownership check).

Without a daemon the command is run with a config whose discovery is [discovery.static] only
(imds and echo off) and whose server addresses are reserved (bound, never listening), so no
credlock answers there.

What is tested:
  * credential_process in an AWS config file, used by boto3, the AWS CLI v1, the JS SDK v3
    (fromProcess) and the Rust SDK's default chain (examples/sdk_chain_child.rs): each SDK sees the locked role's session (moto: assumed-role/ROLE/
    credlock-cli-HOST) and signs its own STS call with the key STS issued to credlock, while
    credlock's AssumeRole is signed with the source profile's key;
  * the role from the caller: an assumed-role session needs no --role-arn; an IAM user gets one
    error line naming --role-arn and no AssumeRole;
  * the formats: env (evaluated by sh), json (RoleArn, Source), credential-process (Version 1,
    RFC 3339 Expiration, never later than the STS set's), every value the one STS issued;
  * the cache: reused (one AssumeRole) while more than serve_margin is left and not after, a
    0600 file in a 0700 directory ($XDG_RUNTIME_DIR/credlock by default), unsafe directories
    refused, a file others can read ignored and replaced, --no-cache, one file per environment;
  * a credlock daemon here: its locked set is printed (what its IMDS listener serves), another
    role is refused naming the locked one; a listener held by another uid is refused and its
    credentials never printed (a root-held fake, as control, is believed);
  * errors: one "credlock: " line on stderr, exit 1 (78 for an invalid config), no stdout and
    no source secret anywhere.

Ground truth is never credlock's code: moto's GetCallerIdentity on a printed set, the STS
front's log (each call's action, role, session name, signing key and token, policy, and the set
STS issued), what conftest's daemon serves on its IMDS listener, the fakes' request logs, and
file modes and owners on disk. Role names starting "deny-" are refused by the front
(AccessDenied, 403); for role names starting "short-" the front rewrites the issued set's
Expiration to serve_margin + SHORT_EXTRA seconds from now (to watch the cache margin).

The JS SDK v3 test needs @aws-sdk/credential-provider-process, which tests/js/package.json does
not list: it is looked for in tests/js/node_modules, then in E2E_NODE_MODULES_DIR (a directory
holding node_modules); missing -> the test fails, saying so.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pwd
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
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
SUPPORT = REPO / "tests" / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))  # the stand-ins' shared modules, as adv_upstream.py does
import recording_sts  # noqa: E402  (the recording STS front)

ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
JS_DIR = REPO / "tests" / "js"
JS_PROCESS_PACKAGE = "@aws-sdk/credential-provider-process"
RUN_TIMEOUT = 60
DENY_PREFIX = "deny-"
SHORT_PREFIX = "short-"
SERVE_MARGIN = 300  # lock.serve_margin_seconds, the default
SHORT_EXTRA = 5  # a "short-" set has SERVE_MARGIN + SHORT_EXTRA seconds left when issued
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
SET_KEYS = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")


def host_session_name() -> str:
    """credlock-cli-<host>: the hostname reduced to STS's [\\w+=,.@-], at most 40 characters."""
    raw = Path("/proc/sys/kernel/hostname").read_text().strip()
    host = re.sub(r"[^A-Za-z0-9_+=,.@-]", "", raw)[:40]
    return f"credlock-cli-{host if len(host) >= 2 else 'unknown-host'}"


SESSION = host_session_name()


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


def assumed_arn(role_name: str, session: str = SESSION) -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{session}"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def front(moto_url):
    """The recording STS front: refuses "deny-" roles, shortens "short-" roles' sets."""
    with recording_sts.RecordingSts(moto_url, deny_prefix=DENY_PREFIX, short_prefix=SHORT_PREFIX,
                                    short_lifetime=SERVE_MARGIN + SHORT_EXTRA) as sts:
        yield sts


@pytest.fixture(scope="module")
def sources(moto_url) -> dict:
    """Source credentials in moto: an IAM user's access key, and an assumed-role session of
    role e2e-ci-role (what a CI runner's OIDC role gives) made with it."""
    iam = boto3.client("iam", endpoint_url=moto_url, region_name=REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    user = unique("e2e-ci-user-")
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    user_creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                  "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    sts = boto3.client("sts", endpoint_url=moto_url, region_name=REGION,
                       aws_access_key_id=key["AccessKeyId"],
                       aws_secret_access_key=key["SecretAccessKey"])
    session = sts.assume_role(RoleArn=role_arn("e2e-ci-role"),
                              RoleSessionName="ci-job-42")["Credentials"]
    session_creds = {"AWS_ACCESS_KEY_ID": session["AccessKeyId"],
                     "AWS_SECRET_ACCESS_KEY": session["SecretAccessKey"],
                     "AWS_SESSION_TOKEN": session["SessionToken"]}
    # The premise, from moto: one is a user, the other a session of e2e-ci-role.
    assert ":user/" in identity(moto_url, user_creds)["Arn"]
    assert identity(moto_url, session_creds)["Arn"] == assumed_arn("e2e-ci-role", "ci-job-42")
    return {"user": user_creds, "session": session_creds, "user_name": user}


@pytest.fixture(scope="module")
def reserved():
    """Loopback addresses bound but never listening (not LISTEN in /proc/net/tcp, connections
    refused): the server addresses of configs for hosts where no credlock runs."""
    socks = []

    def take() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
        return f"127.0.0.1:{sock.getsockname()[1]}"

    try:
        yield take
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def write_config(tmp_path, reserved):
    """A config for a host without credlock: static discovery only."""

    def make(ipv4=("10.1.2.0/24",), name="credlock.toml", listen=None, admin=None,
             extra="") -> Path:
        path = tmp_path / name
        path.write_text(
            "[server]\n"
            f'listen = ["{listen or reserved()}"]\n'
            f'admin_listen = "{admin or reserved()}"\n'
            f'upstream = "http://{reserved()}"\n'
            "\n[discovery.imds]\nenabled = false\n"
            "\n[discovery.echo]\nenabled = false\n"
            "\n[discovery.static]\n"
            f"ipv4 = {json.dumps(list(ipv4))}\n" + extra)
        return path

    return make


def identity(moto_url: str, creds: dict) -> dict:
    """moto's GetCallerIdentity for a set (AWS_* names or the printed names)."""
    key = creds.get("AccessKeyId") or creds.get("AWS_ACCESS_KEY_ID")
    secret = creds.get("SecretAccessKey") or creds.get("AWS_SECRET_ACCESS_KEY")
    token = creds.get("SessionToken") or creds.get("AWS_SESSION_TOKEN")
    sts = boto3.client("sts", endpoint_url=moto_url, region_name=REGION,
                       aws_access_key_id=key, aws_secret_access_key=secret,
                       aws_session_token=token)
    return sts.get_caller_identity()


def cli_env(home: Path, sts_url: str, creds: dict | None = None, **extra: str) -> dict:
    """No credential or config other than what is given; the Region from the environment.
    The AWS config and credentials files exist and are empty (a missing one draws an SDK
    warning)."""
    for name in ("no-aws-config", "no-aws-credentials"):
        (home / name).touch()
    env = e2e.clean_env(
        HOME=str(home),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL_STS=sts_url,
    )
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(creds or {})
    env.update(extra)
    return env


class Run:
    def __init__(self, result: subprocess.CompletedProcess):
        self.rc = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr

    def json(self) -> dict:
        assert self.rc == 0, f"credlock credentials failed ({self.rc}): {self.stderr}"
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Run(rc={self.rc}, stdout={self.stdout[:200]!r}, stderr={self.stderr[:600]!r})"


@pytest.fixture
def credlock(credlock_bin, front, tmp_path):
    """Runs `credlock credentials ARGS` with source credentials `creds` (env vars)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def run(*args: str, creds: dict | None = None, env: dict | None = None) -> Run:
        environment = env if env is not None else cli_env(home, front.url, creds)
        result = subprocess.run([str(credlock_bin), "credentials", *args], env=environment,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT)
        return Run(result)

    return run


def assert_error_line(run: Run, *secrets: str, rc: int = 1) -> str:
    """Exit rc, nothing on stdout, one "credlock: " line on stderr, no secret anywhere."""
    assert run.rc == rc, run
    assert run.stdout == "", f"something was printed on stdout on error: {run!r}"
    lines = run.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"stderr is not one line: {run.stderr!r}"
    assert lines[0].startswith("credlock: "), run.stderr
    for value in secrets:
        assert value and value not in run.stdout + run.stderr, \
            f"a source secret appeared in the output: {value[:12]}..."
    return lines[0]


def assert_issued(printed: dict, call: dict) -> None:
    """The printed set is exactly the one STS issued in this AssumeRole call; Expiration is
    RFC 3339 and never later than the set's own."""
    issued = call["issued"]
    assert issued, f"the AssumeRole was not answered with a set: {call}"
    for key in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        assert printed[key] == issued[key], f"printed {key} is not the one STS issued"
    assert RFC3339.fullmatch(printed["Expiration"]), printed["Expiration"]
    assert parse_time(printed["Expiration"]) <= parse_time(issued["Expiration"]), \
        (printed["Expiration"], issued["Expiration"])


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --------------------------------------------------------------------------------------------
# 1. credential_process, as the SDKs run it
# --------------------------------------------------------------------------------------------

@pytest.fixture
def process_profile(credlock_bin, front, sources, write_config, tmp_path):
    """An AWS config file: profile `source` holds the IAM user's keys (and the Region), profile
    `locked` runs credlock as its credential_process with AWS_PROFILE=source. The SDK's own
    environment has no credentials: what it signs with can only come from credlock."""
    role = unique("e2e-locked-")
    cache = tmp_path / "process-cache"
    config = write_config()
    aws_config = tmp_path / "aws-config"
    aws_config.write_text(
        "[profile source]\n"
        f"aws_access_key_id = {sources['user']['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {sources['user']['AWS_SECRET_ACCESS_KEY']}\n"
        f"region = {REGION}\n"
        "\n[profile locked]\n"
        f"credential_process = /usr/bin/env AWS_PROFILE=source {credlock_bin} credentials "
        f"--config {config} --cache-dir {cache} --role-arn {role_arn(role)}\n"
        f"region = {REGION}\n")
    home = tmp_path / "sdk-home"
    home.mkdir()
    (home / "no-credentials").touch()
    env = e2e.clean_env(
        HOME=str(home),
        AWS_CONFIG_FILE=str(aws_config),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_STS=front.url,
    )
    env.pop("XDG_RUNTIME_DIR", None)
    return {"role": role, "env": env, "cache": cache}


def check_process_use(front, sources, moto_url, profile, mark, key: str, arn: str) -> None:
    """What the SDK saw is the locked role's session; STS issued that key to credlock for an
    AssumeRole signed with the source profile's key; the key is not the source's."""
    role = profile["role"]
    source_key = sources["user"]["AWS_ACCESS_KEY_ID"]
    assert arn == assumed_arn(role), arn
    assert key != source_key, "the SDK used the source credentials, not credlock's output"
    assumes = front.assumes(mark)
    assert len(assumes) == 1, f"expected one AssumeRole, got {len(assumes)}: {assumes}"
    call = assumes[0]
    assert call["role_arn"] == role_arn(role) and call["session"] == SESSION, call
    assert call["signer"] == source_key, "credlock's AssumeRole was not signed with profile source"
    assert call["issued"]["AccessKeyId"] == key, "the SDK's key is not the one STS issued"
    assert [f for f in cache_files(profile["cache"]) if mode(f) == 0o600], \
        "credential_process left no 0600 cache file"


def test_boto3_credential_process(front, sources, moto_url, process_profile):
    script = (
        "import boto3, json\n"
        "s = boto3.Session(profile_name='locked')\n"
        "c = s.get_credentials()\n"
        "f = c.get_frozen_credentials()\n"
        "arn = s.client('sts').get_caller_identity()['Arn']\n"
        "print(json.dumps({'method': c.method, 'key': f.access_key, 'arn': arn}))\n")
    mark = front.mark()
    result = subprocess.run([str(e2e.PYTHON), "-c", script], env=process_profile["env"],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"boto3 failed:\n{result.stdout}\n{result.stderr}"
    seen = json.loads(result.stdout)
    assert seen["method"] == "custom-process", seen
    check_process_use(front, sources, moto_url, process_profile, mark, seen["key"], seen["arn"])
    # boto3's own GetCallerIdentity went out signed with the locked key.
    signers = [c["signer"] for c in front.calls(mark, "GetCallerIdentity")
               if "botocore" in c["user_agent"].lower() or "boto3" in c["user_agent"].lower()]
    assert signers == [seen["key"]], signers


def test_aws_cli_v1_credential_process(front, sources, moto_url, process_profile):
    aws = e2e.VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing (awscli is in the venv's requirements)"
    mark = front.mark()
    result = subprocess.run([str(aws), "sts", "get-caller-identity", "--profile", "locked",
                             "--output", "json"], env=process_profile["env"],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"aws cli failed:\n{result.stdout}\n{result.stderr}"
    arn = json.loads(result.stdout)["Arn"]
    cli_calls = [c for c in front.calls(mark, "GetCallerIdentity")
                 if c["user_agent"].startswith("aws-cli/")]
    assert len(cli_calls) == 1, cli_calls
    check_process_use(front, sources, moto_url, process_profile, mark, cli_calls[0]["signer"],
                      arn)


def test_rust_sdk_credential_process(credlock_bin, front, sources, moto_url, process_profile):
    """The AWS Rust SDK's default chain (aws-config with its credentials-process feature, as
    credlock itself is built) resolves profile `locked` by running credlock, then signs its
    own GetCallerIdentity with the set: examples/sdk_chain_child.rs, built with the tests."""
    child = credlock_bin.parent / "examples" / "sdk_chain_child"
    assert child.is_file(), f"{child} missing (cargo build --all-targets builds it)"
    env = dict(process_profile["env"], AWS_PROFILE="locked")
    mark = front.mark()
    result = subprocess.run([str(child)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"the Rust SDK failed:\n{result.stdout}\n{result.stderr}"
    lines = [l for l in result.stdout.splitlines() if l.startswith("SDK-CHAIN-REPORT ")]
    assert len(lines) == 1, result.stdout
    seen = json.loads(lines[0].removeprefix("SDK-CHAIN-REPORT "))
    assert seen["sts_error"] is None, seen
    check_process_use(front, sources, moto_url, process_profile, mark, seen["access_key_id"],
                      seen["arn"])
    # The SDK's own GetCallerIdentity went out signed with the locked key, and it read the
    # set's Expiration (to the second: credential_process carries RFC 3339).
    signers = [c["signer"] for c in front.calls(mark, "GetCallerIdentity")
               if "aws-sdk-rust" in c["user_agent"].lower()]
    assert signers == [seen["access_key_id"]], (signers, front.calls(mark, "GetCallerIdentity"))
    issued = front.assumes(mark)[0]["issued"]
    assert seen["expiry"] is not None
    assert abs(seen["expiry"] - parse_time(issued["Expiration"]).timestamp()) < 1.0, \
        (seen["expiry"], issued["Expiration"])


JS_PROCESS_SCRIPT = """
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const paths = process.env.E2E_JS_PATHS.split(":").filter(Boolean);
const { fromProcess } = require(require.resolve("@aws-sdk/credential-provider-process", { paths }));
try {
  const c = await fromProcess()();  // the profile from AWS_PROFILE, as the default chain does
  process.stdout.write(JSON.stringify({
    accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey,
    sessionToken: c.sessionToken,
    expiration: c.expiration ? c.expiration.toISOString() : null,
  }) + "\\n");
} catch (error) {
  process.stderr.write(`fromProcess: ${error?.name}: ${error?.message}\\n`);
  process.exit(1);
}
"""


def js_process_paths() -> list[str]:
    candidates = [JS_DIR]
    if os.environ.get("E2E_NODE_MODULES_DIR"):
        candidates.append(Path(os.environ["E2E_NODE_MODULES_DIR"]))
    return [str(d) for d in candidates
            if (d / "node_modules" / JS_PROCESS_PACKAGE / "package.json").exists()]


def test_js_sdk_v3_credential_process(front, sources, moto_url, process_profile, tmp_path):
    paths = js_process_paths()
    if not paths:
        pytest.fail(f"{JS_PROCESS_PACKAGE} is not installed in tests/js (tests/setup.sh runs "
                    "npm ci there) nor in E2E_NODE_MODULES_DIR")
    script = tmp_path / "from-process.mjs"
    script.write_text(JS_PROCESS_SCRIPT)
    env = dict(process_profile["env"], AWS_PROFILE="locked", E2E_JS_PATHS=":".join(paths))
    mark = front.mark()
    result = subprocess.run(["node", str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    creds = json.loads(result.stdout)
    arn = identity(moto_url, {"AccessKeyId": creds["accessKeyId"],
                              "SecretAccessKey": creds["secretAccessKey"],
                              "SessionToken": creds["sessionToken"]})["Arn"]
    check_process_use(front, sources, moto_url, process_profile, mark, creds["accessKeyId"], arn)
    issued = front.assumes(mark)[0]["issued"]
    assert (creds["secretAccessKey"], creds["sessionToken"]) == \
        (issued["SecretAccessKey"], issued["SessionToken"])
    # The SDK read Expiration: the same instant credlock printed (to the second).
    assert creds["expiration"] is not None
    assert abs((parse_time(creds["expiration"]) - parse_time(issued["Expiration"]))
               .total_seconds()) < 1.0, (creds["expiration"], issued["Expiration"])


# --------------------------------------------------------------------------------------------
# 2. The role from the caller
# --------------------------------------------------------------------------------------------

def test_boot_provider_off_an_instance_is_told_account_role_and_host(credlock, front, sources,
                                                                     write_config):
    """Off EC2 there is no instance identity document: the boot provider's POST carries what is
    known (account, Region, role, host) and nothing claiming an instance; the environment it
    answers is the one the AssumeRole's session policy allows."""
    import http.server
    import threading

    bodies: list[dict] = []

    class Provider(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", "0"))
            bodies.append(json.loads(self.rfile.read(length)))
            answer = json.dumps({"ipv4": ["198.51.100.0/24"], "vpcs": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/environment"
        config = write_config(extra=f'\n[discovery.boot_provider]\nenabled = true\nurl = "{url}"\n')
        role = unique("e2e-boot-")
        mark = front.mark()
        run = credlock("--config", str(config), "--format", "json", "--no-cache",
                       "--role-arn", role_arn(role), creds=sources["user"])
        assert run.rc == 0, run
    finally:
        server.shutdown()
        server.server_close()
    assert len(bodies) == 1, bodies
    sent = bodies[0]
    assert set(sent) == {"account_id", "region", "role_arn", "host"}, sent
    assert sent["account_id"] == "123456789012" and sent["region"] == REGION, sent
    assert sent["role_arn"] == role_arn(role), sent
    assert SESSION == f"credlock-cli-{sent['host']}", (SESSION, sent)
    assumes = front.assumes(mark)
    assert len(assumes) == 1, assumes
    # The provider's network and the static one are both in the lock.
    assert "198.51.100.0/24" in assumes[0]["policy"], assumes[0]["policy"]
    assert "10.1.2.0/24" in assumes[0]["policy"], assumes[0]["policy"]


def test_role_from_assumed_role_session(credlock, front, sources, moto_url, write_config):
    mark = front.mark()
    run = credlock("--config", str(write_config()), "--format", "json", "--no-cache",
                   creds=sources["session"])
    printed = run.json()
    assert printed["RoleArn"] == role_arn("e2e-ci-role"), printed
    assumes = front.assumes(mark)
    assert len(assumes) == 1, assumes
    call = assumes[0]
    assert call["role_arn"] == role_arn("e2e-ci-role"), call
    assert call["session"] == SESSION, call
    assert call["signer"] == sources["session"]["AWS_ACCESS_KEY_ID"], call
    assert call["token"] == sources["session"]["AWS_SESSION_TOKEN"], call
    assert_issued(printed, call)
    assert identity(moto_url, printed)["Arn"] == assumed_arn("e2e-ci-role")
    # GetCallerIdentity was asked with the source session, before the AssumeRole.
    callers = front.calls(mark, "GetCallerIdentity")
    assert [c["signer"] for c in callers] == [sources["session"]["AWS_ACCESS_KEY_ID"]], callers


def test_iam_user_caller_needs_role_arn(credlock, front, sources, write_config):
    mark = front.mark()
    run = credlock("--config", str(write_config()), "--no-cache", creds=sources["user"])
    line = assert_error_line(run, sources["user"]["AWS_SECRET_ACCESS_KEY"])
    assert "--role-arn" in line, line
    assert front.assumes(mark) == [], "an AssumeRole was made for an IAM user caller"


# --------------------------------------------------------------------------------------------
# 3. Formats
# --------------------------------------------------------------------------------------------

def test_format_credential_process(credlock, front, sources, moto_url, write_config):
    role = unique("e2e-format-")
    mark = front.mark()
    run = credlock("--config", str(write_config()), "--role-arn", role_arn(role),
                   "--no-cache", creds=sources["user"])  # the default format
    assert run.rc == 0, run
    assert run.stdout.count("\n") == 1 and run.stdout.endswith("\n"), run.stdout
    doc = json.loads(run.stdout)
    assert doc["Version"] == 1 and isinstance(doc["Version"], int), doc
    assert set(doc) >= {"Version", *SET_KEYS}, sorted(doc)
    for key in SET_KEYS:
        assert isinstance(doc[key], str) and doc[key], key
    assert RFC3339.fullmatch(doc["Expiration"]), doc["Expiration"]
    expires = parse_time(doc["Expiration"])
    now = datetime.datetime.now(datetime.timezone.utc)
    assert now + datetime.timedelta(minutes=50) < expires <= now + datetime.timedelta(hours=1,
                                                                                      minutes=1)
    assumes = front.assumes(mark)
    assert len(assumes) == 1, assumes
    assert_issued(doc, assumes[0])
    assert identity(moto_url, doc)["Arn"] == assumed_arn(role)
    assert sources["user"]["AWS_SECRET_ACCESS_KEY"] not in run.stdout + run.stderr


def test_format_env_evaluated_by_sh(credlock, front, sources, moto_url, write_config, tmp_path):
    role = unique("e2e-format-")
    mark = front.mark()
    run = credlock("--config", str(write_config()), "--role-arn", role_arn(role),
                   "--no-cache", "--format", "env", creds=sources["user"])
    assert run.rc == 0, run
    exports = tmp_path / "exports.sh"
    exports.write_text(run.stdout)
    shell = subprocess.run(["/bin/sh", "-c", '. "$1" && exec env', "sh", str(exports)],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    assert shell.returncode == 0, shell.stderr
    exported = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_CREDENTIAL_EXPIRATION")
    missing = [n for n in names if n not in exported]
    assert not missing, f"not exported by sh: {missing}; output was {run.stdout!r}"
    printed = dict(zip(SET_KEYS, (exported[n] for n in names)))
    assumes = front.assumes(mark)
    assert len(assumes) == 1, assumes
    assert_issued(printed, assumes[0])
    assert identity(moto_url, printed)["Arn"] == assumed_arn(role)


def test_format_json_has_role_and_source(credlock, front, sources, write_config, tmp_path):
    role = unique("e2e-format-")
    mark = front.mark()
    args = ("--config", str(write_config()), "--role-arn", role_arn(role), "--format", "json",
            "--cache-dir", str(tmp_path / "cache"))
    first = credlock(*args, creds=sources["user"]).json()
    assert first["RoleArn"] == role_arn(role), first
    assert first["Source"] == "sts", first
    assumes = front.assumes(mark)
    assert len(assumes) == 1, assumes
    assert_issued(first, assumes[0])
    second = credlock(*args, creds=sources["user"]).json()
    assert second["Source"] == "cache", second
    assert second["RoleArn"] == role_arn(role), second


# --------------------------------------------------------------------------------------------
# 4. The cache
# --------------------------------------------------------------------------------------------

def test_cache_reused_one_assume_role_and_file_modes(credlock, front, sources, write_config,
                                                     tmp_path):
    role = unique("e2e-cache-")
    cache = tmp_path / "cache"  # does not exist yet: credlock makes it
    args = ("--config", str(write_config()), "--role-arn", role_arn(role), "--format", "json",
            "--cache-dir", str(cache))
    mark = front.mark()
    first = credlock(*args, creds=sources["user"]).json()
    second = credlock(*args, creds=sources["user"]).json()
    third = json.loads(credlock(*args[:-4], "--cache-dir", str(cache),
                                creds=sources["user"]).stdout)  # credential-process format
    assert first["Source"] == "sts" and second["Source"] == "cache", (first, second)
    for later in (second, third):
        for key in SET_KEYS:
            assert later[key] == first[key], f"{key} differs on a cached call"
    assumes = front.assumes(mark)
    assert len(assumes) == 1, f"a cached set was assumed again: {len(assumes)} AssumeRole"
    # On disk: a 0700 directory of ours holding one 0600 regular file of ours, nothing else.
    info = os.lstat(cache)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid(), info
    assert mode(cache) == 0o700, oct(mode(cache))
    files = cache_files(cache)
    assert len(files) == 1, files
    finfo = os.lstat(files[0])
    assert stat.S_ISREG(finfo.st_mode) and finfo.st_uid == os.getuid(), finfo
    assert mode(files[0]) == 0o600, oct(mode(files[0]))


def test_cache_default_dir_is_xdg_runtime_dir(credlock, front, sources, write_config, tmp_path):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    env = cli_env(tmp_path, front.url, sources["user"], XDG_RUNTIME_DIR=str(runtime))
    args = ("--config", str(write_config()), "--role-arn", role_arn(unique("e2e-xdg-")),
            "--format", "json")
    mark = front.mark()
    first = credlock(*args, env=env).json()
    second = credlock(*args, env=env).json()
    assert (first["Source"], second["Source"]) == ("sts", "cache"), (first, second)
    assert len(front.assumes(mark)) == 1
    cache = runtime / "credlock"
    assert mode(cache) == 0o700, oct(mode(cache))
    files = cache_files(cache)
    assert len(files) == 1 and mode(files[0]) == 0o600, [(f, oct(mode(f))) for f in files]


def test_cache_not_reused_within_serve_margin(credlock, front, sources, write_config, tmp_path):
    """A set with no more than serve_margin left is assumed again (the front makes STS issue
    sets with SERVE_MARGIN + SHORT_EXTRA seconds left)."""
    role = unique(SHORT_PREFIX)
    args = ("--config", str(write_config()), "--role-arn", role_arn(role), "--format", "json",
            "--cache-dir", str(tmp_path / "cache"))
    mark = front.mark()
    first = credlock(*args, creds=sources["user"]).json()
    expires = parse_time(first["Expiration"]).timestamp()
    second = credlock(*args, creds=sources["user"]).json()
    assert time.time() < expires - SERVE_MARGIN - 0.5, "too slow to test the margin"
    assert second["Source"] == "cache" and second["AccessKeyId"] == first["AccessKeyId"], \
        f"a set with more than the margin left was not reused: {second['Source']}"
    time.sleep(max(0.0, expires - SERVE_MARGIN - time.time()) + 1.0)
    third = credlock(*args, creds=sources["user"]).json()
    assert third["Source"] == "sts", \
        f"a cached set with less than serve_margin ({SERVE_MARGIN} s) left was printed"
    assert third["AccessKeyId"] != first["AccessKeyId"]
    assert len(front.assumes(mark)) == 2


@pytest.mark.parametrize("kind", ["mode-0777", "owned-by-nobody", "symlink"])
def test_unsafe_cache_dir_refused(credlock, sources, write_config, tmp_path, kind):
    cache = tmp_path / "cache"
    if kind == "mode-0777":
        cache.mkdir()
        os.chmod(cache, 0o777)
    elif kind == "owned-by-nobody":
        cache.mkdir(mode=0o700)
        nobody = pwd.getpwnam("nobody")
        os.chown(cache, nobody.pw_uid, nobody.pw_gid)
    else:
        target = tmp_path / "real-cache"
        target.mkdir(mode=0o700)
        cache.symlink_to(target)
    run = credlock("--config", str(write_config()), "--role-arn",
                   role_arn(unique("e2e-unsafe-")), "--cache-dir", str(cache),
                   creds=sources["user"])
    line = assert_error_line(run, sources["user"]["AWS_SECRET_ACCESS_KEY"])
    assert str(cache) in line, f"the message does not name the directory: {line}"
    assert "0700" in line or "mode" in line or "owner" in line, line
    if kind == "symlink":
        assert cache_files(tmp_path / "real-cache") == [], "wrote through the symlink"
    elif kind == "mode-0777":
        assert cache_files(cache) == [], "wrote into a world-writable cache directory"


def test_cache_file_others_can_read_is_ignored_and_replaced(credlock, front, sources,
                                                            write_config, tmp_path):
    cache = tmp_path / "cache"
    args = ("--config", str(write_config()), "--role-arn", role_arn(unique("e2e-tamper-")),
            "--format", "json", "--cache-dir", str(cache))
    first = credlock(*args, creds=sources["user"]).json()
    [file] = cache_files(cache)
    os.chmod(file, 0o644)
    mark = front.mark()
    second = credlock(*args, creds=sources["user"]).json()
    assert second["Source"] == "sts", "a cache file others can read was used"
    assert second["AccessKeyId"] != first["AccessKeyId"]
    assert len(front.assumes(mark)) == 1
    files = cache_files(cache)
    assert files == [file] and mode(file) == 0o600, [(f, oct(mode(f))) for f in files]


def test_no_cache_assumes_every_time(credlock, front, sources, write_config, tmp_path):
    cache = tmp_path / "cache"
    args = ("--config", str(write_config()), "--role-arn", role_arn(unique("e2e-nocache-")),
            "--format", "json", "--cache-dir", str(cache), "--no-cache")
    mark = front.mark()
    runs = [credlock(*args, creds=sources["user"]).json() for _ in range(2)]
    assert [r["Source"] for r in runs] == ["sts", "sts"], runs
    assert runs[0]["AccessKeyId"] != runs[1]["AccessKeyId"]
    assumes = front.assumes(mark)
    assert len(assumes) == 2, assumes
    for printed, call in zip(runs, assumes):
        assert_issued(printed, call)
    assert not cache.exists() or cache_files(cache) == [], "--no-cache wrote the cache"


def test_other_environment_other_cache_file(credlock, front, sources, write_config, tmp_path):
    cache = tmp_path / "cache"
    role = role_arn(unique("e2e-env-"))
    config_a = write_config(ipv4=["10.1.2.0/24"], name="a.toml")
    config_b = write_config(ipv4=["10.9.8.0/24"], name="b.toml")

    def get(config: Path) -> dict:
        return credlock("--config", str(config), "--role-arn", role, "--format", "json",
                        "--cache-dir", str(cache), creds=sources["user"]).json()

    mark = front.mark()
    a1, b1, a2, b2 = get(config_a), get(config_b), get(config_a), get(config_b)
    assert (a1["Source"], b1["Source"]) == ("sts", "sts"), \
        "a set locked to another environment was printed from the cache"
    assert a1["AccessKeyId"] != b1["AccessKeyId"]
    assert (a2["Source"], a2["AccessKeyId"]) == ("cache", a1["AccessKeyId"]), a2
    assert (b2["Source"], b2["AccessKeyId"]) == ("cache", b1["AccessKeyId"]), b2
    assert len(cache_files(cache)) == 2, cache_files(cache)
    assumes = front.assumes(mark)
    assert len(assumes) == 2, assumes
    # Each set is locked to its own environment (the session policy STS received).
    policy_a, policy_b = assumes[0]["policy"], assumes[1]["policy"]
    assert "10.1.2.0/24" in policy_a and "10.9.8.0/24" not in policy_a, policy_a
    assert "10.9.8.0/24" in policy_b and "10.1.2.0/24" not in policy_b, policy_b


# --------------------------------------------------------------------------------------------
# 5. A credlock daemon on this host
# --------------------------------------------------------------------------------------------

def daemon_config(stack) -> Path:
    return stack.workdir / "credlock.toml"


def test_running_daemon_set_is_printed(stack, credlock, tmp_path):
    account = stack.state()["account_id"]
    locked_role = f"arn:aws:iam::{account}:role/{stack.role}"
    env = cli_env(tmp_path, "http://127.0.0.1:9", None)  # no source credentials at all
    run = credlock("--config", str(daemon_config(stack)), "--format", "json",
                   "--cache-dir", str(tmp_path / "cache"), env=env)
    printed = run.json()
    stack.assert_no_raw(run.stdout.encode(), "in credlock credentials' output")
    assert printed["Source"] == "credlock", printed
    assert printed["RoleArn"] == locked_role, printed
    served = stack.locked()  # asked with IMDSv2 on the daemon's own listener
    assert (printed["AccessKeyId"], printed["SecretAccessKey"], printed["SessionToken"]) == \
        (served["AccessKeyId"], served["SecretAccessKey"], served["Token"])
    assert parse_time(printed["Expiration"]) == parse_time(served["Expiration"])
    state = stack.state()
    assert identity(stack.moto_url, printed)["Arn"] == \
        f"arn:aws:sts::{account}:assumed-role/{state['role']}/{state['instance_id']}"
    # The same role asked for by name, in the credential_process format.
    same = credlock("--config", str(daemon_config(stack)), "--role-arn", locked_role,
                    "--cache-dir", str(tmp_path / "cache"), env=env)
    assert same.rc == 0, same
    doc = json.loads(same.stdout)
    assert doc["Version"] == 1 and doc["AccessKeyId"] == served["AccessKeyId"], doc


def test_running_daemon_other_role_refused(stack, credlock, tmp_path):
    account = stack.state()["account_id"]
    locked_role = f"arn:aws:iam::{account}:role/{stack.role}"
    env = cli_env(tmp_path, "http://127.0.0.1:9", None)
    run = credlock("--config", str(daemon_config(stack)), "--role-arn",
                   f"arn:aws:iam::{account}:role/some-other", "--cache-dir",
                   str(tmp_path / "cache"), env=env)
    served = stack.locked()
    line = assert_error_line(run, served["SecretAccessKey"], served["Token"],
                             *stack.raw_secret_values())
    assert locked_role in line, f"the error does not name the locked role: {line}"


FAKE_LISTENER = r"""
import datetime, http.server, json, sys
port, role, key, secret, token = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
now = datetime.datetime.now(datetime.timezone.utc)
fmt = "%Y-%m-%dT%H:%M:%SZ"
CREDS = json.dumps({"Code": "Success", "LastUpdated": now.strftime(fmt), "Type": "AWS-HMAC",
                    "AccessKeyId": key, "SecretAccessKey": secret, "Token": token,
                    "Expiration": (now + datetime.timedelta(hours=1)).strftime(fmt)})
STATUS = json.dumps({"ready": True, "lock": {"role_arn": "arn:aws:iam::123456789012:role/" + role}})
PAGES = {"/status": STATUS, "/readyz": "ready", "/healthz": "ok",
         "/latest/meta-data/iam/security-credentials/": role,
         "/latest/meta-data/iam/security-credentials": role,
         "/latest/meta-data/iam/security-credentials/" + role: CREDS}

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, status, body, extra=()):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        print(self.command, self.path, flush=True)
        page = PAGES.get(self.path)
        self.reply(200, page) if page is not None else self.reply(404, "not found")
    def do_PUT(self):
        print(self.command, self.path, flush=True)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply(200, "fake-token", [("X-aws-ec2-metadata-token-ttl-seconds", "300")])

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
print("ready", flush=True)
server.serve_forever()
"""

FAKE_KEY = "ASIAFAKEINJECTED0001"
FAKE_SECRET = "fakeInjectedSecretAccessKeyDoNotUse000000"
FAKE_TOKEN = "fakeInjectedSessionTokenDoNotUse"


class FakeListener:
    """FAKE_LISTENER on a free loopback port, run as `user` (None: as this process's user)."""

    def __init__(self, user: str | None):
        self.addr = f"127.0.0.1:{e2e.free_port()}"
        kwargs = {"user": user, "group": "nogroup"} if user else {}
        self.popen = subprocess.Popen(
            ["/usr/bin/python3", "-c", FAKE_LISTENER, self.addr.rsplit(":", 1)[1],
             "fake-role", FAKE_KEY, FAKE_SECRET, FAKE_TOKEN],
            cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        deadline = time.monotonic() + e2e.READY_TIMEOUT
        line = b""
        while time.monotonic() < deadline and self.popen.poll() is None:
            ready, _, _ = select.select([self.popen.stdout], [], [], 0.2)
            if ready:
                line = self.popen.stdout.readline()
                break
        if line.strip() != b"ready":
            self.stop()
            pytest.fail(f"fake listener did not start: {line!r}")

    def stop(self) -> list[str]:
        """Stops it; the requests it received ("METHOD PATH")."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        text = self.popen.stdout.read().decode(errors="replace")
        self.popen.stdout.close()
        return [line for line in text.splitlines() if line.strip()]


def listener_uid(addr: str) -> int | None:
    """The uid holding a LISTEN socket on addr, from /proc/net/tcp (ground truth for the
    premise that the fake is held by whom we meant)."""
    host, port = e2e.split_addr(addr)
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == wanted and cols[3] == "0A":
            return int(cols[7])
    return None


@pytest.mark.parametrize("admin_user,listen_user", [
    ("nobody", "nobody"), ("root", "nobody"), ("nobody", "root"), ("root", "root")],
    ids=["both-nobody", "imds-nobody", "admin-nobody", "control-both-root"])
def test_listener_of_another_user_refused(credlock, sources, write_config, tmp_path,
                                          admin_user, listen_user):
    admin = FakeListener(None if admin_user == "root" else admin_user)
    imds = FakeListener(None if listen_user == "root" else listen_user)
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
        for fake, user in ((admin, admin_user), (imds, listen_user)):
            assert listener_uid(fake.addr) == (0 if user == "root" else nobody), fake.addr
        config = write_config(listen=imds.addr, admin=admin.addr)
        run = credlock("--config", str(config), "--format", "json", "--no-cache",
                       creds=sources["user"])
    finally:
        admin_requests, imds_requests = admin.stop(), imds.stop()
    if admin_user == listen_user == "root":
        # Control: root-held listeners are believed, so the fake's set would be printed.
        printed = run.json()
        assert (printed["Source"], printed["AccessKeyId"]) == ("credlock", FAKE_KEY), printed
        return
    line = assert_error_line(run, FAKE_KEY, FAKE_SECRET, FAKE_TOKEN,
                             sources["user"]["AWS_SECRET_ACCESS_KEY"])
    assert "root" in line and ("user" in line or "owner" in line), \
        f"the error does not say who may hold the listener: {line}"
    offending = imds.addr if listen_user == "nobody" else admin.addr
    assert offending in line, f"the error does not name the listener {offending}: {line}"
    asked = [r for r in admin_requests + imds_requests if "security-credentials" in r]
    assert asked == [], f"credentials were requested from a listener of nobody's: {asked}"


# --------------------------------------------------------------------------------------------
# 6. Errors print no secret
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["user", "session"])
def test_assume_role_refused_one_line_no_secret(credlock, front, sources, write_config, source):
    creds = sources[source]
    role = role_arn(unique(DENY_PREFIX))
    mark = front.mark()
    run = credlock("--config", str(write_config()), "--role-arn", role, "--no-cache",
                   creds=creds)
    secrets = [creds["AWS_SECRET_ACCESS_KEY"], creds.get("AWS_SESSION_TOKEN", "")]
    line = assert_error_line(run, *[s for s in secrets if s])
    assert creds["AWS_ACCESS_KEY_ID"] not in line, "the source AccessKeyId was printed"
    assert role in line or "AccessDenied" in line, line
    denied = front.assumes(mark)
    assert denied and all(c["role_arn"] == role and c["status"] == 403 for c in denied), denied


def test_sts_unreachable_one_line_no_secret(credlock, sources, write_config, reserved,
                                            tmp_path):
    creds = sources["session"]
    env = cli_env(tmp_path, f"http://{reserved()}", creds)
    run = credlock("--config", str(write_config()), "--role-arn", role_arn("e2e-any"),
                   "--no-cache", env=env)
    assert_error_line(run, creds["AWS_SECRET_ACCESS_KEY"], creds["AWS_SESSION_TOKEN"])


def test_invalid_config_exit_78(credlock, sources, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[lock]\nsession_duration_seconds = 60\n")
    run = credlock("--config", str(config), "--role-arn", role_arn("e2e-any"), "--no-cache",
                   creds=sources["session"])
    assert run.rc == 78, run
    assert run.stdout == "", run
    for value in (sources["session"]["AWS_SECRET_ACCESS_KEY"],
                  sources["session"]["AWS_SESSION_TOKEN"]):
        assert value not in run.stderr
