"""A recording front for STS: an HTTP server in the test's own process, between credlock (or
any client: AWS_ENDPOINT_URL_STS points at it) and moto's STS, that records every call and
passes it on unchanged.

Why: moto answers STS calls but does not verify signatures, so it cannot say WHICH credentials
signed an AssumeRole. The front can: for every call it records the access key that signed it and
the session token it carried, so a test can prove which credentials credlock used (a task's own
raw set for its task's AssumeRole, the source profile's key for `credlock credentials`, never
another task's), and, from the answer, exactly which set STS issued for that call (so a served
or printed set can be traced back to the one AssumeRole that issued it).

The STS protocol rules relied on:
  * STS API Reference, "Common Parameters": a Query API request names its operation in
    Action (in the query string or, as the SDKs send it, the form-encoded POST body), and a
    request signed with temporary credentials carries the session token in
    X-Amz-Security-Token.
  * AWS General Reference, "Signature Version 4 signing process" (now IAM User Guide, "Create a
    signed AWS API request"): the Authorization header's Credential= field is
    ACCESS-KEY-ID/YYYYMMDD/REGION/SERVICE/aws4_request, so its first part is the access key
    that signed the request.
  * STS API Reference, "AssumeRole": the request's RoleArn, RoleSessionName, Policy and
    SourceIdentity parameters; the answer's Credentials (AccessKeyId, SecretAccessKey,
    SessionToken, Expiration).
  * A refused AssumeRole (IAM User Guide, "Troubleshooting IAM roles": the caller may not assume
    the role) is answered 403 with an ErrorResponse document, Type Sender, Code AccessDenied,
    "User: ... is not authorized to perform: sts:AssumeRole on resource: ROLE-ARN".

Behaviour a test chooses (RecordingSts arguments):
  deny_prefix     an AssumeRole of a role whose NAME starts with it is refused as above (a role
                  that does not trust its caller), without reaching moto; recorded with 403.
  short_prefix,   an AssumeRole of a role whose name starts with short_prefix is passed to
  short_lifetime  moto, and the issued set's Expiration rewritten to short_lifetime seconds from
                  now (to watch a cache's serving margin without waiting an hour).
  session_prefix  what assumes() and issued_for() look at: only AssumeRole calls whose
                  RoleSessionName starts with it (credlock's task sets: "credlock-ecs-"); every
                  call is recorded all the same.

Each call is recorded as a dict: action, role_arn, session, policy, source_identity (request
parameters, "" or None when absent), signer (the Credential= access key, None when unsigned),
token (X-Amz-Security-Token or None), user_agent, status (the answer's), issued (for an
AssumeRole answered 200: {AccessKeyId, SecretAccessKey, SessionToken, Expiration} as the client
got them; else None), issued_key (issued["AccessKeyId"] or None) and time (time.monotonic() when
the call reached the front, before it was passed on). Queries return copies.

Standard library and standin.py (its HTTP/1.1 handler base and threaded server); a test module
puts this folder on sys.path and imports it as `recording_sts`.
"""

from __future__ import annotations

import datetime
import http.client
import re
import threading
import time
import urllib.parse
import uuid
from typing import Iterable

import standin

DEFAULT_ACCOUNT = "123456789012"  # moto's default account
# Headers of one connection, not of the message (RFC 9110 7.6.1), plus the framing the front
# sets itself (Content-Length) or handles (Expect): not passed on in either direction.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length", "expect"}
CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
ISSUED_FIELDS = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")


def xml_field(text: str, tag: str) -> str | None:
    found = re.search(rf"<{tag}>([^<]*)</{tag}>", text)
    return found.group(1) if found else None


def access_denied(role_arn: str, account: str = DEFAULT_ACCOUNT) -> bytes:
    """STS's refusal of an AssumeRole the caller may not make (403, Sender, AccessDenied). The
    caller's ARN is not known to the front (only its access key): a stand-in user is named."""
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">\n'
        "  <Error>\n    <Type>Sender</Type>\n    <Code>AccessDenied</Code>\n"
        f"    <Message>User: arn:aws:iam::{account}:user/recording-sts-caller is not authorized "
        f"to perform: sts:AssumeRole on resource: {role_arn}</Message>\n  </Error>\n"
        f"  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n").encode()


