//! `--dry-run` is dry: no weights, no GPU, no network, and every check that needs none of them.
mod common;

use common::{linearize, stderr, tiny_job, write_recipe};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn recipes(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

/// Every shipped recipe plans offline, on a machine without a GPU, with empty caches: hub models
/// cannot be reached, the offline model and corpus are not fetched, Alpaca is not downloaded; the
/// plan says what it could not check and succeeds on the rest.
#[test]
fn every_shipped_recipe_dry_runs_offline() {
    let root = workspace();
    let empty = tempfile::tempdir().unwrap();
    let mut all = recipes(&root.join("recipes"));
    all.extend(recipes(&root.join("recipes/quality")));
    assert!(all.len() >= 20, "{all:?}");
    let docs = std::fs::read_to_string(root.join("docs/recipes.md")).unwrap();
    let mut names = std::collections::BTreeMap::new();
    for recipe in all {
        let file = recipe.strip_prefix(&root).unwrap().display().to_string();
        assert!(
            docs.contains(&format!("`{file}`")),
            "docs/recipes.md does not list {file}"
        );
        let output = linearize(&["--recipe", recipe.to_str().unwrap(), "--dry-run"])
            .current_dir(&root)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", empty.path().join("hf"))
            .env("LINEARIZE_CACHE", empty.path().join("linearize"))
            // Nothing may be reached: a proxy that does not exist.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let plan = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: {}\n{plan}",
            recipe.display(),
            stderr(&output)
        );
        assert!(
            plan.contains("recipe hash") && plan.contains("planned for that device"),
            "{}: {plan}",
            recipe.display()
        );
        // Two recipes of one name would share a run directory.
        let name = plan
            .lines()
            .find_map(|l| l.strip_prefix("recipe      "))
            .unwrap()
            .to_string();
        if let Some(other) = names.insert(name.clone(), file.clone()) {
            panic!("{file} and {other} are both named {name}");
        }
        let text = std::fs::read_to_string(&recipe).unwrap();
        if text.contains("source: \"meta-llama") || text.contains("source: \"Qwen") {
            assert!(
                plan.contains("not checked on this machine") && plan.contains("HF_HUB_OFFLINE"),
                "{}: {plan}",
                recipe.display()
            );
        }
        // Alpaca by hub id: offline and not cached, its file list is not checked here.
        if text.contains("alpaca_clean.yaml") {
            assert!(
                plan.contains("data.sources[0].hub") && plan.contains("yahma/alpaca-cleaned"),
                "{}: {plan}",
                recipe.display()
            );
        }
        // Nothing was written: no run directory, no cache.
        assert!(
            !empty.path().join("linearize").exists(),
            "{}",
            recipe.display()
        );
    }
}

/// A CUDA recipe plans on a CPU-only machine, with the full layer plan; length checks that used
/// to fail only once the stage started fail in the dry run, before any run directory exists.
#[test]
fn dry_run_plans_for_cuda_and_checks_stage_lengths() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    let recipe = write_recipe(dir.path(), "");
    let recipe = recipe.to_str().unwrap();
    let output = linearize(&[
        "--recipe",
        recipe,
        "--dry-run",
        "--set",
        "model.device=cuda",
    ])
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let plan = String::from_utf8_lossy(&output.stdout);
    assert!(
        plan.contains("runs on     cuda") && plan.contains("3 of 3 layers converted"),
        "{plan}"
    );
    if !tch::Cuda::is_available() {
        assert!(
            plan.contains("not checked on this machine") && plan.contains("model.device"),
            "{plan}"
        );
    }

    for (set, needle) in [
        // max_steps is 24 in the tiny recipe.
        (
            "attention_transfer.schedule.warmup_steps=24",
            "warmup_steps (24) must be below the stage's steps (24)",
        ),
        ("lora.max_steps=0", "max_steps must be >= 1"),
        // 2 x 64 tokens per update: 300 tokens allow 2 updates, fewer than the warmup of 4.
        (
            "attention_transfer.max_tokens=300",
            "warmup_steps (4) must be below the stage's steps (2)",
        ),
    ] {
        let output = linearize(&["--recipe", recipe, "--dry-run", "--set", set])
            .output()
            .unwrap();
        let e = stderr(&output);
        assert!(!output.status.success(), "{set}: accepted");
        assert!(e.contains(needle), "{set}: {e}");
    }
    // data.template: a file that does not compile fails the plan; `alpaca` is named in it.
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}").unwrap();
    let set = format!("data.template={}", bad.display());
    let output = linearize(&["--recipe", recipe, "--dry-run", "--set", &set])
        .output()
        .unwrap();
    let e = stderr(&output);
    assert!(!output.status.success(), "{e}");
    assert!(
        e.contains("data.template") && e.contains("invalid chat template"),
        "{e}"
    );
    assert!(!dir.path().join("runs").exists());
}
