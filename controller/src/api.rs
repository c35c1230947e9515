//! The controller's HTTP API (DESIGN.md §4.1). The only module that knows HTTP: handlers
//! check the caller, parse and validate, turn the request into inventory commands and agent
//! calls, and answer. Refusals are [`Failure`]s; the correlation middleware renders them and
//! records their story.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use berth_http::tls::PeerChain;
use berth_http::{
    CallError, CorrelationId, Failure, FailureSink, Json, JsonBody, OptionalJsonBody, bearer,
};
use berth_protocol::agent_api::{
    AllocateRequest, CommandRequest, DeallocateRequest, MetadataRequest, Profile, StopRequest,
};
use berth_protocol::controller_api::{
    AllocateBody, Application, Build, DcLocation, DeallocateBody, DeploymentEnvironment, Fleet,
    I3dAllocateBody, InstanceObject, Region,
};
use berth_protocol::filter::Filter;
use berth_protocol::link::{EventsRequest, HeartbeatRequest, RegisterRequest};
use berth_protocol::{ErrorCode, InstanceStatus, KeyValue, metadata};
use sha2::{Digest, Sha256};

use crate::agent_client::{AgentClient, AgentFailure};
use crate::config::{Config, Role, digest};
use crate::inventory::{
    AllocateInput, Crud, InstanceOp, InventoryHandle, ListQuery, Release, Step,
};
use crate::metrics::Metrics;
use crate::model::{Answer, Shape, hex};
use crate::store::CommitError;
use crate::store::Store;

/// Registration carries every instance of a host in full: allow more than the default limit.
const REGISTER_LIMIT: usize = 64 << 20;

/// A token bucket per token that holds one second's worth of requests, kept as one atomic
/// "theoretical arrival time" (GCRA): no lock on the request path. A steady `per_second` passes,
/// and so does a burst of `per_second` after a quiet second, never more; a fixed one-second
/// window (what this replaced) let twice the rate through around each window's edge.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    /// Nanoseconds one request uses up.
    interval: u64,
    /// When the bucket is next full again, in nanoseconds since `origin`.
    tat: AtomicU64,
    origin: Instant,
}

impl RateLimit {
    const SECOND: u64 = 1_000_000_000;

    /// `per_second` 0: no limit.
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            interval: Self::SECOND / per_second.max(1),
            tat: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// `Err(wait)`: refused; a request after `wait` would pass.
    fn admit(&self) -> Result<(), Duration> {
        if self.per_second == 0 {
            return Ok(());
        }
        self.admit_at(self.origin.elapsed().as_nanos() as u64)
    }

