"""Tests of the EKS Pod Identity Agent stand-in: each rule its module docstring claims, with the
AWS document or eks-pod-identity-agent source file it comes from.

The stand-in runs as a real subprocess, driven over real sockets (standin_testlib.py); one
shared stand-in serves most tests and is reset before each one (conftest.py).

    .venv/bin/python -m pytest -q tests/support/test_pod_identity_emulator.py
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import time

import pytest

from standin_testlib import (StandIn, assert_sigterm_and_sigint_exit_zero,
                             ipv6_loopback_available, loopback_listeners, running)

HOST = "169.254.170.23"  # [EKS-how] AWS_CONTAINER_CREDENTIALS_FULL_URI host
PATH = "/v1/credentials"
KEYS = ["AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration"]
SERVICE_ERROR = re.compile(
    r"^\[[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\]: "
    r"\((?P<code>[A-Za-z]+)\): (?P<message>.*), fault: (?P<fault>client|server)\n$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(header: dict | str, claims: dict | str, signature: str = "c2ln") -> str:
    encode = lambda part: b64url(part.encode() if isinstance(part, str) else json.dumps(part).encode())
    return f"{encode(header)}.{encode(claims)}.{signature}"


class Emulator(StandIn):
    script = "pod_identity_emulator.py"

    def creds(self, token: str | None, host: str = HOST, path: str = PATH, method: str = "GET",
              **kwargs):
        headers = {"Host": host}
        if token is not None:
            headers["Authorization"] = token
        return self.request(method, path, headers, **kwargs)

    def register(self, **spec) -> dict:
        return self.control_ok("/tokens", spec)


@pytest.fixture(scope="module")
def emu():
    yield from running(Emulator, *loopback_listeners(), "--control", "127.0.0.1:0")


# ------------------------------------------------------------------------------------------
# Start-up, CLI, shutdown
# ------------------------------------------------------------------------------------------

def test_prints_listeners_then_control(emu):
    assert emu.lines[0].startswith("listening 127.0.0.1:")
    assert emu.lines[-1].startswith("control 127.0.0.1:")


def test_sigterm_and_sigint_exit_zero():
    assert_sigterm_and_sigint_exit_zero(Emulator)


def test_bad_listen_address_is_a_usage_error():
    assert Emulator.run("--listen", "nope").returncode == 2


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
@pytest.mark.parametrize("host", ["[fd00:ec2::23]", "[fd00:ec2::23]:80"])
def test_ipv6_listener_and_ipv6_target_host(emu, host):
    entry = emu.register()
    status, _, body = emu.creds(entry["token"], host=host, listener=1)
    assert status == 200 and json.loads(body) == entry["document"]


# ------------------------------------------------------------------------------------------
# Happy path: [EKS-how], [handler], [model], [service]
# ------------------------------------------------------------------------------------------

def test_credentials_exact_document(emu):
    entry = emu.register(role_arn="arn:aws:iam::210987654321:role/app")
    status, headers, body = emu.creds(entry["token"])
    assert status == 200 and headers["content-type"] == "application/json"
    doc = entry["document"]
    assert body.decode() == (
        f'{{"AccessKeyId":"{doc["AccessKeyId"]}","SecretAccessKey":"{doc["SecretAccessKey"]}",'
        f'"Token":"{doc["Token"]}","AccountId":"210987654321","Expiration":"{doc["Expiration"]}"}}')
    served = json.loads(body)
    assert list(served) == KEYS
    for absent in ("Code", "Type", "LastUpdated", "RoleArn"):
        assert absent not in served
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", served["Expiration"])


def test_raw_credentials_are_marked(emu):
    doc = emu.register()["document"]
    assert re.fullmatch(r"ASIARAWP[A-Z0-9]{12}", doc["AccessKeyId"])
    assert len(doc["SecretAccessKey"]) == 40 and "RAWSECRET" in doc["SecretAccessKey"]
    assert "RAWTOKEN" in doc["Token"]


def test_minted_token_looks_like_a_projected_service_account_token(emu):
    entry = emu.register(namespace="team", service_account="app", pod_name="app-1")
    header, claims, signature = entry["token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert claims["aud"] == ["pods.eks.amazonaws.com"]
    assert claims["sub"] == "system:serviceaccount:team:app"
    assert claims["kubernetes.io"]["pod"]["name"] == "app-1"
    assert 86400 - 60 < claims["exp"] - time.time() <= 86400


@pytest.mark.parametrize("host", [HOST, HOST + ":80", HOST + ":8080"])
def test_target_host_with_or_without_port(emu, host):
    entry = emu.register()
    assert emu.creds(entry["token"], host=host)[0] == 200


def test_answer_is_stable_per_token_until_rotated(emu):
    entry = emu.register()
    first = emu.creds(entry["token"])[2]
    assert emu.creds(entry["token"])[2] == first
    status, rotated = emu.control("POST", "/tokens/rotate", {"token": entry["token"]})
    assert status == 200
    second = json.loads(emu.creds(entry["token"])[2])
    assert second == rotated["document"] and second["AccessKeyId"] != json.loads(first)["AccessKeyId"]
    assert emu.control("POST", "/tokens/rotate", {"token": "nope"})[0] == 404


def test_tokens_are_isolated_even_for_the_same_pod(emu):
    a = emu.register(pod_uid="11111111-1111-1111-1111-111111111111")
    b = emu.register(pod_uid="11111111-1111-1111-1111-111111111111")  # rotated SA token
    served_a, served_b = (json.loads(emu.creds(t["token"])[2]) for t in (a, b))
    assert served_a == a["document"] and served_b == b["document"]
    assert served_a["AccessKeyId"] != served_b["AccessKeyId"]


def test_any_method_and_head(emu):
    entry = emu.register()
    assert emu.creds(entry["token"], method="POST", body=b"x")[0] == 200
    status, headers, body = emu.creds(entry["token"], method="HEAD")
    assert (status, body) == (200, b"") and headers["content-type"] == "application/json"


def test_null_document_field_is_omitted(emu):
    entry = emu.register(document={"AccountId": None})
    assert list(json.loads(emu.creds(entry["token"])[2])) == [
        "AccessKeyId", "SecretAccessKey", "Token", "Expiration"]


def test_botocore_reads_it_through_full_uri_and_token(emu):
    utils = pytest.importorskip("botocore.utils")
    emu.control("POST", "/state", {"target_hosts": ["127.0.0.1"]})  # the validator's TargetHosts
    entry = emu.register()
    host, port = emu.listeners[0]
    creds = utils.ContainerMetadataFetcher().retrieve_full_uri(
        f"http://{host}:{port}{PATH}", headers={"Authorization": entry["token"]})
    assert creds["AccessKeyId"] == entry["document"]["AccessKeyId"]


# ------------------------------------------------------------------------------------------
# Agent-side rejections: [valid], [jwt], [handler]
# ------------------------------------------------------------------------------------------

def plain(status: int, message: str):
    return status, message.encode() + b"\n"


def test_wrong_target_host_is_403(emu):
    entry = emu.register()
    host, port = emu.listeners[0]
    status, headers, body = emu.creds(entry["token"], host=f"{host}:{port}")
    assert (status, body) == plain(403, "Access Denied. Called agent through invalid address, "
                                        "please use either [169.254.170.23 fd00:ec2::23] "
                                        "address not 127.0.0.1")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"


def test_target_hosts_can_be_configured():
    emulator = Emulator("--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
                        "--target-host", "localhost")
    try:
        entry = emulator.control("POST", "/tokens", {})[1]
        assert emulator.creds(entry["token"], host="localhost:80")[0] == 200
        assert emulator.creds(entry["token"])[2].startswith(b"Access Denied.")
    finally:
        assert emulator.stop() == 0


@pytest.mark.parametrize("token", [None, ""])
def test_missing_or_empty_token_is_400(emu, token):
    assert emu.creds(token)[::2] == plain(400, "Service account token cannot be empty")


PREFIX = "Service account token cannot be parsed: "
GOOD_HEADER = {"alg": "RS256", "kid": "k"}
FUTURE = {"exp": int(time.time()) + 3600, "sub": "system:serviceaccount:default:sa"}


@pytest.mark.parametrize("token,message", [
    ("abc", PREFIX + "token is malformed: token contains an invalid number of segments"),
    ("a.b", PREFIX + "token is malformed: token contains an invalid number of segments"),
    ("a.b.c.d", PREFIX + "token is malformed: token contains an invalid number of segments"),
    ("Bearer " + jwt(GOOD_HEADER, FUTURE),
     PREFIX + "token is malformed: could not base64 decode header: illegal base64 data at input "
              "byte 6"),
    (b64url(b"{}") + "=.e30.x",
     PREFIX + "token is malformed: could not base64 decode header: illegal base64 data at input "
              "byte 3"),
    (jwt(GOOD_HEADER, FUTURE).replace(".", ".!", 1),
     PREFIX + "token is malformed: could not base64 decode claim: illegal base64 data at input "
              "byte 0"),
    (jwt({}, FUTURE), PREFIX + "token is unverifiable: signing method (alg) is unspecified"),
    (jwt({"alg": 5}, FUTURE), PREFIX + "token is unverifiable: signing method (alg) is unspecified"),
    (jwt({"alg": "XS999"}, FUTURE),
     PREFIX + "token is unverifiable: signing method (alg) is unavailable"),
])
def test_unparseable_tokens_are_400(emu, token, message):
    assert emu.creds(token)[::2] == plain(400, message)


@pytest.mark.parametrize("header,claims,start", [
    ("not json", FUTURE, PREFIX + "token is malformed: could not JSON decode header: "),
    ("[1]", FUTURE, PREFIX + "token is malformed: could not JSON decode header: "),
    (GOOD_HEADER, "nope", PREFIX + "token is malformed: could not JSON decode claim: "),
    (GOOD_HEADER, {"exp": "soon"}, PREFIX + "token is malformed: could not JSON decode claim: "),
    (GOOD_HEADER, {"sub": 5}, PREFIX + "token is malformed: could not JSON decode claim: "),
])
def test_undecodable_json_is_400_with_jwt_prefix(emu, header, claims, start):
    status, _, body = emu.creds(jwt(header, claims))
    assert status == 400 and body.decode().startswith(start) and body.endswith(b"\n")


def test_signature_and_alg_none_are_not_checked_by_the_agent(emu):
    token = jwt({"alg": "none"}, FUTURE, signature="")
    emu.register(token=token)
    assert emu.creds(token)[0] == 200


@pytest.mark.parametrize("claims,problem", [
    ({"exp": int(time.time()) - 10}, "token is expired"),
    ({"nbf": int(time.time()) + 3600}, "token is not valid yet"),
    ({"exp": int(time.time()) - 10, "nbf": int(time.time()) + 3600},
     "token is expired, token is not valid yet"),
])
def test_claim_validation_is_400(emu, claims, problem):
    token = jwt(GOOD_HEADER, claims)
    emu.register(token=token)  # known to EKS Auth, still refused by the agent first
    assert emu.creds(token)[::2] == plain(
        400, "Service account token failed basic claim validations: " + problem)


def test_registered_token_past_its_exp_is_refused(emu):
    entry = emu.register(exp=int(time.time()) - 1)
    assert emu.creds(entry["token"])[2].endswith(b"token is expired\n")


def test_claims_without_exp_pass_basic_validation(emu):
    entry = emu.register(exp=None)
    assert emu.creds(entry["token"])[0] == 200


# ------------------------------------------------------------------------------------------
# EKS Auth failures: [EKS-auth], [errors]
# ------------------------------------------------------------------------------------------

def test_unknown_token_is_eks_auth_invalid_token(emu):
    status, headers, body = emu.creds(jwt(GOOD_HEADER, FUTURE))
    match = SERVICE_ERROR.match(body.decode())
    assert status == 400 and match, body
    assert match["code"] == "InvalidTokenException" and match["fault"] == "client"
    assert match["message"] == "The specified Kubernetes service account token is invalid."
    assert headers["content-type"] == "text/plain; charset=utf-8"


def test_removed_token_is_unknown(emu):
    entry = emu.register()
    assert emu.control("POST", "/tokens/remove", {"token": entry["token"]}) == (200, {"removed": True})
    assert emu.creds(entry["token"])[0] == 400


@pytest.mark.parametrize("code,status,fault", [
    ("AccessDeniedException", 400, "client"), ("ExpiredTokenException", 400, "client"),
    ("InvalidRequestException", 400, "client"), ("InvalidParameterException", 400, "client"),
    ("ResourceNotFoundException", 404, "client"), ("ThrottlingException", 429, "client"),
    ("InternalServerException", 500, "server"), ("ServiceUnavailableException", 503, "server"),
])
def test_eks_auth_errors_keep_their_status(emu, code, status, fault):
    entry = emu.register(error={"code": code, "message": "custom words"})
    got_status, _, body = emu.creds(entry["token"])
    match = SERVICE_ERROR.match(body.decode())
    assert got_status == status and match
    assert (match["code"], match["message"], match["fault"]) == (code, "custom words", fault)


def test_unknown_token_error_can_be_changed(emu):
    emu.control("POST", "/state", {"unknown_token_error": {"code": "ResourceNotFoundException"}})
    status, _, body = emu.creds(jwt(GOOD_HEADER, FUTURE))
    assert status == 404 and SERVICE_ERROR.match(body.decode())["code"] == "ResourceNotFoundException"


def test_credentials_about_to_expire_are_500(emu):
    entry = emu.register(lifetime_s=10)
    status, _, body = emu.creds(entry["token"])
    assert status == 500
    assert re.fullmatch(rb"fetched credentials are expired or will expire within the next "
                        rb"\d+\.\d\d seconds\n", body)
    assert emu.creds(emu.register(lifetime_s=60)["token"])[0] == 200


# ------------------------------------------------------------------------------------------
# Routing, rate limit, Go server behaviour: [handler], [server]
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/credentials/", "/v2/credentials", "/", "/v1"])
def test_other_paths_are_404(emu, path):
    entry = emu.register()
    assert emu.creds(entry["token"], path=path)[::2] == plain(404, "404 page not found")


def test_unclean_path_redirects(emu):
    status, headers, body = emu.creds("x", path="//v1//credentials?a=b")
    assert (status, headers["location"]) == (301, "/v1/credentials?a=b")
    assert body == b'<a href="/v1/credentials?a=b">Moved Permanently</a>.\n\n'
    assert emu.creds("x", path="//v1/credentials", method="POST")[::2] == (301, b"")


def test_rate_limit_is_429(emu):
    emu.control("POST", "/state", {"rate_limit": {"rate": 0.5, "burst": 2}})
    entry = emu.register()
    assert [emu.creds(entry["token"])[0] for _ in range(3)] == [200, 200, 429]
    assert emu.creds(entry["token"])[::2] == plain(429, "Too Many Requests")
    assert emu.control("POST", "/state", {"rate_limit": None})[0] == 200
    assert emu.creds(entry["token"])[0] == 200


def test_default_rate_limit_is_the_agents(emu):
    assert emu.control("GET", "/state")[1]["rate_limit"] == {"rate": 1000, "burst": 500}


def test_missing_host_is_go_400(emu):
    answer = emu.raw(b"GET /v1/credentials HTTP/1.1\r\nAuthorization: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"400 Bad Request: missing required Host header")


# ------------------------------------------------------------------------------------------
# Control API
# ------------------------------------------------------------------------------------------

def test_control_is_not_served_on_agent_listener(emu):
    assert emu.creds("x", path="/state")[0] == 404


def test_request_log_shows_the_authorization_header(emu):
    entry = emu.register()
    emu.creds(entry["token"])
    log = emu.control("GET", "/requests")[1]
    assert [(e["method"], e["path"], e["status"]) for e in log] == [("GET", PATH, 200)]
    assert ["Authorization", entry["token"]] in log[0]["headers"]
    assert ["Host", HOST] in log[0]["headers"]
    emu.control("POST", "/requests/clear")
    assert emu.control("GET", "/requests")[1] == []


def test_delay_and_down(emu):
    emu.control("POST", "/state", {"delay_ms": 300})
    started = time.monotonic()
    emu.creds(None)
    assert time.monotonic() - started >= 0.3
    emu.control("POST", "/state", {"delay_ms": 0, "down": True})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        emu.creds(None)
    assert emu.control("GET", "/requests")[1][-1]["status"] == "dropped"


@pytest.mark.parametrize("path,patch", [
    ("/state", {"delay_ms": "x"}), ("/state", {"target_hosts": "a"}), ("/state", {"x": 1}),
    ("/state", {"unknown_token_error": {"code": "Nope"}}),
    ("/state", {"rate_limit": {"rate": 1}}),
    ("/tokens", {"role_arn": "not-an-arn"}), ("/tokens", {"error": {"code": "X"}}),
    ("/tokens", {"document": {"RoleArn": "x"}}), ("/tokens", {"token": ""}),
    ("/tokens", {"exp": "tomorrow"}),
])
def test_invalid_control_requests_are_400_and_change_nothing(emu, path, patch):
    emu.assert_refused_unchanged(path, patch)


def test_reset(emu):
    entry = emu.register()
    emu.control("POST", "/state", {"target_hosts": [], "rate_limit": None})
    state = emu.control("POST", "/reset")[1]
    assert state["tokens"] == {} and state["target_hosts"] == ["169.254.170.23", "fd00:ec2::23"]
    assert state["rate_limit"] == {"rate": 1000, "burst": 500}
    assert state["cluster_name"] == "credlock-test-cluster"
    assert emu.creds(entry["token"])[0] == 400
