//! The Kubernetes client of the Workload Manager and the Router: kube-rs's stack, on
//! connections that notice when the API server went away without a word, with a bound on how
//! long a request may go unanswered.
//!
//! kube-rs sets no read timeout (exec and watch streams are long-lived), so a request to an API
//! server that stopped answering — a hung process, a network path that drops packets instead of
//! refusing them — waited until it answered again or TCP gave up (about 15 minutes). And kube-rs
//! builds its connector itself, without keepalive: a pooled connection to an API server whose
//! node vanished (its conntrack entry behind the `kubernetes` Service now a black hole) looked
//! alive until a request went out on it. client-go has HTTP/2 pings for this; kube-rs speaks
//! HTTP/1.1. Here:
//!
//! - every request must have its response headers within the request timeout
//!   ([`REQUEST_TIMEOUT`] in the binaries), then fails with [`is_timeout`];
//! - connections are probed after [`QUIET_BEFORE_PROBE`] of silence, so idle pooled ones (and
//!   quiet watches) to a vanished server are closed before a request picks them;
//! - a request whose bytes go unacknowledged for [`UNACKED_TIMEOUT`] fails with the connection
//!   (`TCP_USER_TIMEOUT`) rather than at the request timeout. Safe here, unlike on the Router's
//!   streamed sandbox connections: the API server reads requests as they come, so its receive
//!   window does not stay shut.
//!
//! The Router's connections to the Workload Manager are made the same way ([`tcp_connector`]).
//!
//! The stack is kube-rs's own (`ClientBuilder::try_from`) rebuilt from its public parts: base
//! URI, TLS from the configuration, its retry policy for `429`/`503`/`504`, authentication,
//! extra headers. Left out: kube-rs's debug-level HTTP spans, gzip (not enabled in this
//! workspace) and its connect/read/write timeouts, which the request timeout covers. A
//! configuration with a `proxy-url` goes through kube-rs's own stack (it knows the proxy
//! protocols), with the request timeout but without the socket options.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

/// How long a request may wait for the API server's answer (its response headers). Longer than
/// the API server's own limit on a request (`--request-timeout`, 1 minute by default), so that
/// a server that is slow but alive answers for itself (504) first.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

/// How long bytes written to the API server may stay unacknowledged before the connection is
/// given up (`TCP_USER_TIMEOUT`; it also ends the keepalive probes of a quiet connection).
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(20);

/// Silence on a connection before the first keepalive probe.
pub const QUIET_BEFORE_PROBE: Duration = Duration::from_secs(30);

/// Between keepalive probes.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

/// A client for `config`, named `user_agent` in the API server's audit log, whose requests fail
/// with [`kube::Error::Service`] ([`is_timeout`]) when unanswered for `request_timeout`.
pub fn client(
    mut config: kube::Config,
    user_agent: &'static str,
    request_timeout: Duration,
) -> Result<kube::Client, kube::Error> {
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(user_agent),
    ));
    let timeout = tower::timeout::TimeoutLayer::new(request_timeout);
    if config.proxy_url.is_some() {
        return Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&timeout)
            .build());
    }
    let https = config.rustls_https_connector_with_connector(connector(&config))?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(https);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(timeout)
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// Whether `e` is a request the API server left unanswered for the client's request timeout.
pub fn is_timeout(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Service(s) if s.is::<tower::timeout::error::Elapsed>())
}

/// TCP connections to the API server as described above (TLS goes on top).
fn connector(config: &kube::Config) -> HttpConnector {
    let mut http = tcp_connector();
    http.set_connect_timeout(config.connect_timeout);
    http
}

/// TCP connections to a control-plane server that reads its requests as they come (the API
/// server, the Workload Manager): `TCP_NODELAY`, keepalive probes after [`QUIET_BEFORE_PROBE`]
/// of silence, bytes unacknowledged for [`UNACKED_TIMEOUT`] end the connection; any scheme
/// (TLS goes on top).
pub fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(QUIET_BEFORE_PROBE));
    http.set_keepalive_interval(Some(PROBE_EVERY));
    http.set_tcp_user_timeout(Some(UNACKED_TIMEOUT));
    http
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn local(port: u16) -> kube::Config {
        kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap())
    }

    /// The socket options are on the connections the client makes.
    #[tokio::test]
    async fn connections_notice_a_vanished_api_server() {
        use tower::ServiceExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let io = connector(&local(port)).oneshot(uri).await.unwrap();
        let s = socket2::SockRef::from(io.inner());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), QUIET_BEFORE_PROBE);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), PROBE_EVERY);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(UNACKED_TIMEOUT));
        assert!(s.tcp_nodelay().unwrap());
    }

    /// A server that accepts and never answers: the request fails at the timeout, as one.
    #[tokio::test]
    async fn an_unanswered_request_fails_at_the_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                held.push(c);
            }
        });
        let c = client(local(port), "test", Duration::from_millis(500)).unwrap();
        let started = std::time::Instant::now();
        let e = kube::Api::<Pod>::namespaced(c, "default")
            .get("x")
            .await
            .unwrap_err();
        assert!(is_timeout(&e), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        held.abort();
    }

    /// The stack speaks to an API server as kube-rs's does: base URI, extra headers (the user
    /// agent), and the answer decoded.
    #[tokio::test]
    async fn requests_carry_the_path_and_the_user_agent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"x\" not found","reason":"NotFound","code":404}"#;
            let answer = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            c.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let c = client(local(port), "agentcube-test/1", REQUEST_TIMEOUT).unwrap();
        let e = kube::Api::<Pod>::namespaced(c, "ns")
            .get("x")
            .await
            .unwrap_err();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e:?}");
        let request = server.await.unwrap().to_lowercase();
        assert!(
            request.starts_with("get /api/v1/namespaces/ns/pods/x "),
            "{request}"
        );
        assert!(
            request.contains("user-agent: agentcube-test/1\r\n"),
            "{request}"
        );
    }
}
