//! Signed versions (issue 11): a publisher signs each version it
//! publishes with the Ed25519 key of its node certificate; every node
//! that takes the version in — directly or relayed — checks the signature
//! and that the certificate chains to the fleet CA and names the
//! publisher. A relay can then neither forge a version nor change one.
//!
//! What is signed is [`payload`]: a fixed prefix, then every field of the
//! `DirVersion` but the signature, each of fixed size or length-prefixed,
//! so no two versions share a payload.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sync_proto::pb;

use crate::wire::SIGNATURE_BYTES;

const DOMAIN: &[u8] = b"syncd signed version 1\0";

/// The bytes a version's signature covers.
pub fn payload(v: &pb::DirVersion) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + 96 + v.dir.len() + v.publisher.len());
    p.extend_from_slice(DOMAIN);
    for s in [&v.dir, &v.publisher] {
        p.extend_from_slice(&(s.len() as u32).to_be_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    p.extend_from_slice(&(v.root.len() as u32).to_be_bytes());
    p.extend_from_slice(&v.root);
    for n in [v.version, v.entries, v.bytes, v.time] {
        p.extend_from_slice(&n.to_be_bytes());
    }
    p
}

const RECORD_DOMAIN: &[u8] = b"syncd signed record 1\0";

fn put(p: &mut Vec<u8>, b: &[u8]) {
    p.extend_from_slice(&(b.len() as u32).to_be_bytes());
    p.extend_from_slice(b);
}

/// The bytes a record's owner signs: every field of its `Holdings` but
/// the signature, in a fixed order (labels sorted), each length-prefixed
/// — the encoding a relay forwards is not canonical (a map, unknown
/// fields), this is.
pub fn record_payload(h: &pb::Holdings) -> Vec<u8> {
    let mut p = Vec::with_capacity(1024);
    p.extend_from_slice(RECORD_DOMAIN);
    let m = h.from.clone().unwrap_or_default();
    put(&mut p, m.node_id.as_bytes());
    put(&mut p, m.address.as_bytes());
    let mut labels: Vec<(&String, &String)> = m.labels.iter().collect();
    labels.sort();
    p.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    for (k, v) in labels {
        put(&mut p, k.as_bytes());
        put(&mut p, v.as_bytes());
    }
    p.extend_from_slice(&h.protocol.to_be_bytes());
    p.extend_from_slice(&h.incarnation.to_be_bytes());
    p.extend_from_slice(&h.seq.to_be_bytes());
    for list in [&h.dirs, &h.pulling] {
        p.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for v in list {
            put(&mut p, &payload(v));
            put(&mut p, &v.signature);
        }
    }
    p.extend_from_slice(&(h.reports.len() as u32).to_be_bytes());
    for r in &h.reports {
        for t in [&r.dir, &r.state, &r.mode, &r.last_error, &r.control] {
            put(&mut p, t.as_bytes());
        }
        p.extend_from_slice(&r.pending_bytes.to_be_bytes());
        p.extend_from_slice(&r.rate.to_bits().to_be_bytes());
    }
    p.extend_from_slice(&(h.certificates.len() as u32).to_be_bytes());
    for c in &h.certificates {
        put(&mut p, c);
    }
    p.extend_from_slice(&(h.controls.len() as u32).to_be_bytes());
    for c in &h.controls {
        put(&mut p, &super::control::payload(c));
        put(&mut p, &c.signature);
    }
    p
}

/// Checks that record `h` is signed by its owner with the key of `cert`,
/// and that `cert` names the owner and chains to `roots` now.
pub fn verify_record(
    roots: &RootCertStore,
    provider: &CryptoProvider,
    h: &pb::Holdings,
    cert: &[u8],
) -> Result<(), String> {
    let owner = h.from.as_ref().map_or("", |m| m.node_id.as_str());
    if h.signature.len() != SIGNATURE_BYTES {
        return Err(if h.signature.is_empty() {
            "not signed by its owner".to_string()
        } else {
            format!("a record signature of {} bytes", h.signature.len())
        });
    }
    let der = CertificateDer::from(cert);
    if super::node_id_of(&der).as_deref() != Some(owner) {
        return Err("signed with a certificate that is not its owner's".into());
    }
    check_chain(roots, provider, &der, UnixTime::now())
        .map_err(|e| format!("its owner's certificate is not valid under the fleet CA: {e}"))?;
    let key = ed25519_key(cert)?;
    let sig = ed25519_dalek::Signature::from_slice(&h.signature)
        .map_err(|e| format!("a malformed record signature: {e}"))?;
    key.verify_strict(&record_payload(h), &sig)
        .map_err(|_| "a record signature that does not match its content".to_string())
}

/// A node certificate's chain to the fleet CA, at `at`.
fn check_chain(
    roots: &RootCertStore,
    provider: &CryptoProvider,
    der: &CertificateDer<'_>,
    at: UnixTime,
) -> Result<(), String> {
    let parsed = rustls::server::ParsedCertificate::try_from(der)
        .map_err(|e| format!("it does not parse: {e}"))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &[],
        at,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| e.to_string())
}

