//! The compiler's commands of the `modelc` command line (check, fmt, ast,
//! ir, kernels, info, graph): argument parsing and the commands, which print
//! what the library returns and turn diagnostics into a non-zero exit. The
//! binary itself lives in the runtime crate, which adds train and infer.

pub use crate::build::{BUILT_IN, Embedded};
use clap::Subcommand;
use modelc::check::{self, Options, Program, report};
use modelc::diag::{Diagnostic, render};
use modelc::source::SourceMap;
use modelc::spec::{Config, Entry, Spec};
use modelc::syntax::{dump_module, parse, print_module};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The spec a command works on and where its hyperparameters come from.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// The .model spec (a binary made by `modelc build` has its own built in).
    pub spec: Option<PathBuf>,
    /// A Hugging Face config.json whose keys set the hyperparameters (see the model's `from hf(...)`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Set a hyperparameter, e.g. `--set layers=2` (repeatable; applied after --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A PEFT adapter folder (adapter_config.json, adapter_model.safetensors): the
    /// model is adapted with its LoRA or DoRA settings.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Run a mixture of experts densely, every expert over every token (the
    /// definition of `route`), rather than each token through its chosen
    /// experts only: for comparing the two.
    #[arg(long)]
    pub dense_routes: bool,
    /// The spec a built binary carries (set at start-up, not a flag): used
    /// when no spec is named, or the name is `BUILT_IN`.
    #[arg(skip)]
    pub embedded: Option<Embedded>,
}

impl ModelArgs {
    /// How to lower the model: `how` with these arguments' choices.
    pub fn lowering(&self, how: check::LowerOptions) -> check::LowerOptions {
        check::LowerOptions { dense_routes: self.dense_routes, ..how }
    }

    /// The library's description of the spec these arguments name: a
    /// built binary's own files, config and settings, with the flags on top.
    /// `None` when there is no spec: none named and none built in.
    pub fn spec(&self) -> Option<Spec> {
        let embedded = match &self.spec {
            Some(p) if p.as_os_str() != BUILT_IN => None,
            _ => self.embedded.as_ref(),
        };
        let entry = match (embedded, &self.spec) {
            (Some(e), _) => Entry::Bundle { entry: e.entry.clone(), files: e.files.clone() },
            (None, Some(path)) => Entry::File(path.clone()),
            (None, None) => return None,
        };
        let config = match (&self.config, embedded.and_then(|e| e.config.as_ref())) {
            (Some(path), _) => Some(Config::File(path.clone())),
            (None, Some((name, text))) => Some(Config::Text { name: name.clone(), text: text.clone() }),
            (None, None) => None,
        };
        let mut sets = embedded.map(|e| e.sets.clone()).unwrap_or_default();
        sets.extend(self.sets.iter().cloned());
        Some(Spec { entry, adapter: self.adapter.clone(), config, sets })
    }

    fn required_spec(&self) -> Result<Spec, ExitCode> {
        self.spec().ok_or_else(|| {
            let d = Diagnostic::new("E0100", "no spec given")
                .help("name the .model file, e.g. `modelc check specs/tiny-gpt.model`");
            fail(&SourceMap::new(), &[d])
        })
    }
}

