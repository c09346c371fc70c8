//! The gateway's shared state, built once at start-up, and the listeners that serve it.

pub mod h1;
pub mod listener;
mod reload;

pub use reload::ReloadReport;

use crate::admin::{AdminApi, Reloader, View};
use crate::api::ClientApi;
use crate::cache::{MemStore, PageCache, Windows};
use crate::clients::Clients;
use crate::config::{Config, LoadMeta, Settings};
use crate::credentials::{TokenManager, TokenSettings, UpstreamCredentials};
use crate::fleet::Redis;
use crate::observe::Metrics;
use crate::read::Reader;
use crate::upstream::transport::{HttpTransport, Transport};
use crate::upstream::{Upstream, UpstreamSettings};
use crate::util::Shutdown;
use arc_swap::{ArcSwap, ArcSwapOption};
use listener::{serve, ServeOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::{OnceLock, Weak};
use std::time::SystemTime;
use tokio::net::TcpListener;

/// hyper's own cap on the request header count. Up to it, a head with more than
/// [`crate::api::MAX_HEADERS`] gets our JSON 431; past it hyper answers a bare 431 and closes.
/// hyper sets aside 64 bytes of parser scratch per allowed header for every request head it
/// parses: at 1,000 that is 64 KB, still cheap to allocate; at 10,000 (640 KB) every parse went
/// through `mmap` and cost ~12 µs, which would tax every request to answer a few odd ones nicely.
pub const HYPER_MAX_HEADERS: usize = 1000;

/// Raises the open-files soft limit to the hard limit (each client connection is a file) and
/// warns once if `max_connections`, plus room for the gateway's own files, is above it.
/// Returns the limit in force.
pub fn raise_open_files_limit(max_connections: usize) -> Option<u64> {
    #[cfg(unix)]
    {
        /// Listeners, upstream connections, the guard file, logs.
        const OWN_FILES: u64 = 64;
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => {
                if (max_connections as u64).saturating_add(OWN_FILES) > limit {
                    tracing::warn!(
                        max_connections,
                        open_files_limit = limit,
                        "server.max_connections is above the open-files limit: connections past \
                         it fail to open; raise the hard limit (ulimit -Hn, LimitNOFILE) or lower \
                         max_connections"
                    );
                }
                Some(limit)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read or raise the open-files limit");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = max_connections;
        None
    }
}

/// The gateway built once at start-up: the parts, wired. Interfaces get their own narrow handles
/// ([`ClientApi`], [`AdminApi`]); the accessors are for start-up, tests and benchmarks.
pub struct Gateway {
    settings: Arc<Settings>,
    metrics: Metrics,
    upstream: Arc<Upstream>,
    tokens: Arc<TokenManager>,
    cache: Arc<PageCache>,
    /// Fleet mode's link (`redis.url` set), connected by [`Running::start_with`].
    redis: Option<Arc<Redis>>,
    api: ClientApi,
    admin: AdminApi,
    /// Fired on SIGTERM/SIGINT: listeners stop accepting and drain.
    shutdown: Shutdown,
    /// The client listener's TLS (`server.tls_cert`/`tls_key`): swapped by a reload, read by
    /// each new handshake.
    tls: ArcSwapOption<tokio_rustls::TlsAcceptor>,
    /// Where the config came from, what was read, and when: a reload reads the same source.
    source: Source,
    loaded: ArcSwap<Loaded>,
    /// One reload at a time (SIGHUP and the admin route may race).
    reloading: tokio::sync::Mutex<()>,
    /// Applies `log.level` (set by the binary, which owns the log subscriber; unset while
    /// `RUST_LOG` rules).
    log_level: OnceLock<LogLevelHook>,
}

/// Applies a new `log.level` filter.
pub type LogLevelHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where a gateway's config came from.
enum Source {
    /// Handed over in memory (the demo's embedded config, tests): nothing to read again.
    Given,
    /// Read from this file (`None`: `config/gateway.toml` if present, else the defaults).
    Read(Option<PathBuf>),
}

/// The config in force: what was read, and when.
struct Loaded {
    at: SystemTime,
    meta: LoadMeta,
}

impl Gateway {
    /// Builds the gateway over the real HTTP transport.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        let transport = http_transport(&cfg)?;
        Self::with_transport(cfg, transport)
    }

    /// Builds the gateway over any transport (unit tests use an in-memory one). Fails when no
    /// token key can be drawn from the system's random generator, or when the guard file cannot
    /// be opened or another process holds it.
    pub fn with_transport(cfg: Config, transport: Arc<dyn Transport>) -> anyhow::Result<Arc<Self>> {
        Self::build(cfg, transport, Source::Given, LoadMeta::default())
    }

    /// Reads the config from `path` (or, with `None`, `config/gateway.toml` if present, else
    /// the defaults) and builds the gateway over the real transport; a reload reads the same
    /// source again.
    pub fn from_source(path: Option<PathBuf>) -> anyhow::Result<Arc<Self>> {
        let (cfg, meta) = crate::config::load_with_meta(path.as_deref())?;
        let transport = http_transport(&cfg)?;
        Self::build(cfg, transport, Source::Read(path), meta)
    }

    /// [`Gateway::from_source`] over any transport (tests run the simulator in-process).
    pub fn from_source_with_transport(
        path: PathBuf,
        transport: Arc<dyn Transport>,
    ) -> anyhow::Result<Arc<Self>> {
        let (cfg, meta) = crate::config::load_with_meta(Some(&path))?;
        Self::build(cfg, transport, Source::Read(Some(path)), meta)
    }

    fn build(
        cfg: Config,
        transport: Arc<dyn Transport>,
        source: Source,
        meta: LoadMeta,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = server_tls(&cfg)?;
        let metrics = Metrics::new();
        let redis = match cfg.redis.enabled() {
            true => Some(Redis::new(&cfg.redis, metrics.clone())?),
            false => None,
        };
        let u = &cfg.upstream;
        // Fleet mode: one budget, cooldown and circuit for every replica (through Redis).
        let (budget, protection) = crate::upstream::fleet::budget_and_protection(u, redis.as_ref());
        let upstream = Arc::new(Upstream::new(
            transport,
            budget,
            protection,
            metrics.clone(),
            UpstreamSettings {
                timeout: u.timeout.0,
                retries: u.retries,
                max_queue_wait: u.max_queue_wait.0,
            },
        ));
        let c = &cfg.credentials;
        let guard_store = crate::credentials::open_guard_store(c.guard_file.as_deref())?;
        let creds = UpstreamCredentials {
            client_id: c.client_id.clone(),
            client_secret: c.client_secret.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
        };
        let token_settings = TokenSettings {
            session_idle_timeout: c.session_idle_timeout.0,
            max_failed_logins: c.max_failed_logins,
            login_pause: c.login_pause.0,
            call_timeout: cfg.server.request_timeout.0,
        };
        let (up, m) = (upstream.clone(), metrics.clone());
        let tokens = Arc::new(match &redis {
            Some(r) => {
                let key = &cfg.clients.token_signing_key;
                TokenManager::new_shared(up, creds, token_settings, m, guard_store, r.clone(), key)
            }
            None => TokenManager::new(up, creds, token_settings, m, guard_store),
        });
        let windows = Windows::from_config(&cfg.cache);
        let cache = Arc::new(
            PageCache::new(
                Arc::new(MemStore::new(cfg.cache.max_bytes.0, windows)),
                cfg.cache.max_bytes.0,
                windows,
            )
            .with_shared(redis.clone(), cfg.redis.connect_timeout.0),
        );
        let clients = Clients::new(&cfg.clients)?;
        let settings = Settings::new(cfg);
        let reader = Arc::new(Reader::new(
            settings.clone(),
            metrics.clone(),
            upstream.clone(),
            tokens.clone(),
            cache.clone(),
        ));
        let api = ClientApi::new(settings.clone(), clients, reader, metrics.clone());
        let shutdown = Shutdown::new();
        let admin = AdminApi::new(View {
            settings: settings.clone(),
            metrics: metrics.clone(),
            upstream: upstream.clone(),
            tokens: tokens.clone(),
            cache: cache.clone(),
            redis: redis.clone(),
            api: api.clone(),
            shutdown: shutdown.clone(),
            started: std::time::Instant::now(),
            reloader: OnceLock::new(),
        });
        let gateway = Arc::new(Gateway {
            settings,
            metrics,
            upstream,
            tokens,
            cache,
            redis,
            api,
            admin,
            shutdown,
            tls: ArcSwapOption::new(tls.map(Arc::new)),
            source,
            loaded: ArcSwap::from_pointee(Loaded {
                at: SystemTime::now(),
                meta,
            }),
            reloading: tokio::sync::Mutex::new(()),
            log_level: OnceLock::new(),
        });
        gateway.metrics.config_loaded(SystemTime::now());
        let weak: Weak<dyn Reloader> = Arc::downgrade(&gateway) as Weak<dyn Reloader>;
        gateway.admin.set_reloader(weak);
        Ok(gateway)
    }

    /// Lets reloads apply `log.level` (the binary owns the subscriber).
    pub fn on_log_level(&self, hook: LogLevelHook) {
        let _ = self.log_level.set(hook);
    }

    /// The checked config: the live part a reload swaps, and the start-up values.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    pub fn tokens(&self) -> &Arc<TokenManager> {
        &self.tokens
    }

    pub fn cache(&self) -> &Arc<PageCache> {
        &self.cache
    }

    /// Fleet mode's link to Redis, when `redis.url` is set.
    pub fn redis(&self) -> Option<&Arc<Redis>> {
        self.redis.as_ref()
    }

    pub fn client_api(&self) -> ClientApi {
        self.api.clone()
    }

    pub fn admin_api(&self) -> AdminApi {
        self.admin.clone()
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// What a new connection is served with, from the live config.
    fn serve_options(&self, client: bool) -> ServeOptions {
        let cfg = self.settings.load();
        let s = &cfg.server;
        ServeOptions {
            header_read_timeout: s.header_read_timeout.0,
            // hyper's caps sit above ours so that our 431 (with its JSON body) answers first: any
            // head within hyper's read buffer with up to HYPER_MAX_HEADERS headers reaches it.
            max_head_bytes: s.max_header_bytes.as_usize() * 2 + 8192,
            max_headers: HYPER_MAX_HEADERS,
            write_timeout: s.write_timeout.0,
            tls: if client {
                self.tls.load_full().map(|a| (*a).clone())
            } else {
                None
            },
            shutdown_grace: s.shutdown_grace.0,
        }
    }

    /// Starts the token manager's background loop (held tokens kept fresh) until shutdown.
    pub fn spawn_token_refresher(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.tokens.clone().run(self.shutdown.clone()))
    }
}

