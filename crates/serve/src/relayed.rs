//! What a [`crate::LaneFront`] answers: an `http::Response`, or a [`Relayed`] answer whose
//! header fields the app hands over already written (the Router relays a sandbox's answer head
//! from the bytes it arrived in, without building a header map to have it written again).

use axum::body::Body;
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode};

/// The answer to a request the fast lane took.
pub enum LaneResponse {
    Http(Response),
    Relayed(Relayed),
}

impl LaneResponse {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Http(r) => r.status(),
            Self::Relayed(r) => r.status,
        }
    }
}

impl From<LaneResponse> for Response {
    fn from(r: LaneResponse) -> Self {
        match r {
            LaneResponse::Http(r) => r,
            LaneResponse::Relayed(r) => r.into(),
        }
    }
}

impl From<Response> for LaneResponse {
    fn from(r: Response) -> Self {
        Self::Http(r)
    }
}

/// An answer with a body of known length whose fields are written already. The lane writes its
/// status line (the status's canonical reason, as hyper does), `fields` as they are, then
/// `connection: close` when the connection closes after it and `date` unless `has_date`, then
/// the body's `len` bytes: the bytes hyper's server writes for the same `http::Response`
/// (`From<Relayed> for Response`), but for the order of differently named fields.
pub struct Relayed {
    /// Neither 1xx, 204 nor 304 (a status with a body).
    pub status: StatusCode,
    /// `name: value\r\n` lines: names lowercase, values as `HeaderValue` accepts them; one
    /// `content-length` line, equal to `len` (as a number: hyper writes an app's value as it
    /// is, lists of equal lengths included); no `connection`, `transfer-encoding` or `trailer`.
    pub fields: Vec<u8>,
    /// A `date` line is among `fields`.
    pub has_date: bool,
    pub len: u64,
    pub body: Body,
}

impl From<Relayed> for Response {
    /// The same answer as an `http::Response` (for hyper's connections, and for the lane when
    /// a status has no body). A line that is not a valid field is left out.
    fn from(r: Relayed) -> Self {
        let mut resp = Response::new(r.body);
        *resp.status_mut() = r.status;
        let headers = resp.headers_mut();
        for line in r.fields.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                headers.append(n, v);
            }
        }
        resp
    }
}
