use clap::Parser as _;

use super::*;
use crate::cli::{Cli, Command};

/// A host whose ephemeral ports are Linux's defaults.
struct FakeHost(&'static str, &'static str);

impl Host for FakeHost {
    fn ephemeral_ports(&self) -> std::io::Result<EphemeralPorts> {
        EphemeralPorts::parse(self.0, self.1)
            .ok_or_else(|| std::io::Error::other(format!("bad range {:?}", self.0)))
    }
}

const LINUX: FakeHost = FakeHost("32768\t60999\n", "\n");

fn run_args(args: &[&str]) -> Box<RunArgs> {
    let cli = Cli::try_parse_from(["metaproxy", "run"].iter().chain(args)).unwrap();
    let Command::Run(run) = cli.command else {
        panic!("not run")
    };
    run
}

/// `metaproxy run ARGS` with a role allow-list, as every start needs.
fn config(args: &[&str]) -> Result<RunConfig, ConfigError> {
    let mut all = vec!["--allow-role", "arn:aws:iam::123456789012:role/ci-*"];
    all.extend_from_slice(args);
    RunConfig::from_args_on(&run_args(&all), &LINUX)
}

#[test]
fn run_refuses_to_start_without_a_role_allow_list() {
    for args in [
        &[][..],
        &["--allow-role", ""][..],
        &["--allow-role", " , "][..],
    ] {
        let err = RunConfig::from_args_on(&run_args(args), &LINUX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no role allow-list"), "{args:?}: {err}");
        assert!(
            err.contains("--allow-role 'arn:aws:iam::123456789012:role/ci-*'")
                && err.contains("METAPROXY_ALLOW_ROLE")
                && err.contains("--policy-file"),
            "the error names the fix: {err}"
        );
    }
    let listed = config(&[]).unwrap();
    assert_eq!(listed.allow_role, ["arn:aws:iam::123456789012:role/ci-*"]);
    let by_file = RunConfig::from_args_on(
        &run_args(&["--policy-file", "/etc/metaproxy/policy.toml"]),
        &LINUX,
    )
    .unwrap();
    assert!(by_file.allow_role.is_empty());
    assert!(by_file.policy_file.is_some());
}

#[test]
fn listen_ports_the_kernel_hands_to_unbound_sockets_are_refused() {
    assert_eq!(
        EphemeralPorts::parse("32768\t60999\n", "8080, 40000-40010\n"),
        Some(EphemeralPorts {
            range: 32768..=60999,
            reserved: vec![8080..=8080, 40000..=40010],
        })
    );
    for bad in ["", "32768", "a b", "1 2 3"] {
        assert_eq!(EphemeralPorts::parse(bad, ""), None, "{bad:?}");
    }
    for (args, flag) in [
        (
            &["--listen", "169.254.170.254:40000"][..],
            "--listen port 40000",
        ),
        (
            &["--listen6", "[fd00:ec2::1]:32768"][..],
            "--listen6 port 32768",
        ),
    ] {
        let err = config(args).unwrap_err().to_string();
        assert!(err.contains(flag), "{err}");
        assert!(
            err.contains("ephemeral port range 32768-60999")
                && err.contains("ip_local_reserved_ports"),
            "{err}"
        );
    }
    assert!(config(&["--listen", "169.254.170.254:16383"]).is_ok());
    // The slots are the listen address's ports 16384-32767: not the
    // listener's own, and not the kernel's to hand out.
    let err = config(&["--listen", "169.254.170.254:32767"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one of the redirect's slots 16384-32767"),
        "{err}"
    );
    let wide = FakeHost("10000 65000", "8169");
    let args = run_args(&["--allow-role", "arn:aws:iam::123456789012:role/ci-*"]);
    let err = RunConfig::from_args_on(&args, &wide)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10000-65000") && err.contains("overlaps the redirect's slots 16384-32767"),
        "{err}"
    );
    let reserved = FakeHost("10000 65000", "8169,16384-32767");
    assert!(RunConfig::from_args_on(&args, &reserved).is_ok());
    // A reserved port is never handed out.
    let reserved = FakeHost("32768 60999", "40000");
    let args = run_args(&[
        "--allow-role",
        "arn:aws:iam::123456789012:role/ci-*",
        "--listen",
        "169.254.170.254:40000",
    ]);
    assert!(RunConfig::from_args_on(&args, &reserved).is_ok());
    // A range that cannot be read refuses the start.
    let unreadable = FakeHost("", "");
    let err = RunConfig::from_args_on(&args, &unreadable)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read the kernel's ephemeral port range"),
        "{err}"
    );
    // This very host's range parses.
    ThisHost.ephemeral_ports().unwrap();
}

