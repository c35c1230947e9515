//! Talking to the controller, and turning every way that can fail into one clear message with
//! the right exit code.
//!
//! Built on berth-http's `JsonClient`, but answers are kept as bytes: `--json` prints what the
//! controller sent, byte for byte.

use std::time::Duration;

use anyhow::Result;
use berth_http::{CallError, JsonClient};
use berth_protocol::{ErrorBody, ErrorCode};
use bytes::Bytes;
use http::{Method, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::settings::Source;
use crate::{EXIT_AUTH, EXIT_FAILED, EXIT_UNREACHABLE, Exit};

/// Long enough for an allocation that tries several candidates (5 s each at worst).
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    base_source: Source,
    token: Option<(String, Source)>,
    http: JsonClient,
    timeout: Duration,
}

impl Api {
    pub fn new(base: String, base_source: Source, token: Option<(String, Source)>) -> Self {
        Self {
            base,
            base_source,
            token,
            http: JsonClient::new(),
            timeout: TIMEOUT,
        }
    }

    /// The same, over `https://` too, trusting `tls`'s roots.
    pub fn with_tls(self, tls: &berth_http::tls::TlsClientConfig) -> Self {
        Self {
            http: JsonClient::with_tls(tls),
            ..self
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same controller with another token (dev allocates with the matchmaker token).
    pub fn with_token(&self, token: String, source: Source) -> Self {
        Self {
            token: Some((token, source)),
            ..self.clone()
        }
    }

    /// One request; a non-2xx answer is a [`CallError::Status`] carrying the error body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, CallError> {
        let url = format!("{}{path}", self.base);
        let mut all = vec![(
            header::USER_AGENT.as_str(),
            concat!("berthctl/", env!("CARGO_PKG_VERSION")),
        )];
        all.extend_from_slice(headers);
        let token = self.token.as_ref().map(|(t, _)| t.as_str());
        self.http
            .send_with(
                method,
                &url,
                token,
                &all,
                body.map(Bytes::from),
                self.timeout,
            )
            .await
            .map(|(_, bytes)| bytes)
    }

    pub async fn get(&self, path: &str) -> Result<Bytes> {
        self.request(Method::GET, path, None, &[])
            .await
            .map_err(|e| self.failure("GET", path, e))
    }

    /// `None` when the controller says the resource does not exist.
    pub async fn get_opt(&self, path: &str) -> Result<Option<Bytes>> {
        match self.request(Method::GET, path, None, &[]).await {
            Ok(b) => Ok(Some(b)),
            Err(CallError::Status {
                status: 404,
                body: Some(body),
                ..
            }) if body.code == ErrorCode::ResourceNotFound => Ok(None),
            Err(e) => Err(self.failure("GET", path, e)),
        }
    }

    pub async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        headers: &[(&str, &str)],
    ) -> Result<Bytes> {
        self.send_json(Method::POST, path, body, headers).await
    }

    pub async fn put<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<Bytes> {
        self.send_json(Method::PUT, path, body, &[]).await
    }

    pub async fn delete(&self, path: &str) -> Result<Bytes> {
        self.request(Method::DELETE, path, None, &[])
            .await
            .map_err(|e| self.failure("DELETE", path, e))
    }

