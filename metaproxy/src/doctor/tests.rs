use super::*;

fn levels(checks: &[Check], check: CheckId) -> Vec<Level> {
    checks
        .iter()
        .filter(|c| c.check == check)
        .map(|c| c.level)
        .collect()
}

#[test]
fn the_pins_need_a_bpf_filesystem() {
    let mountinfo = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw\n36 25 0:32 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700\n";
    let pins = std::path::Path::new("/sys/fs/bpf/metaproxy");
    assert_eq!(host::bpffs_check(mountinfo, pins).level, Level::Ok);
    let none = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw\n";
    let c = host::bpffs_check(none, pins);
    assert_eq!(c.level, Level::Fail);
    assert!(c.fix.unwrap().contains("mount -t bpf"));
}

#[test]
fn a_redirect_without_its_slot_steering_fails() {
    let pins = std::path::Path::new("/sys/fs/bpf/metaproxy");
    assert_eq!(host::redirect_check(pins, 3, true).level, Level::Ok);
    let c = host::redirect_check(pins, 3, false);
    assert_eq!(c.level, Level::Fail);
    assert!(c.found.contains("mp_sk_lookup-3"), "{}", c.found);
    assert!(c.found.contains("refused"), "{}", c.found);
}

#[test]
fn io_uring_kernels_fail_and_others_pass() {
    for (release, level) in [
        ("5.10.0-1-amd64", Level::Fail),
        ("5.10.161", Level::Fail),
        ("5.10.162-amzn2", Level::Ok),
        ("5.11.22", Level::Fail),
        ("5.4.0", Level::Fail),
        ("6.1.0-18-cloud-amd64", Level::Ok),
        ("6.18.44-fc-v1147", Level::Ok),
        ("", Level::Warn),
    ] {
        let c = kernel_check(release);
        assert_eq!(c.level, level, "{release}: {c:?}");
        assert_eq!(c.level == Level::Fail, c.fix.is_some(), "{c:?}");
    }
}

#[test]
fn each_docker_runner_is_checked_and_others_are_skipped_with_the_reason() {
    let checks = runner_checks(
        r#"
concurrent = 4
unknown_top_level = "fine"

[[runners]]
  name = "deploy"
  executor = "docker"
  environment = ["IAM_ROLE=ci-deploy"]
  [runners.docker]
    image = "alpine"
    cap_drop = ["NET_RAW"]
    some_future_key = 1

[[runners]]
  name = "careless"
  executor = "docker"
  [runners.docker]
    environment = ["IAM_ROLE=ci-admin"]
    privileged = true
    volumes = ["/cache", "/var/run/docker.sock:/var/run/docker.sock"]
    network_mode = "host"
    cap_add = ["net_admin", "CAP_SYS_ADMIN"]

[[runners]]
  name = "forgot"
  executor = "docker-autoscaler"

[[runners]]
  name = "shell"
  executor = "shell"
"#,
    );
    let of = |runner: &str| -> Vec<Check> {
        checks
            .iter()
            .filter(|c| c.area == format!("runner {runner}"))
            .cloned()
            .collect()
    };
    let deploy = of("deploy");
    assert!(deploy.iter().all(|c| c.level == Level::Ok), "{deploy:#?}");

    let careless = of("careless");
    assert_eq!(levels(&careless, CheckId::IamRole), [Level::Fail]);
    let role = careless
        .iter()
        .find(|c| c.check == CheckId::IamRole)
        .unwrap();
    assert!(role.found.contains("[runners.docker]"), "{role:?}");
    assert_eq!(levels(&careless, CheckId::Privileged), [Level::Fail]);
    assert_eq!(levels(&careless, CheckId::DockerSocket), [Level::Fail]);
    assert_eq!(levels(&careless, CheckId::NetworkMode), [Level::Warn]);
    assert_eq!(levels(&careless, CheckId::CapDrop), [Level::Warn]);
    assert_eq!(levels(&careless, CheckId::CapAdd), [Level::Fail]);
    let caps = careless
        .iter()
        .find(|c| c.check == CheckId::CapAdd)
        .unwrap();
    assert!(caps.found.contains("NET_ADMIN, SYS_ADMIN"), "{caps:?}");
    assert!(careless
        .iter()
        .filter(|c| c.level == Level::Fail)
        .all(|c| c.fix.is_some()));

    assert_eq!(levels(&of("forgot"), CheckId::IamRole), [Level::Fail]);
    let shell = of("shell");
    assert_eq!(shell.len(), 1);
    assert_eq!(shell[0].level, Level::Skip);
    assert!(shell[0].found.contains("shell"), "{shell:?}");
}

