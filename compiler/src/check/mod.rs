//! The checker: from loaded files to a fully elaborated, shape-checked model.
//!
//! [`check`] evaluates the model's hyperparameters (defaults, then
//! `config.json`, then `--set`), instantiates every layer with named weights,
//! applies `adapt`, and walks `forward` (and the `train` loss) to infer and
//! check every tensor shape.

mod calls;
mod elaborate;
pub use elaborate::MAX_ELEMENTS;
mod forward;
pub mod hf;
pub mod ids;
pub mod load;
pub mod prims;
pub mod report;
mod statics;
pub mod value;

pub use elaborate::{FieldInst, InstId, Instance, ParamInfo};
pub use load::{Program, STDLIB, load_file, load_source};

use crate::diag::{Diagnostic, suggest};
use crate::source::Span;
use crate::syntax::ast::*;
use crate::types::Dim;
use crate::types::TensorTy;
use elaborate::{Checker, Env, Fallible};
use forward::{Frame, Ty};
use std::collections::HashMap;
use value::{DefRef, LayerValue, Value};

/// Where hyperparameters come from besides the spec.
#[derive(Default)]
pub struct Options {
    /// A parsed `config.json` and the name to use in messages.
    pub config: Option<(serde_json::Value, String)>,
    /// `--set key=value` pairs, applied last.
    pub sets: Vec<(String, String)>,
}

/// A checked model: everything later stages need, with no spec left to read.
#[derive(Debug)]
pub struct Checked {
    pub model: String,
    pub hparams: Vec<(String, Value)>,
    pub inputs: Vec<Signature>,
    pub outputs: Vec<Signature>,
    pub params: Vec<ParamInfo>,
    pub instances: Vec<Instance>,
    pub root: InstId,
    /// `target` declarations of the train block.
    pub targets: Vec<Signature>,
    /// The train block's loss, if any, checked to be a scalar.
    pub has_loss: bool,
    pub train: Vec<(String, Value)>,
    pub infer: Vec<(String, Value)>,
}

/// A named tensor at the model's boundary.
#[derive(Clone, Debug)]
pub struct Signature {
    pub name: String,
    pub ty: TensorTy,
    pub optional: bool,
}

impl Checked {
    pub fn total_params(&self) -> i64 {
        self.params.iter().filter(|p| !p.buffer).map(ParamInfo::count).fold(0, i64::saturating_add)
    }

    pub fn trainable_params(&self) -> i64 {
        self.params.iter().filter(|p| p.trainable).map(ParamInfo::count).fold(0, i64::saturating_add)
    }
}

/// Settings a `train { }` block understands.
pub const TRAIN_KEYS: &[&str] = &[
    "loss",
    "optimizer",
    "lr",
    "weight_decay",
    "betas",
    "momentum",
    "warmup",
    "schedule",
    "min_lr",
    "steps",
    "epochs",
    "batch",
    "seq_len",
    "clip",
    "grad_accum",
    "eval_split",
    "eval_every",
    "seed",
    "checkpoint_every",
    "masking",
    "precision",
];
/// Settings an `infer { }` block understands.
pub const INFER_KEYS: &[&str] =
    &["max_new_tokens", "temperature", "top_k", "top_p", "seed", "start", "stop", "context"];

/// Checks the spec's model (the last `model` of the entry file).
pub fn check(p: &Program, opts: &Options) -> Result<Checked, Vec<Diagnostic>> {
    let Some(entry) = p.entry_model() else {
        let file = p.modules[p.entry].file;
        let d = Diagnostic::new("E0107", format!("{} defines no model", p.sources.file(file).name))
            .help("a spec needs a `model Name(...) { ... }` (or `model Name = adapt ...`) to check; layers alone are checked when a model uses them");
        return Err(vec![d]);
    };
    check_model(p, entry, opts)
}

/// Checks one model definition (or adapted model) of the program.
pub fn check_model(p: &Program, entry: DefRef, opts: &Options) -> Result<Checked, Vec<Diagnostic>> {
    check_and_lower(p, entry, opts, None).map(|(c, _)| c)
}

