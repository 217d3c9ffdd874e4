//! Requests a web page may have sent, for servers on loopback without a token (`agentcube up`'s
//! default). Any site's page can `POST` to `127.0.0.1` (a "simple" cross-origin request needs no
//! preflight: its answer stays unread, its effect does not), and through DNS rebinding a page's
//! own name comes to resolve to `127.0.0.1`, so that it reads the answers too. Browsers name the
//! page's site in `Origin` and, after rebinding, in `Host`; the SDKs, curl and other clients send
//! no `Origin` and a loopback `Host`.

use std::net::IpAddr;

/// Why a request with these raw `Host` and `Origin` values is refused, or `None`. A missing
/// `Host` (HTTP/2 carries the authority elsewhere, and browsers do not speak cleartext HTTP/2)
/// or `Origin` passes.
pub fn refusal(host: Option<&[u8]>, origin: Option<&[u8]>) -> Option<&'static str> {
    if host.is_some_and(|h| !local_authority(h)) {
        return Some(
            "the Host header names no loopback address: a web page may have reached this server by DNS rebinding (start it with a token to serve other names)",
        );
    }
    if origin.is_some_and(|o| !local_origin(o)) {
        return Some(
            "a web page of another origin sent this request (its Origin is not a loopback one)",
        );
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
    use super::refusal;

    fn passes(host: &str, origin: Option<&str>) -> bool {
        refusal(Some(host.as_bytes()), origin.map(str::as_bytes)).is_none()
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
        assert!(refusal(None, None).is_none());
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
        assert!(refusal(Some(&[0xff]), None).is_some());
    }
}
