//! The fleet's budget, cooldown and circuit as Lua scripts on Redis's clock (`TIME`), and the
//! one reply shape they all share.
//!
//! Every script takes the same five keys ([`Keys`]) and the same first six arguments (the
//! caller's parameters and whether to store them, [`Params::args`]), so the parameters in force
//! travel with the state they govern and a Redis that lost them takes the caller's. Every
//! script answers the fleet's state after it ran ([`Reply`]): a replica's mirror of the
//! cooldown and the circuit is current after each round trip.
//!
//! Numbers cross as strings: Lua numbers are doubles, and `redis.call` turns a number argument
//! into text with 14 significant digits, which would round a microsecond timestamp; the
//! scripts format with `%.0f`.

use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// Key suffixes under `redis.key_prefix` (FLEET.md: `budget:*`, `cooldown`, `circuit:*`).
pub const KEY_SUFFIXES: [&str; 5] = [
    "budget:params",
    "budget:tat",
    "budget:leases",
    "cooldown",
    "circuit:state",
];

/// Shared by every script: keys, Redis's clock, the parameters in force (stored first when the
/// caller applies its own or Redis has none), and `state(code, wait)`, the reply.
const PRELUDE: &str = r#"
local K_PARAMS, K_TAT, K_LEASES, K_COOLDOWN, K_CIRCUIT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local function fmt(x) return string.format('%.0f', x) end
if ARGV[6] == '1' or redis.call('EXISTS', K_PARAMS) == 0 then
  redis.call('HSET', K_PARAMS, 'rate', ARGV[1], 'burst', ARGV[2], 'max_concurrent', ARGV[3],
    'circuit_failures', ARGV[4], 'circuit_open_for_ms', ARGV[5])
end
local p = redis.call('HMGET', K_PARAMS, 'rate', 'burst', 'max_concurrent', 'circuit_failures',
  'circuit_open_for_ms')
local rate = tonumber(p[1]) or tonumber(ARGV[1])
local burst = tonumber(p[2]) or tonumber(ARGV[2])
local maxc = tonumber(p[3]) or tonumber(ARGV[3])
local threshold = tonumber(p[4]) or tonumber(ARGV[4])
local open_for = tonumber(p[5]) or tonumber(ARGV[5])
if not (rate and rate > 0) then rate = 0.001 end
local T = 1000000 / rate
local known_tat = 0
local function state(code, wait)
  local cd = tonumber(redis.call('GET', K_COOLDOWN)) or 0
  local c = redis.call('HMGET', K_CIRCUIT, 'failures', 'open_until')
  local open_until = tonumber(c[2]) or 0
  local open_left = -1
  if open_until > 0 then open_left = math.max(open_until - now_ms, 0) end
  local tat = math.max(tonumber(redis.call('GET', K_TAT)) or 0, known_tat, now)
  local avail = math.min(math.max(burst - (tat - now) / T, 0), burst)
  return {code, fmt(wait), fmt(math.max(cd - now_ms, 0)), fmt(open_left),
    fmt(tonumber(c[1]) or 0), tostring(rate), fmt(burst), fmt(maxc), fmt(threshold),
    fmt(open_for), fmt(tat), fmt(avail * 1000), fmt(now_ms)}
end
"#;

/// One attempt's admission: the shared cooldown, the circuit (and its one half-open probe per
/// fleet, a lease in the circuit's hash), a concurrency lease (a sorted set scored by expiry,
/// so a dead holder's slot frees itself) and a GCRA token, all or nothing.
/// ARGV[7] lease id, ARGV[8] lease ttl (ms), ARGV[9] the highest TAT the caller has seen (µs:
/// a Redis that restarted empty does not hand out a fresh burst), ARGV[10] the last moment on
/// Redis's clock the caller can still be waiting for the answer (0: unknown). A hung Redis
/// (SIGSTOP) runs the commands queued on its socket when it resumes, long after their callers
/// gave up: those must not take tokens and slots nobody will use or release.
const ACQUIRE: &str = r#"
local valid_until = tonumber(ARGV[10]) or 0
if valid_until > 0 and now_ms > valid_until then return state('stale', 0) end
local lease_ttl = tonumber(ARGV[8])
known_tat = math.min(tonumber(ARGV[9]) or 0, now + burst * T)
local cd = tonumber(redis.call('GET', K_COOLDOWN)) or 0
if cd > now_ms then return state('cooldown', cd - now_ms) end
local c = redis.call('HMGET', K_CIRCUIT, 'open_until', 'probe', 'probe_until')
local open_until = tonumber(c[1]) or 0
local probe = false
if open_until > 0 then
  if open_until > now_ms then return state('open', open_until - now_ms) end
  if c[2] and (tonumber(c[3]) or 0) > now_ms then return state('probing', 1000) end
  probe = true
