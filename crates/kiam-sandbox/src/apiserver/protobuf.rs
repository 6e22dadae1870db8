//! Just enough of the Kubernetes protobuf encoding to read a TokenRequest body, because
//! `kubectl create token` (client-go's typed client) sends one in protobuf and nothing
//! else. Answers stay JSON, which such clients also accept.
//!
//! The encoding: the magic `k8s\0`, then a `runtime.Unknown` message whose `raw` field
//! holds the object's own message. Field numbers are those of Kubernetes'
//! `generated.proto` files.

use serde_json::{json, Map, Value};

use super::status::ApiError;

/// `application/vnd.kubernetes.protobuf`.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn bad(what: &str) -> ApiError {
    ApiError::bad_request(format!("error decoding protobuf body: {what}"))
}

fn varint(input: &mut &[u8]) -> Result<u64, ApiError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or_else(|| bad("truncated varint"))?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(bad("varint too long"))
}

/// The fields of one message, in order, as (number, value).
fn fields(mut input: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ApiError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let tag = varint(&mut input)?;
        let field = match tag & 7 {
            0 => Field::Varint(varint(&mut input)?),
            2 => {
                let len = usize::try_from(varint(&mut input)?).map_err(|_| bad("length"))?;
                if len > input.len() {
                    return Err(bad("truncated field"));
                }
                let (bytes, rest) = input.split_at(len);
                input = rest;
                Field::Bytes(bytes)
            }
            1 => {
                let (_, rest) = input.split_at_checked(8).ok_or_else(|| bad("truncated"))?;
                input = rest;
                continue;
            }
            5 => {
                let (_, rest) = input.split_at_checked(4).ok_or_else(|| bad("truncated"))?;
                input = rest;
                continue;
            }
            other => return Err(bad(&format!("unsupported wire type {other}"))),
        };
        out.push((tag >> 3, field));
    }
    Ok(out)
}

fn string(bytes: &[u8]) -> Result<Value, ApiError> {
    std::str::from_utf8(bytes)
        .map(Value::from)
        .map_err(|_| bad("a string is not UTF-8"))
}

/// Reads the string fields `names` (by number) of a message into a JSON map.
fn strings(bytes: &[u8], names: &[(u64, &str)]) -> Result<Map<String, Value>, ApiError> {
    let mut map = Map::new();
    for (number, field) in fields(bytes)? {
        if let (Some((_, name)), Field::Bytes(b)) =
            (names.iter().find(|(n, _)| *n == number), field)
        {
            map.insert((*name).to_string(), string(b)?);
        }
    }
    Ok(map)
}

/// An `authentication.k8s.io/v1` TokenRequest (metadata name and namespace, spec) as JSON.
pub fn decode_token_request(body: &[u8]) -> Result<Value, ApiError> {
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s protobuf prefix"))?;
    let mut raw = None;
    let mut type_meta = Map::new();
    for (number, field) in fields(unknown)? {
        match (number, field) {
            (1, Field::Bytes(b)) => type_meta = strings(b, &[(1, "apiVersion"), (2, "kind")])?,
            (2, Field::Bytes(b)) => raw = Some(b),
            _ => {}
        }
    }
    let mut request = Value::Object(type_meta);
    let mut spec = json!({});
    for (number, field) in fields(raw.ok_or_else(|| bad("no object in the envelope"))?)? {
        match (number, field) {
            (1, Field::Bytes(b)) => {
                request["metadata"] = Value::Object(strings(b, &[(1, "name"), (3, "namespace")])?)
            }
            (2, Field::Bytes(b)) => {
                let mut audiences = Vec::new();
                for (number, field) in fields(b)? {
                    match (number, field) {
                        (1, Field::Bytes(a)) => audiences.push(string(a)?),
                        (3, Field::Bytes(r)) => {
                            spec["boundObjectRef"] = Value::Object(strings(
                                r,
                                &[(1, "kind"), (2, "apiVersion"), (3, "name"), (4, "uid")],
                            )?)
                        }
                        // int64 in two's complement; a negative value stays negative.
                        (4, Field::Varint(v)) => spec["expirationSeconds"] = (v as i64).into(),
                        _ => {}
                    }
                }
                spec["audiences"] = audiences.into();
            }
            _ => {}
        }
    }
    request["spec"] = spec;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn a_kubectl_token_request_decodes() {
        let reference = [
            field(1, b"Pod"),
            field(2, b"v1"),
            field(3, b"web"),
            field(4, b"u-1"),
        ]
        .concat();
        // expirationSeconds 3600 = varint 0x90 0x1c.
        let spec = [
            field(1, b"kiam"),
            field(3, &reference),
            vec![4 << 3, 0x90, 0x1c],
        ]
        .concat();
        let object = [field(1, &field(1, b"default")), field(2, &spec)].concat();
        let type_meta = [
            field(1, b"authentication.k8s.io/v1"),
            field(2, b"TokenRequest"),
        ]
        .concat();
        let body = [
            MAGIC.to_vec(),
            field(1, &type_meta),
            field(2, &object),
            field(3, b""),
            field(4, b""),
        ]
        .concat();
        assert_eq!(
            decode_token_request(&body).unwrap(),
            json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": "default"},
                "spec": {"audiences": ["kiam"], "expirationSeconds": 3600,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": "u-1"}}
            })
        );
        assert_eq!(decode_token_request(b"{}").unwrap_err().code, 400);
        assert_eq!(
            decode_token_request(b"k8s\0\x12\x05ab").unwrap_err().code,
            400
        );
    }
}
