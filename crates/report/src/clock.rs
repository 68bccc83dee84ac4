//! Wall-clock time and the host name, for file names that match transformers' (`runs/<time>_<host>`,
//! `events.out.tfevents.<time>.<host>...`) without a date-time dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (TensorBoard's `wall_time`).
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `(year, month 1..=12, day 1..=31)` of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `%b%d_%H-%M-%S` of a Unix time in UTC (`Jan05_14-03-22`), the stamp transformers puts in its
/// default logging folder (transformers uses local time; nibble uses UTC to stay dependency-free).
pub fn logdir_stamp(unix_secs: i64) -> String {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (_, month, day) = civil_from_days(unix_secs.div_euclid(86_400));
    let s = unix_secs.rem_euclid(86_400);
    format!("{}{:02}_{:02}-{:02}-{:02}", MONTHS[(month - 1) as usize], day, s / 3600, s / 60 % 60, s % 60)
}

/// The machine's host name (`socket.gethostname()`), made safe for a file name; `localhost`
/// when it cannot be found.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("COMPUTERNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned());
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_match_pythons_strftime() {
        // python: datetime.fromtimestamp(t, timezone.utc).strftime("%b%d_%H-%M-%S")
        assert_eq!(logdir_stamp(0), "Jan01_00-00-00");
        assert_eq!(logdir_stamp(1_709_210_096), "Feb29_12-34-56");
        assert_eq!(logdir_stamp(1_767_225_599), "Dec31_23-59-59");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn hostname_is_a_safe_file_name_part() {
        let h = hostname();
        assert!(!h.is_empty() && !h.contains('/'));
    }
}
