//! The cache's one clock: wall-clock `SystemTime`, so a fetch time means the same on every host
//! that shares a store, advanced by tokio's clock, so tests with paused time move through
//! freshness windows with `tokio::time::advance`.
//!
//! `SystemTime::now()` alone would not follow paused time, and `tokio::time::Instant` alone means
//! nothing outside this process. So one anchor pair (a wall-clock reading and a tokio instant,
//! taken together once per process) maps every tokio instant onto the wall clock:
//! `wall(i) = anchor_wall + (i - anchor_instant)`. The map is affine, so a difference of two
//! readings is exactly the tokio time between them (paused or not), and a reading taken before
//! the anchor maps before it too. In production this is the wall clock at start-up advanced by
//! the monotonic clock: it does not jump when the system clock is stepped while the gateway runs.

use std::sync::OnceLock;
use std::time::SystemTime;
use tokio::time::Instant;

fn anchor() -> &'static (SystemTime, Instant) {
    static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// The wall-clock time of tokio's "now".
pub fn now() -> SystemTime {
    at(Instant::now())
}

/// The wall-clock time of a tokio instant (e.g. when a request arrived).
pub fn at(instant: Instant) -> SystemTime {
    let (wall, base) = *anchor();
    if instant >= base {
        wall.checked_add(instant - base).unwrap_or(wall)
    } else {
        wall.checked_sub(base - instant).unwrap_or(wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time_exactly() {
        let t0 = now();
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(now().duration_since(t0).unwrap(), Duration::from_secs(301));
        // Instants before the anchor map before it, at the same distance.
        let earlier = Instant::now() - Duration::from_secs(5);
        assert_eq!(
            now().duration_since(at(earlier)).unwrap(),
            Duration::from_secs(5)
        );
    }
}
