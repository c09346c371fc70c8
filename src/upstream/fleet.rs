//! Fleet mode's upstream protection (SPEC §10): one budget, one 429 cooldown and one circuit for
//! every replica sharing a Redis, behind the same seams as the in-process versions.
//!
//! - **One round trip per attempt.** [`FleetBudget::acquire`] runs one script
//!   ([`script`]) that checks the shared cooldown and circuit, takes the fleet's one half-open
//!   probe when it is due, a concurrency lease (expiring, so a replica that dies mid-call frees
//!   its slot) and a GCRA token on Redis's clock: all or nothing. Its reply carries the fleet's
//!   cooldown and circuit, so a replica learns of another's 429 on its next call.
//! - **Fair waiting stays per replica.** A local fair queue (round robin by client) sits in
//!   front: only the waiter at its head polls Redis, at the time the script says the next token
//!   is due (or shortly, for a slot), each bounded by its caller's deadline.
//! - **The protection's reads are a local mirror.** `admit`, `cooldown_remaining` and `state`
//!   stay synchronous (the token manager and `/status` read them): a [`LocalProtection`] holds
//!   the fleet's state as the last reply gave it, and refuses locally what the fleet refuses, so
//!   a known cooldown costs no round trip. A 429's cooldown and a failure are written to Redis
//!   before the attempt's caller answers (the protection's writes are futures).
//! - **Redis down** ([`crate::fleet::RedisError`]): the replica serves on its own with exactly
//!   `1/max_replicas` of the fleet's rate and `floor(burst/max_replicas)`,
//!   `floor(max_concurrent/max_replicas)`, starting from an EMPTY bucket each outage, and the
//!   mirror becomes its own cooldown and circuit (keeping what the fleet last said). When the
//!   link rejoins, waiters go back to the fleet's budget, and the replica writes its parameters
//!   if it applied a config meanwhile and any cooldown it saw alone.
//! - **Parameters in force** are the last applied by any replica: stored in Redis with the
//!   state (every script stores the caller's when it applies a config, or when Redis has none),
//!   and read back in every reply (`/status` shows them).
//!
//! No request waits on one Redis command longer than `redis.command_timeout` ([`Redis::call`]);
//! while the link is down no command is sent at all.

mod protection;
mod script;

