//! Reload without restart (SPEC §11): a config file, `POST /config/reload` (or SIGHUP), and what
//! changes at once and what does not.

use crate::common::*;
use http::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::clients::sha256_hex;
use thingspace_gateway::runtime::{Gateway, Running};
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_sim::Simulator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A scratch directory of its own per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tsgw-reload-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A gateway serving on real sockets, reading its config from `file`.
async fn start_from(file: &std::path::Path) -> Running {
    let gw = Gateway::from_source(Some(file.to_path_buf())).expect("gateway builds");
    Running::start_with(gw).await.expect("gateway starts")
}

async fn reload(gw: &Running) -> serde_json::Value {
    let r = request(
        Method::POST,
        &format!("{}/config/reload", gw.admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.json()
}

fn clients(entries: &[(&str, &str, &str)]) -> String {
    let mut t = String::from(
        "[clients]\nmode = \"required\"\ntoken_signing_key = \"reload-signing-key-0123456789abcdef\"\n",
    );
    for (id, secret, account) in entries {
        t.push_str(&format!(
            "[[clients.client]]\nid = \"{id}\"\nsecret_sha256 = \"{}\"\naccounts = [\"{account}\"]\n",
            sha256_hex(secret)
        ));
    }
    t
}

async fn page_as(gw: &Running, sim: &Simulator, auth: &str) -> Resp {
    let path = license_path(&sim.account_names()[0], 0);
    request(
        Method::GET,
        &format!("{}{path}", gw.base_url()),
        &[("authorization", auth)],
        b"",
    )
    .await
}

#[tokio::test]
async fn clients_added_removed_and_their_accounts_changed() {
    let sim = start_sim(sim_opts()).await;
    let account = sim.account_names()[0].clone();
    let dir = scratch("clients");
    let file = dir.join("gateway.toml");
    let ops = ("ops", "ops-secret-0123456789", "*");
    std::fs::write(&file, config_text(&sim.base_url(), &clients(&[ops]))).unwrap();
    let gw = start_from(&file).await;
    wait_ready(&gw).await;
    let billing = basic("billing", "billing-secret-012345");
    assert_eq!(
        page_as(&gw, &sim, &billing).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Added: it authenticates, and gets a token.
    let with_billing = clients(&[ops, ("billing", "billing-secret-012345", &account)]);
    std::fs::write(&file, config_text(&sim.base_url(), &with_billing)).unwrap();
    let r = reload(&gw).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["refused_keys"], serde_json::json!([]));
    assert_eq!(page_as(&gw, &sim, &billing).await.status, StatusCode::OK);
    let bearer = format!(
        "Bearer {}",
        gateway_token(&gw.base_url(), "billing", "billing-secret-012345").await
    );
    assert_eq!(page_as(&gw, &sim, &bearer).await.status, StatusCode::OK);

    // Its accounts changed: 403, and back.
    let elsewhere = clients(&[
        ops,
        ("billing", "billing-secret-012345", "some-other-account"),
    ]);
    std::fs::write(&file, config_text(&sim.base_url(), &elsewhere)).unwrap();
    assert_eq!(reload(&gw).await["outcome"], "applied");
    let r = page_as(&gw, &sim, &bearer).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "GW_FORBIDDEN".into())
    );
    std::fs::write(&file, config_text(&sim.base_url(), &with_billing)).unwrap();
    assert_eq!(reload(&gw).await["outcome"], "applied");
    assert_eq!(page_as(&gw, &sim, &bearer).await.status, StatusCode::OK);

    // Removed: its Basic credentials and its issued token are refused at once.
    std::fs::write(&file, config_text(&sim.base_url(), &clients(&[ops]))).unwrap();
    assert_eq!(reload(&gw).await["outcome"], "applied");
    for auth in [&billing, &bearer] {
        let r = page_as(&gw, &sim, auth).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::UNAUTHORIZED, "GW_UNAUTHORIZED".into())
        );
    }
    // The other client was never disturbed.
    let ops_auth = basic("ops", "ops-secret-0123456789");
    assert_eq!(page_as(&gw, &sim, &ops_auth).await.status, StatusCode::OK);
    assert_eq!(
        sim.count_status("session_login", 200),
        1,
        "one login, none again"
    );
}

