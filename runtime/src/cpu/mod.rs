//! The CPU backend: a compiled program runs the schedule's kernels over one
//! arena laid out by the memory plan. Fused elementwise kernels are
//! Cranelift machine code (`modelc::backend::clif`); matrix products go
//! through the `gemm` crate, or tiles of our own (`tiles.rs`: bf16 products,
//! and f32 ones against fixed weights where the CPU has AVX-512); every
//! other operation has a native f32 kernel (`kernels.rs`). Every tensor is
//! stored as f32 (int and bool values are exact up to 2^24), except a
//! key/value cache kept as f16 (`Tensor::halves`), which only `write_rows`
//! and attention read.

mod attention;
mod batches;
mod compact;
mod experts;
mod given;
mod kernels;
pub mod packed;
mod row_groups;
mod siblings;
pub mod tiles;

use compact::product_weight;
pub use compact::{check_packed, drop_unread, f32_reads, pack_weights};
use given::{Given, only_cached};
use modelc::backend::clif::{Jit, KernelFn};
use modelc::backend::kernel::Kernel;
use modelc::backend::plan::{Place, Plan};
use modelc::backend::schedule::Schedule;
use modelc::backend::{KernelProgram, Target, prepare_with};
use modelc::ir::graph::{Graph, NodeId, Op};
use modelc::types::Sizes;
pub use packed::{Format, Packed};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;

/// A dense row-major f32 tensor. A weight may also carry a compact copy
/// (`packed`) that matrix products read instead; once no kernel reads its
/// f32 values, `data` may be emptied (`drop_unread`). A key/value cache may
/// hold its values as f16 bits in `halves` instead (`Tensor::halves`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub packed: Option<std::sync::Arc<Packed>>,
    pub halves: Vec<u16>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "bug: tensor data does not fill its shape");
        Tensor { shape, data, packed: None, halves: Vec::new() }
    }

    /// Zeros kept as f16: a key/value cache in half the bytes, which a
    /// program takes as state (`Program::run_state`) and only writes rows
    /// into and attends over.
    pub fn halves(shape: Vec<usize>) -> Tensor {
        let len = shape.iter().product();
        Tensor { shape, data: Vec::new(), packed: None, halves: vec![0; len] }
    }

    /// Whether the values are f16 (`Tensor::halves`).
    pub fn is_half(&self) -> bool {
        self.data.is_empty() && !self.halves.is_empty()
    }
}

enum Compiled {
    /// `row`: elements of work per unit of the kernel's range (1, or a reduced row's length);
    /// `stores`: members stored besides the output (a row group as one loop).
    Fused {
        f: KernelFn,
        inputs: Vec<NodeId>,
        row: usize,
        stores: Vec<NodeId>,
    },
    /// A row group over `rows` rows of `len` elements, one compiled entry per part.
    Rows {
        parts: Vec<Compiled>,
        rows: usize,
        len: usize,
    },
    Other,
}

/// A graph compiled for given sizes.
pub struct Program {
    graph: Graph,
    schedule: Schedule,
    plan: Plan,
    sizes: Sizes,
    kernels: Vec<Compiled>,
    /// Cranelift IR of each fused kernel.
    pub clif: Vec<String>,
    _jit: SharedJit,
    pub compile_seconds: f64,
    /// Reused across runs: every value is written before it is read, so it
    /// needs no clearing. Possibly shared with other programs
    /// (`CompileOptions::arena`); it grows to this plan's length as a run starts.
    arena: Arena,
    /// The outputs `run_kernels` writes, kept between its runs: a benchmark
    /// then times the kernels, not the first touch of fresh output memory
    /// (a GELU over 64 MiB took 34.9 ms with new pages, 6.1 ms without, on
    /// the 2-core Zen 3 VM).
    kept: std::sync::Mutex<HashMap<String, Tensor>>,
    /// Seconds spent in each kernel, when `MODELC_PROFILE` is set; printed on drop.
    profile: Option<std::sync::Mutex<Vec<f64>>>,
    /// Inputs written in place (`run_state`).
    state: Vec<String>,
    /// The state inputs that may be kept as f16 (`Tensor::halves`).
    halves_allowed: Vec<String>,
    /// The program's id in `--profile`'s recorder, when profiling.
    profile_id: Option<u32>,
    /// Each kernel's first leaf (`Schedule::leaves`): the recorder counts
    /// a row group's parts apart.
    first_leaf: Vec<usize>,
    /// Products run beside the ones sharing their left operand (`siblings.rs`).
    siblings: Vec<siblings::Sibling>,
    /// Kernels run in one parallel section with the ones beside them (`batches.rs`).
    batches: Vec<batches::Batch>,
    /// Every node's shape at the program's sizes, worked out once: a
    /// decoding step runs the program hundreds of times, and evaluating
    /// the symbolic sizes on each run was ~5% of a token.
    shapes: Vec<Result<Vec<usize>, String>>,
    /// The inputs and weights with the shapes the program was compiled for.
    fed: Vec<(String, Vec<usize>)>,
    /// The tiles its matrix products are computed in (`tiles.rs`), or none
    /// (`gemm`): bf16 products always; f32 ones where the CPU has AVX-512
    /// and the weights are fixed. f32 tiles match gemm on a training
    /// step's products (0.91-1.04x a shape) but not on the whole step (4%
    /// slower at the stories15M shape), and beat it where each weight is
    /// packed once for every run (MiniLM's `embed` 1.19x).
    tiles: Option<tiles::Kind>,
    /// Weights packed as bf16 for products (`Products::Bf16`), by weight
    /// and orientation (`tb`), kept for one run: the output layer's weight
    /// is read by every row chunk of the logits, forward and backward.
    weights_bf16: std::sync::Mutex<HashMap<(NodeId, bool), std::sync::Arc<tiles::PackedB>>>,
    /// Weights that never change between runs, packed once for all runs
    /// and programs (`CompileOptions::fixed_weights`).
    fixed_weights: Option<std::sync::Arc<FixedWeights>>,
    /// The weights more than one product reads in one orientation: the
    /// only ones worth keeping packed (a copy of every weight would cost 2
    /// bytes a parameter for each orientation, +700 MB at GPT-2 124M).
    reread: std::collections::HashSet<(NodeId, bool)>,
}

