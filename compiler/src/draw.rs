//! `modelc graph`: the model as a picture, to any depth.
//!
//! Drawn from the lowered forward IR, whose nodes keep the expression and
//! layer instance they came from (`ir::graph::Origin`), so every arrow is
//! real dataflow. Layers down to `depth` (and those named by `expand`) are
//! open: a box holding its sublayers and one node per expression of its
//! own `forward` that computes something (layout-only operations, weights
//! and constants are folded into the arrows). Deeper layers are closed
//! boxes with their parameter count. A `repeat` stack of identical layers
//! is drawn once, `× n`. Arrows carry the shape of the value they carry;
//! one that skips over the boxes between (a residual connection) is routed
//! around them on the right.

use crate::check::{Checked, FieldInst, Program};
use crate::ir::graph::{Graph, NodeId, Op};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

/// What a unit of the picture is.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Input,
    Output,
    /// A closed layer.
    Layer,
    /// An expression of an open layer's own forward.
    Expr,
}

/// A box of the picture: an input, an output, a closed layer or an expression.
#[derive(Clone, Debug)]
struct Unit {
    kind: Kind,
    label: String,
    detail: String,
    /// The open layer it sits in (an index into `Picture::layers`).
    parent: usize,
    /// Order: its first IR node.
    first: u32,
}

/// An open layer: a container.
#[derive(Clone, Debug)]
struct Open {
    title: String,
    parent: Option<usize>,
    first: u32,
}

/// The picture's structure, before coordinates.
pub struct Picture {
    model: String,
    layers: Vec<Open>,
    units: Vec<Unit>,
    /// (from unit, to unit, shape).
    edges: Vec<(usize, usize, String)>,
}

/// Stacks of identical layers drawn once: each later element's instances
/// (and theirs) map to the first element's counterparts, and the first
/// element's instance counts the stack.
struct Folds {
    onto: HashMap<usize, usize>,
    times: HashMap<usize, usize>,
}

impl Folds {
    fn new(checked: &Checked) -> Folds {
        let by_path: HashMap<&str, usize> =
            checked.instances.iter().enumerate().map(|(i, x)| (x.path.as_str(), i)).collect();
        let (mut onto, mut times) = (HashMap::new(), HashMap::new());
        for inst in &checked.instances {
            for (_, f) in &inst.fields {
                let FieldInst::Stack(ids) = f else { continue };
                let Some(first) = ids.first() else { continue };
                let stem = &checked.instances[first.index()].path;
                if !ids.iter().all(|i| checked.instances[i.index()].def == checked.instances[first.index()].def) {
                    continue;
                }
                times.insert(first.index(), ids.len());
                for id in &ids[1..] {
                    let path = &checked.instances[id.index()].path;
                    for (i, x) in checked.instances.iter().enumerate() {
                        let rest = match x.path.strip_prefix(path.as_str()) {
                            Some(r) if r.is_empty() || r.starts_with('.') => r,
                            _ => continue,
                        };
                        if let Some(&to) = by_path.get(format!("{stem}{rest}").as_str()) {
                            onto.insert(i, to);
                        }
                    }
                }
            }
        }
        Folds { onto, times }
    }

    /// The instance drawn for `i` (folds compose: an expert of layer 3 is
    /// drawn as the first expert of layer 0).
    fn canon(&self, mut i: usize) -> usize {
        while let Some(to) = self.onto.get(&i) {
            i = *to;
        }
        i
    }
}

/// Operations that only move or name data: folded into the arrows.
fn folded(op: &Op) -> bool {
    matches!(
        op,
        Op::Param(_)
            | Op::Const(_)
            | Op::Size(_)
            | Op::Iota
            | Op::Reshape
            | Op::Permute(_)
            | Op::Broadcast
            | Op::Cast(_)
            | Op::Slice { .. }
    )
}

/// A forward's line as a unit's label: `forward(...) -> ... = e` as `e`.
fn file_line(text: &str, line: usize) -> String {
    let l = text.lines().nth(line - 1).unwrap_or("").trim();
    match l.strip_prefix("forward(").and_then(|_| l.split_once(" = ")) {
        Some((_, body)) => body.to_string(),
        None => l.to_string(),
    }
}

