//! The passthrough path against the IMDS emulator: failures upstream, local refusals that
//! never reach the upstream, HTTP/1.0, and the graceful drain.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

/// No test may reach a real AWS endpoint: STS is a closed local port here.
fn dead_sts() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// One raw HTTP exchange (the request line is sent exactly as written).
fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_targets_are_refused_locally_and_never_reach_the_upstream() {
    let emu = Emulator::start(&[]);
    let running = start(config(&emu.url(), Some(&dead_sts()), "")).await;
    let addr = running.imds_addrs[0];
    let cases = [
        (
            "GET //latest/meta-data/iam/security-credentials/credlock-test-role HTTP/1.1",
            "400",
        ),
        (
            "GET /latest/meta-data/%69am/security-credentials/credlock-test-role HTTP/1.1",
            "400",
        ),
        (
            "GET /latest/meta-data/iam/./security-credentials/credlock-test-role HTTP/1.1",
            "400",
        ),
        (
            "GET /latest/meta-data/x/../iam/security-credentials/credlock-test-role HTTP/1.1",
            "400",
        ),
        (
            "GET /latest/meta-data/iam/security-credentials;x/credlock-test-role HTTP/1.1",
            "400",
        ),
        (
            "GET /latest/meta-data/iam/security-credentials/credlock-test-role/extra HTTP/1.1",
            "404",
        ),
        (
            "POST /latest/meta-data/iam/security-credentials/credlock-test-role HTTP/1.1",
            "405",
        ),
        (
            "PUT /latest/meta-data/iam/security-credentials/ HTTP/1.1",
            "405",
        ),
    ];
    let _ = reqwest::Client::new()
        .post(format!("http://{}/requests/clear", emu.control))
        .send()
        .await
        .unwrap();
    for (line, status) in cases {
        let response = tokio::task::spawn_blocking(move || {
            raw(
                addr,
                &format!("{line}\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"),
            )
        })
        .await
        .unwrap();
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{line}: {}",
            response.lines().next().unwrap_or("")
        );
        assert!(!response.contains("AccessKeyId"));
    }
    // credlock's own background calls (identity, discovery) are there too; none of the
    // refused targets may be.
    let seen = emu.requests().await;
    for (line, _) in cases {
        let mut words = line.split(' ');
        let (method, target) = (words.next().unwrap(), words.next().unwrap());
        assert!(
            !seen
                .iter()
                .any(|r| r["method"] == method && r["path"] == target),
            "{target} reached the upstream"
        );
    }
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_and_http10_pass_through() {
    let emu = Emulator::start(&[]);
    let running = start(config(&emu.url(), Some(&dead_sts()), "")).await;
    let addr = running.imds_addrs[0];
    let response = tokio::task::spawn_blocking(move || {
        raw(addr, "GET http://169.254.169.254/latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("\r\n\r\ni-0123456789abcdef0"),
        "{response}"
    );
    let response = tokio::task::spawn_blocking(move || {
        raw(addr, "GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("i-0123456789abcdef0"));
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_or_hanging_upstream_gets_502_or_504_never_a_hung_client() {
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let running = start(config(&dead, Some(&dead_sts()), "")).await;
    let r = reqwest::get(format!("{}/latest/meta-data/instance-id", base(&running)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let _ = running.shutdown.send(true);

    let emu = Emulator::start(&[]);
    emu.set(serde_json::json!({"delay_ms": 3000})).await;
    let running = start(config(&emu.url(), Some(&dead_sts()), "")).await;
    let started = Instant::now();
    let r = reqwest::get(format!("{}/latest/meta-data/instance-id", base(&running)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    // The upstream recovers: so does the proxy.
    emu.set(serde_json::json!({"delay_ms": 0})).await;
    let r = reqwest::get(format!("{}/latest/meta-data/instance-id", base(&running)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() {
    let emu = Emulator::start(&[]);
    emu.set(serde_json::json!({"delay_ms": 400})).await;
    let running = start(config(&emu.url(), Some(&dead_sts()), "")).await;
    let url = format!("{}/latest/meta-data/instance-id", base(&running));
    let in_flight = tokio::spawn(reqwest::get(url.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = running.shutdown.send(true);
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap(), "i-0123456789abcdef0");
    tokio::time::timeout(Duration::from_secs(6), running.task)
        .await
        .expect("drain is bounded")
        .unwrap();
    assert!(std::net::TcpStream::connect(running.imds_addrs[0]).is_err());
}
