//! The `thingspace-gateway` command: serve, demo, sim, check-config, hash-secret.

use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use thingspace_gateway::config::{self, Config, LogFormat};
use thingspace_gateway::runtime::{Gateway, LogLevelHook, Running};
#[cfg(feature = "sim")]
use thingspace_sim::{SimOptions, Simulator};

#[derive(Parser)]
#[command(
    name = "thingspace-gateway",
    version,
    about = "Caching reverse proxy for ThingSpace's FOTA license API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: config/gateway.toml if present, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the built-in simulator and a gateway wired to it, on loopback.
    Demo,
    /// Run the ThingSpace simulator alone.
    Sim(Box<SimArgs>),
    /// Validate the config and print the effective config, secrets masked.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Read a client secret (16 characters or more) on stdin and print its `secret_sha256`.
    HashSecret,
}

#[derive(clap::Args)]
#[cfg_attr(not(feature = "sim"), allow(dead_code))]
struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 3)]
    accounts: usize,
    #[arg(long, default_value_t = 2500)]
    devices: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    page_size: usize,
    #[arg(long, default_value = "demo-key")]
    client_id: String,
    #[arg(long, default_value = "demo-secret")]
    client_secret: String,
    #[arg(long, default_value = "demo-user")]
    username: String,
    #[arg(long, default_value = "demo-pass")]
    password: String,
    #[arg(long, default_value = "1h", value_parser = duration)]
    token_ttl: Duration,
    #[arg(long, default_value = "20m", value_parser = duration)]
    session_idle: Duration,
    /// Requests per second before answering 429 (default: unlimited).
    #[arg(long)]
    rate: Option<f64>,
    /// Bucket size of the rate limiter (default: one second of --rate).
    #[arg(long)]
    burst: Option<u32>,
    #[arg(long, default_value = "0ms", value_parser = duration)]
    latency: Duration,
    /// Serve HTTPS with a generated certificate, written here as PEM.
    #[arg(long)]
    tls_cert_out: Option<PathBuf>,
    /// Another name the certificate is valid for (repeatable), e.g. the host name clients use.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
}

/// `hash-secret` refuses shorter client secrets (SPEC §2): the SHA-256 in the config is
/// unsalted, so a short secret could be found from it by brute force.
const MIN_CLIENT_SECRET_CHARS: usize = 16;

fn duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

