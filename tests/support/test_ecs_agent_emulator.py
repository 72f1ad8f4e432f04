"""Tests of the ECS agent credential-endpoint stand-in: each rule its module docstring claims,
with the AWS document or amazon-ecs-agent source file it comes from.

The stand-in runs as a real subprocess, driven over real sockets (standin_testlib.py); one
shared stand-in serves most tests and is reset before each one (conftest.py).

    .venv/bin/python -m pytest -q tests/support/test_ecs_agent_emulator.py
"""

from __future__ import annotations

import http.client
import json
import re
import time

import pytest

from standin_testlib import (StandIn, assert_sigterm_and_sigint_exit_zero,
                             ipv6_loopback_available, loopback_listeners, running)

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
KEYS = ["RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"]


class Emulator(StandIn):
    script = "ecs_agent_emulator.py"

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def add(self, **spec) -> dict:
        return self.control_ok("/credentials", spec)


@pytest.fixture(scope="module")
def emu():
    yield from running(Emulator, *loopback_listeners(), "--control", "127.0.0.1:0")


def error_body(code: str, message: str, status: int) -> bytes:
    # [test] credentialsErrorResponseJSON = {"code":"%s","message":"%s","HTTPErrorCode":%d}
    return f'{{"code":"{code}","message":"{message}","HTTPErrorCode":{status}}}'.encode()


# ------------------------------------------------------------------------------------------
# Start-up, CLI, shutdown (same conventions as imds_emulator.py)
# ------------------------------------------------------------------------------------------

def test_prints_listeners_then_control(emu):
    assert emu.lines[0].startswith("listening 127.0.0.1:")
    assert emu.lines[-1].startswith("control 127.0.0.1:")
    assert all(port > 0 for _, port in emu.listeners)


def test_sigterm_and_sigint_exit_zero():
    assert_sigterm_and_sigint_exit_zero(Emulator)


def test_bad_listen_address_is_a_usage_error():
    assert Emulator.run("--listen", "127.0.0.1").returncode == 2


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_listener_serves_the_same_credentials(emu):
    entry = emu.add()
    status, _, body = emu.get(entry["relative_uri"], listener=1)
    assert status == 200 and json.loads(body) == entry["document"]


# ------------------------------------------------------------------------------------------
# Happy path: [ECS-dev] "IAM Roles for Tasks", [ECS-bp], [mgr], [test]
# ------------------------------------------------------------------------------------------

def test_v2_credentials_exact_document(emu):
    entry = emu.add(role_arn="arn:aws:iam::123456789012:role/app")
    assert entry["relative_uri"] == "/v2/credentials/" + entry["id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", entry["id"])
    status, headers, body = emu.get(entry["relative_uri"])
    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = entry["document"]
    # [test] credentialsResponseJSON: compact, this key order, no newline.
    assert body.decode() == (
        f'{{"RoleArn":"{doc["RoleArn"]}","AccessKeyId":"{doc["AccessKeyId"]}",'
        f'"SecretAccessKey":"{doc["SecretAccessKey"]}","Token":"{doc["Token"]}",'
        f'"Expiration":"{doc["Expiration"]}"}}')
    assert list(json.loads(body)) == KEYS
    assert doc["RoleArn"] == "arn:aws:iam::123456789012:role/app"


def test_raw_credentials_are_marked(emu):
    doc = emu.add()["document"]
    assert re.fullmatch(r"ASIARAWE[A-Z0-9]{12}", doc["AccessKeyId"])
    assert len(doc["SecretAccessKey"]) == 40 and "RAWSECRET" in doc["SecretAccessKey"]
    assert "RAWTOKEN" in doc["Token"] and len(doc["Token"]) > 100
    assert TIMESTAMP.match(doc["Expiration"])


