//! Client registry: who may call the gateway, for which accounts, how fast (SPEC §3 `[clients]`).
//!
//! Clients authenticate with `Basic id:secret` (the secret checked against its SHA-256) or with a
//! gateway-issued bearer token: `base64url(id "\n" expiry) "." base64url(HMAC-SHA256)`, so
//! replicas sharing `token_signing_key` accept each other's tokens.

use crate::config::{ClientMode, ClientsConfig};
use crate::error::GatewayError;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::hmac;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

pub struct Client {
    pub id: String,
    secret_sha256: [u8; 32],
    all_accounts: bool,
    accounts: Vec<String>,
    rate: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

/// Who is calling.
#[derive(Clone)]
pub enum Principal {
    /// `clients.mode = "none"`.
    Anonymous,
    Client(Arc<Client>),
}

impl Principal {
    pub fn id(&self) -> &str {
        match self {
            Principal::Anonymous => "-",
            Principal::Client(c) => &c.id,
        }
    }
}

pub struct Clients {
    mode: ClientMode,
    by_id: HashMap<String, Arc<Client>>,
    key: hmac::Key,
    token_ttl: Duration,
}

pub fn sha256_hex(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const UNAUTHORIZED: GatewayError =
    GatewayError::Unauthorized("missing or invalid client credentials");

impl Clients {
    pub fn new(cfg: &ClientsConfig) -> Self {
        let key_bytes: Vec<u8> = if cfg.token_signing_key.is_empty() {
            let mut k = [0u8; 32];
            // A random per-process key: tokens then only work on this instance.
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).is_err() {
                k.iter_mut().for_each(|b| *b = fastrand::u8(..));
            }
            k.to_vec()
        } else {
            cfg.token_signing_key.expose().as_bytes().to_vec()
        };
        let by_id = cfg
            .client
            .iter()
            .filter_map(|c| {
                let hash = unhex32(&c.secret_sha256.to_ascii_lowercase())?;
                let burst = f64::from(c.burst);
                Some((
                    c.id.clone(),
                    Arc::new(Client {
                        id: c.id.clone(),
                        secret_sha256: hash,
                        all_accounts: c.accounts.iter().any(|a| a == "*"),
                        accounts: c.accounts.clone(),
                        rate: c.rate_per_second,
                        burst,
                        bucket: Mutex::new((burst, Instant::now())),
                    }),
                ))
            })
            .collect();
        Self {
            mode: cfg.mode,
            by_id,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
            token_ttl: cfg.token_ttl.0,
        }
    }

    pub fn mode(&self) -> ClientMode {
        self.mode
    }

    /// Checks `Basic id:secret` against the registry.
    pub fn basic(&self, encoded: &str) -> Result<Arc<Client>, GatewayError> {
        let decoded = STANDARD.decode(encoded.trim()).map_err(|_| UNAUTHORIZED)?;
        let text = std::str::from_utf8(&decoded).map_err(|_| UNAUTHORIZED)?;
        let (id, secret) = text.split_once(':').ok_or(UNAUTHORIZED)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        match self.by_id.get(id) {
            Some(c) if ct_eq(digest.as_ref(), &c.secret_sha256) => Ok(c.clone()),
            _ => Err(UNAUTHORIZED),
        }
    }

    pub fn issue_token(&self, client_id: &str) -> (String, u64) {
        let exp = unix_now() + self.token_ttl.as_secs();
        let payload = format!("{client_id}\n{exp}");
        let sig = hmac::sign(&self.key, payload.as_bytes());
        (
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(sig.as_ref())
            ),
            self.token_ttl.as_secs(),
        )
    }

