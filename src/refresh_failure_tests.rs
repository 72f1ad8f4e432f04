//! The lock loop on tokio's paused clock: refresh, STS failures and back-off, outages, and
//! what each AssumeRole carries (the harness is in `refresh_tests.rs`).

use super::*;

// ---- refresh and failure ---------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn locks_at_start_then_refreshes_at_half_life() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    assert_eq!(h.call_secs(), [0]);
    let first = &h.calls.lock().unwrap()[0].1.clone();
    assert_eq!(first.role_arn, "arn:aws:iam::123456789012:role/app-role");
    assert_eq!(first.session_name, "i-0123456789abcdef0");
    assert_eq!(first.duration, Duration::from_secs(3600));
    assert!(first.policy.contains("203.0.113.10/32"));

    sleep_secs(2 * 3600).await;
    let times = h.call_secs();
    assert!(times.len() >= 4, "{times:?}");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (1620..=1981).contains(&gap),
            "refresh gap {gap} s in {times:?}"
        );
    }
    assert!(h.servable_at_now());
}

#[tokio::test(start_paused = true)]
async fn backs_off_under_sts_failure_serves_the_last_good_set_then_fails_closed() {
    let seed = 5;
    let mut h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    h.ready.wait_for(|r| *r).await.unwrap();
    h.fail(Some(StsErrorCode::Throttling));

    // The refresh is due at half-life (the first draw); from then on every call fails and the
    // n-th failure waits backoff(n, draw n+1): full jitter, exactly as drawn.
    sleep_secs(1980 + 600).await;
    let r = draws(seed, 64);
    let times = h.call_times();
    let refresh = refresh_at(t(0), t(3600), r[0] * 2.0 - 1.0);
    assert!(near(times[1], refresh.duration_since(t(0)).unwrap()));
    let gaps: Vec<Duration> = times.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 10, "{times:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let n = i as u32 + 1;
        let want = backoff(n, r[i + 1]);
        assert!(near(*gap, want), "retry {n}: {gap:?}, drawn {want:?}");
        assert!(*gap <= MAX_BACKOFF + TIMER_SLACK);
    }
    assert_eq!(
        h.status.load().consecutive_failures as usize,
        gaps.len() + 1
    );
    // The last good set is still served while it has more than the margin left...
    assert!(h.servable_at_now());
    // ...and not once it is within the margin of expiry: fail closed.
    let until_margin = t(3600 - 300).duration_since(h.clock.now()).unwrap();
    tokio::time::sleep(until_margin).await;
    assert!(!h.servable_at_now());

    // STS recovers: a new set within one back-off period.
    h.fail(None);
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    assert!(h.servable_at_now());
    assert_eq!(h.status.load().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn throttled_at_boot_it_backs_off_with_growing_jittered_waits_and_ends_holding_a_set() {
    // One instance, exactly: the n-th wait is backoff(n, n-th draw).
    let seed = 11;
    let h = Harness::start_with(Setup {
        seed,
        failing: Some(StsErrorCode::Throttling),
        ..Setup::default()
    });
    sleep_secs(300).await;
    assert!(!*h.ready.borrow(), "nothing held while throttled");
    assert!(!h.servable_at_now());
    let r = draws(seed, 64);
    let times = h.call_times();
    assert_eq!(times[0], Duration::ZERO, "the first lock is immediate");
    assert!(times.len() >= 8, "{times:?}");
    for (i, w) in times.windows(2).enumerate() {
        let want = backoff(i as u32 + 1, r[i]);
        assert!(
            near(w[1] - w[0], want),
            "wait {i}: {:?} vs {want:?}",
            w[1] - w[0]
        );
    }
    // Throttling ends: the next retry, as drawn, locks.
    h.fail(None);
    let failed = times.len();
    let next = *times.last().unwrap() + backoff(failed as u32, r[failed - 1]);
    sleep_until(&h, next + Duration::from_millis(10)).await;
    assert!(*h.ready.borrow());
    assert!(h.servable_at_now());
    let times = h.call_times();
    assert_eq!(times.len(), failed + 1);
    assert!(near(times[failed], next));

    // A hundred instances throttled together: each wait lies between the floor and its
    // ceiling, spread over all of it (full jitter: equal jitter would never go below half the
    // ceiling), and the ceilings grow.
    let fleet = fleet(100, |seed| Setup {
        seed: seed + 100,
        failing: Some(StsErrorCode::Throttling),
        ..Setup::default()
    });
    sleep_secs(200).await;
    let mut means = Vec::new();
    for n in 1..=6u32 {
        let ceiling = backoff_ceiling(n);
        let waits: Vec<f64> = (fleet.iter())
            .map(|h| {
                let times = h.call_times();
                (times[n as usize] - times[n as usize - 1]).as_secs_f64()
            })
            .collect();
        let (lo, hi) = (MIN_BACKOFF.as_secs_f64(), ceiling.as_secs_f64());
        assert!(
            waits.iter().all(|w| (lo - 0.002..=hi + 0.002).contains(w)),
            "failure {n}: {waits:?}"
        );
        let min = waits.iter().copied().fold(f64::MAX, f64::min);
        let max = waits.iter().copied().fold(0.0, f64::max);
        assert!(min < lo + 0.2 * (hi - lo), "failure {n}: none low: {min}");
        assert!(max > lo + 0.8 * (hi - lo), "failure {n}: none high: {max}");
        let mean = waits.iter().sum::<f64>() / waits.len() as f64;
        let want = (lo + hi) / 2.0;
        assert!((mean - want).abs() < 0.2 * want, "failure {n}: mean {mean}");
        means.push(mean);
    }
    assert!(means.windows(2).all(|m| m[1] > m[0]), "{means:?}");
    for h in &fleet {
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    assert!(fleet.iter().all(Harness::servable_at_now));
}

#[tokio::test(start_paused = true)]
async fn a_change_during_the_backoff_waits_for_it() {
    let seed = 3;
    let mut h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    h.ready.wait_for(|r| *r).await.unwrap();
    h.fail(Some(StsErrorCode::Throttling));
    // A removal re-locks at once: the call at 100 s fails, and each retry fails too.
    sleep_secs(100).await;
    h.env.send_replace(Some(env(&["198.51.100.1"])));
    // Replay the schedule (draw 0 was the boot refresh time) and find a wait of over 4 s.
    let r = draws(seed, 64);
    let mut at = Duration::from_secs(100);
    let mut n = 1;
    let gap = loop {
        let gap = backoff(n, r[n as usize]);
        if gap > Duration::from_secs(4) {
            break gap;
        }
        at += gap;
        n += 1;
        assert!(n < 12, "seed {seed} never waits 4 s");
    };
    // `at` adds up the drawn waits; each real one is up to a millisecond longer (tokio's
    // timer), so take the n-th call's own time from the record.
    sleep_until(&h, at + Duration::from_secs(1)).await;
    let times = h.call_times();
    assert_eq!(times.len(), 1 + n as usize, "{times:?}");
    let last = times[n as usize];
    // Halfway through that wait, another removal: no call until the wait is over.
    sleep_until(&h, last + gap / 2).await;
    let before = h.call_times().len();
    h.env.send_replace(Some(env(&["198.51.100.2"])));
    sleep_until(&h, last + gap - Duration::from_millis(5)).await;
    assert_eq!(
        h.call_times().len(),
        before,
        "called STS during the back-off"
    );
    h.fail(None);
    sleep_until(&h, last + gap + Duration::from_millis(5)).await;
    let times = h.call_times();
    assert_eq!(times.len(), before + 1);
    assert!(
        near(times[before], last + gap),
        "{:?} vs {:?}",
        times[before],
        last + gap
    );
    assert!(h.policies()[before].contains("198.51.100.2/32"));
    assert!(h.servable_at_now(), "the boot set was served throughout");
}

// ---- an STS outage ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn through_an_outage_every_set_is_served_while_valid_and_all_relock_within_a_minute() {
    // Fifty instances locked together at boot; STS is down from 1500 s to 2100 s, which
    // covers every refresh point (half-life ± 10 %: 1620-1980 s).
    let fleet = fleet(50, |seed| Setup {
        seed,
        ..Setup::default()
    });
    sleep_secs(1500).await;
    for h in &fleet {
        h.fail(Some(StsErrorCode::Unreachable));
    }
    for _ in 0..(600 / 5) {
        sleep_secs(5).await;
        for h in &fleet {
            assert!(h.servable_at_now(), "stopped serving at {:?}", h.elapsed());
        }
    }
    for h in &fleet {
        assert!(
            h.call_times().len() > 2,
            "every refresh failed at least once"
        );
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    for h in &fleet {
        let fresh = h.store.peek().unwrap();
        assert!(
            fresh.issued >= t(2100) && fresh.issued <= t(2100 + 60) + TIMER_SLACK,
            "a fresh set within a minute of STS returning"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_at_boot_the_fleet_relocks_spread_over_the_window_not_in_one_wave() {
    // A hundred instances booted together into an STS outage of ten minutes: they failed in
    // step, and their recovery calls must not come in step.
    let fleet = fleet(100, |seed| Setup {
        seed,
        failing: Some(StsErrorCode::Unreachable),
        ..Setup::default()
    });
    sleep_secs(600).await;
    for h in &fleet {
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    let mut first_success: Vec<f64> = (fleet.iter())
        .map(|h| {
            assert!(
                h.servable_at_now(),
                "every instance holds a set a minute later"
            );
            h.call_times().last().unwrap().as_secs_f64()
        })
        .collect();
    first_success.sort_by(f64::total_cmp);
    let (first, last) = (first_success[0], first_success[99]);
    assert!(first >= 600.0 && last <= 660.0 + 0.002, "{first}..{last}");
    assert!(last - first > 40.0, "bunched: {first}..{last}");
    // No second holds more than a tenth of the fleet (uniform over 60 s: about 2 a second).
    let busiest = (first_success.iter())
        .map(|s| {
            (first_success.iter())
                .filter(|o| (*s..*s + 1.0).contains(*o))
                .count()
        })
        .max()
        .unwrap();
    assert!(busiest <= 10, "{busiest} re-locks within one second");
}

// ---- what is locked and how ------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_environment_means_no_lock() {
    let h = Harness::start();
    h.env.send_replace(Some(Arc::new(Environment::default())));
    // Whatever was issued at start, an empty environment is never locked.
    let before = h.call_times().len();
    h.store.clear();
    sleep_secs(3600).await;
    assert_eq!(h.call_times().len(), before);
    assert!(!h.servable_at_now());
}

#[tokio::test(start_paused = true)]
async fn sessions_are_marked_and_a_role_refusing_the_marker_locks_unmarked_loudly() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    let first = h.calls.lock().unwrap()[0].1.clone();
    assert_eq!(
        first.source_identity.as_deref(),
        Some("credlock-i-0123456789abcdef0"),
        "marked by default, with the credlock- prefix"
    );
    assert_eq!((h.status.load().marked, h.marked.get()), (Some(true), 1));

    // The role's trust policy loses sts:SetSourceIdentity: the next lock is refused marked,
    // retried at once unmarked, and served; status and gauge say the tripwire is blind.
    *h.no_source_identity.lock().unwrap() = true;
    let before = h.calls.lock().unwrap().len();
    h.env.send_replace(Some(env(&["203.0.113.99"])));
    sleep_secs(1).await;
    let calls = h.calls.lock().unwrap()[before..].to_vec();
    assert_eq!(calls.len(), 2, "one marked try, one unmarked: {calls:?}");
    assert!(calls[0].1.source_identity.is_some() && calls[1].1.source_identity.is_none());
    assert!(h.servable_at_now(), "never fails to lock over the marker");
    let status = h.status.load();
    assert_eq!((status.marked, h.marked.get()), (Some(false), 0));
    assert!(
        status
            .unmarked_reason
            .as_deref()
            .is_some_and(|why| why.contains("sts:SetSourceIdentity")),
        "{:?}",
        status.unmarked_reason
    );
    assert_eq!(status.consecutive_failures, 0);

    // Fixed: the next refresh is marked again.
    *h.no_source_identity.lock().unwrap() = false;
    sleep_secs(3600).await;
    let status = h.status.load();
    assert_eq!((status.marked, h.marked.get()), (Some(true), 1));
    assert_eq!(status.unmarked_reason, None);
}

#[tokio::test(start_paused = true)]
async fn a_class_roles_set_is_dropped_when_the_instance_role_that_assumed_it_changes() {
    let mut h = Harness::start();
    *h.role.lock().unwrap() = "worker-s3".into();
    *h.assumed_with.lock().unwrap() = Some("instance-a".into());
    sleep_secs(301).await;
    h.ready.wait_for(|r| *r).await.unwrap();
    let last = h.calls.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last.role_arn, "arn:aws:iam::123456789012:role/worker-s3");
    // The class role's session may not assume the instance role (nor itself).
    let policy: serde_json::Value = serde_json::from_str(&last.policy).unwrap();
    let deny = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "DenyAssumingOtherCredlockRoles")
        .expect("the other roles are denied");
    assert_eq!(
        deny["Resource"],
        serde_json::json!([
            "arn:aws:iam::123456789012:role/instance-a",
            "arn:aws:iam::123456789012:role/*/instance-a"
        ]),
        "a role without a path: its two forms, once each"
    );

    // The instance profile is swapped (say, to a quarantine role): the class's set, assumed
    // with the old role's credentials, is dropped at the next identity check, not served on.
    let held = h.store.peek().unwrap().access_key_id.clone();
    h.fail(Some(StsErrorCode::Throttling));
    *h.assumed_with.lock().unwrap() = Some("quarantine".into());
    sleep_secs(301).await;
    assert!(
        h.store.peek().is_none_or(|s| s.access_key_id != held),
        "the old set is gone"
    );
    assert!(
        !h.servable_at_now(),
        "nothing to serve until the new role locks"
    );
}
