"""The sample CloudTrail records of tests/tripwire/events and what each form must make of them.

Every file is one CloudTrail record as CloudTrail writes it (the `detail` of an EventBridge
"AWS API Call via CloudTrail" event); events/README.md cites the AWS document each shape follows.
`pos-*` files must raise the tripwire, `neg-*` files must not; CASES lists each one with the
reason, and the tests refuse a file that is not listed here.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MONITORING = REPO / "ami" / "monitoring"
EVENTS = HERE / "events"
PATTERN_FILE = MONITORING / "credlock-tripwire.pattern.json"
TEMPLATE_FILE = MONITORING / "credlock-tripwire.cfn.yml"
ATHENA_FILE = MONITORING / "credlock-tripwire.athena.sql"
LOGS_INSIGHTS_FILE = MONITORING / "credlock-tripwire.logs-insights.txt"

# file name -> (raises the tripwire?, why)
CASES = {
    "pos-s3-getobject-session-policy-1.json": (True, "S3 GetObject (data event) from a foreign IP, AccessDenied, explicit deny in a session policy"),
    "pos-s3-getobject-session-policy-2.json": (True, "the same, an hour later, with the next locked set's access key"),
    "pos-s3-listobjects-via-foreign-vpce.json": (True, "S3 ListObjects through a VPC endpoint credlock did not discover"),
    "pos-ec2-describeinstances-session-policy.json": (True, "EC2 Client.UnauthorizedOperation whose message names the session policy"),
    "pos-ec2-describevpcs-encoded-only.json": (True, "EC2 Client.UnauthorizedOperation with only an encoded authorization message"),
    "pos-ec2-describesecuritygroups-no-context.json": (True, "EC2 Client.UnauthorizedOperation with no context at all"),
    "pos-dynamodb-describetable-accessdeniedexception.json": (True, "DynamoDB AccessDeniedException, explicit deny in a session policy (second instance)"),
    "pos-sns-gettopicattributes-authorizationerror.json": (True, "SNS AuthorizationError, explicit deny in a session policy"),
    "pos-sts-assumerole-self-denyselfassume.json": (True, "sts:AssumeRole on the instance role from the instance itself (DenySelfAssume)"),
    "neg-s3-getobject-scp.json": (False, "denied by a service control policy"),
    "neg-iam-listroles-identity-policy.json": (False, "denied by an identity-based policy"),
    "neg-s3-getobject-bucket-policy.json": (False, "denied by a resource-based (bucket) policy"),
    "neg-ec2-runinstances-no-identity-allow.json": (False, "EC2 Client.UnauthorizedOperation whose message names another policy type"),
    "neg-native-instance-profile-session.json": (False, "a native instance-profile session (ec2RoleDelivery, no SourceIdentity)"),
    "neg-s3-getobject-success.json": (False, "a credlock session's successful call"),
    "neg-other-source-identity.json": (False, "a session whose SourceIdentity is not credlock-..."),
    "neg-implicit-no-session-policy-allows.json": (False, "an implicit deny ('because no session policy allows')"),
}

# What the Athena query must return for the records above (its ORDER BY order): instance_id,
# role_name, source_identity, account_id, source_ip, vpc_endpoint, action, evidence, denials,
# first_seen, last_seen, access_key_ids, regions.
I1, I2 = "i-0123456789abcdef0", "i-0fedcba9876543210"
ACCOUNT, ROLE = "111122223333", "app-server"
KEY1A, KEY1B, KEY2A = "ASIAEXAMPLELOCKED01A", "ASIAEXAMPLELOCKED01B", "ASIAEXAMPLELOCKED02A"


def _row(instance, ip, vpce, action, evidence, n, first, last, keys):
    return (instance, ROLE, f"credlock-{instance}", ACCOUNT, ip, vpce, action, evidence, n,
            first, last, keys, ["us-east-1"])


ATHENA_EXPECTED = [
    _row(I1, "203.0.113.50", "-", "s3:GetObject", "session-policy", 2,
         "2026-03-02T10:15:07Z", "2026-03-02T11:20:44Z", [KEY1A, KEY1B]),
    _row(I1, "198.51.100.7", "-", "ec2:DescribeInstances", "session-policy", 1,
         "2026-03-02T10:16:30Z", "2026-03-02T10:16:30Z", [KEY1A]),
    _row(I1, "198.51.100.7", "-", "ec2:DescribeSecurityGroups", "ec2-no-context", 1,
         "2026-03-02T10:16:52Z", "2026-03-02T10:16:52Z", [KEY1A]),
    _row(I1, "198.51.100.7", "-", "ec2:DescribeVpcs", "ec2-no-context", 1,
         "2026-03-02T10:16:41Z", "2026-03-02T10:16:41Z", [KEY1A]),
    _row(I1, "10.99.0.12", "vpce-0a1b2c3d4e5f67890", "s3:ListObjects", "session-policy", 1,
         "2026-03-02T11:31:02Z", "2026-03-02T11:31:02Z", [KEY1B]),
    _row(I1, "192.0.2.10", "-", "sts:AssumeRole", "session-policy", 1,
         "2026-03-02T10:40:00Z", "2026-03-02T10:40:00Z", [KEY1A]),
    _row(I2, "198.51.100.7", "-", "dynamodb:DescribeTable", "session-policy", 1,
         "2026-03-02T12:01:09Z", "2026-03-02T12:01:09Z", [KEY2A]),
    _row(I2, "198.51.100.7", "-", "sns:GetTopicAttributes", "session-policy", 1,
         "2026-03-02T12:01:15Z", "2026-03-02T12:01:15Z", [KEY2A]),
]


def load_events():
    """{file name: record} for every sample file; fails on a file CASES does not list."""
    found = {p.name: json.loads(p.read_text()) for p in sorted(EVENTS.glob("*.json"))}
    unknown = set(found) ^ set(CASES)
    assert not unknown, f"events/ and CASES differ: {sorted(unknown)}"
    for name, record in found.items():
        expected = CASES[name][0]
        assert name.startswith("pos-" if expected else "neg-"), name
        assert record["eventID"], name
    return found


def event_source(record):
    """EventBridge `source` of a CloudTrail record: "aws." + the service of eventSource."""
    return "aws." + record["eventSource"].split(".", 1)[0]
