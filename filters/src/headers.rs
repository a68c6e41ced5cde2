//! Read access to a request's header fields, whatever holds them: the hub's parsed
//! [`http1::Request`] on the request path (names and values point into the received head, so
//! nothing is copied or rebuilt per request), an `http::HeaderMap` in tests and tools.

use http::HeaderMap;
use multihub_protocol::http1;

/// A request's header fields. Names match ASCII case-insensitively; `name` arguments are given
/// in lower case.
pub trait Headers {
    /// Every field, in order, with its name as sent.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// Every value of the field `name`, in order.
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of the field `name`.
    fn first<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values_of(name).next()
    }
}

impl Headers for HeaderMap {
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    }

    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).into_iter().map(|v| v.as_bytes())
    }
}

impl Headers for http1::Request {
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers()
    }
}

impl Headers for http1::client::ResponseHead {
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn header_maps_and_values_in_order() {
        let mut m = HeaderMap::new();
        m.append("x-a", HeaderValue::from_static("1"));
        m.append("x-a", HeaderValue::from_static("2"));
        m.append("x-b", HeaderValue::from_static("3"));
        assert_eq!(m.values_of("x-a").collect::<Vec<_>>(), vec![b"1", b"2"]);
        assert_eq!(m.first("x-b"), Some(&b"3"[..]));
        assert_eq!(m.first("x-c"), None);
        assert_eq!(m.fields().count(), 3);
    }
}
