//! Every spec checks, and the parameter totals equal Hugging Face's for the
//! real configurations, whether the hyperparameters come from the spec's
//! defaults or from the model's config.json.

mod support;

use modelc::check::{Options, report};
use support::*;

/// (spec, config fixture, total parameters as Hugging Face counts them).
const REFERENCE: &[(&str, &str, i64)] = &[
    ("gpt2", "gpt2.json", 124_439_808),
    ("bert", "bert-base-uncased.json", 109_482_240),
    ("llama", "llama-2-7b.json", 6_738_415_616),
    ("mistral", "mistral-7b-v0.1.json", 7_241_732_096),
    ("mixtral", "mixtral-8x7b-v0.1.json", 46_702_792_704),
    ("minilm", "all-minilm-l6-v2.json", 22_713_216),
    ("qwen2", "qwen2-0.5b.json", 494_032_768),
    ("gemma", "gemma-2b.json", 2_506_172_416),
    ("gemma2", "gemma-2-2b.json", 2_614_341_888),
    ("qwen3", "qwen3-0.6b.json", 596_049_920),
    ("stablelm", "stablelm-3b-4e1t.json", 2_795_443_200),
    ("gpt-neox", "pythia-410m.json", 405_334_016),
    ("vit", "vit-base-patch16-224.json", 86_567_656),
];

fn spec(name: &str) -> std::path::PathBuf {
    repo().join("specs").join(format!("{name}.model"))
}

#[test]
fn every_spec_checks() {
    let specs = specs();
    assert!(specs.len() >= 11, "expected the whole model zoo, found {}", specs.len());
    for path in specs {
        if let Err(e) = check_file(&path, &Options::default()) {
            panic!("{} does not check:\n{e}", path.display());
        }
    }
}

#[test]
fn totals_equal_hugging_face_with_defaults() {
    for (name, _, total) in REFERENCE {
        let checked = check_file(&spec(name), &Options::default()).unwrap();
        assert_eq!(checked.total_params(), *total, "{name}");
        assert_eq!(report::json(&checked)["params"], *total, "{name} JSON total");
    }
}

#[test]
fn totals_equal_hugging_face_from_config_json() {
    for (name, config, total) in REFERENCE {
        let path = repo().join("tests/fixtures/configs").join(config);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let opts = Options { config: Some((json, config.to_string())), sets: Vec::new() };
        let checked = check_file(&spec(name), &opts).unwrap_or_else(|e| panic!("{name} with {config}:\n{e}"));
        assert_eq!(checked.total_params(), *total, "{name} from {config}");
    }
}

#[test]
fn config_values_override_defaults() {
    // A TinyLlama-like config: grouped-query attention, tied embeddings, transformers 5.x rope_parameters.
    let config = serde_json::json!({
        "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "tie_word_embeddings": true
    });
    let opts = Options { config: Some((config, "config.json".into())), sets: Vec::new() };
    let checked = check_file(&spec("llama"), &opts).unwrap();
    let get = |k: &str| checked.hparams.iter().find(|(n, _)| n == k).unwrap().1.to_string();
    assert_eq!(get("rope_theta"), "500000.0");
    assert_eq!(get("kv_heads"), "2");
    assert!(checked.params.iter().all(|p| p.name != "lm_head.weight"), "tied embeddings have no lm_head");
    let k = checked.params.iter().find(|p| p.name == "model.layers.1.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape, vec![32, 64]);
    // embed 64_000 + 2 * (q 4096 + k 2048 + v 2048 + o 4096 + mlp 3 * 8192 + norms 128) + norm 64
    assert_eq!(checked.total_params(), 64_000 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128) + 64);
}

