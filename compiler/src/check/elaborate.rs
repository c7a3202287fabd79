//! Elaboration: turn a model definition with concrete hyperparameters into a
//! tree of layer instances with named, shaped parameters. Also the static
//! evaluator for hyperparameter expressions.

use super::load::Program;
use super::value::{DefRef, Init, LayerValue, Value};
use crate::diag::{Diagnostic, suggest};
use crate::source::Span;
use crate::syntax::ast::*;
use std::collections::HashMap;
use std::rc::Rc;

pub use super::ids::{InstId, ParamId};

/// Values visible to a layer's declarations: hyperparameters and lets.
pub type Env = HashMap<String, Value>;

/// One occurrence of a layer in the model tree.
#[derive(Debug)]
pub struct Instance {
    pub def: DefRef,
    /// Dotted prefix of its weights (`model.layers.0.self_attn`), empty at the root.
    pub path: String,
    pub env: Env,
    pub fields: Vec<(String, FieldInst)>,
}

#[derive(Debug, Clone)]
pub enum FieldInst {
    Param(ParamId),
    Sub(InstId),
    Stack(Vec<InstId>),
    /// An optional field whose condition is false.
    Absent,
}

/// A weight of the model, named as in the checkpoint.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: DType,
    pub init: Init,
    pub trainable: bool,
    pub buffer: bool,
    pub span: Span,
}

impl ParamInfo {
    /// At most [`MAX_ELEMENTS`]: the checker refuses larger parameters.
    pub fn count(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// The most layer instances a model may have: checking costs time and
/// memory for each (a few KiB), and real models have hundreds.
pub const MAX_INSTANCES: usize = 100_000;

/// The most elements a parameter may have (2^48, a petabyte of f32): far
/// beyond any machine, and small enough that sizes and byte counts of
/// parameters never overflow 64 bits.
pub const MAX_ELEMENTS: i64 = 1 << 48;

pub struct Checker<'p> {
    pub p: &'p Program,
    pub instances: Vec<Instance>,
    pub params: Vec<ParamInfo>,
    pub diags: Vec<Diagnostic>,
    pub depth: usize,
    /// Where the layer being elaborated or walked was created or called, so
    /// an error inside a library layer also points at the user's line.
    pub context: Vec<(Span, String)>,
    /// When set, the walk through `forward` also emits IR.
    pub lower: Option<crate::ir::lower::Lowering>,
}

/// Deepest nesting of layers (and of forward calls) before we call it recursion.
pub const MAX_DEPTH: usize = 48;

/// Names that evaluate to initialisers in declarations.
pub const INITS: &[&str] = &["zeros", "ones", "normal", "uniform", "fan_in", "constant"];
/// Functions on numbers usable in hyperparameter expressions, besides the
/// unary math primitives (`sqrt`, `log`, ...), which fold numbers too.
pub const STATIC_FUNCTIONS: &[&str] = &["min", "max", "float", "int", "floor", "ceil", "round"];

pub fn is_static_function(name: &str) -> bool {
    STATIC_FUNCTIONS.contains(&name) || crate::scalar::Unary::primitive(name).is_some()
}

/// `Err(())` means a diagnostic has been recorded.
pub type Fallible<T> = Result<T, ()>;

impl<'p> Checker<'p> {
    pub fn new(p: &'p Program) -> Checker<'p> {
        Checker {
            p,
            instances: Vec::new(),
            params: Vec::new(),
            diags: Vec::new(),
            depth: 0,
            context: Vec::new(),
            lower: None,
        }
    }

    pub fn error(&mut self, mut d: Diagnostic) {
        if let Some(primary) = d.primary() {
            // The innermost site in another file, and the outermost one.
            let inner = self.context.iter().rev().find(|(s, _)| s.file != primary.file);
            let outer = self.context.first().filter(|(s, _)| s.file != primary.file);
            for (span, label) in inner.into_iter().chain(outer).cloned().collect::<Vec<_>>() {
                if !d.labels.iter().any(|l| l.span == span) {
                    d = d.label(span, label);
                }
            }
        }
        self.diags.push(d);
    }

    pub fn module(&self, m: usize) -> &'p Module {
        &self.p.modules[m]
    }

