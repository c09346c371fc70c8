//! The shipped config files and the valid/invalid fixtures.

use thingspace_gateway::config::{from_toml_with_env, Config};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn documented_example_is_exactly_the_defaults() {
    let from_file = from_toml_with_env(&read("config/gateway.toml"), &[]).unwrap();
    assert_eq!(
        toml::to_string(&from_file).unwrap(),
        toml::to_string(&Config::default()).unwrap(),
        "config/gateway.toml must show every default"
    );
    // Every key of the defaults appears in the file.
    let defaults = toml::Table::try_from(Config::default()).unwrap();
    let text = read("config/gateway.toml");
    for (section, keys) in defaults {
        assert!(
            text.contains(&format!("[{section}]")),
            "[{section}] missing"
        );
        for (key, _) in keys.as_table().unwrap() {
            if key != "client" {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} missing"
                );
            }
        }
    }
}

#[test]
fn demo_config_is_valid() {
    let c = from_toml_with_env(&read("config/demo.toml"), &[]).unwrap();
    assert_eq!(c.upstream.base_url, "http://127.0.0.1:8081");
}

/// Each invalid fixture starts with `# error: <how the error starts>` and may say
/// `# at: (line L, column C)`; the error is one line and quotes no string value of the file.
#[test]
fn fixtures() {
    for entry in std::fs::read_dir("tests/fixtures/valid").unwrap() {
        let p = entry.unwrap().path();
        from_toml_with_env(&read(p.to_str().unwrap()), &[])
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let mut n = 0;
    for entry in std::fs::read_dir("tests/fixtures/invalid").unwrap() {
        let p = entry.unwrap().path();
        let name = p.display().to_string();
        let text = read(&name);
        let e = from_toml_with_env(&text, &[]).expect_err(&name).0;
        assert_eq!(e.lines().count(), 1, "{name}: one line: {e}");
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# error: "))
            .unwrap_or_else(|| panic!("{name}: no `# error:` line"));
        assert!(e.starts_with(expected), "{name}: {e}");
        if let Some(at) = text.lines().find_map(|l| l.strip_prefix("# at: ")) {
            assert!(e.ends_with(at), "{name}: {e}");
        }
        for value in text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('"').map(|(_, v)| v.trim_end_matches('"')))
            .filter(|v| v.len() >= 6)
        {
            assert!(!e.contains(value), "{name}: {e} quotes {value:?}");
        }
        n += 1;
    }
    assert!(n >= 18);
}

const BIN: &str = env!("CARGO_BIN_EXE_thingspace-gateway");

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tsgw-config-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The token key of the shipped Kubernetes Secret example, as an operator who copies it would
/// deploy it (through the environment): `check-config` refuses it, naming the key.
#[test]
fn check_config_refuses_the_example_token_key_and_short_keys() {
    let example = read("deploy/kubernetes/single/secret.example.yaml");
    let placeholder = example
        .lines()
        .find_map(|l| l.trim().strip_prefix("token-key:"))
        .expect("token-key in the Secret example")
        .trim()
        .trim_matches('"')
        .to_string();
    let cfg = temp_config(
        "plain.toml",
        "[upstream]\nbase_url = \"http://127.0.0.1:1\"\n",
    );
    for key in [placeholder.as_str(), "replace-me-with-32-random-bytes", "x"] {
        let out = std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&cfg)
            .env("THINGSPACE_GATEWAY_TOKEN_KEY", key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains("clients.token_signing_key"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("THINGSPACE_GATEWAY_TOKEN_KEY", "k".repeat(32))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn check_config_names_line_and_column_of_a_broken_secret_line() {
    let cfg = temp_config(
        "broken.toml",
        "[credentials]\nusername = \"svc\"\npassword = \"Hunter2-secret\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("(line 3, column 27)"), "{stderr}");
    assert!(!stderr.contains("Hunter2"), "{stderr}");
}

fn hash_secret(stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .arg("hash-secret")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_secret_refuses_short_secrets() {
    for short in [
        &b""[..],
        b"\n",
        b"s3cret\n",
        b"fifteen-chars-x",
        b"fifteen-chars-x\r\n",
    ] {
        let out = hash_secret(short);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{short:?}");
        assert!(out.stdout.is_empty());
        assert!(stderr.contains("at least 16"), "{stderr}");
    }
    // 16 characters (not bytes), one line ending off, trailing spaces kept.
    for (input, secret) in [
        (&b"sixteen-chars-xx\n"[..], "sixteen-chars-xx"),
        ("sixteen-chärs-x\u{e9}".as_bytes(), "sixteen-chärs-x\u{e9}"),
        (b"sixteen-chars-x \r\n", "sixteen-chars-x "),
    ] {
        let out = hash_secret(input);
        assert_eq!(out.status.code(), Some(0), "{input:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            thingspace_gateway::clients::sha256_hex(secret)
        );
    }
}

#[test]
fn debug_output_masks_secrets() {
    let c = from_toml_with_env(
        "[credentials]\nclient_secret = \"zz-secret\"\npassword = \"zz-pass\"\n[clients]\ntoken_signing_key = \"zz-key-0123456789abcdef0123456789abcdef\"\n",
        &[],
    )
    .unwrap();
    let shown = format!("{c:?}");
    for s in ["zz-secret", "zz-pass", "zz-key"] {
        assert!(!shown.contains(s), "{s} in Debug output");
    }
}

/// A password ending in a space or a tab keeps it: trimming more than one line ending made a
/// wrong password, and a rejected login.
#[test]
fn secret_files_keep_everything_but_one_line_ending() {
    for (i, (text, secret)) in [
        ("hunter2 \n", "hunter2 "),
        ("\thunter2\t\r\n", "\thunter2\t"),
        ("hunter2\n\n", "hunter2\n"),
        ("hunter2", "hunter2"),
    ]
    .into_iter()
    .enumerate()
    {
        let file = temp_config(&format!("password-{i}"), text);
        let cfg = from_toml_with_env(
            &format!(
                "[credentials]\npassword_file = {:?}\n",
                file.display().to_string()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(cfg.credentials.password.expose(), secret, "{text:?}");
    }
}
