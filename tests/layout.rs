//! The module map in docs/architecture.md is the code's: for each crate its
//! table lists the modules in layers, top to bottom (one row, one layer),
//! and this test reads every source file and checks that
//! - every module is on the map (itself or a listed ancestor), and every
//!   module on the map exists;
//! - a module refers (`use`, or a path in code) only to modules of its own
//!   row or of rows below it, never to one above;
//! - the references between the map's modules make no loop, inside a row
//!   either.
//!
//! Comments and string literals are not read: a doc link is not an import.
//! A crate's root (`lib.rs`, `main.rs`) is the row `lib` or `main`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use firstcome_suite::sources;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One module's text, comments and string literals blanked.
struct Source {
    module: Vec<String>,
    code: String,
}

/// Blanks comments and string and char literals (kept as spaces, so
/// nothing joins across them).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            i += end;
            out.push(' ');
        } else if rest.starts_with("r\"") || rest.starts_with("r#") {
            let hashes = rest[1..].bytes().take_while(|&c| c == b'#').count();
            let open = 1 + hashes;
            if rest.as_bytes().get(open) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let end = rest[open + 1..]
                .find(&close)
                .map_or(rest.len(), |e| open + 1 + e + close.len());
            i += end;
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && is_char_literal(rest) {
            // After an escape (`'\''`) the closing quote is further on.
            let from = if b[i + 1] == b'\\' { 3 } else { 1 };
            let end = rest[from..].find('\'').map_or(rest.len(), |e| from + e + 1);
            i += end;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `'a'`, `'\n'`, `'\''`: a char literal, not a lifetime.
fn is_char_literal(rest: &str) -> bool {
    let b = rest.as_bytes();
    match b.get(1) {
        Some(b'\\') => true,
        Some(_) => {
            let c = rest[1..].chars().next().unwrap();
            rest[1 + c.len_utf8()..].starts_with('\'')
        }
        None => false,
    }
}

/// The files of a crate's `src`, each with its module path.
fn sources(krate: &str) -> Vec<(Vec<String>, String)> {
    let src = sources::src(krate);
    let files = sources::rust_files(krate);
    files
        .into_iter()
        .map(|path: PathBuf| {
            let rel = path.strip_prefix(&src).unwrap().with_extension("");
            let mut module: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            (module, std::fs::read_to_string(&path).unwrap())
        })
        .collect()
}

/// Splits the inline modules (`mod name { .. }`) out of `code`, each its
/// own source under `module`.
fn split_inline(module: Vec<String>, code: &str, out: &mut Vec<Source>) {
    let mut outer = String::new();
    let mut rest = code;
    while let Some(at) = find_inline_mod(rest) {
        let (name, open) = at;
        outer.push_str(&rest[..open]);
        let body_start = open + rest[open..].find('{').unwrap() + 1;
        let mut depth = 1;
        let mut end = body_start;
        for (k, c) in rest[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = body_start + k;
                break;
            }
        }
        let mut inner = module.clone();
        inner.push(name);
        split_inline(inner, &rest[body_start..end], out);
        rest = &rest[end + 1..];
    }
    outer.push_str(rest);
    out.push(Source {
        module,
        code: outer,
    });
}

/// The next `mod name {`: the name and where `mod` starts.
fn find_inline_mod(code: &str) -> Option<(String, usize)> {
    let mut from = 0;
    while let Some(k) = code[from..].find("mod ") {
        let at = from + k;
        from = at + 4;
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let after = code[at + 4..].trim_start();
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && after[name.len()..].trim_start().starts_with('{') {
            return Some((name, at));
        }
    }
    None
}

/// Every path a `use` tree names, written out (`a::{b, c::d}` is `a::b`
/// and `a::c::d`).
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap()];
        let prefix = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&prefix, &inner[start..k], out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand(&prefix, &inner[start..], out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap().trim();
        out.push(join(prefix, path));
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}::{b}"),
    }
}

