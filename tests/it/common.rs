//! Shared helpers: start the simulator and a gateway on port 0, talk HTTP to them.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::api::ClientApi;
use thingspace_gateway::config::{self, Config};
use thingspace_gateway::respond::Body;
use thingspace_gateway::runtime::{Gateway, Running};
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_sim::{SimOptions, Simulator};

pub fn sim_opts() -> SimOptions {
    SimOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        ..SimOptions::default()
    }
}

/// Raises this test process's open-files soft limit to its hard limit, once. The tests of one
/// binary run in parallel and each opens sockets; a fresh machine's soft limit is often 1,024.
/// Tests that need many connections at once still must not count on more than that: the hard
/// limit may be 1,024 too.
pub fn raise_open_files_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    });
}

pub async fn start_sim(opts: SimOptions) -> Simulator {
    raise_open_files_limit();
    Simulator::start(opts).await.expect("simulator starts")
}

/// A gateway config in front of `base_url`, on port 0, clients open, with `extra` TOML merged
/// in section by section (later keys win).
pub fn config(base_url: &str, extra: &str) -> Config {
    config::from_toml_with_env(&config_text(base_url, extra), &[]).expect("valid test config")
}

/// The TOML text of [`config`] (for tests that write a config file and reload it).
pub fn config_text(base_url: &str, extra: &str) -> String {
    let base = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "{base_url}"
[credentials]
client_id = "demo-key"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-pass"
guard_file = ""
[clients]
mode = "none"
"#
    );
    let mut table: toml::Table = toml::from_str(&base).expect("base config");
    let extra: toml::Table = toml::from_str(extra).expect("extra config");
    for (section, values) in extra {
        match (table.get_mut(&section), values) {
            (Some(toml::Value::Table(t)), toml::Value::Table(v)) => t.extend(v),
            (_, v) => {
                table.insert(section, v);
            }
        }
    }
    toml::to_string(&table).expect("toml")
}

pub async fn start_gateway(cfg: Config) -> Running {
    raise_open_files_limit();
    Running::start(cfg).await.expect("gateway starts")
}

/// Waits (real time, bounded) until `/readyz` answers 200.
pub async fn wait_ready(gw: &Running) {
    for _ in 0..200 {
        if get(&format!("{}/readyz", gw.admin_url())).await.status == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gateway never became ready");
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn error_code(&self) -> String {
        self.json()["errorCode"].as_str().unwrap_or("").to_string()
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

pub async fn request(method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = client().request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Resp {
    request(Method::GET, url, &[], b"").await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Resp {
    request(Method::GET, url, headers, b"").await
}

/// A shared pooled client for bursts of requests.
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    pub fn new() -> Self {
        Http(client())
    }

    pub async fn get(&self, url: &str) -> Resp {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.0.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }
}

/// A bearer token and a session straight from the simulator (its default credentials).
pub async fn sim_tokens(sim: &Simulator) -> (String, String) {
    let token = request(
        Method::POST,
        &format!("{}/api/ts/v1/oauth2/token", sim.base_url()),
        &[("authorization", "Basic ZGVtby1rZXk6ZGVtby1zZWNyZXQ=")],
        b"grant_type=client_credentials",
    )
    .await
    .json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let login = request(
        Method::POST,
        &format!("{}/api/m2m/v1/session/login", sim.base_url()),
        &[("authorization", &format!("Bearer {token}"))],
        br#"{"username":"demo-user","password":"demo-pass"}"#,
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let session = login.json()["sessionToken"]
        .as_str()
        .expect("sessionToken")
        .to_string();
    (token, session)
}

pub fn license_path(account: &str, index: u64) -> String {
    format!("/api/fota/v1/licenses/{account}/index/{index}")
}

/// A gateway wired to the simulator in-process: no sockets, so tests can run under tokio's
/// paused clock and jump time without firing I/O timeouts.
pub struct InProc {
    pub sim: Simulator,
    pub gw: Arc<Gateway>,
    api: ClientApi,
}

impl InProc {
    pub async fn new(opts: SimOptions, extra: &str) -> InProc {
        let sim = start_sim(opts).await;
        let cfg = config(&sim.base_url(), extra);
        let transport = sim_transport(&sim, cfg.upstream.max_response_bytes.as_usize());
        let gw = Gateway::with_transport(cfg, transport).expect("gateway builds");
        gw.spawn_token_refresher();
        InProc {
            sim,
            api: gw.client_api(),
            gw,
        }
    }

    /// Like [`InProc::new`], but the gateway reaches the simulator over TCP with its real HTTP
    /// transport. Only the client side is in-process: a thousand concurrent client requests then
    /// cost no sockets (real time only: sockets and a paused clock do not mix).
    pub async fn over_tcp(opts: SimOptions, extra: &str) -> InProc {
        let sim = start_sim(opts).await;
        let gw = Gateway::new(config(&sim.base_url(), extra)).expect("gateway");
        gw.spawn_token_refresher();
        InProc {
            sim,
            api: gw.client_api(),
            gw,
        }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Body::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let resp = self.api.serve(req).await;
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request(Method::GET, path, &[], b"").await
    }

    /// Lets spawned tasks (background refreshes) run to completion under paused time.
    pub async fn settle(&self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
}

/// An `Authorization: Basic` value for a client id and secret.
pub fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// A gateway token for a registered client (ThingSpace's token request with Basic credentials),
/// after checking the answer has ThingSpace's shape.
pub async fn gateway_token(base: &str, id: &str, secret: &str) -> String {
    let r = request(
        Method::POST,
        &format!("{base}/api/ts/v1/oauth2/token"),
        &[
            ("authorization", &basic(id, secret)),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        b"grant_type=client_credentials",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    assert!(body["scope"].is_string());
    body["access_token"].as_str().unwrap().to_string()
}
