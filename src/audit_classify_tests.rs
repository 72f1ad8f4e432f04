//! Classification of records and grouping of calls (included from `audit_tests.rs`).

use std::cell::RefCell;

use super::*;

// ---- classification ----

fn captured(records: &[Value]) -> (Report, Vec<String>) {
    let calls = RefCell::new(Vec::new());
    let judge = |call: &Call<'_>| {
        calls.borrow_mut().push(format!("{call:?}"));
        judge(call)
    };
    let mut acc = Accumulator::new(100);
    audit_reader("t", delivery(records).as_slice(), &judge, &mut acc);
    (acc.finish(), calls.into_inner())
}

#[test]
fn credlock_sessions_denied_by_the_session_policy_are_theft_signals() {
    let t = "2026-11-30T12:00:00Z";
    let e = |code: &str, message: &str, source: &str, name: &str| {
        denied(
            event(locked(INSTANCE), source, name, ATTACKER, t),
            code,
            message,
        )
    };
    let records = vec![
        e(
            "AccessDenied",
            EXPLICIT_DENY,
            "s3.amazonaws.com",
            "GetObject",
        ),
        // KMS, DynamoDB: AccessDeniedException, the same message form.
        e(
            "AccessDeniedException",
            "User: ... is not authorized to perform: kms:Decrypt on resource: k with an explicit deny in a session policy",
            "kms.amazonaws.com",
            "Decrypt",
        ),
        // EC2: an encoded message; counted, it cannot be attributed without decoding.
        e(
            "Client.UnauthorizedOperation",
            "You are not authorized to perform this operation. Encoded authorization failure message: AbC",
            "ec2.amazonaws.com",
            "DescribeInstances",
        ),
        // Denied by another policy: not the lock.
        e(
            "AccessDenied",
            "User: ... is not authorized to perform: s3:PutObject because no identity-based policy allows the s3:PutObject action",
            "s3.amazonaws.com",
            "PutObject",
        ),
        e(
            "AccessDenied",
            "Access Denied",
            "s3.amazonaws.com",
            "PutObject",
        ),
        e(
            "ThrottlingException",
            "session policy",
            "s3.amazonaws.com",
            "PutObject",
        ),
        // A success.
        event(locked(INSTANCE), "s3.amazonaws.com", "GetObject", INSIDE, t),
    ];
    let (report, calls) = captured(&records);
    assert!(
        calls.is_empty(),
        "credlock sessions are never judged: {calls:?}"
    );
    assert_eq!(report.records_denied_locked, 3);
    assert_eq!(report.records_locked_other, 4);
    let events: Vec<&str> = report
        .denied_locked
        .iter()
        .map(|g| g.event_name.as_str())
        .collect();
    // Equal counts: by key, so by event source (ec2, kms, s3).
    assert_eq!(events, ["DescribeInstances", "Decrypt", "GetObject"]);
    assert!(
        report
            .denied_locked
            .iter()
            .all(|g| g.instance_id == INSTANCE
                && g.source == Source::SourceIp(ATTACKER.parse().unwrap())
                && g.advice.is_none())
    );
    assert!(render_table(&report).contains("EC2 denials"));
}

#[test]
fn the_instance_of_a_credlock_session_is_its_source_identity() {
    // A source identity persists into chained sessions, whose names are the chainer's choice.
    let mut chained = locked(INSTANCE);
    chained["arn"] = json!(format!(
        "arn:aws:sts::{ACCOUNT}:assumed-role/other-role/chosen-name"
    ));
    let records = vec![denied(
        event(chained, "s3.amazonaws.com", "GetObject", ATTACKER, "t"),
        "AccessDenied",
        EXPLICIT_DENY,
    )];
    let (report, _) = captured(&records);
    assert_eq!(report.denied_locked[0].instance_id, INSTANCE);
    // A marker with nothing after the prefix: the session name.
    let bare = role_session(OTHER_INSTANCE, Some("credlock-"), None);
    let records = vec![denied(
        event(bare, "s3.amazonaws.com", "GetObject", ATTACKER, "t"),
        "AccessDenied",
        EXPLICIT_DENY,
    )];
    assert_eq!(
        captured(&records).0.denied_locked[0].instance_id,
        OTHER_INSTANCE
    );
}

