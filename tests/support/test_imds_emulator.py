"""Tests of the IMDS emulator itself: each IMDS protocol rule that imds_emulator.py claims to
follow. Citations name AWS documents; "EC2 UG" is the Amazon EC2 User Guide (pages and URLs are
listed at the end of imds_emulator.py's module docstring).

The emulator runs as a real subprocess, driven over real sockets (standin_testlib.py); one
shared emulator serves most tests and is reset before each one (conftest.py).

    .venv/bin/python -m pytest -q tests/support/test_imds_emulator.py
"""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from standin_testlib import StandIn, ipv6_loopback_available, loopback_listeners, running

HERE = Path(__file__).resolve().parent
INSTANCE_EXAMPLE = HERE / "instance-example.json"

ROLE = "credlock-test-role"
CREDS = f"/latest/meta-data/iam/security-credentials/{ROLE}"
EXTENDED = f"/latest/meta-data/iam/security-credentials-extended/{ROLE}"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


# ------------------------------------------------------------------------------------------
# Harness (standin_testlib.py; conftest.py resets the shared emulator before each test)
# ------------------------------------------------------------------------------------------

class Emulator(StandIn):
    """A running emulator process and small clients for its listeners."""

    script = "imds_emulator.py"

    def get(self, path: str, token: str | None = None, **kwargs):
        headers = {TOKEN: token} if token is not None else {}
        return self.request("GET", path, headers, **kwargs)

    def text(self, path: str, token: str | None = None) -> str:
        status, _, body = self.get(path, token)
        assert status == 200, (path, status, body)
        return body.decode()

    def token(self, ttl: int = 21600) -> str:
        status, headers, body = self.request("PUT", "/latest/api/token", {TTL: str(ttl)})
        assert status == 200, body
        return body.decode()


@pytest.fixture(scope="module")
def emu():
    yield from running(Emulator, *loopback_listeners(), "--control", "127.0.0.1:0")


# ------------------------------------------------------------------------------------------
# Start-up, CLI, shutdown
# ------------------------------------------------------------------------------------------

def test_prints_listeners_then_control_in_order(emu):
    assert emu.lines[0].startswith("listening 127.0.0.1:")
    assert emu.lines[-1].startswith("control 127.0.0.1:")
    assert all(re.fullmatch(r"listening (\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+", line)
               for line in emu.lines[:-1])
    assert all(port > 0 for _, port in emu.listeners)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_listener_serves_the_same_tree(emu):
    assert emu.lines[1].startswith("listening [::1]:")
    status, _, body = emu.get("/latest/meta-data/instance-id", listener=1)
    assert (status, body) == (200, b"i-0123456789abcdef0")


def test_sigterm_exits_zero_promptly():
    emulator = Emulator("--listen", "127.0.0.1:0")
    started = time.monotonic()
    assert emulator.stop() == 0
    assert time.monotonic() - started < 3


def test_sigint_exits_zero():
    emulator = Emulator("--listen", "127.0.0.1:0")
    emulator.proc.send_signal(signal.SIGINT)
    assert emulator.stop() == 0


def test_unknown_instance_key_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"instanceid": "i-typo"}')
    result = Emulator.run("--instance", str(bad))
    assert result.returncode == 2
    assert "instanceid" in result.stderr


def test_bad_listen_address_is_a_usage_error():
    result = Emulator.run("--listen", "127.0.0.1")
    assert result.returncode == 2


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to switch to an unprivileged user")
def test_runs_as_a_non_root_user():
    # /usr/bin/python3: a pyenv or venv interpreter under /root is not readable by nobody.
    emulator = Emulator("--listen", "127.0.0.1:0", python="/usr/bin/python3",
                        user="nobody", group="nogroup", extra_groups=[], cwd="/")
    try:
        assert emulator.get("/latest/meta-data/instance-id")[0] == 200
    finally:
        assert emulator.stop() == 0


# ------------------------------------------------------------------------------------------
# IMDSv2 token PUT (EC2 UG "How Instance Metadata Service Version 2 works"; "Retrieve instance
# metadata", Considerations and Responses and error messages)
# ------------------------------------------------------------------------------------------

def test_token_put_returns_token_and_ttl_header(emu):
    status, headers, body = emu.request("PUT", "/latest/api/token", {TTL: "21600"})
    assert status == 200
    # The Rust SDK fails without it (smithy-rs aws-config src/imds/client/token.rs).
    assert headers[TTL.lower()] == "21600"
    assert len(body) >= 40 and b"\n" not in body
    assert emu.token() != emu.token()  # random, unguessable


