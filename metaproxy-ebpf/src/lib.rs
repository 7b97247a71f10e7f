//! Empty on purpose: `metaproxy` takes this crate as a build-dependency so
//! cargo rebuilds the daemon when the kernel programs' dependencies change.
//! The programs are the `metaproxy` binary target (src/main.rs).
#![no_std]
