use std::sync::Mutex as StdMutex;
use std::time::{Duration, SystemTime};

use super::*;
use crate::clock::ManualClock;

const T0: u64 = 1_800_000_000;
const ROLE_A: &str = "arn:aws:iam::111122223333:role/task-a";
const ROLE_B: &str = "arn:aws:iam::111122223333:role/task-b";
const INSTANCE_ROLE: &str = "arn:aws:iam::111122223333:role/instance";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

/// Issues one-hour sets named after the call count; fails while `failing` is set; refuses a
/// SourceIdentity while `no_source_identity` is set; records (source key id, request).
pub(super) struct FakeSts {
    pub(super) clock: Arc<ManualClock>,
    pub(super) failing: StdMutex<Option<StsErrorCode>>,
    pub(super) no_source_identity: StdMutex<bool>,
    pub(super) calls: StdMutex<Vec<(String, AssumeRequest)>>,
    /// GetCallerIdentity: the ARN per signing key (absent: the pod session
    /// `assumed-role/pod-role/eks-demo-<key>`), and the keys that asked.
    pub(super) callers: StdMutex<HashMap<String, String>>,
    pub(super) caller_calls: StdMutex<Vec<String>>,
}

impl TaskIssuer for FakeSts {
    fn assume_as<'a>(
        &'a self,
        source: Credentials,
        request: &'a AssumeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, StsError>> + Send + 'a>> {
        Box::pin(async move {
            let mut calls = self.calls.lock().unwrap();
            calls.push((source.access_key_id().to_string(), request.clone()));
            if let Some(code) = *self.failing.lock().unwrap() {
                return Err(StsError {
                    code,
                    message: "refused by the fake".into(),
                });
            }
            if request.source_identity.is_some() && *self.no_source_identity.lock().unwrap() {
                return Err(StsError {
                    code: StsErrorCode::AccessDenied,
                    message: "not authorized to perform: sts:SetSourceIdentity".into(),
                });
            }
            let now = self.clock.now();
            let n = calls.len();
            drop(calls);
            Ok(Issued {
                credentials: LockedCredentials::new(
                    format!("ASIALOCKED{n:010}"),
                    Secret::new(format!("locked-secret-{n}")),
                    Secret::new(format!("locked-token-{n}")),
                    now + Duration::from_secs(3600),
                    now,
                ),
                packed_policy_percent: Some(10),
            })
        })
    }

    fn caller_as(
        &self,
        source: Credentials,
    ) -> Pin<Box<dyn Future<Output = Result<String, StsError>> + Send + '_>> {
        Box::pin(async move {
            let key = source.access_key_id().to_string();
            self.caller_calls.lock().unwrap().push(key.clone());
            if let Some(code) = *self.failing.lock().unwrap() {
                return Err(StsError {
                    code,
                    message: "refused by the fake".into(),
                });
            }
            Ok(self
                .callers
                .lock()
                .unwrap()
                .get(&key)
                .cloned()
                .unwrap_or_else(|| {
                    format!("arn:aws:sts::111122223333:assumed-role/pod-role/eks-demo-{key}")
                }))
        })
    }
}

pub(super) struct Harness {
    pub(super) locks: TaskLocks,
    pub(super) sts: Arc<FakeSts>,
    pub(super) clock: Arc<ManualClock>,
    pub(super) env: watch::Sender<Option<Arc<Environment>>>,
}

pub(super) fn env(ip: &str) -> Arc<Environment> {
    let mut e = Environment::default();
    assert!(e.add_ip(ip));
    Arc::new(e)
}

fn harness(max_sets: usize, rate: f64) -> Harness {
    harness_for(AgentKind::Ecs, Vec::new(), max_sets, rate)
}

pub(super) fn harness_for(
    kind: AgentKind,
    roles: Vec<RoleArn>,
    max_sets: usize,
    rate: f64,
) -> Harness {
    let clock = Arc::new(ManualClock::new(at(0)));
    let sts = Arc::new(FakeSts {
        clock: clock.clone(),
        failing: StdMutex::new(None),
        no_source_identity: StdMutex::new(false),
        calls: StdMutex::new(Vec::new()),
        callers: StdMutex::new(HashMap::new()),
        caller_calls: StdMutex::new(Vec::new()),
    });
    let upstream = crate::upstream::Upstream {
        authority: "127.0.0.1:9".parse().unwrap(),
    };
    let locks = TaskLocks::new(
        UpstreamClient::new(&upstream, Duration::from_secs(1)),
        policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap(),
        TaskLockConfig {
            kind,
            roles,
            session_duration: Duration::from_secs(3600),
            serve_margin: Duration::from_secs(300),
            source_identity: true,
            max_sets,
            assume_rate: rate,
        },
        clock.clone(),
        Arc::new(Metrics::new()),
    );
    let (tx, rx) = watch::channel(Some(env("203.0.113.10")));
    locks.set_context(LockContext {
        issuer: sts.clone(),
        instance_id: "i-0123456789abcdef0".into(),
        deny: vec![RoleArn::parse(INSTANCE_ROLE).unwrap()],
        environment: rx,
    });
    Harness {
        locks,
        sts,
        clock,
        env: tx,
    }
}

