//! Configuration: TOML file + `THINGSPACE_GATEWAY_<SECTION>__<KEY>` overrides + credential env vars.
//!
//! Every default lives in the `Default` impls below, next to its struct. [`load`] returns a
//! validated [`Config`] or one [`ConfigError`] line that names the offending key.

use crate::secret::Secret;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod env;
mod settings;

/// Optional file paths: `""` (or no key) in the file is `None`; written back as `""`.
mod opt_path {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::path::PathBuf;

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.as_ref().map(|p| p.to_string_lossy()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((!s.is_empty()).then(|| PathBuf::from(s)))
    }
}

pub use settings::{Settings, RESTART_KEYS};

use env::{apply_env_overrides, resolve_credentials};

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "THINGSPACE_GATEWAY_";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub credentials: CredentialsConfig,
    pub cache: CacheConfig,
    pub clients: ClientsConfig,
    pub log: LogConfig,
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout: Dur,
    /// Whole client request, waits for budget, tokens and upstream included.
    pub request_timeout: Dur,
    /// Client API requests in flight; more are shed with 503 at once instead of queueing.
    pub max_inflight: usize,
    pub max_header_bytes: ByteSize,
    pub shutdown_grace: Dur,
    /// PEM certificate chain and key: both set → the client API listens with TLS.
    #[serde(with = "opt_path")]
    pub tls_cert: Option<PathBuf>,
    #[serde(with = "opt_path")]
    pub tls_key: Option<PathBuf>,
    /// A client that reads nothing of its answer for this long is cut off.
    pub write_timeout: Dur,
    /// Bearer token for the admin routes that change state; unset → loopback `admin_listen` only.
    pub admin_token: Secret,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9090).into(),
            max_connections: 10_000,
            header_read_timeout: Dur::secs(5),
            request_timeout: Dur::secs(30),
            max_inflight: 4096,
            max_header_bytes: ByteSize(16 * 1024),
            shutdown_grace: Dur::secs(20),
            tls_cert: None,
            tls_key: None,
            write_timeout: Dur::secs(30),
            admin_token: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub base_url: String,
    pub connect_timeout: Dur,
    /// One attempt; retries get their own.
    pub timeout: Dur,
    pub retries: u32,
    pub max_response_bytes: ByteSize,
    #[serde(with = "opt_path")]
    pub ca_file: Option<PathBuf>,
    pub rate_per_second: f64,
    pub burst: u32,
    pub max_concurrent: usize,
    pub max_queue_wait: Dur,
    pub circuit_failures: u32,
    pub circuit_open_for: Dur,
    /// Whole-account walks give up (502) past this many pages: a guard against endless cursors.
    pub max_walk_pages: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://thingspace.verizon.com".into(),
            connect_timeout: Dur::secs(3),
            timeout: Dur::secs(15),
            retries: 2,
            max_response_bytes: ByteSize(32 * 1024 * 1024),
            ca_file: None,
            rate_per_second: 10.0,
            burst: 20,
            max_concurrent: 8,
            max_queue_wait: Dur::secs(5),
            circuit_failures: 5,
            circuit_open_for: Dur::secs(10),
            max_walk_pages: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    pub client_id: String,
    pub client_secret: Secret,
    #[serde(with = "opt_path")]
    pub client_secret_file: Option<PathBuf>,
    pub username: String,
    pub password: Secret,
    #[serde(with = "opt_path")]
    pub password_file: Option<PathBuf>,
    pub session_idle_timeout: Dur,
    /// Rejected logins in a row before logins pause. ThingSpace locks the account at 5.
    pub max_failed_logins: u32,
    pub login_pause: Dur,
    /// Login counts and pause across restarts (SPEC §5); relative to the working directory.
    #[serde(with = "opt_path")]
    pub guard_file: Option<PathBuf>,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            client_secret: Secret::default(),
            client_secret_file: None,
            username: String::new(),
            password: Secret::default(),
            password_file: None,
            session_idle_timeout: Dur::secs(20 * 60),
            max_failed_logins: 2,
            login_pause: Dur::secs(15 * 60),
            guard_file: Some("thingspace-gateway.guard".into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_bytes: ByteSize,
    pub ttl: Dur,
    pub stale_while_revalidate: Dur,
    pub stale_if_error: Dur,
    pub negative_ttl: Dur,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: ByteSize(256 * 1024 * 1024),
            ttl: Dur::secs(300),
            stale_while_revalidate: Dur::secs(60),
            stale_if_error: Dur::secs(3600),
            negative_ttl: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMode {
    Required,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsConfig {
    pub mode: ClientMode,
    pub allow_unauthenticated: bool,
    pub token_ttl: Dur,
    pub token_signing_key: Secret,
    pub client: Vec<ClientConfig>,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            mode: ClientMode::Required,
            allow_unauthenticated: false,
            token_ttl: Dur::secs(3600),
            token_signing_key: Secret::default(),
            client: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    pub secret_sha256: String,
    pub accounts: Vec<String>,
    #[serde(default = "default_client_rate")]
    pub rate_per_second: f64,
    #[serde(default = "default_client_burst")]
    pub burst: u32,
}

fn default_client_rate() -> f64 {
    50.0
}

fn default_client_burst() -> u32 {
    100
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Fleet mode (SPEC §10): off while `url` is empty. Every key needs a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port/db` or `rediss://…`: may carry a password, so a secret.
    pub url: Secret,
    #[serde(with = "opt_path")]
    pub url_file: Option<PathBuf>,
    /// Fleets sharing one Redis use different prefixes.
    pub key_prefix: String,
    pub connect_timeout: Dur,
    /// One round trip on a request's path; slower counts as a Redis failure.
    pub command_timeout: Dur,
    /// The most replicas of this fleet: each takes `1/max_replicas` of the budget while Redis is
    /// down.
    pub max_replicas: u32,
    /// Answers larger than this stay in the replica's own cache only.
    pub l2_max_entry_bytes: ByteSize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            url_file: None,
            key_prefix: "tsgw:".into(),
            connect_timeout: Dur::secs(1),
            command_timeout: Dur(Duration::from_millis(50)),
            max_replicas: 4,
            l2_max_entry_bytes: ByteSize(1 << 20),
        }
    }
}

