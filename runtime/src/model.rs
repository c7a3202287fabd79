//! What the runtime's commands share: the flags every one of them takes
//! (`--device`, `--threads`), and a spec lowered, optimised and compiled
//! for the CPU with its weights loaded.

use crate::cli::{ModelArgs, fail, load};
use crate::cpu::{Format, Program, Tensor, bind};
use crate::weights::{self, Tensors};
use modelc::check::{Checked, LowerOptions};
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
    /// Worker threads, 1 to 1024 (default: one per core). Results repeat exactly for a
    /// fixed count.
    #[arg(long, value_parser = crate::flags::threads)]
    pub threads: Option<usize>,
    /// Say more: the checkpoint's tensors that loading ignored (buffers such
    /// as `position_ids` that transformers does not load either).
    #[arg(long)]
    pub verbose: bool,
    /// Time every kernel and add the times up by the spec line and layer
    /// they came from (a table on stderr at the end), and write a Chrome
    /// trace (`--profile=FILE`, default trace.json; open it in
    /// ui.perfetto.dev). On the CPU.
    #[arg(long, value_name = "TRACE", num_args = 0..=1, require_equals = true, default_missing_value = "trace.json")]
    pub profile: Option<std::path::PathBuf>,
}

/// How inference holds the weights it multiplies by (`--dtype`).
#[derive(clap::Args, Clone, Debug)]
pub struct DtypeArgs {
    /// Weights of matrix products as f32, bf16, q8 (int8 in blocks of 32 with
    /// an f16 scale, llama.cpp's Q8_0) or q4 (Q4_0), converted at load; on the CPU.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "q8", "q4"])]
    pub dtype: String,
}

impl DtypeArgs {
    /// Packs the weights `g` multiplies by in the chosen format and frees
    /// their f32 values where `g` reads them no other way; says how many
    /// and how large on stderr.
    pub fn apply(
        &self,
        code: &'static str,
        device: Device,
        g: &Graph,
        feeds: &mut HashMap<String, Tensor>,
    ) -> Result<(), ExitCode> {
        let format = Format::parse(&self.dtype).map_err(|e| error(code, e))?;
        // Weights `modelc quantize` packed: their format is the file's.
        let stored = feeds.values().find_map(|t| t.packed.as_ref().map(|p| p.format));
        if let Some(stored) = stored
            && format != Format::F32
            && format != stored
        {
            return Err(error(
                code,
                format!(
                    "--dtype {}: the weights are stored as {}; give their f32 checkpoint to use another format",
                    self.dtype,
                    stored.name()
                ),
            ));
        }
        if stored.is_some() {
            crate::cpu::check_packed(g, feeds).map_err(|e| error(code, e))?;
        }
        let format = stored.unwrap_or(format);
        if format == Format::F32 {
            return Ok(());
        }
        if device == Device::Gpu {
            let how = if stored.is_some() { "the weights are stored as" } else { "--dtype" };
            return Err(error(
                code,
                format!("{how} {}: compact weights run on the CPU only; add --device cpu", format.name()),
            ));
        }
        crate::cpu::pack_weights(g, feeds, format);
        crate::cpu::drop_unread(&[g], feeds);
        let count = feeds.values().filter(|t| t.packed.is_some()).count();
        let bytes: usize = feeds.values().filter_map(|t| t.packed.as_ref()).map(|p| p.bytes()).sum();
        eprintln!("weights: {count} matrices as {} ({:.1} MB)", format.name(), bytes as f64 / 1e6);
        Ok(())
    }
}

/// Where a command's programs run: its `--device`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Device {
    Cpu,
    Gpu,
}

