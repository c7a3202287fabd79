//! Tensor types (element type + symbolic shape) and broadcasting.

use super::{DType, Dim};
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TensorTy {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorTy {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorTy {
        TensorTy { dtype, dims }
    }

    pub fn scalar(dtype: DType) -> TensorTy {
        TensorTy { dtype, dims: Vec::new() }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorTy {
        TensorTy { dtype, dims: self.dims.clone() }
    }

    /// Resolves a possibly negative axis; `None` when out of range.
    pub fn axis(&self, axis: i64) -> Option<usize> {
        normalize_axis(axis, self.rank())
    }

    /// Total element count when every dimension is known.
    pub fn numel(&self) -> Option<i64> {
        self.dims.iter().try_fold(1i64, |acc, d| d.as_const().and_then(|v| acc.checked_mul(v)))
    }
}

pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Writes a shape as `[B, T, 768]`.
pub fn shape_text(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl fmt::Display for TensorTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shape_text(&self.dims))?;
        if self.dtype != DType::F32 {
            write!(f, " {}", self.dtype.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for TensorTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// NumPy broadcasting of two shapes; on failure, the first pair of axes
/// (counted from the left of the result) that disagree.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, (Dim, Dim)> {
    let n = a.len().max(b.len());
    let one = Dim::constant(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = (i + a.len()).checked_sub(n).map(|j| &a[j]).unwrap_or(&one);
        let db = (i + b.len()).checked_sub(n).map(|j| &b[j]).unwrap_or(&one);
        out.push(if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err((da.clone(), db.clone()));
        });
    }
    Ok(out)
}