#[test]
fn native_sessions_are_judged_with_the_call_as_recorded() {
    let t = "2026-11-30T12:00:00Z";
    let mut via = event(
        native(INSTANCE),
        "kms.amazonaws.com",
        "Decrypt",
        "s3.amazonaws.com",
        t,
    );
    via["userIdentity"]["invokedBy"] = json!("s3.amazonaws.com");
    let internal = event(
        native(INSTANCE),
        "kms.amazonaws.com",
        "GenerateDataKey",
        "AWS Internal",
        t,
    );
    let mut endpoint = event(
        native(INSTANCE),
        "s3.amazonaws.com",
        "PutObject",
        "10.0.1.5",
        t,
    );
    endpoint["vpcEndpointId"] = json!(BAD_VPCE);
    let mut good_endpoint = event(
        native(INSTANCE),
        "s3.amazonaws.com",
        "PutObject",
        "10.0.1.5",
        t,
    );
    good_endpoint["vpcEndpointId"] = json!(GOOD_VPCE);
    let mut v1 = native(INSTANCE);
    v1["sessionContext"]["ec2RoleDelivery"] = json!("1.0");
    let records = vec![
        event(
            native(INSTANCE),
            "monitoring.amazonaws.com",
            "PutMetricData",
            ATTACKER,
            t,
        ),
        via,
        internal,
        endpoint,
        good_endpoint,
        event(
            v1,
            "ec2.amazonaws.com",
            "DescribeInstances",
            "2001:db8::7",
            t,
        ),
        // A failed call is judged too: the lock applies whatever the outcome.
        denied(
            event(native(INSTANCE), "s3.amazonaws.com", "GetObject", INSIDE, t),
            "AccessDenied",
            "no identity-based policy allows",
        ),
    ];
    let (report, calls) = captured(&records);
    let expected = [
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"cloudwatch:PutMetricData\", source_ip: Some({ATTACKER}), vpc_endpoint_id: None, via_aws_service: false, event_source: \"monitoring.amazonaws.com\", event_name: \"PutMetricData\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"kms:Decrypt\", source_ip: None, vpc_endpoint_id: None, via_aws_service: true, event_source: \"kms.amazonaws.com\", event_name: \"Decrypt\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"kms:GenerateDataKey\", source_ip: None, vpc_endpoint_id: None, via_aws_service: true, event_source: \"kms.amazonaws.com\", event_name: \"GenerateDataKey\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"s3:PutObject\", source_ip: Some(10.0.1.5), vpc_endpoint_id: Some(\"{BAD_VPCE}\"), via_aws_service: false, event_source: \"s3.amazonaws.com\", event_name: \"PutObject\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"s3:PutObject\", source_ip: Some(10.0.1.5), vpc_endpoint_id: Some(\"{GOOD_VPCE}\"), via_aws_service: false, event_source: \"s3.amazonaws.com\", event_name: \"PutObject\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"ec2:DescribeInstances\", source_ip: Some(2001:db8::7), vpc_endpoint_id: None, via_aws_service: false, event_source: \"ec2.amazonaws.com\", event_name: \"DescribeInstances\" }}"
        ),
        format!(
            "Call {{ instance_id: \"{INSTANCE}\", action: \"s3:GetObject\", source_ip: Some({INSIDE}), vpc_endpoint_id: None, via_aws_service: false, event_source: \"s3.amazonaws.com\", event_name: \"GetObject\" }}"
        ),
    ];
    assert_eq!(calls, expected);
    assert_eq!(report.records_would_deny, 3);
    assert_eq!(report.records_native_allowed, 4);
    let sources: Vec<String> = report
        .would_deny
        .iter()
        .map(|g| g.source.to_string())
        .collect();
    assert_eq!(sources, [BAD_VPCE, ATTACKER, "2001:db8::7"]);
    assert_eq!(
        report.would_deny[0].advice.as_deref(),
        Some(format!("{BAD_VPCE} is not an endpoint of {INSTANCE}").as_str())
    );
}

