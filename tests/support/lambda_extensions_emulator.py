#!/usr/bin/env python3
"""A faithful local stand-in for the AWS Lambda Extensions API (version 2020-01-01), the API an
external extension such as credlock's layer talks to inside a Lambda execution environment.

Standard library only (Python 3.11). Same CLI shape and control conventions as imds_emulator.py
(standin.py holds them):

    python3 lambda_extensions_emulator.py --listen 127.0.0.1:0 [--control 127.0.0.1:0]
        [--extension NAME ...] [--function-name NAME] [--region REGION]

It prints one line per bound socket, API listeners first, flushed, then serves until
SIGTERM/SIGINT (exit 0). A bad address is a usage error (exit 2); a failed bind exits 1.

    listening 127.0.0.1:41234
    control 127.0.0.1:41236

The environment a function and its extensions see (GET /environment on the control listener):
AWS_LAMBDA_RUNTIME_API is "host:port" of the first --listen address (no scheme; "[::1]:port" for
IPv6), and the API lives under http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/ ([ext-api] "Extensions
API reference"). The function's execution-role credentials are in AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (and AWS_ACCESS_KEY) ([envvars] "Defined runtime
environment variables"), next to AWS_REGION, AWS_DEFAULT_REGION, AWS_LAMBDA_FUNCTION_NAME,
AWS_LAMBDA_FUNCTION_MEMORY_SIZE, AWS_LAMBDA_FUNCTION_VERSION, AWS_LAMBDA_INITIALIZATION_TYPE,
AWS_LAMBDA_LOG_GROUP_NAME, AWS_LAMBDA_LOG_STREAM_NAME, AWS_EXECUTION_ENV, _HANDLER,
LAMBDA_TASK_ROOT, LAMBDA_RUNTIME_DIR, LANG and TZ. Extensions see the same variables except
AWS_EXECUTION_ENV, AWS_LAMBDA_LOG_GROUP_NAME, AWS_LAMBDA_LOG_STREAM_NAME,
AWS_XRAY_CONTEXT_MISSING, AWS_XRAY_DAEMON_ADDRESS, LAMBDA_RUNTIME_DIR, LAMBDA_TASK_ROOT,
_AWS_XRAY_DAEMON_ADDRESS, _AWS_XRAY_DAEMON_PORT and _HANDLER ([ext-api] "Permissions and
configuration"; GET /environment?for=extension). PATH and LD_LIBRARY_PATH are left to the test.
The raw credentials are marked: AWS_ACCESS_KEY_ID is 20 characters of [A-Z0-9] starting
"ASIARAWL", the secret (40 characters) contains "RAWSECRET", the token contains "RAWTOKEN".

Sources:
  [ext-api]  AWS Lambda Developer Guide, "Lambda Extensions API" (docs.aws.amazon.com/lambda/
             latest/dg/runtimes-extensions-api.html; awsdocs/aws-lambda-developer-guide
             doc_source/runtimes-extensions-api.md, 2022-11 version): sections "Init phase",
             "Invoke phase", "Shutdown phase", "Permissions and configuration", "Failure
             handling", "Extensions API reference" > "Register", "Next", "Init error",
             "Exit error".
  [envvars]  AWS Lambda Developer Guide, "Using Lambda environment variables" > "Defined runtime
             environment variables" (doc_source/configuration-envvars.md).
  [layers]   AWS Lambda Developer Guide, "Lambda extensions" (doc_source/lambda-extensions.md):
             Lambda starts every file in /opt/extensions/ as an external extension.
  AWS documents only the happy path and the status codes; the error bodies, error types and the
  state machine come from AWS's published Lambda Runtime Interface Emulator,
  github.com/aws/aws-lambda-runtime-interface-emulator (snapshot of 2026-01-02, commit 4fa21571),
  under internal/lambda/:
  [router]   rapi/router.go (ExtensionsRouter), rapi/server.go (mounted under /2020-01-01)
  [mw]       rapi/middleware/middleware.go (AgentUniqueIdentifierHeaderValidator)
  [const]    rapi/handler/constants.go (header names, error types, message format)
  [register] rapi/handler/agentregister.go
  [next]     rapi/handler/agentnext.go, rapi/rendering/rendering.go (InvokeRenderer,
             ShutdownRenderer), rapi/model/agentevent.go, rapi/model/tracing.go
  [errors]   rapi/handler/agentiniterror.go, rapi/handler/agentexiterror.go
  [render]   rapi/rendering/render_error.go, render_json.go, rendering.go (RenderAccepted),
             rapi/model/errorresponse.go, statusresponse.go, agentregisterresponse.go
  [core]     core/registrations.go (MaxAgentsAllowed 10, TurnOff), core/agentutil.go,
             core/externalagent.go, core/externalagent_states.go, core/internalagent.go,
             core/internalagent_states.go, core/agent_state_names.go, core/agentsmap.go
  [rapid]    rapid/handlers.go (external agents are created at launch, named after the file;
             registration turns off when the runtime's init ends), rapid/shutdown.go

Rules implemented (API listener, everything under /2020-01-01):
  * POST /extension/register ([ext-api] Register; [register]):
    - header Lambda-Extension-Name (the extension's file name); empty or missing -> 403
      Extension.InvalidExtensionName "Empty extension name".
    - body {"events": ["INVOKE", "SHUTDOWN"]} (events optional, body required): invalid JSON ->
      403 InvalidRequestFormat (Go's decoder text, approximated); non-empty configurationKeys ->
      403 InvalidRequestFormat "configurationKeys are deprecated; use environment variables
      instead".
    - A name given with --extension is an external extension (a file in /opt/extensions,
      [layers]; created in state Started at launch, [rapid]); any other name registers an
      internal extension. Events other than INVOKE/SHUTDOWN -> 403 Extension.InvalidEventType
      "<EVENT>: ErrorInvalidEventType"; internal extensions may not take SHUTDOWN ([ext-api]
      Register) -> "SHUTDOWN: ShutdownEventNotSupportedForInternalExtension".
    - Registering an external extension twice -> 403 Extension.InvalidExtensionState "State
      transition from Registered to Registered failed for extension <name>. Error: State
      transition is not allowed". Internal: after init has ended (first INVOKE/SHUTDOWN) -> 403
      Extension.RegistrationClosed "Extension registration closed already"; more than 10
      extensions ([ext-api] "You can register up to 10 extensions") -> 403
      Extension.TooManyExtensions "Extension limit (10) reached"; a name in use -> 403
      Extension.InvalidExtensionState "Extension with this name already registered".
    - 200: header Lambda-Extension-Identifier (a UUID), application/json body
      {"functionName","functionVersion","handler"}, with "accountId" first when the request has
      Lambda-Extension-Accept-Feature: accountId ([ext-api], [register], Go's Encoder adds "\\n").
  * GET /extension/event/next ([ext-api] Next; [next]): header Lambda-Extension-Identifier:
    missing -> 403 Extension.MissingExtensionIdentifier "Missing Lambda-Extension-Identifier
    header", not a UUID -> 403 Extension.InvalidExtensionIdentifier "Invalid
    Lambda-Extension-Identifier" ([mw]); unknown -> 403 Extension.UnknownExtensionIdentifier
    "Unknown extension <uuid>". It blocks until the control API injects an event (no timeout,
    [ext-api] "Do not set a timeout on the GET call"). Allowed from Registered (end of init) or
    Running (end of an invoke); otherwise 403 Extension.InvalidExtensionState "State transition
    from <state> to Ready failed for extension <uuid>. Error: State transition is not allowed"
    (e.g. a second concurrent next, or after init/exit error: [ext-api] "After Lambda receives
    the error, no further API calls succeed").
    INVOKE: 200, Content-Type application/json, header Lambda-Extension-Event-Identifier (a
    UUID), compact {"eventType":"INVOKE","deadlineMs":<Unix ms>,"requestId":..,
    "invokedFunctionArn":..,"tracing":{"type":"X-Amzn-Trace-Id","value":..}} ([ext-api] Invoke
    phase "Event payload"; [next] field order; tracing omitted when empty). SHUTDOWN: 200,
    {"eventType":"SHUTDOWN","deadlineMs":<Unix ms>,"shutdownReason":..} with no Content-Type set
    by the handler, so Go sniffs "text/plain; charset=utf-8" ([next] ShutdownRenderer). The
    reasons are SPINDOWN, TIMEOUT, FAILURE ([ext-api] Shutdown phase; ❓ the RIE itself sends
    "spindown"); the default deadline is 2,000 ms ahead ([ext-api]: 2,000 ms for a function
    with external extensions). ❓ [ext-api] lists a Lambda-Extension-Identifier response header
    on Next; the RIE does not send it, and neither does this stand-in.
  * POST /extension/init/error and /extension/exit/error ([ext-api] Init error, Exit error;
    [errors]): identifier checked as for next; missing Lambda-Extension-Function-Error-Type ->
    403 Extension.MissingHeader "Lambda-Extension-Function-Error-Type not found"; unknown ID ->
    403 Extension.UnknownExtensionIdentifier "Unknown Lambda-Extension-Identifier". Init error is
    allowed from Registered, exit error from Registered, Ready or Running; a repeat of the same
    kind is accepted and ignored (the first error is kept, [core]); otherwise 403
    Extension.InvalidExtensionState "State transition from <state> to InitError|Exited failed
    for extension <uuid>. Error: State transition is not allowed". 202 {"status":"OK"}. The
    error type header and the ErrorRequest body are kept for tests (GET /state).
  * Errors are JSON {"errorMessage":..,"errorType":..}\\n, application/json ([render]). A wrong
    method on a known path -> 405 with Allow and no body; any other path -> 404 "404 page not
    found\\n" (chi router). The Runtime API (/2018-06-01/runtime/...), Logs and Telemetry APIs
    are NOT emulated.
  * HTTP/1.1 without a Host header -> Go's 400 "Bad Request: missing required Host header".

Lifecycle (driven by the control API, [ext-api] "Lambda execution environment lifecycle"): the
Init phase ends, and registration closes, at the first INVOKE or SHUTDOWN. An INVOKE is only
delivered once every extension that is not in an error state has registered and is waiting in
Next (the previous phase has ended), and goes to those subscribed to INVOKE. A SHUTDOWN is queued
for every subscribed extension (it is "sent in response to a Next API request"); afterwards Next
simply blocks, as Lambda ends the processes. POST /reset wakes every blocked Next with 500
{"errorMessage":"Internal Server Error","errorType":"InternalServerError"} ([ext-api]: 500
"Container error. Non-recoverable state. Extension should exit promptly").

Control API (JSON, only on the --control listener):
  GET  /state            function, credentials, runtime_api, external_extensions, extensions
                         (id, name, kind, state, events, waiting, pending_events, error_type,
                         error_body), registration_open, shut_down, events (delivered), delay_ms,
                         down
  POST /state            merge: function ({function_name, function_version, handler, account_id,
                         region, memory_size, timeout_s, runtime}), credentials ({AccessKeyId,
                         SecretAccessKey, Token}: e.g. a set a moto STS issued, instead of the
                         marked raw set), delay_ms, down, external_extensions (only before any
                         extension has registered)
  GET  /environment      the function's environment (?for=extension: an extension's)
  POST /invoke           {"requestId"?, "invokedFunctionArn"?, "deadlineMs"?, "tracing"?: {type,
                         value} | null, "wait_s"?: 5, "wait_done"?: false} -> waits (up to
                         wait_s) for the extensions to be ready, delivers, and with wait_done
                         waits for the recipients to call Next again. 409 if not ready in time
                         or after SHUTDOWN. Returns {"event", "delivered_to", "done"}.
  POST /shutdown         {"shutdownReason"?: "SPINDOWN", "deadlineMs"?, "wait_s"?: 0} -> queues
                         SHUTDOWN; with wait_s > 0 waits until the recipients took it
                         ("received"). Returns {"event", "delivered_to", "received"}.
  GET  /requests         the last 1000 API requests (method, path, version, headers, body,
                         client, listener, status, time)
  POST /requests/clear   forget them
  POST /reset            back to the start-up state: no registrations, new credentials
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import secrets
import sys
import threading
import time
import urllib.parse
import uuid

import standin
from standin import (RAW_MARKERS, Backend, Response, ValidationError,  # noqa: F401
                     check_keys, check_runtime_keys, format_address, go_http_error, go_json,
                     json_kind, raw_secrets)

RAW_ACCESS_KEY_PREFIX = "ASIARAWL"

API_PREFIX = "/2020-01-01"  # [router] version20200101
REGISTER_PATH = API_PREFIX + "/extension/register"
NEXT_PATH = API_PREFIX + "/extension/event/next"
INIT_ERROR_PATH = API_PREFIX + "/extension/init/error"
EXIT_ERROR_PATH = API_PREFIX + "/extension/exit/error"
ROUTES = {REGISTER_PATH: "POST", NEXT_PATH: "GET", INIT_ERROR_PATH: "POST",
          EXIT_ERROR_PATH: "POST"}  # [router]

# [const]
NAME_HEADER = "Lambda-Extension-Name"
ID_HEADER = "Lambda-Extension-Identifier"
ERROR_TYPE_HEADER = "Lambda-Extension-Function-Error-Type"
FEATURES_HEADER = "Lambda-Extension-Accept-Feature"
EVENT_ID_HEADER = "Lambda-Extension-Event-Identifier"
ERR_ID_MISSING = "Extension.MissingExtensionIdentifier"
ERR_ID_INVALID = "Extension.InvalidExtensionIdentifier"
ERR_NAME_INVALID = "Extension.InvalidExtensionName"
ERR_REGISTRATION_CLOSED = "Extension.RegistrationClosed"
ERR_ID_UNKNOWN = "Extension.UnknownExtensionIdentifier"
ERR_INVALID_STATE = "Extension.InvalidExtensionState"
ERR_MISSING_HEADER = "Extension.MissingHeader"
ERR_TOO_MANY = "Extension.TooManyExtensions"
ERR_INVALID_EVENT = "Extension.InvalidEventType"
ERR_REQUEST_FORMAT = "InvalidRequestFormat"
TRANSITION_FAILED = "State transition from {} to {} failed for extension {}. Error: {}"
NOT_ALLOWED = "State transition is not allowed"  # core.ErrNotAllowed

MAX_EXTENSIONS = 10  # [core] MaxAgentsAllowed; [ext-api] "up to 10 extensions"
EVENTS = ("INVOKE", "SHUTDOWN")
SHUTDOWN_REASONS = ("SPINDOWN", "TIMEOUT", "FAILURE")  # [ext-api] Shutdown phase
SHUTDOWN_DEADLINE_MS = 2000  # [ext-api]: 2,000 ms with external extensions
ERROR_STATES = ("InitError", "ExitError")

DEFAULT_FUNCTION = {
    "function_name": "credlock-test-function",
    "function_version": "$LATEST",
    "handler": "lambda_function.lambda_handler",
    "account_id": "123456789012",
    "region": "us-east-1",
    "memory_size": 128,
    "timeout_s": 3,  # Lambda's default function timeout
    "runtime": "python3.11",
}
FUNCTION_STRINGS = {"function_name", "function_version", "handler", "account_id", "region",
                    "runtime"}
DEFAULT_EXTERNAL = ["credlock"]

# [ext-api] "Permissions and configuration": not visible to extensions.
RUNTIME_ONLY_VARIABLES = (
    "AWS_EXECUTION_ENV", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_XRAY_CONTEXT_MISSING", "AWS_XRAY_DAEMON_ADDRESS", "LAMBDA_RUNTIME_DIR", "LAMBDA_TASK_ROOT",
    "_AWS_XRAY_DAEMON_ADDRESS", "_AWS_XRAY_DAEMON_PORT", "_HANDLER",
)

MAX_BODY = 6 << 20
LOGGED_BODY = 4096
IDLE_CONNECTION_TIMEOUT = 600.0  # Next blocks for as long as the environment is idle


# --------------------------------------------------------------------------------------------
# Helpers (the ones every stand-in shares, and Go's answers, are in standin.py)
# --------------------------------------------------------------------------------------------

def raw_credentials() -> dict:
    return raw_secrets(RAW_ACCESS_KEY_PREFIX)


def epoch_ms() -> int:
    return int(time.time() * 1000)


def trace_header() -> str:
    """An X-Ray trace header like Lambda's: Root=1-<8 hex time>-<24 hex>;Parent=..;Sampled=0."""
    return (f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)};"
            f"Parent={secrets.token_hex(8)};Sampled=0")


