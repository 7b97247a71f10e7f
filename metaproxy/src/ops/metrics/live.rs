//! Figures read when scraped: open connections, cache entries, map
//! fill, guard drops, from whoever holds them ([`LiveSource`]).

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

/// State read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub open_connections: u64,
    pub largest_per_container: u64,
    pub identity_cache: u64,
    pub credential_cache: u64,
    pub map_pending: u64,
    pub map_conns: u64,
    pub map_slots: u64,
    pub probe_generation: u64,
    pub log_lines_dropped: u64,
    pub docker_reachable: bool,
    /// Packets the packet guard dropped, by [`metaproxy_common::GuardDrop`].
    pub guard_drops: [u64; metaproxy_common::GUARD_DROP_KINDS as usize],
    /// Interfaces the tc guard is attached to.
    pub guard_interfaces: u64,
    /// What the layer-2 lock refused, by [`metaproxy_common::L2Refusal`].
    pub l2_refusals: [u64; metaproxy_common::L2_REFUSAL_KINDS as usize],
    /// Whether packet, AF_XDP and raw IPv6 sockets are refused to jobs
    /// (the BPF LSM runs).
    pub l2_sockets_refused: bool,
    /// The probe's watchdog: pins made again, links attached again.
    pub pins_restored: u64,
    pub links_reattached: u64,
}

/// Where [`Live`] comes from (the daemon's parts; a fixed value in tests).
pub trait LiveSource: Send + Sync + 'static {
    fn live(&self) -> Live;
}

pub(super) struct LiveCollector(pub(super) Arc<dyn LiveSource>);

impl std::fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCollector")
    }
}

pub(super) fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(Option<(&str, &str)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (label, value) in values {
        let value = ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX));
        match label {
            Some(label) => value.encode(family.encode_family(&[*label])?)?,
            None => return value.encode(family),
        }
    }
    Ok(())
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let live = self.0.live();
        gauge(
            &mut encoder,
            "metaproxy_open_connections",
            "Connections open on the IMDS listener",
            &[(None, live.open_connections)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_open_connections_largest_per_container",
            "The most connections any one container (cgroup) has open",
            &[(None, live.largest_per_container)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_identity_cache_entries",
            "Cgroups whose identity (container or host) is cached",
            &[(None, live.identity_cache)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_credential_cache_entries",
            "Role sessions whose credentials are cached",
            &[(None, live.credential_cache)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_map_entries",
            "Entries in the probe's kernel maps",
            &[
                (Some(("map", "pending")), live.map_pending),
                (Some(("map", "conns")), live.map_conns),
                (Some(("map", "slots")), live.map_slots),
            ],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_map_capacity",
            "Capacity of the probe's kernel maps",
            &[
                (
                    Some(("map", "pending")),
                    u64::from(metaproxy_common::PENDING_CAPACITY),
                ),
                (
                    Some(("map", "slots")),
                    u64::from(metaproxy_common::SLOTS_MAX),
                ),
                (
                    Some(("map", "conns")),
                    u64::from(metaproxy_common::CONNS_CAPACITY),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_probe_generation",
            "Generation of the attached probe (grows with each daemon start)",
            &[(None, live.probe_generation)],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_docker_reachable",
            "1 while the Docker API answers (its event stream is connected)",
            &[(None, u64::from(live.docker_reachable))],
        )?;
        gauge(
            &mut encoder,
            "metaproxy_guard_interfaces",
            "Interfaces the packet guard is attached to (those that route to IMDS)",
            &[(None, live.guard_interfaces)],
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "metaproxy_guard_dropped_packets",
                "Packets to IMDS or the container-credentials addresses that the packet guard dropped, by kind",
                None,
                MetricType::Counter,
            )?;
            for kind in metaproxy_common::GuardDrop::ALL {
                ConstCounter::new(live.guard_drops[kind as usize])
                    .encode(family.encode_family(&[("kind", kind.name())])?)?;
            }
        }
        gauge(
            &mut encoder,
            "metaproxy_layer2_sockets_refused",
            "1 where jobs are refused packet, AF_XDP and raw IPv6 sockets (the BPF LSM runs); 0 is a gap status names",
            &[(None, u64::from(live.l2_sockets_refused))],
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "metaproxy_layer2_refused",
                "Socket calls of jobs that the layer-2 lock refused (forged frames, sniffing, ways past tc egress), by kind",
                None,
                MetricType::Counter,
            )?;
            for kind in metaproxy_common::L2Refusal::ALL {
                ConstCounter::new(live.l2_refusals[kind as usize])
                    .encode(family.encode_family(&[("kind", kind.name())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "metaproxy_probe_repairs",
                "What the watchdog put back while the daemon ran: pins removed (kind pin) and programs detached or moved (kind link)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(live.pins_restored)
                .encode(family.encode_family(&[("kind", "pin")])?)?;
            ConstCounter::new(live.links_reattached)
                .encode(family.encode_family(&[("kind", "link")])?)?;
        }
        let dropped = ConstCounter::new(live.log_lines_dropped);
        let family = encoder.encode_descriptor(
            "metaproxy_log_lines_dropped",
            "Log lines (audit lines included) dropped because the writer fell behind",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(family)?;
        Ok(())
    }
}