    fn admit_at(&self, now: u64) -> Result<(), Duration> {
        // The bucket's depth: a second's worth of requests.
        let tolerance = self.interval * self.per_second;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            if next - now > tolerance {
                return Err(Duration::from_nanos(next - now - tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

#[derive(Debug)]
pub struct TokenInfo {
    pub role: Role,
    pub name: String,
    pub limit: RateLimit,
}

/// Shared, immutable after start.
#[derive(Clone, Debug)]
pub struct AppState {
    pub inventory: InventoryHandle,
    pub agents: AgentClient,
    pub store: Store,
    pub tokens: Arc<HashMap<[u8; 32], TokenInfo>>,
    pub join_digest: [u8; 32],
    pub metrics: Arc<Metrics>,
    /// With `[tls]`, agents' routes need a client certificate the CA vouches for.
    pub agents_need_certificate: bool,
}

impl AppState {
    pub fn new(
        config: &Config,
        inventory: InventoryHandle,
        agents: AgentClient,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        let tokens = config
            .tokens
            .iter()
            .map(|t| {
                (
                    t.digest,
                    TokenInfo {
                        role: t.role,
                        name: t.name.clone(),
                        limit: RateLimit::new(t.rate_limit),
                    },
                )
            })
            .collect();
        Self {
            inventory,
            agents,
            store,
            tokens: Arc::new(tokens),
            join_digest: config.join_token_digest,
            metrics,
            agents_need_certificate: config.tls.is_some(),
        }
    }
}

/// An authenticated matchmaker or admin.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Role);

/// An authenticated admin.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

fn credentials(parts: &Parts) -> Result<[u8; 32], Failure> {
    let token = bearer(&parts.headers).ok_or_else(|| {
        Failure::new(
            ErrorCode::MissingCredentials,
            "Missing credentials.",
            "no Authorization header; send `Authorization: Bearer <token>`",
        )
    })?;
    Ok(digest(token))
}

fn invalid_credentials(details: &str) -> Failure {
    Failure::new(
        ErrorCode::InvalidCredentials,
        "Invalid credentials.",
        details,
    )
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Failure> {
        let d = credentials(parts)?;
        let info = st
            .tokens
            .get(&d)
            .ok_or_else(|| invalid_credentials("the token is unknown or revoked"))?;
        if let Err(wait) = info.limit.admit() {
            let mut f = Failure::new(
                ErrorCode::RateLimited,
                "Too many requests.",
                format!(
                    "token {:?} is over its limit of {} requests per second; retry after the Retry-After delay",
                    info.name, info.limit.per_second
                ),
            );
            // Whole seconds, rounded up: a client that waits that long passes.
            f.retry_after_secs = Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
            return Err(f);
        }
        Ok(Caller(info.role))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Failure> {
        match Caller::from_request_parts(parts, st).await? {
            Caller(Role::Admin) => Ok(Admin),
            Caller(Role::Matchmaker) => Err(invalid_credentials(
                "this route needs an admin token; the token presented has the matchmaker role",
            )),
        }
    }
}

/// The host token of an agent call, as a digest for the inventory to check.
struct HostToken([u8; 32]);

impl FromRequestParts<AppState> for HostToken {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Failure> {
        if st.agents_need_certificate && parts.extensions.get::<PeerChain>().is_none() {
            return Err(invalid_credentials(
                "this controller runs TLS, and an agent must present a client certificate \
                 signed by its tls.ca_file; set [tls] in agent.toml",
            ));
        }
        credentials(parts).map(HostToken)
    }
}

pub fn router(state: AppState) -> Router {
    let sink: FailureSink = {
        let inv = state.inventory.clone();
        Arc::new(move |r| {
            // Requests with no valid credentials, over their rate, or to no route (no path, or
            // not that method) are not kept: anyone who can reach the port could otherwise make
            // the controller write.
            let anonymous = matches!(
                r.body.code,
                ErrorCode::MissingCredentials
                    | ErrorCode::InvalidCredentials
                    | ErrorCode::RateLimited
            ) || r.unrouted;
            if !anonymous {
                inv.record_failure(r);
            }
        })
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/events", post(events))
        .route(
            "/v3/applicationInstance/game/{application_id}/empty/allocateWithErrors",
            post(allocate_i3d).patch(allocate_i3d),
        )
        .route(
            "/v1/applications/{application_id}/allocate",
            post(allocate_native),
        )
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", get(get_instance))
        .route("/v1/instances/{id}/deallocate", post(deallocate))
        .route("/v1/instances/{id}/metadata", post(push_metadata))
        .route("/v1/instances/{id}/command", post(command))
        .route("/v1/instances/{id}/stop", post(stop))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{id}", get(host).delete(delete_host))
        .route("/v1/hosts/{id}/drain", post(drain).delete(undrain))
        .route(
            "/v1/applications",
            get(list_applications).post(create_application),
        )
        .route(
            "/v1/applications/{id}",
            get(get_application)
                .put(put_application)
                .delete(delete_application),
        )
        .route("/v1/builds", get(list_builds).post(create_build))
        .route(
            "/v1/builds/{id}",
            get(get_build).put(put_build).delete(delete_build),
        )
        .route("/v1/profiles", get(list_profiles).post(create_profile))
        .route(
            "/v1/profiles/{id}",
            get(get_profile).put(put_profile).delete(delete_profile),
        )
        .route("/v1/fleets", get(list_fleets).post(create_fleet))
        .route(
            "/v1/fleets/{id}",
            get(get_fleet).put(put_fleet).delete(delete_fleet),
        )
        .route("/v1/regions", get(list_regions).post(create_region))
        .route(
            "/v1/regions/{id}",
            get(get_region).put(put_region).delete(delete_region),
        )
        .route(
            "/v1/dc-locations",
            get(list_dc_locations).post(create_dc_location),
        )
        .route(
            "/v1/deployment-environments",
            get(list_environments).post(create_environment),
        )
        .route("/v1/errors/{identifier}", get(error_story))
        .fallback(berth_http::not_found)
        .method_not_allowed_fallback(berth_http::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            sink,
            berth_http::correlate_recording,
        ))
        .with_state(state)
}

type ApiResult<T> = Result<Json<T>, Failure>;

fn number<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, Failure> {
    text.parse()
        .map_err(|_| Failure::invalid_request(format!("{what} {text:?} is not a valid number")))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> Response {
    let store = tokio::time::timeout(Duration::from_secs(2), st.store.ping()).await;
    let inventory = tokio::time::timeout(Duration::from_secs(2), st.inventory.counts()).await;
    let trouble = st.store.trouble();
    match (store, inventory, trouble) {
        (Ok(Ok(())), Ok(Ok(_)), None) => {
            Json(serde_json::json!({"status": "ready"})).into_response()
        }
        (store, _, trouble) => {
            let why = match (store, trouble) {
                (Ok(Err(e)), _) => format!("the database is not reachable: {e}"),
                (Err(_), _) => "the database did not answer within 2 s".to_owned(),
                (Ok(Ok(())), Some(t)) => format!(
                    "database commits fail since {:.1} s ({} failed, {} writes kept for later): \
                     {}; allocations are refused until the disk takes writes again",
                    t.since.elapsed().as_secs_f64(),
                    t.failures,
                    t.kept,
                    t.error
                ),
                (Ok(Ok(())), None) => "the inventory is not answering".to_owned(),
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "not ready", "reason": why})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(st): State<AppState>, _: Caller) -> Result<Response, Failure> {
    let (by_status, hosts) = st.inventory.counts().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(&by_status, &hosts),
    )
        .into_response())
}

// ----- agents ------------------------------------------------------------------------------

async fn register(
    State(st): State<AppState>,
    HostToken(d): HostToken,
    JsonBody(req): JsonBody<RegisterRequest, REGISTER_LIMIT>,
) -> Result<Response, Failure> {
    if !berth_http::constant_time_eq(&d, &st.join_digest) {
        return Err(invalid_credentials(
            "the join token is wrong; check join_token in agent.toml against controller.toml",
        ));
    }
    crate::inventory::check_registration(&req, st.agents_need_certificate)?;
    check_advertised(&st.agents, &req).await?;
    let (resp, commit) = st.inventory.register(req).await?;
    // A database that takes no writes does not keep agents out: the registration is in effect
    // in memory and the writer keeps the host's record until the disk has room, so hosts come
    // back (full reports, heartbeats) and matches resume the moment commits do. Should the
    // controller stop before that, its database still has the host's previous token: the
    // agent's next heartbeat is refused and it registers again.
    match committed(commit).await {
        Ok(()) => {}
        Err(e @ CommitError::Unavailable { .. }) => tracing::warn!(
            host_id = resp.host_id,
            error = %e,
            "host registered; its record is written once the database takes writes again"
        ),
        Err(e) => return Err(commit_failure(e, Change::Setting)),
    }
    Ok(Json(resp).into_response())
}

/// Calls the registering agent where it says it can be reached, as every deploy and
/// allocation will: an address the controller cannot reach (a loopback or private address
/// copied from an example, a closed port) or one where another agent answers (a copied
/// agent.toml) is refused now, in the agent's log, rather than accepted as a ready host whose
/// every call then fails.
async fn check_advertised(agents: &AgentClient, req: &RegisterRequest) -> Result<(), Failure> {
    let url = &req.advertise_url;
    let fix = "set advertise_url in agent.toml to an address of this machine that the controller reaches (and open that port to the controller)";
    let details = match agents.identify(url, &req.agent_token).await {
        Ok(view) if view.host_name == req.host_name => return Ok(()),
        Ok(view) => format!(
            "advertiseUrl {url} reaches the agent of {:?}, not this one ({:?}): give each agent its own advertise_url in agent.toml",
            view.host_name, req.host_name
        ),
        Err(CallError::Status {
            status: 401 | 403, ..
        }) => format!(
            "advertiseUrl {url} reaches another agent, which refuses this one's token: give each agent its own advertise_url in agent.toml"
        ),
        Err(e @ (CallError::Unreachable { .. } | CallError::TimedOut { .. })) => {
            format!("the controller cannot call this agent at advertiseUrl {url} ({e}): {fix}")
        }
        Err(e) => format!("advertiseUrl {url} does not answer as a Berth agent ({e}): {fix}"),
    };
    Err(Failure::invalid_request(details))
}

async fn heartbeat(
    State(st): State<AppState>,
    HostToken(d): HostToken,
    JsonBody(req): JsonBody<HeartbeatRequest>,
) -> Result<Response, Failure> {
    Ok(Json(st.inventory.heartbeat(d, req).await?).into_response())
}

async fn events(
    State(st): State<AppState>,
    HostToken(d): HostToken,
    JsonBody(req): JsonBody<EventsRequest, REGISTER_LIMIT>,
) -> Result<Response, Failure> {
    Ok(Json(st.inventory.events(d, req).await?).into_response())
}

/// What a change that must be on disk before it is answered was, for the answer when it could
/// not be written.
#[derive(Debug, Clone, Copy)]
enum Change {
    Allocation,
    /// A resource, a host's drain flag or deletion: already in effect in memory.
    Setting,
}

async fn committed(commit: crate::inventory::Commit) -> Result<(), CommitError> {
    commit.await.unwrap_or(Err(CommitError::Stopped))
}

async fn durable(commit: crate::inventory::Commit, change: Change) -> Result<(), Failure> {
    committed(commit)
        .await
        .map_err(|e| commit_failure(e, change))
}

fn commit_failure(error: CommitError, change: Change) -> Failure {
    match error {
        CommitError::Unavailable { .. } => {
            let then = match change {
                Change::Allocation => {
                    "Nothing was allocated (the game is told to release it). Allocations resume by \
                     themselves once the database takes writes again; no restart is needed."
                }
                Change::Setting => {
                    "The change is in effect, and the controller keeps it and writes it once the \
                     database takes writes again (it is lost if the controller stops before)."
                }
            };
            let mut f = Failure::new(
                ErrorCode::ServiceUnavailable,
                "The controller cannot write to its database.",
                format!(
                    "{error}. {then} Check the disk that holds it: free space, and I/O errors in \
                     the kernel log; GET /readyz says since when commits fail."
                ),
            );
            f.retry_after_secs = Some(1);
            f
        }
        CommitError::Refused { .. } => Failure::new(
            ErrorCode::InternalError,
            "Internal error.",
            format!(
                "{error}. This is a bug: report it with this identifier and the controller's log."
            ),
        ),
        CommitError::Stopped => Failure::new(
            ErrorCode::ServiceUnavailable,
            "The controller is shutting down.",
            "the database writer stopped before the change was written",
        ),
    }
}

// ----- allocation --------------------------------------------------------------------------

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Failure> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| {
            Failure::invalid_request(
                "Idempotency-Key must be 1-255 visible ASCII characters (a UUID is a good key)",
            )
        })?;
    Ok(Some(s.to_owned()))
}

fn parse_filter(text: &str) -> Result<Filter, Failure> {
    Filter::parse(text).map_err(|e| {
        Failure::new(
            e.code(),
            "Unable to allocate application instance.",
            e.to_string(),
        )
    })
}

fn check_metadata(field: &str, pairs: &[KeyValue]) -> Result<(), Failure> {
    // The validation messages already say "metadata…"; a separate game metadata list is named.
    metadata::validate(pairs).map_err(|e| {
        Failure::invalid_request(if field == "metadata" {
            e.to_string()
        } else {
            format!("{field}: {e}")
        })
    })
}

fn request_digest(
    application_id: u32,
    filter: &Filter,
    metadata: &[KeyValue],
    game: &Option<Vec<KeyValue>>,
) -> String {
    hex(&Sha256::digest(canonical_request(
        application_id,
        filter,
        metadata,
        game,
    )))
}

/// What a request digest is taken of. Digests are stored with allocations and compared after a
/// restart, so these bytes must never change: the compact JSON array
/// `[applicationId, filter, metadata, game]` (a test pins them).
fn canonical_request(
    application_id: u32,
    filter: &Filter,
    metadata: &[KeyValue],
    game: &Option<Vec<KeyValue>>,
) -> Vec<u8> {
    let canonical = (application_id, filter.to_string(), metadata, game);
    // Numbers, strings and lists of string pairs: serialising cannot fail.
    serde_json::to_vec(&canonical).unwrap_or_default()
}

/// Runs an allocation to its end in its own task: a matchmaker that hangs up must not leave
/// an instance claimed forever.
async fn allocate(st: AppState, input: AllocateInput) -> Result<Response, Failure> {
    tokio::spawn(allocate_flow(st, input))
        .await
        .map_err(|e| {
            Failure::new(
                ErrorCode::InternalError,
                "Internal error.",
                format!("allocation task failed: {e}"),
            )
        })?
        .map(|answer| match answer {
            // Served from what the inventory built (an idempotent replay gets the same).
            Answer::Native(o) => Json(&*o).into_response(),
            Answer::I3d(o) => Json([&*o]).into_response(),
        })
}

async fn allocate_flow(st: AppState, input: AllocateInput) -> Result<Answer, Failure> {
    let correlation = input.identifier.clone();
    let mut step = st.inventory.claim(input).await;
    loop {
        match step {
            Step::Call(call) => {
                let req = AllocateRequest {
                    metadata: call.metadata,
                    timeout_ms: Some(5000),
                    allocation_id: Some(call.allocation_id),
                    game_metadata: call.game_metadata,
                };
                let result = st
                    .agents
                    .allocate(&call.target, &call.instance_id, req, &correlation)
                    .await;
                step = st.inventory.settle(call.claim_id, result).await;
            }
            Step::Done {
                allocation,
                answer,
                committed,
            } => {
                if let Some(commit) = committed
                    && let Err(f) = durable(commit, Change::Allocation).await
                {
                    st.inventory
                        .abort_allocation(allocation.instance_id.clone(), allocation.id.clone())
                        .await;
                    return Err(f);
                }
                return Ok(answer);
            }
            Step::Refused(f) => return Err(*f),
        }
    }
}

async fn allocate_native(
    State(st): State<AppState>,
    _: Caller,
    Path(application_id): Path<String>,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<AllocateBody>,
) -> Result<Response, Failure> {
    let application_id = number("applicationId", &application_id)?;
    let filter = parse_filter(&body.filter)?;
    check_metadata("metadata", &body.metadata)?;
    if let Some(g) = &body.game_metadata {
        check_metadata("gameMetadata", g)?;
    }
    let input = AllocateInput {
        application_id,
        request_digest: request_digest(
            application_id,
            &filter,
            &body.metadata,
            &body.game_metadata,
        ),
        filter,
        metadata: body.metadata,
        game_metadata: body.game_metadata,
        idempotency_key: idempotency_key(&headers)?,
        identifier,
        shape: Shape::Native,
    };
    allocate(st, input).await
}

async fn allocate_i3d(
    State(st): State<AppState>,
    _: Caller,
    Path(application_id): Path<String>,
    RawQuery(query): RawQuery,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<I3dAllocateBody>,
) -> Result<Response, Failure> {
    let application_id = number("applicationId", &application_id)?;
    let text = berth_http::query_param(query.as_deref(), "filters").unwrap_or_default();
    let filter = parse_filter(&text)?;
    check_metadata("metadata", &body.metadata)?;
    let input = AllocateInput {
        application_id,
        request_digest: request_digest(application_id, &filter, &body.metadata, &None),
        filter,
        metadata: body.metadata,
        game_metadata: None,
        idempotency_key: idempotency_key(&headers)?,
        identifier,
        shape: Shape::I3d,
    };
    allocate(st, input).await
}

fn agent_failure(f: AgentFailure, message: &str) -> Failure {
    let mut out = Failure::new(f.code, message, f.details);
    out.error_code = f.error_code;
    out
}

async fn deallocate(
    State(st): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    OptionalJsonBody(body): OptionalJsonBody<DeallocateBody>,
) -> ApiResult<InstanceObject> {
    let flow = async move {
        match st
            .inventory
            .begin_release(id.clone(), body.allocation_id)
            .await?
        {
            Release::NotAllocated(object) => Ok(*object),
            Release::Call {
                target,
                allocation_id,
            } => {
                let req = DeallocateRequest {
                    allocation_id: allocation_id.clone(),
                };
                let result = st
                    .agents
                    .deallocate(&target, &id, req, Some(&identifier))
                    .await;
                st.inventory.finish_release(id, allocation_id, result).await
            }
        }
    };
    let answer = tokio::spawn(flow).await.map_err(|e| {
        Failure::new(
            ErrorCode::InternalError,
            "Internal error.",
            format!("release task failed: {e}"),
        )
    })??;
    Ok(Json(answer))
}

/// Forwards one operation to the instance's agent and takes its answer into account.
async fn through_agent<F, Fut>(
    st: &AppState,
    id: String,
    op: InstanceOp,
    call: F,
) -> ApiResult<InstanceObject>
where
    F: FnOnce(Arc<crate::agent_client::AgentTarget>) -> Fut,
    Fut:
        std::future::Future<Output = Result<berth_protocol::agent_api::InstanceView, AgentFailure>>,
{
    let target = st.inventory.begin_op(id.clone(), op).await?;
    let host_id = target.host_id;
    let view = call(target)
        .await
        .map_err(|f| agent_failure(f, "Unable to act on application instance."))?;
    let object = st
        .inventory
        .apply_view(host_id, view)
        .await
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::ResourceNotFound,
                "Not found.",
                format!("instance {id} is gone"),
            )
        })?;
    Ok(Json(object))
}

async fn push_metadata(
    State(st): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    JsonBody(req): JsonBody<MetadataRequest>,
) -> ApiResult<InstanceObject> {
    check_metadata("metadata", &req.metadata)?;
    let agents = st.agents.clone();
    let iid = id.clone();
    through_agent(&st, id, InstanceOp::Metadata, |t| async move {
        agents.metadata(&t, &iid, &req, &identifier).await
    })
    .await
}

async fn command(
    State(st): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    JsonBody(req): JsonBody<CommandRequest>,
) -> ApiResult<InstanceObject> {
    let agents = st.agents.clone();
    let iid = id.clone();
    through_agent(&st, id, InstanceOp::Command, |t| async move {
        agents.command(&t, &iid, &req, &identifier).await
    })
    .await
}

async fn stop(
    State(st): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    Extension(CorrelationId(identifier)): Extension<CorrelationId>,
    OptionalJsonBody(req): OptionalJsonBody<StopRequest>,
) -> ApiResult<InstanceObject> {
    let force = berth_http::is_true(berth_http::query_param(query.as_deref(), "force").as_deref());
    let agents = st.agents.clone();
    let iid = id.clone();
    through_agent(&st, id, InstanceOp::Stop, |t| async move {
        agents.stop(&t, &iid, &req, force, &identifier).await
    })
    .await
}

// ----- listings ----------------------------------------------------------------------------

async fn list_instances(
    State(st): State<AppState>,
    _: Caller,
    RawQuery(query): RawQuery,
) -> ApiResult<Vec<InstanceObject>> {
    let q = query.as_deref();
    let filter = berth_http::query_param(q, "filter")
        .map(|f| {
            Filter::parse(&f).map_err(|e| Failure::new(e.code(), "Invalid filter.", e.to_string()))
        })
        .transpose()?
        .unwrap_or_default();
    let status = berth_http::query_param(q, "status")
        .map(|s| {
            s.parse::<i64>()
                .ok()
                .and_then(InstanceStatus::from_number)
                .ok_or_else(|| Failure::invalid_request(format!("status={s:?} is not one of 0-6")))
        })
        .transpose()?;
    let application_id = berth_http::query_param(q, "applicationId")
        .map(|a| number("applicationId", &a))
        .transpose()?;
    let all = berth_http::is_true(berth_http::query_param(q, "all").as_deref());
    let mut list = st
        .inventory
        .list_instances(ListQuery {
            filter,
            status,
            application_id,
        })
        .await?;
    // Removed instances are history: only with all=true, and never by default.
    if !all {
        list.retain(|o| o.status != InstanceStatus::Inactive);
    } else if status.is_none_or(|s| s == InstanceStatus::Inactive) {
        let removed = st.store.removed_instances().await.map_err(|e| {
            Failure::new(
                ErrorCode::InternalError,
                "Internal error.",
                format!("cannot read history: {e}"),
            )
        })?;
        list.extend(
            removed
                .into_iter()
                .filter(|r| application_id.is_none_or(|a| r.application_id == a))
                .map(removed_object),
        );
    }
    Ok(Json(list))
}

/// A removed instance from the history table, as an object (host details as last known).
fn removed_object(r: crate::model::InstanceRecord) -> InstanceObject {
    let v = r.view;
    InstanceObject {
        id: r.id,
        application_id: r.application_id,
        fleet_id: r.fleet_id,
        deployment_environment_id: None,
        profile_id: v.profile_id,
        build: v.build,
        host_id: r.host_id,
        host_name: String::new(),
        region_id: 0,
        region_name: String::new(),
        dc_location_id: 0,
        dc_location_name: String::new(),
        is_virtual: 0,
        ip_address: String::new(),
        port: v.port,
        management_port: v.management_port,
        status: InstanceStatus::Inactive,
        state: v.state,
        pid: None,
        arcus_connected: false,
        arcus_error: None,
        num_players: None,
        num_players_max: None,
        live_host_name: None,
        live_map: None,
        live_rules: None,
        live_game_version: None,
        metadata: Vec::new(),
        reverse_metadata: Vec::new(),
        allocation_id: None,
        allocated_at: None,
        restarts: v.restarts,
        auto_restart: v.auto_restart,
        releasing: false,
        created_at: berth_protocol::time::rfc3339(r.created_at),
        updated_at: berth_protocol::time::rfc3339(r.removed_at.unwrap_or(v.updated_at)),
    }
}

async fn get_instance(
    State(st): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> ApiResult<InstanceObject> {
    st.inventory
        .instance(id.clone())
        .await?
        .map(Json)
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::ResourceNotFound,
                "Not found.",
                format!("instance {id} does not exist"),
            )
        })
}

