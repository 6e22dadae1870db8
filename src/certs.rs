//! `kiam certs`: a CA plus server and agent certificates for mutual TLS,
//! replacing kiam's cfssl steps.
//!
//! Surprise first: `--reissue` overwrites the four leaf files (that is its
//! job: rotation) but never the CA, and the CA outlives the leaves (10 years,
//! or `--days` if longer) so leaves can be reissued many times from it. It
//! keeps every name the current `server.pem` has and adds `--host`'s; it
//! refuses when `server.pem` exists but cannot be read and no `--host` is
//! given (a missing one has no names to keep). Without
//! `--reissue`, no existing file is overwritten unless `--force` is given:
//! a complete set that already names every `--host` is kept as it is (so
//! rerunning a documented command, `--print-secrets` included, succeeds and
//! prints the same Secrets), and anything else that exists is refused with
//! nothing written.
//!
//! Keys are ECDSA P-256 (PKCS#8), written 0600; certificates 0644. Files
//! are written to a temporary name and renamed, so a server polling them
//! never reads half a file.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::cli::CertsArgs;
use crate::tls::TlsFiles;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const AGENT_CERT: &str = "agent.pem";
pub const AGENT_KEY: &str = "agent-key.pem";

/// The names every server certificate carries; `--host` adds to them.
pub const DEFAULT_SERVER_NAMES: [&str; 3] = ["kiam-server", "localhost", "127.0.0.1"];

/// A CA's minimum lifetime, so that `--reissue` stays useful for years.
const CA_MIN_DAYS: u32 = 3650;

/// Leaves start a little in the past: a node whose clock lags must not see
/// a brand-new certificate as "not yet valid".
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{}: already exists; pass --force to overwrite it, or --reissue to issue new server and agent certificates from the existing CA", path.display())]
    Exists { path: PathBuf },
    #[error("--reissue needs the existing CA: {}: {reason}", path.display())]
    Reissue { path: PathBuf, reason: String },
    #[error("{}: exists and does not name --host {}; pass --reissue to issue new server and agent certificates from the existing CA that keep its names and add these, or --force to start over with a new CA", path.display(), hosts.join(","))]
    MissingHosts { path: PathBuf, hosts: Vec<String> },
    #[error("{}: exists but is not a readable certificate ({reason}); pass --force to write a new set", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("--reissue keeps the names of the current server certificate, but {}: {reason}; give every name the server needs with --host (--host kiam-server if it needs none beyond the defaults)", path.display())]
    UnknownNames { path: PathBuf, reason: String },
    #[error("--host {host:?}: not a DNS name or IP address")]
    BadHost { host: String },
    #[error("--days must be at least 1")]
    Days,
    #[error("--out-dir {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("generating certificates: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for CertsError {
    fn from(e: rcgen::Error) -> Self {
        CertsError::Generate(e.to_string())
    }
}

/// What a leaf certificate is for: decides its extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth and clientAuth: Go kiam's manifests probe the server
    /// with its own certificate (`kiam health --cert=server.pem`).
    Server,
    /// clientAuth only: an agent certificate cannot pose as a server.
    Agent,
}

/// One leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    /// DNS names and IP addresses for the SAN extension.
    pub names: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// kiam's server certificate: CN kiam-server, SANs
    /// [`DEFAULT_SERVER_NAMES`] plus `hosts`, serverAuth (and clientAuth, see [`Usage::Server`]).
    pub fn server(hosts: &[String], days: u32) -> Result<LeafSpec, CertsError> {
        let mut names: Vec<String> = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        for h in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
            check_host(h)?;
            if !names.iter().any(|n| n.eq_ignore_ascii_case(h)) {
                names.push(h.to_string());
            }
        }
        let (not_before, not_after) = validity(days)?;
        Ok(LeafSpec {
            common_name: "kiam-server".into(),
            names,
            usage: Usage::Server,
            not_before,
            not_after,
        })
    }

    /// kiam's agent certificate: CN agent, no SANs, clientAuth.
    pub fn agent(days: u32) -> Result<LeafSpec, CertsError> {
        let (not_before, not_after) = validity(days)?;
        Ok(LeafSpec {
            common_name: "agent".into(),
            names: Vec::new(),
            usage: Usage::Agent,
            not_before,
            not_after,
        })
    }
}

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), CertsError> {
    if days == 0 {
        return Err(CertsError::Days);
    }
    let now = OffsetDateTime::now_utc();
    Ok((now - BACKDATE, now + Duration::days(i64::from(days))))
}

