//! A training run's folder (`train --out DIR`): one writer at a time, never
//! a finished run replaced by accident, and metrics that always parse.
//!
//! - `DIR/.lock` holds an advisory lock (`flock`) for as long as the run
//!   lives, with the holder's pid; the kernel drops it when the process
//!   ends, however it ends, so a killed run never leaves the folder locked.
//! - A folder that holds a run (its state or metrics) is only written again
//!   with `--resume` (continue it) or `--overwrite` (replace it).
//! - Temporary files a killed run left behind (`*.tmp`) are removed.
//! - `metrics.jsonl` gets whole lines: a write that fails (a full disk) is
//!   cut back to the last whole line and reported; on resume, a torn last
//!   line and the records after the saved step are dropped, so the records
//!   of the steps about to be repeated are not there twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// How the run treats what the folder already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new run: the folder must not hold one.
    Fresh,
    /// `--overwrite`: a new run replacing whatever the folder holds.
    Overwrite,
    /// `--resume`: continue the run in the folder.
    Resume,
}

/// The folder of a run, locked while this value lives.
pub struct RunDir {
    pub path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates or opens `path` for a run, taking its lock.
    pub fn open(path: &Path, mode: Mode) -> Result<RunDir, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let lock = lock(path)?;
        let holds_run = ["state.safetensors", "metrics.jsonl"].iter().any(|f| path.join(f).exists());
        if mode == Mode::Fresh && holds_run {
            return Err(format!(
                "{} holds a training run; continue it with `--resume {}`, replace it with `--overwrite`, \
                 or choose another --out",
                path.display(),
                path.display()
            ));
        }
        remove_stale_temporaries(path)?;
        Ok(RunDir { path: path.to_path_buf(), _lock: lock })
    }

    /// The metrics file: emptied for a new run; for a resumed one, its torn
    /// last line and the records after `saved_step` removed.
    pub fn metrics(&self, mode: Mode, saved_step: usize) -> Result<Metrics, String> {
        let path = self.path.join("metrics.jsonl");
        let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
        let mut file =
            OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path).map_err(fail)?;
        let mut kept = String::new();
        if mode == Mode::Resume {
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(fail)?;
            for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
                if step.is_some_and(|s| s as usize <= saved_step) {
                    kept.push_str(line);
                }
            }
        }
        file.set_len(0).map_err(fail)?;
        file.seek(SeekFrom::Start(0)).map_err(fail)?;
        file.write_all(kept.as_bytes()).map_err(fail)?;
        Ok(Metrics { len: kept.len() as u64, file, path })
    }
}

/// Takes `DIR/.lock`, or says which process holds it.
fn lock(dir: &Path) -> Result<File, String> {
    let path = dir.join(".lock");
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            return Err(format!(
                "{} is in use by another training run{who}; wait for it to end, or choose another --out",
                dir.display()
            ));
        }
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|_| file.write_all(pid.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(file)
}

/// Removes the `*.tmp` files an interrupted write left.
fn remove_stale_temporaries(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// `metrics.jsonl`, appended a whole line at a time.
pub struct Metrics {
    file: File,
    path: PathBuf,
    /// The length of its whole lines.
    len: u64,
}

impl Metrics {
    /// Appends `record` (one JSON object) as one line; on failure the file
    /// is cut back to its whole lines and the error names it.
    pub fn append(&mut self, record: &str) -> Result<(), String> {
        let line = format!("{record}\n");
        let written = self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush());
        match written {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len).and_then(|_| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                Err(format!("cannot write {}: {e}", self.path.display()))
            }
        }
    }
}

/// Writes a file through a temporary one, fsynced and renamed over it
/// (`weights::commit`), so a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
        .and_then(|()| crate::weights::commit(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("modelc-run-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_folder() {
        let dir = scratch("lock");
        let first = RunDir::open(&dir, Mode::Fresh).unwrap();
        let err = RunDir::open(&dir, Mode::Overwrite).err().unwrap();
        assert!(
            err.contains("in use by another training run") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        RunDir::open(&dir, Mode::Overwrite).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_run_is_continued_or_replaced_only_when_asked() {
        let dir = scratch("modes");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
        std::fs::write(dir.join("state.safetensors.tmp"), "half a checkpoint").unwrap();
        let err = RunDir::open(&dir, Mode::Fresh).err().unwrap();
        assert!(err.contains("holds a training run") && err.contains("--overwrite"), "{err}");
        assert!(dir.join("state.safetensors.tmp").exists(), "a refused run touches nothing");
        RunDir::open(&dir, Mode::Resume).unwrap();
        assert!(!dir.join("state.safetensors.tmp").exists(), "stale temporaries go");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resuming_drops_a_torn_line_and_the_records_after_the_saved_step() {
        let dir = scratch("metrics");
        std::fs::create_dir_all(&dir).unwrap();
        let text = "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": 1}\n{\"step\": 2, \"eval_loss\": 1}\n{\"step\": 3, \"loss\": 0.5}\n{\"step\": 4, \"lo";
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let run = RunDir::open(&dir, Mode::Resume).unwrap();
        let mut metrics = run.metrics(Mode::Resume, 2).unwrap();
        metrics.append("{\"step\": 3, \"loss\": 0.25}").unwrap();
        let got = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        assert_eq!(
            got,
            "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": 1}\n{\"step\": 2, \"eval_loss\": 1}\n{\"step\": 3, \"loss\": 0.25}\n"
        );
        drop(metrics);
        let fresh = run.metrics(Mode::Overwrite, 0).unwrap();
        drop(fresh);
        assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