use crate::config::UpstreamConfig;
use crate::fleet::{Redis, RedisError};
use crate::upstream::budget::{
    Budget, BudgetFuture, BudgetParams, BudgetPermit, Denied, LocalBudget,
};
use crate::upstream::circuit::Admission;
use crate::upstream::protection::{LocalProtection, Protection, Refusal};
use parking_lot::Mutex;
use redis::Script;
use script::{Code, Params, Reply};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How soon a waiter at the head polls again when every slot is leased (a slot freed by
/// another replica is not announced; one freed here wakes it at once).
const SLOT_POLL: Duration = Duration::from_millis(20);
/// Marks a fleet probe's admission ticket (the in-process circuit counts its own from 1).
const FLEET_TICKET: u64 = 1 << 63;

/// The budget and the protection an [`super::Upstream`] runs on: the fleet's when `redis` is
/// set (fleet mode), else the in-process ones.
pub fn budget_and_protection(
    u: &UpstreamConfig,
    redis: Option<&Arc<Redis>>,
) -> (Arc<dyn Budget>, Arc<dyn Protection>) {
    match redis {
        Some(redis) => {
            let core = Core::new(redis.clone(), u);
            (
                Arc::new(FleetBudget(core.clone())),
                Arc::new(FleetProtection(core)),
            )
        }
        None => (
            Arc::new(LocalBudget::new(
                u.rate_per_second,
                u.burst,
                u.max_concurrent,
            )),
            Arc::new(LocalProtection::new(
                u.circuit_failures,
                u.circuit_open_for.0,
            )),
        ),
    }
}

/// The fleet's upstream budget.
pub struct FleetBudget(Arc<Core>);

/// The fleet's 429 cooldown and circuit.
pub struct FleetProtection(Arc<Core>);

/// What the fleet's replies last said.
struct View {
    /// The parameters in force (the fleet's; this replica's own until Redis answers).
    params: Params,
    /// The highest GCRA arrival time seen (µs, Redis's clock), sent with every acquire.
    tat: u64,
    available: f64,
}

/// One replica's share while Redis is down, for one outage (`epoch`: the link's join count).
struct Fallback {
    epoch: u64,
    budget: Arc<LocalBudget>,
}

struct Core {
    redis: Arc<Redis>,
    /// `key_prefix` + [`script::KEY_SUFFIXES`].
    keys: Arc<[String]>,
    /// Tells this replica's lease ids from the others'.
    replica: u64,
    seq: AtomicU64,
    /// This replica's config, and how many times it was applied (`pushed`: the last of those
    /// stored in Redis).
    own: Mutex<Params>,
    applied: AtomicU64,
    pushed: AtomicU64,
    view: Mutex<View>,
    /// Redis's clock as of the last reply, and when that reply arrived here.
    clock: Mutex<Option<(Instant, u64)>>,
    /// Numbers the scripts in the order they are sent (one connection: the order Redis runs
    /// them), and the newest whose reply was taken in: an older reply processed late does not
    /// undo a newer state.
    sent: AtomicU64,
    absorbed: AtomicU64,
    /// How long a lease outlives its grant: `upstream.timeout` plus the round trips around the
    /// attempt (ms).
    lease_ttl_ms: AtomicU64,
    /// The fleet's cooldown and circuit as last seen; this replica's own while Redis is down.
    local: LocalProtection,
    /// The local fair queue: holding its one slot is being the head that polls Redis.
    turn: LocalBudget,
    /// A lease of this replica was released: the head may find a slot.
    released: Notify,
    fallback: Mutex<Option<Fallback>>,
    joined: watch::Receiver<u64>,
    /// Wakes the sync task (a config applied, or the core dropped).
    sync: Arc<Notify>,
}

/// What one acquire round trip came to.
enum Take {
    Done(Result<BudgetPermit, Denied>),
    /// No token or slot yet: ask again after this long (or when a local lease is released).
    Wait(Duration),
}

/// A granted lease; dropping it releases it in Redis (spawned: a drop never blocks).
struct Lease {
    core: Arc<Core>,
    id: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (shutting down): the lease expires on its own
        };
        let core = self.core.clone();
        let id = std::mem::take(&mut self.id);
        rt.spawn(async move {
            let _ = core.run(&script::RELEASE_SCRIPT, vec![id]).await;
            core.released.notify_one();
        });
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn params_of(u: &UpstreamConfig) -> Params {
    Params {
        rate_per_second: u.rate_per_second,
        burst: u.burst,
        max_concurrent: u.max_concurrent,
        circuit_failures: u.circuit_failures,
        circuit_open_for: u.circuit_open_for.0,
    }
}

impl Core {
    fn new(redis: Arc<Redis>, u: &UpstreamConfig) -> Arc<Core> {
        let keys: Arc<[String]> = script::KEY_SUFFIXES.iter().map(|k| redis.key(k)).collect();
        let params = params_of(u);
        let core = Arc::new(Core {
            keys,
            replica: fastrand::u64(..),
            seq: AtomicU64::new(0),
            own: Mutex::new(params.clone()),
            // Starting counts as applying a config: the first round trip stores it.
            applied: AtomicU64::new(1),
            pushed: AtomicU64::new(0),
            view: Mutex::new(View {
                params,
                tat: 0,
                available: 0.0,
            }),
            clock: Mutex::new(None),
            sent: AtomicU64::new(0),
            absorbed: AtomicU64::new(0),
            lease_ttl_ms: AtomicU64::new(0),
            local: LocalProtection::new(u.circuit_failures, u.circuit_open_for.0),
            turn: LocalBudget::new(f64::INFINITY, 1_000_000, 1),
            released: Notify::new(),
            fallback: Mutex::new(None),
            joined: redis.joined(),
            sync: Arc::new(Notify::new()),
            redis,
        });
        core.set_lease_ttl(u.timeout.0);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sync_loop(
                Arc::downgrade(&core),
                core.joined.clone(),
                core.sync.clone(),
            ));
            core.sync.notify_one();
        }
        core
    }

    fn set_lease_ttl(&self, timeout: Duration) {
        let ttl = timeout.saturating_add(self.redis.command_timeout().saturating_mul(2));
        self.lease_ttl_ms
            .store(millis(ttl).max(1), Ordering::Relaxed);
    }

    /// A new attempt's ticket (marked as the fleet's) and its lease id.
    fn next_lease(&self) -> (u64, String) {
        let ticket = self.seq.fetch_add(1, Ordering::Relaxed) | FLEET_TICKET;
        (ticket, self.lease_id(ticket))
    }

    fn lease_id(&self, ticket: u64) -> String {
        format!("{:016x}-{:x}", self.replica, ticket & !FLEET_TICKET)
    }

    /// Runs one script with the common arguments and `extra`; takes in the fleet's state it
    /// answers. A reply of the wrong shape counts as a Redis failure.
    async fn run(&self, script: &'static Script, extra: Vec<String>) -> Result<Reply, RedisError> {
        let applied = self.applied.load(Ordering::Acquire);
        let apply = applied != self.pushed.load(Ordering::Acquire);
        let mut args = self.own.lock().args(apply);
        args.extend(extra);
        let keys = self.keys.clone();
        let seq = self.sent.fetch_add(1, Ordering::AcqRel) + 1;
        let raw: Vec<String> = self
            .redis
            .call(move |mut conn| async move {
                let mut inv = script.prepare_invoke();
                for k in keys.iter() {
                    inv.key(k);
                }
                for a in &args {
                    inv.arg(a);
                }
                inv.invoke_async(&mut conn).await
            })
            .await?;
        let Some(reply) = Reply::parse(&raw) else {
            let err = RedisError::Failed("unexpected reply from the budget script".into());
            self.redis.mark_down(&err);
            return Err(err);
        };
        if apply {
            self.pushed.fetch_max(applied, Ordering::AcqRel);
        }
        self.absorb(seq, &reply);
        Ok(reply)
    }

    /// The last moment on Redis's clock at which a command sent now can still be answered to a
    /// waiting caller (0: unknown yet). The estimate runs behind Redis by the reply's trip, so
    /// it allows two command timeouts.
    fn valid_until(&self) -> u64 {
        let Some((at, ms)) = *self.clock.lock() else {
            return 0;
        };
        let margin = self.redis.command_timeout().saturating_mul(2);
        ms.saturating_add(millis(at.elapsed().saturating_add(margin)))
    }

    /// The fleet's state (as of script number `seq`) into the mirror and the view. A cooldown
    /// only ever moves later, and the highest TAT is kept, whatever the order; the rest is
    /// taken from the newest reply only.
    fn absorb(&self, seq: u64, r: &Reply) {
        if !r.cooldown_left.is_zero() {
            self.local.cooldown_for(r.cooldown_left);
        }
        let newest = self.absorbed.fetch_max(seq, Ordering::AcqRel) < seq;
        let mut v = self.view.lock();
        v.tat = v.tat.max(r.tat);
        if !newest {
            return;
        }
        v.params = r.params.clone();
        v.available = r.available;
        drop(v);
        *self.clock.lock() = Some((Instant::now(), r.now_ms));
        self.local.mirror_circuit(r.failures, r.open_left);
        self.local
            .reconfigure(r.params.circuit_failures, r.params.circuit_open_for);
    }

    /// What the mirror refuses now (a cooldown, an open circuit), without asking Redis.
    fn mirror_refusal(&self) -> Option<Refusal> {
        if let Some(left) = self.local.cooldown_remaining() {
            return Some(Refusal::Cooldown(left));
        }
        self.local.open_remaining().map(Refusal::CircuitOpen)
    }

    async fn acquire(
        self: &Arc<Self>,
        client: &str,
        deadline: Instant,
    ) -> Result<BudgetPermit, Denied> {
        loop {
            if Instant::now() >= deadline {
                return Err(Denied::Exhausted);
            }
            if !self.redis.is_up() {
                match self.acquire_share(client, deadline).await {
                    Some(r) => return r,
                    None => continue, // rejoined while waiting: the fleet's budget again
                }
            }
            // A Redis failure marks the link down: the next turn takes the share.
            if let Ok(r) = self.acquire_shared(client, deadline).await {
                return r;
            }
        }
    }

    /// This replica's share while Redis is down; `None` when the link rejoins first.
    async fn acquire_share(
        &self,
        client: &str,
        deadline: Instant,
    ) -> Option<Result<BudgetPermit, Denied>> {
        let mut joined = self.joined.clone();
        let epoch = *joined.borrow_and_update();
        if self.redis.is_up() {
            return None;
        }
        let share = self.share(epoch);
        tokio::select! {
            r = share.acquire(client, deadline) => Some(r),
            Ok(()) = joined.changed() => None,
        }
    }

    /// The share for the outage after join `epoch`: made empty when the outage starts.
    fn share(&self, epoch: u64) -> Arc<LocalBudget> {
        let mut f = self.fallback.lock();
        if let Some(f) = f.as_ref().filter(|f| f.epoch == epoch) {
            return f.budget.clone();
        }
        let (rate, burst, max_concurrent) = self.share_numbers();
        let budget = Arc::new(LocalBudget::empty(rate, burst, max_concurrent));
        tracing::warn!(
            rate_per_second = rate,
            burst,
            max_concurrent,
            "redis unavailable: upstream budget falls back to this replica's share"
        );
        *f = Some(Fallback {
            epoch,
            budget: budget.clone(),
        });
        budget
    }

    /// `1/max_replicas` of the fleet's numbers in force: the rate exactly, the burst and the
    /// slots rounded down (at least one: config validation keeps both ≥ `max_replicas`).
    fn share_numbers(&self) -> (f64, u32, usize) {
        let n = self.redis.max_replicas().max(1);
        let p = self.view.lock().params.clone();
        (
            p.rate_per_second / f64::from(n),
            (p.burst / n).max(1),
            (p.max_concurrent / n as usize).max(1),
        )
    }

    /// The fleet's budget: at once when nobody here waits, else in the local fair queue whose
    /// head polls. `Err` when Redis failed (the caller falls back).
    async fn acquire_shared(
        self: &Arc<Self>,
        client: &str,
        deadline: Instant,
    ) -> Result<Result<BudgetPermit, Denied>, RedisError> {
        if self.turn.idle() {
            if let Take::Done(r) = self.take().await? {
                return Ok(r);
            }
        }
        // Refuse at once what the fleet's rate cannot serve in time even if nobody else asks.
        let needed = (self.turn.ahead_of(client) + 1) as f64;
        let rate = self.view.lock().params.rate_per_second;
        let earliest = Duration::try_from_secs_f64(needed / rate)
            .ok()
            .and_then(|d| Instant::now().checked_add(d));
        if earliest.is_none_or(|at| at > deadline) {
            return Ok(Err(Denied::Exhausted));
        }
        let Ok(_turn) = self.turn.acquire(client, deadline).await else {
            return Ok(Err(Denied::Exhausted));
        };
        loop {
            match self.take().await? {
                Take::Done(r) => return Ok(r),
                Take::Wait(wait) => {
                    let Some(at) = Instant::now()
                        .checked_add(wait)
                        .filter(|at| *at <= deadline)
                    else {
                        return Ok(Err(Denied::Exhausted));
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.released.notified() => {}
                    }
                }
            }
        }
    }

    /// One acquire round trip (none when the mirror already refuses).
    async fn take(self: &Arc<Self>) -> Result<Take, RedisError> {
        if let Some(refusal) = self.mirror_refusal() {
            return Ok(Take::Done(Err(Denied::Refused(refusal))));
        }
        let (ticket, id) = self.next_lease();
        let known_tat = self.view.lock().tat;
        let extra = vec![
            id.clone(),
            self.lease_ttl_ms.load(Ordering::Relaxed).to_string(),
            known_tat.to_string(),
            self.valid_until().to_string(),
        ];
        let reply = self.run(&script::ACQUIRE_SCRIPT, extra).await?;
        let refused = |r| Ok(Take::Done(Err(Denied::Refused(r))));
        match reply.code {
            Code::Granted { probe } => {
                let admission = if probe {
                    tracing::info!("upstream circuit half-open: this replica probes for the fleet");
                    Admission::probe(ticket)
                } else {
                    Admission::ORDINARY
                };
                let lease = Lease {
                    core: self.clone(),
                    id,
                };
                Ok(Take::Done(Ok(BudgetPermit::with_admission(
                    admission, lease,
                ))))
            }
            Code::Cooldown => refused(Refusal::Cooldown(reply.wait)),
            Code::Open => refused(Refusal::CircuitOpen(reply.wait)),
            Code::Probing => refused(Refusal::CircuitOpen(reply.wait)),
            Code::Slots => Ok(Take::Wait(reply.wait.min(SLOT_POLL))),
            Code::Rate => Ok(Take::Wait(reply.wait)),
            // The reply set the clock right.
            Code::Stale => Ok(Take::Wait(Duration::ZERO)),
            Code::State => {
                let err = RedisError::Failed("unexpected reply from the budget script".into());
                self.redis.mark_down(&err);
                Err(err)
            }
        }
    }

    /// A config applied here: it becomes the fleet's (written now if Redis answers, else when
    /// it rejoins), and the share follows.
    fn apply(&self, change: impl FnOnce(&mut Params)) {
        let params = {
            let mut own = self.own.lock();
            change(&mut own);
            own.clone()
        };
        self.applied.fetch_add(1, Ordering::AcqRel);
        self.view.lock().params = params;
        if let Some(f) = self.fallback.lock().as_ref() {
            let (rate, burst, max_concurrent) = self.share_numbers();
            f.budget.reconfigure(rate, burst, max_concurrent);
        }
        self.sync.notify_one();
    }

    fn params(&self) -> BudgetParams {
        if self.redis.is_up() {
            let p = self.view.lock().params.clone();
            BudgetParams {
                rate_per_second: p.rate_per_second,
                burst: p.burst,
                max_concurrent: p.max_concurrent,
                scope: "fleet",
            }
        } else {
            let (rate_per_second, burst, max_concurrent) = self.share_numbers();
            BudgetParams {
                rate_per_second,
                burst,
                max_concurrent,
                scope: "replica_share",
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Lets the sync task see the core is gone.
        self.sync.notify_one();
    }
}

/// On every (re)join and every config applied: stores this replica's parameters if they are
/// newer than Redis's, pushes a cooldown it saw alone, and takes in the fleet's state.
async fn sync_loop(core: Weak<Core>, mut joined: watch::Receiver<u64>, wake: Arc<Notify>) {
    loop {
        tokio::select! {
            changed = joined.changed() => if changed.is_err() { return },
            _ = wake.notified() => {}
        }
        let Some(core) = core.upgrade() else { return };
        if core.redis.is_up() {
            let cooldown = core.local.cooldown_remaining().map_or(0, millis);
            let _ = core
                .run(&script::SYNC_SCRIPT, vec![cooldown.to_string()])
                .await;
        }
    }
}

impl Budget for FleetBudget {
    fn acquire<'a>(&'a self, client: &'a str, deadline: Instant) -> BudgetFuture<'a> {
        Box::pin(self.0.acquire(client, deadline))
    }

    fn available(&self) -> f64 {
        if self.0.redis.is_up() {
            return self.0.view.lock().available;
        }
        self.0
            .fallback
            .lock()
            .as_ref()
            .map_or(0.0, |f| f.budget.available())
    }

    fn reconfigure(&self, rate_per_second: f64, burst: u32, max_concurrent: usize) {
        self.0.apply(|p| {
            p.rate_per_second = rate_per_second;
            p.burst = burst;
            p.max_concurrent = max_concurrent;
        });
    }

    fn set_call_timeout(&self, timeout: Duration) {
        self.0.set_lease_ttl(timeout);
    }

    fn params(&self) -> BudgetParams {
        self.0.params()
    }
}
