//! Boundary signals (DESIGN §6): the signed START / COMPLETE records a provider sends to the
//! association, their canonical (RFC 8785) encoding, signing and verification, and the linkage.
//!
//! A signal travels as its own canonical bytes, `sig` included; the signature covers the
//! canonical bytes of the same object without `sig`. Anyone holding the bytes can re-verify.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint, VartimeEdwardsPrecomputation};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{
    IsIdentity, VartimeMultiscalarMul, VartimePrecomputedMultiscalarMul,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use std::io::Write as _;
use thiserror::Error;

use crate::hashing::{hex_into, operation_hex};

/// Signal format version.
pub const SIGNAL_VERSION: u32 = 1;

/// Boundary stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    #[serde(rename = "START")]
    Start,
    #[serde(rename = "COMPLETE")]
    Complete,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Start => "START",
            Stage::Complete => "COMPLETE",
        }
    }
}

/// Why a signal was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("malformed signal: {0}")]
    Malformed(String),
    #[error("signal bytes are not RFC 8785 canonical JSON")]
    NonCanonical,
    #[error("unsupported signal version {0}")]
    Version(u32),
    #[error("operation does not equal sha256(\"multihub-op-v1\\n\" + request_id + \"\\n\" + request_repr)")]
    Operation,
    #[error("key_id does not match the verifying key")]
    KeyId,
    #[error("signature is not valid base64url of 64 bytes")]
    SignatureEncoding,
    #[error("signature does not verify")]
    BadSignature,
}

/// A boundary signal. Field order here is irrelevant: the wire form is canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    pub v: u32,
    pub operation: String,
    pub request_id: String,
    pub request_repr: String,
    pub provider: String,
    pub stage: Stage,
    pub boundary: String,
    pub key_id: String,
    pub sig: String,
}

/// Appends `s` as an RFC 8785 string: ECMAScript `JSON.stringify` escaping (`"`, `\\`, the
/// short escapes \b \t \n \f \r, other controls as `\u00xx`, everything else verbatim).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
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

/// `key_id`: hex sha256 of the 32 public-key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let mut s = String::with_capacity(64);
    hex_into(&mut s, &Sha256::digest(key.as_bytes()));
    s
}

impl Signal {
    /// Builds and signs a signal; `operation` is computed from `request_id` and `request_repr`.
    pub fn signed(
        request_id: &str,
        request_repr: &str,
        provider: &str,
        stage: Stage,
        boundary: &str,
        key: &SigningKey,
    ) -> Signal {
        let kid = key_id(&key.verifying_key());
        Self::signed_with_key_id(
            request_id,
            request_repr,
            provider,
            stage,
            boundary,
            key,
            &kid,
        )
    }

    /// [`Signal::signed`] for a signer that already holds its key id (`key_id(&verifying key)`),
    /// sparing a sha256 per signature.
    pub fn signed_with_key_id(
        request_id: &str,
        request_repr: &str,
        provider: &str,
        stage: Stage,
        boundary: &str,
        key: &SigningKey,
        key_id: &str,
    ) -> Signal {
        let mut s = Signal {
            v: SIGNAL_VERSION,
            operation: operation_hex(request_id, request_repr),
            request_id: request_id.to_string(),
            request_repr: request_repr.to_string(),
            provider: provider.to_string(),
            stage,
            boundary: boundary.to_string(),
            key_id: key_id.to_string(),
            sig: String::new(),
        };
        let sig = key.sign(&s.signing_bytes());
        s.sig = URL_SAFE_NO_PAD.encode(sig.to_bytes());
        s
    }

