//! The Router's public key, which `authMode: picod` sandboxes must trust: fixed at start (a file,
//! a directory, or handed over by `agentcube up`) or followed from the cluster's Secret
//! `picod-router-identity` by the Kubernetes backend.

use tokio::sync::watch;

/// The key as currently known. Cheap to clone; every clone sees updates.
#[derive(Debug, Clone)]
pub struct RouterKey(watch::Receiver<Option<String>>);

impl RouterKey {
    /// A key that never changes (`None`: no key).
    pub fn fixed(pem: Option<String>) -> Self {
        Self(watch::channel(pem).1)
    }

    /// A key that follows `tx` (the sender side is kept by whoever watches the source).
    pub fn followed() -> (watch::Sender<Option<String>>, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self(rx))
    }

    /// The current key.
    pub fn get(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// A receiver that is notified whenever the key changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.0.clone()
    }
}

/// The SPKI public key from the identity's files: `public.pem` when present, else derived from
/// `private.pem` (PKCS#1 `RSA PRIVATE KEY`, upstream's format).
pub fn public_from_pems(public: Option<&str>, private: Option<&str>) -> Result<String, String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
    if let Some(p) = public.filter(|p| !p.trim().is_empty()) {
        rsa::RsaPublicKey::from_public_key_pem(p)
            .map_err(|e| format!("public.pem is not an SPKI public key: {e}"))?;
        return Ok(p.to_string());
    }
    let pem = private.ok_or("neither public.pem nor private.pem is present")?;
    let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
        .map_err(|e| format!("private.pem is not a PKCS#1 RSA key: {e}"))?;
    key.to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())
}

/// [`public_from_pems`] on a directory (e.g. the mounted Secret).
pub fn public_from_dir(dir: &std::path::Path) -> Result<String, String> {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).ok();
    public_from_pems(
        read("public.pem").as_deref(),
        read("private.pem").as_deref(),
    )
    .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = include_str!("../../picod/tests/data/router.key.pem");
    const PUBLIC: &str = include_str!("../../picod/tests/data/router.pub.pem");

    #[test]
    fn public_key_comes_from_public_pem_or_is_derived_from_private_pem() {
        assert_eq!(
            public_from_pems(Some(PUBLIC), Some("junk")).unwrap(),
            PUBLIC
        );
        let derived = public_from_pems(None, Some(PRIVATE)).unwrap();
        assert_eq!(derived.trim(), PUBLIC.trim());
        assert!(public_from_pems(Some("not a key"), None).is_err());
        assert!(public_from_pems(None, None).is_err());
    }

    #[test]
    fn a_followed_key_is_seen_by_every_clone() {
        let (tx, key) = RouterKey::followed();
        let other = key.clone();
        assert_eq!(key.get(), None);
        tx.send_replace(Some("K".into()));
        assert_eq!(other.get().as_deref(), Some("K"));
    }
}
