//! The lock loop on tokio's paused clock: re-locking after the environment changes (the
//! harness is in `refresh_tests.rs`).

use super::*;

// ---- re-lock after an environment change -----------------------------------------------------

/// The boot environment plus one address: a change that only adds.
fn added(ip: &str) -> Arc<Environment> {
    env(&[BOOT_IP, ip])
}

#[tokio::test(start_paused = true)]
async fn an_additive_change_relocks_at_a_drawn_point_within_the_spread_window() {
    const SPREAD: f64 = 300.0;
    let fleet = fleet(200, |seed| Setup {
        seed,
        ..Setup::default()
    });
    sleep_secs(100).await;
    for h in &fleet {
        assert_eq!(h.call_times().len(), 1);
        h.env.send_replace(Some(added("198.51.100.77")));
    }
    // Draw 0 was the boot refresh time, draw 1 the re-lock point.
    sleep_secs(1).await;
    let seed1 = &fleet[0];
    let r = draws(1, 2);
    assert!(r[1] * SPREAD > 1.0, "seed 1 draws a re-lock later than 1 s");
    assert_eq!(seed1.call_times().len(), 1, "not at once");
    let pending = seed1.status.load().pending_relock.clone().unwrap();
    assert_eq!(
        pending.at,
        imds_timestamp(t(100) + secs(r[1] * SPREAD)),
        "/status shows the drawn time"
    );
    assert!(pending.reason.contains("relock_spread_seconds"));

    sleep_secs(SPREAD as u64).await;
    let mut delays = Vec::new();
    for (i, h) in fleet.iter().enumerate() {
        let r = draws(i as u64 + 1, 2);
        let times = h.call_times();
        assert_eq!(times.len(), 2, "seed {}: {times:?}", i + 1);
        let delay = times[1] - Duration::from_secs(100);
        assert!(
            near(delay, secs(r[1] * SPREAD)),
            "seed {}: {delay:?}",
            i + 1
        );
        assert!(h.policies()[1].contains("198.51.100.77/32"));
        assert!(h.status.load().pending_relock.is_none());
        delays.push(delay.as_secs_f64());
    }
    // Uniform over the window: every quarter gets about a quarter (50 ± 6 for 200).
    let mut quarters = [0u32; 4];
    for d in &delays {
        assert!(*d < SPREAD, "{d}");
        quarters[((d / SPREAD * 4.0) as usize).min(3)] += 1;
    }
    assert!(
        quarters.iter().all(|q| (30..=70).contains(q)),
        "{quarters:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_additive_change_keeps_the_drawn_time() {
    const SPREAD: f64 = 300.0;
    // A seed whose re-lock falls after the second change (at 150 s) and inside the window.
    let seed = (1..100)
        .find(|s| (0.2..0.95).contains(&draws(*s, 2)[1]))
        .unwrap();
    let h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    let due = Duration::from_secs(100) + secs(draws(seed, 2)[1] * SPREAD);
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(50).await;
    h.env
        .send_replace(Some(env(&[BOOT_IP, "198.51.100.77", "198.51.100.99"])));
    sleep_until(&h, due - Duration::from_millis(5)).await;
    assert_eq!(h.call_times().len(), 1, "no call before the drawn time");
    sleep_until(&h, due + Duration::from_secs(1)).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], due), "{:?} vs {due:?}", times[1]);
    let policy = &h.policies()[1];
    assert!(policy.contains("198.51.100.77/32") && policy.contains("198.51.100.99/32"));
}

#[tokio::test(start_paused = true)]
async fn a_change_that_removes_an_entry_relocks_at_once_even_with_a_relock_pending() {
    let h = Harness::start();
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    assert_eq!(h.call_times().len(), 1);
    assert!(h.status.load().pending_relock.is_some());
    // The boot address is gone: at once.
    h.env.send_replace(Some(env(&["198.51.100.77"])));
    sleep_secs(1).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2);
    assert!(near(times[1], Duration::from_secs(101)), "{times:?}");
    assert!(!h.policies()[1].contains("203.0.113.10/32"));
    assert!(h.status.load().pending_relock.is_none());
    // A removal with nothing pending, likewise.
    sleep_secs(100).await;
    h.env.send_replace(Some(env(&["198.51.100.78"])));
    sleep_secs(1).await;
    assert!(near(h.call_times()[2], Duration::from_secs(202)));
}

#[tokio::test(start_paused = true)]
async fn with_no_spread_an_additive_change_relocks_at_once() {
    let h = Harness::start_with(Setup {
        spread: Some(Duration::ZERO),
        ..Setup::default()
    });
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(near(calls[1].0, Duration::from_secs(100)));
    assert!(calls[1].1.policy.contains("198.51.100.77/32"));
}

#[tokio::test(start_paused = true)]
async fn an_additive_change_with_no_servable_set_relocks_at_once() {
    let h = Harness::start();
    sleep_secs(10).await;
    h.store.clear();
    sleep_secs(90).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], Duration::from_secs(100)));
}

#[tokio::test(start_paused = true)]
async fn the_normal_refresh_comes_first_when_it_is_sooner_than_the_drawn_point() {
    // A one-hour window: a seed whose drawn point falls after its half-life refresh.
    let spread = 3600.0;
    let seed = (1..100)
        .find(|s| 100.0 + draws(*s, 2)[1] * spread > 2000.0)
        .unwrap();
    let h = Harness::start_with(Setup {
        seed,
        spread: Some(secs(spread)),
        ..Setup::default()
    });
    let refresh = refresh_at(t(0), t(3600), draws(seed, 1)[0] * 2.0 - 1.0)
        .duration_since(t(0))
        .unwrap();
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(2000).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], refresh), "{:?} vs {refresh:?}", times[1]);
    assert!(h.policies()[1].contains("198.51.100.77/32"));
}

#[tokio::test(start_paused = true)]
async fn a_role_change_relocks_within_the_recheck_interval() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    sleep_secs(10).await;
    *h.role.lock().unwrap() = "new-role".into();
    sleep_secs(301).await;
    let calls = h.calls.lock().unwrap().clone();
    let last = calls.last().unwrap();
    assert_eq!(last.1.role_arn, "arn:aws:iam::123456789012:role/new-role");
    assert!(last.0.as_secs() <= 10 + 300, "re-locked at {:?}", last.0);
    assert!(last.1.policy.contains("role/new-role"));
}
