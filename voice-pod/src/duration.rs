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

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Any text as a duration: a Duration or an error, never a panic.
        #[test]
        fn arbitrary_durations_never_panic(raw in "(?s).{0,40}|[0-9]{0,30}[a-z ]{0,6}") {
            let _ = parse_duration(&raw);
        }
    }

    #[test]
    fn durations_accept_suffixes_and_bare_seconds() {
        // Proves the documented duration forms parse: 90s, 5m, bare seconds.
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("120").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
    }
}
