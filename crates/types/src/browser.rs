//! Requests a web page may have sent, for servers that do not authenticate their callers. Any
//! site's page can `POST` to any address the browser reaches — `127.0.0.1`, a
//! `kubectl port-forward`, a Router on the intranet — without a preflight when the request is
//! "simple" (`text/plain`): its answer stays unread, its effect does not (a session made, a
//! command run in it). Through DNS rebinding a page's own name comes to resolve to such an
//! address, so that it reads the answers too. Browsers name the page's site in `Origin` (on every
//! `POST`) and, after rebinding, in `Host`, and mark what any page asks for with `Sec-Fetch-Site`
//! (a `GET` from an `<img>` carries no `Origin`, and would make a session and its sandbox); the
//! SDKs, curl and other clients send none of these. A server that authenticates its callers needs
//! none of this: a page cannot attach a caller's bearer token.

use std::net::IpAddr;

/// The fields [`Guard::refusal_of`] reads, raw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    pub host: Option<&'a [u8]>,
    pub origin: Option<&'a [u8]>,
    /// `Sec-Fetch-Site`.
    pub fetch_site: Option<&'a [u8]>,
}

/// Field names [`Fields`] is read from.
pub const FETCH_SITE: &str = "sec-fetch-site";

/// A field [`Guard::refusal_of`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Host,
    Origin,
    /// `Sec-Fetch-Site`.
    FetchSite,
}

impl Field {
    /// Its name, lowercase.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Origin => "origin",
            Self::FetchSite => FETCH_SITE,
        }
    }
}

/// Which requests a server refuses as a web page's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// None: the server authenticates its callers.
    Off,
    /// A server without caller authentication on any address (the standalone Router and
    /// Workload Manager): no page of another site (`Sec-Fetch-Site: cross-site`), and from a
    /// loopback peer (a `kubectl port-forward`, a listener on this machine) a request with fetch
    /// metadata is held to [`Guard::Local`]'s rules: a page that rebound its name to the
    /// port-forward's `127.0.0.1` names itself in `Host`. Without `Sec-Fetch-Site` (no browser,
    /// or one from before 2023) a request passes: one field looked up per request.
    Open,
    /// A server on loopback without a token (`agentcube up`): any request naming no loopback
    /// `Host`, or a foreign `Origin`, or `Sec-Fetch-Site: cross-site`.
    Local,
}

impl Guard {
    /// The guard of a server that authenticates its callers or not.
    pub fn unless_authenticated(authenticated: bool) -> Self {
        if authenticated { Self::Off } else { Self::Open }
    }

    /// Why a request from `peer` is refused, or `None`, asking `field` for a field's value only
    /// when the answer depends on it (a proxy's every request: under `Open`, a request without
    /// fetch metadata costs one lookup).
    pub fn refusal_of<'a>(
        self,
        peer: Option<IpAddr>,
        field: impl Fn(Field) -> Option<&'a [u8]>,
    ) -> Option<&'static str> {
        let fields = |fetch_site| Fields {
            host: field(Field::Host),
            origin: field(Field::Origin),
            fetch_site,
        };
        match self {
            Self::Off => None,
            Self::Local => refusal(fields(field(Field::FetchSite))),
            Self::Open => {
                let fetch_site = Some(field(Field::FetchSite)?);
                let loopback = peer.is_some_and(|ip| ip.to_canonical().is_loopback());
                if loopback {
                    refusal(fields(fetch_site))
                } else if cross_site(fetch_site) {
                    Some(CROSS_SITE)
                } else {
                    None
                }
            }
        }
    }
}

const CROSS_SITE: &str = "a web page of another site sent this request (Sec-Fetch-Site: cross-site); a server that does not authenticate its callers serves no other site's pages";

fn cross_site(fetch_site: Option<&[u8]>) -> bool {
    fetch_site.is_some_and(|s| s.eq_ignore_ascii_case(b"cross-site"))
}

