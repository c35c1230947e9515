//! The agent's HTTP API (DESIGN.md §4.2). The only module that knows HTTP: handlers turn
//! requests into supervisor commands and supervisor errors into [`Failure`]s, in one
//! exhaustive mapping.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_http::CorrelationId;
use berth_http::{Failure, Json, JsonBody, OptionalJsonBody, bearer, constant_time_eq};
use berth_protocol::ErrorCode;
use berth_protocol::agent_api::{
    AllocateRequest, BatchOperation, BatchRequest, BatchResponse, BatchResult, CommandRequest,
    DeallocateRequest, DeployRequest, HostView, InstanceView, MetadataRequest, StopRequest,
};
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::game_logs;
use crate::metrics::Metrics;
use crate::supervisor::{AllocateError, DeployError, InstanceError, SupervisorHandle, log_path};

/// What handlers share. Immutable after start, apart from the registration watch.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub supervisor: SupervisorHandle,
    /// Tokens accepted on `/v1`: the agent token given to the controller, and configured ones.
    pub tokens: Arc<[String]>,
    pub metrics: Arc<Metrics>,
    pub host: Arc<HostStatic>,
    pub host_id: watch::Receiver<Option<u64>>,
    pub log_dir: PathBuf,
    /// Rotated copies kept per game log (`game_log_files`), read by `tail`.
    pub log_files_kept: u32,
}

/// Host facts that do not change while the agent runs.
#[derive(Debug)]
pub struct HostStatic {
    pub host_name: String,
    pub region: String,
    pub dc_location: String,
    pub is_virtual: bool,
    pub labels: BTreeMap<String, String>,
    pub capacity: berth_protocol::agent_api::Capacity,
    pub controller_url: String,
}

/// Every refusal of the agent API, from every operation.
#[derive(Debug)]
pub enum ApiError {
    MissingCredentials,
    BadToken,
    Deploy(DeployError),
    Instance(InstanceError),
    Allocate(AllocateError),
    Unavailable,
}

impl ApiError {
    /// The one place an agent error gets its code (and so its HTTP status).
    fn code(&self) -> ErrorCode {
        match self {
            Self::MissingCredentials => ErrorCode::MissingCredentials,
            Self::BadToken => ErrorCode::AgentUnauthenticated,
            Self::Unavailable => ErrorCode::ServiceUnavailable,
            Self::Deploy(e) => match e {
                DeployError::Invalid(_) | DeployError::Conflict(_) => ErrorCode::InvalidRequest,
                DeployError::HostFull(_)
                | DeployError::Ports(_)
                | DeployError::NotRecorded { .. } => ErrorCode::AgentServerError,
                DeployError::ShuttingDown => ErrorCode::ServiceUnavailable,
            },
            Self::Instance(e) => match e {
                InstanceError::NotFound(_) => ErrorCode::InstanceNotOnHost,
                InstanceError::Allocated(_) => ErrorCode::InstanceAlreadyAllocated,
                InstanceError::Invalid(_) => ErrorCode::InvalidRequest,
                InstanceError::Unreachable { .. } => ErrorCode::InstanceNotAllocatable,
                InstanceError::NotRecorded { .. } => ErrorCode::AgentServerError,
                InstanceError::ShuttingDown => ErrorCode::ServiceUnavailable,
            },
            Self::Allocate(e) => match e {
                AllocateError::NotOnHost(_) => ErrorCode::InstanceNotOnHost,
                AllocateError::NotAllocatable { .. } => ErrorCode::InstanceNotAllocatable,
                AllocateError::Allocating(_) => ErrorCode::InstanceAllocating,
                AllocateError::AlreadyAllocated(_) => ErrorCode::InstanceAlreadyAllocated,
                AllocateError::TimedOut { .. } => ErrorCode::AllocationTimedOut,
                AllocateError::NotRecorded { .. } => ErrorCode::AgentServerError,
                AllocateError::Invalid(_) => ErrorCode::InvalidRequest,
                AllocateError::ShuttingDown => ErrorCode::ServiceUnavailable,
            },
        }
    }

