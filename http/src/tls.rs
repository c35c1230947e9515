//! TLS for both daemons (DESIGN.md §7): TLS 1.3 only, one certificate per daemon used both to
//! serve and, towards its peer, as a client certificate; one CA file that peers' certificates
//! must chain to. The controller and its agents thus authenticate each other both ways.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use berth_protocol::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub use rustls::ClientConfig as TlsClientConfig;

/// Makes aws-lc-rs the process's rustls crypto provider. Each binary's `main` calls it once,
/// before any TLS configuration is built; later calls change nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The `[tls]` table of a daemon's config, as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This daemon's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA certificates (PEM) that peers' certificates must chain to.
    pub ca_file: PathBuf,
    /// Certificate revocation lists (PEM, one or more): a peer whose certificate is listed is
    /// refused. Certificates from a CA without a list here are not checked.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
}

/// Whether a client of the listener must present a certificate the CA vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// The handshake fails without one (the agent: only the controller and operators holding a
    /// certificate may call it).
    Required,
    /// Checked if presented (the controller: matchmakers need none; its agent routes ask for
    /// one through [`PeerChain`]).
    Optional,
}

/// Why the `[tls]` files cannot be used. `key` is the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// `what`: the PEM section that was looked for, as its header names it.
    #[error("{} holds no PEM {what} (-----BEGIN {what}-----)", path.display())]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{} is not usable: {reason}", path.display())]
    Invalid {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl TlsError {
    /// The config key (`tls.cert_file`, …) the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Read { key, .. } | Self::Empty { key, .. } | Self::Invalid { key, .. } => key,
        }
    }
}

/// Both sides of a daemon's TLS. The two configurations stay the same for the daemon's life,
/// and so do the listener and clients built from them; the certificate, key and CAs behind
/// them are swapped whole by [`Tls::reload`], and every handshake after it uses the new ones.
#[derive(Debug, Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    live: Arc<Live>,
}

/// Every PEM section of type `T` in `path`, at least one; `key` names the config key and `what`
/// the section's header (`CERTIFICATE`, `X509 CRL`).
fn pem_all<T: PemObject>(
    key: &'static str,
    path: &Path,
    what: &'static str,
) -> Result<Vec<T>, TlsError> {
    let read = |reason: String| TlsError::Read {
        key,
        path: path.to_owned(),
        reason,
    };
    let list = T::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if list.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what,
        });
    }
    Ok(list)
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_all(key, path, "CERTIFICATE")
}

/// The CA certificates in `path` (PEM) as a root store; `key` names the config key.
fn roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(key, path)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            key,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The revocation lists in `path` (PEM), for `tls.crl_file`.
fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    pem_all("tls.crl_file", path, "X509 CRL")
}

/// A file of the e2e tests' certificates (`tests/fixtures/tls` in the source tree; their keys
/// are public): for tests and the benchmark, never for a deployment.
#[doc(hidden)]
pub fn test_certificate(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

/// The `[tls]` table that names `files`.
#[doc(hidden)]
pub fn tls_table(files: &TlsFiles) -> String {
    let path = |p: &Path| p.display().to_string();
    let mut table = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
        path(&files.cert_file),
        path(&files.key_file),
        path(&files.ca_file)
    );
    if let Some(crl) = &files.crl_file {
        table.push_str(&format!("crl_file = {:?}\n", path(crl)));
    }
    table
}

/// A `[tls]` table naming three of the test certificates.
#[doc(hidden)]
pub fn test_tls_table(cert: &str, key: &str, ca: &str) -> String {
    tls_table(&TlsFiles::test(cert, key, ca))
}

impl TlsFiles {
    /// Three of the test certificates (see [`test_certificate`]), with no revocation list.
    #[doc(hidden)]
    pub fn test(cert: &str, key: &str, ca: &str) -> Self {
        Self {
            cert_file: test_certificate(cert),
            key_file: test_certificate(key),
            ca_file: test_certificate(ca),
            crl_file: None,
        }
    }
}

/// What a load or reload put in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The end of the certificate's validity (its `notAfter`), in Unix seconds.
    pub expires: i64,
    /// The earliest date a revocation list in `crl_file` is due to be replaced (its
    /// `nextUpdate`), in Unix seconds.
    pub lists_due: Option<i64>,
}

