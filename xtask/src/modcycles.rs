//! `cargo xtask modcycles`: fails when the modules of a crate depend on each
//! other in a cycle.
//!
//! For every crate root of the workspace (`src/lib.rs`, `src/main.rs`,
//! `src/bin/*`, `tests/*.rs`, `benches/*.rs` of each package under `crates/`
//! and of `xtask`), the module tree is read with `syn` from the `mod`
//! declarations (outline, inline and `#[path]`), and a module `a` depends on
//! a module `b` when `a`'s own items (not its child modules') name `b` or an
//! item of `b`: `use` trees and paths in code, types, patterns and macro
//! bodies starting with `crate::`, `self::`, `super::` or a child module's
//! name, resolved to the deepest module they reach. A `mod` declaration is
//! not a use, and neither is a public re-export (`pub use`, `pub(crate) use`):
//! that makes a module a facade over its children, not a client of them.
//! Paths through other names (imports, external crates) are not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// A module by its path from the crate root (empty: the root).
type ModPath = Vec<String>;

/// One crate's modules and the dependencies between them.
#[derive(Debug, Default)]
pub struct Graph {
    /// Every module, with its child modules.
    children: BTreeMap<ModPath, BTreeSet<String>>,
    /// `from -> to -> where` (the first reference seen: file and path).
    edges: BTreeMap<ModPath, BTreeMap<ModPath, String>>,
}

/// A path named by a module, before resolution.
struct Ref {
    from: ModPath,
    segs: Vec<String>,
    file: PathBuf,
}

/// Reads a crate's module tree from `root_file` through `read` (a file's
/// text, or `None` when it does not exist) and builds its dependency graph.
pub fn graph(root_file: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Result<Graph> {
    let mut g = Graph::default();
    let mut refs = Vec::new();
    let dir = root_file.parent().unwrap_or(Path::new("")).to_path_buf();
    load_file(root_file, Vec::new(), dir, read, &mut g, &mut refs)?;
    for r in refs {
        if let Some(to) = g.resolve(&r.from, &r.segs) {
            if to != r.from {
                let at = format!("{}: `{}`", r.file.display(), r.segs.join("::"));
                g.edges.entry(r.from).or_default().entry(to).or_insert(at);
            }
        }
    }
    Ok(g)
}

/// Parses `file` as module `path`, whose child modules' files live in `dir`.
fn load_file(
    file: &Path,
    path: ModPath,
    dir: PathBuf,
    read: &dyn Fn(&Path) -> Option<String>,
    g: &mut Graph,
    refs: &mut Vec<Ref>,
) -> Result<()> {
    let text = read(file).with_context(|| format!("reading {}", file.display()))?;
    let ast =
        syn::parse_file(&text).with_context(|| format!("parsing {} as Rust", file.display()))?;
    let mut c = Collector {
        file: file.to_path_buf(),
        path: path.clone(),
        dir,
        file_dir: file.parent().unwrap_or(Path::new("")).to_path_buf(),
        outline: Vec::new(),
        refs,
        g,
    };
    c.g.children.entry(path).or_default();
    c.visit_file(&ast);
    let outline = std::mem::take(&mut c.outline);
    for (child, candidates) in outline {
        match candidates.iter().find(|p| read(p).is_some()) {
            Some(f) => {
                let child_dir = if is_mod_rs(f) {
                    f.parent().unwrap_or(Path::new("")).to_path_buf()
                } else {
                    f.with_extension("")
                };
                load_file(f, child, child_dir, read, g, refs)?;
            }
            // A module for another target (a `#[cfg]`'d platform file, say).
            None => println!(
                "modcycles: no file for module `{}` (tried {:?}); skipped",
                child.join("::"),
                candidates
            ),
        }
    }
    Ok(())
}

/// `mod.rs`, `lib.rs` and `main.rs` own their directory; `a.rs` owns `a/`.
fn is_mod_rs(f: &Path) -> bool {
    matches!(
        f.file_name().and_then(|n| n.to_str()),
        Some("mod.rs" | "lib.rs" | "main.rs")
    )
}

/// Walks one file's items: records child modules and the paths named.
struct Collector<'a> {
    file: PathBuf,
    /// The module whose items are being read.
    path: ModPath,
    /// Where this module's outline child modules' files are.
    dir: PathBuf,
    /// The directory of the file itself (for `#[path]`).
    file_dir: PathBuf,
    /// Outline child modules to load: their path and candidate files.
    outline: Vec<(ModPath, Vec<PathBuf>)>,
    refs: &'a mut Vec<Ref>,
    g: &'a mut Graph,
}

