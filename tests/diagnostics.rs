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

/// `from hf(classes: id2label)`: an int takes the object's entry count (the
/// label count); a float mapped to the same object is refused without
/// printing its 1,000 entries.
#[test]
fn a_label_count_comes_from_id2label() {
    let dir = std::env::temp_dir().join(format!("modelc-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("classifier.model");
    let text = "model Classifier(classes: int = 2, scale: float = 1.0) from hf(classes: id2label, scale: label2id) {\n    head: param[classes]\n\n    forward(x: [B]) -> y: [B, classes] = x.unsqueeze(-1) * head\n}\n";
    std::fs::write(&spec, text).unwrap();
    let labels: serde_json::Map<String, serde_json::Value> =
        (0..1000).map(|i| (i.to_string(), format!("label {i}").into())).collect();
    let ids: serde_json::Map<String, serde_json::Value> = (0..1000).map(|i| (format!("label {i}"), i.into())).collect();
    let config = serde_json::json!({ "id2label": labels, "label2id": ids });
    let opts = Options { config: Some((config.clone(), "config.json".into())), sets: Vec::new() };
    let err = check_file(&spec, &opts).unwrap_err();
    assert!(err.contains("an object of 1000 entries") && err.len() < 2000, "{err}");
    insta::assert_snapshot!("error-config-object-for-a-float", err);
    let text = text.replace(", scale: label2id", "");
    std::fs::write(&spec, text).unwrap();
    let opts = Options { config: Some((config, "config.json".into())), sets: Vec::new() };
    let checked = check_file(&spec, &opts).unwrap();
    assert_eq!(checked.params[0].shape, [1000]);
    std::fs::remove_dir_all(&dir).unwrap();
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

/// A spec whose model computes `body` from `x: [B, dim]` with a weight `w`.
fn spec_with(hparams: &str, body: &str) -> String {
    format!(
        "import std.core\nmodel M(dim: int = 4{hparams}) {{\n    w: param[dim] = ones\n    forward(x: [B, dim]) -> [B, dim] = {body}\n}}\n"
    )
}

/// Inputs that once crashed the parser, the checker or the renderer: each
/// gets its located error (snapshotted), never a panic or a stack overflow.
#[test]
fn hostile_specs_get_located_errors() {
    let n = 20_000;
    let cases = [
        ("deep-parens", spec_with("", &format!("{}x{} * w", "(".repeat(n), ")".repeat(n)))),
        ("deep-brackets", spec_with("", &format!("{}x{}", "[".repeat(n), "]".repeat(n)))),
        ("deep-negations", spec_with("", &format!("{}x * w", "- ".repeat(n)))),
        ("deep-ifs", spec_with("", &format!("{}x{}", "if true then ".repeat(n), " else x".repeat(n)))),
        ("long-chain", spec_with("", &format!("x{} * w", " - x".repeat(n)))),
        ("long-pipe", spec_with("", &format!("x{} * w", " |> exp".repeat(n)))),
        ("long-line", spec_with("", &format!("x * w{} + zz", " ".repeat(70_000)))),
        ("long-name", spec_with("", &format!("x * {}", "a".repeat(70_000)))),
        ("min-div-minus-one", spec_with(", a: int = -9223372036854775807 - 1, b: int = a / -1", "x * w")),
        ("min-rem-minus-one", spec_with(", a: int = -9223372036854775807 - 1, b: int = a % -1", "x * w")),
        ("huge-param", "model M(n: int = 4294967296) {\n    w: param[n, n] = ones\n    forward(x: [B]) -> [B] = x\n}\n".into()),
        ("huge-repeat", "import std.core\nimport std.mlp\nmodel M() {\n    layers: repeat(10000000) Linear(4, 4)\n    forward(x: [B, 4]) -> [B, 4] = x |> layers\n}\n".into()),
    ];
    for (name, text) in cases {
        let rendered = match check_text(&format!("{name}.model"), &text, None, &Options::default()) {
            Ok(_) => panic!("{name} was expected to fail"),
            Err(text) => text,
        };
        assert!(
            rendered.lines().all(|l| l.chars().count() < 300),
            "{name}: a line too long to read in\n{rendered:.2000}"
        );
        insta::assert_snapshot!(format!("hostile-{name}"), rendered);
    }
    // Names too long for format widths in the table `modelc check` prints.
    let long = "b".repeat(70_000);
    let text = spec_with(&format!(", {long}: int = 1"), "x * w");
    let checked = check_text("long-hparam.model", &text, None, &Options::default()).unwrap();
    let table = modelc::check::report::text(&checked);
    assert!(table.contains(&format!("  {long}  1\n")), "{:.300}", table);
}
