//! The checked config as the running gateway holds it (the seam reload builds on, SPEC §11).
//!
//! The whole [`Config`] is held in an `ArcSwap`: readers load it lock-free once per request and
//! keep that snapshot to the end, so a swap never changes a request half-way. The keys that need
//! a restart ([`RESTART_KEYS`]: listeners, the upstream's address and roots, the guard file, the
//! cache's size, the log format) keep their start-up values in every config swapped in; the
//! parts built from them at start-up stay as they are.

use super::{Config, ConfigError};
use arc_swap::{ArcSwap, Guard};
use std::sync::Arc;

/// Dotted names of the keys a running gateway cannot change (SPEC §11's refused list).
pub const RESTART_KEYS: [&str; 15] = [
    "server.listen",
    "server.admin_listen",
    "server.max_connections",
    "upstream.base_url",
    "upstream.ca_file",
    "credentials.guard_file",
    "cache.max_bytes",
    "log.format",
    "redis.url",
    "redis.url_file",
    "redis.key_prefix",
    "redis.connect_timeout",
    "redis.command_timeout",
    "redis.max_replicas",
    "redis.l2_max_entry_bytes",
];

pub struct Settings {
    live: ArcSwap<Config>,
    /// What the process started with: the values of [`RESTART_KEYS`] in force.
    fixed: Arc<Config>,
}

impl Settings {
    pub fn new(cfg: Config) -> Arc<Self> {
        let cfg = Arc::new(cfg);
        Arc::new(Self {
            live: ArcSwap::new(cfg.clone()),
            fixed: cfg,
        })
    }

    /// The config in force now, for one request or one task (lock-free).
    pub fn load(&self) -> Guard<Arc<Config>> {
        self.live.load()
    }

    /// The config in force now, to keep beyond one request.
    pub fn current(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// The start-up config: the values of [`RESTART_KEYS`] that stay in force.
    pub fn fixed(&self) -> &Config {
        &self.fixed
    }

    /// Puts `next` in force at once, with every restart key kept at its running value, after
    /// validating the result as a whole (so a file that is only valid with a new listen address
    /// is refused, not half applied). Returns the restart keys whose value `next` changed.
    pub fn swap(&self, mut next: Config) -> Result<Vec<&'static str>, ConfigError> {
        let refused = pin_restart_keys(&mut next, &self.fixed);
        next.validate()?;
        self.live.store(Arc::new(next));
        Ok(refused)
    }
}

/// Sets every restart key of `next` to its value in `running`; names those that differed.
fn pin_restart_keys(next: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut refused = Vec::new();
    macro_rules! pin {
        ($name:literal, $($field:ident).+) => {
            if next.$($field).+ != running.$($field).+ {
                refused.push($name);
                next.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    pin!("server.listen", server.listen);
    pin!("server.admin_listen", server.admin_listen);
    pin!("server.max_connections", server.max_connections);
    pin!("upstream.base_url", upstream.base_url);
    pin!("upstream.ca_file", upstream.ca_file);
    pin!("credentials.guard_file", credentials.guard_file);
    pin!("cache.max_bytes", cache.max_bytes);
    pin!("log.format", log.format);
    pin!("redis.url", redis.url);
    pin!("redis.url_file", redis.url_file);
    pin!("redis.key_prefix", redis.key_prefix);
    pin!("redis.connect_timeout", redis.connect_timeout);
    pin!("redis.command_timeout", redis.command_timeout);
    pin!("redis.max_replicas", redis.max_replicas);
    pin!("redis.l2_max_entry_bytes", redis.l2_max_entry_bytes);
    debug_assert!(refused.iter().all(|k| RESTART_KEYS.contains(k)));
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_with_env;

    fn cfg(extra: &str) -> Config {
        from_toml_with_env(
            &format!("[upstream]\nbase_url = \"http://127.0.0.1:1\"\n[credentials]\nguard_file = \"\"\n{extra}"),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn a_swap_applies_live_keys_and_keeps_restart_keys() {
        let s = Settings::new(cfg("[cache]\nttl = \"1h\"\n"));
        let before = s.current();
        let refused = s
            .swap(cfg(
                "[server]\nlisten = \"127.0.0.1:1234\"\n[cache]\nttl = \"1s\"\nmax_bytes = \"1MiB\"\n",
            ))
            .unwrap();
        assert_eq!(refused, vec!["server.listen", "cache.max_bytes"]);
        let now = s.load();
        assert_eq!(now.cache.ttl.0, std::time::Duration::from_secs(1));
        assert_eq!(now.server.listen, s.fixed().server.listen);
        assert_eq!(now.cache.max_bytes, s.fixed().cache.max_bytes);
        // A snapshot taken before the swap is unchanged: requests in flight finish on it.
        assert_eq!(before.cache.ttl.0, std::time::Duration::from_secs(3600));
    }

    #[test]
    fn a_config_valid_only_with_a_new_listen_address_is_refused_whole() {
        let s = Settings::new(cfg(""));
        // mode "none" is allowed beyond loopback only with allow_unauthenticated; the listen
        // address stays on its running (loopback) value, so this one is valid...
        s.swap(cfg("[server]\nlisten = \"0.0.0.0:8080\"\n[clients]\nmode = \"none\"\nallow_unauthenticated = true\n"))
            .unwrap();
        // ...while a running non-loopback listener with mode "none" is refused whole.
        let open = Settings::new(cfg("[server]\nlisten = \"0.0.0.0:8080\"\n"));
        let mut next = cfg("[clients]\nmode = \"none\"\n");
        next.server.listen = "127.0.0.1:8080".parse().unwrap();
        assert!(open.swap(next).is_err());
        assert_eq!(
            open.load().clients.mode,
            crate::config::ClientMode::Required
        );
    }
}
