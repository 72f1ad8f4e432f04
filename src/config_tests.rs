use super::*;

fn err(text: &str) -> ConfigError {
    from_toml(text, &Overrides::default()).unwrap_err()
}

#[test]
fn defaults_match_the_documented_ones() {
    let c = from_toml("", &Overrides::default()).unwrap();
    let listen: Vec<String> = c.listen.iter().map(ToString::to_string).collect();
    assert_eq!(listen, ["127.0.0.1:8169", "[::1]:8169"]);
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9169");
    assert_eq!(c.upstream.authority.as_str(), "169.254.169.254");
    assert_eq!(c.lock.session_duration, Duration::from_secs(3600));
    assert_eq!(c.discovery.echo_urls, ["https://checkip.amazonaws.com"]);
    assert!(c.discovery.imds && c.discovery.ec2.is_none());
}

#[test]
fn flags_override_the_file() {
    let ov = Overrides {
        listen: vec!["127.0.0.1:18169".into()],
        upstream: Some("http://127.0.0.1:1234".into()),
        ..Overrides::default()
    };
    let c = from_toml(
        "[server]\nlisten = [\"127.0.0.1:1\"]\nupstream = \"http://10.0.0.1\"\n",
        &ov,
    )
    .unwrap();
    assert_eq!(c.listen, ["127.0.0.1:18169".parse().unwrap()]);
    assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:1234");
}

#[test]
fn errors_name_the_key_the_value_and_why() {
    let e = err("[server]\nadmin_listen = \"0.0.0.0:9169\"\n");
    assert_eq!(e.key, "server.admin_listen");
    assert_eq!(e.value, "0.0.0.0:9169");
    assert!(e.to_string().contains("loopback"), "{e}");

    let e = err("[server]\nupstream = \"https://169.254.169.254\"\n");
    assert_eq!(e.key, "server.upstream");

    let e = err("[lock]\nsession_duration_seconds = 7200\n");
    assert_eq!(
        (e.key.as_str(), e.value.as_str()),
        ("lock.session_duration_seconds", "7200")
    );
    assert!(e.why.contains("role chaining"));

    let e = err("[lock]\nrole_arn = \"arn:aws:iam::123:role/x\"\n");
    assert_eq!(e.key, "lock.role_arn");

    let e = err("[discovery.static]\nipv4 = [\"300.1.1.1\"]\n");
    assert_eq!(
        (e.key.as_str(), e.value.as_str()),
        ("discovery.static.ipv4", "300.1.1.1")
    );

    let e = err("[discovery.static]\nvpcs = [\"vpc-XYZ\"]\n");
    assert_eq!(e.key, "discovery.static.vpcs");

    let e = err("[discovery.ec2]\nenabled = true\nscope = \"tagged\"\n");
    assert_eq!(e.key, "discovery.ec2.tag_key");

    let e = err("[log]\nformat = \"xml\"\n");
    assert_eq!(e.key, "log.format");
}

#[test]
fn unknown_keys_and_bad_toml_are_rejected() {
    let e = err("[server]\nlisten_on = []\n");
    assert!(e.why.contains("unknown field"), "{e}");
    let e = err("[server\n");
    assert_eq!(e.key, "config file");
}

#[test]
fn aws_ids() {
    assert!(is_aws_id("vpc-0abc1234def567890", "vpc-"));
    assert!(is_aws_id("vpc-1a2b3c4d", "vpc-"));
    assert!(!is_aws_id("vpc-1a2b3c4", "vpc-"));
    assert!(!is_aws_id("vpce-0ABC1234DEF567890", "vpce-"));
}

