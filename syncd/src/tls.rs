//! Mutual TLS under a fleet CA (issue 11).
//!
//! Every node holds a certificate issued by the fleet's CA whose subject
//! alternative name (and common name) is its node id (`syncd pki issue`).
//! Both sides of every peer connection present one and verify the other's
//! chain to the CA; a peer without such a certificate is refused at the
//! handshake. The id in the certificate is the peer's identity: what it
//! claims in a record, a SWIM packet or a request must agree (checked by
//! the handlers, see `transport::Caller::peer_id`).
//!
//! A client does not check the server's name against the address it
//! dialled — bootstrap addresses have no id yet — but reads the id from the
//! verified certificate; whatever the peer says about itself is then held
//! against it.
//!
//! Certificates are reloaded on SIGHUP ([`Tls::reload`]): new connections
//! use the new ones, established ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::locks::RwLockExt as _;

pub mod control;
pub mod pki;
pub mod sign;

/// `[tls]` in `syncd.toml`: the fleet CA, this node's certificate and key
/// (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Bad { path: PathBuf, message: String },
}

fn bad(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Bad {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The node id a certificate names: its first DNS subject alternative
/// name, or its common name; `None` if neither is a valid node id.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = x.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    });
    let id = san.or_else(|| {
        x.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_string))
    })?;
    crate::wire::is_id(&id).then_some(id)
}

/// When a certificate stops being valid (seconds since the epoch).
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(x.validity().not_after.timestamp())
}

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (ring's default puts AES-256 first): ample for
    // the transport, and cheaper per byte on the bulk chunk streams
    // (syncd/BENCHMARKS.md, "TLS").
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Accepts a server whose certificate chains to the fleet CA and names a
/// node, whatever address was dialled (see the module docs).
#[derive(Debug)]
struct FleetServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        node_id_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// This node's TLS configuration as loaded from its files.
#[derive(Debug)]
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// When this node's certificate expires (seconds since the epoch).
    not_after: i64,
    /// Signs the versions this node publishes.
    signer: Arc<sign::Signer>,
    /// The fleet CA, for checking versions' signatures.
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

/// Loads and checks `files` for node `node_id`: the CA parses, the
/// certificate chains to it, names this node, matches the key and is not
/// expired.
fn load(files: &TlsFiles, node_id: &str) -> Result<Loaded, TlsError> {
    let ca_pem = read(&files.ca)?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| bad(&files.ca, format!("not a PEM certificate: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(&files.ca, "no certificate in the file"));
    }
    let roots = Arc::new(roots);
    let cert_pem = read(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.cert, format!("not a PEM certificate: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad(&files.cert, "no certificate in the file"));
    };
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| bad(&files.key, format!("not a PEM private key: {e}")))?;
    let provider = provider();
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| bad(&files.cert, format!("cannot parse the certificate: {e}")))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| {
        bad(
            &files.cert,
            format!("not valid under the CA in {}: {e}", files.ca.display()),
        )
    })?;
    match node_id_of(leaf) {
        Some(id) if id == node_id => {}
        Some(id) => {
            return Err(bad(
                &files.cert,
                format!("the certificate is for node {id:?}, this node is {node_id:?}"),
            ));
        }
        None => return Err(bad(&files.cert, "the certificate names no node id")),
    }
    let not_after = not_after(leaf).unwrap_or(0);
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| bad(&files.key, format!("unusable private key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|e| {
            bad(
                &files.key,
                format!("does not match {}: {e}", files.cert.display()),
            )
        })?;
    let signer = Arc::new(sign::Signer::new(&key, leaf).map_err(|m| bad(&files.key, m))?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(&files.ca, format!("{e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&files.cert, format!("{e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| bad(&files.cert, format!("{e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&files.cert, format!("{e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FleetServerVerifier {
            roots: roots.clone(),
            provider: provider.clone(),
        }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&files.cert, format!("{e}")))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        not_after,
        signer,
        roots,
        provider,
    })
}

/// Checks `files` for node `node_id` without keeping anything
/// (`syncd check-config`); returns the days until the certificate expires.
pub fn check(files: &TlsFiles, node_id: &str) -> Result<f64, TlsError> {
    let l = load(files, node_id)?;
    Ok(days_until(l.not_after))
}

fn days_until(not_after: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (not_after - now) as f64 / 86_400.0
}

/// This node's TLS: configurations for serving and dialling, reloadable.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    node_id: String,
    current: RwLock<Arc<Loaded>>,
}

impl Tls {
    pub fn new(files: TlsFiles, node_id: &str) -> Result<Tls, TlsError> {
        let loaded = load(&files, node_id)?;
        Ok(Tls {
            files,
            node_id: node_id.to_string(),
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Reads the files again; on an error the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.files, &self.node_id)?;
        *self.current.write_locked() = Arc::new(loaded);
        Ok(())
    }

    pub fn server(&self) -> Arc<ServerConfig> {
        self.current.read_locked().server.clone()
    }

    pub fn client(&self) -> Arc<ClientConfig> {
        self.current.read_locked().client.clone()
    }

    /// Days until this node's certificate expires (negative: expired).
    pub fn days_left(&self) -> f64 {
        days_until(self.current.read_locked().not_after)
    }

    /// This node's signing key (the one of its certificate).
    pub fn signer(&self) -> Arc<sign::Signer> {
        self.current.read_locked().signer.clone()
    }

    /// Checks a version's signature with `cert` against the fleet CA
    /// ([`sign::verify`]).
    pub fn verify_version(
        &self,
        v: &sync_proto::pb::DirVersion,
        cert: &[u8],
    ) -> Result<(), String> {
        let l = self.current.read_locked().clone();
        sign::verify(&l.roots, &l.provider, v, cert)
    }

    /// Checks a record's owner signature with `cert` against the fleet CA
    /// ([`sign::verify_record`]).
    pub fn verify_record(&self, h: &sync_proto::pb::Holdings, cert: &[u8]) -> Result<(), String> {
        let l = self.current.read_locked().clone();
        sign::verify_record(&l.roots, &l.provider, h, cert)
    }

    /// Checks a fleet control's signature with an operator's `cert`
    /// against the fleet CA ([`control::verify`]).
    pub fn verify_control(&self, c: &sync_proto::pb::Control, cert: &[u8]) -> Result<(), String> {
        let l = self.current.read_locked().clone();
        control::verify(&l.roots, &l.provider, c, cert)
    }
}

#[cfg(test)]
mod tests;
