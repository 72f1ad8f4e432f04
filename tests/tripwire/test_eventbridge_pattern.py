"""credlock-tripwire.pattern.json in a real pattern engine: moto's EventBridge (in-process,
mock_aws, no network). The rule routes matching events to an SQS queue; each sample record is
put as the `detail` of an "AWS API Call via CloudTrail" event with the `source` CloudTrail uses
("aws.s3", "aws.ec2", ...), and only the pos-* records may arrive.

moto 5.2.5 matches patterns for real (prefix, wildcard, $or, ...) but does not model the rule
state: ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS is stored and echoed, and the read-only
filtering it lifts in AWS is not emulated. moto also treats an unknown filter name as a match,
so test_pattern_uses_only_eventbridge_syntax checks the operators against EventBridge's list.
"""

import copy
import json

import boto3
import pytest
from moto import mock_aws

from cases import CASES, PATTERN_FILE, event_source, load_events

REGION = "us-east-1"
STATE = "ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS"
DETAIL_TYPE = "AWS API Call via CloudTrail"


def _variant(record, event_id, mutate):
    out = copy.deepcopy(record)
    mutate(out)
    out["eventID"] = event_id
    return out


def _variants(events):
    """Derived records that pin down the edges of each condition: (record, source, detail-type, expected)."""
    s3 = events["pos-s3-getobject-session-policy-1.json"]
    ec2 = events["pos-ec2-describeinstances-session-policy.json"]
    sc = "userIdentity"

    def replace_msg(old, new):
        return lambda r: r.__setitem__("errorMessage", r["errorMessage"].replace(old, new))

    def append_msg(suffix):
        return lambda r: r.__setitem__("errorMessage", r["errorMessage"] + suffix)

    def set_si(value):
        def f(r):
            if value is None:
                del r[sc]["sessionContext"]["sourceIdentity"]
            else:
                r[sc]["sessionContext"]["sourceIdentity"] = value
        return f

    def drop_error(r):
        del r["errorCode"]
        del r["errorMessage"]

    return {
        # the IAM User Guide's example spells it "a sessions policy"
        "var-sessions-policy-spelling": (_variant(s3, "var-1", replace_msg("in a session policy", "in a sessions policy")), "aws.s3", DETAIL_TYPE, True),
        # access denied messages may end with the denying policy's ARN (AWS Security Blog, 2025)
        "var-policy-arn-suffix": (_variant(s3, "var-2", append_msg(": arn:aws:iam::111122223333:policy/example")), "aws.s3", DETAIL_TYPE, True),
        "var-source-identity-not-prefix": (_variant(s3, "var-3", set_si("x-credlock-i-0123456789abcdef0")), "aws.s3", DETAIL_TYPE, False),
        "var-no-source-identity": (_variant(s3, "var-4", set_si(None)), "aws.s3", DETAIL_TYPE, False),
        "var-no-error": (_variant(s3, "var-5", drop_error), "aws.s3", DETAIL_TYPE, False),
        # AWS services' events have aws.* sources; a custom source must not raise the alarm
        "var-custom-source": (_variant(ec2, "var-6", lambda r: None), "custom.forged", DETAIL_TYPE, False),
        "var-other-detail-type": (_variant(ec2, "var-7", lambda r: None), "aws.ec2", "AWS Service Event via CloudTrail", False),
        "var-iam-user": (_variant(s3, "var-8", lambda r: r[sc].__setitem__("type", "IAMUser")), "aws.s3", DETAIL_TYPE, False),
    }


