//! The one glob syntax of the policy: `*` and `?` never match `/` (`**`
//! spans path segments), so `role/ci-*` does not admit `role/ci-x/admin`
//! and a cgroup glob stays within its segment.

use globset::{Glob, GlobBuilder};

/// `pattern` as a glob of that syntax.
pub fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}
