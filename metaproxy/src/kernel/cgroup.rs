//! cgroup v2 paths and ids.
//!
//! The kernel identifies a cgroup by a 64-bit id, which is the inode number of
//! its directory in the cgroup2 filesystem. The probe records that id; this
//! module finds where cgroup2 is mounted (never hard-coded: these hosts mount
//! it at /sys/fs/cgroup/unified, production hosts at /sys/fs/cgroup), turns
//! paths into ids and ids back into paths.

use metaproxy_common::mountinfo;
use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); metaproxy needs cgroup v2: boot with systemd.unified_cgroup_hierarchy=1, or mount it (mount -t cgroup2 none /sys/fs/cgroup/unified)")]
    NoCgroup2,
    // The cause is the error's source: printed once, by whoever prints the
    // chain, never twice.
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a directory in the cgroup2 filesystem mounted at {1}")]
    NotCgroup2(PathBuf, PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the cgroup2 filesystem is mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    mountinfo::cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

/// The cgroup id of a cgroup2 directory.
pub fn id_of(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err(dir))?.ino())
}

/// The calling process's cgroup2 directory, from `/proc/self/cgroup`.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    cgroup_of(mount, "self")
}

/// Process `pid`'s cgroup2 directory (`self` for the caller's), from
/// `/proc/PID/cgroup`.
pub fn cgroup_of(mount: &Path, pid: &str) -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let path = path.as_path();
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let rel = mountinfo::own_cgroup2(&text).ok_or(CgroupError::NoCgroup2)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Checks that `dir` is a directory of the cgroup2 filesystem at `mount`.
pub fn check_cgroup2_dir(mount: &Path, dir: &Path) -> Result<(), CgroupError> {
    let m = fs::metadata(mount).map_err(io_err(mount))?;
    let d = fs::metadata(dir).map_err(io_err(dir))?;
    if !d.is_dir() || d.dev() != m.dev() {
        return Err(CgroupError::NotCgroup2(dir.to_owned(), mount.to_owned()));
    }
    Ok(())
}

/// Maps cgroup ids back to paths (relative to the cgroup2 mount, starting
/// with `/`), by walking the tree under the mount. Results are cached; a miss
/// rescans, since cgroups come and go with containers.
#[derive(Debug)]
pub struct CgroupPaths {
    mount: PathBuf,
    cache: Mutex<HashMap<u64, Arc<str>>>,
}

/// Bound on cached paths; the cache is rebuilt from a fresh scan past it.
const MAX_CACHED: usize = 16_384;

impl CgroupPaths {
    pub fn new(mount: PathBuf) -> Self {
        Self {
            mount,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The path of cgroup `id`, or `None` if no such cgroup exists (any
    /// more). Blocking: walks the filesystem on a cache miss.
    pub fn path_of(&self, id: u64) -> Option<Arc<str>> {
        if let Some(p) = self.cached(id) {
            return Some(p);
        }
        let mut found = HashMap::new();
        self.scan(&self.mount, &mut found, 0);
        let mut cache = self.lock();
        if cache.len() + found.len() > MAX_CACHED {
            cache.clear();
        }
        let hit = found.get(&id).cloned();
        cache.extend(found);
        hit
    }

    /// The path of cgroup `id` if it is cached; never blocks on the
    /// filesystem.
    pub fn cached(&self, id: u64) -> Option<Arc<str>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<str>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn scan(&self, dir: &Path, found: &mut HashMap<u64, Arc<str>>, depth: usize) {
        // Deeper than any real layout (systemd slices nest a handful deep).
        if depth > 32 {
            return;
        }
        if let Ok(meta) = fs::metadata(dir) {
            let rel = dir.strip_prefix(&self.mount).unwrap_or(dir);
            found.insert(meta.ino(), format!("/{}", rel.display()).into());
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.scan(&entry.path(), found, depth + 1);
            }
        }
    }
}

/// The other processes (pid, comm) than `me` in cgroup `own`, kernel
/// threads aside (they make no connects of their own): every process in the
/// daemon's cgroup bypasses the redirect. Unreadable: none, with a warning.
pub fn companions(own: &Path, me: u32) -> Vec<(u32, String)> {
    let procs = match std::fs::read_to_string(own.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(e) => {
            tracing::warn!(cgroup = %own.display(), error = %e, "cannot list the processes in a cgroup");
            return Vec::new();
        }
    };
    others_in(&procs, me)
        .into_iter()
        .filter_map(|pid| {
            // Gone meanwhile: not a companion.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            (!is_kernel_thread(&stat)).then(|| (pid, comm_of(&stat)))
        })
        .collect()
}

/// The pids in `cgroup.procs` text other than `me`.
fn others_in(procs: &str, me: u32) -> Vec<u32> {
    procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| *pid != me)
        .collect()
}

/// `/proc/PID/stat`'s comm (between the first `(` and the last `)`).
fn comm_of(stat: &str) -> String {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => stat[a + 1..b].to_string(),
        _ => "?".into(),
    }
}

/// Whether `/proc/PID/stat` is a kernel thread's (`PF_KTHREAD` in flags,
/// the ninth field).
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companions_are_other_processes_not_kernel_threads() {
        let procs = "1\n4242\n77\n\n";
        assert_eq!(others_in(procs, 4242), [1, 77]);
        let bash = "77 (bash) S 1 77 77 34816 77 4194560 1 2 0 0 0 0";
        let kworker = "3 (kworker/0:0-events) I 2 0 0 0 -1 69238880 0 0 0 0";
        let odd = "78 (a) b) (c) S 1 77 77 34816 77 4194560 1 2";
        assert!(!is_kernel_thread(bash));
        assert!(is_kernel_thread(kworker));
        assert!(!is_kernel_thread(odd));
        assert_eq!(comm_of(bash), "bash");
        assert_eq!(comm_of(odd), "a) b) (c");
    }

    #[test]
    fn a_missing_cgroup_says_its_cause_once() {
        let err = id_of(Path::new("/nonexistent-cgroup")).unwrap_err();
        let printed = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            printed,
            "/nonexistent-cgroup: No such file or directory (os error 2)"
        );
    }
}
