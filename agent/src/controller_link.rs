//! The agent's link to the controller: register with the join token, heartbeat, and push
//! instance changes in batches.
//!
//! While the controller is away the agent keeps running its games and keeps the latest
//! snapshot of every changed instance (one per instance, so memory is bounded by the number of
//! instances); when it is back, a full registration reconciles everything at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_http::{CallError, JsonClient};
use berth_protocol::agent_api::InstanceView;
use berth_protocol::link::{
    EventsRequest, EventsResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, RemovedInstance,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::Shutdown;
use crate::metrics::Metrics;
use crate::supervisor::{SupervisorHandle, Update};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Instances per events request, so one request stays well under the body limit.
const BATCH: usize = 256;
/// How long a change waits for others before it is sent: an allocation cycle changes an
/// instance several times within a millisecond or two, and one snapshot covers them all.
const LINGER: Duration = Duration::from_millis(5);

/// Where the controller is, and what the agent tells it about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub controller_url: String,
    pub join_token: String,
    /// Sent at every registration with `instances` replaced by the current list.
    pub register: RegisterRequest,
    /// With `[tls]`: verifies the controller and shows it the agent's certificate.
    pub tls: Option<std::sync::Arc<berth_http::tls::TlsClientConfig>>,
}

/// Failed calls in a row, and what the last one said.
#[derive(Debug, Default)]
struct Failures {
    count: u32,
    last: Option<String>,
}

impl Failures {
    /// Counts `e`, and gives its text when it is worth a log line: the first failure, every
    /// new reason, and every `every`-th, so a long outage does not flood the log. A new reason
    /// matters: under TLS 1.3 a refused certificate can show first as a connection closed
    /// before the request went out, and the server's alert, which says why, only next time.
    fn worth_logging(&mut self, e: &CallError, every: u32) -> Option<String> {
        self.count += 1;
        let reason = e.to_string();
        let new = self.last.as_deref() != Some(reason.as_str());
        self.last = Some(reason.clone());
        (new || self.count.is_multiple_of(every)).then_some(reason)
    }
}

#[derive(Debug, Default)]
struct Pending {
    instances: HashMap<String, InstanceView>,
    removed: HashMap<String, u64>,
}