impl Drop for Program {
    /// With `MODELC_PROFILE` set, the kernels that took the most time, on stderr.
    fn drop(&mut self) {
        let Some(p) = &self.profile else { return };
        let times = p.lock().unwrap_or_else(|e| e.into_inner());
        let total: f64 = times.iter().sum();
        if total == 0.0 {
            return;
        }
        // The first line of each kernel's description (a row group's header).
        let lines: Vec<String> = (self.schedule.kernels.iter().enumerate())
            .map(|(k, kernel)| {
                let text =
                    modelc::backend::schedule::describe_kernel(&self.graph, &self.schedule, kernel, &format!("k{k}"));
                text.lines().next().unwrap_or("").to_string()
            })
            .collect();
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by(|a, b| times[*b].total_cmp(&times[*a]));
        eprintln!("profile: {:.3} s in {} kernels", total, times.len());
        // By kind: the operation of a single kernel, or `fused`.
        let mut kinds: Vec<(String, f64)> = Vec::new();
        for (k, t) in times.iter().enumerate() {
            let kind = lines.get(k).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_string();
            match kinds.iter_mut().find(|(n, _)| *n == kind) {
                Some(e) => e.1 += t,
                None => kinds.push((kind, *t)),
            }
        }
        kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
        let summary: Vec<String> = kinds.iter().map(|(n, t)| format!("{n} {:.0}%", 100.0 * t / total)).collect();
        eprintln!("by kind: {}", summary.join(", "));
        // The 25 slowest kernels; `MODELC_PROFILE=N` above 25 lists N (`=1` is just on).
        let shown = std::env::var("MODELC_PROFILE").ok().and_then(|v| v.parse().ok()).map_or(25, |n: usize| n.max(25));
        for k in order.into_iter().take(shown) {
            let line = lines.get(k).map(String::as_str).unwrap_or("");
            eprintln!(
                "{:>8.2} ms {:>5.1}%  {}",
                times[k] * 1e3,
                100.0 * times[k] / total,
                &line[..line.len().min(150)]
            );
        }
    }
}

/// A kernel compiled but not yet callable (the JIT finalises all at once).
enum Pending {
    Fused(modelc::backend::clif::KernelId, Vec<NodeId>, usize, Vec<NodeId>),
    Rows(Vec<Pending>, usize, usize),
    Other,
}

impl Pending {
    fn of(
        kernel: &Kernel,
        graph: &Graph,
        sizes: &Sizes,
        plan: &Plan,
        jit: &mut Jit,
        clif: &mut Vec<String>,
    ) -> Result<Pending, String> {
        let spec = match kernel {
            Kernel::Fused { nodes, inputs } => modelc::backend::access::spec(graph, nodes, inputs, sizes, plan)?,
            Kernel::FusedReduce { nodes, inputs, reduce } => {
                modelc::backend::access::reduce_spec(graph, nodes, inputs, *reduce, sizes, plan)?
            }
            Kernel::Rows(parts) if let Some(one) = Pending::one_loop(graph, parts, sizes, plan, jit, clif)? => {
                return Ok(one);
            }
            Kernel::Rows(parts) => {
                let first = modelc::backend::rows::row_value(graph, &parts[0]).expect("bug: a group starts a row");
                let shape = concrete(graph, first, sizes)?;
                let len = *shape.last().expect("rows have a length");
                let rows = shape[..shape.len() - 1].iter().product();
                let parts =
                    parts.iter().map(|p| Pending::of(p, graph, sizes, plan, jit, clif)).collect::<Result<_, _>>()?;
                return Ok(Pending::Rows(parts, rows, len));
            }
            _ => return Ok(Pending::Other),
        };
        let (id, text) = jit.compile(&spec)?;
        clif.push(text);
        // A reduction's range is rows: each of `row` elements.
        let row = spec.reduce.map(|(_, row)| row.max(1) as usize).unwrap_or(1);
        Ok(Pending::Fused(id, spec.inputs.to_vec(), row, Vec::new()))
    }

    fn finish(self, jit: &Jit) -> Compiled {
        match self {
            Pending::Fused(id, inputs, row, stores) => Compiled::Fused { f: jit.function(id), inputs, row, stores },
            Pending::Rows(parts, rows, len) => {
                Compiled::Rows { parts: parts.into_iter().map(|p| p.finish(jit)).collect(), rows, len }
            }
            Pending::Other => Compiled::Other,
        }
    }
}

// SAFETY: compiled kernels are plain functions; the JIT module is only read after compilation.
unsafe impl Send for Program {}
unsafe impl Sync for Program {}

/// Binds symbolic sizes from the shapes of the given inputs and weights.
pub fn bind(g: &Graph, shapes: &HashMap<String, Vec<usize>>) -> Result<Sizes, String> {
    let mut sizes = Sizes::new();
    for n in &g.nodes {
        if let Op::Input(name) | Op::Param(name) = &n.op {
            let shape = shapes.get(name).ok_or_else(|| format!("no value given for `{name}`"))?;
            modelc::types::bind_sizes(name, &n.ty.dims, shape, &mut sizes)?;
        }
    }
    Ok(sizes)
}

/// Every input and weight of `g` is fed, with the shape it was compiled for.
pub fn check_feeds(g: &Graph, sizes: &Sizes, feeds: &HashMap<String, Tensor>) -> Result<(), String> {
    check_shapes(g, sizes, &|name| feeds.get(name).map(|t| t.shape.as_slice()))
}

/// Every input and weight of `g` has a shape (`shape_of`), the one it was compiled for.
fn check_shapes<'a>(g: &Graph, sizes: &Sizes, shape_of: &dyn Fn(&str) -> Option<&'a [usize]>) -> Result<(), String> {
    for n in &g.nodes {
        if let Op::Input(name) | Op::Param(name) = &n.op {
            let shape = shape_of(name).ok_or_else(|| format!("no value given for `{name}`"))?;
            let want: Vec<usize> =
                n.ty.dims.iter().map(|d| modelc::types::eval_dim(d, sizes)).collect::<Result<_, _>>()?;
            if shape != want {
                return Err(format!("`{name}` has shape {shape:?}, but the program was compiled for {want:?}"));
            }
        }
    }
    Ok(())
}

/// Runs `f` on one of the pool's threads with the others kept awake until
/// it returns, each taking the work of parallel sections as it comes and
/// spinning between them (as llama.cpp's threads do through a graph). A
/// thread that sleeps between sections costs each section its wake-up, a
/// context switch that took ~0.2 ms on the 2-core Zen 3 VM: as long
/// as a prompt's 256 x 288 x 288 product, and twice per section when the
/// caller sleeps too. Already on a pool thread (inside `warm`, or a
/// parallel section of the caller's), `f` runs as it is.
pub fn warm<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let threads = rayon::current_num_threads();
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    /// Stops the spinning threads however `f` ends (a panic included).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| {
                let mut idle = 0u32;
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle = 0;
                    } else if idle < 1 << 12 {
                        idle += 1;
                        std::hint::spin_loop();
                    } else {
                        // Long idle (the caller's own work between runs): let
                        // any other thread on this core run.
                        std::thread::yield_now();
                    }
                }
            });
        }
        let _stop = Stop(&done);
        f()
    })
}

fn concrete(g: &Graph, n: NodeId, sizes: &Sizes) -> Result<Vec<usize>, String> {
    g.dims(n).iter().map(|d| modelc::types::eval_dim(d, sizes)).collect()
}

