//! moto as STS and IAM: a real third-party implementation that checks SigV4
//! signatures and trust policies once auth is on. It runs inside the test
//! namespace on port 5000 and records every request it serves, so tests can
//! count AssumeRole calls.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use base64::Engine as _;

use crate::{
    fake_imds::InstanceCredentials,
    netns::NetNs,
    process::{self, ChildGuard},
    scratch::ScratchDir,
};

pub const PORT: u16 = 5000;

/// Where `cargo xtask setup` installs moto.
pub fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moto-venv")
}

#[derive(Debug)]
pub struct Moto {
    child: Option<ChildGuard>,
    recording: PathBuf,
    dir: ScratchDir,
}

impl Moto {
    pub fn start(ns: &NetNs, cgroup: &Path, dir: PathBuf) -> anyhow::Result<Self> {
        let dir = ScratchDir::at(dir)?;
        let server = venv().join("bin/moto_server");
        anyhow::ensure!(
            server.exists(),
            "{} is missing: run `cargo xtask setup`",
            server.display()
        );
        let recording = dir.join("recording.jsonl");
        let log = fs::File::create(dir.join("moto.log"))?;
        let mut cmd = Command::new(server);
        cmd.args(["-H", "0.0.0.0", "-p", &PORT.to_string()])
            .env("MOTO_ENABLE_RECORDING", "True")
            // moto writes temporary files; keep them in our directory.
            .env("TMPDIR", dir.path())
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = process::spawn_in(cmd, &ns.path(), cgroup)?;
        let moto = Self {
            child: Some(child),
            recording,
            dir,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
        crate::wait_for("moto", Duration::from_secs(60), || {
            ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
                .ok()
                .flatten()
        })
        .with_context(|| fs::read_to_string(moto.dir.join("moto.log")).unwrap_or_default())?;
        Ok(moto)
    }

    /// Creates the instance role and `job_roles`, assumes the instance role
    /// as EC2 would, turns auth on, and returns the instance credentials.
    pub fn seed(
        &self,
        ns: &NetNs,
        cgroup: &Path,
        job_roles: &[&str],
    ) -> anyhow::Result<InstanceCredentials> {
        self.seed_with(ns, cgroup, job_roles, None)
    }

    /// As [`Moto::seed`]; with `oidc`, also registers that GitLab issuer
    /// and lets the job roles trust its tokens, and leaves auth off (moto
    /// cannot serve unsigned calls with it on).
    pub fn seed_with(
        &self,
        ns: &NetNs,
        cgroup: &Path,
        job_roles: &[&str],
        oidc: Option<&str>,
    ) -> anyhow::Result<InstanceCredentials> {
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("moto_seed.py"))
            .arg(format!("http://127.0.0.1:{PORT}"));
        if let Some(issuer) = oidc {
            cmd.args(["--oidc", issuer]);
        }
        cmd.args(job_roles);
        let out = process::output_in(cmd, &ns.path(), cgroup)?;
        if !out.status.success() {
            bail!("seeding moto: {}", String::from_utf8_lossy(&out.stderr));
        }
        let creds: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("seed output")?;
        let field = |k: &str| creds[k].as_str().unwrap_or_default().to_string();
        Ok(InstanceCredentials {
            access_key_id: field("AccessKeyId"),
            secret_access_key: field("SecretAccessKey"),
            token: field("Token"),
            expiration: field("Expiration"),
        })
    }

    /// Every AssumeRole moto has served, as (RoleArn, RoleSessionName).
    pub fn assume_role_calls(&self) -> Vec<(String, String)> {
        self.assume_role_requests()
            .into_iter()
            .map(|form| {
                let get = |k: &str| {
                    form.iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                (get("RoleArn"), get("RoleSessionName"))
            })
            .collect()
    }

    /// Every AssumeRole moto has served, as its form parameters (Tags,
    /// SourceIdentity and the rest: moto accepts them but keeps nothing).
    pub fn assume_role_requests(&self) -> Vec<Vec<(String, String)>> {
        self.requests("AssumeRole")
            .into_iter()
            .map(|(form, _)| form)
            .collect()
    }

    /// Every request for `action` moto has served: its form parameters and
    /// its headers.
    pub fn requests(&self, action: &str) -> Vec<(Vec<(String, String)>, serde_json::Value)> {
        let text = fs::read_to_string(&self.recording).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| {
                let body = entry["body"].as_str()?;
                let body = if entry["body_encoded"].as_bool() == Some(true) {
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(body)
                            .ok()?,
                    )
                    .ok()?
                } else {
                    body.to_string()
                };
                let form: Vec<(String, String)> = url_form(&body);
                form.iter()
                    .any(|(k, v)| k == "Action" && v == action)
                    .then(|| (form, entry["headers"].clone()))
            })
            .collect()
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) moto: STS stops answering.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused {
                nix::sys::signal::Signal::SIGSTOP
            } else {
                nix::sys::signal::Signal::SIGCONT
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid() as i32), signal);
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.pause(false);
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(5));
        }
    }
}

fn url_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
