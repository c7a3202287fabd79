//! Retrieval as a user runs it: `index` and `search` with the published
//! all-MiniLM-L6-v2 over the licences Debian ships, an indexing run killed
//! and resumed, bad input, and `infer --retrieve`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::{published_minilm, repo};

fn modelc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelc")).args(args).current_dir(repo()).output().expect("modelc runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modelc-rag-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const LICENCES: [&str; 3] = ["Apache-2.0", "BSD", "MPL-2.0"];

fn licence(name: &str) -> String {
    format!("/usr/share/common-licenses/{name}")
}

/// `index` of the licences into `out` with the published MiniLM.
fn index_args(weights: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["index", "specs/minilm.model", "--weights", weights.to_str().unwrap(), "--threads", "2", "--docs"]
            .map(String::from)
            .to_vec();
    args.extend(LICENCES.map(licence));
    args.extend(["--out".to_string(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn search(index: &Path, queries: &[&str], extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["search", "specs/minilm.model", "--index", index.to_str().unwrap(), "--json"];
    if !extra.contains(&"-k") {
        args.extend(["-k", "5"]);
    }
    for q in queries {
        args.extend(["--query", q]);
    }
    args.extend(extra);
    let (code, out, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Questions a reader of the licences asks, and where the answer is: the
/// file and a phrase of the passage that must rank first.
const EXPECTED: [(&str, &str, &str); 4] = [
    ("What if I sue a contributor for patent infringement?", "Apache-2.0", "institute patent litigation"),
    ("Can the University's name be used to endorse products?", "BSD", "Regents of the University of California"),
    ("Is the software provided with any warranty?", "MPL-2.0", "warrant"),
    ("Which court handles a lawsuit about this licence?", "MPL-2.0", "8. Litigation"),
];

#[test]
fn a_minilm_index_finds_the_passages_that_answer() {
    let weights = published_minilm();
    let dir = scratch("answers");
    let index = dir.join("licences.idx");
    let args = index_args(&weights, &index, &[]);
    let (code, _, err) = modelc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("passages from 3 documents"), "{err}");
    let queries: Vec<&str> = EXPECTED.iter().map(|e| e.0).collect();
    let found = search(&index, &queries, &[]);
    let exact = search(&index, &queries, &["--exact"]);
    for ((query, file, phrase), (got, truth)) in EXPECTED.iter().zip(found.iter().zip(&exact)) {
        let first = &got["results"][0];
        assert!(
            first["source"].as_str().unwrap().ends_with(file) && first["text"].as_str().unwrap().contains(phrase),
            "{query}: {first}"
        );
        // On an index this small the graph finds exactly what comparing with every passage finds.
        let ids = |v: &serde_json::Value| {
            v["results"].as_array().unwrap().iter().map(|r| r["id"].clone()).collect::<Vec<_>>()
        };
        assert_eq!(ids(got), ids(truth), "{query}");
        let scores: Vec<f64> =
            got["results"].as_array().unwrap().iter().map(|r| r["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    }
    // The plain listing names each passage's file and line.
    let (code, out, err) = modelc(&[
        "search",
        "specs/minilm.model",
        "--index",
        index.to_str().unwrap(),
        "--query",
        EXPECTED[0].0,
        "-k",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  1. ") && out.contains("Apache-2.0:"), "{out}");

    // A binary built from the spec searches the same index the same way,
    // and is the embedder `infer --retrieve` runs.
    let minilm = dir.join("minilm");
    let (code, _, err) = modelc(&["build", "specs/minilm.model", "-o", minilm.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let built = Command::new(&minilm)
        .args(["search", "--index", index.to_str().unwrap(), "--json", "-k", "5"])
        .args(queries.iter().flat_map(|q| ["--query", q]))
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let built: Vec<serde_json::Value> =
        String::from_utf8_lossy(&built.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(built, found);

    // Retrieval-augmented generation: the passages go into the prompt by the
    // template, and their sources are printed.
    let decoder = repo().join("tests/fixtures/hf/gpt2");
    let question = EXPECTED[0].0;
    // Four greedy tokens from the tiny GPT-2 fixture after `prompt`, with `extra` flags.
    let infer = |prompt: &str, extra: &[&str]| {
        let mut args = vec!["infer", "specs/gpt2.model", "--weights", decoder.to_str().unwrap(), "--prompt", prompt];
        args.extend(["--temperature", "0", "--max-new-tokens", "4", "--json"]);
        args.extend(extra);
        modelc(&args)
    };
    let (code, out, err) = infer(
        question,
        &[
            "--retrieve",
            index.to_str().unwrap(),
            "--retrieve-k",
            "2",
            "--embedder",
            minilm.to_str().unwrap(),
            "--template",
            "{context}\nQ: {prompt}\nA:",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("[1] ") && err.contains("Apache-2.0:"), "{err}");
    let hits = &search(&index, &[question], &["-k", "2"])[0]["results"];
    let context: Vec<String> =
        (0..2).map(|i| format!("[{}] {}", i + 1, hits[i]["text"].as_str().unwrap().trim())).collect();
    let prompt = format!("{}\nQ: {question}\nA:", context.join("\n"));
    let (code, direct, err) = infer(&prompt, &[]);
    assert_eq!(code, 0, "{err}");
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(&out).unwrap(), serde_json::from_str(&direct).unwrap());
    assert_eq!(a["prompt_ids"], b["prompt_ids"]);
    assert_eq!(a["new_token_ids"], b["new_token_ids"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_index_killed_mid_way_and_resumed_is_the_index_of_one_run() {
    let weights = published_minilm();
    let dir = scratch("killed");
    let (whole, resumed) = (dir.join("whole.idx"), dir.join("resumed.idx"));
    let small = ["--batch", "4"];
    let args = index_args(&weights, &whole, &small);
    let (code, _, err) = modelc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let total: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("manifest.json")).unwrap()).unwrap();
    let total = total["passages"].as_u64().unwrap();

    // Kill the run once a few batches are committed, well before the end.
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(index_args(&weights, &resumed, &small))
        .current_dir(repo())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let committed = || -> u64 {
        std::fs::read_to_string(resumed.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|m| m["passages"].as_u64())
            .unwrap_or(0)
    };
    while committed() < 12 {
        assert!(child.try_wait().unwrap().is_none(), "indexing ended before it was killed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = committed();
    assert!(at_kill < total, "killed at {at_kill} of {total}");
    // What was committed is searchable as it is.
    assert_eq!(search(&resumed, &["patents"], &[])[0]["results"].as_array().unwrap().len(), 5);

    let args = index_args(&weights, &resumed, &[&small[..], &["--add"]].concat());
    let (code, _, err) = modelc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    for file in ["passages.jsonl", "vectors.f32", "graph.hnsw"] {
        assert!(
            std::fs::read(whole.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap(),
            "{file} differs"
        );
    }
    let queries: Vec<&str> = EXPECTED.iter().map(|e| e.0).collect();
    assert_eq!(search(&whole, &queries, &[]), search(&resumed, &queries, &[]));
    // Adding the same documents again adds nothing.
    let (code, _, err) = modelc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("indexed already") && err.contains("0 new"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn index_and_search_refuse_bad_input_clearly() {
    let weights = published_minilm();
    let dir = scratch("bad");
    let w = weights.to_str().unwrap();
    let doc = dir.join("notes.txt");
    std::fs::write(&doc, "The licence grants the right to copy. ".repeat(10)).unwrap();
    let index = dir.join("notes.idx");
    let (i, d) = (index.to_str().unwrap(), doc.to_str().unwrap());
    let base = ["index", "specs/minilm.model", "--weights", w, "--docs", d, "--out", i];
    let (code, _, err) = modelc(&base);
    assert_eq!(code, 0, "{err}");
    let refused = |args: &[&str], says: &str| {
        let (code, out, err) = modelc(args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert!(err.contains(says) && !err.contains("panicked"), "{args:?}: {err}");
    };
    refused(&base, "--add grows it");
    refused(&[&base[..], &["--add", "--chunk-tokens", "64"]].concat(), "built with --chunk-tokens 128");
    std::fs::write(&doc, "Changed.").unwrap();
    refused(&[&base[..], &["--add"]].concat(), "changed since it was indexed");
    let other = dir.join("other.idx");
    let o = other.to_str().unwrap();
    refused(
        &["index", "specs/minilm.model", "--weights", w, "--docs", d, "--out", o, "--chunk-tokens", "999"],
        "more than the 254 tokens",
    );
    refused(
        &["index", "specs/minilm.model", "--weights", w, "--docs", "/nonexistent", "--out", o],
        "cannot read /nonexistent",
    );
    assert!(!other.exists(), "a failed start leaves no index behind");
    std::fs::write(dir.join("binary"), [0xffu8, 0xfe, 0x00]).unwrap();
    refused(
        &["index", "specs/minilm.model", "--weights", w, "--docs", dir.join("binary").to_str().unwrap(), "--out", o],
        "is not UTF-8 text",
    );
    refused(&["search", "specs/minilm.model", "--index", d, "--query", "x"], "is not an index");
    // A damaged graph or vector file is named, never a panic.
    let graph = index.join("graph.hnsw");
    let bytes = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, &bytes[..bytes.len() / 2]).unwrap();
    refused(&["search", "specs/minilm.model", "--index", i, "--query", "x"], "graph.hnsw is damaged");
    std::fs::write(&graph, &bytes).unwrap();
    std::fs::write(index.join("vectors.f32"), b"").unwrap();
    refused(&["search", "specs/minilm.model", "--index", i, "--query", "x"], "vectors.f32 is damaged");
    std::fs::remove_dir_all(&dir).unwrap();
}
