//! The compiler's commands of the `modelc` command line (check, fmt, ast,
//! ir, kernels, info, graph): argument parsing and the commands, which print
//! what the library returns and turn diagnostics into a non-zero exit. The
//! binary itself lives in the runtime crate, which adds train and infer.

use crate::check::{self, Options, Program, report};
use crate::diag::{Diagnostic, render};
use crate::source::SourceMap;
use crate::syntax::{dump_module, parse, print_module};
use clap::Subcommand;
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
        model: ModelArgs,
        /// The training program instead of the forward.
        #[arg(long)]
        train: bool,
        /// Print the Cranelift IR of every fused kernel.
        #[arg(long)]
        clif: bool,
        /// With --clif: the kernels as compiled without the host's wide-vector
        /// functions (exp, erf, ... in f32x4 inside the kernel), which is what
        /// a CPU without AVX2 and FMA gets.
        #[arg(long, requires = "clif")]
        no_wide_math: bool,
        /// A size for the plan, e.g. `--size B=8 --size T=256` (unnamed sizes: B=1, others 128).
        #[arg(long = "size", value_name = "NAME=N")]
        sizes: Vec<String>,
    },
    /// Print the WGSL compute shader of every GPU kernel (each validated with naga).
    Wgsl {
        #[command(flatten)]
        model: ModelArgs,
        /// The training program instead of the forward.
        #[arg(long)]
        train: bool,
        /// A size for the plan, e.g. `--size B=8 --size T=256` (unnamed sizes: B=1, others 128).
        #[arg(long = "size", value_name = "NAME=N")]
        sizes: Vec<String>,
    },
    /// Draw the model as an SVG picture: its layers and the shapes between them.
    Graph {
        #[command(flatten)]
        model: ModelArgs,
        /// Where to write the SVG.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Print the syntax tree of a file.
    Ast {
        /// The .model file.
        file: PathBuf,
    },
}

/// Runs one of the compiler's commands.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Check { model, json } => cmd_check(&model, json),
        Command::Fmt { files, check } => cmd_fmt(&files, check),
        Command::Ast { file } => cmd_ast(&file),
        Command::Ir { model, train, opt, stats } => cmd_ir(&model, train, opt, stats),
        Command::Graph { model, output } => cmd_graph(&model, &output),
        Command::Kernels { model, train, clif, no_wide_math, sizes } => {
            cmd_kernels(&model, train, clif.then_some(!no_wide_math), &sizes)
        }
        Command::Info { model, sizes } => cmd_info(&model, &sizes),
        Command::Wgsl { model, train, sizes } => cmd_wgsl(&model, train, &sizes),
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
    let (program, opts) = load(args)?;
    match check::check(&program, &opts) {
        Ok(checked) => Ok((program, checked)),
        Err(diags) => Err(fail(&program.sources, &diags)),
    }
}

/// A spec compiled into a binary by `modelc build`: its files, and the
/// config and `--set` values given at build time (flags at run time go on top).
#[derive(Clone, Debug)]
pub struct Embedded {
    pub entry: PathBuf,
    pub files: check::load::Bundle,
    /// The config file's name and text.
    pub config: Option<(String, String)>,
    pub sets: Vec<String>,
}

/// What a built binary passes as the spec argument: its own spec.
pub const BUILT_IN: &str = "<built-in spec>";

/// Set once at start-up by a built binary.
pub static EMBEDDED: std::sync::OnceLock<Embedded> = std::sync::OnceLock::new();