impl RedisConfig {
    /// True when a Redis is configured: the process is one replica of a fleet.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A duration written as `"500ms"`, `"5s"`, `"20m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Config errors never quote a value (SPEC §3): the message says what is expected.
        let s = String::deserialize(d)?;
        checked_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// The longest duration any setting takes: longer ones are typos, and would overflow clock
/// arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn checked_duration(s: &str) -> Result<Duration, &'static str> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| "invalid duration; write it like \"500ms\", \"5s\", \"20m\"")?;
    if d > MAX_DURATION {
        return Err("duration longer than a year");
    }
    Ok(d)
}

/// A duration from the command line; the message quotes what was typed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    checked_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// A size in bytes: an integer, or a string with a `KiB`/`MiB`/`GiB` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, n) in UNITS {
            if self.0 >= n && self.0.is_multiple_of(n) {
                return s.serialize_str(&format!("{}{unit}", self.0 / n));
            }
        }
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => parse_size(&s).map(ByteSize).map_err(|_| {
                serde::de::Error::custom(
                    "invalid size; write bytes as an integer or like \"16KiB\", \"256MiB\"",
                )
            }),
        }
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("invalid size {s:?}; write bytes as an integer or like \"16KiB\", \"256MiB\"")
        })
}

/// Reads the config: `path` if given (must exist), else `config/gateway.toml` if present, else
/// the defaults; then env overrides, credential env vars and secret files; then validates.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    load_with_meta(path).map(|(cfg, _)| cfg)
}

