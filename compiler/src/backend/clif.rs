//! Cranelift code generation for fused elementwise kernels.
//!
//! Each kernel becomes `fn(ptrs: *const *mut f32, start: i64, end: i64)`
//! computing output elements `start..end`; `ptrs[0]` is the output and
//! `ptrs[1..]` the inputs in the kernel's order. When every input is read
//! contiguously (or is a scalar) the loop runs on f32x4 vectors with a
//! scalar tail; inputs read through a broadcast use integer index
//! arithmetic with the sizes baked in. Functions Cranelift has no
//! instruction for are calls into Rust in the scalar loop; exp, log, tanh
//! and erf have f32x4 approximations (about 1e-7), so softmax, the losses
//! and the activations stay vectorised; pow keeps a kernel scalar.
//!
//! Where the host has AVX2 and FMA, elementwise kernels instead run in
//! chunks of `CHUNK` elements and hand exp, log, erf, the activations, sin
//! and cos to `vmath`'s functions built for 8- or 16-lane vectors: the
//! argument goes into a stack buffer, the function maps it, the rest of the
//! kernel reads it back (`Wide`).

use super::kernel::{Access, FusedSpec};
use super::vmath;
use crate::ir::graph::{Binary, Graph, NodeId, Op, Reduce, Unary};
use crate::scalar::Expr;
use crate::types::DType;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    AbiParam, BlockArg, FuncRef, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type, Value, types,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};
use std::collections::HashMap;

pub use cranelift_module::FuncId as KernelId;

pub type KernelFn = unsafe extern "C" fn(*const *mut f32, i64, i64);

extern "C" fn call_exp(x: f32) -> f32 {
    x.exp()
}
extern "C" fn call_log(x: f32) -> f32 {
    x.ln()
}
extern "C" fn call_tanh(x: f32) -> f32 {
    x.tanh()
}
extern "C" fn call_sin(x: f32) -> f32 {
    x.sin()
}
extern "C" fn call_cos(x: f32) -> f32 {
    x.cos()
}
extern "C" fn call_erf(x: f32) -> f32 {
    crate::scalar::erf(x as f64) as f32
}
extern "C" fn call_pow(x: f32, y: f32) -> f32 {
    x.powf(y)
}

const CALLS: &[(&str, *const u8, usize)] = &[
    ("modelc_exp", call_exp as *const u8, 1),
    ("modelc_log", call_log as *const u8, 1),
    ("modelc_tanh", call_tanh as *const u8, 1),
    ("modelc_sin", call_sin as *const u8, 1),
    ("modelc_cos", call_cos as *const u8, 1),
    ("modelc_erf", call_erf as *const u8, 1),
    ("modelc_pow", call_pow as *const u8, 2),
];

/// Operations that need a call, which only the scalar loop makes. exp and
/// what is built from it (sigmoid, SiLU, tanh, GELU), erf and log have
/// vector approximations instead.
fn needs_call(op: &Op) -> bool {
    matches!(op, Op::Unary(Unary::Sin | Unary::Cos) | Op::Binary(Binary::Pow))
}

/// What a fused kernel's code depends on, written out: each member's
/// operation, type and arguments (members and inputs by their place in the
/// kernel, with how each is read and the sizes inlined), the reduction and
/// where the output goes. Kernels with equal keys have the same code.
fn spec_key(spec: &FusedSpec) -> String {
    use std::fmt::Write;
    let mut key = String::new();
    let value = |key: &mut String, n: NodeId| {
        let _ = match spec.nodes.iter().position(|m| *m == n) {
            Some(i) => write!(key, "m{i}"),
            None => match spec.inputs.iter().position(|x| *x == n) {
                Some(i) => write!(key, "i{i}"),
                None => write!(key, "{:?}", spec.graph.node(n).op),
            },
        };
        let _ = write!(key, ":{:?}", spec.graph.ty(n).dtype);
        if let Some(access) = spec.access.get(&n) {
            let _ = write!(key, "@{access:?}");
        }
        if let Some(size) = spec.sizes.get(&n) {
            let _ = write!(key, "={size:?}");
        }
    };
    for &n in spec.nodes {
        value(&mut key, n);
        let _ = write!(key, "={:?}(", spec.graph.node(n).op);
        for a in &spec.graph.node(n).args {
            value(&mut key, *a);
            key.push(',');
        }
        key.push_str(") ");
    }
    let _ = write!(key, "| {} inputs | {:?} | {:?} | stores", spec.inputs.len(), spec.reduce, spec.output);
    for &n in spec.stores {
        value(&mut key, n);
    }
    key
}

pub struct Jit {
    module: JITModule,
    calls: HashMap<&'static str, FuncId>,
    /// The wide-vector functions (`vmath`) by the operation they compute, in
    /// `vmath::functions`' order; empty when the host lacks them or they are off.
    wide: Vec<(vmath::Map, FuncId)>,
    /// Each kernel compiled so far, by its Cranelift IR.
    compiled: HashMap<String, FuncId>,
    /// The same kernels by `spec_key`, with their IR.
    by_key: HashMap<String, (FuncId, String)>,
}

impl Jit {
    pub fn new() -> Result<Jit, String> {
        Jit::with_wide_math(true)
    }

    /// A JIT whose kernels call `vmath`'s wide-vector functions for exp, erf
    /// and the like (when `wide` and the host has them), or compute them in
    /// f32x4 themselves.
    pub fn with_wide_math(wide: bool) -> Result<Jit, String> {
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
        flags.set("is_pic", "false").map_err(|e| e.to_string())?;
        let isa = cranelift_native::builder()
            .map_err(|e| format!("this CPU is not supported by Cranelift: {e}"))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| e.to_string())?;
        let fma = isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        let _ = FMA.set(fma);
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        for (name, ptr, _) in CALLS {
            jb.symbol(*name, *ptr);
        }
        let functions = if wide { vmath::functions() } else { Vec::new() };
        for (_, f) in &functions {
            jb.symbol(f.name, f.ptr);
        }
        let mut module = JITModule::new(jb);

        let mut calls = HashMap::new();
        for (name, _, arity) in CALLS {
            let mut sig = module.make_signature();
            for _ in 0..*arity {
                sig.params.push(AbiParam::new(types::F32));
            }
            sig.returns.push(AbiParam::new(types::F32));
            let id = module.declare_function(name, Linkage::Import, &sig).map_err(|e| e.to_string())?;
            calls.insert(*name, id);
        }
        let mut slice_sig = module.make_signature();
        let ptr = module.target_config().pointer_type();
        slice_sig.params.extend([
            AbiParam::new(ptr),
            AbiParam::new(ptr),
            AbiParam::new(types::I64),
            AbiParam::new(types::F32),
            AbiParam::new(types::F32),
        ]);
        let wide = functions
            .iter()
            .map(|(op, f)| {
                let id = module.declare_function(f.name, Linkage::Import, &slice_sig).map_err(|e| e.to_string())?;
                Ok((*op, id))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Jit { module, calls, wide, compiled: HashMap::new(), by_key: HashMap::new() })
    }

    /// Compiles one fused kernel; returns its Cranelift IR text too. A
    /// kernel with the `spec_key` of one compiled before is that one, found
    /// without building its IR: writing the IR out to compare it took
    /// longer than compiling the few new kernels of each of `embed`'s
    /// programs (one per padded length: all but a handful of their kernels
    /// are the same code).
    pub fn compile(&mut self, spec: &FusedSpec) -> Result<(FuncId, String), String> {
        let key = spec_key(spec);
        if let Some((id, clif)) = self.by_key.get(&key).cloned() {
            #[cfg(debug_assertions)]
            {
                let (again, text) = self.build(spec)?;
                assert!(again == id && text == clif, "bug: kernels of one key differ: {key}");
            }
            return Ok((id, clif));
        }
        let (id, clif) = self.build(spec)?;
        self.by_key.insert(key, (id, clif.clone()));
        Ok((id, clif))
    }

