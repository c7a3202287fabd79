//! `modelc plan`: the memory plan as a picture, and its peak as a formula.
//!
//! The picture: kernels in execution order across, arena offset up; every
//! value the arena holds is a rectangle from the kernel that writes it to
//! the last that reads it, coloured by the layer it came from (its node's
//! `Origin`), with a tooltip naming it. The peak: every value's end as
//! the sum of the symbolic lengths the allocator stacked below it, and the
//! largest of those.

use crate::backend::plan::{Below, Place, Plan};
use crate::draw::escape;
use crate::ir::graph::{Graph, NodeId, Origin};
use crate::types::{Dim, Sizes};
use std::collections::HashMap;
use std::fmt::Write;

/// One value's rectangle.
struct Rect {
    start: usize,
    end: usize,
    offset: usize,
    len: usize,
    layer: usize,
    label: String,
}

/// A colour per layer, hues spread by the golden angle.
fn colour(i: usize) -> String {
    let hue = (i as f64 * 137.508) % 360.0;
    let light = [52.0, 66.0, 42.0][i % 3];
    format!("hsl({hue:.0}, 62%, {light:.0}%)")
}

/// The picture of `plan` (for `g` scheduled into `steps` kernels).
/// `layer_of` names the layer an origin belongs to (the legend's entries);
/// `describe` says where an origin is in the spec (tooltips).
pub fn svg(
    g: &Graph,
    plan: &Plan,
    steps: usize,
    title: &str,
    layer_of: &dyn Fn(Option<Origin>) -> String,
    describe: &dyn Fn(Option<Origin>) -> String,
) -> String {
    // A concatenation's memory is live from its first part on.
    let mut first_part: HashMap<NodeId, usize> = HashMap::new();
    for (i, place) in plan.places.iter().enumerate() {
        if let (Place::Part(of), Some((start, _))) = (place, plan.live[i]) {
            let e = first_part.entry(*of).or_insert(start);
            *e = (*e).min(start);
        }
    }
    let mut layers: Vec<String> = Vec::new();
    let mut rects = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let (Place::Arena { offset, len }, Some((start, end))) = (&plan.places[i], plan.live[i]) else { continue };
        let start = first_part.get(&NodeId(i as u32)).map_or(start, |p| start.min(*p));
        let name = layer_of(node.origin);
        let layer = layers.iter().position(|l| *l == name).unwrap_or_else(|| {
            layers.push(name.clone());
            layers.len() - 1
        });
        let label = format!(
            "%{i} {} {} {} bytes, kernels {start}..{end}\n{name}\n{}",
            node.op.name(),
            crate::types::shape_text(&node.ty.dims),
            len * 4,
            describe(node.origin)
        );
        rects.push(Rect { start, end, offset: *offset, len: *len, layer, label });
    }
    let (width, height, left, top, legend): (f64, f64, f64, f64, f64) = (1100.0, 560.0, 70.0, 50.0, 330.0);
    let shown = layers.len().min(36);
    let total_height = (top + height + 50.0).max(top + 18.0 * shown as f64 + 60.0);
    let sx = width / steps.max(1) as f64;
    let sy = height / plan.arena_len.max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{total_height:.0}" font-family="sans-serif" font-size="12">"#,
        left + width + legend
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{left}" y="24" font-size="15">{}</text>"#, escape(title));
    let _ = writeln!(
        out,
        r##"<g id="axes" stroke="#444"><line x1="{left}" y1="{}" x2="{}" y2="{}"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}"/></g>"##,
        top + height,
        left + width,
        top + height,
        top + height
    );
    let mb = plan.arena_len as f64 * 4.0 / 1e6;
    for k in 0..=4 {
        let y = top + height - height * k as f64 / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.0}" y="{:.0}" text-anchor="end" fill="#444">{:.1} MB</text>"##,
            left - 6.0,
            y + 4.0,
            mb * k as f64 / 4.0
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.0}" y="{:.0}" text-anchor="middle" fill="#444">kernels in execution order (0 .. {})</text>"##,
        left + width / 2.0,
        top + height + 30.0,
        steps.saturating_sub(1)
    );
    let _ = writeln!(out, r#"<g id="values" stroke="white" stroke-width="0.3">"#);
    for r in &rects {
        let _ = writeln!(
            out,
            r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>{}</title></rect>"#,
            left + r.start as f64 * sx,
            top + height - (r.offset + r.len) as f64 * sy,
            ((r.end - r.start + 1) as f64 * sx).max(0.5),
            (r.len as f64 * sy).max(0.5),
            colour(r.layer),
            escape(&r.label)
        );
    }
    let _ = writeln!(out, "</g>");
    let _ = writeln!(out, r#"<g id="legend">"#);
    for (i, name) in layers.iter().take(shown).enumerate() {
        let y = top + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{:.0}" y="{y:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
            left + width + 20.0,
            colour(i),
            left + width + 38.0,
            y + 10.0,
            escape(name)
        );
    }
    if layers.len() > shown {
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.0}">and {} more</text>"#,
            left + width + 38.0,
            top + 18.0 * shown as f64 + 10.0,
            layers.len() - shown
        );
    }
    let _ = writeln!(out, "</g>\n</svg>");
    out
}

