//! Calls from the controller to host agents. Connections are pooled and reused; every failure
//! becomes an [`AgentFailure`] with a 76000-series code, so the allocation engine can decide
//! whether the next candidate may do better.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_http::{CallError, JsonClient};
use berth_protocol::ErrorCode;
use berth_protocol::agent_api::{
    AllocateRequest, BatchOperation, BatchRequest, BatchResponse, BatchResult, CommandRequest,
    DeallocateRequest, DeployRequest, HostView, InstanceView, MetadataRequest, StopRequest,
};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// The agent's own answer comes within 5 s; allow for the network on top.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(6);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Within the agent's own wait for its registration's answer.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and how to reach one host's agent.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    pub host_id: u64,
    pub host_name: String,
    pub url: String,
    pub token: String,
    /// The host's batching lane for allocations and releases, when it has one.
    pub lane: Option<Lane>,
}

/// Batches sent to one agent at once; more queue up and go out together.
const LANE_IN_FLIGHT: usize = 4;
/// Most operations in one batch.
const LANE_BATCH: usize = 256;

type LaneItem = (
    BatchOperation,
    oneshot::Sender<Result<InstanceView, AgentFailure>>,
);

/// One host's lane: allocation and release calls queued for the same agent go out as one
/// `POST /v1/instances/batch`, so under load one HTTP exchange carries many of them. With no
/// load a batch holds one call and costs nothing extra.
#[derive(Debug, Clone)]
pub struct Lane {
    tx: mpsc::UnboundedSender<LaneItem>,
}

impl Lane {
    async fn call(
        &self,
        op: BatchOperation,
        target: &AgentTarget,
    ) -> Result<InstanceView, AgentFailure> {
        let (reply, rx) = oneshot::channel();
        // The queue closed or the reply dropped: either way the lane's task has ended.
        if self.tx.send((op, reply)).is_ok()
            && let Ok(answer) = rx.await
        {
            return answer;
        }
        Err(internal(
            target,
            "nothing (its lane has stopped)".to_owned(),
            0,
        ))
    }
}

