//! Value parsers for numeric flags: a value outside its range is refused by
//! clap with the range in the message, before anything runs. The ranges
//! are stated in each flag's `--help` too.

/// The most worker threads `--threads` takes: far more than any machine's
/// cores, and few enough to start quickly.
pub const MAX_THREADS: usize = 1024;

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() { Ok(v) } else { Err(format!("`{s}` is not a finite number")) }
}

/// A finite number >= 0 (learning rate, weight decay, clip, temperature).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v >= 0.0 { Ok(v) } else { Err(format!("{v} is negative; expected a number >= 0")) }
}

/// A finite number > 0 (epochs).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("{v} is not above 0")) }
}

/// A fraction in [0, 1) (the held-out part of the data).
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is outside [0, 1)")) }
}

/// A probability mass in (0, 1] (top-p).
pub fn probability(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{v} is outside (0, 1]")) }
}

/// A whole number >= 1 (steps, batch, context).
pub fn count(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v >= 1 { Ok(v) } else { Err("0 is too few; expected at least 1".into()) }
}

/// Worker threads: 1 to [`MAX_THREADS`].
pub fn threads(s: &str) -> Result<usize, String> {
    let v = count(s)?;
    if v <= MAX_THREADS { Ok(v) } else { Err(format!("{v} threads is more than {MAX_THREADS}")) }
}

/// An amount of memory above 0: bytes, or a number with a unit (`2GiB`,
/// `512MiB`, `1.5GB`, `300MB`, `64KiB`, `kB`).
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (digits, unit) = (t[..split].trim(), t[split..].trim());
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024f64.powi(2),
        "gib" | "g" => 1024f64.powi(3),
        "tib" | "t" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(format!("`{unit}` is not a unit of memory; expected e.g. 2GiB, 512MiB, 300MB")),
    };
    let v = positive(digits)? * scale;
    if v >= 1.0 && v < u64::MAX as f64 { Ok(v as u64) } else { Err(format!("`{s}` is not a size in bytes")) }
}

/// `value` of the setting `name` (from a flag or the spec) checked by the
/// same parser as its flag; the error names the setting.
pub fn check(name: &str, value: f64, parser: fn(&str) -> Result<f64, String>) -> Result<f64, String> {
    parser(&value.to_string()).map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_range_values_are_refused_with_the_range() {
        assert_eq!(non_negative("0.5"), Ok(0.5));
        assert!(non_negative("-1").unwrap_err().contains(">= 0"));
        assert!(non_negative("nan").unwrap_err().contains("finite"));
        assert!(non_negative("inf").unwrap_err().contains("finite"));
        assert!(positive("0").is_err());
        assert!(fraction("1").unwrap_err().contains("[0, 1)"));
        assert_eq!(fraction("0"), Ok(0.0));
        assert!(probability("0").unwrap_err().contains("(0, 1]"));
        assert_eq!(probability("1"), Ok(1.0));
        assert!(count("0").is_err());
        assert!(threads("100000").unwrap_err().contains("1024"));
        assert_eq!(bytes("2GiB"), Ok(2 << 30));
        assert_eq!(bytes("1.5 MiB"), Ok(3 << 19));
        assert_eq!(bytes("300MB"), Ok(300_000_000));
        assert_eq!(bytes("4096"), Ok(4096));
        assert!(bytes("2 parsecs").unwrap_err().contains("not a unit of memory"));
        assert!(bytes("0GiB").is_err());
    }

    proptest! {
        /// Any text is either a value in range or an error: never a panic,
        /// never a value outside the range.
        #[test]
        fn parsers_accept_exactly_their_ranges(s in "\\PC{0,12}|-?[0-9]{1,25}(\\.[0-9]{0,5})?(e-?[0-9]{1,3})?|nan|inf|-inf") {
            if let Ok(v) = non_negative(&s) { prop_assert!(v.is_finite() && v >= 0.0); }
            if let Ok(v) = positive(&s) { prop_assert!(v.is_finite() && v > 0.0); }
            if let Ok(v) = fraction(&s) { prop_assert!((0.0..1.0).contains(&v)); }
            if let Ok(v) = probability(&s) { prop_assert!(v > 0.0 && v <= 1.0); }
            if let Ok(v) = count(&s) { prop_assert!(v >= 1); }
            if let Ok(v) = threads(&s) { prop_assert!((1..=MAX_THREADS).contains(&v)); }
            if let Ok(v) = bytes(&s) { prop_assert!(v >= 1); }
        }
    }
}
