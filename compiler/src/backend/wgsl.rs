//! WGSL code generation: one compute shader per kernel of the schedule.
//!
//! All values live in one storage buffer of f32 (`mem`): the program's
//! inputs and weights first, then the memory plan's arena, so every shader
//! binds the same single buffer and offsets are constants baked into the
//! text, as are sizes (like the Cranelift kernels). Int and bool values are
//! f32, exact below 2^24, as on the CPU.
//!
//! Kernel kinds: fused elementwise chains (one invocation per output
//! element, broadcast inputs read through index arithmetic); matrix
//! products tiled through workgroup memory with register blocking (64 x 64
//! tiles of C, 4 x 4 per invocation, batched over `workgroup_id.z`,
//! transposes as strides); reductions, strided copies
//! (permute, broadcast, slice), concat, gather, scatter-add (one invocation
//! per output element summing its rows: deterministic, no float atomics),
//! one-hot, argmax, top-k (selection per row), dropout masks (the
//! interpreter's splitmix64 in 32-bit halves, so masks equal the CPU's),
//! iota and sizes.

use super::access::spec;
use super::kernel::Kernel;
use super::kernel::{Access, FusedSpec};
use super::plan::{Place, Plan};
use super::schedule::Schedule;
use crate::ir::graph::{Attention, AttentionPass, Binary, Graph, NodeId, Op, Reduce, Unary};
use crate::scalar::Expr;
use crate::types::DType;
use crate::types::{Sizes, eval_dim, strides};
use std::fmt::Write;

/// Invocations per workgroup of the one-dimensional kernels.
pub const WORKGROUP: usize = 64;
/// Side of a matrix-product workgroup (in invocations) and depth of a k step.
pub const TILE: usize = 16;
/// Rows and columns of C each matrix-product invocation keeps in registers.
pub const BLOCK: usize = 4;

/// Where each value lives in the one buffer.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Element offset of each node's value, when it is stored.
    pub offsets: Vec<Option<usize>>,
    /// Externals (inputs and weights): name, offset, length.
    pub externals: Vec<(String, usize, usize)>,
    /// Elements in all.
    pub len: usize,
}

/// Lays out the externals, then the plan's arena.
pub fn layout(g: &Graph, plan: &Plan) -> Layout {
    let mut externals = Vec::new();
    let mut at = 0;
    for (i, n) in g.nodes.iter().enumerate() {
        if let Op::Input(name) | Op::Param(name) = &n.op
            && !externals.iter().any(|(e, _, _): &(String, usize, usize)| e == name)
        {
            externals.push((name.clone(), at, plan.lens[i]));
            at += plan.lens[i];
        }
    }
    let arena = at;
    let offsets = (0..g.nodes.len())
        .map(|i| match plan.resolve(NodeId(i as u32)) {
            Place::Arena { offset, .. } => Some(arena + offset),
            Place::External(name) => externals.iter().find(|(e, _, _)| *e == name).map(|(_, o, _)| *o),
            _ => None,
        })
        .collect();
    Layout { offsets, externals, len: arena + plan.arena_len }
}

/// A graph as the GPU runs it: reductions split, scheduled, planned with
/// row groups' blocks in the arena and inputs read-only (a shader cannot
/// alias them), and laid out in one buffer. The one way to get there, for
/// the runtime and for `modelc wgsl`. Errors when the buffer has more
/// elements than a WGSL `u32` index reaches.
pub fn prepare(graph: &Graph, sizes: &Sizes) -> Result<(Graph, Schedule, Plan, Layout), String> {
    let super::KernelProgram { graph, schedule: sched, plan } = super::prepare(graph, sizes, super::Target::Gpu)?;
    let layout = layout(&graph, &plan);
    if layout.len > u32::MAX as usize {
        let (ext, arena) = (layout.len - plan.arena_len, plan.arena_len);
        return Err(format!(
            "the program needs {} elements in one GPU buffer ({ext} of weights and inputs, {arena} planned), \
             more than the 2^32 a WGSL index reaches (16 GiB of f32); models this large do not run on the GPU yet \
             (`--set` makes a smaller one)",
            layout.len
        ));
    }
    Ok((graph, sched, plan, layout))
}

/// One kernel's shader and how to dispatch it.
#[derive(Clone, Debug)]
pub struct Shader {
    /// The kernel, as `modelc kernels` names it.
    pub label: String,
    pub source: String,
    /// Workgroups in x, y, z.
    pub workgroups: [u32; 3],
}

/// The shaders of a scheduled program, one per kernel of `Schedule::leaves`
/// (`None` for views, which need none): a row group's parts run one after
/// the other, each over every row.
pub fn shaders(
    g: &Graph,
    s: &Schedule,
    plan: &Plan,
    sizes: &Sizes,
    layout: &Layout,
) -> Result<Vec<Option<Shader>>, String> {
    s.leaves()
        .into_iter()
        .zip(s.leaf_names())
        .map(|(kernel, label)| {
            let e = Emitter { g, plan, sizes, layout };
            let shader = match kernel {
                Kernel::View(_) => return Ok(None),
                Kernel::Fused { nodes, inputs } => e.fused(nodes, inputs)?,
                Kernel::FusedReduce { nodes, inputs, reduce } => e.fused_reduce(nodes, inputs, *reduce)?,
                Kernel::Single(n) => e.single(*n)?,
                Kernel::Rows(_) => unreachable!("bug: leaves() opens row groups"),
            };
            Ok(shader.map(|(source, workgroups)| Shader { label, source, workgroups }))
        })
        .collect()
}

/// A reduction's starting value and its step `acc = f(acc, v)`, in WGSL.
fn fold(r: Reduce) -> (&'static str, &'static str) {
    match r {
        Reduce::Sum => ("0.0", "acc + v"),
        Reduce::Max => ("bitcast<f32>(0xff800000u)", "max(acc, v)"),
        Reduce::Min => ("bitcast<f32>(0x7f800000u)", "min(acc, v)"),
    }
}

