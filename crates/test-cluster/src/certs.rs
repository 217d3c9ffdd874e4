//! The control plane's credentials, generated fresh for every cluster: a CA, the API server's
//! serving certificate (for `127.0.0.1` and `localhost`), client certificates (the admin in
//! `system:masters`), and the service-account signing key pair (ECDSA P-256, ES256 tokens).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the PEM files written by [`Pki::write`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    /// `(certificate, key)` of client `name`.
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// Generates everything into `dir` (created, mode 0700): the CA, the serving certificate,
    /// the service-account keys and one client certificate per `(file name, user, group)`.
    pub fn write(dir: &Path, clients: &[(&str, &str, Option<&str>)]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name("agentcube-test-cluster-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        write_private(&pki.ca_key(), &ca_key.serialize_pem())?;
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
        std::fs::write(pki.ca_cert(), ca.pem())?;

        let mut server = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.distinguished_name = name("kube-apiserver", None);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        std::fs::write(pki.server_cert(), server.signed_by(&server_key, &ca)?.pem())?;
        write_private(&pki.server_key(), &server_key.serialize_pem())?;

        for (file, user, group) in clients {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = name(user, *group);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            let (crt, key_path) = pki.client(file);
            std::fs::write(crt, params.signed_by(&key, &ca)?.pem())?;
            write_private(&key_path, &key.serialize_pem())?;
        }

        let sa = KeyPair::generate()?;
        write_private(&pki.sa_key(), &sa.serialize_pem())?;
        std::fs::write(pki.sa_pub(), sa.public_key_pem())?;
        Ok(pki)
    }
}

/// `CN=<user>`, `O=<group>` (Kubernetes reads the user's group from the organisation).
fn name(user: &str, group: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(g) = group {
        dn.push(DnType::OrganizationName, g);
    }
    dn.push(DnType::CommonName, user);
    dn
}

fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(pem.as_bytes())
}