HEX = set("0123456789abcdefABCDEF")


def go_parse_uuid(text: str) -> str | None:
    """github.com/google/uuid.Parse: 36 chars, urn:uuid: prefix, {braces}, or 32 hex digits.
    Returns the canonical lowercase form, or None where Go returns an error."""
    if len(text) == 36 + 9 and text[:9].lower() == "urn:uuid:":
        text = text[9:]
    elif len(text) == 38 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1]
    if len(text) == 36:
        if any(text[i] != "-" for i in (8, 13, 18, 23)):
            return None
        digits = text.replace("-", "")
        if len(digits) != 32:
            return None
    elif len(text) == 32:
        digits = text
    else:
        return None
    if not set(digits) <= HEX:
        return None
    return str(uuid.UUID(hex=digits))


class Conflict(standin.ControlError):
    """A control request the environment's state does not allow now: 409."""

    def __init__(self, message: str):
        super().__init__(409, message)


def api_error(status: int, error_type: str, message: str) -> Response:
    """[render] RenderJSON of model.ErrorResponse: Go's Encoder, so a trailing newline."""
    body = go_json({"errorMessage": message, "errorType": error_type}) + "\n"
    return Response(status, body.encode(), [("Content-Type", "application/json")])


def forbidden(error_type: str, message: str) -> Response:
    return api_error(403, error_type, message)


