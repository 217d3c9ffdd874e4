//! Which requests the lane takes, and the `http::Request` made of one.
//!
//! Taken: `GET` or `POST`, HTTP/1.1, an origin-form target (`/…`), at most [`MAX_HEADERS`]
//! headers, no `Transfer-Encoding`, `Upgrade`, `Expect` or `HTTP2-Settings`, `Connection` made
//! of `keep-alive`/`close` only, at most one `Content-Length` (digits only, at most
//! [`MAX_BODY`]), a target made only of the characters of RFC 3986 paths and queries (no
//! fragment, nothing `http`'s URI parser would alter), the whole body read before the handler
//! runs. Anything else, including anything httparse rejects, is hyper's: the lane never answers
//! a request it did not fully understand.
//!
//! A request taken is a [`LaneRequest`]: its head's bytes as they arrived, which a component's
//! [`crate::LaneFront`] may answer from directly (the Router forwards them without building
//! `http` types), or an `http::Request` made of them.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// Longest head the lane waits for; a longer one is hyper's (its own limits and errors apply).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Largest body the lane takes; larger ones stream through hyper.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Most headers the lane takes (hyper's limit is 100; between the two, hyper decides).
pub(crate) const MAX_HEADERS: usize = 64;

/// What the bytes read so far hold.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// The head is not complete yet, and nothing so far rules the lane out.
    Partial,
    /// The head is whole and the lane's; not all of the body has arrived yet.
    Body,
    /// Not the lane's: hyper takes the connection from these bytes on.
    Hyper,
    /// A request, taken off the front of the buffer.
    Ready(LaneRequest, Asks),
}

/// What the request's headers ask of the connection and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asks {
    /// Keep the connection open after the answer (no `Connection: close`).
    pub(crate) keep_alive: bool,
    /// `TE: trailers`: the answer may end with trailer fields.
    pub(crate) trailers: bool,
}

/// Where one header line's name and value are in the head (a head is shorter than 64 KiB).
#[derive(Debug, Clone, Copy, Default)]
struct Line {
    name: (u16, u16),
    value: (u16, u16),
}

/// Framing seen in the headers.
#[derive(Default)]
struct Framing {
    length: Option<usize>,
    close: bool,
    trailers: bool,
}

/// Reads a request off the front of `buf` if it is one the lane takes, whole.
pub(crate) fn parse(buf: &mut BytesMut) -> Parsed {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Hyper,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("POST") => Method::POST,
        _ => return Parsed::Hyper,
    };
    let path = req.path.unwrap_or_default();
    if req.version != Some(1) || !path.starts_with('/') || head_len > MAX_HEAD {
        return Parsed::Hyper;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start as u16, (start + s.len()) as u16)
    };
    if !path.bytes().all(|b| TARGET[usize::from(b)]) {
        return Parsed::Hyper;
    }
    let target = at(path.as_bytes());
    let mut framing = Framing::default();
    let mut lines = [Line::default(); MAX_HEADERS];
    for (line, h) in lines.iter_mut().zip(req.headers.iter()) {
        if !framing.note(h.name.as_bytes(), h.value) {
            return Parsed::Hyper;
        }
        *line = Line {
            name: at(h.name.as_bytes()),
            value: at(h.value),
        };
    }
    let lines = lines[..req.headers.len()].to_vec();
    let body_len = framing.length.unwrap_or(0);
    if buf.len() < head_len + body_len {
        return Parsed::Body;
    }
    let head = buf.split_to(head_len).freeze();
    let body = buf.split_to(body_len).freeze();
    let req = LaneRequest {
        method,
        head,
        target,
        lines,
        body,
    };
    let asks = Asks {
        keep_alive: !framing.close,
        trailers: framing.trailers,
    };
    Parsed::Ready(req, asks)
}

