//! Any input: the parser, the printer and the checker must return, never panic.
//! Run with `cargo +nightly fuzz run parse_and_check` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;
use modelc::check::{self, Options};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let (Some(module), _) = modelc::syntax::parse(modelc::source::FileId(0), text) {
        let printed = modelc::syntax::print_module(&module);
        let (again, _) = modelc::syntax::parse(modelc::source::FileId(0), &printed);
        assert!(again.is_some(), "printed source must parse:\n{printed}");
    }
    if let Ok(program) = check::load_source("fuzz.model", text, None) {
        let _ = check::check(&program, &Options::default());
    }
});
