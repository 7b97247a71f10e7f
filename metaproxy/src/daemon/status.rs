//! What the daemon reports: the admin socket's status and live figures,
//! `policy explain`, and the startup summary.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use crate::{
    config::RunConfig,
    credentials::CredKey,
    credentials::{CallerIdentity, CredentialCache, Sts},
    identity::Identities,
    kernel::{guard::GuardState, probe::Probe},
    model::ids::RoleArn,
    model::session::{Session, SessionOptions},
    ops::admin::{
        AwsStatus, ConnectionStatus, GuardRoute, GuardStatus, Layer2Status, MapStatus, RoleTrial,
        Status, Trial,
    },
    ops::{
        admin::{self, StatusSource},
        metrics::{Live, LiveSource, Readiness, RequestMetrics},
    },
    policy::Policy,
    server::ConnectionCount,
    surface::Imdsv1Gate,
};

/// `metaproxy policy explain`: the daemon's own policy, applied to a
/// container Docker names.
pub(super) struct PolicyExplainer {
    pub(super) identities: Arc<Identities>,
    pub(super) policy: Arc<Policy>,
}

impl admin::Explainer for PolicyExplainer {
    fn explain<'a>(&'a self, container: &'a str) -> futures_util::future::BoxFuture<'a, String> {
        Box::pin(async move {
            match self.identities.find(container).await {
                Ok(Some(c)) => {
                    let token = self.identities.id_token(&c).await;
                    self.policy.explain(&c, &token)
                }
                Ok(None) => format!("no container {container} is known to Docker\n"),
                Err(e) => format!("cannot ask Docker about {container}: {e}\n"),
            }
        })
    }
}

/// `metaproxy doctor`'s dry AssumeRole: session `metaproxy-doctor`, the
/// shortest duration, a tag and SourceIdentity when those options are on
/// (so the trust policy's sts:TagSession and sts:SetSourceIdentity are
/// tried too); the credentials are dropped at once.
pub(super) struct RoleTrier {
    pub(super) sts: Arc<dyn Sts>,
    pub(super) session: SessionOptions,
}

impl RoleTrial for RoleTrier {
    fn try_role<'a>(
        &'a self,
        arn: &'a RoleArn,
        external_id: Option<&'a str>,
    ) -> futures_util::future::BoxFuture<'a, Trial> {
        Box::pin(async move {
            let key = CredKey {
                role_arn: arn.clone(),
                external_id: external_id.map(str::to_owned),
                session_name: "metaproxy-doctor".into(),
                session: Session {
                    tags: if self.session.tags.is_empty() {
                        Vec::new()
                    } else {
                        vec![("metaproxy-doctor".into(), "true".into())]
                    },
                    transitive: false,
                    source_identity: self
                        .session
                        .source_identity
                        .then(|| "metaproxy-doctor".into()),
                },
                id_token: None,
            };
            match self.sts.try_assume_role(&key).await {
                Ok(()) => Trial {
                    ok: true,
                    code: None,
                    message: None,
                },
                Err(e) => Trial {
                    ok: false,
                    code: match &e {
                        crate::credentials::CredentialsError::AssumeRole { code, .. } => {
                            code.clone()
                        }
                        _ => None,
                    },
                    message: Some(e.to_string()),
                },
            }
        })
    }
}

/// What the startup summary reports besides the live checks.
pub(super) struct Summary {
    pub(super) config: RunConfig,
    pub(super) mount: PathBuf,
    pub(super) target: PathBuf,
    pub(super) own: PathBuf,
    /// Other processes in the daemon's cgroup at start.
    pub(super) companions: usize,
    pub(super) docker: Arc<Identities>,
}

/// How long the summary waits for Docker and STS before it reports them
/// missing.
pub(super) const SUMMARY_WAIT: Duration = Duration::from_secs(10);