async fn hosts(State(st): State<AppState>, _: Caller) -> Result<Response, Failure> {
    Ok(Json(st.inventory.hosts().await?).into_response())
}

async fn host(
    State(st): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: u64 = number("host id", &id)?;
    Ok(Json(st.inventory.host(id).await?).into_response())
}

/// `DELETE /v1/hosts/{id}[?releaseAllocations=true]`: answers the host as it was last seen.
async fn delete_host(
    State(st): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, Failure> {
    let id: u64 = number("host id", &id)?;
    let release = match berth_http::query_param(q.as_deref(), "releaseAllocations").as_deref() {
        None => false,
        Some(v) if berth_http::is_true(Some(v)) => true,
        Some("false" | "0" | "no") => false,
        Some(v) => {
            return Err(Failure::invalid_request(format!(
                "releaseAllocations={v:?} must be true or false"
            )));
        }
    };
    let (h, commit) = st.inventory.delete_host(id, release).await?;
    durable(commit, Change::Setting).await?;
    Ok(Json(h).into_response())
}

async fn set_drain(st: AppState, id: String, on: bool) -> Result<Response, Failure> {
    let id: u64 = number("host id", &id)?;
    let (h, commit) = st.inventory.drain(id, on).await?;
    durable(commit, Change::Setting).await?;
    Ok(Json(h).into_response())
}

async fn drain(
    State(st): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    set_drain(st, id, true).await
}

async fn undrain(
    State(st): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    set_drain(st, id, false).await
}

async fn error_story(
    State(st): State<AppState>,
    _: Caller,
    Path(identifier): Path<String>,
) -> Result<Response, Failure> {
    if let Some(s) = st.inventory.story(identifier.clone()).await? {
        return Ok(Json(s).into_response());
    }
    match st.store.error_story(&identifier).await {
        Ok(Some(s)) => Ok(Json(s).into_response()),
        Ok(None) => Err(Failure::new(
            ErrorCode::ResourceNotFound,
            "Not found.",
            format!(
                "no failed request with identifier {identifier} is on record (only failed requests are kept, and only the most recent ones)"
            ),
        )),
        Err(e) => Err(Failure::new(
            ErrorCode::InternalError,
            "Internal error.",
            e.to_string(),
        )),
    }
}

// ----- resources ---------------------------------------------------------------------------

async fn crud(st: &AppState, op: Crud, created: bool) -> Result<Response, Failure> {
    let (value, commit) = st.inventory.crud(op).await?;
    if let Some(c) = commit {
        durable(c, Change::Setting).await?;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(value)).into_response())
}