end
redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', fmt(now_ms))
if redis.call('ZCARD', K_LEASES) >= maxc then
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
  return state('slots', math.max((tonumber(first[2]) or now_ms) - now_ms, 1))
end
local tat = math.max(tonumber(redis.call('GET', K_TAT)) or 0, known_tat, now)
local new_tat = tat + T
local allow_at = new_tat - burst * T
if allow_at > now then return state('rate', math.max(math.ceil((allow_at - now) / 1000), 1)) end
redis.call('SET', K_TAT, fmt(new_tat), 'PX', fmt(math.ceil((new_tat - now) / 1000) + 1000))
redis.call('ZADD', K_LEASES, fmt(now_ms + lease_ttl), ARGV[7])
if redis.call('PTTL', K_LEASES) < lease_ttl + 1000 then
  redis.call('PEXPIRE', K_LEASES, fmt(lease_ttl + 1000))
end
if probe then
  redis.call('HSET', K_CIRCUIT, 'probe', ARGV[7], 'probe_until', fmt(now_ms + lease_ttl))
  return state('probe', 0)
end
return state('ok', 0)
"#;

/// An attempt's outcome: ARGV[7] `s` success, `f` failure, `n` neither; ARGV[8] the probe's
/// lease id, or empty for an ordinary attempt. Same rules as the in-process circuit: a success
/// closes it, a failure counts and opens it at the threshold (a probe's failure at once).
const RECORD: &str = r#"
local c = redis.call('HMGET', K_CIRCUIT, 'failures', 'probe')
local failures = tonumber(c[1]) or 0
local is_probe = ARGV[8] ~= ''
if is_probe and c[2] == ARGV[8] then redis.call('HDEL', K_CIRCUIT, 'probe', 'probe_until') end
if ARGV[7] == 's' then
  redis.call('HSET', K_CIRCUIT, 'failures', '0')
  redis.call('HDEL', K_CIRCUIT, 'open_until')
elseif ARGV[7] == 'f' then
  failures = failures + 1
  redis.call('HSET', K_CIRCUIT, 'failures', fmt(failures))
  if is_probe or failures >= threshold then
    redis.call('HSET', K_CIRCUIT, 'open_until', fmt(now_ms + open_for))
  end
end
return state('recorded', 0)
"#;

/// A permit dropped: its lease leaves the set; a probe that ended without an outcome is given
/// back. ARGV[7] the lease id.
const RELEASE: &str = r#"
redis.call('ZREM', K_LEASES, ARGV[7])
if redis.call('HGET', K_CIRCUIT, 'probe') == ARGV[7] then
  redis.call('HDEL', K_CIRCUIT, 'probe', 'probe_until')
end
return state('released', 0)
"#;

/// The cooldown moved later (never earlier) to now + ARGV[7] ms (0: unchanged); also how a
/// replica stores its parameters and learns the state when it joins or applies a config.
const SYNC: &str = r#"
local ms = tonumber(ARGV[7]) or 0
if ms > 0 then
  local cd = tonumber(redis.call('GET', K_COOLDOWN)) or 0
  if now_ms + ms > cd then
    redis.call('SET', K_COOLDOWN, fmt(now_ms + ms), 'PXAT', fmt(now_ms + ms))
  end
end
return state('synced', 0)
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(ACQUIRE));
pub static RECORD_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RECORD));
pub static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RELEASE));
pub static SYNC_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SYNC));

/// The numbers a replica applies, and the fleet's in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub rate_per_second: f64,
    pub burst: u32,
    pub max_concurrent: usize,
    pub circuit_failures: u32,
    pub circuit_open_for: Duration,
}

impl Params {
    /// ARGV[1..=6].
    pub fn args(&self, apply: bool) -> Vec<String> {
        vec![
            self.rate_per_second.to_string(),
            self.burst.to_string(),
            self.max_concurrent.to_string(),
            self.circuit_failures.to_string(),
            self.circuit_open_for.as_millis().to_string(),
            if apply { "1" } else { "0" }.to_string(),
        ]
    }
}

