//! Certificate verifiers for both sides. They exist instead of rustls'
//! `WebPki*Verifier` for two reasons: cert-manager's `usages: [any]` puts
//! `anyExtendedKeyUsage` in certificates, which webpki's default check
//! refuses but Go kiam accepted; and a name mismatch must say which host
//! was expected and which names the certificate has.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{KeyPurposeId, KeyPurposeIdIter, KeyUsage, RequiredEkuNotFoundContext};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Side;

// DER contents of the OIDs (no tag/length), as webpki compares them.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
const EKU_ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

/// serverAuth/clientAuth if the certificate lists usages, or anyExtendedKeyUsage.
struct Eku(Side);

impl webpki::ExtendedKeyUsageValidator for Eku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let (wanted, required) = match self.0 {
            Side::Server => (EKU_SERVER_AUTH, KeyUsage::server_auth()),
            Side::Client => (EKU_CLIENT_AUTH, KeyUsage::client_auth()),
        };
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == KeyPurposeId::new(wanted) || id == KeyPurposeId::new(EKU_ANY) {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            RequiredEkuNotFoundContext { required, present },
        ))
    }
}

/// Checks `end_entity` chains to `anchors` for `side`'s usage at `now`.
pub(crate) fn verify_chain(
    side: Side,
    anchors: &[TrustAnchor<'static>],
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| pki_error(side, e))?;
    cert.verify_for_usage(algs.all, anchors, intermediates, now, Eku(side), None, None)
        .map(|_| ())
        .map_err(|e| pki_error(side, e))
}

/// A certificate that does not name the host the agent dialled.
#[derive(Debug)]
pub(super) struct NameMismatch {
    pub expected: String,
    pub presented: Vec<String>,
}

impl fmt::Display for NameMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server certificate is not valid for {:?} (the host in --server-address); it names {}",
            self.expected,
            if self.presented.is_empty() {
                "no DNS or IP SANs".to_string()
            } else {
                self.presented.join(", ")
            }
        )
    }
}

impl std::error::Error for NameMismatch {}

/// A certificate whose extended key usage does not allow this side.
#[derive(Debug)]
pub(super) struct WrongUsage {
    pub side: Side,
    pub present: Vec<String>,
}

impl fmt::Display for WrongUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (who, usage, hint) = match self.side {
            Side::Server => (
                "server",
                "serverAuth",
                " (is an agent certificate used as the server's?)",
            ),
            Side::Client => (
                "client",
                "clientAuth",
                " (is a server certificate used as the agent's?)",
            ),
        };
        write!(
            f,
            "{who} certificate's extended key usage lacks {usage}, it has only {}{hint}",
            self.present.join(", ")
        )
    }
}

impl std::error::Error for WrongUsage {}

fn eku_name(oid: &[usize]) -> String {
    match oid {
        [1, 3, 6, 1, 5, 5, 7, 3, 1] => "serverAuth".into(),
        [1, 3, 6, 1, 5, 5, 7, 3, 2] => "clientAuth".into(),
        _ => oid
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("."),
    }
}

fn pki_error(side: Side, e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_err = match e {
        W::BadDer | W::BadDerTime | W::TrailingData(_) => CertificateError::BadEncoding,
        W::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        W::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        // Path building found an issuer with the right name whose key did not
        // sign this: in practice, a CA regenerated under the same name.
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(ctx) => {
            CertificateError::Other(OtherError(Arc::new(WrongUsage {
                side,
                present: ctx.present.iter().map(|o| eku_name(o)).collect(),
            })))
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// The agent's check of the server: chain to `--ca`, serverAuth, and the
/// name the agent dialled.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub anchors: Vec<TrustAnchor<'static>>,
    pub algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            Side::Server,
            &self.anchors,
            &self.algs,
            end_entity,
            intermediates,
            now,
        )?;
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| pki_error(Side::Server, e))?;
        if cert.verify_is_valid_for_subject_name(server_name).is_err() {
            let presented = X509Certificate::from_der(end_entity)
                .map(|(_, c)| super::load::san_names(&c))
                .unwrap_or_default();
            let expected = server_name.to_str().into_owned();
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NameMismatch {
                    expected,
                    presented,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The server's check of agents: a certificate is mandatory, must chain to
/// `--ca` and allow clientAuth.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub anchors: Vec<TrustAnchor<'static>>,
    pub algs: WebPkiSupportedAlgorithms,
    /// Sent in the CertificateRequest so clients with several certs pick ours.
    pub hints: Vec<DistinguishedName>,
}

impl ClientVerifier {
    pub(super) fn new(anchors: Vec<TrustAnchor<'static>>, algs: WebPkiSupportedAlgorithms) -> Self {
        let hints = anchors
            .iter()
            // webpki keeps a subject as the Name's contents; the
            // CertificateRequest carries whole DER Names (RFC 8446 4.2.4),
            // which OpenSSL clients parse and reject otherwise.
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        ClientVerifier {
            anchors,
            algs,
            hints,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            Side::Client,
            &self.anchors,
            &self.algs,
            end_entity,
            intermediates,
            now,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// One line explaining a failed handshake. `peer` is the side whose
/// certificate was being checked (for alerts: the side that sent it).
pub(crate) fn explain(peer: Side, err: &rustls::Error) -> String {
    let who = peer.as_str();
    match err {
        rustls::Error::NoCertificatesPresented => format!("{who} presented no certificate"),
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                format!("{who} certificate is not signed by --ca (unknown issuer)")
            }
            CertificateError::BadSignature => format!(
                "{who} certificate is not signed by --ca (its issuer has the CA's name but \
                 another key: was the CA regenerated?)"
            ),
            CertificateError::ExpiredContext { not_after, .. } => {
                format!(
                    "{who} certificate expired at {}",
                    fmt_unix(not_after.as_secs())
                )
            }
            CertificateError::Expired => format!("{who} certificate expired"),
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "{who} certificate is not valid before {}",
                fmt_unix(not_before.as_secs())
            ),
            CertificateError::Other(o) => o.to_string(),
            other => format!("{who} certificate rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!(
                "the {who} refused our certificate: {}",
                explain_alert(*alert)
            )
        }
        other => other.to_string(),
    }
}

/// What a TLS alert about our own certificate means, in operator terms.
pub(crate) fn explain_alert(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match alert {
        A::CertificateRequired => "a client certificate is required (--cert)".into(),
        A::UnknownCA => "it does not trust the CA that signed --cert (check its --ca)".into(),
        A::CertificateExpired => "it says --cert has expired (or is not valid yet)".into(),
        A::DecryptError => {
            "it says --cert is not signed by its --ca (same CA name, another key?)".into()
        }
        A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => {
            "it rejected --cert (wrong usage or not yet valid?)".into()
        }
        other => format!("alert {other:?}"),
    }
}

fn fmt_unix(secs: u64) -> String {
    fmt_time(secs as i64)
}

/// RFC 3339 UTC, as operators compare it with `openssl x509 -enddate`.
pub(crate) fn fmt_time(secs: i64) -> String {
    match jiff::Timestamp::from_second(secs) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => secs.to_string(),
    }
}
