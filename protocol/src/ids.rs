//! Request ids and hub ids.

use thiserror::Error;

/// Why an id was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
    #[error("contains {found:?}; allowed are A-Z a-z 0-9 . _ : -")]
    BadChar { found: char },
}

/// Longest accepted request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest accepted hub / provider / route id.
pub const MAX_ID_LEN: usize = 64;

fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn validate(s: &[u8], max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { max });
    }
    match s.iter().find(|b| !id_char(**b)) {
        Some(b) => Err(IdError::BadChar { found: *b as char }),
        None => Ok(()),
    }
}

/// DESIGN §3: 1–128 of `[A-Za-z0-9._:-]`.
pub fn validate_request_id(s: &[u8]) -> Result<(), IdError> {
    validate(s, MAX_REQUEST_ID_LEN)
}

/// Hub, provider, peer and route ids: 1–64 of `[A-Za-z0-9._:-]` (no comma, so paths stay parseable).
pub fn validate_hub_id(s: &str) -> Result<(), IdError> {
    validate(s.as_bytes(), MAX_ID_LEN)
}

/// A fresh 128-bit request id, 32 lower-case hex digits.
pub fn generate_request_id() -> [u8; 32] {
    let v: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    crate::hashing::hex_to(&mut out, &v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_grammar() {
        assert!(validate_request_id(b"abc-DEF_1.2:3").is_ok());
        assert_eq!(validate_request_id(b""), Err(IdError::Empty));
        assert_eq!(
            validate_request_id(&[b'a'; 129]),
            Err(IdError::TooLong { max: 128 })
        );
        assert!(validate_request_id(&[b'a'; 128]).is_ok());
        assert_eq!(
            validate_request_id(b"a b"),
            Err(IdError::BadChar { found: ' ' })
        );
        assert!(validate_request_id(b"a,b").is_err());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate_request_id();
        let b = generate_request_id();
        assert_eq!(a.len(), 32);
        assert!(validate_request_id(&a).is_ok());
        assert_ne!(a, b);
    }
}
