//! `index` and `search`: documents split into passages by tokens, embedded
//! with the binary's encoder, and found again by meaning through an HNSW
//! graph ([`crate::hnsw`]).
//!
//! An index is a folder:
//! - `passages.jsonl`: one passage a line (its source, line, byte span, text);
//! - `vectors.f32`: the passages' unit embeddings, little-endian rows;
//! - `graph.hnsw`: the graph over the first `graph_points` vectors;
//! - `manifest.json`: what of the above is committed, the settings, and
//!   each source's size, hash and passages indexed so far.
//!
//! Passages and vectors are appended batch by batch and made durable
//! before the manifest (written to a temporary file and renamed) counts
//! them; the graph file is replaced the same way. So a run killed at any
//! point leaves the last committed state, and `index --add` with the same
//! documents goes on from it: the graph is a function of the vectors in
//! order, so the result is the index one uninterrupted run writes.

use crate::cli::ModelArgs;
use crate::embed::Embedder;
use crate::hnsw::{self, Hnsw, Scratch};
use crate::model::{DtypeArgs, RunArgs, error};
use serde_json::{Value, json};
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CODE: &str = "E0708";
const FORMAT: &str = "modelc-index 1";
/// How often the graph file is rewritten while indexing (always at the end).
const GRAPH_EVERY: Duration = Duration::from_secs(20);

#[derive(clap::Args, Clone, Debug)]
pub struct IndexArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// The encoder's weights (a sentence-transformers folder, a safetensors file).
    #[arg(long)]
    pub weights: PathBuf,
    /// A Hugging Face tokenizer.json (default: the one beside the weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The text files to index.
    #[arg(long, num_args = 1.., required = true)]
    pub docs: Vec<PathBuf>,
    /// The index folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Grow an existing index (documents already in it are skipped; one an
    /// interrupted run left part way goes on from where it stopped).
    #[arg(long)]
    pub add: bool,
    /// Tokens per passage (default 128; at most the model's length less its special tokens).
    #[arg(long, value_parser = crate::flags::count)]
    pub chunk_tokens: Option<usize>,
    /// Tokens a passage shares with the one before it (default 16).
    #[arg(long)]
    pub overlap: Option<usize>,
    /// Links per point in the graph (its layer 0 has twice as many; default 16).
    #[arg(long, value_parser = crate::flags::count)]
    pub m: Option<usize>,
    /// Candidates considered when linking a point (default 200).
    #[arg(long, value_parser = crate::flags::count)]
    pub ef_construction: Option<usize>,
    /// Passages per forward pass.
    #[arg(long, default_value_t = 32, value_parser = crate::flags::count)]
    pub batch: usize,
}

#[derive(clap::Args, Clone, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub dtype: DtypeArgs,
    /// The index folder `index` wrote.
    #[arg(long)]
    pub index: PathBuf,
    /// A query (repeat for several; default: one per line from stdin).
    #[arg(long)]
    pub query: Vec<String>,
    /// Query vectors instead of text: a safetensors file with one [Q, dim]
    /// tensor (no model is run; prints the search time per query).
    #[arg(long, conflicts_with = "query")]
    pub vectors: Option<PathBuf>,
    /// Passages per query.
    #[arg(short, long, default_value_t = 10, value_parser = crate::flags::count)]
    pub k: usize,
    /// Candidates kept while searching: more finds more of the true nearest, slower (default 64).
    #[arg(long, value_parser = crate::flags::count)]
    pub ef_search: Option<usize>,
    /// Compare the query with every passage instead of searching the graph.
    #[arg(long)]
    pub exact: bool,
    /// One JSON object per line (`query`, `results` with `id`, `score`, `source`, `line`, `text`).
    #[arg(long)]
    pub json: bool,
    /// The encoder's weights (default: those the index was built with).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (default: the one beside the weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Retrieval-augmented generation: `infer --retrieve INDEX`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RetrieveArgs {
    /// An index (`index --out`): the passages nearest the prompt go into it
    /// (see --template), and their sources are printed on stderr.
    #[arg(long)]
    pub retrieve: Option<PathBuf>,
    /// Passages to retrieve.
    #[arg(long = "retrieve-k", default_value_t = 4, value_parser = crate::flags::count, requires = "retrieve")]
    pub retrieve_k: usize,
    /// The encoder that searches the index: a binary built from an embedding
    /// spec (default: the program that built the index).
    #[arg(long, requires = "retrieve")]
    pub embedder: Option<PathBuf>,
    /// The prompt around the passages: `{context}` is replaced by them
    /// (numbered), `{prompt}` by --prompt; a file's name reads the file.
    #[arg(long, requires = "retrieve")]
    pub template: Option<String>,
}

