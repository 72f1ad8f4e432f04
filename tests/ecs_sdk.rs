//! ECS task credentials (`[containers.ecs]`) read by the AWS Rust SDK's own container provider,
//! `aws_config::ecs::EcsCredentialsProvider`, the way a task's Rust application reads them.
//!
//! The stack: the ECS agent stand-in (tests/support/ecs_agent_emulator.py), the IMDS emulator
//! and moto (credlock's instance lock needs them before it locks any task set), and credlock
//! in-process with its ECS listener pointed at the stand-in. The SDK is given
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://<credlock's ECS listener>/v2/credentials/<id>`;
//! an `aws-sdk-sts` client using that provider then asks moto GetCallerIdentity.
//!
//! aws-config (1.8) reads the provider's environment only from the process: `ProviderConfig`'s
//! `with_env` is crate-private. Setting variables in this multi-threaded test process would race
//! (and is `unsafe`), so the SDK side runs in a child process, `examples/ecs_sdk_child.rs`
//! (built by `cargo build --all-targets` and `cargo test --all-targets`), with the container
//! environment set, exactly as a container receives it. The child prints one line (the set the
//! provider returned and moto's answer) that the parent judges.
//!
//! Ground truth is never credlock: the stand-in's control API (GET /state: the raw set of each
//! credential id; GET /requests: what reached the agent) and moto (which session the SDK's
//! signing key belongs to).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use credlock::app::Running;
use serde_json::{Value, json};

/// The stand-in's account (and moto's default).
const ACCOUNT: &str = "123456789012";
/// The stand-in's raw `AccessKeyId` prefix (ecs_agent_emulator.RAW_ACCESS_KEY_PREFIX).
const RAW_KEY_PREFIX: &str = "ASIARAWE";
const SESSION_PREFIX: &str = "credlock-ecs-";

/// The child: the variable that carries moto's URL to it, and the prefix of the line it
/// reports on (as examples/ecs_sdk_child.rs has them).
const CHILD_STS: &str = "CREDLOCK_TEST_ECS_SDK_STS";
const REPORT: &str = "ECS-SDK-REPORT ";
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The Python that runs the stand-in: CREDLOCK_PYTHON, the repo's venv, or python3 (as
/// tests/common does for the IMDS emulator).
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CREDLOCK_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// The ECS agent stand-in, killed on drop.
struct Agent {
    child: Child,
    addr: SocketAddr,
    control: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(python())
            .arg(repo().join("tests/support/ecs_agent_emulator.py"))
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the ECS agent stand-in (python3 needed)");
        // "listening ADDR" then "control ADDR", flushed once bound.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut control) = (None, None);
        while control.is_none() {
            let line = lines
                .next()
                .expect("the ECS agent stand-in exited before listening")
                .unwrap();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("listening"), Some(a)) => addr = addr.or(Some(a.parse().unwrap())),
                (Some("control"), Some(a)) => control = Some(a.parse().unwrap()),
                _ => {}
            }
        }
        Agent {
            child,
            addr: addr.unwrap(),
            control: control.unwrap(),
        }
    }

    /// Task credentials for `role` of [`ACCOUNT`] under credential id `id` (the agent's
    /// SetTaskCredentials); returns the raw document the agent serves for it.
    async fn task(&self, id: &str, role: &str) -> Value {
        let r = reqwest::Client::new()
            .post(format!("http://{}/credentials", self.control))
            .json(&json!({"id": id, "role_arn": format!("arn:aws:iam::{ACCOUNT}:role/{role}")}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "agent control: {}", r.status());
        let entry: Value = r.json().await.unwrap();
        assert_eq!(entry["relative_uri"], format!("/v2/credentials/{id}"));
        self.raw(id).await
    }

    /// The raw document the agent serves for `id` right now (GET /state).
    async fn raw(&self, id: &str) -> Value {
        let state: Value = reqwest::get(format!("http://{}/state", self.control))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let doc = state["credentials"][id]["document"].clone();
        let key = doc["AccessKeyId"].as_str().unwrap_or_default();
        assert!(
            key.starts_with(RAW_KEY_PREFIX),
            "the stand-in's raw key is marked: {doc}"
        );
        doc
    }

    /// The targets of the requests that reached the agent.
    async fn targets(&self) -> Vec<String> {
        let log: Vec<Value> = reqwest::get(format!("http://{}/requests", self.control))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        log.iter()
            .filter_map(|r| r["path"].as_str().map(str::to_string))
            .collect()
    }
}

