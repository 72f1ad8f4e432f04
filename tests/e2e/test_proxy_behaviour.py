"""credlock as an IMDS proxy, checked on the wire against the upstream (the IMDS emulator).

Pass-through answers must be byte-identical to what the upstream gives a direct client; IMDS's
own refusals (401, 403 on PUT with X-Forwarded-For, 400 on a bad TTL, 405) must come from the
upstream; every spelling of a credential path must be served locked or refused locally, never
raw; upstream hangs and outages must become 504 / 502 without taking credlock down.

Ground truth: the emulator's GET /state (raw credential sets) and GET /requests (what reached
it). Requests carry a unique User-Agent marker to be found in that log.
"""

from __future__ import annotations

import json
import uuid

import pytest

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
COMPARED_HEADERS = ("Content-Type", "Content-Length", "Server")

PRIMARY_MAC = "0e:11:22:33:44:55"  # the emulator's default interfaces (contract)
SECOND_MAC = "0e:11:22:33:44:66"  # has the IPv6 address

# Pass-through paths across the tree ({role} is the emulator's role name).
PASSTHROUGH_PATHS = [
    "/",
    "/latest",
    "/latest/",
    "/latest/meta-data/",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/placement/region",
    "/latest/meta-data/placement/",
    "/latest/meta-data/mac",
    "/latest/meta-data/public-ipv4",
    f"/latest/meta-data/network/interfaces/macs/{PRIMARY_MAC}/vpc-id",
    f"/latest/meta-data/network/interfaces/macs/{PRIMARY_MAC}/public-ipv4s",
    f"/latest/meta-data/network/interfaces/macs/{SECOND_MAC}/public-ipv4s",
    f"/latest/meta-data/network/interfaces/macs/{SECOND_MAC}/ipv6s",
    f"/latest/meta-data/network/interfaces/macs/{PRIMARY_MAC}/ipv6s",  # 404: no IPv6 on eth0
    "/latest/meta-data/network/interfaces/macs/",
    "/latest/meta-data/iam/",
    "/latest/meta-data/iam/info",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials",
    "/latest/meta-data/iam/security-credentials-extended/",
    "/latest/meta-data/iam/security-credentials-extended",
    "/latest/meta-data/identity-credentials/ec2/info",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/dynamic/instance-identity/document",
    "/latest/dynamic/",
    "/2012-01-12/meta-data/",
    "/2012-01-12/meta-data/instance-id",
    "/2012-01-12/meta-data/iam/info",
    "/2012-01-12/meta-data/iam/security-credentials/",
    "/2016-09-02/meta-data/instance-id",
    "/2016-09-02/meta-data/iam/info",
    "/2016-09-02/meta-data/placement/region",  # 404: placement/region is from 2020-08-24
    "/2009-04-04/meta-data/iam/info",  # 404: iam/ is from 2012-01-12
    "/latest/meta-data/no-such-thing",  # 404
    "/latest/meta-data/iam/security-credentials/no-such-role",  # 404 from the upstream
    "/1999-01-01/meta-data/",  # 404: unknown version
    "/latest/api/token",  # GET of the token path: the upstream's 405
]

CREDENTIAL_VERSIONS = ["latest", "2012-01-12", "2016-09-02"]
CREDENTIAL_KINDS = ["security-credentials", "security-credentials-extended"]

# Odd spellings of the credential path: must be refused locally (400/404, never forwarded) or
# served locked. The emulator is deliberately lenient ('//' collapsed, query ignored, absolute
# form reduced to its path), so anything forwarded unchanged would come back RAW.
ODD_TARGETS = [
    "//latest/meta-data/iam/security-credentials/{role}",
    "/latest//meta-data/iam/security-credentials/{role}",
    "/latest/meta-data//iam/security-credentials/{role}",
    "/latest/meta-data/iam//security-credentials/{role}",
    "/latest/meta-data/iam/security-credentials//{role}",
    "/latest/meta-data/iam/security-credentials-extended//{role}",
    "/latest/meta-data/%69am/security-credentials/{role}",
    "/latest/meta-data/iam/security%2Dcredentials/{role}",
    "/latest/meta-data/iam/security-credentials%2F{role}",
    "/latest/meta-data/iam/security-credentials/%63redlock-test-role",
    "/latest/./meta-data/iam/security-credentials/{role}",
    "/latest/meta-data/./iam/security-credentials/{role}",
    "/latest/meta-data/x/../iam/security-credentials/{role}",
    "/latest/meta-data/iam/security-credentials/x/../{role}",
    "/x/../latest/meta-data/iam/security-credentials/{role}",
    "/latest/meta-data\\iam\\security-credentials\\{role}",
    "/latest/meta-data/iam/security-credentials\\{role}",
    "/latest/meta-data/iam/security-credentials/{role};x",
    "/latest/meta-data/iam;x/security-credentials/{role}",
    "/latest/meta-data/iam/security-credentials/{role}?x=1",
    "/latest/meta-data/iam/security-credentials/{role}#frag",
    "/latest/meta-data/iam/security-credentials/{role}//",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/{role}",
    "http://169.254.169.254//latest/meta-data/iam/security-credentials-extended/{role}",
]