/// The five handlers of a resource. `$put_op` makes the inventory command from a body and
/// whether it is a create (POST refuses an id that exists; PUT replaces).
macro_rules! resource {
    ($list:ident, $get:ident, $create:ident, $put:ident, $delete:ident, $ty:ty, $id:ty, $name:literal,
     $List:ident, $Get:ident, $put_op:expr, $Delete:ident, $idof:expr) => {
        async fn $list(State(st): State<AppState>, _: Caller) -> Result<Response, Failure> {
            crud(&st, Crud::$List, false).await
        }
        async fn $get(
            State(st): State<AppState>,
            _: Caller,
            Path(id): Path<String>,
        ) -> Result<Response, Failure> {
            let id: $id = number(concat!($name, " id"), &id)?;
            crud(&st, Crud::$Get(id), false).await
        }
        async fn $create(
            State(st): State<AppState>,
            _: Admin,
            JsonBody(body): JsonBody<$ty>,
        ) -> Result<Response, Failure> {
            crud(&st, ($put_op)(body, true), true).await
        }
        async fn $put(
            State(st): State<AppState>,
            _: Admin,
            Path(id): Path<String>,
            JsonBody(body): JsonBody<$ty>,
        ) -> Result<Response, Failure> {
            let id: $id = number(concat!($name, " id"), &id)?;
            let idof: fn(&$ty) -> $id = $idof;
            let body_id = idof(&body);
            if body_id != id {
                return Err(Failure::invalid_request(format!(
                    "the body's id {body_id:?} differs from the path's {id:?}; they must be the same"
                )));
            }
            crud(&st, ($put_op)(body, false), false).await
        }
        async fn $delete(
            State(st): State<AppState>,
            _: Admin,
            Path(id): Path<String>,
        ) -> Result<Response, Failure> {
            let id: $id = number(concat!($name, " id"), &id)?;
            crud(&st, Crud::$Delete(id), false).await
        }
    };
}