/// How to lower a checked model to IR.
#[derive(Clone, Debug, Default)]
pub struct LowerOptions {
    /// Emit dropout and the `loss` output of the train block.
    pub training: bool,
    /// Optional model inputs the caller leaves out: they are `none` in the
    /// forward, as if the model were called without them.
    pub absent: Vec<String>,
    /// Lower for incremental decoding with a key/value cache of this many
    /// positions (see `ir::lower::Cache`).
    pub cache: Option<usize>,
    /// The input whose second axis is the cached sequence (an
    /// encoder-decoder's target); the first input of rank 2 or more if none.
    pub cache_input: Option<String>,
    /// Also output every layer call's result as `trace:PATH (Layer)`, in
    /// the order the calls finish (to find where values go wrong).
    pub trace: bool,
    /// Lower `route` densely, every expert over every token (the
    /// definition, for checking the sparse lowering; see `ir::experts`).
    pub dense_routes: bool,
}

/// Checks the spec's model and lowers its forward (and, when training, its
/// loss) to the tensor IR in the same walk.
pub fn lower(
    p: &Program,
    opts: &Options,
    how: LowerOptions,
) -> Result<(Checked, crate::ir::graph::Graph), Vec<Diagnostic>> {
    let Some(entry) = p.entry_model() else {
        return check(p, opts).map(|_| unreachable!("check fails without a model"));
    };
    let (checked, g) = check_and_lower(p, entry, opts, Some(how))?;
    let g = g.expect("lowered");
    crate::ir::verify::after("lowering", &g);
    Ok((checked, g))
}

/// A Hugging Face `config.json` holding the checked model's hyperparameters
/// (see `hf::to_config`); `None` when the model has no `from hf(...)`.
pub fn hf_config(p: &Program, checked: &Checked, base: Option<&serde_json::Value>) -> Option<serde_json::Value> {
    let entry = p.entry_model()?;
    let def = match p.item(entry) {
        Item::Def(d) => d,
        Item::Adapt(a) => match p.scopes[entry.module].get(&a.base.text).map(|r| p.item(*r)) {
            Some(Item::Def(d)) => d,
            _ => return None,
        },
        Item::Import(_) => return None,
    };
    if def.hf.is_empty() {
        return None;
    }
    Some(hf::to_config(def, &checked.hparams, base))
}

fn check_and_lower(
    p: &Program,
    entry: DefRef,
    opts: &Options,
    how: Option<LowerOptions>,
) -> Result<(Checked, Option<crate::ir::graph::Graph>), Vec<Diagnostic>> {
    let mut c = Checker::new(p);
    let absent = how.as_ref().map(|h| h.absent.clone()).unwrap_or_default();
    c.lower = how.map(|h| crate::ir::lower::Lowering {
        trace: h.trace,
        dense_routes: h.dense_routes,
        ..crate::ir::lower::Lowering::new(h.training, h.cache, h.cache_input)
    });
    let result = run(&mut c, entry, opts, &absent);
    match result {
        Ok(checked) if c.diags.is_empty() => Ok((checked, c.lower.take().map(|l| l.g))),
        _ => {
            if c.diags.is_empty() {
                c.diags.push(Diagnostic::new("E0999", "the model could not be checked"));
            }
            Err(c.diags)
        }
    }
}