@pytest.mark.parametrize("ttl", ["1", "21600", "300"])
def test_token_ttl_bounds_accepted(emu, ttl):
    status, headers, _ = emu.request("PUT", "/latest/api/token", {TTL: ttl})
    assert (status, headers[TTL.lower()]) == (200, ttl)


@pytest.mark.parametrize("ttl", [None, "", "0", "21601", "-1", "abc", "1.5", "+5", "99999999999"])
def test_token_ttl_missing_or_invalid_is_400(emu, ttl):
    headers = {} if ttl is None else {TTL: ttl}
    status, resp_headers, body = emu.request("PUT", "/latest/api/token", headers)
    assert status == 400
    assert resp_headers["content-type"] == "text/html"
    assert b"<title>400 - " in body


def test_token_ttl_header_name_is_case_insensitive(emu):
    status, _, _ = emu.request("PUT", "/latest/api/token",
                               {"x-AWS-EC2-metadata-TOKEN-ttl-seconds": "60"})
    assert status == 200


def test_token_put_with_x_forwarded_for_is_403(emu):
    for name in ("X-Forwarded-For", "x-forwarded-for"):
        status, _, _ = emu.request("PUT", "/latest/api/token", {TTL: "60", name: "10.0.0.1"})
        assert status == 403


@pytest.mark.parametrize("path", ["/2021-03-23/api/token", "/2012-01-12/api/token"])
def test_token_put_to_versioned_path_is_403(emu, path):
    assert emu.request("PUT", path, {TTL: "60"})[0] == 403


@pytest.mark.parametrize("path", ["/latest/meta-data/", "/", "/latest/api/tokens", CREDS])
def test_put_elsewhere_is_403(emu, path):
    assert emu.request("PUT", path, {TTL: "60"})[0] == 403


def test_token_put_works_when_tokens_required(emu):
    emu.set_state(tokens="required")
    token = emu.token()
    assert emu.get("/latest/meta-data/instance-id", token)[0] == 200


# ------------------------------------------------------------------------------------------
# Token use on GET/HEAD; methods (EC2 UG "How Instance Metadata Service Version 2 works";
# "Retrieve instance metadata", Responses and error messages)
# ------------------------------------------------------------------------------------------

def test_valid_token_is_accepted_with_any_header_case(emu):
    token = emu.token()
    status, _, body = emu.request("GET", "/latest/meta-data/instance-id",
                                  {"x-AWS-ec2-METADATA-token": token})
    assert (status, body) == (200, b"i-0123456789abcdef0")


@pytest.mark.parametrize("token", ["bogus", "", "AQAEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="])
def test_invalid_token_is_401(emu, token):
    status, headers, body = emu.get("/latest/meta-data/instance-id", token)
    assert status == 401
    assert b"<title>401 - Unauthorized</title>" in body


def test_expired_token_is_401(emu):
    token = emu.token(ttl=1)
    assert emu.get("/latest/meta-data/instance-id", token)[0] == 200
    time.sleep(1.1)
    assert emu.get("/latest/meta-data/instance-id", token)[0] == 401


def test_cleared_tokens_are_401(emu):
    token = emu.token()
    emu.control("POST", "/tokens/clear")
    assert emu.get("/latest/meta-data/instance-id", token)[0] == 401


def test_tokens_required_rejects_tokenless_requests(emu):
    emu.set_state(tokens="required")
    assert emu.get("/latest/meta-data/instance-id")[0] == 401
    assert emu.get(CREDS)[0] == 401
    assert emu.request("HEAD", "/latest/meta-data/")[0] == 401


def test_tokens_required_from_the_command_line():
    emulator = Emulator("--listen", "127.0.0.1:0", "--tokens", "required")
    try:
        assert emulator.get("/latest/meta-data/")[0] == 401
        assert emulator.get("/latest/meta-data/", emulator.token())[0] == 200
    finally:
        assert emulator.stop() == 0


def test_tokens_optional_serves_tokenless_requests(emu):
    assert emu.get("/latest/meta-data/instance-id")[0] == 200


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECTX"])
def test_other_methods_are_405(emu, method):
    status, headers, body = emu.request(method, "/latest/meta-data/", body=b"x")
    assert status == 405
    assert b"405 - Method Not Allowed" in body


def test_head_has_get_headers_and_no_body(emu):
    for path in ["/latest/meta-data/instance-id", "/latest/meta-data/", CREDS, "/nope"]:
        get_status, get_headers, get_body = emu.get(path)
        status, headers, body = emu.request("HEAD", path)
        assert status == get_status
        assert body == b""
        assert headers["content-length"] == str(len(get_body)) == get_headers["content-length"]
        assert headers["content-type"] == get_headers["content-type"]