#[test]
fn adapters_freeze_the_base_and_train_only_themselves() {
    let lora = check_file(&spec("llama-lora"), &Options::default()).unwrap();
    // PEFT reports 4,194,304 trainable parameters for r=8 on q_proj, v_proj of LLaMA-2-7B.
    assert_eq!(lora.trainable_params(), 4_194_304);
    assert_eq!(lora.total_params(), 6_738_415_616 + 4_194_304);
    let a = lora.params.iter().find(|p| p.name == "model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
    assert_eq!((a.shape.clone(), a.trainable), (vec![8, 4096], true));
    let base = lora.params.iter().find(|p| p.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
    assert!(!base.trainable, "the base weight keeps its name and is frozen");
    assert!(lora.params.iter().all(|p| p.trainable == p.name.contains("lora_")));

    let dora = check_file(&spec("llama-dora"), &Options::default()).unwrap();
    assert_eq!(dora.trainable_params(), 32 * 4 * (2 * 8 * 4096 + 4096));
    assert!(dora.params.iter().any(|p| p.name == "model.layers.31.self_attn.o_proj.lora_magnitude_vector"));
}

#[test]
fn hugging_face_weight_names() {
    let names = |spec_name: &str| -> Vec<String> {
        check_file(&spec(spec_name), &sets(&[("layers", "1")])).unwrap().params.into_iter().map(|p| p.name).collect()
    };
    let gpt2 = names("gpt2");
    for n in [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.bias",
    ] {
        assert!(gpt2.contains(&n.to_string()), "gpt2 lacks {n}");
    }
    let bert = names("bert");
    for n in [
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.bias",
        "pooler.dense.weight",
    ] {
        assert!(bert.contains(&n.to_string()), "bert lacks {n}");
    }
    let mixtral = names("mixtral");
    for n in [
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.experts.7.w3.weight",
        "lm_head.weight",
    ] {
        assert!(mixtral.contains(&n.to_string()), "mixtral lacks {n}");
    }
}

/// Small configurations of each spec, so that the snapshots stay readable.
fn small(name: &str) -> Options {
    match name {
        "mlp" => sets(&[("inputs", "8"), ("hidden", "16"), ("classes", "3")]),
        "tiny-gpt" => sets(&[("layers", "1")]),
        "transformer" => sets(&[
            ("vocab", "100"),
            ("dim", "32"),
            ("encoder_layers", "1"),
            ("decoder_layers", "1"),
            ("heads", "4"),
            ("hidden", "64"),
        ]),
        "gpt2" => sets(&[("vocab", "100"), ("positions", "64"), ("dim", "32"), ("layers", "2"), ("heads", "4")]),
        "bert" | "bert-mlm" | "minilm" => sets(&[
            ("vocab", "100"),
            ("positions", "64"),
            ("dim", "32"),
            ("layers", "2"),
            ("heads", "4"),
            ("hidden", "64"),
        ]),
        "mixtral" => sets(&[
            ("vocab", "100"),
            ("dim", "32"),
            ("layers", "2"),
            ("heads", "4"),
            ("kv_heads", "2"),
            ("hidden", "64"),
            ("experts", "4"),
        ]),
        "gpt-neox" => sets(&[("vocab", "100"), ("dim", "32"), ("layers", "2"), ("heads", "4"), ("hidden", "64")]),
        "cnn" => sets(&[("image", "12"), ("width", "8"), ("classes", "5")]),
        "gemma2" => sets(&[
            ("vocab", "100"),
            ("dim", "32"),
            ("layers", "2"),
            ("heads", "4"),
            ("kv_heads", "2"),
            ("head_dim", "16"),
            ("hidden", "64"),
            ("window", "8"),
        ]),
        "vit" => sets(&[
            ("image", "8"),
            ("patch", "4"),
            ("dim", "32"),
            ("layers", "2"),
            ("heads", "4"),
            ("hidden", "64"),
            ("classes", "5"),
        ]),
        _ => sets(&[
            ("vocab", "100"),
            ("dim", "32"),
            ("layers", "2"),
            ("heads", "4"),
            ("kv_heads", "2"),
            ("hidden", "64"),
        ]),
    }
}

#[test]
fn checked_form_of_every_spec() {
    for path in specs() {
        let name = stem(&path);
        // Adapted models take their base's hyperparameters.
        let opts = if name.starts_with("llama-") { small("llama") } else { small(&name) };
        let checked = check_file(&path, &opts).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        insta::assert_snapshot!(format!("checked-{name}"), report::text(&checked));
    }
}

#[test]
fn every_primitive_is_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/language.md")).unwrap();
    for name in modelc::check::prims::Prim::names() {
        assert!(doc.contains(&format!("`{name}`")), "docs/language.md does not document `{name}`");
    }
    for code in ["E0001", "E0104", "E0204", "E0301", "E0401", "E0602"] {
        assert!(doc.contains(code), "docs/language.md lacks error code {code}");
    }
}

#[test]
fn the_library_front_door_checks_a_spec_with_settings_and_an_adapter() {
    use modelc::spec::{Config, Spec};
    let mut spec = Spec::file(repo().join("specs/llama.model"));
    spec.config = Some(Config::Text { name: "inline".into(), text: r#"{"num_hidden_layers": 3}"#.into() });
    spec.sets = vec!["dim=64".into(), "hidden=128".into(), "heads=4".into(), "kv_heads=2".into(), "vocab=100".into()];
    let (_, checked) = spec.check().unwrap_or_else(|(_, d)| panic!("{d:?}"));
    let value = |k: &str| checked.hparams.iter().find(|(n, _)| n == k).map(|(_, v)| v.to_string());
    assert_eq!((value("layers"), value("dim")), (Some("3".into()), Some("64".into())));
    // An adapter folder adapts the model: only the adapter's weights train.
    spec.adapter = Some(repo().join("tests/fixtures/hf/llama-lora"));
    let (_, adapted) = spec.check().unwrap_or_else(|(_, d)| panic!("{d:?}"));
    assert!(adapted.params.iter().filter(|p| p.trainable).all(|p| p.name.contains("lora_")));
    assert!(adapted.params.iter().any(|p| p.trainable));
    // Problems come back as diagnostics with their sources; nothing is printed.
    spec.adapter = None;
    spec.sets.push("heads=5".into());
    let (sources, diagnostics) = spec.check().err().expect("64 is not divisible by 5 heads");
    let text = modelc::diag::render(&sources, &diagnostics, false);
    assert!(text.contains("E0") && text.contains("heads"), "{text}");
    let unsure = Spec { sets: vec!["layers".into()], ..Spec::file(repo().join("specs/llama.model")) };
    let Err((_, bad)) = unsure.load() else { panic!("`--set layers` without a value loaded") };
    assert_eq!(bad[0].code, "E0502");
}

/// The picture of a model at depth 1 and 3 (`modelc graph`), as text:
/// the open layers, their sublayers and expressions, and every arrow with
/// the shape it carries.
#[test]
fn graph_structure_snapshots() {
    for name in ["llama", "mixtral", "bert"] {
        let path = spec(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let program =
            modelc::check::load_source(&file, &text, path.parent()).unwrap_or_else(|_| panic!("{name} loads"));
        let (checked, g) = modelc::check::lower(&program, &modelc::check::Options::default(), Default::default())
            .unwrap_or_else(|_| panic!("{name} lowers"));
        let g = modelc::ir::prune::prune(&g);
        for depth in [1, 3] {
            let outline = modelc::draw::picture(&program, &checked, &g, depth, &[], &Default::default()).outline();
            insta::assert_snapshot!(format!("graph-{name}-depth-{depth}"), outline);
        }
    }
}

/// Fields named by paths (`model.decoder.layers`) give the checkpoint's
/// weight names with no layer for `model` or `decoder`, and `forward` reads
/// them by the same paths (an OPT-style decoder).
#[test]
fn fields_named_by_paths_give_their_weights_those_names() {
    let text = "import std.core
import std.attention

layer Block(dim: int, heads: int) {
    self_attn: Attention(dim, heads, bias: true, rotary: false)
    self_attn_layer_norm: LayerNorm(dim)
    fc1: Linear(dim, 2 * dim)
    fc2: Linear(2 * dim, dim)

    forward(x: [B, T, dim]) -> [B, T, dim] {
        let h = x + self_attn(self_attn_layer_norm(x))
        h + fc2(relu(fc1(h)))
    }
}

model Decoder(vocab: int = 50, dim: int = 16, layers: int = 2) {
    model.decoder.embed_tokens: Embedding(vocab, dim)
    model.decoder.embed_positions: Embedding(66, dim)
    model.decoder.layers: repeat(layers) Block(dim, 2)
    model.decoder.final_layer_norm: LayerNorm(dim)

    forward(input_ids: [B, T] int) -> logits: [B, T, vocab] {
        let x = model.decoder.embed_tokens(input_ids) + model.decoder.embed_positions(arange(T) + 2)
        let h = x |> model.decoder.layers |> model.decoder.final_layer_norm
        h @ transpose(model.decoder.embed_tokens.weight)
    }
}
";
    let checked = check_text("decoder.model", text, None, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = checked.params.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "model.decoder.embed_tokens.weight",
        "model.decoder.embed_positions.weight",
        "model.decoder.layers.0.self_attn.q_proj.bias",
        "model.decoder.layers.1.fc2.weight",
        "model.decoder.final_layer_norm.bias",
    ] {
        assert!(names.contains(&want), "no {want} in {names:?}");
    }
    assert!(names.iter().all(|n| n.starts_with("model.decoder.")), "{names:?}");
    assert_eq!(names.len(), 4 + 2 * 14);
}
