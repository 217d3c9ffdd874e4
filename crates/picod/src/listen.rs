//! PicoD's Unix sockets (its own, and each forwarded port's): bound in place of a stale one, then
//! marked listening (`<socket>.ready`, [`agentcube_types::picod::SOCKET_READY_SUFFIX`]) — the
//! local Workload Manager moves a socket out of the sandbox's reach only once it is marked, since
//! under gVisor a bind is more than one step on the host.

use std::path::Path;

/// Binds a Unix socket at `path` (its directory made, a stale socket file replaced) and marks it
/// listening.
pub fn unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::write(agentcube_types::picod::socket_ready_marker(path), b"")?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_socket_is_marked_once_it_listens_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/picod.sock");
        let marker = agentcube_types::picod::socket_ready_marker(&path);
        let first = super::unix(&path).unwrap();
        assert!(marker.exists());
        drop(first);
        std::fs::remove_file(&marker).unwrap();
        // The stale file of the first is replaced, and the new socket answers.
        let _second = super::unix(&path).unwrap();
        assert!(marker.exists());
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }
}
