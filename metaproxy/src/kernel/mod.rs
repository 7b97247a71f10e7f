//! The kernel side: the eBPF programs' loader and maps (`probe`), the
//! packet guard's placement (`guard`), whether the BPF LSM runs (`lsm`),
//! which user-space relay opened a connection (`relay`),
//! and what both need to name kernel
//! objects: cgroup paths, the address pair and its one key codec, the
//! listen address.

pub mod addrs;
pub mod cgroup;
pub mod guard;
pub mod lsm;
pub mod netaddr;
pub mod probe;
pub mod relay;
pub mod wire;
