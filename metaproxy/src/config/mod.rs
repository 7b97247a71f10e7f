//! The validated run configuration: `metaproxy run`'s flags ([`flags`])
//! checked once, before anything is attached or bound. The daemon's
//! wiring takes only a [`RunConfig`]; `cli` parses, `doctor` reads the
//! settings file through the same checks.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::RangeInclusive,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub mod flags;

use flags::{Imdsv1, RunArgs};

use crate::{
    identity::{
        id_token::{discovery::issuer_url, IssuerUrlError, TokenRules},
        RuntimeKind,
    },
    model::session::SessionOptions,
    server::Limits,
    surface::{ContainerCredentialsOptions, Imdsv1Mode},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{flag} {ip}: must be a unicast address containers can reach (not loopback or unspecified)"
    )]
    Unreachable { flag: &'static str, ip: IpAddr },
    #[error("{flag} cannot be the metadata service itself")]
    IsImds { flag: &'static str },
    #[error("--listen must be an IPv4 address, got {0}")]
    NotIpv4(SocketAddr),
    #[error("--listen6 must be an IPv6 address, got {0}")]
    NotIpv6(SocketAddr),
    #[error("--container-credentials {0:?}: expected a comma-separated list of 169.254.170.2, 169.254.170.23 and fd00:ec2::23, or off")]
    ContainerCredentials(String),
    #[error("--container-credentials {0}: an IPv6 address needs an IPv6 listener (--listen6)")]
    ContainerCredentialsNeedsListen6(IpAddr),
    #[error(
        "--container-credentials-path {0:?}: must be a plain absolute path such as /v1/credentials"
    )]
    ContainerCredentialsPath(String),
    #[error("--session-tag-name {0}")]
    SessionTagName(String),
    #[error("--metrics {0:?}: expected ADDRESS:PORT (such as 127.0.0.1:9169) or off")]
    Metrics(String),
    #[error("--metrics {0}: containers reach that address; give loopback or a private address of the host's own")]
    MetricsOnListen(SocketAddr),
    #[error(
        "no role allow-list: without one, a job on a runner that forgot IAM_ROLE in its environment could choose any role of the instance's account; \
         say which roles jobs may have at all with --allow-role 'arn:aws:iam::123456789012:role/ci-*' \
         (METAPROXY_ALLOW_ROLE in /etc/default/metaproxy), or with --policy-file FILE (METAPROXY_POLICY_FILE)"
    )]
    NoRoleAllowList,
    #[error(
        "{flag} port {port} is in the kernel's ephemeral port range {first}-{last} (net.ipv4.ip_local_port_range): \
         any local process can be given it by connect() or listen() on an unbound socket, which the bind guard cannot see; \
         pick a port outside that range (the default is 8169), or reserve it (sysctl net.ipv4.ip_local_reserved_ports={port})"
    )]
    EphemeralPort {
        flag: &'static str,
        port: u16,
        first: u16,
        last: u16,
    },
    #[error(
        "the kernel's ephemeral port range {first}-{last} (net.ipv4.ip_local_port_range) overlaps the redirect's slots {slot_first}-{slot_last} \
         (each connect to IMDS is sent to a port of its own on the listen address, so that address translation keeps it): \
         a host process given such a port for its own connect could be connected to itself; \
         start the range above {slot_last} (sysctl net.ipv4.ip_local_port_range=\"32768 60999\", the kernel's default) \
         or reserve the slots (sysctl net.ipv4.ip_local_reserved_ports={slot_first}-{slot_last})"
    )]
    EphemeralSlots {
        first: u16,
        last: u16,
        slot_first: u16,
        slot_last: u16,
    },
    #[error("--listen port {port} is one of the redirect's slots {slot_first}-{slot_last}: pick a port outside them (the default is 8169)")]
    ListenOnSlot {
        port: u16,
        slot_first: u16,
        slot_last: u16,
    },
    #[error("cannot read the kernel's ephemeral port range ({0}) to check --listen against it")]
    PortRange(String),
    #[error(
        "--policy-file {path}: {why}; whoever can write it chooses the roles jobs get: \
         make the file and its directories root's and not writable by group or others (chown root: FILE; chmod go-w FILE)"
    )]
    PolicyFileUnsafe { path: PathBuf, why: String },
    #[error("{flag} {value:?}: expected a Unix socket, as unix:///PATH or /PATH{off}")]
    RuntimeHost {
        flag: &'static str,
        value: String,
        off: &'static str,
    },
    #[error("--docker-host off and no --podman-host: no container could ever get a role")]
    NoRuntime,
    #[error(
        "{flag} {path}: {why}; whoever can put a socket there answers for every container of that runtime (their labels, environment, roles): \
         give the socket of a root service in root-owned directories (rootless Podman is not supported)"
    )]
    RuntimeSocketUnsafe {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--oidc-issuer {0}")]
    OidcIssuer(IssuerUrlError),
    #[error("--oidc-audience: give the audience the jobs' id_tokens name (aud:), such as sts.amazonaws.com")]
    OidcAudience,
    #[error("--oidc-token-variable {0:?}: expected a variable name (letters, digits and _, not starting with a digit)")]
    OidcTokenVariable(String),
    #[error("--oidc-required needs --oidc-issuer: the GitLab instance whose ID tokens jobs carry")]
    OidcRequiredWithoutIssuer,
    #[error("--oidc-required needs --allow-role: without it only roles of the instance profile's account are allowed, and a daemon that needs no credentials of its own may never learn that account")]
    OidcRequiredWithoutAllowRole,
}

