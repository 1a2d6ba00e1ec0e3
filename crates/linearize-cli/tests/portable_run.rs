//! A run directory does not depend on the working directory: a recipe with relative paths,
//! killed mid-run, resumes from another directory; the token cache follows `--output`.
mod common;

use common::{linearize, send_signal, stderr, tiny_job, train_records, write_recipe};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn a_killed_job_with_relative_paths_resumes_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    // The tiny recipe with every path relative to `dir`.
    let recipe = write_recipe(dir.path(), "");
    let prefix = format!("{}/", dir.path().display());
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace(&prefix, "");
    assert!(
        !text.contains(&prefix) && text.contains("path: train.txt"),
        "{text}"
    );
    std::fs::write(&recipe, text).unwrap();

    let run_dir = dir.path().join("runs/tiny");
    let mut child = linearize(&["--recipe", "recipe.yaml"])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !train_records(&run_dir)
        .iter()
        .any(|r| r["step"].as_u64() >= Some(6))
    {
        assert!(child.try_wait().unwrap().is_none(), "ended before step 6");
        assert!(Instant::now() < deadline, "no step 6 within 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    send_signal("KILL", child.id());
    child.wait().unwrap();
    assert!(!run_dir.join("adapters.safetensors").exists());

    // Every path of the resolved recipe is absolute.
    let resolved = std::fs::read_to_string(run_dir.join("recipe.resolved.yaml")).unwrap();
    for key in ["output:", "source:", "path:"] {
        for line in resolved.lines().filter(|l| l.trim_start().starts_with(key)) {
            let value = line.split_once(':').unwrap().1.trim().trim_matches('\'');
            assert!(Path::new(value).is_absolute(), "{line}\n{resolved}");
        }
    }

    let elsewhere = tempfile::tempdir().unwrap();
    let output = linearize(&["resume", run_dir.to_str().unwrap()])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(run_dir.join("adapters.safetensors").is_file());
    assert!(run_dir.join("model/config.json").is_file());
    // The default token cache is beside the run directory, not in the working directory.
    assert!(dir.path().join("runs/.token-cache").is_dir());
    assert!(std::fs::read_dir(elsewhere.path())
        .unwrap()
        .next()
        .is_none());
}
