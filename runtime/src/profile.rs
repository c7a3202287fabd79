//! `--profile`: the time of every CPU kernel a command runs, added up by
//! the spec line and the layer each kernel came from (`ir::graph::Origin`,
//! kept from lowering through autodiff, the optimiser and scheduling), and
//! written as a Chrome trace (`chrome://tracing`, Perfetto) with the line
//! in each event.
//!
//! A kernel is attributed to the origin of the value it produces: a fused
//! chain to its last operation's, a row group (a norm, a softmax) to its
//! last part's, a gradient to the forward expression it differentiates.
//! Kernels no expression wrote (the optimiser's update) form a line of
//! their own.

use modelc::check::Checked;
use modelc::ir::graph::Origin;
use modelc::source::SourceMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// At most this many kernel events go into the trace (~60 MB of JSON);
/// the tables count every kernel run.
const MAX_EVENTS: usize = 1_000_000;

static ON: AtomicBool = AtomicBool::new(false);
static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

/// A spec as its programs' origins refer to it.
struct Spec {
    /// Each file's display name and lines.
    files: Vec<(String, Vec<String>)>,
    /// Each layer instance's weight path.
    instances: Vec<String>,
}

struct KernelInfo {
    name: String,
    origin: Option<Origin>,
}

struct ProgramInfo {
    /// The spec lowered last before the program was compiled.
    spec: Option<usize>,
    kernels: Vec<KernelInfo>,
    seconds: Vec<f64>,
    runs: u64,
    run_seconds: f64,
}

/// A kernel or a whole program run, for the trace: microseconds since start.
struct Event {
    program: u32,
    /// `None` for the program's run as a whole.
    kernel: Option<u32>,
    start: f64,
    duration: f64,
}

