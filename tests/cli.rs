//! The `modelc` binary as a user runs it: output, exit codes, and errors.

mod support;

use std::process::Command;
use support::repo;

fn modelc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelc")).args(args).current_dir(repo()).output().expect("modelc runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_json_reports_the_total() {
    let (code, out, err) = modelc(&["check", "specs/gpt2.model", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["params"], 124_439_808);
    assert_eq!(json["outputs"][0]["name"], "logits");
    assert_eq!(json["parameters"][0]["name"], "transformer.wte.weight");
}

#[test]
fn check_with_config_and_set() {
    let (code, out, err) = modelc(&[
        "check",
        "specs/mistral.model",
        "--config",
        "tests/fixtures/configs/mistral-7b-v0.1.json",
        "--set",
        "layers=1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hyperparameters"]["layers"], 1);
    assert_eq!(json["hyperparameters"]["window"], 4096);
    assert_eq!(json["params"], 262_148_096 + 218_112_000);
}

#[test]
fn check_prints_a_parameter_table() {
    let (code, out, _) = modelc(&["check", "specs/tiny-gpt.model"]);
    assert_eq!(code, 0);
    assert!(out.contains("blocks.0.self_attn.q_proj.weight") && out.contains("total 826,112 parameters"), "{out}");
}

#[test]
fn errors_exit_non_zero_with_a_located_message() {
    let (code, _, err) = modelc(&["check", "tests/errors/unknown-layer.model"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("E0104") && err.contains("unknown-layer.model:4:") && err.contains("did you mean `Linear`?"),
        "{err}"
    );

    let (code, _, err) = modelc(&["check", "no/such/spec.model"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read no/such/spec.model"), "{err}");

    let (code, _, err) = modelc(&["check", "specs/llama.model", "--set", "layers"]);
    assert_eq!(code, 1);
    assert!(err.contains("expected KEY=VALUE"), "{err}");

    let (code, _, err) = modelc(&["check", "specs/llama.model", "--config", "Cargo.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not valid JSON"), "{err}");

    let (code, _, _) = modelc(&["check", "--no-such-flag"]);
    assert_eq!(code, 2);
}

#[test]
fn fmt_rewrites_and_checks() {
    let dir = std::env::temp_dir().join(format!("modelc-fmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("messy.model");
    std::fs::write(&file, "layer   L(a:int){forward(x:[...,a])->[...,a]=x*2}\n").unwrap();
    let path = file.to_str().unwrap();

    let (code, out, _) = modelc(&["fmt", "--check", path]);
    assert_eq!(code, 1);
    assert!(out.contains("is not formatted"));

    let (code, _, err) = modelc(&["fmt", path]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "layer L(a: int) {\n    forward(x: [..., a]) -> [..., a] = x * 2\n}\n"
    );
    assert_eq!(modelc(&["fmt", "--check", path]).0, 0);

    std::fs::write(&file, "layer L {").unwrap();
    let (code, _, err) = modelc(&["fmt", path]);
    assert_eq!(code, 1);
    assert!(err.contains("E0001"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "layer L {", "a file that does not parse is left alone");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ast_prints_the_tree() {
    let (code, out, _) = modelc(&["ast", "stdlib/core.model"]);
    assert_eq!(code, 0);
    assert!(out.contains("(layer RMSNorm"), "{out}");
}

#[test]
fn ir_prints_the_graph_and_its_statistics() {
    let (code, out, err) =
        modelc(&["ir", "specs/mlp.model", "--set", "inputs=4", "--set", "hidden=8", "--set", "classes=3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("input \"x\" : [B, 4]") && out.contains("matmul") && out.contains("output logits"), "{out}");

    let (code, out, err) = modelc(&["ir", "specs/tiny-gpt.model", "--train", "--opt", "--stats", "--set", "layers=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("model TinyGPT:") && out.contains("optimised:") && out.contains("Saturated"), "{out}");

    let (code, _, err) = modelc(&["ir", "specs/bert.model", "--train"]);
    assert_eq!(code, 1);
    assert!(err.contains("has no loss to train"), "{err}");
}

#[test]
fn graph_draws_the_layers_and_shapes() {
    let out = std::env::temp_dir().join(format!("modelc-graph-{}.svg", std::process::id()));
    let (code, _, err) = modelc(&["graph", "specs/tiny-gpt.model", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("blocks PreNormBlock × 4"), "{svg}");
    assert!(svg.contains("logits: [B, T, 256]"), "{svg}");
    insta::assert_snapshot!("graph-tiny-gpt", svg);
}

#[test]
fn info_and_kernels_describe_the_cpu_program() {
    let (code, out, err) = modelc(&["info", "specs/tiny-gpt.model", "--size", "B=2", "--size", "T=16"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("total 826,112 parameters") && out.contains("forward program on the CPU (B=2, T=16)"),
        "{out}"
    );
    assert!(out.contains("planned memory") && out.contains("JIT compile"), "{out}");

    let (code, out, err) = modelc(&["kernels", "specs/mlp.model", "--clif", "--size", "B=3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("matmul") && out.contains("fused") && out.contains("function u0:0"), "{out}");

    let (code, _, err) = modelc(&["kernels", "specs/mlp.model", "--size", "B"]);
    assert_eq!(code, 1);
    assert!(err.contains("expected NAME=N"), "{err}");
}
