//! The Workload Manager's Kubernetes client: the binaries' shared one
//! ([`agentcube_crds::client`]: a request timeout, connections that notice a vanished API
//! server), named in the API server's audit log.

use std::time::Duration;

pub use agentcube_crds::client::{REQUEST_TIMEOUT, is_timeout};

/// A client for `config` whose requests fail ([`is_timeout`]) when unanswered for
/// `request_timeout`.
pub fn client(
    config: kube::Config,
    request_timeout: Duration,
) -> Result<kube::Client, kube::Error> {
    let agent = concat!("agentcube-workload-manager/", env!("CARGO_PKG_VERSION"));
    agentcube_crds::client::client(config, agent, request_timeout)
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
