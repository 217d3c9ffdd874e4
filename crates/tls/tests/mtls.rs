//! Mutual TLS between real listeners (`agentcube_serve::serve` with [`ServerTls`]) and clients
//! ([`ClientTls`] through hyper), with certificates made here: who gets through, who does not,
//! and certificates swapped when their files change.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentcube_tls::{ClientTls, PemFiles, ServerTls};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

const WM_ID: &str = "spiffe://cluster.local/ns/agentcube/sa/workloadmanager";
const ROUTER_ID: &str = "spiffe://cluster.local/ns/agentcube/sa/agentcube-router";

/// A CA writing its certificate and leaves into a directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: std::path::PathBuf,
    name: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("{name} {}", std::process::id()),
        );
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issuer.pem()).unwrap();
        Self {
            issuer,
            dir: dir.to_path_buf(),
            name: name.into(),
        }
    }

    fn bundle(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A leaf naming `uri` (and `localhost`), for `usage`, written as `<file>.crt`/`.key`.
    fn leaf(&self, file: &str, uri: &str, usage: ExtendedKeyUsagePurpose) -> PemFiles {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = PemFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            ca: Some(self.bundle()),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

async fn serve(tls: ServerTls) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
    let options = agentcube_serve::Options::new(
        agentcube_serve::Limits::default(),
        agentcube_serve::Refusal::json("{}"),
    )
    .with_handshake(tls);
    tokio::spawn(agentcube_serve::serve(
        listener.into(),
        app,
        options,
        std::future::pending(),
    ));
    addr
}

/// `GET /hello` on a new connection through `tls`: the body, or the error's chain in words.
async fn hello(tls: &ClientTls, addr: SocketAddr) -> Result<String, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let client =
        Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(tls.connector(http));
    let url = format!("https://localhost:{}/hello", addr.port());
    let resp = client
        .get(url.parse().unwrap())
        .await
        .map_err(|e| chain(&e))?;
    let body = resp.into_body().collect().await.map_err(|e| chain(&e))?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A plain rustls client trusting `ca` by host name `localhost`, with `cert` as its certificate
/// if given, speaking only `version`: whether the handshake (and a first read) succeeds.
async fn raw_handshake(
    addr: SocketAddr,
    ca: &Path,
    cert: Option<&PemFiles>,
    version: &'static tokio_rustls::rustls::SupportedProtocolVersion,
) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(f) => builder
            .with_client_auth_cert(
                rustls_pki_types::CertificateDer::pem_file_iter(&f.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_file(&f.key).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 servers judge the client's certificate after the client's handshake is done: the
    // refusal arrives as an alert on the first read.
    tls.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&answer).into_owned())
    }
}

#[tokio::test]
async fn mutual_tls_lets_in_only_clients_of_the_ca_and_trusts_only_the_expected_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other-ca");
    let wm = ca.leaf("wm", WM_ID, ExtendedKeyUsagePurpose::ServerAuth);
    let router = ca.leaf("router", ROUTER_ID, ExtendedKeyUsagePurpose::ClientAuth);
    let server = ServerTls::load(wm.clone()).unwrap();
    assert!(server.mutual());
    let addr = serve(server).await;

    let client = ClientTls::load(router.clone(), WM_ID.into()).unwrap();
    assert_eq!(hello(&client, addr).await.unwrap(), "hi");

    // Clients the listener refuses: none, one of another CA, TLS 1.2.
    let tls13 = &tokio_rustls::rustls::version::TLS13;
    let tls12 = &tokio_rustls::rustls::version::TLS12;
    assert_eq!(
        raw_handshake(addr, &ca.bundle(), Some(&router), tls13).await,
        Ok(())
    );
    let none = raw_handshake(addr, &ca.bundle(), None, tls13).await;
    assert!(
        none.as_ref()
            .is_err_and(|e| e.contains("CertificateRequired")),
        "{none:?}"
    );
    let stranger = other.leaf("stranger", ROUTER_ID, ExtendedKeyUsagePurpose::ClientAuth);
    let strange = raw_handshake(addr, &ca.bundle(), Some(&stranger), tls13).await;
    assert!(
        strange.as_ref().is_err_and(|e| e.contains("UnknownCA")),
        "{strange:?}"
    );
    let old = raw_handshake(addr, &ca.bundle(), Some(&router), tls12).await;
    assert!(
        old.as_ref().is_err_and(|e| e.contains("ProtocolVersion")),
        "{old:?}"
    );
    // A client certificate made for servers only.
    let server_only = ca.leaf(
        "server-only",
        ROUTER_ID,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let wrong_use = raw_handshake(addr, &ca.bundle(), Some(&server_only), tls13).await;
    assert!(wrong_use.is_err(), "{wrong_use:?}");

    // Servers the client refuses: another identity, a certificate for clients only, another CA.
    for (file, id, usage, issuer, why) in [
        (
            "wm-other",
            "spiffe://cluster.local/ns/agentcube/sa/router",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
            "not the expected SPIFFE ID",
        ),
        (
            "wm-client",
            WM_ID,
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
            "RequiredEkuNotFound",
        ),
        (
            "wm-stranger",
            WM_ID,
            ExtendedKeyUsagePurpose::ServerAuth,
            &other,
            "UnknownIssuer",
        ),
    ] {
        let mut files = issuer.leaf(file, id, usage);
        files.ca = Some(ca.bundle());
        let addr = serve(ServerTls::load(files).unwrap()).await;
        let got = hello(&client, addr).await;
        assert!(
            got.as_ref().is_err_and(|e| e.contains(why)),
            "{file}: {got:?}"
        );
    }
}

