//! TLS for both daemons (DESIGN.md §7): TLS 1.3 only, one certificate per daemon used both to
//! serve and, towards its peer, as a client certificate; one CA file that peers' certificates
//! must chain to. The controller and its agents thus authenticate each other both ways.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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
}

/// Whether a client of the listener must present a certificate the CA vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// The handshake fails without one (the agent: only the controller and operators holding a
    /// certificate may call it).
    Required,
    /// Checked if presented (the controller: matchmakers need none; its agent routes ask for
    /// one through [`PeerCertificate`]).
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
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
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
            Self::Read { key, .. }
            | Self::NoCertificate { key, .. }
            | Self::Invalid { key, .. } => key,
        }
    }
}

/// Whether the connection a request came on presented a certificate the CA vouches for. Set as
/// a request extension by [`crate::serve`] on TLS listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCertificate(pub bool);

/// Both sides of a daemon's TLS, loaded once at start.
#[derive(Debug, Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        key,
        path: path.to_owned(),
        reason,
    };
    let list = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if list.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(list)
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

/// A file of the e2e tests' certificates (`tests/fixtures/tls` in the source tree; their keys
/// are public): for tests and the benchmark, never for a deployment.
#[doc(hidden)]
pub fn test_certificate(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

/// A `[tls]` table naming three of those files.
#[doc(hidden)]
pub fn test_tls_table(cert: &str, key: &str, ca: &str) -> String {
    let f = |n: &str| test_certificate(n).display().to_string();
    format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
        f(cert),
        f(key),
        f(ca)
    )
}

impl Tls {
    /// Reads and checks the files: the key must match the certificate, and the CA file must
    /// hold at least one usable CA certificate.
    pub fn load(files: &TlsFiles, client_certs: ClientCerts) -> Result<Self, TlsError> {
        let chain = certs("tls.cert_file", &files.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| TlsError::Read {
            key: "tls.key_file",
            path: files.key_file.clone(),
            reason: format!("{e} (expected a PEM private key)"),
        })?;
        let roots = Arc::new(roots("tls.ca_file", &files.ca_file)?);
        let invalid = |key: &'static str, path: &Path, e: rustls::Error| TlsError::Invalid {
            key,
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let verifier = WebPkiClientVerifier::builder(roots.clone());
        let verifier = match client_certs {
            ClientCerts::Required => verifier,
            ClientCerts::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| TlsError::Invalid {
            key: "tls.ca_file",
            path: files.ca_file.clone(),
            reason: e.to_string(),
        })?;
        let versions = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_protocol_versions(versions)
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid("tls.key_file", &files.key_file, e))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("tls.key_file", &files.key_file, e))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
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

    fn files(cert: &str, key: &str, ca: &str) -> TlsFiles {
        TlsFiles {
            cert_file: test_certificate(cert),
            key_file: test_certificate(key),
            ca_file: test_certificate(ca),
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
            &files("agent.pem", "agent.key", "ca.pem"),
            ClientCerts::Required,
        )
        .expect("valid");
    }

    #[test]
    fn bad_files_name_their_key() {
        let e = Tls::load(
            &files("missing.pem", "agent.key", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("missing");
        assert_eq!(e.key(), "tls.cert_file");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // A key file that holds a certificate, not a key.
        let e = Tls::load(
            &files("agent.pem", "ca.pem", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("no key");
        assert_eq!(e.key(), "tls.key_file");
        // The key of another certificate.
        let e = Tls::load(
            &files("agent.pem", "controller.key", "ca.pem"),
            ClientCerts::Optional,
        )
        .expect_err("mismatch");
        assert_eq!(e.key(), "tls.key_file", "{e}");
        // A CA file with no certificate in it.
        let e = Tls::load(
            &files("agent.pem", "agent.key", "agent.key"),
            ClientCerts::Optional,
        )
        .expect_err("no CA");
        assert_eq!(e.key(), "tls.ca_file", "{e}");
    }
}