    /// `compile` from the kernel's IR, built and compared with those compiled before.
    fn build(&mut self, spec: &FusedSpec) -> Result<(FuncId, String), String> {
        let ptr = self.module.target_config().pointer_type();
        let mut sig = Signature::new(self.module.isa().default_call_conv());
        sig.params.push(AbiParam::new(ptr));
        sig.params.push(AbiParam::new(types::I64));
        sig.params.push(AbiParam::new(types::I64));
        let mut ctx = self.module.make_context();
        ctx.func.signature = sig.clone();
        let mut fctx = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let mut refs = HashMap::new();
            // In a fixed order, so the printed IR is the same every run.
            for (name, _, _) in CALLS {
                refs.insert(*name, self.module.declare_func_in_func(self.calls[name], b.func));
            }
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let (ptrs, start, end) = (b.block_params(entry)[0], b.block_params(entry)[1], b.block_params(entry)[2]);
            let trusted = MemFlagsData::trusted();
            let out = b.ins().load(ptr, trusted, ptrs, 0);
            let bases: Vec<Value> =
                (0..spec.inputs.len()).map(|k| b.ins().load(ptr, trusted, ptrs, (8 * (k + 1)) as i32)).collect();
            let stores: Vec<(NodeId, Value)> = (spec.stores.iter().enumerate())
                .map(|(j, n)| (*n, b.ins().load(ptr, trusted, ptrs, (8 * (spec.inputs.len() + j + 1)) as i32)))
                .collect();
            // Several stores run in the plain loop: no wide functions' chunks, no rows.
            let one_loop = !stores.is_empty();
            if one_loop && (spec.reduce.is_some() || spec.row_len().is_some() || spec.output != Access::Contiguous) {
                return Err("bug: a kernel storing several members reads or writes through indices".into());
            }
            // Elementwise kernels hand their exp, erf, ... to the wide functions
            // chunk by chunk; reductions keep them inline.
            let wide = if spec.reduce.is_none() && !one_loop {
                Wide::new(&mut b, spec, &self.wide, &mut self.module)
            } else {
                None
            };
            let staged = |n: &NodeId| wide.as_ref().is_some_and(|w| w.staged.iter().any(|s| s.node == *n));
            // Broadcast reads vectorise when each group of 4 lanes lies in one row of the
            // output and the input's innermost axis is contiguous (a vector load) or
            // broadcast (one element, splat). A folded reduction's groups never cross a row,
            // nor do those of a kernel run row by row (`row_loop`).
            // A part placed into a concatenation always runs by rows: each of its
            // rows is contiguous in the concatenation.
            let placed = spec.output != Access::Contiguous;
            let by_rows = spec.reduce.is_none() && (placed || spec.row_len().is_some_and(|l| l >= ROW_LOOP_MIN));
            let vectorizable = !spec.nodes.iter().any(|n| needs_call(&spec.graph.node(*n).op) && !staged(n))
                && spec.access.values().all(|a| match a {
                    Access::Indexed { axes, .. } => axes.last().is_some_and(|&(_, osize, istride)| {
                        (spec.reduce.is_some() || by_rows || osize % 4 == 0) && istride <= 1
                    }),
                    _ => true,
                });
            let unroll = spec.nodes.len() <= UNROLL_NODES_MAX;
            // An elementwise kernel whose result is a value it reads, scaled or
            // shifted by one fixed over the loop, may be one call (`range`).
            let root = spec.graph.node(*spec.nodes.last().expect("a fused kernel has nodes"));
            let affine_root = spec.reduce.is_none()
                && wide.is_none()
                && !one_loop
                && matches!(root.op, Op::Binary(Binary::Add | Binary::Sub | Binary::Mul | Binary::Div));
            let affine = self.wide.iter().find(|(map, _)| *map == vmath::Map::Affine).filter(|_| affine_root);
            let affine = affine.map(|(_, id)| self.module.declare_func_in_func(*id, b.func));
            // Inputs of one element, read once here: Cranelift keeps a load
            // where it is, so each was read (and splat) for every group of 4
            // (the AdamW update's step size, corrections and finiteness gate).
            // The splats (and a select's lane mask) are then passed into the
            // loops as block parameters: computed as pure instructions,
            // Cranelift sank them into the loops, 3-6 instructions of an
            // update's ~15 for every group of 4.
            let conds: Vec<NodeId> = (spec.nodes.iter())
                .filter(|n| matches!(spec.graph.node(**n).op, Op::Select))
                .map(|n| access_source(spec, spec.graph.node(*n).args[0]))
                .collect();
            let read = |b: &mut FunctionBuilder| {
                let mut loaded = Vec::new();
                for (i, input) in spec.inputs.iter().enumerate() {
                    let read_whole =
                        |(n, a): (&NodeId, &Access)| *a == Access::Scalar && access_source(spec, *n) == *input;
                    if spec.access.iter().any(read_whole) {
                        let x = b.ins().load(types::F32, trusted.with_readonly(), bases[i], 0);
                        let x4 = b.ins().splat(types::F32X4, x);
                        let mask = conds.contains(input).then(|| {
                            let cond = nonzero(b, x4, types::F32X4);
                            cond_mask(b, cond)
                        });
                        loaded.push((i, [Some(x), Some(x4), mask]));
                    }
                }
                loaded
            };
            let loaded = read(&mut b);
            let flat = |l: &[(usize, [Option<Value>; 3])]| -> Vec<Value> {
                l.iter().flat_map(|(_, v)| v.iter().flatten().copied()).collect()
            };
            let twins = read(&mut b);
            let mut pinned = hold(&mut b, start, &flat(&loaded), &flat(&twins)).into_iter();
            let mut scalars = vec![None; spec.inputs.len()];
            for (i, values) in loaded {
                let [x, x4, mask] = values.map(|v| v.map(|_| pinned.next().expect("one pinned value each")));
                scalars[i] = Some(Scalar { x: x.expect("read"), x4: x4.expect("splat"), mask });
            }
            let k = Emit { spec, bases, scalars, refs, out, vector: vectorizable, unroll, wide, affine, stores };
            if let Some((op, row)) = spec.reduce {
                reduce_rows(&mut b, &k, start, end, row, op);
            } else if let (true, Some(len)) = (by_rows, spec.row_len()) {
                row_loop(&mut b, &k, start, end, len);
            } else {
                range(&mut b, &k, &HashMap::new(), out, start, end);
            }
            b.ins().return_(&[]);
            b.finalize(self.module.target_config());
        }
        let clif = ctx.func.display().to_string();
        // A kernel the same as one compiled before (the same layer's in
        // another block: the sizes are in the code, the memory comes in as
        // pointers) is that one.
        if let Some(id) = self.compiled.get(&clif) {
            self.module.clear_context(&mut ctx);
            return Ok((*id, clif));
        }
        let name = format!("kernel{}", self.compiled.len());
        let id = self.module.declare_function(&name, Linkage::Local, &sig).map_err(|e| e.to_string())?;
        self.module.define_function(id, &mut ctx).map_err(|e| format!("{e:?}"))?;
        self.module.clear_context(&mut ctx);
        self.compiled.insert(clif.clone(), id);
        Ok((id, clif))
    }

    /// Whether the kernel would hand some member to a wide function
    /// (exp, erf, ...) chunk by chunk: a kernel storing several members
    /// computes them inline instead, so such a row group stays one.
    pub fn calls_wide(&self, spec: &FusedSpec) -> bool {
        (spec.nodes.iter()).any(|n| match spec.graph.node(*n).op {
            Op::Unary(u) => self.wide.iter().any(|(map, _)| *map == vmath::Map::Unary(u)),
            _ => false,
        })
    }

    /// Kernels compiled: each distinct one once, however many times it runs.
    pub fn distinct(&self) -> usize {
        self.compiled.len()
    }

    /// Makes every compiled kernel callable.
    pub fn finish(&mut self) -> Result<(), String> {
        self.module.finalize_definitions().map_err(|e| e.to_string())
    }

    pub fn function(&self, id: FuncId) -> KernelFn {
        let code = self.module.get_finalized_function(id);
        // SAFETY: the function was defined with this signature in `compile`.
        unsafe { std::mem::transmute::<*const u8, KernelFn>(code) }
    }
}

