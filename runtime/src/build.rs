//! `modelc build`: one self-contained executable per spec. It is this very
//! binary (compiler, runtime and standard library) with the spec's files,
//! config and `--set` values appended after a trailer, so it works after
//! `cargo clean` and anywhere it is copied. At start-up the binary looks for
//! the trailer and, when it is there, acts as the model's own command line
//! (`./NAME train …`, `./NAME infer …`), taking no spec argument.

use crate::model::error;
use modelc::cli::{Embedded, ModelArgs, load};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const CODE: &str = "E0704";
/// Ends every built binary: payload length (u64, little-endian), then this.
const MAGIC: &[u8; 8] = b"MODELC\x01\x00";

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The executable to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

pub fn run(args: &BuildArgs) -> ExitCode {
    crate::model::exit(build(args))
}

fn build(args: &BuildArgs) -> Result<(), ExitCode> {
    let Some(spec) = &args.model.spec else {
        return Err(error(CODE, "name the spec to build, e.g. `modelc build specs/tiny-gpt.model -o tiny-gpt`"));
    };
    let (program, opts) = load(&args.model)?;
    let checked = modelc::check::check(&program, &opts).map_err(|d| modelc::cli::fail(&program.sources, &d))?;
    let config = match &args.model.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error(CODE, format!("cannot read {}: {e}", path.display())))?;
            Some((path.display().to_string(), text))
        }
        None => None,
    };
    let entry = spec.canonicalize().map_err(|e| error(CODE, format!("cannot read {}: {e}", spec.display())))?;
    let payload = Embedded { entry, files: program.bundle(), config, sets: args.model.sets.clone() };
    let payload = serde_json::to_vec(&payload.to_json()).expect("JSON of strings");
    let exe = std::env::current_exe().map_err(|e| error(CODE, format!("cannot find the modelc executable: {e}")))?;
    let mut binary = std::fs::read(&exe).map_err(|e| error(CODE, format!("cannot read {}: {e}", exe.display())))?;
    binary.truncate(binary.len() - trailer_len(&binary));
    binary.extend_from_slice(&payload);
    binary.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    binary.extend_from_slice(MAGIC);
    write_executable(&args.output, &binary).map_err(|e| error(CODE, e))?;
    eprintln!(
        "built {} ({}, {} parameters): try `{} --help`",
        args.output.display(),
        checked.model,
        modelc::check::report::thousands(checked.params.iter().map(|p| p.count()).sum::<i64>()),
        shown(&args.output)
    );
    Ok(())
}

/// `./name` for a file in the current folder, so the hint can be pasted.
fn shown(path: &Path) -> String {
    if path.components().count() == 1 { format!("./{}", path.display()) } else { path.display().to_string() }
}

/// Bytes of payload and trailer at the end of `binary` (0 for plain modelc).
fn trailer_len(binary: &[u8]) -> usize {
    let n = binary.len();
    if n < 16 || &binary[n - 8..] != MAGIC {
        return 0;
    }
    let len = u64::from_le_bytes(binary[n - 16..n - 8].try_into().expect("8 bytes")) as usize;
    if len + 16 > n { 0 } else { len + 16 }
}

fn write_executable(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp-build");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot make {} executable: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The spec built into this executable, if it is a built binary.
pub fn embedded() -> Option<Embedded> {
    let mut f = std::fs::File::open(std::env::current_exe().ok()?).ok()?;
    let end = f.seek(SeekFrom::End(0)).ok()?;
    if end < 16 {
        return None;
    }
    let mut tail = [0u8; 16];
    f.seek(SeekFrom::End(-16)).ok()?;
    f.read_exact(&mut tail).ok()?;
    if &tail[8..] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(tail[..8].try_into().ok()?);
    if len + 16 > end {
        return None;
    }
    let mut payload = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(end - 16 - len)).ok()?;
    f.read_exact(&mut payload).ok()?;
    Embedded::from_json(&serde_json::from_slice(&payload).ok()?)
}