/// The peak in the symbolic sizes, in bytes: the largest of these
/// polynomials (none smaller than another at every size). Each arena
/// value's end is the sum of the lengths below it, as the allocator stacked
/// them (`Plan::below`), so the formula is exact at the plan's sizes and
/// wherever the same stacking is sound (`plan_over` makes it so at the
/// sizes it is given).
pub fn peak_terms(g: &Graph, plan: &Plan) -> Vec<Dim> {
    type Memo = HashMap<usize, Vec<Dim>>;
    fn base(v: usize, g: &Graph, plan: &Plan, memo: &mut Memo) -> Vec<Dim> {
        match &plan.below[v] {
            Below::Start => vec![Dim::constant(0)],
            Below::Above(w) => top(w.index(), g, plan, memo),
            Below::Over(w) => base(w.index(), g, plan, memo),
            Below::AboveAll(ws) => largest(ws.iter().flat_map(|w| top(w.index(), g, plan, memo)).collect()),
        }
    }
    fn top(v: usize, g: &Graph, plan: &Plan, memo: &mut Memo) -> Vec<Dim> {
        if let Some(d) = memo.get(&v) {
            return d.clone();
        }
        let len = g.nodes[v].ty.dims.iter().fold(Dim::constant(1), |acc, d| acc.mul(d));
        let d: Vec<Dim> = base(v, g, plan, memo).iter().map(|b| b.add(&len)).collect();
        memo.insert(v, d.clone());
        d
    }
    let mut memo = HashMap::new();
    let tops: Vec<Dim> = (0..g.nodes.len())
        .filter(|v| matches!(plan.places[*v], Place::Arena { .. }))
        .flat_map(|v| top(v, g, plan, &mut memo))
        .map(|t| t.mul(&Dim::constant(4)))
        .collect();
    largest(tops)
}

/// The terms no other is at least as large as everywhere.
fn largest(mut terms: Vec<Dim>) -> Vec<Dim> {
    terms.sort();
    terms.dedup();
    (terms.iter()).filter(|p| !terms.iter().any(|q| q != *p && q.sub(p).nonnegative())).cloned().collect()
}

/// `max(a, b)` of the terms, or the one term.
pub fn peak_text(terms: &[Dim]) -> String {
    match terms {
        [] => "0".into(),
        [one] => one.to_string(),
        many => format!("max({})", many.iter().map(Dim::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// The formula's value at `sizes`.
pub fn peak_value(terms: &[Dim], sizes: &Sizes) -> Result<usize, String> {
    terms.iter().map(|t| crate::types::eval_dim(t, sizes)).try_fold(0, |m, v| v.map(|v| m.max(v)))
}
