//! The answers made from issued credentials, kept with them: credentials
//! never change once issued, so each document is serialised once per
//! refresh, not once per request. And the containers (and cgroups of
//! them) they went to, so the audit line is written once for each.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, OnceLock},
};

use bytes::Bytes;

use crate::{
    credentials::{Credentials, Issued},
    model::ids::{CgroupId, ContainerId},
};

/// Cgroups of one container that get an audit line of their own for one
/// issue of credentials.
const MAX_AUDITED_CGROUPS: usize = 64;

/// The answers kept.
#[derive(Debug, Clone, Copy)]
pub enum Rendering {
    Imds = 0,
    ImdsExtended = 1,
    ContainerCredentials = 2,
}

/// What the surface keeps with one issue of credentials.
#[derive(Default)]
struct Kept {
    bodies: [OnceLock<Bytes>; 3],
    /// Containers, and which of their cgroups, these credentials have been
    /// handed to.
    handed_to: Mutex<HashMap<ContainerId, HashSet<CgroupId>>>,
}

/// The surface's use of issued credentials.
pub trait Served {
    /// The `which` rendering, made by `render` the first time.
    fn rendered(&self, which: Rendering, render: impl FnOnce(&Credentials) -> Bytes) -> Bytes;

    /// Whether this is the first time these credentials go to cgroup
    /// `cgroup` of `container` (what the audit line records; repeats are
    /// only counted).
    fn first_for(&self, container: &ContainerId, cgroup: CgroupId) -> bool;
}

impl Served for Issued {
    fn rendered(&self, which: Rendering, render: impl FnOnce(&Credentials) -> Bytes) -> Bytes {
        match self.served(Kept::default) {
            Some(kept) => kept.bodies[which as usize]
                .get_or_init(|| render(self))
                .clone(),
            None => render(self),
        }
    }

    fn first_for(&self, container: &ContainerId, cgroup: CgroupId) -> bool {
        let Some(kept) = self.served(Kept::default) else {
            return true;
        };
        let mut seen = kept.handed_to.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = seen.entry(container.clone()).or_default();
        if cgroups.len() >= MAX_AUDITED_CGROUPS {
            // A job making cgroup after cgroup gets no line for each (nor
            // the memory): the connection log still lists every request.
            return false;
        }
        cgroups.insert(cgroup)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::credentials::Secret;

    #[test]
    fn a_rendering_is_made_once_and_never_printed() {
        let issued = Issued::new(Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("very-secret".into()),
            session_token: Secret::new("token-secret".into()),
            expiration: SystemTime::now(),
            last_updated: SystemTime::now(),
            assumed_role_arn: String::new(),
        });
        let body = issued.rendered(Rendering::Imds, |c| {
            Bytes::from(c.secret_access_key.expose().to_string())
        });
        assert_eq!(body, "very-secret");
        let again = issued.rendered(Rendering::Imds, |_| unreachable!("made once"));
        assert_eq!(again, "very-secret");
        let printed = format!("{issued:?}");
        assert!(printed.contains("ASIAEXAMPLE"));
        assert!(!printed.contains("very-secret"), "{printed}");
        let id = ContainerId::parse(&"a".repeat(64)).unwrap();
        assert!(issued.first_for(&id, CgroupId(1)));
        assert!(!issued.first_for(&id, CgroupId(1)));
        // A nested container's cgroup gets its own audit line, up to a
        // bound per container.
        assert!(issued.first_for(&id, CgroupId(2)));
        for n in 3..=64 {
            assert!(issued.first_for(&id, CgroupId(n)));
        }
        assert!(!issued.first_for(&id, CgroupId(65)));
        let other = ContainerId::parse(&"b".repeat(64)).unwrap();
        assert!(issued.first_for(&other, CgroupId(65)));
    }
}