impl std::fmt::Display for Loaded {
    /// `certificate valid until 2126-10-31T13:36:21Z (36499 days)`, for `validate`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "certificate valid until {} ({} days)",
            berth_protocol::time::rfc3339(self.expires.max(0) as u64),
            (self.expires - now()) / 86_400
        )
    }
}

impl Tls {
    /// Reads and checks the files: the key must match the certificate, the certificate must
    /// not have expired, and the CA file must hold at least one usable CA certificate.
    pub fn load(files: &TlsFiles, client_certs: ClientCerts) -> Result<Self, TlsError> {
        let material = Material::load(files, client_certs, now())?;
        let live = Arc::new(Live {
            files: files.clone(),
            client_certs,
            current: RwLock::new(Arc::new(material)),
            sessions: RwLock::new(ServerSessionMemoryCache::new(SESSIONS)),
            generation: AtomicU64::new(0),
        });
        let versions = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_protocol_versions(versions)
            .with_client_cert_verifier(live.clone())
            .with_cert_resolver(live.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.session_storage = live.clone();
        // Not `dangerous` in effect: `Live` hands every check to webpki's own verifier, built
        // from the CA file; the custom type only lets a reload swap that verifier.
        let mut client = ClientConfig::builder_with_protocol_versions(versions)
            .dangerous()
            .with_custom_certificate_verifier(live.clone())
            .with_client_cert_resolver(live.clone());
        // A resumed session shows the peer no certificate, so after a reload it would go on
        // presenting the old one. The daemons keep their connections alive, so full
        // handshakes are rare and resumption would save little.
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            live,
        })
    }

    /// How many reloads have put new files in use.
    pub(crate) fn generation(&self) -> u64 {
        self.live.generation()
    }

    /// What is in use now.
    pub fn loaded(&self) -> Loaded {
        self.live.current().loaded
    }

    /// Reads the files again, with the checks of [`Tls::load`], and puts them in use for every
    /// handshake from now on: as this side's certificate both ways, and as the CAs a peer's
    /// certificate must chain to. On an error nothing changes. Sessions opened before are not
    /// resumed. A connection already open keeps its certificates; on the listener its client's
    /// certificate is checked again at its next request ([`PeerChain`]).
    pub fn reload(&self) -> Result<Loaded, TlsError> {
        let material = Material::load(&self.live.files, self.live.client_certs, now())?;
        let loaded = material.loaded;
        *self
            .live
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(material);
        // A resumed session skips the certificate check, so one opened with a certificate
        // whose CA is now gone must not be resumed.
        *self
            .live
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner) = ServerSessionMemoryCache::new(SESSIONS);
        self.live.generation.fetch_add(1, Ordering::Release);
        Ok(loaded)
    }
}

/// The certificate chain a client showed when its TLS connection to the listener was opened,
/// set by [`crate::serve`] on each of the connection's requests. A request carries one only if
/// its client showed a certificate the CA vouches for, and still does: the chain is checked
/// again at the connection's first request after each reload, and a chain the new files refuse
/// (revoked, or from a CA that was dropped) is answered before any handler runs. So a
/// certificate is cut off on connections already open, as at new handshakes. Between reloads a
/// request costs one atomic load; a copy per request is one reference count.
#[derive(Debug, Clone)]
pub struct PeerChain(Arc<Chain>);

#[derive(Debug)]
struct Chain {
    live: Arc<Live>,
    certificates: Vec<CertificateDer<'static>>,
    /// The reload generation the chain was last accepted under.
    checked: AtomicU64,
    /// The listening daemon's code for refused credentials.
    refusal: ErrorCode,
}