pub(super) fn raw(key: &str, role: Option<&str>) -> RawDocument {
    RawDocument {
        role_arn: role.map(str::to_string),
        access_key_id: key.into(),
        secret_access_key: Secret::new(format!("{key}-RAWSECRET")),
        token: Secret::new(format!("{key}-RAWTOKEN")),
    }
}

pub(super) fn calls(h: &Harness) -> Vec<(String, AssumeRequest)> {
    h.sts.calls.lock().unwrap().clone()
}

#[tokio::test]
async fn one_assume_per_task_signed_with_the_tasks_own_credentials_then_cached() {
    let h = harness(16, 50.0);
    let (first, cached) = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("task-a"))
        .await
        .unwrap();
    assert!(!cached);
    let (again, cached) = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("task-a"))
        .await
        .unwrap();
    assert!(cached);
    assert_eq!(first.access_key_id, again.access_key_id);
    let calls = calls(&h);
    assert_eq!(calls.len(), 1);
    let (source, request) = &calls[0];
    assert_eq!(source, "ASIARAWEA", "signed with the task's own key");
    assert_eq!(request.role_arn, ROLE_A);
    assert_eq!(request.session_name, "credlock-ecs-task-a");
    assert_eq!(
        request.source_identity.as_deref(),
        Some("credlock-i-0123456789abcdef0")
    );
    // The session policy: the environment's address, re-assuming denied, the instance role
    // denied too.
    assert!(
        request.policy.contains("203.0.113.10"),
        "{}",
        request.policy
    );
    assert!(
        request.policy.contains("role/instance"),
        "{}",
        request.policy
    );
}

#[tokio::test]
async fn tasks_never_share_a_set_even_with_one_role() {
    let h = harness(16, 50.0);
    let (a, _) = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("a"))
        .await
        .unwrap();
    let (b, _) = h
        .locks
        .locked_for(&raw("ASIARAWEB", Some(ROLE_A)), Some("b"))
        .await
        .unwrap();
    assert_ne!(a.access_key_id, b.access_key_id);
    let (a2, cached) = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("a"))
        .await
        .unwrap();
    assert!(cached);
    assert_eq!(a.access_key_id, a2.access_key_id);
    let sources: Vec<String> = calls(&h).into_iter().map(|(s, _)| s).collect();
    assert_eq!(sources, ["ASIARAWEA", "ASIARAWEB"]);
}

#[tokio::test]
async fn relocks_near_expiry_on_a_role_change_and_on_an_environment_change() {
    let h = harness(16, 50.0);
    let task = raw("ASIARAWEA", Some(ROLE_A));
    h.locks.locked_for(&task, Some("a")).await.unwrap();
    // 54 minutes on: 6 minutes left, over the 5-minute margin: held.
    h.clock.set(at(54 * 60));
    assert!(h.locks.locked_for(&task, Some("a")).await.unwrap().1);
    // 56 minutes on: within the margin: a new set.
    h.clock.set(at(56 * 60));
    assert!(!h.locks.locked_for(&task, Some("a")).await.unwrap().1);
    // The agent names another role for the same raw key: a new set for that role.
    let moved = raw("ASIARAWEA", Some(ROLE_B));
    assert!(!h.locks.locked_for(&moved, Some("a")).await.unwrap().1);
    assert_eq!(calls(&h).last().unwrap().1.role_arn, ROLE_B);
    // The environment changes: a new set locked to the new one.
    h.env.send_replace(Some(env("198.51.100.7")));
    assert!(!h.locks.locked_for(&moved, Some("a")).await.unwrap().1);
    assert!(calls(&h).last().unwrap().1.policy.contains("198.51.100.7"));
    assert_eq!(calls(&h).len(), 4);
}

