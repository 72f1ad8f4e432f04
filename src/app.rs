//! Wiring: binds the listeners, starts the proxy, admin, discovery and lock tasks, and drains
//! them on shutdown. [`start`] is the single entry point for `main` and for tests (which bind
//! port 0 and read the bound addresses back).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::credentials::{CredentialStore, KnownRaw};
use crate::discovery::{self, Discoverer, SourceStatus};
use crate::firewall::FirewallWatch;
use crate::identity::{InstanceIdentity, RoleArn};
use crate::imds::Imds;
use crate::metrics::Metrics;
use crate::policy;
use crate::proxy::{self, ProxyState};
use crate::refresh::{ImdsInstance, LockStatus, Locker, backoff};
use crate::server;
use crate::sts::{AwsIssuer, ImdsSourceProvider};
use crate::upstream::UpstreamClient;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(
        "systemd passed a listener on {0} that neither server.listen nor server.admin_listen names: make credlock.socket's ListenStream= and /etc/credlock/credlock.toml agree"
    )]
    UnexpectedListener(String),
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
    #[error("cannot read the policy template {0}: {1}")]
    Template(String, std::io::Error),
    #[error("access policy: {0}")]
    Access(String),
}

/// A running credlock.
pub struct Running {
    pub imds_addrs: Vec<SocketAddr>,
    /// The ECS task-credential listeners (`[containers.ecs]`; empty when off).
    pub ecs_addrs: Vec<SocketAddr>,
    /// The Pod Identity listeners (`[containers.pod_identity]`; empty when off).
    pub pod_identity_addrs: Vec<SocketAddr>,
    /// The container-credentials endpoint (`[containers.endpoint]`; `None` when off).
    pub endpoint_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Why the admin listener could not be had (it is then not served; IMDS is). Under
    /// systemd the socket unit holds it from boot, so only `credlock run` by hand can meet this.
    pub admin_error: Option<String>,
    pub metrics: Arc<Metrics>,
    /// Turns true once a locked set is held (then systemd is told READY=1).
    pub ready: watch::Receiver<bool>,
    pub shutdown: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

#[path = "app_access.rs"]
mod access_setup;
use access_setup::access_control;

/// Loads the session policy template: the configured file, else the installed one, else the
/// copy compiled in.
pub fn load_template(config: &Config) -> Result<serde_json::Value, StartError> {
    let text = match &config.policy_template {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| StartError::Template(path.display().to_string(), e))?,
        None => std::fs::read_to_string(crate::config::DEFAULT_TEMPLATE_PATH)
            .unwrap_or_else(|_| policy::BUILTIN_TEMPLATE.to_string()),
    };
    Ok(policy::parse_template(&text)?)
}

/// The TCP listeners systemd passed (socket activation: credlock.socket), if any. Call it
/// before any other thread exists: it clears LISTEN_FDS and LISTEN_PID from the environment.
///
/// Socket activation is what keeps every other user away from credlock's ports: systemd binds
/// them at sockets.target, before any user process runs, and holds them while credlock
/// crashes, restarts or is stopped, so no process can bind them and receive the IMDS traffic
/// the firewall redirects there (port squatting, issue 14).
pub fn inherited_listeners() -> Vec<std::net::TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    (0..fds.len())
        .filter_map(|i| match fds.take_tcp_listener(i) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(fd = i + 3, error = %e, "an inherited file descriptor is not a TCP listener; ignored");
                None
            }
        })
        .collect()
}

pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, Arc::new(SystemClock), Vec::new()).await
}

/// [`start`] with the listeners systemd passed ([`inherited_listeners`]).
pub async fn start_inherited(
    config: Config,
    inherited: Vec<std::net::TcpListener>,
) -> Result<Running, StartError> {
    start_with(config, Arc::new(SystemClock), inherited).await
}

/// [`start`] with an injected wall clock (tests move time instead of sleeping).
pub async fn start_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<Running, StartError> {
    start_with(config, clock, Vec::new()).await
}

