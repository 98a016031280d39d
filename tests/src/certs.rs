//! Throw-away certificate authorities for TLS tests, made with the
//! `openssl` command line (EC P-256 keys, valid for two days): a CA, server
//! certificates for `127.0.0.1`/`localhost`, client certificates.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse {
    /// A server at `127.0.0.1` / `localhost` (`serverAuth`).
    Server,
    /// A client (`clientAuth`).
    Client,
}

/// A certificate and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (unencrypted PKCS#8).
    pub key: PathBuf,
}

/// A CA whose certificate and key are files in a directory.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (what a client or server is told to trust).
    pub cert: PathBuf,
    /// Its private key.
    key: PathBuf,
    /// Where it writes what it issues.
    dir: PathBuf,
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("cannot run openssl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

impl TestCa {
    /// A new self-signed CA named `name` (its subject's CN), its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&cert)?,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ])?;
        Ok(Self {
            cert,
            key,
            dir: dir.to_owned(),
        })
    }

    /// A certificate for `name` (CN) signed by this CA.
    pub fn issue(&self, name: &str, usage: CertUse) -> anyhow::Result<CertFiles> {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
            "-subj",
            &format!("/CN={name}"),
        ])?;
        let extensions = match usage {
            CertUse::Server => {
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
            }
            CertUse::Client => "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        };
        std::fs::write(&ext, extensions)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.cert)?,
            "-CAkey",
            path_str(&self.key)?,
            "-set_serial",
            &rand::random::<u32>().to_string(),
            "-out",
            path_str(&cert)?,
            "-days",
            "2",
            "-extfile",
            path_str(&ext)?,
        ])?;
        Ok(CertFiles { cert, key })
    }
}