resource!(
    list_applications,
    get_application,
    create_application,
    put_application,
    delete_application,
    Application,
    u32,
    "application",
    ListApplications,
    GetApplication,
    Crud::PutApplication,
    DeleteApplication,
    |a: &Application| a.id
);
resource!(
    list_fleets,
    get_fleet,
    create_fleet,
    put_fleet,
    delete_fleet,
    Fleet,
    u64,
    "fleet",
    ListFleets,
    GetFleet,
    |f, create| Crud::PutFleet(Box::new(f), create),
    DeleteFleet,
    |f: &Fleet| f.id
);
resource!(
    list_builds,
    get_build,
    create_build,
    put_build,
    delete_build,
    Build,
    String,
    "build",
    ListBuilds,
    GetBuild,
    |b, create| Crud::PutBuild(Box::new(b), create),
    DeleteBuild,
    |b: &Build| b.id.clone()
);
resource!(
    list_profiles,
    get_profile,
    create_profile,
    put_profile,
    delete_profile,
    Profile,
    String,
    "profile",
    ListProfiles,
    GetProfile,
    |p, create| Crud::PutProfile(Box::new(p), create),
    DeleteProfile,
    |p: &Profile| p.id.clone()
);
// A region POST replaces like a PUT, as it always has (configured regions are re-put at start).
resource!(
    list_regions,
    get_region,
    create_region,
    put_region,
    delete_region,
    Region,
    u32,
    "region",
    ListRegions,
    GetRegion,
    |r, _create| Crud::PutRegion(r),
    DeleteRegion,
    |r: &Region| r.id
);

