//! thingspace-gateway: a caching reverse proxy in front of Verizon ThingSpace's FOTA license API.
//!
//! # Layout
//! Layers from the top; each uses only the ones below it (`python3 deploy/layers.py --graph`
//! prints the module graph and fails on a cycle or an upward edge):
//! - [`runtime`]: builds the gateway once at start-up; listeners (connection bound, header and
//!   write timeouts, graceful drain), shutdown.
//! - [`api`]: the client API request path as named phases (route → limits → authenticate →
//!   authorize → read → respond); never fails. [`admin`]: probes, `/status`, purges, reset.
//! - [`documents`]: whole-account documents and device lookups, assembled from cached pages.
//! - [`read`]: the read path: cache step (fresh / stale / coalesced fill / stale on error), the
//!   upstream read behind it with one reactive token refresh, and the one writer of
//!   cached-answer headers.
//! - [`cache`]: stored upstream answers, freshness windows, single-flight, the store seam.
//! - [`credentials`]: the upstream OAuth token and M2M session, the lockout guard and its store.
//!   [`clients`]: client authentication (Basic, gateway tokens), account access, client rates.
//! - [`upstream`]: cooldown → circuit → budget → attempt → classification → retry, the pooled
//!   rustls transport behind a small trait.
//! - [`fleet`]: fleet mode's link to Redis (timeouts, down/probe/rejoin, sealing); the shared
//!   versions of the seams above use it.
//! - [`config`]: the TOML schema, environment, validation. [`observe`]: Prometheus metrics.
//! - [`error`], [`respond`], [`secret`], [`params`], [`util`]: gateway errors and their
//!   responses, shared-`Bytes` bodies, masked secrets, parameter rules, small helpers.
//! - `sim_transport` (feature `sim`): the simulator crate (`thingspace-sim`, used by `demo`,
//!   tests and benchmarks) as an in-process [`upstream::transport::Transport`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod cache;
pub mod clients;
pub mod config;
pub mod credentials;
pub mod documents;
pub mod error;
pub mod fleet;
pub mod observe;
pub mod params;
pub mod read;
pub mod respond;
pub mod runtime;
pub mod secret;
#[cfg(feature = "sim")]
pub mod sim_transport;
pub mod upstream;
pub mod util;
