//! Durations as users write them: `90`, `90s`, `10m`, `1h30m`, `2d`.

/// Seconds in `text`, or a message saying what is wrong with it.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(secs);
    }
    if !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("`{t}` is not a duration"));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut saw_unit = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("unexpected `{c}` in duration `{t}`")),
        };
        let n: u64 = number.parse().map_err(|_| format!("a number must come before `{c}` in duration `{t}`"))?;
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(|| format!("duration `{t}` is too large"))?)
            .ok_or_else(|| format!("duration `{t}` is too large"))?;
        number.clear();
        saw_unit = true;
    }
    if !number.is_empty() || !saw_unit {
        return Err(format!("duration `{t}` lacks a unit after its last number (s, m, h or d)"));
    }
    Ok(total)
}

/// Milliseconds in `text`: everything [`parse_duration`] reads, plus `ms` (`500ms`).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.trim().parse::<u64>().map_err(|_| format!("`{t}` is not a duration"));
    }
    parse_duration(t).map(|s| s.saturating_mul(1000))
}

/// `3600` → `1h`, `90` → `1m30s`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if rest >= unit {
            out.push_str(&format!("{}{name}", rest / unit));
            rest %= unit;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("1h30").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        assert!(parse_duration_ms("xms").is_err());
        assert_eq!(format_duration(61), "1m1s");
    }
}