    fn message(&self) -> &'static str {
        match self {
            Self::MissingCredentials | Self::BadToken => "Unauthenticated.",
            Self::Deploy(_) => "Unable to deploy application instance.",
            Self::Allocate(_) => "Unable to allocate application instance.",
            Self::Instance(_) => "Unable to act on application instance.",
            Self::Unavailable => "The host agent is shutting down.",
        }
    }

    fn details(&self) -> String {
        match self {
            Self::MissingCredentials => {
                "no Authorization header; send `Authorization: Bearer <token>`".to_owned()
            }
            Self::BadToken => "the bearer token is not valid for this host agent".to_owned(),
            Self::Unavailable => "the host agent is shutting down; retry shortly".to_owned(),
            Self::Deploy(e) => e.to_string(),
            Self::Instance(e) => e.to_string(),
            Self::Allocate(e) => e.to_string(),
        }
    }
}

impl ApiError {
    fn failure(&self) -> Failure {
        Failure::new(self.code(), self.message(), self.details())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.failure().into_response()
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        Self::Deploy(e)
    }
}
impl From<InstanceError> for ApiError {
    fn from(e: InstanceError) -> Self {
        Self::Instance(e)
    }
}
impl From<AllocateError> for ApiError {
    fn from(e: AllocateError) -> Self {
        Self::Allocate(e)
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/host", get(host))
        .route("/v1/instances", get(list).post(deploy))
        .route("/v1/instances/batch", post(batch))
        .route("/v1/instances/{id}", get(instance).delete(remove))
        .route("/v1/instances/{id}/allocate", post(allocate))
        .route("/v1/instances/{id}/deallocate", post(deallocate))
        .route("/v1/instances/{id}/metadata", post(push_metadata))
        .route("/v1/instances/{id}/command", post(command))
        .route("/v1/instances/{id}/stop", post(stop))
        .route("/v1/instances/{id}/start", post(start))
        .route("/v1/instances/{id}/logs", get(logs))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .fallback(berth_http::not_found)
        .method_not_allowed_fallback(berth_http::method_not_allowed)
        .layer(middleware::from_fn(berth_http::correlate))
        .with_state(state)
}

async fn authenticate(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return ApiError::MissingCredentials.into_response();
    };
    let ok = st
        .tokens
        .iter()
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    if !ok {
        return ApiError::BadToken.into_response();
    }
    next.run(req).await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the supervisor answers: state restored and commands flowing.
async fn readyz(State(st): State<ApiState>) -> Response {
    let answer = tokio::time::timeout(Duration::from_secs(2), st.supervisor.ping()).await;
    match answer {
        Ok(Some(instances)) => Json(serde_json::json!({
            "status": "ready",
            "instances": instances,
            "registered": st.host_id.borrow().is_some(),
        }))
        .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready"})),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let list = st.supervisor.list().await.ok_or(ApiError::Unavailable)?;
    let text = st.metrics.render(&list);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn host(State(st): State<ApiState>) -> ApiResult<HostView> {
    let list = st.supervisor.list().await.ok_or(ApiError::Unavailable)?;
    let mut by_status = BTreeMap::new();
    for i in &list {
        *by_status.entry(i.status.name().to_owned()).or_insert(0) += 1;
    }
    let h = &st.host;
    let load = sysinfo::System::load_average();
    Ok(Json(HostView {
        host_id: *st.host_id.borrow(),
        host_name: h.host_name.clone(),
        region: h.region.clone(),
        dc_location: h.dc_location.clone(),
        is_virtual: h.is_virtual,
        labels: h.labels.clone(),
        capacity: h.capacity.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        instances: list.len(),
        instances_by_status: by_status,
        load_average: [load.one, load.five, load.fifteen],
        registered: st.host_id.borrow().is_some(),
        controller_url: h.controller_url.clone(),
    }))
}

async fn list(State(st): State<ApiState>) -> ApiResult<Vec<InstanceView>> {
    st.supervisor
        .list()
        .await
        .map(Json)
        .ok_or(ApiError::Unavailable)
}

async fn instance(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<InstanceView> {
    st.supervisor
        .get(id.clone())
        .await
        .map(Json)
        .ok_or(ApiError::Instance(InstanceError::NotFound(id)))
}

async fn deploy(
    State(st): State<ApiState>,
    JsonBody(req): JsonBody<DeployRequest>,
) -> Result<(StatusCode, Json<InstanceView>), ApiError> {
    let view = st.supervisor.deploy(req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

fn force(query: Option<&str>) -> bool {
    berth_http::is_true(berth_http::query_param(query, "force").as_deref())
}

async fn remove(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<InstanceView> {
    Ok(Json(
        st.supervisor.remove(id, force(query.as_deref())).await?,
    ))
}

/// Allocations and releases the controller queued for this host, in one request. Each runs
/// exactly as its single-operation route would, with its own correlation id in the logs.
async fn batch(
    State(st): State<ApiState>,
    axum::Extension(CorrelationId(batch_id)): axum::Extension<CorrelationId>,
    JsonBody(req): JsonBody<BatchRequest, { 16 << 20 }>,
) -> Json<BatchResponse> {
    let batch_id = batch_id.as_str();
    let ops = req.operations.into_iter().map(|op| {
        let sup = st.supervisor.clone();
        async move {
            let (id, identifier, route, result) = match op {
                BatchOperation::Allocate {
                    id,
                    identifier,
                    request,
                } => {
                    let ident = identifier.as_deref().unwrap_or(batch_id);
                    let span = tracing::info_span!("allocate", identifier = %ident, instance_id = %id);
                    let r = sup.allocate(id.clone(), request).instrument(span).await;
                    (id, identifier, "allocate", r.map_err(ApiError::from))
                }
                BatchOperation::Deallocate {
                    id,
                    identifier,
                    request,
                } => {
                    let ident = identifier.as_deref().unwrap_or(batch_id);
                    let span = tracing::info_span!("deallocate", identifier = %ident, instance_id = %id);
                    let r = sup.deallocate(id.clone(), request).instrument(span).await;
                    (id, identifier, "deallocate", r.map_err(ApiError::from))
                }
            };
            match result {
                Ok(view) => BatchResult::Instance(Box::new(view)),
                Err(e) => {
                    let identifier = identifier.as_deref().unwrap_or(batch_id);
                    let path = format!("/v1/instances/{id}/{route}");
                    tracing::info!(instance_id = %id, identifier = %identifier, code = %e.code(), "operation refused");
                    BatchResult::Error(Box::new(e.failure().body(identifier, &path)))
                }
            }
        }
    });
    Json(BatchResponse {
        results: futures_util::future::join_all(ops).await,
    })
}

async fn allocate(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<AllocateRequest>,
) -> ApiResult<InstanceView> {
    Ok(Json(st.supervisor.allocate(id, req).await?))
}

async fn deallocate(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<DeallocateRequest>,
) -> ApiResult<InstanceView> {
    Ok(Json(st.supervisor.deallocate(id, req).await?))
}

async fn push_metadata(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<MetadataRequest>,
) -> ApiResult<InstanceView> {
    Ok(Json(st.supervisor.push_metadata(id, req.metadata).await?))
}

async fn command(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CommandRequest>,
) -> ApiResult<InstanceView> {
    Ok(Json(st.supervisor.custom_command(id, req).await?))
}

async fn stop(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    OptionalJsonBody(body): OptionalJsonBody<StopRequest>,
) -> ApiResult<InstanceView> {
    let force = force(query.as_deref());
    Ok(Json(
        st.supervisor.stop(id, body.timeout_seconds, force).await?,
    ))
}

async fn start(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<InstanceView> {
    Ok(Json(st.supervisor.start(id).await?))
}

/// The last `tail` lines of the instance's log; with `follow=true`, then everything appended
/// until the client goes away or the instance is removed.
async fn logs(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    if st.supervisor.get(id.clone()).await.is_none() {
        return Err(ApiError::Instance(InstanceError::NotFound(id)));
    }
    let query = query.as_deref();
    let tail: usize = match berth_http::query_param(query, "tail") {
        None => 100,
        Some(t) => t.parse().map_err(|_| {
            ApiError::Instance(InstanceError::Invalid(format!(
                "tail={t:?} is not a number of lines"
            )))
        })?,
    };
    let follow = berth_http::is_true(berth_http::query_param(query, "follow").as_deref());
    let path = log_path(&st.log_dir, &id);
    let files = game_logs::files_oldest_first(&st.log_dir, &id, st.log_files_kept);
    let (head, offset) = tokio::task::spawn_blocking(move || {
        game_logs::read_tail_of_files(&files, tail.min(100_000))
    })
    .await
    .map_err(|_| ApiError::Unavailable)?;
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    )];
    if !follow {
        return Ok((content_type, head).into_response());
    }
    let newest_copy = game_logs::rotated_path(&st.log_dir, &id, 1);
    let follower = Follower {
        copy_seen: game_logs::copy_identity(&newest_copy),
        newest_copy,
        path,
        offset,
        shrunk: 0,
        supervisor: st.supervisor.clone(),
        id,
        polls: 0,
    };
    let rest = futures_util::stream::unfold(follower, |mut f| async move {
        f.next()
            .await
            .map(|bytes| (Ok::<_, std::io::Error>(bytes), f))
    });
    let stream = futures_util::stream::once(std::future::ready(Ok(head))).chain(rest);
    Ok((content_type, Body::from_stream(stream)).into_response())
}

/// A reader of a game's live log that goes on across rotations.
struct Follower {
    path: PathBuf,
    /// `<id>.log.1` and which file it was at the last look: a new one means the live file's
    /// head was moved there.
    newest_copy: PathBuf,
    copy_seen: Option<(u64, u64)>,
    offset: u64,
    /// Polls in a row that found the file shorter than `offset` with `.1` unchanged.
    shrunk: u32,
    supervisor: SupervisorHandle,
    id: String,
    polls: u32,
}

impl Follower {
    const POLL: Duration = Duration::from_millis(200);
    /// Polls a shrunk file is waited on before reading it from the start (a rotation's
    /// collapse and rename are microseconds apart).
    const SHRUNK_POLLS: u32 = 5;

    /// What the game wrote since the last call; `None` once the instance is removed.
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            tokio::time::sleep(Self::POLL).await;
            self.polls += 1;
            let (path, newest_copy, offset, seen) = (
                self.path.clone(),
                self.newest_copy.clone(),
                self.offset,
                self.copy_seen,
            );
            let give_up = self.shrunk >= Self::SHRUNK_POLLS;
            let read = tokio::task::spawn_blocking(move || {
                let copy_now = game_logs::copy_identity(&newest_copy);
                let moved = (copy_now != seen).then(|| copy_now.map_or(0, |c| c.1));
                game_logs::read_from(&path, &newest_copy, offset, moved, give_up)
                    .map(|(bytes, next)| (bytes, next, copy_now))
            })
            .await
            .ok()
            .flatten();
            match read {
                Some((bytes, next, copy_now)) => {
                    self.offset = next;
                    self.copy_seen = copy_now;
                    self.shrunk = 0;
                    if !bytes.is_empty() {
                        return Some(bytes);
                    }
                }
                None => self.shrunk += 1,
            }
            // Every few seconds, stop following a removed instance.
            if self.polls.is_multiple_of(10) && self.supervisor.get(self.id.clone()).await.is_none()
            {
                return None;
            }
        }
    }
}
