//! `--server-address`: which kiam servers to ask, and how a name becomes
//! addresses.
//!
//! The surprise: a name is kept as a name after it is resolved. Every
//! address it resolves to is a pool member, and each is verified against
//! the *name* as the TLS server name, not against its IP; the name is
//! re-resolved periodically so the pool follows server scale-out and
//! scale-in.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use futures::future::BoxFuture;

/// One entry of `--server-address`: the name is also the TLS server name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("--server-address is empty")]
    Empty,
    #[error("--server-address entry {0:?} must be host:port")]
    Malformed(String),
}

/// Parses `--server-address`: `host:port`, `[v6]:port`, a comma-separated
/// list of those, each optionally prefixed with gRPC's `dns:///`.
pub fn parse_server_address(s: &str) -> Result<Vec<Target>, AddressError> {
    let mut out = Vec::new();
    for raw in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let entry = raw
            .strip_prefix("dns:///")
            .or_else(|| {
                // dns://resolver/host:port: the resolver part is ignored.
                raw.strip_prefix("dns://")
                    .and_then(|r| r.split_once('/').map(|(_, h)| h))
            })
            .unwrap_or(raw);
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| AddressError::Malformed(raw.to_string()))?;
            (h, p)
        } else {
            entry
                .rsplit_once(':')
                .ok_or_else(|| AddressError::Malformed(raw.to_string()))?
        };
        let port: u16 = port
            .parse()
            .map_err(|_| AddressError::Malformed(raw.to_string()))?;
        if host.is_empty()
            || host.contains(['/', ' '])
            || (host.contains(':') && !entry.starts_with('['))
        {
            return Err(AddressError::Malformed(raw.to_string()));
        }
        let t = Target {
            host: host.to_string(),
            port,
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(AddressError::Empty);
    }
    Ok(out)
}

/// Turns a name into addresses. A trait so tests can simulate servers
/// coming and going behind one name.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, target: &'a Target)
        -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo` through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            if let Ok(ip) = target.host.parse::<IpAddr>() {
                return Ok(vec![SocketAddr::new(ip, target.port)]);
            }
            let addrs = tokio::net::lookup_host((target.host.as_str(), target.port)).await?;
            Ok(addrs.collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_address_forms() {
        let t = |h: &str, p| Target {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse_server_address("localhost:9610").unwrap(),
            vec![t("localhost", 9610)]
        );
        assert_eq!(
            parse_server_address("dns:///kiam-server:443").unwrap(),
            vec![t("kiam-server", 443)]
        );
        assert_eq!(
            parse_server_address("a:1, b:2,a:1").unwrap(),
            vec![t("a", 1), t("b", 2)]
        );
        assert_eq!(
            parse_server_address("[::1]:9610").unwrap(),
            vec![t("::1", 9610)]
        );
        assert!(parse_server_address("kiam-server").is_err());
        assert!(parse_server_address("").is_err());
        assert!(parse_server_address("a:notaport").is_err());
        assert!(parse_server_address("::1:9610").is_err());
    }
}
