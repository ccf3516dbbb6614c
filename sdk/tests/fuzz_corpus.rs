//! The short, deterministic pass over the fuzzers' saved inputs that `make test` runs: every
//! file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same
//! function its fuzz target calls (`fuzz/src/lib.rs`, included here), so a crash a fuzzer once
//! found stays fixed without nightly Rust or cargo-fuzz. `make fuzz` grows the corpus.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod checks;

/// Feeds every saved input of `target` to `check`, naming the file that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(fuzz.join(dir).join(target)).ok())
        .flatten()
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no saved inputs for fuzz target {target}"
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a saved input");
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} saved inputs of {target} fail: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn header_block_corpus_replays() {
    replay("header_block", checks::header_block);
}

#[test]
fn records_corpus_replays() {
    replay("records", checks::records);
}

#[test]
fn duration_corpus_replays() {
    replay("duration", checks::duration);
}

#[test]
fn jsonl_corpus_replays() {
    replay("jsonl", checks::jsonl);
}
