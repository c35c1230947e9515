//! Prometheus metrics of the controller. Labels are fixed enums (result codes, statuses, host
//! states), never ids, so the number of series is bounded.

use berth_http::tls::TlsMetrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use berth_protocol::{ErrorCode, InstanceStatus};

/// One label each: a fixed array, so counting an allocation allocates nothing.
type Labels = [(&'static str, &'static str); 1];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    allocations: Family<Labels, Counter>,
    pub allocation_seconds: Histogram,
    pub agent_attempt_failures: Counter,
    pub heartbeats: Counter,
    pub hosts_lost: Counter,
    pub stalls: Counter,
    pub reconcile_deploys: Counter,
    pub reconcile_removals: Counter,
    pub tls: TlsMetrics,
    instances: Family<Labels, Gauge>,
    hosts: Family<Labels, Gauge>,
    store: StoreMetrics,
}

/// What the database writer reports: how long its commits take (the disk's fsync is most of
/// it, so this is where a slow disk shows) and how many writes share one.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    pub commit_seconds: Histogram,
    pub writes: Counter,
    pub failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// `tls`: whether the daemon has `[tls]`.
    pub fn new(tls: bool) -> Self {
        let mut registry = Registry::with_prefix("berth_controller");
        let allocations = Family::<Labels, Counter>::default();
        registry.register(
            "allocations",
            "Allocation requests answered, by result (ok or the error code)",
            allocations.clone(),
        );
        let allocation_seconds = Histogram::new([
            0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
        ]);
        registry.register(
            "allocation_duration_seconds",
            "Time from request to answer for allocations",
            allocation_seconds.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let agent_attempt_failures = counter(
            "allocation_attempt_failures",
            "Allocation attempts refused by an agent (the next candidate was tried)",
        );
        let heartbeats = counter("heartbeats", "Agent heartbeats received");
        let hosts_lost = counter("hosts_lost", "Hosts declared unreachable");
        let stalls = counter(
            "stalls",
            "Times the controller did not run for longer than a heartbeat period (stopped, paused, starved of CPU); hosts are not blamed for that time",
        );
        let reconcile_deploys =
            counter("reconcile_deploys", "Instances deployed by the reconciler");
        let reconcile_removals =
            counter("reconcile_removals", "Instances removed by the reconciler");
        let store = StoreMetrics {
            commit_seconds: Histogram::new([
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
            writes: counter(
                "store_writes",
                "Writes committed to the database (a commit carries every write queued meanwhile)",
            ),
            failures: counter(
                "store_commit_failures",
                "Database commits that failed (every write in them was refused)",
            ),
        };
        registry.register(
            "store_commit_duration_seconds",
            "Time one database commit took, its fsync included",
            store.commit_seconds.clone(),
        );
        let instances = Family::<Labels, Gauge>::default();
        registry.register("instances", "Instances by status", instances.clone());
        let hosts = Family::<Labels, Gauge>::default();
        registry.register("hosts", "Hosts by state", hosts.clone());
        let tls = TlsMetrics::register(&mut registry, tls);
        Self {
            registry,
            allocations,
            allocation_seconds,
            agent_attempt_failures,
            heartbeats,
            hosts_lost,
            stalls,
            reconcile_deploys,
            reconcile_removals,
            tls,
            instances,
            hosts,
            store,
        }
    }

    /// The database writer's share, for [`crate::store::Store::start_writer`].
    pub fn store(&self) -> StoreMetrics {
        self.store.clone()
    }

    pub fn allocation(&self, result: Result<(), ErrorCode>) {
        let label = match result {
            Ok(()) => "ok",
            Err(code) => code.as_str(),
        };
        self.allocations.get_or_create(&[("result", label)]).inc();
    }

    /// Sets the gauges from counts computed by the inventory, then renders.
    pub fn render(&self, by_status: &[i64; 7], hosts: &[(&'static str, i64)]) -> String {
        for s in InstanceStatus::ALL {
            self.instances
                .get_or_create(&[("status", s.name())])
                .set(by_status[s as usize]);
        }
        for (state, n) in hosts {
            self.hosts.get_or_create(&[("state", *state)]).set(*n);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
