"""Real AWS SDK clients resolve their instance-role credentials through credlock.

Each client is pointed at credlock with AWS_EC2_METADATA_SERVICE_ENDPOINT and has no other
credential source. The assertions compare against the peers, never against credlock's code:
  * the emulator's GET /state holds the raw IMDSv1/IMDSv2 sets, which must not come out;
  * the emulator's GET /requests shows what the SDK asked for (relayed by credlock);
  * moto (standing in for STS) accepts the credentials and says whose they are: a session of
    the instance role named after the instance id (raw IMDS credentials are unknown to moto
    and come back as its default "user/moto" identity; see the control test below).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import botocore.session

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
JS_DIR = REPO / "tests" / "js"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CLIENT_TIMEOUT = 60


def assumed_role_arn(stack) -> str:
    state = stack.state()
    return (f"arn:aws:sts::{state['account_id']}:assumed-role/"
            f"{state['role']}/{state['instance_id']}")


def imds_only_boto3_session(monkeypatch, env: dict) -> boto3.Session:
    """A boto3 session whose credential chain is botocore's InstanceMetadataProvider only,
    configured purely from the environment like an application on EC2."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith("AWS_") or name == "HOME":
            monkeypatch.setenv(name, value)
    core = botocore.session.Session()
    resolver = core.get_component("credential_provider")
    resolver.providers = [resolver.get_provider("iam-role")]
    return boto3.Session(botocore_session=core, region_name="us-east-1")


def requests_since(stack, since: float) -> list[dict]:
    """Upstream log entries from `since` (time.time(), same host clock) on. By time, not by
    index: the emulator keeps only the last 1000 requests."""
    return [r for r in stack.requests_log() if r["time"] >= since - 0.001]


def sts_identity(stack, access_key: str, secret: str, token: str) -> dict:
    sts = boto3.client("sts", endpoint_url=stack.moto_url, region_name="us-east-1",
                       aws_access_key_id=access_key, aws_secret_access_key=secret,
                       aws_session_token=token)
    return sts.get_caller_identity()


def assert_locked_not_raw(stack, access_key: str, secret: str, token: str) -> None:
    locked = stack.locked()
    raw = stack.raw_role_sets()
    assert (access_key, secret, token) == (
        locked["AccessKeyId"], locked["SecretAccessKey"], locked["Token"]), \
        "the SDK did not get the credential set credlock serves"
    for name, fields in raw.items():
        assert access_key != fields["AccessKeyId"], f"SDK got the raw IMDS{name} AccessKeyId"
        assert secret != fields["SecretAccessKey"], f"SDK got the raw IMDS{name} secret"
        assert token != fields["Token"], f"SDK got the raw IMDS{name} token"


# --------------------------------------------------------------------------------------------
# boto3 / botocore
# --------------------------------------------------------------------------------------------

def test_boto3_resolves_locked_credentials_and_uses_them(stack, sdk_env, monkeypatch):
    since = time.time()
    session = imds_only_boto3_session(monkeypatch, sdk_env(stack))
    credentials = session.get_credentials()
    assert credentials is not None, "botocore found no credentials through credlock"
    assert credentials.method == "iam-role"
    frozen = credentials.get_frozen_credentials()
    assert_locked_not_raw(stack, frozen.access_key, frozen.secret_key, frozen.token)

    # botocore went the IMDSv2 way through credlock: token PUT, listing, role document.
    botocore_requests = [r for r in requests_since(stack, since) if any(
        k.lower() == "user-agent" and "botocore/" in v.lower() for k, v in r["headers"])]
    paths = [(r["method"], r["path"]) for r in botocore_requests]
    assert ("PUT", "/latest/api/token") in paths, paths
    assert ("GET", f"/latest/meta-data/iam/security-credentials/{stack.role}") in paths, paths
    role_get = next(r for r in botocore_requests
                    if r["path"] == f"/latest/meta-data/iam/security-credentials/{stack.role}")
    assert any(k.lower() == TOKEN_HEADER.lower() for k, _ in role_get["headers"]), \
        "botocore's credential GET reached the upstream without its IMDSv2 token"

    # Now USE them: STS (moto) knows them as the instance role's session named after the instance.
    sts = session.client("sts", endpoint_url=stack.moto_url)
    identity = sts.get_caller_identity()
    assert identity["Arn"] == assumed_role_arn(stack), identity
    assert identity["UserId"].endswith(":" + stack.state()["instance_id"]), identity


def test_control_raw_imds_credentials_are_not_an_assumed_role_session(stack):
    """Control for the ARN assertions: moto does not recognise the raw IMDS credentials as an
    assumed-role session, so an assumed-role ARN really proves the locked set was used."""
    for raw in stack.raw_role_sets().values():
        identity = sts_identity(stack, raw["AccessKeyId"], raw["SecretAccessKey"], raw["Token"])
        assert ":assumed-role/" not in identity["Arn"], identity


def test_boto3_with_tokens_required(stack_required, sdk_env, monkeypatch):
    stack = stack_required
    session = imds_only_boto3_session(monkeypatch, sdk_env(stack))
    credentials = session.get_credentials()
    assert credentials is not None, "botocore found no credentials through credlock (IMDSv2 only)"
    frozen = credentials.get_frozen_credentials()
    assert_locked_not_raw(stack, frozen.access_key, frozen.secret_key, frozen.token)
    identity = session.client("sts", endpoint_url=stack.moto_url).get_caller_identity()
    assert identity["Arn"] == assumed_role_arn(stack), identity


