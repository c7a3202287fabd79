//! Faults and hostile input, as a user meets them: training killed at random
//! moments, a disk that fills up, two runs writing one folder, signals,
//! damaged state and binaries, flags out of range, weights and inputs of
//! the wrong kind, sizes no machine holds. Every case ends in a clear error
//! (exit 1, or clap's exit 2 for a flag) or works; never a panic, an abort
//! or a hang, and a run folder always resumes to the bits of an
//! uninterrupted run.

mod support;

use modelc_runtime::weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::{Rng, repo};

fn modelc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelc")).args(args).current_dir(repo()).output().expect("modelc runs");
    let (out_text, err) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "modelc {args:?} panicked:\n{err}");
    (out.status.code().unwrap_or(-1), out_text, unwrapped(&err))
}

/// A diagnostic with miette's line wrapping undone, so that phrases can be
/// looked for whatever the width.
fn unwrapped(err: &str) -> String {
    err.replace("\n  │ ", " ")
}

/// A scratch folder with a small text to train on.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modelc-faults-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data.txt"), "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    dir
}

/// `args` with the value after `flag` replaced.
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let at = args.iter().position(|a| a == flag).expect("the flag is there") + 1;
    args[at] = value.into();
    args
}

/// `train` of a very small tiny-gpt: 60 steps, a checkpoint every 3.
fn train_args(dir: &Path, out: &Path) -> Vec<String> {
    let data = dir.join("data.txt");
    [
        "train",
        "specs/tiny-gpt.model",
        "--set",
        "layers=1",
        "--set",
        "dim=16",
        "--set",
        "heads=2",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "60",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "7",
        "--checkpoint-every",
        "3",
        "--seed",
        "5",
    ]
    .map(String::from)
    .to_vec()
}

fn run_train(args: &[String]) -> (i32, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = modelc(&args);
    (code, err)
}

/// The tensors of a saved state, as bits.
fn state_bits(dir: &Path) -> HashMap<String, Vec<u32>> {
    let (tensors, _) = weights::load_all(&dir.join("state.safetensors")).unwrap();
    tensors.into_iter().map(|(k, t)| (k, t.data.iter().map(|v| v.to_bits()).collect())).collect()
}

/// The step of the state saved in `dir` (0 without one).
fn saved_step(dir: &Path) -> usize {
    weights::load_all(&dir.join("state.safetensors")).map_or(0, |(_, meta)| meta["step"].parse().unwrap())
}

/// Every line of metrics.jsonl parsed, without the timings.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "a torn last line:\n{text}");
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics line {l:?} does not parse: {e}"));
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("tokens_per_s");
            v
        })
        .collect()
}