# ------------------------------------------------------------------------------------------
# Response format (EC2 UG "Retrieve instance metadata", Responses and error messages; the
# Server header, the XHTML error pages and no final newline are 🟡: reported from real
# instances, not in AWS docs)
# ------------------------------------------------------------------------------------------

def test_success_headers_and_no_trailing_newline(emu):
    for path in ["/latest/meta-data/instance-id", "/latest/meta-data/", CREDS,
                 "/latest/dynamic/instance-identity/document"]:
        status, headers, body = emu.get(path)
        assert status == 200
        assert headers["content-type"] == "text/plain"  # also for JSON documents
        assert headers["server"] == "EC2ws"
        assert headers["content-length"] == str(len(body))
        assert not body.endswith(b"\n")


def test_404_is_the_html_page(emu):
    status, headers, body = emu.get("/latest/meta-data/no-such-thing")
    assert status == 404
    assert headers["content-type"] == "text/html"
    assert headers["server"] == "EC2ws"
    text = body.decode()
    assert text.startswith('<?xml version="1.0" encoding="iso-8859-1"?>')
    assert "<title>404 - Not Found</title>" in text and "<h1>404 - Not Found</h1>" in text


def test_403_page(emu):
    status, _, body = emu.request("PUT", "/2021-03-23/api/token", {TTL: "5"})
    assert status == 403 and b"<title>403 - Forbidden</title>" in body


def test_keep_alive_reuses_one_connection(emu):
    host, port = emu.listeners[0]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("PUT", "/latest/api/token", body=b"ignored body", headers={TTL: "60"})
        response = conn.getresponse()
        token = response.read().decode()
        assert response.status == 200
        sock = conn.sock
        for path in ["/latest/meta-data/mac", "/nope", CREDS]:
            conn.request("GET", path, headers={TOKEN: token})
            response = conn.getresponse()
            response.read()
            assert response.getheader("Connection") is None
            assert conn.sock is sock  # not reconnected
        conn.request("HEAD", "/latest/meta-data/")
        conn.getresponse().read()
        conn.request("GET", "/latest/meta-data/instance-id")
        assert conn.getresponse().read() == b"i-0123456789abcdef0"
    finally:
        conn.close()
    status, log = emu.control("GET", "/requests")
    assert len({tuple(entry["client"]) for entry in log}) == 1  # one client port: one connection
    assert len(log) == 6


