#!/usr/bin/env python3
"""A faithful local stand-in for the Amazon ECS container agent's task-credential endpoint (the
server that ecs-init exposes to containers as 169.254.170.2:80), for credlock's ECS tests.

Standard library only (Python 3.11). Same CLI shape and control conventions as imds_emulator.py
(standin.py holds them):

    python3 ecs_agent_emulator.py --listen 127.0.0.1:0 [--listen [::1]:0] [--control 127.0.0.1:0]

It prints one line per bound socket, agent listeners first, flushed, then serves until
SIGTERM/SIGINT (exit 0). A bad address is a usage error (exit 2); a failed bind exits 1.

    listening 127.0.0.1:41234
    control 127.0.0.1:41236

Sources. AWS documents only the happy path; every error shape below is read from the agent's
published source, github.com/aws/amazon-ecs-agent (snapshot of 2026-06-30, commit 8dfceca6):
  [ECS-dev]   Amazon ECS Developer Guide, "IAM Roles for Tasks" (docs.aws.amazon.com/AmazonECS/
              latest/developerguide/task-iam-roles.html; awsdocs/amazon-ecs-developer-guide
              doc_source/task-iam-roles.md).
  [ECS-bp]    Amazon ECS Best Practices Guide, "Using IAM roles with Amazon ECS tasks"
              (docs.aws.amazon.com/AmazonECS/latest/bestpracticesguide/security-iam-roles.html).
  [v1]        ecs-agent/tmds/handlers/v1/credentials_handler.go
  [v2]        ecs-agent/tmds/handlers/v2/credentials_handler.go
  [mgr]       ecs-agent/credentials/manager.go
  [utils]     ecs-agent/tmds/handlers/utils/helpers.go
  [tmds]      ecs-agent/tmds/server.go
  [setup]     agent/handlers/task_server_setup.go
  [cfg]       agent/config/config.go (DefaultTaskMetadataSteadyStateRate/BurstRate)
  [toll]      agent/vendor/github.com/didip/tollbooth/tollbooth.go and limiter/limiter.go
  [test]      ecs-agent/tmds/handlers/credentials_handler_test.go (the exact bodies below)
  [mux]       github.com/gorilla/mux v1.8.1 (agent/go.mod), Router.ServeHTTP and cleanPath

Rules implemented (agent listener):
  * GET /v2/credentials/<id> -> 200, Content-Type application/json, the compact JSON
    {"RoleArn":..,"AccessKeyId":..,"SecretAccessKey":..,"Token":..,"Expiration":..} in exactly
    that key order, no trailing newline ([mgr] IAMRoleCredentials json tags, [test]
    credentialsResponseJSON; fields documented in [ECS-dev] "IAM Roles for Tasks" and [ECS-bp]).
    Containers get AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/<id> and the SDK asks
    http://169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI ([ECS-bp]); the ID is a UUID in
    practice ([ECS-bp]) but any string is served. No header is required: the agent reads no
    Authorization or metadata header on this path ([v1], [v2]).
  * GET /v1/credentials?id=<id>: the same document (the older relative URI form
    "/credential_provider_version/credentials?id=task_credential_id" of [ECS-dev]; [v1]).
  * Errors ([v1] processCredentialsRequest; bodies exactly as [test] credentialsErrorResponseJSON,
    application/json, utils.ErrorMessage marshals HTTPErrorCode too because it has no json tag):
      - no ID (/v2/credentials/, /v1/credentials, /v1/credentials?id=) -> 400
        {"code":"NoIdInRequest","message":"CredentialsV2Request: No Credential ID in the request",
         "HTTPErrorCode":400}   ("CredentialsV1Request: ..." on /v1)
      - ID known but its credentials not arrived yet -> 503 "CredentialsUninitialized",
        "...: Credentials uninitialized for ID" ([mgr] IsCredentialsPending; control POST /pending)
      - unknown ID -> 400 "InvalidIdInRequest", "...: Credentials not found"
  * Methods: the routes are registered with HandleFunc and no .Methods() ([setup]), so POST, PUT,
    DELETE, ... answer exactly like GET; HEAD gets GET's status and headers without a body (Go).
    The task-protection routes are the only method-restricted ones and are not emulated.
  * Other paths -> 404 "404 page not found\\n" text/plain (gorilla/mux NotFoundHandler). The
    agent's task-metadata v2/v3/v4 routes exist on the real agent but are NOT emulated.
  * Path cleaning: both routers have SkipClean(false) ([tmds], [setup]): a path that Go's
    path.Clean changes ("//v2//credentials/x", "/v2/credentials/../x") gets 301 with a Location
    of the cleaned path (query kept) and no body ([mux] Router.ServeHTTP). The trailing slash
    survives cleaning, so "/v2/credentials/" is a 400, not a redirect ([v2] comment). Percent
    escapes are decoded before matching ([mux] matches URL.Path), so "/v2/credentials/a%2Fb" is
    ID "a/b"; a malformed escape is Go's 400 Bad Request.
  * Rate limit ([tmds] tollbooth, [cfg] 40 requests/s steady, burst 60, [toll] key = client IP +
    path): over the limit -> 429, text/plain; charset=utf-8, "You have reached maximum request
    limit." (no newline). Every rate-limited response (all but the 301) carries X-Rate-Limit-Limit
    "40.00", X-Rate-Limit-Duration "1", X-Rate-Limit-Request-Forwarded-For (the request's
    X-Forwarded-For, often empty) and X-Rate-Limit-Request-Remote-Addr "ip:port" ([toll]
    setResponseHeaders). Control: "rate_limit": {"steady": 40, "burst": 60} or null (off).
  * Expiration is echoed verbatim from what ACS sent ([mgr] comment on Expiration); this stand-in
    issues "YYYY-MM-DDTHH:MM:SSZ", 6 h ahead ([ECS-dev]: "The default expiration time for the
    generated IAM role credentials is 6 hours"). ❓ The wire format ACS uses is undocumented (an
    agent test fixture shows "2016-03-25T06:17:19.318+0000"); tests may set any string.
  * HTTP/1.1 without a Host header -> Go's 400 "Bad Request: missing required Host header".

Raw-credential markers (so tests can prove raw values never reach a client through credlock):
AccessKeyId is 20 characters of [A-Z0-9] starting with "ASIARAWE", SecretAccessKey is 40
characters containing "RAWSECRET", Token contains "RAWTOKEN". RAW_MARKERS lists the strings.

Control API (JSON, only on the --control listener):
  GET  /state                 credentials by ID (each with relative_uri, task_arn, role_type and
                              the served document), pending IDs, delay_ms, down, rate_limit
  POST /state                 merge runtime keys: delay_ms (sleep before answering), down (close
                              connections without answering), rate_limit ({steady, burst} | null)
  POST /credentials           create or replace one credential ID (SetTaskCredentials):
                              {"id"?: default a new UUID, "task_arn"?, "role_arn"?,
                               "role_type"?: "TaskApplication" | "TaskExecution",
                               "lifetime_s"?: default 21600, "document"?: {field: string | null}}
                              "document" overrides served fields after generation (null = "").
                              Returns the entry, with "relative_uri": "/v2/credentials/<id>".
  POST /credentials/rotate    {"id"}: a new raw set for the same ID and role (ACS refresh)
  POST /credentials/remove    {"id"}: forget the ID (RemoveCredentials; the agent then 400s it)
  POST /pending               {"id"}: an ID known but without credentials yet (-> 503)
  GET  /requests              the last 1000 agent requests: method, path (raw target), version,
                              headers [[name, value], ...], client, listener, status, time
  POST /requests/clear        forget them
  POST /reset                 back to the start-up state (no IDs, limits on, requests cleared)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import urllib.parse
import uuid

import standin
from standin import (RAW_MARKERS, Backend, Response, TokenBucket, ValidationError,  # noqa: F401
                     check_keys, check_runtime_keys, format_address, go_http_error, go_json,
                     json_response, raw_secrets, utc_timestamp)

RAW_ACCESS_KEY_PREFIX = "ASIARAWE"

ACCOUNT_ID = "123456789012"
DEFAULT_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/credlock-task-role"
ROLE_TYPES = ("TaskApplication", "TaskExecution")  # [mgr] ApplicationRoleType, ExecutionRoleType
DEFAULT_LIFETIME_S = 6 * 3600  # [ECS-dev]: default expiration 6 hours
DOCUMENT_KEYS = ("RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration")  # [mgr]

V1_PATH = "/v1/credentials"  # [mgr] V1CredentialsPath
V2_PREFIX = "/v2/credentials/"  # [v2] CredentialsPath = "/v2/credentials/{id:.*}"
ID_QUERY_PARAMETER = "id"  # [mgr] CredentialsIDQueryParameterName

ERR_NO_ID = "NoIdInRequest"  # [v1] error codes
ERR_INVALID_ID = "InvalidIdInRequest"
ERR_UNINITIALIZED = "CredentialsUninitialized"

DEFAULT_RATE_LIMIT = {"steady": 40, "burst": 60}  # [cfg]
RATE_LIMIT_MESSAGE = "You have reached maximum request limit."  # [toll] limiter.New defaults


# --------------------------------------------------------------------------------------------
# Helpers (the ones every stand-in shares, and Go's answers, are in standin.py)
# --------------------------------------------------------------------------------------------

def raw_credentials(prefix: str, lifetime_s: int) -> dict:
    """A fresh raw set, marked so a test can grep for it (module docstring)."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {**raw_secrets(prefix),
            "Expiration": utc_timestamp(now + datetime.timedelta(seconds=lifetime_s))}


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def validate_rate_limit(value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"steady", "burst"}:
        raise ValidationError("rate_limit must be null or {\"steady\": N, \"burst\": N}")
    for key in ("steady", "burst"):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            raise ValidationError(f"rate_limit.{key} must be a number > 0")


