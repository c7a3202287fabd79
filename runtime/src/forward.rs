//! `modelc forward`: named input tensors in, the model's named outputs out,
//! both as safetensors files (the form Hugging Face tools read and write).

use crate::cli::ModelArgs;
use crate::model::{Device, DtypeArgs, RunArgs, compile, error, forward_graph, load_weights};
use crate::weights;
use modelc::check::LowerOptions;
use std::path::PathBuf;
use std::process::ExitCode;

const CODE: &str = "E0703";

#[derive(clap::Args, Clone, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// The model's weights: a safetensors file, a sharded checkpoint's index, or a folder.
    #[arg(long)]
    pub weights: PathBuf,
    /// The inputs by name, e.g. `input_ids` [B, T] (any integer or float dtype).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (f32), e.g. `logits`.
    #[arg(long)]
    pub outputs: PathBuf,
}

pub fn run(args: &ForwardArgs) -> ExitCode {
    let args = ForwardArgs { model: crate::model::with_folder_config(&args.model, &args.weights), ..args.clone() };
    crate::model::exit(forward(&args))
}

fn forward(args: &ForwardArgs) -> Result<(), ExitCode> {
    let device = args.run.apply(CODE)?;
    crate::model::on_device(device, || forward_on(args, device))
}

fn forward_on(args: &ForwardArgs, device: Device) -> Result<(), ExitCode> {
    let (inputs, _) = weights::load_all(&args.inputs).map_err(|e| error(CODE, e))?;
    // Learn the model's inputs first, so that optional ones not given are lowered as absent.
    let checked = crate::model::checked(&args.model)?;
    let known: Vec<&str> = checked.inputs.iter().map(|i| i.name.as_str()).collect();
    let mut problems = Vec::new();
    let mut absent = Vec::new();
    for i in &checked.inputs {
        match inputs.get(&i.name) {
            Some(t) if t.shape.len() != i.ty.rank() => problems.push(format!(
                "input `{}` has shape {:?}, expected rank {} ({})",
                i.name,
                t.shape,
                i.ty.rank(),
                i.ty
            )),
            Some(t) if i.ty.dtype != modelc::types::DType::F32 => {
                // Token ids and masks: whole numbers, not NaN or 2.5.
                if let Some(bad) = t.data.iter().find(|v| !v.is_finite() || v.fract() != 0.0) {
                    problems.push(format!("input `{}` is {} but holds {bad}", i.name, i.ty.dtype.as_str()));
                }
            }
            Some(_) => {}
            None if i.optional => absent.push(i.name.clone()),
            None => problems.push(format!("missing input `{}` {}", i.name, i.ty)),
        }
    }
    let mut unexpected: Vec<&String> = inputs.keys().filter(|k| !known.contains(&k.as_str())).collect();
    unexpected.sort();
    for name in unexpected {
        problems.push(format!("unexpected input `{name}` (the model takes {})", known.join(", ")));
    }
    if !problems.is_empty() {
        return Err(error(
            CODE,
            format!("{} does not fit the model:\n  {}", args.inputs.display(), problems.join("\n  ")),
        ));
    }
    let (checked, g) = forward_graph(&args.model, LowerOptions { absent, ..Default::default() }, &[])?;
    let mut feeds = load_weights(CODE, &args.weights, &args.model, &checked, &args.run)?;
    args.dtype.apply(CODE, device, &g, &mut feeds)?;
    feeds.extend(inputs);
    let program = compile(CODE, device, &g, &feeds)?;
    let outputs = program.run(&feeds).map_err(|e| error(CODE, e))?;
    weights::save(&args.outputs, &outputs).map_err(|e| error(CODE, e))
}