impl PeerChain {
    /// `generation` is [`Tls`]'s before the handshake, so that a reload during it is checked.
    pub(crate) fn new(
        tls: &Tls,
        chain: &[CertificateDer<'static>],
        generation: u64,
        refusal: ErrorCode,
    ) -> Self {
        Self(Arc::new(Chain {
            live: tls.live.clone(),
            certificates: chain.to_vec(),
            checked: AtomicU64::new(generation),
            refusal,
        }))
    }

    /// The refusal to answer when the files in use no longer accept the chain.
    pub(crate) fn refusal(&self) -> Option<crate::Failure> {
        let e = self.still_accepted().err()?;
        Some(crate::Failure::new(
            self.0.refusal,
            "Certificate refused.",
            format!(
                "the client certificate this connection was opened with is refused since this \
                 daemon reloaded its [tls] files ({e}); the connection is closed, and a new one \
                 needs a certificate that this daemon's tls.ca_file vouches for and its \
                 tls.crl_file does not list"
            ),
        ))
    }

    /// Whether the files in use still accept the chain; the error is webpki's reason.
    fn still_accepted(&self) -> Result<(), rustls::Error> {
        let chain = &*self.0;
        let now = chain.live.generation();
        if chain.checked.load(Ordering::Relaxed) == now {
            return Ok(());
        }
        let (end_entity, intermediates) = chain
            .certificates
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        chain
            .live
            .verify_client_cert(end_entity, intermediates, UnixTime::now())?;
        chain.checked.store(now, Ordering::Relaxed);
        Ok(())
    }
}

/// The TLS share of a daemon's metrics, registered under the daemon's prefix.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    /// Handshakes on the listener that failed (see [`crate::ServeTls`]).
    pub handshake_failures: Counter,
    reloads: Family<[(&'static str, &'static str); 1], Counter>,
    /// Registered only with `[tls]`: an expiry alert must not fire on a 0.
    expiry: Option<Gauge>,
}

/// Below this, every load and reload warns that the certificate is about to expire.
const EXPIRY_WARNING_DAYS: i64 = 30;

impl TlsMetrics {
    /// `tls`: whether the daemon has `[tls]` (then it reports its certificate's expiry).
    pub fn register(registry: &mut Registry, tls: bool) -> Self {
        let m = Self {
            expiry: tls.then(Gauge::default),
            ..Self::default()
        };
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the listener that failed (a certificate refused, plain HTTP, a timeout)",
            m.handshake_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the [tls] files on SIGHUP, by result (ok, failed)",
            m.reloads.clone(),
        );
        if let Some(expiry) = &m.expiry {
            registry.register(
                "tls_certificate_expiry_timestamp_seconds",
                "When this daemon's certificate expires, in Unix seconds",
                expiry.clone(),
            );
        }
        m
    }

    /// Records what a load put in use, and warns if it expires soon.
    pub fn loaded(&self, loaded: Loaded) {
        if let Some(expiry) = &self.expiry {
            expiry.set(loaded.expires);
        }
        let days = (loaded.expires - now()) / 86_400;
        let expires = berth_protocol::time::rfc3339(loaded.expires.max(0) as u64);
        if days < EXPIRY_WARNING_DAYS {
            tracing::warn!(%expires, days, "this daemon's TLS certificate expires soon: install a renewed one in tls.cert_file and tls.key_file, then send SIGHUP (systemctl reload)");
        } else {
            tracing::info!(%expires, days, "TLS certificate in use");
        }
        if let Some(due) = loaded.lists_due.filter(|due| *due <= now()) {
            let due = berth_protocol::time::rfc3339(due.max(0) as u64);
            tracing::warn!(%due, "a revocation list in tls.crl_file was due to be replaced; it is still used, but certificates revoked since are not in it: publish a new list and send SIGHUP (systemctl reload)");
        }
    }
}

/// A daemon's TLS once it runs: reports what was loaded at start and returns what a SIGHUP
/// does, which is to reload the files (see [`Tls::reload`]), log the outcome and count it.
pub fn reloader(tls: Option<Tls>, metrics: TlsMetrics) -> impl FnMut() + Send + 'static {
    if let Some(t) = &tls {
        metrics.loaded(t.loaded());
    }
    move || reload_and_report(tls.as_ref(), &metrics)
}

fn reload_and_report(tls: Option<&Tls>, metrics: &TlsMetrics) {
    let Some(tls) = tls else {
        tracing::info!(
            "SIGHUP: there is no [tls] to reload; other settings take effect at restart"
        );
        return;
    };
    match tls.reload() {
        Ok(loaded) => {
            metrics.reloads.get_or_create(&[("result", "ok")]).inc();
            tracing::info!(
                "reloaded the [tls] files: new connections use them; other settings take effect at restart"
            );
            metrics.loaded(loaded);
        }
        Err(e) => {
            metrics.reloads.get_or_create(&[("result", "failed")]).inc();
            tracing::error!(key = e.key(), error = %e, "cannot reload the [tls] files; the certificates loaded before stay in use");
        }
    }
}

fn now() -> i64 {
    i64::try_from(crate::unix_now()).unwrap_or(i64::MAX)
}

/// Sessions the listener remembers for resumption (rustls' default).
const SESSIONS: usize = 256;

