//! The workspace's own source files, for the tests that read the code
//! (`statements`: its SQL; `layout`: its imports).

use std::path::{Path, PathBuf};

/// The `.rs` files under `crates/KRATE/src`, in no particular order.
pub fn rust_files(krate: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![src(krate)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// `crates/KRATE/src`.
pub fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates")
        .join(krate)
        .join("src")
}