/// Where the BPF LSM is missing, a job that keeps NET_RAW can forge
/// frames: doctor fails the runners that let it, and says why.
#[test]
fn without_the_layer2_lock_runners_that_keep_net_raw_fail() {
    let config = r#"
[[runners]]
  name = "bridged"
  executor = "docker"
  environment = ["IAM_ROLE=ci-deploy"]

[[runners]]
  name = "host-net"
  executor = "docker"
  environment = ["IAM_ROLE="]
  [runners.docker]
    network_mode = "host"

[[runners]]
  name = "dropped"
  executor = "docker"
  environment = ["IAM_ROLE="]
  [runners.docker]
    network_mode = "host"
    cap_drop = ["NET_RAW"]
"#;
    let gap = runner::Context {
        layer2_gap: Some("the BPF LSM is not active (active LSMs: lockdown,capability)".into()),
        ..served()
    };
    let checks = runner::runner_checks_in(config, &gap);
    assert_eq!(
        failed(&checks),
        [
            ("runner bridged".to_string(), CheckId::CapDrop),
            ("runner host-net".to_string(), CheckId::NetworkMode),
            ("runner host-net".to_string(), CheckId::CapDrop),
        ]
    );
    let host = checks
        .iter()
        .find(|c| c.area == "runner host-net" && c.check == CheckId::NetworkMode)
        .unwrap();
    assert!(host.found.contains("BPF LSM is not active"), "{host:?}");
    assert!(host.found.contains("docker0"), "{host:?}");
    // With the lock, the same runners only warn: NET_RAW is a second
    // barrier, not the only one.
    let locked = runner::runner_checks_in(config, &served());
    assert!(failed(&locked).is_empty(), "{locked:#?}");
    assert_eq!(
        levels(
            &locked
                .iter()
                .filter(|c| c.area == "runner bridged")
                .cloned()
                .collect::<Vec<_>>(),
            CheckId::CapDrop
        ),
        [Level::Warn]
    );
    let net = locked
        .iter()
        .find(|c| c.area == "runner host-net" && c.check == CheckId::NetworkMode)
        .unwrap();
    assert!(!net.found.contains("cgroup layer covers"), "{net:?}");
}

#[test]
fn a_layer2_gap_on_the_host_is_a_warning_with_the_fix() {
    let ok = host::layer2_check(Ok(()));
    assert_eq!(ok.level, Level::Ok);
    let gap = host::layer2_check(crate::kernel::lsm::bpf_in("lockdown,capability,selinux"));
    assert_eq!(gap.level, Level::Warn);
    assert!(gap.found.contains("selinux"), "{gap:?}");
    assert!(gap.fix.unwrap().contains("lsm="));
}

#[test]
fn a_broken_or_empty_config_is_a_finding_not_a_crash() {
    let broken = runner_checks("[[runners]\nname = 1");
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].level, Level::Fail);
    // A broken line is named, never quoted: it may hold the runner's token.
    let leaky = runner_checks("[[runners]]\n  name = \"a\"\n  token = \"glrt-secret\n");
    assert_eq!(leaky[0].level, Level::Fail);
    assert!(leaky[0].found.starts_with("line 3: "), "{leaky:?}");
    assert!(!format!("{leaky:?}").contains("glrt-secret"), "{leaky:?}");
    let empty = runner_checks("concurrent = 1\n");
    assert_eq!(empty[0].level, Level::Warn);
    // Wrong types are read as absent, and so fail safe.
    let odd = runner_checks("[[runners]]\nexecutor = \"docker\"\nenvironment = \"IAM_ROLE=x\"\n");
    assert_eq!(levels(&odd, CheckId::IamRole), [Level::Fail]);
}

#[test]
fn lines_show_no_escape_codes_and_json_names_every_field() {
    let c = Check::new(
        "runner a\u{1b}[2J\u{202e}",
        CheckId::Privileged,
        Level::Fail,
        "x",
    )
    .fix("privileged = false");
    let l = line(&c);
    assert!(
        l.starts_with("FAIL  runner a?[2J?: privileged: x (fix: privileged = false)"),
        "{l}"
    );
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["level"], "fail");
    assert_eq!(v["check"], "privileged");
    assert_eq!(v["fix"], "privileged = false");
}