fn run(c: &mut Checker, entry: DefRef, opts: &Options, absent: &[String]) -> Fallible<Checked> {
    let (model_ref, adapt) = match p_item(c, entry) {
        Item::Adapt(a) => {
            let Some(base) = c.p.scopes[entry.module].get(&a.base.text).copied() else {
                let env = Env::new();
                c.unknown_name(entry.module, &env, &a.base.text, a.base.span, &[]);
                return Err(());
            };
            match p_item(c, base) {
                Item::Def(d) if d.kind == DefKind::Model => (base, Some(a)),
                _ => {
                    c.error(
                        Diagnostic::at("E0402", a.base.span, format!("`{}` is not a model", a.base.text))
                            .help("`adapt` applies to a `model` definition"),
                    );
                    return Err(());
                }
            }
        }
        Item::Def(_) => (entry, None),
        Item::Import(_) => unreachable!("entry is a model"),
    };
    let def = c.p.def(model_ref);
    let mut named: Vec<(String, Value)> = Vec::new();
    if let Some((config, name)) = &opts.config {
        match hf::from_config(def, config, name) {
            Ok(values) => named.extend(values),
            Err(ds) => {
                c.diags.extend(ds);
                return Err(());
            }
        }
    }
    for (k, v) in &opts.sets {
        match hf::from_set(def, k, v) {
            Ok(kv) => {
                named.retain(|(n, _)| *n != kv.0);
                named.push(kv);
            }
            Err(d) => {
                c.error(d);
                return Err(());
            }
        }
    }
    let env = c.bind_hparams(def, model_ref.module, &[], &named, def.name.span)?;
    let hparams: Vec<(String, Value)> =
        def.hparams.iter().map(|h| (h.name.text.clone(), env[&h.name.text].clone())).collect();
    let root = c.instantiate_def(model_ref, def, env, String::new(), &[], adapt.is_none())?;
    if let Some(a) = adapt {
        apply_adapter(c, entry.module, a, root)?;
    }
    let fwd = def.members.iter().find_map(|m| if let Member::Forward(f) = m { Some(f) } else { None });
    let Some(fwd) = fwd else {
        c.error(
            Diagnostic::at("E0201", def.name.span, format!("model `{}` has no `forward`", def.name.text)).help(
                "declare its inputs and outputs: `forward(input_ids: [B, T] int) -> logits: [B, T, vocab] = ...`",
            ),
        );
        return Err(());
    };
    let mut frame = Frame { inst: root, locals: HashMap::new(), dims: HashMap::new() };
    let mut inputs = Vec::new();
    for input in &fwd.inputs {
        let ty = boundary_type(c, &mut frame, &input.ty)?;
        if input.optional && absent.contains(&input.name.text) {
            frame.locals.insert(input.name.text.clone(), Ty::Value(Value::None));
        } else {
            let node = c.lower.as_mut().map(|l| l.model_input(&input.name.text, ty.clone()));
            frame.locals.insert(input.name.text.clone(), Ty::tensor(ty.clone(), node));
        }
        inputs.push(Signature { name: input.name.text.clone(), ty, optional: input.optional });
    }
    let mut rest = None;
    let result = c.forward_body(&mut frame, fwd, &mut rest);
    let results = match result {
        Ty::Error => return Err(()),
        Ty::Tuple(items) => items,
        one => vec![one],
    };
    let mut outputs = Vec::new();
    for (i, (out, t)) in fwd.outputs.iter().zip(results).enumerate() {
        let Ty::Tensor(ty) = t else { return Err(()) };
        let name = out
            .name
            .as_ref()
            .map(|n| n.text.clone())
            .unwrap_or_else(|| if fwd.outputs.len() == 1 { "output".into() } else { format!("output_{i}") });
        if let (Some(l), Some(node)) = (c.lower.as_mut(), ty.node) {
            l.g.outputs.push((name.clone(), node));
        }
        outputs.push(Signature { name, ty: ty.ty, optional: false });
    }
    let mut checked = Checked {
        model: c.p.item_name(entry).to_string(),
        hparams,
        inputs,
        outputs,
        params: Vec::new(),
        instances: Vec::new(),
        root,
        targets: Vec::new(),
        has_loss: false,
        train: Vec::new(),
        infer: Vec::new(),
    };
    for member in &def.members {
        match member {
            Member::Train(b) => train_block(c, model_ref.module, b, &mut frame, &mut checked)?,
            Member::Infer(b) => checked.infer = settings(c, model_ref.module, root, b, INFER_KEYS, "infer")?,
            _ => {}
        }
    }
    checked.params = std::mem::take(&mut c.params);
    checked.instances = std::mem::take(&mut c.instances);
    Ok(checked)
}

fn p_item<'p>(c: &Checker<'p>, r: DefRef) -> &'p Item {
    c.p.item(r)
}

