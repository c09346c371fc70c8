//! The binary as operators run it: exit codes, SIGTERM drain, and logs free of secrets.

use crate::common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thingspace_sim::SimOptions;

const BIN: &str = env!("CARGO_BIN_EXE_thingspace-gateway");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tsgw-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts `serve` with JSON logs; returns the child, its client address, and its log lines.
fn spawn_gateway(
    config: &std::path::Path,
    rust_log: &str,
) -> (Child, String, String, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = lines.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("thingspace-gateway serving") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = tx.send((
                    v["fields"]["listen"].as_str().unwrap().to_string(),
                    v["fields"]["admin"].as_str().unwrap().to_string(),
                ));
                sent = true;
            }
            sink.lock().unwrap().push(line);
        }
    });
    let (listen, admin) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway started");
    (
        child,
        format!("http://{listen}"),
        format!("http://{admin}"),
        lines,
    )
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn wait_exit(child: &mut Child) -> i32 {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("gateway did not exit");
}

#[test]
fn check_config_and_hash_secret_exit_codes() {
    let good = temp_file(
        "good.toml",
        "[cache]\nttl = \"1m\"\n[credentials]\nclient_secret = \"hidden-value\"\n",
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("ttl = \"1m\""), "{shown}");
    assert!(!shown.contains("hidden-value"));
    let bad = temp_file("bad.toml", "[cache]\nttl = \"soon\"\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ttl") && err.lines().count() == 1, "{err}");
    let open = temp_file(
        "open.toml",
        "[server]\nlisten = \"0.0.0.0:0\"\n[clients]\nmode = \"none\"\n",
    );
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&open)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("clients.mode"));
    // Login counts that would not outlive the process: refused by both commands, naming the key.
    let no_guard = temp_file(
        "no_guard.toml",
        "[upstream]\nbase_url = \"https://10.1.2.3\"\n[credentials]\nguard_file = \"\"\n",
    );
    for cmd in ["check-config", "serve"] {
        let out = Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&no_guard)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("credentials.guard_file") && err.lines().count() == 1,
            "{err}"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let mut child = Command::new(BIN)
        .arg("hash-secret")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret-s3cret-s3cret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        thingspace_gateway::clients::sha256_hex("s3cret-s3cret-s3cret")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_fifty_slow_requests_and_exits_zero() {
    let sim = start_sim(SimOptions {
        latency: Duration::from_millis(1500),
        ..sim_opts()
    })
    .await;
    let cfg = temp_file(
        "drain.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"20s\"\n\
             [upstream]\nbase_url = \"{}\"\nrate_per_second = 1000.0\nburst = 1000\nmax_concurrent = 64\n\
             [credentials]\nclient_id = \"demo-key\"\nclient_secret = \"demo-secret\"\nusername = \"demo-user\"\npassword = \"demo-pass\"\nguard_file = \"\"\n\
             [clients]\nmode = \"none\"\n[log]\nformat = \"json\"\n",
            sim.base_url()
        ),
    );
    let (mut child, base, _admin, _logs) = spawn_gateway(&cfg, "info");
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let http = Arc::new(Http::new());
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let http = http.clone();
            let url = format!("{base}{}", license_path(&account, imeis[i]));
            tokio::spawn(async move { http.get(&url).await.status })
        })
        .collect();
    // Let them all reach the (slow) upstream, then ask the gateway to stop.
    for _ in 0..100 {
        if sim.stats()["inflight"].as_u64().unwrap_or(0) >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&child);
    for t in tasks {
        assert_eq!(t.await.unwrap(), http::StatusCode::OK);
    }
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_status_and_errors_carry_no_secret() {
    let client_secret = "cs-9f8e7d6c5b4a";
    let password = "pw-1a2b3c4d5e6f";
    let gateway_client_secret = "gcs-0011223344";
    let sim = start_sim(SimOptions {
        client_secret: client_secret.into(),
        password: password.into(),
        ..sim_opts()
    })
    .await;
    let account = sim.account_names()[0].clone();
    let secret_file = temp_file("client_secret", &format!("{client_secret}\n"));
    let cfg = temp_file(
        "secrets.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\n\
             [credentials]\nclient_id = \"demo-key\"\nclient_secret_file = {:?}\nusername = \"demo-user\"\npassword = \"{password}\"\nguard_file = \"\"\n\
             [clients]\nmode = \"required\"\ntoken_signing_key = \"signing-key-77-0123456789abcdef0123\"\n\
             [[clients.client]]\nid = \"app\"\nsecret_sha256 = \"{}\"\naccounts = [\"*\"]\n[log]\nformat = \"json\"\n",
            sim.base_url(),
            secret_file.display().to_string(),
            thingspace_gateway::clients::sha256_hex(gateway_client_secret),
        ),
    );
    let (mut child, base, admin, logs) = spawn_gateway(&cfg, "trace");
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("app:{gateway_client_secret}")
        )
    );
    let tok = request(
        http::Method::POST,
        &format!("{base}/api/ts/v1/oauth2/token"),
        &[("authorization", &basic)],
        b"grant_type=client_credentials",
    )
    .await;
    let gw_token = tok.json()["access_token"].as_str().unwrap().to_string();
    let r = get_with(
        &format!("{base}{}", license_path(&account, 0)),
        &[("authorization", &format!("Bearer {gw_token}"))],
    )
    .await;
    assert_eq!(r.status, http::StatusCode::OK);
    let bad = get_with(
        &format!("{base}{}", license_path(&account, 0)),
        &[("authorization", &basic.replace('A', "B"))],
    )
    .await;
    let status = get(&format!("{admin}/status")).await;
    let metrics = get(&format!("{admin}/metrics")).await;
    let upstream_headers = sim.last_headers("licenses");
    let bearer = upstream_headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1
        .clone();
    let session = upstream_headers
        .iter()
        .find(|(k, _)| k == "vz-m2m-token")
        .unwrap()
        .1
        .clone();
    sigterm(&child);
    assert_eq!(
        tokio::task::spawn_blocking(move || wait_exit(&mut child))
            .await
            .unwrap(),
        0
    );
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.len() > 1000, "trace logging produced output");
    // One access line per request, with its route, cache result and upstream attempts.
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .collect();
    assert_eq!(access.len(), 3, "token, page, refused page");
    assert!(access
        .iter()
        .any(|l| l.contains("\"upstream_attempts\":1") && l.contains("\"cache\":\"MISS\"")));
    assert!(access
        .iter()
        .all(|l| l.contains("\"request_id\"") && l.contains("\"duration_ms\"")));
    let upstream_basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("demo-key:{client_secret}"),
    );
    let secrets = [
        client_secret,
        password,
        gateway_client_secret,
        "signing-key-77",
        &gw_token,
        bearer.trim_start_matches("Bearer "),
        &session,
        &upstream_basic,
        basic.trim_start_matches("Basic "),
    ];
    for s in secrets {
        assert!(!logs.contains(s), "a secret reached the logs: {s}");
        for body in [&bad.body, &status.body, &metrics.body, &r.body] {
            assert!(
                !String::from_utf8_lossy(body).contains(s),
                "a secret reached a response: {s}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_guard_file_is_refused() {
    let sim = start_sim(sim_opts()).await;
    let dir = std::env::temp_dir().join(format!("tsgw-proc-guard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let guard = dir.join("gateway.guard");
    let cfg = temp_file(
        "guarded.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\n\
             [credentials]\nclient_id = \"demo-key\"\nclient_secret = \"demo-secret\"\nusername = \"demo-user\"\npassword = \"demo-pass\"\nguard_file = {:?}\n\
             [clients]\nmode = \"none\"\n[log]\nformat = \"json\"\n",
            sim.base_url(),
            guard.display().to_string(),
        ),
    );
    let (mut first, _base, admin, _logs) = spawn_gateway(&cfg, "info");
    for _ in 0..200 {
        if get(&format!("{admin}/readyz")).await.status == http::StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("credentials.guard_file") && err.contains("in use by another gateway process"),
        "{err}"
    );
    sigterm(&first);
    assert_eq!(
        tokio::task::spawn_blocking(move || wait_exit(&mut first))
            .await
            .unwrap(),
        0
    );
    // The numbers were written before the login and after it: one accepted login, none counted.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&guard).unwrap()).unwrap();
    assert_eq!(written["users"]["demo-user"]["attempts"], 0);
    assert!(!String::from_utf8_lossy(&std::fs::read(&guard).unwrap()).contains("demo-pass"));
    assert_eq!(sim.count("session_login"), 1);
    assert_eq!(sim.lock_events(), 0);
}

/// SIGHUP reloads the file (SPEC §11): the new `log.level` and ttl apply, the process keeps
/// serving, and `/status` shows the new file's hash.
#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let sim = start_sim(sim_opts()).await;
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\n\
         [credentials]\nclient_id = \"demo-key\"\nclient_secret = \"demo-secret\"\n\
         username = \"demo-user\"\npassword = \"demo-pass\"\nguard_file = \"\"\n\
         [clients]\nmode = \"none\"\n[log]\nformat = \"json\"\n",
        sim.base_url()
    );
    let file = temp_file("sighup.toml", &format!("{base}level = \"info\"\n"));
    // Without RUST_LOG, so that log.level rules.
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut admin = String::new();
    let mut listen = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if line.contains("thingspace-gateway serving") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            listen = format!("http://{}", v["fields"]["listen"].as_str().unwrap());
            admin = format!("http://{}", v["fields"]["admin"].as_str().unwrap());
            break;
        }
    }
    assert!(!admin.is_empty(), "gateway started");
    let page_path = license_path(&sim.account_names()[0], 0);
    let access_lines = |rx: &std::sync::mpsc::Receiver<String>| {
        let mut n = 0;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            n += usize::from(line.contains("\"target\":\"access\""));
        }
        n
    };
    assert_eq!(
        get(&format!("{listen}{page_path}")).await.status,
        http::StatusCode::OK
    );
    assert_eq!(access_lines(&rx), 1, "log.level info: one access line");
    let before = get(&format!("{admin}/status")).await.json()["config"]["sha256"].clone();
    std::fs::write(
        &file,
        format!("{base}level = \"warn\"\n[cache]\nttl = \"2m\"\n"),
    )
    .unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut reloaded = false;
    for _ in 0..200 {
        let status = get(&format!("{admin}/status")).await.json();
        if status["config"]["sha256"] != before {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reloaded, "the new file's hash shows in /status");
    let _ = access_lines(&rx);
    let page = get(&format!("{listen}{page_path}")).await;
    assert_eq!(page.status, http::StatusCode::OK);
    assert!(
        page.header("cache-control")
            .starts_with("private, max-age=1"),
        "ttl 2m applied"
    );
    assert_eq!(
        access_lines(&rx),
        0,
        "log.level warn applied: no access line"
    );
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
}
