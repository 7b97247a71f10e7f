//! `metaproxy policy explain`: the decision for a container, rule by rule.

use super::{FactSource, Facts, Policy, RoleDecision, RoleRefusal, TokenState};
use crate::model::container::Container;

impl Policy {
    /// The decision for `c` and, with a policy file in force, each rule's
    /// verdict: what `metaproxy policy explain` prints.
    pub fn explain(&self, c: &Container, token: &TokenState) -> String {
        use std::fmt::Write as _;
        let decision = self.decide_for(c, token);
        let mut out = format!(
            "container {} ({})\n",
            crate::ops::logging::Clean(&c.name),
            c.id
        );
        let arn = match &decision {
            RoleDecision::Role(r) => {
                let _ = writeln!(
                    out,
                    "decision: role {} (session {}, {})",
                    r.arn,
                    r.session_name,
                    match r.id_token {
                        Some(_) => "AssumeRoleWithWebIdentity with the job's ID token",
                        None => "AssumeRole with the instance profile",
                    }
                );
                Some(r.arn.clone())
            }
            RoleDecision::NoRole if Self::native_steps(c) => {
                let _ = writeln!(out, "decision: no role (a build container without CI_ variables: gitlab-runner's native steps mode keeps IAM_ROLE out)");
                None
            }
            RoleDecision::NoRole => {
                let _ = writeln!(out, "decision: no role (no IAM_ROLE from the runner)");
                None
            }
            RoleDecision::Refused(why) => {
                let _ = writeln!(
                    out,
                    "decision: refused: {}",
                    crate::ops::logging::Clean(&why.to_string())
                );
                match why {
                    RoleRefusal::PolicyFile(refusal) => Some(refusal.arn().clone()),
                    _ => None,
                }
            }
        };
        let verified = match token {
            TokenState::Verified(t) => Some(&**t),
            _ => None,
        };
        let facts = Facts::for_container(c, verified);
        let _ = writeln!(
            out,
            "facts ({}): {}",
            match facts.source {
                FactSource::IdToken =>
                    "from the job's verified ID token; its labels and variables are ignored",
                FactSource::Runner => "from gitlab-runner's labels and variables",
            },
            crate::ops::logging::Clean(&facts.to_string())
        );
        match (self.file(), arn) {
            (None, _) => {
                let _ = writeln!(
                    out,
                    "policy file: none (--allow-role, or the instance's account, decides)"
                );
            }
            (Some(file), arn) => {
                let _ = writeln!(
                    out,
                    "policy file: {} ({} rules, {} runners)",
                    file.path(),
                    file.rules(),
                    file.runners()
                );
                match arn {
                    // Line by line: the verdicts quote the container's
                    // facts, which its job wrote.
                    Some(arn) => {
                        for line in file.explain(&arn, &facts).lines() {
                            let _ = writeln!(out, "{}", crate::ops::logging::Clean(line));
                        }
                    }
                    None => out.push_str("  (no role to check against its rules)\n"),
                }
            }
        }
        out
    }
}