fn fixture(name: &str) -> &'static str {
    match name {
        "docker" => include_str!("testdata/docker.toml"),
        "autoscaler" => include_str!("testdata/autoscaler.toml"),
        "machine" => include_str!("testdata/machine.toml"),
        "kubernetes-and-shell" => include_str!("testdata/kubernetes-and-shell.toml"),
        "careless" => include_str!("testdata/careless.toml"),
        _ => panic!("no fixture {name}"),
    }
}

/// What metaproxy serves by default: both IPv4 endpoint addresses at
/// /v1/credentials, the probe at the cgroup root.
fn served() -> runner::Context {
    runner::Context {
        container_credentials: Some((
            vec![
                "169.254.170.2".parse().unwrap(),
                "169.254.170.23".parse().unwrap(),
            ],
            "/v1/credentials".into(),
        )),
        attached: Some("/".into()),
        layer2_gap: None,
        own_dirs: Vec::new(),
    }
}

fn failed(checks: &[Check]) -> Vec<(String, CheckId)> {
    checks
        .iter()
        .filter(|c| c.level == Level::Fail)
        .map(|c| (c.area.clone(), c.check))
        .collect()
}

#[test]
fn the_documented_configs_give_exactly_their_findings() {
    // A safe Docker runner: nothing to fix.
    let docker = runner::runner_checks_in(fixture("docker"), &served());
    assert!(failed(&docker).is_empty(), "{docker:#?}");
    assert!(docker
        .iter()
        .any(|c| c.check == CheckId::ContainerCredentials
            && c.found.contains("http://169.254.170.2/v1/credentials")));
    // docker-autoscaler with slot cgroups inside the probe's cgroup.
    let autoscaler = runner::runner_checks_in(fixture("autoscaler"), &served());
    assert!(failed(&autoscaler).is_empty(), "{autoscaler:#?}");
    assert!(autoscaler
        .iter()
        .any(|c| c.check == CheckId::SlotCgroups && c.found.contains("/gitlab-runner/slot-0")));
    let elsewhere = runner::Context {
        attached: Some("/system.slice/docker.service".into()),
        ..served()
    };
    let outside = runner::runner_checks_in(fixture("autoscaler"), &elsewhere);
    assert_eq!(
        failed(&outside),
        [("runner autoscaler".to_string(), CheckId::SlotCgroups)]
    );
    // docker+machine: IAM_ROLE and privileged only where gitlab-runner
    // ignores or jobs abuse them.
    let machine = runner_checks(fixture("machine"));
    assert_eq!(
        failed(&machine),
        [
            ("runner docker-machine".to_string(), CheckId::IamRole),
            ("runner docker-machine".to_string(), CheckId::Privileged),
        ]
    );
    // Kubernetes and shell runners are listed and skipped.
    let others = runner_checks(fixture("kubernetes-and-shell"));
    assert_eq!(others.len(), 2);
    assert!(others.iter().all(|c| c.level == Level::Skip), "{others:#?}");
    // Several careless runners, each named with its own failures.
    let careless = runner::runner_checks_in(fixture("careless"), &served());
    assert_eq!(
        failed(&careless),
        [
            ("runner wrong-env".to_string(), CheckId::IamRole),
            (
                "runner wrong-env".to_string(),
                CheckId::ContainerCredentials
            ),
            ("runner socket".to_string(), CheckId::DockerSocket),
            ("runner socket".to_string(), CheckId::HostPaths),
            ("runner socket".to_string(), CheckId::CapAdd),
            ("runner socket".to_string(), CheckId::ContainerCredentials),
        ],
        "{careless:#?}"
    );
    let path = careless
        .iter()
        .find(|c| c.area == "runner socket" && c.check == CheckId::ContainerCredentials)
        .unwrap();
    assert!(path.found.contains("\"/v2/credentials\""), "{path:?}");
    // The systemd slice nests by its dashes, outside a probe under docker.
    assert_eq!(
        runner::slot_path("runner-slot-${slot}.slice"),
        "/runner.slice/runner-slot.slice/runner-slot-0.slice"
    );
    let slices = runner::runner_checks_in(fixture("careless"), &elsewhere);
    assert!(failed(&slices).contains(&("runner slots-outside".to_string(), CheckId::SlotCgroups)));
    // The roles doctor checks with AWS: the runners' own IAM_ROLE only.
    let roles: Vec<(String, String)> = runner::runner_roles(fixture("careless"))
        .into_iter()
        .map(|r| (r.area, r.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("runner socket".to_string(), "ci-build".to_string()),
            ("runner slots-outside".to_string(), String::new()),
        ]
    );
}

