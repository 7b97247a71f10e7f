use super::*;

fn levels(checks: &[Check], check: &str) -> Vec<Level> {
    checks
        .iter()
        .filter(|c| c.check == check)
        .map(|c| c.level)
        .collect()
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
    assert_eq!(levels(&careless, "IAM_ROLE"), [Level::Fail]);
    let role = careless.iter().find(|c| c.check == "IAM_ROLE").unwrap();
    assert!(role.found.contains("[runners.docker]"), "{role:?}");
    assert_eq!(levels(&careless, "privileged"), [Level::Fail]);
    assert_eq!(levels(&careless, "docker socket"), [Level::Fail]);
    assert_eq!(levels(&careless, "network_mode"), [Level::Warn]);
    assert_eq!(levels(&careless, "cap_drop"), [Level::Warn]);
    assert_eq!(levels(&careless, "cap_add"), [Level::Fail]);
    let caps = careless.iter().find(|c| c.check == "cap_add").unwrap();
    assert!(caps.found.contains("NET_ADMIN, SYS_ADMIN"), "{caps:?}");
    assert!(careless
        .iter()
        .filter(|c| c.level == Level::Fail)
        .all(|c| c.fix.is_some()));

    assert_eq!(levels(&of("forgot"), "IAM_ROLE"), [Level::Fail]);
    let shell = of("shell");
    assert_eq!(shell.len(), 1);
    assert_eq!(shell[0].level, Level::Skip);
    assert!(shell[0].found.contains("shell"), "{shell:?}");
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
    assert_eq!(levels(&odd, "IAM_ROLE"), [Level::Fail]);
}

#[test]
fn lines_show_no_escape_codes_and_json_names_every_field() {
    let c = Check::new("runner a\u{1b}[2J\u{202e}", "privileged", Level::Fail, "x")
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