    pub fn layer_value(&self, def: DefRef, positional: Vec<Value>, named: Vec<(String, Value)>, span: Span) -> Value {
        let name = self.p.item_name(def).to_string();
        Value::Layer(Rc::new(LayerValue { def, name, positional, named, span, renames: Vec::new() }))
    }

    /// Reports an unknown name with the closest known one.
    pub fn unknown_name(&mut self, m: usize, env: &Env, name: &str, span: Span, extra: &[&str]) {
        let mut candidates: Vec<&str> = env.keys().map(String::as_str).collect();
        candidates.extend(self.p.scopes[m].keys().map(String::as_str));
        candidates.extend(extra.iter().copied());
        let mut d = Diagnostic::at("E0104", span, format!("unknown name `{name}`"));
        match suggest(name, candidates.iter().copied()) {
            Some(s) => d = d.help(s),
            None if name.chars().next().is_some_and(char::is_uppercase) => {
                d = d.help(format!(
                    "if `{name}` is a layer from the standard library, import it (e.g. `import std.core`)"
                ));
            }
            None => {}
        }
        self.error(d);
    }

    /// Creates an instance of a layer value at `path`, with its parameters.
    pub fn instantiate(&mut self, lv: &LayerValue, path: String, trainable: bool) -> Fallible<InstId> {
        self.context.push((lv.span, format!("in the `{}` created here", lv.name)));
        let result = self.instantiate_inner(lv, path, trainable);
        self.context.pop();
        result
    }

    fn instantiate_inner(&mut self, lv: &LayerValue, path: String, trainable: bool) -> Fallible<InstId> {
        if self.instances.len() >= MAX_INSTANCES {
            self.error(
                Diagnostic::at(
                    "E0208",
                    lv.span,
                    format!("the model has more than {MAX_INSTANCES} layers, at `{path}`"),
                )
                .help("a `repeat` count is probably far too large"),
            );
            return Err(());
        }
        if self.depth >= MAX_DEPTH {
            self.error(
                Diagnostic::at("E0208", lv.span, format!("layers nest more than {MAX_DEPTH} deep at `{path}`"))
                    .help("a layer probably contains itself"),
            );
            return Err(());
        }
        let Item::Def(def) = self.p.item(lv.def) else {
            self.error(Diagnostic::at("E0201", lv.span, format!("`{}` is an adapted model, not a layer", lv.name)));
            return Err(());
        };
        let env = self.bind_hparams(def, lv.def.module, &lv.positional, &lv.named, lv.span)?;
        self.depth += 1;
        let result = self.instantiate_def(lv.def, def, env, path, &lv.renames, trainable);
        self.depth -= 1;
        result
    }

    /// Type-checks hyperparameter arguments against a definition, filling defaults.
    pub fn bind_hparams(
        &mut self,
        def: &Def,
        m: usize,
        positional: &[Value],
        named: &[(String, Value)],
        span: Span,
    ) -> Fallible<Env> {
        let mut env = Env::new();
        if positional.len() > def.hparams.len() {
            let d = Diagnostic::at(
                "E0202",
                span,
                format!(
                    "`{}` takes {} hyperparameters but {} were given",
                    def.name.text,
                    def.hparams.len(),
                    positional.len()
                ),
            )
            .label(def.name.span, format!("`{}` is defined here", def.name.text))
            .help(format!("the hyperparameters are: {}", hparam_list(def)));
            self.error(d);
            return Err(());
        }
        let mut ok = true;
        for (k, _) in named {
            let Some(i) = def.hparams.iter().position(|h| h.name.text == *k) else {
                let mut d = Diagnostic::at("E0203", span, format!("`{}` has no hyperparameter `{k}`", def.name.text))
                    .label(def.name.span, format!("`{}` is defined here", def.name.text));
                d = d.help(
                    suggest(k, def.hparams.iter().map(|h| h.name.text.as_str()))
                        .unwrap_or_else(|| format!("the hyperparameters are: {}", hparam_list(def))),
                );
                self.error(d);
                ok = false;
                continue;
            };
            if i < positional.len() {
                self.error(Diagnostic::at("E0202", span, format!("`{k}` is given both by position and by name")));
                ok = false;
            }
        }
        if !ok {
            return Err(());
        }
        for (i, h) in def.hparams.iter().enumerate() {
            let given = positional
                .get(i)
                .cloned()
                .or_else(|| named.iter().find(|(k, _)| *k == h.name.text).map(|(_, v)| v.clone()));
            let value = match given {
                Some(v) => v,
                None => match h.default {
                    Some(e) => self.eval_static(m, &env, e, false)?,
                    None => {
                        let d = Diagnostic::at(
                            "E0202",
                            span,
                            format!("missing hyperparameter `{}` of `{}`", h.name.text, def.name.text),
                        )
                        .label(h.span, "declared here without a default")
                        .help(format!("pass it, e.g. `{}({}: ...)`", def.name.text, h.name.text));
                        self.error(d);
                        ok = false;
                        continue;
                    }
                },
            };
            match coerce(&value, h.ty) {
                Some(v) => {
                    env.insert(h.name.text.clone(), v);
                }
                None => {
                    let want = type_text(h.ty);
                    let d = Diagnostic::at(
                        "E0201",
                        span,
                        format!(
                            "hyperparameter `{}` of `{}` must be {want}, found {} `{value}`",
                            h.name.text,
                            def.name.text,
                            value.kind()
                        ),
                    )
                    .label(h.ty.span, format!("declared as {want}"));
                    self.error(d);
                    ok = false;
                }
            }
        }
        if ok { Ok(env) } else { Err(()) }
    }