impl Embedded {
    pub fn to_json(&self) -> serde_json::Value {
        let files: serde_json::Map<String, serde_json::Value> =
            self.files.iter().map(|(p, t)| (p.display().to_string(), t.clone().into())).collect();
        serde_json::json!({
            "entry": self.entry.display().to_string(),
            "files": files,
            "config": self.config.as_ref().map(|(n, t)| serde_json::json!({ "name": n, "text": t })),
            "sets": self.sets,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Embedded> {
        let files = v["files"].as_object()?.iter().map(|(p, t)| Some((PathBuf::from(p), t.as_str()?.to_string())));
        Some(Embedded {
            entry: PathBuf::from(v["entry"].as_str()?),
            files: files.collect::<Option<_>>()?,
            config: v["config"]
                .as_object()
                .and_then(|c| Some((c.get("name")?.as_str()?.to_string(), c.get("text")?.as_str()?.to_string()))),
            sets: v["sets"].as_array()?.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        })
    }
}

/// The spec and its `--config` / `--set` options.
pub fn load(args: &ModelArgs) -> Result<(Program, Options), ExitCode> {
    let embedded = match &args.spec {
        Some(p) if p.as_os_str() != BUILT_IN => None,
        _ => EMBEDDED.get(),
    };
    let program = match (&args.spec, embedded) {
        (_, Some(e)) => check::load::load_bundle(&e.entry, e.files.clone()),
        (Some(path), None) => check::load_file(path),
        (None, None) => {
            let d = Diagnostic::new("E0100", "no spec given")
                .help("name the .model file, e.g. `modelc check specs/tiny-gpt.model`");
            return Err(fail(&SourceMap::new(), &[d]));
        }
    }
    .map_err(|(sources, diags)| fail(&sources, &diags))?;
    let program = match &args.adapter {
        Some(dir) => adapted(program, dir, args, embedded)?,
        None => program,
    };
    let mut opts = options(args, &program.sources)?;
    if let Some(e) = embedded {
        if args.config.is_none()
            && let Some((name, text)) = &e.config
        {
            let json = serde_json::from_str(text).map_err(|err| {
                fail(&program.sources, &[Diagnostic::new("E0501", format!("{name} is not valid JSON: {err}"))])
            })?;
            opts.config = Some((json, name.clone()));
        }
        let built = ModelArgs { spec: None, config: None, sets: e.sets.clone(), adapter: None };
        let mut sets = options(&built, &program.sources)?.sets;
        sets.extend(opts.sets);
        opts.sets = sets;
    }
    Ok((program, opts))
}

/// The spec's model adapted as `--adapter DIR/adapter_config.json` says.
fn adapted(program: Program, dir: &Path, args: &ModelArgs, embedded: Option<&Embedded>) -> Result<Program, ExitCode> {
    let config =
        crate::peft::AdapterConfig::read(dir).map_err(|e| fail(&program.sources, &[Diagnostic::new("E0503", e)]))?;
    let Some(model) = program.entry_model().map(|m| program.item_name(m).to_string()) else {
        return Err(fail(&program.sources, &[Diagnostic::new("E0503", "--adapter needs a spec with a model")]));
    };
    let entry = match embedded {
        Some(e) => e.entry.clone(),
        None => args.spec.clone().unwrap_or_default(),
    };
    let file = entry.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let text = config.spec(&model, &file);
    // A file name beside the spec, so that its relative import resolves.
    let name = "adapter.model";
    let loaded = match embedded {
        Some(e) => {
            let path = entry.with_file_name("adapter.model");
            let mut files = e.files.clone();
            files.insert(path.clone(), text);
            check::load::load_bundle(&path, files)
        }
        None => check::load::load_source(name, &text, entry.parent()),
    };
    loaded.map_err(|(sources, diags)| fail(&sources, &diags))
}

/// `--config` and `--set` as checker options.
fn options(args: &ModelArgs, sources: &SourceMap) -> Result<Options, ExitCode> {
    let mut opts = Options::default();
    if let Some(path) = &args.config {
        let name = path.display().to_string();
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {name}: {e}"))
            .and_then(|text| serde_json::from_str(&text).map_err(|e| format!("{name} is not valid JSON: {e}")));
        match parsed {
            Ok(json) => opts.config = Some((json, name)),
            Err(msg) => return Err(fail(sources, &[Diagnostic::new("E0501", msg)])),
        }
    }
    for set in &args.sets {
        let Some((k, v)) = set.split_once('=') else {
            let d = Diagnostic::new("E0502", format!("--set {set}: expected KEY=VALUE"))
                .help("for example `--set layers=2`");
            return Err(fail(sources, &[d]));
        };
        opts.sets.push((k.trim().to_string(), v.to_string()));
    }
    Ok(opts)
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

fn read(path: &Path, sources: &mut SourceMap) -> Result<crate::source::FileId, ExitCode> {
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
        } else if let Err(e) = write_atomic(path, &formatted) {
            let d = Diagnostic::new("E0100", format!("cannot write {}: {e}", path.display()));
            diags.push(d);
        }
    }
    if !diags.is_empty() {
        return fail(&sources, &diags);
    }
    if unformatted > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Writes through a temporary file and a rename, so a crash leaves the old file.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("model.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
pub fn program_graph(args: &ModelArgs, train: bool) -> Result<(check::Checked, crate::ir::graph::Graph), ExitCode> {
    use crate::ir::train as training;
    let (program, opts) = load(args)?;
    let (checked, graph) = check::lower(&program, &opts, check::LowerOptions { training: train, ..Default::default() })
        .map_err(|d| fail(&program.sources, &d))?;
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
    Ok((checked, crate::ir::prune::prune(&graph)))
}

fn cmd_ir(args: &ModelArgs, train: bool, opt: bool, stats: bool) -> ExitCode {
    use crate::ir::print;
    let (checked, graph) = match program_graph(args, train) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let optimized = opt.then(|| crate::opt::optimize(&graph, crate::opt::Limits::default()));
    let elapsed = started.elapsed();
    if stats {
        // FLOPs as polynomials in the symbolic sizes, and at batch 1 with 128 for every other size.
        let at = |f: &crate::check::dim::Dim| {
            let v = f.substitute(&|s| Some(crate::check::dim::Dim::constant(if s == "B" { 1 } else { 128 })));
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

fn cmd_graph(args: &ModelArgs, output: &Path) -> ExitCode {
    let (program, opts) = match load(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let (checked, calls) = match check::trace_calls(&program, &opts) {
        Ok(v) => v,
        Err(diags) => return fail(&program.sources, &diags),
    };
    let svg = crate::draw::svg(&checked, &calls);
    let tmp = output.with_extension("svg.tmp");
    if let Err(e) = std::fs::write(&tmp, svg).and_then(|_| std::fs::rename(&tmp, output)) {
        return fail(&program.sources, &[Diagnostic::new("E0100", format!("cannot write {}: {e}", output.display()))]);
    }
    eprintln!("wrote {}", output.display());
    ExitCode::SUCCESS
}

/// `--size NAME=N` values, and defaults (B=1, others 128) for the rest.
fn bind_sizes(graph: &crate::ir::graph::Graph, sizes: &[String]) -> Result<crate::ir::interp::Sizes, ExitCode> {
    let mut bound = crate::ir::interp::Sizes::new();
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
    for n in &graph.nodes {
        for d in &n.ty.dims {
            for sym in d.symbols() {
                bound.entry(sym.to_string()).or_insert(if sym == "B" { 1 } else { 128 });
            }
        }
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
        crate::ir::graph::Graph,
        crate::ir::interp::Sizes,
        crate::backend::schedule::Schedule,
        crate::backend::plan::Plan,
    ),
    ExitCode,
> {
    let (checked, graph) = program_graph(args, train)?;
    let (graph, bound, sched, memory) = cpu_plan(&graph, sizes)?;
    Ok((checked, graph, bound, sched, memory))
}

/// The optimised graph scheduled and planned for the CPU at the given sizes.
fn cpu_plan(
    graph: &crate::ir::graph::Graph,
    sizes: &[String],
) -> Result<
    (crate::ir::graph::Graph, crate::ir::interp::Sizes, crate::backend::schedule::Schedule, crate::backend::plan::Plan),
    ExitCode,
> {
    let (graph, _) = crate::opt::optimize(graph, crate::opt::Limits::default());
    let graph = crate::backend::split::split_reductions(&graph);
    let bound = bind_sizes(&graph, sizes)?;
    let sched = crate::backend::schedule::schedule(&graph);
    let memory = crate::backend::plan::plan(
        &graph,
        &sched,
        &bound,
        crate::backend::plan::Blocks::Buffered,
        crate::backend::plan::Inputs::Writable,
    )
    .map_err(|e| fail(&SourceMap::new(), &[Diagnostic::new("E0502", e)]))?;
    Ok((graph, bound, sched, memory))
}

fn cmd_info(args: &ModelArgs, sizes: &[String]) -> ExitCode {
    use crate::backend::clif as codegen;
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
    let mut fused = 0;
    let compiled = codegen::Jit::new().and_then(|mut jit| {
        for kernel in sched.leaves() {
            if codegen::describe(&mut jit, &graph, kernel, &bound, &memory)?.is_some() {
                fused += 1;
            }
        }
        jit.finish()
    });
    if let Err(e) = compiled {
        return fail(&SourceMap::new(), &[Diagnostic::new("E0999", format!("code generation failed: {e}"))]);
    }
    let mut shown: Vec<String> = bound.iter().map(|(k, v)| format!("{k}={v}")).collect();
    shown.sort();
    println!("\nforward program on the CPU ({})", shown.join(", "));
    println!("  IR nodes        {}", graph.nodes.len());
    let groups = sched.kernels.iter().filter(|k| matches!(k, crate::backend::schedule::Kernel::Rows(_))).count();
    println!("  kernels         {} ({fused} fused, compiled by Cranelift; {groups} row groups)", sched.leaves().len());
    println!(
        "  planned memory  {} (activations; weights not included), and {} a thread for row groups' blocks",
        bytes(memory.peak_bytes()),
        bytes(memory.block_bytes())
    );
    println!("  optimise + plan {:.1} ms", plan_time.as_secs_f64() * 1e3);
    println!("  JIT compile     {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    match crate::backend::vmath::vectors() {
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

fn cmd_wgsl(args: &ModelArgs, train: bool, sizes: &[String]) -> ExitCode {
    use crate::backend::wgsl;
    let (checked, graph) = match program_graph(args, train) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let (graph, _) = crate::opt::optimize(&graph, crate::opt::Limits::default());
    let bound = match bind_sizes(&graph, sizes) {
        Ok(b) => b,
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
    use crate::backend::{clif as codegen, schedule};
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
