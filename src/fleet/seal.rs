//! Sealing what the fleet keeps in Redis that must not be readable there (SPEC §10): the shared
//! tokens. AES-256-GCM under a key derived by HKDF-SHA256 from `clients.token_signing_key` (a
//! secret every replica holds and a password rotation does not change), one key per purpose, a
//! random nonce per seal, and the Redis key it is stored under as associated data (a sealed value
//! copied to another key does not open).

use crate::secret::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

const SALT: &[u8] = b"thingspace-gateway fleet seal v1";

/// One purpose's sealing key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// The key for `purpose` (e.g. `b"tokens"`) from the signing key.
    pub fn new(signing_key: &Secret, purpose: &[u8]) -> Self {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(signing_key.expose().as_bytes());
        let info = [purpose];
        // Expanding to one AES-256 key from HKDF-SHA256 cannot fail (32 ≤ 255 × 32 bytes).
        let key = prk
            .expand(&info, &AES_256_GCM)
            .map(UnboundKey::from)
            .unwrap_or_else(|_| unreachable!("HKDF output of AES-256 key length"));
        Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        }
    }

    /// `nonce ‖ ciphertext ‖ tag`; `None` only if the system's random generator fails.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// The plaintext, or `None` when `sealed` was not sealed by this key for this `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_opens_only_with_the_same_key_purpose_and_aad() {
        let key = Secret::new("k".repeat(32));
        let s = Sealer::new(&key, b"tokens");
        let sealed = s.seal(b"tsgw:token:oauth", b"bearer-123").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"bearer-123"));
        assert_eq!(s.open(b"tsgw:token:oauth", &sealed).unwrap(), b"bearer-123");
        assert!(s.open(b"tsgw:token:session", &sealed).is_none());
        assert!(Sealer::new(&key, b"other")
            .open(b"tsgw:token:oauth", &sealed)
            .is_none());
        let other_key = Sealer::new(&Secret::new("j".repeat(32)), b"tokens");
        assert!(other_key.open(b"tsgw:token:oauth", &sealed).is_none());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(s.open(b"tsgw:token:oauth", &tampered).is_none());
        assert!(s.open(b"x", b"short").is_none());
        // A fresh nonce per seal.
        assert_ne!(s.seal(b"a", b"x").unwrap(), s.seal(b"a", b"x").unwrap());
    }
}