/// What the script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A permit (`probe`: the fleet's one half-open trial).
    Granted {
        probe: bool,
    },
    Cooldown,
    Open,
    /// Half-open, and another attempt holds the probe.
    Probing,
    /// Every slot is leased.
    Slots,
    /// No token yet.
    Rate,
    /// A write or sync: nothing was asked.
    State,
    /// Run after its caller gave up (a hung Redis resumed, or the caller's idea of Redis's
    /// clock is off): nothing taken; ask again.
    Stale,
}

/// Every script's answer: its code, and the fleet's state after it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub code: Code,
    /// For a refusal or a wait: how long until it may change.
    pub wait: Duration,
    /// Zero when no cooldown runs.
    pub cooldown_left: Duration,
    /// `None` closed; `Some(ZERO)` half-open; `Some(d)` open `d` more.
    pub open_left: Option<Duration>,
    pub failures: u32,
    pub params: Params,
    /// The GCRA's theoretical arrival time (µs on Redis's clock).
    pub tat: u64,
    /// Tokens left in the fleet's bucket.
    pub available: f64,
    /// Redis's clock when the script ran (ms).
    pub now_ms: u64,
}

impl Reply {
    /// `None` for any other shape (a reply that cannot be trusted counts as a Redis failure).
    pub fn parse(raw: &[String]) -> Option<Reply> {
        let [code, wait, cooldown, open, failures, rate, burst, maxc, threshold, open_for, tat, avail, now_ms] =
            raw
        else {
            return None;
        };
        let ms = |s: &String| s.parse::<u64>().ok().map(Duration::from_millis);
        let code = match code.as_str() {
            "ok" => Code::Granted { probe: false },
            "probe" => Code::Granted { probe: true },
            "cooldown" => Code::Cooldown,
            "open" => Code::Open,
            "probing" => Code::Probing,
            "slots" => Code::Slots,
            "rate" => Code::Rate,
            "stale" => Code::Stale,
            "recorded" | "released" | "synced" => Code::State,
            _ => return None,
        };
        let open_left = match open.parse::<i64>().ok()? {
            n if n < 0 => None,
            n => Some(Duration::from_millis(n.unsigned_abs())),
        };
        let rate_per_second = rate
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)?;
        Some(Reply {
            code,
            wait: ms(wait)?,
            cooldown_left: ms(cooldown)?,
            open_left,
            failures: failures.parse().ok()?,
            params: Params {
                rate_per_second,
                burst: burst.parse().ok()?,
                max_concurrent: maxc.parse().ok()?,
                circuit_failures: threshold.parse().ok()?,
                circuit_open_for: ms(open_for)?,
            },
            tat: tat.parse().ok()?,
            available: avail.parse::<f64>().ok()? / 1000.0,
            now_ms: now_ms.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replies_parse_and_odd_shapes_do_not() {
        let r = Reply::parse(&raw(&[
            "probe",
            "0",
            "1500",
            "0",
            "3",
            "2.5",
            "9",
            "6",
            "3",
            "1000",
            "1700000000000000",
            "4500",
            "1700000000000",
        ]))
        .unwrap();
        assert_eq!(r.code, Code::Granted { probe: true });
        assert_eq!(r.cooldown_left, Duration::from_millis(1500));
        assert_eq!(r.open_left, Some(Duration::ZERO));
        assert_eq!(r.params.rate_per_second, 2.5);
        assert_eq!(r.params.circuit_open_for, Duration::from_secs(1));
        assert_eq!(r.tat, 1_700_000_000_000_000);
        assert_eq!(r.available, 4.5);
        let closed = Reply::parse(&raw(&[
            "rate", "100", "0", "-1", "0", "10", "9", "6", "3", "1000", "1", "0", "5",
        ]))
        .unwrap();
        assert_eq!((closed.code, closed.open_left), (Code::Rate, None));
        assert!(Reply::parse(&raw(&["ok"])).is_none());
        assert!(Reply::parse(&raw(&[
            "what", "0", "0", "-1", "0", "10", "9", "6", "3", "1000", "1", "0", "5",
        ]))
        .is_none());
        assert!(Reply::parse(&raw(&[
            "ok", "0", "0", "-1", "0", "nan", "9", "6", "3", "1000", "1", "0", "5",
        ]))
        .is_none());
    }
}