/// The bytes a target the lane takes may hold: RFC 3986's `pchar`s, `/` and `?` (so no
/// fragment). `http`'s URI parser keeps every one of them as it is (`targets_the_lane_takes_parse_unaltered`),
/// so the target's bytes are exactly the path and query an `http::Request` would carry.
const TARGET: [bool; 256] = {
    let mut t = [false; 256];
    let extra = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric();
        i += 1;
    }
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
};

/// A request the lane took, as it arrived: its head's bytes (shared, never copied), where its
/// target and fields are in them, and its whole body.
#[derive(Debug)]
pub struct LaneRequest {
    method: Method,
    head: Bytes,
    target: (u16, u16),
    lines: Vec<Line>,
    body: Bytes,
}

impl LaneRequest {
    /// The most fields a request the lane takes has.
    pub const MAX_FIELDS: usize = MAX_HEADERS;

    /// `GET` or `POST`.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The target as sent (path and query; ASCII: only RFC 3986's path and query characters).
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.head[range(self.target)]).unwrap_or("/")
    }

    /// The target's bytes, shared with the head.
    pub fn target_bytes(&self) -> Bytes {
        self.head.slice(range(self.target))
    }

    /// The header fields in the order they arrived: names as written (valid tokens), values
    /// as `http::HeaderValue` accepts them (obs-text allowed).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .iter()
            .map(|l| (&self.head[range(l.name)], &self.head[range(l.value)]))
    }

    /// The first value of the field `name` (matched ignoring ASCII case).
    pub fn first(&self, name: &str) -> Option<&[u8]> {
        // Lengths first: most fields are passed over without slicing the head.
        let name = name.as_bytes();
        let line = self.lines.iter().find(|l| {
            usize::from(l.name.1 - l.name.0) == name.len()
                && self.head[range(l.name)].eq_ignore_ascii_case(name)
        })?;
        Some(&self.head[range(line.value)])
    }

    /// The value of the `i`-th field (in [`LaneRequest::fields`]' order) as an
    /// `http::HeaderValue` sharing the head's bytes.
    pub fn value(&self, i: usize) -> Option<HeaderValue> {
        let line = self.lines.get(i)?;
        HeaderValue::from_maybe_shared(self.head.slice(range(line.value))).ok()
    }

    /// The whole body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The same request as an `http::Request` (`None` only if `http` refused a part the lane
    /// checked: not expected, see the tests).
    pub fn into_request(self) -> Option<Request<Bytes>> {
        build(self.method, &self.head, self.target, &self.lines, self.body)
    }
}

fn range((start, end): (u16, u16)) -> std::ops::Range<usize> {
    usize::from(start)..usize::from(end)
}

impl Framing {
    /// Notes a header; false when it rules the lane out.
    fn note(&mut self, name: &[u8], value: &[u8]) -> bool {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("transfer-encoding") || is("upgrade") || is("expect") || is("http2-settings") {
            return false;
        }
        if is("content-length") {
            let digits =
                !value.is_empty() && value.len() <= 6 && value.iter().all(u8::is_ascii_digit);
            let Some(n) =
                digits.then(|| value.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
            else {
                return false;
            };
            return self.length.replace(n).is_none() && n <= MAX_BODY;
        }
        if is("connection") {
            return value.split(|b| *b == b',').all(|token| {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                    true
                } else {
                    token.eq_ignore_ascii_case(b"keep-alive")
                }
            });
        }
        if is("te") {
            let list = std::str::from_utf8(value).unwrap_or_default();
            self.trailers |= list
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        }
        true
    }
}