/// GitLab ID tokens, when `--oidc-issuer` is set.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub rules: TokenRules,
    /// `--oidc-required`.
    pub required: bool,
}

/// Everything `metaproxy run` needs, checked.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// cgroup v2 directory to intercept; `None`: the cgroup2 mount's root.
    pub cgroup: Option<PathBuf>,
    pub listen: SocketAddrV4,
    pub listen6: Option<SocketAddrV6>,
    pub allow_role: Vec<String>,
    pub imdsv1: Imdsv1Mode,
    pub limits: Limits,
    pub allow_host_cgroup: Vec<String>,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// The metrics and health listener, unless turned off.
    pub metrics: Option<SocketAddr>,
    /// Container-credentials endpoint addresses to redirect (port 80).
    pub container_credentials: Vec<IpAddr>,
    pub container_credentials_options: ContainerCredentialsOptions,
    pub session: SessionOptions,
    pub policy_file: Option<PathBuf>,
    pub role_container_types: Vec<String>,
    /// Start even though other processes share the daemon's cgroup (and so
    /// bypass the redirect).
    pub allow_shared_cgroup: bool,
    pub oidc: Option<OidcConfig>,
    /// The container runtimes followed, each at its API socket.
    pub runtimes: Vec<RuntimeSocket>,
}

/// A container runtime's API socket; `None`: Docker's defaults
/// (`DOCKER_HOST`, else `/var/run/docker.sock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSocket {
    pub kind: RuntimeKind,
    pub socket: Option<PathBuf>,
}

/// The addresses SDKs accept for the container-credentials endpoint.
pub const CONTAINER_CREDENTIALS_ADDRS: [IpAddr; 3] = [
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];

/// What the configuration is checked against on this host, behind a trait
/// so that tests feed their own.
pub trait Host {
    /// The kernel's ephemeral ports, as `/proc/sys/net/ipv4/` has them.
    fn ephemeral_ports(&self) -> std::io::Result<EphemeralPorts>;
}

/// The host the daemon runs on (its own network namespace's sysctls).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThisHost;

impl Host for ThisHost {
    fn ephemeral_ports(&self) -> std::io::Result<EphemeralPorts> {
        let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
        let range = read("ip_local_port_range")?;
        // Missing on kernels without reserved ports: nothing is reserved.
        let reserved = read("ip_local_reserved_ports").unwrap_or_default();
        EphemeralPorts::parse(&range, &reserved).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("ip_local_port_range {:?}", range.trim()),
            )
        })
    }
}

/// The ports the kernel hands out to unbound sockets (connect, listen):
/// `net.ipv4.ip_local_port_range` less `net.ipv4.ip_local_reserved_ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralPorts {
    pub range: RangeInclusive<u16>,
    pub reserved: Vec<RangeInclusive<u16>>,
}

