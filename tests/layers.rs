//! The crate's modules stand in layers, and imports point down: a module imports only from the
//! layers below its own, and within its layer only from the modules listed before it. Read from
//! the sources, parsed as Rust: every `crate::…` path (in `use` items, in code, in macro
//! arguments), every `super::…` that climbs out of its top-level module, and every exported
//! macro by the module that defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// The layers, bottom first; within a layer, each module may import those listed before it.
const LAYERS: &[(&str, &[&str])] = &[
    ("0, plain config", &["config"]),
    (
        "1, foundations",
        &[
            "error",
            "verdict",
            "image",
            "multipart",
            "metrics",
            "throttle",
            "pool",
        ],
    ),
    (
        "2, runtime objects",
        &[
            "egress", "upstream", "keys", "breaker", "replay", "cache", "store", "issued",
            "limits", "cors", "auth", "receipt", "intake", "convert", "face", "trace",
        ],
    ),
    (
        "3, the pipeline",
        &["state", "notify", "usage", "liveness", "logging"],
    ),
    (
        "4, listeners and tools",
        &["edge", "proxy", "admin", "server"],
    ),
];

/// Imports allowed against the layers, as `(module, what it imports)`, or `(module, "")` for a
/// module with no layer: none. An entry added here must still occur, or the test fails.
const KNOWN: &[(&str, &str)] = &[];

/// One import of a top-level module by another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    /// Where: `src/limits.rs:20 crate::store::redis`.
    at: String,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file of the library under `src`, but `lib.rs` (the list of modules) and
/// `main.rs` (the binary, above every layer).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let top = p.parent() == Some(&src());
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !(top && (name == "lib.rs" || name == "main.rs")) {
                out.push(p);
            }
        }
    }
}

/// The module path of a file: `src/store/redis.rs` is `store::redis`, `src/store/mod.rs` is
/// `store`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The `crate::…` and `super::…` paths of one file, each as the module path it names.
struct Paths<'a> {
    file: &'a Path,
    /// The module the visitor is in: the file's, then any inline `mod` within it.
    module: Vec<String>,
    found: Vec<(Vec<String>, String)>,
}