#[test]
fn units_that_start_containers_must_come_after_metaproxy() {
    let ordered = systemd::ordering_checks(include_str!("testdata/systemctl-show-ordered.txt"));
    assert_eq!(
        ordered.iter().map(|c| c.level).collect::<Vec<_>>(),
        [Level::Ok, Level::Ok, Level::Skip]
    );
    assert!(
        ordered[0].found.contains("waits for the redirect"),
        "{ordered:?}"
    );
    let unordered = systemd::ordering_checks(include_str!("testdata/systemctl-show-unordered.txt"));
    assert_eq!(
        unordered
            .iter()
            .map(|c| (c.level, c.found.split(' ').next().unwrap()))
            .collect::<Vec<_>>(),
        [
            (Level::Fail, "docker.service"),
            (Level::Warn, "containerd.service"),
            (Level::Fail, "gitlab-runner.service"),
        ]
    );
    assert!(unordered[0]
        .fix
        .as_deref()
        .unwrap()
        .contains("docker.service.d/metaproxy.conf"));
    assert_eq!(systemd::enabled_check("enabled").level, Level::Ok);
    assert_eq!(systemd::enabled_check("disabled").level, Level::Fail);
    // Enabled for this boot only: gone after the AMI's reboot.
    assert_eq!(systemd::enabled_check("enabled-runtime").level, Level::Fail);
    // A gate whose failure is ignored waits for nothing.
    let ignored = "Id=docker.service\nLoadState=loaded\nAfter=metaproxy.service\nExecStartPre={ path=/usr/bin/metaproxy ; argv[]=/usr/bin/metaproxy status --redirect ; ignore_errors=yes ; start_time=[n/a] }\n";
    assert_eq!(systemd::ordering_checks(ignored)[0].level, Level::Warn);
    assert_eq!(systemd::enabled_check("").level, Level::Fail);
}

#[test]
fn live_containers_that_undo_the_promise_are_named() {
    let careless: bollard::models::ContainerInspectResponse =
        serde_json::from_str(include_str!("testdata/inspect-careless.json")).unwrap();
    // The image set IAM_ROLE, and the container has nothing else.
    let image_env = ["IAM_ROLE=ci-deploy".to_string()];
    let found = docker::container_checks(&careless, &image_env);
    assert_eq!(
        found
            .iter()
            .map(|c| (c.area.as_str(), c.check))
            .collect::<Vec<_>>(),
        [
            (
                "container runner-abc123-project-42-concurrent-0-build",
                CheckId::Privileged
            ),
            (
                "container runner-abc123-project-42-concurrent-0-build",
                CheckId::CapAdd
            ),
            (
                "container runner-abc123-project-42-concurrent-0-build",
                CheckId::DockerSocket
            ),
            (
                "container runner-abc123-project-42-concurrent-0-build",
                CheckId::IamRole
            ),
        ]
    );
    let clean: bollard::models::ContainerInspectResponse =
        serde_json::from_str(include_str!("testdata/inspect-clean.json")).unwrap();
    assert!(docker::container_checks(&clean, &[]).is_empty());
    let info: bollard::models::SystemInfo =
        serde_json::from_str(include_str!("testdata/info.json")).unwrap();
    let checks = docker::info_checks(&info);
    assert!(
        checks[0].found.contains("cgroup driver systemd, cgroup v2"),
        "{checks:?}"
    );
    assert_eq!(levels(&checks, CheckId::UsernsRemap), [Level::Warn]);
}

