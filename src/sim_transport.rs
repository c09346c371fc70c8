//! The simulator as a [`Transport`], answering in-process: the gateway and the simulator share
//! tokio's clock and no sockets, so tests and benches can run under paused time.

use crate::upstream::transport::{
    OutRequest, RawResponse, Transport, TransportError, TransportFuture,
};
use std::sync::Arc;
use std::time::Duration;
use thingspace_sim::{SimHandle, SimRequest, Simulator};

/// A transport to `sim`'s state; answers over `max_body` bytes are refused as too large.
pub fn sim_transport(sim: &Simulator, max_body: usize) -> Arc<dyn Transport> {
    Arc::new(SimTransport {
        sim: sim.handle(),
        max_body,
    })
}

struct SimTransport {
    sim: SimHandle,
    max_body: usize,
}

impl Transport for SimTransport {
    fn send(&self, req: OutRequest, timeout: Duration) -> TransportFuture<'_> {
        Box::pin(async move {
            let call = self.sim.call(SimRequest {
                method: req.method,
                path: req.path,
                headers: req.headers,
                body: req.body,
            });
            let resp = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| TransportError::Timeout)?
                .map_err(|closed| TransportError::Closed(closed.to_string()))?;
            if resp.body.len() > self.max_body {
                return Err(TransportError::TooLarge);
            }
            Ok(RawResponse {
                status: resp.status,
                headers: resp.headers,
                body: resp.body,
            })
        })
    }
}