    pub fn instantiate_def(
        &mut self,
        dref: DefRef,
        def: &Def,
        mut env: Env,
        path: String,
        renames: &[(String, String)],
        trainable: bool,
    ) -> Fallible<InstId> {
        let m = dref.module;
        let mut ok = true;
        for (field, _) in renames {
            if !fields_of(def).any(|f| f.name.text == *field) {
                let names: Vec<&str> = fields_of(def).map(|f| f.name.text.as_str()).collect();
                self.error(
                    Diagnostic::at(
                        "E0106",
                        self.context.last().map_or(def.name.span, |c| c.0),
                        format!("`{}` has no field `{field}` to rename", def.name.text),
                    )
                    .help(format!("its fields are {}", names.join(", "))),
                );
                return Err(());
            }
        }
        // Where each field's weights live: its name, or the path it was renamed to.
        let name_of = |f: &Field| {
            renames
                .iter()
                .rev()
                .find(|(field, _)| *field == f.name.text)
                .map_or(f.name.text.clone(), |(_, to)| to.clone())
        };
        for member in &def.members {
            if let Member::Let(l) = member {
                match self.eval_static(m, &env, l.value, false) {
                    Ok(v) => self.bind_let(&mut env, l, v)?,
                    Err(()) => return Err(()),
                }
            }
        }
        let id = InstId::new(self.instances.len());
        self.instances.push(Instance { def: dref, path: path.clone(), env: env.clone(), fields: Vec::new() });
        let mut fields: Vec<(String, FieldInst)> = Vec::new();
        let mut seen: HashMap<String, Span> = HashMap::new();
        for f in fields_of(def) {
            let name = name_of(f);
            if let Some(first) = seen.insert(name.clone(), f.name.span) {
                let message = if renames.is_empty() {
                    format!("field `{name}` is declared twice")
                } else {
                    format!("two fields' weights would live at `{name}` (with `.named`)")
                };
                self.error(Diagnostic::at("E0106", f.name.span, message).label(first, "first declared here"));
                ok = false;
                continue;
            }
            // A path field (`model.layers`) must not live inside another
            // field (`model`): the weight names would clash.
            let inside = fields_of(def).find(|o| name.strip_prefix(&name_of(o)).is_some_and(|r| r.starts_with('.')));
            if let Some(outer) = inside {
                let outer_name = name_of(outer);
                self.error(
                    Diagnostic::at("E0106", f.name.span, format!("field `{name}` lies inside field `{outer_name}`"))
                        .label(outer.name.span, "declared here")
                        .help(format!("declare it in `{outer_name}`'s layer, or rename one of them")),
                );
                ok = false;
                continue;
            }
            let child_path = if path.is_empty() { name } else { format!("{path}.{name}") };
            match self.field(m, &env, f, child_path, trainable) {
                Ok(fi) => fields.push((f.name.text.clone(), fi)),
                Err(()) => {
                    ok = false;
                    fields.push((f.name.text.clone(), FieldInst::Absent));
                }
            }
        }
        self.instances[id].fields = fields;
        if ok { Ok(id) } else { Err(()) }
    }

