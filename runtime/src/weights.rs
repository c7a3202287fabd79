//! Weights: initialisation from the spec's initialisers, and safetensors
//! files with the model's own weight names, written atomically.

use crate::cpu::Tensor;
use modelc::check::ParamInfo;
use modelc::check::value::Init;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// A small, seedable generator (splitmix64), so runs repeat exactly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// Fresh weights as the spec's initialisers say.
pub fn init(params: &[ParamInfo], rng: &mut Rng) -> HashMap<String, Tensor> {
    params
        .iter()
        .map(|p| {
            let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let data = (0..n)
                .map(|_| match p.init {
                    Init::Zeros => 0.0,
                    Init::Ones => 1.0,
                    Init::Constant(v) => v as f32,
                    Init::Normal { std } => (rng.normal() * std) as f32,
                    Init::Uniform { bound } => ((rng.uniform() * 2.0 - 1.0) * bound) as f32,
                    Init::FanIn => ((rng.uniform() * 2.0 - 1.0) / fan_in.sqrt()) as f32,
                })
                .collect();
            (p.name.clone(), Tensor::new(shape, data))
        })
        .collect()
}

/// Writes tensors to a safetensors file through a temporary file and a
/// rename, so an interrupted write never leaves a broken checkpoint.
pub fn save(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
    save_with(path, tensors, None)
}

/// [`save`] with string metadata in the file's header.
pub fn save_with(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let t = &tensors[n];
                (n.clone(), t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
            })
            .collect()
    };
    let views = bytes
        .iter()
        .map(|(n, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads the weights `params` names from a safetensors file (f32, f16 or
/// bf16 on disk); every missing, unexpected or misshaped tensor is listed.
pub fn load(path: &Path, params: &[ParamInfo]) -> Result<HashMap<String, Tensor>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = HashMap::new();
    let mut problems = Vec::new();
    for p in params {
        let want: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
        let view = match file.tensor(&p.name) {
            Ok(v) => v,
            Err(_) => {
                problems.push(format!("missing tensor `{}` {want:?}", p.name));
                continue;
            }
        };
        if view.shape() != want.as_slice() {
            problems.push(format!("tensor `{}` has shape {:?}, expected {want:?}", p.name, view.shape()));
            continue;
        }
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => view.data().chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => {
                problems.push(format!("tensor `{}` is {other:?}; f32, f16 and bf16 are supported", p.name));
                continue;
            }
        };
        out.insert(p.name.clone(), Tensor::new(want, data));
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for name in file.names() {
        if !known.contains(name) {
            problems.push(format!("unexpected tensor `{name}`"));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort();
        Err(format!("{} does not fit the model:\n  {}", path.display(), problems.join("\n  ")))
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let shift = f.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Tensors by name.
pub type Tensors = HashMap<String, Tensor>;

/// Every tensor of a safetensors file and its metadata (a training state).
pub fn load_all(path: &Path) -> Result<(Tensors, HashMap<String, String>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format!("{}: tensor `{name}` is {:?}, expected F32", path.display(), view.dtype()));
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok((out, header.metadata().clone().unwrap_or_default()))
}
