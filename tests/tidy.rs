//! The code's own rules, checked: every file says what it is for (`//!`),
//! no leftover `todo!`/`dbg!`, no file past a length that wants splitting,
//! the compiler crate neither prints nor exits nor parses a command line,
//! neither code generator imports the other, and the compiler's modules
//! import each other without a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The source without `//` comments (doc comments included), so that
/// prose about a forbidden thing does not count as using it.
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

const LONGEST_FILE: usize = 1500;

#[test]
fn every_file_says_what_it_is_for_and_none_is_unfinished_or_too_long() {
    let root = repo();
    for dir in ["compiler/src", "runtime/src", "runtime/benches", "tests"] {
        for f in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&f).unwrap();
            let name = f.strip_prefix(&root).unwrap().display().to_string();
            assert!(text.starts_with("//!"), "{name} does not open with a `//!` comment saying what it is for");
            let lines = text.lines().count();
            assert!(lines <= LONGEST_FILE, "{name} has {lines} lines (over {LONGEST_FILE}): split it by concern");
            if dir != "tests" {
                for mark in ["todo!(", "dbg!(", "unimplemented!("] {
                    assert!(!code(&text).contains(mark), "{name} has `{mark}`");
                }
            }
        }
    }
}

#[test]
fn the_compiler_crate_never_prints_exits_or_parses_arguments() {
    let root = repo();
    for f in rust_files(&root.join("compiler/src")) {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let name = f.strip_prefix(&root).unwrap().display().to_string();
        for banned in ["println!", "eprintln!", "print!(", "eprint!(", "ExitCode", "process::exit", "clap"] {
            assert!(!text.contains(banned), "{name} uses `{banned}`: that belongs to the runtime's command line");
        }
    }
    let manifest = std::fs::read_to_string(root.join("compiler/Cargo.toml")).unwrap();
    assert!(!manifest.contains("clap"), "compiler/Cargo.toml depends on clap");
}

/// The compiler's modules (`check::prims`, `backend::clif`, ...) by file.
fn modules() -> BTreeMap<String, String> {
    let src = repo().join("compiler/src");
    rust_files(&src)
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            (parts.join("::"), code(&std::fs::read_to_string(&f).unwrap()))
        })
        .collect()
}

/// The modules `module`'s code refers to through `crate::`, `super::` or
/// `self::` paths (a `use super::{a, b}` list included), other than itself
/// and its ancestors.
fn imports(module: &str, text: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut resolve = |segments: Vec<&str>| {
        let here: Vec<&str> = if module.is_empty() { vec![] } else { module.split("::").collect() };
        let (mut base, rest): (Vec<&str>, &[&str]) = match segments.first() {
            Some(&"crate") => (vec![], &segments[1..]),
            Some(&"self") => (here.clone(), &segments[1..]),
            Some(&"super") => {
                let ups = segments.iter().take_while(|s| **s == "super").count();
                (here[..here.len().saturating_sub(ups)].to_vec(), &segments[ups..])
            }
            _ => return,
        };
        let mut found = None;
        for s in rest {
            base.push(s);
            let path = base.join("::");
            if known.contains_key(&path) {
                found = Some(path);
            } else {
                break;
            }
        }
        if let Some(m) = found
            && m != module
            && !module.starts_with(&format!("{m}::"))
        {
            out.insert(m);
        }
    };
    let bytes = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts = ["crate::", "super::", "self::"].iter().any(|p| bytes[i..].starts_with(p.as_bytes()));
        if !starts || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        // A path: identifiers joined by `::`, perhaps ending in a `{...}` list.
        let mut j = i;
        while j < bytes.len() && (ident(bytes[j]) || bytes[j] == b':') {
            j += 1;
        }
        let path = &text[i..j];
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        if j < bytes.len() && bytes[j] == b'{' {
            let end = bytes[j..].iter().position(|c| *c == b'}').map_or(bytes.len(), |k| j + k);
            for item in text[j + 1..end].split(',') {
                let first = item.trim().split("::").next().unwrap_or("").trim();
                if !first.is_empty() {
                    let mut s = segments.clone();
                    s.push(first);
                    resolve(s);
                }
            }
        }
        resolve(segments);
        i = j.max(i + 1);
    }
    out
}

#[test]
fn the_compilers_modules_import_each_other_without_a_cycle() {
    let modules = modules();
    let graph: BTreeMap<String, BTreeSet<String>> =
        modules.iter().map(|(m, text)| (m.clone(), imports(m, text, &modules))).collect();
    assert!(graph["backend::rows"].contains("backend::kernel"), "the import scan finds nothing: {graph:?}");
    for (a, b) in [("backend::wgsl", "backend::clif"), ("backend::clif", "backend::wgsl")] {
        assert!(!graph[a].contains(b), "{a} imports {b}: code generators share backend::kernel, not each other");
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for next in &graph[m] {
            match state.get(next) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap();
                    panic!("import cycle: {} -> {next}", path[start..].join(" -> "));
                }
                Some(_) => {}
                None => visit(next, graph, state, path),
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m) {
            visit(m, &graph, &mut state, &mut Vec::new());
        }
    }
    // `types` is the bottom: it imports nothing of modelc.
    for (m, uses) in graph.iter().filter(|(m, _)| m.starts_with("types")) {
        let outside: Vec<&String> = uses.iter().filter(|u| !u.starts_with("types")).collect();
        assert!(outside.is_empty(), "{m} imports {outside:?}");
    }
}
