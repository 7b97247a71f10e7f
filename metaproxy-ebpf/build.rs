//! Rebuild the eBPF object when bpf-linker changes: it is part of the
//! toolchain that produced the object but not something cargo tracks.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