#[test]
fn the_units_settings_become_the_flags_run_would_check() {
    let text = "# metaproxy\nMETAPROXY_ALLOW_ROLE=\"arn:aws:iam::123456789012:role/ci-*\"\n\nMETAPROXY_SESSION_TAGS=true\nMETAPROXY_SOURCE_IDENTITY=false\nMETAPROXY_TYPO=1\n; comment\n";
    let vars = settings::environment_file(text);
    assert_eq!(vars[0].1, "arn:aws:iam::123456789012:role/ci-*");
    let (flags, unknown, bad) = settings::run_flags(&vars);
    assert!(bad.is_empty());
    assert_eq!(
        flags,
        [
            "--allow-role=arn:aws:iam::123456789012:role/ci-*",
            "--session-tags"
        ]
    );
    assert_eq!(unknown, ["METAPROXY_TYPO"]);
    struct Linux;
    impl config::Host for Linux {
        fn ephemeral_ports(&self) -> std::io::Result<config::EphemeralPorts> {
            Ok(config::EphemeralPorts::parse("32768 60999", "").unwrap())
        }
    }
    let path = std::path::Path::new("/etc/default/metaproxy");
    let (config, checks) = settings::settings_checks(path, Some(text), None, &Linux);
    assert!(config.is_some());
    assert_eq!(levels(&checks, CheckId::Settings), [Level::Warn]);
    assert_eq!(levels(&checks, CheckId::Flags), [Level::Ok]);
    // No allow-list at all: run would refuse, and doctor says so.
    let (config, checks) = settings::settings_checks(path, None, None, &Linux);
    assert!(config.is_none());
    let flags = checks.iter().find(|c| c.check == CheckId::Flags).unwrap();
    assert_eq!(flags.level, Level::Fail);
    assert!(flags.found.contains("no role allow-list"), "{flags:?}");
    // A listen port the kernel hands out: refused as run would.
    let (_, checks) = settings::settings_checks(
        path,
        Some("METAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/ci-*\nMETAPROXY_LISTEN=169.254.170.254:40000\n"),
        None,
        &Linux,
    );
    assert!(checks
        .iter()
        .any(|c| c.check == CheckId::Flags && c.found.contains("ephemeral")));
    // A switch is `true` or `false`, as clap takes it: `1` stops the unit.
    let (_, checks) = settings::settings_checks(
        path,
        Some(
            "METAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/ci-*\nMETAPROXY_SESSION_TAGS=1\n",
        ),
        None,
        &Linux,
    );
    let flags = checks.iter().find(|c| c.check == CheckId::Flags).unwrap();
    assert_eq!(flags.level, Level::Fail);
    assert!(
        flags.found.contains("METAPROXY_SESSION_TAGS=1"),
        "{flags:?}"
    );
    // Variables the daemon reads that are no flag's are no typo.
    let (_, unknown, _) = settings::run_flags(&settings::environment_file(
        "METAPROXY_LOG=debug\nMETAPROXY_GUARD_TC=netlink\n",
    ));
    assert!(unknown.is_empty(), "{unknown:?}");
}

#[test]
fn the_units_own_environment_and_arguments_count_too() {
    let show = "Environment=METAPROXY_METRICS=0.0.0.0:9169 METAPROXY_ALLOW_ROLE=arn:aws:iam::123456789012:role/x\nExecStart={ path=/usr/bin/metaproxy ; argv[]=/usr/bin/metaproxy run --allow-role arn:aws:iam::*:role/ci-* ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n";
    let unit = settings::unit(show).unwrap();
    assert_eq!(unit.args, ["--allow-role", "arn:aws:iam::*:role/ci-*"]);
    assert_eq!(unit.environment.len(), 2);
    struct Linux;
    impl config::Host for Linux {
        fn ephemeral_ports(&self) -> std::io::Result<config::EphemeralPorts> {
            Ok(config::EphemeralPorts::parse("32768 60999", "").unwrap())
        }
    }
    let path = std::path::Path::new("/etc/default/metaproxy");
    // The file overrides the unit's Environment=; ExecStart's arguments
    // override both.
    let (config, checks) = settings::settings_checks(
        path,
        Some("METAPROXY_METRICS=127.0.0.1:9169\n"),
        Some(&unit),
        &Linux,
    );
    let config = config.unwrap();
    assert_eq!(config.metrics, Some("127.0.0.1:9169".parse().unwrap()));
    assert_eq!(config.allow_role, ["arn:aws:iam::*:role/ci-*"]);
    assert_eq!(levels(&checks, CheckId::AllowRole), [Level::Fail]);
    assert_eq!(settings::unit(""), None);
}

#[test]
fn an_allow_list_wider_than_the_account_fails() {
    let check = |p: &[&str]| {
        settings::allow_role_check(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).level
    };
    assert_eq!(check(&["arn:aws:iam::123456789012:role/ci-*"]), Level::Ok);
    assert_eq!(check(&[]), Level::Ok);
    assert_eq!(check(&["arn:aws:iam::*:role/ci-*"]), Level::Fail);
    assert_eq!(check(&["*"]), Level::Fail);
    assert_eq!(check(&["arn:aws:iam::1234*:role/ci"]), Level::Fail);
    assert_eq!(check(&["arn:aws:iam::123456789012:role/*"]), Level::Warn);
    // Whatever its shape, a glob that admits any role of the account.
    assert_eq!(check(&["arn:aws:iam::123456789012:role/**"]), Level::Warn);
    assert_eq!(check(&["arn:aws:iam::123456789012:role/?*"]), Level::Warn);
    // `*` never crosses a `/`: this one admits no role at all.
    assert_eq!(check(&["arn:aws:iam::123456789012:role*"]), Level::Ok);
    assert_eq!(
        settings::metrics_check(Some("127.0.0.1:9169".parse().unwrap())).level,
        Level::Ok
    );
    assert_eq!(
        settings::metrics_check(Some("10.0.0.5:9169".parse().unwrap())).level,
        Level::Warn
    );
}

