//! A pooled HTTP/1 JSON client. Connections are kept alive and reused, which matters on the
//! allocation path (controller → agent) where a new TCP connection per call would dominate.

use std::time::Duration;

use berth_protocol::ErrorBody;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone)]
pub struct JsonClient {
    inner: Inner,
}

/// Plain HTTP only, or both `http://` and `https://` URLs.
#[derive(Debug, Clone)]
enum Inner {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

/// Why a call did not produce the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("invalid URL {0:?}")]
    InvalidUrl(String),
    /// The request could not be built for another reason than its URL: `reason` names the
    /// header at fault (a token, a correlation or idempotency id) and what it must look like.
    #[error("cannot send a request to {url}: {reason}")]
    InvalidRequest { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} did not answer within {ms} ms")]
    TimedOut { url: String, ms: u128 },
    #[error("{url} answered HTTP {status}: {}", body.as_ref().map_or(text.as_str(), |b| b.details.as_str()))]
    Status {
        url: String,
        status: u16,
        /// The error body, when the peer sent one in Berth's shape.
        body: Option<Box<ErrorBody>>,
        text: String,
    },
    #[error("{url} answered with unexpected JSON: {reason}")]
    Decode { url: String, reason: String },
}

impl Default for JsonClient {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonClient {
    fn connector() -> HttpConnector {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector
    }

    fn builder() -> hyper_util::client::legacy::Builder {
        let mut b = Client::builder(TokioExecutor::new());
        // Our servers close a connection idle for `HEADER_READ_TIMEOUT`; one idle about that
        // long could be closed by the server just as a request goes out on it (which then
        // fails, though the server never read it). Dropping idle connections well before
        // leaves no such moment.
        b.pool_idle_timeout(crate::server::HEADER_READ_TIMEOUT / 2)
            .pool_max_idle_per_host(512);
        b
    }

    /// A client for `http://` URLs.
    pub fn new() -> Self {
        Self {
            inner: Inner::Plain(Self::builder().build(Self::connector())),
        }
    }

    /// A client for `http://` and `https://` URLs: servers are verified with `tls`'s roots,
    /// and its client certificate is presented to those that ask.
    pub fn with_tls(tls: &ClientConfig) -> Self {
        let mut http = Self::connector();
        // The HTTPS connector hands `https://` URLs to it too.
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            inner: Inner::Tls(Self::builder().build(https)),
        }
    }