/// A spec's program at given sizes: what `kernels`, `wgsl` and `plan` show.
#[derive(clap::Args, Clone, Debug)]
pub struct ProgramArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The training program (forward, loss, backward, update) instead of the forward.
    #[arg(long)]
    pub train: bool,
    /// A size for the plan, e.g. `--size B=8 --size T=256` (unnamed sizes: B=1, others 128).
    #[arg(long = "size", value_name = "NAME=N")]
    pub sizes: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a spec: names, types and every shape; print hyperparameters and the parameter table.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON (the total parameter count is under "params").
        #[arg(long)]
        json: bool,
    },
    /// Rewrite .model files in canonical form.
    Fmt {
        /// Files to format.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only report files that are not formatted; exit 1 if any.
        #[arg(long)]
        check: bool,
    },
    /// Print the tensor IR of a spec's model (forward, or with --train the training program).
    Ir {
        #[command(flatten)]
        model: ModelArgs,
        /// The training program: forward, loss, backward and the optimiser update.
        #[arg(long)]
        train: bool,
        /// Optimise with the e-graph rewrites first.
        #[arg(long)]
        opt: bool,
        /// Print node counts, estimated FLOPs and optimisation time instead of the IR.
        #[arg(long)]
        stats: bool,
    },
    /// Hyperparameters, parameter table, and the CPU program: kernels, planned memory, JIT compile time.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// A size for the plan, e.g. `--size B=8 --size T=256` (unnamed sizes: B=1, others 128).
        #[arg(long = "size", value_name = "NAME=N")]
        sizes: Vec<String>,
    },
    /// Print the CPU kernel schedule of a spec's model, its memory plan and (with --clif) Cranelift IR.
    Kernels {
        #[command(flatten)]
        program: ProgramArgs,
        /// Print the Cranelift IR of every fused kernel.
        #[arg(long)]
        clif: bool,
        /// With --clif: the kernels as compiled without the host's wide-vector
        /// functions (exp, erf, ... in f32x4 inside the kernel), which is what
        /// a CPU without AVX2 and FMA gets.
        #[arg(long, requires = "clif")]
        no_wide_math: bool,
    },
    /// Print the WGSL compute shader of every GPU kernel (each validated with naga).
    Wgsl {
        #[command(flatten)]
        program: ProgramArgs,
    },
    /// Draw the model: its layers to any depth, the expressions of the open
    /// ones, and the shapes on the arrows between them (SVG, or PNG).
    Graph {
        #[command(flatten)]
        model: ModelArgs,
        /// Open the layers down to this depth (1: the model's own layers closed).
        #[arg(long, default_value_t = 2)]
        depth: usize,
        /// Open these layers too, by weight path or field name (`self_attn`, `model.layers.0.mlp`).
        #[arg(long, value_name = "NAME", num_args = 1..)]
        expand: Vec<String>,
        /// Shapes with a size given, e.g. `--size B=8 --size T=256` (others stay symbolic).
        #[arg(long = "size", value_name = "NAME=N")]
        sizes: Vec<String>,
        /// Where to write the picture: FILE.svg, or FILE.png.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Draw the CPU memory plan (kernels across, arena offset up, values
    /// coloured by layer) and print the peak as a formula in the sizes: the
    /// values are placed once for the sizes given and 2x and 4x each, so the
    /// formula is exact at each (each size's own plan is printed beside it).
    Plan {
        #[command(flatten)]
        program: ProgramArgs,
        /// Where to write the picture: FILE.svg, or FILE.png.
        #[arg(short, long, default_value = "plan.svg")]
        output: PathBuf,
        /// The plan `train --memory-budget` would choose for this budget (e.g. 300MB),
        /// counting the activations only (`train` also counts the process's own memory).
        #[arg(long = "memory-budget", value_parser = crate::flags::bytes)]
        memory_budget: Option<u64>,
    },
    /// Print the syntax tree of a file.
    Ast {
        /// The .model file.
        file: PathBuf,
    },
}

impl Command {
    /// The arguments naming the command's spec, where it has one.
    pub fn model_args(&mut self) -> Option<&mut ModelArgs> {
        match self {
            Command::Check { model, .. }
            | Command::Ir { model, .. }
            | Command::Info { model, .. }
            | Command::Kernels { program: ProgramArgs { model, .. }, .. }
            | Command::Wgsl { program: ProgramArgs { model, .. } }
            | Command::Graph { model, .. }
            | Command::Plan { program: ProgramArgs { model, .. }, .. } => Some(model),
            Command::Fmt { .. } | Command::Ast { .. } => None,
        }
    }
}

/// Runs one of the compiler's commands.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Check { model, json } => cmd_check(&model, json),
        Command::Fmt { files, check } => cmd_fmt(&files, check),
        Command::Ast { file } => cmd_ast(&file),
        Command::Ir { model, train, opt, stats } => cmd_ir(&model, train, opt, stats),
        Command::Graph { model, depth, expand, sizes, output } => cmd_graph(&model, depth, &expand, &sizes, &output),
        Command::Plan { program, output, memory_budget } => cmd_plan(&program, &output, memory_budget),
        Command::Kernels { program: ProgramArgs { model, train, sizes }, clif, no_wide_math } => {
            cmd_kernels(&model, train, clif.then_some(!no_wide_math), &sizes)
        }
        Command::Info { model, sizes } => cmd_info(&model, &sizes),
        Command::Wgsl { program } => cmd_wgsl(&program),
    }
}

pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Prints diagnostics and returns the failing exit code.
pub fn fail(sources: &SourceMap, diags: &[Diagnostic]) -> ExitCode {
    eprint!("{}", render(sources, diags, color()));
    let n = diags.len();
    eprintln!("error: {n} problem{} found", if n == 1 { "" } else { "s" });
    ExitCode::FAILURE
}

/// Loads and checks the model named by the command-line arguments.
fn load_and_check(args: &ModelArgs) -> Result<(Program, check::Checked), ExitCode> {
    args.required_spec()?.check().map_err(|(sources, diags)| fail(&sources, &diags))
}

/// The spec and its `--config` / `--set` options.
pub fn load(args: &ModelArgs) -> Result<(Program, Options), ExitCode> {
    args.required_spec()?.load().map_err(|(sources, diags)| fail(&sources, &diags))
}

fn cmd_check(args: &ModelArgs, json: bool) -> ExitCode {
    let (_, checked) = match load_and_check(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report::json(&checked)).expect("JSON of plain values"));
    } else {
        print!("{}", report::text(&checked));
    }
    ExitCode::SUCCESS
}

fn read(path: &Path, sources: &mut SourceMap) -> Result<modelc::source::FileId, ExitCode> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(sources.add(path.display().to_string(), Some(path.to_path_buf()), text)),
        Err(e) => Err(fail(sources, &[Diagnostic::new("E0100", format!("cannot read {}: {e}", path.display()))])),
    }
}

