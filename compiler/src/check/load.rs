//! Loading: parse the entry file and everything it imports (the standard
//! library is compiled into modelc), report missing files and cycles, and
//! build each file's scope of visible definitions.

use super::value::DefRef;
use crate::diag::{Diagnostic, suggest};
use crate::source::{SourceMap, Span};
use crate::syntax::ast::{Def, ImportTarget, Item, Module};
use crate::syntax::parse;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The standard library, embedded so that built binaries need no files.
pub const STDLIB: &[(&str, &str)] = &[
    ("core", include_str!("../../../stdlib/core.model")),
    ("mlp", include_str!("../../../stdlib/mlp.model")),
    ("positions", include_str!("../../../stdlib/positions.model")),
    ("attention", include_str!("../../../stdlib/attention.model")),
    ("blocks", include_str!("../../../stdlib/blocks.model")),
    ("moe", include_str!("../../../stdlib/moe.model")),
    ("adapters", include_str!("../../../stdlib/adapters.model")),
];

/// All parsed files of one compilation and what each can see.
pub struct Program {
    pub sources: SourceMap,
    pub modules: Vec<Module>,
    /// Per module: definitions visible by name (its own and its imports').
    pub scopes: Vec<HashMap<String, DefRef>>,
    pub entry: usize,
}

impl Program {
    pub fn def(&self, r: DefRef) -> &Def {
        match &self.modules[r.module].items[r.item] {
            Item::Def(d) => d,
            _ => unreachable!("DefRef points at a definition"),
        }
    }

    pub fn item(&self, r: DefRef) -> &Item {
        &self.modules[r.module].items[r.item]
    }

    pub fn item_name(&self, r: DefRef) -> &str {
        match self.item(r) {
            Item::Def(d) => &d.name.text,
            Item::Adapt(a) => &a.name.text,
            Item::Import(_) => unreachable!("imports have no name"),
        }
    }

    /// The model a spec describes: the last `model` of the entry file.
    pub fn entry_model(&self) -> Option<DefRef> {
        let module = &self.modules[self.entry];
        module.items.iter().enumerate().rev().find_map(|(item, it)| match it {
            Item::Def(d) if d.kind == crate::syntax::ast::DefKind::Model => Some(DefRef { module: self.entry, item }),
            Item::Adapt(_) => Some(DefRef { module: self.entry, item }),
            _ => None,
        })
    }
}

/// Where a file came from, to resolve its relative imports.
#[derive(Clone, PartialEq)]
enum Origin {
    Disk(PathBuf),
    Std(String),
    Memory,
}

/// Loads a spec file from disk.
pub fn load_file(path: &Path) -> Result<Program, (SourceMap, Vec<Diagnostic>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err((
                SourceMap::new(),
                vec![Diagnostic::new("E0100", format!("cannot read {}: {e}", path.display()))],
            ));
        }
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    load(path.display().to_string(), Origin::Disk(canonical), text)
}

/// Spec files held in memory by absolute path: what `modelc build` compiles
/// into a binary, so that it needs no files at run time.
pub type Bundle = HashMap<PathBuf, String>;

/// Loads the spec at `entry` from a bundle; its imports come from the bundle too.
pub fn load_bundle(entry: &Path, bundle: Bundle) -> Result<Program, (SourceMap, Vec<Diagnostic>)> {
    let Some(text) = bundle.get(entry).cloned() else {
        let d = Diagnostic::new("E0100", format!("the built-in spec {} is missing", entry.display()));
        return Err((SourceMap::new(), vec![d]));
    };
    let name = entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    load_with(name, Origin::Disk(entry.to_path_buf()), text, Some(bundle))
}

