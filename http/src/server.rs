//! The HTTP/1 server both daemons run: header read timeout against slow clients, and a
//! graceful shutdown that stops accepting, lets in-flight requests finish, and gives up after
//! a deadline.

use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use berth_protocol::ErrorCode;

use crate::tls::{PeerChain, Tls, TlsMetrics};

/// A client that has not sent its whole header by then is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("in-flight requests did not finish within {0:?}; they were cut off")]
    DrainTimedOut(Duration),
}

/// A TLS listener's configuration, and the daemon's counter of handshakes that failed (a
/// peer's certificate refused, plain HTTP, a timeout): the one sign on this side of a peer
/// that cannot connect, since each failure is logged at debug level only (anyone who can reach
/// the port can cause one).
#[derive(Debug, Clone)]
pub struct ServeTls {
    tls: Tls,
    handshake_failures: Counter,
    refusal: ErrorCode,
}

impl ServeTls {
    /// A daemon's listener with its `[tls]`. After a reload, a request on a connection whose
    /// client certificate the new files refuse (revoked, or from a CA that was dropped) is
    /// refused with `refusal`, the daemon's code for refused credentials, and the connection
    /// is closed: its client must make a new handshake, which the new files decide. So a
    /// revoked peer is cut off at its next request. [`crate::JsonClient`] sends such a refused
    /// request again, once, on a new connection: in a rotation, that one shows the
    /// certificate the client uses now.
    pub fn new(tls: &Tls, metrics: &TlsMetrics, refusal: ErrorCode) -> Self {
        Self {
            tls: tls.clone(),
            handshake_failures: metrics.handshake_failures.clone(),
            refusal,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` becomes true, then drains for up to `drain`.
/// With `tls`, every connection is TLS (the handshake, too, must end within
/// [`HEADER_READ_TIMEOUT`]), and each request of a client that showed a certificate the CA
/// vouches for carries its [`PeerChain`] extension.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<ServeTls>,
) -> Result<(), ServeError> {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let acceptor = tls.map(|t| (TlsAcceptor::from(t.tls.server.clone()), t));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors or a connection reset before accept: keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Some((acceptor, tls)) = &acceptor else {
                    let conn = builder.serve_connection(
                        TokioIo::new(stream),
                        TowerToHyperService::new(app.clone()),
                    );
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    continue;
                };
                // The handshake runs in the connection's task, so a slow client holds up only
                // itself.
                tokio::spawn(serve_tls(
                    stream,
                    acceptor.clone(),
                    tls.clone(),
                    builder.clone(),
                    app.clone(),
                    graceful.watcher(),
                ));
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => Ok(()),
        () = tokio::time::sleep(drain) => Err(ServeError::DrainTimedOut(drain)),
    }
}

/// One TLS connection: the handshake (within [`HEADER_READ_TIMEOUT`]), then HTTP with every
/// request marked with whether the client showed a certificate the CA vouches for, and with
/// that certificate, to be checked again after a reload ([`PeerChain`]).
async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    tls: ServeTls,
    builder: hyper::server::conn::http1::Builder,
    app: Router,
    watcher: Watcher,
) {
    let peer = stream.peer_addr().ok();
    let generation = tls.tls.generation();
    let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tls.handshake_failures.inc();
            tracing::debug!(error = %e, ?peer, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tls.handshake_failures.inc();
            tracing::debug!(?peer, "TLS handshake timed out");
            return;
        }
    };
    let app = match stream.get_ref().1.peer_certificates() {
        Some(chain) => app.layer(Extension(PeerChain::new(
            &tls.tls,
            chain,
            generation,
            tls.refusal,
        ))),
        None => app,
    };
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let _ = watcher.watch(conn).await;
}