impl Collector<'_> {
    fn push(&mut self, segs: Vec<String>) {
        if !segs.is_empty() {
            self.refs.push(Ref {
                from: self.path.clone(),
                segs,
                file: self.file.clone(),
            });
        }
    }

    /// Every path of a `use` tree, `self` leaves ending at their prefix.
    fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                Self::use_paths(&p.tree, prefix, out);
                prefix.pop();
            }
            syn::UseTree::Name(n) if n.ident == "self" => out.push(prefix.clone()),
            syn::UseTree::Name(n) => out.push(with(prefix, n.ident.to_string())),
            syn::UseTree::Rename(r) => out.push(with(prefix, r.ident.to_string())),
            syn::UseTree::Glob(_) => out.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    Self::use_paths(t, prefix, out);
                }
            }
        }
    }

    /// `crate::`/`self::`/`super::` paths in a macro's tokens (its body is
    /// not parsed as Rust).
    fn token_paths(&mut self, tokens: TokenStream) {
        let toks: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                TokenTree::Group(g) => self.token_paths(g.stream()),
                TokenTree::Ident(id) if matches!(id.to_string().as_str(), "crate" | "super") => {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) =
                        (toks.get(j), toks.get(j + 1))
                    {
                        let Some(TokenTree::Ident(next)) = toks.get(j + 2) else {
                            break;
                        };
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segs.push(next.to_string());
                        j += 3;
                    }
                    if segs.len() > 1 {
                        self.push(segs);
                    }
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

fn with(prefix: &[String], last: String) -> Vec<String> {
    let mut v = prefix.to_vec();
    v.push(last);
    v
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        let child = with(&self.path, name.clone());
        self.g
            .children
            .entry(self.path.clone())
            .or_default()
            .insert(name.clone());
        self.g.children.entry(child.clone()).or_default();
        let path_attr = m.attrs.iter().find_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value()),
                _ => None,
            },
            _ => None,
        });
        match &m.content {
            // An inline module: its items are its own, read here.
            Some((_, items)) => {
                let saved = (self.path.clone(), self.dir.clone());
                self.dir = match &path_attr {
                    Some(p) => self.file_dir.join(p),
                    None => self.dir.join(&name),
                };
                self.path = child;
                for it in items {
                    self.visit_item(it);
                }
                (self.path, self.dir) = saved;
            }
            None => {
                let candidates = match path_attr {
                    Some(p) => vec![self.file_dir.join(p)],
                    None => vec![
                        self.dir.join(format!("{name}.rs")),
                        self.dir.join(&name).join("mod.rs"),
                    ],
                };
                self.outline.push((child, candidates));
            }
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !matches!(u.vis, syn::Visibility::Inherited) {
            return; // a re-export, not a use (see the module docs)
        }
        let mut out = Vec::new();
        Self::use_paths(&u.tree, &mut Vec::new(), &mut out);
        for p in out {
            self.push(p);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.push(segs);
        syn::visit::visit_path(self, p);
    }

    /// `pub(super)`, `pub(in crate::a)`: visibility, not a use.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.token_paths(m.tokens.clone());
    }
}

impl Graph {
    /// The module a path named in `from` reaches (`None`: not a path into
    /// this crate's modules, as far as can be told without name resolution).
    fn resolve(&self, from: &ModPath, segs: &[String]) -> Option<ModPath> {
        let (mut cur, rest) = match segs.first().map(String::as_str)? {
            "crate" => (Vec::new(), &segs[1..]),
            "self" => (from.clone(), &segs[1..]),
            "super" => {
                let mut cur = from.clone();
                let mut k = 0;
                while segs.get(k).map(String::as_str) == Some("super") {
                    cur.pop()?;
                    k += 1;
                }
                (cur, &segs[k..])
            }
            // Uniform paths: a child module's name, from its parent.
            first if self.children.get(from)?.contains(first) => (from.clone(), segs),
            _ => return None,
        };
        for s in rest {
            match self.children.get(&cur) {
                Some(ch) if ch.contains(s) => cur.push(s.clone()),
                _ => break,
            }
        }
        Some(cur)
    }

