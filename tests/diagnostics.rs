//! The diagnostics corpus: every file in tests/errors/ (or `main.model` of
//! every folder there) must fail to check, and its rendered diagnostics are
//! snapshot-tested. Adding a file adds a test.

mod support;

use modelc::check::Options;
use support::*;

#[test]
fn every_error_case_renders_as_snapshotted() {
    let dir = repo().join("tests/errors");
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    let mut count = 0;
    for entry in entries {
        let (name, path) =
            if entry.is_dir() { (stem(&entry), entry.join("main.model")) } else { (stem(&entry), entry.clone()) };
        if path.extension().is_none_or(|e| e != "model") {
            continue;
        }
        let rendered = match check_file(&path, &Options::default()) {
            Ok(_) => panic!("{} was expected to fail", path.display()),
            Err(text) => text,
        };
        assert!(rendered.contains("E0"), "{name}: no error code in\n{rendered}");
        insta::assert_snapshot!(format!("error-{name}"), rendered);
        count += 1;
    }
    assert!(count >= 25, "only {count} diagnostics in the corpus");
}

#[test]
fn config_and_set_errors_name_the_key() {
    let llama = repo().join("specs/llama.model");
    let config = serde_json::json!({"hidden_size": "wide", "num_hidden_layers": 2});
    let opts = Options { config: Some((config, "config.json".into())), sets: Vec::new() };
    let err = check_file(&llama, &opts).unwrap_err();
    assert!(err.contains("key `hidden_size`") && err.contains("needs an int"), "{err}");
    insta::assert_snapshot!("error-config-wrong-type", err);

    let err = check_file(&llama, &sets(&[("layer", "2")])).unwrap_err();
    assert!(err.contains("did you mean `layers`?"), "{err}");
    insta::assert_snapshot!("error-set-unknown-key", err);

    let err = check_file(&llama, &sets(&[("heads", "5")])).unwrap_err();
    assert!(err.contains("does not divide evenly"), "{err}");
}

#[test]
fn several_independent_errors_are_reported_together() {
    let err = check_file(&repo().join("tests/errors/several-errors.model"), &Options::default()).unwrap_err();
    assert!(err.contains("Lineer") && err.contains("bais"), "{err}");
}