#[tokio::test]
async fn a_bad_file_changes_nothing() {
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("bad");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config_text(&sim.base_url(), "")).unwrap();
    let gw = start_from(&file).await;
    wait_ready(&gw).await;
    let path = license_path(&sim.account_names()[0], 0);
    for (bad, key) in [
        ("[cache\nttl = ", "line"),
        ("[cache]\nttl = \"1h\"\nnope = 1\n", "nope"),
        ("[cache]\nttl = \"soon\"\n", "cache.ttl"),
    ] {
        let text = config_text(&sim.base_url(), "") + "\n" + bad;
        std::fs::write(&file, text).unwrap();
        let r = reload(&gw).await;
        assert_eq!(r["outcome"], "rejected", "{r}");
        assert!(r["error"].as_str().unwrap().contains(key), "{r}");
        let got = get(&format!("{}{path}", gw.base_url())).await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "still serving on the old config"
        );
    }
    let metrics = get(&format!("{}/metrics", gw.admin_url())).await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains("thingspace_gateway_config_reloads_total{outcome=\"rejected\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("thingspace_gateway_config_reloads_total{outcome=\"applied\"} 0"),
        "{text}"
    );
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["config"]["sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn a_new_listen_address_is_refused_and_the_old_port_kept() {
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("listen");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config_text(&sim.base_url(), "")).unwrap();
    let gw = start_from(&file).await;
    wait_ready(&gw).await;
    std::fs::write(
        &file,
        config_text(
            &sim.base_url(),
            "[server]\nlisten = \"127.0.0.1:1\"\n[cache]\nttl = \"2m\"\n",
        ),
    )
    .unwrap();
    let r = reload(&gw).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["refused_keys"], serde_json::json!(["server.listen"]));
    let path = license_path(&sim.account_names()[0], 0);
    let got = get(&format!("{}{path}", gw.base_url())).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.header("cache-control"),
        "private, max-age=120",
        "the ttl was applied"
    );
}

/// 8 keep-alive clients keep sending while the config is reloaded 20 times: no request fails and
/// no connection closes.
#[tokio::test]
async fn reloads_under_load_cost_no_request_and_no_connection() {
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("load");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config_text(&sim.base_url(), "")).unwrap();
    let gw = Arc::new(start_from(&file).await);
    wait_ready(&gw).await;
    let path = license_path(&sim.account_names()[0], 0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, path, stop, served) = (gw.addr, path.clone(), stop.clone(), served.clone());
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut buf = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    conn.write_all(req.as_bytes())
                        .await
                        .expect("connection stays open");
                    // Read one whole answer: the head, then Content-Length bytes.
                    let mut got = 0;
                    let (head_end, length) = loop {
                        let n = conn
                            .read(&mut buf[got..])
                            .await
                            .expect("connection stays open");
                        assert!(n > 0, "connection closed by the gateway");
                        got += n;
                        let text = String::from_utf8_lossy(&buf[..got]).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            assert!(text.starts_with("http/1.1 200"), "{}", &text[..end]);
                            let length: usize = text
                                .split("content-length: ")
                                .nth(1)
                                .and_then(|v| v.split("\r\n").next())
                                .and_then(|v| v.parse().ok())
                                .expect("content-length");
                            break (end + 4, length);
                        }
                    };
                    while got < head_end + length {
                        let n = conn
                            .read(&mut buf[got..])
                            .await
                            .expect("connection stays open");
                        assert!(n > 0, "connection closed by the gateway");
                        got += n;
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..20 {
        let ttl = if i % 2 == 0 { "2m" } else { "3m" };
        std::fs::write(
            &file,
            config_text(&sim.base_url(), &format!("[cache]\nttl = \"{ttl}\"\n")),
        )
        .unwrap();
        assert_eq!(reload(&gw).await["outcome"], "applied");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("no client saw an error");
    }
    assert!(
        served.load(Ordering::Relaxed) >= 8,
        "every client was served"
    );
}

/// New TLS handshakes see the new certificate; an established connection goes on.
#[tokio::test]
async fn a_new_certificate_is_used_by_new_handshakes() {
    thingspace_gateway::upstream::tls::install_crypto_provider();
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("tls");
    let write_cert = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    };
    let (old_cert, old_key) = write_cert("old");
    let (new_cert, new_key) = write_cert("new");
    let (live_cert, live_key) = (dir.join("live.pem"), dir.join("live.key"));
    std::fs::copy(&old_cert, &live_cert).unwrap();
    std::fs::copy(&old_key, &live_key).unwrap();
    let file = dir.join("gateway.toml");
    let tls = format!(
        "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
        live_cert.display().to_string(),
        live_key.display().to_string()
    );
    std::fs::write(&file, config_text(&sim.base_url(), &tls)).unwrap();
    let gw = start_from(&file).await;
    wait_ready(&gw).await;
    let client_for = |trusted: &std::path::Path| {
        let tls = thingspace_gateway::upstream::tls::client_config(Some(trusted)).unwrap();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, http_body_util::Full<bytes::Bytes>>(connector)
    };
    let url: http::Uri = format!(
        "https://localhost:{}{}",
        gw.addr.port(),
        license_path(&sim.account_names()[0], 0)
    )
    .parse()
    .unwrap();
    // Reads the whole answer, so that the connection goes back to the client's pool.
    async fn status_of<C>(
        client: &hyper_util::client::legacy::Client<C, http_body_util::Full<bytes::Bytes>>,
        url: http::Uri,
    ) -> Result<StatusCode, hyper_util::client::legacy::Error>
    where
        C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        use http_body_util::BodyExt;
        let r = client.get(url).await?;
        let status = r.status();
        let _ = r.into_body().collect().await;
        Ok(status)
    }
    let trusts_old = client_for(&old_cert);
    let trusts_new = client_for(&new_cert);
    assert_eq!(
        status_of(&trusts_old, url.clone()).await.unwrap(),
        StatusCode::OK
    );
    assert!(
        status_of(&trusts_new, url.clone()).await.is_err(),
        "the new certificate is not served yet"
    );
    std::fs::copy(&new_cert, &live_cert).unwrap();
    std::fs::copy(&new_key, &live_key).unwrap();
    assert_eq!(reload(&gw).await["outcome"], "applied");
    assert_eq!(
        status_of(&trusts_new, url.clone()).await.unwrap(),
        StatusCode::OK
    );
    // The connection made before the reload (kept alive in the old client's pool) goes on.
    assert_eq!(status_of(&trusts_old, url).await.unwrap(), StatusCode::OK);
}

