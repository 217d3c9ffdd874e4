//! The Router's own HTTP/1.1 codec for the requests it sends to sandboxes: the request head
//! written straight from the `http` types or from the client's own field bytes (fast-lane
//! requests), the response head parsed by `httparse` (hyper's own parser, default strictness)
//! into a header map or, for an answer with a length to a fast-lane request, into the field
//! lines the fast lane relays as they came ([`Relay`]), the response body framed as RFC 9112
//! §6.3 says.
//!
//! The other end runs untrusted code, so framing is strict and anything ambiguous is an error
//! (the connection is then never reused): `Content-Length` together with `Transfer-Encoding`,
//! differing or malformed lengths, a chunk-size line that is not hex digits first, a bare LF in
//! it, a chunk not followed by CRLF, oversized heads, chunk lines or trailers. Errors are
//! `io::Error`s of kind `InvalidData` (a sandbox that answers garbage is unreachable, as when
//! hyper's client parsed it).
//!
//! Only the hot path's requests use it: bodies already buffered, no upgrades (see `pool`).

use std::io;

use agentcube_types::headers::ROUTER_ERROR;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// The most response headers (and trailers) accepted; hyper's default too.
pub const MAX_HEADERS: usize = 100;
/// The longest response head accepted (all of status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line (with its extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The longest trailer section accepted.
pub const MAX_TRAILERS: usize = 16 * 1024;

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A request head being written into a buffer: the request line, then [`RequestHead::header`]
/// for each field, then [`RequestHead::finish`].
pub struct RequestHead<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> RequestHead<'a> {
    /// Starts the head in `out`, with room for `fields` bytes of header fields and a body of
    /// `body` bytes after the head (one allocation for the whole request).
    pub fn start(
        out: &'a mut Vec<u8>,
        method: &Method,
        target: &str,
        fields: usize,
        body: usize,
    ) -> Self {
        out.reserve(method.as_str().len() + target.len() + fields + 64 + body);
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        Self { out }
    }

    /// One field; `content-length` and `transfer-encoding` are left out (the length is
    /// [`RequestHead::finish`]'s).
    pub fn header(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            return;
        }
        self.out.extend_from_slice(name.as_str().as_bytes());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Ends the head, with `content-length: body_len` when given.
    pub fn finish(self, body_len: Option<usize>) {
        if let Some(n) = body_len {
            self.out.extend_from_slice(b"content-length: ");
            push_decimal(self.out, n);
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// A field as the client wrote it, but for its name in lowercase (as `http`'s `HeaderName`
    /// writes it); `content-length` and `transfer-encoding` are left out, as in
    /// [`RequestHead::header`].
    pub fn raw_header(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            return;
        }
        let at = self.out.len();
        self.out.extend_from_slice(name);
        self.out[at..].make_ascii_lowercase();
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
    }
}

/// A header value as text when it is all visible ASCII (and tabs): what
/// `http::HeaderValue::to_str` accepts.
pub fn visible(value: &[u8]) -> Option<&str> {
    let ok = value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
    ok.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The bytes a header field takes in a head.
pub fn field_len(name: &HeaderName, value: &HeaderValue) -> usize {
    name.as_str().len() + value.len() + 4
}

/// `n` in decimal, without the formatting machinery.
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let (mut i, mut n) = (digits.len(), n);
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a `HEAD` request's response, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Everything until the sandbox closes the connection.
    UntilClose,
}

/// The fields that concern one connection only (RFC 9110 §7.6.1): never sent on, either way.
/// (A `static`: a `const` array of names would be built, and dropped, at every use.)
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// [`HOP_BY_HOP`] as bytes, for fields as they arrived (a `HeaderName`'s text is looked up at
/// each use).
pub const HOP_BY_HOP_RAW: [&[u8]; 9] = [
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub fields: Fields,
    pub framing: Framing,
    /// The connection can carry another request once the body has been read.
    pub keep_alive: bool,
}

