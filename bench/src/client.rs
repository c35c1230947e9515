//! A lean pooled HTTP/1 client for the load generator: it must cost the machine as little as
//! possible, since it shares the two cores with what it measures.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Hyper;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Clone)]
pub struct Client {
    inner: Hyper<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Self {
            inner: Hyper::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(Duration::from_secs(60))
                .build(c),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes)> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .context("timed out")?
            .with_context(|| format!("request to {url}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    pub async fn get(&self, url: &str, token: Option<&str>) -> Result<(u16, Bytes)> {
        self.send(Method::GET, url, token, None).await
    }

    pub async fn post(
        &self,
        url: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<(u16, String)> {
        let (s, b) = self
            .send(
                Method::POST,
                url,
                token,
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        Ok((s, String::from_utf8_lossy(&b).into_owned()))
    }
}
