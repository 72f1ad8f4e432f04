//! Test fixtures: the IMDS emulator (tests/support/imds_emulator.py) and moto as STS and EC2,
//! both real processes on loopback, and credlock started in-process on port 0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use credlock::app::{self, Running};
use credlock::config::{self, Config, Overrides};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    repo().join(".venv/bin").join(name)
}

/// The Python that runs the emulator: CREDLOCK_PYTHON, the repo's venv, or python3.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CREDLOCK_PYTHON") {
        return p.into();
    }
    let venv = venv_bin("python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Emulator {
    _proc: Proc,
    pub addr: SocketAddr,
    pub control: SocketAddr,
}

impl Emulator {
    pub fn start(args: &[&str]) -> Emulator {
        let mut child = Command::new(python())
            .arg(repo().join("tests/support/imds_emulator.py"))
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the IMDS emulator (python3 needed)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        let mut control = None;
        while control.is_none() {
            let line = lines
                .next()
                .expect("the emulator exited before listening")
                .unwrap();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("listening"), Some(a)) => addr = addr.or(Some(a.parse().unwrap())),
                (Some("control"), Some(a)) => control = Some(a.parse().unwrap()),
                _ => {}
            }
        }
        Emulator {
            _proc: Proc(child),
            addr: addr.unwrap(),
            control: control.unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn state(&self) -> serde_json::Value {
        get_json(format!("http://{}/state", self.control)).await
    }

    pub async fn set(&self, state: serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("http://{}/state", self.control))
            .json(&state)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "emulator control: {}", r.status());
    }

    pub async fn requests(&self) -> Vec<serde_json::Value> {
        get_json(format!("http://{}/requests", self.control)).await
    }

    /// Every raw credential value the emulator hands out (v1, v2), to assert none leaks.
    pub async fn raw_secrets(&self) -> Vec<String> {
        let state = self.state().await;
        let mut out = Vec::new();
        for set in ["v1", "v2"] {
            for field in ["AccessKeyId", "SecretAccessKey", "Token"] {
                if let Some(v) = state["credentials"][set][field].as_str() {
                    out.push(v.to_string());
                }
            }
        }
        assert!(out.len() >= 6, "emulator state has no credentials: {state}");
        out
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Moto {
    _proc: Proc,
    pub url: String,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_on(free_port())
    }

    /// On a given port (to bring "STS" back where credlock expects it).
    pub fn start_on(port: u16) -> Moto {
        let bin = venv_bin("moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run tests/setup.sh",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            _proc: Proc(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
        }
    }
}

/// A config for loopback tests: port 0 listeners, echo off, STS at `sts`.
pub fn config(upstream: &str, sts: Option<&str>, extra: &str) -> Config {
    let sts = sts
        .map(|u| format!("sts_endpoint = \"{u}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
         [discovery.echo]\nenabled = false\n[lock]\n{sts}{extra}"
    );
    config::from_toml(&text, &Overrides::default()).unwrap()
}

/// A config text for loopback tests: port 0 listeners, `upstream`, STS at `sts`, then `rest`.
pub fn loopback_toml(upstream: &str, sts: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
         [lock]\nsts_endpoint = \"{sts}\"\n{rest}"
    )
}

pub async fn start(config: Config) -> Running {
    app::start(config).await.expect("credlock starts")
}

/// credlock started from a config text, without overrides.
pub async fn start_toml(text: &str) -> Running {
    start(config::from_toml(text, &Overrides::default()).unwrap()).await
}

pub async fn wait_ready(running: &Running) {
    let mut ready = running.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("credlock did not become ready within 20 s")
        .unwrap();
}

pub fn base(running: &Running) -> String {
    format!("http://{}", running.imds_addrs[0])
}

/// The JSON body of a GET of `url`.
pub async fn get_json<T: serde::de::DeserializeOwned>(url: impl reqwest::IntoUrl) -> T {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// credlock's `/status` document from its admin listener.
pub async fn admin_status(running: &Running) -> serde_json::Value {
    get_json(format!("http://{}/status", running.admin_addr)).await
}

/// The HTTP status credlock answers a request for the emulator role's credentials with.
pub async fn credentials_status(running: &Running) -> u16 {
    reqwest::get(format!(
        "{}/latest/meta-data/iam/security-credentials/credlock-test-role",
        base(running)
    ))
    .await
    .unwrap()
    .status()
    .as_u16()
}

/// What a [`FakeHttp`] answers.
#[derive(Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
    pub down: bool,
}

/// A tiny HTTP/1.1 server on loopback standing in for an echo service, a boot provider or STS:
/// answers every request with the current [`Answer`] (or, for a request body containing the
/// `unless` text, with its own answer) and records request bodies.
pub struct FakeHttp {
    pub url: String,
    pub answer: std::sync::Arc<std::sync::Mutex<Answer>>,
    pub unless: std::sync::Arc<std::sync::Mutex<Option<(String, Answer)>>>,
    pub bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHttp {
    pub async fn start(body: &str) -> FakeHttp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let answer = std::sync::Arc::new(std::sync::Mutex::new(Answer {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
            down: false,
        }));
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let unless = std::sync::Arc::new(std::sync::Mutex::new(None::<(String, Answer)>));
        let (a, b, u) = (answer.clone(), bodies.clone(), unless.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (a, b, u) = (a.clone(), b.clone(), u.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then Content-Length bytes of body.
                    let (head_end, len) = loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
                    let answer = match &*u.lock().unwrap() {
                        Some((text, other)) if body.contains(text.as_str()) => other.clone(),
                        _ => a.lock().unwrap().clone(),
                    };
                    b.lock().unwrap().push(body);
                    if answer.down {
                        return;
                    }
                    tokio::time::sleep(answer.delay).await;
                    let response = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        answer.status,
                        answer.body.len(),
                        answer.body
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        FakeHttp {
            url,
            answer,
            unless,
            bodies,
            task,
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Answer)) {
        f(&mut self.answer.lock().unwrap());
    }
}

/// An IMDSv2 session token through `base` (credlock or the emulator).
pub async fn token(base: &str) -> String {
    reqwest::Client::new()
        .put(format!("{base}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// ---- moto as AWS: SDK settings and EC2 resources -------------------------------------------

/// SDK settings for moto (or a proxy in front of it) at `url`: us-east-1, moto's test keys.
pub async fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "t",
        ))
        .endpoint_url(url)
        .load()
        .await
}

/// An EC2 client for moto.
pub async fn ec2_client(moto: &Moto) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(&moto.url).await)
}

/// A VPC with a /24 subnet, tagged `credlock-perimeter` = `tag` if given: their IDs.
pub async fn create_vpc(
    c: &aws_sdk_ec2::Client,
    cidr: &str,
    tag: Option<&str>,
) -> (String, String) {
    let mut req = c.create_vpc().cidr_block(cidr);
    if let Some(t) = tag {
        req = req.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Vpc)
                .tags(Tag::builder().key("credlock-perimeter").value(t).build())
                .build(),
        );
    }
    let vpc = req.send().await.unwrap().vpc.unwrap().vpc_id.unwrap();
    let subnet = c
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block(cidr.replace(".0.0/16", ".1.0/24"))
        .send()
        .await
        .unwrap()
        .subnet
        .unwrap()
        .subnet_id
        .unwrap();
    (vpc, subnet)
}