/// A gateway serving on its two listeners.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The client listener speaks TLS.
    pub tls: bool,
    pub gateway: Arc<Gateway>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Binds `server.listen` and `server.admin_listen` (port 0 allowed) and starts serving.
    pub async fn start(cfg: Config) -> anyhow::Result<Running> {
        let gateway = Gateway::new(cfg)?;
        Self::start_with(gateway).await
    }

    pub async fn start_with(gateway: Arc<Gateway>) -> anyhow::Result<Running> {
        let fixed = gateway.settings.fixed();
        let s = &fixed.server;
        let listener = TcpListener::bind(s.listen)
            .await
            .map_err(|e| anyhow::anyhow!("server.listen {}: {e}", s.listen))?;
        let admin = TcpListener::bind(s.admin_listen)
            .await
            .map_err(|e| anyhow::anyhow!("server.admin_listen {}: {e}", s.admin_listen))?;
        let addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let shutdown = gateway.shutdown.clone();
        // Fleet mode: one connect attempt (bounded by redis.connect_timeout) before the first
        // token call, so replicas starting together find each other's tokens and leases.
        if let Some(redis) = &gateway.redis {
            redis.start(shutdown.clone()).await;
        }
        let cache_sync = gateway.cache.start_sync(shutdown.clone()).await;
        let client_opts = {
            let g = gateway.clone();
            move || g.serve_options(true)
        };
        let admin_opts = {
            let g = gateway.clone();
            move || g.serve_options(false)
        };
        let mut tasks = vec![
            gateway.spawn_token_refresher(),
            tokio::spawn(serve(
                listener,
                s.max_connections,
                client_opts,
                Arc::new(gateway.client_api()),
                Some(gateway.client_api()),
                shutdown.clone(),
            )),
            tokio::spawn(serve(
                admin,
                s.max_connections,
                admin_opts,
                Arc::new(gateway.admin_api()),
                None,
                shutdown,
            )),
        ];
        tasks.extend(cache_sync);
        tasks.extend(reload::spawn_sighup(&gateway));
        Ok(Running {
            tls: s.tls_cert.is_some(),
            addr,
            admin_addr,
            gateway,
            tasks,
        })
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Stops accepting, drains in-flight requests within `shutdown_grace`, and returns.
    pub async fn stop(mut self) {
        self.gateway.shutdown.trigger();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gateway.shutdown.trigger();
    }
}

/// The pooled rustls client to `upstream.base_url`.
fn http_transport(cfg: &Config) -> anyhow::Result<Arc<dyn Transport>> {
    Ok(Arc::new(HttpTransport::new(
        &cfg.upstream.base_url,
        cfg.upstream.ca_file.as_deref(),
        cfg.upstream.connect_timeout.0,
        cfg.upstream.max_response_bytes.as_usize(),
    )?))
}

/// The client listener's TLS acceptor from `server.tls_cert`/`tls_key`, when both are set.
fn server_tls(cfg: &Config) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(crate::upstream::tls::server_acceptor(cert, key)?)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[test]
    fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        assert_eq!(super::raise_open_files_limit(1), Some(hard));
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));
    }
}
