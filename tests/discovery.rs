//! Environment discovery against real peers: moto's EC2 (VPCs, endpoints, Elastic IPs, NAT
//! gateways, more than one page), a local echo service, a local boot provider and the IMDS
//! emulator; then change and failure behaviour inside a running credlock.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use credlock::config::{Ec2Scope, Upstream};
use credlock::discovery;
use credlock::environment::Environment;
use credlock::imds::Imds;
use credlock::upstream::UpstreamClient;

fn imds(url: &str) -> Imds {
    let authority = url.trim_start_matches("http://").parse().unwrap();
    Imds::new(UpstreamClient::new(
        &Upstream { authority },
        Duration::from_secs(2),
    ))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `n` endpoints (services svc0, svc1, ...) in `vpc`: their IDs.
async fn endpoints(c: &aws_sdk_ec2::Client, vpc: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(create_endpoint(c, vpc, &format!("svc{i}")).await);
    }
    ids
}

/// `n` NAT gateways in `subnet`: their addresses as /32s.
async fn nats(c: &aws_sdk_ec2::Client, subnet: &str, n: usize) -> Vec<String> {
    let mut ips = Vec::new();
    for _ in 0..n {
        ips.push(format!("{}/32", create_nat_gateway(c, subnet).await));
    }
    ips
}

