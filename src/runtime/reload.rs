//! Reload without restart (SPEC §11): `SIGHUP` or `POST /config/reload` re-read the config
//! source and every `*_file` secret, validate the whole against what will run, then put it in
//! force at once. Nothing is applied unless everything is valid: the new parts that can fail to
//! build (the client registry, the TLS acceptor) are built first, then the config is swapped,
//! then the parts built from config at start-up take their new values. Requests in flight keep
//! the config snapshot they loaded; connections stay open; the cache is never emptied.

use super::{server_tls, Gateway, Loaded, Source};
use crate::admin::Reloader;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

/// The answer of a reload (the admin route's JSON body).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// `applied` or `rejected`.
    pub outcome: &'static str,
    /// Why it was rejected, naming the key; never a value.
    pub error: Option<String>,
    /// Changed keys that need a restart: their running values were kept.
    pub refused_keys: Vec<&'static str>,
    /// Keys an environment variable overrides: the file's value for them changes nothing.
    pub shadowed_keys: Vec<String>,
}

impl ReloadReport {
    fn rejected(error: String) -> Self {
        Self {
            outcome: "rejected",
            error: Some(error),
            refused_keys: Vec::new(),
            shadowed_keys: Vec::new(),
        }
    }
}

impl Gateway {
    /// Re-reads the config source and puts it in force, or changes nothing (see the module doc).
    pub async fn reload(&self) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let report = self.try_reload();
        match &report.error {
            None => {
                self.metrics.config_reload(true, SystemTime::now());
                tracing::info!(
                    refused_keys = ?report.refused_keys,
                    shadowed_keys = ?report.shadowed_keys,
                    "config reloaded"
                );
                for key in &report.refused_keys {
                    tracing::warn!(
                        key,
                        "config reload: this key needs a restart; its running value is kept"
                    );
                }
            }
            Some(e) => {
                self.metrics.config_reload(false, SystemTime::now());
                tracing::error!(error = %e, "config reload rejected; the running config stays");
            }
        }
        report
    }

    fn try_reload(&self) -> ReloadReport {
        let path = match &self.source {
            Source::Read(path) => path.as_deref(),
            Source::Given => {
                return ReloadReport::rejected(
                    "this gateway was started from a config in memory (the demo's embedded \
                     config): there is no file to read again"
                        .into(),
                )
            }
        };
        let (next, meta) = match crate::config::load_with_meta(path) {
            Ok(loaded) => loaded,
            Err(e) => return ReloadReport::rejected(e.to_string()),
        };
        // What can fail to build is built before anything changes.
        let clients = match self.api.rebuild_clients(&next.clients) {
            Ok(c) => c,
            Err(e) => return ReloadReport::rejected(format!("clients: {e}")),
        };
        let tls = match server_tls(&next) {
            Ok(t) => t,
            Err(e) => return ReloadReport::rejected(e.to_string()),
        };
        if tls.is_some() != self.settings.fixed().server.tls_cert.is_some() {
            return ReloadReport::rejected(
                "server.tls_cert/tls_key: turning TLS on or off needs a restart (a new \
                 certificate and key are applied)"
                    .into(),
            );
        }
        let refused_keys = match self.settings.swap(next) {
            Ok(refused) => refused,
            Err(e) => return ReloadReport::rejected(e.to_string()),
        };
        let cfg = self.settings.current();
        self.api.install_clients(clients);
        self.upstream.apply(&cfg.upstream);
        self.tokens
            .apply(&cfg.credentials, cfg.server.request_timeout.0);
        if let Some(tls) = tls {
            self.tls.store(Some(Arc::new(tls)));
        }
        if let Some(hook) = self.log_level.get() {
            if let Err(e) = hook(&cfg.log.level) {
                tracing::warn!(error = %e, "log.level not applied");
            }
        }
        let shadowed_keys = meta.shadowed_keys.clone();
        self.loaded.store(Arc::new(Loaded {
            at: SystemTime::now(),
            meta,
        }));
        ReloadReport {
            outcome: "applied",
            error: None,
            refused_keys,
            shadowed_keys,
        }
    }

    /// `config` of `/status`: when the config in force was loaded, and the SHA-256 of the file
    /// as read (null on the defaults).
    pub fn config_status(&self) -> serde_json::Value {
        let loaded = self.loaded.load();
        serde_json::json!({
            "loaded_at": humantime::format_rfc3339_seconds(loaded.at).to_string(),
            "sha256": loaded.meta.sha256,
        })
    }
}

impl Reloader for Gateway {
    fn reload(&self) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send + '_>> {
        Box::pin(async move {
            serde_json::to_value(Gateway::reload(self).await).unwrap_or(serde_json::Value::Null)
        })
    }

    fn config_status(&self) -> serde_json::Value {
        Gateway::config_status(self)
    }
}

/// Reloads on every `SIGHUP` until the gateway shuts down.
pub(super) fn spawn_sighup(gateway: &Arc<Gateway>) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /config/reload");
                return None;
            }
        };
        let weak = Arc::downgrade(gateway);
        let shutdown = gateway.shutdown.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => if got.is_none() { return },
                    _ = shutdown.wait() => return,
                }
                let Some(g) = weak.upgrade() else { return };
                tracing::info!("SIGHUP: reloading the config");
                g.reload().await;
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = gateway;
        None
    }
}
