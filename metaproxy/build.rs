//! Builds the kernel programs (`metaproxy-ebpf`) with aya-build, so a plain
//! `cargo build` produces a daemon with its BPF object embedded.
//!
//! aya-build compiles the eBPF crate with `rustup run <toolchain>`; the
//! nightly toolchain is the one `cargo xtask setup` prepares (rust-src and
//! bpf-linker). METAPROXY_EBPF_TOOLCHAIN overrides it.
//!
//! METAPROXY_SKIP_EBPF (set to anything) skips the kernel programs and
//! embeds an empty object instead, for builds that only exercise the
//! library (`cargo xtask fuzz`, whose sanitizer flags the BPF build cannot
//! take). A daemon built that way cannot load or attach the probe (loading
//! the empty object fails): never ship one.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=METAPROXY_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=METAPROXY_SKIP_EBPF");
    if std::env::var_os("METAPROXY_SKIP_EBPF").is_some() {
        let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?;
        let object = std::path::Path::new(&out_dir).join("metaproxy-probe");
        std::fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        println!("cargo:warning=METAPROXY_SKIP_EBPF is set: no kernel programs embedded, this build cannot attach the probe");
        return Ok(());
    }
    let toolchain = std::env::var("METAPROXY_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("metaproxy has no parent directory"))?
        .join("metaproxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [Package {
            name: "metaproxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building metaproxy-ebpf (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}
