//! The fleet's cooldown and circuit behind [`Protection`]: reads from the mirror, writes to
//! Redis before the attempt's caller answers (the 429's cooldown only ever later; a failure
//! counted, opening the circuit at the threshold; a success closing it), and the replica's own
//! state while Redis is down.

use super::{millis, script, Core, FleetProtection, FLEET_TICKET};
use crate::upstream::circuit::{Admission, CircuitState, Outcome};
use crate::upstream::protection::{Protection, ProtectionFuture, Refusal};
use std::time::Duration;

impl Core {
    async fn record(&self, admission: Admission, outcome: Outcome) -> Option<bool> {
        let fleet_probe = admission.probe && admission.ticket() & FLEET_TICKET != 0;
        if !fleet_probe {
            // A local probe (Redis was down when it was admitted) stays local; so does what
            // changes nothing in the fleet's circuit.
            let unchanged = match outcome {
                Outcome::Neutral => true,
                Outcome::Success => {
                    self.local.failures() == 0 && self.local.state() == CircuitState::Closed
                }
                Outcome::Failure => false,
            };
            if admission.probe || unchanged || !self.redis.is_up() {
                return self.local.record_now(admission, outcome);
            }
        }
        let was_open = self.local.state() != CircuitState::Closed;
        let code = match outcome {
            Outcome::Success => "s",
            Outcome::Failure => "f",
            Outcome::Neutral => "n",
        };
        let probe = if fleet_probe {
            self.lease_id(admission.ticket())
        } else {
            String::new()
        };
        match self
            .run(&script::RECORD_SCRIPT, vec![code.into(), probe])
            .await
        {
            Ok(_) => {
                let is_open = self.local.state() != CircuitState::Closed;
                (was_open != is_open).then_some(is_open)
            }
            Err(_) => self.local.record_now(admission, outcome),
        }
    }

    async fn start_cooldown(&self, d: Duration) {
        self.local.cooldown_for(d);
        if self.redis.is_up() {
            // On failure the cooldown is this replica's alone until the link rejoins (the
            // sync task writes it then).
            let _ = self
                .run(&script::SYNC_SCRIPT, vec![millis(d).to_string()])
                .await;
        }
    }
}

impl Protection for FleetProtection {
    fn admit(&self) -> Result<Admission, Refusal> {
        let core = &self.0;
        if !core.redis.is_up() {
            return core.local.admit();
        }
        // The fleet's budget script decides the rest (and grants the probe).
        match core.mirror_refusal() {
            Some(refusal) => Err(refusal),
            None => Ok(Admission::ORDINARY),
        }
    }

    fn record(&self, admission: Admission, outcome: Outcome) -> ProtectionFuture<'_, Option<bool>> {
        Box::pin(self.0.record(admission, outcome))
    }

    fn release(&self, admission: Admission) {
        // A fleet probe is given back by its lease.
        if admission.ticket() & FLEET_TICKET == 0 {
            self.0.local.release(admission);
        }
    }

    fn cooldown_remaining(&self) -> Option<Duration> {
        self.0.local.cooldown_remaining()
    }

    fn start_cooldown(&self, d: Duration) -> ProtectionFuture<'_, ()> {
        Box::pin(self.0.start_cooldown(d))
    }

    fn state(&self) -> CircuitState {
        self.0.local.state()
    }

    fn reconfigure(&self, circuit_failures: u32, circuit_open_for: Duration) {
        self.0.local.reconfigure(circuit_failures, circuit_open_for);
        self.0.apply(|p| {
            p.circuit_failures = circuit_failures;
            p.circuit_open_for = circuit_open_for;
        });
    }
}
