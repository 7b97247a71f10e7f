//! metaproxy: per-container AWS credentials for CI jobs, attributed by
//! cgroup in the kernel.
//!
//! The request path runs one way, one folder per stage:
//!
//! ```text
//! kernel (probe record) -> attribution (address pair -> Caller)
//!   -> identity (Caller -> container or host process)
//!   -> policy (-> role decision; host-process rules)
//!   -> credentials (STS, a cache by key) -> surface (the IMDS answer, or a Denial)
//!   -> server (accept, fair shares)
//! ```
//!
//! `model` holds what the stages share and imports nothing of the crate;
//! `ops` (metrics, admin socket, connection log, logging) is read by all.
//! Beside the path, `kernel::guard` keeps the packet guard on the
//! interfaces that route to IMDS, so nothing but the daemon reaches the
//! real IMDS whatever a job sends. On top sit `config` (the flags,
//! checked), `daemon` (one wiring of the path, [`daemon::wire`], on the
//! real world or on the tests' fakes), `doctor` and `cli`. The outside
//! world sits behind traits ([`attribution::RecordSource`],
//! [`identity::ContainerRuntime`], [`credentials::Sts`],
//! [`surface::upstream::Upstream`], [`kernel::wire::AnswerPath`]) so the
//! whole path runs in-process in tests. `cargo xtask lint` checks the
//! direction of the imports.
//!
//! No `unsafe` anywhere but `kernel::probe::syscalls`, the few `bpf(2)`
//! commands aya 0.14 does not offer (it says which, and why), and the one
//! `TUNGETDEVNETNS` ioctl in `kernel::relay`, which no crate offers.
#![deny(unsafe_code)]

pub mod attribution;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod doctor;
pub mod identity;
pub mod kernel;
pub mod model;
pub mod ops;
pub mod policy;
pub mod server;
pub mod surface;
