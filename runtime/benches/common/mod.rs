//! Timing shared by the benchmarks: the median of repeated runs after a
//! warm-up. (Each benchmark is a crate of its own and takes what it needs.)
#![allow(dead_code)]

use std::time::Instant;

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Seconds `f` takes, the median of `runs` after one to warm up.
pub fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}