/// The arithmetic of a program's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Products {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16 and products summed in f32 (`tiles.rs`),
    /// as PyTorch's bf16 autocast multiplies: twice the multiply-adds a
    /// second where the CPU has AVX512_BF16. Attention's own products stay f32.
    Bf16,
}

impl Products {
    pub fn parse(s: &str) -> Result<Products, String> {
        match s {
            "f32" => Ok(Products::F32),
            "bf16" => Ok(Products::Bf16),
            other => Err(format!("precision `{other}`: expected f32 or bf16")),
        }
    }
}

/// The packed weights of models whose weights never change between runs
/// (inference: `embed`, `index`), shared by every program compiled with
/// them: each weight a product reads, packed once (`tiles::PackedB`), by
/// name, orientation and kind. An embedder compiles a program per padded
/// length, and each packed every weight on every run (7.7% of MiniLM's
/// time).
#[derive(Default)]
pub struct FixedWeights(std::sync::Mutex<HashMap<(String, bool, tiles::Kind), std::sync::Arc<tiles::PackedB>>>);

impl FixedWeights {
    /// The packing kept under `key`, made by `pack` the first time (nothing
    /// is kept when it makes none).
    fn get_or(
        &self,
        key: (String, bool, tiles::Kind),
        pack: impl FnOnce() -> Option<std::sync::Arc<tiles::PackedB>>,
    ) -> Option<std::sync::Arc<tiles::PackedB>> {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&key) {
            return Some(t.clone());
        }
        let t = pack()?;
        cache.insert(key, t.clone());
        Some(t)
    }
}

/// How a program is compiled.
#[derive(Clone)]
pub struct CompileOptions {
    /// Elementwise kernels call the host's wide-vector exp, erf, ... over
    /// chunks (`modelc::backend::vmath`) where it has AVX2 and FMA; off, they
    /// compute them in f32x4 (the tests compare both with the interpreter).
    pub wide_math: bool,
    /// How the program trades memory for work (row chunks, recomputed activations).
    pub memory: modelc::backend::Memory,
    /// How its matrix products multiply.
    pub products: Products,
    /// The weights never change between runs: products keep them packed
    /// here, for every run of every program given the same cache.
    pub fixed_weights: Option<std::sync::Arc<FixedWeights>>,
    /// An arena shared by programs that run one after another (`embed`'s,
    /// one per padded length): it grows to the largest plan and its pages
    /// are faulted in once, where each program's own would be faulted in
    /// on its first run (the kernel zeroing fresh pages was 6.7% of an
    /// embedding run's CPU time on the Intel Xeon). Runs of programs
    /// sharing one take turns.
    pub arena: Option<Arena>,
    /// A JIT shared by programs compiled one after another (`embed`'s, one
    /// per padded length): a kernel one of them compiled is not compiled
    /// again for the next (most do not depend on the length). Its own
    /// setting of wide math holds for them all.
    pub jit: Option<SharedJit>,
}

/// A JIT module programs share (`CompileOptions::jit`); it lives as long as
/// the last of them.
#[derive(Clone)]
pub struct SharedJit(std::sync::Arc<std::sync::Mutex<Jit>>);

// SAFETY: as `Program`'s: the module is only used under the lock, and the
// kernels it compiled are plain functions.
unsafe impl Send for SharedJit {}
unsafe impl Sync for SharedJit {}

impl SharedJit {
    pub fn new(wide_math: bool) -> Result<SharedJit, String> {
        Ok(SharedJit(std::sync::Arc::new(std::sync::Mutex::new(Jit::with_wide_math(wide_math)?))))
    }

    /// The distinct kernels compiled in it so far.
    pub fn kernels(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).distinct()
    }
}

/// A program's working memory (`plan::Plan::arena_len` elements at least).
pub type Arena = std::sync::Arc<std::sync::Mutex<Vec<f32>>>;

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            wide_math: true,
            memory: modelc::backend::Memory::default(),
            products: Products::F32,
            fixed_weights: None,
            arena: None,
            jit: None,
        }
    }
}

impl Program {
    pub fn compile(graph: &Graph, sizes: &Sizes) -> Result<Program, String> {
        Program::compile_with(graph, sizes, CompileOptions::default())
    }

    pub fn compile_with(graph: &Graph, sizes: &Sizes, options: CompileOptions) -> Result<Program, String> {
        let started = std::time::Instant::now();
        let KernelProgram { graph, schedule, plan } = prepare_with(graph, sizes, Target::Cpu, options.memory)?;
        let threads = rayon::current_num_threads() as u64;
        let buffers = (plan.peak_bytes() as u64).saturating_add((plan.block_bytes() as u64).saturating_mul(threads));
        let largest: Vec<(String, u64)> = (graph.nodes.iter().zip(&plan.lens))
            .enumerate()
            .map(|(i, (n, len))| {
                let dims: Vec<String> =
                    n.ty.dims.iter().map(|d| modelc::types::eval_dim(d, sizes).unwrap_or(0).to_string()).collect();
                (format!("%{i} [{}] ({})", dims.join(", "), modelc::types::shape_text(&n.ty.dims)), *len as u64 * 4)
            })
            .collect();
        crate::memory::ensure_available("the program's activations", buffers, &largest)?;
        let shared = match &options.jit {
            Some(jit) => jit.clone(),
            None => SharedJit::new(options.wide_math)?,
        };
        let mut jit = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut clif = Vec::new();
        let pending = schedule
            .kernels
            .iter()
            .map(|k| Pending::of(k, &graph, sizes, &plan, &mut jit, &mut clif))
            .collect::<Result<Vec<_>, String>>()?;
        jit.finish()?;
        let kernels: Vec<Compiled> = pending.into_iter().map(|p| p.finish(&jit)).collect();
        drop(jit);
        let compile_seconds = started.elapsed().as_secs_f64();
        let arena =
            options.arena.clone().unwrap_or_else(|| Arena::new(std::sync::Mutex::new(vec![0f32; plan.arena_len])));
        let profile =
            std::env::var_os("MODELC_PROFILE").map(|_| std::sync::Mutex::new(vec![0.0; schedule.kernels.len()]));
        let shapes: Vec<_> = (0..graph.nodes.len()).map(|i| concrete(&graph, NodeId(i as u32), sizes)).collect();
        let fed = (graph.nodes.iter().zip(&shapes))
            .filter_map(|(n, shape)| match &n.op {
                Op::Input(name) | Op::Param(name) => Some(shape.clone().map(|s| (name.clone(), s))),
                _ => None,
            })
            .collect::<Result<Vec<_>, String>>()?;
        let names = schedule.leaf_names();
        let profile_id = crate::profile::add_program(schedule.leaves().into_iter().zip(&names).map(|(leaf, name)| {
            let text = modelc::backend::schedule::describe_kernel(&graph, &schedule, leaf, name);
            (text.lines().next().unwrap_or("").to_string(), graph.node(leaf.output()).origin)
        }));
        let first_leaf = (schedule.kernels.iter())
            .scan(0, |next, k| {
                let first = *next;
                *next += if let Kernel::Rows(parts) = k { parts.len() } else { 1 };
                Some(first)
            })
            .collect();
        let state = plan.written.clone();
        let halves_allowed = state.iter().filter(|name| only_cached(&graph, name)).cloned().collect();
        let mut reads: HashMap<(NodeId, bool), usize> = HashMap::new();
        for node in &graph.nodes {
            if let Op::MatMul { tb, .. } = node.op
                && matches!(graph.node(node.args[1]).op, Op::Param(_))
            {
                *reads.entry((node.args[1], tb)).or_default() += 1;
            }
        }
        let reread = reads.into_iter().filter(|(_, n)| *n > 1).map(|(w, _)| w).collect();
        let siblings = siblings::runs(&graph, &schedule.kernels, sizes);
        let batches = batches::runs(&graph, &schedule.kernels, &kernels, &plan);
        Ok(Program {
            graph,
            schedule,
            plan,
            sizes: sizes.clone(),
            kernels,
            clif,
            _jit: shared,
            compile_seconds,
            arena,
            kept: Default::default(),
            profile,
            tiles: match options.products {
                Products::Bf16 => Some(tiles::Kind::bf16()),
                Products::F32 => (options.fixed_weights.is_some() && tiles::f32_hardware()).then_some(tiles::Kind::F32),
            },
            weights_bf16: Default::default(),
            fixed_weights: options.fixed_weights.clone(),
            reread,
            state,
            halves_allowed,
            profile_id,
            first_leaf,
            siblings,
            batches,
            shapes,
            fed,
        })
    }