impl Pending {
    fn add(&mut self, u: Update) {
        match u {
            Update::Instance(v) => {
                self.removed.remove(&v.id);
                match self.instances.get(&v.id) {
                    Some(old) if old.version > v.version => {}
                    _ => {
                        self.instances.insert(v.id.clone(), *v);
                    }
                }
            }
            Update::Removed { id, version } => {
                self.instances.remove(&id);
                self.removed.insert(id, version);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.removed.is_empty()
    }

    /// Drops what a full report at these versions already covers.
    fn covered_by(&mut self, report: &[InstanceView]) {
        let versions: HashMap<&str, u64> =
            report.iter().map(|v| (v.id.as_str(), v.version)).collect();
        self.instances
            .retain(|id, v| versions.get(id.as_str()).is_none_or(|r| v.version > *r));
    }

    fn take_batch(&mut self) -> (Vec<InstanceView>, Vec<RemovedInstance>) {
        // Stopping `extract_if` early keeps the entries it has not reached, so no key is
        // copied and only the first BATCH entries are visited.
        let instances = self
            .instances
            .extract_if(|_, _| true)
            .take(BATCH)
            .map(|(_, v)| v)
            .collect();
        let removed = self
            .removed
            .drain()
            .map(|(id, version)| RemovedInstance { id, version })
            .collect();
        (instances, removed)
    }

    /// Puts a failed batch back, unless newer snapshots arrived meanwhile.
    fn restore(&mut self, instances: Vec<InstanceView>, removed: Vec<RemovedInstance>) {
        for v in instances {
            if !self.instances.contains_key(&v.id) && !self.removed.contains_key(&v.id) {
                self.instances.insert(v.id.clone(), v);
            }
        }
        for r in removed {
            if !self.instances.contains_key(&r.id) {
                self.removed.entry(r.id).or_insert(r.version);
            }
        }
    }
}

enum Next {
    Reregister,
    Shutdown,
}

/// Runs the link until shutdown.
pub async fn run(
    identity: Identity,
    supervisor: SupervisorHandle,
    mut updates: mpsc::UnboundedReceiver<Update>,
    host_id_tx: watch::Sender<Option<u64>>,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let client = match &identity.tls {
        Some(tls) => JsonClient::with_tls(tls),
        None => JsonClient::new(),
    };
    let mut pending = Pending::default();
    loop {
        let Some(reg) = register(
            &client,
            &identity,
            &supervisor,
            &mut updates,
            &mut pending,
            &mut shutdown,
        )
        .await
        else {
            return;
        };
        supervisor.registered(reg.host_id).await;
        host_id_tx.send_replace(Some(reg.host_id));
        match connected(
            &client,
            &identity,
            &reg,
            &mut updates,
            &mut pending,
            &metrics,
            &mut shutdown,
        )
        .await
        {
            Next::Reregister => continue,
            Next::Shutdown => return,
        }
    }
}

/// Between half and all of `backoff`, at random: agents that lost a controller together
/// (its restart) would otherwise come back to it together, every attempt, the whole fleet's
/// full reports at once.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % nanos.saturating_add(1))
}

/// Registers, retrying with backoff until it works or the agent stops.
async fn register(
    client: &JsonClient,
    identity: &Identity,
    supervisor: &SupervisorHandle,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    pending: &mut Pending,
    shutdown: &mut Shutdown,
) -> Option<RegisterResponse> {
    let url = format!("{}/v1/agent/register", identity.controller_url);
    let mut backoff = BACKOFF_START;
    let mut failures = Failures::default();
    let mut req = identity.register.clone();
    loop {
        req.instances = supervisor.list().await?;
        let result: Result<RegisterResponse, CallError> = client
            .post(
                &url,
                Some(&identity.join_token),
                None,
                &req,
                Duration::from_secs(10),
            )
            .await;
        match result {
            Ok(reg) => {
                tracing::info!(
                    host_id = reg.host_id,
                    instances = req.instances.len(),
                    "registered with the controller"
                );
                while let Ok(u) = updates.try_recv() {
                    pending.add(u);
                }
                pending.covered_by(&req.instances);
                return Some(reg);
            }
            Err(e) => {
                // Every 10th attempt is ~30 s apart with the backoff.
                if let Some(reason) = failures.worth_logging(&e, 10) {
                    tracing::warn!(error = %reason, attempt = failures.count, "cannot register with the controller; games keep running, retrying");
                }
            }
        }
        let deadline = Instant::now() + jittered(backoff);
        backoff = (backoff * 2).min(BACKOFF_CAP);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                u = updates.recv() => match u {
                    Some(u) => pending.add(u),
                    None => return None,
                },
                _ = shutdown.changed() => return None,
            }
        }
    }
}

