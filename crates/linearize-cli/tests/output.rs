//! What a job prints: logs on stderr without colour codes when piped, the layer table once on
//! stdout, `-q` for warnings only, and the log copied into the run directory's `run.log`.
mod common;

use common::{linearize, stderr, TinyJob};

/// The tiny job cut to a few updates.
const SHORT: [&str; 6] = [
    "--set",
    "attention_transfer.max_steps=3",
    "--set",
    "attention_transfer.schedule.warmup_steps=1",
    "--set",
    "lora.max_steps=2",
];

#[test]
fn piped_output_has_no_escape_codes_and_the_run_keeps_a_log() {
    let job = TinyJob::new();
    let out = job.out("run");
    let mut args = vec![
        "--recipe",
        job.recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(SHORT);
    let output = linearize(&args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let (out_text, err_text) = (String::from_utf8_lossy(&output.stdout), stderr(&output));
    assert!(output.status.success(), "{err_text}");
    assert!(
        !out_text.contains('\x1b') && !err_text.contains('\x1b'),
        "{err_text}"
    );
    assert!(
        err_text.contains("INFO") && err_text.contains("job finished"),
        "{err_text}"
    );
    // The layer table: once, on stdout.
    let header = "layer  attention";
    assert_eq!(out_text.matches(header).count(), 1, "{out_text}");
    assert!(!err_text.contains(header), "{err_text}");

    // `inspect` reads the export: methods per layer, trained tensors, no stray-tensor error.
    let output = linearize(&[
        "inspect",
        "--model",
        out.join("model").to_str().unwrap(),
        "--json",
    ])
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let methods = summary["methods_per_layer"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    assert!(
        methods
            .iter()
            .all(|m| m.as_str().unwrap().starts_with("lolcats")),
        "{methods:?}"
    );
    assert!(summary["checkpoint"]["trained_tensors"].as_i64().unwrap() > 0);
    // Every layer converted: no per-token KV cache.
    assert_eq!(summary["kv_cache_bytes_per_token"], 0);
    let output = linearize(&["inspect", "--model", out.join("model").to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("layers 0-2 lolcats"),
        "{text}"
    );

    let log = std::fs::read_to_string(out.join("run.log")).unwrap();
    assert!(
        !log.contains('\x1b') && log.contains("job finished"),
        "{log}"
    );
    assert!(log.contains("INFO"), "{log}");

    // -q: warnings and errors only (the job is already complete: it resumes and finishes).
    let mut quiet = args.clone();
    quiet.insert(0, "-q");
    let output = linearize(&quiet).env_remove("RUST_LOG").output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("INFO"), "{}", stderr(&output));
    // The resumed run appended to the same log.
    let again = std::fs::read_to_string(out.join("run.log")).unwrap();
    assert!(again.len() > log.len() && again.starts_with(&log));
}
