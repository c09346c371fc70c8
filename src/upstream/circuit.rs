//! Circuit breaker: `circuit_failures` failed attempts in a row open it for `circuit_open_for`;
//! then exactly one probe goes through (half-open): success closes it, failure reopens it.
//! In-process state; [`super::protection`] puts it behind the seam a fleet can share.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Admission to make one attempt. `probe` attempts are the half-open trial and are not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub probe: bool,
    /// Which probe this is (0 for ordinary attempts), so a late release frees only its own.
    ticket: u64,
}

impl Admission {
    /// An attempt while the circuit is closed.
    pub const ORDINARY: Admission = Admission {
        probe: false,
        ticket: 0,
    };

    /// The half-open trial numbered `ticket` (a remote store's lease id, say).
    pub fn probe(ticket: u64) -> Self {
        Self {
            probe: true,
            ticket,
        }
    }

    pub fn ticket(&self) -> u64 {
        self.ticket
    }
}

#[derive(Default)]
struct State {
    /// `circuit_failures` and `circuit_open_for`, under the lock so a reload changes them
    /// together ([`Circuit::reconfigure`]).
    threshold: u32,
    open_for: Duration,
    failures: u32,
    open_until: Option<Instant>,
    /// The ticket of the probe in flight, if one is.
    probing: Option<u64>,
    tickets: u64,
}

pub struct Circuit {
    state: Mutex<State>,
}

/// What an attempt's outcome means to the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither (an upstream 429 has its own cooldown).
    Neutral,
}

impl Circuit {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                threshold,
                open_for,
                ..State::default()
            }),
        }
    }

    /// New `circuit_failures` and `circuit_open_for` (a reload): the failures counted so far
    /// count toward the new threshold; an open circuit keeps the end it was given.
    pub fn reconfigure(&self, threshold: u32, open_for: Duration) {
        let mut s = self.state.lock();
        s.threshold = threshold;
        s.open_for = open_for;
    }

    /// `Err(retry_after)` while open or while the probe is in flight.
    pub fn admit(&self) -> Result<Admission, Duration> {
        let mut s = self.state.lock();
        let Some(until) = s.open_until else {
            return Ok(Admission::ORDINARY);
        };
        let now = Instant::now();
        if now < until {
            return Err(until - now);
        }
        if s.probing.is_some() {
            return Err(Duration::from_secs(1));
        }
        s.tickets += 1;
        s.probing = Some(s.tickets);
        Ok(Admission::probe(s.tickets))
    }

    /// Gives back a probe whose attempt ended without [`Circuit::record`]; harmless after it
    /// (the probe is already given back, and a newer probe has another ticket).
    pub fn release(&self, admission: Admission) {
        if admission.probe {
            let mut s = self.state.lock();
            if s.probing == Some(admission.ticket) {
                s.probing = None;
            }
        }
    }

    /// Records an attempt; returns `Some(open)` when the circuit changed between open and closed.
    pub fn record(&self, admission: Admission, outcome: Outcome) -> Option<bool> {
        let mut s = self.state.lock();
        if admission.probe && s.probing == Some(admission.ticket) {
            s.probing = None;
        }
        let was_open = s.open_until.is_some();
        match outcome {
            Outcome::Success => {
                s.failures = 0;
                s.open_until = None;
            }
            Outcome::Failure => {
                s.failures = s.failures.saturating_add(1);
                if admission.probe || s.failures >= s.threshold {
                    s.open_until = Some(Instant::now() + s.open_for);
                }
            }
            Outcome::Neutral => {}
        }
        let is_open = s.open_until.is_some();
        (was_open != is_open).then_some(is_open)
    }

    /// Time left while open (not half-open), `None` otherwise.
    pub fn open_remaining(&self) -> Option<Duration> {
        let until = self.state.lock().open_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Failed attempts in a row, as counted here.
    pub fn failures(&self) -> u32 {
        self.state.lock().failures
    }

    /// Takes the state another store decided (a fleet's circuit in Redis): `failures` in a row,
    /// and `open_left` — `None` closed, `Some(ZERO)` half-open, `Some(d)` open for `d` more.
    /// Returns `Some(open)` when that changed the circuit between open and closed.
    pub fn mirror(&self, failures: u32, open_left: Option<Duration>) -> Option<bool> {
        let mut s = self.state.lock();
        let was_open = s.open_until.is_some();
        s.failures = failures;
        s.open_until = open_left.map(|d| {
            let now = Instant::now();
            now.checked_add(d).unwrap_or(now)
        });
        let is_open = s.open_until.is_some();
        (was_open != is_open).then_some(is_open)
    }

    pub fn state(&self) -> CircuitState {
        let s = self.state.lock();
        match s.open_until {
            None => CircuitState::Closed,
            Some(until) if Instant::now() < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_probes_and_closes() {
        let c = Circuit::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert_eq!(c.record(c.admit().unwrap(), Outcome::Failure), None);
        }
        assert_eq!(c.record(c.admit().unwrap(), Outcome::Failure), Some(true));
        assert_eq!(c.state(), CircuitState::Open);
        assert!(c.admit().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.state(), CircuitState::HalfOpen);
        let probe = c.admit().unwrap();
        assert!(probe.probe);
        assert!(c.admit().is_err(), "only one probe");
        // A failed probe reopens at once.
        assert_eq!(c.record(probe, Outcome::Failure), None);
        assert_eq!(c.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = c.admit().unwrap();
        assert_eq!(c.record(probe, Outcome::Success), Some(false));
        assert_eq!(c.state(), CircuitState::Closed);
        assert_eq!(c.admit(), Ok(Admission::ORDINARY));
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_count_and_neutral_is_ignored() {
        let c = Circuit::new(2, Duration::from_secs(1));
        c.record(c.admit().unwrap(), Outcome::Failure);
        c.record(c.admit().unwrap(), Outcome::Neutral);
        c.record(c.admit().unwrap(), Outcome::Success);
        c.record(c.admit().unwrap(), Outcome::Failure);
        assert_eq!(c.state(), CircuitState::Closed);
    }
}
