//! `cargo xtask setup`: install what a fresh Debian 12 machine of this kind
//! lacks, and nothing else. Every step checks first, so a second run is
//! quick and prints nothing. [`run`] installs everything (`setup`, `test`);
//! [`for_bed`] only what building metaproxy and starting the test bed need
//! (`demo`, `bench`).

use std::process::Command;

use crate::{run_cmd, succeeds};

/// The nightly toolchain metaproxy's build script compiles the kernel
/// programs with.
pub const EBPF_TOOLCHAIN: &str = "nightly";
/// Debian packages the test bed needs: iproute2 for namespaces, dockerd
/// (docker.io, with the 20.10 CLI for `docker build`) for the job
/// containers, busybox-static and tar for their image, python3-venv for
/// moto.
const BED_PACKAGES: &[&str] = &[
    "iproute2",
    "docker.io",
    "busybox-static",
    "python3-venv",
    "tar",
];
/// What only the tests add: systemd for `systemd-analyze verify` of the
/// unit, rpm to read and install the .rpm.
const TEST_PACKAGES: &[&str] = &["systemd", "rpm"];
/// Rootful Podman for the runtimes suite (Debian's 4.3.1, with netavark;
/// runc comes with docker.io), installed without starting its units.
const PODMAN_PACKAGES: &[&str] = &["podman", "netavark", "aardvark-dns"];
/// moto, the STS/IAM the tests run against.
const MOTO: &str = "moto[server]==5.2.5";

/// Everything: the bed, and what the tests and packaging add (systemd,
/// cargo-deb).
pub fn run() -> anyhow::Result<()> {
    install(true)
}

/// What building metaproxy and starting the test bed need, without
/// cargo-deb (1.5 minutes to build) and systemd, which only the tests and
/// packaging use.
pub fn for_bed() -> anyhow::Result<()> {
    install(false)
}

/// `everything`: the tests' and packaging's tools too.
fn install(everything: bool) -> anyhow::Result<()> {
    rust_src()?;
    let mut packages = BED_PACKAGES.to_vec();
    if everything {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    apt(&packages)?;
    if everything {
        apt_without_starting(PODMAN_PACKAGES)?;
    }
    bpf_linker()?;
    if everything {
        cargo_deb()?;
        cargo_generate_rpm()?;
        cross()?;
    }
    moto()?;
    Ok(())
}

/// moto in a virtualenv under target/ (see metaproxy_tests::moto::venv).
fn moto() -> anyhow::Result<()> {
    let venv = metaproxy_tests::moto::venv();
    if venv.join("bin/moto_server").exists() {
        return Ok(());
    }
    println!("setup: installing {MOTO} into {}", venv.display());
    run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "--quiet", MOTO]))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("setup: adding rust-src to the {EBPF_TOOLCHAIN} toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }
    Ok(())
}

/// Installs the Debian packages in `pkgs` that are missing.
pub fn apt(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: apt-get install {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs Debian packages for the benchmark without starting their
/// services (a policy-rc.d that says no, for the install only): nginx must
/// not take port 80 on the host.
pub fn apt_without_starting(pkgs: &[&str]) -> anyhow::Result<()> {
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    if policy.exists() {
        return apt(pkgs);
    }
    std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
    std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let result = apt(pkgs);
    std::fs::remove_file(policy)?;
    result
}

/// cargo-deb builds the Debian package (`cargo xtask package`).
pub fn cargo_deb() -> anyhow::Result<()> {
    if succeeds(Command::new("cargo").args(["deb", "--version"])) {
        return Ok(());
    }
    println!("setup: cargo install cargo-deb (about 1.5 minutes)");
    run_cmd(Command::new("cargo").args(["install", "cargo-deb@3.8.0", "--locked"]))
}

/// The arm64 cross build: Debian's aarch64 gcc and libc, qemu-user to run
/// what it builds, and Rust's standard library for the target.
pub fn cross() -> anyhow::Result<()> {
    apt(&[
        "gcc-aarch64-linux-gnu",
        "libc6-dev-arm64-cross",
        "qemu-user",
    ])?;
    let target = crate::arm64::TARGET;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == target)
        });
    if !installed {
        println!("setup: rustup target add {target}");
        run_cmd(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

/// cargo-generate-rpm builds the RPM package (`cargo xtask package`).
pub fn cargo_generate_rpm() -> anyhow::Result<()> {
    if succeeds(Command::new("cargo").args(["generate-rpm", "--version"])) {
        return Ok(());
    }
    println!("setup: cargo install cargo-generate-rpm (about 2 minutes)");
    run_cmd(Command::new("cargo").args(["install", "cargo-generate-rpm@0.21.1", "--locked"]))
}

/// bpf-linker links the kernel programs. The newest release wants LLVM 23;
/// 0.13.0 built against Debian's LLVM 22 works here and builds in about 1.5
/// minutes.
fn bpf_linker() -> anyhow::Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    apt(&["llvm-22-dev", "libzstd-dev", "zlib1g-dev"])?;
    println!("setup: cargo install bpf-linker (about 1.5 minutes)");
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker@0.13.0",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}
