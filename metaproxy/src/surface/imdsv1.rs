//! Whether containers may use IMDSv1 (requests without a token). By
//! default metaproxy does what the instance does: where the instance
//! requires IMDSv2 (`HttpTokens=required`, the admin's SSRF protection),
//! tokenless requests from containers get 401 too. The instance is asked
//! at start and every few minutes; until it has answered, IMDSv1 is
//! refused (fail closed).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::surface::upstream::Upstream;

/// How often the instance's setting is checked again.
pub const RECHECK: Duration = Duration::from_secs(300);

/// The admin's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imdsv1Mode {
    /// As the instance does.
    Mirror,
    /// Always serve tokenless requests.
    Allow,
    /// Never serve them.
    Refuse,
}

/// The IMDSv1 decision, shared by the surface and the task that keeps it
/// in step with the instance.
#[derive(Debug)]
pub struct Imdsv1Gate {
    mode: Imdsv1Mode,
    /// The instance's last answer; refused until known.
    instance_requires_tokens: AtomicBool,
    /// Whether the instance has answered at all.
    measured: AtomicBool,
}

impl Imdsv1Gate {
    pub fn new(mode: Imdsv1Mode) -> Self {
        Self {
            mode,
            instance_requires_tokens: AtomicBool::new(true),
            measured: AtomicBool::new(false),
        }
    }

    /// Whether the instance requires IMDSv2 tokens, as last measured
    /// (mirror mode only).
    pub fn instance_requires_tokens(&self) -> Option<bool> {
        self.measured
            .load(Ordering::Relaxed)
            .then(|| self.instance_requires_tokens.load(Ordering::Relaxed))
    }

    /// `None` if a tokenless request may be served, else why not.
    pub fn refusal(&self) -> Option<&'static str> {
        match self.mode {
            Imdsv1Mode::Allow => None,
            Imdsv1Mode::Refuse => Some("--imdsv1 refuse"),
            Imdsv1Mode::Mirror => self
                .instance_requires_tokens
                .load(Ordering::Relaxed)
                .then_some("the instance requires IMDSv2"),
        }
    }

    /// Asks the instance once (mirror mode only: the other modes never
    /// contact it).
    pub async fn check(&self, upstream: &dyn Upstream) {
        if self.mode != Imdsv1Mode::Mirror {
            return;
        }
        match upstream.requires_tokens().await {
            Ok(required) => {
                let was = self
                    .instance_requires_tokens
                    .swap(required, Ordering::Relaxed);
                self.measured.store(true, Ordering::Relaxed);
                if was != required {
                    tracing::info!(
                        instance_requires_imdsv2 = required,
                        "containers' IMDSv1 now mirrors the instance"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether the instance requires IMDSv2; keeping the last answer");
            }
        }
    }

    /// Keeps the gate in step with the instance, forever. Run it as a task.
    pub async fn follow(self: std::sync::Arc<Self>, upstream: std::sync::Arc<dyn Upstream>) {
        let mut tick = tokio::time::interval(RECHECK);
        loop {
            tick.tick().await;
            self.check(upstream.as_ref()).await;
        }
    }
}
