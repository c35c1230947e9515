//! The load generator's HTTP/1.1 client. It shares the cores with what it measures, so it
//! must cost as little as possible: a request borrows an idle keep-alive connection (or opens
//! one), goes out in one write, and its answer is read by the same task, which then gives the
//! connection back. A pooled hyper client passes every request through a connection task and
//! channels instead: two more task wake-ups per request.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
pub struct Client {
    /// Idle keep-alive connections by authority (`host:port`).
    idle: Arc<Mutex<HashMap<String, Vec<Conn>>>>,
    /// For `https://` URLs.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

/// A connection's transport. An enum, not a trait object, so that plain HTTP costs what it
/// did before TLS was possible.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How an exchange on one connection ended badly.
enum Failed {
    /// The server closed the connection before answering at all: on a reused connection it
    /// had closed it while idle, and the request was never handled.
    ClosedBeforeAnswer,
    Other(anyhow::Error),
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Self {
        Failed::Other(e.into())
    }
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        Failed::Other(e)
    }
}

/// A parsed response: status, body, and whether the connection may serve another request.
struct Answer {
    status: u16,
    body: Bytes,
    keep_alive: bool,
}

impl Client {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also `https://` URLs, with this TLS configuration.
    pub fn with_tls(config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: Some(TlsConnector::from(config)),
            ..Self::default()
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes)> {
        let uri: Uri = url.parse().with_context(|| format!("URL {url:?}"))?;
        let tls =
            match uri.scheme_str() {
                Some("http") => None,
                Some("https") => Some(self.tls.as_ref().with_context(|| {
                    format!("URL {url:?}: this client has no TLS configuration")
                })?),
                _ => bail!("URL {url:?}: only http:// and https://"),
            };
        let authority = uri
            .authority()
            .with_context(|| format!("URL {url:?} has no host"))?
            .as_str()
            .to_owned();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let body = body.unwrap_or_default();
        let mut request = Vec::with_capacity(192 + body.len());
        write!(request, "{method} {path} HTTP/1.1\r\nhost: {authority}\r\n")?;
        if let Some(t) = token {
            write!(request, "authorization: Bearer {t}\r\n")?;
        }
        if !body.is_empty() {
            request.extend_from_slice(b"content-type: application/json\r\n");
        }
        write!(request, "content-length: {}\r\n\r\n", body.len())?;
        request.extend_from_slice(&body);
        tokio::time::timeout(TIMEOUT, self.exchange(&authority, tls, &request))
            .await
            .with_context(|| format!("{method} {url} timed out"))?
            .with_context(|| format!("{method} {url}"))
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

    async fn exchange(
        &self,
        authority: &str,
        tls: Option<&TlsConnector>,
        request: &[u8],
    ) -> Result<(u16, Bytes)> {
        loop {
            let (mut conn, reused) = match self.take(authority) {
                Some(conn) => (conn, true),
                None => (Conn::connect(authority, tls).await?, false),
            };
            match conn.exchange(request).await {
                Ok(answer) => {
                    if answer.keep_alive {
                        self.give_back(authority, conn);
                    }
                    return Ok((answer.status, answer.body));
                }
                // Only a fresh connection can say the server really is not answering.
                Err(Failed::ClosedBeforeAnswer) if reused => continue,
                Err(Failed::ClosedBeforeAnswer) => {
                    bail!("{authority} closed the connection without answering")
                }
                Err(Failed::Other(e)) => return Err(e),
            }
        }
    }

    fn take(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get_mut(authority)?.pop()
    }

    fn give_back(&self, authority: &str, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        match idle.get_mut(authority) {
            Some(conns) => conns.push(conn),
            None => {
                idle.insert(authority.to_owned(), vec![conn]);
            }
        }
    }
}

impl Conn {
    async fn connect(authority: &str, tls: Option<&TlsConnector>) -> Result<Conn> {
        let tcp = TcpStream::connect(authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .with_context(|| format!("{host:?} is not a TLS server name"))?;
                let s = tls
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {authority}"))?;
                Stream::Tls(Box::new(s))
            }
        };
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Reads more of the answer; 0 is the end of the stream.
    async fn fill(&mut self) -> Result<usize, Failed> {
        self.buf.reserve(4096);
        Ok(match &mut self.stream {
            Stream::Plain(s) => s.read_buf(&mut self.buf).await?,
            Stream::Tls(s) => s.read_buf(&mut self.buf).await?,
        })
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.write_all(bytes).await,
            // TLS buffers what it encrypts: flushing sends the record now.
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<Answer, Failed> {
        self.buf.clear();
        match self.answer(request).await {
            // A reset before any byte of the answer is the same as a close: the server had
            // let the connection go.
            Err(Failed::Other(e)) if self.buf.is_empty() && is_reset(&e) => {
                Err(Failed::ClosedBeforeAnswer)
            }
            other => other,
        }
    }

    async fn answer(&mut self, request: &[u8]) -> Result<Answer, Failed> {
        self.write_all(request).await?;
        let (status, head_len, framing, keep_alive) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let status = response.code.unwrap_or(0);
                    let (framing, keep_alive) = framing(status, response.headers)?;
                    break (status, head_len, framing, keep_alive);
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(
                        anyhow::anyhow!("response head longer than {MAX_HEAD} bytes").into(),
                    );
                }
                Err(e) => return Err(anyhow::anyhow!("malformed response head: {e}").into()),
            }
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    Failed::ClosedBeforeAnswer
                } else {
                    anyhow::anyhow!("connection closed inside the response head").into()
                });
            }
        };
        let (body, keep_alive) = match framing {
            Framing::Length(len) => {
                while self.buf.len() < head_len + len {
                    if self.fill().await? == 0 {
                        return Err(anyhow::anyhow!("connection closed inside the body").into());
                    }
                }
                // Nothing is pipelined, so anything after the body is a broken server.
                let clean = self.buf.len() == head_len + len;
                let body = Bytes::copy_from_slice(&self.buf[head_len..head_len + len]);
                (body, keep_alive && clean)
            }
            Framing::Chunked => (self.chunked(head_len).await?, keep_alive),
            Framing::UntilClose => {
                while self.fill().await? > 0 {}
                (Bytes::copy_from_slice(&self.buf[head_len..]), false)
            }
        };
        Ok(Answer {
            status,
            body,
            keep_alive,
        })
    }

    /// Decodes a chunked body that starts at `at` in the buffer.
    async fn chunked(&mut self, mut at: usize) -> Result<Bytes, Failed> {
        let mut body = Vec::new();
        loop {
            let (size, line_end) = loop {
                match httparse::parse_chunk_size(&self.buf[at..]) {
                    Ok(httparse::Status::Complete((n, size))) => break (size as usize, at + n),
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Err(anyhow::anyhow!("malformed chunk size").into()),
                }
                if self.fill().await? == 0 {
                    return Err(anyhow::anyhow!("connection closed inside a chunk").into());
                }
            };
            // The chunk and its CRLF; after the last (empty) chunk, no trailers are expected.
            while self.buf.len() < line_end + size + 2 {
                if self.fill().await? == 0 {
                    return Err(anyhow::anyhow!("connection closed inside a chunk").into());
                }
            }
            if &self.buf[line_end + size..line_end + size + 2] != b"\r\n" {
                return Err(anyhow::anyhow!("a chunk does not end with CRLF").into());
            }
            body.extend_from_slice(&self.buf[line_end..line_end + size]);
            at = line_end + size + 2;
            if size == 0 {
                return Ok(body.into());
            }
        }
    }
}

