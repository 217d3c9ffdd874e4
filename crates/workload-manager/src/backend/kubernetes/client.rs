//! The Workload Manager's Kubernetes client: kube-rs's, plus a bound on how long the API server
//! may leave a request unanswered.
//!
//! kube-rs sets no read timeout (exec and watch streams are long-lived), so a request to an API
//! server that stopped answering — a hung process, a network path that drops packets instead of
//! refusing them — waited until it answered again or TCP gave up (about 15 minutes), and a
//! garbage-collection pass stood still behind one `DELETE` meanwhile. Here every request must
//! have its response headers within [`REQUEST_TIMEOUT`]. Watches are not cut by it: their
//! headers come at once, and a stream that goes quiet is kube-rs's watcher's to reopen.

use std::time::Duration;

/// How long a request may wait for the API server's answer (its response headers). Longer than
/// the API server's own limit on a request (`--request-timeout`, 1 minute by default), so that
/// a server that is slow but alive answers for itself (504) first.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

/// A client for `config`, named in the API server's audit log, whose requests fail with
/// [`kube::Error::Service`] ([`is_timeout`]) when unanswered for `request_timeout`.
pub fn client(
    mut config: kube::Config,
    request_timeout: Duration,
) -> Result<kube::Client, kube::Error> {
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!(
            "agentcube-workload-manager/",
            env!("CARGO_PKG_VERSION")
        )),
    ));
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::timeout::TimeoutLayer::new(request_timeout))
        .build())
}

/// Whether `e` is a request the API server left unanswered for the client's request timeout.
pub fn is_timeout(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Service(s) if s.is::<tower::timeout::error::Elapsed>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    /// An unreachable API server is reported with what failed underneath, not only kube-rs's
    /// "client error (Connect)".
    #[tokio::test]
    async fn an_unreachable_api_server_is_reported_with_the_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        let c = client(config, REQUEST_TIMEOUT).unwrap();
        let e = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c, "default")
            .get("x")
            .await
            .unwrap_err();
        assert!(!is_timeout(&e));
        let BackendError::Unavailable(m) = BackendError::from(e) else {
            panic!("an unreachable API server is Unavailable");
        };
        assert!(m.starts_with("Kubernetes API unreachable: "), "{m}");
        assert!(m.to_lowercase().contains("refused"), "{m}");
    }
}