    /// Writes the RFC 8785 form of the signal into `out` (cleared first), with or without
    /// `sig`. The signal has a fixed set of string fields and one small integer, so the
    /// canonical form is written directly, keys in sorted order; a property test pins it
    /// byte-for-byte to a generic RFC 8785 canonicalizer (`serde_json_canonicalizer`).
    pub fn write_canonical(&self, with_sig: bool, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(b"{\"boundary\":");
        push_json_str(out, &self.boundary);
        out.extend_from_slice(b",\"key_id\":");
        push_json_str(out, &self.key_id);
        out.extend_from_slice(b",\"operation\":");
        push_json_str(out, &self.operation);
        out.extend_from_slice(b",\"provider\":");
        push_json_str(out, &self.provider);
        out.extend_from_slice(b",\"request_id\":");
        push_json_str(out, &self.request_id);
        out.extend_from_slice(b",\"request_repr\":");
        push_json_str(out, &self.request_repr);
        if with_sig {
            out.extend_from_slice(b",\"sig\":");
            push_json_str(out, &self.sig);
        }
        out.extend_from_slice(b",\"stage\":");
        push_json_str(out, self.stage.as_str());
        out.extend_from_slice(b",\"v\":");
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{}", self.v);
        out.push(b'}');
    }

    /// The bytes the signature covers: RFC 8785 JSON of the signal without `sig`.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(400);
        self.write_canonical(false, &mut out);
        out
    }

    /// The wire form: RFC 8785 JSON of the whole signal.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(500);
        self.write_canonical(true, &mut out);
        out
    }

    /// Parses wire bytes, refusing unknown fields and anything that is not canonical.
    pub fn parse(bytes: &[u8]) -> Result<Signal, SignalError> {
        Self::parse_with(bytes, &mut Vec::new())
    }

    /// [`Signal::parse`] with a caller-owned buffer for the canonical form (reused across
    /// requests; it is overwritten).
    pub fn parse_with(bytes: &[u8], scratch: &mut Vec<u8>) -> Result<Signal, SignalError> {
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

    /// Checks the operation formula, the key id and the signature (`verify_strict`).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), SignalError> {
        if self.operation != operation_hex(&self.request_id, &self.request_repr) {
            return Err(SignalError::Operation);
        }
        if self.key_id != key_id(key) {
            return Err(SignalError::KeyId);
        }
        let raw = decode_signature(&self.sig).ok_or(SignalError::SignatureEncoding)?;
        key.verify_strict(&self.signing_bytes(), &Signature::from_bytes(&raw))
            .map_err(|_| SignalError::BadSignature)
    }
}

/// Decodes a base64url (no padding) ed25519 signature; `None` unless it is exactly 64 bytes.
pub fn decode_signature(sig: &str) -> Option<[u8; 64]> {
    let mut raw = [0u8; 64];
    match URL_SAFE_NO_PAD.decode_slice(sig.as_bytes(), &mut raw) {
        Ok(64) => Some(raw),
        _ => None,
    }
}

/// A registered verifying key prepared for the request path: the key id is computed once and
/// `[s]B - [k]A` uses tables precomputed for `B` and `-A`.
///
/// [`SignalVerifier::verify_with`] accepts exactly what [`Signal::verify`] (`verify_strict`)
/// accepts. `verify_strict` decodes `R`, refuses `R` or `A` of small order, and compares the
/// encoding of `R' = [s]B - [k]A` with the bytes of `R`. Here `R` is not decoded: the encoding of
/// a point is canonical and decodes back to that point, so `encode(R') == R bytes` already
/// implies that `R` decodes and equals `R'`, and `R'` of small order is refused instead of `R`.
/// That saves a field square root per signature; the tables save the per-signature table build
/// and a third of the point additions. A property test pins the two against each other, on
/// valid, tampered, non-canonical-`s` and mixed-order-`R` signatures.
#[derive(Clone)]
pub struct SignalVerifier {
    key: VerifyingKey,
    key_id: String,
    /// `[B, -A]`.
    tables: std::sync::Arc<VartimeEdwardsPrecomputation>,
    /// `A` is of small order: `verify_strict` refuses every signature under it.
    weak: bool,
}