def test_http10_client_gets_connection_close(emu):
    # Read until the server closes: it must.
    data = emu.raw(b"GET /latest/meta-data/mac HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                   until_closed=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert body == b"0e:11:22:33:44:55"


def test_http11_connection_close_is_honoured(emu):
    request = b"GET /latest/meta-data/mac HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = emu.raw(request, until_closed=True)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"0e:11:22:33:44:55")


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET /latest/meta-data/ HTTP/9.9\r\n\r\n"])
def test_malformed_request_gets_an_error_and_close(emu, raw):
    data = emu.raw(raw, until_closed=True)
    assert re.match(rb"HTTP/1\.[01] (400|505) ", data)
    assert b"Server: EC2ws" in data


def test_concurrent_requests(emu):
    def fetch(i):
        path = CREDS if i % 2 else "/latest/meta-data/instance-id"
        return emu.get(path)[0]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        assert set(pool.map(fetch, range(200))) == {200}


# ------------------------------------------------------------------------------------------
# Versions and the tree (EC2 UG "Retrieve instance metadata", Get the available versions of the
# instance metadata; "Instance metadata categories"; path spellings 🟡, not in AWS docs)
# ------------------------------------------------------------------------------------------

def test_root_lists_versions(emu):
    versions = emu.text("/").split("\n")
    for required in ["1.0", "2007-01-19", "2009-04-04", "2012-01-12", "2016-04-19", "2016-09-02",
                     "2018-05-23", "2020-08-24", "2021-01-03", "2021-03-23"]:
        assert required in versions
    assert versions[0] == "1.0" and versions[-1] == "latest"
    assert versions == sorted(versions)


def test_version_listing(emu):
    assert emu.text("/latest/") == "dynamic\nmeta-data"
    assert emu.text("/latest") == "dynamic\nmeta-data"
    emu.set_state(user_data="#!/bin/sh\necho hi\n")
    assert emu.text("/2012-01-12/") == "dynamic\nmeta-data\nuser-data"
    status, headers, body = emu.get("/latest/user-data")
    assert (status, body) == (200, b"#!/bin/sh\necho hi\n")


def test_user_data_absent_is_404(emu):
    assert emu.get("/latest/user-data")[0] == 404


@pytest.mark.parametrize("path", ["/2099-01-01/meta-data/", "/v2/meta-data/", "/LATEST/meta-data/",
                                  "/latest/metadata/", "/meta-data/"])
def test_unknown_version_or_category_is_404(emu, path):
    assert emu.get(path)[0] == 404


@pytest.mark.parametrize("path,since", [
    ("meta-data/iam/info", "2012-01-12"),
    (f"meta-data/iam/security-credentials/{ROLE}", "2012-01-12"),
    (f"meta-data/iam/security-credentials-extended/{ROLE}", "2012-01-12"),
    ("meta-data/identity-credentials/ec2/info", "2018-05-23"),
    ("meta-data/identity-credentials/ec2/security-credentials/ec2-instance", "2018-05-23"),
    ("meta-data/placement/region", "2020-08-24"),
])
def test_categories_exist_from_their_version_on(emu, path, since):
    versions = emu.text("/").split("\n")
    index = versions.index(since)
    assert emu.get(f"/{versions[index - 1]}/{path}")[0] == 404
    assert emu.get(f"/1.0/{path}")[0] == 404
    for version in versions[index:]:
        assert emu.get(f"/{version}/{path}")[0] == 200, version


def test_older_versions_do_not_list_newer_categories(emu):
    assert "iam/" not in emu.text("/2011-05-01/meta-data/").split("\n")
    assert "iam/" in emu.text("/2012-01-12/meta-data/").split("\n")
    assert "identity-credentials/" not in emu.text("/2016-09-02/meta-data/").split("\n")
    assert emu.text("/2019-10-01/meta-data/placement/") == "availability-zone\navailability-zone-id"


def test_every_dated_version_serves_the_same_credentials(emu):
    expected = emu.text(CREDS)
    for version in emu.text("/").split("\n"):
        if version >= "2012-01-12":
            assert emu.text(CREDS.replace("/latest/", f"/{version}/")) == expected


def test_meta_data_leaves(emu):
    expected = {
        "ami-id": "ami-0abcdef1234567890",
        "ami-launch-index": "0",
        "instance-id": "i-0123456789abcdef0",
        "instance-type": "t3.micro",
        "local-ipv4": "172.31.16.10",
        "local-hostname": "ip-172-31-16-10.ec2.internal",
        "hostname": "ip-172-31-16-10.ec2.internal",
        "mac": "0e:11:22:33:44:55",
        "public-ipv4": "203.0.113.10",
        "public-hostname": "ec2-203-0-113-10.compute-1.amazonaws.com",
        "placement/availability-zone": "us-east-1a",
        "placement/region": "us-east-1",
        "services/domain": "amazonaws.com",
        "services/partition": "aws",
    }
    for path, value in expected.items():
        assert emu.text(f"/latest/meta-data/{path}") == value, path
    assert emu.get("/latest/meta-data/ipv6")[0] == 404  # primary ENI has no IPv6


def test_meta_data_listing(emu):
    names = emu.text("/latest/meta-data/").split("\n")
    for name in ["ami-id", "ami-launch-index", "hostname", "iam/", "identity-credentials/",
                 "instance-id", "instance-type", "local-hostname", "local-ipv4", "mac",
                 "network/", "placement/", "public-hostname", "public-ipv4", "services/"]:
        assert name in names
    assert names == sorted(names)


@pytest.mark.parametrize("directory,listing", [
    ("/latest/meta-data/iam", "info\nsecurity-credentials/\nsecurity-credentials-extended/"),
    ("/latest/meta-data/iam/security-credentials", ROLE),
    ("/latest/meta-data/iam/security-credentials-extended", ROLE),
    ("/latest/meta-data/services", "domain\npartition"),
    ("/latest/meta-data/network/interfaces", "macs/"),
    ("/latest/meta-data/network/interfaces/macs", "0e:11:22:33:44:55/\n0e:11:22:33:44:66/"),
    ("/latest/meta-data/identity-credentials", "ec2/"),
    ("/latest/meta-data/identity-credentials/ec2", "info\nsecurity-credentials/"),
    ("/latest/meta-data/identity-credentials/ec2/security-credentials", "ec2-instance"),
    ("/latest/dynamic", "instance-identity/"),
    ("/latest/dynamic/instance-identity", "document"),
])
def test_directories_list_with_and_without_trailing_slash(emu, directory, listing):
    for path in (directory, directory + "/"):
        status, headers, body = emu.get(path)
        # Never a redirect (🟡 no AWS document covers it; reported from real instances, e.g.
        # github.com/awslabs/aws-sdk-rust/issues/560).
        assert status == 200, path
        assert body.decode() == listing
        assert "location" not in headers


def test_role_with_trailing_slash_returns_the_credentials(emu):
    token = emu.token()
    assert emu.text(CREDS + "/", token) == emu.text(CREDS, token)
    assert emu.text(EXTENDED + "/", token) == emu.text(EXTENDED, token)


def test_wrong_role_name_is_404(emu):
    assert emu.get("/latest/meta-data/iam/security-credentials/other-role")[0] == 404
    assert emu.get(f"{CREDS}/extra")[0] == 404


def test_network_interface_fields(emu):
    base = "/latest/meta-data/network/interfaces/macs/0e:11:22:33:44:55/"
    names = emu.text(base).split("\n")
    for name in ["device-number", "interface-id", "local-ipv4s", "mac", "owner-id",
                 "public-ipv4s", "subnet-id", "subnet-ipv4-cidr-block", "vpc-id",
                 "vpc-ipv4-cidr-block", "vpc-ipv4-cidr-blocks", "vpc-ipv6-cidr-blocks",
                 "ipv4-associations/"]:
        assert name in names, name
    assert "ipv6s" not in names
    assert emu.text(base + "device-number") == "0"
    assert emu.text(base + "owner-id") == "123456789012"
    assert emu.text(base + "public-ipv4s") == "203.0.113.10"
    assert emu.text(base + "vpc-id") == "vpc-0abc1234def567890"
    assert emu.text(base + "ipv4-associations/") == "203.0.113.10"
    assert emu.text(base + "ipv4-associations/203.0.113.10") == "172.31.16.10"
    assert emu.get(base + "ipv6s")[0] == 404  # field absent for this ENI
    second = "/latest/meta-data/network/interfaces/macs/0e:11:22:33:44:66/"
    assert emu.text(second + "ipv6s") == "2001:db8:1::10"
    assert emu.text(second + "public-ipv4s") == "203.0.113.20"
    assert emu.text(second + "device-number") == "1"
    assert emu.text(second + "vpc-id") == "vpc-0abc1234def567890"
    assert emu.text(second + "subnet-ipv6-cidr-blocks") == "2001:db8:1::/64"


def test_interfaces_can_be_replaced(emu):
    emu.set_state(interfaces=[{
        "mac": "0e:00:00:00:00:01", "local_ipv4s": [], "public_ipv4s": [],
        "ipv6s": ["2001:db8:9::1", "2001:db8:9::2"], "vpc_id": "vpc-09999999999999999"}])
    assert emu.text("/latest/meta-data/network/interfaces/macs/") == "0e:00:00:00:00:01/"
    assert emu.text("/latest/meta-data/ipv6") == "2001:db8:9::1"
    # ipv6 from 2021-01-03 (EC2 UG "Instance metadata categories").
    assert emu.get("/2020-10-27/meta-data/ipv6")[0] == 404
    for missing in ["local-ipv4", "public-ipv4", "public-hostname"]:
        assert emu.get(f"/latest/meta-data/{missing}")[0] == 404
    mac = "/latest/meta-data/network/interfaces/macs/0e:00:00:00:00:01/"
    assert emu.text(mac + "ipv6s") == "2001:db8:9::1\n2001:db8:9::2"
    assert emu.get(mac + "local-ipv4s")[0] == 404


def test_instance_identity_document(emu):
    body = emu.text("/latest/dynamic/instance-identity/document")
    document = json.loads(body)
    assert list(document) == [
        "accountId", "architecture", "availabilityZone", "billingProducts", "devpayProductCodes",
        "marketplaceProductCodes", "imageId", "instanceId", "instanceType", "kernelId",
        "pendingTime", "privateIp", "ramdiskId", "region", "version"]
    assert document["accountId"] == "123456789012"
    assert document["instanceId"] == "i-0123456789abcdef0"
    assert document["region"] == "us-east-1"
    assert document["privateIp"] == "172.31.16.10"
    assert document["version"] == "2017-09-30"
    assert body.split("\n")[1] == '  "accountId" : "123456789012",'
    assert '  "billingProducts" : null,' in body.split("\n")


# ------------------------------------------------------------------------------------------
# IAM documents (EC2 UG "IAM roles for Amazon EC2", Retrieve security credentials from instance
# metadata; "Instance metadata categories"; EC2 API Reference, ModifyInstanceMetadataOptions,
# HttpTokens)
# ------------------------------------------------------------------------------------------

def parse_aws_json(body: str) -> list[tuple[str, str]]:
    """Check the exact IMDS rendering and return the (key, value) pairs in order."""
    lines = body.split("\n")
    assert lines[0] == "{" and lines[-1] == "}"
    pairs = []
    for i, line in enumerate(lines[1:-1]):
        last = i == len(lines) - 3
        match = re.fullmatch(r'  "([A-Za-z]+)" : "([^"]*)"' + ("" if last else ","), line)
        assert match, line
        pairs.append(match.groups())
    return pairs


def test_iam_info_exact_format(emu):
    pairs = parse_aws_json(emu.text("/latest/meta-data/iam/info"))
    assert [k for k, _ in pairs] == ["Code", "LastUpdated", "InstanceProfileArn",
                                     "InstanceProfileId"]
    values = dict(pairs)
    assert values["Code"] == "Success"
    assert TIMESTAMP.match(values["LastUpdated"])
    assert values["InstanceProfileArn"] == f"arn:aws:iam::123456789012:instance-profile/{ROLE}"
    assert re.fullmatch(r"AIPA[A-Z0-9]{17}", values["InstanceProfileId"])


def check_credentials(body: str, prefix: str, extended: bool = False) -> dict:
    pairs = parse_aws_json(body)
    keys = ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token",
            "Expiration"] + (["AccountId"] if extended else [])
    assert [k for k, _ in pairs] == keys
    values = dict(pairs)
    assert values["Code"] == "Success" and values["Type"] == "AWS-HMAC"
    assert re.fullmatch(r"ASIA" + prefix + r"[A-Z0-9]{14}", values["AccessKeyId"])
    assert len(values["SecretAccessKey"]) == 40
    assert len(values["Token"]) > 100
    for key in ("LastUpdated", "Expiration"):
        assert TIMESTAMP.match(values[key])
    now = datetime.datetime.now(datetime.timezone.utc)
    expiration = datetime.datetime.strptime(values["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    lifetime = expiration.replace(tzinfo=datetime.timezone.utc) - now
    assert datetime.timedelta(hours=5, minutes=55) < lifetime <= datetime.timedelta(hours=6)
    if extended:
        assert values["AccountId"] == "123456789012"
    return values


def test_imdsv2_credentials_format(emu):
    values = check_credentials(emu.text(CREDS, emu.token()), "V2")
    assert values == emu.state()["credentials"]["v2"]


def test_imdsv1_and_imdsv2_get_different_credentials(emu):
    v1 = check_credentials(emu.text(CREDS), "V1")
    v2 = check_credentials(emu.text(CREDS, emu.token()), "V2")
    for key in ("AccessKeyId", "SecretAccessKey", "Token"):
        assert v1[key] != v2[key]
    assert v1 == emu.state()["credentials"]["v1"]


def test_extended_adds_account_id_last(emu):
    token = emu.token()
    legacy = emu.text(CREDS, token)
    extended = emu.text(EXTENDED, token)
    check_credentials(extended, "V2", extended=True)
    assert extended.startswith(legacy[:-2])  # same document, AccountId appended
    check_credentials(emu.text(EXTENDED), "V1", extended=True)


def test_extended_can_be_switched_off(emu):
    emu.set_state(extended=False)
    assert emu.get(EXTENDED)[0] == 404
    assert emu.get("/latest/meta-data/iam/security-credentials-extended/")[0] == 404
    assert emu.text("/latest/meta-data/iam/") == "info\nsecurity-credentials/"
    assert emu.get(CREDS)[0] == 200


def test_identity_credentials(emu):
    info = dict(parse_aws_json(emu.text("/latest/meta-data/identity-credentials/ec2/info")))
    assert info["Code"] == "Success" and info["AccountId"] == "123456789012"
    path = "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"
    identity = check_credentials(emu.text(path), "ID")
    assert identity == check_credentials(emu.text(path, emu.token()), "ID")


def test_no_role_attached(emu):
    emu.set_state(role=None)
    for path in ["/latest/meta-data/iam/", "/latest/meta-data/iam/info",
                 "/latest/meta-data/iam/security-credentials/", CREDS,
                 "/latest/meta-data/iam/security-credentials-extended/", EXTENDED]:
        assert emu.get(path)[0] == 404, path
    assert "iam/" not in emu.text("/latest/meta-data/").split("\n")
    # The instance identity role is independent of the attached role.
    assert emu.get("/latest/meta-data/identity-credentials/ec2/info")[0] == 200


def test_role_can_be_renamed(emu):
    emu.set_state(role="other-role", instance_profile="other-profile")
    assert emu.text("/latest/meta-data/iam/security-credentials/") == "other-role"
    check_credentials(emu.text("/latest/meta-data/iam/security-credentials/other-role"), "V1")
    assert emu.get(CREDS)[0] == 404
    info = dict(parse_aws_json(emu.text("/latest/meta-data/iam/info")))
    assert info["InstanceProfileArn"].endswith(":instance-profile/other-profile")


def test_rotate_issues_new_sets(emu):
    before = emu.state()["credentials"]
    status, state = emu.control("POST", "/rotate")
    assert status == 200
    after = state["credentials"]
    for name in ("v1", "v2", "identity"):
        assert after[name]["AccessKeyId"] != before[name]["AccessKeyId"]
        assert after[name]["LastUpdated"] >= before[name]["LastUpdated"]
        assert after[name]["Expiration"] >= before[name]["Expiration"]
    check_credentials(emu.text(CREDS), "V1")
    assert dict(parse_aws_json(emu.text(CREDS)))["AccessKeyId"] == after["v1"]["AccessKeyId"]


def test_credentials_merge_sets_and_deletes_fields(emu):
    emu.set_state(credentials={"v2": {"Expiration": "2030-01-01T00:00:00Z", "Token": None,
                                      "Extra": "x"}})
    pairs = parse_aws_json(emu.text(CREDS, emu.token()))
    assert [k for k, _ in pairs] == ["Code", "LastUpdated", "Type", "AccessKeyId",
                                     "SecretAccessKey", "Expiration", "Extra"]
    assert dict(pairs)["Expiration"] == "2030-01-01T00:00:00Z"
    check_credentials(emu.text(CREDS), "V1")  # v1 untouched


def test_error_code_document(emu):
    message = "EC2 cannot assume the role credlock-test-role."
    emu.set_state(credentials={"v1": {"Code": "AssumeRoleUnauthorizedAccess", "Message": message}})
    pairs = parse_aws_json(emu.text(CREDS))
    assert [k for k, _ in pairs] == ["Code", "Message", "LastUpdated"]
    assert dict(pairs)["Code"] == "AssumeRoleUnauthorizedAccess"
    # Errors come as 200 with a JSON Code (🟡 not in the EC2 UG; AWS SDKs handle it:
    # botocore/utils.py InstanceMetadataFetcher, aws-config src/imds/credentials.rs).
    assert emu.get(CREDS)[0] == 200


def test_botocore_accepts_the_credentials(emu):
    botocore_utils = pytest.importorskip("botocore.utils")
    host, port = emu.listeners[0]
    fetcher = botocore_utils.InstanceMetadataFetcher(
        timeout=2, num_attempts=1, base_url=f"http://{host}:{port}/")
    creds = fetcher.retrieve_iam_role_credentials()
    assert creds["role_name"] == ROLE
    # botocore uses IMDSv2 first (botocore/utils.py, IMDSFetcher; AWS SDKs and Tools Reference
    # Guide, "IMDS credential provider").
    assert creds["access_key"].startswith("ASIAV2")
    assert creds["access_key"] == emu.state()["credentials"]["v2"]["AccessKeyId"]


# ------------------------------------------------------------------------------------------
# Deliberate leniency (module docstring; ❓ EC2 UG "Retrieve instance metadata" does not say how
# IMDS normalises paths)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "//latest//meta-data//iam/info", "/latest/meta-data/iam/info?x=1",
    "/latest/meta-data/iam/info/?", "http://169.254.169.254/latest/meta-data/iam/info",
])
def test_lenient_canonicalisation(emu, path):
    assert emu.get(path)[0] == 200


