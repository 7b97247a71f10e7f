//! `container_roots`: the container ids a cgroup path names, each with the
//! subtree that names it.
//!
//! Input: the cgroup path (UTF-8; other inputs are skipped). Each root must
//! be the path up to a '/' boundary (or the whole path), end in the
//! component that names its id, name the runtime its prefix names, and the
//! roots must come outermost first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::identity::{container_roots, RuntimeKind};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let mut last_len = None;
    for (id, root, kind) in container_roots(path) {
        assert!(
            path.starts_with(root),
            "{root:?} is not a prefix of {path:?}"
        );
        assert!(
            root.len() == path.len() || path.as_bytes()[root.len()] == b'/',
            "{root:?} does not end at a component of {path:?}"
        );
        // Ids are lowercased; the path may spell them in either case.
        let component = root.rsplit('/').next().unwrap_or(root);
        let component = component.strip_suffix(".scope").unwrap_or(component);
        assert!(
            component.to_ascii_lowercase().ends_with(id.as_str()),
            "{root:?} does not end in the component naming {id}"
        );
        // The runtime is the one the prefix names, and only that prefix.
        let prefix = &component[..component.len() - 64];
        let expected = match prefix {
            "" | "docker-" => Some(RuntimeKind::Docker),
            "libpod-" => Some(RuntimeKind::Podman),
            _ => None,
        };
        assert_eq!(kind, expected, "{root:?} names the wrong runtime");
        assert!(
            last_len.is_none_or(|l| root.len() > l),
            "roots of {path:?} are not outermost first"
        );
        last_len = Some(root.len());
    }
});
