//! The fleet's token and guard scripts (SPEC §10), each one atomic on Redis and on Redis's clock
//! (`TIME`), loaded by SHA (`EVALSHA`, reloaded on `NOSCRIPT` after a Redis restart).
//!
//! A guard hash (`guard:{session|oauth}:{id}`) holds SPEC §5's numbers for one ThingSpace user
//! (or OAuth client): `ep` (the epoch: Redis's time of the last accepted login or reset), `rej`,
//! `att`, `pause` (ms, Redis's clock), `stop`, `lock`, plus `born` (when the hash was created),
//! `boff`/`bstep` (the fleet's backoff after transient failures) and `fps` (fingerprints of the
//! credentials tried since the last accepted login). It has no expiry.
//!
//! Every guard script first merges the caller's remembered numbers (`ARGV[1..6]`: ep, rej, att,
//! pause, stop, lock): a later epoch wins whole (an accepted login or a reset the other side has
//! not seen), within one epoch each number takes the maximum. So a Redis that lost the hash
//! (restart, failover, `FLUSHALL`) gets the count back from any replica that saw it, and a reset
//! is never undone by a replica that remembers the numbers from before it.
//!
//! Replies are `{code, ep, rej, att, pause, stop, lock, now, extra, lift}` (integers): see
//! [`super::Code`].

use redis::Script;
use std::sync::LazyLock;

/// Shared by the guard scripts: the clock, the merge, the write-back and the reply.
const GUARD_PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local F = {'ep', 'rej', 'att', 'pause', 'stop', 'lock', 'born', 'boff', 'bstep'}
local function load(now, cap)
  local h = redis.call('HMGET', KEYS[1], 'ep', 'rej', 'att', 'pause', 'stop', 'lock', 'born',
    'boff', 'bstep', 'fps')
  local g = {}
  for i, f in ipairs(F) do g[f] = tonumber(h[i]) or 0 end
  g.fps = h[10] or ''
  if not h[7] then g.born = now end
  local c = {}
  for i = 1, 6 do c[F[i]] = tonumber(ARGV[i]) or 0 end
  if c.ep > g.ep then
    for i = 1, 6 do g[F[i]] = c[F[i]] end
  elseif c.ep == g.ep then
    for i = 2, 6 do g[F[i]] = math.max(g[F[i]], c[F[i]]) end
  end
  if g.pause > now + cap then g.pause = now + cap end
  return g
end
local function save(g)
  redis.call('HSET', KEYS[1], 'ep', g.ep, 'rej', g.rej, 'att', g.att, 'pause', g.pause,
    'stop', g.stop, 'lock', g.lock, 'born', g.born, 'boff', g.boff, 'bstep', g.bstep,
    'fps', g.fps)
end
local function tried(g, fp)
  return string.find(',' .. g.fps .. ',', ',' .. fp .. ',', 1, true) ~= nil
end
local function reply(code, g, now, extra, fp)
  local lift = 0
  if g.fps ~= '' and not tried(g, fp) then lift = 1 end
  return {code, g.ep, g.rej, g.att, g.pause, g.stop, g.lock, now, extra, lift}
end
local function fresh_epoch(g, now)
  g.ep = math.max(now, g.ep + 1)
  g.rej = 0
  g.pause = 0
  g.stop = 0
  g.lock = 0
  g.boff = 0
  g.bstep = 0
  g.fps = ''
end
"#;

/// Finds a token newer than the caller knows (another replica's call just ended: no call
/// needed); else checks the stop, the pause (lifted for credentials not tried since the last
/// accepted login), the fleet's backoff and, for a fresh hash, the grace that lets live
/// replicas restore the count; then grants the lease, charges the attempt and returns the
/// fence, all at once. KEYS: guard, lease, token. ARGV 7..: fp, charged (1/0), lease ms,
/// owner, pause cap ms, grace ms, stop-at attempts, known fence, least useful token ttl ms.
const BEGIN: &str = r#"
local now = now_ms()
local g = load(now, tonumber(ARGV[11]))
local fp = ARGV[7]
local v = tonumber(redis.call('HGET', KEYS[3], 'v')) or 0
if v > tonumber(ARGV[14]) and redis.call('PTTL', KEYS[3]) > tonumber(ARGV[15]) then
  save(g)
  return reply(7, g, now, v, fp)
end
local charged = ARGV[8] == '1'
if charged and (g.stop == 1 or g.att >= tonumber(ARGV[13])) then
  save(g)
  return reply(4, g, now, 0, fp)
end
local lifted = g.fps ~= '' and not tried(g, fp)
if g.pause > now and not lifted then
  save(g)
  return reply(3, g, now, g.pause - now, fp)
end
if g.boff > now then
  save(g)
  return reply(5, g, now, g.boff - now, fp)
end
local ready_at = g.born + tonumber(ARGV[12])
if charged and now < ready_at then
  save(g)
  return reply(2, g, now, ready_at - now, fp)