/// The type of a model input or target: names not known as hyperparameters
/// become symbolic sizes.
fn boundary_type(c: &mut Checker, frame: &mut Frame, decl: &TensorType) -> Fallible<TensorTy> {
    let m = c.instances[frame.inst].def.module;
    let module = c.module(m);
    let mut dims = Vec::new();
    for d in &decl.dims {
        let DimAst::Expr(e) = d else {
            c.error(
                Diagnostic::at("E0301", decl.span, "a model's inputs cannot use `...`")
                    .help("name each axis, e.g. `[B, T]`"),
            );
            return Err(());
        };
        if let ExprKind::Name(n) = &module.expr(*e).kind
            && !c.instances[frame.inst].env.contains_key(n)
        {
            let dim = frame.dims.entry(n.clone()).or_insert_with(|| Dim::symbol(n)).clone();
            dims.push(dim);
            continue;
        }
        let mut env = c.instances[frame.inst].env.clone();
        env.extend(frame.dims.iter().map(|(k, v)| (k.clone(), Value::from_dim(v.clone()))));
        match c.eval_static(m, &env, *e, false)? {
            v if v.as_dim().is_some() => dims.push(v.as_dim().expect("checked")),
            other => {
                c.error(Diagnostic::at(
                    "E0201",
                    module.expr(*e).span,
                    format!("a size is expected, found {} `{other}`", other.kind()),
                ));
                return Err(());
            }
        }
    }
    Ok(TensorTy::new(decl.dtype.unwrap_or(DType::F32), dims))
}

fn train_block(c: &mut Checker, m: usize, b: &Block, frame: &mut Frame, checked: &mut Checked) -> Fallible<()> {
    for (out, sig) in checked.outputs.iter().enumerate().map(|(i, s)| (i, s.clone())) {
        let _ = out;
        let node = c.lower.as_ref().and_then(|l| l.g.output(&sig.name));
        frame.locals.insert(sig.name.clone(), Ty::tensor(sig.ty.clone(), node));
    }
    for s in &b.settings {
        if let Setting::Target { name, ty } = s {
            let t = boundary_type(c, frame, ty)?;
            let node = c.lower.as_mut().map(|l| l.g.input(&name.text, t.clone()));
            frame.locals.insert(name.text.clone(), Ty::tensor(t.clone(), node));
            checked.targets.push(Signature { name: name.text.clone(), ty: t, optional: false });
        }
    }
    for s in &b.settings {
        if let Setting::Value { name, value } = s
            && name.text == "loss"
        {
            match c.eval(frame, *value) {
                Ty::Tensor(t) if t.rank() == 0 && t.dtype == DType::F32 => {
                    checked.has_loss = true;
                    if let (Some(l), Some(node)) = (c.lower.as_mut(), t.node) {
                        // Losses added with `add_loss` (MoE load balancing) join the main one.
                        let mut total = node;
                        let mut aux_total = None;
                        for (aux, weight) in std::mem::take(&mut l.aux_losses) {
                            if weight != 0.0 {
                                let scaled = l.g.scale(aux, weight);
                                total = l.g.add(total, scaled);
                                aux_total = Some(aux_total.map_or(scaled, |a| l.g.add(a, scaled)));
                            }
                        }
                        l.g.outputs.push(("loss".into(), total));
                        if let Some(aux) = aux_total {
                            let name = crate::ir::signature::Role::Metric("aux_loss").name();
                            l.g.outputs.push((name, aux));
                        }
                    }
                }
                Ty::Error => return Err(()),
                other => {
                    let span = c.module(m).expr(*value).span;
                    c.error(
                        Diagnostic::at(
                            "E0601",
                            span,
                            format!("the loss must be a float scalar, found {}", other.describe()),
                        )
                        .help("reduce it with `mean(...)` or use `cross_entropy(logits, targets)`"),
                    );
                    return Err(());
                }
            }
        }
    }
    checked.train = settings(c, m, frame.inst, b, TRAIN_KEYS, "train")?;
    Ok(())
}

fn settings(
    c: &mut Checker,
    m: usize,
    root: InstId,
    b: &Block,
    keys: &[&str],
    block: &str,
) -> Fallible<Vec<(String, Value)>> {
    let env = c.instances[root].env.clone();
    let mut out = Vec::new();
    let mut seen: HashMap<&str, Span> = HashMap::new();
    let mut ok = true;
    for s in &b.settings {
        let Setting::Value { name, value } = s else {
            continue;
        };
        if let Some(first) = seen.insert(&name.text, name.span) {
            c.error(
                Diagnostic::at("E0602", name.span, format!("`{}` is set twice", name.text))
                    .label(first, "first set here"),
            );
            ok = false;
            continue;
        }
        if !keys.contains(&name.text.as_str()) {
            let d = Diagnostic::at("E0602", name.span, format!("`{block}` has no setting `{}`", name.text));
            let d = d.help(
                suggest(&name.text, keys.iter().copied())
                    .unwrap_or_else(|| format!("the settings are: {}", keys.join(", "))),
            );
            c.error(d);
            ok = false;
            continue;
        }
        if name.text == "loss" {
            continue;
        }
        match c.eval_static(m, &env, *value, true) {
            Ok(v) => out.push((name.text.clone(), v)),
            Err(()) => ok = false,
        }
    }
    if ok { Ok(out) } else { Err(()) }
}