/// A response head's fields: a header map, or (asked for, and the body has a length) written
/// out to be relayed.
#[derive(Debug)]
pub enum Fields {
    Map(HeaderMap),
    Relay(Relay),
}

/// The fields of an answer with a body of `len` bytes, to be sent on as they arrived:
/// `name: value\r\n` lines, names lowercased, without the hop-by-hop fields, the fields a
/// `Connection` field names, `Content-Length` but its first field (for an empty body,
/// `content-length: 0` last), the Router's error mark, and the name the caller replaces — the fields hyper's server
/// writes for the same fields as a header map once `proxy::strip_hop_by_hop` has run (the
/// first `Content-Length` value as it is, or its own for an empty body).
#[derive(Debug)]
pub struct Relay {
    pub lines: Vec<u8>,
    pub has_date: bool,
    pub len: u64,
}

/// Room left in [`Relay::lines`] for a field the caller adds (the Router's session id).
const RELAY_SPARE: usize = 96;
/// The most fields `Connection` may name for an answer to be relayed (more: a header map).
const RELAY_NAMED: usize = 8;

/// Parses the final response head at the front of `buf` (consuming it and any interim 1xx
/// responses before it); `None` while it is incomplete. `relay_without`: when the body has a
/// length, the fields are written out ([`Fields::Relay`]), without this one.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    relay_without: Option<&HeaderName>,
) -> io::Result<Option<Head>> {
    let mut places: [Field; MAX_HEADERS] = [[(0, 0); 2]; MAX_HEADERS];
    loop {
        let Some(Located {
            len,
            code,
            http11,
            count,
        }) = locate(buf, &mut places)?
        else {
            return Ok(None);
        };
        let status = code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| invalid("bad status code"))?;
        match status.as_u16() {
            101 => {
                return Err(invalid(
                    "101 Switching Protocols to a request without upgrade",
                ));
            }
            100..=199 => {
                buf.advance(len);
                continue;
            }
            _ => {}
        }
        // The values share the head's bytes (no copy each); the read buffer is whole again
        // once the answer's head has been written out and dropped.
        let head = Received {
            bytes: buf.split_to(len).freeze(),
            places: &places[..count],
        };
        let seen = head.seen();
        let framing = framing(status, &seen, head_request, &head)?;
        let keep_alive = http11 && framing != Framing::UntilClose && !seen.close;
        let relay = match (relay_without, framing) {
            (Some(without), Framing::Length(len)) => head.relay(without, len),
            _ => None,
        };
        let fields = match relay {
            Some(r) => Fields::Relay(r),
            None => Fields::Map(head.map()?),
        };
        return Ok(Some(Head {
            status,
            fields,
            framing,
            keep_alive,
        }));
    }
}

/// A response head taken off the read buffer, and where its fields are in it.
struct Received<'p> {
    bytes: Bytes,
    places: &'p [Field],
}

