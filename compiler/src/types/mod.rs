//! The vocabulary every stage shares, at the bottom of the crate (it
//! imports nothing else of modelc): symbolic dimensions (`Dim`), tensor
//! types (`TensorTy`: an element type and a shape) and broadcasting, element
//! types (`DType`), and sizes bound to numbers (`Sizes`, `eval_dim`).

mod dim;
mod tensor;

pub use dim::Dim;
pub use tensor::{TensorTy, broadcast, normalize_axis, shape_text};

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Int,
    Bool,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Int => "int",
            DType::Bool => "bool",
        }
    }
}

/// Values of the named sizes (`B`, `T`, ...) a program runs at.
pub type Sizes = HashMap<String, i64>;

pub fn eval_dim(d: &Dim, sizes: &Sizes) -> Result<usize, String> {
    let v = d.substitute(&|s| sizes.get(s).map(|v| Dim::constant(*v)));
    match v.as_const() {
        Some(n) if n >= 0 => Ok(n as usize),
        Some(n) => Err(format!("size {d} is negative ({n})")),
        None => Err(format!("size {d} is not known: {} is not bound by any input", v.symbols().next().unwrap_or("?"))),
    }
}

/// Row-major strides of `shape`, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Binds symbolic sizes by matching a declared shape against an actual one.
pub fn bind_sizes(name: &str, dims: &[Dim], shape: &[usize], sizes: &mut Sizes) -> Result<(), String> {
    if dims.len() != shape.len() {
        return Err(format!("`{name}` has {} axes {shape:?}, expected {}", shape.len(), shape_text(dims)));
    }
    for (d, &n) in dims.iter().zip(shape) {
        let syms: Vec<&str> = d.symbols().collect();
        if syms.len() == 1 && *d == Dim::symbol(syms[0]) && !sizes.contains_key(syms[0]) {
            sizes.insert(syms[0].to_string(), n as i64);
        }
    }
    for (i, (d, &n)) in dims.iter().zip(shape).enumerate() {
        let want = eval_dim(d, sizes)?;
        if want != n {
            return Err(format!("`{name}` has shape {shape:?}, but axis {i} should be {d} = {want}"));
        }
    }
    Ok(())
}