    pub fn peak_bytes(&self) -> usize {
        self.plan.peak_bytes()
    }

    /// The shape of node `n` at the program's sizes.
    fn shape(&self, n: NodeId) -> Result<Vec<usize>, String> {
        self.shapes[n.index()].clone()
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Runs the program; `feeds` holds every input and weight by name.
    pub fn run(&self, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
        let mut out = HashMap::new();
        self.run_into(feeds, &mut out)?;
        Ok(out)
    }

    /// Runs the program, writing each output into the tensor of its name in
    /// `outputs` when there is one of its shape (else into a new one). A
    /// training loop hands last step's weights back as this step's buffers:
    /// otherwise every step allocates hundreds of MiB of fresh pages, and
    /// faulting them in cost a fifth of a stories15M step on this VM.
    pub fn run_into(
        &self,
        feeds: &HashMap<String, Tensor>,
        outputs: &mut HashMap<String, Tensor>,
    ) -> Result<(), String> {
        if self.state.is_empty() {
            return self.run_with(Given::new(feeds, None), outputs, true);
        }
        // Inputs the program writes in place, not handed over (`run_state`):
        // written on copies, which come back as the outputs that replace them.
        let mut state: HashMap<String, Tensor> =
            self.state.iter().filter_map(|n| feeds.get(n).map(|t| (n.clone(), t.clone()))).collect();
        self.run_with(Given::new(feeds, Some(&mut state)), outputs, true)?;
        for (name, id) in &self.graph.outputs {
            if let Place::External(input) = self.plan.resolve(*id)
                && let Some(t) = state.get(&input)
            {
                outputs.insert(name.clone(), t.clone());
            }
        }
        Ok(())
    }

    /// Runs the kernels only, leaving the outputs in the arena or in buffers
    /// kept between runs (for benchmarks of the kernels themselves).
    pub fn run_kernels(&self, feeds: &HashMap<String, Tensor>) -> Result<(), String> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        self.run_with(Given::new(feeds, None), &mut kept, false)
    }

    /// `run_into`, with the inputs the program writes in place (`state`:
    /// every key/value cache a `WriteRows` writes its new rows into, every
    /// weight and optimiser state a training step's update writes over)
    /// handed over in `state` rather than `feeds`: a decoder keeps its
    /// caches there, written token by token and never copied, and a
    /// training loop its one copy of the weights and moments. An output
    /// written over an input is not in `outputs`: its value is in `state`.
    pub fn run_state(
        &self,
        feeds: &HashMap<String, Tensor>,
        state: &mut HashMap<String, Tensor>,
        outputs: &mut HashMap<String, Tensor>,
    ) -> Result<(), String> {
        self.run_with(Given::new(feeds, Some(state)), outputs, true)
    }

    /// The inputs the program writes in place, which `run_state` takes.
    pub fn state(&self) -> &[String] {
        &self.state
    }