/// A ttl shortened by reload applies to a page fetched before it (paused time, in-process).
#[tokio::test(start_paused = true)]
async fn a_shorter_ttl_applies_to_pages_already_cached() {
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("ttl");
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        config_text(&sim.base_url(), "[cache]\nttl = \"1h\"\n"),
    )
    .unwrap();
    let gw = Gateway::from_source_with_transport(file.clone(), sim_transport(&sim, 1 << 26))
        .expect("gateway builds");
    gw.spawn_token_refresher();
    let api = gw.client_api();
    let path = license_path(&sim.account_names()[0], 0);
    let get = |api: thingspace_gateway::api::ClientApi, path: String| async move {
        let req = http::Request::get(path)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = api.serve(req).await;
        r.headers()["x-cache"].to_str().unwrap().to_string()
    };
    assert_eq!(get(api.clone(), path.clone()).await, "MISS");
    std::fs::write(
        &file,
        config_text(
            &sim.base_url(),
            "[cache]\nttl = \"1s\"\nstale_while_revalidate = \"0s\"\n",
        ),
    )
    .unwrap();
    let r = gw.reload().await;
    assert_eq!(r.outcome, "applied", "{r:?}");
    assert_eq!(
        get(api.clone(), path.clone()).await,
        "HIT",
        "younger than 1 s"
    );
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert_eq!(
        get(api.clone(), path.clone()).await,
        "MISS",
        "older than the new ttl"
    );
    assert_eq!(sim.count_status("licenses", 200), 2);
}

/// SPEC §11 and §5: a wrong password in `password_file` pauses logins; the right one written and
/// reloaded makes exactly one login, the gateway becomes ready and serves, the account never locks.
#[tokio::test]
async fn the_right_password_file_reloaded_logs_in_once() {
    let sim = start_sim(sim_opts()).await;
    let dir = scratch("password");
    let (file, password) = (dir.join("gateway.toml"), dir.join("password"));
    std::fs::write(&password, "wrong-password\n").unwrap();
    // password_file wins over the inline password of the base config (SPEC §3).
    let text = config_text(
        &sim.base_url(),
        &format!(
            "[credentials]\npassword_file = {:?}\nmax_failed_logins = 2\nlogin_pause = \"15m\"\n",
            password.display().to_string()
        ),
    );
    std::fs::write(&file, text).unwrap();
    let gw = start_from(&file).await;
    for _ in 0..400 {
        if sim.rejected_logins() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.rejected_logins(), 2, "two rejections, then the pause");
    let ready = get(&format!("{}/readyz", gw.admin_url())).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    std::fs::write(&password, "demo-pass\n").unwrap();
    let r = reload(&gw).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    wait_ready(&gw).await;
    let page = get(&format!(
        "{}{}",
        gw.base_url(),
        license_path(&sim.account_names()[0], 0)
    ))
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        sim.count_status("session_login", 200),
        1,
        "exactly one login after the reload"
    );
    assert_eq!(sim.rejected_logins(), 2);
    assert_eq!(sim.lock_events(), 0, "the account never locked");
}

/// A gateway started from a config in memory (the demo's embedded one) has no file to re-read:
/// its reload is rejected with that reason, and nothing changes.
#[tokio::test]
async fn a_gateway_without_a_file_rejects_reloads() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    wait_ready(&gw).await;
    let r = reload(&gw).await;
    assert_eq!(r["outcome"], "rejected", "{r}");
    assert!(r["error"].as_str().unwrap().contains("no file"), "{r}");
    let status = get(&format!("{}/status", gw.admin_url())).await.json();
    assert_eq!(status["config"]["sha256"], serde_json::Value::Null);
}