impl Paths<'_> {
    /// Resolve `segments` (`crate`, `super`, `self` first) from the current module; `None` for
    /// a path that does not start at the crate (an external crate, a local name).
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut at = match segments.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("super") | Some("self") => self.module.clone(),
            _ => return None,
        };
        let mut rest = segments;
        if rest[0] == "crate" {
            rest = &rest[1..];
        }
        for (i, s) in rest.iter().enumerate() {
            match s.as_str() {
                "super" => {
                    at.pop();
                }
                "self" => {}
                _ => {
                    at.extend(rest[i..].iter().cloned());
                    return Some(at);
                }
            }
        }
        Some(at)
    }

    fn note(&mut self, segments: Vec<String>, line: usize) {
        if let Some(path) = self.resolve(&segments) {
            let at = format!(
                "{}:{line} {}",
                self.file.display(),
                segments.join("::").replace("$crate", "crate")
            );
            self.found.push((path, at));
        }
    }

    /// `crate :: a :: b`, `$crate :: a`, `super :: a` sequences in a macro's tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    let line = id.span().start().line;
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) =
                        (trees.get(j), trees.get(j + 1))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        match trees.get(j + 2) {
                            Some(TokenTree::Ident(next)) => segments.push(next.to_string()),
                            _ => break,
                        }
                        j += 3;
                    }
                    if segments.len() > 1 {
                        self.note(segments, line);
                    }
                    i = j.max(i + 1);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.module.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.module.pop();
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        fn walk(
            tree: &syn::UseTree,
            prefix: &mut Vec<String>,
            out: &mut Vec<(Vec<String>, usize)>,
        ) {
            match tree {
                syn::UseTree::Path(p) => {
                    prefix.push(p.ident.to_string());
                    walk(&p.tree, prefix, out);
                    prefix.pop();
                }
                syn::UseTree::Name(n) => {
                    let line = n.ident.span().start().line;
                    let mut full = prefix.clone();
                    // `use a::{self, …}` imports `a` itself.
                    if n.ident != "self" {
                        full.push(n.ident.to_string());
                    }
                    out.push((full, line));
                }
                syn::UseTree::Rename(r) => {
                    let line = r.ident.span().start().line;
                    let mut full = prefix.clone();
                    full.push(r.ident.to_string());
                    out.push((full, line));
                }
                syn::UseTree::Glob(g) => {
                    let line = g.star_token.spans[0].start().line;
                    out.push((prefix.clone(), line));
                }
                syn::UseTree::Group(g) => {
                    for t in &g.items {
                        walk(t, prefix, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&u.tree, &mut Vec::new(), &mut out);
        for (segments, line) in out {
            self.note(segments, line);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = p.segments.first() {
            self.note(segments, first.ident.span().start().line);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// The macros a module exports (`#[macro_export]`): they live at the crate's root, but a use of
/// one is an import of the module that defines it.
fn exported_macros(file: &syn::File, module: &str, out: &mut BTreeMap<String, String>) {
    for item in &file.items {
        if let syn::Item::Macro(m) = item {
            let exported = m.attrs.iter().any(|a| a.path().is_ident("macro_export"));
            if let (true, Some(name)) = (exported, &m.ident) {
                out.insert(name.to_string(), module.to_string());
            }
        }
    }
}

/// Every import of one top-level module by another, and the top-level modules there are.
fn imports() -> (Vec<Import>, BTreeSet<String>) {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut parsed = Vec::new();
    let mut macros = BTreeMap::new();
    let mut modules = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let ast =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: not Rust: {e}", file.display()));
        let module = module_of(&file);
        modules.insert(module[0].clone());
        exported_macros(&ast, &module[0], &mut macros);
        parsed.push((file, module, ast));
    }
    let mut out = Vec::new();
    for (file, module, ast) in &parsed {
        let rel = file
            .strip_prefix(src().parent().expect("root"))
            .expect("rel");
        let mut v = Paths {
            file: rel,
            module: module.clone(),
            found: Vec::new(),
        };
        v.visit_file(ast);
        for (path, at) in v.found {
            let Some(first) = path.first() else { continue };
            let to = if modules.contains(first) {
                first.clone()
            } else if let Some(owner) = macros.get(first) {
                owner.clone()
            } else {
                continue;
            };
            if to != module[0] {
                out.push(Import {
                    from: module[0].clone(),
                    to,
                    at,
                });
            }
        }
    }
    out.sort();
    out.dedup();
    (out, modules)
}

/// A module's place: its layer and its position there.
fn place(module: &str) -> Option<(usize, usize)> {
    LAYERS
        .iter()
        .enumerate()
        .find_map(|(l, (_, mods))| mods.iter().position(|m| *m == module).map(|p| (l, p)))
}

type Problems = BTreeMap<(String, String), Vec<String>>;

/// What is wrong with the layering, by `(module, what it imports)` (`(module, "")`: the module
/// has no layer), each with the places that show it. Read once for all the tests.
fn problems() -> &'static Problems {
    static ONCE: std::sync::OnceLock<Problems> = std::sync::OnceLock::new();
    ONCE.get_or_init(read_problems)
}

fn read_problems() -> Problems {
    let (imports, modules) = imports();
    let mut out = Problems::new();
    for m in modules.iter().filter(|m| place(m).is_none()) {
        out.entry((m.clone(), String::new()))
            .or_default()
            .push(format!("src/{m}: in no layer"));
    }
    for i in imports {
        let Some(from) = place(&i.from) else {
            continue;
        };
        let why = match place(&i.to) {
            None => format!("`{}`, which is in no layer", i.to),
            Some(to) if to.0 > from.0 => {
                format!("`{}` of layer {}, above its own", i.to, LAYERS[to.0].0)
            }
            Some(to) if to.0 == from.0 && to.1 > from.1 => {
                format!("`{}`, listed after it in layer {}", i.to, LAYERS[to.0].0)
            }
            Some(_) => continue,
        };
        out.entry((i.from.clone(), i.to.clone()))
            .or_default()
            .push(format!("{}: `{}` imports from {why}", i.at, i.from));
    }
    out
}

/// The problems of the modules `mine` picks, but the known ones, which must still be there.
fn check(mine: impl Fn(&str) -> bool) {
    let all = problems();
    let mut report = Vec::new();
    for ((from, to), lines) in all {
        if mine(from) && !KNOWN.contains(&(from.as_str(), to.as_str())) {
            report.extend(lines.iter().cloned());
        }
    }
    for (from, to) in KNOWN.iter().filter(|(from, _)| mine(from)) {
        if !all.contains_key(&(from.to_string(), to.to_string())) {
            report.push(format!(
                "({from:?}, {to:?}) is in KNOWN but no longer happens: delete it there"
            ));
        }
    }
    assert!(
        report.is_empty(),
        "against the layers:\n  {}",
        report.join("\n  ")
    );
}

fn in_layer(layer: usize) -> impl Fn(&str) -> bool {
    move |m| place(m).is_some_and(|(l, _)| l == layer)
}

#[test]
fn layer_0_config_imports_nothing_of_the_crate() {
    check(in_layer(0));
}

#[test]
fn layer_1_foundations_import_from_below_in_order() {
    check(in_layer(1));
}

#[test]
fn layer_2_runtime_objects_import_from_below_in_order() {
    check(in_layer(2));
}

#[test]
fn layer_3_pipeline_imports_from_below_in_order() {
    check(in_layer(3));
}

#[test]
fn layer_4_listeners_import_from_below_in_order() {
    check(in_layer(4));
}

#[test]
fn every_module_has_a_layer() {
    check(|m| place(m).is_none());
}

/// The reader sees `use` trees, paths in code and in macros, `super` out of a module (from a
/// file and from an inline `mod`), and exported macros by the module that defines them; not
/// comments, strings, external crates or names within the module.
#[test]
fn the_reader_finds_every_kind_of_import() {
    let text = r#"
        //! Not an import: crate::comment.
        use std::sync::Arc;
        use crate::{error::GatewayError, metrics::{self, Metrics}};
        use super::store::Hold;
        use self::inner::Thing;
        fn f() -> crate::verdict::Class {
            let _ = "crate::string";
            tracing::warn!("{}", crate::image::MAX);
            crate::warn_throttled!("x");
            super::super::outside::g()
        }
        mod inner {
            use super::super::super::keys::OrgKeys;
            use super::local;
        }
    "#;
    let ast = syn::parse_file(text).expect("rust");
    let mut v = Paths {
        file: Path::new("src/limits/rate.rs"),
        module: vec!["limits".into(), "rate".into()],
        found: Vec::new(),
    };
    v.visit_file(&ast);
    let mut tops: Vec<String> = v.found.iter().map(|(p, _)| p.join("::")).collect();
    tops.sort();
    tops.dedup();
    assert_eq!(
        tops,
        [
            "error::GatewayError",
            "image::MAX",
            "keys::OrgKeys",
            "limits::rate::inner::Thing",
            "limits::rate::local",
            "limits::store::Hold",
            "metrics",
            "metrics::Metrics",
            "outside::g",
            "verdict::Class",
            "warn_throttled",
        ]
    );
    assert!(
        v.found
            .iter()
            .any(|(p, at)| p[0] == "image" && at.ends_with(":9 crate::image::MAX")),
        "{:?}",
        v.found
    );
}
