//! `modelc build`: one self-contained executable per spec. It is this very
//! binary (compiler, runtime and standard library) with the spec's files,
//! config and `--set` values appended after a trailer, so it works after
//! `cargo clean` and anywhere it is copied. At start-up the binary looks for
//! the trailer and, when it is there, acts as the model's own command line
//! (`./NAME train …`, `./NAME infer …`), taking no spec argument.

use crate::cli::{ModelArgs, load};
use crate::model::error;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const CODE: &str = "E0704";
/// Ends every built binary: the payload, its FNV-1a hash and its length
/// (u64s, little-endian), then this.
const MAGIC: &[u8; 8] = b"MODELC\x02\x00";
const TRAILER: usize = 24;

/// 64-bit FNV-1a: enough to tell a damaged payload from the one written.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A spec compiled into a binary by `modelc build`: its files, and the
/// config and `--set` values given at build time (flags at run time go on top).
#[derive(Clone, Debug)]
pub struct Embedded {
    pub entry: PathBuf,
    pub files: modelc::check::load::Bundle,
    /// The config file's name and text.
    pub config: Option<(String, String)>,
    pub sets: Vec<String>,
}

/// What a built binary passes as the spec argument: its own spec.
pub const BUILT_IN: &str = "<built-in spec>";

impl Embedded {
    pub fn to_json(&self) -> serde_json::Value {
        let files: serde_json::Map<String, serde_json::Value> =
            self.files.iter().map(|(p, t)| (p.display().to_string(), t.clone().into())).collect();
        serde_json::json!({
            "entry": self.entry.display().to_string(),
            "files": files,
            "config": self.config.as_ref().map(|(n, t)| serde_json::json!({ "name": n, "text": t })),
            "sets": self.sets,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Embedded> {
        let files = v["files"].as_object()?.iter().map(|(p, t)| Some((PathBuf::from(p), t.as_str()?.to_string())));
        Some(Embedded {
            entry: PathBuf::from(v["entry"].as_str()?),
            files: files.collect::<Option<_>>()?,
            config: v["config"]
                .as_object()
                .and_then(|c| Some((c.get("name")?.as_str()?.to_string(), c.get("text")?.as_str()?.to_string()))),
            sets: v["sets"].as_array()?.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        })
    }
}

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
    let checked = modelc::check::check(&program, &opts).map_err(|d| crate::cli::fail(&program.sources, &d))?;
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
    binary.extend_from_slice(&fnv1a(&payload).to_le_bytes());
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
    if n < TRAILER || &binary[n - 8..] != MAGIC {
        return 0;
    }
    let len = u64::from_le_bytes(binary[n - 16..n - 8].try_into().expect("8 bytes"));
    match usize::try_from(len).ok().and_then(|l| l.checked_add(TRAILER)) {
        Some(total) if total <= n => total,
        _ => 0,
    }
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

/// The spec built into this executable: `None` for plain modelc, an error
/// when the executable ends like a built one but its payload is damaged.
pub fn embedded() -> Result<Option<Embedded>, String> {
    let Some(exe) = std::env::current_exe().ok() else { return Ok(None) };
    let Ok(mut f) = std::fs::File::open(&exe) else { return Ok(None) };
    let damaged = |why: &str| {
        format!(
            "{} is a model built by modelc, but its built-in spec is damaged ({why}); build it again",
            exe.display()
        )
    };
    let io = |e: std::io::Error| damaged(&e.to_string());
    let end = f.seek(SeekFrom::End(0)).map_err(io)?;
    if end < TRAILER as u64 {
        return Ok(None);
    }
    let mut tail = [0u8; TRAILER];
    f.seek(SeekFrom::End(-(TRAILER as i64))).map_err(io)?;
    f.read_exact(&mut tail).map_err(io)?;
    if &tail[16..] != MAGIC {
        return Ok(None);
    }
    let hash = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(tail[8..16].try_into().expect("8 bytes"));
    if len.checked_add(TRAILER as u64).is_none_or(|n| n > end) {
        return Err(damaged(&format!("it says {len} bytes, longer than the file")));
    }
    let mut payload = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(end - TRAILER as u64 - len)).map_err(io)?;
    f.read_exact(&mut payload).map_err(io)?;
    if fnv1a(&payload) != hash {
        return Err(damaged("its bytes changed since it was built"));
    }
    let json = serde_json::from_slice(&payload).map_err(|e| damaged(&e.to_string()))?;
    Embedded::from_json(&json).map(Some).ok_or_else(|| damaged("it lacks the spec's files"))
}