async fn connected(
    client: &JsonClient,
    identity: &Identity,
    reg: &RegisterResponse,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    pending: &mut Pending,
    metrics: &Metrics,
    shutdown: &mut Shutdown,
) -> Next {
    let period = Duration::from_millis(reg.heartbeat_period_ms.clamp(100, 60_000));
    let hb_url = format!("{}/v1/agent/heartbeat", identity.controller_url);
    let ev_url = format!("{}/v1/agent/events", identity.controller_url);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut max_version = 0u64;
    let mut hb_failures = Failures::default();
    // The controller says it cannot call this agent: logged when that starts and ends, not at
    // every heartbeat.
    let mut cannot_call = false;
    let mut retry_at: Option<Instant> = None;
    let mut linger_until: Option<Instant> = None;
    loop {
        let lingering = linger_until.is_some_and(|t| Instant::now() < t);
        let can_flush = !pending.is_empty() && retry_at.is_none() && !lingering;
        let retry_deadline = retry_at.unwrap_or_else(Instant::now);
        let linger_deadline = linger_until.unwrap_or_else(Instant::now);
        tokio::select! {
            _ = shutdown.changed() => return Next::Shutdown,
            u = updates.recv() => {
                let Some(u) = u else { return Next::Shutdown };
                if pending.is_empty() {
                    linger_until = Some(Instant::now() + LINGER);
                }
                pending.add(u);
                while let Ok(u) = updates.try_recv() {
                    pending.add(u);
                }
            }
            _ = tokio::time::sleep_until(linger_deadline), if lingering => {
                linger_until = None;
            }
            _ = tokio::time::sleep_until(retry_deadline), if retry_at.is_some() => {
                retry_at = None;
            }
            _ = ticker.tick() => {
                seq += 1;
                let load = sysinfo::System::load_average();
                let req = HeartbeatRequest {
                    host_id: reg.host_id,
                    seq,
                    max_version,
                    load_average: [load.one, load.five, load.fifteen],
                };
                let r: Result<HeartbeatResponse, CallError> =
                    client.post(&hb_url, Some(&reg.host_token), None, &req, period.max(Duration::from_secs(1))).await;
                match r {
                    Ok(resp) => {
                        metrics.heartbeats_ok.inc();
                        if hb_failures.count > 0 {
                            tracing::info!(failed = hb_failures.count, "controller reachable again");
                        }
                        hb_failures = Failures::default();
                        match (&resp.cannot_call, cannot_call) {
                            (Some(why), false) => tracing::warn!(
                                error = %why,
                                "the controller cannot call this agent: check that advertise_url in agent.toml is this machine's and that its port is open to the controller; games keep running"
                            ),
                            (None, true) => tracing::info!("the controller reaches this agent again"),
                            _ => {}
                        }
                        cannot_call = resp.cannot_call.is_some();
                        if resp.reregister {
                            tracing::info!("controller asked for a full registration");
                            return Next::Reregister;
                        }
                    }
                    Err(e @ CallError::Status { status: 401 | 403 | 404, .. }) => {
                        tracing::warn!(error = %e, "controller no longer accepts this host's credentials; registering again");
                        return Next::Reregister;
                    }
                    Err(e) => {
                        metrics.heartbeats_failed.inc();
                        if let Some(reason) = hb_failures.worth_logging(&e, 30) {
                            tracing::warn!(error = %reason, failed = hb_failures.count, "heartbeat failed; games keep running");
                        }
                    }
                }
            }
            () = std::future::ready(()), if can_flush => {
                let (instances, removed) = pending.take_batch();
                if let Some(m) = instances.iter().map(|v| v.version).max() {
                    max_version = max_version.max(m);
                }
                let req = EventsRequest { host_id: reg.host_id, instances, removed };
                let r: Result<EventsResponse, CallError> =
                    client.post(&ev_url, Some(&reg.host_token), None, &req, Duration::from_secs(10)).await;
                match r {
                    Ok(resp) => {
                        retry_at = None;
                        if resp.reregister {
                            return Next::Reregister;
                        }
                    }
                    Err(CallError::Status { status: 401 | 403 | 404, .. }) => {
                        pending.restore(req.instances, req.removed);
                        return Next::Reregister;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "events not delivered; will retry");
                        pending.restore(req.instances, req.removed);
                        retry_at = Some(Instant::now() + BACKOFF_START);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents retrying together must spread out: every wait lies between half the backoff and
    /// all of it, and they cover both halves of that range.
    #[test]
    fn register_retries_are_spread_over_the_upper_half_of_the_backoff() {
        let backoff = Duration::from_secs(4);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(backoff)).collect();
        assert!(waits.iter().all(|w| (backoff / 2..=backoff).contains(w)));
        let split = backoff * 3 / 4;
        assert!(waits.iter().any(|w| *w < split) && waits.iter().any(|w| *w > split));
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