    pub async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        url: &str,
        token: Option<&str>,
        correlation: Option<&str>,
        body: &B,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let bytes = crate::to_json_bytes(body).map_err(|e| CallError::Decode {
            url: url.to_owned(),
            reason: format!("request not serialisable: {e}"),
        })?;
        let (_, raw) = self
            .send(Method::POST, url, token, correlation, Some(bytes), timeout)
            .await?;
        decode(url, &raw)
    }

    pub async fn get<R: DeserializeOwned>(
        &self,
        url: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let (_, raw) = self
            .send(Method::GET, url, token, None, None, timeout)
            .await?;
        decode(url, &raw)
    }

    pub async fn delete<R: DeserializeOwned>(
        &self,
        url: &str,
        token: Option<&str>,
        correlation: Option<&str>,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let (_, raw) = self
            .send(Method::DELETE, url, token, correlation, None, timeout)
            .await?;
        decode(url, &raw)
    }

    /// One request; a non-2xx answer is an error carrying the peer's error body.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        correlation: Option<&str>,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        let headers: &[(&str, &str)] = match correlation {
            Some(c) => &[(crate::CORRELATION_HEADER, c)],
            None => &[],
        };
        self.send_with(method, url, token, headers, body, timeout)
            .await
    }

    /// [`JsonClient::send`] with any extra headers (`Idempotency-Key`, `User-Agent`, …).
    pub async fn send_with(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        let attempt = || self.send_once(method.clone(), url, token, headers, body.clone(), timeout);
        let (mut status, mut bytes, reconnect) = attempt().await?;
        // A daemon refuses a request on a connection whose certificate it no longer accepts
        // since it reloaded its [tls] files before anything runs, closes the connection and
        // says so (`RECONNECT_HEADER`). The request goes again on a new connection, whose
        // handshake shows the certificate this side uses now and is decided by the peer's new
        // files, so a rotation fails no call and a revoked certificate fails at the
        // handshake, with its reason.
        if reconnect {
            (status, bytes, _) = attempt().await?;
        }
        if !(200..300).contains(&status) {
            return Err(CallError::Status {
                url: url.to_owned(),
                status,
                body: serde_json::from_slice::<ErrorBody>(&bytes)
                    .ok()
                    .map(Box::new),
                // Whole (error bodies are small; 64 KiB bounds a misbehaving peer): a CLI
                // prints it as the peer's answer.
                text: String::from_utf8_lossy(&bytes[..bytes.len().min(64 << 10)]).into_owned(),
            });
        }
        Ok((status, bytes))
    }

    /// One exchange: the status, the body, and whether the peer asks for the request again
    /// on a new connection.
    async fn send_once(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes, bool), CallError> {
        // Each part is checked on its own so that the error names the part to fix: only a bad
        // URL is reported as one.
        let uri = Uri::try_from(url).map_err(|_| CallError::InvalidUrl(url.to_owned()))?;
        let invalid = |reason: String| CallError::InvalidRequest {
            url: url.to_owned(),
            reason,
        };
        const VALUE_RULE: &str =
            "a header value must be visible ASCII characters or spaces, with no line breaks";
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            // The token is a secret: named, never shown.
            let v = HeaderValue::try_from(format!("Bearer {t}")).map_err(|_| {
                invalid(format!(
                    "the token cannot be sent in the Authorization header ({VALUE_RULE}); check it for a stray line break or a non-ASCII character"
                ))
            })?;
            req = req.header(header::AUTHORIZATION, v);
        }
        for (k, v) in headers {
            let name = HeaderName::try_from(*k)
                .map_err(|_| invalid(format!("{k:?} is not a valid HTTP header name")))?;
            let value = HeaderValue::try_from(*v).map_err(|_| {
                invalid(format!("the {k} header cannot carry {v:?} ({VALUE_RULE})"))
            })?;
            req = req.header(name, value);
        }
        let has_body = body.is_some();
        if has_body {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| invalid(e.to_string()))?;
        let call = async {
            let resp = match &self.inner {
                Inner::Plain(c) => c.request(req).await,
                Inner::Tls(c) => c.request(req).await,
            }
            .map_err(|e| CallError::Unreachable {
                url: url.to_owned(),
                reason: error_chain(&e),
            })?;
            let status = resp.status().as_u16();
            let reconnect = resp.headers().contains_key(crate::RECONNECT_HEADER);
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unreachable {
                    url: url.to_owned(),
                    reason: format!("answer cut off: {e}"),
                })?
                .to_bytes();
            Ok::<_, CallError>((status, bytes, reconnect))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| CallError::TimedOut {
                url: url.to_owned(),
                ms: timeout.as_millis(),
            })?
    }
}

