"""A client of the ECS agent stand-in's control API (ecs_agent_emulator.py), for the suites that
run the stand-in in front of credlock (tests/e2e/test_ecs_tasks.py,
tests/adversarial/test_adversarial_ecs.py).

It defines, rotates and reads task credentials, and remembers every raw value the agent ever
served (rotated sets too: `raw_seen`) and which credential id each raw AccessKeyId belongs to
(`owner`), so a test can look for any of them in whatever a client received, and tell whose raw
key signed an AssumeRole (recording_sts.py).

Standard library only; a test module puts this folder on sys.path and imports it.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid

import standin

DEFAULT_ACCOUNT = "123456789012"  # the stand-in's account (and moto's default)
RAW_FIELDS = ("AccessKeyId", "SecretAccessKey", "Token")


class AgentControl:
    """The control API at `control_addr` (HOST:PORT). Every call must be answered 200, else
    AssertionError."""

    timeout = 10.0

    def __init__(self, control_addr: str, account: str = DEFAULT_ACCOUNT):
        self.control_addr = control_addr
        self.account = account
        self.raw_seen: set[str] = set()  # every raw value the agent served (rotations too)
        self.owner: dict[str, str] = {}  # raw AccessKeyId -> credential id
        self._raw_lock = threading.Lock()

    def control(self, method: str, path: str, document=None):
        """One control request (a JSON body where given): the JSON answer."""
        body = json.dumps(document).encode() if document is not None else None
        conn = http.client.HTTPConnection(*standin.parse_address(self.control_addr),
                                          timeout=self.timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            status, data = response.status, response.read()
        finally:
            conn.close()
        if status != 200:
            raise AssertionError(f"agent control {method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def _remember(self, entry: dict) -> dict:
        doc = entry["document"]
        with self._raw_lock:
            self.raw_seen.update(doc[k] for k in RAW_FIELDS if doc[k])
            self.owner.setdefault(doc["AccessKeyId"], entry["id"])
        return entry

    def new_task(self, role: str, cred_id: str | None = None, **spec) -> dict:
        """Define task credentials (a new UUID id unless given) for role ROLE of the account;
        `spec` as POST /credentials takes it (document overrides, ...)."""
        spec = {"id": cred_id or str(uuid.uuid4()),
                "role_arn": f"arn:aws:iam::{self.account}:role/{role}", **spec}
        return self._remember(self.control("POST", "/credentials", spec))

    def rotate(self, cred_id: str) -> dict:
        return self._remember(self.control("POST", "/credentials/rotate", {"id": cred_id}))

    def state(self) -> dict:
        state = self.control("GET", "/state")
        for entry in state["credentials"].values():
            self._remember(entry)
        return state

    def raw(self, cred_id: str) -> dict:
        """The raw document the agent serves for this id right now."""
        return self.state()["credentials"][cred_id]["document"]

    def raw_values(self) -> set[str]:
        """Every raw value the agent ever served, up to now."""
        self.state()
        with self._raw_lock:
            return set(self.raw_seen)

    def agent_requests(self) -> list[dict]:
        """The requests that reached the agent (GET /requests)."""
        return self.control("GET", "/requests")