fn count(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Text on one line (runs of white space as one), shortened to `n`
/// characters with an ellipsis.
pub fn clip(s: &str, n: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= n { s } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}

/// The structure of the picture of `g` (the lowered forward of `checked`).
/// `sizes` replaces the sizes it names in the shapes shown.
pub fn picture(
    p: &Program,
    checked: &Checked,
    g: &Graph,
    depth: usize,
    expand: &[String],
    sizes: &crate::types::Sizes,
) -> Picture {
    let shape = |dims: &[crate::types::Dim]| {
        let bound: Vec<crate::types::Dim> =
            (dims.iter()).map(|d| d.substitute(&|s| sizes.get(s).map(|v| crate::types::Dim::constant(*v)))).collect();
        crate::types::shape_text(&bound)
    };
    let folds = Folds::new(checked);
    let canon = |i: usize| folds.canon(i);
    // Depth of each instance below the root, by its parent chain.
    let mut parent_of: Vec<Option<usize>> = vec![None; checked.instances.len()];
    for (i, inst) in checked.instances.iter().enumerate() {
        for (_, f) in &inst.fields {
            match f {
                FieldInst::Sub(c) => parent_of[c.index()] = Some(i),
                FieldInst::Stack(cs) => cs.iter().for_each(|c| parent_of[c.index()] = Some(i)),
                _ => {}
            }
        }
    }
    let depth_of = |mut i: usize| {
        let mut d = 0;
        while let Some(p) = parent_of[i] {
            d += 1;
            i = p;
        }
        d
    };
    let named = |i: usize| {
        let path = &checked.instances[i].path;
        expand.iter().any(|e| path == e || path.rsplit('.').next() == Some(e.as_str()))
    };
    // Open: the root, layers above `depth`, and those expanded (with their parents).
    let mut open = vec![false; checked.instances.len()];
    for i in 0..open.len() {
        if depth_of(i) < depth || named(i) {
            let mut at = Some(i);
            while let Some(x) = at {
                open[x] = true;
                at = parent_of[x];
            }
        }
    }
    open[checked.root.index()] = true;
    // The unit each node belongs to: the outermost closed layer above its
    // instance, or the expression in its open instance.
    let title = |i: usize| {
        let inst = &checked.instances[i];
        let name = p.item_name(inst.def);
        let times = folds.times.get(&i).copied().filter(|n| *n > 1);
        let path = match (times, inst.path.rsplit_once('.')) {
            (Some(_), Some((stem, _))) => stem.to_string(),
            _ => inst.path.clone(),
        };
        let params: i64 = (checked.params.iter())
            .filter(|x| !x.buffer && (inst.path.is_empty() || x.name.starts_with(&format!("{}.", inst.path))))
            .map(|x| x.count())
            .sum();
        let shown = if path.is_empty() { checked.model.clone() } else { format!("{path}: {name}") };
        let times = times.map(|n| format!(" × {n}")).unwrap_or_default();
        let each = if times.is_empty() { "" } else { " each" };
        (
            format!("{shown}{times}"),
            if params > 0 { format!("{} parameters{each}", count(params)) } else { String::new() },
        )
    };
    let mut layers: Vec<Open> = Vec::new();
    let mut layer_index: HashMap<usize, usize> = HashMap::new();
    let mut units: Vec<Unit> = Vec::new();
    let mut unit_index: HashMap<(usize, Option<(u32, u32)>), usize> = HashMap::new();
    let mut unit_of: Vec<Option<usize>> = vec![None; g.nodes.len()];
    fn open_layer(
        i: usize,
        first: u32,
        layers: &mut Vec<Open>,
        index: &mut HashMap<usize, usize>,
        parent_of: &[Option<usize>],
        canon: &dyn Fn(usize) -> usize,
        title: &dyn Fn(usize) -> (String, String),
    ) -> usize {
        if let Some(l) = index.get(&i) {
            return *l;
        }
        let parent = parent_of[i].map(|p| open_layer(canon(p), first, layers, index, parent_of, canon, title));
        let (t, params) = title(i);
        let t = if params.is_empty() { t } else { format!("{t}  ({params})") };
        layers.push(Open { title: t, parent, first });
        index.insert(i, layers.len() - 1);
        layers.len() - 1
    }
    let inputs_layer = open_layer(checked.root.index(), 0, &mut layers, &mut layer_index, &parent_of, &canon, &title);
    for (n, node) in g.nodes.iter().enumerate() {
        let n32 = n as u32;
        if let Op::Input(name) = &node.op {
            units.push(Unit {
                kind: Kind::Input,
                label: name.clone(),
                detail: shape(&node.ty.dims),
                parent: inputs_layer,
                first: n32,
            });
            unit_of[n] = Some(units.len() - 1);
            continue;
        }
        if folded(&node.op) {
            continue;
        }
        let Some(origin) = node.origin else { continue };
        let inst = canon(origin.instance as usize);
        // The outermost closed layer on the way down to `inst`.
        let mut chain = vec![inst];
        while let Some(p) = parent_of[*chain.last().unwrap_or(&inst)] {
            chain.push(canon(p));
        }
        let closed = chain.iter().rev().find(|i| !open[**i]).copied();
        // An open layer's own operations: one unit per line of its forward.
        let (line, _) = p.sources.line_col(origin.span.file, origin.span.start as usize);
        let key = match closed {
            Some(c) => (c, None),
            None => (inst, Some((origin.span.file.0, line as u32))),
        };
        let unit = match unit_index.get(&key) {
            Some(u) => *u,
            None => {
                let container = match closed {
                    Some(c) => parent_of[c].map(canon).unwrap_or(inst),
                    None => inst,
                };
                let parent = open_layer(container, n32, &mut layers, &mut layer_index, &parent_of, &canon, &title);
                let (kind, label, detail) = match closed {
                    Some(c) => {
                        let (t, params) = title(c);
                        // Named within its container: `self_attn: Attention`.
                        let within = checked.instances[c].path.rsplit('.').next().unwrap_or("");
                        let t = t.rsplit_once(": ").map_or(t.clone(), |(_, layer)| format!("{within}: {layer}"));
                        (Kind::Layer, t, params)
                    }
                    None => {
                        let file = &p.sources.file(origin.span.file).name;
                        let text = file_line(&p.sources.file(origin.span.file).text, line);
                        let file = file.rsplit('/').next().unwrap_or(file);
                        (Kind::Expr, text, format!("{file}:{line}"))
                    }
                };
                units.push(Unit { kind, label, detail, parent, first: n32 });
                unit_index.insert(key, units.len() - 1);
                units.len() - 1
            }
        };
        unit_of[n] = Some(unit);
    }
    // Outputs.
    let mut outputs: Vec<(usize, NodeId)> = Vec::new();
    for (name, id) in &g.outputs {
        units.push(Unit {
            kind: Kind::Output,
            label: name.clone(),
            detail: shape(g.dims(*id)),
            parent: inputs_layer,
            first: g.nodes.len() as u32,
        });
        outputs.push((units.len() - 1, *id));
    }
    // Arrows: from the units that computed a node's arguments (through the
    // folded operations) to the node's unit; each pair once, forward only.
    let mut sources: Vec<Vec<(usize, NodeId)>> = vec![Vec::new(); g.nodes.len()];
    for (n, node) in g.nodes.iter().enumerate() {
        sources[n] = match unit_of[n] {
            Some(u) => vec![(u, NodeId(n as u32))],
            None => {
                let mut s: Vec<(usize, NodeId)> = node.args.iter().flat_map(|a| sources[a.index()].clone()).collect();
                s.sort_by_key(|x| x.0);
                s.dedup_by_key(|x| x.0);
                s
            }
        };
    }
    let mut seen = HashSet::new();
    let mut edges = Vec::new();
    let mut add = |from: usize, to: usize, via: NodeId, edges: &mut Vec<(usize, usize, String)>| {
        if from != to && seen.insert((from, to)) && units[from].first < units[to].first {
            edges.push((from, to, shape(g.dims(via))));
        }
    };
    for (n, node) in g.nodes.iter().enumerate() {
        let Some(to) = unit_of[n] else { continue };
        for a in &node.args {
            for (from, via) in &sources[a.index()] {
                add(*from, to, *via, &mut edges);
            }
        }
    }
    for (unit, id) in &outputs {
        for (from, via) in &sources[id.index()] {
            add(*from, *unit, *via, &mut edges);
        }
    }
    Picture { model: checked.model.clone(), layers, units, edges }
}

impl Picture {
    /// The structure as text: the open layers as an indented tree with
    /// their units, then the arrows (what the tests compare).
    pub fn outline(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "model {}", self.model);
        let order = self.order();
        for item in &order {
            let (depth, text) = match item {
                Item::Layer(l) => (self.level(Some(*l)), format!("[{}]", self.layers[*l].title)),
                Item::Unit(u) => {
                    let unit = &self.units[*u];
                    let kind = match unit.kind {
                        Kind::Input => "input",
                        Kind::Output => "output",
                        Kind::Layer => "layer",
                        Kind::Expr => "expr",
                    };
                    (self.level(Some(unit.parent)) + 1, format!("{kind} {}  {}", unit.label, unit.detail))
                }
            };
            let _ = writeln!(out, "{}{}", "  ".repeat(depth), text.trim_end());
        }
        let _ = writeln!(out, "arrows");
        for (from, to, shape) in &self.edges {
            let _ = writeln!(out, "  {} -> {}  {shape}", self.units[*from].label, self.units[*to].label);
        }
        out
    }

    fn level(&self, mut l: Option<usize>) -> usize {
        let mut d = 0;
        while let Some(x) = l.and_then(|x| self.layers[x].parent) {
            d += 1;
            l = Some(x);
        }
        d
    }

    /// Open layers and units in drawing order: each layer's contents in
    /// order of their first node, a layer's contents right after it.
    fn order(&self) -> Vec<Item> {
        let mut children: BTreeMap<Option<usize>, Vec<(u32, Item)>> = BTreeMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            children.entry(l.parent).or_default().push((l.first, Item::Layer(i)));
        }
        for (i, u) in self.units.iter().enumerate() {
            children.entry(Some(u.parent)).or_default().push((u.first, Item::Unit(i)));
        }
        for c in children.values_mut() {
            c.sort_by_key(|(first, item)| (*first, matches!(item, Item::Unit(_))));
        }
        let mut out = Vec::new();
        fn walk(at: Option<usize>, children: &BTreeMap<Option<usize>, Vec<(u32, Item)>>, out: &mut Vec<Item>) {
            for (_, item) in children.get(&at).map(Vec::as_slice).unwrap_or(&[]) {
                out.push(*item);
                if let Item::Layer(l) = item {
                    walk(Some(*l), children, out);
                }
            }
        }
        walk(None, &children, &mut out);
        out
    }
}

