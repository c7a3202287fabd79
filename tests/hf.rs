//! modelc against Hugging Face `transformers` on tiny checkpoints written by
//! `tests/hf_fixtures.py` (config.json, model.safetensors, tokenizer.json,
//! the logits transformers computes, and its greedy `generate`).

mod support;

use modelc_runtime::cpu::Tensor;
use modelc_runtime::weights::{self, Tensors};
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

fn fixture(model: &str) -> PathBuf {
    repo().join("tests/fixtures/hf").join(model)
}

/// The spec a fixture's checkpoint is for: its folder's name, less the
/// `-ties` of a variant (Mixtral with every router weight zero, so each
/// token's experts tie and `torch.topk`'s order of equal values decides)
/// or the `-parallel` of one (StableLM with the parallel residual).
fn spec(model: &str) -> String {
    format!("specs/{}.model", model.trim_end_matches("-ties").trim_end_matches("-parallel"))
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modelc-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `modelc forward` on the fixture's inputs with the given weights; the logits.
fn forward(model: &str, weights: &Path, out: &Path) -> Tensor {
    forward_with(model, weights, out, &[])
}

/// `forward` with extra flags.
fn forward_with(model: &str, weights: &Path, out: &Path, extra: &[&str]) -> Tensor {
    let dir = fixture(model);
    let spec = spec(model);
    let mut args = vec![
        "forward",
        &spec,
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--inputs",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--outputs",
        out.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    weights::load_all(out).unwrap().0.remove("logits").expect("a logits output")
}

fn assert_logits_match(model: &str, got: &Tensor) {
    let want = weights::load_all(&fixture(model).join("logits.safetensors")).unwrap().0.remove("logits").unwrap();
    assert_eq!(got.shape, want.shape);
    let worst = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{model}: logits differ from transformers' by up to {worst}");
}

/// The fixtures whose logits and gradients are compared with transformers',
/// with extra flags: Mixtral with its experts routed sparsely (the default)
/// and densely, and with tied experts (experts 2 and 3 of 4 chosen, as
/// torch.topk chooses); Qwen2 and Gemma from `tests/family_fixtures.py`;
/// the Vision Transformer from `tests/vit_fixtures.py`.
const COMPARED: [(&str, &[&str]); 14] = [
    ("gpt2", &[]),
    ("llama", &[]),
    ("qwen2", &[]),
    ("gemma", &[]),
    ("gemma2", &[]),
    ("qwen3", &[]),
    ("stablelm", &[]),
    ("stablelm-parallel", &[]),
    ("gpt-neox", &[]),
    ("mixtral", &[]),
    ("mixtral", &["--dense-routes"]),
    ("mixtral-ties", &[]),
    ("mixtral-ties", &["--dense-routes"]),
    ("vit", &[]),
];

#[test]
fn forward_matches_transformers() {
    for (model, extra) in COMPARED {
        let out = scratch(&format!("forward-{model}-{}", extra.len()));
        let weights = fixture(model).join("model.safetensors");
        assert_logits_match(model, &forward_with(model, &weights, &out.join("logits.safetensors"), extra));
    }
}

#[test]
fn sharded_and_base_model_checkpoints_load() {
    let (tensors, _) = weights::load_all(&fixture("gpt2").join("model.safetensors")).unwrap();
    // Two shards and an index, as save_pretrained(max_shard_size=...) writes them.
    let dir = scratch("sharded");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let t: Tensors = part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        weights::save(&dir.join(shard), &t).unwrap();
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_logits_match("gpt2", &forward("gpt2", &dir, &dir.join("out.safetensors")));

    // The original GPT-2 upload: base-model names (no `transformer.`) and the causal-mask buffers.
    let base = scratch("base");
    let mut renamed: Tensors =
        tensors.iter().map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(k).to_string(), v.clone())).collect();
    renamed.insert("h.0.attn.bias".into(), Tensor::new(vec![1, 1, 4, 4], vec![1.0; 16]));
    weights::save(&base.join("model.safetensors"), &renamed).unwrap();
    assert_logits_match("gpt2", &forward("gpt2", &base.join("model.safetensors"), &base.join("out.safetensors")));
}

fn generate(model: &str, extra: &[&str]) -> serde_json::Value {
    let dir = fixture(model);
    let spec = spec(model);
    let mut args = vec![
        "infer",
        &spec,
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--weights",
        dir.join("model.safetensors").to_str().unwrap(),
        "--prompt",
        "This License",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--json",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn greedy_decoding_matches_transformers_generate() {
    for model in ["gpt2", "llama"] {
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(model).join("generate.json")).unwrap()).unwrap();
        // The tokenizer.json beside the weights encodes the prompt as transformers did.
        let cached = generate(model, &[]);
        assert_eq!(cached["prompt_ids"], want["prompt_ids"], "{model}: prompt ids");
        assert_eq!(cached["new_token_ids"], want["new_token_ids"], "{model}: KV-cached decoding");
        assert_eq!(cached["text"], want["text"], "{model}: decoded text");
        let recomputed = generate(model, &["--no-cache"]);
        assert_eq!(recomputed["new_token_ids"], want["new_token_ids"], "{model}: decoding without the cache");
        let halves = generate(model, &["--kv-cache", "f16"]);
        assert_eq!(halves["new_token_ids"], want["new_token_ids"], "{model}: decoding with an f16 cache");
    }
}

