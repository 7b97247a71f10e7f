//! The validated run configuration: `metaproxy run`'s arguments checked
//! once, before anything is attached or bound. The daemon's wiring takes
//! only a [`RunConfig`].

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
};

use crate::{
    cli::{self, RunArgs},
    server::Limits,
    session::SessionOptions,
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
}

/// The addresses SDKs accept for the container-credentials endpoint.
pub const CONTAINER_CREDENTIALS_ADDRS: [IpAddr; 3] = [
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
];

impl RunConfig {
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
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
            allow_role: args.allow_role.clone(),
            imdsv1: match (args.require_imdsv2, args.imdsv1) {
                (true, _) | (false, cli::Imdsv1::Refuse) => Imdsv1Mode::Refuse,
                (false, cli::Imdsv1::Mirror) => Imdsv1Mode::Mirror,
                (false, cli::Imdsv1::Allow) => Imdsv1Mode::Allow,
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
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(args: &[&str]) -> Result<RunConfig, ConfigError> {
        let cli = Cli::try_parse_from(["metaproxy", "run"].iter().chain(args)).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        RunConfig::from_args(&run)
    }

    #[test]
    fn imdsv1_mirrors_the_instance_unless_told_otherwise() {
        assert_eq!(config(&[]).unwrap().imdsv1, Imdsv1Mode::Mirror);
        assert_eq!(
            config(&["--imdsv1", "allow"]).unwrap().imdsv1,
            Imdsv1Mode::Allow
        );
        assert_eq!(
            config(&["--require-imdsv2"]).unwrap().imdsv1,
            Imdsv1Mode::Refuse
        );
        assert_eq!(
            config(&["--imdsv1", "allow", "--require-imdsv2"])
                .unwrap()
                .imdsv1,
            Imdsv1Mode::Refuse
        );
    }

    #[test]
    fn listen_addresses_are_checked_once() {
        let ok = config(&["--listen6", "[fd00:ec2::1]:8169"]).unwrap();
        assert_eq!(ok.listen.to_string(), cli::DEFAULT_LISTEN);
        assert!(ok.listen6.is_some());
        assert_eq!(ok.metrics, Some("127.0.0.1:9169".parse().unwrap()));
        assert_eq!(config(&["--metrics", "off"]).unwrap().metrics, None);
        assert_eq!(
            ok.container_credentials,
            &CONTAINER_CREDENTIALS_ADDRS[..2],
            "169.254.170.2 and .23 by default"
        );
        assert!(config(&["--container-credentials", "off"])
            .unwrap()
            .container_credentials
            .is_empty());
        for (args, msg) in [
            (&["--listen", "127.0.0.1:1"][..], "loopback"),
            (&["--listen", "0.0.0.0:1"][..], "unspecified"),
            (
                &["--listen", "169.254.169.254:80"][..],
                "metadata service itself",
            ),
            (&["--listen", "[fd00::1]:1"][..], "must be an IPv4"),
            (&["--listen6", "169.254.170.1:1"][..], "must be an IPv6"),
            (&["--metrics", "9169"][..], "expected ADDRESS:PORT"),
            (
                &["--container-credentials", "169.254.170.3"][..],
                "expected a comma-separated list",
            ),
            (
                &["--container-credentials", "fd00:ec2::23"][..],
                "needs an IPv6 listener",
            ),
            (
                &["--container-credentials-path", "/v1/../creds"][..],
                "plain absolute path",
            ),
            (&["--metrics", "0.0.0.0:9169"][..], "containers reach"),
            (
                &["--listen", "10.9.9.9:80", "--metrics", "10.9.9.9:9169"][..],
                "containers reach",
            ),
        ] {
            let err = config(args).unwrap_err().to_string();
            assert!(err.contains(msg), "{args:?}: {err}");
        }
    }
}
