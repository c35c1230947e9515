//! HTTP plumbing shared by the agent, the controller and `berthctl`.
//!
//! * [`Failure`]: what a handler returns when it refuses; [`correlate`] turns it into the one
//!   error body of ERRORS.md, with the request's correlation id, path and time.
//! * [`JsonBody`] / [`OptionalJsonBody`]: strict JSON bodies whose errors name the field.
//! * [`serve`]: an HTTP/1 server with a header timeout and a bounded graceful shutdown.
//! * [`JsonClient`]: a pooled JSON client that maps every failure to a [`CallError`].

mod client;
mod server;
pub mod tls;

pub use client::{CallError, JsonClient};
pub use server::{ServeError, ServeTls, serve};

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_protocol::{Attempt, ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use tracing::Instrument;

/// Largest request body either daemon accepts.
pub const BODY_LIMIT: usize = 1 << 20;
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// On a refusal made before any handler ran (a connection's certificate refused after a
/// reload): the same request may be sent again, on a new connection. A 403 that closes the
/// connection is not enough to tell, since any server or proxy may send one.
pub const RECONNECT_HEADER: &str = "x-berth-reconnect";

/// The correlation id of the request being handled (from `X-Correlation-Id` or made up).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// A refused request. Rendered by [`correlate`], which knows the identifier and the path.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    pub details: String,
    pub attempts: Option<Vec<Attempt>>,
    /// The agent code when it differs from the code's own (a controller error caused by an
    /// agent answer).
    pub error_code: Option<u32>,
    /// Extra response headers, e.g. `Retry-After`.
    pub retry_after_secs: Option<u64>,
    /// What led to the refusal (candidates, attempts), kept by the controller as the story of
    /// the request; never sent in the body.
    pub story: Option<Box<serde_json::Value>>,
    /// Set by [`not_found`] and [`method_not_allowed`]: the request reached no handler, so no
    /// caller was authenticated (a recording sink must not keep it).
    pub unrouted: bool,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: details.into(),
            attempts: None,
            error_code: code.agent_code(),
            retry_after_secs: None,
            story: None,
            unrouted: false,
        }
    }

    pub fn invalid_request(details: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, "Invalid request.", details)
    }

    pub fn body(&self, identifier: &str, path: &str) -> ErrorBody {
        let mut body = ErrorBody::new(
            self.code,
            self.message.clone(),
            self.details.clone(),
            identifier,
            path,
            berth_protocol::time::rfc3339(unix_now()),
        );
        body.error_code = self.error_code;
        body.attempts = self.attempts.clone();
        body
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = status.into_response();
        resp.extensions_mut().insert(self);
        resp
    }
}

pub use berth_protocol::time::unix_now;

fn valid_correlation(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then_some(s)
}

/// A failed request as [`correlate_recording`] hands it to its sink.
#[derive(Debug, Clone)]
pub struct FailureRecord {
    pub method: String,
    pub body: ErrorBody,
    pub story: Option<serde_json::Value>,
    /// See [`Failure::unrouted`].
    pub unrouted: bool,
}

/// Where failed requests go to be remembered.
pub type FailureSink = std::sync::Arc<dyn Fn(FailureRecord) + Send + Sync>;

/// Middleware for every route: takes or makes the correlation id, runs the request in a span
/// carrying it, renders a [`Failure`] into the error body, and echoes `X-Correlation-Id`.
pub async fn correlate(req: Request, next: Next) -> Response {
    handle(req, next, None).await
}

/// [`correlate`], and every failure is also given to `sink`.
pub async fn correlate_recording(
    axum::extract::State(sink): axum::extract::State<FailureSink>,
    req: Request,
    next: Next,
) -> Response {
    handle(req, next, Some(sink)).await
}

async fn handle(mut req: Request, next: Next, sink: Option<FailureSink>) -> Response {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(valid_correlation)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let span = tracing::info_span!("request", identifier = %id, %method, %path);
    // Refused before any handler runs, so the client may send the request again.
    let refused = req
        .extensions()
        .get::<tls::PeerChain>()
        .and_then(tls::PeerChain::refusal);
    let close = refused.is_some();
    let mut resp = match refused {
        Some(failure) => failure.into_response(),
        None => next.run(req).instrument(span.clone()).await,
    };
    if let Some(failure) = resp.extensions_mut().remove::<Failure>() {
        let body = failure.body(&id, &path);
        span.in_scope(|| {
            if body.status_code >= 500 {
                tracing::error!(code = %body.code, details = %body.details, "request failed");
            } else if body.code == berth_protocol::ErrorCode::ResourceNotFound {
                // Probes for things that may not exist (`apply`, listings) are routine.
                tracing::debug!(code = %body.code, details = %body.details, "request refused");
            } else {
                tracing::info!(code = %body.code, details = %body.details, "request refused");
            }
        });
        let status = resp.status();
        let mut rendered = (status, Json(&body)).into_response();
        if let Some(secs) = failure.retry_after_secs {
            rendered
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(sink) = sink {
            sink(FailureRecord {
                method: method.to_string(),
                body,
                story: failure.story.map(|b| *b),
                unrouted: failure.unrouted,
            });
        }
        resp = rendered;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(CORRELATION_HEADER, v);
    }
    if close {
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(RECONNECT_HEADER, HeaderValue::from_static("1"));
    }
    resp
}

/// For routes that do not exist.
pub async fn not_found(req: Request) -> Failure {
    let mut f = Failure::new(
        ErrorCode::ResourceNotFound,
        "Not found.",
        format!("no route {} {}", req.method(), req.uri().path()),
    );
    f.unrouted = true;
    f
}

/// For a known route with the wrong method.
pub async fn method_not_allowed(req: Request) -> Failure {
    let mut f = Failure::invalid_request(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ));
    f.unrouted = true;
    f
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A required JSON body of at most `LIMIT` bytes. Errors name the field
/// (`profile.executable: missing field …`).
#[derive(Debug)]
pub struct JsonBody<T, const LIMIT: usize = BODY_LIMIT>(pub T);

/// A JSON body that may be empty (then `T::default()`).
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

/// A JSON answer, rendered by [`to_json_bytes`]. `axum::Json` grows its buffer from 128 bytes
/// by doubling: an instance object (≈ 830 bytes) costs three reallocations with their copies,
/// and the last, a 1 KiB request, makes glibc consolidate its fast bins first. Every
/// allocation and release is answered with one, so the answers use this instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match to_json_bytes(&self.0) {
            Ok(bytes) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response(),
            // Only a map with non-string keys or a failing `Serialize` impl gets here: a bug,
            // answered as `axum::Json` answers it.
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                )],
                e.to_string(),
            )
                .into_response(),
        }
    }
}