struct Recorder {
    trace: PathBuf,
    epoch: Instant,
    specs: Vec<Spec>,
    programs: Vec<ProgramInfo>,
    events: Vec<Event>,
    dropped: u64,
    /// A command's own phases (`span`): name, start and duration in µs.
    spans: Vec<(&'static str, f64, f64)>,
}

fn recorder() -> std::sync::MutexGuard<'static, Option<Recorder>> {
    RECORDER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns profiling on for the rest of the process; the trace goes to
/// `trace`, whose folder must exist (said before anything runs).
pub fn start(trace: &Path) -> Result<(), String> {
    let folder = trace.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(format!("--profile {}: no folder {}", trace.display(), folder.display()));
    }
    *recorder() = Some(Recorder {
        trace: trace.to_path_buf(),
        epoch: Instant::now(),
        specs: Vec::new(),
        programs: Vec::new(),
        events: Vec::new(),
        dropped: 0,
        spans: Vec::new(),
    });
    ON.store(true, Ordering::Relaxed);
    Ok(())
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records the spec that programs compiled from now on were lowered from.
pub fn add_spec(sources: &SourceMap, checked: &Checked) {
    if !enabled() {
        return;
    }
    let files = sources.files().map(|f| (f.name.clone(), f.text.lines().map(str::to_string).collect())).collect();
    let instances = checked.instances.iter().map(|i| i.path.clone()).collect();
    if let Some(r) = recorder().as_mut() {
        r.specs.push(Spec { files, instances });
    }
}

/// Registers a compiled program's kernels (name, origin); returns its id.
pub fn add_program(kernels: impl Iterator<Item = (String, Option<Origin>)>) -> Option<u32> {
    let mut guard = recorder();
    let r = guard.as_mut()?;
    let kernels: Vec<KernelInfo> = kernels.map(|(name, origin)| KernelInfo { name, origin }).collect();
    r.programs.push(ProgramInfo {
        spec: r.specs.len().checked_sub(1),
        seconds: vec![0.0; kernels.len()],
        kernels,
        runs: 0,
        run_seconds: 0.0,
    });
    Some(r.programs.len() as u32 - 1)
}

/// A kernel's run that began at `started` and ends now. `leaf` is its
/// first leaf (`Schedule::leaves`); a row group, whose parts run block by
/// block interleaved, gives the seconds each part took over all threads,
/// and its time is shared among its parts in those proportions (shown one
/// after the other in the trace).
pub fn record_kernel(program: u32, leaf: usize, started: Instant, part_seconds: Option<&[f64]>) {
    let seconds = started.elapsed().as_secs_f64();
    let mut guard = recorder();
    let Some(r) = guard.as_mut() else { return };
    let start = started.duration_since(r.epoch).as_secs_f64() * 1e6;
    let shares: Vec<f64> = match part_seconds {
        Some(parts) if parts.iter().sum::<f64>() > 0.0 => {
            let sum: f64 = parts.iter().sum();
            parts.iter().map(|p| p / sum).collect()
        }
        Some(parts) => vec![1.0 / parts.len().max(1) as f64; parts.len()],
        None => vec![1.0],
    };
    let mut at = start;
    for (i, share) in shares.into_iter().enumerate() {
        let duration = seconds * share * 1e6;
        let Some(p) = r.programs.get_mut(program as usize) else { return };
        if let Some(s) = p.seconds.get_mut(leaf + i) {
            *s += seconds * share;
        }
        r.event(Event { program, kernel: Some((leaf + i) as u32), start: at, duration });
        at += duration;
    }
}

/// One run of a whole program, from `started` to now.
pub fn record_run(program: u32, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let mut guard = recorder();
    let Some(r) = guard.as_mut() else { return };
    let Some(p) = r.programs.get_mut(program as usize) else { return };
    p.runs += 1;
    p.run_seconds += seconds;
    let start = started.duration_since(r.epoch).as_secs_f64() * 1e6;
    r.event(Event { program, kernel: None, start, duration: seconds * 1e6 });
}

/// A phase of the command (a training step, a decoded token) from
/// `started` to now: the report says how much of its time kernels took.
pub fn span(name: &'static str, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let mut guard = recorder();
    let Some(r) = guard.as_mut() else { return };
    let start = started.duration_since(r.epoch).as_secs_f64() * 1e6;
    r.spans.push((name, start, seconds * 1e6));
}

impl Recorder {
    /// Per span name, in first-seen order: each span's µs and the µs of
    /// kernels within it (spans past the trace's last event are left out).
    fn span_times(&self) -> Vec<(&'static str, Vec<(f64, f64)>)> {
        let mut kernels: Vec<(f64, f64)> =
            self.events.iter().filter(|e| e.kernel.is_some()).map(|e| (e.start, e.duration)).collect();
        kernels.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut prefix = vec![0.0];
        for (_, d) in &kernels {
            prefix.push(prefix.last().copied().unwrap_or(0.0) + d);
        }
        let end = kernels.last().map_or(0.0, |k| k.0 + k.1);
        let mut times: Vec<(&'static str, Vec<(f64, f64)>)> = Vec::new();
        for &(name, start, duration) in &self.spans {
            if self.dropped > 0 && start + duration > end {
                continue;
            }
            let lo = kernels.partition_point(|k| k.0 < start);
            let hi = kernels.partition_point(|k| k.0 < start + duration);
            let inside = prefix[hi] - prefix[lo];
            match times.iter_mut().find(|t| t.0 == name) {
                Some(t) => t.1.push((duration, inside)),
                None => times.push((name, vec![(duration, inside)])),
            }
        }
        times
    }

    fn event(&mut self, e: Event) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(e);
        } else {
            self.dropped += 1;
        }
    }
}

/// Where a kernel came from, as the tables and the trace show it.
struct Place {
    /// `file:line`, or what wrote a kernel no line did.
    line: String,
    code: String,
    /// The layer's weight path with stack indices as `*`.
    layer: String,
    /// The layer's own path.
    instance: String,
}

