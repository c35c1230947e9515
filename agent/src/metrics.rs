//! Prometheus metrics of the agent. Label sets are fixed and small (statuses, results), never
//! instance ids, so the series count does not grow with the number of games.

use berth_http::tls::TlsMetrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use berth_protocol::InstanceStatus;
use berth_protocol::agent_api::InstanceView;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub allocations_ok: Counter,
    pub allocations_failed: Counter,
    pub restarts: Counter,
    pub spawn_failures: Counter,
    pub readopted: Counter,
    pub arcus_connects: Counter,
    pub arcus_protocol_errors: Counter,
    pub heartbeats_ok: Counter,
    pub heartbeats_failed: Counter,
    pub game_log_rotations: Counter,
    pub game_logs_removed: Counter,
    /// State snapshots the disk refused (each written again later).
    pub snapshot_write_failures: Counter,
    /// Journal lines the disk refused (each an allocation or a deploy refused).
    pub journal_write_failures: Counter,
    pub tls: TlsMetrics,
    instances: Family<Labels, Gauge>,
    arcus_links_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// `tls`: whether the daemon has `[tls]`.
    pub fn new(tls: bool) -> Self {
        let mut registry = Registry::with_prefix("berth_agent");
        let allocations = Family::<Labels, Counter>::default();
        registry.register(
            "allocations",
            "Allocation requests answered by this agent, by result",
            allocations.clone(),
        );
        let heartbeats = Family::<Labels, Counter>::default();
        registry.register(
            "controller_heartbeats",
            "Heartbeats sent to the controller, by result",
            heartbeats.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let restarts = counter(
            &mut registry,
            "process_restarts",
            "Game processes restarted after an exit",
        );
        let spawn_failures = counter(
            &mut registry,
            "spawn_failures",
            "Game processes that could not be started",
        );
        let readopted = counter(
            &mut registry,
            "readopted",
            "Games re-adopted after an agent restart",
        );
        let arcus_connects = counter(&mut registry, "arcus_connects", "Arcus links established");
        let arcus_protocol_errors = counter(
            &mut registry,
            "arcus_protocol_errors",
            "Arcus links closed because the game broke the protocol",
        );
        let game_log_rotations = counter(
            &mut registry,
            "game_log_rotations",
            "Game log files rotated for being over game_log_max_bytes",
        );
        let game_logs_removed = counter(
            &mut registry,
            "game_logs_removed",
            "Log files of removed instances deleted after game_log_retention_hours",
        );
        let state_write_failures = Family::<Labels, Counter>::default();
        registry.register(
            "state_write_failures",
            "Writes to state_dir the disk refused, by file (snapshot: written again later; \
             journal: the allocation or deploy it recorded was refused)",
            state_write_failures.clone(),
        );
        let tls = TlsMetrics::register(&mut registry, tls);
        let instances = Family::<Labels, Gauge>::default();
        registry.register(
            "instances",
            "Instances on this host, by status",
            instances.clone(),
        );
        let arcus_links_up = Gauge::default();
        registry.register(
            "arcus_links_up",
            "Arcus links currently up",
            arcus_links_up.clone(),
        );
        // One statement each: a `get_or_create` guard held across a second call deadlocks.
        let child = |family: &Family<Labels, Counter>, result| {
            family.get_or_create(&vec![("result", result)]).clone()
        };
        let allocations_ok = child(&allocations, "ok");
        let allocations_failed = child(&allocations, "error");
        let heartbeats_ok = child(&heartbeats, "ok");
        let heartbeats_failed = child(&heartbeats, "error");
        let file = |name| {
            state_write_failures
                .get_or_create(&vec![("file", name)])
                .clone()
        };
        let snapshot_write_failures = file("snapshot");
        let journal_write_failures = file("journal");
        Self {
            allocations_ok,
            allocations_failed,
            heartbeats_ok,
            heartbeats_failed,
            registry,
            restarts,
            spawn_failures,
            readopted,
            arcus_connects,
            arcus_protocol_errors,
            game_log_rotations,
            game_logs_removed,
            snapshot_write_failures,
            journal_write_failures,
            tls,
            instances,
            arcus_links_up,
        }
    }

    /// Text exposition, with the instance gauges computed from a fresh listing (done at scrape
    /// time so that the supervisor's hot path never counts).
    pub fn render(&self, instances: &[InstanceView]) -> String {
        let mut by_status = [0i64; 7];
        let mut links = 0;
        for i in instances {
            by_status[i.status as usize] += 1;
            links += i64::from(i.arcus_connected);
        }
        for s in InstanceStatus::ALL {
            self.instances
                .get_or_create(&vec![("status", s.name())])
                .set(by_status[s as usize]);
        }
        self.arcus_links_up.set(links);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_without_deadlock() {
        let m = Metrics::new(false);
        m.allocations_ok.inc();
        let text = m.render(&[]);
        assert!(
            text.contains("berth_agent_allocations_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("berth_agent_instances{status=\"online\"} 0"),
            "{text}"
        );
    }
}
