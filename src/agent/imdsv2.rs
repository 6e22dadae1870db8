//! IMDSv2 session tokens, minted and checked by the agent itself.
//!
//! The surprise: there is no token table. A token is its expiry plus an
//! HMAC over (caller IP, expiry) under a key drawn at start-up, so memory
//! does not grow with callers, a token is useless from another pod's IP, and
//! every token dies with the process (clients then get 401 and fetch a new
//! one, as they do when EC2's metadata service restarts).
//!
//! A token is not an identity and needs no revoking when an IP changes
//! hands: it only proves its bearer did a PUT from that IP. Who is asking
//! is always the connection's source address, so a token the old pod got
//! authorises nothing the new pod at that IP could not get by a PUT of its
//! own — the new pod's role, never the old one's.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::SystemRandom;

/// The request header carrying the TTL on PUT (and echoed in the answer).
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The request header carrying the token on GETs.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// EC2's bounds for the TTL, in seconds.
pub const MAX_TTL: u64 = 21_600;

/// Why a PUT or a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing or invalid {TTL_HEADER} (1..=21600)")]
    BadTtl,
    #[error("token is malformed, was minted for another caller, or has expired")]
    Invalid,
}

/// Mints and verifies tokens.
pub struct Tokens {
    key: hmac::Key,
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokens {
    pub fn new() -> Self {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system random generator works");
        Tokens { key }
    }

    /// Parses the TTL header value as EC2 does: an integer in 1..=21600.
    pub fn parse_ttl(value: Option<&[u8]>) -> Result<u64, TokenError> {
        let s = std::str::from_utf8(value.ok_or(TokenError::BadTtl)?)
            .map_err(|_| TokenError::BadTtl)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TokenError::BadTtl);
        }
        match s.parse::<u64>() {
            Ok(ttl) if (1..=MAX_TTL).contains(&ttl) => Ok(ttl),
            _ => Err(TokenError::BadTtl),
        }
    }

    /// A token for `caller`, valid for `ttl`.
    pub fn mint(&self, caller: IpAddr, ttl: Duration) -> String {
        let expiry = now_secs() + ttl.as_secs();
        let tag = hmac::sign(&self.key, &message(caller, expiry));
        format!("{expiry:x}.{}", hex(tag.as_ref()))
    }

    /// Checks that `token` was minted here, for `caller`, and is unexpired.
    pub fn verify(&self, caller: IpAddr, token: &[u8]) -> Result<(), TokenError> {
        let token = std::str::from_utf8(token).map_err(|_| TokenError::Invalid)?;
        let (expiry, tag) = token.split_once('.').ok_or(TokenError::Invalid)?;
        if expiry.is_empty() || expiry.len() > 16 {
            return Err(TokenError::Invalid);
        }
        let expiry = u64::from_str_radix(expiry, 16).map_err(|_| TokenError::Invalid)?;
        let tag = unhex(tag).ok_or(TokenError::Invalid)?;
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, &message(caller, expiry), &tag).map_err(|_| TokenError::Invalid)?;
        if expiry <= now_secs() {
            return Err(TokenError::Invalid);
        }
        Ok(())
    }
}

/// What a token's MAC covers. The address is canonical, so an IPv4 caller
/// reaching an IPv6 socket (`::ffff:198.18.0.5`) is the same caller as over
/// IPv4; an IPv6 caller is bound to its full address.
fn message(caller: IpAddr, expiry: u64) -> Vec<u8> {
    let caller = caller.to_canonical();
    format!("kiam-imdsv2|{caller}|{expiry}").into_bytes()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert_eq!(Tokens::parse_ttl(Some(b"1")), Ok(1));
        assert_eq!(Tokens::parse_ttl(Some(b"21600")), Ok(21600));
        for bad in [
            &b"0"[..],
            b"21601",
            b"-1",
            b"abc",
            b"",
            b" 5",
            b"1.5",
            b"99999999999999999999999",
        ] {
            assert_eq!(
                Tokens::parse_ttl(Some(bad)),
                Err(TokenError::BadTtl),
                "{bad:?}"
            );
        }
        assert_eq!(Tokens::parse_ttl(None), Err(TokenError::BadTtl));
    }

    #[test]
    fn tokens_are_bound_to_caller_and_key() {
        let t = Tokens::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let tok = t.mint(a, Duration::from_secs(60));
        assert_eq!(t.verify(a, tok.as_bytes()), Ok(()));
        assert_eq!(t.verify(b, tok.as_bytes()), Err(TokenError::Invalid));
        assert_eq!(
            Tokens::new().verify(a, tok.as_bytes()),
            Err(TokenError::Invalid)
        );
        // Tampering with the expiry breaks the MAC.
        let (_, tag) = tok.split_once('.').unwrap();
        let forged = format!("{:x}.{tag}", now_secs() + 99_999);
        assert_eq!(t.verify(a, forged.as_bytes()), Err(TokenError::Invalid));
        assert_eq!(t.verify(a, b"garbage"), Err(TokenError::Invalid));
        assert_eq!(t.verify(a, b"."), Err(TokenError::Invalid));
    }

    #[test]
    fn tokens_are_bound_to_ipv6_callers() {
        let t = Tokens::new();
        let a: IpAddr = "2001:2::1".parse().unwrap();
        let tok = t.mint(a, Duration::from_secs(60));
        assert_eq!(t.verify(a, tok.as_bytes()), Ok(()));
        // Another IPv6 address, even in the same /64, or the IPv4 address of
        // the same dual-stack pod, is another caller.
        for other in ["2001:2::2", "2001:2::1:1", "198.18.0.1", "::"] {
            let other: IpAddr = other.parse().unwrap();
            assert_eq!(
                t.verify(other, tok.as_bytes()),
                Err(TokenError::Invalid),
                "{other}"
            );
        }
        // An IPv4 caller seen as v4-mapped IPv6 is the same caller.
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        let tok = t.mint(v4, Duration::from_secs(60));
        assert_eq!(t.verify(mapped, tok.as_bytes()), Ok(()));
    }

    #[test]
    fn expired_tokens_fail() {
        let t = Tokens::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let expiry = now_secs() - 1;
        let tag = hmac::sign(&t.key, &message(a, expiry));
        let tok = format!("{expiry:x}.{}", hex(tag.as_ref()));
        assert_eq!(t.verify(a, tok.as_bytes()), Err(TokenError::Invalid));
    }
}
