//! The integration tests: one binary, one module per area. Each starts the simulator and the
//! gateway on 127.0.0.1 port 0 and talks to them over TCP (or, under paused time, through the
//! simulator's in-memory transport).

mod apply;
mod cache;
mod common;
mod config_files;
mod fleet;
mod fleet_cache;
mod fleet_tokens;
mod fleet_upstream;
mod front;
mod fuzz;
mod gateway;
mod lockout;
mod metrics;
mod openapi;
mod process;
mod protection;
mod redis;
mod reload;
mod security;
mod simulator;
mod timing;
mod walk;