impl EphemeralPorts {
    /// From the two sysctls' text: `"32768\t60999"` and `"8080,9000-9010"`.
    pub fn parse(range: &str, reserved: &str) -> Option<Self> {
        let mut ends = range.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(first)), Some(Ok(last)), None) = (ends.next(), ends.next(), ends.next())
        else {
            return None;
        };
        let mut held = Vec::new();
        for item in reserved.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            held.push(a.trim().parse().ok()?..=b.trim().parse().ok()?);
        }
        Some(Self {
            range: first..=last,
            reserved: held,
        })
    }

    /// Whether an unbound socket may be given `port`.
    pub fn hands_out(&self, port: u16) -> bool {
        self.range.contains(&port) && !self.reserved.iter().any(|r| r.contains(&port))
    }
}

/// The ID-token flags, checked.
fn oidc(args: &RunArgs) -> Result<Option<OidcConfig>, ConfigError> {
    let Some(issuer) = args
        .oidc_issuer
        .as_deref()
        .map(str::trim)
        .filter(|i| !i.is_empty())
    else {
        if args.oidc_required {
            return Err(ConfigError::OidcRequiredWithoutIssuer);
        }
        return Ok(None);
    };
    let issuer = issuer_url(issuer).map_err(ConfigError::OidcIssuer)?;
    let audience = args.oidc_audience.trim();
    if audience.is_empty() {
        return Err(ConfigError::OidcAudience);
    }
    let variable = args.oidc_token_variable.trim();
    let name_like = variable
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && variable
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !name_like {
        return Err(ConfigError::OidcTokenVariable(variable.to_string()));
    }
    if args.oidc_required && !args.allow_role.iter().any(|r| !r.trim().is_empty()) {
        return Err(ConfigError::OidcRequiredWithoutAllowRole);
    }
    Ok(Some(OidcConfig {
        rules: TokenRules {
            issuer,
            audience: audience.to_string(),
            // Named once for the daemon's life; refusals quote it.
            variable: Box::leak(variable.to_string().into_boxed_str()),
        },
        required: args.oidc_required,
    }))
}