    pub fn bearer(&self, token: &str) -> Result<Arc<Client>, GatewayError> {
        let (payload_b64, sig_b64) = token.trim().split_once('.').ok_or(UNAUTHORIZED)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| UNAUTHORIZED)?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| UNAUTHORIZED)?;
        hmac::verify(&self.key, &payload, &sig).map_err(|_| UNAUTHORIZED)?;
        let text = std::str::from_utf8(&payload).map_err(|_| UNAUTHORIZED)?;
        let (id, exp) = text.split_once('\n').ok_or(UNAUTHORIZED)?;
        let exp: u64 = exp.parse().map_err(|_| UNAUTHORIZED)?;
        if exp <= unix_now() {
            return Err(GatewayError::Unauthorized("gateway token expired"));
        }
        self.by_id.get(id).cloned().ok_or(UNAUTHORIZED)
    }

    /// Authenticates from the `Authorization` header (mode `"none"` lets everyone in).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, GatewayError> {
        if self.mode == ClientMode::None {
            return Ok(Principal::Anonymous);
        }
        let value = authorization.ok_or(UNAUTHORIZED)?;
        let (scheme, rest) = value.split_once(' ').ok_or(UNAUTHORIZED)?;
        let client = if scheme.eq_ignore_ascii_case("basic") {
            self.basic(rest)?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.bearer(rest)?
        } else {
            return Err(UNAUTHORIZED);
        };
        Ok(Principal::Client(client))
    }

    /// The account check and the client's own rate, before any cache or upstream work.
    pub fn authorize(&self, who: &Principal, account: Option<&str>) -> Result<(), GatewayError> {
        let Principal::Client(c) = who else {
            return Ok(());
        };
        if let Some(account) = account {
            if !c.all_accounts && !c.accounts.iter().any(|a| a == account) {
                return Err(GatewayError::Forbidden);
            }
        }
        let mut b = c.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.0 = (b.0 + now.saturating_duration_since(b.1).as_secs_f64() * c.rate).min(c.burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err(GatewayError::RateLimited {
                retry_after: Duration::from_secs_f64((1.0 - b.0) / c.rate),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, Dur};
    use crate::secret::Secret;

    fn cfg(key: &str) -> ClientsConfig {
        ClientsConfig {
            token_signing_key: Secret::new(key),
            client: vec![ClientConfig {
                id: "billing".into(),
                secret_sha256: sha256_hex("s3cret"),
                accounts: vec!["A-1".into()],
                rate_per_second: 1.0,
                burst: 2,
            }],
            token_ttl: Dur::secs(60),
            ..ClientsConfig::default()
        }
    }

    #[test]
    fn basic_and_bearer() {
        let c = Clients::new(&cfg("k1"));
        let basic = STANDARD.encode("billing:s3cret");
        assert!(c.authenticate(Some(&format!("Basic {basic}"))).is_ok());
        let wrong = STANDARD.encode("billing:nope");
        assert_eq!(
            c.authenticate(Some(&format!("Basic {wrong}"))).err(),
            Some(UNAUTHORIZED)
        );
        assert!(c.authenticate(None).is_err());
        let (token, ttl) = c.issue_token("billing");
        assert_eq!(ttl, 60);
        assert!(c.authenticate(Some(&format!("Bearer {token}"))).is_ok());
        // Same key on another instance: accepted. Another key: rejected.
        assert!(Clients::new(&cfg("k1")).bearer(&token).is_ok());
        assert!(Clients::new(&cfg("k2")).bearer(&token).is_err());
        // Any byte changed: rejected.
        for i in 0..token.len() {
            let mut t = token.clone().into_bytes();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            if t != token {
                assert!(c.bearer(&t).is_err(), "tampered at {i}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accounts_and_rate() {
        let c = Clients::new(&cfg("k"));
        let who = Principal::Client(c.by_id["billing"].clone());
        assert_eq!(c.authorize(&who, Some("B-2")), Err(GatewayError::Forbidden));
        assert!(c.authorize(&who, Some("A-1")).is_ok());
        assert!(c.authorize(&who, Some("A-1")).is_ok());
        assert!(matches!(
            c.authorize(&who, Some("A-1")),
            Err(GatewayError::RateLimited { .. })
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(c.authorize(&who, Some("A-1")).is_ok());
    }
}