impl std::fmt::Debug for SignalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalVerifier")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SignalVerifier {
    pub fn new(key: VerifyingKey) -> SignalVerifier {
        let minus_a = -key.to_edwards();
        SignalVerifier {
            key_id: key_id(&key),
            tables: std::sync::Arc::new(VartimeEdwardsPrecomputation::new([
                ED25519_BASEPOINT_POINT,
                minus_a,
            ])),
            weak: key.is_weak(),
            key,
        }
    }

    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// True for a key of small order, under which no signature verifies.
    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// Same contract as [`Signal::verify`]; `scratch` is reused for the signed bytes.
    pub fn verify_with(&self, s: &Signal, scratch: &mut Vec<u8>) -> Result<(), SignalError> {
        let raw = self.prepare(s, scratch)?;
        if self.verifies(&raw, scratch) {
            Ok(())
        } else {
            Err(SignalError::BadSignature)
        }
    }

    /// The checks of [`SignalVerifier::verify_with`] before the signature itself (operation
    /// formula, key id, signature encoding); writes the signed bytes into `scratch` and returns
    /// the raw signature for [`SignalVerifier::verifies`] or [`verify_batch`].
    pub fn prepare(&self, s: &Signal, scratch: &mut Vec<u8>) -> Result<[u8; 64], SignalError> {
        if s.operation != operation_hex(&s.request_id, &s.request_repr) {
            return Err(SignalError::Operation);
        }
        if s.key_id != self.key_id {
            return Err(SignalError::KeyId);
        }
        let raw = decode_signature(&s.sig).ok_or(SignalError::SignatureEncoding)?;
        s.write_canonical(false, scratch);
        Ok(raw)
    }

    /// `verify_strict` of `sig` over `message` (see the type).
    pub fn verifies(&self, sig: &[u8; 64], message: &[u8]) -> bool {
        let Some((r, s)) = split_signature(sig) else {
            return false;
        };
        if self.weak {
            return false;
        }
        let k = challenge(&r, &self.key, message);
        let expected = self.tables.vartime_multiscalar_mul([s, k]);
        !expected.is_small_order() && *expected.compress().as_bytes() == r
    }
}

/// The `R` bytes and the scalar `s` of a signature; `None` unless `s` is reduced
/// (`verify_strict` refuses a non-canonical scalar).
fn split_signature(sig: &[u8; 64]) -> Option<([u8; 32], Scalar)> {
    let mut r = [0u8; 32];
    let mut s = [0u8; 32];
    r.copy_from_slice(&sig[..32]);
    s.copy_from_slice(&sig[32..]);
    Option::from(Scalar::from_canonical_bytes(s)).map(|s| (r, s))
}