/// A float literal WGSL accepts (infinities and NaN through their bits).
/// A unary operation of `scalar::UNARY` on the WGSL expression `a`: the
/// native ones as WGSL's functions, the others printed from their definitions.
fn unary(u: Unary, a: &str) -> String {
    match u {
        Unary::Neg => format!("-({a})"),
        Unary::Abs => format!("abs({a})"),
        Unary::Sqrt => format!("sqrt({a})"),
        Unary::Floor => format!("floor({a})"),
        Unary::Not => format!("flag({a} == 0.0)"),
        Unary::Exp => format!("exp({a})"),
        Unary::Log => format!("log({a})"),
        // WGSL's tanh may overflow through exp beyond +-15; tanh is +-1 there in f32.
        Unary::Tanh => format!("tanh(clamp({a}, -15.0, 15.0))"),
        Unary::Sin => format!("sin({a})"),
        Unary::Cos => format!("cos({a})"),
        Unary::Erf => format!("erf_({a})"),
        _ => expression(&u.expression(), a),
    }
}

/// A scalar expression of the operand `a` (see `scalar::Expr`).
fn expression(e: &Expr, a: &str) -> String {
    match e {
        Expr::X => a.to_string(),
        Expr::Const(v) => lit(*v),
        Expr::Unary(u, p) => unary(*u, &expression(p, a)),
        Expr::Binary(b, p, q) => binary(*b, &expression(p, a), &expression(q, a), false),
        Expr::Select(k, p, q) => {
            format!("select({}, {}, ({}) != 0.0)", expression(q, a), expression(p, a), expression(k, a))
        }
        Expr::Y | Expr::G => unreachable!("bug: a gradient's variable in an operation's definition"),
    }
}

/// A binary operation on WGSL expressions; `int` for integer tensors.
fn binary(op: Binary, p: &str, q: &str, int: bool) -> String {
    match op {
        Binary::Add => format!("({p}) + ({q})"),
        Binary::Sub => format!("({p}) - ({q})"),
        Binary::Mul => format!("({p}) * ({q})"),
        Binary::Div if int => format!("trunc(({p}) / ({q}))"),
        Binary::Div => format!("({p}) / ({q})"),
        Binary::Max => format!("max({p}, {q})"),
        Binary::Min => format!("min({p}, {q})"),
        Binary::Rem => format!("({p}) - floor(({p}) / ({q})) * ({q})"),
        Binary::Pow => format!("pow({p}, {q})"),
        Binary::Eq => format!("flag(({p}) == ({q}))"),
        Binary::Ne => format!("flag(({p}) != ({q}))"),
        Binary::Lt => format!("flag(({p}) < ({q}))"),
        Binary::Le => format!("flag(({p}) <= ({q}))"),
        Binary::Gt => format!("flag(({p}) > ({q}))"),
        Binary::Ge => format!("flag(({p}) >= ({q}))"),
        Binary::And => format!("flag(({p}) != 0.0 && ({q}) != 0.0)"),
        Binary::Or => format!("flag(({p}) != 0.0 || ({q}) != 0.0)"),
    }
}

fn lit(v: f64) -> String {
    let f = v as f32;
    if f.is_nan() {
        return "bitcast<f32>(0x7fc00000u)".into();
    }
    if f.is_infinite() {
        return format!("bitcast<f32>({}u)", if f > 0.0 { "0x7f800000" } else { "0xff800000" });
    }
    let text = format!("{f:?}");
    if text.contains('.') || text.contains('e') { format!("f32({text})") } else { format!("f32({text}.0)") }
}

const PRELUDE: &str = "@group(0) @binding(0) var<storage, read_write> mem: array<f32>;

fn erf_(x: f32) -> f32 {
    // Abramowitz and Stegun 7.1.26, as the CPU kernels.
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return select(-y, y, x >= 0.0);
}

fn flag(c: bool) -> f32 {
    return select(0.0, 1.0, c);
}
";