/// Why a request with these fields is refused under [`Guard::Local`], or `None`. A missing
/// `Host` (HTTP/2 carries the authority elsewhere, and browsers do not speak cleartext HTTP/2),
/// `Origin` or `Sec-Fetch-Site` passes (browsers older than fetch metadata send no
/// `Sec-Fetch-Site`: their cross-site `GET`s still pass).
fn refusal(f: Fields<'_>) -> Option<&'static str> {
    if f.host.is_some_and(|h| !local_authority(h)) {
        return Some(
            "the Host header names no loopback address: a web page may have reached this server by DNS rebinding (a server that authenticates its callers serves other names)",
        );
    }
    if f.origin.is_some_and(|o| !local_origin(o)) {
        return Some(
            "a web page of another origin sent this request (its Origin is not a loopback one)",
        );
    }
    if cross_site(f.fetch_site) {
        return Some(CROSS_SITE);
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
    use std::net::{IpAddr, Ipv4Addr};

    use super::{Field, Fields, Guard, refusal};

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

    impl Guard {
        /// The refusal of a request with these fields.
        fn refusal(self, peer: Option<IpAddr>, f: Fields<'_>) -> Option<&'static str> {
            self.refusal_of(peer, |field| match field {
                Field::Host => f.host,
                Field::Origin => f.origin,
                Field::FetchSite => f.fetch_site,
            })
        }
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    const REMOTE: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));

    fn open(peer: Option<IpAddr>, host: &str, origin: Option<&str>, site: Option<&str>) -> bool {
        let f = Fields {
            host: Some(host.as_bytes()),
            origin: origin.map(str::as_bytes),
            fetch_site: site.map(str::as_bytes),
        };
        Guard::Open.refusal(peer, f).is_none()
    }

    #[test]
    fn open_servers_refuse_other_sites_pages_from_anywhere() {
        for peer in [LOOPBACK, REMOTE, None] {
            for host in ["router.agentcube.svc:8080", "localhost:8080"] {
                assert!(
                    !open(peer, host, None, Some("cross-site")),
                    "{peer:?} {host}"
                );
                let evil = Some("https://evil.example");
                assert!(
                    !open(peer, host, evil, Some("cross-site")),
                    "{peer:?} {host}"
                );
            }
        }
    }

    #[test]
    fn open_servers_hold_fetches_from_loopback_to_loopback_names() {
        let v4_mapped = Some("::ffff:127.0.0.1".parse().unwrap());
        let rebound = "rebound.example:8080";
        for peer in [LOOPBACK, v4_mapped] {
            // A page that rebound its name to a port-forward: same-origin to itself.
            let own = Some("http://rebound.example:8080");
            assert!(!open(peer, rebound, own, Some("same-origin")));
            assert!(!open(peer, rebound, None, Some("same-origin")));
            // Fetch metadata of this site, but an Origin of another (no browser sends both).
            let evil = Some("https://evil.example");
            assert!(!open(peer, "localhost:8080", evil, Some("same-origin")));
            // Without fetch metadata (a browser from before 2023) it passes: not covered.
            assert!(open(peer, rebound, own, None));
            assert!(open(peer, "localhost:8080", evil, None));
            // A page this machine serves, and every client that is no browser.
            assert!(open(
                peer,
                "localhost:8080",
                Some("http://localhost:3000"),
                Some("same-site")
            ));
            assert!(open(peer, rebound, None, None));
            assert!(open(peer, "router.agentcube.svc:8080", None, None));
        }
        // From another address, names are the network's business: a page on its own site.
        let own = Some("https://agents.example");
        assert!(open(REMOTE, "agents.example", own, Some("same-origin")));
        assert!(open(REMOTE, "agents.example", None, Some("none")));
        assert!(open(
            None,
            rebound,
            Some("http://rebound.example:8080"),
            Some("same-origin")
        ));
    }

    #[test]
    fn off_refuses_nothing_and_local_keeps_its_rules() {
        let f = Fields {
            host: Some(b"rebound.example"),
            origin: Some(b"https://evil.example"),
            fetch_site: Some(b"cross-site"),
        };
        assert!(Guard::Off.refusal(LOOPBACK, f).is_none());
        assert_eq!(Guard::unless_authenticated(true), Guard::Off);
        assert_eq!(Guard::unless_authenticated(false), Guard::Open);
        // Local: a foreign Host is refused from any peer, and without a browser's marks.
        let unmarked = Fields {
            host: Some(b"rebound.example"),
            ..Fields::default()
        };
        assert!(Guard::Local.refusal(REMOTE, unmarked).is_some());
        assert!(Guard::Open.refusal(LOOPBACK, unmarked).is_none());
    }
}
