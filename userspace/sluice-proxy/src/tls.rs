//! Mutual TLS for HBONE, as ztunnel speaks it: TLS 1.3 only, AES-GCM suites, ALPN `h2`, no SNI,
//! both sides present a SPIFFE certificate. The client checks the server's URI SAN against the
//! identity it expects at that destination; the server requires a client certificate chained to
//! the mesh's roots and reads the client's identity from it (authorization uses it).
//!
//! Certificates come from [`CertStore`], which issues one per identity and reissues it at half
//! its lifetime. The rustls configs resolve the certificate on every handshake, so a renewal
//! reaches new connections at once and never touches established ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tracing::{debug, info};

use crate::ca::{Ca, CaError};
use crate::identity::Identity;

/// HBONE's ALPN protocol.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the trust bundle is unusable: {0}")]
    Roots(String),
}

/// The crypto sluice allows: ring's provider cut down to TLS 1.3's AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// Issued certificates by identity, renewed before they expire.
pub struct CertStore {
    ca: Ca,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    certs: Mutex<HashMap<Identity, Held>>,
}

struct Held {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    not_after: SystemTime,
}

/// What the config dump shows of a held certificate (never the key).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    pub identity: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    pub renew_at: u64,
}

impl CertStore {
    pub fn new(ca: Ca, lifetime: Duration) -> Result<Arc<Self>, TlsError> {
        let mut roots = RootCertStore::empty();
        for root in ca.roots() {
            roots
                .add(root.clone())
                .map_err(|e| TlsError::Roots(e.to_string()))?;
        }
        Ok(Arc::new(Self {
            ca,
            lifetime,
            provider: provider(),
            roots: Arc::new(roots),
            certs: Mutex::new(HashMap::new()),
        }))
    }

    /// The current certificate of `identity`, issued or reissued when needed.
    pub fn certified_key(&self, identity: &Identity) -> Result<Arc<CertifiedKey>, TlsError> {
        let now = SystemTime::now();
        let mut certs = self
            .certs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = certs.get(identity)
            && now < held.renew_at
        {
            return Ok(held.key.clone());
        }
        let issued = self.ca.issue(identity, self.lifetime)?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(issued.key)
            .map_err(TlsError::Config)?;
        let key = Arc::new(CertifiedKey::new(issued.chain, signing));
        // Renew at half the lifetime: a failed renewal leaves the other half to retry in.
        let renew_at = now + self.lifetime / 2;
        info!(identity = %identity, not_after = ?issued.not_after, "certificate issued");
        certs.insert(
            identity.clone(),
            Held {
                key: key.clone(),
                renew_at,
                not_after: issued.not_after,
            },
        );
        Ok(key)
    }

    /// The certificates held now, by identity.
    pub fn certificates(&self) -> Vec<CertificateInfo> {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let certs = self
            .certs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<CertificateInfo> = certs
            .iter()
            .map(|(identity, held)| CertificateInfo {
                identity: identity.to_string(),
                not_after: unix(held.not_after),
                renew_at: unix(held.renew_at),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Client side of one HBONE connection: present `source`, accept only `expected`.
    pub fn client_config(
        self: &Arc<Self>,
        source: &Identity,
        expected: &Identity,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        // Issue now so a CA failure shows here, not as a handshake error.
        self.certified_key(source)?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: self.roots.clone(),
                provider: self.provider.clone(),
                expected: expected.clone(),
            }))
            .with_client_cert_resolver(Arc::new(Resolver {
                store: self.clone(),
                identity: source.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// Server side for a pod: present `local`, require a client certificate from the mesh.
    pub fn server_config(
        self: &Arc<Self>,
        local: &Identity,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        self.certified_key(local)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::Roots(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver {
                store: self.clone(),
                identity: local.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Hands rustls the identity's current certificate on every handshake.
#[derive(Debug)]
struct Resolver {
    store: Arc<CertStore>,
    identity: Identity,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints keys.
        f.debug_struct("CertStore")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.store
            .certified_key(&self.identity)
            .inspect_err(
                |e| tracing::warn!(identity = %self.identity, error = %e, "no certificate"),
            )
            .ok()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// Verifies the server's chain against the mesh roots (no host name: HBONE has no SNI), then
/// that its single URI SAN is the identity expected at the destination.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let identity = peer_identity(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))?;
        if identity != self.expected {
            debug!(expected = %self.expected, presented = %identity, "server identity mismatch");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
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

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let reason = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        _ => CertificateError::Other(rustls::OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(reason)
}

/// The SPIFFE identity in a certificate: its one URI SAN, if that parses as an identity.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    Identity::parse(uri).ok()
}