def test_tokens_required_tokenless_and_bogus_token_get_upstream_401(stack_required):
    stack = stack_required
    path = f"/latest/meta-data/iam/security-credentials/{stack.role}"
    for headers in ({}, {TOKEN_HEADER: "AQAEAbogusbogusbogusbogusbogusbogusbogusbogusbogus=="}):
        direct = stack.direct("GET", path, headers)
        via = stack.via("GET", path, headers)
        # The protocol (Amazon EC2 User Guide, "How Instance Metadata Service Version 2 works":
        # with token usage required, no or an invalid token gets 401).
        assert direct.status == 401, direct
        assert via.status == 401, f"credlock answered {via!r} where IMDS says 401"
        assert via.body == direct.body, "credlock did not relay the upstream's 401 page"
        assert b"AccessKeyId" not in via.body and b"SecretAccessKey" not in via.body
        stack.assert_no_raw(via.body, f"on a 401 for {headers or 'no token'}")
        # And the same for the extended path and the listing.
        for other in (f"/latest/meta-data/iam/security-credentials-extended/{stack.role}",
                      "/latest/meta-data/iam/security-credentials/"):
            reply = stack.via("GET", other, headers)
            assert reply.status == 401, (other, reply)
            assert b"AccessKeyId" not in reply.body


# --------------------------------------------------------------------------------------------
# AWS CLI v1
# --------------------------------------------------------------------------------------------

def test_aws_cli_v1_get_caller_identity(stack, sdk_env):
    aws = VENV_BIN / "aws"
    assert aws.exists(), f"{aws} missing (awscli is in the venv's requirements)"
    since = time.time()
    result = subprocess.run(
        [str(aws), "sts", "get-caller-identity", "--endpoint-url", stack.moto_url,
         "--output", "json"],
        env=sdk_env(stack), capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"aws cli failed:\n{result.stdout}\n{result.stderr}"
    identity = json.loads(result.stdout)
    assert identity["Arn"] == assumed_role_arn(stack), identity
    # The CLI's IMDS traffic went through credlock (its User-Agent names the CLI).
    cli_requests = [r for r in requests_since(stack, since) if any(
        k.lower() == "user-agent" and v.startswith("aws-cli/") for k, v in r["headers"])]
    assert any(r["path"] == f"/latest/meta-data/iam/security-credentials/{stack.role}"
               for r in cli_requests), [r["path"] for r in cli_requests]


# --------------------------------------------------------------------------------------------
# AWS SDK for JavaScript v3 (@smithy/credential-provider-imds)
# --------------------------------------------------------------------------------------------

def test_js_sdk_v3_resolves_locked_credentials(stack, sdk_env, node_project):
    since = time.time()
    result = subprocess.run(["node", "imds-credentials.mjs"], cwd=JS_DIR, env=sdk_env(stack),
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"node failed:\n{result.stdout}\n{result.stderr}"
    credentials = json.loads(result.stdout)
    assert_locked_not_raw(stack, credentials["accessKeyId"], credentials["secretAccessKey"],
                          credentials["sessionToken"])
    assert credentials["accessKeyId"] == stack.locked()["AccessKeyId"]

    # What the SDK asked for, as relayed by credlock to the upstream.
    role = stack.role
    paths = [r["path"] for r in requests_since(stack, since)
             if r["method"] == "GET" and "/meta-data/iam/security-credentials" in r["path"]]
    legacy = f"/latest/meta-data/iam/security-credentials/{role}"
    extended = f"/latest/meta-data/iam/security-credentials-extended/{role}"
    assert legacy in paths or extended in paths, \
        f"the JS SDK's credential request never reached the upstream through credlock: {paths}"
    if extended in paths:
        # SDKs with IMDS credentials provider v2.1 (extended first) also get AccountId.
        assert credentials["accountId"] == stack.state()["account_id"], credentials
    # And the credentials work: STS knows them as the instance role's session.
    identity = sts_identity(stack, credentials["accessKeyId"], credentials["secretAccessKey"],
                            credentials["sessionToken"])
    assert identity["Arn"] == assumed_role_arn(stack), identity
    # NOTE: @smithy/credential-provider-imds as published (4.5.2, and every 4.x checked) uses
    # only the legacy path; the extended-first code (smithy-typescript PR #1621) was never
    # released. The extended path is exercised at the protocol level in test_proxy_behaviour.


def test_extended_path_through_credlock_matches_legacy_plus_account_id(stack):
    """What an extended-first SDK (Java v2, Ruby, PHP, Kotlin, Swift) receives: the locked set,
    plus the upstream's AccountId, never the raw set."""
    token = stack.token(stack.proxy)
    role = stack.role
    legacy = stack.via("GET", f"/latest/meta-data/iam/security-credentials/{role}",
                       {TOKEN_HEADER: token})
    extended = stack.via("GET", f"/latest/meta-data/iam/security-credentials-extended/{role}",
                         {TOKEN_HEADER: token})
    assert legacy.status == extended.status == 200, (legacy, extended)
    stack.assert_no_raw(extended.body, "on the extended path")
    doc = extended.json()
    for key in ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"):
        assert doc[key] == legacy.json()[key], key
    assert doc.get("AccountId") == stack.state()["account_id"]