class Agent(Backend):
    """All mutable state behind one lock. credentials: id -> entry; pending: known IDs without
    credentials ([mgr] knownCredentialsIDs minus idToTaskCredentials)."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.credentials: dict[str, dict] = {}
            self.pending: set[str] = set()
            self.delay_ms = 0
            self.down = False
            self.rate_limit = copy.deepcopy(DEFAULT_RATE_LIMIT)
            self.buckets: dict[tuple[str, str], TokenBucket] = {}
            self.requests.clear()

    # ---- control ----

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "credentials": copy.deepcopy(self.credentials),
                "pending": sorted(self.pending),
                "delay_ms": self.delay_ms,
                "down": self.down,
                "rate_limit": copy.deepcopy(self.rate_limit),
            }

    def merge(self, patch) -> dict:
        if not isinstance(patch, dict):
            raise ValidationError("body must be a JSON object")
        unknown = set(patch) - {"delay_ms", "down", "rate_limit"}
        if unknown:
            raise ValidationError(f"unknown keys {sorted(unknown)}; allowed: delay_ms, down, "
                                  "rate_limit")
        check_runtime_keys(patch)
        if "rate_limit" in patch:
            validate_rate_limit(patch["rate_limit"])
        with self.lock:
            for key, value in patch.items():
                setattr(self, key, copy.deepcopy(value))
            if "rate_limit" in patch:
                self.buckets.clear()
        return self.snapshot()

    def set_credentials(self, spec) -> dict:
        """SetTaskCredentials ([mgr]): the ID and the task ARN must not be empty."""
        check_keys(spec, {"id", "task_arn", "role_arn", "role_type", "lifetime_s", "document"})
        cred_id = spec.get("id", str(uuid.uuid4()))
        if not isinstance(cred_id, str) or not cred_id:
            raise ValidationError("CredentialsId is empty")  # [mgr] SetTaskCredentials
        task_arn = spec.get("task_arn",
                            f"arn:aws:ecs:us-east-1:{ACCOUNT_ID}:task/default/{uuid.uuid4().hex}")
        if not isinstance(task_arn, str) or not task_arn:
            raise ValidationError("task ARN is empty")  # [mgr] SetTaskCredentials
        role_arn = spec.get("role_arn", DEFAULT_ROLE_ARN)
        role_type = spec.get("role_type", "TaskApplication")
        lifetime = spec.get("lifetime_s", DEFAULT_LIFETIME_S)
        overrides = spec.get("document", {})
        if not isinstance(role_arn, str):
            raise ValidationError("role_arn must be a string")
        if role_type not in ROLE_TYPES:
            raise ValidationError(f"role_type must be one of {list(ROLE_TYPES)}")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int):
            raise ValidationError("lifetime_s must be an integer")
        if not isinstance(overrides, dict) or set(overrides) - set(DOCUMENT_KEYS) or not all(
                value is None or isinstance(value, str) for value in overrides.values()):
            raise ValidationError(f"document maps fields among {list(DOCUMENT_KEYS)} to strings "
                                  "or null")
        document = {"RoleArn": role_arn, **raw_credentials(RAW_ACCESS_KEY_PREFIX, lifetime)}
        for key, value in overrides.items():
            document[key] = "" if value is None else value  # the Go struct always has all five
        entry = {
            "id": cred_id,
            "relative_uri": V2_PREFIX + cred_id,
            "task_arn": task_arn,
            "role_type": role_type,
            "lifetime_s": lifetime,
            "document": {key: document[key] for key in DOCUMENT_KEYS},
        }
        with self.lock:
            self.credentials[cred_id] = entry
            self.pending.discard(cred_id)
        return copy.deepcopy(entry)

    def rotate(self, cred_id) -> dict:
        with self.lock:
            entry = self.credentials.get(cred_id) if isinstance(cred_id, str) else None
            if entry is None:
                raise standin.ControlError(404, "no such credential ID")
            fresh = raw_credentials(RAW_ACCESS_KEY_PREFIX, entry["lifetime_s"])
            entry["document"].update(fresh)
            return copy.deepcopy(entry)

    def remove(self, cred_id) -> bool:
        with self.lock:  # [mgr] RemoveCredentials drops it from both maps
            self.pending.discard(cred_id)
            return self.credentials.pop(cred_id, None) is not None

    def add_pending(self, cred_id) -> None:
        if not isinstance(cred_id, str) or not cred_id:
            raise ValidationError("id must be a non-empty string")
        with self.lock:  # [mgr] AddKnownCredentialsID
            if cred_id not in self.credentials:
                self.pending.add(cred_id)

    # ---- serving ----

    def lookup(self, cred_id: str) -> tuple[str, dict | None]:
        with self.lock:
            if cred_id in self.pending:
                return "pending", None
            entry = self.credentials.get(cred_id)
            return ("found", copy.deepcopy(entry)) if entry else ("missing", None)

    def rate_allowed(self, client_ip: str, path: str) -> tuple[bool, dict | None]:
        with self.lock:
            limit = copy.deepcopy(self.rate_limit)
            if limit is None:
                return True, None
            key = (client_ip, path)
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = TokenBucket(limit["steady"], int(limit["burst"]))
            return bucket.allow(), limit


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class AgentHandler(standin.GoRouterHandler):
    """Go's net/http framing and gorilla/mux's path handling ([mux]: percent escapes decoded
    before matching, unclean paths redirected); the agent ignores request bodies."""

    def redirect(self, location: str, query: str, has_query: bool) -> Response:
        # [mux] Router.ServeHTTP: 301, Location = the cleaned URL, query kept, no body.
        return Response(301, b"", [("Location", location + ("?" + query if has_query else ""))])

    def serve_path(self, path: str, query: str) -> Response:
        # [tmds] tollbooth in front of every route; headers on every answer ([toll]).
        client_ip = self.client_address[0]
        allowed, limit = self.backend.rate_allowed(client_ip, path)
        rate_headers = []
        if limit is not None:
            rate_headers = [
                ("X-Rate-Limit-Limit", f"{float(limit['steady']):.2f}"),
                ("X-Rate-Limit-Duration", "1"),
                ("X-Rate-Limit-Request-Forwarded-For", self.headers.get("X-Forwarded-For", "")),
                ("X-Rate-Limit-Request-Remote-Addr",
                 format_address(*self.client_address[:2])),
            ]
            if not allowed:
                return Response(429, RATE_LIMIT_MESSAGE.encode(), rate_headers + [
                    ("Content-Type", "text/plain; charset=utf-8")])

        if path == V1_PATH:
            values = urllib.parse.parse_qs(query, keep_blank_values=True)
            cred_id = values[ID_QUERY_PARAMETER][0] if ID_QUERY_PARAMETER in values else ""
            response = self.credentials(cred_id, "CredentialsV1Request: ")
        elif path.startswith(V2_PREFIX):
            response = self.credentials(path[len(V2_PREFIX):], "CredentialsV2Request: ")
        else:
            response = go_http_error(404, "404 page not found")
        response.headers = rate_headers + response.headers
        return response

    def credentials(self, cred_id: str, prefix: str) -> Response:
        """[v1] processCredentialsRequest, in its order: no ID, pending, not found, success."""
        if cred_id == "":
            return self.error(ERR_NO_ID, prefix + "No Credential ID in the request", 400)
        state, entry = self.backend.lookup(cred_id)
        if state == "pending":
            return self.error(ERR_UNINITIALIZED, prefix + "Credentials uninitialized for ID", 503)
        if state == "missing":
            return self.error(ERR_INVALID_ID, prefix + "Credentials not found", 400)
        return json_response(200, go_json(entry["document"]))

    @staticmethod
    def error(code: str, message: str, status: int) -> Response:
        # utils.ErrorMessage: {"code","message","HTTPErrorCode"} ([utils], [test])
        return json_response(status, go_json({"code": code, "message": message,
                                              "HTTPErrorCode": status}))


class ControlHandler(standin.ControlAPI, standin.GoHandler):
    def route(self, method: str, path: str):
        if (method, path) == ("POST", "/credentials"):
            return self.backend.set_credentials(self.payload())
        if (method, path) == ("POST", "/credentials/rotate"):
            return self.backend.rotate(self.field("id"))
        if (method, path) == ("POST", "/credentials/remove"):
            return {"removed": self.backend.remove(self.field("id"))}
        if (method, path) == ("POST", "/pending"):
            self.backend.add_pending(self.field("id"))
            return self.backend.snapshot()
        return super().route(method, path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local stand-in for the ECS agent's task-credential endpoint "
                    "(see the module docstring).")
    standin.add_listen_argument(parser, "agent")
    standin.add_control_argument(parser)
    args = parser.parse_args(argv)
    return standin.serve(parser, args, "ecs_agent_emulator", AgentHandler, ControlHandler,
                         Agent())


if __name__ == "__main__":
    sys.exit(main())