impl Received<'_> {
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.places
            .iter()
            .map(|&[n, v]| (&self.bytes[span(n)], &self.bytes[span(v)]))
    }

    /// The values of the fields named `name`.
    fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields().filter(|(n, _)| is(n, name)).map(|(_, v)| v)
    }

    fn seen(&self) -> Seen {
        let mut seen = Seen::default();
        for (name, value) in self.fields() {
            seen.field(name, value);
        }
        seen
    }

    fn map(&self) -> io::Result<HeaderMap> {
        // Room for the one header the Router adds to every answer (its session id).
        let mut headers = HeaderMap::with_capacity(self.places.len() + 1);
        for &[name, value] in self.places {
            let name = HeaderName::from_bytes(&self.bytes[span(name)])
                .map_err(|_| invalid("bad response header name"))?;
            let value = self.bytes.slice(span(value));
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| invalid("bad response header value"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }

    /// The fields written out for a relay ([`Relay`]); `None` when `Connection` names more
    /// fields than are looked for here.
    fn relay(&self, without: &HeaderName, len: u64) -> Option<Relay> {
        // The names `Connection` lists (its text values only, as the map path reads them).
        let mut named: [&[u8]; RELAY_NAMED] = [&[]; RELAY_NAMED];
        let mut count = 0;
        for value in self.values(b"connection").filter_map(visible) {
            for token in list(value.as_bytes()) {
                *named.get_mut(count)? = token;
                count += 1;
            }
        }
        let named = &named[..count];
        let without = without.as_str().as_bytes();
        let mut lines = Vec::with_capacity(self.bytes.len() + RELAY_SPARE);
        let (mut has_date, mut length) = (false, false);
        for (name, value) in self.fields() {
            if is(name, without)
                || is(name, ROUTER_ERROR.as_bytes())
                || HOP_BY_HOP_RAW.iter().any(|h| is(name, h))
                || named.iter().any(|t| t.eq_ignore_ascii_case(name))
            {
                continue;
            }
            if is(name, b"content-length") {
                // hyper writes an answer's first length as it is, but for an empty body its own.
                if length || len == 0 {
                    continue;
                }
                length = true;
            }
            has_date |= is(name, b"date");
            let at = lines.len();
            lines.extend_from_slice(name);
            lines[at..].make_ascii_lowercase();
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(value);
            lines.extend_from_slice(b"\r\n");
        }
        if len == 0 {
            lines.extend_from_slice(b"content-length: 0\r\n");
        }
        Some(Relay {
            lines,
            has_date,
            len,
        })
    }
}

/// Whether a field's name (as it arrived) is `name` (lowercase).
fn is(raw: &[u8], name: &[u8]) -> bool {
    raw.eq_ignore_ascii_case(name)
}

/// What the framing headers said.
#[derive(Default)]
struct Seen {
    transfer_encoding: bool,
    /// The one length every `Content-Length` value agrees on, or why there is none.
    length: Option<Result<u64, &'static str>>,
    close: bool,
}

impl Seen {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if is(name, b"content-length") {
            self.content_length(value);
        } else if is(name, b"transfer-encoding") {
            self.transfer_encoding = true;
        } else if is(name, b"connection") {
            self.close |= list(value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }

    fn content_length(&mut self, value: &[u8]) {
        for part in list_members(value) {
            let next = match (digits(part), self.length) {
                (_, Some(Err(_))) => return,
                (None, _) => Err("bad content-length"),
                (Some(n), Some(Ok(found))) if n != found => Err("differing content-length values"),
                (Some(n), _) => Ok(n),
            };
            self.length = Some(next);
        }
    }
}

/// The members of a comma-separated header value, trimmed (empty ones included).
fn list_members(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The non-empty members of a comma-separated header value.
pub fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    list_members(value).filter(|t| !t.is_empty())
}

/// Where one header field's name and value are in the head: (start, length) of each.
type Field = [(u32, u32); 2];

/// The bytes a (start, length) place covers.
fn span((at, n): (u32, u32)) -> std::ops::Range<usize> {
    at as usize..(at + n) as usize
}

/// A complete head at the front of the read buffer, not yet consumed.
struct Located {
    len: usize,
    code: Option<u16>,
    http11: bool,
    /// How many fields it has (their places are in the caller's `fields`).
    count: usize,
}

/// Parses the head at the front of `buf` without consuming it (the places of its fields
/// written to `fields`).
fn locate(buf: &BytesMut, fields: &mut [Field; MAX_HEADERS]) -> io::Result<Option<Located>> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(invalid("response head too large")),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(invalid("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(invalid("too many response headers")),
        Err(_) => return Err(invalid("malformed response head")),
    };
    // httparse hands out slices of `buf`: where each starts is its distance from `buf`'s
    // start (the head is at most `MAX_HEAD` bytes, so it fits in a u32).
    let base = buf.as_ptr() as usize;
    let place = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
    for (f, h) in fields.iter_mut().zip(resp.headers.iter()) {
        *f = [place(h.name.as_bytes()), place(h.value)];
    }
    Ok(Some(Located {
        len,
        code: resp.code,
        http11: resp.version == Some(1),
        count: resp.headers.len(),
    }))
}

fn framing(
    status: StatusCode,
    seen: &Seen,
    head_request: bool,
    head: &Received<'_>,
) -> io::Result<Framing> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    match (seen.transfer_encoding, seen.length) {
        (true, Some(_)) => Err(invalid("both transfer-encoding and content-length")),
        (true, None) => transfer_coding(head),
        (false, Some(length)) => length.map(Framing::Length).map_err(invalid),
        (false, None) => Ok(Framing::UntilClose),
    }
}

/// Chunked when `chunked` is the last coding (and appears only there), else until close.
fn transfer_coding(head: &Received<'_>) -> io::Result<Framing> {
    let (mut codings, mut first_chunked) = (0, None);
    for v in head.values(b"transfer-encoding") {
        let v = visible(v).ok_or_else(|| invalid("bad transfer-encoding"))?;
        for coding in list(v.as_bytes()) {
            if first_chunked.is_none() && coding.eq_ignore_ascii_case(b"chunked") {
                first_chunked = Some(codings);
            }
            codings += 1;
        }
    }
    match first_chunked {
        Some(i) if i + 1 == codings => Ok(Framing::Chunked),
        Some(_) => Err(invalid("chunked is not the final transfer coding")),
        None => Ok(Framing::UntilClose),
    }
}

fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// What [`decode_chunked`] found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    /// The next this many bytes of the buffer are data (the caller takes them).
    Data(usize),
    /// The body's trailers (the body ends after them).
    Trailers(HeaderMap),
    /// The body has ended (no trailers).
    End,
    /// More bytes are needed.
    More,
}

