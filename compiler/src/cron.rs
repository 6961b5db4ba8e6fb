//! Five-field cron schedules (`minute hour day-of-month month day-of-week`, UTC).
//!
//! Parsing is strict: an out-of-range value or an unknown name is an error naming the field,
//! because a schedule that silently runs at the wrong time is worse than one that is refused.
//! [`Cron::matches`] answers whether a minute fires; the master's scheduler walks minutes.

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    pub minutes: BTreeSet<u8>,
    pub hours: BTreeSet<u8>,
    pub days: BTreeSet<u8>,
    pub months: BTreeSet<u8>,
    pub weekdays: BTreeSet<u8>,
    /// Whether day-of-month and day-of-week were both restricted (then either may match).
    day_or: bool,
}

/// A parse failure: which field (0-based) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError {
    pub field: Option<usize>,
    pub message: String,
}

const FIELDS: [(&str, u8, u8); 5] =
    [("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7)];
const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let expanded = match text.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError {
                field: None,
                message: format!(
                    "a cron string has 5 fields (minute hour day-of-month month day-of-week), `{}` has {}",
                    text.trim(),
                    parts.len()
                ),
            });
        }
        let mut sets = Vec::with_capacity(5);
        for (i, part) in parts.iter().enumerate() {
            let set = parse_field(part, i).map_err(|message| CronError { field: Some(i), message })?;
            sets.push(set);
        }
        let mut weekdays = sets.pop().unwrap_or_default();
        if weekdays.remove(&7) {
            weekdays.insert(0);
        }
        let months = sets.pop().unwrap_or_default();
        let days = sets.pop().unwrap_or_default();
        let hours = sets.pop().unwrap_or_default();
        let minutes = sets.pop().unwrap_or_default();
        let day_or = !parts[2].starts_with('*') && !parts[4].starts_with('*');
        Ok(Cron { minutes, hours, days, months, weekdays, day_or })
    }

    /// Whether the schedule fires in this minute. `weekday` 0 = Sunday.
    pub fn matches(&self, minute: u8, hour: u8, day: u8, month: u8, weekday: u8) -> bool {
        if !self.minutes.contains(&minute) || !self.hours.contains(&hour) || !self.months.contains(&month) {
            return false;
        }
        let dom = self.days.contains(&day);
        let dow = self.weekdays.contains(&weekday);
        if self.day_or { dom || dow } else { dom && dow }
    }
}

fn parse_field(text: &str, field: usize) -> Result<BTreeSet<u8>, String> {
    let (name, lo, hi) = FIELDS[field];
    let mut out = BTreeSet::new();
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u8 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name}: step `{s}` is not a positive number"))?;
                (r, step)
            }
            None => (item, 1),
        };
        let (start, end) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, field)?, value(b, field)?)
        } else {
            let v = value(range, field)?;
            (v, if item.contains('/') { hi } else { v })
        };
        if start > end {
            return Err(format!("{name}: range `{range}` runs backwards"));
        }
        let mut v = start;
        while v <= end {
            out.insert(v);
            match v.checked_add(step) {
                Some(n) => v = n,
                None => break,
            }
        }
    }
    Ok(out)
}

fn value(text: &str, field: usize) -> Result<u8, String> {
    let (name, lo, hi) = FIELDS[field];
    let lower = text.to_ascii_lowercase();
    let named = match field {
        3 => MONTHS.iter().position(|m| *m == lower).map(|i| i as u8 + 1),
        4 => DAYS.iter().position(|d| *d == lower).map(|i| i as u8),
        _ => None,
    };
    let v = match named {
        Some(v) => v,
        None => text.parse::<u8>().map_err(|_| format!("{name}: `{text}` is not a number or a name"))?,
    };
    if v < lo || v > hi {
        return Err(format!("{name}: {v} is out of range {lo}-{hi}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_schedules() {
        let c = Cron::parse("0 3 * * *").expect("nightly");
        assert!(c.matches(0, 3, 15, 6, 2));
        assert!(!c.matches(1, 3, 15, 6, 2));
        let c = Cron::parse("*/15 9-17 * * mon-fri").expect("office hours");
        assert!(c.matches(45, 9, 1, 1, 1));
        assert!(!c.matches(45, 9, 1, 1, 0));
        let c = Cron::parse("0 0 1 * sun").expect("day or");
        assert!(c.matches(0, 0, 1, 5, 3) && c.matches(0, 0, 9, 5, 0));
        assert!(Cron::parse("@daily").is_ok());
    }

    #[test]
    fn rejects_bad_schedules_naming_the_field() {
        assert_eq!(Cron::parse("61 * * * *").unwrap_err().field, Some(0));
        assert_eq!(Cron::parse("* * * foo *").unwrap_err().field, Some(3));
        assert_eq!(Cron::parse("* * *").unwrap_err().field, None);
        assert_eq!(Cron::parse("*/0 * * * *").unwrap_err().field, Some(0));
        assert_eq!(Cron::parse("5-1 * * * *").unwrap_err().field, Some(0));
    }
}
