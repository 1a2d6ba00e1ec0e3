//! Measured selections end to end on the tiny job (3 layers of 4 query heads): two heads chosen
//! by the teacher's retrieval scores before stage 1, one layer by KL drop after it. The choice
//! is written to `selection.json` with every score, is the same in a second run, is what a
//! resumed run uses (it reads the file instead of measuring again), reaches the exported model,
//! and the exported head-level hybrid generates.
mod common;

use common::{run, stderr, tiny_job, write_recipe};
use serde_json::Value;
use std::path::Path;

const SELECTORS: [&str; 4] = [
    "--set",
    "conversion.softmax_heads={count: 2, by: retrieval}",
    "--set",
    "conversion.softmax_layers_by={count: 1, by: kl, batches: 1}",
];

fn run_job(recipe: &Path, out: &Path, sets: &[&str]) {
    let mut args = vec![
        "--recipe",
        recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(sets);
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `layer -> softmax heads` of the exported model's `linearize` section.
fn exported_heads(run_dir: &Path) -> Vec<(u64, Vec<u64>)> {
    let cfg = json(&run_dir.join("model/config.json"));
    cfg["linearize"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            let heads = l["attention"]["softmax_heads"].as_array()?;
            Some((
                l["layer"].as_u64().unwrap(),
                heads.iter().map(|h| h.as_u64().unwrap()).collect(),
            ))
        })
        .collect()
}

#[test]
fn selections_are_measured_once_persisted_reused_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path());
    let recipe = write_recipe(dir.path(), "");
    let first = dir.path().join("first");
    run_job(&recipe, &first, &SELECTORS);

    let selection = json(&first.join("selection.json"));
    let heads = &selection["softmax_heads"];
    assert_eq!(heads["by"], "retrieval");
    assert_eq!(heads["count"], 2);
    assert_eq!(heads["scores"].as_array().unwrap().len(), 3 * 4);
    let chosen: usize = heads["chosen"]
        .as_object()
        .unwrap()
        .values()
        .map(|h| h.as_array().unwrap().len())
        .sum();
    assert_eq!(chosen, 2);
    let layers = &selection["softmax_layers"];
    assert_eq!(layers["by"], "kl");
    assert_eq!(layers["scores"].as_array().unwrap().len(), 3);
    let reverted = layers["chosen"][0].as_u64().unwrap();

    // The exported model keeps the chosen heads of the layers that stayed converted.
    let want: Vec<(u64, Vec<u64>)> = heads["chosen"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(l, h)| {
            let heads = h.as_array().unwrap().iter().map(|x| x.as_u64().unwrap());
            (l.parse().unwrap(), heads.collect())
        })
        .filter(|(l, _)| *l != reverted)
        .collect();
    assert_eq!(exported_heads(&first), want);

    // Deterministic: a second run measures the same scores and chooses the same.
    let second = dir.path().join("second");
    run_job(&recipe, &second, &SELECTORS);
    assert_eq!(json(&second.join("selection.json")), selection);

    // A resumed run takes the file's choice (here edited) instead of measuring again.
    let layer = (0..3u64).find(|&l| l != reverted).unwrap();
    let mut edited = selection.clone();
    edited["softmax_heads"]["chosen"] = serde_json::json!({ layer.to_string(): [1, 2] });
    std::fs::write(
        first.join("selection.json"),
        serde_json::to_string_pretty(&edited).unwrap(),
    )
    .unwrap();
    let output = run(&["resume", first.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(exported_heads(&first), vec![(layer, vec![1, 2])]);

    // The exported hybrid generates (prefill, then one-token steps through its KV cache).
    let output = run(&[
        "generate",
        "--model",
        first.join("model").to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!output.stdout.is_empty());

    // Heads by KL after stage 1, in whole GQA groups: one key/value head with both query heads
    // that read it (4 query heads on 2 key/value heads).
    let third = dir.path().join("third");
    run_job(
        &recipe,
        &third,
        &[
            "--set",
            "conversion.softmax_heads={count: 1, by: kl, unit: kv_heads, batches: 1}",
            "--set",
            EVAL,
        ],
    );
    let heads = &json(&third.join("selection.json"))["softmax_heads"];
    assert_eq!(
        (&heads["by"], &heads["unit"]),
        (&"kl".into(), &"kv_heads".into())
    );
    assert_eq!(heads["scores"].as_array().unwrap().len(), 3 * 4);
    let exported = exported_heads(&third);
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert!(
        [vec![0, 1], vec![2, 3]].contains(&exported[0].1),
        "{exported:?}"
    );

    // The evaluation runs on the hybrid: decoding agrees with the full pass, and the decoding
    // cache holds one of the teacher's six key/value heads (plus the fixed-size states).
    let eval = json(&third.join("report/eval.json"));
    assert_eq!(
        eval["decode_check"]["agree"], true,
        "{}",
        eval["decode_check"]
    );
    assert!(eval["passkey"]["student"].is_object() && eval["mqar"]["student"].is_object());
    let cache = |model: &str| {
        eval["speed"][model]["points"][0]["cache_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        cache("student") * 3 < cache("teacher"),
        "cache bytes: student {}, teacher {}",
        cache("student"),
        cache("teacher")
    );
}

/// A small evaluation of every kind that runs a model through its decoding cache.
const EVAL: &str = "eval={perplexity: {enabled: false}, attention_error: {enabled: false}, \
    passkey: {min_length: 256, max_length: 256, depths: [0.5], trials: 1}, \
    multikey: {enabled: false}, mqar: {num_pairs: 4, trials: 2}, \
    retrieval_heads: {enabled: false}, multiple_choice: {enabled: false}, \
    speed: {context_lengths: [128], decode_tokens: 4}, generations: {enabled: false}, \
    window_only: {enabled: false}}";
