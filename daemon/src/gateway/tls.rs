//! The gateway's certificates and TLS configurations.
//!
//! Why a CA made at start: the tools in the sealed workspace speak TLS to
//! "github.com" through the gateway, which must read their requests to
//! stamp the credential. A CA created when the daemon starts, whose private
//! key exists only in this process's memory (never on disk, gone when it
//! exits), signs one leaf certificate per GitHub host; only its certificate
//! is written out, for git's `sslCAInfo` and gh's `SSL_CERT_FILE`. A leaked
//! CA certificate is useless without the key, and a restart makes a new CA
//! (the entrypoint rewrites the file each time the daemon starts).
//!
//! Upstream, the gateway verifies GitHub with the system's roots (plus an
//! extra CA file, for tests and for Enterprise servers with a private CA).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::route::Site;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The CA's certificate (PEM) and one server configuration per site.
pub(crate) struct Certificates {
    /// The CA certificate, PEM, for the file the tools trust.
    pub(crate) ca_pem: String,
    /// Per site authority.
    pub(crate) servers: HashMap<String, Arc<ServerConfig>>,
}

/// Makes a CA and a leaf for every site. The CA's key is dropped when this
/// returns: no certificate is ever signed later, so it need not live on.
pub(crate) fn certificates(sites: &[Site]) -> anyhow::Result<Certificates> {
    let ca_key = KeyPair::generate().context("cannot generate the gateway CA's key")?;
    let mut ca_params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!(
            "molecule-credd sealed gateway CA (pid {})",
            std::process::id()
        ),
    );
    ca_params.distinguished_name = name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("cannot sign the gateway CA")?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let mut servers = HashMap::new();
    for site in sites {
        let leaf_key = KeyPair::generate().context("cannot generate a leaf key")?;
        let mut params = CertificateParams::new(vec![site.host().to_owned()])
            .with_context(|| format!("cannot make a certificate for {}", site.host()))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, site.host());
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = params
            .signed_by(&leaf_key, &issuer)
            .context("cannot sign a leaf certificate")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
            .context("cannot use the leaf certificate")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        servers.insert(site.authority.clone(), Arc::new(config));
    }
    Ok(Certificates {
        ca_pem: ca_cert.pem(),
        servers,
    })
}

/// Writes the CA certificate to `path` (0644, replaced atomically).
pub(crate) fn write_ca(path: &Path, pem: &str) -> anyhow::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let temp = folder.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        // Readable by the tools whatever the daemon's umask (077).
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.with_context(|| format!("cannot write the gateway CA to {}", path.display()))
}

/// The upstream client's TLS: the system's roots plus `extra_ca` (PEM).
pub(crate) fn upstream_config(extra_ca: Option<&Path>) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect())
            .with_context(|| format!("cannot read the extra CA file {}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "the extra CA file {} holds no certificate",
            path.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {} is unusable", path.display()))?;
        }
    } else {
        anyhow::ensure!(
            added > 0,
            "no system CA certificates found; the gateway could not verify GitHub"
        );
    }
    // ALPN is hyper-rustls's to set (http/1.1 only).
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
