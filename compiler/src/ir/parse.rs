//! The IR's text form back into a [`Graph`]: the inverse of `print.rs`, so
//! IR can be written by hand in tests and round-trips exactly.

use super::graph::*;
use crate::types::DType;
use crate::types::Dim;
use crate::types::TensorTy;

/// Parses printed IR; the error names the line.
pub fn parse(text: &str) -> Result<Graph, String> {
    let mut g = Graph::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |m: &str| format!("line {}: {m}: {line}", n + 1);
        if let Some(rest) = line.strip_prefix("output ") {
            let (name, id) = rest.split_once(" = ").ok_or_else(|| err("expected `output NAME = %ID`"))?;
            g.outputs.push((name.to_string(), node_ref(id, g.nodes.len()).map_err(|e| err(&e))?));
            continue;
        }
        let (lhs, rhs) = line.split_once(" = ").ok_or_else(|| err("expected `%ID = ...`"))?;
        if lhs != format!("%{}", g.nodes.len()) {
            return Err(err(&format!("expected node %{}", g.nodes.len())));
        }
        let (op_text, ty_text) = rhs.rsplit_once(" : ").ok_or_else(|| err("expected ` : TYPE`"))?;
        let ty = tensor_type(ty_text).map_err(|e| err(&e))?;
        // Arguments are the trailing `%n` tokens.
        let mut words: Vec<&str> = op_text.split(' ').collect();
        let mut args = Vec::new();
        while let Some(last) = words.last() {
            if !last.starts_with('%') {
                break;
            }
            args.insert(0, node_ref(last.trim_end_matches(','), g.nodes.len()).map_err(|e| err(&e))?);
            words.pop();
        }
        let op = op(&words.join(" ")).map_err(|e| err(&e))?;
        g.nodes.push(Node { op, args, ty, origin: None });
    }
    Ok(g)
}

fn node_ref(s: &str, len: usize) -> Result<NodeId, String> {
    let n: u32 = s.strip_prefix('%').and_then(|v| v.parse().ok()).ok_or(format!("`{s}` is not a node"))?;
    if n as usize >= len {
        return Err(format!("{s} is used before it is defined"));
    }
    Ok(NodeId(n))
}

fn op(text: &str) -> Result<Op, String> {
    let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
    let quoted =
        || rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')).map(str::to_string).ok_or("expected a quoted name");
    let axes = || -> Result<Vec<usize>, String> {
        let inner = rest.trim().strip_prefix('[').and_then(|r| r.strip_suffix(']')).ok_or("expected [axes]")?;
        inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| format!("bad axis `{s}`")))
            .collect()
    };
    let num = |s: &str| -> Result<usize, String> { s.trim().parse().map_err(|_| format!("bad number `{s}`")) };
    if let Some(u) = Unary::from_name(head) {
        return Ok(Op::Unary(u));
    }
    if let Some(b) = Binary::from_name(head) {
        return Ok(Op::Binary(b));
    }
    match head {
        "input" => Ok(Op::Input(quoted()?)),
        "param" => Ok(Op::Param(quoted()?)),
        "const" => rest.trim().parse().map(Op::Const).map_err(|_| format!("bad constant `{rest}`")),
        "size" => Ok(Op::Size(dim(rest)?)),
        "iota" => Ok(Op::Iota),
        "select" => Ok(Op::Select),
        "cast" => Ok(Op::Cast(dtype(rest.trim())?)),
        "reduce_sum" => Ok(Op::Reduce(Reduce::Sum, axes()?)),
        "reduce_max" => Ok(Op::Reduce(Reduce::Max, axes()?)),
        "reduce_min" => Ok(Op::Reduce(Reduce::Min, axes()?)),
        "argmax" => Ok(Op::ArgMax(num(rest)?)),
        "matmul" => Ok(Op::MatMul { ta: rest.split(' ').any(|w| w == "ta"), tb: rest.split(' ').any(|w| w == "tb") }),
        "reshape" => Ok(Op::Reshape),
        "permute" => Ok(Op::Permute(axes()?)),
        "broadcast" => Ok(Op::Broadcast),
        "slice" => {
            let (axis, range) = rest.split_once(' ').ok_or("expected `slice AXIS START:END`")?;
            let (start, end) = range.split_once(':').ok_or("expected START:END")?;
            Ok(Op::Slice { axis: num(axis)?, start: dim(start)?, end: dim(end)? })
        }
        "concat" => Ok(Op::Concat(num(rest)?)),
        "gather" => Ok(Op::Gather),
        "scatter_add" => Ok(Op::ScatterAdd),
        "one_hot" => Ok(Op::OneHot),
        "topk_values" => Ok(Op::TopKValues(num(rest)?)),
        "topk_indices" => Ok(Op::TopKIndices(num(rest)?)),
        "write_rows" => Ok(Op::WriteRows),
        "dropout_mask" => {
            let (p, key) = rest.split_once(" #").ok_or("expected `dropout_mask P #KEY`")?;
            Ok(Op::DropoutMask {
                p: p.parse().map_err(|_| "bad probability")?,
                key: key.parse().map_err(|_| "bad key")?,
            })
        }
        "expert_order" => Ok(Op::ExpertOrder(num(rest)?)),
        "expert_offsets" => Ok(Op::ExpertOffsets(num(rest)?)),
        "expert_matmul" => Ok(Op::ExpertMatMul { tb: rest.trim() == "tb" }),
        "expert_weight_grad" => Ok(Op::ExpertWeightGrad { tb: rest.trim() == "tb" }),
        "attention" => Ok(Op::Attention(attention(rest)?)),
        "attention_lse" => Ok(Op::AttentionBackward(attention(rest)?, AttentionPass::Lse)),
        "attention_grad" => Ok(Op::AttentionBackward(attention(rest)?, AttentionPass::Gradients)),
        "attention_values_lse" => Ok(Op::AttentionBackward(attention(rest)?, AttentionPass::ValuesAndLse)),
        other => Err(format!("unknown operation `{other}`")),
    }
}

