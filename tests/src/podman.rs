//! A private rootful Podman inside the test network namespace, serving its
//! API (Docker-compatible, as gitlab-runner's `host = unix://...podman.sock`
//! uses it) on a socket of its own: storage, run state, network config and
//! runc's state in a scratch directory, the cgroupfs manager, and
//! containers under a cgroup parent the probe is attached to. Its netavark
//! bridge (`podman0`, 10.88.0.0/16) and NAT rules live in the namespace.
//!
//! The service runs in a cgroup of its own, outside the attached subtree;
//! conmon, which Podman double-forks, lands there too, and goes with
//! `cgroup.kill` on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    docker::{unmount_below, Dockerd},
    netns::NetNs,
    process::{self, ChildGuard},
    scratch::ScratchDir,
};

/// The bridge's gateway: how Podman's containers reach services in the
/// namespace.
pub const GATEWAY: &str = "10.88.0.1";
/// A minimal image: busybox, nothing else.
pub const BASE_IMAGE: &str = "mp-base:latest";

/// Fields drop after [`Drop::drop`] has removed the containers and stopped
/// the service: the directory goes last.
#[derive(Debug)]
pub struct Podman {
    child: Option<ChildGuard>,
    own_cgroup: PathBuf,
    /// Where containers go (Podman 4.3 takes it per container only).
    cgroup_parent: String,
    dir: ScratchDir,
}

impl Podman {
    /// Where a Podman started in `dir` listens: known before it starts, so
    /// that the daemon can be told `--podman-host`.
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("podman.sock")
    }

    /// Starts `podman system service` in `ns`, itself in cgroup
    /// `own_cgroup`, putting containers under `cgroup_parent` (a path below
    /// the cgroup2 root).
    pub fn start(
        ns: &NetNs,
        own_cgroup: &Path,
        cgroup_parent: &str,
        dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let dir = ScratchDir::at(dir)?;
        for sub in ["root", "runroot", "tmp", "netconf", "cfg", "runc"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.path().display();
        fs::write(
            dir.join("cfg/containers.conf"),
            format!(
                "[containers]\n\
                 # Podman raises rlimits to these otherwise, which needs CAP_SYS_RESOURCE.\n\
                 default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
                 log_driver = \"k8s-file\"\n\
                 [network]\n\
                 network_backend = \"netavark\"\n\
                 network_config_dir = \"{d}/netconf\"\n\
                 [engine]\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = \"{d}/tmp/events.log\"\n\
                 tmp_dir = \"{d}/tmp\"\n\
                 volume_path = \"{d}/root/volumes\"\n\
                 image_copy_tmp_dir = \"{d}/tmp\"\n\
                 runtime = \"runc\"\n"
            ),
        )?;
        fs::write(
            dir.join("cfg/storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n"),
        )?;
        let log = fs::File::create(dir.join("podman.log"))?;
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", dir.join("cfg/containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", dir.join("cfg/storage.conf"))
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("runroot"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--network-backend", "netavark", "--network-config-dir"])
            .arg(dir.join("netconf"))
            .args(["--events-backend", "file", "--runtime", "runc"])
            .arg("--runtime-flag")
            .arg(format!("root={d}/runc"))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", Self::socket_in(dir.path()).display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = process::spawn_in(cmd, &ns.path(), own_cgroup)?;
        let podman = Self {
            child: Some(child),
            own_cgroup: own_cgroup.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
            dir,
        };
        let ready = crate::wait_for("podman", Duration::from_secs(60), || {
            podman
                .podman(&["version", "--format", "{{.Server.Version}}"])
                .ok()
        });
        if let Err(e) = ready {
            bail!("{e:#}\n--- podman log ---\n{}", podman.log());
        }
        podman.import_base_image()?;
        Ok(podman)
    }

    /// The service's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("podman.log")).unwrap_or_default()
    }

    /// `--podman-host` for this Podman.
    pub fn host(&self) -> String {
        format!("unix://{}", Self::socket_in(self.dir.path()).display())
    }

    /// The remote client, talking to this service alone.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(["--remote", "--url"]).arg(self.host());
        cmd
    }

    /// Runs `podman args...` against the service, returning stdout
    /// (trimmed) or the error.
    pub fn podman(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `podman run --rm` with `args` (options, image, command), under the
    /// bed's cgroup parent; returns the whole output whatever the exit
    /// status.
    pub fn run(&self, args: &[String]) -> anyhow::Result<Output> {
        self.command()
            .arg("run")
            .arg("--rm")
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(args)
            .output()
            .context("podman run")
    }

    /// The busybox rootfs, imported as [`BASE_IMAGE`].
    fn import_base_image(&self) -> anyhow::Result<()> {
        let rootfs = self.dir.join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin)?;
        fs::create_dir_all(rootfs.join("tmp"))?;
        fs::create_dir_all(rootfs.join("etc"))?;
        fs::copy("/bin/busybox", bin.join("busybox"))
            .context("copying /bin/busybox (apt install busybox-static)")?;
        for applet in ["sh", "sleep", "cat", "ls", "env"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
        let tar = self.dir.join("rootfs.tar");
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?
            .success();
        anyhow::ensure!(ok, "tar of the rootfs failed");
        let tar = tar.display().to_string();
        self.podman(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            "--change",
            "CMD [\"/bin/sh\"]",
            &tar,
            BASE_IMAGE,
        ])?;
        Ok(())
    }

    /// `podman run` arguments that make host binaries runnable in a busybox
    /// container, as [`Dockerd::host_binary_mounts`] does for Docker.
    pub fn host_binary_mounts(binaries: &[&Path]) -> Vec<String> {
        Dockerd::host_binary_mounts(binaries)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(20));
        }
        // conmon double-forks out of the service's process tree but stays
        // in its cgroup: whatever is left there goes now.
        let _ = fs::write(self.own_cgroup.join("cgroup.kill"), "1");
        unmount_below(self.dir.path());
    }
}
