//! Reading and parsing the PEM files. Parsing is strict about what each flag
//! must contain but lenient about layout: a combined cert+key file, a chain,
//! extra sections (`EC PARAMETERS`) and any of the three key encodings work.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{TlsError, TlsFiles};

/// The raw bytes of the three files, as last read. Compared byte for byte to
/// detect a change: cheaper to reason about than mtimes, and immune to
/// symlink swaps that keep timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl Snapshot {
    /// Reads all three files; each path is opened afresh so symlinks are
    /// resolved now, not when the process started.
    pub(super) fn read(files: &TlsFiles) -> Result<Snapshot, TlsError> {
        Ok(Snapshot {
            cert: read_file("--cert", &files.cert)?,
            key: read_file("--key", &files.key)?,
            ca: read_file("--ca", &files.ca)?,
        })
    }
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TlsError::NotFound {
            flag,
            path: path.to_path_buf(),
        },
        _ => TlsError::Unreadable {
            flag,
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// What a certificate says about itself, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lower-case hex with colons (as `openssl x509 -serial` would group it).
    pub serial: String,
    /// The leaf's subject, e.g. `CN=agent`.
    pub subject: String,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The earliest notAfter of the leaf, the rest of `--cert`'s chain and
    /// the `--ca` certificate that issued it: when this side stops working.
    /// This is what `grpc_*_tls_certificate_expiry_seconds` exports (as Go kiam did).
    pub expiry: i64,
    /// DNS and IP subject alternative names, e.g. `DNS:kiam-server`, `IP:127.0.0.1`.
    pub names: Vec<String>,
}

/// Parsed, checked contents of the three files.
pub(crate) struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub anchors: Vec<TrustAnchor<'static>>,
    pub info: CertInfo,
}

impl Material {
    pub(super) fn parse(files: &TlsFiles, snap: &Snapshot) -> Result<Material, TlsError> {
        let chain = certificates("--cert", &files.cert, &snap.cert)?;
        let key = private_key(&files.key, &snap.key)?;
        let ca = certificates("--ca", &files.ca, &snap.ca)?;
        let mut anchors = Vec::with_capacity(ca.len());
        for (i, cert) in ca.iter().enumerate() {
            let anchor =
                webpki::anchor_from_trusted_cert(cert).map_err(|e| TlsError::BadCertificate {
                    flag: "--ca",
                    path: files.ca.clone(),
                    reason: format!("certificate #{} cannot be a trust anchor: {e}", i + 1),
                })?;
            anchors.push(anchor.to_owned());
        }
        check_key_matches(files, &chain, &key)?;
        let info = describe(&chain, &ca).map_err(|reason| TlsError::BadCertificate {
            flag: "--cert",
            path: files.cert.clone(),
            reason,
        })?;
        Ok(Material {
            chain,
            key,
            anchors,
            info,
        })
    }
}

fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            flag,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        let hint = if PrivateKeyDer::from_pem_slice(pem).is_ok() {
            " (it holds a private key: are --cert and --key swapped?)"
        } else {
            ""
        };
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
            hint,
        });
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|e| TlsError::BadCertificate {
            flag,
            path: path.to_path_buf(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            let text = String::from_utf8_lossy(pem);
            let hint = if text.contains("ENCRYPTED") {
                " (the key is encrypted; decrypt it, e.g. `openssl pkey -in KEY -out KEY.plain`)"
            } else if text.contains("BEGIN CERTIFICATE") {
                " (it holds a certificate: are --cert and --key swapped?)"
            } else {
                ""
            };
            Err(TlsError::NoKey {
                path: path.to_path_buf(),
                hint,
            })
        }
        Err(e) => Err(TlsError::BadPem {
            flag: "--key",
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn check_key_matches(
    files: &TlsFiles,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    let provider = super::provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        // Keys the provider cannot introspect are checked by the handshake instead.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(_) => Err(TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
    }
}

/// Summarises the leaf for logs/metrics; `ca` is used only to find the
/// issuer's notAfter.
pub(crate) fn describe(
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
) -> Result<CertInfo, String> {
    let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|e| e.to_string())?;
    let not_after = leaf.validity().not_after.timestamp();
    let mut expiry = not_after;
    for der in chain[1..].iter().chain(ca) {
        if let Ok((_, c)) = X509Certificate::from_der(der) {
            // Only certificates on the leaf's path count; an unrelated CA in
            // a bundle expiring early must not raise an alarm.
            let on_path = chain[1..].iter().any(|d| d == der)
                || c.subject().as_raw() == leaf.issuer().as_raw();
            if on_path {
                expiry = expiry.min(c.validity().not_after.timestamp());
            }
        }
    }
    Ok(CertInfo {
        serial: leaf.raw_serial_as_string(),
        subject: leaf.subject().to_string(),
        not_after,
        expiry,
        names: san_names(&leaf),
    })
}

/// DNS and IP SANs of a certificate, formatted `DNS:x` / `IP:y`.
pub(crate) fn san_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                GeneralName::IPAddress(ip) => names.push(match ip.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                    ),
                    _ => "IP:?".to_string(),
                }),
                _ => {}
            }
        }
    }
    names
}
