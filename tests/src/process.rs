//! Starting processes inside a test network namespace and cgroup, and
//! reading what they use.

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Output},
};

use anyhow::Context as _;

/// Configures `cmd` to join the namespace at `netns` and the cgroup `cgroup`
/// between fork and exec, so its very first instruction already runs there.
/// Returns the files that must stay open until the command is spawned.
pub fn confine(
    cmd: &mut Command,
    netns: &Path,
    cgroup: &Path,
) -> anyhow::Result<(fs::File, fs::File)> {
    let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two async-signal-safe syscalls on fds that the parent keeps open
    // until spawn() returns (we hand the Files back to the caller).
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((ns, procs))
}

/// Spawns `cmd` confined to `netns` and `cgroup`; the child is killed when
/// the guard drops.
pub fn spawn_in(mut cmd: Command, netns: &Path, cgroup: &Path) -> anyhow::Result<ChildGuard> {
    let _keep = confine(&mut cmd, netns, cgroup)?;
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    Ok(ChildGuard(Some(child)))
}

/// Runs `cmd` to completion confined to `netns` and `cgroup`.
pub fn output_in(mut cmd: Command, netns: &Path, cgroup: &Path) -> anyhow::Result<Output> {
    let _keep = confine(&mut cmd, netns, cgroup)?;
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// The resident memory of process `pid` (`VmRSS` in `/proc/PID/status`),
/// in KiB.
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// A child process that is killed (by its PID) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Guards a child spawned elsewhere.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait; returns whether it exited by itself.
    pub fn terminate(&mut self, grace: std::time::Duration) -> bool {
        let Some(mut child) = self.0.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
