"""Deviant credential answers and representation headers: the credential rewrite fails closed.

The `deviant` upstream answers each credential request according to the variant registered for
its IMDSv2 token (adv_upstream.VARIANTS); it also honours Range, If-* and Accept-Encoding as a
full RFC 9110 server would, so a forwarded header would turn into raw slices, 304s or gzip.
"""

from __future__ import annotations

import email.utils

import pytest

from adversarial_lib import (CRED_PATH, EXT_PATH, TOKEN_HEADER, credential_problems, new_id)

# Not a 200 with Code exactly "Success" and every documented key a string, or a raw value
# somewhere in the body: 502.
REFUSED_502 = [
    "code_missing", "code_success_space", "code_lowercase", "code_true", "code_list",
    "secret_lowercase_key", "secret_nested", "secret_in_message", "secret_in_array",
    "secret_escaped", "keys_other_case", "token_not_string", "expiration_not_string",
    "field_missing", "status_203", "status_206", "status_404", "status_500",
    "error_with_secret", "not_json_with_secret", "truncated_json",
]
# IMDS's documented error answers, without secrets: passed through as they are.
PASSED_THROUGH = {"error_documented": 200, "html_404": 404}
# The documented success shape (extra keys without secrets allowed): served locked.
SERVED_LOCKED = ["normal", "extra_key_no_secret"]


def ask(credlock, variant: str, path: str, method: str, extra=()):
    token = credlock.token()
    credlock.upstream.set_variant(token, variant)
    rid = new_id("cr")
    reply = credlock.get(path, [(TOKEN_HEADER, token), ("X-Adv-Req", rid), *extra], method)
    return rid, token, reply


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", [CRED_PATH, EXT_PATH], ids=["legacy", "extended"])
@pytest.mark.parametrize("variant", REFUSED_502)
def test_deviant_credential_answer_is_refused_502_without_raw_values(stacks, variant, path,
                                                                     method):
    credlock = stacks.get("deviant")
    _, _, reply = ask(credlock, variant, path, method)
    assert reply is not None, "no answer"
    assert not reply.findings(), f"RAW VALUE reached the client: {reply.findings()} {reply!r}"
    assert reply.status == 502, f"expected 502 for {variant}: {reply!r}"


@pytest.mark.parametrize("variant", sorted(PASSED_THROUGH))
def test_documented_imds_error_answer_passes_through_unchanged(stacks, variant):
    credlock = stacks.get("deviant")
    _, _, reply = ask(credlock, variant, CRED_PATH, "GET")
    assert reply is not None and not reply.findings(), reply
    assert reply.status == PASSED_THROUGH[variant], reply
    if variant == "error_documented":
        assert reply.json()["Code"] == "AssumeRoleUnauthorizedAccess", reply


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", [CRED_PATH, EXT_PATH], ids=["legacy", "extended"])
@pytest.mark.parametrize("variant", SERVED_LOCKED)
def test_documented_success_answer_is_served_with_the_locked_set(stacks, variant, path, method):
    credlock = stacks.get("deviant")
    rid, _, reply = ask(credlock, variant, path, method)
    problems = credential_problems(reply, credlock.locked_key, rid, head=method == "HEAD")
    assert not problems, problems
    if method == "GET" and variant == "extra_key_no_secret":
        assert reply.json().get("Foo") == "bar", f"an extra key without secret was lost: {reply!r}"


DATE = email.utils.formatdate(usegmt=True)
REPRESENTATION_HEADERS = [
    ("Range", "bytes=90-250"), ("Range", "bytes=-200"), ("If-None-Match", '"adv-etag"'),
    ("If-None-Match", "*"), ("If-Modified-Since", DATE), ("If-Match", '"adv-etag"'),
    ("If-Unmodified-Since", DATE), ("If-Range", '"adv-etag"'), ("Accept-Encoding", "gzip"),
    ("Accept-Encoding", "gzip, deflate, br"),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("header", REPRESENTATION_HEADERS,
                         ids=[f"{k}:{v}" for k, v in REPRESENTATION_HEADERS])
def test_representation_header_on_credential_route_never_reaches_the_upstream(stacks, header,
                                                                             method):
    credlock = stacks.get("deviant")
    rid, token, reply = ask(credlock, "normal", CRED_PATH, method, [header])
    problems = credential_problems(reply, credlock.locked_key, rid, head=method == "HEAD")
    seen = [e for e in credlock.upstream.log()
            if any(k.lower() == TOKEN_HEADER.lower() and v == token
                   for k, v in e.get("headers", []))]
    if not seen:
        problems.append("the credential request did not reach the upstream")
    for entry in seen:
        names = {k.lower() for k, _ in entry["headers"]}
        forwarded = sorted(n for n in names
                           if n in ("range", "accept-encoding") or n.startswith("if-"))
        if forwarded:
            problems.append(f"forwarded to the upstream on a credential route: {forwarded}")
    assert not problems, "\n".join(problems)