/// The files' contents, checked, as the handshakes use them.
#[derive(Debug)]
struct Material {
    key: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
    loaded: Loaded,
}

impl Material {
    /// The files as of `now` (Unix seconds), the time the certificate must not have expired by.
    fn load(files: &TlsFiles, client_certs: ClientCerts, now: i64) -> Result<Self, TlsError> {
        let chain = certs("tls.cert_file", &files.cert_file)?;
        let invalid = |key: &'static str, path: &Path, reason: String| TlsError::Invalid {
            key,
            path: path.to_owned(),
            reason,
        };
        let expires = not_after(&chain[0]).ok_or_else(|| {
            invalid(
                "tls.cert_file",
                &files.cert_file,
                "its first certificate is not a valid X.509 certificate".to_owned(),
            )
        })?;
        if expires <= now {
            return Err(invalid(
                "tls.cert_file",
                &files.cert_file,
                format!(
                    "the certificate expired at {}; install a renewed one",
                    berth_protocol::time::rfc3339(expires.max(0) as u64)
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| TlsError::Read {
            key: "tls.key_file",
            path: files.key_file.clone(),
            reason: format!("{e} (expected a PEM private key)"),
        })?;
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            let reason = match e {
                // Most often one of the two files was replaced and not the other.
                rustls::Error::InconsistentKeys(_) => format!(
                    "it is not the key of the certificate in {} (tls.cert_file): install the \
                     certificate and its key together",
                    files.cert_file.display()
                ),
                e => e.to_string(),
            };
            invalid("tls.key_file", &files.key_file, reason)
        })?;
        let roots = Arc::new(roots("tls.ca_file", &files.ca_file)?);
        let crls = match &files.crl_file {
            Some(path) => revocation_lists(path)?,
            None => Vec::new(),
        };
        let lists_due = crls.iter().filter_map(|l| next_update(l)).min();
        let builder_error = |e: VerifierBuilderError| match (e, &files.crl_file) {
            (VerifierBuilderError::InvalidCrl(e), Some(path)) => invalid(
                "tls.crl_file",
                path,
                format!("not a usable revocation list: {e:?}"),
            ),
            (e, _) => invalid("tls.ca_file", &files.ca_file, e.to_string()),
        };
        // A list covers the certificates of the CA that signed it; those of another CA in
        // ca_file (during a move to a new CA, say) have no list to be checked against, and
        // pass, as they would with no crl_file at all.
        let clients = WebPkiClientVerifier::builder(roots.clone())
            .with_crls(crls.clone())
            .allow_unknown_revocation_status();
        let clients = match client_certs {
            ClientCerts::Required => clients,
            ClientCerts::Optional => clients.allow_unauthenticated(),
        }
        .build()
        .map_err(builder_error)?;
        let servers = WebPkiServerVerifier::builder(roots)
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .build()
            .map_err(builder_error)?;
        Ok(Self {
            key: Arc::new(key),
            clients,
            servers,
            loaded: Loaded { expires, lists_due },
        })
    }
}

/// The certificate, key and CAs in use, behind the fixed configurations: each handshake reads
/// them once, and [`Tls::reload`] replaces them whole.
#[derive(Debug)]
struct Live {
    files: TlsFiles,
    client_certs: ClientCerts,
    current: RwLock<Arc<Material>>,
    sessions: RwLock<Arc<ServerSessionMemoryCache>>,
    /// Bumped by every reload that put new files in use.
    generation: AtomicU64,
}

