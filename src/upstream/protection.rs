//! What keeps calls off a struggling upstream, behind one seam: the 429 cooldown and the circuit.
//!
//! [`Protection`] is what a shared (Redis-backed) version implements so that a fleet keeps one
//! cooldown and one circuit ([`super::fleet`]); [`LocalProtection`] is the in-process default.
//! Time crosses the seam as durations (time left, time to wait), never as instants, so a remote
//! store can serve them; the local version keeps tokio instants inside (paused-clock tests
//! drive it).
//!
//! The reads (`admit`, `cooldown_remaining`, `state`) are synchronous: a shared version answers
//! them from a local mirror of the fleet's state, kept current by every budget round trip
//! (the fleet's budget script reports the cooldown and the circuit) and by its own writes. The
//! writes (`record`, `start_cooldown`) are futures, so a shared version stores a 429's cooldown
//! or a failure in Redis before the attempt's caller answers its client.

use crate::upstream::circuit::Circuit;
pub use crate::upstream::circuit::{Admission, CircuitState, Outcome};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;

pub type ProtectionFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an attempt may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An upstream 429's cooldown is running; this much of it is left.
    Cooldown(Duration),
    /// The circuit is open, or its one probe is in flight; retry after this long.
    CircuitOpen(Duration),
}

pub trait Protection: Send + Sync + 'static {
    /// Admission to make one attempt: refused during a cooldown (checked first), while the
    /// circuit is open, and while the half-open probe is in flight.
    fn admit(&self) -> Result<Admission, Refusal>;
    /// Records an attempt's outcome; `Some(open)` when the circuit changed between open and
    /// closed.
    fn record(&self, admission: Admission, outcome: Outcome) -> ProtectionFuture<'_, Option<bool>>;
    /// Gives back a probe whose attempt ended without [`record`](Self::record) (panicked or
    /// dropped); harmless after `record` and for ordinary admissions.
    fn release(&self, admission: Admission);
    /// Time left in the 429 cooldown, if one is running.
    fn cooldown_remaining(&self) -> Option<Duration>;
    /// Starts a cooldown of `d`, or keeps the running one if it ends later.
    fn start_cooldown(&self, d: Duration) -> ProtectionFuture<'_, ()>;
    fn state(&self) -> CircuitState;
    /// New `circuit_failures` and `circuit_open_for` (a reload, SPEC §11); the running cooldown
    /// and the circuit's state are kept.
    fn reconfigure(&self, circuit_failures: u32, circuit_open_for: Duration);
}

/// Today's in-process state: a [`Circuit`] and the end of the cooldown.
pub struct LocalProtection {
    circuit: Circuit,
    cooldown_until: Mutex<Option<Instant>>,
}

impl LocalProtection {
    /// `threshold` failed attempts in a row open the circuit for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            circuit: Circuit::new(threshold, open_for),
            cooldown_until: Mutex::new(None),
        }
    }

    // The synchronous operations, for the trait and for a fleet's mirror of the shared state
    // (which is also a replica's own state while Redis is down).

    pub fn record_now(&self, admission: Admission, outcome: Outcome) -> Option<bool> {
        self.circuit.record(admission, outcome)
    }

    /// Time left while the circuit is open (not half-open).
    pub fn open_remaining(&self) -> Option<Duration> {
        self.circuit.open_remaining()
    }

    pub fn failures(&self) -> u32 {
        self.circuit.failures()
    }

    /// Takes a fleet's circuit state (see [`Circuit::mirror`]).
    pub fn mirror_circuit(&self, failures: u32, open_left: Option<Duration>) -> Option<bool> {
        self.circuit.mirror(failures, open_left)
    }

    /// Starts a cooldown of `d`, or keeps the running one if it ends later.
    pub fn cooldown_for(&self, d: Duration) {
        // Past tokio's range (never, with `Retry-After` capped) the cooldown is as long as can be.
        let now = Instant::now();
        let until = now
            .checked_add(d)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let mut c = self.cooldown_until.lock();
        if c.is_none_or(|old| old < until) {
            *c = Some(until);
        }
    }
}

impl Protection for LocalProtection {
    fn admit(&self) -> Result<Admission, Refusal> {
        if let Some(left) = self.cooldown_remaining() {
            return Err(Refusal::Cooldown(left));
        }
        self.circuit.admit().map_err(Refusal::CircuitOpen)
    }

    fn record(&self, admission: Admission, outcome: Outcome) -> ProtectionFuture<'_, Option<bool>> {
        Box::pin(std::future::ready(self.record_now(admission, outcome)))
    }

    fn release(&self, admission: Admission) {
        self.circuit.release(admission);
    }

    fn cooldown_remaining(&self) -> Option<Duration> {
        let until = (*self.cooldown_until.lock())?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    fn start_cooldown(&self, d: Duration) -> ProtectionFuture<'_, ()> {
        self.cooldown_for(d);
        Box::pin(std::future::ready(()))
    }

    fn state(&self) -> CircuitState {
        self.circuit.state()
    }

    fn reconfigure(&self, circuit_failures: u32, circuit_open_for: Duration) {
        self.circuit.reconfigure(circuit_failures, circuit_open_for);
    }
}

/// Guards an admission: a probe whose attempt ends without [`Protection::record`] (its task
/// panicked, or its future was dropped mid-flight) is given back when the guard drops, so the
/// next request probes instead of the circuit staying half-open for good.
pub struct ProbeGuard<'a> {
    protection: &'a dyn Protection,
    admission: Admission,
}

impl<'a> ProbeGuard<'a> {
    pub fn new(protection: &'a dyn Protection, admission: Admission) -> Self {
        Self {
            protection,
            admission,
        }
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.protection.release(self.admission);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_dies_is_given_back() {
        let p = LocalProtection::new(1, Duration::from_secs(10));
        p.record(p.admit().unwrap(), Outcome::Failure).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = p.admit().unwrap();
        assert!(probe.probe);
        {
            let _guard = ProbeGuard::new(&p, probe);
            assert!(p.admit().is_err(), "one probe at a time");
            // The attempt's future is dropped here without an outcome.
        }
        assert_eq!(p.state(), CircuitState::HalfOpen);
        let again = p.admit().expect("a new probe after the first one died");
        assert!(again.probe);
        // A stale guard of the first probe does not free the second.
        drop(ProbeGuard::new(&p, probe));
        assert_eq!(
            p.admit(),
            Err(Refusal::CircuitOpen(Duration::from_secs(1))),
            "the second probe is still in flight"
        );
        let guard = ProbeGuard::new(&p, again);
        assert_eq!(p.record(again, Outcome::Success).await, Some(false));
        drop(guard);
        assert_eq!(p.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_refuses_first_and_only_lengthens() {
        let p = LocalProtection::new(1, Duration::from_secs(10));
        assert_eq!(p.cooldown_remaining(), None);
        p.start_cooldown(Duration::from_secs(30)).await;
        p.start_cooldown(Duration::from_secs(5)).await;
        assert_eq!(p.cooldown_remaining(), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.admit(), Err(Refusal::Cooldown(Duration::from_secs(20))));
        // The circuit is not touched by a cooldown.
        assert_eq!(p.state(), CircuitState::Closed);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.cooldown_remaining(), None);
        assert_eq!(p.admit(), Ok(Admission::ORDINARY));
        // An open circuit refuses with its own time left.
        p.record(Admission::ORDINARY, Outcome::Failure).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(p.admit(), Err(Refusal::CircuitOpen(Duration::from_secs(6))));
        // Any length is safe.
        p.start_cooldown(Duration::MAX).await;
        assert!(p.cooldown_remaining().is_some());
    }
}
