//! The request path built from a [`RunConfig`] and the outside world.
//!
//! There is one wiring: the daemon hands [`wire`] the real world
//! ([`World::real`]: the probe's records, cgroupfs, Docker, STS, the real
//! IMDS, the answer pin), and the in-process tests hand it their fakes, so
//! what they test is the path that ships, with every task that keeps it
//! current (credential refresh and prefetch, container events, policy
//! reloads, the IMDSv1 mirror, the ID-token issuer's keys).

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    follow::{discover_account, follow_policy_file, prefetch_credentials},
    tasks::Tasks,
};
use crate::{
    attribution::{Attribution, CgroupDirectory, HostRelays, RecordSource, RelaySource},
    config::{self, RunConfig},
    credentials::{AwsSts, CallerIdentity, CredentialCache, InstrumentedSts, Sts},
    identity::{
        docker::{DockerRuntime, DOCKER_TIMEOUT},
        id_token::{Discovery, IdTokens, KeySource},
        ContainerRuntime, Identities, RuntimeKind, Runtimes,
    },
    kernel::{cgroup::CgroupPaths, probe::Probe, wire::AnswerPath},
    model::ids::AccountId,
    ops::{
        connlog::ConnLog,
        metrics::{Readiness, RequestMetrics},
    },
    policy::{file::PolicyFile, Policy},
    server::{ConnectionCount, Pipeline},
    surface::{
        upstream::{HttpUpstream, Upstream},
        Imdsv1Gate, Surface, SurfaceOptions, TokenKey,
    },
};

/// How many recent connections the admin API keeps.
const RECENT_CONNECTIONS: usize = 4096;

/// How long before credentials expire the cache renews them.
const REFRESH_AHEAD: Duration = Duration::from_secs(60);

/// The outside world the request path talks to.
pub struct World {
    /// The kernel's record of each redirected connect.
    pub records: Arc<dyn RecordSource>,
    /// cgroup ids to paths.
    pub cgroups: Arc<dyn CgroupDirectory>,
    /// Which user-space relay opened a translated connection.
    pub relays: Arc<dyn RelaySource>,
    /// The container runtimes' APIs.
    pub runtimes: Runtimes,
    /// STS, with the instance profile's credentials.
    pub sts: Arc<dyn Sts>,
    /// The real IMDS.
    pub upstream: Arc<dyn Upstream>,
    /// Where answers to containers are pinned to their own port.
    pub answers: Arc<dyn AnswerPath>,
    /// The ID-token issuer's keys, when `--oidc-issuer` is set.
    pub issuer_keys: Option<Arc<dyn KeySource>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").finish_non_exhaustive()
    }
}

impl World {
    /// The world the daemon runs in: `probe` attached, the cgroup2 mount at
    /// `mount`.
    pub async fn real(
        config: &RunConfig,
        probe: Arc<Probe>,
        mount: PathBuf,
        answers: Arc<dyn AnswerPath>,
    ) -> anyhow::Result<Self> {
        let issuer_keys = match &config.oidc {
            Some(oidc) => Some(Arc::new(
                Discovery::new(oidc.rules.issuer.clone())
                    .context("--oidc-issuer: the HTTPS client")?,
            ) as Arc<dyn KeySource>),
            None => None,
        };
        Ok(Self {
            records: probe,
            cgroups: Arc::new(CgroupPaths::new(mount)),
            relays: Arc::new(HostRelays),
            runtimes: config
                .runtimes
                .iter()
                .map(|r| {
                    let runtime: Arc<dyn ContainerRuntime> = Arc::new(
                        match &r.socket {
                            None => DockerRuntime::default(),
                            Some(socket) => DockerRuntime::at(socket, DOCKER_TIMEOUT),
                        }
                        .named(r.kind),
                    );
                    (r.kind, runtime)
                })
                .collect(),
            sts: Arc::new(AwsSts::from_env().await),
            upstream: Arc::new(HttpUpstream::from_env()),
            answers,
            issuer_keys,
        })
    }
}

/// What is checked and loaded before anything is attached or bound: a
/// policy file that does not load, or a state directory that cannot hold
/// the token key, stops the daemon with nothing changed.
pub struct Prepared {
    account: Arc<OnceLock<AccountId>>,
    policy: Arc<Policy>,
    tokens: TokenKey,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

impl Prepared {
    pub fn load(config: &RunConfig, readiness: &Readiness) -> anyhow::Result<Self> {
        let account = Arc::new(OnceLock::new());
        // With --oidc-required the daemon needs no AWS credentials of its
        // own: jobs' tokens are all that buys roles.
        if !config.oidc.as_ref().is_some_and(|o| o.required) {
            readiness.own_credentials(account.clone());
        }
        for runtime in &config.runtimes {
            if let Some(socket) = &runtime.socket {
                let flag = match runtime.kind {
                    RuntimeKind::Docker => "--docker-host",
                    RuntimeKind::Podman => "--podman-host",
                };
                config::check_runtime_socket(flag, socket)?;
            }
        }
        let policy = load_policy(config, account.clone())?;
        let tokens = TokenKey::load_or_create(&config.state_dir)
            .with_context(|| format!("token key in --state-dir {}", config.state_dir.display()))?;
        Ok(Self {
            account,
            policy,
            tokens,
        })
    }
}

/// The request path, and the parts status, metrics and the admin socket
/// read.
pub struct Wired {
    pub pipeline: Arc<Pipeline>,
    pub policy: Arc<Policy>,
    pub sts: Arc<InstrumentedSts>,
    pub credentials: Arc<CredentialCache>,
    pub identities: Arc<Identities>,
    pub imdsv1: Arc<Imdsv1Gate>,
    pub count: Arc<ConnectionCount>,
    pub connections: Arc<ConnLog>,
    pub requests: RequestMetrics,
    /// The instance profile's identity, once STS has told it.
    pub me: Arc<OnceLock<CallerIdentity>>,
}

impl std::fmt::Debug for Wired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wired").finish_non_exhaustive()
    }
}