#[test]
fn access_rules_are_validated_at_load_and_names_resolved_by_check_config() {
    let ok = from_toml(
        "[[access.rule]]\nname = \"web\"\nusers = [\"root\", \"1000\"]\ncredentials = \"deny\"\n\
         [[access.rule]]\nname = \"later\"\nusers = [\"credlock-no-such-user-xyz\"]\n",
        &Overrides::default(),
    )
    .expect("a user that does not exist yet is not a load error (run time: a warning)");
    assert_eq!(ok.access.rules.len(), 2);
    let e = check_access_names(&ok.access).expect_err("check-config: every name must resolve");
    assert_eq!(
        (e.key.as_str(), e.value.as_str()),
        ("access.rule[1].users", "credlock-no-such-user-xyz")
    );
    assert!(
        e.to_string()
            .starts_with("access.rule[1].users=\"credlock-no-such-user-xyz\" is not valid: "),
        "{e}"
    );

    let e = err("[[access.rule]]\nname = \"a\"\n[[access.rule]]\nname = \"a\"\n");
    assert_eq!(e.key, "access.rule[1].name");
    let e = err("[[access.rule]]\nname = \"a\"\nunits = [\"nginx service\"]\n");
    assert_eq!(e.key, "access.rule[0].units");
    let e = err("[[access.rule]]\nname = \"a\"\nmetadata = [\"/meta-data/\"]\n");
    assert_eq!(e.key, "access.rule[0].metadata");
    // A per-class role is an IAM role ARN, as IAM writes them; anything else is refused.
    let ok = from_toml(
        "[[access.rule]]\nname = \"a\"\nrole = \"arn:aws:iam::123456789012:role/team/x\"\n",
        &Overrides::default(),
    );
    assert!(ok.is_ok(), "{:?}", ok.err());
    for bad in [
        "arn:aws:iam::123456789012:user/x",
        "arn:aws:iam::12345678901:role/x",
        "arn:aws:sts::123456789012:role/x",
        "arn:aws:iam::123456789012:role/p//x",
        "arn:aws:iam::123456789012:role/",
        "worker-s3",
    ] {
        let e = err(&format!(
            "[[access.rule]]\nname = \"a\"\nrole = \"{bad}\"\n"
        ));
        assert_eq!(e.key, "access.rule[0].role", "{bad}");
        assert!(e.why.contains("not an IAM role ARN"), "{bad}: {e}");
    }
    let e = err("[[access.rule]]\nname = \"a\"\nsudo = true\n");
    assert!(e.why.contains("unknown field"), "{e}");
}

#[test]
fn sessions_are_marked_by_default_and_dp_tags_are_refused() {
    let c = from_toml("", &Overrides::default()).unwrap();
    assert!(c.lock.source_identity, "marking is the default");
    let c = from_toml("[lock]\nsource_identity = false\n", &Overrides::default()).unwrap();
    assert!(!c.lock.source_identity);
    let e = err("[lock]\nsession_tags = { \"dp:exclude\" = \"true\" }\n");
    assert_eq!(e.key, "lock.session_tags");
    assert!(e.why.contains("dp:"), "{e}");
    let e = err("[lock]\nsession_tags = { \"DP:Exclude:Network\" = \"x\" }\n");
    assert!(e.why.contains("reserved"), "{e}");
    assert!(
        from_toml(
            "[lock]\nsession_tags = { team = \"dp\" }\n",
            &Overrides::default()
        )
        .is_ok()
    );
}