/// Logs to stderr through one top-level filter: `RUST_LOG` when set, else `log.level`. Returns
/// what applies a new `log.level` on reload (`None` while `RUST_LOG` rules). The filter is a
/// top-level reloadable layer: a reload handle on a per-layer filter panics (tokio-rs/tracing#1629).
fn init_logging(format: LogFormat, level: &str) -> Option<LogLevelHook> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_rules = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
    (!env_rules).then(|| -> LogLevelHook {
        Box::new(move |level: &str| {
            let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())
        })
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig { config } => match config::load(config.as_deref()) {
            Ok(cfg) => {
                print!("{}", cfg.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid config: {e}");
                ExitCode::from(2)
            }
        },
        Command::HashSecret => {
            let mut secret = String::new();
            if std::io::stdin().read_to_string(&mut secret).is_err() {
                eprintln!("cannot read the secret from stdin");
                return ExitCode::from(2);
            }
            // As a secret file is read: one trailing line ending off, nothing else.
            let secret = thingspace_gateway::secret::strip_line_ending(&secret);
            let chars = secret.chars().count();
            if chars < MIN_CLIENT_SECRET_CHARS {
                eprintln!(
                    "hash-secret: the secret on stdin has {chars} characters; a client secret needs \
                     at least {MIN_CLIENT_SECRET_CHARS} (e.g. `head -c 24 /dev/urandom | base64`)"
                );
                return ExitCode::from(2);
            }
            println!("{}", thingspace_gateway::clients::sha256_hex(secret));
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            let cfg = match config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("invalid config: {e}");
                    return ExitCode::from(2);
                }
            };
            let log_level = init_logging(cfg.log.format, &cfg.log.level);
            run(serve(cfg, config, log_level))
        }
        #[cfg(feature = "sim")]
        Command::Demo => {
            let _ = init_logging(LogFormat::Text, "info");
            run(demo())
        }
        #[cfg(feature = "sim")]
        Command::Sim(args) => {
            let _ = init_logging(LogFormat::Text, "info");
            run(sim(args))
        }
        #[cfg(not(feature = "sim"))]
        Command::Demo | Command::Sim(_) => {
            eprintln!("built without the simulator (feature `sim`)");
            ExitCode::from(2)
        }
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `cfg` is the config as checked before logging started; the gateway reads `source` again
/// itself, so that a reload reads the same source.
async fn serve(
    cfg: Config,
    source: Option<PathBuf>,
    log_level: Option<LogLevelHook>,
) -> anyhow::Result<()> {
    thingspace_gateway::upstream::tls::install_crypto_provider();
    thingspace_gateway::runtime::raise_open_files_limit(cfg.server.max_connections);
    let gateway = Gateway::from_source(source)?;
    let grace = gateway.settings().fixed().server.shutdown_grace.0;
    if let Some(hook) = log_level {
        gateway.on_log_level(hook);
    }
    let running = Running::start_with(gateway).await?;
    tracing::info!(listen = %running.addr, admin = %running.admin_addr, "thingspace-gateway serving");
    stop_signal().await;
    tracing::info!(grace = ?grace, "signal received: draining in-flight requests");
    running.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// The embedded demo config: the simulator's default credentials, open clients on loopback.
#[cfg(feature = "sim")]
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[cfg(feature = "sim")]
async fn demo() -> anyhow::Result<()> {
    use anyhow::Context;
    thingspace_gateway::upstream::tls::install_crypto_provider();
    let sim = Simulator::start(SimOptions::default())
        .await
        .context("starting the simulator on 127.0.0.1:8081")?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = config::from_toml_with_env(DEMO_CONFIG, &env)
        .map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    thingspace_gateway::runtime::raise_open_files_limit(cfg.server.max_connections);
    let running = Running::start(cfg).await?;
    let accounts = sim.account_names();
    let first = accounts.first().cloned().unwrap_or_default();
    let gw = running.base_url();
    let admin = running.admin_url();
    println!(
        "ThingSpace simulator: {} (accounts: {})",
        sim.base_url(),
        accounts.join(", ")
    );
    println!("Gateway:               {gw}");
    println!("Admin:                 {admin}");
    println!();
    println!("Try:");
    println!("  curl -si {gw}/api/fota/v1/licenses/{first}/index/0 | head -n 12");
    println!("  curl -s  {gw}/gateway/v1/accounts/{first}/licenses | head -c 300; echo");
    println!("  curl -s  {gw}/api/fota/v1/subscriptions/{first}; echo");
    println!("  curl -s  {admin}/status; echo");
    println!("  curl -s  {admin}/metrics | grep thingspace_gateway_cache_lookups_total");
    println!();
    println!("Ctrl-C to stop.");
    stop_signal().await;
    running.stop().await;
    sim.stop().await;
    Ok(())
}

#[cfg(feature = "sim")]
async fn sim(a: Box<SimArgs>) -> anyhow::Result<()> {
    let opts = SimOptions {
        listen: a.listen,
        accounts: a.accounts,
        devices: a.devices,
        seed: a.seed,
        page_size: a.page_size,
        client_id: a.client_id,
        client_secret: a.client_secret,
        username: a.username,
        password: a.password,
        token_ttl: a.token_ttl,
        session_idle: a.session_idle,
        rate: a.rate,
        burst: a.burst,
        latency: a.latency,
        tls_cert_out: a.tls_cert_out,
        tls_names: a.tls_names,
    };
    let sim = Simulator::start(opts).await?;
    println!("thingspace simulator listening on {}", sim.base_url());
    println!("accounts: {}", sim.account_names().join(" "));
    stop_signal().await;
    sim.stop().await;
    Ok(())
}