    /// Every cycle's modules, one cycle per strongly connected set of two or
    /// more modules, each listed from its first module back to it.
    pub fn cycles(&self) -> Vec<Vec<ModPath>> {
        let nodes: Vec<&ModPath> = self.children.keys().collect();
        let index: BTreeMap<&ModPath, usize> =
            nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let adj: Vec<Vec<usize>> = nodes
            .iter()
            .map(|n| {
                self.edges
                    .get(*n)
                    .map(|e| e.keys().filter_map(|t| index.get(t).copied()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let comp = scc(&adj);
        let mut by_comp: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (v, &c) in comp.iter().enumerate() {
            by_comp.entry(c).or_default().push(v);
        }
        let mut out = Vec::new();
        for members in by_comp.values().filter(|m| m.len() > 1) {
            // The shortest way back to the first member, inside the set.
            let start = members[0];
            let mut prev = vec![usize::MAX; nodes.len()];
            let mut queue = std::collections::VecDeque::from([start]);
            let mut found = None;
            while let Some(v) = queue.pop_front() {
                for &w in &adj[v] {
                    if comp[w] != comp[start] {
                        continue;
                    }
                    if w == start {
                        found = Some(v);
                        break;
                    }
                    if prev[w] == usize::MAX {
                        prev[w] = v;
                        queue.push_back(w);
                    }
                }
                if found.is_some() {
                    break;
                }
            }
            // found -> start closes it: walk back from `found` to `start`.
            let mut v = found.expect("a strongly connected set has a cycle");
            let mut path = vec![v];
            while v != start {
                v = prev[v];
                path.push(v);
            }
            path.reverse();
            path.push(start);
            out.push(path.into_iter().map(|i| nodes[i].clone()).collect());
        }
        out
    }

    /// A cycle as `a -> b -> a`, with where each step is named.
    pub fn describe(&self, cycle: &[ModPath]) -> String {
        let name = |m: &ModPath| {
            if m.is_empty() {
                "crate".to_string()
            } else {
                m.join("::")
            }
        };
        let mut s = cycle.iter().map(name).collect::<Vec<_>>().join(" -> ");
        for w in cycle.windows(2) {
            let at = &self.edges[&w[0]][&w[1]];
            s.push_str(&format!("\n    {} -> {}: {at}", name(&w[0]), name(&w[1])));
        }
        s
    }

    fn edge_count(&self) -> usize {
        self.edges.values().map(BTreeMap::len).sum()
    }
}

/// Tarjan's strongly connected components: each vertex's component id.
fn scc(adj: &[Vec<usize>]) -> Vec<usize> {
    struct St<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<usize>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        comp: Vec<usize>,
        next: usize,
        ncomp: usize,
    }
    fn visit(s: &mut St<'_>, v: usize) {
        s.index[v] = s.next;
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on[v] = true;
        for &w in &s.adj[v] {
            if s.index[w] == usize::MAX {
                visit(s, w);
                s.low[v] = s.low[v].min(s.low[w]);
            } else if s.on[w] {
                s.low[v] = s.low[v].min(s.index[w]);
            }
        }
        if s.low[v] == s.index[v] {
            while let Some(w) = s.stack.pop() {
                s.on[w] = false;
                s.comp[w] = s.ncomp;
                if w == v {
                    break;
                }
            }
            s.ncomp += 1;
        }
    }
    let n = adj.len();
    let mut s = St {
        adj,
        index: vec![usize::MAX; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        comp: vec![0; n],
        next: 0,
        ncomp: 0,
    };
    for v in 0..n {
        if s.index[v] == usize::MAX {
            visit(&mut s, v);
        }
    }
    s.comp
}

/// The crate roots of a package directory.
fn crate_roots(pkg: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for f in ["src/lib.rs", "src/main.rs"] {
        if pkg.join(f).is_file() {
            roots.push(pkg.join(f));
        }
    }
    let rs_in = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .flat_map(|p| {
                if p.is_dir() && p.join("main.rs").is_file() {
                    Some(p.join("main.rs"))
                } else if p.extension().is_some_and(|e| e == "rs") {
                    Some(p)
                } else {
                    None
                }
            })
            .collect();
        v.sort();
        v
    };
    for d in ["src/bin", "tests", "benches", "examples"] {
        roots.extend(rs_in(&pkg.join(d)));
    }
    roots
}

/// Checks every crate of the workspace; fails naming each cycle found.
pub fn run(root: &Path) -> Result<()> {
    let mut pkgs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .context("listing crates/")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    pkgs.sort();
    pkgs.push(root.join("xtask"));
    // Paths relative to the workspace root, as the messages show them.
    let read = |p: &Path| std::fs::read_to_string(root.join(p)).ok();
    let (mut roots, mut found) = (0, Vec::new());
    for pkg in &pkgs {
        for r in crate_roots(pkg) {
            let r = r.strip_prefix(root).unwrap_or(&r).to_path_buf();
            let g = graph(&r, &read)?;
            roots += 1;
            let rel = r.display().to_string();
            for c in g.cycles() {
                found.push(format!("{rel}: {}", g.describe(&c)));
            }
            if g.children.len() > 1 {
                println!(
                    "modcycles: {rel}: {} modules, {} dependencies",
                    g.children.len(),
                    g.edge_count()
                );
            }
        }
    }
    if !found.is_empty() {
        for f in &found {
            println!("module cycle in {f}");
        }
        bail!(
            "{} module cycle(s) found in {roots} crate roots",
            found.len()
        );
    }
    println!("modcycles: no module cycle in {roots} crate roots");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The graph of an in-memory crate: `(path, source)` files, root `src/lib.rs`.
    fn graph_of(files: &[(&str, &str)]) -> Graph {
        let files: BTreeMap<PathBuf, String> = files
            .iter()
            .map(|(p, s)| (PathBuf::from(p), s.to_string()))
            .collect();
        graph(Path::new("src/lib.rs"), &|p| files.get(p).cloned()).unwrap()
    }

    fn names(c: &[ModPath]) -> Vec<String> {
        c.iter().map(|m| m.join("::")).collect()
    }

    #[test]
    fn a_cycle_through_crate_paths_is_found() {
        let g = graph_of(&[
            ("src/lib.rs", "mod a; mod b; mod c;"),
            ("src/a.rs", "use crate::b::B; pub struct A;"),
            (
                "src/b.rs",
                "pub struct B; fn f() -> crate::c::C { todo!() }",
            ),
            ("src/c.rs", "pub struct C; fn g(_: super::a::A) {}"),
        ]);
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(names(&cycles[0]), ["a", "b", "c", "a"]);
        let text = g.describe(&cycles[0]);
        assert!(text.contains("src/c.rs: `super::a::A`"), "{text}");
    }

    #[test]
    fn a_layered_crate_passes() {
        // mod.rs uses its children, children use lower siblings and the
        // parent re-exports them: a DAG.
        let g = graph_of(&[
            ("src/lib.rs", "pub mod cpu; mod ffi; pub use cpu::Shape;"),
            (
                "src/cpu/mod.rs",
                "mod kernel; mod types; pub use types::Shape; use kernel::run;\n\
                 pub fn forward() { run() }\n\
                 #[cfg(test)] mod tests { use super::*; }",
            ),
            (
                "src/cpu/kernel.rs",
                "use super::types::Shape; pub(super) fn run() {}\n\
                 pub(in crate::cpu) struct K;",
            ),
            ("src/cpu/types.rs", "pub struct Shape;"),
            (
                "src/ffi.rs",
                "use crate::cpu::{self, Shape}; fn f() { cpu::forward() }",
            ),
        ]);
        assert!(g.cycles().is_empty(), "{:?}", g.cycles());
        let e = |a: &str, b: &str| {
            let p = |s: &str| -> ModPath {
                s.split("::")
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            };
            g.edges.get(&p(a)).is_some_and(|m| m.contains_key(&p(b)))
        };
        assert!(e("cpu::kernel", "cpu::types"));
        assert!(!e("cpu::kernel", "cpu"), "pub(super) is not a use");
        assert!(e("cpu", "cpu::kernel"));
        assert!(e("ffi", "cpu"));
        assert!(e("cpu::tests", "cpu"));
        assert!(!e("", "cpu"), "a pub use is not a use");
    }

    #[test]
    fn super_to_the_parents_items_is_resolved_to_the_parent() {
        // The child names an item of its parent (not a sibling), and the
        // parent uses the child: a cycle between the two.
        let g = graph_of(&[
            ("src/lib.rs", "mod scan;"),
            (
                "src/scan/mod.rs",
                "mod ffi; pub struct Elem; fn go() { ffi::call() }",
            ),
            ("src/scan/ffi.rs", "pub fn call() { let _ = super::Elem; }"),
        ]);
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1);
        assert_eq!(names(&cycles[0]), ["scan", "scan::ffi", "scan"]);
    }

    #[test]
    fn inline_modules_macros_and_path_attributes() {
        let g = graph_of(&[
            (
                "src/lib.rs",
                "#[path = \"impls/x.rs\"] mod x; mod y;\n\
                 mod z { pub fn f() { println!(\"{}\", crate::x::N); } }",
            ),
            (
                "src/impls/x.rs",
                "pub const N: u8 = 1; fn g() { crate::y::h() }",
            ),
            ("src/y.rs", "pub fn h() { crate::z::f() }"),
        ]);
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        let mut got = names(&cycles[0]);
        got.pop();
        got.sort();
        assert_eq!(got, ["x", "y", "z"]);
    }

    #[test]
    fn the_workspace_is_read() {
        // The real crates parse and this crate's own modules are found.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let g = graph(&root.join("src/main.rs"), &|p| {
            std::fs::read_to_string(p).ok()
        })
        .unwrap();
        assert!(g.children.contains_key(&vec!["modcycles".to_string()]));
        assert!(g.edge_count() > 0);
    }
}
