//! The `modelc` command line: argument parsing and the commands, which print
//! what the library returns and turn diagnostics into a non-zero exit.

use crate::check::{self, Options, Program, report};
use crate::diag::{Diagnostic, render};
use crate::source::SourceMap;
use crate::syntax::{dump_module, parse, print_module};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "modelc", version, about = "Compile neural networks written as .model specs", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// The .model spec.
    spec: PathBuf,
    /// A Hugging Face config.json whose keys set the hyperparameters (see the model's `from hf(...)`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Set a hyperparameter, e.g. `--set layers=2` (repeatable; applied after --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec: names, types and every shape; print hyperparameters and the parameter table.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON (the total parameter count is under "params").
        #[arg(long)]
        json: bool,
    },
    /// Rewrite .model files in canonical form.
    Fmt {
        /// Files to format.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only report files that are not formatted; exit 1 if any.
        #[arg(long)]
        check: bool,
    },
    /// Print the syntax tree of a file.
    Ast {
        /// The .model file.
        file: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { model, json } => cmd_check(&model, json),
        Command::Fmt { files, check } => cmd_fmt(&files, check),
        Command::Ast { file } => cmd_ast(&file),
    }
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn fail(sources: &SourceMap, diags: &[Diagnostic]) -> ExitCode {
    eprint!("{}", render(sources, diags, color()));
    let n = diags.len();
    eprintln!("error: {n} problem{} found", if n == 1 { "" } else { "s" });
    ExitCode::FAILURE
}

/// Loads and checks the model named by the command-line arguments.
fn load_and_check(args: &ModelArgs) -> Result<(Program, check::Checked), ExitCode> {
    let program = check::load_file(&args.spec).map_err(|(sources, diags)| fail(&sources, &diags))?;
    let mut opts = Options::default();
    if let Some(path) = &args.config {
        let name = path.display().to_string();
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {name}: {e}"))
            .and_then(|text| serde_json::from_str(&text).map_err(|e| format!("{name} is not valid JSON: {e}")));
        match parsed {
            Ok(json) => opts.config = Some((json, name)),
            Err(msg) => return Err(fail(&program.sources, &[Diagnostic::new("E0501", msg)])),
        }
    }
    for set in &args.sets {
        let Some((k, v)) = set.split_once('=') else {
            let d = Diagnostic::new("E0502", format!("--set {set}: expected KEY=VALUE"))
                .help("for example `--set layers=2`");
            return Err(fail(&program.sources, &[d]));
        };
        opts.sets.push((k.trim().to_string(), v.to_string()));
    }
    match check::check(&program, &opts) {
        Ok(checked) => Ok((program, checked)),
        Err(diags) => Err(fail(&program.sources, &diags)),
    }
}

fn cmd_check(args: &ModelArgs, json: bool) -> ExitCode {
    let (_, checked) = match load_and_check(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report::json(&checked)).expect("JSON of plain values"));
    } else {
        print!("{}", report::text(&checked));
    }
    ExitCode::SUCCESS
}

fn read(path: &Path, sources: &mut SourceMap) -> Result<crate::source::FileId, ExitCode> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(sources.add(path.display().to_string(), Some(path.to_path_buf()), text)),
        Err(e) => Err(fail(sources, &[Diagnostic::new("E0100", format!("cannot read {}: {e}", path.display()))])),
    }
}

fn cmd_fmt(files: &[PathBuf], check_only: bool) -> ExitCode {
    let mut sources = SourceMap::new();
    let mut diags = Vec::new();
    let mut unformatted = 0;
    for path in files {
        let file = match read(path, &mut sources) {
            Ok(f) => f,
            Err(code) => return code,
        };
        let text = sources.file(file).text.clone();
        let (module, errors) = parse(file, &text);
        let Some(module) = module else {
            diags.extend(errors);
            continue;
        };
        let formatted = print_module(&module);
        if formatted == text {
            continue;
        }
        if check_only {
            println!("{} is not formatted", path.display());
            unformatted += 1;
        } else if let Err(e) = write_atomic(path, &formatted) {
            let d = Diagnostic::new("E0100", format!("cannot write {}: {e}", path.display()));
            diags.push(d);
        }
    }
    if !diags.is_empty() {
        return fail(&sources, &diags);
    }
    if unformatted > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Writes through a temporary file and a rename, so a crash leaves the old file.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("model.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn cmd_ast(path: &Path) -> ExitCode {
    let mut sources = SourceMap::new();
    let file = match read(path, &mut sources) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let text = sources.file(file).text.clone();
    match parse(file, &text) {
        (Some(module), _) => {
            print!("{}", dump_module(&module));
            ExitCode::SUCCESS
        }
        (None, errors) => fail(&sources, &errors),
    }
}
