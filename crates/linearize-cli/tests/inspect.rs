//! `linearize inspect` takes every model source a recipe takes.
mod common;

use common::{run, stderr};

#[test]
fn inspect_takes_the_offline_model() {
    let output = run(&["inspect", "--model", "offline:smollm2", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["model_type"], "llama");
    assert_eq!(summary["layers"], 30);
    assert_eq!(summary["checkpoint"]["matches_config"], true);
}
