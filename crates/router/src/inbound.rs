//! The two shapes an invocation reaches the handler in: an `http::Request` (from hyper, or one
//! the fast lane handed on), or the fast lane's [`LaneRequest`] — the head's bytes as they
//! arrived, forwarded without building `http` types. The handler ([`crate::server`]) is written
//! once, over [`Inbound`].

use std::future::Future;

use axum::extract::Request;
use bytes::Bytes;
use http::HeaderName;
use http::uri::PathAndQuery;

use agentcube_serve::LaneRequest;

use crate::error::RouterError;
use crate::proxy::{Answered, Forward, Upstream, custom_header};

/// What the invoke handler needs of a request.
pub trait Inbound: Send + 'static {
    /// The path and query, kept (shared, not copied) while the request itself moves on.
    fn held_target(&self) -> HeldTarget;

    /// The first value of the field `name` (a lowercase name).
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;

    /// Sends the request to the sandbox.
    fn forward<'a>(
        self,
        up: &'a Upstream,
        f: Forward<'a>,
    ) -> impl Future<Output = Result<Answered, RouterError>> + Send + 'a;
}

/// A request's path and query, held apart from it.
pub enum HeldTarget {
    Uri(Option<PathAndQuery>),
    /// A fast-lane target's bytes (ASCII: the lane takes no other).
    Lane(Bytes),
}

impl HeldTarget {
    /// The path and query.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Uri(pq) => pq.as_ref().map_or("", |pq| pq.as_str()),
            Self::Lane(b) => std::str::from_utf8(b).unwrap_or_default(),
        }
    }
}

/// The path of a target (all before its `?`).
pub fn path_of(target: &str) -> &str {
    let end = memchr::memchr(b'?', target.as_bytes()).unwrap_or(target.len());
    &target[..end]
}

impl Inbound for Request {
    fn held_target(&self) -> HeldTarget {
        HeldTarget::Uri(self.uri().path_and_query().cloned())
    }

    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        custom_header(self.headers(), name).map(|v| v.as_bytes())
    }

    fn forward<'a>(
        self,
        up: &'a Upstream,
        f: Forward<'a>,
    ) -> impl Future<Output = Result<Answered, RouterError>> + Send + 'a {
        up.forward(self, f)
    }
}

impl Inbound for LaneRequest {
    fn held_target(&self) -> HeldTarget {
        HeldTarget::Lane(self.target_bytes())
    }

    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        LaneRequest::first(self, name.as_str())
    }

    fn forward<'a>(
        self,
        up: &'a Upstream,
        f: Forward<'a>,
    ) -> impl Future<Output = Result<Answered, RouterError>> + Send + 'a {
        up.forward_lane(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_targets_and_paths_match_the_uri() {
        for target in ["/a/b?c=d", "/a", "/a?", "/?x?y", "/a%20b/c?d=/e"] {
            let uri: http::Uri = target.parse().unwrap();
            let lane = HeldTarget::Lane(Bytes::from(target));
            let held = HeldTarget::Uri(uri.path_and_query().cloned());
            assert_eq!(lane.as_str(), target);
            assert_eq!(held.as_str(), target);
            assert_eq!(path_of(target), uri.path(), "{target}");
        }
    }
}
