//! Body representation and binding hashes (DESIGN §3), computed identically by hubs and providers.

use sha2::{Digest, Sha256};

/// `sha256=<64 hex>` of a body: the value of `x-hub-request-repr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repr(String);

impl Repr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `bytes`, written into `out` (table lookup: this runs on every request).
pub fn hex_into(out: &mut String, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0x0f)] as char);
    }
}

/// 32 bytes from exactly 64 hex digits (either case); `None` for anything else.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks(2)) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Lower-case hex of `bytes` into `out` (two digits per byte, as many as `out` holds).
pub fn hex_to(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// Lower-case hex of 32 bytes.
pub fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    hex_to(&mut out, bytes);
    out
}

/// `sha256=<64 hex>` of a body, as the bytes `x-hub-request-repr` carries.
pub fn repr_bytes(body: &[u8]) -> [u8; 71] {
    let mut out = [0u8; 71];
    out[..7].copy_from_slice(b"sha256=");
    out[7..].copy_from_slice(&hex32(&Sha256::digest(body).into()));
    out
}

/// `x-hub-binding` for a repr (its bytes) and a context, as 64 hex bytes.
pub fn binding_bytes(repr: &[u8], context: &[u8]) -> [u8; 64] {
    let mut h = Sha256::new();
    h.update(b"multihub-bind-v1\n");
    h.update(repr);
    h.update(b"\n");
    h.update(context);
    hex32(&h.finalize().into())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(64);
    hex_into(&mut s, &Sha256::digest(bytes));
    s
}

/// The representation of a body: `sha256=` + hex sha256 of the exact bytes.
pub fn repr_of(body: &[u8]) -> Repr {
    Repr(String::from_utf8_lossy(&repr_bytes(body)).into_owned())
}

/// `x-hub-binding`: hex `sha256("multihub-bind-v1\n" + repr + "\n" + context)`.
pub fn binding_hex(repr: &str, context: &[u8]) -> String {
    String::from_utf8_lossy(&binding_bytes(repr.as_bytes(), context)).into_owned()
}

/// DESIGN §6: `operation = hex sha256("multihub-op-v1\n" + request_id + "\n" + request_repr)`.
pub fn operation_hex(request_id: &str, repr: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"multihub-op-v1\n");
    h.update(request_id.as_bytes());
    h.update(b"\n");
    h.update(repr.as_bytes());
    let mut s = String::with_capacity(64);
    hex_into(&mut s, &h.finalize());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_the_formatter() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut s = String::new();
        hex_into(&mut s, &bytes);
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, want);
    }

    #[test]
    fn unhex32_round_trips_and_refuses_everything_else() {
        let bytes: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37)).collect();
        let mut s = String::new();
        hex_into(&mut s, &bytes);
        assert_eq!(unhex32(&s).map(|a| a.to_vec()), Some(bytes));
        assert_eq!(unhex32(&s.to_uppercase()), unhex32(&s));
        assert_eq!(unhex32(&s[..62]), None);
        assert_eq!(unhex32(&format!("+{}", &s[1..])), None);
        assert_eq!(
            unhex32(&format!("é{}", &s[2..])),
            None,
            "multi-byte, no panic"
        );
        assert_eq!(unhex32(&format!("g{}", &s[1..])), None);
    }

    #[test]
    fn repr_of_empty_body_is_the_known_digest() {
        assert_eq!(
            repr_of(b"").as_str(),
            "sha256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn binding_depends_on_repr_and_context() {
        let r = repr_of(b"{}");
        let a = binding_hex(r.as_str(), b"");
        let b = binding_hex(r.as_str(), b"ctx");
        let c = binding_hex(repr_of(b"{ }").as_str(), b"");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_ne!(a, c);
        // Same formula written out by hand.
        let mut pre = b"multihub-bind-v1\n".to_vec();
        pre.extend_from_slice(r.as_str().as_bytes());
        pre.extend_from_slice(b"\nctx");
        assert_eq!(b, sha256_hex(&pre));
    }

    #[test]
    fn operation_formula() {
        let op = operation_hex("r1", "sha256=00");
        assert_eq!(op, sha256_hex(b"multihub-op-v1\nr1\nsha256=00"));
    }
}