end
local held = redis.call('PTTL', KEYS[2])
if held > 0 then
  save(g)
  return reply(1, g, now, held, fp)
end
redis.call('SET', KEYS[2], ARGV[10], 'PX', ARGV[9])
if charged then g.att = g.att + 1 end
if not tried(g, fp) then
  if g.fps == '' then g.fps = fp else g.fps = g.fps .. ',' .. fp end
end
save(g)
return reply(0, g, now, math.max(now, v + 1), fp)
"#;

/// Settles a token call: `a` accepted (a new epoch, numbers to zero), `r` rejected (pause at
/// max_failed in a row; stop at the attempts limit), `l` locked (stop), `n` nothing; then the
/// refund of an unjudged attempt and a backoff step; releases the caller's lease unless it was
/// accepted (the token's publication releases it). KEYS: guard, lease. ARGV 7..: event, refund,
/// backoff, charged, max_failed, pause ms, pause cap ms, stop-at, backoff base ms, backoff cap
/// ms, jitter (per mille), owner, fp.
const SETTLE: &str = r#"
local now = now_ms()
local g = load(now, tonumber(ARGV[13]))
local ev = ARGV[7]
local charged = ARGV[10] == '1'
if ev == 'a' then
  fresh_epoch(g, now)
  g.att = 0
elseif ev == 'r' then
  g.rej = g.rej + 1
  if charged and (g.stop == 1 or g.att >= tonumber(ARGV[14])) then
    g.stop = 1
  elseif g.rej >= tonumber(ARGV[11]) then
    g.pause = now + tonumber(ARGV[12])
  end
elseif ev == 'l' then
  g.rej = g.rej + 1
  g.lock = 1
  g.stop = 1
end
if ARGV[8] == '1' and charged and g.att > 0 then g.att = g.att - 1 end
local wait = 0
if ARGV[9] == '1' then
  local step = math.min(tonumber(ARGV[16]), tonumber(ARGV[15]) * 2 ^ g.bstep)
  wait = math.floor(step / 2 + step / 2 * tonumber(ARGV[17]) / 1000)
  g.bstep = g.bstep + 1
  g.boff = math.max(g.boff, now + wait)
end
save(g)
if ev ~= 'a' and redis.call('GET', KEYS[2]) == ARGV[18] then redis.call('DEL', KEYS[2]) end
return reply(6, g, now, wait, ARGV[19])
"#;

/// Pushes the caller's numbers (by the merge) and returns the fleet's. KEYS: guard. ARGV 7..:
/// pause cap ms, fp.
const SYNC: &str = r#"
local now = now_ms()
local g = load(now, tonumber(ARGV[7]))
save(g)
return reply(6, g, now, 0, ARGV[8])
"#;

/// `POST /credentials/reset`: a new epoch with `att` at the reset value. KEYS: guard. ARGV 7..:
/// pause cap ms, reset attempts, fp.
const RESET: &str = r#"
local now = now_ms()
local g = load(now, tonumber(ARGV[7]))
fresh_epoch(g, now)
g.att = tonumber(ARGV[8])
save(g)
return reply(6, g, now, 0, ARGV[9])
"#;

/// Writes a sealed token unless a newer one (a higher fence) is there, and releases the
/// writer's lease. KEYS: token, lease. ARGV: fence, sealed, ttl ms, owner ('' for none).
const PUBLISH: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
local wrote = 0
if tonumber(ARGV[1]) >= v and tonumber(ARGV[3]) > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 's', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  wrote = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return wrote
"#;

/// Writes a sealed token only where none is (a replica that rejoined offers what it holds).
/// KEYS: token. ARGV: fence, sealed, ttl ms.
const OFFER: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 or tonumber(ARGV[3]) <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Deletes the token of one fence (the upstream refused it). KEYS: token. ARGV: fence.
const INVALIDATE: &str = r#"
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Extends the session of one fence to a later idle expiry (never shortens it). KEYS: token.
/// ARGV: fence, ttl ms.
const TOUCH: &str = r#"
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] then
  local p = redis.call('PTTL', KEYS[1])
  if p > 0 and p < tonumber(ARGV[2]) then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
end
return 0
"#;

fn guard_script(body: &str) -> Script {
    Script::new(&format!("{GUARD_PRELUDE}{body}"))
}

pub(super) static BEGIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| guard_script(BEGIN));
pub(super) static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| guard_script(SETTLE));
pub(super) static SYNC_SCRIPT: LazyLock<Script> = LazyLock::new(|| guard_script(SYNC));
pub(super) static RESET_SCRIPT: LazyLock<Script> = LazyLock::new(|| guard_script(RESET));
pub(super) static PUBLISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH));
pub(super) static OFFER_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(OFFER));
pub(super) static INVALIDATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(INVALIDATE));
pub(super) static TOUCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TOUCH));
pub(super) static RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(crate::fleet::LEASE_RELEASE));
pub(super) static RENEW_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(crate::fleet::LEASE_RENEW));
