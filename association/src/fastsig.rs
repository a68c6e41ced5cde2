//! The request-path twin of `Signal::parse` + `Signal::verify`, without the generic RFC 8785
//! canonicalizer: the signal has a fixed set of string fields and one small integer, so its
//! canonical form is written directly (keys in RFC 8785 order, ECMAScript string escaping).
//! Property tests pin it byte-for-byte to the protocol crate; the offline `verify` still uses
//! the protocol crate's own functions.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signature;
use multihub_protocol::hashing::operation_hex;
use multihub_protocol::signal::{Signal, SignalError, SIGNAL_VERSION};

use crate::config::Key;

fn push_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Fast path: nothing to escape (the usual case: ids, hex, base64url).
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0d => out.extend_from_slice(b"\\r"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 15) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// RFC 8785 bytes of `s`, with or without `sig` (keys in sorted order).
pub fn canonical(s: &Signal, with_sig: bool, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"{\"boundary\":");
    push_str(out, &s.boundary);
    out.extend_from_slice(b",\"key_id\":");
    push_str(out, &s.key_id);
    out.extend_from_slice(b",\"operation\":");
    push_str(out, &s.operation);
    out.extend_from_slice(b",\"provider\":");
    push_str(out, &s.provider);
    out.extend_from_slice(b",\"request_id\":");
    push_str(out, &s.request_id);
    out.extend_from_slice(b",\"request_repr\":");
    push_str(out, &s.request_repr);
    if with_sig {
        out.extend_from_slice(b",\"sig\":");
        push_str(out, &s.sig);
    }
    out.extend_from_slice(b",\"stage\":");
    push_str(out, s.stage.as_str());
    out.extend_from_slice(b",\"v\":");
    out.extend_from_slice(s.v.to_string().as_bytes());
    out.push(b'}');
}

/// Same contract as `Signal::parse`: unknown fields, non-canonical bytes and other versions
/// are refused. `scratch` is reused for the canonical form.
pub fn parse(bytes: &[u8], scratch: &mut Vec<u8>) -> Result<Signal, SignalError> {
    let s: Signal =
        serde_json::from_slice(bytes).map_err(|e| SignalError::Malformed(e.to_string()))?;
    canonical(&s, true, scratch);
    if scratch[..] != *bytes {
        return Err(SignalError::NonCanonical);
    }
    if s.v != SIGNAL_VERSION {
        return Err(SignalError::Version(s.v));
    }
    Ok(s)
}

/// Same contract as `Signal::verify`, with the key id precomputed at configuration load.
pub fn verify(s: &Signal, key: &Key, scratch: &mut Vec<u8>) -> Result<(), SignalError> {
    if s.operation != operation_hex(&s.request_id, &s.request_repr) {
        return Err(SignalError::Operation);
    }
    if s.key_id != key.key_id {
        return Err(SignalError::KeyId);
    }
    let mut raw = [0u8; 64];
    match URL_SAFE_NO_PAD.decode_slice(s.sig.as_bytes(), &mut raw) {
        Ok(64) => {}
        _ => return Err(SignalError::SignatureEncoding),
    }
    let sig = Signature::from_bytes(&raw);
    canonical(s, false, scratch);
    key.key
        .verify_strict(scratch, &sig)
        .map_err(|_| SignalError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use multihub_protocol::signal::{key_id, Stage};
    use proptest::prelude::*;

    fn key(n: u8) -> (SigningKey, Key) {
        let sk = SigningKey::from_bytes(&[n; 32]);
        let vk = sk.verifying_key();
        (
            sk,
            Key {
                key: vk,
                key_id: key_id(&vk),
            },
        )
    }

    proptest! {
        #[test]
        fn canonical_matches_the_protocol_crate(
            rid in any::<String>(), repr in any::<String>(), provider in any::<String>(),
            boundary in any::<String>(), sig in any::<String>(), complete in any::<bool>(),
            v in any::<u32>(),
        ) {
            let (sk, _) = key(3);
            let mut s = Signal::signed(&rid, &repr, &provider,
                if complete { Stage::Complete } else { Stage::Start }, &boundary, &sk);
            s.sig = sig;
            s.v = v;
            let mut out = Vec::new();
            canonical(&s, true, &mut out);
            prop_assert_eq!(&out, &s.to_bytes());
            canonical(&s, false, &mut out);
            prop_assert_eq!(&out, &s.signing_bytes());
            let mut scratch = Vec::new();
            prop_assert_eq!(parse(&s.to_bytes(), &mut scratch), Signal::parse(&s.to_bytes()));
        }

        #[test]
        fn parse_agrees_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut scratch = Vec::new();
            prop_assert_eq!(parse(&bytes, &mut scratch).is_ok(), Signal::parse(&bytes).is_ok());
        }

        #[test]
        fn verify_agrees(flip in 0usize..8, rid in "[a-z0-9]{1,12}") {
            let (sk, k) = key(5);
            let mut s = Signal::signed(&rid, "sha256=00", "p", Stage::Start, "b", &sk);
            match flip {
                0 => {}
                1 => s.boundary.push('x'),
                2 => s.request_id.push('x'),
                3 => s.sig.truncate(20),
                4 => s.sig = format!("{}A", &s.sig[..85]),
                5 => s.key_id = "00".into(),
                6 => s.operation = s.operation.to_uppercase(),
                _ => s.sig = "!".repeat(86),
            }
            let mut scratch = Vec::new();
            prop_assert_eq!(verify(&s, &k, &mut scratch), s.verify(&k.key));
        }
    }

    #[test]
    fn escapes_like_rfc8785() {
        let (sk, _) = key(1);
        let s = Signal::signed(
            "a\"\\\u{1}\u{7f}\u{2028}é\n",
            "r",
            "p",
            Stage::Start,
            "\t\u{8}\u{c}\r",
            &sk,
        );
        let mut out = Vec::new();
        canonical(&s, true, &mut out);
        assert_eq!(out, s.to_bytes());
    }
}