/// The prompt `infer --retrieve` gives without `--template`.
pub const TEMPLATE: &str =
    "Answer the question from the context.\n\nContext:\n{context}\n\nQuestion: {prompt}\nAnswer:";

impl RetrieveArgs {
    /// `prompt` with the retrieved passages around it, by the template.
    pub fn prompt(&self, prompt: &str) -> Result<String, String> {
        let index = self.retrieve.as_ref().expect("--retrieve is given");
        if prompt.trim().is_empty() {
            return Err("--retrieve searches with the prompt: give --prompt TEXT".into());
        }
        let template = match &self.template {
            Some(t) if Path::new(t).is_file() => {
                std::fs::read_to_string(t).map_err(|e| format!("cannot read the template {t}: {e}"))?
            }
            Some(t) => t.clone(),
            None => TEMPLATE.to_string(),
        };
        if !template.contains("{context}") {
            return Err("the template has no `{context}` for the passages".into());
        }
        let manifest = read_manifest(index)?;
        let mut command = match &self.embedder {
            Some(program) => std::process::Command::new(program),
            None => {
                let mut c = std::process::Command::new(&manifest.program);
                c.arg("search");
                c.args(&manifest.spec);
                c
            }
        };
        if self.embedder.is_some() {
            command.arg("search");
        }
        command.arg("--index").arg(index).args(["--json", "-k", &self.retrieve_k.to_string(), "--query", prompt]);
        let shown = format!("{:?}", command);
        let output = command.output().map_err(|e| format!("cannot run the embedder ({shown}): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "the embedder failed to search {}: {}",
                index.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let found: Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("the embedder printed no search results ({shown}): {e}"))?;
        let results = found["results"].as_array().cloned().unwrap_or_default();
        let mut context = String::new();
        eprintln!("retrieved from {}:", index.display());
        for (i, r) in results.iter().enumerate() {
            let text = r["text"].as_str().unwrap_or_default();
            context.push_str(&format!("[{}] {}\n", i + 1, text.trim()));
            eprintln!(
                "  [{}] {:.4}  {}:{}",
                i + 1,
                r["score"].as_f64().unwrap_or(0.0),
                r["source"].as_str().unwrap_or_default(),
                r["line"].as_u64().unwrap_or(0)
            );
        }
        Ok(template.replace("{context}", context.trim_end()).replace("{prompt}", prompt))
    }
}

/// A passage as `passages.jsonl` keeps it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Passage {
    pub source: String,
    /// The line of the source the passage starts on, from 1.
    pub line: usize,
    /// Its byte span in the source.
    pub start: usize,
    pub end: usize,
    pub text: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Source {
    path: String,
    bytes: u64,
    hash: String,
    /// Passages of this source in the index (its first ones, in order).
    passages: usize,
    complete: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: String,
    dim: usize,
    m: usize,
    ef_construction: usize,
    ef_search: usize,
    chunk_tokens: usize,
    overlap: usize,
    /// The encoder: the weights it was built with, and the program that
    /// embeds with them (a built binary, or modelc and a spec), which
    /// `infer --retrieve` runs to encode a question.
    weights: String,
    program: String,
    spec: Option<String>,
    passages: usize,
    passages_bytes: u64,
    graph_points: usize,
    sources: Vec<Source>,
}

/// An index read into memory.
pub struct Index {
    dir: PathBuf,
    manifest: Manifest,
    pub passages: Vec<Passage>,
    vectors: Vec<f32>,
    graph: Hnsw,
}

impl Index {
    /// Reads the committed part of the index in `dir`; a graph behind the
    /// vectors (an interrupted run) is brought up to date in memory.
    pub fn open(dir: &Path) -> Result<Index, String> {
        let mut index = Index::read(dir)?;
        index.graph.add(&index.vectors, false, &mut Scratch::default());
        Ok(index)
    }

