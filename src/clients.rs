//! Client registry: who may call the gateway, for which accounts, how fast (SPEC §3 `[clients]`).
//!
//! Clients authenticate with `Basic id:secret` (the secret checked against its SHA-256) or with a
//! gateway-issued bearer token (SPEC §4):
//! `base64url(id "\n" issued "\n" expiry "\n" fingerprint) "." base64url(HMAC-SHA256)`, so
//! replicas sharing `token_signing_key` accept each other's tokens. The fingerprint binds a token
//! to its client's current secret (rotating it refuses the old tokens), and a token whose expiry
//! lies more than `token_ttl` after its issue time is refused, however well signed.

use crate::config::{ClientMode, ClientsConfig};
use crate::error::GatewayError;
use crate::secret::ct_eq;
use crate::util::bucket::TokenBucket;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use parking_lot::Mutex;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

pub struct Client {
    pub id: String,
    secret_sha256: [u8; 32],
    /// What its tokens carry of the secret: a keyed hash of `secret_sha256` (SPEC §4).
    fingerprint: [u8; FINGERPRINT_BYTES],
    all_accounts: bool,
    accounts: Vec<String>,
    /// The rate its bucket was built with: a rebuilt registry keeps the bucket (and its state)
    /// of a client whose id, rate and burst are unchanged.
    rate_per_second: f64,
    burst: u32,
    /// The client's own rate (`rate_per_second`, `burst`), shared with the same client in the
    /// registry a reload builds when its rate is unchanged.
    bucket: Arc<Mutex<TokenBucket>>,
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

/// Why the registry cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error(
        "cannot generate the gateway token key: the system random number generator failed; \
         set clients.token_signing_key"
    )]
    NoRandom,
}

/// Bytes of the secret fingerprint in a token: 96 bits of HMAC-SHA256.
const FINGERPRINT_BYTES: usize = 12;

/// A token issued by another replica whose clock runs ahead by up to this much is still accepted.
const CLOCK_SKEW: u64 = 60;

/// Token payloads start with this, so a payload can never be mistaken for a fingerprint input.
const TOKEN_VERSION: &str = "t2";

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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key tokens are signed with when `token_signing_key` is empty: random, drawn once per
/// process (so a reload keeps the tokens it issued), from the operating system's generator only.
fn process_key() -> Result<&'static [u8; 32], ClientsError> {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    if let Some(k) = KEY.get() {
        return Ok(k);
    }
    let mut k = [0u8; 32];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| ClientsError::NoRandom)?;
    Ok(KEY.get_or_init(|| k))
}

fn fingerprint(key: &hmac::Key, secret_sha256: &[u8; 32]) -> [u8; FINGERPRINT_BYTES] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(b"secret-fingerprint\n");
    ctx.update(secret_sha256);
    let tag = ctx.sign();
    let mut out = [0u8; FINGERPRINT_BYTES];
    out.copy_from_slice(&tag.as_ref()[..FINGERPRINT_BYTES]);
    out
}

const UNAUTHORIZED: GatewayError =
    GatewayError::Unauthorized("missing or invalid client credentials");

impl Clients {
    pub fn new(cfg: &ClientsConfig) -> Result<Self, ClientsError> {
        Self::build(cfg, None)
    }

    /// The registry `cfg` describes, for a reload (SPEC §11): clients added, removed, re-keyed,
    /// accounts, rates, mode, token lifetime and key as `cfg` says. A client whose id, rate and
    /// burst are unchanged keeps its rate bucket (shared, with its state). Only builds: the
    /// caller installs it (`ClientApi::install_clients`) once the rest of the reload is known
    /// to succeed.
    pub fn rebuild(&self, cfg: &ClientsConfig) -> Result<Clients, ClientsError> {
        Self::build(cfg, Some(self))
    }

