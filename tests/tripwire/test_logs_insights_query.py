"""credlock-tripwire.logs-insights.txt, checked offline with logs_insights.py (a model of the
subset of the query language it uses, not CloudWatch's engine, which cannot run here): its
structure and names are valid, every field it reads exists in the sample CloudTrail records,
its regexes compile, and evaluated over the samples it selects exactly the records the
EventBridge pattern lets through and groups them as the Athena query does."""

import pytest

import logs_insights as li
from cases import ATHENA_EXPECTED, CASES, LOGS_INSIGHTS_FILE, load_events

TEXT = LOGS_INSIGHTS_FILE.read_text()


@pytest.fixture(scope="module")
def query():
    return li.Query(TEXT)


def test_structure(query):
    assert query.commands == ["fields", "filter", "filter", "parse", "stats", "sort"]
    assert len(query.regexes) == 6


def test_fields_read_exist_in_cloudtrail_records(query):
    known = set(li.SYSTEM_FIELDS)
    for record in load_events().values():
        known |= set(li.flatten(record))
    missing = sorted(query.fields_used - known)
    assert not missing, missing
    assert "userIdentity.sessionContext.sourceIdentity" in query.fields_used
    assert "vpcEndpointId" in query.fields_used


def test_filters_select_exactly_the_positives(query):
    events = load_events()
    rows = li.Query(TEXT.split("| parse")[0]).run(events.values())
    selected = {r["eventID"] for r in rows}
    want = {events[n]["eventID"] for n, (pos, _) in CASES.items() if pos}
    assert selected == want


def test_groups_match_the_athena_query(query):
    rows = query.run(load_events().values())
    got = {(r["instance"], r["role"], r["sourceIPAddress"], r["vpce"], r["action"]):
           (r["denials"], r["first_seen"], r["last_seen"], r["access_keys"], r["last_access_key"])
           for r in rows}
    # Athena's rows: same grouping (its evidence column splits nothing here); the keys of each
    # group were issued in the order their ids sort, so the latest key is the last one.
    want = {(a[0], a[1], a[4], a[5], a[6]): (a[8], a[9], a[10], len(a[11]), a[11][-1])
            for a in ATHENA_EXPECTED}
    assert got == want
    assert rows[0]["denials"] == 2 and rows[0]["action"] == "s3:GetObject"


@pytest.mark.parametrize("broken, message", [
    ("fields eventTime | filtre errorCode = \"x\"", "unknown command"),
    ("fields eventTime | filter countt(errorCode) = 1", "unknown function"),
    ("fields eventTime | filter (errorCode = \"x\"", "expected"),
    ("fields eventTime | filter errorCode like /unclosed", "cannot read"),
    ("fields eventTime | | sort eventTime", "empty command"),
])
def test_checker_rejects(broken, message):
    with pytest.raises(li.QueryError, match=message):
        li.Query(broken)


def test_checker_catches_a_misspelled_field():
    q = li.Query(TEXT.replace("sessionContext.sourceIdentity", "sessionContext.sourceIdentiy"))
    known = set()
    for record in load_events().values():
        known |= set(li.flatten(record))
    assert "userIdentity.sessionContext.sourceIdentiy" in q.fields_used - known