fn place(specs: &[Spec], spec: Option<usize>, origin: Option<Origin>) -> Place {
    let found = spec.and_then(|s| specs.get(s)).zip(origin);
    let Some((spec, origin)) = found else {
        return Place {
            line: "(no spec line)".into(),
            code: "the optimiser's update, or what no expression wrote".into(),
            layer: "(no layer)".into(),
            instance: "(no layer)".into(),
        };
    };
    let (name, lines) = &spec.files[origin.span.file.0 as usize];
    // Line numbers from the byte offset, as diagnostics count them.
    let mut offset = origin.span.start as usize;
    let mut line = 0;
    while line + 1 < lines.len() && offset > lines[line].len() {
        offset -= lines[line].len() + 1;
        line += 1;
    }
    let instance = spec.instances.get(origin.instance as usize).cloned().unwrap_or_default();
    let layer = instance
        .split('.')
        .map(|part| if part.parse::<u64>().is_ok() { "*" } else { part })
        .collect::<Vec<_>>()
        .join(".");
    Place {
        line: format!("{name}:{}", line + 1),
        code: lines.get(line).map(|l| l.trim().to_string()).unwrap_or_default(),
        layer: if layer.is_empty() { "(model)".into() } else { layer },
        instance: if instance.is_empty() { "(model)".into() } else { instance },
    }
}

/// Seconds by key, largest first: (key, seconds, kernels, share).
fn ranked(rows: HashMap<(String, String), (f64, usize)>, total: f64) -> Vec<(String, String, f64, usize, f64)> {
    let mut rows: Vec<_> = rows.into_iter().map(|((a, b), (s, n))| (a, b, s, n, s / total.max(1e-12))).collect();
    rows.sort_by(|x, y| y.2.total_cmp(&x.2).then_with(|| x.0.cmp(&y.0)));
    rows
}

/// Prints the tables (stderr) and writes the trace, if profiling is on.
/// Returns the trace's path when one was written.
pub fn finish() -> Result<Option<PathBuf>, String> {
    let Some(r) = recorder().take() else { return Ok(None) };
    ON.store(false, Ordering::Relaxed);
    let places: Vec<Vec<Place>> =
        (r.programs.iter()).map(|p| p.kernels.iter().map(|k| place(&r.specs, p.spec, k.origin)).collect()).collect();
    let kernel_seconds: f64 = r.programs.iter().flat_map(|p| &p.seconds).sum();
    let run_seconds: f64 = r.programs.iter().map(|p| p.run_seconds).sum();
    let runs: u64 = r.programs.iter().map(|p| p.runs).sum();
    if runs == 0 {
        eprintln!("profile: no program ran on the CPU");
        return Ok(None);
    }
    let mut by_line: HashMap<(String, String), (f64, usize)> = HashMap::new();
    let mut by_layer: HashMap<(String, String), (f64, usize)> = HashMap::new();
    for (p, program) in r.programs.iter().enumerate() {
        for (k, seconds) in program.seconds.iter().enumerate() {
            let at = &places[p][k];
            let e = by_line.entry((at.line.clone(), at.code.clone())).or_default();
            e.0 += seconds;
            e.1 += 1;
            let e = by_layer.entry((at.layer.clone(), String::new())).or_default();
            e.0 += seconds;
            e.1 += 1;
        }
    }
    eprintln!(
        "profile: {kernel_seconds:.3} s in kernels, {:.1}% of the {run_seconds:.3} s {runs} program runs took \
         ({} programs)",
        100.0 * kernel_seconds / run_seconds.max(1e-12),
        r.programs.len()
    );
    // The median phase (the first steps also fault in their outputs' pages).
    for (name, mut spans) in r.span_times() {
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (micros, inside) = spans[spans.len() / 2];
        let (all, all_inside) = spans.iter().fold((0.0, 0.0), |(a, b), s| (a + s.0, b + s.1));
        eprintln!(
            "{name}: {} x, median {:.2} ms, kernels {:.2} ms of it ({:.1}%; {:.1}% over all)",
            spans.len(),
            micros / 1e3,
            inside / 1e3,
            100.0 * inside / micros.max(1e-9),
            100.0 * all_inside / all.max(1e-9)
        );
    }
    // Lines below 0.1 ms in all (views, reshapes) go into the last row.
    let lines: Vec<_> = ranked(by_line, kernel_seconds).into_iter().filter(|l| l.2 >= 1e-4).collect();
    let width = lines.iter().take(25).map(|l| l.0.chars().count()).max().unwrap_or(4);
    eprintln!("{:>9} {:>6} {:>7}  {:<width$} code", "seconds", "%", "kernels", "line");
    for (line, code, seconds, kernels, share) in lines.iter().take(25) {
        eprintln!(
            "{seconds:>9.4} {:>5.1}% {kernels:>7}  {line:<width$} {}",
            100.0 * share,
            modelc::draw::clip(code, 70)
        );
    }
    let shown: f64 = lines.iter().take(25).map(|l| l.2).sum();
    if lines.len() > 25 || kernel_seconds - shown > 0.0 {
        let rest = kernel_seconds - shown;
        eprintln!("{rest:>9.4} {:>5.1}%          the other lines", 100.0 * rest / kernel_seconds);
    }
    eprintln!("{:>9} {:>6} {:>7}  layer", "seconds", "%", "kernels");
    for (layer, _, seconds, kernels, share) in ranked(by_layer, kernel_seconds).iter().take(15) {
        eprintln!("{seconds:>9.4} {:>5.1}% {kernels:>7}  {layer}", 100.0 * share);
    }
    write_trace(&r, &places)?;
    eprintln!("trace: {} (chrome://tracing or ui.perfetto.dev)", r.trace.display());
    if r.dropped > 0 {
        eprintln!("trace: the first {MAX_EVENTS} kernel runs only ({} more not written)", r.dropped);
    }
    Ok(Some(r.trace))
}