#[test]
fn containers_ecs_is_off_unless_its_table_is_there_and_has_documented_defaults() {
    let c = from_toml("", &Overrides::default()).unwrap();
    assert!(c.ecs.is_none());
    let c = from_toml("[containers.ecs]\nenabled = false\n", &Overrides::default()).unwrap();
    assert!(c.ecs.is_none());
    let c = from_toml("[containers.ecs]\n", &Overrides::default()).unwrap();
    let ecs = c.ecs.unwrap();
    assert_eq!(ecs.listen, vec!["127.0.0.1:51680".parse().unwrap()]);
    assert_eq!(ecs.agent.authority.as_str(), "127.0.0.1:51679");
    assert_eq!(ecs.agent_timeout, Duration::from_millis(2000));
    assert_eq!(ecs.assume_rate, 5.0);
    assert_eq!(ecs.max_tasks, 256);
    // host:port alone is an http:// agent.
    let c = from_toml(
        "[containers.ecs]\nagent = \"127.0.0.1:9999\"\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.ecs.unwrap().agent.authority.as_str(), "127.0.0.1:9999");
}

#[test]
fn containers_ecs_rejects_what_would_break_or_overspend() {
    for (text, key) in [
        (
            "[server]\nlisten = [\"127.0.0.1:51680\"]\n[containers.ecs]\n",
            "containers.ecs.listen",
        ),
        (
            "[containers.ecs]\nlisten = [\"127.0.0.1:9169\"]\n",
            "containers.ecs.listen",
        ),
        ("[containers.ecs]\nlisten = []\n", "containers.ecs.listen"),
        (
            "[containers.ecs]\nagent = \"https://127.0.0.1:51679\"\n",
            "containers.ecs.agent",
        ),
        (
            "[containers.ecs]\nagent = \"http://127.0.0.1:51679/v2\"\n",
            "containers.ecs.agent",
        ),
        (
            "[containers.ecs]\nassume_rate = 0\n",
            "containers.ecs.assume_rate",
        ),
        (
            "[containers.ecs]\nassume_rate = 1000\n",
            "containers.ecs.assume_rate",
        ),
        (
            "[containers.ecs]\nmax_tasks = 0\n",
            "containers.ecs.max_tasks",
        ),
        (
            "[containers.ecs]\nagent_timeout_ms = 1\n",
            "containers.ecs.agent_timeout_ms",
        ),
        ("[containers.ecs]\nsurprise = 1\n", ""),
    ] {
        let e = from_toml(text, &Overrides::default()).unwrap_err();
        assert!(e.key.starts_with(key), "{text}: {e}");
    }
}

#[test]
fn containers_pod_identity_defaults_to_the_agents_addresses_at_a_privileged_port() {
    let c = from_toml("", &Overrides::default()).unwrap();
    assert!(c.pod_identity.is_none());
    let c = from_toml("[containers.pod_identity]\n", &Overrides::default()).unwrap();
    let p = c.pod_identity.unwrap();
    assert_eq!(p.kind, AgentKind::PodIdentity);
    assert_eq!(
        p.listen,
        vec![
            "169.254.170.23:923".parse().unwrap(),
            "[fd00:ec2::23]:923".parse().unwrap()
        ]
    );
    assert_eq!(p.agent.authority.as_str(), "169.254.170.23:80");
    assert!(p.roles.is_empty());
    let c = from_toml(
        "[containers.ecs]\n[containers.pod_identity]\nroles = [\"arn:aws:iam::111122223333:role/a/b\"]\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.ecs.unwrap().kind, AgentKind::Ecs);
    assert_eq!(
        c.pod_identity.unwrap().roles[0].to_string(),
        "arn:aws:iam::111122223333:role/a/b"
    );
}

#[test]
fn containers_pod_identity_refuses_a_port_any_user_could_take_and_bad_roles() {
    for (text, key) in [
        (
            "[containers.pod_identity]\nlisten = [\"169.254.170.23:8023\"]\n",
            "containers.pod_identity.listen",
        ),
        (
            "[containers.pod_identity]\nlisten = [\"127.0.0.1:0\"]\n",
            "containers.pod_identity.listen",
        ),
        (
            "[containers.ecs]\nlisten = [\"127.0.0.1:923\"]\n[containers.pod_identity]\nlisten = [\"127.0.0.1:923\"]\n",
            "containers.pod_identity.listen",
        ),
        (
            "[containers.pod_identity]\nroles = [\"arn:aws:iam::111122223333:user/u\"]\n",
            "containers.pod_identity.roles",
        ),
        (
            "[containers.ecs]\nroles = [\"arn:aws:iam::111122223333:role/r\"]\n",
            "containers.ecs.roles",
        ),
        (
            "[containers.endpoint]\nlisten = \"127.0.0.1:923\"\n[containers.pod_identity]\nlisten = [\"127.0.0.1:923\"]\n",
            "containers.endpoint.listen",
        ),
    ] {
        let err = from_toml(text, &Overrides::default()).unwrap_err();
        assert_eq!(err.key, key, "{text}");
    }
}
