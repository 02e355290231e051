//! Optional TLS for the gRPC connections between workers and the coordinator (rustls, through
//! tonic's `tls-ring` feature), with certificates and keys from PEM files. The coordinator
//! presents its certificate; workers verify it against a CA file. With a client CA on the
//! coordinator, workers must present certificates signed by it too (mutual TLS). The ring
//! between workers is not TLS: its peers prove the job token instead (see `auth`).

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(format!("{what} {}: not a PEM file", path.display()));
    }
    Ok(bytes)
}

/// The coordinator's side.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    pub fn config(&self) -> Result<ServerTlsConfig, String> {
        let identity = Identity::from_pem(read("TLS certificate", &self.cert)?, read("TLS key", &self.key)?);
        let mut c = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read("TLS client CA", ca)?));
        }
        Ok(c)
    }
}

/// A worker's side.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA the coordinator's certificate must be signed by.
    pub ca: PathBuf,
    /// The name the certificate must carry (default: the host of the coordinator's URL).
    pub domain: Option<String>,
    /// This worker's own certificate and key, for a coordinator that requires them.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    pub fn config(&self) -> Result<ClientTlsConfig, String> {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("TLS CA", &self.ca)?));
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(read("TLS certificate", cert)?, read("TLS key", key)?));
        }
        Ok(c)
    }
}
