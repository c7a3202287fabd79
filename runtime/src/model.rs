//! What the runtime's commands share: the flags every one of them takes
//! (`--device`, `--threads`), and a spec lowered, optimised and compiled
//! for the CPU with its weights loaded.

use crate::cpu::{Program, Tensor, bind};
use crate::weights::{self, Tensors};
use modelc::check::{Checked, LowerOptions};
use modelc::cli::{ModelArgs, fail, load};
use modelc::diag::Diagnostic;
use modelc::ir::graph::Graph;
use modelc::source::SourceMap;
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

/// Where and how a command runs.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// cpu, gpu or auto (auto picks a GPU when one is present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Worker threads (default: one per core). Results repeat exactly for a fixed count.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RunArgs {
    /// Applies `--threads` and checks `--device`; the error code is the command's.
    pub fn apply(&self, code: &'static str) -> Result<(), ExitCode> {
        match self.device.as_str() {
            "cpu" | "auto" => {}
            "gpu" => {
                return Err(error(
                    code,
                    "--device gpu: this build of modelc has no GPU backend yet; use --device cpu".to_string(),
                ));
            }
            other => return Err(error(code, format!("--device {other}: expected cpu, gpu or auto"))),
        }
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(error(code, "--threads must be at least 1".to_string()));
            }
            // Only the first call sets the pool; later ones (tests) keep it.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        Ok(())
    }
}

/// Reports a runtime error (no source snippet) and returns the failing exit code.
pub fn error(code: &'static str, message: impl Into<String>) -> ExitCode {
    fail(&SourceMap::new(), &[Diagnostic::new(code, message)])
}

/// A spec's forward lowered with `how`, pruned to `outputs` (all when
/// empty) and optimised.
pub fn forward_graph(model: &ModelArgs, how: LowerOptions, outputs: &[&str]) -> Result<(Checked, Graph), ExitCode> {
    let (program, opts) = load(model)?;
    let (checked, g) = modelc::check::lower(&program, &opts, how).map_err(|d| fail(&program.sources, &d))?;
    let mut g = modelc::ir::prune::prune(&g);
    g.outputs.retain(|(n, _)| n != "loss" && (outputs.is_empty() || outputs.contains(&n.as_str())));
    let (g, _) = modelc::opt::optimize(&modelc::ir::prune::prune(&g), modelc::opt::Limits::default());
    Ok((checked, g))
}

/// The model's weights from `path` (and its `--adapter`), checked against its parameters.
pub fn load_weights(
    code: &'static str,
    path: &Path,
    model: &ModelArgs,
    checked: &Checked,
) -> Result<Tensors, ExitCode> {
    weights::load_model(path, model.adapter.as_deref(), &checked.params).map_err(|e| error(code, e))
}

/// Compiles `g` for the shapes of `feeds` (weights and inputs).
pub fn compile(code: &'static str, g: &Graph, feeds: &HashMap<String, Tensor>) -> Result<Program, ExitCode> {
    let shapes: HashMap<String, Vec<usize>> = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    bind(g, &shapes).and_then(|s| Program::compile(g, &s)).map_err(|e| error(code, e))
}
