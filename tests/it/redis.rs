//! A real `redis-server` for the fleet tests (SPEC §10): started on a free loopback port with no
//! persistence, and the outages to test: SIGKILL, SIGSTOP/SIGCONT, a restart that lost the data.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use thingspace_gateway::runtime::Running;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// A fresh `redis-server` on a free port, answering PING.
    pub async fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("tsgw-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("redis dir");
            let mut server = RedisServer {
                child: None,
                port,
                dir,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start (is it installed? `apt-get install redis-server`)");
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping().await {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false; // exited: the port was taken
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let attempt = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), attempt).await,
            Ok(Ok(_))
        )
    }

    /// One command on a connection of its own.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.expect("redis command")
    }

    /// Every key and its value as bytes (strings, hashes, sorted sets: members and fields).
    pub async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let keys: Vec<String> = self.cmd(&["KEYS", "*"]).await;
        let mut out = Vec::new();
        for k in keys {
            let kind: String = self.cmd(&["TYPE", &k]).await;
            let value: Vec<u8> = match kind.as_str() {
                "string" => self.cmd(&["GET", &k]).await,
                "hash" => {
                    let v: Vec<Vec<u8>> = self.cmd(&["HGETALL", &k]).await;
                    v.concat()
                }
                "zset" => {
                    let v: Vec<Vec<u8>> = self.cmd(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]).await;
                    v.concat()
                }
                "set" => {
                    let v: Vec<Vec<u8>> = self.cmd(&["SMEMBERS", &k]).await;
                    v.concat()
                }
                "list" => {
                    let v: Vec<Vec<u8>> = self.cmd(&["LRANGE", &k, "0", "-1"]).await;
                    v.concat()
                }
                _ => Vec::new(),
            };
            out.push((k, value));
        }
        out
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGSTOP: the socket stays open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port, empty (no persistence): as after a crash.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// [`super::common::config_text`] plus fleet mode: `[redis]` pointing at `redis` (a command
/// timeout roomy enough for a loaded test machine) and the shared signing key fleet mode requires;
/// `extra` may set any of those too.
pub fn fleet_config_text(base_url: &str, redis: &RedisServer, extra: &str) -> String {
    let text = super::common::config_text(base_url, extra);
    let mut table: toml::Table = toml::from_str(&text).expect("config text");
    let section = |t: &mut toml::Table, name: &str| -> toml::Table {
        t.get(name)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default()
    };
    let mut r = section(&mut table, "redis");
    r.entry("url").or_insert(redis.url().into());
    r.entry("command_timeout").or_insert("250ms".into());
    table.insert("redis".into(), r.into());
    let mut c = section(&mut table, "clients");
    c.entry("token_signing_key")
        .or_insert("fleet-test-signing-key-0123456789abcdef".into());
    table.insert("clients".into(), c.into());
    toml::to_string(&table).expect("toml")
}

/// [`fleet_config_text`], parsed and validated.
pub fn fleet_config(
    base_url: &str,
    redis: &RedisServer,
    extra: &str,
) -> thingspace_gateway::config::Config {
    thingspace_gateway::config::from_toml_with_env(&fleet_config_text(base_url, redis, extra), &[])
        .expect("valid fleet test config")
}

/// Three replicas of one fleet from `cfg`, started one after another, each ready (tokens held).
pub async fn ready_replicas(cfg: &thingspace_gateway::config::Config) -> Vec<Running> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let gw = super::common::start_gateway(cfg.clone()).await;
        super::common::wait_ready(&gw).await;
        replicas.push(gw);
    }
    replicas
}