async fn list_dc_locations(State(st): State<AppState>, _: Caller) -> Result<Response, Failure> {
    crud(&st, Crud::ListDcLocations, false).await
}

async fn create_dc_location(
    State(st): State<AppState>,
    _: Admin,
    JsonBody(d): JsonBody<DcLocation>,
) -> Result<Response, Failure> {
    crud(&st, Crud::PutDcLocation(d), true).await
}

async fn list_environments(State(st): State<AppState>, _: Caller) -> Result<Response, Failure> {
    crud(&st, Crud::ListEnvironments, false).await
}

async fn create_environment(
    State(st): State<AppState>,
    _: Admin,
    JsonBody(e): JsonBody<DeploymentEnvironment>,
) -> Result<Response, Failure> {
    crud(&st, Crud::PutEnvironment(e), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_is_a_token_bucket() {
        const MS: u64 = 1_000_000;
        let l = RateLimit::new(10);
        // A full bucket: a burst of 10, then a refusal saying when the next one passes.
        for _ in 0..10 {
            assert_eq!(l.admit_at(0), Ok(()));
        }
        assert_eq!(l.admit_at(0), Err(Duration::from_millis(100)));
        // One request's worth comes back every 100 ms, no more.
        assert_eq!(l.admit_at(60 * MS), Err(Duration::from_millis(40)));
        assert_eq!(l.admit_at(100 * MS), Ok(()));
        assert!(l.admit_at(100 * MS).is_err());
        // Steady at the rate: every request passes.
        for n in 2..50 {
            assert_eq!(l.admit_at(n * 100 * MS), Ok(()), "request at {n}00 ms");
        }
        // 40 requests 5 ms apart across a second's edge (950-1145 ms): a fixed window let 2 × 10
        // through; the bucket, its 10 and then the rate.
        let l = RateLimit::new(10);
        let passed = (0..40)
            .filter(|n| l.admit_at(950 * MS + n * MS * 5).is_ok())
            .count();
        assert_eq!(passed, 10 + 1, "10 at once, then one 100 ms after the 10th");
        assert_eq!(RateLimit::new(0).admit(), Ok(()), "0: no limit");
    }

    /// How the digest input was built before it was serialised directly.
    fn canonical_before(
        application_id: u32,
        filter: &Filter,
        metadata: &[KeyValue],
        game: &Option<Vec<KeyValue>>,
    ) -> Vec<u8> {
        serde_json::json!([application_id, filter.to_string(), metadata, game])
            .to_string()
            .into_bytes()
    }

    #[test]
    fn request_digests_stored_before_still_match() {
        let metadata = [
            KeyValue::new("map", "dust \"2\" \\ é 🚀\n\t\u{1}\u{7f}</script>"),
            KeyValue::new("", ""),
            KeyValue::new("mode", "ctf"),
        ];
        let games = [
            None,
            Some(Vec::new()),
            Some(vec![KeyValue::new("seed", "42")]),
        ];
        for text in ["", "fleetId=456", "regionName=\"eu west\" and isVirtual=1"] {
            let filter = Filter::parse(text).expect("filter");
            for m in [&metadata[..], &[]] {
                for g in &games {
                    for app in [0, 7, u32::MAX] {
                        assert_eq!(
                            canonical_request(app, &filter, m, g),
                            canonical_before(app, &filter, m, g),
                            "{app} {text:?} {m:?} {g:?}"
                        );
                    }
                }
            }
        }
        // And the digest itself, as stored by earlier versions.
        let filter = Filter::parse("fleetId=456").expect("filter");
        assert_eq!(
            request_digest(7, &filter, &metadata[2..], &None),
            hex(&Sha256::digest(
                br#"[7,"fleetId=456",[{"key":"mode","value":"ctf"}],null]"#
            ))
        );
    }
}