/// `k = H(R || A || M)` of an ed25519 signature.
fn challenge(r: &[u8], a: &VerifyingKey, message: &[u8]) -> Scalar {
    let mut h = Sha512::new();
    h.update(r);
    h.update(a.as_bytes());
    h.update(message);
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// True when a 32-byte point encoding has its `y` reduced (below 2^255 - 19).
fn canonical_y(bytes: &[u8; 32]) -> bool {
    !(bytes[31] & 0x7f == 0x7f && bytes[1..31].iter().all(|&b| b == 0xff) && bytes[0] >= 0xed)
}

/// Batch verification of `(key, signature, signed bytes)` triples, for the association's opt-in
/// `"signature_check": "batch"`. It is **not** `verify_strict`'s contract, and it is meant as a
/// filter: on `false`, check each signature with [`SignalVerifier::verifies`] to find the bad
/// ones.
///
/// Each signature gets the same per-signature checks as `verify_strict`: `s` reduced, `R` a
/// canonical encoding that decodes, neither `R` nor `A` of small order. Then one equation
/// `sum z_i ([s_i]B - [k_i]A_i - R_i) = 0` is checked, with independent random 128-bit `z_i`
/// drawn from `rng`. A forged or altered signature passes with probability about 2^-128.
///
/// The difference from `verify_strict`: `R_i` may carry a small torsion component that a
/// random `z_i` happens to cancel. That holds with probability up to 1/2 per attempt, and only
/// for a signature made by the holder of the key on purpose (a torsion point added to its
/// nonce point). Such a signal is authentic, but `verify_strict` (the offline `verify`) rejects
/// it.
pub fn verify_batch<R: rand::RngCore + rand::CryptoRng>(
    items: &[(&SignalVerifier, &[u8; 64], &[u8])],
    rng: &mut R,
) -> bool {
    let mut scalars = Vec::with_capacity(items.len() + 3);
    let mut points = Vec::with_capacity(items.len() + 3);
    let mut at_b = Scalar::ZERO;
    let mut per_key: Vec<(&SignalVerifier, Scalar)> = Vec::new();
    for (v, sig, message) in items {
        let Some((r_bytes, s)) = split_signature(sig) else {
            return false;
        };
        if v.weak || !canonical_y(&r_bytes) {
            return false;
        }
        let Some(r) = CompressedEdwardsY(r_bytes).decompress() else {
            return false;
        };
        if r.is_small_order() {
            return false;
        }
        let mut wide = [0u8; 32];
        rng.fill_bytes(&mut wide[..16]);
        let z = Scalar::from_bytes_mod_order(wide);
        let k = challenge(&r_bytes, &v.key, message);
        at_b += z * s;
        match per_key.iter_mut().find(|(k2, _)| std::ptr::eq(*k2, *v)) {
            Some((_, sum)) => *sum += z * k,
            None => per_key.push((v, z * k)),
        }
        scalars.push(-z);
        points.push(r);
    }
    scalars.push(at_b);
    points.push(ED25519_BASEPOINT_POINT);
    for (v, sum) in per_key {
        scalars.push(-sum);
        points.push(v.key.to_edwards());
    }
    EdwardsPoint::vartime_multiscalar_mul(&scalars, &points).is_identity()
}

/// DESIGN §6 linkage: hex sha256 over, for each (provider, stage) in sorted order,
/// `provider 0x00 stage 0x00 sha256(signal bytes) 0x0A`. Order of the input does not matter.
pub fn linkage<'a>(signals: impl IntoIterator<Item = (&'a str, Stage, &'a [u8])>) -> String {
    let digests: Vec<(&str, Stage, [u8; 32])> = signals
        .into_iter()
        .map(|(p, s, b)| (p, s, Sha256::digest(b).into()))
        .collect();
    linkage_from_digests(digests.iter().map(|(p, s, d)| (*p, *s, d)))
}

