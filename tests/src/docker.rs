//! A private dockerd inside the test network namespace: its own socket,
//! data-root, exec-root and pidfile, no iptables, and containers under a
//! cgroup parent the probe is attached to. No registry exists here, so
//! images are imported from a busybox rootfs, and programs built on the
//! host run in containers through read-only bind mounts of /usr and /lib.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    netns::NetNs,
    process::{self, ChildGuard},
    scratch::ScratchDir,
};

/// The bridge's gateway: how containers reach services in the namespace.
pub const GATEWAY: &str = "172.31.213.1";
/// A minimal image: busybox, nothing else.
pub const BASE_IMAGE: &str = "mp-base:latest";

/// Fields drop after [`Drop::drop`] has stopped dockerd and unmounted
/// what it left: the directory goes last.
#[derive(Debug)]
pub struct Dockerd {
    child: Option<ChildGuard>,
    dir: ScratchDir,
}

impl Dockerd {
    /// Starts dockerd in `ns`, itself in cgroup `own_cgroup`, putting
    /// containers under `cgroup_parent` (a path below the cgroup2 root).
    pub fn start(
        ns: &NetNs,
        own_cgroup: &Path,
        cgroup_parent: &str,
        dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let dir = ScratchDir::at(dir)?;
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--ip6tables=false",
            ])
            .arg("--bip")
            .arg(format!("{GATEWAY}/24"))
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .arg("--cgroup-parent")
            .arg(cgroup_parent)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = process::spawn_in(cmd, &ns.path(), own_cgroup)?;
        let dockerd = Self {
            child: Some(child),
            dir,
        };
        let ready = crate::wait_for("dockerd", Duration::from_secs(60), || {
            dockerd
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .ok()
        });
        if let Err(e) = ready {
            bail!(
                "{e:#}\n--- dockerd log ---\n{}",
                fs::read_to_string(dockerd.dir.join("dockerd.log")).unwrap_or_default()
            );
        }
        dockerd.import_image(BASE_IMAGE, &[])?;
        Ok(dockerd)
    }

    /// `DOCKER_HOST` for this daemon.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.host());
        cmd
    }

    /// Runs `docker args...`, returning stdout (trimmed) or the error.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running docker")?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// POSTs `body` to the Docker API at `path` (below the API version) and
    /// returns the response body; fails on a non-2xx status.
    pub fn api_post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<String> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::os::unix::net::UnixStream::connect(self.dir.join("docker.sock"))?;
        let body = body.to_string();
        write!(
            stream,
            "POST /v1.41{path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split_whitespace().nth(1).unwrap_or("");
        if !status.starts_with('2') {
            bail!("docker API POST {path}: {response}");
        }
        Ok(response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string())
    }

    /// The busybox rootfs as a tar (made by the first import), for a
    /// dockerd inside a container to import too.
    pub fn rootfs_tar(&self) -> anyhow::Result<PathBuf> {
        let tar = self.dir.join("rootfs.tar");
        anyhow::ensure!(tar.exists(), "no image imported yet");
        Ok(tar)
    }

    /// Imports the busybox rootfs as `name`, with extra Dockerfile-style
    /// `changes` (e.g. `ENV IAM_ROLE=x`).
    pub fn import_image(&self, name: &str, changes: &[&str]) -> anyhow::Result<()> {
        let rootfs = self.dir.join("rootfs");
        if !rootfs.exists() {
            let bin = rootfs.join("bin");
            fs::create_dir_all(&bin)?;
            fs::create_dir_all(rootfs.join("tmp"))?;
            fs::create_dir_all(rootfs.join("etc"))?;
            fs::copy("/bin/busybox", bin.join("busybox"))
                .context("copying /bin/busybox (apt install busybox-static)")?;
            for applet in ["sh", "sleep", "cat", "ls", "env"] {
                std::os::unix::fs::symlink("busybox", bin.join(applet))?;
            }
        }
        let tar = self.dir.join("rootfs.tar");
        if !tar.exists() {
            let ok = Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg(".")
                .status()?
                .success();
            anyhow::ensure!(ok, "tar of the rootfs failed");
        }
        let mut args = vec!["import".to_string()];
        for change in ["ENV PATH=/bin", "CMD [\"/bin/sh\"]"].iter().chain(changes) {
            args.push("--change".into());
            args.push(change.to_string());
        }
        args.push(tar.display().to_string());
        args.push(name.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.docker(&args)?;
        Ok(())
    }

    /// `docker run` arguments that make host binaries runnable in a busybox
    /// container: read-only /usr, /lib, /lib64, the CA store (the SDK loads
    /// it at start-up even for plain HTTP), and each binary at /<name>.
    pub fn host_binary_mounts(binaries: &[&Path]) -> Vec<String> {
        let mut args = Vec::new();
        for dir in ["/usr", "/lib", "/lib64", "/etc/ssl"] {
            if Path::new(dir).exists() {
                args.push("-v".into());
                args.push(format!("{dir}:{dir}:ro"));
            }
        }
        for bin in binaries {
            let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or("bin");
            args.push("-v".into());
            args.push(format!("{}:/{name}:ro", bin.display()));
        }
        args
    }

    /// `docker run --rm` with `args` (options, image, command); returns the
    /// whole output whatever the exit status.
    pub fn run(&self, args: &[String]) -> anyhow::Result<Output> {
        self.command()
            .arg("run")
            .arg("--rm")
            .args(args)
            .output()
            .context("docker run")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(20));
        }
        unmount_below(self.dir.path());
    }
}

/// Unmounts anything still mounted below `dir` (overlay mounts of a dockerd
/// that did not stop cleanly), deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}
