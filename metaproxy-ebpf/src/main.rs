//! metaproxy's kernel programs: see [`probe`] for the redirect and
//! attribution, [`guard`] for the packet guard, [`l2`] for the layer-2
//! lock.
//!
//! This crate is built for `bpfel-unknown-none` by `metaproxy`'s build.rs;
//! on the host it compiles to an empty binary so workspace-wide commands
//! (`cargo check --workspace`) keep working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod l2;
#[cfg(target_arch = "bpf")]
mod probe;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("metaproxy-ebpf is a BPF object: metaproxy's build.rs builds it");
}