#[test]
fn other_principals_and_incomplete_records_are_ignored() {
    let t = "2026-11-30T12:00:00Z";
    let mut no_name = event(
        native(INSTANCE),
        "s3.amazonaws.com",
        "GetObject",
        ATTACKER,
        t,
    );
    no_name["eventName"] = Value::Null;
    let mut bad_arn = native(INSTANCE);
    bad_arn["arn"] = json!("arn:aws:iam::111122223333:role/web-role");
    let mut wrong_type = locked(INSTANCE);
    wrong_type["type"] = json!("Role");
    let service = json!({"type": "AWSService", "invokedBy": "ec2.amazonaws.com"});
    let records = vec![
        event(iam_user(), "s3.amazonaws.com", "GetObject", ATTACKER, t),
        event(
            service,
            "sts.amazonaws.com",
            "AssumeRole",
            "ec2.amazonaws.com",
            t,
        ),
        // A role session that is neither credlock's nor EC2's, with or without a source identity.
        event(
            role_session("alice", None, None),
            "s3.amazonaws.com",
            "GetObject",
            ATTACKER,
            t,
        ),
        event(
            role_session("alice", Some("alice@example.com"), None),
            "s3.amazonaws.com",
            "GetObject",
            ATTACKER,
            t,
        ),
        event(bad_arn, "s3.amazonaws.com", "GetObject", ATTACKER, t),
        event(wrong_type, "s3.amazonaws.com", "GetObject", ATTACKER, t),
        no_name,
        json!({"eventName": "GetObject", "eventSource": "s3.amazonaws.com"}),
        json!({"eventName": "GetObject", "userIdentity": null}),
    ];
    let (report, calls) = captured(&records);
    assert!(calls.is_empty());
    assert_eq!(report.records_read, 9);
    assert_eq!(report.records_ignored, 9);
    // credlock's marker wins over ec2RoleDelivery.
    let both = role_session(INSTANCE, Some(&format!("credlock-{INSTANCE}")), Some("2.0"));
    let (report, calls) = captured(&[denied(
        event(both, "s3.amazonaws.com", "GetObject", ATTACKER, t),
        "AccessDenied",
        EXPLICIT_DENY,
    )]);
    assert!(calls.is_empty());
    assert_eq!(report.records_denied_locked, 1);
}

#[test]
fn iam_actions_from_event_sources() {
    assert_eq!(iam_action("s3.amazonaws.com", "GetObject"), "s3:GetObject");
    assert_eq!(
        iam_action("ec2.amazonaws.com", "DescribeInstances"),
        "ec2:DescribeInstances"
    );
    assert_eq!(
        iam_action("monitoring.amazonaws.com", "PutMetricData"),
        "cloudwatch:PutMetricData"
    );
    assert_eq!(
        iam_action("tagging.amazonaws.com", "GetResources"),
        "tag:GetResources"
    );
    assert_eq!(iam_action("es.amazonaws.com", "ESHttpGet"), "es:ESHttpGet");
    assert_eq!(iam_action("", "X"), ":X");
}

#[test]
fn sources_are_endpoints_addresses_services_or_other() {
    let mut r = Record {
        source_ip_address: Some(" 2001:DB8::1 ".into()),
        ..Record::default()
    };
    assert_eq!(
        source_of(&r),
        Source::SourceIp("2001:db8::1".parse().unwrap())
    );
    r.vpc_endpoint_id = Some(GOOD_VPCE.into());
    assert_eq!(source_of(&r), Source::VpcEndpointId(GOOD_VPCE.into()));
    r.vpc_endpoint_id = Some(String::new());
    for (text, source) in [
        ("AWS Internal", Source::SourceService("AWS Internal".into())),
        (
            "s3.amazonaws.com",
            Source::SourceService("s3.amazonaws.com".into()),
        ),
        (
            "s3.cn-north-1.amazonaws.com.cn",
            Source::SourceService("s3.cn-north-1.amazonaws.com.cn".into()),
        ),
        (
            "evil.example.com",
            Source::SourceOther("evil.example.com".into()),
        ),
    ] {
        r.source_ip_address = Some(text.into());
        assert_eq!(source_of(&r), source);
    }
    r.source_ip_address = None;
    assert_eq!(source_of(&r), Source::SourceOther(String::new()));
    assert_eq!(source_of(&r).to_string(), "-");
}

