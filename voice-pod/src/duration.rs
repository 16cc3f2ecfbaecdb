//! Durations as people write them in settings and API requests.

use std::time::Duration;

/// Parses `90s`, `5m`, `1h30m` (humantime) or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(raw)
        .map_err(|e| format!("{raw:?} is not a duration such as 90s, 5m or 120 ({e})"))
}