    fn build(cfg: &ClientsConfig, previous: Option<&Clients>) -> Result<Self, ClientsError> {
        let key = if cfg.token_signing_key.is_empty() {
            // Tokens then only work on this process.
            hmac::Key::new(hmac::HMAC_SHA256, process_key()?)
        } else {
            hmac::Key::new(hmac::HMAC_SHA256, cfg.token_signing_key.expose().as_bytes())
        };
        let by_id = cfg
            .client
            .iter()
            .filter_map(|c| {
                let hash = unhex32(&c.secret_sha256.to_ascii_lowercase())?;
                let kept = previous
                    .and_then(|p| p.by_id.get(&c.id))
                    .filter(|old| {
                        old.rate_per_second.to_bits() == c.rate_per_second.to_bits()
                            && old.burst == c.burst
                    })
                    .map(|old| old.bucket.clone());
                let bucket = kept.unwrap_or_else(|| {
                    Arc::new(Mutex::new(TokenBucket::new(
                        c.rate_per_second,
                        f64::from(c.burst),
                        Instant::now(),
                    )))
                });
                Some((
                    c.id.clone(),
                    Arc::new(Client {
                        id: c.id.clone(),
                        secret_sha256: hash,
                        fingerprint: fingerprint(&key, &hash),
                        all_accounts: c.accounts.iter().any(|a| a == "*"),
                        accounts: c.accounts.clone(),
                        rate_per_second: c.rate_per_second,
                        burst: c.burst,
                        bucket,
                    }),
                ))
            })
            .collect();
        Ok(Self {
            mode: cfg.mode,
            by_id,
            key,
            token_ttl: cfg.token_ttl.0,
        })
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

    /// A gateway token for `who`, valid `token_ttl` from now, and its lifetime in seconds.
    pub fn issue_token(&self, who: &Principal) -> (String, u64) {
        let ttl = self.token_ttl.as_secs();
        let issued = unix_now();
        // Anonymous tokens (mode "none") carry no fingerprint, so they match no client.
        let (id, fp) = match who {
            Principal::Anonymous => ("-", String::new()),
            Principal::Client(c) => (c.id.as_str(), URL_SAFE_NO_PAD.encode(c.fingerprint)),
        };
        let payload = format!(
            "{TOKEN_VERSION}\n{id}\n{issued}\n{}\n{fp}",
            issued.saturating_add(ttl)
        );
        let sig = hmac::sign(&self.key, payload.as_bytes());
        (
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(sig.as_ref())
            ),
            ttl,
        )
    }