/// One line, once, with everything an admin checks after a start: what is
/// intercepted, where it listens, the policy, who the daemon is to AWS and
/// whether Docker answers. Waits for readiness (at most [`SUMMARY_WAIT`]).
pub(super) async fn summary(
    s: Summary,
    readiness: Arc<Readiness>,
    me: Arc<OnceLock<CallerIdentity>>,
) {
    let _ = tokio::time::timeout(SUMMARY_WAIT, async {
        while readiness.check().is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let c = &s.config;
    let aws = me.get().map_or_else(
        || "unknown: GetCallerIdentity has not succeeded yet".to_string(),
        |me| format!("account {} as {}", me.account, me.arn),
    );
    let ready = readiness.check();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        kernel = %kernel,
        cgroup2 = %s.mount.display(),
        attach_point = %s.target.display(),
        own_cgroup = %s.own.display(),
        shared_cgroup = %if s.companions == 0 {
            "no".to_string()
        } else {
            format!("with {} other processes (--allow-shared-cgroup): they bypass the redirect", s.companions)
        },
        listen = %c.listen,
        listen6 = %c.listen6.map_or_else(|| "off".to_string(), |a| a.to_string()),
        container_credentials = %if c.container_credentials.is_empty() {
            "off".to_string()
        } else {
            format!(
                "{} {}",
                c.container_credentials.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                c.container_credentials_options.path
            )
        },
        metrics = %c.metrics.map_or_else(|| "off".to_string(), |a| a.to_string()),
        admin_socket = %c.admin_socket.display(),
        allow_role = %list_or(&c.allow_role, "none: roles of the instance's own account that --policy-file allows"),
        allow_host_cgroup = %list_or(&c.allow_host_cgroup, "none (every host process refused)"),
        imdsv1 = ?c.imdsv1,
        policy_file = %c.policy_file.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string()),
        role_container_types = %c.role_container_types.join(","),
        session_tags = %if c.session.tags.is_empty() {
            "off".to_string()
        } else {
            c.session.tags.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join(",")
        },
        source_identity = c.session.source_identity,
        id_tokens = %c.oidc.as_ref().map_or_else(
            || "off".to_string(),
            |o| format!(
                "issuer {} (aud {}, variable {}): {}",
                o.rules.issuer,
                o.rules.audience,
                o.rules.variable,
                if o.required {
                    "required: jobs without a valid token get nothing, the instance profile assumes no job role"
                } else {
                    "jobs with a valid token get web-identity credentials, jobs without one AssumeRole"
                }
            )
        ),
        max_connections = c.limits.max_connections,
        max_connections_per_container = c.limits.max_connections_per_cgroup,
        aws_identity = %aws,
        docker = %if s.docker.reachable() { "reachable" } else { "unreachable" },
        ready = %ready.err().unwrap_or("yes"),
        "started"
    );
}

pub(super) fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(",")
    }
}

/// The daemon's parts that `GET /v1/status` and the metrics read.
pub(super) struct DaemonState {
    pub(super) probe: Arc<Probe>,
    pub(super) guard: Arc<GuardState>,
    pub(super) count: Arc<ConnectionCount>,
    pub(super) identities: Arc<Identities>,
    pub(super) credentials: Arc<CredentialCache>,
    pub(super) requests: RequestMetrics,
    pub(super) me: Arc<OnceLock<CallerIdentity>>,
    pub(super) imdsv1: Arc<Imdsv1Gate>,
}

impl StatusSource for DaemonState {
    fn status(&self) -> Status {
        let (pending, conns, slots) = self.probe.map_sizes();
        let (interfaces, mode) = self.probe.guarded_interfaces();
        let routes = self.guard.routes();
        Status {
            pid: std::process::id(),
            generation: self.probe.generation(),
            guard: GuardStatus {
                mode: mode.name().to_string(),
                routes: routes
                    .routed
                    .iter()
                    .map(|(addr, iface)| GuardRoute {
                        address: addr.to_string(),
                        interface: iface.name.clone(),
                        guarded: interfaces.iter().any(|i| i.index == iface.index),
                    })
                    .collect(),
                interfaces,
                unrouted: routes.unrouted.iter().map(ToString::to_string).collect(),
                dropped: self
                    .probe
                    .guard_drops()
                    .into_iter()
                    .map(|(kind, n)| (kind.name().to_string(), n))
                    .collect(),
            },
            layer2: Layer2Status {
                sockets_refused: self.probe.l2_socket_hook().is_ok(),
                gap: crate::kernel::lsm::layer2_gap(self.probe.l2_socket_hook()),
                refused: self
                    .probe
                    .l2_refusals()
                    .into_iter()
                    .map(|(kind, n)| (kind.name().to_string(), n))
                    .collect(),
            },
            maps: MapStatus {
                pending,
                conns,
                slots,
            },
            connections: ConnectionStatus {
                open: self.count.open(),
                largest_per_container: self.count.largest_per_cgroup(),
                shed: self.requests.shed.get(),
            },
            aws: AwsStatus {
                identity: self.me.get().map(|me| me.arn.clone()),
                account: self.me.get().map(|me| me.account.to_string()),
                instance_requires_tokens: self.imdsv1.instance_requires_tokens(),
            },
        }
    }
}

impl LiveSource for DaemonState {
    fn live(&self) -> Live {
        let (pending, conns, slots) = self.probe.map_sizes();
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let mut guard_drops = [0; metaproxy_common::GUARD_DROP_KINDS as usize];
        for (kind, count) in self.probe.guard_drops() {
            guard_drops[kind as usize] = count;
        }
        let mut l2_refusals = [0; metaproxy_common::L2_REFUSAL_KINDS as usize];
        for (kind, count) in self.probe.l2_refusals() {
            l2_refusals[kind as usize] = count;
        }
        let (pins_restored, links_reattached) = self.probe.repairs_counted();
        Live {
            pins_restored,
            links_reattached,
            guard_drops,
            l2_refusals,
            l2_sockets_refused: self.probe.l2_socket_hook().is_ok(),
            guard_interfaces: n(self.probe.guarded_interfaces().0.len()),
            open_connections: n(self.count.open()),
            largest_per_container: n(self.count.largest_per_cgroup()),
            identity_cache: n(self.identities.cached()),
            credential_cache: n(self.credentials.len()),
            map_pending: n(pending),
            map_conns: n(conns),
            map_slots: n(slots),
            probe_generation: self.probe.generation(),
            log_lines_dropped: crate::ops::logging::dropped_lines(),
            docker_reachable: self.identities.reachable(),
        }
    }
}