async fn lane_task(
    http: JsonClient,
    target: AgentTarget,
    mut rx: mpsc::UnboundedReceiver<LaneItem>,
) {
    let permits = Arc::new(Semaphore::new(LANE_IN_FLIGHT));
    let url = format!("{}/v1/instances/batch", target.url);
    loop {
        // A permit first, then the queue: while all batches are in flight, calls accumulate
        // and the next batch takes them all.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut items = vec![first];
        while items.len() < LANE_BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let http = http.clone();
        let target = target.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (ops, replies): (Vec<_>, Vec<_>) = items.into_iter().unzip();
            let body = BatchRequest { operations: ops };
            let result: Result<BatchResponse, CallError> = http
                .post(&url, Some(&target.token), None, &body, ALLOCATE_TIMEOUT)
                .await;
            let elapsed = started.elapsed();
            match result {
                Ok(resp) if resp.results.len() == replies.len() => {
                    for (r, reply) in resp.results.into_iter().zip(replies) {
                        let _ = reply.send(match r {
                            BatchResult::Instance(v) => Ok(*v),
                            BatchResult::Error(body) => Err(AgentFailure {
                                host_id: target.host_id,
                                status: body.status_code,
                                code: body.code,
                                error_code: body.error_code,
                                details: body.details,
                                elapsed_ms: elapsed.as_millis() as u64,
                            }),
                        });
                    }
                }
                Ok(resp) => {
                    let what = format!(
                        "{} results for {} operations",
                        resp.results.len(),
                        replies.len()
                    );
                    for reply in replies {
                        let _ = reply.send(Err(internal(
                            &target,
                            what.clone(),
                            elapsed.as_millis() as u64,
                        )));
                    }
                }
                Err(e) => {
                    let f = failure(&target, e, elapsed);
                    for reply in replies {
                        let _ = reply.send(Err(f.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// An agent call that did not succeed, as an error code the controller can pass on.
#[derive(Debug, Clone)]
pub struct AgentFailure {
    pub host_id: u64,
    pub status: u16,
    pub code: ErrorCode,
    pub error_code: Option<u32>,
    pub details: String,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct AgentClient {
    http: JsonClient,
}

impl AgentClient {
    pub fn new() -> Self {
        Self {
            http: JsonClient::new(),
        }
    }

    /// Reaches `https://` agents too, verified with `tls` and shown the controller's
    /// certificate.
    pub fn with_tls(tls: &berth_http::tls::TlsClientConfig) -> Self {
        Self {
            http: JsonClient::with_tls(tls),
        }
    }

    /// Starts the batching lane for one host.
    pub fn lane(&self, target: &AgentTarget) -> Lane {
        let (tx, rx) = mpsc::unbounded_channel();
        let plain = AgentTarget {
            lane: None,
            ..target.clone()
        };
        tokio::spawn(lane_task(self.http.clone(), plain, rx));
        Lane { tx }
    }

    async fn post<B: Serialize>(
        &self,
        target: &AgentTarget,
        path: &str,
        body: &B,
        correlation: Option<&str>,
        timeout: Duration,
    ) -> Result<InstanceView, AgentFailure> {
        let url = format!("{}{path}", target.url);
        let token = Some(target.token.as_str());
        timed(
            target,
            self.http.post(&url, token, correlation, body, timeout),
        )
        .await
    }

    pub async fn allocate(
        &self,
        target: &AgentTarget,
        instance_id: &str,
        req: AllocateRequest,
        correlation: &str,
    ) -> Result<InstanceView, AgentFailure> {
        if let Some(lane) = &target.lane {
            let op = BatchOperation::Allocate {
                id: instance_id.to_owned(),
                identifier: Some(correlation.to_owned()),
                request: req,
            };
            return lane.call(op, target).await;
        }
        let path = format!("/v1/instances/{instance_id}/allocate");
        self.post(target, &path, &req, Some(correlation), ALLOCATE_TIMEOUT)
            .await
    }

    pub async fn deallocate(
        &self,
        target: &AgentTarget,
        instance_id: &str,
        req: DeallocateRequest,
        correlation: Option<&str>,
    ) -> Result<InstanceView, AgentFailure> {
        if let Some(lane) = &target.lane {
            let op = BatchOperation::Deallocate {
                id: instance_id.to_owned(),
                identifier: correlation.map(str::to_owned),
                request: req,
            };
            return lane.call(op, target).await;
        }
        let path = format!("/v1/instances/{instance_id}/deallocate");
        self.post(target, &path, &req, correlation, CALL_TIMEOUT)
            .await
    }

    /// What the agent at `url` says it is (`GET /v1/host`), asked with the token the
    /// controller will present to it.
    pub async fn identify(&self, url: &str, token: &str) -> Result<HostView, CallError> {
        let url = format!("{}/v1/host", url.trim_end_matches('/'));
        self.http.get(&url, Some(token), IDENTIFY_TIMEOUT).await
    }

    /// Whether the host's agent answers the controller (`GET /v1/host`); why not, if not.
    pub async fn probe(&self, target: &AgentTarget) -> Result<(), String> {
        let started = Instant::now();
        self.identify(&target.url, &target.token)
            .await
            .map(drop)
            .map_err(|e| failure(target, e, started.elapsed()).details)
    }

    pub async fn deploy(
        &self,
        target: &AgentTarget,
        req: &DeployRequest,
    ) -> Result<InstanceView, AgentFailure> {
        self.post(target, "/v1/instances", req, None, CALL_TIMEOUT)
            .await
    }

    pub async fn remove(
        &self,
        target: &AgentTarget,
        instance_id: &str,
    ) -> Result<InstanceView, AgentFailure> {
        let url = format!("{}/v1/instances/{instance_id}", target.url);
        let token = Some(target.token.as_str());
        timed(target, self.http.delete(&url, token, None, CALL_TIMEOUT)).await
    }

    pub async fn metadata(
        &self,
        target: &AgentTarget,
        instance_id: &str,
        req: &MetadataRequest,
        correlation: &str,
    ) -> Result<InstanceView, AgentFailure> {
        let path = format!("/v1/instances/{instance_id}/metadata");
        self.post(target, &path, req, Some(correlation), CALL_TIMEOUT)
            .await
    }

    pub async fn command(
        &self,
        target: &AgentTarget,
        instance_id: &str,
        req: &CommandRequest,
        correlation: &str,
    ) -> Result<InstanceView, AgentFailure> {
        let path = format!("/v1/instances/{instance_id}/command");
        self.post(target, &path, req, Some(correlation), CALL_TIMEOUT)
            .await
    }

    pub async fn stop(
        &self,
        target: &AgentTarget,
        instance_id: &str,
        req: &StopRequest,
        force: bool,
        correlation: &str,
    ) -> Result<InstanceView, AgentFailure> {
        let path = format!(
            "/v1/instances/{instance_id}/stop{}",
            if force { "?force=true" } else { "" }
        );
        self.post(target, &path, req, Some(correlation), CALL_TIMEOUT)
            .await
    }
}

/// Runs one call, turning its failure into what the controller reports (with how long the
/// agent took, for the attempt story).
async fn timed(
    target: &AgentTarget,
    call: impl Future<Output = Result<InstanceView, CallError>>,
) -> Result<InstanceView, AgentFailure> {
    let started = Instant::now();
    call.await
        .map_err(|e| failure(target, e, started.elapsed()))
}

/// Maps a failed call to the code the controller reports.
fn failure(target: &AgentTarget, e: CallError, elapsed: Duration) -> AgentFailure {
    let elapsed_ms = elapsed.as_millis() as u64;
    let unreachable = |details: String| AgentFailure {
        host_id: target.host_id,
        status: ErrorCode::AgentUnreachable.http_status(),
        code: ErrorCode::AgentUnreachable,
        error_code: Some(76007),
        details,
        elapsed_ms,
    };
    match e {
        CallError::Unreachable { reason, .. } => unreachable(format!(
            "agent of host {} ({}) at {} could not be reached: {reason}",
            target.host_id, target.host_name, target.url
        )),
        CallError::TimedOut { ms, .. } => unreachable(format!(
            "agent of host {} ({}) at {} did not answer within {ms} ms",
            target.host_id, target.host_name, target.url
        )),
        CallError::Status {
            status,
            body: Some(body),
            ..
        } => AgentFailure {
            host_id: target.host_id,
            status,
            code: body.code,
            error_code: body.error_code,
            details: body.details,
            elapsed_ms,
        },
        CallError::Status { status, text, .. } if status == 401 || status == 403 => AgentFailure {
            host_id: target.host_id,
            status: 403,
            code: ErrorCode::AgentUnauthenticated,
            error_code: Some(76001),
            details: format!(
                "agent of host {} refused the controller's token ({status}): {text}",
                target.host_id
            ),
            elapsed_ms,
        },
        CallError::Status { status, text, .. } => internal(
            target,
            format!("with HTTP {status} and a body that is not an error body: {text}"),
            elapsed_ms,
        ),
        CallError::Decode { reason, .. } => internal(
            target,
            format!("with something that is not an instance ({reason})"),
            elapsed_ms,
        ),
        CallError::InvalidUrl(u) => {
            internal(target, format!("invalid agent URL {u:?}"), elapsed_ms)
        }
        CallError::InvalidRequest { reason, .. } => AgentFailure {
            host_id: target.host_id,
            status: 500,
            code: ErrorCode::AgentInternalError,
            error_code: Some(76000),
            details: format!(
                "the controller could not call the agent of host {} ({}) at {}: {reason}; the token is the one the agent sent when it registered, so the agent must register again with a valid one",
                target.host_id, target.host_name, target.url
            ),
            elapsed_ms,
        },
    }
}

fn internal(target: &AgentTarget, what: String, elapsed_ms: u64) -> AgentFailure {
    AgentFailure {
        host_id: target.host_id,
        status: 500,
        code: ErrorCode::AgentInternalError,
        error_code: Some(76000),
        details: format!(
            "agent of host {} ({}) at {} answered {what}",
            target.host_id, target.host_name, target.url
        ),
        elapsed_ms,
    }
}
