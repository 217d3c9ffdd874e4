//! A baseline for `make bench-instructions`, not a product: the least an HTTP/1.1 keep-alive
//! reverse proxy built on hyper's server and client does per request. One thread; per client
//! connection one upstream connection (its own task, as hyper's client has); the invocation
//! prefix is stripped and `Host` set; no session lookup, no token, no limits, no metrics. (The
//! Router uses hyper's server, and its own client: `crates/router/src/h1.rs`.)
//!
//! Usage: `bare-proxy <listen port> <upstream port> <prefix to strip>`

use std::cell::RefCell;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Upstream = Rc<RefCell<Option<client::SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, upstream, prefix] = args.as_slice() else {
        eprintln!("usage: bare-proxy <listen port> <upstream port> <prefix to strip>");
        std::process::exit(2);
    };
    let (port, upstream): (u16, u16) = match (port.parse(), upstream.parse()) {
        (Ok(p), Ok(u)) => (p, u),
        _ => {
            eprintln!("ports are numbers");
            std::process::exit(2);
        }
    };
    let prefix: &'static str = prefix.clone().leak();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(serve(stream, upstream, prefix));
        }
    });
}

async fn serve(stream: TcpStream, upstream: u16, prefix: &'static str) {
    let conn: Upstream = Rc::default();
    let host = hyper::header::HeaderValue::from_str(&format!("127.0.0.1:{upstream}"))
        .expect("host header");
    let svc = hyper::service::service_fn(move |req| {
        let (conn, host) = (conn.clone(), host.clone());
        forward(req, conn, upstream, prefix, host)
    });
    let _ = server::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

async fn forward(
    mut req: Request<Incoming>,
    conn: Upstream,
    upstream: u16,
    prefix: &str,
    host: hyper::header::HeaderValue,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = path.strip_prefix(prefix).unwrap_or(path);
    *req.uri_mut() = path.parse()?;
    req.headers_mut().insert(hyper::header::HOST, host);
    let taken = conn.borrow_mut().take();
    let mut sender = match taken {
        Some(s) if !s.is_closed() => s,
        _ => {
            let s = TcpStream::connect(("127.0.0.1", upstream)).await?;
            s.set_nodelay(true)?;
            let (sender, c) = client::handshake(TokioIo::new(s)).await?;
            tokio::task::spawn_local(c);
            sender
        }
    };
    sender.ready().await?;
    let resp = sender.send_request(req).await;
    *conn.borrow_mut() = Some(sender);
    Ok(resp?)
}
