//! Network namespaces for tests: only `lo`, so no route leads off the host.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

/// A network namespace at `/run/netns/<name>`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `lo` up and `addrs` (CIDR strings) on `lo`.
    pub fn new(prefix: &str, addrs: &[&str]) -> anyhow::Result<Self> {
        let ns = Self {
            name: crate::unique_name(prefix),
        };
        ip(&["netns", "add", &ns.name])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        for addr in addrs {
            let family = if addr.contains(':') { "-6" } else { "-4" };
            let mut args = vec![family, "addr", "add", addr, "dev", "lo"];
            if family == "-6" {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns(2)` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Moves the calling thread into the namespace. Sockets it creates from
    /// then on live there, whichever thread later uses them.
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(())
    }
}

impl NetNs {
    /// Runs `f` on a thread inside the namespace (for the test process's own
    /// connections to services there) and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> anyhow::Result<T> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            crate::teardown_failed(format!(
                "could not delete network namespace {}: {e:#}",
                self.name
            ));
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