    /// Reads the committed part of the index in `dir`, its graph as saved.
    fn read(dir: &Path) -> Result<Index, String> {
        let manifest = read_manifest(dir)?;
        let damaged = |file: &str, what: String| format!("{} is damaged: {what}", dir.join(file).display());
        let mut raw = Vec::new();
        let file =
            std::fs::File::open(dir.join("passages.jsonl")).map_err(|e| damaged("passages.jsonl", e.to_string()))?;
        file.take(manifest.passages_bytes)
            .read_to_end(&mut raw)
            .map_err(|e| damaged("passages.jsonl", e.to_string()))?;
        if raw.len() as u64 != manifest.passages_bytes {
            return Err(damaged("passages.jsonl", "shorter than its manifest says".into()));
        }
        let passages: Vec<Passage> = raw
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_slice(l).map_err(|e| damaged("passages.jsonl", format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_, _>>()?;
        if passages.len() != manifest.passages {
            return Err(damaged(
                "passages.jsonl",
                format!("{} passages, the manifest says {}", passages.len(), manifest.passages),
            ));
        }
        let want = manifest.passages.checked_mul(manifest.dim).and_then(|n| n.checked_mul(4));
        let want = want.ok_or_else(|| damaged("manifest.json", "sizes too large".into()))?;
        let mut bytes = Vec::with_capacity(want);
        let file = std::fs::File::open(dir.join("vectors.f32")).map_err(|e| damaged("vectors.f32", e.to_string()))?;
        file.take(want as u64).read_to_end(&mut bytes).map_err(|e| damaged("vectors.f32", e.to_string()))?;
        if bytes.len() != want {
            return Err(damaged("vectors.f32", "shorter than its manifest says".into()));
        }
        let vectors: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let graph = match std::fs::read(dir.join("graph.hnsw")) {
            Ok(b) => Hnsw::from_bytes(&b).map_err(|e| damaged("graph.hnsw", e))?,
            Err(_) if manifest.graph_points == 0 => Hnsw::new(manifest.dim, manifest.m, manifest.ef_construction),
            Err(e) => return Err(damaged("graph.hnsw", e.to_string())),
        };
        // A graph the manifest does not count (a run killed between the two
        // renames) is rebuilt: it is a function of the vectors.
        let graph = if graph.len() == manifest.graph_points && graph.dim() == manifest.dim && graph.m() == manifest.m {
            graph
        } else {
            Hnsw::new(manifest.dim, manifest.m, manifest.ef_construction)
        };
        Ok(Index { dir: dir.to_path_buf(), manifest, passages, vectors, graph })
    }

    pub fn len(&self) -> usize {
        self.passages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.passages.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    /// The weights the index was built with.
    pub fn weights(&self) -> PathBuf {
        PathBuf::from(&self.manifest.weights)
    }

    /// The `k` passages nearest `q` (a unit vector): (number, cosine), best first.
    pub fn search(&self, q: &[f32], k: usize, ef: Option<usize>, scratch: &mut Scratch) -> Vec<(usize, f32)> {
        let ef = ef.unwrap_or(self.manifest.ef_search);
        self.graph.search(&self.vectors, q, k, ef, scratch).into_iter().map(|(i, s)| (i as usize, s)).collect()
    }

    /// The `k` passages nearest `q`, comparing it with every one.
    pub fn exact(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        let mut all: Vec<(usize, f32)> = hnsw::dot_rows(q, &self.vectors).into_iter().enumerate().collect();
        let k = k.min(all.len());
        if k == 0 {
            return Vec::new();
        }
        all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }
}

/// Appends passages and vectors, and commits them with the manifest.
struct Writer {
    index: Index,
    passages_file: std::fs::File,
    vectors_file: std::fs::File,
    graph_saved: Instant,
    scratch: Scratch,
}

impl Writer {
    /// Opens `dir` to grow it, cutting what an interrupted run appended
    /// after its last commit; the graph takes the whole groups of points
    /// it is behind by (`Hnsw::add`), as the interrupted run would have.
    fn open(dir: &Path) -> Result<Writer, String> {
        let mut index = Index::read(dir)?;
        index.graph.add(&index.vectors, true, &mut Scratch::default());
        let open = |name: &str, len: u64| -> Result<std::fs::File, String> {
            let path = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            f.set_len(len).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            f.seek(std::io::SeekFrom::End(0)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(f)
        };
        let passages_file = open("passages.jsonl", index.manifest.passages_bytes)?;
        let vectors_file = open("vectors.f32", (index.vectors.len() * 4) as u64)?;
        Ok(Writer { index, passages_file, vectors_file, graph_saved: Instant::now(), scratch: Scratch::default() })
    }

    /// Creates an empty index in `dir`.
    fn create(dir: &Path, manifest: Manifest) -> Result<Writer, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for name in ["passages.jsonl", "vectors.f32"] {
            std::fs::write(dir.join(name), b"")
                .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))?;
        }
        write_json(&dir.join("manifest.json"), &manifest)?;
        Writer::open(dir)
    }

    /// Adds passages (with their sources' numbers) and their vectors, then
    /// commits them; `left` says how many passages each source still has to come.
    fn append(
        &mut self,
        passages: Vec<(usize, Passage)>,
        vectors: Vec<Vec<f32>>,
        left: &[(usize, usize)],
    ) -> Result<(), String> {
        let dir = self.index.dir.clone();
        let fail = |name: &str, e: std::io::Error| format!("cannot write {}: {e}", dir.join(name).display());
        let mut lines = Vec::new();
        for (_, p) in &passages {
            serde_json::to_writer(&mut lines, p).expect("a passage serialises");
            lines.push(b'\n');
        }
        let floats: Vec<u8> = vectors.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
        self.passages_file
            .write_all(&lines)
            .and_then(|()| self.passages_file.sync_data())
            .map_err(|e| fail("passages.jsonl", e))?;
        self.vectors_file
            .write_all(&floats)
            .and_then(|()| self.vectors_file.sync_data())
            .map_err(|e| fail("vectors.f32", e))?;
        let index = &mut self.index;
        index.manifest.passages += passages.len();
        index.manifest.passages_bytes += lines.len() as u64;
        for (s, p) in passages {
            index.manifest.sources[s].passages += 1;
            index.passages.push(p);
        }
        for &(s, n) in left {
            index.manifest.sources[s].complete |= n == 0;
        }
        index.vectors.extend(vectors.into_iter().flatten());
        index.graph.add(&index.vectors, true, &mut self.scratch);
        if self.graph_saved.elapsed() >= GRAPH_EVERY {
            self.save_graph()?;
        }
        write_json(&dir.join("manifest.json"), &self.index.manifest)
    }

    fn save_graph(&mut self) -> Result<(), String> {
        let path = self.index.dir.join("graph.hnsw");
        write_bytes(&path, &self.index.graph.to_bytes())?;
        self.index.manifest.graph_points = self.index.graph.len();
        self.graph_saved = Instant::now();
        Ok(())
    }

    /// Links the last, partial, group of points and saves everything.
    fn commit(&mut self) -> Result<(), String> {
        self.index.graph.add(&self.index.vectors, false, &mut self.scratch);
        self.save_graph()?;
        write_json(&self.index.dir.join("manifest.json"), &self.index.manifest)
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{} is not an index: cannot read {}: {e}", dir.display(), path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!("{} is a `{}` index; this modelc reads `{FORMAT}`", dir.display(), manifest.format));
    }
    Ok(manifest)
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
        .and_then(|()| crate::weights::commit(&tmp, path))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    write_bytes(path, serde_json::to_string_pretty(value).expect("serialises").as_bytes())
}

/// FNV-1a, to tell whether a document changed since it was indexed.
fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// Passages of `chunk` tokens, each sharing `overlap` with the one before,
/// as byte spans of `text` (`spans`: each token's span).
pub fn passages(text: &str, spans: &[(usize, usize)], chunk: usize, overlap: usize, source: &str) -> Vec<Passage> {
    let step = chunk - overlap;
    let mut out = Vec::new();
    let mut first = 0;
    while first < spans.len() {
        let last = (first + chunk).min(spans.len()) - 1;
        let (start, end) = (spans[first].0, spans[last].1);
        let line = 1 + text.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count();
        out.push(Passage { source: source.to_string(), line, start, end, text: text[start..end].to_string() });
        if last + 1 == spans.len() {
            break;
        }
        first += step;
    }
    out
}

pub fn run_index(args: &IndexArgs) -> ExitCode {
    crate::model::exit(index(args).map_err(|e| error(CODE, e)).and_then(|r| r))
}

fn index(args: &IndexArgs) -> Result<Result<(), ExitCode>, String> {
    let exists = args.out.join("manifest.json").is_file();
    if exists && !args.add {
        return Err(format!(
            "{} is an index already: --add grows it (and finishes an interrupted run)",
            args.out.display()
        ));
    }
    if !exists && args.out.exists() && std::fs::read_dir(&args.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(format!("{} exists and is not an index: give a new folder", args.out.display()));
    }
    // Every document is read before the index is touched.
    let mut documents = Vec::new();
    for doc in &args.docs {
        let path = std::fs::canonicalize(doc).map_err(|e| format!("cannot read {}: {e}", doc.display()))?;
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", doc.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", doc.display()))?;
        documents.push((doc.clone(), path.display().to_string(), text));
    }
    let weights = std::fs::canonicalize(&args.weights)
        .map_err(|e| format!("cannot read the weights {}: {e}", args.weights.display()))?;
    let mut embedder =
        match Embedder::open(CODE, &args.model, &weights, args.tokenizer.as_deref(), &args.run, &args.dtype) {
            Ok(e) => e,
            Err(code) => return Ok(Err(code)),
        };
    let specials = embedder.tokenizer.encode("").map_err(|e| e.to_string())?.len();
    let room = embedder.max_len.map(|n| n.saturating_sub(specials));
    let mut writer = if exists {
        let w = Writer::open(&args.out)?;
        let m = &w.index.manifest;
        let asked = [
            ("--chunk-tokens", args.chunk_tokens, m.chunk_tokens),
            ("--overlap", args.overlap, m.overlap),
            ("--m", args.m, m.m),
            ("--ef-construction", args.ef_construction, m.ef_construction),
        ];
        if let Some((flag, Some(v), had)) = asked.into_iter().find(|(_, v, had)| v.is_some_and(|v| v != *had)) {
            return Err(format!(
                "{} was built with {flag} {had}, not {v}: an index keeps its settings",
                args.out.display()
            ));
        }
        if Path::new(&m.weights) != weights {
            return Err(format!(
                "{} was built with the weights {}, not {}: one index, one encoder",
                args.out.display(),
                m.weights,
                weights.display()
            ));
        }
        w
    } else {
        let chunk_tokens = args.chunk_tokens.unwrap_or(room.map_or(128, |r| r.min(128)));
        let overlap = args.overlap.unwrap_or(16.min(chunk_tokens / 4));
        if let Some(r) = room.filter(|&r| chunk_tokens > r) {
            return Err(format!(
                "--chunk-tokens {chunk_tokens} is more than the {r} tokens the model reads besides its special tokens"
            ));
        }
        if overlap >= chunk_tokens {
            return Err(format!("--overlap {overlap} must be less than --chunk-tokens {chunk_tokens}"));
        }
        let program = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        let spec = match &args.model.spec {
            Some(p) if p.as_os_str() != crate::cli::BUILT_IN => {
                Some(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string())
            }
            _ => None,
        };
        let probe = embedder.embed(&[embedder.tokenizer.encode("dimension").map_err(|e| e.to_string())?], 1);
        let dim = match probe {
            Ok(v) => v[0].len(),
            Err(code) => return Ok(Err(code)),
        };
        Writer::create(
            &args.out,
            Manifest {
                format: FORMAT.into(),
                dim,
                m: args.m.unwrap_or(16).clamp(2, 1024),
                ef_construction: args.ef_construction.unwrap_or(200),
                ef_search: 64,
                chunk_tokens,
                overlap,
                weights: weights.display().to_string(),
                program,
                spec,
                passages: 0,
                passages_bytes: 0,
                graph_points: 0,
                sources: Vec::new(),
            },
        )?
    };
    // Split every document first, so the progress bar knows the total.
    let (chunk, overlap) = (writer.index.manifest.chunk_tokens, writer.index.manifest.overlap);
    let mut work: Vec<(usize, Vec<Passage>)> = Vec::new();
    for (doc, name, text) in &documents {
        let hash = fingerprint(text.as_bytes());
        let sources = &mut writer.index.manifest.sources;
        let at = match sources.iter().position(|s| &s.path == name) {
            Some(i) if sources[i].hash != hash => {
                return Err(format!(
                    "{} changed since it was indexed: an index does not replace passages; build a new one",
                    doc.display()
                ));
            }
            Some(i) if sources[i].complete => {
                eprintln!("{}: indexed already", doc.display());
                continue;
            }
            Some(i) => i,
            None => {
                sources.push(Source {
                    path: name.clone(),
                    bytes: text.len() as u64,
                    hash,
                    passages: 0,
                    complete: false,
                });
                sources.len() - 1
            }
        };
        if work.iter().any(|(s, _)| *s == at) {
            continue;
        }
        let spans = embedder.tokenizer.spans(text)?;
        let all = passages(text, &spans, chunk, overlap, name);
        let done = writer.index.manifest.sources[at].passages;
        work.push((at, all.into_iter().skip(done).collect()));
    }
    let total: usize = work.iter().map(|(_, p)| p.len()).sum();
    let mut left: Vec<(usize, usize)> = work.iter().map(|(s, p)| (*s, p.len())).collect();
    let queue: Vec<(usize, Passage)> = work.into_iter().flat_map(|(s, p)| p.into_iter().map(move |p| (s, p))).collect();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} passages  {per_sec}  eta {eta}")
            .expect("a valid template"),
    );
    let started = Instant::now();
    // Batches run across documents, so only the last one is short.
    for group in queue.chunks(args.batch) {
        let ids: Vec<Vec<usize>> =
            group.iter().map(|(_, p)| embedder.tokenizer.encode(&p.text)).collect::<Result<_, _>>()?;
        let vectors = match embedder.embed(&ids, args.batch) {
            Ok(v) => v,
            Err(code) => return Ok(Err(code)),
        };
        for (s, n) in left.iter_mut() {
            *n -= group.iter().filter(|(g, _)| g == s).count();
        }
        writer.append(group.to_vec(), vectors, &left)?;
        bar.inc(group.len() as u64);
    }
    for (s, _) in left {
        writer.index.manifest.sources[s].complete = true;
    }
    writer.commit()?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{}: {} passages from {} documents ({total} new, {:.1} per second)",
        args.out.display(),
        writer.index.len(),
        writer.index.manifest.sources.len(),
        total as f64 / seconds.max(1e-9)
    );
    Ok(Ok(()))
}