#[tokio::test]
async fn https_without_a_ca_asks_no_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let mut wm = ca.leaf("wm", WM_ID, ExtendedKeyUsagePurpose::ServerAuth);
    wm.ca = None;
    let server = ServerTls::load(wm).unwrap();
    assert!(!server.mutual());
    let addr = serve(server).await;
    let tls13 = &tokio_rustls::rustls::version::TLS13;
    assert_eq!(raw_handshake(addr, &ca.bundle(), None, tls13).await, Ok(()));
}

#[tokio::test]
async fn certificates_are_swapped_when_their_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let wm = ca.leaf("wm", WM_ID, ExtendedKeyUsagePurpose::ServerAuth);
    let router = ca.leaf("router", ROUTER_ID, ExtendedKeyUsagePurpose::ClientAuth);
    let server = ServerTls::load(wm.clone()).unwrap();
    let _server_watch = server.watch_every(Duration::from_millis(50));
    let addr = serve(server).await;
    let client = ClientTls::load(router.clone(), WM_ID.into()).unwrap();
    assert_eq!(hello(&client, addr).await.unwrap(), "hi");

    // The whole trust rotates on the server's side: a new CA (same file) and a leaf under it.
    let rotated = Ca::new(dir.path(), "ca");
    rotated.leaf("wm", WM_ID, ExtendedKeyUsagePurpose::ServerAuth);
    eventually("the server's swap", async || {
        hello(&client, addr).await.is_err()
    })
    .await;
    // The client's files follow; once it has swapped them, it gets in again.
    let _client_watch = client.watch_every(Duration::from_millis(50));
    rotated.leaf("router", ROUTER_ID, ExtendedKeyUsagePurpose::ClientAuth);
    eventually("the client's swap", async || {
        hello(&client, addr).await.is_ok()
    })
    .await;

    // Files that do not load leave the certificates in use as they were: garbage ...
    std::fs::write(&wm.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hello(&client, addr).await.unwrap(), "hi");
    // ... and a rotation half written (a new certificate beside the old key). The server takes
    // a new certificate first: a new configuration resumes no earlier TLS session, so the
    // client must present its certificate again.
    rotated.leaf("wm", WM_ID, ExtendedKeyUsagePurpose::ServerAuth);
    let old_key = std::fs::read(&router.key).unwrap();
    rotated.leaf("router", ROUTER_ID, ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(&router.key, old_key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hello(&client, addr).await.unwrap(), "hi");
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test]
async fn missing_files_are_waited_for_then_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = PemFiles {
        cert: dir.path().join("svid.pem"),
        key: dir.path().join("svid_key.pem"),
        ca: Some(dir.path().join("bundle.pem")),
    };
    let late = files.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for p in [&late.cert, &late.key, late.ca.as_ref().unwrap()] {
            std::fs::write(p, "").unwrap();
        }
    });
    agentcube_tls::wait_for_files(&files, Duration::from_secs(5))
        .await
        .unwrap();
    std::fs::remove_file(&files.key).unwrap();
    let err = agentcube_tls::wait_for_files(&files, Duration::from_millis(200))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("svid_key.pem") && !err.contains("bundle.pem"),
        "{err}"
    );
    // Empty files are named too, when loaded.
    let err = ServerTls::load(PemFiles { ca: None, ..files })
        .unwrap_err()
        .to_string();
    assert!(err.contains("svid.pem"), "{err}");
}
