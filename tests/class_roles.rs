//! Per-class roles on the request path (`access.rule.role`), against the IMDS emulator.
//!
//! credlock's own handler and listener, with the caller's identity given instead of looked up
//! (an in-process client would be credlock itself): so the fail-closed cases can be set up
//! exactly. The root netns suite (`tests/root/netns_access_checks.sh`) runs the same feature
//! with real processes, the real lookup, moto as STS and boto3.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use credlock::access::{AccessConfig, Caller, Identity, Policy};
use credlock::class_role::ClassRoles;
use credlock::clock::SystemClock;
use credlock::credentials::{CredentialStore, KnownRaw, LockedCredentials, Secret};
use credlock::gate::AccessControl;
use credlock::metrics::Metrics;
use credlock::proxy::{self, ProxyState};
use credlock::server;
use credlock::upstream::{Upstream, UpstreamClient};

const INSTANCE_ROLE: &str = "credlock-test-role";
const CLASS_ROLE: &str = "worker-s3";
const WORKER_UID: u32 = 4242;

struct Proxy {
    base: String,
    caller: Arc<Mutex<Identity>>,
    instance_store: Arc<CredentialStore>,
    roles: Arc<ClassRoles>,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

fn set(key: &str) -> LockedCredentials {
    let now = credlock::clock::Clock::now(&SystemClock);
    LockedCredentials::new(
        key.to_string(),
        Secret::new(format!("secret-of-{key}")),
        Secret::new(format!("token-of-{key}")),
        now + Duration::from_secs(3600),
        now,
    )
}

fn caller(uid: u32) -> Identity {
    Identity::Identified(Caller {
        uid,
        unit: Some("worker.service".into()),
        cgroup: Some("/system.slice/worker.service".into()),
        pid: None,
    })
}

async fn serve(emu: &Emulator) -> Proxy {
    let cfg: AccessConfig = toml::from_str::<toml::Table>(&format!(
        "[[access.rule]]\nname = \"workers\"\nusers = [\"{WORKER_UID}\"]\n\
         role = \"arn:aws:iam::999999999999:role/{CLASS_ROLE}\"\n"
    ))
    .unwrap()["access"]
        .clone()
        .try_into()
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (policy, _) = Policy::compile(&cfg, &credlock::peer::SystemDirectory, false).unwrap();
    let instance_store = Arc::new(CredentialStore::default());
    let mut state = ProxyState::new(
        UpstreamClient::new(
            &Upstream {
                authority: emu.addr.to_string().parse().unwrap(),
            },
            Duration::from_secs(3),
        ),
        instance_store.clone(),
        metrics.clone(),
        Arc::new(SystemClock),
        Duration::from_secs(60),
        Arc::new(KnownRaw::default()),
    );
    state.access = Some(Arc::new(AccessControl::new(
        policy,
        Box::new(|_| Vec::new()),
        None,
        &metrics,
    )));
    let roles = Arc::new(ClassRoles::new(&cfg, &metrics).unwrap());
    state.class_roles = roles.clone();
    let state = Arc::new(state);
    let caller_now = Arc::new(Mutex::new(caller(WORKER_UID)));
    let who = caller_now.clone();
    let identify: server::Identify =
        Arc::new(move |_, _, _| server::Identified::Known(Arc::new(who.lock().unwrap().clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve(
        "imds",
        vec![listener],
        move |req, who| proxy::handle(state.clone(), req, who),
        server::Limits {
            max_connections: 64,
            idle: Duration::from_secs(5),
            drain: Duration::from_millis(100),
        },
        rx,
        None,
        Some(identify),
    ));
    Proxy {
        base,
        caller: caller_now,
        instance_store,
        roles,
        _shutdown: tx,
    }
}

/// One request on a new connection (the identity is taken per connection).
async fn get(p: &Proxy, path: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut req = client.get(format!("{}{path}", p.base));
    if let Some(t) = token {
        req = req.header("x-aws-ec2-metadata-token", t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn creds(role: &str) -> String {
    format!("/latest/meta-data/iam/security-credentials/{role}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_class_role_is_served_only_its_own_set_and_fails_closed() {
    let emu = Emulator::start(&[]);
    let p = serve(&emu).await;
    let raw = emu.raw_secrets().await;
    let tok = token(&p.base).await;
    p.instance_store.store(set("ASIAINSTANCESET"));

    // The instance role's name is not yet known (its lock loop has not read the identity):
    // 503, never the instance role's set.
    let (status, body) = get(&p, &creds(CLASS_ROLE), Some(&tok)).await;
    assert_eq!(
        (status, body.contains("ASIAINSTANCESET")),
        (503, false),
        "{body}"
    );

    // Known, but the class role holds no set (its trust policy refused, STS down): still 503.
    p.roles.set_instance_role(INSTANCE_ROLE);
    let (status, body) = get(&p, &creds(CLASS_ROLE), Some(&tok)).await;
    assert_eq!(
        (status, body.contains("ASIAINSTANCESET")),
        (503, false),
        "{body}"
    );

    // The instance role's own path is not this class's: 404, IMDS's answer for a role that is
    // not attached, whether or not the class's set exists.
    let (status, body) = get(&p, &creds(INSTANCE_ROLE), Some(&tok)).await;
    assert_eq!(status, 404, "{body}");

    p.roles.roles()[0].store.store(set("ASIACLASSSET"));
    for version in ["latest", "2016-09-02"] {
        for kind in ["security-credentials", "security-credentials-extended"] {
            for suffix in ["", "/"] {
                let path = format!("/{version}/meta-data/iam/{kind}/{CLASS_ROLE}{suffix}");
                let (status, body) = get(&p, &path, Some(&tok)).await;
                assert_eq!(status, 200, "{path}: {body}");
                let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(doc["AccessKeyId"], "ASIACLASSSET", "{path}");
                assert_eq!(doc["Code"], "Success", "{path}: IMDS's own fields kept");
                if kind.ends_with("extended") {
                    assert_eq!(
                        doc["AccountId"], "999999999999",
                        "{path}: the class role's account"
                    );
                }
                for secret in &raw {
                    assert!(!body.contains(secret.as_str()), "{path} leaked a raw value");
                }
                let (status, listing) =
                    get(&p, &format!("/{version}/meta-data/iam/{kind}/"), Some(&tok)).await;
                assert_eq!(
                    (status, listing.as_str()),
                    (200, CLASS_ROLE),
                    "{kind} listing"
                );
            }
        }
    }
    // The upstream still judges the caller's token: a bad one gets IMDS's 401, not a set.
    let (status, body) = get(&p, &creds(CLASS_ROLE), Some("not-a-token")).await;
    assert_eq!((status, body.contains("ASIA")), (401, false), "{body}");
    let (status, _) = get(
        &p,
        "/latest/meta-data/iam/security-credentials/",
        Some("bad"),
    )
    .await;
    assert_eq!(status, 401, "the listing too");
    // The upstream's forwarded request was for the instance role, with the caller's token.
    let asked: Vec<String> = emu
        .requests()
        .await
        .iter()
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .filter(|path| path.contains("security-credentials/"))
        .collect();
    assert!(
        asked.iter().any(|path| path.ends_with(INSTANCE_ROLE)),
        "forwarded as the instance role's request: {asked:?}"
    );
    assert!(
        asked.iter().all(|path| !path.contains(CLASS_ROLE)),
        "the class role's name never reaches IMDS: {asked:?}"
    );

    // Another caller (no rule: today's behaviour) gets the instance role, as before.
    *p.caller.lock().unwrap() = caller(1000);
    let (status, body) = get(&p, &creds(INSTANCE_ROLE), Some(&tok)).await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, doc["AccessKeyId"].as_str()),
        (200, Some("ASIAINSTANCESET"))
    );
    let (_, listing) = get(
        &p,
        "/latest/meta-data/iam/security-credentials/",
        Some(&tok),
    )
    .await;
    assert_eq!(listing, INSTANCE_ROLE);
    let (status, _) = get(&p, &creds(CLASS_ROLE), Some(&tok)).await;
    assert_eq!(status, 404, "the class role's name is not another class's");
}
