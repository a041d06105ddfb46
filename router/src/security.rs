//! Who may talk to the router and its engines: TLS settings read from PEM
//! files (the public port, the router's connections to engines, the
//! engine's port), and bearer tokens on the public API.
//!
//! Invariant: a presented token is compared with every configured one by
//! SHA-256 digest in constant time, and no token, key or certificate
//! content is ever logged or put into an error message (paths are).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::error::RouterError;

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// A server's certificate and key, and optionally the CA its clients'
/// certificates must chain to (mutual TLS).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// From the optional flags of one port: `None` without a certificate;
    /// an error naming the flags when they do not go together.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
        prefix: &str,
    ) -> Result<Option<Self>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key, client_ca })),
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => Err(format!(
                "--{prefix}tls-client-ca needs --{prefix}tls-cert and --{prefix}tls-key"
            )),
            _ => Err(format!("--{prefix}tls-cert and --{prefix}tls-key go together")),
        }
    }

    pub fn server_config(&self) -> Result<ServerTlsConfig, String> {
        let identity = Identity::from_pem(read(&self.cert, "TLS certificate")?, read(&self.key, "TLS key")?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(config)
    }
}

/// TLS for connections to engines: the CA their certificates chain to and,
/// for mutual TLS, this router's certificate and key.
/// `server_name`: the name engines' certificates carry, when it is not the
/// host of their URLs (engines found by DNS are dialled by IP address).
pub fn client_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<ClientTlsConfig, String> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "engine CA")?));
    if let Some(name) = server_name {
        config = config.domain_name(name);
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            read(cert, "engine client certificate")?,
            read(key, "engine client key")?,
        ));
    }
    Ok(config)
}

/// Bearer tokens the public API accepts (`--auth-tokens-file`).
#[derive(Clone)]
pub struct AuthTokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for AuthTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthTokens({} tokens)", self.digests.len())
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl AuthTokens {
    /// One token per line; blank lines and lines starting with `#` are
    /// skipped. At least one token is required.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = String::from_utf8(read(path, "tokens file")?)
            .map_err(|_| format!("the tokens file {} is not UTF-8", path.display()))?;
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|t| digest(t.as_bytes()))
            .collect();
        if digests.is_empty() {
            return Err(format!("the tokens file {} holds no token", path.display()));
        }
        Ok(AuthTokens { digests })
    }

    /// Passes a request carrying `authorization: Bearer <token>` with one
    /// of the tokens; else `UNAUTHENTICATED`, the same whatever was wrong.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| digest(t.trim().as_bytes()));
        let Some(presented) = presented else {
            return Err(RouterError::Unauthenticated.into());
        };
        let matched = self
            .digests
            .iter()
            .fold(0u8, |any, d| any | d.ct_eq(&presented).unwrap_u8());
        if matched == 1 {
            Ok(request)
        } else {
            Err(RouterError::Unauthenticated.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn only_a_listed_bearer_token_passes() {
        let dir = std::env::temp_dir().join(format!("heterospec-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# operators\nalpha-123\n\n  beta-456  \n").unwrap();
        let tokens = AuthTokens::from_file(&path).unwrap();
        assert!(tokens.check(with_auth(Some("Bearer alpha-123"))).is_ok());
        assert!(tokens.check(with_auth(Some("Bearer beta-456"))).is_ok());
        assert!(
            tokens.check(with_auth(Some("bearer alpha-123"))).is_ok(),
            "the scheme is case-insensitive"
        );
        for bad in [
            None,
            Some("Bearer alpha-12"),
            Some("alpha-123"),
            Some("Bearer # operators"),
        ] {
            let status = tokens.check(with_auth(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(!status.message().contains("alpha"), "{status:?}");
        }
        std::fs::write(&path, "# none\n").unwrap();
        assert!(AuthTokens::from_file(&path).unwrap_err().contains("no token"));
        assert!(!format!("{tokens:?}").contains("alpha"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_flags_go_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(TlsFiles::from_flags(None, None, None, "").unwrap().is_none());
        assert!(TlsFiles::from_flags(p("c"), p("k"), None, "").unwrap().is_some());
        let e = TlsFiles::from_flags(p("c"), None, None, "engine-").unwrap_err();
        assert!(e.contains("--engine-tls-key"), "{e}");
        let e = TlsFiles::from_flags(None, None, p("ca"), "").unwrap_err();
        assert!(e.contains("--tls-client-ca"), "{e}");
    }
}