#[derive(Clone, Copy, Debug)]
enum Item {
    Layer(usize),
    Unit(usize),
}

/// Text as SVG character data or an attribute value.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const WIDTH: f64 = 820.0;
const BOX_H: f64 = 38.0;
const GAP: f64 = 30.0;
const PAD: f64 = 14.0;
const HEADER: f64 = 24.0;

/// Coordinates of each unit: (x, y, width).
struct Placed {
    boxes: Vec<(f64, f64, f64)>,
    /// Each open layer's rectangle: (x, y, width, height).
    frames: Vec<(f64, f64, f64, f64)>,
    height: f64,
}

impl Picture {
    /// Rows top to bottom: an open layer's frame takes the full width of
    /// its parent less padding; consecutive units of one layer with no
    /// arrow between them share a row (q, k and v projections side by side).
    fn place(&self) -> Placed {
        let order = self.order();
        let mut boxes = vec![(0.0, 0.0, 0.0); self.units.len()];
        let mut frames = vec![(0.0, 0.0, 0.0, 0.0); self.layers.len()];
        let linked: HashSet<(usize, usize)> = self.edges.iter().map(|(a, b, _)| (*a, *b)).collect();
        let mut y = 40.0;
        // Layers whose frames are open, innermost last.
        let mut stack: Vec<usize> = Vec::new();
        let inner = |stack: &[usize]| {
            let d = stack.len().saturating_sub(1) as f64;
            (20.0 + PAD * d, WIDTH - 2.0 * (20.0 + PAD * d))
        };
        let mut i = 0;
        while i < order.len() {
            // Close frames this item is not inside.
            let parent = match order[i] {
                Item::Layer(l) => self.layers[l].parent,
                Item::Unit(u) => Some(self.units[u].parent),
            };
            while let Some(top) = stack.last().copied() {
                if Some(top) == parent {
                    break;
                }
                stack.pop();
                frames[top].3 = y - frames[top].1 + 6.0;
                y += 12.0;
            }
            match order[i] {
                Item::Layer(l) => {
                    stack.push(l);
                    let (x, w) = inner(&stack);
                    frames[l] = (x, y, w, 0.0);
                    y += HEADER;
                    i += 1;
                }
                Item::Unit(_) => {
                    // A row: this unit and the following ones of the same layer not linked to it.
                    let mut row = vec![];
                    while i < order.len() && row.len() < 4 {
                        let Item::Unit(u) = order[i] else { break };
                        if Some(self.units[u].parent) != parent
                            || row.iter().any(|r| linked.contains(&(*r, u)) || linked.contains(&(u, *r)))
                        {
                            break;
                        }
                        row.push(u);
                        i += 1;
                    }
                    let (x, w) = inner(&stack);
                    let (x, w) = (x + PAD, w - 2.0 * PAD - 90.0);
                    let each = (w - 10.0 * (row.len() as f64 - 1.0)) / row.len() as f64;
                    for (k, u) in row.iter().enumerate() {
                        boxes[*u] = (x + k as f64 * (each + 10.0), y, each);
                    }
                    y += BOX_H + GAP;
                }
            }
        }
        while let Some(top) = stack.pop() {
            frames[top].3 = y - frames[top].1 + 6.0;
            y += 12.0;
        }
        Placed { boxes, frames, height: y + 20.0 }
    }