fn check_host(host: &str) -> Result<(), CertsError> {
    let ok = host.parse::<IpAddr>().is_ok()
        || rustls_pki_types::DnsName::try_from(host.strip_prefix("*.").unwrap_or(host)).is_ok();
    if ok {
        Ok(())
    } else {
        Err(CertsError::BadHost {
            host: host.to_string(),
        })
    }
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue kiam's leaf certificates.
pub struct Ca {
    pem: Issued,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl Ca {
    /// A new self-signed CA: basicConstraints CA:true, keyCertSign + cRLSign.
    pub fn generate(
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Ca, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let pem = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Ca {
            pem,
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// An existing CA from PEM text (key in PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = ca_key_pair(key_pem)?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| "not a PEM certificate".to_string())?;
        let der: rustls_pki_types::CertificateDer<'static> = der;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        if !parsed.is_ca() {
            return Err("not a CA certificate (basicConstraints CA:false)".into());
        }
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| e.to_string())?;
        let pem = Issued {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        };
        Ok(Ca {
            pem,
            issuer,
            not_after,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.pem.key_pem
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a leaf with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.subject_alt_names = spec
            .names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|_| CertsError::BadHost { host: n.clone() })?,
                )),
            })
            .collect::<Result<_, CertsError>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // The server certificate may also act as a client: Go kiam's
        // manifests probe the server with `kiam health --cert=server.pem`,
        // and cfssl's usual profile gave it both usages. The agent's may
        // never serve.
        params.extended_key_usages = match spec.usage {
            Usage::Server => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Agent => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The CA key as rcgen needs it. ring reads only PKCS#8, but cfssl and
/// older openssl write PKCS#1 (`RSA PRIVATE KEY`) and SEC1
/// (`EC PRIVATE KEY`); both are wrapped into PKCS#8 here so that a CA made
/// with those tools can be used by `--reissue` as it is.
fn ca_key_pair(key_pem: &str) -> Result<KeyPair, String> {
    use rustls_pki_types::pem::PemObject;
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
            "no private key found (an encrypted key must be decrypted first)".to_string()
        })?;
    // DER of the AlgorithmIdentifier contents: rsaEncryption + NULL, or
    // id-ecPublicKey + the named curve (P-256, then P-384).
    const RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    const EC_P256: &[u8] = &[
        0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
        0x3d, 0x03, 0x01, 0x07,
    ];
    const EC_P384: &[u8] = &[
        0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00,
        0x22,
    ];
    let candidates: Vec<Vec<u8>> = match &key {
        rustls_pki_types::PrivateKeyDer::Pkcs8(k) => vec![k.secret_pkcs8_der().to_vec()],
        rustls_pki_types::PrivateKeyDer::Pkcs1(k) => vec![pkcs8_wrap(RSA, k.secret_pkcs1_der())],
        rustls_pki_types::PrivateKeyDer::Sec1(k) => [EC_P256, EC_P384]
            .iter()
            .map(|alg| pkcs8_wrap(alg, k.secret_sec1_der()))
            .collect(),
        _ => Vec::new(),
    };
    candidates
        .into_iter()
        .find_map(|der| {
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
            KeyPair::try_from(&der).ok()
        })
        .ok_or_else(|| {
            "unsupported private key (RSA, ECDSA P-256/P-384 or Ed25519 expected)".into()
        })
}

/// PKCS#8 PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }.
fn pkcs8_wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(tlv(0x30, algorithm));
    body.extend(tlv(0x04, key));
    tlv(0x30, &body)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The six files of a PKI written by [`generate`]/[`reissue`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `--cert server.pem --key server-key.pem --ca ca.pem`.
    pub fn server_files(&self) -> TlsFiles {
        TlsFiles::new(
            self.path(SERVER_CERT),
            self.path(SERVER_KEY),
            self.path(CA_CERT),
        )
    }

    /// `--cert agent.pem --key agent-key.pem --ca ca.pem`.
    pub fn agent_files(&self) -> TlsFiles {
        TlsFiles::new(
            self.path(AGENT_CERT),
            self.path(AGENT_KEY),
            self.path(CA_CERT),
        )
    }
}

