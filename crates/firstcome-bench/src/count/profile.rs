//! A callgrind profile read into each function's own instructions and the
//! cost of each call edge, and what a [`Layer`] (a named set of functions)
//! costs in it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

/// A callgrind profile: every function's own instructions (`Ir`) and the
/// inclusive cost of every call edge.
#[derive(Debug, Default)]
pub struct Profile {
    names: Vec<String>,
    own: Vec<u64>,
    /// (caller, callee, instructions of the call, callee's included).
    calls: Vec<(usize, usize, u64)>,
}

impl Profile {
    /// Reads a callgrind output file (any compression of names; the first
    /// event column, which is `Ir` by default).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut p = Profile::default();
        // Compressed names: `(id) name` defines, `(id)` refers. Files
        // (`fl`, `fi`, `fe`, `cfi`, `cfl`) share one space, functions
        // (`fn`, `cfn`) another.
        let (mut files, mut fns) = (Names::default(), Names::default());
        let mut nodes: HashMap<String, usize> = HashMap::new();
        // The function's file, the file of the lines now (differs inside
        // inlined code: `fi=`/`fe=`), the function.
        let (mut fl, mut file, mut function) = (String::new(), String::new(), None::<String>);
        let mut callee: Option<(Option<String>, String)> = None;
        let mut call_line_next = false;
        // Columns before the costs: one per `positions:` name (`line` when
        // absent).
        let mut positions = 1;
        for line in text.lines() {
            let Some((key, value)) = line
                .split_once('=')
                .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase()))
            else {
                if let Some(names) = line.strip_prefix("positions:") {
                    positions = names.split_whitespace().count();
                    continue;
                }
                let Some(first) = line.chars().next() else {
                    continue;
                };
                if !(first.is_ascii_digit() || matches!(first, '+' | '-' | '*')) {
                    continue;
                }
                let cost: u64 = line
                    .split_whitespace()
                    .nth(positions)
                    .map_or(Ok(0), str::parse)
                    .with_context(|| format!("a cost line: {line}"))?;
                let f = function.as_deref().context("a cost before any fn=")?;
                let from = p.node(&mut nodes, &file, f);
                if std::mem::take(&mut call_line_next) {
                    let (cfile, cfn) = callee.take().context("calls= without cfn=")?;
                    let to = p.node(&mut nodes, cfile.as_deref().unwrap_or(&file), &cfn);
                    p.calls.push((from, to, cost));
                } else {
                    p.own[from] += cost;
                }
                continue;
            };
            match key {
                "fl" => {
                    fl = files.resolve(value);
                    file = fl.clone();
                }
                "fi" | "fe" => file = files.resolve(value),
                "fn" => {
                    function = Some(fns.resolve(value));
                    file = fl.clone();
                }
                "cfi" | "cfl" => {
                    let f = files.resolve(value);
                    match &mut callee {
                        Some((cfile, _)) => *cfile = Some(f),
                        None => callee = Some((Some(f), String::new())),
                    }
                }
                "cfn" => {
                    let name = fns.resolve(value);
                    match &mut callee {
                        Some((_, cfn)) if cfn.is_empty() => *cfn = name,
                        _ => callee = Some((None, name)),
                    }
                }
                "calls" => call_line_next = true,
                _ => {}
            }
        }
        anyhow::ensure!(!p.names.is_empty(), "no functions in the profile");
        Ok(p)
    }

    /// The index of function `name` in `file`, shown as `file:name` (as
    /// `callgrind_annotate` does), so a layer can name either.
    fn node(&mut self, nodes: &mut HashMap<String, usize>, file: &str, name: &str) -> usize {
        let key = format!("{file}:{name}");
        if let Some(&i) = nodes.get(&key) {
            return i;
        }
        self.names.push(key.clone());
        self.own.push(0);
        nodes.insert(key, self.names.len() - 1);
        self.names.len() - 1
    }

    /// Every instruction of the profile.
    pub fn total(&self) -> u64 {
        self.own.iter().sum()
    }

    /// What `layer` costs: see [`Kind`].
    pub fn cost(&self, layer: &Layer) -> u64 {
        let inside: Vec<bool> = self.names.iter().map(|n| layer.matches(n)).collect();
        match layer.kind {
            Kind::Set => {
                let own: u64 = (0..self.names.len())
                    .filter(|&f| inside[f])
                    .map(|f| self.own[f])
                    .sum();
                let out: u64 = self
                    .calls
                    .iter()
                    .filter(|&&(from, to, _)| inside[from] && !inside[to])
                    .map(|&(_, _, c)| c)
                    .sum();
                own + out
            }
            Kind::Under => {
                // Inclusive cost of the matching slices of each function,
                // summed per function; the outermost function has the most.
                let mut per_function: HashMap<&str, u64> = HashMap::new();
                for (f, name) in self.names.iter().enumerate() {
                    if inside[f] {
                        let function = name.split_once(':').map_or(name.as_str(), |(_, n)| n);
                        *per_function.entry(function).or_default() += self.own[f];
                    }
                }
                for &(from, _, c) in &self.calls {
                    if inside[from] {
                        let name = &self.names[from];
                        let function = name.split_once(':').map_or(name.as_str(), |(_, n)| n);
                        *per_function.entry(function).or_default() += c;
                    }
                }
                per_function.into_values().max().unwrap_or(0)
            }
        }
    }

    /// The `n` functions with the most own instructions, for finding what a
    /// layer should name.
    pub fn top_own(&self, n: usize) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self
            .names
            .iter()
            .map(String::as_str)
            .zip(self.own.iter().copied())
            .collect();
        all.sort_by_key(|a| std::cmp::Reverse(a.1));
        all.truncate(n);
        all
    }
}