    /// Runs the kernels, writing outputs placed as such into `collect`'s
    /// buffers, and with `copy_out` the rest from the arena too.
    fn run_with(&self, feeds: Given, collect: &mut HashMap<String, Tensor>, copy_out: bool) -> Result<(), String> {
        if let Some(missing) = self.state.iter().find(|n| !feeds.state.contains_key(n.as_str())) {
            return Err(format!("`{missing}` is written in place and was not given: give it to run_state as state"));
        }
        if let Some(name) = feeds.halves.keys().find(|n| !self.halves_allowed.iter().any(|a| a == *n)) {
            return Err(format!("`{name}` is kept as f16, but the program reads it other than as a key/value cache"));
        }
        if rayon::current_thread_index().is_none() {
            return warm(|| self.run_with(feeds, collect, copy_out));
        }
        let mut feeds = feeds;
        // The buffers of the outputs kernels write straight into, made (or
        // remade, at another shape) in the caller's map before the kernels run.
        for (name, id) in &self.graph.outputs {
            if let Place::Output(_) = self.plan.places[id.index()] {
                let shape = self.shape(*id)?;
                if collect.get(name).is_none_or(|t| t.shape != shape) {
                    let len = shape.iter().product();
                    collect.insert(name.clone(), Tensor::new(shape, vec![0.0; len]));
                }
                let t = collect.get_mut(name).expect("made above");
                feeds.outputs.insert(name.clone(), (SendPtr(t.data.as_mut_ptr()), t.data.len()));
            }
        }
        let feeds = &feeds;
        for (name, want) in &self.fed {
            let shape = feeds.shape(name).ok_or_else(|| format!("no value given for `{name}`"))?;
            if shape != want.as_slice() {
                return Err(format!("`{name}` has shape {shape:?}, but the program was compiled for {want:?}"));
            }
        }
        let mut guard = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let arena: &mut Vec<f32> = &mut guard;
        if arena.len() < self.plan.arena_len {
            arena.resize(self.plan.arena_len, 0.0);
        }
        // Weights may have changed since the last run.
        self.weights_bf16.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let timing = self.profile.is_some() || self.profile_id.is_some();
        let run_started = self.profile_id.map(|_| std::time::Instant::now());
        for (k, (kernel, compiled)) in self.schedule.kernels.iter().zip(&self.kernels).enumerate() {
            let started = timing.then(std::time::Instant::now);
            let mut part_seconds = None;
            match (kernel, compiled) {
                (Kernel::View(_), _) => {}
                _ if self.batches[k] == batches::Batch::Follows => continue,
                _ if let batches::Batch::Leads(count) = self.batches[k] => {
                    part_seconds = self.batch(k, count, arena, feeds)
                }
                // (A row group may run as one fused loop.)
                (_, Compiled::Fused { f, inputs, row, stores }) => {
                    let out = kernel.output();
                    let len = self.plan.lens[out.index()];
                    let ptrs = self.pointers(out, inputs, stores, arena.as_mut_ptr(), feeds);
                    if let Some(chunk) = batches::fused_chunk(len, *row) {
                        (0..len.div_ceil(chunk)).into_par_iter().for_each(|c| {
                            let (s, e) = (c * chunk, ((c + 1) * chunk).min(len));
                            // SAFETY: chunks write disjoint output ranges; inputs are only read.
                            unsafe { f(ptrs.get(), s as i64, e as i64) };
                        });
                    } else {
                        // SAFETY: every pointer covers the elements the plan gave it.
                        unsafe { f(ptrs.get(), 0, len as i64) };
                    }
                }
                (Kernel::Rows(parts), Compiled::Rows { parts: compiled, rows, len }) => {
                    part_seconds = self.rows(parts, compiled, *rows, *len, arena, feeds)
                }
                (Kernel::Single(n), _) => match &self.siblings[k] {
                    siblings::Sibling::Alone => self.single(*n, arena, feeds)?,
                    siblings::Sibling::Leads { others, shares } => {
                        self.sibling_products(*n, others, arena, feeds)?;
                        part_seconds = self.profile_id.map(|_| shares.clone());
                    }
                    siblings::Sibling::Follows => {}
                },
                (Kernel::Fused { .. } | Kernel::FusedReduce { .. } | Kernel::Rows(_), _) => {
                    unreachable!("bug: kernel compiled as something else")
                }
            }
            if let (Some(p), Some(t)) = (&self.profile, started) {
                p.lock().unwrap_or_else(|e| e.into_inner())[k] += t.elapsed().as_secs_f64();
            }
            if let (Some(id), Some(t)) = (self.profile_id, started) {
                crate::profile::record_kernel(id, self.first_leaf[k], t, part_seconds.as_deref());
            }
        }
        if let (Some(id), Some(t)) = (self.profile_id, run_started) {
            crate::profile::record_run(id, t);
        }
        if !copy_out {
            return Ok(());
        }
        let outputs = collect;
        for (name, id) in &self.graph.outputs {
            // Written where the caller keeps it, or over the input it replaces (in the state).
            match self.plan.resolve(*id) {
                Place::Output(_) => continue,
                Place::External(input) if self.state.contains(&input) => continue,
                _ => {}
            }
            let shape = self.shape(*id)?;
            let value = self.read(*id, arena, feeds);
            match outputs.get_mut(name) {
                Some(t) if t.shape == shape && t.data.len() < 1 << 18 => t.data.copy_from_slice(&value),
                Some(t) if t.shape == shape => t
                    .data
                    .par_chunks_mut(1 << 16)
                    .zip(value.par_chunks(1 << 16))
                    .for_each(|(d, s)| d.copy_from_slice(s)),
                _ => {
                    outputs.insert(name.clone(), Tensor::new(shape, value.into_owned()));
                }
            }
        }
        Ok(())
    }

    /// `Op::WriteRows`: the base copied to the output unless the output is
    /// the base's own memory (a state input), then the new rows written.
    fn write_rows(&self, n: NodeId, arena: &mut [f32], feeds: &Given) -> Result<(), String> {
        let node = self.graph.node(n);
        let (base, rows, start) = (node.args[0], node.args[1], node.args[2]);
        let shape = self.shape(n)?;
        let r = shape.len();
        let (len, d, t) = (shape[r - 2], shape[r - 1], self.shape(rows)?[r - 2]);
        let start = self.read(start, arena, feeds)[0];
        let total = self.plan.lens[n.index()];
        let new = self.pointer(rows, arena.as_mut_ptr(), feeds);
        // Where each new row goes in the cache and where it comes from (the
        // rows of every batch and head, `t` of them each, written modulo `len`).
        let at = |i: usize| (start as i64 + i as i64).rem_euclid(len as i64) as usize;
        let places = (0..total / (len * d).max(1))
            .flat_map(|outer| (0..t).map(move |i| (outer, i)))
            .map(|(outer, i)| ((outer * len + at(i)) * d, (outer * t + i) * d));
        if let Place::External(name) = self.plan.resolve(base)
            && let Some((halves, count)) = feeds.halves(&name)
        {
            // An f16 cache: the new rows rounded into it where it lies.
            if self.plan.resolve(n) != Place::External(name.clone()) || count != total {
                return Err(format!("`{name}` is kept as f16 and must be written in place"));
            }
            // SAFETY: the state's `count` halves, borrowed for the run; the rows are planned memory.
            let (cache, new) = unsafe {
                (
                    std::slice::from_raw_parts_mut(halves, count),
                    std::slice::from_raw_parts(new, self.plan.lens[rows.index()]),
                )
            };
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            for (to, from) in places {
                cache[to..][..d].reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(&new[from..][..d]);
            }
            return Ok(());
        }
        let out = self.pointer(n, arena.as_mut_ptr(), feeds);
        let from = self.pointer(base, arena.as_mut_ptr(), feeds);
        // SAFETY: the output, the base and the rows are planned memory of their
        // lengths; the output is the base itself or a value of its own.
        unsafe {
            if out != from {
                std::ptr::copy_nonoverlapping(from, out, total);
            }
            for (to, from) in places {
                std::ptr::copy_nonoverlapping(new.add(from), out.add(to), d);
            }
        }
        Ok(())
    }

    /// `Op::ScatterAdd` onto a base: the base copied to the output unless the
    /// output is the base's own memory (the plan writes it in place when it
    /// dies here), then each row of the updates added into its row.
    fn scatter_into(&self, n: NodeId, arena: &mut [f32], feeds: &Given) -> Result<(), String> {
        let node = self.graph.node(n);
        let (ids, updates, base) = (node.args[0], node.args[1], node.args[2]);
        let total = self.plan.lens[n.index()];
        let rows = self.shape(n)?[0];
        let out = self.pointer(n, arena.as_mut_ptr(), feeds);
        let from = self.pointer(base, arena.as_mut_ptr(), feeds);
        if out != from {
            // SAFETY: the output and the base are planned memory of `total`
            // elements each, and not the same value, so disjoint.
            unsafe { std::ptr::copy_nonoverlapping(from, out, total) };
        }
        // SAFETY: the ids and updates are planned values of their lengths, apart
        // from the output (only the base may share its memory).
        let (ids, updates, out) = unsafe {
            (
                std::slice::from_raw_parts(self.pointer(ids, arena.as_mut_ptr(), feeds), self.plan.lens[ids.index()]),
                std::slice::from_raw_parts(
                    self.pointer(updates, arena.as_mut_ptr(), feeds),
                    self.plan.lens[updates.index()],
                ),
                std::slice::from_raw_parts_mut(out, total),
            )
        };
        kernels::scatter_add_onto(ids, updates, rows, out)
    }

