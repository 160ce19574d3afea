//! Replays the fuzz seeds (`fuzz/seeds/<target>/`) and every input a fuzzer once failed on
//! (`fuzz/regressions/<target>/`) through the same `sockudo::fuzz_targets` function the
//! cargo-fuzz binary runs, so that a fixed crash stays fixed under stable `cargo test`.

use std::path::{Path, PathBuf};

use sockudo::fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_seed_and_regression_replays_without_a_panic() {
    let fuzz = fuzz_dir();
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        let mut replayed = 0;
        for kind in ["seeds", "regressions"] {
            // A target may have no regressions yet; seeds are checked below.
            let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
            let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
            paths.sort();
            for path in paths {
                let input = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| run(&input)).is_err() {
                    failed.push(path.display().to_string());
                }
                replayed += 1;
            }
        }
        assert!(replayed > 0, "fuzz target {target} has no inputs in fuzz/seeds/{target}/");
    }
    assert!(failed.is_empty(), "fuzz inputs that panic: {failed:?}");
}

/// The list the regression test replays and the cargo-fuzz binaries are the same set.
#[test]
fn every_fuzz_binary_is_replayed() {
    let mut binaries: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let mut replayed: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    replayed.sort();
    assert_eq!(binaries, replayed);
}
