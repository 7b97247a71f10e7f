//! Builds the kernel programs (`metaproxy-ebpf`) with aya-build, so a plain
//! `cargo build` produces a daemon with its BPF object embedded.
//!
//! aya-build compiles the eBPF crate with `rustup run <toolchain>`; the
//! nightly toolchain is the one `cargo xtask setup` prepares (rust-src and
//! bpf-linker). METAPROXY_EBPF_TOOLCHAIN overrides it.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=METAPROXY_EBPF_TOOLCHAIN");
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
