//! The small URL grammar of upstream addresses: `http[s]://host[:port][/base-path]`.

/// A parsed upstream URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Base path without a trailing slash; empty for the root.
    pub base_path: String,
}

impl UpstreamUrl {
    /// The `Host` header value: host, plus the port when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses an upstream URL; the error names what is wrong.
pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!("{url:?}: scheme must be http:// or https://"));
    };
    if rest.contains(['?', '#']) {
        return Err(format!("{url:?}: query and fragment are not allowed"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: missing host"));
    }
    if authority.contains('@') {
        return Err(format!("{url:?}: credentials in URLs are not allowed"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("{url:?}: unterminated IPv6 literal"))?;
        let host = &v6[..end];
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(url, p)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{url:?}: junk after IPv6 literal")),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(url, p)?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: missing host"));
    }
    let base_path = path.trim_end_matches('/').to_string();
    Ok(UpstreamUrl {
        tls,
        host,
        port,
        base_path,
    })
}

fn parse_port(url: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{url:?}: port must be 1-65535")),
        Ok(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_we_accept() {
        let u = parse("http://127.0.0.1:9101").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 9101));
        assert_eq!(u.base_path, "");
        assert_eq!(u.authority(), "127.0.0.1:9101");
        let u = parse("https://example.org/outcomes/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (u.tls, u.port, u.base_path.as_str()),
            (true, 443, "/outcomes")
        );
        assert_eq!(u.authority(), "example.org");
        let u = parse("http://[::1]:80/x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "ftp://x",
            "127.0.0.1:80",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://h:x",
            "http://u@h",
            "http://h/?q",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