    /// The right operand `b` (k x n) of the product `product`, packed for
    /// tiles of `kind`: a fixed weight once for good, a weight several
    /// products read once a run (bf16), anything else each time.
    ///
    /// # Safety
    /// `b` covers k x n at its strides.
    unsafe fn packed_rhs(
        &self,
        product: NodeId,
        b: kernels::Operand,
        k: usize,
        n: usize,
        kind: tiles::Kind,
    ) -> std::sync::Arc<tiles::PackedB> {
        // SAFETY: the caller's contract.
        let pack = || std::sync::Arc::new(unsafe { tiles::PackedB::new(b, k, n, true, kind) });
        let (weight, Op::MatMul { tb, .. }) = (self.graph.node(product).args[1], &self.graph.node(product).op) else {
            return pack();
        };
        if let (Some(fixed), Op::Param(name)) = (&self.fixed_weights, &self.graph.node(weight).op) {
            return fixed.get_or((name.clone(), *tb, kind), || Some(pack())).expect("packed");
        }
        if !self.keeps_packed(weight, *tb, kind) {
            return pack();
        }
        let mut cache = self.weights_bf16.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry((weight, *tb)).or_insert_with(pack).clone()
    }

    /// A compact (bf16) weight the product `product` reads, as bf16 tiles
    /// kept for good, where the weights are fixed.
    fn fixed_tiles(&self, product: NodeId, w: &Packed) -> Option<std::sync::Arc<tiles::PackedB>> {
        let fixed = self.fixed_weights.as_ref()?;
        let node = self.graph.node(product);
        let (Op::Param(name), Op::MatMul { tb, .. }) = (&self.graph.node(node.args[1]).op, &node.op) else {
            return None;
        };
        fixed.get_or((name.clone(), *tb, tiles::Kind::bf16()), || w.bf16_tiles(true).map(std::sync::Arc::new))
    }

    /// Whether products by `weight` (in orientation `tb`) multiply a packing
    /// kept beyond one product: a fixed weight's, or (bf16) one that several
    /// products read in a run. (f32 keeps none a run: a packed copy of the
    /// output layer is 4 bytes a parameter more, 154 MB at GPT-2 124M.)
    fn keeps_packed(&self, weight: NodeId, tb: bool, kind: tiles::Kind) -> bool {
        let fixed = self.fixed_weights.is_some() && matches!(self.graph.node(weight).op, Op::Param(_));
        fixed || (kind != tiles::Kind::F32 && self.reread.contains(&(weight, tb)))
    }

