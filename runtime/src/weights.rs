//! Weights: initialisation from the spec's initialisers, and safetensors
//! files with the model's own weight names, written atomically.

use crate::cpu::Tensor;
use modelc::check::ParamInfo;
use modelc::check::value::Init;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::borrow::Cow;
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
pub fn init(params: &[ParamInfo], rng: &mut Rng) -> Tensors {
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

/// [`save`] with string metadata in the file's header. A packed weight
/// (`modelc quantize`) is written as its arrays, `NAME::halves` (bf16),
/// `NAME::quants` (u8) and `NAME::scales` (f16), described under the
/// `modelc.packed` metadata key; its f32 values too, as `NAME`, where it
/// still has them (a weight also read another way, such as tied embeddings).
/// The tensors are borrowed, by name, so that a part of a map (a training
/// state's weights) is written without copying it.
pub fn save_with<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), String> {
    let mut tensors: Vec<(&String, &Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    // (name, dtype, shape, bytes) of each tensor written.
    type Encoded<'a> = (String, Dtype, Vec<usize>, Cow<'a, [u8]>);
    let mut bytes: Vec<Encoded> = Vec::new();
    let mut packed = serde_json::Map::new();
    let halves_of = |v: &[u16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
    for (n, t) in tensors {
        if let Some(p) = &t.packed {
            let (halves, quants, scales) = p.parts();
            let rows = |len: usize| vec![p.n, len / p.n.max(1)];
            for (part, dtype, data) in [
                ("halves", Dtype::BF16, halves_of(halves)),
                ("quants", Dtype::U8, quants.to_vec()),
                ("scales", Dtype::F16, halves_of(scales)),
            ] {
                let len = if dtype == Dtype::U8 { data.len() } else { data.len() / 2 };
                if len > 0 {
                    bytes.push((format!("{n}{PACKED_PART}{part}"), dtype, rows(len), Cow::Owned(data)));
                }
            }
            packed.insert(
                n.clone(),
                serde_json::json!({
                    "format": p.format.name(), "n": p.n, "k": p.k, "transposed": p.transposed, "shape": t.shape,
                }),
            );
            if t.data.is_empty() {
                continue;
            }
        }
        bytes.push((n.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    let mut metadata = metadata.unwrap_or_default();
    if !packed.is_empty() {
        metadata.insert(PACKED_KEY.into(), serde_json::Value::Object(packed).to_string());
    }
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let views = bytes
        .iter()
        .map(|(n, dtype, shape, b)| TensorView::new(*dtype, shape.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
    let tmp = path.with_extension("safetensors.tmp");
    let written = safetensors::tensor::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
        .and_then(|()| commit(&tmp, path));
    if written.is_err() {
        // A full disk: leave no half-written file taking the space.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Values as the little-endian bytes safetensors stores: the values' own
/// memory where the host is little-endian (a training state is written
/// without a second copy of it: GPT-2's is 1.5 GB).
fn f32_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte is a valid u8; the slice covers the values exactly.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) })
    } else {
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// The metadata key that describes a file's packed weights.
const PACKED_KEY: &str = "modelc.packed";
/// Between a packed weight's name and its part's (`NAME::quants`).
const PACKED_PART: &str = "::";

/// The packed weights a safetensors file holds (see [`save_with`]), by name.
fn packed_weights(st: &SafeTensors, metadata: Option<&HashMap<String, String>>) -> Result<Tensors, String> {
    let Some(text) = metadata.and_then(|m| m.get(PACKED_KEY)) else { return Ok(Tensors::new()) };
    let described: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("its `{PACKED_KEY}` metadata is not a JSON object: {e}"))?;
    let mut out = Tensors::new();
    for (name, d) in described {
        let bad = |why: String| format!("packed weight `{name}`: {why}");
        let format = crate::cpu::packed::Format::parse(d["format"].as_str().unwrap_or("?")).map_err(bad)?;
        let size = |key: &str| d[key].as_u64().map(|v| v as usize).ok_or_else(|| bad(format!("no `{key}`")));
        let (n, k) = (size("n")?, size("k")?);
        let shape: Vec<usize> = d["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
            .ok_or_else(|| bad("no `shape`".into()))?;
        let part = |part: &str| -> Result<Vec<u8>, String> {
            match st.tensor(&format!("{name}{PACKED_PART}{part}")) {
                Ok(view) => Ok(view.data().to_vec()),
                Err(_) => Ok(Vec::new()),
            }
        };
        let halves = |b: Vec<u8>| b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<u16>>();
        let p = crate::cpu::packed::Packed::from_parts(
            format,
            (n, k),
            d["transposed"].as_bool().unwrap_or(false),
            (halves(part("halves")?), part("quants")?, halves(part("scales")?)),
        )
        .map_err(bad)?;
        if shape.iter().product::<usize>() != n * k {
            return Err(bad(format!("shape {shape:?} does not hold {n} x {k}")));
        }
        let data = match st.tensor(&name) {
            Ok(view) => to_f32(&view).map_err(bad)?,
            Err(_) => Vec::new(),
        };
        out.insert(name, Tensor { shape, data, packed: Some(std::sync::Arc::new(p)), halves: Vec::new() });
    }
    Ok(out)
}

/// Moves a fully written `tmp` over `path`: its bytes reach the disk first
/// (so a power cut cannot leave `path` empty), then the rename, then the
/// folder's entry.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(fail)?;
    std::fs::rename(tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Reads the weights `params` names from a checkpoint: one safetensors
/// file, a sharded checkpoint's `model.safetensors.index.json`, or a folder
/// holding either. Tensors may be f32, f16 or bf16 on disk. As in
/// Hugging Face's loader, a checkpoint saved from the base model (names
/// without the first component, e.g. `h.0...` for `transformer.h.0...`) loads
/// too, and non-persistent buffers older versions saved are ignored. Every
/// missing, unexpected, misshaped or mistyped tensor is listed by name.
pub fn load(path: &Path, params: &[ParamInfo]) -> Result<Tensors, String> {
    load_names(path, params, &|name| {
        [Some(name.to_string()), name.split_once('.').map(|(_, rest)| rest.to_string())].into_iter().flatten().collect()
    })
}

/// Refuses weights `modelc quantize` packed where f32 values are needed
/// (training, merging): their f32 values are gone.
pub fn unpacked(weights: Tensors, task: &str) -> Result<Tensors, String> {
    match weights.iter().filter(|(_, t)| t.packed.is_some()).map(|(k, _)| k).min() {
        Some(name) => Err(format!(
            "the weights are packed by `modelc quantize` (`{name}` and others), which {task} cannot use; \
             give the f32 checkpoint"
        )),
        None => Ok(weights),
    }
}

/// Whether a weight belongs to a LoRA/DoRA adapter rather than the base model.
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_")
}

/// A possibly adapted model's weights: the base ones from `base`, and the
/// adapter's from a PEFT folder (`adapter_model.safetensors`, names prefixed
/// `base_model.model.`) when one is given; without it, all from `base`.
pub fn load_model(base: &Path, adapter: Option<&Path>, params: &[ParamInfo]) -> Result<Tensors, String> {
    let Some(dir) = adapter else { return load(base, params) };
    let (lora, plain): (Vec<ParamInfo>, Vec<ParamInfo>) = params.iter().cloned().partition(|p| is_adapter(&p.name));
    let mut weights = load(base, &plain)?;
    let file = dir.join("adapter_model.safetensors");
    weights.extend(load_names(&file, &lora, &|name| vec![format!("{}{name}", modelc::peft::PREFIX)])?);
    Ok(weights)
}

/// Writes the adapter weights of `weights` as PEFT does, with its config.
pub fn save_adapter(
    dir: &Path,
    weights: &Tensors,
    config: &modelc::peft::AdapterConfig,
    task: &str,
) -> Result<(), String> {
    let tensors: Tensors = weights
        .iter()
        .filter(|(k, _)| is_adapter(k) && !modelc::ir::signature::Role::of(k).is_optimizer_state())
        .map(|(k, v)| (format!("{}{k}", modelc::peft::PREFIX), v.clone()))
        .collect();
    save(&dir.join("adapter_model.safetensors"), &tensors)?;
    let text = serde_json::to_string_pretty(&config.to_json(task)).expect("JSON") + "\n";
    let path = dir.join("adapter_config.json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads `params` from a checkpoint, each under the first of `names(param)` it holds.
fn load_names(path: &Path, params: &[ParamInfo], names: &dyn Fn(&str) -> Vec<String>) -> Result<Tensors, String> {
    let files = checkpoint_files(path)?;
    let mut on_disk: HashMap<String, (usize, Vec<usize>)> = HashMap::new();
    let mut blobs = Vec::new();
    // Weights `modelc quantize` wrote packed: used as they are.
    let mut packed = Tensors::new();
    for (i, file) in files.iter().enumerate() {
        let bytes = map(file)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{} is not a safetensors file: {e}", file.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        let here = packed_weights(&st, header.metadata().as_ref()).map_err(|e| format!("{}: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            if !name.contains(PACKED_PART) {
                on_disk.insert(name, (i, view.shape().to_vec()));
            }
        }
        for (name, t) in &here {
            on_disk.insert(name.clone(), (i, t.shape.clone()));
        }
        packed.extend(here);
        blobs.push(bytes);
    }
    let mut out = HashMap::new();
    let mut used = std::collections::HashSet::new();
    let mut problems = Vec::new();
    for p in params {
        let want: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
        let stored = names(&p.name).into_iter().find(|n| on_disk.contains_key(n));
        let Some(stored) = stored else {
            problems.push(format!("missing tensor `{}` {want:?}", p.name));
            continue;
        };
        used.insert(stored.clone());
        let (file, shape) = &on_disk[&stored];
        if *shape != want {
            problems.push(format!("tensor `{}` has shape {shape:?}, expected {want:?}", p.name));
            continue;
        }
        if let Some(t) = packed.remove(&stored) {
            out.insert(p.name.clone(), t);
            continue;
        }
        let st = SafeTensors::deserialize(&blobs[*file]).expect("parsed above");
        let view = st.tensor(&stored).expect("listed above");
        let float_on_disk = matches!(view.dtype(), Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16);
        if p.dtype == modelc::types::DType::F32 && !float_on_disk {
            // Integers read as weights would be a quantised checkpoint's codes, silently wrong.
            problems.push(format!(
                "tensor `{}` holds {:?} values, but the spec's weight is f32 (f32, f16, bf16 or f64 on disk; \
                 a quantised checkpoint must be dequantised first)",
                p.name,
                view.dtype()
            ));
            continue;
        }
        match to_f32(&view) {
            Ok(data) => {
                out.insert(p.name.clone(), Tensor::new(want, data));
            }
            Err(e) => problems.push(format!("tensor `{}` {e}", p.name)),
        }
        release(&blobs[*file], view.data());
    }
    for name in on_disk.keys() {
        if !used.contains(name) && !is_buffer(name) {
            problems.push(format!("unexpected tensor `{name}`"));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort();
        let count = |what: &str| problems.iter().filter(|p| p.contains(what)).count();
        let summary = format!(
            "{} missing, {} misshaped or mistyped, {} unexpected",
            count("missing tensor"),
            problems.len() - count("missing tensor") - count("unexpected tensor"),
            count("unexpected tensor")
        );
        const SHOWN: usize = 12;
        if problems.len() > SHOWN {
            let more = problems.len() - SHOWN;
            problems.truncate(SHOWN);
            problems.push(format!("... and {more} more"));
        }
        Err(format!("{} does not fit the model ({summary}):\n  {}", path.display(), problems.join("\n  ")))
    }
}

/// The tensors of a checkpoint that loading `params` ignores: buffers
/// (`is_buffer`) the model does not declare. Reads only the files' headers.
pub fn ignored_buffers(path: &Path, params: &[ParamInfo]) -> Result<Vec<String>, String> {
    use std::io::Read;
    let mut ignored = Vec::new();
    for file in checkpoint_files(path)? {
        let fail = |e: String| format!("cannot read {}: {e}", file.display());
        let mut f = std::fs::File::open(&file).map_err(|e| fail(e.to_string()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| fail(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(fail(format!("its header claims {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).map_err(|e| fail(e.to_string()))?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| fail(e.to_string()))?;
        let names = header.as_object().into_iter().flat_map(|m| m.keys());
        ignored.extend(
            names
                .filter(|n| {
                    let loads =
                        |p: &ParamInfo| p.name == **n || p.name.split_once('.').is_some_and(|(_, rest)| rest == *n);
                    is_buffer(n) && !params.iter().any(loads)
                })
                .cloned(),
        );
    }
    ignored.sort();
    Ok(ignored)
}

/// Buffers that older transformers versions saved with the weights: the
/// causal mask of GPT-2 attention and the RoPE inverse frequencies.
/// Buffers `transformers` keeps out of a model's weights when it loads a
/// checkpoint that has them (older versions saved them): causal-mask and
/// rotary caches, position and token-type ids. A spec that declares one
/// loads it; otherwise it is ignored, as `from_pretrained` ignores it.
fn is_buffer(name: &str) -> bool {
    [".attn.bias", ".attn.masked_bias", "position_ids", "embeddings.token_type_ids"].iter().any(|b| name.ends_with(b))
        || ["rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"].iter().any(|b| name.ends_with(b))
}

/// The safetensors files of a checkpoint: the file itself, or every shard an
/// index names, or what a folder holds.
pub fn checkpoint_files(path: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    if path.is_dir() {
        for name in ["model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"] {
            if path.join(name).exists() {
                return checkpoint_files(&path.join(name));
            }
        }
        return Err(format!("{} holds no model.safetensors or model.safetensors.index.json", path.display()));
    }
    if !path.to_string_lossy().ends_with(".json") {
        return Ok(vec![path.to_path_buf()]);
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(format!("{} has no `weight_map` object", path.display()));
    };
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// A tensor's elements as f32, whatever its dtype on disk (integers are
/// exact up to 2^24, which covers token ids and masks).
pub fn to_f32(view: &TensorView) -> Result<Vec<f32>, String> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        Dtype::BF16 => {
            d.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
        }
        Dtype::F16 => d.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        Dtype::I32 => d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        Dtype::I16 => d.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f32).collect(),
        Dtype::I8 => d.iter().map(|b| *b as i8 as f32).collect(),
        Dtype::U8 | Dtype::BOOL => d.iter().map(|b| *b as f32).collect(),
        other => return Err(format!("is {other:?}; f32, f16, bf16 and integer tensors are supported")),
    })
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

/// A safetensors file mapped into memory, read as its tensors are
/// converted: with `release`, loading holds the converted weights and one
/// tensor's bytes, not the whole file besides (a GPT-2 training run's
/// start peaked at 1.5 GB for 0.5 GB of weights when the file was read whole).
fn map(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // SAFETY: the map is only read. modelc replaces a checkpoint by renaming
    // a new file over it, which leaves the mapped one whole.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Gives back the pages of `data`, a tensor's bytes in `map` already
/// converted: read again from the file should anything touch them.
fn release(map: &memmap2::Mmap, data: &[u8]) {
    let offset = data.as_ptr() as usize - map.as_ptr() as usize;
    // SAFETY: a read-only map of a file: dropped pages hold nothing the file does not.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
}

/// Tensors by name.
pub type Tensors = HashMap<String, Tensor>;

/// Every tensor of a safetensors file and its metadata (a training state).
pub fn load_all(path: &Path) -> Result<(Tensors, HashMap<String, String>), String> {
    let bytes = map(path)?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let data = to_f32(&view).map_err(|e| format!("{}: tensor `{name}` {e}", path.display()))?;
        release(&bytes, view.data());
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok((out, header.metadata().clone().unwrap_or_default()))
}