fn ips(env: &Environment) -> BTreeSet<String> {
    env.ipv4.iter().map(ToString::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ec2_scopes_give_exactly_their_environment() {
    let moto = Moto::start();
    let c = ec2_client(&moto).await;
    let (vpc_a, subnet_a) = create_vpc(&c, "10.1.0.0/16", Some("yes")).await;
    let (vpc_b, subnet_b) = create_vpc(&c, "10.2.0.0/16", None).await;
    let eps_a = endpoints(&c, &vpc_a, 7).await;
    let eps_b = endpoints(&c, &vpc_b, 2).await;
    let nat_a = nats(&c, &subnet_a, 6).await;
    let nat_b = nats(&c, &subnet_b, 1).await;
    // An Elastic IP on this instance (a moto instance in VPC A), and a spare one.
    let (instance, instance_ip) = instance_with_eip(&c, &subnet_a).await;
    let (_, spare_ip) = allocate_eip(&c).await;

    // The IMDS emulator describes that instance in VPC A.
    let dir = std::env::temp_dir().join(format!("credlock-ec2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("instance.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "instance_id": instance,
            "interfaces": [{"mac": "06:00:00:00:00:01", "public_ipv4s": [instance_ip], "vpc_id": vpc_a}]
        })
        .to_string(),
    )
    .unwrap();
    let emu = Emulator::start(&["--instance", file.to_str().unwrap()]);
    let imds = imds(&emu.url());
    let all_vpcs: BTreeSet<String> = c
        .describe_vpcs()
        .send()
        .await
        .unwrap()
        .vpcs()
        .iter()
        .map(|v| v.vpc_id().unwrap().to_string())
        .collect();
    assert!(
        all_vpcs.len() >= 3,
        "moto's default VPC plus ours: {all_vpcs:?}"
    );

    // Page size 5: every call crosses pages.
    let vpc = discovery::ec2::discover_paged(&c, &Ec2Scope::Vpc, &imds, 5)
        .await
        .unwrap();
    assert_eq!(vpc.vpcs, set(&[&vpc_a]));
    assert_eq!(vpc.vpc_endpoints, eps_a.iter().cloned().collect());
    let mut expected: BTreeSet<String> = nat_a.iter().cloned().collect();
    expected.insert(format!("{instance_ip}/32"));
    assert_eq!(
        ips(&vpc),
        expected,
        "NAT gateways of this VPC and this instance's EIP"
    );

    let tagged = Ec2Scope::Tagged {
        key: "credlock-perimeter".into(),
        value: Some("yes".into()),
    };
    let t = discovery::ec2::discover_paged(&c, &tagged, &imds, 5)
        .await
        .unwrap();
    assert_eq!(t.vpcs, set(&[&vpc_a]));
    assert_eq!(t.vpc_endpoints, eps_a.iter().cloned().collect());
    assert_eq!(ips(&t), nat_a.iter().cloned().collect::<BTreeSet<_>>());

    let r = discovery::ec2::discover_paged(&c, &Ec2Scope::Region, &imds, 5)
        .await
        .unwrap();
    assert_eq!(r.vpcs, all_vpcs);
    assert_eq!(
        r.vpc_endpoints,
        eps_a.iter().chain(&eps_b).cloned().collect()
    );
    let mut every_eip: BTreeSet<String> = nat_a.iter().chain(&nat_b).cloned().collect();
    every_eip.insert(format!("{instance_ip}/32"));
    every_eip.insert(format!("{spare_ip}/32"));
    assert_eq!(
        ips(&r),
        every_eip,
        "every Elastic IP of the account in the region"
    );

    let none = Ec2Scope::Tagged {
        key: "no-such-tag".into(),
        value: None,
    };
    let err = discovery::ec2::discover_paged(&c, &none, &imds, 5)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no VPC matches"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_imds_source_reads_every_interface() {
    let emu = Emulator::start(&[]);
    let env = discovery::imds::discover(&imds(&emu.url())).await.unwrap();
    assert_eq!(ips(&env), set(&["203.0.113.10/32", "203.0.113.20/32"]));
    assert_eq!(
        env.ipv6.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["2001:db8:1::10/128"]
    );
    assert_eq!(env.vpcs, set(&["vpc-0abc1234def567890"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_echo_source_takes_addresses_and_rejects_everything_else() {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let v4 = FakeHttp::start("198.51.100.7\n").await;
    let v6 = FakeHttp::start("2001:db8:ffff::1").await;
    let env = discovery::echo::discover(&http, &[v4.url.clone(), v6.url.clone()])
        .await
        .unwrap();
    assert_eq!(ips(&env), set(&["198.51.100.7/32"]));
    assert_eq!(env.ipv6.len(), 1);

    // One bad URL among good ones: the good answers stand.
    v6.set(|a| a.body = "<html>hello</html>".into());
    let env = discovery::echo::discover(&http, &[v4.url.clone(), v6.url.clone()])
        .await
        .unwrap();
    assert_eq!(ips(&env), set(&["198.51.100.7/32"]));
    // All bad: an error naming each.
    for broken in [
        (200, "not an ip", Duration::ZERO, false),
        (503, "198.51.100.7", Duration::ZERO, false),
        (200, "198.51.100.7", Duration::from_secs(2), false),
        (200, "198.51.100.7", Duration::ZERO, true),
    ] {
        v4.set(|a| {
            (a.status, a.body, a.delay, a.down) =
                (broken.0, broken.1.to_string(), broken.2, broken.3)
        });
        let err = discovery::echo::discover(&http, std::slice::from_ref(&v4.url))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&v4.url), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_boot_provider_is_told_who_asks_and_its_document_is_validated() {
    let emu = Emulator::start(&[]);
    let imds = imds(&emu.url());
    let identity = imds.identity(None).await.unwrap();
    let http = reqwest::Client::new();
    let provider = FakeHttp::start(
        r#"{"ipv4":["192.0.2.0/24"],"ipv6":["2001:db8:aaaa::/48"],"vpcs":["vpc-0123456789abcdef0"],"vpc_endpoints":["vpce-0123456789abcdef0"]}"#,
    )
    .await;
    let env = discovery::boot_provider::discover(
        &http,
        &provider.url,
        &identity,
        discovery::boot_provider::Asker::Instance(&imds),
        false,
    )
    .await
    .unwrap();
    assert_eq!(ips(&env), set(&["192.0.2.0/24"]));
    assert_eq!(env.vpc_endpoints, set(&["vpce-0123456789abcdef0"]));
    let sent: serde_json::Value =
        serde_json::from_str(&provider.bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(sent["account_id"], "123456789012");
    assert_eq!(sent["region"], "us-east-1");
    assert_eq!(sent["instance_id"], "i-0123456789abcdef0");
    assert_eq!(
        sent["role_arn"],
        "arn:aws:iam::123456789012:role/credlock-test-role"
    );
    assert!(
        sent["identity_document"]
            .as_str()
            .unwrap()
            .contains("i-0123456789abcdef0")
    );
    // Off an instance (credlock credentials on a CI runner): what is known, and no claim of an
    // instance or its document.
    discovery::boot_provider::discover(
        &http,
        &provider.url,
        &identity,
        discovery::boot_provider::Asker::Host("ci-runner-7"),
        false,
    )
    .await
    .unwrap();
    let sent: serde_json::Value =
        serde_json::from_str(&provider.bodies.lock().unwrap()[1]).unwrap();
    let keys: Vec<&str> = sent
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["account_id", "region", "role_arn", "host"]);
    assert_eq!(sent["host"], "ci-runner-7");
    assert_eq!(sent["account_id"], "123456789012");

    for garbage in [
        r#"{"ipv4":["not-an-ip"]}"#,
        r#"{"vpcs":["vpc-UPPER"]}"#,
        r#"{"ipv4":[],"surprise":1}"#,
        "[1,2,3]",
        "",
    ] {
        provider.set(|a| a.body = garbage.into());
        let err = discovery::boot_provider::discover(
            &http,
            &provider.url,
            &identity,
            discovery::boot_provider::Asker::Instance(&imds),
            false,
        )
        .await;
        assert!(err.is_err(), "{garbage} accepted");
    }
}

// ---- inside a running credlock -------------------------------------------------------------

fn locked_ipv4(status: &serde_json::Value) -> Vec<String> {
    status["lock"]["locked_environment"]["ipv4"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

async fn metric(running: &credlock::app::Running, line_prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", running.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_environment_is_locked_within_the_schedule() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let echo = FakeHttp::start("198.51.100.7").await;
    let extra = format!(
        "[discovery]\ninterval_seconds = 5\n[discovery.echo]\nenabled = true\nurls = [\"{}\"]\ntimeout_ms = 500\n",
        echo.url
    );
    // Echo on (the fixture's default turns it off), every 5 s.
    let text = loopback_toml(
        &emu.url(),
        &moto.url,
        &format!("relock_spread_seconds = 3\n{extra}"),
    );
    let running = start_toml(&text).await;
    wait_ready(&running).await;
    assert!(locked_ipv4(&admin_status(&running).await).contains(&"198.51.100.7/32".to_string()));

    // The egress address changes (a new NAT gateway EIP): re-locked within one interval
    // (5 s, +10 % jitter) plus the AssumeRole.
    echo.set(|a| a.body = "198.51.100.99".into());
    let changed = Instant::now();
    loop {
        let s = admin_status(&running).await;
        if locked_ipv4(&s).contains(&"198.51.100.99/32".to_string()) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(8),
            "not re-locked: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = changed.elapsed();
    assert!(!locked_ipv4(&admin_status(&running).await).contains(&"198.51.100.7/32".to_string()));

    // A new Elastic IP on an interface (IMDS source): it only adds, so the re-lock waits a
    // random point of lock.relock_spread (3 s) after discovery sees it (within 5.5 s).
    let mut state = emu.state().await;
    state["interfaces"][0]["public_ipv4s"] = serde_json::json!(["203.0.113.10", "203.0.113.77"]);
    emu.set(serde_json::json!({"interfaces": state["interfaces"]}))
        .await;
    let changed = Instant::now();
    while !locked_ipv4(&admin_status(&running).await)
        .iter()
        .any(|ip| ip == "203.0.113.77/32")
    {
        assert!(
            changed.elapsed() < Duration::from_secs(11),
            "IMDS change not re-locked within one interval and the spread window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "echo change re-locked after {took:?}, IMDS change after {:?}",
        changed.elapsed()
    );
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_source_keeps_its_last_value_and_credlock_keeps_serving() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let echo = FakeHttp::start("198.51.100.7").await;
    let text = loopback_toml(
        &emu.url(),
        &moto.url,
        &format!(
            "[discovery]\ninterval_seconds = 5\n[discovery.echo]\nurls = [\"{}\"]\ntimeout_ms = 300\n",
            echo.url
        ),
    );
    let running = start_toml(&text).await;
    wait_ready(&running).await;
    let failures = r#"credlock_discovery_runs_total{result="failure",source="echo"}"#;
    for (what, broken) in [
        ("down", (200, "198.51.100.7", Duration::ZERO, true)),
        ("garbage", (200, "<html>oops</html>", Duration::ZERO, false)),
        ("throttled", (429, "Rate exceeded", Duration::ZERO, false)),
        ("slow", (200, "198.51.100.7", Duration::from_secs(2), false)),
    ] {
        let before = metric(&running, failures).await;
        echo.set(|a| {
            (a.status, a.body, a.delay, a.down) =
                (broken.0, broken.1.to_string(), broken.2, broken.3)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&running, failures).await <= before {
            assert!(Instant::now() < deadline, "{what}: no failure counted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let s = admin_status(&running).await;
        let echo_status = s["discovery"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["source"] == "echo")
            .unwrap()
            .clone();
        assert!(
            echo_status["last_error"].is_string(),
            "{what}: {echo_status}"
        );
        assert_eq!(
            echo_status["environment"]["ipv4"][0], "198.51.100.7/32",
            "{what}: last known value kept"
        );
        assert!(
            locked_ipv4(&s).contains(&"198.51.100.7/32".to_string()),
            "{what}: lock kept"
        );
        assert_eq!(
            credentials_status(&running).await,
            200,
            "{what}: still serving"
        );
    }
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_source_ever_answered_means_no_lock() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let text = loopback_toml(
        &emu.url(),
        &moto.url,
        &format!(
            "[discovery.imds]\nenabled = false\n[discovery.echo]\nurls = [\"http://127.0.0.1:{}/\"]\ntimeout_ms = 200\n",
            free_port()
        ),
    );
    let running = start_toml(&text).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*running.ready.borrow());
    assert_eq!(
        metric(
            &running,
            r#"credlock_credential_refreshes_total{result="success"}"#
        )
        .await,
        0.0
    );
    assert_eq!(credentials_status(&running).await, 503);
    let s = admin_status(&running).await;
    assert!(s["lock"]["locked_environment"].is_null(), "{s}");
    let _ = running.shutdown.send(true);
}