    /// Checks a gateway token: signature, then lifetime, then that its client still exists with
    /// the secret the token was issued for.
    pub fn bearer(&self, token: &str) -> Result<Arc<Client>, GatewayError> {
        let (payload_b64, sig_b64) = token.trim().split_once('.').ok_or(UNAUTHORIZED)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| UNAUTHORIZED)?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| UNAUTHORIZED)?;
        hmac::verify(&self.key, &payload, &sig).map_err(|_| UNAUTHORIZED)?;
        let text = std::str::from_utf8(&payload).map_err(|_| UNAUTHORIZED)?;
        let rest = text
            .strip_prefix(TOKEN_VERSION)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or(UNAUTHORIZED)?;
        // The id comes first and may hold anything but ':'; the numbers are read from the end.
        let mut fields = rest.rsplitn(4, '\n');
        let fp = fields.next().ok_or(UNAUTHORIZED)?;
        let expiry: u64 = fields
            .next()
            .and_then(|e| e.parse().ok())
            .ok_or(UNAUTHORIZED)?;
        let issued: u64 = fields
            .next()
            .and_then(|i| i.parse().ok())
            .ok_or(UNAUTHORIZED)?;
        let id = fields.next().ok_or(UNAUTHORIZED)?;
        let now = unix_now();
        if expiry <= now {
            return Err(GatewayError::Unauthorized("gateway token expired"));
        }
        let lifetime = expiry.checked_sub(issued).ok_or(UNAUTHORIZED)?;
        if lifetime > self.token_ttl.as_secs() || issued > now.saturating_add(CLOCK_SKEW) {
            return Err(UNAUTHORIZED);
        }
        let client = self.by_id.get(id).ok_or(UNAUTHORIZED)?;
        let fp = URL_SAFE_NO_PAD.decode(fp).map_err(|_| UNAUTHORIZED)?;
        if !ct_eq(&fp, &client.fingerprint) {
            return Err(UNAUTHORIZED);
        }
        Ok(client.clone())
    }

    /// Who may have a gateway token: a client by its `Basic id:secret` only (SPEC §4), so a
    /// token can never be traded for a fresh one. Mode `"none"` lets everyone in.
    pub fn authenticate_for_token(
        &self,
        authorization: Option<&str>,
    ) -> Result<Principal, GatewayError> {
        if self.mode == ClientMode::None {
            return Ok(Principal::Anonymous);
        }
        match authorization.and_then(|v| v.split_once(' ')) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => {
                Ok(Principal::Client(self.basic(rest)?))
            }
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("bearer") => Err(
                GatewayError::Unauthorized("gateway tokens are issued for Basic credentials only"),
            ),
            _ => Err(UNAUTHORIZED),
        }
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
        c.bucket
            .lock()
            .try_take(Instant::now())
            .map_err(|retry_after| GatewayError::RateLimited { retry_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, Dur};
    use crate::secret::Secret;

    const K1: &str = "k1-0123456789abcdef0123456789abcdef";
    const K2: &str = "k2-0123456789abcdef0123456789abcdef";

    fn cfg(key: &str) -> ClientsConfig {
        cfg_with_secret(key, "s3cret")
    }

    fn cfg_with_secret(key: &str, secret: &str) -> ClientsConfig {
        ClientsConfig {
            token_signing_key: Secret::new(key),
            client: vec![ClientConfig {
                id: "billing".into(),
                secret_sha256: sha256_hex(secret),
                accounts: vec!["A-1".into()],
                rate_per_second: 1.0,
                burst: 2,
            }],
            token_ttl: Dur::secs(60),
            ..ClientsConfig::default()
        }
    }

    fn basic(id_secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(id_secret))
    }

    /// A token signed with `key` whose fields are exactly these (a forger who holds the key).
    fn forge(key: &str, payload: &str) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
        let sig = hmac::sign(&k, payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }

    fn payload(token: &str) -> String {
        let b64 = token.split_once('.').unwrap().0;
        String::from_utf8(URL_SAFE_NO_PAD.decode(b64).unwrap()).unwrap()
    }

    fn token_for(c: &Clients) -> String {
        let who = c
            .authenticate_for_token(Some(&basic("billing:s3cret")))
            .unwrap();
        c.issue_token(&who).0
    }

    #[test]
    fn basic_and_bearer() {
        let c = Clients::new(&cfg(K1)).unwrap();
        assert!(c.authenticate(Some(&basic("billing:s3cret"))).is_ok());
        assert_eq!(
            c.authenticate(Some(&basic("billing:nope"))).err(),
            Some(UNAUTHORIZED)
        );
        assert!(c.authenticate(None).is_err());
        let who = c.authenticate(Some(&basic("billing:s3cret"))).unwrap();
        let (token, ttl) = c.issue_token(&who);
        assert_eq!(ttl, 60);
        assert!(c.authenticate(Some(&format!("Bearer {token}"))).is_ok());
        // Same key on another instance: accepted. Another key: rejected.
        assert!(Clients::new(&cfg(K1)).unwrap().bearer(&token).is_ok());
        assert!(Clients::new(&cfg(K2)).unwrap().bearer(&token).is_err());
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

    #[test]
    fn only_basic_credentials_get_a_token() {
        let c = Clients::new(&cfg(K1)).unwrap();
        let token = token_for(&c);
        assert_eq!(
            c.authenticate_for_token(Some(&format!("Bearer {token}")))
                .err(),
            Some(GatewayError::Unauthorized(
                "gateway tokens are issued for Basic credentials only"
            ))
        );
        for auth in [None, Some("Digest x"), Some("Basic !!"), Some("Bearer")] {
            assert_eq!(c.authenticate_for_token(auth).err(), Some(UNAUTHORIZED));
        }
    }

    #[test]
    fn a_signed_expiry_past_token_ttl_is_refused() {
        let c = Clients::new(&cfg(K1)).unwrap();
        let token = token_for(&c);
        let fields: Vec<String> = payload(&token).split('\n').map(String::from).collect();
        let [version, id, issued, expiry, fp] = &fields[..] else {
            panic!("{fields:?}")
        };
        let (issued, expiry): (u64, u64) = (issued.parse().unwrap(), expiry.parse().unwrap());
        assert_eq!(expiry - issued, 60);
        // The genuine fields re-signed: accepted (the forger's tool works).
        let same = format!("{version}\n{id}\n{issued}\n{expiry}\n{fp}");
        assert!(c.bearer(&forge(K1, &same)).is_ok());
        let ten_years = 10 * 365 * 24 * 3600;
        for (i, e) in [
            (issued, expiry + ten_years),
            (issued, issued + 61),
            // Issued in the future so that expiry - issue is within token_ttl.
            (issued + ten_years, issued + ten_years + 30),
            // Expiry before issue.
            (expiry + 5, expiry),
        ] {
            let forged = format!("{version}\n{id}\n{i}\n{e}\n{fp}");
            assert_eq!(
                c.bearer(&forge(K1, &forged)).err(),
                Some(UNAUTHORIZED),
                "{forged}"
            );
        }
        // The old format (id and expiry only) is refused.
        let old = format!("billing\n{}", expiry + ten_years);
        assert!(c.bearer(&forge(K1, &old)).is_err());
    }

    #[test]
    fn rotating_or_removing_the_client_refuses_its_tokens() {
        let c = Clients::new(&cfg(K1)).unwrap();
        let token = token_for(&c);
        let rotated = Clients::new(&cfg_with_secret(K1, "n3w-secret")).unwrap();
        assert_eq!(rotated.bearer(&token).err(), Some(UNAUTHORIZED));
        let removed = Clients::new(&ClientsConfig {
            client: Vec::new(),
            ..cfg(K1)
        })
        .unwrap();
        assert_eq!(removed.bearer(&token).err(), Some(UNAUTHORIZED));
        // An anonymous token (mode "none") names "-" and matches no client.
        let anon = c.issue_token(&Principal::Anonymous).0;
        assert!(payload(&anon).starts_with("t2\n-\n"));
        assert!(c.bearer(&anon).is_err());
    }

    #[test]
    fn empty_key_is_random_per_process() {
        let a = Clients::new(&cfg("")).unwrap();
        let b = Clients::new(&cfg("")).unwrap();
        let token = token_for(&a);
        // One process key: a rebuilt registry (a reload) keeps accepting the tokens it issued.
        assert!(b.bearer(&token).is_ok());
        assert!(Clients::new(&cfg(K1)).unwrap().bearer(&token).is_err());
        assert_ne!(process_key().unwrap(), &[0u8; 32]);
    }

    #[tokio::test(start_paused = true)]
    async fn accounts_and_rate() {
        let c = Clients::new(&cfg(K1)).unwrap();
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

    /// A rebuilt registry (a reload): an unchanged client keeps its bucket's state, a changed
    /// rate starts a fresh bucket, removed clients and the old key's tokens are refused.
    #[tokio::test(start_paused = true)]
    async fn rebuild_keeps_unchanged_buckets_only() {
        let c = Clients::new(&cfg(K1)).unwrap();
        let token = token_for(&c);
        let who = Principal::Client(c.by_id["billing"].clone());
        assert!(c.authorize(&who, Some("A-1")).is_ok());
        assert!(c.authorize(&who, Some("A-1")).is_ok());
        let same = c.rebuild(&cfg(K1)).unwrap();
        assert!(Arc::ptr_eq(
            &same.by_id["billing"].bucket,
            &c.by_id["billing"].bucket
        ));
        let who = Principal::Client(same.by_id["billing"].clone());
        assert!(matches!(
            same.authorize(&who, Some("A-1")),
            Err(GatewayError::RateLimited { .. })
        ));
        assert!(same.bearer(&token).is_ok());
        // Rate changed and accounts changed: a fresh full bucket, the new accounts.
        let mut changed = cfg(K1);
        changed.client[0].burst = 3;
        changed.client[0].accounts = vec!["B-2".into()];
        let changed = same.rebuild(&changed).unwrap();
        let who = Principal::Client(changed.bearer(&token).unwrap());
        assert_eq!(
            changed.authorize(&who, Some("A-1")),
            Err(GatewayError::Forbidden)
        );
        for _ in 0..3 {
            assert!(changed.authorize(&who, Some("B-2")).is_ok());
        }
        // Another signing key: the old tokens are refused; removed: refused too.
        assert_eq!(
            c.rebuild(&cfg(K2)).unwrap().bearer(&token).err(),
            Some(UNAUTHORIZED)
        );
        let removed = c
            .rebuild(&ClientsConfig {
                client: Vec::new(),
                ..cfg(K1)
            })
            .unwrap();
        assert_eq!(removed.bearer(&token).err(), Some(UNAUTHORIZED));
        assert!(removed
            .authenticate(Some(&basic("billing:s3cret")))
            .is_err());
    }

    /// Any rate the registry is given answers 429 with a bounded `Retry-After` (config
    /// validation bounds rates, but the registry must not panic on one it let through).
    #[tokio::test(start_paused = true)]
    async fn any_client_rate_is_panic_free() {
        for rate in [0.0, -1.0, f64::NAN, 1e-300, f64::INFINITY] {
            let mut config = cfg(K1);
            config.client[0].rate_per_second = rate;
            config.client[0].burst = 1;
            let c = Clients::new(&config).unwrap();
            let who = Principal::Client(c.by_id["billing"].clone());
            assert!(
                c.authorize(&who, Some("A-1")).is_ok(),
                "the burst, at {rate}"
            );
            let second = c.authorize(&who, Some("A-1"));
            let Err(GatewayError::RateLimited { retry_after }) = second else {
                panic!("at {rate}: {second:?}");
            };
            if rate == f64::INFINITY {
                assert!(retry_after <= Duration::from_nanos(1), "{retry_after:?}");
            } else {
                assert_eq!(retry_after, crate::util::bucket::LONGEST_WAIT, "at {rate}");
            }
            // The answer renders (its Retry-After is whole seconds).
            let resp = GatewayError::RateLimited { retry_after }.to_response();
            assert_eq!(resp.status(), http::StatusCode::TOO_MANY_REQUESTS);
        }
    }
}