pub fn run_search(args: &SearchArgs) -> ExitCode {
    crate::model::exit(search(args).map_err(|e| error(CODE, e)).and_then(|r| r))
}

/// What one query found: (passage number, cosine), best first.
type Found = Vec<(usize, f32)>;

fn search(args: &SearchArgs) -> Result<Result<(), ExitCode>, String> {
    let index = Index::open(&args.index)?;
    let mut scratch = Scratch::default();
    let find = |q: &[f32], scratch: &mut Scratch| -> Found {
        if args.exact { index.exact(q, args.k) } else { index.search(q, args.k, args.ef_search, scratch) }
    };
    let mut out = std::io::stdout().lock();
    if let Some(path) = &args.vectors {
        let (tensors, _) = crate::weights::load_all(path)?;
        let (name, q) = match tensors.iter().next() {
            Some(t) if tensors.len() == 1 => t,
            _ => return Err(format!("{} must hold one tensor [queries, {}]", path.display(), index.dim())),
        };
        if q.shape.len() != 2 || q.shape[1] != index.dim() {
            return Err(format!(
                "`{name}` in {} is {:?}; the index needs [queries, {}]",
                path.display(),
                q.shape,
                index.dim()
            ));
        }
        let mut times = Vec::with_capacity(q.shape[0]);
        let mut found = Vec::with_capacity(q.shape[0]);
        for row in q.data.chunks_exact(index.dim()) {
            let start = Instant::now();
            found.push(find(row, &mut scratch));
            times.push(start.elapsed().as_secs_f64());
        }
        for (i, hits) in found.iter().enumerate() {
            let ids: Vec<usize> = hits.iter().map(|h| h.0).collect();
            let scores: Vec<f32> = hits.iter().map(|h| h.1).collect();
            let _ = writeln!(out, "{}", json!({ "query": i, "ids": ids, "scores": scores }));
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        eprintln!("{} queries: median {:.1} us, mean {:.1} us per query", times.len(), median * 1e6, mean * 1e6);
        return Ok(Ok(()));
    }
    let queries: Vec<String> = if args.query.is_empty() {
        std::io::stdin().lock().lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).collect()
    } else {
        args.query.clone()
    };
    if queries.is_empty() {
        return Err("no query: give --query TEXT or queries one per line on stdin".into());
    }
    let weights = args.weights.clone().unwrap_or_else(|| index.weights());
    let mut embedder =
        match Embedder::open(CODE, &args.model, &weights, args.tokenizer.as_deref(), &args.run, &args.dtype) {
            Ok(e) => e,
            Err(code) => return Ok(Err(code)),
        };
    let ids: Vec<Vec<usize>> = queries.iter().map(|q| embedder.tokenizer.encode(q)).collect::<Result<_, _>>()?;
    let vectors = match embedder.embed(&ids, 32) {
        Ok(v) => v,
        Err(code) => return Ok(Err(code)),
    };
    if vectors.first().is_some_and(|v| v.len() != index.dim()) {
        return Err(format!(
            "the model embeds in {} dimensions; {} holds {}: search with the encoder that built it",
            vectors[0].len(),
            args.index.display(),
            index.dim()
        ));
    }
    for (query, v) in queries.iter().zip(&vectors) {
        let hits = find(v, &mut scratch);
        if args.json {
            let results: Vec<Value> = hits
                .iter()
                .map(|&(i, score)| {
                    let p = &index.passages[i];
                    json!({ "id": i, "score": score, "source": p.source, "line": p.line, "start": p.start, "end": p.end, "text": p.text })
                })
                .collect();
            let _ = writeln!(out, "{}", json!({ "query": query, "results": results }));
        } else {
            let _ = writeln!(out, "{query}");
            for (rank, &(i, score)) in hits.iter().enumerate() {
                let p = &index.passages[i];
                let _ = writeln!(
                    out,
                    "{:>3}. {score:.4}  {}:{}  {}",
                    rank + 1,
                    short_path(&p.source),
                    p.line,
                    snippet(&p.text, 160)
                );
            }
        }
    }
    Ok(Ok(()))
}

/// A path's file name (the whole path is in `--json`).
fn short_path(path: &str) -> &str {
    Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path)
}

/// The text on one line, cut to about `width` characters.
pub fn snippet(text: &str, width: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(width) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passages_overlap_and_cover_the_text() {
        let text = "one two\nthree four five\nsix seven";
        let spans: Vec<(usize, usize)> = {
            let mut at = 0;
            text.split_whitespace()
                .map(|w| {
                    let s = text[at..].find(w).unwrap() + at;
                    at = s + w.len();
                    (s, at)
                })
                .collect()
        };
        let p = passages(text, &spans, 3, 1, "doc");
        let texts: Vec<&str> = p.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["one two\nthree", "three four five", "five\nsix seven"]);
        assert_eq!(p.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 2, 2]);
        assert_eq!(passages(text, &spans, 10, 2, "doc").len(), 1);
        assert!(passages("", &[], 4, 1, "doc").is_empty());
    }

    #[test]
    fn snippets_are_one_line_and_cut() {
        assert_eq!(snippet("a\n b   c", 10), "a b c");
        assert_eq!(snippet("héllo wörld", 4), "héll…");
    }
}
