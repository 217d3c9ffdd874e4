//! A response head, written as hyper's HTTP/1.1 server writes it for a `GET` or `POST`
//! (`hyper::proto::h1::role::Server::encode`): the same status line, header order and case,
//! framing headers, `Date`, and the same choice of framing. The lane's differential test
//! compares the two byte for byte.
//!
//! Where hyper refuses a response (`1xx`, conflicting lengths) the lane does what hyper does:
//! a bodiless `500` for `1xx`, nothing at all (the connection closes) for a length conflict.
//! One deliberate difference: an app's `Transfer-Encoding` not ending in `chunked` gets
//! `, chunked` appended on its own line only (hyper also appends it to every later header
//! line that closes a merged value, e.g. `connection: close, chunked`).

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::Relayed;

/// How much body an app's response says it has (`http_body::Body`'s end and size hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLen {
    /// `is_end_stream()`: no body at all.
    None,
    Known(u64),
    Unknown,
}

/// How the body goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes (0: the body is not polled at all).
    Length(u64),
    /// Chunked; trailers named in the response's `Trailer` header are sent, others dropped.
    Chunked(Option<Vec<HeaderName>>),
}

/// A head written: its framing, and whether the connection closes after it.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) framing: Framing,
    pub(crate) last: bool,
}

/// The response was one hyper refuses to send (conflicting or invalid lengths): nothing is
/// written and the connection closes.
#[derive(Debug)]
pub(crate) struct Refused;

/// The `Date` value, formatted at most once a second (as hyper caches it).
#[derive(Debug, Default)]
pub(crate) struct Date {
    second: u64,
    text: String,
}

impl Date {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

/// Writes the head of a response to a `GET`/`POST` into `out`. `keep_alive`: the request
/// asked for it and the server is not shutting down.
pub(crate) fn encode(
    status: StatusCode,
    headers: &mut HeaderMap,
    body: BodyLen,
    keep_alive: bool,
    date: &mut Date,
    out: &mut Vec<u8>,
) -> Result<Head, Refused> {
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        // hyper cannot send a 1xx as the response: a bodiless 500, and the connection closes.
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        let mut none = HeaderMap::new();
        let head = write(status, &mut none, BodyLen::None, true, date, out)?;
        return Ok(head);
    }
    if !keep_alive {
        close_header(headers);
    }
    let last = !keep_alive || status == StatusCode::SWITCHING_PROTOCOLS;
    write(status, headers, body, last, date, out)
}

/// `Connection: close` on a response of a connection that closes after it (hyper's
/// `enforce_version`).
fn close_header(headers: &mut HeaderMap) {
    match headers.entry(header::CONNECTION) {
        header::Entry::Occupied(mut e) => {
            if !e.iter().any(|v| has_token(v, "close")) {
                e.append(HeaderValue::from_static("close"));
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static("close"));
        }
    }
}

/// Whether a (visible ASCII) list value has `token`, as hyper reads it.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The head of a [`Relayed`] answer: its status line, its fields, then `connection: close` and
/// `date` as [`encode`] adds them to the same answer as an `http::Response`.
pub(crate) fn relayed(r: &Relayed, keep_alive: bool, date: &mut Date, out: &mut Vec<u8>) -> Head {
    status_line(r.status, out);
    out.extend_from_slice(&r.fields);
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !r.has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.now());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Head {
        framing: Framing::Length(r.len),
        last: !keep_alive,
    }
}

/// 1xx, 204 and 304 carry no body (and so no framing headers); the lane sees no `HEAD` or
/// `CONNECT`.
pub(crate) fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

fn status_line(status: StatusCode, out: &mut Vec<u8>) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One merged header line: `name: v1, v2…`.
fn merged<'a>(out: &mut Vec<u8>, name: &str, values: impl Iterator<Item = &'a HeaderValue>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
}