/// What a load read besides the config: for `/status` and reload answers.
#[derive(Debug, Clone, Default)]
pub struct LoadMeta {
    /// SHA-256 of the file as read, hex; `None` when running on the defaults (no file).
    pub sha256: Option<String>,
    /// Dotted keys whose file value an environment variable overrides (the environment of a
    /// running process cannot change, so editing those keys in the file changes nothing).
    pub shadowed_keys: Vec<String>,
}

/// [`load`], and what it read.
pub fn load_with_meta(path: Option<&Path>) -> Result<(Config, LoadMeta), ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| err(format!("config file {}: {e}", p.display())))
    };
    let text = match path {
        Some(p) => Some(read(p)?),
        None => {
            let default = PathBuf::from("config/gateway.toml");
            if default.exists() {
                Some(read(&default)?)
            } else {
                None
            }
        }
    };
    let cfg = from_toml_with_env(text.as_deref().unwrap_or(""), &env)?;
    let sha256 = text.map(|t| {
        crate::util::hex(ring::digest::digest(&ring::digest::SHA256, t.as_bytes()).as_ref())
    });
    Ok((
        cfg,
        LoadMeta {
            sha256,
            shadowed_keys: env::shadowed_keys(&env),
        },
    ))
}

/// The pure part of [`load`]: TOML text plus an environment, validated.
pub fn from_toml_with_env(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e, None))?;
    apply_env_overrides(&mut table, env)?;
    let mut cfg: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = error_key(&e);
        // The same error read from the file itself carries its position; when the file alone is
        // fine, the bad value came from an environment override.
        match toml::from_str::<Config>(text) {
            Err(in_file) => toml_error(text, &in_file, key),
            Ok(_) => err(format!(
                "{}: {} (set by the environment)",
                key.as_deref().unwrap_or("config"),
                value_free(e.message())
            )),
        }
    })?;
    resolve_credentials(&mut cfg, env)?;
    cfg.validate()?;
    Ok(cfg)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line naming the key (when known), the line and column, and what is wrong. Never the
