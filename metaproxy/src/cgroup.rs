//! cgroup v2 paths and ids.
//!
//! The kernel identifies a cgroup by a 64-bit id, which is the inode number of
//! its directory in the cgroup2 filesystem. The probe records that id; this
//! module finds where cgroup2 is mounted (never hard-coded: these hosts mount
//! it at /sys/fs/cgroup/unified, production hosts at /sys/fs/cgroup), turns
//! paths into ids and ids back into paths.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path}: {source}")]
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
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup id of a cgroup2 directory.
pub fn id_of(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err(dir))?.ino())
}

/// The calling process's cgroup2 directory, from `/proc/self/cgroup`.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoCgroup2)?;
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
    fn finds_cgroup2_among_v1_mounts() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v2_host_and_escaped_paths() {
        let mountinfo = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let odd = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(odd), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            parse_cgroup2_mount("30 1 0:26 / /x rw - tmpfs t rw\n"),
            None
        );
    }
}