#[test]
fn a_trust_policy_that_refuses_the_instance_role_names_the_statement_to_add() {
    let arn = RoleArn::parse("arn:aws:iam::123456789012:role/ci-deploy").unwrap();
    let denied = Trial {
        ok: false,
        code: Some("AccessDenied".into()),
        message: Some("AccessDenied: not authorized to perform sts:AssumeRole".into()),
    };
    let me = "arn:aws:sts::123456789012:assumed-role/runner-instance/i-0abc";
    let c = aws::trust_check("runner deploy", &arn, &denied, Some(me), true, true);
    assert_eq!(c.level, Level::Fail);
    let fix = c.fix.unwrap();
    assert!(
        fix.contains("\"AWS\": \"arn:aws:iam::123456789012:role/runner-instance\""),
        "{fix}"
    );
    assert!(
        fix.contains("\"sts:AssumeRole\", \"sts:TagSession\", \"sts:SetSourceIdentity\""),
        "{fix}"
    );
    let ok = Trial {
        ok: true,
        code: None,
        message: None,
    };
    assert_eq!(
        aws::trust_check("runner deploy", &arn, &ok, Some(me), false, false).level,
        Level::Ok
    );
    assert_eq!(aws::instance_role_arn("arn:aws:iam::1:user/x"), None);
}

#[test]
fn sockets_directories_and_capabilities_are_read_as_docker_reads_them() {
    for (volume, host, gives) in [
        ("/var/run/docker.sock:/var/run/docker.sock:ro", None, true),
        ("/var/run:/host/var/run", None, true),
        ("/run/:/run", None, true),
        ("/:/host:ro", None, true),
        (
            "/srv/docker/d.sock:/d.sock",
            Some("/srv/docker/d.sock"),
            true,
        ),
        ("/srv/docker:/srv/docker", Some("/srv/docker/d.sock"), true),
        ("/cache", None, false),
        ("/var/run/docker.sock", None, false),
        ("cache-volume:/cache", None, false),
        ("/builds:/builds", None, false),
    ] {
        let mut docker = toml::Table::new();
        docker.insert("volumes".into(), vec![volume.to_string()].into());
        if let Some(host) = host {
            docker.insert("host".into(), format!("unix://{host}").into());
        }
        let judged = runner::container_spec(Some(&docker.into())).judge("runner r");
        assert_eq!(
            judged.runtime_socket.level == Level::Fail,
            gives,
            "{volume}"
        );
    }
    let checks = runner_checks(
        r#"
[[runners]]
  name = "lower"
  executor = "docker"
  environment = ["IAM_ROLE="]
  [runners.docker]
    host = "unix:///srv/docker/d.sock"
    services_privileged = true
    cap_drop = ["cap_net_raw"]
    cap_add = ["cap_sys_admin"]
    volumes = ["/srv/docker:/srv/docker"]
"#,
    );
    assert_eq!(levels(&checks, CheckId::CapDrop), [Level::Ok]);
    assert_eq!(levels(&checks, CheckId::CapAdd), [Level::Fail]);
    assert_eq!(levels(&checks, CheckId::Privileged), [Level::Fail]);
    assert_eq!(levels(&checks, CheckId::DockerSocket), [Level::Fail]);
    // metaproxy serves plain http on port 80 only.
    let https = runner::runner_checks_in(
        "[[runners]]\nname = \"tls\"\nexecutor = \"docker\"\nenvironment = [\"IAM_ROLE=\", \"AWS_CONTAINER_CREDENTIALS_FULL_URI=https://169.254.170.23/v1/credentials\"]\n",
        &served(),
    );
    assert_eq!(levels(&https, CheckId::ContainerCredentials), [Level::Fail]);
}

#[test]
fn a_container_that_is_no_jobs_is_named_not_failed() {
    let mut careless: bollard::models::ContainerInspectResponse =
        serde_json::from_str(include_str!("testdata/inspect-careless.json")).unwrap();
    if let Some(config) = careless.config.as_mut() {
        config.labels = None;
    }
    let found = docker::container_checks(&careless, &[]);
    assert!(!found.is_empty());
    assert!(found.iter().all(|c| c.level == Level::Warn), "{found:#?}");
}

