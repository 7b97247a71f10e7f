//! The real `metaproxy` daemon, run inside the test bed.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    process::{self, ChildGuard},
    scratch::ScratchDir,
};

/// The daemon binary under test.
pub fn metaproxy_bin() -> PathBuf {
    crate::binaries().metaproxy.clone()
}

/// `--admin-socket SOCKET`: how every `metaproxy` command finds its daemon.
fn admin_socket_args(socket: &Path) -> [&OsStr; 2] {
    ["--admin-socket".as_ref(), socket.as_os_str()]
}

/// `metaproxy ARGS --admin-socket SOCKET`, for a daemon at `socket` (or
/// none: a CLI test of a missing daemon).
pub fn admin_command(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(metaproxy_bin());
    cmd.args(args).args(admin_socket_args(socket));
    cmd
}

/// Where and how to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Network namespace file the daemon runs in.
    pub netns: PathBuf,
    /// The cgroup the probe attaches to.
    pub attach_cgroup: PathBuf,
    /// The cgroup the daemon process itself runs in.
    pub own_cgroup: PathBuf,
    /// Extra `metaproxy run` arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// A running daemon with its own pin directory and admin socket. Dropping
/// it stops the daemon and detaches the probe (removing every pin); its
/// directory goes last, once the pins' bpffs is unmounted.
#[derive(Debug)]
pub struct Daemon {
    spec: DaemonSpec,
    child: Option<ChildGuard>,
    pin_dir: PathBuf,
    starts: u32,
    dir: ScratchDir,
}

impl Daemon {
    pub fn start(spec: DaemonSpec) -> anyhow::Result<Self> {
        let dir = ScratchDir::new("mpd")?;
        // A bpffs of the bed's own for the pins, so the host's /sys/fs/bpf
        // is never touched (or mounted); it outlives daemon restarts and
        // goes, with every pin in it, when the daemon guard drops.
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs)?;
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .with_context(|| format!("mounting bpffs at {}", bpffs.display()))?;
        let mut daemon = Self {
            spec,
            child: None,
            pin_dir: bpffs.join("pins"),
            starts: 0,
            dir,
        };
        daemon.launch()?;
        Ok(daemon)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup the daemon process runs in.
    pub fn cgroup(&self) -> &Path {
        &self.spec.own_cgroup
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Everything the daemon has logged, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = admin_command(&self.admin_socket(), &["run"]);
        cmd.arg("--cgroup")
            .arg(&self.spec.attach_cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.spec.args)
            .env("METAPROXY_LOG", "info")
            .env("NO_COLOR", "1")
            // Only what the spec says: no stray AWS or Docker settings from
            // the environment the tests run in.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("DOCKER_HOST")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = process::spawn_in(cmd, &self.spec.netns, &self.spec.own_cgroup)?;
        let ready = crate::wait_for("the daemon's admin socket", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.child().try_wait() {
                return Some(Err(anyhow::anyhow!("daemon exited with {status}")));
            }
            self.admin("status", &[]).ok().map(|_| Ok(()))
        });
        match ready.and_then(|r| r) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => bail!("{e:#}\n--- daemon log ---\n{}", self.log()),
        }
    }

    /// kill -9: the daemon gets no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// SIGTERM; returns whether it exited within the grace period.
    pub fn terminate(&mut self) -> bool {
        self.child
            .take()
            .is_none_or(|mut c| c.terminate(Duration::from_secs(10)))
    }

    /// `metaproxy detach` on this daemon's pins. It refuses while the
    /// daemon answers on its admin socket: stop the daemon first.
    pub fn detach(&self) -> std::io::Result<std::process::Output> {
        self.pins_command(&["detach"]).output()
    }

    /// Starts the daemon again with the same pins, socket and cgroups.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch()
    }

    /// `metaproxy ARGS` aimed at this daemon's admin socket.
    pub fn admin_command(&self, args: &[&str]) -> Command {
        admin_command(&self.admin_socket(), args)
    }

    /// `metaproxy ARGS` run in the bed's network namespace, where the
    /// interface indexes in the pins mean what they say (a clsact guard
    /// filter is found by its interface's index).
    pub fn netns_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.spec.netns.display()))
            .arg(metaproxy_bin())
            .args(args);
        cmd
    }

    /// [`Daemon::netns_command`] aimed at this daemon's pins and admin
    /// socket: `detach`, `status --redirect`.
    pub fn pins_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.netns_command(args);
        cmd.args(self.target_args());
        cmd
    }

    /// `--pin-dir PINS --admin-socket SOCKET` for this daemon.
    fn target_args(&self) -> Vec<std::ffi::OsString> {
        let socket = self.admin_socket();
        ["--pin-dir".as_ref(), self.pin_dir.as_os_str()]
            .into_iter()
            .chain(admin_socket_args(&socket))
            .map(OsStr::to_os_string)
            .collect()
    }

    /// Runs `metaproxy <subcommand> args --admin-socket ...` and returns stdout.
    pub fn admin(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .admin_command(&[&[subcommand], args].concat())
            .output()
            .context("running metaproxy")?;
        if !out.status.success() {
            bail!(
                "metaproxy {subcommand}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `metaproxy doctor`'s arguments for this daemon (its pins and admin
    /// socket) with `runner_config` and the settings file `defaults`.
    pub fn doctor_args(&self, runner_config: &Path, defaults: &Path) -> Vec<std::ffi::OsString> {
        [
            "--runner-config".as_ref(),
            runner_config.as_os_str(),
            "--defaults".as_ref(),
            defaults.as_os_str(),
        ]
        .into_iter()
        .map(OsStr::to_os_string)
        .chain(self.target_args())
        .collect()
    }

    /// `metaproxy connections --json`, parsed.
    pub fn connections(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.admin("connections", &["--json"])?
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l:?}")))
            .collect()
    }

    /// `GET path` on the daemon's metrics listener (`127.0.0.1:9169` in
    /// its namespace, the default): the status code and the body.
    pub fn metrics_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get_in(&self.spec.netns, "127.0.0.1:9169", path)
    }

    /// The value of one sample (`name{labels}` exactly as exposed) on
    /// `/metrics`, or 0 if it is not there yet.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.metrics_get("/metrics").unwrap_or_default();
        sample_value(&body, sample)
    }

    /// `metaproxy status`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.admin("status", &[])?)?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        if std::thread::panicking() {
            eprintln!(
                "--- metaproxy daemon log ({} starts) ---\n{}",
                self.starts,
                self.log()
            );
        }
        let detached = self.detach();
        let pins_left = !detached.is_ok_and(|o| o.status.success()) || self.pin_dir.exists();
        let bpffs = self.dir.join("bpffs");
        let unmounted = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        if pins_left {
            crate::teardown_failed(format!("pins left in {}", self.pin_dir.display()));
        }
        if let Err(e) = unmounted {
            crate::teardown_failed(format!("unmounting {}: {e}", bpffs.display()));
        }
    }
}