/// Compressed names of one kind.
#[derive(Default)]
struct Names(HashMap<String, String>);

impl Names {
    /// The name a `(id) name`, `(id)` or `name` spec stands for.
    fn resolve(&mut self, spec: &str) -> String {
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) if rest.trim().is_empty() => {
                self.0.get(id).cloned().unwrap_or_default()
            }
            Some((id, rest)) => {
                let name = rest.trim().to_owned();
                self.0.insert(id.to_owned(), name.clone());
                name
            }
            None => spec.trim().to_owned(),
        }
    }
}

/// A layer of a binary: the functions whose `file:name` (as
/// `callgrind_annotate` shows them; the file is where the code was
/// written, so code inlined into a caller still counts for its own layer)
/// contains one of `contains`.
#[derive(Debug, Clone, Copy)]
pub struct Layer {
    /// What the report calls it.
    pub name: &'static str,
    /// Substrings of the `file:name` of the functions that belong to it.
    pub contains: &'static [&'static str],
    /// How its cost is counted.
    pub kind: Kind,
}

/// How a layer's cost is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A step of the request's path, with all it calls: the inclusive cost
    /// of the outermost matching function (the one with the most), that is
    /// of the part of it the patterns match when they name a file (code
    /// inlined from that file). Nested steps hold each other's cost.
    Under,
    /// A library, wherever it is called from: every instruction executed
    /// while one of its functions is on the stack, counted once per entry
    /// from outside it.
    Set,
}

impl Layer {
    /// Whether `name` is one of the layer's functions. A recursive call
    /// (callgrind names it `f'2`, `f'3`, …: `f` is on the stack already,
    /// often below an outside wrapper such as a middleware's `Next`) is
    /// not: its cost is inside the outer call's already.
    fn matches(&self, name: &str) -> bool {
        let recursive = name
            .rsplit_once('\'')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        !recursive && self.contains.iter().any(|c| name.contains(c))
    }
}

/// A step of the path, with all it calls ([`Kind::Under`]).
pub(crate) const fn step(name: &'static str, contains: &'static [&'static str]) -> Layer {
    Layer {
        name,
        contains,
        kind: Kind::Under,
    }
}

/// A library, wherever called ([`Kind::Set`]).
pub(crate) const fn layer(name: &'static str, contains: &'static [&'static str]) -> Layer {
    Layer {
        name,
        contains,
        kind: Kind::Set,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
version: 1
creator: callgrind-3.19.0
events: Ir
positions: line

fl=(1) main.rs
fn=(1) main
5 10
cfl=(2) work.rs
cfn=(2) work
calls=2 0
0 100
cfn=(3) other
calls=1 0
0 30

fl=(2)
fn=(2)
0 50
fi=(3) inlined.rs
0 20
cfl=(1)
cfn=(3)
calls=1 0
0 30

fl=(1)
fn=(3)
0 60

totals: 140
";

    #[test]
    fn own_costs_and_call_edges_come_out_of_compressed_names() {
        let p = Profile::parse(SAMPLE).unwrap();
        assert_eq!(p.total(), 140);
        assert_eq!(p.cost(&layer("l", &[":main"])), 140);
        // work's own 70 (20 of them inlined from another file) and its call
        // of other (30).
        assert_eq!(p.cost(&layer("l", &[":work"])), 100);
        // work and other together: work's calls of other are inside already,
        // main's call of other is another entry.
        assert_eq!(p.cost(&layer("l", &[":work", ":other"])), 130);
        // The inlined lines, with the call made from them.
        assert_eq!(p.cost(&layer("l", &["inlined.rs:"])), 50);
        assert_eq!(p.top_own(1), vec![("main.rs:other", 60)]);
    }

    #[test]
    fn a_step_is_its_outermost_function_with_all_it_calls() {
        let p = Profile::parse(SAMPLE).unwrap();
        // main holds work, which holds other: the step is main's 140,
        // not 140 + 100 + 30.
        assert_eq!(p.cost(&step("s", &[":main", ":work", ":other"])), 140);
        // work's own slice and the one inlined from inlined.rs are one
        // function: 50 + 20 own, 30 called.
        assert_eq!(p.cost(&step("s", &[":work"])), 100);
        // A file names only the slice written there.
        assert_eq!(p.cost(&step("s", &["inlined.rs:"])), 50);
    }

    #[test]
    fn a_recursive_call_is_counted_once_in_its_outer_call() {
        // f calls a wrapper, which calls f again (f'2): f's cost is its
        // call of the wrapper, not that plus f'2's again.
        let p = Profile::parse(
            "fl=(1) a.rs\nfn=(1) f\n0 1\ncfn=(2) wrap\ncalls=1 0\n0 10\n\
             fn=(2)\n0 1\ncfn=(3) f'2\ncalls=1 0\n0 9\n\
             fn=(3)\n0 9\n",
        )
        .unwrap();
        assert_eq!(p.total(), 11);
        assert_eq!(p.cost(&layer("l", &[":f"])), 11);
    }

    #[test]
    fn a_profile_without_functions_is_an_error() {
        assert!(Profile::parse("events: Ir\n").is_err());
    }
}