fn cmd_fmt(files: &[PathBuf], check_only: bool) -> ExitCode {
    let mut sources = SourceMap::new();
    let mut diags = Vec::new();
    let mut unformatted = 0;
    for path in files {
        let file = match read(path, &mut sources) {
            Ok(f) => f,
            Err(code) => return code,
        };
        let text = sources.file(file).text.clone();
        let (module, errors) = parse(file, &text);
        let Some(module) = module else {
            diags.extend(errors);
            continue;
        };
        let formatted = print_module(&module);
        if formatted == text {
            continue;
        }
        if check_only {
            println!("{} is not formatted", path.display());
            unformatted += 1;
        } else if let Err(e) = crate::run_dir::write_atomic(path, formatted.as_bytes()) {
            diags.push(Diagnostic::new("E0100", e));
        }
    }
    if !diags.is_empty() {
        return fail(&sources, &diags);
    }
    if unformatted > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn cmd_ast(path: &Path) -> ExitCode {
    let mut sources = SourceMap::new();
    let file = match read(path, &mut sources) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let text = sources.file(file).text.clone();
    match parse(file, &text) {
        (Some(module), _) => {
            print!("{}", dump_module(&module));
            ExitCode::SUCCESS
        }
        (None, errors) => fail(&sources, &errors),
    }
}

/// The model's forward or training program, pruned.
pub fn program_graph(args: &ModelArgs, train: bool) -> Result<(check::Checked, modelc::ir::graph::Graph), ExitCode> {
    program_and_graph(args, train).map(|(_, checked, graph)| (checked, graph))
}

/// `program_graph`, with the loaded program (its sources: what origins point into).
fn program_and_graph(
    args: &ModelArgs,
    train: bool,
) -> Result<(Program, check::Checked, modelc::ir::graph::Graph), ExitCode> {
    use modelc::ir::train as training;
    let (program, opts) = load(args)?;
    let how = args.lowering(check::LowerOptions { training: train, ..Default::default() });
    let (checked, graph) = check::lower(&program, &opts, how).map_err(|d| fail(&program.sources, &d))?;
    let graph = if train {
        let trainable: Vec<String> = checked.params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
        let cfg = training::TrainConfig { clip: Some(1.0), ..Default::default() };
        match training::training_program(&graph, &trainable, &cfg) {
            Some(g) => g,
            None => {
                let d = Diagnostic::new("E0601", format!("`{}` has no loss to train", checked.model))
                    .help("add `train { loss: ... }` to the model");
                return Err(fail(&program.sources, &[d]));
            }
        }
    } else {
        graph
    };
    let graph = modelc::ir::prune::prune(&graph);
    Ok((program, checked, graph))
}

fn cmd_ir(args: &ModelArgs, train: bool, opt: bool, stats: bool) -> ExitCode {
    use modelc::ir::print;
    let (checked, graph) = match program_graph(args, train) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let optimized = opt.then(|| modelc::opt::optimize(&graph, modelc::opt::Limits::default()));
    let elapsed = started.elapsed();
    if stats {
        // FLOPs as polynomials in the symbolic sizes, and at batch 1 with 128 for every other size.
        let at = |f: &modelc::types::Dim| {
            let v = f.substitute(&|s| Some(modelc::types::Dim::constant(if s == "B" { 1 } else { 128 })));
            v.as_const().unwrap_or(0) as f64
        };
        let (nodes, flops) = print::stats(&graph);
        println!("model {}: {nodes} nodes, {flops} FLOPs ({:.4e} at B=1, T=128)", checked.model, at(&flops));
        if let Some((g, report)) = &optimized {
            let (nodes, flops) = print::stats(g);
            println!(
                "optimised: {nodes} nodes, {flops} FLOPs ({:.4e} at B=1, T=128) in {:.3} s ({}, {} iterations, {} e-nodes)",
                at(&flops),
                elapsed.as_secs_f64(),
                report.stop_reason,
                report.iterations,
                report.egraph_nodes
            );
            for (rule, n) in &report.applied {
                println!("  {rule}: {n}");
            }
            for (i, (nodes, search, apply, rebuild)) in report.timeline.iter().enumerate() {
                println!(
                    "  iteration {i}: {nodes} e-nodes, search {search:.3} s, apply {apply:.3} s, rebuild {rebuild:.3} s"
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    print!("{}", print::print(optimized.as_ref().map_or(&graph, |(g, _)| g)));
    ExitCode::SUCCESS
}

/// An SVG written as it is, or rendered when the path ends in `.png`.
fn write_picture(output: &Path, svg: &str) -> Result<(), String> {
    let png = output.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let bytes = if png { crate::plot::svg_to_png(svg)? } else { svg.as_bytes().to_vec() };
    crate::run_dir::write_atomic(output, &bytes)
}

fn cmd_graph(args: &ModelArgs, depth: usize, expand: &[String], sizes: &[String], output: &Path) -> ExitCode {
    let sizes = match given_sizes(sizes) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (program, opts) = match load(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let (checked, graph) = match check::lower(&program, &opts, args.lowering(check::LowerOptions::default())) {
        Ok(v) => v,
        Err(diags) => return fail(&program.sources, &diags),
    };
    let graph = modelc::ir::prune::prune(&graph);
    let svg = modelc::draw::picture(&program, &checked, &graph, depth, expand, &sizes).svg();
    if let Err(e) = write_picture(output, &svg) {
        return fail(&program.sources, &[Diagnostic::new("E0100", e)]);
    }
    eprintln!("wrote {}", output.display());
    ExitCode::SUCCESS
}

/// The spec's program (`program_and_graph`), optimised, with its sizes bound.
fn optimized_program(
    p: &ProgramArgs,
) -> Result<(Program, check::Checked, modelc::ir::graph::Graph, modelc::types::Sizes), ExitCode> {
    let (program, checked, graph) = program_and_graph(&p.model, p.train)?;
    let (graph, _) = modelc::opt::optimize(&graph, modelc::opt::Limits::default());
    let bound = bind_sizes(&graph, &p.sizes)?;
    Ok((program, checked, graph, bound))
}

fn cmd_plan(p: &ProgramArgs, output: &Path, budget: Option<u64>) -> ExitCode {
    use modelc::backend::{Memory, Target, prepare_with};
    use modelc::ir::graph::Origin;
    let train = p.train;
    let (program, checked, graph, bound) = match optimized_program(p) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let planning_error = |e: String| fail(&SourceMap::new(), &[Diagnostic::new("E0502", e)]);
    let memory = match budget {
        None => Memory::default(),
        Some(bytes) => {
            let gradients = if train { 4 * checked.trainable_params() as u64 } else { 0 };
            let budget = crate::budget::Budget { bytes, resident: 0, code: 0, gradients };
            match crate::budget::choose(&graph, &bound, &budget) {
                Ok(choice) => {
                    println!("{}", choice.report(&budget));
                    choice.memory
                }
                Err(e) => return planning_error(e),
            }
        }
    };
    // One placement for the sizes given, twice each, twice all and four
    // times each, so that its peak is one formula at all of them.
    let mut symbols: Vec<String> = bound.keys().cloned().collect();
    symbols.sort();
    let scaled = |factor: i64, only: Option<&String>| {
        let mut s = bound.clone();
        for x in symbols.iter().filter(|x| only.is_none_or(|o| o == *x)) {
            s.insert(x.clone(), s[x] * factor);
        }
        s
    };
    let mut samples: Vec<modelc::types::Sizes> = symbols.iter().map(|x| scaled(2, Some(x))).collect();
    samples.push(scaled(2, None));
    samples.extend(symbols.iter().map(|x| scaled(4, Some(x))));
    samples.dedup();
    samples.retain(|s| *s != bound);
    let (kernels, placements) = match modelc::backend::prepare_over(&graph, &bound, &samples, Target::Cpu, memory) {
        Ok(k) => k,
        Err(e) => return planning_error(e),
    };
    // A value's layer: its instance's path down to a block of a stack
    // (`model.layers.3.self_attn`); gradients share their forward's.
    let layer_of = |origin: Option<Origin>| match origin {
        None => "the optimiser's update".to_string(),
        Some(o) => {
            let path = &checked.instances[o.instance as usize].path;
            let parts: Vec<&str> = path.split('.').collect();
            let keep = parts.iter().position(|p| p.parse::<u64>().is_ok()).map_or(parts.len(), |i| i + 2);
            let layer = parts[..keep.min(parts.len())].join(".");
            if layer.is_empty() { format!("{} (the model's own)", checked.model) } else { layer }
        }
    };
    let describe = |origin: Option<Origin>| match origin {
        None => String::new(),
        Some(o) => {
            let (line, _) = program.sources.line_col(o.span.file, o.span.start as usize);
            format!("{}:{line}: {}", program.sources.file(o.span.file).name, program.sources.snippet(o.span))
        }
    };
    let mut shown: Vec<String> = bound.iter().map(|(k, v)| format!("{k}={v}")).collect();
    shown.sort();
    let what = if train { "training program" } else { "forward" };
    let steps = kernels.schedule.leaves().len();
    let peak = kernels.plan.peak_bytes();
    let title = format!(
        "{}: the {what}'s memory plan at {}, peak {:.2} MB, {steps} kernels",
        checked.model,
        shown.join(", "),
        peak as f64 / 1e6
    );
    let svg = modelc::draw_plan::svg(&kernels.graph, &kernels.plan, steps, &title, &layer_of, &describe);
    if let Err(e) = write_picture(output, &svg) {
        return fail(&program.sources, &[Diagnostic::new("E0100", e)]);
    }
    println!("{title}");
    // The formula, checked against the placement at each size (which is
    // sound there: no two values share memory that do not at the sizes
    // given), and the plan a program compiled at that size makes alone.
    let terms = modelc::draw_plan::peak_terms(&kernels.graph, &kernels.plan);
    println!("peak({}) = {} bytes", symbols.join(", "), modelc::draw_plan::peak_text(&terms));
    let at_sizes = std::iter::once((&bound, kernels.plan.arena_len))
        .chain(samples.iter().zip(&placements).map(|(s, p)| (s, p.arena_len)));
    for (s, arena_len) in at_sizes {
        let at: Vec<String> = symbols.iter().map(|x| format!("{x}={}", s[x])).collect();
        let alone = prepare_with(&graph, s, Target::Cpu, memory).map(|k| k.plan.peak_bytes());
        match (alone, modelc::draw_plan::peak_value(&terms, s)) {
            (Ok(alone), Ok(f)) => println!(
                "  {:<22} planned {:>15} bytes, the formula {f:>15}; planned at these sizes alone {alone:>15}",
                at.join(", "),
                arena_len * 4
            ),
            (Err(e), _) | (_, Err(e)) => println!("  {:<22} {e}", at.join(", ")),
        }
    }
    if let Some((a, b)) = placements.iter().find_map(|p| p.conflict(&kernels.plan)) {
        return planning_error(format!("bug: {a} and {b} share memory at other sizes and not at these"));
    }
    let written: usize = (kernels.graph.nodes.iter().zip(&kernels.plan.lens))
        .filter(|(n, _)| matches!(&n.op, modelc::ir::graph::Op::Input(x) | modelc::ir::graph::Op::Param(x) if kernels.plan.written.contains(x)))
        .map(|(_, len)| len * 4)
        .sum();
    if written > 0 {
        println!(
            "{} inputs written where they lie, {:.2} MB held once (new weights and optimiser state over the old, new cache rows into the cache)",
            kernels.plan.written.len(),
            written as f64 / 1e6
        );
    }
    eprintln!("wrote {}", output.display());
    ExitCode::SUCCESS
}

/// `--size NAME=N` values, and defaults (B=1, others 128) for the rest.
fn bind_sizes(graph: &modelc::ir::graph::Graph, sizes: &[String]) -> Result<modelc::types::Sizes, ExitCode> {
    let mut bound = given_sizes(sizes)?;
    for n in &graph.nodes {
        for d in &n.ty.dims {
            for sym in d.symbols() {
                bound.entry(sym.to_string()).or_insert(if sym == "B" { 1 } else { 128 });
            }
        }
    }
    Ok(bound)
}

/// The `--size NAME=N` values.
fn given_sizes(sizes: &[String]) -> Result<modelc::types::Sizes, ExitCode> {
    let mut bound = modelc::types::Sizes::new();
    for s in sizes {
        let Some((k, v)) = s.split_once('=').and_then(|(k, v)| v.trim().parse::<i64>().ok().map(|v| (k.trim(), v)))
        else {
            eprint!(
                "{}",
                render(&SourceMap::new(), &[Diagnostic::new("E0502", format!("--size {s}: expected NAME=N"))], color())
            );
            return Err(ExitCode::FAILURE);
        };
        bound.insert(k.to_string(), v);
    }
    Ok(bound)
}

/// The model's program (see `program_graph`), optimised, scheduled and planned at the given sizes.
#[allow(clippy::type_complexity)]
fn planned(
    args: &ModelArgs,
    train: bool,
    sizes: &[String],
) -> Result<
    (
        check::Checked,
        modelc::ir::graph::Graph,
        modelc::types::Sizes,
        modelc::backend::schedule::Schedule,
        modelc::backend::plan::Plan,
    ),
    ExitCode,
> {
    let (checked, graph) = program_graph(args, train)?;
    let (graph, bound, sched, memory) = cpu_plan(&graph, sizes)?;
    Ok((checked, graph, bound, sched, memory))
}

/// The optimised graph scheduled and planned for the CPU at the given sizes.
fn cpu_plan(
    graph: &modelc::ir::graph::Graph,
    sizes: &[String],
) -> Result<
    (modelc::ir::graph::Graph, modelc::types::Sizes, modelc::backend::schedule::Schedule, modelc::backend::plan::Plan),
    ExitCode,
> {
    let (graph, _) = modelc::opt::optimize(graph, modelc::opt::Limits::default());
    let bound = bind_sizes(&graph, sizes)?;
    let modelc::backend::KernelProgram { graph, schedule: sched, plan: memory } =
        modelc::backend::prepare(&graph, &bound, modelc::backend::Target::Cpu)
            .map_err(|e| fail(&SourceMap::new(), &[Diagnostic::new("E0502", e)]))?;
    Ok((graph, bound, sched, memory))
}

fn cmd_info(args: &ModelArgs, sizes: &[String]) -> ExitCode {
    use modelc::backend::clif as codegen;
    let (checked, graph) = match program_graph(args, false) {
        Ok(v) => v,
        Err(code) => return code,
    };
    print!("{}", report::text(&checked));
    let started = std::time::Instant::now();
    let (graph, bound, sched, memory) = match cpu_plan(&graph, sizes) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let plan_time = started.elapsed();
    let started = std::time::Instant::now();
    let (mut fused, mut distinct) = (0, 0);
    let compiled = codegen::Jit::new().and_then(|mut jit| {
        for kernel in sched.leaves() {
            if codegen::describe(&mut jit, &graph, kernel, &bound, &memory)?.is_some() {
                fused += 1;
            }
        }
        distinct = jit.distinct();
        jit.finish()
    });
    if let Err(e) = compiled {
        return fail(&SourceMap::new(), &[Diagnostic::new("E0999", format!("code generation failed: {e}"))]);
    }
    let mut shown: Vec<String> = bound.iter().map(|(k, v)| format!("{k}={v}")).collect();
    shown.sort();
    println!("\nforward program on the CPU ({})", shown.join(", "));
    println!("  IR nodes        {}", graph.nodes.len());
    let (_, flops) = modelc::ir::print::stats(&graph);
    let at = |f: &modelc::types::Dim| modelc::types::eval_dim(f, &bound).map_or(0.0, |v| v as f64);
    let experts = modelc::ir::print::expert_flops(&graph);
    let routed = if experts.as_const() == Some(0) {
        String::new()
    } else {
        format!(" ({:.4e} in experts' products, each token through its chosen experts only)", at(&experts))
    };
    println!("  FLOPs           {:.4e}{routed}", at(&flops));
    let groups = sched.kernels.iter().filter(|k| matches!(k, modelc::backend::kernel::Kernel::Rows(_))).count();
    println!(
        "  kernels         {} ({fused} fused, {distinct} of them distinct and compiled by Cranelift; {groups} row groups)",
        sched.leaves().len()
    );
    println!(
        "  planned memory  {} (activations; weights not included), and {} a thread for row groups' blocks",
        bytes(memory.peak_bytes()),
        bytes(memory.block_bytes())
    );
    println!("  optimise + plan {:.1} ms", plan_time.as_secs_f64() * 1e3);
    println!("  JIT compile     {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    match modelc::backend::vmath::vectors() {
        Some(v) => println!("  vector math     exp, erf, log, ... on {v} (Cranelift's own loops: f32x4)"),
        None => println!("  vector math     f32x4 (no AVX2 and FMA on this CPU)"),
    }
    ExitCode::SUCCESS
}

fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}

fn cmd_wgsl(p: &ProgramArgs) -> ExitCode {
    use modelc::backend::wgsl;
    let (_, checked, graph, bound) = match optimized_program(p) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let (graph, sched, memory, layout) = match wgsl::prepare(&graph, &bound) {
        Ok(v) => v,
        Err(e) => return fail(&SourceMap::new(), &[Diagnostic::new("E0502", e)]),
    };
    let shaders = match wgsl::shaders(&graph, &sched, &memory, &bound, &layout) {
        Ok(s) => s,
        Err(e) => return fail(&SourceMap::new(), &[Diagnostic::new("E0999", e)]),
    };
    println!(
        "model {}: {} shaders over one buffer of {} bytes",
        checked.model,
        shaders.iter().flatten().count(),
        layout.len * std::mem::size_of::<f32>()
    );
    for shader in shaders.iter().flatten() {
        if let Err(e) = wgsl::validate(shader) {
            return fail(&SourceMap::new(), &[Diagnostic::new("E0999", e)]);
        }
        let [x, y, z] = shader.workgroups;
        println!("\n// {}: {x} x {y} x {z} workgroups\n{}", shader.label, shader.source);
    }
    ExitCode::SUCCESS
}

/// `clif`: print the kernels' Cranelift IR, with the wide-vector functions or not.
fn cmd_kernels(args: &ModelArgs, train: bool, clif: Option<bool>, sizes: &[String]) -> ExitCode {
    use modelc::backend::{clif as codegen, schedule};
    let (checked, graph, bound, sched, memory) = match planned(args, train, sizes) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut shown: Vec<(&String, &i64)> = bound.iter().collect();
    shown.sort();
    let shown: Vec<String> = shown.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "model {}: {} kernels, peak memory {} bytes, block buffers {} bytes a thread ({})",
        checked.model,
        sched.kernels.len(),
        memory.peak_bytes(),
        memory.block_bytes(),
        shown.join(", ")
    );
    print!("{}", schedule::describe(&graph, &sched));
    if let Some(wide_math) = clif {
        let mut jit = match codegen::Jit::with_wide_math(wide_math) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (kernel, name) in sched.leaves().into_iter().zip(sched.leaf_names()) {
            match codegen::describe(&mut jit, &graph, kernel, &bound, &memory) {
                Ok(None) => {}
                Ok(Some(text)) => println!("\n; {name}\n{text}"),
                Err(e) => {
                    eprintln!("error: {name}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
