//! The built-in certificate authority: a root key and certificate on disk (a Secret in a
//! cluster), issuing one short-lived SPIFFE certificate per workload identity.
//!
//! Files in the CA directory:
//! - `root-cert.pem`, `root-key.pem`: the signing root (the key is written 0600 and never logged);
//! - `trust-bundle.pem` (optional): more roots to trust, so a mesh can move to a new root while
//!   peers still present certificates from the old one.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::Identity;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const TRUST_BUNDLE: &str = "trust-bundle.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read {path}: {source}; create a CA with `sluice-proxy --init-ca --ca-dir DIR`")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{0} already exists; refusing to overwrite a CA (remove it to start a new mesh)")]
    Exists(PathBuf),
    #[error("issue a certificate for {identity}: {source}")]
    Issue {
        identity: String,
        source: rcgen::Error,
    },
}

/// A leaf certificate and its key, ready for rustls.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

/// The CA: signs leaves, and knows every root the mesh trusts.
pub struct Ca {
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    roots: Vec<CertificateDer<'static>>,
}

impl Ca {
    /// Creates a new root (ECDSA P-256, ten years) in `dir`, which must not hold one yet.
    pub fn create(dir: &Path) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(CaError::Exists(path.clone()));
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|source| CaError::Issue {
            identity: "the root".to_owned(),
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "sluice");
        name.push(DnType::CommonName, "sluice mesh root");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|source| CaError::Issue {
            identity: "the root".to_owned(),
            source,
        })?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Write {
            path: cert_path.clone(),
            source,
        })?;
        Self::load(dir)
    }

    /// Loads the root from `dir`, plus any extra trusted roots in `trust-bundle.pem`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let invalid = |path: &Path, why: String| CaError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let issuer_key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a PEM private key: {e}")))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| invalid(&cert_path, format!("not a PEM CA certificate: {e}")))?;
        // Re-signing the parsed parameters with the same key reproduces the root's subject and
        // key identifier, which is all that signing leaves needs.
        let issuer = params
            .self_signed(&issuer_key)
            .map_err(|e| invalid(&key_path, format!("does not match {ROOT_CERT}: {e}")))?;
        let mut roots = parse_certs(&cert_path, &cert_pem)?;
        let bundle_path = dir.join(TRUST_BUNDLE);
        if bundle_path.exists() {
            let bundle = read(&bundle_path)?;
            roots.extend(parse_certs(&bundle_path, &bundle)?);
        }
        Ok(Self {
            issuer,
            issuer_key,
            roots,
        })
    }

    /// Every root certificate the mesh trusts (the signing root first).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Issues a leaf for `identity`, valid from an hour ago (clock skew) for `lifetime`.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<Issued, CaError> {
        let now = SystemTime::now();
        self.issue_between(identity, now - Duration::from_secs(3600), now + lifetime)
    }

    /// Issues a leaf valid between two instants (tests use this for expired certificates).
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, CaError> {
        let err = |source| CaError::Issue {
            identity: identity.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        let uri = rcgen::Ia5String::try_from(identity.to_string()).map_err(err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params
            .signed_by(&key, &self.issuer, &self.issuer_key)
            .map_err(err)?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after,
        })
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            why: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Invalid {
            path: path.to_path_buf(),
            why: "holds no certificate".to_owned(),
        });
    }
    Ok(certs)
}

/// Writes a private key readable by its owner only, created that way (no window where it is
/// world-readable).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)
}