/// `for i in (from..to).step_by(step)` as blocks, threading `carried` values
/// (of the given types) through the iterations: `body` gets the index and
/// the carried values and returns their next values. Returns the index the
/// loop stopped at and the final carried values.
fn counted_loop(
    b: &mut FunctionBuilder,
    from: Value,
    to: Value,
    step: i64,
    carried: &[(Value, Type)],
    mut body: impl FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> (Value, Vec<Value>) {
    let (head, block, done) = (b.create_block(), b.create_block(), b.create_block());
    b.append_block_param(head, types::I64);
    b.append_block_param(done, types::I64);
    for (_, ty) in carried {
        b.append_block_param(head, *ty);
        b.append_block_param(done, *ty);
    }
    let start: Vec<_> = std::iter::once(from).chain(carried.iter().map(|(v, _)| *v)).map(Into::into).collect();
    b.ins().jump(head, &start);
    b.switch_to_block(head);
    let params = b.block_params(head).to_vec();
    let more = b.ins().icmp(IntCC::SignedLessThan, params[0], to);
    let exit: Vec<_> = params.iter().map(|v| (*v).into()).collect();
    b.ins().brif(more, block, &[], done, &exit);
    b.switch_to_block(block);
    let next_values = body(b, params[0], &params[1..]);
    let next = b.ins().iadd_imm_s(params[0], step);
    let again: Vec<_> = std::iter::once(next).chain(next_values).map(Into::into).collect();
    b.ins().jump(head, &again);
    b.seal_block(block);
    b.seal_block(head);
    b.switch_to_block(done);
    b.seal_block(done);
    let results = b.block_params(done).to_vec();
    (results[0], results[1..].to_vec())
}

/// An input of one element, read before the loops.
#[derive(Clone, Copy)]
struct Scalar {
    x: Value,
    /// `x` splat to f32x4.
    x4: Value,
    /// The f32x4 lane mask of `x != 0`, where a select takes `x` as its condition.
    mask: Option<Value>,
}

/// What the loops of one kernel share.
struct Emit<'s, 'a> {
    spec: &'s FusedSpec<'a>,
    /// The inputs' base pointers, in the kernel's order.
    bases: Vec<Value>,
    /// Each input of one element (`Access::Scalar`), as read at the start.
    scalars: Vec<Option<Scalar>>,
    refs: HashMap<&'static str, FuncRef>,
    out: Value,
    /// Whether the element loops run on f32x4 (then a scalar tail).
    vector: bool,
    /// Whether they take `UNROLL` vectors an iteration: for short bodies,
    /// whose loop overhead is a large part; longer ones would only cost
    /// compile time.
    unroll: bool,
    wide: Option<Wide>,
    /// `vmath`'s affine map, for a kernel whose root may be one call of it.
    affine: Option<FuncRef>,
    /// `FusedSpec::stores`, each with its base pointer.
    stores: Vec<(NodeId, Value)>,
}

impl Emit<'_, '_> {
    fn root(&self) -> NodeId {
        *self.spec.nodes.last().expect("a fused kernel has nodes")
    }
}

/// Elements per chunk of a kernel that calls wide functions: the chunk's
/// buffers (4 KiB each on the stack) stay in L1.
const CHUNK: i64 = 1024;

/// The members of an elementwise kernel that `vmath`'s wide functions
/// compute, chunk by chunk: their arguments are written to a buffer for the
/// chunk, the function maps it in place, and later members read it back.
struct Wide {
    staged: Vec<Staged>,
}

struct Staged {
    node: NodeId,
    /// 1 + the deepest level among the staged members its argument needs:
    /// the chunk's levels run in order.
    level: usize,
    function: FuncRef,
    /// The chunk's buffer (a stack slot's address).
    buffer: Value,
}

impl Wide {
    fn new(
        b: &mut FunctionBuilder,
        spec: &FusedSpec,
        wide: &[(vmath::Map, FuncId)],
        module: &mut JITModule,
    ) -> Option<Wide> {
        let ptr = module.target_config().pointer_type();
        let mut levels: HashMap<NodeId, usize> = HashMap::new();
        let mut staged = Vec::new();
        for &n in spec.nodes {
            let node = spec.graph.node(n);
            let below = node.args.iter().filter_map(|a| levels.get(a)).max().copied().unwrap_or(0);
            let function = match node.op {
                Op::Unary(u) => wide.iter().find(|(map, _)| *map == vmath::Map::Unary(u)).map(|(_, id)| *id),
                _ => None,
            };
            let level = match function {
                Some(id) => {
                    let slot = b.create_sized_stack_slot(StackSlotData::new(
                        StackSlotKind::ExplicitSlot,
                        (CHUNK * 4) as u32,
                        6,
                    ));
                    let buffer = b.ins().stack_addr(ptr, slot, 0);
                    let function = module.declare_func_in_func(id, b.func);
                    staged.push(Staged { node: n, level: below + 1, function, buffer });
                    below + 1
                }
                None => below,
            };
            levels.insert(n, level);
        }
        (!staged.is_empty()).then_some(Wide { staged })
    }
}

/// The chunk a kernel's loops are in: where it starts, and the buffers of
/// the staged members computed so far.
struct Chunk {
    start: Value,
    buffers: HashMap<NodeId, Value>,
}

/// f32x4 groups per iteration of the vector loops of short kernels: halves
/// the loop's own instructions (GELU over 16M floats 2.9 -> 1.7 ms).
const UNROLL: i64 = 2;

/// Kernels of at most this many members unroll their vector loops. Longer
/// bodies gain little and cost compile time: unrolling every kernel took
/// LLaMA-2-7B's forward from 120 to 150-155 ms, these only to 126-134.
const UNROLL_NODES_MAX: usize = 3;

/// `body(i, ty)` for `i` in `from..to`: runs of `UNROLL` groups of 4, then
/// groups of 4 as f32x4 (when `vector`), then one by one.
fn lanes(
    b: &mut FunctionBuilder,
    vector: bool,
    unroll: bool,
    from: Value,
    to: Value,
    mut body: impl FnMut(&mut FunctionBuilder, Value, Type),
) {
    let tail = if vector {
        let n = b.ins().isub(to, from);
        let uend = if unroll {
            let unrolled = b.ins().band_imm_s(n, !(4 * UNROLL - 1));
            let uend = b.ins().iadd(from, unrolled);
            counted_loop(b, from, uend, 4 * UNROLL, &[], |b, i, _| {
                for u in 0..UNROLL {
                    let iu = b.ins().iadd_imm_s(i, 4 * u);
                    body(b, iu, types::F32X4);
                }
                Vec::new()
            });
            uend
        } else {
            from
        };
        let whole = b.ins().band_imm_s(n, !3);
        let vend = b.ins().iadd(from, whole);
        counted_loop(b, uend, vend, 4, &[], |b, i, _| {
            body(b, i, types::F32X4);
            Vec::new()
        });
        vend
    } else {
        from
    };
    counted_loop(b, tail, to, 1, &[], |b, i, _| {
        body(b, i, types::F32);
        Vec::new()
    });
}

/// The address of element `start` of `a` when it is read in place with
/// consecutive elements adjacent: an input read contiguously, or (in a row)
/// a slice or broadcast contiguous along the row.
fn streamed(
    b: &mut FunctionBuilder,
    k: &Emit,
    rows: &HashMap<usize, RowRead>,
    a: NodeId,
    start: Value,
) -> Option<Value> {
    let source = access_source(k.spec, a);
    let i = k.spec.inputs.iter().position(|x| *x == source)?;
    match (k.spec.access.get(&a)?, rows.get(&i)) {
        (Access::Contiguous, _) => Some(address(b, k.bases[i], start)),
        (Access::Indexed { .. }, Some(RowRead::Shifted(base))) => Some(address(b, *base, start)),
        _ => None,
    }
}

/// A value the loop does not change.
enum Fixed {
    Constant(f64),
    /// The kernel's input of this index, one element.
    Scalar(usize),
    /// (In a row) a value broadcast along the row, read once per row.
    Splat(Value),
}

/// How `a` is fixed over the loop, if it is.
fn fixed(spec: &FusedSpec, rows: &HashMap<usize, RowRead>, a: NodeId) -> Option<Fixed> {
    if let Op::Const(c) = spec.graph.node(a).op {
        return Some(Fixed::Constant(c));
    }
    if let Some(v) = spec.sizes.get(&a) {
        return Some(Fixed::Constant(*v));
    }
    let source = access_source(spec, a);
    let i = spec.inputs.iter().position(|x| *x == source)?;
    match (spec.access.get(&a)?, rows.get(&i)) {
        (Access::Scalar, _) => Some(Fixed::Scalar(i)),
        (Access::Indexed { .. }, Some(RowRead::Splat(v))) => Some(Fixed::Splat(*v)),
        _ => None,
    }
}

/// `a`'s value as one f32 when the loop does not change it (`fixed`).
fn invariant_scalar(b: &mut FunctionBuilder, k: &Emit, rows: &HashMap<usize, RowRead>, a: NodeId) -> Option<Value> {
    Some(match fixed(k.spec, rows, a)? {
        Fixed::Constant(c) => b.ins().f32const(c as f32),
        Fixed::Scalar(i) => k.scalars[i].expect("bug: a scalar input not read at the start").x,
        Fixed::Splat(v) => v,
    })
}

/// A wide function's argument `x * scale + shift` with `x` read in place
/// and `scale`, `shift` fixed over the loop: (address of `x` at `start`,
/// scale, shift).
fn affine(
    b: &mut FunctionBuilder,
    k: &Emit,
    rows: &HashMap<usize, RowRead>,
    a: NodeId,
    start: Value,
) -> Option<(Value, Value, Value)> {
    if !k.spec.nodes.contains(&a) || k.spec.graph.ty(a).dtype != DType::F32 {
        return None;
    }
    let node = k.spec.graph.node(a);
    let Op::Binary(op @ (Binary::Add | Binary::Sub | Binary::Mul | Binary::Div)) = node.op else { return None };
    let (p, q) = (node.args[0], node.args[1]);
    // The operand read in place, the fixed one, and whether the read one is first.
    let (x, c, first) = match (streamed(b, k, rows, p, start), streamed(b, k, rows, q, start)) {
        (Some(x), _) => (x, invariant_scalar(b, k, rows, q)?, true),
        (None, Some(x)) => (x, invariant_scalar(b, k, rows, p)?, false),
        _ => return None,
    };
    let (one, minus_one, minus_zero) = (b.ins().f32const(1.0), b.ins().f32const(-1.0), b.ins().f32const(-0.0));
    Some(match (op, first) {
        (Binary::Mul, _) => (x, c, minus_zero),
        // x / c as x * (1 / c), as the f32x4 loops divide by a fixed value.
        (Binary::Div, true) => (x, b.ins().fdiv(one, c), minus_zero),
        (Binary::Div, false) => return None,
        (Binary::Add, _) => (x, one, c),
        (Binary::Sub, true) => (x, one, b.ins().fneg(c)),
        _ => (x, minus_one, c),
    })
}

/// Output elements `from..to` (`rows`: the row's reads, when in one row).
fn range(b: &mut FunctionBuilder, k: &Emit, rows: &HashMap<usize, RowRead>, out: Value, from: Value, to: Value) {
    // `x * scale + shift` of a value read in place: one call over the range.
    if let Some(f) = k.affine
        && let Some((x, scale, shift)) = affine(b, k, rows, k.root(), from)
    {
        let n = b.ins().isub(to, from);
        let target = address(b, out, from);
        b.ins().call(f, &[x, target, n, scale, shift]);
        return;
    }
    let Some(wide) = &k.wide else {
        lanes(b, k.vector, k.unroll, from, to, |b, i, ty| {
            // Every value computed before any is stored (a member may be
            // stored over an input the others read at the same element), then
            // stored in the parts' order (a later part may write over an
            // earlier one's value in place: the last write is the one kept).
            let targets: Vec<NodeId> = k.stores.iter().map(|s| s.0).chain([k.root()]).collect();
            let values = emit_values(b, k, rows, None, i, ty, &targets);
            for (v, base) in values.into_iter().zip(k.stores.iter().map(|s| s.1).chain([out])) {
                let addr = address(b, base, i);
                b.ins().store(MemFlagsData::new().with_notrap(), v, addr, 0);
            }
        });
        return;
    };
    let root = k.root();
    let levels = wide.staged.iter().map(|s| s.level).max().unwrap_or(0);
    counted_loop(b, from, to, CHUNK, &[], |b, start, _| {
        let next = b.ins().iadd_imm_s(start, CHUNK);
        let end = b.ins().smin(next, to);
        let n = b.ins().isub(end, start);
        let mut chunk = Chunk { start, buffers: HashMap::new() };
        for level in 1..=levels {
            let now: Vec<&Staged> = wide.staged.iter().filter(|s| s.level == level).collect();
            // Each function's source (and the scale and shift it applies): a
            // staged member's buffer, a value read in place, possibly times or
            // plus a value the loop does not change (softmax's `x - max`), or
            // the argument computed into its buffer.
            let mut computed = Vec::new();
            let mut sources = Vec::new();
            for s in &now {
                let a = k.spec.graph.node(s.node).args[0];
                let (one, minus_zero) = (b.ins().f32const(1.0), b.ins().f32const(-0.0));
                let source = match chunk.buffers.get(&a) {
                    Some(buffer) => (*buffer, one, minus_zero),
                    None => match streamed(b, k, rows, a, start).map(|p| (p, one, minus_zero)) {
                        Some(source) => source,
                        None => match affine(b, k, rows, a, start) {
                            Some(source) => source,
                            None => {
                                computed.push((a, s.buffer));
                                (s.buffer, one, minus_zero)
                            }
                        },
                    },
                };
                sources.push(source);
            }
            if !computed.is_empty() {
                lanes(b, k.vector, k.unroll, start, end, |b, i, ty| {
                    let j = b.ins().isub(i, chunk.start);
                    for &(a, buffer) in &computed {
                        let v = emit_values(b, k, rows, Some(&chunk), i, ty, &[a])[0];
                        let addr = address(b, buffer, j);
                        b.ins().store(MemFlagsData::new().with_notrap(), v, addr, 0);
                    }
                });
            }
            for (s, (source, scale, shift)) in now.iter().zip(sources) {
                // The root's function writes the output itself.
                let target = if s.node == root { address(b, out, start) } else { s.buffer };
                b.ins().call(s.function, &[source, target, n, scale, shift]);
                chunk.buffers.insert(s.node, s.buffer);
            }
        }
        if !wide.staged.iter().any(|s| s.node == root) {
            lanes(b, k.vector, k.unroll, start, end, |b, i, ty| {
                let v = emit_values(b, k, rows, Some(&chunk), i, ty, &[root])[0];
                let addr = address(b, out, i);
                b.ins().store(MemFlagsData::new().with_notrap(), v, addr, 0);
            });
        }
        Vec::new()
    });
}

/// Rows at least this long run by `row_loop`; shorter ones keep the flat loop.
const ROW_LOOP_MIN: i64 = 16;

/// How a broadcast input reads within one row of the output, its row offset
/// computed once per row instead of dividing the index for every element.
#[derive(Clone, Copy)]
enum RowRead {
    /// Broadcast along the row: one element for the whole row.
    Splat(Value),
    /// Contiguous along the row: element `i` is at this pointer + 4 i.
    Shifted(Value),
}

/// The per-row reads of the row starting at output index `row_start`.
fn row_reads(b: &mut FunctionBuilder, k: &Emit, row_start: Value) -> HashMap<usize, RowRead> {
    let (spec, bases) = (k.spec, &k.bases);
    let mut reads = HashMap::new();
    for (j, input) in spec.inputs.iter().enumerate() {
        let indexed = spec.nodes.iter().chain([input]).find_map(|n| match spec.access.get(n) {
            Some(Access::Indexed { offset, axes }) if access_source(spec, *n) == *input => Some((*offset, axes)),
            _ => None,
        });
        let Some((start, axes)) = indexed else { continue };
        let Some(&(_, _, inner)) = axes.last() else { continue };
        if inner > 1 {
            continue;
        }
        // The row's offset: every axis but the innermost at the row's first element.
        let offset = indexed_offset(b, row_start, start, &axes[..axes.len() - 1]);
        let read = if inner == 0 {
            let addr = address(b, bases[j], offset);
            RowRead::Splat(b.ins().load(types::F32, MemFlagsData::new().with_notrap().with_readonly(), addr, 0))
        } else {
            let shift = b.ins().isub(offset, row_start);
            RowRead::Shifted(address(b, bases[j], shift))
        };
        reads.insert(j, read);
    }
    // Pass them into a new block: computed as pure instructions, Cranelift
    // would otherwise recompute them (divisions included) at every use
    // inside the loops over the row.
    // In input order: the kernel's IR is then the same every time it is
    // built (in a map's order it was not, and equal kernels were compiled
    // again).
    let mut keys: Vec<usize> = reads.keys().copied().collect();
    keys.sort_unstable();
    let values: Vec<Value> = keys
        .iter()
        .map(|k| match reads[k] {
            RowRead::Splat(v) | RowRead::Shifted(v) => v,
        })
        .collect();
    let pinned = pin(b, &values);
    for (k, v) in keys.into_iter().zip(pinned) {
        let read = match reads[&k] {
            RowRead::Splat(_) => RowRead::Splat(v),
            RowRead::Shifted(_) => RowRead::Shifted(v),
        };
        reads.insert(k, read);
    }
    reads
}

/// `values` as the parameters of a new block, computed where they are now
/// (before the loops) whatever uses them later. Cranelift drops a block
/// parameter that only ever receives one value, and its instruction
/// selection then computes a pure value used once (a splat) where it is
/// used, inside the loop; a parameter that two branches pass different
/// values (`twins`, equal to `values`) stays one.
fn hold(b: &mut FunctionBuilder, any: Value, values: &[Value], twins: &[Value]) -> Vec<Value> {
    if values.is_empty() {
        return Vec::new();
    }
    let next = b.create_block();
    for v in values {
        let ty = b.func.dfg.value_type(*v);
        b.append_block_param(next, ty);
    }
    let args: Vec<BlockArg> = values.iter().map(|v| (*v).into()).collect();
    let twin_args: Vec<BlockArg> = twins.iter().map(|v| (*v).into()).collect();
    b.ins().brif(any, next, &args, next, &twin_args);
    b.switch_to_block(next);
    b.seal_block(next);
    b.block_params(next).to_vec()
}

/// `values` as the parameters of a new block that continues the current one.
fn pin(b: &mut FunctionBuilder, values: &[Value]) -> Vec<Value> {
    let next = b.create_block();
    for v in values {
        let ty = b.func.dfg.value_type(*v);
        b.append_block_param(next, ty);
    }
    let args: Vec<_> = values.iter().map(|v| (*v).into()).collect();
    b.ins().jump(next, &args);
    b.switch_to_block(next);
    b.seal_block(next);
    b.block_params(next).to_vec()
}

/// The value an access entry reads: a broadcast member's source, or the input itself.
fn access_source(spec: &FusedSpec, n: NodeId) -> NodeId {
    match spec.graph.node(n).op {
        Op::Broadcast | Op::Slice { .. } if spec.nodes.contains(&n) => spec.graph.node(n).args[0],
        _ => n,
    }
}

/// The elements `from..to` of a kernel with broadcast inputs, row by row
/// (rows of `len`): each row's broadcast offsets once, then its elements
/// in groups of 4 (when `vector`) and a scalar tail.
fn row_loop(b: &mut FunctionBuilder, k: &Emit, from: Value, to: Value, len: i64) {
    let first = b.ins().udiv_imm_u(from, len);
    let past = b.ins().iadd_imm_s(to, len - 1);
    let past = b.ins().udiv_imm_u(past, len);
    counted_loop(b, first, past, 1, &[], |b, r, _| {
        let row_start = b.ins().imul_imm_u(r, len);
        let row_end = b.ins().iadd_imm_s(row_start, len);
        let lo = b.ins().smax(from, row_start);
        let hi = b.ins().smin(to, row_end);
        let reads = row_reads(b, k, row_start);
        // Where this row of the output goes (its start, shifted so that
        // element i is at out + 4 i), pinned like the reads.
        let out = match &k.spec.output {
            Access::Indexed { offset, axes } => {
                let dest = indexed_offset(b, row_start, *offset, &axes[..axes.len() - 1]);
                let shift = b.ins().isub(dest, row_start);
                let out = address(b, k.out, shift);
                pin(b, &[out])[0]
            }
            _ => k.out,
        };
        range(b, k, &reads, out, lo, hi);
        Vec::new()
    });
}

/// `acc op v`. Max and min skip a NaN `v`, as the interpreter's do, in one
/// instruction on vectors (the compare-and-select Cranelift turns into
/// `maxps` / `minps`; its own `fmax` propagates NaN through a long sequence).
fn combine(b: &mut FunctionBuilder, op: Reduce, acc: Value, v: Value) -> Value {
    let ty = b.func.dfg.value_type(acc);
    match op {
        Reduce::Sum => b.ins().fadd(acc, v),
        Reduce::Max => {
            let larger = b.ins().fcmp(FloatCC::LessThan, acc, v);
            choose(b, larger, v, acc, ty)
        }
        Reduce::Min => {
            let smaller = b.ins().fcmp(FloatCC::LessThan, v, acc);
            choose(b, smaller, v, acc, ty)
        }
    }
}

/// Vector accumulators a row reduction keeps, so that successive adds do not
/// wait on each other; combined pairwise in a fixed order.
const ACCUMULATORS: i64 = 4;

/// `for r in from..to { out[r] = fold(op, element(r * row + j) for j in 0..row) }`:
/// whole groups of 4 in f32x4 (when `vector`), lanes folded in order, then the tail.
fn reduce_rows(b: &mut FunctionBuilder, k: &Emit, from: Value, to: Value, row: i64, op: Reduce) {
    let vector = k.vector;
    let init = match op {
        Reduce::Sum => 0.0,
        Reduce::Max => f64::NEG_INFINITY,
        Reduce::Min => f64::INFINITY,
    };
    let whole = if vector { row & !3 } else { 0 };
    let row_count = b.ins().iconst(types::I64, row);
    counted_loop(b, from, to, 1, &[], |b, r, _| {
        let base = b.ins().imul(r, row_count);
        let reads = row_reads(b, k, base);
        // One pass over j in [j0, j1) with an accumulator of type `ty`.
        let fold = |b: &mut FunctionBuilder, ty: Type, acc: Value, j0: i64, j1: i64| -> Value {
            let (from, to) = (b.ins().iconst(types::I64, j0), b.ins().iconst(types::I64, j1));
            let step = i64::from(ty.lane_count());
            counted_loop(b, from, to, step, &[(acc, ty)], |b, j, acc| {
                let i = b.ins().iadd(base, j);
                let v = emit_values(b, k, &reads, None, i, ty, &[k.root()])[0];
                vec![combine(b, op, acc[0], v)]
            })
            .1[0]
        };
        let mut acc = constant(b, init, types::F32);
        if whole > 0 {
            let acc4 = constant(b, init, types::F32X4);
            // Runs of 4 x 4 elements into separate accumulators, then groups of 4.
            let unrolled = if vector { row / (4 * ACCUMULATORS) * (4 * ACCUMULATORS) } else { 0 };
            let acc4 = if unrolled > 0 {
                let (from, to) = (b.ins().iconst(types::I64, 0), b.ins().iconst(types::I64, unrolled));
                let carried = vec![(acc4, types::F32X4); ACCUMULATORS as usize];
                let accs = counted_loop(b, from, to, 4 * ACCUMULATORS, &carried, |b, j, accs| {
                    (0..ACCUMULATORS)
                        .map(|a| {
                            let ja = b.ins().iadd_imm_s(j, 4 * a);
                            let i = b.ins().iadd(base, ja);
                            let v = emit_values(b, k, &reads, None, i, types::F32X4, &[k.root()])[0];
                            combine(b, op, accs[a as usize], v)
                        })
                        .collect()
                })
                .1;
                let mut accs = accs;
                while accs.len() > 1 {
                    accs = accs.chunks(2).map(|pair| combine(b, op, pair[0], pair[1])).collect();
                }
                accs[0]
            } else {
                acc4
            };
            let acc4 = fold(b, types::F32X4, acc4, unrolled, whole);
            for lane in 0..4u8 {
                let x = b.ins().extractlane(acc4, lane);
                acc = combine(b, op, acc, x);
            }
        }
        let acc = fold(b, types::F32, acc, whole, row);
        let addr = address(b, k.out, r);
        b.ins().store(MemFlagsData::new().with_notrap(), acc, addr, 0);
        Vec::new()
    });
}

/// `start + sum over axes of ((index / output stride) % output size) * input stride`:
/// where output element `index` reads an `Access::Indexed` input.
fn indexed_offset(b: &mut FunctionBuilder, index: Value, start: i64, axes: &[(i64, i64, i64)]) -> Value {
    let mut offset = b.ins().iconst(types::I64, start);
    for &(ostride, osize, istride) in axes.iter().filter(|a| a.2 != 0) {
        let q = b.ins().udiv_imm_u(index, ostride);
        let r = b.ins().urem_imm_u(q, osize);
        let t = b.ins().imul_imm_u(r, istride);
        offset = b.ins().iadd(offset, t);
    }
    offset
}

fn address(b: &mut FunctionBuilder, base: Value, index: Value) -> Value {
    let off = b.ins().ishl_imm_u(index, 2);
    b.ins().iadd(base, off)
}

fn constant(b: &mut FunctionBuilder, v: f64, ty: Type) -> Value {
    let c = b.ins().f32const(v as f32);
    if ty == types::F32 { c } else { b.ins().splat(ty, c) }
}

/// 1.0 where `cond` holds, else 0.0.
fn flag(b: &mut FunctionBuilder, cond: Value, ty: Type) -> Value {
    let (one, zero) = (constant(b, 1.0, ty), constant(b, 0.0, ty));
    choose(b, cond, one, zero, ty)
}

fn cond_mask(b: &mut FunctionBuilder, cond: Value) -> Value {
    let little = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
    b.ins().bitcast(types::F32X4, little, cond)
}

fn choose(b: &mut FunctionBuilder, cond: Value, x: Value, y: Value, ty: Type) -> Value {
    if ty == types::F32 {
        b.ins().select(cond, x, y)
    } else {
        let mask = cond_mask(b, cond);
        b.ins().bitselect(mask, x, y)
    }
}

fn nonzero(b: &mut FunctionBuilder, x: Value, ty: Type) -> Value {
    let zero = constant(b, 0.0, ty);
    b.ins().fcmp(FloatCC::NotEqual, x, zero)
}

fn call1(b: &mut FunctionBuilder, refs: &HashMap<&str, FuncRef>, name: &str, x: Value) -> Value {
    let call = b.ins().call(refs[name], &[x]);
    b.inst_results(call)[0]
}

/// Whether the host has fused multiply-add (set when the first JIT is made).
static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// `x * y + z`, fused (one rounding) where the CPU has FMA.
fn mul_add(b: &mut FunctionBuilder, x: Value, y: Value, z: Value) -> Value {
    if *FMA.get().unwrap_or(&false) {
        b.ins().fma(x, y, z)
    } else {
        let m = b.ins().fmul(x, y);
        b.ins().fadd(m, z)
    }
}

/// e^x on f32x4: x = k ln 2 + r with |r| <= ln 2 / 2, e^r by a degree-6
/// polynomial, times 2^k added into the exponent bits. Relative error about
/// 2e-7; inputs are clamped to the finite range of f32, and those above it give infinity.
fn vexp(b: &mut FunctionBuilder, x: Value) -> Value {
    let ty = types::F32X4;
    let lo = constant(b, -87.336_55, ty);
    let hi = constant(b, 88.722_83, ty);
    let c = clamp(b, x, lo, hi);
    let log2e = constant(b, std::f64::consts::LOG2_E, ty);
    // k = round(c log2 e) by adding 1.5 * 2^23: the sum's low mantissa bits
    // hold k, so shifting its bits left by 23 gives k in the exponent field
    // (cheaper than `nearest` and a saturating conversion).
    let magic = constant(b, 12_582_912.0, ty);
    let km = mul_add(b, c, log2e, magic);
    let k = b.ins().fsub(km, magic);
    let ln2_hi = constant(b, -0.693_145_75, ty);
    let ln2_lo = constant(b, -1.428_606_8e-6, ty);
    let r = mul_add(b, k, ln2_hi, c);
    let r = mul_add(b, k, ln2_lo, r);
    let p = horner(b, &vmath::EXP_POLY, r, ty);
    let little = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
    let kbits = b.ins().bitcast(types::I32X4, little, km);
    let shift = b.ins().ishl_imm_u(kbits, 23);
    let bits = b.ins().bitcast(types::I32X4, little, p);
    let bits = b.ins().iadd(bits, shift);
    let e = b.ins().bitcast(ty, little, bits);
    // Past the clamp e^x overflows: infinity, as f32 arithmetic gives; below
    // it e^x is subnormal or 0: 0 (not e^lo), so that a masked score's
    // probability is 0 and nothing downstream computes with subnormals,
    // which cost some CPUs a hundred cycles an operation. NaN in, NaN out
    // (the shift of a NaN's bits need not be 0).
    let inf = constant(b, f64::INFINITY, ty);
    let over = b.ins().fcmp(FloatCC::GreaterThan, x, hi);
    let e = choose(b, over, inf, e, ty);
    let zero = constant(b, 0.0, ty);
    let under = b.ins().fcmp(FloatCC::LessThan, x, lo);
    let e = choose(b, under, zero, e, ty);
    let nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    choose(b, nan, x, e, ty)
}

/// `x` limited to `[lo, hi]` in two instructions (`maxps`, `minps`: the
/// pattern Cranelift matches); a NaN `x` passes through.
fn clamp(b: &mut FunctionBuilder, x: Value, lo: Value, hi: Value) -> Value {
    let below = b.ins().fcmp(FloatCC::LessThan, x, lo);
    let x = choose(b, below, lo, x, types::F32X4);
    let above = b.ins().fcmp(FloatCC::LessThan, hi, x);
    choose(b, above, hi, x, types::F32X4)
}

/// Natural log on f32x4 (Cephes' logf): x = m 2^e with m in [sqrt(1/2),
/// sqrt(2)), log(m) by a degree-9 polynomial in m - 1, e ln 2 added in two
/// parts. Relative error below 1e-7; subnormals are scaled by 2^23 first;
/// log(0) = -inf, log(inf) = inf, negative or NaN -> NaN.
fn vlog(b: &mut FunctionBuilder, x: Value) -> Value {
    let ty = types::F32X4;
    let little = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
    let int = |b: &mut FunctionBuilder, v: i64| {
        let c = b.ins().iconst(types::I32, v);
        b.ins().splat(types::I32X4, c)
    };
    let smallest = constant(b, f64::from(f32::MIN_POSITIVE), ty);
    let subnormal = b.ins().fcmp(FloatCC::LessThan, x, smallest);
    let scale = constant(b, 8_388_608.0, ty);
    let scaled = b.ins().fmul(x, scale);
    let xs = choose(b, subnormal, scaled, x, ty);
    let (minus23, zero) = (constant(b, -23.0, ty), constant(b, 0.0, ty));
    let adjust = choose(b, subnormal, minus23, zero, ty);
    let bits = b.ins().bitcast(types::I32X4, little, xs);
    // Exponent and mantissa, the mantissa in [0.5, 1).
    let exponent = b.ins().ushr_imm_u(bits, 23);
    let bias = int(b, 126);
    let exponent = b.ins().isub(exponent, bias);
    let e = b.ins().fcvt_from_sint(ty, exponent);
    let e = b.ins().fadd(e, adjust);
    let (mask, half) = (int(b, 0x007F_FFFF), int(b, 0x3F00_0000));
    let m = b.ins().band(bits, mask);
    let m = b.ins().bor(m, half);
    let m = b.ins().bitcast(ty, little, m);
    // Below sqrt(1/2): use 2m and one less in the exponent.
    let root_half = constant(b, std::f64::consts::FRAC_1_SQRT_2, ty);
    let low = b.ins().fcmp(FloatCC::LessThan, m, root_half);
    let (one, doubled) = (constant(b, 1.0, ty), b.ins().fadd(m, m));
    let e_less = b.ins().fsub(e, one);
    let e = choose(b, low, e_less, e, ty);
    let m = choose(b, low, doubled, m, ty);
    let t = b.ins().fsub(m, one);
    let z = b.ins().fmul(t, t);
    let p = horner(b, &vmath::LOG_POLY, t, ty);
    let p = b.ins().fmul(p, t);
    let y = b.ins().fmul(p, z);
    let ln2_lo = constant(b, -2.121_944_40e-4, ty);
    let y = mul_add(b, e, ln2_lo, y);
    let minus_half = constant(b, -0.5, ty);
    let y = mul_add(b, z, minus_half, y);
    let r = b.ins().fadd(t, y);
    let ln2_hi = constant(b, 0.693_359_375, ty);
    let r = mul_add(b, e, ln2_hi, r);
    // The edges: log 0 = -inf, log inf = inf, a negative or NaN gives NaN.
    let (inf, minus_inf) = (constant(b, f64::INFINITY, ty), constant(b, f64::NEG_INFINITY, ty));
    let is_zero = b.ins().fcmp(FloatCC::Equal, x, zero);
    let r = choose(b, is_zero, minus_inf, r, ty);
    let is_inf = b.ins().fcmp(FloatCC::Equal, x, inf);
    let r = choose(b, is_inf, inf, r, ty);
    let in_domain = b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
    let nan = constant(b, f64::NAN, ty);
    choose(b, in_domain, r, nan, ty)
}

/// A polynomial in `x`, coefficients highest degree first (Horner, fused
/// multiply-adds where the CPU has them), as `vmath::horner` evaluates it.
fn horner(b: &mut FunctionBuilder, coefficients: &[f64], x: Value, ty: Type) -> Value {
    let mut p = constant(b, coefficients[0], ty);
    for c in &coefficients[1..] {
        let c = constant(b, *c, ty);
        p = mul_add(b, p, x, c);
    }
    p
}

/// tanh on f32x4: x + x^3 P(x^2) for |x| < 0.625 (where the other form
/// cancels), else 1 - 2 / (e^(2x) + 1), exact in the limits (`vmath::tanh`).
fn vtanh(b: &mut FunctionBuilder, x: Value) -> Value {
    let ty = types::F32X4;
    let two = constant(b, 2.0, ty);
    let one = constant(b, 1.0, ty);
    let x2 = b.ins().fmul(x, two);
    let e = vexp(b, x2);
    let d = b.ins().fadd(e, one);
    let q = b.ins().fdiv(two, d);
    let large = b.ins().fsub(one, q);
    let s = b.ins().fmul(x, x);
    let p = horner(b, &vmath::TANH_POLY, s, ty);
    let p = b.ins().fmul(p, s);
    let small = mul_add(b, p, x, x);
    let magnitude = b.ins().fabs(x);
    let bound = constant(b, vmath::TANH_SMALL, ty);
    let near_zero = b.ins().fcmp(FloatCC::LessThan, magnitude, bound);
    choose(b, near_zero, small, large, ty)
}

/// erf on f32x4: x P(x^2) / Q(x^2) on x clamped to [-4, 4] (the rational
/// approximation Eigen and XLA use), one division and no exponential;
/// absolute error below 4.1e-7. Past |x| = 3.9 erf is +-1 in f32.
fn verf(b: &mut FunctionBuilder, x: Value) -> Value {
    let ty = types::F32X4;
    let (lo, hi) = (constant(b, -4.0, ty), constant(b, 4.0, ty));
    let c = clamp(b, x, lo, hi);
    let x2 = b.ins().fmul(c, c);
    let p = horner(b, &vmath::ERF_P, x2, ty);
    let p = b.ins().fmul(p, c);
    let q = horner(b, &vmath::ERF_Q, x2, ty);
    let y = b.ins().fdiv(p, q);
    let one = constant(b, 1.0, ty);
    let sign_bit = constant(b, -0.0, ty);
    let sign = b.ins().band(c, sign_bit);
    let unit = b.ins().bor(one, sign);
    let ac = b.ins().fabs(c);
    let edge = constant(b, 3.9, ty);
    let saturated = b.ins().fcmp(FloatCC::GreaterThan, ac, edge);
    choose(b, saturated, unit, y, ty)
}

/// exp, log, tanh and erf: a call per element in the scalar loop, an approximation on vectors.
/// A unary operation of `scalar::UNARY`: the native ones as Cranelift
/// instructions or calls of the host's functions, the others built from
/// their definitions.
fn unary(b: &mut FunctionBuilder, refs: &HashMap<&str, FuncRef>, u: Unary, a: Value, ty: Type) -> Value {
    match u {
        Unary::Neg => b.ins().fneg(a),
        Unary::Abs => b.ins().fabs(a),
        Unary::Sqrt => b.ins().sqrt(a),
        Unary::Floor => b.ins().floor(a),
        Unary::Not => {
            let zero = constant(b, 0.0, ty);
            let c = b.ins().fcmp(FloatCC::Equal, a, zero);
            flag(b, c, ty)
        }
        Unary::Exp => exp_like(b, refs, "modelc_exp", a, ty),
        Unary::Log => exp_like(b, refs, "modelc_log", a, ty),
        Unary::Tanh => exp_like(b, refs, "modelc_tanh", a, ty),
        Unary::Sin => call1(b, refs, "modelc_sin", a),
        Unary::Cos => call1(b, refs, "modelc_cos", a),
        Unary::Erf => exp_like(b, refs, "modelc_erf", a, ty),
        _ => expression(b, refs, &u.expression(), a, ty),
    }
}

/// A scalar expression of the operand `a` (see `scalar::Expr`).
fn expression(b: &mut FunctionBuilder, refs: &HashMap<&str, FuncRef>, e: &Expr, a: Value, ty: Type) -> Value {
    match e {
        Expr::X => a,
        Expr::Const(v) => constant(b, *v, ty),
        Expr::Unary(u, p) => {
            let p = expression(b, refs, p, a, ty);
            unary(b, refs, *u, p, ty)
        }
        Expr::Binary(op, p, q) => {
            let (p, q) = (expression(b, refs, p, a, ty), expression(b, refs, q, a, ty));
            binary(b, refs, *op, p, q, ty, false)
        }
        Expr::Select(k, p, q) => {
            let (k, p, q) =
                (expression(b, refs, k, a, ty), expression(b, refs, p, a, ty), expression(b, refs, q, a, ty));
            let cond = nonzero(b, k, ty);
            choose(b, cond, p, q, ty)
        }
        Expr::Y | Expr::G => unreachable!("bug: a gradient's variable in an operation's definition"),
    }
}

/// A binary operation; `int` for integer tensors (division truncates).
fn binary(
    b: &mut FunctionBuilder,
    refs: &HashMap<&str, FuncRef>,
    op: Binary,
    p: Value,
    q: Value,
    ty: Type,
    int: bool,
) -> Value {
    match op {
        Binary::Add => b.ins().fadd(p, q),
        Binary::Sub => b.ins().fsub(p, q),
        Binary::Mul => b.ins().fmul(p, q),
        Binary::Div if int => {
            let d = b.ins().fdiv(p, q);
            b.ins().trunc(d)
        }
        Binary::Div => b.ins().fdiv(p, q),
        Binary::Max => b.ins().fmax(p, q),
        Binary::Min => b.ins().fmin(p, q),
        Binary::Rem => {
            let d = b.ins().fdiv(p, q);
            let f = b.ins().floor(d);
            let m = b.ins().fmul(f, q);
            b.ins().fsub(p, m)
        }
        Binary::Pow => {
            let call = b.ins().call(refs["modelc_pow"], &[p, q]);
            b.inst_results(call)[0]
        }
        Binary::Eq | Binary::Ne | Binary::Lt | Binary::Le | Binary::Gt | Binary::Ge => {
            let cc = match op {
                Binary::Eq => FloatCC::Equal,
                Binary::Ne => FloatCC::NotEqual,
                Binary::Lt => FloatCC::LessThan,
                Binary::Le => FloatCC::LessThanOrEqual,
                Binary::Gt => FloatCC::GreaterThan,
                _ => FloatCC::GreaterThanOrEqual,
            };
            let c = b.ins().fcmp(cc, p, q);
            flag(b, c, ty)
        }
        Binary::And | Binary::Or => {
            let (cp, cq) = (nonzero(b, p, ty), nonzero(b, q, ty));
            let c = if op == Binary::And { b.ins().band(cp, cq) } else { b.ins().bor(cp, cq) };
            flag(b, c, ty)
        }
    }
}

fn exp_like(b: &mut FunctionBuilder, refs: &HashMap<&str, FuncRef>, name: &str, x: Value, ty: Type) -> Value {
    if ty == types::F32 {
        return call1(b, refs, name, x);
    }
    match name {
        "modelc_exp" => vexp(b, x),
        "modelc_log" => vlog(b, x),
        "modelc_tanh" => vtanh(b, x),
        _ => verf(b, x),
    }
}

/// The values of `targets` (members or inputs) at output index `i`, one
/// element or 4, each member computed once. Members a wide function
/// computed for this chunk are read from their buffers; only what the
/// targets need is computed.
fn emit_values(
    b: &mut FunctionBuilder,
    k: &Emit,
    rows: &HashMap<usize, RowRead>,
    chunk: Option<&Chunk>,
    i: Value,
    ty: Type,
    targets: &[NodeId],
) -> Vec<Value> {
    let (spec, bases, scalars, refs) = (k.spec, &k.bases, &k.scalars, &k.refs);
    let mut values: HashMap<NodeId, Value> = HashMap::new();
    let buffered = |n: &NodeId| chunk.and_then(|c| c.buffers.get(n)).copied();
    // What `target` needs, walking back from it; a buffered member needs nothing.
    let mut needed: std::collections::HashSet<NodeId> = targets.iter().copied().collect();
    for &n in spec.nodes.iter().rev() {
        if needed.contains(&n) && buffered(&n).is_none() {
            needed.extend(spec.graph.node(n).args.iter().copied());
        }
    }
    let load = |b: &mut FunctionBuilder, k: usize, access: &Access| -> Value {
        let flags = MemFlagsData::new().with_notrap().with_readonly();
        match access {
            Access::Contiguous => {
                let addr = address(b, bases[k], i);
                b.ins().load(ty, flags, addr, 0)
            }
            Access::Scalar => {
                let read = scalars[k].expect("bug: a scalar input not read at the start");
                if ty == types::F32 { read.x } else { read.x4 }
            }
            Access::Indexed { .. } if rows.contains_key(&k) => match rows[&k] {
                RowRead::Splat(x) => {
                    if ty == types::F32 {
                        x
                    } else {
                        b.ins().splat(ty, x)
                    }
                }
                RowRead::Shifted(base) => {
                    let addr = address(b, base, i);
                    b.ins().load(ty, flags, addr, 0)
                }
            },
            Access::Indexed { offset, axes } => {
                let src = indexed_offset(b, i, *offset, axes);
                let addr = address(b, bases[k], src);
                let inner_contiguous = axes.last().is_some_and(|a| a.2 == 1);
                if ty == types::F32 || inner_contiguous {
                    b.ins().load(ty, flags, addr, 0)
                } else {
                    let x = b.ins().load(types::F32, flags, addr, 0);
                    b.ins().splat(ty, x)
                }
            }
        }
    };
    // The value of an argument: a member computed earlier, an input (loaded
    // once, however many members read it), or inline.
    let arg = |b: &mut FunctionBuilder, values: &mut HashMap<NodeId, Value>, a: NodeId| -> Value {
        if let Some(v) = values.get(&a) {
            return *v;
        }
        match &spec.graph.node(a).op {
            Op::Const(c) => constant(b, *c, ty),
            _ if spec.sizes.contains_key(&a) => constant(b, spec.sizes[&a], ty),
            _ => {
                let k = spec.inputs.iter().position(|x| *x == a).expect("bug: a fused kernel reads an unknown value");
                let v = load(b, k, &spec.access[&a]);
                values.insert(a, v);
                v
            }
        }
    };
    for &n in spec.nodes {
        if !needed.contains(&n) {
            continue;
        }
        if let (Some(buffer), Some(c)) = (buffered(&n), chunk) {
            let j = b.ins().isub(i, c.start);
            let addr = address(b, buffer, j);
            values.insert(n, b.ins().load(ty, MemFlagsData::new().with_notrap().with_readonly(), addr, 0));
            continue;
        }
        let node = spec.graph.node(n);
        let x = |b: &mut FunctionBuilder, values: &mut HashMap<NodeId, Value>, k: usize| arg(b, values, node.args[k]);
        let v = match &node.op {
            Op::Broadcast | Op::Slice { .. } => {
                let src = node.args[0];
                match (&spec.graph.node(src).op, spec.access.get(&n)) {
                    (Op::Const(c), _) => constant(b, *c, ty),
                    (_, Some(access)) => {
                        let k = spec.inputs.iter().position(|x| *x == src).expect("bug: a read's source is an input");
                        load(b, k, access)
                    }
                    _ => arg(b, &mut values, src),
                }
            }
            Op::Unary(u) => {
                let a = x(b, &mut values, 0);
                unary(b, refs, *u, a, ty)
            }
            Op::Binary(op) => {
                let (p, q) = (x(b, &mut values, 0), x(b, &mut values, 1));
                let int = spec.graph.ty(node.args[0]).dtype == DType::Int;
                match op {
                    // By a value the loop does not change (softmax's sum, a
                    // norm): one division, hoisted out of the loop by Cranelift,
                    // and a multiplication per element (within 1.5 ulp).
                    Binary::Div if !int && fixed(spec, rows, node.args[1]).is_some() => {
                        let one = constant(b, 1.0, ty);
                        let r = b.ins().fdiv(one, q);
                        b.ins().fmul(p, r)
                    }
                    _ => binary(b, refs, *op, p, q, ty, int),
                }
            }
            Op::Select => {
                let (p, q) = (x(b, &mut values, 1), x(b, &mut values, 2));
                // A condition fixed over the kernel: its mask, made before the loops.
                let c = node.args[0];
                let fixed_mask = (spec.access.get(&c) == Some(&Access::Scalar))
                    .then(|| spec.inputs.iter().position(|i| *i == access_source(spec, c)))
                    .flatten()
                    .and_then(|k| scalars[k].and_then(|s| s.mask));
                match fixed_mask {
                    Some(mask) if ty != types::F32 => b.ins().bitselect(mask, p, q),
                    _ => {
                        let c = x(b, &mut values, 0);
                        let cond = nonzero(b, c, ty);
                        choose(b, cond, p, q, ty)
                    }
                }
            }
            Op::Cast(DType::F32) => x(b, &mut values, 0),
            Op::Cast(DType::Int) => {
                let a = x(b, &mut values, 0);
                b.ins().trunc(a)
            }
            Op::Cast(DType::Bool) => {
                let a = x(b, &mut values, 0);
                let c = nonzero(b, a, ty);
                flag(b, c, ty)
            }
            other => unreachable!("bug: `{}` in a fused kernel", other.name()),
        };
        values.insert(n, v);
    }
    targets.iter().map(|t| arg(b, &mut values, *t)).collect()
}

/// Cranelift IR of a fused kernel (`None` for other kernels), for `modelc kernels --clif`.
pub fn describe(
    jit: &mut Jit,
    graph: &Graph,
    kernel: &super::kernel::Kernel,
    sizes: &crate::types::Sizes,
    plan: &crate::backend::plan::Plan,
) -> Result<Option<String>, String> {
    use super::kernel::Kernel;
    let spec = match kernel {
        Kernel::Fused { nodes, inputs } => super::access::spec(graph, nodes, inputs, sizes, plan)?,
        Kernel::FusedReduce { nodes, inputs, reduce } => {
            super::access::reduce_spec(graph, nodes, inputs, *reduce, sizes, plan)?
        }
        _ => return Ok(None),
    };
    jit.compile(&spec).map(|(_, text)| Some(text))
}