/// `scale S [causal] [window W] [kv_heads_first]`
fn attention(rest: &str) -> Result<Attention, String> {
    let words: Vec<&str> = rest.split(' ').collect();
    let after = |w: &str| words.iter().position(|x| *x == w).and_then(|i| words.get(i + 1));
    let scale = after("scale").ok_or("expected `attention scale S [causal] [window W] [kv_heads_first]`")?;
    Ok(Attention {
        scale: scale.parse().map_err(|_| "bad scale")?,
        causal: words.contains(&"causal"),
        window: after("window").map(|w| w.parse().map_err(|_| "bad window")).transpose()?,
        kv_heads_first: words.contains(&"kv_heads_first"),
    })
}

fn dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "int" => Ok(DType::Int),
        "bool" => Ok(DType::Bool),
        other => Err(format!("unknown element type `{other}`")),
    }
}

/// `[B, T - 1, 256] int`
pub fn tensor_type(s: &str) -> Result<TensorTy, String> {
    let s = s.trim();
    let close = s.rfind(']').ok_or("expected a shape `[...]`")?;
    let inner = s.strip_prefix('[').ok_or("expected a shape `[...]`")?;
    let inner = &inner[..close - 1];
    let dims =
        if inner.trim().is_empty() { Vec::new() } else { inner.split(',').map(dim).collect::<Result<_, _>>()? };
    let rest = s[close + 1..].trim();
    let dtype = if rest.is_empty() { DType::F32 } else { dtype(rest)? };
    Ok(TensorTy::new(dtype, dims))
}

/// A dimension as `Dim` prints it: `2*B*T + T - 1`.
pub fn dim(s: &str) -> Result<Dim, String> {
    let s = s.trim();
    let mut total = Dim::constant(0);
    let mut sign = 1;
    let mut first = true;
    for tok in s.split(' ').filter(|t| !t.is_empty()) {
        match tok {
            "+" => sign = 1,
            "-" => sign = -1,
            term => {
                let (neg, term) = if first && term.starts_with('-') { (-1, &term[1..]) } else { (1, term) };
                let mut value = Dim::constant(sign * neg);
                for factor in term.split('*') {
                    let f = match factor.parse::<i64>() {
                        Ok(v) => Dim::constant(v),
                        Err(_) if !factor.is_empty() && factor.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                            Dim::symbol(factor)
                        }
                        Err(_) => return Err(format!("bad size `{s}`")),
                    };
                    value = value.mul(&f);
                }
                total = total.add(&value);
            }
        }
        first = false;
    }
    Ok(total)
}
