//! `modelc quantize`: a checkpoint's matrix weights packed once (bf16, q8,
//! q4: the formats `--dtype` converts to at load) and written with the rest,
//! so that `infer`, `forward` and `embed` load them as they are.

use crate::cli::ModelArgs;
use crate::cpu::packed::Format;
use crate::model::{DtypeArgs, RunArgs, error, forward_graph, load_weights};
use modelc::check::LowerOptions;
use std::path::PathBuf;
use std::process::ExitCode;

const CODE: &str = "E0707";

#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// The f32 (or f16, bf16) checkpoint: a safetensors file, a sharded checkpoint's index, or a folder.
    #[arg(long)]
    pub weights: PathBuf,
    /// The safetensors file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

pub fn run(args: &QuantizeArgs) -> ExitCode {
    let args = QuantizeArgs { model: crate::model::with_folder_config(&args.model, &args.weights), ..args.clone() };
    crate::model::exit(quantize(&args))
}

fn quantize(args: &QuantizeArgs) -> Result<(), ExitCode> {
    if Format::parse(&args.dtype.dtype).map_err(|e| error(CODE, e))? == Format::F32 {
        return Err(error(CODE, "give the format to store: --dtype bf16, q8 or q4"));
    }
    let device = crate::model::Device::Cpu;
    let checked = crate::model::checked(&args.model)?;
    // The products a forward makes decide which weights pack (and which way);
    // decoding with a cache makes the same ones.
    let absent: Vec<String> = checked.inputs.iter().filter(|i| i.optional).map(|i| i.name.clone()).collect();
    let (_, g) = forward_graph(&args.model, LowerOptions { absent, ..Default::default() }, &[])?;
    let mut weights = load_weights(CODE, &args.weights, &args.model, &checked, &args.run)?;
    args.dtype.apply(CODE, device, &g, &mut weights)?;
    crate::weights::save(&args.output, &weights).map_err(|e| error(CODE, e))?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