    /// The packed weight a product multiplies by, if its right operand is one.
    fn packed<'f>(&self, product: NodeId, feeds: &Given<'f>) -> Option<&'f Packed> {
        self.packed_arg(product, 1, feeds)
    }

    /// The packed weight argument `arg` of a product is, if it is one.
    fn packed_arg<'f>(&self, product: NodeId, arg: usize, feeds: &Given<'f>) -> Option<&'f Packed> {
        let b = self.graph.node(product).args[arg];
        match &self.graph.node(b).op {
            Op::Param(name) => {
                let tb = product_weight(&self.graph, product, arg)?;
                feeds.feeds.get(name)?.packed.as_deref().filter(|p| p.transposed != tb)
            }
            _ => None,
        }
    }

    /// The output pointer, the inputs' then the other stored members', as a fused kernel takes them.
    fn pointers(&self, out: NodeId, inputs: &[NodeId], stores: &[NodeId], base: *mut f32, feeds: &Given) -> SendPtrs {
        let all = std::iter::once(&out).chain(inputs).chain(stores);
        SendPtrs(all.map(|n| self.pointer(*n, base, feeds)).collect())
    }

    fn pointer(&self, n: NodeId, arena: *mut f32, feeds: &Given) -> *mut f32 {
        match self.plan.resolve(n) {
            // SAFETY: the plan keeps offsets inside the arena.
            Place::Arena { offset, .. } => unsafe { arena.add(offset) },
            Place::External(name) => feeds.pointer(&name),
            Place::Output(name) => feeds.output(&name).0,
            other => unreachable!("bug: kernel input {n} ({}) has no memory ({other:?})", self.graph.node(n).op.name()),
        }
    }

    fn read<'a>(&self, n: NodeId, arena: &'a [f32], feeds: &'a Given) -> Cow<'a, [f32]> {
        match self.plan.resolve(n) {
            Place::Arena { offset, len } => Cow::Borrowed(&arena[offset..offset + len]),
            Place::External(name) => Cow::Borrowed(feeds.values(&name)),
            // SAFETY: the caller's buffer, borrowed for the run; read after its kernel wrote it.
            Place::Output(name) => {
                let (p, len) = feeds.output(&name);
                Cow::Borrowed(unsafe { std::slice::from_raw_parts(p, len) })
            }
            _ => match &self.graph.node(n).op {
                Op::Const(v) => Cow::Owned(vec![*v as f32]),
                other => unreachable!("bug: {n} ({}) is not stored", other.name()),
            },
        }
    }

    fn single(&self, n: NodeId, arena: &mut [f32], feeds: &Given) -> Result<(), String> {
        let node = self.graph.node(n);
        if let Op::WriteRows = node.op {
            return self.write_rows(n, arena, feeds);
        }
        if let (Op::ScatterAdd, [_, _, _]) = (&node.op, node.args.as_slice()) {
            return self.scatter_into(n, arena, feeds);
        }
        let Place::Arena { offset, len } = self.plan.resolve(n) else {
            unreachable!("bug: kernel output not in the arena")
        };
        // Every view of the arena below is made from this one raw pointer,
        // each over its own range, and `arena` itself is not touched again
        // while they live: the output's range is disjoint from every input's
        // (the plan writes in place only in fused kernels and a scatter-add
        // onto a base, which `scatter_into` ran above), so no reference
        // ever covers the output and an input at once.
        let (base, arena_len) = (arena.as_mut_ptr(), arena.len());
        assert!(offset + len <= arena_len, "bug: {n}'s place lies outside the arena");
        // SAFETY: inside the arena (checked above) and disjoint from every input.
        let out: &mut [f32] = unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) };
        // Constants read by this kernel, kept alive until it returns.
        let owned: std::cell::RefCell<Vec<Vec<f32>>> = Default::default();
        let input = |x: NodeId| -> &[f32] {
            match self.plan.resolve(x) {
                Place::Arena { offset, len } => {
                    assert!(offset + len <= arena_len, "bug: {x}'s place lies outside the arena");
                    // SAFETY: inside the arena, and only read while the kernel writes
                    // `out`, which it does not overlap.
                    unsafe { std::slice::from_raw_parts(base.add(offset), len) }
                }
                Place::External(name) => feeds.values(&name),
                Place::Output(name) => {
                    let (p, len) = feeds.output(&name);
                    // SAFETY: the caller's buffer for the output, written by an earlier kernel.
                    unsafe { std::slice::from_raw_parts(p, len) }
                }
                _ => match &self.graph.node(x).op {
                    Op::Const(v) => {
                        let value = vec![*v as f32];
                        let ptr = value.as_ptr();
                        owned.borrow_mut().push(value);
                        // SAFETY: the vector's heap buffer does not move when `owned`
                        // grows, and `owned` outlives every use of the slice.
                        unsafe { std::slice::from_raw_parts(ptr, 1) }
                    }
                    other => unreachable!("bug: {x} ({}) is not stored", other.name()),
                },
            }
        };
        if let Op::MatMul { ta, tb } = node.op {
            let (a, b) = (node.args[0], node.args[1]);
            let (sa, sb) = (self.shape(a)?, self.shape(b)?);
            let r = sa.len();
            let (rows, cols) = (if ta { sa[r - 1] } else { sa[r - 2] }, if tb { sb[r - 2] } else { sb[r - 1] });
            let k = if ta { sa[r - 2] } else { sa[r - 1] };
            let batch: usize = sa[..r - 2].iter().product();
            let (ap, bp) = (input(a).as_ptr(), input(b).as_ptr());
            // (row stride, column stride) of op(A) and op(B) in their row-major storage.
            let (a_rs, a_cs) = if ta { (1, rows) } else { (k, 1) };
            let (b_rs, b_cs) = if tb { (1, k) } else { (cols, 1) };
            let (ap, bp) = (SendPtr(ap as *mut f32), SendPtr(bp as *mut f32));
            let packed = if batch == 1 { self.packed(n, feeds) } else { None };
            // A weight packed beyond this product: fixed, or read by several.
            if let Some(kind) = self.tiles
                && packed.is_none()
                && batch == 1
                && self.keeps_packed(b, tb, kind)
            {
                // SAFETY: b is k x cols at these strides; a covers rows x k at
                // its strides; out is rows x cols.
                unsafe {
                    let w = self.packed_rhs(n, (bp.get(), b_rs, b_cs), k, cols, kind);
                    let parallel = packed::worth_threads(rows, cols, k);
                    tiles::product_packed(rows, out.as_mut_ptr(), cols, 0.0, (ap.get(), a_rs, a_cs), &w, parallel)
                };
                return Ok(());
            }
            // A compact weight, fixed, against many rows: its bf16 tiles, kept.
            if let Some(w) =
                packed.filter(|_| batch == 1 && rows > packed::SMALL_M).and_then(|w| self.fixed_tiles(n, w))
            {
                // SAFETY: a covers rows x k at its strides; out is rows x cols.
                unsafe {
                    let parallel = packed::worth_threads(rows, cols, k);
                    tiles::product_packed(rows, out.as_mut_ptr(), cols, 0.0, (ap.get(), a_rs, a_cs), &w, parallel)
                };
                return Ok(());
            }
            let product = |bi: usize, out: &mut [f32], parallel: bool| {
                let (ao, bo) = (bi * rows * k, bi * k * cols);
                let rhs = match packed {
                    Some(w) => packed::Rhs::Packed(w),
                    // SAFETY: batch bi's operand lies inside b.
                    None => packed::Rhs::Dense((unsafe { bp.get().add(bo) }, b_rs, b_cs)),
                };
                // SAFETY: the strides describe the operands' layouts exactly and stay inside them.
                unsafe {
                    packed::product(
                        (rows, cols, k),
                        out.as_mut_ptr(),
                        cols,
                        0.0,
                        (ap.get().add(ao), a_rs, a_cs),
                        rhs,
                        parallel,
                        self.tiles,
                    )
                };
            };
            let work = rows * cols * k;
            if batch > 1 && work < 1 << 20 && batch * work > 1 << 18 {
                // Many small products (attention heads): one per task, each on one thread.
                out.par_chunks_mut(rows * cols).enumerate().for_each(|(bi, o)| product(bi, o, false));
            } else {
                let parallel = packed::worth_threads(rows, cols, k);
                for (bi, o) in out.chunks_mut(rows * cols).enumerate() {
                    product(bi, o, parallel);
                }
            }
            return Ok(());
        }
        let shape_of = |x: NodeId| self.shape(x);
        if self.experts(n, out, feeds, &input)? {
            return Ok(());
        }
        let native = match &node.op {
            Op::Permute(perm) => {
                let (src, shape) = (input(node.args[0]), shape_of(node.args[0])?);
                Some(Box::new(move |out: &mut [f32]| kernels::permute(src, &shape, perm, out))
                    as Box<dyn FnOnce(&mut [f32])>)
            }
            Op::Broadcast => {
                let (src, shape, out_shape) = (input(node.args[0]), shape_of(node.args[0])?, shape_of(n)?);
                Some(Box::new(move |out: &mut [f32]| kernels::broadcast(src, &shape, &out_shape, out))
                    as Box<dyn FnOnce(&mut [f32])>)
            }
            Op::Slice { axis, start, .. } => {
                let (src, shape, out_shape) = (input(node.args[0]), shape_of(node.args[0])?, shape_of(n)?);
                let start = modelc::types::eval_dim(start, &self.sizes)?;
                let axis = *axis;
                Some(Box::new(move |out: &mut [f32]| kernels::slice(src, &shape, axis, start, &out_shape, out))
                    as Box<dyn FnOnce(&mut [f32])>)
            }
            Op::Concat(axis) => {
                // Parts their kernels wrote in place are skipped (not read: their
                // memory is this output's).
                let placed = |a: &NodeId| self.schedule.placed.contains_key(a);
                let parts: Vec<(Option<&[f32]>, Vec<usize>)> = node
                    .args
                    .iter()
                    .map(|a| Ok(((!placed(a)).then(|| input(*a)), shape_of(*a)?)))
                    .collect::<Result<_, String>>()?;
                let out_shape = shape_of(n)?;
                let axis = *axis;
                Some(Box::new(move |out: &mut [f32]| {
                    let refs: Vec<(Option<&[f32]>, &[usize])> = parts.iter().map(|(d, s)| (*d, s.as_slice())).collect();
                    kernels::concat(&refs, axis, &out_shape, out)
                }) as Box<dyn FnOnce(&mut [f32])>)
            }
            Op::Reduce(r, axes) => {
                let (src, shape) = (input(node.args[0]), shape_of(node.args[0])?);
                let (r, axes) = (*r, axes.clone());
                Some(Box::new(move |out: &mut [f32]| kernels::reduce(r, src, &shape, &axes, out))
                    as Box<dyn FnOnce(&mut [f32])>)
            }
            Op::Iota => Some(Box::new(|out: &mut [f32]| out.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32))
                as Box<dyn FnOnce(&mut [f32])>),
            _ => None,
        };
        if let Some(k) = native {
            k(out);
            return Ok(());
        }
        let out_shape = shape_of(n)?;
        match &node.op {
            Op::Gather => {
                let (table, ids) = (input(node.args[0]), input(node.args[1]));
                let rows = shape_of(node.args[0])?[0];
                return kernels::gather(table, rows, ids, out);
            }
            Op::ScatterAdd => {
                let (ids, updates) = (input(node.args[0]), input(node.args[1]));
                return kernels::scatter_add(ids, updates, out_shape[0], out);
            }
            Op::OneHot => {
                let classes = *out_shape.last().expect("one_hot has a class axis");
                kernels::one_hot(input(node.args[0]), classes, out);
                return Ok(());
            }
            Op::ArgMax(axis) => {
                let shape = shape_of(node.args[0])?;
                let (outer, inner) = (shape[..*axis].iter().product(), shape[axis + 1..].iter().product());
                kernels::argmax(input(node.args[0]), outer, shape[*axis], inner, out);
                return Ok(());
            }
            Op::TopKValues(k) | Op::TopKIndices(k) => {
                let shape = shape_of(node.args[0])?;
                let n_last = *shape.last().expect("topk of rank >= 1");
                let indices = matches!(node.op, Op::TopKIndices(_));
                kernels::topk(input(node.args[0]), n_last, *k, indices, out);
                return Ok(());
            }
            Op::Attention(a) | Op::AttentionBackward(a, _) => {
                // The forward's inputs follow the adjoint, lse and delta in a gradient pass.
                let first = node.op.attention_inputs().unwrap_or(0);
                let forward = &node.args[first..];
                let (qs, ks, vs) = (shape_of(forward[0])?, shape_of(forward[1])?, shape_of(forward[2])?);
                let (s, g) = if a.kv_heads_first { (ks[2], ks[1]) } else { (ks[1], ks[2]) };
                let n = attention::Sizes { b: qs[0], t: qs[1], h: qs[2], d: qs[3], s, g, e: vs[3] };
                let mask = match forward.get(4) {
                    Some(m) => Some((input(*m), shape_of(*m)?[1])),
                    None => None,
                };
                // Keys and values from an f16 cache are read as they are kept.
                let stored = |x: NodeId| match self.plan.resolve(x) {
                    Place::External(name) if let Some((halves, len)) = feeds.halves(&name) => {
                        // SAFETY: the state's halves, only read while the kernel runs.
                        attention::Stored::F16(unsafe { std::slice::from_raw_parts(halves, len) })
                    }
                    _ => attention::Stored::F32(input(x)),
                };
                let x = attention::Inputs {
                    q: input(forward[0]),
                    k: stored(forward[1]),
                    v: stored(forward[2]),
                    offset: input(forward[3])[0] as i64,
                    mask,
                };
                let dy = (first > 0).then(|| attention::Adjoint {
                    gy: input(node.args[0]),
                    lse: input(node.args[1]),
                    delta: input(node.args[2]),
                });
                match &node.op {
                    Op::AttentionBackward(_, pass) => attention::backward(a, *pass, &x, dy.as_ref(), n, out),
                    _ => attention::attention(a, &x, n, out),
                }
                return Ok(());
            }
            Op::DropoutMask { p, key } => {
                let step = input(node.args[0])[0] as u64;
                kernels::dropout_mask(*p, *key, step, out);
                return Ok(());
            }
            Op::Size(d) => {
                out[0] = modelc::types::eval_dim(d, &self.sizes)? as f32;
                return Ok(());
            }
            Op::Const(v) => {
                out[0] = *v as f32;
                return Ok(());
            }
            _ => {}
        }
        unreachable!("bug: `{}` is fused, a view or an input, never a kernel of its own", node.op.name())
    }
}

