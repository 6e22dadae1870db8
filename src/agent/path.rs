//! Request paths reduced to their meaning, so every routing decision is
//! taken on one spelling.
//!
//! The surprise: percent-decoding is repeated until nothing changes (up to a
//! bound), so `%252e%252e` is `..` here even though no single decode makes
//! it so; an attacker gets no second spelling that the router and the
//! upstream would read differently.

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};

/// A path reduced to its meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded, non-empty segments, with `.` and `..` resolved.
    pub segments: Vec<String>,
    /// Whether the path ends in `/` (which changes the answer, e.g.
    /// `security-credentials` vs `security-credentials/`).
    pub trailing_slash: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("path contains control characters")]
    Control,
    #[error("path is percent-encoded too many times")]
    TooEncoded,
}

/// Characters escaped when a normalised segment is written back into a URL.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

impl NormalPath {
    /// Normalises a raw request path: percent-decoded to a fixpoint, `\`
    /// read as `/`, `;` parameters cut, and empty, `.` and `..` segments
    /// resolved. Control characters and invalid UTF-8 are refused.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let mut bytes = raw.as_bytes().to_vec();
        let mut settled = false;
        for _ in 0..4 {
            let decoded: Vec<u8> = percent_decode(&bytes).collect();
            if decoded == bytes {
                settled = true;
                break;
            }
            bytes = decoded;
        }
        if !settled && percent_decode(&bytes).ne(bytes.iter().copied()) {
            return Err(PathError::TooEncoded);
        }
        let s = String::from_utf8(bytes).map_err(|_| PathError::NotUtf8)?;
        if s.chars().any(char::is_control) {
            return Err(PathError::Control);
        }
        let s = s.replace('\\', "/");
        let mut segments: Vec<String> = Vec::new();
        let mut trailing_slash = false;
        for piece in s.split('/') {
            // `;params` are cut: some servers ignore them, so must we.
            let seg = piece.split(';').next().unwrap_or("");
            trailing_slash = matches!(seg, "" | "." | "..");
            match seg {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(seg.to_string()),
            }
        }
        if segments.is_empty() {
            trailing_slash = true;
        }
        Ok(NormalPath {
            segments,
            trailing_slash,
        })
    }

    /// The decoded path, e.g. `/latest/meta-data/`: what the allow-list sees.
    pub fn decoded(&self) -> String {
        self.render(|s| s.to_string())
    }

    /// The path re-encoded for a URL: what the upstream receives.
    pub fn encoded(&self) -> String {
        self.render(|s| utf8_percent_encode(s, SEGMENT).to_string())
    }

    fn render(&self, f: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            out.push_str(&f(s));
        }
        if self.trailing_slash || self.segments.is_empty() {
            out.push('/');
        }
        out
    }

    /// Whether the path could name IAM or credential data in any spelling:
    /// such paths are answered by the agent and never proxied. Deliberately
    /// blunt: any path whose letters and digits, lowercased, spell `iam` or
    /// `credentials` within a segment (so `/latest/Meta-Data/I%41M`,
    /// `/iam`, `identity-credentials/...` all count). The price is that an
    /// allow-listed tag or path containing those letters is not proxied.
    pub fn is_sensitive(&self) -> bool {
        self.segments.iter().any(|seg| {
            let squashed: String = seg
                .to_lowercase()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect();
            squashed.contains("iam") || squashed.contains("credentials")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        NormalPath::parse(s).unwrap().decoded()
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials/"),
            "/latest/meta-data/iam/security-credentials/"
        );
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials"),
            "/latest/meta-data/iam/security-credentials"
        );
        assert_eq!(
            norm("//latest///meta-data/./iam/x/../security-credentials/"),
            "/latest/meta-data/iam/security-credentials/"
        );
        assert_eq!(
            norm("/latest/meta-data%2Fiam%2fsecurity-credentials"),
            "/latest/meta-data/iam/security-credentials"
        );
        assert_eq!(
            norm("/latest/meta-data/%252e%252e/meta-data/iam/"),
            "/latest/meta-data/iam/"
        );
        assert_eq!(
            norm("/latest/meta-data/iam;x=1/info"),
            "/latest/meta-data/iam/info"
        );
        assert_eq!(norm("/latest\\meta-data\\iam"), "/latest/meta-data/iam");
        assert_eq!(norm("/../../.."), "/");
        assert_eq!(
            norm("/latest/meta-data/iam/security-credentials/.."),
            "/latest/meta-data/iam/"
        );
        assert_eq!(NormalPath::parse("/a%00b"), Err(PathError::Control));
        assert_eq!(NormalPath::parse("/a%ffb"), Err(PathError::NotUtf8));
        assert_eq!(
            NormalPath::parse("/a%2525252525252Fb"),
            Err(PathError::TooEncoded)
        );
    }

    #[test]
    fn sensitive_paths() {
        for p in [
            "/latest/meta-data/iam/",
            "/latest/Meta-Data/IAM/info",
            "/latest/meta_data/iam",
            "/x/meta-data/iamfoo",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/iam%20/security-credentials",
            "/meta-data/iam",
        ] {
            assert!(NormalPath::parse(p).unwrap().is_sensitive(), "{p}");
        }
        for p in [
            "/latest/meta-data/instance-id",
            "/latest/user-data",
            "/latest/meta-data/placement/region",
        ] {
            assert!(!NormalPath::parse(p).unwrap().is_sensitive(), "{p}");
        }
    }

    #[test]
    fn encoded_round_trips() {
        let p = NormalPath::parse("/latest/a%20b/c%3Fd/").unwrap();
        assert_eq!(p.encoded(), "/latest/a%20b/c%3Fd/");
        assert_eq!(NormalPath::parse(&p.encoded()).unwrap(), p);
    }
}
