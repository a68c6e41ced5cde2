//! Where a routing table comes from: a single JSON file, or a `routes/` directory holding
//! `<version>.json` files and an `active` pointer (one line naming the version).

use multihub_protocol::hashing::sha256_hex;
use multihub_protocol::ids::validate_hub_id;
use std::path::{Path, PathBuf};

use crate::table::{compile, parse, ConfigError, Problem, RoutingTable};

/// Name of the pointer file inside a routes directory.
pub const ACTIVE_POINTER: &str = "active";

/// A compiled table and where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub table: RoutingTable,
    /// The file the table was read from.
    pub file: PathBuf,
    /// Hex sha256 of that file's bytes.
    pub sha256: String,
}

fn io(path: &Path, source: std::io::Error) -> ConfigError {
    ConfigError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &str, message: String) -> ConfigError {
    ConfigError::Invalid(vec![Problem {
        path: path.into(),
        message,
    }])
}

/// Resolves a `--routes` argument to the file of the active version.
/// For a directory: `<dir>/<contents of active>.json`, plus the version the pointer names.
pub fn active_file(routes: &Path) -> Result<(PathBuf, Option<String>), ConfigError> {
    let meta = std::fs::metadata(routes).map_err(|e| io(routes, e))?;
    if !meta.is_dir() {
        return Ok((routes.to_path_buf(), None));
    }
    let pointer = routes.join(ACTIVE_POINTER);
    let raw = std::fs::read_to_string(&pointer).map_err(|e| io(&pointer, e))?;
    let version = raw.trim();
    if let Err(e) = validate_hub_id(version) {
        return Err(invalid(
            "$",
            format!("{}: version {version:?} {e}", pointer.display()),
        ));
    }
    Ok((
        routes.join(format!("{version}.json")),
        Some(version.to_string()),
    ))
}

/// Reads, parses, validates and compiles the active table of a file or directory.
pub fn load(routes: &Path) -> Result<Loaded, ConfigError> {
    let (file, pointed) = active_file(routes)?;
    let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
    let parsed = parse(&bytes)?;
    let compiled = compile(&parsed);
    let mismatch = match &pointed {
        Some(v) if *v != parsed.version => Some(Problem {
            path: "$.version".into(),
            message: format!(
                "{:?} does not match the active pointer {v:?} (file {})",
                parsed.version,
                file.display()
            ),
        }),
        _ => None,
    };
    match (compiled, mismatch) {
        (Ok(table), None) => Ok(Loaded {
            table,
            sha256: sha256_hex(&bytes),
            file,
        }),
        (Ok(_), Some(m)) => Err(ConfigError::Invalid(vec![m])),
        (Err(ConfigError::Invalid(mut p)), Some(m)) => {
            p.insert(0, m);
            Err(ConfigError::Invalid(p))
        }
        (Err(e), _) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::sample;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mh-src-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }

    #[test]
    fn directory_with_pointer() {
        let d = tmpdir("dir");
        std::fs::write(d.join("v1.json"), sample()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("active"), "v1\n").unwrap_or_else(|e| panic!("{e}"));
        let l = load(&d).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.table.version, "v1");
        assert_eq!(l.sha256, sha256_hex(sample().as_bytes()));

        std::fs::write(d.join("v2.json"), sample()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("active"), "v2").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&d).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.starts_with("$.version: \"v1\" does not match the active pointer \"v2\""),
            "{err}"
        );

        std::fs::write(d.join("active"), "../etc/passwd").unwrap_or_else(|e| panic!("{e}"));
        assert!(load(&d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn single_file_and_missing_file() {
        let d = tmpdir("file");
        let f = d.join("table.json");
        std::fs::write(&f, sample()).unwrap_or_else(|e| panic!("{e}"));
        assert!(load(&f).is_ok());
        let err = load(&d.join("nope.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot read"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