    pub fn bind_let(&mut self, env: &mut Env, l: &Let, v: Value) -> Fallible<()> {
        if l.names.len() == 1 {
            env.insert(l.names[0].text.clone(), v);
            return Ok(());
        }
        match v {
            Value::List(items) if items.len() == l.names.len() => {
                for (n, v) in l.names.iter().zip(items) {
                    env.insert(n.text.clone(), v);
                }
                Ok(())
            }
            other => {
                self.error(Diagnostic::at(
                    "E0201",
                    l.span,
                    format!("cannot unpack {} into {} names", other.kind(), l.names.len()),
                ));
                Err(())
            }
        }
    }

    fn field(&mut self, m: usize, env: &Env, f: &Field, path: String, trainable: bool) -> Fallible<FieldInst> {
        let module = self.module(m);
        if let Some(c) = f.cond {
            match self.eval_static(m, env, c, false)? {
                Value::Bool(true) => {}
                Value::Bool(false) => return Ok(FieldInst::Absent),
                other => {
                    self.error(Diagnostic::at(
                        "E0201",
                        module.expr(c).span,
                        format!("the condition of an optional field must be a bool, found {} `{other}`", other.kind()),
                    ));
                    return Err(());
                }
            }
        }
        match &f.kind {
            FieldKind::Param { buffer, ty, init } => {
                let mut shape = Vec::new();
                for d in &ty.dims {
                    let DimAst::Expr(e) = d else {
                        self.error(
                            Diagnostic::at("E0301", ty.span, "parameter shapes cannot contain `...`")
                                .help("a parameter has a fixed number of axes"),
                        );
                        return Err(());
                    };
                    let span = module.expr(*e).span;
                    match self.eval_static(m, env, *e, false) {
                        Ok(Value::Int(v)) if v >= 1 => shape.push(v),
                        Ok(Value::Int(v)) => {
                            self.error(
                                Diagnostic::at(
                                    "E0206",
                                    span,
                                    format!("parameter `{path}` would have a dimension of size {v}"),
                                )
                                .help("sizes of parameters must be at least 1"),
                            );
                            return Err(());
                        }
                        Ok(other) => {
                            self.error(Diagnostic::at(
                                "E0201",
                                span,
                                format!("a parameter dimension must be an int, found {} `{other}`", other.kind()),
                            ));
                            return Err(());
                        }
                        Err(()) => return Err(()),
                    }
                }
                if shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d)).is_none_or(|n| n > MAX_ELEMENTS) {
                    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
                    self.error(
                        Diagnostic::at(
                            "E0206",
                            ty.span,
                            format!("parameter `{path}` of shape [{}] is too large", dims.join(", ")),
                        )
                        .help(format!("a tensor holds at most 2^48 = {MAX_ELEMENTS} elements")),
                    );
                    return Err(());
                }
                let init = match init {
                    None => Init::Normal { std: 0.02 },
                    Some(e) => match self.eval_static(m, env, *e, false)? {
                        Value::Init(i) => i,
                        Value::Int(v) => Init::Constant(v as f64),
                        Value::Float(v) => Init::Constant(v),
                        other => {
                            self.error(
                                Diagnostic::at(
                                    "E0201",
                                    module.expr(*e).span,
                                    format!("`{other}` is not an initialiser"),
                                )
                                .help("use zeros, ones, normal(std), uniform(bound), fan_in or a number"),
                            );
                            return Err(());
                        }
                    },
                };
                let id = ParamId::new(self.params.len());
                self.params.push(ParamInfo {
                    name: path,
                    shape,
                    dtype: ty.dtype.unwrap_or(DType::F32),
                    init,
                    trainable: trainable && !buffer,
                    buffer: *buffer,
                    span: f.span,
                });
                Ok(FieldInst::Param(id))
            }
            FieldKind::Sublayer(e) => match self.eval_static(m, env, *e, false)? {
                Value::Layer(lv) => Ok(FieldInst::Sub(self.instantiate(&lv, path, trainable)?)),
                Value::Instance(id) => Ok(FieldInst::Sub(id)),
                other => {
                    self.error(
                        Diagnostic::at(
                            "E0201",
                            module.expr(*e).span,
                            format!("a field must be a layer or a parameter, found {} `{other}`", other.kind()),
                        )
                        .help("write `name: Layer(...)` or `name: param[...]`"),
                    );
                    Err(())
                }
            },
            FieldKind::Repeat { count, index, layer } => {
                let n = match self.eval_static(m, env, *count, false)? {
                    Value::Int(n) if n >= 0 => n,
                    other => {
                        self.error(Diagnostic::at(
                            "E0201",
                            module.expr(*count).span,
                            format!("`repeat` needs a non-negative int, found `{other}`"),
                        ));
                        return Err(());
                    }
                };
                if n > MAX_INSTANCES as i64 {
                    self.error(
                        Diagnostic::at(
                            "E0208",
                            module.expr(*count).span,
                            format!("`repeat({n})` makes more than {MAX_INSTANCES} layers"),
                        )
                        .help("models have tens or hundreds of layers; is the count right?"),
                    );
                    return Err(());
                }
                // With `with i ->`, each copy's layer is evaluated knowing its index.
                let env_of = |i: i64| {
                    let mut each = env.clone();
                    if let Some(name) = index {
                        each.insert(name.text.clone(), Value::Int(i));
                    }
                    each
                };
                let mut ids = Vec::new();
                for i in 0..n.max(1) {
                    let Value::Layer(lv) = self.eval_static(m, &env_of(i), *layer, false)? else {
                        self.error(Diagnostic::at(
                            "E0201",
                            module.expr(*layer).span,
                            "`repeat(n)` must be followed by a layer",
                        ));
                        return Err(());
                    };
                    if i < n {
                        ids.push(self.instantiate(&lv, format!("{path}.{i}"), trainable)?);
                    }
                }
                Ok(FieldInst::Stack(ids))
            }
        }
    }
}