def test_default_lifetime_is_six_hours(emu):
    doc = emu.add()["document"]
    expiration = time.mktime(time.strptime(doc["Expiration"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 6 * 3600 - 60 < expiration - time.time() <= 6 * 3600


def test_v1_query_form_serves_the_same_document(emu):
    entry = emu.add()
    status, headers, body = emu.get("/v1/credentials?id=" + entry["id"])
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == entry["document"]


def test_no_header_is_required_and_any_header_is_ignored(emu):
    entry = emu.add()
    plain = emu.get(entry["relative_uri"])[2]
    noisy = emu.get(entry["relative_uri"], headers={"Authorization": "x", "X-Forwarded-For": "1.2.3.4"})[2]
    assert plain == noisy


def test_each_id_serves_only_its_own_set(emu):
    a, b = emu.add(role_arn="arn:aws:iam::123456789012:role/a"), emu.add(
        role_arn="arn:aws:iam::123456789012:role/b")
    served_a = json.loads(emu.get(a["relative_uri"])[2])
    served_b = json.loads(emu.get(b["relative_uri"])[2])
    assert served_a == a["document"] and served_b == b["document"]
    assert served_a["AccessKeyId"] != served_b["AccessKeyId"]


def test_document_overrides_and_explicit_id(emu):
    entry = emu.add(id="task-cred-1", document={"Expiration": "2016-03-25T06:17:19.318+0000",
                                                 "Token": None})
    body = json.loads(emu.get("/v2/credentials/task-cred-1")[2])
    assert body["Expiration"] == "2016-03-25T06:17:19.318+0000"
    assert body["Token"] == ""  # the Go struct always marshals all five keys
    assert list(body) == KEYS and entry["id"] == "task-cred-1"


def test_rotate_keeps_the_id_and_changes_the_set(emu):
    entry = emu.add()
    status, rotated = emu.control("POST", "/credentials/rotate", {"id": entry["id"]})
    assert status == 200 and rotated["id"] == entry["id"]
    assert rotated["document"]["AccessKeyId"] != entry["document"]["AccessKeyId"]
    assert json.loads(emu.get(entry["relative_uri"])[2]) == rotated["document"]
    assert emu.control("POST", "/credentials/rotate", {"id": "nope"})[0] == 404


def test_botocore_container_provider_reads_the_document(emu):
    utils = pytest.importorskip("botocore.utils")
    entry = emu.add()
    host, port = emu.listeners[0]
    fetcher = utils.ContainerMetadataFetcher()
    creds = fetcher.retrieve_full_uri(f"http://{host}:{port}{entry['relative_uri']}")
    assert creds["AccessKeyId"] == entry["document"]["AccessKeyId"]
    assert creds["RoleArn"] == entry["document"]["RoleArn"]


# ------------------------------------------------------------------------------------------
# Errors: [v1] processCredentialsRequest, bodies as in [test]
# ------------------------------------------------------------------------------------------

def test_v2_without_id_is_400_no_id(emu):
    status, headers, body = emu.get("/v2/credentials/")
    assert status == 400 and headers["content-type"] == "application/json"
    assert body == error_body("NoIdInRequest",
                              "CredentialsV2Request: No Credential ID in the request", 400)


@pytest.mark.parametrize("path", ["/v1/credentials", "/v1/credentials?id=",
                                  "/v1/credentials?other=1"])
def test_v1_without_id_is_400_no_id(emu, path):
    status, _, body = emu.get(path)
    assert (status, body) == (400, error_body(
        "NoIdInRequest", "CredentialsV1Request: No Credential ID in the request", 400))


@pytest.mark.parametrize("path,prefix", [("/v2/credentials/unknown-id", "CredentialsV2Request"),
                                         ("/v1/credentials?id=unknown-id", "CredentialsV1Request")])
def test_unknown_id_is_400_invalid_id(emu, path, prefix):
    emu.add()
    status, headers, body = emu.get(path)
    assert status == 400 and headers["content-type"] == "application/json"
    assert body == error_body("InvalidIdInRequest", prefix + ": Credentials not found", 400)


def test_pending_id_is_503_until_credentials_arrive(emu):
    assert emu.control("POST", "/pending", {"id": "arriving"})[0] == 200
    status, _, body = emu.get("/v2/credentials/arriving")
    assert (status, body) == (503, error_body(
        "CredentialsUninitialized", "CredentialsV2Request: Credentials uninitialized for ID", 503))
    emu.add(id="arriving")
    assert emu.get("/v2/credentials/arriving")[0] == 200


def test_removed_id_is_400(emu):
    entry = emu.add()
    assert emu.control("POST", "/credentials/remove", {"id": entry["id"]}) == (200, {"removed": True})
    assert emu.get(entry["relative_uri"])[2] == error_body(
        "InvalidIdInRequest", "CredentialsV2Request: Credentials not found", 400)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_any_method_is_served_like_get(emu, method):
    # [setup] HandleFunc without .Methods(): the credential routes accept every method.
    entry = emu.add()
    status, _, body = emu.request(method, entry["relative_uri"], body=b"ignored")
    assert status == 200 and json.loads(body) == entry["document"]


def test_head_gets_headers_without_body(emu):
    entry = emu.add()
    status, headers, body = emu.request("HEAD", entry["relative_uri"])
    assert (status, body) == (200, b"") and headers["content-type"] == "application/json"


@pytest.mark.parametrize("path", ["/v2/credentials", "/v3/credentials/x", "/", "/v2/metadata",
                                  "/v1/credentials/"])
def test_other_paths_are_go_404(emu, path):
    status, headers, body = emu.get(path)
    assert (status, body) == (404, b"404 page not found\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("path,location", [
    ("//v2//credentials/abc", "/v2/credentials/abc"),
    ("/v2/credentials/./abc", "/v2/credentials/abc"),
    ("/v2/x/../credentials/abc", "/v2/credentials/abc"),
    ("/v1//credentials?id=abc", "/v1/credentials?id=abc"),
    ("//v2/credentials/abc", "/v2/credentials/abc"),
])
def test_unclean_paths_redirect_301(emu, path, location):
    status, headers, body = emu.get(path)
    assert (status, headers["location"], body) == (301, location, b"")


def test_percent_escapes_are_decoded_before_matching(emu):
    emu.add(id="a/b")
    assert emu.get("/v2/credentials/a%2Fb")[0] == 200
    assert emu.get("/v2/credentials/%zz")[0] == 400  # Go cannot parse the target


def test_missing_host_is_go_400(emu):
    answer = emu.raw(b"GET /v2/credentials/x HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"400 Bad Request: missing required Host header")


# ------------------------------------------------------------------------------------------
# Rate limit: [tmds], [cfg], [toll]
# ------------------------------------------------------------------------------------------

def test_rate_limit_headers_on_every_answer(emu):
    entry = emu.add()
    _, headers, _ = emu.get(entry["relative_uri"])
    assert headers["x-rate-limit-limit"] == "40.00"
    assert headers["x-rate-limit-duration"] == "1"
    assert headers["x-rate-limit-request-forwarded-for"] == ""
    assert headers["x-rate-limit-request-remote-addr"].startswith("127.0.0.1:")
    assert emu.get("/nowhere")[1]["x-rate-limit-limit"] == "40.00"
    assert emu.control("GET", "/state")[1]["rate_limit"] == {"steady": 40, "burst": 60}


def test_rate_limit_per_client_and_path_answers_429(emu):
    emu.control("POST", "/state", {"rate_limit": {"steady": 0.5, "burst": 3}})
    entry = emu.add()
    statuses = [emu.get(entry["relative_uri"])[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    status, headers, body = emu.get(entry["relative_uri"])
    assert (status, body) == (429, b"You have reached maximum request limit.")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert emu.get("/v2/credentials/other")[0] == 400  # another path has its own bucket
    emu.control("POST", "/state", {"rate_limit": None})
    assert emu.get(entry["relative_uri"])[0] == 200
    assert "x-rate-limit-limit" not in emu.get(entry["relative_uri"])[1]


# ------------------------------------------------------------------------------------------
# Control API
# ------------------------------------------------------------------------------------------

def test_control_is_not_served_on_agent_listener(emu):
    assert emu.get("/state")[0] == 404


def test_request_log(emu):
    entry = emu.add()
    emu.get(entry["relative_uri"], headers={"X-Test": "yes"})
    log = emu.control("GET", "/requests")[1]
    assert [(e["method"], e["path"], e["status"]) for e in log] == [
        ("GET", entry["relative_uri"], 200)]
    assert ["X-Test", "yes"] in log[0]["headers"]
    emu.control("POST", "/requests/clear")
    assert emu.control("GET", "/requests")[1] == []


def test_delay_ms(emu):
    emu.control("POST", "/state", {"delay_ms": 300})
    started = time.monotonic()
    assert emu.get("/v2/credentials/x")[0] == 400
    assert time.monotonic() - started >= 0.3


def test_down_closes_without_answer(emu):
    emu.control("POST", "/state", {"down": True})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        emu.get("/v2/credentials/x")
    assert emu.control("GET", "/requests")[1][0]["status"] == "dropped"
    emu.control("POST", "/state", {"down": False})
    assert emu.get("/v2/credentials/x")[0] == 400


@pytest.mark.parametrize("path,patch", [
    ("/state", {"delay_ms": -1}), ("/state", {"down": "yes"}), ("/state", {"bogus": 1}),
    ("/state", {"rate_limit": {"steady": 0, "burst": 1}}),
    ("/credentials", {"id": ""}), ("/credentials", {"task_arn": ""}),
    ("/credentials", {"role_type": "Other"}), ("/credentials", {"document": {"Extra": "x"}}),
    ("/pending", {"id": ""}),
])
def test_invalid_control_requests_are_400_and_change_nothing(emu, path, patch):
    emu.assert_refused_unchanged(path, patch)


def test_reset_forgets_everything(emu):
    entry = emu.add()
    emu.control("POST", "/pending", {"id": "p"})
    emu.control("POST", "/state", {"rate_limit": None, "delay_ms": 5})
    state = emu.control("POST", "/reset")[1]
    assert state == {"credentials": {}, "pending": [], "delay_ms": 0, "down": False,
                     "rate_limit": {"steady": 40, "burst": 60}}
    assert emu.get(entry["relative_uri"])[0] == 400
