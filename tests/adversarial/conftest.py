"""Fixtures of the adversarial suite: one moto (STS), one adversarial upstream per personality
with a credlock in front of it (session-wide), and fresh credlocks for the floods.

    .venv/bin/python -m pytest -q tests/adversarial        (as root: the floods run as nobody)

Environment: CREDLOCK_BIN (default target/debug/credlock; missing -> FAIL, never skip),
E2E_PYTHON (interpreter for the upstreams, default .venv/bin/python).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adversarial_lib as lib  # noqa: E402

# 1,100+ client sockets in this process tree (the flooder inherits the limit, credlock too).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 16384
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(_want, _soft), max(_want, _hard)))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adversarial")


@pytest.fixture(scope="session")
def moto_url(workdir):
    moto = lib.Moto(workdir)
    try:
        yield moto.url
    finally:
        moto.stop()


class Stacks:
    """One upstream + credlock per personality, started on first use."""

    def __init__(self, moto_url: str, workdir: Path):
        self.moto_url = moto_url
        self.workdir = workdir
        self.upstreams: dict[str, lib.Upstream] = {}
        self.credlocks: dict[str, lib.Credlock] = {}
        self.failed: dict[str, str] = {}

    def upstream(self, personality: str) -> lib.Upstream:
        if personality not in self.upstreams:
            self.upstreams[personality] = lib.Upstream(personality, self.workdir)
        return self.upstreams[personality]

    def get(self, personality: str) -> lib.Credlock:
        if personality in self.failed:
            pytest.fail(f"the {personality} stack failed to start: {self.failed[personality]}")
        if personality not in self.credlocks:
            try:
                self.credlocks[personality] = lib.Credlock(
                    self.upstream(personality), self.moto_url, self.workdir, personality)
            except BaseException as err:
                self.failed[personality] = str(err)[:3000]
                raise
        credlock = self.credlocks[personality]
        assert credlock.alive(), f"credlock ({personality}) died: {credlock.proc.tail()}"
        return credlock

    def stop(self) -> None:
        for c in self.credlocks.values():
            c.stop()
        for u in self.upstreams.values():
            u.stop()


@pytest.fixture(scope="session")
def stacks(moto_url, workdir):
    s = Stacks(moto_url, workdir)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def fresh_readbody(stacks, request):
    """A credlock of its own in front of the readbody upstream, for tests whose upstream
    misbehaviour could leave a broken credlock's pool desynchronised for the tests after."""
    name = "fresh-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    credlock = lib.Credlock(stacks.upstream("readbody"), stacks.moto_url, stacks.workdir, name)
    try:
        yield credlock
    finally:
        credlock.stop()


def pytest_report_header(config):
    return [f"credlock binary: {lib.CREDLOCK_BIN}"]
