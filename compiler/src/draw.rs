//! `modelc graph`: the model as a picture. Each top-level layer call is a
//! box listing the layers it calls; arrows carry the tensor shapes between
//! them. Consecutive calls of identical layers (a `repeat` stack) are drawn
//! once with a count. Plain SVG text, no dependencies.

use crate::check::{CallRecord, Checked};

const WIDTH: f64 = 560.0;
const LINE: f64 = 16.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

struct Block {
    title: String,
    lines: Vec<String>,
    output: String,
}

/// Groups the trace into top-level blocks, folding repeats.
fn blocks(calls: &[CallRecord]) -> Vec<Block> {
    let mut out: Vec<(Block, String, usize)> = Vec::new();
    let mut i = 0;
    while i < calls.len() {
        let top = &calls[i];
        let mut j = i + 1;
        // Direct sub-calls, with runs of a stack's identical layers folded.
        let mut lines: Vec<(String, String, String, usize)> = Vec::new();
        while j < calls.len() && calls[j].depth > top.depth {
            let c = &calls[j];
            if c.depth == top.depth + 1 {
                let rel = c.path.strip_prefix(&format!("{}.", top.path)).unwrap_or(&c.path).to_string();
                let stack =
                    rel.rsplit_once('.').filter(|(_, n)| n.parse::<usize>().is_ok()).map(|(s, _)| s.to_string());
                match (lines.last_mut(), stack) {
                    (Some((name, layer, output, n)), Some(stem))
                        if *name == stem && *layer == c.layer && *output == c.output =>
                    {
                        *n += 1
                    }
                    (_, stem) => lines.push((stem.unwrap_or(rel), c.layer.clone(), c.output.clone(), 1)),
                }
            }
            j += 1;
        }
        let lines: Vec<String> = lines
            .into_iter()
            .map(|(name, layer, output, n)| {
                if n > 1 {
                    format!("{name}: {layer} × {n} -> {output}")
                } else {
                    format!("{name}: {layer} -> {output}")
                }
            })
            .collect();
        // A stack element `h.3` after `h.2` with the same layer and shapes joins its block.
        let stem = |p: &str| p.rsplit_once('.').filter(|(_, n)| n.parse::<usize>().is_ok()).map(|(s, _)| s.to_string());
        let key = format!("{}|{}|{:?}", top.layer, top.output, top.inputs);
        match out.last_mut() {
            Some((b, k, n))
                if *k == key
                    && stem(&top.path).is_some()
                    && stem(&top.path) == b.title.split(' ').next().and_then(stem) =>
            {
                *n += 1;
            }
            _ => {
                let title = format!("{} {}", top.path, top.layer);
                out.push((Block { title, lines, output: top.output.clone() }, key, 1));
            }
        }
        i = j;
    }
    out.into_iter()
        .map(|(mut b, _, n)| {
            if n > 1 {
                // `blocks.0 PreNormBlock` stands for the whole stack: `blocks PreNormBlock × 4`.
                let (path, layer) = b.title.split_once(' ').unwrap_or((&b.title, ""));
                let stem = path.rsplit_once('.').map_or(path, |(s, _)| s);
                b.title = format!("{stem} {layer} × {n}");
            }
            b
        })
        .collect()
}

pub fn svg(checked: &Checked, calls: &[CallRecord]) -> String {
    let top: Vec<CallRecord> = calls.to_vec();
    let blocks = blocks(&top);
    let mut body = String::new();
    let mut y = 20.0;
    let pill = |body: &mut String, y: f64, text: &str, fill: &str| {
        body.push_str(&format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"26\" rx=\"13\" fill=\"{fill}\" stroke=\"#333\"/>\n<text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">{t}</text>\n",
            x = 60.0,
            w = WIDTH - 120.0,
            cx = WIDTH / 2.0,
            ty = y + 17.0,
            t = escape(text)
        ));
    };
    let arrow = |body: &mut String, y: f64, label: &str| {
        body.push_str(&format!(
            "<line x1=\"{cx}\" y1=\"{y}\" x2=\"{cx}\" y2=\"{y2}\" stroke=\"#333\" marker-end=\"url(#arrow)\"/>\n<text x=\"{tx}\" y=\"{ty}\" class=\"shape\">{l}</text>\n",
            cx = WIDTH / 2.0,
            y2 = y + 30.0,
            tx = WIDTH / 2.0 + 8.0,
            ty = y + 19.0,
            l = escape(label)
        ));
    };
    let inputs: Vec<String> = checked.inputs.iter().map(|s| format!("{}: {}", s.name, s.ty)).collect();
    pill(&mut body, y, &format!("inputs  {}", inputs.join("   ")), "#e8f0fe");
    y += 26.0;
    for b in &blocks {
        arrow(&mut body, y, "");
        y += 34.0;
        let h = 26.0 + LINE * b.lines.len() as f64 + 8.0;
        body.push_str(&format!(
            "<rect x=\"20\" y=\"{y}\" width=\"{w}\" height=\"{h}\" rx=\"6\" fill=\"#fff8e1\" stroke=\"#333\"/>\n<text x=\"32\" y=\"{ty}\" class=\"title\">{t}</text>\n",
            w = WIDTH - 40.0,
            ty = y + 18.0,
            t = escape(&b.title)
        ));
        for (k, line) in b.lines.iter().enumerate() {
            body.push_str(&format!(
                "<text x=\"44\" y=\"{}\" class=\"detail\">{}</text>\n",
                y + 36.0 + LINE * k as f64,
                escape(line)
            ));
        }
        y += h;
        arrow(&mut body, y, &b.output);
        y += 30.0;
    }
    arrow(&mut body, y, "");
    y += 34.0;
    let outputs: Vec<String> = checked.outputs.iter().map(|s| format!("{}: {}", s.name, s.ty)).collect();
    pill(&mut body, y, &format!("outputs  {}", outputs.join("   ")), "#e6f4ea");
    y += 46.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y}\" viewBox=\"0 0 {WIDTH} {y}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<style>.title {{ font-weight: bold; }} .detail {{ fill: #444; }} .shape {{ fill: #1a5; font-family: monospace; }}</style>\n\
<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker></defs>\n\
<text x=\"20\" y=\"14\" class=\"title\">{}</text>\n{body}</svg>\n",
        escape(&checked.model)
    )
}
