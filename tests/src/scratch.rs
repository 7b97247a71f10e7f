//! Scratch directories: the bed's files, a test's own (a policy file, a
//! runner config), the services' data. Each goes, with everything in it,
//! when its guard drops.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// A directory removed with its contents on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh directory in the system's temporary directory, named
    /// `<prefix>-<pid>-<n>` so that `cargo xtask clean` knows it.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        Self::at(std::env::temp_dir().join(crate::unique_name(prefix)))
    }

    /// Creates `path` (and its parents) and owns it from now on.
    pub fn at(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                crate::teardown_failed(format!("scratch directory {}: {e}", self.0.display()));
            }
            _ => {}
        }
    }
}