@pytest.mark.parametrize("path", [
    "/latest/meta-data/iam/%69nfo", "/latest/meta-data/iam/../iam/info",
    "/latest/meta-data/./iam/info", "/latest/meta-data/iam%2Finfo",
])
def test_no_decoding_or_dot_segments(emu, path):
    assert emu.get(path)[0] == 404


def test_lenient_credentials_path_still_returns_credentials(emu):
    check_credentials(emu.text(f"//latest/meta-data/iam//security-credentials/{ROLE}?a=b"), "V1")


# ------------------------------------------------------------------------------------------
# Control API
# ------------------------------------------------------------------------------------------

def test_control_is_not_served_on_imds_listener(emu):
    assert emu.get("/state")[0] == 404
    assert emu.request("POST", "/rotate")[0] == 405


def test_request_log(emu):
    token = emu.token()
    emu.request("GET", "/latest/meta-data/instance-id?q=1", {TOKEN: token, "X-Test": "yes"})
    log = emu.control("GET", "/requests")[1]
    assert [(e["method"], e["path"], e["status"]) for e in log] == [
        ("PUT", "/latest/api/token", 200), ("GET", "/latest/meta-data/instance-id?q=1", 200)]
    headers = log[1]["headers"]
    assert ["X-Test", "yes"] in headers and [TOKEN, token] in headers
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in headers)
    assert emu.control("POST", "/requests/clear")[0] == 200
    assert emu.control("GET", "/requests")[1] == []