/// offending text: toml's own `Display` quotes the source line, which may be
/// `password = "Hunter2…`.
fn toml_error(text: &str, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let what = value_free(e.message());
    let at = e
        .span()
        .map(|span| {
            let (line, column) = line_column(text, span.start);
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default();
    err(format!(
        "{}: {what}{at}",
        key.as_deref().unwrap_or("config")
    ))
}

/// The dotted key a deserialization error is about. toml exposes it only through `Display`,
/// whose last line is `` in `section.key` `` when the error has no source position.
fn error_key(e: &toml::de::Error) -> Option<String> {
    let shown = e.to_string();
    let last = shown.lines().last()?;
    let key = last.strip_prefix("in `")?.strip_suffix('`')?;
    (!key.is_empty()).then(|| key.to_string())
}

/// serde's messages quote the value they refused (`invalid type: string "Hunter2", expected
/// u32`); keep what was expected, drop what was found.
fn value_free(message: &str) -> String {
    let message = one_line(message);
    for what in [
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown variant",
    ] {
        if message.starts_with(what) {
            return match message.find(", expected") {
                Some(i) => format!("{what}{}", &message[i..]),
                None => what.to_string(),
            };
        }
    }
    message
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn positive(key: &str, d: Dur) -> Result<(), ConfigError> {
    if d.0.is_zero() {
        return Err(err(format!("{key}: must be greater than 0")));
    }
    Ok(())
}

/// `token_signing_key` is used as given (not decoded): 32 bytes of it, at the least.
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

/// The placeholder text the shipped examples use for every secret (`REPLACE-ME-…`).
fn is_placeholder(value: &str) -> bool {
    value.to_ascii_lowercase().contains("replace-me")
}

/// `127.0.0.0/8`, `::1` and `localhost`: the hosts a cleartext upstream may have.
fn loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// SPEC §3: every `rate_per_second` 0.001 to 1e6, every `burst` 1 to 1e6. Outside that the
/// bucket arithmetic overflows (a rate of 1e-20 made a refill wait longer than `Duration` holds).
fn rate(section: &str, rate_per_second: f64, burst: u32) -> Result<(), ConfigError> {
    if !(0.001..=1e6).contains(&rate_per_second) {
        return Err(err(format!(
            "{section}.rate_per_second: must be 0.001 to 1000000"
        )));
    }
    if !(1..=1_000_000).contains(&burst) {
        return Err(err(format!("{section}.burst: must be 1 to 1000000")));
    }
    Ok(())
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_connections == 0 {
            return Err(err("server.max_connections: must be at least 1"));
        }
        if s.max_inflight == 0 {
            return Err(err("server.max_inflight: must be at least 1"));
        }
        if s.max_header_bytes.0 < 1024 {
            return Err(err("server.max_header_bytes: must be at least 1KiB"));
        }
        positive("server.header_read_timeout", s.header_read_timeout)?;
        positive("server.request_timeout", s.request_timeout)?;
        positive("server.write_timeout", s.write_timeout)?;
        if s.tls_cert.is_none() != s.tls_key.is_none() {
            return Err(err("server.tls_cert/tls_key: set both or neither"));
        }
        for (key, path) in [
            ("server.tls_cert", &s.tls_cert),
            ("server.tls_key", &s.tls_key),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(err(format!("{key}: {} does not exist", path.display())));
            }
        }
        let u = &self.upstream;
        let url: http::Uri = u
            .base_url
            .parse()
            .map_err(|_| err("upstream.base_url: not a URL"))?;
        match (url.scheme_str(), url.host()) {
            (Some("https"), Some(_)) => {}
            // Cleartext would carry the credentials and tokens: only to this machine.
            (Some("http"), Some(host)) if loopback_host(host) => {}
            (Some("http"), Some(_)) => {
                return Err(err(
                    "upstream.base_url: http:// only for a loopback host (127.0.0.0/8, ::1, \
                     localhost); use https://",
                ))
            }
            _ => {
                return Err(err(
                    "upstream.base_url: must be an https:// URL with a host",
                ))
            }
        }
        if url.query().is_some() {
            return Err(err("upstream.base_url: must not have a query string"));
        }
        positive("upstream.connect_timeout", u.connect_timeout)?;
        positive("upstream.timeout", u.timeout)?;
        if u.retries > 10 {
            return Err(err("upstream.retries: at most 10"));
        }
        if u.max_response_bytes.0 == 0 {
            return Err(err("upstream.max_response_bytes: must be greater than 0"));
        }
        if let Some(ca) = u.ca_file.as_ref().filter(|p| !p.is_file()) {
            return Err(err(format!(
                "upstream.ca_file: {} does not exist",
                ca.display()
            )));
        }
        rate("upstream", u.rate_per_second, u.burst)?;
        if u.max_concurrent == 0 {
            return Err(err("upstream.max_concurrent: must be at least 1"));
        }
        if u.circuit_failures == 0 {
            return Err(err("upstream.circuit_failures: must be at least 1"));
        }
        positive("upstream.circuit_open_for", u.circuit_open_for)?;
        if u.max_walk_pages == 0 {
            return Err(err("upstream.max_walk_pages: must be at least 1"));
        }
        let c = &self.credentials;
        if !(1..=2).contains(&c.max_failed_logins) {
            return Err(err(
                "credentials.max_failed_logins: must be 1 or 2 (ThingSpace locks the user at 5 \
                 failed logins in a row; the gateway stops at 4 attempts)",
            ));
        }
        // The login counts must outlive the process (SPEC §5); only a loopback upstream (a
        // simulator, which forgets its own lock on restart) may do without.
        if c.guard_file.is_none() && !url.host().is_some_and(loopback_host) && !self.redis.enabled()
        {
            return Err(err(
                "credentials.guard_file: must be set unless redis.url is set or \
                 upstream.base_url is a loopback address (the login counts must outlive the \
                 process)",
            ));
        }
        positive("credentials.session_idle_timeout", c.session_idle_timeout)?;
        positive("credentials.login_pause", c.login_pause)?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(err("log.level: not a valid filter (write it like \"info\" or \"info,thingspace_gateway=debug\")"));
        }
        let k = &self.cache;
        positive("cache.ttl", k.ttl)?;
        if k.max_bytes.0 < 1024 {
            return Err(err("cache.max_bytes: must be at least 1KiB"));
        }
        let cl = &self.clients;
        if cl.token_ttl.0 < Duration::from_secs(1) {
            return Err(err("clients.token_ttl: at least 1s"));
        }
        if cl.mode == ClientMode::None && !s.listen.ip().is_loopback() && !cl.allow_unauthenticated
        {
            return Err(err(
                "clients.mode: \"none\" refused: server.listen is not loopback \
                 (set clients.allow_unauthenticated = true to allow it)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, client) in cl.client.iter().enumerate() {
            let key = format!("clients.client[{i}]");
            if client.id.is_empty() || client.id.contains(':') {
                return Err(err(format!(
                    "{key}.id: must be non-empty and contain no ':'"
                )));
            }
            if !seen.insert(client.id.as_str()) {
                return Err(err(format!("{key}.id: duplicate id {:?}", client.id)));
            }
            let h = &client.secret_sha256;
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(format!(
                    "{key}.secret_sha256: must be 64 hex digits (from `thingspace-gateway hash-secret`)"
                )));
            }
            if client.accounts.is_empty() {
                return Err(err(format!(
                    "{key}.accounts: list at least one account, or \"*\""
                )));
            }
            for a in &client.accounts {
                if a != "*" && !crate::params::valid_account(a) {
                    return Err(err(format!(
                        "{key}.accounts: {a:?} is not a valid account name"
                    )));
                }
            }
            rate(&key, client.rate_per_second, client.burst)?;
        }
        self.validate_redis()?;
        self.refuse_placeholders()?;
        Ok(())
    }

    /// Fleet mode's preconditions (SPEC §10).
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        if r.key_prefix.is_empty() || r.key_prefix.len() > 64 {
            return Err(err("redis.key_prefix: 1 to 64 characters"));
        }
        positive("redis.connect_timeout", r.connect_timeout)?;
        positive("redis.command_timeout", r.command_timeout)?;
        if !(1..=64).contains(&r.max_replicas) {
            return Err(err("redis.max_replicas: must be 1 to 64"));
        }
        if !r.enabled() {
            return Ok(());
        }
        let scheme = r.url.expose().split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss"))
            || redis::Client::open(r.url.expose()).is_err()
        {
            return Err(err(
                "redis.url: not a Redis URL (redis://[user:pass@]host:port/db or rediss://…)",
            ));
        }
        if self.clients.token_signing_key.is_empty() {
            return Err(err(
                "clients.token_signing_key: required with redis.url (every replica must accept \
                 every replica's gateway tokens, and the shared tokens are sealed under it)",
            ));
        }
        let replicas = r.max_replicas;
        if self.upstream.burst < replicas || self.upstream.max_concurrent < replicas as usize {
            return Err(err(
                "upstream.burst: upstream.burst and upstream.max_concurrent must be at least \
                 redis.max_replicas (each replica gets 1/max_replicas of them while Redis is down)",
            ));
        }
        Ok(())
    }

    /// Secrets that are too short to sign with, or still the examples' placeholders: a key
    /// copied from an example lets anyone who has read the example mint tokens.
    fn refuse_placeholders(&self) -> Result<(), ConfigError> {
        let key = &self.clients.token_signing_key;
        if !key.is_empty() && key.expose().len() < MIN_SIGNING_KEY_BYTES {
            return Err(err(format!(
                "clients.token_signing_key: at least {MIN_SIGNING_KEY_BYTES} bytes \
                 (e.g. `head -c 32 /dev/urandom | base64`), or empty for a random key per process"
            )));
        }
        let c = &self.credentials;
        for (name, secret) in [
            ("clients.token_signing_key", key),
            ("server.admin_token", &self.server.admin_token),
            ("credentials.client_secret", &c.client_secret),
            ("credentials.password", &c.password),
            ("redis.url", &self.redis.url),
        ] {
            if is_placeholder(secret.expose()) {
                return Err(err(format!(
                    "{name}: still the example's placeholder; set the real value"
                )));
            }
        }
        for (name, value) in [
            ("credentials.client_id", &c.client_id),
            ("credentials.username", &c.username),
        ] {
            if is_placeholder(value) {
                return Err(err(format!(
                    "{name}: still the example's placeholder; set the real value"
                )));
            }
        }
        Ok(())
    }

    /// The effective config as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = from_toml_with_env("", &[]).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.cache.max_bytes.0, 256 << 20);
        assert_eq!(c.upstream.timeout.0, Duration::from_secs(15));
    }

    #[test]
    fn unknown_key_names_it() {
        let e = from_toml_with_env("[server]\nlistn = \"x\"\n", &[]).unwrap_err();
        assert!(e.0.contains("listn"), "{e}");
    }

    #[test]
    fn env_overrides_typed_by_default() {
        let c = from_toml_with_env(
            "",
            &env(&[
                (
                    "THINGSPACE_GATEWAY_UPSTREAM__BASE_URL",
                    "http://127.0.0.1:1",
                ),
                ("THINGSPACE_GATEWAY_UPSTREAM__BURST", "7"),
                ("THINGSPACE_GATEWAY_CACHE__TTL", "2s"),
                ("THINGSPACE_GATEWAY_CREDENTIALS__CLIENT_ID", "0123"),
            ]),
        )
        .unwrap();
        assert_eq!(c.upstream.base_url, "http://127.0.0.1:1");
        assert_eq!(c.upstream.burst, 7);
        assert_eq!(c.cache.ttl.0, Duration::from_secs(2));
        assert_eq!(c.credentials.client_id, "0123");
        let e =
            from_toml_with_env("", &env(&[("THINGSPACE_GATEWAY_CACHE__NOPE", "1")])).unwrap_err();
        assert!(e.0.contains("cache.nope"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("2 MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1TB").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("100000000000s").is_err());
        let c = from_toml_with_env("[cache]\nmax_bytes = 4096\n", &[]).unwrap();
        assert_eq!(c.cache.max_bytes.0, 4096);
    }

    #[test]
    fn credential_env_wins_and_is_masked() {
        let c = from_toml_with_env(
            "[credentials]\nclient_secret = \"inline\"\n",
            &env(&[("THINGSPACE_CLIENT_SECRET", "from-env")]),
        )
        .unwrap();
        assert_eq!(c.credentials.client_secret.expose(), "from-env");
        let shown = c.to_masked_toml();
        assert!(
            !shown.contains("from-env") && !shown.contains("inline"),
            "{shown}"
        );
    }

    #[test]
    fn mode_none_needs_loopback() {
        let e = from_toml_with_env(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[clients]\nmode = \"none\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.0.starts_with("clients.mode"), "{e}");
        from_toml_with_env(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[clients]\nmode = \"none\"\nallow_unauthenticated = true\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn max_failed_logins_is_one_or_two() {
        for n in [0, 3, 5] {
            let e = from_toml_with_env(&format!("[credentials]\nmax_failed_logins = {n}\n"), &[])
                .unwrap_err();
            assert!(e.0.starts_with("credentials.max_failed_logins"), "{e}");
        }
        for n in [1, 2] {
            from_toml_with_env(&format!("[credentials]\nmax_failed_logins = {n}\n"), &[]).unwrap();
        }
    }

    #[test]
    fn guard_file_may_be_empty_only_for_a_loopback_upstream() {
        let e = from_toml_with_env("[credentials]\nguard_file = \"\"\n", &[]).unwrap_err();
        assert!(e.0.starts_with("credentials.guard_file"), "{e}");
        for base in [
            "http://127.0.0.1:8081",
            "http://127.8.9.10",
            "http://localhost:1",
            "http://[::1]:8081",
        ] {
            from_toml_with_env(
                &format!("[upstream]\nbase_url = \"{base}\"\n[credentials]\nguard_file = \"\"\n"),
                &[],
            )
            .unwrap_or_else(|e| panic!("{base}: {e}"));
        }
        let e = from_toml_with_env(
            "[upstream]\nbase_url = \"https://10.0.0.1\"\n[credentials]\nguard_file = \"\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.0.starts_with("credentials.guard_file"), "{e}");
    }

    #[test]
    fn errors_give_key_line_and_column_never_the_value() {
        for (text, start, at) in [
            // A syntax error: toml's own message would quote the line.
            (
                "[credentials]\nusername = \"u\"\npassword = \"Hunter2-secret\n",
                "config: ",
                "(line 3, column 27)",
            ),
            (
                "[credentials]\npassword = Hunter2-secret\n",
                "config: ",
                "(line 2, column 12)",
            ),
            (
                "[credentials]\npassword = 12345678\n",
                "credentials.password: invalid type, expected a string",
                "(line 2, column 12)",
            ),
            (
                "[server]\nlisten = \"Hunter2\"\n",
                "server.listen: ",
                "(line 2, column 10)",
            ),
            (
                "[cache]\nttl = \"Hunter2\"\n",
                "cache.ttl: invalid duration",
                "(line 2, column 7)",
            ),
            (
                "[cache]\nmax_bytes = \"Hunter2\"\n",
                "cache.max_bytes: invalid size",
                "(line 2, column 13)",
            ),
            (
                "[clients]\nmode = \"Hunter2\"\n",
                "clients.mode: unknown variant, expected `required` or `none`",
                "(line 2, column 8)",
            ),
            (
                "[upstream]\nburst = \"Hunter2\"\n",
                "upstream.burst: invalid type, expected u32",
                "(line 2, column 9)",
            ),
        ] {
            let e = from_toml_with_env(text, &[]).unwrap_err().0;
            assert!(e.starts_with(start) && e.ends_with(at), "{text:?}: {e}");
            assert!(!e.contains("Hunter2") && !e.contains("12345678"), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let env = env(&[("THINGSPACE_GATEWAY_CACHE__TTL", "Hunter2")]);
        let e = from_toml_with_env("", &env).unwrap_err().0;
        assert_eq!(
            e,
            "cache.ttl: invalid duration; write it like \"500ms\", \"5s\", \"20m\" \
             (set by the environment)"
        );
    }

    #[test]
    fn cleartext_upstream_only_on_loopback() {
        for url in [
            "http://127.0.0.1:8081",
            "http://127.9.8.7",
            "http://localhost:8081/base",
            "http://LOCALHOST",
            "http://[::1]:8081",
            "https://thingspace.verizon.com",
            "https://10.0.0.1:8443",
        ] {
            let t = format!("[upstream]\nbase_url = \"{url}\"\n");
            from_toml_with_env(&t, &[]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for url in [
            "http://thingspace.verizon.com",
            "http://10.0.0.1:8081",
            "http://[::2]:8081",
            "http://localhost.example.com",
            "http://128.0.0.1",
            "ftp://127.0.0.1",
            "127.0.0.1:8081",
        ] {
            let t = format!("[upstream]\nbase_url = \"{url}\"\n");
            let e = from_toml_with_env(&t, &[]).unwrap_err().0;
            assert!(e.starts_with("upstream.base_url: "), "{url}: {e}");
        }
    }

    #[test]
    fn every_rate_and_burst_is_bounded() {
        for (text, key) in [
            (
                "[upstream]\nrate_per_second = 1e-20\n",
                "upstream.rate_per_second",
            ),
            (
                "[upstream]\nrate_per_second = 0.0009\n",
                "upstream.rate_per_second",
            ),
            (
                "[upstream]\nrate_per_second = 1000001.0\n",
                "upstream.rate_per_second",
            ),
            (
                "[upstream]\nrate_per_second = nan\n",
                "upstream.rate_per_second",
            ),
            (
                "[upstream]\nrate_per_second = inf\n",
                "upstream.rate_per_second",
            ),
            ("[upstream]\nburst = 0\n", "upstream.burst"),
            ("[upstream]\nburst = 1000001\n", "upstream.burst"),
        ] {
            let e = from_toml_with_env(text, &[]).unwrap_err().0;
            assert!(e.starts_with(&format!("{key}: ")), "{text:?}: {e}");
        }
        from_toml_with_env(
            "[upstream]\nrate_per_second = 0.001\nburst = 1000000\n",
            &[],
        )
        .unwrap();
        let client = |rate: &str, burst: &str| {
            format!(
                "[[clients.client]]\nid = \"a\"\nsecret_sha256 = \"{}\"\naccounts = [\"*\"]\n\
                 [[clients.client]]\nid = \"b\"\nsecret_sha256 = \"{}\"\naccounts = [\"*\"]\n\
                 rate_per_second = {rate}\nburst = {burst}\n",
                "0".repeat(64),
                "0".repeat(64)
            )
        };
        from_toml_with_env(&client("1e6", "1000000"), &[]).unwrap();
        for (rate, burst, key) in [
            ("1e-20", "1", "clients.client[1].rate_per_second"),
            ("2e6", "1", "clients.client[1].rate_per_second"),
            ("1.0", "0", "clients.client[1].burst"),
            ("1.0", "4000000000", "clients.client[1].burst"),
        ] {
            let e = from_toml_with_env(&client(rate, burst), &[]).unwrap_err().0;
            assert!(e.starts_with(&format!("{key}: ")), "{rate} {burst}: {e}");
        }
    }

    #[test]
    fn signing_keys_and_placeholders() {
        let key = |k: &str| format!("[clients]\ntoken_signing_key = \"{k}\"\n");
        from_toml_with_env(&key(""), &[]).unwrap();
        from_toml_with_env(&key(&"k".repeat(32)), &[]).unwrap();
        for k in [
            "k",
            &"k".repeat(31),
            "replace-me-with-32-random-bytes-and-more",
            "REPLACE-ME: head -c 32 /dev/urandom | base64",
        ] {
            let e = from_toml_with_env(&key(k), &[]).unwrap_err().0;
            assert!(e.starts_with("clients.token_signing_key: "), "{k}: {e}");
            assert!(k.len() < 5 || !e.contains(k), "{e}");
        }
        // The same through the environment.
        let env = env(&[("THINGSPACE_GATEWAY_TOKEN_KEY", "short")]);
        let e = from_toml_with_env("", &env).unwrap_err().0;
        assert!(e.starts_with("clients.token_signing_key: "), "{e}");
        for (text, name) in [
            (
                "[server]\nadmin_token = \"replace-me\"\n",
                "server.admin_token",
            ),
            (
                "[credentials]\npassword = \"Replace-Me\"\n",
                "credentials.password",
            ),
            (
                "[credentials]\nclient_secret = \"replace-me\"\n",
                "credentials.client_secret",
            ),
            (
                "[credentials]\nclient_id = \"replace-me\"\n",
                "credentials.client_id",
            ),
            (
                "[credentials]\nusername = \"replace-me\"\n",
                "credentials.username",
            ),
        ] {
            let e = from_toml_with_env(text, &[]).unwrap_err().0;
            assert!(e.starts_with(&format!("{name}: ")), "{text:?}: {e}");
        }
        let e = from_toml_with_env("[clients]\ntoken_ttl = \"500ms\"\n", &[]).unwrap_err();
        assert!(e.0.starts_with("clients.token_ttl: "), "{e}");
    }
}
