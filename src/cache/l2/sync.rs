//! Keeps a replica's L1 in step with the fleet's purges: a subscription to the `purge` channel
//! on a connection of its own (RESP3, pushes into a channel), resubscribed by this loop.
//!
//! Redis pub/sub delivers at most once: a message sent while the subscription is down is lost.
//! So the L1 is emptied every time the subscription is (re)made, and every time the main link
//! rejoins ([`Redis::joined`]): what was cached before may have missed a purge.

use super::{PurgeMessage, L2};
use crate::cache::store::L1;
use crate::fleet::{Redis, PROBE_EVERY};
use crate::util::Shutdown;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// A live subscription: the connection (dropping it ends the subscription) and its pushes.
pub struct Subscription {
    _conn: MultiplexedConnection,
    pushes: UnboundedReceiver<PushInfo>,
}

/// Subscribes to the purge channel, within `connect_timeout` (None when Redis is down or does
/// not answer in time).
pub async fn subscribe(l2: &L2) -> Option<Subscription> {
    let redis = l2.redis();
    if !redis.is_up() {
        return None;
    }
    let attempt = async {
        let info = redis.client().get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))?;
        let (tx, pushes) = unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_push_sender(tx)
            .set_connection_timeout(Some(l2.connect_timeout()))
            .set_response_timeout(None);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        conn.subscribe(l2.channel()).await?;
        redis::RedisResult::Ok(Subscription {
            _conn: conn,
            pushes,
        })
    };
    match tokio::time::timeout(l2.connect_timeout(), attempt).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(error = %e.category(), "purge subscription failed");
            None
        }
        Err(_) => {
            tracing::debug!("purge subscription timed out");
            None
        }
    }
}

/// Runs until `shutdown`: applies purge messages to `l1`, resubscribes when the subscription
/// drops, empties `l1` on every (re)subscription and every rejoin. `first`: a subscription made
/// at start-up, before anything was cached.
pub async fn run(l2: Arc<L2>, l1: Arc<L1>, first: Option<Subscription>, shutdown: Shutdown) {
    let redis: &Arc<Redis> = l2.redis();
    let mut joined = redis.joined();
    joined.borrow_and_update();
    let mut current = first;
    // One warning per stretch of failed subscriptions while Redis otherwise answers.
    let mut warned = false;
    loop {
        match current.take() {
            Some(sub) => match listen(sub, &l1, &mut joined, &shutdown).await {
                Ended::Shutdown => return,
                Ended::Dropped => tracing::warn!("purge subscription dropped; resubscribing"),
                Ended::Rejoined => {}
            },
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                    changed = joined.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        rejoined(&l1).await;
                    }
                    _ = shutdown.wait() => return,
                }
            }
        }
        current = subscribe(&l2).await;
        if current.is_some() {
            let n = l1.purge_all().await;
            tracing::info!(dropped = n, "purge subscription made again; L1 emptied");
            warned = false;
        } else if redis.is_up() && !warned {
            tracing::warn!(
                "cannot subscribe to the fleet's purges although redis answers; trying every \
                 second (purges from other replicas do not reach this one meanwhile)"
            );
            warned = true;
        }
    }
}

enum Ended {
    Shutdown,
    /// The connection closed.
    Dropped,
    /// The main link rejoined (the L1 is emptied): the subscription may have hung with it.
    Rejoined,
}

/// Applies purge messages until the subscription ends, the main link rejoins, or shutdown.
async fn listen(
    mut sub: Subscription,
    l1: &L1,
    joined: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &Shutdown,
) -> Ended {
    loop {
        tokio::select! {
            push = sub.pushes.recv() => match push {
                Some(p) if p.kind == PushKind::Message => apply(l1, &p).await,
                Some(p) if p.kind == PushKind::Disconnection => return Ended::Dropped,
                Some(_) => {}
                None => return Ended::Dropped,
            },
            changed = joined.changed() => {
                if changed.is_err() {
                    return Ended::Shutdown;
                }
                rejoined(l1).await;
                return Ended::Rejoined;
            }
            _ = shutdown.wait() => return Ended::Shutdown,
        }
    }
}

async fn rejoined(l1: &L1) {
    let n = l1.purge_all().await;
    tracing::info!(
        dropped = n,
        "rejoined the fleet; L1 emptied (it may have missed purges)"
    );
}

async fn apply(l1: &L1, push: &PushInfo) {
    // data: [channel, payload]
    let payload = match push.data.get(1) {
        Some(Value::BulkString(b)) => b.as_slice(),
        _ => return,
    };
    match PurgeMessage::parse(payload) {
        Some(PurgeMessage::All) => {
            let n = l1.purge_all().await;
            tracing::info!(purged = n, "fleet purge: L1 emptied");
        }
        Some(PurgeMessage::Account(a)) => {
            let n = l1.purge_account(&a).await;
            tracing::info!(purged = n, "fleet purge of an account");
        }
        None => tracing::debug!("unknown message on the purge channel"),
    }
}
