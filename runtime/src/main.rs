//! The `modelc` binary: the compiler's commands and the runtime's.

use clap::{CommandFactory, FromArgMatches, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: modelc_runtime::pages::HugePages = modelc_runtime::pages::HugePages;

#[derive(clap::Parser)]
#[command(name = "modelc", version, about = "Compile, train and run neural networks written as .model specs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    #[command(flatten)]
    Compiler(modelc_runtime::cli::Command),
    /// Train a model on text, examples or token batches and keep the best checkpoint.
    Train(Box<modelc_runtime::train::TrainArgs>),
    /// Generate text from a trained model.
    Infer(Box<modelc_runtime::infer::InferArgs>),
    /// Make a self-contained executable for the spec: `./NAME train …`, `./NAME infer …`.
    Build(modelc_runtime::build::BuildArgs),
    /// Sentences to L2-normalised embeddings with an encoder (JSON lines or safetensors).
    Embed(modelc_runtime::embed::EmbedArgs),
    /// Split documents into passages, embed them and index them for search (HNSW).
    Index(Box<modelc_runtime::retrieval::IndexArgs>),
    /// The passages of an index nearest a query in meaning.
    Search(Box<modelc_runtime::retrieval::SearchArgs>),
    /// Fold a PEFT LoRA/DoRA adapter into the base weights (a checkpoint transformers loads).
    Merge(modelc_runtime::merge::MergeArgs),
    /// Run the model on named input tensors and write its named outputs (safetensors).
    Forward(modelc_runtime::forward::ForwardArgs),
    /// Pack a checkpoint's matrix weights once (--dtype bf16, q8, q4) for fast loads.
    Quantize(modelc_runtime::quantize::QuantizeArgs),
}

impl Top {
    /// The arguments naming the command's spec, where it has one.
    fn model_args(&mut self) -> Option<&mut modelc_runtime::cli::ModelArgs> {
        match self {
            Top::Compiler(c) => c.model_args(),
            Top::Train(a) => Some(&mut a.model),
            Top::Infer(a) => Some(&mut a.model),
            Top::Forward(a) => Some(&mut a.model),
            Top::Build(a) => Some(&mut a.model),
            Top::Embed(a) => Some(&mut a.model),
            Top::Merge(a) => Some(&mut a.model),
            Top::Index(a) => Some(&mut a.model),
            Top::Search(a) => Some(&mut a.model),
            Top::Quantize(a) => Some(&mut a.model),
        }
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `modelc kernels spec.model | head` would panic
    // on its next line ("failed printing to stdout"); like other command-line
    // tools, end quietly instead when the reader has gone.
    #[cfg(unix)]
    // SAFETY: setting a signal's action to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut command = Cli::command();
    let embedded = match modelc_runtime::build::embedded() {
        Ok(spec) => spec,
        Err(e) => return modelc_runtime::model::error("E0704", e),
    };
    if let Some(spec) = &embedded {
        // A built binary: its own name, and the spec it carries.
        let name = std::env::args()
            .next()
            .and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned()));
        let file = spec.entry.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let about = format!("The model of {file}, built by modelc: train it, run it, inspect it");
        for tool in ["fmt", "ast", "build"] {
            command = command.mut_subcommand(tool, |c| c.hide(true));
        }
        command =
            command.bin_name(name.unwrap_or_else(|| "model".into())).about(about).version(env!("CARGO_PKG_VERSION"));
    }
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if embedded.is_some() && argv.get(1).is_some_and(|a| !a.to_string_lossy().starts_with('-') && a != "help") {
        // `./NAME train --data x` reads as `modelc train <built-in spec> --data x`.
        argv.insert(2, modelc_runtime::cli::BUILT_IN.into());
    }
    let matches = command.get_matches_from(argv);
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Some(model) = cli.command.model_args() {
        model.embedded = embedded;
    }
    if matches!(cli.command, Top::Infer(_) | Top::Forward(_) | Top::Embed(_) | Top::Index(_) | Top::Search(_)) {
        // Their time goes to reading the weights (`pages`).
        modelc_runtime::pages::enable();
    }
    let code = match cli.command {
        Top::Compiler(c) => modelc_runtime::cli::run(c),
        Top::Train(args) => modelc_runtime::train::run(&args),
        Top::Infer(args) => modelc_runtime::infer::run(&args),
        Top::Forward(args) => modelc_runtime::forward::run(&args),
        Top::Build(args) => modelc_runtime::build::run(&args),
        Top::Embed(args) => modelc_runtime::embed::run(&args),
        Top::Merge(args) => modelc_runtime::merge::run(&args),
        Top::Index(args) => modelc_runtime::retrieval::run_index(&args),
        Top::Search(args) => modelc_runtime::retrieval::run_search(&args),
        Top::Quantize(args) => modelc_runtime::quantize::run(&args),
    };
    // `--profile`: the tables and the trace of what ran, even after an error.
    match modelc_runtime::profile::finish() {
        Err(e) => modelc_runtime::model::error("E0709", e),
        Ok(_) => code,
    }
}