impl RunArgs {
    /// Applies `--threads` and `--device`; the error code is the command's.
    /// `auto` takes a real GPU when there is one (not a software one such as
    /// lavapipe, which the CPU backend outruns) and says which.
    pub fn apply(&self, code: &'static str) -> Result<Device, ExitCode> {
        let chosen = match self.device.as_str() {
            "cpu" => Device::Cpu,
            "gpu" => {
                let gpu = crate::gpu::gpu().map_err(|e| error(code, format!("--device gpu: {e}")))?;
                eprintln!("device: {}", gpu.name);
                Device::Gpu
            }
            "auto" => match crate::gpu::present().then(crate::gpu::gpu) {
                Some(Ok(gpu)) if gpu.hardware => {
                    eprintln!("device: {} (--device auto)", gpu.name);
                    Device::Gpu
                }
                _ => Device::Cpu,
            },
            other => return Err(error(code, format!("--device {other}: expected cpu, gpu or auto"))),
        };
        if let Some(trace) = &self.profile {
            if chosen == Device::Gpu {
                return Err(error("E0709", "--profile times the CPU's kernels; add --device cpu"));
            }
            crate::profile::start(trace).map_err(|e| error("E0709", e))?;
        }
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(error(code, "--threads must be at least 1".to_string()));
            }
            // Only the first call sets the pool; later ones (tests) keep it.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        Ok(chosen)
    }
}

/// Runs a command's work for `device`: on the CPU with the pool's threads
/// kept awake throughout (`cpu::warm`: a program's parallel sections then
/// never wait for a sleeping thread, between runs as within them).
pub fn on_device<R: Send>(device: Device, work: impl FnOnce() -> R + Send) -> R {
    match device {
        Device::Cpu => crate::cpu::warm(work),
        Device::Gpu => work(),
    }
}

/// A command's exit code: success, or the code its error was reported with.
pub fn exit(result: Result<(), ExitCode>) -> ExitCode {
    result.err().unwrap_or(ExitCode::SUCCESS)
}

/// Reports a runtime error (no source snippet) and returns the failing exit code.
pub fn error(code: &'static str, message: impl Into<String>) -> ExitCode {
    fail(&SourceMap::new(), &[Diagnostic::new(code, message)])
}

/// The checked model alone (inputs, outputs, weights, settings): what a
/// command needs to know before it decides how to lower it.
/// `--weights DIR` with a Hugging Face folder: its `config.json` sets the
/// hyperparameters when no `--config` is given, as `from_pretrained(DIR)`
/// reads it.
pub fn with_folder_config(model: &ModelArgs, weights: &Path) -> ModelArgs {
    let mut model = model.clone();
    let config = weights.join("config.json");
    if model.config.is_none() && weights.is_dir() && config.is_file() {
        model.config = Some(config);
    }
    model
}

pub fn checked(model: &ModelArgs) -> Result<Checked, ExitCode> {
    let (program, opts) = load(model)?;
    modelc::check::check(&program, &opts).map_err(|d| fail(&program.sources, &d))
}

/// A spec's forward lowered with `how`, pruned to `outputs` (all when
/// empty) and optimised.
pub fn forward_graph(model: &ModelArgs, how: LowerOptions, outputs: &[&str]) -> Result<(Checked, Graph), ExitCode> {
    let (program, opts) = load(model)?;
    let (checked, g) =
        modelc::check::lower(&program, &opts, model.lowering(how)).map_err(|d| fail(&program.sources, &d))?;
    crate::profile::add_spec(&program.sources, &checked);
    let mut g = modelc::ir::prune::prune(&g);
    g.outputs.retain(|(n, _)| n != "loss" && (outputs.is_empty() || outputs.contains(&n.as_str())));
    Ok((checked, modelc::opt::optimized(&g)))
}

/// The model's weights from `path` (and its `--adapter`), checked against its parameters.
pub fn load_weights(
    code: &'static str,
    path: &Path,
    model: &ModelArgs,
    checked: &Checked,
    run: &RunArgs,
) -> Result<Tensors, ExitCode> {
    let loaded = weights::load_model(path, model.adapter.as_deref(), &checked.params).map_err(|e| error(code, e))?;
    if run.verbose {
        for name in weights::ignored_buffers(path, &checked.params).map_err(|e| error(code, e))? {
            eprintln!("weights: ignored `{name}` (a buffer, not a weight of the model)");
        }
    }
    Ok(loaded)
}

