"""pytest wiring shared by the stand-ins' tests in this folder; their harness is
standin_testlib.py."""

import pytest


@pytest.fixture(autouse=True)
def fresh_state(request):
    """A test that uses its module's shared stand-in (`emu`) starts from the stand-in's start-up
    state: POST /reset on the control API before it runs."""
    if "emu" in request.fixturenames:
        assert request.getfixturevalue("emu").control("POST", "/reset")[0] == 200
    yield
