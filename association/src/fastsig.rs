//! The request-path twin of `Signal::parse` + `Signal::verify`: the same contracts, with a
//! reused scratch buffer for the canonical form and the key id precomputed at configuration
//! load. Property tests pin both to the protocol crate; the offline `verify` uses the protocol
//! crate's functions directly.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signature;
use multihub_protocol::hashing::operation_hex;
use multihub_protocol::signal::{Signal, SignalError, SIGNAL_VERSION};

use crate::config::Key;

/// Same contract as `Signal::parse`: unknown fields, non-canonical bytes and other versions
/// are refused. `scratch` is reused for the canonical form.
pub fn parse(bytes: &[u8], scratch: &mut Vec<u8>) -> Result<Signal, SignalError> {
    let s: Signal =
        serde_json::from_slice(bytes).map_err(|e| SignalError::Malformed(e.to_string()))?;
    s.write_canonical(true, scratch);
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
    s.write_canonical(false, scratch);
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
        fn parse_matches_the_protocol_crate(
            rid in any::<String>(), repr in any::<String>(), provider in any::<String>(),
            boundary in any::<String>(), complete in any::<bool>(),
        ) {
            let (sk, _) = key(3);
            let s = Signal::signed(&rid, &repr, &provider,
                if complete { Stage::Complete } else { Stage::Start }, &boundary, &sk);
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
}