// ---- grouping ----

#[test]
fn groups_count_and_keep_first_and_last_seen_and_the_first_advice() {
    let d = |ip: &str, name: &str, time: &str| {
        denied(
            event(locked(INSTANCE), "s3.amazonaws.com", name, ip, time),
            "AccessDenied",
            EXPLICIT_DENY,
        )
    };
    let n = |instance: &str, ip: &str, time: &str| {
        event(native(instance), "s3.amazonaws.com", "GetObject", ip, time)
    };
    let records = vec![
        d(ATTACKER, "GetObject", "2026-11-30T12:00:05Z"),
        d(ATTACKER, "GetObject", "2026-11-30T11:59:59Z"),
        d(ATTACKER, "GetObject", "2026-12-01T00:00:00Z"),
        d(ATTACKER, "ListBucket", "2026-11-30T12:00:00Z"),
        d("198.51.100.8", "GetObject", "2026-11-30T12:00:00Z"),
        d("198.51.100.8", "GetObject", "2026-11-30T12:00:01Z"),
        n(INSTANCE, "192.0.2.1", "2026-11-30T10:00:00Z"),
        n(OTHER_INSTANCE, "192.0.2.1", "2026-11-30T09:00:00Z"),
    ];
    let report = captured(&records).0;
    let got = serde_json::to_value(&report.denied_locked).unwrap();
    let item = |ip: &str, name: &str, count: u64, first: &str, last: &str| {
        json!({"instance_id": INSTANCE, "source_ip": ip, "event_source": "s3.amazonaws.com",
               "event_name": name, "count": count, "first_seen": first, "last_seen": last})
    };
    assert_eq!(
        got,
        json!([
            item(
                ATTACKER,
                "GetObject",
                3,
                "2026-11-30T11:59:59Z",
                "2026-12-01T00:00:00Z"
            ),
            item(
                "198.51.100.8",
                "GetObject",
                2,
                "2026-11-30T12:00:00Z",
                "2026-11-30T12:00:01Z"
            ),
            item(
                ATTACKER,
                "ListBucket",
                1,
                "2026-11-30T12:00:00Z",
                "2026-11-30T12:00:00Z"
            ),
        ])
    );
    let got = serde_json::to_value(&report.would_deny).unwrap();
    assert_eq!(got[0]["instance_id"], INSTANCE);
    assert_eq!(got[1]["instance_id"], OTHER_INSTANCE);
    assert_eq!(
        got[1]["advice"],
        format!("192.0.2.1 is not in the environment of {OTHER_INSTANCE}")
    );
    // The report is one JSON object with every counter.
    let whole = serde_json::to_value(&report).unwrap();
    for key in [
        "denied_locked",
        "would_deny",
        "skipped",
        "files_read",
        "digest_files",
        "records_read",
        "records_ignored",
        "dropped_groups",
        "dropped_events",
        "dropped",
    ] {
        assert!(whole.get(key).is_some(), "{key}");
    }
    let text = render_table(&report);
    assert!(text.contains("COUNT  INSTANCE"), "{text}");
    assert!(
        text.contains(&format!(
            "-> 192.0.2.1 is not in the environment of {OTHER_INSTANCE}"
        )),
        "{text}"
    );
}

