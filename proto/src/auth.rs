//! The job token: a shared secret that every RPC carries (`authorization: Bearer <token>`), so
//! that nobody on the network who lacks it can join a job, read its data or send it anything.
//!
//! The token comes from a file (`--token-file`) or the environment (`TANDEM_JOB_TOKEN`), never
//! from a command-line argument (which `ps` shows), and is never logged: `JobToken`'s `Debug`
//! prints `JobToken(<redacted>)`. The server compares SHA-256 digests in constant time (`subtle`);
//! ring peers prove the token with an HMAC-SHA256 of a fresh challenge, never sending it.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The environment variable that carries the token.
pub const TOKEN_ENV: &str = "TANDEM_JOB_TOKEN";

#[derive(Clone)]
pub struct JobToken(Arc<str>);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl JobToken {
    /// Checks a token's form: 16 to 4096 printable ASCII characters, no spaces.
    pub fn new(token: &str) -> Result<Self, String> {
        let t = token.trim();
        if t.len() < 16 || t.len() > 4096 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a job token must be 16 to 4096 printable ASCII characters without spaces".into());
        }
        Ok(JobToken(t.into()))
    }

    /// The token from `file` if given, else from `TANDEM_JOB_TOKEN`, else none.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>, String> {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("job token file {}: {e}", f.display()))?;
            return JobToken::new(&text).map(Some).map_err(|e| format!("job token file {}: {e}", f.display()));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(t) => JobToken::new(&t).map(Some).map_err(|e| format!("{TOKEN_ENV}: {e}")),
            Err(_) => Ok(None),
        }
    }

    /// A fresh random token (32 bytes from the OS, hex): for jobs whose workers the coordinator
    /// starts itself.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(JobToken(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into()))
    }

    /// The token itself, to hand to a child process through its environment.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ (and, since
    /// digests are compared, of its length).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let (a, b) = (Sha256::digest(self.0.as_bytes()), Sha256::digest(presented));
        bool::from(a.ct_eq(&b))
    }

    /// The MAC keyed by the token over a context string and a challenge.
    fn mac(&self, context: &str, challenge: &[u8]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(self.0.as_bytes()).expect("HMAC takes a key of any length");
        m.update(b"tandem-ring-v2\0");
        m.update(context.as_bytes());
        m.update(&[0]);
        m.update(challenge);
        m
    }

    /// A proof of the token for a ring peer: HMAC-SHA256 keyed by the token over `context` (who
    /// proves to whom, in which world and generation) and the peer's fresh `challenge`, so that
    /// the token itself never crosses the ring's sockets and a proof cannot be replayed.
    pub fn proof(&self, context: &str, challenge: &[u8]) -> [u8; 32] {
        self.mac(context, challenge).finalize().into_bytes().into()
    }

    /// Whether `proof` is [`JobToken::proof`] of `context` and `challenge`, in constant time.
    pub fn verify_proof(&self, context: &str, challenge: &[u8], proof: &[u8]) -> bool {
        self.mac(context, challenge).verify_slice(proof).is_ok()
    }
}

/// Adds the token to every outgoing request (no token: adds nothing).
#[derive(Clone, Debug, Default)]
pub struct ClientAuth(Option<MetadataValue<Ascii>>);

impl ClientAuth {
    pub fn new(token: Option<&JobToken>) -> Self {
        ClientAuth(token.map(|t| format!("Bearer {}", t.0).parse().expect("a checked token is valid metadata")))
    }
}

impl tonic::service::Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Refuses every request that does not carry the job token (no token configured: accepts all).
#[derive(Clone, Debug, Default)]
pub struct ServerAuth(Option<JobToken>);

impl ServerAuth {
    pub fn new(token: Option<JobToken>) -> Self {
        ServerAuth(token)
    }
}

impl tonic::service::Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        let presented =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if token.matches(p.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong job token")),
            None => {
                Err(Status::unauthenticated(format!("this job requires its job token ({TOKEN_ENV} or --token-file)")))
            }
        }
    }
}

/// The secret of one member of one generation: `Join` hands it to the worker it admits, and
/// every later RPC that acts as that rank carries it, so that holding the job token is not
/// enough to act as another rank (upload its checkpoint, finish for it, report its failure).
#[derive(Clone, PartialEq, Eq)]
pub struct MemberSecret([u8; 32]);

impl std::fmt::Debug for MemberSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberSecret(<redacted>)")
    }
}

impl MemberSecret {
    /// 32 fresh bytes from the OS.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random number generator");
        MemberSecret(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `presented` is this secret, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_slice().ct_eq(presented))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(JobToken::new("short").is_err());
        assert!(JobToken::new("has a space in the middle!").is_err());
        let t = JobToken::new("0123456789abcdef-secret\n").unwrap();
        assert_eq!(format!("{t:?}"), "JobToken(<redacted>)");
        assert!(t.matches(b"0123456789abcdef-secret"));
        assert!(!t.matches(b"0123456789abcdef-secreT"));
        assert!(!t.matches(b""));
        let g = JobToken::generate().unwrap();
        assert_eq!(g.expose().len(), 64);
        assert_ne!(g.expose(), JobToken::generate().unwrap().expose());
        assert_ne!(t.proof("a", b"x"), t.proof("b", b"x"));
        assert_ne!(t.proof("a", b"x"), g.proof("a", b"x"));
        assert_ne!(t.proof("a", b"x"), t.proof("a", b"y"));
        assert!(t.verify_proof("a", b"x", &t.proof("a", b"x")));
        assert!(!t.verify_proof("a", b"x", &g.proof("a", b"x")));
        assert!(!t.verify_proof("a", b"x", &t.proof("a", b"x")[..31]));
    }
}
