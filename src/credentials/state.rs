//! What the token manager keeps between calls, behind one seam: the held tokens, one refresh
//! lease per token (single-flight), the lockout guards and the store of their numbers.
//! [`LocalState`] is the only version: in fleet mode (SPEC §10) it keeps the working copies
//! (tokens adopted from or published to Redis, the guard mirrored from it), and
//! `credentials/fleet.rs` adds what the replicas share: the sealed tokens, the fleet's lease on
//! each token call, and the guard's numbers, all in Redis.

use super::guard::Guard;
use super::store::GuardStore;
use super::{OAuthToken, SessionToken};
use crate::observe::TokenLabel;
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Held while one refresh of a token is in flight: other callers wait for it, then find the
/// token it stored. Released when dropped, however the refresh ended.
pub(crate) struct Lease<'a> {
    _held: Box<dyn Send + 'a>,
}

impl<'a> Lease<'a> {
    pub(crate) fn new(held: impl Send + 'a) -> Self {
        Lease {
            _held: Box::new(held),
        }
    }
}

pub(crate) type LeaseFuture<'a> = Pin<Box<dyn Future<Output = Lease<'a>> + Send + 'a>>;

/// The token manager's state. Reads of held tokens are on the request path: synchronous and
/// cheap; everything that waits is a future.
pub(crate) trait CredentialState: Send + Sync + 'static {
    fn held_oauth(&self) -> Option<Arc<OAuthToken>>;
    fn store_oauth(&self, token: Option<Arc<OAuthToken>>);
    fn held_session(&self) -> Option<Arc<SessionToken>>;
    fn store_session(&self, token: Option<Arc<SessionToken>>);
    /// Waits for the one refresh lease of `token` (the caller bounds the wait).
    fn refresh_lease(&self, token: TokenLabel) -> LeaseFuture<'_>;
    /// The lockout guard of `token`'s calls (working copy; never held across an `.await`).
    fn guard(&self, token: TokenLabel) -> &Mutex<Guard>;
    /// Where the session guard's numbers outlive a login (and the process).
    fn guard_store(&self) -> &dyn GuardStore;
}

/// One process's state: lock-free token reads, an async mutex per token as the lease.
pub(crate) struct LocalState {
    oauth: ArcSwapOption<OAuthToken>,
    session: ArcSwapOption<SessionToken>,
    oauth_lease: tokio::sync::Mutex<()>,
    session_lease: tokio::sync::Mutex<()>,
    oauth_guard: Mutex<Guard>,
    session_guard: Mutex<Guard>,
    store: Arc<dyn GuardStore>,
}

impl LocalState {
    pub(crate) fn new(store: Arc<dyn GuardStore>) -> Self {
        LocalState {
            oauth: ArcSwapOption::empty(),
            session: ArcSwapOption::empty(),
            oauth_lease: tokio::sync::Mutex::new(()),
            session_lease: tokio::sync::Mutex::new(()),
            oauth_guard: Mutex::new(Guard::default()),
            session_guard: Mutex::new(Guard::default()),
            store,
        }
    }
}

impl CredentialState for LocalState {
    fn held_oauth(&self) -> Option<Arc<OAuthToken>> {
        self.oauth.load_full()
    }

    fn store_oauth(&self, token: Option<Arc<OAuthToken>>) {
        self.oauth.store(token);
    }

    fn held_session(&self) -> Option<Arc<SessionToken>> {
        self.session.load_full()
    }

    fn store_session(&self, token: Option<Arc<SessionToken>>) {
        self.session.store(token);
    }

    fn refresh_lease(&self, token: TokenLabel) -> LeaseFuture<'_> {
        let lock = match token {
            TokenLabel::Oauth => &self.oauth_lease,
            TokenLabel::Session => &self.session_lease,
        };
        Box::pin(async move { Lease::new(lock.lock().await) })
    }

    fn guard(&self, token: TokenLabel) -> &Mutex<Guard> {
        match token {
            TokenLabel::Oauth => &self.oauth_guard,
            TokenLabel::Session => &self.session_guard,
        }
    }

    fn guard_store(&self) -> &dyn GuardStore {
        &*self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::MemoryStore;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_lease_per_token_at_a_time() {
        let s = LocalState::new(Arc::new(MemoryStore::default()));
        let held = s.refresh_lease(TokenLabel::Oauth).await;
        let wait = Duration::from_secs(1);
        assert!(
            tokio::time::timeout(wait, s.refresh_lease(TokenLabel::Oauth))
                .await
                .is_err(),
            "a second oauth lease waits for the first"
        );
        let _session = tokio::time::timeout(wait, s.refresh_lease(TokenLabel::Session))
            .await
            .expect("the session lease is another one");
        drop(held);
        let _again = tokio::time::timeout(wait, s.refresh_lease(TokenLabel::Oauth))
            .await
            .expect("released when dropped");
    }
}