/// Wraps every sublayer named in `on ...` with the adapter layer. The
/// wrapped layer keeps its weight names and is frozen; the adapter's own
/// weights sit under the same path (`q_proj.lora_A.weight`).
fn apply_adapter(c: &mut Checker, m: usize, a: &Adapt, root: InstId) -> Fallible<()> {
    let Some(adapter) = c.p.scopes[m].get(&a.adapter.text).copied() else {
        let env = Env::new();
        c.unknown_name(m, &env, &a.adapter.text, a.adapter.span, &[]);
        return Err(());
    };
    let adapter_def = match c.p.item(adapter) {
        Item::Def(d) if d.kind == DefKind::Layer => d,
        _ => {
            c.error(Diagnostic::at("E0402", a.adapter.span, format!("`{}` is not a layer", a.adapter.text)));
            return Err(());
        }
    };
    let env = Env::new();
    let mut positional = Vec::new();
    let mut named = Vec::new();
    for arg in &a.args {
        let v = c.eval_static(m, &env, arg.value, false)?;
        match &arg.name {
            Some(n) => named.push((n.text.clone(), v)),
            None => positional.push(v),
        }
    }
    let mut all_fields: Vec<String> = Vec::new();
    let mut ok = true;
    for target in &a.targets {
        let mut hits = Vec::new();
        let reachable = reachable_from(c, root);
        for &inst in &reachable {
            for (fi, (name, f)) in c.instances[inst].fields.iter().enumerate() {
                all_fields.push(name.clone());
                if *name == target.text
                    && let FieldInst::Sub(t) = f
                {
                    hits.push((inst, fi, *t));
                }
            }
        }
        if hits.is_empty() {
            all_fields.sort();
            all_fields.dedup();
            let base = &a.base.text;
            let d =
                Diagnostic::at("E0401", target.span, format!("`{base}` has no layer named `{}` to adapt", target.text));
            let d = d.help(
                suggest(&target.text, all_fields.iter().map(String::as_str))
                    .unwrap_or_else(|| "adapters wrap sublayers by field name, e.g. `on q_proj, v_proj`".into()),
            );
            c.error(d);
            ok = false;
            continue;
        }
        for (owner, fi, target_inst) in hits {
            let mut args = named.clone();
            args.push(("base".into(), Value::Instance(target_inst)));
            // Sizes such as `in` and `out` come from the wrapped layer.
            for h in &adapter_def.hparams {
                let given = args.iter().any(|(k, _)| *k == h.name.text)
                    || positional.len()
                        > adapter_def.hparams.iter().position(|x| x.name.text == h.name.text).unwrap_or(usize::MAX);
                if !given && let Some(v) = c.instances[target_inst].env.get(&h.name.text) {
                    args.push((h.name.text.clone(), v.clone()));
                }
            }
            let lv = LayerValue {
                def: adapter,
                span: a.span,
                name: a.adapter.text.clone(),
                positional: positional.clone(),
                named: args,
                renames: Vec::new(),
            };
            let path = c.instances[target_inst].path.clone();
            let wrapped = c.instantiate(&lv, path, true)?;
            c.instances[owner].fields[fi].1 = FieldInst::Sub(wrapped);
        }
    }
    if ok { Ok(()) } else { Err(()) }
}

fn reachable_from(c: &Checker, root: InstId) -> Vec<InstId> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        for (_, f) in &c.instances[out[i]].fields {
            match f {
                FieldInst::Sub(s) => out.push(*s),
                FieldInst::Stack(ids) => out.extend(ids),
                _ => {}
            }
        }
        i += 1;
    }
    out
}
