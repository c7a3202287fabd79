//! `modelc merge`: folds a PEFT LoRA or DoRA adapter into its base weights
//! and writes a plain checkpoint (model.safetensors with the base model's
//! names, config.json) that the base spec and `transformers` load.
//!
//! LoRA: W' = W + (alpha / r) B A. DoRA: V = W + (alpha / r) B A, and each
//! output row of V is rescaled to the learned magnitude: W' = (m / ||V||) V.

use crate::cli::{ModelArgs, fail, load};
use crate::cpu::Tensor;
use crate::model::{RunArgs, error};
use crate::weights::{self, Tensors, is_adapter};
use modelc::peft::AdapterConfig;
use std::path::PathBuf;
use std::process::ExitCode;

const CODE: &str = "E0706";

#[derive(clap::Args, Clone, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// The base model's weights.
    #[arg(long)]
    pub weights: PathBuf,
    /// Where to write model.safetensors and config.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &MergeArgs) -> ExitCode {
    let args = MergeArgs { model: crate::model::with_folder_config(&args.model, &args.weights), ..args.clone() };
    crate::model::exit(merge(&args))
}

fn merge(args: &MergeArgs) -> Result<(), ExitCode> {
    args.run.apply(CODE)?;
    let Some(dir) = &args.model.adapter else {
        return Err(error(CODE, "give the adapter to merge with --adapter DIR (a PEFT folder)"));
    };
    let config = AdapterConfig::read(dir).map_err(|e| error(CODE, e))?;
    let (program, opts) = load(&args.model)?;
    let checked = modelc::check::check(&program, &opts).map_err(|d| fail(&program.sources, &d))?;
    let mut w = weights::load_model(&args.weights, Some(dir), &checked.params)
        .and_then(|w| weights::unpacked(w, "merging"))
        .map_err(|e| error(CODE, e))?;
    let scale = (config.alpha / config.rank as f64) as f32;
    let adapted: Vec<String> = w.keys().filter_map(|k| k.strip_suffix(".lora_A.weight").map(String::from)).collect();
    for layer in &adapted {
        let take = |w: &Tensors, name: String| w.get(&name).cloned().ok_or_else(|| error(CODE, format!("no `{name}`")));
        let (a, b) = (take(&w, format!("{layer}.lora_A.weight"))?, take(&w, format!("{layer}.lora_B.weight"))?);
        let base = format!("{layer}.weight");
        let mut v = take(&w, base.clone())?;
        let (out, inp, rank) = (v.shape[0], v.shape[1], a.shape[0]);
        for i in 0..out {
            for k in 0..rank {
                let bik = b.data[i * rank + k] * scale;
                let row = &mut v.data[i * inp..(i + 1) * inp];
                row.iter_mut().zip(&a.data[k * inp..(k + 1) * inp]).for_each(|(x, y)| *x += bik * y);
            }
        }
        if let Some(m) = w.get(&format!("{layer}.lora_magnitude_vector")) {
            for (i, row) in v.data.chunks_exact_mut(inp).enumerate() {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                let factor = m.data[i] / norm;
                row.iter_mut().for_each(|x| *x *= factor);
            }
        }
        w.insert(base, Tensor::new(vec![out, inp], v.data));
    }
    w.retain(|k, _| !is_adapter(k));
    std::fs::create_dir_all(&args.out)
        .map_err(|e| error(CODE, format!("cannot create {}: {e}", args.out.display())))?;
    weights::save(&args.out.join("model.safetensors"), &w).map_err(|e| error(CODE, e))?;
    let base_config = opts.config.as_ref().map(|(json, _)| json);
    if let Some(cfg) = modelc::check::hf_config(&program, &checked, base_config) {
        let text = serde_json::to_string_pretty(&cfg).expect("JSON") + "\n";
        std::fs::write(args.out.join("config.json"), text)
            .map_err(|e| error(CODE, format!("cannot write config.json: {e}")))?;
    }
    eprintln!(
        "merged {} ({} layers, {}) into {}",
        dir.display(),
        adapted.len(),
        config.layer,
        args.out.join("model.safetensors").display()
    );
    Ok(())
}
