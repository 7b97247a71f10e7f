//! A GitLab instance as far as its ID tokens go (`fake_gitlab.py`): the
//! discovery document, the JWKS, and JWTs with GitLab's claims signed by a
//! key made at start. It runs in the test namespace on loopback, the
//! issuer the daemon is given.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::{
    moto,
    netns::NetNs,
    process::{self, ChildGuard},
    scratch::ScratchDir,
};

pub const PORT: u16 = 5001;
pub const ISSUER: &str = "http://127.0.0.1:5001";
pub const AUDIENCE: &str = "sts.amazonaws.com";

#[derive(Debug)]
pub struct FakeGitlab {
    child: Option<ChildGuard>,
    netns: PathBuf,
    dir: ScratchDir,
}

impl FakeGitlab {
    pub fn start(ns: &NetNs, cgroup: &Path, dir: PathBuf) -> anyhow::Result<Self> {
        let dir = ScratchDir::at(dir)?;
        let log = fs::File::create(dir.join("gitlab.log"))?;
        let mut cmd = Command::new(moto::venv().join("bin/python"));
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("fake_gitlab.py"))
            .args(["127.0.0.1", &PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = process::spawn_in(cmd, &ns.path(), cgroup)?;
        let gitlab = Self {
            child: Some(child),
            netns: ns.path(),
            dir,
        };
        crate::wait_for("the fake GitLab", Duration::from_secs(30), || {
            gitlab.get("/-/test/stats").ok()
        })
        .with_context(|| gitlab.log())?;
        Ok(gitlab)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("gitlab.log")).unwrap_or_default()
    }

    /// GitLab's claims for job `job_id` of `group/app` on protected `main`,
    /// valid for an hour; `extra` overrides any of them.
    pub fn claims(job_id: &str, extra: Value) -> Value {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = json!({
            "namespace_id": "72", "namespace_path": "group",
            "project_id": "20", "project_path": "group/app",
            "user_id": "1", "user_login": "dev", "user_email": "dev@example.com",
            "user_access_level": "developer",
            "pipeline_id": "574", "pipeline_source": "push",
            "job_id": job_id,
            "ref": "main", "ref_type": "branch", "ref_path": "refs/heads/main",
            "ref_protected": "true",
            "runner_id": 1, "runner_environment": "self-hosted",
            "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
            "project_visibility": "private",
            "ci_config_ref_uri": "gitlab.example.com/group/app//.gitlab-ci.yml@refs/heads/main",
            "ci_config_sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
            "jti": format!("jti-{job_id}-{now}"),
            "iss": ISSUER,
            "iat": now, "nbf": now - 5, "exp": now + 3600,
            "sub": "project_path:group/app:ref_type:branch:ref:main",
            "aud": AUDIENCE,
        });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            claims[k] = v;
        }
        claims
    }

    /// A JWT of `claims` signed with key `key` (`a`, `b` or `rogue`) under
    /// its own kid.
    pub fn mint(&self, key: &str, claims: &Value) -> String {
        self.post(
            "/-/test/mint",
            &json!({ "key": key, "claims": claims }).to_string(),
        )
        .expect("minting a token")
    }

    /// A JWT of `claims` signed with `key` but naming key id `kid`.
    pub fn mint_as(&self, key: &str, kid: &str, claims: &Value) -> String {
        self.post(
            "/-/test/mint",
            &json!({ "key": key, "kid": kid, "claims": claims }).to_string(),
        )
        .expect("minting a token")
    }

    /// Publishes exactly these keys in the JWKS.
    pub fn publish(&self, keys: &[&str]) {
        self.post("/-/test/publish", &json!(keys).to_string())
            .expect("publishing keys");
    }

    /// How often the JWKS has been fetched.
    pub fn jwks_fetches(&self) -> u64 {
        let stats: Value = serde_json::from_str(&self.get("/-/test/stats").unwrap()).unwrap();
        stats["jwks_fetches"].as_u64().unwrap_or_default()
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        self.http(format!(
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{PORT}\r\n\r\n"
        ))
    }

    fn post(&self, path: &str, body: &str) -> anyhow::Result<String> {
        self.http(format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{PORT}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    /// One HTTP/1.0 exchange from a thread inside the namespace.
    fn http(&self, request: String) -> anyhow::Result<String> {
        let path = self.netns.clone();
        let raw = std::thread::spawn(move || -> anyhow::Result<String> {
            nix::sched::setns(fs::File::open(path)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut s = TcpStream::connect_timeout(
                &([127, 0, 0, 1], PORT).into(),
                Duration::from_millis(500),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("fake GitLab thread panicked"))??;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        if !head.starts_with("HTTP/1.0 2") && !head.starts_with("HTTP/1.1 2") {
            bail!("fake GitLab: {head}");
        }
        Ok(body.to_string())
    }
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(5));
        }
    }
}
