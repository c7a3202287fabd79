//! The `modelc` binary: the compiler's commands and the runtime's.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "modelc", version, about = "Compile, train and run neural networks written as .model specs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    #[command(flatten)]
    Compiler(modelc::cli::Command),
    /// Train a model on text (bytes as tokens) and keep the best checkpoint.
    Train(modelc_runtime::train::TrainArgs),
    /// Generate text from a trained model.
    Infer(modelc_runtime::infer::InferArgs),
    /// Run the model on named input tensors and write its named outputs (safetensors).
    Forward(modelc_runtime::forward::ForwardArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Top::Compiler(c) => modelc::cli::run(c),
        Top::Train(args) => modelc_runtime::train::run(&args),
        Top::Infer(args) => modelc_runtime::infer::run(&args),
        Top::Forward(args) => modelc_runtime::forward::run(&args),
    }
}
