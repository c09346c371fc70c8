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
        let e = from_toml_with_env(&read(p.to_str().unwrap()), &[]).expect_err(p.to_str().unwrap());
        assert_eq!(e.0.lines().count(), 1, "{}: one line: {e}", p.display());
        n += 1;
    }
    assert!(n >= 10);
}

#[test]
fn debug_output_masks_secrets() {
    let c = from_toml_with_env(
        "[credentials]\nclient_secret = \"zz-secret\"\npassword = \"zz-pass\"\n[clients]\ntoken_signing_key = \"zz-key\"\n",
        &[],
    )
    .unwrap();
    let shown = format!("{c:?}");
    for s in ["zz-secret", "zz-pass", "zz-key"] {
        assert!(!shown.contains(s), "{s} in Debug output");
    }
}
