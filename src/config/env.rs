//! The environment's part of the config: `THINGSPACE_GATEWAY_<SECTION>__<KEY>` overrides, the
//! credential variables, and secret files.

use super::{err, Config, ConfigError, ENV_PREFIX};
use crate::secret::{strip_line_ending, Secret};

/// `THINGSPACE_GATEWAY_UPSTREAM__BASE_URL=...` sets `upstream.base_url`. The value is typed by
/// the key's default, so `"0123"` stays a string where the key is a string.
pub(super) fn apply_env_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| err(format!("internal: defaults do not serialize: {e}")))?;
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest == "TOKEN_KEY" || rest == "ADMIN_TOKEN" {
            continue; // handled by resolve_credentials
        }
        let Some((section, key)) = rest.split_once("__") else {
            return Err(err(format!(
                "{name}: expected {ENV_PREFIX}<SECTION>__<KEY>"
            )));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let default = defaults
            .get(&section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(&key))
            .ok_or_else(|| err(format!("{name}: unknown key {section}.{key}")))?;
        let value = match default {
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .ok_or_else(|| err(format!("{name}: not a valid value for {section}.{key}")))?,
        };
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry.as_table_mut() {
            Some(t) => {
                t.insert(key, value);
            }
            None => return Err(err(format!("{section}: must be a table"))),
        }
    }
    Ok(())
}

fn env_get<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// The file's whole text with one trailing line ending removed (SPEC §3): a password that ends in
/// a space keeps its space, or the gateway would send a wrong password (a rejected login).
fn read_secret_file(key: &str, path: &std::path::Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("{key}: {}: {e}", path.display())))?;
    Ok(Secret::new(strip_line_ending(&text)))
}

/// Env wins over file, file over inline.
pub(super) fn resolve_credentials(
    cfg: &mut Config,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let Config {
        credentials: c,
        clients,
        server,
        redis,
        ..
    } = cfg;
    if let Some(v) = env_get(env, "THINGSPACE_CLIENT_ID") {
        c.client_id = v.to_string();
    }
    if let Some(v) = env_get(env, "THINGSPACE_USERNAME") {
        c.username = v.to_string();
    }
    if let Some(v) = env_get(env, "THINGSPACE_CLIENT_SECRET") {
        c.client_secret = Secret::new(v);
    } else if let Some(path) = &c.client_secret_file {
        c.client_secret = read_secret_file("credentials.client_secret_file", path)?;
    }
    if let Some(v) = env_get(env, "THINGSPACE_PASSWORD") {
        c.password = Secret::new(v);
    } else if let Some(path) = &c.password_file {
        c.password = read_secret_file("credentials.password_file", path)?;
    }
    if let Some(v) = env_get(env, "THINGSPACE_GATEWAY_TOKEN_KEY") {
        clients.token_signing_key = Secret::new(v);
    }
    if let Some(v) = env_get(env, "THINGSPACE_GATEWAY_ADMIN_TOKEN") {
        server.admin_token = Secret::new(v);
    }
    // THINGSPACE_GATEWAY_REDIS__URL arrived as an override of `redis.url` already.
    if env_get(env, "THINGSPACE_GATEWAY_REDIS__URL").is_none() {
        if let Some(path) = &redis.url_file {
            redis.url = read_secret_file("redis.url_file", path)?;
        }
    }
    Ok(())
}

/// The dotted keys the environment sets (generic overrides and the short names of secrets).
pub(super) fn shadowed_keys(env: &[(String, String)]) -> Vec<String> {
    const SHORT: [(&str, &[&str]); 6] = [
        ("THINGSPACE_CLIENT_ID", &["credentials.client_id"]),
        (
            "THINGSPACE_CLIENT_SECRET",
            &[
                "credentials.client_secret",
                "credentials.client_secret_file",
            ],
        ),
        ("THINGSPACE_USERNAME", &["credentials.username"]),
        (
            "THINGSPACE_PASSWORD",
            &["credentials.password", "credentials.password_file"],
        ),
        (
            "THINGSPACE_GATEWAY_TOKEN_KEY",
            &["clients.token_signing_key"],
        ),
        ("THINGSPACE_GATEWAY_ADMIN_TOKEN", &["server.admin_token"]),
    ];
    let mut keys = Vec::new();
    for (name, value) in env {
        if value.is_empty() {
            continue;
        }
        if let Some((_, shadowed)) = SHORT.iter().find(|(short, _)| short == name) {
            keys.extend(shadowed.iter().map(|k| k.to_string()));
        } else if let Some((section, key)) = name
            .strip_prefix(ENV_PREFIX)
            .and_then(|rest| rest.split_once("__"))
        {
            keys.push(format!(
                "{}.{}",
                section.to_ascii_lowercase(),
                key.to_ascii_lowercase()
            ));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_lose_one_line_ending_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("tsgw-secret-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (text, secret)) in [
            ("pass word \t\n", "pass word \t"),
            ("  pass\r\n", "  pass"),
            ("pass\n\n", "pass\n"),
            ("pass ", "pass "),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("s{i}"));
            std::fs::write(&path, text).unwrap();
            let got = read_secret_file("credentials.password_file", &path).unwrap();
            assert_eq!(got.expose(), secret, "{text:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_env_value_is_not_echoed() {
        let env = vec![(
            "THINGSPACE_GATEWAY_UPSTREAM__BURST".to_string(),
            "Hunter2-not-a-number".to_string(),
        )];
        let e = apply_env_overrides(&mut toml::Table::new(), &env).unwrap_err();
        assert!(e.0.contains("upstream.burst"), "{e}");
        assert!(!e.0.contains("Hunter2"), "{e}");
    }

    #[test]
    fn shadowed_keys_name_what_the_environment_sets() {
        let env: Vec<(String, String)> = [
            ("THINGSPACE_PASSWORD", "x"),
            ("THINGSPACE_GATEWAY_CACHE__TTL", "1s"),
            ("THINGSPACE_USERNAME", ""),
            ("PATH", "/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            super::shadowed_keys(&env),
            vec![
                "cache.ttl",
                "credentials.password",
                "credentials.password_file"
            ]
        );
    }
}