fn content_length(v: &HeaderValue) -> Option<u64> {
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn write(
    status: StatusCode,
    headers: &mut HeaderMap,
    body: BodyLen,
    mut last: bool,
    date: &mut Date,
    out: &mut Vec<u8>,
) -> Result<Head, Refused> {
    let start = out.len();
    let refuse = |out: &mut Vec<u8>| {
        out.truncate(start);
        Err(Refused)
    };
    status_line(status, out);
    let chunkable = !bodiless(status);
    let mut framing = Framing::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut trailers: Option<Vec<HeaderName>> = None;
    let mut previous: Option<&HeaderName> = None;
    for (name, value) in headers.iter() {
        // Values of one name come one after the other; framing names are handled whole at
        // their first value.
        let first = !previous.is_some_and(|p| std::ptr::eq(p, name));
        previous = Some(name);
        let framing_name = matches!(
            *name,
            header::CONTENT_LENGTH
                | header::TRANSFER_ENCODING
                | header::CONNECTION
                | header::TRAILER
        );
        if !framing_name {
            wrote_date |= *name == header::DATE;
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
            continue;
        }
        if !first {
            continue;
        }
        let mut values = headers.get_all(name).iter();
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len {
                    return refuse(out);
                }
                let first = values.next().expect("a key has a value");
                match body {
                    BodyLen::Known(n) => framing = Framing::Length(n),
                    BodyLen::Unknown => {
                        let Some(n) = content_length(first) else {
                            return refuse(out);
                        };
                        if values.any(|v| content_length(v) != Some(n)) {
                            return refuse(out);
                        }
                        framing = Framing::Length(n);
                    }
                    BodyLen::None => continue,
                }
                merged(out, "content-length", std::iter::once(first));
                out.extend_from_slice(b"\r\n");
                wrote_len = true;
            }
            header::TRANSFER_ENCODING => {
                if wrote_len {
                    return refuse(out);
                }
                if !chunkable {
                    continue;
                }
                wrote_len = true;
                framing = Framing::Chunked(None);
                let last_value = headers.get_all(name).iter().next_back();
                let ends_chunked = last_value.and_then(|v| v.to_str().ok()).is_some_and(|s| {
                    s.rsplit(',')
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
                });
                merged(out, "transfer-encoding", values);
                if !ends_chunked {
                    out.extend_from_slice(b", chunked");
                }
                out.extend_from_slice(b"\r\n");
            }
            header::CONNECTION => {
                if headers.get_all(name).iter().any(|v| has_token(v, "close")) {
                    last = true;
                }
                merged(out, "connection", values);
                out.extend_from_slice(b"\r\n");
            }
            header::TRAILER => {
                if !chunkable {
                    continue;
                }
                let declared = trailers.get_or_insert_with(Vec::new);
                for v in headers.get_all(name) {
                    let Ok(text) = v.to_str() else { continue };
                    declared.extend(
                        text.split(',')
                            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok()),
                    );
                }
                merged(out, "trailer", values);
                out.extend_from_slice(b"\r\n");
            }
            _ => unreachable!("only framing names get here"),
        }
    }
    if !wrote_len {
        framing = implicit_length(status, body, out);
    }
    if !chunkable {
        framing = Framing::Length(0);
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.now());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let (Framing::Chunked(allowed), Some(declared)) = (&mut framing, trailers) {
        *allowed = Some(declared);
    }
    Ok(Head { framing, last })
}

/// The framing header hyper adds when the app set none.
fn implicit_length(status: StatusCode, body: BodyLen, out: &mut Vec<u8>) -> Framing {
    let with_length = !bodiless(status);
    match body {
        BodyLen::Unknown if with_length => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked(None)
        }
        BodyLen::Known(n) if with_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
            Framing::Length(n)
        }
        BodyLen::None if with_length => {
            out.extend_from_slice(b"content-length: 0\r\n");
            Framing::Length(0)
        }
        _ => Framing::Length(0),
    }
}

/// Trailer fields a response may carry (hyper's list of fields never sent as trailers).
pub(crate) fn trailer_allowed(name: &HeaderName, declared: &[HeaderName]) -> bool {
    use header::*;
    let forbidden = [
        AUTHORIZATION,
        CACHE_CONTROL,
        CONTENT_ENCODING,
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_TYPE,
        HOST,
        MAX_FORWARDS,
        SET_COOKIE,
        TRAILER,
        TRANSFER_ENCODING,
        TE,
    ];
    declared.contains(name) && !forbidden.contains(name)
}