/// A run of [`train_args`] from start to end, uninterrupted.
fn reference(dir: &Path) -> PathBuf {
    let out = dir.join("reference");
    let (code, err) = run_train(&train_args(dir, &out));
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn killed_at_random_moments_a_run_resumes_to_the_same_bits() {
    let dir = scratch("kills");
    let long = |out: &Path| with(train_args(&dir, out), "--steps", "2000");
    let want = dir.join("reference");
    let started = std::time::Instant::now();
    assert_eq!(run_train(&with(train_args(&dir, &dir.join("startup")), "--steps", "1")).0, 0);
    let startup = started.elapsed().as_secs_f64();
    assert_eq!(run_train(&long(&want)).0, 0);
    let per_step = (started.elapsed().as_secs_f64() - 2.0 * startup).max(0.0) / 2000.0;
    let out = dir.join("killed");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut kills, mut rounds, mut kills_in_training) = (0, 0, 0);
    loop {
        rounds += 1;
        assert!(rounds < 200, "the run never finished");
        let mut args = long(&out);
        if out.join("state.safetensors").exists() {
            args.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
        } else {
            args.push("--overwrite".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelc"))
            .args(&args)
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A fifth of the kills while loading and compiling, the others a
        // random number of steps (0 to 30) into training; after 20, none.
        let from = saved_step(&out);
        let in_training = rng.next() < 0.8;
        let extra = std::time::Duration::from_secs_f64(per_step * 30.0 * rng.next());
        let started = std::time::Instant::now();
        let mut training_since = None;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if kills < 20 {
                if training_since.is_none()
                    && (!in_training || records(&out).iter().any(|r| r["step"].as_u64().unwrap() as usize > from))
                {
                    training_since = Some(std::time::Instant::now());
                }
                let due = match training_since {
                    Some(t) if in_training => t.elapsed() >= extra,
                    _ => started.elapsed().as_secs_f64() >= startup * rng.next(),
                };
                if due && (training_since.is_some() || !in_training) {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the run failed");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        kills_in_training += usize::from(training_since.is_some() && in_training);
        // Whatever the moment, the folder holds whole files and whole lines.
        records(&out);
        if out.join("state.safetensors").exists() {
            weights::load_all(&out.join("state.safetensors")).expect("the checkpoint survives the kill");
        }
    }
    eprintln!(
        "{kills} kills in {rounds} runs, {kills_in_training} while training (startup {startup:.3} s, {:.1} ms a step)",
        per_step * 1e3
    );
    assert!(kills >= 20, "only {kills} kills before the run finished");
    assert!(kills_in_training >= 10, "only {kills_in_training} kills landed while training");
    assert_eq!(state_bits(&out), state_bits(&want), "after {kills} kills the state differs");
    assert_eq!(records(&out), records(&want), "after {kills} kills the metrics differ");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Mounts a tmpfs of `bytes` at `at` (the tests run as root, as CI does).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: usize) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", at.to_str().unwrap()])
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs at {} needs root", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills `dir`'s file system but for about `free` bytes.
fn fill_but(dir: &Path, free: u64) -> PathBuf {
    let filler = dir.join("filler");
    let stat = Command::new("df").args(["--output=avail", "-B1", dir.to_str().unwrap()]).output().unwrap();
    let avail: u64 = String::from_utf8_lossy(&stat.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
    let size = avail.saturating_sub(free);
    std::fs::write(&filler, vec![7u8; size as usize]).unwrap();
    filler
}

#[test]
fn a_full_disk_stops_the_run_cleanly_and_it_resumes_to_the_same_bits() {
    let dir = scratch("full");
    let want = reference(&dir);
    let state_size = std::fs::metadata(want.join("state.safetensors")).unwrap().len();
    // Space for: a few metrics lines; about one checkpoint; one and a half.
    for (case, free) in [8_192, state_size + 4_096, state_size * 3 / 2 + 8_192].into_iter().enumerate() {
        let mount = dir.join(format!("disk{case}"));
        let disk = Tmpfs::mount(&mount, 4 << 20);
        let out = mount.join("run");
        std::fs::create_dir_all(&out).unwrap();
        let filler = fill_but(&mount, free);
        let (code, err) = run_train(&train_args(&dir, &out));
        assert_eq!(code, 1, "case {case}: the disk never filled:\n{err}");
        assert!(err.contains("No space left on device"), "case {case}: {err}");
        records(&out);
        // Room again: the run continues from its last checkpoint.
        std::fs::remove_file(filler).unwrap();
        let mut args = train_args(&dir, &out);
        let resume = if out.join("state.safetensors").exists() { "--resume" } else { "--overwrite" };
        args.push(resume.into());
        if resume == "--resume" {
            args.push(out.to_str().unwrap().into());
        }
        let (code, err) = run_train(&args);
        assert_eq!(code, 0, "case {case}: {err}");
        assert_eq!(state_bits(&out), state_bits(&want), "case {case}");
        assert_eq!(records(&out), records(&want), "case {case}");
        drop(disk);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_folder_takes_one_run_at_a_time_and_keeps_a_finished_one() {
    let dir = scratch("writers");
    let out = dir.join("run");
    let long = with(train_args(&dir, &out), "--steps", "1000000");
    let mut first = Command::new(env!("CARGO_BIN_EXE_modelc"))
        .args(&long)
        .current_dir(repo())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once the first run has written a record, it holds the folder.
    while !std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|t| t.contains("loss")) {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut second = train_args(&dir, &out);
    second.push("--overwrite".into());
    let (code, err) = run_train(&second);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another training run") && err.contains(&format!("pid {}", first.id())), "{err}");
    // SIGTERM ends it as Ctrl-C does: the step finished, the state saved.
    assert!(Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap().success());
    assert!(first.wait().unwrap().success(), "SIGTERM must end the run cleanly");
    let (_, meta) = weights::load_all(&out.join("state.safetensors")).unwrap();
    let saved: usize = meta["step"].parse().unwrap();
    let last = records(&out).iter().filter_map(|r| r["step"].as_u64()).max().unwrap() as usize;
    assert_eq!(saved, last, "the state is saved at the last recorded step");

    // A fresh run does not replace the run the folder holds.
    let (code, err) = run_train(&train_args(&dir, &out));
    assert_eq!(code, 1);
    assert!(err.contains("holds a training run") && err.contains("--resume") && err.contains("--overwrite"), "{err}");
    let mut replace = train_args(&dir, &out);
    replace.push("--overwrite".into());
    let (code, err) = run_train(&replace);
    assert_eq!(code, 0, "{err}");
    assert_eq!(records(&out), records(&reference(&dir)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_state_is_named_never_silently_restarted() {
    let dir = scratch("state");
    let out = reference(&dir);
    let (tensors, meta) = weights::load_all(&out.join("state.safetensors")).unwrap();
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("missing step", None, "has no `step` in its metadata"),
        ("garbage step", Some("twelve"), "the `step` of"),
        ("huge step", Some("18446744073709551615"), "not a step of this run's 60"),
        ("negative step", Some("-3"), "the `step` of"),
    ];
    for (what, step, message) in cases {
        let mut meta = meta.clone();
        match step {
            Some(s) => meta.insert("step".into(), s.into()),
            None => meta.remove("step"),
        };
        weights::save_with(&out.join("state.safetensors"), &tensors, Some(meta)).unwrap();
        let mut args = train_args(&dir, &out);
        args.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
        let (code, err) = run_train(&args);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains(message), "{what}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diverging_step_keeps_the_last_finite_state() {
    let dir = scratch("diverge");
    let out = dir.join("run");
    let mut args = train_args(&dir, &out);
    args.extend(["--lr".to_string(), "1e38".to_string()]);
    let (code, err) = run_train(&args);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not finite") || err.contains("inf") || err.contains("NaN"), "{err}");
    let (tensors, _) = weights::load_all(&out.join("state.safetensors")).unwrap();
    for (name, t) in tensors {
        assert!(t.data.iter().all(|v| v.is_finite()), "`{name}` in the state saved before the failing step");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn weights_that_overflow_from_finite_gradients_are_reported_and_not_saved() {
    // The step writes the new weights over the old ones: when they overflow
    // (a learning rate near f32's largest value, from the first step), the
    // run says so and saves none of them.
    let dir = scratch("overflow");
    let out = dir.join("run");
    let mut args = train_args(&dir, &out);
    args.extend(["--lr", "3.4e38", "--warmup", "0"].map(String::from));
    let (code, err) = run_train(&args);
    assert_eq!(code, 1, "{err}");
    // The message as one line, whatever width the diagnostic was wrapped to.
    let flat = err.split_whitespace().filter(|w| *w != "│").collect::<Vec<_>>().join(" ");
    assert!(flat.contains("step 1: the updated weights are not finite"), "{err}");
    assert!(flat.contains("no checkpoint was saved before this step"), "{err}");
    assert!(!out.join("state.safetensors").exists() && !out.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flags_out_of_range_are_refused_with_the_range() {
    let dir = scratch("flags");
    let data = dir.join("data.txt");
    let data = data.to_str().unwrap();
    // `--flag=value`, as a negative value must be written.
    let train = ["train", "specs/tiny-gpt.model", "--data", data, "--out", "/nonexistent/never"];
    let infer = ["infer", "specs/tiny-gpt.model", "--weights", "w", "--prompt", "x", "--max-new-tokens", "1"];
    for (command, flag, value, says) in [
        (&train[..], "--lr", "nan", "finite"),
        (&train, "--lr", "-0.1", ">= 0"),
        (&train, "--clip", "-1", ">= 0"),
        (&train, "--weight-decay", "inf", "finite"),
        (&train, "--epochs", "0", "above 0"),
        (&train, "--epochs", "-2", "above 0"),
        (&train, "--eval-split", "1.5", "[0, 1)"),
        (&train, "--batch", "0", "at least 1"),
        (&train, "--steps", "0", "at least 1"),
        (&train, "--threads", "100000", "more than 1024"),
        (&train, "--min-lr", "-1", ">= 0"),
        (&infer, "--temperature", "-1", ">= 0"),
        (&infer, "--temperature", "NaN", "finite"),
        (&infer, "--top-p", "0", "(0, 1]"),
        (&infer, "--top-p", "1.5", "(0, 1]"),
        (&infer, "--context", "0", "at least 1"),
        (&infer, "--threads", "0", "at least 1"),
    ] {
        let flag_value = format!("{flag}={value}");
        let (code, _, err) = modelc(&[command, &[flag_value.as_str()]].concat());
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
    // The spec's own settings are held to the same ranges.
    let spec = dir.join("bad-lr.model");
    let text =
        std::fs::read_to_string(repo().join("specs/tiny-gpt.model")).unwrap().replace("lr: 0.0015", "lr: -0.0015");
    std::fs::write(&spec, text).unwrap();
    let (code, _, err) =
        modelc(&["train", spec.to_str().unwrap(), "--data", data, "--out", dir.join("r").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lr: -0.0015 is negative"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file of one tensor `name` with raw `bytes` of `dtype`.
fn raw_tensor_file(path: &Path, name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, bytes: &[u8]) {
    let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
    safetensors::tensor::serialize_to_file(vec![(name.to_string(), view)], None, path).unwrap();
}

#[test]
fn weights_and_inputs_of_the_wrong_kind_are_named() {
    let dir = scratch("kinds");
    // An int8 tensor where the spec has a float weight (a quantised checkpoint).
    let spec = dir.join("one.model");
    std::fs::write(
        &spec,
        "import std.core\nmodel One() {\n    w: param[4]\n    forward(x: [B, 4]) -> y: [B, 4] = x * w\n}\n",
    )
    .unwrap();
    let weights_file = dir.join("w.safetensors");
    raw_tensor_file(&weights_file, "w", safetensors::Dtype::I8, vec![4], &[1, 2, 3, 4]);
    let inputs = dir.join("in.safetensors");
    raw_tensor_file(&inputs, "x", safetensors::Dtype::F32, vec![1, 4], &[0u8; 16]);
    let outputs = dir.join("out.safetensors");
    let (spec, w, i, o) =
        (spec.to_str().unwrap(), weights_file.to_str().unwrap(), inputs.to_str().unwrap(), outputs.to_str().unwrap());
    let (code, _, err) = modelc(&["forward", spec, "--weights", w, "--inputs", i, "--outputs", o]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tensor `w` holds I8 values") && err.contains("dequantised"), "{err}");

    // Token ids that are NaN, fractional or outside the vocabulary.
    let gpt = dir.join("gpt");
    let (code, err) = run_train(&with(train_args(&dir, &gpt), "--steps", "1"));
    assert_eq!(code, 0, "{err}");
    let model = gpt.join("model.safetensors");
    for (ids, says) in [
        ([1.0f32, f32::NAN], "holds NaN"),
        ([1.0, 2.5], "holds 2.5"),
        ([1.0, 300.0], "index 300 is out of range for a table of 256 rows"),
        ([-1.0, 2.0], "index -1 is out of range"),
    ] {
        let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw_tensor_file(&inputs, "input_ids", safetensors::Dtype::F32, vec![1, 2], &bytes);
        let (code, _, err) = modelc(&[
            "forward",
            "specs/tiny-gpt.model",
            "--set",
            "layers=1",
            "--set",
            "dim=16",
            "--set",
            "heads=2",
            "--weights",
            model.to_str().unwrap(),
            "--inputs",
            i,
            "--outputs",
            o,
        ]);
        assert_eq!(code, 1, "{ids:?}: {err}");
        assert!(err.contains(says), "{ids:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_tokenizer_is_named() {
    let dir = scratch("tokenizer");
    let fixture = repo().join("tests/fixtures/hf/llama");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    let good = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
    let mut precompiled: serde_json::Value = serde_json::from_str(&good).unwrap();
    precompiled["normalizer"] = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": null});
    for (text, says) in [
        // Not JSON: a trailing comma, as a hand edit leaves one.
        (good.replacen('{', "{\"x\": 1,,", 1), "is not valid JSON: key must be a string at line 1 column 9"),
        // JSON, but a normalizer the tokenizers library panics on rather
        // than refusing.
        (precompiled.to_string(), "not a tokenizer the tokenizers library reads"),
    ] {
        std::fs::write(dir.join("tokenizer.json"), text).unwrap();
        let d = dir.to_str().unwrap();
        let (code, _, err) =
            modelc(&["infer", "specs/llama.model", "--weights", d, "--prompt", "hi", "--max-new-tokens", "1"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("tokenizer.json") && err.contains(says), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sizes_no_machine_holds_are_refused_before_allocating() {
    let dir = scratch("sizes");
    let data = dir.join("data.txt");
    let out = dir.join("run");
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let base = ["train", "specs/tiny-gpt.model", "--data", data, "--out", out, "--steps", "1"];
    let (code, _, err) = modelc(&[&base[..], &["--set", "vocab=1000000000000"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("weights and optimiser state need") && err.contains("`embed.weight` [1000000000000, 128]"),
        "{err}"
    );
    let (code, _, err) = modelc(&[&base[..], &["--batch", "100000", "--overwrite"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the program's activations need") && err.contains("[100000, 128, 512]"), "{err}");
    let (code, _, err) = modelc(&["check", "specs/tiny-gpt.model", "--set", "layers=1000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`repeat(1000000)` makes more than 100000 layers"), "{err}");
    let (code, _, err) =
        modelc(&["check", "specs/tiny-gpt.model", "--set", "dim=4294967296", "--set", "hidden=4294967296"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is too large"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs an executable this process has just written. Another test's
/// process spawned while the file was open for writing holds that
/// descriptor until it execs, and Linux refuses to run a file open for
/// writing (ETXTBSY): such a refusal is retried, as cargo does.
fn run_written(exe: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut tries = 0;
    loop {
        match Command::new(exe).args(args).output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
}

#[test]
fn a_damaged_built_binary_says_so() {
    let dir = scratch("binary");
    let exe = dir.join("mlp");
    let (code, _, err) = modelc(&["build", "specs/mlp.model", "-o", exe.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut bytes = std::fs::read(&exe).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x20;
    std::fs::write(&exe, &bytes).unwrap();
    let out = run_written(&exe, &["check"]);
    let err = unwrapped(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("built-in spec is damaged") && err.contains("build it again"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