#[test]
fn a_runner_that_does_not_clear_the_container_credentials_variables_is_warned() {
    // A job's own variable would be the only value, and turn the endpoint
    // on for it (the daemon's rule refuses only two different values).
    let runner = |env: &str| {
        let text =
            format!("[[runners]]\nname = \"r\"\nexecutor = \"docker\"\nenvironment = [{env}]\n");
        levels(
            &runner::runner_checks_in(&text, &served()),
            CheckId::ContainerCredentials,
        )
    };
    assert_eq!(runner("\"IAM_ROLE=\""), [Level::Warn]);
    // Clearing one leaves the other to the job.
    assert_eq!(
        runner("\"IAM_ROLE=\", \"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=\""),
        [Level::Warn]
    );
    assert_eq!(
        runner("\"IAM_ROLE=\", \"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=\", \"AWS_CONTAINER_CREDENTIALS_FULL_URI=\""),
        [Level::Ok]
    );
}

#[test]
fn an_allow_listed_runner_cgroup_fails_where_shell_or_custom_jobs_run_in_it() {
    let service = vec![runner::RUNNER_SERVICE_CGROUP.to_string()];
    let shell = "[[runners]]\nname = \"s\"\nexecutor = \"shell\"\n[[runners]]\nname = \"d\"\nexecutor = \"docker\"\nenvironment = [\"IAM_ROLE=\"]\n";
    let docker_only =
        "[[runners]]\nname = \"d\"\nexecutor = \"docker\"\nenvironment = [\"IAM_ROLE=\"]\n";
    let globs = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // The admin allow-lists the runner's unit for the S3 cache: the shell
    // runner's job scripts run in it.
    let exact = globs(&["/system.slice/gitlab-runner.service"]);
    let c = runner::host_allow_check(&exact, shell, &service);
    assert_eq!(c.level, Level::Fail, "{c:?}");
    assert!(c.found.contains("runner s (shell)"), "{c:?}");
    // A glob that matches it too, and a custom executor.
    let custom = shell.replace("shell", "custom");
    let c = runner::host_allow_check(&globs(&["/system.slice/*.service"]), &custom, &service);
    assert_eq!(c.level, Level::Fail, "{c:?}");
    // Docker jobs do not run in the runner's cgroup.
    assert_eq!(
        runner::host_allow_check(&exact, docker_only, &service).level,
        Level::Ok
    );
    // A unit of its own for the cache helper is fine.
    let own = globs(&["/system.slice/s3-cache-sync.service"]);
    assert_eq!(
        runner::host_allow_check(&own, shell, &service).level,
        Level::Ok
    );
    // ** spans levels: warned.
    let wide = globs(&["/system.slice/**"]);
    assert_eq!(
        runner::host_allow_check(&wide, docker_only, &service).level,
        Level::Warn
    );
    // ... and fails where it reaches the runner with shell jobs.
    assert_eq!(
        runner::host_allow_check(&wide, shell, &service).level,
        Level::Fail
    );
    assert_eq!(
        runner::host_allow_check(&[], shell, &service).level,
        Level::Ok
    );
}

#[test]
fn volumes_that_undo_metaproxy_or_read_other_jobs_fail() {
    let own = vec![
        "/sys/fs/bpf/metaproxy".to_string(),
        "/run/metaproxy".to_string(),
        "/var/lib/metaproxy".to_string(),
    ];
    let found = |v: &[&str]| runner::sensitive_volumes(v, &own);
    for bad in [
        "/sys:/host/sys:ro",
        "/sys/fs/bpf:/bpf",
        "/sys/fs/bpf/metaproxy/links:/x",
        "/proc:/host/proc",
        "/:/host",
        "/var/lib/docker:/docker",
        "/var/lib/docker/containers:/c",
        "/run/containerd:/c",
        "/var/run:/var/run",
        "/etc/gitlab-runner:/etc/gitlab-runner:ro",
        "/run/metaproxy:/m",
        "/var/lib:/var/lib",
        "/etc/:/host-etc",
    ] {
        assert_eq!(found(&[bad]).len(), 1, "{bad}");
    }
    for fine in [
        "/cache",
        "/builds:/builds",
        "/srv/cache:/cache",
        "/var/cache/apt:/var/cache/apt",
        "/run/user/1000/x:/x",
    ] {
        assert!(found(&[fine]).is_empty(), "{fine}: {:?}", found(&[fine]));
    }
    let checks = runner::runner_checks_in(
        "[[runners]]\nname = \"r\"\nexecutor = \"docker\"\nenvironment = [\"IAM_ROLE=\"]\n[runners.docker]\nvolumes = [\"/cache\", \"/sys/fs/bpf:/sys/fs/bpf\"]\n",
        &runner::Context { own_dirs: own.clone(), ..runner::Context::default() },
    );
    assert_eq!(levels(&checks, CheckId::HostPaths), [Level::Fail]);
    let c = checks
        .iter()
        .find(|c| c.check == CheckId::HostPaths)
        .unwrap();
    assert!(
        c.found.contains("/sys/fs/bpf (unlinks metaproxy's pins)"),
        "{c:?}"
    );
}