/// Decodes what it can of a chunked body from the front of `buf`.
pub fn decode_chunked(buf: &mut BytesMut, state: &mut Chunked) -> io::Result<Decoded> {
    loop {
        match *state {
            Chunked::Size => match chunk_size(buf)? {
                None => return Ok(Decoded::More),
                Some(0) => *state = Chunked::Trailers,
                Some(n) => *state = Chunked::Data(n),
            },
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                *state = match left - take as u64 {
                    0 => Chunked::DataEnd,
                    rest => Chunked::Data(rest),
                };
                return Ok(Decoded::Data(take));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => return trailers(buf),
        }
    }
}

/// A chunk-size line at the front of `buf`, consumed: its size, `None` while incomplete.
fn chunk_size(buf: &mut BytesMut) -> io::Result<Option<u64>> {
    if buf.is_empty() {
        return Ok(None);
    }
    if !buf[0].is_ascii_hexdigit() {
        return Err(invalid("chunk size is not hex"));
    }
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((len, size))) => {
            if len > MAX_CHUNK_LINE {
                return Err(invalid("chunk-size line too long"));
            }
            // httparse lets any byte through in extensions; a bare LF there is how parsers are
            // told apart, so it is refused.
            if buf[..len - 2].contains(&b'\n') {
                return Err(invalid("bare LF in chunk-size line"));
            }
            buf.advance(len);
            Ok(Some(size))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_CHUNK_LINE => {
            Err(invalid("chunk-size line too long"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(invalid("malformed chunk size")),
    }
}

fn trailers(buf: &mut BytesMut) -> io::Result<Decoded> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Decoded::End);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(done)) if done.0 <= MAX_TRAILERS => done,
        Ok(httparse::Status::Complete(_)) => return Err(invalid("trailers too large")),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_TRAILERS => {
            return Err(invalid("trailers too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Decoded::More),
        Err(_) => return Err(invalid("malformed trailers")),
    };
    // httparse ends lines at a bare LF too; hyper's chunked decoder (and RFC 9112) do not.
    if bare_lf(&buf[..len]) {
        return Err(invalid("bare LF in trailers"));
    }
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name =
            HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| invalid("bad trailer name"))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| invalid("bad trailer value"))?;
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Decoded::Trailers(map))
}

