//! The crates' module graphs have no cycles: a module never uses (through `crate::`,
//! `super::`, `self::` or a child's name) a module that uses it back, directly or around a
//! loop. Each module can then be read, tested and changed knowing only the modules below it;
//! in the custom-op library the op contracts (`ops/`) sit below the kernels of every execution
//! provider, which register their own ops.
//!
//! Read from the sources, not from a tool: every `.rs` file is a module (`mod.rs` and `lib.rs`
//! are their folder's); a path is resolved to the deepest module it names. A module's use of
//! its own ancestors (a child reading what the folder around it defines) is nesting, not a
//! dependency, and is not counted; its use of a child, a sibling or anything else is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

/// The modules of the crate whose root file is `root/lib.rs` (or `main.rs`), by file.
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "bin") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap();
            let mut segs: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            let last = segs.pop().unwrap();
            let stem = last.trim_end_matches(".rs");
            if !matches!(stem, "mod" | "lib" | "main") {
                segs.push(stem.to_string());
            } else if stem != "mod" && !segs.is_empty() {
                continue;
            }
            out.insert(segs, p);
        }
    }
    out
}

/// The paths a file names: `crate::a::b`, `super::a`, `self::a`, and `a::b` for a module `a`
/// the file declares.
fn references(text: &str, me: &ModPath, children: &BTreeSet<String>) -> Vec<ModPath> {
    let mut out = Vec::new();
    // Inline `mod tests { ... }` at a file's end: `super` there is the file's own module.
    let mut in_tests = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        if code.trim_start().starts_with("mod tests {") {
            in_tests = true;
        }
        let bytes = code.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            if !word_start {
                i += 1;
                continue;
            }
            let len = bytes[i..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b':').count();
            if len == 0 {
                i += 1;
                continue;
            }
            let path = &code[i..i + len];
            i += len;
            if !path.contains("::") {
                continue;
            }
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let Some(&first) = segs.first() else { continue };
            let mut base: ModPath = match first {
                "crate" => Vec::new(),
                "self" => me.clone(),
                "super" => {
                    let mut b = me.clone();
                    if in_tests {
                        b.push("tests".into());
                    }
                    b
                }
                c if children.contains(c) => me.clone(),
                _ => continue,
            };
            let mut rest_segs = &segs[..];
            if first == "crate" || first == "self" {
                rest_segs = &segs[1..];
            }
            while let Some(&"super") = rest_segs.first() {
                base.pop();
                rest_segs = &rest_segs[1..];
            }
            base.extend(rest_segs.iter().map(|s| s.to_string()));
            out.push(base);
        }
    }
    out
}

/// Module-to-module edges of one crate (deepest module each path names).
fn graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mods = modules(src);
    let mut g: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (me, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let children: BTreeSet<String> = mods
            .keys()
            .filter(|m| m.len() == me.len() + 1 && m.starts_with(me))
            .map(|m| m.last().unwrap().clone())
            .collect();
        let edges = g.entry(me.clone()).or_default();
        for r in references(&text, me, &children) {
            let target = (0..=r.len()).rev().map(|n| r[..n].to_vec()).find(|p| mods.contains_key(p));
            let Some(t) = target else { continue };
            // Itself, or an ancestor it is nested in: not a dependency.
            if me.starts_with(&t) {
                continue;
            }
            edges.insert(t);
        }
    }
    g
}

/// A cycle of `g`, if it has one.
fn find_cycle(g: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        n: &ModPath,
        g: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn show(c: &[ModPath]) -> String {
    c.iter().map(|m| if m.is_empty() { "crate".to_string() } else { m.join("::") }).collect::<Vec<_>>().join(" -> ")
}

#[test]
fn no_module_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cycles = Vec::new();
    for src in ["src", "provider/src", "graph-rewrite/src", "models/src", "fuzz/harness/src"] {
        let g = graph(&root.join(src));
        assert!(g.len() > 1 || src == "fuzz/harness/src", "{src}: no modules found");
        if let Some(c) = find_cycle(&g) {
            cycles.push(format!("{src}: {}", show(&c)));
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

/// The checker finds the cycles it is for (the custom-op library's layout before the two op
/// families were separated: the op contract created its kernels, which imported it back).
#[test]
fn the_checker_finds_a_cycle() {
    let dir = std::env::temp_dir().join(format!("qins-layers-{}", std::process::id()));
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("lib.rs", "pub mod ops;\npub mod cpu;\n");
    write("ops/mod.rs", "pub mod qins_matmul;\n");
    write("ops/qins_matmul.rs", "fn cpu_ops() { crate::cpu::qins_matmul::create(); }\n");
    write("cpu/mod.rs", "pub mod qins_matmul;\n");
    write("cpu/qins_matmul.rs", "use crate::ops::qins_matmul::Node;\npub fn create() {}\n");
    let c = find_cycle(&graph(&dir)).expect("the cycle");
    assert!(show(&c).contains("ops::qins_matmul") && show(&c).contains("cpu::qins_matmul"), "{}", show(&c));
    // A child reading its folder's items is nesting, not a cycle.
    write("ops/qins_matmul.rs", "use super::DOMAIN;\n");
    assert_eq!(find_cycle(&graph(&dir)), None);
    std::fs::remove_dir_all(&dir).ok();
}
