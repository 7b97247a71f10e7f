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
    let path = Path::new("/proc/self/cgroup");
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

#[cfg(test)]
mod tests {
    use super::*;

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
