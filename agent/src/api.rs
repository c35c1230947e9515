//! The agent's HTTP API (DESIGN.md §4.2). The only module that knows HTTP: handlers turn
//! requests into supervisor commands and supervisor errors into [`Failure`]s, in one
//! exhaustive mapping.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
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
use berth_http::{Failure, JsonBody, OptionalJsonBody, bearer, constant_time_eq};
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
                DeployError::HostFull(_) | DeployError::Ports(_) => ErrorCode::AgentServerError,
                DeployError::ShuttingDown => ErrorCode::ServiceUnavailable,
            },
            Self::Instance(e) => match e {
                InstanceError::NotFound(_) => ErrorCode::InstanceNotOnHost,
                InstanceError::Allocated(_) => ErrorCode::InstanceAlreadyAllocated,
                InstanceError::Invalid(_) => ErrorCode::InvalidRequest,
                InstanceError::Unreachable { .. } => ErrorCode::InstanceNotAllocatable,
                InstanceError::ShuttingDown => ErrorCode::ServiceUnavailable,
            },
            Self::Allocate(e) => match e {
                AllocateError::NotOnHost(_) => ErrorCode::InstanceNotOnHost,
                AllocateError::NotAllocatable { .. } => ErrorCode::InstanceNotAllocatable,
                AllocateError::Allocating(_) => ErrorCode::InstanceAllocating,
                AllocateError::AlreadyAllocated(_) => ErrorCode::InstanceAlreadyAllocated,
                AllocateError::TimedOut { .. } => ErrorCode::AllocationTimedOut,
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

type Json<T> = axum::Json<T>;
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
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the supervisor answers: state restored and commands flowing.
async fn readyz(State(st): State<ApiState>) -> Response {
    let answer = tokio::time::timeout(Duration::from_secs(2), st.supervisor.ping()).await;
    match answer {
        Ok(Some(instances)) => axum::Json(serde_json::json!({
            "status": "ready",
            "instances": instances,
            "registered": st.host_id.borrow().is_some(),
        }))
        .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "not ready"})),
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
    Ok(axum::Json(HostView {
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
        .map(axum::Json)
        .ok_or(ApiError::Unavailable)
}

async fn instance(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<InstanceView> {
    st.supervisor
        .get(id.clone())
        .await
        .map(axum::Json)
        .ok_or(ApiError::Instance(InstanceError::NotFound(id)))
}

async fn deploy(
    State(st): State<ApiState>,
    JsonBody(req): JsonBody<DeployRequest>,
) -> Result<(StatusCode, Json<InstanceView>), ApiError> {
    let view = st.supervisor.deploy(req).await?;
    Ok((StatusCode::CREATED, axum::Json(view)))
}

fn force(query: Option<&str>) -> bool {
    berth_http::is_true(berth_http::query_param(query, "force").as_deref())
}

async fn remove(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<InstanceView> {
    Ok(axum::Json(
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
    axum::Json(BatchResponse {
        results: futures_util::future::join_all(ops).await,
    })
}

async fn allocate(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<AllocateRequest>,
) -> ApiResult<InstanceView> {
    Ok(axum::Json(st.supervisor.allocate(id, req).await?))
}

async fn deallocate(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<DeallocateRequest>,
) -> ApiResult<InstanceView> {
    Ok(axum::Json(st.supervisor.deallocate(id, req).await?))
}

async fn push_metadata(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<MetadataRequest>,
) -> ApiResult<InstanceView> {
    Ok(axum::Json(
        st.supervisor.push_metadata(id, req.metadata).await?,
    ))
}

async fn command(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CommandRequest>,
) -> ApiResult<InstanceView> {
    Ok(axum::Json(st.supervisor.custom_command(id, req).await?))
}

async fn stop(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    OptionalJsonBody(body): OptionalJsonBody<StopRequest>,
) -> ApiResult<InstanceView> {
    let force = force(query.as_deref());
    Ok(axum::Json(
        st.supervisor.stop(id, body.timeout_seconds, force).await?,
    ))
}

async fn start(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<InstanceView> {
    Ok(axum::Json(st.supervisor.start(id).await?))
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
    let (head, offset) =
        tokio::task::spawn_blocking(move || read_tail_of_files(&files, tail.min(100_000)))
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
        copy_seen: copy_identity(&newest_copy),
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
                let copy_now = copy_identity(&newest_copy);
                let moved = (copy_now != seen).then(|| copy_now.map_or(0, |c| c.1));
                read_from(&path, &newest_copy, offset, moved, give_up)
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

/// The last `lines` lines of a file and its length.
fn read_tail(path: &std::path::Path, lines: usize) -> (Vec<u8>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().map_or(0, |m| m.len());
    // Read backwards in blocks until enough newlines are seen.
    let mut start = len;
    let mut buf = Vec::new();
    while start > 0 {
        let step = start.min(64 * 1024);
        start -= step;
        let mut block = vec![0u8; step as usize];
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(&mut block).is_err() {
            break;
        }
        block.extend_from_slice(&buf);
        buf = block;
        let newlines = buf.iter().filter(|b| **b == b'\n').count();
        if newlines > lines {
            break;
        }
    }
    (last_lines(buf, lines), len)
}

/// The last `lines` lines of `buf` (a last line without its newline counts).
fn last_lines(mut buf: Vec<u8>, lines: usize) -> Vec<u8> {
    let mut cut = 0;
    let mut seen = 0;
    for (i, b) in buf.iter().enumerate().rev() {
        if *b == b'\n' && i + 1 != buf.len() {
            seen += 1;
            if seen == lines {
                cut = i + 1;
                break;
            }
        }
    }
    if lines == 0 {
        cut = buf.len();
    }
    buf.split_off(cut)
}

/// The last `lines` lines of a game's output across its files (oldest first), and the length
/// of the last (live) file. The files are one stream cut at block boundaries, often mid-line,
/// so lines are counted on the joined bytes.
fn read_tail_of_files(files: &[PathBuf], lines: usize) -> (Vec<u8>, u64) {
    let mut joined = Vec::new();
    let mut live_len = None;
    for f in files.iter().rev() {
        // One line more than asked: the first may be the end of a line the older file starts.
        let (mut chunk, len) = read_tail(f, lines + 1);
        live_len.get_or_insert(len);
        let whole = chunk.len() as u64 == len;
        chunk.extend_from_slice(&joined);
        joined = chunk;
        if !whole {
            break;
        }
    }
    (last_lines(joined, lines), live_len.unwrap_or(0))
}

/// Which `.1` copy exists (inode and length), to notice a rotation.
fn copy_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.ino(), m.len()))
}

/// The bytes of the live log `path` from `offset` on (at most 1 MiB), preceded by what a
/// rotation moved to `copy` that the reader had not read, and where the next read of the live
/// log starts. `moved`: bytes moved out of the file's head by a rotation since `offset` was
/// taken. `None` also when a rotation is half done (see [`game_logs::resume`]).
fn read_from(
    path: &std::path::Path,
    copy: &std::path::Path,
    offset: u64,
    moved: Option<u64>,
    give_up: bool,
) -> Option<(Vec<u8>, u64)> {
    const MAX: u64 = 1 << 20;
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut bytes = Vec::new();
    let offset = match game_logs::resume(offset, moved, len, give_up) {
        game_logs::Resume::Wait => return None,
        game_logs::Resume::Live(offset) => offset,
        game_logs::Resume::CopyThenLive(from) => {
            let mut c = std::fs::File::open(copy).ok()?;
            c.seek(SeekFrom::Start(from)).ok()?;
            c.take(moved.unwrap_or(0) - from)
                .read_to_end(&mut bytes)
                .ok()?;
            0
        }
    };
    f.seek(SeekFrom::Start(offset)).ok()?;
    let before = bytes.len();
    f.take(MAX).read_to_end(&mut bytes).ok()?;
    let next = offset + (bytes.len() - before) as u64;
    Some((bytes, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lines() {
        let dir = std::env::temp_dir().join(format!("berth-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("l.log");
        std::fs::write(&p, "a\nb\nc\nd\n").expect("write");
        assert_eq!(read_tail(&p, 2).0, b"c\nd\n");
        assert_eq!(read_tail(&p, 10).0, b"a\nb\nc\nd\n");
        assert_eq!(read_tail(&p, 0).0, b"");
        assert_eq!(read_tail(&dir.join("none"), 3).0, b"");
        let (_, len) = read_tail(&p, 1);
        std::fs::write(&p, "a\nb\nc\nd\ne\n").expect("append");
        let none = dir.join("none");
        assert_eq!(
            read_from(&p, &none, len, None, false).expect("read").0,
            b"e\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_follower_reads_what_a_rotation_moved_before_it_read_it() {
        let dir = std::env::temp_dir().join(format!("berth-follow-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (live, copy) = (dir.join("g.log"), dir.join("g.log.1"));
        // Read up to 3 of "abcdefgh"; then 6 bytes moved to the copy and "ij" appended.
        std::fs::write(&copy, "abcdef").expect("write");
        std::fs::write(&live, "ghij").expect("write");
        let (bytes, next) = read_from(&live, &copy, 3, Some(6), false).expect("read");
        assert_eq!((bytes.as_slice(), next), (&b"defghij"[..], 4));
        // Had it read past the cut (7), it goes on in the live file.
        let (bytes, next) = read_from(&live, &copy, 7, Some(6), false).expect("read");
        assert_eq!((bytes.as_slice(), next), (&b"hij"[..], 4));
        // Shorter with the copy unchanged: a rotation half done; wait.
        assert_eq!(read_from(&live, &copy, 9, None, false), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tail_spans_rotated_copies() {
        let dir = std::env::temp_dir().join(format!("berth-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let files = [dir.join("g.log.2"), dir.join("g.log.1"), dir.join("g.log")];
        // One stream cut mid-line twice, as a rotation at a block boundary cuts it.
        std::fs::write(&files[0], "l1\nl2\nl").expect("write");
        std::fs::write(&files[1], "3\nl4\nl5").expect("write");
        std::fs::write(&files[2], "\nl6\n").expect("write");
        assert_eq!(read_tail_of_files(&files, 1).0, b"l6\n");
        assert_eq!(read_tail_of_files(&files, 2).0, b"l5\nl6\n");
        assert_eq!(read_tail_of_files(&files, 3).0, b"l4\nl5\nl6\n");
        assert_eq!(
            read_tail_of_files(&files, 100).0,
            b"l1\nl2\nl3\nl4\nl5\nl6\n"
        );
        assert_eq!(
            read_tail_of_files(&files, 1).1,
            4,
            "offset: the live file's length"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
