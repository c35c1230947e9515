//! The ceiling: a do-nothing two-hop HTTP chain (client → hop 1 → hop 2), run as separate
//! processes like the controller and the agent, so the allocation rate can be read as a
//! fraction of what plain HTTP does on the same machine in the same run.

use std::convert::Infallible;

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::client::Client;

/// Serves on `port`: answers `{}` itself, or first asks `next` and answers with its body.
pub async fn serve(port: u16, next: Option<String>) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let client = Client::new();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let client = client.clone();
                let next = next.clone();
                async move {
                    let body = match &next {
                        Some(url) => client
                            .send(
                                http::Method::POST,
                                url,
                                None,
                                Some(Bytes::from_static(b"{}")),
                            )
                            .await
                            .map(|(_, b)| b)
                            .unwrap_or_default(),
                        None => Bytes::from_static(b"{}"),
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
