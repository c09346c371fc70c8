//! The upstream budget: one token bucket (`rate_per_second`, `burst`) and `max_concurrent` slots
//! shared by every upstream call, token calls included.
//!
//! [`Budget`] is the seam for a shared (Redis-backed) budget across replicas; [`LocalBudget`] is
//! the in-process default.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Held for the duration of one upstream attempt.
pub struct BudgetPermit {
    _slot: OwnedSemaphorePermit,
}

pub type BudgetFuture<'a> = Pin<Box<dyn Future<Output = Option<BudgetPermit>> + Send + 'a>>;

pub trait Budget: Send + Sync + 'static {
    /// A slot and a rate token, or `None` if they cannot be had by `deadline`.
    fn acquire(&self, deadline: Instant) -> BudgetFuture<'_>;
    /// Tokens left in the bucket now (may be negative while callers wait for reserved tokens).
    fn available(&self) -> f64;
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct LocalBudget {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
    slots: Arc<Semaphore>,
}

impl LocalBudget {
    /// Any numbers are safe here (config validation bounds them): a rate that is not a positive
    /// number grants nothing beyond the burst.
    pub fn new(rate_per_second: f64, burst: u32, max_concurrent: usize) -> Self {
        let rate = if rate_per_second > 0.0 {
            rate_per_second.min(f64::MAX)
        } else {
            0.0
        };
        Self {
            rate,
            burst: f64::from(burst),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(burst),
                last: Instant::now(),
            }),
            slots: Arc::new(Semaphore::new(max_concurrent.min(Semaphore::MAX_PERMITS))),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let added = now.saturating_duration_since(b.last).as_secs_f64() * self.rate;
        // `min` also turns a NaN (0 s x an infinite rate) into a full bucket.
        b.tokens = (b.tokens + added).min(self.burst);
        b.last = now;
    }

    /// Reserves one token: returns when it may be used, or `None` (nothing reserved) if that is
    /// after `deadline`. Reservations queue in order, so waiters never stampede the bucket.
    fn reserve(&self, deadline: Instant) -> Option<Instant> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        self.refill(&mut b, now);
        let wait = if b.tokens >= 1.0 {
            Duration::ZERO
        } else {
            // Saturates: a tiny rate means "not in this process's lifetime", never a panic.
            Duration::try_from_secs_f64((1.0 - b.tokens) / self.rate).unwrap_or(Duration::MAX)
        };
        let at = now.checked_add(wait)?;
        if at > deadline {
            return None;
        }
        b.tokens -= 1.0;
        Some(at)
    }
}

impl Budget for LocalBudget {
    fn acquire(&self, deadline: Instant) -> BudgetFuture<'_> {
        Box::pin(async move {
            let slot = tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned())
                .await
                .ok()?
                .ok()?;
            let at = self.reserve(deadline)?;
            tokio::time::sleep_until(at).await;
            Some(BudgetPermit { _slot: slot })
        })
    }

    fn available(&self) -> f64 {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut b, Instant::now());
        b.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let b = Arc::new(LocalBudget::new(10.0, 20, 100));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let mut granted = 0;
        let mut permits = Vec::new();
        for _ in 0..200 {
            match b.acquire(deadline).await {
                Some(p) => {
                    granted += 1;
                    permits.push(p);
                    if permits.len() > 50 {
                        permits.clear();
                    }
                }
                None => break,
            }
        }
        // 20 at once, then 10 per second for 5 s.
        assert_eq!(granted, 70);
        assert!(Instant::now() <= deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_rates_do_not_panic() {
        let deadline = || Instant::now() + Duration::from_secs(5);
        for rate in [1e-20, 0.0, -1.0, f64::NAN, f64::MIN_POSITIVE] {
            let b = LocalBudget::new(rate, 1, 4);
            assert!(
                b.acquire(deadline()).await.is_some(),
                "the burst, at {rate}"
            );
            assert!(
                b.acquire(deadline()).await.is_none(),
                "nothing more, at {rate}"
            );
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert!(b.available() < 1.0);
        }
        for rate in [1e12, 1e300, f64::MAX, f64::INFINITY] {
            let b = LocalBudget::new(rate, 1_000_000, usize::MAX);
            for _ in 0..3 {
                assert!(b.acquire(deadline()).await.is_some(), "at {rate}");
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(b.available(), 1_000_000.0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slots_bound_concurrency() {
        let b = LocalBudget::new(1000.0, 1000, 2);
        let deadline = Instant::now() + Duration::from_millis(100);
        let p1 = b.acquire(deadline).await;
        let p2 = b.acquire(deadline).await;
        assert!(p1.is_some() && p2.is_some());
        assert!(b.acquire(deadline).await.is_none());
        drop(p1);
        assert!(b
            .acquire(Instant::now() + Duration::from_millis(100))
            .await
            .is_some());
    }
}
