"""Tests of the Lambda Extensions API stand-in: each rule its module docstring claims, with the
AWS Lambda Developer Guide section or Runtime Interface Emulator source file it comes from.

The stand-in runs as a real subprocess, driven over real sockets (standin_testlib.py). Next
blocks, so it runs in a worker thread while the test drives the control API. One shared stand-in
serves most tests and is reset before each one (conftest.py).

    .venv/bin/python -m pytest -q tests/support/test_lambda_extensions_emulator.py
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import time
import uuid

import pytest

from standin_testlib import StandIn, assert_sigterm_and_sigint_exit_zero, running

REGISTER = "/2020-01-01/extension/register"
NEXT = "/2020-01-01/extension/event/next"
INIT_ERROR = "/2020-01-01/extension/init/error"
EXIT_ERROR = "/2020-01-01/extension/exit/error"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
BOTH = {"events": ["INVOKE", "SHUTDOWN"]}

POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8)


class Emulator(StandIn):
    script = "lambda_extensions_emulator.py"
    control_timeout = 15.0

    def register(self, name: str = "credlock", body=None, **headers) -> str:
        status, got, answer = self.request("POST", REGISTER, {
            "Lambda-Extension-Name": name, **headers}, BOTH if body is None else body)
        assert status == 200, answer
        return got["lambda-extension-identifier"]

    def next(self, ext_id: str, timeout: float = 10):
        return self.request("GET", NEXT, {"Lambda-Extension-Identifier": ext_id}, timeout=timeout)

    def next_async(self, ext_id: str) -> concurrent.futures.Future:
        future = POOL.submit(self.next, ext_id)
        self.wait_until(lambda: any(e["id"] == ext_id and e["waiting"]
                                    for e in self.state()["extensions"]) or future.done())
        return future

    def error(self, path: str, ext_id: str, error_type: str | None = "Extension.ConfigInvalid",
              body=None):
        headers = {"Lambda-Extension-Identifier": ext_id}
        if error_type is not None:
            headers["Lambda-Extension-Function-Error-Type"] = error_type
        return self.request("POST", path, headers, body)

    @staticmethod
    def wait_until(predicate, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def emu():
    yield from running(Emulator, "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0")


def api_error(status: int, error_type: str, message: str):
    # [render] model.ErrorResponse through Go's json.Encoder
    return status, (json.dumps({"errorMessage": message, "errorType": error_type},
                               separators=(",", ":")) + "\n").encode()


# ------------------------------------------------------------------------------------------
# Start-up, CLI, environment ([envvars], [ext-api] "Permissions and configuration")
# ------------------------------------------------------------------------------------------

def test_prints_listener_then_control(emu):
    assert emu.lines[0].startswith("listening 127.0.0.1:")
    assert emu.lines[1].startswith("control 127.0.0.1:")


def test_sigterm_and_sigint_exit_zero():
    assert_sigterm_and_sigint_exit_zero(Emulator)


@pytest.mark.parametrize("args", [["--listen", "127.0.0.1"], ["--extension", "a", "--extension", "a"]])
def test_usage_errors_exit_2(args):
    assert Emulator.run(*args).returncode == 2


def test_function_environment(emu):
    env = emu.control("GET", "/environment")[1]
    host, port = emu.listeners[0]
    assert env["AWS_LAMBDA_RUNTIME_API"] == f"{host}:{port}"  # host:port, no scheme
    assert re.fullmatch(r"ASIARAWL[A-Z0-9]{12}", env["AWS_ACCESS_KEY_ID"])
    assert env["AWS_ACCESS_KEY"] == env["AWS_ACCESS_KEY_ID"]
    assert "RAWSECRET" in env["AWS_SECRET_ACCESS_KEY"] and len(env["AWS_SECRET_ACCESS_KEY"]) == 40
    assert "RAWTOKEN" in env["AWS_SESSION_TOKEN"]
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "credlock-test-function"
    assert env["_HANDLER"] == "lambda_function.lambda_handler"
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.11"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"


def test_extension_environment_lacks_runtime_variables(emu):
    env = emu.control("GET", "/environment?for=extension")[1]
    for hidden in ("AWS_EXECUTION_ENV", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
                   "LAMBDA_RUNTIME_DIR", "LAMBDA_TASK_ROOT", "_HANDLER"):
        assert hidden not in env
    assert env["AWS_LAMBDA_RUNTIME_API"] and env["AWS_SESSION_TOKEN"].startswith("RAWTOKEN")


def test_reset_issues_new_credentials(emu):
    before = emu.state()["credentials"]["AccessKeyId"]
    assert emu.control("POST", "/reset")[1]["credentials"]["AccessKeyId"] != before


# ------------------------------------------------------------------------------------------
# Register ([ext-api] Register, [register], [core])
# ------------------------------------------------------------------------------------------

def test_register_returns_identifier_and_function(emu):
    status, headers, body = emu.request("POST", REGISTER, {"Lambda-Extension-Name": "credlock"}, BOTH)
    assert status == 200 and UUID.match(headers["lambda-extension-identifier"])
    assert headers["content-type"] == "application/json"
    assert body == (b'{"functionName":"credlock-test-function","functionVersion":"$LATEST",'
                    b'"handler":"lambda_function.lambda_handler"}\n')
    ext = emu.state()["extensions"][0]
    assert (ext["id"], ext["name"], ext["kind"], ext["state"], ext["events"]) == (
        headers["lambda-extension-identifier"], "credlock", "external", "Registered",
        ["INVOKE", "SHUTDOWN"])


def test_register_with_account_id_feature(emu):
    status, _, body = emu.request("POST", REGISTER, {
        "Lambda-Extension-Name": "credlock", "Lambda-Extension-Accept-Feature": "x, accountId"}, BOTH)
    assert status == 200
    assert body.startswith(b'{"accountId":"123456789012","functionName":')


def test_register_without_events_is_allowed(emu):
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "credlock"}, {})[0] == 200


def test_register_needs_a_name(emu):
    assert emu.request("POST", REGISTER, {}, BOTH)[::2] == api_error(
        403, "Extension.InvalidExtensionName", "Empty extension name")


@pytest.mark.parametrize("body,message", [
    (b"", "unexpected end of JSON input"),
    (b'{"events": ', "unexpected end of JSON input"),
    (b'{"configurationKeys": ["a"]}',
     "configurationKeys are deprecated; use environment variables instead"),
])
def test_register_body_errors_are_403_invalid_request_format(emu, body, message):
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "credlock"}, body)[::2] == \
        api_error(403, "InvalidRequestFormat", message)


@pytest.mark.parametrize("body", [b"nope", b'{"events": "INVOKE"}', b'{"events": [1]}', b"[1]"])
def test_register_undecodable_body_is_403(emu, body):
    status, _, answer = emu.request("POST", REGISTER, {"Lambda-Extension-Name": "credlock"}, body)
    assert status == 403 and json.loads(answer)["errorType"] == "InvalidRequestFormat"


@pytest.mark.parametrize("name,events,message", [
    ("credlock", ["INVOKE", "invoke"], "invoke: ErrorInvalidEventType"),
    ("internal-one", ["RESTORE"], "RESTORE: ErrorInvalidEventType"),
    ("internal-one", ["INVOKE", "SHUTDOWN"],
     "SHUTDOWN: ShutdownEventNotSupportedForInternalExtension"),
])
def test_register_invalid_events(emu, name, events, message):
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": name},
                       {"events": events})[::2] == api_error(403, "Extension.InvalidEventType",
                                                             message)


def test_internal_extension_may_take_invoke(emu):
    ext_id = emu.register("internal-one", {"events": ["INVOKE"]})
    assert [e["kind"] for e in emu.state()["extensions"] if e["id"] == ext_id] == ["internal"]


def test_external_registers_once(emu):
    emu.register()
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "credlock"}, BOTH)[::2] == \
        api_error(403, "Extension.InvalidExtensionState",
                  "State transition from Registered to Registered failed for extension credlock. "
                  "Error: State transition is not allowed")


def test_internal_name_collision(emu):
    emu.register("internal-one", {"events": ["INVOKE"]})
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "internal-one"}, {})[::2] == \
        api_error(403, "Extension.InvalidExtensionState",
                  "Extension with this name already registered")


def test_at_most_ten_extensions(emu):
    for i in range(9):  # the external "credlock" already counts
        emu.register(f"internal-{i}", {})
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "one-too-many"}, {})[::2] == \
        api_error(403, "Extension.TooManyExtensions", "Extension limit (10) reached")


def test_registration_closes_when_init_ends(emu):
    emu.control("POST", "/state", {"external_extensions": []})
    assert emu.control("POST", "/invoke", {})[0] == 200
    assert emu.request("POST", REGISTER, {"Lambda-Extension-Name": "late"}, {})[::2] == \
        api_error(403, "Extension.RegistrationClosed", "Extension registration closed already")


# ------------------------------------------------------------------------------------------
# Next, INVOKE, SHUTDOWN ([ext-api] Next, Invoke phase, Shutdown phase; [next])
# ------------------------------------------------------------------------------------------

def test_invoke_event_reaches_a_waiting_extension(emu):
    ext_id = emu.register()
    future = emu.next_async(ext_id)
    status, result = emu.control("POST", "/invoke", {"requestId": "req-1"})
    assert status == 200 and result["delivered_to"] == [ext_id]
    got_status, headers, body = future.result(timeout=5)
    assert got_status == 200 and headers["content-type"] == "application/json"
    assert UUID.match(headers["lambda-extension-event-identifier"])
    event = json.loads(body)
    assert list(event) == ["eventType", "deadlineMs", "requestId", "invokedFunctionArn", "tracing"]
    assert event["eventType"] == "INVOKE" and event["requestId"] == "req-1"
    assert event["invokedFunctionArn"] == \
        "arn:aws:lambda:us-east-1:123456789012:function:credlock-test-function"
    assert event["tracing"]["type"] == "X-Amzn-Trace-Id"
    assert event["tracing"]["value"].startswith("Root=1-")
    # deadlineMs: Unix time in milliseconds, the function timeout (3 s) ahead
    assert 0 < event["deadlineMs"] - time.time() * 1000 <= 3000
    assert body == json.dumps(event, separators=(",", ":")).encode()  # compact, no newline
    assert event == result["event"]


def test_invoke_without_tracing_omits_it(emu):
    ext_id = emu.register()
    future = emu.next_async(ext_id)
    emu.control("POST", "/invoke", {"tracing": None, "deadlineMs": 1700000000000})
    event = json.loads(future.result(timeout=5)[2])
    assert "tracing" not in event and event["deadlineMs"] == 1700000000000


def test_invoke_waits_for_extensions_to_be_ready(emu):
    emu.register()  # registered, but has not called Next yet: init not finished
    status, body = emu.control("POST", "/invoke", {"wait_s": 0.2})
    assert status == 409 and "credlock (Registered)" in body["error"]
    assert emu.state()["events"] == []


def test_invoke_waits_for_unregistered_external_extensions(emu):
    status, body = emu.control("POST", "/invoke", {"wait_s": 0.2})
    assert status == 409 and "credlock (Started)" in body["error"]


def test_invoke_wait_done_waits_for_the_next_call(emu):
    ext_id = emu.register()
    first = emu.next_async(ext_id)

    def extension_loop():
        assert first.result(timeout=5)[0] == 200
        time.sleep(0.2)  # the extension's work for this invoke (credlock: refresh)
        return emu.next(ext_id)

    second = POOL.submit(extension_loop)
    status, result = emu.control("POST", "/invoke", {"wait_done": True})
    assert status == 200 and result["done"] is True
    assert [e["state"] for e in emu.state()["extensions"]] == ["Ready"]
    emu.control("POST", "/shutdown", {})
    assert json.loads(second.result(timeout=5)[2])["eventType"] == "SHUTDOWN"


def test_invoke_goes_only_to_subscribers(emu):
    emu.control("POST", "/state", {"external_extensions": ["credlock", "logs"]})
    credlock = emu.register()
    logs = emu.register("logs", {"events": ["SHUTDOWN"]})
    credlock_next, logs_next = emu.next_async(credlock), emu.next_async(logs)
    assert emu.control("POST", "/invoke", {})[1]["delivered_to"] == [credlock]
    assert credlock_next.result(timeout=5)[0] == 200
    assert not logs_next.done()
    credlock_again = emu.next_async(credlock)  # the end of credlock's Invoke phase
    result = emu.control("POST", "/shutdown", {"wait_s": 2})[1]
    assert result["received"] is True and result["delivered_to"] == [credlock, logs]
    assert json.loads(logs_next.result(timeout=5)[2])["eventType"] == "SHUTDOWN"
    assert json.loads(credlock_again.result(timeout=5)[2])["eventType"] == "SHUTDOWN"


def test_shutdown_event(emu):
    ext_id = emu.register()
    future = emu.next_async(ext_id)
    status, result = emu.control("POST", "/shutdown", {"shutdownReason": "TIMEOUT", "wait_s": 2})
    assert status == 200 and result["received"] is True and result["delivered_to"] == [ext_id]
    got_status, headers, body = future.result(timeout=5)
    assert got_status == 200
    assert headers["content-type"] == "text/plain; charset=utf-8"  # Go sniffs, [next]
    assert "lambda-extension-event-identifier" not in headers
    event = json.loads(body)
    assert list(event) == ["eventType", "deadlineMs", "shutdownReason"]
    assert event["shutdownReason"] == "TIMEOUT"
    assert 0 < event["deadlineMs"] - time.time() * 1000 <= 2000  # 2,000 ms shutdown budget


def test_shutdown_is_queued_for_a_busy_extension(emu):
    ext_id = emu.register()
    first = emu.next_async(ext_id)
    emu.control("POST", "/invoke", {})
    assert first.result(timeout=5)[0] == 200
    emu.control("POST", "/shutdown", {})  # the extension is still busy with the invoke
    assert json.loads(emu.next(ext_id)[2])["eventType"] == "SHUTDOWN"


def test_nothing_after_shutdown(emu):
    emu.control("POST", "/state", {"external_extensions": []})
    assert emu.control("POST", "/shutdown", {})[0] == 200
    assert emu.control("POST", "/invoke", {"wait_s": 0})[0] == 409
    assert emu.control("POST", "/shutdown", {})[0] == 409
    assert emu.state()["shut_down"] is True


def test_second_concurrent_next_is_403(emu):
    ext_id = emu.register()
    emu.next_async(ext_id)
    assert emu.next(ext_id)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from Ready to Ready failed for extension {ext_id}. "
        "Error: State transition is not allowed")


def test_next_identifier_errors(emu):
    assert emu.request("GET", NEXT)[::2] == api_error(
        403, "Extension.MissingExtensionIdentifier", "Missing Lambda-Extension-Identifier header")
    assert emu.next("not-a-uuid")[::2] == api_error(
        403, "Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")
    unknown = str(uuid.uuid4())
    assert emu.next(unknown)[::2] == api_error(
        403, "Extension.UnknownExtensionIdentifier", f"Unknown extension {unknown}")


def test_unregistered_external_cannot_call_next(emu):
    # An external extension's ID exists from launch ([rapid]) but it must register first.
    started = emu.state()["extensions"][0]["id"]
    assert emu.next(started)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from Started to Ready failed for extension {started}. "
        "Error: State transition is not allowed")


@pytest.mark.parametrize("form", [
    lambda i: "urn:uuid:" + i, lambda i: "{" + i + "}", lambda i: i.replace("-", ""),
    lambda i: i.upper()])
def test_identifier_forms_accepted_by_go_uuid_parse(emu, form):
    ext_id = emu.register()
    future = POOL.submit(emu.next, form(ext_id))
    emu.wait_until(lambda: emu.state()["extensions"][0]["waiting"])
    emu.control("POST", "/invoke", {})
    assert future.result(timeout=5)[0] == 200


def test_reset_wakes_blocked_next_with_500(emu):
    future = emu.next_async(emu.register())
    emu.control("POST", "/reset")
    assert future.result(timeout=5)[::2] == api_error(500, "InternalServerError",
                                                      "Internal Server Error")


# ------------------------------------------------------------------------------------------
# Init error, exit error ([ext-api] Init error, Exit error; [errors], [core])
# ------------------------------------------------------------------------------------------

def test_init_error_then_nothing_succeeds(emu):
    ext_id = emu.register()
    error = {"errorMessage": "no environment", "errorType": "Extension.ConfigInvalid",
             "stackTrace": []}
    status, headers, body = emu.error(INIT_ERROR, ext_id, body=error)
    assert (status, body) == (202, b'{"status":"OK"}\n')
    assert headers["content-type"] == "application/json"
    ext = emu.state()["extensions"][0]
    assert (ext["state"], ext["error_type"], ext["error_body"]) == (
        "InitError", "Extension.ConfigInvalid", error)
    assert emu.next(ext_id)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from InitError to Ready failed for extension {ext_id}. "
        "Error: State transition is not allowed")
    assert emu.error(INIT_ERROR, ext_id, "Extension.Other")[0] == 202  # repeat accepted
    assert emu.state()["extensions"][0]["error_type"] == "Extension.ConfigInvalid"  # first kept
    assert emu.error(EXIT_ERROR, ext_id)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from InitError to Exited failed for extension {ext_id}. "
        "Error: State transition is not allowed")


def test_init_error_only_during_init(emu):
    ext_id = emu.register()
    future = emu.next_async(ext_id)
    emu.control("POST", "/invoke", {})
    future.result(timeout=5)
    assert emu.error(INIT_ERROR, ext_id)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from Running to InitError failed for extension {ext_id}. "
        "Error: State transition is not allowed")
    assert emu.error(EXIT_ERROR, ext_id, body=b"not json")[0] == 202
    ext = emu.state()["extensions"][0]
    assert (ext["state"], ext["error_body"]) == ("ExitError", "not json")


def test_exit_error_while_next_is_blocked(emu):
    ext_id = emu.register()
    future = emu.next_async(ext_id)
    assert emu.error(EXIT_ERROR, ext_id, "Extension.Crash")[0] == 202
    assert future.result(timeout=5)[::2] == api_error(
        403, "Extension.InvalidExtensionState",
        f"State transition from ExitError to Ready failed for extension {ext_id}. "
        "Error: Concurrent state modification")


def test_errored_extensions_do_not_block_invokes(emu):
    emu.error(INIT_ERROR, emu.register())
    assert emu.control("POST", "/invoke", {"wait_s": 0})[1]["delivered_to"] == []


@pytest.mark.parametrize("path", [INIT_ERROR, EXIT_ERROR])
def test_error_endpoint_rejections(emu, path):
    ext_id = emu.register()
    assert emu.error(path, ext_id, error_type=None)[::2] == api_error(
        403, "Extension.MissingHeader", "Lambda-Extension-Function-Error-Type not found")
    assert emu.error(path, str(uuid.uuid4()))[::2] == api_error(
        403, "Extension.UnknownExtensionIdentifier", "Unknown Lambda-Extension-Identifier")
    assert emu.request("POST", path, {"Lambda-Extension-Function-Error-Type": "x"})[::2] == \
        api_error(403, "Extension.MissingExtensionIdentifier",
                  "Missing Lambda-Extension-Identifier header")
    assert emu.error(path, "123")[::2] == api_error(
        403, "Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")


# ------------------------------------------------------------------------------------------
# Routing and Go server behaviour ([router])
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allow", [
    ("GET", REGISTER, "POST"), ("POST", NEXT, "GET"), ("HEAD", NEXT, "GET"),
    ("GET", INIT_ERROR, "POST"), ("PUT", EXIT_ERROR, "POST")])
def test_wrong_method_is_405_with_allow(emu, method, path, allow):
    status, headers, body = emu.request(method, path, {"Lambda-Extension-Name": "credlock"})
    assert (status, headers["allow"], body) == (405, allow, b"")


@pytest.mark.parametrize("path", ["/2020-01-01/extension/register/", "/extension/register",
                                  "/2018-06-01/runtime/invocation/next", "/"])
def test_unknown_paths_are_404(emu, path):
    assert emu.request("POST", path)[::2] == (404, b"404 page not found\n")


def test_missing_host_is_go_400(emu):
    answer = emu.raw(b"GET /2020-01-01/extension/event/next HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")


# ------------------------------------------------------------------------------------------
# Control API
# ------------------------------------------------------------------------------------------

def test_control_is_not_served_on_api_listener(emu):
    assert emu.request("GET", "/state")[0] == 404


def test_request_log_keeps_bodies(emu):
    emu.register()
    log = emu.control("GET", "/requests")[1]
    assert [(e["method"], e["path"], e["status"]) for e in log] == [("POST", REGISTER, 200)]
    assert json.loads(log[0]["body"]) == BOTH
    assert ["Lambda-Extension-Name", "credlock"] in log[0]["headers"]
    emu.control("POST", "/requests/clear")
    assert emu.control("GET", "/requests")[1] == []


def test_delay_and_down(emu):
    emu.control("POST", "/state", {"delay_ms": 300})
    started = time.monotonic()
    emu.request("GET", NEXT)
    assert time.monotonic() - started >= 0.3
    emu.control("POST", "/state", {"delay_ms": 0, "down": True})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        emu.request("GET", NEXT)


def test_function_configuration_is_served(emu):
    emu.control("POST", "/state", {"function": {"function_name": "other", "account_id":
                                                "210987654321", "timeout_s": 60}})
    status, _, body = emu.request("POST", REGISTER, {
        "Lambda-Extension-Name": "credlock", "Lambda-Extension-Accept-Feature": "accountId"}, BOTH)
    assert json.loads(body)["functionName"] == "other"
    assert json.loads(body)["accountId"] == "210987654321"
    assert emu.control("GET", "/environment")[1]["AWS_LAMBDA_FUNCTION_NAME"] == "other"


def test_credentials_can_be_replaced(emu):
    emu.control("POST", "/state", {"credentials": {"AccessKeyId": "ASIAMOTO000000000001",
                                                   "SecretAccessKey": "s", "Token": "t"}})
    env = emu.control("GET", "/environment?for=extension")[1]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"]) == (
        "ASIAMOTO000000000001", "s", "t")


def test_external_extensions_fixed_after_registration(emu):
    emu.register()
    status, body = emu.control("POST", "/state", {"external_extensions": ["x"]})
    assert status == 400 and "before any extension has registered" in body["error"]


@pytest.mark.parametrize("path,patch", [
    ("/state", {"function": {"timeout_s": 0}}), ("/state", {"function": {"nope": 1}}),
    ("/state", {"delay_ms": -1}), ("/state", {"external_extensions": ["a", "a"]}),
    ("/state", {"credentials": {"AccessKeyId": ""}}), ("/state", {"credentials": {"X": "y"}}),
    ("/invoke", {"tracing": "x"}), ("/invoke", {"deadlineMs": "soon"}), ("/invoke", {"x": 1}),
    ("/shutdown", {"shutdownReason": ""}), ("/shutdown", {"wait_s": -1}),
])
def test_invalid_control_requests_are_400(emu, path, patch):
    emu.assert_refused_unchanged(path, patch)