/// The paths `code` names: its `use` trees and the `crate::`, `super::`
/// and `self::` paths in its code.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = String::new();
    let mut tail = code;
    while let Some(k) = find_word(tail, "use") {
        rest.push_str(&tail[..k]);
        if tail[k + 3..].trim_start().starts_with('<') {
            // `impl Future + use<>`: a capture list, not an import.
            rest.push_str("use");
            tail = &tail[k + 3..];
            continue;
        }
        let end = tail[k..].find(';').map_or(tail.len(), |e| k + e);
        expand("", &tail[k + 3..end], &mut out);
        tail = &tail[(end + 1).min(tail.len())..];
    }
    rest.push_str(tail);
    for word in ["crate", "super", "self"] {
        let mut from = 0;
        while let Some(k) = find_word(&rest[from..], word) {
            let at = from + k;
            let path: String = rest[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            from = at + path.len().max(1);
            if path.contains("::") {
                out.push(path);
            }
        }
    }
    out
}

/// Where `word` starts as a whole word in `code`.
fn find_word(code: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = code[from..].find(word) {
        let at = from + k;
        let before = code[..at].chars().next_back();
        let after = code[at + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !ident(before) && !ident(after) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The module `path` (as written in `from`) lands in: the longest known
/// module it starts with; `None` for another crate or the standard library.
fn resolve(
    path: &str,
    from: &[String],
    children: &BTreeSet<Vec<String>>,
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut abs: Vec<String> = match segs.first().copied()? {
        "crate" => {
            segs.remove(0);
            Vec::new()
        }
        "self" => {
            segs.remove(0);
            from.to_vec()
        }
        "super" => {
            let mut base = from.to_vec();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
            base
        }
        first => {
            let mut child = from.to_vec();
            child.push(first.to_owned());
            if !children.contains(&child) {
                return None;
            }
            from.to_vec()
        }
    };
    let mut best = abs.clone();
    for s in segs {
        abs.push(s.to_owned());
        if modules.contains(&abs) {
            best = abs.clone();
        }
    }
    Some(best)
}

/// The rows of the crate's table in docs/architecture.md: each row the
/// module paths written in backticks in its first cell (none without the
/// section).
fn map_rows(doc: &str, krate: &str) -> Vec<Vec<String>> {
    let head = format!("### `{krate}`");
    let Some(at) = doc.find(&head) else {
        return Vec::new();
    };
    let section = &doc[at..];
    let section = &section[head.len()..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cell = l.split('|').nth(1).unwrap();
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|m| {
                    !m.is_empty()
                        && m.chars()
                            .all(|c| c.is_ascii_lowercase() || c == '_' || c == ':')
                })
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// What is wrong with `krate`'s layers, one line each.
fn check(krate: &str, doc: &str) -> Vec<String> {
    let rows = map_rows(doc, krate);
    let mut problems = Vec::new();
    if rows.is_empty() {
        problems.push(format!(
            "no map: a section \"### `{krate}`\" with its table"
        ));
    }
    let mut layer_of: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        for m in row {
            let path: Vec<String> = match m.as_str() {
                "lib" | "main" => Vec::new(),
                m => m.split("::").map(str::to_owned).collect(),
            };
            if layer_of.insert(path, i).is_some() {
                problems.push(format!("`{m}` is on the map twice"));
            }
        }
    }
    let mut sources_ = Vec::new();
    for (module, text) in sources(krate) {
        split_inline(module, &strip(&text), &mut sources_);
    }
    let modules: BTreeSet<Vec<String>> = sources_.iter().map(|s| s.module.clone()).collect();
    for listed in layer_of.keys() {
        if !modules.contains(listed) {
            problems.push(format!(
                "`{}` is on the map but not in src",
                listed.join("::")
            ));
        }
    }
    // A module's place: itself if listed, else its nearest listed ancestor
    // (the root stands for itself alone).
    let place = |m: &[String]| -> Option<Vec<String>> {
        let lowest = usize::from(!m.is_empty());
        (lowest..=m.len())
            .rev()
            .map(|n| m[..n].to_vec())
            .find(|p| layer_of.contains_key(p))
    };
    let mut edges: BTreeSet<(Vec<String>, Vec<String>)> = BTreeSet::new();
    for s in &sources_ {
        let Some(from) = place(&s.module) else {
            problems.push(format!("`{}` is not on the map", s.module.join("::")));
            continue;
        };
        let children: BTreeSet<Vec<String>> = modules
            .iter()
            .filter(|m| m.len() == s.module.len() + 1 && m.starts_with(&s.module))
            .cloned()
            .collect();
        for path in paths(&s.code) {
            let Some(target) = resolve(&path, &s.module, &children, &modules) else {
                continue;
            };
            let Some(to) = place(&target) else { continue };
            if to == from {
                continue;
            }
            if layer_of[&to] < layer_of[&from] {
                problems.push(format!(
                    "`{}` (row {}) names `{path}` in `{}` (row {}), a row above it",
                    s.module.join("::"),
                    layer_of[&from] + 1,
                    to.join("::"),
                    layer_of[&to] + 1
                ));
            }
            edges.insert((from.clone(), to));
        }
    }
    if let Some(cycle) = find_cycle(&edges) {
        let names: Vec<String> = cycle
            .iter()
            .map(|m| format!("`{}`", m.join("::")))
            .collect();
        problems.push(format!("a loop: {}", names.join(" -> ")));
    }
    problems.sort();
    problems.dedup();
    problems
}

/// A loop in the graph, if there is one.
fn find_cycle(edges: &BTreeSet<(Vec<String>, Vec<String>)>) -> Option<Vec<Vec<String>>> {
    let mut next: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // 0 unseen, 1 on the path, 2 done.
    let mut state: BTreeMap<&Vec<String>, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a Vec<String>,
        next: &BTreeMap<&'a Vec<String>, Vec<&'a Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        path: &mut Vec<&'a Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        state.insert(n, 1);
        path.push(n);
        for m in next.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == m).unwrap();
                    let mut cycle: Vec<Vec<String>> =
                        path[start..].iter().map(|p| (*p).clone()).collect();
                    cycle.push((*m).clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let nodes: Vec<&Vec<String>> = next.keys().copied().collect();
    for n in nodes {
        if state.get(n).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, &next, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/architecture.md")).unwrap()
}

#[test]
fn each_crate_imports_only_down_its_map_in_the_architecture_doc() {
    let doc = doc();
    let mut problems = Vec::new();
    for krate in [
        "firstcome",
        "firstcome-ingress",
        "firstcome-worker",
        "firstcome-bench",
    ] {
        problems.extend(
            check(krate, &doc)
                .into_iter()
                .map(|p| format!("{krate}: {p}")),
        );
    }
    assert!(
        problems.is_empty(),
        "docs/architecture.md's module maps and the code differ:\n{}",
        problems.join("\n")
    );
}

/// The reader finds what it must: an upward import, a loop, a module off
/// the map, and nothing in comments or strings.
#[test]
fn the_reader_sees_an_upward_import_a_loop_and_a_missing_module() {
    let code = strip(
        "use crate::{a::X, b};\n// use crate::top;\nfn f() { let s = \"crate::top\"; crate::c::g(); }\nmod t { use super::*; }",
    );
    let mut found = paths(&code);
    found.sort();
    assert_eq!(
        found,
        ["crate::a::X", "crate::b", "crate::c::g", "super::*"]
    );
    let mut split = Vec::new();
    split_inline(vec!["m".into()], &code, &mut split);
    assert_eq!(split.len(), 2, "the inline module is its own source");

    let one = |a: &str, b: &str| (vec![a.to_owned()], vec![b.to_owned()]);
    let loop_ = BTreeSet::from([one("a", "b"), one("b", "c"), one("c", "a")]);
    assert!(find_cycle(&loop_).is_some());
    let chain = BTreeSet::from([one("a", "b"), one("b", "c"), one("a", "c")]);
    assert!(find_cycle(&chain).is_none());

    // The worker's map with its consumer moved below the pipeline.
    let doc = doc();
    let head = "### `firstcome-worker`";
    let at = doc.find(head).unwrap();
    let section_end = at + doc[at + 1..].find("\n#").unwrap() + 1;
    let section = &doc[at..section_end];
    let consumer = section
        .lines()
        .find(|l| l.starts_with("| `consumer`"))
        .unwrap();
    let pipeline = section
        .lines()
        .find(|l| l.starts_with("| `pipeline`"))
        .unwrap();
    let swapped = section
        .replace(consumer, "@@")
        .replace(pipeline, consumer)
        .replace("@@", pipeline);
    let problems = check("firstcome-worker", &swapped);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("`consumer`") && p.contains("a row above it")),
        "{problems:?}"
    );
    let dropped = section.replace(consumer, "");
    let problems = check("firstcome-worker", &dropped);
    assert!(
        problems.iter().any(|p| p == "`consumer` is not on the map"),
        "{problems:?}"
    );
}