impl RunConfig {
    /// Checks `args` against this host.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        Self::from_args_on(args, &ThisHost)
    }

    /// Checks `args` against `host`.
    pub fn from_args_on(args: &RunArgs, host: &dyn Host) -> Result<Self, ConfigError> {
        // Fail closed: a forgotten `IAM_ROLE` in a runner's environment
        // must not let its jobs pick any role of the account.
        let allow_role: Vec<String> = args
            .allow_role
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        if allow_role.is_empty() && args.policy_file.is_none() {
            return Err(ConfigError::NoRoleAllowList);
        }
        check_listen(args.listen.ip(), "--listen")?;
        let SocketAddr::V4(listen) = args.listen else {
            return Err(ConfigError::NotIpv4(args.listen));
        };
        let listen6 = match args.listen6 {
            None => None,
            Some(l6) => {
                check_listen(l6.ip(), "--listen6")?;
                let SocketAddr::V6(l6) = l6 else {
                    return Err(ConfigError::NotIpv6(l6));
                };
                Some(l6)
            }
        };
        let ports = host
            .ephemeral_ports()
            .map_err(|e| ConfigError::PortRange(e.to_string()))?;
        let listens = [("--listen", Some(args.listen.port()))]
            .into_iter()
            .chain([("--listen6", listen6.map(|l| l.port()))]);
        for (flag, port) in listens {
            if let Some(port) = port.filter(|p| ports.hands_out(*p)) {
                return Err(ConfigError::EphemeralPort {
                    flag,
                    port,
                    first: *ports.range.start(),
                    last: *ports.range.end(),
                });
            }
        }
        let (slot_first, slot_last) = (
            metaproxy_common::SLOT_BASE_DEFAULT,
            metaproxy_common::SLOT_BASE_DEFAULT + (metaproxy_common::SLOT_COUNT_DEFAULT - 1),
        );
        if (slot_first..=slot_last).contains(&listen.port()) {
            return Err(ConfigError::ListenOnSlot {
                port: listen.port(),
                slot_first,
                slot_last,
            });
        }
        if (slot_first..=slot_last).any(|p| ports.hands_out(p)) {
            return Err(ConfigError::EphemeralSlots {
                first: *ports.range.start(),
                last: *ports.range.end(),
                slot_first,
                slot_last,
            });
        }
        let metrics = match args.metrics.trim() {
            "off" | "" => None,
            addr => {
                let addr: SocketAddr = addr
                    .parse()
                    .map_err(|_| ConfigError::Metrics(addr.to_string()))?;
                let on_listen = addr.ip().is_unspecified()
                    || addr.ip() == IpAddr::V4(*listen.ip())
                    || listen6.is_some_and(|l6| addr.ip() == IpAddr::V6(*l6.ip()));
                if on_listen {
                    return Err(ConfigError::MetricsOnListen(addr));
                }
                Some(addr)
            }
        };
        let container_credentials = match args.container_credentials.trim() {
            "off" | "" => Vec::new(),
            list => {
                let mut addrs = Vec::new();
                for item in list.split(',').map(str::trim) {
                    let ip: IpAddr = item
                        .parse()
                        .ok()
                        .filter(|ip| CONTAINER_CREDENTIALS_ADDRS.contains(ip))
                        .ok_or_else(|| ConfigError::ContainerCredentials(item.to_string()))?;
                    if ip.is_ipv6() && listen6.is_none() {
                        return Err(ConfigError::ContainerCredentialsNeedsListen6(ip));
                    }
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                addrs
            }
        };
        let path = &args.container_credentials_path;
        let plain = path.starts_with('/')
            && path.len() <= 256
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
            && !path.contains("//")
            && !path.split('/').any(|seg| seg == "." || seg == "..");
        if !plain {
            return Err(ConfigError::ContainerCredentialsPath(path.clone()));
        }
        let session = SessionOptions {
            tags: if args.session_tags {
                SessionOptions::all_tags(&args.session_tag_name)
                    .map_err(ConfigError::SessionTagName)?
            } else {
                Vec::new()
            },
            transitive: args.transitive_session_tags,
            source_identity: args.source_identity,
        };
        Ok(Self {
            runtimes: runtimes(args)?,
            oidc: oidc(args)?,
            policy_file: args.policy_file.clone(),
            role_container_types: args
                .role_container_types
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            session,
            container_credentials,
            container_credentials_options: ContainerCredentialsOptions {
                path: path.clone(),
                require_auth: args.container_credentials_require_auth,
            },
            metrics,
            cgroup: args.cgroup.clone(),
            listen,
            listen6,
            allow_role,
            allow_shared_cgroup: args.allow_shared_cgroup,
            imdsv1: match (args.require_imdsv2, args.imdsv1) {
                (true, _) | (false, Imdsv1::Refuse) => Imdsv1Mode::Refuse,
                (false, Imdsv1::Mirror) => Imdsv1Mode::Mirror,
                (false, Imdsv1::Allow) => Imdsv1Mode::Allow,
            },
            allow_host_cgroup: args.allow_host_cgroup.clone(),
            limits: Limits {
                max_connections: args.max_connections.max(1),
                max_connections_per_cgroup: args.max_connections_per_container.max(1),
            },
            state_dir: args.state_dir.clone(),
            pin_dir: args.pins.pin_dir.clone(),
            admin_socket: args.admin.admin_socket.clone(),
        })
    }
}

/// The runtimes `--docker-host` and `--podman-host` name.
fn runtimes(args: &RunArgs) -> Result<Vec<RuntimeSocket>, ConfigError> {
    let socket = |flag: &'static str, value: &str, off: &'static str| {
        let path = value.strip_prefix("unix://").unwrap_or(value);
        let plain = path.starts_with('/') && !path.split('/').any(|s| s == "..");
        plain
            .then(|| PathBuf::from(path))
            .ok_or_else(|| ConfigError::RuntimeHost {
                flag,
                value: value.to_string(),
                off,
            })
    };
    let listed = |values: &[String]| -> Vec<String> {
        values
            .iter()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let docker = listed(&args.docker_host);
    let mut runtimes = Vec::new();
    if docker.is_empty() {
        runtimes.push(RuntimeSocket {
            kind: RuntimeKind::Docker,
            socket: None,
        });
    } else if docker != ["off"] {
        for value in &docker {
            runtimes.push(RuntimeSocket {
                kind: RuntimeKind::Docker,
                socket: Some(socket("--docker-host", value, ", or off")?),
            });
        }
    }
    for value in listed(&args.podman_host) {
        runtimes.push(RuntimeSocket {
            kind: RuntimeKind::Podman,
            socket: Some(socket("--podman-host", &value, "")?),
        });
    }
    if runtimes.is_empty() {
        return Err(ConfigError::NoRuntime);
    }
    Ok(runtimes)
}

/// Refuses a policy file that anyone but root could change: the file, or
/// any directory on the way to it (as given and with symlinks resolved),
/// owned by another user, or writable by group or others (a directory with
/// the sticky bit, such as /tmp, may be: nobody else can replace root's
/// entries in it).
pub fn check_policy_file(path: &Path) -> Result<(), ConfigError> {
    check_policy_file_with(path, &|p| {
        let m = std::fs::symlink_metadata(p)?;
        Ok(Owner {
            uid: m.uid(),
            mode: m.permissions().mode(),
            kind: if m.file_type().is_symlink() {
                Kind::Symlink
            } else if m.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            },
        })
    })
}