#[test]
fn a_policy_file_anyone_but_root_can_change_is_refused() {
    use std::collections::HashMap;
    let fs = |entries: &[(&str, u32, u32, Kind)]| {
        let map: HashMap<PathBuf, Owner> = entries
            .iter()
            .map(|&(p, uid, mode, kind)| (PathBuf::from(p), Owner { uid, mode, kind }))
            .collect();
        move |p: &Path| {
            map.get(p)
                .copied()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    };
    let check = |entries: &[(&str, u32, u32, Kind)]| {
        check_policy_file_with(Path::new("/etc/mp/policy.toml"), &fs(entries))
            .map_err(|e| e.to_string())
    };
    let good = [
        ("/", 0, 0o755, Kind::Dir),
        ("/etc", 0, 0o755, Kind::Dir),
        ("/etc/mp", 0, 0o755, Kind::Dir),
        ("/etc/mp/policy.toml", 0, 0o644, Kind::File),
    ];
    assert_eq!(check(&good), Ok(()));
    // A sticky world-writable directory (such as /tmp) is fine.
    let mut sticky = good;
    sticky[2].2 = 0o1777;
    assert_eq!(check(&sticky), Ok(()));
    // A root-owned symlink on the way is judged by its owner only.
    let mut link = good;
    link[2] = ("/etc/mp", 0, 0o777, Kind::Symlink);
    assert_eq!(check(&link), Ok(()));
    for (i, uid, mode, kind, why) in [
        (
            3,
            0,
            0o664,
            Kind::File,
            "/etc/mp/policy.toml is writable by its group (mode 664)",
        ),
        (
            3,
            0,
            0o646,
            Kind::File,
            "/etc/mp/policy.toml is writable by others (mode 646)",
        ),
        (
            3,
            1000,
            0o600,
            Kind::File,
            "/etc/mp/policy.toml is owned by uid 1000, not root",
        ),
        (
            2,
            0,
            0o777,
            Kind::Dir,
            "/etc/mp is a directory writable by group and others (mode 777)",
        ),
        (
            1,
            1000,
            0o755,
            Kind::Dir,
            "/etc is owned by uid 1000, not root",
        ),
        (
            2,
            1000,
            0o777,
            Kind::Symlink,
            "/etc/mp is owned by uid 1000, not root",
        ),
    ] {
        let mut entries = good;
        entries[i] = (entries[i].0, uid, mode, kind);
        let err = check(&entries).unwrap_err();
        assert!(err.contains(why), "{why}: {err}");
        assert!(
            err.starts_with("--policy-file /etc/mp/policy.toml: "),
            "{err}"
        );
        assert!(err.contains("chmod go-w"), "the error names the fix: {err}");
    }
    // On the real filesystem: a file of ours with group write is
    // refused, whoever runs the test.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let err = check_policy_file(&file).unwrap_err().to_string();
    assert!(err.contains("policy.toml"), "{err}");
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
    assert_eq!(ok.listen.to_string(), flags::DEFAULT_LISTEN);
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

#[test]
fn id_tokens_are_off_unless_an_issuer_is_named_and_the_issuer_must_be_https() {
    assert!(config(&[]).unwrap().oidc.is_none());
    let err = config(&["--oidc-required"]).unwrap_err();
    assert!(
        matches!(err, ConfigError::OidcRequiredWithoutIssuer),
        "{err}"
    );
    // Required tokens need an explicit allow-list: the instance's account
    // may never be known.
    let err = RunConfig::from_args_on(
        &run_args(&[
            "--policy-file",
            "/etc/metaproxy/policy.toml",
            "--oidc-issuer",
            "https://gitlab.example.com",
            "--oidc-required",
        ]),
        &LINUX,
    )
    .unwrap_err();
    assert!(
        matches!(err, ConfigError::OidcRequiredWithoutAllowRole),
        "{err}"
    );
    let on = config(&[
        "--oidc-issuer",
        "https://gitlab.example.com/",
        "--oidc-required",
    ])
    .unwrap()
    .oidc
    .unwrap();
    assert_eq!(on.rules.issuer, "https://gitlab.example.com");
    assert_eq!(on.rules.audience, "sts.amazonaws.com");
    assert_eq!(on.rules.variable, "AWS_ID_TOKEN");
    assert!(on.required);
    // Plain http only to loopback: a token's keys fetched in the clear
    // could be anyone's.
    let err = config(&["--oidc-issuer", "http://gitlab.example.com"]).unwrap_err();
    assert!(err.to_string().contains("use https"), "{err}");
    assert!(config(&["--oidc-issuer", "http://127.0.0.1:8080"]).is_ok());
    for bad in ["1TOKEN", "AWS-ID", ""] {
        let err = config(&[
            "--oidc-issuer",
            "https://gitlab.example.com",
            "--oidc-token-variable",
            bad,
        ])
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::OidcTokenVariable(_)),
            "{bad}: {err}"
        );
    }
    let err = config(&[
        "--oidc-issuer",
        "https://gitlab.example.com",
        "--oidc-audience",
        " ",
    ])
    .unwrap_err();
    assert!(matches!(err, ConfigError::OidcAudience), "{err}");
}

