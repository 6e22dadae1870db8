//! Compact JWS (RFC 7515) signing and verification with one ES256 key, that key as a JWK
//! (RFC 7517), and the forged tokens (unsigned, tampered, signed by a stranger) that tests
//! hand to verifiers.
//!
//! The key is a P-256 key made when the server starts, so tokens are ES256 where a real
//! API server most often signs RS256 with the RSA key of `--service-account-key-file`
//! (it takes ECDSA keys there too, and then signs ES256 exactly like this). The key id
//! is derived the way the real server derives it, so it is stable for a key and says
//! nothing else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde_json::{json, Value};

/// The only algorithm this server signs with and accepts.
pub const ALGORITHM: &str = "ES256";

/// The DER prefix of a P-256 `SubjectPublicKeyInfo` (RFC 5480) ahead of the 65-byte
/// uncompressed point: what Go's `x509.MarshalPKIXPublicKey` writes for such a key.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why a token did not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON: go-jose fails to parse it.
    #[error("the token is not a compact JWS")]
    Malformed,
    /// `alg` other than ES256 (`none` included): go-jose refuses to parse it.
    #[error("unexpected signature algorithm {0:?}; expected [\"ES256\"]")]
    Algorithm(String),
    /// The signature does not verify with the key (this is go-jose's message).
    #[error("go-jose/go-jose: error in cryptographic primitive")]
    Signature,
}

/// base64url without padding, as JWS uses.
pub fn encode_segment(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_json(segment: &str) -> Result<Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Malformed)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    value
        .is_object()
        .then_some(value)
        .ok_or(JwtError::Malformed)
}

/// The header and claims of a compact JWS, without checking the signature.
pub fn decode_unverified(token: &str) -> Result<(Value, Value), JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    Ok((decode_json(header)?, decode_json(claims)?))
}

/// `header.claims.` with an empty signature, for tests that hand out unsigned tokens.
pub fn encode_unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        encode_segment(header.to_string().as_bytes()),
        encode_segment(claims.to_string().as_bytes())
    )
}

/// An ES256 signing key and its id.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl SigningKey {
    /// A fresh P-256 key.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .expect("the system random source can make a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .expect("a freshly generated PKCS#8 document parses");
        let kid = key_id(pair.public_key().as_ref());
        SigningKey { pair, kid, rng }
    }

    /// The `kid`: base64url of the SHA-256 of the key's DER `SubjectPublicKeyInfo`, as the
    /// real server computes it.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A compact JWS of `claims`, with `{"alg":"ES256","kid":...}` as its header (no `typ`,
    /// like the real server's tokens).
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": ALGORITHM, "kid": self.kid});
        let input = format!(
            "{}.{}",
            encode_segment(header.to_string().as_bytes()),
            encode_segment(claims.to_string().as_bytes())
        );
        let signature = self
            .pair
            .sign(&self.rng, input.as_bytes())
            .expect("ECDSA signing with the system random source succeeds");
        format!("{input}.{}", encode_segment(signature.as_ref()))
    }

    /// Checks the header's algorithm and the signature; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Value, JwtError> {
        let (header, claims) = decode_unverified(token)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != ALGORITHM {
            return Err(JwtError::Algorithm(alg.to_string()));
        }
        let (input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| JwtError::Malformed)?;
        UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.pair.public_key().as_ref(),
        )
        .verify(input.as_bytes(), &signature)
        .map_err(|_| JwtError::Signature)?;
        Ok(claims)
    }

    /// The public key as a JWK, as the real server publishes it in its JWKS.
    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04, then x and y (32 bytes each).
        json!({
            "use": "sig",
            "kty": "EC",
            "kid": self.kid,
            "crv": "P-256",
            "alg": ALGORITHM,
            "x": encode_segment(&point[1..33]),
            "y": encode_segment(&point[33..65]),
        })
    }
}

fn key_id(uncompressed_point: &[u8]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(uncompressed_point);
    encode_segment(ring::digest::digest(&ring::digest::SHA256, &der).as_ref())
}

// ---- Forgeries, for tests of what a verifier refuses ----

/// The claims of a token, without checking its signature (what `jwt.io` shows).
pub fn token_claims(token: &str) -> Option<Value> {
    decode_unverified(token).ok().map(|(_, claims)| claims)
}

/// The same claims with `alg: none` and no signature: what a forger without the key
/// hands in.
pub fn unsigned_token(token: &str) -> String {
    let claims = token_claims(token).unwrap_or_else(|| json!({}));
    encode_unsigned(&json!({"alg": "none"}), &claims)
}

/// The token with its claims changed by `change` and its header and signature kept:
/// a signature that no longer verifies.
pub fn tampered_token(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let mut claims = token_claims(token).unwrap_or_else(|| json!({}));
    change(&mut claims);
    let mut parts = token.splitn(3, '.');
    let header = parts.next().unwrap_or("");
    let _ = parts.next();
    let signature = parts.next().unwrap_or("");
    format!(
        "{header}.{}.{signature}",
        encode_segment(claims.to_string().as_bytes())
    )
}

/// `claims` signed ES256 by a key no API server knows, with that key's id.
pub fn foreign_signed_token(claims: &Value) -> String {
    SigningKey::generate().sign(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_and_changed_ones_do_not() {
        let key = SigningKey::generate();
        let token = key.sign(&json!({"sub": "a"}));
        assert_eq!(key.verify(&token).unwrap(), json!({"sub": "a"}));
        let (header, _) = decode_unverified(&token).unwrap();
        assert_eq!(header, json!({"alg": "ES256", "kid": key.kid()}));

        let (head, rest) = token.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let other = encode_segment(json!({"sub": "b"}).to_string().as_bytes());
        let tampered = format!("{head}.{other}.{signature}");
        assert_eq!(key.verify(&tampered), Err(JwtError::Signature));
        assert_eq!(
            SigningKey::generate().verify(&token),
            Err(JwtError::Signature)
        );
        let unsigned = encode_unsigned(&json!({"alg": "none"}), &json!({"sub": "a"}));
        assert_eq!(
            key.verify(&unsigned),
            Err(JwtError::Algorithm("none".into()))
        );
        assert_eq!(key.verify("a.b"), Err(JwtError::Malformed));
    }

    #[test]
    fn the_key_id_hashes_the_der_public_key() {
        let key = SigningKey::generate();
        // 32 bytes of SHA-256 in unpadded base64url.
        assert_eq!(key.kid().len(), 43);
        assert_eq!(key.jwk()["kid"], key.kid());
        let jwk = key.jwk();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let mut point = vec![4];
        point.extend(x);
        point.extend(y);
        assert_eq!(point, key.pair.public_key().as_ref());
        assert_eq!(key_id(&point), key.kid());
    }
}