/// Builds the request path on `world` and starts, in `tasks`, what keeps it
/// current.
pub async fn wire(
    config: &RunConfig,
    prepared: Prepared,
    world: World,
    tasks: &mut Tasks,
    readiness: &Readiness,
) -> anyhow::Result<Wired> {
    let Prepared {
        account,
        policy,
        tokens,
    } = prepared;
    let sts = Arc::new(InstrumentedSts::new(world.sts));
    let me = Arc::new(OnceLock::new());
    tasks.spawn_finite(
        "account discovery",
        discover_account(sts.clone(), account, me.clone()),
    );
    let credentials = Arc::new(CredentialCache::new(sts.clone()));
    tasks.spawn(
        "credential refresh",
        credentials.clone().refresh_ahead(REFRESH_AHEAD),
    );

    let mut identities = Identities::of(world.runtimes);
    if let Some(oidc) = &config.oidc {
        let keys = world
            .issuer_keys
            .context("--oidc-issuer is set, but there is no source of the issuer's keys")?;
        let tokens = Arc::new(IdTokens::new(oidc.rules.clone(), keys));
        let fetched = tokens.clone();
        readiness.id_tokens(Arc::new(move || fetched.ready()));
        tasks.spawn("issuer keys", tokens.clone().follow_keys());
        identities = identities.with_id_tokens(tokens);
    }
    let identities = Arc::new(identities);
    let docker = identities.clone();
    readiness.runtimes(Arc::new(move || match docker.unreachable() {
        None => Ok(()),
        Some(RuntimeKind::Docker) => Err("the Docker API is not reachable"),
        Some(RuntimeKind::Podman) => Err("the Podman API is not reachable"),
    }));
    // Subscribe before the events follower starts, so no start is missed.
    tasks.spawn(
        "credential prefetch",
        prefetch_credentials(
            credentials.clone(),
            identities.subscribe(),
            policy.clone(),
            identities.clone(),
        ),
    );
    tasks.spawn("container events", identities.clone().follow_events());
    tasks.spawn(
        "policy reload",
        follow_policy_file(policy.clone(), config.policy_file.clone()),
    );

    let upstream = world.upstream;
    let imdsv1 = Arc::new(Imdsv1Gate::new(config.imdsv1));
    imdsv1.check(upstream.as_ref()).await;
    tasks.spawn("imdsv1 mirror", imdsv1.clone().follow(upstream.clone()));

    let connections = Arc::new(ConnLog::new(RECENT_CONNECTIONS));
    let count = Arc::new(ConnectionCount::new(config.limits));
    let requests = RequestMetrics::default();
    let pipeline = Arc::new(Pipeline {
        answers: world.answers,
        count: count.clone(),
        attribution: Attribution::new(world.records, world.cgroups, world.relays),
        surface: Surface {
            identities: identities.clone(),
            policy: policy.clone(),
            credentials: credentials.clone(),
            tokens,
            upstream,
            options: SurfaceOptions {
                imdsv1: imdsv1.clone(),
                container_credentials: config.container_credentials_options.clone(),
            },
        },
        connections: connections.clone(),
        metrics: requests.clone(),
    });
    Ok(Wired {
        pipeline,
        policy,
        sts,
        credentials,
        identities,
        imdsv1,
        count,
        connections,
        requests,
        me,
    })
}

/// The role policy from the flags and, if given, the policy file: never
/// started on a file that does not load (fail with its line rather than
/// serve without the rules the admin wrote), nor on one that someone other
/// than root could rewrite.
fn load_policy(
    config: &RunConfig,
    account: Arc<OnceLock<AccountId>>,
) -> anyhow::Result<Arc<Policy>> {
    let policy = Arc::new(
        match &config.oidc {
            Some(oidc) if oidc.required => {
                Policy::new(&config.allow_role, &config.allow_host_cgroup, account)?
                    .with_token_required(oidc.rules.variable)
            }
            _ => Policy::new(&config.allow_role, &config.allow_host_cgroup, account)?,
        }
        .with_session(config.session.clone())
        .with_container_types(config.role_container_types.clone()),
    );
    if let Some(path) = &config.policy_file {
        let file = PolicyFile::load(path).context("--policy-file")?;
        config::check_policy_file(path)?;
        tracing::info!(path = %path.display(), rules = file.rules(), "policy file loaded");
        policy.set_file(Some(file));
    }
    Ok(policy)
}