#[test]
fn runtimes_are_docker_by_default_and_each_socket_given_is_followed() {
    let docker_default = RuntimeSocket {
        kind: RuntimeKind::Docker,
        socket: None,
    };
    assert_eq!(
        config(&[]).unwrap().runtimes,
        std::slice::from_ref(&docker_default)
    );
    let both = config(&[
        "--podman-host",
        "unix:///run/podman/podman.sock",
        "--podman-host",
        "/run/user/1000/podman/podman.sock",
    ])
    .unwrap();
    assert_eq!(
        both.runtimes,
        [
            docker_default,
            RuntimeSocket {
                kind: RuntimeKind::Podman,
                socket: Some("/run/podman/podman.sock".into()),
            },
            RuntimeSocket {
                kind: RuntimeKind::Podman,
                socket: Some("/run/user/1000/podman/podman.sock".into()),
            },
        ]
    );
    let podman_only = config(&["--docker-host", "off", "--podman-host", "/p.sock"]).unwrap();
    assert_eq!(podman_only.runtimes.len(), 1);
    assert_eq!(podman_only.runtimes[0].kind, RuntimeKind::Podman);
    let two_dockers = config(&["--docker-host", "unix:///a.sock,/b.sock"]).unwrap();
    assert_eq!(
        two_dockers
            .runtimes
            .iter()
            .map(|r| r.socket.clone().unwrap())
            .collect::<Vec<_>>(),
        [PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]
    );
}

#[test]
fn a_runtime_socket_that_is_no_unix_path_or_no_runtime_at_all_is_refused() {
    for (args, says) in [
        (&["--docker-host", "tcp://10.0.0.1:2375"][..], "--docker-host \"tcp://10.0.0.1:2375\": expected a Unix socket, as unix:///PATH or /PATH, or off"),
        (&["--podman-host", "podman.sock"][..], "--podman-host \"podman.sock\": expected a Unix socket"),
        (&["--podman-host", "/run/../tmp/p.sock"][..], "--podman-host \"/run/../tmp/p.sock\""),
        (&["--docker-host", "off"][..], "--docker-host off and no --podman-host: no container could ever get a role"),
    ] {
        let err = config(args).unwrap_err().to_string();
        assert!(err.starts_with(says), "{args:?}: {err}");
    }
}

#[test]
fn a_runtime_socket_someone_else_could_put_in_place_is_refused() {
    let owners = |table: &'static [(&'static str, u32, u32, bool)]| {
        move |p: &Path| -> std::io::Result<Owner> {
            table
                .iter()
                .find(|(path, ..)| Path::new(path) == p)
                .map(|&(_, uid, mode, dir)| Owner {
                    uid,
                    mode,
                    kind: if dir { Kind::Dir } else { Kind::File },
                })
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    };
    let check = |path: &str, table| {
        check_runtime_socket_with("--podman-host", Path::new(path), &owners(table))
            .map_err(|e| e.to_string())
    };
    // Rootful Podman's socket, root's in root's directories (the socket
    // group-writable, as docker.sock is): fine, and so is one not made yet.
    let rootful: &[_] = &[
        ("/", 0, 0o755, true),
        ("/run", 0, 0o755, true),
        ("/run/podman", 0, 0o700, true),
        ("/run/podman/podman.sock", 0, 0o660, false),
    ];
    assert_eq!(check("/run/podman/podman.sock", rootful), Ok(()));
    assert_eq!(check("/run/podman/later.sock", rootful), Ok(()));
    // A user's rootless socket: the user could answer for any libpod- cgroup.
    let rootless: &[_] = &[
        ("/", 0, 0o755, true),
        ("/run", 0, 0o755, true),
        ("/run/user", 0, 0o755, true),
        ("/run/user/1000", 1000, 0o700, true),
        ("/run/user/1000/podman", 1000, 0o700, true),
        ("/run/user/1000/podman/podman.sock", 1000, 0o660, false),
    ];
    let err = check("/run/user/1000/podman/podman.sock", rootless).unwrap_err();
    assert!(
        err.starts_with("--podman-host /run/user/1000/podman/podman.sock: /run/user/1000/podman/podman.sock is owned by uid 1000, not root"),
        "{err}"
    );
    assert!(err.contains("rootless Podman is not supported"), "{err}");
    // Not there yet, in a directory anyone may write to (not sticky).
    let open: &[_] = &[("/", 0, 0o755, true), ("/srv", 0, 0o777, true)];
    let err = check("/srv/docker.sock", open).unwrap_err();
    assert!(
        err.contains("/srv is a directory writable by group and others"),
        "{err}"
    );
    // /tmp is sticky: nobody else can replace root's entries in it.
    let tmp: &[_] = &[
        ("/", 0, 0o755, true),
        ("/tmp", 0, 0o1777, true),
        ("/tmp/p", 0, 0o755, true),
    ];
    assert_eq!(check("/tmp/p/podman.sock", tmp), Ok(()));
}
