//! thingspace-gateway: a caching reverse proxy in front of Verizon ThingSpace's FOTA license API.
//!
//! # Layout
//! In the order a client request meets them:
//! - [`server`]: the HTTP/1.1 accept loop (connection bound, header timeout, graceful drain).
//! - [`proxy`]: the client API request path, from routing to response; never fails.
//! - [`route`]: routing and parameter validation on the raw path.
//! - [`clients`]: client authentication (Basic, gateway tokens), account access, client rates.
//! - [`cache`]: stored upstream answers, freshness windows, coalesced fetches.
//! - [`walk`]: whole-account documents and device lookups built from cached pages.
//! - [`tokens`]: the upstream OAuth token and M2M session, with the lockout guard.
//! - [`upstream`]: cooldown → circuit → budget → attempt → classification → retry.
//! - [`budget`], [`circuit`]: the upstream rate/concurrency budget and circuit breaker.
//! - [`transport`]: the pooled rustls HTTP client behind a small trait.
//! - [`error`]: every gateway error and its status, code and response.
//! - [`respond`]: response bodies made of shared `Bytes`.
//! - [`admin`], [`metrics`]: probes, `/status`, purges and Prometheus metrics.
//! - [`app`]: the shared state built once at start-up, and the two listeners.
//! - [`config`], [`secret`], [`tls`]: configuration, masked secrets, rustls set-up.
//! - `sim_transport` (feature `sim`): the simulator crate (`thingspace-sim`, used by `demo`,
//!   tests and benchmarks) as an in-process [`transport::Transport`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod budget;
pub mod cache;
pub mod circuit;
pub mod clients;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod route;
pub mod secret;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim_transport;
pub mod tls;
pub mod tokens;
pub mod transport;
pub mod upstream;
pub mod walk;