impl Live {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn sessions(&self) -> Arc<ServerSessionMemoryCache> {
        self.sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for Live {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

impl ResolvesClientCert for Live {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Live {
    fn client_auth_mandatory(&self) -> bool {
        self.client_certs == ClientCerts::Required
    }

    /// None: the hints would borrow from a CA set that a reload may drop meanwhile. An empty
    /// list tells a client to send the certificate it has, which is what both daemons do.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().clients.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Live {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().servers.supported_verify_schemes()
    }
}

impl StoresServerSessions for Live {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.sessions().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.sessions().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.sessions().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The end of a certificate's validity (`notAfter`, RFC 5280 §4.1.2.5) in Unix seconds, read
/// from its DER: for the expiry check and the metric only. Whether a peer's certificate is
/// valid is for webpki to say.
fn not_after(cert: &[u8]) -> Option<i64> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, … } … }
    let (_, validity) = signed_field(cert, 0xa0, 3)?;
    let (_, _, validity) = der(validity)?;
    let (tag, time, _) = der(validity)?;
    der_time(tag, time)
}

/// When a revocation list is due to be replaced (`nextUpdate`, RFC 5280 §5.1.2.5) in Unix
/// seconds, read from its DER; `None` when it names no date (or cannot be read). For a
/// warning only: the list is used either way.
fn next_update(crl: &[u8]) -> Option<i64> {
    // CertificateList ::= SEQUENCE { tbsCertList SEQUENCE { version INTEGER OPTIONAL,
    //   signature, issuer, thisUpdate, nextUpdate OPTIONAL, … } … }
    let (tag, time) = signed_field(crl, 0x02, 3)?;
    der_time(tag, time)
}

/// The tag and contents of a field of a signed X.509 structure (a certificate, a revocation
/// list): in its first (to-be-signed) sequence, past an optional version tagged `version` and
/// `skip` fields more.
fn signed_field(signed: &[u8], version: u8, skip: usize) -> Option<(u8, &[u8])> {
    let (_, outer, _) = der(signed)?;
    let (_, mut fields, _) = der(outer)?;
    let (tag, _, rest) = der(fields)?;
    if tag == version {
        fields = rest;
    }
    for _ in 0..skip {
        fields = der(fields)?.2;
    }
    let (tag, contents, _) = der(fields)?;
    Some((tag, contents))
}

/// A DER UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (0x18,
/// `YYYYMMDDHHMMSSZ`) in Unix seconds.
fn der_time(tag: u8, time: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(time).ok()?;
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = text.get(r)?;
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, at) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = i64::from(digits(0..2)?);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 15) => (i64::from(digits(0..4)?), 4),
        _ => return None,
    };
    if !text.ends_with('Z') {
        return None;
    }
    berth_protocol::time::unix_from_utc(
        year,
        digits(at..at + 2)?,
        digits(at + 2..at + 4)?,
        digits(at + 4..at + 6)?,
        digits(at + 6..at + 8)?,
        digits(at + 8..at + 10)?,
    )
}