/// Scratch space kept between renderings; one larger than this is given back afterwards.
const SCRATCH_KEEP: usize = 64 << 10;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Serializes into this thread's scratch buffer, then copies the text into one allocation of
/// exactly its size: no reallocation while writing, and a body under 1 KiB stays in glibc's
/// cheap small-size paths.
pub fn to_json_bytes<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<bytes::Bytes, serde_json::Error> {
    SCRATCH.with(|cell| {
        // A `Serialize` impl that renders JSON itself would find the buffer taken.
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return serde_json::to_vec(value).map(bytes::Bytes::from);
        };
        buf.clear();
        let written = serde_json::to_writer(&mut *buf, value);
        let out = written.map(|()| bytes::Bytes::copy_from_slice(&buf));
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        out
    })
}

async fn read_body(req: Request, limit: usize) -> Result<bytes::Bytes, Failure> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                Failure::new(
                    ErrorCode::PayloadTooLarge,
                    "Payload too large.",
                    format!("the request body is over the {limit}-byte limit"),
                )
            } else {
                Failure::invalid_request(format!("cannot read the request body: {e}"))
            }
        })
}

/// Parses JSON, naming the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    // Tracking the path costs an allocation per object key on every body, so a body is parsed
    // plainly first and again with the path only to explain why it failed.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            Failure::invalid_request(format!("invalid JSON body: {inner}"))
        } else {
            Failure::invalid_request(format!("invalid JSON body at {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Failure::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

impl<S: Send + Sync, T: DeserializeOwned, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = Failure;

    async fn from_request(req: Request, _: &S) -> Result<Self, Failure> {
        let bytes = read_body(req, LIMIT).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Failure::invalid_request("a JSON body is required"));
        }
        parse_json(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, _: &S) -> Result<Self, Failure> {
        let bytes = read_body(req, BODY_LIMIT).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// The value of one query parameter (`?tail=10&follow=true`), percent-decoding `+` and `%XX`.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Percent-encodes one path segment or query value: everything but RFC 3986's unreserved
/// characters, so [`percent_decode`] gives the text back.
pub fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `true`/`1`/`yes` → true.
pub fn is_true(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_decoding() {
        assert_eq!(
            query_param(Some("a=1&tail=20"), "tail").as_deref(),
            Some("20")
        );
        assert_eq!(
            query_param(Some("filter=regionId%3D1+and+fleetId=4"), "filter").as_deref(),
            Some("regionId=1 and fleetId=4")
        );
        assert_eq!(query_param(Some("all"), "all").as_deref(), Some(""));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    #[test]
    fn encoding_round_trips_through_the_decoder() {
        let f = "regionName=\"eu west\" and fleetId=456&x+y%é";
        let e = percent_encode(f);
        assert!(!e.contains(['=', ' ', '&', '+', '"']), "{e}");
        assert_eq!(percent_decode(&e), f);
        assert_eq!(percent_encode("arena-1.0"), "arena-1.0");
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Inner {
            executable: String,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Outer {
            profile: Inner,
        }
        let e = parse_json::<Outer>(br#"{"profile":{"executable":5}}"#).expect_err("type");
        assert!(e.details.contains("profile.executable"), "{}", e.details);
        let e = parse_json::<Outer>(br#"{"profile":{}} x"#).expect_err("trailing");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let deep = "[".repeat(10_000);
        assert!(parse_json::<serde_json::Value>(deep.as_bytes()).is_err());
    }

    #[tokio::test]
    async fn unrouted_failures_are_marked() {
        let req = || {
            axum::http::Request::builder()
                .method("DELETE")
                .uri("/v1/nothing")
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert!(not_found(req()).await.unrouted);
        assert!(method_not_allowed(req()).await.unrouted);
        assert!(!Failure::invalid_request("a handler's refusal").unrouted);
    }

    #[test]
    fn bearer_and_eq() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
