//! The systemd unit and the drop-ins that order Docker, containerd and
//! gitlab-runner after metaproxy, checked by `systemd-analyze verify` with
//! the binary under test in place of /usr/bin/metaproxy (any warning
//! fails), and the Debian and RPM packages `cargo xtask package` builds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use metaproxy_tests::{daemon::metaproxy_bin, scratch::ScratchDir};

fn packaging() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging"))
}

/// Copies a unit file, with `bin` in place of /usr/bin/metaproxy.
fn install_with(from: &Path, to: &Path, bin: &Path) {
    let text = fs::read_to_string(from).unwrap();
    fs::write(
        to,
        text.replace("/usr/bin/metaproxy", bin.to_str().unwrap()),
    )
    .unwrap();
}

fn install(from: &Path, to: &Path) {
    install_with(from, to, &metaproxy_bin());
}

fn dpkg_deb(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new("dpkg-deb").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn verify(dir: &Path, unit: &str) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join(unit))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{unit}: {said}"
    );
}

#[test]
fn the_unit_and_the_drop_ins_verify_cleanly() {
    let scratch = ScratchDir::new("mpt").unwrap();
    let dir = scratch.path();
    install(
        &packaging().join("metaproxy.service"),
        &dir.join("metaproxy.service"),
    );
    verify(dir, "metaproxy.service");
    for dependent in [
        "docker.service",
        "containerd.service",
        "gitlab-runner.service",
    ] {
        fs::write(dir.join(dependent), "[Service]\nExecStart=/bin/true\n").unwrap();
        let dropins = dir.join(format!("{dependent}.d"));
        fs::create_dir_all(&dropins).unwrap();
        install(
            &packaging().join("dropins/metaproxy-dropin.conf"),
            &dropins.join("metaproxy.conf"),
        );
        verify(dir, dependent);
    }
    // The example policy file is one that loads.
    let example = packaging().join("policy.example.toml");
    let checked = Command::new(metaproxy_bin())
        .args(["policy", "check"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    let unit = fs::read_to_string(packaging().join("metaproxy.service")).unwrap();
    let dropin = fs::read_to_string(packaging().join("dropins/metaproxy-dropin.conf")).unwrap();
    // Restarting metaproxy must never stop Docker or running jobs.
    for text in [&unit, &dropin] {
        assert!(!text.lines().any(|l| l.starts_with("Requires=")
            || l.starts_with("BindsTo=")
            || l.starts_with("PartOf=")));
    }
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("Before=docker.service containerd.service gitlab-runner.service"));
    assert!(dropin.contains("ExecStartPre=/usr/bin/metaproxy status --redirect"));
}

#[test]
fn the_debian_package_installs_the_daemon_its_unit_and_settings() {
    let deb = PathBuf::from(
        std::env::var_os("METAPROXY_DEB")
            .expect("METAPROXY_DEB: the package to check (cargo xtask test builds it)"),
    );
    let listing = dpkg_deb(&["--contents".as_ref(), deb.as_os_str()]);
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for want in [
        "./usr/bin/metaproxy",
        "./usr/lib/systemd/system/metaproxy.service",
        "./usr/lib/systemd/system/docker.service.d/metaproxy.conf",
        "./usr/lib/systemd/system/containerd.service.d/metaproxy.conf",
        "./usr/lib/systemd/system/gitlab-runner.service.d/metaproxy.conf",
        "./usr/lib/systemd/system/podman.service.d/metaproxy.conf",
        "./usr/lib/systemd/system/podman-restart.service.d/metaproxy.conf",
        "./etc/default/metaproxy",
        "./usr/share/doc/metaproxy/README.md",
        "./usr/share/doc/metaproxy/docs/threat-model.md",
        "./usr/share/doc/metaproxy/policy.example.toml",
    ] {
        assert!(files.contains(&want), "{want} missing from\n{listing}");
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("./usr/bin/metaproxy")),
        "{listing}"
    );

    let scratch = ScratchDir::new("mpt").unwrap();
    let control = scratch.join("control");
    dpkg_deb(&["--control".as_ref(), deb.as_os_str(), control.as_os_str()]);
    let read = |name: &str| fs::read_to_string(control.join(name)).unwrap_or_default();
    // The settings survive upgrades; installing enables the unit; an
    // upgrade restarts it (the pinned redirect holds meanwhile); removal
    // stops it and takes the redirect out, upgrades do not.
    assert_eq!(read("conffiles").trim(), "/etc/default/metaproxy");
    let postinst = read("postinst");
    assert!(
        postinst.contains("deb-systemd-helper enable metaproxy.service"),
        "{postinst}"
    );
    assert!(postinst.contains("daemon-reload"), "{postinst}");
    let prerm = read("prerm");
    assert!(
        prerm.contains("deb-systemd-invoke stop metaproxy.service"),
        "{prerm}"
    );
    let stop = prerm.find("deb-systemd-invoke stop").unwrap();
    let detach = prerm
        .find("/usr/bin/metaproxy detach")
        .expect("prerm detaches");
    assert!(stop < detach, "stop, then detach: {prerm}");
    assert!(
        prerm[detach - 60..detach].contains("\"$1\" = remove"),
        "{prerm}"
    );
    let control_text = read("control");
    assert!(
        control_text.contains("Package: metaproxy"),
        "{control_text}"
    );
    assert!(
        control_text.contains("Depends: libc6, libgcc-s1, systemd"),
        "{control_text}"
    );

    // Unpacked into a scratch root: the files are the repository's, the
    // binary runs, and the unit and drop-ins verify with it.
    let root = scratch.join("root");
    dpkg_deb(&["--extract".as_ref(), deb.as_os_str(), root.as_os_str()]);
    let unit_dir = root.join("usr/lib/systemd/system");
    for (packaged, source) in [
        (unit_dir.join("metaproxy.service"), "metaproxy.service"),
        (root.join("etc/default/metaproxy"), "metaproxy.default"),
        (
            unit_dir.join("docker.service.d/metaproxy.conf"),
            "dropins/metaproxy-dropin.conf",
        ),
    ] {
        assert_eq!(
            fs::read_to_string(&packaged).unwrap(),
            fs::read_to_string(packaging().join(source)).unwrap(),
            "{}",
            packaged.display()
        );
    }
    let bin = root.join("usr/bin/metaproxy");
    let help = Command::new(&bin).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).starts_with("metaproxy "),
        "{help:?}"
    );
    let verify_dir = scratch.join("units");
    fs::create_dir_all(&verify_dir).unwrap();
    install_with(
        &unit_dir.join("metaproxy.service"),
        &verify_dir.join("metaproxy.service"),
        &bin,
    );
    verify(&verify_dir, "metaproxy.service");
    fs::write(
        verify_dir.join("docker.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    fs::create_dir_all(verify_dir.join("docker.service.d")).unwrap();
    install_with(
        &unit_dir.join("docker.service.d/metaproxy.conf"),
        &verify_dir.join("docker.service.d/metaproxy.conf"),
        &bin,
    );
    verify(&verify_dir, "docker.service");
}

fn rpm(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new("rpm")
        .args(args)
        .output()
        .expect("rpm (Debian package rpm)");
    assert!(
        out.status.success(),
        "rpm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A root for `rpm --root`: busybox as /bin/sh, and stand-ins for
/// systemctl and (once installed) metaproxy that log how they were called
/// to /var/log/calls, so the scriptlets run for real, chrooted, and what
/// they did can be read back.
fn stand_in_root(root: &Path) {
    for dir in ["bin", "usr/bin", "var/log", "dev", "tmp"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    stand_in(&root.join("usr/bin/systemctl"), "systemctl");
}

fn stand_in(at: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = fs::remove_file(at);
    fs::write(
        at,
        format!("#!/bin/sh\necho \"{name} $* pin_dir=$METAPROXY_PIN_DIR\" >> /var/log/calls\n"),
    )
    .unwrap();
    fs::set_permissions(at, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_rpm_installs_what_the_deb_does_and_detaches_only_on_removal() {
    let package = PathBuf::from(
        std::env::var_os("METAPROXY_RPM")
            .expect("METAPROXY_RPM: the package to check (cargo xtask test builds it)"),
    );
    let p = package.as_os_str();
    let files = rpm(&["-qp".as_ref(), "--list".as_ref(), p]);
    for want in [
        "/usr/bin/metaproxy",
        "/usr/lib/systemd/system/metaproxy.service",
        "/usr/lib/systemd/system/docker.service.d/metaproxy.conf",
        "/usr/lib/systemd/system/containerd.service.d/metaproxy.conf",
        "/usr/lib/systemd/system/gitlab-runner.service.d/metaproxy.conf",
        "/usr/lib/systemd/system/podman.service.d/metaproxy.conf",
        "/usr/lib/systemd/system/podman-restart.service.d/metaproxy.conf",
        "/etc/sysconfig/metaproxy",
        "/usr/share/doc/metaproxy/README.md",
        "/usr/share/doc/metaproxy/docs/threat-model.md",
        "/usr/share/doc/metaproxy/policy.example.toml",
    ] {
        assert!(
            files.lines().any(|l| l == want),
            "{want} missing from\n{files}"
        );
    }
    // The settings are configuration the admin edits: kept on upgrade.
    let flags = rpm(&[
        "-qp".as_ref(),
        "--queryformat".as_ref(),
        "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms}\n]".as_ref(),
        p,
    ]);
    let flag = |file: &str| {
        flags
            .lines()
            .find(|l| l.starts_with(&format!("{file} ")))
            .unwrap_or_else(|| panic!("{file} in\n{flags}"))
            .to_string()
    };
    assert!(flag("/etc/sysconfig/metaproxy").contains(" cn "), "{flags}");
    assert!(
        flag("/usr/bin/metaproxy").ends_with("-rwxr-xr-x"),
        "{flags}"
    );
    // What Amazon Linux calls the packages it needs.
    let requires = rpm(&["-qp".as_ref(), "--requires".as_ref(), p]);
    for want in ["systemd", "/bin/sh", "libc.so.6()(64bit)"] {
        assert!(
            requires.lines().any(|l| l.trim() == want),
            "{want} in\n{requires}"
        );
    }

    // Installed into a scratch root, scriptlets and all.
    let scratch = ScratchDir::new("mpt").unwrap();
    let root = scratch.join("root");
    stand_in_root(&root);
    let r = root.as_os_str();
    rpm(&["--root".as_ref(), r, "--initdb".as_ref()]);
    rpm(&["--root".as_ref(), r, "--nodeps".as_ref(), "-i".as_ref(), p]);
    for (packaged, source) in [
        (
            "usr/lib/systemd/system/metaproxy.service",
            "metaproxy.service",
        ),
        ("etc/sysconfig/metaproxy", "metaproxy.default"),
        (
            "usr/lib/systemd/system/gitlab-runner.service.d/metaproxy.conf",
            "dropins/metaproxy-dropin.conf",
        ),
    ] {
        assert_eq!(
            fs::read_to_string(root.join(packaged)).unwrap(),
            fs::read_to_string(packaging().join(source)).unwrap(),
            "{packaged}"
        );
    }
    // The unit reads the settings where the .rpm puts them.
    let unit = fs::read_to_string(root.join("usr/lib/systemd/system/metaproxy.service")).unwrap();
    assert!(
        unit.contains("EnvironmentFile=-/etc/sysconfig/metaproxy"),
        "{unit}"
    );
    let help = Command::new(root.join("usr/bin/metaproxy"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).starts_with("metaproxy "),
        "{help:?}"
    );
    let calls = || fs::read_to_string(root.join("var/log/calls")).unwrap_or_default();
    // Installing enables the unit and starts nothing.
    assert!(
        calls().contains("systemctl enable metaproxy.service"),
        "{}",
        calls()
    );
    assert!(!calls().contains("start"), "{}", calls());

    // An upgrade restarts the daemon, and leaves the redirect in place.
    stand_in(&root.join("usr/bin/metaproxy"), "metaproxy");
    fs::write(root.join("var/log/calls"), "").unwrap();
    rpm(&[
        "--root".as_ref(),
        r,
        "--nodeps".as_ref(),
        "-U".as_ref(),
        "--replacepkgs".as_ref(),
        p,
    ]);
    assert!(
        calls().contains("systemctl try-restart metaproxy.service"),
        "{}",
        calls()
    );
    assert!(!calls().contains("detach"), "{}", calls());
    assert!(!calls().contains("disable"), "{}", calls());

    // Removal stops and disables the unit, then takes the redirect out,
    // from the pin directory the admin's settings name.
    stand_in(&root.join("usr/bin/metaproxy"), "metaproxy");
    fs::write(root.join("var/log/calls"), "").unwrap();
    fs::write(
        root.join("etc/sysconfig/metaproxy"),
        "METAPROXY_PIN_DIR=/sys/fs/bpf/ci-metaproxy\n",
    )
    .unwrap();
    rpm(&[
        "--root".as_ref(),
        r,
        "--nodeps".as_ref(),
        "-e".as_ref(),
        "metaproxy".as_ref(),
    ]);
    let removed = calls();
    let disable = removed
        .find("systemctl disable --now metaproxy.service pin_dir=")
        .unwrap_or_else(|| panic!("{removed}"));
    let detach = removed
        .find("metaproxy detach pin_dir=/sys/fs/bpf/ci-metaproxy")
        .unwrap_or_else(|| panic!("{removed}"));
    assert!(disable < detach, "stop, then detach: {removed}");
    assert!(!root
        .join("usr/lib/systemd/system/metaproxy.service")
        .exists());
}

/// `path` from the environment `cargo xtask test` sets.
fn given(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(var).unwrap_or_else(|| panic!("{var}: cargo xtask test sets it")),
    )
}

/// The sections of a BPF object the kernel loads (programs, maps, their
/// relocations, license), by name: everything but BTF and DWARF.
fn loaded_sections(elf: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(elf).expect("an ELF object");
    file.sections()
        .filter_map(|s| {
            let name = s.name().ok()?.to_string();
            let debug = name.starts_with(".BTF")
                || name.starts_with(".debug")
                || name.starts_with(".rel.debug")
                || name.starts_with(".rel.BTF");
            (!debug && !name.is_empty()).then(|| (name, s.data().unwrap_or_default().to_vec()))
        })
        .collect()
}

/// Runs the arm64 daemon under qemu-aarch64 (with Debian's arm64 libc).
fn under_qemu(bin: &Path, args: &[&str]) -> std::process::Output {
    Command::new("qemu-aarch64")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(bin)
        .args(args)
        .output()
        .expect("qemu-aarch64 (Debian package qemu-user)")
}

#[test]
fn the_arm64_daemon_runs_under_qemu_and_embeds_the_very_same_kernel_programs() {
    let bin = given("METAPROXY_ARM64_BIN");
    // An arm64 executable, not this machine's.
    let head = fs::read(&bin).unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([head[18], head[19]]),
        183,
        "e_machine EM_AARCH64"
    );
    // The kernel programs are bpfel: both architectures load the same
    // programs and maps. Only their debug information differs (BTF and
    // DWARF name aya's bindings module, `x86_64::` or `aarch64::`).
    let (native, arm64) = (given("METAPROXY_PROBE"), given("METAPROXY_ARM64_PROBE"));
    let (native, arm64) = (fs::read(native).unwrap(), fs::read(arm64).unwrap());
    let (ours, theirs) = (loaded_sections(&native), loaded_sections(&arm64));
    assert!(
        ours.keys().any(|s| s.starts_with("cgroup/connect4")),
        "the native build embedded no programs: {:?}",
        ours.keys()
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &ours {
        assert!(bytes == &theirs[name], "{name} differs between the builds");
    }
    assert!(
        head.windows(arm64.len()).any(|w| w == arm64.as_slice()),
        "the arm64 binary does not hold its object"
    );

    let help = under_qemu(&bin, &["--help"]);
    let said = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && said.contains("Usage: metaproxy"),
        "{help:?}"
    );

    let policy = packaging().join("policy.example.toml");
    let check = under_qemu(&bin, &["policy", "check", policy.to_str().unwrap()]);
    assert!(check.status.success(), "{check:?}");

    // doctor, offline, on a runner config that keeps NET_RAW and mounts
    // the Docker socket: it runs its checks and fails those.
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../metaproxy/src/doctor/testdata/careless.toml");
    let doctor = under_qemu(
        &bin,
        &[
            "doctor",
            "--offline",
            "--json",
            "--runner-config",
            config.to_str().unwrap(),
            "--defaults",
            "/nonexistent/metaproxy",
        ],
    );
    let out = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "{doctor:?}");
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        checks
            .iter()
            .any(|c| c["level"] == "fail"
                && c["found"].as_str().unwrap_or("").contains("docker.sock")),
        "{out}"
    );
}
