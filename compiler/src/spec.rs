//! The library's front door: a spec as a command names it (a file, or the
//! files a built binary carries), adapted by a PEFT folder, with
//! hyperparameters from a `config.json` and `KEY=VALUE` settings; loaded and
//! checked. Problems come back as diagnostics together with the sources they
//! point into; nothing here prints or exits.

use crate::check::{self, Checked, Options, Program, load::Bundle};
use crate::diag::Diagnostic;
use crate::source::SourceMap;
use std::path::PathBuf;

/// Diagnostics and the sources their spans point into.
pub type Failure = (SourceMap, Vec<Diagnostic>);

/// Where the spec's text comes from.
#[derive(Clone, Debug)]
pub enum Entry {
    /// A `.model` file on disk; its imports are read relative to it.
    File(PathBuf),
    /// Files held in memory by path (what `modelc build` puts in a binary).
    Bundle { entry: PathBuf, files: Bundle },
}

/// A `config.json` to read, or one already read (by the name messages use).
#[derive(Clone, Debug)]
pub enum Config {
    File(PathBuf),
    Text { name: String, text: String },
}

/// Everything that decides which model a command works on.
#[derive(Clone, Debug)]
pub struct Spec {
    pub entry: Entry,
    /// A PEFT adapter folder whose `adapter_config.json` adapts the model.
    pub adapter: Option<PathBuf>,
    pub config: Option<Config>,
    /// `KEY=VALUE` hyperparameter settings, applied after the config in order.
    pub sets: Vec<String>,
}

impl Spec {
    /// The spec in `path`, as it is.
    pub fn file(path: impl Into<PathBuf>) -> Spec {
        Spec { entry: Entry::File(path.into()), adapter: None, config: None, sets: Vec::new() }
    }

    /// Reads the spec's files (and the adapter's settings) and the checker's options.
    pub fn load(&self) -> Result<(Program, Options), Failure> {
        let program = match &self.entry {
            Entry::File(path) => check::load_file(path),
            Entry::Bundle { entry, files } => check::load::load_bundle(entry, files.clone()),
        }?;
        let program = match &self.adapter {
            Some(dir) => self.adapted(program, dir)?,
            None => program,
        };
        match options(self.config.as_ref(), &self.sets) {
            Ok(opts) => Ok((program, opts)),
            Err(d) => Err((program.sources, vec![d])),
        }
    }

    /// Loads and checks the spec's model.
    pub fn check(&self) -> Result<(Program, Checked), Failure> {
        let (program, opts) = self.load()?;
        match check::check(&program, &opts) {
            Ok(checked) => Ok((program, checked)),
            Err(diags) => Err((program.sources, diags)),
        }
    }

    /// The program's model adapted as `DIR/adapter_config.json` says: a
    /// generated spec beside the entry file that imports it and adapts it.
    fn adapted(&self, program: Program, dir: &std::path::Path) -> Result<Program, Failure> {
        let fail = |sources, message: String| Err((sources, vec![Diagnostic::new("E0503", message)]));
        let config = match crate::peft::AdapterConfig::read(dir) {
            Ok(c) => c,
            Err(e) => return fail(program.sources, e),
        };
        let Some(model) = program.entry_model().map(|m| program.item_name(m).to_string()) else {
            return fail(program.sources, "--adapter needs a spec with a model".into());
        };
        let entry = match &self.entry {
            Entry::File(path) | Entry::Bundle { entry: path, .. } => path,
        };
        let file = entry.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let text = config.spec(&model, &file);
        // A file name beside the spec, so that its relative import resolves.
        let name = "adapter.model";
        match &self.entry {
            Entry::Bundle { files, .. } => {
                let path = entry.with_file_name(name);
                let mut files = files.clone();
                files.insert(path.clone(), text);
                check::load::load_bundle(&path, files)
            }
            Entry::File(_) => check::load::load_source(name, &text, entry.parent()),
        }
    }
}

/// A config and `KEY=VALUE` settings as checker options.
pub fn options(config: Option<&Config>, sets: &[String]) -> Result<Options, Diagnostic> {
    let mut opts = Options::default();
    if let Some(config) = config {
        let (name, text) = match config {
            Config::File(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Diagnostic::new("E0501", format!("cannot read {name}: {e}")))?;
                (name, text)
            }
            Config::Text { name, text } => (name.clone(), text.clone()),
        };
        let json = serde_json::from_str(&text)
            .map_err(|e| Diagnostic::new("E0501", format!("{name} is not valid JSON: {e}")))?;
        opts.config = Some((json, name));
    }
    for set in sets {
        let Some((k, v)) = set.split_once('=') else {
            return Err(Diagnostic::new("E0502", format!("--set {set}: expected KEY=VALUE"))
                .help("for example `--set layers=2`"));
        };
        opts.sets.push((k.trim().to_string(), v.to_string()));
    }
    Ok(opts)
}
