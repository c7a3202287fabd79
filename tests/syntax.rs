//! Parsing and printing: the syntax tree of every corpus file is
//! snapshotted, the corpus is in canonical form, printing then parsing gives
//! the same tree, and no byte-level mutation of a real spec panics the
//! parser or the checker.

mod support;

use modelc::check::{self, Options};
use modelc::source::{FileId, SourceMap};
use modelc::syntax::{dump_module, parse, print_module};
use proptest::prelude::*;
use std::path::PathBuf;
use support::*;

fn corpus() -> Vec<PathBuf> {
    let mut all = stdlib();
    all.extend(specs());
    all
}

fn parse_text(text: &str) -> Result<modelc::syntax::ast::Module, String> {
    let mut sources = SourceMap::new();
    let file = sources.add("input.model", None, text.to_string());
    match parse(file, text) {
        (Some(m), _) => Ok(m),
        (None, diags) => Err(modelc::diag::render(&sources, &diags, false)),
    }
}

#[test]
fn syntax_tree_of_every_corpus_file() {
    for path in corpus() {
        let text = std::fs::read_to_string(&path).unwrap();
        let module = parse_text(&text).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        let dir = path.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(format!("ast-{dir}-{}", stem(&path)), dump_module(&module));
    }
}

#[test]
fn corpus_is_in_canonical_form() {
    for path in corpus() {
        let text = std::fs::read_to_string(&path).unwrap();
        let module = parse_text(&text).unwrap();
        let printed = print_module(&module);
        assert_eq!(printed, text, "{} is not formatted (run `modelc fmt`)", path.display());
    }
}

#[test]
fn printing_keeps_comments_and_meaning() {
    let messy = "# leading\nlayer   L( a:int=1 ,b : float?=none){\n  # about w\n  w : param[ a , 2 ] = normal( 0.02 )\n  forward(x:[...,a])->[...,2]{ let y=x@w  # trailing\n y*(1+2)**-b }\n}\n";
    let module = parse_text(messy).unwrap();
    let printed = print_module(&module);
    insta::assert_snapshot!("fmt-messy", printed);
    let again = parse_text(&printed).unwrap();
    assert_eq!(dump_module(&again), dump_module(&module));
    assert_eq!(print_module(&again), printed);
}

// ------------------------------------------------------------------ generated specs

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["x", "y", "dim", "heads", "w", "proj", "B", "T", "model", "layer", "self", "a_1"])
        .prop_map(str::to_string)
}

fn expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        name(),
        (0i64..100_000).prop_map(|v| v.to_string()),
        (0.0f64..1e6).prop_map(|v| format!("{v:?}")),
        prop::sample::select(vec!["true", "false", "none", "\"text\"", "1e-5", "3e4"]).prop_map(str::to_string),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        let op = prop::sample::select(vec![
            "|>", "or", "and", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "%", "@", "**",
        ]);
        prop_oneof![
            (inner.clone(), op, inner.clone()).prop_map(|(a, o, b)| format!("({a} {o} {b})")),
            inner.clone().prop_map(|a| format!("-({a})")),
            inner.clone().prop_map(|a| format!("not ({a})")),
            (name(), prop::collection::vec(inner.clone(), 0..3))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (inner.clone(), name(), inner.clone()).prop_map(|(a, k, v)| format!("({a}).split({k}: {v})")),
            (inner.clone(), name()).prop_map(|(a, m)| format!("({a}).{m}")),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("({a})[:, {i}, ..., 1:-1]")),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|items| format!("[{}]", items.join(", "))),
            (inner.clone(), inner.clone(), inner.clone()).prop_map(|(c, t, e)| format!("(if {c} then {t} else {e})")),
        ]
    })
}

fn spec_text() -> impl Strategy<Value = String> {
    (name(), expr(), expr(), expr(), name(), expr(), any::<bool>()).prop_map(|(n, default, dim, init, f, body, model)| {
        let kw = if model { "model" } else { "layer" };
        format!(
            "import std.core\n{kw} L{n}(a: int = {default}, b: layer?, c: float? = none) {{\n    let {n} = {dim}\n    {f}: param[{dim}, 4] int = {init} if {default}\n    s: repeat({dim}) Linear(a, b: {default})\n    forward(x: [..., {n}], m: [B, T] bool?) -> (out: [B, {n}], [...]) {{\n        let p, q = {body}\n        {body}\n    }}\n    train {{\n        target t: [B] int\n        loss: {body}\n    }}\n}}\nmodel A = adapt L{n} with LoRA(rank: 4) on q_proj, v_proj\n"
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn print_then_parse_gives_the_same_tree(text in spec_text()) {
        let module = parse_text(&text).map_err(|e| TestCaseError::fail(format!("generated text did not parse:\n{text}\n{e}")))?;
        let printed = print_module(&module);
        let reparsed = parse_text(&printed).map_err(|e| TestCaseError::fail(format!("printed text did not parse:\n{printed}\n{e}")))?;
        prop_assert_eq!(dump_module(&reparsed), dump_module(&module));
        prop_assert_eq!(print_module(&reparsed), printed, "fmt is not idempotent");
    }
}

// ------------------------------------------------------------------ mutations

fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    const ALPHABET: &[u8] = b"()[]{}:,.=-+*/@|>#\"\n 0123456789abcxyzTB_?";
    for &(pos, kind, byte) in edits {
        let pos = pos % (bytes.len() + 1);
        let b = ALPHABET[byte as usize % ALPHABET.len()];
        match kind % 3 {
            0 => bytes.insert(pos, b),
            1 if pos < bytes.len() => {
                bytes.remove(pos);
            }
            _ if pos < bytes.len() => bytes[pos] = b,
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    // 10,000 mutated specs across the corpus: parse and check must return, not panic.
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_specs_never_panic(file in 0usize..1000, edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)) {
        let corpus = corpus();
        let path = &corpus[file % corpus.len()];
        let text = mutate(&std::fs::read_to_string(path).unwrap(), &edits);
        let small = Options { config: None, sets: Vec::new() };
        if let Ok(program) = check::load_source(&path.file_name().unwrap().to_string_lossy(), &text, path.parent()) {
            let _ = check::check(&program, &small);
        }
        let _ = parse(FileId(0), &text);
    }
}
