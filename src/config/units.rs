//! Durations (`250ms`, `1m30s`) and sizes (`512KiB`, `5MiB`) as the files
//! write them.

use std::time::Duration;

/// The longest duration a file may give.
const MOST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `500ms`, `5s`, `2m`, `1h`, `7d`, `1m30s`; a bare number is
/// milliseconds. Durations beyond a century are refused: every duration is
/// added to clock readings somewhere, and those must not overflow.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(millis) = text.parse::<u64>() {
        return Some(Duration::from_millis(millis))
            .filter(|duration| *duration <= MOST)
            .ok_or_else(|| format!("`{text}` is too long (at most 100 years)"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".to_string());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let unit_end = rest[digits..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| digits + i);
        let (number, unit) = (&rest[..digits], rest[digits..unit_end].trim());
        let number: f64 =
            number.parse().map_err(|_| format!("`{text}` is not a duration (examples: 250ms, 5s, 2m, 1h)"))?;
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86_400.0,
            _ => return Err(format!("`{text}` is not a duration (examples: 250ms, 5s, 2m, 1h)")),
        };
        total = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MOST)
            .ok_or_else(|| format!("`{text}` is too long (at most 100 years)"))?;
        rest = &rest[unit_end..];
    }
    Ok(total)
}

/// Parses `512KiB`, `5MiB`, `1GiB`, `1000kB`, `4096`; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 =
        text[..digits].parse().map_err(|_| format!("`{text}` is not a size (examples: 512KiB, 5MiB, 1GiB)"))?;
    let factor: u64 = match text[digits..].trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(format!("`{text}` is not a size (examples: 512KiB, 5MiB, 1GiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for huge in ["99999999999999999999s", "1e300s", "18446744073709551615", "36600000d"] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5MiB"), Ok(5 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000kB"), Ok(1_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("5 MiBs").is_err());
        assert!(parse_size("lots").is_err());
    }
}