def test_request_log_keeps_the_last_1000(emu):
    host, port = emu.listeners[0]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for i in range(1005):
            conn.request("GET", f"/latest/meta-data/instance-id?n={i}")
            conn.getresponse().read()
    finally:
        conn.close()
    log = emu.control("GET", "/requests")[1]
    assert len(log) == 1000
    assert log[0]["path"].endswith("?n=5") and log[-1]["path"].endswith("?n=1004")


def test_delay_ms(emu):
    emu.set_state(delay_ms=300)
    started = time.monotonic()
    assert emu.get("/latest/meta-data/instance-id")[0] == 200
    assert time.monotonic() - started >= 0.3


def test_down_closes_without_answer(emu):
    emu.set_state(down=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        emu.get("/latest/meta-data/instance-id")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        emu.request("PUT", "/latest/api/token", {TTL: "60"})
    assert emu.control("GET", "/requests")[1][0]["status"] == "dropped"
    emu.set_state(down=False)
    assert emu.get("/latest/meta-data/instance-id")[0] == 200


@pytest.mark.parametrize("patch", [
    {"tokens": "sometimes"}, {"role": 5}, {"role": "a/b"}, {"delay_ms": -1}, {"down": "yes"},
    {"interfaces": [{"no_mac": 1}]}, {"interfaces": [{"mac": "m", "ipv6s": "2001:db8::1"}]},
    {"interfaces": [{"mac": "m", "bogus": 1}]}, {"credentials": {"v3": {}}}, {"unknown": 1},
    {"instance_id": "i-1"},
])
def test_invalid_state_patch_is_400_and_changes_nothing(emu, patch):
    emu.assert_refused_unchanged("/state", patch)


def test_state_shows_what_is_served(emu):
    state = emu.state()
    assert state["tokens"] == "optional" and state["role"] == ROLE
    assert state["instance_id"] == "i-0123456789abcdef0"
    assert state["delay_ms"] == 0 and state["down"] is False
    emu.token()
    assert emu.state()["active_tokens"] == 1


def test_reset_restores_start_state(emu):
    token = emu.token()
    emu.set_state(role=None, tokens="required")
    emu.control("POST", "/reset")
    assert emu.state()["role"] == ROLE and emu.state()["tokens"] == "optional"
    assert emu.get("/latest/meta-data/instance-id", token)[0] == 401  # tokens cleared


# ------------------------------------------------------------------------------------------
# --instance file
# ------------------------------------------------------------------------------------------

def test_instance_example_file():
    emulator = Emulator("--listen", "127.0.0.1:0", "--instance", str(INSTANCE_EXAMPLE))
    try:
        meta = "/latest/meta-data/"
        assert emulator.text(meta + "instance-id") == "i-0fedcba9876543210"
        assert emulator.text(meta + "placement/region") == "eu-west-1"
        assert emulator.text(meta + "local-hostname") == "ip-10-20-1-15.eu-west-1.compute.internal"
        assert emulator.text(meta + "public-hostname") == \
            "ec2-198-51-100-7.eu-west-1.compute.amazonaws.com"
        assert emulator.text(meta + "ipv6") == "2001:db8:20:1::15"
        assert emulator.text(meta + "iam/security-credentials/") == "example-app-role"
        info = dict(parse_aws_json(emulator.text(meta + "iam/info")))
        assert info["InstanceProfileArn"] == \
            "arn:aws:iam::210987654321:instance-profile/example-app-profile"
        assert info["InstanceProfileId"] == "AIPAEXAMPLEPROFILE123"
        mac = meta + "network/interfaces/macs/06:aa:bb:cc:dd:01/"
        assert emulator.text(mac + "public-ipv4s") == "198.51.100.7\n198.51.100.8"
        assert emulator.text(mac + "ipv4-associations/198.51.100.8") == "10.20.1.16"
        assert emulator.text(mac + "vpc-ipv4-cidr-blocks") == "10.20.0.0/16\n100.64.0.0/16"
        second = meta + "network/interfaces/macs/06:aa:bb:cc:dd:02/"
        assert emulator.get(second + "public-ipv4s")[0] == 404
        assert emulator.get(second + "ipv4-associations/")[0] == 404
        assert emulator.text("/latest/user-data") == "#!/bin/sh\necho hello from user-data\n"
        document = json.loads(emulator.text("/latest/dynamic/instance-identity/document"))
        assert (document["accountId"], document["architecture"]) == ("210987654321", "arm64")
    finally:
        assert emulator.stop() == 0
