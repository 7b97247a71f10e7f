//! The daemon's tasks: one set that fails the daemon if any of them ends
//! when it should not, each under the name it is logged by.

use std::{collections::HashMap, future::Future};

use tokio::task::JoinSet;

/// Tasks by id, with the name they are logged under and whether they may
/// finish on their own.
#[derive(Debug, Default)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, (&'static str, bool)>,
}

impl Tasks {
    /// A task that runs as long as the daemon does.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, false));
    }

    /// A task that finishes once its work is done.
    pub fn spawn_finite(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, (name, true));
    }

    /// Waits for a task to end; `Err` if it should not have.
    pub(super) async fn next_failure(&mut self) -> anyhow::Error {
        loop {
            let Some(done) = self.set.join_next_with_id().await else {
                return anyhow::anyhow!("no tasks left");
            };
            let (id, panic) = match done {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), Some(e.to_string())),
            };
            let (name, finite) = self.names.remove(&id).unwrap_or(("unknown", false));
            match panic {
                None if finite => tracing::debug!(task = name, "task done"),
                None => {
                    tracing::error!(task = name, "task ended unexpectedly");
                    return anyhow::anyhow!("the {name} task ended unexpectedly");
                }
                Some(e) => {
                    tracing::error!(task = name, error = %e, "task failed");
                    return anyhow::anyhow!("the {name} task failed: {e}");
                }
            }
        }
    }

    /// Stops every task and waits for them to go.
    pub(super) async fn shutdown(&mut self) {
        self.set.shutdown().await;
    }
}