struct SendPtrs(Vec<*mut f32>);
// SAFETY: the pointers are used by kernels that write disjoint ranges.
unsafe impl Sync for SendPtrs {}
unsafe impl Send for SendPtrs {}
impl SendPtrs {
    fn get(&self) -> *const *mut f32 {
        self.0.as_ptr()
    }
}

/// An operand pointer shared by the tasks of a batched matrix product.
/// A product's right-hand side, shared by the tasks that each multiply by one.
struct SendRhs<'a>(packed::Rhs<'a>);
// SAFETY: the weight is only read while the tasks write disjoint outputs.
unsafe impl Sync for SendRhs<'_> {}
unsafe impl Send for SendRhs<'_> {}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: operands are only read while the tasks write disjoint outputs.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}
impl SendPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelc::types::{DType, Dim, TensorTy};

    /// Kernels of their own (permute, matrix product, concatenation,
    /// reduction) reading the arena while writing it, through the views
    /// `single` makes. Miri checks them against Rust's aliasing model:
    /// `MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-ignore-leaks" cargo +nightly
    /// miri test -p modelc-runtime --lib single_kernels` passes (Stacked
    /// Borrows stops earlier, inside crossbeam-epoch, rayon's dependency).
    #[test]
    fn single_kernels_read_and_write_the_arena_through_disjoint_views() {
        let ty = |dims: &[i64]| TensorTy::new(DType::F32, dims.iter().map(|d| Dim::constant(*d)).collect());
        let mut g = Graph::default();
        let x = g.input("x", ty(&[3, 4]));
        let w = g.input("w", ty(&[4, 2]));
        let t = g.permute(x, &[1, 0]);
        let tt = g.permute(t, &[1, 0]);
        let y = g.matmul(tt, w);
        let both = g.concat(&[y, y], 1);
        let sum = g.reduce(modelc::ir::graph::Reduce::Sum, both, &[0]);
        g.outputs.push(("y".into(), both));
        g.outputs.push(("sum".into(), sum));
        let feeds: HashMap<String, Tensor> = HashMap::from([
            ("x".to_string(), Tensor::new(vec![3, 4], (0..12).map(|i| i as f32).collect())),
            ("w".to_string(), Tensor::new(vec![4, 2], (0..8).map(|i| 1.0 - i as f32 / 4.0).collect())),
        ]);
        let sizes = Sizes::new();
        let out = Program::compile(&g, &sizes).and_then(|p| p.run(&feeds)).unwrap();
        let want: Vec<f32> = (0..3)
            .flat_map(|r| {
                let row: Vec<f32> = (0..2)
                    .map(|c| (0..4).map(|k| (r * 4 + k) as f32 * (1.0 - (k * 2 + c) as f32 / 4.0)).sum())
                    .collect();
                [row.clone(), row].concat()
            })
            .collect();
        assert_eq!(out["y"].data, want);
        let sums: Vec<f32> = (0..4).map(|c| (0..3).map(|r| want[r * 4 + c]).sum()).collect();
        assert_eq!(out["sum"].data, sums);
    }
}
