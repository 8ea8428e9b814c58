//! `syncd pki`: a fleet CA and the certificates it issues.
//!
//! `init` creates the CA (ECDSA P-256, self-signed) in a directory;
//! `issue NODE_ID` signs a node certificate whose subject alternative name
//! and common name are the node id, usable both to serve and to dial
//! (server and client authentication); `issue --operator NAME` signs an
//! operator certificate, usable only to sign fleet controls (code signing,
//! see `tls::control`): it cannot serve, dial nor sign versions. Keys are
//! written mode 0600 and nothing is ever overwritten.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error("{0:?} is not a node id ([A-Za-z0-9._-]{{1,128}})")]
    BadId(String),
    #[error("{what}: {source}")]
    Cert { what: String, source: rcgen::Error },
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Cert { what, source }
}

/// The CA's files in `dir`.
pub fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Writes `contents` to a new file (never over an existing one).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists {
                path: path.to_path_buf(),
            },
            _ => PkiError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| PkiError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Valid from an hour ago (clocks differ a little) for `days`.
fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

/// Creates a fleet CA in `dir` (`ca.pem`, `ca.key`), valid for `days`.
pub fn init(dir: &Path, name: &str, days: u32) -> Result<(PathBuf, PathBuf), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let (cert_path, key_path) = ca_files(dir);
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "syncd fleet");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days);
    let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
    let cert = p.self_signed(&key).map_err(cert_err("signing the CA"))?;
    // The key first: a CA certificate without its key is useless.
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Issues a certificate for node `id` from the CA in `ca_dir`, valid for
/// `days`, written to `out/<id>.pem` and `out/<id>.key`.
pub fn issue(
    ca_dir: &Path,
    id: &str,
    days: u32,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let until = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
    issue_until(ca_dir, id, until, out)
}

/// Like [`issue`], valid until `until` (e.g. a certificate that expires in
/// a few seconds, to see what expiry does).
pub fn issue_until(
    ca_dir: &Path,
    id: &str,
    until: time::OffsetDateTime,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_as(ca_dir, id, until, out, Role::Node)
}

/// Issues an operator certificate for `name`, valid for `days`, written
/// to `out/<name>.pem` and `out/<name>.key`: it signs fleet controls
/// (`syncctl pause DIR --fleet`) and nothing else.
pub fn issue_operator(
    ca_dir: &Path,
    name: &str,
    days: u32,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let until = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
    issue_as(ca_dir, name, until, out, Role::Operator)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Node,
    Operator,
}

fn issue_as(
    ca_dir: &Path,
    id: &str,
    until: time::OffsetDateTime,
    out: &Path,
    role: Role,
) -> Result<(PathBuf, PathBuf), PkiError> {
    if !crate::wire::is_id(id) {
        return Err(PkiError::BadId(id.to_string()));
    }
    let (ca_cert, ca_key) = ca_files(ca_dir);
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| PkiError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca_key = KeyPair::from_pem(&read(&ca_key)?).map_err(cert_err(format!(
        "{}: reading the CA key",
        ca_key.display()
    )))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key).map_err(cert_err(format!(
        "{}: reading the CA certificate",
        ca_cert.display()
    )))?;
    let mut p =
        CertificateParams::new(Vec::<String>::new()).map_err(cert_err("node parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    match role {
        Role::Node => {
            p.subject_alt_names = vec![SanType::DnsName(
                id.try_into().map_err(cert_err(format!("node id {id:?}")))?,
            )];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Role::Operator => {
            // No DNS name, and code signing only: TLS refuses it on both
            // sides, and versions are checked for server authentication.
            dn.push(
                DnType::OrganizationalUnitName,
                super::control::OPERATOR_UNIT,
            );
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        }
    }
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, 0);
    p.not_after = until;
    // Ed25519: the node's key also signs the versions it publishes, the
    // operator's the controls.
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(cert_err("generating the key"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(cert_err("signing the certificate"))?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let (cert_path, key_path) = (out.join(format!("{id}.pem")), out.join(format!("{id}.key")));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}
