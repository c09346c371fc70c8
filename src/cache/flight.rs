//! Single-flight: one fetch per key however many callers ask at the same time. The fetch runs in
//! its own task (a caller that goes away does not cancel it); every caller waits at most until
//! its own deadline. However the fetch's task ends (an answer, a panic, or the runtime dropping
//! it) the key leaves the map and the waiters get an answer, so the next caller for the key
//! starts a fresh fetch instead of waiting on a dead one.
//!
//! In-process today; a fleet would put a lease in the shared store in front of it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;

/// How a caller joined a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// This caller started it.
    Leader,
    /// Another caller's fetch was already running.
    Coalesced,
}

/// Why a caller got no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// The caller's deadline passed first (the fetch goes on for the others).
    Deadline,
    /// The fetch's task panicked or was dropped before it answered.
    Died,
}

#[derive(Debug, Clone)]
enum Landing<V> {
    Pending,
    Value(V),
    Died,
}

type Map<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Landing<V>>>>>;

/// Coalesces concurrent fetches of the same key.
pub struct SingleFlight<K, V> {
    inflight: Map<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fetch` unless a fetch of `key` is already running, and waits for whichever runs,
    /// until `deadline`.
    pub async fn run<F>(&self, key: K, deadline: Instant, fetch: F) -> (Result<V, Missed>, Join)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (mut rx, join) = {
            let mut map = self.inflight.lock();
            match map.get(&key) {
                Some(rx) => (rx.clone(), Join::Coalesced),
                None => {
                    let (tx, rx) = watch::channel(Landing::Pending);
                    map.insert(key.clone(), rx.clone());
                    let flight = Flight {
                        map: self.inflight.clone(),
                        key,
                        rx: rx.clone(),
                        tx: Some(tx),
                    };
                    tokio::spawn(async move {
                        let value = fetch.await;
                        flight.land(Landing::Value(value));
                    });
                    (rx, Join::Leader)
                }
            }
        };
        let landed = rx.wait_for(|l| !matches!(l, Landing::Pending));
        let result = match tokio::time::timeout_at(deadline, landed).await {
            Ok(Ok(l)) => match &*l {
                Landing::Value(v) => Ok(v.clone()),
                Landing::Pending | Landing::Died => Err(Missed::Died),
            },
            // Not expected: a `Flight` always answers before its channel closes.
            Ok(Err(_)) => Err(Missed::Died),
            Err(_) => Err(Missed::Deadline),
        };
        (result, join)
    }

    /// Keys with a fetch running.
    pub fn len(&self) -> usize {
        self.inflight.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The drop guard of one running fetch: see the module docs.
struct Flight<K: Eq + Hash, V> {
    map: Map<K, V>,
    key: K,
    rx: watch::Receiver<Landing<V>>,
    tx: Option<watch::Sender<Landing<V>>>,
}

impl<K: Eq + Hash, V> Flight<K, V> {
    fn land(mut self, landing: Landing<V>) {
        self.finish(landing);
    }

    fn finish(&mut self, landing: Landing<V>) {
        let Some(tx) = self.tx.take() else { return };
        {
            let mut map = self.map.lock();
            if map
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.rx))
            {
                map.remove(&self.key);
            }
        }
        tx.send_replace(landing);
    }
}

impl<K: Eq + Hash, V> Drop for Flight<K, V> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            if std::thread::panicking() {
                tracing::error!("a coalesced fetch panicked; its waiters are told it died");
            } else {
                // The runtime is shutting down and dropped the task.
                tracing::debug!("a coalesced fetch was dropped before it answered");
            }
            self.finish(Landing::Died);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let flight: Arc<SingleFlight<u8, u32>> = Arc::new(SingleFlight::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = tokio::spawn({
            let flight = flight.clone();
            async move {
                flight
                    .run(1, deadline, async move {
                        let _ = gate_rx.await;
                        7
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(flight.len(), 1);
        let waiter = tokio::spawn({
            let flight = flight.clone();
            async move {
                flight
                    .run(1, deadline, async { unreachable!("coalesced") })
                    .await
            }
        });
        tokio::task::yield_now().await;
        gate_tx.send(()).unwrap();
        assert_eq!(leader.await.unwrap(), (Ok(7), Join::Leader));
        assert_eq!(waiter.await.unwrap(), (Ok(7), Join::Coalesced));
        assert!(flight.is_empty());
    }

    #[tokio::test]
    async fn a_fetch_that_panics_answers_its_waiters_and_frees_the_key() {
        let flight: Arc<SingleFlight<u8, u32>> = Arc::new(SingleFlight::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = tokio::spawn({
            let flight = flight.clone();
            async move {
                flight
                    .run(1, deadline, async move {
                        let _ = gate_rx.await;
                        panic!("the fetch panicked");
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let waiter = tokio::spawn({
            let flight = flight.clone();
            async move {
                flight
                    .run(1, deadline, async { unreachable!("coalesced") })
                    .await
            }
        });
        tokio::task::yield_now().await;
        gate_tx.send(()).unwrap();
        assert_eq!(leader.await.unwrap(), (Err(Missed::Died), Join::Leader));
        assert_eq!(waiter.await.unwrap(), (Err(Missed::Died), Join::Coalesced));
        assert!(flight.is_empty(), "the key is freed");
        assert_eq!(
            flight.run(1, deadline, async { 8 }).await,
            (Ok(8), Join::Leader)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_until_its_own_deadline_only() {
        let flight: Arc<SingleFlight<u8, u32>> = Arc::new(SingleFlight::new());
        let short = Instant::now() + Duration::from_secs(1);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let got = flight
            .run(1, short, async move {
                let _ = gate_rx.await;
                9
            })
            .await;
        assert_eq!(got, (Err(Missed::Deadline), Join::Leader));
        // The fetch goes on: a later caller joins it and gets its value.
        let long = Instant::now() + Duration::from_secs(10);
        let waiter = tokio::spawn({
            let flight = flight.clone();
            async move {
                flight
                    .run(1, long, async { unreachable!("coalesced") })
                    .await
            }
        });
        tokio::task::yield_now().await;
        gate_tx.send(()).unwrap();
        assert_eq!(waiter.await.unwrap(), (Ok(9), Join::Coalesced));
    }
}