/// Whether a line in `b` ends with a LF that has no CR before it.
fn bare_lf(b: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', b).any(|i| i == 0 || b[i - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_is_what_header_values_to_str_accepts() {
        let mut values: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b'a', b, b'z']).collect();
        values.extend(["é".into(), "a b\tc".into(), Vec::new()]);
        for v in values {
            if let Ok(hv) = HeaderValue::from_bytes(&v) {
                assert_eq!(visible(&v), hv.to_str().ok(), "{v:?}");
            }
        }
    }

    /// `raw` parsed; parsed again with its fields relayed, to the same framing and verdict.
    fn head(raw: &str) -> io::Result<Option<Head>> {
        let parsed = parse_response(&mut BytesMut::from(raw), false, None);
        let relayed = parse_response(&mut BytesMut::from(raw), false, Some(&header::SERVER));
        match (&parsed, &relayed) {
            (Ok(Some(a)), Ok(Some(b))) => {
                assert_eq!(
                    (a.status, a.framing, a.keep_alive),
                    (b.status, b.framing, b.keep_alive)
                );
            }
            (a, b) => assert_eq!(
                (a.as_ref().map(Option::is_some).ok(), a.is_err()),
                (b.as_ref().map(Option::is_some).ok(), b.is_err()),
                "{raw:?}"
            ),
        }
        parsed
    }

    #[test]
    fn hop_by_hop_names_are_listed_alike() {
        let names: Vec<&[u8]> = HOP_BY_HOP.iter().map(|n| n.as_str().as_bytes()).collect();
        assert_eq!(names, HOP_BY_HOP_RAW);
    }

    fn relayed(raw: &[u8]) -> Option<Relay> {
        let without = HeaderName::from_static("x-agentcube-session-id");
        let h = parse_response(&mut BytesMut::from(raw), false, Some(&without));
        match h.unwrap().unwrap().fields {
            Fields::Relay(r) => Some(r),
            Fields::Map(_) => None,
        }
    }

    #[test]
    fn relayed_fields_are_what_the_map_path_sends_on() {
        let r = relayed(
            b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nConnection: X-Drop, close\r\nX-Drop: 1\r\n\
              Keep-Alive: t\r\nX-Agentcube-Session-Id: spoof\r\ncontent-length: 2, 2\r\n\
              Content-Length: 2\r\nDate: d\r\nX-A: \x80\tz\r\nTE: x\r\nUpgrade: h2c\r\n\r\nok",
        )
        .expect("relayed");
        assert_eq!(
            String::from_utf8_lossy(&r.lines),
            "content-type: a\r\ncontent-length: 2, 2\r\ndate: d\r\nx-a: \u{fffd}\tz\r\n"
        );
        assert!(r.has_date);
        assert_eq!(r.len, 2);
        assert!(r.lines.capacity() >= r.lines.len() + RELAY_SPARE);
        let r = relayed(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0, 0\r\nx: 1\r\n\r\n").unwrap();
        assert_eq!(
            (&r.lines[..], r.has_date, r.len),
            (&b"x: 1\r\ncontent-length: 0\r\n"[..], false, 0)
        );
        // Not relayed: no length, no body, or more named fields than are looked for.
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let many = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: a,b,c,d,e,f,g,h,i\r\n\r\n";
        for raw in [
            &chunked[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            &many[..],
        ] {
            assert!(relayed(raw).is_none(), "{}", String::from_utf8_lossy(raw));
        }
        let eight =
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: a,b,c,d,e,f,g,h\r\nh: 1\r\n\r\n";
        assert_eq!(relayed(eight).unwrap().lines, b"content-length: 0\r\n");
    }

    #[test]
    fn request_heads_carry_our_length_only() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("10.0.0.1:8080"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        let mut head = RequestHead::start(&mut out, &Method::POST, "/api/execute?x=1", 80, 12);
        for (n, v) in &h {
            head.header(n, v);
        }
        head.raw_header(b"X-Raw", b"As Sent");
        head.raw_header(b"Content-Length", b"7");
        head.raw_header(b"transfer-Encoding", b"chunked");
        head.finish(Some(12));
        let (len, cap) = (out.len(), out.capacity());
        out.extend_from_slice(b"twelve bytes");
        assert_eq!(
            out.capacity(),
            cap,
            "room for the body from the start ({len})"
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /api/execute?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nx-a: 1\r\nx-a: 2\r\n\
             x-raw: As Sent\r\ncontent-length: 12\r\n\r\ntwelve bytes"
        );
        let mut out = Vec::new();
        RequestHead::start(&mut out, &Method::GET, "/", 0, 0).finish(None);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &str| head(raw).unwrap().unwrap().framing;
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            Framing::Empty
        );
        let h = parse_response(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            true,
            None,
        );
        assert_eq!(h.unwrap().unwrap().framing, Framing::Empty);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
        ] {
            assert!(head(raw).is_err(), "{raw:?}");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(head(&huge).is_err());
        assert!(
            head(&format!("{huge}\r\n\r\n")).is_err(),
            "complete, and still too large"
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err());
    }

    #[test]
    fn interim_responses_are_skipped_and_keep_alive_is_read() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        );
        let h = parse_response(&mut buf, false, None).unwrap().unwrap();
        assert_eq!((h.status, h.keep_alive), (StatusCode::OK, true));
        assert_eq!(&buf[..], b"ok");
        let h =
            head("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.unwrap().unwrap().keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.unwrap().unwrap().keep_alive);
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
    }

    fn decode_all(raw: &[u8]) -> io::Result<(Vec<u8>, Option<HeaderMap>, usize)> {
        let mut buf = BytesMut::from(raw);
        let mut state = Chunked::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunked(&mut buf, &mut state)? {
                Decoded::Data(n) => out.extend_from_slice(&buf.split_to(n)),
                Decoded::Trailers(t) => return Ok((out, Some(t), buf.len())),
                Decoded::End => return Ok((out, None, buf.len())),
                Decoded::More => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let (body, trailers, left) =
            decode_all(b"5\r\nhello\r\na;ext=1\r\n, world!!!\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!(
            (&body[..], trailers.is_none(), left),
            (&b"hello, world!!!"[..], true, 4)
        );
        let (body, trailers, _) = decode_all(b"2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n").unwrap();
        assert_eq!(body, b"ok");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        // Byte by byte, the same.
        let raw = b"3\r\nabc\r\n0\r\n\r\n";
        let (mut buf, mut state, mut out) = (BytesMut::new(), Chunked::Size, Vec::new());
        for &b in raw.iter() {
            buf.extend_from_slice(&[b]);
            loop {
                match decode_chunked(&mut buf, &mut state).unwrap() {
                    Decoded::Data(n) => out.extend_from_slice(&buf.split_to(n)),
                    Decoded::More => break,
                    Decoded::End => {
                        assert_eq!(out, b"abc");
                        return;
                    }
                    Decoded::Trailers(_) => panic!("no trailers were sent"),
                }
            }
        }
        panic!("never ended");
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for raw in [
            &b"\r\nhello\r\n0\r\n\r\n"[..],
            b";x\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"2\r\nok\r\n0\r\nbad trailer: x\r\n\r\n",
            b"2\r\nok\r\n0\r\nx-t: 1\n\r\n",
            b"2\r\nok\r\n0\r\nx-t: 1\r\n\n",
        ] {
            assert!(
                matches!(decode_all(raw), Err(e) if e.kind() == io::ErrorKind::InvalidData),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = format!("5;{}", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_all(long.as_bytes()).is_err());
        // Complete but too long: refused all the same.
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_all(long.as_bytes()).is_err());
        let big = format!("0\r\nx: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        assert!(decode_all(big.as_bytes()).is_err());
    }

    /// Deterministic random cases (seeded).
    struct Rng(fastrand::Rng);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0.u64(..n)
        }
    }

    const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

    /// A chunked body (random chunk sizes, hex case, extensions, trailers) and its data.
    fn random_chunked(r: &mut Rng) -> (Vec<u8>, Vec<u8>) {
        let (mut raw, mut data) = (Vec::new(), Vec::new());
        for _ in 0..r.below(6) {
            let n = 1 + r.below(300) as usize;
            let chunk: Vec<u8> = (0..n).map(|_| r.below(256) as u8).collect();
            let size = match r.below(2) {
                0 => format!("{n:x}"),
                _ => format!("{n:X}"),
            };
            raw.extend_from_slice(size.as_bytes());
            if r.below(3) == 0 {
                raw.extend_from_slice(b";ext=v");
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&chunk);
            raw.extend_from_slice(b"\r\n");
            data.extend_from_slice(&chunk);
        }
        raw.extend_from_slice(b"0\r\n");
        if r.below(2) == 0 {
            raw.extend_from_slice(b"x-trailer: t\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        (raw, data)
    }

    /// The data this codec decodes from `body` fed in random pieces; `None` if it refuses it or
    /// it never ends.
    fn ours(body: &[u8], r: &mut Rng) -> Option<Vec<u8>> {
        let (mut buf, mut state, mut out) = (BytesMut::new(), Chunked::Size, Vec::new());
        let mut rest = body;
        loop {
            match decode_chunked(&mut buf, &mut state).ok()? {
                Decoded::Data(n) => out.extend_from_slice(&buf.split_to(n)),
                Decoded::Trailers(_) | Decoded::End => return Some(out),
                Decoded::More if rest.is_empty() => return None,
                Decoded::More => {
                    let k = (1 + r.below(64) as usize).min(rest.len());
                    buf.extend_from_slice(&rest[..k]);
                    rest = &rest[k..];
                }
            }
        }
    }

    /// The data hyper's client reads from the same answer; `None` if it refuses it.
    async fn hyper_reads(body: &[u8]) -> Option<Vec<u8>> {
        use http_body_util::BodyExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let io = hyper_util::rt::TokioIo::new(client);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
        tokio::spawn(conn);
        let answer = [CHUNKED_HEAD, body].concat();
        tokio::spawn(async move {
            let _ = server.read(&mut [0u8; 1024]).await;
            let _ = server.write_all(&answer).await;
            let _ = server.shutdown().await;
        });
        let req = http::Request::get("/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.ok()?;
        let read = tokio::time::timeout(std::time::Duration::from_secs(2), resp.collect());
        Some(read.await.ok()?.ok()?.to_bytes().to_vec())
    }

    /// Random chunked bodies, whole and with one byte changed: whatever this codec accepts,
    /// hyper's client reads as the same data; whatever well-formed, it accepts.
    #[tokio::test]
    async fn chunked_bodies_are_read_as_hyper_reads_them() {
        let mut r = Rng(fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15));
        let (mut stricter, mut refused) = (0, 0);
        for case in 0..400 {
            let (mut body, data) = random_chunked(&mut r);
            let mutated = case % 2 == 1;
            if mutated {
                let at = r.below(body.len() as u64) as usize;
                let bytes = b"0aF;\r\n \t=xZ";
                body[at] = bytes[r.below(bytes.len() as u64) as usize];
            }
            let (ours, theirs) = (ours(&body, &mut r), hyper_reads(&body).await);
            let shown = String::from_utf8_lossy(&body).into_owned();
            if !mutated {
                assert_eq!(ours.as_deref(), Some(&data[..]), "well-formed: {shown:?}");
            }
            match (&ours, &theirs) {
                (Some(o), Some(t)) => assert_eq!(o, t, "read differently: {shown:?}"),
                (Some(_), None) => panic!("taken here, refused by hyper: {shown:?}"),
                (None, Some(_)) => stricter += 1,
                (None, None) => refused += 1,
            }
        }
        // The mutations do reach both outcomes (else this test would prove little).
        assert!(refused > 20, "only {refused} mutated bodies were refused");
        assert!(
            stricter < 20,
            "{stricter} bodies refused here that hyper read"
        );
    }
}
