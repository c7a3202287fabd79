//! Checking that tensors fit in memory before allocating them. An
//! allocation that fails aborts the process (and on Linux a large one may
//! succeed and be killed later), so sizes are added up first and compared
//! with what the machine can still give; the error names the largest tensors.

use std::fmt::Write as _;

/// Bytes the system can still give this process: available memory plus
/// free swap, capped by the cgroup's limit where one is set. `None` where
/// the system does not say (not Linux).
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| {
        meminfo.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    let mut bytes = field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)).saturating_mul(1024);
    let cgroup =
        |file: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{file}")).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(current)) = (cgroup("memory.max"), cgroup("memory.current")) {
        bytes = bytes.min(max.saturating_sub(current));
    }
    Some(bytes)
}

/// This process's resident memory in bytes; `None` where the system does not
/// say (not Linux).
pub fn resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())?;
    Some(kb.saturating_mul(1024))
}

/// `1536` -> `1.5 KiB`.
pub fn human(bytes: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", units[unit]) }
}

/// The bytes of `items` (a name and its bytes each), added up without
/// overflowing.
pub fn total(items: &[(String, u64)]) -> u64 {
    items.iter().fold(0u64, |t, (_, b)| t.saturating_add(*b))
}

/// Ok when `total` bytes fit in what `available` says is left; else an
/// error naming `what` they are, their total, the largest of `items` (a
/// name and its bytes each) and the memory left.
pub fn ensure_fits(what: &str, total: u64, items: &[(String, u64)], available: Option<u64>) -> Result<(), String> {
    let Some(left) = available else { return Ok(()) };
    if total <= left {
        return Ok(());
    }
    let mut largest: Vec<&(String, u64)> = items.iter().collect();
    largest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut message =
        format!("{what} need {}, but this machine has {} available; the largest:", human(total), human(left));
    for (name, bytes) in largest.iter().take(3) {
        let _ = write!(message, "\n  {name}: {}", human(*bytes));
    }
    message.push_str("\nmake the model or the batch smaller (`--set`, `--batch`, `--seq-len`)");
    Err(message)
}

/// [`ensure_fits`] against this machine's memory.
pub fn ensure_available(what: &str, total: u64, items: &[(String, u64)]) -> Result<(), String> {
    ensure_fits(what, total, items, available())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_largest_and_the_total() {
        let items = vec![("a".to_string(), 3 << 30), ("b".to_string(), 5 << 30), ("c".to_string(), 1 << 20)];
        assert_eq!(total(&items), (8 << 30) + (1 << 20));
        assert!(ensure_fits("weights", 8 << 30, &items, Some(9 << 30)).is_ok());
        assert!(ensure_fits("weights", 8 << 30, &items, None).is_ok());
        let e = ensure_fits("weights", 8 << 30, &items, Some(4 << 30)).unwrap_err();
        assert!(e.starts_with("weights need 8.0 GiB, but this machine has 4.0 GiB available"), "{e}");
        assert!(e.find("b: 5.0 GiB").unwrap() < e.find("a: 3.0 GiB").unwrap(), "{e}");
    }

    #[test]
    fn reads_this_machine() {
        let bytes = available().expect("Linux says how much memory is available");
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
