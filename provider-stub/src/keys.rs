//! The provider's ed25519 key file: 64 lower-case hex characters of the 32-byte secret seed and a
//! newline, mode 0600. `keygen` writes one; the server creates one on first start when missing.

use ed25519_dalek::SigningKey;
use multihub_protocol::hashing::{hex_into, unhex32};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::ProviderError;

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    hex_into(&mut s, bytes);
    s
}

/// Parses a 64-hex public key.
pub fn parse_public(s: &str) -> Option<ed25519_dalek::VerifyingKey> {
    ed25519_dalek::VerifyingKey::from_bytes(&unhex32(s.trim())?).ok()
}

/// Reads a key file.
pub fn load(path: &Path) -> Result<SigningKey, ProviderError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ProviderError::Key(format!("{}: {e}", path.display())))?;
    let seed = unhex32(text.trim_end_matches('\n')).ok_or_else(|| {
        ProviderError::Key(format!(
            "{}: must be 64 hex characters and a newline",
            path.display()
        ))
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a fresh key to `path` (refusing to overwrite), creating parent directories.
pub fn generate(path: &Path) -> Result<SigningKey, ProviderError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| ProviderError::Key(format!("{}: {e}", dir.display())))?;
    }
    let seed = rand::random::<[u8; 32]>();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ProviderError::Key(format!("{}: {e}", path.display())))?;
    let mut line = hex(&seed);
    line.push('\n');
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| ProviderError::Key(format!("{}: {e}", path.display())))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Loads the key, generating it first when the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<(SigningKey, bool), ProviderError> {
    if path.exists() {
        Ok((load(path)?, false))
    } else {
        Ok((generate(path)?, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_then_load() {
        let dir = std::env::temp_dir().join(format!("mh-keys-{}", std::process::id()));
        let p = dir.join("sub/key");
        let _ = std::fs::remove_dir_all(&dir);
        let k = generate(&p).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        let back = load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.to_bytes(), k.to_bytes());
        assert!(generate(&p).is_err(), "never overwrites");
        let pk = hex(k.verifying_key().as_bytes());
        assert_eq!(parse_public(&pk), Some(k.verifying_key()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