@pytest.fixture(scope="module")
def routed(monkeypatch_module):
    """Puts every sample and variant through the rule; returns (eventIDs that arrived, rule)."""
    events = load_events()
    variants = _variants(events)
    entries = [(r, event_source(r), DETAIL_TYPE) for r in events.values()]
    entries += [(r, src, dt) for r, src, dt, _ in variants.values()]
    with mock_aws():
        eb = boto3.client("events", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        queue_url = sqs.create_queue(QueueName="tripwire-test")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        eb.put_rule(Name="credlock-tripwire", EventPattern=PATTERN_FILE.read_text(), State=STATE)
        eb.put_targets(Rule="credlock-tripwire", Targets=[{"Id": "q", "Arn": queue_arn}])
        rule = eb.describe_rule(Name="credlock-tripwire")
        for i in range(0, len(entries), 10):
            result = eb.put_events(Entries=[
                {"Source": src, "DetailType": dt, "Detail": json.dumps(r)}
                for r, src, dt in entries[i:i + 10]])
            assert result["FailedEntryCount"] == 0, result
        arrived = []
        while True:
            msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not msgs:
                break
            for m in msgs:
                body = json.loads(m["Body"])
                assert body["detail-type"] == DETAIL_TYPE
                arrived.append(body["detail"]["eventID"])
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
    return arrived, rule, events, variants


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EVENTS", "AWS_ENDPOINT_URL_SQS"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", REGION)
    yield mp
    mp.undo()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample(routed, name):
    arrived, _, events, _ = routed
    expected, why = CASES[name]
    got = arrived.count(events[name]["eventID"])
    assert got == (1 if expected else 0), f"{name}: {why}"


@pytest.mark.parametrize("name", sorted(["var-sessions-policy-spelling", "var-policy-arn-suffix",
                                         "var-source-identity-not-prefix", "var-no-source-identity",
                                         "var-no-error", "var-custom-source",
                                         "var-other-detail-type", "var-iam-user"]))
def test_variant(routed, name):
    arrived, _, _, variants = routed
    record, _, _, expected = variants[name]
    assert arrived.count(record["eventID"]) == (1 if expected else 0), name


def test_exactly_the_positives_arrive(routed):
    arrived, _, events, variants = routed
    want = {events[n]["eventID"] for n, (pos, _) in CASES.items() if pos}
    want |= {r["eventID"] for r, _, _, pos in variants.values() if pos}
    assert sorted(arrived) == sorted(want)
    assert sum(pos for pos, _ in CASES.values()) == 9
    assert sum(not pos for pos, _ in CASES.values()) == 8


def test_rule_state_is_stored(routed):
    _, rule, _, _ = routed
    assert rule["State"] == STATE
    assert json.loads(rule["EventPattern"]) == json.loads(PATTERN_FILE.read_text())


FILTERS = {"prefix", "suffix", "anything-but", "numeric", "cidr", "exists",
           "equals-ignore-case", "wildcard"}


def _check(node, path):
    """EventBridge pattern syntax ("Creating event patterns", "Content filtering in event
    patterns"): objects nest, leaves are non-empty arrays of scalars or one-key filter objects,
    $or is an array of at least two objects."""
    assert isinstance(node, dict) and node, path
    for key, value in node.items():
        where = f"{path}.{key}"
        if key == "$or":
            assert isinstance(value, list) and len(value) >= 2, where
            for i, alt in enumerate(value):
                _check(alt, f"{where}[{i}]")
        elif isinstance(value, dict):
            _check(value, where)
        else:
            assert isinstance(value, list) and value, where
            for item in value:
                if isinstance(item, dict):
                    assert len(item) == 1, where
                    (op, arg), = item.items()
                    assert op in FILTERS, f"{where}: unknown filter {op!r}"
                    if op in ("prefix", "suffix", "wildcard"):
                        assert isinstance(arg, str) and arg, where
                else:
                    assert isinstance(item, (str, int, float, bool)) or item is None, where


def test_pattern_uses_only_eventbridge_syntax():
    text = PATTERN_FILE.read_text()
    pattern = json.loads(text)
    _check(pattern, "pattern")
    # EventPattern: "Length Constraints: Maximum length of 4096" (EventBridge API Reference, Rule)
    assert len(json.dumps(pattern, separators=(",", ":"))) <= 4096
    with pytest.raises(AssertionError, match="unknown filter"):
        _check({"detail": {"errorCode": [{"prefx": "Access"}]}}, "broken")
