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
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("blocks: PreNormBlock × 4"), "{svg}");
    assert!(svg.contains(">[B, T, 256]</text>"), "{svg}");
    insta::assert_snapshot!("graph-tiny-gpt", svg);
    // Deeper, or one layer opened by name: the attention's projections appear.
    let (code, _, err) = modelc(&[
        "graph",
        "specs/tiny-gpt.model",
        "--depth",
        "1",
        "--expand",
        "self_attn",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains(">q_proj: Linear</text>") && svg.contains("blocks.0.self_attn: Attention"), "{svg}");
    std::fs::remove_file(&out).unwrap();
    // Shapes with the sizes given.
    let (code, _, err) =
        modelc(&["graph", "specs/tiny-gpt.model", "--size", "B=2", "--size", "T=64", "-o", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains(">[2, 64, 256]</text>") && !svg.contains("[B, T"), "{svg}");
    std::fs::remove_file(&out).unwrap();
    // A PNG, rendered with the font built in.
    let png = out.with_extension("png");
    let (code, _, err) = modelc(&["graph", "specs/llama.model", "--depth", "3", "-o", png.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000, "{} bytes", bytes.len());
    std::fs::remove_file(&png).unwrap();
}

#[test]
fn info_and_kernels_describe_the_cpu_program() {
    let (code, out, err) = modelc(&["info", "specs/tiny-gpt.model", "--size", "B=2", "--size", "T=16"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("total 826,112 parameters") && out.contains("forward program on the CPU (B=2, T=16)"),
        "{out}"
    );
    assert!(out.contains("planned memory") && out.contains("JIT compile") && out.contains("vector math"), "{out}");
    assert!(out.contains("a thread for row groups' blocks"), "{out}");
    // The blocks' kernels are the same code: compiled once (2 blocks, so
    // fewer than two thirds of the fused kernels are distinct).
    let counts = out.lines().find(|l| l.trim_start().starts_with("kernels")).expect("a kernels line");
    let number = |before: &str| -> usize {
        let head = &counts[..counts.find(before).unwrap_or_else(|| panic!("{counts}"))];
        head.rsplit(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).unwrap().parse().unwrap()
    };
    let (fused, distinct) = (number(" fused"), number(" of them distinct"));
    assert!(distinct > 0 && 3 * distinct < 2 * fused, "{counts}");

    let (code, out, err) = modelc(&["kernels", "specs/mlp.model", "--clif", "--size", "B=3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("matmul") && out.contains("fused") && out.contains("function u0:0"), "{out}");

    let (code, _, err) = modelc(&["kernels", "specs/mlp.model", "--size", "B"]);
    assert_eq!(code, 1);
    assert!(err.contains("expected NAME=N"), "{err}");
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    // `modelc kernels ... | head -1`: the pipe closes after one line of
    // megabytes (more than a pipe holds); the process ends by SIGPIPE as
    // other tools do, not with a panic message.
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(["kernels", "specs/tiny-gpt.model", "--train", "--clif"])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("modelc runs");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("model TinyGPT"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && out.status.code() != Some(101), "{err}");
}

#[test]
fn kernels_prints_the_schedule_with_row_groups() {
    // The tiny GPT's forward pass: layer norms and the attention softmax run
    // as row groups; matrix products, copies and views between them.
    let (code, out, err) = modelc(&["kernels", "specs/tiny-gpt.model", "--size", "B=2", "--size", "T=16"]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("kernels-tiny-gpt", out);

    // In the training step the targets' one-hot is recomputed inside the
    // two kernels that use it (the loss and its gradient), never stored.
    let (code, out, err) = modelc(&["kernels", "specs/tiny-gpt.model", "--train", "--size", "B=2", "--size", "T=16"]);
    assert_eq!(code, 0, "{err}");
    let one_hot: Vec<&str> = out.lines().filter(|l| l.contains("eq, cast f32")).collect();
    assert_eq!(one_hot.len(), 2, "{out}");
    assert!(one_hot.iter().all(|l| l.contains("mul")), "{one_hot:?}");

    // Cranelift IR of RMSNorm's parts: a folded sum of squares, the per-row
    // scale, and the row loop that reads it once per row (no exp, so the
    // text is the same with and without FMA). Without the wide-vector
    // functions, so the same on every host; with them (where the host has
    // AVX2 and FMA) the scaling is one call of the affine map per row.
    let dir = std::env::temp_dir().join(format!("modelc-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("rmsnorm.model");
    std::fs::write(
        &spec,
        "model RmsNorm() {\n    forward(x: [R, N]) -> y: [R, N] = x * rsqrt(mean(x * x, axis: -1, keep: true) + 1e-5)\n}\n",
    )
    .unwrap();
    let args = ["kernels", spec.to_str().unwrap(), "--clif", "--size", "R=3", "--size", "N=20"];
    let (code, out, err) = modelc(&[&args[..], &["--no-wide-math"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("k1 rows (4 parts"), "{out}");
    insta::assert_snapshot!("kernels-clif-rmsnorm", out);
    let (code, wide, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    let host_has_wide_math = !modelc::backend::vmath::functions().is_empty();
    assert_eq!(wide.contains("(i64, i64, i64, f32, f32)"), host_has_wide_math, "{wide}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small corpus in a fresh temporary folder.
fn corpus_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("modelc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    std::fs::write(dir.join("data.txt"), text).unwrap();
    dir
}

const SMALL: [&str; 6] = ["--set", "layers=1", "--set", "dim=16", "--set", "heads=2"];

/// `train` of a small tiny-gpt on `data`, writing to `out`.
fn train_args<'a>(data: &'a std::path::Path, out: &'a std::path::Path) -> Vec<&'a str> {
    let mut args =
        vec!["train", "specs/tiny-gpt.model", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(SMALL);
    args
}

#[test]
fn train_writes_the_best_checkpoint_and_infer_continues_text() {
    let dir = corpus_dir("train");
    let (data, out) = (dir.join("data.txt"), dir.join("run"));
    let mut args = train_args(&data, &out);
    args.extend([
        "--steps",
        "40",
        "--batch",
        "4",
        "--seq-len",
        "16",
        "--eval-every",
        "20",
        "--lr",
        "1e-2",
        "--seed",
        "3",
    ]);
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("best eval loss"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 40);
    assert!(losses[39] < losses[0] - 1.0, "loss did not fall: {losses:?}");
    let weights = out.join("model.safetensors");
    assert!(weights.exists() && !out.join("model.safetensors.tmp").exists());

    // Greedy decoding is deterministic and streams the prompt, then new bytes.
    let mut args = vec![
        "infer",
        "specs/tiny-gpt.model",
        "--weights",
        weights.to_str().unwrap(),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--context",
        "16",
    ];
    args.extend(SMALL);
    let (code, first, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(first.starts_with("the quick") && first.len() == "the quick".len() + 12 + 1, "{first:?}");
    assert!(err.contains("tokens/s"), "{err}");
    assert_eq!(modelc(&args).1, first);

    args.push("--json");
    let (code, json, _) = modelc(&args);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["new_token_ids"].as_array().unwrap().len(), 12);

    // --prompts decodes each line as --prompt alone does (the cache reset
    // between them), with room for every prompt and its tokens; on the
    // initial weights, whose tokens depend on the whole context (the
    // trained ones repeat one byte).
    let prompts = ["the quick", "over the lazy dog", "fox"];
    std::fs::write(dir.join("prompts.txt"), prompts.join("\n")).unwrap();
    let initial = dir.join("initial");
    let mut init = train_args(&data, &initial);
    init.extend(["--steps", "1", "--lr", "0", "--seed", "3"]);
    assert_eq!(modelc(&init).0, 0);
    let initial_weights = initial.join("model.safetensors");
    let mut args = args.clone();
    let at = args.iter().position(|a| *a == "--context").unwrap() + 1;
    args[at] = "64";
    args[3] = initial_weights.to_str().unwrap();
    let alone = |p: &str| {
        let mut one = args.clone();
        one[5] = p;
        let (code, json, err) = modelc(&one);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(json.trim()).unwrap()
    };
    let mut many = args.clone();
    let prompts_file = dir.join("prompts.txt");
    many.splice(4..6, ["--prompts", prompts_file.to_str().unwrap()]);
    let (code, lines, err) = modelc(&many);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (p, line) in prompts.iter().zip(&lines) {
        assert_eq!(line, &alone(p), "{p}");
    }

    // Weights that do not fit the model are listed by name.
    let mut wrong = vec![
        "infer",
        "specs/tiny-gpt.model",
        "--weights",
        weights.to_str().unwrap(),
        "--set",
        "layers=2",
        "--set",
        "dim=16",
        "--set",
        "heads=2",
    ];
    wrong.extend(["--max-new-tokens", "1"]);
    let (code, _, err) = modelc(&wrong);
    assert_eq!(code, 1);
    assert!(err.contains("missing tensor `blocks.1.mlp.fc1.weight` [64, 16]"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_and_infer_reject_bad_input_clearly() {
    let (code, _, err) = modelc(&["train", "specs/tiny-gpt.model", "--data", "/no/such/file"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /no/such/file"), "{err}");

    let dir = corpus_dir("bad");
    let data = dir.join("data.txt");
    let (code, _, err) = modelc(&["train", "specs/bert.model", "--data", data.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no `train { loss: ... }` block"), "{err}");

    let (code, _, err) =
        modelc(&["train", "specs/tiny-gpt.model", "--data", data.to_str().unwrap(), "--optimizer", "adam"]);
    assert_eq!(code, 1);
    assert!(err.contains("expected adamw or sgd"), "{err}");

    std::fs::write(dir.join("junk.safetensors"), b"not a checkpoint").unwrap();
    let (code, _, err) =
        modelc(&["infer", "specs/tiny-gpt.model", "--weights", dir.join("junk.safetensors").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a safetensors file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn losses(metrics: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| l.split("\"lr\"").next().unwrap().to_string())
        .collect()
}

#[test]
fn resume_continues_with_the_same_losses() {
    let dir = corpus_dir("resume");
    let data = dir.join("data.txt");
    let run = |out: &str, extra: &[&str]| {
        let out = dir.join(out);
        let mut args = train_args(&data, &out);
        args.extend(["--steps", "20", "--batch", "2", "--seq-len", "16", "--eval-every", "5", "--seed", "9"]);
        args.extend(extra);
        let (code, _, err) = modelc(&args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let straight = run("straight", &[]);
    let interrupted = run("interrupted", &["--until", "12"]);
    assert_eq!(losses(&interrupted.join("metrics.jsonl")).len(), 12);
    let resumed = run("interrupted", &["--resume", interrupted.to_str().unwrap()]);
    let (a, b) = (losses(&straight.join("metrics.jsonl")), losses(&resumed.join("metrics.jsonl")));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "a resumed run must repeat the uninterrupted losses exactly");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_saves_the_state_and_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    let dir = corpus_dir("sigint");
    let (data, out) = (dir.join("data.txt"), dir.join("run"));
    let mut args = train_args(&data, &out);
    args.extend([
        "--steps",
        "1000000",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "5",
        "--checkpoint-every",
        "0",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(&args)
        .current_dir(repo())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait for training to be under way: the first evaluation line.
    for line in lines.by_ref() {
        if line.unwrap().contains("eval") {
            break;
        }
    }
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("interrupted: saving the state")), "{rest:?}");
    assert!(out.join("state.safetensors").exists() && out.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn built_binaries_carry_their_spec_and_config() {
    let dir = corpus_dir("build");
    let exe = dir.join("gpt2-tiny");
    let fixture = repo().join("tests/fixtures/hf/gpt2");
    let (code, _, err) = modelc(&[
        "build",
        "specs/gpt2.model",
        "--config",
        fixture.join("config.json").to_str().unwrap(),
        "-o",
        exe.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("39,808 parameters"), "{err}");
    // Moved away from the repository, it still knows its spec and config.
    let moved = std::env::temp_dir().join(format!("modelc-moved-{}", std::process::id()));
    std::fs::create_dir_all(&moved).unwrap();
    let copy = moved.join("gpt2-tiny");
    std::fs::copy(&exe, &copy).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&copy).args(args).current_dir(&moved).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["check", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["params"], 39_808);
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("gpt2.model") && out.contains("infer") && !out.contains("fmt"), "{out}");
    // --set at run time goes on top of the built-in config.
    let (_, out, _) = run(&["check", "--json", "--set", "layers=1"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hyperparameters"]["layers"], 1);
    let (code, out, err) = run(&[
        "infer",
        "--weights",
        fixture.join("model.safetensors").to_str().unwrap(),
        "--prompt",
        "This License",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("generate.json")).unwrap()).unwrap();
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["new_token_ids"], want["new_token_ids"]);
    std::fs::remove_dir_all(&moved).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_killed_while_writing_keeps_a_loadable_checkpoint() {
    // With a checkpoint every step the process is nearly always writing one;
    // SIGKILL it three times and resume each time.
    let dir = corpus_dir("killed");
    let (data, out) = (dir.join("data.txt"), dir.join("run"));
    let state = out.join("state.safetensors");
    let mut last_step = 0;
    for round in 0..3 {
        let mut args = train_args(&data, &out);
        args.extend(["--steps", "100000", "--batch", "2", "--seq-len", "16", "--checkpoint-every", "1"]);
        args.extend(["--eval-every", "100000"]);
        if round > 0 {
            args.extend(["--resume", out.to_str().unwrap()]);
        }
        let before = std::fs::metadata(&state).and_then(|m| m.modified()).ok();
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
            .args(&args)
            .current_dir(repo())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this process has written a checkpoint of its own.
        loop {
            let now = std::fs::metadata(&state).and_then(|m| m.modified()).ok();
            if now.is_some() && now != before {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "training ended early");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let (tensors, meta) = modelc_runtime::weights::load_all(&state).expect("the checkpoint survives the kill");
        let step: usize = meta["step"].parse().unwrap();
        assert!(tensors.contains_key("embed.weight") && step > last_step, "step {step} after {last_step}");
        last_step = step;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every inspection command, with its flags, on every shipped spec, as a user
/// types it; and every subcommand's `--help`. Each either works or (no loss
/// to train, a model too large for one GPU buffer) ends with a clear error:
/// never a panic or a compiler bug. Too-large models are tried again small.
#[test]
fn every_command_runs_on_every_spec() {
    let svg = std::env::temp_dir().join(format!("modelc-every-{}.svg", std::process::id()));
    let svg = svg.to_str().unwrap();
    let commands: [&[&str]; 16] = [
        &["check"],
        &["check", "--json"],
        &["fmt", "--check"],
        &["ast"],
        &["ir"],
        &["ir", "--opt", "--stats"],
        &["ir", "--train"],
        &["info"],
        &["kernels"],
        &["kernels", "--size", "B=2", "--size", "T=8"],
        &["wgsl"],
        &["wgsl", "--train"],
        &["graph", "-o", svg],
        &["graph", "--depth", "8", "-o", svg],
        &["plan", "-o", svg],
        &["plan", "--train", "-o", svg],
    ];
    const SMALL: [&str; 12] = [
        "--set",
        "layers=1",
        "--set",
        "dim=64",
        "--set",
        "hidden=128",
        "--set",
        "heads=4",
        "--set",
        "kv_heads=2",
        "--set",
        "vocab=128",
    ];
    let specs = support::specs();
    assert!(specs.len() >= 10);
    for spec in &specs {
        let spec = spec.strip_prefix(repo()).unwrap().to_str().unwrap();
        // The encoders have no `train { loss: ... }`.
        let trains = !["specs/bert.model", "specs/minilm.model"].contains(&spec);
        for command in commands {
            let mut args = vec![command[0], spec];
            args.extend(&command[1..]);
            let (code, out, err) = modelc(&args);
            let what = format!("modelc {}", args.join(" "));
            assert!(!err.contains("panicked") && !err.contains("bug"), "{what}:\n{err}");
            let trains_here = !command.contains(&"--train") || trains;
            if code == 0 {
                assert!(trains_here, "{what} must say there is no loss");
                assert!(!out.is_empty() || command[0] == "fmt" || command[0] == "graph", "{what} printed nothing");
                continue;
            }
            assert_eq!(code, 1, "{what}:\n{err}");
            if !trains_here {
                assert!(err.contains("has no loss to train"), "{what}:\n{err}");
            } else {
                assert!(
                    command[0] == "wgsl" && err.contains("more than the 2^32 a WGSL index reaches"),
                    "{what}:\n{err}"
                );
                let mut small = args.clone();
                small.extend(SMALL);
                let (code, out, err) = modelc(&small);
                assert_eq!(code, 0, "{what} {}:\n{err}", SMALL.join(" "));
                assert!(out.contains("shaders over one buffer"), "{out:.300}");
            }
        }
    }
    let _ = std::fs::remove_file(svg);
    let (code, out, _) = modelc(&["--help"]);
    assert_eq!(code, 0);
    let subcommands: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert_eq!(subcommands.len(), 18, "{out}");
    for c in subcommands {
        let (code, out, err) = modelc(&[c, "--help"]);
        assert_eq!(code, 0, "{c} --help: {err}");
        assert!(out.contains("Usage: modelc ") && out.contains("-h, --help"), "{c} --help:\n{out}");
    }
}

/// A mixture of experts reports its tokens per expert (every token's k
/// choices, per mixture) and its load-balancing loss in metrics.jsonl, with
/// and without accumulated micro-batches, sparse and dense alike.
#[test]
fn training_a_mixture_reports_expert_load_and_the_balance_loss() {
    let dir = corpus_dir("experts");
    let data = dir.join("data.txt");
    let runs =
        [("run", &[][..], 1), ("accumulated", &["--grad-accum", "2"][..], 2), ("dense", &["--dense-routes"][..], 1)];
    for (run, extra, micro_batches) in runs {
        let out = dir.join(run);
        let mut args = vec!["train", "specs/mixtral.model", "--data", data.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap(), "--steps", "2", "--batch", "4", "--seq-len", "8"]);
        args.extend(["--set", "layers=2", "--set", "dim=16", "--set", "heads=2", "--set", "kv_heads=1"]);
        args.extend(["--set", "hidden=24", "--set", "experts=4", "--set", "vocab=256"]);
        args.extend(extra);
        let (code, _, err) = modelc(&args);
        assert_eq!(code, 0, "{run}: {err}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let steps: Vec<serde_json::Value> = metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["loss"].is_number())
            .collect();
        assert_eq!(steps.len(), 2, "{run}: {metrics}");
        for step in steps {
            let load = step["expert_load"].as_array().unwrap_or_else(|| panic!("{run}: {step}"));
            assert_eq!(load.len(), 2, "{run}: one list per layer: {step}");
            for layer in load {
                let counts: Vec<u64> = layer.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
                // 4 sequences of 8 tokens a micro-batch, each token to 2 of 4 experts.
                assert_eq!((counts.len(), counts.iter().sum::<u64>()), (4, micro_batches * 4 * 8 * 2), "{run}: {step}");
            }
            assert!(step["aux_loss"].as_f64().is_some_and(|a| a > 0.0), "{run}: {step}");
        }
    }
}

/// `repeat(n) with i -> ...` varies a layer by its index: alternating
/// sliding-window and full attention (as Gemma 2 and Mistral-style ports
/// need). The program has the windows where asked, the text formats as
/// written, and the decoder (ring caches for the windowed layers, full ones
/// for the others) gives the tokens recomputing the whole context gives.
#[test]
fn repeat_with_an_index_alternates_windows() {
    let dir = corpus_dir("alternating");
    let spec = dir.join("alternating.model");
    let text = "import std.core
import std.blocks

model Alternating(vocab: int = 256, dim: int = 16, window: int = 4) {
    embed: Embedding(vocab, dim)
    layers: repeat(4) with i -> PreNormBlock(dim, 2, 32, window: if i % 2 == 0 then window else none)

    forward(input_ids: [B, T] int) -> logits: [B, T, vocab] =
        (input_ids |> embed |> layers) @ transpose(embed.weight)

    train {
        loss: cross_entropy(logits[:, :-1], input_ids[:, 1:])
    }
}
";
    std::fs::write(&spec, text).unwrap();
    let spec = spec.to_str().unwrap();
    let (code, _, err) = modelc(&["fmt", "--check", spec]);
    assert_eq!(code, 0, "{err}");
    let (code, ir, err) = modelc(&["ir", spec]);
    assert_eq!(code, 0, "{err}");
    let windows: Vec<bool> = ir.lines().filter(|l| l.contains("= attention")).map(|l| l.contains("window 4")).collect();
    assert_eq!(windows, [true, false, true, false], "{ir}");
    let (data, out) = (dir.join("data.txt"), dir.join("run"));
    let (code, _, err) = modelc(&[
        "train",
        spec,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "20",
        "--batch",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
    ]);
    assert_eq!(code, 0, "{err}");
    let weights = out.join("model.safetensors");
    let generate = |extra: &[&str]| {
        let mut args = vec!["infer", spec, "--weights", weights.to_str().unwrap(), "--prompt", "the quick brown fox"];
        args.extend(["--max-new-tokens", "40", "--temperature", "0", "--context", "64", "--json"]);
        args.extend(extra);
        let (code, out, err) = modelc(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["new_token_ids"].clone()
    };
    assert_eq!(generate(&[]), generate(&["--no-cache"]));
}

/// `--profile`: kernel time added up by spec line and layer (the rows add
/// up to the total, the products come first), each phase's share in
/// kernels, and a Chrome trace naming every kernel's line and layer.
#[test]
fn profile_adds_kernel_time_up_by_spec_line_and_writes_a_trace() {
    let dir = corpus_dir("profile");
    let (data, out, trace) = (dir.join("data.txt"), dir.join("run"), dir.join("trace.json"));
    let profile = format!("--profile={}", trace.display());
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = ["train", "specs/tiny-gpt.model", "--data", data, "--out", out, "--steps", "3", "--batch", "4"];
    let (code, _, err) = modelc(&[&args[..], &["--seq-len", "64", &profile]].concat());
    assert_eq!(code, 0, "{err}");
    let total: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("profile: ")?.split(" s in kernels").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no total:\n{err}"));
    assert!(err.lines().any(|l| l.starts_with("training step: 3 x, median ")), "{err}");
    // The rows of the table by line: seconds, share, kernels, line, code.
    let table: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("seconds") || !l.contains(" line "))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("seconds"))
        .collect();
    let seconds: f64 = table.iter().map(|l| l.split_whitespace().next().unwrap().parse::<f64>().unwrap()).sum();
    assert!((seconds - total).abs() < 2e-3 + 1e-4 * table.len() as f64, "{seconds} vs {total}:\n{err}");
    let top = table.first().unwrap_or_else(|| panic!("no rows:\n{err}"));
    assert!(top.contains("stdlib/core.model:") && top.ends_with("linear(x, weight, bias)"), "{err}");
    assert!(err.contains("blocks.*.mlp.fc1") && err.contains("blocks.*.self_attn.q_proj"), "{err}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let kernels: Vec<&serde_json::Value> = events.iter().filter(|e| e["cat"] == "kernel").collect();
    assert!(kernels.len() > 100, "{} kernel events", kernels.len());
    assert!(kernels.iter().all(|e| e["ph"] == "X" && e["dur"].as_f64().is_some() && e["args"]["line"].is_string()));
    assert!(kernels.iter().any(|e| e["args"]["layer"] == "blocks.0.mlp.fc1"));
    let steps = events.iter().filter(|e| e["name"] == "training step").count();
    assert_eq!(steps, 3);
    // A trace that cannot be written is refused before anything runs.
    let (code, _, err) = modelc(&[&args[..], &["--profile=/nonexistent-folder/trace.json"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("E0709") && err.contains("no folder /nonexistent-folder"), "{err}");
    assert!(!err.contains("training "), "{err}");
    // Decoding runs a token's q/k/v products side by side in one section
    // (`cpu/siblings.rs`); the profile splits that time over the three.
    let weights = dir.join("run").join("model.safetensors");
    let trace = format!("--profile={}", dir.join("infer.json").display());
    let args = ["infer", "specs/tiny-gpt.model", "--weights", weights.to_str().unwrap(), "--prompt", "the"];
    let (code, _, err) = modelc(&[&args[..], &["--max-new-tokens", "8", "--temperature", "0", &trace]].concat());
    assert_eq!(code, 0, "{err}");
    for projection in ["q_proj", "k_proj", "v_proj"] {
        let row = err.lines().find(|l| l.ends_with(&format!("self_attn.{projection}")));
        let seconds: f64 = row.and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
        assert!(seconds > 0.0, "{projection}:\n{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `plan`: the memory plan as a picture (a rectangle per arena value,
/// inside the axes, coloured by layer) and the peak as a formula that
/// equals the planned peak at the sizes given and at 2x and 4x each (one
/// placement for all six), for tiny-gpt and LLaMA, training and forward.
#[test]
fn plan_draws_the_memory_plan_and_writes_the_peak_as_a_formula() {
    let svg = std::env::temp_dir().join(format!("modelc-plan-{}.svg", std::process::id()));
    let sizes = ["--size", "B=8", "--size", "T=128"];
    // (planned, the formula, planned at those sizes alone) at each size.
    let checked = |out: &str| -> Vec<(u64, u64, u64)> {
        out.lines()
            .filter(|l| l.contains(" planned "))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let at = |word: &str| {
                    w[w.iter().position(|x| *x == word).unwrap() + 1].trim_end_matches(';').parse().unwrap()
                };
                (at("planned"), at("formula"), at("alone"))
            })
            .collect()
    };
    let (code, out, err) =
        modelc(&[&["plan", "specs/tiny-gpt.model", "--train", "-o", svg.to_str().unwrap()], &sizes[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("TinyGPT: the training program's memory plan at B=8, T=128, peak "), "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("peak(B, T) = "), "{out}");
    let rows = checked(&out);
    assert_eq!(rows.len(), 6, "{out}");
    assert!(rows.iter().all(|(planned, formula, _)| planned == formula), "{out}");
    assert!(out.contains("  B=32, T=128 ") && out.contains("  B=8, T=512 "), "{out}");
    // What a program at one of these sizes plans alone (by itself exact at
    // its own formula) stacks otherwise at some.
    assert!(rows.iter().any(|(planned, _, alone)| planned != alone), "{out}");
    // tiny-gpt's 67 weights and their two moments, written over the old ones.
    assert!(out.contains("\n201 inputs written where they lie, 9.91 MB held once"), "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    let values = text.split(r#"<g id="values""#).nth(1).unwrap().split("</g>").next().unwrap();
    let rects: Vec<&str> = values.lines().filter(|l| l.starts_with("<rect")).collect();
    assert!(rects.len() > 200, "{} values", rects.len());
    let number = |r: &str, attr: &str| -> f64 {
        r.split(&format!(r#" {attr}=""#)).nth(1).unwrap().split('"').next().unwrap().parse().unwrap()
    };
    for r in &rects {
        let (x, y, w, h) = (number(r, "x"), number(r, "y"), number(r, "width"), number(r, "height"));
        assert!(x >= 70.0 && x + w <= 1170.5 && y >= 49.5 && y + h <= 610.5, "outside the axes: {r}");
    }
    assert!(text.contains(">blocks.0.self_attn</text>") && text.contains(">the optimiser's update</text>"));
    for (spec, train) in [("tiny-gpt", false), ("llama", false), ("llama", true)] {
        let args = ["plan", &format!("specs/{spec}.model"), "-o", svg.to_str().unwrap()];
        let (code, out, err) = modelc(&[&args[..], &sizes[..], if train { &["--train"][..] } else { &[] }].concat());
        assert_eq!(code, 0, "{err}");
        let rows = checked(&out);
        assert_eq!(rows.len(), 6, "{out}");
        assert!(rows.iter().all(|(planned, formula, _)| planned == formula), "{out}");
    }
    // Under a budget: the plan `train --memory-budget` would choose, smaller.
    let peak =
        |out: &str| -> f64 { out.split(", peak ").nth(1).unwrap().split(" MB").next().unwrap().parse().unwrap() };
    let args = ["plan", "specs/tiny-gpt.model", "--train", "-o", svg.to_str().unwrap()];
    let (_, whole, _) = modelc(&[&args[..], &sizes[..]].concat());
    let (code, out, err) = modelc(&[&args[..], &sizes[..], &["--memory-budget", "35MB"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("memory budget 33.4 MiB besides the weights, gradients and moments: "), "{out}");
    assert!(out.contains("activations recomputed between"), "{out}");
    assert!(peak(&out) < peak(&whole), "{out}\n{whole}");
    std::fs::remove_file(&svg).unwrap();
}

/// The training losses a run in `out` logged (none when it wrote no metrics).
fn logged_losses(out: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// `train --precision bf16` (or the spec's `precision: bf16`): products with
/// bf16 operands train to losses near the f32 run's but not equal to them
/// (the rounding is real), the flag and the spec setting are the same run,
/// and the GPU and an unknown precision are refused by name.
#[test]
fn bf16_products_train_close_to_f32() {
    let dir = corpus_dir("bf16");
    let data = dir.join("data.txt");
    let spec = dir.join("tiny-bf16.model");
    let text = std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap();
    std::fs::write(&spec, text.replace("        clip: 1.0\n", "        clip: 1.0\n        precision: bf16\n")).unwrap();
    let run = |name: &str, spec: &str, extra: &[&str]| {
        let out = dir.join(name);
        let args = ["train", spec, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let rest = ["--steps", "4", "--batch", "8", "--seq-len", "64", "--seed", "5"];
        let (code, _, err) = modelc(&[&args[..], &rest[..], extra].concat());
        (code, err, logged_losses(&out))
    };
    let (code, err, f32) = run("f32", "specs/tiny-gpt.model", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("products in bf16"), "{err}");
    let (code, err, bf16) = run("bf16", "specs/tiny-gpt.model", &["--precision", "bf16"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(", products in bf16"), "{err}");
    assert_eq!((f32.len(), bf16.len()), (4, 4));
    assert_ne!(f32, bf16, "bf16 operands change the sums");
    for (a, b) in f32.iter().zip(&bf16) {
        assert!((a - b).abs() < 0.01 * a, "f32 {f32:?} against bf16 {bf16:?}");
    }
    let (code, err, from_spec) = run("spec", spec.to_str().unwrap(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(from_spec, bf16, "the spec's `precision: bf16` is --precision bf16");
    let (code, err, _) = run("gpu", "specs/tiny-gpt.model", &["--precision", "bf16", "--device", "gpu"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--precision bf16 runs on the CPU; on the GPU products are f32"), "{err}");
    let (code, err, _) = run("f16", "specs/tiny-gpt.model", &["--precision", "f16"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'f16' for '--precision") && err.contains("[possible values: f32, bf16]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train --memory-budget`: a budget the default plan fits changes nothing;
/// a smaller one recomputes activations between checkpoints, says what it
/// costs and trains to the same losses; one nothing fits is refused with
/// the smallest plan there is.
#[test]
fn memory_budget_recomputes_activations_with_the_same_losses() {
    let dir = corpus_dir("budget");
    let data = dir.join("data.txt");
    let run = |name: &str, budget: Option<String>| {
        let out = dir.join(name);
        let mut args: Vec<String> =
            ["train", "specs/tiny-gpt.model", "--data", data.to_str().unwrap()].iter().map(|s| s.to_string()).collect();
        let rest = ["--out", out.to_str().unwrap(), "--steps", "3", "--batch", "16", "--seq-len", "128", "--seed", "5"];
        args.extend(rest.iter().map(|s| s.to_string()));
        args.extend(budget.map(|b| vec!["--memory-budget".to_string(), b]).unwrap_or_default());
        let (code, _, err) = modelc(&args.iter().map(String::as_str).collect::<Vec<_>>());
        (code, err, logged_losses(&out))
    };
    let mib = |err: &str, before: &str| -> f64 {
        let head = &err[..err.find(before).unwrap_or_else(|| panic!("no `{before}`:\n{err}"))];
        head.trim_end().trim_end_matches(" MiB").rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (code, _, plain) = run("plain", None);
    assert_eq!(code, 0);
    let (code, err, roomy) = run("roomy", Some("100GiB".into()));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no activations recomputed"), "{err}");
    assert_eq!(roomy, plain);
    // Nine tenths of the default plan's activations.
    let (held, planned) = (mib(&err, " held before the weights"), mib(&err, " planned for the step's activations"));
    let budget = format!("{:.1}MiB", held + 48.0 + 0.9 * planned);
    let (code, err, tight) = run("tight", Some(budget));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("activations recomputed between") && err.contains("GFLOP a step"), "{err}");
    assert!(mib(&err, " planned for the step's activations") <= 0.9 * planned + 0.1, "{err}");
    assert_eq!(tight, plain, "recomputation changes no loss");
    let (code, err, _) = run("none", Some("1MB".into()));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the smallest plan of the step's activations needs"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Reversal examples for an encoder-decoder: strings of `lo..=hi` digits
/// (bytes), the decoder fed token 1 then the reversed digits, its labels the
/// reversed digits then token 2; padded with 0 (labels with -100, ignored).
/// The source strings, in file order.
fn reversal_examples(path: &std::path::Path, n: usize, (lo, hi): (usize, usize), mut seed: u64) -> Vec<String> {
    let mut next = |below: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize % below
    };
    let (s, t) = (hi, hi + 1);
    let (mut src, mut mask, mut tgt, mut labels) =
        (vec![0i32; n * s], vec![0i32; n * s], vec![0i32; n * t], vec![-100i32; n * t]);
    let mut lines = Vec::new();
    for i in 0..n {
        let len = lo + next(hi - lo + 1);
        let digits: Vec<u8> = (0..len).map(|_| b'0' + next(10) as u8).collect();
        for (j, d) in digits.iter().enumerate() {
            src[i * s + j] = *d as i32;
            mask[i * s + j] = 1;
        }
        tgt[i * t] = 1;
        for (j, d) in digits.iter().rev().enumerate() {
            tgt[i * t + 1 + j] = *d as i32;
            labels[i * t + j] = *d as i32;
        }
        labels[i * t + len] = 2;
        lines.push(String::from_utf8(digits).unwrap());
    }
    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensors = [
        ("src_ids", bytes(&src), s),
        ("src_mask", bytes(&mask), s),
        ("tgt_ids", bytes(&tgt), t),
        ("labels", bytes(&labels), t),
    ];
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, b, len)| {
            (*name, safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![n, *len], b).unwrap())
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    lines
}

/// A small Transformer of "Attention Is All You Need"
const REVERSER: [&str; 14] = [
    "--set",
    "vocab=256",
    "--set",
    "dim=32",
    "--set",
    "heads=2",
    "--set",
    "hidden=64",
    "--set",
    "encoder_layers=1",
    "--set",
    "decoder_layers=1",
    "--set",
    "dropout=0.0",
];

/// `train --data` with examples (a safetensors file per input and target)
/// trains an encoder-decoder; its evaluation's exact match is what greedy
/// decoding of the held-out sources with `infer --prompts` gets right.
#[test]
fn a_transformer_trained_on_examples_decodes_what_its_evaluation_scored() {
    let dir = corpus_dir("reverse");
    let (data, out) = (dir.join("reverse.safetensors"), dir.join("run"));
    let sources = reversal_examples(&data, 3000, (2, 4), 7);
    let mut args =
        vec!["train", "specs/transformer.model", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(REVERSER);
    args.extend(["--steps", "1000", "--batch", "32", "--lr", "1e-2", "--clip", "1", "--warmup", "20"]);
    args.extend(["--eval-every", "1000", "--eval-split", "0.2", "--seed", "1"]);
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("on 3000 examples (600 held out): 1000 steps of 32"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(last.iter().any(|v| v["examples_per_s"].is_number()), "{metrics}");
    let exact = last.iter().rev().find_map(|v| v["eval_exact_match"].as_f64()).expect("an exact-match score");
    // The weights alone are saved, not the batch.
    let (saved, _) = modelc_runtime::weights::load_all(&out.join("model.safetensors")).unwrap();
    assert!(saved.keys().all(|k| !k.ends_with("_ids") && k != "labels"), "{:?}", saved.keys());

    let held = dir.join("held.txt");
    std::fs::write(&held, sources[2400..].join("\n") + "\n").unwrap();
    let model = out.join("model.safetensors");
    let mut args = vec!["infer", "specs/transformer.model", "--weights", model.to_str().unwrap()];
    args.extend(REVERSER);
    args.extend(["--prompts", held.to_str().unwrap(), "--start-id", "1", "--stop-id", "2", "--temperature", "0"]);
    args.extend(["--max-new-tokens", "5"]);
    let (code, decoded, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = decoded.lines().collect();
    assert_eq!(lines.len(), 600, "{decoded}");
    let right = lines.iter().zip(&sources[2400..]).filter(|(got, src)| got.bytes().eq(src.bytes().rev())).count();
    assert!((right as f64 / 600.0 - exact).abs() < 1e-5, "greedy {right}/600, evaluated {exact}");
    assert!(exact >= 0.5, "the model did not learn to reverse: {exact}\n{metrics}");
    // The key/value cache (and the encoder run once) changes nothing: every
    // step recomputed gives the same lines.
    args.push("--no-cache");
    let (code, recomputed, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(recomputed, decoded);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Examples that do not fit the model, text for a model that takes more
/// than token ids, and an encoder-decoder without a start token are refused
/// by name.
#[test]
fn examples_and_encoder_decoders_reject_what_does_not_fit() {
    let dir = corpus_dir("reverse-errors");
    let data = dir.join("reverse.safetensors");
    reversal_examples(&data, 20, (2, 4), 1);
    let run = |extra: &[&str]| {
        let mut args =
            vec!["train", "specs/transformer.model", "--out", dir.to_str().unwrap(), "--steps", "1", "--overwrite"];
        args.extend(REVERSER);
        args.extend(extra);
        modelc(&args)
    };
    let (code, _, err) = run(&["--data", dir.join("data.txt").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("also takes `src_ids`") && err.contains("--data FILE.safetensors"), "{err}");
    let (code, _, err) = run(&["--data", data.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    let other = dir.join("other.safetensors");
    let zeros = vec![0u8; 20 * 4 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![20, 4], &zeros).unwrap();
    safetensors::tensor::serialize_to_file([("input_ids", view)], None, &other).unwrap();
    let (code, _, err) = run(&["--data", other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("has `input_ids`, which is neither an input"), "{err}");
    // Labels that name no class of the logits (vocab 256) would train on nothing.
    let (ids, labels) =
        (vec![0u8; 20 * 4 * 4], [999i32; 20 * 4].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let tensor = |bytes| safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![20, 4], bytes).unwrap();
    safetensors::tensor::serialize_to_file(
        [("src_ids", tensor(&ids)), ("tgt_ids", tensor(&ids)), ("labels", tensor(&labels))],
        None,
        &other,
    )
    .unwrap();
    let (code, _, err) = run(&["--data", other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("`labels` element 0 is 999, not a class of"), "{err}");

    let model = dir.join("model.safetensors");
    let mut args = vec!["infer", "specs/transformer.model", "--weights", model.to_str().unwrap(), "--prompt", "123"];
    args.extend(REVERSER);
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 1);
    assert!(err.contains("is an encoder-decoder: give the token its output starts from, --start-id N"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