/// Takes the inherited listener on `addr`, else binds it.
async fn listener_for(
    addr: SocketAddr,
    inherited: &mut Vec<(SocketAddr, std::net::TcpListener)>,
) -> Result<tokio::net::TcpListener, StartError> {
    if let Some(i) = inherited.iter().position(|(a, _)| *a == addr) {
        let (_, l) = inherited.swap_remove(i);
        l.set_nonblocking(true)
            .map_err(|e| StartError::Bind(addr, e))?;
        return tokio::net::TcpListener::from_std(l).map_err(|e| StartError::Bind(addr, e));
    }
    let mut bound = server::bind(&[addr])
        .await
        .map_err(|(a, e)| StartError::Bind(a, e))?;
    Ok(bound.remove(0))
}

/// A listener on `addr` whether or not the address is configured yet (`IP_FREEBIND`, which
/// Linux honours for IPv6 sockets too; systemd's `FreeBind=`): for addresses that another
/// service adds later.
fn bind_freely(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpFreebind, &true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn start_with(
    config: Config,
    clock: Arc<dyn Clock>,
    inherited: Vec<std::net::TcpListener>,
) -> Result<Running, StartError> {
    let template = load_template(&config)?;
    let mut inherited: Vec<(SocketAddr, std::net::TcpListener)> = inherited
        .into_iter()
        .filter_map(|l| Some((l.local_addr().ok()?, l)))
        .collect();
    if let Some((addr, _)) = inherited.iter().find(|(a, _)| {
        !config.listen.contains(a)
            && *a != config.admin_listen
            && !config
                .ecs
                .iter()
                .chain(&config.pod_identity)
                .any(|e| e.listen.contains(a))
            && config.endpoint.as_ref().is_none_or(|e| e.listen != *a)
    }) {
        return Err(StartError::UnexpectedListener(addr.to_string()));
    }
    let mut imds_listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        imds_listeners.push(listener_for(*addr, &mut inherited).await?);
    }
    // The admin listener failing (its port taken by another process) must not stop the IMDS
    // proxy: every application depends on that one. It is logged as an error and shown in
    // systemd's status line.
    let (admin_listeners, admin_addr, admin_error) = match listener_for(
        config.admin_listen,
        &mut inherited,
    )
    .await
    {
        Ok(l) => {
            let addr = l.local_addr().unwrap_or(config.admin_listen);
            (vec![l], addr, None)
        }
        Err(e) => {
            tracing::error!(error = %e, "the admin listener is unavailable: no /metrics, /readyz or /status until credlock restarts; IMDS is served");
            (Vec::new(), config.admin_listen, Some(e.to_string()))
        }
    };
    let imds_addrs: Vec<SocketAddr> = imds_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let mut ecs_listeners = Vec::new();
    for addr in config.ecs.iter().flat_map(|e| &e.listen) {
        ecs_listeners.push(listener_for(*addr, &mut inherited).await?);
    }
    let ecs_addrs: Vec<SocketAddr> = ecs_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    // The agent's link addresses appear when its DaemonSet starts, after credlock may have:
    // bound without them (IP_FREEBIND), as credlock.socket's FreeBind=yes does.
    // Pods send their service-account token there, and the firewall sends them there whether
    // or not credlock listens: the port is held whenever it can be (credlock.socket holds it
    // across restarts). One that cannot be bound leaves pods without an answer (fail closed),
    // never IMDS down.
    let first_unprivileged = crate::endpoint::unprivileged_port_start();
    let mut pod_listeners = Vec::new();
    for addr in config.pod_identity.iter().flat_map(|e| &e.listen) {
        let held = inherited.iter().any(|(a, _)| a == addr);
        let bound = match held {
            true => listener_for(*addr, &mut inherited).await,
            false => bind_freely(*addr).map_err(|e| StartError::Bind(*addr, e)),
        };
        match bound {
            Ok(l) => pod_listeners.push(l),
            Err(e) => {
                tracing::error!(error = %e, "a Pod Identity listener is unavailable: pods sent there get no answer until credlock restarts; IMDS is served")
            }
        }
        if !held && addr.port() >= first_unprivileged {
            tracing::warn!(%addr, first_unprivileged, "net.ipv4.ip_unprivileged_port_start lets any user bind this Pod Identity port while credlock is not running: hold it with credlock.socket");
        }
    }
    let pod_identity_addrs: Vec<SocketAddr> = pod_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    // Like the admin listener's, this port taken by another process must not stop the IMDS
    // proxy; it is held from boot by credlock.socket when configured there (README).
    let endpoint_listener = match &config.endpoint {
        Some(e) if e.listen.port() >= first_unprivileged => {
            tracing::error!(
                port = e.listen.port(),
                first_unprivileged,
                "the container-credentials endpoint is off: net.ipv4.ip_unprivileged_port_start lets any user bind its port first"
            );
            None
        }
        Some(e) => match listener_for(e.listen, &mut inherited).await {
            Ok(l) => Some(l),
            Err(err) => {
                tracing::error!(error = %err, "the container-credentials endpoint is unavailable until credlock restarts; IMDS is served");
                None
            }
        },
        None => None,
    };
    let endpoint_addr = endpoint_listener.as_ref().and_then(|l| l.local_addr().ok());

    let metrics = Arc::new(Metrics::new());
    let metrics_handle = metrics.clone();
    let store = Arc::new(CredentialStore::default());
    let upstream = UpstreamClient::new(&config.upstream, config.upstream_timeout);
    let known_raw = Arc::new(KnownRaw::default());
    let mut proxy_state = ProxyState::new(
        upstream,
        store.clone(),
        metrics.clone(),
        clock.clone(),
        config.lock.serve_margin,
        known_raw.clone(),
    );
    let identify = access_control(&config.access, &metrics)?.map(|(access, identify)| {
        proxy_state.access = Some(access);
        identify
    });
    let class_roles = Arc::new(
        crate::class_role::ClassRoles::new(&config.access, &metrics).map_err(StartError::Access)?,
    );
    proxy_state.class_roles = class_roles.clone();
    let class_lock_status: Vec<Arc<ArcSwap<LockStatus>>> = class_roles
        .roles()
        .iter()
        .map(|_| Arc::new(ArcSwap::from_pointee(LockStatus::default())))
        .collect();
    let proxy_state = Arc::new(proxy_state);
    let firewall = FirewallWatch::new(config.firewall_state_file.clone(), config.firewall_required);
    metrics.firewall_required.set(i64::from(firewall.required));
    let lock_status = Arc::new(ArcSwap::from_pointee(LockStatus::default()));
    let discovery_status = Arc::new(ArcSwap::from_pointee(Vec::new()));
    let mut admin_state = AdminState::new(
        proxy_state.clone(),
        lock_status.clone(),
        discovery_status.clone(),
        imds_addrs.first().copied().unwrap_or(config.listen[0]),
        firewall,
    );
    admin_state.class_lock_status = class_lock_status.clone();
    let admin_state = Arc::new(admin_state);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);

    let proxy_server = tokio::spawn(server::serve(
        "imds",
        imds_listeners,
        move |req, who| proxy::handle(proxy_state.clone(), req, who),
        server::Limits {
            max_connections: config.max_connections,
            idle: server::IDLE_TIMEOUT,
            drain: config.drain_timeout,
        },
        shutdown_rx.clone(),
        Some(metrics.connections("imds")),
        identify,
    ));
    let admin_server = tokio::spawn(server::serve(
        "admin",
        admin_listeners,
        move |req, _| admin::handle(admin_state.clone(), req),
        server::Limits {
            max_connections: 64,
            idle: server::IDLE_TIMEOUT,
            drain: Duration::from_millis(500),
        },
        shutdown_rx.clone(),
        Some(metrics.connections("admin")),
        None,
    ));
    let task_locks: Vec<Arc<crate::container::TaskLocks>> = config
        .ecs
        .iter()
        .chain(&config.pod_identity)
        .map(|agent| {
            Arc::new(crate::container::TaskLocks::new(
                UpstreamClient::new(&agent.agent, agent.agent_timeout),
                template.clone(),
                crate::container::TaskLockConfig {
                    kind: agent.kind,
                    roles: agent.roles.clone(),
                    session_duration: config.lock.session_duration,
                    serve_margin: config.lock.serve_margin,
                    source_identity: config.lock.source_identity,
                    max_sets: agent.max_tasks,
                    assume_rate: agent.assume_rate,
                },
                clock.clone(),
                metrics.clone(),
            ))
        })
        .collect();
    let mut agent_listeners = [Some(ecs_listeners), Some(pod_listeners)];
    let agent_servers: Vec<_> = task_locks
        .iter()
        .map(|locks| {
            let locks = locks.clone();
            let label = locks.kind().label();
            let listeners = match locks.kind() {
                crate::container::AgentKind::Ecs => agent_listeners[0].take(),
                crate::container::AgentKind::PodIdentity => agent_listeners[1].take(),
            };
            tokio::spawn(server::serve(
                label,
                listeners.unwrap_or_default(),
                move |req, _| crate::container::handle(locks.clone(), req),
                server::Limits {
                    max_connections: config.max_connections,
                    idle: server::IDLE_TIMEOUT,
                    drain: config.drain_timeout,
                },
                shutdown_rx.clone(),
                Some(metrics.connections(label)),
                None,
            ))
        })
        .collect();
    let endpoint_server = config.endpoint.as_ref().zip(endpoint_listener).map(|(e, l)| {
        let endpoint = Arc::new(crate::endpoint::Endpoint {
            store: store.clone(),
            lock_status: lock_status.clone(),
            clock: clock.clone(),
            serve_margin: config.lock.serve_margin,
            metrics: metrics.clone(),
            tokens: crate::endpoint::Tokens::new(e.tokens.clone(), nix::unistd::geteuid().as_raw()),
        });
        match endpoint.tokens.summary() {
            Ok(n) => tracing::info!(tokens = n, file = %e.tokens.display(), "container-credentials endpoint"),
            Err(why) => tracing::error!(error = %why, "container-credentials endpoint: no token is trusted"),
        }
        let limits = server::Limits {
            max_connections: 64,
            idle: server::IDLE_TIMEOUT,
            drain: config.drain_timeout,
        };
        let handler = move |req, _| crate::endpoint::handle(endpoint.clone(), req);
        let connections = Some(metrics.connections("endpoint"));
        tokio::spawn(server::serve("endpoint", vec![l], handler, limits, shutdown_rx.clone(), connections, None))
    });
    tracing::info!(imds = ?imds_addrs, admin = %admin_addr, ecs = ?ecs_addrs, pod_identity = ?pod_identity_addrs, endpoint = ?endpoint_addr, upstream = %config.upstream.authority, "serving");

    // A pool of its own: see [`Imds`].
    let imds = Arc::new(
        Imds::new(UpstreamClient::new(
            &config.upstream,
            config.upstream_timeout,
        ))
        .remembering(known_raw),
    );
    let background = tokio::spawn(run_background(
        config,
        imds,
        template,
        store,
        metrics,
        clock,
        (lock_status, class_roles, class_lock_status),
        discovery_status,
        task_locks,
        ready_tx,
        shutdown_rx,
    ));

    let task = tokio::spawn(async move {
        let _ = proxy_server.await;
        let _ = admin_server.await;
        for server in agent_servers.into_iter().chain(endpoint_server) {
            let _ = server.await;
        }
        background.abort();
    });
    Ok(Running {
        imds_addrs,
        ecs_addrs,
        pod_identity_addrs,
        endpoint_addr,
        admin_addr,
        admin_error,
        metrics: metrics_handle,
        ready: ready_rx,
        shutdown: shutdown_tx,
        task,
    })
}