#[test]
fn the_first_advice_is_kept_when_later_calls_get_other_advice() {
    let seen = RefCell::new(0);
    let judge = |_: &Call<'_>| {
        *seen.borrow_mut() += 1;
        Some(format!("advice {}", seen.borrow()))
    };
    let records: Vec<Value> = (0..3)
        .map(|_| {
            event(
                native(INSTANCE),
                "s3.amazonaws.com",
                "GetObject",
                ATTACKER,
                "t",
            )
        })
        .collect();
    let mut acc = Accumulator::new(10);
    audit_reader("t", delivery(&records).as_slice(), &judge, &mut acc);
    let report = acc.finish();
    assert_eq!(report.would_deny[0].advice.as_deref(), Some("advice 1"));
    assert_eq!(report.would_deny[0].count, 3);
}

fn denial_at(ip: &str) -> Value {
    denied(
        event(
            locked(INSTANCE),
            "s3.amazonaws.com",
            "GetObject",
            ip,
            "2026-11-30T12:00:00Z",
        ),
        "AccessDenied",
        EXPLICIT_DENY,
    )
}

#[test]
fn the_cap_evicts_the_smallest_then_least_recent_group() {
    let (a, b, c, d) = ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4");
    // a×3, b×2, then c (evicts b, the smallest), then d (evicts c), then b again (evicts d:
    // count 1 like b would be, and the least recent at count 1).
    let order = [a, a, b, a, b, c, d, b];
    let records: Vec<Value> = order.iter().map(|ip| denial_at(ip)).collect();
    let report = run_with(&[("t", delivery(&records))], 2);
    let kept: Vec<(String, u64)> = report
        .denied_locked
        .iter()
        .map(|g| (g.source.to_string(), g.count))
        .collect();
    assert_eq!(kept, [(a.to_string(), 3), (b.to_string(), 1)]);
    assert_eq!(
        report.dropped.denied_locked,
        Dropped {
            groups: 3,
            events: 4
        }
    );
    assert_eq!(report.dropped_groups, 3);
    assert_eq!(report.dropped_events, 4);
    assert_eq!(report.dropped.would_deny, Dropped::default());
    let counted: u64 = report.denied_locked.iter().map(|g| g.count).sum();
    assert_eq!(
        counted + report.dropped_events,
        report.records_denied_locked
    );
    assert!(render_table(&report).contains("Group limit reached: 3 groups (4 events)"));
}

#[test]
fn among_equal_counts_the_least_recently_seen_is_evicted() {
    let (a, b, c) = ("192.0.2.1", "192.0.2.2", "192.0.2.3");
    // a and b both at 2, a seen last: c evicts b.
    let records: Vec<Value> = [a, b, b, a, c].iter().map(|ip| denial_at(ip)).collect();
    let report = run_with(&[("t", delivery(&records))], 2);
    let kept: Vec<String> = report
        .denied_locked
        .iter()
        .map(|g| g.source.to_string())
        .collect();
    assert_eq!(kept, [a, c]);
    // A cap of 0 keeps one group.
    let report = run_with(&[("t", delivery(&records))], 0);
    assert_eq!(report.denied_locked.len(), 1);
    assert_eq!(report.dropped_events, 4);
}

#[test]
fn a_long_stream_with_a_small_cap_keeps_the_recurring_groups_exactly() {
    // 50 sources seen every round, each followed by a one-off source: 20 rounds, 2,000 denials,
    // 1,050 groups, a cap of 120. A group that recurs before (cap - groups larger than it) newer
    // groups arrive is never evicted.
    let mut records = Vec::new();
    for round in 0..20 {
        for heavy in 0..50 {
            records.push(denial_at(&format!("192.0.2.{heavy}")));
            records.push(denial_at(&format!("10.0.{round}.{heavy}")));
        }
    }
    let report = run_with(&[("t", lines(&records))], 120);
    let heavy: Vec<&Group> = report
        .denied_locked
        .iter()
        .filter(|g| g.count > 1)
        .collect();
    assert_eq!(heavy.len(), 50);
    assert!(heavy.iter().all(|g| g.count == 20));
    assert_eq!(report.denied_locked.len(), 120);
    let counted: u64 = report.denied_locked.iter().map(|g| g.count).sum();
    assert_eq!(counted + report.dropped_events, 2_000);
    assert_eq!(report.dropped_groups, 1_050 - 120);
}