def internal_error() -> Response:
    return api_error(500, "InternalServerError", "Internal Server Error")


def accepted() -> Response:
    return Response(202, (go_json({"status": "OK"}) + "\n").encode(),
                    [("Content-Type", "application/json")])


def parse_register_body(body: bytes) -> list[str]:
    """json.Unmarshal into {events []core.Event; configurationKeys []string} ([register]
    parseRegister). Field names match case-insensitively, as in Go. Error texts approximate."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if not body.strip() or (isinstance(err, json.JSONDecodeError)
                                and err.pos >= len(err.doc.rstrip())):
            raise ValidationError("unexpected end of JSON input") from None
        doc = err.doc if isinstance(err, json.JSONDecodeError) else ""
        char = doc[err.pos] if isinstance(err, json.JSONDecodeError) and err.pos < len(doc) else "?"
        raise ValidationError(f"invalid character {char!r} looking for beginning of value") \
            from None
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ValidationError(f"json: cannot unmarshal {json_kind(value)} into Go value of type "
                              "struct { handler.RegisterRequest; ConfigurationKeys []string "
                              "\"json:\\\"configurationKeys\\\"\" }")
    fields = {"events": ("[]core.Event", "core.Event"),
              "configurationKeys": ("[]string", "string")}
    found: dict = {}
    for key, item in value.items():
        name = key if key in fields else next(
            (f for f in fields if f.lower() == key.lower()), None)
        if name is None:
            continue
        list_type, item_type = fields[name]
        if item is None:
            found[name] = []
            continue
        if not isinstance(item, list):
            raise ValidationError(f"json: cannot unmarshal {json_kind(item)} into Go struct field "
                                  f".{name} of type {list_type}")
        for element in item:
            if not isinstance(element, str):
                raise ValidationError(f"json: cannot unmarshal {json_kind(element)} into Go "
                                      f"struct field .{name} of type {item_type}")
        found[name] = item
    if found.get("configurationKeys"):
        raise ValidationError("configurationKeys are deprecated; use environment variables "
                              "instead")
    return found.get("events", [])


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

class Environment(Backend):
    """The execution environment: function, raw credentials, extensions and their lifecycle.
    One Condition guards everything; blocked Next calls wait on it."""

    def __init__(self, function: dict, external: list[str]):
        super().__init__()
        self.cond = threading.Condition(self.lock)
        self.initial_function = dict(function)
        self.initial_external = list(external)
        self.runtime_api = ""
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        with self.cond:
            self.generation += 1
            self.function = dict(self.initial_function)
            self.external = list(self.initial_external)
            self.credentials = raw_credentials()
            self.log_stream = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y/%m/%d")
                               + "/[$LATEST]" + secrets.token_hex(16))
            self.extensions: dict[str, dict] = {}
            self.queues: dict[str, collections.deque] = {}
            self.launch_externals()
            self.registration_open = True
            self.shut_down = False
            self.events: list[dict] = []
            self.delay_ms = 0
            self.down = False
            self.requests.clear()
            self.cond.notify_all()

    def launch_externals(self) -> None:
        """[rapid] doInitExtensions: one agent per file in /opt/extensions, state Started."""
        for name in self.external:
            self.add_extension(name, "external")

    def add_extension(self, name: str, kind: str) -> dict:
        ext_id = str(uuid.uuid4())
        entry = {"id": ext_id, "name": name, "kind": kind, "state": "Started", "events": [],
                 "waiting": False, "error_type": None, "error_body": None}
        self.extensions[ext_id] = entry
        self.queues[ext_id] = collections.deque()
        return entry

    # ---- control ----

    def snapshot(self) -> dict:
        with self.cond:
            extensions = []
            for ext_id, entry in self.extensions.items():
                extensions.append({**copy.deepcopy(entry),
                                   "pending_events": len(self.queues[ext_id])})
            return {
                "function": dict(self.function),
                "credentials": dict(self.credentials),
                "runtime_api": self.runtime_api,
                "external_extensions": list(self.external),
                "extensions": extensions,
                "registration_open": self.registration_open,
                "shut_down": self.shut_down,
                "events": copy.deepcopy(self.events),
                "delay_ms": self.delay_ms,
                "down": self.down,
            }

    def merge(self, patch) -> dict:
        check_keys(patch, {"function", "credentials", "delay_ms", "down", "external_extensions"},
                   list_allowed=True)
        function = patch.get("function", {})
        if not isinstance(function, dict) or set(function) - set(DEFAULT_FUNCTION):
            raise ValidationError(f"function keys must be among {sorted(DEFAULT_FUNCTION)}")
        for key, value in function.items():
            if key in FUNCTION_STRINGS:
                if not isinstance(value, str) or not value:
                    raise ValidationError(f"function.{key} must be a non-empty string")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValidationError(f"function.{key} must be an integer > 0")
        credentials = patch.get("credentials", {})
        if not isinstance(credentials, dict) or set(credentials) - {
                "AccessKeyId", "SecretAccessKey", "Token"} or not all(
                isinstance(v, str) and v for v in credentials.values()):
            raise ValidationError("credentials maps AccessKeyId, SecretAccessKey, Token to "
                                  "non-empty strings")
        check_runtime_keys(patch)
        external = patch.get("external_extensions")
        if "external_extensions" in patch and (not isinstance(external, list) or not all(
                isinstance(n, str) and n for n in external) or len(set(external)) != len(external)
                or len(external) > MAX_EXTENSIONS):
            raise ValidationError("external_extensions must be a list of distinct names "
                                  f"(at most {MAX_EXTENSIONS})")
        with self.cond:
            if "external_extensions" in patch:
                if any(e["state"] != "Started" for e in self.extensions.values()):
                    raise ValidationError("external_extensions can only change before any "
                                          "extension has registered (or after POST /reset)")
                self.external = list(external)
                self.extensions.clear()
                self.queues.clear()
                self.launch_externals()
            self.function.update(function)
            self.credentials.update(credentials)
            for key in ("delay_ms", "down"):
                if key in patch:
                    setattr(self, key, patch[key])
        return self.snapshot()

    def environment(self, for_extension: bool) -> dict:
        with self.cond:
            f, creds = self.function, self.credentials
            env = {
                "_HANDLER": f["handler"],
                "AWS_REGION": f["region"],
                "AWS_DEFAULT_REGION": f["region"],
                "AWS_EXECUTION_ENV": "AWS_Lambda_" + f["runtime"],
                "AWS_LAMBDA_FUNCTION_NAME": f["function_name"],
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(f["memory_size"]),
                "AWS_LAMBDA_FUNCTION_VERSION": f["function_version"],
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/" + f["function_name"],
                "AWS_LAMBDA_LOG_STREAM_NAME": self.log_stream,
                "AWS_ACCESS_KEY": creds["AccessKeyId"],
                "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
                "AWS_SESSION_TOKEN": creds["Token"],
                "AWS_LAMBDA_RUNTIME_API": self.runtime_api,
                "LAMBDA_TASK_ROOT": "/var/task",
                "LAMBDA_RUNTIME_DIR": "/var/runtime",
                "LANG": "en_US.UTF-8",
                "TZ": ":UTC",
            }
        if for_extension:
            for name in RUNTIME_ONLY_VARIABLES:
                env.pop(name, None)
        return env

    def function_arn(self) -> str:
        f = self.function
        return f"arn:aws:lambda:{f['region']}:{f['account_id']}:function:{f['function_name']}"

    def not_ready(self) -> list[dict]:
        """Extensions the next phase must wait for: not in an error state and not (yet) parked
        in Next with nothing queued."""
        return [e for e in self.extensions.values() if e["state"] not in ERROR_STATES and not (
            e["state"] == "Ready" and e["waiting"] and not self.queues[e["id"]])]

    def invoke(self, spec) -> dict:
        check_keys(spec, {"requestId", "invokedFunctionArn", "deadlineMs", "tracing", "wait_s",
                          "wait_done"})
        for key in ("requestId", "invokedFunctionArn"):
            if key in spec and not isinstance(spec[key], str):
                raise ValidationError(f"{key} must be a string")
        wait_s = spec.get("wait_s", 5)
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
            raise ValidationError("wait_s must be a number >= 0")
        if "deadlineMs" in spec and (isinstance(spec["deadlineMs"], bool)
                                     or not isinstance(spec["deadlineMs"], int)):
            raise ValidationError("deadlineMs must be an integer (Unix milliseconds)")
        tracing = spec.get("tracing", "default")
        if tracing not in (None, "default") and not (
                isinstance(tracing, dict) and set(tracing) == {"type", "value"}
                and all(isinstance(v, str) for v in tracing.values())):
            raise ValidationError("tracing must be null or {\"type\", \"value\"}")
        deadline = time.monotonic() + wait_s
        with self.cond:
            generation = self.generation
            while True:
                if self.shut_down:
                    raise Conflict("the environment has shut down")
                waiting_for = self.not_ready()
                if not waiting_for:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Conflict("extensions not ready: " + ", ".join(
                        f"{e['name']} ({e['state']})" for e in waiting_for))
                self.cond.wait(min(remaining, 0.5))
                if generation != self.generation:
                    raise Conflict("reset while waiting")
            self.registration_open = False  # [rapid] TurnOff once init has ended
            f = self.function
            event: dict = {
                "eventType": "INVOKE",
                "deadlineMs": spec.get("deadlineMs", epoch_ms() + f["timeout_s"] * 1000),
                "requestId": spec.get("requestId", str(uuid.uuid4())),
                "invokedFunctionArn": spec.get("invokedFunctionArn", self.function_arn()),
            }
            if tracing == "default":
                tracing = {"type": "X-Amzn-Trace-Id", "value": trace_header()}
            if tracing is not None and tracing["value"]:
                event["tracing"] = tracing  # [next] NewXRayTracing: omitted when empty
            recipients = [e["id"] for e in self.extensions.values()
                          if "INVOKE" in e["events"] and e["state"] == "Ready"]
            for ext_id in recipients:
                self.queues[ext_id].append(event)
            self.events.append({"event": event, "delivered_to": recipients})
            self.cond.notify_all()
            done = None
            if spec.get("wait_done", False):
                deadline = time.monotonic() + wait_s
                done = False
                while generation == self.generation:
                    pending = [i for i in recipients if self.extensions.get(i) and not (
                        self.extensions[i]["state"] in ERROR_STATES
                        or (self.extensions[i]["state"] == "Ready"
                            and self.extensions[i]["waiting"] and not self.queues[i]))]
                    if not pending:
                        done = True
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(min(remaining, 0.5))
            return {"event": copy.deepcopy(event), "delivered_to": recipients, "done": done}

    def shutdown(self, spec) -> dict:
        if not isinstance(spec, dict):
            raise ValidationError("body must be a JSON object")
        if set(spec) - {"shutdownReason", "deadlineMs", "wait_s"}:
            raise ValidationError("keys must be among shutdownReason, deadlineMs, wait_s")
        reason = spec.get("shutdownReason", "SPINDOWN")
        if not isinstance(reason, str) or not reason:
            raise ValidationError("shutdownReason must be a non-empty string")
        if "deadlineMs" in spec and (isinstance(spec["deadlineMs"], bool)
                                     or not isinstance(spec["deadlineMs"], int)):
            raise ValidationError("deadlineMs must be an integer (Unix milliseconds)")
        wait_s = spec.get("wait_s", 0)
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
            raise ValidationError("wait_s must be a number >= 0")
        with self.cond:
            if self.shut_down:
                raise Conflict("the environment has shut down already")
            self.registration_open = False
            self.shut_down = True
            # Key order of model.AgentShutdownEvent: eventType, deadlineMs, shutdownReason.
            event = {"eventType": "SHUTDOWN",
                     "deadlineMs": spec.get("deadlineMs", epoch_ms() + SHUTDOWN_DEADLINE_MS),
                     "shutdownReason": reason}
            recipients = [e["id"] for e in self.extensions.values()
                          if "SHUTDOWN" in e["events"] and e["state"] in
                          ("Registered", "Ready", "Running")]
            for ext_id in recipients:
                self.queues[ext_id].append(event)
            self.events.append({"event": event, "delivered_to": recipients})
            self.cond.notify_all()
            generation = self.generation
            deadline = time.monotonic() + wait_s
            received = not recipients or None
            while wait_s and generation == self.generation:
                if all(not self.queues[i] for i in recipients if i in self.queues):
                    received = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    received = False
                    break
                self.cond.wait(min(remaining, 0.5))
            return {"event": dict(event), "delivered_to": recipients, "received": received}

    # ---- API ----

    def register(self, name: str, events: list[str], account_feature: bool) -> Response:
        with self.cond:
            external = next((e for e in self.extensions.values()
                             if e["kind"] == "external" and e["name"] == name), None)
            if external is not None:
                for event in events:  # core.ValidateExternalAgentEvent
                    if event not in EVENTS:
                        return forbidden(ERR_INVALID_EVENT, f"{event}: ErrorInvalidEventType")
                if external["state"] != "Started":
                    return forbidden(ERR_INVALID_STATE, TRANSITION_FAILED.format(
                        external["state"], "Registered", name, NOT_ALLOWED))
                entry = external
            else:
                for event in events:  # core.ValidateInternalAgentEvent
                    if event == "SHUTDOWN":
                        return forbidden(ERR_INVALID_EVENT, f"{event}: "
                                         "ShutdownEventNotSupportedForInternalExtension")
                    if event not in EVENTS:
                        return forbidden(ERR_INVALID_EVENT, f"{event}: ErrorInvalidEventType")
                # core.CreateInternalAgent, in its order
                if not self.registration_open:
                    return forbidden(ERR_REGISTRATION_CLOSED, "Extension registration closed "
                                                              "already")
                if len(self.extensions) >= MAX_EXTENSIONS:
                    return forbidden(ERR_TOO_MANY, f"Extension limit ({MAX_EXTENSIONS}) reached")
                if any(e["name"] == name for e in self.extensions.values()):
                    return forbidden(ERR_INVALID_STATE, "Extension with this name already "
                                                        "registered")
                entry = self.add_extension(name, "internal")
            entry["state"] = "Registered"
            entry["events"] = list(dict.fromkeys(events))
            self.cond.notify_all()
            document = {}
            if account_feature:
                document["accountId"] = self.function["account_id"]
            document.update(functionName=self.function["function_name"],
                            functionVersion=self.function["function_version"],
                            handler=self.function["handler"])
            return Response(200, (go_json(document) + "\n").encode(), [
                (ID_HEADER, entry["id"]), ("Content-Type", "application/json")])

    def next_event(self, ext_id: str) -> Response:
        with self.cond:
            entry = self.extensions.get(ext_id)
            if entry is None:
                return forbidden(ERR_ID_UNKNOWN, f"Unknown extension {ext_id}")
            if entry["state"] not in ("Registered", "Running"):
                return forbidden(ERR_INVALID_STATE, TRANSITION_FAILED.format(
                    entry["state"], "Ready", ext_id, NOT_ALLOWED))
            entry["state"], entry["waiting"] = "Ready", True
            queue = self.queues[ext_id]
            generation = self.generation
            self.cond.notify_all()
            while True:
                if generation != self.generation:
                    return internal_error()
                if entry["state"] != "Ready":
                    entry["waiting"] = False
                    return forbidden(ERR_INVALID_STATE, TRANSITION_FAILED.format(
                        entry["state"], "Ready", ext_id, "Concurrent state modification"))
                if queue:
                    event = queue.popleft()
                    entry["state"], entry["waiting"] = "Running", False
                    self.cond.notify_all()
                    break
                self.cond.wait(0.5)
        body = go_json(event).encode()
        if event["eventType"] == "INVOKE":
            return Response(200, body, [(EVENT_ID_HEADER, str(uuid.uuid4())),
                                        ("Content-Type", "application/json")])
        return Response(200, body, [("Content-Type", "text/plain; charset=utf-8")])

    def report_error(self, ext_id: str, kind: str, error_type: str, body: bytes) -> Response:
        """[errors]: kind is "init" or "exit"."""
        with self.cond:
            entry = self.extensions.get(ext_id)
            if entry is None:
                return forbidden(ERR_ID_UNKNOWN, "Unknown " + ID_HEADER)
            state = entry["state"]
            target = "InitError" if kind == "init" else "ExitError"
            allowed = ("Registered",) if kind == "init" else ("Registered", "Ready", "Running")
            if state == target:
                return accepted()  # repeats are accepted; the first error is kept ([core])
            if state not in allowed:
                name = "InitError" if kind == "init" else "Exited"  # [errors] target names
                return forbidden(ERR_INVALID_STATE, TRANSITION_FAILED.format(
                    state, name, ext_id, NOT_ALLOWED))
            entry["state"] = target
            entry["waiting"] = False
            entry["error_type"] = error_type
            text = body.decode("utf-8", "replace")
            try:
                entry["error_body"] = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                entry["error_body"] = text
            self.cond.notify_all()
            return accepted()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class Handler(standin.GoHandler):
    """Go's net/http framing (standin.GoHandler), with Lambda's limits."""

    timeout = IDLE_CONNECTION_TIMEOUT
    max_body = MAX_BODY
    backend: Environment


class ApiHandler(Handler):
    internal_error = staticmethod(internal_error)

    def record_body(self, body: bytes) -> dict:
        return {"body": body[:LOGGED_BODY].decode("utf-8", "replace")}

    def respond(self, body: bytes) -> Response:
        target = self.raw_target()
        if target.startswith(("http://", "https://")):
            target = urllib.parse.urlsplit(target).path
        path = urllib.parse.unquote(target.partition("?")[0])
        method = ROUTES.get(path)
        if method is None:
            return go_http_error(404, "404 page not found")  # chi NotFound
        if self.command != method:
            return Response(405, b"", [("Allow", method)])  # chi methodNotAllowedHandler
        if path == REGISTER_PATH:
            return self.register(body)
        # [mw] AgentUniqueIdentifierHeaderValidator
        raw_id = self.headers.get(ID_HEADER, "").strip()
        if not raw_id:
            return forbidden(ERR_ID_MISSING, "Missing Lambda-Extension-Identifier header")
        ext_id = go_parse_uuid(raw_id)
        if ext_id is None:
            return forbidden(ERR_ID_INVALID, "Invalid Lambda-Extension-Identifier")
        if path == NEXT_PATH:
            return self.backend.next_event(ext_id)
        error_type = self.headers.get(ERROR_TYPE_HEADER, "").strip()
        if not error_type:
            return forbidden(ERR_MISSING_HEADER, f"{ERROR_TYPE_HEADER} not found")
        kind = "init" if path == INIT_ERROR_PATH else "exit"
        return self.backend.report_error(ext_id, kind, error_type, body)

    def register(self, body: bytes) -> Response:
        name = self.headers.get(NAME_HEADER, "").strip()
        if not name:
            return forbidden(ERR_NAME_INVALID, "Empty extension name")
        features = [f.strip() for f in self.headers.get(FEATURES_HEADER, "").split(",")]
        try:
            events = parse_register_body(body)
        except ValidationError as err:
            return forbidden(ERR_REQUEST_FORMAT, str(err))
        return self.backend.register(name, events, "accountId" in features)


class ControlHandler(standin.ControlAPI, Handler):
    def route(self, method: str, path: str):
        if (method, path) == ("GET", "/environment"):
            target = urllib.parse.parse_qs(self.query).get("for", ["function"])[0]
            if target not in ("function", "extension"):
                raise ValidationError("for must be function or extension")
            return self.backend.environment(target == "extension")
        if (method, path) == ("POST", "/invoke"):
            return self.backend.invoke(self.payload())
        if (method, path) == ("POST", "/shutdown"):
            return self.backend.shutdown(self.payload())
        return super().route(method, path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local stand-in for the Lambda Extensions API (see the module docstring).")
    standin.add_listen_argument(parser, "API", "; the first is AWS_LAMBDA_RUNTIME_API")
    standin.add_control_argument(parser)
    parser.add_argument("--extension", action="append", metavar="NAME",
                        help="file name of an external extension in /opt/extensions; "
                             "repeatable (default: credlock)")
    parser.add_argument("--function-name", default=DEFAULT_FUNCTION["function_name"])
    parser.add_argument("--region", default=DEFAULT_FUNCTION["region"])
    args = parser.parse_args(argv)
    external = args.extension if args.extension is not None else DEFAULT_EXTERNAL
    if len(set(external)) != len(external) or len(external) > MAX_EXTENSIONS or not all(external):
        parser.error(f"--extension: distinct non-empty names, at most {MAX_EXTENSIONS}")
    function = dict(DEFAULT_FUNCTION, function_name=args.function_name, region=args.region)
    env = Environment(function, external)

    def set_runtime_api(servers: list[standin.Server]) -> None:
        env.runtime_api = format_address(*servers[0].server_address[:2])

    return standin.serve(parser, args, "lambda_extensions_emulator", ApiHandler, ControlHandler,
                         env, on_bound=set_runtime_api)


if __name__ == "__main__":
    sys.exit(main())
