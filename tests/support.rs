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