fn decode<R: DeserializeOwned>(url: &str, bytes: &[u8]) -> Result<R, CallError> {
    serde_json::from_slice(bytes).map_err(|e| CallError::Decode {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

/// hyper says "client error (Connect)"; the innermost cause ("Connection refused") is what
/// helps a reader.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(s) = last.source() {
        last = s;
    }
    let reason = last.to_string();
    match tls_hint(&reason) {
        Some(hint) => format!("{reason} ({hint})"),
        None => reason,
    }
}

/// What a TLS failure means for the operator who has to fix it, by rustls' wording.
fn tls_hint(reason: &str) -> Option<&'static str> {
    let hints = [
        (
            "UnknownIssuer",
            "the server's certificate is not signed by this side's tls.ca_file",
        ),
        (
            "NotValidForName",
            "the server's certificate does not name the address in the URL",
        ),
        ("Expired", "a certificate has expired"),
        (
            "alert: UnknownCA",
            "the server does not accept this side's certificate: it is not signed by the \
             server's tls.ca_file",
        ),
        (
            "alert: CertificateRevoked",
            "the server refuses this side's certificate: it is listed in the server's \
             tls.crl_file; install a new one",
        ),
        (
            "Revoked",
            "the server's certificate is listed in this side's tls.crl_file",
        ),
        (
            "alert: CertificateRequired",
            "the server asks for a client certificate: set [tls] on this side",
        ),
        (
            "InvalidContentType",
            "the server did not answer in TLS: is the URL https:// for a server without [tls]?",
        ),
    ];
    hints
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map(|(_, hint)| *hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_get_a_hint() {
        assert!(
            tls_hint("invalid peer certificate: UnknownIssuer")
                .is_some_and(|h| h.contains("tls.ca_file"))
        );
        assert!(
            tls_hint("received fatal alert: CertificateRequired")
                .is_some_and(|h| h.contains("[tls]"))
        );
        assert!(
            tls_hint("received fatal alert: CertificateRevoked")
                .is_some_and(|h| h.contains("server's tls.crl_file"))
        );
        assert!(
            tls_hint("invalid peer certificate: Revoked")
                .is_some_and(|h| h.contains("this side's tls.crl_file"))
        );
        assert_eq!(tls_hint("Connection refused (os error 111)"), None);
    }

    /// A server that answers each of `answers` on a connection of its own, then closes it;
    /// the handle gives the requests it read.
    async fn one_answer_per_connection(
        answers: Vec<&'static str>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/v1/x", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut conn, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.expect("read");
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                conn.write_all(answer.as_bytes()).await.expect("write");
            }
            seen
        });
        (url, server)
    }

    #[tokio::test]
    async fn a_refusal_that_asks_for_a_new_connection_is_sent_again_once() {
        const ASKS: &str = "HTTP/1.1 403 Forbidden\r\nconnection: close\r\n\
            x-berth-reconnect: 1\r\ncontent-length: 2\r\n\r\n{}";
        const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let c = JsonClient::new();
        let t = Duration::from_secs(5);
        let (url, server) = one_answer_per_connection(vec![ASKS, OK]).await;
        let body = Some(Bytes::from_static(b"{\"n\":1}"));
        let (status, _) = c
            .send(Method::POST, &url, None, None, body.clone(), t)
            .await
            .expect("answered on the second connection");
        assert_eq!(status, 200);
        let seen = server.await.expect("server");
        assert!(seen.iter().all(|r| r.ends_with("{\"n\":1}")), "{seen:?}");
        // Asked twice in a row: the second refusal is the answer.
        let (url, server) = one_answer_per_connection(vec![ASKS, ASKS]).await;
        let e = c
            .send(Method::POST, &url, None, None, body.clone(), t)
            .await
            .expect_err("refused twice");
        assert!(matches!(e, CallError::Status { status: 403, .. }), "{e}");
        server.await.expect("server");
        // A 403 that only closes the connection, as any server may send, is not sent again.
        let closes = "HTTP/1.1 403 Forbidden\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        let (url, server) = one_answer_per_connection(vec![closes]).await;
        let e = c
            .send(Method::POST, &url, None, None, body, t)
            .await
            .expect_err("refused");
        assert!(matches!(e, CallError::Status { status: 403, .. }), "{e}");
        assert_eq!(server.await.expect("server").len(), 1);
    }

    #[tokio::test]
    async fn only_a_bad_url_is_blamed_on_the_url() {
        let c = JsonClient::new();
        let t = Duration::from_secs(1);
        let url = "http://127.0.0.1:1/v1/hosts";
        let e = c
            .send(Method::GET, url, Some("tok\nen"), None, None, t)
            .await
            .expect_err("token");
        assert!(
            matches!(&e, CallError::InvalidRequest { reason, .. }
                if reason.contains("token") && !reason.contains("tok\nen")),
            "{e}"
        );
        let e = c
            .send_with(
                Method::GET,
                url,
                None,
                &[("Idempotency-Key", "a\r\nb")],
                None,
                t,
            )
            .await
            .expect_err("header");
        assert!(
            matches!(&e, CallError::InvalidRequest { reason, .. } if reason.contains("Idempotency-Key")),
            "{e}"
        );
        let e = c
            .send(Method::GET, "http://exa mple/", None, None, None, t)
            .await
            .expect_err("url");
        assert!(matches!(e, CallError::InvalidUrl(_)), "{e}");
    }
}