fn build(
    method: Method,
    head: &Bytes,
    target: (u16, u16),
    lines: &[Line],
    body: Bytes,
) -> Option<Request<Bytes>> {
    let uri = Uri::from_maybe_shared(head.slice(range(target))).ok()?;
    let mut map = HeaderMap::with_capacity(lines.len());
    for line in lines {
        let name = HeaderName::from_bytes(&head[range(line.name)]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(range(line.value))).ok()?;
        map.append(name, value);
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> (Parsed, usize) {
        let mut buf = BytesMut::from(s.as_bytes());
        let parsed = parse(&mut buf);
        (parsed, buf.len())
    }

    fn is_hyper(s: &str) -> bool {
        matches!(parse_str(s).0, Parsed::Hyper)
    }

    #[test]
    fn a_plain_request_is_taken_whole_and_what_follows_stays() {
        let (parsed, left) = parse_str(
            "POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabcGET",
        );
        let Parsed::Ready(req, asks) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(req.target(), "/a/b?c=d");
        assert_eq!(req.first("X-a"), Some(&b"1"[..]));
        assert_eq!(req.value(0).unwrap(), "x");
        assert_eq!(req.value(3).unwrap(), "2");
        assert_eq!(req.value(4), None);
        let names: Vec<_> = req.fields().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"Host"[..], b"Content-Length", b"X-A", b"x-a"]);
        let req = req.into_request().unwrap();
        assert_eq!(left, 3, "the next request's bytes stay in the buffer");
        assert!(asks.keep_alive && !asks.trailers);
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.body().as_ref(), b"abc");
        let xa: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        let (parsed, _) =
            parse_str("GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\nTE: x, Trailers\r\n\r\n");
        let Parsed::Ready(_, asks) = parsed else {
            panic!("{parsed:?}")
        };
        assert!(!asks.keep_alive && asks.trailers);
    }

    #[test]
    fn incomplete_heads_and_bodies_wait() {
        assert!(matches!(
            parse_str("GET / HTTP/1.1\r\nHost:").0,
            Parsed::Partial
        ));
        let (parsed, left) = parse_str("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nab");
        assert!(matches!(parsed, Parsed::Body), "{parsed:?}");
        assert_eq!(left, 40, "nothing is taken until the body is whole");
        let long = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(is_hyper(&long));
    }

    #[test]
    fn anything_unusual_goes_to_hyper() {
        for req in [
            "HEAD / HTTP/1.1\r\n\r\n",
            "PUT / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nhttp2-settings: x\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nab",
            "POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\na",
            "POST / HTTP/1.1\r\ncontent-length: 1 1\r\n\r\na",
            "POST / HTTP/1.1\r\ncontent-length: 65537\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header: a\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            "GET /a#b HTTP/1.1\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\n\r\n",
            "GET /{a} HTTP/1.1\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01",
        ] {
            assert!(is_hyper(req), "{req:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: a\r\n")).collect();
        assert!(is_hyper(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    }

    #[test]
    fn targets_the_lane_takes_parse_unaltered() {
        // Every target byte the lane takes is kept as it is by `http`'s URI parser (so the
        // target's bytes are the `http::Request`'s path and query), and every other one goes
        // to hyper.
        for b in 0x21..=0x7e_u8 {
            let target = format!("/a{}b?c{}d", b as char, b as char);
            let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
            match parse_str(&raw).0 {
                Parsed::Ready(req, _) => {
                    assert!(TARGET[usize::from(b)]);
                    assert_eq!(req.target(), target);
                    let req = req
                        .into_request()
                        .expect("http accepts what the lane takes");
                    assert_eq!(req.uri().path_and_query().unwrap().as_str(), target);
                }
                Parsed::Hyper => assert!(!TARGET[usize::from(b)], "{}", b as char),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn fields_the_lane_takes_make_an_http_request() {
        // httparse's field checks are at least as strict as `http`'s: whatever the lane takes
        // becomes an `http::Request` (so a front may look at the raw fields and still hand
        // the request on).
        for b in 0..=255_u8 {
            for raw in [
                [&b"GET / HTTP/1.1\r\nx"[..], &[b], b"y: v\r\n\r\n"].concat(),
                [&b"GET / HTTP/1.1\r\nx: a"[..], &[b], b"b\r\n\r\n"].concat(),
            ] {
                if let Parsed::Ready(req, _) = parse(&mut BytesMut::from(&raw[..])) {
                    assert!(req.into_request().is_some(), "{raw:?}");
                }
            }
        }
    }
}