/// The value of `sample` (`name{labels}`) in a Prometheus exposition, 0 if
/// absent.
pub fn sample_value(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A plain HTTP/1.0 GET from a thread inside network namespace `netns`.
pub fn http_get_in(netns: &Path, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let (netns, addr, path) = (netns.to_path_buf(), addr.to_string(), path.to_string());
    std::thread::spawn(move || -> anyhow::Result<(u16, String)> {
        nix::sched::setns(
            fs::File::open(&netns)?,
            nix::sched::CloneFlags::CLONE_NEWNET,
        )?;
        let mut stream = std::net::TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").context("no end of headers")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status code")?;
        Ok((status, body.to_string()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the GET thread panicked"))?
}

/// Detaches the link pinned at `path` as root with `CAP_BPF` could
/// (`bpftool link detach`): `BPF_OBJ_GET`, then `BPF_LINK_DETACH`.
pub fn detach_link(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 14],
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
        _rest: [u32; 31],
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut get = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        _rest: [0; 14],
    };
    // SAFETY: a valid bpf_attr for BPF_OBJ_GET (7), of its own size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7,
            &mut get as *mut ObjGet,
            std::mem::size_of::<ObjGet>() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut detach = LinkDetach {
        link_fd: fd as u32,
        _rest: [0; 31],
    };
    // SAFETY: a valid bpf_attr for BPF_LINK_DETACH (34), of its own size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            34,
            &mut detach as *mut LinkDetach,
            std::mem::size_of::<LinkDetach>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_LINK_DETACH: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is ours, from BPF_OBJ_GET.
    unsafe { libc::close(fd as i32) };
}