#[tokio::test]
async fn fails_closed_without_environment_role_or_sts() {
    let h = harness(16, 50.0);
    let missing_role = h.locks.locked_for(&raw("ASIARAWEA", None), None).await;
    assert!(matches!(missing_role, Err(Failure::NoRole)));
    let bad_role = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some("not-an-arn")), None)
        .await;
    assert!(matches!(bad_role, Err(Failure::NoRole)));

    *h.sts.failing.lock().unwrap() = Some(StsErrorCode::AccessDenied);
    let refused = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("a"))
        .await;
    assert!(matches!(refused, Err(Failure::Sts(ref e)) if e.code == StsErrorCode::AccessDenied));
    assert_eq!(refused.unwrap_err().status(), StatusCode::BAD_GATEWAY);
    *h.sts.failing.lock().unwrap() = None;

    h.env.send_replace(None);
    let not_ready = h
        .locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("a"))
        .await;
    assert!(matches!(not_ready, Err(Failure::NotReady)));
    assert_eq!(
        not_ready.unwrap_err().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn before_the_instance_is_known_every_task_fails_closed() {
    let clock = Arc::new(ManualClock::new(at(0)));
    let upstream = crate::upstream::Upstream {
        authority: "127.0.0.1:9".parse().unwrap(),
    };
    let locks = TaskLocks::new(
        UpstreamClient::new(&upstream, Duration::from_secs(1)),
        policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap(),
        TaskLockConfig {
            kind: AgentKind::Ecs,
            roles: Vec::new(),
            session_duration: Duration::from_secs(3600),
            serve_margin: Duration::from_secs(300),
            source_identity: true,
            max_sets: 4,
            assume_rate: 5.0,
        },
        clock,
        Arc::new(Metrics::new()),
    );
    let r = locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), None)
        .await;
    assert!(matches!(r, Err(Failure::NotReady)));
}

