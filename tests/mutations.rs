//! Mutated specs never crash the front end: every shipped spec and stdlib
//! file, cut, spliced and salted with the inputs that break parsers (deep
//! nesting, long lines and names, huge and negative literals, stray bytes),
//! goes through parse, print, check and the printed tables, which must
//! return an error or a result and never panic or overflow the stack.
//! `MODELC_MUTATIONS=100000 cargo test --release --test mutations` runs the
//! long campaign; CI runs a thousand cases.

mod support;

use modelc::check::{self, Options};
use modelc::source::FileId;
use support::*;

/// Fragments that have broken parsers and checkers.
fn salt(rng: &mut Rng) -> String {
    let k = 1 + (rng.next() * 3000.0) as usize;
    let pick = (rng.next() * 22.0) as usize;
    match pick {
        0 => "(".repeat(k),
        1 => ")".repeat(k),
        2 => "[".repeat(k),
        3 => "- ".repeat(k),
        4 => "not ".repeat(k),
        5 => "if true then ".repeat(k),
        6 => " + x".repeat(k),
        7 => " |> f".repeat(k),
        8 => " ".repeat(k * 30),
        9 => "a".repeat(k * 30),
        10 => "99999999999999999999999999".into(),
        11 => "-9223372036854775808".into(),
        12 => "1e999".into(),
        13 => " / -1".into(),
        14 => " % 0".into(),
        15 => "4294967296".into(),
        16 => "\"".into(),
        17 => "#".into(),
        18 => "é\u{0}\u{feff}".into(),
        19 => "repeat(100000000)".into(),
        20 => "\n".repeat(k),
        _ => "{".repeat(k),
    }
}

/// `text` with one or two random edits.
fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut out = text.to_string();
    for _ in 0..1 + (rng.next() * 2.0) as usize {
        let mut at = (rng.next() * out.len() as f64) as usize;
        while !out.is_char_boundary(at) {
            at -= 1;
        }
        match (rng.next() * 5.0) as usize {
            4 => {
                // A number becomes an extreme one: the text still parses.
                let Some(start) = out[at..].find(|c: char| c.is_ascii_digit()).map(|i| i + at) else { continue };
                let end = out[start..].find(|c: char| !c.is_ascii_digit()).map_or(out.len(), |i| i + start);
                let extremes = ["0", "1", "3", "4294967296", "9223372036854775807", "100000000", "65537"];
                out.replace_range(start..end, extremes[(rng.next() * extremes.len() as f64) as usize]);
            }
            0 => {
                let mut end = (at + (rng.next() * 40.0) as usize).min(out.len());
                while !out.is_char_boundary(end) {
                    end -= 1;
                }
                out.replace_range(at..end, "");
            }
            1 => {
                let mut end = (at + (rng.next() * 200.0) as usize).min(out.len());
                while !out.is_char_boundary(end) {
                    end -= 1;
                }
                let copy = out[at..end].to_string();
                out.insert_str(at, &copy);
            }
            _ => out.insert_str(at, &salt(rng)),
        }
    }
    out
}

#[test]
fn mutated_specs_never_crash_the_front_end() {
    let cases: usize = std::env::var("MODELC_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let corpus: Vec<String> =
        specs().into_iter().chain(stdlib()).map(|p| std::fs::read_to_string(p).expect("readable")).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut parsed, mut checked) = (0, 0);
    for case in 0..cases {
        let text = mutate(&corpus[case % corpus.len()], &mut rng);
        if let (Some(module), _) = modelc::syntax::parse(FileId(0), &text) {
            parsed += 1;
            let printed = modelc::syntax::print_module(&module);
            assert!(
                modelc::syntax::parse(FileId(0), &printed).0.is_some(),
                "printed source must parse:\n{printed:.3000}"
            );
        }
        match check::load_source("mutant.model", &text, Some(&repo().join("specs"))) {
            Ok(program) => match check::check(&program, &Options::default()) {
                Ok(c) => {
                    checked += 1;
                    let _ = modelc::check::report::text(&c);
                }
                Err(d) => {
                    let _ = modelc::diag::render(&program.sources, &d, false);
                }
            },
            Err((sources, d)) => {
                let _ = modelc::diag::render(&sources, &d, false);
            }
        }
    }
    // The mutations must leave many cases valid, or the checker is barely reached.
    eprintln!("{parsed} parsed and {checked} checked of {cases}");
    assert!(parsed * 4 >= cases && checked * 10 >= cases, "{parsed} parsed and {checked} checked of {cases}");
}
