//! Requests a web page may have sent, for servers on loopback without a token (`agentcube up`'s
//! default). Any site's page can `POST` to `127.0.0.1` (a "simple" cross-origin request needs no
//! preflight: its answer stays unread, its effect does not), and through DNS rebinding a page's
//! own name comes to resolve to `127.0.0.1`, so that it reads the answers too. Browsers name the
//! page's site in `Origin` (on every `POST`) and, after rebinding, in `Host`, and mark what any
//! page asks for with `Sec-Fetch-Site` (a `GET` from an `<img>` carries no `Origin`, and would
//! make a session and its sandbox); the SDKs, curl and other clients send none of these and a
//! loopback `Host`.

use std::net::IpAddr;

/// The fields [`refusal`] reads, raw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    pub host: Option<&'a [u8]>,
    pub origin: Option<&'a [u8]>,
    /// `Sec-Fetch-Site`.
    pub fetch_site: Option<&'a [u8]>,
}

/// Field names [`Fields`] is read from.
pub const FETCH_SITE: &str = "sec-fetch-site";

/// Why a request with these fields is refused, or `None`. A missing `Host` (HTTP/2 carries the
/// authority elsewhere, and browsers do not speak cleartext HTTP/2), `Origin` or
/// `Sec-Fetch-Site` passes (browsers older than fetch metadata send no `Sec-Fetch-Site`: their
/// cross-site `GET`s still pass).
pub fn refusal(f: Fields<'_>) -> Option<&'static str> {
    if f.host.is_some_and(|h| !local_authority(h)) {
        return Some(
            "the Host header names no loopback address: a web page may have reached this server by DNS rebinding (start it with a token to serve other names)",
        );
    }
    if f.origin.is_some_and(|o| !local_origin(o)) {
        return Some(
            "a web page of another origin sent this request (its Origin is not a loopback one)",
        );
    }
    if f.fetch_site
        .is_some_and(|s| s.eq_ignore_ascii_case(b"cross-site"))
    {
        return Some("a web page of another site sent this request (Sec-Fetch-Site: cross-site)");
    }
    None
}

/// `host[:port]` (or `[v6][:port]`) naming this machine: `localhost` and its subdomains (which
/// browsers resolve themselves, never by DNS), a loopback address, or the unspecified address
/// (some browsers send `0.0.0.0` to this machine; no page can be served from it but a local one).
fn local_authority(authority: &[u8]) -> bool {
    let Ok(a) = std::str::from_utf8(authority) else {
        return false;
    };
    let (host, port) = match a.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':').or(tail.is_empty().then_some(""))),
            None => return false,
        },
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, Some("")),
        },
    };
    let Some(port) = port else {
        return false;
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// `http(s)://authority`, the authority a local one (`null`, sent by sandboxed frames and
/// `file:` pages, is not).
fn local_origin(origin: &[u8]) -> bool {
    let Ok(o) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some((scheme, authority)) = o.split_once("://") else {
        return false;
    };
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        && !authority.contains(['/', '@'])
        && local_authority(authority.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{Fields, refusal};

    fn passes(host: &str, origin: Option<&str>) -> bool {
        refusal(Fields {
            host: Some(host.as_bytes()),
            origin: origin.map(str::as_bytes),
            fetch_site: None,
        })
        .is_none()
    }

    fn fetched_from(site: &str) -> bool {
        refusal(Fields {
            host: Some(b"127.0.0.1:8081"),
            origin: None,
            fetch_site: Some(site.as_bytes()),
        })
        .is_none()
    }

    #[test]
    fn clients_on_this_machine_pass() {
        for host in [
            "127.0.0.1:8081",
            "127.0.0.1",
            "localhost:8081",
            "LOCALHOST",
            "localhost.:8081",
            "app.localhost:8081",
            "[::1]:8081",
            "[::1]",
            "127.1.2.3:80",
            "0.0.0.0:8081",
        ] {
            assert!(passes(host, None), "{host}");
        }
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1:8081",
            "https://[::1]:8443",
        ] {
            assert!(passes("127.0.0.1:8081", Some(origin)), "{origin}");
        }
        assert!(refusal(Fields::default()).is_none());
        for site in ["none", "same-origin", "same-site"] {
            assert!(fetched_from(site), "{site}");
        }
    }

    #[test]
    fn pages_of_other_sites_are_refused() {
        for host in [
            "rebound.example:8081",
            "rebound.example",
            "localhost.example.com",
            "127.0.0.1.nip.io:8081",
            "[::ffff:127.0.0.1]:8081",
            "127.0.0.1:80x",
            "[::1",
            "192.168.1.5:8081",
            "",
        ] {
            assert!(!passes(host, None), "{host}");
        }
        for origin in [
            "http://rebound.example",
            "https://evil.example:443",
            "null",
            "file://",
            "http://localhost@evil.example",
            "http://127.0.0.1.evil.example",
            "ftp://localhost",
        ] {
            assert!(!passes("127.0.0.1:8081", Some(origin)), "{origin}");
        }
        assert!(
            refusal(Fields {
                host: Some(&[0xff]),
                ..Fields::default()
            })
            .is_some()
        );
        assert!(!fetched_from("cross-site") && !fetched_from("Cross-Site"));
    }
}
