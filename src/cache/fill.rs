//! One fill of a key the L1 cannot answer: run once per key per replica (in [`super::flight`]),
//! and, in fleet mode, once per key for the fleet:
//!
//! 1. read the L2; a page good enough for the caller ([`Want`]) goes into the L1 and answers;
//! 2. otherwise take the key's fill lease: the holder fetches from the upstream, puts the answer
//!    into the L1 and then (off the answer's path) into the L2, and releases the lease;
//! 3. a replica that finds the lease taken waits for it to go (polling, backing off up to
//!    [`POLL_MAX`]) and reads again, until its own deadline; when the holder stops renewing it
//!    (it lost Redis mid-fill, or died), the waiter fetches itself instead of waiting out the
//!    lease.
//!
//! Any Redis failure on the way (down, timing out) falls back to the local fill at once: the
//! upstream fetch, single-flight within this replica only. No step waits on Redis longer than
//! `redis.command_timeout`.

use super::l2::{Lease, Leasing, L2, LEASE_RENEW_EVERY, LEASE_STALLED_AFTER, LEASE_TTL};
use super::store::L1;
use super::{clock, Entry, Freshness, Key, Windows};
use crate::error::GatewayError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first and the longest pause between two looks at another replica's lease.
const POLL_FIRST: Duration = Duration::from_millis(2);
pub const POLL_MAX: Duration = Duration::from_millis(50);

/// Where a filled entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the upstream by this replica.
    Upstream,
    /// Read from the fleet's shared cache (another replica fetched it, now or before).
    Shared,
}

#[derive(Debug, Clone)]
pub struct Filled {
    pub entry: Arc<Entry>,
    pub origin: Origin,
}

/// A fill that got no entry: the error, and a stale L2 copy that may stand in for it.
#[derive(Debug, Clone)]
pub struct FillFailed {
    pub error: GatewayError,
    pub stale: Option<Arc<Entry>>,
}

pub type FillResult = Result<Filled, FillFailed>;

/// What a shared entry must be to end a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A miss: fresh, or stale within `stale_while_revalidate` (served STALE, refreshed).
    Usable,
    /// A background refresh: fresh only.
    Fresh,
}

impl Want {
    fn accepts(self, f: Freshness) -> bool {
        match self {
            Want::Usable => matches!(f, Freshness::Fresh | Freshness::Revalidate),
            Want::Fresh => f == Freshness::Fresh,
        }
    }
}

/// One fill, as run by the single-flight leader's task.
pub(super) struct Fill {
    pub l1: Arc<L1>,
    pub l2: Option<Arc<L2>>,
    pub key: Key,
    pub windows: Windows,
    pub want: Want,
    /// The fill gives up waiting on another replica here (the fetch has its own deadline).
    pub deadline: Instant,
}

impl Fill {
    pub async fn run<F>(self, fetch: F) -> FillResult
    where
        F: Future<Output = Result<Arc<Entry>, GatewayError>> + Send + 'static,
    {
        let epoch = self.l1.epoch();
        let Some(l2) = self.l2.clone() else {
            return self.fetch_locally(fetch, epoch, None).await;
        };
        let mut stale = None;
        loop {
            if Instant::now() >= self.deadline {
                return Err(FillFailed {
                    error: GatewayError::UpstreamTimeout,
                    stale,
                });
            }
            let Ok(read) = l2.read(&self.key).await else {
                return self.fetch_locally(fetch, epoch, stale).await;
            };
            if let Some(e) = read.entry {
                if self.want.accepts(e.freshness(clock::now(), &self.windows)) {
                    self.l1
                        .put_unless_purged(self.key.clone(), e.clone(), epoch)
                        .await;
                    return Ok(Filled {
                        entry: e,
                        origin: Origin::Shared,
                    });
                }
                stale = Some(e);
            }
            match l2.lease(&self.key, &read.seen).await {
                Ok(Leasing::Held(lease)) => {
                    return self.lead(l2, lease, fetch, epoch, stale).await;
                }
                Ok(Leasing::Changed) => continue,
                Ok(Leasing::Busy) => match self.wait_for_other(&l2).await {
                    Ok(Waited::Gone | Waited::Deadline) => continue,
                    Ok(Waited::Stalled) => {
                        tracing::debug!("a fill lease is no longer renewed; fetching here");
                        return self.fetch_locally(fetch, epoch, stale).await;
                    }
                    Err(_) => return self.fetch_locally(fetch, epoch, stale).await,
                },
                Err(_) => return self.fetch_locally(fetch, epoch, stale).await,
            }
        }
    }

    /// The local fill: fetch, and keep the answer in the L1.
    async fn fetch_locally<F>(self, fetch: F, epoch: u64, stale: Option<Arc<Entry>>) -> FillResult
    where
        F: Future<Output = Result<Arc<Entry>, GatewayError>>,
    {
        match fetch.await {
            Ok(entry) => {
                self.l1
                    .put_unless_purged(self.key, entry.clone(), epoch)
                    .await;
                Ok(Filled {
                    entry,
                    origin: Origin::Upstream,
                })
            }
            Err(error) => Err(FillFailed { error, stale }),
        }
    }

    /// The fleet's one fetch of the key: the lease is renewed while it runs, the answer is put
    /// into the L1 before anyone is answered and into the L2 after (releasing the lease).
    async fn lead<F>(
        self,
        l2: Arc<L2>,
        lease: Lease,
        fetch: F,
        epoch: u64,
        stale: Option<Arc<Entry>>,
    ) -> FillResult
    where
        F: Future<Output = Result<Arc<Entry>, GatewayError>>,
    {
        let renewing = Renewing(tokio::spawn({
            let (l2, key, lease) = (l2.clone(), self.key.clone(), lease.clone());
            async move {
                loop {
                    tokio::time::sleep(LEASE_RENEW_EVERY).await;
                    if !matches!(l2.renew(&key, &lease).await, Ok(true)) {
                        return;
                    }
                }
            }
        }));
        let result = fetch.await;
        drop(renewing);
        let key = self.key.clone();
        let windows = self.windows;
        match &result {
            Ok(entry) => {
                let entry = entry.clone();
                tokio::spawn(async move {
                    if let Err(e) = l2.write(&key, &entry, &lease, &windows).await {
                        tracing::debug!(error = %e, "L2 write skipped");
                    }
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let _ = l2.release(&key, &lease).await;
                });
            }
        }
        self.fetch_locally(std::future::ready(result), epoch, stale)
            .await
    }

    /// Waits until no replica holds the key's lease, its holder stops renewing it, or the
    /// deadline comes.
    async fn wait_for_other(&self, l2: &L2) -> Result<Waited, crate::fleet::RedisError> {
        let mut pause = POLL_FIRST;
        loop {
            let wake = Instant::now() + pause;
            if wake >= self.deadline {
                tokio::time::sleep_until(self.deadline).await;
                return Ok(Waited::Deadline);
            }
            tokio::time::sleep_until(wake).await;
            match l2.lease_left(&self.key).await? {
                None => return Ok(Waited::Gone),
                Some(left) if left + LEASE_STALLED_AFTER < LEASE_TTL => return Ok(Waited::Stalled),
                Some(_) => {}
            }
            pause = (pause * 2).min(POLL_MAX);
        }
    }
}

enum Waited {
    Gone,
    Stalled,
    Deadline,
}

/// Stops renewing a lease when the fetch ends, however it ends.
struct Renewing(tokio::task::JoinHandle<()>);

impl Drop for Renewing {
    fn drop(&mut self) {
        self.0.abort();
    }
}