def marker() -> str:
    return f"credlock-e2e/{uuid.uuid4().hex}"


BOGUS_TOKEN = "AQAEAGJvZ3VzLXRva2VuLW5vdC1pc3N1ZWQtYnktaW1kcy0tLS0tLQ=="


def headers_for(stack, auth: str, mark: str | None = None) -> dict:
    """auth "v1": no token; "v2": a token the emulator issued (valid through credlock too);
    "bogus": a well-formed token IMDS never issued (IMDS answers 401 to anything with it)."""
    headers = {"User-Agent": mark or marker()}
    if auth == "v2":
        headers[TOKEN_HEADER] = stack.token()
    elif auth == "bogus":
        headers[TOKEN_HEADER] = BOGUS_TOKEN
    return headers


def assert_same_answer(direct, via, context: str) -> None:
    assert via.status == direct.status, f"{context}: status {via.status} != upstream {direct.status}"
    assert via.body == direct.body, f"{context}: body differs\n via={via.body[:400]!r}\n" \
                                    f" upstream={direct.body[:400]!r}"
    for name in COMPARED_HEADERS:
        assert via.header(name) == direct.header(name), \
            f"{context}: {name} {via.header(name)!r} != upstream {direct.header(name)!r}"


def send_raw(stack, method: str, target: str, headers: dict, version: str = "HTTP/1.1",
             host: str | None = "169.254.169.254"):
    """A request to credlock whose target and request line go out byte for byte."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if version == "HTTP/1.1":
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return stack.raw_request(stack.proxy, data, head=(method == "HEAD"))


# --------------------------------------------------------------------------------------------
# Pass-through fidelity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["v2", "v1", "bogus"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", PASSTHROUGH_PATHS)
def test_passthrough_matches_upstream(any_stack, path, method, auth):
    stack = any_stack
    headers = headers_for(stack, auth)
    direct = stack.direct(method, path, headers)
    via = stack.via(method, path, headers)
    assert_same_answer(direct, via, f"{method} {path} ({auth}, tokens={stack.tokens})")
    if method == "HEAD":
        assert via.body == b""
    stack.assert_no_raw(via.body, f"on {path}")


def test_token_put_through_credlock_returns_ttl_header(any_stack):
    stack = any_stack
    for ttl in ("1", "300", "21600"):
        reply = stack.via("PUT", "/latest/api/token", {TTL_HEADER: ttl, "User-Agent": marker()})
        assert reply.status == 200, reply
        assert reply.header(TTL_HEADER) == ttl, f"TTL response header lost: {reply.headers}"
        assert reply.header("Content-Type") == "text/plain"
        token = reply.body.decode()
        assert token and "\n" not in token
    # The relayed token is a real upstream token: valid directly and through credlock.
    token = stack.via("PUT", "/latest/api/token", {TTL_HEADER: "300"}).body.decode()
    assert stack.direct("GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: token}).status == 200
    assert stack.via("GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: token}).status == 200


def test_put_with_x_forwarded_for_gets_upstream_403_and_xff_is_relayed_unchanged(any_stack):
    stack = any_stack
    xff = "198.51.100.7, 203.0.113.9"
    mark = marker()
    headers = {TTL_HEADER: "300", "X-Forwarded-For": xff, "User-Agent": mark}
    direct = stack.direct("PUT", "/latest/api/token", headers)
    # The protocol: rejected (Amazon EC2 User Guide, "How Instance Metadata Service Version 2
    # works"); ❓ that page gives no status code: 403 is presumed (imds_emulator.py).
    assert direct.status == 403, direct
    via = stack.via("PUT", "/latest/api/token", headers)
    assert_same_answer(direct, via, "PUT token with X-Forwarded-For")
    assert via.header(TTL_HEADER) is None and b"AQAE" not in via.body, "a token leaked out"
    relayed = [r for r in stack.seen(mark) if r["method"] == "PUT"]
    # One direct, one relayed by credlock: both must carry exactly the client's XFF.
    assert len(relayed) == 2, relayed
    for entry in relayed:
        values = [v for k, v in entry["headers"] if k.lower() == "x-forwarded-for"]
        assert values == [xff], f"XFF not relayed unchanged: {entry['headers']}"


def test_credlock_never_adds_x_forwarded_for(any_stack):
    stack = any_stack
    mark = marker()
    token = stack.via("PUT", "/latest/api/token", {TTL_HEADER: "300", "User-Agent": mark})
    assert token.status == 200, token
    for path in ("/latest/meta-data/instance-id",
                 f"/latest/meta-data/iam/security-credentials/{stack.role}",
                 "/latest/meta-data/iam/security-credentials/"):
        stack.via("GET", path, {TOKEN_HEADER: token.body.decode(), "User-Agent": mark})
    entries = stack.seen(mark)
    assert len(entries) >= 3, entries
    # Neither on our requests nor on anything credlock sent on its own (no XFF marker at all
    # except on requests a client sent with one).
    for entry in stack.requests_log():
        names = {k.lower() for k, _ in entry["headers"]}
        if "x-forwarded-for" in names:
            user_agents = [v for k, v in entry["headers"] if k.lower() == "user-agent"]
            assert user_agents and user_agents[0].startswith("credlock-e2e/"), \
                f"XFF on a request no test client sent XFF for: {entry}"
    for entry in entries:
        names = {k.lower() for k, _ in entry["headers"]}
        assert "x-forwarded-for" not in names and "forwarded" not in names, entry


@pytest.mark.parametrize("ttl", ["0", "21601", "-1", "abc", None])
def test_bad_token_ttl_gets_upstream_400(any_stack, ttl):
    stack = any_stack
    mark = marker()
    headers = {"User-Agent": mark}
    if ttl is not None:
        headers[TTL_HEADER] = ttl
    direct = stack.direct("PUT", "/latest/api/token", headers)
    # The protocol (Amazon EC2 User Guide, "Retrieve instance metadata", Responses and error
    # messages: 400 - Missing or Invalid Parameters).
    assert direct.status == 400, direct
    via = stack.via("PUT", "/latest/api/token", headers)
    assert_same_answer(direct, via, f"PUT token TTL={ttl!r}")
    assert len(stack.seen(mark)) == 2, "the 400 did not come from the upstream"


@pytest.mark.parametrize("path", ["/latest/meta-data/", "/latest/meta-data/instance-id"])
def test_post_gets_upstream_405(any_stack, path):
    stack = any_stack
    mark = marker()
    headers = {"User-Agent": mark, TOKEN_HEADER: stack.token()}
    direct = stack.direct("POST", path, headers)
    assert direct.status == 405, direct
    via = stack.via("POST", path, headers)
    assert_same_answer(direct, via, f"POST {path}")
    assert via.header("Allow") == direct.header("Allow")
    assert len(stack.seen(mark)) == 2, "the 405 did not come from the upstream"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT"])
def test_a_request_with_a_body_is_refused_and_never_reaches_the_upstream(any_stack, method):
    # No IMDS request carries a body (the token PUT included): a body the upstream does not
    # read would be taken as the next request on a pooled connection (issue 14).
    stack = any_stack
    mark = marker()
    path = "/latest/api/token" if method == "PUT" else "/latest/meta-data/"
    headers = {"User-Agent": mark, TOKEN_HEADER: stack.token(), TTL_HEADER: "300"}
    via = stack.via(method, path, headers, body=b"x=1")
    assert via.status == 400, via
    assert (via.header("Connection") or "").lower() == "close", via
    assert stack.seen(mark) == [], "a request with a body reached the upstream"


def test_put_on_a_versioned_token_path_gets_upstream_403(any_stack):
    stack = any_stack
    headers = {TTL_HEADER: "300", "User-Agent": marker()}
    direct = stack.direct("PUT", "/2021-03-23/api/token", headers)
    # Amazon EC2 User Guide, "Retrieve instance metadata", Considerations: 403 by design.
    assert direct.status == 403, direct
    via = stack.via("PUT", "/2021-03-23/api/token", headers)
    assert_same_answer(direct, via, "PUT /2021-03-23/api/token")


# --------------------------------------------------------------------------------------------
# Credential paths: locked under every spelling, never raw
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["v2", "v1", "bogus"])
@pytest.mark.parametrize("trailing", ["", "/"], ids=["role", "role-slash"])
@pytest.mark.parametrize("kind", CREDENTIAL_KINDS)
@pytest.mark.parametrize("version", CREDENTIAL_VERSIONS)
def test_credential_paths_are_locked(any_stack, version, kind, trailing, auth):
    stack = any_stack
    role = stack.role
    path = f"/{version}/meta-data/iam/{kind}/{role}{trailing}"
    locked = stack.locked()
    headers = headers_for(stack, auth)
    get = stack.via("GET", path, headers)
    head = stack.via("HEAD", path, headers)
    stack.assert_no_raw(get.body, f"on GET {path} ({auth})")
    stack.assert_no_raw(head.body, f"on HEAD {path} ({auth})")
    if auth == "bogus" or (auth == "v1" and stack.tokens == "required"):
        # An unknown token, or no token with HttpTokens=required: the upstream's 401, for GET
        # and HEAD alike (Amazon EC2 User Guide, "How Instance Metadata Service Version 2 works";
        # "Retrieve instance metadata", Responses and error messages) -- credlock must not hand
        # out credentials IMDS refused.
        direct = stack.direct("GET", path, headers)
        assert direct.status == 401
        assert_same_answer(direct, get, f"GET {path} ({auth})")
        assert head.status == 401, head
        return
    assert get.status == 200, f"GET {path} ({auth}): {get!r}"
    doc = get.json()
    assert doc["Code"] == "Success"
    for key in ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"):
        assert doc[key] == locked[key], f"{key} on {path} is not the locked value"
    if kind.endswith("-extended"):
        assert doc["AccountId"] == stack.state()["account_id"]
    assert get.header("Content-Type") == "text/plain"
    assert int(get.header("Content-Length")) == len(get.body)
    # HEAD: the headers of that GET, no body (RFC 9110 §9.3.2) -- the LOCKED body's length.
    assert head.status == 200, head
    assert head.body == b""
    assert head.header("Content-Length") == str(len(get.body)), \
        f"HEAD Content-Length {head.header('Content-Length')} != GET body length {len(get.body)}"


@pytest.mark.parametrize("auth", ["v2", "v1"])
@pytest.mark.parametrize("target", ODD_TARGETS)
def test_odd_spellings_are_refused_locally_or_locked(stack, target, auth):
    role = stack.role
    target = target.format(role=role)
    locked = stack.locked()
    # Control: a normal marked request is found in the upstream's log (the marker works).
    control = marker()
    assert stack.via("GET", "/latest/meta-data/instance-id", {"User-Agent": control}).status == 200
    assert stack.seen(control), "marker not relayed: the 'never reached the upstream' check is void"

    mark = marker()
    headers = headers_for(stack, auth, mark)
    reply = send_raw(stack, "GET", target, headers)
    stack.assert_no_raw(reply.body, f"for {target!r} ({auth})")
    reached = stack.seen(mark)
    if reply.status == 200:
        doc = json.loads(reply.body)
        assert doc["AccessKeyId"] == locked["AccessKeyId"], f"{target!r}: not locked: {reply!r}"
        assert doc["SecretAccessKey"] == locked["SecretAccessKey"]
        assert doc["Token"] == locked["Token"]
    else:
        assert reply.status in (400, 404), f"{target!r}: unexpected {reply!r}"
        assert not reached, (f"{target!r} was answered {reply.status} by the UPSTREAM "
                             f"(credlock forwarded it as {[r['path'] for r in reached]}); "
                             "it must refuse such targets itself")


def test_no_role_attached_gives_upstream_404_not_credentials(stack):
    """IMDS without a role answers 404 on the credential paths (Amazon EC2 User Guide, "Retrieve
    instance metadata", Responses and error messages; "Instance metadata categories":
    iam/security-credentials/role-name is not present without a role): credlock must relay
    that, not serve the credentials it holds."""
    role = stack.role
    token = stack.token()
    try:
        stack.set_state(role=None)
        for kind in CREDENTIAL_KINDS:
            for path in (f"/latest/meta-data/iam/{kind}/{role}", f"/latest/meta-data/iam/{kind}/"):
                headers = {TOKEN_HEADER: token, "User-Agent": marker()}
                direct = stack.direct("GET", path, headers)
                assert direct.status == 404, direct
                via = stack.via("GET", path, headers)
                assert_same_answer(direct, via, f"GET {path} with no role attached")
                assert b"AccessKeyId" not in via.body
    finally:
        stack.set_state(role=role)
    assert stack.via("GET", f"/latest/meta-data/iam/security-credentials/{role}",
                     {TOKEN_HEADER: token}).status == 200


def test_upstream_error_document_is_relayed_not_replaced(stack):
    """IMDS can answer 200 with {"Code": "AssumeRoleUnauthorizedAccess", ...} and no keys
    (🟡 not in the Amazon EC2 User Guide; AWS SDKs handle it: botocore/utils.py
    InstanceMetadataFetcher, smithy-rs aws-config src/imds/credentials.rs): that is not a
    credential document, so it passes through as is."""
    role = stack.role
    error = {"Code": "AssumeRoleUnauthorizedAccess",
             "Message": "EC2 cannot assume the role credlock-test-role."}
    token = stack.token()
    try:
        stack.set_state(credentials={"v1": error, "v2": error})
        for kind in CREDENTIAL_KINDS:
            path = f"/latest/meta-data/iam/{kind}/{role}"
            for headers in ({TOKEN_HEADER: token}, {}):
                direct = stack.direct("GET", path, headers)
                assert direct.status == 200 and b"AssumeRoleUnauthorizedAccess" in direct.body
                via = stack.via("GET", path, headers)
                assert_same_answer(direct, via, f"error document on {path}")
                assert b"AccessKeyId" not in via.body, f"credentials added to an error: {via!r}"
    finally:
        stack.set_state(credentials={"v1": {"Code": "Success", "Message": None},
                                     "v2": {"Code": "Success", "Message": None}})
    reply = stack.via("GET", f"/latest/meta-data/iam/security-credentials/{role}",
                      {TOKEN_HEADER: token})
    assert reply.status == 200 and reply.json()["AccessKeyId"] == stack.locked()["AccessKeyId"]


# --------------------------------------------------------------------------------------------
# Upstream trouble
# --------------------------------------------------------------------------------------------

def test_hanging_upstream_gives_504_quickly(stack):
    try:
        stack.set_state(delay_ms=3000)
        reply = stack.via("GET", "/latest/meta-data/instance-id", {"User-Agent": marker()},
                          timeout=10)
        assert reply.status == 504, reply
        assert reply.elapsed < 1.8, f"504 took {reply.elapsed:.2f} s (expected about 1.5 s)"
    finally:
        stack.set_state(delay_ms=0)
    assert stack.credlock_alive()
    assert stack.via("GET", "/latest/meta-data/instance-id").status == 200


def test_upstream_down_gives_502_then_recovers(stack):
    state = stack.state()
    try:
        stack.set_state(down=True)
        for path in ("/latest/meta-data/instance-id", "/latest/meta-data/"):
            reply = stack.via("GET", path, {"User-Agent": marker()}, timeout=10)
            assert reply.status == 502, (path, reply)
            stack.assert_no_raw(reply.body, "on a 502")
    finally:
        stack.set_state(down=False)
    assert stack.credlock_alive(), "credlock exited during the upstream outage"
    direct = stack.direct("GET", "/latest/meta-data/instance-id")
    via = stack.via("GET", "/latest/meta-data/instance-id")
    assert_same_answer(direct, via, "after the outage")
    assert via.body.decode() == state["instance_id"]
    token = stack.token(stack.proxy)
    creds = stack.via("GET", f"/latest/meta-data/iam/security-credentials/{stack.role}",
                      {TOKEN_HEADER: token})
    assert creds.status == 200, creds
    assert creds.json()["AccessKeyId"] == stack.locked()["AccessKeyId"]
    stack.assert_no_raw(creds.body, "after the outage")


# --------------------------------------------------------------------------------------------
# HTTP/1.0 clients
# --------------------------------------------------------------------------------------------

def test_http10_requests_work(any_stack):
    stack = any_stack
    state = stack.state()
    role = state["role"]

    put = send_raw(stack, "PUT", "/latest/api/token",
                   {TTL_HEADER: "300", "Content-Length": "0", "User-Agent": marker()},
                   version="HTTP/1.0", host=None)
    assert put.status == 200, put
    assert put.header(TTL_HEADER) == "300"
    token = put.body.decode()

    for host in (None, "169.254.169.254"):  # HTTP/1.0 may omit Host
        headers = {TOKEN_HEADER: token, "User-Agent": marker()}
        reply = send_raw(stack, "GET", "/latest/meta-data/instance-id", headers,
                         version="HTTP/1.0", host=host)
        assert reply.status == 200, reply
        assert reply.body.decode() == state["instance_id"]

        creds = send_raw(stack, "GET", f"/latest/meta-data/iam/security-credentials/{role}",
                         headers, version="HTTP/1.0", host=host)
        assert creds.status == 200, creds
        stack.assert_no_raw(creds.body, "on HTTP/1.0")
        assert json.loads(creds.body)["AccessKeyId"] == stack.locked()["AccessKeyId"]

    head = send_raw(stack, "HEAD", f"/latest/meta-data/iam/security-credentials/{role}",
                    {TOKEN_HEADER: token}, version="HTTP/1.0", host=None)
    assert head.status == 200, head
    assert head.header("Content-Length") == str(len(creds.body))