#[test]
fn policy_rules_are_reported_and_none_is_ok() {
    assert_eq!(host::policy_routing_check(&[]).level, Level::Ok);
    let c = host::policy_routing_check(&["100: from 172.17.0.0/16 lookup 100".into()]);
    assert_eq!(c.level, Level::Warn);
    assert!(c.found.contains("from 172.17.0.0/16 lookup 100"), "{c:?}");
}

#[test]
fn volume_paths_are_judged_as_docker_cleans_them() {
    let found = |v: &str| runner::sensitive_volumes(&[v], &[]);
    for bad in [
        "//sys:/s",
        "/./proc:/p",
        "/etc/../sys:/s",
        "/var/lib/containerd:/c",
    ] {
        assert_eq!(found(bad).len(), 1, "{bad}");
    }
}

/// A runner's `[runners.docker]` and a live container given the same
/// privileges are judged once, in the same words; the live one's fix
/// removes the container first.
#[test]
fn a_runner_and_a_live_container_with_the_same_spec_get_the_same_findings() {
    let runner = runner_checks(
        r#"
[[runners]]
  name = "same"
  executor = "docker"
  environment = ["IAM_ROLE="]
  [runners.docker]
    privileged = true
    cap_add = ["NET_ADMIN"]
    volumes = ["/var/run/docker.sock:/var/run/docker.sock", "/cache"]
"#,
    );
    // Privileged, NET_ADMIN and the Docker socket, as a job.
    let live: bollard::models::ContainerInspectResponse =
        serde_json::from_str(include_str!("testdata/inspect-careless.json")).unwrap();
    let live = docker::container_checks(&live, &[]);
    let name = "runner-abc123-project-42-concurrent-0-build";
    for id in [CheckId::Privileged, CheckId::CapAdd, CheckId::DockerSocket] {
        let from_config = runner.iter().find(|c| c.check == id).unwrap();
        let running = live.iter().find(|c| c.check == id).unwrap();
        assert_eq!(from_config.level, Level::Fail, "{from_config:?}");
        assert_eq!(running.level, from_config.level, "{running:?}");
        assert_eq!(running.found, from_config.found);
        assert_eq!(
            running.fix,
            Some(format!(
                "docker rm -f {name}, and {}",
                from_config.fix.as_deref().unwrap()
            ))
        );
    }
    // The same spec, clean, is clean on both paths.
    let clean = spec::ContainerSpec::default().judge("x");
    for c in [clean.privileged, clean.cap_add, clean.runtime_socket] {
        assert_eq!(c.level, Level::Ok, "{c:?}");
    }
}

#[test]
fn the_settings_file_is_the_one_of_the_distributions_layout() {
    use std::path::{Path, PathBuf};
    const DEB: &str = "/etc/default/metaproxy";
    const RPM: &str = "/etc/sysconfig/metaproxy";
    fn only(present: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p| present.iter().any(|f| p == Path::new(f))
    }
    assert_eq!(settings_file(None, only(&[DEB])), PathBuf::from(DEB));
    assert_eq!(settings_file(None, only(&[RPM])), PathBuf::from(RPM));
    // Neither: the .deb's layout, reported as missing.
    assert_eq!(settings_file(None, only(&[])), PathBuf::from(DEB));
    // Both (the unit reads both, /etc/default first): the .deb's.
    assert_eq!(settings_file(None, only(&[DEB, RPM])), PathBuf::from(DEB));
    assert_eq!(
        settings_file(Some(Path::new("/srv/mp.env")), only(&[DEB])),
        PathBuf::from("/srv/mp.env")
    );
}