/// The instance role's lock status, the access rules' roles and their lock statuses.
type LockStates = (
    Arc<ArcSwap<LockStatus>>,
    Arc<crate::class_role::ClassRoles>,
    Vec<Arc<ArcSwap<LockStatus>>>,
);

/// Learns the identity (retrying until IMDS answers), then runs discovery and the lock loop.
#[allow(clippy::too_many_arguments)]
async fn run_background(
    config: Config,
    imds: Arc<Imds>,
    template: serde_json::Value,
    store: Arc<CredentialStore>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    (lock_status, class_roles, class_lock_status): LockStates,
    discovery_status: Arc<ArcSwap<Vec<SourceStatus>>>,
    task_locks: Vec<Arc<crate::container::TaskLocks>>,
    ready: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let configured = config.lock.role_arn.as_deref().and_then(RoleArn::parse);
    let identity = tokio::select! {
        id = wait_for_identity(&imds, configured.as_ref()) => id,
        _ = shutdown.changed() => return,
    };
    let source = ImdsSourceProvider::new(imds.clone());
    let context = discovery::context(
        &config,
        imds.clone(),
        identity.clone(),
        aws_credential_types::provider::SharedCredentialsProvider::new(source.clone()),
    )
    .await;
    let (env_tx, env_rx) = watch::channel(None);
    let discoverer = Discoverer {
        context,
        metrics: metrics.clone(),
        clock: clock.clone(),
        publish: env_tx,
        status: discovery_status,
        random: Arc::new(crate::clock::ThreadRandom),
    };
    // One lock loop per access rule role: its own store, status and series, the same
    // environment and template, assumed with the instance role's credentials. Not readiness:
    // see `class_role.rs`.
    let mut class_loops = tokio::task::JoinSet::new();
    let served_roles: Vec<RoleArn> = class_roles.roles().iter().map(|r| r.arn.clone()).collect();
    for (role, status) in class_roles.roles().iter().zip(class_lock_status) {
        let label = role.arn.to_string();
        let locker = Locker {
            issuer: AwsIssuer::new(
                &identity.region,
                source.clone(),
                config.lock.sts_endpoint.as_deref(),
                clock.clone(),
            )
            .await,
            instance: crate::refresh::ClassInstance {
                instance: ImdsInstance {
                    imds: imds.clone(),
                    configured: configured.clone(),
                },
                role: role.arn.clone(),
            },
            store: role.store.clone(),
            metrics: metrics.lock_series(Some(&label)),
            clock: clock.clone(),
            config: config.lock.clone(),
            template: template.clone(),
            environment: env_rx.clone(),
            recheck: config.discovery.interval,
            status,
            ready: watch::channel(false).0,
            also_deny: served_roles.clone(),
            on_identity: None,
            random: Arc::new(crate::clock::ThreadRandom),
        };
        class_loops.spawn(locker.run(shutdown.clone()));
    }
    for locks in &task_locks {
        // A task's locked session may not assume the instance role or an access rule's role.
        let mut deny = served_roles.clone();
        deny.push(identity.role.clone());
        locks.set_context(crate::container::LockContext {
            issuer: Arc::new(
                AwsIssuer::new(
                    &identity.region,
                    source.clone(),
                    config.lock.sts_endpoint.as_deref(),
                    clock.clone(),
                )
                .await,
            ),
            instance_id: identity.instance_id.clone(),
            deny,
            environment: env_rx.clone(),
        });
    }
    let told = class_roles.clone();
    let locker = Locker {
        issuer: AwsIssuer::new(
            &identity.region,
            source,
            config.lock.sts_endpoint.as_deref(),
            clock.clone(),
        )
        .await,
        instance: ImdsInstance { imds, configured },
        store,
        metrics: metrics.lock_series(None),
        clock,
        config: config.lock.clone(),
        template,
        environment: env_rx,
        recheck: config.discovery.interval,
        status: lock_status,
        ready,
        also_deny: served_roles,
        on_identity: Some(Box::new(move |identity| {
            told.set_instance_role(&identity.role.name)
        })),
        random: Arc::new(crate::clock::ThreadRandom),
    };
    tokio::join!(
        discoverer.run(shutdown.clone()),
        locker.run(shutdown),
        class_loops.join_all()
    );
}

async fn wait_for_identity(imds: &Imds, configured: Option<&RoleArn>) -> InstanceIdentity {
    let mut failures = 0;
    loop {
        match imds.identity(configured).await {
            Ok(identity) => {
                tracing::info!(
                    instance_id = %identity.instance_id,
                    region = %identity.region,
                    role = %identity.role,
                    "instance identity learned from IMDS"
                );
                return identity;
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures, rand::random::<f64>()).max(Duration::from_millis(500));
                tracing::warn!(error = %e, retry_in = ?wait, "cannot learn the instance identity yet");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