/// One DER element at the start of `bytes`: its tag, its contents and what follows it.
fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A client configuration that verifies servers against `ca_file` and presents no certificate
/// (an operator's tool talking to the controller's matchmaker and admin routes).
pub fn trusting(ca_file: &Path) -> Result<ClientConfig, TlsError> {
    let roots = roots("ca_file", ca_file)?;
    Ok(
        ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test's temporary directory, removed when the test ends so runs leave nothing behind.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A directory of its own under the system's temporary directory, holding copies of
    /// fixtures named as a daemon's `[tls]` would: `cert.pem`, `key.pem`, `ca.pem`.
    fn tls_dir(test: &str, identity: &str, ca: &str) -> (TlsFiles, Scratch) {
        let dir = std::env::temp_dir().join(format!("berth-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let files = TlsFiles {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            ca_file: dir.join("ca.pem"),
            crl_file: None,
        };
        install(&files, identity, ca);
        (files, Scratch(dir))
    }

    /// The fixture `controller`, trusting both test CAs (`ca` and `ca2`).
    fn trusting_both_cas(test: &str) -> (TlsFiles, Scratch) {
        let (files, dir) = tls_dir(test, "controller", "ca");
        let bundle = [test_certificate("ca.pem"), test_certificate("ca2.pem")]
            .iter()
            .flat_map(|p| std::fs::read(p).expect("a CA"))
            .collect::<Vec<u8>>();
        std::fs::write(&files.ca_file, bundle).expect("write");
        (files, dir)
    }

    fn install(files: &TlsFiles, identity: &str, ca: &str) {
        let copy = |from: String, to: &Path| {
            std::fs::copy(test_certificate(&from), to).expect("copy a fixture");
        };
        copy(format!("{identity}.pem"), &files.cert_file);
        copy(format!("{identity}.key"), &files.key_file);
        copy(format!("{ca}.pem"), &files.ca_file);
    }

    /// A full TLS 1.3 handshake between the two configurations, in memory. On success, the
    /// subject of the certificate each side was shown is checked by the caller through the
    /// returned (client saw, server saw) DER chains.
    fn handshake(
        client: &Arc<ClientConfig>,
        server: &Arc<ServerConfig>,
    ) -> Result<(CertificateDer<'static>, Option<CertificateDer<'static>>), rustls::Error> {
        let name = ServerName::try_from("localhost").expect("a name");
        let mut c = rustls::ClientConnection::new(client.clone(), name)?;
        let mut s = rustls::ServerConnection::new(server.clone())?;
        let mut wire = Vec::new();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            wire.clear();
            c.write_tls(&mut wire).expect("to memory");
            s.read_tls(&mut wire.as_slice()).expect("from memory");
            let server_result = s.process_new_packets();
            wire.clear();
            s.write_tls(&mut wire).expect("to memory");
            c.read_tls(&mut wire.as_slice()).expect("from memory");
            c.process_new_packets()?;
            server_result?;
        }
        let shown = c.peer_certificates().expect("a server certificate")[0].clone();
        let seen = s.peer_certificates().map(|chain| chain[0].clone());
        Ok((shown.into_owned(), seen.map(CertificateDer::into_owned)))
    }

    fn fixture(name: &str) -> CertificateDer<'static> {
        certs("test", &test_certificate(&format!("{name}.pem"))).expect("fixture")[0].clone()
    }

    #[test]
    fn reload_swaps_the_certificate_and_the_cas_for_new_handshakes() {
        install_crypto_provider();
        let (files, _dir) = tls_dir("reload", "controller", "ca");
        let daemon = Tls::load(&files, ClientCerts::Required).expect("valid");
        let peer = Tls::load(
            &TlsFiles::test("agent.pem", "agent.key", "ca.pem"),
            ClientCerts::Required,
        )
        .expect("valid");
        let rogue = Tls::load(
            &TlsFiles::test("rogue.pem", "rogue.key", "rogue-ca.pem"),
            ClientCerts::Required,
        )
        .expect("valid");
        // A client that resumes sessions (the daemons' own do not), as a third party's may.
        let resuming = Arc::new(
            ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(roots("test", &test_certificate("ca.pem")).expect("CA"))
                .with_client_auth_cert(
                    certs("test", &test_certificate("agent.pem")).expect("certificate"),
                    PrivateKeyDer::from_pem_file(test_certificate("agent.key")).expect("key"),
                )
                .expect("a client"),
        );
        handshake(&resuming, &daemon.server).expect("same CA");
        // Before: the peer from the same CA is served and shown the controller's certificate
        // both ways; the rogue is refused.
        let (shown, seen) = handshake(&peer.client, &daemon.server).expect("same CA");
        assert_eq!(shown, fixture("controller"));
        assert_eq!(seen, Some(fixture("agent")));
        let (shown, _) = handshake(&daemon.client, &peer.server).expect("same CA");
        assert_eq!(shown, fixture("agent"));
        handshake(&rogue.client, &daemon.server).expect_err("another CA");

        // The files change to the other CA's; nothing changes until the reload.
        install(&files, "rogue", "rogue-ca");
        handshake(&peer.client, &daemon.server).expect("not reloaded yet");
        daemon.reload().expect("valid files");

        // After: the same configurations (and so every listener and client built from them)
        // now show the rogue certificate and trust only its CA.
        let (shown, seen) = handshake(&rogue.client, &daemon.server).expect("the new CA");
        assert_eq!(shown, fixture("rogue"));
        assert_eq!(seen, Some(fixture("rogue")));
        handshake(&daemon.client, &rogue.server).expect("the new CA, as a client");
        handshake(&peer.client, &daemon.server).expect_err("the old CA is gone");
        // The resuming client holds a session from before the reload; resuming it would skip
        // the certificate check, so the listener must have forgotten it.
        handshake(&resuming, &daemon.server).expect_err("no resumption past a reload");
        handshake(&daemon.client, &peer.server).expect_err("the old CA is gone, as a client");
    }

    #[test]
    fn a_failed_reload_changes_nothing() {
        install_crypto_provider();
        let (files, _dir) = tls_dir("failed-reload", "agent", "ca");
        let daemon = Tls::load(&files, ClientCerts::Required).expect("valid");
        let peer = Tls::load(
            &TlsFiles::test("controller.pem", "controller.key", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect("valid");
        // A certificate whose key is not the one in key_file, as when only one of the two
        // files was replaced.
        std::fs::copy(test_certificate("rogue.pem"), &files.cert_file).expect("copy");
        let e = daemon.reload().expect_err("mismatched key");
        assert_eq!(e.key(), "tls.key_file", "{e}");
        assert!(
            e.to_string().contains("is not the key of the certificate"),
            "{e}"
        );
        std::fs::write(&files.ca_file, "not PEM").expect("write");
        let (shown, _) = handshake(&peer.client, &daemon.server).expect("still the old files");
        assert_eq!(shown, fixture("agent"));
        handshake(&daemon.client, &peer.server).expect("still the old CA");
    }

    #[test]
    fn listed_certificates_are_refused_both_ways() {
        install_crypto_provider();
        let (files, _dir) = trusting_both_cas("crl");
        let with_list = |list: &str| TlsFiles {
            crl_file: Some(test_certificate(list)),
            ..files.clone()
        };
        let daemon = Tls::load(&with_list("ca2-crl.pem"), ClientCerts::Required).expect("valid");
        // 2126-10-31T16:32:55Z, the list's nextUpdate, for the overdue warning.
        assert_eq!(daemon.loaded().lists_due, Some(4_949_137_975));
        let peer = |identity: &str| {
            let (cert, key) = (format!("{identity}.pem"), format!("{identity}.key"));
            Tls::load(
                &TlsFiles::test(&cert, &key, "ca.pem"),
                ClientCerts::Required,
            )
            .expect("valid")
        };
        // Listed: refused as a client, and as a server.
        let e = handshake(&peer("revoked").client, &daemon.server).expect_err("listed");
        assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
        handshake(&daemon.client, &peer("revoked").server).expect_err("listed, as a server");
        // Not listed, from the same CA or from a CA without a list: served as before.
        handshake(&peer("agent2").client, &daemon.server).expect("not listed");
        handshake(&daemon.client, &peer("agent2").server).expect("not listed, as a server");
        handshake(&peer("agent").client, &daemon.server).expect("another CA, no list");
        // Without the list, the same certificate passes.
        let unlisted = Tls::load(&files, ClientCerts::Required).expect("valid");
        handshake(&peer("revoked").client, &unlisted.server).expect("no list");
        // A file without a list in it names its key.
        let e = Tls::load(&with_list("ca2.pem"), ClientCerts::Required).expect_err("a CA");
        assert_eq!(e.key(), "tls.crl_file", "{e}");
        assert!(e.to_string().contains("BEGIN X509 CRL"), "{e}");
    }

    #[test]
    fn a_reload_checks_the_chains_of_open_connections_again() {
        install_crypto_provider();
        let (files, _dir) = trusting_both_cas("recheck");
        let list = files.ca_file.with_file_name("crl.pem");
        std::fs::copy(test_certificate("ca2-crl-empty.pem"), &list).expect("copy");
        let files = TlsFiles {
            crl_file: Some(list.clone()),
            ..files
        };
        let daemon = Tls::load(&files, ClientCerts::Optional).expect("valid");
        let open = |identity: &str| {
            PeerChain::new(
                &daemon,
                &[fixture(identity)],
                daemon.generation(),
                ErrorCode::InvalidCredentials,
            )
        };
        let (revoked, kept) = (open("revoked"), open("agent2"));
        revoked.still_accepted().expect("not listed yet");
        // The list now names `revoked`; nothing is checked again before the reload.
        std::fs::copy(test_certificate("ca2-crl.pem"), &list).expect("copy");
        revoked.still_accepted().expect("no reload yet");
        daemon.reload().expect("reload");
        let e = revoked.still_accepted().expect_err("listed");
        assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
        let refusal = revoked.refusal().expect("a refusal");
        assert_eq!(refusal.code, ErrorCode::InvalidCredentials);
        assert!(refusal.details.contains("Revoked"), "{}", refusal.details);
        assert!(kept.refusal().is_none());
        kept.still_accepted().expect("not listed");
        // A failed reload changes nothing, so a chain accepted before stays accepted.
        std::fs::write(&list, "not a list").expect("write");
        daemon.reload().expect_err("a bad list");
        kept.still_accepted().expect("still not listed");
        revoked.still_accepted().expect_err("still listed");
    }

    #[test]
    fn expired_certificates_are_refused_with_their_date() {
        install_crypto_provider();
        let files = TlsFiles::test("agent.pem", "agent.key", "ca.pem");
        let expires = not_after(&fixture("agent")).expect("a notAfter");
        // `openssl x509 -enddate`: Oct 31 13:36:21 2126 GMT (a GeneralizedTime).
        assert_eq!(
            berth_protocol::time::rfc3339(expires as u64),
            "2126-10-31T13:36:21Z"
        );
        Material::load(&files, ClientCerts::Required, expires - 1).expect("valid until then");
        let e = Material::load(&files, ClientCerts::Required, expires).expect_err("expired");
        assert_eq!(e.key(), "tls.cert_file");
        assert!(
            e.to_string().contains("expired at 2126-10-31T13:36:21Z"),
            "{e}"
        );
    }

    #[test]
    fn next_update_is_read_from_a_revocation_list() {
        let list = revocation_lists(&test_certificate("ca2-crl.pem")).expect("a list");
        let due = next_update(&list[0]).expect("a nextUpdate");
        // `openssl crl -nextupdate`: Oct 31 16:32:55 2126 GMT.
        assert_eq!(
            berth_protocol::time::rfc3339(due as u64),
            "2126-10-31T16:32:55Z"
        );
        for len in 0..list[0].len() {
            let _ = next_update(&list[0][..len]);
        }
        assert_eq!(
            next_update(&fixture("agent")),
            None,
            "a certificate is not a list"
        );
    }

    #[test]
    fn not_after_reads_both_time_forms_and_refuses_garbage() {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if body.len() < 0x80 {
                v.push(body.len() as u8);
            } else {
                v.extend([0x82, (body.len() >> 8) as u8, body.len() as u8]);
            }
            v.extend(body);
            v
        }
        // A certificate cut down to what is read: with and without the version field.
        let cert = |version: bool, not_after: Vec<u8>| {
            let validity = tlv(0x30, &[tlv(0x17, b"250101000000Z"), not_after].concat());
            let mut tbs = Vec::new();
            if version {
                tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
            }
            for part in [
                tlv(0x02, &[1]),
                tlv(0x30, &[]),
                tlv(0x30, &[0; 200]),
                validity,
            ] {
                tbs.extend(part);
            }
            tlv(0x30, &[tlv(0x30, &tbs), tlv(0x30, &[])].concat())
        };
        let utc = tlv(0x17, b"491231235959Z");
        assert_eq!(
            not_after(&cert(true, utc.clone())).map(|t| berth_protocol::time::rfc3339(t as u64)),
            Some("2049-12-31T23:59:59Z".to_owned())
        );
        assert_eq!(
            not_after(&cert(false, tlv(0x17, b"500101000000Z"))),
            berth_protocol::time::unix_from_utc(1950, 1, 1, 0, 0, 0)
        );
        assert_eq!(
            not_after(&cert(true, tlv(0x18, b"21261031133621Z"))),
            not_after(&fixture("agent"))
        );
        for bad in [
            tlv(0x17, b"491231235959"),
            tlv(0x17, b"4912312359+0"),
            tlv(0x18, b"2126103113362Z"),
            tlv(0x04, b"491231235959Z"),
            tlv(0x17, b"491331235959Z"),
        ] {
            assert_eq!(not_after(&cert(true, bad.clone())), None, "{bad:?}");
        }
        let whole = cert(true, utc);
        for len in 0..whole.len() {
            assert_eq!(not_after(&whole[..len]), None, "cut at {len}");
        }
    }

    #[test]
    fn trusting_reads_a_ca_file() {
        trusting(&test_certificate("ca.pem")).expect("valid");
        let e = trusting(&test_certificate("agent.key")).expect_err("a key, not a certificate");
        assert_eq!(e.key(), "ca_file");
    }

    #[test]
    fn loads_the_test_certificates() {
        Tls::load(
            &TlsFiles::test("agent.pem", "agent.key", "ca.pem"),
            ClientCerts::Required,
        )
        .expect("valid");
    }

    #[test]
    fn bad_files_name_their_key() {
        let e = Tls::load(
            &TlsFiles::test("missing.pem", "agent.key", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("missing");
        assert_eq!(e.key(), "tls.cert_file");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // A key file that holds a certificate, not a key.
        let e = Tls::load(
            &TlsFiles::test("agent.pem", "ca.pem", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("no key");
        assert_eq!(e.key(), "tls.key_file");
        // The key of another certificate.
        let e = Tls::load(
            &TlsFiles::test("agent.pem", "controller.key", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("mismatch");
        assert_eq!(e.key(), "tls.key_file", "{e}");
        // A CA file with no certificate in it.
        let e = Tls::load(
            &TlsFiles::test("agent.pem", "agent.key", "agent.key"),
            ClientCerts::Optional,
        )
        .expect_err("no CA");
        assert_eq!(e.key(), "tls.ca_file", "{e}");
    }
}
