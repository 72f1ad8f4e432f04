"""Request smuggling, pipelining and framing: every answer belongs to its own request, and no
raw value reaches a client, whatever the client sends and however the upstream frames HTTP.

The upstreams (adv_upstream.py) differ on purpose: `ignorebody` parses request bodies as the
next request (like python's http.server), `readbody` reads them, `closeearly` closes after every
answer without saying so, `pieces` sends 1xx answers and chunked bodies in tiny delayed writes.
"""

from __future__ import annotations

import time

import pytest

import adversarial_lib as lib
from adversarial_lib import (CRED_PATH, EXT_PATH, ROLE, TOKEN_HEADER, TOKEN_PATH, TTL_HEADER,
                             Wire, credential_problems, echo_problems, new_id, request_bytes)

BODY_METHODS = ["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT-token"]
PERSONALITIES = ["ignorebody", "readbody", "closeearly", "pieces"]


def victims(credlock, count: int = 3) -> list[str]:
    """`count` echo requests from other clients, each on a fresh connection: what went wrong."""
    problems = []
    for _ in range(count):
        rid, reply = credlock.echo()
        problems += echo_problems(reply, rid)
    return problems


def body_request(method: str, rid: str, framing: str, body: bytes) -> tuple[bytes, bool]:
    """A request with `body` framed by Content-Length or chunked; (bytes, is HEAD)."""
    if method == "PUT-token":
        verb, target, headers = "PUT", TOKEN_PATH, [(TTL_HEADER, "21600")]
    else:
        verb, target, headers = method, f"/latest/meta-data/echo/{rid}", []
    headers.append(("X-Adv-Req", rid))
    if framing == "content-length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        payload = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    return request_bytes(verb, target, headers, payload), verb == "HEAD"


def never_reached_upstream(upstream, *markers: str) -> list[str]:
    """Log entries of the upstream that carry any of `markers` (ids, header names)."""
    hits = []
    for entry in upstream.log():
        text = repr(entry)
        if any(m in text for m in markers):
            hits.append(f"reached the upstream: {text[:300]}")
    return hits


