//! Recipe validation through the binary (`--dry-run`): every kind of bad recipe is refused
//! before any work, with the file, the line and the key in the message.
mod common;

use common::{run, stderr, tiny_job, write_recipe};
use std::path::Path;

/// Runs `--dry-run` on the tiny recipe with `extra` appended and returns stderr (must fail).
fn refused(dir: &Path, extra: &str, sets: &[&str]) -> String {
    let recipe = write_recipe(dir, extra);
    let mut args = vec!["--recipe", recipe.to_str().unwrap(), "--dry-run"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = run(&args);
    assert!(!output.status.success(), "accepted: {extra} {sets:?}");
    stderr(&output)
}

#[test]
fn bad_recipes_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    let recipe = dir.path().join("recipe.yaml");
    let file = recipe.display().to_string();

    let ok = run(&[
        "--recipe",
        write_recipe(dir.path(), "").to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let plan = String::from_utf8_lossy(&ok.stdout);
    assert!(
        plan.contains("3 of 3 layers converted") && plan.contains("memory"),
        "{plan}"
    );

    // A typo: an unknown key, with the nearest valid one.
    let e = refused(dir.path(), "attention_transfr: {max_steps: 3}\n", &[]);
    assert!(
        e.contains(&file)
            && e.contains("unknown field `attention_transfr`")
            && e.contains("did you mean `attention_transfer`?"),
        "{e}"
    );
    let e = refused(dir.path(), "", &["attention_transfer.optimizer.lrr=0.1"]);
    assert!(
        e.contains("attention_transfer.optimizer.lrr") && e.contains("did you mean `lr`?"),
        "{e}"
    );

    // A wrong type, at the line of the value.
    let e = refused(dir.path(), "", &["attention_transfer.max_steps=many"]);
    assert!(
        e.contains("attention_transfer.max_steps") && e.contains("--set #1"),
        "{e}"
    );

    // An out-of-range value.
    let e = refused(dir.path(), "", &["attention_transfer.grad_accum=0"]);
    assert!(e.contains("grad_accum must be >= 1"), "{e}");
    // The section is in the file, the bad value on the command line: both are named.
    assert!(e.contains(&file) && e.contains("(with --set #1)"), "{e}");
    let e = refused(dir.path(), "", &["attention_transfer.max_steps=0"]);
    assert!(
        e.contains("attention_transfer") && e.contains("max_steps must be >= 1"),
        "{e}"
    );
    let e = refused(dir.path(), "", &["lora.max_steps=0"]);
    assert!(
        e.contains("lora") && e.contains("max_steps must be >= 1"),
        "{e}"
    );

    // A missing file, at its line in the recipe.
    let text = std::fs::read_to_string(write_recipe(dir.path(), "")).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("val_sources"))
        .unwrap()
        + 1;
    let missing = dir.path().join("val.txt");
    std::fs::rename(&missing, dir.path().join("moved.txt")).unwrap();
    // The run refuses it before any work...
    let output = run(&["--recipe", &file]);
    let e = stderr(&output);
    assert!(
        !output.status.success()
            && e.contains(&format!("{file}:{line}"))
            && e.contains("no such file"),
        "{e}"
    );
    assert!(!dir.path().join("runs").exists());
    // ...the dry run lists it among what this machine cannot check (the file may be put there
    // before the job runs) and plans the rest.
    let output = run(&["--recipe", &file, "--dry-run"]);
    let plan = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        plan.contains("not checked on this machine")
            && plan.contains(&format!("{file}:{line}"))
            && plan.contains("no such file"),
        "{plan}"
    );
    std::fs::rename(dir.path().join("moved.txt"), &missing).unwrap();

    // A layer past the model's depth.
    let e = refused(dir.path(), "", &["conversion.softmax_layers=[1, 3]"]);
    assert!(
        e.contains("layer 3 does not exist") && e.contains("3 layers"),
        "{e}"
    );

    // Measured selections: one of count and fraction; KL needs the stage it measures after;
    // more heads than the converted layers have (3 layers x 4 heads).
    let e = refused(
        dir.path(),
        "",
        &["conversion.softmax_heads={count: 2, fraction: 0.1, by: retrieval}"],
    );
    assert!(
        e.contains("conversion.softmax_heads: give exactly one of `count` and `fraction`"),
        "{e}"
    );
    let e = refused(
        dir.path(),
        "",
        &[
            "conversion.softmax_layers_by={count: 1, by: kl}",
            "attention_transfer=null",
        ],
    );
    assert!(
        e.contains("conversion.softmax_layers_by") && e.contains("no attention_transfer stage"),
        "{e}"
    );
    let e = refused(
        dir.path(),
        "",
        &["conversion.softmax_heads={count: 13, by: retrieval}"],
    );
    assert!(
        e.contains("13 heads asked for") && e.contains("only 12"),
        "{e}"
    );

    // An unknown variant, with the nearest valid one.
    let e = refused(dir.path(), "", &["attention_transfer.schedule.kind=cosin"]);
    assert!(e.contains("did you mean `cosine`?"), "{e}");

    // An unset environment variable.
    let e = refused(dir.path(), "", &["name=${LINEARIZE_TEST_UNSET_VARIABLE}"]);
    assert!(
        e.contains("LINEARIZE_TEST_UNSET_VARIABLE is not set"),
        "{e}"
    );
}

#[test]
fn includes_merge_under_the_recipe_and_sets_apply_last() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    std::fs::write(
        dir.path().join("configs/window.yaml"),
        "conversion:\n  attention: {window_size: 4}\nseed: 9\n",
    )
    .unwrap();
    let recipe = write_recipe(dir.path(), "include: [configs/window.yaml]\n");
    let out = dir.path().join("planned");
    let output = run(&[
        "--recipe",
        recipe.to_str().unwrap(),
        "--dry-run",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan = String::from_utf8_lossy(&output.stdout);
    // The recipe's own window (8) wins over the include's (4).
    assert!(plan.contains("lolcats-sw8+hedgehog8"), "{plan}");

    let output = run(&[
        "--recipe",
        recipe.to_str().unwrap(),
        "--dry-run",
        "--set",
        "conversion.attention.window_size=16",
    ]);
    let plan = String::from_utf8_lossy(&output.stdout);
    assert!(plan.contains("lolcats-sw16+hedgehog8"), "{plan}");

    std::fs::write(dir.path().join("configs/loop.yaml"), "include: loop.yaml\n").unwrap();
    let e = refused(dir.path(), "include: [configs/loop.yaml]\n", &[]);
    assert!(e.contains("includes itself"), "{e}");

    // A chain of 20 files, each including the next, is no cycle: it is read.
    for i in 0..20 {
        let next = if i < 19 {
            format!("include: chain{}.yaml\n", i + 1)
        } else {
            "seed: 5\n".to_owned()
        };
        std::fs::write(dir.path().join(format!("configs/chain{i}.yaml")), next).unwrap();
    }
    let recipe = write_recipe(dir.path(), "include: [configs/chain0.yaml]\n");
    let output = run(&["--recipe", recipe.to_str().unwrap(), "--dry-run"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn an_output_that_is_a_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    let recipe = write_recipe(dir.path(), "");
    let file = dir.path().join("train.txt");
    let output = run(&[
        "--recipe",
        recipe.to_str().unwrap(),
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let e = stderr(&output);
    assert!(e.contains(file.to_str().unwrap()), "{e}");
}