/// IMDS emulator, moto, the agent stand-in and credlock with `[containers.ecs]`.
struct Stack {
    _emu: Emulator,
    moto: Moto,
    agent: Agent,
    running: Running,
    ecs: SocketAddr,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.running.shutdown.send(true);
    }
}

impl Stack {
    async fn start() -> Stack {
        let emu = Emulator::start(&[]);
        let moto = Moto::start();
        let agent = Agent::start();
        let extra = format!(
            "\n[containers.ecs]\nlisten = [\"127.0.0.1:0\"]\nagent = \"{}\"\n",
            agent.addr
        );
        let running = start(config(&emu.url(), Some(&moto.url), &extra)).await;
        // Ready: the instance is known and locked, so task sets can be locked too.
        wait_ready(&running).await;
        let ecs = running.ecs_addrs[0];
        Stack {
            _emu: emu,
            moto,
            agent,
            running,
            ecs,
        }
    }

    /// The URI a task's container would be given, through credlock.
    fn uri(&self, id: &str) -> String {
        format!("http://{}/v2/credentials/{id}", self.ecs)
    }
}

/// What the SDK in the child got.
#[derive(Debug)]
struct SdkReport {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    /// Seconds since the epoch, as the SDK parsed `Expiration`.
    expiry: Option<u64>,
    /// GetCallerIdentity's Arn, signed by the SDK's STS client with the provider's credentials.
    arn: Option<String>,
    sts_error: Option<String>,
}

/// Runs examples/ecs_sdk_child.rs in a child process whose container environment points the
/// SDK at `uri`.
async fn sdk(uri: &str, sts: &str) -> SdkReport {
    // target/debug/deps/ecs_sdk-<hash> -> target/debug/examples/ecs_sdk_child
    let child = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join("ecs_sdk_child"))
        .unwrap();
    assert!(
        child.is_file(),
        "{} is missing: build it with `cargo build --example ecs_sdk_child` (cargo test --all-targets does)",
        child.display()
    );
    let mut command = tokio::process::Command::new(child);
    command.stdin(Stdio::null()).kill_on_drop(true);
    // Nothing else from this environment may steer the SDK: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI
    // would win over the full URI, and a proxy would take the SDK's traffic elsewhere.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("AWS_") || name.to_ascii_lowercase().ends_with("_proxy") {
            command.env_remove(name);
        }
    }
    command
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
        .env(CHILD_STS, sts);
    let out = tokio::time::timeout(CHILD_TIMEOUT, command.output())
        .await
        .expect("the SDK child process did not finish within 60 s")
        .expect("cannot run the SDK child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK child for {uri} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(REPORT).map(|(_, report)| report))
        .unwrap_or_else(|| panic!("SDK child for {uri} reported nothing:\n{stdout}\n{stderr}"));
    let v: Value = serde_json::from_str(line).unwrap();
    let text = |k: &str| v[k].as_str().map(str::to_string);
    SdkReport {
        access_key_id: text("access_key_id").unwrap(),
        secret_access_key: text("secret_access_key").unwrap(),
        session_token: text("session_token").unwrap_or_default(),
        expiry: v["expiry"].as_u64(),
        arn: text("arn"),
        sts_error: text("sts_error"),
    }
}

