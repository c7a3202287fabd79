//! The checked form of a model as text (for people and snapshots) and JSON.

use super::Checked;
use crate::types::shape_text;
use serde_json::json;

/// `1234567` -> `1,234,567`.
pub fn thousands(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `s` padded with spaces to `width` bytes. (Not `{:<width$}`: format
/// widths over 65,535 panic, and names may be that long.)
fn pad(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

fn pad_left(s: &str, width: usize) -> String {
    format!("{}{s}", " ".repeat(width.saturating_sub(s.len())))
}

pub fn text(c: &Checked) -> String {
    let mut out = format!("model {}\n", c.model);
    if !c.hparams.is_empty() {
        out.push_str("\nhyperparameters\n");
        let w = c.hparams.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &c.hparams {
            out.push_str(&format!("  {}  {v}\n", pad(k, w)));
        }
    }
    let sig = |title: &str, sigs: &[super::Signature], out: &mut String| {
        if sigs.is_empty() {
            return;
        }
        out.push_str(&format!("\n{title}\n"));
        let w = sigs.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in sigs {
            let opt = if s.optional { " (optional)" } else { "" };
            out.push_str(&format!("  {}  {}{opt}\n", pad(&s.name, w), s.ty));
        }
    };
    sig("inputs", &c.inputs, &mut out);
    sig("outputs", &c.outputs, &mut out);
    sig("training targets", &c.targets, &mut out);
    for (title, settings) in [("train", &c.train), ("infer", &c.infer)] {
        if !settings.is_empty() {
            out.push_str(&format!("\n{title}\n"));
            let w = settings.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in settings {
                out.push_str(&format!("  {}  {v}\n", pad(k, w)));
            }
        }
    }
    out.push_str("\nparameters\n");
    let rows: Vec<(String, String, String, &str)> = c
        .params
        .iter()
        .map(|p| {
            let shape: Vec<String> = p.shape.iter().map(|d| d.to_string()).collect();
            let kind = if p.buffer {
                "buffer"
            } else if p.trainable {
                "trainable"
            } else {
                "frozen"
            };
            (p.name.clone(), format!("[{}]", shape.join(", ")), thousands(p.count()), kind)
        })
        .collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(5).max(5);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(5).max(5);
    out.push_str(&format!("  {}  {}  {}\n", pad("name", w0), pad("shape", w1), pad_left("count", w2)));
    for (name, shape, count, kind) in &rows {
        out.push_str(&format!("  {}  {}  {}  {kind}\n", pad(name, w0), pad(shape, w1), pad_left(count, w2)));
    }
    out.push_str(&format!(
        "\ntotal {} parameters, {} trainable\n",
        thousands(c.total_params()),
        thousands(c.trainable_params())
    ));
    out
}

pub fn json(c: &Checked) -> serde_json::Value {
    let sig = |sigs: &[super::Signature]| -> Vec<serde_json::Value> {
        sigs.iter()
            .map(|s| {
                let dims: Vec<serde_json::Value> = s.ty.dims.iter().map(|d| d.as_const().map_or_else(|| json!(d.to_string()), |v| json!(v))).collect();
                json!({"name": s.name, "shape": dims, "dtype": s.ty.dtype.as_str(), "optional": s.optional, "text": shape_text(&s.ty.dims)})
            })
            .collect()
    };
    let settings = |s: &[(String, super::value::Value)]| -> serde_json::Map<String, serde_json::Value> {
        s.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()
    };
    json!({
        "model": c.model,
        "hyperparameters": settings(&c.hparams),
        "inputs": sig(&c.inputs),
        "outputs": sig(&c.outputs),
        "targets": sig(&c.targets),
        "train": settings(&c.train),
        "infer": settings(&c.infer),
        "parameters": c.params.iter().map(|p| json!({
            "name": p.name,
            "shape": p.shape,
            "count": p.count(),
            "trainable": p.trainable,
            "buffer": p.buffer,
            "dtype": p.dtype.as_str(),
        })).collect::<Vec<_>>(),
        "params": c.total_params(),
        "trainable": c.trainable_params(),
    })
}
