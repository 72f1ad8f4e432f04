"""credlock-tripwire.cfn.yml: cfn-lint passes (its schema knows the rule state
ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS from 1.58 on), the embedded EventPattern is
exactly credlock-tripwire.pattern.json, and the wiring (state, target, topic policy) is the
one TRIPWIRE.md describes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode

from cases import PATTERN_FILE, TEMPLATE_FILE


def _plain(node):
    """cfn-lint's decoded nodes as plain dicts/lists/strings (for == and json)."""
    return json.loads(json.dumps(node))


@pytest.fixture(scope="module")
def template():
    tpl, problems = decode(str(TEMPLATE_FILE))
    assert not problems, problems
    return _plain(tpl)


def _cfn_lint():
    exe = Path(sys.executable).with_name("cfn-lint")
    return str(exe) if exe.exists() else shutil.which("cfn-lint")


def test_cfn_lint_passes():
    out = subprocess.run([_cfn_lint(), str(TEMPLATE_FILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cfn_lint_checks_the_state(tmp_path):
    """The lint has teeth: a state it does not know is an error (E3030)."""
    bad = tmp_path / "bad.yml"
    bad.write_text(TEMPLATE_FILE.read_text().replace(
        "State: ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS", "State: ENABLED_FOR_EVERYTHING"))
    out = subprocess.run([_cfn_lint(), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "E3030" in out.stdout, out.stdout


def test_embedded_pattern_is_the_pattern_file(template):
    rule = template["Resources"]["TripwireRule"]["Properties"]
    assert rule["EventPattern"] == json.loads(PATTERN_FILE.read_text())


def test_rule_state_target_and_topic_policy(template):
    res = template["Resources"]
    rule = res["TripwireRule"]["Properties"]
    assert rule["State"] == "ENABLED_WITH_ALL_CLOUDTRAIL_MANAGEMENT_EVENTS"
    assert rule["EventBusName"] == "default"
    assert rule["Targets"] == [{"Id": "credlock-tripwire-sns", "Arn": {"Ref": "AlertTopic"}}]
    policy = res["AlertTopicPolicy"]["Properties"]
    assert policy["Topics"] == [{"Ref": "AlertTopic"}]
    (stmt,) = policy["PolicyDocument"]["Statement"]
    assert stmt["Effect"] == "Allow"
    assert stmt["Principal"] == {"Service": "events.amazonaws.com"}
    assert stmt["Action"] == "sns:Publish"
    assert stmt["Resource"] == {"Ref": "AlertTopic"}
    assert stmt["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["TripwireRule", "Arn"]}}}


def test_email_subscription_is_optional(template):
    assert template["Parameters"]["AlertEmail"]["Default"] == ""
    sub = template["Resources"]["AlertEmailSubscription"]
    assert sub["Condition"] == "HasAlertEmail"
    assert template["Conditions"]["HasAlertEmail"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlertEmail"}, ""]}]}
    assert sub["Properties"]["Protocol"] == "email"