/// A program compiled for the chosen device.
pub enum Compiled {
    Cpu(Box<Program>),
    Gpu(Box<crate::gpu::GpuProgram>),
}

impl Compiled {
    /// Inputs that will not change between runs (weights while decoding):
    /// the GPU keeps them after the first upload.
    pub fn keep_resident(&self, names: &[String]) {
        if let Compiled::Gpu(p) = self {
            p.keep_resident(names);
        }
    }

    /// Seconds the compiler took to make this program.
    pub fn compile_seconds(&self) -> f64 {
        match self {
            Compiled::Cpu(p) => p.compile_seconds,
            Compiled::Gpu(p) => p.compile_seconds,
        }
    }

    /// The inputs the program writes where they lie, which `run_state`
    /// takes apart from the feeds (none on the GPU).
    pub fn state(&self) -> &[String] {
        match self {
            Compiled::Cpu(p) => p.state(),
            Compiled::Gpu(_) => &[],
        }
    }

    /// `run_into` with the inputs the CPU program writes in place given
    /// apart (`Program::run_state`); elsewhere `state` is empty and every
    /// input is in `feeds`.
    pub fn run_state(
        &self,
        feeds: &HashMap<String, Tensor>,
        state: &mut HashMap<String, Tensor>,
        outputs: &mut HashMap<String, Tensor>,
    ) -> Result<(), String> {
        match self {
            Compiled::Cpu(p) => p.run_state(feeds, state, outputs),
            Compiled::Gpu(p) => {
                outputs.extend(p.run(feeds)?);
                Ok(())
            }
        }
    }

    pub fn run(&self, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
        match self {
            Compiled::Cpu(p) => p.run(feeds),
            Compiled::Gpu(p) => p.run(feeds),
        }
    }

    /// `run`, reusing the tensors in `outputs` as the outputs' buffers where
    /// their shapes fit (on the CPU; the GPU reads back into new ones).
    pub fn run_into(
        &self,
        feeds: &HashMap<String, Tensor>,
        outputs: &mut HashMap<String, Tensor>,
    ) -> Result<(), String> {
        match self {
            Compiled::Cpu(p) => p.run_into(feeds, outputs),
            Compiled::Gpu(p) => {
                outputs.extend(p.run(feeds)?);
                Ok(())
            }
        }
    }
}

/// Compiles `g` for the shapes of `feeds` (weights and inputs), for `device`.
pub fn compile(
    code: &'static str,
    device: Device,
    g: &Graph,
    feeds: &HashMap<String, Tensor>,
) -> Result<Compiled, ExitCode> {
    let shapes: HashMap<String, Vec<usize>> = feeds.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    compile_shapes(code, device, g, &shapes)
}

/// Compiles `g` for the given shapes of its weights and inputs.
pub fn compile_shapes(
    code: &'static str,
    device: Device,
    g: &Graph,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<Compiled, ExitCode> {
    compile_shapes_with(code, device, g, shapes, crate::cpu::CompileOptions::default())
}

/// Compiles `g` for the given shapes with the CPU's `options` (how it
/// trades memory for work, how its products multiply).
pub fn compile_shapes_with(
    code: &'static str,
    device: Device,
    g: &Graph,
    shapes: &HashMap<String, Vec<usize>>,
    options: crate::cpu::CompileOptions,
) -> Result<Compiled, ExitCode> {
    let shapes = shapes.clone();
    let sizes = bind(g, &shapes).map_err(|e| error(code, e))?;
    match device {
        Device::Cpu => Program::compile_with(g, &sizes, options).map(|p| Compiled::Cpu(Box::new(p))),
        Device::Gpu => crate::gpu::GpuProgram::compile(g, &sizes).map(|p| Compiled::Gpu(Box::new(p))),
    }
    .map_err(|e| error(code, e))
}