/// The Chrome trace event format: complete events (`"ph": "X"`) in
/// microseconds, one track per program, kernels nested in their run.
fn write_trace(r: &Recorder, places: &[Vec<Place>]) -> Result<(), String> {
    let mut events = Vec::with_capacity(r.events.len() + r.programs.len());
    for (p, _) in r.programs.iter().enumerate() {
        events.push(serde_json::json!({
            "name": "thread_name", "ph": "M", "pid": 1, "tid": p,
            "args": { "name": format!("program {p}") },
        }));
    }
    for e in &r.events {
        let program = &r.programs[e.program as usize];
        let event = match e.kernel {
            None => serde_json::json!({
                "name": format!("program {} run", e.program), "cat": "program", "ph": "X",
                "ts": e.start, "dur": e.duration, "pid": 1, "tid": e.program,
            }),
            Some(k) => {
                let at = &places[e.program as usize][k as usize];
                serde_json::json!({
                    "name": program.kernels[k as usize].name, "cat": "kernel", "ph": "X",
                    "ts": e.start, "dur": e.duration, "pid": 1, "tid": e.program,
                    "args": { "line": at.line, "code": at.code, "layer": at.instance },
                })
            }
        };
        events.push(event);
    }
    let steps = r.programs.len();
    if !r.spans.is_empty() {
        events.push(serde_json::json!({
            "name": "thread_name", "ph": "M", "pid": 1, "tid": steps, "args": { "name": "command" },
        }));
    }
    for &(name, start, duration) in &r.spans {
        events.push(serde_json::json!({
            "name": name, "cat": "command", "ph": "X", "ts": start, "dur": duration, "pid": 1, "tid": steps,
        }));
    }
    let json = serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" });
    let text = serde_json::to_string(&json).map_err(|e| format!("trace: {e}"))?;
    crate::run_dir::write_atomic(&r.trace, text.as_bytes()).map_err(|e| format!("--profile {}: {e}", r.trace.display()))
}