/// This node's signing key and the certificate that vouches for it.
pub struct Signer {
    key: SigningKey,
    cert: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The node's TLS key, which must be Ed25519 (`syncd pki issue` makes
    /// such keys); the caller has checked it matches `cert`.
    pub(super) fn new(
        key: &PrivateKeyDer<'_>,
        cert: &CertificateDer<'_>,
    ) -> Result<Signer, String> {
        let PrivateKeyDer::Pkcs8(der) = key else {
            return Err("not a PKCS#8 key; versions are signed with an Ed25519 key (issue one with `syncd pki issue`)".into());
        };
        let key = SigningKey::from_pkcs8_der(der.secret_pkcs8_der()).map_err(|e| {
            format!("not an Ed25519 key ({e}); versions are signed with the node key, so issue the node an Ed25519 certificate with `syncd pki issue`")
        })?;
        Ok(Signer {
            key,
            cert: Arc::new(cert.as_ref().to_vec()),
        })
    }

    /// Stamps `v` with `time` (ms since the epoch) and signs it.
    pub fn sign(&self, v: &mut pb::DirVersion, time: u64) {
        v.time = time;
        v.signature = self.key.sign(&payload(v)).to_bytes().to_vec();
    }

    /// Signs this node's own record, its certificate first among those
    /// the record carries.
    pub fn sign_record(&self, h: &mut pb::Holdings) {
        if h.certificates.first() != Some(self.cert.as_ref()) {
            h.certificates.retain(|c| c != self.cert.as_ref());
            h.certificates.insert(0, self.cert.as_ref().clone());
            h.certificates.truncate(crate::wire::MAX_RECORD_CERTS);
        }
        h.signature = Vec::new();
        h.signature = self.key.sign(&record_payload(h)).to_bytes().to_vec();
    }

    /// The certificate (DER) a verifier needs.
    pub fn cert(&self) -> Arc<Vec<u8>> {
        self.cert.clone()
    }
}

/// Checks that `v` is signed by its publisher with the key of `cert`, and
/// that `cert` chains to `roots` and was valid when `v` was published.
pub fn verify(
    roots: &RootCertStore,
    provider: &CryptoProvider,
    v: &pb::DirVersion,
    cert: &[u8],
) -> Result<(), String> {
    if v.signature.len() != SIGNATURE_BYTES {
        return Err(if v.signature.is_empty() {
            "unsigned".to_string()
        } else {
            format!("a signature of {} bytes", v.signature.len())
        });
    }
    let der = CertificateDer::from(cert);
    match super::node_id_of(&der) {
        Some(id) if id == v.publisher => {}
        Some(id) => {
            return Err(format!(
                "signed with the certificate of {id:?}, not of its publisher {:?}",
                crate::wire::short(&v.publisher)
            ));
        }
        None => return Err("signed with a certificate that names no node".into()),
    }
    let at = UnixTime::since_unix_epoch(Duration::from_millis(v.time));
    check_chain(roots, provider, &der, at)
    .map_err(|e| format!("the publisher's certificate is not valid under the fleet CA when the version was signed: {e}"))?;
    let key = ed25519_key(cert)?;
    let sig = ed25519_dalek::Signature::from_slice(&v.signature)
        .map_err(|e| format!("a malformed signature: {e}"))?;
    key.verify_strict(&payload(v), &sig)
        .map_err(|_| "a signature that does not match its content".to_string())
}

/// The Ed25519 public key of a certificate.
pub(super) fn ed25519_key(cert: &[u8]) -> Result<VerifyingKey, String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert)
        .map_err(|e| format!("the signer's certificate does not parse: {e}"))?;
    let spki = x.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err("the signer's certificate has no Ed25519 key".into());
    }
    let bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "the signer's Ed25519 key is not 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("the signer's key is unusable: {e}"))
}