impl Program {
    /// The spec files read from disk (not the standard library), by absolute path.
    pub fn bundle(&self) -> Bundle {
        self.sources.files().filter_map(|f| Some((f.path.clone()?, f.text.clone()))).collect()
    }
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Loads a spec given as text; relative imports resolve against `dir`.
pub fn load_source(name: &str, text: &str, dir: Option<&Path>) -> Result<Program, (SourceMap, Vec<Diagnostic>)> {
    let origin = match dir {
        Some(d) => Origin::Disk(d.join(name)),
        None => Origin::Memory,
    };
    load(name.to_string(), origin, text.to_string())
}

struct Loader {
    sources: SourceMap,
    modules: Vec<Option<Module>>,
    origins: Vec<Origin>,
    diags: Vec<Diagnostic>,
    /// Per module: (import span, imported module index).
    imports: Vec<Vec<(Span, usize)>>,
    files: Vec<crate::source::FileId>,
    /// Files to read instead of the disk's.
    bundle: Option<Bundle>,
}

fn load(name: String, origin: Origin, text: String) -> Result<Program, (SourceMap, Vec<Diagnostic>)> {
    load_with(name, origin, text, None)
}

fn load_with(
    name: String,
    origin: Origin,
    text: String,
    bundle: Option<Bundle>,
) -> Result<Program, (SourceMap, Vec<Diagnostic>)> {
    let mut l = Loader {
        bundle,
        sources: SourceMap::new(),
        modules: Vec::new(),
        origins: Vec::new(),
        diags: Vec::new(),
        imports: Vec::new(),
        files: Vec::new(),
    };
    let entry = l.add(name, origin, text);
    l.check_cycles(entry);
    if !l.diags.is_empty() || l.modules.iter().any(Option::is_none) {
        return Err((l.sources, l.diags));
    }
    let modules: Vec<Module> = l.modules.into_iter().map(|m| m.expect("parsed")).collect();
    let mut diags = Vec::new();
    let scopes = build_scopes(&modules, &l.imports, &mut diags);
    if !diags.is_empty() {
        return Err((l.sources, diags));
    }
    Ok(Program { sources: l.sources, modules, scopes, entry })
}

impl Loader {
    fn add(&mut self, name: String, origin: Origin, text: String) -> usize {
        let path = match &origin {
            Origin::Disk(p) => Some(p.clone()),
            _ => None,
        };
        let file = self.sources.add(name, path, text);
        let index = self.modules.len();
        self.modules.push(None);
        self.origins.push(origin.clone());
        self.imports.push(Vec::new());
        self.files.push(file);
        let (module, errors) = parse(file, &self.sources.file(file).text.clone());
        self.diags.extend(errors);
        let Some(module) = module else { return index };
        for item in &module.items {
            let Item::Import(imp) = item else { continue };
            if let Some(target) = self.resolve_import(&origin, &imp.target, imp.span) {
                self.imports[index].push((imp.span, target));
            }
        }
        self.modules[index] = Some(module);
        index
    }

    fn resolve_import(&mut self, from: &Origin, target: &ImportTarget, span: Span) -> Option<usize> {
        let (name, origin, text) = match target {
            ImportTarget::Module(path) => {
                let wanted = match path.as_slice() {
                    [std, name] if std == "std" => name.as_str(),
                    _ => {
                        let d = Diagnostic::at("E0101", span, format!("unknown module `{}`", path.join("."))).help(
                            "standard modules are imported as `std.NAME`; other files by path, `import \"file.model\"`",
                        );
                        self.diags.push(d);
                        return None;
                    }
                };
                let Some((_, text)) = STDLIB.iter().find(|(n, _)| *n == wanted) else {
                    let names = STDLIB.iter().map(|(n, _)| *n);
                    let list: Vec<&str> = STDLIB.iter().map(|(n, _)| *n).collect();
                    let help = suggest(wanted, names)
                        .unwrap_or_else(|| format!("the standard modules are {}", list.join(", ")));
                    self.diags.push(Diagnostic::at("E0101", span, format!("no standard module `{wanted}`")).help(help));
                    return None;
                };
                (format!("stdlib/{wanted}.model"), Origin::Std(wanted.to_string()), text.to_string())
            }
            ImportTarget::Path(rel) => {
                let Origin::Disk(base) = from else {
                    let d = Diagnostic::at("E0101", span, format!("cannot import \"{rel}\" from here"))
                        .help("files can only be imported from a spec on disk");
                    self.diags.push(d);
                    return None;
                };
                let path = base.parent().unwrap_or(Path::new(".")).join(rel);
                let display = self.display_of(from, rel);
                let canonical = match &self.bundle {
                    Some(_) => normalize(&path),
                    None => path.canonicalize().unwrap_or(path.clone()),
                };
                if let Some(i) = self.origins.iter().position(|o| *o == Origin::Disk(canonical.clone())) {
                    return Some(i);
                }
                let read = match &self.bundle {
                    Some(b) => b.get(&canonical).cloned().ok_or_else(|| "not in the built binary".to_string()),
                    None => std::fs::read_to_string(&path).map_err(|e| e.to_string()),
                };
                match read {
                    Ok(text) => (display, Origin::Disk(canonical), text),
                    Err(e) => {
                        let d = Diagnostic::at("E0101", span, format!("cannot import \"{rel}\": {e}"))
                            .label(span, format!("looked for {display}"))
                            .help("paths are relative to the importing file");
                        self.diags.push(d);
                        return None;
                    }
                }
            }
        };
        if let Some(i) = self.origins.iter().position(|o| *o == origin) {
            return Some(i);
        }
        Some(self.add(name, origin, text))
    }