    pub fn svg(&self) -> String {
        let placed = self.place();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h:.0}\" viewBox=\"0 0 {WIDTH} {h:.0}\" font-family=\"DejaVu Sans, sans-serif\" font-size=\"12\">",
            h = placed.height
        );
        let _ = writeln!(
            out,
            "<style>.title {{ font-weight: bold; }} .detail {{ fill: #555; font-size: 10px; }} .shape {{ fill: #1a7f4b; font-family: DejaVu Sans Mono, monospace; font-size: 10px; }}</style>"
        );
        let _ = writeln!(
            out,
            "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#333\"/></marker></defs>"
        );
        let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ =
            writeln!(out, "<text x=\"20\" y=\"24\" class=\"title\" font-size=\"15\">{}</text>", escape(&self.model));
        let fills = ["#fbf7ee", "#eef4fb", "#f1f8ee", "#fbeff2", "#f3effb"];
        for (l, layer) in self.layers.iter().enumerate().skip(1) {
            let (x, y, w, h) = placed.frames[l];
            let _ = writeln!(
                out,
                "<g class=\"layer\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" rx=\"8\" fill=\"{}\" stroke=\"#998\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"title\">{}</text></g>",
                fills[self.level(Some(l)) % fills.len()],
                x + 10.0,
                y + 16.0,
                escape(&layer.title)
            );
        }
        // Arrows under the boxes.
        // The rows' tops: an arrow with no row between its ends is drawn
        // straight; the others go around on the right, dashed (residuals,
        // an input read far down).
        let mut rows: Vec<f64> = placed.boxes.iter().map(|b| b.1).collect();
        rows.sort_by(f64::total_cmp);
        rows.dedup();
        let mut lane: HashMap<usize, usize> = HashMap::new();
        for (from, to, shape) in &self.edges {
            let (fx, fy, fw) = placed.boxes[*from];
            let (tx, ty, tw) = placed.boxes[*to];
            let (x1, y1) = (fx + fw / 2.0, fy + BOX_H);
            let (x2, y2) = (tx + tw / 2.0, ty);
            let direct = ty > fy && !rows.iter().any(|r| *r > fy + 0.5 && *r < ty - 0.5);
            if direct {
                let _ = writeln!(
                    out,
                    "<g class=\"arrow\"><line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{:.1}\" stroke=\"#333\" marker-end=\"url(#arrow)\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"shape\">{}</text></g>",
                    y2 - 1.0,
                    (x1 + x2) / 2.0 + 6.0,
                    (y1 + y2) / 2.0 + 4.0,
                    escape(shape)
                );
            } else {
                let parent = self.units[*to].parent;
                let k = lane.entry(parent).or_insert(0);
                let (px, _, pw, _) = placed.frames[parent];
                let right = px + pw - 12.0 - 9.0 * (*k % 8) as f64;
                *k += 1;
                let (down, up) = (y1 + 8.0, y2 - 8.0);
                let _ = writeln!(
                    out,
                    "<g class=\"arrow skip\"><path d=\"M{x1:.1},{y1:.1} L{x1:.1},{down:.1} L{right:.1},{down:.1} L{right:.1},{up:.1} L{x2:.1},{up:.1} L{x2:.1},{:.1}\" fill=\"none\" stroke=\"#777\" stroke-dasharray=\"4 2\" marker-end=\"url(#arrow)\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"shape\" text-anchor=\"end\">{}</text></g>",
                    y2 - 1.0,
                    right - 4.0,
                    down + 12.0,
                    escape(shape)
                );
            }
        }
        for (u, unit) in self.units.iter().enumerate() {
            let (x, y, w) = placed.boxes[u];
            let (fill, rx) = match unit.kind {
                Kind::Input => ("#e8f0fe", 17.0),
                Kind::Output => ("#e6f4ea", 17.0),
                Kind::Layer => ("#fff3cd", 5.0),
                Kind::Expr => ("#ffffff", 3.0),
            };
            let chars = ((w - 12.0) / 7.3).max(6.0) as usize;
            let _ = writeln!(
                out,
                "<g class=\"unit\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{BOX_H}\" rx=\"{rx}\" fill=\"{fill}\" stroke=\"#333\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"detail\">{}</text></g>",
                x + w / 2.0,
                y + 16.0,
                escape(&clip(&unit.label, chars)),
                x + w / 2.0,
                y + 30.0,
                escape(&clip(&unit.detail, chars + 4))
            );
        }
        let _ = writeln!(out, "</svg>");
        out
    }
}
