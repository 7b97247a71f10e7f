//! The one glob syntax of the policy: `*` and `?` never match `/` (`**`
//! spans path segments), so `role/ci-*` does not admit `role/ci-x/admin`
//! and a cgroup glob stays within its segment.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use super::PatternError;

/// `pattern` as a glob of that syntax.
pub fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

/// Globs in which `*` and `?` never match `/` (`**` spans path segments):
/// `role/ci-*` must not admit `role/ci-x/admin`.
pub(super) fn glob_set(
    flag: &'static str,
    patterns: &[String],
) -> Result<Option<GlobSet>, PatternError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let err = |pattern: &str| {
        let pattern = pattern.to_string();
        move |source| PatternError {
            flag,
            pattern,
            source,
        }
    };
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(glob(p).map_err(err(p))?);
    }
    set.build().map(Some).map_err(err(&patterns.join(",")))
}
