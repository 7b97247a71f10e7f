//! Builds the kernel programs (`metaproxy-ebpf`), so a plain `cargo build`
//! produces a daemon with its BPF object embedded.
//!
//! The build is aya-build 0.2's `build_ebpf`, step for step (the same
//! command, environment, target directory, object path and rerun lines),
//! except for what it prints: aya-build passes every line of the child
//! cargo's output on as a `cargo:warning`, some forty "Compiling ..." lines
//! on every build of the daemon. Here a clean build prints nothing, the
//! eBPF crate's own compiler warnings are passed on as before, and the
//! child's whole output is shown only when it fails.
//!
//! The eBPF crate is compiled with `rustup run <toolchain>`; the nightly
//! toolchain is the one `cargo xtask setup` prepares (rust-src and
//! bpf-linker). METAPROXY_EBPF_TOOLCHAIN overrides it.
//!
//! METAPROXY_SKIP_EBPF (set to anything) skips the kernel programs and
//! embeds an empty object instead, for builds that only exercise the
//! library (`cargo xtask fuzz`, whose sanitizer flags the BPF build cannot
//! take). A daemon built that way cannot load or attach the probe (loading
//! the empty object fails): never ship one.
use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

/// The eBPF crate, a sibling of this one.
const PACKAGE: &str = "metaproxy-ebpf";
/// Its binary, which `kernel/probe.rs` embeds from OUT_DIR.
const OBJECT: &str = "metaproxy-probe";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=METAPROXY_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=METAPROXY_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    if env::var_os("METAPROXY_SKIP_EBPF").is_some() {
        let object = out_dir.join(OBJECT);
        std::fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        println!("cargo:warning=METAPROXY_SKIP_EBPF is set: no kernel programs embedded, this build cannot attach the probe");
        return Ok(());
    }
    let toolchain = env::var("METAPROXY_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("metaproxy has no parent directory"))?
        .join(PACKAGE);
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    build_ebpf(ebpf_dir, &toolchain, &out_dir).context(
        "building metaproxy-ebpf (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

/// What aya-build's `build_ebpf` does for one package with
/// `Toolchain::Custom(toolchain)`, quietly.
fn build_ebpf(root_dir: &str, toolchain: &str, out_dir: &Path) -> anyhow::Result<()> {
    // aya-build's own switch, kept: set to 1 or true, nothing is built.
    const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";
    println!("cargo:rerun-if-env-changed={AYA_BUILD_SKIP}");
    if let Some(skip) = env::var_os(AYA_BUILD_SKIP) {
        if skip == "1" || skip.eq_ignore_ascii_case("true") {
            println!(
                "cargo:warning={AYA_BUILD_SKIP}={}; skipping eBPF build",
                skip.to_string_lossy()
            );
            return Ok(());
        }
    }

    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "big" => "bpfeb-unknown-none",
        "little" => "bpfel-unknown-none",
        _ => bail!("unsupported endian={endian}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let bpf_target_arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };

    // `rustup run <toolchain> <program>`, or the program itself without
    // rustup.
    let rustup = find_in_path("rustup");
    if rustup.is_none() {
        println!("cargo:warning=rustup is not in PATH; proceeding with current toolchain");
    }
    let cmd = |program: &str| match &rustup {
        Some(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", toolchain, program]);
            cmd
        }
        None => Command::new(program),
    };

    // -Z build-std needs unstable features: as RUSTC_BOOTSTRAP says, or as
    // the compiler's channel has them.
    let nightly = is_nightly(cmd("rustc")).context("failed to get rustc version meta")?;
    let use_build_std = match env::var_os("RUSTC_BOOTSTRAP") {
        Some(b) if b == "1" || b == PACKAGE => true,
        Some(b) if b == "-1" => false,
        _ => nightly,
    };

    // A build-dependency on the package rebuilds us when its library
    // changes; this, when its binary does.
    println!("cargo:rerun-if-changed={root_dir}");

    let mut cargo = cmd("cargo");
    cargo.args([
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ]);
    if use_build_std {
        cargo.args(["-Z", "build-std=core"]);
    }
    cargo.args(["--features", ""]);
    cargo.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{bpf_target_arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    );
    // The toolchain's own rustc, not the one building us.
    cargo
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    // Apart from OUT_DIR's artifacts, and from the target directory of the
    // cargo running us (which holds its lock).
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    cargo.arg("--target-dir").arg(&target_dir);

    let built = run_quietly(cargo)?;
    for (name, binary) in &built.executables {
        let dst = out_dir.join(name);
        std::fs::copy(binary, &dst)
            .with_context(|| format!("failed to copy {} to {}", binary.display(), dst.display()))?;
    }
    anyhow::ensure!(
        built.executables.iter().any(|(name, _)| name == OBJECT),
        "the build of {PACKAGE} produced no {OBJECT}"
    );
    Ok(())
}

/// What the child cargo built, by target name.
struct Built {
    executables: Vec<(String, PathBuf)>,
}

/// Runs `cargo` (`--message-format=json`), keeping its output: on success
/// only the compiler's diagnostics (warnings) are passed on, as cargo
/// warnings; on failure everything it said goes to our stderr, which cargo
/// shows under the build script's error.
fn run_quietly(mut cargo: Command) -> anyhow::Result<Built> {
    let mut child = cargo
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to spawn {cargo:?}"))?;
    // Both streams, in the order they come: cargo's progress and errors on
    // stderr, the compiler's diagnostics (rendered) in the JSON on stdout.
    let said = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = BufReader::new(child.stderr.take().context("no stderr")?);
    let stderr = std::thread::spawn({
        let said = Arc::clone(&said);
        move || -> std::io::Result<()> {
            for line in stderr.lines() {
                said.lock().unwrap().push(line?);
            }
            Ok(())
        }
    });
    let mut executables = Vec::new();
    let mut diagnostics = Vec::new();
    let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    for line in stdout.lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            said.lock().unwrap().push(line);
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(executable)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                ) {
                    executables.push((name.to_string(), PathBuf::from(executable)));
                }
            }
            Some("compiler-message") => {
                let rendered = message["message"]["rendered"].as_str().unwrap_or_default();
                said.lock().unwrap().push(rendered.trim_end().to_string());
                diagnostics.push(rendered.trim_end().to_string());
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {cargo:?}"))?;
    stderr
        .join()
        .map_err(|_| anyhow!("reading cargo's stderr panicked"))?
        .context("reading cargo's stderr")?;
    if !status.success() {
        for line in said.lock().unwrap().iter() {
            eprintln!("{line}");
        }
        bail!("{cargo:?} failed ({status}); its output is above");
    }
    for line in diagnostics.iter().flat_map(|d| d.lines()) {
        println!("cargo:warning={line}");
    }
    Ok(Built { executables })
}

/// Whether `rustc -vV` names a nightly release (`1.x.y-nightly`).
fn is_nightly(mut rustc: Command) -> anyhow::Result<bool> {
    let out = rustc.arg("-vV").output().context("running rustc -vV")?;
    anyhow::ensure!(
        out.status.success(),
        "rustc -vV failed: {}",
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .context("rustc -vV names no release")?;
    let pre = release.split_once('-').map_or("", |(_, pre)| pre);
    Ok(pre.split('.').next() == Some("nightly"))
}

/// `program` in a PATH directory, as `which` finds it.
fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