class _Handler(standin.BaseHandler):
    """Every method: parse, record, refuse or relay to the upstream, answer."""

    backend: "RecordingSts"  # set by standin.make_server

    def dispatch(self) -> None:
        sts = self.backend
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self.read_chunked_body()
        else:
            body = self.read_body()
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if "x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
            params.update(urllib.parse.parse_qs(body.decode("utf-8", "replace")))
        credential = CREDENTIAL.search(self.headers.get("Authorization", ""))
        record = {
            "action": params.get("Action", [""])[0],
            "role_arn": params.get("RoleArn", [""])[0],
            "session": params.get("RoleSessionName", [""])[0],
            "policy": params.get("Policy", [None])[0],
            "source_identity": params.get("SourceIdentity", [None])[0],
            "signer": credential.group(1) if credential else None,
            "token": self.headers.get("X-Amz-Security-Token"),
            "user_agent": self.headers.get("User-Agent", ""),
            "status": None,
            "issued": None,
            "issued_key": None,
            "time": time.monotonic(),
        }
        assume = record["action"] == "AssumeRole"
        role_name = record["role_arn"].rsplit("/", 1)[-1]
        if assume and sts.deny_prefix and role_name.startswith(sts.deny_prefix):
            status, data = 403, access_denied(record["role_arn"], sts.account)
            headers = [("Content-Type", "text/xml"), ("x-amzn-RequestId", str(uuid.uuid4()))]
        else:
            status, headers, data = sts.relay(self.command, self.path, self.headers, body)
            if assume and status == 200:
                data = sts.shorten(role_name, data)
                text = data.decode("utf-8", "replace")
                record["issued"] = {name: xml_field(text, name) for name in ISSUED_FIELDS}
                record["issued_key"] = record["issued"]["AccessKeyId"]
        record["status"] = status
        sts.log(record)
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class RecordingSts:
    """The front on a free 127.0.0.1 port (`url`), relaying to `upstream_url` (moto). A context
    manager; stop() shuts it down."""

    def __init__(self, upstream_url: str, *, deny_prefix: str | None = None,
                 short_prefix: str | None = None, short_lifetime: float = 0.0,
                 session_prefix: str = "", account: str = DEFAULT_ACCOUNT):
        if short_prefix and short_lifetime <= 0:
            raise ValueError("short_prefix needs a short_lifetime > 0 seconds")
        self.upstream = standin.parse_address(urllib.parse.urlsplit(upstream_url).netloc)
        self.deny_prefix = deny_prefix
        self.short_prefix = short_prefix
        self.short_lifetime = short_lifetime
        self.session_prefix = session_prefix
        self.account = account
        self.lock = threading.Lock()
        self._calls: list[dict] = []
        # The front is this object: the handler reaches it as its `backend`.
        self.server = standin.make_server("127.0.0.1:0", _Handler, self)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "RecordingSts":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- what the handler uses ----

    def relay(self, method: str, target: str, headers, body: bytes):
        """The request passed on to the upstream: (status, end-to-end headers, body)."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, target, body=body,
                         headers={k: v for k, v in headers.items()
                                  if k.lower() not in HOP_BY_HOP})
            resp = conn.getresponse()
            data = resp.read()
            return (resp.status,
                    [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP], data)
        finally:
            conn.close()

    def shorten(self, role_name: str, data: bytes) -> bytes:
        """An AssumeRole answer, its Expiration rewritten for a short_prefix role."""
        if not (self.short_prefix and role_name.startswith(self.short_prefix)):
            return data
        soon = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) \
            + datetime.timedelta(seconds=self.short_lifetime)
        return re.sub(rb"<Expiration>[^<]*</Expiration>",
                      f"<Expiration>{standin.utc_timestamp(soon)}</Expiration>".encode(), data)

    def log(self, record: dict) -> None:
        with self.lock:
            self._calls.append(record)

    # ---- queries ----

    def mark(self) -> int:
        """A position in the log: calls(mark) and assumes(mark) are the calls made after it."""
        with self.lock:
            return len(self._calls)

    def calls(self, mark: int = 0, action: str | None = None) -> list[dict]:
        """Every call since `mark`, or only those of one action."""
        with self.lock:
            calls = [dict(c) for c in self._calls[mark:]]
        return [c for c in calls if action is None or c["action"] == action]

    def assumes(self, mark: int = 0, *, session: str | None = None,
                signers: Iterable[str] | None = None,
                between: tuple[float, float] | None = None) -> list[dict]:
        """AssumeRole calls since `mark` (of session names starting with session_prefix),
        optionally only of one session name, signed with one of `signers`, or that reached the
        front within `between` (time.monotonic() bounds, inclusive)."""
        calls = [c for c in self.calls(mark, "AssumeRole")
                 if c["session"].startswith(self.session_prefix)
                 and (session is None or c["session"] == session)]
        if signers is not None:
            wanted = set(signers)
            calls = [c for c in calls if c["signer"] in wanted]
        if between is not None:
            calls = [c for c in calls if between[0] <= c["time"] <= between[1]]
        return calls

    def issued_for(self, signer: str, token: str | None = None) -> set[str]:
        """The AccessKeyIds STS issued to AssumeRole calls (of session names starting with
        session_prefix) signed with `signer`, and carrying session token `token` where given."""
        return {c["issued_key"] for c in self.assumes(signers=[signer])
                if c["issued_key"] and (token is None or c["token"] == token)}

    def call_that_issued(self, access_key: str) -> dict | None:
        """The AssumeRole call whose answer issued this AccessKeyId, if any (of any session
        name)."""
        for call in self.calls(action="AssumeRole"):
            if call["issued_key"] == access_key:
                return call
        return None