/// Workgroups for `n` invocations of a one-dimensional kernel (x, then y past 65535).
fn grid(n: usize) -> [u32; 3] {
    let groups = n.div_ceil(WORKGROUP).max(1);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// A one-dimensional kernel: `body` runs for each `i < n`.
fn elementwise(n: usize, body: &str) -> (String, [u32; 3]) {
    let source = format!(
        "{PRELUDE}
@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {{
    let i = gid.x + gid.y * groups.x * {WORKGROUP}u;
    if (i >= {n}u) {{
        return;
    }}
{body}}}
"
    );
    (source, grid(n))
}

/// A kernel of one invocation a workgroup: `body` runs for each `i < n`
/// with `decls` (workgroup memory, functions) beside it.
fn per_workgroup(n: usize, decls: &str, body: &str) -> (String, [u32; 3]) {
    let source = format!(
        "{PRELUDE}
{decls}
@compute @workgroup_size(1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {{
    let i = wid.x + wid.y * groups.x;
    if (i >= {n}u) {{
        return;
    }}
{body}}}
"
    );
    let x = n.clamp(1, 65535);
    (source, [x as u32, n.div_ceil(x).max(1) as u32, 1])
}

/// The element an `Access::Indexed` names for element `i`, as WGSL.
fn index(offset: i64, axes: &[(i64, i64, i64)]) -> String {
    let terms: Vec<String> = (offset != 0)
        .then(|| format!("{offset}u"))
        .into_iter()
        .chain(
            axes.iter()
                .filter(|a| a.2 != 0)
                .map(|(ostride, osize, istride)| format!("((i / {ostride}u) % {osize}u) * {istride}u")),
        )
        .collect();
    if terms.is_empty() { "0u".into() } else { terms.join(" + ") }
}

struct Emitter<'a> {
    g: &'a Graph,
    plan: &'a Plan,
    sizes: &'a Sizes,
    layout: &'a Layout,
}

impl Emitter<'_> {
    fn shape(&self, n: NodeId) -> Result<Vec<usize>, String> {
        self.g.dims(n).iter().map(|d| eval_dim(d, self.sizes)).collect()
    }

    fn at(&self, n: NodeId) -> Result<usize, String> {
        self.layout.offsets[n.index()].ok_or_else(|| format!("bug: {n} has no memory on the GPU"))
    }

    /// How to read `n` at index `idx` (a WGSL u32 expression): memory or an inline constant.
    fn read(&self, n: NodeId, idx: &str) -> Result<String, String> {
        // A view of a constant is the constant.
        let mut root = n;
        while let (Op::Reshape, Place::Alias(of)) = (&self.g.node(root).op, &self.plan.places[root.index()]) {
            root = *of;
        }
        match &self.g.node(root).op {
            Op::Const(v) => Ok(lit(*v)),
            Op::Size(d) => Ok(lit(eval_dim(d, self.sizes)? as f64)),
            _ => Ok(format!("mem[{}u + {idx}]", self.at(n)?)),
        }
    }

    fn fused(&self, nodes: &[NodeId], inputs: &[NodeId]) -> Result<Option<(String, [u32; 3])>, String> {
        let out = *nodes.last().expect("a fused kernel has nodes");
        let spec = spec(self.g, nodes, inputs, self.sizes, self.plan)?;
        let mut body = self.chain(&spec, "    ")?;
        // A part placed into a concatenation writes at its place there.
        let at = match &spec.output {
            Access::Indexed { offset, axes } => index(*offset, axes),
            _ => "i".to_string(),
        };
        let _ = writeln!(body, "    mem[{}u + {at}] = v{};", self.at(out)?, out.index());
        Ok(Some(elementwise(self.plan.lens[out.index()], &body)))
    }

    /// One invocation per row of the chain, folding the row into the reduction.
    fn fused_reduce(
        &self,
        nodes: &[NodeId],
        inputs: &[NodeId],
        reduce: NodeId,
    ) -> Result<Option<(String, [u32; 3])>, String> {
        let last = *nodes.last().expect("a fused kernel has nodes");
        let row = *self.shape(last)?.last().expect("a reduced axis");
        let Op::Reduce(r, _) = &self.g.node(reduce).op else {
            return Err(format!("bug: {reduce} folds a chain but is not a reduction"));
        };
        let (init, combine) = fold(*r);
        let chain = self.chain(&spec(self.g, nodes, inputs, self.sizes, self.plan)?, "        ")?;
        let body = format!(
            "    let r = i;\n    var acc = {init};\n    for (var j = 0u; j < {row}u; j++) {{\n        let i = r * {row}u + j;\n{chain}        let v = v{};\n        acc = {combine};\n    }}\n    mem[{}u + r] = acc;\n",
            last.index(),
            self.at(reduce)?
        );
        Ok(Some(elementwise(self.plan.lens[reduce.index()], &body)))
    }

    /// `let vN = ...;` for each member of a fused chain at element `i`.
    fn chain(&self, spec: &FusedSpec, indent: &str) -> Result<String, String> {
        let nodes = spec.nodes;
        let mut body = String::new();
        let load = |src: NodeId, access: &Access| -> Result<String, String> {
            match access {
                Access::Contiguous => self.read(src, "i"),
                Access::Scalar => self.read(src, "0u"),
                Access::Indexed { offset, axes } => self.read(src, &index(*offset, axes)),
            }
        };
        let value = |a: NodeId| -> Result<String, String> {
            if nodes.contains(&a) {
                return Ok(format!("v{}", a.index()));
            }
            match &self.g.node(a).op {
                Op::Const(v) => Ok(lit(*v)),
                _ if spec.sizes.contains_key(&a) => Ok(lit(spec.sizes[&a])),
                _ => load(a, &spec.access[&a]),
            }
        };
        for &m in nodes {
            let node = self.g.node(m);
            let x = |k: usize| value(node.args[k]);
            let expr = match &node.op {
                Op::Broadcast | Op::Slice { .. } => {
                    let src = node.args[0];
                    match (&self.g.node(src).op, spec.access.get(&m)) {
                        (Op::Const(c), _) => lit(*c),
                        (_, Some(access)) if !nodes.contains(&src) => load(src, access)?,
                        _ => value(src)?,
                    }
                }
                Op::Unary(u) => unary(*u, &x(0)?),
                Op::Binary(op) => binary(*op, &x(0)?, &x(1)?, self.g.ty(node.args[0]).dtype == DType::Int),
                Op::Select => format!("select({}, {}, ({}) != 0.0)", x(2)?, x(1)?, x(0)?),
                Op::Cast(DType::F32) => x(0)?,
                Op::Cast(DType::Int) => format!("trunc({})", x(0)?),
                Op::Cast(DType::Bool) => format!("flag(({}) != 0.0)", x(0)?),
                other => return Err(format!("bug: `{}` in a fused kernel", other.name())),
            };
            let _ = writeln!(body, "{indent}let v{} = {expr};", m.index());
        }
        Ok(body)
    }

    fn single(&self, n: NodeId) -> Result<Option<(String, [u32; 3])>, String> {
        let node = self.g.node(n);
        let out_shape = self.shape(n)?;
        let len: usize = out_shape.iter().product();
        let o = self.at(n)?;
        let arg = |k: usize| node.args[k];
        Ok(Some(match &node.op {
            Op::MatMul { ta, tb } => return self.matmul(n, *ta, *tb).map(Some),
            Op::Permute(perm) => {
                let in_shape = self.shape(arg(0))?;
                let s = strides(&in_shape);
                let eff: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
                self.strided(n, arg(0), 0, &eff)?
            }
            Op::Broadcast => {
                let in_shape = self.shape(arg(0))?;
                let off = out_shape.len() - in_shape.len();
                let s = strides(&in_shape);
                let eff: Vec<usize> = (0..out_shape.len())
                    .map(|d| if d < off || in_shape[d - off] == 1 { 0 } else { s[d - off] })
                    .collect();
                self.strided(n, arg(0), 0, &eff)?
            }
            Op::Slice { axis, start, .. } => {
                let s = strides(&self.shape(arg(0))?);
                let base = eval_dim(start, self.sizes)? * s[*axis];
                self.strided(n, arg(0), base, &s)?
            }
            Op::Concat(axis) => {
                let inner: usize = out_shape[axis + 1..].iter().product();
                let total = out_shape[*axis];
                let mut body = format!(
                    "    let inner = i % {inner}u;\n    let a = (i / {inner}u) % {total}u;\n    let outer = i / ({inner}u * {total}u);\n"
                );
                let mut at = 0;
                for (k, part) in node.args.iter().enumerate() {
                    let size = self.shape(*part)?[*axis];
                    let idx = format!("(outer * {size}u + (a - {at}u)) * {inner}u + inner");
                    let cond =
                        if k + 1 == node.args.len() { "true".to_string() } else { format!("a < {}u", at + size) };
                    // A part its kernel wrote in place is left as it is.
                    let write = match self.plan.places[part.index()] {
                        Place::Part(_) => String::new(),
                        _ => format!("        mem[{o}u + i] = {};\n", self.read(*part, &idx)?),
                    };
                    let _ = writeln!(body, "    if ({cond}) {{\n{write}        return;\n    }}");
                    at += size;
                }
                elementwise(len, &body)
            }
            Op::Reduce(r, axes) => self.reduce(n, *r, axes)?,
            Op::Gather => {
                let rows = self.shape(arg(0))?[0];
                let row = self.plan.lens[arg(0).index()].checked_div(rows).unwrap_or(0).max(1);
                let body = format!(
                    "    let id = {};\n    let j = i % {row}u;\n    var v = 0.0;\n    if (id >= 0.0 && id < {rows}.0) {{\n        v = {};\n    }}\n    mem[{o}u + i] = v;\n",
                    self.read(arg(1), &format!("i / {row}u"))?,
                    self.read(arg(0), &format!("u32(id) * {row}u + j"))?
                );
                elementwise(len, &body)
            }
            Op::ScatterAdd => {
                // One invocation a row of the table: it scans the ids once and
                // adds each matching row of the updates, in their order (as the
                // CPU does). One an element scanned every id for each of the
                // row's elements: a tied GPT-2 embedding's gradient took
                // 50,257 x 768 x 512 comparisons.
                let rows = out_shape[0];
                let row = len.checked_div(rows).unwrap_or(0).max(1);
                let count = self.plan.lens[arg(0).index()];
                // Onto a base (`backend/scatter_into.rs`), read where it is written.
                let start = match node.args.get(2) {
                    Some(base) => self.read(*base, &format!("i * {row}u + j"))?,
                    None => "0.0".to_string(),
                };
                let body = format!(
                    "    let r = f32(i);\n    for (var j = 0u; j < {row}u; j++) {{\n        mem[{o}u + i * {row}u + j] = {start};\n    }}\n    for (var k = 0u; k < {count}u; k++) {{\n        if ({} == r) {{\n            for (var j = 0u; j < {row}u; j++) {{\n                mem[{o}u + i * {row}u + j] += {};\n            }}\n        }}\n    }}\n",
                    self.read(arg(0), "k")?,
                    self.read(arg(1), &format!("k * {row}u + j"))?
                );
                elementwise(rows, &body)
            }
            Op::WriteRows => {
                let r = out_shape.len();
                let (rows, d) = (out_shape[r - 2], out_shape[r - 1]);
                let t = self.shape(arg(1))?[r - 2];
                // Slot j takes the last new row i with (start + i) mod rows == j.
                let body = format!(
                    "    let j = (i / {d}u) % {rows}u;\n    let start = i32({});\n    let first = ((i32(j) - start) % {rows} + {rows}) % {rows};\n    let at = first + {rows} * max(({t} - 1 - first) / {rows}, 0);\n    if (first < {t}) {{\n        mem[{o}u + i] = {};\n    }} else {{\n        mem[{o}u + i] = {};\n    }}\n",
                    self.read(arg(2), "0u")?,
                    self.read(arg(1), &format!("((i / ({d}u * {rows}u)) * {t}u + u32(at)) * {d}u + i % {d}u"))?,
                    self.read(arg(0), "i")?
                );
                elementwise(len, &body)
            }
            Op::OneHot => {
                let classes = *out_shape.last().expect("one_hot has a class axis");
                let body = format!(
                    "    mem[{o}u + i] = flag({} == f32(i % {classes}u));\n",
                    self.read(arg(0), &format!("i / {classes}u"))?
                );
                elementwise(len, &body)
            }
            Op::ArgMax(axis) => {
                let shape = self.shape(arg(0))?;
                let (count, inner) = (shape[*axis], shape[axis + 1..].iter().product::<usize>());
                let at = |k: &str| {
                    self.read(arg(0), &format!("((i / {inner}u) * {count}u + {k}) * {inner}u + i % {inner}u"))
                };
                let body = format!(
                    "    var best = {};\n    var index = 0u;\n    for (var k = 1u; k < {count}u; k++) {{\n        let v = {};\n        if (v > best) {{\n            best = v;\n            index = k;\n        }}\n    }}\n    mem[{o}u + i] = f32(index);\n",
                    at("0u")?,
                    at("k")?
                );
                elementwise(len, &body)
            }
            Op::TopKValues(k) | Op::TopKIndices(k) => {
                let count = *self.shape(arg(0))?.last().expect("topk of rank >= 1");
                let rows = len / (*k).max(1);
                let indices = matches!(node.op, Op::TopKIndices(_));
                if count <= TOPK_ROW && *k > 0 {
                    // torch.topk's order (`topk.wgsl`), on a copy of the row in
                    // its workgroup's memory.
                    let body = format!(
                        "    for (var c = 0u; c < {count}u; c++) {{\n        tk_q[c] = vec2<f32>({}, f32(c));\n    }}\n    tk_order({count}u, {k}u);\n    for (var j = 0u; j < {k}u; j++) {{\n        mem[{o}u + i * {k}u + j] = tk_q[j].{};\n    }}\n",
                        self.read(arg(0), &format!("i * {count}u + c"))?,
                        if indices { "y" } else { "x" }
                    );
                    let helpers = include_str!("topk.wgsl").replace("TK_N", &count.to_string());
                    return Ok(Some(per_workgroup(rows, &helpers, &body)));
                }
                // Longer rows: selection, the next entry in (value desc, index asc)
                // order after the previous one (ties lowest index first).
                let body = format!(
                    "    let r = i;\n    var pv = bitcast<f32>(0x7f800000u);\n    var pi = -1;\n    for (var j = 0u; j < {k}u; j++) {{\n        var bv = bitcast<f32>(0xff800000u);\n        var bi = -1;\n        for (var c = 0u; c < {count}u; c++) {{\n            let v = {};\n            let after = v < pv || (v == pv && i32(c) > pi);\n            let better = bi < 0 || v > bv;\n            if (after && better) {{\n                bv = v;\n                bi = i32(c);\n            }}\n        }}\n        pv = bv;\n        pi = bi;\n        mem[{o}u + r * {k}u + j] = {};\n    }}\n",
                    self.read(arg(0), &format!("r * {count}u + c"))?,
                    if indices { "f32(bi)" } else { "bv" }
                );
                elementwise(rows, &body)
            }
            Op::DropoutMask { p, key } => {
                // Zero where the interpreter's uniform number is below p, i.e.
                // where splitmix64(...) >> 11 < ceil(p * 2^53).
                let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
                let keep = (1.0 / (1.0 - p)) as f32;
                let step = self.read(arg(0), "0u")?;
                let (t_lo, t_hi) = (threshold as u32, (threshold >> 32) as u32);
                let body = format!(
                    "    let key = vec2<u32>({}u, {}u);\n    let step = vec2<u32>(u32({step}), 0u);\n    let z = splitmix(key, step, vec2<u32>(i, 0u));\n    let below = z.y < {t_hi}u || (z.y == {t_hi}u && z.x < {t_lo}u);\n    mem[{o}u + i] = select({}, 0.0, below);\n",
                    *key as u32,
                    (*key >> 32) as u32,
                    lit(keep as f64)
                );
                let (source, groups) = elementwise(len, &body);
                (source.replacen("fn flag", &format!("{SPLITMIX}\nfn flag"), 1), groups)
            }
            Op::Attention(a) => self.attention(n, a, None)?,
            Op::AttentionBackward(a, pass) => self.attention(n, a, Some(*pass))?,
            Op::Iota => elementwise(len, &format!("    mem[{o}u + i] = f32(i);\n")),
            Op::Size(d) => elementwise(1, &format!("    mem[{o}u] = {};\n", lit(eval_dim(d, self.sizes)? as f64))),
            Op::Const(v) => elementwise(1, &format!("    mem[{o}u] = {};\n", lit(*v))),
            Op::ExpertOrder(_) | Op::ExpertOffsets(_) | Op::ExpertMatMul { .. } | Op::ExpertWeightGrad { .. } => {
                self.experts(n)?
            }
            Op::Input(_) | Op::Param(_) | Op::Reshape => return Ok(None),
            other => return Err(format!("bug: no GPU kernel for `{}`", other.name())),
        }))
    }

    /// Sparse routing, one invocation per output element: a slot's place
    /// in the order is the count of slots before it by (expert, slot); an
    /// offset, the count of slots of lower experts; a routed row's product
    /// finds its expert among the offsets and reads that expert's weight; a
    /// weight's gradient sums over its expert's rows.
    fn experts(&self, n: NodeId) -> Result<(String, [u32; 3]), String> {
        let node = self.g.node(n);
        let out = self.shape(n)?;
        let len: usize = out.iter().product();
        let o = self.at(n)?;
        let arg = |k: usize| node.args[k];
        let body = match &node.op {
            Op::ExpertOffsets(_) => {
                let slots = self.plan.lens[arg(0).index()];
                format!(
                    "    var count = 0u;\n    for (var j = 0u; j < {slots}u; j++) {{\n        if ({} < f32(i)) {{\n            count++;\n        }}\n    }}\n    mem[{o}u + i] = f32(count);\n",
                    self.read(arg(0), "j")?
                )
            }
            Op::ExpertOrder(_) => format!(
                "    let mine = {};\n    var at = 0u;\n    for (var j = 0u; j < {len}u; j++) {{\n        let c = {};\n        if (c < mine || (c == mine && j < i)) {{\n            at++;\n        }}\n    }}\n    mem[{o}u + at] = f32(i);\n",
                self.read(arg(0), "i")?,
                self.read(arg(0), "j")?
            ),
            Op::ExpertMatMul { tb } => {
                let (k, cols, experts) = (self.shape(arg(0))?[1], out[1], node.args.len() - 2);
                let weights: Vec<String> =
                    node.args[2..].iter().map(|w| self.at(*w).map(|a| format!("{a}u"))).collect::<Result<_, _>>()?;
                let w_index = if *tb { format!("j * {k}u + p") } else { format!("p * {cols}u + j") };
                format!(
                    "    let r = i / {cols}u;\n    let j = i % {cols}u;\n    var weights = array<u32, {experts}>({});\n    var e = 0u;\n    for (var c = 1u; c < {experts}u; c++) {{\n        if (f32(r) >= {}) {{\n            e = c;\n        }}\n    }}\n    var acc = 0.0;\n    for (var p = 0u; p < {k}u; p++) {{\n        acc += {} * mem[weights[e] + {w_index}];\n    }}\n    mem[{o}u + i] = acc;\n",
                    weights.join(", "),
                    self.read(arg(1), "c")?,
                    self.read(arg(0), &format!("r * {k}u + p"))?
                )
            }
            Op::ExpertWeightGrad { tb } => {
                let (k, cols) = (self.shape(arg(0))?[1], self.shape(arg(1))?[1]);
                let each = k * cols;
                // Element (e, a, b) of the output: expert e, x's column and dy's column.
                let (xc, dc) = if *tb {
                    (format!("j % {k}u"), format!("j / {k}u"))
                } else {
                    (format!("j / {cols}u"), format!("j % {cols}u"))
                };
                format!(
                    "    let e = i / {each}u;\n    let j = i % {each}u;\n    let xc = {xc};\n    let dc = {dc};\n    var acc = 0.0;\n    for (var r = u32({}); r < u32({}); r++) {{\n        acc += {} * {};\n    }}\n    mem[{o}u + i] = acc;\n",
                    self.read(arg(2), "e")?,
                    self.read(arg(2), "e + 1u")?,
                    self.read(arg(0), &format!("r * {k}u + xc"))?,
                    self.read(arg(1), &format!("r * {cols}u + dc"))?
                )
            }
            other => unreachable!("bug: `{}` is not routing", other.name()),
        };
        Ok(elementwise(len, &body))
    }

    /// Attention and its backward's passes, one invocation per row (a
    /// query's for the forward, the log-sum-exp and the queries' gradient; a
    /// key's for the keys' and values' gradient) walking every key (or every
    /// query of the key's heads), so the scores are never stored. The forward
    /// keeps a running maximum and sum (online softmax). Masked scores are
    /// -1e30 as in the decomposition (`score` below).
    fn attention(&self, n: NodeId, a: &Attention, pass: Option<AttentionPass>) -> Result<(String, [u32; 3]), String> {
        let node = self.g.node(n);
        let x = &node.args[node.op.attention_inputs().unwrap_or(0)..];
        let (q, k) = (self.shape(x[0])?, self.shape(x[1])?);
        let (bs, t, h, d) = (q[0], q[1], q[2], q[3]);
        let (s, g) = if a.kv_heads_first { (k[2], k[1]) } else { (k[1], k[2]) };
        let e = self.shape(x[2])?[3];
        let per = h / g;
        let o = self.at(n)?;
        // Row (b, j, g) of keys or values, feature c.
        let kv = |width: usize| {
            if a.kv_heads_first {
                format!("((b * {g}u + g) * {s}u + j) * {width}u + c")
            } else {
                format!("((b * {s}u + j) * {g}u + g) * {width}u + c")
            }
        };
        let mut seen = vec!["true".to_string()];
        if a.causal {
            seen.push("i32(j) <= p".into());
        }
        if let Some(w) = a.window {
            seen.push(format!("i32(j) > p - {w}"));
        }
        if let Some(m) = x.get(4) {
            let rows = self.shape(*m)?[1];
            let mrow = if rows == 1 { "0u".to_string() } else { "t".to_string() };
            seen.push(format!("{} != 0.0", self.read(*m, &format!("(b * {rows}u + {mrow}) * {s}u + j"))?));
        }
        let score = format!(
            "fn score(b: u32, t: u32, hh: u32, j: u32) -> f32 {{
    let g = hh / {per}u;
    let p = i32(t) + i32({offset});
    if (!({seen})) {{
        return -1e30;
    }}
    var dot = 0.0;
    for (var c = 0u; c < {d}u; c++) {{
        dot += {q_at} * {k_at};
    }}
    return dot * {scale};
}}
",
            offset = self.read(x[3], "0u")?,
            seen = seen.join(" && "),
            q_at = self.read(x[0], &format!("((b * {t}u + t) * {h}u + hh) * {d}u + c"))?,
            k_at = self.read(x[1], &kv(d))?,
            scale = lit(a.scale),
        );
        let v_at = self.read(x[2], &kv(e))?;
        let query_row = format!(
            "    let hh = i % {h}u;
    let t = (i / {h}u) % {t}u;
    let b = i / ({h}u * {t}u);
    let g = hh / {per}u;
"
        );
        let mut helpers = score;
        let (body, rows) = match pass {
            None | Some(AttentionPass::Lse | AttentionPass::ValuesAndLse) => {
                // The log-sum-exp after the values (`ValuesAndLse`), or alone.
                let lse_at = match pass {
                    Some(AttentionPass::ValuesAndLse) => format!("{}u + i", bs * t * h * e),
                    _ => "i".to_string(),
                };
                let lse_write = format!(
                    "    mem[{o}u + {lse_at}] = select(m + log(l), -1e30, m <= -1e30);
"
                );
                let (acc, update, write) = if pass != Some(AttentionPass::Lse) {
                    (
                        format!(
                            "    var acc: array<f32, {e}>;
"
                        ),
                        format!(
                            "        for (var c = 0u; c < {e}u; c++) {{
            acc[c] = acc[c] * rescale + weight * {v_at};
        }}
"
                        ),
                        format!(
                            "    for (var c = 0u; c < {e}u; c++) {{
        mem[{o}u + i * {e}u + c] = acc[c] / l;
    }}
{}",
                            if pass == Some(AttentionPass::ValuesAndLse) { lse_write.as_str() } else { "" }
                        ),
                    )
                } else {
                    (String::new(), String::new(), lse_write)
                };
                let body = format!(
                    "{query_row}    var m = -1e30;
    var l = 0.0;
{acc}    for (var j = 0u; j < {s}u; j++) {{
        let score = score(b, t, hh, j);
        let m_new = max(m, score);
        let rescale = exp(m - m_new);
        let weight = exp(score - m_new);
        l = l * rescale + weight;
{update}        m = m_new;
    }}
{write}"
                );
                (body, bs * t * h)
            }
            Some(AttentionPass::Gradients) => {
                // dP of query (b, t, hh) and key j: the adjoint's row times the value's.
                let row_at = |width: usize| format!("((b * {t}u + t) * {h}u + hh) * {width}u + c");
                let _ = write!(
                    helpers,
                    "fn adjoint_times_value(b: u32, t: u32, hh: u32, j: u32) -> f32 {{
    let g = hh / {per}u;
    var dp = 0.0;
    for (var c = 0u; c < {e}u; c++) {{
        dp += {gy} * {v_at};
    }}
    return dp;
}}
",
                    gy = self.read(node.args[0], &row_at(e))?,
                );
                // Query rows first (dQ), then key rows (dK beside dV).
                let q_rows = bs * t * h;
                let dq = format!(
                    "{query_row}    let lse = {lse};
    let delta = {delta};
    var acc: array<f32, {d}>;
    if (lse > -1e30) {{
        for (var j = 0u; j < {s}u; j++) {{
            let score = score(b, t, hh, j);
            if (score <= -1e30) {{
                continue;
            }}
            let p = exp(score - lse);
            let ds = p * (adjoint_times_value(b, t, hh, j) - delta);
            for (var c = 0u; c < {d}u; c++) {{
                acc[c] += ds * {k_at};
            }}
        }}
    }}
    for (var c = 0u; c < {d}u; c++) {{
        mem[{o}u + i * {d}u + c] = acc[c] * {scale};
    }}
",
                    lse = self.read(node.args[1], "i")?,
                    delta = self.read(node.args[2], "i")?,
                    k_at = self.read(x[1], &kv(d))?,
                    scale = lit(a.scale),
                );
                let key_row = if a.kv_heads_first {
                    format!(
                        "    let j = ki % {s}u;\n    let g = (ki / {s}u) % {g}u;\n    let b = ki / ({s}u * {g}u);\n"
                    )
                } else {
                    format!(
                        "    let g = ki % {g}u;\n    let j = (ki / {g}u) % {s}u;\n    let b = ki / ({g}u * {s}u);\n"
                    )
                };
                let dkv = format!(
                    "    let ki = i - {q_rows}u;
{key_row}    var dk: array<f32, {d}>;
    var dv: array<f32, {e}>;
    for (var hh = g * {per}u; hh < (g + 1u) * {per}u; hh++) {{
        for (var t = 0u; t < {t}u; t++) {{
            let row = (b * {t}u + t) * {h}u + hh;
            let lse = {lse};
            if (lse <= -1e30) {{
                // Every key masked: the row's adjoint spreads evenly over the values.
                for (var c = 0u; c < {e}u; c++) {{
                    dv[c] += {gy} / {s}.0;
                }}
                continue;
            }}
            let score = score(b, t, hh, j);
            if (score <= -1e30) {{
                continue;
            }}
            let p = exp(score - lse);
            let ds = p * (adjoint_times_value(b, t, hh, j) - {delta}) * {scale};
            for (var c = 0u; c < {d}u; c++) {{
                dk[c] += ds * {q_at};
            }}
            for (var c = 0u; c < {e}u; c++) {{
                dv[c] += p * {gy};
            }}
        }}
    }}
    let out = {o}u + {nq}u + ki * {w}u;
    for (var c = 0u; c < {d}u; c++) {{
        mem[out + c] = dk[c];
    }}
    for (var c = 0u; c < {e}u; c++) {{
        mem[out + {d}u + c] = dv[c];
    }}
",
                    lse = self.read(node.args[1], "row")?,
                    delta = self.read(node.args[2], "row")?,
                    gy = self.read(node.args[0], &row_at(e))?,
                    q_at = self.read(x[0], &row_at(d))?,
                    scale = lit(a.scale),
                    nq = q_rows * d,
                    w = d + e,
                );
                let indent = |text: &str| text.lines().map(|l| format!("    {l}\n")).collect::<String>();
                let body =
                    format!("    if (i < {q_rows}u) {{\n{}    }} else {{\n{}    }}\n", indent(&dq), indent(&dkv));
                (body, q_rows + bs * s * g)
            }
        };
        let (source, groups) = elementwise(rows, &body);
        Ok((source.replacen("fn flag", &format!("{helpers}fn flag"), 1), groups))
    }

    /// Output element i read from `base + sum(idx[d] * eff[d])`.
    fn strided(&self, n: NodeId, src: NodeId, base: usize, eff: &[usize]) -> Result<(String, [u32; 3]), String> {
        let shape = self.shape(n)?;
        let s = strides(&shape);
        let mut terms = vec![format!("{base}u")];
        for d in 0..shape.len() {
            if eff[d] != 0 && shape[d] > 1 {
                terms.push(format!("((i / {}u) % {}u) * {}u", s[d], shape[d], eff[d]));
            }
        }
        let body = format!("    mem[{}u + i] = {};\n", self.at(n)?, self.read(src, &terms.join(" + "))?);
        Ok(elementwise(shape.iter().product(), &body))
    }

    fn reduce(&self, n: NodeId, r: Reduce, axes: &[usize]) -> Result<(String, [u32; 3]), String> {
        let src = self.g.node(n).args[0];
        let shape = self.shape(src)?;
        let s = strides(&shape);
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
        let ks = strides(&kept.iter().map(|d| shape[*d]).collect::<Vec<_>>());
        let mut base = vec!["0u".to_string()];
        for (k, d) in kept.iter().enumerate() {
            base.push(format!("((i / {}u) % {}u) * {}u", ks[k], shape[*d], s[*d]));
        }
        let count: usize = axes.iter().map(|a| shape[*a]).product();
        let rs = strides(&axes.iter().map(|a| shape[*a]).collect::<Vec<_>>());
        let mut offset = vec!["0u".to_string()];
        for (k, a) in axes.iter().enumerate() {
            offset.push(format!("((j / {}u) % {}u) * {}u", rs[k], shape[*a], s[*a]));
        }
        let (init, combine) = fold(r);
        let body = format!(
            "    let base = {};\n    var acc = {init};\n    for (var j = 0u; j < {count}u; j++) {{\n        let v = {};\n        acc = {combine};\n    }}\n    mem[{}u + i] = acc;\n",
            base.join(" + "),
            self.read(src, &format!("base + {}", offset.join(" + ")))?,
            self.at(n)?
        );
        Ok(elementwise(self.plan.lens[n.index()], &body))
    }

    /// Batched `op(A) @ op(B)`: a 16 x 16 workgroup computes a 64 x 64 tile
    /// of C, each invocation a 4 x 4 block of it in registers (rows and
    /// columns 16 apart, so that neighbours read neighbouring memory), with
    /// 64 x 16 slices of A and 16 x 64 slices of B staged in workgroup memory.
    fn matmul(&self, n: NodeId, ta: bool, tb: bool) -> Result<(String, [u32; 3]), String> {
        let node = self.g.node(n);
        let (sa, sb) = (self.shape(node.args[0])?, self.shape(node.args[1])?);
        let r = sa.len();
        let (rows, cols) = (if ta { sa[r - 1] } else { sa[r - 2] }, if tb { sb[r - 2] } else { sb[r - 1] });
        let k = if ta { sa[r - 2] } else { sa[r - 1] };
        let batch: usize = sa[..r - 2].iter().product();
        let (a_rs, a_cs) = if ta { (1, rows) } else { (k, 1) };
        let (b_rs, b_cs) = if tb { (1, k) } else { (cols, 1) };
        let (a, b, c) = (self.at(node.args[0])?, self.at(node.args[1])?, self.at(n)?);
        let (t, big) = (TILE, TILE * BLOCK);
        let source = format!(
            "{PRELUDE}
var<workgroup> tile_a: array<f32, {tiles}>;
var<workgroup> tile_b: array<f32, {tiles}>;

@compute @workgroup_size({t}, {t})
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {{
    let me = local.y * {t}u + local.x;
    let row0 = group.y * {big}u;
    let col0 = group.x * {big}u;
    let a0 = {a}u + group.z * {ab}u;
    let b0 = {b}u + group.z * {bb}u;
    var acc: array<f32, {blocks}>;
    for (var k0 = 0u; k0 < {k}u; k0 += {t}u) {{
        for (var l = 0u; l < {per}u; l++) {{
            let e = me + l * {threads}u;
            let ra = row0 + e / {t}u;
            let ka = k0 + e % {t}u;
            var x = 0.0;
            if (ra < {rows}u && ka < {k}u) {{
                x = mem[a0 + ra * {a_rs}u + ka * {a_cs}u];
            }}
            tile_a[e] = x;
            let kb = k0 + e / {big}u;
            let cb = col0 + e % {big}u;
            var y = 0.0;
            if (kb < {k}u && cb < {cols}u) {{
                y = mem[b0 + kb * {b_rs}u + cb * {b_cs}u];
            }}
            tile_b[e] = y;
        }}
        workgroupBarrier();
        for (var kk = 0u; kk < {t}u; kk++) {{
            var x: array<f32, {BLOCK}>;
            var y: array<f32, {BLOCK}>;
            for (var i = 0u; i < {BLOCK}u; i++) {{
                x[i] = tile_a[(local.y + i * {t}u) * {t}u + kk];
                y[i] = tile_b[kk * {big}u + local.x + i * {t}u];
            }}
            for (var i = 0u; i < {BLOCK}u; i++) {{
                for (var j = 0u; j < {BLOCK}u; j++) {{
                    acc[i * {BLOCK}u + j] += x[i] * y[j];
                }}
            }}
        }}
        workgroupBarrier();
    }}
    for (var i = 0u; i < {BLOCK}u; i++) {{
        for (var j = 0u; j < {BLOCK}u; j++) {{
            let row = row0 + local.y + i * {t}u;
            let col = col0 + local.x + j * {t}u;
            if (row < {rows}u && col < {cols}u) {{
                mem[{c}u + group.z * {cb}u + row * {cols}u + col] = acc[i * {BLOCK}u + j];
            }}
        }}
    }}
}}
",
            tiles = big * t,
            blocks = BLOCK * BLOCK,
            threads = t * t,
            per = big * t / (t * t),
            ab = rows * k,
            bb = k * cols,
            cb = rows * cols,
        );
        Ok((source, [cols.div_ceil(big) as u32, rows.div_ceil(big) as u32, batch.max(1) as u32]))
    }
}

