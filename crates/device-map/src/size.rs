//! Byte sizes as people write them in `max_memory` (`20GiB`, `10GB`, `512MiB`, plain numbers).

use crate::Error;

/// Parse a size: a number with an optional unit (B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB =
/// powers of 1024), case-insensitive, as accelerate accepts.
pub fn parse_bytes(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| Error::BadBudget(format!("`{s}` is not a size")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(Error::BadBudget(format!("`{s}`: unknown unit `{other}`"))),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(Error::BadBudget(format!("`{s}` is out of range")));
    }
    Ok(bytes.round() as u64)
}

/// A size for people: `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_accelerate() {
        assert_eq!(parse_bytes("20GiB").ok(), Some(20 * (1 << 30)));
        assert_eq!(parse_bytes("10GB").ok(), Some(10_000_000_000));
        assert_eq!(parse_bytes("1.5 mib").ok(), Some(1_572_864));
        assert_eq!(parse_bytes("4096").ok(), Some(4096));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("GB").is_err());
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
    }
}