/// Seconds since the epoch now (the SDK's expiry is wall-clock time).
fn now_secs() -> u64 {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    now.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The SDK got a set STS issued as `role`'s session for credential id `id`, and none of it is
/// the agent's raw set.
fn assert_locked(got: &SdkReport, raw: &Value, id: &str, role: &str) {
    assert_eq!(
        got.arn.as_deref(),
        Some(format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{SESSION_PREFIX}{id}").as_str()),
        "moto's caller identity for the SDK's set ({:?})",
        got.sts_error
    );
    assert!(
        !got.access_key_id.starts_with(RAW_KEY_PREFIX),
        "raw key read by the SDK: {}",
        got.access_key_id
    );
    for (field, value) in [
        ("AccessKeyId", &got.access_key_id),
        ("SecretAccessKey", &got.secret_access_key),
        ("Token", &got.session_token),
    ] {
        assert!(!value.is_empty(), "{field} empty");
        assert_ne!(
            raw[field].as_str(),
            Some(value.as_str()),
            "{field} is the agent's raw value"
        );
    }
    // The agent's raw set lives six hours; a locked set (a chained AssumeRole) at most one.
    let now = now_secs();
    let expiry = got
        .expiry
        .expect("the SDK parsed the locked set's Expiration");
    assert!(
        expiry > now + 60 && expiry <= now + 3600 + 60,
        "locked set's expiry {}s from now",
        expiry as i64 - now as i64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_sdk_ecs_provider_reads_a_locked_task_set_through_credlock() {
    let stack = Stack::start().await;
    let id = "6f1b8f4e-2d0c-4c4e-9a51-0c7d3e5a9b21";
    let role = "rust-sdk-task-role";
    let raw = stack.agent.task(id, role).await;

    let got = sdk(&stack.uri(id), &stack.moto.url).await;
    assert_locked(&got, &raw, id, role);
    // It came from the agent, through credlock: the agent answered the SDK's request.
    let target = format!("/v2/credentials/{id}");
    assert!(
        stack.agent.targets().await.contains(&target),
        "the agent saw no {target}"
    );
    // And it is still the same task set: the agent did not rotate meanwhile.
    assert_eq!(stack.agent.raw(id).await, raw);

    // Control: the same provider pointed at the agent itself reads the raw set, which moto does
    // not know as the task role's session. (The assertions above are what tell the two apart.)
    let direct = sdk(
        &format!("http://{}/v2/credentials/{id}", stack.agent.addr),
        &stack.moto.url,
    )
    .await;
    assert_eq!(
        Some(direct.access_key_id.as_str()),
        raw["AccessKeyId"].as_str()
    );
    let direct_arn = direct.arn.unwrap_or_default();
    assert!(
        !direct_arn.contains(":assumed-role/"),
        "moto's answer for the raw key: {direct_arn}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tasks_with_different_roles_each_read_their_own_roles_session() {
    let stack = Stack::start().await;
    let tasks = [
        (
            "0d6c2f7a-5b1e-4f0a-8c3d-2a9e7b4c1f60",
            "rust-sdk-orders-role",
        ),
        (
            "c4a9e1b3-7f2d-4e8a-9b6c-5d0f3a2e8c17",
            "rust-sdk-billing-role",
        ),
    ];
    let mut raws = Vec::new();
    for (id, role) in tasks {
        raws.push(stack.agent.task(id, role).await);
    }
    // Both SDK processes at once, as two tasks on one instance.
    let uris = tasks.map(|(id, _)| stack.uri(id));
    let (a, b) = tokio::join!(
        sdk(&uris[0], &stack.moto.url),
        sdk(&uris[1], &stack.moto.url),
    );
    for (got, ((id, role), raw)) in [&a, &b].into_iter().zip(tasks.iter().zip(&raws)) {
        assert_locked(got, raw, id, role);
        // Neither task's set is the other's raw set either.
        for other in &raws {
            assert_ne!(
                other["AccessKeyId"].as_str(),
                Some(got.access_key_id.as_str())
            );
        }
    }
    assert_ne!(a.access_key_id, b.access_key_id, "one set per task");
}