#[test]
fn a_hugging_face_folder_brings_its_config_and_tokenizer() {
    // `--weights DIR` reads DIR/config.json (no --config), as from_pretrained(DIR) does.
    for model in ["gpt2", "llama"] {
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(model).join("generate.json")).unwrap()).unwrap();
        let spec = spec(model);
        let dir = fixture(model);
        let (code, out, err) = modelc(&[
            "infer",
            &spec,
            "--weights",
            dir.to_str().unwrap(),
            "--prompt",
            "This License",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--json",
        ]);
        assert_eq!(code, 0, "{model}: {err}");
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["new_token_ids"], want["new_token_ids"], "{model}");
    }
}

#[test]
fn inputs_that_do_not_fit_are_named() {
    let dir = scratch("bad-inputs");
    let bad = dir.join("inputs.safetensors");
    let mut t = Tensors::new();
    t.insert("input_id".into(), Tensor::new(vec![1, 3], vec![1.0, 2.0, 3.0]));
    weights::save(&bad, &t).unwrap();
    let config = fixture("gpt2").join("config.json");
    let weights = fixture("gpt2").join("model.safetensors");
    let (code, _, err) = modelc(&[
        "forward",
        "specs/gpt2.model",
        "--config",
        config.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--inputs",
        bad.to_str().unwrap(),
        "--outputs",
        dir.join("out.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("missing input `input_ids` [B, T] int") && err.contains("unexpected input `input_id`"),
        "{err}"
    );
}

/// `modelc train` on the fixture's batch from its weights, writing to `out`; the losses.
fn train_on_batch(model: &str, out: &Path, extra: &[&str]) -> Vec<f64> {
    let dir = fixture(model);
    let spec = spec(model);
    // Token ids, or examples with their labels (an image classifier), one batch of them all.
    let examples = dir.join("examples.safetensors");
    let (data, batch) = match weights::load_all(&examples) {
        Ok((t, _)) => (
            ("--data", examples),
            vec!["--batch".into(), t["labels"].shape[0].to_string(), "--eval-split".into(), "0".into()],
        ),
        Err(_) => (("--batch-file", dir.join("inputs.safetensors")), Vec::new()),
    };
    let files = [
        ("--config", dir.join("config.json")),
        ("--weights", dir.join("model.safetensors")),
        data,
        ("--out", out.to_path_buf()),
    ];
    let mut args: Vec<String> = vec!["train".into(), spec];
    args.extend(batch);
    for (flag, path) in files {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect()
}

#[test]
fn gradients_match_transformers() {
    for (model, extra) in COMPARED {
        let out = scratch(&format!("grads-{model}-{}", extra.len()));
        let path = out.join("grads.safetensors");
        train_on_batch(model, &out, &[&["--steps", "1", "--dump-grads", path.to_str().unwrap()], extra].concat());
        let (got, _) = weights::load_all(&path).unwrap();
        let (want, _) = weights::load_all(&fixture(model).join("grads.safetensors")).unwrap();
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        assert_eq!(names, {
            let mut w: Vec<&String> = want.keys().collect();
            w.sort();
            w
        });
        for (name, g) in &got {
            let worst = g.data.iter().zip(&want[name].data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // f32 sums: 1e-5 of the tensor's largest gradient (Gemma's tied,
            // scaled embedding gathers gradients of up to 3.4).
            let largest = want[name].data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(worst <= 1e-5 * largest, "{model}: gradient of `{name}` differs from torch's by {worst}");
        }
        // The run folder is a Hugging Face checkpoint again: config.json and model.safetensors.
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let fixture_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(model).join("config.json")).unwrap()).unwrap();
        assert_eq!(config["vocab_size"], fixture_config["vocab_size"]);
        assert!(std::fs::read(out.join("loss.png")).unwrap().starts_with(b"\x89PNG"));
    }
}

#[test]
fn accumulated_gradients_equal_one_batch() {
    // Two micro-batches of the same batch average to that batch's gradient.
    let (a, b) = (scratch("accum-1"), scratch("accum-2"));
    let one = train_on_batch("llama", &a, &["--steps", "4", "--lr", "1e-2"]);
    let two = train_on_batch("llama", &b, &["--steps", "4", "--lr", "1e-2", "--grad-accum", "2"]);
    assert_eq!(one.len(), 4);
    assert!(one[3] < one[0], "the loss falls on a batch it trains on: {one:?}");
    for (x, y) in one.iter().zip(&two) {
        assert!((x - y).abs() < 1e-4, "{one:?} vs {two:?}");
    }
}

#[test]
fn a_diverging_run_names_where_values_went_bad() {
    // A path of fixed length, relative to the repository, keeps the message's wrapping stable.
    let out = Path::new("target/diverging-run");
    let dir = fixture("llama");
    let (code, _, err) = modelc(&[
        "train",
        "specs/llama.model",
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--batch-file",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--optimizer",
        "sgd",
        "--lr",
        "1e20",
        "--clip",
        "0",
        "--steps",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(err);
    assert!(repo().join(out).join("state.safetensors").exists(), "the state before the bad step is kept");
}

#[test]
fn encoders_match_transformers_and_embed_as_sentence_transformers_does() {
    let dir = fixture("bert");
    let config = dir.join("config.json");
    let weights = dir.join("model.safetensors");
    // last_hidden_state of a padded batch, through the BERT and the MiniLM specs.
    let (inputs, _) = weights::load_all(&dir.join("inputs.safetensors")).unwrap();
    let (want, _) = weights::load_all(&dir.join("outputs.safetensors")).unwrap();
    let want = &want["last_hidden_state"];
    for spec in ["specs/bert.model", "specs/minilm.model"] {
        let out = scratch(&format!("encoder-{}", spec.len()));
        let path = out.join("out.safetensors");
        let (code, _, err) = modelc(&[
            "forward",
            spec,
            "--config",
            config.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--inputs",
            dir.join("inputs.safetensors").to_str().unwrap(),
            "--outputs",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let got = weights::load_all(&path).unwrap().0.remove("last_hidden_state").unwrap();
        assert_eq!(got.shape, want.shape);
        let dim = want.shape[2];
        for (row, m) in inputs["attention_mask"].data.iter().enumerate() {
            if *m == 0.0 {
                continue; // padding: what it holds is not defined
            }
            for i in row * dim..(row + 1) * dim {
                assert!((got.data[i] - want.data[i]).abs() <= 1e-4, "{spec}: state {i}");
            }
        }
    }
    // Sentences as arguments and on stdin give sentence-transformers' embeddings.
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("embeddings.json")).unwrap()).unwrap();
    let texts: Vec<&str> = records.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let mut args = vec!["embed", "specs/minilm.model", "--config", config.to_str().unwrap()];
    args.extend(["--weights", weights.to_str().unwrap()]);
    let mut with_args = args.clone();
    with_args.extend(&texts);
    let (code, out, err) = modelc(&with_args);
    assert_eq!(code, 0, "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(&args)
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(texts.join("\n").as_bytes()).unwrap();
    let piped = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(piped, out);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), records.len());
    for (got, want) in lines.iter().zip(&records) {
        assert_eq!(got["text"], want["text"]);
        let (g, w) = (got["embedding"].as_array().unwrap(), want["embedding"].as_array().unwrap());
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-5, "{}", want["text"]);
        }
    }
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// `modelc forward` of the LLaMA fixture's inputs with extra flags; the logits.
fn llama_forward(out: &Path, extra: &[&str]) -> Tensor {
    let dir = fixture("llama");
    let path = out.join("logits.safetensors");
    let mut args = vec![
        "forward".to_string(),
        "specs/llama.model".into(),
        "--config".into(),
        dir.join("config.json").display().to_string(),
        "--inputs".into(),
        dir.join("inputs.safetensors").display().to_string(),
        "--outputs".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    weights::load_all(&path).unwrap().0.remove("logits").unwrap()
}

/// `--dtype`: the LLaMA and GPT-2 fixtures' logits (largest 4.06 and 3.98)
/// with bf16, q8 and q4 weights stay within stated bounds of transformers'
/// f32 logits (LLaMA 0.05, 0.19, 1.77 measured; GPT-2, whose Conv1D
/// weights are packed from their transposes, 0.02, 0.10, 1.62; q8 and q4
/// products round their activations to int8 blocks too, and these
/// fixtures' weights are large and their layers 32 wide, so q4's 16 levels
/// show), and each error is not zero (the products really read the compact
/// weights), the prompt's panels and decoding's matrix-vector products
/// alike; greedy decoding with bf16 weights still gives transformers'
/// tokens, and q8 decoding with and without the cache agree.
#[test]
fn compact_weights_stay_close_to_f32() {
    for model in ["llama", "gpt2"] {
        let out = scratch(&format!("dtype-{model}"));
        let dir = fixture(model);
        let want = weights::load_all(&dir.join("logits.safetensors")).unwrap().0.remove("logits").unwrap();
        for (dtype, bound) in [("f32", 1e-4), ("bf16", 0.1), ("q8", 0.25), ("q4", 2.5)] {
            let path = out.join(format!("{dtype}.safetensors"));
            let got = forward_with(model, &dir.join("model.safetensors"), &path, &["--dtype", dtype]);
            let worst = max_difference(&got, &want);
            assert!(worst <= bound, "{model} {dtype}: logits differ from f32 by up to {worst}");
            if dtype != "f32" {
                assert!(worst > 1e-5, "{model} {dtype}: the logits equal f32's, so the compact weights were not used");
            }
        }
    }
    // The GPU (lavapipe here) takes f32 weights only, and says so.
    let dir = fixture("gpt2");
    let (code, _, err) = modelc(&[
        "forward",
        "specs/gpt2.model",
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--weights",
        dir.join("model.safetensors").to_str().unwrap(),
        "--inputs",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--outputs",
        "target/unused.safetensors",
        "--dtype",
        "q8",
        "--device",
        "gpu",
    ]);
    assert!(code != 0 && err.contains("--dtype q8: compact weights run on the CPU only; add --device cpu"), "{err}");
    // An f16 cache is the CPU's, and needs a cache.
    let (config, weights) = (dir.join("config.json"), dir.join("model.safetensors"));
    let refused = |extra: &[&str], message: &str| {
        let mut args = vec!["infer", "specs/gpt2.model", "--config", config.to_str().unwrap()];
        args.extend(["--weights", weights.to_str().unwrap(), "--prompt-ids", "1", "--kv-cache", "f16"]);
        args.extend(extra);
        let (code, _, err) = modelc(&args);
        assert!(code != 0 && err.contains(message), "{extra:?}: {err}");
    };
    refused(&["--device", "gpu"], "--kv-cache f16 is for the CPU");
    refused(&["--no-cache"], "'--kv-cache <KV_CACHE>' cannot be used with '--no-cache'");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("generate.json")).unwrap()).unwrap();
    assert_eq!(generate("llama", &["--dtype", "bf16"])["new_token_ids"], want["new_token_ids"], "bf16: greedy tokens");
    // q8 moves this fixture's greedy path; decoding through the cache (rows
    // against weight rows) and without it (the whole context by panels) agree.
    // The cache is f16 by default with compact weights, and says so.
    let (cached, recomputed) =
        (generate("llama", &["--dtype", "q8"]), generate("llama", &["--dtype", "q8", "--no-cache"]));
    assert_eq!(cached["new_token_ids"], recomputed["new_token_ids"], "q8: cached and recomputed decoding");
    let (code, _, err) = modelc(&[
        "infer",
        &spec("llama"),
        "--weights",
        fixture("llama").to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "2",
        "--dtype",
        "q8",
    ]);
    assert!(code == 0 && err.contains("key/value cache: f16"), "{err}");
    assert_ne!(cached["new_token_ids"], want["new_token_ids"], "q8: the compact weights were not used");
}

#[test]
fn peft_adapters_load_and_merge_as_peft_does() {
    let base = fixture("llama").join("model.safetensors");
    for kind in ["llama-lora", "llama-dora"] {
        let adapter = fixture(kind);
        let out = scratch(kind);
        let want = weights::load_all(&adapter.join("logits.safetensors")).unwrap().0.remove("logits").unwrap();
        let got = llama_forward(&out, &["--weights", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()]);
        assert!(max_difference(&got, &want) <= 1e-4, "{kind}: adapted logits differ from PEFT's");

        // merge gives merge_and_unload()'s weights, which the plain spec runs to the same logits.
        let merged = out.join("merged");
        let (code, _, err) = modelc(&[
            "merge",
            "specs/llama.model",
            "--config",
            fixture("llama").join("config.json").to_str().unwrap(),
            "--weights",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let (ours, _) = weights::load_all(&merged.join("model.safetensors")).unwrap();
        let (peft, _) = weights::load_all(&adapter.join("merged.safetensors")).unwrap();
        assert_eq!(ours.len(), peft.len());
        for (name, w) in &peft {
            assert!(max_difference(&ours[name], w) <= 1e-5, "{kind}: merged `{name}`");
        }
        assert!(merged.join("config.json").exists());
        let plain = llama_forward(&out, &["--weights", merged.join("model.safetensors").to_str().unwrap()]);
        assert!(max_difference(&plain, &want) <= 1e-4, "{kind}: merged logits");
    }
}

#[test]
fn a_new_dora_adapter_starts_at_the_base_model_and_saves_as_peft() {
    let (base_run, dora_run) = (scratch("base-run"), scratch("dora-run"));
    let base = train_on_batch("llama", &base_run, &["--steps", "1"]);
    let dir = fixture("llama");
    let files = [
        ("--config", dir.join("config.json")),
        ("--weights", dir.join("model.safetensors")),
        ("--batch-file", dir.join("inputs.safetensors")),
        ("--out", dora_run.clone()),
    ];
    let mut args: Vec<String> = vec!["train".into(), "specs/llama-dora.model".into()];
    for (flag, path) in files {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(["--steps", "3", "--lr", "1e-2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    let metrics = std::fs::read_to_string(dora_run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    // B = 0 and the magnitude = the base rows' norms: the adapted model is the base model.
    assert!((first["loss"].as_f64().unwrap() - base[0]).abs() < 1e-4, "{first} vs {}", base[0]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dora_run.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_dora"], true);
    assert_eq!(config["r"], 8);
    let (saved, _) = weights::load_all(&dora_run.join("adapter_model.safetensors")).unwrap();
    assert!(saved.keys().all(|k| k.starts_with("base_model.model.model.layers.")), "{:?}", saved.keys());
    // It loads back as an adapter of the plain spec.
    let out = scratch("dora-forward");
    let logits = llama_forward(
        &out,
        &["--weights", dir.join("model.safetensors").to_str().unwrap(), "--adapter", dora_run.to_str().unwrap()],
    );
    assert_eq!(logits.shape, vec![2, 12, 384]);
}

#[test]
fn runtime_errors_are_clear() {
    // Files at fixed relative paths keep the messages' wrapping stable.
    let dir = Path::new("target/error-cases");
    std::fs::create_dir_all(repo().join(dir)).unwrap();
    let good = fixture("gpt2").join("model.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(repo().join(dir).join("truncated.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(repo().join(dir).join("garbage.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
    let u32s = safetensors::tensor::TensorView::new(safetensors::Dtype::U32, vec![2], &[0u8; 8]).unwrap();
    safetensors::tensor::serialize_to_file([("input_ids", u32s)], None, &repo().join(dir).join("u32.safetensors"))
        .unwrap();
    std::fs::create_dir_all(repo().join(dir).join("rslora")).unwrap();
    let mut rslora: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-lora").join("adapter_config.json")).unwrap())
            .unwrap();
    rslora["use_rslora"] = true.into();
    std::fs::write(repo().join(dir).join("rslora/adapter_config.json"), rslora.to_string()).unwrap();

    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "weights-of-another-model",
            "infer specs/gpt2.model --config tests/fixtures/hf/gpt2/config.json --set layers=3 --set dim=16 \
             --weights tests/fixtures/hf/gpt2/model.safetensors --prompt-ids 1",
        ),
        ("truncated-weights", "infer specs/gpt2.model --weights target/error-cases/truncated.safetensors"),
        ("garbage-weights", "infer specs/gpt2.model --weights target/error-cases/garbage.safetensors"),
        (
            "unsupported-dtype",
            "forward specs/gpt2.model --config tests/fixtures/hf/gpt2/config.json --weights \
             tests/fixtures/hf/gpt2/model.safetensors --inputs target/error-cases/u32.safetensors --outputs x",
        ),
        ("bad-device", "infer specs/gpt2.model --weights W --device tpu"),
        ("unknown-weight-format", "infer specs/gpt2.model --weights W --dtype q5"),
        ("zero-threads", "train specs/tiny-gpt.model --data README.md --threads 0"),
        ("too-many-threads", "train specs/tiny-gpt.model --data README.md --threads 100000"),
        ("nan-learning-rate", "train specs/tiny-gpt.model --data README.md --lr nan"),
        ("negative-clip", "train specs/tiny-gpt.model --data README.md --clip=-1"),
        ("eval-split-above-one", "train specs/tiny-gpt.model --data README.md --eval-split 1.5"),
        ("zero-epochs", "train specs/tiny-gpt.model --data README.md --epochs 0"),
        ("negative-temperature", "infer specs/gpt2.model --weights W --temperature=-1"),
        ("top-p-zero", "infer specs/gpt2.model --weights W --top-p 0"),
        ("zero-context", "infer specs/gpt2.model --weights W --context 0"),
        ("resume-and-overwrite", "train specs/tiny-gpt.model --data README.md --resume runs/x --overwrite"),
        (
            "prompt-outside-vocabulary",
            "infer specs/gpt2.model --config tests/fixtures/hf/gpt2/config.json --weights \
             tests/fixtures/hf/gpt2/model.safetensors --prompt-ids 5000",
        ),
        (
            "no-logits-to-generate",
            "infer specs/bert.model --config tests/fixtures/hf/bert/config.json --weights \
             tests/fixtures/hf/bert/model.safetensors --prompt-ids 1",
        ),
        ("adapter-missing", "check specs/llama.model --adapter target/error-cases/none"),
        ("adapter-unsupported", "check specs/llama.model --adapter target/error-cases/rslora"),
        ("merge-without-adapter", "merge specs/llama.model --weights W --out target/error-cases/merged"),
        (
            "batch-file-without-ids",
            "train specs/llama.model --config tests/fixtures/hf/llama/config.json --batch-file \
             tests/fixtures/hf/llama/logits.safetensors",
        ),
        ("data-and-batch-file", "train specs/llama.model --data README.md --batch-file x.safetensors"),
    ]
    .into_iter()
    .map(|(name, line)| (name, line.split_whitespace().map(String::from).collect()))
    .collect();
    for (name, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = modelc(&args);
        assert_ne!(code, 0, "{name} must fail");
        assert!(!err.contains("panicked"), "{name}: {err}");
        insta::assert_snapshot!(format!("runtime-error-{name}"), err);
    }
}

#[test]
fn one_adamw_step_matches_pytorch() {
    // torch.optim.AdamW, betas and weight decay as the spec's train block, no clipping,
    // a constant learning rate: the gradients and the written weights are torch's.
    let out = scratch("adamw-step");
    let grads_file = out.join("grads.safetensors");
    let flags = ["--steps", "1", "--schedule", "constant", "--warmup", "0", "--lr", "1e-3", "--clip", "0"];
    train_on_batch(
        "llama",
        &out,
        &[&flags[..], &["--weight-decay", "0.1", "--dump-grads", grads_file.to_str().unwrap()]].concat(),
    );
    let load = |path: &Path| weights::load_all(path).unwrap().0;
    let (got, grads) = (load(&out.join("model.safetensors")), load(&grads_file));
    let (want, want_grads) =
        (load(&fixture("llama").join("adamw_step.safetensors")), load(&fixture("llama").join("grads.safetensors")));
    let before = load(&fixture("llama").join("model.safetensors"));
    assert_eq!(got.len(), want.len());
    let mut ill_conditioned = 0;
    for (name, w) in &want {
        let (g, gw) = (&grads[name].data, &want_grads[name].data);
        let worst = g.iter().zip(gw).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "`{name}`: gradient {worst:e} from torch's");
        let moved = before[name].data.iter().zip(&w.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved > 1e-4, "`{name}` must move in the step for the comparison to mean something");
        for (i, (a, b)) in got[name].data.iter().zip(&w.data).enumerate() {
            // Adam's first step moves each weight by lr * g / (|g| + eps): where |g| is
            // within float noise of zero (nonzero and below 1e-6, against eps 1e-8) that ratio is
            // noise too, in torch as here, so those few weights only stay within lr.
            if gw[i] != 0.0 && gw[i].abs() < 1e-6 {
                ill_conditioned += 1;
                assert!((a - b).abs() <= 2e-3, "`{name}`[{i}]: {a} against torch's {b}");
            } else {
                assert!((a - b).abs() <= 1e-6, "`{name}`[{i}]: {a} against torch's {b} ({:e} apart)", (a - b).abs());
            }
        }
    }
    let total: usize = want.values().map(|t| t.data.len()).sum();
    assert!(ill_conditioned * 100 < total, "{ill_conditioned} of {total} gradients within noise of zero");
}

#[test]
fn learning_rate_schedules_match_transformers() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/schedules.json")).unwrap()).unwrap();
    for schedule in ["cosine", "linear"] {
        let out = scratch(&format!("schedule-{schedule}"));
        train_on_batch("llama", &out, &["--steps", "10", "--warmup", "3", "--lr", "1e-3", "--schedule", schedule]);
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let rates: Vec<f64> = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64())
            .collect();
        let reference: Vec<f64> = want[schedule].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(rates.len(), 10, "{schedule}");
        for (k, (a, b)) in rates.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-9, "{schedule}, step {}: {a} against transformers' {b}", k + 1);
        }
    }
}

#[test]
fn published_minilm_embeds_as_sentence_transformers() {
    // The folder as shipped: config.json, a tokenizer.json that pads every text
    // to 128 tokens, sentence-transformers' modules (mean pooling, normalise,
    // max_seq_length 256) and an `embeddings.position_ids` buffer.
    let folder = published_minilm();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/minilm/embeddings.json")).unwrap())
            .unwrap();
    let sentences: Vec<&str> = want["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(want["token_counts"].as_array().unwrap().iter().any(|n| n.as_u64().unwrap() > 300));
    let mut args = vec![
        "embed",
        "specs/minilm.model",
        "--weights",
        folder.to_str().unwrap(),
        "--json",
        "--batch",
        "4",
        "--verbose",
    ];
    args.extend(&sentences);
    let (code, out, err) = modelc(&args);
    assert_eq!(code, 0, "{err}");
    // The buffer is ignored as transformers ignores it, and --verbose says so.
    assert!(err.contains("ignored `embeddings.position_ids`"), "{err}");
    let got: Vec<Vec<f64>> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(got.len(), sentences.len());
    for ((a, b), s) in got.iter().zip(want["embeddings"].as_array().unwrap()).zip(&sentences) {
        let b: Vec<f64> = b.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(a) * norm(&b));
        assert!(cosine >= 0.9999, "cosine {cosine} for {s:.60?}");
    }
}

#[test]
fn a_padding_row_gets_no_gradient_as_in_pytorch() {
    // nn.Embedding(padding_idx=0) with a non-zero pad row: positions holding 0
    // read it (the head's gradients depend on it) but send it no gradient.
    let dir = repo().join("tests/fixtures/padded");
    let out = scratch("padded");
    let grads_file = out.join("grads.safetensors");
    let (code, _, err) = modelc(&[
        "train",
        dir.join("padded.model").to_str().unwrap(),
        "--weights",
        dir.join("model.safetensors").to_str().unwrap(),
        "--batch-file",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--steps",
        "1",
        "--dump-grads",
        grads_file.to_str().unwrap(),
        "--out",
        out.join("run").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (got, _) = weights::load_all(&grads_file).unwrap();
    let (want, _) = weights::load_all(&dir.join("grads.safetensors")).unwrap();
    let pad_row = &got["embed.weight"].data[..8];
    assert!(pad_row.iter().all(|g| *g == 0.0), "the pad row's gradient: {pad_row:?}");
    assert!(got["embed.weight"].data[8..].iter().any(|g| *g != 0.0));
    for (name, w) in &want {
        let worst = got[name].data.iter().zip(&w.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "`{name}`: {worst:e} from PyTorch's gradient");
    }
}

#[test]
fn bert_masked_lm_matches_transformers_and_pretrains() {
    // BertForMaskedLM's weights and names (the decoder tied to the word
    // embeddings), from a folder with its config: logits equal transformers'.
    let dir = fixture("bert-mlm");
    let out = scratch("bert-mlm");
    let (code, _, err) = modelc(&[
        "forward",
        "specs/bert-mlm.model",
        "--weights",
        dir.to_str().unwrap(),
        "--inputs",
        dir.join("inputs.safetensors").to_str().unwrap(),
        "--outputs",
        out.join("logits.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (got, _) = weights::load_all(&out.join("logits.safetensors")).unwrap();
    let (want, _) = weights::load_all(&dir.join("logits.safetensors")).unwrap();
    let worst = got["logits"].data.iter().zip(&want["logits"].data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "logits {worst:e} from transformers'");

    // Pretraining from text: masked tokens, their loss falling, accuracy logged.
    let run = out.join("run");
    let (code, _, err) = modelc(&[
        "train",
        "specs/bert-mlm.model",
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--tokenizer",
        dir.join("tokenizer.json").to_str().unwrap(),
        "--data",
        "/usr/share/common-licenses/GPL-3",
        "--steps",
        "60",
        "--batch",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--eval-every",
        "30",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<(f64, f64)> =
        records.iter().filter_map(|r| Some((r["eval_loss"].as_f64()?, r["eval_accuracy"].as_f64()?))).collect();
    assert_eq!(evals.len(), 2, "{records:?}");
    assert!(evals[1].0 < evals[0].0, "the masked-LM loss falls: {evals:?}");
    assert!(evals[1].1 > 0.0, "some masked tokens are predicted: {evals:?}");
}

#[test]
fn quantized_checkpoints_load_as_the_conversion_at_load_makes_them() {
    // `quantize` packs once what `--dtype` packs at every load: the same
    // bits, so the same logits and tokens, from a smaller file.
    let dir = repo().join("tests/fixtures/hf/llama");
    let out = scratch("quantize");
    let inputs = dir.join("inputs.safetensors");
    let config = dir.join("config.json");
    // `modelc COMMAND specs/llama.model --config … --weights WEIGHTS ARGS…`.
    let with = |weights: &Path, command: &[&str]| {
        let mut args = vec![command[0], "specs/llama.model", "--config", config.to_str().unwrap()];
        args.extend(["--weights", weights.to_str().unwrap()]);
        args.extend(&command[1..]);
        let (code, out, err) = modelc(&args);
        (code, out, format!("{args:?}: {err}"))
    };
    for dtype in ["bf16", "q8", "q4"] {
        let packed = out.join(format!("{dtype}.safetensors"));
        let (code, _, err) = with(&dir, &["quantize", "--dtype", dtype, "-o", packed.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let original = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
        assert!(std::fs::metadata(&packed).unwrap().len() < original * 3 / 4, "{dtype} is not smaller");
        let forward = |weights: &Path, extra: &[&str], name: &str| {
            let outputs = out.join(format!("{name}.safetensors"));
            let mut command = vec!["forward", "--inputs", inputs.to_str().unwrap()];
            command.extend(["--outputs", outputs.to_str().unwrap(), "--device", "cpu"]);
            command.extend(extra);
            let (code, _, err) = with(weights, &command);
            assert_eq!(code, 0, "{err}");
            weights::load_all(&outputs).unwrap().0.remove("logits").unwrap().data
        };
        let converted = forward(&dir.join("model.safetensors"), &["--dtype", dtype], &format!("{dtype}-converted"));
        assert_eq!(forward(&packed, &[], &format!("{dtype}-stored")), converted, "{dtype}");
        let generate = |weights: &Path, extra: &[&str]| {
            let mut command = vec!["infer", "--prompt-ids", "1,5,9,3", "--max-new-tokens", "12"];
            command.extend(["--temperature", "0", "--json", "--device", "cpu"]);
            command.extend(extra);
            let (code, out, err) = with(weights, &command);
            assert_eq!(code, 0, "{err}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["new_token_ids"].clone()
        };
        assert_eq!(generate(&packed, &[]), generate(&dir.join("model.safetensors"), &["--dtype", dtype]), "{dtype}");
    }
    // Packed weights cannot train, convert to another format, or run on the GPU.
    let q8 = out.join("q8.safetensors");
    let run = out.join("run");
    let refuse = |weights: &Path, command: &[&str], says: &str| {
        let (code, _, err) = with(weights, command);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(says), "{err}");
    };
    let train = ["train", "--data", "README.md", "--steps", "1", "--out", run.to_str().unwrap()];
    refuse(&q8, &train, "packed by `modelc quantize`");
    refuse(&q8, &["infer", "--prompt-ids", "1", "--dtype", "q4", "--device", "cpu"], "stored as q8");
    refuse(&q8, &["infer", "--prompt-ids", "1", "--device", "gpu"], "compact weights run on the CPU only");
    // A file whose description of a packed weight does not fit the model
    // (here: marked as packed from its transpose) is refused, not read past.
    let bytes = std::fs::read(&q8).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let described = header["__metadata__"]["modelc.packed"].as_str().unwrap().to_string();
    let mut packed: serde_json::Value = serde_json::from_str(&described).unwrap();
    packed["model.layers.0.mlp.down_proj.weight"]["transposed"] = true.into();
    header["__metadata__"]["modelc.packed"] = packed.to_string().into();
    let mut text = header.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let tampered = out.join("tampered.safetensors");
    std::fs::write(&tampered, [&(text.len() as u64).to_le_bytes()[..], &text, &bytes[8 + len..]].concat()).unwrap();
    refuse(
        &tampered,
        &["infer", "--prompt-ids", "1", "--device", "cpu"],
        "`model.layers.0.mlp.down_proj.weight` is stored packed as",
    );
}

/// Greedy tokens equal transformers' `generate` for each of the fixture's
/// prompts (`generate.json`'s cases), run with each set of extra flags.
fn assert_generates_as_transformers(model: &str, extras: &[&[&str]]) {
    let dir = fixture(model);
    let (config, weights, spec) = (dir.join("config.json"), dir.join("model.safetensors"), spec(model));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    for case in want["cases"].as_array().unwrap() {
        let prompt: Vec<String> = case["prompt_ids"].as_array().unwrap().iter().map(|t| t.to_string()).collect();
        let prompt = prompt.join(",");
        let new = case["new_token_ids"].as_array().unwrap().len().to_string();
        for extra in extras {
            let mut args = vec!["infer", &spec, "--config", config.to_str().unwrap()];
            args.extend(["--weights", weights.to_str().unwrap(), "--prompt-ids", &prompt]);
            args.extend(["--temperature", "0", "--max-new-tokens", &new, "--json"]);
            args.extend(*extra);
            let (code, out, err) = modelc(&args);
            assert_eq!(code, 0, "{model}: {err}");
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(got["new_token_ids"], case["new_token_ids"], "{model}: prompt {prompt}, {extra:?}");
        }
    }
}

/// Mistral's sliding window: greedy tokens equal transformers' `generate`
/// for a prompt shorter and one longer than the window, each generating
/// five windows' worth, with the ring cache (the window's positions written
/// modulo its length; a long prompt read in chunks) and without a cache;
/// the ring kept as f16 too.
#[test]
fn mistral_generates_as_transformers_past_its_window() {
    let halves: &[&str] = &["--kv-cache", "f16"];
    assert_generates_as_transformers("mistral", &[&[], &["--no-cache"], &["--context", "16"], halves]);
}

/// Families ported from the stdlib's blocks (Qwen2: q/k/v biases; Gemma:
/// scaled embeddings, (1 + w) norms, GeGLU, its own head size, tied output;
/// Gemma 2: soft-capped scores and logits, a sliding window on every other
/// layer, whose ring cache decoding passes).
#[test]
fn ported_families_generate_as_transformers() {
    for model in ["qwen2", "gemma", "gemma2", "qwen3", "stablelm", "stablelm-parallel", "gpt-neox"] {
        assert_generates_as_transformers(model, &[&[], &["--no-cache"]]);
    }
}
