//! The admin listener as an operator meets it: readiness follows the locked set (unready near
//! expiry while STS is down, ready again after recovery), and nothing it shows is a secret.

// The wall clock seeds the manual clock and the firewall state file the tests write.
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use credlock::clock::ManualClock;

async fn status(admin: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{admin}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_unready_near_expiry_and_ready_after_recovery() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let cfg = config(
        &emu.url(),
        Some(&moto.url),
        "[discovery]\ninterval_seconds = 5\n",
    );
    let running = credlock::app::start_with_clock(cfg, clock.clone())
        .await
        .unwrap();
    wait_ready(&running).await;
    let admin = format!("http://{}", running.admin_addr);
    assert_eq!(status(&admin, "/readyz").await.0, 200);
    assert_eq!(status(&admin, "/healthz").await.0, 200);

    let first = served_key(&running).await;
    assert!(first.starts_with("ASIA"), "{first}");
    // STS goes away and time passes to within the serving margin of the set's expiry.
    let moto_port = moto.port;
    drop(moto);
    // Moved relative to the served set's own expiration (not to when the test started: the
    // first lock may come seconds later on a loaded machine, leaving more than the margin).
    let (_, body) = status(&admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expiration = humantime::parse_rfc3339(v["lock"]["expiration"].as_str().unwrap()).unwrap();
    clock.set(expiration - Duration::from_secs(300 - 1));
    let (code, body) = status(&admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("margin"), "{body}");
    let (code, _) = status(
        &format!("http://{}", running.imds_addrs[0]),
        "/latest/meta-data/iam/security-credentials/credlock-test-role",
    )
    .await;
    assert_eq!(code, 503, "credentials fail closed");
    // The refresher keeps trying and says so.
    eventually("a failed refresh in /status", async || {
        let (_, body) = status(&admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["lock"]["consecutive_failures"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let (_, metrics) = status(&admin, "/metrics").await;
    assert!(metrics.contains("credlock_ready 0"), "{metrics}");

    // STS comes back where credlock expects it: the refresher locks a new set by itself.
    let first_key = first;
    let _moto = Moto::start_on(moto_port);
    eventually("a second successful lock", async || {
        let (_, m) = status(&admin, "/metrics").await;
        m.lines().any(|l| {
            l.starts_with("credlock_credential_refreshes_total{result=\"success\"}")
                && !l.ends_with(" 1")
        })
    })
    .await;
    // The wall clock had been moved ahead of STS's; put it back where STS's is.
    clock.set(SystemTime::now());
    let (code, body) = status(&admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_ne!(
        served_key(&running).await,
        first_key,
        "a new locked set is served"
    );
    let _ = running.shutdown.send(true);
}

/// The AccessKeyId served through credlock (or "" when refused), with the clock as it is.
async fn served_key(running: &credlock::app::Running) -> String {
    let url = format!(
        "http://{}/latest/meta-data/iam/security-credentials/credlock-test-role",
        running.imds_addrs[0]
    );
    let r = reqwest::get(url).await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["AccessKeyId"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_metrics_never_show_a_credential_or_token() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let running = start(config(&emu.url(), Some(&moto.url), "")).await;
    wait_ready(&running).await;
    let base = base(&running);
    let admin = format!("http://{}", running.admin_addr);
    let client = reqwest::Client::new();
    let token = token(&base).await;
    let served: serde_json::Value = client
        .get(format!(
            "{base}/latest/meta-data/iam/security-credentials/credlock-test-role"
        ))
        .header("x-aws-ec2-metadata-token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut secrets = emu.raw_secrets().await;
    secrets.push(token);
    for field in ["AccessKeyId", "SecretAccessKey", "Token"] {
        secrets.push(served[field].as_str().unwrap().to_string());
    }
    for path in ["/status", "/metrics", "/readyz", "/healthz"] {
        let (code, body) = status(&admin, path).await;
        assert_eq!(code, 200, "{path}");
        for secret in &secrets {
            assert!(!body.contains(secret.as_str()), "{path} shows a secret");
        }
    }
    let (_, body) = status(&admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["upstream_token_mode"], "unknown");
    assert_eq!(
        v["lock"]["role_arn"],
        "arn:aws:iam::123456789012:role/credlock-test-role"
    );
    assert!(v["lock"]["policy_characters"].as_u64().unwrap() > 500);
    assert_eq!(v["discovery"][0]["source"], "imds");
    let _ = running.shutdown.send(true);
}

fn loopback_config(
    emu: &Emulator,
    moto: &Moto,
    listen: &str,
    admin: &str,
    extra: &str,
) -> credlock::config::Config {
    let text = format!(
        "[server]\nlisten = [\"{listen}\"]\nadmin_listen = \"{admin}\"\nupstream = \"{}\"\n\
         [discovery.echo]\nenabled = false\n[lock]\nsts_endpoint = \"{}\"\n{extra}",
        emu.url(),
        moto.url
    );
    credlock::config::from_toml(&text, &credlock::config::Overrides::default()).unwrap()
}

/// Socket activation (credlock.socket): the listeners systemd passes are the ones served, and a
/// passed listener the configuration does not name is a startup error, not a socket left
/// queueing connections nobody answers.
#[tokio::test(flavor = "multi_thread")]
async fn inherited_listeners_are_served_and_an_unknown_one_is_refused() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let cfg = loopback_config(&emu, &moto, &addr.to_string(), "127.0.0.1:0", "");
    let running = credlock::app::start_inherited(cfg, vec![held])
        .await
        .unwrap();
    assert_eq!(running.imds_addrs, vec![addr]);
    let r = reqwest::get(format!("http://{addr}/latest/meta-data/instance-id"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = running.shutdown.send(true);

    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = loopback_config(&emu, &moto, "127.0.0.1:0", "127.0.0.1:0", "");
    match credlock::app::start_inherited(cfg, vec![stray]).await {
        Err(e) => assert!(e.to_string().contains("neither server.listen"), "{e}"),
        Ok(_) => panic!("an unknown inherited listener was accepted"),
    }
}

/// Another process holding the admin port (squatted before credlock started) costs the admin
/// listener, never the IMDS proxy every application depends on.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_admin_port_does_not_stop_the_imds_proxy() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let cfg = loopback_config(&emu, &moto, "127.0.0.1:0", &taken, "");
    let running = credlock::app::start(cfg).await.unwrap();
    assert!(running.admin_error.is_some());
    let base = format!("http://{}", running.imds_addrs[0]);
    let r = reqwest::get(format!("{base}/latest/meta-data/instance-id"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = running.shutdown.send(true);
}

/// The firewall's state file drives /readyz, /status and the firewall gauges: rules missing is
/// not ready, whatever the credentials; strict is.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_firewall_state_file() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let dir = std::env::temp_dir().join(format!("credlock-fw-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state");
    let write = |v4: &str| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        std::fs::write(
            &file,
            format!("checked={now}\nbackend=nft\nipv4={v4}\nipv6=strict\n"),
        )
        .unwrap();
    };
    write("missing");
    let extra = format!("[firewall]\nstate_file = \"{}\"\n", file.display());
    let cfg = loopback_config(&emu, &moto, "127.0.0.1:0", "127.0.0.1:0", &extra);
    let running = credlock::app::start(cfg).await.unwrap();
    wait_ready(&running).await;
    let admin = format!("http://{}", running.admin_addr);
    let (code, body) = status(&admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("firewall is not enforced") && body.contains("ipv4 missing"),
        "{body}"
    );
    let (_, metrics) = status(&admin, "/metrics").await;
    assert!(
        metrics.contains("credlock_firewall_enforced{family=\"ipv4\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("credlock_firewall_state{family=\"ipv4\",state=\"missing\"} 1"));
    assert!(metrics.contains("credlock_firewall_required 1"));
    write("strict");
    eventually("ready once the rules are back", async || {
        status(&admin, "/readyz").await.0 == 200
    })
    .await;
    let (_, s) = status(&admin, "/status").await;
    let s: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["firewall"]["enforced"], true);
    assert_eq!(s["firewall"]["ipv4"], "strict");
    let (_, metrics) = status(&admin, "/metrics").await;
    assert!(
        metrics.contains("credlock_firewall_enforced{family=\"ipv4\"} 1"),
        "{metrics}"
    );
    let _ = running.shutdown.send(true);
    std::fs::remove_dir_all(&dir).unwrap();
}