/// Refuses a runtime socket (`--docker-host`, `--podman-host`) that
/// someone other than root could put in place: any existing directory on
/// the way to it (as given and resolved) owned by another user or writable
/// by group or others (sticky directories aside), or a socket owned by
/// another user. Directories that do not exist yet can only be made by
/// whoever may write their existing parent, which is then checked.
pub fn check_runtime_socket(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    check_runtime_socket_with(flag, path, &|p| {
        let m = std::fs::symlink_metadata(p)?;
        Ok(Owner {
            uid: m.uid(),
            mode: m.permissions().mode(),
            kind: if m.file_type().is_symlink() {
                Kind::Symlink
            } else if m.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            },
        })
    })
}

fn check_runtime_socket_with(
    flag: &'static str,
    path: &Path,
    lookup: &dyn Fn(&Path) -> std::io::Result<Owner>,
) -> Result<(), ConfigError> {
    let unsafe_because = |why: String| ConfigError::RuntimeSocketUnsafe {
        flag,
        path: path.to_path_buf(),
        why,
    };
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    for (n, p) in path.ancestors().chain(resolved.ancestors()).enumerate() {
        let o = match lookup(p) {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(unsafe_because(format!(
                    "cannot look at {}: {e}",
                    p.display()
                )))
            }
        };
        // The socket's group may connect (docker's group): only its owner
        // matters. Every directory above it is judged as a policy file's.
        let why = if n == 0 || p == resolved {
            (o.uid != 0).then(|| format!("is owned by uid {}, not root", o.uid))
        } else {
            unsafe_owner(o)
        };
        if let Some(why) = why {
            return Err(unsafe_because(format!("{} {why}", p.display())));
        }
    }
    Ok(())
}

/// Who owns a path (not following a symlink) and what its mode allows.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    mode: u32,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

fn check_policy_file_with(
    path: &Path,
    lookup: &dyn Fn(&Path) -> std::io::Result<Owner>,
) -> Result<(), ConfigError> {
    let unsafe_because = |why: String| ConfigError::PolicyFileUnsafe {
        path: path.to_path_buf(),
        why,
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| unsafe_because(format!("cannot resolve it: {e}")))?
            .join(path)
    };
    // The path as given (a symlink on it is judged by its owner), then the
    // file it resolves to, each with every directory above it.
    let resolved = std::fs::canonicalize(&absolute).unwrap_or_else(|_| absolute.clone());
    for p in absolute.ancestors().chain(resolved.ancestors()) {
        let o = lookup(p)
            .map_err(|e| unsafe_because(format!("cannot look at {}: {e}", p.display())))?;
        if let Some(why) = unsafe_owner(o) {
            return Err(unsafe_because(format!("{} {why}", p.display())));
        }
    }
    Ok(())
}

/// Why a path so owned lets someone other than root change the policy.
fn unsafe_owner(o: Owner) -> Option<String> {
    if o.uid != 0 {
        return Some(format!("is owned by uid {}, not root", o.uid));
    }
    let writable = o.mode & 0o022 != 0;
    let sticky = o.mode & 0o1000 != 0;
    match o.kind {
        // A symlink's own mode means nothing; only its owner may change it.
        Kind::Symlink => None,
        Kind::Dir if writable && !sticky => Some(format!(
            "is a directory writable by {} (mode {:o})",
            who_writes(o.mode),
            o.mode & 0o7777
        )),
        Kind::File if writable => Some(format!(
            "is writable by {} (mode {:o})",
            who_writes(o.mode),
            o.mode & 0o7777
        )),
        _ => None,
    }
}

fn who_writes(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

fn check_listen(ip: IpAddr, flag: &'static str) -> Result<(), ConfigError> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(ConfigError::Unreachable { flag, ip });
    }
    if ip == IpAddr::from([169, 254, 169, 254]) {
        return Err(ConfigError::IsImds { flag });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