    /// A short name for an imported file: the importer's name with the
    /// relative path applied, `..` resolved where possible.
    fn display_of(&self, from: &Origin, rel: &str) -> String {
        let importer = self.origins.iter().position(|o| o == from).map(|i| self.files[i]);
        let base = importer.map(|f| self.sources.file(f).name.clone()).unwrap_or_default();
        let mut parts: Vec<&str> = base.split('/').collect();
        parts.pop();
        for piece in rel.split('/') {
            match piece {
                "." | "" => {}
                ".." if parts.last().is_some_and(|p| *p != "..") => {
                    parts.pop();
                }
                _ => parts.push(piece),
            }
        }
        parts.join("/")
    }

    /// Reports each import cycle once, naming the files around it.
    fn check_cycles(&mut self, entry: usize) {
        let mut state = vec![0u8; self.modules.len()]; // 0 new, 1 on stack, 2 done
        let mut stack = Vec::new();
        self.visit(entry, &mut state, &mut stack);
    }

    fn visit(&mut self, m: usize, state: &mut Vec<u8>, stack: &mut Vec<(usize, Span)>) {
        state[m] = 1;
        for (span, target) in self.imports[m].clone() {
            if state[target] == 1 {
                let start = stack.iter().position(|(s, _)| *s == target).unwrap_or(0);
                let mut chain: Vec<String> = stack[start..].iter().map(|(s, _)| self.name(*s)).collect();
                chain.push(self.name(m));
                chain.push(self.name(target));
                let d = Diagnostic::at("E0102", span, "import cycle")
                    .label(span, format!("`{}` imports `{}` back", self.name(m), self.name(target)))
                    .help(format!(
                        "the files import each other: {}; move the shared layers into a third file",
                        chain.join(" -> ")
                    ));
                self.diags.push(d);
            } else if state[target] == 0 {
                stack.push((m, span));
                self.visit(target, state, stack);
                stack.pop();
            }
        }
        state[m] = 2;
    }

    fn name(&self, m: usize) -> String {
        let file = self.modules[m].as_ref().map(|m| m.file);
        file.map(|f| self.sources.file(f).name.clone()).unwrap_or_default()
    }
}

fn build_scopes(
    modules: &[Module],
    imports: &[Vec<(Span, usize)>],
    diags: &mut Vec<Diagnostic>,
) -> Vec<HashMap<String, DefRef>> {
    let own: Vec<HashMap<String, (DefRef, Span)>> = modules
        .iter()
        .enumerate()
        .map(|(mi, m)| {
            let mut names: HashMap<String, (DefRef, Span)> = HashMap::new();
            for (item, it) in m.items.iter().enumerate() {
                let name = match it {
                    Item::Def(d) => &d.name,
                    Item::Adapt(a) => &a.name,
                    Item::Import(_) => continue,
                };
                if let Some((_, first)) = names.get(&name.text) {
                    diags.push(
                        Diagnostic::at("E0103", name.span, format!("`{}` is defined twice", name.text))
                            .label(*first, "first defined here")
                            .help("rename one of the definitions"),
                    );
                    continue;
                }
                names.insert(name.text.clone(), (DefRef { module: mi, item }, name.span));
            }
            names
        })
        .collect();
    (0..modules.len())
        .map(|mi| {
            let mut scope: HashMap<String, DefRef> = HashMap::new();
            for (_, target) in &imports[mi] {
                for (name, (r, _)) in &own[*target] {
                    scope.insert(name.clone(), *r);
                }
            }
            // A file's own definitions shadow imported ones.
            for (name, (r, _)) in &own[mi] {
                scope.insert(name.clone(), *r);
            }
            scope
        })
        .collect()
}