#[tokio::test]
async fn a_role_without_set_source_identity_is_locked_unmarked() {
    let h = harness(16, 50.0);
    *h.sts.no_source_identity.lock().unwrap() = true;
    h.locks
        .locked_for(&raw("ASIARAWEA", Some(ROLE_A)), Some("a"))
        .await
        .unwrap();
    let calls = calls(&h);
    assert_eq!(calls.len(), 2);
    assert!(calls[0].1.source_identity.is_some());
    assert!(calls[1].1.source_identity.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_sts_budget_caps_the_rate_and_fails_closed_past_its_wait() {
    // 1 call per second, burst 2: 2 at once, then one per second; a request that would wait
    // past BUDGET_WAIT gets 503.
    let h = harness(64, 1.0);
    let started = tokio::time::Instant::now();
    for i in 0..4 {
        h.locks
            .locked_for(&raw(&format!("ASIARAWE{i}"), Some(ROLE_A)), None)
            .await
            .unwrap();
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2100),
        "{took:?}"
    );
    // The bucket is empty: of five at once, two get a call within the 2-second wait (at 1 s
    // and 2 s); three are answered 503 rather than kept waiting.
    let tasks: Vec<RawDocument> = (10..15)
        .map(|i| raw(&format!("ASIARAWE{i}"), Some(ROLE_A)))
        .collect();
    let (r0, r1, r2, r3, r4) = tokio::join!(
        h.locks.locked_for(&tasks[0], None),
        h.locks.locked_for(&tasks[1], None),
        h.locks.locked_for(&tasks[2], None),
        h.locks.locked_for(&tasks[3], None),
        h.locks.locked_for(&tasks[4], None),
    );
    let results = [r0, r1, r2, r3, r4];
    let spent = results
        .iter()
        .filter(|r| matches!(r, Err(Failure::Budget)))
        .count();
    assert_eq!(
        spent,
        3,
        "{:?}",
        results.iter().map(|r| r.is_ok()).collect::<Vec<_>>()
    );
    assert_eq!(calls(&h).len(), 6);
    assert_eq!(Failure::Budget.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn sets_are_bounded_and_forgotten_with_their_credential_id() {
    let h = harness(2, 50.0);
    for (key, id) in [("ASIARAWEA", "a"), ("ASIARAWEB", "b"), ("ASIARAWEC", "c")] {
        h.locks
            .locked_for(&raw(key, Some(ROLE_A)), Some(id))
            .await
            .unwrap();
    }
    let held = |key: &str| {
        h.locks
            .sets
            .lock()
            .unwrap()
            .contains_key(&slot_key(&raw(key, Some(ROLE_A))))
    };
    assert_eq!(h.locks.sets.lock().unwrap().len(), 2);
    // The least recently used (a) went first.
    assert!(!held("ASIARAWEA") && held("ASIARAWEB") && held("ASIARAWEC"));
    // Its raw values are still among the known ones (answers are checked for them for as
    // long as they may be valid), as are b's.
    let known = |h: &Harness| -> Vec<String> {
        h.locks
            .known
            .load()
            .iter()
            .map(|s| s.expose().to_string())
            .collect()
    };
    assert!(known(&h).contains(&"ASIARAWEB-RAWSECRET".to_string()));
    h.locks.forget("b");
    assert!(!held("ASIARAWEB"));
    assert_eq!(h.locks.sets.lock().unwrap().len(), 1);
    assert!(known(&h).contains(&"ASIARAWEA-RAWSECRET".to_string()));
    assert!(known(&h).contains(&"ASIARAWEB-RAWSECRET".to_string()));
}

#[tokio::test]
async fn one_key_id_with_another_secret_is_another_set() {
    let h = harness(16, 50.0);
    let a = raw("ASIARAWEA", Some(ROLE_A));
    let mut b = raw("ASIARAWEA", Some(ROLE_A));
    b.secret_access_key = Secret::new("another-RAWSECRET");
    let (la, _) = h.locks.locked_for(&a, Some("a")).await.unwrap();
    let (lb, cached) = h.locks.locked_for(&b, Some("b")).await.unwrap();
    assert!(!cached);
    assert_ne!(la.access_key_id, lb.access_key_id);
    assert_eq!(calls(&h).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failing_task_backs_off_without_sts_or_budget() {
    let h = harness(16, 1.0);
    *h.sts.failing.lock().unwrap() = Some(StsErrorCode::AccessDenied);
    let bad = raw("ASIARAWEBAD", Some(ROLE_A));
    // The first failure (the marked call, then the unmarked retry: two calls, two tokens).
    assert!(matches!(
        h.locks.locked_for(&bad, None).await,
        Err(Failure::Sts(_))
    ));
    let after_first = calls(&h).len();
    assert_eq!(after_first, 2);
    // Hammered within the back-off: answered at once, no call, no token spent.
    for _ in 0..50 {
        let started = tokio::time::Instant::now();
        let r = h.locks.locked_for(&bad, None).await;
        assert!(matches!(r, Err(Failure::Backoff(_))), "{r:?}");
        assert_eq!(r.unwrap_err().status(), StatusCode::BAD_GATEWAY);
        assert!(started.elapsed() < Duration::from_millis(10));
    }
    assert_eq!(calls(&h).len(), after_first);
    // Another task still gets the budget (refilled meanwhile) and its set.
    *h.sts.failing.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.locks
        .locked_for(&raw("ASIARAWEGOOD", Some(ROLE_A)), None)
        .await
        .unwrap();
    // After the back-off the failing task is tried again; the next failure waits longer.
    tokio::time::sleep(FAILED_FIRST).await;
    *h.sts.failing.lock().unwrap() = Some(StsErrorCode::AccessDenied);
    assert!(matches!(
        h.locks.locked_for(&bad, None).await,
        Err(Failure::Sts(_))
    ));
    tokio::time::sleep(FAILED_FIRST + Duration::from_secs(1)).await;
    assert!(matches!(
        h.locks.locked_for(&bad, None).await,
        Err(Failure::Backoff(_))
    ));
}

#[test]
fn session_names_fit_sts_and_never_carry_a_raw_value() {
    assert_eq!(
        session_name(
            AgentKind::Ecs,
            Some("0b8e1c9e-5f6a-4a3e-9c55-1f4d3c2b1a00"),
            "ASIARAWE"
        ),
        "credlock-ecs-0b8e1c9e-5f6a-4a3e-9c55-1f4d3c2b1a00"
    );
    for odd in [Some("a/b"), Some(&*"x".repeat(60)), Some("sp ace"), None] {
        let name = session_name(AgentKind::Ecs, odd, "ASIARAWEXAMPLE");
        assert!(
            name.starts_with("credlock-ecs-") && name.len() <= 64,
            "{name}"
        );
        assert!(!name.contains("ASIARAW"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)),
            "{name}"
        );
    }
}

#[test]
fn credential_ids_from_both_documented_paths() {
    assert_eq!(credential_id("/v2/credentials/abc"), Some("abc"));
    assert_eq!(credential_id("/v2/credentials/abc?x=1"), Some("abc"));
    assert_eq!(credential_id("/v1/credentials?id=abc"), Some("abc"));
    assert_eq!(credential_id("/v1/credentials?x=1&id=abc"), Some("abc"));
    assert_eq!(credential_id("/v2/credentials/"), None);
    assert_eq!(credential_id("/v1/credentials"), None);
    assert_eq!(credential_id("/v2/metadata"), None);
}