/// The longest row `topk` copies to sort in torch's order (`topk.wgsl`:
/// 8 KB of workgroup memory, and introsort's stack of 64 holds its parts);
/// longer rows are selected with ties lowest index first.
const TOPK_ROW: usize = 1024;

/// splitmix64 on (low, high) u32 pairs, as `ir::interp::uniform` computes it.
const SPLITMIX: &str = "fn mul32(a: u32, b: u32) -> vec2<u32> {
    // The full 64-bit product of two u32, from 16-bit halves.
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let lo = a0 * b0;
    let m1 = a1 * b0;
    let m2 = a0 * b1;
    let hi = a1 * b1;
    let mid = (lo >> 16u) + (m1 & 0xffffu) + (m2 & 0xffffu);
    let low = (lo & 0xffffu) | (mid << 16u);
    let high = hi + (m1 >> 16u) + (m2 >> 16u) + (mid >> 16u);
    return vec2<u32>(low, high);
}

fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let p = mul32(a.x, b.x);
    return vec2<u32>(p.x, p.y + a.x * b.y + a.y * b.x);
}

fn shr64(a: vec2<u32>, s: u32) -> vec2<u32> {
    return vec2<u32>((a.x >> s) | (a.y << (32u - s)), a.y >> s);
}

fn splitmix(key: vec2<u32>, step: vec2<u32>, index: vec2<u32>) -> vec2<u32> {
    var z = mul64(key, vec2<u32>(0x7f4a7c15u, 0x9e3779b9u)) ^ mul64(step, vec2<u32>(0x1ce4e5b9u, 0xbf58476du)) ^ index;
    z = mul64(z ^ shr64(z, 30u), vec2<u32>(0x1ce4e5b9u, 0xbf58476du));
    z = mul64(z ^ shr64(z, 27u), vec2<u32>(0x133111ebu, 0x94d049bbu));
    z = z ^ shr64(z, 31u);
    return shr64(z, 11u);
}
";

/// Parses and validates a shader with naga; the error names the kernel.
pub fn validate(shader: &Shader) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(&shader.source)
        .map_err(|e| format!("{}: WGSL does not parse: {}", shader.label, e.emit_to_string(&shader.source)))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("{}: WGSL does not validate: {}", shader.label, e.emit_to_string(&shader.source)))?;
    Ok(())
}