def smuggled_payload(kind: str, token: str) -> tuple[bytes, str]:
    if kind == "unfinished-credentials-request":
        # The next request on the upstream connection completes it: its sender would get the
        # upstream's raw credentials, obtained with the attacker's token.
        return (f"GET {CRED_PATH} HTTP/1.1\r\n{TOKEN_HEADER}: {token}\r\nX-Smuggled: ".encode(),
                "X-Smuggled")
    smug = new_id("smug")
    return (f"GET /latest/meta-data/echo/{smug} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            f"X-Adv-Req: {smug}\r\n\r\n".encode(), smug)


@pytest.mark.parametrize("payload", ["unfinished-credentials-request", "complete-request"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("method", BODY_METHODS)
def test_request_body_is_refused_400_and_cannot_desync_a_body_ignoring_upstream(
        stacks, method, framing, payload):
    credlock = stacks.get("ignorebody")
    upstream = credlock.upstream
    token = credlock.token()
    attacker = new_id("atk")
    body, marker = smuggled_payload(payload, token)
    data, head = body_request(method, attacker, framing, body)
    reply = credlock.exchange(data, head=head)
    problems = [] if reply is None else [f"attacker: {f}" for f in reply.findings()]
    time.sleep(0.05)
    problems += victims(credlock)
    problems += never_reached_upstream(upstream, attacker, marker)
    if reply is None or reply.status != 400:
        problems.append(f"a request with a body must be refused locally with 400: {reply!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("method", BODY_METHODS)
def test_request_body_is_refused_400_and_never_reaches_a_body_reading_upstream(
        stacks, method, framing):
    credlock = stacks.get("readbody")
    attacker = new_id("atk")
    data, head = body_request(method, attacker, framing, b"harmless=body&x=1")
    reply = credlock.exchange(data, head=head)
    problems = [] if reply is None else [f"attacker: {f}" for f in reply.findings()]
    problems += never_reached_upstream(credlock.upstream, attacker)
    problems += victims(credlock, 1)
    if reply is None or reply.status != 400:
        problems.append(f"a request with a body must be refused locally with 400: {reply!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("method", ["GET", "PUT-token"])
def test_content_length_zero_is_not_a_body_and_is_served(stacks, method):
    credlock = stacks.get("ignorebody")
    rid = new_id()
    data, _ = body_request(method, rid, "content-length", b"")
    reply = credlock.exchange(data)
    assert reply is not None and reply.status == 200 and not reply.findings(), reply
    if method == "GET":
        assert not echo_problems(reply, rid)
    assert not victims(credlock, 1)


@pytest.mark.parametrize("method", ["GET", "PUT-token"])
def test_transfer_encoding_chunked_with_empty_body_is_refused_400(stacks, method):
    credlock = stacks.get("readbody")
    rid = new_id("atk")
    data, _ = body_request(method, rid, "chunked", b"")
    data = data.replace(b"0\r\n\r\n0\r\n\r\n", b"0\r\n\r\n")  # just the last chunk
    reply = credlock.exchange(data)
    problems = never_reached_upstream(credlock.upstream, rid)
    if reply is None or reply.status != 400:
        problems.append(f"any Transfer-Encoding must be refused with 400: {reply!r}")
    assert not problems, "\n".join(problems)


def test_content_length_plus_transfer_encoding_is_refused_and_cannot_desync(stacks):
    credlock = stacks.get("ignorebody")
    token = credlock.token()
    rid = new_id("atk")
    body, marker = smuggled_payload("unfinished-credentials-request", token)
    chunked = b"0\r\n\r\n" + body
    data = request_bytes("GET", f"/latest/meta-data/echo/{rid}", [
        ("X-Adv-Req", rid), ("Content-Length", str(len(chunked))),
        ("Transfer-Encoding", "chunked")], chunked)
    reply = credlock.exchange(data)
    problems = [] if reply is None else reply.findings()
    time.sleep(0.05)
    problems += victims(credlock)
    problems += never_reached_upstream(credlock.upstream, rid, marker)
    if reply is not None and reply.status != 400:
        problems.append(f"Content-Length with Transfer-Encoding must be refused: {reply!r}")
    assert not problems, "\n".join(problems)


def pipelined_sequence(credlock, token: str):
    """(request bytes, expectations) of a mixed pipeline ending with Connection: close."""
    steps = []
    rid = new_id("p")
    steps.append(("token", rid, request_bytes("PUT", TOKEN_PATH, [(TTL_HEADER, "300"),
                                                                   ("X-Adv-Req", rid)])))
    for kind in ("echo", "head-echo", "creds", "head-creds", "echo", "listing", "ext-creds",
                 "echo", "head-echo", "creds"):
        rid = new_id("p")
        if kind == "echo":
            data = request_bytes("GET", f"/latest/meta-data/echo/{rid}", [("X-Adv-Req", rid)])
        elif kind == "head-echo":
            data = request_bytes("HEAD", f"/latest/meta-data/echo/{rid}", [("X-Adv-Req", rid)])
        elif kind in ("creds", "head-creds", "ext-creds"):
            path = EXT_PATH if kind == "ext-creds" else CRED_PATH
            data = request_bytes("HEAD" if kind == "head-creds" else "GET", path,
                                 [(TOKEN_HEADER, token), ("X-Adv-Req", rid)])
        else:
            data = request_bytes("GET", "/latest/meta-data/iam/security-credentials/",
                                 [(TOKEN_HEADER, token), ("X-Adv-Req", rid)])
        steps.append((kind, rid, data))
    rid = new_id("p")
    steps.append(("echo", rid, request_bytes("GET", f"/latest/meta-data/echo/{rid}",
                                             [("X-Adv-Req", rid)], close=True)))
    return steps


def check_step(kind: str, rid: str, reply, locked_key: str) -> list[str]:
    if reply is None:
        return [f"{kind} {rid}: no answer"]
    problems = [f"{kind} {rid}: {f}" for f in reply.findings()]
    req = reply.header("X-Adv-Req")
    if req is not None and req != rid:
        problems.append(f"{kind} {rid}: answer carries request id {req!r}: {reply!r}")
    if kind == "echo":
        problems += echo_problems(reply, rid)
    elif kind == "head-echo":
        length = reply.header("Content-Length")
        if reply.status != 200 or (length is not None and int(length) != len(f"ECHO {rid}")):
            problems.append(f"{kind} {rid}: not its own answer: {reply!r}")
    elif kind in ("creds", "ext-creds", "head-creds"):
        problems += [f"{kind} {rid}: {p}" for p in
                     credential_problems(reply, locked_key, rid, head=kind == "head-creds")]
    elif kind == "listing":
        if reply.status != 200 or reply.body.strip() != ROLE.encode():
            problems.append(f"{kind} {rid}: not the role listing: {reply!r}")
    elif kind == "token":
        target = reply.header("X-Adv-Target")
        if reply.status != 200 or b"ECHO" in reply.body or not reply.body or (
                target is not None and target != TOKEN_PATH):
            problems.append(f"{kind} {rid}: not a token answer: {reply!r}")
    return problems


@pytest.mark.parametrize("personality", PERSONALITIES)
def test_pipelined_mixed_requests_are_answered_in_order_each_with_its_own_answer(
        stacks, personality):
    credlock = stacks.get(personality)
    token = credlock.token()
    steps = pipelined_sequence(credlock, token)
    wire = Wire(credlock.addr, timeout=10)
    problems = []
    try:
        wire.send(b"".join(data for _, _, data in steps))
        for kind, rid, _ in steps:
            reply = wire.reply(head=kind.startswith("head"))
            problems += check_step(kind, rid, reply, credlock.locked_key)
        problems += [f"stream: {f}" for f in lib.raw_findings(wire.received)]
    finally:
        wire.close()
    problems += victims(credlock, 2)
    assert not problems, "\n".join(problems)


def test_pipelined_request_with_body_mid_sequence_cannot_shift_later_answers(stacks):
    credlock = stacks.get("ignorebody")
    token = credlock.token()
    body, _ = smuggled_payload("unfinished-credentials-request", token)
    first, smuggler, after = new_id("a"), new_id("atk"), new_id("c")
    data = (request_bytes("GET", f"/latest/meta-data/echo/{first}", [("X-Adv-Req", first)])
            + request_bytes("GET", f"/latest/meta-data/echo/{smuggler}", [
                ("X-Adv-Req", smuggler), ("Content-Length", str(len(body)))], body)
            + request_bytes("GET", f"/latest/meta-data/echo/{after}", [("X-Adv-Req", after)],
                            close=True))
    wire = Wire(credlock.addr, timeout=10)
    problems = []
    try:
        wire.send(data)
        problems += echo_problems(wire.reply(), first)
        reply = wire.reply()
        if reply is None or reply.status != 400:
            problems.append(f"the request with a body must get 400: {reply!r}")
        try:
            last = wire.reply()
        except lib.Incomplete as err:
            last = None
            problems.append(f"cut answer: {err}")
        if last is not None:  # credlock may close after refusing a body; if not, C is C's
            problems += echo_problems(last, after)
        problems += [f"stream: {f}" for f in lib.raw_findings(wire.received)]
    finally:
        wire.close()
    time.sleep(0.05)
    problems += victims(credlock)
    assert not problems, "\n".join(problems)


def test_unfinished_request_head_is_never_forwarded_and_is_closed_within_10s(stacks):
    credlock = stacks.get("readbody")
    rid = new_id("u")
    wire = Wire(credlock.addr, timeout=12)
    try:
        wire.send(f"GET /latest/meta-data/echo/{rid} HTTP/1.1\r\nHost: x\r\nX-Adv-Req: {rid}\r\n"
                  .encode())
        started = time.monotonic()
        closed = wire.closed_within(10)
        waited = time.monotonic() - started
    finally:
        wire.close()
    problems = never_reached_upstream(credlock.upstream, rid)
    if not closed:
        problems.append("an unfinished head held its connection open for 10 s")
    assert not problems, f"{problems} (waited {waited:.1f} s)"


def test_unfinished_credentials_request_pipelined_after_a_complete_one_is_never_forwarded(
        stacks):
    credlock = stacks.get("ignorebody")
    token = credlock.token()
    first, unfinished = new_id("a"), new_id("u")
    wire = Wire(credlock.addr, timeout=12)
    problems = []
    try:
        wire.send(request_bytes("GET", f"/latest/meta-data/echo/{first}", [("X-Adv-Req", first)])
                  + f"GET {CRED_PATH} HTTP/1.1\r\n{TOKEN_HEADER}: {token}\r\n"
                    f"X-Adv-Req: {unfinished}\r\n".encode())
        problems += echo_problems(wire.reply(), first)
        if not wire.closed_within(10):
            problems.append("the unfinished request held the connection for 10 s")
        problems += [f"stream: {f}" for f in lib.raw_findings(wire.received)]
    finally:
        wire.close()
    problems += never_reached_upstream(credlock.upstream, unfinished)
    problems += victims(credlock)
    assert not problems, "\n".join(problems)


def test_upstream_1xx_interim_answers_and_tiny_writes_never_misalign_answers(stacks):
    credlock = stacks.get("pieces")
    token = credlock.token()
    problems = []
    for _ in range(4):
        problems += victims(credlock, 1)
        rid = new_id("c")
        reply = credlock.get(CRED_PATH, [(TOKEN_HEADER, token), ("X-Adv-Req", rid)])
        problems += credential_problems(reply, credlock.locked_key, rid)
        rid = new_id("h")
        reply = credlock.get(f"/latest/meta-data/echo/{rid}", [("X-Adv-Req", rid)], "HEAD")
        problems += check_step("head-echo", rid, reply, credlock.locked_key)
    assert not problems, "\n".join(problems)


def test_upstream_body_sent_on_head_is_never_served_as_the_next_answer(fresh_readbody):
    credlock = fresh_readbody
    rid = new_id("hb")
    reply = credlock.get(f"/latest/meta-data/adv/headbody/{rid}", [("X-Adv-Req", rid)], "HEAD")
    problems = [] if reply is None else reply.findings()
    time.sleep(0.15)  # the bogus "body" (a complete answer with raw credentials) has arrived
    problems += victims(credlock)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["extra", "lateextra"])
def test_unsolicited_upstream_answer_is_never_served_to_another_request(fresh_readbody, kind):
    credlock = fresh_readbody
    rid = new_id("x")
    reply = credlock.get(f"/latest/meta-data/adv/{kind}/{rid}", [("X-Adv-Req", rid)])
    problems = [] if reply is None else reply.findings()
    time.sleep(0.15)
    problems += victims(credlock)
    assert not problems, "\n".join(problems)


def test_upstream_timeout_mid_answer_gives_504_and_its_late_bytes_reach_nobody(fresh_readbody):
    credlock = fresh_readbody
    rid = new_id("st")
    started = time.monotonic()
    reply = credlock.get(f"/latest/meta-data/adv/stall/{rid}", [("X-Adv-Req", rid)], timeout=8)
    took = time.monotonic() - started
    problems = [] if reply is None else reply.findings()
    if reply is None or reply.status not in (502, 504):
        problems.append(f"a stalled upstream answer must fail with 504/502: {reply!r}")
    if took > 3:
        problems.append(f"the stalled request took {took:.1f} s")
    time.sleep(1.2)  # the rest of the answer and an unsolicited raw answer have arrived
    problems += victims(credlock, 4)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["truncated", "noanswer", "halfhead"])
def test_upstream_closing_mid_answer_fails_that_request_only(stacks, kind):
    credlock = stacks.get("closeearly")
    rid = new_id("ce")
    reply = credlock.get(f"/latest/meta-data/adv/{kind}/{rid}", [("X-Adv-Req", rid)])
    problems = [] if reply is None else reply.findings()
    if reply is None or reply.status not in (502, 504):
        problems.append(f"a cut upstream answer must fail with 502: {reply!r}")
    problems += victims(credlock)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("personality", PERSONALITIES)
def test_credlock_survived_every_upstream(stacks, personality):
    credlock = stacks.get(personality)
    assert credlock.alive()
    assert not victims(credlock, 1)
