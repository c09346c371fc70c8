//! The environment's part of the config: `THINGSPACE_GATEWAY_<SECTION>__<KEY>` overrides, the
//! credential variables, and secret files.

use super::{err, Config, ConfigError, ENV_PREFIX};
use crate::secret::Secret;

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
                .ok_or_else(|| {
                    err(format!(
                        "{name}: {raw:?} is not a valid value for {section}.{key}"
                    ))
                })?,
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

fn read_secret_file(key: &str, path: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{key}: {path}: {e}")))?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r', ' ', '\t'])))
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
    } else if !c.client_secret_file.is_empty() {
        c.client_secret =
            read_secret_file("credentials.client_secret_file", &c.client_secret_file)?;
    }
    if let Some(v) = env_get(env, "THINGSPACE_PASSWORD") {
        c.password = Secret::new(v);
    } else if !c.password_file.is_empty() {
        c.password = read_secret_file("credentials.password_file", &c.password_file)?;
    }
    if let Some(v) = env_get(env, "THINGSPACE_GATEWAY_TOKEN_KEY") {
        clients.token_signing_key = Secret::new(v);
    }
    if let Some(v) = env_get(env, "THINGSPACE_GATEWAY_ADMIN_TOKEN") {
        server.admin_token = Secret::new(v);
    }
    Ok(())
}
