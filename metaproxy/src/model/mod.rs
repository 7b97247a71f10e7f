//! The facts every stage shares, and nothing else: ids, the caller the
//! kernel recorded, the host's interfaces, the container as the runtime
//! reports it, what gitlab-runner writes into it, the claims
//! of a job's verified GitLab ID token, and the session a role is assumed
//! as. A leaf: it imports no other module of the crate.

pub mod caller;
pub mod container;
pub mod gitlab;
pub mod id_token;
pub mod ids;
pub mod interface;
pub mod secret;
pub mod session;