/// [`linkage`] from the `sha256(signal bytes)` digests (for holders of the digests, such as the
/// association's in-memory state).
pub fn linkage_from_digests<'a>(
    entries: impl IntoIterator<Item = (&'a str, Stage, &'a [u8; 32])>,
) -> String {
    let mut v: Vec<(&str, &str, &[u8; 32])> = entries
        .into_iter()
        .map(|(p, s, d)| (p, s.as_str(), d))
        .collect();
    v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut h = Sha256::new();
    for (provider, stage, digest) in v {
        h.update(provider.as_bytes());
        h.update([0u8]);
        h.update(stage.as_bytes());
        h.update([0u8]);
        h.update(digest);
        h.update([b'\n']);
    }
    let mut s = String::with_capacity(64);
    hex_into(&mut s, &h.finalize());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::repr_of;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn sample() -> Signal {
        Signal::signed(
            "req-1",
            repr_of(b"{}").as_str(),
            "provider-a",
            Stage::Start,
            "b0",
            &key(1),
        )
    }

    #[test]
    fn round_trip_and_verify() {
        let s = sample();
        let bytes = s.to_bytes();
        let back = Signal::parse(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
        assert_eq!(back.verify(&key(1).verifying_key()), Ok(()));
        // Keys of the canonical form are sorted.
        let text = String::from_utf8(bytes).unwrap_or_default();
        assert!(text.starts_with(r#"{"boundary":"b0","key_id":"#), "{text}");
    }

    #[test]
    fn tampering_is_detected() {
        let vk = key(1).verifying_key();
        let mut s = sample();
        s.boundary = "b1".into();
        assert_eq!(s.verify(&vk), Err(SignalError::BadSignature));
        let mut s = sample();
        s.request_id = "req-2".into();
        assert_eq!(s.verify(&vk), Err(SignalError::Operation));
        let s = sample();
        assert_eq!(s.verify(&key(2).verifying_key()), Err(SignalError::KeyId));
        // Another provider's valid signature under this key id: refused.
        let mut other = Signal::signed(
            "req-1",
            &s.request_repr,
            "provider-a",
            Stage::Start,
            "b0",
            &key(2),
        );
        other.key_id = s.key_id.clone();
        assert_eq!(other.verify(&vk), Err(SignalError::BadSignature));
        let mut s = sample();
        s.sig = "!!".into();
        assert_eq!(s.verify(&vk), Err(SignalError::SignatureEncoding));
    }

    #[test]
    fn linkage_from_digests_matches_linkage_over_bytes() {
        let a = b"signal-a".to_vec();
        let b = b"signal-b".to_vec();
        let want = linkage([
            ("p2", Stage::Start, &a[..]),
            ("p1", Stage::Complete, &b[..]),
        ]);
        let got = linkage_from_digests([
            ("p1", Stage::Complete, &Sha256::digest(&b).into()),
            ("p2", Stage::Start, &Sha256::digest(&a).into()),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn escapes_like_rfc8785() {
        let s = Signal::signed(
            "a\"\\\u{1}\u{7f}\u{2028}é\n",
            "r",
            "p",
            Stage::Start,
            "\t\u{8}\u{c}\r",
            &key(1),
        );
        assert_eq!(
            s.to_bytes(),
            serde_json_canonicalizer::to_vec(&s).unwrap_or_default()
        );
        let text = String::from_utf8(s.to_bytes()).unwrap_or_default();
        assert!(text.contains(r#""boundary":"\t\b\f\r""#), "{text}");
        assert!(text.contains("\\u0001\u{7f}\u{2028}é\\n"), "{text}");
    }

    #[test]
    fn non_canonical_and_unknown_fields_are_refused() {
        let bytes = sample().to_bytes();
        let mut spaced = b" ".to_vec();
        spaced.extend_from_slice(&bytes);
        assert_eq!(Signal::parse(&spaced), Err(SignalError::NonCanonical));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let pretty = serde_json::to_vec_pretty(&v).unwrap_or_default();
        assert_eq!(Signal::parse(&pretty), Err(SignalError::NonCanonical));
        let mut extra = v.clone();
        extra["x"] = serde_json::json!(1);
        let extra = serde_json_canonicalizer::to_vec(&extra).unwrap_or_default();
        assert!(matches!(
            Signal::parse(&extra),
            Err(SignalError::Malformed(_))
        ));
        assert!(matches!(
            Signal::parse(&bytes[..bytes.len() - 1]),
            Err(SignalError::Malformed(_))
        ));
    }

    #[test]
    fn linkage_is_order_independent_and_sensitive() {
        let a = sample().to_bytes();
        let b = Signal::signed(
            "req-1",
            &sample().request_repr,
            "provider-b",
            Stage::Complete,
            "c",
            &key(3),
        )
        .to_bytes();
        let l1 = linkage([
            ("provider-a", Stage::Start, &a[..]),
            ("provider-b", Stage::Complete, &b[..]),
        ]);
        let l2 = linkage([
            ("provider-b", Stage::Complete, &b[..]),
            ("provider-a", Stage::Start, &a[..]),
        ]);
        assert_eq!(l1, l2);
        let l3 = linkage([("provider-a", Stage::Start, &a[..])]);
        assert_ne!(l1, l3);
        // The formula written out.
        let mut pre = Vec::new();
        pre.extend_from_slice(b"provider-a\0START\0");
        pre.extend_from_slice(&Sha256::digest(&a));
        pre.push(b'\n');
        assert_eq!(l3, crate::hashing::sha256_hex(&pre));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// The signed part through the generic canonicalizer (the reference).
        #[derive(Serialize)]
        struct Unsigned<'a> {
            v: u32,
            operation: &'a str,
            request_id: &'a str,
            request_repr: &'a str,
            provider: &'a str,
            stage: Stage,
            boundary: &'a str,
            key_id: &'a str,
        }

        proptest! {
            #[test]
            fn direct_canonical_form_equals_rfc8785(
                rid in any::<String>(), repr in any::<String>(), provider in any::<String>(),
                boundary in any::<String>(), sig in any::<String>(), complete in any::<bool>(),
                v in any::<u32>(),
            ) {
                let stage = if complete { Stage::Complete } else { Stage::Start };
                let mut s = Signal::signed(&rid, &repr, &provider, stage, &boundary, &key(3));
                s.sig = sig;
                s.v = v;
                let whole = serde_json_canonicalizer::to_vec(&s).unwrap_or_default();
                prop_assert_eq!(s.to_bytes(), whole);
                let unsigned = serde_json_canonicalizer::to_vec(&Unsigned {
                    v: s.v,
                    operation: &s.operation,
                    request_id: &s.request_id,
                    request_repr: &s.request_repr,
                    provider: &s.provider,
                    stage: s.stage,
                    boundary: &s.boundary,
                    key_id: &s.key_id,
                })
                .unwrap_or_default();
                prop_assert_eq!(s.signing_bytes(), unsigned);
            }

            #[test]
            fn any_signal_round_trips_canonically(id in "[A-Za-z0-9._:-]{1,40}", body in proptest::collection::vec(any::<u8>(), 0..64), boundary in "[a-f0-9]{0,64}", complete in any::<bool>()) {
                let stage = if complete { Stage::Complete } else { Stage::Start };
                let s = Signal::signed(&id, repr_of(&body).as_str(), "p", stage, &boundary, &key(7));
                let bytes = s.to_bytes();
                let back = Signal::parse(&bytes);
                prop_assert_eq!(back.as_ref(), Ok(&s));
                prop_assert_eq!(s.verify(&key(7).verifying_key()), Ok(()));
            }
        }
    }

    /// The fast verifier against `verify_strict`, on signatures a signer can craft with its
    /// own secret scalar: `R = [r]B + T` for each point `T` of order 1..8, and `s` out of range.
    mod fast_verifier {
        use super::*;
        use curve25519_dalek::constants::EIGHT_TORSION;
        use curve25519_dalek::edwards::CompressedEdwardsY;
        use proptest::prelude::*;

        /// Re-signs `s` with nonce point `[r]B + torsion` and, if `bump_s`, `s + l`.
        fn crafted(s: &mut Signal, sk: &SigningKey, r: u64, torsion: usize, bump_s: bool) {
            let a = sk.to_scalar();
            let r = Scalar::from(r);
            let big_r = (ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[torsion % 8]).compress();
            let k = challenge(s, &big_r, sk.verifying_key().as_bytes());
            let sig_s = r + k * a;
            let mut raw = [0u8; 64];
            raw[..32].copy_from_slice(big_r.as_bytes());
            raw[32..].copy_from_slice(sig_s.as_bytes());
            if bump_s {
                // s + l, still 32 bytes: a non-canonical encoding of the same scalar.
                let l: [u8; 32] = [
                    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde,
                    0xf9, 0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
                ];
                let mut carry = 0u16;
                for i in 0..32 {
                    let v = raw[32 + i] as u16 + l[i] as u16 + carry;
                    raw[32 + i] = v as u8;
                    carry = v >> 8;
                }
            }
            s.sig = URL_SAFE_NO_PAD.encode(raw);
        }

        #[test]
        fn accepts_and_refuses_what_verify_strict_does() {
            let sk = key(9);
            let v = SignalVerifier::new(sk.verifying_key());
            let mut scratch = Vec::new();
            let base = Signal::signed("r", "sha256=00", "p", Stage::Start, "b", &sk);
            assert_eq!(v.verify_with(&base, &mut scratch), Ok(()));
            // r = 0 makes R (and [s]B - [k]A) a point of small order.
            for r in [0, 12345] {
                for torsion in 0..8 {
                    for bump in [false, true] {
                        let mut s = base.clone();
                        crafted(&mut s, &sk, r, torsion, bump);
                        let want = s.verify(&sk.verifying_key());
                        let case = format!("r={r} t={torsion} bump={bump}");
                        // Sanity of the crafting: only a torsion-free R with a reduced s verifies.
                        assert_eq!(want.is_ok(), r != 0 && torsion == 0 && !bump, "{case}");
                        assert_eq!(v.verify_with(&s, &mut scratch), want, "{case}");
                    }
                }
            }
        }

        /// `k = H(R || A || M)` for `s` under the key bytes `a`.
        fn challenge(s: &Signal, big_r: &CompressedEdwardsY, a: &[u8; 32]) -> Scalar {
            let a = VerifyingKey::from_bytes(a).unwrap_or_else(|e| panic!("{e}"));
            super::super::challenge(big_r.as_bytes(), &a, &s.signing_bytes())
        }

        /// (verifier, raw signature, signed bytes) of `s`.
        fn triple(v: &SignalVerifier, s: &Signal) -> ([u8; 64], Vec<u8>) {
            let mut msg = Vec::new();
            let raw = v.prepare(s, &mut msg).unwrap_or_else(|e| panic!("{e}"));
            (raw, msg)
        }

        #[test]
        fn a_batch_passes_only_when_every_signature_verifies() {
            let (ka, kb) = (key(11), key(12));
            let (va, vb) = (
                SignalVerifier::new(ka.verifying_key()),
                SignalVerifier::new(kb.verifying_key()),
            );
            let mut signals: Vec<(&SignalVerifier, Signal)> = (0..40)
                .map(|i| {
                    let (v, k) = if i % 3 == 0 { (&va, &ka) } else { (&vb, &kb) };
                    let s =
                        Signal::signed(&format!("r{i}"), "sha256=00", "p", Stage::Start, "b", k);
                    (v, s)
                })
                .collect();
            let check = |signals: &[(&SignalVerifier, Signal)]| {
                let owned: Vec<_> = signals.iter().map(|(v, s)| (*v, triple(v, s))).collect();
                let items: Vec<_> = owned.iter().map(|(v, (r, m))| (*v, r, &m[..])).collect();
                verify_batch(&items, &mut rand::thread_rng())
            };
            assert!(check(&signals));
            assert!(check(&signals[..1]));
            assert!(check(&[]));
            // One signature over other bytes, one with s + l, one under the other key: refused.
            let mut bad = signals.clone();
            bad[7].1.sig = signals[8].1.sig.clone();
            assert!(!check(&bad));
            let mut bad = signals.clone();
            let sk = if std::ptr::eq(bad[5].0, &va) {
                &ka
            } else {
                &kb
            };
            crafted(&mut bad[5].1, sk, 99, 0, true);
            assert!(!check(&bad));
            let mut bad = signals.clone();
            bad[4].0 = if std::ptr::eq(bad[4].0, &va) {
                &vb
            } else {
                &va
            };
            bad[4].1.key_id = bad[4].0.key_id().to_string();
            assert!(!check(&bad));
            // A small-order R and a non-canonical encoding of R: refused.
            let mut bad = signals.clone();
            crafted(&mut bad[2].1, &ka, 0, 1, false);
            assert!(!check(&bad));
            let mut raw = decode_signature(&signals[3].1.sig).unwrap_or([0; 64]);
            raw[..32].copy_from_slice(&[0xff; 32]);
            raw[31] = 0x7f;
            signals[3].1.sig = URL_SAFE_NO_PAD.encode(raw);
            assert!(!check(&signals));
        }

        fn set_sig(s: &mut Signal, big_r: &CompressedEdwardsY, sig_s: &Scalar) {
            let mut raw = [0u8; 64];
            raw[..32].copy_from_slice(big_r.as_bytes());
            raw[32..].copy_from_slice(sig_s.as_bytes());
            s.sig = URL_SAFE_NO_PAD.encode(raw);
        }

        #[test]
        fn a_key_of_small_order_verifies_nothing() {
            let t = EIGHT_TORSION[1];
            let weak = VerifyingKey::from_bytes(&t.compress().to_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            let v = SignalVerifier::new(weak);
            assert!(v.is_weak());
            // Anyone can forge under a key A of small order: with R = [s]B - [3]A, the equation
            // [s]B - [k]A == R holds whenever k = 3 (mod 8). Only the check on A refuses it.
            let sig_s = Scalar::from(7u64);
            let big_r = (ED25519_BASEPOINT_POINT * sig_s - t * Scalar::from(3u64)).compress();
            let forged = (0..500).find_map(|n| {
                let mut s = Signal::signed(
                    &format!("r{n}"),
                    "sha256=00",
                    "p",
                    Stage::Start,
                    "b",
                    &key(1),
                );
                s.key_id = key_id(&weak);
                let k = challenge(&s, &big_r, weak.as_bytes());
                (k.as_bytes()[0] & 7 == 3).then(|| {
                    set_sig(&mut s, &big_r, &sig_s);
                    s
                })
            });
            let s = forged.unwrap_or_else(|| panic!("no message with k = 3 (mod 8)"));
            assert_eq!(s.verify(&weak), Err(SignalError::BadSignature));
            assert_eq!(
                v.verify_with(&s, &mut Vec::new()),
                Err(SignalError::BadSignature)
            );
        }

        #[test]
        fn a_key_with_a_torsion_component_verifies_like_verify_strict() {
            // A = [a]B + T is not of small order, so `verify_strict` uses it. Then
            // [s]B - [k]A = [r]B - [k]T: a signature with R = [r]B - [u]T verifies exactly when
            // k = u (mod 8), under both verifiers.
            let a = Scalar::from(123_456_789u64);
            let t = EIGHT_TORSION[1];
            let vk = VerifyingKey::from_bytes(&(ED25519_BASEPOINT_POINT * a + t).compress().0)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!vk.is_weak());
            let v = SignalVerifier::new(vk);
            let mut scratch = Vec::new();
            let mut accepted = 0;
            for n in 1..32u64 {
                let mut s = Signal::signed("r", "sha256=00", "p", Stage::Start, "b", &key(1));
                s.key_id = key_id(&vk);
                let r = Scalar::from(n);
                for u in 0..8u64 {
                    let big_r = (ED25519_BASEPOINT_POINT * r - t * Scalar::from(u)).compress();
                    let k = challenge(&s, &big_r, vk.as_bytes());
                    set_sig(&mut s, &big_r, &(r + k * a));
                    let want = s.verify(&vk);
                    assert_eq!(
                        u64::from(k.as_bytes()[0] & 7) == u,
                        want.is_ok(),
                        "n={n} u={u}"
                    );
                    assert_eq!(v.verify_with(&s, &mut scratch), want, "n={n} u={u}");
                    accepted += usize::from(want.is_ok());
                }
            }
            assert!(accepted > 0, "no accepted case was exercised");
        }

        proptest! {
            #[test]
            fn parse_with_matches_parse(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut scratch = b"stale".to_vec();
                prop_assert_eq!(Signal::parse_with(&bytes, &mut scratch), Signal::parse(&bytes));
            }

            #[test]
            fn verify_with_matches_verify(
                flip in 0usize..10, rid in "[a-z0-9]{1,12}", r in any::<u64>(),
                torsion in 0usize..8, bump in any::<bool>(),
            ) {
                let sk = key(5);
                let v = SignalVerifier::new(sk.verifying_key());
                let mut s = Signal::signed(&rid, "sha256=00", "p", Stage::Start, "b", &sk);
                match flip {
                    0 => {}
                    1 => s.boundary.push('x'),
                    2 => s.request_id.push('x'),
                    3 => s.sig.truncate(20),
                    4 => s.sig = format!("{}A", &s.sig[..85]),
                    5 => s.key_id = "00".into(),
                    6 => s.operation = s.operation.to_uppercase(),
                    7 => s.sig = "!".repeat(86),
                    _ => crafted(&mut s, &sk, r, torsion, bump),
                }
                let mut scratch = Vec::new();
                prop_assert_eq!(v.verify_with(&s, &mut scratch), s.verify(&sk.verifying_key()));
            }
        }
    }
}
