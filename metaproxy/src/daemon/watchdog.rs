//! The probe's watchdog: every link attached and pinned while the daemon
//! runs, and a last pass at shutdown.

use std::sync::Arc;

use crate::{kernel::probe::Probe, ops::metrics::Readiness};

/// How often the watchdog checks that every link is attached and pinned.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the redirect, the guard and the layer-2 lock attached and pinned
/// while the daemon runs (see [`crate::kernel::probe::Probe::repair`]):
/// what went missing is put back, logged as an alert and counted, and
/// `/readyz` is not ready while something could not be.
pub(super) async fn watch_probe(probe: Arc<Probe>, readiness: Arc<Readiness>) {
    // For the attack tests' controls alone: they detach a part of the
    // probe to show the attack working without it, and it must stay
    // detached. The links are held all the same.
    if watchdog_off() {
        tracing::warn!("the probe's watchdog is off (METAPROXY_WATCHDOG=off): a detached program stays detached");
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !watch_once(&probe, &readiness).await {
            return std::future::pending().await;
        }
    }
}

/// Every 2 s, frees the slots of connects older than a record may be (see
/// [`Probe::sweep_slots`]).
pub(super) async fn sweep_slots(probe: Arc<Probe>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = probe.clone();
        if let Ok(freed @ 1..) = tokio::task::spawn_blocking(move || p.sweep_slots()).await {
            tracing::debug!(freed, "freed the slots of stale connects");
        }
    }
}

/// `METAPROXY_WATCHDOG=off`: for the attack tests' controls alone.
pub(super) fn watchdog_off() -> bool {
    std::env::var("METAPROXY_WATCHDOG").is_ok_and(|v| v == "off")
}

/// One watchdog pass, logged; `false` once a newer daemon took over.
pub(super) async fn watch_once(probe: &Arc<Probe>, readiness: &Readiness) -> bool {
    let p = probe.clone();
    let repairs = match tokio::task::spawn_blocking(move || p.repair()).await {
        Ok(repairs) => repairs,
        Err(e) => {
            tracing::error!(alert = true, error = %e, "ALERT: the probe's watchdog failed; trying again");
            readiness.probe_intact(false);
            return true;
        }
    };
    if let Some(generation) = repairs.superseded_by {
        tracing::warn!(generation, "a newer metaproxy attached generation {generation}: this daemon's watchdog stands down");
        return false;
    }
    if !repairs.pins_restored.is_empty() {
        tracing::error!(alert = true, restored = %repairs.pins_restored.join(", "), "ALERT: pins of the probe were removed or replaced while the daemon ran (it held the links, so nothing was detached); pinned again");
    }
    if !repairs.links_reattached.is_empty() {
        tracing::error!(alert = true, reattached = %repairs.links_reattached.join(", "), "ALERT: programs of the probe were detached or moved while the daemon ran; attached again");
    }
    if repairs.failed.is_empty() {
        readiness.probe_intact(true);
    } else {
        tracing::error!(alert = true, failed = %repairs.failed.join("; "), "ALERT: a pin or link of the probe is missing and could not be put back; trying again");
        readiness.probe_intact(false);
    }
    true
}