    async fn send_json<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: &B,
        headers: &[(&str, &str)],
    ) -> Result<Bytes> {
        let bytes = serde_json::to_vec(body)?;
        let name = method.to_string();
        self.request(method, path, Some(bytes), headers)
            .await
            .map_err(|e| self.failure(&name, path, e))
    }

    /// Decodes an answer, blaming a version mismatch rather than the user when it does not fit.
    pub fn decode<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| {
            Exit::failed(format!(
                "error: the controller at {} answered {path} with JSON berthctl does not understand \
                 ({e}); are berthctl and the controller the same version? (--json shows the answer)",
                self.base
            ))
        })
    }

    /// The message and exit code for a failed call.
    pub fn failure(&self, method: &str, path: &str, e: CallError) -> anyhow::Error {
        let base = &self.base;
        let from = match &self.base_source {
            Source::Default => String::new(),
            s => format!(" (from {s})"),
        };
        let exit = match e {
            CallError::InvalidUrl(url) => Exit::new(
                EXIT_FAILED,
                format!("error: {url:?} is not a valid URL; check the controller URL{from}"),
            ),
            // The URL is fine; a header is not (the reason names which and what it must be).
            CallError::InvalidRequest { reason, .. } => Exit::new(
                EXIT_FAILED,
                format!(
                    "error: {method} {path} was not sent to the controller at {base}: {reason}{}",
                    self.token
                        .as_ref()
                        .map_or_else(String::new, |(_, s)| format!(" (the token is from {s})"))
                ),
            ),
            CallError::Unreachable { reason, .. } => Exit::new(
                EXIT_UNREACHABLE,
                format!(
                    "error: cannot reach the controller at {base}{from}: {reason}; is it running? \
                     (set --controller or BERTH_CONTROLLER)"
                ),
            ),
            CallError::TimedOut { ms, .. } => Exit::new(
                EXIT_UNREACHABLE,
                format!(
                    "error: the controller at {base}{from} did not answer {method} {path} within \
                     {} s; is it overloaded or stuck? (its /readyz says whether its database is \
                     reachable)",
                    ms / 1000
                ),
            ),
            CallError::Decode { reason, .. } => Exit::new(EXIT_FAILED, format!("error: {reason}")),
            CallError::Status {
                status, body, text, ..
            } => return self.refusal(method, path, status, body, &text),
        };
        exit.into()
    }

    fn refusal(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: Option<Box<ErrorBody>>,
        text: &str,
    ) -> anyhow::Error {
        let Some(body) = body else {
            let code = if status == 401 || status == 403 {
                EXIT_AUTH
            } else {
                EXIT_FAILED
            };
            let text: String = text.trim().chars().take(300).collect();
            return Exit::new(
                code,
                format!(
                    "error: {method} {path} answered HTTP {status} without Berth's error body{}; \
                     is {} a Berth controller (and not a proxy)?",
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    },
                    self.base
                ),
            )
            .into();
        };
        let mut exit = match body.code {
            ErrorCode::MissingCredentials | ErrorCode::InvalidCredentials => {
                Exit::new(EXIT_AUTH, self.auth_message(&body))
            }
            _ => Exit::new(EXIT_FAILED, refusal_message(&body)),
        };
        exit.body = Some(Bytes::from(text.to_owned()));
        exit.into()
    }

    fn auth_message(&self, body: &ErrorBody) -> String {
        let first = match (&self.token, body.code) {
            (None, _) => format!(
                "error: the controller at {} needs a token and berthctl has none \
                 ({}, HTTP {}).\n\
                 Give one with --token, BERTH_TOKEN, or `token`/`token_file` in {}.",
                self.base,
                body.code,
                body.status_code,
                crate::settings::default_config_path().map_or_else(
                    || "~/.config/berth/berthctl.toml".to_owned(),
                    |p| p.display().to_string()
                )
            ),
            (Some((_, source)), _) => format!(
                "error: the controller at {} refused the token from {source} ({}, HTTP {}): {}\n\
                 Check it against the [[tokens]] of controller.toml (admin routes need role \
                 \"admin\"); `berthctl dev` prints its tokens.",
                self.base, body.code, body.status_code, body.details
            ),
        };
        format!("{first}\nidentifier: {}", body.identifier)
    }
}

/// `error: CODE (HTTP status): details`, the identifier and where to look next.
pub fn refusal_message(body: &ErrorBody) -> String {
    let mut out = format!(
        "error: {} (HTTP {}): {}",
        body.code,
        body.status_code,
        if body.details.is_empty() {
            &body.message
        } else {
            &body.details
        }
    );
    if let Some(n) = body.error_code {
        out.push_str(&format!("\nerrorCode: {n} (host agent)"));
    }
    if let Some(attempts) = body.attempts.as_ref().filter(|a| !a.is_empty()) {
        out.push_str("\nattempts:");
        for (i, a) in attempts.iter().enumerate() {
            let code = a.code.map_or_else(String::new, |c| format!(" {c}"));
            let num = a.error_code.map_or_else(String::new, |n| format!(" {n}"));
            out.push_str(&format!(
                "\n  {}. instance {} on host {}:{num}{code} (HTTP {}){}",
                i + 1,
                crate::render::short_id(&a.instance_id),
                a.host_id,
                a.status_code,
                if a.details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", a.details)
                }
            ));
        }
    }
    out.push_str(&format!(
        "\nidentifier: {}\nrun: berthctl errors show {}\n     berthctl explain {}",
        body.identifier, body.identifier, body.code
    ));
    out
}