/// Converts a value to a hyperparameter's declared type, if it fits.
pub fn coerce(v: &Value, ty: HType) -> Option<Value> {
    match (ty.word, v) {
        (_, Value::None) if ty.optional => Some(Value::None),
        (HTypeWord::Int, Value::Int(_)) => Some(v.clone()),
        (HTypeWord::Int, Value::Float(f)) if f.fract() == 0.0 && f.abs() < 9e15 => Some(Value::Int(*f as i64)),
        (HTypeWord::Float, Value::Int(i)) => Some(Value::Float(*i as f64)),
        (HTypeWord::Float, Value::Float(_)) => Some(v.clone()),
        (HTypeWord::Bool, Value::Bool(_)) => Some(v.clone()),
        (HTypeWord::Str, Value::Str(_)) => Some(v.clone()),
        (HTypeWord::Layer, Value::Layer(_) | Value::Instance(_)) => Some(v.clone()),
        _ => None,
    }
}

pub fn type_text(ty: HType) -> String {
    let word = match ty.word {
        HTypeWord::Int => "an int",
        HTypeWord::Float => "a float",
        HTypeWord::Bool => "a bool",
        HTypeWord::Str => "a string",
        HTypeWord::Layer => "a layer",
    };
    if ty.optional { format!("{word} or none") } else { word.to_string() }
}

fn hparam_list(def: &Def) -> String {
    if def.hparams.is_empty() {
        return "(none)".into();
    }
    def.hparams.iter().map(|h| h.name.text.as_str()).collect::<Vec<_>>().join(", ")
}

impl std::ops::Index<InstId> for Vec<Instance> {
    type Output = Instance;
    fn index(&self, id: InstId) -> &Instance {
        &self[id.index()]
    }
}

impl std::ops::IndexMut<InstId> for Vec<Instance> {
    fn index_mut(&mut self, id: InstId) -> &mut Instance {
        &mut self[id.index()]
    }
}

impl std::ops::Index<ParamId> for Vec<ParamInfo> {
    type Output = ParamInfo;
    fn index(&self, id: ParamId) -> &ParamInfo {
        &self[id.index()]
    }
}

/// A definition's fields, in order.
fn fields_of(def: &Def) -> impl Iterator<Item = &Field> {
    def.members.iter().filter_map(|m| if let Member::Field(f) = m { Some(f) } else { None })
}