/// An endpoint of `com.amazonaws.us-east-1.{service}` in `vpc`: its ID.
pub async fn create_endpoint(c: &aws_sdk_ec2::Client, vpc: &str, service: &str) -> String {
    c.create_vpc_endpoint()
        .vpc_id(vpc)
        .service_name(format!("com.amazonaws.us-east-1.{service}"))
        .send()
        .await
        .unwrap()
        .vpc_endpoint
        .unwrap()
        .vpc_endpoint_id
        .unwrap()
}

/// A new Elastic IP: its allocation ID and address.
pub async fn allocate_eip(c: &aws_sdk_ec2::Client) -> (String, String) {
    let a = c.allocate_address().send().await.unwrap();
    (a.allocation_id.unwrap(), a.public_ip.unwrap())
}

/// A NAT gateway in `subnet` on a new Elastic IP: that address.
pub async fn create_nat_gateway(c: &aws_sdk_ec2::Client, subnet: &str) -> String {
    let (alloc, ip) = allocate_eip(c).await;
    c.create_nat_gateway()
        .subnet_id(subnet)
        .allocation_id(alloc)
        .send()
        .await
        .unwrap();
    ip
}

/// An instance in `subnet` with a new Elastic IP: its ID and that address.
pub async fn instance_with_eip(c: &aws_sdk_ec2::Client, subnet: &str) -> (String, String) {
    let image = c.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();
    let instance = c
        .run_instances()
        .image_id(image)
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_string();
    let (alloc, ip) = allocate_eip(c).await;
    c.associate_address()
        .allocation_id(alloc)
        .instance_id(&instance)
        .send()
        .await
        .unwrap();
    (instance, ip)
}
