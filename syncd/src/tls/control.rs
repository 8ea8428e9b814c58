//! Fleet controls (issue 11): `syncctl pause DIR --fleet` signs a
//! [`pb::Control`] with an operator's key; every node that takes it in
//! checks the signature, and that the operator's certificate chains to
//! the fleet CA, is an operator certificate and was valid when the control
//! was signed.
//!
//! An operator certificate (`syncd pki issue --operator NAME`) has the
//! code-signing extended key usage only and no DNS name: TLS refuses it
//! on both sides (server and client authentication are required if any
//! usage is listed), and versions are checked for server authentication,
//! so it can neither join the fleet nor publish. A node certificate lacks
//! code signing, so a node cannot sign a control.

use std::path::Path;
use std::time::Duration;

use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sync_proto::pb;

use super::{TlsError, bad, read};
use crate::wire::SIGNATURE_BYTES;

const DOMAIN: &[u8] = b"syncd fleet control 1\0";
/// The organizational unit of every operator certificate.
pub const OPERATOR_UNIT: &str = "syncd operator";
/// id-kp-codeSigning (1.3.6.1.5.5.7.3.3), DER-encoded.
const CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// The bytes a control's signature covers.
pub fn payload(c: &pb::Control) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + 64 + c.dir.len() + c.operator.len());
    p.extend_from_slice(DOMAIN);
    for s in [&c.dir, &c.action, &c.priority, &c.operator] {
        p.extend_from_slice(&(s.len() as u32).to_be_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    p.extend_from_slice(&c.time.to_be_bytes());
    p
}

/// The operator a certificate names: its common name, if it is an
/// operator certificate (the organizational unit says so).
pub fn operator_of(cert: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert).ok()?;
    let unit = x
        .subject()
        .iter_organizational_unit()
        .next()
        .and_then(|u| u.as_str().ok())?;
    if unit != OPERATOR_UNIT {
        return None;
    }
    let cn = x.subject().iter_common_name().next()?.as_str().ok()?;
    crate::wire::is_id(cn).then(|| cn.to_string())
}

/// Checks that `c` is signed by its operator with the key of `cert`, and
/// that `cert` is an operator certificate under `roots`, valid when `c`
/// was signed.
pub fn verify(
    roots: &RootCertStore,
    provider: &CryptoProvider,
    c: &pb::Control,
    cert: &[u8],
) -> Result<(), String> {
    if c.signature.len() != SIGNATURE_BYTES {
        return Err(format!("a signature of {} bytes", c.signature.len()));
    }
    match operator_of(cert) {
        Some(name) if name == c.operator => {}
        Some(name) => {
            return Err(format!(
                "signed with the certificate of operator {name:?}, not of {:?}",
                crate::wire::short(&c.operator)
            ));
        }
        None => return Err("signed with a certificate that is not an operator's".into()),
    }
    let der = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("the operator's certificate does not parse: {e}"))?;
    let at = UnixTime::since_unix_epoch(Duration::from_millis(c.time));
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        &[],
        at,
        webpki::KeyUsage::required(CODE_SIGNING),
        None,
        None,
    )
    .map_err(|e| {
        format!("the operator's certificate is not valid under the fleet CA for signing controls when it was signed: {e}")
    })?;
    let key = super::sign::ed25519_key(cert)?;
    let sig = ed25519_dalek::Signature::from_slice(&c.signature)
        .map_err(|e| format!("a malformed signature: {e}"))?;
    key.verify_strict(&payload(c), &sig)
        .map_err(|_| "a signature that does not match the control".to_string())
}

/// An operator's key and certificate, as `syncctl --fleet` signs with.
pub struct Operator {
    key: SigningKey,
    cert: Vec<u8>,
    name: String,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Operator {
    /// Reads an operator certificate and its Ed25519 key (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Operator, TlsError> {
        let der = CertificateDer::from_pem_slice(&read(cert)?)
            .map_err(|e| bad(cert, format!("not a PEM certificate: {e}")))?;
        let name = operator_of(&der).ok_or_else(|| {
            bad(
                cert,
                "not an operator certificate (issue one with `syncd pki issue --operator NAME`)",
            )
        })?;
        let PrivateKeyDer::Pkcs8(k) = PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?
        else {
            return Err(bad(key, "not a PKCS#8 Ed25519 key"));
        };
        let signing = SigningKey::from_pkcs8_der(k.secret_pkcs8_der())
            .map_err(|e| bad(key, format!("not an Ed25519 key: {e}")))?;
        let public = super::sign::ed25519_key(der.as_ref()).map_err(|m| bad(cert, m))?;
        if public != signing.verifying_key() {
            return Err(bad(key, format!("does not match {}", cert.display())));
        }
        Ok(Operator {
            key: signing,
            cert: der.as_ref().to_vec(),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate (DER) that vouches for this operator's controls.
    pub fn cert(&self) -> &[u8] {
        &self.cert
    }

    /// A signed control, stamped with `time` (ms since the epoch).
    pub fn sign(&self, dir: &str, action: &str, priority: &str, time: u64) -> pb::Control {
        let mut c = pb::Control {
            dir: dir.to_string(),
            action: action.to_string(),
            priority: priority.to_string(),
            operator: self.name.clone(),
            time,
            signature: Vec::new(),
        };
        c.signature = self.key.sign(&payload(&c)).to_bytes().to_vec();
        c
    }
}