/// Writes a new CA, server and agent certificate into `out_dir` (created if
/// missing). Refuses if any of the six files exists.
pub fn generate(out_dir: &Path, hosts: &[String], days: u32) -> Result<Pki, CertsError> {
    write_new(out_dir, hosts, days, false).map(|(pki, _)| pki)
}

fn write_new(
    out_dir: &Path,
    hosts: &[String],
    days: u32,
    force: bool,
) -> Result<(Pki, Outcome), CertsError> {
    let server = LeafSpec::server(hosts, days)?;
    let agent = LeafSpec::agent(days)?;
    let all = [
        CA_CERT,
        CA_KEY,
        SERVER_CERT,
        SERVER_KEY,
        AGENT_CERT,
        AGENT_KEY,
    ];
    let pki = Pki {
        dir: out_dir.to_path_buf(),
    };
    if !force {
        let present = all
            .iter()
            .filter(|name| out_dir.join(name).symlink_metadata().is_ok())
            .count();
        if present == all.len() {
            // The set a previous run wrote: kept if it names every --host.
            let path = out_dir.join(SERVER_CERT);
            let names = server_names(&path).map_err(|reason| CertsError::Unreadable {
                path: path.clone(),
                reason,
            })?;
            let missing: Vec<String> = server
                .names
                .iter()
                .filter(|h| !names.iter().any(|n| n.eq_ignore_ascii_case(h)))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(CertsError::MissingHosts {
                    path,
                    hosts: missing,
                });
            }
            return Ok((pki, Outcome::Kept));
        }
        refuse_existing(out_dir, &all)?;
    }
    let now = OffsetDateTime::now_utc();
    // A unique name: two CAs both called "kiam-ca" make a wrong-CA error
    // look like a bad signature.
    let name = format!("kiam-ca-{:08x}", rand::random::<u32>());
    let ca = Ca::generate(
        &name,
        now - BACKDATE,
        now + Duration::days(i64::from(days.max(CA_MIN_DAYS))),
    )?;
    let server = ca.issue(&server)?;
    let agent = ca.issue(&agent)?;
    create_dir(out_dir)?;
    write_file(out_dir, CA_CERT, ca.cert_pem(), 0o644)?;
    write_file(out_dir, CA_KEY, ca.key_pem(), 0o600)?;
    write_leaves(out_dir, &server, &agent)?;
    Ok((pki, Outcome::Wrote))
}

/// What `kiam certs` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new CA and leaves.
    Wrote,
    /// A complete set naming every `--host` was already there.
    Kept,
}

/// The DNS names and IP addresses in a certificate's SAN extension.
pub fn server_names(path: &Path) -> Result<Vec<String>, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|_| "not a PEM certificate".to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for name in san
        .map(|s| s.value.general_names.iter())
        .into_iter()
        .flatten()
    {
        match name {
            x509_parser::extensions::GeneralName::DNSName(n) => names.push(n.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).map(IpAddr::from).ok(),
                    16 => <[u8; 16]>::try_from(*bytes).map(IpAddr::from).ok(),
                    _ => None,
                };
                names.extend(ip.map(|ip| ip.to_string()));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// Issues new server and agent certificates (new keys) from the
/// `ca.pem`/`ca-key.pem` already in `out_dir`, replacing the leaf files.
/// A leaf never outlives the CA.
pub fn reissue(out_dir: &Path, hosts: &[String], days: u32) -> Result<Pki, CertsError> {
    let read = |name: &str| {
        let path = out_dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| CertsError::Reissue {
            path,
            reason: e.to_string(),
        })
    };
    let (cert_pem, key_pem) = (read(CA_CERT)?, read(CA_KEY)?);
    let ca = Ca::from_pem(&cert_pem, &key_pem).map_err(|reason| CertsError::Reissue {
        path: out_dir.join(if reason.contains("key") {
            CA_KEY
        } else {
            CA_CERT
        }),
        reason,
    })?;
    // Keep every name the current server certificate has, add --host's.
    let current = out_dir.join(SERVER_CERT);
    let mut names: Vec<String> = match server_names(&current) {
        Ok(names) => names,
        // No server certificate yet (leaves for a CA made elsewhere): no
        // names given earlier to keep.
        Err(_) if current.symlink_metadata().is_err() => Vec::new(),
        Err(reason) if hosts.is_empty() => {
            return Err(CertsError::UnknownNames {
                path: current,
                reason,
            })
        }
        // The names given are the whole list: nothing earlier to keep.
        Err(_) => Vec::new(),
    };
    names.extend(hosts.iter().cloned());
    let mut server = LeafSpec::server(&names, days)?;
    let mut agent = LeafSpec::agent(days)?;
    server.not_after = server.not_after.min(ca.not_after());
    agent.not_after = agent.not_after.min(ca.not_after());
    if server.not_after <= OffsetDateTime::now_utc() {
        return Err(CertsError::Reissue {
            path: out_dir.join(CA_CERT),
            reason: "the CA has expired".into(),
        });
    }
    let server = ca.issue(&server)?;
    let agent = ca.issue(&agent)?;
    write_leaves(out_dir, &server, &agent)?;
    Ok(Pki {
        dir: out_dir.to_path_buf(),
    })
}