/// The last chunk with the allowed trailers, or `None` when none is allowed (then the body
/// goes on, and ends with a plain last chunk).
pub(crate) fn trailer_section(trailers: &HeaderMap, declared: &[HeaderName]) -> Option<Bytes> {
    let mut out = Vec::new();
    for (name, value) in trailers {
        if trailer_allowed(name, declared) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if out.is_empty() {
        return None;
    }
    let mut section = b"0\r\n".to_vec();
    section.extend_from_slice(&out);
    section.extend_from_slice(b"\r\n");
    Some(section.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: BodyLen,
        keep: bool,
    ) -> (String, Head) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, HeaderValue::from_static(v));
        }
        let status = StatusCode::from_u16(status).unwrap();
        let mut out = Vec::new();
        let mut date = Date::default();
        let head = encode(status, &mut map, body, keep, &mut date, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let date = date.text.clone();
        (text.replace(&date, "<date>"), head)
    }

    #[test]
    fn an_apps_transfer_coding_gets_chunked_appended_on_its_own_line_only() {
        let (text, h) = head(
            200,
            &[("transfer-encoding", "gzip"), ("connection", "close")],
            BodyLen::Unknown,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\ndate: <date>\r\n\r\n"
        );
        assert_eq!(h.framing, Framing::Chunked(None));
        assert!(h.last);
    }

    #[test]
    fn informational_answers_become_a_bodiless_500_and_the_connection_closes() {
        let (text, h) = head(103, &[("link", "</a>")], BodyLen::Known(3), true);
        assert_eq!(
            text,
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\ndate: <date>\r\n\r\n"
        );
        assert_eq!(h.framing, Framing::Length(0));
        assert!(h.last);
    }

    #[test]
    fn relayed_heads_are_written_as_hyper_writes_the_same_response() {
        let cases: [(u16, &[u8], bool, u64, bool); 5] = [
            (200, b"content-type: text/plain\r\ncontent-length: 2\r\n", false, 2, true),
            (200, b"content-length: 2\r\nx-up: 1\r\n", false, 2, false),
            (
                404,
                b"content-length: 3, 3\r\nx-a: 1\r\nx-a: 2\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n",
                true,
                3,
                false,
            ),
            (500, b"server: s\r\ncontent-length: 0\r\n", false, 0, true),
            (299, b"x-obs: \x80\xff\tz\r\ncontent-length: 1\r\n", false, 1, true),
        ];
        for (status, fields, has_date, len, keep) in cases {
            let relayed = Relayed {
                status: StatusCode::from_u16(status).unwrap(),
                fields: fields.to_vec(),
                has_date,
                len,
                body: axum::body::Body::empty(),
            };
            let mut date = Date::default();
            let mut ours = Vec::new();
            let head = super::relayed(&relayed, keep, &mut date, &mut ours);
            let (mut parts, _) = axum::response::Response::from(relayed).into_parts();
            let mut theirs = Vec::new();
            let expected = encode(
                parts.status,
                &mut parts.headers,
                BodyLen::Known(len),
                keep,
                &mut date,
                &mut theirs,
            )
            .unwrap();
            let masked = |b: &[u8]| String::from_utf8_lossy(b).replace(&date.text, "<date>");
            assert_eq!(masked(&ours), masked(&theirs), "{status}");
            assert_eq!((head.framing, head.last), (expected.framing, expected.last));
        }
    }

    #[test]
    fn conflicting_lengths_are_refused_and_nothing_is_written() {
        let mut map = HeaderMap::new();
        map.append("content-length", HeaderValue::from_static("2"));
        map.append("content-length", HeaderValue::from_static("3"));
        let mut out = b"kept".to_vec();
        let refused = encode(
            StatusCode::OK,
            &mut map,
            BodyLen::Unknown,
            true,
            &mut Date::default(),
            &mut out,
        );
        assert!(refused.is_err());
        assert_eq!(out, b"kept");
    }
}
