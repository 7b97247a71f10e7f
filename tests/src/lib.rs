//! metaproxy's test bed: real kernel parts, each torn down on every exit
//! path by a Drop guard.
//!
//! * [`netns::NetNs`] - a network namespace with only `lo`: nothing in it
//!   can reach another host, so a failed redirect cannot leak a packet.
//! * [`cgroup::TestCgroup`] - a cgroup v2 subtree to attach the probe to
//!   (never the machine's root cgroup).
//! * [`process`] - start processes inside a namespace and a cgroup.
//! * [`daemon::Daemon`] - the real `metaproxy` binary, run in the bed.
//! * [`fake_imds::FakeImds`] - plays the EC2 metadata service on
//!   169.254.169.254:80 and records every caller, with its cgroup when
//!   it is a socket of the host namespace ([`sock_diag`]).
//! * [`imds_net::ImdsNet`] - the fake's own namespace, one routed hop from
//!   the test namespace as IMDS is from an instance, and a log of every
//!   packet that reaches it.
//! * [`moto::Moto`] - STS and IAM (moto, auth on), counting AssumeRole.
//! * [`docker::Dockerd`] - a private dockerd whose containers live under
//!   the probe's cgroup.
//! * [`bed::E2eBed`] - all of the above, for end-to-end tests and the demo.
//! * [`scratch::ScratchDir`] - a directory removed on drop.
//!
//! Everything here needs root and a BPF-capable kernel; a test that cannot
//! build its bed fails with the reason instead of skipping.

pub mod bed;
pub mod cgroup;
pub mod daemon;
pub mod dind;
pub mod docker;
pub mod fake_imds;
pub mod gitlab;
pub mod imds_net;
pub mod moto;
pub mod netns;
pub mod podman;
pub mod process;
pub mod scratch;
pub mod sock_diag;

/// Where the bed finds the binaries it runs: the daemon, and the directory
/// of the clients (`mp-client`, `mp-sdk-client`, `mp-hello`).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub metaproxy: std::path::PathBuf,
    pub dir: std::path::PathBuf,
}

static BINARIES: std::sync::OnceLock<Binaries> = std::sync::OnceLock::new();

/// Tells the bed which binaries to run (xtask's demo and bench, which build
/// them through cargo). Must come before the first bed.
pub fn use_binaries(binaries: Binaries) {
    assert!(
        BINARIES.set(binaries).is_ok(),
        "use_binaries must come before the bed first runs a binary"
    );
}

/// The binaries the bed runs: as given to [`use_binaries`], else from
/// `METAPROXY_BIN` and `MP_BIN_DIR`, which `cargo xtask test` sets on the
/// test run from what cargo reported building.
pub fn binaries() -> &'static Binaries {
    BINARIES.get_or_init(|| {
        let var = |name: &str| {
            std::env::var_os(name).map(std::path::PathBuf::from).unwrap_or_else(|| {
                panic!("{name} is not set: run the suites through `cargo xtask test`, which builds the binaries and says where they are")
            })
        };
        Binaries {
            metaproxy: var("METAPROXY_BIN"),
            dir: var("MP_BIN_DIR"),
        }
    })
}

/// Reports a teardown that left something behind: a panic (the test fails)
/// unless the test is already failing, when a second panic would abort.
pub fn teardown_failed(what: String) {
    if std::thread::panicking() {
        eprintln!("test bed teardown: {what}");
    } else {
        panic!("test bed teardown: {what}");
    }
}

/// A name unique to this process and call, for namespaces, cgroups, pins.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails loudly unless we are root: the bed needs namespaces, cgroups, BPF.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the metaproxy test bed needs root (namespaces, cgroups, BPF): run it through `cargo xtask test` as root"
    );
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
