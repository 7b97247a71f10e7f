//! metaproxy: per-container AWS credentials for CI jobs, attributed by
//! cgroup in the kernel.
//!
//! The request path runs one way, one module per step:
//!
//! ```text
//! probe (kernel record) -> attribution (address pair -> Caller)
//!   -> identity (Caller -> container or host process)
//!   -> policy (-> role decision; host-process rules)
//!   -> credentials (STS, cache) -> surface (the IMDS answer, or a Denial)
//! ```
//!
//! Beside it, `guard` keeps the packet guard (which `probe` attaches) on
//! the interfaces that route to IMDS, so nothing but the daemon reaches the
//! real IMDS whatever a job sends.
//!
//! `server` runs that path for each accepted connection; `daemon` wires it
//! from a validated `config`. The outside world sits behind traits
//! ([`attribution::RecordSource`], [`identity::ContainerRuntime`],
//! [`credentials::Sts`], [`upstream::Upstream`]) so the whole path runs
//! in-process in tests.
#![forbid(unsafe_code)]

pub mod attribution;
pub mod cli;
pub mod credentials;
pub mod daemon;
pub mod identity;
pub mod kernel;
pub mod model;
pub mod ops;
pub mod policy;
pub mod server;
pub mod surface;