fn write_leaves(dir: &Path, server: &Issued, agent: &Issued) -> Result<(), CertsError> {
    // Key before certificate: a server polling the pair mid-rotation sees
    // a mismatch (and retries) rather than a half-written file.
    write_file(dir, SERVER_KEY, &server.key_pem, 0o600)?;
    write_file(dir, SERVER_CERT, &server.cert_pem, 0o644)?;
    write_file(dir, AGENT_KEY, &agent.key_pem, 0o600)?;
    write_file(dir, AGENT_CERT, &agent.cert_pem, 0o644)?;
    Ok(())
}

fn refuse_existing(dir: &Path, names: &[&str]) -> Result<(), CertsError> {
    for name in names {
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(CertsError::Exists { path });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|e| CertsError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `name` atomically with `mode` (temp file + rename), so the mode
/// holds even when replacing a file that had looser permissions.
fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<(), CertsError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let err = |e: std::io::Error| CertsError::Write {
        path: path.clone(),
        reason: e.to_string(),
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// The `kiam-server-tls` and `kiam-agent-tls` Secrets for the files in
/// `dir`, as two YAML documents (keys named like the files, as kiam's
/// manifests mount them).
pub fn secrets_yaml(dir: &Path, namespace: &str) -> Result<String, CertsError> {
    let secret = |name: &str, files: &[&str]| -> Result<String, CertsError> {
        let mut out = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: Opaque\ndata:\n"
        );
        for f in files {
            let path = dir.join(f);
            let bytes = std::fs::read(&path).map_err(|e| CertsError::Write {
                path,
                reason: e.to_string(),
            })?;
            out.push_str(&format!(
                "  {f}: {}\n",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            ));
        }
        Ok(out)
    };
    Ok(format!(
        "---\n{}---\n{}",
        secret("kiam-server-tls", &[CA_CERT, SERVER_CERT, SERVER_KEY])?,
        secret("kiam-agent-tls", &[CA_CERT, AGENT_CERT, AGENT_KEY])?
    ))
}

/// `kiam certs`. Progress goes to stderr so `--print-secrets` output on
/// stdout can be piped straight into `kubectl apply -f -`.
pub fn run(args: &CertsArgs) -> Result<(), CertsError> {
    let (pki, what) = if args.reissue {
        let pki = reissue(&args.out_dir, &args.hosts, args.days)?;
        (pki, "reissued server and agent certificates")
    } else {
        match write_new(&args.out_dir, &args.hosts, args.days, args.force)? {
            (pki, Outcome::Wrote) => (pki, "wrote a CA, server and agent certificates"),
            (pki, Outcome::Kept) => (
                pki,
                "kept the CA, server and agent certificates already there (they name every --host; \
                 --reissue renews the leaves, --force starts over)",
            ),
        }
    };
    let names = server_names(&pki.path(SERVER_CERT)).unwrap_or_default();
    eprintln!(
        "kiam certs: {what} in {} (server names: {})",
        pki.dir.display(),
        names.join(", ")
    );
    if args.print_secrets {
        print!("{}", secrets_yaml(&pki.dir, &args.namespace)?);
    }
    Ok(())
}