fn is_reset(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
                // TLS: the peer went away without a close_notify.
                | std::io::ErrorKind::UnexpectedEof
        )
    })
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// How the body is delimited, and whether the connection stays open after it.
fn framing(status: u16, headers: &[httparse::Header<'_>]) -> Result<(Framing, bool)> {
    let mut framing = None;
    let mut keep_alive = true;
    for h in headers {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = value
                .parse()
                .with_context(|| format!("content-length {value:?} is not a number"))?;
            framing.get_or_insert(Framing::Length(len));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = Some(Framing::Chunked);
        } else if h.name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    let framing = match framing {
        Some(f) => f,
        None if status == 204 || status == 304 || (100..200).contains(&status) => {
            Framing::Length(0)
        }
        None => {
            keep_alive = false;
            Framing::UntilClose
        }
    };
    Ok((framing, keep_alive))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers every request on a connection with the next of `answers` (then
    /// closes the connection when told to), counting the connections it accepted.
    async fn server(answers: Vec<(&'static str, bool)>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                loop {
                    if !read_request(&mut stream).await {
                        break;
                    }
                    let Some((answer, close)) = answers.next() else {
                        return;
                    };
                    stream.write_all(answer.as_bytes()).await.unwrap();
                    if close {
                        break;
                    }
                }
            }
        });
        (url, accepted)
    }

    /// Reads one request (head and `content-length` body); false at the end of the stream.
    async fn read_request(stream: &mut TcpStream) -> bool {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < end + 4 + len {
                    if stream.read_buf(&mut buf).await.unwrap() == 0 {
                        return false;
                    }
                }
                return true;
            }
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return false;
            }
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

    #[tokio::test]
    async fn keeps_the_connection_for_the_next_request() {
        let (url, accepted) = server(vec![(OK, false), (OK, false)]).await;
        let client = Client::new();
        let body = Some(Bytes::from_static(b"{\"a\":1}"));
        for _ in 0..2 {
            let (status, b) = client
                .send(Method::POST, &url, Some("t"), body.clone())
                .await
                .unwrap();
            assert_eq!((status, &b[..]), (200, &b"{}"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn decodes_a_chunked_body() {
        let chunked = "HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n\
                       5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let (url, _) = server(vec![(chunked, false), (OK, false)]).await;
        let client = Client::new();
        let (status, b) = client.get(&url, None).await.unwrap();
        assert_eq!((status, &b[..]), (404, &b"hello, world"[..]));
        // The chunked answer was read to its end: the connection serves the next one.
        assert_eq!(client.get(&url, None).await.unwrap().0, 200);
    }

    #[tokio::test]
    async fn opens_a_new_connection_after_one_the_server_closed() {
        let close = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        // The first answer says it closes; the second connection's first answer closes it
        // without saying so, as a server ending an idle connection does.
        let (url, accepted) = server(vec![(close, true), (OK, true), (OK, false)]).await;
        let client = Client::new();
        for _ in 0..3 {
            assert_eq!(client.get(&url, None).await.unwrap().0, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn reads_a_body_without_length_to_the_end() {
        let (url, accepted) = server(vec![
            ("HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            (OK, false),
        ])
        .await;
        let client = Client::new();
        let (_, b) = client.get(&url, None).await.unwrap();
        assert_eq!(&b[..], b"until the end");
        assert_eq!(client.get(&url, None).await.unwrap().0, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refuses_a_malformed_answer() {
        let (url, _) = server(vec![("HTTP/1.1 20x OK\r\n\r\n", false)]).await;
        let e = Client::new().get(&url, None).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("malformed response head"),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_without_an_answer_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                read_request(&mut stream).await;
            }
        });
        let e = Client::new().get(&url, None).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("closed the connection without answering"),
            "{e:#}"
        );
    }
}
