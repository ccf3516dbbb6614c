//! TLS material made by the test itself: a CA, a server certificate for `127.0.0.1` and
//! `localhost`, and a client certificate, written as PEM files into a directory that the
//! fixture owns (removed with it). The files are named like a `kubernetes.io/tls` Secret's keys
//! (`ca.crt`, `tls.crt`, `tls.key`) so a test can mount or copy them as such a Secret.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// PEM files of one test CA and the certificates it signed.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (`ca.crt` of the client directory).
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// A directory with `ca.crt`, `tls.crt` and `tls.key` (the client's certificate): the
    /// shape of a TLS Secret.
    pub client_dir: PathBuf,
}

impl TlsFiles {
    /// Client certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.client_dir.join("tls.crt")
    }

    /// Client private key.
    pub fn client_key(&self) -> PathBuf {
        self.client_dir.join("tls.key")
    }

    /// Generates a CA and a server and a client certificate into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conveyor test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let leaf =
            |name: &str, purpose: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
                let mut params =
                    CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
                params.distinguished_name.push(DnType::CommonName, name);
                params.extended_key_usages = vec![purpose];
                let key = KeyPair::generate()?;
                let cert = params.signed_by(&key, &ca)?;
                Ok((cert.pem(), key.serialize_pem()))
            };
        let (server_cert, server_key) = leaf("nats-server", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf("conveyor", ExtendedKeyUsagePurpose::ClientAuth)?;

        let client_dir = dir.join("client");
        std::fs::create_dir_all(&client_dir)?;
        let write = |path: PathBuf, text: &str| -> anyhow::Result<PathBuf> {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca_pem = ca.pem();
        write(client_dir.join("ca.crt"), &ca_pem)?;
        write(client_dir.join("tls.crt"), &client_cert)?;
        write(client_dir.join("tls.key"), &client_key)?;
        Ok(Self {
            ca: write(dir.join("ca.pem"), &ca_pem)?,
            server_cert: write(dir.join("server-cert.pem"), &server_cert)?,
            server_key: write(dir.join("server-key.pem"), &server_key)?,
            client_dir,
        })
    }
}
